"""Stage 5, re-evaluate: the measured TREC of one trained run, compared with the prediction.

The final model's loss on the batch every sampled step trained on (read through the sample index,
so exactly the training batches), on a pool of Ray actors (`training.reevaluation`); the
difficulty-corrected curve L(t) - beta * L_ref(B_t) with the configured reference model
(`tasks.reference`, losses cached per sequence id; beta fitted out of sample by default:
`training.difficulty_correction`); agreement with the prediction
(`training.trec_measure`); held-out losses on the eval split (`tasks.evalset`); and, for runs whose
tier mix is the same at every step, an entry in the calibration table (`tasks.calibrate`).

A curriculum that moves data in time changes what each batch holds, and content moves per-batch
loss far more than the TREC does: such runs are reported ``content_confounded`` and never
calibrate.

Output ``<store>/reevaluate/<fingerprint>/``: ``steps/part-*.parquet`` (streamed per unit of work;
a retried attempt keeps the complete parts and evaluates only the rest), ``trec.parquet`` (one row
per sampled step: loss, per-tier loss, reference loss, corrected, smoothed, predicted),
``summary.json``, ``trec_overlay.png``, manifest last.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.calibrate import record_run
from tasks.evalset import EvalSet, load_evalset
from tasks.predict import PredictSummary, read_curve
from tasks.reference import REFERENCE, Reference, reference_losses, reference_of
from tasks.train import BaseModel, base_result, stored_index
from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe, ReevaluationSection, RecipeError
from trecflow.report import reevaluation_rows
from trecflow.stage import SUMMARY_FILE, VARIANT_SCOPE, Stage, StageResult, StageContext, Summary, Target, omitted_when_none
from trecflow.integrity import open_parquet, read_parquet
from trecflow.store import StageOutput, Store, StoreError
from training.calibration import CalibrationRun
from training.difficulty_correction import BETA_GRID, Correction, StepMoments, correct, correct_robust, trimmed_by_beta
from training.reevaluation import ActorPool, ModelSpec, Unit
from training.sample_index import COMPOSITION_FILE, PLACE_STAGE, TIERS, TIERS_FILE, SampleIndex, read_npy
from training.trec_measure import Agreement, agreement, smooth
from training.trec_plot import plot_measured

STAGE = "reevaluate"
STAGE_VERSION = 5  # 2: the reference and held-out set are stages of their own; 3: loss_x_reference, beta fitted; 4: trimmed;
# 5: the prediction is smoothed like the measured curve before they are compared
CURVE_FILE = "trec.parquet"
PLOT_FILE = "trec_overlay.png"
# Settings that change how the work is spread, not the numbers: left out of the fingerprint.
EXECUTION_ONLY = ("actors", "cpus_per_actor", "steps_per_task", "max_retries", "micro_batch", "reference_max_repeat")
# Settings the reference stage's fingerprint (an input here) already carries.
IN_REFERENCE = ("reference_seed",)
# Sparser samplings whose agreement is reported when every step was evaluated.
SAMPLING_STUDY = (5, 10)


@dataclass(frozen=True)
class AgreementSummary(Summary):
    """One measured curve's agreement with the prediction (`training.trec_measure.Agreement.as_dict`)."""

    trec_pearson: float
    trec_pearson_m0: float
    trec_pearson_fit: float
    m_fit: float
    trec_valley_measured: float
    trec_valley_error: float


@dataclass(frozen=True)
class HeldOutSequences(Summary):
    """Held-out sequences of hq-tier documents and of all others."""

    hq: int
    general: int


@dataclass(frozen=True)
class ReferenceUse(Summary):
    """The reference model a re-evaluation used and its losses: needed, from the cache, evaluated
    now, and units retried (only when some were evaluated)."""

    kind: str
    fingerprint: str
    uri: str
    sequences: int
    from_cache: int
    evaluated: int
    retried_units: int | None = omitted_when_none()
    beta: tuple[float, ...] | None = omitted_when_none()  # per fold of steps when fitted, else the recipe's one value
    beta_fitted: bool | None = omitted_when_none()


@dataclass(frozen=True)
class Sampling(Summary):
    """Which steps and sequences were evaluated: every k-th step or a random subset, k sequences each (None: all)."""

    every: int
    random_steps: int | None
    sequences_per_step: int | None


@dataclass(frozen=True)
class FinalModelCheck(Summary):
    """For a run that delivers an average of checkpoints: the raw final model beside it, its
    held-out losses, and the measured curve's r_p against the raw final model's prediction (the
    average's own is the summary's ``trec_pearson``)."""

    model_uri: str
    val_loss_hq: float | None
    val_loss_general: float | None
    trec_pearson: float
    trec_valley_predicted: float


@dataclass(frozen=True)
class ReevaluateSummary(AgreementSummary):
    """The measured TREC of one run against the prediction: the primary curve's agreement (the
    corrected one with a reference, else raw: the inherited fields) first, then raw and corrected in full, the sparser
    samplings' r_p, whether the tier mix moves (content_confounded), held-out losses, what was
    evaluated, the reference, the model, the HQ window and the calibration entry (None when
    confounded)."""

    trec_pearson_raw: float
    trec_pearson_corrected: float | None
    trec_valley_predicted: float
    m: float
    curve: str
    raw: AgreementSummary
    corrected: AgreementSummary | None
    sampling_study: Mapping[str, Mapping[str, float]] | None  # every_k -> raw / corrected r_p
    content_confounded: bool
    val_loss_hq: float | None
    val_loss_general: float | None
    val_loss_by_source: Mapping[str, float]
    val_sequences: HeldOutSequences
    variant: str
    steps: int
    steps_evaluated: int
    sequences_per_step: int
    tokens_evaluated: int
    tokens_per_second: float | None
    retried_units: int
    reference: ReferenceUse | None
    sampling: Sampling
    model_uri: str
    hq_window: tuple[float, float] | None
    fingerprint: str
    calibration_entry: str | None
    noise_raw: float | None = omitted_when_none()  # SD of the raw curve around its smoothed self
    noise_corrected: float | None = omitted_when_none()
    final_model: FinalModelCheck | None = omitted_when_none()  # with checkpoint averaging: the raw final model


def reevaluate_fingerprint(recipe: Recipe, train_fp: str, place_fp: str, predict_fp: str, reference_fp: str | None, evalset_fp: str) -> str:
    config = recipe.section("reevaluation")["reevaluation"]
    for key in EXECUTION_ONLY + IN_REFERENCE:
        config.pop(key)
    inputs = {"train": train_fp, "place": place_fp, "predict": predict_fp, "reference": reference_fp or "", "evalset": evalset_fp}
    return fingerprint(STAGE, STAGE_VERSION, config, inputs)


def sampled_steps(section: ReevaluationSection, total: int) -> np.ndarray:
    """The steps to evaluate: every k-th (the last always), or a seeded random subset; sorted."""
    if section.random_steps is not None:
        count = min(section.random_steps, total)
        return np.sort(np.random.default_rng(section.seed).choice(total, size=count, replace=False)).astype(np.int64)
    steps = np.arange(0, total, section.every, dtype=np.int64)
    return steps if steps[-1] == total - 1 else np.append(steps, total - 1)


def step_sequences(index: SampleIndex, steps: np.ndarray, section: ReevaluationSection) -> np.ndarray:
    """(steps x k) sequence ids: each step's training batch, or a seeded subset of k of it."""
    batches = index.batches(steps)
    k = section.sequences_per_step
    if k is None or k >= index.batch_size:
        return batches
    rng = np.random.default_rng(section.seed)
    keep = np.sort(np.argsort(rng.random(batches.shape), axis=1)[:, :k], axis=1)  # k distinct positions per step
    return np.take_along_axis(batches, keep, axis=1)


# The tier mix of a run counts as constant in time when no block of MIX_BLOCK_FRACTION of training
# has a tier share further than MIX_TOLERANCE (+ 4 binomial standard errors) from the run's share.
MIX_BLOCK_FRACTION = 0.05
MIX_TOLERANCE = 0.02


def constant_mix(composition: np.ndarray) -> bool:
    """True when the expected tier mix is the same at every step: a uniform random mix passes
    (its blocks differ by sampling noise only), a curriculum that moves a tier in time does not."""
    composition = np.asarray(composition, dtype=np.float64)
    steps = composition.shape[0]
    blocks = max(1, min(steps, round(1 / MIX_BLOCK_FRACTION)))
    edges = np.linspace(0, steps, blocks + 1).round().astype(int)
    overall = composition.sum(axis=0) / composition.sum()
    for start, end in zip(edges[:-1], edges[1:]):
        block = composition[start:end].sum(axis=0)
        size = block.sum()
        share = block / size
        noise = 4 * np.sqrt(overall * (1 - overall) / size)
        if np.any(np.abs(share - overall) > MIX_TOLERANCE + noise):
            return False
    return True


def beta_grid(section: ReevaluationSection) -> np.ndarray:
    """The betas whose trimmed corrected curves the step parts hold: the fit's grid, or the one fixed beta."""
    return BETA_GRID if section.beta == "fit" else np.array([float(section.beta)])


def part_name(first: int, last: int) -> str:
    return f"steps/part-{first:09d}-{last:09d}.parquet"


def step_rows(steps: np.ndarray, losses: np.ndarray, tiers: np.ndarray, seq_len: int, reference: np.ndarray | None = None,
              trimmed_grid: np.ndarray | None = None) -> pa.Table:
    """Per-step aggregates of per-sequence losses: mean loss, tokens, per-tier mean and count; with
    the reference's per-sequence losses, the mean product of the two (``loss_x_reference``: what
    the fitted correction needs)."""
    columns: dict[str, Any] = {
        "step": pa.array(steps, pa.int64()),
        "loss": losses.mean(axis=1),
        "sequences": pa.array(np.full(len(steps), losses.shape[1]), pa.int64()),
        "tokens": pa.array(np.full(len(steps), losses.shape[1] * (seq_len - 1)), pa.int64()),
    }
    if reference is not None:
        columns["loss_x_reference"] = (losses * reference).mean(axis=1)
        if trimmed_grid is not None:  # the robust aggregate: per beta of the grid, the trimmed mean of loss - beta * reference
            table = trimmed_by_beta(losses, reference, trimmed_grid)
            columns["corrected_trimmed"] = pa.FixedSizeListArray.from_arrays(pa.array(table.ravel(), pa.float64()), table.shape[1])
    for code, tier in enumerate(TIERS):
        mask = tiers == code
        count = mask.sum(axis=1)
        with np.errstate(invalid="ignore"):
            columns[f"loss_{tier}"] = np.where(count > 0, (losses * mask).sum(axis=1) / np.maximum(count, 1), np.nan)
        columns[f"sequences_{tier}"] = pa.array(count, pa.int64())
    return pa.table(columns)


def held_out_losses(evalset: EvalSet, losses: np.ndarray) -> dict[str, Any]:
    """val_loss_hq (hq-tier documents), val_loss_general (all others) and the loss per source."""
    tiers = np.asarray(evalset.tiers)
    sources = np.asarray(evalset.sources)
    hq = tiers == "hq"
    result: dict[str, Any] = {
        "val_loss_hq": float(losses[hq].mean()) if hq.any() else None,
        "val_loss_general": float(losses[~hq].mean()) if (~hq).any() else None,
        "val_loss_by_source": {str(source): float(losses[sources == source].mean()) for source in np.unique(sources)},
        "val_sequences": {"hq": int(hq.sum()), "general": int((~hq).sum())},
    }
    return result


class ReevaluateStage(
    Stage[ReevaluateSummary], name=STAGE, version=STAGE_VERSION, inputs=("pack", "predict", "place", "train", "reference", "evalset"),
    scope=VARIANT_SCOPE, sections=("corpus", "tokenizer", "base"), title="Measured TREC", task_name="reevaluate_trec", ray=True,
    purpose="re-evaluation", figure=PLOT_FILE, resumable=True, summary_type=ReevaluateSummary
):
    """Stage 5: the final weights' loss on the batches of (a sample of) the training steps, on Ray
    actors, corrected by the reference model's loss on the same sequences; compared with the
    prediction; plus the held-out losses. Resumable: parts of an earlier attempt are kept."""

    def required_inputs(self, target: Target) -> tuple[str, ...]:
        return tuple(name for name in self.inputs if name != "reference" or target.recipe.reevaluation.reference != "none")

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        reference = upstream.get("reference")
        return reevaluate_fingerprint(target.recipe, upstream["train"].fingerprint, upstream["place"].fingerprint, upstream["predict"].fingerprint,
                                      reference.fingerprint if reference else None, upstream["evalset"].fingerprint)

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        reference = upstream.get("reference")
        return {"train": upstream["train"].fingerprint, "place": upstream["place"].fingerprint, "predict": upstream["predict"].fingerprint,
                "reference": reference.fingerprint if reference else "", "evalset": upstream["evalset"].fingerprint}

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> ReevaluateSummary:
        reference = upstream.get("reference")
        return reevaluate(target.recipe, target.variant, context.store, upstream["place"], upstream["train"], upstream["predict"],
                          reference_of(reference) if reference else None, load_evalset(context.store, upstream["evalset"]), output, context.progress)

    def view(self, target: Target, summary: ReevaluateSummary) -> ReevaluateSummary:
        return replace(summary, variant=target.variant)

    def counts(self, summary: ReevaluateSummary) -> dict[str, Any]:
        return {"steps_evaluated": summary.steps_evaluated, "tokens_evaluated": summary.tokens_evaluated, "retried_units": summary.retried_units}

    def rows(self, summary: ReevaluateSummary) -> list[tuple[str, str]]:
        return reevaluation_rows(summary)

    def metrics(self, summary: ReevaluateSummary) -> dict[str, float]:
        """The stage's MLflow metrics (None values, e.g. no hq held-out text, are left out)."""
        values = {
            "trec_pearson": summary.trec_pearson, "trec_pearson_raw": summary.trec_pearson_raw, "trec_pearson_m0": summary.trec_pearson_m0,
            "trec_pearson_fit": summary.trec_pearson_fit, "m_fit": summary.m_fit, "trec_valley_measured": summary.trec_valley_measured,
            "trec_valley_predicted": summary.trec_valley_predicted, "trec_valley_error": summary.trec_valley_error,
            "val_loss_hq": summary.val_loss_hq, "val_loss_general": summary.val_loss_general, "steps_evaluated": summary.steps_evaluated,
            "retried_units": summary.retried_units,
        }
        metrics = {key: value for key, value in values.items() if value is not None}
        metrics["content_confounded"] = float(summary.content_confounded)
        if summary.tokens_per_second:
            metrics["reevaluate_tokens_per_second"] = summary.tokens_per_second
        for source, loss in summary.val_loss_by_source.items():
            metrics[f"val_loss_{re.sub(r'[^A-Za-z0-9_.-]', '_', source)}"] = loss
        final = summary.final_model
        if final is not None:  # the raw final model beside the average, and what averaging changed
            metrics["trec_pearson_final_prediction"] = final.trec_pearson
            for key in ("val_loss_hq", "val_loss_general"):
                if getattr(final, key) is not None and getattr(summary, key) is not None:
                    metrics[f"{key}_final_model"] = getattr(final, key)
                    metrics[f"{key}_averaged_minus_final"] = getattr(summary, key) - getattr(final, key)
        return metrics

    def tags(self, summary: ReevaluateSummary) -> dict[str, str]:
        return {"trecflow.content_confounded": str(summary.content_confounded).lower()}

    def artifacts(self, summary: ReevaluateSummary) -> list[str]:
        return [PLOT_FILE, SUMMARY_FILE]


