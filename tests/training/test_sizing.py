"""`trecflow plan`: the sizing arithmetic for known sizes, the JSON contract and clear errors."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from flows.cli import app
from trecflow.recipe import parse_recipe
from training.sizing import SizingError, plan, zero_memory_gb

from ..conftest import CONFIGS

# 1e9 params, 1000 steps of 1,048,576 tokens (256 x 4096), linear decay.
RECIPE = parse_recipe(
    {
        "name": "known",
        "model": {"params": 1e9},
        "data": {"tokens": 1000 * 1048576 + 5, "seq_len": 4096},
        "batch": {"tokens": 1048576},
        "optimizer": {"peak_lr": 1e-3, "weight_decay": 0.1},
        "schedule": {"kind": "linear"},
        "curriculum": {"hq_fraction": 0.1},
    }
)


def test_memory_per_zero_stage_for_known_sizes():
    memory = zero_memory_gb(1e9, 8)
    assert memory["zero1"] == pytest.approx(2 + 2 + 12 / 8)  # GB: bf16 params + grads, sharded fp32 states
    assert memory["zero2"] == pytest.approx(2 + 14 / 8)
    assert memory["zero3"] == pytest.approx(16 / 8)
    paper = zero_memory_gb(3.9e9, 128)
    assert paper == pytest.approx({"zero1": 15.965625, "zero2": 8.2265625, "zero3": 0.4875})


def test_flops_hours_checkpoints_and_reevaluation():
    sized = plan(RECIPE, gpus=8, gpu_type="H100", mfu=0.5, reeval_stride=10, max_lost_hours=1.0)
    assert sized["steps"] == 1000 and sized["tokens_trained"] == 1000 * 1048576  # 5 unused tokens
    assert sized["tokens_per_gpu_per_step"] == 131072 and sized["sequences_per_gpu_per_step"] == 32
    flops = 6 * 1e9 * 1000 * 1048576
    assert sized["flops"] == pytest.approx(flops)
    assert sized["gpu_hours"] == pytest.approx(flops / (989e12 * 0.5) / 3600)
    assert sized["wall_clock_hours"] == pytest.approx(sized["gpu_hours"] / 8)
    step_seconds = 6 * 1e9 * 1048576 / (8 * 989e12 * 0.5)
    assert sized["step_seconds"] == pytest.approx(step_seconds)
    assert sized["checkpoint_every_steps"] == math.floor(3600 / step_seconds)
    assert sized["checkpoint_gb"] == pytest.approx(14.0)  # bf16 weights + fp32 master, m, v
    assert sized["reeval_steps"] == 100
    assert sized["reeval_gpu_hours"] == pytest.approx(2 * 1e9 * 100 * 1048576 / (989e12 * 0.5) / 3600)
    start, end = sized["hq_window_steps"]
    assert end - start == 100 and sized["hq_window_tokens"] == [start * 1048576, end * 1048576]
    assert sized["store_gb"]["checkpoints"] == pytest.approx(3 * 14.0)
    assert sized["store_gb"]["tokens"] == pytest.approx(1000 * 1048576 * 4 / 1e9)


def test_gpu_type_changes_peak():
    h100 = plan(RECIPE, gpus=8, gpu_type="H100")
    a100 = plan(RECIPE, gpus=8, gpu_type="A100")
    assert a100["gpu_hours"] / h100["gpu_hours"] == pytest.approx(989 / 312)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"gpus": 3}, "--gpus: 256 sequences per step do not split evenly over 3 GPUs"),
        ({"gpus": 8, "gpu_type": "TPU"}, "--gpu-type: unknown 'TPU'"),
        ({"gpus": 8, "mfu": 1.5}, "--mfu"),
        ({"gpus": 8, "reeval_stride": 0}, "--reeval-stride"),
    ],
)
def test_bad_options_name_the_option(options, message):
    with pytest.raises(SizingError, match=message.replace("(", r"\(")):
        plan(RECIPE, **options)


def test_cli_json_for_the_paper_scale_job():
    result = CliRunner().invoke(app, ["plan", str(CONFIGS / "cpt-3.9b-900b.yaml"), "--gpus", "128", "--mfu", "0.4", "--json"])
    assert result.exit_code == 0, result.output
    sized = json.loads(result.stdout)
    for key in (
        "steps", "tokens_per_step", "tau", "tpp", "tau_opt", "weight_decay_opt", "valley_fraction",
        "hq_window_steps", "flops", "gpu_hours", "wall_clock_hours", "memory_per_gpu_gb", "checkpoint_gb",
        "reeval_gpu_hours",
    ):
        assert key in sized
    assert sized["steps"] == 214_576 and sized["tokens_per_step"] == 4_194_304
    assert sized["flops"] == pytest.approx(6 * 3.9e9 * 214_576 * 4_194_304)
    assert sized["gpu_hours"] == pytest.approx(sized["flops"] / (989e12 * 0.4) / 3600)
    assert sized["checkpoint_gb"] == pytest.approx(14 * 3.9)


def test_cli_bad_gpus_is_exit_2():
    result = CliRunner().invoke(app, ["plan", str(CONFIGS / "cpt-3.9b-900b.yaml"), "--gpus", "96"])
    assert result.exit_code == 2
    assert result.stderr.strip() == "error: --gpus: 1024 sequences per step do not split evenly over 96 GPUs"


def test_averaging_costs_for_the_paper_scale_job_with_an_ema_variant():
    """3.9B on 128 GPUs: the running sum is one fp32 copy of the parameters on rank 0's host, and
    each checkpoint of the averaged span carries it; variants without averaging cost nothing."""
    from trecflow.recipe import load_recipe

    data = load_recipe(CONFIGS / "cpt-3.9b-900b.yaml").model_dump(mode="json")
    data["curriculum"]["variants"]["uniform-ema"] = {"strategy": "uniform", "schedule": {"kind": "constant", "warmup": 0.01},
                                                     "averaging": {"kind": "ema", "checkpoints": 6, "every": 2000, "alpha": 0.2}}
    sized = plan(parse_recipe(data), 128, keep_checkpoints=3)
    [cost] = sized["averaging"]
    assert cost["variant"] == "uniform-ema" and cost["first_snapshot_step"] == 214_575 - 5 * 2000
    assert cost["host_memory_gb"] == cost["per_checkpoint_gb"] == pytest.approx(4 * 3.9e9 / 1e9)
    every = sized["checkpoint_every_steps"]
    in_span = [n for n in range(every, 214_577, every) if n - 1 >= cost["first_snapshot_step"]] + ([214_576] if 214_576 % every else [])
    assert cost["checkpoints_carrying_it"] == len(in_span) and cost["written_gb"] == pytest.approx(len(in_span) * cost["per_checkpoint_gb"])
    assert cost["stored_gb"] == pytest.approx(min(len(in_span), 3) * cost["per_checkpoint_gb"] + 2 * 3.9e9 / 1e9)
    assert plan(RECIPE, 8)["averaging"] == []
