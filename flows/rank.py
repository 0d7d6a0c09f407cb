"""``trecflow rank`` and the ``rank_recipes`` flow: rank data recipes by small proxy runs at a
reduced learning rate (arXiv 2512.24503: at the standard LR small proxies rank data recipes
unreliably; at an LR one to two orders of magnitude lower their ranking agrees with that of tuned
larger models).

A **candidate** is the recipe with one overlay that changes its data only: ``corpus`` (sources,
near-duplicate removal; not the splits), ``scoring`` (scorers, weights, tier thresholds),
``curriculum`` (hq fraction, tier weights, seed) and ``packing``. It is named by the overlay's file
stem. Each candidate trains the ``uniform`` curriculum (no TREC placement) as a proxy at
``optimizer.peak_lr x lr_scale`` (default 0.01); everything else of the recipe stays, the weight
decay lambda included (see `proxy_lr`). Its re-evaluation is kept cheap (`PROXY_SETTINGS`: no
reference model, 8 random steps): the held-out losses are what ranking reads.

**Comparable by construction.** The recipe itself (with ``--overlay`` / ``--set``, without any
candidate) gives the tokenizer, the base model and the held-out set (`SHARED_STAGES`), computed
once and given to every candidate's graph run. Otherwise a candidate that changes deduplication or
the sources would train its own BPE (losses in other units), and one that changes scoring would get
its own base (pretrained on the re-tiered base split) and its own hq/general split of the eval
documents. Candidates are ranked on one metric of that common held-out set (`METRIC_HELP`).

One flow run ``<recipe>/rank``: the shared stages as its tasks, then one ``rank_candidate``
subflow per candidate (``<recipe>/rank/<candidate>``), one after another. MLflow: a parent run
``rank`` (kind ``rank``) with ``ranking.json``, ``ranking.csv``, ``ranking.png`` and the metrics
``<candidate>.<metric>`` and ``<candidate>.rank``; the shared stages' runs (``shared/<stage>``) and
the candidates' runs (named after the candidate, each with its stage runs) nested under it. The
Prefect flow run gets the table as the artifact ``recipe-ranking-<recipe>``. Every stage is a
cached task of the pipeline, so a rerun recomputes nothing.

Importing this module imports neither Prefect nor the stages (the CLI imports it for its ``rank``
command, and its other commands stay light): the flows ``rank_recipes`` and ``rank_candidate`` are
made on first access (`__getattr__`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer
from pydantic import BaseModel, Field

from flows.lazy_flows import lazy_flows
from trecflow.recipe import Recipe, RecipeError, load_recipe
from trecflow.recipe_yaml import read_file
from trecflow.report import number

# The sections a candidate overlay may change: the data, never the model, the optimizer, the
# tokenizer or the held-out set.
CANDIDATE_SECTIONS = ("corpus", "scoring", "curriculum", "packing")
# The stages every candidate takes from the recipe itself (computed once, given to each candidate).
SHARED_STAGES = ("tokenizer", "base", "evalset")
# Before the user's --set (which may override them): a proxy needs only its held-out losses.
PROXY_SETTINGS = ("reevaluation.reference=none", "reevaluation.every=1", "reevaluation.random_steps=8")
DEFAULT_LR_SCALE = 0.01
DEFAULT_METRIC = "val_loss_general"
TIER_METRICS = ("val_loss_general", "val_loss_hq")
METRIC_HELP = ("val_loss_general: the mean loss over the held-out sequences the recipe's own scoring puts outside the hq tier; "
               "val_loss_hq: over its hq tier; val_loss_<source>: over one source's sequences")
SHARED_VARIANT = "shared"  # how the shared stages' runs are named (shared/<stage>)
RANK_KIND = "rank"  # the trecflow.kind tag of the parent MLflow run
CANDIDATE_KIND = "rank-candidate"  # ... and of each candidate's run
COLUMNS = ("rank", "candidate", "overlay", "metric", "value", "val_loss_hq", "val_loss_general", "final_loss", "mlflow_run_id")


class RecipeFiles(BaseModel):
    """A recipe file, overlays merged into it in order, and ``--set`` edits after them (the fields
    of `flows.params.RecipeSource`, which this module cannot import without the stages)."""

    recipe_path: str = Field("configs/demo.yaml", description="recipe YAML, relative to the project root or absolute")
    overlays: list[str] = Field(default_factory=list, description="overlay YAML files merged into the recipe (and every candidate) in order")
    set: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE edits applied after the overlays, to the recipe and every candidate")


class Ranking(RecipeFiles):
    """One run of ``rank_recipes``: a recipe and the candidate data recipes to rank."""

    candidates: list[str] = Field(default_factory=list, description="candidate overlays (data changes only), each named by its file's stem")
    lr_scale: float = Field(DEFAULT_LR_SCALE, gt=0, description="the proxies' peak LR as a share of the recipe's (0.01: two orders lower)")
    metric: str = Field(DEFAULT_METRIC, description=METRIC_HELP)


class CandidateRun(RecipeFiles):
    """One candidate's proxy run (``rank_candidate``): its recipe files, name and the shared outputs."""

    name: str = Field(description="the candidate (its overlay's file stem); also its variant's name")
    overlay: str = Field(description="the candidate's overlay file")
    shared: dict[str, str] = Field(default_factory=dict, description="stage -> fingerprint of the recipe's outputs every candidate uses")
    mlflow_parent_run_id: str | None = Field(None, description="the MLflow rank run to nest this run under")


