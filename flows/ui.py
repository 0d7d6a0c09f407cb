"""``trecflow ui``: the Prefect UI (with a worker and the local deployments) and the MLflow UI on loopback.

`serve_ui` starts, as child processes in their own process groups:

1. a Prefect server (``prefect server start``) with ``PREFECT_HOME`` from `trecflow.settings`, so its
   SQLite database is ``<PREFECT_HOME>/prefect.db`` (the one the embedded default uses, so runs made
   with ``trecflow run`` show up too); the first start migrates that database, which takes about a
   minute on 2 cores;
2. once its API answers ``/api/health``: the process work pool ``trecflow-local`` (if missing), the
   deployments of the project's ``prefect.yaml`` (``prefect --no-prompt deploy --all``, run from the
   project root), and a worker for the pool (``prefect worker start --type process``);
3. the MLflow UI (``mlflow server``) on the tracking database of `settings.tracking_uri`, new
   experiments' artifacts under ``<store>/mlflow`` (trecflow's own experiments keep theirs in
   ``<store>/mlflow/<experiment>``, fixed when `trecflow.tracking` created them). With
   ``MLFLOW_TRACKING_URI`` on an MLflow server (http/https), none starts: that server is the UI.

Every child inherits this process's environment (``TRECFLOW_HOME``, ``MLFLOW_TRACKING_URI``,
``TRECFLOW_STORE``, ``AWS_*`` ...) with ``PREFECT_API_URL`` pointing at the server, so a flow run the
worker launches uses the same store and tracking database as the CLI. Their output goes to log
files under ``<home>/ui-logs/``. Ctrl-C or SIGTERM stops the worker, the MLflow UI and the server
(each process group: SIGTERM, then SIGKILL after a grace period). A taken port is a `UIError`
before anything starts.

`running_ui` is the same as a context manager (the browser test uses it); `serve_ui` wraps it and
blocks until interrupted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from trecflow.redact import redact
from trecflow.settings import configure_environment, ensure_home, home, store_endpoint, store_url, tracking_uri

PROJECT_ROOT = Path(__file__).resolve().parent.parent
PREFECT_FILE = PROJECT_ROOT / "prefect.yaml"
WORK_POOL = "trecflow-local"
# A fresh server migrates its SQLite database first: about a minute on 2 idle cores, minutes on busy ones.
STARTUP_TIMEOUT_S = 600.0
STOP_GRACE_S = 15.0


class UIError(RuntimeError):
    """The UIs could not be started as asked (a taken port, a child that failed)."""


@dataclass
class Child:
    """A child process in its own process group, its output in ``log``."""

    name: str
    process: subprocess.Popen
    log: Path

    def exited(self) -> int | None:
        return self.process.poll()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    def failure(self, what: str) -> UIError:
        return UIError(f"{what}; the last lines of {self.log}:\n{self.log_tail()}")


@dataclass
class RunningUI:
    """What `running_ui` yields: the URLs, the log folder and the children."""

    prefect_url: str
    mlflow_url: str
    log_dir: Path
    deployments: list[str] = field(default_factory=list)
    children: list[Child] = field(default_factory=list)

    @property
    def prefect_api_url(self) -> str:
        return f"{self.prefect_url}/api"

    @property
    def mlflow_home(self) -> str:
        """The MLflow UI's experiments, in its "Model training" view (what a user opens)."""
        from trecflow.tracking import ui_url

        return ui_url(self.mlflow_url)

    def check(self) -> None:
        """Raise `UIError` if a child has exited."""
        for child in self.children:
            code = child.exited()
            if code is not None:
                raise child.failure(f"{child.name} exited with status {code}")

    def message(self) -> str:
        """The lines `serve_ui` prints once everything is up."""
        return (
            f"Prefect UI  {self.prefect_url}  (deployments {', '.join(self.deployments)}; "
            f"work pool {WORK_POOL}, one worker)\n"
            f"MLflow UI   {self.mlflow_home}\n"
            f"logs        {self.log_dir}\n"
            "Ctrl-C stops them all."
        )


