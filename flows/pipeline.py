"""The ``cpt_pipeline`` flow: one run of one recipe and one curriculum variant.

Stages run as separate Prefect tasks whose cache keys are their output fingerprints, so a rerun
reuses every complete output. ``force`` names stages to recompute; everything downstream of a
forced stage is recomputed too. The stages not yet built (score, place, train, re-evaluate) join
this flow as they land; today it runs the TREC prediction.

Each flow run opens one MLflow run (experiment = recipe name) with the recipe as parameters, the
prediction's metrics, its plot and summary, and leaves a Prefect markdown artifact with the summary.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.predict import PLOT_FILE, SUMMARY_FILE, PredictResult, predict_fingerprint, predict_trec
from trecflow.recipe import Recipe, RecipeError, load_recipe
from trecflow.settings import store_endpoint, store_url
from trecflow.store import Store
from trecflow.tracking import Tracker

# Which stages each stage reads (the design's diagram). Forcing a stage forces its dependents.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "score": (),
    "predict": (),
    "place": ("score", "predict"),
    "train": ("place",),
    "reevaluate": ("train", "place"),
}


def forced_stages(force: list[str] | None) -> set[str]:
    """The named stages and everything downstream of them. Unknown names are a RecipeError."""
    forced = set()
    for name in force or []:
        if name not in STAGE_INPUTS:
            raise RecipeError(f"force: unknown stage {name!r} (stages: {', '.join(STAGE_INPUTS)})")
        forced.add(name)
    changed = True
    while changed:
        dependents = {stage for stage, inputs in STAGE_INPUTS.items() if forced.intersection(inputs)}
        changed = not dependents <= forced
        forced |= dependents
    return forced


def default_variant(recipe: Recipe) -> str:
    """The recipe's first declared variant, else ``trec_valley``."""
    return next(iter(recipe.curriculum.variants), "trec_valley")


def prediction_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a prediction summary."""
    start, end = summary["hq_window"]
    return {
        "steps": summary["steps"],
        "tau": summary["tau"],
        "tpp": summary["tpp"],
        "tau_opt": summary["tau_opt"],
        "weight_decay_opt": summary["weight_decay_opt"],
        "trec_valley_predicted": summary["valley_fraction"],
        "trec_valley_step_predicted": summary["valley_step"],
        "hq_window_start": start,
        "hq_window_end": end,
    }


def prediction_markdown(recipe: Recipe, variant: str, result: PredictResult) -> str:
    summary = result.summary
    start, end = summary["hq_window"]
    rows = [
        ("steps", f"{summary['steps']:,} ({summary['warmup_steps']:,} warmup; {summary['tokens_unused']:,} tokens unused)"),
        ("tau", f"{summary['tau']:.4g}"),
        ("tokens per parameter", f"{summary['tpp']:.4g}"),
        ("Power-Lines tau_opt", f"{summary['tau_opt']:.4g} (weight decay {summary['weight_decay_opt']:.4g})"),
        ("predicted valley", f"{summary['valley_fraction']:.4f} (step {summary['valley_step']:,})"),
        (f"HQ window (w = {summary['hq_fraction']:g})", f"[{start:.4f}, {end:.4f}]"),
        ("output", f"`{result.uri}` ({'reused' if result.reused else 'computed'})"),
    ]
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    warnings = "".join(f"\n> warning: {text}\n" for text in summary["warnings"])
    return f"# TREC prediction: {recipe.name} / {variant}\n\n| quantity | value |\n|---|---|\n{table}\n{warnings}"


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes)."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


@flow(name="cpt_pipeline")
def cpt_pipeline(recipe_path: str, variant: str | None = None, force: list[str] | None = None) -> dict[str, Any]:
    """Run the pipeline for the recipe at ``recipe_path`` and one curriculum variant."""
    logger = get_run_logger()
    recipe = load_recipe(recipe_path)
    variant = variant or default_variant(recipe)
    recipe.curriculum.variant(variant)  # unknown variant: RecipeError before any work
    forced = forced_stages(force)
    store = Store(store_url(recipe), store_endpoint(recipe))
    logger.info("recipe %s, variant %s, store %s, forced stages: %s", recipe.name, variant, store.url, sorted(forced) or "none")

    tracker = Tracker(store)
    run_id = tracker.start_run(
        recipe,
        run_name=f"{recipe.name}-{variant}",
        tags={"trecflow.variant": variant, "trecflow.recipe_path": recipe_path, "prefect.flow_run_id": str(flow_run.id)},
    )
    try:
        force_predict = "predict" in forced
        # Prefect's cache is trusted only while the output it points at is complete in the store.
        refresh = force_predict or not store.output("predict", predict_fingerprint(recipe)).exists()
        result: PredictResult = predict_trec.with_options(refresh_cache=refresh)(
            recipe, store.url, store.endpoint_url, force=force_predict
        )
        # A cached task returns the result of the run that computed it; report this run's view.
        result = dataclasses.replace(result, reused=not refresh)
        logger.info(
            "prediction %s (%s): valley %.4f, HQ window %s",
            result.fingerprint,
            "reused" if result.reused else "computed",
            result.summary["valley_fraction"],
            result.summary["hq_window"],
        )
        for warning in result.summary["warnings"]:
            logger.warning(warning)
        output = store.output("predict", result.fingerprint)
        tracker.set_tags(run_id, {"trecflow.predict_fingerprint": result.fingerprint})
        tracker.log_metrics(run_id, prediction_metrics(result.summary))
        tracker.log_artifact_bytes(run_id, PLOT_FILE, output.read_bytes(PLOT_FILE), artifact_path="predict")
        tracker.log_artifact_bytes(run_id, SUMMARY_FILE, output.read_bytes(SUMMARY_FILE), artifact_path="predict")
        create_markdown_artifact(
            key=artifact_key("trec-prediction", recipe.name, variant),
            markdown=prediction_markdown(recipe, variant, result),
            description=f"TREC prediction of {recipe.name}",
        )
    except BaseException:
        tracker.end_run(run_id, status="FAILED")
        raise
    tracker.end_run(run_id)
    return {
        "recipe": recipe.name,
        "variant": variant,
        "mlflow_run_id": run_id,
        "store": store.url,
        "predict": {"fingerprint": result.fingerprint, "uri": result.uri, "reused": result.reused, **result.summary},
    }
