"""The calibration table and law in the store, and ``trec: {m: calibrated}``.

- ``<store>/calibration/runs/<re-evaluation fp>.json``: one entry per measured run whose tier mix
  is constant in time (TPP, tau, schedule kind, m*), written whole by stage 5.
- ``<store>/calibration/law.json``: the law `trecflow calibrate` fitted (`training.calibration`),
  with the keys of the runs it was fitted from.
- `resolve_m`: a recipe with ``m: calibrated`` gets the law's m for its schedule, TPP and tau
  before anything is predicted, so its prediction fingerprint carries the number used.
"""

from __future__ import annotations

import json
from typing import Any

from trecflow.recipe import Recipe, RecipeError
from trecflow.store import Store
from training.calibration import CalibrationError, CalibrationRun, fit_law, law_m

FOLDER = "calibration"
LAW_FILE = "law.json"


def record_run(store: Store, run: CalibrationRun) -> str:
    """Add (or replace) a run's entry in the table; returns its URI."""
    path = store.path(FOLDER, "runs", f"{run.key}.json")
    store.put_atomic(path, json.dumps(run.as_dict(), indent=2).encode())
    return store.uri(FOLDER, "runs", f"{run.key}.json")


def read_runs(store: Store) -> list[CalibrationRun]:
    """Every entry of the calibration table, in key order."""
    runs = []
    for path in sorted(store.fs.glob(store.path(FOLDER, "runs", "*.json"))):
        runs.append(CalibrationRun(**json.loads(store.fs.cat_file(path))))
    return runs


def run_calibrate(store: Store, p: float | None = None) -> dict[str, Any]:
    """Fit the law over the recorded runs predicted with ``p`` (None: the one p they share) and
    save it; CalibrationError (saying why) when no law can be fitted, in which case the saved law,
    if any, is left as it was."""
    runs = read_runs(store)
    fitted = fit_law(runs, p)
    fitted["table"] = [run.as_dict() for run in runs]
    store.put_atomic(store.path(FOLDER, LAW_FILE), json.dumps(fitted, indent=2).encode())
    fitted["uri"] = store.uri(FOLDER, LAW_FILE)
    return fitted


def read_law(store: Store) -> dict[str, Any] | None:
    path = store.path(FOLDER, LAW_FILE)
    return json.loads(store.fs.cat_file(path)) if store.fs.exists(path) else None


def resolve_m(recipe: Recipe, store: Store) -> Recipe:
    """``recipe`` itself when m is a number; else a copy whose m comes from the stored law, for the
    recipe's schedule kind and, kept for `Recipe.for_variant`, for the kind of every variant that
    sets its own schedule (a kind without a law is a RecipeError naming the variant)."""
    if recipe.trec.m != "calibrated":
        return recipe
    law = read_law(store)
    if law is None:
        raise RecipeError(f"trec.m: calibrated, but {store.uri(FOLDER, LAW_FILE)} does not exist; run `trecflow calibrate` first")
    if law.get("p") is not None and law["p"] != recipe.trec.p:
        raise RecipeError(f"trec.m: calibrated, but the law in {store.uri(FOLDER, LAW_FILE)} was fitted on runs predicted with p = {law['p']:g}, "
                          f"the recipe has trec.p = {recipe.trec.p:g}; run `trecflow calibrate --p {recipe.trec.p:g}`")
    tau = 1.0 / (recipe.optimizer.peak_lr * recipe.optimizer.weight_decay * recipe.steps)
    tpp = recipe.data.tokens / recipe.model.params
    kinds = {recipe.schedule.kind: "trec.m: calibrated"}
    for name, variant in recipe.curriculum.variants.items():
        if variant.schedule is not None:
            kinds.setdefault(variant.schedule.kind, f"trec.m: calibrated (variant {name}, schedule {variant.schedule.kind})")
    by_kind = {}
    for kind, field in kinds.items():
        try:
            by_kind[kind] = round(law_m(law, kind, tpp, tau)[0], 6)
        except CalibrationError as error:
            raise RecipeError(f"{field}: {error}") from None
    resolved = recipe.model_copy(update={"trec": recipe.trec.model_copy(update={"m": by_kind[recipe.schedule.kind]})})
    resolved._calibrated_m = by_kind
    return resolved
