"""``trecflow study`` and the ``study_recipe`` flow: is a difference between curriculum variants
larger than what the seed alone changes?

A **study** runs every variant (default: the recipe's declared variants, else its default
variant) at seeds 0..N-1 through re-evaluation. Seed s sets ``curriculum.seed = s`` (which
sequences of each tier are used and their order) and ``training.seed = s`` (the trainer's RNG);
a variant whose ``params`` sets its own ``seed`` would ignore it and is refused. The statistics
(`training.study_stats`): per variant the mean and sample SD over seeds of ``val_loss_hq``,
``val_loss_general``, each ``val_loss_<source>`` and ``r_p`` (`R_P_FIELD`); per pair of variants
the paired differences seed by seed, their mean, SE and the verdict ``|mean| > 3 SE``.

**Shared across seeds.** The stages a seed does not decide run once, at the recipe's own seeds,
and are given to every seed's graph run (`SHARED_STAGES`): ingest, score, predict, tokenizer, pack
and the held-out set do not read the seeds at all (a variant with its own schedule or averaging
computes its own prediction instead of the shared one); the base model (``base.tiny``'s fingerprint
includes ``curriculum.seed`` and the ``training`` section) and a ``trained`` reference model (its
fingerprint includes the ``curriculum`` and ``training`` sections) do, and would be pretrained /
trained again per seed if they were not given. So per variant x seed only placement, training
and re-evaluation run, and every seed is measured against the same base, reference and held-out set.

One flow run ``<recipe>/study``: the shared stages as its tasks, then one ``study_seed`` subflow
per variant x seed (``<recipe>/study/<variant>/seed-<s>``), seed by seed (all variants at seed 0,
then at seed 1, ...: a study stopped early still has complete pairs). MLflow: a parent run
``study`` (kind ``study``; params ``study.seeds``, ``study.variants``) with ``study.json``,
``study.csv``, ``study.png`` and the metrics ``<variant>.<metric>.mean`` / ``.sd``; the shared
stages' runs (``shared/<stage>``) and the seeds' runs (``<variant>/seed-<s>``, kind
``study-seed``, each with its stage runs) nested under it. The Prefect flow run gets the table as
the artifact ``study-<recipe>``. Every stage is a cached task of the pipeline, so a rerun computes
nothing and ``--seeds 3`` after ``--seeds 2`` trains only seed 2.

Importing this module imports neither Prefect nor the stages (the CLI imports it for its
``study`` command): the flows ``study_recipe`` and ``study_seed`` are made on first access
(`__getattr__`).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Annotated, Any, Mapping, Optional

import typer
from pydantic import Field

from flows.rank import SHARED_VARIANT, RecipeFiles, metric_names, metric_value
from flows.lazy_flows import lazy_flows
from trecflow.recipe import Recipe, RecipeError, load_recipe

MIN_SEEDS = 2  # the SD and the SE need two values
# The stages every variant x seed takes from the recipe at its own seeds (computed once, given).
SHARED_STAGES = ("ingest", "score", "predict", "tokenizer", "pack", "base", "reference", "evalset")
# The leaves run_shared asks the graph for, one run_graph each (each run computes what its leaf needs).
SHARED_LEAVES = ("base", "pack", "predict", "reference", "evalset")
# What each variant x seed computes.
SEED_STAGES = ("place", "train", "reevaluate")
R_P = "r_p"
FINAL_MODEL = "_final_model"  # `training.study_stats.FINAL_MODEL` (not imported: this module stays light)
AVERAGED_METRICS = ("val_loss_hq", "val_loss_general", R_P)  # what a run that averages also reports for its raw final model
R_P_FIELD = "trec_pearson"  # the primary curve's r_p at the recipe's trec.m: the corrected curve's with a reference, else the raw one's
R_P_HELP = ("r_p: the re-evaluation's trec_pearson, the Pearson agreement of the measured TREC with the prediction at the recipe's "
            "trec.m; the difficulty-corrected curve's when reevaluation.reference is base, trained or shuffled (then equal to "
            "trec_pearson_corrected), the raw curve's when it is none")
STUDY_KIND = "study"  # the trecflow.kind tag of the parent MLflow run
SEED_KIND = "study-seed"  # ... and of each variant x seed run
COLUMNS = ("kind", "variant", "other", "metric", "seed", "n", "value", "sd", "se", "verdict", "mlflow_run_id")


class Study(RecipeFiles):
    """One run of ``study_recipe``: a recipe, its variants and how many seeds."""

    seeds: int = Field(MIN_SEEDS, ge=MIN_SEEDS, description="seeds 0..seeds-1 of every variant (curriculum.seed and training.seed); at least 2")
    variants: list[str] = Field(default_factory=list, description="variants to study (default: the recipe's declared ones, else its default variant)")


class SeedRun(RecipeFiles):
    """One variant at one seed (``study_seed``): its recipe files (the seed's settings last in
    ``set``) and the shared outputs."""

    variant: str = Field(description="the curriculum variant")
    seed: int = Field(description="curriculum.seed and training.seed of this run")
    shared: dict[str, str] = Field(default_factory=dict, description="stage -> fingerprint of the recipe's outputs every seed uses")
    mlflow_parent_run_id: str | None = Field(None, description="the MLflow study run to nest this run under")


def seed_settings(seed: int) -> list[str]:
    """The ``--set`` edits that make seed ``seed``'s run (after the user's own)."""
    return [f"curriculum.seed={seed}", f"training.seed={seed}"]


def seed_label(variant: str, seed: int) -> str:
    """``<variant>/seed-<s>``: the MLflow run (and the last part of the Prefect run name) of one run."""
    return f"{variant}/seed-{seed}"


def seeds_problem(seeds: int) -> str | None:
    if seeds < MIN_SEEDS:
        return f"--seeds: a study needs at least {MIN_SEEDS} seeds (the SD over seeds and the SE of a difference need two), got {seeds}"
    return None


def study_variants(recipe: Recipe, requested: list[str]) -> list[str]:
    """The variants to study: the requested ones, else the recipe's declared ones, else its default
    variant (`flows.params.default_variant`). A RecipeError (one line) for an unknown or repeated
    name, or a variant whose ``params.seed`` would override the study's seed."""
    from flows.params import default_variant

    names = list(requested or recipe.curriculum.variants or [default_variant(recipe)])
    if len(set(names)) != len(names):
        raise RecipeError(f"--variants: repeated names in {names}")
    for name in names:
        section = recipe.curriculum.variant(name)  # unknown: names the known ones
        if "seed" in section.params:
            raise RecipeError(f"variant {name}: curriculum.variants.{name}.params.seed = {section.params['seed']} would override the study's "
                              "seed (curriculum.seed and training.seed 0..N-1); remove it to study this variant")
    return names


