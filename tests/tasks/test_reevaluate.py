"""Stage 5 on a local Ray: the measured TREC of the test recipe's uniform run, checked against an
independent forward pass, an actor that dies mid-run, the reference-loss cache, sampling, and
bad input refused before any work."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.calibrate import read_runs
from tasks.place import run_place
from tasks.reevaluate import CURVE_FILE, PLOT_FILE, constant_mix, run_reevaluate, sampled_steps, step_sequences
from trecflow.recipe import RecipeError, parse_recipe
from training.reevaluation import FAULT_ENV
from training.sample_index import SampleIndex
from training.trec_measure import smooth

from ..conftest import CONFIGS, QUIET

pytestmark = pytest.mark.slow


def reevaluate(trained, recipe=None, force=False, index_fp=None):
    return run_reevaluate(
        recipe or trained["recipe"], trained["store"], index_fp=index_fp or trained["place"].fingerprint, expected_inputs=trained["expected"],
        train_fp=trained["train"].fingerprint, predict_fp=trained["predict"].fingerprint, base=trained["base"], variant="uniform",
        force=force, **QUIET,
    )


def with_reevaluation(recipe, **settings):
    data = recipe.model_dump(mode="json")
    data["reevaluation"].update(settings)
    return parse_recipe(data)


def forward_loss(model_uri: str, tokens: np.ndarray) -> float:
    """The training loss of one batch, computed the way training computes it (labels = inputs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_uri).eval()
    with torch.no_grad():
        ids = torch.as_tensor(tokens)
        return float(model(input_ids=ids, labels=ids).loss)


