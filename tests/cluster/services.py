"""A cluster in a box: the services of trecflow's production path, as child processes on loopback.

`start_box` starts, each in its own folder under one temporary root:

- a Ray cluster of two nodes, ``ray start --block`` each (the head with the dashboard and its job
  server, then one worker node); the pytest process never joins it (``ray.init``), it talks to the
  job server and the state API over HTTP;
- an MLflow tracking server whose artifacts go through it to ``s3://<bucket>/mlflow`` on moto;
- a Prefect server and a process work pool with one ``prefect worker start`` (the stand-in for
  the Kubernetes worker);

moto's S3 server is the session's (tests/conftest.py ``s3_endpoint``), with a bucket of the box's.

Every child gets the environment a pod would get from the ConfigMap ``trecflow-env`` and the
Secret ``trecflow-s3`` (`ClusterBox.cluster_env`), never the pytest process's AWS credentials:
its secret key is the recognizable `CANARY_SECRET`, so a test can assert that it appears in no
Ray job's metadata or runtime environment while the nodes themselves can read it. Every child
(and whatever it starts: Ray workers, job drivers, flow-run processes) carries `BOX_MARKER` in its
environment, which `stop_box` uses to reap anything left once the process groups are killed.

The helpers for the end-to-end tests: `ray_nodes`/`wait_for_ray_nodes`, `kill_worker_node` /
`restart_worker_node`, `deploy`, `start_deployment`/`wait_for_flow_run`/`run_deployment_and_wait`,
`flow_run_processes`/`kill_flow_run`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from flows import ui

from ..conftest import ROOT, free_port

BIN = Path(sys.executable).parent

CANARY_ACCESS_KEY = "trecflow-box-access-key"
CANARY_SECRET = "trecflow-canary-SECRET-do-not-leak"
BOX_MARKER = "TRECFLOW_CLUSTER_BOX"
WORK_POOL = "trecflow-box"
REGION = "us-east-1"

# Logical CPUs (the machine may have 2 cores): the training job's two 1-CPU workers, placed with
# SPREAD, take one on each node, its driver one on the head; after the worker node is lost the
# head still holds the driver and both workers.
HEAD_CPUS = 4
WORKER_CPUS = 2
# A custom resource of the worker node (1 unit): a task or actor asking for a little of it
# (``resources={WORKER_RESOURCE: 0.01}``) runs there.
WORKER_RESOURCE = "box_worker_node"
HEAD_OBJECT_STORE_BYTES = 200 * 1024**2
WORKER_OBJECT_STORE_BYTES = 100 * 1024**2

# What a Ray job's runtime_env working_dir leaves out of the repository (see .gitignore).
WORKING_DIR_EXCLUDES = [
    ".venv", ".git", ".trecflow", "**/__pycache__", "*.egg-info", ".pytest_cache", "build",
    "mlruns", "mlartifacts", "mlflow.db", "*.png",
]

STARTUP_TIMEOUT_S = 240.0
STOP_GRACE_S = 5.0

# Environment variables of the pytest process that must not leak into the box's children: each
# child gets exactly the box's settings for these.
_SCRUBBED_PREFIXES = ("AWS_", "MLFLOW_", "PREFECT_", "TRECFLOW_", "RAY_")


class BoxError(RuntimeError):
    """A service of the box did not start or misbehaved."""


# --------------------------------------------------------------------------- child processes


class Child(ui.Child):
    """A child process leading its own process group, its output in ``log`` (`flows.ui.Child`)."""

    @property
    def pid(self) -> int:
        return self.process.pid

    def failure(self, what: str) -> BoxError:
        return BoxError(f"{self.name}: {what}; the last lines of {self.log}:\n{self.log_tail(40)}")


def start_child(name: str, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> Child:
    cwd.mkdir(parents=True, exist_ok=True)
    return ui.start_child(name, args, env, log, cwd, append=True, kind=Child)


def kill_group(child: Child, grace_s: float = STOP_GRACE_S, sig: int = signal.SIGTERM) -> None:
    """``sig`` to the child's process group, SIGKILL to what is left of it after ``grace_s``."""
    pgid = child.pid
    if sig != signal.SIGKILL:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and ui.group_alive(pgid):
            child.process.poll()
            time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.process.wait(timeout=10)


