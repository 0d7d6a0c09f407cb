"""Prefect's temporary server does not outlive the command that started it.

Without ``PREFECT_API_URL``, a flow run started by the CLI runs against a temporary Prefect server,
a ``uvicorn … prefect.server.api.server:create_app`` child that Prefect stops when the command
exits. A command killed outright (SIGKILL, the OOM killer) cannot stop it, and it ran on, a port
and ~250 MB held, until someone found its PID. `watch_this_process` marks this process's
environment with a token (inherited by every process it starts from then on, the temporary server
included) and starts a small watchdog child (``python -m trecflow.reaper TOKEN``) that the kernel
signals when this process ends (Linux's ``PR_SET_PDEATHSIG``); it then stops every temporary
server that carries the token. Elsewhere than Linux it starts nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

SERVER_MARK = "prefect.server.api.server:create_app"  # in the temporary server's command line
TOKEN_VARIABLE = "TRECFLOW_REAPER_TOKEN"
STOP_SECONDS = 5.0  # how long a server gets to end after SIGTERM before SIGKILL

_watchdog: subprocess.Popen | None = None


def watch_this_process() -> subprocess.Popen | None:
    """Mark this process's environment and start its watchdog (once; None where the platform has
    no parent-death signal). Call it from the main thread before Prefect starts its server: the
    kernel signals the watchdog when the thread that started it ends."""
    global _watchdog
    if _watchdog is None and sys.platform.startswith("linux"):
        token = f"{os.getpid()}-{time.time_ns()}"
        os.environ[TOKEN_VARIABLE] = token
        _watchdog = subprocess.Popen([sys.executable, "-m", "trecflow.reaper", token], preexec_fn=_signal_me_when_parent_dies,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, close_fds=True)
    return _watchdog


def _signal_me_when_parent_dies() -> None:  # runs in the child, before exec
    import ctypes

    # blocked (the mask survives exec) until `watch` has its handler: a parent killed while the
    # watchdog starts up leaves the signal pending instead of ending the watchdog
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def marked_servers(token: str) -> list:
    """The running temporary Prefect servers whose environment carries ``token`` (psutil processes)."""
    import psutil

    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            if SERVER_MARK in " ".join(process.info["cmdline"] or ()) and process.environ().get(TOKEN_VARIABLE) == token:
                found.append(process)
        except psutil.Error:  # ended meanwhile, or not ours to read
            continue
    return found


def watch(token: str, parent_pid: int) -> list[int]:
    """Wait until the parent ends (SIGTERM from the kernel, or this process reparented), then stop
    the temporary servers that carry ``token``; their PIDs."""
    import psutil

    ended = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: ended.set())
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    while os.getppid() == parent_pid and not ended.wait(1.0):  # reparented: the parent died before the signal was armed
        pass
    servers = marked_servers(token)
    for server in servers:
        try:
            server.terminate()
        except psutil.NoSuchProcess:
            continue
    _, alive = psutil.wait_procs(servers, timeout=STOP_SECONDS)
    for server in alive:
        try:
            server.kill()
        except psutil.NoSuchProcess:
            continue
    return [server.pid for server in servers]


if __name__ == "__main__":
    watch(sys.argv[1], int(sys.argv[1].split("-", 1)[0]))  # the token starts with the parent's PID
