"""What the store holds for a recipe, what a run would reuse, and what can be removed safely.

One planning function, two views: `plan_stages` walks the graph for one target as the runner does
(`trecflow.runner.Runner.run`: the same skipping, the same ``--force`` closure and ``--until``
ancestors) and fingerprints each stage with the stage's own `Stage.fingerprint` from its upstream
*results*, read back from the store (`trecflow.runner.stored`). A stage whose upstream output is
not committed yet has a fingerprint that is *unknown until* that upstream stage is computed.
Nothing is computed, leased or written. ``trecflow status`` shows each stage's state, size and
age; ``trecflow run --dry-run`` shows whether a run would reuse or compute it, and why.

An output folder is inspected with one recursive listing (`inspect_output`): ``complete`` (the
manifest is there), ``leased`` (no manifest, a lease in force), ``partial`` (files, no manifest),
``missing``; only the lease in force is read.

`collect_garbage` (``trecflow gc``) removes what nothing protects among the folders it knows:
``<stage>/<fingerprint>/`` for every stage of the graph, ``checkpoints/<train fingerprint>/`` and
``refcache/<reference fp>-<pack fp>/``. Everything else (``mlflow/``, ``calibration/``, ...) is
never listed nor touched. Protected, each counted once under the first reason that applies:

1. ``kept recipe``: every stage of every kept target whose fingerprint is computable now, the
   store locations its recipe names (a ``base.path`` inside the store), and, transitively, the
   inputs their manifests record and the store locations their summaries name (the tiny base's
   pretraining run, a trained reference, checkpoints);
2. ``registered model``: an output an MLflow model version names by its tags (`registered_outputs`),
   and what its summary names;
3. ``calibration table``: the re-evaluation output of every ``calibration/runs/<fp>.json`` entry;
4. ``leased``: a lease in force (live, or expired but owned by a Ray job that still runs);
5. ``checkpoints of a running job``: ``checkpoints/<fp>`` whose ``train/<fp>`` is leased
   (checkpoints of a kept train output share its reason);
6. ``reference-loss cache in use``: the cache of a kept target's reference model and packed
   sequences, and every cache while an unkept re-evaluation holds a lease (it may be writing one).

A stage output is removed holding its lease (so no runner starts computing into it meanwhile),
manifest first (`StageOutput.invalidate`: a half-removed output never reads as complete), the
lease files last; checkpoints are removed holding the lease of their ``train`` output. All of it
goes through the store's fsspec filesystem, local or S3.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from trecflow.lease import JOB, LEASE_PREFIX, Lease, LeaseLost, LeaseRecord, Owner
from trecflow.ray_jobs import job_alive
from trecflow.runner import Graph, stored
from trecflow.settings import expand_path
from trecflow.stage import SUMMARY_FILE, StageResult, Target
from trecflow.store import MANIFEST, StageOutput, Store, StoreError

COMPLETE, LEASED, PARTIAL, MISSING = "complete", "leased", "partial", "missing"
UNKNOWN, RESOLVED, SKIPPED = "unknown", "resolved", "skipped"  # no output to inspect
REUSE, COMPUTE, SKIP = "reuse", "compute", "skip"

CHECKPOINTS = "checkpoints"  # training.cpt_job.checkpoint_root: <store>/checkpoints/<train fingerprint>/
KEPT_RECIPE, REGISTERED, CALIBRATION = "kept recipe", "registered model", "calibration table"
LEASE_HELD, RUNNING_CHECKPOINTS, CACHE_IN_USE = "leased", "checkpoints of a running job", "reference-loss cache in use"
REASONS = (KEPT_RECIPE, REGISTERED, CALIBRATION, LEASE_HELD, RUNNING_CHECKPOINTS, CACHE_IN_USE)

# the tags a registered model version names its store output by (the pipeline's registration contract)
STORE_TAG, STAGE_TAG, FINGERPRINT_TAG = "trecflow.store", "trecflow.stage", "trecflow.fingerprint"

JobRunning = Callable[[str], bool]
Location = tuple[str, str]  # (top folder of the store, its entry): ("train", "<fp>"), ("refcache", "<key>")


def lease_in_force(output: StageOutput, job_running: JobRunning = job_alive) -> LeaseRecord | None:
    """The lease that holds ``output`` now, by the rule of `Lease.try_acquire`: a live one (not of a
    process that is gone), or an expired one whose owner is a Ray job that still runs; None when
    nobody holds it."""
    record = Lease(output, Owner.this_process()).current()
    if record is None or record.released:
        return None
    if (record.live() and not record.owner.gone()) or (record.owner.kind == JOB and job_running(record.owner.id)):
        return record
    return None


def lease_json(record: LeaseRecord | None) -> dict[str, Any] | None:
    if record is None:
        return None
    owner = record.owner
    return {"owner": owner.describe(), "kind": owner.kind, "id": owner.id, "host": owner.host, "pid": owner.pid,
            "expires_unix": record.expires_unix, "generation": record.generation}


def lease_text(record: LeaseRecord) -> str:
    """``process 123 on host until 14:05:09`` (the expiry a heartbeat keeps pushing forward)."""
    until = time.strftime("%H:%M:%S", time.localtime(record.expires_unix))
    lapsed = " (heartbeat lapsed; the job still runs)" if not record.live() else ""
    return f"{record.owner.describe()} until {until}{lapsed}"


def modified_unix(info: Mapping[str, Any]) -> float | None:
    """A listing entry's modification time: ``mtime`` on a local folder, ``LastModified`` on S3."""
    value = info.get("mtime", info.get("LastModified"))
    if value is None:
        return None
    return value.timestamp() if hasattr(value, "timestamp") else float(value)


