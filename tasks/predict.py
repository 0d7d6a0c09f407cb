"""Stage 2, predict the TREC: the curve, its summary and its plot, written to the store.

Output ``<store>/predict/<fingerprint>/`` (pyarrow is imported on first use: ``trecflow predict``
imports this module for `PredictSummary`):
- ``trec.parquet``: one row per step: step, fraction, lr, c, trec_pred (the whole curve, which
  placement reads to compute its window for the w it actually gets);
- ``summary.json``: `TrecPrediction.summary` plus the recipe name and unused tokens;
- ``trec.png``: LR, c and predicted TREC with the valley and HQ window;
- ``_MANIFEST.json`` last.

The fingerprint covers every recipe section the prediction reads, so a changed recipe gives a new
folder and an unchanged one is reused.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe
from trecflow.stage import SUMMARY_FILE, Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store
from training.trec import TrecPrediction, predict, recipe_summary
from training.trec_plot import plot_prediction

if TYPE_CHECKING:
    import pyarrow as pa

STAGE = "predict"
STAGE_VERSION = 1
CURVE_FILE = "trec.parquet"
PLOT_FILE = "trec.png"


@dataclass(frozen=True)
class PredictSummary(Summary):
    """The predicted TREC of a recipe: `training.trec.recipe_summary`'s keys, in its order (the
    ``trecflow predict --json`` object); windows are [start, end) fractions and steps."""

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


def predict_fingerprint(recipe: Recipe) -> str:
    """Fingerprint of the prediction of ``recipe``: the sections it reads and the HQ fraction."""
    config = recipe.section("model", "data", "batch", "optimizer", "schedule", "trec")
    config["hq_fraction"] = recipe.curriculum.hq_fraction
    return fingerprint(STAGE, STAGE_VERSION, config)


def curve_table(prediction: TrecPrediction) -> pa.Table:
    """The per-step curve as an Arrow table (columns: step, fraction, lr, c, trec_pred)."""
    import pyarrow as pa

    return pa.table(
        {
            "step": pa.array(range(prediction.steps), type=pa.int64()),
            "fraction": prediction.fractions,
            "lr": prediction.lrs,
            "c": prediction.coefficients,
            "trec_pred": prediction.trec,
        }
    )


class PredictStage(Stage[PredictSummary], name=STAGE, version=STAGE_VERSION, title="TREC prediction", task_name="predict_trec", figure=PLOT_FILE,
                   summary_type=PredictSummary):
    """Stage 2: the predicted TREC of the recipe (pure numpy, milliseconds)."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return predict_fingerprint(target.recipe)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> PredictSummary:
        recipe = target.recipe
        prediction = predict(recipe)
        import pyarrow.parquet as pq

        hq_fraction = recipe.curriculum.hq_fraction
        buffer = io.BytesIO()
        pq.write_table(curve_table(prediction), buffer, compression="zstd")
        output.write_bytes(CURVE_FILE, buffer.getvalue())
        output.write_bytes(PLOT_FILE, plot_prediction(prediction, hq_fraction, title=f"{recipe.name}: predicted TREC"))
        return PredictSummary.from_json(recipe_summary(recipe, prediction, hq_fraction))

    def counts(self, summary: PredictSummary) -> dict[str, Any]:
        return {"steps": summary.steps, "tokens_unused": summary.tokens_unused}

    def rows(self, summary: PredictSummary) -> list[tuple[str, str]]:
        start, end = summary.hq_window
        first, last = summary.hq_window_steps
        rows = [
            ("recipe", summary.recipe),
            ("steps", f"{summary.steps:,} ({summary.warmup_steps:,} warmup; {summary.tokens_unused:,} tokens unused)"),
            ("tau", f"{summary.tau:.4g}"),
            ("tokens per parameter", f"{summary.tpp:.4g}"),
            ("Power-Lines tau_opt", f"{summary.tau_opt:.4g} (tau/tau_opt = {summary.tau_ratio:.2f}; weight decay for it: {summary.weight_decay_opt:.4g})"),
            ("predictor", f"TREC = 1 - c^{summary.p:g} * t^{summary.m:g}"),
            ("predicted valley", f"{summary.valley_fraction:.4f} of training (step {summary.valley_step:,})"),
            (f"HQ window (w = {summary.hq_fraction:g})", f"[{start:.4f}, {end:.4f}] (steps {first:,}..{last - 1:,})"),
        ]
        return rows + [("warning", text) for text in summary.warnings]

    def metrics(self, summary: PredictSummary) -> dict[str, float]:
        start, end = summary.hq_window
        return {
            "steps": summary.steps, "tau": summary.tau, "tpp": summary.tpp, "tau_opt": summary.tau_opt,
            "weight_decay_opt": summary.weight_decay_opt, "trec_valley_predicted": summary.valley_fraction,
            "trec_valley_step_predicted": summary.valley_step, "hq_window_start": start, "hq_window_end": end,
        }

    def artifacts(self, summary: PredictSummary) -> list[str]:
        return [PLOT_FILE, SUMMARY_FILE]


PREDICT = PredictStage()


def read_curve(store: Store, fp: str) -> pa.Table:
    """The stored curve of a committed prediction (checksum verified)."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.output(STAGE, fp).read_bytes(CURVE_FILE)))


def run_predict(recipe: Recipe, store: Store, force: bool = False) -> StageResult[PredictSummary]:
    """The prediction of ``recipe`` alone (the runner: reuse, or compute under a lease)."""
    from trecflow.runner import run_stage

    return run_stage(PREDICT, Target(recipe), store, force=force, progress=None)
