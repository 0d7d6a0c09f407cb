"""`python -m bench [NAME ...]`: run the named benchmarks (default: all)."""

import sys

from bench import bench_place, bench_predict, bench_score

BENCHMARKS = {"predict": bench_predict.run, "score": bench_score.run, "place": bench_place.run}

if __name__ == "__main__":
    names = sys.argv[1:] or list(BENCHMARKS)
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    for name in names:
        BENCHMARKS[name]()
