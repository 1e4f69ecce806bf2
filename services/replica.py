"""One Serve replica in plain Python: the versions it serves, how they change, and how a request reaches one.

services/app.py wraps a `Replica` in the Ray Serve deployment: it gives it the registry as two callables
(`lookup`: Target -> ModelVersion, `load`: ModelVersion -> Loaded, through services/registry.py), the two
`@serve.batch` queues (one per role) and a Recorder (services/replica_metrics.py). This module imports no
Ray, no FastAPI and no MLflow, so all of it is tested with fakes (tests/unit/test_rollout.py,
test_challenger.py).

Rollout. The deployment's `user_config` (RolloutConfig) says what to serve; Serve hands it to
`reconfigure()` on every replica, in place, whenever the Serve config changes (a RayService's
serveConfigV2, `serve deploy`, or `edp promote --apply`), without restarting them:

    user_config:
      model_version: "3"          # pin version 3 (rolls the replicas to it); null: follow the alias
      model_alias: null           # null: args.model_alias (polled every args.poll_interval_s)
      challenger: {alias: challenger, mode: shadow, share: 0.2}     # optional: challenger traffic below

Hot swap. A replica has one Slot per role (`champion`, and `challenger` when configured). `refresh_slot`
resolves the slot's Target (a pinned version, or an alias) and, when it names another version, loads it
beside the one served and then switches one reference (requests in flight finish on the old one). When the
new version fails to load the slot keeps serving the old one and records a LoadFailure (shown by
/v1/model and counted by edp_model_load_failures_total); the next poll tries again.

Poller. A thread checks the targets every `poll_interval_s` (`next_poll_delay`: a backoff of 1, 2, 4, ... s
while nothing is served yet) and re-marks the served versions every GAUGE_TICK_S.

Crisis screen. `Replica.answer` first asks the CrisisScreen (services/safety.py): a request it catches is answered
with the fixed message at once (counted by edp_crisis_screened_total), never queued, routed or generated, and is
answered even while no model is loaded.

Challenger traffic (`Router`):
    shadow  `share` of the requests are mirrored to the challenger once the champion has answered; the
            challenger's answer is recorded (metrics, agreement of its emotion with the champion's) and
            never returned, and whatever it does (slow, failing) never reaches the client.
    split   the clients whose key falls below `share` (`client_bucket`, sticky while the config holds) get
            the challenger's answer; when the challenger fails the champion answers instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import ConfigDict, Field, ValidationError

from services.registry import RegistryError
from services.safety import CrisisScreen
from services.schemas import ChallengerStatus, LoadError, ModelInfo, ModelStatus
from trainers.config import StrictModel

if TYPE_CHECKING:  # annotations only: importing the Responder (torch) is the loader's job, not this module's
    from services.registry import ResolvedModel
    from trainers.inference import Answer, Request, Responder

logger = logging.getLogger("ray.serve")

CHAMPION, CHALLENGER = "champion", "challenger"
GAUGE_TICK_S = 5.0  # Ray forgets a gauge not set for a while: re-mark the served version this often


# ------------------------------------------------------------------------------------------------
# What to serve: the deployment's user_config


class ChallengerConfig(StrictModel):
    """A second registered version served beside the champion, on a share of the traffic."""

    model_config = ConfigDict(coerce_numbers_to_str=True)  # `version: 3` in YAML means "3"

    alias: str = Field(CHALLENGER, min_length=1, description="alias of the challenger version (polled)")
    version: str | None = Field(None, pattern=r"^\d+$", description="pin a version instead of the alias")
    mode: Literal["shadow", "split"] = Field(
        "shadow", description="shadow: mirror `share` of requests, answers recorded never returned; "
                              "split: answer `share` of the clients (sticky per client key)")
    share: float = Field(0.1, ge=0, le=1, description="fraction of requests (shadow) or client keys (split)")
    client_key_header: str = Field("x-client-id", min_length=1,
                                   description="header naming the client for sticky splits (else its address)")


class RolloutConfig(StrictModel):
    """The deployment's `user_config`; unknown keys are errors."""

    model_config = ConfigDict(coerce_numbers_to_str=True)

    model_version: str | None = Field(None, pattern=r"^\d+$",
                                      description="pin this registered version; null: follow the alias")
    model_alias: str | None = Field(None, min_length=1, description="alias to follow; null: args.model_alias")
    challenger: ChallengerConfig | None = None


@dataclass(frozen=True)
class Target:
    """What a slot should serve: a pinned version, else what an alias points at."""

    alias: str | None = None
    version: str | None = None

    def __str__(self) -> str:
        return f"version {self.version}" if self.version else f"alias {self.alias}"


