"""IAMM: An Iterative Associative Memory Model for empathetic response generation
(Yang et al., ACL 2024 Findings), equations numbered as in the paper.

    H_u^i  = Enc_u(E_w^i + E_p + E_r)                  utterance-level encoder          (1)
    H_c    = Enc_ctx(H_u^1 ++ ... ++ H_u^M)            dialogue-level encoder           (2)
    H_s    = Enc_sit(E_w^sit + E_p^sit)                situation encoder                (3)
    H_rk^cs = ||_type Enc_cs([CLS] ++ K_rk^type)[0]    commonsense, 5 relations          (4-5)
    H~_cs  = Enc~_cs(H_s^cs ++ H_{U_M}^cs)                                              (6-7)
    IAM(pair): sigmoid association matrices both ways (8-9), first-order top-k1 keywords (10-11),
           second-order top-k2 associated words weighted by their scores (12-14), E_st (15)
    V = V_ek ++ V_ik, memory grown over the utterances (16-18);  H_m = Enc_m(V)         (19)
    P_c, P_s = AN_u(H_c), AN_u(H_s);  P_a = AN_a(H_m);  P_cs = AN_cs(H~_cs)            (20-23)
    L_e = -log(P_c(e*) P_s(e*) P_a(e*) P_cs(e*))                                         (24-25)
    S_m = sigmoid(w_v H_m); top-k3; H~_m = S~_m . H~_m                                   (26-28)
    O = g O_c + (1 - g) O_m, O_c = Dec_c(H_c), O_m = Dec_a(H~_m), g = sigmoid(w [O_c ++ O_m])  (29-32)
    pointer-generator over the flat context (33);  L = L_gen + L_e                       (34-35)

Interpretations (the authors' code, github.com/zhouzhouyang520/IAMM, src/models/IAMM/model.py, was read
to settle what the paper leaves open; nothing was copied):

- Eqs. 1-2: Enc_u runs on every turn separately (batched as B*M sequences) with word + timing signal +
  speaker/listener state embeddings; Enc_ctx runs on the concatenated real tokens of all turns, preceded
  by Enc_u's encoding of a lone [CLS]. The result is position-aligned with `context_ids` ([CLS] + turns),
  so the pointer-generator copies from `context_ext_ids` through Dec_c's cross-attention (eq. 33).
- Eq. 3: [CLS] is prepended to the situation before Enc_sit (the paper adds it; the batch has none).
- Eqs. 4-5: the K phrases of a relation are concatenated (padding squeezed out) after one [CLS]; one
  shared Enc_cs for all relations (the code's `cog_encoder`). A relation vector is real only when the
  relation has at least one token (the code masks the same way); eq. 6 uses the last *real* utterance.
- Eqs. 8-9: the product over heads "prod_n" is read as stacking the H heads, as the stated shapes
  (A in R^{H x d_s x d_t}) and the code require; each head scores sigmoid((w_q^n v_i)^T (w_k^n v_j) /
  sqrt(d_h)) (the code's scaled dot product; the code top-k's raw logits, the paper the sigmoid: same
  order). The same w_q, w_k, w_v serve both directions of a pair, as in eqs. 8-9.
- Eqs. 10-14 (s2u, keywords in the situation s, associated words in the utterance t):
  A^s = mean over real utterance words of A^{t2s} (H, L_s); top-k1 keywords with scores a (eq. 11);
  for each keyword row of A^{s2t}, the top-k2 utterance words with scores A (eq. 12); their value vectors
  (per-head w_v, width d_h) times A, concatenated (eq. 13: "prod_k" is concatenation, shape k2 x d_h),
  times the keyword score a (eq. 14). u2s mirrors it. The code agrees on the selection; it reweights the
  scores through an extra Linear(k, k) + sigmoid, which we leave out (eqs. 13-14 use the scores as is).
  Selection is discrete; the vectors are multiplied by the scores, so gradients reach w_q and w_k.
- Eq. 15 gives (2H k1) entries of width k2 d_h; V in R^{L_m x d} (eq. 18) needs width d, so each branch
  has a projection Linear(k2 d_h, d) (the code's `relation_linear`; identity-sized at the paper's
  15 x 20 = 300 = d). Entries are real when their keyword is real and one associated word is real.
- Parameter sharing (code): per branch, one (w_q, w_k, w_v) for the utterance-situation and
  utterance-history pairs and another for the utterance-memory pair. Explicit pairs use word embeddings
  (E_w^i, E_s) as the paper writes; the memory pair feeds memory entries to the same projections, so
  IAMM needs emb_dim == d_model. The implicit branch uses the 5 relation vectors per sentence, so its k2
  is `k2_implicit` = 5 (the code's `con_topk`).
- Eqs. 16-18: iteration i (0-based) stores M_i = E_sc ++ E_cc ++ E_mc (only E_sc at i = 0: history and
  memory are empty), and the utterance-memory pair of turn i sees M_0 ++ ... ++ M_{i-1} (code). The
  memory length after turn i is 2 H k1 (3 i + 1) per branch; entries of padded turns are masked.
  Only the utterance-memory pair is recurrent; the situation and history pairs of all turns are
  computed in one stacked call before the loop, which then makes one call per turn.
- Eqs. 20-25: AN_u is shared by H_c and H_s (paper and code). L_e = sum of the per-head cross-entropies
  (= -log of the product, eq. 24); `emotion_logits` = log_softmax(sum of per-head log-probs), whose
  argmax is the product rule.
- Eqs. 26-28 use H_m and k3 (paper; the code selects 15 entries from V before Enc_m). Eq. 31's w acts on
  O_c ++ O_m (width 2d, with bias). Generation loss: NLL per non-PAD target token over the extended
  vocabulary, averaged over tokens, no label smoothing (the code's NLLLoss).

Knowledge and ablations (config booleans; a flag removes its parameters, not just zeroes them):
  has_knowledge=False - the `none` knowledge backend: there is nothing to associate implicitly, so
                Enc_cs, Enc~_cs, AN_cs and the implicit IAM are not built and P_cs leaves eq. 24; the model
                is the paper's "w/o IA" and says so (`config.implicit_association`, `config.notes`).
  no_ea       - without explicit association: the explicit IAM is not built; V = V_ik.
  no_ia       - without implicit association: the implicit IAM is not built; V = V_ek. The commonsense
                encoders and P_cs stay (the ablation removes the association, not the knowledge).
  no_ws       - without the word selector and Dec_a (the paper's "w/o WSD"): w_v, Dec_a and the gate are
                not built; O = O_c. H_m still feeds P_a.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.common import (
    CLS,
    NUM_EMOTIONS,
    Decoder,
    EmotionHead,
    Encoder,
    ModelConfig,
    PointerGeneratorSeq2Seq,
    require,
)

STATE_CLS = 1  # dialogue-state id of [CLS] (trainers.data.collate.STATE_CLS)
IAMM_KEYS = ("utt_ids", "utt_mask", "utt_state", "turn_mask", "situation_ids", "situation_mask",
             "knowledge_ids", "knowledge_mask")


@dataclass
class IAMMConfig(ModelConfig):
    iam_heads: int = 2  # H of the association matrices (eqs. 8-9)
    d_h: int = 20  # per-head hidden size of the association module
    k1: int = 5  # keywords (first-order, eq. 11)
    k2: int = 15  # associated words per keyword (second-order, eq. 12), explicit branch
    k2_implicit: int = 5  # the same for the implicit branch: a sentence has 5 relation vectors (code)
    k3: int = 5  # memory entries kept by the word selector (eq. 27)
    num_emotions: int = NUM_EMOTIONS
    num_associated: int = 10  # associated words reported per example (forward / associated_words)
    has_knowledge: bool = True  # False with the `none` knowledge backend (=> paper's "w/o IA")
    no_ea: bool = False
    no_ia: bool = False
    no_ws: bool = False
    # Derived from the flags above and recorded with the config (checkpoints, MLflow params). They may be
    # passed back (vars(cfg) round-trips) but must agree with the flags.
    implicit_association: bool | None = None  # has_knowledge and not no_ia
    notes: str | None = None  # what this configuration leaves out of the paper's IAMM

    def __post_init__(self):
        super().__post_init__()
        for f in ("iam_heads", "d_h", "k1", "k2", "k2_implicit", "k3", "num_emotions", "num_associated"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.emb_dim != self.d_model:
            raise ValueError(f"IAMM needs emb_dim == d_model (the association module projects word embeddings"
                             f" and d-wide memory entries alike), got {self.emb_dim} and {self.d_model}")
        implicit = self.has_knowledge and not self.no_ia
        if self.implicit_association not in (None, implicit):
            raise ValueError(f"implicit_association is derived (has_knowledge and not no_ia = {implicit}), "
                             f"got {self.implicit_association!r}")
        self.implicit_association = implicit
        if self.no_ea and not implicit:
            why = "no_ia" if self.has_knowledge else "has_knowledge=False (the `none` knowledge backend)"
            raise ValueError(f"no_ea together with {why} leaves no association memory at all")
        notes = []
        if not self.has_knowledge:
            notes.append("no commonsense knowledge (has_knowledge=False): no implicit association and no "
                         "P_cs, i.e. the paper's 'w/o IA' setting")
        elif self.no_ia:
            notes.append("ablation w/o IA: implicit association removed (commonsense encoder and P_cs kept)")
        if self.no_ea:
            notes.append("ablation w/o EA: explicit association removed")
        if self.no_ws:
            notes.append("ablation w/o WS: word selector and associated-word decoder removed")
        notes = "; ".join(notes) or "full IAMM"
        if self.notes not in (None, notes):
            raise ValueError(f"notes is derived from the flags ({notes!r}), got {self.notes!r}")
        self.notes = notes


def _attendable(mask: torch.Tensor) -> torch.Tensor:
    """Rows with no real position attend to all of them (finite garbage, masked downstream) instead of NaN."""
    return mask | ~mask.any(-1, keepdim=True)


def _pad_to(x: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    """Zero/False-pad `x` along `dim` (counted from the left) up to `length`."""
    extra = length - x.size(dim)
    if extra <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim) + [0, extra]
    return F.pad(x, pad)


def _squeeze_padding(x: torch.Tensor, mask: torch.Tensor):
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

    def __init__(self, d: int, heads: int, d_h: int, k1: int, k2: int, num_types: int = 2):
        super().__init__()
        self.h, self.d_h, self.k1, self.k2 = heads, d_h, k1, k2
        self.w_qkv = nn.Parameter(torch.empty(num_types, d, 3 * heads * d_h))  # w_q, w_k, w_v per head
        nn.init.uniform_(self.w_qkv, -d ** -0.5, d ** -0.5)
        self.out = nn.Linear(k2 * d_h, d)  # E_st (k2 d_h) -> memory width d

    def project(self, x, type_: int):  # x (..., L, d) -> (..., L, 3 H d_h): q, k, v of every head
        return x @ self.w_qkv[type_]

    def _heads(self, y):  # (P, B, L, 3 H d_h) -> q, k, v each (P, B, H, L, d_h)
        P, B, L, _ = y.shape
        return y.view(P, B, L, 3, self.h, self.d_h).permute(3, 0, 1, 4, 2, 5).unbind(0)

    def select(self, A_y2x, A_x2y, mask_x, mask_y, v_y):
        """Keywords in x (first order, eqs. 10-11), then their associated words in y (eqs. 12-14).

        A_y2x (P, B, H, Ly, Lx), A_x2y (P, B, H, Lx, Ly), v_y (P, B, H, Ly, d_h).
        -> E (P, B, H k1, k2 d_h), valid (P, B, H k1), idx and weights (P, B, H, k1, k2)."""
        P, B, H, Lx, Ly = A_x2y.shape
        m_y = mask_y[:, :, None, :, None].to(A_y2x.dtype)  # (P, B, 1, Ly, 1)
        a_x = (A_y2x * m_y).sum(3) / m_y.sum(3).clamp_min(1.0)  # eq. 10, (P, B, H, Lx)
        a_kw, kw = a_x.masked_fill(~mask_x[:, :, None], -1.0).topk(self.k1, dim=-1)  # eq. 11
        rows = A_x2y.gather(3, kw[..., None].expand(-1, -1, -1, -1, Ly))  # (P, B, H, k1, Ly)
        a_as, idx = rows.masked_fill(~mask_y[:, :, None, None], -1.0).topk(self.k2, dim=-1)  # eq. 12
        kw_ok, as_ok = a_kw >= 0, a_as >= 0  # masked positions carry -1
        w = a_kw.clamp_min(0)[..., None] * a_as.clamp_min(0)  # keyword score x association score
        v = v_y.gather(3, idx.flatten(3)[..., None].expand(-1, -1, -1, -1, self.d_h))  # (P, B, H, k1 k2, d_h)
        E = (w[..., None] * v.view(P, B, H, self.k1, self.k2, self.d_h)).flatten(4)  # eqs. 13-14
        valid = kw_ok & as_ok.any(-1)  # (P, B, H, k1)
        return E.flatten(2, 3), valid.flatten(2, 3), idx, w

    def forward(self, y_t, mask_t, y_o, mask_o):
        """y_t (P, B, Lt, 3 H d_h) projected utterances, mask_t (P, B, Lt); y_o, mask_o the same for o."""
        k = max(self.k1, self.k2)  # top-k needs at least k candidates: pad with masked positions
        y_t, mask_t = _pad_to(y_t, k, 2), _pad_to(mask_t, k, 2)
        y_o, mask_o = _pad_to(y_o, k, 2), _pad_to(mask_o, k, 2)
        (q_t, k_t, v_t), (q_o, k_o, v_o) = self._heads(y_t), self._heads(y_o)
        scale = self.d_h ** -0.5
        A_t2o = torch.sigmoid(q_t @ k_o.transpose(-2, -1) * scale)  # eq. 9, (P, B, H, Lt, Lo)
        A_o2t = torch.sigmoid(q_o @ k_t.transpose(-2, -1) * scale)  # eq. 8, (P, B, H, Lo, Lt)
        E_t, ok_t, idx_t, w_t = self.select(A_t2o, A_o2t, mask_o, mask_t, v_t)  # s2u: words of t
        E_o, ok_o, idx_o, w_o = self.select(A_o2t, A_t2o, mask_t, mask_o, v_o)  # u2s: words of o
        E = self.out(torch.cat([E_t, E_o], dim=2))  # eq. 15, (P, B, 2 H k1, d)
        return E, torch.cat([ok_t, ok_o], dim=2), {"t": (idx_t, w_t), "o": (idx_o, w_o)}


def iterate_associations(iam: InformationAssociation, X_u, mask_u, X_s, mask_s, turn_mask):
    """The iterative association process over the turns, eqs. 16-18 for one branch.

    X_u (B, M, Lu, d) per-turn vectors (word embeddings or relation vectors), mask_u (B, M, Lu);
    X_s (B, Ls, d) the situation's, mask_s (B, Ls); turn_mask (B, M).
    Returns V (B, L_m, d), V_mask (B, L_m), the sentence-pair selections (for the associated words: pairs
    0..M-1 are utterance-situation, M..2M-2 utterance-history of turns 1..M-1) and a trace
    {"memory_lengths": memory length after each turn, "memory_seen": memory length the utterance-memory
    pair of each turn saw, "memory_real": (B, M) real entries stored per turn}.
    """
    B, M, Lu, _ = X_u.shape
    mask_u = mask_u & turn_mask[..., None]
    Y_u, Y_s = iam.project(X_u, 0), iam.project(X_s, 0)  # sentence-pair projections, once per sentence
    q, qm = Y_u.transpose(0, 1), mask_u.transpose(0, 1)  # (M, B, Lu, 3 H d_h), (M, B, Lu)
    # Utterance-situation pairs of all turns and utterance-history pairs of turns 1.. in one call.
    y_o, m_o = [Y_s[None].expand(M, -1, -1, -1)], [mask_s[None].expand(M, -1, -1)]
    y_t, m_t = [q], [qm]
    if M > 1:
        hist = Y_u[:, : M - 1].flatten(1, 2)  # (B, (M-1) Lu, .): turns 0..M-2 in place
        turn_of = torch.arange((M - 1) * Lu, device=X_u.device) // Lu
        before = turn_of[None, None] < torch.arange(1, M, device=X_u.device)[:, None, None]
        y_o.append(hist[None].expand(M - 1, -1, -1, -1))
        m_o.append(mask_u[:, : M - 1].flatten(1, 2)[None] & before)  # (M-1, B, (M-1) Lu): turns before i
        y_t.append(q[1:])
        m_t.append(qm[1:])
    Lo = max(y.size(2) for y in y_o)
    E, ok, sel = iam(torch.cat(y_t), torch.cat(m_t), torch.cat([_pad_to(y, Lo, 2) for y in y_o]),
                     torch.cat([_pad_to(m, Lo, 2) for m in m_o]))
    E_sc, ok_sc, E_cc, ok_cc = E[:M], ok[:M], E[M:], ok[M:]
    # Utterance-memory pairs: the recurrence, one call per turn; memory entries projected once each.
    mem, mem_ok = [E_sc[0]], [ok_sc[0]]
    mem_y = [iam.project(E_sc[0], 1)]
    lengths, seen, real = [E_sc.size(2)], [0], [ok_sc[0].sum(-1)]
    for i in range(1, M):
        y_mem, ok_mem = torch.cat(mem_y, 1), torch.cat(mem_ok, 1)
        E_mc, ok_mc, _ = iam(iam.project(X_u[None, :, i], 1), qm[None, i], y_mem[None], ok_mem[None])
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
    return torch.cat(mem, 1), torch.cat(mem_ok, 1), sel, trace


# ----------------------------------------------------------------------------------------------
# Model


class IAMM(PointerGeneratorSeq2Seq):
    def __init__(self, cfg: IAMMConfig, vocab_size: int, emotion_word_ids: list[int] | None = None):
        super().__init__(cfg, vocab_size, d_mem=cfg.d_model)  # self.decoder = Dec_c over H_c (eq. 29)
        d, E = cfg.d_model, cfg.num_emotions
        self.enc_u = Encoder(cfg.emb_dim, d, cfg)  # eq. 1
        self.enc_ctx = Encoder(d, d, cfg)  # eq. 2
        self.enc_sit = Encoder(cfg.emb_dim, d, cfg)  # eq. 3
        self.an_u = EmotionHead(d, E)  # eqs. 20-21 (shared by H_c and H_s)
        self.an_a = EmotionHead(d, E)  # eq. 22
        self.enc_m = Encoder(d, d, cfg)  # eq. 19
        if cfg.has_knowledge:
            self.enc_cs = Encoder(cfg.emb_dim, d, cfg)  # eq. 4
            self.enc_cs2 = Encoder(d, d, cfg)  # eq. 7
            self.an_cs = EmotionHead(d, E)  # eq. 23
        if not cfg.no_ea:
            self.iam_ek = InformationAssociation(d, cfg.iam_heads, cfg.d_h, cfg.k1, cfg.k2)
        if cfg.implicit_association:
            self.iam_ik = InformationAssociation(d, cfg.iam_heads, cfg.d_h, cfg.k1, cfg.k2_implicit)
        if not cfg.no_ws:
            self.w_v = nn.Linear(d, 1, bias=False)  # eq. 26
            self.decoder_a = Decoder(cfg.emb_dim, d, d, cfg)  # eq. 30
            self.gate = nn.Linear(2 * d, 1)  # eq. 31

    def describe(self) -> str:
        c = self.cfg
        parts = ["explicit association" if not c.no_ea else None,
                 "implicit association" if c.implicit_association else None,
                 "word selector + Dec_a" if not c.no_ws else None]
        heads = "P_c * P_s * P_a" + (" * P_cs" if c.has_knowledge else "")
        return (f"IAMM d={c.d_model} H={c.iam_heads} d_h={c.d_h} k1={c.k1} k2={c.k2} k3={c.k3}; "
                f"{', '.join(p for p in parts if p)}; emotion {heads}; {c.notes}")

    # -- encoders (eqs. 1-7)

    def encode_dialogue(self, batch):
        """H_c (B, L, d) aligned with context_ids ([CLS] + real turn tokens), eqs. 1-2."""
        ids, umask = batch["utt_ids"], batch["utt_mask"]
        B, M, Lu = ids.shape
        s = math.sqrt(self.cfg.emb_dim)
        x = self.embed(ids) + self.state_embedding(batch["utt_state"])[:, :, None] * s  # E_w + E_r
        H_u = self.enc_u(x.flatten(0, 1), _attendable(umask.flatten(0, 1))).view(B, M * Lu, -1)
        cls_ids = ids.new_full((B, 1), CLS)
        cls = self.enc_u(self.embed(cls_ids) + self.state_embedding(torch.full_like(cls_ids, STATE_CLS)) * s,
                         torch.ones_like(cls_ids, dtype=torch.bool))  # (B, 1, d)
        flat = torch.cat([cls, H_u], 1)
        flat_mask = torch.cat([torch.ones_like(cls_ids, dtype=torch.bool), umask.flatten(1)], 1)
        L = batch["context_ids"].size(1)
        flat, _ = _squeeze_padding(_pad_to(flat, L, 1), _pad_to(flat_mask, L, 1))
        return self.enc_ctx(flat[:, :L], batch["context_mask"])  # (B, L, d)

    def encode_situation(self, batch):
        """H_s (B, 1 + Ls, d) over [CLS] + situation, and its mask, eq. 3."""
        ids = batch["situation_ids"]
        ids = torch.cat([ids.new_full((ids.size(0), 1), CLS), ids], 1)
        mask = torch.cat([torch.ones_like(ids[:, :1], dtype=torch.bool), batch["situation_mask"]], 1)
        return self.enc_sit(self.embed(ids), mask), mask

    def encode_commonsense(self, batch):
        """H^cs per sentence: (B, M + 1, R, d) [CLS] vectors of each relation and their mask, eqs. 4-5."""
        ids, mask = batch["knowledge_ids"], batch["knowledge_mask"]  # (B, M + 1, R, K, Lk)
        B, S, R = ids.shape[:3]
        ids, mask = ids.flatten(3), mask.flatten(3)  # phrases of a relation concatenated
        order = (~mask).to(torch.uint8).argsort(dim=-1, stable=True)  # real tokens first, in order
        ids, mask = ids.gather(-1, order), mask.gather(-1, order)
        n = int(mask.sum(-1).max())
        seq = torch.cat([ids.new_full((B, S, R, 1), CLS), ids[..., :n]], -1).flatten(0, 2)
        seq_mask = torch.cat([torch.ones_like(mask[..., :1]), mask[..., :n]], -1).flatten(0, 2)
        H = self.enc_cs(self.embed(seq), seq_mask)[:, 0]  # eq. 4, [CLS] of each relation text
        return H.view(B, S, R, -1), mask.any(-1)  # eq. 5

    # -- association and emotion

    def _encode(self, batch) -> dict:
        require(batch, *IAMM_KEYS)
        cfg = self.cfg
        turn_mask, umask = batch["turn_mask"], batch["utt_mask"]
        B, M, Lu = batch["utt_ids"].shape
        H_c = self.encode_dialogue(batch)
        H_s, s_mask = self.encode_situation(batch)
        out = {"_trace": {}}
        logits = {"c": self.an_u(H_c, batch["context_mask"]), "s": self.an_u(H_s, s_mask)}
        V, V_ok = [], []
        if not cfg.no_ea:  # explicit pairs over word embeddings
            V_ek, ok, sel, out["_trace"]["explicit"] = iterate_associations(
                self.iam_ek, self.embed(batch["utt_ids"]), umask, self.embed(batch["situation_ids"]),
                batch["situation_mask"], turn_mask)
            V.append(V_ek)
            V_ok.append(ok)
            out["_associated"] = self._associated(batch, sel)
        if cfg.has_knowledge:
            H_cs, cs_mask = self.encode_commonsense(batch)  # (B, M + 1, R, d); situation in slot M
            last = (turn_mask.sum(1) - 1).clamp_min(0)  # last real turn, eq. 6
            rows = torch.arange(B, device=last.device)
            H_last, m_last = H_cs[rows, last], cs_mask[rows, last]
            H_cs_tot = torch.cat([H_cs[:, M], H_last], 1)  # eq. 6, (B, 2R, d)
            m_cs_tot = torch.cat([cs_mask[:, M], m_last], 1)
            logits["cs"] = self.an_cs(self.enc_cs2(H_cs_tot, _attendable(m_cs_tot)), m_cs_tot)  # eqs. 7, 23
            if cfg.implicit_association:
                V_ik, ok, _, out["_trace"]["implicit"] = iterate_associations(
                    self.iam_ik, H_cs[:, :M], cs_mask[:, :M], H_cs[:, M], cs_mask[:, M], turn_mask)
                V.append(V_ik)
                V_ok.append(ok)
        V, V_ok = _squeeze_padding(torch.cat(V, 1), torch.cat(V_ok, 1))  # eq. 18, real entries first
        H_m = self.enc_m(V, _attendable(V_ok))  # eq. 19
        logits["a"] = self.an_a(H_m, V_ok)  # eq. 22
        log_P = sum(lg.log_softmax(-1) for lg in logits.values())  # log of the product, eq. 24
        out["emotion_logits"] = log_P.log_softmax(-1)
        out["memory"], out["memory_mask"] = H_c, batch["context_mask"]
        if not cfg.no_ws:
            S_m = torch.sigmoid(self.w_v(H_m)).squeeze(-1)  # eq. 26, (B, L_m)
            S_sel, idx = S_m.masked_fill(~V_ok, -1.0).topk(min(cfg.k3, S_m.size(1)), dim=-1)  # eq. 27
            H_sel = H_m.gather(1, idx[..., None].expand(-1, -1, H_m.size(-1)))
            out["assoc"] = S_sel.clamp_min(0)[..., None] * H_sel  # eq. 28, (B, k3, d)
            out["assoc_mask"] = _attendable(S_sel >= 0)
        if "emotion" in batch:
            for name, lg in logits.items():
                out[f"_emo_loss_{name}"] = F.cross_entropy(lg.float(), batch["emotion"])
            out["_emo_loss"] = sum(out[f"_emo_loss_{name}"] for name in logits)  # eq. 25
        return out

    @torch.no_grad()
    def _associated(self, batch, sel) -> dict:
        """Top weighted associated words of the explicit sentence pairs, per example.

        Word space: the M * Lu turn positions, then the Ls situation positions; a word's weight is the
        largest a_keyword * A it received in either direction of any utterance-situation or
        utterance-history pair (memory entries are not words and are left out).
        -> {"ids" (B, k) word ids (PAD if none), "source" (B, k) 0 none / 1 context / 2 situation,
            "positions" (B, k) index into context_ids (source 1) or situation_ids (2), -1 if none,
            "weights" (B, k)}."""
        utt, sit = batch["utt_ids"], batch["situation_ids"]
        B, M, Lu = utt.shape
        dev = utt.device
        P = sel["t"][0].size(0)  # M utterance-situation pairs, then M - 1 utterance-history pairs
        turn = torch.cat([torch.arange(M, device=dev), torch.arange(1, M, device=dev)])[:P]
        o_off = torch.where(torch.arange(P, device=dev) < M, M * Lu, 0)  # history positions are global
        W = M * Lu + sit.size(1)
        score = torch.zeros(B, W, device=dev)
        for (idx, w), off in ((sel["t"], turn * Lu), (sel["o"], o_off)):
            g = (idx + off.view(P, 1, 1, 1, 1)).masked_fill(w <= 0, 0)
            src = w.float().transpose(0, 1).reshape(B, -1)
            score.scatter_reduce_(1, g.transpose(0, 1).reshape(B, -1), src, reduce="amax")
        k = min(self.cfg.num_associated, W)
        weights, pos = score.topk(k, dim=-1)
        found = weights > 0
        in_ctx = pos < M * Lu
        ctx_pos = batch["utt_mask"].flatten(1).long().cumsum(1)  # context position of each turn token
        ids = torch.cat([utt.flatten(1), sit], 1).gather(1, pos)
        position = torch.where(in_ctx, ctx_pos.gather(1, pos.clamp_max(M * Lu - 1)), pos - M * Lu)
        return {"ids": ids.masked_fill(~found, 0), "source": torch.where(in_ctx, 1, 2).masked_fill(~found, 0),
                "positions": position.masked_fill(~found, -1), "weights": weights}

    # -- decoding (eqs. 29-33)

    def _decoder_states(self, state, ys):
        y = self.embed(ys)
        O_c, copy_logits = self.decoder(y, state["memory"], state["memory_mask"])  # eq. 29
        if self.cfg.no_ws:
            return O_c, copy_logits
        O_m, _ = self.decoder_a(y, state["assoc"], state["assoc_mask"])  # eq. 30
        g = torch.sigmoid(self.gate(torch.cat([O_c, O_m], -1)))  # eq. 31
        return g * O_c + (1 - g) * O_m, copy_logits  # eq. 32

    def forward(self, batch) -> dict:  # losses: eq. 34 per token, eq. 35
        require(batch, "context_ext_ids", "context_mask", "target_ids", "target_ext_ids", "max_oov")
        enc = self._encode(batch)
        out = self._outputs(batch, enc)
        out["associated"] = enc.get("_associated")
        return out

    # -- analysis / serving

    @torch.no_grad()
    def trace(self, batch) -> dict:
        """Per-branch memory growth of the iterative association (see `iterate_associations`)."""
        return self.encoder_extras(batch)["trace"]

    @torch.no_grad()
    def associated_words(self, batch, extras: dict | None = None) -> list[list[dict]]:
        """Per example, the top weighted associated words (best first): dicts with "id", "source"
        ("context" | "situation"), "position" (index into context_ids / situation_ids) and "weight".
        `extras` from `encode(batch, extras=True)` saves an encoder pass. Empty lists under no_ea (the
        implicit branch associates relation vectors, not words)."""
        extras = self.encoder_extras(batch) if extras is None else extras
        B = batch["utt_ids"].size(0)
        if "associated" not in extras:
            return [[] for _ in range(B)]
        a = {k: v.tolist() for k, v in extras["associated"].items()}
        names = {1: "context", 2: "situation"}
        return [[{"id": a["ids"][b][j], "source": names[a["source"][b][j]], "position": a["positions"][b][j],
                  "weight": a["weights"][b][j]} for j in range(len(a["ids"][b])) if a["source"][b][j]]
                for b in range(B)]