def marked_processes(marker: str) -> list:
    """Processes (not this one) whose environment has ``BOX_MARKER=marker``."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        if process.pid == os.getpid():
            continue
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get(BOX_MARKER) == marker:
                found.append(process)
    return found


def reap(marker: str, timeout_s: float = 10.0) -> list[str]:
    """SIGKILL every process still carrying ``marker``; their descriptions."""
    import psutil

    killed = []
    for process in marked_processes(marker):
        with contextlib.suppress(psutil.Error):
            killed.append(f"{process.pid} {' '.join(process.cmdline())[:120]}")
            process.kill()
    psutil.wait_procs([p for p in marked_processes(marker)], timeout=timeout_s)
    return killed


def log_tails(log_dir: Path, lines: int = 15) -> str:
    """The last lines of every log of the box (for failure messages: the folder is removed)."""
    parts = []
    for log in sorted(log_dir.glob("*.log")):
        text = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(parts)


def group_cpu_seconds(child: Child) -> float:
    """CPU seconds (user + system) used so far by the child's process group (live processes and
    the children they reaped)."""
    import psutil

    total = 0.0
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if os.getpgid(process.pid) == child.pid:
                times = process.cpu_times()
                total += times.user + times.system + times.children_user + times.children_system
    return total


def wait_until(ready: Callable[[], Any], what: str, timeout_s: float, child: Child | None = None, interval_s: float = 0.25):
    """`flows.ui.wait_until` with `BoxError`: ``ready``'s first truthy value."""
    return ui.wait_until(ready, child, what, timeout_s, interval_s, error=BoxError)


# --------------------------------------------------------------------------- the box


@dataclass(frozen=True)
class ClusterBox:
    """What the ``cluster_box`` fixture yields (see the module docstring).

    ``env``: the environment of the Prefect worker, and so of every flow run it starts: the pod
    settings (``cluster_env``) plus ``PREFECT_API_URL`` and ``RAY_ADDRESS`` (the head's dashboard,
    for the Jobs API). ``cluster_env``: what every "pod" gets (Ray nodes, MLflow, worker): the
    store, the S3 endpoint and the canary credentials, MLflow's URI and S3 endpoint."""

    root: Path
    log_dir: Path
    marker: str
    # S3 (moto)
    s3_endpoint: str
    bucket: str
    store: str
    access_key: str
    secret: str
    # Ray
    ray_gcs_address: str
    ray_dashboard: str
    ray_temp_dir: Path
    ray_worker_temp_dir: Path
    head_cpus: int
    worker_cpus: int
    # MLflow
    mlflow_uri: str
    mlflow_artifacts: str
    mlflow_dir: Path
    # Prefect
    prefect_url: str
    prefect_api_url: str
    work_pool: str
    env: dict[str, str]
    cluster_env: dict[str, str]
    timings: dict[str, float]
    services: "Services" = field(repr=False, compare=False)

    def s3_client(self):
        """A boto3 S3 client on moto with the box's (canary) credentials."""
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.s3_endpoint, region_name=REGION,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret,
        )

    def s3_keys(self, prefix: str = "") -> list[str]:
        """Every key of the box's bucket under ``prefix``."""
        paginator = self.s3_client().get_paginator("list_objects_v2")
        return [item["Key"] for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix) for item in page.get("Contents", [])]

    def check(self) -> None:
        """`BoxError` if a service process has exited."""
        self.services.check()


@dataclass
class Services:
    """The box's children and what restarting the worker node needs."""

    root: Path
    log_dir: Path
    marker: str
    ray_head: Child | None = None
    ray_worker: Child | None = None
    mlflow: Child | None = None
    prefect_server: Child | None = None
    prefect_worker: Child | None = None
    ray_worker_args: list[str] = field(default_factory=list)
    ray_worker_env: dict[str, str] = field(default_factory=dict)
    worker_starts: int = 0

    def children(self) -> list[Child]:
        # the order they stop in: the worker first (its flow runs), the servers last
        return [c for c in (self.prefect_worker, self.prefect_server, self.mlflow, self.ray_worker, self.ray_head) if c is not None]

    def check(self) -> None:
        for child in self.children():
            if child is self.ray_worker:  # a fault test may have killed it
                continue
            code = child.exited()
            if code is not None:
                raise child.failure(f"exited with status {code}")


