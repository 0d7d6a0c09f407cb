"""Connecting to Ray: a cluster when ``RAY_ADDRESS`` is set, else a local Ray on loopback.

The local instance is capped so it shares a small machine: dashboard off, object store capped,
token authentication off (loopback only). On a cluster the store and tracking settings travel to
the workers through the runtime environment, since remote workers do not inherit the driver's.
"""

from __future__ import annotations

import os
import threading

FORWARDED_ENV = (
    "TRECFLOW_HOME",
    "TRECFLOW_STORE",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
LOCAL_OBJECT_STORE_BYTES = 512 * 1024**2
_INIT = threading.Lock()  # concurrent variants start their stages from threads of one process


def ensure_ray() -> None:
    """Initialize Ray once per process (no-op when already initialized; safe from several threads)."""
    import ray

    with _INIT:
        if not ray.is_initialized():
            _init(ray)


def _init(ray) -> None:
    env = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env={"env_vars": env}, log_to_driver=False)
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # Ray starts workers at nice 15; on a shared machine that starves the training workers.
    os.environ.setdefault("RAY_worker_niceness", "0")
    ray.init(
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        object_store_memory=LOCAL_OBJECT_STORE_BYTES,
        # Logical CPUs beyond the cores, so scoring actors or train workers cannot starve the
        # read and write tasks that feed them (with 2 cores, 2 actors would take every CPU).
        num_cpus=(os.cpu_count() or 2) + 2,
        runtime_env={"env_vars": env},
        log_to_driver=False,
        configure_logging=False,
    )
