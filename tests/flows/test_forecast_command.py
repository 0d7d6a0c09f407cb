"""``trecflow forecast`` (flows/forecast_command.py) through Typer's CliRunner on an app that
registers the command as flows/cli.py does: CSV and MLflow run sources, JSON, text and plot
output, and bad input as one line naming the file, line or source, exit code 2."""

from __future__ import annotations

import csv
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from flows.forecast_command import FINGERPRINT_TAG, forecast
from training import multipower as mp
from training.audit import AuditWriter
from training.schedules import LRSchedule
from trecflow.recipe import ScheduleSection, load_recipe

PAPER_400M = mp.LawParams(L0=2.375, A=0.654, alpha=0.429, B=523.4, C=2.025, beta=0.594, gamma=0.635)
STEPS = 3000  # the recipe's: 6.144e8 tokens in batches of 204,800
RECIPE = """\
name: forecast-test
model: {params: 1.0e8}
data: {tokens: 6.144e8, seq_len: 1024}
batch: {tokens: 204800}
optimizer: {peak_lr: 3.0e-4, weight_decay: 0.1}
schedule: {kind: wsd, warmup: 0.05, cooldown: 0.2}
store: {url: STORE}
"""
CONSTANT = {"kind": "constant", "warmup": 0.05}
COSINE = {"kind": "cosine", "warmup": 0.05, "final_lr_ratio": 0.1}
TWO_STAGE = {"kind": "step", "warmup": 0.05, "drop_at": 0.6, "drop_factor": 0.3}


def cli() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command is called by name as in `trecflow forecast`
    app.command("forecast")(forecast)
    return app


def run(*args: str):
    return CliRunner().invoke(cli(), ["forecast", *args])


def law_lrs(section: dict, steps: int = STEPS) -> np.ndarray:
    return LRSchedule(ScheduleSection(**section), peak_lr=3e-4, steps=steps).lrs()


def write_csv(path: Path, section: dict, rows: int = STEPS) -> Path:
    lrs = law_lrs(section, rows)
    losses = mp.multipower_loss(PAPER_400M, lrs, np.arange(rows))
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "lr", "loss"])
        writer.writerows((step, repr(float(lrs[step])), repr(float(losses[step]))) for step in range(rows))
    return path


@pytest.fixture
def recipe_file(tmp_path) -> Path:
    path = tmp_path / "forecast-test.yaml"
    path.write_text(RECIPE.replace("STORE", str(tmp_path / "store")))
    return path


@pytest.fixture
def truth(recipe_file) -> float:
    """The law's final loss of the recipe's own schedule (WSD, held out from every fit here)."""
    return float(mp.multipower_loss(PAPER_400M, LRSchedule.from_recipe(load_recipe(recipe_file)).lrs(), [STEPS - 1])[0])


def test_csv_sources_forecast_the_recipe_with_json_text_and_plot(tmp_path, recipe_file, truth):
    two_stage, cosine = write_csv(tmp_path / "two-stage.csv", TWO_STAGE), write_csv(tmp_path / "cosine.csv", COSINE)
    plot = tmp_path / "forecast.png"
    result = run(str(recipe_file), "--fit-on", str(two_stage), "--fit-on", str(cosine), "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    # two decaying schedules, the recipe's peak and length: only that WSD decays to 0, below both fitted curves' 0.1
    (warning,) = result.stderr.splitlines()
    assert warning.startswith("warning: forecast-test: its LR falls to 0 x peak, below any fitted curve's (0.1 x peak)")
    summary = json.loads(result.stdout)
    assert abs(summary["final_loss"] - truth) < 0.01
    assert set(mp.PARAM_NAMES) <= summary.keys() and all(summary[name] > 0 for name in mp.PARAM_NAMES)
    fit = summary["fit"]
    assert fit["rmse_log_loss"] < 1e-3 and fit["converged"] and fit["decay_identified"]
    assert fit["points"] == sum(source["points"] for source in fit["sources"])
    assert [(source["source"], source["kind"], source["steps"]) for source in fit["sources"]] == [(str(two_stage), "csv", STEPS), (str(cosine), "csv", STEPS)]
    (only,) = summary["forecasts"]
    assert only["name"] == "forecast-test" and only["steps"] == STEPS and only["final_loss"] == summary["final_loss"]
    assert only["curve"]["step"][-1] == STEPS - 1 and only["curve"]["loss"][-1] == summary["final_loss"]
    assert plot.read_bytes().startswith(b"\x89PNG") and plot.stat().st_size > 20_000

    text = run(str(recipe_file), "--fit-on", str(two_stage), "--fit-on", str(cosine))
    assert text.exit_code == 0, text.output
    rows = dict(line.split(None, 1) if not line.startswith(" ") else (line.split()[0], line) for line in text.stdout.splitlines())
    assert f"final loss {summary['final_loss']:.4f} (after step 2,999)" in text.stdout
    assert rows["law"].startswith(f"L0 {summary['L0']:.4g}, A {summary['A']:.4g}")
    assert "2 curves" in text.stdout and "cosine.csv" in text.stdout


def test_one_schedule_is_fitted_with_a_warning(tmp_path, recipe_file, truth):
    cosine = write_csv(tmp_path / "cosine.csv", COSINE, rows=2000)
    result = run(str(recipe_file), "--fit-on", str(cosine), "--fit-on", str(cosine), "--json")
    assert result.exit_code == 0, result.output
    warnings = result.stderr.splitlines()
    assert warnings[0].startswith("warning: all fitted curves share one LR schedule: B, C, beta, gamma")
    assert "3,000 steps, longer than the longest fitted curve (2,000)" in warnings[1]
    summary = json.loads(result.stdout)
    assert summary["warnings"] == [line.removeprefix("warning: ") for line in warnings] and not summary["fit"]["decay_identified"]


def bad_csv(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


ROWS = "".join(f"{step},0.0003,{3.0 - step * 0.01}\n" for step in range(20))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("step,lr\n0,0.0003\n", "{path}:1: no column loss (the header names step, lr; expected step, lr, loss)"),
        ("step,lr,loss\n" + ROWS.replace("3,0.0003", "3,fast", 1), "{path}:5: lr 'fast' is not a number"),
        ("step,lr,loss\n" + ROWS.replace("2.96", "-2.96"), "{path}:6: loss -2.96 is not positive (the law is fitted to the log of the loss)"),
        ("step,lr,loss\n" + ROWS[: ROWS.index("9,")], "{path}: 9 logged losses after the warmup; the fit needs at least 10"),
        ("step,lr,loss\n" + ROWS.replace("7,0.0003", "8,0.0003"), "{path}:9: step 8 where step 7 was expected"),
        ("", "{path}: empty file; expected a header line naming the columns step, lr, loss"),
    ],
    ids=["missing-column", "not-a-number", "non-positive-loss", "too-few-rows", "missing-step", "empty"],
)
def test_bad_csv_is_one_line_naming_file_and_line(tmp_path, recipe_file, text, message):
    path = bad_csv(tmp_path, "bad.csv", text)
    good = write_csv(tmp_path / "good.csv", CONSTANT, rows=200)
    result = run(str(recipe_file), "--fit-on", str(good), "--fit-on", str(path))
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: " + message.format(path=path)), line
    assert result.stdout == ""


