"""The benchmark harness (tests/bench/timing.py): interleaving, per-unit statistics, the CPU-time ratio, perf's
output, and the section splicing of tests/bench/run.py. Clocks are faked: no timing thresholds."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.bench import run as bench_run
from tests.bench import timing
from tests.bench.timing import Comparison, Side, Summary, Timings, compare, interleaved, parse_perf_csv


class FakeClocks:
    """perf_counter and process_time that move only when a side runs: `cost[name][i]` CPU seconds for round i,
    twice that in wall seconds (the neighbours take the other half)."""

    def __init__(self, monkeypatch, cost: dict[str, list[float]]):
        self.cost, self.cpu, self.calls = cost, 0.0, []
        monkeypatch.setattr(time, "process_time", lambda: self.cpu)
        monkeypatch.setattr(time, "perf_counter", lambda: 2 * self.cpu)

    def side(self, name: str, units: float = 1.0) -> Side:
        def run(i: int) -> None:
            self.calls.append((name, i))
            self.cpu += self.cost[name][i]

        return Side(name, run, units)


def test_sides_alternate_after_the_warm_up_rounds_and_each_round_gets_fresh_work(monkeypatch):
    clocks = FakeClocks(monkeypatch, {"A": [1.0] * 5, "B": [1.0] * 5})
    result = compare([clocks.side("A"), clocks.side("B")], rounds=3, warmup=2, count=False)
    assert clocks.calls == [("A", 0), ("B", 0), ("A", 1), ("B", 1),                  # warm-up, untimed
                            ("A", 2), ("B", 2), ("A", 3), ("B", 3), ("A", 4), ("B", 4)]
    assert result.order == ["A", "B", "A", "B", "A", "B"]
    assert [len(t.cpu) for t in result.sides.values()] == [3, 3]


def test_times_are_per_unit_and_the_quoted_ratio_is_the_cpu_medians(monkeypatch):
    # warm-up costs 100 s and must not count; A's rounds cost 8, 16, 4 CPU-s for 4 units; B's 1, 3, 2 for 2 units
    clocks = FakeClocks(monkeypatch, {"A": [100.0, 8.0, 16.0, 4.0], "B": [100.0, 1.0, 3.0, 2.0]})
    result = compare([clocks.side("A", units=4), clocks.side("B", units=2)], rounds=3, warmup=1, count=False)
    assert result.sides["A"].cpu == [2.0, 4.0, 1.0] and result.sides["B"].cpu == [0.5, 1.5, 1.0]
    assert result.sides["A"].wall == [4.0, 8.0, 2.0]
    assert result.sides["A"].summary("cpu") == Summary(median=2.0, low=1.0, high=4.0, q1=1.5, q3=3.0)
    assert result.speedup("A", "B") == pytest.approx(2.0)       # 2.0 / 1.0, not the mean ratio 7/3 / 1
    assert result.wall_speedup("A", "B") == pytest.approx(2.0)
    assert result.sides["A"].instructions is None and "unavailable (not requested)" in result.describe()


def test_summary_of_one_round_and_of_none():
    assert Summary.of([3.0]) == Summary(3.0, 3.0, 3.0, 3.0, 3.0)
    assert Summary.of([4.0, 1.0, 3.0, 2.0]).median == 2.5
    with pytest.raises(ValueError, match="no measured rounds"):
        Summary.of([])


def test_bad_arguments_are_refused_naming_them():
    with pytest.raises(ValueError, match="rounds must be >= 1, got 0"):
        interleaved(["A", "B"], 0)
    with pytest.raises(ValueError, match="side names must differ"):
        interleaved(["A", "A"], 2)
    with pytest.raises(ValueError, match=r"units must be > 0: \[\('A', 0\)\]"):
        compare([Side("A", lambda i: None, units=0)], count=False)


def test_describe_names_the_rounds_the_cpu_and_the_load():
    c = Comparison({"A": Timings([1.0], [1.0]), "B": Timings([1.0], [1.0])}, ["A", "B", "A", "B"],
                   (1.0, 2.0, 3.0), (4.0, 5.0, 6.0), "Test CPU", "unavailable (no perf)")
    assert c.describe() == ("2 rounds after warm-up, the 2 sides interleaved in each (in the order listed); CPU: "
                            "Test CPU; load average (1/5/15 min) 1.0/2.0/3.0 before, 4.0/5.0/6.0 after; "
                            "instructions: unavailable (no perf).")


def test_perf_csv_gives_the_count_or_why_not():
    assert parse_perf_csv("1234567,,instructions:u,1000,100.00,,\n") == (1234567, "")
    count, why = parse_perf_csv("<not supported>,,instructions:u,0,100.00,,\n")
    assert count is None and why == "perf stat reports instructions as <not supported>"
    assert parse_perf_csv("perf: command failed")[0] is None


def test_without_perf_the_report_says_instructions_are_unavailable_and_why(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no perf here
    result = compare([Side("A", lambda i: None)], rounds=1, warmup=0)
    assert result.sides["A"].instructions is None
    assert result.instructions_note == "unavailable (perf is not installed (Debian: apt-get install linux-perf))"


FAKE_PERF = """#!{python}
# `perf stat ... true` answers at once; `perf stat ... -p PID` counts until SIGINT, like perf. Python, not sh: a
# shell cannot trap SIGINT when it starts with SIGINT ignored (as a background job's children do)
import os, pathlib, signal, sys, time
if sys.argv[-1] == "true":
    sys.exit(print("1000,,instructions:u,1,100.00,,", file=sys.stderr))
