"""A crash of the driver in every stage: `trecflow run configs/test.yaml --variant uniform` as a
subprocess, SIGKILLed in ingest, scoring, packing, the tiny base's pretraining, placement, training
and re-evaluation in turn (each rerun killed in the next stage; where a stage keeps partial work,
once some exists), then a last rerun that completes. Checked after each kill: the killed stage has
no manifest. The killed run's local Ray goes with it, except Ray's two agents, which linger for a
minute or two: after a grace period for the others, what is left of the session is killed by exact
PID (processes of the run's own Ray session folder) and reported. Checked after each
rerun: what was committed before was reused, not computed again; the dead driver's lease was taken
over at once (its process is gone), never waited for; the partial work was continued (ingest
files not read again, training resumed from a checkpoint, re-evaluation and reference-loss parts
not rewritten). At the end the results equal the fault-free twins the suite builds anyway:
score shards, tokenizer, packed tokens and the sample index byte for byte (``staged_test``,
``trainable``), the final training loss within 1e-4 (``trained_test``), the TREC curve within
1e-6 (``compared_test``'s uniform re-evaluation). The runs carry planted credentials (fake AWS
keys, MLflow tokens: `tests.secret_scan`), found nowhere they wrote. Load: once the first run holds
its first lease, a round of 20 read-only commands (`tests.readers`) starts against the store;
they all answer, see stages mid-write, leave no Prefect or MLflow state, and take no lease (every
lease file is a run's), while no run ever waits on a lease."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow.parquet as pq
import pytest

from trecflow.store import Store

from ..conftest import CONFIGS, ROOT
from ..readers import MID_WRITE, ReaderRound
from ..secret_scan import PLANTED, scan

pytestmark = pytest.mark.slow

KILLS = ("ingest", "score", "pack", "base", "place", "train", "reevaluate")  # in the graph's order
RUN_SECONDS = 600  # one run of the pipeline, at most
GRACE_SECONDS = 5.0  # how long a killed run's Ray processes get to end by themselves


def read_events(path: Path) -> list[dict]:
    """The complete JSON lines of an event log (a line being written is left for the next look)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines(keepends=True):
        if line.endswith("\n"):
            records.append(json.loads(line))
    return records


def started(records: list[dict], stage: str, depth: int = 0) -> dict | None:
    return next((r for r in records if r["kind"] == "started" and r["stage"] == stage and r["depth"] == depth), None)


def registered_checkpoint(store: Path, fingerprint: str) -> bool:
    """Whether Ray Train has registered a checkpoint of the run (what a new ``fit`` resumes from)."""
    snapshot = store / "checkpoints" / fingerprint / "ray" / "checkpoint_manager_snapshot.json"
    try:
        return json.loads(snapshot.read_text()).get("latest_checkpoint_result") is not None
    except (OSError, ValueError):  # not there yet, or being written
        return False


def files(folder: Path, pattern: str) -> dict[str, tuple[int, bytes]]:
    """``pattern``'s files under ``folder``: relative name -> (mtime in ns, content)."""
    return {str(path.relative_to(folder)): (path.stat().st_mtime_ns, path.read_bytes()) for path in sorted(folder.glob(pattern))}


def kill_point(stage: str, store: Path) -> Callable[[list[dict]], dict | None]:
    """When to kill a run in ``stage``: the stage's ``started`` event once the partial work it keeps
    exists (ingest: a file's pass-1 marker; the base's pretraining and training: a registered
    checkpoint; re-evaluation: a step part); the others as soon as they start."""

    def point(records: list[dict]) -> dict | None:
        if stage == "base":  # the tiny base's pretraining: the train stage of the derived run
            record = started(records, "train", depth=1)
            return record if record and registered_checkpoint(store, record["fingerprint"]) else None
        record = started(records, stage)
        if record is None:
            return None
        folder = store / stage / record["fingerprint"]
        if not any(folder.glob("_LEASE-*.json")):  # not computing yet (a started stage first takes the lease)
            return None
        if stage == "ingest":
            return record if any((folder / "_work" / "read").glob("*.json")) else None
        if stage == "train":
            return record if registered_checkpoint(store, record["fingerprint"]) else None
        if stage == "reevaluate":
            return record if any((folder / "steps").glob("part-*.parquet")) else None
        return record

    return point


AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")  # outlive their raylet for a minute or two


