"""`trecflow sweep`: the grid's recipes (each point's tau and T exactly), bad grids refused in one
line before any work. The points themselves are `cpt_pipeline` runs, tested elsewhere; no test runs
a whole sweep."""

from __future__ import annotations

import pytest

from flows.sweep import Sweep, SweepPoint, load_sweep, parse_point
from trecflow.recipe import RecipeError, load_recipe
from training.trec import predict

from ..conftest import CONFIGS

STUDY = str(CONFIGS / "study.yaml")


def test_every_point_has_exactly_its_tau_and_steps_and_the_held_out_predicts_with_the_law():
    sweep = Sweep(recipe_path=STUDY, set=["schedule.kind=linear"], taus=[0.2, 0.5], steps=[200, 400],
                  held_out=SweepPoint(recipe_path=STUDY, tau=0.3, steps=300))
    recipe, points = load_sweep(sweep)
    assert [(point.tau, point.steps) for point in points] == [(0.2, 200), (0.5, 200), (0.2, 400), (0.5, 400), (0.3, 300)]
    for point in points:
        edits = [item for item in point.set if item != "trec.m=calibrated"]
        assert edits[0] == "schedule.kind=linear"  # the user's edits first
        point_recipe = load_recipe(point.recipe_path, point.overlays, edits)
        prediction = predict(point_recipe)
        assert point_recipe.steps == point.steps and prediction.tau == pytest.approx(point.tau, rel=1e-9)
        assert point_recipe.schedule.kind == "linear" and point_recipe.batch.tokens == recipe.batch.tokens
    assert points[-1].set[-1] == "trec.m=calibrated" and all("trec.m=calibrated" not in point.set for point in points[:-1])


@pytest.mark.parametrize(("taus", "steps", "held_out", "message"), [
    ([], [200], None, "--tau: a sweep needs at least one value"),
    ([0.2, 0.2], [200], None, "--tau: values must be positive and distinct, got [0.2, 0.2]"),
    ([0.2], [0], None, "--steps: values must be positive and distinct, got [0]"),
    ([0.2, 0.5], [200], (0.5, 200), "--held-out: tau 0.5 and T 200 are both in the grid; a held-out point must not be"),
], ids=["no-tau", "repeated-tau", "zero-steps", "held-out-in-grid"])
def test_a_bad_grid_is_one_line_before_any_work(taus, steps, held_out, message):
    point = None if held_out is None else SweepPoint(recipe_path=STUDY, tau=held_out[0], steps=held_out[1])
    with pytest.raises(RecipeError) as raised:
        load_sweep(Sweep(recipe_path=STUDY, taus=taus, steps=steps, held_out=point))
    assert str(raised.value) == message


def test_a_held_out_point_is_tau_colon_steps():
    assert parse_point("0.4:300") == (0.4, 300)
    with pytest.raises(RecipeError, match=r"^--held-out: '0.4' is not TAU:STEPS \(e.g. 0.4:300\)$"):
        parse_point("0.4")
