"""IAMM (trainers/models/iamm.py): shapes, masks, ablations, memory growth, hand-set association, overfit."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from trainers.models.association import InformationAssociation, iterate_associations
from trainers.models.batch import Batch
from trainers.models.iamm import IAMM, IAMMConfig
from trainers.models.interface import Targets
from trainers.tokens import CLS, EOS, PAD, SOS, UNK

FIRST_WORD = 40
V = 80
R = 5
# = the model table's "tiny" flavour for iamm (memory up to 2 x 20 x (3M - 2) entries needs max_len 1024)
TINY = dict(emb_dim=32, d_model=32, attn_depth=16, ffn_dim=32, max_len=1024, d_h=8)


# ----------------------------------------------------------------------------------------------
# Synthetic batches obeying the ESCM + IAMM contract (trainers/data/collate.py)


pytestmark = pytest.mark.usefixtures("one_thread")


def make_example(g: torch.Generator, n_turns: int | None = None, knowledge: bool = True, oov_rate=0.15):
    def rint(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    oovs: list[int] = []

    def word():
        if torch.rand(1, generator=g).item() < oov_rate:
            key = rint(0, 2)
            if key not in oovs:
                oovs.append(key)
            return UNK, V + oovs.index(key)
        w = rint(FIRST_WORD, V - 1)
        return w, w

    n_turns = n_turns or rint(1, 3)
    turns = [[word() for _ in range(rint(2, 6))] for _ in range(n_turns)]
    situation = [rint(FIRST_WORD, V - 1) for _ in range(rint(3, 7))]

    def relations():  # R relations x up to 2 phrases of up to 3 words; some relations empty
        if not knowledge:
            return [[] for _ in range(R)]
        return [[[rint(FIRST_WORD, V - 1) for _ in range(rint(1, 3))] for _ in range(rint(0, 2))]
                for _ in range(R)]

    copyable = [e for t in turns for _, e in t if e >= V]
    tgt, tgt_ext = [], []
    for _ in range(rint(2, 6)):
        if copyable and torch.rand(1, generator=g).item() < 0.3:
            tgt.append(UNK)
            tgt_ext.append(copyable[rint(0, len(copyable) - 1)])
        else:
            w = rint(FIRST_WORD, V - 1)
            tgt.append(w)
            tgt_ext.append(w)
    return dict(turns=turns, situation=situation, knowledge=[relations() for _ in range(n_turns)],
                sit_knowledge=relations(), tgt=tgt + [EOS], tgt_ext=tgt_ext + [EOS], oovs=len(oovs),
                emotion=rint(0, 31))


def collate(examples, K=2, Lk=3) -> Batch:
    B = len(examples)
    M = max(len(e["turns"]) for e in examples)
    Lu = max(len(t) for e in examples for t in e["turns"])
    L = max(1 + sum(len(t) for t in e["turns"]) for e in examples)
    Ls = max(len(e["situation"]) for e in examples)
    T = max(len(e["tgt"]) for e in examples)
    z = lambda *shape: torch.zeros(*shape, dtype=torch.long)  # noqa: E731
    b = Batch(context_ids=z(B, L), context_ext_ids=z(B, L), context_state=z(B, L), context_mask=z(B, L).bool(),
              max_oov=max(e["oovs"] for e in examples), context_pos=z(B, L), context_dep=z(B, L, L),
              target_ids=z(B, T), target_ext_ids=z(B, T), emotion=torch.tensor([e["emotion"] for e in examples]),
              utt_ids=z(B, M, Lu), utt_state=z(B, M), situation_ids=z(B, Ls), knowledge_ids=z(B, M + 1, R, K, Lk))
    for i, e in enumerate(examples):
        ids, ext, state = [CLS], [CLS], [1]
        for m, t in enumerate(e["turns"]):
            ids += [w for w, _ in t]
            ext += [x for _, x in t]
            state += [2 + m % 2] * len(t)
            b.utt_ids[i, m, : len(t)] = torch.tensor([w for w, _ in t])
            b.utt_state[i, m] = 2 + m % 2
        n = len(ids)
        b.context_ids[i, :n] = torch.tensor(ids)
        b.context_ext_ids[i, :n] = torch.tensor(ext)
        b.context_state[i, :n] = torch.tensor(state)
        b.context_pos[i, :n] = 2
        b.context_pos[i, 0] = 1
        b.context_dep[i, range(n), range(n)] = 1
        b.situation_ids[i, : len(e["situation"])] = torch.tensor(e["situation"])
        for slot, rels in [*enumerate(e["knowledge"]), (M, e["sit_knowledge"])]:
            for r, phrases in enumerate(rels):
                for k, p in enumerate(phrases[:K]):
                    b.knowledge_ids[i, slot, r, k, : len(p[:Lk])] = torch.tensor(p[:Lk])
        b.target_ids[i, : len(e["tgt"])] = torch.tensor(e["tgt"])
        b.target_ext_ids[i, : len(e["tgt"])] = torch.tensor(e["tgt_ext"])
    b.context_mask = b.context_ids != PAD
    b.utt_mask = b.utt_ids != PAD
    b.turn_mask = torch.arange(M)[None] < torch.tensor([len(e["turns"]) for e in examples])[:, None]
    b.situation_mask = b.situation_ids != PAD
    b.knowledge_mask = b.knowledge_ids != PAD
    return b


def make_batch(B=4, seed=0, turns=None, knowledge=True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return collate([make_example(g, None if turns is None else turns[i], knowledge) for i in range(B)])


# the four choices of the authors' code (the paper recipe's)
REFERENCE = dict(association_weights="reference", word_selector="reference", k3=15, utterance_cls=True,
                 association_inputs="words_states")


def tiny(**kw) -> IAMM:
    torch.manual_seed(0)
    return IAMM(IAMMConfig(**{**TINY, **kw}), V)


# ----------------------------------------------------------------------------------------------
# Config


def test_config_defaults_are_the_papers_and_validation_names_fields():
    c = IAMMConfig()
    assert (c.d_model, c.iam_heads, c.d_h, c.k1, c.k2, c.k3, c.num_emotions) == (300, 2, 20, 5, 15, 5, 32)
    assert c.implicit_association and c.notes == "full IAMM"
    with pytest.raises(ValueError, match="k1"):
        IAMMConfig(k1=0)
    with pytest.raises(ValueError, match="emb_dim == d_model"):
        IAMMConfig(emb_dim=300, d_model=64, attn_depth=16)
    with pytest.raises(ValueError, match="no_ea"):
        IAMMConfig(no_ea=True, has_knowledge=False)
    # derived fields round-trip through vars(cfg) (checkpoints) but cannot contradict the flags
    k = IAMMConfig(**TINY, has_knowledge=False)
    assert IAMMConfig(**vars(k)) == k
    with pytest.raises(ValueError, match="implicit_association"):
        IAMMConfig(**TINY, has_knowledge=False, implicit_association=True)


def test_no_knowledge_is_visible_in_the_config_and_model():
    c = IAMMConfig(**TINY, has_knowledge=False)
    assert c.implicit_association is False and "w/o IA" in c.notes
    from dataclasses import asdict
    assert asdict(c)["implicit_association"] is False  # logged with the params
    m = IAMM(c, V)
    assert "w/o IA" in m.describe()
    names = {n for n, _ in m.named_parameters()}
    assert not any(n.startswith(("iam_ik.", "enc_cs", "an_cs.")) for n in names)
    b = make_batch(knowledge=False)
    assert not b.knowledge_mask.any()
    out = m(b, Targets.of(b))
    assert torch.isfinite(out.loss)


# ----------------------------------------------------------------------------------------------
# Shapes and masks


def test_forward_shapes_and_finite():
    m = tiny()
    b = make_batch(B=4, seed=1)
    out = m(b, Targets.of(b))
    B = 4
    assert out.emotion_logits.shape == (B, 32)
    assert torch.allclose(out.emotion_logits.exp().sum(-1), torch.ones(B), atol=1e-5)
    assert list(out.emo_losses) == ["c", "s", "cs", "a"]  # P_c, P_s, P_cs, P_a (eqs. 20-23)
    # the Acc prediction is the argmax of the heads' summed logits, as the authors' code
    summed = sum(out.encoding.head_logits.values()).log_softmax(-1)
    assert torch.allclose(out.emotion_logits, summed, atol=1e-5)
    for k, v in [("loss", out.loss), ("gen_loss", out.gen_loss), ("emo_loss", out.emo_loss), *out.emo_losses.items()]:
        assert v.dim() == 0 and torch.isfinite(v), k
    assert torch.allclose(out.loss, out.gen_loss + out.emo_loss)
    assert torch.allclose(out.emo_loss, sum(out.emo_losses.values()))
    assert out.num_tokens.tolist() == (b.target_ids != PAD).sum(1).tolist()
    a = out.encoding.extras["associated"]
    assert a["ids"].shape == a["weights"].shape == a["positions"].shape == (B, m.cfg.num_associated)
    out.loss.backward()
    for n, p in m.named_parameters():
        assert p.grad is not None, n  # every built component takes part in the loss


@pytest.mark.parametrize("kw", [{}, REFERENCE])
def test_padding_does_not_change_outputs(kw):
    """Extra padded turns, turn columns, situation columns and context columns change nothing."""
    m = tiny(**kw).eval()
    b = make_batch(B=3, seed=2)
    p = {}
    B, M, Lu = b.utt_ids.shape
    pad = lambda x, *n: torch.nn.functional.pad(x, [v for k in reversed(n) for v in (0, k)])  # noqa: E731
    p["utt_ids"], p["utt_mask"] = pad(b.utt_ids, 0, 1, 2), pad(b.utt_mask, 0, 1, 2)
    p["utt_state"], p["turn_mask"] = pad(b.utt_state, 0, 1), pad(b.turn_mask, 0, 1)
    kn = torch.cat([b.knowledge_ids[:, :M], torch.zeros_like(b.knowledge_ids[:, :1]),
                    b.knowledge_ids[:, M:]], 1)  # situation stays in the last slot
    p["knowledge_ids"], p["knowledge_mask"] = kn, kn != PAD
    p["situation_ids"], p["situation_mask"] = pad(b.situation_ids, 0, 2), pad(b.situation_mask, 0, 2)
    for k in ("context_ids", "context_ext_ids", "context_state", "context_pos", "context_mask"):
        p[k] = pad(getattr(b, k), 0, 3)
    p["context_dep"] = pad(b.context_dep, 0, 3, 3)
    p = replace(b, **p)
    with torch.no_grad():
        o1, o2 = m(b, Targets.of(b)), m(p, Targets.of(p))
    assert torch.allclose(o1.emotion_logits, o2.emotion_logits, atol=1e-5)
    assert torch.allclose(o1.nll_sum, o2.nll_sum, atol=1e-4)
    a1, a2 = o1.encoding.extras["associated"], o2.encoding.extras["associated"]
    assert torch.equal(a1["ids"], a2["ids"]) and torch.allclose(a1["weights"], a2["weights"], atol=1e-5)
    # equal weights (e.g. repeated UNKs) may come in another order: compare the sets of positions
    assert torch.equal(a1["positions"].sort(-1).values, a2["positions"].sort(-1).values)


def test_dialogue_encoding_is_aligned_with_the_flat_context():
    """H_c row j encodes context token j: changing the word of turn 1 moves exactly that context row first."""
    m = tiny().eval()
    b = make_batch(B=2, seed=3, turns=[2, 3])
    q = b.map_tensors(torch.clone)
    q.utt_ids[1, 1, 0] = FIRST_WORD + 1 if b.utt_ids[1, 1, 0] != FIRST_WORD + 1 else FIRST_WORD + 2
    m.enc_ctx.blocks = torch.nn.ModuleList()  # no attention mixing: rows are per-token
    with torch.no_grad():
        H1, H2 = m.encode_dialogue(b)[0], m.encode_dialogue(q)[0]
    j = 1 + int(b.utt_mask[1, 0].sum())  # context position of turn 1's first token
    changed = (H1[1] - H2[1]).abs().sum(-1) > 1e-6
    n1, n_real = int(b.utt_mask[1, 1].sum()), int(b.context_mask[1].sum())
    assert changed[j] and torch.equal(H1[0], H2[0])
    assert not changed[:j].any() and not changed[j + n1: n_real].any()  # other turns are untouched
    assert changed[j: j + n1].all()  # the whole of turn 1 (Enc_u attends within the turn)


def test_packed_targets_give_the_same_loss():
    m = tiny().eval()
    b = make_batch(B=3, seed=9)
    with torch.no_grad():
        packed = m(b, Targets.of(b))
        m.cfg.pack_targets = False
        full = m(b, Targets.of(b))
    assert torch.allclose(packed.loss, full.loss, atol=1e-5)
    assert torch.allclose(packed.nll_sum, full.nll_sum, atol=1e-4)


@pytest.mark.parametrize("kw", [{}, REFERENCE])
def test_encode_decode_step_matches_teacher_forcing(kw):
    m = tiny(**kw).eval()
    b = make_batch(B=3, seed=4)
    with torch.no_grad():
        state = m.encode(b)
        ys = torch.cat([torch.full_like(b.target_ext_ids[:, :1], SOS), b.target_ext_ids[:, :2]], 1)
        lp = m.decode_step(state, ys)
        full = m.generator(*m._decoder_states(state, ys), state.ext_ids, state.max_oov)
    assert lp.shape == (3, V + b.max_oov)
    assert torch.allclose(lp, full[:, -1], atol=1e-5)
    assert state.memory.size(0) == state.selected.size(0) == state.selected_mask.size(0) == 3


# ----------------------------------------------------------------------------------------------
# Ablations


@pytest.mark.parametrize("flag,prefixes", [("no_ea", ("iam_ek.",)), ("no_ia", ("iam_ik.",)),
                                           ("no_ws", ("w_v.", "decoder_a.", "gate."))])
def test_each_ablation_removes_its_parameters_and_changes_the_output(flag, prefixes):
    full, abl = tiny(), tiny(**{flag: True})
    full_names = {n for n, _ in full.named_parameters()}
    abl_names = {n for n, _ in abl.named_parameters()}
    assert any(n.startswith(prefixes) for n in full_names)
    assert not any(n.startswith(prefixes) for n in abl_names)
    assert abl_names < full_names  # only removals
    abl.load_state_dict({k: v for k, v in full.state_dict().items() if k in abl.state_dict()})
    b = make_batch(B=3, seed=5)
    full.eval(), abl.eval()
    with torch.no_grad():
        o1, o2 = full(b, Targets.of(b)), abl(b, Targets.of(b))
    assert not torch.allclose(o1.loss, o2.loss)
    assert f"w/o {flag[3:].upper()}" in abl.cfg.notes and full.cfg.notes == "full IAMM"


# ----------------------------------------------------------------------------------------------
# Memory growth (eqs. 16-18)


def test_memory_grows_by_three_pairs_per_turn_and_masks_padded_turns():
    m = tiny(k1=3, iam_heads=2)
    b = make_batch(B=3, seed=6, turns=[1, 2, 4])
    tr = m.trace(b)
    per_pair = 2 * 2 * 3  # 2 directions x H x k1
    for branch in ("explicit", "implicit"):
        t = tr[branch]
        assert t["memory_lengths"] == [per_pair * (3 * i + 1) for i in range(4)]
        assert t["memory_seen"] == [0] + t["memory_lengths"][:-1]  # turn i sees M_0 .. M_{i-1}
    real = tr["explicit"]["memory_real"]  # (B, M) real entries stored per turn
    assert real.shape == (3, 4)
    assert (real[0, 1:] == 0).all() and (real[1, 2:] == 0).all()  # padded turns store nothing
    assert (real[0, 0] > 0) and (real[1, :2] > 0).all() and (real[2] > 0).all()
    assert (real[:, 1:] <= 3 * per_pair).all() and (real[:, 0] <= per_pair).all()


def test_memory_recurrence_feeds_earlier_associations_forward():
    """Changing turn 0 changes the utterance-memory entries of turn 2 through the memory, even when the
    situation and history pairs of turn 2 cannot see it (history masked out by hand)."""
    torch.manual_seed(0)
    iam = InformationAssociation(8, heads=1, d_h=4, k1=2, k2=2)
    B, M, Lu = 1, 3, 3
    X = torch.randn(B, M, Lu, 8)
    mask = torch.ones(B, M, Lu, dtype=torch.bool)
    Xs, ms = torch.randn(B, 4, 8), torch.ones(B, 4, dtype=torch.bool)
    tm = torch.ones(B, M, dtype=torch.bool)
    mem1 = iterate_associations(iam, X, mask, Xs, ms, tm)
    V1, tr = mem1.V, mem1.trace
    X2 = X.clone()
    X2[:, 0] = torch.randn(B, Lu, 8)
    V2 = iterate_associations(iam, X2, mask, Xs, ms, tm).V
    n = 2 * 1 * 2
    L = tr["memory_lengths"]
    assert V1.shape[1] == L[-1] == n * 7
    # the last n entries are E_mc of turn 2: they depend on turn 0 only through the memory
    assert not torch.allclose(V1[:, -n:], V2[:, -n:])
    # E_sc of turn 2 (first n entries of M_2) does not depend on turn 0 at all
    assert torch.allclose(V1[:, L[1]: L[1] + n], V2[:, L[1]: L[1] + n])


# ----------------------------------------------------------------------------------------------
# Hand-set association scores


def _hand_module(k1=1, k2=1):
    """d = 6, one head, d_h = 6: w_q = w_k = c I, w_v = I, so A_ij = sigmoid(c^2 x_i . y_j / sqrt(6))."""
    iam = InformationAssociation(6, heads=1, d_h=6, k1=k1, k2=k2, num_types=2)
    with torch.no_grad():
        eye = torch.eye(6)
        iam.w_qkv.copy_(torch.cat([3 * eye, 3 * eye, eye], 1).expand(2, -1, -1))
    return iam


def test_association_selects_the_hand_set_words():
    iam = _hand_module(k1=1, k2=2)
    e = torch.eye(6)
    # utterance t = [e0, e1, e2 + e1]; other o = [e3, e1, e4, e2]
    t = torch.stack([e[0], e[1], e[2] + e[1]])[None, None]  # (P=1, B=1, 3, 6)
    o = torch.stack([e[3], e[1], e[4], e[2]])[None, None]
    mt, mo = torch.ones(1, 1, 3, dtype=torch.bool), torch.ones(1, 1, 4, dtype=torch.bool)
    E, ok, sel = iam(iam.project(t, 0), mt, iam.project(o, 0), mo)
    (idx_t, w_t), (idx_o, _) = sel["t"], sel["o"]
    # s2u: o's keyword = o1 (e1 is associated by t1 and t2 the most); its associated utterance words t1, t2
    assert set(idx_t[0, 0, 0, 0].tolist()) == {1, 2}
    # u2s: t's keyword = t2 (matches o1 and o3); its associated words in o: o1 and o3
    assert set(idx_o[0, 0, 0, 0].tolist()) == {1, 3}
    # weights are keyword score x association score (sigmoids)
    s = lambda x: torch.sigmoid(torch.tensor(9 * x / 6 ** 0.5))  # noqa: E731
    a_kw = (s(1.0) + s(1.0) + s(0.0)) / 3  # mean over t of A_{t->o1}
    assert torch.allclose(w_t[0, 0, 0, 0].sort().values, (a_kw * torch.stack([s(1.0), s(1.0)])).sort().values)
    assert ok.all() and E.shape == (1, 1, 2, 6)


def test_association_respects_masks_and_pairs_are_independent():
    iam = _hand_module(k1=1, k2=1)
    e = torch.eye(6)
    t = torch.stack([e[0], e[1], e[2]])
    o = torch.stack([e[1], e[2], e[5], e[5]])
    x_t = t.expand(2, 1, 3, 6)  # the same utterance in two pairs
    x_o = o.expand(2, 1, 4, 6)
    mt = torch.ones(2, 1, 3, dtype=torch.bool)
    mo = torch.ones(2, 1, 4, dtype=torch.bool)
    mo[1, 0, 0] = False  # pair 1 cannot see o0 (e1)
    y_t = torch.cat([iam.project(x_t[:1], 0), iam.project(x_t[1:], 1)])  # two projection sets
    y_o = torch.cat([iam.project(x_o[:1], 0), iam.project(x_o[1:], 1)])
    _, _, sel = iam(y_t, mt, y_o, mo)
    idx_t = sel["t"][0]
    assert idx_t[0, 0, 0, 0, 0] in (1, 2) and idx_t[1, 0, 0, 0, 0] == 2  # pair 1 only has e2 left
    assert sel["o"][0][1, 0, 0, 0, 0] == 1  # u2s of pair 1: o1 (e2), o0 is masked
    # nothing real to select: all weights 0 and entries invalid
    E, ok, sel = iam(y_t[:1], torch.zeros(1, 1, 3, dtype=torch.bool), y_o[:1], mo[:1])
    assert not ok.any() and (sel["t"][1] == 0).all() and (sel["o"][1] == 0).all()


def test_top_k_stays_differentiable_through_the_scores():
    iam = _hand_module(k1=1, k2=1)
    t = torch.randn(1, 2, 5, 6)
    o = torch.randn(1, 2, 7, 6)
    E, _, _ = iam(iam.project(t, 0), torch.ones(1, 2, 5, dtype=torch.bool), iam.project(o, 0),
                  torch.ones(1, 2, 7, dtype=torch.bool))
    E.sum().backward()
    g = iam.w_qkv.grad[0]
    assert g[:, :12].abs().sum() > 0  # w_q and w_k get gradients via the selected scores
    assert g[:, 12:].abs().sum() > 0  # w_v via the selected vectors
    assert iam.w_qkv.grad[1].abs().sum() == 0  # the unused memory projection gets none


def test_associated_words_point_at_real_words():
    m = tiny().eval()
    b = make_batch(B=3, seed=7)
    words = m.associated_words(b)
    assert len(words) == 3 and all(0 < len(w) <= m.cfg.num_associated for w in words)
    for i, ws in enumerate(words):
        assert [w["weight"] for w in ws] == sorted((w["weight"] for w in ws), reverse=True)
        for w in ws:
            src = b.context_ids if w["source"] == "context" else b.situation_ids
            assert src[i, w["position"]] == w["id"] != PAD
    assert tiny(no_ea=True).associated_words(b) == [[], [], []]


# ----------------------------------------------------------------------------------------------
# Learning


def test_overfits_32_examples():
    """Total loss and generation loss both fall below 30% of their initial values within 200 steps."""
    torch.manual_seed(0)
    m = tiny()
    b = make_batch(B=32, seed=8)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _step in range(200):
        out = m(b, Targets.of(b))
        first = first or (out.loss.item(), out.gen_loss.item())
        if out.loss.item() < 0.3 * first[0] and out.gen_loss.item() < 0.3 * first[1]:
            break
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert out.loss.item() < 0.3 * first[0] and out.gen_loss.item() < 0.3 * first[1], (first, _step)


def test_real_collated_batch(prepared_sample):
    """pad_iamm output of the prepared embedded sample (knowledge backend `none`) runs end to end."""
    from trainers.data.collate import encode_example, pad_iamm

    split, Vr = prepared_sample.split("train"), len(prepared_sample.vocab)
    b = pad_iamm([encode_example(split, split.features[i], Vr) for i in range(8)])
    assert ((b.utt_mask.sum((1, 2)) + 1) == b.context_mask.sum(1)).all()  # H_c alignment premise
    assert not b.knowledge_mask.any()
    torch.manual_seed(0)
    m = IAMM(IAMMConfig(**TINY, has_knowledge=False), Vr)
    out = m(b, Targets.of(b))
    assert torch.isfinite(out.loss) and out.emotion_logits.shape == (8, 32)
    for i, ws in enumerate(m.associated_words(b)):
        assert ws
        for w in ws:
            src = b.context_ids if w["source"] == "context" else b.situation_ids
            assert src[i, w["position"]] == w["id"]


# ---- the authors' code where it differs from the paper (selectable; the config notes say which) ----------


def test_reference_association_weights_reweight_the_selected_scores():
    paper, ref = tiny(), tiny(association_weights="reference")
    assert "association weights as the authors' code" in ref.cfg.notes and "authors'" not in paper.cfg.notes
    new = {n for n, _ in ref.named_parameters()} - {n for n, _ in paper.named_parameters()}
    assert new == {f"{b}.{w}.{p}" for b in ("iam_ek", "iam_ik") for w in ("reweight_kw", "reweight_as")
                   for p in ("weight", "bias")}
    ref.load_state_dict({**paper.state_dict(), **{n: p for n, p in ref.state_dict().items() if n in new}})
    b = make_batch(seed=3)
    for key in ("t", "o"):  # the same words selected, other weights; only real selections weigh
        idx_p, w_p = _explicit_selections(paper, b)[key]
        idx_r, w_r = _explicit_selections(ref, b)[key]
        assert torch.equal(idx_p, idx_r) and not torch.allclose(w_p, w_r) and torch.equal(w_p > 0, w_r > 0)
    assert not torch.allclose(paper.encode(b).emotion_logits, ref.encode(b).emotion_logits)


def _explicit_selections(model, b):
    from trainers.models.association import explicit_memory

    return explicit_memory(model.iam_ek, model.embed(b.utt_ids), b.utt_mask, model.embed(b.situation_ids),
                           b.situation_mask, b.turn_mask, b.context_ids.size(1)).selections


def test_reference_word_selector_reads_the_memory_before_its_encoder():
    m = tiny(word_selector="reference", k3=3)
    assert "word selector over V before Enc_m" in m.cfg.notes
    b = make_batch(seed=5)
    seen = {}
    m.enc_m.register_forward_hook(lambda mod, args, out: seen.update(V=args[0], valid=args[1]))
    enc = m.encode(b)
    V = seen["V"]
    S = torch.sigmoid(m.w_v(V)).squeeze(-1)  # eq. 26 over V (the code), not over H_m = Enc_m(V)
    top, idx = S.masked_fill(~seen["valid"], -1.0).topk(3, dim=-1)
    assert torch.allclose(enc.selected, top[..., None] * V.gather(1, idx[..., None].expand(-1, -1, V.size(-1))))
    with pytest.raises(ValueError, match="word_selector"):
        IAMMConfig(**TINY, word_selector="code")


def _same_weights(**kw):
    """A tiny IAMM without and with options `kw` that add no parameters, with the same weights."""
    off, on = tiny(), tiny(**kw)
    on.load_state_dict(off.state_dict())  # strict: the options add and remove nothing
    return off.eval(), on.eval()


def _turn_starts(b, i):
    return [0] + torch.cumsum(b.utt_mask[i].sum(-1), 0).tolist()


def test_utterance_cls_puts_a_cls_before_every_turn_aligned_with_the_copy_ids():
    off, on = _same_weights(utterance_cls=True)
    assert "a [CLS] before every turn" in on.cfg.notes and "[CLS]" not in off.cfg.notes
    b = make_batch(B=3, seed=3, turns=[1, 2, 3])
    B, M, _ = b.utt_ids.shape
    with torch.no_grad():
        H, mask, ext = on.encode_dialogue(b)
    L = b.context_ids.size(1) + M - 1
    assert H.shape == (B, L, on.cfg.d_model) and mask.shape == ext.shape == (B, L)
    for i in range(B):
        starts, ctx = _turn_starts(b, i), b.context_ext_ids[i, 1:].tolist()
        want = [t for m in range(int(b.turn_mask[i].sum())) for t in [CLS] + ctx[starts[m]:starts[m + 1]]]
        n = len(want)
        assert mask[i, :n].all() and not mask[i, n:].any()
        assert ext[i, :n].tolist() == want and (ext[i, n:] == PAD).all()
    with torch.no_grad():
        o_off, o_on = off(b, Targets.of(b)), on(b, Targets.of(b))
    enc = o_on.encoding
    assert enc.memory.shape[:2] == enc.mask.shape == enc.ext_ids.shape == (B, L)
    assert torch.equal(enc.ext_ids, ext)  # what the pointer copies is H_c's own layout
    assert not torch.allclose(o_off.emotion_logits, o_on.emotion_logits)
    assert not torch.allclose(o_off.nll_sum, o_on.nll_sum)


def test_utterance_cls_rows_follow_their_turn():
    """Without Enc_ctx's mixing, changing a word of turn 1 changes exactly turn 1's rows: its [CLS] and tokens."""
    m = tiny(utterance_cls=True).eval()
    b = make_batch(B=2, seed=3, turns=[2, 3])
    q = b.map_tensors(torch.clone)
    q.utt_ids[1, 1, 0] = FIRST_WORD + 1 if b.utt_ids[1, 1, 0] != FIRST_WORD + 1 else FIRST_WORD + 2
    m.enc_ctx.blocks = torch.nn.ModuleList()
    with torch.no_grad():
        (H1, _, _), (H2, _, _) = m.encode_dialogue(b), m.encode_dialogue(q)
    starts = _turn_starts(b, 1)
    first, after = 1 + starts[1], 2 + starts[2]  # [CLS] of turn 1 (one [CLS] before it), the row after turn 1
    changed = (H1[1] - H2[1]).abs().sum(-1) > 1e-6
    assert torch.equal(H1[0], H2[0]) and changed[first:after].all()
    assert not changed[:first].any() and not changed[after:].any()


def test_association_inputs_words_states_feeds_the_dialogue_states_to_the_explicit_pairs(monkeypatch):
    import trainers.models.iamm as iamm_module

    seen = []
    real_memory = iamm_module.explicit_memory
    monkeypatch.setattr(iamm_module, "explicit_memory", lambda iam, X_u, *a: seen.append(X_u) or real_memory(
        iam, X_u, *a))
    off, on = _same_weights(association_inputs="words_states")
    assert "word + dialogue-state embeddings" in on.cfg.notes and "dialogue-state" not in off.cfg.notes
    b = make_batch(B=3, seed=4)
    with torch.no_grad():
        o_off, o_on = off(b, Targets.of(b)), on(b, Targets.of(b))
        E_w, E_r = off.embed(b.utt_ids), off.embed_state(b.utt_state)
    assert seen[0].shape == seen[1].shape == b.utt_ids.shape + (off.cfg.emb_dim,)
    assert torch.allclose(seen[0], E_w) and torch.allclose(seen[1], E_w + E_r[:, :, None])
    assert E_r[b.turn_mask].abs().sum(-1).gt(0).all()  # speaker and listener rows are not zero
    assert not torch.allclose(o_off.emotion_logits, o_on.emotion_logits)
    assert not torch.allclose(o_off.nll_sum, o_on.nll_sum)
    with pytest.raises(ValueError, match="association_inputs"):
        IAMMConfig(**TINY, association_inputs="states")
    with pytest.raises(ValueError, match="utterance_cls"):
        IAMMConfig(**TINY, utterance_cls="yes")


def test_a_bundle_saved_without_the_new_keys_loads_with_them_off(tmp_path, prepared_sample):
    """Bundles and checkpoints made before `utterance_cls` and `association_inputs` keep their computation."""
    import json

    from trainers.artifacts import CONFIG, load, save_bundle
    from trainers.config import InferenceConfig
    from trainers.loop import model_config_changes
    from trainers.models import build_model

    vocab = prepared_sample.vocab
    torch.manual_seed(0)
    m = build_model("iamm", len(vocab), vocab.emotion_ids(), flavour="tiny", has_knowledge=False)
    bundle = save_bundle(tmp_path / "bundle", InferenceConfig(model="iamm"), m, vocab)
    config = json.loads((bundle / CONFIG).read_text())
    old = {k: v for k, v in config["model_config"].items() if k not in ("utterance_cls", "association_inputs")}
    assert len(old) == len(config["model_config"]) - 2
    (bundle / CONFIG).write_text(json.dumps({**config, "model_config": old}))
    loaded = load(bundle).model
    assert loaded.cfg.utterance_cls is False and loaded.cfg.association_inputs == "words"
    assert loaded.cfg == m.cfg and model_config_changes(old, m.cfg) == []  # the trainer's resume check agrees
    state = m.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    on = build_model("iamm", len(vocab), vocab.emotion_ids(), flavour="tiny", has_knowledge=False,
                     utterance_cls=True)
    assert "utterance_cls: False -> True" in model_config_changes(old, on.cfg)
