"""Stage 4, train: the continual-pretraining job of one variant (`training.cpt_job` on Ray Train).

Before any training it checks what would make the run wrong: the sample index must carry the
fingerprints this recipe and variant expect, the base model's vocabulary must hold the
tokenizer's, and a checkpoint left in the store must be of this run and world size (the batch
dividing across the workers is checked with the recipe).

Output ``<store>/train/<fingerprint>/``: ``model/`` (``save_pretrained`` with the tokenizer: the
delivered model, the average of the snapshots for a variant with ``averaging``; the raw final
weights are then beside it in ``final_model/``),
``audit/attempt-*/part-*.jsonl`` (one record per step of every attempt), ``run.json`` (what makes
runs comparable: `training.loss_curves.run_descriptor`), ``summary.json`` and the manifest last. Checkpoints go to ``<store>/checkpoints/<fingerprint>/`` through Ray Train (the
last ``keep_checkpoints``); they outlive a failed attempt, so a Prefect retry of `train_cpt`
resumes from the latest one, and they are logged to MLflow as store URIs, not uploaded.
A variant with its own ``schedule`` trains with it (`Recipe.for_variant`: the schedule object its
prediction integrated); a variant with ``averaging`` keeps the running average of its snapshots
in the job (`training.cpt_job`; with ZeRO-3 it is refused before any work, `TrainStage.refusal`).
The fingerprint covers the index, the base model, the optimizer, schedule, the averaging (when
there is one) and the training
settings that change the numbers (not logging, checkpoint cadence or retries, nor the ``collapse``
section: the monitor only watches), and an injected LR fault (`training.cpt_job.FAULT_ENV`, a
testing aid) when there is one.

The collapse monitor (`training.collapse`, recipe section ``collapse``): before the job, the run's
family is looked up in the store's catalog (`collapse_family`: finished runs with the same schedule
shape, variant, TPP and tau, except ones that drifted or had an injected fault) and its curve fitted
from their audit logs; the progress log says which family (N runs) or why there is none. While the
job runs and when it ends, a drift the workers report (`training.cpt_job.COLLAPSE_EVENT`) becomes a
warning line (`CollapseEvents`); a run the monitor stopped fails the stage with one line
(`training.collapse.CollapseStopped`, not retried), before the audit check, its checkpoints kept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from trecflow.fingerprint import fingerprint
from trecflow.progress import as_progress
from trecflow.recipe import Recipe, RecipeError
from trecflow.settings import tracking_uri
from trecflow.stage import OMIT_NONE, VARIANT_SCOPE, Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store
from training.audit import attempts, check_audit, read_audit
from training.averaging import averaging_weights, snapshot_steps
from training.collapse import CollapseStopped, FamilyCurve, describe_family, fit_family, same_family, usable_curve
from training.cpt_job import COLLAPSE_EVENT, FAULT_ENV, FINAL_MODEL_DIR, MODEL_DIR, JobError, JobSpec, checkpoint_root, injected_lr_fault, run_job
from training.deepspeed_config import fingerprint_part
from training.loss_curves import RUN_FILE, catalog, final_trajectory, run_descriptor
from training.models import model_vocab_size
from training.sample_index import PLACE_STAGE, SampleIndex, batch_hash

STAGE = "train"
STAGE_VERSION = 1
# Settings that do not change the trained weights: left out of the fingerprint.
# Settings that change neither the numbers nor the resumability of a run; the DeepSpeed JSON enters
# through `fingerprint_part` (only its keys that change results).
NOT_FINGERPRINTED = ("checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "cpus_per_worker", "placement",
                     "deepspeed_config", "activation_checkpointing")
MAX_FAMILY_RUNS = 32  # a family curve is fitted on at most this many runs (the first by fingerprint)


@dataclass(frozen=True)
class BaseModel:
    """The model a job starts from: a Hugging Face folder, or a from-scratch config."""

    fingerprint: str
    uri: str | None = None
    config: dict[str, Any] | None = None


@dataclass(frozen=True)
class AuditSummary(Summary):
    """What the audit log shows (`training.audit.AuditReport.summary`): records over attempts,
    re-executed steps, the first missing or wrong steps and whether every planned batch ran once."""

    steps: int
    records: int
    attempts: tuple[int, ...]
    reexecuted_steps: int
    missing_steps: tuple[int, ...]
    wrong_batches: tuple[int, ...]
    out_of_order: bool
    exactly_once: bool


@dataclass(frozen=True)
class TrainSummary(Summary):
    """A trained run: final loss, throughput, where it resumed (None: it did not), the model and
    the checkpoints kept (store URIs), the audit, the workers and the output's fingerprint; with
    checkpoint averaging, ``model_uri`` is the averaged model and ``final_model_uri`` the raw one."""

    steps: int
    final_loss: float
    tokens_per_second: float | None
    resumed_from_step: int | None
    model_uri: str
    audit: AuditSummary
    checkpoints: tuple[str, ...]
    workers: int
    fingerprint: str
    # with averaging: the raw final weights (model_uri is the average); keyword-only and left out of
    # the JSON when None, so summaries that extend this one (the tiny base's) add fields after it
    final_model_uri: str | None = field(default=None, metadata={OMIT_NONE: True}, kw_only=True)


def train_fingerprint(recipe: Recipe, place_fp: str, base_fp: str, variant: str | None = None) -> str:
    config = recipe.section("optimizer", "schedule", "training")
    averaging = recipe.averaging(variant)
    if averaging is not None:  # only then: every other run keeps its fingerprint
        config["averaging"] = averaging.model_dump(mode="json")
    for key in NOT_FINGERPRINTED:
        config["training"].pop(key)
    config["steps"] = recipe.steps
    deepspeed = fingerprint_part(recipe)
    if deepspeed:
        config["deepspeed"] = deepspeed
    fault = injected_lr_fault(recipe.steps)
    if fault is not None:  # a faulty run is another output: it never takes a normal run's place
        config["lr_fault"] = fault
    return fingerprint(STAGE, STAGE_VERSION, config, {"place": place_fp, "base": base_fp})


def averaging_plan(recipe: Recipe, variant: str | None, steps: int) -> dict[str, Any] | None:
    """The job's averaging (`JobSpec.averaging`): the snapshot steps and their weights, oldest
    first, exactly as the predictor weighs them; None when the variant does not average."""
    averaging = recipe.averaging(variant)
    if averaging is None:
        return None
    return {"snapshots": snapshot_steps(averaging, steps).tolist(), "weights": averaging_weights(averaging).tolist()}


def check_vocabulary(base: BaseModel, tokenizer_vocab: int, endpoint_url: str | None) -> None:
    model_vocab = model_vocab_size(base.uri, endpoint_url) if base.uri else (base.config or {}).get("vocab_size")
    if model_vocab is not None and model_vocab < tokenizer_vocab:
        raise RecipeError(
            f"base: the model's vocabulary ({model_vocab:,} tokens, {base.uri or 'tiny config'}) is smaller than the "
            f"tokenizer's ({tokenizer_vocab:,}); token ids past it would have no embedding"
        )


def collapse_event(store: Store, train_fp: str) -> dict[str, Any] | None:
    """The collapse monitor's event file (`COLLAPSE_EVENT`) of a training output, or None."""
    path = store.output(STAGE, train_fp).file_path(COLLAPSE_EVENT)
    try:
        return json.loads(store.fs.cat_file(path))
    except FileNotFoundError:
        return None


