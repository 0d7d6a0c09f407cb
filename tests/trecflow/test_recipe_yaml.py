"""Recipe overlays and --set edits (trecflow.recipe_yaml): merged in order, validated like any recipe."""

from __future__ import annotations

import pytest

from trecflow.recipe import parse_recipe
from trecflow.recipe_yaml import RecipeError, apply_set, compose, merge, read_file

from ..conftest import CONFIGS


def test_merge_recurses_into_mappings_replaces_the_rest_and_null_removes():
    base = {"base": {"tiny": {"hidden": 64}, "pretrain": {"tokens": 1}}, "betas": [0.9, 0.95], "name": "a"}
    merged = merge(base, {"base": {"tiny": None, "pretrain": None, "path": "/m"}, "betas": [0.8], "name": "b"})
    assert merged == {"base": {"path": "/m"}, "betas": [0.8], "name": "b"}
    assert base["base"]["tiny"] == {"hidden": 64}  # the input is not changed


def test_set_reads_its_value_as_yaml_and_creates_sections():
    data = {"training": {"workers": 128}}
    assert apply_set(data, "training.workers=2") == {"training": {"workers": 2}}
    assert apply_set(data, "optimizer.betas=[0.9, 0.99]")["optimizer"] == {"betas": [0.9, 0.99]}
    assert apply_set(data, "training.use_gpu=false")["training"]["use_gpu"] is False
    assert apply_set(data, "training.workers=null") == {"training": {}}
    assert apply_set(data, "data.tokens=9.0e11")["data"]["tokens"] == 9.0e11


@pytest.mark.parametrize("expression, message", [
    ("training.workers", "--set training.workers: expected KEY.PATH=VALUE"),
    ("training..workers=2", "expected KEY.PATH=VALUE"),
    ("training.workers.count=2", "--set training.workers.count=2: training.workers is a int, not a section"),
    ("training.workers=[1", "--set training.workers=[1: the value is not valid YAML"),
])
def test_bad_set_is_one_line_naming_the_argument(expression, message):
    with pytest.raises(RecipeError) as error:
        apply_set({"training": {"workers": 128}}, expression)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_smoke_overlay_shrinks_the_paper_recipe_and_keeps_its_structure(monkeypatch):
    monkeypatch.setenv("TRECFLOW_BUCKET", "bucket")
    paper = read_file(CONFIGS / "cpt-3.9b-900b.yaml")
    smoke = parse_recipe(compose(paper, [CONFIGS / "overlays" / "smoke.yaml"], ["training.checkpoint_every=5"]))
    full = parse_recipe(paper)
    assert (full.steps, full.training.workers, full.training.use_gpu) == (214_576, 128, True)
    assert (smoke.steps, smoke.training.workers, smoke.training.use_gpu, smoke.training.checkpoint_every) == (40, 2, False, 5)
    assert smoke.base.path == full.base.path and smoke.tokenizer.from_base == full.tokenizer.from_base
    assert [source.path for source in smoke.corpus.sources] == [source.path for source in full.corpus.sources]
    assert list(smoke.curriculum.variants) == list(full.curriculum.variants)


def test_overlay_problems_name_the_file(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: {workers: [\n")
    with pytest.raises(RecipeError, match=r"list.yaml: an overlay must be a mapping"):
        compose({"name": "x"}, [listed])
    with pytest.raises(RecipeError, match=r"broken.yaml: line 2 invalid YAML"):
        compose({"name": "x"}, [broken])
    with pytest.raises(RecipeError, match=r"missing.yaml: cannot read overlay"):
        compose({"name": "x"}, [tmp_path / "missing.yaml"])
