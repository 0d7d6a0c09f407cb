"""The trained reference is never trained on repeats silently: its repeated share is reported, and
past `reevaluation.reference_max_repeat` it is refused before any training (a real reference run
of the test recipe on the session's store: its split packed and placed, nothing trained). The
shuffled reference trains on the cpt split in another order than the run, and the recipe refuses
one that would share the run's order."""

from __future__ import annotations

import dataclasses

import pytest

from tasks.reevaluate import reevaluate_fingerprint
from tasks.reference import REFERENCE, ReferenceSummary, TrainedReferenceSummary, check_repeats, reference_recipe
from trecflow.recipe import RecipeError, load_recipe, parse_recipe
from trecflow.stage import StageResult, Target

from ..conftest import CONFIGS, QUIET


def test_the_repeat_limit_refuses_past_its_share_in_one_line():
    check_repeats(0, 384, 0.25)
    check_repeats(96, 384, 0.25)  # exactly at the limit: accepted
    with pytest.raises(RecipeError) as refused:
        check_repeats(12_684, 19_200, 0.25)
    message = str(refused.value)
    assert message.startswith("reevaluation.reference_max_repeat: the trained reference would repeat 12,684 of its 19,200 sequence slots (66%, limit 25%)")
    assert "\n" not in message and "corpus.splits.reference" in message
    check_repeats(12_684, 19_200, 1.0)  # a user who accepts repeats says so


def test_the_limit_is_a_share_and_changes_no_fingerprint():
    recipe = load_recipe(CONFIGS / "test.yaml")
    assert recipe.reevaluation.reference_max_repeat == 0.25
    with pytest.raises(RecipeError, match="reevaluation.reference_max_repeat"):
        parse_recipe({**recipe.model_dump(mode="json"), "reevaluation": {"reference_max_repeat": 1.5}})
    looser = parse_recipe({**recipe.model_dump(mode="json"), "reevaluation": {**recipe.section("reevaluation")["reevaluation"], "reference_max_repeat": 0.9}})
    assert reevaluate_fingerprint(recipe, "t", "p", "q", "r", "e") == reevaluate_fingerprint(looser, "t", "p", "q", "r", "e")


def test_a_reference_stored_before_the_repeats_were_recorded_still_reads():
    stored = {"kind": "trained", "model_uri": "/m", "train_fingerprint": "f", "final_loss": 3.0}
    summary = ReferenceSummary.from_json(stored)
    assert isinstance(summary, TrainedReferenceSummary) and summary.repeated_share is None
    assert REFERENCE.rows(summary) == [("reference", "trained: /m")]
    full = dataclasses.replace(summary, slots=384, repeated_sequences=96, repeated_share=0.25)
    assert REFERENCE.rows(full)[1] == ("repeated", "96 of 384 sequence slots (25.0%)")
    assert ReferenceSummary.from_json(full.as_json()) == full


@pytest.mark.slow
def test_a_reference_that_would_repeat_too_much_is_refused_before_it_trains(trainable):
    from tasks.train import base_result
    from trecflow.runner import run_stage

    store = trainable["store"]
    # 24x the test recipe's steps: the reference split (~3,600 sequences) cannot fill 9,216 slots without repeats
    data = trainable["recipe"].model_dump(mode="json")
    recipe = parse_recipe({**data, "data": {**data["data"], "tokens": 24 * data["data"]["tokens"]},
                           "reevaluation": {**data["reevaluation"], "reference": "trained"}})
    trained_before = set(store.fs.ls(f"{store.root}/train", detail=False)) if store.fs.exists(f"{store.root}/train") else set()
    upstream = {"score": trainable["score"], "tokenizer": trainable["tokenizer"], "base": base_result(trainable["base"])}
    with pytest.raises(RecipeError, match=r"reference_max_repeat: the trained reference would repeat [0-9,]+ of its 9,216 sequence slots"):
        run_stage(REFERENCE, Target(recipe, "uniform"), store, upstream, **QUIET)
    after = set(store.fs.ls(f"{store.root}/train", detail=False)) if store.fs.exists(f"{store.root}/train") else set()
    assert after == trained_before  # nothing trained


