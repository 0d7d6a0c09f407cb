"""The prediction plot: LR, EMA coefficients and predicted TREC against the training fraction,
with the valley and the high-quality window marked. Matplotlib (Agg) is imported on first use."""

from __future__ import annotations

import io

import numpy as np

from training.trec import TrecPrediction

# Curves longer than this are drawn from an evenly strided subset (the last step always kept).
MAX_PLOT_POINTS = 4000


def _strided(steps: int) -> np.ndarray:
    if steps <= MAX_PLOT_POINTS:
        return np.arange(steps)
    index = np.linspace(0, steps - 1, MAX_PLOT_POINTS).round().astype(np.int64)
    return np.unique(index)


def png_bytes(figure) -> bytes:
    """The figure as PNG bytes (laid out tight, 100 dpi); the figure is closed."""
    import matplotlib.pyplot as plt

    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def plot_prediction(prediction: TrecPrediction, hq_fraction: float, title: str = "") -> bytes:
    """PNG bytes of the three-panel prediction plot. With checkpoint averaging the c and TREC
    panels show the averaged model's curve and, dashed, the raw final model's, with its valley and
    the snapshots marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _strided(prediction.steps)
    x = prediction.fractions[index]
    start, end = prediction.hq_window(hq_fraction)
    window = (start / prediction.steps, end / prediction.steps)
    valley = prediction.valley_fraction

    figure, axes = plt.subplots(3, 1, figsize=(8, 8), sharex=True)
    panels = [
        (prediction.lrs, "learning rate", "tab:blue"),
        (prediction.coefficients, "EMA coefficient c_t", "tab:green"),
        (prediction.trec, f"predicted TREC (p={prediction.p:g}, m={prediction.m:g})", "tab:red"),
    ]
    averaged = prediction.averaged
    model = " (averaged model)" if averaged is not None else ""
    for number, (axis, (values, label, color)) in enumerate(zip(axes, panels, strict=True)):
        averaged_label = f"{label.split(' (')[0]}{model}" if averaged is not None and number > 0 else None
        axis.plot(x, values[index], color=color, linewidth=1.2, label=averaged_label)
        axis.set_ylabel(label)
        axis.axvspan(*window, color="gold", alpha=0.25, label=f"HQ window w={hq_fraction:g}")
        axis.axvline(valley, color="black", linestyle="--", linewidth=0.8, label=f"valley {valley:.3f}{model}")
        axis.grid(alpha=0.3)
    if averaged is not None:
        final_valley = (averaged.final_valley_step + 1) / prediction.steps
        for axis, values in ((axes[1], averaged.final_coefficients), (axes[2], averaged.final_trec)):
            axis.plot(x, values[index], color="tab:gray", linestyle="--", linewidth=1.0, label="raw final model")
            axis.axvline(final_valley, color="tab:gray", linestyle=":", linewidth=0.9, label=f"raw final valley {final_valley:.3f}")
            axis.legend(loc="best", fontsize=7)
        for step in averaged.snapshot_steps:
            axes[0].axvline((step + 1) / prediction.steps, color="tab:purple", linewidth=0.6, alpha=0.6)
        axes[0].plot([], [], color="tab:purple", linewidth=0.6, label=f"{averaged.averaging.kind} snapshots ({averaged.averaging.checkpoints})")
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel("training fraction (s+1)/T")
    figure.suptitle(title or f"TREC prediction: {prediction.steps} steps, tau={prediction.tau:.3g}")
    return png_bytes(figure)


def plot_placement(
    fractions: np.ndarray, trec: np.ndarray, hq_share: np.ndarray, window: list[float] | None, hq_fraction: float, title: str = ""
) -> bytes:
    """PNG bytes: the high-quality share of every step's batch over the predicted TREC, with the
    strategy's window (if any) shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = _strided(fractions.size)
    figure, share_axis = plt.subplots(figsize=(9, 4.5))
    share_axis.fill_between(fractions[index], hq_share[index], step="pre", color="tab:green", alpha=0.35, label="HQ share of the batch")
    share_axis.axhline(hq_fraction, color="tab:green", linestyle=":", linewidth=0.9, label=f"w = {hq_fraction:.3g}")
    share_axis.set_ylim(0, 1.05)
    share_axis.set_ylabel("HQ share of the batch")
    share_axis.set_xlabel("training fraction (s+1)/T")
    if window is not None:
        share_axis.axvspan(*window, color="gold", alpha=0.25, label=f"window [{window[0]:.3f}, {window[1]:.3f}]")
    trec_axis = share_axis.twinx()
    trec_axis.plot(fractions[index], trec[index], color="tab:red", linewidth=1.2, label="predicted TREC")
    trec_axis.set_ylabel("predicted TREC")
    handles = share_axis.get_legend_handles_labels()[0] + trec_axis.get_legend_handles_labels()[0]
    share_axis.legend(handles=handles, loc="upper left", fontsize=8)
    share_axis.grid(alpha=0.3)
    figure.suptitle(title or "curriculum placement")
    return png_bytes(figure)