@dataclass(frozen=True)
class FolderListing:
    """A folder's files from one recursive listing: name (relative to the folder), size and
    modification time of each."""

    files: tuple[tuple[str, int, float | None], ...] = ()

    @classmethod
    def of(cls, store: Store, path: str) -> FolderListing:
        try:
            listing = store.fs.find(path, detail=True)
        except FileNotFoundError:
            return cls()
        prefix = path.rstrip("/") + "/"
        return cls(tuple((entry[len(prefix):] if entry.startswith(prefix) else entry.rsplit("/", 1)[-1], int(info.get("size") or 0),
                          modified_unix(info)) for entry, info in listing.items()))

    @property
    def bytes(self) -> int:
        return sum(size for _, size, _ in self.files)

    @property
    def modified_unix(self) -> float | None:
        """The newest file's modification time (None for an empty folder)."""
        return max((when for _, _, when in self.files if when is not None), default=None)

    def modified(self, name: str) -> float | None:
        return next((when for entry, _, when in self.files if entry == name), None)


@dataclass(frozen=True)
class OutputState:
    """One ``<stage>/<fingerprint>/`` folder as one recursive listing shows it: its state, size,
    age (the manifest's modification time when complete, else the newest file's) and the lease
    in force, if any (a complete output can be leased too: a forced rerun about to replace it)."""

    state: str
    bytes: int = 0
    modified_unix: float | None = None
    lease: LeaseRecord | None = None


def inspect_output(output: StageOutput, job_running: JobRunning = job_alive) -> OutputState:
    """The state of ``output`` (see `OutputState`); reads no file but the lease in force."""
    listing = FolderListing.of(output.store, output.path)
    names = {name for name, _, _ in listing.files}
    lease = lease_in_force(output, job_running) if any(name.startswith(LEASE_PREFIX) for name in names) else None
    if MANIFEST in names:
        return OutputState(COMPLETE, listing.bytes, listing.modified(MANIFEST), lease)
    has_data = any(not name.startswith(LEASE_PREFIX) for name in names)
    return OutputState(LEASED if lease is not None else PARTIAL if has_data else MISSING, listing.bytes, listing.modified_unix, lease)


