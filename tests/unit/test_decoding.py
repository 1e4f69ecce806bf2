"""Decoding with a fake model whose next-token distribution is a table indexed by the last token."""

import itertools
import math

import pytest
import torch
from torch import nn

from trainers.config import DecodeConfig
from trainers.decoding import (
    beam_search,
    decode,
    greedy,
    ids_to_tokens,
    sample,
    top_k_top_p_filter,
)
from trainers.models.interface import Encoding
from trainers.tokens import EOS, PAD, SOS, UNK

A, B_ = 4, 5          # the two ordinary words of the fake vocabulary
V = 6                 # PAD UNK SOS EOS a b
ITOS = ["[PAD]", "[UNK]", "[SOS]", "[EOS]", "a", "b"]


class TableModel(nn.Module):
    """log p(y_t | y_<t) = log tables[table_id[b], y_{t-1}]; each example picks its table."""

    def __init__(self, tables: torch.Tensor):
        super().__init__()
        self.log_tables = tables.log()                      # (N, V_ext, V_ext)
        self.calls, self.longest_ys = 0, 0
        self.seen_inference_mode, self.seen_training = [], []

    def encode(self, batch):  # one memory position per example, "copying" its table id
        table_id = batch["table_id"][:, None]                # (B, 1)
        return Encoding(table_id.float()[..., None], table_id >= 0, table_id, batch["max_oov"])

    def decode_step(self, state, ys):
        assert ys.dim() == 2 and bool((ys[:, 0] == SOS).all())
        assert state.memory.size(0) == ys.size(0)          # state rows follow the (beam-expanded) batch
        self.calls += 1
        self.longest_ys = max(self.longest_ys, ys.size(1))
        self.seen_inference_mode.append(torch.is_inference_mode_enabled())
        self.seen_training.append(self.training)
        lp = self.log_tables[state.ext_ids[:, 0], ys[:, -1]]  # (B, V_ext)
        assert lp.size(-1) == V + state.max_oov
        return lp


def table(rows: dict[int, dict[int, float]], v_ext: int = V, eps: float = 1e-4) -> torch.Tensor:
    """(v_ext, v_ext) row-stochastic table: given probabilities, eps elsewhere, rows renormalised."""
    t = torch.full((v_ext, v_ext), eps, dtype=torch.float64)
    for prev, dist in rows.items():
        for tok, p in dist.items():
            t[prev, tok] = p
    return t / t.sum(dim=1, keepdim=True)


def batch_of(table_ids, max_oov=0):
    return {"table_id": torch.tensor(table_ids), "max_oov": max_oov}


# Greedy is myopic on T_MYOPIC: SOS->a (0.6) then a->EOS (0.4) gives 0.24,
# while SOS->b (0.4) then b->EOS (0.9) gives 0.36.
T_MYOPIC = table({SOS: {A: 0.6, B_: 0.4}, A: {A: 0.3, B_: 0.3, EOS: 0.4}, B_: {EOS: 0.9, A: 0.05, B_: 0.05}})
T_LONG = table({SOS: {B_: 0.9}, B_: {A: 0.9}, A: {EOS: 0.9}})          # b a EOS
T_NEVER_ENDS = table({r: {A: 0.9} for r in range(V)})                   # a a a ...


def test_greedy_follows_argmax_path_and_pads_after_eos():
    model = TableModel(torch.stack([T_MYOPIC, T_LONG]))
    out = greedy(model, batch_of([0, 1]), max_len=10)
    assert out.tolist() == [[A, EOS, PAD], [B_, A, EOS]]
    assert model.calls == 3                                  # early exit once both rows finished


def test_greedy_respects_max_len():
    model = TableModel(T_NEVER_ENDS.unsqueeze(0))
    out = greedy(model, batch_of([0, 0]), max_len=4)
    assert out.tolist() == [[A] * 4] * 2
    assert model.calls == 4 and model.longest_ys == 4       # SOS + 3 generated tokens at the last call


def test_decoding_runs_in_inference_and_eval_mode_and_restores_training():
    model = TableModel(T_LONG.unsqueeze(0)).train()
    greedy(model, batch_of([0]), max_len=5)
    beam_search(model, batch_of([0]), beam_size=2, max_len=5)
    assert all(model.seen_inference_mode) and not any(model.seen_training)
    assert model.training


def test_beam_beats_myopic_greedy():
    model = TableModel(T_MYOPIC.unsqueeze(0))
    assert greedy(model, batch_of([0]), max_len=5).tolist() == [[A, EOS]]
    for alpha in (0.0, 1.0):
        assert beam_search(model, batch_of([0]), beam_size=2, max_len=5, length_penalty=alpha).tolist() \
            == [[B_, EOS]]


