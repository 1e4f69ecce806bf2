"""`prepare`: ED source -> examples -> spaCy annotation -> vocabulary -> vectors -> knowledge -> cache.

The result is a content-addressed cache entry `<cache_dir>/<key>/` whose key hashes the source
files, every setting that changes the output, and the data-pipeline code. A second prepare with
the same inputs is a hit (loads in seconds); changing anything misses. Entries are built in a
temporary directory and renamed into place, so an interrupted prepare leaves no half-written entry.

Entry layout:
    manifest.json      settings, key, source files + hashes, counts, timings, substitutions
    vocab.json         the vocabulary artifact shared by training and serving
    vectors.npy        (V, 300) float32 embedding initialisation
    vector_rows.npy    (V,) bool, True where vectors.npy holds a pre-trained vector
    <split>.pkl        PreparedSplit: distinct texts with their features (token ids, POS, heads, deps,
                       knowledge), examples and their features (indices into the texts)
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.metadata
import json
import os
import pickle
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from trainers.config import DataConfig
from trainers.data import annotate as ann
from trainers.data.features import ExampleFeatures, TextFeatures, example_texts, featurize, featurize_texts
from trainers.data.knowledge import build_knowledge
from trainers.data.records import DataError, Example, InvalidRecord, examples_from
from trainers.data.sources import discover, load_splits
from trainers.data.vocab import Vocab

FORMAT = "edp-prepared/1"
Progress = Callable[[str, int, int], None]


@dataclass
class PreparedSplit(TextFeatures):
    """One split, compact: distinct texts featurised once (`TextFeatures`), examples refer to them by index."""

    name: str
    examples: list[Example]
    features: list[ExampleFeatures]  # per example, parallel to `examples`
    invalid: list[InvalidRecord] = field(default_factory=list)
    num_conversations: int = 0


@dataclass
class Prepared:
    path: Path
    manifest: dict
    vocab: Vocab
    cache_hit: bool

    def split(self, name: str) -> PreparedSplit:
        file = self.path / f"{name}.pkl"
        if not file.exists():
            raise DataError(f"prepared data {self.path} has no split {name!r} ({self.manifest['splits']})")
        with file.open("rb") as f:
            return pickle.load(f)

    def vectors(self) -> np.ndarray | None:
        file = self.path / "vectors.npy"
        return np.load(file) if file.exists() else None

    def vector_rows(self) -> np.ndarray | None:
        """(V,) bool: the rows of `vectors()` that hold a pre-trained vector (the others are random)."""
        file = self.path / "vector_rows.npy"
        return np.load(file) if file.exists() else None


def data_pipeline_source_hash() -> str:
    """Hash of the data-pipeline source (every .py in trainers/data/): a change to preprocessing code invalidates
    the cache."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _file_digest(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def cache_key(cfg: DataConfig, source_files: list[Path], pipeline_version: str) -> str:
    payload = {
        "format": FORMAT,
        "files": sorted((p.name, _file_digest(p)) for p in source_files),
        "settings": cfg.hashed_settings(),
        "code": data_pipeline_source_hash(),
        "pipeline": pipeline_version,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def prepare(cfg: DataConfig, progress: Progress | None = None, publish: bool = False) -> Prepared:
    """Prepare (or load from cache) the splits named in `cfg`; see the module docstring. With `cfg.shared_cache`,
    an entry missing here is fetched from there when another node published it, and with `publish` (the driver of
    a cluster run) the entry is published there for the other nodes."""
    progress = progress or (lambda phase, done, total: None)
    t0 = time.perf_counter()
    local = _localize(cfg)
    source_files = sorted({path for split, (_, path, _) in discover(local).items() if split in cfg.splits})
    pipeline_version = _pipeline_version(cfg.spacy_model)
    key = cache_key(cfg, source_files, pipeline_version)
    root = Path(cfg.cache_dir).expanduser()
    entry = root / key
    if (entry / "manifest.json").exists() or _fetch_shared(cfg, key, entry):
        if publish:  # a driver's earlier local entry becomes visible to the other nodes
            _publish_shared(cfg, key, entry)
        manifest = json.loads((entry / "manifest.json").read_text())
        manifest["timings"]["cache_hit_s"] = round(time.perf_counter() - t0, 3)
        return Prepared(entry, manifest, Vocab.load(entry / "vocab.json"), cache_hit=True)
    progress("load", 0, 1)
    reports = load_splits(local, skip_invalid=cfg.skip_invalid, splits=cfg.splits)
    progress("load", 1, 1)
    load_s = time.perf_counter() - t0

    examples = {s: examples_from(r.conversations) for s, r in reports.items()}
    nlp = ann.load_pipeline(cfg.spacy_model, cfg.contractions)
    t1 = time.perf_counter()
    table = annotation_table([c for r in reports.values() for c in r.conversations], nlp, cfg, progress)
    parse_s = time.perf_counter() - t1
    utterances = [t for t, a in table.items() if a.deps and a.deps[0] != SITUATION_ONLY]

    train = reports["train"].conversations
    train_texts = {u for c in train for u in c.utterances} | {c.situation for c in train}
    vocab = Vocab.build((table[t].tokens for t in sorted(train_texts)), cfg.min_freq, cfg.max_vocab)

    knowledge = build_knowledge(cfg.knowledge, **({"path": cfg.knowledge_path} if cfg.knowledge_path else {}))
    tmp = root / f".tmp-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        vocab.save(tmp / "vocab.json")
        vec_info = _write_vectors(cfg, vocab, tmp, progress)
        counts = {}
        for name, report in reports.items():
            progress(f"encode {name}", 0, 1)
            split = build_split(name, report, examples[name], table, vocab, knowledge, nlp)
            with (tmp / f"{name}.pkl").open("wb") as f:
                pickle.dump(split, f, protocol=pickle.HIGHEST_PROTOCOL)
            counts[name] = {"conversations": len(report.conversations), "examples": len(split.examples),
                            "skipped": len(report.invalid), "texts": len(split.texts)}
            progress(f"encode {name}", 1, 1)
        manifest = {
            "format": FORMAT, "key": key, "settings": cfg.model_dump(), "code_version": data_pipeline_source_hash(),
            "source": cfg.resolved_source(), "source_files": [str(p) for p in source_files],
            "splits": list(reports), "counts": counts, "vocab_size": len(vocab),
            "substitutions": {"parser": pipeline_version, "vectors": vec_info["source"],
                              "knowledge": knowledge.describe()},
            "vectors": vec_info,
            "invalid": {s: [str(r) for r in rep.invalid] for s, rep in reports.items()},
            "timings": {"load_s": round(load_s, 3), "parse_s": round(parse_s, 3),
                        "parsed_texts": len(utterances),
                        "total_s": round(time.perf_counter() - t0, 3)},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished the same entry first: theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if publish:
        _publish_shared(cfg, key, entry)
    return Prepared(entry, manifest, vocab, cache_hit=False)


def _publish_shared(cfg: DataConfig, key: str, entry: Path) -> None:
    """Publish entry `key` to `cfg.shared_cache/<key>/` (manifest last) unless it is complete there already."""
    if cfg.shared_cache:
        from trainers.data.remote import publish_dir

        publish_dir(entry, f"{cfg.shared_cache.rstrip('/')}/{key}", endpoint_url=cfg.s3_endpoint_url)


def _fetch_shared(cfg: DataConfig, key: str, entry: Path) -> bool:
    """Fetch entry `key` from `cfg.shared_cache` when another node published it; one fetch per node at a time
    (the trials of a node wait on a file lock and then find the entry on disk)."""
    if not cfg.shared_cache:
        return False
    from trainers.data.remote import fetch_dir

    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.parent / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return (entry / "manifest.json").exists() or fetch_dir(
            f"{cfg.shared_cache.rstrip('/')}/{key}", entry, endpoint_url=cfg.s3_endpoint_url)


def _pipeline_version(name: str) -> str:
    """`name@version` of a spaCy pipeline package or path, without loading it (keeps cache hits fast)."""
    meta = Path(name) / "meta.json"
    if meta.exists():
        return f"{name}@{json.loads(meta.read_text()).get('version', '?')}"
    try:
        return f"{name}@{importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        raise DataError(f"spaCy pipeline {name!r} is neither an installed package nor a model directory") from None


def _localize(cfg: DataConfig) -> Path:
    """The source as a local path; s3:// prefixes are synced into the cache first (ETag-checked)."""
    source = cfg.resolved_source()
    if not source.startswith("s3://"):
        return Path(source).expanduser()
    from trainers.data.remote import fetch_s3_prefix

    return fetch_s3_prefix(source, Path(cfg.cache_dir).expanduser() / "s3", endpoint_url=cfg.s3_endpoint_url)


SITUATION_ONLY = "<situation>"  # deps marker of texts that were tokenised, not parsed


def annotation_table(conversations, nlp, cfg: DataConfig, progress: Progress | None = None) -> dict:
    """Annotate every distinct text once: utterances get a full parse, situations only tokens."""
    progress = progress or (lambda phase, done, total: None)
    utterances = sorted({u for c in conversations for u in c.utterances})
    situations = sorted({c.situation for c in conversations} - set(utterances))
    table: dict[str, ann.Annotation] = dict(zip(utterances, _annotate_with_progress(utterances, nlp, cfg, progress)))
    for text, toks in zip(situations, ann.tokenize(situations, nlp)):
        n = len(toks)
        table[text] = ann.Annotation(toks, ("X",) * n, tuple(range(n)), (SITUATION_ONLY,) * n, (0,))
    return table


def split_with_vocab(name: str, report, vocab: Vocab, cfg: DataConfig, nlp=None) -> PreparedSplit:
    """Annotate and encode one loaded split with an existing vocabulary (evaluation, serving); not cached."""
    nlp = nlp or ann.load_pipeline(cfg.spacy_model, cfg.contractions)
    table = annotation_table(report.conversations, nlp, cfg)
    knowledge = build_knowledge(cfg.knowledge, **({"path": cfg.knowledge_path} if cfg.knowledge_path else {}))
    return build_split(name, report, examples_from(report.conversations), table, vocab, knowledge, nlp)


def _annotate_with_progress(texts: list[str], nlp, cfg: DataConfig, progress: Progress) -> list[ann.Annotation]:
    out: list[ann.Annotation] = []
    chunk = max(cfg.parse_batch_size * cfg.n_process * 8, 2048)
    for start in range(0, len(texts), chunk):
        progress("parse", start, len(texts))
        out.extend(ann.annotate(texts[start:start + chunk], nlp, batch_size=cfg.parse_batch_size,
                                n_process=cfg.n_process))
    progress("parse", len(texts), len(texts))
    return out


def _write_vectors(cfg: DataConfig, vocab: Vocab, out: Path, progress: Progress) -> dict:
    if cfg.vectors == "none":
        return {"source": "none (random init)", "oov_count": None, "oov_rate": None}
    from trainers.data.vectors import load_vectors

    progress("vectors", 0, 1)
    result = load_vectors(vocab.itos, cfg.vectors)
    np.save(out / "vectors.npy", result.matrix)
    np.save(out / "vector_rows.npy", np.array([w in result.words_with_vectors for w in vocab.itos]))
    progress("vectors", 1, 1)
    return {"source": result.source_name, "oov_count": int(result.oov_count), "oov_rate": float(result.oov_rate)}


def build_split(name, report, examples, table, vocab: Vocab, knowledge, nlp) -> PreparedSplit:
    """Featurise `examples` with `vocab` from the annotation `table` (text -> Annotation) into a PreparedSplit."""
    texts = list(dict.fromkeys(t for ex in examples for t in example_texts(ex.context, ex.situation, ex.target)))
    index = {t: i for i, t in enumerate(texts)}
    return PreparedSplit(
        **vars(featurize_texts(texts, table, vocab, knowledge, nlp)),
        name=name,
        examples=examples,
        features=[featurize(ex.context, ex.situation, ex.target, index, ex.emotion_id) for ex in examples],
        invalid=list(report.invalid),
        num_conversations=len(report.conversations),
    )
