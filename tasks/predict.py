"""Stage 2, predict the TREC: the curve, its summary and its plot, written to the store.

Output ``<store>/predict/<fingerprint>/`` (pyarrow is imported on first use: ``trecflow predict``
imports this module for `PredictSummary`):
- ``trec.parquet``: one row per step: step, fraction, lr, c, trec_pred (the whole curve, which
  placement reads to compute its window for the w it actually gets);
- ``summary.json``: `TrecPrediction.summary` plus the recipe name and unused tokens;
- ``trec.png``: LR, c and predicted TREC with the valley and HQ window;
- ``_MANIFEST.json`` last.

The fingerprint covers every recipe section the prediction reads, so a changed recipe gives a new
folder and an unchanged one is reused. The stage is shared by every variant that runs the recipe's
own schedule with its final weights (one output, the fingerprint it always had); a variant with
its own ``schedule`` or ``averaging`` (`VariantSection.predicts_own`) gets the prediction of that
schedule and averaging, whose fingerprint covers them. With averaging, ``c`` and ``trec_pred`` are
the averaged model's (what placement reads) and ``trec.parquet`` adds the raw final model's as
``c_final`` and ``trec_final``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Mapping

from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe, ScheduleSection
from trecflow.stage import SUMMARY_FILE, Stage, StageContext, StageResult, Summary, Target, omitted_when_none
from trecflow.store import StageOutput, Store
from training.schedules import describe_schedule
from training.trec import TrecPrediction, predict, recipe_summary
from training.trec_plot import plot_prediction

if TYPE_CHECKING:
    import pyarrow as pa

STAGE = "predict"
STAGE_VERSION = 1
CURVE_FILE = "trec.parquet"
PLOT_FILE = "trec.png"


@dataclass(frozen=True)
class AveragingSummary(Summary):
    """A prediction's checkpoint averaging (`training.trec.AveragedPrediction.summary`): the
    averaging, the step after which each snapshot is taken and its weight (oldest first), and the
    raw final model's weight on theta_0, valley and HQ window, beside the averaged model's that the
    prediction's own keys give."""

    kind: str
    checkpoints: int
    every: int
    alpha: float | None
    snapshot_steps: tuple[int, ...]
    weights: tuple[float, ...]
    final_initial_weight: float
    final_valley_step: int
    final_valley_fraction: float
    final_hq_window: tuple[float, float]
    final_hq_window_steps: tuple[int, int]


@dataclass(frozen=True)
class PredictSummary(Summary):
    """The predicted TREC of a recipe: `training.trec.recipe_summary`'s keys, in its order (the
    ``trecflow predict --json`` object); windows are [start, end) fractions and steps. ``schedule``
    is the schedule section predicted from (absent in summaries stored before it was recorded);
    ``averaging`` is there only for a variant with averaging (then valley, window and
    ``initial_weight`` are the averaged model's); ``variant`` is not stored (one prediction serves
    every variant with the same schedule and averaging): the runner's view adds it."""

    recipe: str
    steps: int
    warmup_steps: int
    tau: float
    tpp: float
    tau_opt: float
    tau_ratio: float
    weight_decay_opt: float
    p: float
    m: float
    initial_weight: float
    valley_step: int
    valley_fraction: float
    hq_fraction: float
    hq_window: tuple[float, float]
    hq_window_steps: tuple[int, int]
    warnings: tuple[str, ...]
    tokens_trained: int
    tokens_unused: int
    schedule: Mapping[str, Any] | None = omitted_when_none()
    averaging: AveragingSummary | None = omitted_when_none()
    variant: str | None = omitted_when_none()


def predict_fingerprint(recipe: Recipe, variant: str | None = None) -> str:
    """Fingerprint of the prediction of ``recipe`` as ``variant`` runs it: the sections it reads
    (the variant's own schedule in place of the recipe's), the HQ fraction and, only for a variant
    with averaging, the averaging. A variant without either has the recipe's fingerprint."""
    config = recipe.for_variant(variant).section("model", "data", "batch", "optimizer", "schedule", "trec")
    config["hq_fraction"] = recipe.curriculum.hq_fraction
    averaging = recipe.averaging(variant)
    if averaging is not None:
        config["averaging"] = averaging.model_dump(mode="json")
    return fingerprint(STAGE, STAGE_VERSION, config)


def curve_table(prediction: TrecPrediction) -> pa.Table:
    """The per-step curve as an Arrow table (columns: step, fraction, lr, c, trec_pred; with
    averaging also c_final and trec_final, the raw final model's)."""
    import pyarrow as pa

    columns = {
        "step": pa.array(range(prediction.steps), type=pa.int64()),
        "fraction": prediction.fractions,
        "lr": prediction.lrs,
        "c": prediction.coefficients,
        "trec_pred": prediction.trec,
    }
    if prediction.averaged is not None:
        columns["c_final"] = prediction.averaged.final_coefficients
        columns["trec_final"] = prediction.averaged.final_trec
    return pa.table(columns)


