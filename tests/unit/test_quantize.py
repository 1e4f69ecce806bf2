"""int8 weights (trainers.quantize, bundle format "int8-rowcol+fp16"): per-row quantization and its error bound,
which tensors qualify, the size of a full-vocabulary bundle, a round trip through a trained tiny model's bundle
(the same logits, nearly), and hostile weight files refused with the tensor named."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.integration.registry_models import train_tiny
from tests.unit.model_batches import make_batch
from trainers import artifacts, quantize
from trainers.artifacts import CONFIG, WEIGHTS, BundleError
from trainers.config import InferenceConfig
from trainers.data.emotions import EMOTIONS
from trainers.data.vocab import Vocab
from trainers.models import build_model
from trainers.models.interface import Targets
from trainers.tokens import SPECIALS

FULL_VOCAB = 20_572  # the full-ED vocabulary


def test_each_value_is_within_half_its_scales_and_each_rows_normalised_maximum_is_exact():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 300, generator=g) * torch.logspace(-3, 1, 64)[:, None] * torch.logspace(-1, 0, 300)
    w[5] = 0.0
    w[:, 7] = 0.0  # an all-zero column keeps factor 1
    q, scale, col = quantize.quantize_rows(w)
    assert q.dtype == torch.int8 and scale.dtype == col.dtype == torch.float32
    assert scale.shape == (64,) and col.shape == (300,) and float(col[7]) == 1.0 and bool((col > 0).all())
    assert int(q.abs().max()) == 127 and int(q.min()) >= -127
    back = quantize.dequantize_rows(q, scale, col)
    assert back.dtype == torch.float32
    assert bool(((back - w).abs() <= scale[:, None] * col[None, :] / 2 * (1 + 1e-5)).all())
    assert torch.equal(back[5], torch.zeros(300)) and float(scale[5]) == 0.0
    # each row's largest |W_ij / c_j| survives exactly (it sets the row's scale)
    assert torch.allclose((back / col).abs().amax(dim=1), (w / col).abs().amax(dim=1), rtol=1e-6)


def test_column_factors_cut_the_error_when_columns_differ_in_range():
    """Columns of different ranges (as a trained embedding's): dividing them out first beats one scale per row."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(2000, 300, generator=g) * torch.logspace(-1, 0, 300)
    q, scale, col = quantize.quantize_rows(w)
    rowcol = ((quantize.dequantize_rows(q, scale, col) - w) ** 2).mean()
    row_only_scale = w.abs().amax(dim=1) / quantize.QMAX
    row_only = ((torch.round(w / row_only_scale[:, None]) * row_only_scale[:, None] - w) ** 2).mean()
    assert rowcol < 0.5 * row_only


def test_only_big_two_dimensional_floating_tensors_are_int8_the_rest_float16_and_integers_as_is():
    state = {"emb": torch.randn(100, 20), "proj": torch.randn(20, 100), "small": torch.randn(10, 10),
             "norm": torch.randn(2000), "conv": torch.randn(10, 10, 20), "ids": torch.arange(3000)}
    stored = quantize.quantize_state(state, min_elements=2000)
    assert {k: v.dtype for k, v in stored.items()} == {
        "emb": torch.int8, "emb.__scale__": torch.float32, "emb.__colscale__": torch.float32,
        "proj": torch.int8, "proj.__scale__": torch.float32, "proj.__colscale__": torch.float32,
        "small": torch.float16, "norm": torch.float16, "conv": torch.float16, "ids": torch.int64}
    assert quantize.quantizes(torch.empty(FULL_VOCAB, 300), quantize.MIN_ELEMENTS)
    assert not quantize.quantizes(torch.empty(300, 300), quantize.MIN_ELEMENTS)  # attention/feed-forward: fp16
    back = quantize.dequantize_state(stored, state)
    assert all(back[k].dtype == v.dtype and back[k].shape == v.shape for k, v in state.items())
    assert torch.equal(back["ids"], state["ids"]) and torch.equal(back["small"], state["small"].half().float())


def full_vocab_bundle(tmp_path, weights_dtype, **overrides):
    """A Transformer with the full-ED vocabulary size (embedding 20,572 x 300) saved as a bundle."""
    vocab = Vocab([*SPECIALS, *EMOTIONS, *(f"w{i}" for i in range(FULL_VOCAB - len(SPECIALS) - len(EMOTIONS)))])
    overrides = {"flavour": "tiny", "emb_dim": 300, "d_model": 64, **overrides}
    model = build_model("transformer", len(vocab), vocab.emotion_ids(), **overrides)
    cfg = InferenceConfig(model="transformer")
    return artifacts.save_bundle(tmp_path / weights_dtype, cfg, model, vocab, weights_dtype=weights_dtype), model


def test_a_full_vocabulary_bundles_weights_shrink_about_four_times_and_load_dequantized(tmp_path):
    fp32, _ = full_vocab_bundle(tmp_path, "float32")
    int8, model = full_vocab_bundle(tmp_path, artifacts.INT8)
    stored = load_file(str(int8 / WEIGHTS))
    assert stored["embedding.weight"].dtype == stored["generator.proj.weight"].dtype == torch.int8  # 300 and 64 wide
    assert sum(v.dtype == torch.int8 for v in stored.values()) == 2
    size32, size8 = (fp32 / WEIGHTS).stat().st_size, (int8 / WEIGHTS).stat().st_size
    assert 3.8 < size32 / size8 < 4.0, (size32, size8)
    assert json.loads((int8 / CONFIG).read_text())["weights_dtype"] == "int8-rowcol+fp16"
    loaded = artifacts.load(int8)
    assert loaded.weights_dtype == "int8-rowcol+fp16"
    state = loaded.model.state_dict()
    for name, ref in model.state_dict().items():
        expected = quantize.dequantize_rows(*quantize.quantize_rows(ref)) if name in (
            "embedding.weight", "generator.proj.weight") else ref.half().float() if ref.is_floating_point() else ref
        assert state[name].dtype == ref.dtype and torch.equal(state[name], expected), name


def test_tied_embeddings_are_stored_once_and_tied_again_on_load(tmp_path):
    bundle, _ = full_vocab_bundle(tmp_path, artifacts.INT8, d_model=300, tie_embeddings=True)
    assert "generator.proj.weight" not in load_file(str(bundle / WEIGHTS))
    model = artifacts.load(bundle).model
    assert model.generator.proj.weight is model.embedding.weight
    assert model.embedding.weight.abs().sum() > 0


@pytest.fixture(scope="module")
def checkpoint(prepared_sample, tmp_path_factory, one_thread):
    return train_tiny(prepared_sample, tmp_path_factory.mktemp("int8-ckpt"), max_steps=2)[0]


@pytest.fixture
def int8_bundle(checkpoint, tmp_path):
    """The tiny model's bundle with a low threshold, so that its embedding (V x 32) and projection are int8."""
    loaded = artifacts.load(checkpoint)
    return artifacts.save_bundle(tmp_path / "int8", loaded.train_config(), loaded.model, loaded.vocab,
                                 weights_dtype=artifacts.INT8, int8_min_elements=4000)


def test_the_dequantized_tiny_model_gives_nearly_the_float32_log_probs(checkpoint, int8_bundle):
    stored = load_file(str(int8_bundle / WEIGHTS))
    assert stored["embedding.weight"].dtype == torch.int8 and "embedding.weight.__scale__" in stored
    ref, q = artifacts.load(checkpoint).model, artifacts.load(int8_bundle).model
    assert not torch.equal(ref.embedding.weight, q.embedding.weight)  # it really was quantized
    batch = make_batch(4, ref.vocab_size, seed=1)
    with torch.no_grad():
        out_ref, out_q = ref(batch, Targets.of(batch)), q(batch, Targets.of(batch))
        lp_ref = ref.decode_step(ref.encode(batch), batch.target_ids[:, :3])
        lp_q = q.decode_step(q.encode(batch), batch.target_ids[:, :3])
    finite = torch.isfinite(lp_ref)
    assert torch.equal(finite, torch.isfinite(lp_q))
    assert (lp_ref[finite] - lp_q[finite]).abs().max() < 0.05
    assert abs(float(out_ref.gen_loss) - float(out_q.gen_loss)) < 0.01


def _rewrite(bundle, change):
    stored = load_file(str(bundle / WEIGHTS))
    change(stored)
    save_file(stored, str(bundle / WEIGHTS))


def _bias(stored):
    """The name of a float16 bias in `stored`."""
    return next(k for k in sorted(stored) if k.endswith(".bias"))


HOSTILE = {
    "missing scale": (lambda s: s.pop("embedding.weight.__scale__"),
                      r"embedding\.weight is int8 but its scale tensor embedding\.weight\.__scale__ is missing"),
    "nan scale": (lambda s: s["embedding.weight.__scale__"].__setitem__(3, float("nan")),
                  r"scale tensor embedding\.weight\.__scale__ is corrupt"),
    "negative scale": (lambda s: s["embedding.weight.__scale__"].__setitem__(0, -1.0),
                       r"scale tensor embedding\.weight\.__scale__ is corrupt"),
    "float16 scale": (lambda s: s.__setitem__("embedding.weight.__scale__", s["embedding.weight.__scale__"].half()),
                      r"scale tensor embedding\.weight\.__scale__ is torch\.float16"),
    "short scale": (lambda s: s.__setitem__("embedding.weight.__scale__", s["embedding.weight.__scale__"][:-1]),
                    r"scale tensor embedding\.weight\.__scale__ .* expected torch\.float32 of shape"),
    "wrong dtype": (lambda s: s.__setitem__(_bias(s), s[_bias(s)].double()),
                    r"tensor \S+\.bias is stored as 1-D torch\.float64"),
    "wrong shape": (lambda s: s.__setitem__("embedding.weight", s["embedding.weight"][:-1].contiguous()),
                    r"tensor embedding\.weight has shape"),
    "orphan scale": (lambda s: s.__setitem__(_bias(s) + ".__scale__", torch.ones(1)),
                     r"scale tensor\(s\) \S+\.bias\.__scale__ belong to no int8 tensor"),
    "missing column factors": (lambda s: s.pop("embedding.weight.__colscale__"),
                               r"scale tensor embedding\.weight\.__colscale__ is missing"),
    "zero column factor": (lambda s: s["generator.proj.weight.__colscale__"].__setitem__(2, 0.0),
                           r"scale tensor generator\.proj\.weight\.__colscale__ is corrupt"),
    "wrong column count": (lambda s: s.__setitem__("embedding.weight.__colscale__", torch.ones(3)),
                           r"embedding\.weight\.__colscale__ .* expected torch\.float32 of shape \(\d+,\), "
                           r"one per column"),
    "missing tensor": (lambda s: s.pop("generator.proj.weight"), r"missing generator\.proj\.weight"),
    "extra tensor": (lambda s: s.__setitem__("evil", torch.zeros(2)), r"unexpected evil"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_hostile_int8_weights_file_is_refused_naming_the_tensor(int8_bundle, case):
    change, message = HOSTILE[case]
    _rewrite(int8_bundle, change)
    with pytest.raises(BundleError, match=r"model\.safetensors \(int8-rowcol\+fp16\): .*" + message):
        artifacts.load(int8_bundle)


def test_an_unreadable_weights_file_or_an_unknown_format_is_refused(int8_bundle):
    config = json.loads((int8_bundle / CONFIG).read_text())
    (int8_bundle / CONFIG).write_text(json.dumps({**config, "weights_dtype": "int4"}))
    with pytest.raises(BundleError, match=r"weights_dtype 'int4' is not one of float32, float16, int8-rowcol\+fp16"):
        artifacts.load(int8_bundle)
    (int8_bundle / CONFIG).write_text(json.dumps(config))
    (int8_bundle / WEIGHTS).write_bytes(b"\xff" * 64)
    with pytest.raises(BundleError, match=r"cannot read .*model\.safetensors"):
        artifacts.load(int8_bundle)
