"""`trecflow study` and the `study_recipe` flow: the seeds' recipes and the tables on constructed
outcomes, bad input refused before any work (exit 2, one line, nothing written), and one real study
of configs/test.yaml (the uniform variant at seeds 0 and 1, 12 steps each) through Prefect's harness
(local Ray, DeepSpeed on CPU, MLflow on SQLite) whose rerun through the command reuses every stage."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from flows.study import (COLUMNS, SEED_STAGES, SHARED_STAGES, Study, given_stages, load_study, seed_runs, study, study_csv,
                         study_result, study_rows, study_text)

from ..conftest import CONFIGS, assert_refused, environment

TEST_RECIPE = str(CONFIGS / "test.yaml")
SEED_TASKS = ("place_curriculum", "train_cpt", "reevaluate_trec")
SHARED_TASKS = ("ingest_corpus", "score_corpus", "predict_trec", "build_tokenizer", "pack_sequences", "build_base", "build_evalset")


def app() -> typer.Typer:
    app = typer.Typer()
    app.command()(study)
    return app


def seed_flow_runs(flow_run_id) -> dict:
    """The study_seed subflow runs of a study_recipe flow run, by (variant, seed)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId

    with get_client(sync_client=True) as client:
        parents = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[task.id for task in parents])))
    return {(run.parameters["run"]["variant"], run.parameters["run"]["seed"]): run for run in runs}


def outcome(hq: float, general: float, r_p: float, run: str, reused: bool = False) -> dict:
    """What a seed's run returns, as far as the study reads it."""
    stage = {"fingerprint": f"fp-{run}", "reused": reused}
    return {"reevaluate": {"val_loss_hq": hq, "val_loss_general": general, "val_loss_by_source": {"stdlib-docs": hq, "debian-copyright": general},
                           "trec_pearson": r_p, "fingerprint": f"fp-{run}", "reused": reused},
            "place": stage, "train": stage, "mlflow_run_id": run}


def test_the_seeds_recipes_differ_in_their_seeds_only_and_more_seeds_keep_the_earlier_runs():
    from trecflow.recipe import load_recipe

    study_ = Study(recipe_path=TEST_RECIPE, set=["data.tokens=6144"], seeds=2, variants=["uniform", "end"])
    recipe, variants = load_study(study_)
    runs = seed_runs(study_, variants, {"base": "b1"}, "parent")
    assert [(run.variant, run.seed) for run in runs] == [("uniform", 0), ("end", 0), ("uniform", 1), ("end", 1)]  # seed by seed
    for run in runs:
        seeded = load_recipe(run.recipe_path, run.overlays, run.set)
        assert seeded.curriculum.seed == run.seed == seeded.training.seed and seeded.data.tokens == 6144
        assert seeded.model_dump(exclude={"curriculum", "training"}) == recipe.model_dump(exclude={"curriculum", "training"})
        assert run.shared == {"base": "b1"} and run.mlflow_parent_run_id == "parent"
    # --seeds 3 after --seeds 2: seeds 0 and 1 are the same runs (so the same fingerprints: reused), seed 2 is new
    more = seed_runs(study_.model_copy(update={"seeds": 3}), variants, {"base": "b1"}, "parent")
    assert more[:4] == runs and [(run.variant, run.seed) for run in more[4:]] == [("uniform", 2), ("end", 2)]
    # the default variants: the recipe's declared ones, else its default variant
    assert load_study(Study(recipe_path=TEST_RECIPE))[1] == ["trec_valley"]
    assert set(SHARED_STAGES).isdisjoint(SEED_STAGES)


