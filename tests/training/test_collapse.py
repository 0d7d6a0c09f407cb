"""The collapse monitor: on constructed loss curves (a power law with per-run differences and
per-step noise), normal runs of a family are never flagged, an LR-spike-like bump and a burst of
bad batches are flagged within a bounded number of steps, the final loss is estimated from 20% and
50% of a curve; and one real training run with an injected LR fault is stopped by it."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from training.collapse import (
    CollapseMonitor,
    FamilyCurve,
    estimate_final_loss,
    families,
    first_drift_step,
    fit_family,
    leave_one_out,
    measure,
    same_family,
    track,
    trailing_mean,
    window_steps,
)

STEPS = 1000
NOISE = 0.02  # per-step loss noise, relative (small batches)
FAULT_AT = 500
SMOOTHING, PATIENCE, THRESHOLD = 0.02, 0.01, 5.0  # the recipe's defaults
WINDOW, PATIENCE_STEPS = window_steps(SMOOTHING, STEPS), window_steps(PATIENCE, STEPS)  # 20 and 10 steps


def constructed_curve(rng: np.random.Generator, steps: int = STEPS, fault: str | None = None) -> np.ndarray:
    """L = E + A (s/20 + 1)^-alpha with E, A and alpha a few % apart between runs (their final
    losses differ), times 1 + 2% noise per step; ``spike``: a +10% bump at `FAULT_AT` decaying over
    50 steps (what an LR spike does); ``burst``: +5% for 40 steps from `FAULT_AT` (bad batches)."""
    step = np.arange(steps, dtype=np.float64)
    scale, floor, alpha = 3.0 * (1 + 0.03 * rng.standard_normal()), 2.0 * (1 + 0.02 * rng.standard_normal()), 0.5 * (1 + 0.03 * rng.standard_normal())
    loss = floor + scale * (step / 20 + 1) ** -alpha
    since = step - FAULT_AT
    if fault == "spike":
        loss *= 1 + np.where(since >= 0, 0.10 * np.exp(-np.maximum(since, 0) / 50), 0.0)
    elif fault == "burst":
        loss *= 1 + np.where((since >= 0) & (since < 40), 0.05, 0.0)
    return loss * (1 + NOISE * rng.standard_normal(steps))


def family_of(seed: int, runs: int = 6) -> tuple[FamilyCurve, np.random.Generator]:
    rng = np.random.default_rng(seed)
    curves = {f"run-{number}": constructed_curve(rng) for number in range(runs)}
    return fit_family(curves, smoothing=SMOOTHING, lag=SMOOTHING + PATIENCE), rng


def monitored(family: FamilyCurve, losses: np.ndarray) -> CollapseMonitor:
    """The online monitor fed the whole curve, step by step (as the training loop does)."""
    monitor = CollapseMonitor(family, losses.size, THRESHOLD, PATIENCE)
    for step, loss in enumerate(losses):
        monitor.update(step, float(loss))
    return monitor


FAMILY_SEEDS = (1, 2, 3, 4, 5)


def test_normal_runs_of_a_family_are_never_flagged():
    for seed in FAMILY_SEEDS:
        family, rng = family_of(seed)
        for _ in range(6):
            monitor = monitored(family, constructed_curve(rng))
            assert monitor.first_drift is None, (seed, monitor.first_drift)
    # the family's own runs, each against the others, are not flagged either
    rng = np.random.default_rng(7)
    checks = leave_one_out({f"run-{number}": constructed_curve(rng) for number in range(6)}, threshold=THRESHOLD, patience=PATIENCE,
                           smoothing=SMOOTHING, lag=SMOOTHING + PATIENCE)
    assert [check.first_drift for check in checks] == [None] * 6
    assert all(0.5 < check.max_score < THRESHOLD for check in checks)


@pytest.mark.parametrize("fault", ["spike", "burst"])
def test_a_fault_mid_run_is_flagged_within_the_smoothing_window_plus_patience(fault):
    """A fault that moves the loss well past the threshold shows in the trailing mean within
    `WINDOW` steps, then needs `PATIENCE_STEPS` steps in a row: flagged within 30 steps."""
    for seed in FAMILY_SEEDS:
        family, rng = family_of(seed)
        losses = constructed_curve(rng, fault=fault)
        drift = monitored(family, losses).first_drift
        assert drift is not None, seed
        assert FAULT_AT <= drift.step < FAULT_AT + WINDOW + PATIENCE_STEPS, (seed, drift)
        assert drift.residual > drift.threshold > 0  # the loss went up
        # the level L^(T) the residual is taken against has not absorbed the fault (the lag)
        assert drift.final_loss == pytest.approx(estimate_final_loss(family, losses[:FAULT_AT], STEPS), rel=0.002)


def test_the_final_loss_is_estimated_from_20_and_50_percent_of_a_curve():
    errors = {0.2: [], 0.5: []}
    for seed in FAMILY_SEEDS:
        family, rng = family_of(seed)
        for _ in range(10):
            losses = constructed_curve(rng)
            final = trailing_mean(losses, WINDOW)[-1]  # the smoothed final loss the normalization uses
            for fraction in errors:
                errors[fraction].append(estimate_final_loss(family, losses[: round(fraction * STEPS)], STEPS) / final - 1)
    worst = {fraction: np.abs(values).max() for fraction, values in errors.items()}
    typical = {fraction: np.median(np.abs(values)) for fraction, values in errors.items()}
    assert worst[0.2] < 0.04 and worst[0.5] < 0.025, worst
    assert typical[0.2] < 0.012 and typical[0.5] < 0.008, typical


def test_the_online_monitor_gives_the_whole_curve_residuals_in_constant_work_per_step():
    family, rng = family_of(11)
    losses = constructed_curve(rng, fault="spike")
    expected = track(family, losses, STEPS)
    monitor = CollapseMonitor(family, STEPS, THRESHOLD, PATIENCE)
    readings = [monitor.update(step, float(loss)) for step, loss in enumerate(losses)]
    residuals = np.array([np.nan if reading.residual is None else reading.residual for reading in readings])
    assert np.array_equal(np.isnan(residuals), np.isnan(expected.residual))
    assert np.nanmax(np.abs(residuals - expected.residual)) < 1e-9
    assert readings[0].state == "waiting" and readings[100].state == "ok"
    exceeded = np.abs(expected.residual) > THRESHOLD * expected.spread
    assert monitor.first_drift.step == first_drift_step(exceeded, PATIENCE_STEPS)
    # what the monitor holds is bounded by the window and the lag, however long the run
    long_run = CollapseMonitor(family, 24_000, THRESHOLD, PATIENCE)
    window, lag = window_steps(SMOOTHING, 24_000), window_steps(SMOOTHING + PATIENCE, 24_000)
    for step, loss in enumerate(np.interp(np.arange(24_000) / 24_000, np.arange(STEPS) / STEPS, losses)):
        long_run.update(step, float(loss))
        assert len(long_run._window) <= window and len(long_run._pending) <= lag
    with pytest.raises(ValueError, match="step 5 fed after step 23999"):
        long_run.update(5, 3.0)


def test_a_loss_that_is_not_finite_is_a_drift_after_patience():
    family, rng = family_of(12)
    losses = constructed_curve(rng)
    monitor = CollapseMonitor(family, STEPS, THRESHOLD, PATIENCE)
    for step in range(600):
        monitor.update(step, float(losses[step]))
    readings = [monitor.update(step, math.nan) for step in range(600, 600 + PATIENCE_STEPS)]
    assert all(reading.residual == math.inf for reading in readings)
    assert [reading.drift for reading in readings] == [False] * (PATIENCE_STEPS - 1) + [True]


def test_the_family_curve_travels_as_json_and_needs_two_good_runs():
    family, _ = family_of(13)
    again = FamilyCurve.from_json(json.loads(json.dumps(family.as_json())))
    assert again.runs == 6 and again.members == family.members and np.array_equal(again.spread, family.spread)
    assert np.all(family.spread >= family.min_spread) and family.mean_log[-1] == pytest.approx(0.0, abs=1e-3)
    # l(t^) falls to 1 at the end: the early normalized loss is above it
    assert family.at(family.mean_log, 0.1) > family.at(family.mean_log, 0.5) > 0
    with pytest.raises(ValueError, match="at least 2 runs, got 1"):
        fit_family({"one": np.ones(100)})
    with pytest.raises(ValueError, match="run bad: a family member needs at least 2 finite losses > 0"):
        fit_family({"good": np.ones(100), "bad": np.array([1.0, math.nan, 1.0])})


def test_a_family_shares_schedule_shape_variant_tpp_and_tau_but_not_steps():
    schedule = {"kind": "linear", "warmup": 0.1, "final_lr_ratio": 0.0, "drop_at": 0.7, "timescale": 1000.0}
    run = {"schedule": schedule, "variant": "uniform", "tpp": 20.0, "tau": 0.30, "steps": 1000}
    assert same_family(run, {**run, "steps": 4000, "tpp": 20.9, "tau": 0.29})
    assert same_family(run, {**run, "schedule": {**schedule, "drop_at": 0.5}})  # a key linear does not use
    assert not same_family(run, {**run, "tpp": 22.0})
    assert not same_family(run, {**run, "tau": 0.33})
    assert not same_family(run, {**run, "variant": "end"})
    assert not same_family(run, {**run, "schedule": {**schedule, "final_lr_ratio": 0.1}})
    assert not same_family(run, {**run, "schedule": {**schedule, "kind": "cosine"}})


def test_the_measurement_groups_runs_into_families_and_times_the_faults():
    rng = np.random.default_rng(21)
    schedule = {"kind": "linear", "warmup": 0.05, "final_lr_ratio": 0.0}
    descriptors = {f"run-{number}": {"schedule": schedule, "variant": "uniform", "tpp": 20.0, "tau": 0.3} for number in range(5)}
    descriptors["other"] = {"schedule": {**schedule, "kind": "cosine"}, "variant": "uniform", "tpp": 20.0, "tau": 0.3}
    assert families(descriptors) == [[f"run-{number}" for number in range(5)], ["other"]]
    report = measure({f"run-{number}": constructed_curve(rng) for number in range(5)},
                     {"spike": (constructed_curve(rng, fault="spike"), FAULT_AT), "burst": (constructed_curve(rng, fault="burst"), FAULT_AT)},
                     threshold=THRESHOLD, patience=PATIENCE, smoothing=SMOOTHING, lag=SMOOTHING + PATIENCE)
    assert report["runs"] == 5 and report["false_drifts"] == 0
    assert report["estimate_error"][0.2]["max"] < 0.04 and report["estimate_error"][0.5]["max"] < 0.025
    for found in report["faults"].values():
        assert 0 <= found["delay"] < WINDOW + PATIENCE_STEPS


def test_the_monitor_settings_change_no_fingerprint_and_a_bad_fault_is_one_line():
    from tasks.train import train_fingerprint
    from training.cpt_job import FAULT_ENV, injected_lr_fault
    from trecflow.recipe import RecipeError, load_recipe, parse_recipe

    from ..conftest import CONFIGS, environment

    recipe = load_recipe(CONFIGS / "test.yaml")
    watched = parse_recipe({**recipe.model_dump(mode="json"), "collapse": {"threshold": 3, "patience": 0.05, "stop": True, "min_runs": 5}})
    assert train_fingerprint(watched, "place", "base") == train_fingerprint(recipe, "place", "base")
    with environment({FAULT_ENV: "24:3:30"}):
        assert injected_lr_fault(recipe.steps) == {"first": 24, "steps": 3, "factor": 30.0}
        faulty = train_fingerprint(recipe, "place", "base")
    assert faulty != train_fingerprint(recipe, "place", "base")
    for value, problem in (("24:3", "is not <first step>:<steps>:<factor>"), ("a:3:30", "is not <first step>"),
                           ("24:0:30", "the steps > 0"), ("46:3:30", "steps 46..48 are not all inside this run's 48 steps")):
        with environment({FAULT_ENV: value}), pytest.raises(RecipeError, match=f"^{FAULT_ENV}: '{value}'.*{re.escape(problem)}"):
            train_fingerprint(recipe, "place", "base")


def test_a_resumed_run_replays_its_audit_log_and_the_driver_warns_once(tmp_path):
    """Rank 0's watch on a resumed attempt has the state an uninterrupted run would have (it
    replays the audit log), writes the event once, and the driver turns it into one warning and,
    for a stopped run, the one-line error."""
    from tasks.train import CollapseEvents, collapse_event, collapse_stopped
    from training.audit import AuditWriter
    from training.cpt_job import JobSpec, _CollapseWatch, _earlier_losses, _MetricBuffer
    from trecflow.recipe import load_recipe
    from trecflow.store import Store

    from ..conftest import CONFIGS

    family, rng = family_of(14)
    losses = constructed_curve(rng, fault="spike")
    store = Store(str(tmp_path / "store"))
    output = store.output("train", "run")
    spec = JobSpec(recipe=load_recipe(CONFIGS / "test.yaml").model_dump(mode="json"), store_url=store.url, endpoint_url=None,
                   index_fingerprint="index", index_inputs={}, tokenizer_fingerprint="tokenizer", output_path=output.path,
                   run_fingerprint="run", collapse={"family": family.as_json(), "threshold": THRESHOLD, "patience": PATIENCE, "stop": True})
    first = AuditWriter.next_attempt(store, output.path)
    for step in range(300):  # attempt 1 ran to step 299 (its checkpoint: step 240)
        first.record(step, "hash", 1e-3, float(losses[step]), 512, 0.1)
    earlier = _earlier_losses(store, output.path, 240)
    assert earlier == [float(loss) for loss in losses[:240]]
    watch = _CollapseWatch(spec, store, _MetricBuffer(spec, 10), STEPS, earlier)
    uninterrupted = CollapseMonitor(family, STEPS, THRESHOLD, PATIENCE)
    readings = [uninterrupted.update(step, float(losses[step])) for step in range(STEPS)]
    lines: list[str] = []
    events = CollapseEvents(store, "run", lines.append)
    for step in range(240, STEPS):
        reading, values = watch.update(step, float(losses[step]))
        assert reading == readings[step]
        assert values == {"collapse_residual": reading.residual, "collapse_threshold": reading.threshold,
                          "collapse_final_loss_estimate": reading.final_loss}
        events.poll()
    drift = uninterrupted.first_drift
    assert watch.monitor.first_drift == drift and FAULT_AT <= drift.step < FAULT_AT + WINDOW + PATIENCE_STEPS
    assert collapse_event(store, "run")["state"] == "drift" and len(lines) == 1
    assert lines[0].startswith(f"train: warning: collapse monitor: from step {drift.step} (5") and "the family of 6 run(s)" in lines[0]
    watch.write("stopped", drift.step)
    event = collapse_event(store, "run")
    assert event["state"] == "stopped" and event["largest"]["score"] > THRESHOLD and event["first_drift"]["step"] == drift.step
    message = str(collapse_stopped(event, store, "run"))
    assert message.startswith(f"train: the collapse monitor stopped the run after step {drift.step + 1} of 1,000: from step {drift.step}")
    assert message.endswith("(set collapse.stop: false to continue it, or force the train stage to start over)")
    CollapseEvents(store, "run", lines.append)  # a later attempt says it once, as an earlier attempt's drift
    assert len(lines) == 2 and lines[1].startswith("train: warning: collapse monitor (an earlier attempt): from step")


@pytest.mark.slow
def test_a_real_run_with_an_lr_spike_is_flagged_logged_tagged_and_stopped(trained_test, mlflow_uri, tmp_path):
    """A family of 2 runs in a store of their own: configs/test.yaml's uniform run (the session's,
    48 steps) and a copy of it with each loss 1-3% higher. A 48-step run with its LR x30 at steps 12-14 is watched:
    it logs ``collapse_residual``, warns, is tagged and stopped with one line, its checkpoint
    kept, and a rerun that still says ``stop`` is refused before training."""
    import shutil
    import mlflow

    from tasks.train import TRAIN, base_result, collapse_family, stored_index, train_fingerprint
    from training.audit import read_audit
    from training.collapse import CollapseStopped
    from training.cpt_job import COLLAPSE_EVENT, FAULT_ENV, latest_checkpoint
    from training.schedules import LRSchedule
    from trecflow.recipe import parse_recipe
    from trecflow.runner import STARTED, run_stage
    from trecflow.stage import Target
    from trecflow.store import Store

    from ..conftest import environment

    session, base = trained_test["store"], trained_test["base"]
    client = mlflow.MlflowClient(mlflow_uri)
    experiment = client.create_experiment("collapse")

    def recipe(**changes):
        data = trained_test["recipe"].model_dump(mode="json")
        for dotted, value in changes.items():
            section, key = dotted.split("__")
            data[section] = {**data[section], key: value}
        return parse_recipe(data)

    def train(recipe, place_fp: str, expected: dict, lines: list[str], run_id: str | None = None) -> None:
        def tracked(event) -> None:  # what flows.reporters.MlflowReporter does for the stage's own MLflow run
            if event.kind == STARTED and run_id:
                event.annotations["mlflow_run_id"] = run_id

        upstream = {"tokenizer": expected["tokenizer"], "base": base_result(base), "place": stored_index(store, place_fp, expected)}
        run_stage(TRAIN, Target(recipe), store, upstream, progress=lines.append, reporters=[tracked])

    # a store of their own (other tests add runs of this family to the session's): what training reads, and the first run
    store = Store(str(tmp_path / "store"))
    for stage, fp in (("tokenizer", trained_test["tokenizer"].fingerprint), ("pack", trained_test["pack"].fingerprint),
                      ("place", trained_test["place"].fingerprint), ("train", trained_test["train"].fingerprint)):
        shutil.copytree(session.path(stage, fp), store.path(stage, fp))
    faulty = recipe(collapse__min_runs=2, collapse__stop=True)
    lines: list[str] = []
    assert collapse_family(faulty, store, None, "a-new-run", lines.append) is None
    assert lines[0].startswith("train: collapse monitor off: 1 finished run(s) in the store share this run's linear schedule"), lines
    assert "min_runs = 2" in lines[0]
    # the family's second run: the session run's curve, each loss 1-3% higher (a run of another data order, written
    # as stage 4 writes one: audit log, run.json, manifest), so the family has a spread; training it would cost a minute
    second = store.output("train", "0" * 16)
    shutil.copytree(session.path("train", trained_test["train"].fingerprint), second.path)
    for part in store.fs.glob(f"{second.path}/audit/*/*.jsonl"):
        records = [json.loads(line) for line in store.fs.cat_file(part).decode().splitlines() if line]
        for record in records:
            record["loss"] *= 1.02 + 0.01 * math.sin(record["step"])
        store.fs.pipe_file(part, "".join(json.dumps(record) + "\n" for record in records).encode())

    lines = []
    place_fp = trained_test["place"].fingerprint
    run_id = client.create_run(experiment).info.run_id
    with environment({FAULT_ENV: "12:3:30"}):
        fp = train_fingerprint(faulty, place_fp, base.fingerprint)
        with pytest.raises(CollapseStopped) as stopped:
            train(faulty, place_fp, trained_test["expected"], lines, run_id)
    assert fp != trained_test["train"].fingerprint  # a faulty run never takes a normal run's place
    message = str(stopped.value)
    assert "\n" not in message and message.startswith("train: the collapse monitor stopped the run after step 1")
    assert "beyond +-" in message and "(5 x the family's spread)" in message and "the family of 2 run(s): linear schedule" in message
    assert any(line.startswith("train: collapse monitor: family of 2 run(s): linear schedule") for line in lines), lines
    assert any(line.startswith("train: warning: collapse monitor: from step 1") for line in lines), lines

    output = store.output("train", fp)
    event = json.loads(store.fs.cat_file(output.file_path(COLLAPSE_EVENT)))
    drift_step = event["first_drift"]["step"]
    assert event["state"] == "stopped" and 12 <= drift_step <= 14 and event["stopped_after_step"] == drift_step
    assert event["family"]["runs"] == 2
    assert not output.exists() and latest_checkpoint(store, fp)["step"] == drift_step + 1  # not committed; its checkpoint kept
    records = read_audit(store, output.path)
    assert [record["step"] for record in records] == list(range(drift_step + 1))
    assert records[12]["lr"] == pytest.approx(30 * LRSchedule.from_recipe(faulty).lr_at(12), rel=1e-12)  # the LR applied is recorded

    run = client.get_run(run_id)
    assert run.data.tags["trecflow.collapse"] == "stopped" and run.data.tags["trecflow.collapse_step"] == str(drift_step)
    residuals = {metric.step: metric.value for metric in client.get_metric_history(run_id, "collapse_residual")}
    thresholds = {metric.step: metric.value for metric in client.get_metric_history(run_id, "collapse_threshold")}
    assert max(residuals) == drift_step and min(residuals) <= 5  # every step from the first fitted one
    assert all(abs(residuals[step]) < thresholds[step] for step in residuals if step < 12)  # normal before the fault
    assert residuals[drift_step] > thresholds[drift_step] > 0
    # up to the fault the run is the family's first one: its final loss was estimated from the partial curve
    estimates = {metric.step: metric.value for metric in client.get_metric_history(run_id, "collapse_final_loss_estimate")}
    assert estimates.keys() == residuals.keys()
    assert estimates[11] == pytest.approx(trained_test["train"].summary.final_loss, rel=0.03)

    # still stop: true: refused at once, before any training
    with environment({FAULT_ENV: "12:3:30"}), pytest.raises(CollapseStopped, match="set collapse.stop: false to continue it"):
        train(faulty, place_fp, trained_test["expected"], [])
    assert len(read_audit(store, output.path)) == drift_step + 1
