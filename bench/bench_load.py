"""load: the peak memory of ``trecflow compare`` on the embedded default against the number of
variants N and how many run at once K, against one variant measured in the same run.

Each point is a real ``trecflow compare configs/test.yaml --overlay
configs/overlays/eight-variants.yaml --variants <the first N> --max-concurrent K --json``
subprocess (its own Prefect temporary server and local Ray, as a user's), on a store where the
shared stages (ingest, score, tokenizer, pack, prediction, base model, held-out set) are already
complete: a first, unmeasured compare of one variant stages them. Every point sets its own
``curriculum.seed``, so its placements, trainings and re-evaluations are computed, not reused.

Memory: the peak over the whole command of the summed PSS (proportional set size: shared pages
counted once over the processes sharing them; `trecflow.memory`) and summed RSS of the command's
process and every process under it (Prefect's server, the local Ray's GCS, raylet, Ray Train's
controller and helper actors, the DeepSpeed workers, the re-evaluation actors), sampled every 0.5 s
by this process. The compare's own figure (the ``peak_memory`` of its ``--json``, MLflow metric
``peak_pss_mb`` of the comparison run) covers only while the variants ran.

Points (full): N = 1; N = 2, 4, 8 all at once (K = N, what a concurrent compare did before the
bound); N = 8 at the default bound (K = the local Ray's CPUs / one training's CPUs); N = 2 one
after another (K = 1). The ratios are peak(N, K) / peak(1).

``TRECFLOW_BENCH_LOAD_HOME``: a folder kept between runs (the staging is then reused, and each
compare's log stays there) instead of a temporary one.

Smoke mode (``python -m bench load --smoke``): one compare of one variant on a cold store (its peak
includes the shared stages), its row printed; no ratio, not a measurement.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = "configs/test.yaml"
OVERLAY = "configs/overlays/eight-variants.yaml"
HOME_ENV = "TRECFLOW_BENCH_LOAD_HOME"  # set: the benchmark's home is this folder, kept (its store staged once)


def variant_names() -> list[str]:
    from trecflow.recipe import load_recipe

    return list(load_recipe(ROOT / RECIPE, [str(ROOT / OVERLAY)]).curriculum.variants)


def default_bound(variants: list[str]) -> int:
    """The K `flows.compare.concurrency` picks for a concurrent compare of ``variants`` here."""
    from flows.compare import concurrency
    from flows.params import Comparison
    from trecflow.recipe import load_recipe

    recipe = load_recipe(ROOT / RECIPE, [str(ROOT / OVERLAY)])
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        return concurrency(Comparison(recipe_path=RECIPE, overlays=[OVERLAY], variants=variants, concurrent=True), recipe, variants)
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved


def compare_point(home: Path, variants: list[str], at_once: int, seed: int) -> dict:
    """One ``trecflow compare`` subprocess, its process tree sampled: wall time, peak PSS/RSS
    (MiB), most processes, and the compare's own ``peak_memory``."""
    from trecflow.memory import PeakMemory

    env = {**os.environ, "TRECFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db"}
    for key in ("TRECFLOW_STORE", "RAY_ADDRESS", "PREFECT_API_URL", "AWS_ENDPOINT_URL"):
        env.pop(key, None)
    command = [sys.executable, "-m", "flows.cli", "compare", RECIPE, "--overlay", OVERLAY, "--variants", ",".join(variants),
               "--max-concurrent", str(at_once), "--set", f"curriculum.seed={seed}", "--json"]
    log = home / f"compare-n{len(variants)}-k{at_once}-seed{seed}.log"
    began = time.perf_counter()
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
        with PeakMemory(process.pid) as memory:
            stdout, _ = process.communicate()
    wall = time.perf_counter() - began
    if process.returncode != 0:
        raise RuntimeError(f"compare exited {process.returncode} (N={len(variants)}, K={at_once}); its log: {log}\n{log.read_text()[-3000:]}")
    objects = [line for line in stdout.splitlines() if line.startswith('{"recipe"')]  # the --json object (other lines may reach stdout)
    if not objects:
        raise RuntimeError(f"compare printed no JSON object (N={len(variants)}, K={at_once}); its stdout:\n{stdout[-3000:]}\nits log: {log}")
    result = json.loads(objects[-1])
    peak = memory.result
    assert [row["variant"] for row in result["variants"]] == variants, result["variants"]
    assert all(row["val_loss_hq"] is not None for row in result["variants"]), result["variants"]
    return {"n": len(variants), "k": at_once, "wall": wall, "pss": None if peak.pss is None else peak.pss / 2**20,
            "rss": peak.rss / 2**20, "processes": peak.processes, "own": result["peak_memory"], "reported_k": result["max_concurrent"]}


