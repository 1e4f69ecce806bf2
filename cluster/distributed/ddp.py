"""Ray Train around `trainers.loop.Trainer`: DDP over N workers, report + checkpoint every evaluation, resume.

Ray appears at four points only (the trainer itself stays plain PyTorch):
  1. `wrap_model`: `ray.train.torch.prepare_model` (DDP; gloo on CPU, NCCL on GPU);
  2. `on_eval`: `report(metrics, Checkpoint(dir with the trainer's step checkpoint, best.pt, run id))`;
     `on_checkpoint` (a resume checkpoint before `eval_from`): the same without evaluation metrics;
  3. resume: `get_checkpoint()` -> `Trainer.resume(path)` (after a worker failure, FailureConfig);
  4. `TorchTrainer(...).fit()` in `run_train`.
`worker_loop(config, session)` is shared with single-worker Tune trials: the session (`cluster.distributed.session`)
is Ray Train's or Ray Tune's.
Only rank 0 logs to MLflow (`cluster.tracking.runs.RunLogger`), into the run whose id the driver created.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from cluster.distributed.session import TrainSession, WorkerSession
from cluster.tracking.runs import RUN_ID_FILE, RunLogger, TrackingConfig, end_run, start_run
from trainers.config import ConfigError, StrictModel, TrainConfig
from trainers.data.prepare import prepare
from trainers.loop import Trainer


class Scaling(StrictModel):
    workers: int = Field(1, ge=1, description="DDP workers")
    gpus_per_worker: float = Field(0.0, ge=0, description="fractional GPUs are allowed (e.g. 0.25)")
    cpus_per_worker: float = Field(1.0, gt=0, description="fractional on small machines (e.g. 0.9)")


class RayTrainConfig(StrictModel):
    """One distributed training run."""

    name: str = Field("edp-train", pattern=r"^[A-Za-z0-9_.-]+$")
    train: TrainConfig = Field(default_factory=TrainConfig)
    scaling: Scaling = Field(default_factory=Scaling)
    storage_path: str | None = Field(None, description="Ray checkpoints: a local directory or s3://bucket/prefix "
                                     "(default: EDP_CHECKPOINT_URI, else runs/ray)")
    max_failures: int = Field(0, ge=-1, description="worker-group restarts from the last checkpoint")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    resume: bool = Field(True, description="continue the run of this name in storage_path (False: start afresh)")


def resolve_storage(path: str | None, nodes: list[dict]) -> str:
    """Where checkpoints and Tune state go: `path`, else EDP_CHECKPOINT_URI (set by the chart and the local
    stack), else the local `runs/ray`. A local path is refused on a cluster of several nodes (alive in
    `nodes`, or node types it can scale to in EDP_NODE_TYPES): workers elsewhere cannot write the driver's disk."""
    path = path or os.environ.get("EDP_CHECKPOINT_URI") or "runs/ray"
    several = sum(1 for n in nodes if n.get("Alive")) > 1 or json.loads(os.environ.get("EDP_NODE_TYPES") or "[]")
    if "://" not in path and several:
        raise ConfigError(
            f"storage_path {path!r} is a local directory, but this Ray cluster has several nodes: workers on other "
            f"nodes cannot write it. Set EDP_CHECKPOINT_URI=s3://<bucket>/<prefix> (the chart and `edp stack up` "
            f"set it), or storage_path to an s3:// URI or a directory every node mounts at the same path "
            f"(then name it with file://)")
    return path


def absolute(path: str) -> str:
    """A local path made absolute on the driver (workers and trials run elsewhere); URIs and 'sample' as given."""
    return path if "://" in path or path == "sample" else str(Path(path).expanduser().resolve())


