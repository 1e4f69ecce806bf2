"""The crisis-language screen (services/safety.py): what it flags and what it leaves to the model, its config,
and how the Serve replica and the pyfunc model apply it (fakes only: no Ray, no MLflow server, no model)."""

from __future__ import annotations

import asyncio
import json
import re
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from services.replica import CHALLENGER, CHAMPION, Loaded, NotServing, Replica
from services.safety import (
    DEFAULT_MESSAGE,
    SCREEN,
    CrisisScreen,
    CrisisScreenConfig,
    normalize,
    respond_screened,
)
from trainers.data.sources import EMBEDDED_SAMPLE
from trainers.inference import Answer, Request

FLAGGED = [
    "I want to kill myself.",
    "I've been thinking about suicide a lot lately.",
    "I want to end my life",
    "I don't want to live anymore.",
    "I DON’T want to live any more...",            # curly apostrophe, capitals, punctuation
    "i dont want to be alive",
    "Honestly I feel suicidal tonight",
    "I started self-harm again last month",
    "I keep hurting myself when it gets bad",
    "I want to hurt myself",
    "Sometimes I just want to die.",
    "Everyone would be better off dead without me... I mean I'd be better off dead",
    "There is nothing to live for.",
    "I'm going to end it all",
]
NOT_FLAGGED = [
    "I've been killing it at work this month!",
    "This exam is killing me.",
    "The waiting is killing me!",
    "My husband is going to kill me when he sees the bill.",
    "I do not want to live there, the rent is too high.",
    "I don't want to live with my parents again.",
    "I didn't want to die on that glacier, so I was careful!",
    "I wanted to die of embarrassment when I tripped on stage.",
    "I hurt my knee playing football.",
    "I was so happy when my sister had her baby.",
    "I'm heartbroken that my dog passed away.",
    "My self-esteem took a hit after the interview.",
]


def screened(text: str, screen: CrisisScreen | None = None) -> bool:
    return (screen or CrisisScreen()).match(Request([text])) is not None


@pytest.mark.parametrize("text", FLAGGED)
def test_crisis_language_is_flagged(text):
    assert screened(text), normalize(text)


@pytest.mark.parametrize("text", NOT_FLAGGED)
def test_figures_of_speech_and_ordinary_dialogue_are_not_flagged(text):
    assert not screened(text), CrisisScreen().match_text(text)


def test_every_turn_and_the_situation_are_screened():
    screen = CrisisScreen()
    assert screen.match(Request(["Hi.", "Hello, how are you?", "I want to kill myself."])) == "kill myself"
    assert screen.match(Request(["I had a rough week."], situation="Thinking about suicide")) == "suicide"
    assert screen.match(Request(["I had a rough week."], situation="My exam is killing me")) is None


def test_the_embedded_ed_sample_is_not_flagged():
    """The 128 hand-written conversations of every emotion (sad, devastated, lonely, terrified, ...) reach the model."""
    screen, dialogues = CrisisScreen(), 0
    for split in ("ed_train.jsonl", "ed_valid.jsonl"):
        for line in (EMBEDDED_SAMPLE / split).read_text().splitlines():
            conv = json.loads(line)
            assert screen.match(Request(conv["utterances"], conv["situation"])) is None, conv["conv_id"]
            dialogues += 1
    assert dialogues == 128


def test_the_demos_examples_reach_the_model():
    from cluster.demo import EXAMPLES

    assert [CrisisScreen().match(Request(e["context"], e.get("situation"))) for e in EXAMPLES] == [None] * len(EXAMPLES)


def test_normalize_folds_case_apostrophes_punctuation_and_whitespace():
    assert normalize("  I DON'T\twant to...   live!! ") == "i dont want to live"
    assert normalize("Self-harm") == "self harm" and normalize("I’m ＯＫ") == "im ok"   # curly ', full-width letters
    assert normalize("?!") == ""


# ---- configuration -------------------------------------------------------------------------------


def app_args(crisis_screen):
    from services.app import AppArgs

    return AppArgs.model_validate({"crisis_screen": crisis_screen})


def test_on_by_default_and_off_when_disabled():
    from services.app import AppArgs

    assert AppArgs().crisis_screen == CrisisScreenConfig() and CrisisScreen(AppArgs().crisis_screen).enabled
    assert all(part in DEFAULT_MESSAGE for part in ("glad you reached out", "can't help in a crisis",
                                                    "emergency number", "988", "findahelpline.com"))
    off = CrisisScreen(app_args({"enabled": False}).crisis_screen)
    assert not any(screened(t, off) for t in FLAGGED)


