"""Sizing a CPT job before it runs: compute, memory, checkpoints, re-evaluation and storage.

Pure arithmetic on a recipe (no GPU needed). The assumptions, stated once:
- Training FLOPs = 6 * N * D with D the tokens actually trained (steps * batch); re-evaluation is
  forward only, 2 * N FLOPs per token. Time = FLOPs / (GPUs * peak * MFU), at the peak dense bf16
  FLOP/s of `GPU_TYPES` (H100 SXM: 989 TFLOP/s).
- Memory per GPU counts model and optimizer state only, before activations and buffers: bf16
  params (2 B/param) and grads (2 B/param), fp32 Adam m, v and master weights (12 B/param), with
  ZeRO partitioning over all GPUs (pure data parallelism):
  ZeRO-1 shards optimizer states, ZeRO-2 also grads, ZeRO-3 also params.
- A checkpoint holds bf16 weights plus the fp32 optimizer state (master weights, m, v):
  14 B/param, so a resume continues the optimizer exactly.
- 1 GB = 1e9 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trecflow.recipe import Recipe
from training.trec import predict

BYTES_PARAM_BF16 = 2
BYTES_GRAD_BF16 = 2
BYTES_OPTIMIZER_FP32 = 12  # master weights 4 + Adam m 4 + Adam v 4
BYTES_CHECKPOINT = BYTES_PARAM_BF16 + BYTES_OPTIMIZER_FP32
BYTES_SAMPLE_ID = 8  # one int64 sequence id per sequence per step in the sample index
BYTES_AVERAGE = 4  # checkpoint averaging's running sum of the snapshots: fp32, one copy on rank 0's host
GB = 1e9


@dataclass(frozen=True)
class GpuType:
    """Peak dense bf16 throughput and memory of one accelerator."""

    peak_flops: float
    memory_gb: float


GPU_TYPES: dict[str, GpuType] = {
    "H100": GpuType(peak_flops=989e12, memory_gb=80),  # H100 SXM
    "H200": GpuType(peak_flops=989e12, memory_gb=141),
    "A100": GpuType(peak_flops=312e12, memory_gb=80),  # A100 SXM 80GB
}


class SizingError(ValueError):
    """A plan option that cannot describe a run (message names the option)."""


def zero_memory_gb(params: float, gpus: int) -> dict[str, float]:
    """Model and optimizer state per GPU for ZeRO stages 1-3, in GB, before activations."""
    p, g, o = BYTES_PARAM_BF16 * params, BYTES_GRAD_BF16 * params, BYTES_OPTIMIZER_FP32 * params
    return {
        "zero1": (p + g + o / gpus) / GB,
        "zero2": (p + (g + o) / gpus) / GB,
        "zero3": (p + g + o) / gpus / GB,
    }


def averaging_costs(recipe: Recipe, checkpoint_every: int, step_seconds: float, keep_checkpoints: int) -> list[dict]:
    """For each declared variant that averages checkpoints: what the running average costs. Rank 0
    holds one fp32 copy of the parameters on its host from the first snapshot to the end, and every
    checkpoint written in that span carries it (one file, written by rank 0); the raw final model is
    stored beside the averaged one."""
    costs = []
    steps, params = recipe.steps, recipe.model.params
    for name, variant in recipe.curriculum.variants.items():
        averaging = variant.averaging
        if averaging is None:
            continue
        first = steps - 1 - (averaging.checkpoints - 1) * averaging.every  # the step after which the oldest snapshot is taken
        # checkpoints after steps n-1 with n a multiple of checkpoint_every, and after the last step
        carrying = steps // checkpoint_every - first // checkpoint_every + (1 if steps % checkpoint_every else 0)
        sum_gb = BYTES_AVERAGE * params / GB
        costs.append({
            "variant": name, "kind": averaging.kind, "checkpoints": averaging.checkpoints, "every": averaging.every,
            "first_snapshot_step": first, "span_steps": steps - first, "span_hours": (steps - first) * step_seconds / 3600.0,
            "host_memory_gb": sum_gb, "per_checkpoint_gb": sum_gb, "checkpoints_carrying_it": carrying,
            "written_gb": carrying * sum_gb, "stored_gb": min(carrying, keep_checkpoints) * sum_gb + BYTES_PARAM_BF16 * params / GB,
        })
    return costs


def plan(
    recipe: Recipe,
    gpus: int,
    gpu_type: str = "H100",
    mfu: float = 0.4,
    reeval_stride: int = 1,
    max_lost_hours: float = 0.5,
    keep_checkpoints: int = 3,
    token_bytes: int = 4,
) -> dict:
    """The sizing of ``recipe`` on ``gpus`` accelerators, as one JSON-able dict."""
    if gpu_type not in GPU_TYPES:
        raise SizingError(f"--gpu-type: unknown {gpu_type!r} (known: {', '.join(GPU_TYPES)})")
    if gpus < 1:
        raise SizingError(f"--gpus: must be at least 1, got {gpus}")
    if not 0.0 < mfu <= 1.0:
        raise SizingError(f"--mfu: must be in (0, 1], got {mfu:g}")
    if reeval_stride < 1:
        raise SizingError(f"--reeval-stride: must be at least 1, got {reeval_stride}")
    if max_lost_hours <= 0:
        raise SizingError(f"--max-lost-hours: must be positive, got {max_lost_hours:g}")
    if keep_checkpoints < 1:
        raise SizingError(f"--keep-checkpoints: must be at least 1, got {keep_checkpoints}")
    if token_bytes not in (2, 4):
        raise SizingError(f"--token-bytes: must be 2 (vocab <= 65536) or 4, got {token_bytes}")
    sequences = recipe.sequences_per_step
    if sequences % gpus:
        raise SizingError(f"--gpus: {sequences} sequences per step do not split evenly over {gpus} GPUs")

    device = GPU_TYPES[gpu_type]
    params = recipe.model.params
    steps = recipe.steps
    batch = recipe.batch.tokens
    tokens = recipe.tokens_trained
    throughput = gpus * device.peak_flops * mfu  # FLOP/s of the whole job
    flops = 6.0 * params * tokens
    gpu_hours = flops / (device.peak_flops * mfu) / 3600.0
    step_seconds = 6.0 * params * batch / throughput

    checkpoint_every = max(1, math.floor(max_lost_hours * 3600.0 / step_seconds))
    checkpoint_gb = BYTES_CHECKPOINT * params / GB

    reeval_steps = math.ceil(steps / reeval_stride)
    reeval_flops = 2.0 * params * reeval_steps * batch
    reeval_gpu_hours = reeval_flops / (device.peak_flops * mfu) / 3600.0

    memory = zero_memory_gb(params, gpus)
    prediction = predict(recipe)
    summary = prediction.summary(recipe.curriculum.hq_fraction)
    start, end = summary["hq_window_steps"]
    store = {
        "tokens": tokens * token_bytes / GB,
        "sample_index": steps * sequences * BYTES_SAMPLE_ID / GB,
        "checkpoints": keep_checkpoints * checkpoint_gb,
        "final_model": BYTES_PARAM_BF16 * params / GB,
    }
    return {
        "recipe": recipe.name,
        "gpus": gpus,
        "gpu_type": gpu_type,
        "peak_flops_per_gpu": device.peak_flops,
        "gpu_memory_gb": device.memory_gb,
        "mfu": mfu,
        "steps": steps,
        "tokens_trained": tokens,
        "tokens_per_step": batch,
        "tokens_per_gpu_per_step": batch // gpus,
        "sequences_per_step": sequences,
        "sequences_per_gpu_per_step": sequences // gpus,
        "tau": summary["tau"],
        "tpp": summary["tpp"],
        "tau_opt": summary["tau_opt"],
        "weight_decay_opt": summary["weight_decay_opt"],
        "valley_fraction": summary["valley_fraction"],
        "valley_step": summary["valley_step"],
        "hq_fraction": summary["hq_fraction"],
        "hq_window": summary["hq_window"],
        "hq_window_steps": [start, end],
        "hq_window_tokens": [start * batch, end * batch],
        "flops": flops,
        "gpu_hours": gpu_hours,
        "wall_clock_hours": gpu_hours / gpus,
        "step_seconds": step_seconds,
        "memory_per_gpu_gb": memory,
        "zero_stages_that_fit": [stage for stage, gb in memory.items() if gb < device.memory_gb],
        "checkpoint_gb": checkpoint_gb,
        "checkpoint_every_steps": checkpoint_every,
        "checkpoint_every_hours": checkpoint_every * step_seconds / 3600.0,
        "checkpoints_written": math.ceil(steps / checkpoint_every),
        "reeval_stride": reeval_stride,
        "reeval_steps": reeval_steps,
        "reeval_gpu_hours": reeval_gpu_hours,
        "reeval_with_reference_gpu_hours": 2.0 * reeval_gpu_hours,
        "store_gb": {**store, "total": sum(store.values())},
        "averaging": averaging_costs(recipe, checkpoint_every, step_seconds, keep_checkpoints),
        "warnings": summary["warnings"],
    }
