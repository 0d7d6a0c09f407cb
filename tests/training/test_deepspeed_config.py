"""The DeepSpeed config the engine receives: the recipe's decisions merged with the JSON that
``training.deepspeed_config`` names (`training.deepspeed_config`), and ZeRO-3 against ZeRO-1.

Pure tests (no process group) check the merge: the JSON's keys reach the config, a key the recipe
decides with another value is refused with one line naming the file, the key and the recipe field,
the driver resolves the file once (workers get the dict in the `JobSpec`). The slow test trains a
tiny Llama with 2 gloo workers on the CPU with ZeRO-1 and with ZeRO-3 (and activation
checkpointing) through the same merge, and compares the per-step losses.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from tests.training import zero_workers
from trecflow.recipe import RecipeError, load_recipe, parse_recipe
from training.deepspeed_config import (
    JOB_DEFAULTS,
    check_deepspeed_config,
    enable_activation_checkpointing,
    engine_config,
    fingerprint_part,
    recipe_config,
    resolve,
    results_part,
)

ROOT = Path(__file__).resolve().parent.parent.parent
INFRA_JSONS = {stage: f"infra/deepspeed/zero{stage}.json" for stage in (1, 2, 3)}


def recipe(zero_stage: int = 1, **training):
    return zero_workers.tiny_recipe(10, zero_stage, **training)


def infra_json(stage: int) -> dict:
    return json.loads((ROOT / INFRA_JSONS[stage]).read_text())


def leaves(data: dict, prefix: tuple = ()):
    for key, value in data.items():
        if isinstance(value, dict) and value:
            yield from leaves(value, prefix + (key,))
        else:
            yield prefix + (key,), value


def at(config: dict, path: tuple):
    for key in path:
        config = config[key]
    return config


@pytest.fixture
def deepspeed_parses():
    """DeepSpeed's own ``DeepSpeedConfig`` of a config dict at a data-parallel world of 2, without
    a process group (rank 0 of 2): its batch assertion and strict ZeRO model run."""
    import deepspeed.runtime.config as ds_config

    saved = ds_config.dist.get_rank

    class DataParallel:
        def get_data_parallel_world_size(self):
            return zero_workers.WORLD

    def parse(config: dict):
        ds_config.dist.get_rank = lambda group=None: 0
        try:
            return ds_config.DeepSpeedConfig(copy.deepcopy(config), mpu=DataParallel())
        finally:
            ds_config.dist.get_rank = saved

    return parse


# ---------------------------------------------------------------------------------------------
# The merge


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_engine_config_holds_the_jsons_keys_and_the_recipes_decisions(stage, deepspeed_parses):
    r = recipe(stage)
    raw = infra_json(stage)
    config = engine_config(r, raw, INFRA_JSONS[stage])
    for path, value in leaves(raw):
        assert at(config, path) == value, path
    assert config["train_batch_size"] == r.sequences_per_step == 8
    assert config["train_micro_batch_size_per_gpu"] == 2 and config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["stage"] == stage
    assert config["bf16"] == {"enabled": False} and config["fp16"] == {"enabled": False}
    assert config["gradient_clipping"] == 1.0
    assert config["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 1e-2, "betas": [0.9, 0.95], "weight_decay": 0.1, "eps": 1e-8, "torch_adam": True},
    }
    assert "scheduler" not in config
    assert raw == infra_json(stage), "the merge must not change its input"
    parsed = deepspeed_parses(config)  # DeepSpeed accepts it: batch = micro x accumulation x world
    assert parsed.zero_optimization_stage == stage
    assert parsed.zero_config.reduce_bucket_size == raw["zero_optimization"]["reduce_bucket_size"]
    assert parsed.zero_config.overlap_comm is True and parsed.zero_config.contiguous_gradients is True
    assert parsed.optimizer_name == "adamw" and parsed.scheduler_name is None
    assert not parsed.bfloat16_config.enabled and not parsed.float16_config.enabled


def test_recipe_only_config_and_bf16():
    r = recipe(2)
    config = recipe_config(r)
    assert config == engine_config(r, None) == engine_config(r, "{}", "empty.json")
    assert {key: config[key] for key in JOB_DEFAULTS} == JOB_DEFAULTS
    assert config["zero_optimization"] == {"stage": 2}
    bf16 = r.model_copy(update={"training": r.training.model_copy(update={"precision": "bf16", "gradient_clipping": 0.0})})
    config = engine_config(bf16, infra_json(2), "zero2.json")
    assert config["bf16"] == {"enabled": True} and config["gradient_clipping"] == 0.0


def test_the_json_may_repeat_a_decided_key_with_the_same_value_and_set_the_logging_defaults():
    r = recipe(1)
    raw = {**infra_json(1), "train_batch_size": 8, "gradient_clipping": 1, "bf16": {"enabled": False},
           "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "betas": [0.9, 0.95]}}, "steps_per_print": 7}
    raw["zero_optimization"]["stage"] = 1
    config = engine_config(r, raw, "same.json")
    assert config["steps_per_print"] == 7 and config["optimizer"]["params"]["weight_decay"] == 0.1


@pytest.mark.parametrize(
    "key, value, message",
    [
        (("zero_optimization", "stage"), 3, "zero_optimization.stage is 3 but training.zero_stage is 1"),
        (("train_batch_size",), 1024, "train_batch_size is 1024 but the recipe's batch (batch.tokens / data.seq_len) is 8"),
        (("train_micro_batch_size_per_gpu",), 4, "train_micro_batch_size_per_gpu is 4 but training.micro_batch is 2"),
        (("gradient_accumulation_steps",), 1, "gradient_accumulation_steps is 1 but training.accumulation is 2"),
        (("bf16", "enabled"), True, "bf16.enabled is true but training.precision is fp32"),
        (("fp16", "enabled"), True, "fp16.enabled is true but training.precision is fp32"),
        (("gradient_clipping",), 0.5, "gradient_clipping is 0.5 but training.gradient_clipping is 1"),
        (("optimizer", "type"), "Adam", 'optimizer.type is "Adam" but the recipe\'s optimizer is AdamW'),
        (("optimizer", "params", "lr"), 3e-4, "optimizer.params.lr is 0.0003 but optimizer.peak_lr is 0.01"),
        (("optimizer", "params", "betas"), [0.9, 0.999], "optimizer.params.betas is [0.9, 0.999] but optimizer.betas is [0.9, 0.95]"),
        (("optimizer", "params", "weight_decay"), 0.0, "optimizer.params.weight_decay is 0 but optimizer.weight_decay is 0.1"),
        (("optimizer", "params", "eps"), 1e-6, "optimizer.params.eps is 1e-06 but trecflow's AdamW uses eps 1e-08"),
    ],
)
def test_a_decided_key_with_another_value_is_refused_naming_file_key_and_field(key, value, message):
    raw = infra_json(1)
    node = raw
    for part in key[:-1]:
        node = node.setdefault(part, {})
    node[key[-1]] = value
    with pytest.raises(RecipeError) as error:
        engine_config(recipe(1), raw, "infra/deepspeed/zero1.json")
    assert str(error.value) == f"infra/deepspeed/zero1.json: {message}"
    assert "\n" not in str(error.value)


def test_the_issues_example_zero3_json_with_a_zero1_recipe():
    raw = {**infra_json(3), "zero_optimization": {**infra_json(3)["zero_optimization"], "stage": 3}}
    with pytest.raises(RecipeError, match=r"^infra/deepspeed/zero3\.json: zero_optimization\.stage is 3 but training\.zero_stage is 1$"):
        engine_config(recipe(1), raw, "infra/deepspeed/zero3.json")


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"scheduler": {"type": "WarmupLR", "params": {}}}, "scheduler.type is \"WarmupLR\" but it is decided by the recipe's schedule section"),
        ({"optimizer": {"params": {"amsgrad": True}}}, "optimizer.params.amsgrad is true but it is decided by the recipe's optimizer section"),
        ({"fp16": {"enabled": False, "loss_scale": 0}}, "fp16.loss_scale is 0 but it is decided by training.precision"),
        ({"bfloat16": {"enabled": True}}, "bfloat16.enabled is true but it is decided by training.precision (written as bf16.enabled)"),
        ({"amp": {"enabled": True}}, "amp.enabled is true but it is decided by training.precision"),
        ({"optimizer": "AdamW"}, 'optimizer is "AdamW" but it is decided by the recipe\'s optimizer section'),
    ],
)
def test_blocks_the_recipe_owns_accept_nothing_it_does_not_set(extra, message):
    with pytest.raises(RecipeError) as error:
        engine_config(recipe(1), {**infra_json(1), **extra}, "x.json")
    assert str(error.value).startswith(f"x.json: {message}")


def test_zero3_settings_need_zero_stage_3():
    with pytest.raises(RecipeError, match=r"^infra/deepspeed/zero3\.json: zero_optimization\.stage3_prefetch_bucket_size is a ZeRO-3 "
                                          r"setting but training\.zero_stage is 2 "):
        engine_config(recipe(2), infra_json(3), "infra/deepspeed/zero3.json")
    with pytest.raises(RecipeError, match="offload_param is a ZeRO-3 setting"):
        engine_config(recipe(1), {"zero_optimization": {"offload_param": {"device": "cpu"}}}, "x.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"zero_optimization": {"overlap_comm": true,}}', r"^bad\.json: invalid JSON: .* \(line 1, column \d+\)$"),
        ("[1, 2]", r"^bad\.json: a DeepSpeed config must be a JSON object, got list$"),
        ('{"zero_optimization": 5}', r"^bad\.json: zero_optimization is 5 but it must be an object \(zero_optimization\.stage: "),
    ],
)
def test_invalid_json_is_one_line_naming_the_file(text, message):
    with pytest.raises(RecipeError, match=message):
        engine_config(recipe(1), text, "bad.json")


# ---------------------------------------------------------------------------------------------
# The file: resolved on the driver, against the current directory


def test_resolve_reads_the_named_file_relative_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    r = recipe(3, deepspeed_config=INFRA_JSONS[3])
    assert resolve(r) == engine_config(r, infra_json(3), INFRA_JSONS[3])
    check_deepspeed_config(r)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RecipeError) as error:
        check_deepspeed_config(r)
    assert str(error.value).startswith(f"{INFRA_JSONS[3]}: cannot read training.deepspeed_config (No such file or directory; "
                                       f"relative paths resolve against the current directory, {tmp_path})")
    (tmp_path / "mine.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": 8}))
    with pytest.raises(RecipeError, match=r"^mine\.json: train_micro_batch_size_per_gpu is 8 but training\.micro_batch is 2$"):
        check_deepspeed_config(recipe(1, deepspeed_config="mine.json"))
    check_deepspeed_config(recipe(1))  # no JSON: nothing to read


def test_job_spec_carries_the_merged_config_and_workers_never_read_the_file(tmp_path, monkeypatch):
    from training.cpt_job import JobSpec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ds.json").write_text(json.dumps(infra_json(1)))
    r = recipe(1, deepspeed_config="ds.json")
    spec = JobSpec(recipe=r.model_dump(mode="json"), store_url=str(tmp_path), endpoint_url=None, index_fingerprint="i",
                   index_inputs={}, tokenizer_fingerprint="t", output_path="o", run_fingerprint="f")
    assert spec.deepspeed == engine_config(r, infra_json(1), "ds.json")
    shipped = json.loads(json.dumps(asdict(spec)))  # what Ray sends the workers
    (tmp_path / "ds.json").unlink()
    assert JobSpec(**shipped).deepspeed == spec.deepspeed  # rebuilt on a worker without the file
    with pytest.raises(RecipeError, match="^ds.json: cannot read"):
        JobSpec(**{**shipped, "deepspeed": None})


def test_recipe_fields():
    r = recipe(1)
    assert r.training.deepspeed_config is None and r.training.activation_checkpointing is False
    data = r.model_dump(mode="json")
    data["training"]["deepspeed_config"] = ""
    with pytest.raises(RecipeError, match="training.deepspeed_config"):
        parse_recipe(data)


# ---------------------------------------------------------------------------------------------
# Fingerprint: only JSON keys that can change the trained numbers


def test_results_part_leaves_out_performance_knobs_and_recipe_decisions(monkeypatch):
    monkeypatch.chdir(ROOT)
    for stage, path in INFRA_JSONS.items():
        assert fingerprint_part(recipe(stage, deepspeed_config=path)) == {}, path
    assert fingerprint_part(recipe(1)) == {}
    r = recipe(1)
    raw = {**infra_json(1), "communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}
    raw["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    assert results_part(engine_config(r, raw, "x.json"), r) == {
        "communication_data_type": "fp32",
        "data_types": {"grad_accum_dtype": "fp32"},
        "zero_optimization": {"offload_optimizer": {"device": "cpu"}},
    }


# ---------------------------------------------------------------------------------------------
# Activation checkpointing


def test_activation_checkpointing_turns_on_the_models_checkpointing():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**zero_workers.MODEL))
    assert not model.is_activation_checkpointing and model.config.use_cache
    enable_activation_checkpointing(model)
    assert model.is_activation_checkpointing and model.config.use_cache is False
    layers = model.model.layers
    assert all(layer.gradient_checkpointing for layer in layers)


# ---------------------------------------------------------------------------------------------
# ZeRO-3 against ZeRO-1, 2 gloo workers on the CPU

STEPS = 30
TOLERANCE = 1e-4


@pytest.mark.slow
def test_zero3_trains_to_the_same_losses_as_zero1_on_cpu(tmp_path, monkeypatch):
    """Both runs go through the job's merge (`resolve`: recipe + infra JSON). ZeRO-3 also runs with
    activation checkpointing, so the comparison covers it (recomputation must not change the
    numbers). zero3.json's ``stage3_param_persistence_threshold`` (1e5 elements) would keep every
    parameter of this tiny model (at most 8,192 elements) whole on each rank; the test writes a
    copy with 0 so that ZeRO-3 really partitions every parameter."""
    monkeypatch.chdir(ROOT)
    zero1 = recipe_for(STEPS, 1, INFRA_JSONS[1], False)
    raw3 = infra_json(3)
    raw3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "zero3.json").write_text(json.dumps(raw3))
    zero3 = recipe_for(STEPS, 3, str(tmp_path / "zero3.json"), True)
    began = time.perf_counter()
    one, three = zero_workers.run([(zero1, resolve(zero1)), (zero3, resolve(zero3))], STEPS, tmp_path / "result.json")
    seconds = time.perf_counter() - began

    assert one["zero_stage"] == 1 and three["zero_stage"] == 3
    assert three["partitioned"] == three["parameters"] == 21 and one["partitioned"] == 0
    assert three["activation_checkpointing"] and three["use_cache"] is False
    assert not one["activation_checkpointing"]
    for result, raw in ((one, infra_json(1)), (three, raw3)):  # the engine received and parsed the JSON's keys
        for path, value in leaves(raw):
            assert at(result["config"], path) == value, path
        for key, value in raw["zero_optimization"].items():
            assert result["zero_config"][key] == value, key

    assert len(one["losses"]) == len(three["losses"]) == STEPS
    assert one["losses"][-1] < one["losses"][0] - 2.0, "the model must learn, or agreement proves little"
    differences = [abs(a - b) for a, b in zip(one["losses"], three["losses"])]
    print(f"\nZeRO-3 vs ZeRO-1 over {STEPS} steps: max |dloss| = {max(differences):.3g} "
          f"(loss {one['losses'][0]:.4f} -> {one['losses'][-1]:.4f}); {seconds:.1f} s "
          f"(ZeRO-1 {one['seconds']:.1f} s, ZeRO-3 {three['seconds']:.1f} s)")
    assert max(differences) < TOLERANCE, differences


def recipe_for(steps: int, stage: int, path: str, activation_checkpointing: bool):
    return zero_workers.tiny_recipe(steps, stage, path, activation_checkpointing)


def test_paper_recipe_json_resolves_from_the_project_root(monkeypatch):
    """Whatever JSON configs/cpt-3.9b-900b.yaml names merges with it (no conflict)."""
    monkeypatch.chdir(ROOT)
    paper = load_recipe(ROOT / "configs" / "cpt-3.9b-900b.yaml")
    config = resolve(paper)
    assert config["train_batch_size"] == 1024 and config["bf16"] == {"enabled": True}
