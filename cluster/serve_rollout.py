"""Roll a running Serve application to a registered version the Ray way (`edp promote --apply`).

The version goes into the `user_config` of the application's `Responder` deployment
(`user_config.model_version`, services/replica.py). Through the Serve REST API on the Ray dashboard:

    GET  /api/serve/applications/     every application's deployed config (what `serve deploy` sent)
    PUT  /api/serve/applications/     the same configs back, with only that user_config changed

Serve sees a change of `user_config` only, so it calls reconfigure() on the running replicas in place
(no restart); the other applications come back unchanged and are not redeployed. Applications started
with `serve.run` (`edp serve`) have no deployed config: they follow their alias by polling, the local
default. On Kubernetes the durable record is the RayService's serveConfigV2: set the same
`user_config.model_version` in the chart's Serve config (Git/Helm) so KubeRay does not deploy the old one
again when the spec next changes.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

from services.replica import RolloutConfig

DEPLOYMENT = "Responder"  # services.app.ResponderDeployment
DEPLOY_KEYS = ("proxy_location", "http_options", "grpc_options", "target_capacity")


class RolloutError(RuntimeError):
    """The running Serve instance cannot be rolled this way (no such application, deployed imperatively, ...)."""


def dashboard_address(address: str | None) -> str:
    """`address`, else $RAY_DASHBOARD_ADDRESS (the local stack's env file sets it)."""
    address = address or os.environ.get("RAY_DASHBOARD_ADDRESS")
    if not address:
        raise RolloutError("no Ray dashboard address: pass --serve-address http://HOST:8265 or set "
                           "RAY_DASHBOARD_ADDRESS (`source .edp/stack/env` for the local stack)")
    return address


def running_config(details: dict) -> dict:
    """The `serve deploy` body that redeploys what runs now, from GET /api/serve/applications/."""
    apps = details.get("applications") or {}
    imperative = sorted(name for name, app in apps.items() if app.get("deployed_app_config") is None)
    if imperative:
        raise RolloutError(f"application(s) {', '.join(imperative)} were started with serve.run (e.g. `edp serve`), "
                           "not from a Serve config, so their config cannot be updated: they follow their alias "
                           "(polling) instead; deploy from a config (`serve deploy`, the RayService) to pin versions")
    body = {"applications": [copy.deepcopy(app["deployed_app_config"]) for app in apps.values()]}
    body.update({k: details[k] for k in DEPLOY_KEYS if details.get(k) is not None})
    return body


def pin_version(config: dict, model_name: str, version: str) -> str:
    """Set `user_config.model_version` of the Responder deployment of the one application serving
    `model_name` (its args.model_name) in a `serve deploy` body; the application's name."""
    apps = config["applications"]
    matches = [a for a in apps if (a.get("args") or {}).get("model_name") == model_name]
    if len(matches) != 1:
        serving = {a["name"]: (a.get("args") or {}).get("model_name") for a in apps}
        raise RolloutError(f"{len(matches)} running application(s) serve model {model_name!r} "
                           f"(application: model_name = {serving}); expected exactly one")
    app = matches[0]
    deployments = app.setdefault("deployments", [])
    deployment = next((d for d in deployments if d.get("name") == DEPLOYMENT), None)
    if deployment is None:
        deployment = {"name": DEPLOYMENT}
        deployments.append(deployment)
    user_config = {**(deployment.get("user_config") or {}), "model_version": str(version)}
    RolloutConfig.model_validate(user_config)  # what the replicas will accept
    deployment["user_config"] = user_config
    return app["name"]


def apply_version(model_name: str, version: str, address: str | None = None,
                  log: Callable[[str], None] = print) -> str:
    """Pin `version` in the running application serving `model_name`; the application's name."""
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient  # Ray: only for --apply

    address = dashboard_address(address)
    client = ServeSubmissionClient(address)
    config = running_config(client.get_serve_details())
    app = pin_version(config, model_name, version)
    client.deploy_applications(config)
    log(f"applied: application {app!r} at {address} pins {model_name} version {version} "
        "(user_config.model_version); its replicas load it in place and keep the old one if it fails "
        "(see GET /v1/model)")
    return app
