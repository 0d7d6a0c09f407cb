"""The multi-power law of the training loss curve (Luo et al. 2025, arXiv 2503.12811): fit it on
finished runs' curves, forecast the curve of a schedule before training it. numpy and scipy only.

    L(t) = L0 + A * (S1(t) + S_W)^-alpha - LD(t)
    LD(t) = B * sum_k (eta_{k-1} - eta_k) * G(eta_k^-gamma * S_k(t)),   G(x) = 1 - (C*x + 1)^-beta

Indexing on our LR array (``lrs[s]`` the LR step ``s`` applied; the loss logged at step ``s`` is
after that update, as in the official code, which indexes its cumulative sum the same way):

- the warmup is the leading strictly increasing run of LRs; it ends at step ``p``, the paper's
  ``eta_0`` (``p = 0`` without warmup);
- ``S1(t) + S_W = lrs[0] + ... + lrs[t]``: the warmup enters through its LR sum ``S_W`` alone;
- ``LD`` sums ``k = p+1 .. t`` with ``S_k(t) = lrs[k] + ... + lrs[t]``: the drops after warmup.
  The official code (thu-yao-01-luo/MultiPowerLaw) sums from ``k = 1`` over the warmup too, whose
  rising LRs then add about ``B * eta_peak`` to the loss; its published parameters carry that
  offset in ``L0``. Steps with equal LRs add nothing either way.
- ``G = 1`` where ``eta_k = 0`` (the limit of the formula).

`fit` minimises a Huber loss (delta `HUBER_DELTA`, the official one) of the log-loss residuals
at a few hundred binned points per curve (`fit_points`) with `scipy.optimize.least_squares` over
the logs of the seven parameters (all positive; the exponents bounded, `EXPONENT_RANGE`), with an
analytic Jacobian, from one start derived from the data; deterministic. The drop term is summed
over the steps whose LR changes only, in blocks of evaluated steps, so a 24,000-step curve costs
O(points x drops) numpy work per evaluation and bounded memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
from scipy.optimize import least_squares

PARAM_NAMES = ("L0", "A", "alpha", "B", "C", "beta", "gamma")
HUBER_DELTA = 1e-3  # of log(loss) residuals, as the official fit
FIT_POINTS = 256  # binned points per fitted curve, at most (`fit_points`)
FORECAST_POINTS = 512  # evaluated steps of a forecast curve (evenly spaced, the last step always)
MIN_POINTS = 10  # a curve with fewer loss points after warmup cannot be fitted
BLOCK_ELEMENTS = 1 << 21  # evaluated steps x drop steps per numpy block (16 MB per float64 array)
BLOCK_ROWS = 32  # evaluated steps per block, at most
# The exponents alpha, beta, gamma stay in [0.001, 3] (the paper's are about 0.4 to 0.65): on noisy
# curves an unbounded fit drifts to G's exponential limit (beta -> inf, C -> 0), which extrapolates badly.
EXPONENT_RANGE = (1e-3, 3.0)
LOG_BOUNDS = (
    np.log([1e-300, 1e-300, EXPONENT_RANGE[0], 1e-300, 1e-300, EXPONENT_RANGE[0], EXPONENT_RANGE[0]]),
    np.array([np.inf, np.inf, np.log(EXPONENT_RANGE[1]), np.inf, np.inf, np.log(EXPONENT_RANGE[1]), np.log(EXPONENT_RANGE[1])]),
)
SMALLEST_LOSS = 1e-12  # the law's value is clamped here before its log (a start far from the data)


@dataclass(frozen=True)
class LawParams:
    """The seven parameters of the law, all positive."""

    L0: float
    A: float
    alpha: float
    B: float
    C: float
    beta: float
    gamma: float

    @classmethod
    def from_vector(cls, values: Sequence[float]) -> LawParams:
        return cls(*(float(value) for value in values))

    def vector(self) -> np.ndarray:
        return np.array([getattr(self, name) for name in PARAM_NAMES], dtype=np.float64)

    def as_dict(self) -> dict[str, float]:
        return {name: getattr(self, name) for name in PARAM_NAMES}


@dataclass(frozen=True)
class Curve:
    """A loss curve to fit: ``lrs[s]`` the LR of every step ``s`` from 0, ``losses[i]`` the loss
    logged after step ``steps[i]`` (increasing, within the schedule; losses positive and finite)."""

    name: str
    lrs: np.ndarray
    steps: np.ndarray
    losses: np.ndarray

    def __post_init__(self) -> None:
        lrs, steps, losses = (np.asarray(values) for values in (self.lrs, self.steps, self.losses))
        if lrs.ndim != 1 or lrs.size == 0 or not np.all(np.isfinite(lrs)) or np.any(lrs < 0):
            raise ValueError(f"{self.name}: lrs must be a non-empty array of finite LRs >= 0")
        if steps.shape != losses.shape or steps.ndim != 1:
            raise ValueError(f"{self.name}: steps and losses must be arrays of one length")
        if steps.size and (steps[0] < 0 or steps[-1] >= lrs.size or np.any(np.diff(steps) <= 0)):
            raise ValueError(f"{self.name}: steps must increase within 0..{lrs.size - 1}")
        if not np.all(np.isfinite(losses) & (losses > 0)):
            raise ValueError(f"{self.name}: losses must be finite and positive")


@dataclass(frozen=True)
class CurveFit:
    """How the fitted law matches one curve on its fitted points."""

    name: str
    points: int
    rmse_log: float  # root mean square of log(loss) - log(law)
    last_step: int
    last_loss: float  # the curve's loss at its last fitted point
    last_fitted: float  # the law's value there


@dataclass(frozen=True)
class FitResult:
    """The fitted parameters and the fit's quality on its own points."""

    params: LawParams
    rmse_log: float  # over every fitted point of every curve
    points: int
    curves: tuple[CurveFit, ...]
    evaluations: int  # the law's evaluations (with its Jacobian) the optimizer needed
    converged: bool  # False when the optimizer stopped at its evaluation budget