def row_text(label: str, point: dict) -> str:
    own = point["own"]
    own_pss = "-" if own["peak_pss_mb"] is None else f"{own['peak_pss_mb']:,.0f}"
    pss = "-" if point["pss"] is None else f"{point['pss']:,.0f}"
    return (f"  {label:<22} {point['n']:>2} {point['k']:>2} {point['wall']:>8.0f} {pss:>10} {point['rss']:>10,.0f} "
            f"{point['processes']:>6} {own_pss:>10}")


def run(smoke: bool = False) -> None:
    from tests.corpus_builder import build_test_corpus

    names = variant_names()
    bound = default_bound(names)
    kept = os.environ.get(HOME_ENV)  # a folder kept between runs: the staging and the logs stay
    home = Path(kept) if kept else Path(tempfile.mkdtemp(prefix="bench-load-"))
    home.mkdir(parents=True, exist_ok=True)
    try:
        if not (home / "corpus" / "test").is_dir():
            build_test_corpus(home / "corpus" / "test")
        print(f"load{'_smoke' if smoke else ''}: {RECIPE} + {OVERLAY} ({len(names)} variants: {', '.join(names)}); "
              f"{os.cpu_count()} cores, the local Ray with {os.cpu_count() + 2} logical CPUs; default bound K = {bound}"
              f"{' (smoke: tiny sizes, not a measurement)' if smoke else ''}", flush=True)
        points: list[tuple[str, dict]] = []
        began = time.perf_counter()
        if smoke:
            plan = [("one variant (staged)", names[:1], 1)]
        else:
            staging = compare_point(home, names[:1], 1, seed=1000)
            print(f"  staging (cold store, one variant, not a point): {staging['wall']:.0f} s, peak PSS {staging['pss'] or 0:,.0f} MiB", flush=True)
            plan = [("N=1", names[:1], 1), ("default bound", names[:8], bound), ("all at once", names[:8], 8), ("all at once", names[:2], 2),
                    ("all at once", names[:4], 4), ("one after another", names[:2], 1)]
        run_id = int(time.time()) % 100000 * 100  # seeds of their own: a kept home's earlier runs are not reused
        for seed, (label, variants, at_once) in enumerate(plan, start=run_id + 1):
            point = compare_point(home, variants, at_once, seed)
            points.append((label, point))
            print(f"  ... {label}: N={point['n']}, K={point['k']}: {point['wall']:.0f} s, peak PSS {point['pss'] or 0:,.0f} MiB", flush=True)
        print(f"  {'point':<22} {'N':>2} {'K':>2} {'wall s':>8} {'peak PSS':>10} {'peak RSS':>10} {'procs':>6} {'flow PSS':>10}  (MiB)")
        for label, point in points:
            print(row_text(label, point))
        one = points[0][1]
        for label, point in points[1:]:
            pss_ratio = point["pss"] / one["pss"] if point["pss"] and one["pss"] else float("nan")
            print(f"  ratio peak PSS N={point['n']} K={point['k']} / N=1  {pss_ratio:8.2f}   "
                  f"RSS {point['rss'] / one['rss']:.2f}   ({label})")
        wide = [point for _, point in points if point["k"] > 1]
        if len(wide) >= 2 and all(point["pss"] for point in wide):  # a line through the all-at-once points: base + K x per-variant
            import numpy as np

            slope, intercept = np.polyfit([point["k"] for point in wide], [point["pss"] for point in wide], 1)
            print(f"  fit over K > 1: peak PSS = {intercept:,.0f} + {slope:,.0f} x K MiB")
        print(f"  total {time.perf_counter() - began:.0f} s")
    finally:
        if not kept:
            shutil.rmtree(home, ignore_errors=True)
