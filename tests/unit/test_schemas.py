"""Request/response schemas and the HTTP layer's parsing: each bad input names its field; configs validate."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from services.schemas import ModelInfo, RespondRequest, RespondResponse, field_errors, field_path

REPO = Path(__file__).resolve().parents[2]
LIMITS = {"max_turns": 3, "max_turn_chars": 20}


def errors(obj, context=LIMITS) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as e:
        RespondRequest.model_validate(obj, context=context)
    return [(f.field, f.message) for f in field_errors(e.value)]


def test_valid_request_and_defaults():
    req = RespondRequest.model_validate({"context": ["I got the job!", "Congrats!"]}, context=LIMITS)
    assert req.context == ["I got the job!", "Congrats!"] and req.situation is None
    req = RespondRequest.model_validate({"context": ["hi"], "situation": "new job"})
    assert req.situation == "new job"


@pytest.mark.parametrize("obj, field, message", [
    ({}, "context", "Field required"),
    ({"context": []}, "context", "at least 1 item"),
    ({"context": "hello"}, "context", "valid list"),
    ({"context": ["ok", ""]}, "context[1]", "must not be empty"),
    ({"context": ["ok", " \n\t"]}, "context[1]", "must not be empty"),
    ({"context": ["ok", 7]}, "context[1]", "valid string"),           # strict: no coercion to "7"
    ({"context": [None]}, "context[0]", "valid string"),
    ({"context": ["a", "b", "c", "d"]}, "context", "too many turns: 4 > max_turns=3"),
    ({"context": ["x" * 21]}, "context[0]", "too long: 21 > max_turn_chars=20"),
    ({"context": ["ok"], "situation": 5}, "situation", "valid string"),
    ({"context": ["ok"], "situation": ""}, "situation", "must not be empty"),
    ({"context": ["ok"], "situation": "y" * 21}, "situation", "too long"),
    ({"context": ["ok"], "situaton": "typo"}, "situaton", "unknown field"),
])
def test_each_bad_input_names_its_field(obj, field, message):
    found = errors(obj)
    assert any(f == field and message in m for f, m in found), found


def test_limits_default_without_context():
    RespondRequest.model_validate({"context": ["x" * 1000] * 16})
    assert errors({"context": ["x"] * 17}, context=None)[0][0] == "context"


def test_field_path_and_response_shape():
    assert field_path(("context", 2)) == "context[2]" and field_path(()) == "body"
    assert field_path(("a", "b", 0, "c")) == "a.b[0].c"
    resp = RespondResponse(response="Oh no.", emotion="sad", emotion_top=[{"label": "sad", "prob": 0.5}],
                           evidence=[{"pair": ["lost", "keys"], "weight": 0.2}],
                           model=ModelInfo(name="escm", version="3", run_id="abc"))
    assert set(resp.model_dump()) == {"response", "emotion", "emotion_top", "evidence", "screened", "screen",
                                      "model"}
    assert (resp.screened, resp.screen) == (False, None)
    with pytest.raises(ValidationError):
        RespondResponse(response="x", emotion_top=[{"label": "sad", "prob": 1.5}], model=resp.model)
    with pytest.raises(ValidationError, match="model"):      # required: null only when said (a screened answer)
        RespondResponse(response="x")
    for example in RespondResponse.model_config["json_schema_extra"]["examples"]:   # the OpenAPI examples
        assert RespondResponse.model_validate(example).model_dump() == example


# ---- the HTTP layer's parsing (no Ray needed) ----

def test_parse_request_maps_failures_to_status_codes():
    from services.app import ApiError, parse_request

    assert parse_request(b'{"context": ["hi"]}', 3, 20).context == ["hi"]
    for body, status, text in [(b"not json", 400, "invalid JSON"), (b'{"context": ["hi"', 400, "line 1"),
                               (b"\xff\xfe{}", 400, "UTF-8"), (b"[1, 2]", 422, "JSON object"),
                               (b'{"context": ["a", ""]}', 422, "context[1]"),
                               (b'{"context": ["hi"], "extra": 1}', 422, "extra: unknown field")]:
        with pytest.raises(ApiError) as e:
            parse_request(body, 3, 20)
        assert e.value.status == status and text in e.value.error, (body, e.value.error)


def _request(chunks: list[bytes], headers: dict[str, str]):
    from starlette.requests import Request

    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
             for i, c in enumerate(chunks)]

    async def receive():
        return queue.pop(0)

    scope = {"type": "http", "method": "POST", "path": "/v1/respond", "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive)


def test_read_body_rejects_oversized_bodies_before_parsing():
    from services.app import ApiError, read_body

    ok = asyncio.run(read_body(_request([b"{}", b"  "], {"content-length": "4"}), 10))
    assert ok == b"{}  "
    with pytest.raises(ApiError) as e:       # declared too large: refused without reading
        asyncio.run(read_body(_request([b"x"], {"content-length": "11"}), 10))
    assert e.value.status == 413 and "Content-Length 11" in e.value.error
    with pytest.raises(ApiError) as e:       # no Content-Length (chunked): refused once 10 bytes are exceeded
        asyncio.run(read_body(_request([b"x" * 6, b"x" * 6, b"never read"], {}), 10))
    assert e.value.status == 413
    with pytest.raises(ApiError) as e:
        asyncio.run(read_body(_request([b"x"], {"content-length": "-1"}), 10))
    assert e.value.status == 400


# ---- the Serve configs feed build_app ----

SERVE_CONFIG = REPO / "cluster" / "configs" / "serve" / "responders.yaml"
SERVE_APPS = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]


@pytest.mark.parametrize("app", SERVE_APPS, ids=lambda a: a["name"])
def test_serve_config_apps_args_are_build_app_args(app):
    from services.app import AppArgs, build_app

    assert app["import_path"] == "services.app:build_app"
    args = AppArgs.model_validate(app["args"])
    assert args.model_name == app["name"] and args.model_alias == "champion"
    assert app["route_prefix"] == f"/{app['name']}"
    assert [d["name"] for d in app["deployments"]] == ["Responder"]  # the deployment build_app creates
    from services.replica import RolloutConfig

    rollout = RolloutConfig.model_validate(app["deployments"][0]["user_config"])  # what reconfigure() takes
    assert rollout.model_version is None and rollout.challenger is None        # follow the alias by default
    assert build_app(app["args"]) is not None
    with pytest.raises(ValidationError, match="max_batch_size"):
        build_app({**app["args"], "max_batch_size": 0})
    with pytest.raises(ValidationError, match="model_nmae"):
        build_app({**app["args"], "model_nmae": "x"})
    assert args.crisis_screen.enabled                                        # the crisis screen is on
    with pytest.raises(ValidationError, match=r"crisis_screen\.patterns"):
        build_app({**app["args"], "crisis_screen": {"patterns": ["[unclosed"]}})


def test_app_args_auth_and_tracking_uri(monkeypatch):
    from services.app import AppArgs

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_TRACKING_URI"):
        AppArgs().tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert AppArgs().tracking_uri() == "http://127.0.0.1:5000"
    assert AppArgs(mlflow_tracking_uri="http://x:1").tracking_uri() == "http://x:1"
    assert AppArgs().auth_token() is None
    with pytest.raises(ValueError, match="EDP_TOKEN_FOR_TEST"):
        AppArgs(auth_token_env="EDP_TOKEN_FOR_TEST").auth_token()
    monkeypatch.setenv("EDP_TOKEN_FOR_TEST", "s3cret")
    assert AppArgs(auth_token_env="EDP_TOKEN_FOR_TEST").auth_token() == "s3cret"
    assert json.loads(AppArgs().model_dump_json())["poll_interval_s"] > 0


def test_local_serve_spec_from_the_serve_config():
    from cluster.local.serve import from_config

    overrides = {"max_batch_size": 1, "mlflow_tracking_uri": None}
    spec = from_config(SERVE_CONFIG, "my-model", "challenger", overrides, app="iamm")
    assert spec.app_name == "iamm" and spec.route_prefix == "/iamm" and spec.port == 8000
    assert spec.args["model_name"] == "my-model" and spec.args["model_alias"] == "challenger"
    assert spec.args["max_batch_size"] == 1
    assert spec.deployment_options["autoscaling_config"]["min_replicas"] == 1
    assert "name" not in spec.deployment_options
    with pytest.raises(ValidationError, match="poll_interval_s"):
        from_config(SERVE_CONFIG, "m", "champion", {"poll_interval_s": 0})


def test_local_serve_picks_the_application_by_name_then_by_model():
    from cluster.local.serve import from_config
    from trainers.config import ConfigError

    assert from_config(SERVE_CONFIG, "iamm").route_prefix == "/iamm"       # the app serving that model
    assert from_config(SERVE_CONFIG, "my-model").app_name == "escm"        # none does: the first
    assert from_config(None, app="iamm").args["model_name"] == "iamm"      # the default file
    with pytest.raises(ConfigError, match=r"no application 'mime' \(it has: escm, iamm\)"):
        from_config(SERVE_CONFIG, app="mime")


def test_deploy_config_is_one_application_of_the_file_for_this_machine():
    from ray.serve.schema import ServeDeploySchema

    from cluster.local.serve import deploy_config
    from trainers.config import ConfigError

    config = deploy_config("iamm", {"model_name": "edp-demo"}, 8123, SERVE_CONFIG,
                           deployment={"num_replicas": 2, "autoscaling_config": None}, proxy_location="HeadOnly")
    (app,) = ServeDeploySchema.model_validate(config).applications   # what `serve deploy` accepts
    assert (app.name, app.route_prefix, app.args["model_name"]) == ("iamm", "/iamm", "edp-demo")
    assert app.args["max_batch_size"] == 32                            # the file's other args stay
    (deployment,) = app.deployments
    assert deployment.num_replicas == 2 and deployment.autoscaling_config is None  # set: replaces the code's
    assert config["http_options"] == {"host": "127.0.0.1", "port": 8123} and config["proxy_location"] == "HeadOnly"
    assert deploy_config("escm", {}, 8000, SERVE_CONFIG)["proxy_location"] == "EveryNode"  # the file's
    with pytest.raises(ConfigError, match="no application 'nope'"):
        deploy_config("nope", {}, 8000, SERVE_CONFIG)


# ---- the pyfunc model's signature and validation are the HTTP schema's ----


def test_pyfunc_signature_and_validation_come_from_the_http_schema():
    import pandas as pd
    from mlflow.types.schema import AnyType, Array, DataType, Object, Property

    from services.pyfunc_model import INPUT_EXAMPLE, SIGNATURE, _requests
    from services.schemas import RespondResponse

    assert {c.name: (c.type, c.required) for c in SIGNATURE.inputs.inputs} == {
        "context": (Array(DataType.string), True), "situation": (DataType.string, False)}
    outputs = {c.name: (c.type, c.required) for c in SIGNATURE.outputs.inputs}
    assert outputs == {"response": (DataType.string, True), "emotion": (DataType.string, False),
                       "emotion_top": (Array(Object([Property("label", DataType.string),
                                                     Property("prob", DataType.double)])), True),
                       "evidence": (Array(AnyType()), True), "screened": (DataType.boolean, True),
                       "screen": (DataType.string, False)}
    assert set(outputs) == set(RespondResponse.model_fields) - {"model"}
    assert [r.model_dump() for r in _requests(INPUT_EXAMPLE)] == INPUT_EXAMPLE
    frame = pd.DataFrame({"context": [["I lost my keys."]], "situation": [float("nan")]})
    assert [(r.context, r.situation) for r in _requests(frame)] == [(["I lost my keys."], None)]
    with pytest.raises(ValueError, match=r"request 1: context\[0\]: must not be empty"):
        _requests([{"context": ["hi"]}, {"context": ["  "]}])
    with pytest.raises(ValueError, match="request 0: context: List should have at least 1 item"):
        _requests({"context": []})