@pytest.mark.parametrize("beam_size", [2, 3])
def test_beam_keeps_examples_apart_in_a_batch(beam_size):
    # Tiling the state (repeat instead of repeat_interleave) or a wrong reorder would mix the two
    # tables; the second example also outlives the first.
    model = TableModel(torch.stack([T_MYOPIC, T_LONG]))
    out = beam_search(model, batch_of([0, 1]), beam_size=beam_size, max_len=6, length_penalty=0.0)
    assert out.tolist() == [[B_, EOS, PAD], [B_, A, EOS]]


def random_tables(n, v_ext, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, v_ext, v_ext, generator=g, dtype=torch.float64).softmax(dim=-1)  # no ties


def brute_force_best(tab: torch.Tensor, max_len: int, alpha: float) -> list[int]:
    """Best hypothesis over every sequence of <= max_len tokens (cut at the first EOS)."""
    v_ext, best, best_score = tab.size(0), None, -math.inf
    for seq in itertools.product(range(v_ext), repeat=max_len):
        seq = list(seq[: seq.index(EOS) + 1]) if EOS in seq else list(seq)
        logp, prev = 0.0, SOS
        for tok in seq:
            logp, prev = logp + math.log(tab[prev, tok]), tok
        score = logp / ((5 + len(seq)) / 6) ** alpha
        if score > best_score + 1e-12:
            best, best_score = seq, score
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_exhaustive_beam_equals_brute_force(alpha):
    # With beam_size >= the number of hypotheses, beam search is exhaustive: it must return the
    # brute-force optimum under the same length-penalised score (finished hypotheses included).
    v_ext, max_len = V, 3                                     # 6 + 36 + 216 prefixes
    tabs = random_tables(3, v_ext, seed=int(alpha * 10) + 1)
    tabs[:, :, EOS] *= 4                                      # make EOS likely enough to matter
    tabs = tabs / tabs.sum(-1, keepdim=True)
    model = TableModel(tabs)
    out = beam_search(model, batch_of([0, 1, 2]), beam_size=v_ext ** max_len, max_len=max_len,
                      length_penalty=alpha)
    for b in range(3):
        best = brute_force_best(tabs[b], max_len, alpha)
        row = out[b].tolist()
        assert row[: len(best)] == best and all(t == PAD for t in row[len(best):])


def test_beam_size_one_equals_greedy():
    tabs = random_tables(4, V, seed=7)
    model = TableModel(tabs)
    batch = batch_of([0, 1, 2, 3])
    for alpha in (0.0, 1.0):
        assert torch.equal(beam_search(model, batch, beam_size=1, max_len=8, length_penalty=alpha),
                           greedy(model, batch, max_len=8))


def test_sampling_with_top_k_one_equals_greedy():
    model = TableModel(random_tables(4, V, seed=3))
    batch = batch_of([0, 1, 2, 3])
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(model, batch, max_len=8, top_k=1, generator=g), greedy(model, batch, max_len=8))


def test_sampling_is_reproducible_and_stays_in_the_nucleus():
    # SOS row: a .5, b .3, EOS .15, UNK .05. top_p = .75 keeps {a, b} only.
    t = table({SOS: {A: 0.5, B_: 0.3, EOS: 0.15, UNK: 0.05}}, eps=1e-9)
    model = TableModel(t.unsqueeze(0))
    batch = batch_of([0] * 2000)
    first = sample(model, batch, max_len=1, top_p=0.75, generator=torch.Generator().manual_seed(1))[:, 0]
    again = sample(model, batch, max_len=1, top_p=0.75, generator=torch.Generator().manual_seed(1))[:, 0]
    assert torch.equal(first, again)
    assert set(first.tolist()) == {A, B_}
    assert (first == A).float().mean().item() == pytest.approx(0.5 / 0.8, abs=0.05)
    unfiltered = sample(model, batch, max_len=1, generator=torch.Generator().manual_seed(1))[:, 0]
    assert {EOS, UNK} <= set(unfiltered.tolist())


