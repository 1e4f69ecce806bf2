"""Released models: a serving bundle with its model card, one directory each under the repo's `models/`.

    models/escm-ed/
      model.safetensors  config.json  vocab.json   the serving bundle (trainers.artifacts): float32, float16 or
                                                   int8-rowcol+fp16 weights (trainers.quantize)
      card.json          the card's data: model, paper, data and licence, recipe, command, commit, valid metrics
                         exactly as `evaluate_model` computed them, sample responses, use and limitations, and the
                         sha256 and size of every bundle file
      card.md            the model card, written from card.json by `render_card`

    card = release("runs/escm/checkpoints/best.pt", "models/escm-ed", source="../shared/data/ed", split="valid")
    problems = verify("models/escm-ed")          # [] when every bundle file matches card.json's sha256

`release` refuses a bundle over MAX_BUNDLE_BYTES (its files' real sizes), and float16 or int8 weights whose
metrics move by more than PRECISION_TOLERANCE against float32 (both evaluated when data is given). The card's
metrics come from `trainers.evaluation.evaluate_model` on the released files with float32 compute, so `edp evaluate
--model models/escm-ed` on the same split reproduces them: the count-based ones (Acc, Dist, BLEU) to every printed
digit, the NLL sums (loss, PPL) to 1e-6 relative (their last bits follow the thread count and the CPU).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainers.data.records import DataError
from trainers.metrics import METRIC_DEFINITION

if TYPE_CHECKING:  # torch: imported by the functions that load or write weights, not by `edp` at start-up
    from trainers.artifacts import LoadedModel

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"
CARD_JSON, CARD_MD = "card.json", "card.md"
CARD_FORMAT = "edp-card/1"
BUNDLE_FILES = ("model.safetensors", "config.json", "vocab.json")  # trainers.artifacts' WEIGHTS, CONFIG, VOCAB
MAX_BUNDLE_BYTES = 15_000_000  # a released bundle lives in git: at most 15 MB
PRECISION_TOLERANCE = 0.1  # largest move float16/int8 weights may cause, in the papers' table units (table_scale)
INT8_FORMAT = "int8-rowcol+fp16"  # trainers.artifacts.INT8: what `--quantize int8` stores
QUANTIZE_CHOICES = ("int8",)
SAMPLE_COUNT = 5

PAPERS = {
    "escm": "ESCM: Yang et al., \"Exploiting Emotion-Semantic Correlations for Empathetic Response Generation\", "
            "Findings of EMNLP 2023",
    "iamm": "IAMM: Yang et al., \"An Iterative Associative Memory Model for Empathetic Response Generation\", "
            "Findings of ACL 2024",
    "transformer": "the Transformer baseline of the ESCM and IAMM papers (Vaswani et al., 2017)",
}
DATA = {
    "name": "EMPATHETIC-DIALOGUES",
    "citation": "Rashkin, Smith, Li and Boureau, \"Towards Empathetic Open-domain Conversation Models: a New "
                "Benchmark and Dataset\", ACL 2019",
    "licence": "CC BY-NC 4.0: non-commercial use only, with attribution to the dataset's authors; the model, "
               "trained on it, is released under the same terms",
}
INTENDED_USE = [
    "research on and demonstrations of empathetic response generation in English",
    "short ED-style conversations: a person describes a situation or feeling, the model answers as a listener",
]
LIMITATIONS = [
    "English only; trained on ED-style crowd-sourced conversations, other domains are out of distribution",
    "replies are often short and generic (e.g. \"that is great !\"), and the emotion read is wrong about "
    "half of the time or more (see the valid accuracy)",
    "not for crisis support, not a therapist and no substitute for professional help: it does not detect risk, "
    "and it can answer a person in distress inappropriately",
    "it reproduces the biases of its crowd-sourced training data (topics, demographics, stereotypes)",
    "decoded greedily: the same context gets the same reply",
]
TRAINING_SUMMARY_KEYS = ("recipe", "max_steps", "batch_size", "lr_factor", "warmup", "seed", "early_stop_metric",
                         "eval_every", "use_vectors", "vectors", "bf16")


class ReleaseError(DataError):
    """A release refused (too large, float16/int8 moved the metrics, target exists) or a card that does not
    verify."""


# ------------------------------------------------------------------------------------------------
# Hashing and size


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_records(directory: str | Path) -> dict[str, dict]:
    """{file: {"sha256", "bytes"}} of the bundle's files in `directory`."""
    d = Path(directory)
    return {name: {"sha256": sha256_file(d / name), "bytes": (d / name).stat().st_size} for name in BUNDLE_FILES}


