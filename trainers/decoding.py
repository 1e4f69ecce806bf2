"""Batched response decoding: greedy, beam search and sampling.

Works with any model that offers the two-call decoding interface
    state = model.encode(batch)                  # an Encoding (trainers.models.interface), tensors batch-first
    log_probs = model.decode_step(state, ys)     # ys (B, t) extended ids so far, ys[:, 0] = SOS
                                                 # -> (B, V_ext), V_ext = V + state.max_oov
A model that also offers `cache = model.start_cache()` and `model.decode_step(state, ys, cache)` (the models
of trainers.models) is decoded incrementally: the cache keeps the decoder's keys/values of the prefix, so each
step runs the decoder on the newest token only; beam search reorders it with `cache.reorder(rows)`.
Every function returns the generated extended ids (B, <= max_len), without the SOS, with EOS kept
and PAD after it. The only Python loop is over time steps; examples and beams are batched.

The papers (ESCM, IAMM, and CEM whose evaluation they follow) report greedy decoding; the authors' loop runs
max_dec_step + 1 = 51 steps, which the `paper` recipe (trainers.recipes) sets. `DecodeConfig`'s default cap
of 30 tokens is the platform's (shorter replies, lower serving latency).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from trainers.config import DecodeConfig
from trainers.models.batch import Batch
from trainers.models.interface import Encoding
from trainers.models.layers import KVCache
from trainers.tokens import EOS, PAD, SOS


def decode(model, batch: Batch, cfg: DecodeConfig, generator: torch.Generator | None = None,
           state: Encoding | None = None) -> torch.Tensor:
    """Decode `batch` with the strategy named by `cfg`; `state` is `model.encode(batch)` when the caller
    already has it (e.g. for the emotion logits), so the encoder does not run twice."""
    if cfg.strategy == "greedy":
        return greedy(model, batch, cfg.max_len, state=state, kv_cache=cfg.kv_cache)
    if cfg.strategy == "beam":
        return beam_search(model, batch, cfg.beam_size, cfg.max_len, length_penalty=cfg.length_penalty, state=state,
                           kv_cache=cfg.kv_cache)
    return sample(model, batch, cfg.max_len, top_k=cfg.top_k, top_p=cfg.top_p,
                  temperature=cfg.temperature, generator=generator, state=state, kv_cache=cfg.kv_cache)


# ----------------------------------------------------------------------------- helpers

class _eval_mode:
    """Put an nn.Module in eval mode (no dropout) for the duration, then restore its mode."""

    def __init__(self, model):
        self.model, self.was_training = model, getattr(model, "training", False)

    def __enter__(self):
        if self.was_training:
            self.model.eval()

    def __exit__(self, *exc):
        if self.was_training:
            self.model.train()


def _check_max_len(max_len: int) -> None:
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")


def _start_cache(model, kv_cache: bool) -> KVCache | None:
    """A fresh cache when `kv_cache` is asked for and the model decodes incrementally, else None."""
    start = getattr(model, "start_cache", None) if kv_cache else None
    return None if start is None else start()


def _next_log_probs(model, state: Encoding, ys: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
    """The model's next-token log-probs (B, V_ext), with the ids the model lists in `never_generate`
    (structural tokens such as a copied [CLS]) banned."""
    step = model.decode_step(state, ys) if cache is None else model.decode_step(state, ys, cache)
    log_probs = step.float()
    banned = list(getattr(model, "never_generate", ()))
    if banned:
        log_probs[:, banned] = -math.inf
    return log_probs


def _step_loop(model, batch: Batch, max_len: int, pick: Callable[[torch.Tensor], torch.Tensor],
               state: Encoding | None = None, kv_cache: bool = True) -> torch.Tensor:
    """One token per step for every example: `pick` maps log-probs (B, V_ext) to ids (B,)."""
    _check_max_len(max_len)
    with torch.inference_mode(), _eval_mode(model):
        state = model.encode(batch) if state is None else state
        B, device = state.memory.size(0), state.memory.device
        ys = torch.full((B, 1), SOS, dtype=torch.long, device=device)       # (B, 1)
        finished = torch.zeros(B, dtype=torch.bool, device=device)          # (B,)
        cache = _start_cache(model, kv_cache)
        for _ in range(max_len):
            log_probs = _next_log_probs(model, state, ys, cache)            # (B, V_ext)
            log_probs = log_probs.masked_fill(finished.unsqueeze(1), 0.0)   # any valid row; replaced below
            next_ids = pick(log_probs)                                      # (B,)
            next_ids = next_ids.masked_fill(finished, PAD)                  # finished rows stop changing
            ys = torch.cat([ys, next_ids.unsqueeze(1)], dim=1)              # (B, t + 1)
            finished |= next_ids == EOS
            if bool(finished.all()):
                break
        return ys[:, 1:]


# ----------------------------------------------------------------------------- greedy / sampling

def greedy(model, batch: Batch, max_len: int = 30, state: Encoding | None = None,
           kv_cache: bool = True) -> torch.Tensor:
    """Arg-max token at every step. Returns (B, <= max_len) extended ids."""
    return _step_loop(model, batch, max_len, lambda log_probs: log_probs.argmax(dim=-1), state, kv_cache)


def top_k_top_p_filter(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k and outside the nucleus (Holtzman et al., 2020) to -inf.

    The nucleus is the *smallest* set of most probable tokens whose probability mass reaches
    `top_p`: a token is dropped when the mass of the tokens ranked above it already reaches top_p.
    The most probable token is always kept. logits: (B, V) -> (B, V).
    """
    logits = logits.clone()
    if top_k > 0 and top_k < logits.size(-1):
        kth_best = logits.topk(top_k, dim=-1).values[:, -1:]                # (B, 1)
        logits[logits < kth_best] = -math.inf
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)         # (B, V)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs                          # mass ranked above each token
        drop_sorted = mass_before >= top_p
        drop_sorted[:, 0] = False
        drop = drop_sorted.scatter(1, order, drop_sorted)                   # back to vocabulary order
        logits[drop] = -math.inf
    return logits


