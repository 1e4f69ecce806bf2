"""The Ray Serve application: a FastAPI ingress over a batched Responder loaded from the MLflow registry.

    serve deploy cluster/configs/serve/responders.yaml  (import_path services.app:build_app, args below)
    edp serve --app escm --alias champion                (local Ray, HTTP on 127.0.0.1, under /escm)

One deployment, `Responder`, whose `user_config` (services/rollout.py: RolloutConfig) names what it serves;
Serve passes it to `reconfigure()` after __init__ and whenever it changes, without restarting replicas.
Each replica
- loads the champion (`model_version` pinned in user_config, else `models:/<model_name>@<model_alias>`)
  through services/registry.py and warms it up; a version that fails to load leaves the old one serving
  and is reported by /v1/model (`load_error`) and edp_model_load_failures_total;
- polls the alias every `poll_interval_s` (the local default: promote, and replicas follow); when it moves,
  loads the new version beside the old one and then switches one reference, so requests in flight finish
  on the old version and none fails (hot swap);
- optionally serves a `challenger` beside it (shadow or split traffic: services/challenger.py);
- answers POST /v1/respond through `@serve.batch` into `Responder.respond` (one padded batch per call and
  role);
- validates before it works: 401 (auth on, bad/missing token), 413 (body over `max_body_bytes`, checked
  from Content-Length and from the bytes actually read, before parsing), 400 (not JSON), 422 (schema,
  naming the field path), 503 (no model loaded yet); anything unexpected is a 500 JSON, never a crash;
- exports the metrics of services/replica_metrics.py through Ray's metrics agent.
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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import Field, ValidationError
from ray import serve
from ray.serve import Application

from services import registry
from services.challenger import Answer, Model, Router
from services.replica_metrics import replica_metrics
from services.rollout import CHALLENGER, CHAMPION, Loaded, LoadFailed, RolloutConfig, Slot, refresh_slot, targets
from services.schemas import (
    DEFAULT_MAX_TURN_CHARS,
    DEFAULT_MAX_TURNS,
    ChallengerStatus,
    ErrorResponse,
    FieldError,
    LoadError,
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
    "user_config": {},  # always set, so Serve always calls reconfigure(): that is where a replica loads
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


def _load_error(slot: Slot) -> LoadError | None:
    """A slot's LoadFailure for /v1/model (defined before the class: Serve's ingress copies the route
    functions with the module globals of that moment)."""
    f = slot.failure
    return None if f is None else LoadError(version=f.version, error=f.error, at=f.at)



@serve.deployment(name="Responder", **DEPLOYMENT_DEFAULTS)
@serve.ingress(api)
class ResponderDeployment:
    def __init__(self, args: dict):
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm in replica logs
        self.args = AppArgs.model_validate(args)
        self.tracking_uri = self.args.tracking_uri()
        self.token = self.args.auth_token()
        self.metrics = replica_metrics()
        self.rollout = RolloutConfig()
        self.slots = {CHAMPION: Slot(CHAMPION), CHALLENGER: Slot(CHALLENGER)}
        self.router = Router(self.metrics)
        self._swap_lock = threading.Lock()
        for batch in (self._champion_batch, self._challenger_batch):
            batch.set_max_batch_size(self.args.max_batch_size)
            batch.set_batch_wait_timeout_s(self.args.batch_wait_timeout_s)
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- model lifecycle (services/rollout.py) -------------------------------------------------

    async def reconfigure(self, user_config: dict | None) -> None:
        """Serve calls this after __init__ (the deployment always has a user_config) and on every change of
        the config's `user_config`, in place: load what it names (a version that fails to load leaves the
        old one serving), then keep polling the aliases."""
        try:
            cfg = RolloutConfig.model_validate(user_config or {})
        except ValidationError as e:
            raise ValueError(f"invalid user_config of the Responder deployment: {e}") from e
        try:
            await asyncio.to_thread(self._retarget, cfg)  # off the event loop: requests go on meanwhile
        except Exception as e:  # noqa: BLE001 - keep serving what we have; the poll loop retries
            logger.warning("rollout to %s of %s: %s", self.slots[CHAMPION].target, self.args.model_name, e)
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll_loop, name="edp-registry-poll", daemon=True)
            self._poller.start()

    def _retarget(self, cfg: RolloutConfig) -> None:
        with self._swap_lock:  # the poll thread may be loading: wait for it
            self.rollout = cfg
            for role, target in targets(cfg, self.args.model_alias).items():
                self.slots[role].target = target
            self.router.config = cfg.challenger
        self.refresh()

    def refresh(self) -> None:
        """Bring the champion, then the challenger, to their targets; raises when the champion's lookup or
        load failed (the challenger never raises: without it the champion answers everything)."""
        with self._swap_lock:
            c = registry.client(self.tracking_uri)
            champion, challenger = self.slots[CHAMPION], self.slots[CHALLENGER]
            try:
                self._refresh(c, champion, [challenger])  # first: a promoted challenger is taken over as loaded
            finally:
                self._refresh_challenger(c, challenger, champion)

    def _refresh_challenger(self, c, challenger: Slot, champion: Slot) -> None:
        try:
            if challenger.target is None:
                self._drop(challenger, "no challenger configured")
            else:
                self._refresh(c, challenger, [champion])
        except registry.RegistryError as e:  # its alias was removed (promoted, or never set)
            self._drop(challenger, str(e))
        except Exception as e:  # noqa: BLE001
            logger.warning("challenger of %s: %s", self.args.model_name, e)

    def _refresh(self, c, slot: Slot, others: list[Slot]) -> None:
        name, old = self.args.model_name, slot.loaded
        try:
            switched = refresh_slot(slot, lambda t: registry.lookup(c, name, t.alias, t.version),
                                    lambda mv: self._load(c, mv, slot.target.alias), others)
        except LoadFailed:
            self.metrics.load_failed(name, slot.role, slot.failure.version)
            raise
        if switched:
            self.metrics.serving(name, slot.role, slot.loaded.version, old.version if old else None)
            logger.info("%s: serving %s v%s (%s, run %s), loaded in %.1f s%s", slot.role, name, slot.loaded.version,
                        slot.target, slot.loaded.resolved.run_id, slot.loaded.load_s,
                        f"; replaced v{old.version}" if old else "")

    def _load(self, c, mv, alias: str | None) -> Loaded:
        """Download, load and warm up a version beside the served one; its files are removed once in memory."""
        t0 = time.perf_counter()
        resolved = registry.download(c, self.tracking_uri, mv, alias)
        try:
            responder = registry.load_responder(resolved, self.args.device)
        finally:
            registry.discard(resolved)
        return Loaded(responder, resolved, time.time(), time.perf_counter() - t0)

    def _drop(self, slot: Slot, why: str) -> None:
        old, slot.loaded, slot.failure = slot.loaded, None, None
        if old is not None:
            self.metrics.serving(self.args.model_name, slot.role, None, old.version)
            logger.info("%s v%s no longer served: %s", slot.role, old.version, why)

    def _poll_loop(self) -> None:
        """Check the targets on `next_poll_delay`'s schedule; re-mark the served versions every GAUGE_TICK_S."""
        failures = 0
        serving = lambda: self.slots[CHAMPION].loaded is not None  # noqa: E731
        next_poll = time.monotonic() + next_poll_delay(0, self.args.poll_interval_s, serving())
        next_mark = time.monotonic()
        while not self._stop.wait(max(0.0, min(next_poll, next_mark) - time.monotonic())):
            if time.monotonic() >= next_poll:
                try:
                    self.refresh()
                    failures = 0
                except Exception as e:  # noqa: BLE001 - registry hiccup or broken version: keep serving
                    failures += 1
                    logger.warning("registry poll %d for %s (%s) failed: %s", failures, self.args.model_name,
                                   self.slots[CHAMPION].target, e)
                next_poll = time.monotonic() + next_poll_delay(failures, self.args.poll_interval_s, serving())
            if time.monotonic() >= next_mark:
                next_mark = time.monotonic() + GAUGE_TICK_S
                for slot in list(self.slots.values()):
                    loaded = slot.loaded
                    if loaded is not None:
                        self.metrics.serving(loaded.resolved.name, slot.role, loaded.version)

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()

    # ---- batched prediction: one queue per role ------------------------------------------------

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _champion_batch(self, requests: list[dict]) -> list[Answer | Exception]:
        return await self._generate(self.slots[CHAMPION], requests)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.05)
    async def _challenger_batch(self, requests: list[dict]) -> list[Answer | Exception]:
        return await self._generate(self.slots[CHALLENGER], requests)

    async def _generate(self, slot: Slot, requests: list[dict]) -> list[Answer | Exception]:
        """One Responder.respond call for the whole batch, on the slot's version when the batch starts."""
        loaded = slot.loaded
        if loaded is None:
            return [ApiError(503, f"no {slot.role} model loaded")] * len(requests)
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

    def _model(self, role: str) -> Model | None:
        """The role's model for one request (None when it serves nothing)."""
        loaded = self.slots[role].loaded
        if loaded is None:
            return None
        batch = self._champion_batch if role == CHAMPION else self._challenger_batch

        async def call(request: dict) -> Answer:
            result = await batch(request)
            if isinstance(result, Exception):
                raise result
            return result
        return Model(role, loaded, call)

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
        header = self.rollout.challenger.client_key_header if self.rollout.challenger else "x-client-id"
        return request.headers.get(header) or (request.client.host if request.client else "")

    @api.post("/v1/respond", response_model=RespondResponse, responses=ERRORS, openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": RespondRequest.model_json_schema(ref_template="#/components/schemas/{model}")}}}})
    async def respond(self, request: Request) -> RespondResponse:
        """An empathetic response, the emotion it read and the evidence, for a dialogue context."""
        self._authorize(request)
        body = await read_body(request, self.args.max_body_bytes)
        req = parse_request(body, self.args.max_turns, self.args.max_turn_chars)
        champion = self._model(CHAMPION)
        if champion is None:
            raise ApiError(503, f"no model loaded yet (waiting for {self.args.model_name} "
                                f"{self.slots[CHAMPION].target})", headers={"Retry-After": "5"})
        try:
            answer, loaded = await self.router.answer({"context": req.context, "situation": req.situation},
                                                      self._client_key(request), champion,
                                                      self._model(CHALLENGER))
        except ApiError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ApiError(500, f"generation failed: {type(e).__name__}: {e}") from e
        return RespondResponse(response=answer["response"], emotion=answer["emotion"],
                               emotion_top=answer["emotion_top"], evidence=answer["evidence"],
                               model=loaded.info())

    @api.get("/healthz", responses={503: ERRORS[503]})
    async def healthz(self) -> dict:
        """200 when a model is loaded (readiness), 503 before."""
        loaded = self.slots[CHAMPION].loaded
        if loaded is None:
            raise ApiError(503, "no model loaded yet")
        return {"status": "ok", "model": loaded.info().model_dump()}

    @api.get("/v1/model", response_model=ModelStatus, responses={401: ERRORS[401], 503: ERRORS[503]})
    async def model(self, request: Request) -> ModelStatus:
        """The registered version this replica serves, what it was told to serve, and the challenger."""
        self._authorize(request)
        champion = self.slots[CHAMPION]
        loaded = champion.loaded
        if loaded is None:
            failure = champion.failure
            raise ApiError(503, "no model loaded yet" + (f": version {failure.version} failed to load: "
                                                         f"{failure.error}" if failure else ""))
        r = loaded.resolved
        return ModelStatus(name=r.name, alias=champion.target.alias, version=r.version, run_id=r.run_id,
                           source=r.source, model_type=loaded.responder.model_name,
                           loaded_at=loaded.loaded_at, load_s=round(loaded.load_s, 3),
                           max_batch_size=self.args.max_batch_size,
                           batch_wait_timeout_s=self.args.batch_wait_timeout_s, target=str(champion.target),
                           load_error=_load_error(champion), challenger=self._challenger_status())

    def _challenger_status(self) -> ChallengerStatus | None:
        cfg, slot = self.rollout.challenger, self.slots[CHALLENGER]
        if cfg is None:
            return None
        info = slot.loaded.info() if slot.loaded else None
        return ChallengerStatus(mode=cfg.mode, share=cfg.share, target=str(slot.target), model=info,
                                load_error=_load_error(slot))


def make_app(args: dict, **deployment_options: Any) -> Application:
    """The application with `deployment_options` (autoscaling_config, ray_actor_options, ...) applied."""
    validated = AppArgs.model_validate(args)  # fail on the driver, naming the field, not in a replica
    RolloutConfig.model_validate(deployment_options.get("user_config") or {})
    deployment = ResponderDeployment.options(**deployment_options) if deployment_options else \
        ResponderDeployment
    return deployment.bind(validated.model_dump())


def build_app(args: dict) -> Application:
    """Serve config entry point (`import_path: services.app:build_app`)."""
    return make_app(dict(args or {}))
