"""The benchmarks cannot rot: each one's smoke mode (`python -m bench NAME --smoke`: tiny sizes,
the same code paths and report) runs as a real subprocess, exits 0 and prints its figures, and
the ratios it prints are positive finite numbers.

`predict`, `place` and `gpu` (on a machine without CUDA its smoke mode runs DeepSpeed, the loop and
the re-evaluation on the CPU) start no services: together about a minute, most of it `gpu`'s
imports. `score`, `train` and `reevaluate` start a local Ray (scoring actors, Ray Train), so
they are marked slow; `train` and `reevaluate` run in one process (``python -m bench train
reevaluate --smoke``, once per module), which stages their shared recipe (stages 1-3) once. They
run one after another: started together they only contend for the same cores. `load` runs one
real `trecflow compare` subprocess (slow: a cold store's stages and one variant)."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import pytest

from ..conftest import ROOT

NUMBER = r"(-?[0-9][0-9,]*(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?|-?inf|nan)"


def run_smoke(name: str, timeout: float, env: dict[str, str] | None = None) -> str:
    """Run ``python -m bench NAME --smoke`` (NAME: one or more names, space-separated) from the repository root (with the session's
    TRECFLOW_HOME in its environment, so nothing lands in the checkout); its stdout, after
    asserting exit status 0."""
    began = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "bench", *name.split(), "--smoke"], cwd=ROOT, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"bench {name} --smoke exited {result.returncode}:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    print(f"bench {name} --smoke: {time.perf_counter() - began:.1f} s")
    return result.stdout


def figures(output: str, pattern: str, count: int | None = None) -> list[float]:
    """The numbers that ``pattern``'s ``{n}`` placeholders match, over every matching line."""
    regex = re.compile(pattern.replace("{n}", NUMBER))
    values = [float(text.replace(",", "")) for match in regex.finditer(output) for text in match.groups()]
    assert values, f"no line matches {pattern!r} in:\n{output}"
    if count is not None:
        assert len(values) == count, (pattern, values)
    return values


def positive(values: list[float]) -> list[float]:
    for value in values:
        assert math.isfinite(value) and value > 0, values
    return values


def test_bench_rejects_unknown_names_and_options():
    for args in (["nope", "--smoke"], ["predict", "--fast"]):
        result = subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and "unknown" in result.stderr, result.stderr


def test_predict_smoke():
    out = run_smoke("predict", timeout=120)
    assert "predict_smoke: steps=10,000" in out
    positive(figures(out, r"full prediction \(schedule \+ c \+ TREC \+ valley\)\s+{n} ms", 1))
    positive(figures(out, r"ratio loop / vectorized coefficients\s+{n}x", 1))
    positive(figures(out, r"ratio loop / full vectorized prediction\s+{n}x", 1))


def test_place_smoke():
    out = run_smoke("place", timeout=240)
    assert "200 steps x 1,024 sequences = 204,800 slots" in out
    ratios = positive(figures(out, r"ratio \w+\s+plan / shuffle\s+{n}x, write / np\.save\s+{n}x, batch\(\) / mmap row\s+{n}x, "
                                   r"rank_batch\(\) / mmap row\s+{n}x", 12))
    assert len(ratios) == 12  # 4 ratios x 3 variants
    for variant in ("uniform", "trec_valley", "ascending"):
        assert re.search(rf"{variant}\s.*time OK, memory OK", out), variant
        assert re.search(rf"{variant}\s+hq share 0\.1000.*all slots filled with existing ids OK, lookups match plan OK", out), variant
    assert re.search(r"trec_valley\s+hq share 0\.1000, hq in window 1\.0000", out)


def test_gpu_smoke():
    """Without CUDA: DeepSpeed (gloo), the loop and the re-evaluation on the CPU; a peak given
    through the environment exercises the MFU arithmetic."""
    out = run_smoke("gpu", timeout=300, env={"TRECFLOW_BENCH_PEAK_FLOPS": "1e11"})
    assert "gpu: smoke mode on" in out
    positive(figures(out, r"ratio DeepSpeed / loop tokens/s\s+{n}", 1))
    deepspeed = positive(figures(out, r"DeepSpeed ZeRO-2 bf16, \S+\s+{n}\s+{n}\s+{n}\s+{n}\s+{n}%\s+{n}%", 6))
    positive(figures(out, r"loop, autocast bf16, \S+\s+{n}\s+{n}\s+{n}\s+{n}\s+{n}%\s+{n}%", 6))
    tokens_per_second, step_ms = deepspeed[0], deepspeed[1]
    assert tokens_per_second == pytest.approx(2 * 64 / (step_ms / 1e3), rel=0.01)  # micro-batch 2 x 64 tokens / mean step
    # 6N and 6N + 12 L d s FLOPs per token for the tiny Llama: 12 x 2 layers x 64 hidden x 64 tokens = 0.098 M more
    dense, attention = figures(out, r"FLOPs per token {n} M \(6N\), {n} M with attention", 2)
    assert attention - dense == pytest.approx(12 * 2 * 64 * 64 / 1e6, abs=0.006)
    reeval = positive(figures(out, r"(?m)^\s+[24]\s+{n}\s+{n}\s+{n}\s+{n}\s+{n}%\s+{n}%.*\s{n}x$", 14))
    assert len(reeval) == 14  # micro-batches 2 and 4
    assert figures(out, r"max \|diff\| {n}", 1)[0] < 0.1  # bf16 vs fp32 losses of the same weights