def plot_measured(
    fractions: np.ndarray,
    raw: np.ndarray,
    raw_smoothed: np.ndarray,
    corrected_smoothed: np.ndarray | None,
    predicted_fractions: np.ndarray,
    predicted: np.ndarray,
    valleys: dict[str, float],
    window: list[float] | None,
    title: str = "",
) -> bytes:
    """PNG bytes: the measured TREC (per step and smoothed; difficulty-corrected when given) over
    the prediction, each min-max normalized, with the valleys and the curriculum's HQ window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.trec_measure import minmax

    figure, axis = plt.subplots(figsize=(9, 4.8))
    index = _strided(fractions.size)
    low, high = raw_smoothed.min(), raw_smoothed.max()
    span = high - low if high > low else 1.0
    axis.scatter(fractions[index], ((raw - low) / span)[index], s=4, color="tab:gray", alpha=0.35, label="measured, per step (raw)")
    axis.plot(fractions[index], minmax(raw_smoothed)[index], color="tab:blue", linewidth=1.2, label="measured, smoothed (raw)")
    if corrected_smoothed is not None:
        axis.plot(fractions[index], minmax(corrected_smoothed)[index], color="tab:green", linewidth=1.6, label="measured, smoothed, corrected")
    predicted_index = _strided(predicted_fractions.size)
    axis.plot(predicted_fractions[predicted_index], minmax(predicted)[predicted_index], color="tab:red", linewidth=1.4, label="predicted")
    styles = {"predicted": ("tab:red", "--"), "measured": ("tab:green" if corrected_smoothed is not None else "tab:blue", ":")}
    for name, where in valleys.items():
        color, style = styles.get(name, ("black", "-."))
        axis.axvline(where, color=color, linestyle=style, linewidth=1.0, label=f"{name} valley {where:.3f}")
    if window is not None:
        axis.axvspan(*window, color="gold", alpha=0.25, label=f"HQ window [{window[0]:.3f}, {window[1]:.3f}]")
    axis.set_ylim(-0.2, 1.2)
    axis.set_xlabel("training fraction (s+1)/T")
    axis.set_ylabel("min-max normalized loss")
    axis.legend(loc="upper left", fontsize=7)
    axis.grid(alpha=0.3)
    figure.suptitle(title or "measured vs predicted TREC")
    return png_bytes(figure)


def plot_comparison(predictions: list[tuple[list[str], np.ndarray, np.ndarray]], rows: list[dict], title: str = "") -> bytes:
    """PNG bytes: held-out losses per variant (hq and general) beside the predicted TREC with each
    variant's HQ window and measured valley. ``predictions``: each distinct predicted TREC as
    ``(the variants it belongs to, fractions, values)``; a variant with its own schedule or averaging
    is drawn against its own prediction, in its colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (bars, curve) = plt.subplots(1, 2, figsize=(12, 4.6), gridspec_kw={"width_ratios": [1, 1.4]})
    names = [row["variant"] for row in rows]
    x = np.arange(len(rows))
    for offset, key, color in ((-0.2, "val_loss_hq", "tab:green"), (0.2, "val_loss_general", "tab:gray")):
        values = [np.nan if row[key] is None else row[key] for row in rows]
        bars.bar(x + offset, values, width=0.4, color=color, label=key)
        for xi, value in zip(x + offset, values):
            if np.isfinite(value):
                bars.annotate(f"{value:.3f}", (xi, value), ha="center", va="bottom", fontsize=7)
    finite = [row[key] for row in rows for key in ("val_loss_hq", "val_loss_general") if row[key] is not None]
    if finite:
        bars.set_ylim(min(finite) * 0.97, max(finite) * 1.02)
    bars.set_xticks(x, names)
    bars.set_ylabel("held-out loss (nats/token)")
    bars.legend(fontsize=8)
    bars.grid(axis="y", alpha=0.3)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of = {row["variant"]: colors[number % len(colors)] for number, row in enumerate(rows)}
    for owners, fractions, predicted in predictions:
        index = _strided(fractions.size)
        own = len(predictions) > 1 and len(owners) == 1  # one variant's own prediction: its colour
        curve.plot(fractions[index], predicted[index], color=color_of.get(owners[0], "tab:red") if own else "tab:red", linewidth=1.3,
                   linestyle="--" if own else "-", label=f"predicted TREC ({', '.join(owners)})")
    for number, row in enumerate(rows):
        color = colors[number % len(colors)]
        if row.get("hq_window"):
            curve.axvspan(*row["hq_window"], color=color, alpha=0.18, label=f"{row['variant']}: HQ window")
        if row.get("trec_valley_measured") is not None:
            curve.axvline(row["trec_valley_measured"], color=color, linestyle=":", linewidth=1.2, label=f"{row['variant']}: measured valley")
    curve.set_xlabel("training fraction (s+1)/T")
    curve.set_ylabel("predicted TREC")
    curve.legend(fontsize=7, loc="best")
    curve.grid(alpha=0.3)
    figure.suptitle(title or "curriculum variants")
    return png_bytes(figure)