def test_the_study_tables_read_the_statistics_of_the_seeds_runs():
    recipe = load_study(Study(recipe_path=TEST_RECIPE))[0]
    outcomes = {("uniform", 0): outcome(6.10, 6.50, 0.90, "u0", True), ("end", 0): outcome(6.05, 6.52, 0.80, "e0"),
                ("uniform", 1): outcome(6.20, 6.40, 0.92, "u1", True), ("end", 1): outcome(6.14, 6.43, 0.95, "e1")}
    result = study_result(recipe, Study(recipe_path=TEST_RECIPE, seeds=2, variants=["uniform", "end"]), ["uniform", "end"], outcomes,
                          {"base": "b1", "evalset": "e1"}, 12.34)
    assert result["metrics"] == ["val_loss_general", "val_loss_hq", "val_loss_stdlib-docs", "val_loss_debian-copyright", "r_p"]
    uniform = result["stats"]["variants"][0]["metrics"]
    assert uniform["val_loss_hq"]["mean"] == pytest.approx(6.15) and uniform["val_loss_hq"]["sd"] == pytest.approx(np.std([6.1, 6.2], ddof=1))
    hq = next(pair for pair in result["stats"]["pairs"] if pair["metric"] == "val_loss_hq")
    assert (hq["a"], hq["b"]) == ("uniform", "end") and hq["differences"] == pytest.approx([0.05, 0.06])
    assert hq["se"] == pytest.approx(0.005) and hq["verdict"] is True  # 0.055 > 3 x 0.005
    r_p = next(pair for pair in result["stats"]["pairs"] if pair["metric"] == "r_p")
    assert r_p["mean"] == pytest.approx(0.035) and r_p["se"] == pytest.approx(0.065) and r_p["verdict"] is False  # 0.10, -0.03
    assert [run["reused"] for run in result["runs"]] == [True, False, True, False]

    text = study_text(result).splitlines()
    assert text[0].split() == ["variant", "metric", "N", "mean", "±", "SD"]
    assert text[2].split() == ["uniform", "val_loss_hq", "2", "6.15000", "±", "0.0707"]
    pairs = text.index("") + 1
    assert text[pairs].split()[:6] == ["a", "b", "metric", "N", "difference", "(a"]
    assert text[pairs + 2].split() == ["uniform", "end", "val_loss_hq", "2", "+0.05500", "0.005", "yes"]
    assert "end/seed-0, end/seed-1 computed, the others reused" in "\n".join(text) and text[-1] == "wall time 12.3 s"
    assert "trec_pearson" in result["r_p"]

    rows = study_rows(result)
    assert [row["kind"] for row in rows].count("seed") == 4 * 5 and [row["kind"] for row in rows].count("pair") == 5
    lines = study_csv(rows).decode().splitlines()
    assert lines[0] == ",".join(COLUMNS) and "pair,uniform,end,val_loss_hq,,2,0.05500000000000" in "\n".join(lines)
    json.dumps(result, allow_nan=False)


def test_a_variant_that_averages_reports_its_raw_final_model_and_the_averaged_minus_raw_table():
    from flows.study import FINAL_MODEL
    from training.study_stats import FINAL_MODEL as STATS_FINAL_MODEL

    assert FINAL_MODEL == STATS_FINAL_MODEL
    recipe = load_study(Study(recipe_path=TEST_RECIPE))[0]
    outcomes = {("uniform", 0): outcome(6.10, 6.50, 0.90, "u0"), ("uniform", 1): outcome(6.20, 6.40, 0.92, "u1")}
    for seed, (hq, raw_hq, r_p, raw_r_p) in enumerate([(6.00, 6.05, 0.85, 0.40), (6.10, 6.16, 0.87, 0.45)]):
        averaged = outcome(hq, 6.45, r_p, f"a{seed}")
        averaged["reevaluate"]["final_model"] = {"val_loss_hq": raw_hq, "val_loss_general": 6.40, "trec_pearson": raw_r_p}
        outcomes["ema", seed] = averaged
    result = study_result(recipe, Study(recipe_path=TEST_RECIPE, seeds=2, variants=["uniform", "ema"]), ["uniform", "ema"], outcomes, {}, 1.0)
    assert result["metrics"][-3:] == ["val_loss_hq_final_model", "val_loss_general_final_model", "r_p_final_model"]
    assert {pair["metric"] for pair in result["stats"]["pairs"]}.isdisjoint(result["metrics"][-3:])
    averaging = {entry["metric"]: entry for entry in result["stats"]["averaging"]}
    assert set(averaging) == {"val_loss_hq", "val_loss_general", "r_p"} and {entry["a"] for entry in averaging.values()} == {"ema"}
    assert averaging["val_loss_hq"]["differences"] == pytest.approx([-0.05, -0.06]) and averaging["val_loss_hq"]["verdict"] is True
    assert averaging["r_p"]["differences"] == pytest.approx([0.45, 0.42]) and averaging["val_loss_general"]["mean"] == pytest.approx(0.05)

    text = study_text(result)
    rows = [line.split() for line in text.splitlines()]
    assert ["ema", "r_p_final_model", "2", "0.42500", "±", "0.0354"] in rows and not any(row[:2] == ["uniform", "r_p_final_model"] for row in rows)
    table = text.split("averaging: the averaged model minus the raw final model")[1].splitlines()
    assert table[3].split() == ["ema", "ema", "final", "model", "val_loss_hq", "2", "-0.05500", "0.005", "yes"]
    assert [row["kind"] for row in study_rows(result)].count("averaging") == 3


