"""`python -m bench [NAME ...] [--smoke]`: run the named benchmarks (default: all but ``gpu``, which
needs a CUDA device for its measurements and runs only when named).

``--smoke`` runs each at tiny sizes: the same code paths and the same printed figures, as a check
that the benchmarks still run (`tests/bench/test_bench.py`); its numbers are not measurements. What
is left of a smoke's time is fixed start-up: imports, the local Ray, scoring actors, Ray Train
workers. ``make bench`` runs them all at full size. Benchmarks named together run in one process:
`train` and `reevaluate` then stage their shared recipe once (`bench_train.shared_staging`)."""

import sys

from bench import bench_gpu, bench_load, bench_place, bench_predict, bench_reevaluate, bench_score, bench_train

BENCHMARKS = {
    "predict": bench_predict.run,
    "score": bench_score.run,
    "place": bench_place.run,
    "train": bench_train.run,
    "reevaluate": bench_reevaluate.run,
    "gpu": bench_gpu.run,
    "load": bench_load.run,
}
ONLY_WHEN_NAMED = ("gpu",)
USAGE = f"usage: python -m bench [NAME ...] [--smoke]; NAME in {', '.join(BENCHMARKS)}"


def main(argv: list[str]) -> None:
    smoke = "--smoke" in argv
    options = [arg for arg in argv if arg.startswith("-")]
    if any(option not in ("--smoke", "-h", "--help") for option in options):
        sys.exit(f"unknown option(s) {[o for o in options if o != '--smoke']}; {USAGE}")
    if "-h" in options or "--help" in options:
        print(USAGE)
        return
    names = [arg for arg in argv if not arg.startswith("-")]
    names = names or [name for name in BENCHMARKS if name not in ONLY_WHEN_NAMED]
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        sys.exit(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    with bench_train.shared_staging():  # train and reevaluate stage the same recipe once
        for name in names:
            BENCHMARKS[name](smoke=smoke)


if __name__ == "__main__":
    main(sys.argv[1:])
