"""A variant's own schedule and checkpoint averaging through the stages: its own prediction (and
only then a fingerprint of its own), the placement window that prediction gives, the schedule
training uses, the averaging the job folds in, and the train stage's refusal of averaging under ZeRO-3
before any work."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from tasks.graph import GRAPH
from tasks.place import plan_request
from tasks.placement import make_plan
from tasks.predict import PREDICT, predict_fingerprint, read_curve, run_predict
from tasks.train import TRAIN, train_fingerprint
from trecflow.inventory import SKIPPED, plan_stages
from trecflow.recipe import RecipeError, load_recipe, parse_recipe, read_yaml
from trecflow.runner import run_stage
from trecflow.stage import Target
from trecflow.store import Store
from training.schedules import LRSchedule
from training.schedule_advice import hq_stretch_start
from training.trec import best_window, predict

from ..conftest import CONFIGS

BASE = read_yaml((CONFIGS / "test.yaml").read_text())
# configs/test.yaml's prediction fingerprint before variants could carry a schedule (commit bfdc1f1)
TEST_PREDICT_FINGERPRINT = "a560243c1bf43df5"
CONSTANT = {"kind": "constant", "warmup": 0.1}
SMA = {"kind": "sma", "checkpoints": 4, "every": 4}
VARIANTS = {
    "uniform": {"strategy": "uniform"},
    "valley": {"strategy": "trec_valley"},
    "same-schedule": {"strategy": "trec_valley", "schedule": copy.deepcopy(BASE["schedule"])},
    "constant": {"strategy": "trec_valley", "schedule": CONSTANT},
    "constant-sma": {"strategy": "trec_valley", "schedule": CONSTANT, "averaging": SMA},
    "weighted-sma": {"strategy": "trec_weighted", "schedule": CONSTANT, "averaging": SMA},
}


def recipe_with_variants():
    data = copy.deepcopy(BASE)
    data["curriculum"]["variants"] = copy.deepcopy(VARIANTS)
    return parse_recipe(data)


RECIPE = recipe_with_variants()


def test_variants_without_an_override_keep_the_shared_fingerprint():
    assert predict_fingerprint(load_recipe(CONFIGS / "test.yaml")) == TEST_PREDICT_FINGERPRINT
    assert predict_fingerprint(RECIPE) == TEST_PREDICT_FINGERPRINT  # declaring variants with overrides changes nothing for the others
    for variant in ("uniform", "valley", "end", "shared", None):  # declared, a strategy's default, the shared stages' pseudo-variant
        assert PREDICT.fingerprint(Target(RECIPE, variant), {}, None) == TEST_PREDICT_FINGERPRINT
    assert predict_fingerprint(RECIPE, "same-schedule") == TEST_PREDICT_FINGERPRINT  # content-addressed: the recipe's own schedule
    assert RECIPE.section("curriculum")["curriculum"]["variants"]["uniform"] == {"strategy": "uniform", "params": {}}
    train_fp = train_fingerprint(RECIPE, "place", "base")
    assert train_fingerprint(RECIPE.for_variant("valley"), "place", "base") == train_fp


def test_a_variant_with_its_own_schedule_or_averaging_has_its_own_prediction():
    fingerprints = {name: predict_fingerprint(RECIPE, name) for name in ("constant", "constant-sma", "weighted-sma")}
    assert len({*fingerprints.values(), TEST_PREDICT_FINGERPRINT}) == 3  # the two sma variants share theirs (same schedule and averaging)
    assert fingerprints["constant-sma"] == fingerprints["weighted-sma"] != fingerprints["constant"]
    assert train_fingerprint(RECIPE.for_variant("constant"), "place", "base") != train_fingerprint(RECIPE, "place", "base")
    constant = predict(RECIPE, "constant")
    np.testing.assert_array_equal(constant.lrs, LRSchedule(RECIPE.for_variant("constant").schedule, 2e-3, 48).lrs())
    assert constant.lrs[-1] == 2e-3 and predict(RECIPE).lrs[-1] == 0.0
    assert constant.valley_step == 47 != predict(RECIPE).valley_step


def test_the_stored_prediction_and_the_placement_window_follow_the_variant(tmp_path):
    store = Store(str(tmp_path / "store"))
    shared = run_predict(RECIPE, store, variant="valley")
    constant = run_predict(RECIPE, store, variant="constant")
    averaged = run_predict(RECIPE, store, variant="constant-sma")
    assert shared.fingerprint == TEST_PREDICT_FINGERPRINT and shared.summary.variant is None and shared.summary.averaging is None
    assert constant.summary.variant == "constant" and constant.summary.schedule["kind"] == "constant"
    assert (constant.summary.valley_step, averaged.summary.valley_step) == (47, 47 - 3 * 4)
    assert averaged.summary.averaging.snapshot_steps == (35, 39, 43, 47)
    assert averaged.summary.averaging.weights == (0.25,) * 4 and averaged.summary.averaging.final_valley_step == 47
    curve = read_curve(store, averaged.fingerprint)
    assert curve.column_names == ["step", "fraction", "lr", "c", "trec_pred", "c_final", "trec_final"]
    np.testing.assert_array_equal(curve["trec_final"].to_numpy(), read_curve(store, constant.fingerprint)["trec_pred"].to_numpy())
    assert read_curve(store, shared.fingerprint).column_names == ["step", "fraction", "lr", "c", "trec_pred"]

    # placement reads the variant's stored curve: the trec_valley window moves with it
    sequences = RECIPE.steps * RECIPE.sequences_per_step
    tiers = np.repeat(np.array([0, 1, 2], dtype=np.int8), sequences)
    scores = np.linspace(0.0, 1.0, tiers.size)
    windows = {}
    for name, result in (("valley", shared), ("constant", constant), ("constant-sma", averaged)):
        plan = make_plan(plan_request(RECIPE, name), tiers, scores, read_curve(store, result.fingerprint)["trec_pred"].to_numpy())
        windows[name] = plan.window_steps
    length = round(0.25 * 48)
    assert windows["valley"] == best_window(predict(RECIPE).trec, 0.25)
    assert windows["constant"] == (48 - length, 48)
    assert windows["constant-sma"] == best_window(predict(RECIPE, "constant-sma").trec, 0.25) != windows["constant"]
    assert len(set(windows.values())) == 3


def test_training_refuses_averaging_under_zero3_before_any_work(tmp_path, test_corpus):
    data = copy.deepcopy(BASE)
    data["curriculum"]["variants"] = copy.deepcopy(VARIANTS)
    data["training"]["zero_stage"] = 3
    zero3 = parse_recipe(data)
    target = Target(zero3, "constant-sma")
    expected = ("curriculum.variants.constant-sma.averaging: checkpoint averaging needs training.zero_stage 0, 1 or 2 (ZeRO-3 partitions "
                "the weights the average adds up); use ZeRO-1 or 2, or remove averaging from this variant")
    assert TRAIN.refusal(target) == expected
    assert TRAIN.refusal(Target(zero3, "constant")) is None and TRAIN.refusal(Target(RECIPE, "constant-sma")) is None
    assert TRAIN.requirement(target, "r.yaml") == f"r.yaml: {expected}"
    with pytest.raises(RecipeError) as raised:
        GRAPH.check_runnable(target, None, "r.yaml")
    assert str(raised.value) == f"r.yaml: {expected}"
    GRAPH.check_runnable(target, "place", "r.yaml")  # up to placement nothing is refused
    GRAPH.check_runnable(Target(RECIPE, "constant-sma"), None, "r.yaml")  # averaging under ZeRO-1 trains
    # `trecflow status` (the same plan) shows the refusal, and that what follows training waits on it
    plans = {plan.stage: plan for plan in plan_stages(GRAPH, Store(str(tmp_path / "status")), target)}
    assert plans["train"].state == SKIPPED and plans["train"].note == f"refused: {expected}"
    assert plans["reevaluate"].state == SKIPPED and plans["reevaluate"].note == "needs train"
    with pytest.raises(RecipeError, match="^test/constant-sma: curriculum.variants.constant-sma.averaging: checkpoint averaging needs"):
        run_stage(TRAIN, target, Store(str(tmp_path / "store")), upstream={}, progress=None)  # refused before it reads an input
    assert not (tmp_path / "store").exists()


def test_averaging_has_its_own_training_fingerprint_and_the_job_folds_the_predicted_weights():
    from tasks.train import averaging_plan

    plain = train_fingerprint(RECIPE.for_variant("constant"), "place", "base", "constant")
    averaged = train_fingerprint(RECIPE.for_variant("constant-sma"), "place", "base", "constant-sma")
    assert plain != averaged and plain == train_fingerprint(RECIPE.for_variant("constant"), "place", "base")
    plan = averaging_plan(RECIPE, "constant-sma", 48)
    assert plan == {"snapshots": [35, 39, 43, 47], "weights": [0.25] * 4}  # 4 snapshots 4 steps apart, the newest after the last step
    assert averaging_plan(RECIPE, "constant", 48) is None


def test_the_comparison_draws_each_variant_against_its_own_prediction(tmp_path):
    from flows.compare import variant_predictions
    from training.trec_plot import plot_comparison

    store = Store(str(tmp_path / "store"))
    outcomes = {name: {"predict": {"fingerprint": run_predict(RECIPE, store, variant=name).fingerprint}}
                for name in ("uniform", "valley", "constant", "constant-sma")}
    predictions = variant_predictions(store, list(outcomes), outcomes)
    assert [owners for owners, _, _ in predictions] == [["uniform", "valley"], ["constant"], ["constant-sma"]]
    for owners, fractions, values in predictions:
        np.testing.assert_array_equal(values, read_curve(store, outcomes[owners[0]]["predict"]["fingerprint"])["trec_pred"].to_numpy())
        assert fractions[-1] == 1.0
    assert np.argmin(predictions[1][2]) == 47 and np.argmin(predictions[2][2]) < 47  # constant LR: the end; averaged: earlier
    rows = [{"variant": name, "val_loss_hq": 5.0, "val_loss_general": 5.5, "hq_window": None, "trec_valley_measured": None} for name in outcomes]
    assert plot_comparison(predictions, rows, "t").startswith(b"\x89PNG")


def test_the_lr_decay_overlay_declares_the_papers_variants_on_the_study_recipe():
    recipe = load_recipe(CONFIGS / "study.yaml", [str(CONFIGS / "overlays" / "lr-decay.yaml")])
    assert list(recipe.curriculum.variants) == ["uniform", "ascending", "ascending-moderate", "ascending-constant-ema",
                                                "ascending-moderate-ema", "trec_valley-constant-ema"]
    assert recipe.schedule.kind == "linear" and predict(recipe, "ascending").lrs[-1] == 0.0
    moderate = predict(recipe, "ascending-moderate")
    assert moderate.lrs[-1] == pytest.approx(0.33 * 2e-3, rel=0.01)
    averaged = predict(recipe, "ascending-constant-ema")
    assert averaged.averaged.final_valley_step == 399 and averaged.valley_step == 369  # constant LR: the end; its EMA: the oldest snapshot
    hq_stretch = hq_stretch_start(recipe, "ascending-constant-ema")  # where `ascending` puts the HQ tier
    assert averaged.averaged.snapshot_steps[0] >= hq_stretch == 360  # every snapshot has seen the HQ data


def test_m_calibrated_follows_a_variants_own_schedule_kind(tmp_path):
    from tasks.calibrate import record_run, resolve_m, run_calibrate
    from training.calibration import CalibrationRun

    store = Store(str(tmp_path / "store"))
    grid = [(20, 0.1), (20, 0.3), (80, 0.1), (80, 0.3), (300, 0.5)]
    for kind, scale in (("linear", 0.8), ("constant", 2.0)):
        for i, (tpp, tau) in enumerate(grid):
            record_run(store, CalibrationRun(f"{kind}{i}", "r", "uniform", kind, tpp, tau, scale * tpp**0.25 * tau**-0.6, 0.95, 300))
    run_calibrate(store)
    data = copy.deepcopy(BASE)
    data["schedule"]["kind"] = "linear"
    data["trec"]["m"] = "calibrated"
    data["curriculum"]["variants"] = {"uniform": {"strategy": "uniform"}, "constant": {"strategy": "trec_valley", "schedule": CONSTANT}}
    resolved = resolve_m(parse_recipe(data), store)
    shared, constant = predict(resolved), predict(resolved, "constant")
    law = 0.25 * np.log(shared.tpp) - 0.6 * np.log(shared.tau)
    assert resolved.trec.m == shared.m == pytest.approx(0.8 * np.exp(law), rel=1e-5)
    assert constant.m == pytest.approx(2.0 * np.exp(law), rel=1e-5)  # its own kind's law
    assert predict_fingerprint(resolved, "constant") != predict_fingerprint(resolved.model_copy(update={"_calibrated_m": {}}), "constant")
    data["curriculum"]["variants"]["wsd"] = {"strategy": "uniform", "schedule": {"kind": "wsd", "cooldown": 0.2}}
    pooled = run_calibrate(store)["laws"]["all"]
    assert predict(resolve_m(parse_recipe(data), store), "wsd").m == pytest.approx(
        pooled["C"] * shared.tpp ** pooled["mu1"] * shared.tau ** pooled["mu2"], rel=1e-5)  # no wsd law: the pooled one
    only_linear = Store(str(tmp_path / "linear"))
    for i, (tpp, tau) in enumerate(grid):
        record_run(only_linear, CalibrationRun(f"linear{i}", "r", "uniform", "linear", tpp, tau, 0.8 * tpp**0.25 * tau**-0.6, 0.95, 300))
    run_calibrate(only_linear)
    with pytest.raises(RecipeError, match=r"^trec.m: calibrated \(variant constant, schedule constant\): the calibration has no law for schedule 'constant'"):
        resolve_m(parse_recipe(data), only_linear)


def test_the_model_card_of_an_averaged_variant_says_what_its_weights_are():
    from types import SimpleNamespace

    from flows.variant_run import model_card

    train = SimpleNamespace(fingerprint="t1", summary=SimpleNamespace(model_uri="/s/train/t1/model", final_model_uri="/s/train/t1/final_model",
                                                                      steps=48, final_loss=6.5))
    card = model_card(RECIPE, "constant-sma", {"train": train}, None)
    assert "| weights | sma of 4 snapshots 4 steps apart; raw final weights: `/s/train/t1/final_model` |" in card
    assert "| weights |" not in model_card(RECIPE, "constant", {"train": train}, None)
