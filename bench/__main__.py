"""`python -m bench [NAME ...]`: run the named benchmarks (default: all but ``gpu``, which needs a
CUDA device and runs only when named)."""

import sys

from bench import bench_gpu, bench_place, bench_predict, bench_reevaluate, bench_score, bench_train

BENCHMARKS = {
    "predict": bench_predict.run,
    "score": bench_score.run,
    "place": bench_place.run,
    "train": bench_train.run,
    "reevaluate": bench_reevaluate.run,
    "gpu": bench_gpu.run,
}
ONLY_WHEN_NAMED = ("gpu",)

if __name__ == "__main__":
    names = sys.argv[1:] or [name for name in BENCHMARKS if name not in ONLY_WHEN_NAMED]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    for name in names:
        BENCHMARKS[name]()
