"""The node-kill figures of the multi-node benchmark and test (tests/integration/local_cluster.py), and its report."""

import math

from tests.bench import bench_cluster
from tests.integration.local_cluster import summarize


def test_a_kill_without_failures_recovers_at_the_first_success_after_it():
    log = [(0.0, 0.5, None), (9.8, 10.4, None), (10.5, 10.9, None)]
    r = summarize(log, t_kill=10.0, wall_s=11.0)
    assert (r.requests, r.failed, r.after_kill) == (3, 0, 1)
    assert math.isclose(r.recovery_s, 0.9) and math.isclose(r.rate, 3 / 11)  # 10.5 -> 10.9, not the 10.4 in flight


def test_recovery_counts_from_the_kill_to_the_first_success_started_after_the_last_failure():
    log = [(9.9, 10.2, "HTTP 500: replica died"), (10.1, 10.3, None),      # a success between two failures
           (10.2, 14.0, "ReadTimeout: timed out"), (14.5, 15.0, None), (16.0, 16.2, None)]
    r = summarize(log, t_kill=10.0, wall_s=20.0)
    assert (r.failed, r.after_kill) == (2, 4) and math.isclose(r.failed_fraction, 0.4)
    assert math.isclose(r.recovery_s, 5.0)                                  # 14.5 -> 15.0, after the 14.0 failure end
    assert [round(t, 1) for t, _ in r.failures] == [-0.1, 0.2] and r.failures[1][1].startswith("ReadTimeout")


def test_never_serving_again_is_an_infinite_recovery():
    r = summarize([(10.5, 11.0, "HTTP 503: no replica")], t_kill=10.0, wall_s=12.0)
    assert r.recovery_s == math.inf and r.failed_fraction == 1.0


def test_report_compares_the_stacks_and_gives_the_kill_figures():
    result = {0: {"up_s": 9.0, "smoke_s": 40.0}, 2: {"up_s": 30.0, "smoke_s": 55.5}, "load": [4.0, 6.5],
              "data": "sample",
              "prepared": {"cold_s": 4.0, "fetch_s": 0.4, "hit_s": 0.13, "entry_mb": 1.8},
              "kill": {"requests": 800, "failed": 2, "recovery_s": 1.5, "rate": 17.8, "failures": [(0.1, "HTTP 500")]}}
    text = bench_cluster.as_markdown(result)
    for needle in ("| the chart's smoke RayJob entrypoint, submitted to SUCCEEDED | 40.0 s | 55.5 s |",
                   "Prepared data (sample, 1.8 MB entry): cold prepare 4.00 s, "
                   "fetch of the published entry 0.40 s (10x faster), local hit 0.130 s",
                   "2 of 800 requests failed (0.25%) at 17.8 requests/s", "serving again **1.5 s**",
                   "Load average 4.0 at the start, 6.5 at the end"):
        assert needle in text, needle