def _base_env(marker: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(_SCRUBBED_PREFIXES)}
    env.pop("PYTHONPATH", None)  # nothing finds the checkout except through its own means
    # the virtualenv first on PATH, as in the image: a job's `python` entrypoint is the venv's
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    env.update({BOX_MARKER: marker, "PYTHONUNBUFFERED": "1"})
    return env


def _ray_node_args(gcs_port: int, cpus: int, object_store: int, temp_dir: Path, head: bool, **ports: int) -> list[str]:
    args = [str(BIN / "ray"), "start", "--block", "--disable-usage-stats", "--node-ip-address", "127.0.0.1",
            "--num-cpus", str(cpus), "--num-gpus", "0", "--object-store-memory", str(object_store),
            "--temp-dir", str(temp_dir), "--dashboard-agent-listen-port", str(free_port())]
    if head:
        args += ["--head", "--port", str(gcs_port), "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                 "--dashboard-port", str(ports["dashboard"]), "--ray-client-server-port", str(ports["client"])]
    else:
        # Its own temp dir, as a separate machine has: nodes sharing one session folder share
        # runtime_resources/, and the worker node's agent unpacking a job's working_dir there
        # replaces the folder the job's driver runs in on the head (its cwd vanishes).
        args += ["--address", f"127.0.0.1:{gcs_port}"]
    return args


def _head_started(head: Child) -> bool:
    return "Ray runtime started" in head.log.read_text(errors="replace")


def start_ray_head(services: Services, env: dict[str, str], temp_dir: Path, cwd: Path, attempts: int = 3) -> tuple[int, int]:
    """Start the head (``ray start --head``) until its node is registered ("Ray runtime
    started"); a start that gives up first is made again with fresh ports, up to ``attempts``.
    Returns (GCS port, dashboard port)."""
    for attempt in range(1, attempts + 1):
        gcs_port, dashboard_port, client_port = free_port(), free_port(), free_port()
        services.ray_head = start_child(
            "Ray head",
            _ray_node_args(gcs_port, HEAD_CPUS, HEAD_OBJECT_STORE_BYTES, temp_dir, True, dashboard=dashboard_port, client=client_port),
            env, services.log_dir / ("ray-head.log" if attempt == 1 else f"ray-head-{attempt}.log"), cwd,
        )
        try:
            wait_until(lambda: _head_started(services.ray_head), "the Ray head node started", STARTUP_TIMEOUT_S, services.ray_head)
            return gcs_port, dashboard_port
        except BoxError:
            if services.ray_head.exited() is None or attempt == attempts:
                raise
            kill_group(services.ray_head, grace_s=0, sig=signal.SIGKILL)
    raise AssertionError("unreachable")


def start_box(s3_endpoint: str, bucket: str = "trecflow-box", progress: Callable[[str], object] = print) -> ClusterBox:
    """Start every service (concurrently where one does not need another) and return the box.

    On failure everything started is stopped before the error propagates."""
    root = Path(tempfile.mkdtemp(prefix="trecflow-box-"))
    log_dir = root / "logs"
    log_dir.mkdir()
    marker = root.name
    services = Services(root, log_dir, marker)
    timings: dict[str, float] = {}
    started = time.monotonic()
    try:
        box = _start(services, s3_endpoint, bucket, timings, started)
    except BaseException as error:
        stop_box_services(services)
        logs = log_tails(log_dir)
        shutil.rmtree(root, ignore_errors=True)
        if isinstance(error, BoxError):
            raise BoxError(f"{error}\n\nthe box's logs:\n{logs}") from None
        raise
    cpu = {child.name: group_cpu_seconds(child) for child in services.children()}
    progress(
        "cluster box up in {:.1f} s: ".format(timings["total"])
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in timings.items() if name != "total")
        + "; CPU seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, seconds in cpu.items())
        + f"; Ray worker node starts: {services.worker_starts} (root {root})"
    )
    return box


