"""Unit tests for trainers.models: interface, masks, ablations, overfitting, copying, schedule, loss."""

from __future__ import annotations

import math
from dataclasses import fields, replace

import pytest
import torch

from tests.unit.model_batches import EMOTION_WORD_IDS, UNK, collate, make_batch, make_example
from trainers.models import MODELS, build_model, config_for
from trainers.models.interface import Targets
from trainers.models.output import label_smoothed_nll

V = 60
VARIANTS = [("transformer", {}), ("escm", {}), ("escm", {"no_desv": True}), ("escm", {"no_dcgcn": True}),
            ("escm", {"no_vr": True}), ("escm", {"no_vp": True}), ("escm", {"no_vdes": True})]
IDS = [f"{n}-{next(iter(o), 'full')}" for n, o in VARIANTS]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(name="escm", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(name, V, EMOTION_WORD_IDS, flavour="tiny", **overrides).eval()


# ---------------------------------------------------------------------------------------------- table


def test_special_ids_are_the_vocabulary_positions_of_their_tokens():
    from trainers import tokens
    from trainers.data.emotions import EMOTIONS, NUM_EMOTIONS
    from trainers.data.vocab import Vocab
    from trainers.models import output
    vocab = Vocab.build([["hello"]])
    for name in ("PAD", "UNK", "SOS", "EOS", "CLS", "SPK", "LSN", "SIT"):
        assert vocab.stoi[f"[{name}]"] == getattr(tokens, name)
    assert vocab.emotion_ids() == list(range(len(tokens.SPECIALS), len(tokens.SPECIALS) + len(EMOTIONS)))
    assert output.NUM_EMOTIONS == NUM_EMOTIONS


def test_paper_defaults_and_tiny_flavour():
    cfg = config_for("escm")
    got = (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_s, cfg.d_pr, cfg.num_emotions)
    assert got == (300, 1, 2, 10, 50, 32)
    assert config_for("escm", flavour="tiny", d_pr=4).d_pr == 4
    assert config_for("transformer", flavour="tiny").d_model == 32
    assert set(MODELS) >= {"transformer", "escm"}


@pytest.mark.parametrize("name,overrides,needle", [
    ("iamm2", {}, "iamm2"),
    ("escm", {"bogus": 1}, "bogus"),
    ("transformer", {"no_vr": True}, "no_vr"),
    ("escm", {"flavour": "huge"}, "huge"),
    ("escm", {"d_model": 0}, "d_model"),
    ("escm", {"attn_depth": 41}, "attn_depth"),
    ("escm", {"dropout": 1.5}, "dropout"),
    ("escm", {"no_desv": True, "no_dcgcn": True}, "no_dcgcn"),
    ("escm", {"no_dcgcn": True, "no_vr": True}, "no_vr"),
])
def test_bad_names_and_overrides_raise_value_error(name, overrides, needle):
    with pytest.raises(ValueError, match=needle):
        build_model(name, V, EMOTION_WORD_IDS, **overrides)


def test_emotion_word_ids_validated():
    with pytest.raises(ValueError, match="emotion_word_ids"):
        build_model("escm", V, EMOTION_WORD_IDS[:5], flavour="tiny")
    with pytest.raises(ValueError, match="emotion_word_ids"):
        build_model("escm", V, [V + 1] * 32, flavour="tiny")


# ---------------------------------------------------------------------------------------------- interface


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=IDS)
def test_forward_encode_decode_shapes(name, overrides):
    m, b = tiny(name, **overrides), make_batch(4, V, seed=3)
    B, T = b.target_ids.shape
    out = m(b, Targets.of(b))
    assert out.loss.shape == () and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, out.gen_loss + out.emo_loss)
    assert out.num_tokens.tolist() == (b.target_ids != 0).sum(1).tolist()  # per example
    if name == "transformer":
        assert out.emotion_logits is None and float(out.emo_loss) == 0.0
    else:
        assert out.emotion_logits.shape == (B, 32) and float(out.emo_loss.detach()) > 0
        # softmax(emotion_logits) is a distribution; its argmax, the Acc prediction, is the authors' summed logits
        assert torch.allclose(out.emotion_logits.exp().sum(-1), torch.ones(B), atol=1e-5)
        summed = (out.encoding.head_logits["ctx"] + out.encoding.head_logits["cor"]).log_softmax(-1)
        assert torch.allclose(out.emotion_logits, summed, atol=1e-5)
    state = m.encode(b)
    assert state.memory.size(0) == state.mask.size(0) == state.ext_ids.size(0) == B
    assert all(v.shape == (B, 32) for v in state.head_logits.values())
    ys = torch.full((B, 1), 2, dtype=torch.long)
    lp = m.decode_step(state, ys)
    assert lp.shape == (B, V + b.max_oov)
    assert torch.allclose(lp.logsumexp(-1), torch.zeros(B), atol=1e-4)
    # beam-style expansion: the encoding's rows can be repeated
    beam = state.select_rows(torch.arange(B).repeat_interleave(3))
    lp3 = m.decode_step(beam, ys.repeat_interleave(3, 0))
    assert torch.allclose(lp3[::3], lp, atol=1e-5)