def load_study(study: Study) -> tuple[Recipe, list[str]]:
    """The recipe (what the shared stages are computed from) and the variants, checked before any
    work (files read, nothing computed or written): a RecipeError of one line."""
    from flows.cli import check_placement
    from tasks.graph import GRAPH
    from trecflow.stage import Target

    problem = seeds_problem(study.seeds)
    if problem:
        raise RecipeError(problem)
    recipe = load_recipe(study.recipe_path, study.overlays, study.set)
    problem = GRAPH["reevaluate"].requirement(Target(recipe), study.recipe_path)
    if problem:
        raise RecipeError(problem.replace("re-evaluation needs", "a study needs"))
    variants = study_variants(recipe, study.variants)
    for variant in variants:  # the plan of a variant does not depend on the seed
        GRAPH.check_refusals(Target(recipe, variant), None, study.recipe_path)
        try:
            check_placement(recipe, variant)
        except ValueError as error:  # PlacementError
            raise RecipeError(f"variant {variant}: {error}") from None
    return recipe, variants


def study_metrics(reevaluated: Mapping[str, Any], metrics: list[str]) -> dict[str, float | None]:
    """The study's metrics of one re-evaluation summary (its JSON view): held-out losses and r_p,
    and for a run that averages checkpoints the raw final model's (``X_final_model``: its held-out
    losses, and r_p of the same measured curve against the raw final model's prediction)."""
    final = reevaluated.get("final_model") or {}

    def value(metric: str) -> float | None:
        if metric.endswith(FINAL_MODEL):
            base = metric.removesuffix(FINAL_MODEL)
            return final.get(R_P_FIELD if base == R_P else base)
        return reevaluated.get(R_P_FIELD) if metric == R_P else metric_value(reevaluated, metric)

    return {metric: value(metric) for metric in metrics}


