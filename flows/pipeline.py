"""The ``cpt_pipeline`` flow: one run of one recipe and one curriculum variant.

Stages run as separate Prefect tasks whose cache keys are their output fingerprints, so a rerun
reuses every complete output. ``force`` names stages to recompute; everything downstream of a
forced stage is recomputed too. Today the flow runs scoring (when the recipe has a corpus) and the
TREC prediction; placement, training and re-evaluation join it as they land.

Each flow run opens one MLflow run (experiment = recipe name) with the recipe as parameters and
each stage's metrics and artifacts, and leaves Prefect markdown artifacts with each stage's summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from typing import Any, Iterator

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from tasks.predict import PLOT_FILE, SUMMARY_FILE, PredictResult, predict_fingerprint, predict_trec
from tasks.score import CLASSIFIER_META, CLASSIFIER_WEIGHTS, ScoreResult, score_corpus
from tasks.score import current_fingerprint as score_fingerprint_now
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


def score_metrics(stats: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a scoring run."""
    metrics = {
        "documents": stats["documents"],
        "dropped_empty": stats["dropped"]["empty"],
        "dropped_duplicate": stats["dropped"]["duplicate"],
        "classifier_training_documents": stats["classifier_training"],
    }
    if stats.get("classifier_accuracy") is not None:
        metrics["classifier_accuracy"] = stats["classifier_accuracy"]
    for source, fractions in stats["tiers"].items():
        for tier, fraction in fractions.items():
            metrics[f"tier_fraction.{source}.{tier}"] = fraction
    return metrics


def score_markdown(recipe: Recipe, result: ScoreResult) -> str:
    stats = result.stats
    rows = "\n".join(
        f"| {source} | {entry['documents']:,} | {stats['tiers'][source]['hq']:.3f} | {stats['tiers'][source]['mid']:.3f} "
        f"| {stats['tiers'][source]['lq']:.3f} | {entry['mean_score']:.3f} |"
        for source, entry in stats["sources"].items()
    )
    accuracy = stats.get("classifier_accuracy")
    return (
        f"# Quality scores: {recipe.name}\n\n"
        f"{stats['documents']:,} documents scored; dropped {stats['dropped']}; "
        f"{stats['classifier_training']:,} reserved to train the classifier"
        + (f" (held-out accuracy {accuracy:.4f})" if accuracy is not None else "")
        + f"; output `{result.uri}`\n\n| source | documents | hq | mid | lq | mean score |\n|---|---|---|---|---|---|\n{rows}\n"
    )


def run_cached(stage_task, stage: str, fp: str, store: Store, forced: set[str], recipe: Recipe):
    """Run a stage task, trusting Prefect's cache only while the output is complete in the store."""
    force = stage in forced
    refresh = force or not store.output(stage, fp).exists()
    result = stage_task.with_options(refresh_cache=refresh)(recipe, store.url, store.endpoint_url, force=force)
    # A cached task returns the result of the run that computed it; report this run's view.
    return dataclasses.replace(result, reused=not refresh)


@contextlib.contextmanager
def tracked_run(store: Store, recipe: Recipe, run_name: str, tags: dict[str, str]) -> Iterator[tuple[Tracker, str]]:
    """An MLflow run that ends FINISHED, or FAILED if the block raises."""
    tracker = Tracker(store)
    run_id = tracker.start_run(recipe, run_name=run_name, tags={**tags, "prefect.flow_run_id": str(flow_run.id)})
    try:
        yield tracker, run_id
    except BaseException:
        tracker.end_run(run_id, status="FAILED")
        raise
    tracker.end_run(run_id)


def score_step(recipe: Recipe, store: Store, forced: set[str], tracker: Tracker, run_id: str) -> ScoreResult:
    """Stage 1 inside a flow: the task, then MLflow and a Prefect artifact."""
    logger = get_run_logger()
    result: ScoreResult = run_cached(score_corpus, "score", score_fingerprint_now(recipe, store), store, forced, recipe)
    stats = result.stats
    logger.info(
        "scores %s (%s): %d documents, tiers %s, classifier accuracy %s",
        result.fingerprint, "reused" if result.reused else "computed", stats["documents"], stats["tier_totals"], stats.get("classifier_accuracy"),
    )
    output = store.output("score", result.fingerprint)
    tracker.set_tags(run_id, {"trecflow.score_fingerprint": result.fingerprint, "trecflow.ingest_fingerprint": result.ingest_fingerprint})
    tracker.log_metrics(run_id, score_metrics(stats))
    files = ["stats.json", "score_histogram.png"]
    if stats.get("classifier_accuracy") is not None:
        files += [CLASSIFIER_WEIGHTS, CLASSIFIER_META]
    for name in files:
        folder, _, base = f"score/{name}".rpartition("/")
        tracker.log_artifact_bytes(run_id, base, output.read_bytes(name), artifact_path=folder)
    create_markdown_artifact(
        key=artifact_key("quality-scores", recipe.name), markdown=score_markdown(recipe, result), description=f"quality scores of {recipe.name}"
    )
    return result


def predict_step(recipe: Recipe, variant: str, store: Store, forced: set[str], tracker: Tracker, run_id: str) -> PredictResult:
    """Stage 2 inside a flow: the task, then MLflow and a Prefect artifact."""
    logger = get_run_logger()
    result: PredictResult = run_cached(predict_trec, "predict", predict_fingerprint(recipe), store, forced, recipe)
    logger.info(
        "prediction %s (%s): valley %.4f, HQ window %s",
        result.fingerprint, "reused" if result.reused else "computed", result.summary["valley_fraction"], result.summary["hq_window"],
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
    return result


def _stage_summary(result) -> dict[str, Any]:
    data = result.summary if isinstance(result, PredictResult) else result.stats
    return {"fingerprint": result.fingerprint, "uri": result.uri, "reused": result.reused, **data}


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
    outcome: dict[str, Any] = {"recipe": recipe.name, "variant": variant, "store": store.url}
    tags = {"trecflow.variant": variant, "trecflow.recipe_path": recipe_path}
    with tracked_run(store, recipe, f"{recipe.name}-{variant}", tags) as (tracker, run_id):
        outcome["mlflow_run_id"] = run_id
        if recipe.corpus is not None:
            outcome["score"] = _stage_summary(score_step(recipe, store, forced, tracker, run_id))
        else:
            logger.info("no corpus section: the score stage is skipped")
        outcome["predict"] = _stage_summary(predict_step(recipe, variant, store, forced, tracker, run_id))
    return outcome


@flow(name="score_corpus_stage")
def score_stage(recipe_path: str, force: bool = False) -> dict[str, Any]:
    """Run stage 1 alone (the CLI's ``trecflow score``), through the same task as the pipeline."""
    recipe = load_recipe(recipe_path)
    if recipe.corpus is None:
        raise RecipeError(f"{recipe_path}: corpus: the score stage needs a corpus section")
    store = Store(store_url(recipe), store_endpoint(recipe))
    with tracked_run(store, recipe, f"{recipe.name}-score", {"trecflow.stage": "score", "trecflow.recipe_path": recipe_path}) as (tracker, run_id):
        result = score_step(recipe, store, {"score"} if force else set(), tracker, run_id)
    return {"recipe": recipe.name, "store": store.url, "mlflow_run_id": run_id, "score": _stage_summary(result)}
