"""Ray Tune sweeps from YAML: ablation grids (variants x seeds) and hyperparameter searches with ASHA.

    cfg = load_sweep("cluster/configs/sweeps/escm-ablation.yaml", ["base.max_steps=2000"])
    summary = run_sweep(cfg)   # -> {"parent_run_id", "best_run_id", "rows", "trials", "wall_s"}

The file is validated completely BEFORE Ray starts: every variant x seed (and the search space's
lower corner) must resolve to a valid `TrainConfig` with valid model overrides; errors name the field.

One sweep = one MLflow experiment + parent run; each trial is a nested child run (the bookkeeping is
cluster.tracking.sweeps'; the placement check before any trial starts is cluster.distributed.placement's).
A trial is a Tune function trainable: with `resources.workers == 1` it runs the Trainer in the trial
process (fractional CPU / GPU from the config, so several pack on one GPU); with more workers it runs
a TorchTrainer inside the trial and reports back through `TuneReportCallback` (Train v2 cannot be
passed to `Tuner` directly).
"""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from cluster.distributed.ddp import (
    RayTrainConfig,
    Scaling,
    absolute,
    ensure_ray,
    resolve_storage,
    s3_endpoint,
    storage_location,
    torch_trainer,
    worker_loop,
)
from cluster.distributed.placement import check_placement
from cluster.distributed.session import TuneSession
from cluster.tracking.reports import PaperReference, finish_parent, log_table_so_far
from cluster.tracking.runs import RUN_ID_FILE, TrackingConfig, end_run
from cluster.tracking.sweeps import close_stopped_children, finished_trial_metrics, open_parent, start_trial_run
from trainers.config import DataConfig, StrictModel, TrainConfig, load_config
from trainers.config import deep_merge as merge
from trainers.data.prepare import prepare
from trainers.metrics import METRIC_MODES
from trainers.models import MODELS, config_for

NAME = r"^[A-Za-z0-9_.-]+$"


class SearchSpec(StrictModel):
    """One search dimension: `{type: loguniform, low: 0.5, high: 4}`, `{type: choice, values: [...]}`, ..."""

    type: Literal["uniform", "loguniform", "quniform", "randint", "choice", "grid"]
    low: float | None = None
    high: float | None = None
    q: float | None = Field(None, gt=0)
    values: list[Any] | None = None

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"'{self.type}' needs a non-empty 'values' list")
        else:
            if self.low is None or self.high is None:
                raise ValueError(f"'{self.type}' needs 'low' and 'high'")
            if self.low >= self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.type == "loguniform" and self.low <= 0:
                raise ValueError(f"loguniform needs low > 0, got {self.low}")
            if self.type == "quniform" and self.q is None:
                raise ValueError("quniform needs 'q'")
        return self

    def corners(self) -> list[Any]:
        """Values checked against TrainConfig before the sweep starts."""
        if self.type in ("choice", "grid"):
            return list(self.values)
        lo, hi = (int(self.low), int(self.high) - 1) if self.type == "randint" else (self.low, self.high)
        return [lo, hi]

    def to_tune(self):
        from ray import tune  # Ray: only once the sweep runs

        if self.type in ("choice", "grid"):
            return (tune.choice if self.type == "choice" else tune.grid_search)(list(self.values))
        if self.type == "randint":
            return tune.randint(int(self.low), int(self.high))
        if self.type == "quniform":
            return tune.quniform(self.low, self.high, self.q)
        return (tune.loguniform if self.type == "loguniform" else tune.uniform)(self.low, self.high)


class Asha(StrictModel):
    """ASHA early stopping on the sweep metric, in training steps."""

    type: Literal["asha"] = "asha"
    max_t: int = Field(..., ge=1, description="steps of the longest trial")
    grace_period: int = Field(1, ge=1, description="steps before a trial may be stopped")
    reduction_factor: float = Field(3.0, gt=1)


class Variant(StrictModel):
    name: str = Field(..., pattern=NAME)
    set: dict[str, Any] = Field(default_factory=dict, description="dotted TrainConfig overrides")


