"""Schedule advice: each rule speaks exactly when its finding applies, with its source."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from flows.cli import app
from training.schedule_advice import DECAY_WASTES_DATA, OWN_STUDY, POWER_LINES, STRAIGHT_TO_ZERO, WSD_SCALING, schedule_advice
from trecflow.recipe import load_recipe

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def topics(recipe) -> dict[str, str]:
    return {item.topic: item.source for item in schedule_advice(recipe)}


def with_schedule(recipe, **schedule):
    return recipe.model_copy(update={"schedule": recipe.schedule.model_copy(update=schedule)})


def test_each_rule_applies_only_where_its_finding_does():
    demo = load_recipe(CONFIGS / "demo.yaml")  # step decay to 0.1x, an `end` variant, TPP 0.29
    found = topics(demo)
    assert found == {"decay to zero": STRAIGHT_TO_ZERO, "ascending curricula": DECAY_WASTES_DATA, "batch size": POWER_LINES}
    assert "below the compute-optimal" in schedule_advice(demo)[0].text

    to_zero = with_schedule(demo, kind="linear", final_lr_ratio=0.0)
    assert "decay to zero" not in topics(to_zero)
    assert "ascending curricula" in topics(to_zero)  # the `end` variant's data meets an LR of 0
    moderate = with_schedule(demo, kind="linear", final_lr_ratio=0.33)
    assert set(topics(moderate)) == {"decay to zero", "batch size"}  # a moderate floor: no curriculum advice

    wsd = with_schedule(demo, kind="wsd", cooldown=0.05, cooldown_shape="linear")
    assert {"WSD cooldown", "WSD cooldown shape"} <= set(topics(wsd))
    assert topics(wsd)["WSD cooldown"] == WSD_SCALING
    good_wsd = with_schedule(demo, kind="wsd", cooldown=0.2, cooldown_shape="1-sqrt")
    assert not {"WSD cooldown", "WSD cooldown shape"} & set(topics(good_wsd))


def test_late_variants_are_judged_on_their_own_schedule_and_averaging_span():
    overlay = str(CONFIGS / "overlays" / "lr-decay.yaml")
    recipe = load_recipe(CONFIGS / "study.yaml", [overlay])  # linear to 0; remedies with their own schedules
    advice = {item.topic: item for item in schedule_advice(recipe)}
    assert "variant(s) ascending (0 x peak) put" in advice["ascending curricula"].text  # the remedies end at 0.33 and 1.0
    assert "averaging span" not in advice  # snapshots 369..399, inside the HQ stretch 360..399

    variants = {name: section.model_copy(update={"averaging": section.averaging.model_copy(update={"every": 16})})
                if section.averaging else section for name, section in recipe.curriculum.variants.items()}
    reaching_back = recipe.model_copy(update={"curriculum": recipe.curriculum.model_copy(update={"variants": variants})})
    spans = [item for item in schedule_advice(reaching_back) if item.topic == "averaging span"]
    assert [item.text.split(" averages")[0] for item in spans] == ["variant ascending-constant-ema", "variant ascending-moderate-ema"]
    assert "from step 319 on, but its best data starts at step 360" in spans[0].text and "well below 40 steps" in spans[0].text
    assert all(item.source == OWN_STUDY for item in spans)  # trec_valley-constant-ema places its data in the valley: not late


def test_predict_and_plan_print_the_advice_as_advice_not_errors():
    runner = CliRunner()
    predicted = runner.invoke(app, ["predict", str(CONFIGS / "demo.yaml"), "--json"])
    assert predicted.exit_code == 0, predicted.output
    advice = json.loads(predicted.stdout)["advice"]
    assert [item["topic"] for item in advice] == ["decay to zero", "ascending curricula", "batch size"]
    assert all(item["source"] and "arXiv" in item["source"] for item in advice)
    planned = runner.invoke(app, ["plan", str(CONFIGS / "demo.yaml"), "--gpus", "8"])
    assert planned.exit_code == 0, planned.output
    assert "schedule advice" in planned.stdout and "arXiv 2511.18903" in planned.stdout
