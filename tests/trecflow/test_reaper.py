"""A command killed outright takes Prefect's temporary server with it (`trecflow.reaper`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from trecflow.reaper import SERVER_MARK

from ..conftest import CONFIGS, ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")


def wait_for(condition, what: str, timeout_s: float = 60.0):
    deadline = time.monotonic() + timeout_s
    while not (value := condition()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout_s:.0f} s"
        time.sleep(0.1)
    return value


def running(process: psutil.Process) -> bool:
    return process.is_running() and process.status() != psutil.STATUS_ZOMBIE


def servers(pid: int) -> list[psutil.Process]:
    return [child for child in psutil.Process(pid).children() if SERVER_MARK in " ".join(child.cmdline())]


def test_the_watchdog_stops_the_server_children_of_a_killed_parent_and_nothing_else():
    """A parent with three children: a temporary server started after the watchdog (it carries the
    token), one that looks like a server but carries no token (another command's), and another
    process. SIGKILLed, its watchdog stops the first alone."""
    code = ("import subprocess, sys, time\n"
            "from trecflow.reaper import watch_this_process\n"
            "watch_this_process()\n"
            f"server = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {SERVER_MARK!r}])\n"
            f"stranger = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)', {SERVER_MARK!r}], env={{}})\n"
            "other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
            "print(server.pid, stranger.pid, other.pid, flush=True)\n"
            "time.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    server, stranger, other = (psutil.Process(int(pid)) for pid in parent.stdout.readline().split())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        wait_for(lambda: not running(server), "the server child stopped", 15)
        time.sleep(0.5)
        assert running(stranger) and running(other)
    finally:
        for process in (server, stranger, other):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.usefixtures("test_corpus")
def test_a_killed_run_leaves_no_temporary_prefect_server(tmp_path):
    """`trecflow run` without PREFECT_API_URL, SIGKILLed once Prefect's temporary server is up:
    the server is gone within seconds."""
    env = {key: value for key, value in os.environ.items() if key != "PREFECT_API_URL"}
    env.update({"PREFECT_HOME": str(tmp_path / "prefect"), "TRECFLOW_STORE": str(tmp_path / "store"),
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", str(CONFIGS / "test.yaml"), "--until", "ingest"], cwd=ROOT, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        (server,) = wait_for(lambda: servers(run.pid), "the run's temporary Prefect server", 120)
        run.send_signal(signal.SIGKILL)
        run.wait()
        wait_for(lambda: not running(server), "the server stopped", 15)
    finally:
        if run.poll() is None:
            run.kill()
