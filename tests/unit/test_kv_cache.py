"""Incremental decoding (trainers.models.layers.KVCache): the same tokens and log-probs as recomputing the prefix."""

from __future__ import annotations

import pytest
import torch

from tests.unit import test_iamm
from tests.unit.model_batches import EMOTION_WORD_IDS, make_batch
from trainers.config import DecodeConfig
from trainers.decoding import beam_search, decode, greedy
from trainers.models import build_model
from trainers.models.layers import KVCache
from trainers.tokens import EOS, SOS

pytestmark = pytest.mark.usefixtures("one_thread")

# two blocks per decoder, so that a block's cache also feeds the next block; IAMM has two decoders (Dec_c, Dec_a)
# and the paper recipe's model settings (FFN ReLU after its last layer, states as word rows, reference graph)
PAPER = {"xavier_init": True, "state_from_words": True, "ffn_relu_out": True}
MODELS = [("transformer", {}), ("escm", {}), ("iamm", {}), ("escm", {"num_layers": 2}), ("iamm", {"num_layers": 2}),
          ("transformer", PAPER), ("escm", {**PAPER, "gcn_graph": "reference", "gcn_scaled": False}),
          ("iamm", PAPER)]
MAX_LEN = 12
IDS = [f"{name}-{overrides.get('num_layers', 1)}layer{'-paper' if overrides.get('ffn_relu_out') else ''}"
       for name, overrides in MODELS]


def reply_lengths(ids: torch.Tensor) -> list[int]:
    """Tokens up to and including EOS (all of them when there is none)."""
    return [row.index(EOS) + 1 if EOS in row else len(row) for row in ids.tolist()]


def model_and_batch(name: str, overrides: dict, B: int = 5, seed: int = 0):
    """A seeded tiny model and a batch of B contexts of different lengths (some with copyable OOV words). The
    EOS bias is raised until greedy replies end at different steps (an untrained model rarely stops)."""
    torch.manual_seed(seed)
    V = test_iamm.V if name == "iamm" else 60
    m = build_model(name, V, EMOTION_WORD_IDS, flavour="tiny", **overrides).eval()
    b = test_iamm.make_batch(B, seed=seed + 1) if name == "iamm" else make_batch(B, V, seed=seed + 1)
    assert len(set(b.context_mask.sum(1).tolist())) > 1
    for _ in range(40):
        if len(set(reply_lengths(greedy(m, b, MAX_LEN, kv_cache=False)))) > 1:
            return m, b
        with torch.no_grad():
            m.generator.proj.bias[EOS] += 0.25
    pytest.fail("no EOS bias makes the replies end at different steps")


@pytest.mark.parametrize("name,overrides", MODELS, ids=IDS)
def test_cached_decoding_gives_the_tokens_of_full_recomputation(name, overrides):
    m, b = model_and_batch(name, overrides)
    state = m.encode(b)
    for strategy in ("greedy", "beam", "sample"):
        cfg = dict(strategy=strategy, max_len=MAX_LEN, beam_size=3)
        cached, full = (decode(m, b, DecodeConfig(**cfg, kv_cache=kv_cache), torch.Generator().manual_seed(0), state)
                        for kv_cache in (True, False))
        assert torch.equal(cached, full), strategy


@pytest.mark.parametrize("name,overrides", MODELS, ids=IDS)
def test_cached_step_log_probs_match_full_recomputation_along_a_reply(name, overrides):
    """Every step's distribution over V + max_oov (vocabulary and copy parts) agrees, also when calls decode
    several positions at once (2, then 3 after the cached 2: the causal mask offset by the cached positions)."""
    m, b = model_and_batch(name, overrides)
    with torch.inference_mode():
        state = m.encode(b)
        reply = greedy(m, b, max_len=MAX_LEN, state=state, kv_cache=False)
        ys = torch.cat([torch.full_like(reply[:, :1], SOS), reply], dim=1)
        cache = m.start_cache()
        for t in (2, 5, *range(6, ys.size(1) + 1)):
            full = m.decode_step(state, ys[:, :t])
            step = m.decode_step(state, ys[:, :t], cache)
            assert cache.length == t
            torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)
    assert b.max_oov > 0  # the extended (copy-only) slots are compared too


def test_decoder_runs_on_the_newest_token_only_with_the_cache():
    m, b = model_and_batch("escm", {})
    widths = []
    m.decoder.register_forward_pre_hook(lambda module, args: widths.append(args[0].size(1)))
    out = greedy(m, b, max_len=6)
    assert widths == [1] * out.size(1)
    widths.clear()
    greedy(m, b, max_len=6, kv_cache=False)
    assert widths == list(range(1, out.size(1) + 1))


def test_beam_search_reorders_the_cache_with_the_hypotheses(monkeypatch):
    """Beams swap places from step to step here; a cache left in beam order would change the result."""
    m, b = model_and_batch("transformer", {}, B=3, seed=2)
    rows_seen, reorder = [], KVCache.reorder

    def spy(cache, index):
        rows_seen.append(index.tolist())
        reorder(cache, index)

    monkeypatch.setattr(KVCache, "reorder", spy)
    cached = beam_search(m, b, beam_size=4, max_len=10)
    assert any(rows != sorted(rows) or len(set(rows)) < len(rows) for rows in rows_seen)
    assert torch.equal(cached, beam_search(m, b, beam_size=4, max_len=10, kv_cache=False))


def test_a_cache_that_already_holds_every_position_is_refused():
    m, b = model_and_batch("transformer", {}, B=2)
    state, cache = m.encode(b), m.start_cache()
    ys = torch.full((2, 2), SOS)
    m.decode_step(state, ys, cache)
    with pytest.raises(ValueError, match="cache already holds 2"):
        m.decode_step(state, ys, cache)


def test_kv_cache_setting_is_validated():
    assert DecodeConfig().kv_cache is True
    with pytest.raises(ValueError, match="kv_cache"):
        DecodeConfig(kv_cache="no")
