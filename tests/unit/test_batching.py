"""Bucketed device tensors (trainers.batching): the epoch plan and gathered batches follow the collate contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.batching import MIXED, TensorSplit, concat_padded, sorted_in_pools
from trainers.data.collate import pad_escm, pad_iamm
from trainers.models.batch import Batch


def make_split(prepared_sample, split="valid", **kw):
    split = prepared_sample.split(split)
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


# ---- random batching (the reference's DataLoader(shuffle=True)) ----------------------------------


def test_random_plan_is_a_seeded_permutation_cut_into_batches(prepared_sample):
    data = make_split(prepared_sample)
    plan = data.random_plan(8, seed=1, epoch=2)
    assert {k for k, _ in plan} == {MIXED}
    order = np.concatenate([rows for _, rows in plan])
    assert sorted(order.tolist()) == list(range(len(data)))  # every example exactly once
    assert [len(r) for _, r in plan[:-1]] == [8] * (len(plan) - 1) and 1 <= len(plan[-1][1]) <= 8

    def flat(p):
        return np.concatenate([r for _, r in p]).tolist()

    assert flat(data.random_plan(8, seed=1, epoch=2)) == order.tolist()  # deterministic in (seed, epoch)
    assert flat(data.random_plan(8, seed=1, epoch=3)) != order.tolist()
    assert flat(data.random_plan(8, seed=2, epoch=2)) != order.tolist()
    assert order.tolist() != sorted(order.tolist())


def test_random_batches_are_not_sorted_by_length(prepared_sample):
    """Within a random batch lengths spread as in the whole split; a bucketed batch holds one length bucket
    and sorted targets."""
    data = make_split(prepared_sample, split="train")
    ctx = np.array([len(e.context_ids) for e in data.encoded])
    tgt = np.array([len(e.target_ids) for e in data.encoded])

    def spread(batches, lengths):  # mean within-batch std / the split's std
        return np.mean([lengths[r].std() for r in batches if len(r) > 1]) / lengths.std()

    random = [rows for _, rows in data.random_plan(8, seed=0, epoch=0)]
    bucketed = [data.buckets[k].rows[r] for k, r in data.plan(8, seed=0, epoch=0)]
    assert spread(random, ctx) > 0.6 and spread(bucketed, ctx) < 0.3
    assert spread(random, tgt) > 0.6 and spread(bucketed, tgt) < 0.5
    assert np.mean([len(np.unique(data.where[r, 0])) > 1 for r in random]) > 0.8  # most mix buckets


@pytest.mark.parametrize("iamm", [False, True])
def test_a_random_batch_equals_padding_the_same_examples(prepared_sample, iamm):
    """Gathered from several buckets, a batch holds what collating its examples directly gives, in plan order,
    padded only to its own longest context (a multiple of bucket_width), target (of 8) and turns."""
    data = make_split(prepared_sample, iamm=iamm)
    examples = next(r for _, r in data.random_plan(6, seed=0, epoch=0) if len(np.unique(data.where[r, 0])) > 2)
    batch = data.rows_batch(MIXED, examples)
    ref = (pad_iamm if iamm else pad_escm)([data.encoded[i] for i in examples])
    L, T = ref.context_ids.shape[1], ref.target_ids.shape[1]
    assert batch.context_ids.shape[1] == (L if iamm else -(-L // 8) * 8)  # bucket_width 8
    assert T <= batch.target_ids.shape[1] <= -(-T // 8) * 8
    assert batch.max_oov == ref.max_oov and torch.equal(batch.emotion, ref.emotion)
    for name in ("context_ids", "context_ext_ids", "context_state", "context_pos", "context_mask", "target_ids",
                 "target_ext_ids"):
        got, want = getattr(batch, name), getattr(ref, name)
        assert torch.equal(got[:, :want.shape[1]], want) and not got[:, want.shape[1]:].any(), name
    assert torch.equal(batch.context_dep[:, :L, :L], ref.context_dep) and not batch.context_dep[:, L:].any()
    if iamm:
        for name in ("utt_ids", "utt_mask", "utt_state", "turn_mask", "situation_ids", "situation_mask",
                     "knowledge_ids"):
            assert torch.equal(getattr(batch, name), getattr(ref, name)), name


def test_concat_padded_keeps_the_situation_knowledge_last():
    def part(turns, value):
        know = torch.zeros(1, turns + 1, 5, 2, 3, dtype=torch.long)
        know[0, :turns] = 1
        know[0, -1] = value  # the situation's slot
        ids = torch.ones(1, 4, dtype=torch.long)
        return Batch(context_ids=ids, context_ext_ids=ids, context_state=ids, context_mask=ids > 0, max_oov=value,
                     knowledge_ids=know, knowledge_mask=know > 0)

    out = concat_padded([part(1, 7), part(3, 9)])
    assert out.knowledge_ids.shape == (2, 4, 5, 2, 3) and out.max_oov == 9
    assert (out.knowledge_ids[0, 0] == 1).all() and not out.knowledge_ids[0, 1:3].any()  # padded turn slots
    assert (out.knowledge_ids[0, 3] == 7).all() and (out.knowledge_ids[1, 3] == 9).all()
    assert torch.equal(out.knowledge_mask, out.knowledge_ids > 0)
    with pytest.raises(ValueError, match="knowledge_ids"):
        concat_padded([part(1, 7), Batch(**{**vars(part(1, 7)), "knowledge_ids": None})])