@dataclass(frozen=True)
class Forecast:
    """The law's loss at ``steps`` of one schedule of ``total_steps`` steps."""

    name: str
    total_steps: int
    steps: np.ndarray
    losses: np.ndarray

    @property
    def final_loss(self) -> float:
        """The loss after the schedule's last step (the last evaluated step is always that one)."""
        return float(self.losses[-1])


def warmup_end(lrs: np.ndarray) -> int:
    """The last step of the warmup: the end of the leading strictly increasing run of LRs (0 when
    the schedule does not start by rising)."""
    rising = np.diff(lrs) > 0
    return int(rising.size if rising.all() else np.argmin(rising))


def evenly_spaced(first: int, last: int, points: int) -> np.ndarray:
    """At most ``points`` distinct integers from ``first`` to ``last`` (both included), evenly spaced."""
    return np.unique(np.linspace(first, last, max(2, points)).round().astype(np.int64)) if last > first else np.array([last])


# --- the law's evaluation -------------------------------------------------------------------


@dataclass(frozen=True)
class _Block:
    """The drop terms of evaluated steps ``rows`` over the drop steps ``k <= max(rows' steps)``:
    ``partial[i, j] = S_k(t_i)``, 0 where ``k > t_i`` (the term is then 0)."""

    rows: slice
    partial: np.ndarray
    log_eta: np.ndarray  # log eta_k of the drop steps
    drop: np.ndarray  # eta_{k-1} - eta_k
    drop_log_eta: np.ndarray  # drop * log eta_k
    drop_total: float  # sum of drop


@dataclass(frozen=True)
class _Schedule:
    """What the law needs of one schedule at some steps, independent of the parameters."""

    log_total: np.ndarray  # log(S1(t) + S_W) of each evaluated step
    zero_drop: np.ndarray  # sum of the drops onto LR 0 up to each step (G = 1 there)
    blocks: Sequence[_Block] | Iterator[_Block]


