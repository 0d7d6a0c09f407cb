"""Reporters: the side concerns of a run, subscribed to the runner's stage events.

- `LogReporter`: progress and outcomes to the Prefect run logger (or Python logging outside a run).
- `MlflowReporter`: one child MLflow run per stage under the variant's run, named
  ``<variant>/<stage>``: the stage's metrics, tags (its fingerprint) and artifacts; FINISHED, or
  FAILED with the stage.
- `PrefectArtifactReporter`: a markdown artifact per stage from the stage's rows (the same rows
  the CLI prints), with its figure.
- `EventLog`: one JSON line per event in ``TRECFLOW_EVENTS`` (if set): what ran where, countable.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import time
from typing import Any

from trecflow.report import markdown_table
from trecflow.runner import FAILED, FINISHED, NOTE, PROGRESS, REUSED, SKIPPED, STARTED, WAITING, StageEvent

# Prefect artifact keys of the stages that had one before the stage protocol (kept: users link them).
ARTIFACT_NAMES = {"score": "quality-scores", "predict": "trec-prediction", "place": "placement", "reevaluate": "trec-measured"}


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(part for part in parts if part).lower()).strip("-")


RunKey = tuple[int, str, str, "str | None"]


def run_key(event: StageEvent) -> RunKey:
    """One stage run: depth, stage, target and fingerprint."""
    return event.depth, event.stage.name, event.target.label, event.fingerprint


def run_logger() -> Any:
    """The Prefect run logger of this thread's run, else None."""
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # outside a flow or task run (a background thread of a stage)
        return None


class LogReporter:
    """Stage progress and outcomes as log lines, to the run logger of the stage: the one current
    when it reports, else the one current when it started (a note from a stage's background thread,
    e.g. the train stage's collapse warning, has no Prefect run context of its own), else the
    ``trecflow`` Python logger."""

    def __init__(self) -> None:
        self.loggers: dict[RunKey, Any] = {}

    def __call__(self, event: StageEvent) -> None:
        key = run_key(event)
        if event.kind == STARTED:
            self.loggers[key] = run_logger()
        if event.kind == PROGRESS and event.progress is not None:
            return  # structured progress: flows.progress_reporters shows it (a bar, an artifact, sparse lines)
        logger = run_logger() or self.loggers.get(key) or logging.getLogger("trecflow")
        if event.kind in (FINISHED, REUSED, FAILED):
            self.loggers.pop(key, None)
        name = ("  " * event.depth) + event.stage.name
        if event.kind in (PROGRESS, WAITING, NOTE, SKIPPED):
            logger.info(event.message)
        elif event.kind in (FINISHED, REUSED) and event.result is not None:
            line = "; ".join(f"{label} {value}" for label, value in event.stage.rows(event.result.summary)[:4])
            logger.info("%s %s (%s, %.1f s)%s", name, event.fingerprint, "reused" if event.kind == REUSED else "computed",
                        event.seconds or 0.0, f": {line}" if line else "")
            for warning in getattr(event.result.summary, "warnings", ()) if event.depth == 0 else ():
                logger.warning(warning)


class MlflowReporter:
    """A child MLflow run of ``parent_id`` per stage of the run's own target (not of derived runs),
    named ``<variant>/<stage>``; ``only``: those stages alone (a stage command records its own
    stage, not the cached ones it read)."""

    def __init__(self, tracker: Any, recipe: Any, parent_id: str, tags: dict[str, str], variant: str, only: set[str] | None = None):
        self.tracker = tracker
        self.recipe = recipe
        self.parent_id = parent_id
        self.tags = tags
        self.variant = variant
        self.only = only
        self.children: dict[str, str] = {}

    def __call__(self, event: StageEvent) -> None:
        if event.depth or (self.only is not None and event.stage.name not in self.only):
            return
        stage = event.stage
        if event.kind == STARTED:
            tags = {"mlflow.parentRunId": self.parent_id, "trecflow.stage": stage.name, "trecflow.variant": self.variant, **self.tags}
            child = self.tracker.start_run(self.recipe, f"{self.variant}/{stage.name}", tags=tags, with_params=False)
            self.children[stage.name] = event.annotations["mlflow_run_id"] = child
        elif event.kind == FAILED and stage.name in self.children:
            self.tracker.end_run(self.children.pop(stage.name), status="FAILED")
        elif event.kind in (FINISHED, REUSED) and stage.name in self.children:
            child = self.children.pop(stage.name)
            result = event.result
            self.tracker.set_tags(child, {f"trecflow.{stage.name}_fingerprint": result.fingerprint, **stage.tags(result.summary)})
            self.tracker.set_tags(self.parent_id, {f"trecflow.{stage.name}_fingerprint": result.fingerprint})
            self.tracker.log_metrics(child, stage.metrics(result.summary))
            output = self.tracker.store.output(stage.name, result.fingerprint)
            for name in stage.artifacts(result.summary):
                folder, _, base = f"{stage.name}/{name}".rpartition("/")
                self.tracker.log_artifact_bytes(child, base, output.read_bytes(name), artifact_path=folder)
            self.tracker.end_run(child)


class PrefectArtifactReporter:
    """A Prefect markdown artifact per stage of the run's own target, from the stage's rows."""

    def __init__(self, store: Any):
        self.store = store

    def __call__(self, event: StageEvent) -> None:
        if event.depth or event.kind not in (FINISHED, REUSED) or event.result is None:
            return
        from prefect.artifacts import create_markdown_artifact

        stage, result, target = event.stage, event.result, event.target
        rows = stage.rows(result.summary)
        if not rows:
            return
        rows = rows + [("output", f"`{result.uri}` ({'reused' if result.reused else 'computed'})")]
        markdown = markdown_table(f"{stage.title or stage.name}: {target.label}", rows)
        figure = getattr(stage, "figure", None)
        if figure and result.uri and self.store.output(stage.name, result.fingerprint).exists():
            image = base64.b64encode(self.store.output(stage.name, result.fingerprint).read_bytes(figure)).decode()
            markdown += f"\n![{stage.title}](data:image/png;base64,{image})\n"
        variant = target.variant if stage.scope == "variant" or stage.name == "predict" else None
        create_markdown_artifact(key=artifact_key(ARTIFACT_NAMES.get(stage.name, stage.name), target.recipe.name, variant or ""),
                                 markdown=markdown, description=f"{stage.title or stage.name} of {target.label}")


class EventLog:
    """Appends one JSON line per stage event to ``path`` (kind, stage, target, fingerprint, pid, time)."""

    def __init__(self, path: str):
        self.path = path

    @classmethod
    def from_environment(cls) -> EventLog | None:
        path = os.environ.get("TRECFLOW_EVENTS")
        return cls(path) if path else None

    def __call__(self, event: StageEvent) -> None:
        if event.kind == PROGRESS:
            return
        record = {"kind": event.kind, "stage": event.stage.name, "target": event.target.label, "fingerprint": event.fingerprint,
                  "depth": event.depth, "pid": os.getpid(), "unix": time.time(), "message": event.message}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
