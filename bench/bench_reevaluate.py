"""reevaluate: forward-only re-evaluation throughput on Ray actors (`training.reevaluation`)
against the plain-loop *training* throughput of stage 4's benchmark, same model, batch and run.

Recipe, stages 1-3, the index and the from-scratch tiny Llama are those of `bench.bench_train`
(the tiny-scale study's shape: 32 sequences of 128 tokens per step, hidden 128, 4 layers; `bench_train.STEPS`
steps). The model is saved once as a Hugging Face folder, which the actors load.

- train loop: `bench_train.run_loop` with 2 threads (the whole machine), run before and after the
  re-evaluations; the baseline is the mean of the two (the machine is shared and noisy).
- forward loop: the same batches, forward only (`training.reevaluation.sequence_losses`) in this
  process with 2 threads: what a forward pass costs without Ray.
- actors: an `ActorPool` evaluating every step's batch (units of 6 steps) with 1 actor x 1 thread,
  1 actor x 2 threads and 2 actors x 1 thread. The pool is started and warmed (model loaded, one
  unit evaluated) before the clock starts; tokens/s = evaluated tokens / wall time of `run`.
Ratios against the train loop; goal: re-evaluation >= 2.5x training (forward-only approaches 3x).

Stages 1-3 run once per process (`bench_train.staged`): after `train` in the same
``python -m bench`` run, at the same sizes, their store is reused.

Smoke mode (``python -m bench reevaluate --smoke``): `bench_train`'s smoke sizes (6 steps of 8
sequences, a 2-layer hidden-64 Llama, loops of 1 thread, `bench_train.use_sizes`) in units of 1 step; the same loops,
and the actor pools 1 actor x 1 thread and 2 actors x 1 thread (1 actor x 2 threads, the same code
path with more threads, is left out: each pool starts its own actor processes).
"""

from __future__ import annotations

import time
from pathlib import Path

GOAL = 2.5
STEPS_PER_UNIT = 6
SMOKE_STEPS_PER_UNIT = 1  # the smoke's 6 steps as 6 units, so that both actors of a pool get work
POOLS = ((1, 1), (1, 2), (2, 1))  # (actors, threads each)
SMOKE_POOLS = ((1, 1), (2, 1))


def _pool_name(actors: int, threads: int) -> str:
    return f"{actors} actor{'s' if actors > 1 else ''} x {threads} thread{'s' if threads > 1 else ''}"


def _save_model(base, folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = dict(base.config)
    torch.manual_seed(config.pop("init_seed", 0))
    AutoModelForCausalLM.from_config(LlamaConfig(**config)).save_pretrained(folder)
    return str(folder)


def _units(index, seq_len: int, steps_per_unit: int):
    import numpy as np

    from training.reevaluation import Unit

    ids = index.batches(np.arange(index.steps))
    return [Unit(start, ids[start : start + steps_per_unit], ids[start : start + steps_per_unit].size * seq_len)
            for start in range(0, index.steps, steps_per_unit)]


def _pool_rate(model_uri: str, store, pack_fp: str, units, actors: int, threads: int) -> float:
    from training.reevaluation import ActorPool, ModelSpec

    spec = ModelSpec(model_uri, micro_batch=32, threads=threads)
    with ActorPool(actors, spec, store.url, store.endpoint_url, pack_fp, cpus_per_actor=threads if actors == 1 else 1) as pool:
        pool.run(units[:actors], lambda unit, losses: None)  # warm: every actor loaded and used once
        began = time.perf_counter()
        pool.run(units, lambda unit, losses: None)
        seconds = time.perf_counter() - began
    return sum(unit.tokens for unit in units) / seconds


def _forward_loop_rate(model_uri: str, index, threads: int) -> float:
    import torch

    from training.reevaluation import ModelSpec, load_eval_model, sequence_losses

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = load_eval_model(ModelSpec(model_uri))
        sequence_losses(model, index.tokens(0), 32)  # warm
        began = time.perf_counter()
        tokens = 0
        for step in range(index.steps):
            batch = index.tokens(step)
            sequence_losses(model, batch, 32)
            tokens += batch.size
        return tokens / (time.perf_counter() - began)
    finally:
        torch.set_num_threads(previous)


def run(smoke: bool = False) -> None:
    from bench import bench_train

    bench_train.use_sizes(smoke)
    try:
        if smoke:
            print("reevaluate: smoke mode: tiny sizes, not a measurement", flush=True)
        with bench_train.staged("trecflow-bench-reevaluate-") as staging:
            _run(staging, bench_train, smoke)
    finally:
        bench_train.use_sizes(False)


def _run(staging, bench_train, smoke: bool = False) -> None:
    from training.sample_index import SampleIndex

    recipe, store, place_fp, base = staging.recipe, staging.store, staging.place_fp, staging.base
    index = SampleIndex(store, place_fp)
    model_uri = _save_model(base, staging.home / "model")
    units = _units(index, recipe.data.seq_len, SMOKE_STEPS_PER_UNIT if smoke else STEPS_PER_UNIT)
    pack_fp = index.inputs["pack"]
    pools = SMOKE_POOLS if smoke else POOLS

    staged = "reused from an earlier benchmark" if staging.reused else f"staged in {staging.seconds:.0f} s"
    print(f"reevaluate: {index.steps} steps x {index.batch_size} sequences x {recipe.data.seq_len} tokens "
          f"({len(units)} units; stages 1-3 {staged}), load {bench_train.load_average()}")
    threads = bench_train.LOOP_THREADS  # 2 (the whole machine); 1 in smoke mode
    train_before = bench_train.run_loop(recipe, store, place_fp, base, threads=threads)["steady"]
    forward = _forward_loop_rate(model_uri, index, threads=threads)
    rates = {_pool_name(actors, threads): _pool_rate(model_uri, store, pack_fp, units, actors, threads) for actors, threads in pools}
    train_after = bench_train.run_loop(recipe, store, place_fp, base, threads=threads)["steady"]
    train = (train_before + train_after) / 2
    loop = f"({threads} thread{'s' if threads > 1 else ''})"
    print(f"  train loop {loop:<17}{train:10,.0f} tokens/s   (before {train_before:,.0f}, after {train_after:,.0f})")
    print(f"  forward loop {loop:<15}{forward:10,.0f} tokens/s   {forward / train:5.2f}x training")
    for name, rate in rates.items():
        print(f"  actors, {name:20s}{rate:10,.0f} tokens/s   {rate / train:5.2f}x training")
    skipped = [_pool_name(actors, threads) for actors, threads in POOLS if (actors, threads) not in pools]
    if skipped:
        print(f"  (smoke: {', '.join(skipped)} not run: the same code path as 1 actor x 1 thread, with more threads)")
    scaling = rates["2 actors x 1 thread"] / rates["1 actor x 1 thread"]
    best = max(rates.values())
    print(f"  1 -> 2 actors (1 thread each): {scaling:.2f}x; best pool / training = {best / train:.2f}x "
          f"(goal >= {GOAL}x: {'met' if best / train >= GOAL else 'NOT met'})")
