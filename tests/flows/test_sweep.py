"""`trecflow sweep`: the grid's recipes (each point's tau and T exactly), bad grids refused in one
line before any work. The points themselves are `cpt_pipeline` runs, tested elsewhere; no test runs
a whole sweep."""

from __future__ import annotations

import pytest

from flows.sweep import Sweep, SweepPoint, load_sweep, parse_point, point_recipe
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


def test_seed_per_point_gives_every_point_and_the_held_out_one_its_own_seed_and_otherwise_the_recipes():
    held = SweepPoint(recipe_path=STUDY, tau=0.3, steps=300)
    shared = load_sweep(Sweep(recipe_path=STUDY, taus=[0.2, 0.5], steps=[200, 400], held_out=held))[1]
    own = load_sweep(Sweep(recipe_path=STUDY, taus=[0.2, 0.5], steps=[200, 400], held_out=held, seed_per_point=True))[1]
    seeds = []
    for plain, seeded in zip(shared, own):
        recipe = point_recipe(seeded)
        assert recipe.curriculum.seed == recipe.training.seed and (seeded.tau, seeded.steps) == (plain.tau, plain.steps)
        assert recipe.steps == seeded.steps and recipe.optimizer.weight_decay == point_recipe(plain).optimizer.weight_decay
        seeds.append(recipe.curriculum.seed)
    assert seeds == [0, 1, 2, 3, 4] and own[-1].set[-1] == "trec.m=calibrated"
    assert {point_recipe(point).curriculum.seed for point in shared} == {load_recipe(STUDY).curriculum.seed}


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


def test_the_sweep_text_shows_each_point_with_its_seed_the_law_and_the_held_out_point():
    from flows.sweep import sweep_text

    law = {"C": 2.375, "mu1": 1.58, "mu2": 0.051, "runs": ["a", "b", "c", "d", "e", "f"], "r2_log": 0.985, "rms_log_error": 0.028, "note": ""}
    result = {"recipe": "study", "schedule": "linear", "points": [
        {"tau": 0.4, "steps": 300, "seed": 0, "m_fit": 0.93, "r_p_fit": 0.879504, "r_p": 0.8039},
        {"tau": 0.4, "steps": 400, "seed": 1, "m_fit": 1.58, "r_p_fit": 0.9547, "r_p": 0.9525}],
        "law": {"fitted": True, "laws": {"linear": law}},
        "held_out": {"tau": 0.5, "steps": 350, "seed": 2, "calibrated_m": 1.254, "r_p_calibrated": 0.8888, "best_m": 1.17, "r_p_best": 0.8898,
                     "configured_m": 1.75, "r_p_configured": 0.8551}}
    lines = sweep_text(result).splitlines()
    assert lines[2].split() == ["tau", "T", "seed", "m*", "r_p(m*)", "r_p(m)"]
    assert lines[3].split() == ["0.4", "300", "0", "0.93", "0.880", "0.804"] and lines[4].split() == ["0.4", "400", "1", "1.58", "0.955", "0.953"]
    assert "law linear: m* = 2.375 * TPP^1.58 * tau^0.051 over 6 runs; R^2 (log) 0.985" in "\n".join(lines)
    assert "0.889" in lines[-1] and "1.254" in lines[-1] and "0.855" in lines[-1]
