"""IAMM's association memory and what reads it (Yang et al., ACL 2024 Findings), in the paper's named steps:

    InformationAssociation  second-order interaction attention on sentence pairs          (8-15)
    sentence_pairs          utterance-situation and utterance-history pairs: E_sc, E_cc    (16)
    memory_pairs            utterance-memory pairs, the recurrence: E_mc, M_i              (16)
    explicit_memory         V_ek over word embeddings                                      (16)
    implicit_memory         V_ik over the commonsense relation vectors                     (17)
    emotion_heads           P_c, P_s, P_a, P_cs and their product                          (20-24)
    select_words            the word selector: H~_m = top-k3 of sigmoid(w_v H_m) . H_m     (26-28)
    associated_words        the words the explicit pairs associated, for analysis / serving

The functions take the IAMM's own modules as arguments, so `IAMM`'s parameter names (its state_dict keys)
are those of its attributes. The interpretations of the paper are recorded in trainers/models/iamm.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.batch import Batch


def attendable(mask: torch.Tensor) -> torch.Tensor:
    """Rows with no real position attend to all of them (finite garbage, masked downstream) instead of NaN."""
    return mask | ~mask.any(-1, keepdim=True)


def pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero/False-pad `x` along `dim` (counted from the left) up to `length`."""
    extra = length - x.size(dim)
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def squeeze_padding(x: torch.Tensor, mask: torch.Tensor):
    """Move the real positions of the last-but-one axis of x (…, L, d) to the front, order kept."""
    order = (~mask).to(torch.uint8).argsort(dim=-1, stable=True)  # (…, L)
    return x.gather(-2, order[..., None].expand_as(x)), mask.gather(-1, order)


# ----------------------------------------------------------------------------------------------
# Information association module (eqs. 8-15)


