"""The Ray Serve application: a FastAPI ingress over a batched Responder loaded from the MLflow registry.

    serve deploy cluster/configs/serve/responders.yaml  (import_path services.app:build_app, args below)
    edp serve --app escm --alias champion                (local Ray, HTTP on 127.0.0.1, under /escm)

One deployment, `Responder`: each replica
- loads `models:/<model_name>@<model_alias>` once (services/registry.py) and warms it up;
- answers POST /v1/respond through `@serve.batch` into `Responder.respond` (one padded batch per call);
- polls the alias every `poll_interval_s`; when it moves, loads the new version beside the old one and then
  switches one reference, so requests in flight finish on the old version and none fails (hot swap);
- validates before it works: 401 (auth on, bad/missing token), 413 (body over `max_body_bytes`, checked
  from Content-Length and from the bytes actually read, before parsing), 400 (not JSON), 422 (schema,
  naming the field path), 503 (no model loaded yet); anything unexpected is a 500 JSON, never a crash;
- exports the metrics of services/metrics.py through Ray's metrics agent.
"""

# no `from __future__ import annotations`: Serve's ingress rebuilds the route functions, and FastAPI
# must see real classes (Request, the response models), not strings, in their signatures.
import asyncio
import hmac
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from ray import serve
from ray.serve import Application

from services import registry
from services.metrics import replica_metrics
from services.schemas import (
    DEFAULT_MAX_TURN_CHARS,
    DEFAULT_MAX_TURNS,
    ErrorResponse,
    FieldError,
    ModelInfo,
    ModelStatus,
    RespondRequest,
    RespondResponse,
    field_errors,
)
from trainers.config import StrictModel

logger = logging.getLogger("ray.serve")

DEPLOYMENT_DEFAULTS: dict[str, Any] = {
    "max_ongoing_requests": 64,  # >= max_batch_size, or batches never fill
    "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 16,
                           "upscale_delay_s": 5, "look_back_period_s": 15, "downscale_delay_s": 60},
    "ray_actor_options": {"num_cpus": 1},
}
GAUGE_TICK_S = 5.0  # Ray forgets a gauge not set for a while: re-mark the served version this often
ROUTES = ("/v1/respond", "/v1/model", "/healthz", "/openapi.json", "/docs")


class AppArgs(StrictModel):
    """`args` of an application in the Serve config (cluster/configs/serve/responders.yaml); unknown keys are errors."""

    model_name: str = Field("escm", min_length=1, description="registered model name")
    model_alias: str = Field("champion", min_length=1, description="alias to serve and follow")
    mlflow_tracking_uri: str | None = Field(None, description="None: the MLFLOW_TRACKING_URI env var")
    max_batch_size: int = Field(32, ge=1, le=256, description="@serve.batch size (1 = batching off)")
    batch_wait_timeout_s: float = Field(0.05, ge=0, le=5, description="how long a batch waits to fill")
    poll_interval_s: float = Field(10.0, gt=0, description="how often a replica checks the alias")
    max_turns: int = Field(DEFAULT_MAX_TURNS, ge=1, le=256)
    max_turn_chars: int = Field(DEFAULT_MAX_TURN_CHARS, ge=1, le=100_000)
    max_body_bytes: int = Field(64 * 1024, ge=256, description="larger bodies get 413 before parsing")
    auth_token_env: str | None = Field(None, description="env var holding the bearer token; None = auth off")
    device: str = Field("cpu", pattern=r"^(auto|cpu|cuda(:\d+)?)$")

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


def next_poll_delay(failures: int, poll_interval_s: float, serving: bool) -> float:
    """Seconds to a replica's next registry check. While it serves a model: every poll_interval_s. Before its
    first model loads (alias missing, registry down, artifact broken): a retry backoff of 1, 2, 4, ... s after
    `failures` failed checks, capped at poll_interval_s, so a model promoted late is picked up within about a
    second and a registry that is down is not hammered."""
    if serving:
        return poll_interval_s
    return min(poll_interval_s, 2.0 ** min(failures, 16))


