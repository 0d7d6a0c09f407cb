"""The trainer's LR comes from the predictor's schedule object, and PyTorch's AdamW applies the
decay the predictor assumes: with zero gradients the weights shrink by exactly prod(1 - alpha_t),
the weight the predictor leaves on theta_0."""

from __future__ import annotations

import pytest
import torch

from trecflow.recipe import ScheduleSection
from training.schedules import LRSchedule
from training.torch_schedule import set_step_lr
from training.trec import ema_coefficients


def test_adamw_decay_matches_the_predictors_initial_weight():
    schedule = LRSchedule(ScheduleSection(kind="cosine", warmup=0.1, final_lr_ratio=0.1), peak_lr=0.01, steps=200)
    weight_decay = 2.0
    weights = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    optimizer = torch.optim.AdamW([weights], lr=1.0, betas=(0.9, 0.95), weight_decay=weight_decay)
    applied = []
    for step in range(schedule.steps):
        applied.append(set_step_lr(optimizer, schedule, step))
        weights.grad = torch.zeros_like(weights)  # Adam's update is 0: only the decay acts
        optimizer.step()
    assert applied == schedule.lrs().tolist()
    _, initial_weight = ema_coefficients(schedule.lrs(), weight_decay)
    assert weights.detach().numpy() == pytest.approx([initial_weight] * 4, rel=1e-10)


@pytest.mark.parametrize(
    "section",
    [
        {"kind": "wsd", "warmup": 0.05, "cooldown": 0.3, "cooldown_shape": "1-sqrt", "final_lr_ratio": 0.33},
        {"kind": "wsd", "warmup": 0.05, "cooldown": 0.2, "cooldown_shape": "linear", "final_lr_ratio": 0.1},
        {"kind": "linear", "warmup": 0.1, "final_lr_ratio": 0.33},
        {"kind": "constant", "warmup": 0.1},
    ],
)
def test_the_optimizer_applies_exactly_the_predicted_lrs(section):
    """The torch side (`set_step_lr` on a real AdamW) and the numpy array the predictor integrates
    agree at every step, the wsd floor included."""
    schedule = LRSchedule(ScheduleSection(**section), peak_lr=3e-3, steps=120)
    weights = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    optimizer = torch.optim.AdamW([weights], lr=1.0, weight_decay=0.5)
    applied = []
    for step in range(schedule.steps):
        set_step_lr(optimizer, schedule, step)
        applied.append(optimizer.param_groups[0]["lr"])
        weights.grad = torch.zeros_like(weights)
        optimizer.step()
    assert applied == schedule.lrs().tolist()
    if section["kind"] == "wsd":
        assert applied[-1] == pytest.approx(section["final_lr_ratio"] * 3e-3, rel=1e-14)
