"""Entrypoints for `ray job submit -- python -m cluster.jobs.<name>`."""
