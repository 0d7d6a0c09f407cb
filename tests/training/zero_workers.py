"""Worker processes for tests/training/test_deepspeed_config.py: a tiny Llama trained by DeepSpeed
on the CPU with 2 gloo workers (``torch.multiprocessing.spawn``), through the job's merged config.

Kept in its own module so spawned children import only this (not the test module and pytest's
fixtures). `train` runs in each child; `run` spawns them and returns rank 0's per-step losses.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
SEQ_LEN = 32
VOCAB = 256
MICRO = 2
ACCUMULATION = 2
WORLD = 2
MODEL = dict(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
)


def tiny_recipe(steps: int, zero_stage: int, deepspeed_config: str | None = None, activation_checkpointing: bool = False):
    """A recipe of ``steps`` steps of 2 workers x 2 micro-batches x 2 accumulation = 8 sequences."""
    from trecflow.recipe import parse_recipe

    sequences = MICRO * ACCUMULATION * WORLD
    return parse_recipe({
        "name": "zero-agreement",
        "model": {"params": 30000},
        "data": {"tokens": steps * sequences * SEQ_LEN, "seq_len": SEQ_LEN},
        "batch": {"tokens": sequences * SEQ_LEN},
        "optimizer": {"peak_lr": 1e-2, "weight_decay": 0.1, "betas": [0.9, 0.95]},
        "schedule": {"kind": "linear", "warmup": 0.1, "final_lr_ratio": 0.1},
        "training": {
            "workers": WORLD, "micro_batch": MICRO, "accumulation": ACCUMULATION, "zero_stage": zero_stage,
            "precision": "fp32", "gradient_clipping": 1.0, "deepspeed_config": deepspeed_config,
            "activation_checkpointing": activation_checkpointing,
        },
    })


def tokens(steps: int, seed: int = 0):
    """Fixed token batches, [steps, world, accumulation * micro, seq_len] int64: walks of a fixed
    random permutation of the vocabulary from random starts, so the loss falls as the model learns
    the bigrams (uniform random tokens would leave it at ln 256 and hide any disagreement)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    successor = torch.randperm(VOCAB, generator=generator)
    sequences = torch.empty(steps * WORLD * ACCUMULATION * MICRO, SEQ_LEN, dtype=torch.int64)
    sequences[:, 0] = torch.randint(0, VOCAB, (sequences.shape[0],), generator=generator)
    for position in range(1, SEQ_LEN):
        sequences[:, position] = successor[sequences[:, position - 1]]
    return sequences.view(steps, WORLD, ACCUMULATION * MICRO, SEQ_LEN)


def train(rank: int, port: int, jobs: list[tuple[dict[str, Any], dict[str, Any]]], steps: int, out: str) -> None:
    """One worker: for each (recipe, engine config) of ``jobs`` in turn, build the tiny Llama
    (seed 0), ``deepspeed.initialize`` it with the config, train ``steps`` steps with the recipe's LR
    schedule on the same token batches; rank 0 writes one result per job (per-step mean loss over
    the world, what the engine received) to ``out``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD))
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # torch's renamed collectives, in DeepSpeed
    torch.set_num_threads(1)
    from training.cpt_job import _skip_inference_shm_op

    _skip_inference_shm_op()
    import deepspeed
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, LlamaConfig
    from transformers.utils import logging as hf_logging

    from trecflow.recipe import parse_recipe
    from training.deepspeed_config import enable_activation_checkpointing
    from training.schedules import LRSchedule
    from training.torch_schedule import set_step_lr

    hf_logging.set_verbosity_error()
    deepspeed.init_distributed(dist_backend="gloo")
    data = tokens(steps)[:, rank]
    results = []
    for recipe_data, config in jobs:
        recipe = parse_recipe(recipe_data)
        began = time.perf_counter()
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL))
        if recipe.training.activation_checkpointing:  # as train_worker does
            enable_activation_checkpointing(model)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        schedule = LRSchedule.from_recipe(recipe)
        losses = []
        for step in range(steps):
            set_step_lr(engine.optimizer, schedule, step)
            micro_losses = []
            for number in range(ACCUMULATION):
                batch = data[step, number * MICRO : (number + 1) * MICRO]
                loss = engine(input_ids=batch, labels=batch).loss
                engine.backward(loss)
                engine.step()
                micro_losses.append(loss.detach().float())
            mean = torch.stack(micro_losses).mean()
            dist.all_reduce(mean, op=dist.ReduceOp.SUM)
            losses.append(float(mean) / WORLD)
        module = engine.module
        results.append({
            "losses": losses,
            "seconds": time.perf_counter() - began,
            "activation_checkpointing": bool(module.is_activation_checkpointing),
            "use_cache": module.config.use_cache,
            "zero_stage": engine.zero_optimization_stage(),
            # under ZeRO-3, a partitioned parameter holds no data outside its forward/backward
            "partitioned": sum(1 for p in module.parameters() if hasattr(p, "ds_tensor") and p.numel() == 0),
            "parameters": sum(1 for _ in module.parameters()),
            "config": engine.config,  # the dict deepspeed.initialize received
            "zero_config": engine._config.zero_config.model_dump(mode="json", by_alias=True),  # what DeepSpeed parsed from it
        })
        engine.destroy()
        del engine, model
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(jobs: list[tuple[Any, dict[str, Any]]], steps: int, out: Path) -> list[dict[str, Any]]:
    """Spawn the 2 workers for ``jobs`` ((recipe, engine config) pairs); rank 0's results."""
    import torch.multiprocessing as mp

    shipped = [(recipe.model_dump(mode="json"), config) for recipe, config in jobs]
    mp.spawn(train, args=(free_port(), shipped, steps, str(out)), nprocs=WORLD, join=True)
    return json.loads(out.read_text())
