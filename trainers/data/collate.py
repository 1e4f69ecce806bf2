"""Collation: prepared examples -> padded tensors with masks, per model family.

Each example is first encoded once from its features (`encode_example`, shared by all three models:
numpy arrays, pointer-generator OOV lists) and then padded into a batch per model family (`pad_escm`
for the Transformer and ESCM, `pad_iamm`). The trainer encodes a split once and re-uses the arrays,
so no per-example Python work is left inside a training step. Serving has one entry, `encode_requests`:
requests -> annotation, features (vocabulary, knowledge), encoding and padding, as training data.

Both build a `Batch` (trainers.models.batch); a field a model does not read is None.

ESCM / Transformer batch (B = batch, L = context length, T = target length, V = vocab size):
    context_ids      (B, L)    word ids; position 0 is [CLS]; turns concatenated; PAD = 0
    context_ext_ids  (B, L)    as context_ids, but OOV words get V + k (k = index in the example's OOV list)
    context_state    (B, L)    0 pad, 1 [CLS], 2 speaker turn, 3 listener turn
    context_pos      (B, L)    0 pad, 1 [CLS], 2 + index in annotate.POS_TAGS
    context_dep      (B, L, L) the dependency parse, directed: [h, a] = 2 + index in annotate.DEP_LABELS of
                               the arc head h -> dependent a, [r, r] = the ROOT label at each sentence root,
                               0 elsewhere ([CLS] has no arcs); the ESCM model builds its graph from it
    context_mask     (B, L)    True at real tokens
    target_ids       (B, T)    response ids + EOS, PAD after
    target_ext_ids   (B, T)    as target_ids, OOV words copied from the context get V + k
    emotion          (B,)      gold emotion id (None in a batch of requests, which have none)
    max_oov          int       extended-vocabulary slots this batch needs

IAMM batch adds (M = turns, Lu = longest turn, Ls = situation length, R = 5 relations, K = phrases):
    utt_ids          (B, M, Lu)       each turn's word ids (no [CLS]); utt_mask (B, M, Lu) bool
    utt_state        (B, M)           2 speaker / 3 listener, 0 for padded turns; turn_mask (B, M) bool
    situation_ids    (B, Ls)          situation word ids; situation_mask (B, Ls) bool
    knowledge_ids    (B, M + 1, R, K, Lk)  relation phrases per turn and (last) the situation; 0 = none
    knowledge_mask   (B, M + 1, R, K, Lk)  bool (all False with the `none` knowledge backend)

With an `unseen` lookup (evaluation and serving under `unseen_vectors`, trainers/data/unseen.py; never in training)
a batch adds, for the [UNK] context words that have a pretrained vector (N = most such words in one example):
    unseen_vectors   (B, N, emb) float  each example's such words' scaled vectors, zeros after
    context_unseen   (B, L)      1 + the word's row in unseen_vectors at such a position, 0 elsewhere
    utt_unseen       (B, M, Lu)  the same per turn (IAMM); situation_unseen (B, Ls) the situation's (IAMM)
Without one these fields are None and the batch is what it always was.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainers.data import annotate as ann
from trainers.data.features import ExampleFeatures, TextFeatures, example_texts, featurize, featurize_texts
from trainers.data.knowledge import RELATIONS
from trainers.models.batch import Batch
from trainers.tokens import CLS, EOS, STATE_CLS, STATE_LISTENER, STATE_SPEAKER, UNK

if TYPE_CHECKING:
    from trainers.data.unseen import UnseenVectors

POS_CLS = 1


@dataclass
class EncodedExample:
    """One example as flat arrays (see module docstring); `edges` rows are (head, dependent, relation id)."""

    context_ids: np.ndarray
    context_ext_ids: np.ndarray
    context_state: np.ndarray
    context_pos: np.ndarray
    edges: np.ndarray
    target_ids: np.ndarray
    target_ext_ids: np.ndarray
    emotion: int | None
    oov: list[str]
    turns: list[np.ndarray]          # IAMM: token ids per turn (truncated like the context)
    turn_states: list[int]           # IAMM: STATE_SPEAKER / STATE_LISTENER per kept turn
    situation_ids: np.ndarray
    knowledge: list[dict[str, list[list[int]]]]  # per turn, then the situation
    unseen_vectors: np.ndarray | None = None      # (N, emb) the scaled vectors of its unseen words (module docstring)
    context_unseen: np.ndarray | None = None      # (L,) 1 + row in unseen_vectors at such a word, else 0
    turn_unseen: list[np.ndarray] | None = None   # IAMM: the same per turn
    situation_unseen: np.ndarray | None = None    # IAMM: the same for the situation


def encode_example(texts: TextFeatures, example: ExampleFeatures, vocab_size: int, max_context: int = 400,
                   max_target: int = 60, unseen: UnseenVectors | None = None) -> EncodedExample:
    """Encode one example for any of the three models: its context [CLS] ++ U_1 ++ ... ++ U_M (ESCM eq. 1
    input) with speaker states, POS and dependency edges, IAMM's turns, situation and knowledge, its target.

    `texts` holds the featurised texts `example` refers to. Contexts longer than `max_context` keep their
    most recent turns (whole turns are dropped from the start; a single over-long last turn is cut at its
    end). Targets are cut to `max_target` words + EOS; an example without a target (a request) gets EOS only.
    With `unseen`, its [UNK] context and situation words that have a vector get it (`unseen_fields`).
    """
    turns = example.context
    lengths = [len(texts.ids[t]) for t in turns]
    first, budget = len(turns) - 1, max_context - 1 - lengths[-1]
    while first > 0 and budget - lengths[first - 1] >= 0:
        budget -= lengths[first - 1]
        first -= 1
    ids, state, pos, toks, edges = [CLS], [STATE_CLS], [POS_CLS], ["[CLS]"], []
    turn_ids, turn_states = [], []
    for k in range(first, len(turns)):
        t = turns[k]
        n = min(len(texts.ids[t]), max_context - len(ids))
        offset = len(ids)
        ids += texts.ids[t][:n]
        toks += texts.tokens[t][:n]
        pos += texts.pos[t][:n]
        turn_states.append(STATE_SPEAKER if k % 2 == 0 else STATE_LISTENER)
        state += [turn_states[-1]] * n
        turn_ids.append(np.asarray(texts.ids[t][:n], dtype=np.int64))
        for a in range(n):
            h = texts.heads[t][a]
            if h < n:  # a root points to itself; a head cut off by truncation leaves no arc
                edges.append((offset + h, offset + a, texts.deps[t][a]))
    oov: list[str] = []
    ext = []
    for w, tok in zip(ids, toks):
        if w == UNK:
            if tok not in oov:
                oov.append(tok)
            ext.append(vocab_size + oov.index(tok))
        else:
            ext.append(w)
    tgt_words = [] if example.target is None else texts.ids[example.target][:max_target]
    tgt_tokens = [] if example.target is None else texts.tokens[example.target][:max_target]
    tgt_ids = tgt_words + [EOS]
    tgt_ext = [vocab_size + oov.index(tok) if w == UNK and tok in oov else w
               for w, tok in zip(tgt_words, tgt_tokens)] + [EOS]
    sit = example.situation
    know = [texts.knowledge[t] for t in turns[first:]] + [texts.knowledge[sit]]
    extra = {} if unseen is None else unseen_fields(
        unseen, ids, toks, [len(t) for t in turn_ids], texts.ids[sit][:max_context], texts.tokens[sit][:max_context])
    return EncodedExample(
        context_ids=np.asarray(ids, dtype=np.int64),
        context_ext_ids=np.asarray(ext, dtype=np.int64),
        context_state=np.asarray(state, dtype=np.int64),
        context_pos=np.asarray(pos, dtype=np.int64),
        edges=np.asarray(edges, dtype=np.int64).reshape(-1, 3),
        target_ids=np.asarray(tgt_ids, dtype=np.int64),
        target_ext_ids=np.asarray(tgt_ext, dtype=np.int64),
        emotion=example.emotion,
        oov=oov,
        turns=turn_ids,
        turn_states=turn_states,
        situation_ids=np.asarray(texts.ids[sit][:max_context], dtype=np.int64),
        knowledge=know,
        **extra,
    )


def unseen_fields(unseen: UnseenVectors, ids: list[int], tokens: list[str], turn_lengths: list[int],
                  sit_ids: list[int], sit_tokens: list[str]) -> dict:
    """The `EncodedExample` fields of the unseen words of one example: its [UNK] context (`ids`/`tokens`, [CLS]
    first, then the turns of `turn_lengths`) and situation words, looked up in `unseen`; those with a vector get a
    row of `unseen_vectors`, in order of first appearance, and their positions 1 + that row."""
    words = list(dict.fromkeys([t for w, t in zip(ids, tokens) if w == UNK]
                               + [t for w, t in zip(sit_ids, sit_tokens) if w == UNK]))
    found = {w: v for w, v in zip(words, unseen.lookup(words)) if v is not None}
    row = {w: k + 1 for k, w in enumerate(found)}

    def index(word_ids, word_tokens):
        return np.asarray([row.get(t, 0) if w == UNK else 0 for w, t in zip(word_ids, word_tokens)], dtype=np.int64)

    context = index(ids, tokens)
    bounds = np.cumsum([1] + turn_lengths)
    table = np.stack(list(found.values())) if found else np.zeros((0, unseen.dim), dtype=np.float32)
    return {"unseen_vectors": table.astype(np.float32), "context_unseen": context,
            "turn_unseen": [context[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
            "situation_unseen": index(sit_ids, sit_tokens)}


def _pad(arrays: list[np.ndarray], length: int | None = None) -> torch.Tensor:
    length = length or max(1, max(len(a) for a in arrays))
    out = np.zeros((len(arrays), length), dtype=np.int64)
    for r, a in enumerate(arrays):
        out[r, : len(a)] = a[:length]
    return torch.from_numpy(out)


def pad_escm(batch: list[EncodedExample], context_len: int | None = None,
             target_len: int | None = None) -> Batch:
    """Pad encoded examples into the ESCM/Transformer batch (module docstring).

    Fixed `context_len` / `target_len` give static shapes (length buckets for compiled steps).
    """
    ctx = _pad([e.context_ids for e in batch], context_len)
    B, L = ctx.shape
    dep = torch.zeros(B, L, L, dtype=torch.long)
    edges = [torch.from_numpy(e.edges) for e in batch]
    rows = torch.cat([torch.full((len(x),), b, dtype=torch.long) for b, x in enumerate(edges)])
    flat = torch.cat(edges)
    dep[rows, flat[:, 0], flat[:, 1]] = flat[:, 2]
    if any((e.unseen_vectors is None) != (batch[0].unseen_vectors is None) for e in batch):
        raise ValueError("some examples carry unseen-word vectors and some do not: encode them alike")
    unseen = {} if batch[0].unseen_vectors is None else {
        "unseen_vectors": _pad_vectors([e.unseen_vectors for e in batch]),
        "context_unseen": _pad([e.context_unseen for e in batch], L)}
    return Batch(
        context_ids=ctx,
        context_ext_ids=_pad([e.context_ext_ids for e in batch], L),
        context_state=_pad([e.context_state for e in batch], L),
        context_mask=ctx != 0,
        max_oov=max(len(e.oov) for e in batch),
        context_pos=_pad([e.context_pos for e in batch], L),
        context_dep=dep,
        target_ids=_pad([e.target_ids for e in batch], target_len),
        target_ext_ids=_pad([e.target_ext_ids for e in batch], target_len),
        emotion=(None if any(e.emotion is None for e in batch)
                 else torch.tensor([e.emotion for e in batch], dtype=torch.long)),
        **unseen,
    )


def _pad_vectors(tables: list[np.ndarray]) -> torch.Tensor:
    """Per-example (N_b, emb) tables -> (B, max(1, max N_b), emb), zeros after each example's rows."""
    out = np.zeros((len(tables), max(1, max(len(t) for t in tables)), tables[0].shape[1]), dtype=np.float32)
    for r, t in enumerate(tables):
        out[r, : len(t)] = t
    return torch.from_numpy(out)


