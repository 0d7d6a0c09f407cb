"""The Prefect task shape every stage shares.

- The cache key is the stage's fingerprint (plus the store's), so a rerun with the same inputs is
  a cache hit; the flow refreshes the cache whenever the output is missing from the store.
- Transient failures (I/O, a lost worker) are retried; bad input is not: it raises a
  `ValueError` subclass everywhere in trecflow (`RecipeError`, `IngestError`) and a retry cannot
  fix it, so it fails at once with its one-line message.
"""

from __future__ import annotations

from typing import Any, Callable

from prefect import task

from trecflow.fingerprint import fingerprint
from trecflow.store import Store


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: False for a ValueError (bad input), else True."""
    return not isinstance(getattr(state, "data", None), ValueError)


COMMON_PARAMETERS = ("recipe", "store_url", "endpoint_url", "force")


def stage_task(name: str, stage: str, current_fingerprint: Callable[..., str], retry_delay_seconds: int = 10):
    """Decorator for a stage's task ``fn(recipe, store_url, endpoint_url=None, force=False, **inputs)``.

    ``current_fingerprint(recipe, store, **inputs)`` gives the stage fingerprint; ``inputs`` are
    the task's other parameters (upstream fingerprints, the variant)."""

    def cache_key(context: Any, parameters: dict[str, Any]) -> str:
        store = Store(parameters["store_url"], parameters.get("endpoint_url"))
        inputs = {key: value for key, value in parameters.items() if key not in COMMON_PARAMETERS}
        return f"{stage}-{current_fingerprint(parameters['recipe'], store, **inputs)}-{fingerprint('store', 1, store.url)}"

    return task(
        name=name,
        retries=2,
        retry_delay_seconds=retry_delay_seconds,
        cache_key_fn=cache_key,
        persist_result=True,
        retry_condition_fn=retry_unless_bad_input,
    )
