"""Preprocessing speed: a cold `prepare` of train+valid (load, validate, spaCy parse, vocabulary,
vectors, encode, cache write) into an empty cache, then the same call again (a cache hit)."""

from __future__ import annotations

import tempfile
import time

from trainers.config import DataConfig, load_config
from trainers.data.prepare import prepare


def run(source: str, n_process: int = 2) -> dict:
    with tempfile.TemporaryDirectory() as cache:
        cfg = load_config(DataConfig, source=source, cache_dir=cache, n_process=n_process)
        t0 = time.perf_counter()
        cold = prepare(cfg)
        cold_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        hit = prepare(cfg)
        hit_s = time.perf_counter() - t1
    assert not cold.cache_hit and hit.cache_hit
    m = cold.manifest
    return {
        "source": source, "n_process": n_process,
        "examples": {s: c["examples"] for s, c in m["counts"].items()},
        "parsed_texts": m["timings"]["parsed_texts"], "parse_s": m["timings"]["parse_s"],
        "texts_per_s": m["timings"]["parsed_texts"] / m["timings"]["parse_s"],
        "cold_s": cold_s, "cache_hit_s": hit_s, "vocab": m["vocab_size"], "oov_rate": m["vectors"]["oov_rate"],
    }


def as_markdown(r: dict) -> str:
    ex = ", ".join(f"{k} {v:,}" for k, v in r["examples"].items())
    return "\n".join([
        "| what | value | target |", "|---|---|---|",
        f"| source | `{r['source']}` ({ex} examples) | |",
        f"| cold prepare (train+valid, n_process={r['n_process']}) | {r['cold_s']:.1f} s | <= 180 s |",
        f"| of which spaCy parse | {r['parse_s']:.1f} s for {r['parsed_texts']:,} distinct utterances "
        f"({r['texts_per_s']:.0f} texts/s) | |",
        f"| cache hit | {r['cache_hit_s']:.2f} s | <= 5 s |",
        f"| vocabulary / vector OOV (word types) | {r['vocab']:,} / {r['oov_rate']:.1%} | |",
    ])