@dataclass(frozen=True)
class Candidate:
    """A validated candidate: its name, overlay file and the recipe files of its proxy run."""

    name: str
    overlay: str
    run: CandidateRun
    recipe: Recipe


def candidate_name(overlay: str) -> str:
    """The overlay file's stem, lowercase, other characters than letters, digits, '-' and '_' as '-'."""
    return re.sub(r"[^a-z0-9_-]+", "-", Path(overlay).stem.lower()).strip("-_")


def proxy_lr(recipe: Recipe, lr_scale: float) -> float:
    """The proxy's peak LR: the recipe's times ``lr_scale`` (12 significant digits, so 2e-3 x 0.01
    reads 2e-05). The weight decay lambda stays the recipe's, as the paper keeps every other
    setting: the proxy's tau = 1/(eta lambda T) is 1/lr_scale times the recipe's, so weight decay
    barely acts in a proxy. Rescaling lambda by 1/lr_scale to keep tau would shrink the base's
    weights as much as the full-LR run does while the proxy's updates are lr_scale times as large."""
    return float(f"{recipe.optimizer.peak_lr * lr_scale:.12g}")


def check_overlay(path: str) -> None:
    """A RecipeError (one line naming the file and section) unless ``path`` changes the data only."""
    data = read_file(path, "overlay")
    if data is None:
        return  # an empty overlay: the recipe itself is a candidate
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: an overlay must be a mapping of recipe sections, got {type(data).__name__}")
    for key in data:
        if key not in CANDIDATE_SECTIONS:
            raise RecipeError(f"{path}: {key}: a candidate overlay changes only the data ({', '.join(CANDIDATE_SECTIONS)}); "
                              "the model, optimizer, tokenizer, base and held-out set stay the recipe's")
    if isinstance(data.get("corpus"), dict) and "splits" in data["corpus"]:
        raise RecipeError(f"{path}: corpus.splits: the splits decide the held-out set every candidate is measured on; "
                          "a candidate may not change them")


def metric_names(recipe: Recipe) -> list[str]:
    """The metrics candidates can be ranked on: the two tier losses and one per source of the recipe."""
    return [*TIER_METRICS, *(f"val_loss_{source.name}" for source in recipe.corpus.sources)] if recipe.corpus else list(TIER_METRICS)


