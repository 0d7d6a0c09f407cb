"""The measured TREC against the prediction: smoothing, normalization, agreement, the valley.

Pure numpy, for curves sampled at any set of steps (every step, every k-th, a random subset):

- `smooth`: a centered moving average whose window is a fraction of *training* (in steps), so the
  same setting means the same thing however densely the curve was sampled; near the ends the
  window shrinks to what exists.
- `minmax`: the shape in [0, 1] (for plots; Pearson's r does not change under it).
- `agreement`: Pearson's r_p of the smoothed measured curve with the predicted TREC at the same
  steps, for a given m (the prediction's), m = 0, and the in-sample best m (`fit_m`). Like is
  compared with like: the prediction is sampled at the measured steps and smoothed by the same
  window (a sharp feature such as a step decay's drop is blurred in both curves alike).
- The measured valley is the step of the lowest smoothed loss; its error is the distance from the
  valley of the prediction smoothed the same way, as a fraction of training.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.trec import predicted_trec

# m is searched on this grid (0 .. 8 by 0.01); r_p is smooth in m, so the grid is fine enough.
M_GRID = np.round(np.arange(0.0, 8.0 + 1e-9, 0.01), 2)
GRID_BLOCK = 32


def smooth(steps: np.ndarray, values: np.ndarray, total_steps: int, fraction: float) -> np.ndarray:
    """Centered moving average over a window of ``fraction * total_steps`` training steps.

    ``steps`` must be strictly increasing. Each point becomes the mean of the points whose step is
    within half a window of its own (cumulative sums and two binary searches: O(n log n)).
    ``values`` may be 2-D: each row (the last axis runs over ``steps``) is smoothed alike."""
    steps = np.asarray(steps, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    if steps.size != values.shape[-1]:
        raise ValueError(f"{steps.size} steps but {values.shape[-1]} values")
    if steps.size and np.any(np.diff(steps) <= 0):
        raise ValueError("steps must be strictly increasing")
    half = max(0.0, fraction * total_steps / 2.0)
    low = np.searchsorted(steps, steps - half, side="left")
    high = np.searchsorted(steps, steps + half, side="right")
    zeros = np.zeros(values.shape[:-1] + (1,))
    prefix = np.concatenate((zeros, np.cumsum(values, axis=-1)), axis=-1)
    return (prefix[..., high] - prefix[..., low]) / (high - low)


def minmax(values: np.ndarray) -> np.ndarray:
    """Values scaled to [0, 1] (all zeros for a constant curve)."""
    values = np.asarray(values, dtype=np.float64)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else np.zeros_like(values)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation; NaN when either curve is constant or has fewer than 3 points."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.size < 3:
        return float("nan")
    a = a - a.mean()
    b = b - b.mean()
    norm = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / norm) if norm > 0 else float("nan")


def fit_m(steps: np.ndarray, smoothed: np.ndarray, coefficients: np.ndarray, p: float, smoothing: float = 0.0) -> tuple[float, float]:
    """The m on `M_GRID` whose predicted TREC (sampled at ``steps``, smoothed by ``smoothing``
    like the measured curve) correlates best with ``smoothed``: (m, r_p)."""
    steps = np.asarray(steps, dtype=np.int64)
    total = coefficients.size
    peak_scaled = (coefficients[steps] / coefficients.max()) ** p
    log_fraction = np.log((steps + 1.0) / total)
    target = np.asarray(smoothed, dtype=np.float64) - np.mean(smoothed)
    target_norm = np.sqrt((target * target).sum())
    r = np.full(M_GRID.size, -np.inf)
    # blocks of grid values at once: memory is GRID_BLOCK x sampled steps
    for start in range(0, M_GRID.size, GRID_BLOCK):
        grid = M_GRID[start : start + GRID_BLOCK]
        predicted = smooth(steps, 1.0 - peak_scaled[None, :] * np.exp(grid[:, None] * log_fraction[None, :]), total, smoothing)
        centered = predicted - predicted.mean(axis=1, keepdims=True)
        norms = np.sqrt((centered * centered).sum(axis=1)) * target_norm
        with np.errstate(invalid="ignore", divide="ignore"):
            r[start : start + grid.size] = np.where(norms > 0, centered @ target / norms, -np.inf)
    best = int(np.argmax(r))
    return float(M_GRID[best]), float(r[best])


@dataclass(frozen=True)
class Agreement:
    """How well one measured curve agrees with the prediction."""

    r_p: float  # with the prediction's m
    r_p_m0: float  # with m = 0
    r_p_fit: float  # with the in-sample best m
    m: float
    m_fit: float
    valley_step: int
    valley_measured: float  # fraction of training, (step + 1) / T
    valley_predicted: float  # of the prediction smoothed like the measured curve
    valley_error: float  # |measured - predicted|, fraction of training

    def as_dict(self, suffix: str = "") -> dict[str, float]:
        return {
            f"trec_pearson{suffix}": self.r_p,
            f"trec_pearson_m0{suffix}": self.r_p_m0,
            f"trec_pearson_fit{suffix}": self.r_p_fit,
            f"m_fit{suffix}": self.m_fit,
            f"trec_valley_measured{suffix}": self.valley_measured,
            f"trec_valley_error{suffix}": self.valley_error,
        }


def agreement(steps: np.ndarray, smoothed: np.ndarray, coefficients: np.ndarray, p: float, m: float,
              smoothing: float = 0.0) -> Agreement:
    """Compare a measured curve (at ``steps``) smoothed by the window ``smoothing`` with the
    prediction from ``coefficients``, sampled at the same steps and smoothed by the same window."""
    steps = np.asarray(steps, dtype=np.int64)
    total = coefficients.size

    def predicted(exponent: float) -> np.ndarray:
        return smooth(steps, predicted_trec(coefficients, p, exponent)[steps], total, smoothing)

    prediction = predicted(m)
    m_fit, r_fit = fit_m(steps, smoothed, coefficients, p, smoothing)
    valley_step = int(steps[int(np.argmin(smoothed))])
    valley_measured = (valley_step + 1) / total
    valley_predicted = (int(steps[int(np.argmin(prediction))]) + 1) / total
    return Agreement(
        r_p=pearson(smoothed, prediction),
        r_p_m0=pearson(smoothed, predicted(0.0)),
        r_p_fit=r_fit,
        m=m,
        m_fit=m_fit,
        valley_step=valley_step,
        valley_measured=valley_measured,
        valley_predicted=valley_predicted,
        valley_error=abs(valley_measured - valley_predicted),
    )