def test_unknown_source_is_one_line_and_creates_no_tracking_database(tmp_path, recipe_file, mlflow_uri):
    result = run(str(recipe_file), "--fit-on", "no-such-run")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["error: --fit-on no-such-run: neither a file nor an MLflow run id or run name of the experiment 'forecast-test'"]
    assert not Path(mlflow_uri.removeprefix("sqlite:///")).exists()


def trained_run(tracker, recipe, store, name: str, section: dict, steps: int, fingerprint: str) -> str:
    """A run as stage 4 leaves it: the audit log of a training output in the store, and an MLflow
    run of the recipe's experiment tagged with that output's fingerprint."""
    from training.loss_curves import RUN_FILE, TRAIN_STAGE, run_descriptor

    lrs = law_lrs(section, steps)
    losses = mp.multipower_loss(PAPER_400M, lrs, np.arange(steps))
    output = store.output(TRAIN_STAGE, fingerprint)
    writer = AuditWriter.next_attempt(store, output.path)
    for step in range(steps):
        writer.record(step, f"hash-{step}", float(lrs[step]), float(losses[step]), tokens=204800, seconds=0.1)
    output.write_bytes(RUN_FILE, json.dumps(run_descriptor(recipe, name)).encode())
    output.commit()
    return tracker.start_run(recipe, name, tags={FINGERPRINT_TAG: fingerprint, "trecflow.variant": name}, with_params=False)


def test_run_sources_resolve_through_mlflow_to_the_store(recipe_file):
    """On the session's MLflow database (its tables made once per session), in an experiment of
    this test's own."""
    from flows.cli import recipe_store
    from trecflow.tracking import Tracker

    sets = ["data.tokens=2.048e8", f"name=forecast-{uuid.uuid4().hex[:8]}"]  # 1,000 steps, as long as the runs
    recipe = load_recipe(recipe_file, sets=sets)
    truth = float(mp.multipower_loss(PAPER_400M, LRSchedule.from_recipe(recipe).lrs(), [recipe.steps - 1])[0])
    store = recipe_store(recipe)
    tracker = Tracker(store)
    trained_run(tracker, recipe, store, "flat", CONSTANT, recipe.steps, "a" * 16)
    cosine_id = trained_run(tracker, recipe, store, "decayed", COSINE, recipe.steps, "b" * 16)
    untrained_id = tracker.start_run(recipe, "untrained", tags={}, with_params=False)

    result = run(str(recipe_file), "--set", sets[0], "--set", sets[1], "--fit-on", "flat", "--fit-on", cosine_id, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    flat, decayed = summary["fit"]["sources"]
    assert (flat["source"], flat["kind"], flat["run_name"], flat["train_fingerprint"], flat["steps"]) == ("flat", "run", "flat", "a" * 16, 1000)
    assert (decayed["source"], decayed["run_id"], decayed["run_name"], decayed["train_fingerprint"]) == (cosine_id, cosine_id, "decayed", "b" * 16)
    assert summary["steps"] == 1000 and abs(summary["final_loss"] - truth) < 0.01
    assert summary["fit"]["decay_identified"]
    caveat, lowest = summary["warnings"]  # a constant and one decay: the decay's shape rests on one curve
    assert lowest.endswith(": its LR falls to 0 x peak, below any fitted curve's (0.1 x peak): the decay term extrapolates to LRs it "
                           "never saw and the forecast can be far off; fit on a curve that decays as far")
    assert caveat.startswith("only one fitted schedule decays its LR (decayed): the shape of the decay term")

    untrained = run(str(recipe_file), "--set", sets[1], "--fit-on", "flat", "--fit-on", "untrained")
    assert untrained.exit_code == 2
    assert untrained.stderr.splitlines() == [f"error: --fit-on untrained: run untrained ({untrained_id}) has no {FINGERPRINT_TAG} tag: it has not trained"]
