"""The app's own metrics, exported through Ray's metrics agent (Prometheus names get the `ray_` prefix).

Serve's built-ins (`ray_serve_http_request_latency_ms_*`, `ray_serve_deployment_processing_latency_ms_*`,
`ray_serve_batch_*`, ...) exist already; these add what only the app knows. Serve adds the deployment,
replica and application tags itself. `replica_metrics()` gives the one `ServeMetrics` of this process
(a module-level singleton here, because Serve ships the deployment class by value: a global assigned from
its methods would not be the one the FastAPI middleware reads).

Ray drops a gauge's series some seconds after its last `set`, so the replica re-marks the served versions
on every poll tick (`serving`).

Per model (tags name, version and role = champion | challenger; services/replica.py records them):
    edp_model_requests_total{outcome}     answers (ok) and failures (error) of each version
    edp_model_latency_ms                  one request's wait + generation on that version
    edp_model_emotions_total{emotion}     predicted emotions (the distribution)
    edp_model_response_tokens             response length in tokens
    edp_model_agreement_total{agree}      shadowed requests whose challenger emotion equals the champion's
    edp_model_load_failures_total         versions a replica was told to serve but could not load
`edp compare` (cluster/compare.py) reads them back from Prometheus.

Per application (tag name = the registered model the application serves):
    edp_crisis_screened_total             requests the crisis screen answered with its fixed message (no model)
"""

from __future__ import annotations

LATENCY_MS_BUCKETS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]
TOKEN_BUCKETS = [2, 4, 8, 12, 16, 24, 32, 48, 64, 128]
MODEL_TAGS = ("name", "version", "role")


class ServeMetrics:
    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.request_latency = Histogram(
            "edp_request_latency_ms", "HTTP request latency inside the replica, by route and status code",
            boundaries=LATENCY_MS_BUCKETS, tag_keys=("route", "status"))
        self.generation_latency = Histogram(
            "edp_generation_latency_ms", "time of one batched Responder.respond call (encode + decode)",
            boundaries=LATENCY_MS_BUCKETS)
        self.tokens = Counter("edp_tokens_generated_total", "response tokens generated")
        self.batch_size = Histogram("edp_batch_size", "requests per batched respond call",
                                    boundaries=BATCH_BUCKETS)
        self.model_version = Gauge("edp_model_version", "1 for a registered version this replica serves",
                                   tag_keys=MODEL_TAGS)
        self.model_requests = Counter("edp_model_requests_total", "requests a model version answered or failed",
                                      tag_keys=(*MODEL_TAGS, "outcome"))
        self.model_latency = Histogram("edp_model_latency_ms", "one request's batch wait + generation on a version",
                                       boundaries=LATENCY_MS_BUCKETS, tag_keys=MODEL_TAGS)
        self.model_emotions = Counter("edp_model_emotions_total", "emotions a model version predicted",
                                      tag_keys=(*MODEL_TAGS, "emotion"))
        self.response_tokens = Histogram("edp_model_response_tokens", "response length in tokens, by version",
                                         boundaries=TOKEN_BUCKETS, tag_keys=MODEL_TAGS)
        self.agreement = Counter("edp_model_agreement_total", "shadowed requests: challenger emotion == champion's",
                                 tag_keys=(*MODEL_TAGS, "agree"))
        self.load_failures = Counter("edp_model_load_failures_total",
                                     "versions a replica was told to serve and could not load (it kept the old one)",
                                     tag_keys=MODEL_TAGS)
        self.crisis_screened = Counter("edp_crisis_screened_total",
                                       "requests the crisis screen answered with its fixed message (never generated)",
                                       tag_keys=("name",))

    def request(self, route: str, status: int, ms: float) -> None:
        self.request_latency.observe(ms, tags={"route": route, "status": str(status)})

    def batch(self, size: int, ms: float, tokens: int) -> None:
        self.batch_size.observe(size)
        self.generation_latency.observe(ms)
        if tokens > 0:
            self.tokens.inc(tokens)

    def serving(self, name: str, role: str, version: str | None, old_version: str | None = None) -> None:
        """Mark `version` as served in `role` (1) and the swapped-out one as no longer served there (0)."""
        if old_version is not None and old_version != version:
            self.model_version.set(0, tags={"name": name, "version": old_version, "role": role})
        if version is not None:
            self.model_version.set(1, tags={"name": name, "version": version, "role": role})

    def load_failed(self, name: str, role: str, version: str) -> None:
        self.load_failures.inc(tags={"name": name, "version": version, "role": role})

    def screened(self, name: str) -> None:
        self.crisis_screened.inc(tags={"name": name})

    # services.replica.Recorder

    def answered(self, role: str, loaded, ms: float, answer) -> None:
        """`answer`: a trainers.inference.Answer."""
        tags = _model_tags(role, loaded)
        self.model_requests.inc(tags={**tags, "outcome": "ok"})
        self.model_latency.observe(ms, tags=tags)
        self.model_emotions.inc(tags={**tags, "emotion": str(answer.emotion)})
        self.response_tokens.observe(answer.tokens_generated, tags=tags)

    def failed(self, role: str, loaded, ms: float) -> None:
        tags = _model_tags(role, loaded)
        self.model_requests.inc(tags={**tags, "outcome": "error"})
        self.model_latency.observe(ms, tags=tags)

    def agreed(self, loaded, agree: bool) -> None:
        self.agreement.inc(tags={**_model_tags("challenger", loaded), "agree": str(agree).lower()})


def _model_tags(role: str, loaded) -> dict[str, str]:
    """Tags of a services.replica.Loaded version in `role`."""
    return {"name": loaded.resolved.name, "version": loaded.version, "role": role}


_replica_metrics: ServeMetrics | None = None


def replica_metrics() -> ServeMetrics:
    """This process's ServeMetrics, created on first use (inside a Serve replica)."""
    global _replica_metrics
    if _replica_metrics is None:
        _replica_metrics = ServeMetrics()
    return _replica_metrics
