"""A process that runs one slow stage through the real runner (for the lease tests).

``python -m tests.trecflow.lease_worker STORE_URL [ENDPOINT] SECONDS [elsewhere]``: the stage sleeps SECONDS,
writes ``done.txt`` naming this process, and commits; every stage event goes to ``TRECFLOW_EVENTS``.
With ``elsewhere`` its lease names a process of another host (whose death no runner here can see).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Mapping

from flows.reporters import EventLog
from trecflow.lease import PROCESS, Owner
from trecflow.runner import Graph, Runner
from trecflow.stage import Stage, StageContext, StageResult, Target
from trecflow.store import StageOutput, Store


class SlowStage(Stage):
    name = "slow"
    title = "A stage that takes its time"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return "0123456789abcdef"

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> dict[str, Any]:
        output.write_bytes("started.txt", str(os.getpid()).encode())
        time.sleep(self.seconds)
        output.write_bytes("done.txt", str(os.getpid()).encode())
        return {"pid": os.getpid()}


class Named:
    name = "lease-test"


def main() -> None:
    url, endpoint, seconds = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
    stage = SlowStage(seconds)
    owner = Owner(PROCESS, f"elsewhere:{os.getpid()}:0badc0de", "elsewhere", os.getpid()) if sys.argv[4:] == ["elsewhere"] else None
    runner = Runner(Graph([stage]), Store(url, endpoint), reporters=[EventLog.from_environment()], poll_seconds=0.2, owner=owner)
    result = runner.run(Target(Named()))["slow"]
    print(f"result pid={result.summary['pid']} reused={result.reused}", flush=True)


if __name__ == "__main__":
    main()
