"""Experiment tracking on MLflow: `runs` (tracking URI, nested runs, rank-0 logging), `sweeps` (a sweep's parent
run and its children's bookkeeping), `reports` (plots, the ablation table, the best child) and `promotion` (the
registry's champion and rollback)."""
