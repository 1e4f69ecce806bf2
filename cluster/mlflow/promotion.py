"""Registry promotion: the best child run of a sweep becomes the `champion` version of a registered model.

    promote("escm-sweep", "valid_acc", "max", "params.model = 'escm'", name="escm")
      1. search the sweep's FINISHED child runs (tag mlflow.parentRunId) matching `where`, best first;
      2. compare the best one with the current champion on the same metric; refuse a worse one unless
         `force` (a tie is not worse; the champion's own run is left as it is);
      3. register the run's model as a new version (tags: run_id, experiment, metric.<k> for every
         metric of the run), move alias `previous` to the replaced champion and `champion` to the new one.
    rollback("escm"): `champion` goes back to `previous` (and `previous` is cleared).

Every step prints what it compared. The model a version points at is the run's logged model (the pyfunc
model of cluster.mlflow.runs) or else its `model/` artifact directory: see services/registry.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cluster.mlflow.runs import resolve_tracking_uri
from services.registry import RegistryError, client, lookup

CHAMPION, PREVIOUS = "champion", "previous"
CHILD_FILTER = "tags.mlflow.parentRunId LIKE '%' and attributes.status = 'FINISHED'"


class PromotionError(RuntimeError):
    """Nothing to promote or roll back (no such experiment, no matching run, no previous version, ...)."""


@dataclass
class Decision:
    action: Literal["promoted", "refused", "unchanged", "rolled_back"]
    name: str
    version: str | None = None            # the champion version after the decision
    previous_version: str | None = None   # what `previous` points at after the decision
    candidate_run_id: str | None = None
    candidate_value: float | None = None
    champion_value: float | None = None
    lines: list[str] = field(default_factory=list)


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _say(decision: Decision, log: Callable[[str], None], line: str) -> None:
    decision.lines.append(line)
    log(line)


def child_runs(c, experiment: str, metric: str, mode: str, where: str | None) -> list:
    """FINISHED child runs of the experiment matching `where` that logged a finite `metric`, best first."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        raise PromotionError(f"experiment {experiment!r} does not exist")
    flt = CHILD_FILTER + (f" and {where}" if where else "")
    order = f"metrics.`{metric}` {'DESC' if mode == 'max' else 'ASC'}"
    try:
        runs = c.search_runs([exp.experiment_id], flt, order_by=[order], max_results=1000)
    except MlflowException as e:
        raise PromotionError(f"bad --where filter {where!r}: {e.message}") from e
    return [r for r in runs if math.isfinite(r.data.metrics.get(metric, math.nan))]  # still best first


def model_source(c, run) -> tuple[str, str | None] | None:
    """(source, logged model id): the run's newest READY logged model, else its `model/` dir, else None."""
    run_id = run.info.run_id
    models = [m for m in c.search_logged_models(experiment_ids=[run.info.experiment_id],
                                                filter_string=f"source_run_id = '{run_id}'")
              if str(m.status).endswith("READY")]
    if models:
        newest = max(models, key=lambda m: m.creation_timestamp)
        return newest.model_uri, newest.model_id
    if c.list_artifacts(run_id, "model"):
        return f"runs:/{run_id}/model", None
    return None


def _champion(c, name: str):
    try:
        return lookup(c, name, CHAMPION)
    except RegistryError:
        return None


def _champion_value(c, mv, metric: str) -> float | None:
    """The champion's metric: its version tag `metric.<metric>`, else its run's metric."""
    tag = mv.tags.get(f"metric.{metric}")
    if tag is not None:
        return float(tag)
    if mv.run_id:
        return c.get_run(mv.run_id).data.metrics.get(metric)
    return None


