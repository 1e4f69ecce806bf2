"""The output side shared by the models: the emotion head, the pointer-generator and the generation losses.

- Emotion head: attention aggregation over the encoder states, ESCM eqs. 10-14 (logits; IAMM sums several).
- Pointer-generator (See et al., 2017) as in the authors' `Generator`: p_gen = sigmoid(w . s_t + b) from
  the decoder output s_t only; the copy distribution is softmax over source positions of the head-averaged
  cross-attention logits of the last decoder layer, scattered onto the extended vocabulary V + max_oov
  with `context_ext_ids`.
- Generation loss: NLL per non-PAD target token over the extended vocabulary, averaged over tokens, with
  optional label smoothing (see `label_smoothed_nll`).

Models import only torch (and the dependency-free special-token table, trainers.tokens).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.layers import NEG_INF
from trainers.tokens import PAD

NUM_EMOTIONS = 32  # == trainers.data.emotions.NUM_EMOTIONS
LOG_P_MIN = math.log(1e-20)  # log-probabilities are clamped here (a target the model cannot produce)


class EmotionHead(nn.Module):
    """Attention-aggregation emotion classifier, eqs. 10-14; returns logits (softmax of eq. 14 left out)."""

    def __init__(self, d: int, num_emotions: int = NUM_EMOTIONS):
        super().__init__()
        self.w_a1 = nn.Linear(d, d)
        self.w_s1 = nn.Linear(d, 1, bias=False)  # a bias before a softmax over positions is a no-op
        self.w_a2 = nn.Linear(d, d)
        self.w_s2 = nn.Linear(d, num_emotions)

    def forward(self, H, mask):  # H (B, L, d), mask (B, L) -> (B, E)
        scores = self.w_s1(torch.tanh(self.w_a1(H))).squeeze(-1)  # eqs. 10-11, (B, L)
        P_s = scores.float().masked_fill(~mask, NEG_INF).softmax(-1).to(H.dtype)
        H2 = torch.einsum("bl,bld->bd", P_s, H)  # eq. 12, (B, d)
        return self.w_s2(torch.tanh(self.w_a2(H2)))  # eqs. 13-14 (logits)


class PointerGenerator(nn.Module):
    """Final distribution over V + max_oov: p_gen * P_vocab + (1 - p_gen) * copy (See et al., 2017)."""

    def __init__(self, d: int, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.proj = nn.Linear(d, vocab_size)
        self.p_gen = nn.Linear(d, 1)

    def forward(self, s, copy_logits, ext_ids, max_oov: int):
        """s (B, T, d), copy_logits (B, T, L) masked, ext_ids (B, L) -> log-probs (B, T, V + max_oov)."""
        p_gen = torch.sigmoid(self.p_gen(s).float())  # (B, T, 1)
        P_vocab = self.proj(s).float().softmax(-1) * p_gen  # (B, T, V)
        P = F.pad(P_vocab, (0, max_oov))  # (B, T, V + max_oov)
        copy = copy_logits.float().softmax(-1) * (1.0 - p_gen)  # (B, T, L)
        P = P.scatter_add(2, ext_ids[:, None, :].expand(-1, s.size(1), -1), copy)
        return P.clamp_min(1e-20).log()

    def log_prob_of(self, s, copy_logits, ext_ids, target):
        """log P(y) of the targets only, the same value as `forward(...)[y]`:
            P(y) = p_gen * softmax(W s)[y] + (1 - p_gen) * sum_{l: ext_ids[l] = y} softmax(copy_logits)[l].
        s (N, d), copy_logits (N, L), ext_ids (N, L), target (N,) extended ids -> (N,)."""
        p_gen = torch.sigmoid(self.p_gen(s).float()).squeeze(-1)  # (N,)
        log_P_vocab = self.proj(s).log_softmax(-1, dtype=torch.float32)  # (N, V)
        P_vocab = log_P_vocab.gather(1, target.clamp_max(self.vocab_size - 1)[:, None]).squeeze(1).exp()
        P_vocab = P_vocab * (target < self.vocab_size)  # OOV targets: copy only
        P_copy = (copy_logits.float().softmax(-1) * (ext_ids == target[:, None])).sum(-1)
        return (p_gen * P_vocab + (1.0 - p_gen) * P_copy).clamp_min(1e-20).log()


    def smoothed_nll(self, s, copy_logits, ext_ids, target, eps: float):
        """`label_smoothed_nll` of the mixture at N targets without building the (N, V + max_oov) distribution.

        s (N, d), copy_logits (N, L) masked, ext_ids (N, L), target (N,) non-PAD extended ids
        -> (loss_sum, token_nll (N,), N). With g = p_gen, q = softmax(W s + b) over the V words, a =
        softmax(copy_logits) and C_w = sum_{l: ext_ids[l] = w} a_l, the mixture is P(w) = g q_w + (1 - g) C_w.
        C_w = 0 for every w that is not one of the L source ids, where log P(w) = log g + log q_w, so

            sum_{w < V} log P(w) = V log g + sum_w log q_w + sum_{u in U} [log P(u) - log g - log q_u]

        with U the distinct in-vocabulary source ids and log P(u) = logaddexp(log g + log q_u,
        log(1 - g) + log C_u). The smoothing sum of `label_smoothed_nll` is this minus log P(PAD) and, for
        y < V, log P(y). Only log q (N, V) is built: the rest are reductions over V and values at the L + 2
        ids U, y, PAD (U and its C_u from one sort of the source ids). Same values and gradients as the
        materialised version, except where that one clamps P(w) at 1e-20 before the log: the smoothing terms
        here are exact there (the target's NLL keeps the clamp). With eps > 0 training keeps every word
        near eps / V, far above 1e-20.
        """
        V, L = self.vocab_size, ext_ids.size(1)
        x = self.p_gen(s).float().squeeze(-1)  # (N,)
        log_g, log_1mg = F.logsigmoid(x)[:, None], F.logsigmoid(-x)[:, None]  # log p_gen, log(1 - p_gen)
        log_q = self.proj(s).log_softmax(-1, dtype=torch.float32)  # (N, V)
        a = copy_logits.float().softmax(-1)  # (N, L)
        ids, order = ext_ids.sort(-1)  # runs of equal source ids
        new_run = torch.ones_like(ids, dtype=torch.bool)
        new_run[:, 1:] = ids[:, 1:] != ids[:, :-1]
        run = new_run.long().cumsum(1) - 1  # (N, L) run of each sorted position
        C_U = torch.zeros_like(a).scatter_add(1, run, a.gather(1, order))  # column r: C of run r
        U = torch.zeros_like(ids).scatter(1, run, ids)  # column r: the id of run r
        in_U = (torch.arange(L, device=ids.device) <= run[:, -1:]) & (U < V)  # (N, L)
        C_y = (a * (ext_ids == target[:, None])).sum(-1, keepdim=True)
        C_pad = (a * (ext_ids == PAD)).sum(-1, keepdim=True)
        at = torch.cat([U, target[:, None], torch.full_like(target[:, None], PAD)], 1).clamp_max(V - 1)
        log_q_at = log_q.gather(1, at)  # (N, L + 2)
        in_vocab = torch.cat([in_U, target[:, None] < V, torch.ones_like(in_U[:, :1])], 1)
        log_P = _mixture_log_prob(log_g, log_1mg, log_q_at, torch.cat([C_U, C_y, C_pad], 1), in_vocab)
        log_P_U, log_P_y, log_P_pad = log_P[:, :L], log_P[:, L], log_P[:, L + 1]
        total = V * log_g[:, 0] + log_q.sum(-1) + torch.where(in_U, log_P_U - log_g - log_q_at[:, :L], 0.0).sum(-1)
        y_in = target < V
        smooth = total - log_P_pad - torch.where(y_in, log_P_y, 0.0)  # sum over S (see label_smoothed_nll)
        lp_y = log_P_y.clamp_min(LOG_P_MIN)
        loss = -(1 - eps) * lp_y - eps * smooth / ((V - 1) - y_in.long())
        return loss.sum(), -lp_y, target.new_tensor(target.numel())

def _mixture_log_prob(log_g, log_1mg, log_q, C, in_vocab):
    """log(g q [in_vocab] + (1 - g) C) from log g, log(1 - g), log q and C >= 0: -inf where both parts are 0,
    with finite gradients everywhere (the log of C is taken only where C > 0)."""
    has_copy = C > 0
    log_copy = torch.where(has_copy, log_1mg + torch.where(has_copy, C, 1.0).log(), -math.inf)
    return torch.where(in_vocab, torch.logaddexp(log_g + log_q, log_copy), log_copy)


def label_smoothed_nll(log_probs, target, vocab_size: int, eps: float, pad: int = PAD):
    """Label-smoothed token NLL over the extended vocabulary, PAD targets ignored.

    log_probs (N, V + max_oov), target (N,) extended ids. Per token:
        loss = -(1 - eps) * log p[y] - eps / n * sum_{j in S} log p[j],
    S = base-vocabulary ids except PAD and y (n = |S|), as in the authors' LabelSmoothing (size - 2).
    The extended slots get no smoothing mass: they hold probability 0 outside the example's own copies.
    Returns (loss_sum, token_nll, num_tokens); token_nll (N,) is the unsmoothed -log p[y], 0 at PAD targets.
    """
    keep = target != pad
    lp_y = log_probs.gather(1, target[:, None]).squeeze(1)  # (N,)
    nll = -(lp_y * keep)
    if eps > 0:
        in_vocab = target < vocab_size
        s = log_probs[:, :vocab_size].sum(1) - log_probs[:, pad] - lp_y * in_vocab
        n = (vocab_size - 1) - in_vocab.long()
        loss = (-(1 - eps) * lp_y - eps * s / n) * keep
        loss_sum = loss.sum()
    else:
        loss_sum = nll.sum()
    return loss_sum, nll, keep.sum()
