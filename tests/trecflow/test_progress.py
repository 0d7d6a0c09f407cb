"""Structured progress (`trecflow.progress`) and its sinks (`flows.progress_reporters`): the ETA
from a recent window, the sparse log lines, the round trip of a line through a Ray job's log, the
terminal bar, the Prefect progress artifact of a stage run in a real flow run, and a real stage
(packing, on the staged test store) reporting up to 100%."""

from __future__ import annotations

import io
import logging
import re
import threading
from typing import Any, Mapping

import pytest

from flows.progress_reporters import PrefectProgressArtifacts, ProgressLog, TerminalProgress, progress_artifact_key, progress_reporters
from trecflow.progress import (
    LineThrottle, Progress, ProgressSettingError, ProgressTracker, ProgressUpdate, as_progress, format_duration, line_sink,
    parse_line,
)
from trecflow.recipe import load_recipe
from trecflow.runner import FINISHED, PROGRESS, STARTED, Graph, Runner, StageEvent, run_stage
from trecflow.stage import VARIANT_SCOPE, Stage, StageContext, StageResult, Target
from trecflow.store import StageOutput, Store

from ..conftest import CONFIGS

LINE = re.compile(r"^(?P<label>[\w -]+): \[(?P<percent>[\d.]+)%, (?P<rate>(?:\?|[\d.,]+) \S+/(?:s|min|h)), "
                  r"(?P<eta>ETA [^\]]+|done in [^\]]+)\] (?P<count>[\d,]+/[\d,]+ \S+.*)$")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_eta_comes_from_a_recent_window_not_from_the_start():
    clock = Clock()
    tracker = ProgressTracker(window_seconds=60, clock=clock)
    assert tracker.update(0, 10_000, "steps").rate is None
    clock.now = 120.0  # a slow start: the first step ends two minutes in
    first = tracker.update(1, 10_000, "steps")
    assert first.rate is None and first.eta_seconds is None and first.elapsed_seconds == 120.0
    for second in range(1, 101):  # then 10 steps/s
        clock.now = 120.0 + second
        update = tracker.update(1 + 10 * second, 10_000, "steps")
    assert update.rate == pytest.approx(10.0)  # the start-up is not in the rate (from the start: 1001/220 s = 4.6/s)
    assert update.eta_seconds == pytest.approx((10_000 - 1001) / 10.0)
    for second in range(1, 121):  # it slows to 2 steps/s: after one window the rate is the new one
        clock.now = 220.0 + second
        update = tracker.update(1001 + 2 * second, 10_000, "steps", "loss 2.5")
    assert update.rate == pytest.approx(2.0)
    assert update.eta_seconds == pytest.approx((10_000 - 1241) / 2.0)
    assert update.line("train") == "train: [12.4%, 2 steps/s, ETA 1h 13m] 1,241/10,000 steps loss 2.5"


def test_reports_sparser_than_the_window_use_the_last_two_and_a_phase_starts_over():
    clock = Clock()
    tracker = ProgressTracker(window_seconds=60, clock=clock)
    for minute, done in enumerate([0, 3, 6, 10], start=0):  # one report every 10 minutes
        clock.now = 600.0 * minute
        update = tracker.update(done, 40, "shards")
    assert update.rate == pytest.approx(4 / 600) and update.eta_seconds == pytest.approx(30 / (4 / 600))
    assert update.stats() == "25.0%, 24 shards/h, ETA 1h 15m"
    clock.now += 1
    restarted = tracker.update(0, 8, "units")  # a new unit and total: a new phase, no rate yet
    assert restarted.phase == update.phase + 1 and restarted.rate is None and restarted.elapsed_seconds == 0
    clock.now += 5
    assert tracker.update(8, 8, "units").eta_seconds == 0  # finished: the phase's mean rate, no ETA left
    clock.now += 1
    assert tracker.update(2, 8, "units").phase == restarted.phase + 1  # done went down (a retried pass)
    with pytest.raises(ValueError, match="progress unit 'two words': one word"):
        tracker.update(1, 2, "two words")


