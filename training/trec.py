"""TREC prediction: AdamW's implicit EMA coefficients and the predicted re-evaluation curve.

Pure numpy; 10^6 steps take milliseconds. Formulas (docs/trec-math.md):

    alpha_t = eta_t * lambda
    c_t     = alpha_t * prod_{s>t} (1 - alpha_s)          computed as exp of a reversed cumsum of
                                                           log1p(-alpha): no loop, no underflow
    sum_t c_t + prod_t (1 - alpha_t) = 1
    tau     = 1 / (eta_peak * lambda * T)                  T counts warmup steps
    TPP     = D / N
    TREC(t) = 1 - (c_t / max c)^p * t_hat^m,               t_hat = (t+1)/T

c is normalized by its maximum before the power so that stored curves agree between
implementations. The valley is the step of lowest predicted TREC; `best_window` gives the
contiguous window of a given fraction of training with the lowest mean predicted TREC.

A variant with its own schedule is predicted from that schedule; a variant whose delivered model
averages checkpoints (``averaging``) is predicted from the averaged model's coefficients
(`training.averaging`), the raw final model's kept beside them (`AveragedPrediction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trecflow.recipe import AveragingSection, Recipe, ScheduleSection
from training.averaging import averaged_coefficients, averaging_weights, snapshot_steps
from training.schedules import LRSchedule, decay_rates

# Power Lines (Bergsma et al. 2025): tau_opt = coef * TPP ** POWER_LINES_EXPONENT.
POWER_LINES_EXPONENT = -0.527
# A recipe whose tau is more than this factor away from tau_opt gets a warning.
TAU_WARNING_FACTOR = 2.0


def ema_coefficients(lrs: np.ndarray, weight_decay: float) -> tuple[np.ndarray, float]:
    """EMA coefficient c_t of every step and the weight left on the initial weights.

    Returns ``(c, initial_weight)`` with ``c.sum() + initial_weight == 1`` up to rounding.
    Raises ValueError if any eta_t * lambda is outside [0, 1).
    """
    alpha = decay_rates(lrs, weight_decay)
    log_keep = np.log1p(-alpha)
    # suffix[t] = sum_{s > t} log(1 - alpha_s): total minus the inclusive prefix sum.
    inclusive = np.cumsum(log_keep)
    suffix = inclusive[-1] - inclusive
    coefficients = alpha * np.exp(suffix)
    return coefficients, float(np.exp(inclusive[-1]))


def ema_coefficients_loop(lrs: list[float], weight_decay: float) -> list[float]:
    """The same coefficients by a plain Python loop (the benchmark's baseline and a test oracle)."""
    coefficients = [0.0] * len(lrs)
    keep = 1.0  # prod_{s > t} (1 - alpha_s), built from the end
    for t in range(len(lrs) - 1, -1, -1):
        alpha = lrs[t] * weight_decay
        coefficients[t] = alpha * keep
        keep *= 1.0 - alpha
    return coefficients


def predicted_trec(coefficients: np.ndarray, p: float, m: float) -> np.ndarray:
    """1 - (c / max c)^p * t_hat^m with t_hat = (t+1)/T."""
    steps = coefficients.size
    peak = coefficients.max()
    if peak <= 0.0:
        raise ValueError("all EMA coefficients are zero (zero learning rate everywhere)")
    fraction = np.arange(1, steps + 1, dtype=np.float64) / steps
    return 1.0 - (coefficients / peak) ** p * fraction**m


def best_window(trec: np.ndarray, fraction: float) -> tuple[int, int]:
    """Contiguous window ``[start, end)`` of ``max(1, round(fraction*T))`` steps with the lowest
    mean predicted TREC (the earliest such window on ties)."""
    steps = trec.size
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"window fraction must be in (0, 1], got {fraction}")
    length = min(steps, max(1, round(fraction * steps)))
    prefix = np.concatenate(([0.0], np.cumsum(trec, dtype=np.float64)))
    window_sums = prefix[length:] - prefix[:-length]
    start = int(np.argmin(window_sums))
    return start, start + length


def tau_opt(tpp: float, coef: float = 1.0) -> float:
    """Power Lines' optimal normalized timescale for a tokens-per-parameter ratio."""
    return coef * tpp**POWER_LINES_EXPONENT


@dataclass(frozen=True)
class AveragedPrediction:
    """What checkpoint averaging changes: the snapshots (the step after which each is taken, oldest
    first), their weights, and the raw final model's coefficients, TREC and weight on theta_0,
    kept beside the averaged model's that the prediction carries."""

    averaging: AveragingSection
    snapshot_steps: np.ndarray = field(repr=False)
    weights: np.ndarray = field(repr=False)
    final_coefficients: np.ndarray = field(repr=False)
    final_trec: np.ndarray = field(repr=False)
    final_initial_weight: float

    @property
    def final_valley_step(self) -> int:
        return int(np.argmin(self.final_trec))

    def summary(self, hq_fraction: float) -> dict:
        """The ``averaging`` object of the prediction's summary."""
        steps = self.final_trec.size
        start, end = best_window(self.final_trec, hq_fraction)
        return {
            "kind": self.averaging.kind,
            "checkpoints": self.averaging.checkpoints,
            "every": self.averaging.every,
            "alpha": self.averaging.alpha,
            "snapshot_steps": self.snapshot_steps.tolist(),
            "weights": self.weights.tolist(),
            "final_initial_weight": self.final_initial_weight,
            "final_valley_step": self.final_valley_step,
            "final_valley_fraction": (self.final_valley_step + 1) / steps,
            "final_hq_window": [start / steps, end / steps],
            "final_hq_window_steps": [start, end],
        }