def candidate_metrics(recipe: Recipe) -> list[str]:
    """Every metric a study of ``recipe`` may report (those no run has are dropped later)."""
    return [*metric_names(recipe), R_P, *(metric + FINAL_MODEL for metric in AVERAGED_METRICS)]


def study_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The study as one long table (`COLUMNS`): a ``seed`` row per variant x seed x metric (its
    value), a ``variant`` row per variant and metric (N, mean, SD), a ``pair`` row per pair and
    metric (N, mean difference, SD, SE, verdict) and an ``averaging`` row per variant that averages
    checkpoints and metric (the same for the averaged minus the raw final model)."""
    empty = dict.fromkeys(COLUMNS)
    rows = []
    for run in result["runs"]:
        for metric in result["metrics"]:
            rows.append({**empty, "kind": "seed", "variant": run["variant"], "metric": metric, "seed": run["seed"], "value": run["metrics"][metric],
                         "mlflow_run_id": run["mlflow_run_id"]})
    stats = result["stats"]
    for entry in stats["variants"]:
        for metric, spread in entry["metrics"].items():
            rows.append({**empty, "kind": "variant", "variant": entry["variant"], "metric": metric, "n": spread["n"], "value": spread["mean"],
                         "sd": spread["sd"]})
    for kind, differences in (("pair", stats["pairs"]), ("averaging", stats["averaging"])):
        for pair in differences:
            rows.append({**empty, "kind": kind, "variant": pair["a"], "other": pair["b"], "metric": pair["metric"], "n": pair["n"],
                         "value": pair["mean"], "sd": pair["sd"], "se": pair["se"], "verdict": verdict_word(pair["verdict"])})
    return rows


def verdict_word(verdict: bool | None) -> str:
    """`training.study_stats.verdict_text` (imported when used: this module stays light)."""
    from training.study_stats import verdict_text

    return verdict_text(verdict)


def study_csv(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


def _mean(value: float | None) -> str:
    return "-" if value is None else f"{value:.5f}"


def _spread(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _table(lines: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines]


def _differences(differences: list[Mapping[str, Any]], header: tuple[str, ...]) -> list[str]:
    lines: list[tuple[str, ...]] = [header]
    for pair in differences:
        difference = "-" if pair["mean"] is None else f"{pair['mean']:+.5f}"
        lines.append((pair["a"], pair["b"], pair["metric"], str(pair["n"]), difference, _spread(pair["se"]), verdict_word(pair["verdict"])))
    return _table(lines)


def study_text(result: Mapping[str, Any]) -> str:
    """Per variant and metric mean ± SD over the seeds (N), then per pair and metric the paired
    difference, its SE and the verdict, then the same for the averaged minus the raw final model
    of each variant that averages, then what r_p is, what was shared and the wall time."""
    stats = result["stats"]
    lines: list[tuple[str, ...]] = [("variant", "metric", "N", "mean ± SD")]
    for entry in stats["variants"]:
        for metric, spread in entry["metrics"].items():
            if spread["n"] or not metric.endswith(FINAL_MODEL):  # a variant that does not average has no final-model rows
                lines.append((entry["variant"], metric, str(spread["n"]), f"{_mean(spread['mean'])} ± {_spread(spread['sd'])}"))
    text = _table(lines)
    text.append("")
    if stats["pairs"]:
        text += _differences(stats["pairs"], ("a", "b", "metric", "N", "difference (a - b)", "SE", "|diff| > 3 SE"))
    else:
        text.append("pairs: none (one variant: the table above is its seed-to-seed spread)")
    if stats["averaging"]:
        text += ["", "averaging: the averaged model minus the raw final model, seed by seed (r_p: the measured curve against the merge-aware "
                 "minus against the raw final model's prediction)"]
        text += _differences(stats["averaging"], ("variant", "against", "metric", "N", "difference", "SE", "|diff| > 3 SE"))
    computed = [seed_label(run["variant"], run["seed"]) for run in result["runs"] if not run["reused"]]
    reuse = ("every run reused" if not computed else "every run computed" if len(computed) == len(result["runs"])
             else f"{', '.join(computed)} computed, the others reused")
    variants = len(result["variants"])
    text += ["", f"r_p      {result['r_p']}",
             f"seeds    {result['seeds']} (curriculum.seed and training.seed 0..{result['seeds'] - 1}) x {variants} variant{'s' * (variants != 1)}: "
             + reuse,
             "shared   " + ", ".join(f"{stage} {fingerprint}" for stage, fingerprint in result["shared"].items()),
             f"wall time {result['seconds']:.1f} s"]
    return "\n".join(text)


def plot_study(result: Mapping[str, Any], title: str) -> bytes:
    """PNG bytes: one panel per metric; per variant the mean with the seed spread (± SD) as an error
    bar and each seed's value as a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.trec_plot import png_bytes

    metrics = [metric for metric in result["metrics"] if not metric.endswith(FINAL_MODEL)]
    variants = result["stats"]["variants"]
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics) + 0.5, 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for x, entry in enumerate(variants):
            spread = entry["metrics"][metric]
            if spread["n"]:
                offsets = [0.12 * (i - (spread["n"] - 1) / 2) / max(1, spread["n"] - 1) for i in range(spread["n"])]
                axis.scatter([x + 0.18 + offset for offset in offsets], spread["values"], s=14, color="tab:gray", alpha=0.8, zorder=2,
                             label="seeds" if x == 0 else None)
                axis.errorbar([x], [spread["mean"]], yerr=[spread["sd"] or 0.0], fmt="o", color="tab:blue", capsize=4, zorder=3,
                              label="mean ± SD" if x == 0 else None)
        axis.set_xticks(range(len(variants)), [entry["variant"] for entry in variants], rotation=30, ha="right", fontsize=8)
        axis.set_xlim(-0.6, len(variants) - 0.4)
        axis.set_title(metric, fontsize=9)
        axis.grid(axis="y", alpha=0.3)
        axis.tick_params(axis="y", labelsize=8)
    axes[0][0].legend(fontsize=7, loc="best")
    figure.suptitle(title, fontsize=10)
    return png_bytes(figure)


