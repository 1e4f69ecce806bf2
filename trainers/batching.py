"""A prepared split as device tensors grouped by length bucket (the trainer's and evaluator's data path).

Every split is encoded and padded ONCE into per-length-bucket tensors on the device (`TensorSplit`);
a step only gathers rows, so there is no per-example Python work in the step. Buckets give few,
static shapes (bucket width `bucket_width`), good for torch.compile. The epoch plan (which rows form
each batch, their extended-vocabulary size) is built on the host, so a step does no host syncs.

IAMM buckets by turn count as well as length: its association memory iterates over the batch's most
turns and grows with them (eqs. 16-18), so one 7-turn dialogue among 3-turn ones made the whole batch
pay for 7 turns, and the chance of such a straggler, hence the cost per example, grew with the batch size.

Two epoch plans (TrainConfig.batching): "bucketed" (`plan`: batches within one bucket, target lengths sorted in
pools) and "random" (`random_plan`: the reference's DataLoader(shuffle=True), one permutation of the whole split
cut into consecutive batches). A random batch's examples come from several buckets; `examples_batch` gathers
each bucket's share from the same device tensors and pads the shares to the batch's own longest context (a
multiple of `bucket_width`), target (a multiple of 8) and, for IAMM, turns: the same shapes a bucketed batch of
those lengths gets, at one gather per bucket touched instead of one per batch.

An evaluation under `unseen_vectors` encodes its split with the run's lookup (`unseen`, trainers/data/unseen.py):
each bucket then carries its examples' unseen-word vectors (the collate contract's optional fields); a training
split never does.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainers.config import TrainConfig
from trainers.data.collate import EncodedExample, encode_example, pad_escm, pad_iamm
from trainers.data.prepare import PreparedSplit
from trainers.models.batch import Batch


@dataclass
class Bucket:
    rows: np.ndarray                       # example indices in this bucket
    padded: Batch                          # all rows, padded to the bucket's lengths, on device
    n_oov: np.ndarray                      # OOV-list length per row (host), for max_oov
    tgt_len: np.ndarray                    # target length (EOS included) per row (host)
    turns: np.ndarray                      # IAMM: (rows, 3) turns, longest turn, situation length (host)


SORT_POOL = 8  # batches per pool sorted by target length in a shuffled epoch plan (`TensorSplit.plan`)
MIXED = -1  # the bucket of a `random_plan` entry: its rows are example indices of the split, from any bucket


def sorted_in_pools(order: np.ndarray, key: np.ndarray, pool: int) -> np.ndarray:
    """`order` cut into consecutive pools of `pool` entries, each pool sorted by `key` (stable)."""
    pools = [order[s:s + pool] for s in range(0, len(order), pool)]
    return np.concatenate([p[np.argsort(key[p], kind="stable")] for p in pools]) if pools else order


class TensorSplit:
    """A prepared split encoded once and padded per length bucket (static shapes, no per-step collation)."""

    def __init__(self, split: PreparedSplit, vocab_size: int, device: torch.device, *, max_context: int,
                 max_target: int, bucket_width: int, iamm: bool = False, unseen=None):
        self.split = split
        self.encoded: list[EncodedExample] = [
            encode_example(split, ex, vocab_size, max_context, max_target, unseen) for ex in split.features
        ]
        lengths = np.array([len(e.context_ids) for e in self.encoded])
        width_units = np.ceil(lengths / bucket_width).astype(int)
        turns = np.array([len(e.turns) for e in self.encoded]) if iamm else np.zeros_like(width_units)
        key = width_units * (turns.max(initial=0) + 1) + turns  # (length bucket, turns), in that order
        self.buckets: list[Bucket] = []
        self.where = np.zeros((len(self.encoded), 2), dtype=np.int64)  # example -> (bucket, row in bucket)
        pad = pad_iamm if iamm else pad_escm
        for k in np.unique(key):
            rows = np.flatnonzero(key == k)
            members = [self.encoded[i] for i in rows]
            batch = pad(members) if iamm else pad(members, context_len=int(width_units[rows[0]]) * bucket_width)
            batch = batch.to(device)
            batch.context_dep = batch.context_dep.to(torch.uint8)  # labels < 256: 8x less memory
            self.where[rows] = np.stack([np.full(len(rows), len(self.buckets)), np.arange(len(rows))], 1)
            self.buckets.append(Bucket(
                rows, batch, np.array([len(e.oov) for e in members]), np.array([len(e.target_ids) for e in members]),
                np.array([(len(e.turns), max(len(t) for t in e.turns), len(e.situation_ids)) for e in members])))

    def __len__(self) -> int:
        return len(self.encoded)

    def batch(self, bucket: int, rows: torch.Tensor | np.ndarray, max_oov: int, target_len: int | None = None) -> Batch:
        """Gather `rows` of one bucket: a batch following the collate contract, targets cut to `target_len`."""
        b = self.buckets[bucket]
        out = b.padded.select_rows(torch.as_tensor(rows, device=b.padded.context_ids.device))
        out.context_dep = out.context_dep.long()
        if target_len is not None:
            out.target_ids, out.target_ext_ids = out.target_ids[:, :target_len], out.target_ext_ids[:, :target_len]
        out.max_oov = max_oov
        return out

    def rows_batch(self, bucket: int, rows: np.ndarray) -> Batch:
        """`batch` with max_oov and the target length (rounded up to 8: few shapes) read from host arrays;
        `bucket` MIXED: `examples_batch(rows)`, so every plan entry is `rows_batch(*entry)`."""
        if bucket == MIXED:
            return self.examples_batch(rows)
        b = self.buckets[bucket]
        t_len = int(-(-b.tgt_len[rows].max() // 8) * 8)
        out = self.batch(bucket, rows, int(b.n_oov[rows].max()), t_len)
        if out.utt_ids is not None:  # IAMM: cut turns, turn length and situation to this batch's longest
            M, Lu, Ls = (int(v) for v in b.turns[rows].max(0))
            out.utt_ids, out.utt_mask = out.utt_ids[:, :M, :Lu], out.utt_mask[:, :M, :Lu]
            out.utt_state, out.turn_mask = out.utt_state[:, :M], out.turn_mask[:, :M]
            out.situation_ids, out.situation_mask = out.situation_ids[:, :Ls], out.situation_mask[:, :Ls]
            if out.utt_unseen is not None:
                out.utt_unseen, out.situation_unseen = out.utt_unseen[:, :M, :Lu], out.situation_unseen[:, :Ls]
            # the situation's knowledge stays in the last slot
            out.knowledge_ids = torch.cat([out.knowledge_ids[:, :M], out.knowledge_ids[:, -1:]], dim=1)
            out.knowledge_mask = torch.cat([out.knowledge_mask[:, :M], out.knowledge_mask[:, -1:]], dim=1)
        return out

    def plan(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True,
             sort_pool: int = SORT_POOL) -> list[tuple[int, np.ndarray]]:
        """The epoch's batches as (bucket, rows); deterministic in (seed, epoch). Shuffled, each bucket's rows are
        drawn at random in pools of `sort_pool` batches, each pool sorted by target length before it is cut into
        batches: a batch's targets are trimmed to its longest, and in a random batch the longest target grows with
        the batch size (3.9 decoder positions per real target token at batch 256 on ED, 2.4 at batch 16)."""
        rng = np.random.default_rng([seed, epoch])
        batches = []
        for k, b in enumerate(self.buckets):
            order = rng.permutation(len(b.rows)) if shuffle else np.arange(len(b.rows))
            if shuffle:
                order = sorted_in_pools(order, b.tgt_len, sort_pool * batch_size)
            for s in range(0, len(order), batch_size):
                batches.append((k, order[s:s + batch_size]))
        if shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


    def examples_batch(self, examples: np.ndarray) -> Batch:
        """The split's `examples` (indices, from any buckets) as one batch in that order: each bucket's share
        gathered and cut as `rows_batch` does, zero-padded to the longest share and concatenated."""
        where = self.where[np.asarray(examples)]
        parts, placed = [], []
        for k in np.unique(where[:, 0]):
            sel = np.flatnonzero(where[:, 0] == k)
            parts.append(self.rows_batch(int(k), where[sel, 1]))
            placed.append(sel)
        if len(parts) == 1:
            return parts[0]
        out = concat_padded(parts)
        back = np.argsort(np.concatenate(placed))  # concatenation order -> the order of `examples`
        return out.select_rows(torch.as_tensor(back, device=out.context_ids.device))

    def random_plan(self, batch_size: int, seed: int, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The reference's epoch: a permutation of the whole split, deterministic in (seed, epoch), cut into
        consecutive batches of `batch_size` (the last one shorter); entries (MIXED, example indices)."""
        order = np.random.default_rng([seed, epoch]).permutation(len(self))
        return [(MIXED, order[s:s + batch_size]) for s in range(0, len(order), batch_size)]


