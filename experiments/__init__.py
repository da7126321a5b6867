"""The paper's experiments, CPU-sized: ``python -m experiments.run_all`` (docs/experiments.md)."""
