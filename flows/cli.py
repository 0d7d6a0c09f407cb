"""The ``trecflow`` command line.

``predict`` computes in process and imports no Prefect, MLflow or torch; it writes nothing but the
optional plot. ``run`` validates the recipe first, then runs the ``cpt_pipeline`` flow (Prefect's
ephemeral API unless ``PREFECT_API_URL`` is set); ``run --dry-run`` and ``status`` only read the
store (`trecflow.inventory`); ``gc`` removes what no kept recipe, lease, registered model or
calibration entry needs. Bad input: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from trecflow.recipe import Recipe, RecipeError, load_recipe
from trecflow.report import aligned
from training.schedule_advice import schedule_advice

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="trecflow: place high-quality data where the training re-evaluation curve is lowest.",
)

RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)]
OverlayOpt = Annotated[Optional[list[Path]], typer.Option("--overlay", help="overlay YAML merged into the recipe (repeatable, in order)")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="KEY.PATH=VALUE applied after the overlays (repeatable)")]


@dataclass(frozen=True)
class RecipeFile:
    """A recipe file with its overlays and ``--set`` edits, as every command takes them."""

    path: Path
    overlays: tuple[str, ...] = ()
    sets: tuple[str, ...] = ()

    @classmethod
    def of(cls, path: Path, overlays: list[Path] | None, sets: list[str] | None) -> RecipeFile:
        return cls(path, tuple(str(item) for item in overlays or ()), tuple(sets or ()))

    def params(self) -> dict[str, object]:
        """The flow parameters that name this recipe (`flows.params.RecipeSource`)."""
        return {"recipe_path": str(self.path), "overlays": list(self.overlays), "set": list(self.sets)}

    def __str__(self) -> str:
        return str(self.path)


def fail(message: str, code: int = 2) -> typer.Exit:
    """Print one line to stderr (a URL's password as ``***``: `trecflow.redact`) and return the Exit to raise."""
    from trecflow.redact import redact

    typer.echo(f"error: {redact(message)}", err=True)
    return typer.Exit(code)


class BadInputWithoutTraceback(logging.Filter):
    """Prefect logs the traceback of the exception that failed a task or flow run. Bad input found
    while running (a `ValueError`: `RecipeError`, `IngestError`, ...: a corpus line past the head
    `tasks.ingest.check_files` reads) is one line the CLI prints itself, so its record keeps the
    message and drops the traceback; any other failure keeps it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], ValueError):
            record.exc_info, record.exc_text = None, None
        return True


def run_stage_flow(flow_fn, **parameters) -> dict:
    """Run a stage's flow; bad input found while running is exit 2 (its traceback kept out of
    Prefect's log: `BadInputWithoutTraceback`), other failures exit 1. Without a Prefect API, the
    temporary server Prefect starts is stopped even if this process is killed outright
    (`trecflow.reaper`)."""
    import prefect.settings

    if not prefect.settings.PREFECT_API_URL.value():
        from trecflow.reaper import watch_this_process

        watch_this_process()
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(item, BadInputWithoutTraceback) for item in logger.filters):
            logger.addFilter(BadInputWithoutTraceback())
    try:
        return flow_fn(**parameters)
    except ValueError as error:  # RecipeError, IngestError, PlacementError, JobError...: not retried
        raise fail(str(error)) from None
    except Exception as error:  # the flow run failed; Prefect has logged the traceback
        raise fail(f"flow run failed: {type(error).__name__}: {error}", code=1) from None


def load_or_exit(source: RecipeFile | Path) -> Recipe:
    if not isinstance(source, RecipeFile):
        source = RecipeFile(source)
    try:
        return load_recipe(source.path, source.overlays, source.sets)
    except RecipeError as error:
        raise fail(str(error)) from None


def calibrated(recipe: Recipe) -> Recipe:
    """``recipe`` with ``trec.m: calibrated`` resolved from the store's law (exit 2 if it cannot be)."""
    if recipe.trec.m != "calibrated":
        return recipe
    from tasks.calibrate import resolve_m
    from trecflow.settings import store_endpoint, store_url
    from trecflow.store import Store

    try:
        return resolve_m(recipe, Store(store_url(recipe), store_endpoint(recipe)))
    except RecipeError as error:
        raise fail(str(error)) from None


def stage_result(stage: str, payload: dict):
    """A stage's result from a flow's JSON view of it (`StageResult.as_dict`), its summary typed."""
    from tasks.graph import GRAPH
    from trecflow.stage import StageResult

    return StageResult.from_dict(stage, payload, GRAPH[stage].summary_type)


def stage_text(result) -> str:
    """A stage's summary as aligned text: the stage's own rows (the Prefect artifacts show the same)."""
    from tasks.graph import GRAPH

    return aligned(GRAPH[result.stage].rows(result.summary))


def output_line(result, label: str = "store output") -> str:
    """Where a stage's output is, and whether this run reused or computed it."""
    return f"{label} {result.uri} ({'reused' if result.reused else 'computed'})"


@app.command()
def predict(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    hq_fraction: Annotated[
        Optional[float], typer.Option("--hq-fraction", help="high-quality share w (default: curriculum.hq_fraction)")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the prediction plot (PNG) here")] = None,
    variant: Annotated[
        Optional[str], typer.Option(help="predict this curriculum variant: its own schedule and checkpoint averaging, when it sets them")
    ] = None,
) -> None:
    """Predict the TREC of a recipe (or of one of its variants): tau, valley and the best high-quality window."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    from tasks.predict import PREDICT, PredictSummary
    from training.trec import predict as predict_trec
    from training.trec import recipe_summary

    recipe = calibrated(load_or_exit(recipe_path))
    fraction = recipe.curriculum.hq_fraction if hq_fraction is None else hq_fraction
    if not 0.0 < fraction < 1.0:
        raise fail(f"--hq-fraction: must be in (0, 1), got {fraction:g}")
    if variant is not None:
        try:
            recipe.curriculum.variant(variant)
        except RecipeError as error:
            raise fail(f"--variant: {error}") from None
    prediction = predict_trec(recipe, variant)
    summary = PredictSummary.from_json({**recipe_summary(recipe, prediction, fraction), **({"variant": variant} if variant else {})})
    for warning in summary.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if plot is not None:
        from training.trec_plot import plot_prediction

        try:
            plot.write_bytes(plot_prediction(prediction, fraction, title=f"{recipe.name}: predicted TREC"))
        except OSError as error:
            raise fail(f"--plot: cannot write {plot} ({error.strerror})") from None
    advice = schedule_advice(recipe.for_variant(variant))
    if as_json:
        typer.echo(json.dumps({**summary.as_json(), "advice": [item.as_json() for item in advice]}))
    else:
        typer.echo(aligned([row for row in PREDICT.rows(summary) if row[0] != "warning"]))
        typer.echo(advice_text(advice))


def advice_text(advice) -> str:
    """Schedule advice (`training.schedule_advice`) as text: one paragraph per item, its source last."""
    if not advice:
        return ""
    return "\nschedule advice (what studies found, with their source; not errors):\n" + "\n".join(f"- {item.line()}" for item in advice)


def format_plan(sized: dict) -> str:
    """The plan as aligned text, grouped by topic."""
    first, last = sized["hq_window_steps"]
    token_start, token_end = sized["hq_window_tokens"]
    memory = sized["memory_per_gpu_gb"]
    store = sized["store_gb"]
    rows = [
        ("recipe", f"{sized['recipe']} on {sized['gpus']} x {sized['gpu_type']} "
         f"({sized['peak_flops_per_gpu'] / 1e12:g} TFLOP/s dense bf16, {sized['gpu_memory_gb']:g} GB) at MFU {sized['mfu']:g}"),
        ("steps", f"{sized['steps']:,} of {sized['tokens_per_step']:,} tokens "
         f"({sized['sequences_per_step']:,} sequences; per GPU {sized['tokens_per_gpu_per_step']:,} tokens, "
         f"{sized['sequences_per_gpu_per_step']:,} sequences)"),
        ("tau / TPP", f"{sized['tau']:.4g} / {sized['tpp']:.4g}"),
        ("Power-Lines optimum", f"tau_opt {sized['tau_opt']:.4g}, weight decay {sized['weight_decay_opt']:.4g}"),
        ("predicted valley", f"{sized['valley_fraction']:.4f} (step {sized['valley_step']:,})"),
        (f"HQ window (w = {sized['hq_fraction']:g})", f"steps {first:,}..{last - 1:,}, tokens {token_start:.4g}..{token_end:.4g}"),
        ("compute", f"{sized['flops']:.4g} FLOPs (6*N*D): {sized['gpu_hours']:,.0f} GPU-hours, "
         f"{sized['wall_clock_hours']:,.1f} h wall clock ({sized['wall_clock_hours'] / 24:.2f} days), {sized['step_seconds']:.2f} s/step"),
        ("memory per GPU", f"ZeRO-1 {memory['zero1']:.2f} GB, ZeRO-2 {memory['zero2']:.2f} GB, ZeRO-3 {memory['zero3']:.2f} GB "
         f"(bf16 params+grads, fp32 Adam+master; before activations)"),
        ("checkpoints", f"{sized['checkpoint_gb']:.1f} GB each (with optimizer state); every {sized['checkpoint_every_steps']:,} steps "
         f"({sized['checkpoint_every_hours']:.2f} h), {sized['checkpoints_written']:,} in all"),
        ("TREC re-evaluation", f"every {sized['reeval_stride']} step(s): {sized['reeval_steps']:,} batches, "
         f"{sized['reeval_gpu_hours']:,.1f} GPU-hours ({sized['reeval_with_reference_gpu_hours']:,.1f} with a reference model)"),
        ("store", f"{store['total']:,.0f} GB: tokens {store['tokens']:,.0f}, sample index {store['sample_index']:.2f}, "
         f"checkpoints kept {store['checkpoints']:,.0f}, final model {store['final_model']:.1f}"),
    ]
    for cost in sized.get("averaging", []):
        rows.append((f"averaging ({cost['variant']})",
                     f"{cost['kind']} of {cost['checkpoints']} snapshots {cost['every']:,} steps apart, from step {cost['first_snapshot_step']:,} "
                     f"({cost['span_hours']:,.1f} h): a running sum of {cost['host_memory_gb']:.1f} GB (fp32) in rank 0's host memory; "
                     f"+{cost['per_checkpoint_gb']:.1f} GB in each of the {cost['checkpoints_carrying_it']} checkpoints of that span "
                     f"({cost['written_gb']:,.0f} GB written by rank 0); +{cost['stored_gb']:,.1f} GB stored (with the raw final model)"))
    return aligned(rows)


@app.command()
def plan(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    gpus: Annotated[int, typer.Option(help="number of GPUs (data-parallel world size)")] = 128,
    gpu_type: Annotated[str, typer.Option("--gpu-type", help="H100 | H200 | A100")] = "H100",
    mfu: Annotated[float, typer.Option(help="model FLOP utilization")] = 0.4,
    reeval_stride: Annotated[int, typer.Option("--reeval-stride", help="re-evaluate every k-th step")] = 1,
    max_lost_hours: Annotated[float, typer.Option("--max-lost-hours", help="work a failure may lose")] = 0.5,
    keep_checkpoints: Annotated[int, typer.Option("--keep-checkpoints", help="checkpoints kept in the store")] = 3,
    token_bytes: Annotated[int, typer.Option("--token-bytes", help="bytes per stored token id (2 or 4)")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Size a recipe's job on a cluster: compute, memory per ZeRO stage, checkpoints, storage."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    from training.sizing import SizingError
    from training.sizing import plan as size_job

    recipe = load_or_exit(recipe_path)
    try:
        sized = size_job(recipe, gpus, gpu_type, mfu, reeval_stride, max_lost_hours, keep_checkpoints, token_bytes)
    except SizingError as error:
        raise fail(str(error)) from None
    for warning in sized["warnings"]:
        typer.echo(f"warning: {warning}", err=True)
    advice = schedule_advice(recipe)
    if as_json:
        typer.echo(json.dumps({**sized, "advice": [item.as_json() for item in advice]}))
    else:
        typer.echo(format_plan(sized))
        typer.echo(advice_text(advice))


corpus_app = typer.Typer(no_args_is_help=True, help="Corpora: fetch the demo corpus.")
app.add_typer(corpus_app, name="corpus")


@corpus_app.command("demo")
def corpus_demo(
    cache: Annotated[
        Optional[Path], typer.Option(help="where the sources go (default: $TRECFLOW_HOME/corpus/demo)")
    ] = None,
    force: Annotated[bool, typer.Option(help="fetch and extract again even if cached")] = False,
) -> None:
    """Fetch the real demo corpus (Debian docs, SpamAssassin mail, Debian boilerplate) into a cache."""
    from demo.corpus import CorpusFetchError, build_demo_corpus
    from trecflow.settings import home

    folder = cache or home() / "corpus" / "demo"
    try:
        from flows.progress_reporters import terminal_progress

        sources = build_demo_corpus(folder, force=force, progress=terminal_progress("corpus demo", lambda line: typer.echo(line, err=True)))
    except CorpusFetchError as error:
        raise fail(f"corpus demo: {error}", code=1) from None
    width = max(map(len, sources))
    for name, info in sources.items():
        typer.echo(f"{name:<{width}}  {info['level']:<3}  {info['documents']:>6,} documents  {info['bytes'] / 1e6:6.1f} MB  {info['path']}")


def check_sources(recipe: Recipe) -> None:
    """List every corpus source, read the head of each file (`tasks.ingest.check_files`) and check
    the perplexity scorer's model (no weight is read): a missing path, an empty, binary or
    malformed file, or a model that is not a causal LM is one line before any work."""
    if recipe.corpus is None:
        return
    from tasks.ingest import IngestError, check_files, list_source
    from trecflow.settings import store_endpoint

    try:
        check_files([list_source(source, store_endpoint(recipe)) for source in recipe.corpus.sources], store_endpoint(recipe))
        scoring = recipe.scoring
        if scoring is not None and "perplexity" in scoring.scorers:
            from tasks.scoring.perplexity import check_perplexity_model

            check_perplexity_model(scoring.perplexity.model, store_endpoint(recipe))
    except (IngestError, RecipeError) as error:
        raise fail(str(error)) from None


def check_before_work(recipe: Recipe, until: str | None = None, variant: str | None = None) -> None:
    """Everything a run up to ``until`` (every stage when None) reads or writes that can be checked
    without computing, before any flow, Ray, MLflow run or store write: the store
    (`trecflow.preflight`), then, when the run needs them, the corpus sources and the head of each
    file, the tokenizer and the base checkpoint. A problem is one line and exit code 2."""
    from flows.params import default_variant
    from tasks.base_model import check_base
    from tasks.graph import GRAPH
    from tasks.tokenizer import check_tokenizer
    from trecflow.preflight import check_store
    from trecflow.settings import store_endpoint, store_url
    from trecflow.stage import Target

    needed = GRAPH.needed(Target(recipe, variant or default_variant(recipe)), until)
    try:
        check_store(store_url(recipe), store_endpoint(recipe))
        if "ingest" in needed:
            check_sources(recipe)
        if "tokenizer" in needed and recipe.tokenizer is not None:
            check_tokenizer(recipe, store_endpoint(recipe))
        if "base" in needed and recipe.base is not None:
            check_base(recipe, store_endpoint(recipe))
    except ValueError as error:  # PreflightError, SettingsError, RecipeError: one line
        raise fail(str(error)) from None


@app.command()
def score(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    force: Annotated[bool, typer.Option(help="ingest and score again even if cached")] = False,
) -> None:
    """Run stage 1 alone (ingest and score the corpus) through the pipeline's Prefect task."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    recipe = load_or_exit(recipe_path)
    if recipe.corpus is None:
        raise fail(f"{recipe_path}: corpus: the score stage needs a corpus section")
    check_before_work(recipe, "score")
    result = run_stage_flow(stage_flow(), run=stage_run(recipe_path, "score", force=force))
    payload = result["score"]  # the JSON view (StageResult.as_dict): --json selects from it
    if as_json:
        keys = ("documents", "dropped", "classifier_kind", "classifier_accuracy", "tiers", "tier_totals", "thresholds",
                "classifier_training", "sources")
        typer.echo(json.dumps({key: payload.get(key) for key in keys} | {"uri": payload["uri"], "reused": payload["reused"]}))
    else:
        scored = stage_result("score", payload)
        typer.echo(stage_text(scored))
        typer.echo("\n" + output_line(scored, "store output        "))


def stage_flow():
    """The flow that runs one stage (imported on first use: it imports Prefect)."""
    from flows.pipeline import stage_flow as flow

    return flow


def stage_run(recipe_path: RecipeFile, stage: str, variant: str | None = None, force: bool = False):
    from flows.params import StageRun

    return StageRun(**recipe_path.params(), stage=stage, variant=variant, force=force)


def check_placement(recipe: Recipe, variant: str) -> None:
    """Placement errors that need no data (an unknown variant, a window too small for w)."""
    from tasks.place import plan_request
    from tasks.placement import check_request

    check_request(plan_request(recipe, variant))


def checked_variant(recipe_path: RecipeFile, variant: str | None, stage: str) -> str:
    """Everything ``place``/``train`` can check before any work: the recipe, its sections, the
    variant and its plan, the corpus sources. Returns the variant (default: the first declared)."""
    recipe = load_or_exit(recipe_path)
    from flows.params import default_variant
    from tasks.graph import GRAPH
    from tasks.placement import PlacementError
    from trecflow.stage import Target

    try:
        variant = variant or default_variant(recipe)
        problem = GRAPH[stage].requirement(Target(recipe, variant), str(recipe_path))
        if problem:
            raise RecipeError(problem)
        GRAPH.check_refusals(Target(recipe, variant), stage, str(recipe_path))
        check_placement(recipe, variant)
        from training.cpt_job import injected_lr_fault

        injected_lr_fault(recipe.steps)  # the testing aid's variable (when set), checked before any stage runs
    except (RecipeError, PlacementError) as error:
        raise fail(str(error)) from None
    check_before_work(recipe, stage, variant)
    return variant


@app.command()
def place(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="curriculum variant (default: the first declared)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    force: Annotated[bool, typer.Option(help="build the index again even if cached")] = False,
) -> None:
    """Run stage 3 alone: tokenizer, packing and the sample index of one variant (and the cached
    stages it needs)."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    variant = checked_variant(recipe_path, variant, "place")
    result = run_stage_flow(stage_flow(), run=stage_run(recipe_path, "place", variant, force))
    payload = result["place"]  # the JSON view (StageResult.as_dict): --json selects from it
    if as_json:
        keys = ("variant", "strategy", "seed", "steps", "sequences", "hq_fraction", "hq_tokens", "window", "window_steps",
                "hq_in_window", "repeated_sequences", "unplaced_sequences", "tiers", "fingerprint", "uri", "reused")
        typer.echo(json.dumps({key: payload[key] for key in keys} | {"mlflow_run_id": result["mlflow_run_id"]}))
    else:
        placed = stage_result("place", payload)
        typer.echo(stage_text(placed))
        typer.echo(output_line(placed, "store output         "))


@app.command()
def train(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="curriculum variant (default: the first declared)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    force: Annotated[bool, typer.Option(help="train again from the base, discarding this run's checkpoints")] = False,
) -> None:
    """Run stage 4: the DeepSpeed job on Ray Train for one variant (placement first if needed)."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    variant = checked_variant(recipe_path, variant, "train")
    result = run_stage_flow(stage_flow(), run=stage_run(recipe_path, "train", variant, force))
    payload = result["train"]  # the JSON view (StageResult.as_dict): --json selects from it
    if as_json:
        keys = ("steps", "final_loss", "tokens_per_second", "resumed_from_step", "model_uri", "audit", "checkpoints", "workers", "fingerprint", "uri", "reused")
        typer.echo(json.dumps({key: payload[key] for key in keys} | {"variant": result["variant"], "mlflow_run_id": result["mlflow_run_id"]}))
    else:
        trained = stage_result("train", payload)
        typer.echo(stage_text(trained))
        typer.echo(output_line(trained, "store output      "))


REEVALUATE_KEYS = (
    "trec_pearson", "trec_pearson_raw", "trec_pearson_corrected", "trec_pearson_m0", "trec_pearson_fit", "m", "m_fit", "curve",
    "content_confounded", "trec_valley_measured", "trec_valley_predicted", "trec_valley_error", "val_loss_hq", "val_loss_general",
    "val_loss_by_source", "steps", "steps_evaluated", "sequences_per_step", "tokens_evaluated", "tokens_per_second", "retried_units",
    "reference", "sampling_study", "hq_window", "raw", "corrected", "calibration_entry", "final_model", "fingerprint", "uri", "reused",
)


@app.command()
def reevaluate(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="curriculum variant (default: the first declared)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    force: Annotated[bool, typer.Option(help="evaluate again even if cached")] = False,
) -> None:
    """Run stage 5: the measured TREC of a trained variant against the prediction (training and
    the stages before it first, if not cached)."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    variant = checked_variant(recipe_path, variant, "reevaluate")
    result = run_stage_flow(stage_flow(), run=stage_run(recipe_path, "reevaluate", variant, force))
    payload = result["reevaluate"]  # the JSON view (StageResult.as_dict): --json selects from it
    if as_json:
        typer.echo(json.dumps({key: payload.get(key) for key in REEVALUATE_KEYS} | {"variant": result["variant"], "mlflow_run_id": result["mlflow_run_id"]}))
    else:
        measured = stage_result("reevaluate", payload)
        typer.echo(stage_text(measured))
        typer.echo(output_line(measured, "store output        "))


@app.command()
def calibrate(
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    recipe_path: Annotated[Optional[Path], typer.Option("--recipe", help="use this recipe's store (default: TRECFLOW_STORE or the home's) and its trec.p")] = None,
    p: Annotated[Optional[float], typer.Option("--p", help="fit the runs predicted with this trec.p (default: the recipe's with --recipe, else the one p the runs share)")] = None,
) -> None:
    """Fit m* = C * TPP^mu1 * tau^mu2 over the measured runs of one trec.p in the store's
    calibration table and save it; recipes with ``trec: {m: calibrated}`` and that p then predict
    with it. Exit 1 when it cannot be fitted (too few runs, or runs of several p and none named), saying why."""
    from tasks.calibrate import run_calibrate
    from training.calibration import MIN_R_P_FIT, CalibrationError
    from trecflow.settings import store_endpoint, store_url
    from trecflow.store import Store

    recipe = load_or_exit(recipe_path) if recipe_path is not None else None
    store = Store(store_url(recipe), store_endpoint(recipe))
    try:
        if p is None and recipe is not None:
            p = recipe.trec.p
        fitted = run_calibrate(store, p)
    except CalibrationError as error:
        if as_json:
            typer.echo(json.dumps({"fitted": False, "reason": str(error)}))
        raise fail(f"calibrate: {error}", code=1) from None
    if as_json:
        typer.echo(json.dumps({"fitted": True, **fitted}))
        return
    at = "" if fitted["p"] is None else f" at p {fitted['p']:g}"
    rows = [("runs", f"{fitted['runs']}{at} ({fitted['excluded_m_zero']} with m* = 0, {fitted['excluded_poor_fit']} with best r_p below {MIN_R_P_FIT}, "
                     f"{fitted['excluded_other_p']} at another p left out)")]
    for name, law in fitted["laws"].items():
        rows.append((f"law {name}", f"m* = {law['C']:.4g} * TPP^{law['mu1']:.4g} * tau^{law['mu2']:.4g} "
                                    f"({len(law['runs'])} runs, R^2 in log space {'n/a' if law.get('r2_log') is None else format(law['r2_log'], '.3f')}, "
                                    f"rms log error {law['rms_log_error']:.3g}) {law['note']}".rstrip()))
    rows += [(f"not fitted {name}", why) for name, why in fitted["not_fitted"].items()]
    rows.append(("saved", fitted["uri"]))
    typer.echo(aligned(rows))


@app.command()
def base(
    kind: Annotated[str, typer.Argument(help="tiny (build and pretrain the recipe's base.tiny) or smollm2 (convert SmolLM2-135M)")],
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    force: Annotated[bool, typer.Option(help="tiny: pretrain again")] = False,
) -> None:
    """Build a base model into the store: a tiny pretrained Llama, or SmolLM2-135M as a plain checkpoint."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    recipe = load_or_exit(recipe_path)
    if kind == "smollm2":
        from tasks.base_model import convert_smollm2
        from trecflow.settings import store_endpoint, store_url
        from trecflow.store import Store

        uri = convert_smollm2(Store(store_url(recipe), store_endpoint(recipe)), progress=lambda line: typer.echo(line, err=True))
        typer.echo(json.dumps({"model_uri": uri}) if as_json else f"SmolLM2-135M (fp32, de-quantized from Q4_1): {uri}\n"
                   f"use it with  base: {{path: {uri}}}  and  tokenizer: {{from_base: {uri}}}")
        return
    if kind != "tiny":
        raise fail(f"base: unknown kind {kind!r} (tiny or smollm2)")
    if recipe.base is None or recipe.base.tiny is None:
        raise fail(f"{recipe_path}: base: building a tiny base needs base.tiny and base.pretrain sections")
    check_before_work(recipe, "base")
    result = run_stage_flow(stage_flow(), run=stage_run(recipe_path, "base", force=force))
    payload = result["base"]  # the JSON view (StageResult.as_dict)
    typer.echo(json.dumps(payload) if as_json else stage_text(stage_result("base", payload)))


@app.command()
def validate(recipe_path: RecipeArg, overlay: OverlayOpt = None, set_: SetOpt = None) -> None:
    """Check a recipe without running anything: its fields, and the DeepSpeed JSON it names."""
    from training.deepspeed_config import check_deepspeed_config

    recipe = load_or_exit(RecipeFile.of(recipe_path, overlay, set_))
    try:
        check_deepspeed_config(recipe)
    except RecipeError as error:
        raise fail(str(error)) from None
    typer.echo(f"ok: {recipe.name}: {recipe.steps:,} steps of {recipe.batch.tokens:,} tokens")


@app.command()
def run(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="curriculum variant (default: the first declared)")] = None,
    force: Annotated[
        Optional[list[str]], typer.Option(help="recompute this stage and everything downstream (repeatable)")
    ] = None,
    until: Annotated[Optional[str], typer.Option(help="run only the stages this stage needs, and it")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print what the run would reuse or compute, and why; compute nothing")] = False,
) -> None:
    """Run the cpt_pipeline flow for a recipe (embedded Prefect, MLflow and store by default)."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    recipe = load_or_exit(recipe_path)
    from tasks.graph import GRAPH
    from tasks.placement import PlacementError
    from trecflow.stage import Target

    try:
        from flows.params import default_variant  # (flows.pipeline imports Prefect, which makes its home: after the checks)

        recipe.curriculum.variant(variant or default_variant(recipe))
        GRAPH.forced_closure(force or [])
        if until is not None:
            GRAPH.forced_closure([until])  # an unknown stage: one line, exit 2
        GRAPH.check_runnable(Target(recipe, variant or default_variant(recipe)), until, str(recipe_path))
        if recipe.corpus is not None and recipe.tokenizer is not None:
            check_placement(recipe, variant or default_variant(recipe))
    except (RecipeError, PlacementError) as error:
        raise fail(str(error)) from None
    check_before_work(recipe, until, variant)
    if dry_run:  # the same plan `status` shows: no flow run, no Ray, no MLflow run, nothing written
        from trecflow.inventory import plan_stages

        target = Target(calibrated(recipe), variant or default_variant(recipe))
        store = recipe_store(target.recipe)
        plans = read_store(lambda: plan_stages(GRAPH, store, target, force or [], until))
        typer.echo(format_dry_run(target, store, plans))
        return

    from flows.params import PipelineRun
    from flows.pipeline import cpt_pipeline

    result = run_stage_flow(cpt_pipeline, run=PipelineRun(**recipe_path.params(), variant=variant, force=force or [], until=until))
    for name in GRAPH.names:
        if name not in result:
            continue
        stage_outcome = stage_result(name, result[name])
        if GRAPH[name].rows(stage_outcome.summary):
            typer.echo("")
            typer.echo(stage_text(stage_outcome))
            if stage_outcome.uri:
                typer.echo(output_line(stage_outcome, "store output "))
    typer.echo(f"\nmlflow run     {result['mlflow_run_id']} (experiment {result['recipe']}): {result['mlflow_url']}")


def table_text(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """A header and rows as text columns, each as wide as its widest cell."""
    lines = [header, *rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def human_bytes(count: int | None) -> str:
    """A size in decimal units (1 kB = 1,000 bytes), ``-`` when unknown."""
    if count is None:
        return "-"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000:
            return f"{count} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} PB"


def human_age(seconds: float | None) -> str:
    """How long ago, to the unit that matters: ``12 s``, ``5 min``, ``3 h``, ``2 d``; ``-`` when unknown."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def recipe_store(recipe: Recipe):
    """The store a run of ``recipe`` writes to."""
    from trecflow.settings import store_endpoint, store_url
    from trecflow.store import Store

    return Store(store_url(recipe), store_endpoint(recipe))


def read_store(call):
    """``call()``, which reads the store; bad input (a recipe, a corpus source) is exit 2, a store
    that cannot be read exit 1."""
    from trecflow.store import StoreError

    try:
        return call()
    except ValueError as error:  # RecipeError, IngestError, PlacementError: one line
        raise fail(str(error)) from None
    except (StoreError, OSError) as error:
        raise fail(f"store: {type(error).__name__}: {error}", code=1) from None


def status_note(plan) -> str:
    """The status table's note: who holds a lease and until when, why a stage is skipped, what a
    resolved stage names."""
    from trecflow.inventory import COMPLETE, lease_text

    lease = plan.output.lease if plan.output is not None else None
    if lease is not None:
        return ("leased by " if plan.state == COMPLETE else "by ") + lease_text(lease)
    return plan.note


def format_status(recipe: Recipe, variant: str, store, plans) -> str:
    """The status table: one row per stage."""
    import time

    from trecflow.inventory import MISSING

    now = time.time()
    rows = []
    for plan in plans:
        output = plan.output
        fingerprint = plan.fingerprint or (f"unknown until {plan.unknown_until}" if plan.unknown_until else "-")
        age = None if output is None or output.modified_unix is None else max(0.0, now - output.modified_unix)
        size = human_bytes(output.bytes) if output is not None and output.state != MISSING else "-"
        rows.append((plan.stage, fingerprint, plan.state, size, human_age(age), status_note(plan)))
    head = f"recipe {recipe.name}, variant {variant}, store {store.url}"
    return head + "\n" + table_text(("stage", "fingerprint", "state", "size", "age", "note"), rows)


def format_dry_run(target, store, plans) -> str:
    """What ``run`` would do per stage, and why; then the counts."""
    from trecflow.inventory import COMPUTE, REUSE, SKIP

    rows = [(plan.stage, plan.action, plan.fingerprint or "-", plan.reason) for plan in plans]
    counts = {action: sum(plan.action == action for plan in plans) for action in (REUSE, COMPUTE, SKIP)}
    return (f"dry run: recipe {target.recipe.name}, variant {target.variant}, store {store.url} (nothing is computed or written)\n"
            + table_text(("stage", "action", "fingerprint", "why"), rows)
            + f"\n\n{counts[REUSE]} to reuse, {counts[COMPUTE]} to compute, {counts[SKIP]} skipped")


@app.command()
def status(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    variant: Annotated[Optional[str], typer.Option(help="curriculum variant (default: the first declared, as run picks it)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """What the store holds for a recipe: every stage's fingerprint (or the upstream stage it waits
    for), state (complete, leased, partial, missing), size and age. Computes and writes nothing."""
    import time

    from flows.params import default_variant
    from tasks.graph import GRAPH
    from trecflow.inventory import plan_stages
    from trecflow.stage import Target

    recipe = calibrated(load_or_exit(RecipeFile.of(recipe_path, overlay, set_)))
    variant = variant or default_variant(recipe)
    try:
        recipe.curriculum.variant(variant)
    except RecipeError as error:
        raise fail(str(error)) from None
    store = recipe_store(recipe)
    plans = read_store(lambda: plan_stages(GRAPH, store, Target(recipe, variant)))
    if as_json:
        now = time.time()
        typer.echo(json.dumps({"recipe": recipe.name, "variant": variant, "store": store.url, "stages": [plan.as_json(now) for plan in plans]}))
    else:
        typer.echo(format_status(recipe, variant, store, plans))


def format_gc(report) -> str:
    """What gc removed (or would remove), with sizes and the total, and what it kept per reason."""
    rows = [(item.location, human_bytes(item.bytes), item.state) for item in report.removed]
    lines = ["would remove (dry run: nothing removed)" if report.dry_run else "removed"]
    lines.append(table_text(("folder", "size", "state"), rows) if rows else "(nothing)")
    kept = ", ".join(f"{count} {reason}" for reason, count in report.kept.items() if count) or "nothing"
    lines.append("")
    lines.append(aligned([("total", f"{len(report.removed)} folders, {human_bytes(report.total_bytes)}"), ("kept", kept), ("store", report.store)]))
    return "\n".join(lines)


@app.command()
def gc(
    keep: Annotated[Optional[list[Path]], typer.Option("--keep", help="recipe whose outputs stay (repeatable; required)")] = None,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed; remove nothing")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Remove the store outputs no kept recipe references (every stage of every declared variant;
    none declared: uniform, end, trec_valley). Never removed: a leased output, one a registered
    MLflow model version names, the calibration table's runs, a reference-loss cache in use, the
    checkpoints of a running job, anything outside the stage, checkpoints/ and refcache/ folders."""
    if not keep:
        raise fail("gc: --keep RECIPE is required: gc removes every output no kept recipe references, "
                   "so it never guesses (add --dry-run to see what would go)")
    from flows.params import DEFAULT_VARIANTS
    from tasks.graph import GRAPH
    from trecflow.inventory import collect_garbage, registered_outputs
    from trecflow.settings import tracking_uri
    from trecflow.stage import Target

    recipes = [calibrated(load_or_exit(RecipeFile.of(path, overlay, set_))) for path in keep]
    stores = {recipe_store(recipe).url: recipe_store(recipe) for recipe in recipes}
    if len(stores) > 1:
        raise fail(f"--keep: the recipes use different stores ({', '.join(sorted(stores))}); gc one store at a time")
    store = next(iter(stores.values()))
    targets = [Target(recipe, variant) for recipe in recipes for variant in (recipe.curriculum.variants or DEFAULT_VARIANTS)]
    try:
        registered = registered_outputs(store, tracking_uri())
    except Exception as error:  # an unreachable tracking server: no removal without knowing what is registered
        raise fail(f"gc: cannot read the MLflow model registry at {tracking_uri()} ({type(error).__name__}: {error}); nothing removed", code=1) from None
    report = read_store(lambda: collect_garbage(GRAPH, store, targets, registered, dry_run=dry_run))
    for running in report.running:
        typer.echo(f"warning: {running} is computed by a run of no kept recipe; the outputs it reads are known only once it "
                   f"commits and may be among those removed: keep its recipe (--keep) while it runs", err=True)
    typer.echo(json.dumps(report.as_json()) if as_json else format_gc(report))


COMPARE_KEYS = ("variant", "val_loss_hq", "val_loss_general", "trec_pearson", "trec_valley_measured", "hq_window")


def format_comparison(result: dict) -> str:
    """The comparison table, then each variant's stage times."""
    from trecflow.report import number, window_text

    header = ("variant", "val_loss_hq", "val_loss_general", "trec_pearson", "valley", "HQ window", "confounded")
    lines = [header]
    for row in result["variants"]:
        confounded = "-" if row["content_confounded"] is None else ("yes" if row["content_confounded"] else "no")
        lines.append((row["variant"], *(number(row[key], "-") for key in ("val_loss_hq", "val_loss_general", "trec_pearson", "trec_valley_measured")),
                      window_text(row["hq_window"]), confounded))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    text.append("")
    text.append("stage times (s): " + "; ".join(
        f"{variant}: " + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in outcome.get("seconds", {}).items())
        for variant, outcome in result["outcomes"].items()))
    peak = result["peak_memory"]
    pss = "unknown" if peak["peak_pss_mb"] is None else f"{peak['peak_pss_mb']:,.0f} MiB"
    where = "the cluster's Ray work not included" if os.environ.get("RAY_ADDRESS") else "the local Ray's included"
    text.append(f"peak memory ({result['max_concurrent']} variant(s) at once; this process and the processes under it, {where}): "
                f"PSS {pss}, RSS {peak['peak_rss_mb']:,.0f} MiB, {peak['peak_processes']} processes at most")
    return "\n".join(text)


@app.command()
def compare(
    recipe_path: RecipeArg,
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    variants: Annotated[Optional[str], typer.Option(help="comma-separated variants (default: all of the recipe's)")] = None,
    max_concurrent: Annotated[Optional[int], typer.Option(
        "--max-concurrent", help="run up to K variants at once (default: one after another on one machine; on a Ray cluster, RAY_ADDRESS set, all at once)",
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Compare curriculum variants: the whole pipeline for each (cached stages shared), then one
    MLflow comparison run and table."""
    recipe_path = RecipeFile.of(recipe_path, overlay, set_)
    recipe = load_or_exit(recipe_path)
    if max_concurrent is not None and max_concurrent < 1:
        raise fail(f"--max-concurrent: must be at least 1, got {max_concurrent}")
    from flows.compare import compared_variants
    from flows.params import Comparison
    from tasks.graph import GRAPH
    from tasks.placement import PlacementError
    from trecflow.stage import Target

    comparison = Comparison(**recipe_path.params(), variants=[name.strip() for name in (variants or "").split(",") if name.strip()],
                            max_concurrent=max_concurrent)
    try:
        problem = GRAPH["reevaluate"].requirement(Target(recipe), str(recipe_path))
        if problem:
            raise RecipeError(problem.replace("re-evaluation needs", "a comparison needs"))
        for variant in compared_variants(comparison, recipe.curriculum):
            GRAPH.check_refusals(Target(recipe, variant), None, str(recipe_path))
            check_placement(recipe, variant)
        from training.cpt_job import injected_lr_fault

        injected_lr_fault(recipe.steps)  # the testing aid's variable (when set), checked before any stage runs
    except (RecipeError, PlacementError) as error:
        raise fail(str(error)) from None
    check_before_work(recipe)
    from flows.compare import compare_curricula

    result = run_stage_flow(compare_curricula, comparison=comparison)
    if as_json:
        rows = [{key: row[key] for key in COMPARE_KEYS} for row in result["variants"]]
        typer.echo(json.dumps({"recipe": result["recipe"], "variants": rows, "mlflow_run_id": result["mlflow_run_id"],
                               "max_concurrent": result["max_concurrent"], "peak_memory": result["peak_memory"]}))
        return
    typer.echo("")
    typer.echo(format_comparison(result))
    typer.echo(f"\nmlflow comparison run {result['mlflow_run_id']} (experiment {result['recipe']}): {result['mlflow_url']}")
    typer.echo("open the UIs: trecflow ui   (Prefect http://127.0.0.1:4200, MLflow http://127.0.0.1:5000/#/experiments?workflowType=machine_learning)")


@app.command()
def ui(
    prefect_port: Annotated[int, typer.Option(help="port of the Prefect server and UI")] = 4200,
    mlflow_port: Annotated[int, typer.Option(help="port of the MLflow UI")] = 5000,
    host: Annotated[str, typer.Option(help="interface to listen on (loopback by default)")] = "127.0.0.1",
) -> None:
    """Start the Prefect UI (server, a worker for the local pool, the deployments of prefect.yaml)
    and the MLflow UI; print their URLs; Ctrl-C stops them all."""
    from flows.ui import UIError, serve_ui

    try:
        serve_ui(prefect_port=prefect_port, mlflow_port=mlflow_port, host=host, on_ready=typer.echo, progress=typer.echo)
    except UIError as error:
        raise fail(str(error), code=1) from None


from flows.forecast_command import forecast  # noqa: E402  (commands of their own modules; they import from here when they run)
from flows.init_command import init  # noqa: E402
from flows.rank import rank  # noqa: E402
from flows.study import study  # noqa: E402
from flows.sweep import sweep  # noqa: E402

app.command("init")(init)
app.command("forecast")(forecast)
app.command("rank")(rank)
app.command("study")(study)
app.command("sweep")(sweep)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
