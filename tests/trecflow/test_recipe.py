"""The recipe model: the shipped configs load, numbers load as numbers, and bad recipes are
refused with one line naming the field, exit code 2, and nothing written."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from trecflow.recipe import RecipeError, load_recipe, parse_recipe, read_yaml

from ..conftest import CONFIGS

BASE = read_yaml((CONFIGS / "test.yaml").read_text())


def test_shipped_configs_load():
    cpt = load_recipe(CONFIGS / "cpt-3.9b-900b.yaml")
    assert cpt.model.params == 3_900_000_000  # written 3.9e9: plain PyYAML would read a string
    assert isinstance(cpt.optimizer.peak_lr, float) and cpt.optimizer.peak_lr == 3.0e-4
    assert cpt.steps == 900_000_000_000 // 4_194_304 == 214_576
    assert cpt.tokens_unused == 900_000_000_000 - 214_576 * 4_194_304
    assert cpt.sequences_per_step == 1024
    demo = load_recipe(CONFIGS / "demo.yaml")
    assert demo.steps == 300 and demo.name == "demo"
    test = load_recipe(CONFIGS / "test.yaml")
    assert 24 <= test.steps <= 100  # "a few dozen steps" keeps the shared session fixture cheap


def test_name_defaults_to_file_stem(tmp_path):
    data = {key: value for key, value in BASE.items() if key != "name"}
    path = tmp_path / "my-recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_recipe(path).name == "my-recipe"


def test_scientific_notation_without_sign_loads_as_number(tmp_path):
    path = tmp_path / "r.yaml"
    text = (CONFIGS / "test.yaml").read_text().replace("peak_lr: 2.0e-3", "peak_lr: 2e-3").replace(
        "tokens: 24576", "tokens: 2.4576e4"
    )
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.optimizer.peak_lr == 0.002
    assert recipe.data.tokens == 24576 and isinstance(recipe.data.tokens, int)


def test_every_strategy_is_a_variant_and_declared_variants_win():
    data = copy.deepcopy(BASE)
    data["curriculum"]["variants"] = {"late": {"strategy": "window", "params": {"window": [0.8, 0.9]}}}
    curriculum = parse_recipe(data).curriculum
    assert curriculum.variant("uniform").strategy == "uniform"
    assert curriculum.variant("late").params == {"window": [0.8, 0.9]}
    with pytest.raises(RecipeError, match="curriculum.variants: unknown variant 'nope'"):
        curriculum.variant("nope")


def test_keys_a_kind_does_not_use_are_ignored():
    data = copy.deepcopy(BASE)
    data["schedule"].update({"drop_at": 0.5, "cooldown_shape": "1-sqrt", "timescale": 10})
    assert parse_recipe(data).schedule.kind == "linear"


def _set(path: str, value):
    def mutate(data):
        *parents, leaf = path.split(".")
        node = data
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return mutate


def _delete(section: str):
    return lambda data: data.pop(section)


# (id, mutation of configs/test.yaml, text the one-line error must contain)
BAD_RECIPES = [
    ("unknown-top-level-key", _set("modle", {"params": 1}), "modle: unknown key"),
    ("unknown-section-key", _set("optimizer.lr", 0.1), "optimizer.lr: unknown key"),
    ("unknown-schedule-kind", _set("schedule.kind", "exponential"), "schedule.kind"),
    ("non-positive-params", _set("model.params", -5), "model.params"),
    ("zero-seq-len", _set("data.seq_len", 0), "data.seq_len"),
    ("params-not-a-number", _set("model.params", "big"), "model.params"),
    ("warmup-whole-run", _set("schedule.warmup", 1.0), "schedule.warmup"),
    ("batch-larger-than-data", _set("batch.tokens", 32768), "batch.tokens"),
    ("batch-not-whole-sequences", _set("batch.tokens", 500), "batch.tokens"),
    ("eta-lambda-at-least-one", _set("optimizer.weight_decay", 600.0), "optimizer.weight_decay"),
    ("zero-weight-decay", _set("optimizer.weight_decay", 0.0), "optimizer.weight_decay"),
    ("beta-one", _set("optimizer.betas", [0.9, 1.0]), "optimizer.betas"),
    ("hq-fraction-above-one", _set("curriculum.hq_fraction", 1.5), "curriculum.hq_fraction"),
    ("unknown-shortage-policy", _set("curriculum.on_shortage", "skip"), "curriculum.on_shortage"),
    ("unknown-strategy", _set("curriculum.variants", {"x": {"strategy": "random"}}), "curriculum.variants.x.strategy"),
    ("missing-section", _delete("optimizer"), "optimizer: required key is missing"),
    ("negative-floor", _set("schedule.final_lr_ratio", -0.1), "schedule.final_lr_ratio"),
    ("unknown-cooldown-shape", _set("schedule.cooldown_shape", "cubic"), "schedule.cooldown_shape"),
    (
        "wsd-warmup-plus-cooldown",
        lambda d: d["schedule"].update({"kind": "wsd", "warmup": 0.5, "cooldown": 0.6}),
        "schedule.cooldown",
    ),
    ("negative-trec-m", _set("trec.m", -1.0), "trec.m"),
    (
        "variant-schedule-warmup-plus-cooldown",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "schedule": {"kind": "wsd", "warmup": 0.5, "cooldown": 0.6}}}),
        "curriculum.variants.x.schedule.cooldown: warmup (24) + cooldown (29) steps exceed 48 steps",
    ),
    (
        "variant-schedule-unknown-key",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "schedule": {"kind": "constant", "floor": 0.3}}}),
        "curriculum.variants.x.schedule.floor: unknown key",
    ),
    (
        "averaging-unknown-kind",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "median", "checkpoints": 2, "every": 1}}}),
        "curriculum.variants.x.averaging.kind",
    ),
    (
        "averaging-no-checkpoints",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "sma", "checkpoints": 0, "every": 1}}}),
        "curriculum.variants.x.averaging.checkpoints: Input should be greater than or equal to 1",
    ),
    (
        "averaging-every-zero",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "sma", "checkpoints": 2, "every": 0}}}),
        "curriculum.variants.x.averaging.every: Input should be greater than or equal to 1",
    ),
    (
        "averaging-longer-than-the-run",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "sma", "checkpoints": 5, "every": 12}}}),
        "curriculum.variants.x.averaging.every: 5 checkpoints 12 steps apart span 48 steps; (checkpoints - 1) x every must be less than the 48 steps",
    ),
    (
        "averaging-alpha-on-sma",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "sma", "checkpoints": 2, "every": 1, "alpha": 0.2}}}),
        "curriculum.variants.x.averaging.alpha: only ema takes alpha",
    ),
    (
        "averaging-ema-without-alpha",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "ema", "checkpoints": 2, "every": 1}}}),
        "curriculum.variants.x.averaging.alpha: ema needs alpha in (0, 1]",
    ),
    (
        "averaging-alpha-zero",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "ema", "checkpoints": 2, "every": 1, "alpha": 0.0}}}),
        "curriculum.variants.x.averaging.alpha: must be in (0, 1], got 0",
    ),
    (
        "averaging-alpha-above-one",
        _set("curriculum.variants", {"x": {"strategy": "uniform", "averaging": {"kind": "ema", "checkpoints": 2, "every": 1, "alpha": 1.5}}}),
        "curriculum.variants.x.averaging.alpha: must be in (0, 1], got 1.5",
    ),
]


def _write(tmp_path: Path, mutate) -> Path:
    data = copy.deepcopy(BASE)
    mutate(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_one_line_error(result, needle: str):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize(("mutate", "needle"), [case[1:] for case in BAD_RECIPES], ids=[c[0] for c in BAD_RECIPES])
@pytest.mark.parametrize("command", ["predict", "run"])
def test_bad_recipe_one_line_error_exit_2_nothing_written(tmp_path, monkeypatch, mutate, needle, command):
    store = tmp_path / "store"
    monkeypatch.setenv("TRECFLOW_STORE", str(store))
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, mutate)
    before = sorted(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(app, [command, str(path)])
    _assert_one_line_error(result, needle)
    assert not store.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  params: [1, 2\n")
    result = CliRunner().invoke(app, ["predict", str(path)])
    _assert_one_line_error(result, "line")


def test_missing_file_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "absent.yaml")])
    _assert_one_line_error(result, "absent.yaml: cannot read recipe")


def test_run_refuses_unknown_stage_and_variant_before_work(tmp_path, monkeypatch):
    store = tmp_path / "store"
    monkeypatch.setenv("TRECFLOW_STORE", str(store))
    config = str(CONFIGS / "test.yaml")
    _assert_one_line_error(CliRunner().invoke(app, ["run", config, "--force", "bogus"]), "force: unknown stage 'bogus'")
    _assert_one_line_error(CliRunner().invoke(app, ["run", config, "--variant", "nope"]), "unknown variant 'nope'")
    assert not store.exists()


# A recipe that only predicts: one 4,096-token sequence per step, no training section (as
# bench/bench_predict.py's). The training section's defaults (2 workers) must not bind it.
ONE_SEQUENCE = {
    "name": "one-sequence",
    "model": {"params": 3.9e9},
    "data": {"tokens": 1000 * 4096, "seq_len": 4096},
    "batch": {"tokens": 4096},
    "optimizer": {"peak_lr": 3e-4, "weight_decay": 0.1},
    "schedule": {"kind": "linear", "warmup": 0.01},
}


def test_one_sequence_batch_without_training_section_validates_and_predicts(tmp_path):
    from training.trec import predict

    recipe = parse_recipe(copy.deepcopy(ONE_SEQUENCE))
    assert recipe.sequences_per_step == 1 and recipe.steps == 1000 and not recipe.trains
    assert predict(recipe).trec.size == 1000
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(ONE_SEQUENCE))
    result = CliRunner().invoke(app, ["predict", str(path), "--json"])
    assert result.exit_code == 0, result.output
    assert '"steps": 1000' in result.stdout
    # a stage that trains still checks the batch against the (default) workers, in one line
    with pytest.raises(RecipeError, match=r"^one-sequence: training.workers: the batch of 1 sequences does not divide across 2 workers"):
        recipe.micro_batch


@pytest.mark.parametrize(
    "extra",
    [{"training": {"workers": 2}}, {"base": {"path": "/models/base"}}],
    ids=["explicit-training", "base-without-training"],
)
def test_one_sequence_batch_with_a_section_that_trains_is_refused(tmp_path, extra):
    data = {**copy.deepcopy(ONE_SEQUENCE), **extra}
    with pytest.raises(RecipeError, match="training.workers: the batch of 1 sequences does not divide across 2 workers"):
        parse_recipe(data)
    path = tmp_path / "one.yaml"
    path.write_text(yaml.safe_dump(data))
    _assert_one_line_error(CliRunner().invoke(app, ["predict", str(path)]), "training.workers: the batch of 1 sequences")
