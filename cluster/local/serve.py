"""`edp serve`: run one application of a Serve config file on a local Ray (HTTP on 127.0.0.1).

The config is the same file `serve deploy` and the chart's RayService use (cluster/configs/serve/responders.yaml,
the ESCM and IAMM applications under /escm and /iamm): the chosen application's route prefix, args and
deployment options (autoscaling, resources) apply; the command line picks the registered model and alias and,
locally, the host and port.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainers.config import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "serve" / "responders.yaml"


@dataclass
class LocalServe:
    app_name: str
    route_prefix: str
    args: dict[str, Any]
    deployment_options: dict[str, Any] = field(default_factory=dict)
    port: int = 8000


def from_config(path: Path | None, name: str | None = None, alias: str | None = None,
                overrides: dict[str, Any] | None = None, *, app: str | None = None) -> LocalServe:
    """Application args + deployment options of one application in a Serve config file: the one called `app`,
    else the one whose model_name is `name`, else the first. `name`, `alias` and `overrides` replace its args."""
    from services.app import AppArgs  # Ray Serve: not at `edp` start-up

    path = Path(path or DEFAULT_CONFIG)
    config = load(path)
    chosen = _application(config, path, app, name)
    args = dict(chosen.get("args") or {})
    args.update({k: v for k, v in {"model_name": name, "model_alias": alias, **(overrides or {})}.items()
                 if v is not None})
    AppArgs.model_validate(args)  # a bad value fails here, naming the field
    options = {k: v for k, v in (chosen.get("deployments") or [{}])[0].items() if k != "name"}
    port = (config.get("http_options") or {}).get("port") or 8000
    return LocalServe(chosen["name"], chosen.get("route_prefix") or "/", args, options, port)


def deploy_config(app: str, args: dict[str, Any], port: int, path: Path | None = None,
                  deployment: dict[str, Any] | None = None, proxy_location: str | None = None) -> dict[str, Any]:
    """The Serve config file (`serve deploy` schema) cut down to application `app`, its HTTP proxy on
    127.0.0.1:`port`: its args updated with `args`, its deployment's options with `deployment` (an option given as
    None overrides the code's default too, e.g. autoscaling_config None for a fixed num_replicas), and
    `proxy_location` when given (HeadOnly on a multi-node stack: its nodes share one machine, and so one port)."""
    path = Path(path or DEFAULT_CONFIG)
    config = load(path)
    chosen = _application(config, path, app, None)
    chosen = {**chosen, "args": {**chosen["args"], **args}}
    if deployment:
        (options,) = chosen["deployments"]
        chosen["deployments"] = [{**options, **deployment}]
    config.update(applications=[chosen], http_options={"host": "127.0.0.1", "port": port})
    if proxy_location:
        config["proxy_location"] = proxy_location
    return config


def load(path: Path) -> dict[str, Any]:
    """A Serve config file, checked against Serve's own `serve deploy` schema."""
    from ray.serve.schema import ServeDeploySchema  # Ray Serve: not at `edp` start-up

    config = yaml.safe_load(path.read_text())
    ServeDeploySchema.model_validate(config)
    return config


def _application(config: dict[str, Any], path: Path, app: str | None, name: str | None) -> dict[str, Any]:
    apps = config["applications"]
    if app is not None:
        found = [a for a in apps if a["name"] == app]
        if not found:
            raise ConfigError(f"{path}: no application {app!r} (it has: {', '.join(a['name'] for a in apps)})")
        return found[0]
    return next((a for a in apps if name and (a.get("args") or {}).get("model_name") == name), apps[0])


def run(spec: LocalServe, host: str = "127.0.0.1", port: int | None = None, address: str | None = None,
        metrics_port: int | None = None, num_cpus: int | None = None) -> str:
    """Start (or attach to) Ray, start Serve's HTTP proxy on host:port, deploy; returns the base URL."""
    import ray  # Ray: only when serving
    from ray import serve  # Ray: only when serving

    from services.app import make_app

    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, _metrics_export_port=metrics_port)
    port = port or spec.port
    serve.start(http_options={"host": host, "port": port})
    app = make_app(spec.args, **spec.deployment_options)
    serve.run(app, name=spec.app_name, route_prefix=spec.route_prefix)
    return f"http://{host}:{port}{spec.route_prefix.rstrip('/')}"


def replica_states(app_name: str, deployment: str = "Responder") -> dict[str, int]:
    """{state: count} of a running app's deployment, e.g. {"RUNNING": 2} ({} while the app is not listed)."""
    from ray import serve  # Ray: only when serving

    app = serve.status().applications.get(app_name)
    if app is None or deployment not in app.deployments:
        return {}
    states = app.deployments[deployment].replica_states
    return {str(getattr(k, "value", k)): n for k, n in states.items() if n}
