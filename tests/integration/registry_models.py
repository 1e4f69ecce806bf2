"""Test helpers: a tiny trained checkpoint and sweeps of child runs logged to a real MLflow server.

Until a sweep has produced them, the promotion and serving tests make their own child runs the way the
tracking code does (parent run, nested children with metrics, the params promotion compares and a model):
the model is the serving bundle exported from the checkpoint, inside the pyfunc model of
services/pyfunc_model.py (via cluster.tracking.runs.log_pyfunc_model) when that exists, else as the run artifact
directory `model/` (the other layout services/registry.py accepts).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def train_tiny(prepared, out_dir: Path, seed: int = 0, max_steps: int = 4,
               max_len: int = 12, flavour: str = "tiny", source: str = "sample") -> tuple[Path, dict]:
    """Train ESCM (the tiny flavour unless told) for a few steps on `prepared` (of `source`):
    (best.pt, final metrics).

    Replies are capped at `max_len` tokens (the checkpoint's decoding setting) to keep serving tests fast.
    """
    from trainers.config import TrainConfig, load_config
    from trainers.loop import Trainer

    cfg = load_config(TrainConfig, model="escm", out_dir=str(out_dir), device="cpu", seed=seed,
                      use_vectors=False,
                      data={"source": source, "cache_dir": str(prepared.path.parent)},
                      model_overrides={"flavour": flavour}, warmup=20, lr_factor=2.0, batch_size=8,
                      max_steps=max_steps, eval_every=max_steps, log_every=max_steps, eval_generate=2,
                      num_samples=1, max_target=20, decode={"max_len": max_len})
    result = Trainer(cfg, prepared, log=lambda s: None).train()
    return out_dir / "checkpoints" / "best.pt", result["final"]


def pyfunc_available() -> bool:
    root = Path(__file__).resolve().parents[2]
    return ((root / "services" / "pyfunc_model.py").exists()
            and importlib.util.find_spec("cluster.tracking.runs") is not None)


def bundle_of(checkpoint: Path) -> Path:
    """The serving bundle of a training checkpoint, exported once beside it (`<dir>/bundle-<name>/`)."""
    from trainers.artifacts import export_bundle, is_bundle

    bundle = checkpoint.parent / f"bundle-{checkpoint.stem}"
    return bundle if is_bundle(bundle) else export_bundle(checkpoint, bundle)


def comparison_params(bundle: Path) -> dict[str, str]:
    """The params a training run logs for promotion to compare like with like (cluster.tracking.runs.log_setup)."""
    from trainers.artifacts import read_bundle_config as read_config
    from trainers.metrics import METRIC_DEFINITION

    return {"data.key": read_config(bundle)["data_key"], "eval.split": "valid",
            "metric_definition": METRIC_DEFINITION}


def log_child(c, experiment_id: str, parent_run_id: str, checkpoint: Path, metrics: dict[str, float],
              params: dict[str, str] | None = None, name: str = "trial", pyfunc: bool | None = None) -> str:
    """A FINISHED child run with `metrics`, `params` (over the comparison params) and the model; its run id."""
    import mlflow

    bundle = bundle_of(checkpoint)
    run = c.create_run(experiment_id, run_name=name, tags={"mlflow.parentRunId": parent_run_id})
    run_id = run.info.run_id
    for k, v in {**comparison_params(bundle), **(params or {})}.items():
        c.log_param(run_id, k, v)
    for k, v in metrics.items():
        c.log_metric(run_id, k, v)
    if pyfunc if pyfunc is not None else pyfunc_available():
        from cluster.tracking.runs import log_pyfunc_model

        mlflow.set_tracking_uri(c.tracking_uri)
        with mlflow.start_run(run_id=run_id):
            log_pyfunc_model(bundle)
    else:
        c.log_artifacts(run_id, str(bundle), "model")
    c.set_terminated(run_id, "FINISHED")
    return run_id


def log_sweep(tracking_uri: str, experiment: str, checkpoint: Path, trials: list[dict],
              pyfunc: bool | None = None) -> dict[str, str]:
    """A parent run with one child per `trials` entry ({"name", "metrics", "params"}): {name: run_id}."""
    from mlflow import MlflowClient

    c = MlflowClient(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment)
    parent = c.create_run(exp_id, run_name=f"{experiment}-parent").info.run_id
    ids = {t["name"]: log_child(c, exp_id, parent, checkpoint, t["metrics"], t.get("params"), t["name"],
                                t.get("pyfunc", pyfunc))
           for t in trials}
    c.set_terminated(parent, "FINISHED")
    return ids


def register_champion(tracking_uri: str, checkpoint: Path, name: str, acc: float, experiment: str,
                      force: bool = False) -> str:
    """Log `checkpoint` as the one child of a sweep `experiment` (valid_acc `acc`) and promote it to
    models:/<name>@champion; the new version (fails the caller if promotion refused)."""
    from cluster.tracking.promotion import promote

    log_sweep(tracking_uri, experiment, checkpoint,
              [{"name": "t0", "metrics": {"valid_acc": acc}, "params": {"model": "escm"}}])
    decision = promote(experiment, "valid_acc", "max", name=name, force=force, tracking_uri=tracking_uri,
                       log=lambda s: None)
    if decision.action != "promoted":
        raise AssertionError(f"expected a promotion of {name!r}, got {decision.action}")
    return decision.version