def sample(model, batch: Batch, max_len: int = 30, top_k: int = 0, top_p: float = 1.0,
           temperature: float = 1.0, generator: torch.Generator | None = None,
           state: Encoding | None = None, kv_cache: bool = True) -> torch.Tensor:
    """Ancestral sampling from softmax(log_probs / temperature), after top-k / top-p filtering."""
    DecodeConfig(strategy="sample", max_len=max_len, top_k=top_k, top_p=top_p, temperature=temperature)

    def pick(log_probs: torch.Tensor) -> torch.Tensor:
        logits = top_k_top_p_filter(log_probs.float() / temperature, top_k, top_p)
        probs = logits.softmax(dim=-1)                                      # (B, V_ext)
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)

    return _step_loop(model, batch, max_len, pick, state, kv_cache)


# ----------------------------------------------------------------------------- beam search

def _gnmt_length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """lp(Y) = ((5 + |Y|) / 6) ** alpha (Wu et al., 2016, eq. 14); alpha = 0 gives 1."""
    return ((5.0 + length.float()) / 6.0) ** alpha


def beam_search(model, batch: Batch, beam_size: int = 5, max_len: int = 30,
                length_penalty: float = 1.0, state: Encoding | None = None, kv_cache: bool = True) -> torch.Tensor:
    """Batched beam search; returns the best hypothesis per example, (B, <= max_len).

    Hypotheses are ranked by sum of log-probs / lp(length) with the GNMT penalty (`length_penalty`
    = alpha; |Y| counts generated tokens including EOS). A hypothesis that emits EOS stays in its
    beam slot: its only continuation is PAD at zero cost, so it keeps its score and length and
    competes with the live hypotheses at every step. Search stops when every slot of every
    example holds a finished hypothesis, or at max_len (unfinished hypotheses then compete too).
    With beam_size = 1 this is exactly greedy decoding.
    """
    _check_max_len(max_len)
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    K = beam_size
    with torch.inference_mode(), _eval_mode(model):
        state = model.encode(batch) if state is None else state
        B, device = state.memory.size(0), state.memory.device
        state = state.select_rows(torch.arange(B, device=device).repeat_interleave(K))  # rows b*K .. b*K+K-1
        ys = torch.full((B * K, 1), SOS, dtype=torch.long, device=device)   # (B*K, 1)
        scores = torch.zeros(B, K, device=device)                           # summed log-probs
        scores[:, 1:] = -math.inf                                           # one live beam at t = 0
        scores = scores.view(B * K)
        lengths = torch.zeros(B * K, dtype=torch.long, device=device)
        finished = torch.zeros(B * K, dtype=torch.bool, device=device)
        base = torch.arange(B, device=device).unsqueeze(1) * K              # (B, 1)
        cache = _start_cache(model, kv_cache)

        for t in range(max_len):
            log_probs = _next_log_probs(model, state, ys, cache)            # (B*K, V_ext)
            V_ext = log_probs.size(-1)
            pad_only = torch.full_like(log_probs, -math.inf)
            pad_only[:, PAD] = 0.0
            log_probs = torch.where(finished.unsqueeze(1), pad_only, log_probs)
            cand_scores = scores.unsqueeze(1) + log_probs                   # (B*K, V_ext)
            cand_len = torch.where(finished, lengths, torch.full_like(lengths, t + 1))
            ranked = cand_scores / _gnmt_length_penalty(cand_len, length_penalty).unsqueeze(1)

            top = ranked.view(B, K * V_ext).topk(K, dim=-1).indices         # (B, K)
            origin = (base + top // V_ext).view(B * K)                      # source row of each new beam
            next_ids = (top % V_ext).view(B * K)
            scores = cand_scores.view(B, K * V_ext).gather(1, top).view(B * K)
            lengths = cand_len.index_select(0, origin)
            finished = finished.index_select(0, origin) | (next_ids == EOS)
            ys = torch.cat([ys.index_select(0, origin), next_ids.unsqueeze(1)], dim=1)
            state = state.select_rows(origin)
            if cache is not None:
                cache.reorder(origin)
            if bool(finished.all()):
                break

        final = scores / _gnmt_length_penalty(lengths, length_penalty)      # (B*K,)
        best = base.squeeze(1) + final.view(B, K).argmax(dim=-1)            # (B,)
        width = int(lengths.index_select(0, best).max())                    # drop all-PAD columns
        return ys.index_select(0, best)[:, 1:1 + width]


# ----------------------------------------------------------------------------- ids -> words

def ids_to_tokens(ids, vocab_itos: list[str], oov_lists: list[list[str]]) -> list[list[str]]:
    """Map extended ids (B, T) to words, stopping at EOS and skipping PAD/SOS.

    Id V + k is the k-th OOV word of that example (pointer-generator extended vocabulary).
    An extended id beyond the example's own OOV list (possible when the batch's max_oov is
    larger) becomes "[UNK]", as `Vocab.decode` does for unknown ids.
    """
    rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
    if len(oov_lists) != len(rows):
        raise ValueError(f"oov_lists has {len(oov_lists)} entries for {len(rows)} sequences")
    V = len(vocab_itos)
    out = []
    for row, oovs in zip(rows, oov_lists, strict=True):
        words = []
        for i in row:
            if i == EOS:
                break
            if i in (PAD, SOS):
                continue
            if i < V:
                words.append(vocab_itos[i])
            elif i - V < len(oovs):
                words.append(oovs[i - V])
            else:
                words.append("[UNK]")
        out.append(words)
    return out