@dataclass(frozen=True)
class StagePlan:
    """One stage of a target as the store stands: its fingerprint (None when ``unknown_until`` an
    upstream stage is computed, or when skipped), its state and what a run would do with it."""

    stage: str
    scope: str
    fingerprint: str | None
    state: str  # complete | leased | partial | missing | unknown | resolved | skipped
    uri: str | None = None
    output: OutputState | None = None
    unknown_until: str | None = None
    forced: bool = False
    resumable: bool = False
    note: str = ""  # why skipped; what a resolved stage names; why a complete output cannot be read

    @property
    def action(self) -> str:
        """What a run would do: ``reuse``, ``compute`` or ``skip``."""
        if self.state == SKIPPED:
            return SKIP
        if self.state == RESOLVED or (self.state == COMPLETE and not self.forced and not self.note):
            return REUSE
        return COMPUTE

    @property
    def reason(self) -> str:
        """Why a run would do `action` (one phrase)."""
        if self.state == SKIPPED:
            return self.note
        if self.state == RESOLVED:
            return "nothing to compute" + (f"; --force {self.stage} changes nothing" if self.forced else "")
        if self.forced:
            return "forced" + (f" (fingerprint unknown until {self.unknown_until} is computed)" if self.unknown_until else "")
        if self.state == UNKNOWN:
            return f"fingerprint unknown until {self.unknown_until} is computed"
        if self.state == COMPLETE:
            return self.note or "complete output with the same fingerprint"
        if self.state == LEASED:
            return f"leased by {lease_text(self.output.lease)}: the run waits for it, then reuses its output"
        if self.state == PARTIAL:
            return "partial output (no manifest): " + ("continued" if self.resumable else "cleared and computed again")
        return "missing"

    def as_json(self, now: float | None = None) -> dict[str, Any]:
        output = self.output
        modified = output.modified_unix if output else None
        return {
            "stage": self.stage,
            "scope": self.scope,
            "fingerprint": self.fingerprint,
            "unknown_until": self.unknown_until,
            "state": self.state,
            "uri": self.uri,
            "bytes": output.bytes if output else None,
            "modified_unix": modified,
            "age_seconds": None if modified is None else round(max(0.0, (now or time.time()) - modified), 3),
            "lease": lease_json(output.lease if output else None),
            "action": self.action,
            "reason": self.reason,
            "forced": self.forced,
        }


def plan_stages(graph: Graph, store: Store, target: Target, forced: Iterable[str] = (), until: str | None = None,
                job_running: JobRunning = job_alive) -> list[StagePlan]:
    """Every stage a run of ``target`` up to ``until`` (every stage when None) would visit, in the
    graph's order, with its fingerprint and state; ``forced`` as ``--force`` (with its downstream
    closure). Only listings, manifests, summaries and leases are read; nothing is written."""
    forced_names = graph.forced_closure(forced)
    results: dict[str, StageResult] = {}
    waits_for: dict[str, str] = {}  # stage -> the earliest stage that must be computed before its fingerprint is known
    plans: list[StagePlan] = []
    for name in graph.ancestors(until):
        stage = graph[name]
        common = {"stage": name, "scope": stage.scope, "forced": name in forced_names, "resumable": stage.resumable}
        applies = stage.applies(target)  # (required_inputs may read the sections it checks)
        lacking = [input_name for input_name in stage.required_inputs(target) if input_name not in results and input_name not in waits_for] if applies else []
        if not applies or lacking:  # as the runner skips it
            why = f"no {', '.join(stage.missing(target))} section" if not applies else f"needs {', '.join(lacking)}"
            plans.append(StagePlan(fingerprint=None, state=SKIPPED, note=why, **common))
            continue
        refusal = stage.refusal(target)
        if refusal is not None:  # a run refuses it before any work: so does the plan (what follows needs it)
            plans.append(StagePlan(fingerprint=None, state=SKIPPED, note=f"refused: {refusal}", **common))
            continue
        blocking = [waits_for[input_name] for input_name in stage.inputs if input_name in waits_for]
        if blocking:
            waits_for[name] = min(blocking, key=graph.names.index)
            plans.append(StagePlan(fingerprint=None, state=UNKNOWN, unknown_until=waits_for[name], **common))
            continue
        upstream = {input_name: results[input_name] for input_name in stage.inputs if input_name in results}
        fingerprint = stage.fingerprint(target, upstream, store)
        resolved = stage.resolve(target, upstream, store, fingerprint)
        if resolved is not None:
            results[name] = resolved
            plans.append(StagePlan(fingerprint=fingerprint, state=RESOLVED, uri=resolved.uri, note=f"nothing to compute: {resolved.uri}", **common))
            continue
        output = store.output(name, fingerprint)
        state = inspect_output(output, job_running)
        note = ""
        if state.state == COMPLETE:
            try:
                loaded = stored(store, stage, fingerprint)
                results[name] = replace(loaded, summary=stage.view(target, loaded.summary))
            except (StoreError, ValueError) as error:  # removed a moment ago, or written by another version (SummaryError)
                note = f"unreadable: {error}"
        if name not in results:
            waits_for[name] = name
        plans.append(StagePlan(fingerprint=fingerprint, state=state.state, uri=output.uri, output=state, note=note, **common))
    return plans


