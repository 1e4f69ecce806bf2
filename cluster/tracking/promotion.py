"""Registry promotion: the best child run of a sweep becomes the `champion` version of a registered model.

    promote("escm-sweep", "valid_ppl", where="params.model = 'escm'", name="escm")
      0. the direction comes from the metric (trainers.metrics.METRIC_MODES: valid_ppl and valid_ppl_token min,
         valid_acc and valid_dist_<n>[_sampled] max, final_<m> as <m>); `mode` only overrides it, and an unknown
         metric without `mode` is an error. Whole-split Dist-n exists only as final_valid_dist_<n>;
      1. search the sweep's FINISHED child runs (tag mlflow.parentRunId) matching `where`, best first;
      2. compare only like with like: every ranked run and the champion must share the comparison key
         (prepared-data key, evaluation split, metric definition: trainers.metrics.METRIC_DEFINITION, so a run
         logged when valid_ppl was token-level is not ranked with one logging the papers' per-example PPL), else
         refuse with the keys printed unless `force`;
      3. compare the best one with the current champion on the same metric; refuse a worse one unless
         `force` (a tie is not worse; the champion's own run is left as it is);
         with alias="challenger" the same rules decide whether it may be tried live as the challenger;
      (steps 2-3 are `decide`: a pure function over what was read, testable without MLflow)
      4. register the run's model as a new version (tags: run_id, experiment, the comparison key, the
         code version, the recipe, metric.<k> for every metric of the run), move alias `previous` to the
         replaced champion and `champion` to the new one (or only `challenger` to it). `dry_run` prints steps
         0-3 and registers nothing.
    promote_challenger("escm"): the version behind alias `challenger` becomes `champion` (`previous` the
      replaced one) and alias `challenger` goes.
    rollback("escm"): `champion` goes back to `previous` (and `previous` is cleared).

Every step prints what it compared. The model a version points at is the run's logged model (the pyfunc
model of cluster.tracking.runs, holding a safetensors bundle) or else its `model/` artifact directory: see
services/registry.py.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from cluster.tracking.runs import resolve_tracking_uri
from services.registry import RegistryError, client, lookup
from services.replica import CHALLENGER

CHAMPION, PREVIOUS = "champion", "previous"
CHILD_FILTER = "tags.mlflow.parentRunId LIKE '%' and attributes.status = 'FINISHED'"
COMPARISON_KEYS = ("data.key", "eval.split", "metric_definition")  # run params (cluster.tracking.runs.log_setup)
CODE_KEYS = ("code.git_commit", "code.trainers_sha256")
MAX_TAG_CHARS = 5000  # MLflow's limit on a model version tag value


class PromotionError(RuntimeError):
    """Nothing to promote or roll back (no such experiment, no matching run, no previous version, ...)."""


@dataclass
class Decision:
    action: Literal["promoted", "would_promote", "refused", "unchanged", "rolled_back"]
    name: str
    version: str | None = None            # the champion version after the decision
    challenger_version: str | None = None  # the challenger registered by promote(alias="challenger")
    previous_version: str | None = None   # what `previous` points at after the decision
    candidate_run_id: str | None = None
    candidate_value: float | None = None
    champion_value: float | None = None
    lines: list[str] = field(default_factory=list)


def metric_mode(metric: str, mode: str | None = None) -> str:
    """`mode` when given, else the metric's direction from the trainer's table (`final_<m>` as `<m>`)."""
    from trainers.metrics import METRIC_MODES  # torch: not at `edp` start-up

    if mode is not None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        return mode
    known = METRIC_MODES.get(metric.removeprefix("final_"))
    if known is None:
        raise PromotionError(f"unknown metric {metric!r}: which direction is better is not known; pass "
                             f"--mode max|min, or use one of {', '.join(sorted(METRIC_MODES))} (or final_<metric>)")
    return known


def comparison_key(values: dict[str, str]) -> dict[str, str]:
    """What makes two runs' metrics comparable, from run params or version tags ('?' where unrecorded)."""
    return {k: values.get(k, "?") for k in COMPARISON_KEYS}