def session_processes(ray_dir: Path) -> dict[int, str]:
    """The processes of the Ray session under ``ray_dir`` (this run's own folder), PID -> command:
    those whose command line names it (raylet, GCS) or that hold a file open in it (workers and
    agents, which rename their command line to ``ray::...``)."""
    mine = {}
    prefix = str(ray_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes()
            if prefix.encode() in command or any(os.readlink(fd).startswith(prefix) for fd in (entry / "fd").iterdir()):
                mine[int(entry.name)] = command.split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return mine


class Runs:
    """`trecflow run` subprocesses on one home and store, each with its own event log, output and
    Ray session folder."""

    def __init__(self, tmp_path: Path, recipe: Path, env: dict[str, str], ray_root: Path, readers: ReaderRound):
        self.tmp_path, self.recipe, self.env, self.ray_root, self.readers = tmp_path, recipe, env, ray_root, readers
        self.store = Path(env["TRECFLOW_STORE"])
        self.count = 0
        self.pids: set[int] = set()
        self.readers_started = False
        self.walls: list[tuple[str, float]] = []  # (the stage a run was killed in, or "complete"; its wall seconds)
        self.left_behind: dict[str, list[str]] = {}  # killed stage -> what of its Ray session was killed by PID

    def start(self) -> tuple[subprocess.Popen, Path, Path, Path]:
        self.count += 1
        events, log, ray_dir = (self.tmp_path / f"events-{self.count}.jsonl", self.tmp_path / f"run-{self.count}.log",
                                self.ray_root / f"r{self.count}")
        ray_dir.mkdir()
        env = {**self.env, "TRECFLOW_EVENTS": str(events), "RAY_TMPDIR": str(ray_dir)}
        argv = [sys.executable, "-m", "flows.cli", "run", str(self.recipe), "--variant", "uniform"]
        with log.open("w") as out:
            process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.pids.add(process.pid)
        return process, events, log, ray_dir

    def kill_in(self, stage: str) -> tuple[list[dict], dict, Path]:
        """A run SIGKILLed at `kill_point`; its events, the record of the stage's start and its log."""
        process, events, log, ray_dir = self.start()
        point = kill_point(stage, self.store)
        began = time.monotonic()
        deadline = began + RUN_SECONDS
        while (record := point(read_events(events))) is None:
            if not self.readers_started and any(self.store.rglob("_LEASE-*.json")):  # the store is being written
                self.readers.start()
                self.readers_started = True
            assert process.poll() is None, f"the run ended ({process.returncode}) before {stage} could be killed:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"{stage} never reached its kill point:\n{log.read_text()[-3000:]}"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        self.walls.append((stage, round(time.monotonic() - began, 1)))
        self.reap(stage, ray_dir)
        return read_events(events), record, log

    def reap(self, stage: str, ray_dir: Path) -> None:
        """Wait (at most `GRACE_SECONDS`) for the killed run's Ray processes other than Ray's two
        agents to end (they go with the driver); then kill what is left of the session by PID and
        record it."""
        deadline = time.monotonic() + GRACE_SECONDS
        left = session_processes(ray_dir)
        while any(not command.encode().startswith(AGENTS) for command in left.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
            left = session_processes(ray_dir)
        killed = []
        for pid, command in left.items():
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(command)
            except ProcessLookupError:
                continue
        self.left_behind[stage] = killed

    def complete(self) -> tuple[list[dict], Path]:
        process, events, log, _ = self.start()
        began = time.monotonic()
        assert process.wait(timeout=RUN_SECONDS) == 0, log.read_text()[-5000:]
        self.walls.append(("complete", round(time.monotonic() - began, 1)))
        return read_events(events), log


def outcome(records: list[dict]) -> dict[tuple[int, str, str], tuple[str, str]]:
    """(depth, stage, target) -> (how it ended: finished or reused, fingerprint) for the stage runs
    of a run's events that ended."""
    return {(r["depth"], r["stage"], r["target"]): (r["kind"], r["fingerprint"]) for r in records if r["kind"] in ("finished", "reused")}


def same_bytes(ours: Store, theirs: Store, stage: str, fingerprint: str, prefixes: tuple[str, ...]) -> int:
    """Assert the files of the two outputs whose names start with ``prefixes`` are byte-identical;
    returns how many were compared."""
    listed = {name for name in ours.output(stage, fingerprint).manifest()["files"] if name.startswith(prefixes)}
    assert listed == {name for name in theirs.output(stage, fingerprint).manifest()["files"] if name.startswith(prefixes)}, stage
    for name in sorted(listed):
        assert ours.fs.cat_file(ours.output(stage, fingerprint).file_path(name)) == theirs.fs.cat_file(theirs.output(stage, fingerprint).file_path(name)), (stage, name)
    return len(listed)


def pipeline_env(tmp_path: Path, corpus_home: Path, api_url: str) -> tuple[Path, dict[str, str]]:
    """configs/test.yaml reading the corpus under ``corpus_home``, and the environment of its runs:
    their own home, store and MLflow database, the Prefect API at ``api_url``."""
    recipe = tmp_path / "test.yaml"
    recipe.write_text((CONFIGS / "test.yaml").read_text().replace("${TRECFLOW_HOME}", str(corpus_home)))
    home = tmp_path / "home"
    base_env = {key: value for key, value in os.environ.items() if not key.startswith(("TRECFLOW_", "PREFECT_", "MLFLOW_", "RAY_"))}
    planted = {name: value for name, value in PLANTED.items() if name.isupper()}  # fake AWS keys and MLflow tokens (the store is a folder)
    return recipe, {**base_env, **planted, "PYTHONPATH": str(ROOT), "TRECFLOW_HOME": str(home), "TRECFLOW_STORE": str(tmp_path / "store"),
                    "PREFECT_API_URL": api_url, "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}


def kill_in_turn(runs: Runs) -> dict[str, str]:
    """A run killed in each of `KILLS` in turn, then one that completes, checked as the module
    docstring says; returns the fingerprint of each stage of the run's own target."""
    store = runs.store
    committed: dict[tuple[int, str, str], str] = {}  # stage runs committed so far -> fingerprint
    previous: tuple[str, dict, dict] | None = None  # (stage killed, its start record, what it had kept)
    for stage in (*KILLS, None):
        if stage is not None:
            records, record, log = runs.kill_in(stage)
        else:
            records, log = runs.complete()
        ended = outcome(records)
        # what was committed before was reused, never computed again; no lease was waited for
        for key, fingerprint in committed.items():
            if key in ended:
                assert ended[key] == ("reused", fingerprint), (stage, key, ended[key])
        assert not [r for r in records if r["kind"] == "waiting"], (stage, [r["message"] for r in records if r["kind"] == "waiting"])
        if previous is not None:
            check_continued(previous, records, log.read_text(), store)
        if stage is not None:  # it really was killed in the middle: the stage has no manifest
            killed_stage = "train" if stage == "base" else stage
            assert not Store(str(store)).output(killed_stage, record["fingerprint"]).exists(), stage
            previous = (stage, record, kept_work(stage, record, store))
        committed.update({key: fingerprint for key, (kind, fingerprint) in ended.items()})
    return {stage: fingerprint for (depth, stage, target), fingerprint in committed.items() if depth == 0}


@pytest.mark.timeout(3600)  # the fault-free twins (the session's compare among them) may be built in its setup
def test_a_driver_killed_in_every_stage_in_turn_reruns_to_the_results_of_an_uninterrupted_run(
        prefect_harness, test_corpus, trained_test, compared_test, tmp_path):
    import prefect.settings

    corpus_home = test_corpus["stdlib-docs"].parent.parent.parent  # the twins read ${TRECFLOW_HOME}/corpus/test of the session
    recipe, env = pipeline_env(tmp_path, corpus_home, prefect.settings.PREFECT_API_URL.value())
    ray_root = Path(tempfile.mkdtemp(prefix="rk", dir="/tmp"))  # short: Ray's socket paths live under it
    readers = ReaderRound(str(recipe), env["TRECFLOW_STORE"], env, tmp_path / "readers", written=("ingest", "score", "tokenizer", "pack"))
    runs = Runs(tmp_path, recipe, env, ray_root, readers)
    began = time.monotonic()
    try:
        final = kill_in_turn(runs)
        seconds = time.monotonic() - began
        states = readers.finish()
        assert states & MID_WRITE, states  # some reader saw the store mid-write
        owners = {str(path.relative_to(runs.store)): json.loads(path.read_text())["owner"]["pid"] for path in runs.store.rglob("_LEASE-*.json")}
        assert owners and set(owners.values()) <= runs.pids, (owners, runs.pids, readers.pids)  # no reader took a lease
        # the planted credentials appear nowhere the eight runs wrote: the home (MLflow's database),
        # the store (manifests, summaries, MLflow's artifacts), the runs' output and event logs,
        # their Ray sessions, and the Prefect server's database (parameters, logs, artifacts); nor
        # in what the readers printed
        prefect_db = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
        outputs = {f"reader {index}: {' '.join(args)}": stdout + stderr for index, (args, _, stdout, stderr) in enumerate(readers.results)}
        scanned = scan([tmp_path, ray_root, prefect_db.parent], texts=outputs)
        print(f"\nsecret scan of the crashed and rerun pipeline: {scanned.files} files ({scanned.bytes:,} bytes), {len(scanned.hits)} hits")
        assert scanned.files > 100 and scanned.hits == [], scanned.hits
    finally:
        shutil.rmtree(ray_root, ignore_errors=True)

    ours = Store(str(runs.store))
    twins = trained_test["store"]
    # byte for byte what the fault-free stage tests computed
    for stage, prefixes in (("score", ("shards/",)), ("tokenizer", ("tokenizer.json",)), ("pack", ("tokens/", "sequences/")),
                            ("place", ("index/", "composition.npy"))):
        assert final[stage] == trained_test[stage].fingerprint, stage
        assert same_bytes(ours, twins, stage, final[stage], prefixes) > 0, stage
    summary = json.loads(ours.output("train", final["train"]).read_bytes("summary.json"))
    assert summary["final_loss"] == pytest.approx(trained_test["train"].summary.final_loss, abs=1e-4)
    # the TREC curve of the session's (fault-injected, uninterrupted) compare
    theirs = Store(compared_test["env"]["TRECFLOW_STORE"], compared_test["env"]["AWS_ENDPOINT_URL"])
    assert compared_test["result"]["outcomes"]["uniform"]["reevaluate"]["fingerprint"] == final["reevaluate"]
    expected = pq.read_table(io.BytesIO(theirs.fs.cat_file(theirs.output("reevaluate", final["reevaluate"]).file_path("trec.parquet"))))
    measured = pq.read_table(ours.output("reevaluate", final["reevaluate"]).file_path("trec.parquet"))
    assert measured.column_names == expected.column_names and measured.num_rows == expected.num_rows == 48
    for name in measured.column_names:  # numbers, and lists of numbers (the trimmed curve per beta)
        np.testing.assert_allclose(np.asarray(measured[name].to_pylist(), dtype=float), np.asarray(expected[name].to_pylist(), dtype=float),
                                   rtol=0, atol=1e-6, equal_nan=True, err_msg=name)
    print(f"\ndriver crash: {len(KILLS)} kills and a last run in {seconds:.0f} s; what was left of each killed run's Ray "
          f"session, killed by PID: {runs.left_behind}; each run's wall s: {runs.walls}; {len(readers.results)} readers in {readers.seconds:.1f} s saw {sorted(states)}")


def kept_work(stage: str, record: dict, store: Path) -> dict:
    """What the killed stage had kept when it was killed (to check the rerun continues it)."""
    folder = store / ("train" if stage == "base" else stage) / record["fingerprint"]
    if stage == "ingest":
        return {"markers": sorted(path.name for path in (folder / "_work" / "read").glob("*.json"))}
    if stage == "reevaluate":
        return {"parts": files(folder, "steps/part-*.parquet"), "reference": files(store / "refcache", "*/part-*.parquet")}
    return {}


def check_continued(previous: tuple[str, dict, dict], records: list[dict], output: str, store: Path) -> None:
    """The rerun after a kill in ``previous``'s stage took the dead driver's lease over at once and
    continued its partial work."""
    stage, record, kept = previous
    killed_stage = "train" if stage == "base" else stage
    notes = [r["message"] for r in records if r["kind"] == "note" and r["stage"] == killed_stage and r["depth"] == record["depth"]]
    resumable = killed_stage in ("ingest", "train", "reevaluate")
    assert any(f"{killed_stage}: took over" in note and "which is gone; " + ("continuing what it left" if resumable else "starting over") in note
               for note in notes), (stage, notes)
    ended = outcome(records)
    assert ended.get((record["depth"], killed_stage, record["target"])) == ("finished", record["fingerprint"]), stage
    folder = store / killed_stage / record["fingerprint"]
    if stage == "ingest":
        markers = kept["markers"]
        assert f"ingest: read: {len(markers)} of 2 files from an earlier attempt" in output, output[-3000:]
    elif stage in ("base", "train"):
        summary = json.loads((folder / "summary.json").read_text())
        assert summary["resumed_from_step"] is not None and summary["resumed_from_step"] > 0, (stage, summary)
    elif stage == "reevaluate":
        parts = kept["parts"]
        assert parts and all(files(folder, name) == {name: parts[name]} for name in parts)  # kept, not rewritten
        assert f", {len(parts)} kept from an earlier attempt" in output, output[-3000:]
        now = files(store / "refcache", "*/part-*.parquet")
        assert kept["reference"] and all(now.get(name) == value for name, value in kept["reference"].items())