def done(*_):
    sys.exit(print("6000,,instructions:u,1,100.00,,", file=sys.stderr))
signal.signal(signal.SIGINT, done)
pathlib.Path(os.environ["READY"]).touch()
while True:
    time.sleep(0.05)
"""


def test_with_a_counting_perf_each_round_gets_its_instructions_per_unit(monkeypatch, tmp_path):
    perf = tmp_path / "perf"
    perf.write_text(FAKE_PERF.format(python=sys.executable))
    perf.chmod(0o755)
    ready = tmp_path / "ready"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("READY", str(ready))
    monkeypatch.setattr(timing, "PERF_START_S", 0.0)

    def run(i: int) -> None:  # a round ends only once perf is attached (the fake says so), however loaded the box
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        ready.unlink()

    result = compare([Side("A", run, units=3)], rounds=2, warmup=0)
    assert result.instructions_note.startswith("counted")
    assert result.sides["A"].instructions == [2000.0, 2000.0]


def test_only_splices_its_section_and_keeps_the_others():
    generated = "# Benchmarks\n\nheader\n\n## Data preparation\n\nold data\n\n## Training step\n\nold train\n" \
                "### its subsection\n\nmore\n\n## Serving\n\nserve table\n"
    out = bench_run.splice(generated, "Training step", "## Training step\n\nnew train\n")
    assert out == "# Benchmarks\n\nheader\n\n## Data preparation\n\nold data\n\n## Training step\n\nnew train\n" \
                  "\n## Serving\n\nserve table\n"
    last = bench_run.splice(generated, "Serving", "## Serving\n\nnew serve\n")
    assert last.endswith("## Training step\n\nold train\n### its subsection\n\nmore\n\n## Serving\n\nnew serve\n")
    assert bench_run.splice("# B\n", "Decoding", "## Decoding\n\nx\n") == "# B\n\n## Decoding\n\nx\n"


def test_a_whole_rewrite_keeps_the_headline(tmp_path: Path, monkeypatch):
    monkeypatch.setattr(bench_run, "machine", lambda: "cpu")
    out = tmp_path / "BENCH.md"
    out.write_text(f"# Benchmarks\n\n## Headline (one screen)\n\n| a | b |\n\nGenerated long ago\n\n"
                   f"## Data preparation\n\nold data\n\n{bench_run.MARK}\n## Kept by hand\n")
    bench_run.write(out, {"data": "new data"}, whole=True, command="cmd", commit="abc")
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n## Headline (one screen)\n\n| a | b |\n\nGenerated ")
    assert "long ago" not in text and "old data" not in text and "new data" in text and text.endswith("by hand\n")


def test_write_keeps_the_hand_kept_part_and_the_other_sections(tmp_path: Path):
    out = tmp_path / "BENCH.md"
    out.write_text(f"# Benchmarks\n\n## Data preparation\n\nold data\n\n## Training step (paper-sized models, CPU)\n"
                   f"\nold train\n\n{bench_run.MARK}\n## Kept by hand\n")
    bench_run.write(out, {"train": "new train"}, whole=False, command="cmd", commit="abc")
    assert out.read_text() == (f"# Benchmarks\n\n## Data preparation\n\nold data\n\n"
                               f"## Training step (paper-sized models, CPU)\n\nnew train\n\n{bench_run.MARK}\n"
                               "## Kept by hand\n")


def test_unknown_only_section_is_refused_naming_it(capsys):
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--only", "train,trian"])
    assert "--only: unknown section(s) ['trian']" in capsys.readouterr().err


def test_training_step_table_gives_ms_per_step_and_the_cpu_ratio_per_example():
    from tests.bench.bench_train import YARDSTICK, as_markdown  # torch: only for this test

    fast = "fast path, batch 256"
    c = Comparison({YARDSTICK: Timings(wall=[0.02, 0.03, 0.04], cpu=[0.01, 0.01, 0.02]),  # seconds per example
                    fast: Timings(wall=[0.01] * 3, cpu=[0.0025] * 3)}, [YARDSTICK, fast] * 3,
                   (9.0, 8.0, 7.0), (9.5, 8.0, 7.0), "Test CPU", "unavailable (no PMU)")
    md = as_markdown([{"model": "escm", "batch": {YARDSTICK: 16, fast: 256}, "comparison": c}])
    assert "| escm | yardstick (straightforward) | 16 | 480.0 (320.0-640.0) | 160.0 (160.0-320.0) | 100.0 |  |" in md
    assert "| escm | fast path, batch 256 | 256 | 2560.0 (2560.0-2560.0) | 640.0 (640.0-640.0) | 400.0 | " \
           "4.00x (3.00x) |" in md
    assert "- escm: 3 rounds after warm-up" in md and "9.0/8.0/7.0 before" in md
    assert "instructions: unavailable (no PMU)" in md
