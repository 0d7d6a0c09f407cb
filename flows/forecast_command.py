"""``trecflow forecast``: a recipe's loss curve before training it, from the multi-power law
(`training.multipower`) fitted on curves of finished runs.

A plain Typer command function; the CLI registers it with ``app.command("forecast")(forecast)``.
A source (``--fit-on``, repeatable) is a CSV file with the columns ``step, lr, loss`` (one row per
step from step 0; an empty loss is a step without a logged loss), or a finished run: its MLflow
run id, or its run name in the recipe's experiment, read from the recipe's store through the run's
``trecflow.train_fingerprint`` tag (`training.loss_curves.read_curve`). Every source is read and
checked before the fit: bad input is one line naming the source (the file and line for a CSV),
exit 2. The forecast is of each schedule of `forecast_schedules` (today the recipe's own).
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import numpy as np
import typer

if TYPE_CHECKING:
    from trecflow.recipe import Recipe
    from training.loss_curves import LossCurve
    from training.multipower import Curve, FitResult, Forecast

CSV_COLUMNS = ("step", "lr", "loss")
RUN_ID = re.compile(r"[0-9a-f]{32}")
FINGERPRINT_TAG = "trecflow.train_fingerprint"


class SourceError(ValueError):
    """A ``--fit-on`` source that cannot be fitted; the message names it (one line)."""


@dataclass(frozen=True)
class Source:
    """A read source: what the user named, what it is, its curve and, for a run, its ids."""

    label: str  # as given on the command line
    kind: str  # "csv" or "run"
    curve: LossCurve
    run_id: str | None = None
    train_fingerprint: str | None = None

    def as_json(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"source": self.label, "kind": self.kind, "steps": int(self.curve.steps.size)}
        if self.kind == "run":
            entry |= {"run_id": self.run_id, "run_name": self.curve.name, "train_fingerprint": self.train_fingerprint}
        return entry


# --- reading sources --------------------------------------------------------------------------


def read_csv_curve(path: Path) -> LossCurve:
    """The curve of a CSV file with a header naming ``step, lr, loss`` (any order, other columns
    ignored) and one row per step from 0; a loss cell may be empty (no loss logged at that step).
    SourceError names the file and the line (as an editor counts it) of the first problem."""
    from training.loss_curves import LossCurve

    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            if header is None:
                raise SourceError(f"{path}: empty file; expected a header line naming the columns {', '.join(CSV_COLUMNS)}")
            names = [name.strip().lower() for name in header]
            missing = [column for column in CSV_COLUMNS if column not in names]
            if missing:
                raise SourceError(f"{path}:1: no column {', '.join(missing)} (the header names {', '.join(names) or 'nothing'}; "
                                  f"expected {', '.join(CSV_COLUMNS)})")
            where = [names.index(column) for column in CSV_COLUMNS]
            steps, lrs, losses = [], [], []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue
                line = reader.line_num
                if len(row) <= max(where):
                    raise SourceError(f"{path}:{line}: {len(row)} values; the header names {len(names)} columns")
                step, lr, loss = (row[index].strip() for index in where)
                step_value = _number(path, line, "step", step)
                if step_value != int(step_value):
                    raise SourceError(f"{path}:{line}: step {step!r} is not a whole number")
                expected = len(steps)
                if int(step_value) != expected:
                    raise SourceError(f"{path}:{line}: step {int(step_value)} where step {expected} was expected: one row per step from "
                                      f"step 0 is needed (the law sums the LR of every step; leave loss empty where none was logged)")
                lr_value = _number(path, line, "lr", lr)
                if lr_value < 0:
                    raise SourceError(f"{path}:{line}: lr {lr} is negative")
                loss_value = math.nan if loss == "" else _number(path, line, "loss", loss)
                if loss_value <= 0:
                    raise SourceError(f"{path}:{line}: loss {loss} is not positive (the law is fitted to the log of the loss)")
                steps.append(expected)
                lrs.append(lr_value)
                losses.append(loss_value)
    except OSError as error:
        raise SourceError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError as error:
        raise SourceError(f"{path}: not a UTF-8 text file ({error.reason} at byte {error.start})") from None
    except csv.Error as error:
        raise SourceError(f"{path}: not a CSV file ({error})") from None
    return LossCurve(name=path.name, steps=np.array(steps, dtype=np.int64), lrs=np.array(lrs), losses=np.array(losses))


def _number(path: Path, line: int, column: str, cell: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise SourceError(f"{path}:{line}: {column} {cell!r} is not a number")
    return value


def find_run(recipe: Recipe, source: str) -> Any | None:
    """The MLflow run ``source`` names: a run id, else the newest run of that name in the
    recipe's experiment, preferring one that trained (carries `FINGERPRINT_TAG`); None if none."""
    from trecflow.settings import tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return None  # no tracking database yet: no run (and none is created by asking)
    import mlflow
    from mlflow.exceptions import MlflowException

    from trecflow.tracking import TrackingError

    client = mlflow.MlflowClient(tracking_uri=uri)
    if RUN_ID.fullmatch(source):
        try:
            return client.get_run(source)
        except MlflowException:
            pass  # not a run id after all: perhaps a run name
    try:
        experiment = client.get_experiment_by_name(recipe.name)
        if experiment is None:
            return None
        quote = '"' if "'" in source else "'"
        runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = {quote}{source}{quote}",
                                  order_by=["attributes.start_time DESC"], max_results=100)
    except MlflowException as error:
        raise TrackingError(f"--fit-on {source}: MLflow at {uri}: {error.message}") from None
    trained = [run for run in runs if FINGERPRINT_TAG in run.data.tags]
    return (trained or runs or [None])[0]


