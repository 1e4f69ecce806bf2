"""Challenger traffic (services/replica.py: Router) with fake models: shadow share, what the client sees, failures."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace

import pytest

from services.replica import CHALLENGER, CHAMPION, ChallengerConfig, Loaded, Model, Routed, Router, client_bucket
from trainers.inference import Answer, Request

REQUEST = Request(["My dog is sick."])


def version(v: str) -> Loaded:
    return Loaded(None, SimpleNamespace(name="escm", version=v, run_id=None), 0.0, 0.0)


class Recorder:
    def __init__(self):
        self.answers, self.failures, self.agreements = [], [], []

    def answered(self, role, loaded, ms, answer):
        self.answers.append((role, loaded.version, answer.emotion))

    def failed(self, role, loaded, ms):
        self.failures.append((role, loaded.version))

    def agreed(self, loaded, agree):
        self.agreements.append((loaded.version, agree))


class Fake:
    """A fake model of one role: answers (or raises) after `delay` seconds; `calls` lists its requests."""

    def __init__(self, role: str, v: str, emotion: str = "sad", fail: bool = False, delay: float = 0.0):
        self.role, self.emotion, self.fail, self.delay, self.calls = role, emotion, fail, delay, []
        self.model = Model(role, version(v), self.call)

    async def call(self, request: Request) -> Routed:
        self.calls.append(request)
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError(f"{self.role} exploded")
        return Routed(Answer(f"{self.role} says hi", self.emotion, tokens_generated=3), self.model.loaded)


async def serve(router: Router, champion: Fake, challenger: Fake | None, n: int, keys=None):
    answers = [await router.answer(REQUEST, keys[i] if keys else f"client-{i}", champion.model,
                                   challenger and challenger.model) for i in range(n)]
    await asyncio.gather(*list(router.shadows))  # let the mirrored calls finish
    return answers


def test_shadow_share_is_honoured_and_the_client_never_sees_a_shadow_answer():
    rec = Recorder()
    router = Router(rec, ChallengerConfig(mode="shadow", share=0.25), rng=random.Random(7))
    champion, challenger = Fake(CHAMPION, "1", "sad"), Fake(CHALLENGER, "2", "sad", delay=0.001)
    answers = asyncio.run(serve(router, champion, challenger, 2000))
    assert {r.answer.response for r in answers} == {"champion says hi"}
    assert {r.loaded.version for r in answers} == {"1"}
    assert abs(len(challenger.calls) / 2000 - 0.25) < 0.03          # 3 standard deviations of a Bernoulli(0.25)
    assert len(champion.calls) == 2000
    assert rec.agreements == [("2", True)] * len(challenger.calls)  # same emotion: agreement recorded
    assert [r for r in rec.answers if r[0] == CHALLENGER] == [(CHALLENGER, "2", "sad")] * len(challenger.calls)


@pytest.mark.parametrize("mode", ["shadow", "split"])
def test_a_failing_challenger_never_fails_a_request(mode):
    rec = Recorder()
    router = Router(rec, ChallengerConfig(mode=mode, share=1.0))
    champion, challenger = Fake(CHAMPION, "1"), Fake(CHALLENGER, "2", fail=True)
    answers = asyncio.run(serve(router, champion, challenger, 50))
    assert [r.loaded.version for r in answers] == ["1"] * 50
    assert rec.failures == [(CHALLENGER, "2")] * 50 and rec.agreements == []


def test_split_is_sticky_per_client_and_takes_its_share_of_clients():
    rec = Recorder()
    router = Router(rec, ChallengerConfig(mode="split", share=0.3))
    champion, challenger = Fake(CHAMPION, "1"), Fake(CHALLENGER, "2", "joyful")
    keys = [f"user-{i}" for i in range(1000)] * 2                    # every client asks twice
    answers = asyncio.run(serve(router, champion, challenger, len(keys), keys))
    side = {}
    for key, r in zip(keys, answers, strict=True):
        assert side.setdefault(key, r.loaded.version) == r.loaded.version  # same client, same model
    assert abs(sum(v == "2" for v in side.values()) / 1000 - 0.3) < 0.05
    assert all(v == ("2" if client_bucket(k) < 0.3 else "1") for k, v in side.items())
    assert not router.shadows and rec.agreements == []               # split answers are not mirrored


def test_disagreement_is_recorded_and_champion_failures_still_fail():
    rec = Recorder()
    router = Router(rec, ChallengerConfig(mode="shadow", share=1.0))
    asyncio.run(serve(router, Fake(CHAMPION, "1", "sad"), Fake(CHALLENGER, "2", "proud"), 3))
    assert rec.agreements == [("2", False)] * 3
    with pytest.raises(RuntimeError, match="champion exploded"):
        asyncio.run(serve(router, Fake(CHAMPION, "1", fail=True), Fake(CHALLENGER, "2"), 1))
    assert (CHAMPION, "1") in rec.failures


def test_no_challenger_or_no_config_sends_everything_to_the_champion():
    for config, challenger in [(None, Fake(CHALLENGER, "2")), (ChallengerConfig(share=1.0), None)]:
        champion = Fake(CHAMPION, "1")
        answers = asyncio.run(serve(Router(Recorder(), config), champion, challenger, 20))
        assert [r.loaded.version for r in answers] == ["1"] * 20