def _show(key: dict[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items())


def _better(a: float, b: float, mode: str) -> bool:
    return a > b if mode == "max" else a < b


def _say(decision: Decision, log: Callable[[str], None], line: str) -> None:
    decision.lines.append(line)
    log(line)


def ranked_child_runs(c, experiment: str, metric: str, mode: str, where: str | None) -> list:
    """FINISHED child runs of the experiment matching `where` that logged a finite `metric`, best first."""
    from mlflow.exceptions import MlflowException  # mlflow: not at `edp` start-up

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


def _champion_standing(c, name: str, metric: str) -> Standing | None:
    """The champion's run, value of `metric` and comparison key (None: `name` has no champion)."""
    mv = _champion(c, name)
    if mv is None:
        return None
    return Standing(mv.run_id, _champion_value(c, mv, metric), _champion_key(c, mv), version=str(mv.version))


def _champion_value(c, mv, metric: str) -> float | None:
    """The champion's metric: its version tag `metric.<metric>`, else its run's metric."""
    tag = mv.tags.get(f"metric.{metric}")
    if tag is not None:
        return float(tag)
    if mv.run_id:
        return c.get_run(mv.run_id).data.metrics.get(metric)
    return None


def recipe(params: dict[str, str]) -> str:
    """The run's resolved training config (its `config.*` params) as compact JSON, for a version tag."""
    text = json.dumps({k.removeprefix("config."): v for k, v in sorted(params.items()) if k.startswith("config.")},
                      separators=(",", ":"))
    cut = "...(cut: the run's config.yaml has it all)"
    return text if len(text) <= MAX_TAG_CHARS else text[:MAX_TAG_CHARS - len(cut)] + cut


def version_tags(run, experiment: str, metric: str, mode: str) -> dict[str, str]:
    """What a version carries: its run, the metrics it was promoted on, comparison key, code, recipe."""
    params = run.data.params
    tags = {"run_id": run.info.run_id, "experiment": experiment, "promoted_metric": metric, "promoted_mode": mode,
            "parent_run_id": run.data.tags.get("mlflow.parentRunId", ""),
            "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **comparison_key(params), **{k: params[k] for k in CODE_KEYS if k in params},
            "recipe": recipe(params),
            **{f"metric.{k}": repr(float(v)) for k, v in run.data.metrics.items()}}
    if "model" in params:
        tags["model_type"] = params["model"]
    return tags


def _register(c, name: str, run, source: tuple[str, str | None], experiment: str, metric: str, mode: str):
    from mlflow.exceptions import MlflowException  # mlflow: not at `edp` start-up

    try:
        c.create_registered_model(name, description="empathetic response generator (edp promote)")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    uri, model_id = source
    return c.create_model_version(name, uri, run_id=run.info.run_id, tags=version_tags(run, experiment, metric, mode),
                                  model_id=model_id, description=f"best child of {experiment} by {metric} ({mode})")


def _champion_key(c, mv) -> dict[str, str]:
    """The champion's comparison key: its version tags, else its run's params (versions before the tags)."""
    key = comparison_key(mv.tags)
    if "?" in key.values() and mv.run_id:
        params = c.get_run(mv.run_id).data.params
        key = {k: v if v != "?" else params.get(k, "?") for k, v in key.items()}
    return key


def _go_on(say: Callable[[str], None], force: bool, why: str) -> bool:
    """Refuse (False) because of `why`, or say that --force overrides it (True)."""
    if not force:
        say(f"decision: refuse: {why} (use --force to promote anyway)")
        return False
    say(f"decision: {why}, but --force: promote")
    return True


def _with_model(c, runs: list, experiment: str, say: Callable[[str], None]):
    """The best run that logged a model, and its model source."""
    for run in runs:
        source = model_source(c, run)
        if source is not None:
            return run, source
        say(f"skip run {run.info.run_id}: it logged no model")
    raise PromotionError(f"none of the {len(runs)} matching runs of {experiment!r} logged a model")


def _rank(runs: list, metric: str, dry_run: bool) -> str:
    label = lambda r: f"{r.info.run_name or r.info.run_id[:8]}={r.data.metrics[metric]:.6g}"  # noqa: E731
    if dry_run:
        return "".join(f"\n  {i}. {label(r)} run {r.info.run_id} ({_show(comparison_key(r.data.params))})"
                       for i, r in enumerate(runs, 1))
    return " " + ", ".join(label(r) for r in runs[:5]) + (" ..." if len(runs) > 5 else "")


@dataclass(frozen=True)
class Standing:
    """What the decision compares, read from the registry and the runs beforehand (no MLflow in `decide`)."""

    run_id: str
    value: float | None
    key: dict[str, str]
    version: str | None = None  # the champion's version (None for the candidate)


def decide(candidate: Standing, apart: list[Standing], champion: Standing | None, *, name: str, metric: str,
           mode: str, force: bool, say: Callable[[str], None]) -> Literal["promote", "refused", "unchanged"]:
    """Whether `candidate` may become `name`'s champion (or challenger) in place of `champion` (None: there is
    none); `apart` are the ranked runs measured on another comparison key than the candidate. Pure: every
    reason goes to `say`, nothing is read or written."""
    key = candidate.key
    if apart and not _go_on(say, force, f"not comparable: {len(apart)} ranked run(s) were measured on other "
                                        f"data or metric definitions, e.g. run {apart[0].run_id} on "
                                        f"{_show(apart[0].key)}, the candidate on {_show(key)}"):
        return "refused"
    if champion is None:
        say(f"champion: none ({name!r} has no alias {CHAMPION!r}) -> promote")
        return "promote"
    champ_value, value = champion.value, candidate.value
    say(f"champion: {name} v{champion.version} (run {champion.run_id}) {metric}="
        + ("n/a" if champ_value is None else f"{champ_value:.6g}"))
    if champion.run_id == candidate.run_id:
        say(f"decision: the candidate run already is champion v{champion.version}; nothing to do")
        return "unchanged"
    if champion.key != key and not _go_on(say, force, "not comparable: the champion was measured on "
                                                      f"{_show(champion.key)}, the candidate on {_show(key)}"):
        return "refused"
    if champ_value is None or _better(champ_value, value, mode):
        why = ("the champion has no value to compare" if champ_value is None else
               f"candidate {value:.6g} is worse than champion {champ_value:.6g} ({mode} is better)")
        return "promote" if _go_on(say, force, why) else "refused"
    say(f"decision: candidate {value:.6g} is not worse than champion {champ_value:.6g} ({mode} is better): promote")
    return "promote"


def promote(experiment: str, metric: str, mode: str | None = None, where: str | None = None, *, name: str,
            force: bool = False, dry_run: bool = False, tracking_uri: str | None = None,
            log: Callable[[str], None] = print, alias: str = CHAMPION) -> Decision:
    """Register the best child run of `experiment` by `metric` and make it the champion, or with
    `alias="challenger"` the challenger beside the unchanged champion (see module doc): read the runs and the
    champion, `decide`, then write the registry."""
    if alias not in (CHAMPION, CHALLENGER):
        raise ValueError(f"alias must be {CHAMPION!r} or {CHALLENGER!r}, got {alias!r}")
    mode = metric_mode(metric, mode)
    c = client(resolve_tracking_uri(tracking_uri))
    runs = ranked_child_runs(c, experiment, metric, mode, where)
    if not runs:
        raise PromotionError(f"no FINISHED child run of {experiment!r} with metric {metric!r}"
                             + (f" matching {where!r}" if where else ""))
    decision = Decision("refused", name)
    say = lambda line: _say(decision, log, line)  # noqa: E731
    say(f"{len(runs)} child run(s) of {experiment!r}" + (f" matching {where!r}" if where else "")
        + f", ranked by {metric} ({mode} is better):" + _rank(runs, metric, dry_run))
    run, source = _with_model(c, runs, experiment, say)
    candidate = Standing(run.info.run_id, run.data.metrics[metric], comparison_key(run.data.params))
    decision.candidate_run_id, decision.candidate_value = candidate.run_id, candidate.value
    say(f"candidate: run {run.info.run_id} ({run.info.run_name}) {metric}={candidate.value:.6g} model {source[0]}")
    say(f"candidate measured on: {_show(candidate.key)}")
    apart = [Standing(r.info.run_id, r.data.metrics[metric], comparison_key(r.data.params)) for r in runs
             if comparison_key(r.data.params) != candidate.key]
    champion = _champion_standing(c, name, metric)
    verdict = decide(candidate, apart, champion, name=name, metric=metric, mode=mode, force=force, say=say)
    if champion is not None and (force or not apart):  # the decision got as far as the champion
        decision.champion_value, decision.version = champion.value, champion.version
    if verdict != "promote":
        decision.action = verdict
        return decision
    if dry_run:
        decision.action = "would_promote"
        say(f"dry run: would register run {run.info.run_id} as a new version of {name} and move {alias}; "
            "nothing registered")
        return decision
    return _register_and_move(c, decision, run, source, experiment, metric, mode, alias, champion, say)


def _register_and_move(c, decision: Decision, run, source: tuple[str, str | None], experiment: str, metric: str,
                       mode: str, alias: str, champion: Standing | None, say: Callable[[str], None]) -> Decision:
    """The registry writes of a promotion: a new version from the run, then the aliases."""
    name = decision.name
    mv = _register(c, name, run, source, experiment, metric, mode)
    if alias == CHALLENGER:
        c.set_registered_model_alias(name, CHALLENGER, mv.version)
        decision.action, decision.challenger_version = "promoted", str(mv.version)
        say(f"registered {name} v{mv.version}; {CHALLENGER} -> v{mv.version} (champion unchanged)")
        return decision
    if champion is not None:
        c.set_registered_model_alias(name, PREVIOUS, champion.version)
        decision.previous_version = champion.version
    c.set_registered_model_alias(name, CHAMPION, mv.version)
    decision.action, decision.version = "promoted", str(mv.version)
    say(f"registered {name} v{mv.version}; {CHAMPION} -> v{mv.version}"
        + (f", {PREVIOUS} -> v{champion.version}" if champion is not None else ""))
    return decision


def promote_challenger(name: str, *, tracking_uri: str | None = None,
                       log: Callable[[str], None] = print) -> Decision:
    """Make the version behind alias `challenger` (measured live beside the champion, `edp compare`) the
    champion: `previous` -> the replaced champion, `champion` -> the challenger's version, and alias
    `challenger` removed. Replicas serving both take the loaded challenger over as champion at once."""
    c = client(resolve_tracking_uri(tracking_uri))
    try:
        challenger = lookup(c, name, CHALLENGER)
    except RegistryError as e:
        raise PromotionError(f"cannot promote the challenger of {name!r}: {e}") from e
    champion = _champion(c, name)
    decision = Decision("promoted", name, version=str(challenger.version), candidate_run_id=challenger.run_id)
    say = lambda line: _say(decision, log, line)  # noqa: E731
    say(f"challenger: {name} v{challenger.version} (run {challenger.run_id}); champion: "
        + (f"v{champion.version}" if champion else "none"))
    if champion is not None and champion.version != challenger.version:
        c.set_registered_model_alias(name, PREVIOUS, champion.version)
        decision.previous_version = str(champion.version)
    c.set_registered_model_alias(name, CHAMPION, challenger.version)
    c.delete_registered_model_alias(name, CHALLENGER)
    c.set_model_version_tag(name, challenger.version, "promoted_from", CHALLENGER)
    say(f"{CHAMPION} -> v{challenger.version}" + (f", {PREVIOUS} -> v{champion.version}" if decision.previous_version
                                                 else "") + f"; alias {CHALLENGER} removed")
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
