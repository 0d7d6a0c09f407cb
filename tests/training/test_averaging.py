"""Checkpoint averaging as the predictor sees it: the snapshots and their weights, the merge-aware
coefficients against the plain loop run to each snapshot, a real AdamW's averaged weights, and the
averaged model's valley."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from trecflow.recipe import AveragingSection, ScheduleSection, parse_recipe, read_yaml
from training.averaging import SnapshotAverage, averaged_coefficients, averaging_weights, checkpoint_coefficients, snapshot_steps
from training.schedules import LRSchedule
from training.torch_schedule import set_step_lr
from training.trec import ema_coefficients, ema_coefficients_loop, predict

from ..conftest import CONFIGS

BASE = read_yaml((CONFIGS / "test.yaml").read_text())


def ema(checkpoints: int, every: int, alpha: float) -> AveragingSection:
    return AveragingSection(kind="ema", checkpoints=checkpoints, every=every, alpha=alpha)


def sma(checkpoints: int, every: int) -> AveragingSection:
    return AveragingSection(kind="sma", checkpoints=checkpoints, every=every)


def test_snapshots_end_at_the_last_step_every_s_steps_apart():
    assert snapshot_steps(sma(6, 50), 1000).tolist() == [749, 799, 849, 899, 949, 999]
    assert snapshot_steps(sma(1, 7), 10).tolist() == [9]
    assert snapshot_steps(sma(4, 3), 10).tolist() == [0, 3, 6, 9]  # (K-1)*S = 9 < 10: the oldest is step 0
    with pytest.raises(ValueError, match="do not fit"):
        snapshot_steps(sma(4, 3), 9)


def test_sma_weighs_every_snapshot_equally():
    np.testing.assert_array_equal(averaging_weights(sma(4, 10)), [0.25, 0.25, 0.25, 0.25])
    assert averaging_weights(sma(1, 10)).tolist() == [1.0]


@pytest.mark.parametrize(("checkpoints", "alpha"), [(6, 0.2), (3, 0.5), (1, 0.3), (5, 1.0)])
def test_ema_weights_newest_alpha_oldest_the_rest(checkpoints, alpha):
    weights = averaging_weights(ema(checkpoints, 10, alpha))
    assert weights.sum() == pytest.approx(1.0, abs=1e-15)
    assert weights[-1] == pytest.approx(alpha if checkpoints > 1 else 1.0)
    assert weights[0] == pytest.approx((1 - alpha) ** (checkpoints - 1))
    for newer_rank in range(1, checkpoints):  # the k-th newest weighs A(1 - A)^(k-1)
        assert weights[checkpoints - newer_rank] == pytest.approx(alpha * (1 - alpha) ** (newer_rank - 1))
    # the same weights as folding the snapshots in from the oldest: theta <- (1 - A) theta + A theta_k
    folded = np.eye(checkpoints)[0]
    for snapshot in np.eye(checkpoints)[1:]:
        folded = (1 - alpha) * folded + alpha * snapshot
    np.testing.assert_allclose(weights, folded, rtol=1e-15)


def test_paper_ema_weights():
    np.testing.assert_allclose(averaging_weights(ema(6, 10, 0.2)), [0.32768, 0.08192, 0.1024, 0.128, 0.16, 0.2], rtol=1e-12)


@pytest.mark.parametrize("averaging", [sma(5, 37), ema(6, 40, 0.2), ema(3, 1, 0.7)], ids=["sma", "ema", "ema-adjacent"])
def test_merge_aware_coefficients_are_the_average_of_the_loop_run_to_each_snapshot(averaging):
    lrs = LRSchedule(ScheduleSection(kind="cosine", warmup=0.05, final_lr_ratio=0.1), peak_lr=2e-3, steps=400).lrs()
    weight_decay = 0.8
    snapshots = snapshot_steps(averaging, lrs.size)
    per_snapshot, initial = checkpoint_coefficients(lrs, weight_decay, snapshots)
    for row, step in zip(per_snapshot, snapshots):
        expected = np.zeros(lrs.size)
        expected[: step + 1] = ema_coefficients_loop(lrs[: step + 1].tolist(), weight_decay)
        np.testing.assert_allclose(row, expected, rtol=1e-12, atol=0.0)
    weights = averaging_weights(averaging)
    loop_average = sum(weight * np.pad(ema_coefficients_loop(lrs[: step + 1].tolist(), weight_decay), (0, lrs.size - step - 1))
                       for weight, step in zip(weights, snapshots))
    coefficients, initial_weight = averaged_coefficients(lrs, weight_decay, averaging)
    np.testing.assert_allclose(coefficients, loop_average, rtol=1e-12, atol=0.0)
    expected_initial = sum(weight * np.prod(1 - lrs[: step + 1] * weight_decay) for weight, step in zip(weights, snapshots))
    assert initial_weight == pytest.approx(expected_initial, rel=1e-12)
    assert coefficients.sum() + initial_weight == pytest.approx(1.0, abs=1e-12)
    assert np.all(coefficients[snapshots[-1] + 1 :] == 0)  # nothing after the last snapshot (it is the last step here)


def test_a_million_steps_without_overflow():
    lrs = LRSchedule(ScheduleSection(kind="constant"), peak_lr=1e-3, steps=1_000_000).lrs()
    coefficients, initial = averaged_coefficients(lrs, 0.5, ema(6, 20_000, 0.2))  # tau = 0.002: exp(-500) early on
    assert np.all(np.isfinite(coefficients)) and coefficients[-1] > 0
    assert coefficients.sum() + initial == pytest.approx(1.0, abs=1e-9)


def _adamw_trajectory(schedule: LRSchedule, weight_decay: float, gradients: np.ndarray | None, start: np.ndarray):
    """A real AdamW over the schedule: the weights after every step (T x n), float64."""
    weights = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    optimizer = torch.optim.AdamW([weights], lr=1.0, betas=(0.9, 0.95), weight_decay=weight_decay)
    after = []
    for step in range(schedule.steps):
        set_step_lr(optimizer, schedule, step)
        weights.grad = torch.zeros_like(weights) if gradients is None else torch.tensor(gradients[step])
        optimizer.step()
        after.append(weights.detach().numpy().copy())
    return np.array(after)


@pytest.mark.parametrize("averaging", [sma(4, 25), ema(6, 20, 0.2)], ids=["sma", "ema"])
def test_adamw_zero_gradients_the_averaged_weights_are_the_predicted_weight_on_theta0(averaging):
    schedule = LRSchedule(ScheduleSection(kind="cosine", warmup=0.1, final_lr_ratio=0.1), peak_lr=0.01, steps=200)
    weight_decay = 2.0
    start = np.array([1.0, -2.0, 0.5, 3.0])
    trajectory = _adamw_trajectory(schedule, weight_decay, None, start)
    averaged = averaging_weights(averaging) @ trajectory[snapshot_steps(averaging, schedule.steps)]
    _, initial_weight = averaged_coefficients(schedule.lrs(), weight_decay, averaging)
    np.testing.assert_allclose(averaged, initial_weight * start, rtol=1e-10)
    _, final_initial = ema_coefficients(schedule.lrs(), weight_decay)
    assert initial_weight > final_initial  # the older snapshots kept more of theta_0


@pytest.mark.parametrize("averaging", [sma(4, 25), ema(6, 20, 0.2)], ids=["sma", "ema"])
def test_the_jobs_running_average_of_a_zero_gradient_adamw_is_the_predicted_weight_on_theta0(averaging):
    """What the training job does (`SnapshotAverage` folded after each snapshot step, carried
    through a checkpoint in the middle) on a real AdamW with zero gradients: the predicted
    averaged model's weight on theta_0, to 1e-10."""
    schedule = LRSchedule(ScheduleSection(kind="cosine", warmup=0.1, final_lr_ratio=0.1), peak_lr=0.01, steps=200)
    weight_decay, start = 2.0, torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=torch.float64)
    snapshots = snapshot_steps(averaging, schedule.steps)
    weights = torch.nn.Parameter(start.clone())
    optimizer = torch.optim.AdamW([weights], lr=1.0, betas=(0.9, 0.95), weight_decay=weight_decay)
    average = SnapshotAverage(snapshots, averaging_weights(averaging))
    resume_at = int(snapshots[1]) + 3  # a checkpoint after the second snapshot: the state a resumed run restores
    for step in range(schedule.steps):
        set_step_lr(optimizer, schedule, step)
        weights.grad = torch.zeros_like(weights)
        optimizer.step()
        if average.wants(step):
            average.fold(step, [("w", weights)])
        if step + 1 == resume_at:
            restored = SnapshotAverage(snapshots, averaging_weights(averaging))
            restored.restore(copy.deepcopy(average.state()), resume_at)
            average = restored
    assert average.complete and average.folded == snapshots.tolist()
    _, initial_weight = averaged_coefficients(schedule.lrs(), weight_decay, averaging)
    np.testing.assert_allclose(average.sums["w"].numpy(), initial_weight * start.numpy(), rtol=1e-10)
    first = int(snapshots[0])
    with pytest.raises(ValueError, match=rf"folded the snapshots \[\], but a run resuming at step {first + 1} needs exactly \[{first}\]"):
        SnapshotAverage(snapshots, averaging_weights(averaging)).restore({"folded": [], "sums": {}}, first + 1)
    with pytest.raises(ValueError, match="not a snapshot still to fold"):
        average.fold(int(snapshots[-1]), [("w", weights)])