def collapse_family(recipe: Recipe, store: Store, variant: str | None, train_fp: str, progress: Callable[[str], None]) -> FamilyCurve | None:
    """The family curve the run ``train_fp`` is watched against, or None with the reason said once
    in the progress log: the monitor is off, or fewer than ``collapse.min_runs`` finished runs of
    the store's catalog share the run's schedule shape, variant, TPP and tau
    (`training.collapse.same_family`). Runs that drifted, had an injected LR fault or whose curve
    is incomplete or not finite are left out; at most `MAX_FAMILY_RUNS` are fitted."""
    settings = recipe.collapse
    if not settings.enabled:
        progress("train: collapse monitor off (collapse.enabled: false)")
        return None
    descriptor = run_descriptor(recipe, variant)
    label = describe_family(descriptor)
    candidates, left_out = [], 0
    for member_fp, member in catalog(store):
        if member_fp == train_fp or not same_family(descriptor, member):
            continue
        if member.get("lr_fault") or (collapse_event(store, member_fp) or {}).get("state") in ("drift", "stopped"):
            left_out += 1
        else:
            candidates.append((member_fp, member))
    curves, unread = {}, 0
    for member_fp, member in candidates:
        if len(curves) == MAX_FAMILY_RUNS:
            unread += 1
            continue
        losses = np.array([record["loss"] for record in final_trajectory(store, member_fp)], dtype=np.float64)
        if usable_curve(losses, member["steps"]):
            curves[member_fp] = losses
        else:
            left_out += 1
    excluded = f"; {left_out} more left out (drifted, injected fault or incomplete curve)" if left_out else ""
    if len(curves) < settings.min_runs:
        progress(f"train: collapse monitor off: {len(curves)} finished run(s) in the store share this run's {label}{excluded}; "
                 f"a family needs collapse.min_runs = {settings.min_runs}")
        return None
    try:
        family = fit_family(curves, smoothing=settings.smoothing, start=settings.start, lag=settings.smoothing + settings.patience,
                            min_spread=settings.min_spread, description=label)
    except ValueError as error:
        progress(f"train: collapse monitor off: the family's curve cannot be fitted: {error}")
        return None
    more = f" ({unread} more not read: a family curve is fitted on at most {MAX_FAMILY_RUNS})" if unread else ""
    progress(f"train: collapse monitor: family of {len(curves)} run(s){more}: {label}{excluded}; warns when |residual| > "
             f"{settings.threshold:g} x the family's spread ({family.spread.min():.2%}..{family.spread.max():.2%}) for "
             f"{settings.patience:.1%} of training{'; stops the run' if settings.stop else ''}")
    return family