def test_decode_step_matches_teacher_forcing_and_nll_sum():
    m, b = tiny("escm"), make_batch(3, V, seed=5)
    out, state = m(b, Targets.of(b)), m.encode(b)
    tgt, tgt_ext = b.target_ids, b.target_ext_ids
    ys = torch.full((3, 1), 2, dtype=torch.long)
    nll = torch.zeros(3)  # per example
    for t in range(tgt.size(1)):
        lp = m.decode_step(state, ys)
        keep = tgt_ext[:, t] != 0
        nll = nll - lp.gather(1, tgt_ext[:, t:t + 1]).squeeze(1) * keep
        ys = torch.cat([ys, tgt_ext[:, t:t + 1]], dim=1)  # extended ids fed back (mapped to UNK inside)
    assert torch.allclose(nll, out.nll_sum, rtol=1e-4)


@pytest.mark.parametrize("name", ["transformer", "escm"])
def test_padding_does_not_change_real_positions(name):
    g = torch.Generator().manual_seed(11)
    exs = [make_example(g, V) for _ in range(3)]
    m = tiny(name)
    b, b_pad = collate(exs), collate(exs, pad_ctx=5, pad_tgt=3)
    out, out_pad = m(b, Targets.of(b)), m(b_pad, Targets.of(b_pad))
    for k in ("loss", "nll_sum", "num_tokens"):
        assert torch.allclose(getattr(out, k).float(), getattr(out_pad, k).float(), atol=1e-5), k
    s, s_pad = m.encode(b), m.encode(b_pad)
    L = b.context_ids.size(1)
    real = b.context_mask[..., None]
    assert torch.allclose(s.memory * real, s_pad.memory[:, :L] * real, atol=1e-5)
    # one example alone equals the same example inside a padded batch
    alone = m.encode(collate(exs[:1]))
    n = len(exs[0]["words"])
    assert torch.allclose(alone.memory[0, :n], s_pad.memory[0, :n], atol=1e-5)
    if name == "escm":
        assert torch.allclose(out.emotion_logits, out_pad.emotion_logits, atol=1e-5)
        assert torch.allclose(alone.emotion_logits[0], s_pad.emotion_logits[0], atol=1e-5)


