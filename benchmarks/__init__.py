"""Benchmarks of mqtt-pairing: `scripts/bench` (python -m benchmarks.run) writes the report."""