def _register(c, name: str, run, source: tuple[str, str | None], experiment: str, metric: str):
    from mlflow.exceptions import MlflowException

    try:
        c.create_registered_model(name, description="empathetic response generator (edp promote)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    tags = {"run_id": run.info.run_id, "experiment": experiment, "promoted_metric": metric,
            "parent_run_id": run.data.tags.get("mlflow.parentRunId", ""),
            "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **{f"metric.{k}": repr(float(v)) for k, v in run.data.metrics.items()}}
    if "model" in run.data.params:
        tags["model_type"] = run.data.params["model"]
    uri, model_id = source
    return c.create_model_version(name, uri, run_id=run.info.run_id, tags=tags, model_id=model_id,
                                  description=f"best child of {experiment} by {metric}")


def promote(experiment: str, metric: str, mode: str, where: str | None = None, *, name: str,
            force: bool = False, tracking_uri: str | None = None,
            log: Callable[[str], None] = print) -> Decision:
    """Register the best child run of `experiment` by `metric` and make it the champion (see module doc)."""
    if mode not in ("max", "min"):
        raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
    c = client(resolve_tracking_uri(tracking_uri))
    runs = child_runs(c, experiment, metric, mode, where)
    if not runs:
        raise PromotionError(f"no FINISHED child run of {experiment!r} with metric {metric!r}"
                             + (f" matching {where!r}" if where else ""))
    decision = Decision("refused", name)
    say = lambda line: _say(decision, log, line)  # noqa: E731
    say(f"{len(runs)} child run(s) of {experiment!r}" + (f" matching {where!r}" if where else "")
        + f", ranked by {metric} ({mode}): "
        + ", ".join(f"{r.info.run_name or r.info.run_id[:8]}={r.data.metrics[metric]:.6g}" for r in runs[:5])
        + (" ..." if len(runs) > 5 else ""))
    for run in runs:
        source = model_source(c, run)
        if source is not None:
            break
        say(f"skip run {run.info.run_id}: it logged no model")
    else:
        raise PromotionError(f"none of the {len(runs)} matching runs of {experiment!r} logged a model")
    value = run.data.metrics[metric]
    decision.candidate_run_id, decision.candidate_value = run.info.run_id, value
    say(f"candidate: run {run.info.run_id} ({run.info.run_name}) {metric}={value:.6g} model {source[0]}")

    champion = _champion(c, name)
    if champion is None:
        say(f"champion: none ({name!r} has no alias {CHAMPION!r}) -> promote")
    else:
        champ_value = _champion_value(c, champion, metric)
        decision.champion_value = champ_value
        decision.version = str(champion.version)
        say(f"champion: {name} v{champion.version} (run {champion.run_id}) {metric}="
            + ("n/a" if champ_value is None else f"{champ_value:.6g}"))
        if champion.run_id == run.info.run_id:
            decision.action = "unchanged"
            say(f"decision: the candidate run already is champion v{champion.version}; nothing to do")
            return decision
        if champ_value is None or _better(champ_value, value, mode):
            why = ("the champion has no value to compare" if champ_value is None else
                   f"candidate {value:.6g} is worse than champion {champ_value:.6g} ({mode} is better)")
            if not force:
                say(f"decision: refuse: {why} (use --force to promote anyway)")
                return decision
            say(f"decision: {why}, but --force: promote")
        else:
            say(f"decision: candidate {value:.6g} is not worse than champion {champ_value:.6g} "
                f"({mode} is better): promote")

    mv = _register(c, name, run, source, experiment, metric)
    if champion is not None:
        c.set_registered_model_alias(name, PREVIOUS, champion.version)
        decision.previous_version = str(champion.version)
    c.set_registered_model_alias(name, CHAMPION, mv.version)
    decision.action, decision.version = "promoted", str(mv.version)
    say(f"registered {name} v{mv.version}; {CHAMPION} -> v{mv.version}"
        + (f", {PREVIOUS} -> v{champion.version}" if champion is not None else ""))
    return decision


def rollback(name: str, *, tracking_uri: str | None = None, log: Callable[[str], None] = print) -> Decision:
    """Move `champion` back to the `previous` version; the demoted version is tagged `rolled_back`."""
    c = client(resolve_tracking_uri(tracking_uri))
    decision = Decision("rolled_back", name)
    try:
        previous = lookup(c, name, PREVIOUS)
    except RegistryError as e:
        raise PromotionError(f"cannot roll back {name!r}: {e}") from e
    champion = _champion(c, name)
    current = f"v{champion.version}" if champion else "none"
    _say(decision, log, f"champion: {current}; previous: v{previous.version}")
    c.set_registered_model_alias(name, CHAMPION, previous.version)
    c.delete_registered_model_alias(name, PREVIOUS)
    if champion is not None:
        c.set_model_version_tag(name, champion.version, "rolled_back",
                                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    decision.version, decision.candidate_run_id = str(previous.version), previous.run_id
    _say(decision, log, f"rolled back {name}: {CHAMPION} -> v{previous.version}"
         + (f" (v{champion.version} demoted)" if champion else ""))
    return decision
