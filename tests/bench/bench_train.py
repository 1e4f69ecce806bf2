"""Training-step speed: the trainer's fast path versus a straightforward loop of the same model.

Fast path (trainers.loop): splits encoded and padded once into length buckets on the device, batches
gathered by index, targets trimmed per batch, output layer only at real target tokens (pack_targets) and,
without label smoothing, only log P(target) rather than the whole distribution, one word-embedding lookup
for the encoder, fused Adam, bf16 autocast where the CPU has native bf16 (AVX512-BF16/AMX), no host syncs.
Yardstick, the straightforward implementation measured side by side: a torch DataLoader over the
encoded examples with random batches collated per step (padded to the batch maximum), the same
model in fp32 with the output layer's full distribution at every padded position (pack_targets=False),
default Adam. Both run the paper-sized model (d=300) on the prepared vocabulary, torch at one thread.
Timed with tests/bench/timing.py: after `warmup` rounds, `rounds` interleaved rounds (yardstick, fast path at
each batch size, yardstick, ...); a round is `steps` batches of 16 for the yardstick and `steps` x 16 examples
(at least one batch) for the fast path, fresh batches every round. Per side: the median and min-max over the
rounds of wall and CPU (`time.process_time`) ms per step; examples/s from the CPU median. "vs yardstick" is the
ratio of the CPU-time medians per example (yardstick / fast path): CPU time is what each loop spent, whatever
else shares the cores; the wall-time ratio beside it moves with the neighbours' load.
"""

from __future__ import annotations

import tempfile
import time

import torch

from tests.bench.timing import Comparison, Side, compare
from trainers.config import TrainConfig, load_config
from trainers.data.collate import pad_escm, pad_iamm
from trainers.loop import Trainer
from trainers.models import MODELS, build_model
from trainers.models.interface import Targets


def _rounds(step, batches, per_round: int):
    """A side's round function: round i runs `step` on batches [i * per_round, (i + 1) * per_round)."""

    def run(i: int) -> None:
        for b in batches[i * per_round:(i + 1) * per_round]:
            step(b)

    return run


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


YARDSTICK = "yardstick (straightforward)"


def sides(trainer: Trainer, name: str, batch_sizes, steps: int, total_rounds: int) -> tuple[list[Side], dict]:
    """The yardstick (batch 16) and the fast path at each batch size as timing sides, one unit = one example;
    and each side's batch size."""
    n = {bs: max(1, steps * 16 // bs) for bs in batch_sizes}
    step, batches = yardstick(trainer, name, 16, total_rounds * steps)
    if len(batches) < total_rounds * steps:
        raise ValueError(f"{name}: the train split has {len(batches)} batches of 16, the rounds need "
                         f"{total_rounds * steps}: lower --steps or --rounds")
    out, batch = [Side(YARDSTICK, _rounds(step, batches, steps), units=16 * steps)], {YARDSTICK: 16}
    for bs in batch_sizes:
        step, batches = fast_path(trainer, bs, total_rounds * n[bs])
        if len(batches) < total_rounds * n[bs]:
            raise ValueError(f"{name}: the train split has {len(batches)} full batches of {bs}, the rounds need "
                             f"{total_rounds * n[bs]}: lower --steps or --rounds")
        label = f"fast path, batch {bs}"
        out.append(Side(label, _rounds(step, batches, n[bs]), units=bs * n[bs]))
        batch[label] = bs
    return out, batch


def run(prepared, models=None, batch_sizes=(16, 64, 256), warmup: int = 1, steps: int = 12,
        rounds: int = 3) -> list[dict]:
    """One row per model: its `Comparison` (see tests/bench/timing.py) and the sides' batch sizes."""
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time then counts the work, not intra-op threads spinning
    try:
        for name in models or [m for m in ("transformer", "escm", "iamm") if m in MODELS]:
            with tempfile.TemporaryDirectory() as out:
                cfg = load_config(TrainConfig, model=name, out_dir=out, device="cpu",
                                  data={"source": prepared.manifest["source"]})
                trainer = Trainer(cfg, prepared, log=lambda s: None)
                timed, batch = sides(trainer, name, batch_sizes, steps, warmup + rounds)
                row = {"model": name, "batch": batch, "comparison": compare(timed, rounds=rounds, warmup=warmup)}
                if name == "iamm":
                    row["association_share"] = association_share(trainer)
                rows.append(row)
    finally:
        torch.set_num_threads(threads)
    return rows


def _ms(summary, batch: int) -> str:
    """Median (min-max) ms per step from per-example seconds."""
    k = 1e3 * batch
    return f"{summary.median * k:.1f} ({summary.low * k:.1f}-{summary.high * k:.1f})"


def as_markdown(rows: list[dict]) -> str:
    lines = ["| model | loop | batch | wall ms/step, median (min-max) | CPU ms/step, median (min-max) | "
             "examples per CPU-s | vs yardstick, CPU (wall) |", "|---|---|---|---|---|---|---|"]
    notes = []
    for r in rows:
        c: Comparison = r["comparison"]
        for label, t in c.sides.items():
            bs, cpu = r["batch"][label], t.summary("cpu")
            ratio = "" if label == YARDSTICK else \
                f"{c.speedup(YARDSTICK, label):.2f}x ({c.wall_speedup(YARDSTICK, label):.2f}x)"
            lines.append(f"| {r['model']} | {label} | {bs} | {_ms(t.summary('wall'), bs)} | {_ms(cpu, bs)} | "
                         f"{1 / cpu.median:.1f} | {ratio} |")
        notes.append(f"{r['model']}: {c.describe()}")
        if "association_share" in r:
            notes.append(f"{r['model']}: information association modules take {r['association_share']:.0%} of the "
                         "forward pass (batch 16, wall time)")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


if __name__ == "__main__":
    from trainers.config import DataConfig
    from trainers.data.prepare import prepare

    p = prepare(load_config(DataConfig))
    print(as_markdown(run(p, batch_sizes=(16,), steps=2, rounds=2)))
