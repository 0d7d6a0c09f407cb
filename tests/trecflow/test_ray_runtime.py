"""The local Ray's start: what a failed start leaves running is stopped, and nothing else."""

from __future__ import annotations

import json
import subprocess
import sys

from ..conftest import ROOT

# A driver (its own process: this test process may hold the suite's local Ray) with three children:
# one of its own Ray sessions (e.g. the GCS server of a start that timed out), one naming another
# driver's session, one of no session (e.g. a Prefect server it started).
DRIVER = """
import json, os, subprocess, sys, time
from trecflow.ray_runtime import stop_failed_start
def child(arg):
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", arg])
pid = os.getpid()
ours = child(f"--log_dir=/tmp/ray/session_2026-12-01_06-49-28_660775_{pid}/logs")
other = child(f"--log_dir=/tmp/ray/session_2026-12-01_06-49-28_660775_{pid + 1}/logs")
plain = child("--port=4200")
time.sleep(0.5)
stopped = stop_failed_start()
codes = [ours.wait(timeout=10), other.poll(), plain.poll()]
for process in (other, plain):
    process.kill()
    process.wait()
print(json.dumps({"stopped": stopped, "ours": ours.pid, "codes": codes}))
"""


def test_a_failed_start_stops_only_the_drivers_children_of_its_own_ray_sessions():
    done = subprocess.run([sys.executable, "-c", DRIVER], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["stopped"] == [result["ours"]]
    assert result["codes"] == [-9, None, None]  # the session's child killed; the others still ran
