"""Load-robust comparisons for the benchmarks: interleaved rounds, wall and CPU time, the machine's state.

The machines here are shared, so wall time measures the neighbours as much as the code. A comparison therefore

- runs its sides in interleaved rounds (A, B, A, B, ...) after warm-up rounds, so that every side sees the same
  load drift;
- times each round in wall time (`time.perf_counter`) and in this process's CPU time (`time.process_time`, all
  its threads: run torch at one thread, or CPU time counts the threads' spinning too);
- reports per side the median and the spread (min, max, quartiles) per unit of work (a step, an example);
- quotes the ratio of the CPU-time medians: CPU time is what the code spent, whoever else shares the cores;
- records the load average before and after, the CPU model, and instruction counts where `perf stat` can count
  them here (a VM without a hardware PMU cannot: the report then says "instructions: unavailable (reason)").

    result = compare([Side("yardstick", run_a, units=16), Side("fast", run_b, units=16)], rounds=5, warmup=1)
    result.speedup("yardstick", "fast")   # CPU per unit of work: yardstick / fast
    print(result.describe())

A side's `run(i)` does round i's work (warm-up rounds first: i = 0 .. warmup-1), so each round can use fresh
batches.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

PERF_START_S = 0.2  # perf stat -p needs a moment to attach before the round starts


@dataclass
class Side:
    """One implementation under comparison: `run(i)` does round i's work, `units` of it (steps, examples)."""

    name: str
    run: Callable[[int], object]
    units: float = 1.0


@dataclass(frozen=True)
class Summary:
    """Median and spread of one side's per-unit times over the measured rounds."""

    median: float
    low: float
    high: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: list[float]) -> Summary:
        if not values:
            raise ValueError("no measured rounds: rounds must be >= 1")
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
        return cls(statistics.median(values), min(values), max(values), q1, q3)


@dataclass
class Timings:
    """A side's measured rounds: wall and CPU seconds per unit of work, and instructions per unit (or None)."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    instructions: list[float] | None = None

    def summary(self, kind: str) -> Summary:
        return Summary.of(getattr(self, kind))


@dataclass
class Comparison:
    """The outcome of `compare`: timings per side and the machine's state around them."""

    sides: dict[str, Timings]
    order: list[str]            # the measured rounds' order, e.g. ["A", "B", "A", "B"]
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    cpu_model: str
    instructions_note: str      # "counted (perf stat)" or "unavailable (reason)"

    def speedup(self, base: str, other: str) -> float:
        """How many times less CPU per unit `other` needs than `base`: the ratio of the CPU-time medians."""
        return self.sides[base].summary("cpu").median / self.sides[other].summary("cpu").median

    def wall_speedup(self, base: str, other: str) -> float:
        """The same ratio in wall time (shown beside the CPU one; it moves with the neighbours' load)."""
        return self.sides[base].summary("wall").median / self.sides[other].summary("wall").median

    def load_note(self) -> str:
        before, after = ("/".join(f"{x:.1f}" for x in load) for load in (self.load_before, self.load_after))
        return f"load average (1/5/15 min) {before} before, {after} after"

    def describe(self) -> str:
        """One line on how the figures were taken."""
        rounds = len(self.order) // max(len(self.sides), 1)
        return (f"{rounds} rounds after warm-up, the {len(self.sides)} sides interleaved in each (in the order "
                f"listed); CPU: {self.cpu_model}; {self.load_note()}; instructions: {self.instructions_note}.")