def test_a_shuffled_reference_trains_on_the_cpt_split_at_its_own_seed_and_never_at_the_runs():
    from trecflow.store import Store

    recipe = load_recipe(CONFIGS / "test.yaml", [], ["reevaluation.reference=shuffled", "reevaluation.reference_seed=77"])
    derived = reference_recipe(recipe)
    assert (derived.curriculum.seed, derived.training.seed, list(derived.curriculum.variants)) == (77, 77, ["uniform"])
    assert recipe.curriculum.seed == 0  # the run's own order is untouched
    # its own fingerprint, not the trained reference's
    upstream = {stage: StageResult(stage, f"{stage}-fp", f"/store/{stage}", {}, True) for stage in ("score", "tokenizer", "base")}
    trained = load_recipe(CONFIGS / "test.yaml", [], ["reevaluation.reference=trained"])
    store = Store("/nonexistent-store")
    fingerprints = {REFERENCE.fingerprint(Target(r), upstream, store) for r in (recipe, trained)}
    assert len(fingerprints) == 2
    # the reference seed reaches stage 5 only through the reference's fingerprint
    other = load_recipe(CONFIGS / "test.yaml", [], ["reevaluation.reference=shuffled", "reevaluation.reference_seed=78"])
    assert reevaluate_fingerprint(recipe, "t", "p", "q", "r", "e") == reevaluate_fingerprint(other, "t", "p", "q", "r", "e")
    assert REFERENCE.fingerprint(Target(other), upstream, store) not in fingerprints
    # the run's own order would make the correction subtract the TREC: refused in one line
    data = recipe.model_dump(mode="json")
    own_order = {**data, "curriculum": {**data["curriculum"], "seed": 77}}
    variant_order = {**data, "curriculum": {**data["curriculum"], "variants": {"mine": {"strategy": "uniform", "params": {"seed": 77}}}}}
    for edited, owner in ((own_order, "curriculum.seed"), (variant_order, "curriculum.variants.mine.params.seed")):
        with pytest.raises(RecipeError) as refused:
            parse_recipe(edited)
        assert f"reevaluation.reference_seed: 77 is also {owner}" in str(refused.value) and "\n" not in str(refused.value)


@pytest.mark.slow
def test_a_shuffled_reference_trains_once_on_the_runs_packed_sequences_in_its_own_order(trainable):
    from tasks.train import base_result
    from trecflow.runner import run_stage

    store = trainable["store"]
    recipe = load_recipe(CONFIGS / "test.yaml", [], ["reevaluation.reference=shuffled", "reevaluation.reference_seed=5"])
    upstream = {"score": trainable["score"], "tokenizer": trainable["tokenizer"], "base": base_result(trainable["base"])}
    result = run_stage(REFERENCE, Target(recipe, "uniform"), store, upstream, **QUIET)
    summary = result.summary
    packed = trainable["pack"]
    assert (summary.kind, summary.split, summary.split_sequences) == ("shuffled", "cpt", packed.summary.sequences)
    assert summary.slots == recipe.steps * recipe.sequences_per_step and summary.unique_sequences == summary.slots - summary.repeated_sequences
    # trained on the run's own packed sequences (the same pack output), placed at the reference seed
    trained = store.output("train", summary.train_fingerprint).manifest()
    place = store.output("place", trained["inputs"]["place"]).manifest()
    assert place["inputs"]["pack"] == packed.fingerprint and place["inputs"]["seed"] == "5"
    assert trained["inputs"]["place"] != trainable["place"].fingerprint  # not the run's own index
    assert "model/model.safetensors" in trained["files"] and summary.model_uri.endswith(f"train/{summary.train_fingerprint}/model")
    assert ("trained on", f"{summary.unique_sequences:,} of the cpt split's {packed.summary.sequences:,} sequences") in REFERENCE.rows(summary)
