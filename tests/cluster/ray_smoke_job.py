"""The entrypoint of the smoke Ray job (tests/cluster/test_services.py): run by the job server on
the head from the job's working_dir. Prints one JSON line: where `tasks` was imported from and,
for two tasks placed with SPREAD, the node each ran on and a digest of the S3 secret it reads
from its own environment (never the secret itself)."""

from __future__ import annotations

import hashlib
import json
import os
import time

import ray


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def where(index: int) -> dict:
    import tasks

    time.sleep(1.0)  # the two run at once, so SPREAD puts them on two nodes
    return {
        "index": index,
        "node_id": ray.get_runtime_context().get_node_id(),
        "tasks_file": tasks.__file__,
        "cwd": os.getcwd(),
        "secret_sha256": hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest(),
        "endpoint": os.environ.get("AWS_ENDPOINT_URL"),
    }


def main() -> None:
    import tasks

    ray.init(log_to_driver=False)
    results = ray.get([where.remote(index) for index in range(2)])
    print("SMOKE " + json.dumps({"driver_tasks_file": tasks.__file__, "driver_cwd": os.getcwd(), "tasks": results}), flush=True)


if __name__ == "__main__":
    main()