class TrialResources(StrictModel):
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (per worker when workers > 1)")
    gpu: float = Field(0.0, ge=0, description="GPUs per trial/worker; fractions pack trials (e.g. 0.25)")
    workers: int = Field(1, ge=1, description="DDP workers per trial")
    driver_cpu: float = Field(0.1, gt=0, description="CPU of the trial driver when workers > 1")


class SweepConfig(StrictModel):
    name: str = Field(..., pattern=NAME)
    description: str = ""
    base: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields shared by all trials")
    variants: list[Variant] = Field(default_factory=lambda: [Variant(name="default")], min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    search: dict[str, SearchSpec] = Field(default_factory=dict, description="dotted TrainConfig key -> space")
    num_samples: int = Field(1, ge=1, description="samples of the search space (per grid point)")
    metric: str = "valid_ppl"
    scheduler: Asha | None = None
    resources: TrialResources = Field(default_factory=TrialResources)
    max_concurrent_trials: int | None = Field(None, ge=1)
    max_failures: int = Field(0, ge=-1, description="retries of a failed trial (resumes its checkpoint)")
    storage_path: str | None = Field(None, description="Ray results and checkpoints: local dir or s3:// "
                                     "(default: EDP_CHECKPOINT_URI, else runs/ray)")
    work_dir: str = Field("runs/sweeps", description="local trial working directories")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    paper: PaperReference | None = Field(None, description="the paper's figures beside the sweep's in its table "
                                         "(rows of variants a run leaves out are not shown)")

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        if v not in METRIC_MODES:
            raise ValueError(f"must be one of {sorted(METRIC_MODES)}")
        return v

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[Variant]) -> list[Variant]:
        names = [x.name for x in v]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"duplicate variant names {dup}")
        return v

    @model_validator(mode="after")
    def _resolve_every_trial(self) -> SweepConfig:
        """Every variant (with the search space's corners) must be a valid TrainConfig + model config."""
        for i, v in enumerate(self.variants):
            probes = [{}] + [{k: c} for k, spec in self.search.items() for c in spec.corners()]
            for probe in probes:
                where = f"variants[{i}] ({v.name})" + (f" with search {probe}" if probe else "")
                try:
                    cfg = self.trial_config(v.name, self.seeds[0], probe)
                except ValueError as e:
                    raise ValueError(f"{where}: {_first_line(e)}") from None
                _check_model(cfg, where)
        if self.scheduler and self.scheduler.max_t > self.base.get("max_steps", TrainConfig().max_steps):
            raise ValueError(f"scheduler.max_t ({self.scheduler.max_t}) exceeds base.max_steps")
        return self

    @property
    def mode(self) -> str:
        return METRIC_MODES[self.metric]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def trial_config(self, variant: str, seed: int, search: dict[str, Any], out_dir: str | None = None
                     ) -> TrainConfig:
        tree = merge(copy.deepcopy(self.base), _nest(self.variant(variant).set))
        tree = merge(tree, _nest({**search, "seed": seed, **({"out_dir": out_dir} if out_dir else {})}))
        return TrainConfig.model_validate(tree)

    def grid(self) -> list[dict]:
        return [{"variant": v.name, "seed": s} for v in self.variants for s in self.seeds]


