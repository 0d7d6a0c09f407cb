"""The ``cpt_pipeline`` flow: one run of the stage graph for one recipe and one curriculum variant.

The graph (`tasks.graph.STAGES`) decides what runs: every stage the recipe has the sections for,
up to ``until`` when asked. The runner (`trecflow.runner`) fingerprints each stage once, runs it as
its Prefect task (cached by that fingerprint), holds a lease on its output while computing, and
emits events; MLflow, Prefect artifacts and the log subscribe (`flows.reporters`). Forcing a stage
recomputes it and everything downstream of it.

Each `cpt_pipeline` run opens one MLflow run named after its variant (experiment = recipe name)
with the recipe and the variant's own parameters, a child run per stage (``<variant>/<stage>``),
and, once the stages are done, what `flows.variant_run` reads from the store: per-step curves,
datasets, the registered model. A stage command (`stage_flow`) nests its stage's run under the
newest run of its recipe and variant, starting that variant run only when there is none. Flow runs
are named ``<recipe>/<variant>`` and ``<recipe>/<variant>/<stage>``.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Mapping

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from flows.executor import PrefectExecutor
from flows.params import PipelineRun, RecipeSource, StageRun, default_variant
from flows.progress_reporters import progress_reporters
from flows.reporters import EventLog, LogReporter, MlflowReporter, PrefectArtifactReporter, artifact_key
from flows.variant_run import VARIANT_KIND, log_variant_run
from tasks.calibrate import resolve_m
from tasks.graph import GRAPH
from trecflow.ray_jobs import JobLauncher, jobs_address
from trecflow.recipe import Recipe, RecipeError, load_recipe
from trecflow.runner import Runner
from trecflow.stage import StageResult
from trecflow.settings import store_endpoint, store_url
from trecflow.stage import Target
from trecflow.store import Store
from trecflow.tracking import Tracker, ui_url


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
    """Where the MLflow UI shows a run (``TRECFLOW_MLFLOW_UI_URL``, default the local `trecflow ui`),
    in MLflow's "Model training" view."""
    base = os.environ.get("TRECFLOW_MLFLOW_UI_URL", "http://127.0.0.1:5000")
    experiment = tracker.client.get_run(run_id).info.experiment_id
    return ui_url(base, f"experiments/{experiment}/runs/{run_id}")


@contextlib.contextmanager
def tracked_run(store: Store, recipe: Recipe, run_name: str, tags: dict[str, str], reuse: tuple[str, ...] = ()) -> Iterator[tuple[Tracker, str]]:
    """An MLflow run tagged with the Prefect flow run, linked from it by a Prefect link artifact;
    it ends FINISHED, or FAILED if the block raises. ``reuse``: the tags of an existing run to
    continue instead (the newest carrying them; left as it was at the end), if there is one."""
    tracker = Tracker(store)
    existing = tracker.newest_run(recipe.name, {key: tags[key] for key in reuse}) if reuse else None
    if existing is not None:
        _link(tracker, existing, recipe.name, run_name)
        yield tracker, existing
        return
    with tracker.run(recipe, run_name, tags={**tags, "prefect.flow_run_id": str(flow_run.id)}) as run_id:
        _link(tracker, run_id, recipe.name, run_name)
        yield tracker, run_id


def _link(tracker: Tracker, run_id: str, recipe: str, run_name: str) -> None:
    create_link_artifact(key=artifact_key("mlflow-run", recipe, run_name), link=mlflow_run_url(tracker, run_id), link_text=f"MLflow run {recipe}/{run_name}",
                         description=f"the MLflow run of this flow run ({run_id})")