def bundle_sha256(files: dict[str, dict]) -> str:
    """One digest for the bundle: sha256 over its files' names and sha256s, sorted."""
    text = "".join(f"{name} {files[name]['sha256']}\n" for name in sorted(files))
    return hashlib.sha256(text.encode()).hexdigest()


def check_size(files: dict[str, dict], limit: int = MAX_BUNDLE_BYTES) -> int:
    """The bundle's total bytes; ReleaseError naming the size and the limit when it is over."""
    total = sum(f["bytes"] for f in files.values())
    if total > limit:
        raise ReleaseError(f"the bundle is {total / 1e6:.1f} MB ({total} bytes), over the {limit / 1e6:.0f} MB limit "
                           "of a released model: release it with --fp16 (float16 weights, half the size) or --quantize "
                           "int8 (the big matrices int8: about a quarter)")
    return total


def verify(directory: str | Path) -> list[str]:
    """What does not match `directory`'s card.json, one line per file (empty: every bundle file verifies).
    ReleaseError when there is no readable card."""
    d, card = Path(directory), read_card(directory)
    problems = []
    for name, expected in sorted(card["files"].items()):
        path = d / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (actual := sha256_file(path)) != expected["sha256"]:
            problems.append(f"{name}: sha256 {actual[:12]}... differs from card.json's {expected['sha256'][:12]}...")
    missing = sorted(set(BUNDLE_FILES) - set(card["files"]))
    problems += [f"{name}: not listed in card.json" for name in missing]
    return problems


# ------------------------------------------------------------------------------------------------
# The card: data (card.json) and its markdown (card.md)


def read_card(directory: str | Path) -> dict:
    file = Path(directory) / CARD_JSON
    try:
        card = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReleaseError(f"cannot read {file}: {e}") from e
    if not isinstance(card, dict) or card.get("format") != CARD_FORMAT or not isinstance(card.get("files"), dict):
        raise ReleaseError(f"{file} is not a model card (expected format {CARD_FORMAT!r} with a `files` table)")
    return card


def table_scale(metric: str) -> float:
    """The factor the papers' tables print a metric with: Acc and Dist-n (either definition) x100, the rest as is."""
    return 100.0 if metric == "acc" or metric.startswith("dist_") else 1.0


def weights_format(fp16: bool, quantize: str | None) -> str:
    """How a release stores its weights: float32, float16 (`fp16`) or, with `quantize="int8"` (which implies
    float16 for the rest), INT8_FORMAT."""
    if quantize is None:
        return "float16" if fp16 else "float32"
    if quantize not in QUANTIZE_CHOICES:
        raise ReleaseError(f"--quantize {quantize!r} is not supported: choose one of {', '.join(QUANTIZE_CHOICES)}")
    return INT8_FORMAT


def precision_moves(fp32: dict[str, float], released: dict[str, float],
                    tolerance: float | None = None) -> dict[str, float]:
    """{metric: move} for each of Acc, PPL and Dist whose value with the released (float16 or int8) weights moved
    by more than `tolerance` (default PRECISION_TOLERANCE) from its float32 one, in the papers' table units (Acc
    and Dist-n x100, PPL as is)."""
    tolerance = PRECISION_TOLERANCE if tolerance is None else tolerance
    gated = [k for k in fp32 if k in ("acc", "ppl", "ppl_token") or k.startswith("dist_")]
    moves = {k: abs(released[k] - fp32[k]) * table_scale(k) for k in gated if k in released}
    return {k: m for k, m in moves.items() if m > tolerance}