def targets(cfg: RolloutConfig, default_alias: str) -> dict[str, Target | None]:
    """{role: Target} for a rollout config; the challenger's is None when no challenger is configured."""
    champion = Target(version=cfg.model_version) if cfg.model_version else \
        Target(alias=cfg.model_alias or default_alias)
    ch = cfg.challenger
    challenger = None if ch is None else Target(version=ch.version) if ch.version else Target(alias=ch.alias)
    return {CHAMPION: champion, CHALLENGER: challenger}


# ------------------------------------------------------------------------------------------------
# What is served: slots and the hot swap


@dataclass(frozen=True)
class Loaded:
    """One registered version, loaded and warmed up."""

    responder: Responder
    resolved: ResolvedModel
    loaded_at: float
    load_s: float

    @property
    def version(self) -> str:
        return self.resolved.version

    def info(self) -> ModelInfo:
        return ModelInfo(name=self.resolved.name, version=self.resolved.version, run_id=self.resolved.run_id)


@dataclass(frozen=True)
class LoadFailure:
    """A version a slot was told to serve but could not load (it kept serving what it had)."""

    version: str
    error: str
    at: float


class LoadFailed(RuntimeError):
    """Loading a slot's new version failed; the slot still serves its old one."""


class NoModel(RuntimeError):
    """The role serves no version (yet): the app answers 503 with this message."""


class NotServing(NoModel):
    """No champion is loaded yet: the app answers 503 with Retry-After."""


class GenerationFailed(RuntimeError):
    """Generating one request's answer failed: the app answers 500 with this message."""


@dataclass
class Slot:
    role: str
    target: Target | None = None
    loaded: Loaded | None = None
    failure: LoadFailure | None = None

    def load_error(self) -> LoadError | None:
        """The slot's LoadFailure, for /v1/model."""
        f = self.failure
        return None if f is None else LoadError(version=f.version, error=f.error, at=f.at)


Lookup = Callable[[Target], Any]          # Target -> the registry's ModelVersion (raises RegistryError)
Load = Callable[[Any], Loaded]            # ModelVersion -> Loaded (download, load, warm up)


def refresh_slot(slot: Slot, lookup: Lookup, load: Load, others: list[Slot]) -> bool:
    """Bring `slot` to the version its target names; True when it switched.

    A version another slot already serves is shared, not loaded twice (a challenger promoted to champion
    switches at once). Raises the lookup's error (the slot is unchanged) or LoadFailed (recorded in
    `slot.failure`, the slot still serves its old version).
    """
    mv = lookup(slot.target)
    version = str(mv.version)
    old = slot.loaded
    if old is not None and old.version == version:
        slot.failure = None
        return False
    shared = next((o.loaded for o in others if o.loaded is not None and o.loaded.version == version), None)
    try:
        slot.loaded = shared or load(mv)
    except Exception as e:  # noqa: BLE001 - a broken version must not take the served one down
        slot.failure = LoadFailure(version, f"{type(e).__name__}: {e}", time.time())
        raise LoadFailed(f"{slot.role}: version {version} ({slot.target}) failed to load; still serving "
                         + (f"version {old.version}" if old else "nothing") + f": {slot.failure.error}") from e
    slot.failure = None
    return True


class StaticSource:
    """A replica's registry when it serves one local bundle directory (`edp serve --model models/escm-ed`): `lookup`
    always names the same pseudo-version (services.registry.local_version), so the alias poller keeps serving
    it, and `load` reads the directory in place (nothing downloaded, nothing discarded). No MLflow."""

    def __init__(self, directory: str, device: str = "cpu", warm_up: bool = True):
        from services.registry import local_version

        self.version = local_version(directory)  # RegistryError when it is not a (verified) bundle
        self.device, self.warm_up = device, warm_up

    def lookup(self, target: Target | None):
        return self.version

    def load(self, mv, alias: str | None = None) -> Loaded:
        from services.registry import load_responder, resolve_local

        t0 = time.perf_counter()
        resolved = resolve_local(mv, alias)
        responder = load_responder(resolved, self.device, warm_up=self.warm_up)
        return Loaded(responder, resolved, time.time(), time.perf_counter() - t0)