def s3_endpoint() -> str | None:
    """The driver's S3 endpoint (boto3's own variables), handed to workers whose environment may lack it."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_location(path: str) -> tuple[Any, str]:
    """(pyarrow filesystem or None, path) for `RunConfig(storage_filesystem=..., storage_path=...)`.

    An s3:// URI is resolved here, on the driver: pyarrow takes the endpoint from the URI
    (`s3://bucket/prefix?endpoint_override=host:port&scheme=http`) or from AWS_ENDPOINT_URL_S3 /
    AWS_ENDPOINT_URL, and the credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    (AWS_SESSION_TOKEN) when set, else the default chain. Ray pickles this filesystem to its controller
    and workers, whose environment may lack those variables (Train v2 passes its controller none).
    Local paths and other schemes are left to Ray (None).
    """
    uri = absolute(path)
    if not uri.startswith("s3://"):
        return None, uri
    import pyarrow.fs  # pyarrow: only when storage is resolved

    fs, fs_path = pyarrow.fs.FileSystem.from_uri(uri)
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:  # explicit, so they travel with the pickled filesystem
        options = fs.__reduce__()[1][0]  # the resolved S3 options (endpoint, region, scheme, ...)
        fs = pyarrow.fs.S3FileSystem(**{**options, "access_key": key, "secret_key": secret,
                                        "session_token": os.environ.get("AWS_SESSION_TOKEN")})
    return fs, fs_path


# ------------------------------------------------------------------------------------------------
# Worker side


def train_worker(config: dict) -> None:
    """`train_loop_per_worker` of the TorchTrainer."""
    worker_loop(config, TrainSession())


def worker_loop(config: dict, session: WorkerSession) -> dict:
    """Prepare data, build the Trainer (DDP when the session's world_size > 1), resume, train, log (rank 0)."""
    rank, world_size = session.rank, session.world_size
    cfg = TrainConfig.model_validate(config["train"])
    if config.get("gpus_per_worker", 0) > 0 and world_size > 1:
        import ray.train.torch  # Ray only inside a worker

        cfg = cfg.model_copy(update={"device": str(ray.train.torch.get_device())})
    prepared = prepare(cfg.data)
    run_id = config.get("run_id")
    logger = RunLogger(config["tracking_uri"], run_id, config.get("log_model", True)) \
        if rank == 0 and run_id else None
    state: dict[str, Any] = {"resumed_from": None}

    def report(metrics: dict, checkpoint_path: Path | None) -> None:
        reported = {**metrics, "resumed_from_step": state["resumed_from"] or 0, "world_size": world_size}
        if checkpoint_path is None:
            session.report(reported)
            return
        with tempfile.TemporaryDirectory() as tmp:
            _stage(checkpoint_path, Path(tmp), run_id)
            session.report(reported, Path(tmp))

    def on_eval(metrics: dict, checkpoint_path: Path | None) -> None:
        if logger is not None:
            logger.log_eval(metrics, trainer.history)
        report(metrics, checkpoint_path)

    # a resume checkpoint between evaluations is reported too (without the selection metric: Tune is told
    # not to require it, `cluster.distributed.tuning.tuner`), so a restarted worker or trial continues from it
    trainer = Trainer(cfg, prepared, rank=rank, world_size=world_size,
                      wrap_model=_ddp if world_size > 1 else None, on_eval=on_eval, on_checkpoint=report)
    with session.resume_dir() as d:
        if d is not None:
            trainer.resume(d / "checkpoint.pt")
            if (d / "best.pt").exists():  # finish() evaluates the best weights
                (trainer.out / "checkpoints").mkdir(parents=True, exist_ok=True)
                shutil.copyfile(d / "best.pt", trainer.out / "checkpoints" / "best.pt")
            state["resumed_from"] = trainer.step
    if logger is not None:
        logger.log_setup(trainer, state["resumed_from"])
    result = trainer.train()
    if logger is not None:
        logger.log_final(trainer, result)
    return result


def _ddp(model):
    import ray.train.torch  # Ray: only in a worker

    # ablated / tiny models can leave a branch out of the loss on a step: let DDP tolerate that
    return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})


def _stage(checkpoint_path: Path, into: Path, run_id: str | None) -> None:
    """The checkpoint directory Ray persists: step checkpoint, best.pt and the MLflow run id."""
    _link_or_copy(checkpoint_path, into / "checkpoint.pt")
    best = checkpoint_path.parent / "best.pt"
    if best.exists():
        _link_or_copy(best, into / "best.pt")
    if run_id:
        (into / RUN_ID_FILE).write_text(run_id)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


# ------------------------------------------------------------------------------------------------
# Driver side


