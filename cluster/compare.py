"""`edp compare --name escm`: champion vs challenger on live traffic over a time window, from Prometheus.

The per-model series of services/replica_metrics.py (Ray's exporter adds the `ray_` prefix), grouped by role and
version, `W` the window, `N` the registered model name:

    requests   sum by (role, version, outcome) (increase(ray_edp_model_requests_total{name="N"}[W]))
    latency    histogram_quantile(q, sum by (role, version, le) (rate(ray_edp_model_latency_ms_bucket{..}[W])))
    length     increase(ray_edp_model_response_tokens_sum) / increase(..._count): mean tokens per response
    emotions   sum by (role, version, emotion) (increase(ray_edp_model_emotions_total{..}[W]))
    agreement  increase(ray_edp_model_agreement_total{agree="true"}) / increase(ray_edp_model_agreement_total)

and between the two emotion distributions p (champion) and q (challenger) the total variation distance
TV(p, q) = 1/2 * sum_e |p(e) - q(e)| (0: same distribution, 1: disjoint).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field

from cluster.prometheus import Query, parse_series

Key = tuple[str, str]  # (role, version)


@dataclass
class ModelStats:
    role: str
    version: str
    requests: float = 0.0                 # answered + failed in the window
    errors: float = 0.0
    p50_ms: float = math.nan
    p95_ms: float = math.nan
    mean_tokens: float = math.nan
    emotions: dict[str, float] = field(default_factory=dict)   # emotion -> share of this model's answers
    agreement: float = math.nan           # challenger only: share of shadowed requests agreeing with the champion

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else math.nan


@dataclass
class Comparison:
    name: str
    window: str
    models: list[ModelStats]
    emotion_tv: float = math.nan          # TV distance between the champion's and the challenger's emotions


def _sel(name: str, extra: str = "") -> str:
    return "{name=" + json.dumps(name) + (f", {extra}" if extra else "") + "}"


def queries(name: str, window: str) -> dict[str, str]:
    """The PromQL of each figure (module doc)."""
    s, agree, w = _sel(name), _sel(name, 'agree="true"'), f"[{window}]"
    by = "sum by (role, version)"
    return {
        "requests": f"sum by (role, version, outcome) (increase(ray_edp_model_requests_total{s}{w}))",
        **{f"p{round(q * 100)}": f"histogram_quantile({q}, sum by (role, version, le) "
                                 f"(rate(ray_edp_model_latency_ms_bucket{s}{w})))" for q in (0.5, 0.95)},
        "tokens": f"{by} (increase(ray_edp_model_response_tokens_sum{s}{w})) / "
                  f"{by} (increase(ray_edp_model_response_tokens_count{s}{w}))",
        "emotions": f"sum by (role, version, emotion) (increase(ray_edp_model_emotions_total{s}{w}))",
        "agreement": f"{by} (increase(ray_edp_model_agreement_total{agree}{w})) / "
                     f"{by} (increase(ray_edp_model_agreement_total{s}{w}))",
    }


def total_variation(p: dict[str, float], q: dict[str, float]) -> float:
    """TV(p, q) = 1/2 * sum_e |p(e) - q(e)| over the emotions of either distribution."""
    return 0.5 * sum(abs(p.get(e, 0.0) - q.get(e, 0.0)) for e in set(p) | set(q))


def compare(query: Query, name: str, window: str) -> Comparison:
    """Champion and challenger versions seen in the window, with their figures; models=[] without traffic."""
    q = queries(name, window)
    stats: dict[Key, ModelStats] = {}

    def of(key: Key) -> ModelStats:
        return stats.setdefault(key, ModelStats(*key))

    for (role, version, outcome), n in parse_series(query(q["requests"]), ("role", "version", "outcome")).items():
        if n > 0:
            of((role, version)).requests += n
            of((role, version)).errors += n if outcome == "error" else 0.0
    counts: dict[Key, dict[str, float]] = defaultdict(dict)
    for (role, version, emotion), n in parse_series(query(q["emotions"]), ("role", "version", "emotion")).items():
        if n > 0:
            counts[(role, version)][emotion] = n
    for key, by_emotion in counts.items():
        total = sum(by_emotion.values())
        of(key).emotions = {e: n / total for e, n in sorted(by_emotion.items(), key=lambda kv: -kv[1])}
    for figure, attr in (("p50", "p50_ms"), ("p95", "p95_ms"), ("tokens", "mean_tokens"), ("agreement", "agreement")):
        for key, value in parse_series(query(q[figure]), ("role", "version")).items():
            if key in stats:
                setattr(stats[key], attr, value)
    models = sorted(stats.values(), key=lambda m: (m.role != "champion", m.role, m.version))
    return Comparison(name, window, models, _tv(models))


def _tv(models: list[ModelStats]) -> float:
    """TV distance between the busiest champion and the busiest challenger version (NaN without both)."""
    def busiest(role: str) -> ModelStats | None:
        return max((m for m in models if m.role == role and m.emotions), key=lambda m: m.requests, default=None)

    champion, challenger = busiest("champion"), busiest("challenger")
    return math.nan if champion is None or challenger is None else total_variation(champion.emotions,
                                                                                   challenger.emotions)
