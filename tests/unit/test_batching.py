"""Bucketed device tensors (trainers.batching): the epoch plan and gathered batches follow the collate contract."""

from __future__ import annotations

import numpy as np
import torch

from trainers.batching import TensorSplit
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
    L = ref["context_ids"].shape[1]
    assert batch["max_oov"] == ref["max_oov"]
    for name in ("context_ids", "context_ext_ids", "context_state", "context_pos", "context_mask"):
        assert torch.equal(batch[name][:, :L], ref[name]) and not batch[name][:, L:].any()
    assert torch.equal(batch["context_dep"][:, :L, :L], ref["context_dep"])
    T = ref["target_ids"].shape[1]
    assert T <= batch["target_ids"].shape[1] <= -(-T // 8) * 8  # cut to the batch's longest, rounded up to 8
    assert torch.equal(batch["target_ids"][:, :T], ref["target_ids"]) and not batch["target_ids"][:, T:].any()
    assert np.array_equal(batch["emotion"].numpy(), ref["emotion"].numpy())
