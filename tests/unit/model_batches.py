"""Random batches obeying the ESCM/Transformer batch contract (trainers/data/collate.py), for model tests.

Each example: [CLS] + 1-3 turns of 1-2 sentences; per sentence a random dependency tree (every token but
the first attaches to an earlier token of the same sentence), stored directed as the contract says: [head,
dependent] = a random label 2.., [root, root] = ROOT_ID; speaker/listener states alternate per turn; a few context
words are OOV (UNK in context_ids, V + k in context_ext_ids) and the response may copy them.
"""

from __future__ import annotations

import torch

from trainers.models.batch import Batch
from trainers.tokens import CLS, EOS, PAD, UNK

FIRST_WORD = 8 + 32  # specials, then the 32 emotion words
ROOT_ID = 2  # relation id of ROOT (2 + its index in annotate.DEP_LABELS)
EMOTION_WORD_IDS = list(range(8, 40))


def make_example(g: torch.Generator, vocab_size: int, num_pos: int = 20, num_dep: int = 48,
                 max_ctx: int = 24, max_tgt: int = 8, oov_rate: float = 0.15):
    def rint(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    words, ext, states, pos, sent_spans = [CLS], [CLS], [1], [1], []
    oovs: list[int] = []  # "OOV words" named by an arbitrary key
    for turn in range(rint(1, 3)):
        for _ in range(rint(1, 2)):
            n = rint(2, 5)
            if len(words) + n > max_ctx:
                break
            start = len(words)
            for _ in range(n):
                if torch.rand(1, generator=g).item() < oov_rate:
                    key = rint(0, 3)
                    if key not in oovs:
                        oovs.append(key)
                    words.append(UNK)
                    ext.append(vocab_size + oovs.index(key))
                else:
                    w = rint(FIRST_WORD, vocab_size - 1)
                    words.append(w)
                    ext.append(w)
                states.append(2 + turn % 2)
                pos.append(rint(2, num_pos - 1))
            sent_spans.append((start, len(words)))
    L = len(words)
    dep = torch.zeros(L, L, dtype=torch.long)
    for s, e in sent_spans:
        dep[s, s] = ROOT_ID
        for child in range(s + 1, e):
            head = rint(s, child - 1)
            dep[head, child] = rint(2, num_dep - 1)
    n_t = rint(1, max_tgt - 1)
    tgt, tgt_ext = [], []
    copyable = [x for x in ext if x >= vocab_size]
    for _ in range(n_t):
        if copyable and torch.rand(1, generator=g).item() < 0.3:
            x = copyable[rint(0, len(copyable) - 1)]
            tgt.append(UNK)
            tgt_ext.append(x)
        else:
            w = rint(FIRST_WORD, vocab_size - 1)
            tgt.append(w)
            tgt_ext.append(w)
    return dict(words=words, ext=ext, states=states, pos=pos, dep=dep, tgt=tgt + [EOS],
                tgt_ext=tgt_ext + [EOS], oovs=len(oovs), emotion=rint(0, 31))


def collate(examples, pad_ctx: int = 0, pad_tgt: int = 0) -> Batch:
    """Pad a list of `make_example` dicts into the contract; pad_* add extra PAD columns."""
    B = len(examples)
    L = max(len(e["words"]) for e in examples) + pad_ctx
    T = max(len(e["tgt"]) for e in examples) + pad_tgt
    z = lambda *shape: torch.zeros(*shape, dtype=torch.long)  # noqa: E731
    b = Batch(context_ids=z(B, L), context_ext_ids=z(B, L), context_state=z(B, L), context_mask=z(B, L).bool(),
              max_oov=max(e["oovs"] for e in examples), context_pos=z(B, L), context_dep=z(B, L, L),
              target_ids=z(B, T), target_ext_ids=z(B, T), emotion=torch.tensor([e["emotion"] for e in examples]))
    for i, e in enumerate(examples):
        n, t = len(e["words"]), len(e["tgt"])
        b.context_ids[i, :n] = torch.tensor(e["words"])
        b.context_ext_ids[i, :n] = torch.tensor(e["ext"])
        b.context_state[i, :n] = torch.tensor(e["states"])
        b.context_pos[i, :n] = torch.tensor(e["pos"])
        b.context_dep[i, :n, :n] = e["dep"]
        b.target_ids[i, :t] = torch.tensor(e["tgt"])
        b.target_ext_ids[i, :t] = torch.tensor(e["tgt_ext"])
    b.context_mask = b.context_ids != PAD
    return b


def make_batch(batch_size: int = 4, vocab_size: int = 60, seed: int = 0, **kw) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return collate([make_example(g, vocab_size, **kw) for _ in range(batch_size)])