def _start(services: Services, s3_endpoint: str, bucket: str, timings: dict[str, float], started: float) -> ClusterBox:
    import boto3

    root, log_dir, marker = services.root, services.log_dir, services.marker
    store = f"s3://{bucket}/store"
    mlflow_artifacts = f"s3://{bucket}/mlflow"
    mlflow_port, prefect_port = free_port(), free_port()
    ray_temp = root / "ray"  # the head's; short paths: Ray's socket paths must fit 107 bytes
    ray_worker_temp = root / "ray-w"
    mlflow_uri = f"http://127.0.0.1:{mlflow_port}"
    prefect_url = f"http://127.0.0.1:{prefect_port}"
    prefect_api_url = f"{prefect_url}/api"

    boto3.client(
        "s3", endpoint_url=s3_endpoint, region_name=REGION,
        aws_access_key_id=CANARY_ACCESS_KEY, aws_secret_access_key=CANARY_SECRET,
    ).create_bucket(Bucket=bucket)

    # What every pod gets from the ConfigMap trecflow-env and the Secret trecflow-s3
    # (infra/k8s/configmap.yaml), here pointing at the box.
    cluster_env = {
        "TRECFLOW_STORE": store,
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_ACCESS_KEY_ID": CANARY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": CANARY_SECRET,
        "MLFLOW_TRACKING_URI": mlflow_uri,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "PREFECT_API_URL": prefect_api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "true",
        # loopback only: no token (the cluster uses RAY_AUTH_MODE=token from a Secret)
        "RAY_AUTH_MODE": "disabled",
    }
    base = _base_env(marker)

    def home(name: str) -> Path:
        path = root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    # Ray nodes. The GCS's health checks: a killed node refuses them at once and is declared dead
    # after `failure_threshold` checks 3 s apart; a node alive but starved of CPU answers late, and
    # each late answer costs a 10 s timeout. Ray's threshold of 5 declared a live node dead under
    # the suite's load on 2 cores (its training job then restarted); 10 still finds a killed node
    # within ~30 s. Tighter settings declared the head itself dead.
    ray_env = {
        **base, **cluster_env, "TRECFLOW_HOME": str(home("ray-home")),
        "RAY_health_check_failure_threshold": "10",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_worker_niceness": "0",  # as trecflow.ray_runtime: nice-15 workers starve on 2 cores
    }
    t0 = time.monotonic()
    # The Ray head first, alone for its first seconds: `ray start` gives up when its raylet has
    # not registered with the GCS within 30 s (Ray's fixed limit), which four Python services
    # starting at once on 2 busy cores exceeded. Once it has ("Ray runtime started"), the others
    # start while its dashboard still comes up.
    gcs_port, dashboard_port = start_ray_head(services, ray_env, ray_temp, home("ray-head"))
    ray_dashboard = f"http://127.0.0.1:{dashboard_port}"
    timings["ray head registered"] = time.monotonic() - t0
    mlflow_env = {**base, **cluster_env, "TRECFLOW_HOME": str(home("mlflow-home")), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow_dir = home("mlflow")
    services.mlflow = start_child(
        "MLflow server",
        [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}", "--artifacts-destination", mlflow_artifacts],
        mlflow_env, log_dir / "mlflow.log", mlflow_dir,
    )
    prefect_server_home = home("prefect-server")
    prefect_server_env = {
        **base, "PREFECT_HOME": str(prefect_server_home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "false",
        # runs are created by the tests (as a UI click would); nothing scheduled, nothing late
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
        "PREFECT_SERVER_SERVICES_DB_VACUUM_ENABLED": "false",
        # block types are registered by the client that saves a block (Block.save); at start
        # they cost ~2.5 CPU seconds
        "PREFECT_API_BLOCKS_REGISTER_ON_START": "false",
        # SQLite's busy timeout (default 5 s): a loaded machine saw "database is locked"
        "PREFECT_SERVER_DATABASE_CONNECTION_TIMEOUT": "30",
        "PREFECT_SERVER_DATABASE_TIMEOUT": "30",
    }
    # The app `prefect server start` serves, run the way Prefect's own SubprocessASGIServer runs
    # it (uvicorn directly): the CLI's imports would cost ~3 CPU seconds more.
    services.prefect_server = start_child(
        "Prefect server",
        [sys.executable, "-m", "uvicorn", "--factory", "prefect.server.api.server:create_app",
         "--host", "127.0.0.1", "--port", str(prefect_port), "--lifespan", "on", "--log-level", "warning"],
        prefect_server_env, log_dir / "prefect-server.log", prefect_server_home,
    )

    errors: list[BaseException] = []

    def ray_cluster():
        try:
            # The worker node joins now that the head's node is registered (`ray start --address`
            # gives up when the GCS lists no head node yet), while the head's dashboard starts.
            services.ray_worker_args = _ray_node_args(gcs_port, WORKER_CPUS, WORKER_OBJECT_STORE_BYTES, ray_worker_temp, False)
            services.ray_worker_env = {**ray_env, "TRECFLOW_HOME": str(home("ray-worker-home"))}
            services.ray_worker = start_worker_node(services, ray_dashboard, wait=False)
            wait_until(lambda: ui.http_ok(f"{ray_dashboard}/api/version"), "the Ray dashboard answering", STARTUP_TIMEOUT_S, services.ray_head)
            timings["ray dashboard"] = time.monotonic() - t0
            wait_for_worker_node(services, ray_dashboard, STARTUP_TIMEOUT_S)
            timings["ray 2 nodes"] = time.monotonic() - t0
            # the job server is a dashboard module of its own: up when it lists jobs
            wait_until(lambda: ui.http_ok(f"{ray_dashboard}/api/jobs/"), "the Ray job server answering", STARTUP_TIMEOUT_S, services.ray_head)
            timings["ray jobs api"] = time.monotonic() - t0
        except BaseException as error:  # noqa: BLE001 - re-raised by the main thread
            errors.append(error)

    def mlflow_server():
        try:
            wait_until(lambda: ui.http_ok(f"{mlflow_uri}/health"), "the MLflow server answering /health", STARTUP_TIMEOUT_S, services.mlflow)
            timings["mlflow"] = time.monotonic() - t0
        except BaseException as error:  # noqa: BLE001
            errors.append(error)

    threads = [threading.Thread(target=target, daemon=True) for target in (ray_cluster, mlflow_server)]
    for thread in threads:
        thread.start()

    # The Prefect worker starts now too: tests/cluster/prefect_worker.py imports what the worker
    # needs while the server starts, then waits for it; the worker creates its process pool.
    worker_settings = {
        "RAY_ADDRESS": ray_dashboard,  # the Jobs API; the flow run submits with JobSubmissionClient
        "TRECFLOW_HOME": str(home("flow-home")),
        "PREFECT_HOME": str(home("prefect-worker")),
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick a new run up within a second (default 10)
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
    }
    worker_env = {**base, **cluster_env, **worker_settings}
    services.prefect_worker = start_child(
        "Prefect worker",
        [sys.executable, str(Path(__file__).with_name("prefect_worker.py")), "--pool", WORK_POOL, "--type", "process",
         "--name", f"box-{marker}"],
        worker_env, log_dir / "prefect-worker.log", home("prefect-worker"),
    )
    wait_until(lambda: ui.http_ok(f"{prefect_api_url}/health"), "the Prefect API answering /api/health", STARTUP_TIMEOUT_S, services.prefect_server)
    timings["prefect server"] = time.monotonic() - t0
    wait_until(lambda: worker_online(prefect_api_url, WORK_POOL), "the Prefect worker polling its pool", STARTUP_TIMEOUT_S, services.prefect_worker)
    timings["prefect worker"] = time.monotonic() - t0

    for thread in threads:
        thread.join(STARTUP_TIMEOUT_S * 2)
    if errors:
        raise errors[0]
    if any(thread.is_alive() for thread in threads):
        raise BoxError("a service start did not finish")
    timings["total"] = time.monotonic() - started

    return ClusterBox(
        root=root, log_dir=log_dir, marker=marker,
        s3_endpoint=s3_endpoint, bucket=bucket, store=store, access_key=CANARY_ACCESS_KEY, secret=CANARY_SECRET,
        ray_gcs_address=f"127.0.0.1:{gcs_port}", ray_dashboard=ray_dashboard, ray_temp_dir=ray_temp, ray_worker_temp_dir=ray_worker_temp,
        head_cpus=HEAD_CPUS, worker_cpus=WORKER_CPUS,
        mlflow_uri=mlflow_uri, mlflow_artifacts=mlflow_artifacts, mlflow_dir=mlflow_dir,
        prefect_url=prefect_url, prefect_api_url=prefect_api_url, work_pool=WORK_POOL,
        env={**cluster_env, **worker_settings, BOX_MARKER: marker},
        cluster_env=dict(cluster_env), timings=dict(timings), services=services,
    )


def stop_box_services(services: Services) -> list[str]:
    """Stop every child (the worker first), then reap whatever still carries the box's marker
    (job drivers, flow-run processes, Ray workers in other process groups); what was reaped."""
    children = services.children()
    for child in children:  # SIGTERM to all at once, SIGKILL to what is left after the grace
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline and any(ui.group_alive(child.pid) for child in children):
        for child in children:
            child.process.poll()
        time.sleep(0.1)
    for child in children:
        kill_group(child, sig=signal.SIGKILL)
    return reap(services.marker)


def stop_box(box: ClusterBox, progress: Callable[[str], object] = print) -> None:
    started = time.monotonic()
    reaped = stop_box_services(box.services)
    shutil.rmtree(box.root, ignore_errors=True)
    progress(f"cluster box stopped in {time.monotonic() - started:.1f} s" + (f"; reaped {reaped}" if reaped else ""))


# --------------------------------------------------------------------------- Ray


def ray_nodes_at(dashboard: str, alive: bool = True) -> list[dict]:
    """The cluster's nodes from the dashboard's state API (no ``ray.init``)."""
    import httpx

    response = httpx.get(f"{dashboard}/api/v0/nodes", params={"limit": 100, "detail": "false"}, timeout=10)
    response.raise_for_status()
    nodes = response.json()["data"]["result"]["result"]
    return [node for node in nodes if node["state"] == "ALIVE"] if alive else nodes


def ray_nodes(box: ClusterBox, alive: bool = True) -> list[dict]:
    """The nodes alive (or all, with ``alive=False``): dicts with ``node_id``, ``is_head_node``,
    ``state``, ``resources_total``."""
    return ray_nodes_at(box.ray_dashboard, alive)


def wait_for_ray_nodes(box: ClusterBox, count: int, timeout_s: float = 60.0) -> list[dict]:
    """Wait until exactly ``count`` nodes are alive; those nodes."""
    return wait_until(lambda: (lambda nodes: nodes if len(nodes) == count else None)(ray_nodes(box)),
                      f"{count} Ray node(s) alive", timeout_s)


def kill_worker_node(box: ClusterBox, wait_s: float = 90.0) -> list[int]:
    """Lose the worker node abruptly: SIGKILL to every process of it at once (its ``ray start``
    group, and its Ray workers, which the raylet starts in groups of their own), then wait until
    the head counts one node alive (Ray's health checks: ~15-30 s). The pids killed."""
    import psutil

    worker = box.services.ray_worker
    if worker is None or worker.exited() is not None:
        raise BoxError("no worker node running")
    try:
        processes = [psutil.Process(worker.pid), *psutil.Process(worker.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        processes = []
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(worker.pid, signal.SIGKILL)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.process.wait(timeout=10)
    box.services.ray_worker = None
    if wait_s:
        wait_for_ray_nodes(box, 1, wait_s)
    return [process.pid for process in processes]


def start_worker_node(services: Services, dashboard: str, wait: bool = True, timeout_s: float = STARTUP_TIMEOUT_S) -> Child:
    """Start the worker node (``ray start --address``; its log ``ray-worker-<n>.log``). Each start
    has a resource of its own (``box_worker_start_<n>``), so a start is not mistaken for a node of
    an earlier, failed one that the head has not yet declared dead."""
    services.worker_starts += 1
    resources = {WORKER_RESOURCE: 1, f"box_worker_start_{services.worker_starts}": 1}
    services.ray_worker = start_child(
        "Ray worker node", [*services.ray_worker_args, "--resources", json.dumps(resources)], services.ray_worker_env,
        services.log_dir / f"ray-worker-{services.worker_starts}.log", services.root / "ray-worker",
    )
    if wait:
        wait_for_worker_node(services, dashboard, timeout_s)
    return services.ray_worker


def _worker_node_joined(services: Services, dashboard: str) -> bool:
    mark = f"box_worker_start_{services.worker_starts}"
    return any(mark in node["resources_total"] for node in ray_nodes_at(dashboard))


def wait_for_worker_node(services: Services, dashboard: str, timeout_s: float, attempts: int = 5) -> None:
    """Wait until the worker node's latest start is alive in the cluster. A start that exits
    first is made again, up to ``attempts`` starts: ``ray start --address`` gives up when its
    raylet has not registered within 30 s (Ray's fixed limit), which a loaded machine exceeds."""
    for attempt in range(attempts):
        try:
            wait_until(lambda: _worker_node_joined(services, dashboard), "the Ray worker node alive", timeout_s, services.ray_worker)
            return
        except BoxError:
            if services.ray_worker.exited() is None or attempt == attempts - 1:
                raise
            kill_group(services.ray_worker, grace_s=0, sig=signal.SIGKILL)
            start_worker_node(services, dashboard, wait=False)


def restart_worker_node(box: ClusterBox, wait_s: float = STARTUP_TIMEOUT_S) -> None:
    """Start a new worker node (after `kill_worker_node`) and wait until it is alive."""
    services = box.services
    if services.ray_worker is not None and services.ray_worker.exited() is None:
        raise BoxError("the worker node is still running")
    start_worker_node(services, box.ray_dashboard, wait=True, timeout_s=wait_s)


# --------------------------------------------------------------------------- Prefect


def worker_online(api_url: str, pool: str) -> bool:
    import httpx

    response = httpx.post(f"{api_url}/work_pools/{pool}/workers/filter", json={}, timeout=10)
    return response.status_code == 200 and any(worker.get("status") == "ONLINE" for worker in response.json())


def _client(box: ClusterBox):
    from prefect.client.orchestration import SyncPrefectClient

    return SyncPrefectClient(api=box.prefect_api_url)


def _deep_merge(base: dict, overrides: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def deploy(
    box: ClusterBox,
    deployment_file: str | Path,
    name: str,
    overrides: dict | None = None,
    timeout_s: float = 180.0,
) -> str:
    """Register the deployment ``name`` of the prefect.yaml-style ``deployment_file`` on the box's
    Prefect server, with ``prefect deploy`` (as production does); returns ``"<flow>/<name>"``.

    The file is rewritten into the box first: its work pool becomes the box's process pool (job
    variables the process template lacks, e.g. a Kubernetes image, are dropped; ``env`` is kept),
    its schedules are removed (runs are started by the tests), and its pull steps change into this
    checkout (a process pool runs the checkout's code, as the image's /opt/trecflow on a cluster).
    ``overrides`` is merged into the deployment entry last (dicts merged, anything else replaced),
    e.g. ``{"parameters": {"run": {"recipe_path": ...}}, "job_variables": {"env": {...}}}``;
    ``{"concurrency_limit": None}`` drops the file's limit (a run killed without a final state
    holds its slot until its lease expires)."""
    import yaml

    source = yaml.safe_load(Path(deployment_file).read_text())
    entries = [entry for entry in source.get("deployments", []) if entry.get("name") == name]
    if len(entries) != 1:
        raise BoxError(f"{deployment_file}: {len(entries)} deployments named {name!r}")
    entry = copy.deepcopy(entries[0])
    pool = entry.get("work_pool") or {}
    from prefect.workers.process import ProcessWorker

    allowed = set(ProcessWorker.get_default_base_job_template()["variables"]["properties"])
    job_variables = {key: value for key, value in (pool.get("job_variables") or {}).items() if key in allowed}
    job_variables.setdefault("working_dir", str(ROOT))
    job_variables_over = (overrides or {}).get("job_variables", {})
    entry["work_pool"] = {"name": box.work_pool, "work_queue_name": "default", "job_variables": _deep_merge(job_variables, job_variables_over)}
    entry["schedules"] = []
    entry = _deep_merge(entry, {key: value for key, value in (overrides or {}).items() if key != "job_variables"})
    document = {
        "name": source.get("name", "trecflow"),
        "prefect-version": source.get("prefect-version"),
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}],
        "deployments": [entry],
    }
    deploy_dir = box.root / "deploy"
    deploy_dir.mkdir(exist_ok=True)
    rewritten = deploy_dir / f"{name}.prefect.yaml"
    rewritten.write_text(yaml.safe_dump(document, sort_keys=False))
    log = box.log_dir / f"deploy-{name}.log"
    env = {**_base_env(box.marker), "PREFECT_API_URL": box.prefect_api_url, "PREFECT_HOME": str(box.root / "prefect-deploy")}
    with open(log, "ab") as sink:
        try:
            completed = subprocess.run(
                [str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file", str(rewritten), "--name", name],
                cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s,
            )
        except subprocess.TimeoutExpired:
            raise BoxError(f"prefect deploy {name}: no result after {timeout_s:.0f} s (see {log})") from None
    if completed.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise BoxError(f"prefect deploy {name} failed ({completed.returncode}):\n{tail}")
    with _client(box) as client:
        deployments = [d for d in client.read_deployments() if d.name == name]
        if not deployments:
            raise BoxError(f"prefect deploy {name}: no deployment registered")
        flow = client.read_flow(deployments[-1].flow_id)
    return f"{flow.name}/{name}"


def start_deployment(box: ClusterBox, deployment: str, parameters: dict | None = None, job_variables: dict | None = None) -> str:
    """Create a flow run of ``"<flow>/<deployment>"`` through the box's API (as a UI click does);
    the box's worker picks it up within a second. Returns the flow run id."""
    with _client(box) as client:
        found = client.read_deployment_by_name(deployment)
        run = client.create_flow_run_from_deployment(found.id, parameters=parameters or {}, job_variables=job_variables)
    return str(run.id)


def flow_run_state(box: ClusterBox, flow_run_id: str):
    with _client(box) as client:
        return client.read_flow_run(flow_run_id).state


def wait_for_flow_run(box: ClusterBox, flow_run_id: str, timeout_s: float = 300.0, check: bool = True, poll_s: float = 1.0):
    """Wait until the flow run is in a final state; that state (`BoxError` after ``timeout_s``,
    or earlier if ``check`` and a service of the box has died)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = flow_run_state(box, flow_run_id)
        if state is not None and state.is_final():
            return state
        if check:
            box.check()
        if time.monotonic() > deadline:
            raise BoxError(f"flow run {flow_run_id} not final after {timeout_s:.0f} s: {state!r}; worker log:\n"
                           + (box.services.prefect_worker.log_tail() if box.services.prefect_worker else ""))
        time.sleep(poll_s)


def run_deployment_and_wait(box: ClusterBox, deployment: str, parameters: dict | None = None, timeout_s: float = 300.0):
    """`start_deployment` then `wait_for_flow_run`: the final state (``state.state_details.flow_run_id``)."""
    return wait_for_flow_run(box, start_deployment(box, deployment, parameters), timeout_s)


def flow_run_processes(flow_run_id: str) -> list:
    """The flow run's processes (psutil): those the worker started with ``PREFECT__FLOW_RUN_ID``
    in their environment (the engine process, and what it started unless it changed its env)."""
    import psutil

    found = []
    for process in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, OSError):
            if process.environ().get("PREFECT__FLOW_RUN_ID") == str(flow_run_id):
                found.append(process)
    return found


def flow_run_pid(flow_run_id: str, timeout_s: float = 60.0) -> int:
    """The pid of the flow run's engine process (the worker's child), once it runs."""

    def engine():
        processes = flow_run_processes(flow_run_id)
        pids = {process.pid for process in processes}
        roots = [process for process in processes if process.ppid() not in pids]
        return roots[0].pid if roots else None

    return wait_until(engine, f"the process of flow run {flow_run_id}", timeout_s)


def kill_flow_run(flow_run_id: str) -> list[int]:
    """SIGKILL the flow run's processes (the engine and its children that kept the env); their pids."""
    import psutil

    processes = flow_run_processes(flow_run_id)
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()
    return [process.pid for process in processes]