@pytest.mark.slow
def test_score_smoke():
    out = run_smoke("score", timeout=900)
    positive(figures(out, r"ratio stage / loop, docs per second per core\s+{n}", 1))
    positive(figures(out, r"ratio stage / loop, wall-clock throughput\s+{n}", 1))
    marginal = figures(out, r"ratio stage marginal / loop, per core\s+{n}", 1)[0]
    assert math.isfinite(marginal)  # a difference of two noisy timings: its sign is not guaranteed
    positive(figures(out, r"peak memory 2x / 1x: summed over processes {n}, largest process {n}", 2))
    documents = figures(out, r"(?m)^\s+[12]x corpus: {n} documents scored", 2)
    assert documents[1] > documents[0] > 0
    positive(figures(out, r"language filter alone \(lid\.176, first 1,000 characters\), same documents: {n} docs/s/core", 1))
    assert "(rules, classifier: fasttext)" in out  # the configuration the throughput target names
    positive(figures(out, r"perplexity scorer alone \(a random Llama, {n}M parameters; 512 tokens, batches of 8, 1 CPU thread\): {n} tokens/s", 2))


@pytest.fixture(scope="module")
def train_and_reevaluate() -> str:
    """The output of ``python -m bench train reevaluate --smoke``: one process, one staging."""
    return run_smoke("train reevaluate", timeout=900)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_train_smoke(train_and_reevaluate):
    out = train_and_reevaluate
    assert "6 steps x 8 sequences x 128 tokens" in out
    assert re.search(r"train: stages 1-3 staged in \d+ s \(\d+ packed cpt sequences\)", out)
    for label in ("steady tokens/s \\(loop: mean of 2 runs\\)", "median step", "job wall-clock / loop", "job end-to-end / loop",
                  "job / ideal \\(2 x the 1-thread loop\\)"):
        positive(figures(out, rf"ratio (?:job / loop, )?{label}\s+{{n}}", 1))
    if "tokens per CPU-second  " in out:  # printed when the workers' CPU time could be read
        positive(figures(out, r"ratio job / loop, tokens per CPU-second\s+{n}", 1))
    assert "the same LR at every step on all sides: yes" in out
    losses = positive(figures(out, r"final loss: job {n}, loops {n}, {n}, {n}", 4))
    assert max(losses) - min(losses) < 1e-3
    positive(figures(out, r"run_train call -> step 0 starts: START-UP\s+{n} s", 1))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_reevaluate_smoke(train_and_reevaluate):
    out = train_and_reevaluate
    assert "reevaluate: 6 steps x 8 sequences x 128 tokens (6 units; stages 1-3 reused from an earlier benchmark)" in out
    positive(figures(out, r"train loop \(1 thread\)\s+{n} tokens/s", 1))
    positive(figures(out, r"forward loop \(1 thread\)\s+{n} tokens/s\s+{n}x training", 2))
    rates = positive(figures(out, r"actors, (?:1 actor x 1 thread|2 actors x 1 thread)\s+{n} tokens/s\s+{n}x training", 4))
    assert len(rates) == 4  # the two pools of the smoke (1 actor x 2 threads is left out)
    positive(figures(out, r"1 -> 2 actors \(1 thread each\): {n}x; best pool / training = {n}x", 2))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_load_smoke():
    """One real `trecflow compare` subprocess (one variant on a cold store), its process tree's
    peak memory sampled and the compare's own figure printed beside it."""
    out = run_smoke("load", timeout=900)
    assert "load_smoke: configs/test.yaml + configs/overlays/eight-variants.yaml (8 variants:" in out
    wall, pss, rss, processes, flow_pss = figures(out, r"(?m)^\s+one variant \(staged\)\s+1\s+1\s+{n}\s+{n}\s+{n}\s+{n}\s+{n}$", 5)
    assert wall > 0 and 500 < pss <= rss and processes >= 5 and 0 < flow_pss <= pss, (wall, pss, rss, processes, flow_pss)