class ApiError(Exception):
    """An HTTP error answered as ErrorResponse JSON."""

    def __init__(self, status: int, error: str, detail: list[FieldError] | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail or [], headers


@dataclass(frozen=True)
class Loaded:
    """One registered version, loaded and warmed up."""

    responder: Any                       # trainers.inference.Responder
    resolved: registry.ResolvedModel
    loaded_at: float
    load_s: float

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.resolved.name, version=self.resolved.version, run_id=self.resolved.run_id)


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
        self.tracking_uri = self.args.tracking_uri()
        self.token = self.args.auth_token()
        self.metrics = replica_metrics()
        self.loaded: Loaded | None = None
        self._swap_lock = threading.Lock()
        self._respond_batch.set_max_batch_size(self.args.max_batch_size)
        self._respond_batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        try:
            self.refresh()
        except Exception as e:  # noqa: BLE001 - serve 503 and keep polling until the alias exists
            logger.warning("no model yet (%s); answering 503 until models:/%s@%s loads",
                           e, self.args.model_name, self.args.model_alias)
        self._stop = threading.Event()
        threading.Thread(target=self._poll_loop, name="edp-registry-poll", daemon=True).start()

    # ---- model lifecycle ---------------------------------------------------------------------

    def refresh(self) -> bool:
        """Load the version the alias points at if it is not the one served; True when it swapped."""
        a = self.args
        with self._swap_lock:
            c = registry.client(self.tracking_uri)
            mv = registry.lookup(c, a.model_name, a.model_alias)  # one cheap call per poll
            old = self.loaded
            if old is not None and old.resolved.version == str(mv.version):
                return False
            t0 = time.perf_counter()
            resolved = registry.download(c, self.tracking_uri, mv, a.model_alias)  # the version just looked up
            try:
                responder = registry.load_responder(resolved, a.device)   # load + warm up beside the old one
            finally:
                registry.discard(resolved)  # all in memory now (or broken): no files left behind by replicas
            self.loaded = Loaded(responder, resolved, time.time(), time.perf_counter() - t0)  # the switch
            self.metrics.serving(a.model_name, resolved.version, old.resolved.version if old else None)
            logger.info("serving %s v%s (run %s), loaded in %.1f s%s", a.model_name, resolved.version,
                        resolved.run_id, self.loaded.load_s,
                        f"; replaced v{old.resolved.version}" if old else "")
            return True

    def _poll_loop(self) -> None:
        """Check the alias on `next_poll_delay`'s schedule; re-mark the served version every GAUGE_TICK_S."""
        failures = 0
        next_poll = time.monotonic() + next_poll_delay(0, self.args.poll_interval_s, self.loaded is not None)
        next_mark = time.monotonic()
        while not self._stop.wait(max(0.0, min(next_poll, next_mark) - time.monotonic())):
            if time.monotonic() >= next_poll:
                try:
                    self.refresh()
                    failures = 0
                except Exception as e:  # noqa: BLE001 - registry hiccup: keep serving what we have
                    failures += 1
                    logger.warning("registry poll %d for models:/%s@%s failed: %s", failures,
                                   self.args.model_name, self.args.model_alias, e)
                next_poll = time.monotonic() + next_poll_delay(failures, self.args.poll_interval_s,
                                                               self.loaded is not None)
            if time.monotonic() >= next_mark:
                next_mark = time.monotonic() + GAUGE_TICK_S
                loaded = self.loaded
                if loaded is not None:
                    self.metrics.serving(loaded.resolved.name, loaded.resolved.version)

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()

    # ---- batched prediction ------------------------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _respond_batch(self, requests: list[dict]) -> list[tuple[dict, Loaded] | Exception]:
        """One Responder.respond call for the whole batch, on the version loaded when the batch starts."""
        loaded = self.loaded
        if loaded is None:
            return [ApiError(503, "no model loaded")] * len(requests)
        t0 = time.perf_counter()
        try:
            answers: list = await asyncio.to_thread(loaded.responder.respond, requests)
        except Exception:  # noqa: BLE001 - isolate the request that broke the batch
            logger.exception("batch of %d failed; answering its requests one by one", len(requests))
            answers = [await asyncio.to_thread(self._respond_one, loaded, r) for r in requests]
        tokens = sum(a.get("tokens_generated", 0) for a in answers if isinstance(a, dict))
        self.metrics.batch(len(requests), (time.perf_counter() - t0) * 1000, tokens)
        return [a if isinstance(a, Exception) else (a, loaded) for a in answers]

    @staticmethod
    def _respond_one(loaded: Loaded, request: dict) -> dict | Exception:
        try:
            return loaded.responder.respond([request])[0]
        except Exception as e:  # noqa: BLE001
            return ApiError(500, f"generation failed: {type(e).__name__}: {e}")

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

    @api.post("/v1/respond", response_model=RespondResponse, responses=ERRORS, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": RespondRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def respond(self, request: Request) -> RespondResponse:
        """An empathetic response, the emotion it read and the evidence, for a dialogue context."""
        self._authorize(request)
        body = await read_body(request, self.args.max_body_bytes)
        req = parse_request(body, self.args.max_turns, self.args.max_turn_chars)
        if self.loaded is None:
            raise ApiError(503, f"no model loaded yet (waiting for models:/{self.args.model_name}"
                                f"@{self.args.model_alias})", headers={"Retry-After": "5"})
        result = await self._respond_batch({"context": req.context, "situation": req.situation})
        if isinstance(result, Exception):
            raise result if isinstance(result, ApiError) else ApiError(500, f"generation failed: {result}")
        answer, loaded = result
        return RespondResponse(response=answer["response"], emotion=answer["emotion"],
                               emotion_top=answer["emotion_top"], evidence=answer["evidence"],
                               model=loaded.info())

    @api.get("/healthz", responses={503: ERRORS[503]})
    async def healthz(self) -> dict:
        """200 when a model is loaded (readiness), 503 before."""
        loaded = self.loaded
        if loaded is None:
            raise ApiError(503, "no model loaded yet")
        return {"status": "ok", "model": loaded.info().model_dump()}

    @api.get("/v1/model", response_model=ModelStatus, responses={401: ERRORS[401], 503: ERRORS[503]})
    async def model(self, request: Request) -> ModelStatus:
        """The registered version this replica serves."""
        self._authorize(request)
        loaded = self.loaded
        if loaded is None:
            raise ApiError(503, "no model loaded yet")
        r = loaded.resolved
        return ModelStatus(name=r.name, alias=self.args.model_alias, version=r.version, run_id=r.run_id,
                           source=r.source, model_type=loaded.responder.model_name,
                           loaded_at=loaded.loaded_at,
                           load_s=round(loaded.load_s, 3), max_batch_size=self.args.max_batch_size,
                           batch_wait_timeout_s=self.args.batch_wait_timeout_s)


def make_app(args: dict, **deployment_options: Any) -> Application:
    """The application with `deployment_options` (autoscaling_config, ray_actor_options, ...) applied."""
    validated = AppArgs.model_validate(args)  # fail on the driver, naming the field, not in a replica
    deployment = ResponderDeployment.options(**deployment_options) if deployment_options else \
        ResponderDeployment
    return deployment.bind(validated.model_dump())


def build_app(args: dict) -> Application:
    """Serve config entry point (`import_path: services.app:build_app`)."""
    return make_app(dict(args or {}))
