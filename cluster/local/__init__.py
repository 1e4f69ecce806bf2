"""The platform on one machine: `processes` (spawn, supervise, stop; ports; HTTP health), `services` (MLflow,
SeaweedFS S3, Ray head, Prometheus), `stack` (`edp stack`: state dir, up / status / down / logs) and `serve`
(`edp serve` from a Serve config file)."""
