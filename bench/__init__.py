"""Benchmarks, run by `make bench` (`python -m bench`); each reports a ratio against a baseline
measured in the same run, since the machines are shared and noisy."""
