"""The collapse monitor (arXiv 2509.25087): a run's loss curve against its family's universal curve.

Runs with the same schedule shape, tokens per parameter (TPP) and AdamW timescale tau (and here
the same curriculum variant: the data mix over time shapes the curve too) have loss curves that
collapse onto one normalized curve

    l(t^) = L(t^ * T) / L(T),     t^ = (s + 1) / T the fraction of training at step s,

with no irreducible-loss offset (the paper also shows the form with one; we do not estimate it).
A run that drifts off its family's curve has something wrong with it (the paper's example: a bf16
accumulation bug, visible in the residual hundreds of steps before in the raw loss).

Conventions shared by the fit and the online monitor, so the two see the same numbers:

- **Smoothing**: a loss is the trailing mean of the last ``w = max(1, round(smoothing * T))``
  per-step losses (fewer at the first steps).
- **Level**: the run's final loss L^(T) is the weighted least-squares value, in log space, that
  aligns its smoothed curve with the family's mean curve over the points with ``t^ >= start``,
  each point weighted by 1 / (the family's spread of log l at its t^)^2.
- **Residual** at step s: r = L~(s) / (L^(T) * l(t^_s)) - 1, with L^(T) fitted to the points at
  least ``lag * T`` steps older than s: a fault is flagged before it can pull the level along.
- **Spread** sigma(t^): the root mean square residual that the family's own runs give under this
  exact procedure, each against the mean curve of the others (leave-one-out), smoothed over t^
  and floored at ``min_spread``. A run drifts when |r| > threshold * sigma(t^) for ``patience``
  consecutive steps (a fraction of T, at least one step).

`fit_family` builds the `FamilyCurve` (a JSON-able grid of t^); `track` gives every step's
residual of a whole curve at once and `CollapseMonitor` gives the same one step at a time in O(1)
(what the training loop runs); `estimate_final_loss` is L^(T) from a partial curve;
`leave_one_out` measures both on a family's own runs. `same_family` says whether two runs'
descriptors (`training.loss_curves.run_descriptor`) belong together. numpy only; `main`
(``python -m training.collapse STORE``, the measurement on a store's runs) imports the store.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Sequence

import numpy as np

GRID_POINTS = 201  # the family curve's t^ grid: 0, 0.005, ..., 1
SPREAD_SMOOTHING_POINTS = 20  # sigma and the fit spread are averaged over +-20 grid points (+-10% of training)
FAMILY_TOLERANCE = 0.05  # relative tolerance on TPP and tau
# The schedule keys each kind uses (the others keep their defaults and do not change the shape).
SCHEDULE_KEYS = {
    "constant": ("kind", "warmup"),
    "linear": ("kind", "warmup", "final_lr_ratio"),
    "cosine": ("kind", "warmup", "final_lr_ratio"),
    "step": ("kind", "warmup", "drop_at", "drop_factor"),
    "wsd": ("kind", "warmup", "cooldown", "cooldown_shape", "final_lr_ratio"),
    "inverse_sqrt": ("kind", "warmup", "timescale"),
}


class CollapseStopped(ValueError):
    """A run the collapse monitor stopped (``collapse.stop``): a ValueError, so it is not retried
    (a retry would resume from the stop's checkpoint and stop again)."""


def same_family(first: Mapping[str, Any], second: Mapping[str, Any], tolerance: float = FAMILY_TOLERANCE) -> bool:
    """Whether two run descriptors belong to one family: the same schedule shape (the keys its
    kind uses), the same curriculum variant (the data mix over time changes the curve too), TPP
    and tau within ``tolerance`` (relative). The number of steps may differ."""
    if schedule_shape(first["schedule"]) != schedule_shape(second["schedule"]) or first.get("variant") != second.get("variant"):
        return False
    return all(abs(first[key] - second[key]) <= tolerance * abs(second[key]) for key in ("tpp", "tau"))


def schedule_shape(schedule: Mapping[str, Any]) -> tuple:
    """The values of the schedule keys its kind uses, as a comparable tuple."""
    return tuple(schedule.get(key) for key in SCHEDULE_KEYS[schedule["kind"]])


def describe_family(descriptor: Mapping[str, Any]) -> str:
    """``linear schedule (warmup 0.1), TPP 0.12, tau 0.30, variant uniform``: what a family shares."""
    schedule = descriptor["schedule"]
    shape = ", ".join(f"{key} {schedule[key]}" for key in SCHEDULE_KEYS[schedule["kind"]][1:])
    variant = f", variant {descriptor['variant']}" if descriptor.get("variant") else ""
    return f"{schedule['kind']} schedule ({shape}), TPP {descriptor['tpp']:.3g}, tau {descriptor['tau']:.3g}{variant}"


def usable_curve(losses: np.ndarray, steps: int) -> bool:
    """Whether a finished run's curve can be a family member: every one of its ``steps`` (at
    least 2) losses there, finite and > 0."""
    return steps >= 2 and losses.size == steps and bool(np.all(np.isfinite(losses)) and np.all(losses > 0))


def window_steps(fraction: float, total_steps: int) -> int:
    """A fraction of training in steps: ``max(1, round(fraction * total_steps))``."""
    return max(1, round(fraction * total_steps))


def trailing_mean(losses: np.ndarray, window: int) -> np.ndarray:
    """The mean of each step's last ``window`` values (of the ones there are at the first steps)."""
    losses = np.asarray(losses, dtype=np.float64)
    sums = np.concatenate(([0.0], np.cumsum(losses)))
    index = np.arange(losses.size)
    first = np.maximum(0, index - window + 1)
    return (sums[index + 1] - sums[first]) / (index + 1 - first)


@dataclass(frozen=True)
class FamilyCurve:
    """A family's universal curve on a uniform grid of t^ in [0, 1] (`GRID_POINTS`):
    ``mean_log`` = mean over the runs of log l(t^); ``fit_spread`` their spread of log l (the
    weights of the level fit); ``spread`` = sigma(t^), the residual spread its own runs show
    (floored at ``min_spread``); the fit's settings (fractions of training); its runs' names."""

    mean_log: np.ndarray
    fit_spread: np.ndarray
    spread: np.ndarray
    smoothing: float
    start: float
    lag: float
    min_spread: float
    members: tuple[str, ...] = ()
    description: str = ""

    @property
    def runs(self) -> int:
        return len(self.members)

    @cached_property
    def grid(self) -> np.ndarray:
        return np.linspace(0.0, 1.0, self.mean_log.size)

    @cached_property
    def fit_weight(self) -> np.ndarray:
        """Each grid point's weight in the level fit: 1 / fit_spread^2."""
        return 1.0 / np.square(self.fit_spread)

    def at(self, values: np.ndarray, t_hat: np.ndarray | float) -> np.ndarray | float:
        """``values`` (one of the grid arrays) linearly interpolated at ``t_hat``."""
        return np.interp(t_hat, self.grid, values)

    def as_json(self) -> dict[str, Any]:
        """JSON-able (what travels in the training job's spec)."""
        return {
            "mean_log": self.mean_log.tolist(), "fit_spread": self.fit_spread.tolist(), "spread": self.spread.tolist(),
            "smoothing": self.smoothing, "start": self.start, "lag": self.lag, "min_spread": self.min_spread,
            "members": list(self.members), "description": self.description,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> FamilyCurve:
        arrays = {key: np.asarray(data[key], dtype=np.float64) for key in ("mean_log", "fit_spread", "spread")}
        return cls(**arrays, smoothing=data["smoothing"], start=data["start"], lag=data["lag"], min_spread=data["min_spread"],
                   members=tuple(data["members"]), description=data.get("description", ""))


@dataclass(frozen=True)
class Track:
    """Every step of one curve against a family: the smoothed loss, the level L^(T) in use
    (NaN until the fit has a full smoothing window of points), the residual (NaN likewise) and
    sigma(t^)."""

    smoothed: np.ndarray
    final_loss: np.ndarray
    residual: np.ndarray
    spread: np.ndarray


def track(family: FamilyCurve, losses: np.ndarray, total_steps: int) -> Track:
    """The residual of each of a curve's steps (steps 0..len-1 of a run of ``total_steps``), as
    `CollapseMonitor` gives them one at a time. ``losses`` must be finite."""
    losses = np.asarray(losses, dtype=np.float64)
    window, lag = window_steps(family.smoothing, total_steps), window_steps(family.lag, total_steps)
    t_hat = (np.arange(losses.size) + 1.0) / total_steps
    smoothed = trailing_mean(losses, window)
    offset = np.log(smoothed) - family.at(family.mean_log, t_hat)  # log L~ - log l: each point's log L(T)
    fitted = t_hat >= family.start
    weight = np.where(fitted, _weight(family, t_hat), 0.0)
    sum_weight = np.concatenate(([0.0], np.cumsum(weight)))
    sum_weighted = np.concatenate(([0.0], np.cumsum(weight * offset)))
    count = np.concatenate(([0], np.cumsum(fitted)))
    upto = np.maximum(0, np.arange(losses.size) - lag + 1)  # the fit at step s uses the points 0..s-lag
    ready = count[upto] >= window
    level = np.full(losses.size, np.nan)
    level[ready] = sum_weighted[upto[ready]] / sum_weight[upto[ready]]
    residual = np.expm1(offset - level)
    return Track(smoothed, np.exp(level), residual, family.at(family.spread, t_hat))


def estimate_final_loss(family: FamilyCurve, losses: np.ndarray, total_steps: int) -> float:
    """L^(T) from the first ``len(losses)`` steps of a run of ``total_steps``: the level that
    aligns every point seen so far with ``t^ >= start`` (no lag) with the family's curve. Raises
    ValueError when no point is past ``start``."""
    losses = np.asarray(losses, dtype=np.float64)
    t_hat = (np.arange(losses.size) + 1.0) / total_steps
    fitted = t_hat >= family.start
    if not fitted.any():
        raise ValueError(f"no loss past collapse start {family.start:g} of training (seen {losses.size} of {total_steps} steps)")
    smoothed = trailing_mean(losses, window_steps(family.smoothing, total_steps))
    offset = np.log(smoothed[fitted]) - family.at(family.mean_log, t_hat[fitted])
    return float(np.exp(np.average(offset, weights=_weight(family, t_hat[fitted]))))


def _weight(family: FamilyCurve, t_hat: np.ndarray | float) -> np.ndarray | float:
    return family.at(family.fit_weight, t_hat)


def _grid_smooth(values: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """``values`` averaged over +-`SPREAD_SMOOTHING_POINTS` grid points, weighted by ``counts``
    (grid points with no count take the nearest smoothed value)."""
    counts = np.ones_like(values) if counts is None else counts
    kernel = np.ones(2 * SPREAD_SMOOTHING_POINTS + 1)
    total = np.convolve(np.where(counts > 0, values * counts, 0.0), kernel, mode="same")
    weight = np.convolve(counts, kernel, mode="same")
    known = weight > 0
    out = np.full(values.size, np.nan)
    out[known] = total[known] / weight[known]
    index = np.arange(values.size)
    return np.interp(index, index[known], out[known]) if known.any() else out


def _normalized_logs(curves: Mapping[str, np.ndarray], smoothing: float, grid: np.ndarray) -> np.ndarray:
    """log l of each curve (its smoothed loss over its smoothed final loss) on ``grid``."""
    rows = []
    for losses in curves.values():
        smoothed = trailing_mean(losses, window_steps(smoothing, losses.size))
        t_hat = (np.arange(losses.size) + 1.0) / losses.size
        rows.append(np.interp(grid, t_hat, np.log(smoothed / smoothed[-1])))
    return np.array(rows)


def fit_family(curves: Mapping[str, Sequence[float]], smoothing: float = 0.02, start: float = 0.05, lag: float = 0.03,
               min_spread: float = 0.002, description: str = "") -> FamilyCurve:
    """The universal curve of a family from its finished runs' whole loss curves (name -> the
    per-step losses 0..T-1; T may differ between runs). Needs at least 2 runs, finite losses > 0,
    and residuals past ``start + lag`` (ValueError otherwise)."""
    arrays = {name: np.asarray(losses, dtype=np.float64) for name, losses in curves.items()}
    if len(arrays) < 2:
        raise ValueError(f"a family curve needs at least 2 runs, got {len(arrays)}")
    for name, losses in arrays.items():
        if losses.size < 2 or not np.all(np.isfinite(losses)) or np.any(losses <= 0):
            raise ValueError(f"run {name}: a family member needs at least 2 finite losses > 0")
    grid = np.linspace(0.0, 1.0, GRID_POINTS)
    logs = _normalized_logs(arrays, smoothing, grid)
    mean_log = logs.mean(axis=0)
    fit_spread = np.maximum(_grid_smooth(logs.std(axis=0, ddof=1)), min_spread)
    # sigma: each run's residuals against the mean curve of the others, by grid point
    squares, counts = np.zeros(GRID_POINTS), np.zeros(GRID_POINTS)
    for row, (name, losses) in enumerate(arrays.items()):
        others = (mean_log * len(arrays) - logs[row]) / (len(arrays) - 1)
        provisional = FamilyCurve(others, fit_spread, np.full(GRID_POINTS, min_spread), smoothing, start, lag, min_spread)
        residual = track(provisional, losses, losses.size).residual
        t_hat = (np.arange(losses.size) + 1.0) / losses.size
        known = np.isfinite(residual)
        index = np.rint(t_hat[known] * (GRID_POINTS - 1)).astype(np.int64)
        squares += np.bincount(index, weights=np.square(residual[known]), minlength=GRID_POINTS)
        counts += np.bincount(index, minlength=GRID_POINTS)
    if not counts.any():
        raise ValueError(f"no run of the family has a residual past start {start:g} + lag {lag:g} of training (runs too short?)")
    mean_square = np.divide(squares, counts, out=np.zeros(GRID_POINTS), where=counts > 0)
    spread = np.maximum(np.sqrt(_grid_smooth(mean_square, counts)), min_spread)
    return FamilyCurve(mean_log, fit_spread, spread, smoothing, start, lag, min_spread, tuple(arrays), description)


@dataclass(frozen=True)
class Reading:
    """The monitor's view of one step. ``residual``, ``final_loss`` (L^(T) in use) and
    ``threshold`` (threshold x sigma(t^)) are None while the level is not fitted yet (before
    ``start`` plus a smoothing window plus the lag); ``drift``: |r| has exceeded the threshold
    for ``patience`` consecutive steps up to this one. A non-finite loss has residual inf."""

    step: int
    t_hat: float
    residual: float | None
    final_loss: float | None
    threshold: float | None
    drift: bool

    @property
    def state(self) -> str:
        """``waiting`` (no residual yet), ``ok`` or ``drift``."""
        return "drift" if self.drift else ("waiting" if self.residual is None else "ok")

    def as_json(self) -> dict[str, Any]:
        return {"step": self.step, "t_hat": self.t_hat, "residual": self.residual, "final_loss_estimate": self.final_loss,
                "threshold": self.threshold, "state": self.state}


@dataclass
class CollapseMonitor:
    """Fed each step's loss in order from step 0 (a resumed run replays its earlier steps first),
    returns its `Reading`; O(1) work per step (a running window sum, running fit sums and a queue
    of the ``lag`` points not yet in the fit). ``first_drift`` is the first Reading in drift."""

    family: FamilyCurve
    total_steps: int
    threshold: float = 4.0
    patience: float = 0.01
    first_drift: Reading | None = None
    _window: deque = field(default_factory=deque, repr=False)
    _window_sum: float = 0.0
    _pending: deque = field(default_factory=deque, repr=False)
    _fit_weight: float = 0.0
    _fit_weighted: float = 0.0
    _fit_count: int = 0
    _exceeded: int = 0
    _next_step: int = 0

    def __post_init__(self) -> None:
        self.window = window_steps(self.family.smoothing, self.total_steps)
        self.lag = window_steps(self.family.lag, self.total_steps)
        self.patience_steps = window_steps(self.patience, self.total_steps)
        # the grid arrays as floats, read by `_at` (a scalar lookup: no numpy call per step)
        self._mean_log = self.family.mean_log.tolist()
        self._weight = self.family.fit_weight.tolist()
        self._spread = self.family.spread.tolist()

    @staticmethod
    def _at(values: list[float], t_hat: float) -> float:
        """``values`` on the uniform grid, linearly interpolated at ``t_hat`` (clamped to [0, 1])."""
        position = min(max(t_hat, 0.0), 1.0) * (len(values) - 1)
        low = min(int(position), len(values) - 2)
        fraction = position - low
        return values[low] * (1.0 - fraction) + values[low + 1] * fraction

    def update(self, step: int, loss: float) -> Reading:
        if step != self._next_step:
            raise ValueError(f"collapse monitor: step {step} fed after step {self._next_step - 1} (steps go in order from 0)")
        self._next_step += 1
        t_hat = (step + 1.0) / self.total_steps
        self._admit(step)
        if not math.isfinite(loss) or loss <= 0:
            return self._decide(step, t_hat, math.inf, self._level())
        self._window.append(loss)
        self._window_sum += loss
        if len(self._window) > self.window:
            self._window_sum -= self._window.popleft()
        smoothed = self._window_sum / len(self._window)
        offset = math.log(smoothed) - self._at(self._mean_log, t_hat)
        if t_hat >= self.family.start:
            self._pending.append((step, self._at(self._weight, t_hat), offset))
        level = self._level()
        return self._decide(step, t_hat, None if level is None else math.expm1(offset - level), level)

    def _admit(self, step: int) -> None:
        """Move the queued points at least ``lag`` steps old into the fit."""
        while self._pending and self._pending[0][0] <= step - self.lag:
            _, weight, offset = self._pending.popleft()
            self._fit_weight += weight
            self._fit_weighted += weight * offset
            self._fit_count += 1

    def _level(self) -> float | None:
        return self._fit_weighted / self._fit_weight if self._fit_count >= self.window else None

    def _decide(self, step: int, t_hat: float, residual: float | None, level: float | None) -> Reading:
        if residual is None or level is None:
            self._exceeded = 0
            return Reading(step, t_hat, None, None, None, False)
        threshold = self.threshold * self._at(self._spread, t_hat)
        self._exceeded = self._exceeded + 1 if abs(residual) > threshold else 0
        reading = Reading(step, t_hat, residual, math.exp(level), threshold, self._exceeded >= self.patience_steps)
        if reading.drift and self.first_drift is None:
            self.first_drift = reading
        return reading


@dataclass(frozen=True)
class MemberCheck:
    """One run of a family checked against the others (leave-one-out): the relative error of
    L^(T) estimated at each fraction of training (against its smoothed final loss), its largest
    |r| / sigma, and its first step in drift at ``threshold`` and ``patience`` (None: never)."""

    name: str
    final_loss: float
    estimate_errors: dict[float, float]
    max_score: float
    first_drift: int | None


def leave_one_out(curves: Mapping[str, Sequence[float]], fractions: Sequence[float] = (0.2, 0.5), threshold: float = 4.0,
                  patience: float = 0.01, **settings: Any) -> list[MemberCheck]:
    """Each run of a family (at least 3) against the family fitted on the others: how well its
    final loss is estimated from the first ``fractions`` of its curve, and whether it would be
    flagged. ``settings``: `fit_family`'s."""
    checks = []
    for name, losses in curves.items():
        losses = np.asarray(losses, dtype=np.float64)
        family = fit_family({other: values for other, values in curves.items() if other != name}, **settings)
        total = losses.size
        final = float(trailing_mean(losses, window_steps(family.smoothing, total))[-1])
        errors = {fraction: estimate_final_loss(family, losses[: max(1, round(fraction * total))], total) / final - 1.0
                  for fraction in fractions}
        tracked = track(family, losses, total)
        score = np.abs(tracked.residual) / tracked.spread
        checks.append(MemberCheck(name, final, errors, float(np.nanmax(score)) if np.isfinite(score).any() else math.nan,
                                  first_drift_step(score > threshold, window_steps(patience, total))))
    return checks


def first_drift_step(exceeded: np.ndarray, patience_steps: int) -> int | None:
    """The first step that ends ``patience_steps`` consecutive exceedances (None: none does)."""
    run = 0
    for step, flag in enumerate(exceeded):
        run = run + 1 if flag else 0
        if run >= patience_steps:
            return step
    return None


def families(descriptors: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    """The runs (fingerprint -> descriptor) grouped into families: each run joins the first group
    whose first run it `same_family`-matches, in the given order."""
    groups: list[list[str]] = []
    for name, descriptor in descriptors.items():
        for group in groups:
            if same_family(descriptors[group[0]], descriptor):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def measure(curves: Mapping[str, np.ndarray], faulty: Mapping[str, tuple[np.ndarray, int]], fractions: Sequence[float] = (0.2, 0.5),
            threshold: float = 5.0, patience: float = 0.01, **settings: Any) -> dict[str, Any]:
    """What `main` reports for one family: `leave_one_out` on its normal runs (``curves``), and
    for each faulty run (name -> (losses, the first faulty step)) against the family of all of
    them: the first step in drift and its delay after the fault (None: not flagged)."""
    checks = leave_one_out(curves, fractions, threshold, patience, **settings)
    family = fit_family(curves, **settings)
    detections = {}
    for name, (losses, first_faulty) in faulty.items():
        tracked = track(family, losses, losses.size)
        drift = first_drift_step(np.abs(tracked.residual) > threshold * tracked.spread, window_steps(patience, losses.size))
        detections[name] = {"fault_step": first_faulty, "drift_step": drift, "delay": None if drift is None else drift - first_faulty}
    errors = {fraction: [abs(check.estimate_errors[fraction]) for check in checks] for fraction in fractions}
    return {
        "runs": len(curves),
        "members": [{"name": check.name, "final_loss": check.final_loss, "estimate_errors": check.estimate_errors,
                     "max_score": check.max_score, "first_drift": check.first_drift} for check in checks],
        "estimate_error": {fraction: {"mean": float(np.mean(values)), "max": float(np.max(values))} for fraction, values in errors.items()},
        "false_drifts": sum(check.first_drift is not None for check in checks),
        "faults": detections,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.collapse STORE [--json]``: for every family of at least 3 finished
    runs in the store's catalog, the final-loss estimate's error at 20% and 50% of training and
    each run's largest residual (each run against the others), and when each run with an injected
    LR fault (`training.cpt_job.FAULT_ENV`) is flagged, with the recipe section's defaults."""
    import argparse
    import json

    from training.loss_curves import catalog, read_curve
    from trecflow.recipe import CollapseSection
    from trecflow.store import Store

    parser = argparse.ArgumentParser(prog="python -m training.collapse", description=main.__doc__)
    parser.add_argument("store", help="the store's URL (a folder or s3://...)")
    parser.add_argument("--endpoint-url", default=None, help="an S3-compatible endpoint")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    store = Store(args.store, args.endpoint_url)
    settings = CollapseSection()
    fit_settings = {"smoothing": settings.smoothing, "start": settings.start, "lag": settings.smoothing + settings.patience,
                    "min_spread": settings.min_spread}
    descriptors = dict(catalog(store))
    curves = {name: read_curve(store, name).losses for name in descriptors}
    usable = {name: descriptor for name, descriptor in descriptors.items() if usable_curve(curves[name], descriptor["steps"])}
    normal = {name: descriptor for name, descriptor in usable.items() if not descriptor.get("lr_fault")}
    reports = []
    for group in families(normal):
        if len(group) < 3:
            continue
        faulty = {name: (curves[name], descriptor["lr_fault"]["first"]) for name, descriptor in usable.items()
                  if descriptor.get("lr_fault") and same_family(descriptors[group[0]], descriptor)}
        report = measure({name: curves[name] for name in group}, faulty, threshold=settings.threshold, patience=settings.patience,
                         **fit_settings)
        reports.append({"family": describe_family(descriptors[group[0]]), **report})
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0
    if not reports:
        print(f"{store.url}: no family of 3 or more finished runs")
    for report in reports:
        print(f"family: {report['family']}, {report['runs']} runs; flagged against the others: {report['false_drifts']}")
        for member in report["members"]:
            errors = ", ".join(f"{fraction:.0%}: {error:+.2%}" for fraction, error in member["estimate_errors"].items())
            print(f"  {member['name']}: final loss {member['final_loss']:.4f}; estimated from {errors}; largest |r| "
                  f"{member['max_score']:.2f} x spread")
        for fraction, error in report["estimate_error"].items():
            print(f"  final-loss estimate at {fraction:.0%} of training: mean |error| {error['mean']:.2%}, max {error['max']:.2%}")
        for name, found in report["faults"].items():
            flagged = "not flagged" if found["drift_step"] is None else f"flagged at step {found['drift_step']} ({found['delay']:+d} steps)"
            print(f"  faulty run {name}: LR fault from step {found['fault_step']}: {flagged}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