def _schedule(lrs: np.ndarray, steps: np.ndarray, keep_blocks: bool) -> _Schedule:
    """``steps`` increasing; the blocks as a list (``keep_blocks``: evaluated many times) or a
    generator (evaluated once, for a forecast of a long schedule)."""
    lrs = np.asarray(lrs, dtype=np.float64)
    steps = np.asarray(steps, dtype=np.int64)
    cumulative = np.cumsum(lrs)
    with np.errstate(divide="ignore"):
        log_total = np.log(cumulative[steps])  # -inf at a step before any LR > 0: the law is +inf there
    drop = np.zeros_like(lrs)
    start = warmup_end(lrs) + 1
    drop[start:] = lrs[start - 1 : -1] - lrs[start:]
    changes = np.flatnonzero(drop)
    to_zero = changes[lrs[changes] == 0]
    zero_drop = np.concatenate([[0.0], np.cumsum(drop[to_zero])])[np.searchsorted(to_zero, steps, side="right")]
    k = changes[lrs[changes] > 0]
    before_k = cumulative[k - 1]  # k >= 1: S_k(t) = cumulative[t] - cumulative[k - 1]
    log_eta = np.log(lrs[k])

    def blocks() -> Iterator[_Block]:
        # few rows per block: a block spans the drop steps up to its last row's step, so the
        # blocks cover about half the (steps x drops) triangle
        rows_per_block = max(1, min(BLOCK_ROWS, BLOCK_ELEMENTS // max(1, k.size)))
        for first in range(0, steps.size, rows_per_block):
            rows = slice(first, min(first + rows_per_block, steps.size))
            block_steps = steps[rows]
            columns = int(np.searchsorted(k, block_steps[-1], side="right"))
            partial = cumulative[block_steps][:, None] - before_k[None, :columns]
            partial[k[None, :columns] > block_steps[:, None]] = 0.0
            d = drop[k[:columns]]
            yield _Block(rows, partial, log_eta[:columns], d, d * log_eta[:columns], float(d.sum()))

    return _Schedule(log_total, zero_drop, list(blocks()) if keep_blocks else blocks())


def _times(matrix: np.ndarray, vector: np.ndarray) -> np.ndarray:
    """``matrix @ vector`` in numpy's own loop: BLAS threads contend on a busy machine (measured
    5 to 100 times slower than this single-threaded product on 2 shared cores)."""
    return np.einsum("ij,j->i", matrix, vector)


def _law(params: np.ndarray, schedule: _Schedule, jacobian: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The law at the schedule's steps and, if asked, its derivatives by the log of each parameter
    (columns in `PARAM_NAMES` order)."""
    L0, A, alpha, B, C, beta, gamma = params
    size = schedule.log_total.size
    drop_sum = schedule.zero_drop.copy()  # sum_k d_k G_k
    by_c, by_beta, by_gamma = (np.zeros(size) for _ in range(3))  # sums of d_k * p * dG_k/dp
    for block in schedule.blocks:
        cx = block.partial * (C * np.exp(-gamma * block.log_eta))  # C * eta_k^-gamma * S_k(t)
        log_u = np.log(cx + 1.0)
        rest = np.exp(-beta * log_u)  # 1 - G
        # a term with k > t has cx = 0, so rest = 1 and G = 0: sum_k d_k G_k = sum_k d_k - rest @ d
        drop_sum[block.rows] += block.drop_total - _times(rest, block.drop)
        if jacobian:
            q = cx / (cx + 1.0)
            q *= rest  # C dG/dC / beta
            by_c[block.rows] += beta * _times(q, block.drop)
            by_gamma[block.rows] -= beta * gamma * _times(q, block.drop_log_eta)
            log_u *= rest  # dG/dbeta
            by_beta[block.rows] += beta * _times(log_u, block.drop)
    power = A * np.exp(-alpha * schedule.log_total)
    law = L0 + power - B * drop_sum
    if not jacobian:
        return law, None
    with np.errstate(invalid="ignore"):
        by_alpha = -alpha * power * schedule.log_total
    columns = [np.full(size, L0), power, by_alpha, -B * drop_sum, -B * by_c, -B * by_beta, -B * by_gamma]
    return law, np.stack(columns, axis=1)


def multipower_loss(params: LawParams, lrs: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """The law's loss after each of ``steps`` (increasing) of the schedule ``lrs``."""
    steps = np.asarray(steps, dtype=np.int64)
    if steps.size and (np.any(np.diff(steps) <= 0) or steps[0] < 0 or steps[-1] >= len(lrs)):
        raise ValueError(f"steps must increase within 0..{len(lrs) - 1}")
    law, _ = _law(params.vector(), _schedule(lrs, steps, keep_blocks=False), jacobian=False)
    return law


def forecast(params: LawParams | FitResult, lrs: np.ndarray, name: str = "schedule", points: int = FORECAST_POINTS) -> Forecast:
    """The law's curve of the schedule ``lrs``: ``points`` evenly spaced steps from the end of its
    warmup to its last step (always included)."""
    law = params.params if isinstance(params, FitResult) else params
    lrs = np.asarray(lrs, dtype=np.float64)
    steps = evenly_spaced(warmup_end(lrs), lrs.size - 1, points)
    return Forecast(name, int(lrs.size), steps, multipower_loss(law, lrs, steps))


# --- the fit --------------------------------------------------------------------------------


def fit_points(curve: Curve, points: int = FIT_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """The (steps, log losses) a fit uses: the logged losses from the end of the warmup on (the law
    describes the loss after warmup) in at most ``points`` bins of consecutive logged steps, each
    bin as its middle step and the mean log-loss of the steps around it (which averages out
    step-to-step noise; symmetric, so the mean belongs to the middle step on a straight stretch).
    Bin edges are evenly spaced in step (three quarters of them) and in the log of the LR sum (a
    quarter): bins stay narrow where the loss falls fast after warmup, so averaging a curved
    stretch biases little."""
    steps = np.asarray(curve.steps, dtype=np.int64)
    cumulative = np.cumsum(np.asarray(curve.lrs, dtype=np.float64))
    after = np.flatnonzero((steps >= warmup_end(curve.lrs)) & (cumulative[np.minimum(steps, cumulative.size - 1)] > 0))
    if after.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0)
    lr_sum = cumulative[steps[after]]
    geometric = np.searchsorted(lr_sum, np.geomspace(lr_sum[0], lr_sum[-1], points // 4 + 1)[1:-1])
    uniform = np.linspace(0, after.size, points - points // 4 + 1).round().astype(np.int64)
    edges = np.unique(np.concatenate([uniform, geometric])) if after.size > points else np.arange(after.size + 1)
    middle, half = (edges[:-1] + edges[1:] - 1) // 2, (edges[1:] - edges[:-1] - 1) // 2  # a bin of even size drops its last step
    summed = np.concatenate([[0.0], np.cumsum(np.log(np.asarray(curve.losses, dtype=np.float64)[after]))])
    return steps[after[middle]], (summed[middle + half + 1] - summed[middle - half]) / (2 * half + 1)


@dataclass(frozen=True)
class _Points:
    """One curve's fitted points: its schedule at those steps and their log losses."""

    curve: Curve
    steps: np.ndarray
    log_losses: np.ndarray
    schedule: _Schedule
    relaxed_drop: np.ndarray  # eta_p - eta_t: the drop term's value once G = 1 (the starts' model)


def _points(curve: Curve, points: int) -> _Points:
    steps, log_losses = fit_points(curve, points)
    if steps.size < MIN_POINTS:
        raise ValueError(f"{curve.name}: {steps.size} loss points after warmup; the fit needs at least {MIN_POINTS}")
    lrs = np.asarray(curve.lrs, dtype=np.float64)
    return _Points(curve, steps, log_losses, _schedule(lrs, steps, keep_blocks=True), lrs[warmup_end(lrs)] - lrs[steps])


def _residuals(log_params: np.ndarray, data: Sequence[_Points], jacobian: bool) -> tuple[np.ndarray, np.ndarray | None]:
    params = np.exp(log_params)
    values, slopes = [], []
    for points in data:
        law, by_log_param = _law(params, points.schedule, jacobian)
        clamped = np.maximum(law, SMALLEST_LOSS)
        values.append(points.log_losses - np.log(clamped))
        if jacobian:
            slopes.append(-np.where(law > SMALLEST_LOSS, 1.0 / clamped, 0.0)[:, None] * by_log_param)
    return np.concatenate(values), (np.concatenate(slopes) if jacobian else None)


class _Objective:
    """The residuals and their Jacobian at some log parameters, computed together once per point
    (the optimizer asks for the Jacobian where it just evaluated the residuals)."""

    def __init__(self, data: Sequence[_Points]):
        self.data = data
        self.evaluations = 0
        self._at: np.ndarray | None = None
        self._values: tuple[np.ndarray, np.ndarray | None] = (np.empty(0), None)

    def _evaluate(self, log_params: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self._at is None or not np.array_equal(log_params, self._at):
            self._values = _residuals(log_params, self.data, jacobian=True)
            self._at = np.array(log_params, copy=True)
            self.evaluations += 1
        return self._values

    def residuals(self, log_params: np.ndarray) -> np.ndarray:
        return self._evaluate(log_params)[0]

    def jacobian(self, log_params: np.ndarray) -> np.ndarray:
        return self._evaluate(log_params)[1]


def _relaxed_start(data: Sequence[_Points]) -> np.ndarray:
    """L0, A, alpha, B of the law with every drop fully relaxed (G = 1: L0 + A*S^-alpha -
    B*(eta_p - eta_t), the official code's initial model), fitted from a few starts; log values."""
    log_s = np.concatenate([points.schedule.log_total for points in data])
    log_y = np.concatenate([points.log_losses for points in data])
    relaxed = np.concatenate([points.relaxed_drop for points in data])
    lowest = float(np.exp(log_y.min()))
    peak = max(float(np.max(points.curve.lrs)) for points in data)

    def residuals(log_params: np.ndarray) -> np.ndarray:
        L0, A, alpha, B = np.exp(log_params)
        return log_y - np.log(np.maximum(L0 + A * np.exp(-alpha * log_s) - B * relaxed, SMALLEST_LOSS))

    best = None
    for share in (0.5, 0.8, 0.95):  # L0 as a share of the lowest loss seen
        L0 = share * lowest
        excess = np.log(np.maximum(np.exp(log_y) - L0, 1e-6 * lowest))
        slope, intercept = np.polyfit(log_s, excess, 1)  # log(L - L0) = log A - alpha log S
        start = np.log([L0, np.exp(intercept), float(np.clip(-slope, 0.05, 2.0)), 0.05 * lowest / peak])
        result = least_squares(residuals, start, loss="huber", f_scale=HUBER_DELTA, method="trf", max_nfev=200)
        if best is None or result.cost < best.cost:
            best = result
    return best.x


def fit(curves: Sequence[Curve], points: int = FIT_POINTS, max_evaluations: int = 300) -> FitResult:
    """The law's parameters that best match ``curves``: Huber loss (`HUBER_DELTA`) of the log-loss
    residuals at `fit_points` of each curve, from one start derived from the data (the relaxed
    model's L0, A, alpha, B; beta = gamma = 0.6 as in the paper; C scaled to the peak LR).
    Deterministic. ValueError when a curve has fewer than `MIN_POINTS` points after warmup."""
    if not curves:
        raise ValueError("fit: no curves")
    data = [_points(curve, points) for curve in curves]
    L0, A, alpha, B = np.exp(_relaxed_start(data))
    peak = max(float(np.max(curve.lrs)) for curve in curves)
    beta = gamma = 0.6
    C = 0.1 / peak ** (1.0 - gamma)  # C * eta^-gamma * S_k(t) reaches 1 about 10 peak-LR steps after a drop
    start = np.log([L0, A, alpha, B / 0.8, C, beta, gamma])  # G is about 0.8 where the relaxed model has 1
    objective = _Objective(data)
    result = least_squares(objective.residuals, start, jac=objective.jacobian, loss="huber", f_scale=HUBER_DELTA,
                           method="trf", bounds=LOG_BOUNDS, max_nfev=max_evaluations)
    params = LawParams.from_vector(np.exp(result.x))
    return FitResult(params, *_quality(params, data), evaluations=objective.evaluations, converged=result.status > 0)


def _quality(params: LawParams, data: Sequence[_Points]) -> tuple[float, int, tuple[CurveFit, ...]]:
    residuals, _ = _residuals(np.log(params.vector()), data, jacobian=False)
    fits, offset = [], 0
    for points in data:
        mine = residuals[offset : offset + points.steps.size]
        offset += points.steps.size
        last_loss = float(np.exp(points.log_losses[-1]))
        fits.append(CurveFit(points.curve.name, int(mine.size), float(np.sqrt(np.mean(mine**2))), int(points.steps[-1]),
                             last_loss, float(last_loss / np.exp(mine[-1]))))
    return float(np.sqrt(np.mean(residuals**2))), int(residuals.size), tuple(fits)


# --- identification -------------------------------------------------------------------------


def same_schedule(first: np.ndarray, second: np.ndarray) -> bool:
    """Whether two LR arrays are one schedule: equal (to 1e-9 relative) over their common steps."""
    common = min(len(first), len(second))
    return bool(np.allclose(first[:common], second[:common], rtol=1e-9, atol=0.0))


def _decays(curve: Curve) -> bool:
    return bool(np.any(np.diff(np.asarray(curve.lrs)[warmup_end(curve.lrs):]) < 0))


def _distinct(curves: Sequence[Curve]) -> list[Curve]:
    """One curve of each schedule among ``curves`` (`same_schedule`), in order."""
    distinct: list[Curve] = []
    for curve in curves:
        if not any(same_schedule(curve.lrs, seen.lrs) for seen in distinct):
            distinct.append(curve)
    return distinct


def identification_warning(curves: Sequence[Curve]) -> str | None:
    """Why the decay term (B, C, beta, gamma) is not identified by these curves, or None: it needs
    an LR that decays after warmup, and at least two distinct schedules."""
    if not any(_decays(curve) for curve in curves):
        return "no fitted curve decays its LR after warmup: B, C, beta, gamma (the decay term) are not identified; a forecast of a decaying schedule is a guess"
    if len(_distinct(curves)) < 2:
        return ("all fitted curves share one LR schedule: B, C, beta, gamma (the decay term) are not identified; "
                "fit on at least two different schedules (e.g. a constant and a decaying one)")
    return None


def decay_shape_warning(curves: Sequence[Curve]) -> str | None:
    """A caveat when only one of the (distinct) fitted schedules decays: the shape of the loss drop
    (C, beta, gamma) then rests on that one curve, and noisy curves leave it loose (a smooth decay
    such as a cosine pins it least), or None."""
    decaying = [curve for curve in _distinct(curves) if _decays(curve)]
    if len(decaying) != 1 or len(_distinct(curves)) < 2:
        return None
    return (f"only one fitted schedule decays its LR ({decaying[0].name}): the shape of the decay term (C, beta, gamma) rests on it, "
            "so forecasts of other decay shapes are less certain; add a curve with another decay (the paper fits a constant, "
            "a cosine and a two-stage schedule)")
