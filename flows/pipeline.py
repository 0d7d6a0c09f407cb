"""The ``cpt_pipeline`` flow: one run of one recipe and one curriculum variant.

Stages run as separate Prefect tasks whose cache keys are their output fingerprints, so a rerun
reuses every complete output. ``force`` names stages to recompute; everything downstream of a
forced stage is recomputed too. Today the flow runs scoring (when the recipe has a corpus), the
TREC prediction, the tokenizer, packing and placement (when it also has a tokenizer section);
training and re-evaluation join it as they land.

Each flow run opens one MLflow run (experiment = recipe name) with the recipe as parameters and
each stage's metrics and artifacts, and leaves Prefect markdown artifacts with each stage's summary.
"""

from __future__ import annotations

import base64
import contextlib
import contextvars
import dataclasses
import json
import os
import re
import time
from typing import Any, Iterator

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.runtime import flow_run

from flows.params import PipelineRun
from flows.report import reevaluation_rows
from tasks import place as place_module
from tasks.base_model import build_base
from tasks.pack import PackResult, pack_fingerprint, pack_sequences
from tasks.calibrate import resolve_m
from tasks.place import PlaceResult, place_curriculum, place_fingerprint
from tasks.reevaluate import PLOT_FILE as REEVALUATE_PLOT
from tasks.reevaluate import ReevaluateResult, reevaluate_trec
from tasks.reevaluate import current_fingerprint as reevaluation_fingerprint
from tasks.predict import PLOT_FILE, SUMMARY_FILE, PredictResult, predict_fingerprint, predict_trec
from tasks.score import CLASSIFIER_META, CLASSIFIER_WEIGHTS, ScoreResult, score_corpus
from tasks.score import current_fingerprint as score_fingerprint_now
from tasks.tokenizer import TokenizerResult, build_tokenizer, tokenizer_fingerprint
from tasks.train import BaseModel, TrainResult, train_cpt, train_fingerprint
from trecflow.recipe import Recipe, RecipeError, load_recipe
from trecflow.settings import store_endpoint, store_url
from trecflow.store import Store
from trecflow.tracking import Tracker

