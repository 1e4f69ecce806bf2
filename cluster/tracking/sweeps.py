"""A sweep's MLflow bookkeeping: its parent run (opened, or continued after its driver died), the trials that ASHA
stopped, and a trial whose run already finished.

    parent, resumed = open_parent(tracking, experiment, name, storage, sweep_yaml, params)
    run_id = start_trial_run(tracking, experiment, name, parent, run_id_file, node_id, tags)   # in each trial
    close_stopped_children(uri, parent)       # children still RUNNING were stopped early by ASHA
    reports.finish_parent(...)                # the ablation table on the parent, the best child

No Ray here: `cluster.distributed.tuning` runs the trials and calls these.
"""

from __future__ import annotations

from pathlib import Path

from cluster.tracking.runs import TrackingConfig, start_run
from services.registry import client


def unfinished_parent(c, experiment: str, name: str, storage: str) -> str | None:
    """The newest parent run of sweep `name` (same storage) that did not finish: its driver died or failed, and
    a re-submission continues it. A finished sweep submitted again starts a new parent run."""
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = c.search_runs([exp.experiment_id], f"tags.kind = 'sweep' and tags.sweep = '{name}' and "
                         f"tags.storage = '{storage}' and attributes.status != 'FINISHED'",
                         order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def open_parent(tracking: TrackingConfig, experiment: str, name: str, storage: str, sweep_yaml: str,
                params: dict[str, str]) -> tuple[str, bool]:
    """(parent run id, resumed): the unfinished parent run of this sweep set RUNNING again (a retried job after its
    driver died), else a new parent run holding sweep.yaml and `params`."""
    c = client(tracking.resolved_uri())
    parent = unfinished_parent(c, experiment, name, storage)
    if parent is not None:
        c.update_run(parent, status="RUNNING")
        return parent, True
    parent = start_run(tracking, experiment, name, tags={"sweep": name, "kind": "sweep", "storage": storage})
    c.log_text(parent, sweep_yaml, "sweep.yaml")
    for key, value in params.items():
        c.log_param(parent, key, value)
    return parent, False


def start_trial_run(tracking: TrackingConfig, experiment: str, name: str, parent_run_id: str, run_id_file: Path,
                    node_id: str, tags: dict[str, str]) -> str:
    """A trial's child run under the sweep's parent (the one in `run_id_file` when the trial is retried), tagged
    with the node it (last) ran on."""
    run_id = start_run(tracking, experiment, name, parent_run_id=parent_run_id, run_id_file=run_id_file, tags=tags)
    client(tracking.resolved_uri()).set_tag(run_id, "node_id", node_id)
    return run_id


def close_stopped_children(uri: str, parent_run_id: str) -> None:
    """Mark the child runs still RUNNING after the sweep KILLED: ASHA stopped them early."""
    c = client(uri)
    for run in c.search_runs([c.get_run(parent_run_id).info.experiment_id],
                             f"tags.mlflow.parentRunId = '{parent_run_id}' and attributes.status = 'RUNNING'"):
        c.set_terminated(run.info.run_id, "KILLED")


def finished_trial_metrics(run_id_file: Path, uri: str) -> dict[str, float] | None:
    """The metrics to report for a trial whose MLflow run already FINISHED (its driver died before Tune recorded
    the trial as done), as they were logged, `final_<m>` also as `<m>`; None when the trial must still run."""
    if not run_id_file.exists():
        return None
    run = client(uri).get_run(run_id_file.read_text().strip())
    if run.info.status != "FINISHED":
        return None
    metrics = run.data.metrics
    return {**metrics, **{k.removeprefix("final_"): v for k, v in metrics.items() if k.startswith("final_")}}
