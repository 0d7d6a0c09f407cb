"""What several benchmarks share: a stage summary read as JSON, and a local Ray started with retries."""

from __future__ import annotations

import time
from typing import Any, Mapping

RAY_START_ATTEMPTS = 3


def summary_dict(summary: Any) -> dict[str, Any]:
    """A stage result's summary as its JSON object (what ``summary.json`` holds), whether the
    stage returns a `trecflow.stage.Summary` dataclass or a plain dict."""
    if hasattr(summary, "as_json"):
        return summary.as_json()
    if isinstance(summary, Mapping):
        return dict(summary)
    raise TypeError(f"not a stage summary: {type(summary).__name__}")


def start_ray(attempts: int = RAY_START_ATTEMPTS) -> None:
    """`trecflow.ray_runtime.ensure_ray`, tried again when the local node does not come up.

    Ray gives its raylet a fixed 30 s to register with the GCS (``ray._private.node``); on a
    loaded 2-core machine that start-up alone can take longer, and ``ray.init`` then raises
    "The current node timed out during startup". The benchmarks start Ray once, before anything
    is timed, so a retry costs no measurement."""
    import ray

    from trecflow.ray_runtime import ensure_ray

    for attempt in range(1, attempts + 1):
        try:
            ensure_ray()
            return
        except Exception as error:  # ray.init raises a bare Exception for this
            if "timed out during startup" not in str(error) or attempt == attempts:
                raise
            print(f"bench: local Ray did not start ({error}); attempt {attempt + 1} of {attempts}", flush=True)
            ray.shutdown()
            time.sleep(2)
