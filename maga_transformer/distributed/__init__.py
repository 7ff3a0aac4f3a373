"""Tensor parallelism: settings (parallel_config.py), the per-rank split and collectives a model
uses (tensor_parallel.py), the process group (group.py), worker processes (worker.py)."""