def test_adamw_any_gradients_the_averaged_weights_are_the_averaged_coefficients_on_the_updates():
    """theta_s = (1 - alpha_s) theta_{s-1} + alpha_s x_s: each step's x_s read off a real AdamW run
    with random gradients, the average of the snapshots is initial * theta_0 + sum_t cbar_t x_t."""
    schedule = LRSchedule(ScheduleSection(kind="linear", warmup=0.05, final_lr_ratio=0.2), peak_lr=0.01, steps=150)
    weight_decay, averaging = 3.0, ema(5, 12, 0.3)
    start = np.array([0.3, -1.0, 2.0])
    gradients = np.random.default_rng(0).normal(size=(schedule.steps, start.size))
    trajectory = _adamw_trajectory(schedule, weight_decay, gradients, start)
    alpha = schedule.lrs() * weight_decay
    previous = np.vstack([start, trajectory[:-1]])
    inputs = (trajectory - (1 - alpha)[:, None] * previous) / alpha[:, None]  # x_s
    coefficients, initial_weight = averaged_coefficients(schedule.lrs(), weight_decay, averaging)
    averaged = averaging_weights(averaging) @ trajectory[snapshot_steps(averaging, schedule.steps)]
    np.testing.assert_allclose(averaged, initial_weight * start + coefficients @ inputs, rtol=1e-9, atol=1e-12)


