"""Challenger traffic: a second registered version served beside the champion and measured on live requests.

    shadow  `share` of the requests are mirrored to the challenger once the champion has answered; the
            challenger's answer is recorded (metrics, agreement of its emotion with the champion's) and
            never returned, and whatever it does (slow, failing) never reaches the client.
    split   the clients whose key falls below `share` (`client_bucket`, sticky while the config holds) get
            the challenger's answer; when the challenger fails the champion answers instead.

The Router is plain asyncio: the Serve deployment (services/app.py) gives it each role's batched model
call and a Recorder (services/replica_metrics.py), so the routing is tested with fake models.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from services.rollout import ChallengerConfig, Loaded

logger = logging.getLogger("ray.serve")

Answer = tuple[dict, Loaded]                      # a Responder answer and the version that gave it


def client_bucket(key: str) -> float:
    """A client key's fixed place in [0, 1): the first 8 bytes of its SHA-256 (same key, same side)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2.0 ** 64


@dataclass(frozen=True)
class Model:
    """One role's model for a request: the version loaded when the request arrived, and its batched call."""

    role: str
    loaded: Loaded
    call: Callable[[dict], Awaitable[Answer]]     # raises when generation fails


class Recorder(Protocol):
    def answered(self, role: str, loaded: Loaded, ms: float, answer: dict) -> None: ...

    def failed(self, role: str, loaded: Loaded, ms: float) -> None: ...

    def agreed(self, loaded: Loaded, agree: bool) -> None: ...


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

    async def answer(self, request: dict, client_key: str, champion: Model, challenger: Model | None) -> Answer:
        """The answer the client gets; raises only when the champion fails."""
        if challenger is not None and self.takes(client_key):
            answer = await self._try(challenger, request)
            if answer is not None:
                return answer
        answer = await self._call(champion, request)
        if challenger is not None and self.mirrors():
            task = asyncio.create_task(self._shadow(challenger, request, answer[0].get("emotion")))
            self.shadows.add(task)
            task.add_done_callback(self.shadows.discard)
        return answer

    async def _call(self, model: Model, request: dict) -> Answer:
        t0 = time.perf_counter()
        try:
            answer = await model.call(request)
        except Exception:
            self.recorder.failed(model.role, model.loaded, (time.perf_counter() - t0) * 1000)
            raise
        self.recorder.answered(model.role, answer[1], (time.perf_counter() - t0) * 1000, answer[0])
        return answer

    async def _try(self, model: Model, request: dict) -> Answer | None:
        """The model's answer, or None when it failed (recorded, logged, never raised)."""
        try:
            return await self._call(model, request)
        except Exception as e:  # noqa: BLE001 - a challenger never fails a request
            logger.warning("%s v%s failed (the champion answers): %s: %s", model.role, model.loaded.version,
                           type(e).__name__, e)
            return None

    async def _shadow(self, challenger: Model, request: dict, champion_emotion: Any) -> None:
        answer = await self._try(challenger, request)
        if answer is not None and champion_emotion is not None:
            self.recorder.agreed(answer[1], answer[0].get("emotion") == champion_emotion)