def per_sequence_losses(model_uri: str, index: SampleIndex, steps: int) -> np.ndarray:
    """Each sequence's mean next-token loss for the first ``steps`` steps, (steps, sequences)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_uri).eval()
    rows = []
    with torch.no_grad():
        for step in range(steps):
            ids = torch.as_tensor(np.asarray(index.tokens(step), dtype=np.int64))
            logits = model(input_ids=ids).logits[:, :-1]
            rows.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").mean(dim=1).double().numpy())
    return np.stack(rows)


@pytest.fixture(scope="module")
def measured(trained_test):
    return reevaluate(trained_test)


def test_the_measured_trec_is_the_final_models_loss_on_each_training_batch(trained_test, measured):
    store = trained_test["store"]
    summary = measured.summary
    assert not measured.reused and summary.steps_evaluated == 48 and summary.sequences_per_step == 8
    output = store.output("reevaluate", measured.fingerprint)
    table = pq.read_table(io.BytesIO(output.read_bytes(CURVE_FILE)))
    assert table["step"].to_pylist() == list(range(48))
    index = SampleIndex(store, trained_test["place"].fingerprint)
    for step in (0, 23, 47):  # an independent forward pass over the batch the index names
        tokens = index.tokens(step)
        assert table["loss"][step].as_py() == pytest.approx(forward_loss(summary.model_uri, tokens), abs=2e-4)
        assert table["reference_loss"][step].as_py() == pytest.approx(forward_loss(trained_test["base"].uri, tokens), abs=2e-4)
    # the robust correction, recomputed from every sequence's loss under both models: per step and
    # beta the mean of the middle half of loss - beta * reference (8 sequences: the middle 4); each
    # half of the steps (even, odd) takes the beta least noisy on the other half, shifted by its own mean
    final, base = (per_sequence_losses(uri, index, 48) for uri in (summary.model_uri, trained_test["base"].uri))
    grid = np.round(np.arange(0.0, 1.5 + 1e-9, 0.05), 2)
    middle = np.stack([np.sort(final - beta * base, axis=1)[:, 2:6].mean(axis=1) for beta in grid], axis=1)
    steps = np.arange(48)
    expected, chosen = np.empty(48), []
    for fold in (0, 1):
        other, mine = steps % 2 != fold, steps % 2 == fold
        noise = [np.std(middle[other, k] - smooth(steps[other], middle[other, k], 48, 0.03)) for k in range(grid.size)]
        k = int(np.argmin(noise))
        chosen.append(grid[k])
        expected[mine] = middle[mine, k] - middle[mine, k].mean()
    assert summary.reference.beta_fitted and summary.reference.beta == pytest.approx(tuple(chosen))
    assert np.allclose(table["corrected"].to_numpy(), expected, atol=1e-6)
    assert summary.noise_corrected == pytest.approx(np.std(expected - table["corrected_smoothed"].to_numpy()), abs=1e-9)
    counts = sum(table[f"sequences_{tier}"].to_numpy() for tier in ("hq", "mid", "lq"))
    assert np.all(counts == 8)

    # the comparison: a number in range, the prediction's own m, and the in-sample fit at least as good
    assert -1.0 <= summary.trec_pearson <= 1.0 and summary.curve == "corrected"
    assert summary.m == trained_test["recipe"].trec.m and summary.trec_pearson_fit >= summary.trec_pearson - 1e-9
    assert summary.trec_pearson_raw == summary.raw.trec_pearson
    assert 0 < summary.trec_valley_measured <= 1 and summary.trec_valley_error == pytest.approx(
        abs(summary.trec_valley_measured - summary.trec_valley_predicted))
    assert set(summary.sampling_study) == {"every_5", "every_10"}
    # held-out: both tiers present in the eval split, the hq docs (docstrings) differ from the lq ones
    assert set(summary.val_loss_by_source) == {"stdlib-docs", "debian-copyright"}
    assert summary.val_loss_hq > 0 and summary.val_loss_general > 0
    # uniform: the same tier mix at every step, so the run enters the calibration table
    assert summary.content_confounded is False
    (entry,) = [run for run in read_runs(store) if run.key == measured.fingerprint]
    assert entry.m_star == summary.m_fit and entry.schedule == "linear" and entry.steps == 48
    assert output.read_bytes(PLOT_FILE)[:8] == b"\x89PNG\r\n\x1a\n"
    assert reevaluate(trained_test).reused


def test_a_dying_actor_is_retried_and_reference_losses_come_from_the_cache(trained_test, measured, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, str(tmp_path / "died-once"))
    recipe = with_reevaluation(trained_test["recipe"], steps_per_task=6, actors=2)  # execution settings: same fingerprint
    again = reevaluate(trained_test, recipe=recipe, force=True)
    assert (tmp_path / "died-once").exists()
    summary = again.summary
    assert again.fingerprint == measured.fingerprint and summary.retried_units >= 1
    reference = summary.reference
    assert reference.from_cache == reference.sequences and reference.evaluated == 0
    store = trained_test["store"]
    table = pq.read_table(io.BytesIO(store.output("reevaluate", again.fingerprint).read_bytes(CURVE_FILE)))
    first = measured.summary
    assert table.num_rows == 48
    assert summary.trec_pearson == pytest.approx(first.trec_pearson, abs=1e-6)
    assert summary.val_loss_hq == pytest.approx(first.val_loss_hq, abs=1e-6)


def test_sampling_every_kth_step_and_a_subset_of_each_batch(trained_test):
    recipe = with_reevaluation(trained_test["recipe"], every=5, sequences_per_step=3)
    section = recipe.reevaluation
    steps = sampled_steps(section, 48)
    assert steps.tolist() == [0, 5, 10, 15, 20, 25, 30, 35, 40, 45, 47]
    index = SampleIndex(trained_test["store"], trained_test["place"].fingerprint)
    ids = step_sequences(index, steps, section)
    assert ids.shape == (11, 3)
    for row, step in zip(ids, steps):
        assert set(row) <= set(index.batch(int(step)))
    assert np.array_equal(ids, step_sequences(index, steps, section))  # seeded: the same every time
    random = with_reevaluation(trained_test["recipe"], random_steps=10, seed=3).reevaluation
    drawn = sampled_steps(random, 48)
    assert drawn.size == 10 and np.all(np.diff(drawn) > 0) and np.array_equal(drawn, sampled_steps(random, 48))

    sparse = reevaluate(trained_test, recipe=recipe)
    assert sparse.summary.steps_evaluated == 11 and sparse.summary.sequences_per_step == 3
    assert sparse.summary.sampling_study is None
    assert sparse.summary.reference.evaluated == 0  # the subset's reference losses were cached


def test_a_curriculum_that_moves_data_in_time_is_content_confounded(trained_test):
    staged = trained_test
    rng = np.random.default_rng(0)
    mixed = rng.multinomial(32, [0.1, 0.2, 0.7], size=300)  # a uniform random mix: noise, no trend
    assert constant_mix(mixed)
    moved = mixed.copy()
    moved[270:] = [32, 0, 0]  # all hq in the last 10%
    assert not constant_mix(moved)
    ended = run_place(staged["recipe"], "end", staged["store"], staged["pack"].fingerprint, staged["predict"].fingerprint, **QUIET)
    composition = np.load(io.BytesIO(staged["store"].output("place", ended.fingerprint).read_bytes("composition.npy")))
    assert not constant_mix(composition)


def test_bad_input_is_refused_before_any_work(trained_test):
    staged = trained_test
    ended = run_place(staged["recipe"], "end", staged["store"], staged["pack"].fingerprint, staged["predict"].fingerprint, **QUIET)
    with pytest.raises(Exception, match="sample index was built for other inputs"):
        reevaluate(trained_test, index_fp=ended.fingerprint)
    with pytest.raises(RecipeError, match="bf16 needs use_gpu"):
        with_reevaluation(trained_test["recipe"], precision="bf16")
    with pytest.raises(RecipeError, match="every or random_steps"):
        with_reevaluation(trained_test["recipe"], every=2, random_steps=5)


def test_reevaluate_and_calibrate_commands(trained_test, measured, tmp_path):
    from .test_place import run_cli

    home = Path(os.environ["TRECFLOW_HOME"])
    store = Path(trained_test["store"].url)
    result = run_cli("reevaluate", str(CONFIGS / "test.yaml"), "--variant", "uniform", "--json", home=home, store=store)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    for key in ("trec_pearson", "trec_pearson_raw", "trec_pearson_m0", "trec_pearson_fit", "m_fit", "content_confounded",
                "trec_valley_measured", "trec_valley_predicted", "trec_valley_error", "val_loss_hq", "val_loss_general", "steps_evaluated"):
        assert summary[key] == getattr(measured.summary, key), key
    assert summary["reused"] and summary["fingerprint"] == measured.fingerprint

    # one measured run: calibrate says why it cannot fit, and fits nothing
    result = run_cli("calibrate", "--json", home=home, store=store)
    reply = json.loads(result.stdout)
    assert result.returncode == 1 and reply["fitted"] is False and "at least 5" in reply["reason"]


def test_calibrate_fits_recorded_runs_and_a_calibrated_recipe_predicts_with_the_law(tmp_path):
    from tasks.calibrate import record_run
    from trecflow.store import Store
    from training.calibration import CalibrationRun

    from .test_place import run_cli

    store = Store(str(tmp_path / "store"))
    for i, (tpp, tau) in enumerate([(20, 0.1), (20, 0.3), (80, 0.1), (80, 0.3), (300, 0.5)]):
        record_run(store, CalibrationRun(f"run{i}", "r", "uniform", "linear", tpp, tau, 0.8 * tpp**0.25 * tau**-0.6, 0.95, 300))
    result = run_cli("calibrate", "--json", home=tmp_path, store=Path(store.url))
    assert result.returncode == 0, result.stderr
    law = json.loads(result.stdout)["laws"]["linear"]
    assert law["mu1"] == pytest.approx(0.25) and law["mu2"] == pytest.approx(-0.6)

    recipe = (CONFIGS / "test.yaml").read_text().replace("m: 0.0", "m: calibrated")
    (tmp_path / "calibrated.yaml").write_text(recipe)
    result = run_cli("predict", str(tmp_path / "calibrated.yaml"), "--json", home=tmp_path, store=Path(store.url))
    assert result.returncode == 0, result.stderr
    predicted = json.loads(result.stdout)
    expected_m = 0.8 * (24576 / 2.0e5) ** 0.25 * predicted["tau"] ** -0.6
    assert predicted["m"] == pytest.approx(expected_m, rel=1e-5)
    # no law in another store: a one-line error naming the setting
    result = run_cli("predict", str(tmp_path / "calibrated.yaml"), home=tmp_path, store=tmp_path / "empty")
    assert result.returncode == 2 and "trec.m: calibrated" in result.stderr and "trecflow calibrate" in result.stderr
    # a law fitted on runs predicted with another p is refused, not used
    other = Store(str(tmp_path / "other-p"))
    for i, (tpp, tau) in enumerate([(20, 0.1), (20, 0.3), (80, 0.1), (80, 0.3), (300, 0.5)]):
        record_run(other, CalibrationRun(f"run{i}", "r", "uniform", "linear", tpp, tau, 1.5 * tpp**0.25 * tau**-0.6, 0.95, 300, 0.8))
    assert run_cli("calibrate", home=tmp_path, store=Path(other.url)).returncode == 0
    result = run_cli("predict", str(tmp_path / "calibrated.yaml"), home=tmp_path, store=Path(other.url))
    assert result.returncode == 2 and "was fitted on runs predicted with p = 0.8, the recipe has trec.p = 0.5" in result.stderr
