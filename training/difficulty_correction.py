"""The difficulty correction of a measured TREC: each step's loss minus beta times a reference
model's loss on the same sequences, with beta fitted out of sample.

How hard a batch is moves its loss far more than the TREC does; a reference model's loss on the
same sequences measures that difficulty. A fixed beta = 1 assumes the reference's losses move one
for one with the final model's, which a reference at another stage of training (the base model,
whose losses spread wider) does not: it over-corrects and adds the reference's own noise.

``fit`` regresses the final model's per-sequence loss on the reference's (least squares, pooled
over the sequences of half of the steps) and corrects the other half with that slope:
**cross-fitted** on alternate sampled steps, so no step is corrected with a beta that saw it and
the fit cannot take the TREC itself away (a slope fitted on a step's own losses could absorb
whatever of its TREC happens to correlate with its difficulty). Only per-step moments are needed:
the mean loss, the mean reference loss, the mean squared reference loss and the mean product,
each over the step's sequences — O(steps) memory whatever the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.trec_measure import smooth

FOLDS = 2


@dataclass(frozen=True)
class StepMoments:
    """Per sampled step, means over its sequences: loss y, reference loss r, r^2 and y*r (every
    step with the same number of sequences, so pooling is plain averaging)."""

    loss: np.ndarray
    reference: np.ndarray
    reference_sq: np.ndarray
    cross: np.ndarray

    @classmethod
    def of(cls, losses: np.ndarray, reference: np.ndarray) -> StepMoments:
        """From per-sequence losses and reference losses, both shaped (steps, sequences)."""
        losses, reference = np.asarray(losses, np.float64), np.asarray(reference, np.float64)
        return cls(losses.mean(axis=1), reference.mean(axis=1), (reference * reference).mean(axis=1), (losses * reference).mean(axis=1))


def pooled_fit(moments: StepMoments, rows: np.ndarray) -> tuple[float, float] | None:
    """Least-squares line ``loss ~ intercept + slope * reference`` over the sequences of ``rows``
    (None when the reference losses there do not vary)."""
    mean_r, mean_y = moments.reference[rows].mean(), moments.loss[rows].mean()
    variance = moments.reference_sq[rows].mean() - mean_r * mean_r
    if not np.isfinite(variance) or variance <= 1e-12 * max(1.0, mean_r * mean_r):
        return None
    slope = float((moments.cross[rows].mean() - mean_y * mean_r) / variance)
    return float(mean_y - slope * mean_r), slope


@dataclass(frozen=True)
class Correction:
    """The corrected per-step curve and the beta each fold of steps was corrected with."""

    corrected: np.ndarray
    betas: tuple[float, ...]
    fitted: bool


def correct(moments: StepMoments, beta: float | str) -> Correction:
    """``loss - beta * reference`` per step; ``beta = "fit"``: cross-fitted as the module says
    (fold k = the steps at even/odd positions, each corrected with the line fitted on the other
    fold: ``loss - (intercept + slope * reference)``, the intercept keeping both folds at one
    level; with fewer than 4 steps, or a reference without spread in a fold, it falls back to
    beta = 1)."""
    if beta != "fit":
        value = float(beta)
        return Correction(moments.loss - value * moments.reference, (value,), False)
    count = moments.loss.size
    position = np.arange(count) % FOLDS
    lines = [pooled_fit(moments, position != fold) for fold in range(FOLDS)] if count >= 2 * FOLDS else []
    if not lines or any(line is None for line in lines):
        return Correction(moments.loss - moments.reference, (1.0,), False)
    intercepts, slopes = (np.asarray(values)[position] for values in zip(*lines))
    return Correction(moments.loss - (intercepts + slopes * moments.reference), tuple(slope for _, slope in lines), True)


# --- the robust aggregate (stage 5's default: reevaluation.aggregate = "trimmed") ---

TRIM = 0.25  # share of each step's corrected sequence losses cut from each side before averaging
BETA_GRID = np.round(np.arange(0.0, 1.5 + 1e-9, 0.05), 2)  # the betas a robust fit chooses from


def trimmed_by_beta(losses: np.ndarray, reference: np.ndarray, grid: np.ndarray = BETA_GRID, trim: float = TRIM) -> np.ndarray:
    """Per step and beta, the trimmed mean of ``loss - beta * reference`` over the step's
    sequences: (steps, len(grid)). The per-sequence corrected losses have a heavy tail (sequences
    the final model knows far better than the reference), which the mean follows and the trimmed
    mean does not. O(steps x sequences x grid) work, done once per unit of re-evaluation."""
    losses, reference = np.asarray(losses, np.float64), np.asarray(reference, np.float64)
    count = losses.shape[1]
    cut = int(np.floor(trim * count))
    if 2 * cut >= count:
        raise ValueError(f"trim {trim} leaves no sequence of {count}")
    corrected = losses[:, :, None] - reference[:, :, None] * grid[None, None, :]  # (steps, sequences, grid)
    corrected.sort(axis=1)
    return corrected[:, cut : count - cut, :].mean(axis=1)


def high_frequency_noise(steps: np.ndarray, values: np.ndarray, total: int, smoothing: float) -> np.ndarray:
    """The SD of each column of ``values`` around its centered moving average (the noise the
    smoothing averages; the TREC itself, being smooth, barely enters it)."""
    return np.array([np.std(column - smooth(steps, column, total, smoothing)) for column in values.T])


def correct_robust(steps: np.ndarray, table: np.ndarray, total: int, smoothing: float, grid: np.ndarray = BETA_GRID,
                   beta: float | str = "fit") -> Correction:
    """The corrected curve from `trimmed_by_beta`'s ``table``. ``beta = "fit"``: each half of the
    steps (even / odd positions) takes the beta whose curve is least noisy on the *other* half,
    then each half's curve is shifted by its own mean (one constant per half: the two halves'
    betas may differ, and the TREC, sampled alike by both halves, keeps its shape). A number
    picks the grid's column (it must be on the grid)."""
    if beta != "fit":
        column = int(np.flatnonzero(np.isclose(grid, float(beta)))[0]) if np.isclose(grid, float(beta)).any() else None
        if column is None:
            raise ValueError(f"beta {beta} is not on the grid {grid[0]}..{grid[-1]} by {grid[1] - grid[0]:g}")
        return Correction(table[:, column].copy(), (float(grid[column]),), False)
    position = np.arange(steps.size) % FOLDS
    if steps.size < 4 * FOLDS:
        column = int(np.flatnonzero(np.isclose(grid, 1.0))[0])
        return Correction(table[:, column].copy(), (1.0,), False)
    chosen = []
    corrected = np.empty(steps.size)
    for fold in range(FOLDS):
        other = position != fold
        column = int(np.argmin(high_frequency_noise(steps[other], table[other], total, smoothing)))
        chosen.append(float(grid[column]))
        mine = position == fold
        corrected[mine] = table[mine, column] - table[mine, column].mean()
    return Correction(corrected, tuple(chosen), True)