def _first_line(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
    return str(e)


def _check_model(cfg: TrainConfig, where: str) -> None:
    if cfg.model not in MODELS:  # model not registered in this build (e.g. IAMM landing separately)
        return
    try:
        config_for(cfg.model, **cfg.model_overrides)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: model_overrides: {e}") from None


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> SweepConfig:
    """Read and validate a sweep file (ConfigError naming the field on any problem)."""
    return load_config(SweepConfig, path, overrides)


def with_absolute_paths(cfg: SweepConfig) -> SweepConfig:
    """Trial processes run in other directories: make every local path absolute on the driver."""
    base = copy.deepcopy(cfg.base)
    data = base.setdefault("data", {})
    for key in ("cache_dir", "knowledge_path"):
        if data.get(key):
            data[key] = absolute(data[key])
    if data.get("source") and Path(data["source"]).expanduser().exists():
        data["source"] = absolute(data["source"])
    tracking = cfg.tracking.model_copy(update={"state_dir": absolute(cfg.tracking.state_dir)})
    return cfg.model_copy(update={"base": base, "storage_path": absolute(cfg.storage_path),
                                  "work_dir": absolute(cfg.work_dir), "tracking": tracking})


# ------------------------------------------------------------------------------------------------
# Trial (runs in a Tune trial actor)


def _run_id_from_checkpoint(checkpoint, run_id_file: Path) -> None:
    """A trial resumed on another node (or by a new driver) continues the MLflow run its checkpoint names."""
    if checkpoint is None or run_id_file.exists():
        return
    with checkpoint.as_directory() as d:
        if (Path(d) / RUN_ID_FILE).exists():
            run_id_file.parent.mkdir(parents=True, exist_ok=True)
            run_id_file.write_text((Path(d) / RUN_ID_FILE).read_text())


def run_trial(config: dict, sweep: dict, parent_run_id: str, tracking_uri: str, storage: tuple) -> None:
    """One trial; `storage` is (filesystem, path) resolved on the driver (`storage_location`): a trial actor
    may lack the driver's S3 endpoint and credentials."""
    import ray.tune  # Ray: only in a trial

    sw = SweepConfig.model_validate(sweep)
    trial_id = ray.tune.get_context().get_trial_id()
    variant, seed = config["trial"]["variant"], config["trial"]["seed"]
    search = config.get("search", {})
    work = Path(sw.work_dir) / sw.name / trial_id
    _run_id_from_checkpoint(ray.tune.get_checkpoint(), work / RUN_ID_FILE)
    finished = finished_trial_metrics(work / RUN_ID_FILE, tracking_uri)
    if finished is not None:  # not trained again: its final metrics are reported as they were logged
        ray.tune.report(finished)
        return
    cfg = sw.trial_config(variant, seed, search, out_dir=str(work))
    tracking = sw.tracking.model_copy(update={"uri": tracking_uri})
    run_id = start_trial_run(tracking, tracking.experiment or sw.name, f"{variant}-s{seed}-{trial_id}",
                             parent_run_id, work / RUN_ID_FILE, ray.get_runtime_context().get_node_id(),
                             tags={"variant": variant, "seed": str(seed), "trial_id": trial_id, "model": cfg.model,
                                   **{f"search.{k}": str(v) for k, v in search.items()}})
    loop_config = {"train": cfg.model_dump(), "run_id": run_id, "tracking_uri": tracking_uri,
                   "log_model": tracking.log_model, "gpus_per_worker": sw.resources.gpu}
    ok = False
    try:
        if sw.resources.workers == 1:
            worker_loop(loop_config, TuneSession())
        else:
            from ray.tune.integration.ray_train import TuneReportCallback  # Ray: in a trial

            rt = RayTrainConfig(name=f"{sw.name}-{trial_id}", train=cfg, storage_path=sw.storage_path,
                                scaling=Scaling(workers=sw.resources.workers,
                                                cpus_per_worker=sw.resources.cpu,
                                                gpus_per_worker=sw.resources.gpu),
                                tracking=tracking)
            torch_trainer(rt, loop_config, callbacks=[TuneReportCallback()], storage=storage).fit()
        ok = True
    finally:
        end_run(tracking_uri, run_id, ok)
    try:  # the parent's table grows trial by trial: a sweep stopped midway still shows what finished
        log_table_so_far(tracking_uri, parent_run_id, [v.name for v in sw.variants], sw.paper)
    except Exception as e:  # noqa: BLE001 - the trial's own run is saved; the sweep's end logs the table again
        print(f"could not update the parent run's table so far: {type(e).__name__}: {e}", flush=True)


# ------------------------------------------------------------------------------------------------
# Driver


def tuner(cfg: SweepConfig, parent_run_id: str, tracking_uri: str, resume: bool = False):
    """The Tuner of `cfg`; with `resume`, the experiment in storage is restored instead (finished trials are kept,
    unfinished and errored ones continue from their last checkpoint) when storage holds one."""
    from ray import tune  # Ray: only once the sweep runs (configs are validated before)
    from ray.tune.schedulers import ASHAScheduler

    # trials also report resume checkpoints between evaluations, which carry no `cfg.metric` (ASHA and the grid
    # searcher skip such results; only Tune's strict check would fail the trial)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    r = cfg.resources
    gpu = {"GPU": r.gpu} if r.gpu else {}
    resources = {"CPU": r.cpu, **gpu} if r.workers == 1 else {"CPU": r.driver_cpu}
    storage_filesystem, storage_path = storage_location(cfg.storage_path)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, sweep=cfg.model_dump(), parent_run_id=parent_run_id,
                             tracking_uri=tracking_uri, storage=(storage_filesystem, storage_path)), resources)
    scheduler = None
    if cfg.scheduler is not None:
        s = cfg.scheduler
        scheduler = ASHAScheduler(time_attr="step", max_t=s.max_t, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    path = f"{storage_path.rstrip('/')}/{cfg.name}"
    if resume and tune.Tuner.can_restore(path, storage_filesystem=storage_filesystem):
        print(f"resuming the Tune experiment at {cfg.storage_path.rstrip('/')}/{cfg.name}", flush=True)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=storage_filesystem)
    grid = cfg.grid()
    param_space = {"trial": tune.grid_search(grid) if len(grid) > 1 else grid[0],
                   "search": {k: spec.to_tune() for k, spec in cfg.search.items()}}
    return tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, scheduler=scheduler,
                                    num_samples=cfg.num_samples,
                                    max_concurrent_trials=cfg.max_concurrent_trials),
        run_config=tune.RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  failure_config=tune.FailureConfig(max_failures=cfg.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=2)),
    )


