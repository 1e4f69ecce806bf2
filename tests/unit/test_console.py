"""The tables `edp sweep`, `edp metrics` and `edp demo` print, rendered from results of the right shape."""

from __future__ import annotations

import math

from rich.console import Console

from cluster import console as out
from cluster.demo import DemoResult, TrialRun
from cluster.prometheus import RouteLatency
from cluster.tracking.promotion import Decision
from cluster.tracking.reports import TABLE_METRICS

URLS = {name: f"http://127.0.0.1:{port}" for name, port in
        (("ray", 8265), ("mlflow", 5000), ("s3", 8333), ("prometheus", 9090), ("serve", 8000))}


def recording(monkeypatch) -> Console:
    rec = Console(record=True, width=200)
    monkeypatch.setattr(out, "console", rec)
    return rec


def test_sweep_table(monkeypatch):
    rec = recording(monkeypatch)
    cols = tuple(TABLE_METRICS)
    row = {"variant": "escm", "seeds": 2, **{c: 1.5 for c in cols}, **{f"{c}_std": 0.25 for c in cols}}
    out.print_sweep("smoke", {"trials": 2, "wall_s": 12.0, "rows": [row], "parent_run_id": "p1",
                              "tracking_uri": "sqlite:///x.db", "best_run_id": "c1"})
    text = rec.export_text()
    assert "sweep smoke: 2 trials in 12 s" in text and "1.50 ± 0.25" in text and "best child c1" in text


def test_latency_table(monkeypatch):
    rec = recording(monkeypatch)
    out.print_latency([RouteLatency("serve", "/v1/respond", 2.5, 10.0, 20.0, math.nan)], "1m", "http://p:9090")
    text = rec.export_text()
    assert "/v1/respond" in text and "2.50" in text and "10.0" in text and " - " in text


def test_demo_report(monkeypatch):
    rec = Console(record=True, width=200)
    decision = Decision("promoted", "edp-demo", version="1", lines=["decision: promote"])
    result = DemoResult(URLS, runs=[TrialRun("escm", "abcdef123456", 0.25, 40.0, 52.5, 0.1, 0.3, 0.0123, 0.0456),
                                    TrialRun("transformer", "0123456789ab", None, None, None, None, None)],
                        decision=decision,
                        responses=[({"context": ["I got the job!"]},
                                    {"response": "congratulations", "emotion_top": [{"label": "joyful", "prob": 0.5}],
                                     "evidence": [{"pair": ["got", "job"]}, {"word": "job"}]})],
                        latency={"p50": 30.0, "p99": 90.0, "query": "histogram_quantile(0.99, ...)"},
                        timings={"stack up": 10.0, "total": 100.0})
    out.print_demo(result, rec)
    text = rec.export_text()
    assert text.index("escm") < text.index("transformer")  # best PPL first, runs without metrics last
    assert "PPL_token" in text and "52.50" in text and "Dist-2_nltk" in text and "4.56" in text
    assert "models:/edp-demo@champion -> version 1 (promoted)" in text and "decision: promote" in text
    assert "joyful (0.50)" in text and "got~job, job" in text and "p50 30 ms, p99 90 ms" in text
    assert "released model" not in text  # no release served: the champion's column only
    assert "the released model" not in text  # nor its URL
    assert "http://127.0.0.1:8000/v1/respond" in text and "edp stack down" in text


def test_demo_examples_show_the_released_model_beside_the_champion():
    rec = Console(record=True, width=240)
    job, dog = {"context": ["I got the job!"]}, {"context": ["My dog [died]."]}
    result = DemoResult(URLS, decision=Decision("promoted", "edp-demo", version="3"), released_version="1",
                        responses=[(job, {"response": "that is the worst .", "emotion_top": [], "evidence": []})],
                        released_responses=[
                            (job, {"response": "congratulations !", "emotion_top": [{"label": "proud", "prob": 0.4}],
                                   "evidence": [{"word": "job"}]}),
                            (dog, {"error": "generation failed"})])
    rec.print(out.example_table(result))
    text = rec.export_text()
    urls = Console(record=True, width=240)
    out.print_demo(DemoResult({**URLS, "released": "http://127.0.0.1:8000/released"}, decision=result.decision,
                              released_version="1", released_responses=result.released_responses), urls)
    assert "the released model │ http://127.0.0.1:8000/released/v1/respond" in urls.export_text()
    assert "released model (models:/escm-ed/1, full ED train)" in text and "champion (models:/edp-demo/3" in text
    job_row = next(line for line in text.splitlines() if "I got the job!" in line)
    assert job_row.index("congratulations !") < job_row.index("that is the worst .")  # released first, same row
    assert "proud (0.40)" in text and "evidence: job" in text
    assert "My dog [died]." in text and "failed: generation failed" in text  # markup-like text shown as is


def test_comparison_table(monkeypatch):
    from cluster.compare import Comparison, ModelStats

    rec = Console(record=True, width=200)
    champion = ModelStats("champion", "1", requests=100, errors=10, p50_ms=120.0, p95_ms=300.0, mean_tokens=9.5,
                          emotions={"sad": 0.6, "proud": 0.3, "joyful": 0.1, "angry": 0.0})
    challenger = ModelStats("challenger", "2", requests=40, emotions={"sad": 1.0}, agreement=0.75)
    out.print_comparison(Comparison("escm", "10m", [champion, challenger], emotion_tv=0.4), "http://prom", rec)
    text = rec.export_text()
    assert "escm: champion vs challenger over the last 10m (http://prom)" in text
    assert "10.0%" in text and "sad 60%, proud 30%, joyful 10%" in text and "angry" not in text
    assert "75.0%" in text and "total variation distance 0.400" in text


def test_a_trial_run_takes_the_table_metrics_in_order():
    """The demo builds its runs from the table's metrics, positionally."""
    run = TrialRun("escm", "id", *range(len(TABLE_METRICS)))
    assert [getattr(run, key) for key, _ in TABLE_METRICS.values()] == list(range(len(TABLE_METRICS)))
