"""`training.study_stats`: a seed study's statistics on constructed inputs with known answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from training.study_stats import FEW_SEEDS, NO_SPREAD, paired_difference, spread, study_stats, verdict_text


def test_spread_is_the_mean_and_the_sample_sd_over_the_seeds_with_a_value():
    result = spread("val_loss_hq", {0: 2.0, 1: 4.0, 2: 6.0, 3: None, 4: float("nan")})
    assert (result.seeds, result.values, result.n) == ([0, 1, 2], [2.0, 4.0, 6.0], 3)
    assert result.mean == 4.0 and result.sd == pytest.approx(2.0)  # ddof=1: sqrt((4 + 0 + 4) / 2)
    assert spread("m", {0: 5.0}).sd is None and spread("m", {0: 5.0}).mean == 5.0
    assert spread("m", {}).mean is None and spread("m", {0: None}).n == 0
    assert spread("m", {0: 0.1, 1: 0.1, 2: 0.1}).sd == 0.0  # exactly 0, not a rounding residue


def test_a_consistent_offset_with_small_spread_passes_and_an_offset_within_noise_does_not():
    base = {0: 3.00, 1: 3.10, 2: 2.95, 3: 3.05}
    shifted = {seed: value - 0.02 + jitter for (seed, value), jitter in zip(base.items(), (0.001, -0.001, 0.0005, -0.0005))}
    better = paired_difference("shifted", "base", "val_loss_hq", shifted, base)
    assert better.n == 4 and better.mean == pytest.approx(-0.02)
    assert better.se == pytest.approx(better.sd / 2) and better.se < 0.001
    assert better.verdict is True and verdict_text(better.verdict) == "yes" and better.note == ""

    noisy = {0: 3.05, 1: 3.02, 2: 2.98, 3: 3.05}  # differences +0.05, -0.08, +0.03, 0.0: mean 0, large SD
    noise = paired_difference("noisy", "base", "val_loss_hq", noisy, base)
    assert noise.mean == pytest.approx(0.0, abs=1e-12) and noise.differences == pytest.approx([0.05, -0.08, 0.03, 0.0])
    assert noise.sd == pytest.approx(0.0571547606649408) and noise.se == pytest.approx(0.0571547606649408 / 2)
    assert noise.verdict is False and verdict_text(noise.verdict) == "no"


def test_pairing_matters_large_seed_spread_but_consistent_paired_differences():
    # the seed moves both variants alike by up to 0.3; b is 0.01 better at every seed (+- 0.001)
    seed_effect = {0: 0.0, 1: 0.3, 2: -0.2, 3: 0.1, 4: -0.25}
    a = {seed: 5.0 + effect for seed, effect in seed_effect.items()}
    b = {seed: 5.0 + effect - 0.01 + 0.001 * (-1) ** seed for seed, effect in seed_effect.items()}
    stats = study_stats({"a": {s: {"val_loss_general": v} for s, v in a.items()}, "b": {s: {"val_loss_general": v} for s, v in b.items()}},
                        ["val_loss_general"])
    spread_a, spread_b = stats.variant("a").metrics["val_loss_general"], stats.variant("b").metrics["val_loss_general"]
    assert spread_a.sd > 0.2 and spread_b.sd > 0.2
    pair = stats.pair("a", "b", "val_loss_general")
    assert pair.mean == pytest.approx(0.0098)  # d_s = 0.009, 0.011, 0.009, 0.011, 0.009
    # unpaired, the difference of the means is lost in the seed spread ...
    unpaired_se = math.sqrt(spread_a.sd ** 2 / 5 + spread_b.sd ** 2 / 5)
    assert pair.se_unpaired == pytest.approx(unpaired_se) and abs(pair.mean) < 3 * unpaired_se
    assert abs(spread_a.mean - spread_b.mean) == pytest.approx(pair.mean)
    # ... paired, every seed agrees: the verdict is yes
    assert pair.se < 0.001 and pair.verdict is True


def test_fewer_than_two_paired_seeds_and_zero_se_are_explicit():
    one = paired_difference("a", "b", "r_p", {0: 0.9, 1: 0.8}, {0: 0.7, 1: None})
    assert (one.n, one.seeds, one.mean, one.sd, one.se, one.verdict, one.note) == (1, [0], pytest.approx(0.2), None, None, None, FEW_SEEDS)
    assert verdict_text(one.verdict) == "n/a"
    none = paired_difference("a", "b", "r_p", {0: 0.9}, {1: 0.7})
    assert (none.n, none.mean, none.verdict) == (0, None, None)

    constant = paired_difference("a", "b", "m", {0: 1.5, 1: 2.5}, {0: 1.25, 1: 2.25})  # exact in binary: every d_s is 0.25
    assert (constant.se, constant.mean, constant.verdict, constant.note) == (0.0, 0.25, True, NO_SPREAD)
    same = paired_difference("a", "b", "m", {0: 1.5, 1: 2.5}, {0: 1.5, 1: 2.5})
    assert (same.se, same.mean, same.verdict, same.note) == (0.0, 0.0, False, NO_SPREAD)


def test_study_stats_cover_every_variant_and_pair_in_order_and_serialize_to_json():
    runs = {"uniform": {0: {"x": 1.0, "y": None}, 1: {"x": 2.0, "y": 0.5}},
            "end": {0: {"x": 1.5, "y": 0.4}, 1: {"x": 2.5, "y": 0.6}},
            "trec_valley": {1: {"x": 2.0, "y": 0.7}}}  # seed 0 not run yet
    stats = study_stats(runs, ["x", "y"])
    assert [entry.variant for entry in stats.variants] == ["uniform", "end", "trec_valley"]
    assert [(pair.a, pair.b, pair.metric) for pair in stats.pairs] == [
        ("uniform", "end", "x"), ("uniform", "end", "y"), ("uniform", "trec_valley", "x"), ("uniform", "trec_valley", "y"),
        ("end", "trec_valley", "x"), ("end", "trec_valley", "y")]
    assert stats.variant("uniform").metrics["y"].n == 1 and stats.pair("uniform", "end", "y").n == 1
    assert stats.pair("end", "trec_valley", "x").seeds == [1] and stats.pair("end", "trec_valley", "x").verdict is None
    view = json.loads(json.dumps(stats.as_json(), allow_nan=False))
    assert view["metrics"] == ["x", "y"] and view["variants"][0]["metrics"]["x"]["sd"] == pytest.approx(math.sqrt(0.5))
    assert view["pairs"][0]["verdict"] is True and view["pairs"][0]["note"] == NO_SPREAD  # every d_s is -0.5


def test_averaging_variants_get_their_averaged_minus_raw_difference_and_no_pairs_on_the_raw_metrics():
    runs = {"uniform": {0: {"r_p": 0.90, "r_p_final_model": None}, 1: {"r_p": 0.92, "r_p_final_model": None}},
            "ema": {0: {"r_p": 0.80, "r_p_final_model": 0.50}, 1: {"r_p": 0.84, "r_p_final_model": 0.53}, 2: {"r_p": 0.82, "r_p_final_model": 0.60}}}
    stats = study_stats(runs, ["r_p", "r_p_final_model"])
    assert [(pair.a, pair.b, pair.metric) for pair in stats.pairs] == [("uniform", "ema", "r_p")]  # no pair on the raw metric
    assert [(entry.a, entry.b, entry.metric) for entry in stats.averaging] == [("ema", "ema final model", "r_p")]  # uniform has no raw values
    ema = stats.averaging[0]
    assert ema.differences == pytest.approx([0.30, 0.31, 0.22]) and ema.mean == pytest.approx(0.83 / 3)
    assert ema.se == pytest.approx(np.std([0.30, 0.31, 0.22], ddof=1) / math.sqrt(3)) and ema.verdict is True  # 0.277 > 3 x 0.028
    noisy = study_stats({"ema": {0: {"x": 1.0, "x_final_model": 1.1}, 1: {"x": 1.0, "x_final_model": 0.9}}}, ["x", "x_final_model"])
    assert noisy.averaging[0].mean == pytest.approx(0.0) and noisy.averaging[0].verdict is False
    assert stats.variant("ema").metrics["r_p_final_model"].mean == pytest.approx(1.63 / 3)
    assert json.loads(json.dumps(stats.as_json()))["averaging"][0]["b"] == "ema final model"
