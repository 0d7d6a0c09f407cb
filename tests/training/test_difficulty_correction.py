"""The fitted difficulty correction on constructed runs whose content noise and TREC are known:
the noise goes, the TREC stays, and no step is corrected with a line fitted on itself."""

from __future__ import annotations

import numpy as np
import pytest

from training.difficulty_correction import StepMoments, correct
from training.trec import ema_coefficients, predicted_trec
from training.trec_measure import agreement, smooth

STEPS, SEQUENCES = 400, 32


def constructed_run(seed: int = 0, slope: float = 0.6):
    """Per-sequence losses of a final model and a reference: a shared difficulty per sequence
    (the reference's losses spread 1/slope times wider), a known TREC of depth ~0.1 nats added to
    the final model's losses by step, and a little noise of the final model's own."""
    rng = np.random.default_rng(seed)
    lrs = np.full(STEPS, 2e-3)
    lrs[int(0.7 * STEPS):] *= 0.1
    coefficients, _ = ema_coefficients(lrs, weight_decay=4.0)
    trec = predicted_trec(coefficients, p=0.5, m=1.5)
    trec = 0.1 * (trec - trec.min()) / (trec.max() - trec.min())
    difficulty = rng.normal(0.0, 0.6, size=(STEPS, SEQUENCES))
    reference = 5.0 + difficulty / slope
    final = 3.0 + difficulty + trec[:, None] + rng.normal(0.0, 0.05, size=(STEPS, SEQUENCES))
    return final, reference, trec, coefficients


def test_the_fitted_beta_removes_the_content_and_keeps_the_trec():
    final, reference, trec, coefficients = constructed_run()
    fitted = correct(StepMoments.of(final, reference), "fit")
    fixed = correct(StepMoments.of(final, reference), 1.0)
    assert fitted.fitted and len(fitted.betas) == 2 and fitted.betas == pytest.approx((0.6, 0.6), abs=0.01)
    steps = np.arange(STEPS)
    noise = {name: np.std(curve - smooth(steps, curve, STEPS, 0.03)) for name, curve in (("fit", fitted.corrected), ("one", fixed.corrected))}
    assert noise["fit"] < 0.015 < 0.04 < noise["one"]  # beta = 1 leaves 0.4 of the difficulty in
    # the TREC survives at its own depth: the corrected curve is the TREC plus a constant, plus noise
    slope = np.polyfit(trec, fitted.corrected, 1)[0]
    assert slope == pytest.approx(1.0, abs=0.1)
    assert agreement(steps, smooth(steps, fitted.corrected, STEPS, 0.03), coefficients, 0.5, 1.5).r_p > 0.97
    assert agreement(steps, smooth(steps, fixed.corrected, STEPS, 0.03), coefficients, 0.5, 1.5).r_p < 0.95


def test_each_half_of_the_steps_is_corrected_with_the_line_of_the_other_half():
    final, reference, _, _ = constructed_run(seed=1)
    fitted = correct(StepMoments.of(final, reference), "fit")
    for fold in (0, 1):
        slope, intercept = np.polyfit(reference[1 - fold :: 2].ravel(), final[1 - fold :: 2].ravel(), 1)
        assert fitted.betas[fold] == pytest.approx(slope, abs=1e-9)
        rows = slice(fold, None, 2)
        assert np.allclose(fitted.corrected[rows], final[rows].mean(axis=1) - (intercept + slope * reference[rows].mean(axis=1)), atol=1e-9)
    # a step's own losses do not enter its line: changing one even step moves only the odd steps' line
    changed = final.copy()
    changed[10] += np.linspace(-1, 1, SEQUENCES) * (reference[10] - reference[10].mean())
    again = correct(StepMoments.of(changed, reference), "fit")
    assert again.betas[0] == fitted.betas[0] and again.betas[1] != fitted.betas[1]