# Which stages each stage reads (the design's diagram). Forcing a stage forces its dependents.
STAGE_INPUTS: dict[str, tuple[str, ...]] = {
    "score": (),
    "predict": (),
    "tokenizer": ("score",),  # train_bpe reads the ingested base split
    "pack": ("score", "tokenizer"),
    "place": ("pack", "predict"),
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


def markdown_table(title: str, rows: list[tuple[str, str]]) -> str:
    """A Prefect markdown artifact: a title and a quantity/value table."""
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"# {title}\n\n| quantity | value |\n|---|---|\n{table}\n"


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
    warnings = "".join(f"\n> warning: {text}\n" for text in summary["warnings"])
    return markdown_table(f"TREC prediction: {recipe.name} / {variant}", rows) + warnings


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


# The retries of every stage task in the current flow run (PipelineRun.retries); None: the task's own.
STAGE_RETRIES: contextvars.ContextVar[int | None] = contextvars.ContextVar("STAGE_RETRIES", default=None)


def run_cached(stage_task, stage: str, fp: str, store: Store, forced: set[str], recipe: Recipe, **inputs):
    """Run a stage task, trusting Prefect's cache only while the output is complete in the store."""
    force = stage in forced
    refresh = force or not store.output(stage, fp).exists()
    options: dict[str, Any] = {"refresh_cache": refresh}
    if STAGE_RETRIES.get() is not None:
        options["retries"] = STAGE_RETRIES.get()
    result = stage_task.with_options(**options)(recipe, store.url, store.endpoint_url, force=force, **inputs)
    # A cached task returns the result of the run that computed it; report this run's view.
    return dataclasses.replace(result, reused=not refresh)


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


@contextlib.contextmanager
def stage_run(tracker: Tracker, recipe: Recipe, parent_id: str, stage: str) -> Iterator[str]:
    """A child MLflow run of ``parent_id`` for one stage (tagged with the stage and the Prefect
    flow run); it ends FINISHED, or FAILED if the block raises."""
    tags = {"mlflow.parentRunId": parent_id, "trecflow.stage": stage, "prefect.flow_run_id": str(flow_run.id)}
    with tracker.run(recipe, stage, tags=tags, with_params=False) as run_id:
        yield run_id


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


def tokenizer_step(recipe: Recipe, store: Store, forced: set[str], scored: ScoreResult, tracker: Tracker, run_id: str) -> TokenizerResult:
    """Stage 3a inside a flow: the tokenizer task."""
    fp = tokenizer_fingerprint(recipe, store, scored.ingest_fingerprint)
    result: TokenizerResult = run_cached(build_tokenizer, "tokenizer", fp, store, forced, recipe)
    get_run_logger().info(
        "tokenizer %s (%s): %s tokens (%s)", result.fingerprint, "reused" if result.reused else "computed",
        result.summary["vocab_size"], result.summary["method"],
    )
    tracker.set_tags(run_id, {"trecflow.tokenizer_fingerprint": result.fingerprint})
    tracker.log_metrics(run_id, {"tokenizer_vocab_size": result.summary["vocab_size"]})
    return result


def pack_step(
    recipe: Recipe, store: Store, forced: set[str], scored: ScoreResult, tokenizer: TokenizerResult, tracker: Tracker, run_id: str
) -> PackResult:
    """Stage 3b inside a flow: the packing task."""
    fp = pack_fingerprint(recipe, scored.fingerprint, tokenizer.fingerprint)
    result: PackResult = run_cached(
        pack_sequences, "pack", fp, store, forced, recipe, score_fp=scored.fingerprint, tokenizer_fp=tokenizer.fingerprint
    )
    stats = result.stats
    get_run_logger().info(
        "packed %s (%s): %d sequences of %d tokens; %d tail tokens dropped", result.fingerprint,
        "reused" if result.reused else "computed", stats["sequences"], stats["seq_len"], stats["tail_tokens_dropped"],
    )
    tracker.set_tags(run_id, {"trecflow.pack_fingerprint": result.fingerprint})
    metrics = {"packed_sequences": stats["sequences"], "pack_tail_tokens_dropped": stats["tail_tokens_dropped"]}
    metrics |= {f"packed_sequences.{tier}": entry["sequences"] for tier, entry in stats["tiers"].items()}
    tracker.log_metrics(run_id, metrics)
    return result


def placement_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The MLflow metrics of a placement."""
    metrics = {
        "hq_fraction_placed": summary["hq_fraction"],
        "hq_tokens": summary["hq_tokens"],
        "repeated_sequences": summary["repeated_sequences"],
        "unplaced_sequences": summary["unplaced_sequences"],
    }
    if summary["window"] is not None:
        metrics |= {"placement_window_start": summary["window"][0], "placement_window_end": summary["window"][1]}
    if summary["hq_in_window"] is not None:
        metrics["hq_in_window"] = summary["hq_in_window"]
    return metrics


def placement_markdown(recipe: Recipe, variant: str, result: PlaceResult) -> str:
    summary = result.summary
    window = summary["window"]
    rows = [
        ("strategy", f"{summary['strategy']} (seed {summary['seed']})"),
        ("steps x sequences", f"{summary['steps']:,} x {summary['sequences_per_step']:,} = {summary['sequences']:,}"),
        ("hq share", f"{summary['hq_fraction']:.4f} ({summary['hq_tokens']:,} tokens)"),
        ("window", "none" if window is None else f"[{window[0]:.4f}, {window[1]:.4f}]"),
        ("hq inside the window", "n/a" if summary["hq_in_window"] is None else f"{summary['hq_in_window']:.4f}"),
        ("repeated / unplaced sequences", f"{summary['repeated_sequences']:,} / {summary['unplaced_sequences']:,}"),
        ("index", f"`{result.uri}` ({'reused' if result.reused else 'computed'})"),
    ]
    return markdown_table(f"Curriculum placement: {recipe.name} / {variant}", rows)


def place_step(
    recipe: Recipe, variant: str, store: Store, forced: set[str], packed: PackResult, predicted: PredictResult,
    inputs: dict[str, str], tracker: Tracker, run_id: str,
) -> PlaceResult:
    """Stage 3c inside a flow: the placement task (its index records ``inputs``), then MLflow and
    a Prefect artifact."""
    result: PlaceResult = run_cached(
        place_curriculum, "place", place_fingerprint(inputs), store, forced, recipe,
        variant=variant, pack_fp=packed.fingerprint, predict_fp=predicted.fingerprint,
    )
    result = dataclasses.replace(result, summary={**result.summary, "variant": variant})
    summary = result.summary
    get_run_logger().info(
        "placement %s (%s): %s, hq share %.4f, window %s, hq in window %s, repeated %d, unplaced %d",
        result.fingerprint, "reused" if result.reused else "computed", summary["strategy"], summary["hq_fraction"],
        summary["window"], summary["hq_in_window"], summary["repeated_sequences"], summary["unplaced_sequences"],
    )
    output = store.output("place", result.fingerprint)
    tracker.set_tags(run_id, {"trecflow.place_fingerprint": result.fingerprint, "trecflow.strategy": summary["strategy"]})
    tracker.log_metrics(run_id, placement_metrics(summary))
    for name in (place_module.PLOT_FILE, place_module.SUMMARY_FILE):
        tracker.log_artifact_bytes(run_id, name, output.read_bytes(name), artifact_path="place")
    create_markdown_artifact(
        key=artifact_key("placement", recipe.name, variant),
        markdown=placement_markdown(recipe, variant, result),
        description=f"curriculum placement of {recipe.name} / {variant}",
    )
    return result


def train_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The end-of-run MLflow metrics of a training stage (per-step ones come from the job)."""
    metrics = {
        "final_loss": summary["final_loss"],
        "train_tokens_per_second": summary["tokens_per_second"] or 0.0,
        "reexecuted_steps": summary["audit"]["reexecuted_steps"],
        "attempts": len(summary["audit"]["attempts"]),
    }
    if summary["resumed_from_step"] is not None:
        metrics["resumed_from_step"] = summary["resumed_from_step"]
    return metrics


def train_step(
    recipe: Recipe, store: Store, forced: set[str], scored: ScoreResult, tokenizer: TokenizerResult,
    placed: PlaceResult, expected: dict[str, str], tracker: Tracker, run_id: str,
) -> TrainResult:
    """Stage 4 inside a flow: the base model (built once when it is a tiny one), then the job on
    the index, which must carry the ``expected`` fingerprints."""
    logger = get_run_logger()
    base: BaseModel = build_base(recipe, store.url, store.endpoint_url, score_fp=scored.fingerprint, tokenizer_fp=tokenizer.fingerprint)
    logger.info("base model %s: %s", base.fingerprint, base.uri)
    result: TrainResult = run_cached(
        train_cpt, "train", train_fingerprint(recipe, placed.fingerprint, base.fingerprint), store, forced, recipe,
        index_fp=placed.fingerprint, expected_inputs=expected, base=base, mlflow_run_id=run_id,
    )
    summary = result.summary
    logger.info(
        "training %s (%s): %d steps, final loss %.4f, %.0f tokens/s, %d re-executed steps, model %s",
        result.fingerprint, "reused" if result.reused else "computed", summary["steps"], summary["final_loss"],
        summary["tokens_per_second"] or 0, summary["audit"]["reexecuted_steps"], summary["model_uri"],
    )
    tracker.set_tags(run_id, {
        "trecflow.train_fingerprint": result.fingerprint, "trecflow.base_fingerprint": base.fingerprint,
        "trecflow.index_fingerprint": placed.fingerprint, "trecflow.model_uri": summary["model_uri"],
        "trecflow.checkpoints": " ".join(summary["checkpoints"])[:5000],
    })
    tracker.log_metrics(run_id, train_metrics(summary))
    return result, base


def reevaluation_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The stage's MLflow metrics (None values, e.g. no hq held-out text, are left out)."""
    keys = ("trec_pearson", "trec_pearson_raw", "trec_pearson_m0", "trec_pearson_fit", "m_fit", "trec_valley_measured",
            "trec_valley_predicted", "trec_valley_error", "val_loss_hq", "val_loss_general", "steps_evaluated", "retried_units")
    metrics = {key: summary[key] for key in keys if summary.get(key) is not None}
    metrics["content_confounded"] = float(summary["content_confounded"])
    if summary.get("tokens_per_second"):
        metrics["reevaluate_tokens_per_second"] = summary["tokens_per_second"]
    for source, loss in summary["val_loss_by_source"].items():
        metrics[f"val_loss_{re.sub(r'[^A-Za-z0-9_.-]', '_', source)}"] = loss
    return metrics


def reevaluation_markdown(recipe: Recipe, variant: str, result, overlay: bytes) -> str:
    rows = reevaluation_rows(result.summary) + [("output", f"`{result.uri}`")]
    image = base64.b64encode(overlay).decode()
    return markdown_table(f"Measured TREC: {recipe.name} / {variant}", rows) + f"\n\n![measured vs predicted TREC](data:image/png;base64,{image})\n"


def reevaluate_step(
    recipe: Recipe, variant: str, store: Store, forced: set[str], placed: PlaceResult, expected: dict[str, str],
    trained: TrainResult, predicted: PredictResult, base: BaseModel, tracker: Tracker, run_id: str,
) -> ReevaluateResult:
    """Stage 5 inside a flow: the measured TREC of the trained run, to MLflow and Prefect."""
    inputs = {"index_fp": placed.fingerprint, "expected_inputs": expected, "train_fp": trained.fingerprint,
              "predict_fp": predicted.fingerprint, "base": base}
    fp = reevaluation_fingerprint(recipe, store, **inputs)
    result: ReevaluateResult = run_cached(reevaluate_trec, "reevaluate", fp, store, forced, recipe, variant=variant, **inputs)
    summary = result.summary
    get_run_logger().info(
        "re-evaluation %s (%s): r_p %.3f (raw %.3f), valley %.3f vs %.3f predicted, val_loss_hq %s, val_loss_general %s%s",
        result.fingerprint, "reused" if result.reused else "computed", summary["trec_pearson"], summary["trec_pearson_raw"],
        summary["trec_valley_measured"], summary["trec_valley_predicted"], summary["val_loss_hq"], summary["val_loss_general"],
        " (content-confounded)" if summary["content_confounded"] else "",
    )
    output = store.output("reevaluate", result.fingerprint)
    overlay = output.read_bytes(REEVALUATE_PLOT)
    tracker.set_tags(run_id, {"trecflow.reevaluate_fingerprint": result.fingerprint, "trecflow.content_confounded": str(summary["content_confounded"]).lower()})
    tracker.log_metrics(run_id, reevaluation_metrics(summary))
    tracker.log_artifact_bytes(run_id, REEVALUATE_PLOT, overlay, artifact_path="reevaluate")
    tracker.log_artifact_bytes(run_id, "summary.json", output.read_bytes("summary.json"), artifact_path="reevaluate")
    create_markdown_artifact(
        key=artifact_key("trec-measured", recipe.name, variant),
        markdown=reevaluation_markdown(recipe, variant, result, overlay),
        description=f"Measured vs predicted TREC of {recipe.name} / {variant}",
    )
    return result


def _stage_summary(result) -> dict[str, Any]:
    data = result.stats if hasattr(result, "stats") else result.summary
    return {"fingerprint": result.fingerprint, "uri": result.uri, "reused": result.reused, **data}


def run_stages(
    recipe: Recipe, variant: str, store: Store, forced: set[str], tracker: Tracker, run_id: str, until: str = "reevaluate"
) -> dict[str, Any]:
    """The stages in order, up to ``until`` (each one that the recipe has the sections for); each
    stage logs to its own MLflow run nested under ``run_id``."""
    logger = get_run_logger()
    outcome: dict[str, Any] = {"seconds": {}}

    @contextlib.contextmanager
    def stage(name: str) -> Iterator[str]:
        began = time.perf_counter()
        with stage_run(tracker, recipe, run_id, name) as child:
            yield child
        outcome["seconds"][name] = round(time.perf_counter() - began, 2)

    scored = None
    if recipe.corpus is not None:
        with stage("score") as child:
            scored = score_step(recipe, store, forced, tracker, child)
        outcome["score"] = _stage_summary(scored)
    else:
        logger.info("no corpus section: the score stage is skipped")
    with stage("predict") as child:
        predicted = predict_step(recipe, variant, store, forced, tracker, child)
    outcome["predict"] = _stage_summary(predicted)
    if scored is None or recipe.tokenizer is None:
        logger.info("placement needs corpus and tokenizer sections: the tokenizer, pack and place stages are skipped")
        return outcome
    with stage("tokenizer") as child:
        tokenizer = tokenizer_step(recipe, store, forced, scored, tracker, child)
    outcome["tokenizer"] = _stage_summary(tokenizer)
    with stage("pack") as child:
        packed = pack_step(recipe, store, forced, scored, tokenizer, tracker, child)
    outcome["pack"] = _stage_summary(packed)
    # the fingerprints the index records, and that training then expects of it
    expected = place_module.index_inputs(recipe, variant, packed.fingerprint, scored.fingerprint, tokenizer.fingerprint, predicted.fingerprint)
    with stage("place") as child:
        placed = place_step(recipe, variant, store, forced, packed, predicted, expected, tracker, child)
    outcome["place"] = _stage_summary(placed)
    if until == "place":
        return outcome
    if recipe.base is None:
        logger.info("training needs a base section: the train stage is skipped")
        return outcome
    with stage("train") as child:
        trained, base = train_step(recipe, store, forced, scored, tokenizer, placed, expected, tracker, child)
    outcome["train"] = _stage_summary(trained)
    if until == "train":
        return outcome
    with stage("reevaluate") as child:
        reevaluated = reevaluate_step(recipe, variant, store, forced, placed, expected, trained, predicted, base, tracker, child)
    outcome["reevaluate"] = _stage_summary(reevaluated)
    # the headline numbers on the variant's own run too, where MLflow compares runs
    tracker.log_metrics(run_id, reevaluation_metrics(reevaluated.summary) | {"final_loss": trained.summary["final_loss"]})
    return outcome


@flow(name="cpt_pipeline")
def cpt_pipeline(run: PipelineRun = PipelineRun()) -> dict[str, Any]:
    """Run the pipeline for ``run.recipe_path`` and one curriculum variant."""
    logger = get_run_logger()
    recipe_path = run.recipe_path
    recipe, store = load_run(recipe_path)
    variant = run.variant or default_variant(recipe)
    recipe.curriculum.variant(variant)  # unknown variant: RecipeError before any work
    forced = forced_stages([stage.value for stage in run.force])
    STAGE_RETRIES.set(run.retries)
    logger.info("recipe %s, variant %s, store %s, forced stages: %s", recipe.name, variant, store.url, sorted(forced) or "none")
    outcome: dict[str, Any] = {"recipe": recipe.name, "variant": variant, "store": store.url}
    tags = {"trecflow.variant": variant, "trecflow.recipe_path": recipe_path}
    if run.mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = run.mlflow_parent_run_id
    with tracked_run(store, recipe, f"{recipe.name}-{variant}", tags) as (tracker, run_id):
        outcome["mlflow_run_id"] = run_id
        outcome |= run_stages(recipe, variant, store, forced, tracker, run_id)
    return outcome


def require_sections(recipe: Recipe, source: str, sections: tuple[str, ...], purpose: str) -> None:
    """A RecipeError naming the first missing section ``purpose`` needs."""
    for section in sections:
        if getattr(recipe, section) is None:
            raise RecipeError(f"{source}: {section}: {purpose} needs {', '.join(sections)} sections")


STAGE_SECTIONS = {"place": ("corpus", "tokenizer"), "train": ("corpus", "tokenizer", "base"), "reevaluate": ("corpus", "tokenizer", "base")}
STAGE_PURPOSE = {"place": "placement", "train": "training", "reevaluate": "re-evaluation"}


def load_run(recipe_path: str) -> tuple[Recipe, Store]:
    """The recipe (with ``trec.m: calibrated`` resolved from the store's law) and its store."""
    recipe = load_recipe(recipe_path)
    store = Store(store_url(recipe), store_endpoint(recipe))
    return resolve_m(recipe, store), store


def _run_through(recipe_path: str, variant: str | None, stage: str, force: bool) -> dict[str, Any]:
    """The cached stages up to ``stage`` for one variant, forcing ``stage`` when asked."""
    recipe, store = load_run(recipe_path)
    variant = variant or default_variant(recipe)
    recipe.curriculum.variant(variant)
    require_sections(recipe, recipe_path, STAGE_SECTIONS[stage], STAGE_PURPOSE[stage])
    tags = {"trecflow.stage": stage, "trecflow.variant": variant, "trecflow.recipe_path": recipe_path}
    with tracked_run(store, recipe, f"{recipe.name}-{variant}-{stage}", tags) as (tracker, run_id):
        outcome = run_stages(recipe, variant, store, {stage} if force else set(), tracker, run_id, until=stage)
    return {"recipe": recipe.name, "variant": variant, "store": store.url, "mlflow_run_id": run_id, **outcome}


@flow(name="reevaluate_stage")
def reevaluate_stage(recipe_path: str, variant: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run stage 5 (the CLI's ``trecflow reevaluate``): its cached prerequisites, then re-evaluation."""
    return _run_through(recipe_path, variant, "reevaluate", force)


@flow(name="train_cpt_stage")
def train_stage(recipe_path: str, variant: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run stage 4 (the CLI's ``trecflow train``): its cached prerequisites, then training."""
    return _run_through(recipe_path, variant, "train", force)


@flow(name="build_base_model")
def base_stage(recipe_path: str, force: bool = False) -> dict[str, Any]:
    """Build the recipe's tiny base model (the CLI's ``trecflow base tiny``): scoring and the
    tokenizer (cached), then the base pretraining."""
    recipe = load_recipe(recipe_path)
    require_sections(recipe, recipe_path, ("corpus", "tokenizer", "base"), "building a tiny base")
    if recipe.base.tiny is None:
        raise RecipeError(f"{recipe_path}: base.tiny: building a tiny base needs base.tiny and base.pretrain")
    store = Store(store_url(recipe), store_endpoint(recipe))
    tags = {"trecflow.stage": "base", "trecflow.recipe_path": recipe_path}
    with tracked_run(store, recipe, f"{recipe.name}-base", tags) as (tracker, run_id):
        scored = score_step(recipe, store, set(), tracker, run_id)
        tokenizer = tokenizer_step(recipe, store, set(), scored, tracker, run_id)
        base: BaseModel = build_base(recipe, store.url, store.endpoint_url, force=force, score_fp=scored.fingerprint, tokenizer_fp=tokenizer.fingerprint)
        summary = json.loads(store.output("base", base.fingerprint).read_bytes("summary.json"))
        tracker.set_tags(run_id, {"trecflow.base_fingerprint": base.fingerprint, "trecflow.model_uri": base.uri})
        tracker.log_metrics(run_id, train_metrics(summary))
    return {"recipe": recipe.name, "store": store.url, "mlflow_run_id": run_id, "base": {"fingerprint": base.fingerprint, "uri": base.uri, **summary}}


@flow(name="place_curriculum_stage")
def place_stage(recipe_path: str, variant: str | None = None, force: bool = False) -> dict[str, Any]:
    """Run stage 3 (the CLI's ``trecflow place``): its cached prerequisites, then placement."""
    return _run_through(recipe_path, variant, "place", force)


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
