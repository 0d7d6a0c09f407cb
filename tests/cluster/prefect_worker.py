"""``prefect worker start`` for the cluster box, started before its server answers.

Imports Prefect's CLI and process worker (most of a worker's start-up) while the server still
starts, waits until ``$PREFECT_API_URL/health`` answers, then runs ``prefect worker start`` with
this script's arguments in this process."""

from __future__ import annotations

import os
import sys
import time
import urllib.request

from prefect.cli import app
import prefect.cli.worker  # noqa: F401  (the command's imports, ahead of time)
import prefect.workers.process  # noqa: F401


def main() -> None:
    url = os.environ["PREFECT_API_URL"].rstrip("/") + "/health"
    deadline = time.monotonic() + float(os.environ.get("BOX_WORKER_WAIT_S", "600"))
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if time.monotonic() > deadline:
            sys.exit(f"{url} did not answer")
        time.sleep(0.25)
    sys.argv = ["prefect", "worker", "start", *sys.argv[1:]]
    sys.exit(app())


if __name__ == "__main__":
    main()
