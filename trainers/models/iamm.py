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

- Eqs. 1-2: Enc_u runs on every turn separately (batched as the real turns of the B*M slots) with word + timing signal +
  speaker/listener state embeddings; Enc_ctx runs on the concatenated real tokens of all turns, preceded
  by Enc_u's encoding of a lone [CLS]. The result is position-aligned with `context_ids` ([CLS] + turns),
  so the pointer-generator copies from `context_ext_ids` through Dec_c's cross-attention (eq. 33). The paper
  adds "[CLS] before the dialogue utterances"; the code puts one before every utterance (its data loader), with
  the [CLS] word row as its state too, encodes [CLS] + tokens in Enc_u and concatenates those outputs for Enc_ctx,
  so H_c holds a [CLS] per turn: Dec_c attends to them, the emotion head AN_u pools over them, and the pointer can
  put mass on them (their copy id is [CLS], which decoding never emits). `utterance_cls: true` does that:
  H_c = Enc_ctx([CLS] U_1 [CLS] U_2 ... [CLS] U_M), its own mask and extended ids ([CLS] at each [CLS], the
  turn tokens' `context_ext_ids`), no lone [CLS]; nothing reads a [CLS] output apart from those positions.
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
  scores through an extra Linear(k, k) + sigmoid, which we leave out by default (eqs. 13-14 use the scores
  as is); `association_weights: reference` does as the code: weights sigmoid(Linear_k1(s_kw)) *
  sigmoid(Linear_k2(s_as)) of the raw scores of the k1 keywords (mean over y) and of their k2 words, each
  IAM with its own two Linears (the code shares the keyword one between the two branches).
  Selection is discrete; the vectors are multiplied by the scores, so gradients reach w_q and w_k.
- Eq. 15 gives (2H k1) entries of width k2 d_h; V in R^{L_m x d} (eq. 18) needs width d, so each branch
  has a projection Linear(k2 d_h, d) (the code's `relation_linear`; identity-sized at the paper's
  15 x 20 = 300 = d). Entries are real when their keyword is real and one associated word is real.
- Parameter sharing (code): per branch, one (w_q, w_k, w_v) for the utterance-situation and
  utterance-history pairs and another for the utterance-memory pair. Explicit pairs use word embeddings
  (E_w^i, E_s) as the paper writes; the memory pair feeds memory entries to the same projections, so
  IAMM needs emb_dim == d_model. `association_inputs: words_states` feeds the turns as the code does: word +
  dialogue-state (speaker/listener) embeddings E_w^i + E_r, Enc_u's input without the positions, in all three
  explicit pairs of a turn (the situation stays E_s: it has no state). Left out either way: the code's turns and
  situation carry their [CLS] into the association too (a candidate keyword / associated word); ours associate
  words only, so `associated_words` stays a list of words. The implicit branch uses the 5 relation vectors per
  sentence, so its k2 is `k2_implicit` = 5 (the code's `con_topk`).
- Eqs. 16-18: iteration i (0-based) stores M_i = E_sc ++ E_cc ++ E_mc (only E_sc at i = 0: history and
  memory are empty), and the utterance-memory pair of turn i sees M_0 ++ ... ++ M_{i-1} (code). The
  memory length after turn i is 2 H k1 (3 i + 1) per branch; entries of padded turns are masked.
  Only the utterance-memory pair is recurrent; the situation and history pairs of all turns are
  computed in one stacked call before the loop, which then makes one call per turn.
- Eqs. 20-25: AN_u is shared by H_c and H_s (paper and code). L_e = sum of the per-head cross-entropies
  (= -log of the product, eq. 24); `emotion_logits` = log_softmax(sum of per-head log-probs), whose
  argmax is the product rule.
- Eqs. 26-28 use H_m and k3 (paper, `word_selector: paper`); the code selects 15 entries from V before
  Enc_m (`word_selector: reference` with k3 = 15). Eq. 31's w acts on
  O_c ++ O_m (width 2d, with bias). Generation loss: NLL per non-PAD target token over the extended
  vocabulary, averaged over tokens, no label smoothing (the code's NLLLoss).

Knowledge and ablations (config booleans; a flag removes its parameters, not just zeroes them):
  has_knowledge=False - the `none` knowledge backend: there is nothing to associate implicitly, so
                Enc_cs, Enc~_cs, AN_cs and the implicit IAM are not built and P_cs leaves eq. 24. This is
                NOT the paper's "w/o IA" row (which keeps the commonsense encoders and P_cs): it is IAMM
                without knowledge, and says so (`config.implicit_association`, `config.notes`).
  no_ea       - without explicit association: the explicit IAM is not built; V = V_ik.
  no_ia       - without implicit association: the implicit IAM is not built; V = V_ek. The commonsense
                encoders and P_cs stay (the ablation removes the association, not the knowledge).
  no_ws       - without the word selector and Dec_a (the paper's "w/o WSD"): w_v, Dec_a and the gate are
                not built; O = O_c. H_m still feeds P_a.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from trainers.models.association import (
    InformationAssociation,
    associated_words,
    attendable,
    emotion_heads,
    emotion_product,
    explicit_memory,
    implicit_memory,
    pad_to,
    select_words,
    squeeze_padding,
)
from trainers.models.batch import Batch
from trainers.models.interface import CONTEXT_KEYS, Encoding, PointerGeneratorSeq2Seq, require
from trainers.models.layers import Decoder, Encoder, KVCache, ModelConfig
from trainers.models.output import NUM_EMOTIONS, EmotionHead
from trainers.tokens import CLS, PAD, STATE_CLS

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
    num_associated: int = 10  # associated words reported per example (extras / associated_words)
    has_knowledge: bool = True  # False with the `none` knowledge backend: no implicit association and no P_cs
    association_weights: str = "paper"  # "paper": a_kw * A (eqs. 13-14); "reference": the code's reweighting
    word_selector: str = "paper"  # "paper": top-k3 of H_m (eqs. 26-28); "reference": of V before Enc_m (code)
    utterance_cls: bool = False  # False: one [CLS] before the dialogue (eqs. 1-2); True: one per turn (code)
    association_inputs: str = "words"  # "words": E_w in the explicit pairs (eqs. 8-15); "words_states": + E_r (code)
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
        for f in ("association_weights", "word_selector"):
            if getattr(self, f) not in ("paper", "reference"):
                raise ValueError(f"{f} must be 'paper' or 'reference', got {getattr(self, f)!r}")
        if self.association_inputs not in ("words", "words_states"):
            raise ValueError(f"association_inputs must be 'words' or 'words_states', got {self.association_inputs!r}")
        if not isinstance(self.utterance_cls, bool):
            raise ValueError(f"utterance_cls must be true or false, got {self.utterance_cls!r}")
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
                         "commonsense emotion head P_cs, i.e. w/o IA and w/o the knowledge path (not the "
                         "paper's 'w/o IA' row, which keeps P_cs)")
        elif self.no_ia:
            notes.append("ablation w/o IA: implicit association removed (commonsense encoder and P_cs kept)")
        if self.no_ea:
            notes.append("ablation w/o EA: explicit association removed")
        if self.no_ws:
            notes.append("ablation w/o WS: word selector and associated-word decoder removed")
        if self.association_weights == "reference":
            notes.append("association weights as the authors' code (Linear(k, k) + sigmoid of the raw scores)")
        if self.word_selector == "reference":
            notes.append(f"word selector over V before Enc_m as the authors' code (top-{self.k3})")
        if self.utterance_cls:
            notes.append("a [CLS] before every turn in H_c as the authors' code")
        if self.association_inputs == "words_states":
            notes.append("explicit association over word + dialogue-state embeddings as the authors' code")
        notes = "; ".join(notes) or "full IAMM"
        if self.notes not in (None, notes):
            raise ValueError(f"notes is derived from the flags ({notes!r}), got {self.notes!r}")
        self.notes = notes


@dataclass
class IAMMEncoding(Encoding):
    """`Encoding` plus the word selector's output, the memory of Dec_a (eq. 30); None under no_ws."""

    selected: torch.Tensor | None = None  # H~_m (B, k3, d), eq. 28
    selected_mask: torch.Tensor | None = None  # (B, k3)


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
        ref = cfg.association_weights == "reference"
        if not cfg.no_ea:
            self.iam_ek = InformationAssociation(d, cfg.iam_heads, cfg.d_h, cfg.k1, cfg.k2, reference_weights=ref)
        if cfg.implicit_association:
            self.iam_ik = InformationAssociation(d, cfg.iam_heads, cfg.d_h, cfg.k1, cfg.k2_implicit,
                                                 reference_weights=ref)
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

    def embed_inputs(self, batch: Batch) -> dict:
        """The word embeddings of a step through ONE lookup of the word table (`embed_many`): E_u (B, M, Lu, emb)
        of the turns, E_s (B, Ls, emb) of the situation, E_cls (1, emb) of [CLS], and the dialogue-state
        embeddings E_r (B, M, emb) of the turns and E_r_cls (1, emb) of [CLS]'s state. Unseen words' vectors, when
        the batch has them, replace [UNK] in E_u and E_s, hence in Enc_u, Enc_sit and the explicit association."""
        cls = batch.utt_ids.new_full((1,), CLS)
        E_u, E_s, E_cls, E_r, E_r_cls = self.embed_many(batch.utt_ids, batch.situation_ids, cls,
                                                         states=(batch.utt_state, torch.full_like(cls, STATE_CLS)))
        E_u = self.with_unseen(E_u, batch.utt_unseen, batch.unseen_vectors)  # unseen words (interface docstring)
        E_s = self.with_unseen(E_s, batch.situation_unseen, batch.unseen_vectors)
        return {"E_u": E_u, "E_s": E_s, "E_cls": E_cls, "E_r": E_r, "E_r_cls": E_r_cls}

    def encode_dialogue(self, batch: Batch, E: dict | None = None):
        """H_c (B, L, d) with its mask (B, L) and the extended ids of its positions (B, L), what the pointer copies,
        eqs. 1-2; E from `embed_inputs`. Enc_u runs on each real turn (word + state embeddings), Enc_ctx on their
        outputs concatenated without padding. Default: preceded by Enc_u's encoding of a lone [CLS], so H_c is
        aligned with context_ids ([CLS] + turn tokens). `utterance_cls`: every turn is [CLS] + its tokens in Enc_u,
        H_c is [CLS] U_1 [CLS] U_2 ... (L up to context length + M - 1), its ids those tokens' ([CLS] at each
        [CLS])."""
        E = self.embed_inputs(batch) if E is None else E
        umask = batch.utt_mask
        B, M, _ = umask.shape
        x = E["E_u"] + E["E_r"][:, :, None]  # E_w + E_r, (B, M, Lu, emb)
        cls_x = E["E_cls"] + E["E_r_cls"]  # [CLS] with its own state, (1, emb)
        turn_real = umask.any(-1)  # (B, M)
        if self.cfg.utterance_cls:
            x = torch.cat([cls_x.expand(B, M, 1, -1), x], 2)  # (B, M, 1 + Lu, emb)
            umask = torch.cat([turn_real[..., None], umask], 2)
        Lt = umask.size(2)
        real = turn_real.flatten().nonzero().squeeze(1)  # Enc_u runs on the real turns only
        H = self.enc_u(x.flatten(0, 1).index_select(0, real), umask.flatten(0, 1).index_select(0, real))
        H_u = H.new_zeros(B * M, Lt, H.size(-1)).index_copy(0, real, H).view(B, M * Lt, -1)
        if self.cfg.utterance_cls:
            return self._encode_turns_with_cls(batch, H_u, umask.flatten(1))
        cls_mask = umask.new_ones(B, 1)
        cls = self.enc_u(cls_x.expand(B, 1, -1), cls_mask)  # (B, 1, d)
        flat = torch.cat([cls, H_u], 1)
        flat_mask = torch.cat([cls_mask, umask.flatten(1)], 1)
        L = batch.context_ids.size(1)
        flat, _ = squeeze_padding(pad_to(flat, L, 1), pad_to(flat_mask, L, 1))
        return self.enc_ctx(flat[:, :L], batch.context_mask), batch.context_mask, batch.context_ext_ids

    def _encode_turns_with_cls(self, batch: Batch, H_u, mask):
        """Enc_ctx over [CLS] U_1 [CLS] U_2 ... from H_u (B, M (1 + Lu), d) and its mask (B, M (1 + Lu)): the turn
        tokens' extended ids are read from context_ext_ids (turn token j of the flattened turns is context position
        1 + j), [CLS] stands before each turn. -> H_c, its mask, its extended ids, each (B, L + M - 1(, d))."""
        B, M, Lu = batch.utt_mask.shape
        ctx_pos = batch.utt_mask.flatten(1).long().cumsum(1).clamp_max(batch.context_ids.size(1) - 1)
        ext = batch.context_ext_ids.gather(1, ctx_pos).view(B, M, Lu)
        ext = torch.cat([torch.full_like(ext[..., :1], CLS), ext], 2).flatten(1)  # (B, M (1 + Lu))
        L = batch.context_ids.size(1) + M - 1  # at most one [CLS] per turn instead of the lone one
        flat, flat_mask = squeeze_padding(pad_to(H_u, L, 1), pad_to(mask, L, 1))
        ext, _ = squeeze_padding(pad_to(ext, L, 1)[..., None], pad_to(mask, L, 1))
        flat, flat_mask, ext = flat[:, :L], flat_mask[:, :L], ext[:, :L, 0].masked_fill(~flat_mask[:, :L], PAD)
        return self.enc_ctx(flat, flat_mask), flat_mask, ext

    def encode_situation(self, batch: Batch, E: dict):
        """H_s (B, 1 + Ls, d) over [CLS] + situation, and its mask, eq. 3; E from `embed_inputs`."""
        E_s = E["E_s"]
        x = torch.cat([E["E_cls"].expand(E_s.size(0), 1, -1), E_s], 1)
        mask = torch.cat([batch.situation_mask.new_ones(E_s.size(0), 1), batch.situation_mask], 1)
        return self.enc_sit(x, mask), mask

    def encode_commonsense(self, batch: Batch):
        """H^cs per sentence: (B, M + 1, R, d) [CLS] vectors of each relation and their mask, eqs. 4-5."""
        ids, mask = batch.knowledge_ids, batch.knowledge_mask  # (B, M + 1, R, K, Lk)
        B, S, R = ids.shape[:3]
        ids, mask = ids.flatten(3), mask.flatten(3)  # phrases of a relation concatenated
        order = (~mask).to(torch.uint8).argsort(dim=-1, stable=True)  # real tokens first, in order
        ids, mask = ids.gather(-1, order), mask.gather(-1, order)
        n = int(mask.sum(-1).max())
        seq = torch.cat([ids.new_full((B, S, R, 1), CLS), ids[..., :n]], -1).flatten(0, 2)
        seq_mask = torch.cat([torch.ones_like(mask[..., :1]), mask[..., :n]], -1).flatten(0, 2)
        H = self.enc_cs(self.embed(seq), seq_mask)[:, 0]  # eq. 4, [CLS] of each relation text
        return H.view(B, S, R, -1), mask.any(-1)  # eq. 5

    def summarise_commonsense(self, H_cs, cs_mask, turn_mask):
        """H~_cs = Enc~_cs(H_s^cs ++ H_{U_M}^cs) (B, 2R, d) over the situation and the last real turn, and its
        mask, eqs. 6-7."""
        B, M = turn_mask.shape
        last = (turn_mask.sum(1) - 1).clamp_min(0)  # last real turn, eq. 6
        rows = torch.arange(B, device=last.device)
        H = torch.cat([H_cs[:, M], H_cs[rows, last]], 1)  # eq. 6, (B, 2R, d)
        mask = torch.cat([cs_mask[:, M], cs_mask[rows, last]], 1)
        return self.enc_cs2(H, attendable(mask)), mask  # eq. 7

    # -- association memory (eqs. 8-19), emotion (eqs. 20-25), word selector (eqs. 26-28)

    def encode(self, batch: Batch) -> IAMMEncoding:
        require(batch, *CONTEXT_KEYS, *IAMM_KEYS)
        cfg, turn_mask = self.cfg, batch.turn_mask
        E = self.embed_inputs(batch)
        H_c, c_mask, c_ext = self.encode_dialogue(batch, E)  # eqs. 1-2
        H_s, s_mask = self.encode_situation(batch, E)  # eq. 3
        memories, extras = [], {"trace": {}}
        if not cfg.no_ea:
            X_u = E["E_u"] + E["E_r"][:, :, None] if cfg.association_inputs == "words_states" else E["E_u"]
            ek = explicit_memory(self.iam_ek, X_u, batch.utt_mask, E["E_s"], batch.situation_mask,
                                 turn_mask, batch.context_ids.size(1))
            memories.append(ek)
            extras["associated"] = associated_words(ek.selections, batch, cfg.num_associated)
            extras["trace"]["explicit"] = ek.trace
        H_cs_sum = cs_sum_mask = None
        if cfg.has_knowledge:
            H_cs, cs_mask = self.encode_commonsense(batch)  # eqs. 4-5, (B, M + 1, R, d); situation in slot M
            H_cs_sum, cs_sum_mask = self.summarise_commonsense(H_cs, cs_mask, turn_mask)  # eqs. 6-7
            if cfg.implicit_association:
                ik = implicit_memory(self.iam_ik, H_cs, cs_mask, turn_mask)
                memories.append(ik)
                extras["trace"]["implicit"] = ik.trace
        V, V_ok = squeeze_padding(torch.cat([m.V for m in memories], 1),
                                  torch.cat([m.valid for m in memories], 1))  # eq. 18, real entries first
        H_m = self.enc_m(V, attendable(V_ok))  # eq. 19
        an_cs = self.an_cs if cfg.has_knowledge else None
        heads = emotion_heads(self.an_u, self.an_a, an_cs, H_c, c_mask, H_s, s_mask, H_m, V_ok,
                              H_cs_sum, cs_sum_mask)  # eqs. 20-23
        selector_input = V if cfg.word_selector == "reference" else H_m
        selected, selected_mask = (None, None) if cfg.no_ws else select_words(self.w_v, selector_input, V_ok, cfg.k3)
        return IAMMEncoding(H_c, c_mask, c_ext, int(batch.max_oov),
                            emotion_product(heads), heads, extras, selected, selected_mask)  # eq. 24

    # -- decoding (eqs. 29-33)

    def _decoder_states(self, enc: IAMMEncoding, ys, cache: KVCache | None = None):
        y = self.embed(ys)
        O_c, copy_logits = self.decoder(y, enc.memory, enc.mask, cache)  # eq. 29
        if self.cfg.no_ws:
            return O_c, copy_logits
        O_m, _ = self.decoder_a(y, enc.selected, enc.selected_mask, cache)  # eq. 30
        g = torch.sigmoid(self.gate(torch.cat([O_c, O_m], -1)))  # eq. 31
        return g * O_c + (1 - g) * O_m, copy_logits  # eq. 32

    # -- analysis / serving

    @torch.no_grad()
    def trace(self, batch: Batch) -> dict:
        """Per-branch memory growth of the iterative association (see `AssociationMemory.trace`)."""
        return self.encode(batch).extras["trace"]

    @torch.no_grad()
    def associated_words(self, batch: Batch, encoding: Encoding | None = None) -> list[list[dict]]:
        """Per example, the top weighted associated words (best first): dicts with "id", "source"
        ("context" | "situation"), "position" (index into context_ids / situation_ids) and "weight".
        `encoding`, the batch's `encode(batch)` when the caller has it, saves an encoder pass. Empty lists
        under no_ea (the implicit branch associates relation vectors, not words)."""
        extras = (self.encode(batch) if encoding is None else encoding).extras
        B = batch.size
        if "associated" not in extras:
            return [[] for _ in range(B)]
        a = {k: v.tolist() for k, v in extras["associated"].items()}
        names = {1: "context", 2: "situation"}
        return [[{"id": a["ids"][b][j], "source": names[a["source"][b][j]], "position": a["positions"][b][j],
                  "weight": a["weights"][b][j]} for j in range(len(a["ids"][b])) if a["source"][b][j]]
                for b in range(B)]
