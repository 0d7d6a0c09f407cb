"""The thin torch adapter over `training.schedules.LRSchedule`: the trainer sets the LR of each
optimizer step from the same object the TREC predictor integrated, so the two cannot disagree."""

from __future__ import annotations

import torch

from training.schedules import LRSchedule


def set_step_lr(optimizer: torch.optim.Optimizer, schedule: LRSchedule, step: int) -> float:
    """Set every parameter group's LR to the schedule's LR of ``step`` (0-based); returns it.

    Call before ``optimizer.step()`` of step ``step``. AdamW then decays each weight by
    ``1 - lr * weight_decay``, the alpha_t of the predictor.
    """
    lr = schedule.lr_at(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr
