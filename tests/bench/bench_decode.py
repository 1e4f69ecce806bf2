"""Decoding speed: incremental decoding (the decoder's key/value cache) versus recomputing the prefix.

Paper-sized models (d=300) with seeded random weights on the prepared vocabulary decode valid examples in
batches of 1 and 32 with greedy search and beam search (5 beams), replies capped at 30 tokens (an untrained
model seldom emits EOS, so most replies use them all: the worst case), 1 torch thread as in a Serve replica.
`DecodeConfig.kv_cache` on versus off, the two alternating batch by batch in one process; off runs the
decoder as it ran before the cache (the whole prefix at every step, the same code path and numbers).
Per-token latency: the decoding time of a batch, encoder excluded, divided by the steps it took (the
longest reply); median over the batches. "Same tokens" checks that both settings returned identical ids.
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch

from trainers.batching import tensor_split
from trainers.config import DecodeConfig, TrainConfig, load_config
from trainers.decoding import decode
from trainers.models import build_model
from trainers.models.batch import Batch


def _timed_decode(model, batch, state, cfg: DecodeConfig) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    ids = decode(model, batch, cfg, state=state)
    return ids, time.perf_counter() - t0


def _valid_batches(prepared, name: str, batch_size: int, count: int) -> list[Batch]:
    """`count` full valid batches of `batch_size`, as the trainer's bucketed split serves them."""
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(TrainConfig, model=name, out_dir=out, device="cpu",
                          data={"source": prepared.manifest["source"]})
    split = tensor_split(cfg, prepared.split("valid"), len(prepared.vocab), torch.device("cpu"))
    plan = [p for p in split.plan(batch_size, seed=0, epoch=0) if len(p[1]) == batch_size][:count]
    return [split.rows_batch(*p) for p in plan]


def measure(model, batches: list[Batch], strategy: str, max_len: int = 30, beam_size: int = 5) -> dict:
    """ms per token with the cache off and on (interleaved per batch), and whether the tokens agreed."""
    per_token = {False: [], True: []}
    same = True
    with torch.inference_mode():
        for batch in batches:
            state = model.encode(batch)
            ids = {}
            for kv_cache in (False, True):
                cfg = DecodeConfig(strategy=strategy, max_len=max_len, beam_size=beam_size, kv_cache=kv_cache)
                ids[kv_cache], seconds = _timed_decode(model, batch, state, cfg)
                per_token[kv_cache].append(seconds * 1e3 / ids[kv_cache].size(1))
            same &= torch.equal(ids[False], ids[True])
    before, after = (statistics.median(per_token[k]) for k in (False, True))
    return {"before_ms": before, "after_ms": after, "speedup": before / after, "same_tokens": same}


def run(prepared, models=("transformer", "escm", "iamm"), batch_sizes=(1, 32), strategies=("greedy", "beam"),
        repeats: int = 5) -> list[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rows = []
    try:
        for name in models:
            torch.manual_seed(0)
            model = build_model(name, len(prepared.vocab), prepared.vocab.emotion_ids()).eval()
            for batch_size in batch_sizes:
                batches = _valid_batches(prepared, name, batch_size, repeats)
                for strategy in strategies:
                    rows.append({"model": name, "batch": batch_size, "strategy": strategy,
                                 **measure(model, batches, strategy)})
    finally:
        torch.set_num_threads(threads)
    return rows


def as_markdown(rows: list[dict]) -> str:
    lines = ["| model | batch | strategy | ms/token, prefix recomputed | ms/token, kv cache | speed-up | same tokens |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['strategy']} | {r['before_ms']:.2f} | {r['after_ms']:.2f} "
                     f"| {r['speedup']:.2f}x | {'yes' if r['same_tokens'] else 'NO'} |")
    return "\n".join(lines)