# --- the flows (made on first access: they import Prefect and the pipeline) ---------------------


def run_shared(recipe: Recipe, store, tracker, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`SHARED_STAGES` of the recipe at its own seeds, as tasks of the running flow, their MLflow
    runs (``shared/<stage>``) under ``run_id``: (results, the flow-style outcome)."""
    from flows.pipeline import run_graph
    from trecflow.stage import Target

    target = Target(recipe, SHARED_VARIANT)
    results: dict[str, Any] = {}
    outcome: dict[str, Any] = {"seconds": {}}
    for leaf in SHARED_LEAVES:
        results, part = run_graph(target, store, set(), tracker, run_id, until=leaf, given=results)
        outcome = {**outcome, **part, "seconds": {**outcome["seconds"], **part["seconds"]}}
    return results, outcome


def pinned_stages(store, shared: Mapping[str, Any]) -> dict[str, str]:
    """stage -> fingerprint of the shared outputs committed in the store (what a seed's run loads
    and is given). A stage resolved without an output (a base given as a path; the base model as
    the reference) is left out: every seed resolves it again to the same fingerprint."""
    return {stage: shared[stage].fingerprint for stage in SHARED_STAGES
            if stage in shared and store.output(stage, shared[stage].fingerprint).exists()}


def run_seed(run: SeedRun) -> dict[str, Any]:
    """One variant at one seed: placement, training and re-evaluation of its recipe (the seed's
    settings applied), the shared stages given, under an MLflow run ``<variant>/seed-<s>``."""
    from flows.pipeline import load_run, mlflow_run_url, run_graph, source_tags, tracked_run
    from flows.rank import log_candidate
    from flows.variant_run import trec_curves, variant_params
    from trecflow.runner import stored
    from trecflow.stage import Target

    recipe, store = load_run(run)
    given = {stage: stored(store, stage, fingerprint) for stage, fingerprint in given_stages(recipe, run.variant, run.shared).items()}
    tags = {"trecflow.kind": SEED_KIND, "trecflow.variant": run.variant, "trecflow.seed": str(run.seed), **source_tags(run)}
    if run.mlflow_parent_run_id:
        tags["mlflow.parentRunId"] = run.mlflow_parent_run_id
    with tracked_run(store, recipe, seed_label(run.variant, run.seed), tags) as (tracker, run_id):
        results, outcome = run_graph(Target(recipe, run.variant), store, set(), tracker, run_id, given=given)
        log_candidate(tracker, run_id, recipe, results)
        tracker.log_params(run_id, {**variant_params(recipe, run.variant, results["place"].summary), "study.seed": run.seed})
        tracker.log_series(run_id, trec_curves(store, results["reevaluate"].fingerprint))
    return {"variant": run.variant, "seed": run.seed, "mlflow_run_id": run_id, "mlflow_url": mlflow_run_url(tracker, run_id), **outcome}


def given_stages(recipe: Recipe, variant: str, shared: Mapping[str, str]) -> dict[str, str]:
    """The shared outputs (stage -> fingerprint) a seed run of ``variant`` is given: all of them,
    except the prediction for a variant with its own schedule or averaging, whose run computes (or
    reuses) its own. RecipeError for an unknown variant."""
    own = recipe.curriculum.variant(variant).predicts_own
    return {stage: fingerprint for stage, fingerprint in shared.items() if not (own and stage == "predict")}


def seed_runs(study: Study, variants: list[str], pinned: dict[str, str], parent_id: str | None) -> list[SeedRun]:
    """Every variant x seed, seed by seed (all variants at seed 0 first)."""
    return [SeedRun(recipe_path=study.recipe_path, overlays=study.overlays, set=[*study.set, *seed_settings(seed)], variant=variant, seed=seed,
                    shared=pinned, mlflow_parent_run_id=parent_id)
            for seed in range(study.seeds) for variant in variants]


def study_result(recipe: Recipe, study: Study, variants: list[str], outcomes: Mapping[tuple[str, int], Mapping[str, Any]],
                 shared: Mapping[str, str], seconds: float) -> dict[str, Any]:
    """The study's JSON view (what ``--json`` prints and ``study.json`` holds) from each run's outcome."""
    from training.study_stats import study_stats

    candidates = candidate_metrics(recipe)
    measured = {key: study_metrics(outcome["reevaluate"], candidates) for key, outcome in outcomes.items()}
    metrics = [metric for metric in candidates if any(values[metric] is not None for values in measured.values())]
    runs = [{"variant": variant, "seed": seed, "metrics": {metric: measured[variant, seed][metric] for metric in metrics},
             "train_fingerprint": outcome["train"]["fingerprint"], "reevaluate_fingerprint": outcome["reevaluate"]["fingerprint"],
             "reused": all(outcome[stage]["reused"] for stage in SEED_STAGES), "mlflow_run_id": outcome["mlflow_run_id"]}
            for (variant, seed), outcome in outcomes.items()]
    values = {variant: {seed: measured[variant, seed] for (name, seed) in outcomes if name == variant} for variant in variants}
    stats = study_stats(values, metrics)
    return {"recipe": recipe.name, "seeds": study.seeds, "variants": variants, "metrics": metrics, "r_p": R_P_HELP, "runs": runs,
            "stats": stats.as_json(), "shared": dict(shared), "seconds": round(seconds, 2)}


def run_study(study: Study = Study()) -> dict[str, Any]:
    """The shared stages, then every variant x seed (a subflow each), then the statistics."""
    from prefect import get_run_logger
    from prefect.artifacts import create_table_artifact

    from flows.pipeline import load_run, mlflow_run_url, source_tags, tracked_run
    from flows.reporters import artifact_key

    started = time.monotonic()
    _, variants = load_study(study)  # bad input: a RecipeError before any work
    recipe, store = load_run(RecipeFiles(recipe_path=study.recipe_path, overlays=study.overlays, set=study.set))
    logger = get_run_logger()
    tags = {"trecflow.kind": STUDY_KIND, **source_tags(study), "trecflow.variants": ",".join(variants), "trecflow.seeds": str(study.seeds)}
    with tracked_run(store, recipe, "study", tags) as (tracker, parent_id):
        tracker.log_params(parent_id, {"study.seeds": study.seeds, "study.variants": ", ".join(variants)})
        shared, shared_outcome = run_shared(recipe, store, tracker, parent_id)
        pinned = pinned_stages(store, shared)
        outcomes: dict[tuple[str, int], dict[str, Any]] = {}
        runs = seed_runs(study, variants, pinned, parent_id)
        for position, run in enumerate(runs, start=1):
            logger.info("%s (%d of %d)", seed_label(run.variant, run.seed), position, len(runs))
            outcomes[run.variant, run.seed] = _flows()["study_seed"](run)
        result = study_result(recipe, study, variants, outcomes, {stage: result.fingerprint for stage, result in shared.items()},
                              time.monotonic() - started)
        rows = study_rows(result)
        tracker.log_artifact_bytes(parent_id, "study.json", json.dumps(result, indent=2).encode())
        tracker.log_artifact_bytes(parent_id, "study.csv", study_csv(rows))
        title = f"{recipe.name}: {len(variants)} variant(s) x {study.seeds} seeds (mean ± SD, dots: seeds)"
        tracker.log_artifact_bytes(parent_id, "study.png", plot_study(result, title))
        for entry in result["stats"]["variants"]:
            tracker.log_metrics(parent_id, {f"{entry['variant']}.{metric}.{key}": spread[key] for metric, spread in entry["metrics"].items()
                                            for key in ("mean", "sd") if spread[key] is not None})
        create_table_artifact(
            key=artifact_key("study", recipe.name),
            table=[row for row in rows if row["kind"] != "seed"],
            description=f"seed study of {recipe.name}: {', '.join(variants)} x seeds 0..{study.seeds - 1}; per variant mean and SD over "
                        f"seeds, per pair the paired difference, its SE and |diff| > 3 SE (MLflow run {parent_id})",
        )
    return {**result, "store": store.url, "mlflow_run_id": parent_id, "mlflow_url": mlflow_run_url(tracker, parent_id),
            "shared_outcome": shared_outcome, "outcomes": {seed_label(*key): outcome for key, outcome in outcomes.items()}}


def study_run_name() -> str:
    """``<recipe>/study``: the name of a `study_recipe` flow run."""
    from prefect.runtime import flow_run

    from flows.pipeline import run_label

    return f"{run_label(flow_run.parameters.get('study', {}))[0]}/study"


def seed_run_name() -> str:
    """``<recipe>/study/<variant>/seed-<s>``: the name of a `study_seed` flow run."""
    from prefect.runtime import flow_run

    from flows.pipeline import run_label

    run = flow_run.parameters.get("run", {})
    variant, seed = (run.get("variant"), run.get("seed")) if isinstance(run, dict) else (getattr(run, "variant", None), getattr(run, "seed", None))
    return f"{run_label(run)[0]}/study/{seed_label(str(variant), seed)}"


_flows, __getattr__ = lazy_flows(__name__, {"study_recipe": (run_study, study_run_name), "study_seed": (run_seed, seed_run_name)})


# --- the command ------------------------------------------------------------------------------


def study(
    recipe_path: Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)],
    seeds: Annotated[int, typer.Option("--seeds", help="seeds 0..N-1 of every variant (curriculum.seed and training.seed); at least 2",
                                       show_default=False)],
    variants: Annotated[Optional[list[str]], typer.Option("--variants", help="a variant to study (repeatable, or comma-separated); "
                                                          "default: the recipe's declared variants, else its default variant")] = None,
    overlay: Annotated[Optional[list[Path]], typer.Option("--overlay", help="overlay YAML merged into the recipe (repeatable, in order)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY.PATH=VALUE applied after the overlays (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Seed study: every variant at seeds 0..N-1 through re-evaluation (base, tokenizer, packing,
    reference and held-out set shared); per variant the mean ± SD over seeds of the held-out losses
    and r_p, per pair of variants the paired difference, its SE and whether |diff| > 3 SE."""
    from flows.cli import check_sources, fail, run_stage_flow

    problem = seeds_problem(seeds)
    if problem:
        raise fail(problem)
    names = [name.strip() for item in variants or () for name in item.split(",") if name.strip()]
    spec = Study(recipe_path=str(recipe_path), overlays=[str(item) for item in overlay or ()], set=list(set_ or ()), seeds=seeds, variants=names)
    try:
        recipe, _ = load_study(spec)
    except ValueError as error:  # RecipeError, PlacementError
        raise fail(str(error)) from None
    check_sources(recipe)
    result = run_stage_flow(__getattr__("study_recipe"), study=spec)
    if as_json:
        keys = ("recipe", "seeds", "variants", "metrics", "r_p", "runs", "stats", "shared", "seconds", "mlflow_run_id")
        typer.echo(json.dumps({key: result[key] for key in keys}))
        return
    typer.echo("")
    typer.echo(study_text(result))
    typer.echo(f"\nmlflow study run {result['mlflow_run_id']} (experiment {result['recipe']}): {result['mlflow_url']}")