def run_graph(target: Target, store: Store, forced: set[str], tracker: Tracker, run_id: str, until: str | None = None,
              retries: int | None = None, only: set[str] | None = None,
              given: Mapping[str, StageResult] | None = None) -> tuple[dict[str, StageResult], dict[str, Any]]:
    """The graph's stages for ``target`` (up to ``until``) as Prefect tasks, reported to MLflow
    (``only``: these stages' runs), Prefect artifacts and the log; ``given``: results taken as they
    are, neither run nor reported (the stages `flows.rank` shares between its candidates); returns
    each stage's result and the flow's return value (each result as a dict plus the stage times)."""
    reporters = [*progress_reporters(), LogReporter(), MlflowReporter(tracker, target.recipe, run_id, {"prefect.flow_run_id": str(flow_run.id)}, target.variant, only),
                 PrefectArtifactReporter(store)]
    if (events := EventLog.from_environment()) is not None:
        reporters.append(events)
    address = jobs_address()
    runner = Runner(GRAPH, store, forced=forced, reporters=reporters, executor=PrefectExecutor(store, retries),
                    launcher=JobLauncher(address, store) if address else None)
    results = runner.run(target, until=until, given=given)
    return results, {**{name: result.as_dict() for name, result in results.items()}, "seconds": runner.seconds}


def log_outcome(tracker: Tracker, run_id: str, target: Target, results: dict[str, StageResult]) -> None:
    """The variant run's headline numbers (where MLflow compares runs) and what
    `flows.variant_run.log_variant_run` reads from the store."""
    if "reevaluate" in results:
        reevaluate = GRAPH["reevaluate"]
        tracker.log_metrics(run_id, reevaluate.metrics(results["reevaluate"].summary) | {"final_loss": results["train"].summary.final_loss})
    log_variant_run(tracker, run_id, target.recipe, target.variant, results)


def _field(source: Any, name: str) -> Any:
    return source.get(name) if isinstance(source, dict) else getattr(source, name, None)


def run_label(source: Any) -> tuple[str, str]:
    """(recipe name, variant) of a flow's parameters, for its run's name, reading the recipe once.
    When it cannot be read: the file's stem and the variant asked for (else ``default``); the flow
    itself then fails with the reason."""
    path = _field(source, "recipe_path") or ""
    variant = _field(source, "variant")
    try:
        recipe = load_recipe(path, list(_field(source, "overlays") or []), list(_field(source, "set") or []))
    except Exception:
        return os.path.splitext(os.path.basename(str(path)))[0] or "recipe", str(variant or "default")
    return recipe.name, str(variant or default_variant(recipe))


def pipeline_run_name() -> str:
    """``<recipe>/<variant>``: the name of a `cpt_pipeline` flow run."""
    return "/".join(run_label(flow_run.parameters.get("run", {})))


def stage_run_name() -> str:
    """``<recipe>/<variant>/<stage>``: the name of a `stage_flow` run."""
    run = flow_run.parameters.get("run", {})
    stage = _field(run, "stage")
    return "/".join([*run_label(run), str(getattr(stage, "value", stage))])


@flow(name="cpt_pipeline", flow_run_name=pipeline_run_name)
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
    tags = {"trecflow.kind": VARIANT_KIND, "trecflow.variant": variant, **source_tags(run)}
    if run.mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = run.mlflow_parent_run_id
    target = Target(recipe, variant)
    with tracked_run(store, recipe, variant, tags) as (tracker, run_id):
        results, outcome = run_graph(target, store, forced, tracker, run_id, until=until, retries=run.retries)
        log_outcome(tracker, run_id, target, results)
    return {"recipe": recipe.name, "variant": variant, "store": store.url, "mlflow_run_id": run_id, "mlflow_url": mlflow_run_url(tracker, run_id), **outcome}


@flow(name="trecflow_stage", flow_run_name=stage_run_name)
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
    GRAPH.check_refusals(target, stage.name, run.recipe_path)  # a stage it needs that refuses the variant: before any work
    tags = {"trecflow.kind": VARIANT_KIND, "trecflow.variant": variant, **source_tags(run)}
    with tracked_run(store, recipe, variant, tags, reuse=("trecflow.kind", "trecflow.variant")) as (tracker, run_id):
        started_here = tracker.client.get_run(run_id).data.tags.get("prefect.flow_run_id") == str(flow_run.id)
        results, outcome = run_graph(target, store, {stage.name} if run.force else set(), tracker, run_id, until=stage.name,
                                     retries=run.retries, only={stage.name})
        if started_here:  # a variant run of its own: show what there is; an existing one keeps what its run logged
            log_outcome(tracker, run_id, target, results)
    return {"recipe": recipe.name, "variant": variant, "store": store.url, "mlflow_run_id": run_id, "mlflow_url": mlflow_run_url(tracker, run_id), **outcome}
