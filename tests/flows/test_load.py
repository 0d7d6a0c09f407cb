"""Load: how many variants a compare runs at once, and what its memory figure measures. (The 20
read-only commands against a store being written run inside the driver crash test,
`tests/flows/test_driver_crash.py`, with `tests.readers`; the peak memory of 8 variants is
`python -m bench load`.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from ..conftest import CONFIGS, ROOT

RECIPE = str(CONFIGS / "test.yaml")


# --- how many variants a compare runs at once, and what its memory figure measures -------------


def test_concurrency_is_bounded_by_the_local_rays_cpus_unless_set(monkeypatch):
    from flows.compare import concurrency
    from flows.params import Comparison
    from trecflow.ray_runtime import local_cpus
    from trecflow.recipe import load_recipe

    recipe = load_recipe(CONFIGS / "test.yaml", [str(CONFIGS / "overlays" / "eight-variants.yaml")])
    variants = list(recipe.curriculum.variants)
    assert len(variants) == 8
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert local_cpus() == 4
    assert concurrency(Comparison(), recipe, variants) == 1  # one machine: one after another
    assert concurrency(Comparison(concurrent=True), recipe, variants) == 2  # 4 CPUs / (2 workers x 1 CPU)
    assert concurrency(Comparison(max_concurrent=3), recipe, variants) == 3  # a bound above 1 means concurrent
    assert concurrency(Comparison(max_concurrent=20), recipe, variants) == 8
    assert concurrency(Comparison(concurrent=False, max_concurrent=3), recipe, variants) == 1
    wide = load_recipe(CONFIGS / "test.yaml", [str(CONFIGS / "overlays" / "eight-variants.yaml")], ["training.workers=8"])
    assert concurrency(Comparison(concurrent=True), wide, variants) == 1  # a training wider than the local Ray: still 1
    monkeypatch.setattr(os, "cpu_count", lambda: 62)
    assert concurrency(Comparison(concurrent=True), recipe, variants) == 8  # 64 CPUs hold all 8 trainings
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert concurrency(Comparison(), recipe, variants) == 8  # a cluster's Ray queues the jobs: all at once
    assert concurrency(Comparison(max_concurrent=2), recipe, variants) == 2


def test_compare_refuses_a_bound_below_one_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    from ..conftest import assert_refused

    monkeypatch.setenv("TRECFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = CliRunner().invoke(app, ["compare", RECIPE, "--variants", "uniform,end", "--max-concurrent", "0"])
    assert_refused(result, "--max-concurrent: must be at least 1, got 0", tmp_path / "store", tmp_path / "mlflow.db")


def test_peak_memory_sums_the_process_tree():
    """A child holding 200 MiB of its own pages: the tree's peak PSS and RSS count it, once."""
    from trecflow.memory import PeakMemory, tree_memory

    import psutil

    size = 200 * 2**20
    child = subprocess.Popen([sys.executable, "-c", f"import sys, time; block = bytearray({size}); block[::4096] = b'x' * len(block[::4096]); "
                              "print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        with PeakMemory(interval=0.1) as memory:
            assert child.stdout.readline().strip() == "ready"
            time.sleep(0.3)
        rss, pss, count = tree_memory(psutil.Process())
    finally:
        child.kill()
        child.wait()
    peak = memory.result
    assert count >= 2 and peak.processes >= 2 and peak.samples >= 2
    assert size <= peak.pss <= peak.rss, peak
    assert peak.rss < rss + size + 100 * 2**20, (peak, rss)  # counted once, not per sample
    metrics = peak.as_metrics()
    assert metrics["peak_pss_mb"] == pytest.approx(peak.pss / 2**20) and metrics["peak_rss_mb"] >= 200
    assert "MiB" in peak.text() and f"{peak.processes} processes" in peak.text()


# --- readers stay light -----------------------------------------------------------------------

HEAVY = ("torch", "transformers", "ray", "prefect", "mlflow", "deepspeed")


def test_status_of_a_store_with_outputs_imports_no_torch(staged_test):
    """With score and tokenizer complete, status computes the tiny base's fingerprint (its Llama
    config's arguments) without importing transformers or torch (~4 s of CPU and 300 MB each)."""
    code = ("import json, sys\nfrom flows.cli import app\napp(['status', sys.argv[1], '--json'], standalone_mode=False)\n"
            f"print(json.dumps(sorted(name for name in {HEAVY!r} if name in sys.modules)))")
    env = {**os.environ, "TRECFLOW_STORE": staged_test["store"].url}
    result = subprocess.run([sys.executable, "-c", code, RECIPE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    status, imported = result.stdout.strip().splitlines()
    stages = {row["stage"]: row for row in json.loads(status)["stages"]}
    assert stages["tokenizer"]["state"] == "complete" and stages["base"]["fingerprint"], stages["base"]
    assert json.loads(imported) == [], imported


def test_the_tiny_llama_arguments_are_what_llamaconfig_holds():
    """The base fingerprint hashes `tiny_llama_args`; it must equal what LlamaConfig keeps of them."""
    from trecflow.recipe import TinyModelSection
    from training.models import tiny_llama_args, tiny_llama_config

    for section in (TinyModelSection(hidden=64, intermediate=256, layers=2, heads=4), TinyModelSection(hidden=96, intermediate=384, layers=3, heads=6, kv_heads=2)):
        args = tiny_llama_args(section, 1024, 0, 64)
        config = tiny_llama_config(section, 1024, 0, 64)
        assert {key: getattr(config, key) for key in args} == args


def test_the_comparison_text_ends_with_the_peak_memory_and_what_it_covers(monkeypatch):
    from flows.cli import format_comparison

    result = {"variants": [{"variant": "uniform", "val_loss_hq": 6.7, "val_loss_general": 6.8, "trec_pearson": 0.4, "trec_valley_measured": 0.2,
                            "hq_window": None, "content_confounded": False}],
              "outcomes": {"uniform": {"seconds": {"train": 80.2}}}, "max_concurrent": 2,
              "peak_memory": {"peak_rss_mb": 4557.0, "peak_pss_mb": 3152.3, "peak_processes": 19, "samples": 100}}
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert format_comparison(result).splitlines()[-1] == ("peak memory (2 variant(s) at once; this process and the processes under it, the local Ray's "
                                                          "included): PSS 3,152 MiB, RSS 4,557 MiB, 19 processes at most")
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    result["peak_memory"]["peak_pss_mb"] = None
    assert "the cluster's Ray work not included): PSS unknown, RSS 4,557 MiB" in format_comparison(result)