# --- garbage collection ------------------------------------------------------------------------


@dataclass(frozen=True)
class Removal:
    """One folder gc removes (or would remove): ``folder/name`` under the store."""

    folder: str  # a stage, checkpoints or refcache
    name: str  # a fingerprint, or a reference-loss cache key
    uri: str
    bytes: int
    state: str  # complete | partial | missing for a stage output; "-" for checkpoints and caches

    @property
    def location(self) -> str:
        return f"{self.folder}/{self.name}"

    def as_json(self) -> dict[str, Any]:
        return {"location": self.location, "uri": self.uri, "bytes": self.bytes, "state": self.state}


@dataclass
class GarbageReport:
    """What gc removed (or would remove with ``dry_run``) and how many folders it kept per reason."""

    store: str
    dry_run: bool
    removed: list[Removal] = field(default_factory=list)
    kept: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REASONS, 0))
    # outputs of no kept recipe being computed now: what they read is not known until they commit
    running: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(item.bytes for item in self.removed)

    def keep(self, reason: str) -> None:
        self.kept[reason] += 1

    def as_json(self) -> dict[str, Any]:
        return {"store": self.store, "dry_run": self.dry_run, "removed": [item.as_json() for item in self.removed],
                "removed_count": len(self.removed), "total_bytes": self.total_bytes, "kept": dict(self.kept),
                "running_unreferenced": list(self.running)}


def locate(store: Store, uri: str) -> Location | None:
    """``(top folder, entry)`` of a URI or path inside the store (``train/<fp>/model`` gives
    ``("train", "<fp>")``), else None."""
    uri = expand_path(uri.removeprefix("file://")) if "://" not in uri or uri.startswith("file://") else uri
    prefix = store.url.rstrip("/") + "/"
    if not uri.startswith(prefix):
        return None
    parts = uri[len(prefix):].split("/")
    return (parts[0], parts[1]) if len(parts) >= 2 and parts[0] and parts[1] else None


