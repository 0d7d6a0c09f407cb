"""Load: 20 read-only commands at once against a store being written neither fail nor block the run.

The writer is a real ``trecflow run configs/test.yaml --until pack`` subprocess on a fresh local
store (ingest and score on the local Ray, tokenizer, pack: each under its lease). Once it holds its
first lease, rounds of 20 readers start at once, each a real subprocess importing the CLI:
``status`` (text and ``--json``), ``predict --json`` and ``validate``, with Prefect's home and
MLflow's database pointed at a folder of their own. Every reader must exit 0 with its usual output
within `READER_SECONDS`; that folder must never appear (no Prefect or MLflow state); every lease in
the store must be the writer's (no reader took one); the store must hold exactly the writer's four
outputs, each committed, with the same fingerprints, counts and file checksums as the session's
``staged_test`` store computed without readers. The writer's wall time is printed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import CONFIGS, ROOT

READERS = 20
ROUNDS = 1  # rounds of READERS while the writer runs (each round after the first only if it still runs)
READER_SECONDS = 60.0  # one reader's limit: a reader that waits on a lease or the writer fails it
WRITER_SECONDS = 600.0
WRITTEN = ("ingest", "score", "tokenizer", "pack")
RECIPE = str(CONFIGS / "test.yaml")


def reader_commands() -> list[list[str]]:
    """The READERS commands of one round: 8 status (half --json), 6 predict --json, 6 validate."""
    status = [["status", RECIPE], ["status", RECIPE, "--json"]] * 4
    predict = [["predict", RECIPE, "--json"]] * 6
    validate = [["validate", RECIPE]] * 6
    commands = status + predict + validate
    assert len(commands) == READERS
    return commands


def check_reader(args: list[str], stdout: str, store_url: str) -> set[str]:
    """Assert a reader's output is its usual one; the states a status reader saw."""
    if args[0] == "validate":
        assert stdout.strip() == "ok: test: 48 steps of 512 tokens", stdout
        return set()
    if args[0] == "predict":
        payload = json.loads(stdout)
        assert payload["tau"] == pytest.approx(0.30, abs=0.01) and 0.0 < payload["valley_fraction"] < 1.0, payload
        return set()
    if "--json" in args:
        payload = json.loads(stdout)
        assert payload["recipe"] == "test" and payload["store"] == store_url, payload
        stages = {row["stage"]: row for row in payload["stages"]}
        assert set(WRITTEN) <= set(stages), stages
        assert stages["ingest"]["fingerprint"], stages["ingest"]  # known before anything is written
        return {row["state"] for row in payload["stages"]}
    assert stdout.startswith(f"recipe test, variant trec_valley, store {store_url}\n"), stdout  # the recipe declares no variants
    assert all(stage in stdout for stage in WRITTEN), stdout
    return set()


def lease_owners(store: Path) -> dict[str, int]:
    """Every lease file in the store: its path (relative) and its owner's pid."""
    return {str(path.relative_to(store)): json.loads(path.read_text())["owner"]["pid"] for path in store.rglob("_LEASE-*.json")}


def manifests(store: Path) -> dict[str, dict]:
    """``stage/fingerprint`` -> manifest of every committed output."""
    return {f"{path.parent.parent.name}/{path.parent.name}": json.loads(path.read_text()) for path in store.glob("*/*/_MANIFEST.json")}


