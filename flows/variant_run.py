"""What a curriculum variant's MLflow run shows, read from the store, so that a cached rerun shows
exactly what the first run showed.

- Parameters that differ between variants (``variant``, ``variant.strategy``,
  ``variant.params.*``, and the placement's ``placement.hq_fraction`` / ``placement.window``), so
  MLflow's "show diff only" has something to show.
- Per-step curves: ``loss``, ``lr`` (from the training audit log, every ``training.log_every``
  steps and the last), ``hq_share`` (from the sample index's per-step composition), and the
  measured TREC by step: ``trec_raw``, ``trec_corrected`` (with a reference), ``trec_predicted``.
  Variant runs carry the same metric names, so MLflow's compare view overlays them.
- Dataset inputs (``log_input``): the scored corpus and the sample index, digests = fingerprints.
- The final model in MLflow's model registry as ``<recipe>-<variant>``, pointing at the store
  (nothing copied), with a model card (`model_card`) that embeds stage 1's data card and the
  curriculum. The version carries the tags ``trecflow.store``, ``trecflow.stage`` (``train``) and
  ``trecflow.fingerprint``: one version per trained output, reused by a rerun, and what
  ``trecflow gc`` reads to never remove a registered model.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np

from trecflow.inventory import FINGERPRINT_TAG, STAGE_TAG, STORE_TAG
from trecflow.recipe import Recipe
from trecflow.stage import StageResult
from trecflow.store import Store
from trecflow.tracking import Tracker, flatten
from training.schedules import describe_schedule

VARIANT_KIND = "variant"  # the ``trecflow.kind`` tag of a variant's run
CURVE_NAMES = ("loss", "lr", "hq_share", "trec_raw", "trec_corrected", "trec_predicted")


def variant_params(recipe: Recipe, variant: str, place: Any | None) -> dict[str, Any]:
    """The parameters that tell variants apart (the recipe's own are the same for all of them)."""
    section = recipe.curriculum.variant(variant)
    params: dict[str, Any] = {"variant": variant, "variant.strategy": section.strategy, **flatten(section.params, "variant.params.")}
    if section.schedule is not None:  # only a variant that sets them: the others' parameters are what they were
        params.update(flatten(section.schedule.model_dump(mode="json"), "variant.schedule."))
    if section.averaging is not None:
        params.update(flatten(section.averaging.model_dump(mode="json"), "variant.averaging."))
    if place is not None:
        params["placement.hq_fraction"] = place.hq_fraction
        params["placement.window"] = "none" if place.window is None else f"{place.window[0]:.4f}-{place.window[1]:.4f}"
    return params


def training_curves(store: Store, train_fp: str, place_fp: str, every: int) -> dict[str, list[tuple[int, float]]]:
    """``loss`` and ``lr`` of the final trajectory (each step's last audit record), every
    ``every`` steps and the last; ``hq_share`` of the same steps from the sample index."""
    from training.loss_curves import final_trajectory
    from training.sample_index import COMPOSITION_FILE, read_npy

    last = {record["step"]: record for record in final_trajectory(store, train_fp)}
    if not last:
        return {}
    final = max(last)
    steps = [step for step in sorted(last) if step % every == 0 or step == final]
    composition = read_npy(store.output("place", place_fp), COMPOSITION_FILE).astype(np.float64)
    hq_share = composition[:, 0] / np.maximum(composition.sum(axis=1), 1.0)
    return {
        "loss": [(step, last[step]["loss"]) for step in steps],
        "lr": [(step, last[step]["lr"]) for step in steps],
        "hq_share": [(step, float(hq_share[step])) for step in steps if step < hq_share.size],
    }


def trec_table(store: Store, reevaluate_fp: str):
    """The measured TREC of a re-evaluation (one row per evaluated step; `tasks.reevaluate`)."""
    import pyarrow.parquet as pq

    from tasks.reevaluate import CURVE_FILE

    return pq.read_table(io.BytesIO(store.output("reevaluate", reevaluate_fp).read_bytes(CURVE_FILE)))


def trec_curves(store: Store, reevaluate_fp: str) -> dict[str, list[tuple[int, float]]]:
    """``trec_raw`` (the final model's loss on each evaluated step's batch), ``trec_corrected``
    (when a reference corrected it) and ``trec_predicted``, by step."""
    table = trec_table(store, reevaluate_fp)
    steps = table["step"].to_pylist()
    columns = {"trec_raw": "loss", "trec_corrected": "corrected", "trec_predicted": "trec_pred"}
    return {name: list(zip(steps, table[column].to_pylist())) for name, column in columns.items() if column in table.column_names}


def model_card(recipe: Recipe, variant: str, results: Mapping[str, StageResult], data_card: str | None) -> str:
    """Markdown: the model (where it is, what it trained on, how), its curriculum and held-out
    losses when measured, and stage 1's data card."""
    train, place = results["train"], results.get("place")
    section = recipe.curriculum.variant(variant)
    lines = [
        f"# {recipe.name} / {variant}",
        "",
        f"Weights: `{train.summary.model_uri}` (in the store; not copied). Training output fingerprint `{train.fingerprint}`.",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {train.summary.steps:,} |",
        f"| final training loss | {train.summary.final_loss:.4f} |",
        f"| curriculum | `{section.strategy}` {dict(section.params) or ''} |",
    ]
    if place is not None:
        window = "none" if place.summary.window is None else f"{place.summary.window[0]:.3f}-{place.summary.window[1]:.3f} of training"
        lines += [f"| hq fraction | {place.summary.hq_fraction:g} |", f"| hq window | {window} |"]
    lines.append(f"| schedule | {describe_schedule(recipe.for_variant(variant).schedule)}, peak LR {recipe.optimizer.peak_lr:g} |")
    averaging = recipe.averaging(variant)
    if averaging is not None:  # the registered weights are the average; the raw final weights are beside them
        alpha = f" (alpha {averaging.alpha:g})" if averaging.kind == "ema" else ""
        lines.append(f"| weights | {averaging.kind}{alpha} of {averaging.checkpoints} snapshots {averaging.every:,} steps apart; "
                     f"raw final weights: `{train.summary.final_model_uri}` |")
    measured = results.get("reevaluate")
    if measured is not None:
        summary = measured.summary
        for name in ("val_loss_hq", "val_loss_general", "trec_pearson", "trec_valley_measured"):
            value = getattr(summary, name)
            if value is not None:
                lines.append(f"| {name} | {value:.4f} |")
    lines.append("")
    if data_card:
        body = data_card.split("\n", 1)[1] if data_card.startswith("# ") else data_card  # its own title dropped
        lines += ["## Training data (stage 1's data card)", "", body.strip(), ""]
    return "\n".join(lines)


def _data_card(store: Store, results: Mapping[str, StageResult]) -> str | None:
    from tasks.score import DATA_CARD_FILE

    score = results.get("score")
    if score is None or not store.output("score", score.fingerprint).exists():
        return None
    return store.output("score", score.fingerprint).read_bytes(DATA_CARD_FILE).decode()


def log_variant_run(tracker: Tracker, run_id: str, recipe: Recipe, variant: str, results: Mapping[str, StageResult]) -> None:
    """Everything of the module docstring that ``results`` (a run's stage results) allows."""
    store = tracker.store
    place = results.get("place")
    tracker.log_params(run_id, variant_params(recipe, variant, place.summary if place else None))
    series: dict[str, list[tuple[int, float]]] = {}
    if "train" in results and place is not None:
        series |= training_curves(store, results["train"].fingerprint, place.fingerprint, recipe.training.log_every)
    if "reevaluate" in results:
        series |= trec_curves(store, results["reevaluate"].fingerprint)
    tracker.log_series(run_id, series)
    if "score" in results:
        tracker.log_dataset(run_id, f"{recipe.name}-corpus", store.uri("score", results["score"].fingerprint), results["score"].fingerprint, "training")
    if place is not None:
        tracker.log_dataset(run_id, f"{recipe.name}-{variant}-sample-index", store.uri("place", place.fingerprint), place.fingerprint, "curriculum")
    if "train" in results:
        train = results["train"]
        card = model_card(recipe, variant, results, _data_card(store, results))
        tracker.log_artifact_bytes(run_id, "model_card.md", card.encode())
        tags = {STORE_TAG: store.url, STAGE_TAG: "train", FINGERPRINT_TAG: train.fingerprint}  # what `trecflow gc` protects
        version, _ = tracker.register_model(f"{recipe.name}-{variant}", train.summary.model_uri, run_id, tags, card)
        tracker.set_tags(run_id, {"trecflow.model_version": f"{recipe.name}-{variant}/{version}"})


def variant_curves(store: Store, variant: str, outcome: Mapping[str, Any], every: int):
    """A variant's `flows.comparison_plot.VariantCurves` from a `cpt_pipeline` outcome (empty
    curves for the stages it did not reach)."""
    from flows.comparison_plot import VariantCurves

    empty = np.zeros(0)
    loss_fraction, loss = empty, empty
    if "train" in outcome and "place" in outcome:
        points = training_curves(store, outcome["train"]["fingerprint"], outcome["place"]["fingerprint"], every)["loss"]
        steps = np.array([step for step, _ in points], dtype=np.float64)
        loss_fraction, loss = (steps + 1) / outcome["train"]["steps"], np.array([value for _, value in points])
    trec_fraction, measured, predicted, corrected = empty, empty, empty, False
    if "reevaluate" in outcome:
        table = trec_table(store, outcome["reevaluate"]["fingerprint"])
        corrected = "corrected_smoothed" in table.column_names
        trec_fraction = table["fraction"].to_numpy()
        measured = table["corrected_smoothed" if corrected else "loss_smoothed"].to_numpy()
        predicted = table["trec_pred"].to_numpy()
    return VariantCurves(variant, loss_fraction, loss, trec_fraction, measured, predicted, corrected)
