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

Smoke mode (``python -m bench reevaluate --smoke``): `bench_train`'s smoke sizes (12 steps, a
2-layer hidden-64 Llama, `bench_train.use_sizes`); the same loops and actor pools.
"""

from __future__ import annotations

import time
from pathlib import Path

GOAL = 2.5
STEPS_PER_UNIT = 6


def _save_model(base, folder: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = dict(base.config)
    torch.manual_seed(config.pop("init_seed", 0))
    AutoModelForCausalLM.from_config(LlamaConfig(**config)).save_pretrained(folder)
    return str(folder)


def _units(index, seq_len: int):
    import numpy as np

    from training.reevaluation import Unit

    ids = index.batches(np.arange(index.steps))
    return [Unit(start, ids[start : start + STEPS_PER_UNIT], ids[start : start + STEPS_PER_UNIT].size * seq_len)
            for start in range(0, index.steps, STEPS_PER_UNIT)]


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
        with bench_train.isolated_home("trecflow-bench-reevaluate-") as home:
            if smoke:
                print("reevaluate: smoke mode: tiny sizes, not a measurement", flush=True)
            _run(home, bench_train)
    finally:
        bench_train.use_sizes(False)


def _run(home: Path, bench_train) -> None:
    from tests.corpus_builder import build_test_corpus
    from trecflow.store import Store
    from training.sample_index import SampleIndex

    build_test_corpus(home / "corpus" / "test")
    recipe = bench_train.bench_recipe()
    store = Store(str(home / "store"))
    quiet = {"progress": lambda line: None}
    place_fp, _, base, _ = bench_train.stage(recipe, store, quiet)
    index = SampleIndex(store, place_fp)
    model_uri = _save_model(base, home / "model")
    units = _units(index, recipe.data.seq_len)
    pack_fp = index.inputs["pack"]

    print(f"reevaluate: {index.steps} steps x {index.batch_size} sequences x {recipe.data.seq_len} tokens, load {bench_train.load_average()}")
    train_before = bench_train.run_loop(recipe, store, place_fp, base, threads=2)["steady"]
    forward = _forward_loop_rate(model_uri, index, threads=2)
    rates = {
        "1 actor x 1 thread": _pool_rate(model_uri, store, pack_fp, units, actors=1, threads=1),
        "1 actor x 2 threads": _pool_rate(model_uri, store, pack_fp, units, actors=1, threads=2),
        "2 actors x 1 thread": _pool_rate(model_uri, store, pack_fp, units, actors=2, threads=1),
    }
    train_after = bench_train.run_loop(recipe, store, place_fp, base, threads=2)["steady"]
    train = (train_before + train_after) / 2
    print(f"  train loop (2 threads)      {train:10,.0f} tokens/s   (before {train_before:,.0f}, after {train_after:,.0f})")
    print(f"  forward loop (2 threads)    {forward:10,.0f} tokens/s   {forward / train:5.2f}x training")
    for name, rate in rates.items():
        print(f"  actors, {name:20s}{rate:10,.0f} tokens/s   {rate / train:5.2f}x training")
    scaling = rates["2 actors x 1 thread"] / rates["1 actor x 1 thread"]
    best = max(rates.values())
    print(f"  1 -> 2 actors (1 thread each): {scaling:.2f}x; best pool / training = {best / train:.2f}x "
          f"(goal >= {GOAL}x: {'met' if best / train >= GOAL else 'NOT met'})")
