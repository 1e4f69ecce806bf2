"""Resolve `models:/<name>@<alias>` in the MLflow registry to a local serving bundle and load a Responder.

Contract with whoever registers versions (cluster.tracking.promotion, or by hand):

- A model version's `source` is either a logged model (`models:/m-...`, e.g. the pyfunc model of
  services/pyfunc_model.py logged by cluster.tracking.runs.log_pyfunc_model, whose bundle sits under
  `artifacts/bundle/`) or a run artifact directory (`runs:/<run_id>/model`) holding a bundle.
- A bundle (trainers.artifacts) is `model.safetensors` + `config.json` + `vocab.json`: weights, the
  resolved config and the vocabulary, so the preprocessing is the training run's (same spaCy pipeline,
  same vocabulary). It is read with JSON and safetensors only: no pickle from the registry is ever
  loaded, so a `*.pt`/`*.pkl` in a version is refused, never unpickled.
- The version's `run_id` names the training run (kept as the tag `run_id` too).
- The serving side downloads the version's files and loads the shallowest bundle it finds; if the source
  holds none it falls back to the run's `model/` artifacts.

    resolved = resolve("models:/escm@champion", tracking_uri)
    responder = load_responder(resolved)

A local bundle directory (a released model under models/) is served without MLflow: `local_version` gives it a
fixed pseudo-version (name `<card name>`, version `local:<sha12>`) that services.replica.StaticSource hands the
replica as its only version.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w.-]+)|/(?P<version>\d+))$")


class RegistryError(RuntimeError):
    """The registry has no such model/alias/version, or the version holds no serving bundle."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    alias: str | None
    version: str
    run_id: str | None
    source: str
    bundle: Path            # the serving bundle directory inside local_dir
    local_dir: Path         # this version's downloaded files (discard() removes them once loaded)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """'models:/escm@champion' -> ('escm', 'champion', None); 'models:/escm/3' -> ('escm', None, '3')."""
    m = MODEL_URI.match(uri)
    if not m:
        raise RegistryError(f"{uri!r} is not a registry URI "
                            "(models:/<name>@<alias> or models:/<name>/<version>)")
    return m["name"], m["alias"], m["version"]


def client(tracking_uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def lookup(c, name: str, alias: str | None = None, version: str | None = None):
    """The ModelVersion for an alias or version number; RegistryError naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias) if alias else c.get_model_version(name, version)
    except MlflowException as e:
        what = f"alias {alias!r}" if alias else f"version {version}"
        raise RegistryError(f"registered model {name!r} has no {what} ({e.error_code})") from e


def download_bundle(c, tracking_uri: str, mv, dst: Path) -> Path:
    """Download the version's files into `dst`; return its bundle directory (fallback: the run's model/).

    The version's storage location comes from the registry (`get_model_version_download_uri`), so this
    needs no process-global registry URI (a Serve replica has only the tracking URI it was given).
    """
    from mlflow.artifacts import download_artifacts

    from trainers.artifacts import PICKLE_SUFFIXES, find_bundle

    tried = []
    locations = [lambda: c.get_model_version_download_uri(mv.name, mv.version)]
    if mv.run_id:
        locations.append(lambda: f"runs:/{mv.run_id}/model")
    for i, location in enumerate(locations):
        target = dst / f"src{i}"
        target.mkdir(parents=True, exist_ok=True)
        uri = f"location {i}"
        try:
            uri = location()
            download_artifacts(artifact_uri=uri, dst_path=str(target), tracking_uri=tracking_uri)
        except Exception as e:  # noqa: BLE001 - try the next location, report all at the end
            tried.append(f"{uri}: {type(e).__name__}: {e}")
            continue
        bundle = find_bundle(target)
        if bundle is not None:
            return bundle
        pickles = sorted(p.name for p in target.rglob("*") if p.suffix in PICKLE_SUFFIXES)
        tried.append(f"{uri}: no bundle" + (f" (pickled files, never loaded: {', '.join(pickles)})" if pickles else ""))
    raise RegistryError(f"model {mv.name!r} version {mv.version} holds no serving bundle "
                        "(model.safetensors + config.json + vocab.json); tried " + "; ".join(tried))


def resolve(uri: str, tracking_uri: str, cache_dir: str | Path | None = None) -> ResolvedModel:
    """`models:/name@alias` (or `/version`) -> version, run id and a local bundle directory."""
    name, alias, version = parse_model_uri(uri)
    c = client(tracking_uri)
    return download(c, tracking_uri, lookup(c, name, alias, version), alias, cache_dir)


def download(c, tracking_uri: str, mv, alias: str | None = None,
             cache_dir: str | Path | None = None) -> ResolvedModel:
    """The looked-up version `mv` (see `lookup`) downloaded into a directory of its own."""
    base = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "edp-registry"
    base.mkdir(parents=True, exist_ok=True)
    dst = Path(tempfile.mkdtemp(prefix=f"{mv.name}-v{mv.version}-", dir=base))
    try:
        bundle = download_bundle(c, tracking_uri, mv, dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
    return ResolvedModel(mv.name, alias, str(mv.version), mv.run_id or mv.tags.get("run_id"), mv.source, bundle,
                         dst)


@dataclass(frozen=True)
class LocalVersion:
    """A local bundle directory (a released model) standing in for a registry ModelVersion: what `lookup`
    returns when a replica serves a directory (`edp serve --model models/escm-ed`), with a fixed name and
    pseudo-version `local:<first 12 hex digits of the bundle's sha256>`."""

    name: str
    version: str
    source: str
    bundle: Path
    run_id: str | None = None


def local_version(directory: str | Path) -> LocalVersion:
    """The pseudo-version of a bundle directory, checked: a bundle, matching its card.json when it has one;
    RegistryError naming what is wrong."""
    from trainers.release import ReleaseError, bundle_identity, released_bundle

    try:
        bundle = released_bundle(directory).resolve()
        name, digest = bundle_identity(bundle)
    except ReleaseError as e:
        raise RegistryError(str(e)) from e
    return LocalVersion(name, f"local:{digest[:12]}", f"release:{bundle}", bundle)


def resolve_local(mv: LocalVersion, alias: str | None = None) -> ResolvedModel:
    """A local version as a ResolvedModel (its files are the directory itself: never `discard` them)."""
    return ResolvedModel(mv.name, alias, mv.version, mv.run_id, mv.source, mv.bundle, mv.bundle)


def load_responder(resolved: ResolvedModel, device: str = "cpu", warm_up: bool = True):
    """A warmed-up trainers.inference.Responder for a resolved version."""
    from trainers.inference import Responder

    responder = Responder.from_bundle(resolved.bundle, device=device)
    if warm_up:
        responder.warm_up()
    return responder


def discard(resolved: ResolvedModel) -> None:
    """Remove a resolved version's downloaded files (after it has been swapped out)."""
    shutil.rmtree(resolved.local_dir, ignore_errors=True)