def test_top_k_top_p_filter_keeps_minimal_nucleus():
    # probabilities in vocabulary order .15 .5 .05 .3 -> ranked: .5 (id 1), .3 (id 3), .15 (id 0), .05 (id 2)
    logits = torch.tensor([[0.15, 0.5, 0.05, 0.3]]).log()
    kept = lambda **kw: set(torch.isfinite(top_k_top_p_filter(logits, **kw))[0].nonzero()[:, 0].tolist())  # noqa: E731
    assert kept(top_p=0.4) == {1}                 # .5 alone reaches .4
    assert kept(top_p=0.75) == {1, 3}             # .5 + .3 = .8 >= .75
    assert kept(top_p=0.85) == {1, 3, 0}          # .95 >= .85
    assert kept(top_p=1.0) == {0, 1, 2, 3}
    assert kept(top_k=2) == {1, 3}
    assert kept(top_k=3, top_p=0.4) == {1}
    assert kept(top_k=0, top_p=0.01) == {1}       # the best token always survives
    # kept logits are unchanged
    assert torch.equal(top_k_top_p_filter(logits, top_k=2)[0, [1, 3]], logits[0, [1, 3]])


def test_sampled_rows_stop_after_eos():
    t = table({SOS: {EOS: 0.5, A: 0.5}, A: {EOS: 0.5, A: 0.5}})
    model = TableModel(t.unsqueeze(0))
    out = sample(model, batch_of([0] * 64), max_len=6, generator=torch.Generator().manual_seed(0))
    for row in out.tolist():
        if EOS in row:
            assert all(tok == PAD for tok in row[row.index(EOS) + 1:])
        assert PAD not in row[: row.index(EOS) if EOS in row else len(row)]


def test_decode_dispatch_and_config_validation():
    model = TableModel(torch.stack([T_MYOPIC, T_LONG]))
    batch = batch_of([0, 1])
    assert torch.equal(decode(model, batch, DecodeConfig()), greedy(model, batch, 30))
    assert torch.equal(decode(model, batch, DecodeConfig("beam", beam_size=2)),
                       beam_search(model, batch, 2, 30))
    assert torch.equal(decode(model, batch, DecodeConfig("sample", top_k=1)), greedy(model, batch, 30))
    for kwargs, field in [({"strategy": "nucleus"}, "strategy"), ({"max_len": 0}, "max_len"),
                          ({"beam_size": 0}, "beam_size"), ({"top_k": -1}, "top_k"),
                          ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                          ({"temperature": 0.0}, "temperature"),
                          ({"length_penalty": -1.0}, "length_penalty")]:
        with pytest.raises(ValueError, match=field):
            DecodeConfig(**kwargs)
    with pytest.raises(ValueError, match="temperature"):
        sample(model, batch, 5, temperature=-1.0)


def test_greedy_can_copy_an_oov_and_ids_to_tokens_maps_it():
    # max_oov = 2 -> V_ext = 8; the table prefers the first OOV slot (id 6), then EOS.
    t = table({SOS: {6: 0.9}, 6: {EOS: 0.9}}, v_ext=V + 2)
    model = TableModel(t.unsqueeze(0))
    out = greedy(model, batch_of([0], max_oov=2), max_len=5)
    assert out.tolist() == [[6, EOS]]
    assert ids_to_tokens(out, ITOS, [["zebra"]]) == [["zebra"]]


def test_ids_to_tokens():
    ids = torch.tensor([[A, 6, EOS, B_], [7, B_, PAD, PAD], [SOS, 7, A, EOS]])
    oovs = [["zebra"], ["x", "yak"], ["only-one"]]
    assert ids_to_tokens(ids, ITOS, oovs) == [["a", "zebra"], ["yak", "b"], ["[UNK]", "a"]]
    with pytest.raises(ValueError, match="oov_lists"):
        ids_to_tokens(ids, ITOS, oovs[:2])


def test_structural_tokens_listed_by_the_model_are_never_generated():
    """A model that would emit `a` (think: a copied [CLS]) never does once it lists it in never_generate."""
    model = TableModel(table({r: {A: 0.8, EOS: 0.15} for r in range(V)}).unsqueeze(0))
    assert greedy(model, batch_of([0]), max_len=5)[0, 0].item() == A
    model.never_generate = (A,)
    assert greedy(model, batch_of([0]), max_len=5)[0].tolist() == [EOS]
    assert beam_search(model, batch_of([0]), beam_size=2, max_len=5)[0].tolist() == [EOS]


def test_a_given_encoder_state_is_used_instead_of_encoding_again():
    model = TableModel(T_LONG.unsqueeze(0))
    state = model.encode(batch_of([0]))
    model.encode = lambda batch: pytest.fail("decode encoded the batch again")
    for strategy in ("greedy", "beam", "sample"):
        ids = decode(model, batch_of([0]), DecodeConfig(strategy=strategy, beam_size=2, top_k=1), state=state)
        assert ids[0].tolist() == [B_, A, EOS]