class InformationAssociation(nn.Module):
    """Second-order interaction attention on a stack of P sentence pairs (t, o) at once, eqs. 8-15.

    t is the current utterance, o the other sentence (situation, history or memory). Inputs are first
    projected with `project(x, type)` (type 0 = sentence pairs, 1 = memory pair): every sentence is
    projected once, however many pairs it takes part in. `forward` returns the entries E_st projected
    to d, (P, B, 2 H k1, d), their validity (P, B, 2 H k1), and the selections
    {"t": (idx, w), "o": (idx, w)}: positions (P, B, H, k1, k2) of the associated words in t (s2u) and
    in o (u2s) with their weights a_keyword * A (0 where nothing real was selected).
    """

    def __init__(self, d: int, heads: int, d_h: int, k1: int, k2: int, num_types: int = 2,
                 reference_weights: bool = False):
        super().__init__()
        self.h, self.d_h, self.k1, self.k2 = heads, d_h, k1, k2
        self.w_qkv = nn.Parameter(torch.empty(num_types, d, 3 * heads * d_h))  # w_q, w_k, w_v per head
        nn.init.uniform_(self.w_qkv, -d ** -0.5, d ** -0.5)
        self.out = nn.Linear(k2 * d_h, d)  # E_st (k2 d_h) -> memory width d
        if reference_weights:  # the authors' code: sigmoid(Linear(k, k)) of the selected raw scores, per order
            self.reweight_kw, self.reweight_as = nn.Linear(k1, k1), nn.Linear(k2, k2)
        self.reference_weights = reference_weights

    def project(self, x, type_: int):  # x (..., L, d) -> (..., L, 3 H d_h): q, k, v of every head
        return x @ self.w_qkv[type_]

    def _heads(self, y):  # (P, B, L, 3 H d_h) -> q, k, v each (P, B, H, L, d_h)
        P, B, L, _ = y.shape
        return y.view(P, B, L, 3, self.h, self.d_h).permute(3, 0, 1, 4, 2, 5).unbind(0)

    def select(self, S_y2x, S_x2y, mask_x, mask_y, v_y):
        """Keywords in x (first order, eqs. 10-11), then their associated words in y (eqs. 12-14).

        S_y2x (P, B, H, Ly, Lx), S_x2y (P, B, H, Lx, Ly) raw scores (A = sigmoid(S)), v_y (P, B, H, Ly, d_h).
        -> E (P, B, H k1, k2 d_h), valid (P, B, H k1), idx and weights (P, B, H, k1, k2)."""
        P, B, H, Lx, Ly = S_x2y.shape
        A_y2x, A_x2y = torch.sigmoid(S_y2x), torch.sigmoid(S_x2y)  # eqs. 8-9
        m_y = mask_y[:, :, None, :, None].to(A_y2x.dtype)  # (P, B, 1, Ly, 1)
        a_x = (A_y2x * m_y).sum(3) / m_y.sum(3).clamp_min(1.0)  # eq. 10, (P, B, H, Lx)
        a_kw, kw = a_x.masked_fill(~mask_x[:, :, None], -1.0).topk(self.k1, dim=-1)  # eq. 11
        rows = A_x2y.gather(3, kw[..., None].expand(-1, -1, -1, -1, Ly))  # (P, B, H, k1, Ly)
        a_as, idx = rows.masked_fill(~mask_y[:, :, None, None], -1.0).topk(self.k2, dim=-1)  # eq. 12
        kw_ok, as_ok = a_kw >= 0, a_as >= 0  # masked positions carry -1
        if self.reference_weights:  # the code's weights: sigmoid(Linear_k(raw scores of the k selected))
            s_kw = ((S_y2x * m_y).sum(3) / m_y.sum(3).clamp_min(1.0)).gather(-1, kw).masked_fill(~kw_ok, 0.0)
            s_as = S_x2y.gather(3, kw[..., None].expand(-1, -1, -1, -1, Ly)).gather(-1, idx).masked_fill(~as_ok, 0.0)
            w = (torch.sigmoid(self.reweight_kw(s_kw))[..., None] * torch.sigmoid(self.reweight_as(s_as))
                 * (kw_ok[..., None] & as_ok))
        else:
            w = a_kw.clamp_min(0)[..., None] * a_as.clamp_min(0)  # keyword score x association score
        v = v_y.gather(3, idx.flatten(3)[..., None].expand(-1, -1, -1, -1, self.d_h))  # (P, B, H, k1 k2, d_h)
        E = (w[..., None] * v.view(P, B, H, self.k1, self.k2, self.d_h)).flatten(4)  # eqs. 13-14
        valid = kw_ok & as_ok.any(-1)  # (P, B, H, k1)
        return E.flatten(2, 3), valid.flatten(2, 3), idx, w

    def forward(self, y_t, mask_t, y_o, mask_o):
        """y_t (P, B, Lt, 3 H d_h) projected utterances, mask_t (P, B, Lt); y_o, mask_o the same for o."""
        k = max(self.k1, self.k2)  # top-k needs at least k candidates: pad with masked positions
        y_t, mask_t = pad_to(y_t, k, 2), pad_to(mask_t, k, 2)
        y_o, mask_o = pad_to(y_o, k, 2), pad_to(mask_o, k, 2)
        (q_t, k_t, v_t), (q_o, k_o, v_o) = self._heads(y_t), self._heads(y_o)
        scale = self.d_h ** -0.5
        S_t2o = q_t @ k_o.transpose(-2, -1) * scale  # eq. 9 before the sigmoid, (P, B, H, Lt, Lo)
        S_o2t = q_o @ k_t.transpose(-2, -1) * scale  # eq. 8 before the sigmoid, (P, B, H, Lo, Lt)
        E_t, ok_t, idx_t, w_t = self.select(S_t2o, S_o2t, mask_o, mask_t, v_t)  # s2u: words of t
        E_o, ok_o, idx_o, w_o = self.select(S_o2t, S_t2o, mask_t, mask_o, v_o)  # u2s: words of o
        E = self.out(torch.cat([E_t, E_o], dim=2))  # eq. 15, (P, B, 2 H k1, d)
        return E, torch.cat([ok_t, ok_o], dim=2), {"t": (idx_t, w_t), "o": (idx_o, w_o)}


