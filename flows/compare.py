"""The ``compare_curricula`` flow: `cpt_pipeline` for several variants of one recipe, then one
MLflow comparison run with the variants' runs nested under it.

Variants share every cached stage (scoring, prediction, tokenizer, packing, the base model, the
held-out set and the reference losses), so only placement, training and re-evaluation run per
variant. On one machine the variants run one after another; with ``RAY_ADDRESS`` set (a cluster)
they run concurrently, each a subflow in its own thread whose Ray work lands on the cluster. At most
`concurrency` variants run at once: ``max_concurrent``, else on the local Ray as many as its CPUs
train at once (each variant's training reserves ``workers x cpus_per_worker`` CPUs), else (a
cluster, whose Ray queues the jobs) all. The peak memory of this process and the processes under it
(the local Ray's) is sampled every `MEMORY_SAMPLE_SECONDS` while the variants run and logged as
``peak_pss_mb`` / ``peak_rss_mb`` (`trecflow.memory`).

The comparison run (``compare``, its flow run ``<recipe>/compare``) holds ``comparison.json`` /
``comparison.csv`` (variant, ``val_loss_hq``, ``val_loss_general``, ``trec_pearson``, measured
valley, HQ window, ...), ``comparison.png`` (held-out losses per variant; the HQ windows over the
predicted TREC) and ``curves.png`` (every variant's training loss, and its measured TREC against
its own prediction); the flow run gets the same table as a Prefect table artifact. The variant
runs nested under it carry the per-step curves MLflow's compare view overlays
(`flows.variant_run`).
"""

from __future__ import annotations

import contextvars
import csv
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_table_artifact

from flows.comparison_plot import plot_variant_curves
from flows.params import DEFAULT_VARIANTS, Comparison, PipelineRun
from flows.pipeline import cpt_pipeline, load_run, mlflow_run_url, run_label, source_tags, tracked_run
from flows.reporters import artifact_key
from flows.variant_run import variant_curves
from tasks.graph import GRAPH
from tasks.predict import read_curve
from trecflow.ray_jobs import jobs_address
from trecflow.memory import PeakMemory
from trecflow.ray_runtime import ensure_ray, local_cpus
from trecflow.recipe import CurriculumSection, RecipeError
from trecflow.stage import StageResult, Target
from training.trec_plot import plot_comparison

MEMORY_SAMPLE_SECONDS = 2.0  # the tree's memory while the variants run (~0.05 s of CPU a sample: trecflow.memory)

# The comparison table's columns, in order.
COLUMNS = ("variant", "val_loss_hq", "val_loss_general", "trec_pearson", "trec_valley_measured", "hq_window",
           "content_confounded", "final_loss", "val_loss_hq_averaged_minus_final", "val_loss_general_averaged_minus_final", "mlflow_run_id")


def compared_variants(comparison: Comparison, curriculum: CurriculumSection) -> list[str]:
    """The variants to run: the requested ones, else the declared ones, else `DEFAULT_VARIANTS`.
    An unknown or repeated name is a RecipeError."""
    names = list(comparison.variants or curriculum.variants or DEFAULT_VARIANTS)
    for name in names:
        curriculum.variant(name)
    if len(set(names)) != len(names):
        raise RecipeError(f"variants: repeated names in {names}")
    return names


def outcome_summary(outcome: dict[str, Any], stage: str) -> Any:
    """The typed summary of ``stage`` in a `cpt_pipeline` outcome (its JSON view), None if it did not run."""
    payload = outcome.get(stage)
    return None if payload is None else StageResult.from_dict(stage, payload, GRAPH[stage].summary_type).summary


def comparison_row(variant: str, outcome: dict[str, Any]) -> dict[str, Any]:
    """One variant's row; a variant whose recipe stops before re-evaluation has None there."""
    measured = outcome_summary(outcome, "reevaluate")
    placed = outcome_summary(outcome, "place")
    trained = outcome_summary(outcome, "train")
    final = measured.final_model if measured else None  # a variant that averages checkpoints: its raw final model

    def averaged_minus_final(key: str) -> float | None:
        if final is None or getattr(final, key) is None or getattr(measured, key) is None:
            return None
        return getattr(measured, key) - getattr(final, key)

    return {
        "variant": variant,
        "val_loss_hq": measured.val_loss_hq if measured else None,
        "val_loss_general": measured.val_loss_general if measured else None,
        "trec_pearson": measured.trec_pearson if measured else None,
        "trec_valley_measured": measured.trec_valley_measured if measured else None,
        "hq_window": None if placed is None or placed.window is None else list(placed.window),
        "content_confounded": measured.content_confounded if measured else None,
        "final_loss": trained.final_loss if trained else None,
        "val_loss_hq_averaged_minus_final": averaged_minus_final("val_loss_hq"),
        "val_loss_general_averaged_minus_final": averaged_minus_final("val_loss_general"),
        "mlflow_run_id": outcome["mlflow_run_id"],
    }


def variant_predictions(store, variants: list[str], outcomes: dict[str, Any]) -> list[tuple[list[str], np.ndarray, np.ndarray]]:
    """Each distinct prediction the variants were placed and measured against, with the variants
    that share it (variants with their own schedule or averaging have their own):
    ``(variants, fractions, predicted TREC)``, in the variants' order."""
    shared: dict[str, list[str]] = {}
    for variant in variants:
        if outcomes[variant].get("predict"):
            shared.setdefault(outcomes[variant]["predict"]["fingerprint"], []).append(variant)
    predictions = []
    for fingerprint, names in shared.items():
        curve = read_curve(store, fingerprint)
        predictions.append((names, curve["fraction"].to_numpy(), curve["trec_pred"].to_numpy()))
    return predictions