def read_run_curve(recipe: Recipe, source: str, run: Any) -> Source:
    """The curve of a finished run, from the recipe's store, through the run's training fingerprint."""
    from flows.cli import recipe_store
    from training.loss_curves import read_curve

    fingerprint = run.data.tags.get(FINGERPRINT_TAG)
    label = f"run {run.info.run_name or source} ({run.info.run_id})"
    if not fingerprint:
        raise SourceError(f"--fit-on {source}: {label} has no {FINGERPRINT_TAG} tag: it has not trained")
    store = recipe_store(recipe)
    curve = read_curve(store, fingerprint, name=run.info.run_name or source)
    if curve.steps.size == 0:
        raise SourceError(f"--fit-on {source}: {label} trained output {fingerprint} has no training audit in the store {store.url}")
    return Source(source, "run", curve, run.info.run_id, fingerprint)


def read_source(recipe: Recipe, source: str) -> Source:
    """A CSV file if ``source`` is one, else a run; SourceError names it when it is neither."""
    path = Path(source)
    if path.is_file():
        return Source(source, "csv", read_csv_curve(path))
    run = find_run(recipe, source)
    if run is None:
        raise SourceError(f"--fit-on {source}: neither a file nor an MLflow run id or run name of the experiment {recipe.name!r}")
    return read_run_curve(recipe, source, run)


def fit_curve(source: Source) -> Curve:
    """The source's curve as the fit takes it (every step's LR, the logged finite losses); it must
    have `MIN_POINTS` losses after its warmup."""
    from training.multipower import MIN_POINTS, Curve, fit_points

    curve = source.curve
    where = source.label if source.kind == "csv" else f"--fit-on {source.label}"
    if not np.array_equal(curve.steps, np.arange(curve.steps.size)):
        raise SourceError(f"{where}: the curve misses steps (its steps are not 0..{curve.steps.size - 1})")
    if not np.any(curve.lrs > 0):
        raise SourceError(f"{where}: every LR is 0")
    logged = np.isfinite(curve.losses) & (curve.losses > 0)
    if not np.all(logged | np.isnan(curve.losses)):
        raise SourceError(f"{where}: a loss is not positive (the law is fitted to the log of the loss)")
    fitted = Curve(curve.name, curve.lrs, curve.steps[logged], curve.losses[logged])
    points = fit_points(fitted)[0].size
    if points < MIN_POINTS:
        raise SourceError(f"{where}: {points} logged losses after the warmup; the fit needs at least {MIN_POINTS}")
    return fitted


# --- what is forecast -------------------------------------------------------------------------


def forecast_schedules(recipe: Recipe) -> list[tuple[str, np.ndarray]]:
    """The (name, LRs) schedules to forecast: the recipe's own (variants carry no schedule yet)."""
    from training.schedules import LRSchedule

    return [(recipe.name, LRSchedule.from_recipe(recipe).lrs())]


def extrapolation_warnings(curves: list[Curve], schedules: list[tuple[str, np.ndarray]]) -> list[str]:
    """Where a forecast leaves what the fitted curves cover: a peak LR outside their peaks, more steps."""
    peaks = [float(np.max(curve.lrs)) for curve in curves]
    longest = max(curve.lrs.size for curve in curves)
    warnings = []
    for name, lrs in schedules:
        peak = float(np.max(lrs))
        if not min(peaks) * (1 - 1e-9) <= peak <= max(peaks) * (1 + 1e-9):
            warnings.append(f"{name}: peak LR {peak:g} is outside the fitted curves' peaks ({min(peaks):g} to {max(peaks):g}): "
                            f"the law extrapolates in LR")
        if lrs.size > longest:
            warnings.append(f"{name}: {lrs.size:,} steps, longer than the longest fitted curve ({longest:,}): the law extrapolates in time")
        lowest = min(float(np.min(curve.lrs[np.argmax(curve.lrs):])) / float(np.max(curve.lrs)) for curve in curves)
        end = float(lrs[-1]) / peak
        if end < lowest * (1 - 1e-9):
            warnings.append(f"{name}: its LR falls to {end:.3g} x peak, below any fitted curve's ({lowest:.3g} x peak): the decay "
                            f"term extrapolates to LRs it never saw and the forecast can be far off; fit on a curve that decays as far")
    return warnings


# --- output -----------------------------------------------------------------------------------


def summary(recipe: Recipe, sources: list[Source], fitted: FitResult, forecasts: list[Forecast], warnings: list[str],
            decay_identified: bool) -> dict[str, Any]:
    """The JSON object ``--json`` prints: the recipe's final loss, the law's parameters, the fit's
    quality per source and every forecast curve."""
    main = forecasts[0]
    fits = []
    for source, quality in zip(sources, fitted.curves, strict=True):
        fits.append(source.as_json() | {"points": quality.points, "rmse_log_loss": quality.rmse_log, "last_step": quality.last_step,
                                        "last_loss": quality.last_loss, "last_law": quality.last_fitted})
    return {
        "recipe": recipe.name,
        "steps": main.total_steps,
        "final_loss": main.final_loss,
        **fitted.params.as_dict(),
        "fit": {"rmse_log_loss": fitted.rmse_log, "points": fitted.points, "evaluations": fitted.evaluations,
                "converged": fitted.converged, "decay_identified": decay_identified, "sources": fits},
        "forecasts": [{"name": item.name, "steps": item.total_steps, "final_loss": item.final_loss,
                       "curve": {"step": item.steps.tolist(), "loss": item.losses.tolist()}} for item in forecasts],
        "warnings": warnings,
    }


def summary_text(result: dict[str, Any], recipe: Recipe) -> str:
    """The summary as aligned rows: the forecasts, what the law was fitted on, the parameters."""
    from trecflow.report import aligned

    schedule = recipe.schedule
    rows = [("recipe", f"{recipe.name}: {result['steps']:,} steps, {schedule.kind} schedule, peak LR {recipe.optimizer.peak_lr:g}, "
                       f"warmup {schedule.warmup:g}")]
    for item in result["forecasts"]:
        steps, losses = item["curve"]["step"], item["curve"]["loss"]
        marks = ", ".join(f"{fraction:.0%} {np.interp(fraction * (item['steps'] - 1), steps, losses):.4f}" for fraction in (0.25, 0.5, 0.75))
        rows.append((f"forecast {item['name']}", f"final loss {item['final_loss']:.4f} (after step {item['steps'] - 1:,}); {marks}"))
    fit = result["fit"]
    rows.append(("fitted on", f"{len(fit['sources'])} curve{'s' if len(fit['sources']) != 1 else ''}, {fit['points']:,} points, "
                              f"rmse of log loss {fit['rmse_log_loss']:.2g}{'' if fit['converged'] else ' (stopped before converging)'}"))
    for entry in fit["sources"]:
        what = "CSV" if entry["kind"] == "csv" else f"run {entry['run_name']} ({entry['run_id'][:8]}, train {entry['train_fingerprint'][:12]})"
        rows.append((f"  {entry['source']}", f"{what}: {entry['steps']:,} steps, {entry['points']} points, rmse {entry['rmse_log_loss']:.2g}; "
                                             f"step {entry['last_step']:,}: loss {entry['last_loss']:.4f}, law {entry['last_law']:.4f}"))
    law = ", ".join(f"{name} {result[name]:.4g}" for name in ("L0", "A", "alpha", "B", "C", "beta", "gamma"))
    rows.append(("law", f"{law} (not individually identifiable: compare forecasts, not parameters)"))
    return aligned(rows)