def pad_iamm(batch: list[EncodedExample], max_phrases: int = 5, max_phrase_len: int = 12) -> Batch:
    """The ESCM batch plus IAMM's per-turn, situation and knowledge tensors (module docstring)."""
    out = pad_escm(batch)
    B, M = len(batch), max(len(e.turns) for e in batch)
    Lu = max(1, max(len(t) for e in batch for t in e.turns))
    utt = torch.zeros(B, M, Lu, dtype=torch.long)
    state = torch.zeros(B, M, dtype=torch.long)
    know = torch.zeros(B, M + 1, len(RELATIONS), max_phrases, max_phrase_len, dtype=torch.long)
    n_turns = torch.tensor([len(e.turns) for e in batch])
    for b, e in enumerate(batch):
        state[b, : len(e.turns)] = torch.tensor(e.turn_states)
        for m, t in enumerate(e.turns):
            utt[b, m, : len(t)] = torch.from_numpy(t)
        for m, rels in enumerate(e.knowledge):
            slot = M if m == len(e.knowledge) - 1 else m   # the situation always sits in the last slot
            for r, rel in enumerate(RELATIONS):
                for k, phrase in enumerate(rels.get(rel, [])[:max_phrases]):
                    know[b, slot, r, k, : len(phrase[:max_phrase_len])] = torch.tensor(phrase[:max_phrase_len])
    sit = _pad([e.situation_ids for e in batch])
    if out.unseen_vectors is not None:
        utt_unseen = torch.zeros_like(utt)
        for b, e in enumerate(batch):
            for m, t in enumerate(e.turn_unseen):
                utt_unseen[b, m, : len(t)] = torch.from_numpy(t)
        out = replace(out, utt_unseen=utt_unseen,
                      situation_unseen=_pad([e.situation_unseen for e in batch], sit.size(1)))
    return replace(
        out, utt_ids=utt, utt_mask=utt != 0, utt_state=state,
        turn_mask=torch.arange(M)[None, :] < n_turns[:, None],
        situation_ids=sit, situation_mask=sit != 0,
        knowledge_ids=know, knowledge_mask=know != 0,
    )


