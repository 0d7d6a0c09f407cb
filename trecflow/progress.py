"""Structured progress: how much of a piece of work is done, its recent rate and its ETA.

A stage reports progress through the callable its context hands it (`Progress`):

- ``progress("score: training the classifier")``: a free-text note, as always;
- ``progress.advance(done, total, "shards", "scored")``: ``done`` of ``total`` units, with an
  optional message that follows the count when it is shown (``12/120 shards scored``).

Each ``advance`` becomes a `ProgressUpdate` (done, total, unit, message, plus the rate and ETA the
`ProgressTracker` derives) that the runner sends to its reporters as a ``progress`` event; the
terminal bar, the Prefect progress artifact and the sparse log lines (`flows.progress_reporters`)
all show that one event. Guarantees:

- **The rate comes from a recent window** (`RateWindow`, ``TRECFLOW_PROGRESS_WINDOW_SECONDS``,
  default 300 s), never from the start: the time before a phase's first completed unit (actors
  loading models, a job starting) is not counted, and older samples drop out of the window. With
  reports sparser than the window, the last two reports give the rate. No rate (and no ETA) is
  given until the samples span `MIN_SPAN_SECONDS`.
- **Phases**: a change of unit or total, or ``done`` going down, starts a new phase (the window
  and the log buckets start again): one stage may report files read, then partitions deduplicated.
- **Sparse lines** (`LineThrottle`): at most one line per 5% of a phase's work, no more often than
  ``TRECFLOW_PROGRESS_LOG_SECONDS`` (default 30 s) apart, and always the line that completes the
  phase: at most 21 lines per phase however many reports there are.
- **Bounded cost**: a `Progress` passes at most one update per `EMIT_SECONDS` to its sink (the
  first and the last of every phase always), so a stage may report every unit, and a Ray job's log
  (which carries progress to the flow on a cluster) gets at most one line a second per stage.
- **Lines round-trip**: `ProgressUpdate.line` renders ``label: [45.0%, 3.2 steps/s, ETA 28m 40s]
  4,500/10,000 steps message``; `parse_line` reads one back (the flow side of a Ray job gets its
  progress as log lines, and a `Progress` turns them into structured updates again).
- A plain callable (``print``, ``lines.append``) still works wherever a progress callable is
  taken: `as_progress` wraps it so that its structured updates arrive as sparse lines.

Only the standard library is imported (the demo corpus builder uses this module).
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

WINDOW_ENV = "TRECFLOW_PROGRESS_WINDOW_SECONDS"
LOG_SECONDS_ENV = "TRECFLOW_PROGRESS_LOG_SECONDS"
ARTIFACT_SECONDS_ENV = "TRECFLOW_PROGRESS_ARTIFACT_SECONDS"
DEFAULT_WINDOW_SECONDS = 300.0
DEFAULT_LOG_SECONDS = 30.0
DEFAULT_ARTIFACT_SECONDS = 5.0
LOG_STEP = 0.05  # one line per 5% of the work at most
MIN_SPAN_SECONDS = 2.0  # a rate needs samples at least this far apart
EMIT_SECONDS = 1.0  # a Progress passes on at most one update per second (first and last of a phase always)
WINDOW_SAMPLES = 100  # samples kept per window (older ones are thinned out)

Clock = Callable[[], float]


class ProgressSettingError(ValueError):
    """A progress setting (an environment variable) that is not a number of seconds."""


def setting_seconds(name: str, default: float) -> float:
    """The environment variable ``name`` as seconds >= 0, else ``default``; ProgressSettingError
    (one line naming the variable) for anything else."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ProgressSettingError(f"{name}: {raw!r} is not a number of seconds >= 0")
    return value


def check_settings() -> None:
    """Read every progress setting: a bad one is a ProgressSettingError now, before any work."""
    for name, default in ((WINDOW_ENV, DEFAULT_WINDOW_SECONDS), (LOG_SECONDS_ENV, DEFAULT_LOG_SECONDS),
                          (ARTIFACT_SECONDS_ENV, DEFAULT_ARTIFACT_SECONDS)):
        setting_seconds(name, default)


