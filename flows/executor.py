"""Stages as Prefect tasks: the runner's executor inside a flow.

Each stage of the graph is one Prefect task named after it (``score_corpus``, ``train_cpt``...);
its task runs are named ``<task> [<recipe>/<variant>]``.
The runner computes the stage's fingerprint once and hands it here as the task's cache key (with
the store's), so a rerun with the same inputs is ``Cached``; the cache is trusted only while the
output is complete in the store (else ``refresh_cache``). Transient failures (I/O, a lost worker)
are retried; bad input is not: it raises a `ValueError` subclass everywhere in trecflow
(`RecipeError`, `IngestError`, `PlacementError`) and a retry cannot fix it. A retry of a forced
stage does not force again: it continues what the first attempt left (checkpoints, parts).
"""

from __future__ import annotations

from typing import Any, Mapping

from prefect import task

from trecflow.fingerprint import fingerprint
from trecflow.runner import Compute
from trecflow.stage import Stage, StageResult, Target
from trecflow.store import Store


def retry_unless_bad_input(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: False for a ValueError (bad input), else True."""
    return not isinstance(getattr(state, "data", None), ValueError)


def _cache_key(context: Any, parameters: dict[str, Any]) -> str:
    return parameters["cache_key"]


def _execute(stage: str, target: str, cache_key: str, force: bool, compute: Compute) -> StageResult:
    """Run one stage (``compute`` is the runner's reuse-or-compute for it)."""
    from prefect.runtime import task_run

    return compute(force and task_run.run_count <= 1)


_TASKS: dict[str, Any] = {}


def stage_task(stage: Stage) -> Any:
    """The Prefect task of ``stage`` (made once per process)."""
    if stage.name not in _TASKS:
        name = stage.task_name or stage.name
        _TASKS[stage.name] = task(
            name=name,
            task_run_name=name + " [{target}]",
            retries=2,
            retry_delay_seconds=5,
            cache_key_fn=_cache_key,
            persist_result=True,
            retry_condition_fn=retry_unless_bad_input,
        )(_execute)
    return _TASKS[stage.name]


class PrefectExecutor:
    """Runs each stage as its Prefect task (see the module docstring)."""

    def __init__(self, store: Store, retries: int | None = None):
        self.store = store
        self.retries = retries
        self.store_key = fingerprint("store", 1, store.url)

    def __call__(self, stage: Stage, target: Target, upstream: Mapping[str, StageResult], fp: str, force: bool, compute: Compute) -> StageResult:
        options: dict[str, Any] = {"refresh_cache": force or not self.store.output(stage.name, fp).exists()}
        if self.retries is not None:
            options["retries"] = self.retries
        return stage_task(stage).with_options(**options)(stage.name, target.label, f"{stage.name}-{fp}-{self.store_key}", force, compute)