def strings(value: Any) -> Iterator[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from strings(item)


def named_locations(store: Store, value: Any) -> set[Location]:
    """The store locations a JSON value (a recipe, a summary) names."""
    return {location for text in strings(value) if (location := locate(store, text)) is not None}


def closure(graph: Graph, store: Store, roots: Iterable[Location], follow_inputs: bool) -> set[Location]:
    """``roots`` and, transitively, the locations their committed summaries name and (with
    ``follow_inputs``) the stage outputs their manifests record as inputs."""
    seen: set[Location] = set()
    pending = list(roots)
    while pending:
        location = pending.pop()
        if location in seen:
            continue
        seen.add(location)
        folder, name = location
        if folder not in graph.by_name:
            continue  # checkpoints, caches: they name nothing
        output = store.output(folder, name)
        try:
            manifest = output.manifest()
        except (StoreError, ValueError):  # not committed (partial, missing): it records nothing to follow
            continue
        if follow_inputs:
            pending.extend((stage, fp) for stage, fp in manifest.get("inputs", {}).items() if stage in graph.by_name and fp)
        if SUMMARY_FILE in manifest.get("files", {}):
            try:
                pending.extend(named_locations(store, json.loads(store.fs.cat_file(output.file_path(SUMMARY_FILE)))))
            except (FileNotFoundError, ValueError):
                continue
    return seen


def registered_outputs(store: Store, tracking_uri: str, page_size: int = 1000) -> set[Location]:
    """The ``(stage, fingerprint)`` of every output of ``store`` that a registered MLflow model
    version names by its tags (``trecflow.store``, ``trecflow.stage``, ``trecflow.fingerprint``),
    over every page of the registry. A SQLite database that does not exist has none (and is not
    created)."""
    if tracking_uri.startswith("sqlite:///") and not os.path.exists(tracking_uri[len("sqlite:///"):]):
        return set()
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found: set[Location] = set()
    token = None
    while True:
        page = client.search_model_versions(max_results=page_size, page_token=token)
        for version in page:
            tags = version.tags or {}
            if tags.get(STORE_TAG, "").rstrip("/") == store.url and tags.get(STAGE_TAG) and tags.get(FINGERPRINT_TAG):
                found.add((tags[STAGE_TAG], tags[FINGERPRINT_TAG]))
        token = page.token
        if not token:
            return found


def calibration_outputs(store: Store) -> set[Location]:
    """The re-evaluation outputs the calibration table is made of (``calibration/runs/<fp>.json``:
    one listing, no entry read)."""
    from tasks.calibrate import FOLDER
    from tasks.reevaluate import STAGE as REEVALUATE

    return {(REEVALUATE, name[: -len(".json")]) for name in folder_names(store, FOLDER, "runs") if name.endswith(".json")}


def folder_names(store: Store, *parts: str) -> list[str]:
    """The names of the entries of one store folder (one listing; none when it does not exist)."""
    path = store.path(*parts)
    try:
        entries = store.fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    return sorted(name for entry in entries if (name := entry.rstrip("/").rsplit("/", 1)[-1]) and not name.startswith("."))


def kept_references(graph: Graph, store: Store, keep: Sequence[Target], job_running: JobRunning = job_alive) -> tuple[set[Location], set[str]]:
    """What the kept targets reference (`closure` of their planned outputs, following inputs) and
    the reference-loss caches they use (``refcache`` keys)."""
    from tasks.reference import Reference, cache_folder

    roots: set[Location] = set()
    caches: set[str] = set()
    for target in keep:
        plans = {plan.stage: plan for plan in plan_stages(graph, store, target, job_running=job_running)}
        for plan in plans.values():
            if plan.fingerprint is not None and plan.state != SKIPPED:
                roots.add((plan.stage, plan.fingerprint))
            if plan.uri is not None and (location := locate(store, plan.uri)) is not None:
                roots.add(location)  # a base given as a folder inside the store
        roots |= named_locations(store, target.recipe.model_dump(mode="json"))
        reference, pack = plans.get("reference"), plans.get("pack")
        if reference and pack and reference.fingerprint and pack.fingerprint:  # the cache its re-evaluation reads and writes
            caches.add(cache_folder(store, Reference("", reference.fingerprint, ""), pack.fingerprint).rsplit("/", 1)[-1])
    return closure(graph, store, roots, follow_inputs=True), caches


def collect_garbage(graph: Graph, store: Store, keep: Sequence[Target], registered: Iterable[Location], *, dry_run: bool,
                    job_running: JobRunning = job_alive) -> GarbageReport:
    """Remove (or with ``dry_run`` only list) every folder of the stage folders, ``checkpoints/``
    and ``refcache/`` that nothing protects (see the module docstring). ``registered``: the
    outputs registered model versions name (`registered_outputs`). Each folder is listed once per
    top folder; only unprotected outputs are inspected."""
    from tasks.reevaluate import STAGE as REEVALUATE
    from tasks.reference import CACHE
    from tasks.train import STAGE as TRAIN

    referenced, caches = kept_references(graph, store, keep, job_running)
    protected: dict[Location, str] = {}
    for locations, reason in ((referenced, KEPT_RECIPE), (closure(graph, store, registered, follow_inputs=False), REGISTERED),
                              (closure(graph, store, calibration_outputs(store), follow_inputs=False), CALIBRATION)):
        for location in locations:
            protected.setdefault(location, reason)

    report = GarbageReport(store.url, dry_run)
    train_reasons: dict[str, str] = {}
    reevaluation_running = False
    for stage in graph.names:
        for fp in folder_names(store, stage):
            reason = protected.get((stage, fp))
            state = None
            if reason is None:
                state = inspect_output(store.output(stage, fp), job_running)
                if state.lease is not None:
                    reason = LEASE_HELD
                    reevaluation_running |= stage == REEVALUATE
                    report.running.append(f"{stage}/{fp} (leased by {lease_text(state.lease)})")
            if reason is not None:
                report.keep(reason)
                if stage == TRAIN:
                    train_reasons[fp] = reason
                continue
            report.removed.append(Removal(stage, fp, store.uri(stage, fp), state.bytes, state.state))
    for fp in folder_names(store, CHECKPOINTS):
        reason = protected.get((CHECKPOINTS, fp)) or train_reasons.get(fp)
        if reason is not None:
            report.keep(RUNNING_CHECKPOINTS if reason == LEASE_HELD else reason)
            continue
        report.removed.append(Removal(CHECKPOINTS, fp, store.uri(CHECKPOINTS, fp), FolderListing.of(store, store.path(CHECKPOINTS, fp)).bytes, "-"))
    for key in folder_names(store, CACHE):
        if key in caches or reevaluation_running or (CACHE, key) in protected:
            report.keep(CACHE_IN_USE)
            continue
        report.removed.append(Removal(CACHE, key, store.uri(CACHE, key), FolderListing.of(store, store.path(CACHE, key)).bytes, "-"))

    if not dry_run:
        done = []
        for item in report.removed:
            if remove(store, item, TRAIN, CACHE, job_running):
                done.append(item)
            else:  # a runner took its lease since the listing: it stays
                report.keep(RUNNING_CHECKPOINTS if item.folder == CHECKPOINTS else LEASE_HELD)
        report.removed = done
    return report


def remove(store: Store, item: Removal, train_stage: str, cache_folder: str, job_running: JobRunning = job_alive) -> bool:
    """Remove one folder; False (nothing removed) when a runner holds the lease it needs. A stage
    output: under its own lease, manifest first, lease files last. Checkpoints: under the lease of
    their ``train_stage`` output. A reference-loss cache (``cache_folder``): at once (its parts
    are immutable, written whole; caches have no lease)."""
    fs = store.fs
    if item.folder == cache_folder:
        fs.rm(store.path(item.folder, item.name), recursive=True)
        return True
    lease_stage = train_stage if item.folder == CHECKPOINTS else item.folder
    output = store.output(lease_stage, item.name)
    lease = Lease(output, Owner.this_process())
    if lease.try_acquire(job_running) is not None:
        return False
    generation = lease.generation
    try:
        with lease.heartbeat():  # renewed while a large folder goes
            if item.folder == CHECKPOINTS:
                fs.rm(store.path(CHECKPOINTS, item.name), recursive=True)
            else:
                output.invalidate()  # the manifest first, then the data; lease files stay
    except LeaseLost:
        return False
    remove_lease_files(output, generation)
    return True


def remove_lease_files(output: StageOutput, upto_generation: int) -> None:
    """Remove the lease files up to ``upto_generation`` (ours, released) and the folder if that
    leaves it empty; a lease a runner took after ours stays with its folder."""
    fs = output.store.fs
    try:
        entries = fs.ls(output.path, detail=False)
    except FileNotFoundError:
        return
    ours = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(LEASE_PREFIX) and name.endswith(".json") and int(name[len(LEASE_PREFIX):-5]) <= upto_generation:
            ours.append(entry)
    if ours:
        fs.rm(ours)
    if len(ours) == len(entries):
        try:
            fs.rmdir(output.path)  # a local folder; on S3 the prefix is gone with its last object
        except OSError:
            pass
