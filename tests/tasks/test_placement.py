"""Curriculum strategies on synthetic catalogs (pure numpy): where each strategy puts the hq
sequences, how often every sequence is used, determinism, and the sample-index reader on a local
folder and on the S3 protocol server."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.pack import group_shards, sequence_scores
from tasks.place import write_index
from tasks.placement import HQ, LQ, MID, PlacementError, PlanRequest, filler_counts, make_plan
from trecflow.recipe import RecipeError, parse_recipe, read_yaml
from trecflow.store import Store
from training.sample_index import IndexMismatchError, SampleIndex, batch_hash
from training.trec import best_window

from ..conftest import BUCKET, CONFIGS

STEPS, BATCH = 200, 32


def catalog(hq: int, mid: int, lq: int, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Tiers in a shuffled order (ids of a tier are not contiguous) and scores by tier."""
    rng = np.random.default_rng(seed)
    tiers = np.concatenate([np.full(hq, HQ), np.full(mid, MID), np.full(lq, LQ)]).astype(np.int8)
    rng.shuffle(tiers)
    base = np.array([0.8, 0.5, 0.2])[tiers]
    scores = (base + rng.uniform(-0.1, 0.1, tiers.size)).astype(np.float32)
    return tiers, scores


def request(strategy: str, **overrides) -> PlanRequest:
    values = {"steps": STEPS, "batch": BATCH, "strategy": strategy, "hq_fraction": 0.1, "seed": 0} | overrides
    return PlanRequest(**values)


def valley_curve(steps: int = STEPS) -> np.ndarray:
    """A predicted-TREC-like curve with its valley at 60% of training."""
    x = np.arange(1, steps + 1) / steps
    return 1.0 - np.exp(-((x - 0.6) ** 2) / 0.02)


TIERS_PLENTY = catalog(1000, 4000, 3000)


def hq_steps(plan) -> np.ndarray:
    return np.flatnonzero(plan.tiers == HQ) // plan.batch


def test_uniform_spreads_hq_evenly_over_every_segment_and_step():
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request("uniform"), tiers, scores)
    share = plan.hq_share_per_step()
    for segment in np.array_split(share, 10):
        assert abs(segment.mean() - 0.1) <= 0.02
    per_step = plan.composition()[:, HQ]
    assert set(per_step.tolist()) <= {3, 4}  # floor / ceil of 0.1 * 32
    assert plan.window_steps is None and plan.hq_in_window() is None
    # each of 4 data-parallel ranks gets a share of the hq sequences of a step, not all of them
    by_rank = (plan.tiers.reshape(STEPS, 4, BATCH // 4) == HQ).sum(axis=(0, 2)) / plan.hq_slots
    assert by_rank.min() >= 0.2 and by_rank.max() <= 0.3


@pytest.mark.parametrize(
    "strategy, params, window",
    [
        ("end", {}, (0.9, 1.0)),
        ("start", {}, (0.0, 0.1)),
        ("window", {"window": (0.3, 0.5)}, (0.3, 0.5)),
    ],
)
def test_end_start_and_window_put_every_hq_sequence_inside(strategy, params, window):
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request(strategy, **params), tiers, scores)
    steps = hq_steps(plan)
    assert steps.min() >= round(window[0] * STEPS) and steps.max() < round(window[1] * STEPS)
    assert plan.window_fraction() == pytest.approx(list(window))
    assert plan.hq_in_window() == 1.0
    assert plan.hq_slots == round(0.1 * STEPS * BATCH)


def test_window_spreads_hq_when_wider_than_w_and_refuses_a_window_too_small():
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request("window", window=(0.2, 0.6)), tiers, scores)
    share = plan.hq_share_per_step()[40:120]
    assert share.min() >= 0.2 and share.max() <= 0.3 and plan.hq_share_per_step()[:40].max() == 0
    with pytest.raises(PlacementError, match=r"window \[0.5, 0.55\] holds steps 100..109 = 320 sequences, fewer than the 640 hq"):
        make_plan(request("window", window=(0.5, 0.55)), tiers, scores)


