"""Each schedule kind's LR array has the documented shape (training/schedules.py docstring)."""

from __future__ import annotations

import numpy as np
import pytest

from trecflow.recipe import ScheduleSection
from training.schedules import LRSchedule

PEAK = 1e-3
T = 1000


def lrs(**section) -> np.ndarray:
    return LRSchedule(ScheduleSection(**section), peak_lr=PEAK, steps=T).lrs()


@pytest.mark.parametrize("kind", ["constant", "linear", "cosine", "step", "wsd", "inverse_sqrt"])
def test_warmup_is_linear_from_zero_to_peak(kind):
    lr = lrs(kind=kind, warmup=0.05)
    warm = 50
    np.testing.assert_allclose(lr[:warm], PEAK * np.arange(1, warm + 1) / warm)
    assert lr[warm - 1] == pytest.approx(PEAK)
    assert lr.max() == pytest.approx(PEAK)
    assert lr.shape == (T,) and np.all(lr >= 0)


def test_constant():
    lr = lrs(kind="constant", warmup=0.1)
    assert np.all(lr[100:] == PEAK)


def test_linear_decays_to_the_floor_at_the_last_step():
    lr = lrs(kind="linear", warmup=0.1, final_lr_ratio=0.1)
    post = lr[100:]
    assert post[-1] == pytest.approx(0.1 * PEAK)
    np.testing.assert_allclose(np.diff(post), -(0.9 * PEAK) / 900)  # a straight line
    # progress x = (s+1-W)/(T-W): the first step after warmup is one decrement below peak
    assert post[0] == pytest.approx(PEAK * (0.1 + 0.9 * (1 - 1 / 900)))


def test_linear_to_zero_without_warmup():
    lr = lrs(kind="linear")
    assert lr[-1] == 0.0 and lr[0] == pytest.approx(PEAK * (1 - 1 / T))


def test_cosine_half_way_is_the_mean_of_peak_and_floor():
    lr = lrs(kind="cosine", final_lr_ratio=0.2)
    assert lr[-1] == pytest.approx(0.2 * PEAK)
    assert lr[T // 2 - 1] == pytest.approx(PEAK * (0.2 + 0.8 * 0.5))  # x = 0.5
    assert np.all(np.diff(lr) <= 0)


def test_step_drops_once_by_the_factor():
    lr = lrs(kind="step", warmup=0.05, drop_at=0.7, drop_factor=0.1)
    assert np.all(lr[50:700] == PEAK)
    assert np.all(lr[700:] == pytest.approx(0.1 * PEAK))


@pytest.mark.parametrize(("shape", "curve"), [("linear", lambda y: 1 - y), ("1-sqrt", lambda y: 1 - np.sqrt(y))])
def test_wsd_is_stable_then_cools_down_to_zero(shape, curve):
    lr = lrs(kind="wsd", warmup=0.05, cooldown=0.2, cooldown_shape=shape)
    assert np.all(lr[50:800] == PEAK)
    y = np.arange(1, 201) / 200
    np.testing.assert_allclose(lr[800:], PEAK * curve(y), atol=1e-15)
    assert lr[-1] == 0.0


def test_inverse_sqrt_halves_after_three_timescales():
    lr = lrs(kind="inverse_sqrt", warmup=0.1, timescale=100)
    assert lr[100] == pytest.approx(PEAK)
    assert lr[100 + 300] == pytest.approx(PEAK / 2)
    assert np.all(np.diff(lr[100:]) < 0)


def test_lr_at_matches_the_array_and_the_array_is_a_copy():
    schedule = LRSchedule(ScheduleSection(kind="cosine", warmup=0.1), peak_lr=PEAK, steps=T)
    array = schedule.lrs()
    assert [schedule.lr_at(s) for s in (0, 99, 500, T - 1)] == [array[s] for s in (0, 99, 500, T - 1)]
    array[:] = 0
    assert schedule.lr_at(500) > 0
    with pytest.raises(IndexError):
        schedule.lr_at(T)


@pytest.mark.parametrize(("shape", "curve"), [("linear", lambda y: 1 - y), ("1-sqrt", lambda y: 1 - np.sqrt(y))])
def test_wsd_cools_down_to_its_floor(shape, curve):
    lr = lrs(kind="wsd", warmup=0.05, cooldown=0.2, cooldown_shape=shape, final_lr_ratio=0.33)
    assert np.all(lr[50:800] == PEAK)
    y = np.arange(1, 201) / 200
    np.testing.assert_allclose(lr[800:], PEAK * (0.33 + 0.67 * curve(y)), rtol=1e-14)
    assert lr[-1] == pytest.approx(0.33 * PEAK, rel=1e-14) and lr[799] == PEAK
    assert np.all(np.diff(lr[800:]) < 0)