def test_log_lines_come_at_most_once_per_5_percent_and_per_interval():
    clock = Clock()
    tracker = ProgressTracker(window_seconds=30, clock=clock)
    every = LineThrottle(min_seconds=0, clock=clock)
    spaced = LineThrottle(min_seconds=30, clock=clock)
    lines: dict[str, list[ProgressUpdate]] = {"every": [], "spaced": []}
    for event in range(1, 101):  # 100 reports, one a second, of 1,000 files
        clock.now = float(event)
        update = tracker.update(10 * event, 1000, "files")
        for name, throttle in (("every", every), ("spaced", spaced)):
            if throttle.should_log(update):
                lines[name].append(update)
    assert [round(update.percent) for update in lines["every"]] == list(range(5, 101, 5))  # 20 lines, one per 5%
    assert [round(update.percent) for update in lines["spaced"]] == [5, 35, 65, 95, 100]  # and no more than one per 30 s
    for update in lines["every"] + lines["spaced"]:
        match = LINE.match(update.line("ingest"))
        assert match and match["label"] == "ingest" and float(match["percent"]) == pytest.approx(update.percent)
    assert LINE.match(lines["every"][-1].line("ingest"))["eta"] == "done in 1m 39s"  # from the first report, at 1 s
    assert LINE.match(lines["spaced"][1].line("ingest"))["eta"] == f"ETA {format_duration(650 / 10)}"  # 10 files/s left 650


def test_a_plain_callable_gets_sparse_lines_and_notes_unchanged():
    clock = Clock()
    lines: list[str] = []
    progress = Progress("pack", lines.append, line_sink(lines.append, "pack", LineThrottle(min_seconds=0, clock=clock)),
                        ProgressTracker(clock=clock), clock=clock)
    progress("pack: the cpt split of 12 shards")
    for done in range(0, 1001):  # 1,001 reports, 10 a second (a Progress passes on one a second)
        clock.now = done / 10
        progress.advance(done, 1000, "groups", "packed")
    assert lines[0] == "pack: the cpt split of 12 shards"
    assert len(lines) == 21 and all(LINE.match(line) for line in lines[1:])  # one per 5%
    assert lines[-1] == "pack: [100.0%, 10 groups/s, done in 1m 40s] 1,000/1,000 groups packed"

    plain: list[str] = []
    wrapped = as_progress(plain.append, "place")  # what a stage function does with a plain callable
    assert as_progress(wrapped, "other") is wrapped
    wrapped("place: a note")
    for done in range(0, 11):
        wrapped.advance(done, 10, "chunks")
    assert plain[0] == "place: a note" and plain[-1].startswith("place: [100.0%,") and plain[-1].endswith("] 10/10 chunks")
    assert len(plain) <= 3  # reports a microsecond apart: the first 5% and the last
    quiet = as_progress(None, "x")
    quiet("nothing")
    quiet.advance(1, 2, "units")


def test_a_progress_line_read_back_from_a_job_log_is_structured_again():
    update = ProgressUpdate(4500, 10_000, "steps", "(attempt 2): loss 2.3104, lr 0.0003", rate=3.2, eta_seconds=1720.0)
    line = update.line("train")
    assert parse_line(line, "train") == (4500, 10_000, "steps", "(attempt 2): loss 2.3104, lr 0.0003")
    assert parse_line(line, "score") is None
    assert parse_line("train: 4500/10000 steps", "train") is None  # free text stays free text
    notes: list[str] = []
    updates: list[ProgressUpdate] = []
    progress = Progress("train", notes.append, updates.append)
    progress("train: submitted Ray job train-abc-1")
    progress(line)  # what `JobLauncher.follow` hands the flow's runner, line by line
    assert notes == ["train: submitted Ray job train-abc-1"]
    assert [(item.done, item.total, item.unit) for item in updates] == [(4500, 10_000, "steps")]


def test_a_bad_setting_is_one_line_naming_the_variable(monkeypatch):
    monkeypatch.setenv("TRECFLOW_PROGRESS_LOG_SECONDS", "often")
    with pytest.raises(ProgressSettingError, match="^TRECFLOW_PROGRESS_LOG_SECONDS: 'often' is not a number of seconds >= 0$"):
        ProgressLog(enabled=True)
    monkeypatch.setenv("TRECFLOW_PROGRESS_LOG_SECONDS", "12")
    assert ProgressLog(enabled=True).min_seconds == 12.0
    monkeypatch.setenv("TRECFLOW_PROGRESS_WINDOW_SECONDS", "-1")
    with pytest.raises(ProgressSettingError, match="^TRECFLOW_PROGRESS_WINDOW_SECONDS: '-1' is not"):
        progress_reporters()  # what a flow assembles before its first stage


# --- sinks, on the events a runner emits --------------------------------------------------------


class CountingStage(Stage, name="progress_probe", inputs=(), scope=VARIANT_SCOPE, title="Progress probe", task_name="progress_probe"):
    """Counts ``items`` items, half of them from a background thread (as training's audit poller
    reports), with a free-text note in between."""

    items = 12

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return f"probe-{target.variant}"

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> dict[str, Any]:
        half = self.items // 2
        for done in range(half + 1):
            context.progress.advance(done, self.items, "items", "counted")
        context.progress("progress_probe: half way")
        thread = threading.Thread(target=lambda: [context.progress.advance(done, self.items, "items", "counted")
                                                  for done in range(half + 1, self.items + 1)])
        thread.start()
        thread.join()
        return {"items": self.items}


