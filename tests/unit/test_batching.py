"""Bucketed device tensors (trainers.batching): the epoch plan and gathered batches follow the collate contract."""

from __future__ import annotations

import numpy as np
import torch

from trainers.batching import TensorSplit, sorted_in_pools
from trainers.data.collate import pad_escm


def make_split(prepared_sample, **kw):
    split = prepared_sample.split("valid")
    args = {"max_context": 400, "max_target": 60, "bucket_width": 8, **kw}
    return TensorSplit(split, len(prepared_sample.vocab), torch.device("cpu"), **args)


def test_plan_covers_every_example_once_and_is_deterministic(prepared_sample):
    data = make_split(prepared_sample)
    plan = data.plan(5, seed=1, epoch=2)
    seen = sorted(int(data.buckets[k].rows[r]) for k, rows in plan for r in rows)
    assert seen == list(range(len(data))) and len(data.buckets) > 1
    assert all(len(rows) <= 5 for _, rows in plan)
    again = data.plan(5, seed=1, epoch=2)
    assert [(k, r.tolist()) for k, r in plan] == [(k, r.tolist()) for k, r in again]
    assert [(k, r.tolist()) for k, r in data.plan(5, seed=1, epoch=3)] != [(k, r.tolist()) for k, r in plan]


def test_rows_batch_equals_padding_the_same_examples(prepared_sample):
    data = make_split(prepared_sample)
    k, rows = data.plan(4, seed=0, epoch=0, shuffle=False)[0]
    batch = data.rows_batch(k, rows)
    members = [data.encoded[int(data.buckets[k].rows[r])] for r in rows]
    ref = pad_escm(members)
    L = ref.context_ids.shape[1]
    assert batch.max_oov == ref.max_oov
    for name in ("context_ids", "context_ext_ids", "context_state", "context_pos", "context_mask"):
        got = getattr(batch, name)
        assert torch.equal(got[:, :L], getattr(ref, name)) and not got[:, L:].any()
    assert torch.equal(batch.context_dep[:, :L, :L], ref.context_dep)
    T = ref.target_ids.shape[1]
    assert T <= batch.target_ids.shape[1] <= -(-T // 8) * 8  # cut to the batch's longest, rounded up to 8
    assert torch.equal(batch.target_ids[:, :T], ref.target_ids) and not batch.target_ids[:, T:].any()
    assert np.array_equal(batch.emotion.numpy(), ref.emotion.numpy())


def test_iamm_buckets_hold_one_turn_count(prepared_sample):
    """IAMM's memory iterates over a batch's most turns: a bucket never mixes dialogues of different lengths."""
    data = make_split(prepared_sample, iamm=True)
    turns = [np.unique([len(data.encoded[i].turns) for i in b.rows]) for b in data.buckets]
    assert all(len(t) == 1 for t in turns) and len({int(t[0]) for t in turns}) > 1
    k, rows = data.plan(4, seed=0, epoch=0)[0]
    batch = data.rows_batch(k, rows)
    assert batch.turn_mask.all() and batch.utt_ids.shape[1] == turns[k][0]


def test_sorted_in_pools_sorts_each_pool_and_keeps_the_rest():
    order = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    key = np.array([9, 1, 8, 2, 7, 3, 6, 4])  # key of each row index
    out = sorted_in_pools(order, key, 3)
    assert out.tolist() == [5, 7, 2, 3, 6, 0, 1, 4]  # pools [5 2 7] [0 3 6] [1 4], each by key


def test_shuffled_plan_pads_fewer_target_positions(prepared_sample):
    """Sorting pools of batches by target length trims the decoder's padding; every example is still planned once."""
    data = make_split(prepared_sample)

    def positions(plan):
        return sum(len(rows) * data.buckets[k].tgt_len[rows].max() for k, rows in plan)

    pooled, random = data.plan(4, seed=3, epoch=0), data.plan(4, seed=3, epoch=0, sort_pool=1)
    assert sorted(int(data.buckets[k].rows[r]) for k, rows in pooled for r in rows) == list(range(len(data)))
    assert positions(pooled) < positions(random)
