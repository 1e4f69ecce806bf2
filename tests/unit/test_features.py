"""One featurisation path (trainers.data.features): training splits and serving requests encode alike."""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch

from trainers.config import InferenceConfig
from trainers.data.collate import encode_example, pad_escm
from trainers.data.features import ExampleFeatures, example_texts, featurize
from trainers.inference import Request, Responder
from trainers.models import build_model


def test_featurize_indexes_the_texts_and_defaults_the_situation_to_the_first_turn():
    index = {"hi": 0, "i lost my keys": 1, "oh no": 2, "keys": 3}
    assert featurize(["hi", "i lost my keys"], "keys", "oh no", index, emotion=5) == ExampleFeatures(
        context=(0, 1), situation=3, target=2, emotion=5)
    assert featurize(["i lost my keys"], None, None, index) == ExampleFeatures(context=(1,), situation=1)
    assert example_texts(["a", "b"], None) == ["a", "b", "a"]
    assert example_texts(["a"], "s", "t") == ["a", "t", "s"]


def test_a_split_keeps_each_examples_features(prepared_sample):
    split = prepared_sample.split("valid")
    assert len(split.features) == len(split.examples)
    for ex, f in zip(split.examples, split.features):
        assert [split.texts[t] for t in f.context] == list(ex.context)
        assert (split.texts[f.situation], split.texts[f.target], f.emotion) == (ex.situation, ex.target,
                                                                                ex.emotion_id)


@pytest.fixture(scope="module")
def responder(prepared_sample):
    vocab = prepared_sample.vocab
    torch.manual_seed(0)
    model = build_model("escm", len(vocab), vocab.emotion_ids(), flavour="tiny")
    return Responder(InferenceConfig(data=prepared_sample.manifest["settings"]), model, vocab)


def test_a_request_encodes_like_the_training_example_with_the_same_texts(prepared_sample, responder):
    split, V = prepared_sample.split("valid"), len(prepared_sample.vocab)
    i = max(range(len(split.examples)), key=lambda k: len(split.examples[k].context))
    ex = split.examples[i]
    trained = encode_example(split, split.features[i], V)
    (served,), _ = responder.encode([Request(list(ex.context), ex.situation)])
    for name in ("context_ids", "context_ext_ids", "context_state", "context_pos", "edges", "situation_ids"):
        assert np.array_equal(getattr(served, name), getattr(trained, name)), name
    assert served.oov == trained.oov and all(np.array_equal(a, b) for a, b in zip(served.turns, trained.turns))
    assert served.target_ids.tolist() == [trained.target_ids[-1]] and served.emotion is None


def test_a_request_batch_has_no_gold_emotion_and_gets_answers(responder):
    requests = [Request(["I passed my driving test!"]), Request(["My dog ran away.", "Oh no!"], "I lost my dog")]
    encoded, batch = responder.encode(requests)
    given = lambda b: {f.name for f in fields(b) if getattr(b, f.name) is not None}  # noqa: E731
    assert given(batch) == given(pad_escm(encoded))
    assert batch.emotion is None and batch.target_ids.shape == (2, 1)
    answers = responder.respond(requests)
    assert len(answers) == 2 and all(a.emotion in {t["label"] for t in a.emotion_top} for a in answers)