def next_poll_delay(failures: int, poll_interval_s: float, serving: bool) -> float:
    """Seconds to a replica's next registry check. While it serves a model: every poll_interval_s. Before its
    first model loads (alias missing, registry down, artifact broken): a retry backoff of 1, 2, 4, ... s after
    `failures` failed checks, capped at poll_interval_s, so a model promoted late is picked up within about a
    second and a registry that is down is not hammered."""
    if serving:
        return poll_interval_s
    return min(poll_interval_s, 2.0 ** min(failures, 16))


# ------------------------------------------------------------------------------------------------
# How a request reaches a version: challenger routing


@dataclass(frozen=True)
class Routed:
    """A Responder's answer to one request and the version that gave it (None: the crisis screen answered)."""

    answer: Answer
    loaded: Loaded | None


def client_bucket(key: str) -> float:
    """A client key's fixed place in [0, 1): the first 8 bytes of its SHA-256 (same key, same side)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class Model:
    """One role's model for a request: the version loaded when the request arrived, and its batched call."""

    role: str
    loaded: Loaded
    call: Callable[[Request], Awaitable[Routed]]   # raises when generation fails


class Recorder(Protocol):
    """What the Router records (services/replica_metrics.py: ServeMetrics)."""

    def answered(self, role: str, loaded: Loaded, ms: float, answer: Answer) -> None: ...

    def failed(self, role: str, loaded: Loaded, ms: float) -> None: ...

    def agreed(self, loaded: Loaded, agree: bool) -> None: ...


class Metrics(Recorder, Protocol):
    """What a Replica records besides (services/replica_metrics.py: ServeMetrics)."""

    def serving(self, name: str, role: str, version: str | None, old_version: str | None = None) -> None: ...

    def load_failed(self, name: str, role: str, version: str) -> None: ...

    def batch(self, size: int, ms: float, tokens: int) -> None: ...

    def screened(self, name: str) -> None: ...


class Router:
    """Sends each request to the champion, the challenger, or both (see the module doc)."""

    def __init__(self, recorder: Recorder, config: ChallengerConfig | None = None,
                 rng: random.Random | None = None):
        self.recorder, self.config = recorder, config
        self.rng = rng or random.Random()
        self.shadows: set[asyncio.Task] = set()   # running shadow calls (a reference keeps them alive)

    def takes(self, client_key: str) -> bool:
        """Split mode: whether this client is answered by the challenger."""
        c = self.config
        return c is not None and c.mode == "split" and client_bucket(client_key) < c.share

    def mirrors(self) -> bool:
        """Shadow mode: whether to mirror this request (a Bernoulli draw with probability `share`)."""
        c = self.config
        return c is not None and c.mode == "shadow" and self.rng.random() < c.share

    async def answer(self, request: Request, client_key: str, champion: Model, challenger: Model | None) -> Routed:
        """The answer the client gets; raises only when the champion fails."""
        if challenger is not None and self.takes(client_key):
            routed = await self._try(challenger, request)
            if routed is not None:
                return routed
        routed = await self._call(champion, request)
        if challenger is not None and self.mirrors():
            task = asyncio.create_task(self._shadow(challenger, request, routed.answer.emotion))
            self.shadows.add(task)
            task.add_done_callback(self.shadows.discard)
        return routed

    async def _call(self, model: Model, request: Request) -> Routed:
        t0 = time.perf_counter()
        try:
            routed = await model.call(request)
        except Exception:
            self.recorder.failed(model.role, model.loaded, (time.perf_counter() - t0) * 1000)
            raise
        self.recorder.answered(model.role, routed.loaded, (time.perf_counter() - t0) * 1000, routed.answer)
        return routed

    async def _try(self, model: Model, request: Request) -> Routed | None:
        """The model's answer, or None when it failed (recorded, logged, never raised)."""
        try:
            return await self._call(model, request)
        except Exception as e:  # noqa: BLE001 - a challenger never fails a request
            logger.warning("%s v%s failed (the champion answers): %s: %s", model.role, model.loaded.version,
                           type(e).__name__, e)
            return None

    async def _shadow(self, challenger: Model, request: Request, champion_emotion: str | None) -> None:
        routed = await self._try(challenger, request)
        if routed is not None and champion_emotion is not None:
            self.recorder.agreed(routed.loaded, routed.answer.emotion == champion_emotion)


# ------------------------------------------------------------------------------------------------
# The replica


BatchQueue = Callable[["Request"], Awaitable["Routed | Exception"]]   # one role's @serve.batch queue


