"""Learning-rate schedules: the single source of truth for the LR of every step.

`LRSchedule.from_recipe(recipe)` gives the LR that step ``s`` (0-based) uses, for every kind, as
one numpy array. The TREC predictor integrates this array and the trainer drives its optimizer from
the same object (`training.torch_schedule`), so the two can never disagree.

Shape of every kind (T steps, W = round(warmup*T) warmup steps, peak = optimizer.peak_lr):
- warmup, s < W:        eta_s = peak * (s+1)/W
- after warmup the decay progress of step s is x_s = (s+1-W)/(T-W), in (0, 1], so the last step
  uses the schedule's end value (e.g. exactly the floor of a linear decay):
- constant:             peak
- linear:               peak * (r + (1-r)*(1-x)),                       r = final_lr_ratio
- cosine:               peak * (r + (1-r)*(1+cos(pi*x))/2)
- step:                 peak, times drop_factor for s >= round(drop_at*T)
- wsd:                  peak, then over the last C = round(cooldown*T) steps with progress
                        y = (s+1-(T-C))/C in (0, 1], down to the floor r = final_lr_ratio:
                        peak*(r + (1-r)*(1-y)) (linear) or peak*(r + (1-r)*(1-sqrt(y))) (1-sqrt)
- inverse_sqrt:         peak * sqrt(timescale / (timescale + s - W))
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trecflow.recipe import Recipe, ScheduleSection


@dataclass(frozen=True)
class LRSchedule:
    """The LR of each of ``steps`` optimizer steps for one schedule section and peak LR."""

    section: ScheduleSection
    peak_lr: float
    steps: int

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> LRSchedule:
        return cls(section=recipe.schedule, peak_lr=recipe.optimizer.peak_lr, steps=recipe.steps)

    @property
    def warmup_steps(self) -> int:
        return round(self.section.warmup * self.steps)

    def lr_at(self, step: int) -> float:
        """LR of one step (the trainer's per-step lookup); equals ``lrs()[step]``."""
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} outside 0..{self.steps - 1}")
        return float(self._lrs_cached()[step])

    def lrs(self) -> np.ndarray:
        """The LR of steps 0..T-1 as a float64 array (a fresh copy)."""
        return self._lrs_cached().copy()

    def _lrs_cached(self) -> np.ndarray:
        cached = self.__dict__.get("_lrs")
        if cached is None:
            cached = self._compute()
            cached.flags.writeable = False
            object.__setattr__(self, "_lrs", cached)
        return cached

    def _compute(self) -> np.ndarray:
        sec, peak, total = self.section, self.peak_lr, self.steps
        warm = self.warmup_steps
        s = np.arange(total, dtype=np.float64)
        lr = np.full(total, peak, dtype=np.float64)
        lr[:warm] = peak * (s[:warm] + 1.0) / warm
        post = s[warm:]
        x = (post + 1.0 - warm) / (total - warm)
        floor = sec.final_lr_ratio
        if sec.kind == "linear":
            lr[warm:] = peak * (floor + (1.0 - floor) * (1.0 - x))
        elif sec.kind == "cosine":
            lr[warm:] = peak * (floor + (1.0 - floor) * 0.5 * (1.0 + np.cos(np.pi * x)))
        elif sec.kind == "step":
            drop = round(sec.drop_at * total)
            lr[max(drop, warm):] = peak * sec.drop_factor
        elif sec.kind == "wsd":
            cool = max(1, round(sec.cooldown * total))
            start = total - cool
            y = (s[start:] + 1.0 - start) / cool
            decay = np.sqrt(y) if sec.cooldown_shape == "1-sqrt" else y
            lr[start:] = peak * (floor + (1.0 - floor) * (1.0 - decay))
        elif sec.kind == "inverse_sqrt":
            lr[warm:] = peak * np.sqrt(sec.timescale / (sec.timescale + post - warm))
        elif sec.kind != "constant":  # pragma: no cover - the recipe model rejects unknown kinds
            raise ValueError(f"schedule.kind: unknown kind {sec.kind!r}")
        return lr


def describe_schedule(section: ScheduleSection) -> str:
    """The schedule in words, with only the keys its kind uses (what reports show)."""
    parts = [section.kind]
    if section.warmup:
        parts.append(f"warmup {section.warmup:g}")
    if section.kind in ("linear", "cosine"):
        parts.append(f"to {section.final_lr_ratio:g} x peak")
    elif section.kind == "step":
        parts.append(f"x {section.drop_factor:g} at {section.drop_at:g}")
    elif section.kind == "wsd":
        parts.append(f"{section.cooldown_shape} cooldown over the last {section.cooldown:g} to {section.final_lr_ratio:g} x peak")
    elif section.kind == "inverse_sqrt":
        parts.append(f"timescale {section.timescale:g} steps")
    return ", ".join(parts)


def decay_rates(lrs: np.ndarray, weight_decay: float) -> np.ndarray:
    """alpha_t = eta_t * lambda of every step (float64). Raises ValueError when there are no steps
    or any alpha_t is outside [0, 1) (AdamW's decay factor 1 - alpha_t must stay in (0, 1])."""
    alpha = np.asarray(lrs, dtype=np.float64) * weight_decay
    if alpha.size == 0:
        raise ValueError("no steps")
    if not (np.all(alpha >= 0.0) and np.all(alpha < 1.0)):
        bad = int(np.argmax((alpha < 0.0) | (alpha >= 1.0)))
        raise ValueError(f"eta*lambda must be in [0, 1) at every step; step {bad} has {alpha[bad]:g}")
    return alpha