REEVALUATE = ReevaluateStage()


def run_reevaluate(recipe: Recipe, store: Store, *, index_fp: str, expected_inputs: dict[str, str], train_fp: str, predict_fp: str,
                   base: BaseModel, variant: str, force: bool = False, progress: Callable[[str], None] = print) -> StageResult[ReevaluateSummary]:
    """Measure (or reuse) the TREC of the committed run ``train_fp`` on the index ``index_fp`` alone
    (building the reference and the held-out set first if needed)."""
    from tasks.evalset import EVALSET
    from trecflow.runner import run_stage

    target = Target(recipe, variant)
    given = {"score": expected_inputs["score"], "tokenizer": expected_inputs["tokenizer"], "base": base_result(base)}
    upstream = {"pack": expected_inputs["pack"], "predict": predict_fp, "place": stored_index(store, index_fp, expected_inputs),
                "train": train_fp, "evalset": run_stage(EVALSET, target, store, given, progress=progress)}
    if recipe.reevaluation.reference != "none":
        upstream["reference"] = run_stage(REFERENCE, target, store, given, progress=progress)
    return run_stage(REEVALUATE, target, store, upstream, force=force, progress=progress)


def reevaluate(recipe: Recipe, variant: str, store: Store, placed: StageResult, trained_result: StageResult, predicted: StageResult,
               reference: Reference | None, evalset: EvalSet, output: StageOutput, progress: Callable[[str], None]) -> ReevaluateSummary:
    """Evaluate the sampled steps' batches with the trained model on Ray actors into ``output``."""
    section = recipe.reevaluation
    index_fp, expected_inputs, train_fp, predict_fp = placed.fingerprint, placed.inputs, trained_result.fingerprint, predicted.fingerprint
    index = SampleIndex(store, index_fp, expected=expected_inputs)
    trained = store.output("train", train_fp)
    trained_on = trained.manifest()["inputs"].get("place")
    if trained_on != index_fp:
        raise RecipeError(f"{trained.uri}: the model was trained on the index {trained_on!r}, not on {index_fp!r}")
    model_uri = trained_result.summary.model_uri
    final_model_uri = getattr(trained_result.summary, "final_model_uri", None)  # set when model_uri is an average of checkpoints
    pack_fp = expected_inputs["pack"]
    fp = output.fingerprint
    seq_len = recipe.data.seq_len
    steps = sampled_steps(section, index.steps)
    ids = step_sequences(index, steps, section)
    tier_of = read_npy(store.output("pack", pack_fp), TIERS_FILE)
    reference_counts: dict[str, int] = {}
    reference_by_sequence = None  # (sampled steps, sequences): the reference's loss on each
    trimmed_grid = beta_grid(section) if reference is not None and section.aggregate == "trimmed" else None

    per_unit = section.steps_per_task or max(1, -(-steps.size // (section.actors * 8)))
    done = kept_parts(store, output.path, progress)
    units = []
    for start in range(0, steps.size, per_unit):
        stop = min(start + per_unit, steps.size)
        name = part_name(int(steps[start]), int(steps[stop - 1]))
        if name.rsplit("/", 1)[1] not in done:
            units.append(Unit((start, stop, name), ids[start:stop], (stop - start) * ids.shape[1] * seq_len))

    def write_unit(unit: Unit, losses: np.ndarray) -> None:
        start, stop, name = unit.key
        buffer = io.BytesIO()
        unit_reference = None if reference_by_sequence is None else reference_by_sequence[start:stop]
        pq.write_table(step_rows(steps[start:stop], losses, tier_of[ids[start:stop]], seq_len, unit_reference, trimmed_grid), buffer)
        store.put_atomic(output.file_path(name), buffer.getvalue())

    held_out: dict[str, np.ndarray] = {}
    held_out_final: dict[str, np.ndarray] = {}
    spec = ModelSpec(model_uri, store.endpoint_url, precision=section.precision, use_gpu=section.use_gpu, micro_batch=section.micro_batch,
                     threads=section.cpus_per_actor)
    # one pool of actors for the reference's losses (the ones not cached), the sampled steps and the held-out set
    with ActorPool(section.actors, spec, store.url, store.endpoint_url, pack_fp, section.max_retries, section.cpus_per_actor) as pool:
        if reference is not None:
            ref_ids, ref_losses, reference_counts = reference_losses(store, reference, pack_fp, ids, pool, seq_len, progress)
            reference_by_sequence = ref_losses[np.searchsorted(ref_ids, ids)]
        progress(
            f"reevaluate: {steps.size:,} of {index.steps:,} steps x {ids.shape[1]} sequences on {section.actors} actors "
            f"({len(units)} units to run, {len(done)} kept from an earlier attempt); reference: {reference.kind if reference else 'none'}"
        )
        retried_before = pool.retried
        started = time.monotonic()
        pool.run(units, write_unit, progress=progress, label="reevaluate")
        seconds = time.monotonic() - started
        chunk = max(1, -(-len(evalset.tokens) // section.actors))
        eval_units = [Unit(start, evalset.tokens[start : start + chunk], 0) for start in range(0, len(evalset.tokens), chunk)]
        pool.run(eval_units, lambda unit, losses: held_out.__setitem__(unit.key, losses), by_id=False, progress=progress, label="held-out")
        if final_model_uri is not None:
            pool.run(eval_units, lambda unit, losses: held_out_final.__setitem__(unit.key, losses), by_id=False, progress=progress,
                     label="held-out, raw final model", spec=replace(spec, uri=final_model_uri))
        retried = pool.retried - retried_before

    table = read_parts(store, output.path)
    if not np.array_equal(table["step"].to_numpy(), steps):
        raise RuntimeError(f"{output.uri}: the parts hold {table.num_rows} steps, not the {steps.size} sampled ones")
    validation = held_out_losses(evalset, np.concatenate([held_out[key] for key in sorted(held_out)]))
    curve = read_curve(store, predict_fp)
    prediction: PredictSummary = predicted.summary
    composition = read_npy(index.output, COMPOSITION_FILE)
    measured = Measured.compute(table, reference_by_sequence, curve, prediction, section, index.steps)
    final_model = None
    if final_model_uri is not None:
        final_validation = held_out_losses(evalset, np.concatenate([held_out_final[key] for key in sorted(held_out_final)]))
        final_agreement = measured.against(curve["c_final"].to_numpy(), float(prediction.p), float(prediction.m), section.smoothing)
        final_model = FinalModelCheck(model_uri=final_model_uri, val_loss_hq=final_validation["val_loss_hq"],
                                      val_loss_general=final_validation["val_loss_general"], trec_pearson=final_agreement.r_p,
                                      trec_valley_predicted=final_agreement.valley_predicted)

    evaluated_tokens = int(table["tokens"].to_numpy().sum())
    summary = ReevaluateSummary(
        **measured.summary(),
        content_confounded=not constant_mix(composition),
        **{key: validation[key] for key in ("val_loss_hq", "val_loss_general", "val_loss_by_source", "val_sequences")},
        variant=variant,
        steps=index.steps,
        steps_evaluated=int(steps.size),
        sequences_per_step=int(ids.shape[1]),
        tokens_evaluated=evaluated_tokens,
        tokens_per_second=sum(unit.tokens for unit in units) / seconds if units and seconds > 0 else None,
        retried_units=retried + reference_counts.get("retried_units", 0),
        reference=ReferenceUse(kind=reference.kind, fingerprint=reference.fingerprint, uri=reference.uri, **reference_counts,
                               beta=measured.correction.betas, beta_fitted=measured.correction.fitted) if reference else None,
        sampling=Sampling(every=section.every, random_steps=section.random_steps, sequences_per_step=section.sequences_per_step),
        model_uri=model_uri,
        hq_window=placed.summary.window,
        fingerprint=fp,
        calibration_entry=None,
        **measured.noise(),
        final_model=final_model,
    )
    if not summary.content_confounded:
        entry = CalibrationRun(fp, recipe.name, variant, recipe.for_variant(variant).schedule.kind, prediction.tpp, prediction.tau,
                               summary.m_fit, summary.trec_pearson_fit, index.steps, float(prediction.p))
        summary = replace(summary, calibration_entry=record_run(store, entry))

    buffer = io.BytesIO()
    pq.write_table(measured.table(table, curve), buffer)
    output.write_bytes(CURVE_FILE, buffer.getvalue())
    output.write_bytes(PLOT_FILE, measured.plot(curve, summary, f"{recipe.name} / {variant}: measured vs predicted TREC"))
    for path in store.fs.glob(f"{output.path}/steps/part-*.parquet"):
        output.record_file("steps/" + path.rsplit("/", 1)[1])
    progress(
        f"reevaluate: r_p {summary.trec_pearson:.3f} (raw {summary.trec_pearson_raw:.3f}, m = 0 {summary.trec_pearson_m0:.3f}, "
        f"best m {summary.m_fit:g}: {summary.trec_pearson_fit:.3f}); valley {summary.trec_valley_measured:.3f} vs predicted "
        f"{summary.trec_valley_predicted:.3f}; val_loss_hq {validation['val_loss_hq']}, val_loss_general {validation['val_loss_general']}"
        + ("; content-confounded (tier mix changes over training): not used for calibration" if summary.content_confounded else "")
    )
    return summary


def kept_parts(store: Store, folder: str, progress: Callable[[str], None]) -> set[str]:
    """The names of the parts an earlier attempt left whose parquet footer reads (one footer read
    each, only when resuming); a part that does not (truncated or corrupt) is removed, with a note
    naming it, so that its steps are evaluated again."""
    kept = set()
    for path in sorted(store.fs.glob(f"{folder}/steps/part-*.parquet")):
        try:
            with open_parquet(store, path):  # opening reads and decodes the footer
                pass
        except StoreError as error:
            progress(f"reevaluate: {error}; evaluating its steps again")
            store.fs.rm(path)
            continue
        kept.add(path.rsplit("/", 1)[1])
    return kept


def read_parts(store: Store, folder: str) -> pa.Table:
    """Every complete part of a re-evaluation, sorted by step (StoreError naming a part that
    cannot be decoded)."""
    tables = [read_parquet(store, path) for path in sorted(store.fs.glob(f"{folder}/steps/part-*.parquet"))]
    table = pa.concat_tables(tables)
    return table.sort_by("step")


@dataclass(frozen=True)
class Measured:
    """The measured curves of one run and their agreement with the prediction."""

    steps: np.ndarray
    raw: np.ndarray
    raw_smoothed: np.ndarray
    corrected: np.ndarray | None
    corrected_smoothed: np.ndarray | None
    reference: np.ndarray | None
    raw_agreement: Agreement
    corrected_agreement: Agreement | None
    study: dict[str, Any]
    correction: Correction | None = None

    @classmethod
    def compute(cls, table: pa.Table, reference: np.ndarray | None, curve: pa.Table, prediction: PredictSummary, section: ReevaluationSection,
                total: int) -> Measured:
        """``reference``: the reference's loss on each evaluated sequence, (steps, sequences), or None."""
        steps = table["step"].to_numpy()
        raw = table["loss"].to_numpy()
        coefficients = curve["c"].to_numpy()
        p, m = float(prediction.p), float(prediction.m)
        raw_smoothed = smooth(steps, raw, total, section.smoothing)
        corrected = corrected_smoothed = corrected_agreement = correction = reference_mean = None
        if reference is not None:
            reference_mean = reference.mean(axis=1)
            if section.aggregate == "trimmed":
                trimmed = np.asarray(table["corrected_trimmed"].combine_chunks().flatten()).reshape(len(steps), -1)
                correction = correct_robust(steps, trimmed, total, section.smoothing, beta_grid(section), section.beta)
            else:
                moments = StepMoments(raw, reference_mean, (reference * reference).mean(axis=1), table["loss_x_reference"].to_numpy())
                correction = correct(moments, section.beta)
            corrected = correction.corrected
            corrected_smoothed = smooth(steps, corrected, total, section.smoothing)
            corrected_agreement = agreement(steps, corrected_smoothed, coefficients, p, m, section.smoothing)
        study: dict[str, Any] = {}
        if section.every == 1 and section.random_steps is None:
            for k in SAMPLING_STUDY:
                keep = (steps % k == 0) | (steps == total - 1)
                entry = {"raw": agreement(steps[keep], smooth(steps[keep], raw[keep], total, section.smoothing), coefficients, p, m, section.smoothing).r_p}
                if corrected is not None:
                    entry["corrected"] = agreement(steps[keep], smooth(steps[keep], corrected[keep], total, section.smoothing), coefficients, p, m,
                                                  section.smoothing).r_p
                study[f"every_{k}"] = entry
        return cls(steps, raw, raw_smoothed, corrected, corrected_smoothed, reference_mean,
                   agreement(steps, raw_smoothed, coefficients, p, m, section.smoothing), corrected_agreement, study, correction)

    def noise(self) -> dict[str, float | None]:
        """The SD of each curve around its smoothed self (the per-step noise the smoothing averages)."""
        return {"noise_raw": float(np.std(self.raw - self.raw_smoothed)),
                "noise_corrected": None if self.corrected is None else float(np.std(self.corrected - self.corrected_smoothed))}

    def against(self, coefficients: np.ndarray, p: float, m: float, smoothing: float) -> Agreement:
        """The primary curve's agreement with another prediction (e.g. the raw final model's,
        beside an averaged model's)."""
        smoothed = self.corrected_smoothed if self.corrected_agreement is not None else self.raw_smoothed
        return agreement(self.steps, smoothed, coefficients, p, m, smoothing)

    @property
    def primary(self) -> Agreement:
        """The corrected curve's agreement when a reference is configured, else the raw one."""
        return self.corrected_agreement or self.raw_agreement

    def summary(self) -> dict[str, Any]:
        """The agreement fields of `ReevaluateSummary`, in its order."""
        primary = self.primary
        out = {
            **primary.as_dict(),
            "trec_pearson_raw": self.raw_agreement.r_p,
            "trec_pearson_corrected": self.corrected_agreement.r_p if self.corrected_agreement else None,
            "trec_valley_predicted": primary.valley_predicted,
            "m": primary.m,
            "curve": "corrected" if self.corrected_agreement else "raw",
            "raw": self.raw_agreement.as_dict(),
            "corrected": self.corrected_agreement.as_dict() if self.corrected_agreement else None,
            "sampling_study": self.study or None,
        }
        return out

    def table(self, parts: pa.Table, curve: pa.Table) -> pa.Table:
        total = curve.num_rows
        predicted = curve["trec_pred"].to_numpy()[self.steps]
        extra = {"fraction": (self.steps + 1) / total, "loss_smoothed": self.raw_smoothed, "trec_pred": predicted}
        if self.corrected is not None:
            extra |= {"reference_loss": self.reference, "corrected": self.corrected, "corrected_smoothed": self.corrected_smoothed}
        for name, values in extra.items():
            parts = parts.append_column(name, pa.array(values, pa.float64()))
        return parts

    def plot(self, curve: pa.Table, summary: ReevaluateSummary, title: str) -> bytes:
        total = curve.num_rows
        primary = self.primary
        return plot_measured(
            (self.steps + 1) / total, self.raw, self.raw_smoothed, self.corrected_smoothed,
            curve["fraction"].to_numpy(), curve["trec_pred"].to_numpy(),
            {"measured": primary.valley_measured, "predicted": primary.valley_predicted},
            None if summary.hq_window is None else list(summary.hq_window),
            title + f"  (r_p {primary.r_p:.3f}, m {primary.m:g})",
        )


__all__ = ["REEVALUATE", "ReevaluateSummary", "reevaluate", "run_reevaluate"]