def load_candidates(ranking: Ranking) -> tuple[Recipe, list[Candidate]]:
    """The recipe (what the shared stages are computed from) and every candidate, checked before
    any work (files read and sources listed, nothing computed): a RecipeError of one line naming
    the option, or the candidate, its overlay file and the field."""
    from tasks.graph import GRAPH
    from tasks.ingest import list_source
    from tasks.place import plan_request
    from tasks.placement import check_request
    from trecflow.settings import store_endpoint
    from trecflow.stage import Target

    recipe = load_recipe(ranking.recipe_path, ranking.overlays, [*PROXY_SETTINGS, *ranking.set])
    if not ranking.lr_scale > 0 or not math.isfinite(ranking.lr_scale):
        raise RecipeError(f"--lr-scale: must be a number > 0, got {ranking.lr_scale:g}")
    if ranking.metric not in metric_names(recipe):
        raise RecipeError(f"--metric: unknown metric {ranking.metric!r} (known: {', '.join(metric_names(recipe))})")
    if len(ranking.candidates) < 2:
        raise RecipeError(f"--candidates: ranking needs at least 2 candidate overlays, got {len(ranking.candidates)}")
    problem = GRAPH["reevaluate"].requirement(Target(recipe), ranking.recipe_path)
    if problem:
        raise RecipeError(problem.replace("re-evaluation needs", "ranking needs"))
    names: dict[str, str] = {}
    candidates = []
    lr = proxy_lr(recipe, ranking.lr_scale)
    for overlay in ranking.candidates:
        name = candidate_name(overlay)
        if not name:
            raise RecipeError(f"--candidates: {overlay}: the file's stem gives no candidate name (letters, digits, '-' or '_')")
        if name in names:
            raise RecipeError(f"--candidates: {names[name]} and {overlay} both name candidate {name!r}; candidates need distinct file stems")
        names[name] = overlay
        try:
            check_overlay(overlay)
            load_recipe(ranking.recipe_path, [*ranking.overlays, overlay], ranking.set)  # its own errors, named without the proxy's edits
            sets = [*PROXY_SETTINGS, *ranking.set, f"optimizer.peak_lr={lr!r}", f"curriculum.variants.{name}={{strategy: uniform}}"]
            run = CandidateRun(recipe_path=ranking.recipe_path, overlays=[*ranking.overlays, overlay], set=sets, name=name, overlay=overlay)
            candidate = load_recipe(run.recipe_path, run.overlays, run.set)
            problem = GRAPH["reevaluate"].requirement(Target(candidate, name), ranking.recipe_path)
            if problem:
                raise RecipeError(problem.replace("re-evaluation needs", "a proxy run needs"))
            check_request(plan_request(candidate, name))
            if candidate.corpus.sources != recipe.corpus.sources:  # its own sources: listed now (names, sizes; nothing read)
                for source in candidate.corpus.sources:
                    list_source(source, store_endpoint(candidate))
        except ValueError as error:  # RecipeError, PlacementError, IngestError: bad input all the same
            raise RecipeError(f"candidate {name}: {error}") from None
        candidates.append(Candidate(name, overlay, run, candidate))
    return recipe, candidates


def metric_value(reevaluated: Mapping[str, Any], metric: str) -> float | None:
    """``metric`` of a re-evaluation's summary (its JSON view): a tier loss or a source's loss."""
    if metric in TIER_METRICS:
        return reevaluated.get(metric)
    return reevaluated.get("val_loss_by_source", {}).get(metric.removeprefix("val_loss_"))


def ranks(values: Mapping[str, float]) -> dict[str, int]:
    """Competition ranks, 1 for the lowest value; equal values share the better rank (1, 2, 2, 4).
    A missing or non-finite value is a ValueError naming the candidate."""
    for name, value in values.items():
        if value is None or not math.isfinite(value):
            raise ValueError(f"candidate {name}: no finite value to rank ({value})")
    return {name: 1 + sum(other < value for other in values.values()) for name, value in values.items()}


def ranking_rows(candidates: list[tuple[str, str]], outcomes: Mapping[str, Mapping[str, Any]], metric: str) -> list[dict[str, Any]]:
    """One row per candidate (name, overlay) from its proxy run's outcome (each stage's JSON view
    and its MLflow run id), best first (ties by name)."""
    values = {name: metric_value(outcomes[name]["reevaluate"], metric) for name, _ in candidates}
    ranked = ranks(values)
    rows = []
    for name, overlay in candidates:
        reevaluated = outcomes[name]["reevaluate"]
        rows.append({"rank": ranked[name], "candidate": name, "overlay": overlay, "metric": metric, "value": values[name],
                     "val_loss_hq": reevaluated.get("val_loss_hq"), "val_loss_general": reevaluated.get("val_loss_general"),
                     "final_loss": outcomes[name]["train"]["final_loss"], "mlflow_run_id": outcomes[name]["mlflow_run_id"]})
    return sorted(rows, key=lambda row: (row["rank"], row["candidate"]))


def ranking_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows({key: row[key] for key in COLUMNS} for row in rows)
    return buffer.getvalue().encode()


