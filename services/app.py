"""The Ray Serve application: routes and HTTP errors over a Replica (services/replica.py) of the Responder.

    serve deploy cluster/configs/serve/responders.yaml  (import_path services.app:build_app, args below)
    edp serve --app escm --alias champion                (local Ray, HTTP on 127.0.0.1, under /escm)

One deployment, `Responder`, whose `user_config` (services/replica.py: RolloutConfig) names what it serves;
Serve passes it to `reconfigure()` after __init__ and whenever it changes, without restarting replicas.
This module is the Ray and HTTP side only:
- the FastAPI ingress: POST /v1/respond, GET /v1/model, GET /healthz;
- validation before work: 401 (auth on, bad/missing token), 413 (body over `max_body_bytes`, checked from
  Content-Length and from the bytes actually read, before parsing), 400 (not JSON), 422 (schema,
  services/schemas.py, naming the field path), 503 (no model loaded yet); anything unexpected is a 500
  JSON, never a crash;
- the crisis screen (services/safety.py, `args.crisis_screen`), handed to the Replica, which applies it;
- the two `@serve.batch` queues (champion, challenger), each one `Replica.generate` call per batch;
- the registry wiring: the Replica gets services/registry.py's lookup and load as callables (or, with
  args.model_dir, a StaticSource: one local bundle directory, no MLflow);
- request latency by route (services/replica_metrics.py, exported through Ray's metrics agent).
The Replica (plain Python) holds the rest: the loaded versions, the hot swap, the alias poller and the
challenger routing (shadow or split traffic).

A request's path: app -> schemas -> replica -> trainers/inference.py (Responder) ->
trainers/data/collate.py (encode_requests) -> the model -> trainers/decoding.py.
"""

# no `from __future__ import annotations`: Serve's ingress rebuilds the route functions, and FastAPI
# must see real classes (Request, the response models), not strings, in their signatures.
import hmac
import json
import logging
import os
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from ray import serve
from ray.serve import Application

from services import registry
from services.replica import (
    CHALLENGER,
    CHAMPION,
    GenerationFailed,
    Loaded,
    NoModel,
    NotServing,
    Replica,
    RolloutConfig,
    Routed,
    StaticSource,
)
from services.replica_metrics import replica_metrics
from services.safety import CrisisScreen, CrisisScreenConfig
from services.schemas import (
    DEFAULT_MAX_TURN_CHARS,
    DEFAULT_MAX_TURNS,
    ErrorResponse,
    FieldError,
    ModelStatus,
    RespondRequest,
    RespondResponse,
    field_errors,
)
from trainers.config import StrictModel
from trainers.inference import Request as ModelRequest

logger = logging.getLogger("ray.serve")

DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 64,  # >= max_batch_size, or batches never fill
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16,
                           "upscale_delay_s": 5, "look_back_period_s": 15, "downscale_delay_s": 60},
    "ray_actor_options": {"num_cpus": 1},
    "user_config": {},  # always set, so Serve always calls reconfigure(): that is where a replica loads
}
ROUTES = ("/v1/respond", "/v1/model", "/healthz", "/openapi.json", "/docs")


class AppArgs(StrictModel):
    """`args` of an application in the Serve config (cluster/configs/serve/responders.yaml); unknown keys are errors."""

    model_name: str = Field("escm", min_length=1, description="registered model name")
    model_alias: str = Field("champion", min_length=1, description="alias to serve and follow")
    model_dir: str | None = Field(None, description="serve this local bundle directory (a released model, "
                                                    "`edp serve --model`) instead of the registry: no MLflow")
    mlflow_tracking_uri: str | None = Field(None, description="None: the MLFLOW_TRACKING_URI env var")
    max_batch_size: int = Field(32, ge=1, le=256, description="@serve.batch size (1 = batching off)")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=5, description="how long a batch waits to fill")
    poll_interval_s: float = Field(10.0, gt=0, description="how often a replica checks the alias")
    max_turns: int = Field(DEFAULT_MAX_TURNS, ge=1, le=256)
    max_turn_chars: int = Field(DEFAULT_MAX_TURN_CHARS, ge=1, le=100_000)
    max_body_bytes: int = Field(64 * 1024, ge=256, description="larger bodies get 413 before parsing")
    auth_token_env: str | None = Field(None, description="env var holding the bearer token; None = auth off")
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    crisis_screen: CrisisScreenConfig = Field(
        default_factory=CrisisScreenConfig,
        description="requests speaking of suicide or self-harm get a fixed supportive message (on by default)")

    def tracking_uri(self) -> str:
        uri = self.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("no MLflow tracking URI: set args.mlflow_tracking_uri or MLFLOW_TRACKING_URI")
        return uri

    def auth_token(self) -> str | None:
        if self.auth_token_env is None:
            return None
        token = os.environ.get(self.auth_token_env, "")
        if not token:
            raise ValueError(f"auth_token_env={self.auth_token_env!r} but that env var is unset or empty")
        return token