def comparable(manifest: dict) -> dict:
    """What two runs of the same inputs must share: fingerprint, counts, and the checksum of every
    data file that has one (summary.json, data_card.md and plots carry timings or renderer
    metadata; score's shard names are Ray task ids, sizes and checksums of its classifier and
    pack's outputs name the content)."""
    files = {name: entry.get("sha256", entry["bytes"]) for name, entry in manifest["files"].items()
             if name not in ("summary.json", "data_card.md") and not name.endswith(".png") and not name.startswith("shards/")}
    return {"fingerprint": manifest["fingerprint"], "counts": manifest["counts"], "files": files}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_twenty_readers_neither_fail_nor_block_a_writing_run(staged_test, tmp_path):
    store = tmp_path / "store"
    writer_home = tmp_path / "writer"
    readers_home = tmp_path / "readers"  # must never be created
    base = {**os.environ, "TRECFLOW_STORE": str(store)}
    for key in ("AWS_ENDPOINT_URL", "PREFECT_API_URL", "RAY_ADDRESS", "TRECFLOW_EVENTS"):
        base.pop(key, None)
    writer_env = {**base, "PREFECT_HOME": str(writer_home / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{writer_home}/mlflow.db"}
    reader_env = {**base, "PREFECT_HOME": str(readers_home / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{readers_home}/mlflow.db"}
    writer_home.mkdir()

    began = time.perf_counter()
    writer = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", RECIPE, "--until", "pack"], cwd=ROOT, env=writer_env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        while not any(store.rglob("_LEASE-*.json")):  # the writer holds its first lease: the store is being written
            assert writer.poll() is None, writer.communicate()[0][-4000:]
            assert time.perf_counter() - began < WRITER_SECONDS, "the writer took no lease"
            time.sleep(0.2)
        first_lease = time.perf_counter() - began
        rounds, reader_pids, states, slowest = [], set(), set(), 0.0
        for _ in range(ROUNDS):
            if rounds and writer.poll() is not None:
                break
            started = time.perf_counter()
            readers = [(args, subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=reader_env,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                       for args in reader_commands()]
            writer_running = writer.poll() is None
            for args, reader in readers:
                reader_pids.add(reader.pid)
                stdout, stderr = reader.communicate(timeout=READER_SECONDS)
                assert reader.returncode == 0, (args, reader.returncode, stdout, stderr)
                states |= check_reader(args, stdout, str(store))
            slowest = max(slowest, time.perf_counter() - started)
            assert slowest < READER_SECONDS, slowest
            rounds.append((round(started - began, 1), round(time.perf_counter() - began, 1), writer_running))
        output, _ = writer.communicate(timeout=WRITER_SECONDS)
    finally:
        if writer.poll() is None:  # a failed check: the writer, its Prefect server and its local Ray
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
    wall = time.perf_counter() - began
    assert writer.returncode == 0, output[-4000:]
    print(f"writer (run --until pack) {wall:.1f} s; first lease at {first_lease:.1f} s; reader rounds (start s, end s, writer running at start): "
          f"{rounds}; slowest round {slowest:.1f} s; states the status readers saw: {sorted(states)}")
    assert rounds[0][2], "the first round of readers started after the writer had finished"
    assert states & {"leased", "partial", "missing", "unknown"}, states  # some reader saw the store mid-write

    # nothing from the readers: no Prefect or MLflow state, no lease
    assert not readers_home.exists(), sorted(str(path) for path in readers_home.rglob("*"))
    owners = lease_owners(store)
    assert owners and set(owners.values()) == {writer.pid}, (owners, writer.pid, reader_pids)
    # the store holds exactly the writer's outputs, each committed, as computed without readers
    written = manifests(store)
    assert sorted(key.split("/")[0] for key in written) == sorted(WRITTEN), sorted(written)
    from tasks.graph import GRAPH

    folders = {f"{stage}/{path.name}" for stage in GRAPH.names if (store / stage).is_dir() for path in (store / stage).iterdir()}
    assert folders == set(written), sorted(folders ^ set(written))  # no stage folder without a manifest
    for stage in ("score", "tokenizer", "pack"):
        expected = staged_test[stage].fingerprint
        assert f"{stage}/{expected}" in written, (stage, expected, sorted(written))
        reference = json.loads((Path(staged_test["store"].url) / stage / expected / "_MANIFEST.json").read_text())
        assert comparable(written[f"{stage}/{expected}"]) == comparable(reference), stage


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