def plot_ranking(rows: list[dict[str, Any]], title: str) -> bytes:
    """PNG bytes: each candidate's metric above the best one's (bars, best at the top), its value
    written beside it; at a reduced LR the candidates differ by little, so the differences are drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.trec_plot import png_bytes

    best = min(row["value"] for row in rows)
    figure, axis = plt.subplots(figsize=(8, 1.2 + 0.45 * len(rows)))
    y = list(range(len(rows)))[::-1]
    gaps = [row["value"] - best for row in rows]
    axis.barh(y, gaps, color=["tab:green" if row["rank"] == 1 else "tab:gray" for row in rows])
    for yi, gap, row in zip(y, gaps, rows):
        axis.annotate(f" {row['value']:.5f}", (gap, yi), va="center", fontsize=8)
    axis.set_yticks(y, [f"{row['rank']}. {row['candidate']}" for row in rows])
    axis.set_xlabel(f"{rows[0]['metric']} minus the best (nats/token)")
    axis.set_xlim(0, max(max(gaps), 1e-12) * 1.35)
    axis.grid(axis="x", alpha=0.3)
    axis.set_title(title, fontsize=10)
    return png_bytes(figure)


def ranking_text(result: Mapping[str, Any]) -> str:
    """The ranking as a table, what the metric measured, the proxies' LR and each run's stage times."""
    header = ("rank", "candidate", result["metric"], "vs best", "val_loss_hq", "val_loss_general", "overlay")
    best = result["candidates"][0]["value"]
    lines = [header] + [(str(row["rank"]), row["candidate"], f"{row['value']:.5f}", f"+{row['value'] - best:.5f}",
                         number(row["val_loss_hq"], "-"), number(row["val_loss_general"], "-"), row["overlay"]) for row in result["candidates"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]
    held_out = result["held_out"]
    text += ["", f"metric   {result['metric']} of the recipe's held-out set: {result['metric_description']}, "
                 f"{held_out['sequences']:,} sequences ({held_out['hq']:,} hq, {held_out['general']:,} general by the recipe's scoring), "
                 f"the same for every candidate (evalset {held_out['fingerprint']})",
             f"proxies  uniform curriculum at peak LR {result['peak_lr']:g} (the recipe's {result['recipe_peak_lr']:g} x {result['lr_scale']:g}), "
             f"weight decay {result['weight_decay']:g} kept; tokenizer, base and held-out set shared",
             "stage times (s): " + "; ".join(f"{name}: " + ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in outcome.get("seconds", {}).items())
                                            for name, outcome in result["outcomes"].items())]
    return "\n".join(text)


def metric_description(metric: str) -> str:
    if metric == "val_loss_general":
        return "mean loss over the sequences outside the hq tier"
    if metric == "val_loss_hq":
        return "mean loss over the hq-tier sequences"
    return f"mean loss over the sequences of source {metric.removeprefix('val_loss_')}"


# --- the flows (made on first access: they import Prefect and the pipeline) ---------------------


def run_shared(recipe: Recipe, store, tracker, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The stages every candidate takes from the recipe itself, as tasks of the running flow, their
    MLflow runs (``shared/<stage>``) under ``run_id``: (results, the flow-style outcome)."""
    from flows.pipeline import run_graph
    from trecflow.stage import Target

    target = Target(recipe, SHARED_VARIANT)
    first, based = run_graph(target, store, set(), tracker, run_id, until="base")
    results, outcome = run_graph(target, store, set(), tracker, run_id, until="evalset", given=first)
    return results, {**outcome, "seconds": {**based["seconds"], **outcome["seconds"]}}


def held_out_sequences(store, evalset) -> dict[str, Any]:
    """How many sequences of the shared held-out set each tier metric reads (and the sources)."""
    from tasks.evalset import load_evalset

    held_out = load_evalset(store, evalset)
    hq = sum(tier == "hq" for tier in held_out.tiers)
    return {"fingerprint": evalset.fingerprint, "sequences": len(held_out.tiers), "hq": hq, "general": len(held_out.tiers) - hq,
            "sources": sorted(set(held_out.sources))}


def check_measurable(held_out: Mapping[str, Any], metric: str) -> None:
    """A RecipeError, before any candidate trains, when the shared held-out set has no sequence ``metric`` reads."""
    empty = {"val_loss_hq": held_out["hq"] == 0, "val_loss_general": held_out["general"] == 0}.get(
        metric, metric.removeprefix("val_loss_") not in held_out["sources"])
    if empty:
        raise RecipeError(f"--metric {metric}: the recipe's held-out set (evalset {held_out['fingerprint']}) has no sequence it reads")