def plot_forecast(curves: list[Curve], fitted: FitResult, forecasts: list[Forecast], schedules: list[tuple[str, np.ndarray]], title: str) -> bytes:
    """PNG bytes: the fitted curves (data and law) above, the forecast curves with their LRs below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.multipower import fit_points, multipower_loss
    from training.trec_plot import MAX_PLOT_POINTS, png_bytes

    figure, (fit_axis, forecast_axis) = plt.subplots(2, 1, figsize=(9, 8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, curve in enumerate(curves):
        color = colors[index % len(colors)]
        steps = fit_points(curve)[0]
        shown = curve.steps >= steps[0]  # the fitted range: the law does not describe the warmup
        stride = max(1, int(shown.sum()) // MAX_PLOT_POINTS)
        fit_axis.plot(curve.steps[shown][::stride], curve.losses[shown][::stride], color=color, alpha=0.3, linewidth=0.8)
        fit_axis.plot(steps, multipower_loss(fitted.params, curve.lrs, steps), color=color, linewidth=1.5, label=f"{curve.name}: law")
    fit_axis.set_title(f"fit: data (light) and law, rmse of log loss {fitted.rmse_log:.2g}", fontsize=10)
    fit_axis.set_xlabel("step")
    fit_axis.set_ylabel("training loss")
    fit_axis.legend(loc="best", fontsize=8)
    fit_axis.grid(alpha=0.3)
    lr_axis = forecast_axis.twinx()
    for index, (item, (_, lrs)) in enumerate(zip(forecasts, schedules, strict=True)):
        color = colors[index % len(colors)]
        forecast_axis.plot(item.steps, item.losses, color=color, linewidth=1.5, label=f"{item.name}: final {item.final_loss:.4f}")
        stride = max(1, lrs.size // MAX_PLOT_POINTS)
        lr_axis.plot(np.arange(lrs.size)[::stride], lrs[::stride], color=color, linestyle=":", linewidth=1.0)
    forecast_axis.set_title("forecast (dotted: learning rate, right axis)", fontsize=10)
    forecast_axis.set_xlabel("step")
    forecast_axis.set_ylabel("forecast loss")
    lr_axis.set_ylabel("learning rate")
    forecast_axis.legend(loc="upper right", fontsize=8)
    forecast_axis.grid(alpha=0.3)
    figure.suptitle(title)
    return png_bytes(figure)


# --- the command ------------------------------------------------------------------------------


def forecast(
    recipe_path: RecipeArg,
    fit_on: Annotated[list[str], typer.Option("--fit-on", help="a finished run (MLflow run id or run name) or a CSV file of step, lr, loss "
                                                              "(repeatable; at least two different schedules identify the decay term)",
                                              show_default=False)],
    overlay: OverlayOpt = None,
    set_: SetOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="write the fit and forecast plot (PNG) here")] = None,
) -> None:
    """Forecast the recipe's training loss curve and final loss before training it: the
    multi-power law (arXiv 2503.12811) fitted on the loss curves of finished runs or CSV files."""
    from flows.cli import RecipeFile, fail, load_or_exit, read_store
    from training import multipower
    from trecflow.tracking import TrackingError

    recipe = load_or_exit(RecipeFile.of(recipe_path, overlay, set_))
    if plot is not None and not plot.parent.is_dir():
        raise fail(f"--plot: the folder {plot.parent} does not exist")
    schedules = forecast_schedules(recipe)
    try:  # read_store: a SourceError (a ValueError) is exit 2, a store that cannot be read exit 1
        sources = [read_store(lambda source=source: read_source(recipe, source)) for source in fit_on]
    except TrackingError as error:
        raise fail(str(error), code=1) from None
    try:
        curves = [fit_curve(source) for source in sources]
    except SourceError as error:
        raise fail(str(error)) from None
    unidentified = multipower.identification_warning(curves)
    warnings = [warning for warning in (unidentified, multipower.decay_shape_warning(curves)) if warning]
    warnings += extrapolation_warnings(curves, schedules)
    fitted = multipower.fit(curves)
    if not fitted.converged:
        warnings.append(f"the fit stopped after {fitted.evaluations} evaluations before converging")
    forecasts = [multipower.forecast(fitted, lrs, name) for name, lrs in schedules]
    for warning in warnings:
        typer.echo(f"warning: {warning}", err=True)
    result = summary(recipe, sources, fitted, forecasts, warnings, decay_identified=unidentified is None)
    if plot is not None:
        try:
            plot.write_bytes(plot_forecast(curves, fitted, forecasts, schedules, title=f"{recipe.name}: multi-power law forecast"))
        except OSError as error:
            raise fail(f"--plot: cannot write {plot} ({error.strerror})") from None
    typer.echo(json.dumps(result) if as_json else summary_text(result, recipe))


# The recipe options every recipe command takes (resolved when the CLI builds the command:
# `flows.cli` imports this module at its end, so these names cannot come first).
from flows.cli import OverlayOpt, RecipeArg, SetOpt  # noqa: E402