@dataclass(frozen=True)
class TrecPrediction:
    """Everything stage 2 predicts for a recipe. Arrays are indexed by step s = 0..T-1."""

    steps: int
    warmup_steps: int
    lrs: np.ndarray = field(repr=False)
    coefficients: np.ndarray = field(repr=False)
    trec: np.ndarray = field(repr=False)
    initial_weight: float
    tau: float
    tpp: float
    tau_opt: float
    weight_decay_opt: float
    p: float
    m: float
    schedule: ScheduleSection | None = None  # the schedule ``lrs`` come from
    averaged: AveragedPrediction | None = None  # with averaging: coefficients, trec and initial_weight are the averaged model's

    @property
    def fractions(self) -> np.ndarray:
        """Training fraction (s+1)/T of every step."""
        return np.arange(1, self.steps + 1, dtype=np.float64) / self.steps

    @property
    def valley_step(self) -> int:
        return int(np.argmin(self.trec))

    @property
    def valley_fraction(self) -> float:
        return (self.valley_step + 1) / self.steps

    def hq_window(self, fraction: float) -> tuple[int, int]:
        """Best window ``[start, end)`` in steps for a high-quality share ``fraction`` of training."""
        return best_window(self.trec, fraction)

    def warnings(self) -> list[str]:
        ratio = self.tau / self.tau_opt
        if ratio > TAU_WARNING_FACTOR or ratio < 1.0 / TAU_WARNING_FACTOR:
            return [
                f"tau = {self.tau:.4g} is {ratio:.2f}x the Power-Lines optimum {self.tau_opt:.4g} "
                f"for TPP = {self.tpp:.4g}; weight_decay {self.weight_decay_opt:.4g} would give it"
            ]
        return []

    def summary(self, hq_fraction: float) -> dict:
        """The JSON-able summary (the CLI's ``--json`` object and the stage's summary.json)."""
        start, end = self.hq_window(hq_fraction)
        return {
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "tau": self.tau,
            "tpp": self.tpp,
            "tau_opt": self.tau_opt,
            "tau_ratio": self.tau / self.tau_opt,
            "weight_decay_opt": self.weight_decay_opt,
            "p": self.p,
            "m": self.m,
            "initial_weight": self.initial_weight,
            "valley_step": self.valley_step,
            "valley_fraction": self.valley_fraction,
            "hq_fraction": hq_fraction,
            "hq_window": [start / self.steps, end / self.steps],
            "hq_window_steps": [start, end],
            "warnings": self.warnings(),
            **({"schedule": self.schedule.model_dump(mode="json")} if self.schedule is not None else {}),
            **({"averaging": self.averaged.summary(hq_fraction)} if self.averaged is not None else {}),
        }


def predict(recipe: Recipe, variant: str | None = None) -> TrecPrediction:
    """Predict the TREC of a validated recipe (``trec.m: calibrated`` resolved to a number first,
    by `tasks.calibrate.resolve_m`), as variant ``variant`` trains it: from its own schedule when it
    sets one (`Recipe.for_variant`, the object the trainer uses too), and with ``averaging`` as the
    averaged model's TREC, the raw final model's beside it."""
    if isinstance(recipe.trec.m, str):
        raise ValueError("trec.m: 'calibrated' must be resolved from the calibration law before predicting")
    averaging = recipe.averaging(variant)
    recipe = recipe.for_variant(variant)
    schedule = LRSchedule.from_recipe(recipe)
    lrs = schedule.lrs()
    weight_decay = recipe.optimizer.weight_decay
    coefficients, initial_weight = ema_coefficients(lrs, weight_decay)
    trec = predicted_trec(coefficients, recipe.trec.p, recipe.trec.m)
    averaged = None
    if averaging is not None:
        averaged = AveragedPrediction(averaging, snapshot_steps(averaging, lrs.size), averaging_weights(averaging), coefficients, trec,
                                      initial_weight)
        coefficients, initial_weight = averaged_coefficients(lrs, weight_decay, averaging)
        trec = predicted_trec(coefficients, recipe.trec.p, recipe.trec.m)
    steps = recipe.steps
    tpp = recipe.data.tokens / recipe.model.params
    optimum = tau_opt(tpp, recipe.trec.tau_opt_coef)
    return TrecPrediction(
        steps=steps,
        warmup_steps=schedule.warmup_steps,
        lrs=lrs,
        coefficients=coefficients,
        trec=trec,
        initial_weight=initial_weight,
        tau=1.0 / (recipe.optimizer.peak_lr * weight_decay * steps),
        tpp=tpp,
        tau_opt=optimum,
        weight_decay_opt=1.0 / (recipe.optimizer.peak_lr * steps * optimum),
        p=recipe.trec.p,
        m=recipe.trec.m,
        schedule=recipe.schedule,
        averaged=averaged,
    )


def recipe_summary(recipe: Recipe, prediction: TrecPrediction, hq_fraction: float) -> dict:
    """`TrecPrediction.summary` with the recipe's name and token accounting: what the CLI prints
    and the stage stores as summary.json."""
    return {
        "recipe": recipe.name,
        **prediction.summary(hq_fraction),
        "tokens_trained": recipe.tokens_trained,
        "tokens_unused": recipe.tokens_unused,
    }