def log_candidate(tracker, run_id: str, recipe: Recipe, results: Mapping[str, Any]) -> None:
    """A candidate run's headline numbers (as a variant run's) and its loss / LR curves."""
    from flows.variant_run import training_curves
    from tasks.graph import GRAPH

    reevaluated, trained = results["reevaluate"], results["train"]
    tracker.log_metrics(run_id, GRAPH["reevaluate"].metrics(reevaluated.summary) | {"final_loss": trained.summary.final_loss})
    tracker.log_series(run_id, training_curves(tracker.store, trained.fingerprint, results["place"].fingerprint, recipe.training.log_every))


def run_candidate(candidate: CandidateRun) -> dict[str, Any]:
    """One candidate's proxy: the pipeline's stages for its recipe and its ``uniform`` variant, the
    shared stages given (not run), under an MLflow run named after it."""
    from flows.pipeline import load_run, mlflow_run_url, run_graph, source_tags, tracked_run
    from trecflow.runner import stored
    from trecflow.stage import Target

    recipe, store = load_run(candidate)
    recipe.curriculum.variant(candidate.name)  # the variant the ranking declared for it
    given = {stage: stored(store, stage, fingerprint) for stage, fingerprint in candidate.shared.items()}
    tags = {"trecflow.kind": CANDIDATE_KIND, "trecflow.variant": candidate.name, "trecflow.candidate": candidate.name,
            "trecflow.candidate_overlay": candidate.overlay, **source_tags(candidate)}
    if candidate.mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = candidate.mlflow_parent_run_id
    with tracked_run(store, recipe, candidate.name, tags) as (tracker, run_id):
        results, outcome = run_graph(Target(recipe, candidate.name), store, set(), tracker, run_id, given=given)
        log_candidate(tracker, run_id, recipe, results)
    return {"candidate": candidate.name, "overlay": candidate.overlay, "mlflow_run_id": run_id, "mlflow_url": mlflow_run_url(tracker, run_id), **outcome}


def run_ranking(ranking: Ranking = Ranking()) -> dict[str, Any]:
    """The shared stages, then every candidate's proxy (a subflow each), then the ranking."""
    from prefect import get_run_logger
    from prefect.artifacts import create_table_artifact

    from flows.pipeline import load_run, mlflow_run_url, source_tags, tracked_run
    from flows.reporters import artifact_key

    _, candidates = load_candidates(ranking)  # bad input: a RecipeError before any work
    recipe, store = load_run(RecipeFiles(recipe_path=ranking.recipe_path, overlays=ranking.overlays, set=[*PROXY_SETTINGS, *ranking.set]))
    logger = get_run_logger()
    peak_lr = proxy_lr(recipe, ranking.lr_scale)
    names = [candidate.name for candidate in candidates]
    tags = {"trecflow.kind": RANK_KIND, **source_tags(ranking), "trecflow.candidates": ",".join(names), "trecflow.rank_metric": ranking.metric}
    with tracked_run(store, recipe, "rank", tags) as (tracker, parent_id):
        tracker.log_params(parent_id, {"rank.lr_scale": ranking.lr_scale, "rank.peak_lr": peak_lr, "rank.metric": ranking.metric,
                                       "rank.candidates": ", ".join(f"{c.name}={c.overlay}" for c in candidates)})
        shared, shared_outcome = run_shared(recipe, store, tracker, parent_id)
        held_out = held_out_sequences(store, shared["evalset"])
        check_measurable(held_out, ranking.metric)
        pinned = {stage: shared[stage].fingerprint for stage in SHARED_STAGES if stage in shared and shared[stage].uri is not None}
        outcomes = {}
        for position, candidate in enumerate(candidates, start=1):
            logger.info("candidate %s (%d of %d): %s at peak LR %g", candidate.name, position, len(candidates), candidate.overlay, peak_lr)
            run = candidate.run.model_copy(update={"shared": pinned, "mlflow_parent_run_id": parent_id})
            outcomes[candidate.name] = _flows()["rank_candidate"](run)
        rows = ranking_rows([(candidate.name, candidate.overlay) for candidate in candidates], outcomes, ranking.metric)
        tracker.log_artifact_bytes(parent_id, "ranking.json", json.dumps(rows, indent=2).encode())
        tracker.log_artifact_bytes(parent_id, "ranking.csv", ranking_csv(rows))
        title = f"{recipe.name}: {ranking.metric} of proxies at LR {peak_lr:g} (x {ranking.lr_scale:g})"
        tracker.log_artifact_bytes(parent_id, "ranking.png", plot_ranking(rows, title))
        for row in rows:
            tracker.log_metrics(parent_id, {f"{row['candidate']}.{ranking.metric}": row["value"], f"{row['candidate']}.rank": row["rank"]})
            tracker.log_metrics(row["mlflow_run_id"], {"rank": row["rank"]})
        create_table_artifact(
            key=artifact_key("recipe-ranking", recipe.name),
            table=[{key: row[key] for key in COLUMNS} for row in rows],
            description=f"data recipes of {recipe.name} ranked by {ranking.metric} of proxies at peak LR {peak_lr:g} "
                        f"(x {ranking.lr_scale:g}) on the recipe's held-out set (MLflow run {parent_id})",
        )
    return {"recipe": recipe.name, "store": store.url, "metric": ranking.metric, "metric_description": metric_description(ranking.metric),
            "lr_scale": ranking.lr_scale, "peak_lr": peak_lr, "recipe_peak_lr": recipe.optimizer.peak_lr,
            "weight_decay": recipe.optimizer.weight_decay, "held_out": held_out, "candidates": rows, "mlflow_run_id": parent_id,
            "mlflow_url": mlflow_run_url(tracker, parent_id), "shared": shared_outcome, "outcomes": outcomes}


