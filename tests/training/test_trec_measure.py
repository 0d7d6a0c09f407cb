"""The measured-TREC math and the calibration law, on curves whose answer is known."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from training.calibration import MIN_R_P_FIT, CalibrationError, CalibrationRun, fit_law, law_m
from training.trec import ema_coefficients, predicted_trec
from training.trec_measure import agreement, fit_m, minmax, pearson, smooth


def step_decay_coefficients(steps: int = 400, drop_at: float = 0.7, weight_decay: float = 4.17) -> np.ndarray:
    """The demo recipe's schedule: 5% warmup, peak 2e-3, x0.1 at 0.7 of training."""
    lrs = np.full(steps, 2e-3)
    warmup = int(0.05 * steps)
    lrs[:warmup] = 2e-3 * np.arange(1, warmup + 1) / warmup
    lrs[int(drop_at * steps) :] *= 0.1
    return ema_coefficients(lrs, weight_decay)[0]


def test_smooth_matches_a_brute_force_window_on_irregular_steps():
    rng = np.random.default_rng(0)
    steps = np.sort(rng.choice(1000, size=150, replace=False))
    values = rng.normal(size=150)
    got = smooth(steps, values, total_steps=1000, fraction=0.05)
    for i, step in enumerate(steps):
        inside = np.abs(steps - step) <= 25.0
        assert got[i] == pytest.approx(values[inside].mean())
    with pytest.raises(ValueError, match="increasing"):
        smooth(steps[::-1], values, 1000, 0.05)


def test_smooth_treats_every_row_of_a_matrix_like_a_curve():
    steps = np.arange(0, 400, 3)
    rows = np.random.default_rng(1).normal(size=(4, steps.size))
    together = smooth(steps, rows, 400, 0.05)
    assert np.array_equal(together, np.stack([smooth(steps, row, 400, 0.05) for row in rows]))


def test_the_prediction_is_smoothed_like_the_measured_curve():
    """A measured curve that is exactly the prediction, smoothed: r_p 1 and no valley error, since
    both curves are blurred alike; the unsmoothed prediction would differ at the step drop."""
    coefficients = step_decay_coefficients()
    steps = np.arange(0, coefficients.size, 2)
    exact = predicted_trec(coefficients, 0.5, 1.75)[steps]
    smoothed = smooth(steps, 5.0 + 0.1 * exact, coefficients.size, 0.08)
    alike = agreement(steps, smoothed, coefficients, 0.5, 1.75, smoothing=0.08)
    assert alike.r_p == pytest.approx(1.0, abs=1e-12) and alike.valley_error == 0.0
    assert alike.m_fit == pytest.approx(1.75, abs=0.011)
    assert alike.valley_predicted < 0.7  # the smoothed drop's valley comes before the raw one (0.70)
    unlike = agreement(steps, smoothed, coefficients, 0.5, 1.75)
    assert unlike.r_p < 0.99 and unlike.valley_predicted == pytest.approx(0.7, abs=0.003)  # the sampled step before the drop


def test_minmax_and_pearson():
    assert minmax(np.array([2.0, 4.0, 3.0])).tolist() == [0.0, 1.0, 0.5]
    assert pearson(np.arange(5.0), 3 * np.arange(5.0) + 1) == pytest.approx(1.0)
    assert np.isnan(pearson(np.ones(5), np.arange(5.0)))


def constructed_run(m_true: float, seed: int = 0, steps: int = 400):
    """Per-step losses = a known TREC shape (depth 0.1 nats) + per-batch content difficulty
    (0.15 nats) that a reference model sees too (with 0.005 nats of its own noise)."""
    rng = np.random.default_rng(seed)
    coefficients = step_decay_coefficients(steps)
    shape = predicted_trec(coefficients, 0.5, m_true)
    difficulty = rng.normal(0.0, 0.15, steps)
    measured = 3.0 + 0.1 * shape + difficulty
    reference = 4.0 + difficulty + rng.normal(0.0, 0.005, steps)
    return coefficients, measured, reference, shape


def test_difficulty_correction_recovers_a_known_shape_m_and_valley():
    coefficients, measured, reference, shape = constructed_run(m_true=1.2)
    steps = np.arange(coefficients.size)
    corrected = smooth(steps, measured - reference, coefficients.size, 0.03)
    raw = smooth(steps, measured, coefficients.size, 0.03)

    good = agreement(steps, corrected, coefficients, p=0.5, m=1.2)
    assert good.r_p > 0.97
    assert abs(good.m_fit - 1.2) <= 0.25 and good.r_p_fit >= good.r_p
    assert good.valley_error <= 0.02 and good.valley_predicted == pytest.approx((np.argmin(shape) + 1) / 400)
    assert good.r_p_m0 < good.r_p  # m = 0 misses the drift that m models

    noisy = agreement(steps, raw, coefficients, p=0.5, m=1.2)
    assert noisy.r_p < good.r_p - 0.2  # content difficulty swamps the uncorrected curve


def test_fit_m_finds_the_generating_exponent_on_a_clean_curve():
    coefficients = step_decay_coefficients()
    for m_true in (0.0, 0.8, 2.5):
        steps = np.arange(0, coefficients.size, 5)
        clean = 7.0 + 0.3 * predicted_trec(coefficients, 0.5, m_true)[steps]
        m, r = fit_m(steps, clean, coefficients, 0.5)
        assert m == pytest.approx(m_true, abs=0.011) and r == pytest.approx(1.0, abs=1e-9)


