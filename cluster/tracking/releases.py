"""A released model (trainers.release: a bundle + its card under models/) registered as a version in MLflow.

    register_release("models/escm-ed", "escm", alias="champion")

The version is what promotion registers (cluster.tracking.promotion): a run of experiment `edp-releases` logs
the pyfunc model of services/pyfunc_model.py around the released directory, and the version points at that
logged model, so replicas load it like any version. Its tags carry the card: every valid metric twice, as
`valid_<metric>` and in promotion's convention (`metric.valid_<metric>`, `metric.final_valid_<metric>`), the
comparison key promotion checks (data key, split, metric definition), the code, `source=release:<dir>` and
the bundle's sha256. `version_tags` and `run_params` are pure.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cluster.tracking.promotion import CHAMPION, MAX_TAG_CHARS, PREVIOUS, PromotionError, model_source
from cluster.tracking.runs import TrackingConfig, end_run, log_pyfunc_model, start_run
from services.registry import RegistryError, client, lookup

EXPERIMENT = "edp-releases"


@dataclass
class Registered:
    name: str
    version: str
    alias: str | None
    previous_version: str | None   # the version `previous` points at after an alias move of `champion`
    run_id: str


def version_tags(card: dict, directory: str | Path) -> dict[str, str]:
    """A released model's version tags, from its card (pure)."""
    evaluation, training = card.get("evaluation"), card["training"]
    tags = {"source": f"release:{directory}", "bundle_sha256": card["bundle_sha256"], "release": card["name"],
            "model_type": card["model"]["type"], "weights_dtype": card["model"]["weights_dtype"],
            "data.key": str(card["data"]["data_key"]), "recipe": json.dumps(training["summary"])[:MAX_TAG_CHARS],
            **{k: str(v) for k, v in (("code.git_commit", training["commit"]),
                                      ("code.trainers_sha256", training["code_version"])) if v}}
    if evaluation:
        split = evaluation["split"]
        tags.update({"eval.split": split, "metric_definition": evaluation.get("metric_definition", "?")})
        for k, v in evaluation["metrics"].items():
            tags[f"{split}_{k}"] = repr(float(v))
            tags[f"metric.{split}_{k}"] = repr(float(v))
            tags[f"metric.final_{split}_{k}"] = repr(float(v))
    return tags


def run_params(card: dict) -> dict[str, str]:
    """The params of the run that logs a release (pure): what a training run logs for the same facts."""
    tags = version_tags(card, "")
    keys = ("data.key", "eval.split", "metric_definition", "code.git_commit", "code.trainers_sha256", "recipe")
    return {"model": card["model"]["type"], "release": card["name"], **{k: tags[k] for k in keys if k in tags}}


def register_release(directory: str | Path, name: str, *, alias: str | None = None, tracking_uri: str | None = None,
                     log: Callable[[str], None] = print) -> Registered:
    """Register the released model in `directory` (verified against its card) as a new version of `name`; with
    `alias`, move it there (moving `champion` points `previous` at the replaced champion)."""
    from trainers.release import ReleaseError, read_card, released_bundle

    try:
        bundle = released_bundle(directory).resolve()
        card = read_card(bundle)
    except ReleaseError as e:
        raise PromotionError(str(e)) from e
    cfg = TrackingConfig(uri=tracking_uri, experiment=EXPERIMENT)
    uri = cfg.resolved_uri()
    c = client(uri)
    run_id = _log_release_run(cfg, card, bundle)
    log(f"logged {bundle} as run {run_id} of experiment {EXPERIMENT!r}")
    source = model_source(c, c.get_run(run_id))
    if source is None:
        raise PromotionError(f"run {run_id} logged no model for {bundle}")
    _ensure_registered_model(c, name)
    mv = c.create_model_version(name, source[0], run_id=run_id, tags=version_tags(card, directory),
                                model_id=source[1], description=f"released model {card['name']} ({directory})")
    registered = Registered(name, str(mv.version), alias, None, run_id)
    log(f"registered {name} v{mv.version} from {directory} (bundle sha256 {card['bundle_sha256'][:12]})")
    if alias:
        _move_alias(c, registered, log)
    return registered


def _log_release_run(cfg: TrackingConfig, card: dict, bundle: Path) -> str:
    import mlflow  # mlflow: only when registering

    run_id = start_run(cfg, EXPERIMENT, f"release-{card['name']}", tags={"release": card["name"]})
    c = client(cfg.resolved_uri())
    ok = False
    try:
        for k, v in run_params(card).items():
            c.log_param(run_id, k, v)
        c.log_text(run_id, json.dumps(card, indent=1), "card.json")
        mlflow.set_tracking_uri(cfg.resolved_uri())
        with mlflow.start_run(run_id=run_id):
            log_pyfunc_model(bundle)
        ok = True
    finally:
        end_run(cfg.resolved_uri(), run_id, ok)
    return run_id


def _ensure_registered_model(c, name: str) -> None:
    from mlflow.exceptions import MlflowException  # mlflow: only when registering

    try:
        c.create_registered_model(name, description="empathetic response generator")
    except MlflowException as e:
        if e.error_code != "RESOURCE_ALREADY_EXISTS":
            raise


def _move_alias(c, registered: Registered, log: Callable[[str], None]) -> None:
    name, version, alias = registered.name, registered.version, registered.alias
    if alias == CHAMPION:
        try:
            champion = lookup(c, name, CHAMPION)
        except RegistryError:  # no champion yet
            champion = None
        if champion is not None and str(champion.version) != version:
            c.set_registered_model_alias(name, PREVIOUS, champion.version)
            registered.previous_version = str(champion.version)
    c.set_registered_model_alias(name, alias, version)
    log(f"{alias} -> v{version}" + (f", {PREVIOUS} -> v{registered.previous_version}"
                                    if registered.previous_version else ""))