def encode_requests(requests: Sequence[tuple[Sequence[str], str | None]], vocab, knowledge, nlp, *,
                    iamm: bool, max_context: int, max_target: int,
                    unseen: UnseenVectors | None = None) -> tuple[list[EncodedExample], Batch]:
    """Serving's one preprocessing entry: (context turns, situation or None) pairs -> their encoded examples
    and one padded batch (`pad_iamm` when `iamm`, else `pad_escm`), on the CPU.

    The requests' distinct texts are annotated (`nlp`, the run's spaCy pipeline) and featurised (`vocab`,
    `knowledge`) once, then each request is encoded as a training example with the same texts would be: no
    target, no gold emotion; without a situation the first turn stands in (IAMM's eq. 3 input). `unseen`: the
    run's lookup for unseen context words (`unseen_vectors`), as `edp evaluate` encodes them.
    """
    texts = list(dict.fromkeys(t for context, situation in requests
                               for t in example_texts(context, situation or None)))
    table = dict(zip(texts, ann.annotate(texts, nlp)))
    features = featurize_texts(texts, table, vocab, knowledge, nlp)
    index = {t: i for i, t in enumerate(texts)}
    encoded = [encode_example(features, featurize(context, situation or None, None, index), len(vocab),
                              max_context, max_target, unseen) for context, situation in requests]
    return encoded, (pad_iamm(encoded) if iamm else pad_escm(encoded))
