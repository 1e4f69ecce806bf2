"""Unseen context words (`unseen_vectors`, trainers/data/unseen.py): at evaluation and serving a context word outside
the vocabulary that has a pretrained vector is embedded with it (scaled as training scaled the vectors) instead of
[UNK], is still copyable, and both `edp evaluate` and the Responder (Serve replica, pyfunc) encode it the same way."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cluster.console import unseen_line
from trainers import artifacts, release
from trainers.batching import tensor_split
from trainers.config import DecodeConfig, InferenceConfig, TrainConfig, as_recorded
from trainers.data.collate import encode_example, pad_escm, pad_iamm
from trainers.data.emotions import EMOTIONS
from trainers.data.features import ExampleFeatures, TextFeatures
from trainers.data.records import DataError
from trainers.data.unseen import UnseenVectors, unseen_vectors_for
from trainers.data.vectors import WordVectors
from trainers.data.vocab import Vocab
from trainers.decoding import decode, ids_to_tokens
from trainers.evaluation import evaluate_model
from trainers.inference import Request, Responder
from trainers.loop import init_word_embedding
from trainers.models import build_model
from trainers.tokens import SPECIALS, UNK

DIM, SCALE = 32, 0.5  # the tiny models' emb_dim; a recorded vector_scale other than 1
VOCAB = Vocab(list(SPECIALS) + list(EMOTIONS) + ["i", "saw", "a", "and", "it", "ran", "wow", "!"])
VEC = {"zebra": np.linspace(-1, 1, DIM, dtype=np.float32), "Quokka": np.linspace(2, 0, DIM, dtype=np.float32)}


def write_glove(path, vectors: dict[str, np.ndarray]):
    path.write_text("".join(f"{w} {' '.join(f'{x:.6f}' for x in v)}\n" for w, v in vectors.items()))
    return path


@pytest.fixture(scope="module")
def lookup(tmp_path_factory):
    path = write_glove(tmp_path_factory.mktemp("vec") / "v.txt", VEC)
    return UnseenVectors(WordVectors(str(path), DIM), SCALE)


def texts_of(sentences: list[str]) -> TextFeatures:
    """Hand-made features: every token attached to the first (the root, its own head)."""
    toks = [tuple(s.split()) for s in sentences]
    return TextFeatures(texts=sentences, tokens=toks, ids=[VOCAB.encode(t) for t in toks],
                        pos=[[2] * len(t) for t in toks], heads=[[0] * len(t) for t in toks],
                        deps=[[2] * len(t) for t in toks], sents=[[0] for _ in toks], knowledge=[{} for _ in toks])


# "zebra" has a vector, "quokka" one through a casing fallback (the source has "Quokka"), "blorp" none
TEXTS = texts_of(["i saw a zebra and a blorp !", "wow a zebra !", "a quokka ran", "a zebra !"])
EXAMPLE = ExampleFeatures(context=(0, 1), situation=2, target=3, emotion=4)


def encoded(unseen=None, texts=TEXTS, example=EXAMPLE):
    return encode_example(texts, example, len(VOCAB), unseen=unseen)


def tiny(name: str):
    torch.manual_seed(0)
    extra = {"has_knowledge": False} if name == "iamm" else {}
    return build_model(name, len(VOCAB), VOCAB.emotion_ids(), flavour="tiny", **extra).eval()


def pad_for(name: str):
    return pad_iamm if name == "iamm" else pad_escm


def test_word_vectors_casing_fallbacks_and_missing(tmp_path):
    path = write_glove(tmp_path / "v.txt", {"quokka": VEC["zebra"], "Zebra": VEC["Quokka"], "zebra": VEC["zebra"]})
    vectors = WordVectors(str(path), DIM)
    assert np.allclose(vectors.get("zebra"), VEC["zebra"], atol=1e-6)  # the exact form beats an earlier fallback
    assert np.allclose(vectors.get("ZEBRA"), VEC["Quokka"], atol=1e-6)  # fallbacks: the first line, as load_vectors
    assert np.allclose(vectors.get("Quokka"), VEC["zebra"], atol=1e-6)  # lower-cased
    assert vectors.get("blorp") is None


def test_an_unseen_word_with_a_vector_gets_it_scaled_and_keeps_its_copy_slot(lookup):
    off, on = encoded(), encoded(lookup)
    assert off.unseen_vectors is None and off.context_unseen is None
    assert np.array_equal(on.context_ext_ids, off.context_ext_ids) and on.oov == off.oov == ["zebra", "blorp"]
    tokens = ["[CLS]"] + "i saw a zebra and a blorp ! wow a zebra !".split()
    rows = {t: r for t, r in zip(tokens, on.context_unseen.tolist())}
    assert rows["zebra"] == 1 and rows["blorp"] == 0 and set(on.context_unseen[np.array(tokens) != "zebra"]) == {0}
    assert np.allclose(on.unseen_vectors[0], SCALE * VEC["zebra"], atol=1e-6)
    assert np.allclose(on.unseen_vectors[on.situation_unseen[1] - 1], SCALE * VEC["Quokka"], atol=1e-6)
    assert [t.tolist() for t in on.turn_unseen] == [[0, 0, 0, 1, 0, 0, 0, 0], [0, 0, 1, 0]]


@pytest.mark.parametrize("name", ["transformer", "escm", "iamm"])
def test_the_encoder_input_holds_the_scaled_vector_and_its_output_changes(name, lookup):
    model, pad = tiny(name), pad_for(name)
    off, on = pad([encoded()]), pad([encoded(lookup)])
    scaled = torch.from_numpy(SCALE * VEC["zebra"]) * math.sqrt(DIM)
    if name == "iamm":
        E_off, E_on = model.embed_inputs(off), model.embed_inputs(on)
        zebra = on.utt_unseen > 0
        assert torch.allclose(E_on["E_u"][zebra], scaled.expand(int(zebra.sum()), -1))
        assert torch.equal(E_on["E_u"][~zebra], E_off["E_u"][~zebra])  # blorp keeps [UNK]
        quokka = on.situation_unseen > 0
        assert torch.allclose(E_on["E_s"][quokka][0], torch.from_numpy(SCALE * VEC["Quokka"]) * math.sqrt(DIM))
    else:
        E_off, E_on = model.embed_context(off), model.embed_context(on)
        zebra = on.context_unseen > 0
        state = model.embed_state(on.context_state)[zebra]
        assert torch.allclose(E_on[zebra] - state, scaled.expand(int(zebra.sum()), -1), atol=1e-6)
        assert torch.equal(E_on[~zebra], E_off[~zebra])
        if name == "escm":  # H_ctx is Enc_ctx of exactly that input
            H_ctx = model.enc_ctx(E_on, on.context_mask)
            assert torch.allclose(model.encode(on).memory[..., :H_ctx.size(-1)], H_ctx, atol=1e-6)
    with torch.no_grad():
        assert not torch.allclose(model.encode(on).memory, model.encode(off).memory)


@pytest.mark.parametrize("name", ["transformer", "escm", "iamm"])
def test_no_vector_found_reproduces_the_option_off_exactly(name, tmp_path):
    nothing = UnseenVectors(WordVectors(str(write_glove(tmp_path / "v.txt", {"elsewhere": VEC["zebra"]})), DIM), 2.0)
    model, pad = tiny(name), pad_for(name)
    off, empty = pad([encoded()]), pad([encoded(nothing)])
    assert off.unseen_vectors is None and empty.unseen_vectors is not None and not empty.context_unseen.any()
    with torch.no_grad():
        a, b = model.encode(off), model.encode(empty)
        assert torch.equal(a.memory, b.memory)
        cfg = DecodeConfig(max_len=6)
        assert torch.equal(decode(model, off, cfg), decode(model, empty, cfg))


def test_the_pointer_copies_the_unseen_word_into_the_decoded_text(lookup):
    model = tiny("escm")
    with torch.no_grad():  # always copy: p_gen ~ 0
        model.generator.p_gen.weight.zero_()
        model.generator.p_gen.bias.fill_(-50.0)
    texts = texts_of(["zebra", "zebra", "zebra"])
    example = encoded(lookup, texts, ExampleFeatures(context=(0,), situation=1, target=2))
    batch = pad_escm([example])
    assert batch.context_unseen.tolist() == [[0, 1]]
    ids = decode(model, batch, DecodeConfig(max_len=2))
    assert ids_to_tokens(ids.tolist(), VOCAB.itos, [example.oov]) == [["zebra", "zebra"]]


def test_training_batches_never_carry_vectors_and_a_mixed_batch_is_refused(lookup):
    with pytest.raises(ValueError, match="unseen-word vectors"):
        pad_escm([encoded(), encoded(lookup)])


def test_the_setting_off_by_default_on_under_paper_and_off_when_a_saved_run_lacks_it():
    assert TrainConfig(model="escm").unseen_vectors is False
    assert TrainConfig.model_validate({"model": "escm", "recipe": "paper"}).unseen_vectors is True
    old_paper_run = TrainConfig.model_validate({"model": "escm", "recipe": "paper"}).model_dump()
    del old_paper_run["unseen_vectors"], old_paper_run["vector_scale"]
    assert as_recorded(old_paper_run)["unseen_vectors"] is False
    assert as_recorded(old_paper_run)["vector_scale"] == 1.0  # embedding_init: vectors -> their own scale
    assert InferenceConfig.of_run(old_paper_run).unseen_vectors is False
    old_platform_run = {**TrainConfig(model="escm").model_dump(), "vector_scale": None}
    assert as_recorded(old_platform_run)["vector_scale"] is None  # rescaled: the factor is unknown


def test_the_released_bundle_has_no_setting_and_runs_without_unseen_vectors():
    directory = release.MODELS_DIR / "escm-ed"
    if not directory.is_dir():
        pytest.skip("no released escm-ed bundle")
    loaded = artifacts.load(directory)
    assert "unseen_vectors" not in loaded.run_config
    assert loaded.train_config().unseen_vectors is False and loaded.inference_config().unseen_vectors is False
    assert loaded.inference_config().vector_scale == 1.0


class _Prepared:
    path = "prepared"

    def __init__(self, vectors, rows):
        self._vectors, self._rows = vectors, rows

    def vectors(self):
        return self._vectors

    def vector_rows(self):
        return self._rows


def test_training_returns_the_factor_it_applied_to_the_vectors():
    g = np.random.default_rng(0)
    vectors = g.normal(0, 3, size=(50, DIM)).astype(np.float32)
    vectors[0] = 0
    weight = torch.nn.Embedding(50, DIM).weight
    factor = init_word_embedding(weight, _Prepared(vectors, np.ones(50, bool)), "rescaled")
    assert torch.allclose(weight.detach(), torch.from_numpy(vectors) * factor, atol=1e-5) and factor < 1
    assert init_word_embedding(weight, _Prepared(vectors, np.ones(50, bool)), "vectors") == 1.0
    assert init_word_embedding(weight, None, "vectors") is None
    assert init_word_embedding(weight, None, "rescaled") is None


def test_a_bad_or_missing_vector_source_is_named(tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match=f"data.vectors='{missing}'.*not found"):
        unseen_vectors_for(InferenceConfig(data={"vectors": missing}, unseen_vectors=True, vector_scale=1.0), DIM)
    bad = tmp_path / "bad.txt"
    bad.write_text("zebra 1 2 3\n")
    with pytest.raises(DataError, match="bad.txt:1: expected a word and 32 numbers"):
        unseen_vectors_for(InferenceConfig(data={"vectors": str(bad)}, unseen_vectors=True, vector_scale=1.0), DIM)
    with pytest.raises(DataError, match="'none'"):
        unseen_vectors_for(InferenceConfig(data={"vectors": "none"}, unseen_vectors=True, vector_scale=1.0), DIM)
    with pytest.raises(DataError, match="does not record vector_scale"):
        unseen_vectors_for(InferenceConfig(data={"vectors": missing}, unseen_vectors=True), DIM)
    assert unseen_vectors_for(InferenceConfig(data={"vectors": missing}), DIM) is None  # off: nothing is loaded


def test_serving_refuses_to_load_with_a_missing_vector_source(prepared_sample, tmp_path):
    settings = {**prepared_sample.manifest["settings"], "vectors": str(tmp_path / "gone.txt")}
    cfg = InferenceConfig(data=settings, unseen_vectors=True, vector_scale=1.0)
    with pytest.raises(DataError, match="gone.txt"):
        Responder(cfg, tiny("escm"), VOCAB)


@pytest.fixture(scope="module")
def sample_unseen(prepared_sample, tmp_path_factory):
    """A valid example of the sample with unseen context words, a vector file for all of them but one, and the
    config of a run that uses it."""
    split = prepared_sample.split("valid")
    i = next(k for k, f in enumerate(split.features)
             if sum(w == UNK for t in f.context for w in split.ids[t]) >= 2)
    words = list(dict.fromkeys(tok for t in split.features[i].context for w, tok in zip(split.ids[t], split.tokens[t])
                               if w == UNK))
    g = np.random.default_rng(1)
    path = write_glove(tmp_path_factory.mktemp("sample-vec") / "v.txt",
                       {w: g.normal(size=DIM).astype(np.float32) for w in words[1:]})
    settings = {**prepared_sample.manifest["settings"], "vectors": str(path)}
    return i, words, InferenceConfig(model="escm", data=settings, unseen_vectors=True, vector_scale=SCALE)


def test_evaluation_and_serving_encode_the_same_text_alike(prepared_sample, sample_unseen):
    i, words, cfg = sample_unseen
    split, vocab = prepared_sample.split("valid"), prepared_sample.vocab
    torch.manual_seed(0)
    model = build_model("escm", len(vocab), vocab.emotion_ids(), flavour="tiny")
    data = tensor_split(TrainConfig(model="escm"), split, len(vocab), torch.device("cpu"),
                        unseen_vectors_for(cfg, DIM))  # what edp evaluate encodes
    (served,), batch = Responder(cfg, model, vocab).encode([Request(list(split.examples[i].context),
                                                                    split.examples[i].situation)])
    evaluated = data.encoded[i]
    for name in ("context_ids", "context_ext_ids", "context_unseen", "unseen_vectors", "situation_unseen"):
        assert np.array_equal(getattr(served, name), getattr(evaluated, name)), name
    assert served.oov == evaluated.oov == words
    features = split.features[i]
    tokens = ["[CLS]"] + [tok for t in features.context for tok in split.tokens[t]]
    assert len(tokens) == len(evaluated.context_ids)
    for tok, row in zip(tokens, evaluated.context_unseen.tolist()):
        assert (row > 0) == (tok in words[1:]), tok  # words[0] has no vector: [UNK]
    padded = pad_escm([evaluated])
    assert torch.equal(batch.unseen_vectors, padded.unseen_vectors)
    assert torch.equal(batch.context_unseen, padded.context_unseen)


def test_edp_evaluate_applies_the_setting_and_its_override(prepared_sample, sample_unseen, sample_dir, tmp_path):
    _, _, cfg = sample_unseen
    vocab = prepared_sample.vocab
    torch.manual_seed(0)
    model = build_model("escm", len(vocab), vocab.emotion_ids(), flavour="tiny")
    bundle = artifacts.save_bundle(tmp_path / "bundle", cfg, model, vocab)
    kwargs = {"decode": {"max_len": 3}, "bf16": False}
    on = evaluate_model(bundle, str(sample_dir), "valid", tmp_path / "on", **kwargs)
    off = evaluate_model(bundle, str(sample_dir), "valid", tmp_path / "off", unseen_vectors=False, **kwargs)
    assert on["unseen_vectors"]["enabled"] and not on["unseen_vectors"]["override"]
    assert on["unseen_vectors"]["examples_with_unseen_vector"] >= 1 and on["unseen_vectors"]["scale"] == SCALE
    assert (off["unseen_vectors"]["enabled"], off["unseen_vectors"]["override"]) == (False, True)
    assert off["unseen_vectors"]["model_setting"] is True and "source" not in off["unseen_vectors"]
    assert "override of the model's setting: on" in unseen_line(off["unseen_vectors"])
    assert on["metrics"]["ppl"] != off["metrics"]["ppl"]
    lines = [json.loads(x) for x in (tmp_path / "on" / "predictions.jsonl").read_text().splitlines()]
    assert len(lines) == on["examples"]
