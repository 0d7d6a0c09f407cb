"""The ``cpt_pipeline`` flow: one run of the stage graph for one recipe and one curriculum variant.

The graph (`tasks.graph.STAGES`) decides what runs: every stage the recipe has the sections for,
up to ``until`` when asked. The runner (`trecflow.runner`) fingerprints each stage once, runs it as
its Prefect task (cached by that fingerprint), holds a lease on its output while computing, and
emits events; MLflow, Prefect artifacts and the log subscribe (`flows.reporters`). Forcing a stage
recomputes it and everything downstream of it.

Each flow run opens one MLflow run (experiment = recipe name) with the recipe as parameters, and a
child run per stage.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from flows.executor import PrefectExecutor
from flows.params import PipelineRun, RecipeSource, StageRun
from flows.reporters import EventLog, LogReporter, MlflowReporter, PrefectArtifactReporter, artifact_key
from tasks.calibrate import resolve_m
from tasks.graph import GRAPH
from trecflow.ray_jobs import JobLauncher, jobs_address
from trecflow.recipe import Recipe, RecipeError, load_recipe
from trecflow.runner import Runner
from trecflow.settings import store_endpoint, store_url
from trecflow.stage import Target
from trecflow.store import Store
from trecflow.tracking import Tracker


def default_variant(recipe: Recipe) -> str:
    """The recipe's first declared variant, else ``trec_valley``."""
    return next(iter(recipe.curriculum.variants), "trec_valley")


def forced_stages(force: list[str] | None) -> set[str]:
    """The named stages and everything downstream of them. Unknown names are a RecipeError."""
    return GRAPH.forced_closure(force or [])


def load_run(source: RecipeSource) -> tuple[Recipe, Store]:
    """The recipe with its overlays and ``set`` edits (``trec.m: calibrated`` resolved from the
    store's law) and its store."""
    recipe = load_recipe(source.recipe_path, source.overlays, source.set)
    store = Store(store_url(recipe), store_endpoint(recipe))
    return resolve_m(recipe, store), store


def source_tags(source: RecipeSource) -> dict[str, str]:
    """MLflow tags naming the recipe file, its overlays and ``set`` edits (the merged recipe is
    logged as parameters)."""
    tags = {"trecflow.recipe_path": source.recipe_path}
    if source.overlays:
        tags["trecflow.overlays"] = ", ".join(source.overlays)
    if source.set:
        tags["trecflow.set"] = "; ".join(source.set)
    return tags


def mlflow_run_url(tracker: Tracker, run_id: str) -> str:
    """Where the MLflow UI shows a run (``TRECFLOW_MLFLOW_UI_URL``, default the local `trecflow ui`)."""
    base = os.environ.get("TRECFLOW_MLFLOW_UI_URL", "http://127.0.0.1:5000").rstrip("/")
    experiment = tracker.client.get_run(run_id).info.experiment_id
    return f"{base}/#/experiments/{experiment}/runs/{run_id}"


@contextlib.contextmanager
def tracked_run(store: Store, recipe: Recipe, run_name: str, tags: dict[str, str]) -> Iterator[tuple[Tracker, str]]:
    """An MLflow run tagged with the Prefect flow run, linked from it by a Prefect link artifact;
    it ends FINISHED, or FAILED if the block raises."""
    tracker = Tracker(store)
    with tracker.run(recipe, run_name, tags={**tags, "prefect.flow_run_id": str(flow_run.id)}) as run_id:
        create_link_artifact(key=artifact_key("mlflow-run", run_name), link=mlflow_run_url(tracker, run_id), link_text=f"MLflow run {run_name}",
                             description=f"the MLflow run of this flow run ({run_id})")
        yield tracker, run_id


def run_graph(target: Target, store: Store, forced: set[str], tracker: Tracker, run_id: str, until: str | None = None,
              retries: int | None = None) -> dict[str, Any]:
    """The graph's stages for ``target`` (up to ``until``) as Prefect tasks, reported to MLflow,
    Prefect artifacts and the log; returns each stage's result as a dict plus the stage times."""
    reporters = [LogReporter(), MlflowReporter(tracker, target.recipe, run_id, {"prefect.flow_run_id": str(flow_run.id)}),
                 PrefectArtifactReporter(store)]
    if (events := EventLog.from_environment()) is not None:
        reporters.append(events)
    address = jobs_address()
    runner = Runner(GRAPH, store, forced=forced, reporters=reporters, executor=PrefectExecutor(store, retries),
                    launcher=JobLauncher(address, store) if address else None)
    results = runner.run(target, until=until)
    if "reevaluate" in results:  # the headline numbers on the variant's own run too, where MLflow compares runs
        reevaluate = GRAPH["reevaluate"]
        tracker.log_metrics(run_id, reevaluate.metrics(results["reevaluate"].summary) | {"final_loss": results["train"].summary.final_loss})
    return {**{name: result.as_dict() for name, result in results.items()}, "seconds": runner.seconds}


@flow(name="cpt_pipeline")
def cpt_pipeline(run: PipelineRun = PipelineRun()) -> dict[str, Any]:
    """Run the pipeline for ``run.recipe_path`` and one curriculum variant."""
    recipe, store = load_run(run)
    variant = run.variant or default_variant(recipe)
    recipe.curriculum.variant(variant)  # unknown variant: RecipeError before any work
    GRAPH.check_runnable(Target(recipe, variant), run.until.value if run.until else None, run.recipe_path)
    forced = forced_stages([stage.value for stage in run.force])
    until = run.until.value if run.until else None
    get_run_logger().info("recipe %s, variant %s, store %s, forced stages: %s%s", recipe.name, variant, store.url, sorted(forced) or "none",
                          f", until {until}" if until else "")
    tags = {"trecflow.variant": variant, **source_tags(run)}
    if run.mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = run.mlflow_parent_run_id
    with tracked_run(store, recipe, f"{recipe.name}-{variant}", tags) as (tracker, run_id):
        outcome = run_graph(Target(recipe, variant), store, forced, tracker, run_id, until=until, retries=run.retries)
    return {"recipe": recipe.name, "variant": variant, "store": store.url, "mlflow_run_id": run_id, **outcome}


@flow(name="trecflow_stage")
def stage_flow(run: StageRun) -> dict[str, Any]:
    """Run one stage (the CLI's ``score``, ``place``, ``train``, ``reevaluate``, ``base tiny``):
    the cached stages it needs, then the stage itself (forced when asked)."""
    recipe, store = load_run(run)
    stage = GRAPH[run.stage.value]
    variant = run.variant or default_variant(recipe)
    recipe.curriculum.variant(variant)
    target = Target(recipe, variant)
    problem = stage.requirement(target, run.recipe_path)
    if problem:
        raise RecipeError(problem)
    tags = {"trecflow.stage": stage.name, "trecflow.variant": variant, **source_tags(run)}
    name = f"{recipe.name}-{variant}-{stage.name}" if stage.scope == "variant" else f"{recipe.name}-{stage.name}"
    with tracked_run(store, recipe, name, tags) as (tracker, run_id):
        outcome = run_graph(target, store, {stage.name} if run.force else set(), tracker, run_id, until=stage.name, retries=run.retries)
    return {"recipe": recipe.name, "variant": variant, "store": store.url, "mlflow_run_id": run_id, **outcome}