def collapse_line(event: Mapping[str, Any]) -> str:
    """What a drift looks like in one line: step, residual, threshold, patience and the family."""
    first, family = event["first_drift"], event["family"]
    return (f"from step {first['step']:,} ({first['t_hat']:.0%} of training) the residual is {first['residual']:+.2%}, beyond "
            f"+-{first['threshold']:.2%} ({event['threshold']:g} x the family's spread) for {event['patience_steps']:,} step(s), against "
            f"the family of {family['runs']} run(s): {family['description']}")


class CollapseEvents:
    """The workers' collapse event (`COLLAPSE_EVENT`) as progress lines: one warning per drift
    (a drift an earlier attempt reported is said once, as such)."""

    def __init__(self, store: Store, train_fp: str, progress: Callable[[str], None]):
        self.store, self.train_fp, self.progress = store, train_fp, progress
        earlier = collapse_event(store, train_fp)
        self.warned = (earlier.get("first_drift") or {}).get("step") if earlier else None
        if self.warned is not None:
            progress(f"train: warning: collapse monitor (an earlier attempt): {collapse_line(earlier)}")

    def poll(self) -> dict[str, Any] | None:
        """The event now (None: none), warning about a drift not reported yet."""
        event = collapse_event(self.store, self.train_fp)
        first = (event or {}).get("first_drift")
        if first is not None and first["step"] != self.warned:
            self.warned = first["step"]
            self.progress(f"train: warning: collapse monitor: {collapse_line(event)} (MLflow tag trecflow.collapse)")
        return event


def collapse_stopped(event: Mapping[str, Any], store: Store, train_fp: str) -> CollapseStopped:
    """The one-line error of a run the monitor stopped."""
    step = event["stopped_after_step"] + 1
    return CollapseStopped(
        f"train: the collapse monitor stopped the run after step {step:,} of {event['steps']:,}: {collapse_line(event)}; "
        f"its checkpoint of step {step:,} stays in {store.uri('checkpoints', train_fp)} (set collapse.stop: false to continue it, "
        f"or force the train stage to start over)"
    )


def base_model(result: StageResult) -> BaseModel:
    """The model a ``base`` result names: its checkpoint folder, or a from-scratch config."""
    return BaseModel(result.fingerprint, uri=result.summary.model_uri, config=result.summary.config)


def base_result(base: BaseModel) -> StageResult:
    """``base`` as the ``base`` stage's result (what a stage run alone is given)."""
    from tasks.base_model import ConfigBaseSummary, PathBaseSummary

    summary = PathBaseSummary(kind="path", model_uri=base.uri) if base.uri is not None else ConfigBaseSummary(kind="config", config=base.config)
    return StageResult("base", base.fingerprint, base.uri, summary, True)


