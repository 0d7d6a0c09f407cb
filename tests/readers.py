"""Read-only commands against a store being written (issue 16, load): a round of `READERS` real
subprocesses importing the CLI at once, ``status`` (text and ``--json``), ``predict --json`` and
``validate`` of configs/test.yaml (or a copy of it), with Prefect's home and MLflow's database
pointed at a folder that must never appear.

`ReaderRound.start` launches them without waiting; `ReaderRound.finish` waits, and asserts that
every reader exited 0 with its usual output within `READER_SECONDS` and that the folder was never
created. The writing run's own checks (it never waited on a lease; every lease file is a writer's)
belong to the test that drives it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from .conftest import ROOT

READERS = 20
READER_SECONDS = 60.0  # one round's limit: a reader that waits on a lease or on the writer fails it
MID_WRITE = {"leased", "partial", "missing", "unknown"}  # states `status` gives a stage not yet committed


def reader_commands(recipe: str) -> list[list[str]]:
    """The READERS commands of one round: 8 status (half --json), 6 predict --json, 6 validate."""
    status = [["status", recipe], ["status", recipe, "--json"]] * 4
    predict = [["predict", recipe, "--json"]] * 6
    validate = [["validate", recipe]] * 6
    commands = status + predict + validate
    assert len(commands) == READERS
    return commands


def check_reader(args: list[str], stdout: str, store_url: str, written: tuple[str, ...]) -> set[str]:
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
        assert set(written) <= set(stages), stages
        assert stages["ingest"]["fingerprint"], stages["ingest"]  # known before anything is written
        return {row["state"] for row in payload["stages"]}
    assert stdout.startswith(f"recipe test, variant trec_valley, store {store_url}\n"), stdout  # the recipe declares no variants
    assert all(stage in stdout for stage in written), stdout
    return set()


class ReaderRound:
    """One round of readers of ``recipe`` on the store ``store_url``; ``env`` is the writer's
    environment, from which the readers drop Prefect's API and events, and get a Prefect home and
    MLflow database under ``never`` (a folder that must not exist afterwards)."""

    def __init__(self, recipe: str, store_url: str, env: dict[str, str], never: Path, written: tuple[str, ...]):
        self.recipe, self.store_url, self.never, self.written = recipe, store_url, never, written
        self.env = {key: value for key, value in env.items() if key not in ("PREFECT_API_URL", "TRECFLOW_EVENTS", "RAY_ADDRESS")}
        self.env.update({"TRECFLOW_STORE": store_url, "PREFECT_HOME": str(never / "prefect"), "MLFLOW_TRACKING_URI": f"sqlite:///{never}/mlflow.db"})
        self.results: list[tuple[list[str], int, str, str]] = []
        self.seconds = 0.0
        self.pids: set[int] = set()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Launch the round; a thread collects the readers' output as they end."""
        began = time.perf_counter()
        readers = [(args, subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=self.env,
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
                   for args in reader_commands(self.recipe)]
        self.pids = {reader.pid for _, reader in readers}

        def collect() -> None:
            for args, reader in readers:
                try:
                    stdout, stderr = reader.communicate(timeout=max(1.0, READER_SECONDS - (time.perf_counter() - began)))
                except subprocess.TimeoutExpired:
                    reader.kill()
                    stdout, stderr = reader.communicate()
                    stderr += f"\n(killed after {READER_SECONDS:.0f} s)"
                self.results.append((args, reader.returncode, stdout, stderr))
            self.seconds = time.perf_counter() - began

        self._thread = threading.Thread(target=collect, name="readers", daemon=True)
        self._thread.start()

    def finish(self) -> set[str]:
        """Wait for the round and check it; the states the status readers saw."""
        assert self._thread is not None, "the round never started"
        self._thread.join(READER_SECONDS + 30)
        assert len(self.results) == READERS, f"{len(self.results)} of {READERS} readers ended"
        states: set[str] = set()
        for args, code, stdout, stderr in self.results:
            assert code == 0, (args, code, stdout, stderr)
            states |= check_reader(args, stdout, self.store_url, self.written)
        assert self.seconds < READER_SECONDS, self.seconds
        assert not self.never.exists(), sorted(str(path) for path in self.never.rglob("*"))  # no Prefect or MLflow state
        return states
