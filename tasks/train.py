"""Stage 4, train: the continual-pretraining job of one variant (`training.cpt_job` on Ray Train).

Before any training it checks what would make the run wrong: the sample index must carry the
fingerprints this recipe and variant expect, the base model's vocabulary must hold the
tokenizer's, and a checkpoint left in the store must be of this run and world size (the batch
dividing across the workers is checked with the recipe).

Output ``<store>/train/<fingerprint>/``: ``model/`` (``save_pretrained`` with the tokenizer),
``audit/attempt-*/part-*.jsonl`` (one record per step of every attempt), ``run.json`` (what makes
runs comparable: `training.loss_curves.run_descriptor`), ``summary.json`` and the manifest last. Checkpoints go to ``<store>/checkpoints/<fingerprint>/`` through Ray Train (the
last ``keep_checkpoints``); they outlive a failed attempt, so a Prefect retry of `train_cpt`
resumes from the latest one, and they are logged to MLflow as store URIs, not uploaded.
The fingerprint covers the index, the base model, the optimizer, schedule and the training
settings that change the numbers (not logging, checkpoint cadence or retries).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from trecflow.fingerprint import fingerprint
from trecflow.progress import as_progress
from trecflow.recipe import Recipe, RecipeError
from trecflow.settings import tracking_uri
from trecflow.stage import VARIANT_SCOPE, Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store
from training.audit import check_audit, read_audit
from training.cpt_job import MODEL_DIR, JobError, JobSpec, checkpoint_root, run_job
from training.deepspeed_config import fingerprint_part
from training.loss_curves import RUN_FILE, run_descriptor
from training.models import model_vocab_size
from training.sample_index import PLACE_STAGE, SampleIndex, batch_hash

STAGE = "train"
STAGE_VERSION = 1
# Settings that do not change the trained weights: left out of the fingerprint.
# Settings that change neither the numbers nor the resumability of a run; the DeepSpeed JSON enters
# through `fingerprint_part` (only its keys that change results).
NOT_FINGERPRINTED = ("checkpoint_every", "keep_checkpoints", "max_failures", "log_every", "cpus_per_worker", "placement",
                     "deepspeed_config", "activation_checkpointing")


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
    the checkpoints kept (store URIs), the audit, the workers and the output's fingerprint."""

    steps: int
    final_loss: float
    tokens_per_second: float | None
    resumed_from_step: int | None
    model_uri: str
    audit: AuditSummary
    checkpoints: tuple[str, ...]
    workers: int
    fingerprint: str


def train_fingerprint(recipe: Recipe, place_fp: str, base_fp: str) -> str:
    config = recipe.section("optimizer", "schedule", "training")
    for key in NOT_FINGERPRINTED:
        config["training"].pop(key)
    config["steps"] = recipe.steps
    deepspeed = fingerprint_part(recipe)
    if deepspeed:
        config["deepspeed"] = deepspeed
    return fingerprint(STAGE, STAGE_VERSION, config, {"place": place_fp, "base": base_fp})