class ApiError(Exception):
    """An HTTP error answered as ErrorResponse JSON."""

    def __init__(self, status: int, error: str, detail: list[FieldError] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail or [], headers


# ------------------------------------------------------------------------------------------------
# HTTP layer

ERRORS = {code: {"model": ErrorResponse, "description": why} for code, why in (
    (400, "body is not valid JSON"), (401, "auth on and bearer token missing or wrong"),
    (413, "body larger than max_body_bytes"), (422, "schema error; `detail` names each field"),
    (503, "no model loaded yet"))}

api = FastAPI(title="Empathetic response generation", version="1.0",
              description="ESCM / IAMM responders served from the MLflow registry (models:/<name>@<alias>).")


def _route(request: Request) -> str:
    path = request.url.path.removeprefix(request.scope.get("root_path", "")) or "/"
    return path if path in ROUTES else "other"  # bounded label values


@api.middleware("http")
async def observe(request: Request, call_next):
    """Request latency by route and status; anything unexpected becomes a 500 JSON (the replica lives on)."""
    t0, status = time.perf_counter(), 500
    try:
        response = await call_next(request)
        status = response.status_code
        return response
    except Exception as e:  # noqa: BLE001 - the last line of defence
        logger.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(e).__name__}"}, status_code=500)
    finally:
        replica_metrics().request(_route(request), status, (time.perf_counter() - t0) * 1000)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError) -> JSONResponse:
    body = ErrorResponse(error=e.error, detail=e.detail).model_dump()
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refusing (413) more than `limit` bytes by Content-Length and by what actually arrives."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, f"invalid Content-Length header {declared!r}")
        if int(declared) > limit:
            raise ApiError(413, f"body too large: Content-Length {declared} > max_body_bytes={limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"body too large: more than max_body_bytes={limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_request(body: bytes, max_turns: int, max_turn_chars: int) -> RespondRequest:
    """JSON -> RespondRequest: 400 for bad JSON, 422 naming each bad field."""
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ApiError(400, f"invalid JSON: body is not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise ApiError(400, f"invalid JSON: {e.msg} at line {e.lineno} column {e.colno}") from e
    if not isinstance(obj, dict):
        raise ApiError(422, f"the body must be a JSON object, got {type(obj).__name__}",
                       [FieldError(field="body", message="expected an object")])
    try:
        limits = {"max_turns": max_turns, "max_turn_chars": max_turn_chars}
        return RespondRequest.model_validate(obj, context=limits)
    except ValidationError as e:
        errors = field_errors(e)
        raise ApiError(422, "invalid request: " + "; ".join(f"{f.field}: {f.message}" for f in errors),
                       errors) from e


# ------------------------------------------------------------------------------------------------
# The deployment


@serve.deployment(name="Responder", **DEPLOYMENT_DEFAULTS)
@serve.ingress(api)
class ResponderDeployment:
    def __init__(self, args: dict):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm in replica logs
        self.args = AppArgs.model_validate(args)
        self.token = self.args.auth_token()
        self.metrics = replica_metrics()
        name = self.args.model_name
        if self.args.model_dir:  # a released bundle directory: a fixed version, no registry
            source = StaticSource(self.args.model_dir, self.args.device)
            lookup, load = source.lookup, source.load
        else:
            self.tracking_uri = self.args.tracking_uri()
            lookup = lambda t: registry.lookup(registry.client(self.tracking_uri), name, t.alias,  # noqa: E731
                                               t.version)
            load = self._load
        self.replica = Replica(name, self.args.model_alias, self.args.poll_interval_s, lookup=lookup, load=load,
                               metrics=self.metrics,
                               queues={CHAMPION: self._champion_batch, CHALLENGER: self._challenger_batch},
                               screen=CrisisScreen(self.args.crisis_screen))
        for batch in (self._champion_batch, self._challenger_batch):
            batch.set_max_batch_size(self.args.max_batch_size)
            batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)

    async def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this after __init__ (the deployment always has a user_config) and on every change of
        the config's `user_config`, in place: the Replica loads what it names and keeps polling the aliases."""
        await self.replica.reconfigure(user_config)

    def _load(self, mv, alias: str | None) -> Loaded:
        """Download, load and warm up a version beside the served one; its files are removed once in memory."""
        t0 = time.perf_counter()
        resolved = registry.download(registry.client(self.tracking_uri), self.tracking_uri, mv, alias)
        try:
            responder = registry.load_responder(resolved, self.args.device)
        finally:
            registry.discard(resolved)
        return Loaded(responder, resolved, time.time(), time.perf_counter() - t0)

    def __del__(self):
        if hasattr(self, "replica"):
            self.replica.stop()

    # ---- batched prediction: one queue per role ------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _champion_batch(self, requests: list[ModelRequest]) -> list[Routed | Exception]:
        return await self.replica.generate(CHAMPION, requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _challenger_batch(self, requests: list[ModelRequest]) -> list[Routed | Exception]:
        return await self.replica.generate(CHALLENGER, requests)

    # ---- routes ------------------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        if self.token is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing bearer token (Authorization: Bearer <token>)",
                           headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(token.strip().encode(), self.token.encode()):
            raise ApiError(401, "invalid bearer token", headers={"WWW-Authenticate": "Bearer"})

    def _client_key(self, request: Request) -> str:
        """Who is asking, for sticky splits: the configured header, else the client's address."""
        return request.headers.get(self.replica.client_key_header) or (request.client.host if request.client
                                                                       else "")

    @api.post("/v1/respond", response_model=RespondResponse, responses=ERRORS, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": RespondRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def respond(self, request: Request) -> RespondResponse:
        """An empathetic response, the emotion it read and the evidence, for a dialogue context."""
        self._authorize(request)
        body = await read_body(request, self.args.max_body_bytes)
        req = parse_request(body, self.args.max_turns, self.args.max_turn_chars)
        try:
            routed = await self.replica.answer(ModelRequest(req.context, req.situation), self._client_key(request))
        except NotServing as e:
            raise ApiError(503, str(e), headers={"Retry-After": "5"}) from e
        except NoModel as e:
            raise ApiError(503, str(e)) from e
        except GenerationFailed as e:
            raise ApiError(500, str(e)) from e
        except Exception as e:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from e
        model = routed.loaded.info() if routed.loaded is not None else None  # None: the crisis screen answered
        return RespondResponse(**routed.answer.body(), model=model)

    @api.get("/healthz", responses={503: ERRORS[503]})
    async def healthz(self) -> dict:
        """200 when a model is loaded (readiness), 503 before."""
        loaded = self.replica.slots[CHAMPION].loaded
        if loaded is None:
            raise ApiError(503, "no model loaded yet")
        return {"status": "ok", "model": loaded.info().model_dump()}

    @api.get("/v1/model", response_model=ModelStatus, responses={401: ERRORS[401], 503: ERRORS[503]})
    async def model(self, request: Request) -> ModelStatus:
        """The registered version this replica serves, what it was told to serve, and the challenger."""
        self._authorize(request)
        try:
            return self.replica.status(self.args.max_batch_size, self.args.batch_wait_timeout_s)
        except NoModel as e:
            raise ApiError(503, str(e)) from e


def make_app(args: dict, **deployment_options: Any) -> Application:
    """The application with `deployment_options` (autoscaling_config, ray_actor_options, ...) applied."""
    validated = AppArgs.model_validate(args)  # fail on the driver, naming the field, not in a replica
    if validated.model_dir:
        registry.local_version(validated.model_dir)  # RegistryError: not a bundle, or not matching its card
    RolloutConfig.model_validate(deployment_options.get("user_config") or {})
    deployment = ResponderDeployment.options(**deployment_options) if deployment_options else \
        ResponderDeployment
    return deployment.bind(validated.model_dump())


def build_app(args: dict) -> Application:
    """Serve config entry point (`import_path: services.app:build_app`)."""
    return make_app(dict(args or {}))
