"""The DeepSpeed engine config of a recipe: what the recipe decides, merged with the JSON that
``training.deepspeed_config`` names (what it does not decide).

The recipe decides the batch (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``), the ZeRO stage (``zero_optimization.stage``), the precision
(``bf16.enabled``, ``fp16.enabled``), gradient clipping and the optimizer (AdamW, torch's
implementation, with the recipe's LR, betas and weight decay; the LR of every step is then set by
trecflow's schedule, so there is no DeepSpeed ``scheduler``). The JSON adds the rest: buckets,
communication overlap, contiguous gradients, ZeRO-3 knobs, offload, DeepSpeed's
activation-checkpointing options, gradient communication dtype, logging...

Rules of the merge (`engine_config`):

- a key set in both with the same value is fine; with different values it is an error naming the
  file, the JSON key path and the recipe field:
  ``infra/deepspeed/zero3.json: zero_optimization.stage is 3 but training.zero_stage is 1``;
- blocks the recipe owns whole (``optimizer``, ``scheduler``, ``fp16``, ``bfloat16``, ``amp``,
  ``torch_autocast``) accept no key the recipe does not set;
- ZeRO-3 settings (``zero_optimization.stage3_*``, ``offload_param``, ``sub_group_size``) with
  another ``training.zero_stage`` are an error (DeepSpeed would silently ignore them: the JSON was
  written for another stage);
- ``steps_per_print`` and ``wall_clock_breakdown`` are the job's defaults (DeepSpeed's own logging,
  quiet): the JSON may set them.

Everything here is pure (no DeepSpeed import, no process group) except `resolve`, which reads the
file. The train stage resolves the config on the driver and ships the merged dict to the workers
inside the `JobSpec`, so workers never read the file.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping

from trecflow.recipe import RecipeError

# Blocks the recipe owns whole: the JSON may repeat what the recipe sets there, nothing else.
OWNED_BLOCKS = {
    "optimizer": "the recipe's optimizer section (trecflow trains with torch's AdamW)",
    "scheduler": "the recipe's schedule section (trecflow sets the LR of every step; DeepSpeed runs no scheduler)",
    "fp16": "training.precision",
    "bfloat16": "training.precision (written as bf16.enabled)",
    "amp": "training.precision",
    "torch_autocast": "training.precision",
}

# ZeRO settings that only stage 3 reads (besides every ``stage3_*`` key): refused at other stages.
ZERO3_ONLY = {"offload_param", "sub_group_size"}

# The job's defaults, which the JSON may change (DeepSpeed's own logging; trecflow logs its metrics).
JOB_DEFAULTS: dict[str, Any] = {"steps_per_print": 10**12, "wall_clock_breakdown": False}

# JSON keys that change speed, memory or logging but not the trained numbers (beyond the order of
# floating-point sums inside one reduction, which varies from run to run on GPUs anyway): left out
# of the train stage's fingerprint, so tuning them keeps a run resumable.
NOT_RESULTS = {
    ("steps_per_print",), ("wall_clock_breakdown",), ("memory_breakdown",), ("dump_state",),
    ("flops_profiler",), ("comms_logger",), ("tensorboard",), ("wandb",), ("csv_monitor",), ("comet",),
    ("activation_checkpointing",),  # deepspeed.checkpointing's options: recomputation, same numbers
    ("zero_optimization", "overlap_comm"), ("zero_optimization", "contiguous_gradients"),
    ("zero_optimization", "reduce_bucket_size"), ("zero_optimization", "allgather_bucket_size"),
    ("zero_optimization", "reduce_scatter"), ("zero_optimization", "allgather_partitions"),
    ("zero_optimization", "round_robin_gradients"), ("zero_optimization", "stage3_prefetch_bucket_size"),
    ("zero_optimization", "stage3_param_persistence_threshold"), ("zero_optimization", "stage3_max_live_parameters"),
    ("zero_optimization", "stage3_max_reuse_distance"), ("zero_optimization", "sub_group_size"),
    ("zero_optimization", "stage3_gather_16bit_weights_on_model_save"),
    ("zero_optimization", "gather_16bit_weights_on_model_save"),
}


def _decided(recipe) -> list[tuple[tuple[str, ...], Any, str]]:
    """(JSON key path, value, how the recipe states it) for every key the recipe decides."""
    training, optimizer = recipe.training, recipe.optimizer
    bf16 = training.precision == "bf16"
    fixed = "trecflow's AdamW uses"
    return [
        (("train_batch_size",), recipe.sequences_per_step,
         f"the recipe's batch (batch.tokens / data.seq_len) is {recipe.sequences_per_step}"),
        (("train_micro_batch_size_per_gpu",), recipe.micro_batch, f"training.micro_batch is {recipe.micro_batch}"),
        (("gradient_accumulation_steps",), training.accumulation, f"training.accumulation is {training.accumulation}"),
        (("zero_optimization", "stage"), training.zero_stage, f"training.zero_stage is {training.zero_stage}"),
        (("gradient_clipping",), training.gradient_clipping, f"training.gradient_clipping is {training.gradient_clipping:g}"),
        (("bf16", "enabled"), bf16, f"training.precision is {training.precision}"),
        (("fp16", "enabled"), False, f"training.precision is {training.precision}"),
        (("optimizer", "type"), "AdamW", "the recipe's optimizer is AdamW"),
        (("optimizer", "params", "lr"), optimizer.peak_lr, f"optimizer.peak_lr is {optimizer.peak_lr:g}"),
        (("optimizer", "params", "betas"), list(optimizer.betas), f"optimizer.betas is {list(optimizer.betas)}"),
        (("optimizer", "params", "weight_decay"), optimizer.weight_decay, f"optimizer.weight_decay is {optimizer.weight_decay:g}"),
        (("optimizer", "params", "eps"), 1e-8, f"{fixed} eps 1e-08"),
        (("optimizer", "params", "torch_adam"), True, f"{fixed} torch_adam true (torch.optim.AdamW)"),
    ]


def recipe_config(recipe) -> dict[str, Any]:
    """The DeepSpeed config of the recipe alone (with the job's defaults): what a recipe without
    ``training.deepspeed_config`` trains with."""
    return engine_config(recipe, None)


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, float) else f"{value:g}"


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b or math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _leaves(data: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    for key, value in data.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def engine_config(recipe, json_config: str | Mapping[str, Any] | None, source: str = "deepspeed config") -> dict[str, Any]:
    """The config ``deepspeed.initialize`` receives: ``json_config`` (the JSON's text or its parsed
    object; None for none) with what ``recipe`` decides set in it. Raises `RecipeError` (one line,
    starting with ``source``) for invalid JSON, a non-object, a recipe-decided key with another
    value, or a key in a block the recipe owns whole."""
    if json_config is None:
        given: dict[str, Any] = {}
    elif isinstance(json_config, str):
        try:
            given = json.loads(json_config)
        except json.JSONDecodeError as error:
            raise RecipeError(f"{source}: invalid JSON: {error.msg} (line {error.lineno}, column {error.colno})") from None
    else:
        given = copy.deepcopy(dict(json_config))
    if not isinstance(given, dict):
        raise RecipeError(f"{source}: a DeepSpeed config must be a JSON object, got {type(given).__name__}")

    decided = _decided(recipe)
    decided_paths = {path for path, _, _ in decided}
    for block, owner in OWNED_BLOCKS.items():
        if block not in given:
            continue
        if not isinstance(given[block], Mapping):
            raise RecipeError(f"{source}: {block} is {_show(given[block])} but it is decided by {owner}")
        for path, value in _leaves(given[block], (block,)):
            if path not in decided_paths:
                raise RecipeError(f"{source}: {'.'.join(path)} is {_show(value)} but it is decided by {owner}; remove it")

    config = given
    for path, value, stated in decided:
        node = config
        for depth, key in enumerate(path[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise RecipeError(f"{source}: {where} is {_show(child)} but it must be an object ({'.'.join(path)}: {stated})")
            node = child
        leaf = path[-1]
        if leaf in node and not _same(node[leaf], value):
            raise RecipeError(f"{source}: {'.'.join(path)} is {_show(node[leaf])} but {stated}")
        node[leaf] = value
    if recipe.training.zero_stage != 3:
        for key in config["zero_optimization"]:
            if key.startswith("stage3_") or key in ZERO3_ONLY:
                raise RecipeError(
                    f"{source}: zero_optimization.{key} is a ZeRO-3 setting but training.zero_stage is "
                    f"{recipe.training.zero_stage} (DeepSpeed would ignore it; use a JSON of that stage)"
                )
    for key, value in JOB_DEFAULTS.items():
        config.setdefault(key, value)
    return config


def config_path(recipe) -> Path | None:
    """``training.deepspeed_config`` as a path (relative: against the current directory)."""
    named = recipe.training.deepspeed_config
    return None if named is None else Path(named)


def resolve(recipe) -> dict[str, Any]:
    """The engine config of ``recipe``: reads the JSON ``training.deepspeed_config`` names (if any)
    and merges it (`engine_config`). Raises `RecipeError` (one line naming the file)."""
    path = config_path(recipe)
    if path is None:
        return engine_config(recipe, None)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError(
            f"{source}: cannot read training.deepspeed_config ({error.strerror}; relative paths resolve against "
            f"the current directory, {Path.cwd()})"
        ) from None
    return engine_config(recipe, text, source)


def check_deepspeed_config(recipe) -> None:
    """For ``trecflow validate``: raise `RecipeError` (one line) if ``training.deepspeed_config``
    cannot be read or conflicts with the recipe."""
    resolve(recipe)


def results_part(config: Mapping[str, Any], recipe) -> dict[str, Any]:
    """The keys of a merged engine config that can change the trained numbers and that the recipe
    does not already state (so they are not in its fingerprint): what the JSON adds, less
    `NOT_RESULTS` and the job's logging defaults. Empty for a recipe-only config."""
    decided = {path for path, _, _ in _decided(recipe)}

    def keep(path: tuple[str, ...]) -> bool:
        return path not in decided and not any(path[: len(prefix)] == prefix for prefix in NOT_RESULTS)

    part: dict[str, Any] = {}
    for path, value in _leaves(config):
        if keep(path):
            node = part
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = value
    return part


def fingerprint_part(recipe) -> dict[str, Any]:
    """What the train stage's fingerprint adds for the DeepSpeed JSON: `results_part` of the
    resolved config (reads the file; `RecipeError` if it cannot)."""
    return results_part(resolve(recipe), recipe)


def enable_activation_checkpointing(model) -> None:
    """Hugging Face activation (gradient) checkpointing on every decoder layer: activations are
    recomputed in the backward pass. The KV cache is off (it is useless in training and
    incompatible with recomputation)."""
    model.config.use_cache = False
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x's name
    if enable is not None:
        enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


__all__ = [
    "JOB_DEFAULTS", "NOT_RESULTS", "OWNED_BLOCKS", "ZERO3_ONLY", "check_deepspeed_config", "config_path", "enable_activation_checkpointing",
    "engine_config", "fingerprint_part", "recipe_config", "resolve", "results_part",
]
