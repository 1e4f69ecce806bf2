"""Which registered version each role of a replica serves, and how it changes: the rollout state of a replica.

The Serve deployment's `user_config` (RolloutConfig) says what to serve; Serve hands it to `reconfigure()`
on every replica, in place, whenever the Serve config changes (a RayService's serveConfigV2, `serve deploy`,
or `edp promote --apply`), without restarting them:

    user_config:
      model_version: "3"          # pin version 3 (rolls the replicas to it); null: follow the alias
      model_alias: null           # null: args.model_alias (polled every args.poll_interval_s)
      challenger: {alias: challenger, mode: shadow, share: 0.2}     # optional: services/challenger.py

A replica has one Slot per role (`champion`, and `challenger` when configured). `refresh_slot` resolves the
slot's Target (a pinned version, or an alias) in the registry and, when it names another version, loads it
beside the one served and then switches one reference (requests in flight finish on the old one). When the
new version fails to load the slot keeps serving the old one and records a LoadFailure (shown by
/v1/model and counted by the edp_model_load_failures_total metric); the next poll tries again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import ConfigDict, Field

from services.schemas import ModelInfo
from trainers.config import StrictModel

CHAMPION, CHALLENGER = "champion", "challenger"


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


@dataclass(frozen=True)
class Loaded:
    """One registered version, loaded and warmed up."""

    responder: Any                       # trainers.inference.Responder
    resolved: Any                        # services.registry.ResolvedModel
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


@dataclass
class Slot:
    role: str
    target: Target | None = None
    loaded: Loaded | None = None
    failure: LoadFailure | None = None


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
