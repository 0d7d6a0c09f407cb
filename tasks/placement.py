"""Curriculum strategies: which sequence every slot of training gets (pure numpy, no I/O).

Training has S = steps x sequences-per-step slots, in order (slot j is position j % B of step
j // B). A plan fills every slot:

- H = round(w * S) slots get high-quality (``hq``) sequences, at positions the strategy chooses:
  ``uniform`` spreads them evenly over all S slots (slot floor(k*S/H) for k = 0..H-1, so every
  step holds floor or ceil of w*B of them and every rank's share is mixed); ``start`` / ``end``
  take the first / last H slots; ``window`` spreads them evenly inside the steps of ``[a, b]``;
  ``trec_valley`` inside the best window of stage 2's predicted curve for the w it actually gets
  (H / S), found with stage 2's own `best_window`; ``trec_weighted`` gives step s a share of the H
  proportional to (1 - u_s)^k, u the predicted curve min-max normalized (`weighted_counts`), capped
  at the whole step, and spreads each step's count evenly over its positions.
- The other S - H slots get ``mid`` and ``lq`` sequences, split in proportion to their supply (or
  ``curriculum.tier_weights``) and interleaved at random.
- ``ascending`` builds the same mix, then orders all S slots by sequence score, ties broken by
  the seed (a stable sort of the seeded order).

Which sequences of a tier are used, and in which order, is drawn with the seed (one independent
stream per tier). A tier with fewer sequences than the plan needs is repeated (each pass a new
permutation; the repetitions are counted) or fails, as ``on_shortage`` says; sequences left out
are counted as unplaced. Everything is vectorized: memory is a few bytes per slot, no Python loop
per slot or step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from training.sample_index import TIERS
from training.trec import best_window

HQ, MID, LQ = range(3)
ORDER_CHUNK = 1 << 24
MARK_CHUNK = 1 << 22  # slots per chunk when marking trec_weighted's per-step counts
GOLDEN = (5**0.5 - 1) / 2  # the phase turn per step of trec_weighted's positions
CURVE_STRATEGIES = ("trec_valley", "trec_weighted")  # the strategies that read stage 2's predicted curve


class PlacementError(ValueError):
    """A plan that cannot be made from this data (a tier too short, a window too small)."""


@dataclass(frozen=True)
class PlanRequest:
    """Everything a plan depends on besides the sequences."""

    steps: int
    batch: int
    strategy: str
    hq_fraction: float
    seed: int
    on_shortage: str = "repeat"
    tier_weights: dict[str, float] | None = None
    window: tuple[float, float] | None = None  # the ``window`` strategy's [a, b]
    k: float = 4.0  # the ``trec_weighted`` exponent (the recipe's default: trecflow.recipe.TREC_WEIGHTED_K)

    @property
    def slots(self) -> int:
        return self.steps * self.batch

    @property
    def hq_slots(self) -> int:
        return round(self.hq_fraction * self.slots)


@dataclass
class Plan:
    """A filled plan: ``ids[j]`` is the sequence of slot j; ``tiers[j]`` its tier code."""

    ids: np.ndarray = field(repr=False)
    tiers: np.ndarray = field(repr=False)
    steps: int
    batch: int
    window_steps: tuple[int, int] | None
    counts: dict[str, dict[str, int]]

    @cached_property
    def _composition(self) -> np.ndarray:
        per_step = self.tiers.reshape(self.steps, self.batch)
        return np.stack([(per_step == code).sum(axis=1, dtype=np.int32) for code in range(len(TIERS))], axis=1)

    def composition(self) -> np.ndarray:
        """(steps x 3) int32: hq, mid and lq sequences of each step (computed once)."""
        return self._composition

    def hq_share_per_step(self) -> np.ndarray:
        return self.composition()[:, HQ] / self.batch

    @property
    def hq_slots(self) -> int:
        return int(self.counts["hq"]["slots"])

    def hq_in_window(self) -> float | None:
        """Share of the hq slots inside the window (None without a window or hq)."""
        if self.window_steps is None or self.hq_slots == 0:
            return None
        start, end = self.window_steps
        inside = np.count_nonzero(self.tiers[start * self.batch : end * self.batch] == HQ)
        return inside / self.hq_slots

    def window_fraction(self) -> list[float] | None:
        if self.window_steps is None:
            return None
        start, end = self.window_steps
        return [start / self.steps, end / self.steps]

    @property
    def repeated_sequences(self) -> int:
        return sum(entry["repeated"] for entry in self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "sequences_per_step": self.batch,
            "sequences": self.steps * self.batch,
            "hq_fraction": self.hq_slots / (self.steps * self.batch),
            "window": self.window_fraction(),
            "window_steps": list(self.window_steps) if self.window_steps else None,
            "hq_in_window": self.hq_in_window(),
            "repeated_sequences": self.repeated_sequences,
            "unplaced_sequences": sum(entry["unplaced"] for entry in self.counts.values()),
            "tiers": self.counts,
        }


def hq_region(request: PlanRequest, trec: np.ndarray | None) -> tuple[int, int, tuple[int, int] | None]:
    """(first slot, number of slots) of the region the hq slots spread over, and the window in
    steps that the strategy reports. Raises PlacementError when the region cannot hold them."""
    slots, hq, batch, steps = request.slots, request.hq_slots, request.batch, request.steps
    strategy = request.strategy
    if strategy in ("uniform", "ascending"):
        return 0, slots, None
    if strategy == "start":
        return 0, hq, (0, -(-hq // batch))
    if strategy == "end":
        return slots - hq, hq, ((slots - hq) // batch, steps)
    if strategy == "window":
        a, b = request.window
        start, end = round(a * steps), round(b * steps)
        capacity = (end - start) * batch
        if capacity < hq:
            raise PlacementError(
                f"window [{a:g}, {b:g}] holds steps {start}..{end - 1} = {capacity:,} sequences, fewer than the "
                f"{hq:,} hq sequences of w={request.hq_fraction:g}; widen the window or lower hq_fraction"
            )
        return start * batch, capacity, (start, end)
    if strategy == "trec_valley":
        check_curve(request, trec)
        start, end = best_window(trec, hq / slots)
        capacity = (end - start) * batch
        if capacity >= hq:
            return start * batch, capacity, (start, end)
        first = min(start * batch, slots - hq)  # the window rounds down by part of a step
        return first, hq, (start, end)
    raise PlacementError(f"unknown strategy {strategy!r}")


def check_curve(request: PlanRequest, trec: np.ndarray | None) -> None:
    if trec is None or trec.size != request.steps:
        raise PlacementError(
            f"{request.strategy} needs the predicted curve of all {request.steps} steps (got {None if trec is None else trec.size})"
        )


def trec_log_weights(trec: np.ndarray, k: float) -> np.ndarray:
    """log (1 - u)^k per step, u = (trec - min) / (max - min): stage 2's curve min-max normalized,
    so 0 is the valley's bottom and 1 the curve's highest point (the stored ``trec_pred`` is
    1 - (c/max c)^p * t^m, whose minimum is above 0 when m > 0; a curve's shape, not its offset,
    is what `best_window` reads too). A flat curve, or k = 0, gives equal weights (uniform); with
    k > 0 the highest point gets weight 0 (log -inf). Logs, so a large k does not underflow."""
    if not np.all(np.isfinite(trec)):
        raise PlacementError(f"trec_weighted needs a finite predicted curve; it has {np.count_nonzero(~np.isfinite(trec)):,} non-finite values")
    low, high = float(trec.min()), float(trec.max())
    if k == 0 or high == low:
        return np.zeros(trec.size)
    u = (trec.astype(np.float64) - low) / (high - low)
    with np.errstate(divide="ignore"):
        return k * np.log1p(-np.minimum(u, 1.0))


def water_fill(log_weights: np.ndarray, total: float, cap: float) -> np.ndarray:
    """Targets t_s = min(cap, L * w_s) summing to ``total`` (<= cap * steps), w_s = exp(log_weights):
    the fixed point of "cap every step above ``cap``, hand the excess to the others in proportion to
    their weights, repeat". Found directly: with the weights sorted in descending order, the capped
    steps are the first c, c the smallest with L_c * w_(c) <= cap, L_c = (total - c*cap) / (sum of
    the weights from c on) (tail sums in log space). When the positive weights cannot hold
    ``total``, they are all capped and the rest is spread evenly over the zero-weight steps."""
    steps = log_weights.size
    order = np.argsort(-log_weights, kind="stable")
    ordered = log_weights[order]
    positive = int(np.count_nonzero(ordered > -np.inf))
    targets = np.zeros(steps)
    capped = np.arange(positive)
    remaining = total - capped * cap
    tails = np.logaddexp.accumulate(ordered[:positive][::-1])[::-1]  # log sum_{i >= c} w_(i)
    with np.errstate(divide="ignore", invalid="ignore"):
        fits = (remaining <= 0) | (np.log(remaining) - tails + ordered[:positive] <= np.log(cap) + 1e-12)
    if fits.any():
        c = int(np.argmax(fits))
        log_level = np.log(remaining[c]) - tails[c] if remaining[c] > 0 else -np.inf
        with np.errstate(under="ignore"):
            targets[order[c:]] = np.minimum(cap, np.exp(log_level + ordered[c:]))
        targets[order[:c]] = cap
        return targets
    targets[order[:positive]] = cap
    if positive < steps:
        targets[order[positive:]] = min(cap, (total - positive * cap) / (steps - positive))
    return targets


def integer_counts(targets: np.ndarray, total: int, cap: int) -> np.ndarray:
    """Whole counts in [0, cap] summing to ``total``, each within 1 of its target (targets in
    [0, cap] summing to ``total``): cumulative rounding, count_s = round(P_s) - round(P_(s-1)) with
    P the running sum of the targets, which spreads the fractional parts over the steps like
    ``uniform`` does. A count that float noise pushes over the cap (a running sum within 1e-9 of a
    half) is clipped and the difference given to the steps with the most room below their target."""
    bounds = np.floor(np.cumsum(targets) + 0.5).astype(np.int64)
    bounds[-1] = total
    counts = np.diff(bounds, prepend=0)
    np.clip(counts, 0, cap, out=counts)
    short = total - int(counts.sum())  # >= 0: the bounds rise to total and clipping only lowers
    if short:
        room = np.where(counts < cap, targets - counts, -np.inf)
        counts[np.argsort(-room, kind="stable")[:short]] += 1
    return counts


def weighted_counts(request: PlanRequest, trec: np.ndarray | None) -> tuple[np.ndarray, tuple[int, int]]:
    """``trec_weighted``: the hq sequences of every step (int64, summing to H, none above the
    batch) and the window it reports: the best window ``trec_valley`` would use (same length, H/S of
    the steps), so ``hq_in_window`` says how much of the hq lands where trec_valley puts all of it."""
    check_curve(request, trec)
    targets = water_fill(trec_log_weights(trec, request.k), float(request.hq_slots), float(request.batch))
    counts = integer_counts(targets, request.hq_slots, request.batch)
    return counts, best_window(trec, request.hq_slots / request.slots)


def mark_counts(mask: np.ndarray, counts: np.ndarray, batch: int) -> None:
    """Set ``counts[s]`` positions of each step s in ``mask`` (steps x batch slots), spread evenly
    over the step: positions floor((i*batch + phase_s) / n), i < n, with a phase in [0, batch) that
    turns by the golden ratio from step to step, so every rank's contiguous share of the batches
    gets its part of the hq over training. Position p is one of them when c(p+1) > c(p), c(p) =
    ceil((p*n - phase + batch) / batch). Vectorized by chunks of steps (int32 where it cannot
    overflow): about 1 s for 2e8 slots."""
    by_step = mask.reshape(counts.size, batch)
    dtype = np.int32 if batch * (batch + 2) < 2**31 else np.int64
    positions = np.arange(batch + 1, dtype=dtype)
    phases = (np.modf(np.arange(counts.size) * GOLDEN)[0] * batch).astype(dtype)
    per_chunk = max(1, MARK_CHUNK // batch)
    for first in range(0, counts.size, per_chunk):
        rows = slice(first, first + per_chunk)
        ceil = positions * counts[rows, None].astype(dtype)
        ceil += (2 * batch - 1) - phases[rows, None]
        ceil //= batch
        np.greater(ceil[:, 1:], ceil[:, :-1], out=by_step[rows])


def spread(first: int, region: int, count: int) -> np.ndarray:
    """``count`` slot numbers spread evenly over ``[first, first + region)`` (all distinct)."""
    return first + (np.arange(count, dtype=np.int64) * region) // max(count, 1)


def draw(pool: np.ndarray, count: int, rng: np.random.Generator, tier: str, on_shortage: str) -> tuple[np.ndarray, int]:
    """``count`` ids from ``pool`` in a seeded order; repeats whole permutations when short.

    Returns the ids (a new array: the pool can be freed) and how many are repetitions."""
    if count == 0:
        return pool[:0].copy(), 0
    if pool.size == 0:
        raise PlacementError(f"the plan needs {count:,} {tier} sequences but the packed data has none")
    if count > pool.size and on_shortage == "fail":
        raise PlacementError(
            f"the plan needs {count:,} {tier} sequences but the packed data has {pool.size:,} "
            "(curriculum.on_shortage: fail; set it to repeat, or lower hq_fraction)"
        )
    passes = []
    remaining = count
    while remaining > 0:
        if remaining * 4 < pool.size:  # a small sample: no need to permute the whole pool
            passes.append(pool[rng.choice(pool.size, remaining, replace=False)])
        else:
            order = pool.copy()
            rng.shuffle(order)
            passes.append(order[:remaining].copy() if remaining < order.size else order)
            del order
        remaining -= passes[-1].size
    drawn = passes[0] if len(passes) == 1 else np.concatenate(passes)
    return drawn, max(0, count - pool.size)


def ascending_order(scores: np.ndarray) -> np.ndarray:
    """Slot order by score, ties kept in slot order (what a stable argsort gives), for scores
    >= 0: one uint64 key per slot, (float32 bits of the score) << 32 | slot, sorted in place.
    About 12x faster than ``argsort(kind="stable")`` at 2e8 slots, in a single array."""
    if scores.size >= 2**32:
        raise PlacementError(f"ascending supports fewer than 2^32 slots, got {scores.size:,}")
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.uint32)
    keys = bits.astype(np.uint64)
    keys <<= np.uint64(32)
    for first in range(0, keys.size, ORDER_CHUNK):  # the slot numbers, without a full-size temporary
        keys[first : first + ORDER_CHUNK] |= np.arange(first, min(first + ORDER_CHUNK, keys.size), dtype=np.uint64)
    keys.sort()
    keys &= np.uint64(0xFFFFFFFF)
    return keys


def filler_counts(request: PlanRequest, supply: dict[str, int]) -> dict[str, int]:
    """How many mid and lq sequences fill the non-hq slots."""
    rest = request.slots - request.hq_slots
    weights = request.tier_weights or {"mid": supply["mid"], "lq": supply["lq"]}
    mid_weight, lq_weight = float(weights.get("mid", 0.0)), float(weights.get("lq", 0.0))
    if rest and mid_weight + lq_weight <= 0:
        raise PlacementError(f"the plan needs {rest:,} mid or lq sequences but the packed data has none")
    mid = round(rest * mid_weight / (mid_weight + lq_weight)) if rest else 0
    return {"mid": mid, "lq": rest - mid}


def check_request(request: PlanRequest) -> None:
    """Errors that need no data: call before any expensive work."""
    if request.hq_slots == 0:
        raise PlacementError(f"hq_fraction {request.hq_fraction:g} of {request.slots:,} sequences rounds to 0 hq sequences")
    if request.strategy == "trec_weighted":
        k = request.k
        if isinstance(k, bool) or not isinstance(k, (int, float)) or not np.isfinite(k) or k < 0:
            raise PlacementError(f"trec_weighted: k must be a finite number >= 0, got {k!r}")
        return
    hq_region(request, np.zeros(request.steps) if request.strategy in CURVE_STRATEGIES else None)


def make_plan(request: PlanRequest, tiers: np.ndarray, scores: np.ndarray, trec: np.ndarray | None = None) -> Plan:
    """Fill all S slots from the packed sequences (``tiers`` int8 codes and ``scores`` per id)."""
    check_request(request)
    if request.strategy == "trec_weighted":
        per_step, window = weighted_counts(request, trec)
    else:
        first, region, window = hq_region(request, trec)
    id_dtype = np.uint32 if tiers.size < 2**32 else np.uint64
    supply = dict(zip(TIERS, np.bincount(tiers, minlength=len(TIERS)).tolist()))
    need = {"hq": request.hq_slots, **filler_counts(request, supply)}

    drawn: dict[str, np.ndarray] = {}
    counts: dict[str, dict[str, int]] = {}
    for code, tier in enumerate(TIERS):
        pool = np.flatnonzero(tiers == code).astype(id_dtype)
        rng = np.random.default_rng([request.seed, code])
        drawn[tier], repeated = draw(pool, need[tier], rng, tier, request.on_shortage)
        unique = need[tier] - repeated
        counts[tier] = {"supply": supply[tier], "slots": need[tier], "repeated": repeated, "unplaced": supply[tier] - unique}
        del pool

    ids = np.empty(request.slots, dtype=id_dtype)
    slot_tiers = np.empty(request.slots, dtype=np.int8)
    hq_mask = np.zeros(request.slots, dtype=bool)
    if request.strategy == "trec_weighted":
        mark_counts(hq_mask, per_step, request.batch)
        del per_step
    else:
        hq_mask[spread(first, region, request.hq_slots)] = True
    ids[hq_mask] = drawn.pop("hq")
    slot_tiers[hq_mask] = HQ
    filler = np.concatenate([drawn.pop("mid"), drawn.pop("lq")])
    np.random.default_rng([request.seed, len(TIERS)]).shuffle(filler)
    rest = ~hq_mask
    ids[rest] = filler
    slot_tiers[rest] = tiers[filler]
    del filler, rest, hq_mask

    if request.strategy == "ascending":
        order = ascending_order(scores[ids])  # scores are in [0, 1]
        ids = ids[order]
        slot_tiers = slot_tiers[order]
    return Plan(ids, slot_tiers, request.steps, request.batch, window, counts)