def test_the_seeds_change_the_trained_reference_so_the_study_gives_the_shared_one(tmp_path):
    from tasks.evalset import evalset_fingerprint
    from tasks.graph import GRAPH
    from tasks.pack import pack_fingerprint
    from tasks.predict import predict_fingerprint
    from trecflow.recipe import load_recipe
    from trecflow.stage import StageResult, Target
    from trecflow.store import Store

    from flows.study import pinned_stages, seed_settings

    upstream = {stage: StageResult(stage, f"{stage}-fp", f"/store/{stage}", {}, True) for stage in ("score", "tokenizer", "base")}
    seeds = [load_recipe(TEST_RECIPE, [], ["reevaluation.reference=trained", *seed_settings(seed)]) for seed in (0, 1)]
    # a trained reference reads the seeds: each seed would train its own without `given` ...
    references = [GRAPH["reference"].fingerprint(Target(recipe), upstream, Store(str(tmp_path))) for recipe in seeds]
    assert references[0] != references[1]
    # ... while packing, the prediction and the held-out set do not read them
    assert len({(pack_fingerprint(recipe, "s", "t"), predict_fingerprint(recipe), evalset_fingerprint(recipe, "s", "t")) for recipe in seeds}) == 1
    # what a seed's run is given: the shared outputs committed in the store (a trained reference);
    # a reference that is the base model has no output of its own and is resolved again from the given base
    store = Store(str(tmp_path / "store"))
    store.output("reference", "ref-trained").commit()
    shared = {"reference": StageResult("reference", "ref-trained", "/store/reference", {}, True),
              "base": StageResult("base", "base-path", "/models/base", {}, True)}  # a base given as a path: no output either
    assert pinned_stages(store, shared) == {"reference": "ref-trained"}
    assert pinned_stages(store, {"reference": StageResult("reference", "base-fp", "/store/train/base-fp/model", {}, True)}) == {}


BAD_OVERLAYS = {
    "own-seed": ("curriculum:\n  variants:\n    seeded: {strategy: uniform, params: {seed: 7}}\n",
                 ["--variants", "seeded"], "variant seeded: curriculum.variants.seeded.params.seed = 7 would override the study's seed"),
    "bad-field": ("curriculum: {hq_fraction: 1.5}\n", [], "{recipe} + {path}: curriculum.hq_fraction: Input should be less than 1"),
}


@pytest.mark.parametrize("case", ["one-seed", "zero-seeds", "unknown-variant", "repeated-variant", *BAD_OVERLAYS, "unreadable-recipe",
                                  "unreadable-overlay"])
