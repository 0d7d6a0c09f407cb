"""A stage's notes reach its Prefect run log even from the stage's background threads (the train
stage's collapse warning comes from its progress thread, which has no Prefect run context)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from prefect import task

from flows.reporters import LogReporter
from tasks.graph import GRAPH
from trecflow.recipe import load_recipe
from trecflow.runner import FINISHED, PROGRESS, STARTED, StageEvent
from trecflow.stage import Target

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@task
def stage_with_a_thread() -> None:
    reporter = LogReporter()
    target = Target(load_recipe(CONFIGS / "test.yaml"), "uniform")
    stage = GRAPH["train"]
    reporter(StageEvent(STARTED, stage, target, "fp"))
    worker = threading.Thread(target=reporter, args=(StageEvent(PROGRESS, stage, target, "fp", message="train: warning: from a thread"),))
    worker.start()
    worker.join()
    reporter(StageEvent(FINISHED, stage, target, "fp"))
    assert reporter.loggers == {}  # forgotten when the stage run ends


def test_a_note_from_a_stage_thread_goes_to_the_task_run_log(prefect_harness):
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append
    logger = logging.getLogger("prefect.task_runs")
    logger.addHandler(handler)
    try:
        stage_with_a_thread()
    finally:
        logger.removeHandler(handler)
    noted = [record for record in records if record.getMessage() == "train: warning: from a thread"]
    assert len(noted) == 1 and getattr(noted[0], "task_run_name", "").startswith("stage_with_a_thread")
