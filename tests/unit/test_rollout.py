"""Rollout state of a replica (services/replica.py: slots, hot swap) and the deployment's reconfigure() on a fake
registry."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from services.replica import (
    CHALLENGER,
    CHAMPION,
    ChallengerConfig,
    Loaded,
    LoadFailed,
    Replica,
    RolloutConfig,
    Slot,
    Target,
    next_poll_delay,
    refresh_slot,
    targets,
)


def loaded(version: str, name: str = "escm") -> Loaded:
    resolved = SimpleNamespace(name=name, version=version, run_id=f"r{version}", source=f"models:/m-{version}")
    return Loaded(SimpleNamespace(model_name="escm"), resolved, 0.0, 0.0)


class FakeRegistry:
    """Aliases and versions of one registered model; versions in `broken` fail to load."""

    def __init__(self, aliases: dict[str, str], broken: tuple[str, ...] = ()):
        self.aliases, self.broken, self.loads = dict(aliases), set(broken), []

    def lookup(self, target: Target):
        from services.registry import RegistryError

        if target.version:
            return SimpleNamespace(version=target.version)
        if target.alias not in self.aliases:
            raise RegistryError(f"no alias {target.alias!r}")
        return SimpleNamespace(version=self.aliases[target.alias])

    def load(self, mv) -> Loaded:
        self.loads.append(mv.version)
        if mv.version in self.broken:
            raise OSError(f"model.safetensors of version {mv.version} is truncated")
        return loaded(mv.version)


def test_targets_pin_a_version_or_follow_an_alias():
    assert targets(RolloutConfig(), "champion") == {CHAMPION: Target(alias="champion"), CHALLENGER: None}
    assert targets(RolloutConfig(model_version="3"), "champion")[CHAMPION] == Target(version="3")
    assert targets(RolloutConfig(model_alias="canary"), "champion")[CHAMPION] == Target(alias="canary")
    cfg = RolloutConfig(challenger=ChallengerConfig(mode="split", share=0.5))
    assert targets(cfg, "champion")[CHALLENGER] == Target(alias="challenger")
    assert str(Target(version="3")) == "version 3" and str(Target(alias="champion")) == "alias champion"
    assert RolloutConfig.model_validate({"model_version": 3}).model_version == "3"   # YAML's `3` is version "3"


@pytest.mark.parametrize("user_config, field", [
    ({"model_version": "v3"}, "model_version"),
    ({"modle_version": "3"}, "modle_version"),
    ({"model_version": -3}, "model_version"),
    ({"challenger": {"share": 1.5}}, "challenger.share"),
    ({"challenger": {"mode": "canary"}}, "challenger.mode"),
])
def test_bad_user_config_names_the_field(user_config, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        RolloutConfig.model_validate(user_config)


def test_refresh_switches_when_the_target_names_another_version():
    reg = FakeRegistry({"champion": "1"})
    slot = Slot(CHAMPION, Target(alias="champion"))
    assert refresh_slot(slot, reg.lookup, reg.load, []) is True and slot.loaded.version == "1"
    assert refresh_slot(slot, reg.lookup, reg.load, []) is False and reg.loads == ["1"]  # no reload
    slot.target = Target(version="2")
    assert refresh_slot(slot, reg.lookup, reg.load, []) is True and slot.loaded.version == "2"


def test_a_version_that_fails_to_load_leaves_the_old_one_serving():
    reg = FakeRegistry({"champion": "1"}, broken=("2",))
    slot = Slot(CHAMPION, Target(alias="champion"))
    refresh_slot(slot, reg.lookup, reg.load, [])
    slot.target = Target(version="2")
    with pytest.raises(LoadFailed, match="version 2 .* still serving version 1: OSError: .*truncated"):
        refresh_slot(slot, reg.lookup, reg.load, [])
    assert slot.loaded.version == "1"
    assert (slot.failure.version, slot.failure.error.split(":")[0]) == ("2", "OSError")
    slot.target = Target(version="1")  # rolled back: the failure is cleared
    assert refresh_slot(slot, reg.lookup, reg.load, []) is False and slot.failure is None


def test_a_version_another_slot_serves_is_shared_not_loaded_again():
    reg = FakeRegistry({"champion": "1", "challenger": "2"})
    champion, challenger = Slot(CHAMPION, Target(alias="champion")), Slot(CHALLENGER, Target(alias="challenger"))
    refresh_slot(champion, reg.lookup, reg.load, [challenger])
    refresh_slot(challenger, reg.lookup, reg.load, [champion])
    reg.aliases["champion"] = "2"                              # the challenger is promoted
    assert refresh_slot(champion, reg.lookup, reg.load, [challenger]) is True
    assert champion.loaded is challenger.loaded and reg.loads == ["1", "2"]


def test_replica_retries_its_first_load_with_backoff_then_polls_at_the_interval():
    assert [next_poll_delay(f, 10.0, serving=False) for f in range(6)] == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert next_poll_delay(10_000, 10.0, serving=False) == 10.0  # no overflow after days without a model
    assert next_poll_delay(0, 10.0, serving=True) == next_poll_delay(3, 10.0, serving=True) == 10.0
    assert next_poll_delay(0, 0.5, serving=False) == 0.5  # never slower than the configured interval


def test_replica_poll_loop_sleeps_between_checks_while_no_model_loads():
    """The registry poll thread of a replica without a model: checks back off (1 s, then 2 s) and the thread
    sleeps in between instead of spinning."""
    import threading
    import time

    replica = Replica("escm", "champion", 10.0, lookup=None, load=None,
                      metrics=SimpleNamespace(serving=lambda *a: None))
    checks, waits, stop = [], [], threading.Event()

    def refresh():
        checks.append(time.monotonic())
        raise RuntimeError("registered model 'escm' has no alias 'champion'")

    def wait(timeout):
        waits.append(timeout)
        return stop.wait(timeout)

    replica.refresh, replica._stop = refresh, SimpleNamespace(wait=wait)
    thread = threading.Thread(target=replica.poll_loop, daemon=True)
    t0 = time.monotonic()
    thread.start()
    time.sleep(3.6)
    stop.set()
    thread.join(timeout=5)
    assert [round(t - t0) for t in checks] == [1, 3]  # after 1 s, then 2 s more
    assert len(waits) < 20, f"the poll thread woke {len(waits)} times in 3.6 s"


# ---- the deployment: reconfigure() on a fake registry --------------------------------------------


class Recorder:
    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


@pytest.fixture
def replica(monkeypatch):
    """A Responder replica (no Serve, no MLflow) over FakeRegistry {champion: 1, challenger: 3}, version 2
    broken; `replica.metrics.calls` lists what it recorded."""
    from services import app, registry, replica_metrics

    reg = FakeRegistry({"champion": "1", "challenger": "3"}, broken=("2",))
    monkeypatch.setattr(replica_metrics, "_replica_metrics", Recorder())
    monkeypatch.setattr(registry, "client", lambda uri: None)
    monkeypatch.setattr(registry, "lookup", lambda c, name, alias=None, version=None:
                        reg.lookup(Target(alias, version)))
    monkeypatch.setattr(app.ResponderDeployment.func_or_class, "_load", lambda self, mv, alias: reg.load(mv))
    wrapper = app.ResponderDeployment.func_or_class            # Serve's ingress subclass (async __init__)
    r = object.__new__(wrapper)
    super(wrapper, r).__init__({"mlflow_tracking_uri": "http://fake", "poll_interval_s": 3600})
    r.registry = reg
    yield r
    r.replica.stop()


def test_reconfigure_rolls_the_champion_to_the_pinned_version_and_back_to_the_alias(replica):
    asyncio.run(replica.reconfigure({}))
    assert replica.replica.slots[CHAMPION].loaded.version == "1"
    asyncio.run(replica.reconfigure({"model_version": "3"}))
    status = asyncio.run(replica.model(None))
    assert (status.version, status.target, status.alias, status.load_error) == ("3", "version 3", None, None)
    asyncio.run(replica.reconfigure({}))
    assert replica.replica.slots[CHAMPION].loaded.version == "1"
    assert ("serving", "escm", CHAMPION, "3", "1") in replica.metrics.calls


def test_reconfigure_to_a_broken_version_keeps_the_old_one_and_reports_it(replica):
    asyncio.run(replica.reconfigure({}))
    asyncio.run(replica.reconfigure({"model_version": "2"}))
    status = asyncio.run(replica.model(None))
    assert (status.version, status.target) == ("1", "version 2")
    assert status.load_error.version == "2" and "truncated" in status.load_error.error
    assert ("load_failed", "escm", CHAMPION, "2") in replica.metrics.calls


def test_reconfigure_rejects_a_bad_user_config_naming_the_field(replica):
    with pytest.raises(ValueError, match="model_version"):
        asyncio.run(replica.reconfigure({"model_version": "latest"}))


def test_challenger_loads_beside_and_is_dropped_when_its_alias_goes(replica):
    asyncio.run(replica.reconfigure({"challenger": {"mode": "shadow", "share": 0.5}}))
    status = asyncio.run(replica.model(None))
    assert status.version == "1" and status.challenger.model.version == "3"
    assert (status.challenger.mode, status.challenger.share) == ("shadow", 0.5)
    replica.registry.aliases = {"champion": "3"}               # challenger promoted, its alias removed
    replica.replica.refresh()
    assert replica.replica.slots[CHAMPION].loaded.version == "3" and replica.replica.slots[CHALLENGER].loaded is None
    assert replica.registry.loads == ["1", "3"]                # the promoted challenger was not loaded again


# ---- `edp promote --apply`: the Serve REST round trip (cluster/serve_rollout.py) ------------------

def serve_details(escm_user_config: dict | None = None) -> dict:
    """What GET /api/serve/applications/ answers for two declaratively deployed applications."""
    escm = {"name": "escm", "route_prefix": "/", "import_path": "services.app:build_app",
            "args": {"model_name": "escm"}, "deployments": [{"name": "Responder", "max_ongoing_requests": 64}]}
    if escm_user_config is not None:
        escm["deployments"][0]["user_config"] = escm_user_config
    iamm = {"name": "iamm", "route_prefix": "/iamm", "import_path": "services.app:build_app",
            "args": {"model_name": "iamm"}}
    return {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": 8000},
            "target_capacity": None, "controller_info": {}, "proxies": {},
            "applications": {"escm": {"status": "RUNNING", "deployed_app_config": escm},
                             "iamm": {"status": "RUNNING", "deployed_app_config": iamm}}}


def test_apply_pins_the_version_in_one_apps_user_config_and_leaves_the_others_as_deployed():
    from cluster.serve_rollout import pin_version, running_config

    details = serve_details({"model_version": None, "challenger": {"mode": "shadow", "share": 0.2}})
    config = running_config(details)
    assert pin_version(config, "escm", "7") == "escm"
    escm, iamm = config["applications"]
    assert escm["deployments"] == [{"name": "Responder", "max_ongoing_requests": 64, "user_config": {
        "model_version": "7", "challenger": {"mode": "shadow", "share": 0.2}}}]
    assert iamm == details["applications"]["iamm"]["deployed_app_config"]       # untouched: not redeployed
    assert config["proxy_location"] == "EveryNode" and "target_capacity" not in config
    assert details["applications"]["escm"]["deployed_app_config"]["deployments"][0]["user_config"][
        "model_version"] is None                                                  # the GET answer is not mutated
    pin_version(config, "iamm", "2")                                              # no Responder entry yet: added
    assert config["applications"][1]["deployments"] == [{"name": "Responder", "user_config": {"model_version": "2"}}]


def test_apply_refuses_what_it_cannot_roll():
    from cluster.serve_rollout import RolloutError, pin_version, running_config

    with pytest.raises(RolloutError, match="0 running application.*'escm': 'escm'"):
        pin_version(running_config(serve_details()), "empathy", "3")
    details = serve_details()
    details["applications"]["escm"]["deployed_app_config"] = None                # started with serve.run
    with pytest.raises(RolloutError, match="escm were started with serve.run"):
        running_config(details)
    with pytest.raises(ValidationError, match="challenger"):                      # the replicas would refuse it
        pin_version(running_config(serve_details({"challenger": {"share": 2}})), "escm", "3")


# ---- a request through the plain-Python Replica (no Ray): queue -> generate -> Responder --------------------


class FakeResponder:
    """Answers each request with its first turn reversed; raises for a turn 'boom' (the whole batch fails)."""

    model_name = "escm"

    def __init__(self):
        self.batches = []

    def respond(self, requests):
        from trainers.inference import Answer

        self.batches.append(len(requests))
        if any(r.context[0] == "boom" for r in requests):
            raise RuntimeError("boom")
        return [Answer(r.context[0][::-1], "sad", tokens_generated=2) for r in requests]


def test_a_request_reaches_the_champion_through_its_queue_and_a_broken_request_fails_alone():
    from services.replica import GenerationFailed, NotServing
    from trainers.inference import Request

    metrics = Recorder()
    replica = Replica("escm", "champion", 3600, lookup=None, load=None, metrics=metrics)
    replica.queues = {role: (lambda r, role=role: _one(replica.generate(role, [r]))) for role in (CHAMPION, CHALLENGER)}
    with pytest.raises(NotServing, match="no model loaded yet .waiting for escm None"):
        asyncio.run(replica.answer(Request(["hi"]), "client"))
    responder = FakeResponder()
    replica.slots[CHAMPION].loaded = Loaded(responder, loaded("1").resolved, 0.0, 0.0)
    routed = asyncio.run(replica.answer(Request(["hello"]), "client"))
    assert (routed.answer.response, routed.loaded.version) == ("olleh", "1")
    assert metrics.calls[-2][:2] == ("batch", 1) and metrics.calls[-1][:3] == ("answered", CHAMPION, routed.loaded)
    results = asyncio.run(replica.generate(CHAMPION, [Request(["ok"]), Request(["boom"])]))
    assert results[0].answer.response == "ko" and isinstance(results[1], GenerationFailed)
    assert str(results[1]) == "generation failed: RuntimeError: boom" and responder.batches[-3:] == [2, 1, 1]


async def _one(batch):
    (result,) = await batch
    return result
