"""ESCM: Exploiting Emotion-Semantic Correlations for empathetic response generation
(Yang et al., EMNLP 2023 Findings), equations numbered as in the paper.

    H_ctx = Enc_ctx(E_c + pos + state)                                   (1)
    E_ds  = W_s H_ctx + b_s                       (B, L, d_s=10)         (2)
    E_dot = (W_c E_c + b_c)(W_e E_e + b_e)^T      (B, L, d_e=32)         (3)
    E_de  = W_ce E_dot + b_ce                                            (4)
    V_des = E_de ++ E_ds ;  H_des = Enc_des(V_des)                       (5, 6)
    p_ij  = softmax_j over dependency neighbours of V_qk[i] . V_qk[j]    (7, 8)
    H_cor = ReLU(sum_j p_ij (W_v H_des[j] + b_v))                         (9)
    two aggregation emotion heads on H_ctx and H_cor, one CE loss each   (10-17)
    decoder with pointer-generator over H = H_ctx ++ H_cor               (18-20)
    L = L_gen + L_ctx^e + L_cor^e                                        (21)

Interpretations (the authors' code, github.com/zhouzhouyang520/EmpatheticDialogueGeneration_ESCM,
was read to settle what the paper leaves open; nothing was copied):

- Eq. 2: the authors compute E_ds from the context encoder output H_ctx (contextual, hence "dynamic"),
  not from the raw word embeddings E_c as the text reads; we follow the code. E_c in eq. 3 is the
  (x sqrt(emb_dim)) word embedding of the context ids, E_e the same table at the 32 emotion-word ids.
- Eq. 6: Enc_des is a second 1-layer pre-norm Transformer encoder of width d_s + d_e = 42 (2 heads,
  bias-free input projection, timing signal, final LayerNorm), like Enc_ctx.
- Eqs. 7-8: V_p and V_r "in R^{L x L x d_pr}" are, per ordered pair (i, j): the relation embedding of
  dep[i, j] on both sides and each side's own POS embedding, i.e. the query of pair (i, j) is
  H_des[i] ++ V_r[dep_ij] ++ V_p[pos_i], the key is H_des[j] ++ V_r[dep_ij] ++ V_p[pos_j], one head, no
  projections (as in the code). Their dot product decomposes exactly into
      H_des[i].H_des[j] + ||V_r[dep_ij]||^2 + V_p[pos_i].V_p[pos_j],
  which we compute as two (L x L) matmuls plus a per-relation scalar lookup: the L x L x (d_s+d_e+2d_pr)
  tensor is never built. Deviation: the score is divided by sqrt(width of V_qk) (`gcn_scaled`, set it
  False for eq. 8 verbatim), because the unscaled sums (~40-100) saturate the softmax at init.
- The graph of eq. 8 (a_ij = r_ij > 0, r_ij the relation id of the pair) is built from the batch's directed
  parse (`context_dep`: head -> dependent arcs, the ROOT label at each root) in one of two ways
  (`gcn_graph`); both tie [CLS] to every token with a dedicated relation (`cls_edges`, as the authors'
  code): position 0 <-> every real token, relation id num_dep (the relation table has num_dep + 1 rows).
  "symmetric" (default): the paper's a_ij = 1 "when node i and node j have a direct relationship in the
      dependency tree", read as symmetric: every arc is used in both directions, and every real token gets a
      self loop (relation id 1) so that eq. 8 is well defined on every row;
  "reference": the graph as the authors' code builds it: arcs only from head (query i) to dependent (key
      j), a self loop at each sentence root only (with the ROOT relation), [CLS] also to itself; a leaf
      attends to [CLS] alone. POS tags and relations share one embedding table (the code's single tag /
      relation vocabulary), and the recipe pairs it with unscaled scores (`gcn_scaled` False, eq. 8 verbatim).
  Padded rows get p = 0.
- `gcn_embed_scale` (the paper recipe's; off by default): the POS and relation embeddings enter eq. 7 multiplied
  by sqrt(d_pr), as in the reference. There (src/models/ESCM/model.py) the single tag/relation table is built with
  `share_embedding(..., pretrain=False, emb_dim=dep_dim)` from src/models/common.py, i.e. their `Embeddings`
  wrapper, whose forward returns the looked-up rows times sqrt(its width); `dep_dim` is 50 (src/utils/config.py).
  `gcn_layer` concatenates those scaled rows into the query and key, so in the decomposition above the relation
  and POS terms are each d_pr = 50 times larger than with unscaled rows (the H_des term is untouched).
- Eq. 9: the code aggregates W_v H_des (the paper writes V_des); we follow the code, with the bias b_v.
- Eqs. 14-15: each head returns logits; the losses are CE per head (eqs. 16-17). Eq. 15 adds the heads'
  probabilities, P_e = P_ctx + P_cor; the code that produced the paper's Acc adds their logits, and so do we:
  `emotion_logits` = log_softmax(logits_ctx + logits_cor), whose argmax is the reported prediction and whose
  softmax is a proper distribution (the normalised product of the two heads' distributions).
- Unseen context words (evaluation and serving under `unseen_vectors`, trainers.models.interface): their vectors
  replace [UNK] in E_c, which feeds both Enc_ctx (eq. 1) and E_dot (eq. 3).
- Eq. 20: the generation loss is averaged over non-PAD target tokens (the code's NLLLoss mean), no label
  smoothing by default (the authors' ESCM uses none); targets are extended ids (copyable OOVs).

Ablations (Table 3) as config booleans; a flag removes its parameters, not just zeroes them:
  no_desv  - H_des := H_ctx; W_s, W_c, W_e, W_ce and Enc_des are not built (GCN and H_cor get width d).
  no_dcgcn - no GCN (W_v, V_p, V_r not built); H_cor := H_des, so the DESV branch still reaches the
             decoder memory and the second emotion head.
  no_vr / no_vp - the relation / POS term of eq. 7 and its embedding table are dropped.
  no_vdes  - the H_des term of eq. 7 is dropped. It owns no parameters (H_des still feeds W_v), so this
             flag changes the output but not the parameter set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainers.models.batch import Batch
from trainers.models.interface import CONTEXT_KEYS, Encoding, PointerGeneratorSeq2Seq, require
from trainers.models.layers import NEG_INF, Encoder, ModelConfig
from trainers.models.output import NUM_EMOTIONS, EmotionHead
from trainers.tokens import DEP_SELF

GCN_GRAPHS = ("symmetric", "reference")  # eq. 8's graph (module docstring)


@dataclass
class ESCMConfig(ModelConfig):
    d_s: int = 10  # dynamic semantic vector size (eq. 2)
    num_emotions: int = NUM_EMOTIONS  # d_e (eqs. 3-4)
    d_pr: int = 50  # POS / dependency-relation embedding size (eq. 7)
    num_pos: int = 20  # POS ids: 0 pad, 1 CLS, 2.. tags
    num_dep: int = 48  # relation ids: 0 none, 1 self loop, 2.. labels
    gcn_graph: str = "symmetric"  # eq. 8's graph from the parse: "symmetric" or "reference" (module docstring)
    cls_edges: bool = True  # connect [CLS] to every token in the GCN (authors' code)
    gcn_scaled: bool = True  # divide eq. 8 scores by sqrt(width of V_qk)
    gcn_embed_scale: bool = False  # V_p, V_r rows x sqrt(d_pr) in eq. 7, as the reference's Embeddings (docstring)
    no_desv: bool = False
    no_dcgcn: bool = False
    no_vr: bool = False
    no_vp: bool = False
    no_vdes: bool = False

    def __post_init__(self):
        super().__post_init__()
        for f in ("d_s", "num_emotions", "d_pr", "num_pos", "num_dep"):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{f} must be a positive int, got {v!r}")
        if self.num_pos < 2 or self.num_dep < 2:
            raise ValueError(f"num_pos and num_dep must be >= 2 (pad + CLS/self loop), got "
                             f"num_pos={self.num_pos}, num_dep={self.num_dep}")
        if self.gcn_graph not in GCN_GRAPHS:
            raise ValueError(f"gcn_graph must be one of {GCN_GRAPHS}, got {self.gcn_graph!r}")
        if self.no_desv and self.no_dcgcn:
            raise ValueError("no_desv and no_dcgcn together leave no correlation branch (use 'transformer')")
        inner = [f for f in ("no_vr", "no_vp", "no_vdes") if getattr(self, f)]
        if self.no_dcgcn and inner:
            raise ValueError(f"{inner} ablate parts of the GCN, which no_dcgcn already removes")
        if not self.no_desv and (self.num_emotions + self.d_s) % self.num_heads:
            raise ValueError(f"d_s + num_emotions ({self.d_s + self.num_emotions}) must be divisible by "
                             f"num_heads ({self.num_heads}) for Enc_des")


def symmetric_graph(dep, mask, cls_rel: int | None):
    """Relation ids r (B, L, L) of the undirected graph: each arc of the directed parse `dep` both ways, a
    self loop (DEP_SELF) on every real token, [CLS] <-> every real token with relation `cls_rel` (None: no
    [CLS] ties). 0 = no edge; padded positions have none."""
    L = dep.size(1)
    real = mask[:, :, None] & mask[:, None, :]
    eye = torch.eye(L, dtype=torch.bool, device=dep.device)
    r = torch.where(eye, DEP_SELF, torch.where(dep > 0, dep, dep.transpose(1, 2))) * real
    return r if cls_rel is None else r.masked_fill(_cls_pairs(L, dep.device) & real & (r == 0), cls_rel)


def reference_graph(dep, mask, cls_rel: int | None):
    """Relation ids r (B, L, L) of the authors' directed graph: the parse's head -> dependent arcs (row =
    head) and its root self loops as they are, [CLS] row and column (itself included) with `cls_rel`."""
    real = mask[:, :, None] & mask[:, None, :]
    r = dep * real
    return r if cls_rel is None else r.masked_fill(_cls_pairs(dep.size(1), dep.device) & real, cls_rel)


def _cls_pairs(L: int, device) -> torch.Tensor:
    first = torch.arange(L, device=device) == 0
    return first[:, None] | first[None, :]  # (L, L) row or column 0


class CorrelationGCN(nn.Module):
    """Dynamic correlation GCN, eqs. 7-9 (see the module docstring for the V_qk decomposition and graphs)."""

    def __init__(self, d_in: int, cfg: ESCMConfig):
        super().__init__()
        self.use_des, self.num_dep = not cfg.no_vdes, cfg.num_dep
        self.cls_rel = cfg.num_dep if cfg.cls_edges else None
        self.graph = symmetric_graph if cfg.gcn_graph == "symmetric" else reference_graph
        self.n_pos = 0 if cfg.no_vp else cfg.num_pos
        self.n_rel = 0 if cfg.no_vr else cfg.num_dep + 1
        self.shared_table = cfg.gcn_graph == "reference"
        if self.shared_table:  # one table: the POS rows, then the relation rows
            rows = self.n_pos + self.n_rel
            self.tag_rel_emb = nn.Embedding(rows, cfg.d_pr, padding_idx=0) if rows else None
        else:
            self.pos_emb = nn.Embedding(self.n_pos, cfg.d_pr, padding_idx=0) if self.n_pos else None  # V_p
            self.rel_emb = nn.Embedding(self.n_rel, cfg.d_pr, padding_idx=0) if self.n_rel else None  # V_r
        self.w_v = nn.Linear(d_in, d_in)
        width = d_in * self.use_des + cfg.d_pr * ((not cfg.no_vp) + (not cfg.no_vr))
        self.scale = width ** -0.5 if cfg.gcn_scaled and width else 1.0
        self.tag_scale = cfg.d_pr ** 0.5 if cfg.gcn_embed_scale else 1.0  # on V_p, V_r rows (docstring)

    def tables(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(V_p (num_pos, d_pr), V_r (num_dep + 1, d_pr)) as eq. 7 uses them (x sqrt(d_pr) under
        `gcn_embed_scale`), None where ablated."""
        if not self.shared_table:
            V_p = None if self.pos_emb is None else self.pos_emb.weight
            V_r = None if self.rel_emb is None else self.rel_emb.weight
        elif self.tag_rel_emb is None:
            V_p = V_r = None
        else:
            w = self.tag_rel_emb.weight
            V_p, V_r = (w[:self.n_pos] if self.n_pos else None), (w[self.n_pos:] if self.n_rel else None)
        if self.tag_scale == 1.0:
            return V_p, V_r
        return tuple(None if t is None else t * self.tag_scale for t in (V_p, V_r))

    def relations(self, dep, mask):
        """Relation ids r_ij (B, L, L) of eq. 8's graph, 0 = no edge."""
        return self.graph(dep, mask, self.cls_rel)

    def attention(self, H_des, pos, dep, mask):
        """-> p (B, L, L), eq. 8; rows of padded positions are all zero."""
        rel = self.relations(dep, mask)
        adj = rel > 0  # a_ij
        p = (self.scores(H_des, pos, rel).float() * self.scale).masked_fill(~adj, NEG_INF).softmax(-1)  # fp32: no NaN
        return (p * adj).to(H_des.dtype)

    def scores(self, H_des, pos, rel):
        """V_qk[i] . V_qk[j] (B, L, L) of eq. 8 before the softmax and `gcn_scaled`, for every pair (i, j) with
        relation ids `rel`, from the decomposition in the module docstring."""
        B, L, _ = H_des.shape
        scores = H_des.new_zeros(B, L, L)
        if self.use_des:
            scores = scores + H_des @ H_des.transpose(1, 2)  # H_des[i] . H_des[j]
        V_p, V_r = self.tables()
        if V_p is not None:
            P = F.embedding(pos, V_p, padding_idx=0)  # (B, L, d_pr)
            scores = scores + P @ P.transpose(1, 2)  # V_p[pos_i] . V_p[pos_j]
        if V_r is not None:
            scores = scores + V_r.pow(2).sum(-1)[rel]  # ||V_r[r_ij]||^2
        return scores

    def forward(self, H_des, pos, dep, mask):  # -> H_cor (B, L, d_in), p (B, L, L)
        p = self.attention(H_des, pos, dep, mask)
        return F.relu(p @ self.w_v(H_des)), p  # eq. 9