def stored_index(store: Store, index_fp: str, expected_inputs: dict[str, str]) -> StageResult:
    """The committed index ``index_fp``; IndexMismatchError unless it records ``expected_inputs``."""
    from trecflow.runner import stored

    SampleIndex(store, index_fp, expected=expected_inputs)
    return stored(store, PLACE_STAGE, index_fp)


class TrainStage(
    Stage[TrainSummary], name=STAGE, version=STAGE_VERSION, inputs=("tokenizer", "place", "base"), scope=VARIANT_SCOPE,
    sections=("corpus", "tokenizer", "base"), title="Training", task_name="train_cpt", ray=True, purpose="training", resumable=True,
    summary_type=TrainSummary
):
    """Stage 4: the DeepSpeed job on Ray Train for one variant's index, from the base model.
    Resumable: an incomplete output (the audit log of earlier attempts) is continued from the
    latest checkpoint unless the stage is forced."""

    def refusal(self, target: Target) -> str | None:
        """ZeRO-3 partitions the parameters, so no rank holds the weights to add to the running
        average: a variant with ``averaging`` under ZeRO-3 is refused before any work."""
        if target.recipe.averaging(target.variant) is None or target.recipe.training.zero_stage != 3:
            return None
        return (f"curriculum.variants.{target.variant}.averaging: checkpoint averaging needs training.zero_stage 0, 1 or 2 "
                f"(ZeRO-3 partitions the weights the average adds up); use ZeRO-1 or 2, or remove averaging from this variant")

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return train_fingerprint(target.recipe.for_variant(target.variant), upstream["place"].fingerprint, upstream["base"].fingerprint,
                                 target.variant)

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        return {"place": upstream["place"].fingerprint, "base": upstream["base"].fingerprint, "tokenizer": upstream["tokenizer"].fingerprint}

    def clear(self, target: Target, fingerprint: str, store: Store) -> None:
        if store.fs.exists(checkpoint_root(store, fingerprint)):
            store.fs.rm(checkpoint_root(store, fingerprint), recursive=True)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> TrainSummary:
        return train(target.recipe.for_variant(target.variant), context.store, upstream["place"], base_model(upstream["base"]), output,
                     context.progress, context.tracking_run_id, variant=target.variant)

    def counts(self, summary: TrainSummary) -> dict[str, Any]:
        return {"steps": summary.steps, "records": summary.audit.records, "reexecuted_steps": summary.audit.reexecuted_steps}

    def rows(self, summary: TrainSummary) -> list[tuple[str, str]]:
        audit = summary.audit
        return [
            ("steps", f"{summary.steps:,} on {summary.workers} workers"),
            ("final loss", f"{summary.final_loss:.4f}"),
            ("tokens/s", f"{summary.tokens_per_second or 0:,.0f}"),
            ("resumed from step", "-" if summary.resumed_from_step is None else f"{summary.resumed_from_step:,}"),
            ("audit", f"{audit.records:,} records over {len(audit.attempts)} attempt(s); {audit.reexecuted_steps:,} re-executed steps; "
                      f"every planned batch exactly once: {audit.exactly_once}"),
            ("model", summary.model_uri + (" (the average of the snapshots)" if summary.final_model_uri else "")),
            *([("final model (raw)", summary.final_model_uri)] if summary.final_model_uri else []),
            ("checkpoints", ", ".join(summary.checkpoints) or "-"),
        ]

    def metrics(self, summary: TrainSummary) -> dict[str, float]:
        """The end-of-run metrics (per-step ones come from the job)."""
        metrics = {
            "final_loss": summary.final_loss,
            "train_tokens_per_second": summary.tokens_per_second or 0.0,
            "reexecuted_steps": summary.audit.reexecuted_steps,
            "attempts": len(summary.audit.attempts),
        }
        if summary.resumed_from_step is not None:
            metrics["resumed_from_step"] = summary.resumed_from_step
        return metrics

    def tags(self, summary: TrainSummary) -> dict[str, str]:
        tags = {"trecflow.model_uri": summary.model_uri, "trecflow.checkpoints": " ".join(summary.checkpoints)[:5000]}
        if summary.final_model_uri:
            tags["trecflow.final_model_uri"] = summary.final_model_uri
        return tags