def test_a_custom_lexicon_from_the_config_replaces_or_extends_the_default():
    replaced = CrisisScreen(app_args({"phrases": ["Walk into the sea"], "patterns": [r"\bno way out\b"],
                                      "message": "Please call the helpline."}).crisis_screen)
    assert screened("Some days I want to walk into the sea.", replaced)
    assert screened("There's no way out for me", replaced)
    assert not screened("I want to kill myself.", replaced)                     # the default list was replaced
    assert replaced.answer().response == "Please call the helpline."
    extended = CrisisScreen(app_args({"extra_phrases": ["walk into the sea"]}).crisis_screen)
    assert screened("I want to walk into the sea", extended) and screened("I want to kill myself", extended)


@pytest.mark.parametrize("config, field, message", [
    ({"phrases": ["kill myself", ""]}, "crisis_screen.phrases", r"phrases\[1\] '' has no words"),
    ({"extra_phrases": ["?!"]}, "crisis_screen.extra_phrases", r"extra_phrases\[0\] '\?!' has no words"),
    ({"patterns": ["(unclosed"]}, "crisis_screen.patterns", r"patterns\[0\] .* not a valid regular expression"),
    ({"patterns": ["x*"]}, "crisis_screen.patterns", "matches the empty string"),
    ({"phrases": "suicide"}, "crisis_screen.phrases", "valid list"),
    ({"patterns": {"a": 1}}, "crisis_screen.patterns", "valid list"),
    ({"message": "  "}, "crisis_screen.message", "must not be empty"),
    ({"enable": False}, "crisis_screen.enable", "Extra inputs"),
    ({"phrases": [], "patterns": []}, "crisis_screen", "phrases, extra_phrases and patterns are all empty"),
])
def test_a_bad_config_is_refused_naming_the_field(config, field, message):
    with pytest.raises(ValidationError) as e:
        app_args(config)
    text = str(e.value)
    assert field in text and re.search(message, text), text


def test_an_empty_lexicon_is_fine_when_the_screen_is_off():
    assert not app_args({"enabled": False, "phrases": [], "patterns": []}).crisis_screen.enabled


# ---- the pyfunc path: one respond call for the unscreened requests -------------------------------------------


class FakeResponder:
    """Answers each request with its first turn reversed; `batches` lists the requests of each call."""

    model_name = "escm"

    def __init__(self):
        self.batches: list[list[str]] = []

    def respond(self, requests):
        self.batches.append([r.context[0] for r in requests])
        return [Answer(r.context[0][::-1], "sad", [{"label": "sad", "prob": 0.5}], tokens_generated=2)
                for r in requests]


MIXED = [Request(["I lost my keys."]), Request(["I got the job!"]), Request(["I want to end my life."]),
         Request(["My cat is sick."])]


def test_a_mixed_batch_generates_only_the_unscreened_requests_in_order():
    responder = FakeResponder()
    answers = respond_screened(CrisisScreen(), responder.respond, MIXED)
    assert responder.batches == [["I lost my keys.", "I got the job!", "My cat is sick."]]
    assert [a.response for a in answers] == [".syek ym tsol I", "!boj eht tog I", DEFAULT_MESSAGE, ".kcis si tac yM"]
    assert [a.screen for a in answers] == [None, None, SCREEN, None]
    crisis = answers[2].body()
    assert crisis == {"response": DEFAULT_MESSAGE, "emotion": None, "emotion_top": [], "evidence": [],
                      "screened": True, "screen": "crisis"}
    assert answers[0].body()["screened"] is False


def test_a_batch_of_screened_requests_never_calls_the_model():
    responder = FakeResponder()
    answers = respond_screened(CrisisScreen(), responder.respond, [MIXED[2], Request(["thinking about suicide"])])
    assert responder.batches == [] and [a.screen for a in answers] == [SCREEN, SCREEN]
    assert respond_screened(CrisisScreen(CrisisScreenConfig(enabled=False)), responder.respond, MIXED[2:3])[0] \
        .response == ".efil ym dne ot tnaw I"


def test_the_pyfunc_model_screens_as_the_endpoint_does():
    from services.pyfunc_model import ResponderModel, screen_from

    model = ResponderModel()
    model.responder, model.screen = FakeResponder(), screen_from(None)
    out = model.predict(None, [{"context": r.context} for r in MIXED])
    assert [o["screened"] for o in out] == [False, False, True, False] and out[2]["response"] == DEFAULT_MESSAGE
    assert model.responder.batches == [["I lost my keys.", "I got the job!", "My cat is sick."]]
    model.screen = screen_from({"crisis_screen": {"enabled": False}})          # load_model(..., model_config=)
    assert not any(o["screened"] for o in model.predict(None, [{"context": r.context} for r in MIXED]))
    with pytest.raises(ValueError, match=r"(?s)model_config crisis_screen.*patterns\[0\] .\(. is not a valid"):
        screen_from({"crisis_screen": {"patterns": ["("]}})


# ---- the Serve path: Replica.answer screens before routing, queueing or generating ---------------------------