def test_bad_input_is_one_line_and_exit_2_before_any_work(case, tmp_path, monkeypatch):
    store, tracking = tmp_path / "store", tmp_path / "mlflow.db"
    monkeypatch.setenv("TRECFLOW_STORE", str(store))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking}")
    recipe, options = TEST_RECIPE, ["--seeds", "2"]
    if case == "one-seed":
        options, expected = ["--seeds", "1"], "--seeds: a study needs at least 2 seeds (the SD over seeds and the SE of a difference need two), got 1"
    elif case == "zero-seeds":
        options, expected = ["--seeds", "0"], "--seeds: a study needs at least 2 seeds"
    elif case == "unknown-variant":
        options, expected = [*options, "--variants", "uniform,nope"], "curriculum.variants: unknown variant 'nope' (known: "
    elif case == "repeated-variant":
        options, expected = [*options, "--variants", "uniform", "--variants", "uniform"], "--variants: repeated names in ['uniform', 'uniform']"
    elif case in BAD_OVERLAYS:
        text, extra, expected = BAD_OVERLAYS[case]
        path = tmp_path / f"{case}.yaml"
        path.write_text(text)
        options, expected = [*options, "--overlay", str(path), *extra], expected.format(recipe=TEST_RECIPE, path=path)
    elif case == "unreadable-recipe":
        recipe = str(tmp_path / "absent.yaml")
        expected = f"{recipe}: cannot read recipe"
    else:
        absent = tmp_path / "absent.yaml"
        options, expected = [*options, "--overlay", str(absent)], f"{absent}: cannot read overlay"
    result = CliRunner().invoke(app(), [recipe, *options])
    assert_refused(result, expected, store, tracking)  # nothing computed, no MLflow run


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_study_recipe_trains_each_seed_on_the_shared_stages_and_a_rerun_reuses_every_stage(prefect_harness, trained_test, mlflow_uri):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.study import study_recipe
    from tasks.graph import GRAPH
    from trecflow.recipe import load_recipe
    from trecflow.runner import stored
    from trecflow.stage import Target
    from training.sample_index import SampleIndex

    from .test_flow import task_states

    trainable = trained_test
    store = trainable["store"]  # the session's test store: ingest, scores, tokenizer, the tiny base and the uniform run
    # what this test adds to the session's work, kept small: seed 0 is the session's own uniform run (its placement and
    # training are reused), so one training (seed 1) and two re-evaluations without a reference model (the recipe's is
    # the base model: one more actor pool per re-evaluation, and no output of its own to share)
    settings = ["reevaluation.reference=none"]
    spec = Study(recipe_path=TEST_RECIPE, set=settings, seeds=2, variants=["uniform"])
    with environment({"TRECFLOW_STORE": store.url}):
        started = time.perf_counter()
        state = study_recipe(spec, return_state=True)
        first_seconds = time.perf_counter() - started
        assert state.is_completed(), state
        first = state.result()
        started = time.perf_counter()
        command = CliRunner().invoke(app(), [TEST_RECIPE, "--seeds", "2", "--variants", "uniform", *(f"--set={item}" for item in settings), "--json"])
        again_seconds = time.perf_counter() - started
    print(f"\nstudy: first run {first_seconds:.1f} s, rerun through the command {again_seconds:.1f} s\n{study_text(first)}")
    assert command.exit_code == 0, (command.stdout, command.stderr, command.exception)
    again = json.loads(command.stdout.strip().splitlines()[-1])

    # the seeds differ: their own placement (other batches) and training
    seeds = [first["outcomes"]["uniform/seed-0"], first["outcomes"]["uniform/seed-1"]]
    assert seeds[0]["train"]["fingerprint"] == trainable["train"].fingerprint != seeds[1]["train"]["fingerprint"]
    assert seeds[0]["place"]["fingerprint"] != seeds[1]["place"]["fingerprint"]
    batches = [SampleIndex(store, outcome["place"]["fingerprint"]).batches(np.arange(12)) for outcome in seeds]
    assert batches[0].shape == batches[1].shape == (12, 8) and not np.array_equal(batches[0], batches[1])
    for seed, outcome in enumerate(seeds):
        assert store.output("place", outcome["place"]["fingerprint"]).manifest()["inputs"]["seed"] == str(seed)

    # the shared stages: once, at the recipe's own seeds, the same for every seed (the base is the session's)
    shared = first["shared"]
    assert set(shared) == set(SHARED_STAGES) - {"reference"} and shared["base"] == trainable["base"].fingerprint
    assert shared["tokenizer"] == trainable["tokenizer"].fingerprint and shared["pack"] == trainable["pack"].fingerprint
    for outcome in seeds:
        assert {stage: outcome[stage]["fingerprint"] for stage in shared} == shared and "reference" not in outcome
        assert store.output("train", outcome["train"]["fingerprint"]).manifest()["inputs"]["base"] == shared["base"]
        inputs = store.output("reevaluate", outcome["reevaluate"]["fingerprint"]).manifest()["inputs"]
        assert (inputs["reference"], inputs["evalset"], inputs["predict"]) == ("", shared["evalset"], shared["predict"])
    # without sharing, seed 1 would pretrain its own base (its fingerprint reads curriculum.seed and training)
    seed_one = load_recipe(TEST_RECIPE, [], [*settings, "curriculum.seed=1", "training.seed=1"])
    upstream = {stage: stored(store, stage, shared[stage]) for stage in ("score", "tokenizer")}
    assert GRAPH["base"].fingerprint(Target(seed_one), upstream, store) != shared["base"]

    # the statistics are those of the stored re-evaluation summaries
    summaries = [stored(store, "reevaluate", outcome["reevaluate"]["fingerprint"]).summary for outcome in seeds]
    assert all(summary.reference is None and summary.curve == "raw" and summary.trec_pearson == summary.trec_pearson_raw for summary in summaries)
    expected = {"val_loss_hq": [s.val_loss_hq for s in summaries], "val_loss_general": [s.val_loss_general for s in summaries],
                "r_p": [s.trec_pearson for s in summaries],
                **{f"val_loss_{source}": [s.val_loss_by_source[source] for s in summaries] for source in summaries[0].val_loss_by_source}}
    assert set(first["metrics"]) == set(expected)
    (variant,) = first["stats"]["variants"]
    for metric, values in expected.items():
        spread = variant["metrics"][metric]
        assert spread["values"] == values and spread["n"] == 2
        assert spread["mean"] == pytest.approx(np.mean(values), rel=1e-12) and spread["sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    assert first["stats"]["pairs"] == []

    # the rerun through the command: the same study, every stage task Cached
    assert again["stats"] == first["stats"] and again["shared"] == shared and all(run["reused"] for run in again["runs"])
    assert not any(run["reused"] for run in first["runs"])
    client = mlflow.MlflowClient(mlflow_uri)
    again_flow_run = client.get_run(again["mlflow_run_id"]).data.tags["prefect.flow_run_id"]
    shared_tasks = {name: task for name, task in task_states(again_flow_run).items() if not name.startswith("study_seed")}
    assert shared_tasks == dict.fromkeys(SHARED_TASKS, "Cached")
    subflows = seed_flow_runs(again_flow_run)
    assert {key: flow_run.name for key, flow_run in subflows.items()} == {("uniform", 0): "test/study/uniform/seed-0",
                                                                          ("uniform", 1): "test/study/uniform/seed-1"}
    for key, flow_run in subflows.items():
        assert task_states(flow_run.id) == dict.fromkeys(SEED_TASKS, "Cached"), key
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(state.state_details.flow_run_id).name == "test/study"
        table = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["study-test"])))
    assert table and {(row["kind"], row["metric"]) for row in json.loads(table[0].data)} == {("variant", metric) for metric in expected}

    # MLflow: the study run with its table and plot, the shared stages' and the seeds' runs nested under it
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["trecflow.kind"] == "study" and parent.info.run_name == "study" and parent.info.status == "FINISHED"
    assert parent.data.params["study.seeds"] == "2" and parent.data.params["study.variants"] == "uniform"
    assert {artifact.path for artifact in client.list_artifacts(parent.info.run_id)} >= {"study.json", "study.csv", "study.png"}
    logged = json.loads(open(client.download_artifacts(parent.info.run_id, "study.json")).read())
    assert logged["stats"] == first["stats"] and logged["runs"] == first["runs"]
    assert open(client.download_artifacts(parent.info.run_id, "study.png"), "rb").read().startswith(b"\x89PNG")
    assert parent.data.metrics["uniform.val_loss_general.mean"] == pytest.approx(np.mean(expected["val_loss_general"]))
    nested = {run.info.run_name: run for run in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert {"uniform/seed-0", "uniform/seed-1", "shared/base", "shared/evalset", "shared/pack"} <= set(nested)
    assert all(name.startswith("shared/") for name in set(nested) - {"uniform/seed-0", "uniform/seed-1"})
    for seed, summary in enumerate(summaries):
        run = nested[f"uniform/seed-{seed}"]
        assert run.data.tags["trecflow.kind"] == "study-seed" and run.data.tags["trecflow.seed"] == str(seed)
        assert run.data.params["curriculum.seed"] == run.data.params["training.seed"] == run.data.params["study.seed"] == str(seed)
        assert run.data.metrics["val_loss_general"] == summary.val_loss_general


def test_variants_with_their_own_schedule_compute_their_prediction_and_averaging_under_zero3_is_refused(tmp_path):
    import yaml

    from trecflow.recipe import RecipeError, parse_recipe, read_yaml

    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"uniform": {"strategy": "uniform"}, "constant": {"strategy": "trec_valley", "schedule": {"kind": "constant"}},
                                      "avg": {"strategy": "trec_valley", "averaging": {"kind": "sma", "checkpoints": 2, "every": 4}}}
    recipe = parse_recipe(data)
    shared = {"pack": "p1", "predict": "r1", "base": "b1"}
    assert given_stages(recipe, "uniform", shared) == shared
    assert given_stages(recipe, "constant", shared) == {"pack": "p1", "base": "b1"}  # its run predicts its own schedule
    path = tmp_path / "avg.yaml"
    path.write_text(yaml.safe_dump(data))
    assert sorted(load_study(Study(recipe_path=str(path), seeds=2))[1]) == ["avg", "constant", "uniform"]  # averaging trains under ZeRO-1
    data["training"]["zero_stage"] = 3
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(RecipeError, match=r"avg.yaml: curriculum.variants.avg.averaging: checkpoint averaging needs training.zero_stage"):
        load_study(Study(recipe_path=str(path), seeds=2))
    assert load_study(Study(recipe_path=str(path), seeds=2, variants=["uniform", "constant"]))[1] == ["uniform", "constant"]
