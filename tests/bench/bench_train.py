"""Training-step speed: the trainer's fast path versus a straightforward loop of the same model.

Fast path (trainers.loop): splits encoded and padded once into length buckets on the device, batches
gathered by index, targets trimmed per batch, output layer only at real target tokens (pack_targets) and,
without label smoothing, only log P(target) rather than the whole distribution, one word-embedding lookup
for the encoder, fused Adam, bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), no host syncs.
Yardstick, the straightforward implementation measured side by side: a torch DataLoader over the
encoded examples with random batches collated per step (padded to the batch maximum), the same
model in fp32 with the output layer's full distribution at every padded position (pack_targets=False),
default Adam. Both run the paper-sized model (d=300) on the prepared vocabulary.
Measured in rounds so that both loops see the same load on a shared machine: each round times the
yardstick (`steps` batches of 16) and then the fast path at each batch size (`steps` x 16 examples, at
least 2 batches), back to back, after one warm-up pass of `warmup` batches each. ms/step and examples/s are
medians over the rounds; the speedup is the median of the rounds' own ratios (fast path examples/s over the
same round's yardstick examples/s).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time

import torch

from trainers.config import TrainConfig, load_config
from trainers.data.collate import pad_escm, pad_iamm
from trainers.loop import Trainer
from trainers.models import MODELS, build_model
from trainers.models.interface import Targets


def _time_steps(step, batches) -> float:
    t0 = time.perf_counter()
    for b in batches:
        step(b)
    return (time.perf_counter() - t0) / len(batches)


def fast_path(trainer: Trainer, batch_size: int, n: int):
    """The trainer's step and `n` full batches of `batch_size` from its epoch plan."""
    plan = [p for p in trainer.train_data.plan(batch_size, seed=0, epoch=0) if len(p[1]) == batch_size][:n]

    def step(p):
        return trainer.train_step(trainer.train_data.rows_batch(*p))

    return step, plan


def yardstick(trainer: Trainer, model_name: str, batch_size: int, n: int):
    """The straightforward loop's step (fresh model, default Adam, fp32) and `n` DataLoader batches."""
    torch.manual_seed(0)
    vocab = trainer.vocab
    model = build_model(model_name, len(vocab), vocab.emotion_ids(), pack_targets=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, foreach=False)
    pad = pad_iamm if model_name == "iamm" else pad_escm
    loader = torch.utils.data.DataLoader(trainer.train_data.encoded, batch_size=batch_size, shuffle=True,
                                         collate_fn=pad, drop_last=True)
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == n:
            break

    def step(b):
        model.train()
        out = model(b, Targets.of(b))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    return step, batches


def association_share(trainer: Trainer, batch_size: int = 16, batches: int = 8) -> float:
    """IAMM: share of the forward pass spent inside the information association modules (eqs. 8-18)."""
    from trainers.models.association import InformationAssociation

    spent, starts = [0.0], {}
    modules = [m for m in trainer.raw_model.modules() if isinstance(m, InformationAssociation)]
    hooks = [h for m in modules for h in (
        m.register_forward_pre_hook(lambda mod, args: starts.__setitem__(id(mod), time.perf_counter())),
        m.register_forward_hook(lambda mod, args, out: spent.__setitem__(0, spent[0] + time.perf_counter()
                                                                         - starts[id(mod)])))]
    plan = [p for p in trainer.train_data.plan(batch_size, seed=1, epoch=0) if len(p[1]) == batch_size][:batches]
    total = 0.0
    with torch.inference_mode():
        for p in plan:
            b = trainer.train_data.rows_batch(*p)
            t0 = time.perf_counter()
            trainer.raw_model(b, Targets.of(b))
            total += time.perf_counter() - t0
    for h in hooks:
        h.remove()
    return spent[0] / total


def run(prepared, models=None, batch_sizes=(16, 64, 256), warmup: int = 2, steps: int = 12,
        rounds: int = 3) -> list[dict]:
    rows = []
    for name in models or [m for m in ("transformer", "escm", "iamm") if m in MODELS]:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(TrainConfig, model=name, out_dir=out, device="cpu",
                              data={"source": prepared.manifest["source"]})
            trainer = Trainer(cfg, prepared, log=lambda s: None)
            n = {bs: max(2, steps * 16 // bs) for bs in batch_sizes}
            loops = {0: yardstick(trainer, name, 16, warmup + rounds * steps)}
            loops.update({bs: fast_path(trainer, bs, warmup + rounds * n[bs]) for bs in batch_sizes})
            n[0] = steps
            load = [os.getloadavg()[0]]
            for step, batches in loops.values():
                _time_steps(step, batches[:warmup])
            times = {k: [] for k in loops}  # seconds per step, one entry per round
            for r in range(rounds):
                for k, (step, batches) in loops.items():
                    times[k].append(_time_steps(step, batches[warmup + r * n[k]: warmup + (r + 1) * n[k]]))
            load.append(os.getloadavg()[0])
            base = statistics.median(times[0])
            rows.append({"model": name, "variant": "yardstick (straightforward)", "batch": 16,
                         "ms_per_step": base * 1e3, "examples_per_s": 16 / base, "load": load})
            for bs in batch_sizes:
                t = statistics.median(times[bs])
                ratios = [(bs / tf) / (16 / ty) for tf, ty in zip(times[bs], times[0], strict=True)]
                rows.append({"model": name, "variant": "trainer fast path", "batch": bs, "ms_per_step": t * 1e3,
                             "examples_per_s": bs / t, "speedup_vs_yardstick": statistics.median(ratios)})
            if name == "iamm":
                rows[-1]["association_share"] = association_share(trainer)
    return rows


def as_markdown(rows: list[dict]) -> str:
    lines = ["| model | loop | batch | ms/step | examples/s | vs yardstick (b=16) |", "|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("speedup_vs_yardstick")
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['ms_per_step']:.1f} | "
                     f"{r['examples_per_s']:.1f} | {'' if sp is None else f'{sp:.2f}x'} |")
    shares = [f"{r['model']}: information association modules take {r['association_share']:.0%} of the "
              "forward pass (batch 16)" for r in rows if "association_share" in r]
    loads = "; ".join(f"{r['model']} {r['load'][0]:.1f} -> {r['load'][1]:.1f}" for r in rows if "load" in r)
    return "\n".join(lines + [""] + shares + [f"Load average (1 min) before and after each model's rounds: {loads}."])


if __name__ == "__main__":
    from trainers.config import DataConfig
    from trainers.data.prepare import prepare

    p = prepare(load_config(DataConfig))
    print(as_markdown(run(p, batch_sizes=(16,), steps=5, rounds=1)))