PROBE = CountingStage()


@pytest.fixture(scope="module")
def recipe():
    return load_recipe(CONFIGS / "test.yaml")


def probe_events(recipe, variant: str, tmp_path) -> list[StageEvent]:
    events: list[StageEvent] = []
    Runner(Graph([PROBE]), Store(str(tmp_path / "store")), reporters=[events.append]).materialize(PROBE, Target(recipe, variant), {})
    return events


def test_the_runner_emits_structured_progress_and_the_log_sink_thins_it(recipe, tmp_path):
    events = probe_events(recipe, "uniform", tmp_path)
    structured = [event.progress for event in events if event.kind == PROGRESS and event.progress is not None]
    assert structured[0].done == 0 and structured[-1].done == structured[-1].total == 12 and structured[-1].percent == 100.0
    assert [event.message for event in events if event.kind == PROGRESS and event.progress is None] == ["progress_probe: half way"]
    assert all(event.message == event.progress.line("progress_probe") for event in events if event.progress is not None)

    log = ProgressLog(enabled=True, min_seconds=0)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # outside a flow run the lines go to the `trecflow` logger
    logger = logging.getLogger("trecflow")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        for event in events:
            log(event)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    logged = [record.getMessage() for record in records]
    assert logged and len(logged) <= 21 and logged[-1] == structured[-1].line("progress_probe")
    assert all(LINE.match(line) for line in logged)  # percentage, rate and ETA on every line


def test_the_terminal_bar_shows_only_on_a_terminal(recipe, tmp_path):
    events = probe_events(recipe, "end", tmp_path)
    assert not TerminalProgress(stream=io.StringIO()).enabled and ProgressLog(stream=io.StringIO()).enabled
    screen = io.StringIO()
    bar = TerminalProgress(stream=screen, enabled=True)
    for event in events:
        bar(event)
    drawn = screen.getvalue()
    assert "progress_probe test/end: 100.0%|" in drawn and "| 12/12 items" in drawn and "done in 0s · counted" in drawn
    assert not bar.bars  # closed when the stage finished


@pytest.mark.slow  # Prefect's test harness (a real API server)
def test_the_prefect_artifact_is_created_once_and_updated_in_place(prefect_harness, recipe, tmp_path):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.runtime import flow_run

    from flows.executor import PrefectExecutor

    store = Store(str(tmp_path / "store"))
    outside = PrefectProgressArtifacts(min_seconds=0)
    for event in probe_events(recipe, "start", tmp_path / "outside"):  # outside a flow run: nothing, no error
        outside(event)
    assert not outside.runs

    @flow(name="progress_probe_flow")
    def probe_flow() -> str:
        sink = PrefectProgressArtifacts(min_seconds=0)
        runner = Runner(Graph([PROBE]), store, reporters=[sink], executor=PrefectExecutor(store))
        runner.materialize(PROBE, Target(recipe, "trec_valley"), {})
        return str(flow_run.id)

    flow_run_id = probe_flow()
    key = "progress-progress-probe-test-trec-valley"
    assert progress_artifact_key(StageEvent(STARTED, PROBE, Target(recipe, "trec_valley"))) == key
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]),
                                                                         flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(artifacts) == 1  # one per stage run: created at its first update, then updated in place
    artifact = artifacts[0]
    assert artifact.type == "progress" and artifact.data == 100.0 and artifact.task_run_id is not None
    assert artifact.updated > artifact.created
    assert artifact.description.startswith("Progress probe (stage `progress_probe`) of `test/trec_valley`: done in ")


def test_a_real_stage_reports_structured_progress_up_to_100_percent(staged_test):
    """Packing the reference split of the staged test store (a split no other test packs), forced."""
    from tasks.pack import PACK

    staged = staged_test
    events: list[StageEvent] = []
    lines: list[str] = []
    upstream = {"score": staged["score"].fingerprint, "tokenizer": staged["tokenizer"].fingerprint}
    result = run_stage(PACK, Target(staged["recipe"], split="reference"), staged["store"], upstream, force=True,
                       progress=lines.append, reporters=[events.append])
    updates = [event.progress for event in events if event.kind == PROGRESS and event.progress is not None]
    assert updates and updates[0].done == 0 and updates[-1].finished and updates[-1].percent == 100.0
    assert [update.done for update in updates] == sorted(update.done for update in updates)
    assert {(update.unit, update.total) for update in updates} == {("groups", updates[-1].total)}
    assert lines[-2] == updates[-1].line("pack") and lines[-2].endswith(f"{updates[-1].total}/{updates[-1].total} groups packed")
    assert result.summary.sequences > 0 and events[-1].kind == FINISHED