def format_duration(seconds: float) -> str:
    """``45s``, ``12m 05s``, ``3h 20m``, ``2d 04h``."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def format_rate(rate: float, unit: str) -> str:
    """Units per second, per minute or per hour, whichever reads as a number >= 1."""
    for per, scale in (("s", 1.0), ("min", 60.0), ("h", 3600.0)):
        value = rate * scale
        if value >= 1 or per == "h":
            return f"{value:,.0f} {unit}/{per}" if value >= 100 else f"{value:.3g} {unit}/{per}"
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class ProgressUpdate:
    """One structured progress report: ``done`` of ``total`` ``unit``s (``unit`` is one word, e.g.
    ``shards``), an optional ``message`` shown after the count, and what the tracker derived:
    the recent ``rate`` (units per second, None until known), the ``eta_seconds`` (0 once done,
    None until a rate is known), the seconds since the ``phase`` began."""

    done: int
    total: int
    unit: str
    message: str = ""
    rate: float | None = None
    eta_seconds: float | None = None
    elapsed_seconds: float = 0.0
    phase: int = 0

    @property
    def fraction(self) -> float:
        """Done over total, in [0, 1] (1 for an empty total)."""
        return 1.0 if self.total <= 0 else min(max(self.done / self.total, 0.0), 1.0)

    @property
    def percent(self) -> float:
        return 100.0 * self.fraction

    @property
    def finished(self) -> bool:
        return self.done >= self.total

    def stats(self) -> str:
        """``45.0%, 3.2 steps/s, ETA 28m 40s`` (rate and ETA ``?`` while unknown); once finished,
        ``100.0%, 3.1 steps/s, done in 53m 40s`` (the phase's time)."""
        rate = "? " + self.unit + "/s" if self.rate is None else format_rate(self.rate, self.unit)
        if self.finished:
            eta = f"done in {format_duration(self.elapsed_seconds)}"
        else:
            eta = "ETA ?" if self.eta_seconds is None else f"ETA {format_duration(self.eta_seconds)}"
        return f"{self.percent:.1f}%, {rate}, {eta}"

    def count(self) -> str:
        """``4,500/10,000 steps`` and the message, if any."""
        return f"{self.done:,}/{self.total:,} {self.unit}" + (f" {self.message}" if self.message else "")

    def line(self, label: str) -> str:
        """``label: [stats] count`` (what logs show and `parse_line` reads back)."""
        return f"{label}: [{self.stats()}] {self.count()}"


_LINE = re.compile(r"\[[^\]]*\] (?P<done>\d[\d,]*)/(?P<total>\d[\d,]*) (?P<unit>\S+)(?: (?P<message>.*))?")


def parse_line(line: str, label: str) -> tuple[int, int, str, str] | None:
    """(done, total, unit, message) of a line `ProgressUpdate.line` rendered for ``label``; None
    for any other line."""
    prefix = f"{label}: "
    if not line.startswith(prefix):
        return None
    match = _LINE.fullmatch(line[len(prefix):].rstrip("\n"))
    if match is None:
        return None
    return int(match["done"].replace(",", "")), int(match["total"].replace(",", "")), match["unit"], match["message"] or ""


class RateWindow:
    """Units per second over the last ``window_seconds`` of one phase (see the module docstring):
    the samples start at the phase's first completed unit; one sample at or before the window's
    start is kept, so that reports sparser than the window still give a rate."""

    def __init__(self, window_seconds: float, min_span_seconds: float = MIN_SPAN_SECONDS):
        self.window = window_seconds
        self.min_span = min_span_seconds
        self._start_done: int | None = None
        self._samples: deque[tuple[float, int]] = deque()

    def observe(self, now: float, done: int) -> None:
        if self._start_done is None:
            self._start_done = done
            return
        if not self._samples:
            if done > self._start_done:  # the first completed unit: the start-up before it is not counted
                self._samples.append((now, done))
            return
        resolution = self.window / WINDOW_SAMPLES
        if len(self._samples) >= 2 and now - self._samples[-2][0] < resolution:
            self._samples[-1] = (now, done)  # thin: one sample per resolution step
        else:
            self._samples.append((now, done))
        while len(self._samples) >= 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    @property
    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (first_time, first_done), (last_time, last_done) = self._samples[0], self._samples[-1]
        span = last_time - first_time
        if span < self.min_span:
            return None
        return max(last_done - first_done, 0) / span


class ProgressTracker:
    """Turns ``(done, total, unit, message)`` reports into `ProgressUpdate`s with a windowed rate
    and an ETA; a new unit or total, or ``done`` going down, starts a new phase."""

    def __init__(self, window_seconds: float | None = None, clock: Clock = time.monotonic):
        self.window_seconds = setting_seconds(WINDOW_ENV, DEFAULT_WINDOW_SECONDS) if window_seconds is None else window_seconds
        self.clock = clock
        self.phase = -1
        self._key: tuple[str, int] | None = None
        self._last_done = 0
        self._first_done = 0
        self._began = 0.0
        self._window = RateWindow(self.window_seconds)

    def update(self, done: int, total: int, unit: str, message: str = "") -> ProgressUpdate:
        if not unit or any(character.isspace() for character in unit):
            raise ValueError(f"progress unit {unit!r}: one word, e.g. 'shards'")
        done, total = int(done), int(total)
        now = self.clock()
        if (unit, total) != self._key or done < self._last_done:
            self.phase += 1
            self._key, self._began, self._first_done = (unit, total), now, done
            self._window = RateWindow(self.window_seconds)
        self._last_done = done
        self._window.observe(now, done)
        rate = self._window.rate
        if rate is None and done >= total and now > self._began:  # too short for a window: the phase's mean
            rate = (done - self._first_done) / (now - self._began)
        if done >= total:
            eta = 0.0
        elif rate:
            eta = (total - done) / rate
        else:
            eta = None
        return ProgressUpdate(done, total, unit, message, rate, eta, now - self._began, self.phase)


class LineThrottle:
    """Which updates become lines: the first to reach each further ``step`` of a phase's work, if
    ``min_seconds`` have passed since the last line, and always the one that completes a phase."""

    def __init__(self, step: float = LOG_STEP, min_seconds: float | None = None, clock: Clock = time.monotonic):
        self.step = step
        self.min_seconds = setting_seconds(LOG_SECONDS_ENV, DEFAULT_LOG_SECONDS) if min_seconds is None else min_seconds
        self.clock = clock
        self._phase: int | None = None
        self._bucket = 0
        self._finished = False
        self._last_line = -math.inf

    def should_log(self, update: ProgressUpdate) -> bool:
        now = self.clock()
        if update.phase != self._phase:
            self._phase, self._bucket, self._finished = update.phase, 0, False
        if update.finished:
            if self._finished:
                return False
            self._finished, self._last_line = True, now
            return True
        bucket = int(update.fraction / self.step + 1e-9)
        if bucket > self._bucket and now - self._last_line >= self.min_seconds:
            self._bucket, self._last_line = bucket, now
            return True
        return False


class Progress:
    """The progress callable a stage gets: ``progress(note)`` for free text, ``progress.advance(done,
    total, unit, message)`` for structured progress. ``note`` receives notes; ``sink`` receives
    updates (at most one per ``emit_seconds``, and the first and last of every phase), in order. A
    note that is a progress line of ``label`` (a Ray job's log, streamed back) is taken as an
    update. Thread-safe: a stage may report from a background thread."""

    def __init__(self, label: str, note: Callable[[str], object], sink: Callable[[ProgressUpdate], object],
                 tracker: ProgressTracker | None = None, emit_seconds: float = EMIT_SECONDS, clock: Clock = time.monotonic):
        self.label = label
        self.note = note
        self.sink = sink
        self.clock = clock
        self.tracker = tracker or ProgressTracker(clock=clock)
        self.emit_seconds = emit_seconds
        self._lock = threading.Lock()
        self._emitted_phase = -1
        self._emitted_at = -math.inf

    def __call__(self, message: str) -> None:
        parsed = parse_line(message, self.label)
        if parsed is not None:
            self.advance(*parsed)
        else:
            self.note(message)

    def advance(self, done: int, total: int, unit: str, message: str = "") -> None:
        """``done`` of ``total`` ``unit``s (one word) are complete; ``message`` follows the count."""
        with self._lock:  # held while the sink runs: a stage run's updates arrive in order
            update = self.tracker.update(done, total, unit, message)
            now = self.clock()
            if update.phase == self._emitted_phase and not update.finished and now - self._emitted_at < self.emit_seconds:
                return
            self._emitted_phase, self._emitted_at = update.phase, now
            self.sink(update)


def line_sink(write: Callable[[str], object], label: str, throttle: LineThrottle | None = None) -> Callable[[ProgressUpdate], None]:
    """A sink writing sparse lines (`LineThrottle`) of ``label``'s updates to ``write``."""
    throttle = throttle or LineThrottle()

    def sink(update: ProgressUpdate) -> None:
        if throttle.should_log(update):
            write(update.line(label))

    return sink


def as_progress(progress: Callable[[str], object] | None, label: str) -> Progress:
    """``progress`` itself if it is a `Progress`; a plain line callable (``print``) wrapped so that
    its structured updates arrive as sparse lines; for None, one that reports nothing."""
    if isinstance(progress, Progress):
        return progress
    if progress is None:
        return Progress(label, lambda message: None, lambda update: None)
    return Progress(label, progress, line_sink(progress, label))


__all__ = [
    "LineThrottle", "Progress", "ProgressSettingError", "ProgressTracker", "ProgressUpdate", "RateWindow", "as_progress",
    "check_settings", "format_duration", "format_rate", "line_sink", "parse_line", "setting_seconds",
]
