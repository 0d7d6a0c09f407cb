"""Stage 2, predict the TREC: the curve, its summary and its plot, written to the store.

Output ``<store>/predict/<fingerprint>/``:
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
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.stage_task import stage_task
from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe
from trecflow.store import Store
from training.trec import TrecPrediction, predict, recipe_summary
from training.trec_plot import plot_prediction

STAGE = "predict"
STAGE_VERSION = 1
CURVE_FILE = "trec.parquet"
SUMMARY_FILE = "summary.json"
PLOT_FILE = "trec.png"


def predict_fingerprint(recipe: Recipe) -> str:
    """Fingerprint of the prediction of ``recipe``: the sections it reads and the HQ fraction."""
    config = recipe.section("model", "data", "batch", "optimizer", "schedule", "trec")
    config["hq_fraction"] = recipe.curriculum.hq_fraction
    return fingerprint(STAGE, STAGE_VERSION, config)


def curve_table(prediction: TrecPrediction) -> pa.Table:
    """The per-step curve as an Arrow table (columns: step, fraction, lr, c, trec_pred)."""
    return pa.table(
        {
            "step": pa.array(range(prediction.steps), type=pa.int64()),
            "fraction": prediction.fractions,
            "lr": prediction.lrs,
            "c": prediction.coefficients,
            "trec_pred": prediction.trec,
        }
    )


@dataclass(frozen=True)
class PredictResult:
    """What the stage hands downstream: where the output is and its summary."""

    fingerprint: str
    uri: str
    summary: dict[str, Any]
    reused: bool


def run_predict(recipe: Recipe, store: Store, force: bool = False) -> PredictResult:
    """Write the prediction of ``recipe`` to ``store`` unless a complete output exists.

    ``force`` removes the manifest first and recomputes. A folder without a manifest (an earlier
    attempt that died) is cleared before writing.
    """
    fp = predict_fingerprint(recipe)
    output = store.output(STAGE, fp)
    if output.exists() and not force:
        summary = json.loads(output.read_bytes(SUMMARY_FILE))
        return PredictResult(fp, output.uri, summary, reused=True)
    output.invalidate()

    prediction = predict(recipe)
    hq_fraction = recipe.curriculum.hq_fraction
    summary = recipe_summary(recipe, prediction, hq_fraction)
    buffer = io.BytesIO()
    pq.write_table(curve_table(prediction), buffer, compression="zstd")
    output.write_bytes(CURVE_FILE, buffer.getvalue())
    output.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())
    output.write_bytes(PLOT_FILE, plot_prediction(prediction, hq_fraction, title=f"{recipe.name}: predicted TREC"))
    output.commit(counts={"steps": prediction.steps, "tokens_unused": recipe.tokens_unused})
    return PredictResult(fp, output.uri, summary, reused=False)


def read_curve(store: Store, fp: str) -> pa.Table:
    """The stored curve of a committed prediction (checksum verified)."""
    return pq.read_table(io.BytesIO(store.output(STAGE, fp).read_bytes(CURVE_FILE)))


@stage_task("predict_trec", STAGE, lambda recipe, store: predict_fingerprint(recipe), retry_delay_seconds=5)
def predict_trec(recipe: Recipe, store_url: str, endpoint_url: str | None = None, force: bool = False) -> PredictResult:
    """Prefect task around `run_predict`; its cache key is the stage fingerprint (and the store)."""
    return run_predict(recipe, Store(store_url, endpoint_url), force=force)