def check_port_free(host: str, port: int, what: str, option: str) -> None:
    """A `UIError` naming the service and the option to change when ``host:port`` is taken."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # The servers set SO_REUSEADDR too, so a port in TIME_WAIT is not reported as taken.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UIError(
                f"port {port} on {host} is already in use ({error.strerror}): it is needed for the {what}; "
                f"stop what holds it or choose another with {option}"
            ) from None


def child_environment(prefect_api_url: str) -> dict[str, str]:
    """This process's environment, pointed at the started Prefect server.

    Absolute ``TRECFLOW_HOME``: the worker's flow runs change into the project root first."""
    env = dict(os.environ)
    env["TRECFLOW_HOME"] = str(home())
    env["PREFECT_API_URL"] = prefect_api_url
    env["PYTHONUNBUFFERED"] = "1"
    endpoint = store_endpoint()
    if endpoint:  # MLflow's S3 artifact repository reads this (as trecflow.tracking sets it)
        env.setdefault("MLFLOW_S3_ENDPOINT_URL", endpoint)
    return env


def start_child(name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path = PROJECT_ROOT, append: bool = False,
                kind: type[Child] | None = None) -> Child:
    """Start ``args`` in a new session (its own process group; a terminal's Ctrl-C reaches only us),
    its output to ``log`` (appended to with ``append``); ``kind``: a subclass of `Child` to return."""
    with open(log, "ab" if append else "wb") as sink:
        process = subprocess.Popen(
            args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    return (kind or Child)(name, process, log)


def group_alive(pgid: int) -> bool:
    """True while any process of the group ``pgid`` is alive."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_child(child: Child, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the child's process group, SIGKILL to what is left of it after ``grace_s``."""
    pgid = child.process.pid  # start_new_session: the child leads its group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        child.process.poll()
        if child.process.returncode is not None and not group_alive(pgid):
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(timeout=5)


def wait_until(ready: Callable[[], Any], child: Child | None, what: str, timeout_s: float, interval_s: float = 0.5,
               error: type[Exception] = UIError) -> Any:
    """Poll ``ready`` until it returns something truthy (returned); ``error`` (or the child's
    failure) naming ``what`` and the last error seen if ``child`` exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while True:
        try:
            value = ready()
            if value:
                return value
        except Exception as problem:  # noqa: BLE001 - not up yet (connection refused, 503, ...)
            last_error = problem
        if child is not None and child.exited() is not None:
            raise child.failure(f"{child.name} exited with status {child.exited()} before {what}")
        if time.monotonic() > deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            if child is not None:
                raise child.failure(f"{what}: not after {timeout_s:.0f} s{detail}")
            raise error(f"{what}: not after {timeout_s:.0f} s{detail}")
        time.sleep(interval_s)


def http_ok(url: str) -> bool:
    """True when ``url`` answers 200 within 5 s."""
    import httpx

    return httpx.get(url, timeout=5).status_code == 200


def _prefect_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "prefect", *args]


def run_prefect_command(args: list[str], env: dict[str, str], log: Path, what: str, timeout_s: float) -> None:
    """Run a one-shot Prefect CLI command to completion (output appended to ``log``)."""
    with open(log, "ab") as sink:
        sink.write(f"\n$ {' '.join(args)}\n".encode())
        sink.flush()
        try:
            completed = subprocess.run(
                args, cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        except subprocess.TimeoutExpired:
            raise UIError(f"{what}: no result after {timeout_s:.0f} s (see {log})") from None
    if completed.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise UIError(f"{what} failed (status {completed.returncode}); the last lines of {log}:\n{tail}")


def ensure_work_pool(api_url: str) -> bool:
    """Create the process work pool (Prefect's default process job template) unless it exists;
    True if it was created. Over HTTP: a ``prefect work-pool create`` would cost a CLI start."""
    import httpx
    from prefect.workers.process import ProcessWorker

    if httpx.get(f"{api_url}/work_pools/{WORK_POOL}", timeout=30).status_code == 200:
        return False
    body = {
        "name": WORK_POOL,
        "type": "process",
        "description": "trecflow's local deployments (prefect.yaml); `trecflow ui` starts its worker",
        "base_job_template": ProcessWorker.get_default_base_job_template(),
    }
    response = httpx.post(f"{api_url}/work_pools/", json=body, timeout=30)
    if response.status_code == 409:  # created meanwhile
        return False
    if response.status_code >= 400:
        raise UIError(f"creating the work pool {WORK_POOL} failed: {response.status_code} {response.text}")
    return True


def worker_online(api_url: str) -> bool:
    """Whether a worker of the pool has sent a heartbeat."""
    import httpx

    response = httpx.post(f"{api_url}/work_pools/{WORK_POOL}/workers/filter", json={}, timeout=10)
    return response.status_code == 200 and any(worker.get("status") == "ONLINE" for worker in response.json())


@contextlib.contextmanager
def running_ui(
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    host: str = "127.0.0.1",
    progress: Callable[[str], object] = print,
    prefect_file: str | Path | None = None,
    startup_timeout_s: float = STARTUP_TIMEOUT_S,
) -> Iterator[RunningUI]:
    """Start the Prefect server, the deployments, a worker and the MLflow UI; yield a `RunningUI`
    (``prefect_url``, ``mlflow_url``, ``prefect_api_url``, ``log_dir``); stop them all on exit.

    ``prefect_file`` replaces the project's ``prefect.yaml`` (its entrypoints are still relative to
    the project root, where ``prefect deploy`` runs). ``progress`` gets one line per step."""
    import yaml

    configure_environment()
    ensure_home()
    # MLflow tracking on a server already has its UI there; a local one starts on a database only.
    remote_tracking = tracking_uri().startswith(("http://", "https://"))
    if prefect_port == mlflow_port and not remote_tracking:
        raise UIError(f"the Prefect and MLflow UIs need two ports, both were {prefect_port}")
    check_port_free(host, prefect_port, "Prefect server", "--prefect-port")
    if not remote_tracking:
        check_port_free(host, mlflow_port, "MLflow UI", "--mlflow-port")
    prefect_file = Path(prefect_file or PREFECT_FILE).resolve()
    try:
        deployments = [entry["name"] for entry in yaml.safe_load(prefect_file.read_text())["deployments"]]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as error:
        raise UIError(f"{prefect_file}: no deployments to apply ({error})") from None

    url_host = f"[{host}]" if ":" in host else host
    ui = RunningUI(
        f"http://{url_host}:{prefect_port}",
        tracking_uri().rstrip("/") if remote_tracking else f"http://{url_host}:{mlflow_port}",
        home() / "ui-logs",
        deployments,
    )
    ui.log_dir.mkdir(parents=True, exist_ok=True)
    env = child_environment(ui.prefect_api_url)
    started = time.monotonic()

    def elapsed() -> str:
        return f"{time.monotonic() - started:.0f} s"

    try:
        progress(
            f"starting the Prefect server on {ui.prefect_url} (database in {os.environ['PREFECT_HOME']}; "
            "a first start migrates it, about a minute)"
        )
        server = start_child(
            "Prefect server",
            _prefect_cli("server", "start", "--host", host, "--port", str(prefect_port), "--analytics-off"),
            env,
            ui.log_dir / "prefect-server.log",
        )
        ui.children.append(server)

        if remote_tracking:
            progress(f"MLflow tracking is the server {ui.mlflow_url}: no local MLflow UI")
            mlflow_ui = None
        else:
            progress(f"starting the MLflow UI on {ui.mlflow_url} (tracking {redact(tracking_uri())})")
            mlflow_ui = start_mlflow_ui(host, mlflow_port, env, ui.log_dir / "mlflow.log")
            ui.children.append(mlflow_ui)

        wait_until(lambda: http_ok(f"{ui.prefect_api_url}/health"), server, "the Prefect API answering", startup_timeout_s)
        progress(f"Prefect server up ({elapsed()})")

        if ensure_work_pool(ui.prefect_api_url):
            progress(f"created the process work pool {WORK_POOL}")
        progress(f"starting a worker for {WORK_POOL}; applying the deployments of {prefect_file} (imports the flows)")
        worker = start_child(
            "Prefect worker",
            _prefect_cli(
                "worker", "start", "--pool", WORK_POOL, "--type", "process", "--limit", "1",
                "--name", f"trecflow-ui-{os.getpid()}", "--no-create-pool-if-not-found",
            ),
            env,
            ui.log_dir / "prefect-worker.log",
        )
        ui.children.append(worker)
        deploy_log = ui.log_dir / "prefect-deploy.log"
        deploy_log.write_bytes(b"")
        run_prefect_command(
            _prefect_cli("--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)),
            env, deploy_log, "prefect deploy", startup_timeout_s,
        )
        progress(f"deployments applied ({elapsed()})")

        if mlflow_ui is not None:
            wait_until(lambda: http_ok(f"{ui.mlflow_url}/health"), mlflow_ui, "the MLflow UI answering", startup_timeout_s)
            progress(f"MLflow UI up ({elapsed()})")
        wait_until(lambda: worker_online(ui.prefect_api_url), worker, "the worker polling its pool", startup_timeout_s)
        progress(f"worker online ({elapsed()})")
        yield ui
    finally:
        if ui.children:
            progress("stopping the " + ", ".join(child.name for child in reversed(ui.children)))
        with _signals_held():
            for child in reversed(ui.children):  # the worker first, the server last
                stop_child(child)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while the children stop (a second Ctrl-C must not orphan them)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def start_mlflow_ui(host: str, port: int, env: dict[str, str], log: Path) -> Child:
    """``mlflow server`` on the tracking database; experiments created in the UI keep their
    artifacts under ``<store>/mlflow`` (trecflow's own: ``<store>/mlflow/<experiment>``)."""
    from trecflow.store import Store

    artifact_root = Store(store_url(), store_endpoint()).uri("mlflow")
    args = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", tracking_uri(),
        "--default-artifact-root", artifact_root,
        "--no-serve-artifacts",  # clients write to the store themselves; the UI reads it
        "--host", host, "--port", str(port), "--workers", "1",
    ]
    # No GenAI job runner (seven huey consumers on 2 cores): the runs pages need none of it.
    return start_child("MLflow UI", args, {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **env}, log)


def serve_ui(
    prefect_port: int = 4200,
    mlflow_port: int = 5000,
    host: str = "127.0.0.1",
    on_ready: Callable[[str], object] = print,
    progress: Callable[[str], object] = print,
) -> None:
    """Run `running_ui` until Ctrl-C or SIGTERM (or until a child dies: `UIError`).

    ``on_ready`` gets the URLs (several lines) once everything answers; ``progress`` one line per
    start-up step. Raises `UIError` for a taken port or a failed start (its message is for users).

    ``trecflow ui`` (flows/cli.py) calls it with ``typer.echo`` for both and turns `UIError` into exit 1.
    """

    def terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, through running_ui's cleanup
        raise KeyboardInterrupt

    # SIGINT too: a shell starting us in the background leaves it ignored, and Ctrl-C must work.
    previous = {signum: signal.signal(signum, terminate) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running_ui(prefect_port, mlflow_port, host, progress=progress) as ui:
            on_ready(ui.message())
            while True:
                ui.check()
                time.sleep(1.0)
    except KeyboardInterrupt:
        progress("stopped")
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