def comparison_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "hq_window": "" if row["hq_window"] is None else f"{row['hq_window'][0]:.4f}-{row['hq_window'][1]:.4f}"})
    return buffer.getvalue().encode()


def concurrency(comparison: Comparison, recipe, variants: list[str]) -> int:
    """How many variants run at once (1: one after another). Concurrent when ``concurrent`` says
    so, else on a Ray cluster (``RAY_ADDRESS``) or with ``max_concurrent`` above 1; then at most
    ``max_concurrent``, else on the local Ray as many as its CPUs hold trainings at once (the
    largest variant's ``workers x cpus_per_worker``; at least 1), else (a cluster) every variant."""
    concurrent = comparison.concurrent
    if concurrent is None:
        concurrent = bool(os.environ.get("RAY_ADDRESS")) or (comparison.max_concurrent or 1) > 1
    if not concurrent:
        return 1
    if comparison.max_concurrent is not None:
        return max(1, min(comparison.max_concurrent, len(variants)))
    if os.environ.get("RAY_ADDRESS"):
        return len(variants)
    per_training = max(recipe.for_variant(variant).training.workers * recipe.for_variant(variant).training.cpus_per_worker for variant in variants)
    return max(1, min(len(variants), local_cpus() // per_training))


def run_variants(comparison: Comparison, variants: list[str], parent_id: str, at_once: int) -> dict[str, Any]:
    """`cpt_pipeline` for each variant (subflows): one after another (``at_once`` 1), else in
    threads, at most ``at_once`` at a time, started in the variants' order."""
    logger = get_run_logger()
    runs = {variant: PipelineRun(recipe_path=comparison.recipe_path, overlays=comparison.overlays, set=comparison.set, variant=variant, mlflow_parent_run_id=parent_id) for variant in variants}
    if at_once == 1 or len(variants) == 1:
        outcomes = {}
        for number, (variant, run) in enumerate(runs.items(), start=1):
            logger.info("variant %s (%d of %d)", variant, number, len(variants))
            outcomes[variant] = cpt_pipeline(run)
        return outcomes
    logger.info("variants %s, %d at once (Ray at %s)", ", ".join(variants), at_once, os.environ.get("RAY_ADDRESS") or "a local Ray")
    # A local Ray from this thread: its processes die with the thread that started them (Linux's
    # parent-death signal follows the thread), so no variant's thread may be the one to start it.
    # On a cluster the variants' Ray stages are jobs, and this process never joins Ray.
    if jobs_address() is None:
        ensure_ray()
    with ThreadPoolExecutor(max_workers=at_once) as pool:
        futures = {variant: pool.submit(contextvars.copy_context().run, cpt_pipeline, run) for variant, run in runs.items()}
        return {variant: future.result() for variant, future in futures.items()}


def compare_run_name() -> str:
    """``<recipe>/compare``: the name of a `compare_curricula` flow run."""
    from prefect.runtime import flow_run

    return f"{run_label(flow_run.parameters.get('comparison', {}))[0]}/compare"


@flow(name="compare_curricula", flow_run_name=compare_run_name)
def compare_curricula(comparison: Comparison = Comparison()) -> dict[str, Any]:
    """Run ``cpt_pipeline`` for each variant under one MLflow comparison run; write the table."""
    recipe, store = load_run(comparison)
    variants = compared_variants(comparison, recipe.curriculum)
    for variant in variants:  # a variant a stage refuses: before any variant runs
        GRAPH.check_refusals(Target(recipe, variant), None, comparison.recipe_path)
    at_once = concurrency(comparison, recipe, variants)
    tags = {"trecflow.kind": "compare", **source_tags(comparison), "trecflow.variants": ",".join(variants), "trecflow.max_concurrent": str(at_once)}
    with tracked_run(store, recipe, "compare", tags) as (tracker, parent_id):
        with PeakMemory(interval=MEMORY_SAMPLE_SECONDS) as memory:
            outcomes = run_variants(comparison, variants, parent_id, at_once)
        peak = memory.result
        tracker.log_metrics(parent_id, peak.as_metrics())
        get_run_logger().info("peak memory of this process tree while the variants ran (%d at once): %s", at_once, peak.text())
        rows = [comparison_row(variant, outcomes[variant]) for variant in variants]
        tracker.log_artifact_bytes(parent_id, "comparison.json", json.dumps(rows, indent=2).encode())
        tracker.log_artifact_bytes(parent_id, "comparison.csv", comparison_csv(rows))
        for row in rows:
            tracker.log_metrics(parent_id, {f"{row['variant']}.{key}": row[key] for key in ("val_loss_hq", "val_loss_general", "trec_pearson")
                                            if row[key] is not None})
        plot = plot_comparison(variant_predictions(store, variants, outcomes), rows, f"{recipe.name}: curriculum variants")
        tracker.log_artifact_bytes(parent_id, "comparison.png", plot)
        curves = [variant_curves(store, variant, outcomes[variant], every=1) for variant in variants]
        tracker.log_artifact_bytes(parent_id, "curves.png", plot_variant_curves(curves, f"{recipe.name}: curriculum variants"))
        create_table_artifact(
            key=artifact_key("curriculum-comparison", recipe.name),
            table=[{key: row[key] for key in COLUMNS} for row in rows],
            description=f"curriculum variants of {recipe.name}: held-out losses, TREC agreement, HQ windows (MLflow run {parent_id})",
        )
    return {"recipe": recipe.name, "store": store.url, "mlflow_run_id": parent_id, "mlflow_url": mlflow_run_url(tracker, parent_id),
            "variants": rows, "outcomes": outcomes, "max_concurrent": at_once, "peak_memory": peak.as_json()}