class Replica:
    """The state of one replica: its rollout config, one Slot per role, the Router and the poll thread.

    `queues` are the roles' batch queues (the app's `@serve.batch` methods, which call `generate`); `screen` the
    crisis screen (None: none, every request reaches a model).
    """

    def __init__(self, model_name: str, default_alias: str, poll_interval_s: float, lookup: Lookup,
                 load: Callable[[Any, str | None], Loaded], metrics: Metrics,
                 queues: dict[str, BatchQueue] | None = None, screen: CrisisScreen | None = None):
        self.model_name, self.default_alias, self.poll_interval_s = model_name, default_alias, poll_interval_s
        self.lookup, self.load, self.metrics, self.queues = lookup, load, metrics, queues or {}
        self.screen = screen
        self.rollout = RolloutConfig()
        self.slots = {CHAMPION: Slot(CHAMPION), CHALLENGER: Slot(CHALLENGER)}
        self.router = Router(metrics)
        self._swap_lock = threading.Lock()
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- model lifecycle -----------------------------------------------------------------------

    async def reconfigure(self, user_config: dict | None) -> None:
        """Load what a new user_config names (a version that fails to load leaves the old one serving), then
        keep polling the aliases. ValueError naming the field when the config is invalid."""
        try:
            cfg = RolloutConfig.model_validate(user_config or {})
        except ValidationError as e:
            raise ValueError(f"invalid user_config of the Responder deployment: {e}") from e
        try:
            await asyncio.to_thread(self.retarget, cfg)  # off the event loop: requests go on meanwhile
        except Exception as e:  # noqa: BLE001 - keep serving what we have; the poll loop retries
            logger.warning("rollout to %s of %s: %s", self.slots[CHAMPION].target, self.model_name, e)
        if self._poller is None:
            self._poller = threading.Thread(target=self.poll_loop, name="edp-registry-poll", daemon=True)
            self._poller.start()

    def retarget(self, cfg: RolloutConfig) -> None:
        with self._swap_lock:  # the poll thread may be loading: wait for it
            self.rollout = cfg
            for role, target in targets(cfg, self.default_alias).items():
                self.slots[role].target = target
            self.router.config = cfg.challenger
        self.refresh()

    def refresh(self) -> None:
        """Bring the champion, then the challenger, to their targets; raises when the champion's lookup or
        load failed (the challenger never raises: without it the champion answers everything)."""
        with self._swap_lock:
            champion, challenger = self.slots[CHAMPION], self.slots[CHALLENGER]
            try:
                self._refresh(champion, [challenger])  # first: a promoted challenger is taken over as loaded
            finally:
                self._refresh_challenger(challenger, champion)

    def _refresh_challenger(self, challenger: Slot, champion: Slot) -> None:
        try:
            if challenger.target is None:
                self._drop(challenger, "no challenger configured")
            else:
                self._refresh(challenger, [champion])
        except RegistryError as e:  # its alias was removed (promoted, or never set)
            self._drop(challenger, str(e))
        except Exception as e:  # noqa: BLE001
            logger.warning("challenger of %s: %s", self.model_name, e)

    def _refresh(self, slot: Slot, others: list[Slot]) -> None:
        name, old = self.model_name, slot.loaded
        try:
            switched = refresh_slot(slot, self.lookup, lambda mv: self.load(mv, slot.target.alias), others)
        except LoadFailed:
            self.metrics.load_failed(name, slot.role, slot.failure.version)
            raise
        if switched:
            self.metrics.serving(name, slot.role, slot.loaded.version, old.version if old else None)
            logger.info("%s: serving %s v%s (%s, run %s), loaded in %.1f s%s", slot.role, name, slot.loaded.version,
                        slot.target, slot.loaded.resolved.run_id, slot.loaded.load_s,
                        f"; replaced v{old.version}" if old else "")

    def _drop(self, slot: Slot, why: str) -> None:
        old, slot.loaded, slot.failure = slot.loaded, None, None
        if old is not None:
            self.metrics.serving(self.model_name, slot.role, None, old.version)
            logger.info("%s v%s no longer served: %s", slot.role, old.version, why)

    def poll_loop(self) -> None:
        """Check the targets on `next_poll_delay`'s schedule; re-mark the served versions every GAUGE_TICK_S."""
        failures = 0
        serving = lambda: self.slots[CHAMPION].loaded is not None  # noqa: E731
        next_poll = time.monotonic() + next_poll_delay(0, self.poll_interval_s, serving())
        next_mark = time.monotonic()
        while not self._stop.wait(max(0.0, min(next_poll, next_mark) - time.monotonic())):
            if time.monotonic() >= next_poll:
                try:
                    self.refresh()
                    failures = 0
                except Exception as e:  # noqa: BLE001 - registry hiccup or broken version: keep serving
                    failures += 1
                    logger.warning("registry poll %d for %s (%s) failed: %s", failures, self.model_name,
                                   self.slots[CHAMPION].target, e)
                next_poll = time.monotonic() + next_poll_delay(failures, self.poll_interval_s, serving())
            if time.monotonic() >= next_mark:
                next_mark = time.monotonic() + GAUGE_TICK_S
                for slot in list(self.slots.values()):
                    loaded = slot.loaded
                    if loaded is not None:
                        self.metrics.serving(loaded.resolved.name, slot.role, loaded.version)

    def stop(self) -> None:
        self._stop.set()

    # ---- requests ------------------------------------------------------------------------------

    @property
    def client_key_header(self) -> str:
        """The header naming the client for sticky splits."""
        return self.rollout.challenger.client_key_header if self.rollout.challenger else "x-client-id"

    async def answer(self, request: Request, client_key: str) -> Routed:
        """The client's answer: the crisis screen's fixed one (no model involved), else from the champion, or the
        challenger (split); raises NotServing when no champion is loaded, NoModel, GenerationFailed or the
        Responder's error when generation fails."""
        if self.screen is not None and self.screen.match(request) is not None:
            self.metrics.screened(self.model_name)
            return Routed(self.screen.answer(), None)
        champion = self._model(CHAMPION)
        if champion is None:
            raise NotServing(f"no model loaded yet (waiting for {self.model_name} {self.slots[CHAMPION].target})")
        return await self.router.answer(request, client_key, champion, self._model(CHALLENGER))

    def _model(self, role: str) -> Model | None:
        """The role's model for one request (None when it serves nothing)."""
        loaded = self.slots[role].loaded
        if loaded is None:
            return None
        queue = self.queues[role]

        async def call(request: Request) -> Routed:
            result = await queue(request)
            if isinstance(result, Exception):
                raise result
            return result
        return Model(role, loaded, call)

    async def generate(self, role: str, requests: list[Request]) -> list[Routed | Exception]:
        """A role's batch: one Responder.respond call for all of it, on the slot's version when it starts."""
        slot = self.slots[role]
        loaded = slot.loaded
        if loaded is None:
            return [NoModel(f"no {slot.role} model loaded")] * len(requests)
        t0 = time.perf_counter()
        try:
            answers: list[Answer | Exception] = await asyncio.to_thread(loaded.responder.respond, requests)
        except Exception:  # noqa: BLE001 - isolate the request that broke the batch
            logger.exception("batch of %d failed; answering its requests one by one", len(requests))
            answers = [await asyncio.to_thread(_respond_one, loaded, r) for r in requests]
        tokens = sum(a.tokens_generated for a in answers if not isinstance(a, Exception))
        self.metrics.batch(len(requests), (time.perf_counter() - t0) * 1000, tokens)
        return [a if isinstance(a, Exception) else Routed(a, loaded) for a in answers]

    # ---- status --------------------------------------------------------------------------------

    def status(self, max_batch_size: int, batch_wait_timeout_s: float) -> ModelStatus:
        """GET /v1/model: what the champion serves and follows, and the challenger; NoModel before a load."""
        champion = self.slots[CHAMPION]
        loaded = champion.loaded
        if loaded is None:
            failure = champion.failure
            raise NoModel("no model loaded yet" + (f": version {failure.version} failed to load: {failure.error}"
                                                   if failure else ""))
        r = loaded.resolved
        return ModelStatus(name=r.name, alias=champion.target.alias, version=r.version, run_id=r.run_id,
                           source=r.source, model_type=loaded.responder.model_name,
                           loaded_at=loaded.loaded_at, load_s=round(loaded.load_s, 3),
                           max_batch_size=max_batch_size, batch_wait_timeout_s=batch_wait_timeout_s,
                           target=str(champion.target), load_error=champion.load_error(),
                           challenger=self._challenger_status())

    def _challenger_status(self) -> ChallengerStatus | None:
        cfg, slot = self.rollout.challenger, self.slots[CHALLENGER]
        if cfg is None:
            return None
        info = slot.loaded.info() if slot.loaded else None
        return ChallengerStatus(mode=cfg.mode, share=cfg.share, target=str(slot.target), model=info,
                                load_error=slot.load_error())


def _respond_one(loaded: Loaded, request: Request) -> Answer | Exception:
    try:
        (answer,) = loaded.responder.respond([request])
    except Exception as e:  # noqa: BLE001
        return GenerationFailed(f"generation failed: {type(e).__name__}: {e}")
    return answer
