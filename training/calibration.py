"""Calibrating the predictor's training-fraction exponent from measured runs (pure numpy).

Every measured run whose data mix is constant in time contributes (TPP, tau, schedule kind, m*),
m* being the m that best fits its measured TREC. The law

    m* = C * TPP^mu1 * tau^mu2

is fitted by least squares in log space, per schedule family when that family has enough runs,
and over all runs pooled otherwise. An exponent is fitted only when its variable takes at least
two distinct values among the runs (else it is reported as not fitted and held at 0); a law needs
at least `MIN_RUNS` runs. Runs with m* = 0 have no logarithm, and a run whose measured curve does
not take the predicted shape at any m (its best r_p below `MIN_R_P_FIT`: e.g. a weight decay so
strong that the loss rises as the LR decays) has no m* to speak of: both are counted and left out.
m* is the exponent that goes with the prediction's p (``trec.p``): a law is fitted from the runs of
one p and records it; runs of other values of p are counted and left out.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

MIN_RUNS = 5
MIN_R_P_FIT = 0.8  # a run's r_p at its own best m below this: its m* is not a measurement of the exponent
POOLED = "all"


@dataclass(frozen=True)
class CalibrationRun:
    """One measured run's entry in the calibration table."""

    key: str  # the re-evaluation fingerprint
    recipe: str
    variant: str
    schedule: str
    tpp: float
    tau: float
    m_star: float
    r_p_fit: float
    steps: int
    p: float | None = None  # the prediction's trec.p (None: recorded before p was)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CalibrationError(ValueError):
    """Not enough (or not varied enough) runs for the law asked for."""


def _distinct(values: np.ndarray) -> int:
    return int(np.unique(np.round(np.log(values), 9)).size)


def fit_group(runs: list[CalibrationRun]) -> dict[str, Any]:
    """The law for one group of runs (all usable: m* > 0, best r_p >= `MIN_R_P_FIT`); CalibrationError
    if it cannot be fitted."""
    if len(runs) < MIN_RUNS:
        raise CalibrationError(f"{len(runs)} usable runs (m* > 0, best r_p >= {MIN_R_P_FIT}); a law needs at least {MIN_RUNS}")
    tpp = np.array([run.tpp for run in runs])
    tau = np.array([run.tau for run in runs])
    target = np.log([run.m_star for run in runs])
    columns = [np.ones(len(runs))]
    fitted = []
    for name, values in (("mu1", tpp), ("mu2", tau)):
        if _distinct(values) >= 2:
            columns.append(np.log(values))
            fitted.append(name)
    design = np.stack(columns, axis=1)
    solution, *_ = np.linalg.lstsq(design, target, rcond=None)
    residual = target - design @ solution
    law = {"C": float(math.exp(solution[0])), "mu1": 0.0, "mu2": 0.0, "fitted": fitted, "runs": [run.key for run in runs]}
    for name, value in zip(fitted, solution[1:]):
        law[name] = float(value)
    law["rms_log_error"] = float(np.sqrt(np.mean(residual**2)))
    spread = float(np.sum((target - target.mean()) ** 2))
    law["r2_log"] = 1.0 - float(np.sum(residual**2)) / spread if spread > 0 else None  # R^2 of the fit in log space
    not_fitted = [f"{name} (one {var} value)" for name, var in (("mu1", "TPP"), ("mu2", "tau")) if name not in fitted]
    law["note"] = "not fitted, held at 0: " + ", ".join(not_fitted) if not_fitted else ""
    return law


def fit_law(runs: list[CalibrationRun], p: float | None = None) -> dict[str, Any]:
    """Laws per schedule family (with enough runs) and pooled, from the runs measured at ``p``
    (None: the one p the runs share; CalibrationError listing them when they differ); raises
    CalibrationError when no law can be fitted, saying why."""
    recorded = sorted({run.p for run in runs}, key=lambda value: (value is None, value or 0.0))
    if p is None and len(recorded) > 1:
        counts = ", ".join(f"p {'unrecorded' if value is None else format(value, 'g')}: {sum(run.p == value for run in runs)} runs" for value in recorded)
        raise CalibrationError(f"the runs were predicted with different trec.p ({counts}) and m* depends on p: say which p to fit")
    if p is None and recorded:
        p = recorded[0]
    other_p = sum(run.p != p for run in runs)
    runs = [run for run in runs if run.p == p]
    positive = [run for run in runs if run.m_star > 0]
    usable = [run for run in positive if run.r_p_fit >= MIN_R_P_FIT]
    excluded = len(runs) - len(positive)
    poor = len(positive) - len(usable)
    laws: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    families = sorted({run.schedule for run in usable})
    for family in families:
        group = [run for run in usable if run.schedule == family]
        try:
            laws[family] = fit_group(group)
        except CalibrationError as error:
            reasons[family] = str(error)
    if len(families) != 1:  # with one family, the pooled law would be the family's law again
        try:
            laws[POOLED] = fit_group(usable)
        except CalibrationError as error:
            reasons[POOLED] = str(error)
    if not laws:
        detail = "; ".join(f"{name}: {why}" for name, why in reasons.items()) or "no runs recorded"
        at = "" if p is None else f" at p {p:g}"
        raise CalibrationError(f"cannot fit m* = C * TPP^mu1 * tau^mu2 from {len(runs)} run(s){at} ({excluded} with m* = 0, {poor} with best "
                               f"r_p below {MIN_R_P_FIT}, {other_p} at another p left out): {detail}")
    return {"laws": laws, "not_fitted": reasons, "p": p, "runs": len(runs), "excluded_m_zero": excluded, "excluded_poor_fit": poor,
            "excluded_other_p": other_p}


def law_m(fitted: dict[str, Any], schedule: str, tpp: float, tau: float) -> tuple[float, str]:
    """m for a recipe from a fitted law: its schedule family's law, else the pooled one.
    Returns (m, the law's name); CalibrationError if neither exists."""
    laws = fitted["laws"]
    name = schedule if schedule in laws else POOLED if POOLED in laws else None
    if name is None:
        raise CalibrationError(f"the calibration has no law for schedule {schedule!r} and no pooled law (laws: {', '.join(laws)})")
    law = laws[name]
    return float(law["C"] * tpp ** law["mu1"] * tau ** law["mu2"]), name
