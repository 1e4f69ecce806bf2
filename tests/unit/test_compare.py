"""`edp compare` (cluster/compare.py) on canned Prometheus answers."""

from __future__ import annotations

import math

import pytest

from cluster.compare import compare, queries, total_variation


def vector(*samples: tuple[dict, float]) -> dict:
    return {"status": "success", "data": {"resultType": "vector",
                                          "result": [{"metric": m, "value": [0, str(v)]} for m, v in samples]}}


def champ(**labels) -> dict:
    return {"role": "champion", "version": "1", **labels}


def chall(**labels) -> dict:
    return {"role": "challenger", "version": "2", **labels}


ANSWERS = {  # a figure of cluster.compare.queries -> what Prometheus answers
    "requests": vector((champ(outcome="ok"), 90), (champ(outcome="error"), 10), (chall(outcome="ok"), 40),
                       (chall(outcome="error"), 0)),
    "p50": vector((champ(), 120.0), (chall(), 80.0)),
    "p95": vector((champ(), 300.0), (chall(), float("nan"))),
    "tokens": vector((champ(), 9.5), (chall(), 12.0)),
    "emotions": vector((champ(emotion="sad"), 60), (champ(emotion="proud"), 30), (chall(emotion="sad"), 40)),
    "agreement": vector((chall(), 0.75)),
}


def fake_prometheus(name: str, window: str):
    by_promql = {promql: ANSWERS[figure] for figure, promql in queries(name, window).items()}
    asked = []

    def query(promql: str) -> dict:
        asked.append(promql)
        return by_promql[promql]
    return query, asked


def test_compare_summarises_champion_and_challenger():
    query, asked = fake_prometheus("escm", "10m")
    result = compare(query, "escm", "10m")
    champion, challenger = result.models
    assert (champion.role, champion.version, challenger.role, challenger.version) == (
        "champion", "1", "challenger", "2")
    assert (champion.requests, champion.errors, champion.error_rate) == (100, 10, 0.1)
    assert (challenger.requests, challenger.error_rate) == (40, 0.0)
    assert (champion.p50_ms, champion.p95_ms, challenger.p50_ms) == (120.0, 300.0, 80.0)
    assert math.isnan(challenger.p95_ms) and (champion.mean_tokens, challenger.mean_tokens) == (9.5, 12.0)
    assert champion.emotions == {"sad": pytest.approx(2 / 3), "proud": pytest.approx(1 / 3)}
    assert list(champion.emotions) == ["sad", "proud"]                 # likeliest first
    assert challenger.agreement == 0.75 and math.isnan(champion.agreement)
    assert result.emotion_tv == pytest.approx(1 / 3)                   # 1/2 (|2/3 - 1| + |1/3 - 0|)
    assert all('name="escm"' in q and "[10m]" in q for q in asked)


def test_total_variation_bounds():
    assert total_variation({"sad": 1.0}, {"sad": 1.0}) == 0.0
    assert total_variation({"sad": 1.0}, {"joyful": 1.0}) == 1.0


def test_no_traffic_gives_no_models_and_bad_promql_is_an_error():
    from cluster.prometheus import MetricsError

    result = compare(lambda promql: vector(), "escm", "5m")
    assert result.models == [] and math.isnan(result.emotion_tv)
    with pytest.raises(MetricsError, match="bad_data"):
        compare(lambda promql: {"status": "error", "errorType": "bad_data", "error": "parse error"}, "escm", "5m")