TRAIN = TrainStage()


def run_train(recipe: Recipe, store: Store, index_fp: str, expected_inputs: dict[str, str], base: BaseModel, force: bool = False,
              progress: Callable[[str], None] = print, variant: str | None = None) -> StageResult[TrainSummary]:
    """Train (or resume, or reuse) the run of ``recipe`` (as ``variant`` runs it: its schedule and
    averaging) on the committed index ``index_fp`` from ``base`` alone; the index must carry
    ``expected_inputs``."""
    from trecflow.runner import run_stage

    upstream = {"tokenizer": expected_inputs["tokenizer"], "place": stored_index(store, index_fp, expected_inputs), "base": base_result(base)}
    return run_stage(TRAIN, Target(recipe, variant), store, upstream, force=force, progress=progress)


def train(recipe: Recipe, store: Store, placed: StageResult, base: BaseModel, output: StageOutput, progress: Callable[[str], None],
          mlflow_run_id: str | None = None, variant: str | None = None) -> TrainSummary:
    """Run the job on the index ``placed`` from ``base`` into ``output``, then check its audit log."""
    index_fp, expected_inputs = placed.fingerprint, placed.inputs
    index = SampleIndex(store, index_fp, expected=expected_inputs)  # another recipe's index: refused here
    tokenizer_fp = expected_inputs["tokenizer"]
    tokenizer_info = json.loads(store.output("tokenizer", tokenizer_fp).read_bytes("tokenizer_info.json"))
    check_vocabulary(base, tokenizer_info["vocab_size"], store.endpoint_url)
    fp = output.fingerprint
    lr_fault = injected_lr_fault(index.steps)
    earlier = collapse_event(store, fp)
    if earlier is not None and earlier["state"] == "stopped":
        if recipe.collapse.stop:
            raise collapse_stopped(earlier, store, fp)
        progress(f"train: continuing the run the collapse monitor stopped after step {earlier['stopped_after_step'] + 1:,} "
                 f"(collapse.stop is false now)")
        store.fs.pipe_file(output.file_path(COLLAPSE_EVENT), json.dumps({**earlier, "state": "drift"}, indent=2).encode())
    family = collapse_family(recipe, store, variant, fp, progress)
    if lr_fault is not None:
        progress(f"train: {FAULT_ENV} (a testing aid): the LR of steps {lr_fault['first']}..{lr_fault['first'] + lr_fault['steps'] - 1} "
                 f"is multiplied by {lr_fault['factor']:g}")
    spec = JobSpec(
        recipe=recipe.model_dump(mode="json"),
        store_url=store.url,
        endpoint_url=store.endpoint_url,
        index_fingerprint=index_fp,
        index_inputs=expected_inputs,
        tokenizer_fingerprint=tokenizer_fp,
        output_path=output.path,
        run_fingerprint=fp,
        base_uri=base.uri,
        model_config=base.config,
        mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking_uri() if mlflow_run_id else None,
        collapse=None if family is None else {"family": family.as_json(), "threshold": recipe.collapse.threshold,
                                              "patience": recipe.collapse.patience, "stop": recipe.collapse.stop},
        lr_fault=lr_fault,
        averaging=averaging_plan(recipe, variant, index.steps),
    )
    training = recipe.training
    progress(
        f"train: {index.steps:,} steps on {training.workers} workers (micro-batch {recipe.micro_batch}, accumulation "
        f"{training.accumulation}, ZeRO-{training.zero_stage}, {training.precision}) from {base.uri or 'a new model'}"
    )
    events = CollapseEvents(store, fp, progress) if family is not None else None
    attempts_before = attempts(store, output.path)  # an attempt that resumes at the last step writes no audit record
    with ProgressReporter(store, output.path, index.steps, progress, events):
        result = run_job(spec, progress)
    if result.error is not None:
        raise result.error
    event = events.poll() if events is not None else None
    if event is not None and event["state"] == "stopped":
        raise collapse_stopped(event, store, fp)  # before the audit check: a stopped run is incomplete by design

    report = check_audit(read_audit(store, output.path), index.steps, lambda step: batch_hash(index.batch(step)))
    if not report.exactly_once:
        raise RuntimeError(f"{output.uri}: the audit log does not show every planned batch exactly once: {report.summary()}")
    final = report.final
    last_attempt = [record for record in final if record["attempt"] == report.attempts[-1]]
    first_of_last = last_attempt[0]["step"] if last_attempt else index.steps
    if attempts_before and report.attempts and report.attempts[-1] == attempts_before[-1]:
        first_of_last = index.steps  # this job trained no step: it resumed from the checkpoint of the last one
    seconds = sum(record["seconds"] for record in final)
    checkpoints = sorted(path for path in store.fs.glob(f"{checkpoint_root(store, fp)}/*/checkpoint_*") if not path.endswith(".json"))
    summary = TrainSummary(
        steps=index.steps,
        final_loss=final[-1]["loss"],
        tokens_per_second=sum(record["tokens"] for record in final) / seconds if seconds else None,
        resumed_from_step=first_of_last if first_of_last > 0 else None,
        model_uri=output.file_uri(MODEL_DIR),
        audit=report.summary(),
        checkpoints=[store.uri(path[len(store.root.rstrip("/")) + 1 :]) for path in checkpoints],
        workers=training.workers,
        fingerprint=fp,
        final_model_uri=output.file_uri(FINAL_MODEL_DIR) if spec.averaging is not None else None,
    )
    descriptor = run_descriptor(recipe, variant)
    if lr_fault is not None:  # never a family member of other runs
        descriptor["lr_fault"] = lr_fault
    output.write_bytes(RUN_FILE, json.dumps(descriptor, indent=2).encode())
    for path in store.fs.find(output.path):
        name = path[len(output.path.rstrip("/")) + 1 :]
        if name.startswith((f"{MODEL_DIR}/", f"{FINAL_MODEL_DIR}/", "audit/")):
            output.record_file(name)
    progress(
        f"train: final loss {summary.final_loss:.4f}, {summary.tokens_per_second:,.0f} tokens/s, "
        f"{report.reexecuted_steps} re-executed steps over {len(report.attempts)} attempt(s)"
    )
    if event is not None and event.get("largest", {}).get("step") is not None:
        largest = event["largest"]
        progress(f"train: collapse monitor: {'drift' if event['first_drift'] else 'no drift'}; the largest |residual| was "
                 f"{largest['score']:.2g} x the family's spread (step {largest['step']:,}), final loss estimate at the end "
                 f"{event['final_loss_estimate']:.4f}")
    return summary


