"""The app's own metrics, exported through Ray's metrics agent (Prometheus names get the `ray_` prefix).

Serve's built-ins (`ray_serve_http_request_latency_ms_*`, `ray_serve_deployment_processing_latency_ms_*`,
`ray_serve_batch_*`, ...) exist already; these add what only the app knows. Serve adds the deployment,
replica and application tags itself. `replica_metrics()` gives the one `ServeMetrics` of this process
(a module-level singleton here, because Serve ships the deployment class by value: a global assigned from
its methods would not be the one the FastAPI middleware reads).

Ray drops a gauge's series some seconds after its last `set`, so the replica re-marks the served version
on every poll tick (`serving`).
"""

from __future__ import annotations

LATENCY_MS_BUCKETS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64]


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
        self.model_version = Gauge("edp_model_version", "1 for the registered version this replica serves",
                                   tag_keys=("name", "version"))

    def request(self, route: str, status: int, ms: float) -> None:
        self.request_latency.observe(ms, tags={"route": route, "status": str(status)})

    def batch(self, size: int, ms: float, tokens: int) -> None:
        self.batch_size.observe(size)
        self.generation_latency.observe(ms)
        if tokens > 0:
            self.tokens.inc(tokens)

    def serving(self, name: str, version: str, old_version: str | None = None) -> None:
        """Mark `version` as served (1) and the swapped-out one as no longer served (0)."""
        if old_version is not None and old_version != version:
            self.model_version.set(0, tags={"name": name, "version": old_version})
        self.model_version.set(1, tags={"name": name, "version": version})


_replica_metrics: ServeMetrics | None = None


def replica_metrics() -> ServeMetrics:
    """This process's ServeMetrics, created on first use (inside a Serve replica)."""
    global _replica_metrics
    if _replica_metrics is None:
        _replica_metrics = ServeMetrics()
    return _replica_metrics