def rank_run_name() -> str:
    """``<recipe>/rank``: the name of a `rank_recipes` flow run."""
    from prefect.runtime import flow_run

    from flows.pipeline import run_label

    return f"{run_label(flow_run.parameters.get('ranking', {}))[0]}/rank"


def candidate_run_name() -> str:
    """``<recipe>/rank/<candidate>``: the name of a `rank_candidate` flow run."""
    from prefect.runtime import flow_run

    from flows.pipeline import run_label

    run = flow_run.parameters.get("candidate", {})
    name = run.get("name") if isinstance(run, dict) else getattr(run, "name", None)
    return f"{run_label(run)[0]}/rank/{name}"


_flows, __getattr__ = lazy_flows(__name__, {"rank_recipes": (run_ranking, rank_run_name), "rank_candidate": (run_candidate, candidate_run_name)})


# --- the command ------------------------------------------------------------------------------


def rank(
    recipe_path: Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)],
    candidates: Annotated[list[Path], typer.Option("--candidates", help="a candidate overlay changing the data only (repeatable; at least 2); "
                                                   "named by its file's stem", show_default=False)],
    overlay: Annotated[Optional[list[Path]], typer.Option("--overlay", help="overlay YAML merged into the recipe and every candidate (repeatable)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY.PATH=VALUE applied to the recipe and every candidate (repeatable)")] = None,
    lr_scale: Annotated[float, typer.Option("--lr-scale", help="the proxies' peak LR as a share of the recipe's")] = DEFAULT_LR_SCALE,
    metric: Annotated[str, typer.Option(help="what ranks the candidates: val_loss_general, val_loss_hq or val_loss_<source>")] = DEFAULT_METRIC,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Rank data recipes: each candidate overlay trains a small proxy (uniform curriculum) at the
    recipe's peak LR x --lr-scale; the proxies are ranked by one held-out loss of the recipe's own
    held-out set, which every candidate shares with its tokenizer and base model."""
    from flows.cli import check_sources, fail, run_stage_flow

    if not (lr_scale > 0 and math.isfinite(lr_scale)):
        raise fail(f"--lr-scale: must be a number > 0, got {lr_scale:g}")
    ranking = Ranking(recipe_path=str(recipe_path), overlays=[str(item) for item in overlay or ()], set=list(set_ or ()),
                      candidates=[str(item) for item in candidates], lr_scale=lr_scale, metric=metric)
    try:
        recipe, _ = load_candidates(ranking)
    except ValueError as error:  # RecipeError, PlacementError
        raise fail(str(error)) from None
    check_sources(recipe)  # the recipe's sources and scorer models (a candidate's own sources were listed above)
    result = run_stage_flow(__getattr__("rank_recipes"), ranking=ranking)
    if as_json:
        keys = ("recipe", "metric", "lr_scale", "peak_lr", "held_out", "candidates", "mlflow_run_id")
        typer.echo(json.dumps({key: result[key] for key in keys}))
        return
    typer.echo("")
    typer.echo(ranking_text(result))
    typer.echo(f"\nmlflow rank run {result['mlflow_run_id']} (experiment {result['recipe']}): {result['mlflow_url']}")
