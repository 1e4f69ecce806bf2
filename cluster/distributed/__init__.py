"""Distributed execution on Ray: `ddp` (Ray Train around the plain-PyTorch Trainer) and `tuning` (YAML sweeps on
Ray Tune)."""
