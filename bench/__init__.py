"""Benchmarks, run by `make bench` (`python -m bench`); each reports a ratio against a baseline
measured in the same run, since the machines are shared and noisy. `python -m bench NAME --smoke`
runs one at tiny sizes, as a check that it still runs (`tests/bench/test_bench.py`), not a measurement."""