def pick_samples(predictions: list[dict], count: int = SAMPLE_COUNT) -> list[dict]:
    """`count` predictions spread evenly over the split: context, reference, the model's reply and emotions."""
    if not predictions:
        return []
    step = max(1, len(predictions) // count)
    keys = ("context", "reference", "generated", "gold_emotion", "predicted_emotion")
    return [{k: p.get(k) for k in keys} for p in predictions[::step][:count]]


def training_summary(run_config: dict) -> dict:
    """The settings a reader of the card wants first, from the run's resolved config."""
    return {k: run_config[k] for k in TRAINING_SUMMARY_KEYS if k in run_config}


@dataclass(frozen=True)
class Provenance:
    """Where the weights come from: the exact training command and git commit (given by whoever releases, as a
    checkpoint does not record them), and what the checkpoint records."""

    command: str | None
    commit: str | None
    checkpoint: str
    step: int | None
    code_version: str | None   # hash of the trainers/ source that wrote the checkpoint


def card_data(name: str, loaded: LoadedModel, files: dict[str, dict], provenance: Provenance,
              evaluation: dict | None, samples: list[dict], precision_check: dict | None = None) -> dict:
    """card.json's content (pure: everything it says comes from the arguments)."""
    model_name = loaded.train_config().model
    params = sum(p.numel() for p in loaded.model.parameters())
    return {
        "format": CARD_FORMAT, "name": name, "released_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": {"type": model_name, "paper": PAPERS.get(model_name, model_name), "params": params,
                  "weights_dtype": loaded.weights_dtype, "config": dict(vars(loaded.model.cfg))},
        "data": {**DATA, "data_key": loaded.data_key},
        "training": {"recipe": loaded.run_config.get("recipe"), "command": provenance.command,
                     "commit": provenance.commit, "checkpoint": provenance.checkpoint, "step": provenance.step,
                     "code_version": provenance.code_version, "summary": training_summary(loaded.run_config)},
        "evaluation": evaluation and {**evaluation, "metric_definition": METRIC_DEFINITION},
        "precision_check": precision_check, "samples": samples,
        "intended_use": INTENDED_USE, "limitations": LIMITATIONS,
        "files": files, "bundle_sha256": bundle_sha256(files),
    }


def _metric_rows(metrics: dict[str, float]) -> list[str]:
    rows = ["| metric | value (as computed) | as in the papers' tables |", "|---|---|---|"]
    return rows + [f"| `{k}` | {v!r} | {v * table_scale(k):.2f} |" for k, v in metrics.items()]


def _evaluation_lines(card: dict) -> list[str]:
    e = card["evaluation"]
    if e is None:
        return ["Not evaluated at release (no data given): run `edp evaluate --model <this directory> --data DIR`."]
    lines = [f"`evaluate_model` on split `{e['split']}` of `{e['source']}`: {e['examples']} examples "
             f"({e['skipped']} skipped); weights {e['dtype']['weights']}, computed in {e['dtype']['compute']}; "
             f"decoding {e['decode'].get('strategy', '?')}, up to {e['decode'].get('max_len', '?')} tokens.", "",
             *_metric_rows(e["metrics"]), "", "Definitions:", ""]
    lines += [f"- `{k}`: {v}" for k, v in e["definitions"].items()]
    check = card.get("precision_check")
    if check:
        w, released = check["weights"], check["released"]
        lines += ["", f"{w} weights against float32 (Acc, PPL and Dist may move by at most {check['tolerance']} "
                      "in table units):", "",
                  f"| metric | float32 | {w} | move (table units) |", "|---|---|---|---|"]
        lines += [f"| `{k}` | {v!r} | {released[k]!r} | {abs(released[k] - v) * table_scale(k):.4f} |"
                  for k, v in check["float32"].items() if k in released]
    return lines


def render_card(card: dict) -> str:
    """card.md: the model card (Hugging Face layout) from card.json's data."""
    m, d, t = card["model"], card["data"], card["training"]
    size = sum(f["bytes"] for f in card["files"].values())
    reproduce = (f"edp evaluate --model models/{card['name']} --data <ED> --split {card['evaluation']['split']}"
                 if card["evaluation"] else f"edp evaluate --model models/{card['name']} --data <ED> --split valid")
    lines = [
        f"# {card['name']}", "",
        f"An empathetic response generator (`{m['type']}`) trained on {d['name']}, released as a serving bundle "
        f"({m['params']:,} parameters, {m['weights_dtype']} weights, {size / 1e6:.2f} MB).", "",
        "## Model", "", f"- paper: {m['paper']}", f"- type: `{m['type']}`; config: `{json.dumps(m['config'])}`", "",
        "## Data and licence", "", f"- {d['name']}: {d['citation']}", f"- licence: {d['licence']}",
        f"- prepared data key: `{d['data_key']}`", "",
        "## Training", "", f"- recipe: `{t['recipe']}`; settings: `{json.dumps(t['summary'])}`",
        f"- command: `{t['command'] or 'not recorded'}`", f"- commit: `{t['commit'] or 'not recorded'}`",
        f"- checkpoint: `{t['checkpoint']}` at step {t['step']}; trainers/ source hash `{t['code_version']}`", "",
        "## Evaluation", "", *_evaluation_lines(card), "", f"Reproduce: `{reproduce}`", "",
        "## Sample responses", "",
    ]
    for s in card["samples"]:
        lines += [f"- context: {' / '.join(s['context'] or [])}", f"  - reference: {s['reference']}",
                  f"  - model: {s['generated']} (emotion read: {s['predicted_emotion']}, gold: {s['gold_emotion']})"]
    if not card["samples"]:
        lines.append("None (not evaluated at release).")
    lines += ["", "## Intended use", "", *(f"- {u}" for u in card["intended_use"]), "",
              "## Limitations", "", *(f"- {x}" for x in card["limitations"]), "",
              "## Files", "", "| file | bytes | sha256 |", "|---|---|---|",
              *(f"| {k} | {v['bytes']} | `{v['sha256']}` |" for k, v in sorted(card["files"].items())), "",
              f"Bundle sha256: `{card['bundle_sha256']}` (`edp models verify models/{card['name']}`).", ""]
    return "\n".join(lines)


def write_card(directory: str | Path, card: dict) -> None:
    d = Path(directory)
    (d / CARD_JSON).write_text(json.dumps(card, indent=1) + "\n")
    (d / CARD_MD).write_text(render_card(card))


# ------------------------------------------------------------------------------------------------
# Release


def provenance_of(checkpoint: str | Path, command: str | None, commit: str | None) -> Provenance:
    """The release's provenance: `command` and `commit` as given, step and code version from the checkpoint."""
    from trainers.artifacts import read_checkpoint

    path = Path(checkpoint)
    state = read_checkpoint(path) if path.is_file() else {}
    return Provenance(command, commit, str(path), state.get("step"), state.get("code_version"))


def _evaluate(bundle: Path, source: str, split: str, work: Path, label: str) -> tuple[dict, list[dict]]:
    """`evaluate_model` on `bundle` with float32 compute: its result and predictions."""
    from trainers.evaluation import evaluate_model  # the data pipeline: only when data is given

    out = work / f"eval-{bundle.name}"
    result = evaluate_model(bundle, source, split, out, bf16=False, label=label)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return result, predictions


def release(checkpoint: str | Path, out_dir: str | Path, *, fp16: bool = False, quantize: str | None = None,
            source: str | None = None, split: str = "valid", command: str | None = None, commit: str | None = None,
            limit: int = MAX_BUNDLE_BYTES, log: Callable[[str], None] = print) -> dict:
    """Write `out_dir` (refused when it exists): the bundle of `checkpoint` (a training checkpoint or a bundle
    directory) with its weights as `weights_format(fp16, quantize)`, card.json and card.md; with `source`, the
    card's metrics and samples from evaluating the written bundle on `split` (and, for float16 or int8, float32
    too: refused when a metric moves beyond PRECISION_TOLERANCE). The directory appears only once everything
    passed. Returns the card."""
    from trainers import artifacts

    dtype = weights_format(fp16, quantize)
    out = Path(out_dir)
    if out.exists():
        raise ReleaseError(f"{out} already exists: remove it first, or release under another name")
    provenance = provenance_of(checkpoint, command, commit)
    loaded = artifacts.load(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}-", dir=out.parent) as tmp:
        work = Path(tmp)
        staged = artifacts.save_bundle(work / out.name, loaded.train_config(), loaded.model, loaded.vocab,
                                       loaded.data_key, weights_dtype=dtype)
        files = file_records(staged)
        log(f"bundle: {check_size(files, limit) / 1e6:.2f} MB ({dtype} weights; limit {limit / 1e6:.0f} MB)")
        evaluation, samples, check = None, [], None
        if source is not None:
            log(f"evaluating the released bundle on {split} of {source}")
            evaluation, predictions = _evaluate(staged, source, split, work, f"release {out.name} ({dtype})")
            samples = pick_samples(predictions)
            if dtype != "float32":
                check = _precision_check(loaded, evaluation, source, split, work, log)
        card = card_data(out.name, artifacts.load(staged), files, provenance, evaluation, samples, check)
        write_card(staged, card)
        staged.rename(out)
    log(f"released {out} (bundle sha256 {card['bundle_sha256'][:12]})")
    return card


def _precision_check(loaded: LoadedModel, released_eval: dict, source: str, split: str, work: Path,
                     log: Callable[[str], None]) -> dict:
    """Evaluate the float32 weights too; ReleaseError naming each metric the released (float16 or int8) weights
    moved beyond the tolerance, with both values."""
    from trainers import artifacts

    fp32_bundle = artifacts.save_bundle(work / "float32", loaded.train_config(), loaded.model, loaded.vocab,
                                        loaded.data_key)
    log("evaluating the float32 weights for comparison")
    fp32_eval, _ = _evaluate(fp32_bundle, source, split, work, "the same weights in float32")
    fp32, released, dtype = fp32_eval["metrics"], released_eval["metrics"], released_eval["dtype"]["weights"]
    moves = precision_moves(fp32, released)
    if moves:
        raise ReleaseError(f"{dtype} weights move " + ", ".join(
            f"{k} by {v:.3f} (float32 {fp32[k]:.6g}, {dtype} {released[k]:.6g})" for k, v in moves.items())
            + f" in table units, at most {PRECISION_TOLERANCE} allowed: release with more bits (--fp16 or float32)")
    return {"tolerance": PRECISION_TOLERANCE, "weights": dtype, "float32": fp32, "released": released}


# ------------------------------------------------------------------------------------------------
# The released models of a folder


@dataclass(frozen=True)
class Released:
    """One directory of a models folder: its card (None when unreadable) and what fails to verify."""

    path: Path
    card: dict | None
    problems: list[str]

    @property
    def ok(self) -> bool:
        return self.card is not None and not self.problems


def released_models(models_dir: str | Path = MODELS_DIR) -> list[Released]:
    """Every directory of `models_dir` (none when it does not exist), each verified against its card."""
    root = Path(models_dir)
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            out.append(Released(d, read_card(d), verify(d)))
        except ReleaseError as e:
            out.append(Released(d, None, [str(e)]))
    return out


def released_bundle(directory: str | Path) -> Path:
    """A released model's directory checked for serving or evaluation: a bundle whose files match its card (when
    it has one). ReleaseError naming what is wrong."""
    d = Path(directory)
    if not d.is_dir() or not all((d / name).is_file() for name in BUNDLE_FILES):
        raise ReleaseError(f"{d} is not a bundle directory: it needs {', '.join(BUNDLE_FILES)} "
                           "(a released model under models/, or trainers.artifacts.export_bundle's output)")
    if (d / CARD_JSON).exists():
        problems = verify(d)
        if problems:
            raise ReleaseError(f"{d} does not match its card.json: " + "; ".join(problems))
    return d


def bundle_identity(directory: str | Path) -> tuple[str, str]:
    """(name, bundle sha256) of a bundle directory: its card's, else the directory name and the files' digest."""
    d = Path(directory)
    if (d / CARD_JSON).exists():
        card = read_card(d)
        return card["name"], card["bundle_sha256"]
    return d.resolve().name, bundle_sha256(file_records(d))