class ProgressReporter:
    """While the job runs, reports its progress in steps from the newest audit record every
    ``interval`` seconds (rank 0 writes one per step to the store: the driver reads one small part
    file per poll, and the workers do nothing more), and once more when the job ends; with
    ``collapse``, polls the collapse event at the same pace (a drift warns while the job runs)."""

    def __init__(self, store: Store, folder: str, steps: int, progress: Callable[[str], None], collapse: CollapseEvents | None = None,
                 interval: float = 10.0):
        import threading

        self.store, self.folder, self.steps, self.interval, self.collapse = store, folder, steps, interval, collapse
        self.progress = as_progress(progress, "train")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last: dict[str, Any] | None = None

    def __enter__(self) -> ProgressReporter:
        self.progress.advance(0, self.steps, "steps")
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if exc[0] is None:
            self._report()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._report()
            if self.collapse is not None:
                try:
                    self.collapse.poll()
                except (OSError, ValueError):  # the event being rewritten: next time
                    pass

    def _report(self) -> None:
        from training.audit import latest_record

        try:
            record = latest_record(self.store, self.folder)
        except (OSError, ValueError):  # a part being rewritten: try again next time
            return
        if record and record != self._last:
            self._last = record
            tokens_per_second = record["tokens"] / max(record["seconds"], 1e-9)
            self.progress.advance(record["step"] + 1, self.steps, "steps",
                                  f"(attempt {record['attempt']}): loss {record['loss']:.4f}, lr {record['lr']:.3g}, {tokens_per_second:,.0f} tokens/s")


__all__ = ["AuditSummary", "BaseModel", "CollapseStopped", "JobError", "TRAIN", "TrainSummary", "base_model", "collapse_family", "run_train",
           "train_fingerprint"]
