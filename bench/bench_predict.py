"""predict_1m: TREC prediction for 10^6 steps (schedule, EMA coefficients, TREC, valley, window),
against a straightforward Python loop computing the same EMA coefficients (same run).

Smoke mode (``python -m bench predict --smoke``): 10^4 steps, fewer repeats."""

from __future__ import annotations

import time

import numpy as np

from trecflow.recipe import parse_recipe
from training.trec import ema_coefficients, ema_coefficients_loop, predict

STEPS = 1_000_000
SMOKE_STEPS = 10_000


def best_of(repeats: int, function) -> tuple[float, object]:
    """Shortest wall time of ``repeats`` calls, and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - started)
    return best, result


def run(smoke: bool = False) -> None:
    steps = SMOKE_STEPS if smoke else STEPS
    repeats, loop_repeats = (2, 1) if smoke else (5, 2)
    # One sequence per step and no training section: nothing here trains, so the training
    # defaults (2 workers) do not apply (trecflow.recipe).
    recipe = parse_recipe(
        {
            "name": "bench-smoke" if smoke else "bench-1m",
            "model": {"params": 3.9e9},
            "data": {"tokens": steps * 4096, "seq_len": 4096},
            "batch": {"tokens": 4096},
            "optimizer": {"peak_lr": 3e-4, "weight_decay": 0.1},
            "schedule": {"kind": "linear", "warmup": 0.01},
        }
    )
    assert recipe.steps == steps
    full_time, prediction = best_of(repeats, lambda: predict(recipe))
    lrs = prediction.lrs
    vector_time, (vector, _) = best_of(repeats, lambda: ema_coefficients(lrs, 0.1))
    as_list = lrs.tolist()
    loop_time, loop = best_of(loop_repeats, lambda: ema_coefficients_loop(as_list, 0.1))
    np.testing.assert_allclose(vector, loop, rtol=1e-9, atol=1e-300)
    window_time, _ = best_of(repeats, lambda: prediction.hq_window(0.1))
    label = "predict_smoke" if smoke else "predict_1m"
    print(f"{label}: steps={steps:,}{' (smoke: tiny sizes, not a measurement)' if smoke else ''}")
    print(f"  full prediction (schedule + c + TREC + valley)  {full_time * 1e3:8.1f} ms")
    print(f"  EMA coefficients, vectorized log-space          {vector_time * 1e3:8.1f} ms")
    print(f"  EMA coefficients, Python loop (baseline)        {loop_time * 1e3:8.1f} ms")
    print(f"  best window for w = 0.1                         {window_time * 1e3:8.1f} ms")
    print(f"  ratio loop / vectorized coefficients            {loop_time / vector_time:8.1f}x")
    print(f"  ratio loop / full vectorized prediction         {loop_time / full_time:8.1f}x")
