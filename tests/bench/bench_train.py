"""Training-step speed: the trainer's fast path versus a straightforward loop of the same model.

Fast path (trainers.loop): splits encoded and padded once into length buckets on the device, batches
gathered by index, targets trimmed per batch, output layer only at real target tokens (pack_targets) and,
without label smoothing, only log P(target) rather than the whole distribution, one word-embedding lookup
for the encoder, fused Adam, bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), no host syncs.
Yardstick, the straightforward implementation measured side by side: a torch DataLoader over the
encoded examples with random batches collated per step (padded to the batch maximum), the same
model in fp32 with the output layer's full distribution at every padded position (pack_targets=False),
default Adam. Both run the paper-sized model (d=300) on the prepared vocabulary; ms/step is the mean over
`steps` full batches after `warmup`.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import torch

from trainers.config import load_config
from trainers.data.collate import pad_escm, pad_iamm
from trainers.loop import TrainConfig, Trainer
from trainers.models import MODELS, build_model
from trainers.models.common import Targets


def _time_steps(step, batches, warmup: int, steps: int) -> float:
    for b in batches[:warmup]:
        step(b)
    t0 = time.perf_counter()
    for b in batches[warmup:warmup + steps]:
        step(b)
    return (time.perf_counter() - t0) / steps


def fast_path(trainer: Trainer, batch_size: int, warmup: int, steps: int) -> float:
    plan = trainer.train_data.plan(batch_size, seed=0, epoch=0)
    plan = [p for p in plan if len(p[1]) == batch_size][: warmup + steps]

    def step(p):
        return trainer.train_step(trainer.train_data.rows_batch(*p))

    return _time_steps(step, plan, warmup, steps)


def yardstick(trainer: Trainer, model_name: str, batch_size: int, warmup: int, steps: int) -> float:
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
        if len(batches) == warmup + steps:
            break

    def step(b):
        model.train()
        out = model(b, Targets.of(b))
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()

    return _time_steps(step, batches, warmup, steps)


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


def run(prepared, models=None, batch_sizes=(16, 64, 256), warmup: int = 3, steps: int = 40) -> list[dict]:
    rows = []
    for name in models or [m for m in ("transformer", "escm", "iamm") if m in MODELS]:
        with tempfile.TemporaryDirectory() as out:
            cfg = load_config(TrainConfig, model=name, out_dir=out, device="cpu",
                              data={"source": prepared.manifest["source"]})
            trainer = Trainer(cfg, prepared, log=lambda s: None)
            base = yardstick(trainer, name, 16, warmup, steps)
            rows.append({"model": name, "variant": "yardstick (straightforward)", "batch": 16,
                         "ms_per_step": base * 1e3, "examples_per_s": 16 / base})
            for bs in batch_sizes:
                t = fast_path(trainer, bs, warmup, max(4, steps * 16 // bs))
                rows.append({"model": name, "variant": "trainer fast path", "batch": bs, "ms_per_step": t * 1e3,
                             "examples_per_s": bs / t, "speedup_vs_yardstick": (bs / t) / (16 / base)})
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
    return "\n".join(lines + ([""] + shares if shares else []))


if __name__ == "__main__":
    from trainers.data.prepare import DataConfig, prepare

    p = prepare(load_config(DataConfig))
    print(as_markdown(run(p, batch_sizes=(16,), steps=int(np.int64(5)))))