# ----------------------------------------------------------------------------------------------
# The iterative association process (eqs. 16-18)


@dataclass
class AssociationMemory:
    """One branch's memory after the last turn (V_ek or V_ik, eqs. 16-17)."""

    V: torch.Tensor  # (B, L_m, d) the entries M_0 ++ ... ++ M_{M-1}
    valid: torch.Tensor  # (B, L_m) bool
    selections: dict  # of the sentence pairs: pairs 0..M-1 utterance-situation, M..2M-2 utterance-history
    trace: dict  # "memory_lengths" after each turn, "memory_seen" by each turn's memory pair,
    #              "memory_real" (B, M) real entries stored per turn


def sentence_pairs(iam: InformationAssociation, Y_u, mask_u, Y_s, mask_s, max_history: int | None = None):
    """E_sc and E_cc of eq. 16: the utterance-situation pairs of all M turns and the utterance-history pairs
    of turns 1..M-1 (turn i against turns 0..i-1), in one stacked IAM call.

    Y_u (B, M, Lu, 3 H d_h) projected turns, mask_u (B, M, Lu); Y_s (B, Ls, 3 H d_h), mask_s (B, Ls).
    The history is the real tokens of turns 0..M-2 moved to the front (order kept) and cut to
    `max_history` (a bound on real history tokens, e.g. the context length): the (M - 1) Lu padded turn
    positions would make the pairs grow with the batch's longest turn times its most turns.
    -> E (2M - 1, B, 2 H k1, d), valid (2M - 1, B, 2 H k1), selections (pairs in that order; the history
    pairs' positions in o index the (M - 1) Lu turn positions)."""
    B, M, Lu, _ = Y_u.shape
    q, qm = Y_u.transpose(0, 1), mask_u.transpose(0, 1)  # (M, B, Lu, 3 H d_h), (M, B, Lu)
    y_o, m_o = [Y_s[None].expand(M, -1, -1, -1)], [mask_s[None].expand(M, -1, -1)]
    y_t, m_t = [q], [qm]
    if M > 1:
        turn_of = (torch.arange((M - 1) * Lu, device=Y_u.device) // Lu).expand(B, -1)  # (B, (M-1) Lu)
        order = (~mask_u[:, : M - 1].flatten(1)).to(torch.uint8).argsort(dim=-1, stable=True)[:, :max_history]
        hist = Y_u[:, : M - 1].flatten(1, 2).gather(1, order[..., None].expand(-1, -1, Y_u.size(-1)))
        before = turn_of.gather(1, order)[None] < torch.arange(1, M, device=Y_u.device)[:, None, None]
        y_o.append(hist[None].expand(M - 1, -1, -1, -1))  # (M-1, B, Lh, .)
        m_o.append(mask_u[:, : M - 1].flatten(1).gather(1, order)[None] & before)  # turns before i
        y_t.append(q[1:])
        m_t.append(qm[1:])
    Lo = max(y.size(2) for y in y_o)
    E, valid, sel = iam(torch.cat(y_t), torch.cat(m_t), torch.cat([pad_to(y, Lo, 2) for y in y_o]),
                        torch.cat([pad_to(m, Lo, 2) for m in m_o]))
    if M > 1:  # history positions back to turn positions
        idx, w = sel["o"]
        hist_idx = order[None].expand(M - 1, -1, -1).gather(2, idx[M:].flatten(2).clamp_max(order.size(1) - 1))
        sel["o"] = (torch.cat([idx[:M], hist_idx.view_as(idx[M:])]), w)
    return E, valid, sel


def memory_pairs(iam: InformationAssociation, X_u, mask_u, E, valid):
    """The recurrence of eq. 16: turn i's utterance-memory pair sees M_0 ++ ... ++ M_{i-1} and stores
    M_i = E_sc ++ E_cc ++ E_mc (M_0 = E_sc: no history, no memory yet). Memory entries are projected once.

    X_u (B, M, Lu, d) turn vectors, mask_u (B, M, Lu); E, valid from `sentence_pairs`.
    -> V (B, L_m, d), V_valid (B, L_m), trace (see `AssociationMemory`)."""
    M = X_u.size(1)
    E_sc, ok_sc, E_cc, ok_cc = E[:M], valid[:M], E[M:], valid[M:]
    mem, mem_ok = [E_sc[0]], [ok_sc[0]]
    mem_y = [iam.project(E_sc[0], 1)]
    lengths, seen, real = [E_sc.size(2)], [0], [ok_sc[0].sum(-1)]
    for i in range(1, M):
        y_mem, ok_mem = torch.cat(mem_y, 1), torch.cat(mem_ok, 1)
        E_mc, ok_mc, _ = iam(iam.project(X_u[None, :, i], 1), mask_u[None, :, i], y_mem[None], ok_mem[None])
        new = [E_sc[i], E_cc[i - 1], E_mc[0]]  # M_i = E_sc ++ E_cc ++ E_mc, eq. 16
        new_ok = [ok_sc[i], ok_cc[i - 1], ok_mc[0]]
        mem += new
        mem_ok += new_ok
        if i < M - 1:
            mem_y.append(iam.project(torch.cat(new, 1), 1))
        seen.append(y_mem.size(1))
        lengths.append(lengths[-1] + sum(e.size(1) for e in new))
        real.append(sum(o.sum(-1) for o in new_ok))
    trace = {"memory_lengths": lengths, "memory_seen": seen, "memory_real": torch.stack(real, 1)}
    return torch.cat(mem, 1), torch.cat(mem_ok, 1), trace


def iterate_associations(iam: InformationAssociation, X_u, mask_u, X_s, mask_s, turn_mask,
                         max_history: int | None = None) -> AssociationMemory:
    """The iterative association process over the turns, eqs. 16-18, for one branch.

    X_u (B, M, Lu, d) per-turn vectors (word embeddings or relation vectors), mask_u (B, M, Lu);
    X_s (B, Ls, d) the situation's, mask_s (B, Ls); turn_mask (B, M); max_history: see `sentence_pairs`."""
    mask_u = mask_u & turn_mask[..., None]
    Y_u, Y_s = iam.project(X_u, 0), iam.project(X_s, 0)  # sentence-pair projections, once per sentence
    E, valid, selections = sentence_pairs(iam, Y_u, mask_u, Y_s, mask_s, max_history)
    V, V_valid, trace = memory_pairs(iam, X_u, mask_u, E, valid)
    return AssociationMemory(V, V_valid, selections, trace)


def explicit_memory(iam: InformationAssociation, E_u, mask_u, E_s, mask_s, turn_mask,
                    context_len: int) -> AssociationMemory:
    """V_ek, eq. 16: the explicit pairs (E_w^i, E_s), (E_w^i, E_w^<i), (E_w^i, M_<i) over the word embeddings
    E_u (B, M, Lu, d) of the turns and E_s (B, Ls, d) of the situation. The turns' real tokens are those
    of the context ([CLS] + turns, `context_len` positions), which bounds every history."""
    return iterate_associations(iam, E_u, mask_u, E_s, mask_s, turn_mask, max_history=context_len - 1)


def implicit_memory(iam: InformationAssociation, H_cs, cs_mask, turn_mask) -> AssociationMemory:
    """V_ik, eq. 17: the implicit pairs over the relation vectors H^cs (B, M + 1, R, d) of eq. 5, the turns in
    slots 0..M-1 and the situation in slot M; cs_mask (B, M + 1, R)."""
    M = turn_mask.size(1)
    return iterate_associations(iam, H_cs[:, :M], cs_mask[:, :M], H_cs[:, M], cs_mask[:, M], turn_mask)


# ----------------------------------------------------------------------------------------------
# Reading the memory: emotion heads (eqs. 20-24) and the word selector (eqs. 26-28)


def emotion_heads(an_u, an_a, an_cs, H_c, c_mask, H_s, s_mask, H_m, m_mask, H_cs=None, cs_mask=None) -> dict:
    """Per-head emotion logits: P_c = AN_u(H_c), P_s = AN_u(H_s) (eqs. 20-21, AN_u shared), P_cs =
    AN_cs(H~_cs) when there is knowledge (eq. 23), P_a = AN_a(H_m) (eq. 22); softmax left out."""
    heads = {"c": an_u(H_c, c_mask), "s": an_u(H_s, s_mask)}
    if H_cs is not None:
        heads["cs"] = an_cs(H_cs, cs_mask)
    heads["a"] = an_a(H_m, m_mask)
    return heads


def emotion_product(heads: dict) -> torch.Tensor:
    """log P_e up to a constant, normalised: log_softmax(sum of the heads' log-probs), eq. 24's product rule
    (its argmax is the paper's prediction, its softmax a distribution)."""
    return sum(logits.log_softmax(-1) for logits in heads.values()).log_softmax(-1)


def select_words(w_v: nn.Linear, H_m, valid, k3: int):
    """The word selector, eqs. 26-28: S_m = sigmoid(w_v H_m), the top-k3 real entries H~_m, H~_m = S~_m . H~_m.
    H_m (B, L_m, d), valid (B, L_m) -> H~_m (B, k3, d) and its mask (B, k3). (The authors' code passes the
    memory V before Enc_m here: IAMM's `word_selector: reference`.)"""
    S_m = torch.sigmoid(w_v(H_m)).squeeze(-1)  # eq. 26, (B, L_m)
    S_sel, idx = S_m.masked_fill(~valid, -1.0).topk(min(k3, S_m.size(1)), dim=-1)  # eq. 27
    H_sel = H_m.gather(1, idx[..., None].expand(-1, -1, H_m.size(-1)))
    return S_sel.clamp_min(0)[..., None] * H_sel, attendable(S_sel >= 0)  # eq. 28


# ----------------------------------------------------------------------------------------------
# Analysis


@torch.no_grad()
def associated_words(selections: dict, batch: Batch, k: int) -> dict:
    """The k top weighted associated words of the explicit sentence pairs, per example.

    Word space: the M * Lu turn positions, then the Ls situation positions; a word's weight is the
    largest a_keyword * A it received in either direction of any utterance-situation or
    utterance-history pair (memory entries are not words and are left out).
    -> {"ids" (B, k) word ids (PAD if none), "source" (B, k) 0 none / 1 context / 2 situation,
        "positions" (B, k) index into context_ids (source 1) or situation_ids (2), -1 if none,
        "weights" (B, k)}."""
    utt, sit = batch.utt_ids, batch.situation_ids
    B, M, Lu = utt.shape
    dev = utt.device
    P = selections["t"][0].size(0)  # M utterance-situation pairs, then M - 1 utterance-history pairs
    turn = torch.cat([torch.arange(M, device=dev), torch.arange(1, M, device=dev)])[:P]
    o_off = torch.where(torch.arange(P, device=dev) < M, M * Lu, 0)  # history positions are global
    W = M * Lu + sit.size(1)
    score = torch.zeros(B, W, device=dev)
    for (idx, w), off in ((selections["t"], turn * Lu), (selections["o"], o_off)):
        g = (idx + off.view(P, 1, 1, 1, 1)).masked_fill(w <= 0, 0)
        src = w.float().transpose(0, 1).reshape(B, -1)
        score.scatter_reduce_(1, g.transpose(0, 1).reshape(B, -1), src, reduce="amax")
    k = min(k, W)
    weights, pos = score.topk(k, dim=-1)
    found = weights > 0
    in_ctx = pos < M * Lu
    ctx_pos = batch.utt_mask.flatten(1).long().cumsum(1)  # context position of each turn token
    ids = torch.cat([utt.flatten(1), sit], 1).gather(1, pos)
    position = torch.where(in_ctx, ctx_pos.gather(1, pos.clamp_max(M * Lu - 1)), pos - M * Lu)
    return {"ids": ids.masked_fill(~found, 0), "source": torch.where(in_ctx, 1, 2).masked_fill(~found, 0),
            "positions": position.masked_fill(~found, -1), "weights": weights}
