"""The multi-power law (training/multipower.py): the documented formula and indexing, the fit's
gradient, and forecasts of schedules held out from the fit on curves made by the law itself with
the 400M parameters of the official repository, at the LR scale they belong to (peak 3e-4)."""

from __future__ import annotations

import numpy as np
import pytest

from training import multipower as mp
from training.schedules import LRSchedule
from trecflow.recipe import ScheduleSection

# thu-yao-01-luo/MultiPowerLaw, README "Best Parameters", 400M (fitted with peak LR 3e-4)
PAPER_400M = mp.LawParams(L0=2.375, A=0.654, alpha=0.429, B=523.4, C=2.025, beta=0.594, gamma=0.635)
PEAK = 3e-4
STEPS = 3000
SCHEDULES = {
    "constant": {"kind": "constant", "warmup": 0.05},
    "cosine": {"kind": "cosine", "warmup": 0.05, "final_lr_ratio": 0.1},
    "two_stage": {"kind": "step", "warmup": 0.05, "drop_at": 0.6, "drop_factor": 0.3},
    "linear_to_zero": {"kind": "linear", "warmup": 0.05},
    "wsd": {"kind": "wsd", "warmup": 0.05, "cooldown": 0.2},
    "wsd_1_sqrt": {"kind": "wsd", "warmup": 0.05, "cooldown": 0.1, "cooldown_shape": "1-sqrt"},
}


def lrs(name: str, steps: int = STEPS) -> np.ndarray:
    return LRSchedule(ScheduleSection(**SCHEDULES[name]), peak_lr=PEAK, steps=steps).lrs()


def law_curve(name: str, noise: float = 0.0, seed: int = 0, every: int = 1) -> mp.Curve:
    """The law's curve of a schedule (the loss every ``every`` steps), times log-normal noise."""
    schedule = lrs(name)
    steps = np.arange(0, STEPS, every)
    losses = mp.multipower_loss(PAPER_400M, schedule, steps)
    return mp.Curve(name, schedule, steps, losses * np.exp(np.random.default_rng(seed).normal(0.0, noise, steps.size)))


def true_final_loss(name: str) -> float:
    return float(mp.multipower_loss(PAPER_400M, lrs(name), [STEPS - 1])[0])


def formula(params: mp.LawParams, schedule: np.ndarray, t: int) -> float:
    """The law at step t written out term by term, as the module docstring states it."""
    p = mp.warmup_end(schedule)
    drop = 0.0
    for k in range(p + 1, t + 1):
        partial = schedule[k : t + 1].sum()
        g = 1.0 if schedule[k] == 0 else 1.0 - (params.C * schedule[k] ** -params.gamma * partial + 1.0) ** -params.beta
        drop += (schedule[k - 1] - schedule[k]) * g
    return params.L0 + params.A * schedule[: t + 1].sum() ** -params.alpha - params.B * drop


def test_the_law_is_the_formula_term_by_term():
    schedule = np.concatenate([PEAK * np.arange(1, 21) / 20, np.full(30, PEAK), np.full(40, 0.4 * PEAK),
                               np.linspace(0.4 * PEAK, 0.0, 60), np.zeros(5), np.full(10, 0.2 * PEAK)])  # ends rising again
    assert mp.warmup_end(schedule) == 19
    steps = np.array([0, 10, 19, 20, 49, 50, 51, 89, 90, 120, 149, 150, 154, 155, 164])
    expected = [formula(PAPER_400M, schedule, int(t)) for t in steps]
    np.testing.assert_allclose(mp.multipower_loss(PAPER_400M, schedule, steps), expected, rtol=1e-13)
    # the warmup enters through S_W alone: up to the first drop the law is the plain power law
    plain = PAPER_400M.L0 + PAPER_400M.A * np.cumsum(schedule)[:50] ** -PAPER_400M.alpha
    np.testing.assert_allclose(mp.multipower_loss(PAPER_400M, schedule, np.arange(50)), plain, rtol=1e-13)


def test_blocks_of_a_long_schedule_give_the_same_law(monkeypatch):
    schedule = lrs("cosine")
    steps = mp.evenly_spaced(0, STEPS - 1, 100)
    whole = mp.multipower_loss(PAPER_400M, schedule, steps)
    monkeypatch.setattr(mp, "BLOCK_ELEMENTS", 5000)  # many small blocks, as a 200k-step schedule gets
    np.testing.assert_allclose(mp.multipower_loss(PAPER_400M, schedule, steps), whole, rtol=1e-13)
    assert whole[-1] == pytest.approx(formula(PAPER_400M, schedule, STEPS - 1), rel=1e-12)


