"""The comparison figure of `compare_curricula`: every variant's training loss, and its measured
TREC against its own prediction, on one figure (matplotlib, Agg)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.trec_measure import minmax
from training.trec_plot import png_bytes

SMOOTHING_STEPS = 0.02  # the training loss is drawn as a moving average over this fraction of training
MAX_POINTS = 4000  # longer curves are drawn from an evenly strided subset


@dataclass(frozen=True)
class VariantCurves:
    """One variant's curves, as fractions of training (``(step + 1) / steps``)."""

    name: str
    loss_fraction: np.ndarray
    loss: np.ndarray
    trec_fraction: np.ndarray
    trec_measured: np.ndarray  # smoothed; difficulty-corrected when the run had a reference
    trec_predicted: np.ndarray  # the prediction this variant's re-evaluation compared with
    corrected: bool


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start)."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values
    sums = np.cumsum(np.concatenate([[0.0], values]))
    counts = np.minimum(np.arange(1, values.size + 1), window)
    return (sums[1:] - sums[np.maximum(np.arange(1, values.size + 1) - window, 0)]) / counts


def plot_variant_curves(variants: list[VariantCurves], title: str) -> bytes:
    """PNG bytes: left, each variant's training loss (moving average); right, each variant's
    measured TREC (solid) and its own predicted TREC (dashed, same colour), min-max normalized."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (losses, trecs) = plt.subplots(1, 2, figsize=(13, 4.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for number, curves in enumerate(variants):
        color = colors[number % len(colors)]
        if curves.loss.size:
            window = max(1, round(SMOOTHING_STEPS * curves.loss.size))
            index = np.unique(np.linspace(0, curves.loss.size - 1, min(MAX_POINTS, curves.loss.size)).round().astype(np.int64))
            smoothed = moving_average(curves.loss, window)
            losses.plot(curves.loss_fraction[index], smoothed[index], color=color, linewidth=1.2, label=curves.name)
        if curves.trec_measured.size:
            kind = "corrected" if curves.corrected else "raw"
            trecs.plot(curves.trec_fraction, minmax(curves.trec_measured), color=color, linewidth=1.5, label=f"{curves.name}: measured ({kind})")
            trecs.plot(curves.trec_fraction, minmax(curves.trec_predicted), color=color, linewidth=1.0, linestyle="--",
                       label=f"{curves.name}: predicted")
    losses.set_xlabel("training fraction (s+1)/T")
    losses.set_ylabel("training loss (moving average)")
    losses.set_title("training loss")
    trecs.set_xlabel("training fraction (s+1)/T")
    trecs.set_ylabel("min-max normalized")
    trecs.set_title("TREC: measured (solid) vs its own prediction (dashed)")
    for axis in (losses, trecs):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="best")
    figure.suptitle(title)
    return png_bytes(figure)
