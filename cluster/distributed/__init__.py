"""Distributed execution on Ray: `ddp` (Ray Train around the plain-PyTorch Trainer), `session` (what a worker
needs of Ray Train or Tune), `tuning` (YAML sweeps on Ray Tune) and `placement` (a sweep's resources against the
cluster, no Ray)."""
