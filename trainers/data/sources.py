"""Load EMPATHETIC-DIALOGUES splits from any supported source into `Conversation` records.

Sources:
- a directory of jsonl files (`ed_train.jsonl` / `train.jsonl`, one conversation per line), or one such file;
- the official release: a directory with train.csv/valid.csv/test.csv, or the original .tar.gz;
- `s3://bucket/prefix` holding either of the above (downloaded to a local cache by `remote`).

Every malformed row or conversation becomes an `InvalidRecord` naming its conv_id and reason.
By default any invalid record fails the load; `skip_invalid=True` keeps going and reports them.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from trainers.data.records import (
    LISTENER,
    SPEAKER,
    Conversation,
    DataError,
    InvalidRecord,
    LoadReport,
    validate_conversation,
)

SPLITS = ("train", "valid", "test")
CSV_COLUMNS = ("conv_id", "utterance_idx", "context", "prompt", "speaker_idx", "utterance", "selfeval", "tags")
EMBEDDED_SAMPLE = Path(__file__).parent / "sample"


def load_splits(
    source: str | Path,
    *,
    cache_dir: str | Path | None = None,
    skip_invalid: bool = False,
    endpoint_url: str | None = None,
    splits: Iterable[str] | None = None,
) -> dict[str, LoadReport]:
    """Load every split found at `source` (or only `splits`); see the module docstring."""
    if str(source).startswith("s3://"):
        from trainers.data.remote import fetch_s3_prefix

        cache = Path(cache_dir or Path.home() / ".cache" / "edp" / "s3")
        source = fetch_s3_prefix(str(source), cache, endpoint_url=endpoint_url)
    files = discover(Path(source))
    wanted = set(splits) if splits is not None else set(files)
    missing = wanted - set(files)
    if missing:
        raise DataError(f"{source}: no {sorted(missing)} split found (found {sorted(files)})")
    reports = {}
    for split in sorted(wanted):
        kind, path, member = files[split]
        reports[split] = _load_one(kind, path, member)
        _enforce(reports[split], split, skip_invalid)
    return reports


def discover(path: Path) -> dict[str, tuple[str, Path, str | None]]:
    """Map split name -> (format, file, tar member) for a file or directory."""
    if not path.exists():
        raise DataError(f"data source {path} does not exist")
    if path.is_file():
        if path.name.endswith((".tar.gz", ".tgz")):
            return _tar_members(path)
        if path.suffix == ".jsonl":
            return {_split_name(path.stem): ("jsonl", path, None)}
        if path.suffix == ".csv":
            return {_split_name(path.stem): ("csv", path, None)}
        raise DataError(f"{path}: unsupported file type (expected .jsonl, .csv or .tar.gz)")
    found: dict[str, tuple[str, Path, str | None]] = {}
    for split in SPLITS:
        for name, kind in ((f"ed_{split}.jsonl", "jsonl"), (f"{split}.jsonl", "jsonl"), (f"{split}.csv", "csv")):
            if (path / name).is_file():
                found.setdefault(split, (kind, path / name, None))
    if not found:
        tars = sorted(path.glob("*.tar.gz"))
        if len(tars) == 1:
            return _tar_members(tars[0])
        raise DataError(
            f"{path}: no ED data found (expected ed_<split>.jsonl, <split>.jsonl, <split>.csv or one .tar.gz)"
        )
    return found


def _split_name(stem: str) -> str:
    return stem[3:] if stem.startswith("ed_") else stem


def _tar_members(path: Path) -> dict[str, tuple[str, Path, str | None]]:
    try:
        with tarfile.open(path, "r:gz") as tar:
            names = [m.name for m in tar.getmembers() if m.isfile()]
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .tar.gz ({e})") from e
    found = {}
    for name in names:
        stem = Path(name).name
        if stem.endswith(".csv") and stem[:-4] in SPLITS:
            found[stem[:-4]] = ("csv", path, name)
    if not found:
        raise DataError(f"{path}: archive holds no train.csv/valid.csv/test.csv")
    return found


def _enforce(report: LoadReport, split: str, skip_invalid: bool) -> None:
    if report.invalid and not skip_invalid:
        shown = "\n  ".join(str(r) for r in report.invalid[:10])
        more = f"\n  ... and {len(report.invalid) - 10} more" if len(report.invalid) > 10 else ""
        raise DataError(
            f"{len(report.invalid)} invalid record(s) in split {split!r}:\n  {shown}{more}\n"
            "Fix the data or pass --skip-invalid to skip them (they are counted in the summary)."
        )


def _load_one(kind: str, path: Path, member: str | None) -> LoadReport:
    if kind == "jsonl":
        with path.open("rb") as f:
            return _dedupe(read_jsonl(f, str(path)))
    if member is None:
        with path.open("rb") as f:
            return _dedupe(read_official_csv(f, str(path)))
    with tarfile.open(path, "r:gz") as tar:
        f = tar.extractfile(member)
        assert f is not None
        return _dedupe(read_official_csv(f, f"{path}:{member}"))


def read_jsonl(lines: Iterable[bytes], source: str) -> Iterator[Conversation | InvalidRecord]:
    """Parse ED jsonl; yields a Conversation or an InvalidRecord per non-blank line."""
    for n, raw in enumerate(lines, 1):
        where = f"{source}:{n}"
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            yield InvalidRecord(_guess_conv_id(raw), f"bad encoding (not UTF-8): {e.reason} at byte {e.start}", where)
            continue
        except json.JSONDecodeError as e:
            yield InvalidRecord(_guess_conv_id(raw), f"malformed JSON: {e.msg}", where)
            continue
        try:
            yield validate_conversation(record)
        except DataError as e:
            conv_id = record.get("conv_id") if isinstance(record, dict) else None
            yield InvalidRecord(str(conv_id or f"<line {n}>"), str(e), where)


def read_official_csv(lines: Iterable[bytes], source: str) -> Iterator[Conversation | InvalidRecord]:
    """Parse the official release CSV (`_comma_` escapes, rows grouped by conv_id).

    Column `context` is the emotion label and `prompt` the situation. The first row's
    speaker_idx is the speaker; turns must alternate between the two workers, utterance_idx
    must run 1, 2, 3, ... in file order.
    """
    rows: list[tuple[int, list[str]]] = []
    bad: dict[str, str] = {}
    current = None
    it = iter(lines)
    header = next(it, b"").decode("utf-8", "replace").strip().split(",")
    if tuple(header[: len(CSV_COLUMNS)]) != CSV_COLUMNS:
        raise DataError(f"{source}: header {header} does not start with {list(CSV_COLUMNS)}")
    for n, raw in enumerate(it, 2):
        if not raw.strip():
            continue
        try:
            fields = raw.decode("utf-8").rstrip("\r\n").split(",")
        except UnicodeDecodeError as e:
            bad.setdefault(_guess_conv_id(raw), f"line {n}: bad encoding (not UTF-8): {e.reason}")
            fields = [_guess_conv_id(raw)]
        conv_id = fields[0]
        if current is not None and conv_id != current:
            yield _conversation_from_rows(current, rows, bad.pop(current, None), source)
            rows = []
        current = conv_id
        if len(fields) < len(CSV_COLUMNS) - 1:
            bad.setdefault(conv_id, f"line {n}: {len(fields)} columns, expected {len(CSV_COLUMNS)}")
        else:
            rows.append((n, fields))
    if current is not None:
        yield _conversation_from_rows(current, rows, bad.pop(current, None), source)


def _unescape(text: str) -> str:
    return text.replace("_comma_", ",").strip()


def _conversation_from_rows(
    conv_id: str, rows: list[tuple[int, list[str]]], problem: str | None, source: str
) -> Conversation | InvalidRecord:
    if problem:
        return InvalidRecord(conv_id, problem, source)
    first = rows[0][1]
    speaker_worker = first[4]
    utterances, speakers = [], []
    for k, (n, f) in enumerate(rows):
        if f[1] != str(k + 1):
            return InvalidRecord(conv_id, f"line {n}: utterance_idx {f[1]!r}, expected {k + 1}", source)
        if f[2] != first[2] or f[3] != first[3]:
            return InvalidRecord(conv_id, f"line {n}: emotion/prompt differ within the conversation", source)
        if (f[4] == speaker_worker) != (k % 2 == 0):
            return InvalidRecord(conv_id, f"line {n}: broken turn order (speaker_idx {f[4]})", source)
        utterances.append(_unescape(f[5]))
        speakers.append(SPEAKER if k % 2 == 0 else LISTENER)
    record = {
        "conv_id": conv_id, "emotion": first[2], "situation": _unescape(first[3]),
        "utterances": utterances, "speakers": speakers,
    }
    try:
        return validate_conversation(record)
    except DataError as e:
        return InvalidRecord(conv_id, str(e), source)


def _dedupe(items: Iterable[Conversation | InvalidRecord]) -> LoadReport:
    report, seen = LoadReport(), set()
    for item in items:
        if isinstance(item, InvalidRecord):
            report.invalid.append(item)
        elif item.conv_id in seen:
            report.invalid.append(InvalidRecord(item.conv_id, "duplicate conv_id"))
        else:
            seen.add(item.conv_id)
            report.conversations.append(item)
    return report


def _guess_conv_id(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    if text.lstrip().startswith("{"):
        key = text.find('"conv_id"')
        if key >= 0:
            rest = text[key + 9:].lstrip(" :")
            if rest.startswith('"'):
                return rest[1:].split('"', 1)[0]
        return "<unknown>"
    return text.split(",", 1)[0]
