"""Benchmarks of the pipeline on CPU (see bench/README.md), run from the repository root as
``python -m bench.<name>``, e.g. ``python -m bench.train_throughput --quick``."""