def test_mixed_precision_forward_backward_is_finite():
    """bf16 autocast (as a GPU trainer would use): padded rows must not turn into NaN."""
    m, b = tiny("escm").train(), make_batch(4, V, seed=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(b, Targets.of(b))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------------- ablations


REMOVED = {
    "no_desv": ("w_s.", "w_c.", "w_e.", "w_ce.", "enc_des."),
    "no_dcgcn": ("gcn.",),
    "no_vr": ("gcn.rel_emb.",),
    "no_vp": ("gcn.pos_emb.",),
    "no_vdes": (),  # owns no parameters: documented in escm.py
}


@pytest.mark.parametrize("flag", sorted(REMOVED))
def test_ablation_removes_parameters_and_changes_output(flag):
    full, abl = tiny("escm"), tiny("escm", **{flag: True})
    names_full = {n for n, _ in full.named_parameters()}
    names_abl = {n for n, _ in abl.named_parameters()}
    removed = names_full - names_abl
    assert names_abl <= names_full
    for prefix in REMOVED[flag]:
        assert any(n.startswith(prefix) for n in removed), (flag, prefix)
    assert all(n.startswith(REMOVED[flag]) for n in removed) if REMOVED[flag] else not removed
    # same weights wherever shapes agree: the flag alone must change what the model computes
    sd_abl = abl.state_dict()
    abl.load_state_dict({k: v for k, v in full.state_dict().items()
                         if k in sd_abl and sd_abl[k].shape == v.shape}, strict=False)
    b = make_batch(4, V, seed=7)
    assert not torch.allclose(full(b, Targets.of(b)).emotion_logits, abl(b, Targets.of(b)).emotion_logits, atol=1e-4)


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.parametrize("name,overrides", VARIANTS, ids=IDS)
def test_overfits_32_examples(name, overrides):
    torch.manual_seed(0)
    m = build_model(name, V, EMOTION_WORD_IDS, flavour="tiny", **overrides).train()
    b = make_batch(32, V, seed=1)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(80):
        loss = m(b, Targets.of(b)).loss
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(m(b, Targets.of(b)).loss)
    assert final < 0.25 * first, (first, final)


@pytest.mark.parametrize("name", ["transformer", "escm"])
def test_pointer_copies_all_mass_when_p_gen_is_zero(name):
    m, b = tiny(name), make_batch(4, V, seed=2)
    with torch.no_grad():
        m.generator.p_gen.weight.zero_()
        m.generator.p_gen.bias.fill_(-40.0)
    with torch.no_grad():
        P = m.decode_step(m.encode(b), torch.full((4, 1), 2, dtype=torch.long)).exp()  # (B, V + max_oov)
    assert b.max_oov > 0
    for i in range(4):
        ctx = b.context_ext_ids[i][b.context_mask[i]].unique()
        assert abs(float(P[i, ctx].sum()) - 1.0) < 1e-4
        others = torch.ones(P.size(1), dtype=torch.bool)
        others[ctx] = False
        assert float(P[i, others].sum()) < 1e-6
        oov = ctx[ctx >= V]
        if len(oov):
            assert float(P[i, oov].sum()) > 0  # extended ids reachable only by copying


def test_pointer_learns_to_copy_an_oov_word():
    """Target = the single OOV context word (ext id V): producible only by copying."""
    g = torch.Generator().manual_seed(4)
    exs = []
    for _ in range(32):
        e = make_example(g, V, oov_rate=0.0)
        k = int(torch.randint(1, len(e["words"]), (1,), generator=g))
        e["words"][k], e["ext"][k], e["oovs"] = UNK, V, 1
        e["tgt"], e["tgt_ext"] = [UNK, 3], [V, 3]
        exs.append(e)
    b = collate(exs)
    torch.manual_seed(0)
    m = build_model("transformer", V, EMOTION_WORD_IDS, flavour="tiny", label_smoothing=0.0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(60):
        loss = m(b, Targets.of(b)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    lp = m.decode_step(m.encode(b), torch.full((32, 1), 2, dtype=torch.long))
    assert (lp.argmax(-1) == V).float().mean() >= 0.9


# ---------------------------------------------------------------------------------------------- loss


def test_label_smoothed_nll_by_hand():
    vocab, eps = 4, 0.1  # ids 0..3 (0 = PAD) + 1 extended slot (id 4)
    P = torch.tensor([[0.1, 0.4, 0.2, 0.2, 0.1],
                      [0.1, 0.2, 0.3, 0.1, 0.3],
                      [0.2, 0.2, 0.2, 0.2, 0.2]])
    target = torch.tensor([2, 4, 0])  # in-vocab, extended (copied), PAD (ignored)
    loss, nll, n = label_smoothed_nll(P.log(), target, vocab, eps)
    ln = math.log
    tok1 = -0.9 * ln(0.2) - (0.1 / 2) * (ln(0.4) + ln(0.2))  # smoothing over {1, 3}
    tok2 = -0.9 * ln(0.3) - (0.1 / 3) * (ln(0.2) + ln(0.3) + ln(0.1))  # smoothing over {1, 2, 3}
    assert float(loss) == pytest.approx(tok1 + tok2, rel=1e-6)
    assert nll.tolist() == pytest.approx([-ln(0.2), -ln(0.3), 0.0], rel=1e-6)  # per token, 0 at PAD
    assert int(n) == 2
    loss0, nll0, _ = label_smoothed_nll(P.log(), target, vocab, 0.0)
    assert float(loss0) == pytest.approx(float(nll0.sum()))


# ---------------------------------------------------------------------------------------------- evidence


@pytest.mark.parametrize("cls_edges", [True, False])
def test_gcn_attends_only_to_dependency_neighbours(cls_edges):
    m, b = tiny("escm", cls_edges=cls_edges), make_batch(4, V, seed=6)
    with torch.no_grad():
        p = m.encode(b).extras["gcn_p"]  # (B, L, L), eq. 8
    mask, L = b.context_mask, b.context_ids.size(1)
    dep = b.context_dep  # directed parse; the default graph uses every arc both ways and self loops
    allowed = (dep > 0) | (dep.transpose(1, 2) > 0) | torch.eye(L, dtype=torch.bool)
    allowed = allowed & mask[:, :, None] & mask[:, None, :]
    if cls_edges:
        first = torch.arange(L) == 0
        allowed = allowed | ((first[:, None] | first[None, :]) & mask[:, :, None] & mask[:, None, :])
    assert float(p[~allowed].abs().max()) == 0.0
    assert torch.allclose(p.sum(-1), mask.float(), atol=1e-5)  # real rows are distributions, pad rows 0
    if not cls_edges:
        assert torch.allclose(p[:, 0, 0], torch.ones(4))  # [CLS] only has its self loop
    else:
        assert bool((p[:, 0, 1:][mask[:, 1:]] > 0).all())


def test_evidence_returns_dependency_pairs():
    m, b = tiny("escm"), make_batch(4, V, seed=9)
    ev = m.evidence(b, k=3)
    assert ev["pairs"].shape == (4, 3, 2) and ev["scores"].shape == (4, 3)
    enc = m.encode(b)  # the serving path: the decoding pass's own GCN attention
    same = m.evidence(b, k=3, encoding=enc)
    assert torch.equal(same["pairs"], ev["pairs"]) and torch.allclose(same["scores"], ev["scores"])
    for i in range(4):
        pairs = [frozenset(pair) for pair in ev["pairs"][i].tolist() if pair[0] >= 0]
        assert len(pairs) == len(set(pairs))  # a pair linked both ways is listed once
        prev = 2.0
        for (a, c), s in zip(ev["pairs"][i].tolist(), ev["scores"][i].tolist(), strict=True):
            if a < 0:
                continue
            assert a != c and a > 0 and c > 0 and int(b.context_dep[i, a, c] + b.context_dep[i, c, a]) > 0
            assert 0.0 <= s <= prev
            prev = s
    with pytest.raises(ValueError, match="no_dcgcn"):
        tiny("escm", no_dcgcn=True).evidence(b)


@pytest.mark.parametrize("name", ["transformer", "escm"])
def test_packed_output_layer_gives_the_same_loss(name):
    """pack_targets runs the output layer only at real target tokens: same losses, same gradients."""
    torch.manual_seed(0)
    batch = make_batch(4, V)
    packed = build_model(name, V, EMOTION_WORD_IDS, flavour="tiny")
    full = build_model(name, V, EMOTION_WORD_IDS, flavour="tiny", pack_targets=False)
    full.load_state_dict(packed.state_dict())
    a, b = packed(batch, Targets.of(batch)), full(batch, Targets.of(batch))
    for key in ("loss", "nll_sum", "num_tokens"):
        assert torch.allclose(getattr(a, key).float(), getattr(b, key).float(), rtol=1e-5, atol=1e-5), key
    a.loss.backward()
    b.loss.backward()
    ga = dict(packed.named_parameters())["generator.proj.weight"].grad
    gb = dict(full.named_parameters())["generator.proj.weight"].grad
    assert torch.allclose(ga, gb, rtol=1e-4, atol=1e-6)


def test_target_log_prob_equals_the_full_distribution_at_the_target():
    """PointerGenerator.log_prob_of (the training path without label smoothing) gives log P(y) of eq. 20 for
    in-vocabulary targets, copied OOV targets (ids >= V) and targets that are both generated and copied."""
    from trainers.models.output import PointerGenerator

    torch.manual_seed(0)
    gen = PointerGenerator(8, vocab_size=10)
    s, copy_logits = torch.randn(5, 8), torch.randn(5, 4)
    ext = torch.tensor([[3, 10, 11, 3]] * 5)  # word 3 twice, OOVs 10 and 11
    target = torch.tensor([3, 10, 11, 7, 0])
    full = gen(s[:, None], copy_logits[:, None], ext, max_oov=2)[:, 0]  # (5, 12)
    want = full.gather(1, target[:, None]).squeeze(1)
    assert torch.allclose(gen.log_prob_of(s, copy_logits, ext, target), want, atol=1e-6)
    assert want[1] > math.log(1e-6) and want[3] > math.log(1e-6)  # a copied OOV and a generated-only word


@pytest.mark.parametrize("seed", range(4))
def test_closed_form_label_smoothing_equals_the_materialised_loss(seed):
    """PointerGenerator.smoothed_nll (the training path with label smoothing) gives the loss, NLL and gradients
    of `label_smoothed_nll` over the full (N, V + max_oov) mixture: source words repeated, copied OOV targets,
    targets both generated and copied, masked (PAD) source positions, a [CLS]-like special copied."""
    from trainers.models.layers import NEG_INF
    from trainers.models.output import PointerGenerator
    from trainers.tokens import PAD

    g = torch.Generator().manual_seed(seed)
    V, max_oov, N, L = 12, 3, 9, 7
    torch.manual_seed(seed)
    gen = PointerGenerator(8, vocab_size=V)
    s = torch.randn(N, 8, generator=g, requires_grad=True)
    ext = torch.randint(4, V + max_oov, (N, L), generator=g)
    ext[:, 1] = ext[:, 0]  # a repeated source word
    ext[:, 2] = 4  # [CLS]
    ext[:, 3] = V + torch.arange(N) % max_oov  # an OOV word in every row
    ext[: N // 2, -2:] = PAD  # padded source positions
    logits = torch.randn(N, L, generator=g).masked_fill(ext == PAD, NEG_INF).requires_grad_()
    target = torch.cat([ext[:3, 0], ext[3:5, 3], torch.randint(4, V, (N - 5,), generator=g)])  # copied OOVs 3, 4
    eps = 0.1

    def grads(loss):
        gen.zero_grad()
        s.grad = logits.grad = None
        loss.backward()
        return [s.grad.clone(), logits.grad.clone()] + [p.grad.clone() for p in gen.parameters()]

    full = gen(s[:, None], logits[:, None], ext, max_oov)[:, 0]  # (N, V + max_oov)
    want = label_smoothed_nll(full, target, V, eps)
    want_grads = grads(want[0])
    got = gen.smoothed_nll(s, logits, ext, target, eps)
    got_grads = grads(got[0])
    assert torch.allclose(got[0], want[0], rtol=1e-5) and torch.allclose(got[1], want[1], rtol=1e-5)
    assert int(got[2]) == int(want[2]) == N
    for a, b in zip(got_grads, want_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_model_given_a_batch_without_its_fields_names_them():
    b = make_batch(2)
    with pytest.raises(ValueError, match=r"batch lacks \['context_dep'\]"):
        build_model("escm", 60, EMOTION_WORD_IDS, flavour="tiny").encode(replace(b, context_dep=None))
    with pytest.raises(ValueError, match=r"batch lacks \['utt_ids', .*'knowledge_mask'\]"):
        build_model("iamm", 60, EMOTION_WORD_IDS, flavour="tiny").encode(b)


def test_batch_rows_and_device_keep_every_field():
    b = make_batch(3)
    rows = b.select_rows(torch.tensor([2, 0]))
    assert rows.size == 2 and rows.max_oov == b.max_oov and rows.utt_ids is None
    for f in fields(b):
        v = getattr(b, f.name)
        if isinstance(v, torch.Tensor):
            assert torch.equal(getattr(rows, f.name), v[[2, 0]]), f.name
    moved = b.to("cpu")
    assert moved is not b and all(getattr(moved, f.name) is getattr(b, f.name) for f in fields(b))
