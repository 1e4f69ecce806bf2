"""Entrypoints for `ray job submit -- python -m cluster.jobs.<name>` (train, sweep); `runner.run_job` is what
both share."""
