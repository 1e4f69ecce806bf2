"""`make bench-gpu` (tests/bench/bench_gpu.py): every part once on the CPU with --quick, and its report."""

import pytest

from tests.bench import bench_gpu

RESULT = {
    "quick": True, "machine": "CPU only", "data": "sample", "vocab": 1298, "total_s": 40.0,
    "steps": [{"model": "escm", "batch": 16, "mode": "eager", "warmup_s": 0.5, "ms_per_step": 20.0,
               "examples_per_s": 800.0},
              {"model": "escm", "batch": 4096, "mode": "cudagraphs", "oom": True}],
    "full": [{"model": "escm", "steps": 8, "max_steps": 8, "wall_s": 3.0,
              "final": {"valid_acc": 0.1, "valid_ppl": 900.0, "valid_dist_1": 0.2, "valid_dist_2": 0.3}}],
    "grid": {"trials": 2, "variants": 2, "seeds": 1, "steps": 4, "wall_s": 20.0, "gpu": 0, "cpu": 0.9,
             "concurrent": 2, "projected_recipe_s": 67500.0, "recipe_steps": 13500},
    "serve": {"requests": 20, "errors": 0, "offered_per_s": 10, "served_per_s": 9.5, "p50_ms": 30.0,
              "p99_ms": 55.0, "max_len": 30, "flavour": "tiny"},
}


def test_report_names_every_part_and_its_target():
    text = bench_gpu.as_markdown(RESULT)
    assert text.startswith("## GPU\n")
    for needle in ("| escm | 16 | eager | 20.00 | 800 |", "| escm | 4096 | cudagraphs | out of memory",
                   "| escm | 8 (8) | 3 | 60 |", "2 trials, 4 steps each", "p50 30 ms, p99 55 ms",
                   "target p99 <= 60 ms", "target <= 10 min", "2,734 s on a T4"):
        assert needle in text, needle


def test_write_section_replaces_only_the_gpu_section(tmp_path):
    out = tmp_path / "B.md"
    out.write_text("# Benchmarks\n\n## Serving\n\nkept\n\n## GPU\n\nold figures\n\n## End-to-end\n\nkept too\n")
    bench_gpu.write_section(out, "## GPU\n\nnew figures\n")
    text = out.read_text()
    assert "old figures" not in text and "new figures" in text
    assert text.index("## Serving") < text.index("## GPU") < text.index("## End-to-end")
    assert "kept\n" in text and "kept too" in text
    fresh = tmp_path / "new.md"
    bench_gpu.write_section(fresh, "## GPU\n\nfigures\n")
    assert fresh.read_text() == "## GPU\n\nfigures\n"


def test_quick_never_writes_benchmarks_md():
    with pytest.raises(SystemExit):
        bench_gpu.main(["--quick", "--out", str(bench_gpu.ROOT / "BENCHMARKS.md")])


@pytest.mark.slow
@pytest.mark.integration
def test_quick_run_on_cpu_measures_every_part(tmp_path):
    """Trainer steps, two full (tiny) runs, a 2-trial Ray Tune grid, one Serve replica under open-loop load."""
    out = tmp_path / "gpu.md"
    assert bench_gpu.main(["--quick", "--device", "cpu", "--data", "sample", "--out", str(out)]) == 0
    text = out.read_text()
    for model in bench_gpu.MODELS:
        assert f"| {model} | 16 | eager |" in text
    assert "| escm | 8 (8) |" in text and "| iamm | 8 (8) |" in text
    assert "2 variants x 1 seeds = 2 trials" in text
    assert ", 0 errors;" in text and "p99" in text