def torch_trainer(cfg: RayTrainConfig, loop_config: dict, callbacks: list | None = None,
                  storage: tuple | None = None):
    """The TorchTrainer for `cfg` (gloo on CPU, NCCL on GPU); `storage` = a (filesystem, path) already
    resolved by `storage_location` on the driver, else it is resolved here."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # Ray: driver
    from ray.train.torch import TorchConfig, TorchTrainer

    s = cfg.scaling
    gpu = s.gpus_per_worker > 0
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if gpu else {})}
    storage_filesystem, storage_path = storage or storage_location(cfg.storage_path)
    return TorchTrainer(
        train_worker, train_loop_config={**loop_config, "gpus_per_worker": s.gpus_per_worker},
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=s.workers, use_gpu=gpu, resources_per_worker=resources),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2), callbacks=callbacks),
    )


def with_absolute_paths(cfg: RayTrainConfig) -> RayTrainConfig:
    """Workers run in other directories: make the local paths absolute on the driver."""
    d = cfg.train.data
    source = absolute(d.source) if Path(d.source).expanduser().exists() else d.source
    data = d.model_copy(update={"cache_dir": absolute(d.cache_dir), "source": source})
    train = cfg.train.model_copy(update={"out_dir": absolute(cfg.train.out_dir), "data": data})
    tracking = cfg.tracking.model_copy(update={"state_dir": absolute(cfg.tracking.state_dir)})
    return cfg.model_copy(update={"train": train, "tracking": tracking,
                                  "storage_path": absolute(cfg.storage_path)})


def forget_run(cfg: RayTrainConfig) -> None:
    """Start afresh: drop Ray's record of the run named `cfg.name` (its checkpoints in storage_path, which Ray
    Train would restore) and the MLflow run id in the output directory (a new MLflow run is created)."""
    import pyarrow.fs  # pyarrow: only when storage is resolved

    fs, path = storage_location(cfg.storage_path)
    if fs is None:
        fs, path = pyarrow.fs.FileSystem.from_uri(path) if "://" in path else (pyarrow.fs.LocalFileSystem(), path)
    run_dir = f"{path.rstrip('/')}/{cfg.name}"
    if fs.get_file_info(run_dir).type != pyarrow.fs.FileType.NotFound:
        fs.delete_dir(run_dir)
    (Path(cfg.train.out_dir) / RUN_ID_FILE).unlink(missing_ok=True)


def ensure_ray() -> None:
    """Attach to RAY_ADDRESS (inside a submitted job: no resources) or start a local instance."""
    import ray  # Ray: only once a run starts (configs are validated before)

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)


def run_train(cfg: RayTrainConfig) -> dict:
    """Run one distributed training job; its MLflow run is created here and reused by retries."""
    t0 = time.perf_counter()
    ensure_ray()
    import ray  # Ray: only once a run starts (configs are validated before)

    storage = resolve_storage(cfg.storage_path, ray.nodes())
    data = cfg.train.data
    if storage.startswith("s3://") and not data.shared_cache:  # workers fetch the driver's prepared data
        data = data.model_copy(update={"shared_cache": f"{storage.rstrip('/')}/prepared",
                                       "s3_endpoint_url": data.s3_endpoint_url or s3_endpoint()})
    train = cfg.train.model_copy(update={"data": data})
    cfg = with_absolute_paths(cfg.model_copy(update={"storage_path": storage, "train": train}))
    prepare(cfg.train.data, publish=True)  # warm (and publish) the cache, fail on bad data, before any worker
    uri = cfg.tracking.resolved_uri()
    out = Path(cfg.train.out_dir)
    if not cfg.resume:
        forget_run(cfg)
    run_id = start_run(cfg.tracking, cfg.tracking.experiment or cfg.name, cfg.name,
                       tags={"model": cfg.train.model, "workers": str(cfg.scaling.workers)},
                       run_id_file=out / RUN_ID_FILE)
    loop_config = {"train": cfg.train.model_dump(), "run_id": run_id, "tracking_uri": uri,
                   "log_model": cfg.tracking.log_model}
    ok = False
    try:
        result = torch_trainer(cfg, loop_config).fit()
        ok = True
    finally:
        end_run(uri, run_id, ok)
    return {"run_id": run_id, "tracking_uri": uri, "metrics": result.metrics,
            "checkpoint": result.checkpoint.path if result.checkpoint else None,
            "wall_s": time.perf_counter() - t0}