class ESCM(PointerGeneratorSeq2Seq):
    def __init__(self, cfg: ESCMConfig, vocab_size: int, emotion_word_ids: list[int]):
        ids = [int(i) for i in emotion_word_ids]
        if len(ids) != cfg.num_emotions:
            raise ValueError(f"emotion_word_ids has {len(ids)} ids, expected num_emotions={cfg.num_emotions}")
        if not all(0 <= i < vocab_size for i in ids):
            raise ValueError(f"emotion_word_ids must lie in [0, vocab_size={vocab_size}), got {ids}")
        d, d_des = cfg.d_model, cfg.d_s + cfg.num_emotions
        d_cor = d if cfg.no_desv else d_des
        super().__init__(cfg, vocab_size, d_mem=d + d_cor)  # H = H_ctx ++ H_cor, eq. 18
        self.register_buffer("emotion_word_ids", torch.tensor(ids, dtype=torch.long))
        self.enc_ctx = Encoder(cfg.emb_dim, d, cfg)  # eq. 1
        if not cfg.no_desv:
            self.w_s = nn.Linear(d, cfg.d_s)  # eq. 2
            self.w_c = nn.Linear(cfg.emb_dim, cfg.emb_dim)  # eq. 3
            self.w_e = nn.Linear(cfg.emb_dim, cfg.emb_dim)
            self.w_ce = nn.Linear(cfg.num_emotions, cfg.num_emotions)  # eq. 4
            self.enc_des = Encoder(d_des, d_des, cfg)  # eq. 6
        if not cfg.no_dcgcn:
            self.gcn = CorrelationGCN(d_cor, cfg)  # eqs. 7-9
        self.head_ctx = EmotionHead(d, cfg.num_emotions)  # eqs. 10-14
        self.head_cor = EmotionHead(d_cor, cfg.num_emotions)

    def dynamic_vectors(self, E_c, E_e, H_ctx, mask):
        """V_des = E_de ++ E_ds and H_des = Enc_des(V_des), eqs. 2-6; E_c (B, L, emb), E_e (E, emb)."""
        E_dot = self.w_c(E_c) @ self.w_e(E_e).T  # (B, L, E), eq. 3
        V_des = torch.cat([self.w_ce(E_dot), self.w_s(H_ctx)], dim=-1)  # (B, L, E + d_s), eqs. 4, 2, 5
        return self.enc_des(V_des, mask)

    def encode(self, batch: Batch) -> Encoding:
        require(batch, *CONTEXT_KEYS, "context_pos", "context_dep")
        mask = batch.context_mask
        E_c, E_e, E_r = self.embed_many(batch.context_ids, self.emotion_word_ids,
                                        states=(batch.context_state,))  # (B, L, emb), (E, emb), (B, L, emb)
        E_c = self.with_unseen(E_c, batch.context_unseen, batch.unseen_vectors)  # eqs. 1 and 3 both see them
        H_ctx = self.enc_ctx(E_c + E_r, mask)  # (B, L, d), eq. 1
        H_des = H_ctx if self.cfg.no_desv else self.dynamic_vectors(E_c, E_e, H_ctx, mask)
        extras = {}
        if self.cfg.no_dcgcn:
            H_cor = H_des
        else:
            H_cor, extras["gcn_p"] = self.gcn(H_des, batch.context_pos, batch.context_dep, mask)
        heads = {"ctx": self.head_ctx(H_ctx, mask), "cor": self.head_cor(H_cor, mask)}  # eqs. 14-17
        return Encoding(
            memory=torch.cat([H_ctx, H_cor], dim=-1),  # (B, L, d + d_cor), eq. 18
            mask=mask, ext_ids=batch.context_ext_ids, max_oov=int(batch.max_oov),
            emotion_logits=(heads["ctx"] + heads["cor"]).log_softmax(-1),  # eq. 15 as the authors' code
            head_logits=heads, extras=extras)

    @torch.no_grad()
    def evidence(self, batch: Batch, k: int = 5, encoding: Encoding | None = None) -> dict:
        """Top-k correlated word pairs per example from the GCN attention p_ij (eq. 8).

        `encoding`, the batch's `encode(batch)` when the caller has it, saves an encoder pass. Self loops and
        [CLS] pairs are left out, and a pair linked both ways (the symmetric graph) counts once, in its stronger
        direction. Returns {"pairs": (B, k, 2) long positions (i, j) into the context, -1 where
        an example has fewer than k edges; "scores": (B, k) p_ij (0 there)}."""
        if self.cfg.no_dcgcn:
            raise ValueError("evidence needs the GCN, which no_dcgcn removes")
        p = (self.encode(batch) if encoding is None else encoding).extras["gcn_p"]  # (B, L, L)
        B, L, _ = p.shape
        idx = torch.arange(L, device=p.device)
        keep = (idx[:, None] != idx[None, :]) & (idx[:, None] > 0) & (idx[None, :] > 0)
        keep = keep & (self.gcn.relations(batch.context_dep, batch.context_mask) > 0)
        edges = p.masked_fill(~keep, -1.0)
        mirror = edges.transpose(1, 2)  # a pair counts once: in its stronger direction (ties: i < j)
        first = (edges > mirror) | ((edges == mirror) & (idx[:, None] < idx[None, :]))
        flat = edges.masked_fill(~first, -1.0).flatten(1)  # (B, L*L)
        scores, top = flat.topk(min(k, L * L), dim=-1)
        pairs = torch.stack([top // L, top % L], dim=-1)
        valid = scores >= 0
        pairs = pairs.masked_fill(~valid[..., None], -1)
        scores = scores.clamp_min(0.0)
        if scores.size(1) < k:
            pad = k - scores.size(1)
            pairs = F.pad(pairs, (0, 0, 0, pad), value=-1)
            scores = F.pad(scores, (0, pad))
        return {"pairs": pairs, "scores": scores}
