"""The statistics of a seed study (`flows.study`): per variant the spread over seeds, per pair of
variants the paired difference and whether it stands out of the seed noise. Pure numpy.

Input: per variant, per seed, the metrics of that seed's run (``{variant: {seed: {metric: value}}}``);
a value that is None or not finite is missing (that seed is left out of that metric).

- Per variant and metric: N (the seeds with a value), the mean, and the sample standard deviation
  SD (ddof=1; None with N < 2).
- Per pair of variants (a, b), in the order given, and metric: the paired differences
  d_s = x_a,s - x_b,s over the seeds both have, their mean, SE = SD(d, ddof=1) / sqrt(N), and the
  verdict ``|mean| > 3 SE``. Pairing takes out what a seed does to both variants alike (the same
  data order and initialisation noise), so a difference far smaller than either variant's own
  spread can still be consistent. Edge cases, explicitly:

  - N < 2: no SE can be estimated; SE and the verdict are None (printed ``n/a``).
  - every d_s equal (SE exactly 0): the verdict is ``mean != 0`` (a difference that no seed
    changes is not seed noise; equal variants give mean 0 and ``no``); the note says so.

- Per variant that averages checkpoints, and metric ``X`` whose raw counterpart ``X_final_model``
  the runs report (the raw final model's held-out loss; for r_p the same measured curve against the
  raw final model's prediction instead of the merge-aware one): the paired difference
  ``X - X_final_model`` over that variant's seeds, with the same SE and verdict (``averaging``).
  The ``_final_model`` metrics get a spread but no between-variant pairs.

Results are plain dataclasses; `StudyStats.as_json` is their JSON view (None, never NaN).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

# The verdict: |mean paired difference| > SIGNIFICANCE x SE.
SIGNIFICANCE = 3.0
FINAL_MODEL = "_final_model"  # metric X's value for the raw final model of a run that averages checkpoints
FEW_SEEDS = "fewer than 2 paired seeds: no SE"
NO_SPREAD = "SE 0: every seed gives the same difference"

Values = Mapping[int, "float | None"]  # seed -> value


def finite(value: Any) -> bool:
    """Whether ``value`` is a number that counts (not None, not NaN or infinite)."""
    return value is not None and not isinstance(value, bool) and math.isfinite(value)


def _sd(values: np.ndarray) -> float | None:
    """The sample SD (ddof=1), exactly 0 when every value is equal; None for fewer than 2 values."""
    if values.size < 2:
        return None
    if np.all(values == values[0]):
        return 0.0
    return float(np.std(values, ddof=1))


@dataclass(frozen=True)
class Spread:
    """One metric of one variant over seeds: the seeds with a value and those values (in seed
    order), N, the mean (None with N = 0) and the sample SD (ddof=1; None with N < 2)."""

    metric: str
    seeds: list[int]
    values: list[float]
    n: int
    mean: float | None
    sd: float | None


@dataclass(frozen=True)
class VariantStats:
    """A variant's spread per metric (in the study's metric order)."""

    variant: str
    metrics: dict[str, Spread]


@dataclass(frozen=True)
class PairedDifference:
    """Variant ``a`` minus variant ``b`` on one metric, seed by seed: the seeds both have, the
    differences d_s, N, their mean and SD (ddof=1), SE = SD / sqrt(N), the unpaired SE the same
    seeds would give without pairing (sqrt(SD_a^2/N + SD_b^2/N), for comparison), the verdict
    ``|mean| > 3 SE`` (None with N < 2) and a note on an edge case ("" otherwise)."""

    a: str
    b: str
    metric: str
    seeds: list[int]
    differences: list[float]
    n: int
    mean: float | None
    sd: float | None
    se: float | None
    se_unpaired: float | None
    verdict: bool | None
    note: str


@dataclass(frozen=True)
class StudyStats:
    """The metrics (in order), each variant's spread, each pair's difference and, per variant that
    averages checkpoints, the averaged-minus-raw difference (``a`` the variant, ``b`` "<variant>
    final model")."""

    metrics: list[str]
    variants: list[VariantStats]
    pairs: list[PairedDifference]
    averaging: list[PairedDifference] = dataclasses.field(default_factory=list)

    def variant(self, name: str) -> VariantStats:
        return next(entry for entry in self.variants if entry.variant == name)

    def pair(self, a: str, b: str, metric: str) -> PairedDifference:
        return next(entry for entry in self.pairs if (entry.a, entry.b, entry.metric) == (a, b, metric))

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def spread(metric: str, values: Values) -> Spread:
    """``metric``'s spread over the seeds that have a finite value."""
    seeds = sorted(seed for seed, value in values.items() if finite(value))
    array = np.array([values[seed] for seed in seeds], dtype=np.float64)
    return Spread(metric, seeds, [float(value) for value in array], len(seeds), float(array.mean()) if seeds else None, _sd(array))


def paired_difference(a: str, b: str, metric: str, values_a: Values, values_b: Values) -> PairedDifference:
    """``a`` minus ``b`` on ``metric`` over the seeds where both have a finite value."""
    seeds = sorted(seed for seed in values_a if seed in values_b and finite(values_a[seed]) and finite(values_b[seed]))
    xa = np.array([values_a[seed] for seed in seeds], dtype=np.float64)
    xb = np.array([values_b[seed] for seed in seeds], dtype=np.float64)
    d = xa - xb
    n = len(seeds)
    mean = float(d.mean()) if n else None
    sd = _sd(d)
    if n < 2:
        return PairedDifference(a, b, metric, seeds, [float(x) for x in d], n, mean, None, None, None, None, FEW_SEEDS)
    se = sd / math.sqrt(n)
    se_unpaired = math.sqrt((_sd(xa) ** 2 + _sd(xb) ** 2) / n)
    note = NO_SPREAD if se == 0.0 else ""
    verdict = abs(mean) > SIGNIFICANCE * se  # se 0: True exactly when mean != 0
    return PairedDifference(a, b, metric, seeds, [float(x) for x in d], n, mean, sd, se, se_unpaired, bool(verdict), note)


def study_stats(runs: Mapping[str, Mapping[int, Mapping[str, Any]]], metrics: Sequence[str]) -> StudyStats:
    """Every variant's spread and every pair's paired difference (pairs in the variants' order:
    (v1, v2), (v1, v3), (v2, v3), ...) on ``metrics`` (not on the ``_final_model`` ones), and the
    averaged-minus-raw difference of every variant with ``_final_model`` values, from
    ``{variant: {seed: {metric: value}}}``."""
    def column(variant: str, metric: str) -> dict[int, Any]:
        return {seed: values.get(metric) for seed, values in runs[variant].items()}

    variants = [VariantStats(variant, {metric: spread(metric, column(variant, metric)) for metric in metrics}) for variant in runs]
    compared = [metric for metric in metrics if not metric.endswith(FINAL_MODEL)]
    pairs = [paired_difference(a, b, metric, column(a, metric), column(b, metric))
             for a, b in itertools.combinations(list(runs), 2) for metric in compared]
    averaging = [paired_difference(variant, f"{variant} final model", metric, column(variant, metric), column(variant, metric + FINAL_MODEL))
                 for variant in runs for metric in compared
                 if metric + FINAL_MODEL in metrics and any(finite(value) for value in column(variant, metric + FINAL_MODEL).values())]
    return StudyStats(list(metrics), variants, pairs, averaging)


def verdict_text(verdict: bool | None) -> str:
    """A verdict as tables show it: ``yes`` / ``no`` (|mean| > 3 SE or not), ``n/a`` (None: fewer than 2 paired seeds)."""
    return "n/a" if verdict is None else ("yes" if verdict else "no")
