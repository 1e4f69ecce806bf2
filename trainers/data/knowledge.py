"""Commonsense knowledge for IAMM's implicit branch (Yang et al., ACL 2024 Findings, eqs. 4-7).

IAMM encodes, for the situation S and every utterance U_i, the COMET-ATOMIC2020 inferences K_rk^type
of five relations (xIntent, xNeed, xWant, xEffect, xReact; Hwang et al., 2021). The COMET weights are
not obtainable offline here, so the source of those texts is pluggable:

- `none`        (NoKnowledge): no texts at all. IAMM is then built without its implicit association
                and without the commonsense emotion head: "w/o knowledge", not the paper's "w/o IA" row
                (which keeps the latter); this backend never fabricates text.
- `precomputed` (PrecomputedKnowledge): a jsonl file of inferences keyed by text (format below).
- `comet`       (CometKnowledge): a local or s3:// seq2seq checkpoint (e.g. comet-atomic_2020_BART)
                run as batched beam-search inference; needs the optional `comet` extra (transformers).

Every backend answers `infer(texts) -> [{relation: [inference, ...]} per text]` with the relations in
`RELATIONS` order, and `describe()` for logging as MLflow params. Distinct texts are resolved once and
kept in an in-memory cache for the lifetime of the source (a superset of "once per call").

Precomputed jsonl format, one object per line (blank lines are skipped, other keys ignored):

    {"text": "My dog died yesterday.", "xIntent": ["none"], "xNeed": ["to have a dog"],
     "xWant": ["to cry", "to get a new dog"], "xEffect": ["cries"], "xReact": ["sad"]}

Texts are matched after normalisation: strip, lower-case, collapse whitespace. Values are kept verbatim
(a value may also be a list of token lists, the shape IAMM stores; tokens are joined by spaces).

The authors ship their COMET outputs inside the pickled `dataset_preproc.p` (IAMM repo,
preprocess_comet.py): per split, `comet_cxt[i][j][r]` holds the beams for utterance j of example i and
relation r (RELATIONS order), `comet_sit[i][r]` those for the situation, all as nltk token lists of
lower-cased text with contractions expanded. That file is positional, not keyed by text, and unpickling
it runs arbitrary code, so it is not read here: `records_from_iamm_split` turns one already-unpickled
split dict into records for `write_precomputed`. Those keys are in the authors' tokenised form, so raw
ED text matches them only after the same preprocessing (check `PrecomputedKnowledge.missing`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from trainers.data.records import DataError

RELATIONS: tuple[str, ...] = ("xIntent", "xNeed", "xWant", "xEffect", "xReact")

Inferences = dict[str, list[str]]  # relation -> inference texts, keys in RELATIONS order


def normalise_text(text: str) -> str:
    """Lookup key for precomputed knowledge: stripped, lower-cased, whitespace collapsed."""
    return " ".join(text.split()).lower()


def empty_inferences() -> Inferences:
    return {r: [] for r in RELATIONS}


class KnowledgeSource:
    """Base class: resolves each distinct text once through `_infer_distinct` and caches the result."""

    name: str = "base"
    available: bool = True

    def __init__(self) -> None:
        self._cache: dict[str, Inferences] = {}

    def infer(self, texts: Sequence[str]) -> list[Inferences]:
        """For each text, relation -> list of inferences. Empty texts get empty lists."""
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise DataError(f"knowledge query texts[{i}] is a {type(t).__name__}, expected text")
        keys = [self._key(t) for t in texts]
        todo: dict[str, str] = {}  # key -> first text seen with that key
        for key, text in zip(keys, texts, strict=True):
            if key and key not in self._cache and key not in todo:
                todo[key] = text
        if todo:
            found = self._infer_distinct(list(todo.values()))
            self._cache.update(zip(todo, found, strict=True))
        return [_copy(self._cache[k]) if k else empty_inferences() for k in keys]

    def describe(self) -> dict:
        """Backend name and settings, flat, for MLflow params."""
        return {"backend": self.name, "available": self.available}

    def _key(self, text: str) -> str:
        return " ".join(text.split())

    def _infer_distinct(self, texts: list[str]) -> list[Inferences]:
        raise NotImplementedError


def _copy(inf: Inferences) -> Inferences:
    return {r: list(inf[r]) for r in RELATIONS}


# ---------------------------------------------------------------------------------------------------------
# none


class NoKnowledge(KnowledgeSource):
    """No commonsense knowledge: every relation is an empty list (IAMM then has no implicit association and no
    commonsense emotion head: w/o IA and w/o the knowledge path, not the paper's "w/o IA" row)."""

    name = "none"
    available = False

    def _infer_distinct(self, texts: list[str]) -> list[Inferences]:
        return [empty_inferences() for _ in texts]

    def describe(self) -> dict:
        return {
            **super().describe(),
            "note": "no commonsense knowledge: IAMM has no implicit association (eq. 17) and no commonsense "
            "emotion head P_cs (eqs. 4-7, 23), i.e. w/o IA and w/o knowledge; not the paper's 'w/o IA' row, "
            "which keeps P_cs",
        }


# ---------------------------------------------------------------------------------------------------------
# precomputed


class PrecomputedKnowledge(KnowledgeSource):
    """Inferences read from a jsonl file keyed by text (format in the module docstring).

    on_missing="error" (default): a text absent from the file raises DataError naming it and how many
    texts are missing. on_missing="empty": such texts get empty lists and are counted in `missing`
    (distinct texts), which callers must report.
    """

    name = "precomputed"

    def __init__(self, path: str | Path, on_missing: str = "error") -> None:
        super().__init__()
        if on_missing not in ("error", "empty"):
            raise ValueError(f"on_missing must be 'error' or 'empty', got {on_missing!r}")
        self.path = Path(path)
        self.on_missing = on_missing
        self.missing = 0
        self.table, self.sha256 = _read_precomputed(self.path)

    def _key(self, text: str) -> str:
        return normalise_text(text)

    def _infer_distinct(self, texts: list[str]) -> list[Inferences]:
        absent = [t for t in texts if self._key(t) not in self.table]
        if absent and self.on_missing == "error":
            raise DataError(
                f"{self.path}: {len(absent)} text(s) have no knowledge entry, e.g. {absent[0][:60]!r}; "
                "regenerate the file for this data or pass on_missing='empty'"
            )
        self.missing += len(absent)
        return [_copy(self.table.get(self._key(t)) or empty_inferences()) for t in texts]

    def describe(self) -> dict:
        return {
            **super().describe(), "path": str(self.path), "sha256": self.sha256, "entries": len(self.table),
            "on_missing": self.on_missing, "missing": self.missing,
        }


def _read_precomputed(path: Path) -> tuple[dict[str, Inferences], str]:
    """Parse and validate the jsonl; returns (normalised text -> inferences, sha256 of the file)."""
    if not path.is_file():
        raise DataError(f"precomputed knowledge file {path} does not exist")
    raw = path.read_bytes()
    table: dict[str, Inferences] = {}
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            raise DataError(f"{where}: not valid UTF-8") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        text, inferences = _parse_record(record, where)
        key = normalise_text(text)
        if key in table and table[key] != inferences:
            raise DataError(f"{where}: text {text[:60]!r} already has different inferences "
                            f"at line {first_line[key]}")
        table.setdefault(key, inferences)
        first_line.setdefault(key, lineno)
    return table, hashlib.sha256(raw).hexdigest()


def _parse_record(record: object, where: str) -> tuple[str, Inferences]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: line is a {type(record).__name__}, expected a JSON object")
    text = record.get("text")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: missing or empty field 'text'")
    inferences: Inferences = {}
    for rel in RELATIONS:
        if rel not in record:
            raise DataError(f"{where}: missing relation {rel!r} (every line needs all of {list(RELATIONS)})")
        values = record[rel]
        if not isinstance(values, list):
            raise DataError(f"{where}: relation {rel!r} is a {type(values).__name__}, expected a list")
        inferences[rel] = [_as_text(v, f"{where}: {rel}[{i}]") for i, v in enumerate(values)]
    return text, inferences


def _as_text(value: object, where: str) -> str:
    """A string, or a token list (IAMM's stored shape) joined by spaces."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(tok, str) for tok in value):
        return " ".join(value)
    raise DataError(f"{where} is a {type(value).__name__}, expected text or a list of tokens")


def write_precomputed(records: Iterable[dict], path: str | Path) -> Path:
    """Write records ({"text", *RELATIONS}) as the jsonl PrecomputedKnowledge reads; validates each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for i, record in enumerate(records):
            text, inferences = _parse_record(record, f"record {i}")
            f.write(json.dumps({"text": text, **inferences}, ensure_ascii=False) + "\n")
    return path


def records_from_iamm_split(split: dict) -> list[dict]:
    """Records for `write_precomputed` from one unpickled split dict of the IAMM authors' data.

    Reads `context[i][j]` / `situation[i]` (token lists) with `comet_cxt[i][j]` / `comet_sit[i]` (five
    relations in RELATIONS order, each a list of token-list beams). Falls back to CEM's `utt_cs[i]`
    (the last utterance only) when `comet_cxt` is absent. Repeated texts keep their first record.
    """
    records: dict[str, dict] = {}

    def add(tokens: list[str], per_relation: list, where: str) -> None:
        if len(per_relation) != len(RELATIONS):
            raise DataError(f"{where}: expected {len(RELATIONS)} relations, got {len(per_relation)}")
        text = " ".join(tokens)
        beams = {rel: [_as_text(b, f"{where}: {rel}") for b in per_relation[r]]
                 for r, rel in enumerate(RELATIONS)}
        records.setdefault(normalise_text(text), {"text": text, **beams})

    for i, context in enumerate(split["context"]):
        if "comet_cxt" in split:
            for j, utterance in enumerate(context):
                add(utterance, split["comet_cxt"][i][j], f"comet_cxt[{i}][{j}]")
        elif "utt_cs" in split:
            add(context[-1], split["utt_cs"][i], f"utt_cs[{i}]")
        if "comet_sit" in split:
            add(split["situation"][i], split["comet_sit"][i], f"comet_sit[{i}]")
    return list(records.values())


# ---------------------------------------------------------------------------------------------------------
# comet


class CometKnowledge(KnowledgeSource):
    """COMET-ATOMIC2020 inferences generated by a local seq2seq checkpoint (or one fetched from s3://).

    Query format: "{text} {relation} [GEN]", the convention of the comet-atomic_2020_BART checkpoint
    (allenai/comet-atomic-2020 generation_example.py, "demo" model) that CEM and IAMM use, with beam
    search, 5 beams and 5 returned sequences. The older `_aaai` checkpoint was trained without "[GEN]":
    pass query_template="{text} {relation}" for it. Settings are passed to `generate` explicitly instead of
    CEM's `task_specific_params["summarization"]`, so they are what `describe()` logs. Outputs are
    stripped; empty and "none" outputs are dropped; duplicates are removed keeping beam order.
    """

    name = "comet"

    def __init__(
        self,
        checkpoint: str | Path,
        device: str = "cpu",
        batch_size: int = 32,  # queries per generate call; each query costs num_beams decoder rows
        num_beams: int = 5,
        num_return: int = 5,
        max_new_tokens: int = 24,  # ATOMIC tails are short phrases
        query_template: str = "{text} {relation} [GEN]",
        cache_dir: str | Path | None = None,  # where an s3:// checkpoint is downloaded
        endpoint_url: str | None = None,
    ) -> None:
        super().__init__()
        for field_name, value in (("batch_size", batch_size), ("num_beams", num_beams),
                                  ("num_return", num_return), ("max_new_tokens", max_new_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{field_name} must be a positive integer, got {value!r}")
        if num_return > num_beams:
            raise ValueError(f"num_return ({num_return}) must not exceed num_beams ({num_beams})")
        if "{text}" not in query_template or "{relation}" not in query_template:
            raise ValueError(f"query_template must contain {{text}} and {{relation}}, got {query_template!r}")
        self.checkpoint = str(checkpoint)
        self.device, self.batch_size = device, batch_size
        self.num_beams, self.num_return, self.max_new_tokens = num_beams, num_return, max_new_tokens
        self.query_template = query_template
        self.local_path = _resolve_checkpoint(self.checkpoint, cache_dir, endpoint_url)
        self.tokenizer, self.model = _load_seq2seq(self.local_path, device)

    def _infer_distinct(self, texts: list[str]) -> list[Inferences]:
        template = self.query_template
        queries = [template.format(text=self._key(t), relation=r) for t in texts for r in RELATIONS]
        beams = self._generate(queries)  # one list of num_return strings per query
        out = []
        for i in range(len(texts)):
            per_text = beams[i * len(RELATIONS):(i + 1) * len(RELATIONS)]
            out.append({rel: clean_inferences(b) for rel, b in zip(RELATIONS, per_text, strict=True)})
        return out

    def _generate(self, queries: list[str]) -> list[list[str]]:
        """Batched beam search over all (text, relation) queries."""
        import torch

        results: list[list[str]] = []
        for start in range(0, len(queries), self.batch_size):
            chunk = queries[start:start + self.batch_size]
            enc = self.tokenizer(chunk, return_tensors="pt", padding=True, truncation=True)
            with torch.inference_mode():
                ids = self.model.generate(
                    input_ids=enc["input_ids"].to(self.device),
                    attention_mask=enc["attention_mask"].to(self.device),
                    num_beams=self.num_beams,
                    num_return_sequences=self.num_return,
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                )  # (len(chunk) * num_return, T)
            decoded = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
            n = self.num_return
            results.extend(decoded[k * n:(k + 1) * n] for k in range(len(chunk)))
        return results

    def describe(self) -> dict:
        return {
            **super().describe(), "checkpoint": self.checkpoint, "device": self.device,
            "batch_size": self.batch_size, "num_beams": self.num_beams, "num_return": self.num_return,
            "max_new_tokens": self.max_new_tokens, "query_template": self.query_template,
        }


def clean_inferences(outputs: Iterable[str]) -> list[str]:
    """Strip; drop empty and "none" outputs; dedup keeping the first (best-beam) occurrence."""
    kept: dict[str, None] = {}
    for text in outputs:
        text = " ".join(text.split())
        if text and text.lower() != "none":
            kept.setdefault(text, None)
    return list(kept)


def _resolve_checkpoint(checkpoint: str, cache_dir: str | Path | None, endpoint_url: str | None) -> Path:
    if checkpoint.startswith("s3://"):
        from trainers.data.remote import fetch_s3_prefix

        cache = Path(cache_dir or Path.home() / ".cache" / "edp" / "comet")
        return Path(fetch_s3_prefix(checkpoint, cache, endpoint_url=endpoint_url))
    path = Path(checkpoint)
    if not path.is_dir():
        raise DataError(f"COMET checkpoint {path} is not a directory (expected a save_pretrained folder)")
    return path


def _load_seq2seq(path: Path, device: str):
    try:
        from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    except ImportError as e:
        raise DataError(f"the 'comet' knowledge source needs transformers: pip install .[comet] ({e})") \
            from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot load a seq2seq checkpoint from {path}: {e}") from None
    return tokenizer, model.to(device).eval()


# ---------------------------------------------------------------------------------------------------------
# table

KNOWLEDGE_SOURCES: dict[str, type[KnowledgeSource]] = {
    "none": NoKnowledge,
    "precomputed": PrecomputedKnowledge,
    "comet": CometKnowledge,
}


def build_knowledge(name: str, **kwargs) -> KnowledgeSource:
    """Build a knowledge source by name: none, precomputed (path=...), comet (checkpoint=...)."""
    if name not in KNOWLEDGE_SOURCES:
        raise ValueError(f"unknown knowledge source {name!r}; choose one of: {', '.join(KNOWLEDGE_SOURCES)}")
    return KNOWLEDGE_SOURCES[name](**kwargs)