def check_vocabulary(base: BaseModel, tokenizer_vocab: int, endpoint_url: str | None) -> None:
    model_vocab = model_vocab_size(base.uri, endpoint_url) if base.uri else (base.config or {}).get("vocab_size")
    if model_vocab is not None and model_vocab < tokenizer_vocab:
        raise RecipeError(
            f"base: the model's vocabulary ({model_vocab:,} tokens, {base.uri or 'tiny config'}) is smaller than the "
            f"tokenizer's ({tokenizer_vocab:,}); token ids past it would have no embedding"
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

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return train_fingerprint(target.recipe, upstream["place"].fingerprint, upstream["base"].fingerprint)

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        return {"place": upstream["place"].fingerprint, "base": upstream["base"].fingerprint, "tokenizer": upstream["tokenizer"].fingerprint}

    def clear(self, target: Target, fingerprint: str, store: Store) -> None:
        if store.fs.exists(checkpoint_root(store, fingerprint)):
            store.fs.rm(checkpoint_root(store, fingerprint), recursive=True)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> TrainSummary:
        return train(target.recipe, context.store, upstream["place"], base_model(upstream["base"]), output, context.progress, context.tracking_run_id,
                     variant=target.variant)

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
            ("model", summary.model_uri),
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
        return {"trecflow.model_uri": summary.model_uri, "trecflow.checkpoints": " ".join(summary.checkpoints)[:5000]}


TRAIN = TrainStage()


def run_train(recipe: Recipe, store: Store, index_fp: str, expected_inputs: dict[str, str], base: BaseModel, force: bool = False,
              progress: Callable[[str], None] = print) -> StageResult[TrainSummary]:
    """Train (or resume, or reuse) the run of ``recipe`` on the committed index ``index_fp`` from
    ``base`` alone; the index must carry ``expected_inputs``."""
    from trecflow.runner import run_stage

    upstream = {"tokenizer": expected_inputs["tokenizer"], "place": stored_index(store, index_fp, expected_inputs), "base": base_result(base)}
    return run_stage(TRAIN, Target(recipe), store, upstream, force=force, progress=progress)


def train(recipe: Recipe, store: Store, placed: StageResult, base: BaseModel, output: StageOutput, progress: Callable[[str], None],
          mlflow_run_id: str | None = None, variant: str | None = None) -> TrainSummary:
    """Run the job on the index ``placed`` from ``base`` into ``output``, then check its audit log."""
    index_fp, expected_inputs = placed.fingerprint, placed.inputs
    index = SampleIndex(store, index_fp, expected=expected_inputs)  # another recipe's index: refused here
    tokenizer_fp = expected_inputs["tokenizer"]
    tokenizer_info = json.loads(store.output("tokenizer", tokenizer_fp).read_bytes("tokenizer_info.json"))
    check_vocabulary(base, tokenizer_info["vocab_size"], store.endpoint_url)
    fp = output.fingerprint
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
    )
    training = recipe.training
    progress(
        f"train: {index.steps:,} steps on {training.workers} workers (micro-batch {recipe.micro_batch}, accumulation "
        f"{training.accumulation}, ZeRO-{training.zero_stage}, {training.precision}) from {base.uri or 'a new model'}"
    )
    with ProgressReporter(store, output.path, index.steps, progress):
        result = run_job(spec, progress)
    if result.error is not None:
        raise result.error

    report = check_audit(read_audit(store, output.path), index.steps, lambda step: batch_hash(index.batch(step)))
    if not report.exactly_once:
        raise RuntimeError(f"{output.uri}: the audit log does not show every planned batch exactly once: {report.summary()}")
    final = report.final
    last_attempt = [record for record in final if record["attempt"] == report.attempts[-1]]
    first_of_last = last_attempt[0]["step"] if last_attempt else index.steps
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
    )
    output.write_bytes(RUN_FILE, json.dumps(run_descriptor(recipe, variant), indent=2).encode())
    for path in store.fs.find(output.path):
        name = path[len(output.path.rstrip("/")) + 1 :]
        if name.startswith((f"{MODEL_DIR}/", "audit/")):
            output.record_file(name)
    progress(
        f"train: final loss {summary.final_loss:.4f}, {summary.tokens_per_second:,.0f} tokens/s, "
        f"{report.reexecuted_steps} re-executed steps over {len(report.attempts)} attempt(s)"
    )
    return summary


class ProgressReporter:
    """While the job runs, reports its progress in steps from the newest audit record every
    ``interval`` seconds (rank 0 writes one per step to the store: the driver reads one small part
    file per poll, and the workers do nothing more), and once more when the job ends."""

    def __init__(self, store: Store, folder: str, steps: int, progress: Callable[[str], None], interval: float = 10.0):
        import threading

        self.store, self.folder, self.steps, self.interval = store, folder, steps, interval
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


__all__ = ["AuditSummary", "BaseModel", "JobError", "TRAIN", "TrainSummary", "base_model", "run_train", "train_fingerprint"]
