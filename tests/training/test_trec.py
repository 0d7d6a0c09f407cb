"""TREC prediction math: the EMA identity, the continuous limits, windows and Power Lines."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from trecflow.recipe import ScheduleSection, parse_recipe, read_yaml
from training.schedules import LRSchedule
from training.trec import best_window, ema_coefficients, ema_coefficients_loop, predict, predicted_trec, tau_opt

from ..conftest import CONFIGS

BASE = read_yaml((CONFIGS / "test.yaml").read_text())


def recipe_with(steps: int, tau: float, schedule: dict, m: float = 0.0, peak_lr: float = 1e-3):
    """A recipe with T = steps and the given normalized timescale."""
    data = copy.deepcopy(BASE)
    data["data"] = {"tokens": steps * 512, "seq_len": 64}
    data["batch"] = {"tokens": 512}
    data["optimizer"] = {"peak_lr": peak_lr, "weight_decay": 1.0 / (tau * peak_lr * steps), "betas": [0.9, 0.95]}
    data["schedule"] = schedule
    data["trec"] = {"p": 0.5, "m": m}
    return parse_recipe(data)


@pytest.mark.parametrize(
    "schedule",
    [
        {"kind": "constant"},
        {"kind": "linear", "warmup": 0.05},
        {"kind": "cosine", "warmup": 0.02, "final_lr_ratio": 0.1},
        {"kind": "step", "warmup": 0.05},
        {"kind": "wsd", "warmup": 0.05, "cooldown_shape": "1-sqrt"},
        {"kind": "inverse_sqrt", "warmup": 0.01, "timescale": 50},
    ],
)
def test_coefficients_plus_initial_weight_sum_to_one(schedule):
    lr = LRSchedule(ScheduleSection(**schedule), peak_lr=3e-3, steps=5000).lrs()
    c, initial = ema_coefficients(lr, weight_decay=0.2)
    assert c.sum() + initial == pytest.approx(1.0, abs=1e-12)
    assert np.all(c >= 0)


def test_vectorized_equals_the_plain_loop():
    lr = LRSchedule(ScheduleSection(kind="linear", warmup=0.1), peak_lr=2e-3, steps=20_000).lrs()
    fast, _ = ema_coefficients(lr, 0.1)
    np.testing.assert_allclose(fast, ema_coefficients_loop(lr.tolist(), 0.1), rtol=1e-9, atol=1e-300)


def test_a_million_steps_do_not_underflow():
    lr = LRSchedule(ScheduleSection(kind="constant"), peak_lr=1e-3, steps=1_000_000).lrs()
    c, initial = ema_coefficients(lr, 0.5)  # tau = 0.002: early coefficients are ~exp(-500)
    assert np.all(np.isfinite(c)) and c[-1] > 0
    assert c.sum() + initial == pytest.approx(1.0, abs=1e-9)


def test_alpha_at_least_one_is_refused():
    with pytest.raises(ValueError, match="step 1 has"):
        ema_coefficients(np.array([0.1, 2.0]), 0.5)


def test_constant_lr_puts_the_valley_at_the_end():
    prediction = predict(recipe_with(2000, 0.2, {"kind": "constant"}))
    assert prediction.valley_step == 1999 and prediction.valley_fraction == 1.0
    assert np.all(np.diff(prediction.trec) < 0)  # c grows monotonically towards the end


@pytest.mark.parametrize("tau", [0.02, 0.05, 0.1, 0.2, 0.4])
def test_linear_to_zero_valley_at_one_minus_sqrt_tau(tau):
    prediction = predict(recipe_with(10_000, tau, {"kind": "linear", "final_lr_ratio": 0.0}))
    assert prediction.tau == pytest.approx(tau)
    assert prediction.valley_fraction == pytest.approx(1 - math.sqrt(tau), abs=0.01)
    assert prediction.initial_weight == pytest.approx(math.exp(-1 / (2 * tau)), rel=0.05, abs=1e-6)


def test_step_schedule_valley_is_just_before_the_drop():
    prediction = predict(recipe_with(1000, 0.3, {"kind": "step", "warmup": 0.05, "drop_at": 0.7}))
    assert prediction.valley_step == 699


def test_positive_m_moves_the_valley_later():
    schedule = {"kind": "linear", "warmup": 0.05}
    early = predict(recipe_with(1000, 0.2, schedule, m=0.0)).valley_fraction
    late = predict(recipe_with(1000, 0.2, schedule, m=1.5)).valley_fraction
    assert late > early + 0.05


def test_trec_normalizes_c_by_its_maximum():
    c = np.array([0.1, 0.4, 0.2, 0.0])
    trec = predicted_trec(c, p=0.5, m=0.0)
    np.testing.assert_allclose(trec, 1 - np.sqrt(c / 0.4))
    assert trec.min() == 0.0 and trec[-1] == 1.0


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.25, 0.5, 1.0])
def test_best_window_matches_brute_force(fraction):
    rng = np.random.default_rng(7)
    trec = rng.random(203)
    start, end = best_window(trec, fraction)
    length = max(1, round(fraction * 203))
    assert end - start == length
    means = [trec[a : a + length].mean() for a in range(203 - length + 1)]
    assert start == int(np.argmin(means))


def test_window_surrounds_the_valley_for_a_smooth_curve():
    prediction = predict(recipe_with(1000, 0.1, {"kind": "linear"}))
    start, end = prediction.hq_window(0.1)
    assert start <= prediction.valley_step < end


def test_timescale_tpp_and_power_lines():
    recipe = recipe_with(1000, 0.25, {"kind": "linear"})
    prediction = predict(recipe)
    assert prediction.tau == pytest.approx(1 / (recipe.optimizer.peak_lr * recipe.optimizer.weight_decay * 1000))
    assert prediction.tpp == pytest.approx(recipe.data.tokens / recipe.model.params)
    assert tau_opt(20.0) == pytest.approx(20.0**-0.527)
    assert 0.2 < tau_opt(20.0) < 0.22  # Power Lines: tau_opt ~ 0.21 at 20 TPP
    assert prediction.weight_decay_opt * recipe.optimizer.peak_lr * 1000 * prediction.tau_opt == pytest.approx(1.0)


def test_warning_only_when_tau_is_more_than_twice_away():
    near = recipe_with(1000, 0.25, {"kind": "linear"})
    tpp = near.data.tokens / near.model.params
    close = recipe_with(1000, 1.5 * tau_opt(tpp), {"kind": "linear"})
    far = recipe_with(1000, 2.5 * tau_opt(tpp), {"kind": "linear"})
    assert predict(close).warnings() == []
    assert "2.50x the Power-Lines optimum" in predict(far).warnings()[0]


def test_summary_has_the_cli_contract_keys():
    summary = predict(recipe_with(500, 0.2, {"kind": "linear"})).summary(0.1)
    for key in ("steps", "tau", "tpp", "tau_opt", "valley_fraction", "valley_step", "hq_window"):
        assert key in summary
    start, end = summary["hq_window"]
    assert end - start == pytest.approx(0.1)
