"""When a stage task is retried: transient failures (I/O, a lost worker) are; bad input is not.

Bad input raises a `ValueError` subclass everywhere in trecflow (`RecipeError`, `IngestError`),
and retrying cannot fix it, so it fails at once with its one-line message.
"""

from __future__ import annotations

from typing import Any


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: False for a ValueError (bad input), else True."""
    return not isinstance(getattr(state, "data", None), ValueError)
