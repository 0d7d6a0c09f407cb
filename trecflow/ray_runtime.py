"""Connecting to Ray, in the three places trecflow's Ray work runs:

- **the embedded default** (no ``RAY_ADDRESS``): a local Ray started by this process, explicitly
  (``address="local"``, so it never joins a cluster that ``ray start`` left registered on the
  machine), capped to share a small machine: dashboard off, object store capped, token
  authentication off (loopback only);
- **a stage's Ray job on a cluster** (`trecflow.stage_job`; Ray's job supervisor sets
  ``RAY_ADDRESS`` to the cluster's own address): ``ray.init`` joins that cluster and keeps the
  job's ``runtime_env`` (its working directory and settings);
- **a flow process on a cluster** (``RAY_ADDRESS=http://head:8265``, the Jobs API): never joins
  Ray; its Ray stages are submitted as jobs (`trecflow.ray_jobs`). Calling `ensure_ray` there is
  a bug and says so.

Local workers inherit this process's environment, credentials included; nothing secret is put in
a ``runtime_env``, which Ray shows in its dashboard and job metadata.
"""

from __future__ import annotations

import os
import re
import threading

from trecflow.ray_jobs import forwarded_env, jobs_address

LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
_INIT = threading.Lock()  # concurrent variants start their stages from threads of one process


def local_cpus() -> int:
    """The logical CPUs of the embedded local Ray: the machine's cores and 2 more (see `_init`)."""
    return (os.cpu_count() or 2) + 2


def ensure_ray() -> None:
    """Initialize Ray once per process (no-op when already initialized; safe from several threads)."""
    import ray

    with _INIT:
        if not ray.is_initialized():
            try:
                _init(ray)
            except BaseException:
                stop_failed_start()
                raise


def stop_failed_start() -> list[int]:
    """Stop what a local Ray start that failed left running, and return those PIDs: Ray raises from
    inside its node's constructor (e.g. "The current node timed out during startup" on an
    overloaded machine) with its GCS, raylet, dashboard and monitors started and no handle left to
    stop them, so each retry of the stage would start another local Ray beside them. They are this
    process's children whose command line names one of this process's Ray sessions (Ray names a
    session ``session_<date>_<time>_<driver pid>``); nothing else is touched."""
    import psutil

    mine = re.compile(rf"/session_[0-9_-]+_{os.getpid()}/")
    stopped = []
    for child in psutil.Process().children():
        try:
            if mine.search(" ".join(child.cmdline())):
                child.kill()
                stopped.append(child.pid)
        except psutil.Error:  # ended meanwhile, or not ours to read
            continue
    return stopped


def _init(ray) -> None:
    if jobs_address() is not None:
        raise RuntimeError(
            f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is a Jobs API address: this process submits Ray stages as jobs and must not join the cluster"
        )
    address = os.environ.get("RAY_ADDRESS")
    if address:  # inside a Ray job (or on a node): the cluster's own address
        ray.init(address=address, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts workers at nice 15; on a shared machine that starves the training workers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        address="local",
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        # Logical CPUs beyond the cores, so scoring actors or train workers cannot starve the
        # read and write tasks that feed them (with 2 cores, 2 actors would take every CPU).
        num_cpus=local_cpus(),
        runtime_env={"env_vars": forwarded_env()},
        log_to_driver=False,
        configure_logging=False,
    )
