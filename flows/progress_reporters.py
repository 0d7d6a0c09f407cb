"""Progress sinks: the runner's structured ``progress`` events (`trecflow.progress`) shown three ways.

- `TerminalProgress`: a live tqdm bar per stage run on stderr, only when stderr is a terminal.
- `PrefectProgressArtifacts`: one Prefect progress artifact per stage run inside a flow run,
  created at the stage's first structured progress and updated in place (at most every
  ``TRECFLOW_PROGRESS_ARTIFACT_SECONDS``, default 5 s), set to 100% when the stage finishes.
  Key ``progress-<stage>-<recipe>[-<variant>][-<split>]``; the description names the stage, the
  target, the count, the rate and the ETA.
- `ProgressLog`: sparse log lines (the Prefect run logger, else Python logging) when stderr is not
  a terminal: at most one per 5% of a phase and one per ``TRECFLOW_PROGRESS_LOG_SECONDS``, each
  with percentage, rate and ETA.

`progress_reporters()` returns the three, in the order to subscribe them: **before** the other
reporters, so that a bar is cleared before a log line is printed under it. Free-text notes are not
shown here (`flows.reporters.LogReporter` logs them). A sink never fails a stage: a Prefect API
error while updating an artifact is logged once per stage run and the next update tries again.
`terminal_progress` gives code outside the runner (``trecflow corpus demo``) the same bar or lines.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TextIO

from flows.reporters import RunKey, artifact_key, run_key, run_logger
from trecflow.progress import (
    ARTIFACT_SECONDS_ENV, DEFAULT_ARTIFACT_SECONDS, DEFAULT_LOG_SECONDS, LOG_SECONDS_ENV, LineThrottle, Progress, ProgressUpdate,
    check_settings, format_duration, line_sink, setting_seconds,
)
from trecflow.runner import FAILED, FINISHED, PROGRESS, REUSED, STARTED, StageEvent
from trecflow.stage import VARIANT_SCOPE

BAR_FORMAT = "{desc}: {percentage:5.1f}%|{bar}| {n_fmt}/{total_fmt} {unit}{postfix}"
MESSAGE_CHARS = 60  # of a stage's message, on a bar
DESCRIPTION_CHARS = 500  # of an artifact's description


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Bar:
    """One tqdm bar showing `ProgressUpdate`s: the count, the windowed rate and ETA (not tqdm's own)."""

    def __init__(self, description: str, stream: TextIO, first: ProgressUpdate):
        from tqdm import tqdm

        self.bar = tqdm(total=first.total, initial=first.done, unit=first.unit, desc=description, file=stream, bar_format=BAR_FORMAT,
                        postfix=self.postfix(first), dynamic_ncols=True, mininterval=0, leave=True)

    @staticmethod
    def postfix(update: ProgressUpdate) -> str:
        """The rate and ETA (the bar shows the percentage and count) and the message, cut short."""
        stats = update.stats().split(", ", 1)[1]
        message = update.message if len(update.message) <= MESSAGE_CHARS else update.message[: MESSAGE_CHARS - 1] + "…"
        return stats + (f" · {message}" if message else "")

    def show(self, update: ProgressUpdate) -> None:
        bar = self.bar
        if bar.total != update.total:
            bar.reset(total=update.total)
        bar.unit = update.unit
        bar.n = update.done
        bar.set_postfix_str(self.postfix(update), refresh=False)
        bar.refresh()

    def clear(self) -> None:
        self.bar.clear()

    def close(self) -> None:
        self.bar.close()


class TerminalProgress:
    """A live bar per stage run on ``stream`` (stderr), only when it is a terminal (or ``enabled``).
    A bar closes when its stage finishes, is reused or fails; any other event with a message
    clears the bars first, so that the log line it becomes starts on a clean line."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None):
        self.stream = stream or sys.stderr
        self.enabled = is_terminal(self.stream) if enabled is None else enabled
        self.bars: dict[RunKey, Bar] = {}
        self._lock = threading.Lock()

    def __call__(self, event: StageEvent) -> None:
        if not self.enabled:
            return
        key = run_key(event)
        with self._lock:
            if event.kind == PROGRESS and event.progress is not None:
                bar = self.bars.get(key)
                if bar is None:
                    self.bars[key] = Bar(f"{'  ' * event.depth}{event.stage.name} {event.target.label}", self.stream, event.progress)
                else:
                    bar.show(event.progress)
            elif event.kind in (FINISHED, REUSED, FAILED) and key in self.bars:
                self.bars.pop(key).close()
            elif event.message:
                for bar in self.bars.values():
                    bar.clear()


def run_ids() -> tuple[Any, Any]:
    """(flow run id, task run id) of the Prefect run this thread is in; (None, None) outside one."""
    from prefect.context import FlowRunContext, TaskRunContext

    task = TaskRunContext.get()
    if task is not None:
        return task.task_run.flow_run_id, task.task_run.id
    flow = FlowRunContext.get()
    if flow is not None and flow.flow_run is not None:
        return flow.flow_run.id, None
    return None, None


def progress_artifact_key(event: StageEvent) -> str:
    """``progress-<stage>-<recipe>[-<variant>][-<split>]``: the variant for a variant-scoped stage,
    the split when it is not ``cpt`` (the tiny base's and the trained reference's derived runs)."""
    target = event.target
    variant = target.variant if event.stage.scope == VARIANT_SCOPE else None
    return artifact_key("progress", event.stage.name, target.recipe.name, variant or "", "" if target.split == "cpt" else target.split)


@dataclass
class _Artifact:
    flow_run_id: Any
    artifact_id: Any = None
    updated: float | None = None  # when it was last created or updated
    percent: float = 0.0
    started: float = 0.0
    failed_once: bool = False


class PrefectProgressArtifacts:
    """One Prefect progress artifact per stage run inside a flow run (see the module docstring)."""

    def __init__(self, min_seconds: float | None = None, clock: Callable[[], float] = time.monotonic):
        self.min_seconds = setting_seconds(ARTIFACT_SECONDS_ENV, DEFAULT_ARTIFACT_SECONDS) if min_seconds is None else min_seconds
        self.clock = clock
        self.runs: dict[RunKey, _Artifact] = {}
        self._lock = threading.Lock()

    def __call__(self, event: StageEvent) -> None:
        key = run_key(event)
        with self._lock:
            if event.kind == STARTED:
                flow_run_id, _ = run_ids()
                if flow_run_id is not None:
                    self.runs[key] = _Artifact(flow_run_id, started=self.clock())
            elif event.kind == PROGRESS and event.progress is not None:
                state = self.runs.get(key)
                if state is None:  # subscribed after the stage started: only inside a flow run
                    flow_run_id, _ = run_ids()
                    if flow_run_id is None:
                        return
                    state = self.runs[key] = _Artifact(flow_run_id, started=self.clock())
                self._progress(state, event)
            elif event.kind in (FINISHED, REUSED, FAILED):
                state = self.runs.pop(key, None)
                if state is not None and state.artifact_id is not None:
                    self._final(state, event)

    def _description(self, event: StageEvent, status: str) -> str:
        stage = event.stage
        text = f"{stage.title or stage.name} (stage `{stage.name}`) of `{event.target.label}`: {status}"
        return text if len(text) <= DESCRIPTION_CHARS else text[: DESCRIPTION_CHARS - 1] + "…"

    def _progress(self, state: _Artifact, event: StageEvent) -> None:
        update = event.progress
        now = self.clock()
        if state.updated is not None and not update.finished and now - state.updated < self.min_seconds:
            return
        state.updated, state.percent = now, update.percent
        description = self._description(event, f"{update.count()} ({update.stats()})")
        if state.artifact_id is None:  # the first update (or a creation that failed: tried again)
            self._call(state, event, lambda: self._create(state, event, update.percent, description))
        else:
            self._call(state, event, lambda: self._update(state, update.percent, description))

    def _final(self, state: _Artifact, event: StageEvent) -> None:
        took = format_duration(self.clock() - state.started)
        if event.kind == FAILED:
            status = f"failed at {state.percent:.1f}% after {took}"
            self._call(state, event, lambda: self._update(state, state.percent, self._description(event, status)))
        else:
            self._call(state, event, lambda: self._update(state, 100.0, self._description(event, f"done in {took}")))

    def _call(self, state: _Artifact, event: StageEvent, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception as error:  # the Prefect API: never fail a stage for its progress artifact
            if not state.failed_once:
                state.failed_once = True
                logging.getLogger("trecflow").warning("progress artifact of %s %s: %s: %s (will retry at the next update)",
                                                      event.stage.name, event.target.label, type(error).__name__, error)

    @staticmethod
    def _create(state: _Artifact, event: StageEvent, percent: float, description: str) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import ArtifactCreate

        _, task_run_id = run_ids()  # the stage's Prefect task when this thread runs it
        artifact = ArtifactCreate(key=progress_artifact_key(event), type="progress", description=description, data=percent,
                                  flow_run_id=state.flow_run_id, task_run_id=task_run_id)
        state.artifact_id = get_client(sync_client=True).create_artifact(artifact=artifact).id

    @staticmethod
    def _update(state: _Artifact, percent: float, description: str) -> None:
        from prefect.artifacts import update_progress_artifact

        update_progress_artifact(state.artifact_id, percent, description=description)


class ProgressLog:
    """Sparse progress lines (`trecflow.progress.LineThrottle`) per stage run, when ``stream``
    (stderr) is not a terminal (or ``enabled``), to the run logger of the stage (the one current
    when it started or reported, else the ``trecflow`` Python logger)."""

    def __init__(self, stream: TextIO | None = None, enabled: bool | None = None, min_seconds: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.enabled = not is_terminal(stream or sys.stderr) if enabled is None else enabled
        self.min_seconds = setting_seconds(LOG_SECONDS_ENV, DEFAULT_LOG_SECONDS) if min_seconds is None else min_seconds
        self.clock = clock
        self.runs: dict[RunKey, tuple[LineThrottle, Any]] = {}
        self._lock = threading.Lock()

    def __call__(self, event: StageEvent) -> None:
        if not self.enabled:
            return
        key = run_key(event)
        with self._lock:
            if event.kind == STARTED:
                self.runs[key] = (LineThrottle(min_seconds=self.min_seconds, clock=self.clock), run_logger())
            elif event.kind == PROGRESS and event.progress is not None:
                throttle, logger = self.runs.get(key) or (LineThrottle(min_seconds=self.min_seconds, clock=self.clock), None)
                logger = run_logger() or logger
                self.runs[key] = (throttle, logger)
                if throttle.should_log(event.progress):
                    (logger or logging.getLogger("trecflow")).info(event.message)
            elif event.kind in (FINISHED, REUSED, FAILED):
                self.runs.pop(key, None)


def progress_reporters() -> list[Callable[[StageEvent], None]]:
    """The three sinks, to subscribe before the other reporters (see the module docstring). A bad
    progress setting is a ProgressSettingError (a ValueError: exit code 2) here, before any work."""
    check_settings()
    return [TerminalProgress(), PrefectProgressArtifacts(), ProgressLog()]


def terminal_progress(label: str, write: Callable[[str], object], stream: TextIO | None = None) -> Progress:
    """A progress callable outside the runner: notes to ``write``; structured updates as a live bar
    on ``stream`` (stderr) when it is a terminal, else as sparse lines to ``write``."""
    stream = stream or sys.stderr
    if not is_terminal(stream):
        return Progress(label, write, line_sink(write, label))
    state: dict[str, Any] = {"bar": None, "phase": None}

    def show(update: ProgressUpdate) -> None:
        if state["phase"] != update.phase:  # a new phase: a new bar (the last one stays on screen)
            if state["bar"] is not None:
                state["bar"].close()
            state["bar"], state["phase"] = Bar(label, stream, update), update.phase
        elif state["bar"] is None:  # this phase's bar is finished and closed
            return
        else:
            state["bar"].show(update)
        if update.finished:
            state["bar"].close()
            state["bar"] = None

    def note(message: str) -> None:
        if state["bar"] is not None:
            state["bar"].clear()
        write(message)

    return Progress(label, note, show)


__all__ = ["Bar", "PrefectProgressArtifacts", "ProgressLog", "TerminalProgress", "progress_artifact_key", "progress_reporters",
           "run_key", "terminal_progress"]
