"""The runner and the graph on their own: forcing, ``until``, stages with nothing to compute."""

from __future__ import annotations

import json

import pytest

from tasks.base_model import BASE
from tasks.graph import GRAPH, STAGES
from trecflow.recipe import RecipeError, parse_recipe, read_yaml
from trecflow.runner import NOTE, REUSED, Graph, Runner
from trecflow.stage import Stage, Target
from trecflow.store import Store

from ..conftest import CONFIGS


def test_the_graph_lists_each_stage_after_its_inputs_and_refuses_otherwise():
    seen = set()
    for stage in STAGES:
        assert set(stage.inputs) <= seen, stage.name
        seen.add(stage.name)

    class Early(Stage):
        name = "early"
        inputs = ("later",)

    with pytest.raises(ValueError, match="early: inputs \\['later'\\] are not declared before it"):
        Graph([Early()])


def test_until_runs_only_what_a_stage_needs():
    assert GRAPH.ancestors("score") == ["ingest", "score"]
    assert GRAPH.ancestors("place") == ["ingest", "score", "predict", "tokenizer", "pack", "place"]
    assert GRAPH.ancestors("train", given=["score", "tokenizer", "pack", "base"]) == ["predict", "place", "train"]
    with pytest.raises(RecipeError, match="until: unknown stage 'trian'"):
        GRAPH.ancestors("trian")
    with pytest.raises(RecipeError, match="force: unknown stage 'plcae'"):
        GRAPH.forced_closure(["plcae"])


def test_forcing_a_base_given_as_a_path_is_a_no_op_with_a_note(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 1024}))
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["base"] = {"path": str(model)}
    recipe = parse_recipe(data)
    events = []
    runner = Runner(GRAPH, Store(str(tmp_path / "store")), forced=["base"], reporters=[events.append])
    result = runner.materialize(BASE, Target(recipe), {})
    assert result.uri == str(model) and result.reused and result.summary.model_uri == str(model)
    assert [event.kind for event in events] == [NOTE, REUSED]
    assert "nothing to compute" in events[0].message and "--force base changes nothing" in events[0].message
    assert not (tmp_path / "store").exists()  # nothing written