class Batcher:
    """A stand-in for a role's @serve.batch queue: the requests that arrive within 10 ms go to
    `Replica.generate` as one batch."""

    def __init__(self, replica: Replica, role: str):
        self.replica, self.role, self.pending = replica, role, []

    async def __call__(self, request: Request):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self.pending.append((request, future))
        if len(self.pending) == 1:
            loop.call_later(0.01, lambda: asyncio.ensure_future(self.flush()))
        return await future

    async def flush(self) -> None:
        batch, self.pending = self.pending, []
        results = await self.replica.generate(self.role, [r for r, _ in batch])
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)


class Counted:
    """Records the Replica's metric calls; `screened` goes to a real ServeMetrics (its counter's inc recorded)."""

    def __init__(self):
        from services.replica_metrics import ServeMetrics

        self.serve_metrics, self.incs, self.calls = ServeMetrics(), [], []
        self.serve_metrics.crisis_screened.inc = lambda value=1.0, tags=None: self.incs.append((value, tags))

    def screened(self, name):
        self.serve_metrics.screened(name)

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, *args))


def serve_replica(screen: CrisisScreen | None = None, responder: FakeResponder | None = None):
    metrics = Counted()
    replica = Replica("escm", "champion", 3600, lookup=None, load=None, metrics=metrics,
                      screen=screen or CrisisScreen())
    replica.queues = {role: Batcher(replica, role) for role in (CHAMPION, CHALLENGER)}
    if responder is not None:
        resolved = SimpleNamespace(name="escm", version="1", run_id="r1", source="models:/m-1")
        replica.slots[CHAMPION].loaded = Loaded(responder, resolved, 0.0, 0.0)
    return replica, metrics


async def answer_all(replica: Replica, requests: list[Request]):
    return await asyncio.gather(*(replica.answer(r, f"client-{i}") for i, r in enumerate(requests)))


def test_serve_path_answers_screened_requests_without_the_model_and_counts_them():
    responder = FakeResponder()
    replica, metrics = serve_replica(responder=responder)
    routed = asyncio.run(answer_all(replica, MIXED))
    assert responder.batches == [["I lost my keys.", "I got the job!", "My cat is sick."]]   # one batch of 3
    assert [r.answer.screen for r in routed] == [None, None, SCREEN, None]
    assert [r.loaded and r.loaded.version for r in routed] == ["1", "1", None, "1"]
    assert routed[2].answer.response == DEFAULT_MESSAGE and routed[2].answer.emotion is None
    assert metrics.incs == [(1.0, {"name": "escm"})]
    assert [c[0] for c in metrics.calls].count("answered") == 3                   # model series: the 3 generated
    asyncio.run(answer_all(replica, [Request(["I don't want to live anymore"])] * 2))
    assert len(metrics.incs) == 3 and len(responder.batches) == 1


def test_serve_path_answers_a_crisis_request_even_before_a_model_is_loaded():
    replica, metrics = serve_replica()
    (routed,) = asyncio.run(answer_all(replica, [Request(["I want to kill myself"])]))
    assert routed.answer.screen == SCREEN and routed.loaded is None
    with pytest.raises(NotServing):
        asyncio.run(answer_all(replica, [Request(["I lost my keys."])]))


def test_serve_path_with_the_screen_disabled_generates_every_request():
    responder = FakeResponder()
    replica, metrics = serve_replica(CrisisScreen(CrisisScreenConfig(enabled=False)), responder)
    routed = asyncio.run(answer_all(replica, MIXED))
    assert responder.batches == [[r.context[0] for r in MIXED]] and metrics.incs == []
    assert all(r.answer.screen is None and r.loaded.version == "1" for r in routed)


def test_the_counter_is_a_named_series_of_the_app():
    from services.replica_metrics import ServeMetrics

    counter = ServeMetrics().crisis_screened
    assert (counter._name, counter._tag_keys) == ("edp_crisis_screened_total", ("name",))


def test_the_http_route_returns_the_screened_body(monkeypatch):
    """POST /v1/respond through the deployment class (no Serve): the fixed message, flagged, model null."""
    from services import app, replica_metrics
    from tests.unit.test_schemas import _request

    monkeypatch.setattr(replica_metrics, "_replica_metrics", Counted())
    wrapper = app.ResponderDeployment.func_or_class                 # Serve's ingress subclass
    deployment = object.__new__(wrapper)
    super(wrapper, deployment).__init__({"mlflow_tracking_uri": "http://fake", "poll_interval_s": 3600,
                                         "crisis_screen": {"extra_phrases": ["walk into the sea"]}})
    body = json.dumps({"context": ["Some days I want to walk into the sea."]}).encode()
    response = asyncio.run(deployment.respond(_request([body], {"content-length": str(len(body))})))
    assert response.model_dump() == {"response": DEFAULT_MESSAGE, "emotion": None, "emotion_top": [],
                                     "evidence": [], "screened": True, "screen": "crisis", "model": None}