def test_a_fixed_beta_is_loss_minus_beta_times_reference_and_degenerate_fits_fall_back_to_one():
    final, reference, _, _ = constructed_run(seed=2)
    moments = StepMoments.of(final, reference)
    fixed = correct(moments, 0.6)
    assert not fixed.fitted and fixed.betas == (0.6,) and np.array_equal(fixed.corrected, moments.loss - 0.6 * moments.reference)
    assert moments.cross == pytest.approx((final * reference).mean(axis=1)) and moments.reference_sq == pytest.approx((reference**2).mean(axis=1))
    few = correct(StepMoments.of(final[:3], reference[:3]), "fit")
    assert not few.fitted and few.betas == (1.0,)
    flat = np.full_like(reference, 5.0)
    assert correct(StepMoments.of(final, flat), "fit").betas == (1.0,)


def test_a_trimmed_aggregate_ignores_a_heavy_tail_that_the_mean_follows():
    from training.difficulty_correction import correct_robust, trimmed_by_beta

    final, reference, trec, coefficients = constructed_run(seed=3, slope=1.0)
    rng = np.random.default_rng(4)
    tail = rng.random(final.shape) < 0.05  # sequences the final model knows far better than the reference
    final = final - tail * rng.exponential(1.5, size=final.shape)
    steps = np.arange(STEPS)
    mean = correct(StepMoments.of(final, reference), "fit")
    robust = correct_robust(steps, trimmed_by_beta(final, reference), STEPS, 0.03)
    assert robust.fitted and robust.betas == pytest.approx((1.0, 1.0), abs=0.1)
    noise = {name: np.std(curve - smooth(steps, curve, STEPS, 0.03)) for name, curve in (("mean", mean.corrected), ("robust", robust.corrected))}
    assert noise["robust"] < 0.5 * noise["mean"]
    assert np.polyfit(trec, robust.corrected, 1)[0] == pytest.approx(1.0, abs=0.15)  # the TREC keeps its depth
    r_p = agreement(steps, smooth(steps, robust.corrected, STEPS, 0.03), coefficients, 0.5, 1.5).r_p
    assert r_p > agreement(steps, smooth(steps, mean.corrected, STEPS, 0.03), coefficients, 0.5, 1.5).r_p and r_p > 0.95


def test_a_reference_that_learned_the_same_documents_in_another_order_keeps_the_trec_and_removes_their_content():
    """What ``reevaluation.reference: shuffled`` relies on. The final model knows each sequence's
    document (a content offset a model that never saw it lacks) and carries the TREC of the step it
    trained the sequence at. A disjoint reference knows the difficulty only; a reference trained on
    the same sequences in an independent order also knows the content, and its own TREC lands at
    random steps of the run; one trained in the run's own order would subtract the TREC itself."""
    from training.difficulty_correction import correct_robust, trimmed_by_beta

    final, disjoint, trec, coefficients = constructed_run(seed=5, slope=1.0)
    rng = np.random.default_rng(6)
    content = rng.normal(0.0, 0.3, size=final.shape)  # what learning the sequence's document gives
    final = final - content
    def learned(order_steps: np.ndarray) -> np.ndarray:  # the reference's loss after learning every document once
        return disjoint - content + trec[order_steps] + rng.normal(0.0, 0.05, size=final.shape)
    own_steps = np.repeat(np.arange(STEPS), SEQUENCES).reshape(STEPS, SEQUENCES)
    other_steps = rng.permutation(own_steps.ravel()).reshape(STEPS, SEQUENCES)
    steps = np.arange(STEPS)
    results = {}
    for name, reference in (("disjoint", disjoint), ("shuffled", learned(other_steps)), ("same order", learned(own_steps))):
        curve = correct_robust(steps, trimmed_by_beta(final, reference), STEPS, 0.03).corrected
        smoothed = smooth(steps, curve, STEPS, 0.03)
        results[name] = (np.std(curve - smoothed), np.polyfit(trec, curve, 1)[0], agreement(steps, smoothed, coefficients, 0.5, 1.5).r_p)
    (noise_disjoint, _, r_disjoint), (noise_shuffled, depth_shuffled, r_shuffled) = results["disjoint"], results["shuffled"]
    assert noise_shuffled < 0.5 * noise_disjoint  # the content is gone
    assert depth_shuffled == pytest.approx(1.0, abs=0.15) and r_shuffled > max(0.95, r_disjoint)  # the TREC is not
    assert abs(results["same order"][1]) < 0.2  # the run's own order: the TREC subtracted away (the recipe refuses it)