def law_runs(noise: float = 0.0, seed: int = 0) -> list[CalibrationRun]:
    rng = np.random.default_rng(seed)
    runs = []
    for i, (tpp, tau) in enumerate([(20, 0.1), (20, 0.3), (80, 0.1), (80, 0.3), (300, 0.2), (300, 0.5)]):
        m = 0.8 * tpp**0.25 * tau**-0.6 * np.exp(rng.normal(0, noise))
        runs.append(CalibrationRun(f"run{i}", "r", "uniform", "linear", tpp, tau, float(m), 0.95, 300))
    return runs


def test_calibration_recovers_a_known_law_and_predicts_with_it():
    fitted = fit_law(law_runs())
    law = fitted["laws"]["linear"]
    assert law["C"] == pytest.approx(0.8) and law["mu1"] == pytest.approx(0.25) and law["mu2"] == pytest.approx(-0.6)
    assert law["fitted"] == ["mu1", "mu2"] and law["note"] == ""
    assert law["r2_log"] == pytest.approx(1.0) and law["rms_log_error"] == pytest.approx(0.0, abs=1e-12)
    noisy = fit_law(law_runs(noise=0.2))["laws"]["linear"]
    target = np.log([run.m_star for run in law_runs(noise=0.2)])
    assert noisy["r2_log"] == pytest.approx(1.0 - len(target) * noisy["rms_log_error"] ** 2 / np.sum((target - target.mean()) ** 2))
    assert 0.0 < noisy["r2_log"] < 1.0
    m, name = law_m(fitted, "linear", 50.0, 0.2)
    assert name == "linear" and m == pytest.approx(0.8 * 50**0.25 * 0.2**-0.6)
    with pytest.raises(CalibrationError, match="no law for schedule 'step'"):
        law_m(fitted, "step", 50.0, 0.2)


def test_calibration_refuses_too_few_runs_and_does_not_fit_a_constant_variable():
    with pytest.raises(CalibrationError, match="at least 5"):
        fit_law(law_runs()[:4])
    same_tpp = [CalibrationRun(f"k{i}", "r", "uniform", "step", 50.0, tau, 2.0 * tau**-0.5, 0.9, 300) for i, tau in enumerate([0.1, 0.2, 0.3, 0.4, 0.5])]
    zero = CalibrationRun("z", "r", "uniform", "step", 50.0, 0.3, 0.0, 0.5, 300)
    fitted = fit_law([*same_tpp, zero])
    law = fitted["laws"]["step"]
    assert law["fitted"] == ["mu2"] and law["mu1"] == 0.0 and "mu1 (one TPP value)" in law["note"]
    assert law["mu2"] == pytest.approx(-0.5) and law["C"] == pytest.approx(2.0)
    assert fitted["excluded_m_zero"] == 1 and fitted["excluded_poor_fit"] == 0
    # a run whose curve fits no m well (best r_p below MIN_R_P_FIT) is left out, whatever its m*
    poor = CalibrationRun("p", "r", "uniform", "step", 50.0, 0.3, 0.09, MIN_R_P_FIT - 0.01, 300)
    with_poor = fit_law([*same_tpp, poor])
    assert with_poor["excluded_poor_fit"] == 1 and with_poor["laws"]["step"]["runs"] == [run.key for run in same_tpp]
    assert with_poor["laws"]["step"]["mu2"] == pytest.approx(-0.5)
    with pytest.raises(CalibrationError, match="1 with best r_p below 0.8"):
        fit_law([*same_tpp[:4], poor])
    # two families: each needs its own five runs; the pooled law covers the rest
    mixed = fit_law([*law_runs(), *same_tpp[:3]])
    assert set(mixed["laws"]) == {"linear", "all"} and "step" in mixed["not_fitted"]
    assert law_m(mixed, "step", 50.0, 0.3)[1] == "all"


def test_a_law_is_fitted_from_the_runs_of_one_p_and_says_which():
    low, high = law_runs(), [replace(run, key=f"high{i}", p=0.8, m_star=2 * run.m_star) for i, run in enumerate(law_runs())]
    low = [replace(run, p=0.5) for run in low]
    with pytest.raises(CalibrationError) as mixed:  # m* depends on p: never one law over both
        fit_law([*low, *high])
    assert "different trec.p (p 0.5: 6 runs, p 0.8: 6 runs)" in str(mixed.value)
    fitted = fit_law([*low, *high], p=0.8)
    assert fitted["p"] == 0.8 and fitted["excluded_other_p"] == 6 and fitted["runs"] == 6
    assert fitted["laws"]["linear"]["C"] == pytest.approx(1.6) and fitted["laws"]["linear"]["runs"] == [run.key for run in high]
    assert fit_law(low)["p"] == 0.5 and fit_law(law_runs())["p"] is None  # one p: taken as it is (None: recorded before p was)
    with pytest.raises(CalibrationError, match=r"from 0 run\(s\) at p 1 .*12 at another p left out"):
        fit_law([*low, *high], p=1.0)