class PredictStage(Stage[PredictSummary], name=STAGE, version=STAGE_VERSION, title="TREC prediction", task_name="predict_trec", figure=PLOT_FILE,
                   summary_type=PredictSummary):
    """Stage 2: the predicted TREC of the recipe (pure numpy, milliseconds)."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return predict_fingerprint(target.recipe, target.variant)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> PredictSummary:
        recipe = target.recipe
        prediction = predict(recipe, target.variant)
        import pyarrow.parquet as pq

        hq_fraction = recipe.curriculum.hq_fraction
        buffer = io.BytesIO()
        pq.write_table(curve_table(prediction), buffer, compression="zstd")
        output.write_bytes(CURVE_FILE, buffer.getvalue())
        output.write_bytes(PLOT_FILE, plot_prediction(prediction, hq_fraction, title=f"{recipe.name}: predicted TREC"))
        return PredictSummary.from_json(recipe_summary(recipe, prediction, hq_fraction))

    def view(self, target: Target, summary: PredictSummary) -> PredictSummary:
        section = target.recipe.own_variant(target.variant)
        return replace(summary, variant=target.variant) if section is not None and section.predicts_own else summary

    def counts(self, summary: PredictSummary) -> dict[str, Any]:
        return {"steps": summary.steps, "tokens_unused": summary.tokens_unused}

    def rows(self, summary: PredictSummary) -> list[tuple[str, str]]:
        start, end = summary.hq_window
        first, last = summary.hq_window_steps
        averaging = summary.averaging
        rows = [("recipe", summary.recipe)]
        if summary.variant is not None:
            rows.append(("variant", summary.variant))
        rows.append(("steps", f"{summary.steps:,} ({summary.warmup_steps:,} warmup; {summary.tokens_unused:,} tokens unused)"))
        if summary.schedule is not None:
            rows.append(("schedule", describe_schedule(ScheduleSection(**summary.schedule))))
        rows += [
            ("tau", f"{summary.tau:.4g}"),
            ("tokens per parameter", f"{summary.tpp:.4g}"),
            ("Power-Lines tau_opt", f"{summary.tau_opt:.4g} (tau/tau_opt = {summary.tau_ratio:.2f}; weight decay for it: {summary.weight_decay_opt:.4g})"),
            ("predictor", f"TREC = 1 - c^{summary.p:g} * t^{summary.m:g}"),
        ]
        if averaging is not None:
            weights = ", ".join(f"{weight:.3g}" for weight in averaging.weights)
            alpha = f" (alpha {averaging.alpha:g})" if averaging.alpha is not None else ""
            rows.append(("averaging", f"{averaging.kind}{alpha} of {averaging.checkpoints} checkpoints {averaging.every:,} steps apart, after steps "
                                      f"{averaging.snapshot_steps[0]:,}..{averaging.snapshot_steps[-1]:,}; weights, oldest first: {weights}"))
        model = " (averaged model)" if averaging is not None else ""
        rows += [
            (f"predicted valley{model}", f"{summary.valley_fraction:.4f} of training (step {summary.valley_step:,})"),
            (f"HQ window (w = {summary.hq_fraction:g}){model}", f"[{start:.4f}, {end:.4f}] (steps {first:,}..{last - 1:,})"),
        ]
        if averaging is not None:
            final_first, final_last = averaging.final_hq_window_steps
            rows.append(("raw final model", f"valley {averaging.final_valley_fraction:.4f} (step {averaging.final_valley_step:,}); HQ window "
                                            f"[{averaging.final_hq_window[0]:.4f}, {averaging.final_hq_window[1]:.4f}] (steps "
                                            f"{final_first:,}..{final_last - 1:,})"))
        return rows + [("warning", text) for text in summary.warnings]

    def metrics(self, summary: PredictSummary) -> dict[str, float]:
        start, end = summary.hq_window
        metrics = {
            "steps": summary.steps, "tau": summary.tau, "tpp": summary.tpp, "tau_opt": summary.tau_opt,
            "weight_decay_opt": summary.weight_decay_opt, "trec_valley_predicted": summary.valley_fraction,
            "trec_valley_step_predicted": summary.valley_step, "hq_window_start": start, "hq_window_end": end,
        }
        if summary.averaging is not None:
            metrics["trec_valley_predicted_final"] = summary.averaging.final_valley_fraction
        return metrics

    def artifacts(self, summary: PredictSummary) -> list[str]:
        return [PLOT_FILE, SUMMARY_FILE]


PREDICT = PredictStage()


def read_curve(store: Store, fp: str) -> pa.Table:
    """The stored curve of a committed prediction (checksum verified)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.output(STAGE, fp).read_bytes(CURVE_FILE)))


def run_predict(recipe: Recipe, store: Store, force: bool = False, variant: str | None = None) -> StageResult[PredictSummary]:
    """The prediction of ``recipe`` (as ``variant`` runs it) alone (the runner: reuse, or compute under a lease)."""
    from trecflow.runner import run_stage

    return run_stage(PREDICT, Target(recipe, variant), store, force=force, progress=None)
