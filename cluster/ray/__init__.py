"""Ray execution: `train` (Ray Train around the plain-PyTorch Trainer) and `tune` (sweeps from YAML on Ray Tune).

Imports inside this package are absolute, so `import ray` still names Ray itself.
"""