def _recipe(variants: dict, steps: int = 1000, tau: float = 0.1):
    data = copy.deepcopy(BASE)
    data["data"] = {"tokens": steps * 512, "seq_len": 64}
    data["batch"] = {"tokens": 512}
    data["optimizer"] = {"peak_lr": 1e-3, "weight_decay": 1.0 / (tau * 1e-3 * steps), "betas": [0.9, 0.95]}
    data["schedule"] = {"kind": "linear", "warmup": 0.01}
    data["trec"] = {"p": 0.5, "m": 0.0}
    data["curriculum"]["variants"] = variants
    return parse_recipe(data)


def test_under_a_constant_lr_the_raw_valley_is_the_end_and_the_averaged_one_earlier():
    recipe = _recipe({
        "constant": {"strategy": "trec_valley", "schedule": {"kind": "constant"}},
        "constant-sma": {"strategy": "trec_valley", "schedule": {"kind": "constant"}, "averaging": {"kind": "sma", "checkpoints": 6, "every": 40}},
        "constant-ema": {"strategy": "trec_valley", "schedule": {"kind": "constant"},
                         "averaging": {"kind": "ema", "checkpoints": 6, "every": 40, "alpha": 0.2}},
    })
    raw = predict(recipe, "constant")
    assert raw.valley_step == 999 and raw.averaged is None
    for name in ("constant-sma", "constant-ema"):
        averaged = predict(recipe, name)
        assert averaged.averaged.final_valley_step == 999
        np.testing.assert_array_equal(averaged.averaged.final_trec, raw.trec)  # the raw final model's curve is kept beside
        np.testing.assert_array_equal(averaged.lrs, raw.lrs)
        # a step's c only drops when a snapshot stops seeing it: the valley is the oldest snapshot (weights 0.17 / 0.33)
        assert averaged.valley_step == 999 - 5 * 40 == averaged.averaged.snapshot_steps[0]
        start, end = averaged.hq_window(0.1)
        assert raw.hq_window(0.1) == (900, 1000)
        assert start <= averaged.valley_step < end <= 900  # the HQ window moves to the averaged valley, off the end


def test_the_newest_snapshot_alone_is_the_final_model():
    recipe = _recipe({"one": {"strategy": "trec_valley", "averaging": {"kind": "sma", "checkpoints": 1, "every": 5}}})
    plain, one = predict(recipe), predict(recipe, "one")
    np.testing.assert_array_equal(one.coefficients, plain.coefficients)
    assert one.initial_weight == plain.initial_weight and one.valley_step == plain.valley_step