def run_sweep(cfg: SweepConfig) -> dict:
    """Prepare data, open the parent run, run every trial, then log the ablation table and the best child."""
    t0 = time.perf_counter()
    ensure_ray()
    import ray  # Ray: only once the sweep runs

    nodes = ray.nodes()
    print(check_placement(cfg, nodes), flush=True)  # never wait forever on trials that cannot be placed
    storage = resolve_storage(cfg.storage_path, nodes)
    base = copy.deepcopy(cfg.base)
    if storage.startswith("s3://"):  # trials on other nodes fetch the driver's prepared data instead of re-parsing
        data = base.setdefault("data", {})
        data.setdefault("shared_cache", f"{storage.rstrip('/')}/prepared")
        data.setdefault("s3_endpoint_url", s3_endpoint())
    cfg = with_absolute_paths(cfg.model_copy(update={"storage_path": storage, "base": base}))
    for data in {c.data.model_dump_json(): c.data for c in
                 (cfg.trial_config(v.name, cfg.seeds[0], {}) for v in cfg.variants)}.values():
        prepare(DataConfig.model_validate(data.model_dump()), publish=True)  # warm the cache once (and publish
        # it for the other nodes), fail early on bad data
    uri = cfg.tracking.resolved_uri()
    experiment = cfg.tracking.experiment or cfg.name
    parent, resume = open_parent(cfg.tracking, experiment, cfg.name, cfg.storage_path,
                                 yaml.safe_dump(cfg.model_dump(), sort_keys=False),
                                 {"variants": ",".join(v.name for v in cfg.variants),
                                  "seeds": ",".join(map(str, cfg.seeds)), "metric": cfg.metric})
    ok = False
    try:
        results = tuner(cfg, parent, uri, resume=resume).fit()
        errors = [str(r.error) for r in results if r.error]
        close_stopped_children(uri, parent)  # stopped early by ASHA
        summary = finish_parent(uri, parent, cfg.metric, cfg.mode, [v.name for v in cfg.variants], cfg.paper)
        ok = not errors
    finally:
        end_run(uri, parent, ok)
    return {"parent_run_id": parent, "tracking_uri": uri, "experiment": experiment, "trials": len(results),
            "errors": errors, "wall_s": time.perf_counter() - t0, **summary}