def _pad_to(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` zero-padded at the end of each dimension to `shape`."""
    if tuple(t.shape) == shape:
        return t
    out = t.new_zeros(shape)
    out[tuple(slice(0, n) for n in t.shape)] = t
    return out


def _cat_padded(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Tensors alike but for their lengths, padded to the longest in every dimension after the first, and
    concatenated along the first."""
    shape = tuple(max(t.shape[d] for t in tensors) for d in range(1, tensors[0].dim()))
    return torch.cat([_pad_to(t, (t.shape[0], *shape)) for t in tensors])


def concat_padded(parts: list[Batch]) -> Batch:
    """Batches of different lengths as one (fields zero-padded, masks False there). IAMM's knowledge keeps the
    situation in its last turn slot: the turn slots are padded before it."""
    fields = {}
    for name, first in vars(parts[0]).items():
        values = [getattr(p, name) for p in parts]
        if len({v is None for v in values}) > 1:
            raise ValueError(f"concat_padded: field {name} is None in some batches only")
        if not isinstance(first, torch.Tensor):
            fields[name] = max(values) if name == "max_oov" else first
        elif name in ("knowledge_ids", "knowledge_mask"):
            turns, situation = _cat_padded([v[:, :-1] for v in values]), _cat_padded([v[:, -1:] for v in values])
            fields[name] = torch.cat([turns, situation], dim=1)
        else:
            fields[name] = _cat_padded(values)
    return Batch(**fields)


def tensor_split(cfg: TrainConfig, split, vocab_size: int, device: torch.device, unseen=None) -> TensorSplit:
    """`split` as bucketed device tensors with the run's lengths and bucket width; `unseen`: the lookup of an
    evaluation under `unseen_vectors` (trainers/data/unseen.py)."""
    return TensorSplit(split, vocab_size, device, max_context=cfg.max_context, max_target=cfg.max_target,
                       bucket_width=cfg.bucket_width, iamm=cfg.model == "iamm", unseen=unseen)