def test_the_fit_gradient_is_the_law_derivative():
    schedule = lrs("wsd_1_sqrt")
    prepared = mp._schedule(schedule, mp.evenly_spaced(150, STEPS - 1, 40), keep_blocks=True)
    log_params = np.log(PAPER_400M.vector())
    _, jacobian = mp._law(np.exp(log_params), prepared, jacobian=True)
    for index, name in enumerate(mp.PARAM_NAMES):
        step = np.zeros(7)
        step[index] = 1e-6
        numeric = (mp._law(np.exp(log_params + step), prepared, False)[0] - mp._law(np.exp(log_params - step), prepared, False)[0]) / 2e-6
        np.testing.assert_allclose(jacobian[:, index], numeric, rtol=1e-5, atol=1e-9, err_msg=name)


def test_fit_points_average_symmetric_bins_after_warmup():
    schedule = lrs("constant")
    steps = np.arange(STEPS)
    line = mp.Curve("line", schedule, steps, np.exp(5.0 - 1e-4 * steps))  # log-loss linear in step
    fitted_steps, log_losses = mp.fit_points(line, points=64)
    assert fitted_steps.size <= 64 and fitted_steps[0] >= mp.warmup_end(schedule) == 149
    np.testing.assert_allclose(log_losses, 5.0 - 1e-4 * fitted_steps, rtol=1e-12)  # each mean belongs to its middle step
    assert np.all(np.diff(fitted_steps)[:5] < np.diff(fitted_steps)[-5:])  # narrow bins where the LR sum is small
    short = mp.Curve("short", schedule[:200], steps[150:200], np.linspace(3.0, 2.0, 50))
    assert mp.fit_points(short, points=64)[0].tolist() == list(range(150, 200))  # fewer losses than bins: each its own


def test_fit_forecasts_held_out_schedules_within_0_01():
    fitted = mp.fit([law_curve("constant"), law_curve("cosine")])
    assert fitted.converged and fitted.points <= 2 * mp.FIT_POINTS and fitted.rmse_log < 1e-3
    for held_out in ("two_stage", "linear_to_zero", "wsd", "wsd_1_sqrt"):
        forecast = mp.forecast(fitted, lrs(held_out), held_out)
        assert forecast.steps[-1] == STEPS - 1 and forecast.total_steps == STEPS
        assert abs(forecast.final_loss - true_final_loss(held_out)) < 0.01, held_out
        np.testing.assert_allclose(forecast.losses, mp.multipower_loss(PAPER_400M, lrs(held_out), forecast.steps), atol=0.01)


def test_fit_on_noisy_curves_forecasts_held_out_schedules_within_0_01():
    curves = [law_curve(name, noise=0.01, seed=seed, every=2) for seed, name in enumerate(("constant", "cosine", "two_stage"))]
    fitted = mp.fit(curves)
    assert 0.001 < fitted.rmse_log < 0.01  # 1% noise per step, averaged in bins
    assert [fit.name for fit in fitted.curves] == ["constant", "cosine", "two_stage"]
    for held_out in ("linear_to_zero", "wsd", "wsd_1_sqrt"):
        assert abs(mp.forecast(fitted, lrs(held_out)).final_loss - true_final_loss(held_out)) < 0.01, held_out


def test_fit_is_deterministic():
    curves = [law_curve(name, noise=0.01, seed=seed, every=10) for seed, name in enumerate(("constant", "two_stage"))]
    first, second = mp.fit(curves), mp.fit(curves)
    assert first.params == second.params and first.rmse_log == second.rmse_log


def test_too_few_points_after_warmup_is_refused():
    schedule = lrs("constant")
    with pytest.raises(ValueError, match="short: 6 loss points after warmup; the fit needs at least 10"):
        mp.fit([mp.Curve("short", schedule, np.arange(145, 155), np.full(10, 3.0))])
    with pytest.raises(ValueError, match="losses must be finite and positive"):
        mp.Curve("bad", schedule, np.arange(3), np.array([3.0, 0.0, 2.0]))


def test_identification_needs_a_decay_and_two_schedules_and_warns_on_one_decay():
    constant, cosine = law_curve("constant", every=10), law_curve("cosine", every=10)
    assert "no fitted curve decays its LR" in mp.identification_warning([constant, law_curve("constant", seed=1, every=10)])
    assert "share one LR schedule" in mp.identification_warning([cosine, cosine])
    shorter = mp.Curve("prefix", cosine.lrs[:2000], cosine.steps[:200], cosine.losses[:200])
    assert "share one LR schedule" in mp.identification_warning([cosine, shorter])  # a run stopped early is the same schedule
    assert mp.identification_warning([constant, cosine]) is None
    assert mp.decay_shape_warning([constant, cosine, cosine]).startswith("only one fitted schedule decays its LR (cosine)")
    assert mp.decay_shape_warning([constant, cosine, law_curve("two_stage", every=10)]) is None
    assert mp.decay_shape_warning([cosine, cosine]) is None  # not identified at all: the stronger warning says so