def test_trec_valley_uses_the_best_window_of_the_predicted_curve():
    tiers, scores = TIERS_PLENTY
    trec = valley_curve()
    plan = make_plan(request("trec_valley"), tiers, scores, trec)
    start, end = best_window(trec, plan.hq_slots / (STEPS * BATCH))
    assert plan.window_steps == (start, end)
    assert start / STEPS < 0.6 < end / STEPS
    assert plan.hq_in_window() >= 0.95
    # a w that is not a whole number of steps still lands inside, rounding at the edge only
    odd = make_plan(request("trec_valley", hq_fraction=0.137), tiers, scores, trec)
    assert odd.hq_in_window() >= 0.95 and odd.hq_slots == round(0.137 * STEPS * BATCH)
    with pytest.raises(PlacementError, match="predicted curve"):
        make_plan(request("trec_valley"), tiers, scores, trec[:-1])


def bumpy_curve(steps: int = STEPS) -> np.ndarray:
    """A valley curve with seeded bumps (no two steps share a weight) that never reaches 0 or 1:
    trec_weighted must min-max normalize it itself."""
    noise = np.random.default_rng(11).uniform(-0.03, 0.03, steps)
    return 0.2 + 0.7 * valley_curve(steps) + noise


def water_filled_counts(trec: np.ndarray, k: float, total: int, cap: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The spec, written plainly: weights (1 - u)^k with u the min-max normalized curve; cap every
    step at ``cap`` and hand the excess to the uncapped steps in proportion to their weights until
    nothing exceeds it; then cumulative rounding. Returns (counts, targets, rounds of capping)."""
    u = (trec - trec.min()) / (trec.max() - trec.min())
    weights = (1.0 - u) ** k
    capped = np.zeros(trec.size, dtype=bool)
    rounds = 0
    while True:
        targets = np.where(capped, float(cap), 0.0)
        free = ~capped
        targets[free] = (total - cap * capped.sum()) * weights[free] / weights[free].sum()
        over = targets > cap
        if not over.any():
            break
        capped |= over
        rounds += 1
    running = np.floor(np.cumsum(targets) + 0.5).astype(np.int64)
    return np.diff(running, prepend=0), targets, rounds


def hq_per_step(plan) -> np.ndarray:
    return plan.composition()[:, HQ]


def test_trec_weighted_with_k_0_is_uniform():
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request("trec_weighted", k=0.0), tiers, scores, bumpy_curve())
    per_step = hq_per_step(plan)
    assert per_step.sum() == plan.hq_slots == round(0.1 * STEPS * BATCH)
    assert set(per_step.tolist()) <= {3, 4}  # floor / ceil of 0.1 * 32, like uniform
    uniform = hq_per_step(make_plan(request("uniform"), tiers, scores))
    assert np.array_equal(np.sort(per_step), np.sort(uniform))
    for segment in np.array_split(plan.hq_share_per_step(), 10):
        assert abs(segment.mean() - 0.1) <= 0.02
    # each of 4 data-parallel ranks gets a share of the hq sequences of a step, not all of them
    by_rank = (plan.tiers.reshape(STEPS, 4, BATCH // 4) == HQ).sum(axis=(0, 2)) / plan.hq_slots
    assert by_rank.min() >= 0.2 and by_rank.max() <= 0.3


@pytest.mark.parametrize(
    "k, hq_fraction, cap_binds", [(1.0, 0.1, False), (4.0, 0.1, False), (4.0, 0.137, True), (1.5, 0.3, True), (4.0, 0.6, True)]
)
def test_trec_weighted_counts_are_the_rounded_water_filled_targets(k, hq_fraction, cap_binds):
    tiers, scores = catalog(5000, 4000, 3000)
    trec = bumpy_curve()
    plan = make_plan(request("trec_weighted", k=k, hq_fraction=hq_fraction), tiers, scores, trec)
    per_step = hq_per_step(plan)
    expected, targets, rounds = water_filled_counts(trec, k, plan.hq_slots, BATCH)
    assert np.array_equal(per_step, expected)
    assert per_step.sum() == plan.hq_slots == round(hq_fraction * STEPS * BATCH)
    assert per_step.max() <= BATCH and per_step.min() >= 0 and np.all(np.abs(per_step - targets) < 1)
    # capped steps hold a whole batch of hq and their excess went to the others (rounds of capping)
    assert (rounds > 0) == cap_binds and (np.count_nonzero(per_step == BATCH) > 0) == cap_binds
    # below the cap the counts follow (1 - u)^k
    u = (trec - trec.min()) / (trec.max() - trec.min())
    free = targets < BATCH
    assert np.corrcoef(per_step[free], (1 - u[free]) ** k)[0, 1] > 0.99
    # the same request gives the same plan; another seed other sequences in the same hq slots
    again = make_plan(request("trec_weighted", k=k, hq_fraction=hq_fraction), tiers, scores, trec)
    assert np.array_equal(plan.ids, again.ids) and np.array_equal(plan.tiers, again.tiers)
    other = make_plan(request("trec_weighted", k=k, hq_fraction=hq_fraction, seed=1), tiers, scores, trec)
    assert np.array_equal(other.tiers == HQ, plan.tiers == HQ) and not np.array_equal(other.ids, plan.ids)
    # every other slot is filled from mid and lq as for the other strategies
    assert np.array_equal(tiers[plan.ids], plan.tiers)
    need = filler_counts(request("trec_weighted", hq_fraction=hq_fraction), {"mid": 4000, "lq": 3000})
    assert plan.counts["mid"]["slots"] == np.count_nonzero(plan.tiers == MID) == need["mid"]
    assert plan.counts["lq"]["slots"] == np.count_nonzero(plan.tiers == LQ) == need["lq"]
    _, used = np.unique(plan.ids, return_counts=True)
    assert used.max() == 1 and plan.repeated_sequences == 0


def test_trec_weighted_never_exceeds_a_batch_even_when_all_weight_is_in_few_steps():
    tiers, scores = catalog(5000, 4000, 3000)
    spike = np.ones(STEPS)
    spike[150] = 0.0  # one step of weight 1, all others of weight 0 for any k > 0
    plan = make_plan(request("trec_weighted", k=2.0, hq_fraction=0.6), tiers, scores, spike)
    per_step = hq_per_step(plan)
    assert per_step[150] == BATCH and per_step.max() == BATCH and per_step.sum() == plan.hq_slots
    assert per_step.min() >= round(0.6 * STEPS * BATCH - BATCH) // (STEPS - 1)  # the rest spread evenly


def test_integer_counts_keep_the_cap_and_the_total_through_float_noise():
    from tasks.placement import integer_counts

    # running sums 0.4999999, 32.5000001, 33: plain cumulative rounding would give 0, 33, 0
    targets = np.array([0.4999999, 32.0000002, 0.4999999])
    counts = integer_counts(targets, 33, 32)
    assert counts.tolist() == [1, 32, 0] and np.all(np.abs(counts - targets) < 1)
    even = integer_counts(np.full(10, 2.5), 25, 3)  # ties: the fractional parts alternate, not bunched
    assert even.tolist() == [3, 2, 3, 2, 3, 2, 3, 2, 3, 2]


@pytest.mark.parametrize("hq_fraction", [0.1, 0.137])
def test_trec_weighted_with_a_large_k_approaches_the_trec_valley_window(hq_fraction):
    tiers, scores = TIERS_PLENTY
    trec = valley_curve()
    valley = make_plan(request("trec_valley", hq_fraction=hq_fraction), tiers, scores, trec)
    steep = make_plan(request("trec_weighted", k=200.0, hq_fraction=hq_fraction), tiers, scores, trec)
    assert steep.window_steps == valley.window_steps  # the window it reports: trec_valley's
    assert steep.hq_in_window() >= 0.95
    mild = make_plan(request("trec_weighted", k=4.0, hq_fraction=hq_fraction), tiers, scores, trec)
    assert mild.window_steps == valley.window_steps and mild.hq_in_window() < steep.hq_in_window()


def test_trec_weighted_needs_the_whole_finite_curve_and_a_valid_k():
    tiers, scores = TIERS_PLENTY
    trec = valley_curve()
    with pytest.raises(PlacementError, match="trec_weighted needs the predicted curve of all 200 steps"):
        make_plan(request("trec_weighted"), tiers, scores, trec[:-1])
    with pytest.raises(PlacementError, match="trec_weighted needs a finite predicted curve"):
        make_plan(request("trec_weighted"), tiers, scores, np.where(np.arange(STEPS) == 5, np.nan, trec))
    for k in (-1.0, float("nan"), float("inf")):
        with pytest.raises(PlacementError, match="trec_weighted: k must be a finite number >= 0"):
            make_plan(request("trec_weighted", k=k), tiers, scores, trec)
    flat = make_plan(request("trec_weighted", k=4.0), tiers, scores, np.full(STEPS, 0.5))  # nothing to lean to: uniform
    assert set(hq_per_step(flat).tolist()) <= {3, 4}


@pytest.mark.parametrize("k", [-1, -0.5, float("nan"), float("inf"), "4", True, None, [4]])
def test_recipe_refuses_a_bad_k_in_one_line_naming_params_k(k):
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"leaning": {"strategy": "trec_weighted", "params": {"k": k}}}
    with pytest.raises(RecipeError) as error:
        parse_recipe(data)
    message = str(error.value)
    assert "\n" not in message and "curriculum.variants.leaning: params.k: must be a finite number >= 0" in message


def test_recipe_takes_k_only_for_trec_weighted():
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"leaning": {"strategy": "trec_weighted", "params": {"k": 0}}, "steep": {"strategy": "trec_weighted", "params": {"k": 12.5}}}
    curriculum = parse_recipe(data).curriculum
    assert curriculum.variant("leaning").params == {"k": 0} and curriculum.variant("steep").params == {"k": 12.5}
    assert curriculum.variant("trec_weighted").strategy == "trec_weighted"  # every strategy is a variant
    data["curriculum"]["variants"] = {"valley": {"strategy": "trec_valley", "params": {"k": 4}}}
    with pytest.raises(RecipeError, match=r"curriculum.variants.valley: params: trec_valley does not take \['k'\]"):
        parse_recipe(data)


def test_ascending_orders_by_score_and_breaks_ties_with_the_seed():
    tiers, _ = TIERS_PLENTY
    ties = np.round(np.array([0.8, 0.5, 0.2])[tiers], 1).astype(np.float32)  # three distinct scores only
    first = make_plan(request("ascending", seed=1), tiers, ties)
    second = make_plan(request("ascending", seed=2), tiers, ties)
    for plan in (first, second):
        placed = ties[plan.ids]
        assert np.all(np.diff(placed) >= 0)
        assert plan.hq_slots == round(0.1 * STEPS * BATCH)
    assert np.array_equal(ties[first.ids], ties[second.ids])
    assert not np.array_equal(first.ids, second.ids)  # same scores, other tie order


def test_every_sequence_is_used_once_and_the_rest_counted_as_unplaced():
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request("uniform"), tiers, scores)
    ids, counts = np.unique(plan.ids, return_counts=True)
    assert counts.max() == 1 and ids.size == STEPS * BATCH
    assert np.array_equal(tiers[plan.ids], plan.tiers)  # each slot's tier is its sequence's tier
    for code, tier in enumerate(("hq", "mid", "lq")):
        entry = plan.counts[tier]
        assert entry["supply"] == np.count_nonzero(tiers == code)
        assert entry["slots"] == np.count_nonzero(plan.tiers == code)
        assert entry["repeated"] == 0 and entry["unplaced"] == entry["supply"] - entry["slots"]
    # the filler follows the supply: mid : lq = 4000 : 3000
    assert plan.counts["mid"]["slots"] == round((STEPS * BATCH - plan.hq_slots) * 4 / 7)
    assert plan.repeated_sequences == 0


def test_short_hq_is_repeated_evenly_and_counted_or_fails():
    tiers, scores = catalog(100, 4000, 3000)
    plan = make_plan(request("end"), tiers, scores)  # 640 hq slots, 100 hq sequences
    hq_ids = plan.ids[plan.tiers == HQ]
    _, counts = np.unique(hq_ids, return_counts=True)
    assert counts.size == 100 and set(counts.tolist()) <= {6, 7}
    assert plan.counts["hq"] == {"supply": 100, "slots": 640, "repeated": 540, "unplaced": 0}
    assert plan.repeated_sequences == 540
    with pytest.raises(PlacementError, match=r"needs 640 hq sequences but the packed data has 100 \(curriculum.on_shortage: fail"):
        make_plan(request("end", on_shortage="fail"), tiers, scores)
    with pytest.raises(PlacementError, match="needs 640 hq sequences but the packed data has none"):
        make_plan(request("end"), *catalog(0, 4000, 3000))


def test_tier_weights_set_the_filler_mix():
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request("uniform", tier_weights={"mid": 1.0, "lq": 3.0}), tiers, scores)
    rest = STEPS * BATCH - plan.hq_slots
    assert plan.counts["mid"]["slots"] == round(rest / 4) and plan.counts["lq"]["slots"] == rest - round(rest / 4)
    only_mid = make_plan(request("uniform", tier_weights={"mid": 1.0, "lq": 0.0}), tiers, scores)
    assert only_mid.counts["lq"]["slots"] == 0


def test_same_seed_same_index_bytes_other_seed_other_order(tmp_path):
    tiers, scores = TIERS_PLENTY
    files = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        output = Store(str(tmp_path / name)).output("place", "fp")
        write_index(make_plan(request("uniform", seed=seed), tiers, scores), output, progress=lambda line: None)
        files.append({path.relative_to(tmp_path / name): path.read_bytes() for path in (tmp_path / name).rglob("*") if path.is_file()})
    assert files[0] == files[1]
    assert files[0].keys() == files[2].keys() and files[0] != files[2]


def test_sequence_scores_are_token_weighted_means():
    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 50, 40)
    doc_scores = rng.uniform(0, 1, 40)
    per_token = np.repeat(doc_scores, lengths)
    seq_len = 16
    count = per_token.size // seq_len
    expected = per_token[: count * seq_len].reshape(count, seq_len).mean(axis=1)
    assert np.allclose(sequence_scores(lengths, doc_scores, seq_len, count), expected, atol=1e-6)


def test_group_shards_bounds_group_size_and_keeps_order():
    files = [("a", 40), ("b", 40), ("c", 30), ("d", 200), ("e", 10)]
    assert group_shards(files, 100) == [["a", "b"], ["c"], ["d"], ["e"]]
    assert group_shards(files, 1000) == [["a", "b", "c", "d", "e"]]


def commit_index(store: Store, plan, inputs: dict[str, str]) -> None:
    output = store.output("place", "fp")
    write_index(plan, output, progress=lambda line: None)
    output.commit(inputs=inputs)


def test_reader_serves_steps_and_ranks_and_refuses_other_inputs(tmp_path, s3_endpoint):
    tiers, scores = TIERS_PLENTY
    plan = make_plan(request("uniform"), tiers, scores)
    inputs = {"recipe": "r1", "tokenizer": "t1", "score": "s1", "pack": "p1", "strategy": "u", "seed": "0"}
    local = Store(str(tmp_path / "store"))
    remote = Store(f"s3://{BUCKET}/reader-test", s3_endpoint)
    for store in (local, remote):
        commit_index(store, plan, inputs)
    by_step = plan.ids.reshape(STEPS, BATCH)
    for store in (local, remote):
        index = SampleIndex(store, "fp", expected=inputs)
        for step in (0, 1, 117, STEPS - 1):
            assert np.array_equal(index.batch(step), by_step[step])
            assert np.array_equal(np.concatenate([index.rank_batch(step, rank, 4) for rank in range(4)]), by_step[step])
            assert index.composition(step)["hq"] == int(np.count_nonzero(plan.tiers[step * BATCH : (step + 1) * BATCH] == HQ))
        with pytest.raises(ValueError, match="32 sequences per step do not divide across 3 workers"):
            index.rank_batch(0, 0, 3)
        with pytest.raises(IndexError, match="step 200 is outside 0..199"):
            index.batch(STEPS)
    assert batch_hash(by_step[5][::-1]) == batch_hash(by_step[5]) != batch_hash(by_step[6])
    with pytest.raises(IndexMismatchError, match=r"built for other inputs: tokenizer 't1' \(expected 't2'\)"):
        SampleIndex(local, "fp", expected={**inputs, "tokenizer": "t2"})
    with pytest.raises(IndexMismatchError, match=r"recipe 'r1' \(expected 'r9'\); score 's1' \(expected 's9'\)"):
        SampleIndex(remote, "fp", expected={**inputs, "recipe": "r9", "score": "s9"})


def test_ascending_order_is_a_stable_sort_by_score():
    from tasks.placement import ascending_order

    rng = np.random.default_rng(0)
    scores = rng.choice(np.array([0.0, 0.25, 0.5, 1.0], dtype=np.float32), 10_000)  # heavy ties
    scores[::7] = rng.uniform(0, 1, scores[::7].size)
    assert np.array_equal(ascending_order(scores), np.argsort(scores, kind="stable"))