def interleaved(names: list[str], rounds: int) -> list[str]:
    """The order the sides run in: A, B, ..., A, B, ... (`rounds` times each)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if len(set(names)) != len(names):
        raise ValueError(f"side names must differ: {names}")
    return [name for _ in range(rounds) for name in names]


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform

        return platform.processor() or "unknown CPU"


# ------------------------------------------------------------------------------------------------
# Instruction counts: perf stat attached to this process for one round


def parse_perf_csv(text: str, event: str = "instructions") -> tuple[int | None, str]:
    """(count, "") from `perf stat -x,` output, else (None, why not): the count field reads
    "<not supported>" where the machine exposes no hardware counter, "<not counted>" where it could not run."""
    for line in text.splitlines():
        fields = line.split(",")
        if len(fields) > 2 and fields[2].startswith(event):
            value = fields[0].strip()
            if value.isdigit():
                return int(value), ""
            return None, f"perf stat reports {event} as {value}"
    return None, f"no {event} line in perf stat's output: {text.strip()[-200:]!r}"


def perf_unavailable_reason() -> str | None:
    """None when `perf stat -e instructions:u` counts on this machine, else why it does not."""
    perf = shutil.which("perf")
    if perf is None:
        return "perf is not installed (Debian: apt-get install linux-perf)"
    try:
        out = subprocess.run([perf, "stat", "-x,", "-e", "instructions:u", "true"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError) as e:
        return f"perf stat failed to run: {e}"
    count, why = parse_perf_csv(out.stderr)
    if count is not None:
        return None
    if not os.path.exists("/sys/bus/event_source/devices/cpu"):
        why += "; the kernel lists no hardware PMU (no /sys/bus/event_source/devices/cpu: a VM without one)"
    paranoid = _read("/proc/sys/kernel/perf_event_paranoid")
    return f"{why} (perf_event_paranoid {paranoid})" if paranoid else why


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def count_instructions(work: Callable[[], object]) -> int | None:
    """User-space instructions this process executes during `work()`, counted by `perf stat -p` (None on
    failure). Counts the whole process: keep other threads idle during a round."""
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "instructions:u", "-p", str(os.getpid())],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(PERF_START_S)
    try:
        work()
    finally:
        perf.send_signal(signal.SIGINT)  # perf stat prints its counts on SIGINT
        try:
            err = perf.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:  # never leave it running
            perf.kill()
            err = perf.communicate()[1]
    return parse_perf_csv(err)[0]


# ------------------------------------------------------------------------------------------------
# The comparison


def _timed(side: Side, i: int, count: bool) -> tuple[float, float, float | None]:
    """Wall and CPU seconds per unit (and instructions per unit when `count`) of side's round i."""
    box: dict[str, float] = {}

    def work():
        w0, c0 = time.perf_counter(), time.process_time()
        side.run(i)
        box["cpu"], box["wall"] = time.process_time() - c0, time.perf_counter() - w0

    instructions = None
    if count:
        instructions = count_instructions(work)
    else:
        work()
    per = 1.0 / side.units
    return box["wall"] * per, box["cpu"] * per, None if instructions is None else instructions * per


def compare(sides: list[Side], rounds: int = 5, warmup: int = 1, count: bool | None = None) -> Comparison:
    """Run `warmup` untimed rounds of each side, then `rounds` interleaved timed ones (A, B, A, B ...).
    `count`: count instructions with perf (None: where perf can)."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if any(s.units <= 0 for s in sides):
        raise ValueError(f"units must be > 0: {[(s.name, s.units) for s in sides]}")
    by_name = {s.name: s for s in sides}
    order = interleaved([s.name for s in sides], rounds)
    reason = perf_unavailable_reason() if count is not False else "not requested"
    count = reason is None
    timings = {s.name: Timings(instructions=[] if count else None) for s in sides}
    load_before = os.getloadavg()
    for i in range(warmup):
        for s in sides:
            s.run(i)
    seen = {name: 0 for name in by_name}
    for name in order:
        wall, cpu, instructions = _timed(by_name[name], warmup + seen[name], count)
        seen[name] += 1
        timings[name].wall.append(wall)
        timings[name].cpu.append(cpu)
        if count and instructions is not None:
            timings[name].instructions.append(instructions)
    return Comparison(timings, order, load_before, os.getloadavg(), cpu_model(),
                      "counted (perf stat -e instructions:u)" if count else f"unavailable ({reason})")
