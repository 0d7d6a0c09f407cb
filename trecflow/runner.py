"""The one runner of stages: fingerprint once, reuse or compute under a lease, commit, report.

For each stage a run needs (the ancestors of ``until``, in the graph's order), the runner:

1. skips it (event ``skipped``) when the recipe lacks a section the stage needs;
2. computes its fingerprint **once**, from the recipe and the upstream results;
3. hands the stage to an *executor* (in a flow: a Prefect task whose cache key is that fingerprint;
   elsewhere: a direct call), which calls back `Runner.compute`:
   - a complete output (manifest present) is reused unless the stage is forced, once verified
     (`trecflow.integrity.verify_output`: its manifest is this stage's and fingerprint's, every
     file it lists is present with its size; else a `StoreError` naming the file);
   - otherwise the runner takes the lease on ``<store>/<stage>/<fingerprint>/``
     (`trecflow.lease`), clears an incomplete output (a resumable stage keeps it unless forced),
     runs the stage with a heartbeat renewing the lease, writes ``summary.json`` and commits the
     manifest last;
   - a runner that finds a live lease held by someone else waits for the manifest and reuses the
     output; one that finds an expired lease takes it over;
4. emits events (``started``, ``progress``, ``waiting``, ``reused``, ``finished``, ``failed``,
   ``skipped``, ``note``) to its reporters: MLflow, Prefect artifacts, logs and the CLI subscribe
   (`flows.reporters`, `flows.progress_reporters`); nothing else in a stage or flow reports. An
   event's message, and the message of an error leaving the runner, are passed through
   `trecflow.redact` first: no URL's password reaches a reporter or a log.

A stage reports through ``context.progress`` (`trecflow.progress.Progress`): ``progress(text)`` is a
``progress`` event with that message (a note); ``progress.advance(done, total, unit, message)`` is a
``progress`` event whose ``progress`` field holds the structured update (with its rate and ETA) and
whose message is that update as one line.

Forcing a stage forces every stage that depends on it (`forced_closure`). Forcing a stage that has
nothing to compute (a base model given as a path) is a no-op with a ``note``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

from trecflow.integrity import verify_output
from trecflow.lease import Lease, Owner
from trecflow.progress import LineThrottle, Progress, ProgressUpdate
from trecflow.ray_jobs import job_alive
from trecflow.recipe import RecipeError
from trecflow.redact import redact, redact_error
from trecflow.stage import SUMMARY_FILE, Stage, StageContext, StageResult, SummaryError, Target, read_summary, summary_json
from trecflow.store import Store

STARTED, PROGRESS, WAITING, REUSED, FINISHED, FAILED, SKIPPED, NOTE = (
    "started", "progress", "waiting", "reused", "finished", "failed", "skipped", "note")


@dataclass
class StageEvent:
    """Something that happened to one stage of one target. ``annotations`` is filled by reporters
    on ``started`` (e.g. the MLflow run id) and handed to the stage's context. A ``progress`` event
    carries either a free-text ``message`` (``progress`` None) or a structured ``progress`` update
    (``message``: that update as a line, `ProgressUpdate.line`)."""

    kind: str
    stage: Stage
    target: Target
    fingerprint: str | None = None
    result: StageResult | None = None
    message: str = ""
    error: BaseException | None = None
    seconds: float | None = None
    annotations: dict[str, Any] = field(default_factory=dict)
    depth: int = 0  # 0 for the run's own stages, 1+ for those of a derived run (the tiny base's pretraining)
    progress: ProgressUpdate | None = None


class Reporter(Protocol):
    def __call__(self, event: StageEvent) -> None: ...


Compute = Callable[[bool], StageResult]


class Launcher(Protocol):
    """Computes a stage elsewhere (a Ray job on a cluster: `trecflow.ray_jobs.JobLauncher`) and
    returns once its output is committed in the store."""

    def compute(self, stage: str, target: Target, upstream: Mapping[str, StageResult], fingerprint: str, force: bool,
                tracking_run_id: str | None, progress: Callable[[str], None]) -> None: ...
# executor(stage, target, upstream, fingerprint, force, compute) -> StageResult; compute(force) does the work
Executor = Callable[[Stage, Target, Mapping[str, StageResult], str, bool, Compute], StageResult]


def direct(stage: Stage, target: Target, upstream: Mapping[str, StageResult], fingerprint: str, force: bool, compute: Compute) -> StageResult:
    """The executor without Prefect: compute in this process."""
    return compute(force)


class Graph:
    """The stages in dependency order (each stage's inputs come before it)."""

    def __init__(self, stages: Sequence[Stage]):
        self.stages = tuple(stages)
        self.by_name = {stage.name: stage for stage in self.stages}
        seen: set[str] = set()
        for stage in self.stages:
            unknown = [name for name in stage.inputs if name not in seen]
            if unknown:
                raise ValueError(f"stage {stage.name}: inputs {unknown} are not declared before it")
            seen.add(stage.name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(stage.name for stage in self.stages)

    def __getitem__(self, name: str) -> Stage:
        return self.by_name[name]

    def check(self, names: Iterable[str], what: str = "force") -> list[str]:
        """``names`` if every one is a stage, else a RecipeError naming the unknown one."""
        names = list(names)
        for name in names:
            if name not in self.by_name:
                raise RecipeError(f"{what}: unknown stage {name!r} (stages: {', '.join(self.names)})")
        return names

    def forced_closure(self, names: Iterable[str]) -> set[str]:
        """The named stages and every stage downstream of them."""
        forced = set(self.check(names))
        for stage in self.stages:  # dependency order: one pass suffices
            if forced.intersection(stage.inputs):
                forced.add(stage.name)
        return forced

    def needed(self, target: Target, until: str | None = None) -> list[str]:
        """The stages a run up to ``until`` (every stage when None) cannot do without, in order:
        ``until`` (or every final stage) and, transitively, the inputs each requires for ``target``."""
        users = {name for stage in self.stages for name in stage.inputs}
        pending = [until] if until is not None else [name for name in self.names if name not in users]
        needed: set[str] = set()
        while pending:
            name = pending.pop()
            if name not in needed:
                needed.add(name)
                stage = self.by_name[name]
                pending.extend(stage.required_inputs(target) if stage.applies(target) else stage.inputs)
        return [name for name in self.names if name in needed]

    def check_runnable(self, target: Target, until: str | None, source: str) -> None:
        """A RecipeError of one line when the recipe lacks sections that a stage the run needs
        requires: a run never ends Completed having silently skipped what it was asked to do."""
        if until is not None:
            self.check([until], "until")
        blocked = [self.by_name[name] for name in self.needed(target, until) if not self.by_name[name].applies(target)]
        if blocked:
            missing = list(dict.fromkeys(section for stage in blocked for section in stage.missing(target)))
            scope = f"up to {until}" if until else "every stage"
            raise RecipeError(
                f"{source}: cannot run {scope}: no {', '.join(missing)} section{'s' if len(missing) > 1 else ''} "
                f"(needed by {', '.join(stage.name for stage in blocked)}); add them, or run up to a stage with --until"
            )
        self.check_refusals(target, until, source)

    def check_refusals(self, target: Target, until: str | None, source: str) -> None:
        """A RecipeError of one line when a stage the run needs refuses the target (`Stage.refusal`)."""
        for name in self.needed(target, until):
            stage = self.by_name[name]
            refusal = stage.refusal(target) if stage.applies(target) else None
            if refusal is not None:
                raise RecipeError(f"{source}: {refusal}")

    def ancestors(self, until: str | None, given: Iterable[str] = ()) -> list[str]:
        """The stages needed to produce ``until`` (all of them when None), in order; stages in
        ``given`` and what only they need are left out."""
        given = set(given)
        if until is None:
            return [name for name in self.names if name not in given]
        self.check([until], "until")
        needed: set[str] = set()
        pending = [until]
        while pending:
            name = pending.pop()
            if name in needed or name in given:
                continue
            needed.add(name)
            pending.extend(self.by_name[name].inputs)
        return [name for name in self.names if name in needed]


class Runner:
    """Runs the stages of a `Graph` on one store (see the module docstring)."""

    def __init__(
        self,
        graph: Graph,
        store: Store,
        *,
        forced: Iterable[str] = (),
        reporters: Sequence[Reporter] = (),
        executor: Executor = direct,
        lease_seconds: float | None = None,
        poll_seconds: float | None = None,
        depth: int = 0,
        owner: Owner | None = None,
        launcher: Launcher | None = None,
    ):
        self.graph = graph
        self.store = store
        self.forced = set(forced)
        self.reporters = list(reporters)
        self.executor = executor
        self.owner = owner or Owner.this_process()
        self.launcher = launcher
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.depth = depth
        self.seconds: dict[str, float] = {}

    def derived(self, forced: Iterable[str] = ()) -> Runner:
        """A runner for a derived run inside a stage (the tiny base's pretraining, the trained
        reference): same store, lease settings and reporters (its events one level deeper),
        computed in this process."""
        return Runner(self.graph, self.store, forced=forced, reporters=self.reporters, lease_seconds=self.lease_seconds,
                      poll_seconds=self.poll_seconds, depth=self.depth + 1, launcher=self.launcher)

    def emit(self, event: StageEvent) -> StageEvent:
        event.depth = self.depth
        event.message = redact(event.message)  # every reporter shows or records it: no URL's password
        for reporter in self.reporters:
            reporter(event)
        return event

    def run(self, target: Target, until: str | None = None, given: Mapping[str, StageResult] | None = None) -> dict[str, StageResult]:
        """The results of every stage ``until`` needs (all stages when None) that applies to ``target``."""
        results: dict[str, StageResult] = dict(given or {})
        for name in self.graph.ancestors(until, results):
            stage = self.graph[name]
            applies = stage.applies(target)  # required_inputs may read the sections a stage that does not apply lacks
            missing_inputs = [input_name for input_name in stage.required_inputs(target) if input_name not in results] if applies else []
            if not applies or missing_inputs:
                why = f"no {', '.join(stage.missing(target))} section" if not applies else f"needs {', '.join(missing_inputs)}"
                self.emit(StageEvent(SKIPPED, stage, target, message=f"{stage.name}: skipped ({why})"))
                continue
            upstream = {input_name: results[input_name] for input_name in stage.inputs if input_name in results}
            results[name] = self.materialize(stage, target, upstream)
        return results

    def materialize(self, stage: Stage, target: Target, upstream: Mapping[str, StageResult]) -> StageResult:
        """One stage: fingerprint once, then reuse, resolve or compute through the executor (a
        stage that refuses the target: its `RecipeError`, before anything)."""
        refusal = stage.refusal(target)
        if refusal is not None:
            raise RecipeError(f"{target.label}: {refusal}")
        fingerprint = stage.fingerprint(target, upstream, self.store)
        force = stage.name in self.forced
        resolved = stage.resolve(target, upstream, self.store, fingerprint)
        if resolved is not None:
            if force:
                self.emit(StageEvent(NOTE, stage, target, fingerprint, message=f"{stage.name}: nothing to compute ({resolved.uri}); --force {stage.name} changes nothing"))
            self.emit(StageEvent(REUSED, stage, target, fingerprint, result=resolved, seconds=0.0))
            return resolved
        started = self.emit(StageEvent(STARTED, stage, target, fingerprint))
        began = time.perf_counter()
        output = self.store.output(stage.name, fingerprint)
        existed = output.exists()

        def compute(force_now: bool) -> StageResult:
            return self.compute(stage, target, upstream, fingerprint, force_now, started.annotations)

        try:
            if existed and not force:  # a committed output is reused (even from the executor's cache) only once verified
                verify_output(output)
            result = self.executor(stage, target, upstream, fingerprint, force, compute)
        except BaseException as error:
            redact_error(error)
            self.emit(StageEvent(FAILED, stage, target, fingerprint, error=error, seconds=time.perf_counter() - began,
                                 annotations=started.annotations, message=f"{stage.name}: failed: {type(error).__name__}: {error}"))
            raise
        # an executor's cache returns the result of the run that computed it: report this run's view
        # (a result cached by an older version holds its summary as a JSON dict: typed here)
        summary = stage.view(target, read_summary(stage.summary_type, result.summary))
        result = replace(result, reused=result.reused or (existed and not force), summary=summary)
        seconds = time.perf_counter() - began
        self.seconds[stage.name] = round(seconds, 2)
        self.emit(StageEvent(REUSED if result.reused else FINISHED, stage, target, fingerprint, result=result, seconds=seconds,
                             annotations=started.annotations))
        return result

    def _progress(self, stage: Stage, target: Target, fingerprint: str) -> Progress:
        """The stage's progress callable: notes and structured updates as ``progress`` events."""
        def note(message: str) -> None:
            self.emit(StageEvent(PROGRESS, stage, target, fingerprint, message=message))

        def update(progress: ProgressUpdate) -> None:
            self.emit(StageEvent(PROGRESS, stage, target, fingerprint, message=progress.line(stage.name), progress=progress))

        return Progress(stage.name, note, update)

    def load(self, stage: Stage, fingerprint: str) -> StageResult:
        return stored(self.store, stage, fingerprint)

    def compute(self, stage: Stage, target: Target, upstream: Mapping[str, StageResult], fingerprint: str, force: bool,
                annotations: Mapping[str, Any] | None = None) -> StageResult:
        """Reuse the complete output, or compute it holding the lease (see the module docstring).
        An error leaves with credentials masked in its message (`trecflow.redact.redact_error`),
        before an executor (Prefect) logs it."""
        try:
            return self._compute(stage, target, upstream, fingerprint, force, annotations)
        except BaseException as error:
            raise redact_error(error)

    def _compute(self, stage: Stage, target: Target, upstream: Mapping[str, StageResult], fingerprint: str, force: bool,
                 annotations: Mapping[str, Any] | None = None) -> StageResult:
        output = self.store.output(stage.name, fingerprint)
        if output.exists() and not force:
            return self.load(stage, fingerprint)
        progress = self._progress(stage, target, fingerprint)
        if self.launcher is not None and stage.ray:  # a job on the cluster computes it (and holds the lease)
            self.launcher.compute(stage.name, target, upstream, fingerprint, force, (annotations or {}).get("mlflow_run_id"), progress)
            return replace(self.load(stage, fingerprint), reused=False)
        lease = Lease(output, self.owner, self.lease_seconds)
        poll = self.poll_seconds if self.poll_seconds is not None else min(5.0, lease.seconds / 4)
        announced = None
        while True:
            holder = lease.try_acquire(job_alive)
            if holder is None:
                break
            if output.exists():  # the holder committed while we looked: its output is as fresh as ours would be
                return self.load(stage, fingerprint)
            if holder.owner != announced:
                self.emit(StageEvent(WAITING, stage, target, fingerprint, message=(
                    f"{stage.name}: {output.uri} is being computed by {holder.owner.describe()} (lease until "
                    f"{time.strftime('%H:%M:%S', time.localtime(holder.expires_unix))}); waiting for it")))
                announced = holder.owner
            time.sleep(poll)
            if output.exists():
                return self.load(stage, fingerprint)
        if lease.taken_over is not None:
            previous = lease.taken_over.owner
            why = "is gone" if previous.gone() else "let it expire"
            kept = "continuing what it left" if stage.resumable and not force else "starting over"
            self.emit(StageEvent(NOTE, stage, target, fingerprint, message=f"{stage.name}: took over {output.uri} from {previous.describe()}, which {why}; {kept}"))
        with lease.heartbeat():
            if output.exists() and not force:  # committed between our check and the lease
                return self.load(stage, fingerprint)
            if force or not stage.resumable:
                output.invalidate()
            if force:
                stage.clear(target, fingerprint, self.store)
            context = StageContext(self.store, progress, force, (annotations or {}).get("mlflow_run_id"), self)
            summary = stage.run(target, upstream, output, context)
            if stage.summary_type is not None and not isinstance(summary, stage.summary_type):
                raise TypeError(f"{stage.name}: run returned {type(summary).__name__}, not its summary type {stage.summary_type.__name__}")
            output.write_bytes(SUMMARY_FILE, json.dumps(summary_json(summary), indent=2).encode())
            inputs = stage.manifest_inputs(target, upstream, fingerprint)
            output.commit(inputs=inputs, counts=stage.counts(summary))
        return StageResult(stage.name, fingerprint, output.uri, summary, False, inputs)


def run_stage(stage: Stage, target: Target, store: Store, upstream: Mapping[str, StageResult | str] | None = None, force: bool = False,
              progress: Callable[[str], None] | None = print, graph: Graph | None = None, reporters: Sequence[Reporter] = ()) -> StageResult:
    """One stage on its given upstream results (or the fingerprints of committed ones), in this
    process (what unit tests and benchmarks call): the same fingerprint, lease, reuse and commit as
    in a flow; progress lines to ``progress`` (structured progress as sparse lines: `ProgressLines`)
    and every event first to ``reporters`` (e.g. `flows.progress_reporters.TerminalProgress`)."""
    graph = graph or default_graph()
    loaded = {name: stored(store, graph[name], value) if isinstance(value, str) else value for name, value in (upstream or {}).items()}
    lines = [ProgressLines(progress)] if progress is not None else []
    runner = Runner(graph, store, forced={stage.name} if force else (), reporters=[*reporters, *lines])
    return runner.materialize(stage, target, loaded)


class ProgressLines:
    """A reporter writing a run's notes, waits and structured progress as lines to ``write``: every
    note, and sparse progress lines (`trecflow.progress.LineThrottle`: at most one per 5% of a
    phase, with percentage, rate and ETA) per stage run."""

    def __init__(self, write: Callable[[str], object], min_seconds: float | None = None):
        self.write = write
        self.min_seconds = min_seconds
        self.throttles: dict[tuple[int, str, str | None], LineThrottle] = {}

    def __call__(self, event: StageEvent) -> None:
        key = (event.depth, event.stage.name, event.fingerprint)
        if event.kind == PROGRESS and event.progress is not None:
            throttle = self.throttles.get(key) or self.throttles.setdefault(key, LineThrottle(min_seconds=self.min_seconds))
            if throttle.should_log(event.progress):
                self.write(event.message)
        elif event.kind in (PROGRESS, WAITING, NOTE) and event.message:
            self.write(event.message)
        elif event.kind in (FINISHED, REUSED, FAILED):
            self.throttles.pop(key, None)


def default_graph() -> Graph:
    """The pipeline's graph (`tasks.graph.GRAPH`), imported on first use."""
    from tasks.graph import GRAPH

    return GRAPH


def stored(store: Store, stage: Stage | str, fingerprint: str) -> StageResult:
    """The committed output of ``stage`` (a stage, or the name of one of the pipeline's) with
    ``fingerprint`` as a reused result, its summary read back into the stage's summary type
    (StoreError if incomplete, foreign, or a file is missing or of another size than the manifest
    records: `trecflow.integrity.verify_output`; SummaryError if the stored summary lacks a field)."""
    if isinstance(stage, str):
        stage = default_graph()[stage]
    output = store.output(stage.name, fingerprint)
    manifest = verify_output(output)
    try:
        summary = read_summary(stage.summary_type, json.loads(output.read_bytes(SUMMARY_FILE)))
    except SummaryError as error:
        raise SummaryError(f"{output.file_uri(SUMMARY_FILE)}: {error}") from None
    return StageResult(stage.name, fingerprint, output.uri, summary, True, manifest["inputs"])
