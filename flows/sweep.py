"""``trecflow sweep`` and the ``calibration_sweep`` flow: the measured runs the m* law is fitted from.

A sweep runs the recipe's ``uniform`` variant (a constant tier mix: the runs that measure the
prediction) at every point (tau, T) of a grid, through re-evaluation. Point (tau, T) is the recipe
with ``data.tokens = T * batch.tokens`` and ``optimizer.weight_decay = 1 / (tau * peak_lr * T)``
(so its tau is exactly ``tau``); everything else is the recipe's, including the schedule kind (the
paper calibrated linear decay to zero: ``--set schedule.kind=linear``). Stage 5 records each run
in the store's calibration table (`tasks.calibrate`); the sweep then fits the law over the whole
table (`trecflow calibrate`) and, with ``--held-out TAU:STEPS`` (a point not in the grid), runs that
point with ``trec.m: calibrated`` and reports its r_p at the calibrated m, at its own best m and at
the recipe's configured m (all three on the same measured curve).

Every point is a ``cpt_pipeline`` subflow, so every stage is cached: a sweep can be stopped,
extended and resumed, and a point already measured computes nothing. Nothing is run before every
point's recipe is built and checked (one line, exit 2, for a bad grid or recipe).
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import Field

from flows.lazy_flows import lazy_flows
from flows.rank import RecipeFiles
from trecflow.recipe import Recipe, RecipeError, load_recipe

SWEEP_VARIANT = "uniform"


class SweepPoint(RecipeFiles):
    """One (tau, T) of a sweep as a recipe source: the sweep's recipe files with the point's edits."""

    tau: float = Field(gt=0, description="the point's normalized timescale 1/(peak_lr * weight_decay * T)")
    steps: int = Field(gt=0, description="the point's steps T")


class Sweep(RecipeFiles):
    """One run of ``calibration_sweep``: a recipe, the grid of tau and T, and an optional held-out point."""

    taus: list[float] = Field(description="the grid's tau values")
    steps: list[int] = Field(description="the grid's T values (steps)")
    held_out: SweepPoint | None = Field(None, description="a point outside the grid, predicted with trec.m: calibrated")
    seed_per_point: bool = Field(False, description="point i (the held-out point last) trains on seed i (curriculum.seed and training.seed): "
                                                    "its own batches, so the points' m* do not share the content noise of one data order")


def point_settings(recipe: Recipe, tau: float, steps: int) -> list[str]:
    """The ``--set`` edits that make point (tau, T) of ``recipe``."""
    weight_decay = 1.0 / (tau * recipe.optimizer.peak_lr * steps)
    return [f"data.tokens={steps * recipe.batch.tokens}", f"optimizer.weight_decay={weight_decay!r}"]


def parse_point(text: str) -> tuple[float, int]:
    """``TAU:STEPS`` (e.g. ``0.4:300``); RecipeError naming ``--held-out`` otherwise."""
    try:
        tau, steps = text.split(":")
        return float(tau), int(steps)
    except ValueError:
        raise RecipeError(f"--held-out: {text!r} is not TAU:STEPS (e.g. 0.4:300)") from None


def grid_points(sweep: Sweep) -> list[SweepPoint]:
    """Every (tau, T) of the grid, T outer (the points of one length share their placement's
    length), then the held-out point; the user's ``--set`` edits first, the point's after them
    (with ``seed_per_point``, point i's seed settings last)."""
    from flows.study import seed_settings

    recipe = load_recipe(sweep.recipe_path, sweep.overlays, sweep.set)

    def point(tau: float, steps: int, index: int) -> SweepPoint:
        seeds = seed_settings(index) if sweep.seed_per_point else []
        return SweepPoint(recipe_path=sweep.recipe_path, overlays=sweep.overlays, set=[*sweep.set, *point_settings(recipe, tau, steps), *seeds],
                          tau=tau, steps=steps)

    points = [point(tau, steps, index) for index, (steps, tau) in enumerate(itertools.product(sweep.steps, sweep.taus))]
    if sweep.held_out is not None:
        held = point(sweep.held_out.tau, sweep.held_out.steps, len(points))
        points.append(held.model_copy(update={"set": [*held.set, "trec.m=calibrated"]}))
    return points


def load_sweep(sweep: Sweep) -> tuple[Recipe, list[SweepPoint]]:
    """The recipe and every point, each point's recipe loaded and checked before any work (a
    RecipeError of one line naming the point)."""
    from tasks.graph import GRAPH
    from trecflow.stage import Target

    for name, values in (("--tau", sweep.taus), ("--steps", sweep.steps)):
        if not values:
            raise RecipeError(f"{name}: a sweep needs at least one value")
        if len(set(values)) != len(values) or any(value <= 0 for value in values):
            raise RecipeError(f"{name}: values must be positive and distinct, got {values}")
    if sweep.held_out is not None and sweep.held_out.tau in sweep.taus and sweep.held_out.steps in sweep.steps:
        raise RecipeError(f"--held-out: tau {sweep.held_out.tau:g} and T {sweep.held_out.steps} are both in the grid; a held-out point must not be")
    recipe = load_recipe(sweep.recipe_path, sweep.overlays, sweep.set)
    recipe.curriculum.variant(SWEEP_VARIANT)
    points = grid_points(sweep)
    for point in points:
        label = f"point tau {point.tau:g}, T {point.steps}"
        try:
            built = point_recipe(point)
        except RecipeError as error:
            raise RecipeError(f"{label}: {error}") from None
        if built.steps != point.steps:
            raise RecipeError(f"{label}: data.tokens / batch.tokens gives {built.steps} steps, not {point.steps}")
        GRAPH.check_runnable(Target(built, SWEEP_VARIANT), None, sweep.recipe_path)
    return recipe, points


def point_recipe(point: SweepPoint) -> Recipe:
    """The recipe of one point, without the held-out point's ``trec.m: calibrated`` (which needs the law)."""
    return load_recipe(point.recipe_path, point.overlays, [item for item in point.set if item != "trec.m=calibrated"])


def held_out_report(store, point: SweepPoint, outcome: dict[str, Any], configured_m: float) -> dict[str, Any]:
    """The held-out point's r_p at the calibrated m (the one it predicted with), at its own best m,
    and at the recipe's configured m: the same measured curve against three predictions."""
    import io

    import pyarrow.parquet as pq

    from tasks.predict import read_curve
    from trecflow.runner import stored
    from training.trec_measure import agreement

    recipe = point_recipe(point)
    measured = stored(store, "reevaluate", outcome["reevaluate"]["fingerprint"])
    summary = measured.summary
    curve = read_curve(store, outcome["predict"]["fingerprint"])
    table = pq.read_table(io.BytesIO(store.output("reevaluate", measured.fingerprint).read_bytes("trec.parquet")))
    smoothed = table["corrected_smoothed" if summary.curve == "corrected" else "loss_smoothed"].to_numpy()
    configured = agreement(table["step"].to_numpy(), smoothed, curve["c"].to_numpy(), recipe.trec.p, configured_m, recipe.reevaluation.smoothing)
    return {"tau": point.tau, "steps": point.steps, "seed": recipe.curriculum.seed, "calibrated_m": summary.m, "r_p_calibrated": summary.trec_pearson,
            "best_m": summary.m_fit, "r_p_best": summary.trec_pearson_fit, "configured_m": configured_m, "r_p_configured": configured.r_p,
            "reevaluate_fingerprint": measured.fingerprint}


def point_row(point: SweepPoint, outcome: dict[str, Any]) -> dict[str, Any]:
    """One grid point's measurement (what the calibration table recorded from it)."""
    measured = outcome["reevaluate"]
    return {"tau": point.tau, "steps": point.steps, "seed": point_recipe(point).curriculum.seed, "m_fit": measured["m_fit"], "r_p_fit": measured["trec_pearson_fit"],
            "r_p": measured["trec_pearson"], "m": measured["m"], "calibration_entry": measured["calibration_entry"],
            "reused": all(outcome[stage]["reused"] for stage in ("train", "reevaluate")), "mlflow_run_id": outcome["mlflow_run_id"]}


# --- the flow (made on first access: it imports Prefect and the pipeline) ------------------------


def run_sweep(sweep: Sweep) -> dict[str, Any]:
    """Every grid point through re-evaluation (a ``cpt_pipeline`` subflow each), the law fitted
    over the calibration table, then the held-out point with ``trec.m: calibrated``."""
    from prefect import get_run_logger

    from flows.params import PipelineRun
    from flows.pipeline import cpt_pipeline, load_run
    from tasks.calibrate import run_calibrate
    from training.calibration import CalibrationError

    started = time.monotonic()
    recipe, points = load_sweep(sweep)  # bad input: a RecipeError before any work
    _, store = load_run(RecipeFiles(recipe_path=sweep.recipe_path, overlays=sweep.overlays, set=sweep.set))
    logger = get_run_logger()
    grid = points[:-1] if sweep.held_out is not None else points
    rows = []
    for position, point in enumerate(grid, start=1):
        logger.info("point tau %g, T %d (%d of %d)", point.tau, point.steps, position, len(grid))
        outcome = cpt_pipeline(PipelineRun(recipe_path=point.recipe_path, overlays=point.overlays, set=point.set, variant=SWEEP_VARIANT))
        rows.append(point_row(point, outcome))
    try:
        law = {"fitted": True, **run_calibrate(store, recipe.trec.p)}
    except CalibrationError as error:  # too few (or too alike) runs in the table: the points stay recorded
        law = {"fitted": False, "reason": str(error), "laws": {}}
        logger.warning("no law: %s", error)
    held_out = None
    if sweep.held_out is not None and law["fitted"]:
        point = points[-1]
        logger.info("held-out point tau %g, T %d with trec.m: calibrated", point.tau, point.steps)
        outcome = cpt_pipeline(PipelineRun(recipe_path=point.recipe_path, overlays=point.overlays, set=point.set, variant=SWEEP_VARIANT))
        configured = recipe.trec.m
        held_out = held_out_report(store, point, outcome, float(configured) if configured != "calibrated" else float("nan"))
    return {"recipe": recipe.name, "schedule": recipe.schedule.kind, "points": rows, "law": law, "held_out": held_out,
            "store": store.url, "seconds": round(time.monotonic() - started, 2)}


def sweep_run_name() -> str:
    """``<recipe>/sweep``: the name of a `calibration_sweep` flow run."""
    from prefect.runtime import flow_run

    from flows.pipeline import run_label

    return f"{run_label(flow_run.parameters.get('sweep', {}))[0]}/sweep"


_flows, __getattr__ = lazy_flows(__name__, {"calibration_sweep": (run_sweep, sweep_run_name)})


# --- the command ------------------------------------------------------------------------------


def sweep_text(result: dict[str, Any]) -> str:
    """The points, each law (coefficients, R^2 and rms error in log space) and the held-out point."""
    lines = [f"{result['recipe']}: {len(result['points'])} point(s), schedule {result['schedule']}, uniform variant", "",
             f"{'tau':>8} {'T':>7} {'seed':>5} {'m*':>6} {'r_p(m*)':>8} {'r_p(m)':>8}"]
    for row in result["points"]:
        lines.append(f"{row['tau']:>8g} {row['steps']:>7,} {row['seed']:>5} {row['m_fit']:>6.2f} {row['r_p_fit']:>8.3f} {row['r_p']:>8.3f}")
    lines.append("")
    if not result["law"]["fitted"]:
        lines.append(f"no law: {result['law']['reason']}" + ("; the held-out point was not run" if result["held_out"] is None else ""))
    for name, law in result["law"]["laws"].items():
        r2 = "n/a" if law.get("r2_log") is None else f"{law['r2_log']:.3f}"
        lines.append(f"law {name}: m* = {law['C']:.4g} * TPP^{law['mu1']:.4g} * tau^{law['mu2']:.4g} over {len(law['runs'])} runs; "
                     f"R^2 (log) {r2}, rms log error {law['rms_log_error']:.3f}" + (f"; {law['note']}" if law["note"] else ""))
    held = result["held_out"]
    if held is not None:
        lines += ["", f"held-out tau {held['tau']:g}, T {held['steps']:,}: r_p {held['r_p_calibrated']:.3f} at the calibrated m "
                      f"{held['calibrated_m']:.3f}; {held['r_p_best']:.3f} at its own best m {held['best_m']:g}; "
                      f"{held['r_p_configured']:.3f} at the configured m {held['configured_m']:g}"]
    return "\n".join(lines)


def sweep(
    recipe_path: Annotated[Path, typer.Argument(help="recipe YAML file", show_default=False)],
    tau: Annotated[list[float], typer.Option("--tau", help="a tau of the grid (repeatable)", show_default=False)],
    steps: Annotated[list[int], typer.Option("--steps", help="a T (steps) of the grid (repeatable)", show_default=False)],
    held_out: Annotated[Optional[str], typer.Option("--held-out", help="TAU:STEPS outside the grid, predicted with trec.m: calibrated")] = None,
    overlay: Annotated[Optional[list[Path]], typer.Option("--overlay", help="overlay YAML merged into the recipe (repeatable, in order)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="KEY.PATH=VALUE applied after the overlays (repeatable)")] = None,
    seed_per_point: Annotated[bool, typer.Option("--seed-per-point", help="point i trains on seed i (its own batches), not the recipe's seed")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
) -> None:
    """Calibration sweep: the uniform variant at every (tau, T) of a grid through re-evaluation
    (each recorded in the calibration table), the m* law fitted, and a held-out point predicted
    with it."""
    from flows.cli import check_sources, fail, run_stage_flow

    try:
        point = None if held_out is None else SweepPoint(recipe_path=str(recipe_path), tau=parse_point(held_out)[0], steps=parse_point(held_out)[1])
        spec = Sweep(recipe_path=str(recipe_path), overlays=[str(item) for item in overlay or ()], set=list(set_ or ()), taus=tau, steps=steps,
                     held_out=point, seed_per_point=seed_per_point)
        recipe, _ = load_sweep(spec)
    except ValueError as error:  # RecipeError, a held-out point out of range (pydantic)
        raise fail(str(error).splitlines()[0]) from None
    check_sources(recipe)
    result = run_stage_flow(__getattr__("calibration_sweep"), sweep=spec)
    typer.echo(json.dumps(result) if as_json else sweep_text(result))
