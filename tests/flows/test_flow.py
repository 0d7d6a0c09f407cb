"""The flows end to end under Prefect's test harness: `compare_curricula` on configs/test.yaml
(the session fixture ``compared_test``: local Ray, DeepSpeed on CPU, MLflow on SQLite, the store on
moto's S3 server), then a second compare that is all cache hits, a forced placement that reruns
placement, training and re-evaluation only, and an output deleted behind Prefect's back."""

from __future__ import annotations

import json

import mlflow
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId,
                                            FlowRunFilterParentTaskRunId)

from flows.compare import compare_curricula
from flows.params import Comparison, PipelineRun, StageRun
from flows.pipeline import cpt_pipeline, forced_stages, stage_flow
from trecflow.store import Store

from ..conftest import environment

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "test_corpus")]
STAGE_TASKS = ("ingest_corpus", "score_corpus", "predict_trec", "build_tokenizer", "pack_sequences", "build_base", "place_curriculum",
               "train_cpt", "build_evalset", "reevaluate_trec")
SHARED = ("ingest_corpus", "score_corpus", "predict_trec", "build_tokenizer", "pack_sequences", "build_base", "build_evalset")


def cached(*recomputed: str) -> dict[str, str]:
    """Every stage task Cached except ``recomputed``."""
    return {**dict.fromkeys(STAGE_TASKS, "Cached"), **dict.fromkeys(recomputed, "Completed")}


def task_states(flow_run_id) -> dict[str, str]:
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {task.name.split(" [", 1)[0]: task.state.name for task in tasks}


def variant_flow_runs(compare_flow_run_id) -> dict[str, str]:
    """The cpt_pipeline subflow runs of a compare flow run, by variant."""
    with get_client(sync_client=True) as client:
        parents = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[compare_flow_run_id])))
        runs = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[task.id for task in parents]))
        )
    return {run.parameters["run"]["variant"]: run.id for run in runs}


def store_of(compared) -> Store:
    return Store(compared["env"]["TRECFLOW_STORE"], compared["env"]["AWS_ENDPOINT_URL"])


@pytest.mark.timeout(1800)  # the session's compare runs in this test's setup
def test_compare_runs_every_stage_and_writes_one_comparison(compared_test, staged_test, trained_test):
    result, store = compared_test["result"], store_of(compared_test)
    runs = variant_flow_runs(compared_test["flow_run_id"])
    assert set(runs) == {"uniform", "trec_valley"}
    with get_client(sync_client=True) as prefect:  # flow runs named for what they are
        assert prefect.read_flow_run(compared_test["flow_run_id"]).name == "test/compare"
        assert {variant: prefect.read_flow_run(run).name for variant, run in runs.items()} == {"uniform": "test/uniform", "trec_valley": "test/trec_valley"}
    first, second = (task_states(runs[variant]) for variant in compared_test["variants"])
    # the variants ran at once on a cold store: each ran every stage task, and the shared stages
    # (ingest, scoring, prediction, tokenizer, packing, the base, the held-out set) were computed
    # once between them: the other variant waited on the lease and reused the output
    for states in (first, second):
        assert set(states) == set(STAGE_TASKS) and set(states.values()) <= {"Completed", "Cached"}, states
    events = [json.loads(line) for line in compared_test["events"].read_text().splitlines()]
    computed = [(event["stage"], event["target"]) for event in events if event["kind"] == "finished" and event["depth"] == 0]
    shared = ("ingest", "score", "predict", "tokenizer", "pack", "base", "evalset")
    assert sorted(stage for stage, _ in computed if stage in shared) == sorted(shared), computed
    assert sorted(target for stage, target in computed if stage == "train") == ["test/trec_valley", "test/uniform"]

    uniform = result["outcomes"]["uniform"]
    for stage in ("score", "predict", "tokenizer", "pack", "place", "train", "reevaluate"):
        assert uniform[stage]["uri"].startswith("s3://") and store.output(stage, uniform[stage]["fingerprint"]).exists(), stage
    # the S3 run computed exactly what the local stage tests computed: same fingerprints and index bytes
    for stage in ("score", "tokenizer", "pack", "predict"):
        assert uniform[stage]["fingerprint"] == staged_test[stage].fingerprint, stage
    assert uniform["place"]["fingerprint"] == trained_test["place"].fingerprint
    local_index = trained_test["store"].output("place", trained_test["place"].fingerprint).manifest()["files"]
    remote_index = store.output("place", uniform["place"]["fingerprint"]).manifest()["files"]
    assert {k: v["sha256"] for k, v in remote_index.items() if k.startswith("index/")} == {
        k: v["sha256"] for k, v in local_index.items() if k.startswith("index/")}
    # training from the base and the index in S3 ends exactly where the local run ended
    assert uniform["train"]["final_loss"] == pytest.approx(trained_test["train"].summary.final_loss, abs=1e-4)
    assert uniform["train"]["model_uri"].startswith("s3://") and store.fs.exists(uniform["train"]["model_uri"] + "/config.json")
    assert uniform["reevaluate"]["steps_evaluated"] == 48 and uniform["reevaluate"]["content_confounded"] is False
    assert result["outcomes"]["trec_valley"]["reevaluate"]["content_confounded"] is True

    with environment(compared_test["env"]):  # MLflow reads the artifacts from the S3 store
        # MLflow: compare run -> variant runs -> stage runs, each tagged with its Prefect flow run
        client = mlflow.MlflowClient(compared_test["tracking_uri"])
        parent = client.get_run(compared_test["compare_run_id"])
        assert parent.info.status == "FINISHED" and parent.data.tags["trecflow.kind"] == "compare"
        # both variants at once (the local Ray's 4 CPUs hold 2 trainings of 2 workers); the tree's peak memory: pytest, the local Ray
        assert result["max_concurrent"] == 2 and parent.data.tags["trecflow.max_concurrent"] == "2"
        peak = parent.data.metrics
        assert 500 < peak["peak_pss_mb"] <= peak["peak_rss_mb"] and peak["peak_processes"] >= 4, peak
        assert result["peak_memory"]["peak_pss_mb"] == pytest.approx(peak["peak_pss_mb"], abs=0.1)
        assert parent.info.artifact_uri.startswith(f"{store.url}/mlflow/test")  # artifacts in the S3 store
        assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"comparison.json", "comparison.csv", "comparison.png"}
        rows = json.loads(open(client.download_artifacts(parent.info.run_id, "comparison.json")).read())
        assert [row["variant"] for row in rows] == ["uniform", "trec_valley"]
        for row in rows:
            measured = result["outcomes"][row["variant"]]["reevaluate"]
            assert row["val_loss_hq"] == measured["val_loss_hq"] and row["trec_pearson"] == measured["trec_pearson"]
        assert rows[0]["hq_window"] is None and rows[1]["hq_window"] == result["outcomes"]["trec_valley"]["place"]["window"]
        variant_runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
        assert {run.data.tags["trecflow.variant"] for run in variant_runs} == {"uniform", "trec_valley"}
        for run in variant_runs:
            variant = run.data.tags["trecflow.variant"]
            assert run.data.tags["prefect.flow_run_id"] == str(runs[variant])
            assert run.data.metrics["val_loss_hq"] == pytest.approx(result["outcomes"][variant]["reevaluate"]["val_loss_hq"])
            stages = {child.data.tags["trecflow.stage"]: child for child in
                      client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")}
            assert set(stages) == {"ingest", "score", "predict", "tokenizer", "pack", "base", "place", "train", "evalset", "reevaluate"}
            assert all(child.data.tags["prefect.flow_run_id"] == str(runs[variant]) for child in stages.values())
            train = stages["train"]
            assert [m.step for m in client.get_metric_history(train.info.run_id, "loss")] == list(range(48))
            assert {"trec_pearson", "trec_valley_measured", "trec_valley_error", "val_loss_hq", "val_loss_general"} <= set(stages["reevaluate"].data.metrics)
            assert {a.path for a in client.list_artifacts(stages["reevaluate"].info.run_id, "reevaluate")} == {"reevaluate/trec_overlay.png", "reevaluate/summary.json"}
            assert stages["predict"].data.metrics["tau"] == pytest.approx(result["outcomes"][variant]["predict"]["tau"])
            assert run.info.run_name == variant and {child.info.run_name for child in stages.values()} == {f"{variant}/{name}" for name in stages}
            assert_variant_run_shows_its_curves(client, run, result["outcomes"][variant], store)
        assert client.get_experiment(parent.info.experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
        assert "curves.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
        strategies = {run.data.tags["trecflow.variant"]: run.data.params["variant.strategy"] for run in variant_runs}
        assert strategies == {"uniform": "uniform", "trec_valley": "trec_valley"}  # what MLflow's "diff only" shows

    with get_client(sync_client=True) as prefect:
        table = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["curriculum-comparison-test"])))
        measured = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["trec-measured-test-uniform"])))
        links = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["mlflow-run-test-compare"])))
    assert table and json.loads(table[0].data)[0]["variant"] == "uniform"
    assert measured and "r_p" in measured[0].data and "data:image/png;base64," in measured[0].data
    assert links and compared_test["compare_run_id"] in links[0].data


def assert_variant_run_shows_its_curves(client, run, outcome, store, registered_by: str | None = None) -> None:
    """A variant's MLflow run: per-step loss / lr / hq_share every `log_every` (8) steps and the
    last, the measured TREC by step, its datasets (digests = fingerprints) and its registered model
    (registered by ``registered_by``, default this run: a rerun reuses the version)."""
    run_id = run.info.run_id
    history = {name: client.get_metric_history(run_id, name) for name in ("loss", "lr", "hq_share", "trec_raw", "trec_corrected", "trec_predicted")}
    assert [m.step for m in history["loss"]] == [*range(0, 48, 8), 47]
    assert [m.step for m in history["lr"]] == [m.step for m in history["hq_share"]] == [m.step for m in history["loss"]]
    assert [m.step for m in history["trec_raw"]] == list(range(48)) == [m.step for m in history["trec_predicted"]]
    assert len(history["trec_corrected"]) == 48  # test.yaml trains a reference
    assert history["loss"][-1].value == pytest.approx(outcome["train"]["final_loss"], abs=1e-6)
    shares = [m.value for m in history["hq_share"]]
    assert all(0.0 <= share <= 1.0 for share in shares)
    if outcome["place"]["strategy"] == "uniform":  # spread evenly: every step within one sequence of the mean
        assert max(shares) - min(shares) <= 1 / outcome["place"]["sequences_per_step"] + 1e-9
    datasets = {entry.dataset.name: entry.dataset.digest for entry in client.get_run(run_id).inputs.dataset_inputs}
    variant = run.data.tags["trecflow.variant"]
    assert datasets == {"test-corpus": outcome["score"]["fingerprint"], f"test-{variant}-sample-index": outcome["place"]["fingerprint"]}
    name, version = run.data.tags["trecflow.model_version"].split("/")
    registered = client.get_model_version(name, version)
    assert name == f"test-{variant}" and registered.source == outcome["train"]["model_uri"] and registered.run_id == (registered_by or run_id)
    assert registered.tags == {"trecflow.store": store.url, "trecflow.stage": "train", "trecflow.fingerprint": outcome["train"]["fingerprint"]}
    assert "stage 1's data card" in registered.description and "| stdlib-docs |" in registered.description


def test_a_second_compare_is_all_cache_hits_and_a_forced_placement_reruns_only_what_follows(compared_test):
    store = store_of(compared_test)
    uniform = compared_test["result"]["outcomes"]["uniform"]
    created = store.output("train", uniform["train"]["fingerprint"]).manifest()["created_unix"]
    with environment(compared_test["env"]):
        # one after the other (the session's compare ran them at once): still nested, every task cached
        comparison = Comparison(recipe_path=compared_test["recipe_path"], variants=compared_test["variants"], concurrent=False)
        state = compare_curricula(comparison, return_state=True)
        assert state.is_completed(), state
        again = state.result()
        nested = variant_flow_runs(state.state_details.flow_run_id)
        assert sorted(nested) == sorted(compared_test["variants"])
        for variant, flow_run_id in nested.items():
            assert task_states(flow_run_id) == cached(), variant
        assert [row["val_loss_hq"] for row in again["variants"]] == [row["val_loss_hq"] for row in compared_test["result"]["variants"]]
        # every stage cached, yet the new variant runs show the same curves, datasets and model (one version per trained output)
        client = mlflow.MlflowClient(compared_test["tracking_uri"])
        for row in again["variants"]:
            run = client.get_run(row["mlflow_run_id"])
            first = next(old for old in compared_test["result"]["variants"] if old["variant"] == row["variant"])["mlflow_run_id"]
            assert_variant_run_shows_its_curves(client, run, again["outcomes"][row["variant"]], store, registered_by=first)
            assert len(client.search_model_versions(f"name = 'test-{row['variant']}'")) == 1
        assert store.output("train", uniform["train"]["fingerprint"]).manifest()["created_unix"] == created

        forced = cpt_pipeline(PipelineRun(recipe_path=compared_test["recipe_path"], variant="uniform", force=["place"]), return_state=True)
        assert forced.is_completed(), forced
        assert task_states(forced.state_details.flow_run_id) == cached("place_curriculum", "train_cpt", "reevaluate_trec")
        outcome = forced.result()
        assert outcome["train"]["fingerprint"] == uniform["train"]["fingerprint"] and not outcome["train"]["reused"]
        assert outcome["reevaluate"]["trec_pearson"] == pytest.approx(uniform["reevaluate"]["trec_pearson"], abs=1e-4)

        # an output deleted behind Prefect's back: the cache is not trusted, that stage recomputes
        store.output("predict", uniform["predict"]["fingerprint"]).invalidate()
        rerun = cpt_pipeline(PipelineRun(recipe_path=compared_test["recipe_path"], variant="uniform"), return_state=True)
        assert task_states(rerun.state_details.flow_run_id) == cached("predict_trec")
        assert store.output("predict", uniform["predict"]["fingerprint"]).exists()

        # a stage command nests its stage's run under the newest run of its variant: no new top-level run
        experiment = client.get_experiment_by_name("test").experiment_id
        top_level = {run.info.run_id for run in client.search_runs([experiment]) if "mlflow.parentRunId" not in run.data.tags}
        staged = stage_flow(StageRun(recipe_path=compared_test["recipe_path"], stage="predict", variant="uniform"), return_state=True)
        assert staged.is_completed(), staged
        assert staged.result()["mlflow_run_id"] == rerun.result()["mlflow_run_id"]
        assert {run.info.run_id for run in client.search_runs([experiment]) if "mlflow.parentRunId" not in run.data.tags} == top_level
        children = client.search_runs([experiment], f"tags.mlflow.parentRunId = '{rerun.result()['mlflow_run_id']}' and attributes.run_name = 'uniform/predict'")
        assert len(children) == 2  # the rerun's own predict, then the stage command's (and no run for the stages it only read)
        with get_client(sync_client=True) as prefect:
            assert prefect.read_flow_run(staged.state_details.flow_run_id).name == "test/uniform/predict"
            assert prefect.read_flow_run(rerun.state_details.flow_run_id).name == "test/uniform"


def test_typed_parameters_refuse_an_unknown_stage_before_any_work(compared_test):
    state = cpt_pipeline(run={"recipe_path": compared_test["recipe_path"], "force": ["plcae"]}, return_state=True)
    assert state.is_failed()
    assert "ParameterTypeError" in state.message and "run.force.0" in state.message


def test_forcing_a_stage_forces_everything_downstream():
    assert forced_stages(["predict"]) == {"predict", "place", "train", "reevaluate"}
    # the tokenizer reads the ingested base split, not the scores
    assert forced_stages(["score"]) == {"score", "pack", "base", "place", "train", "reference", "evalset", "reevaluate"}
    assert forced_stages(["tokenizer"]) == {"tokenizer", "pack", "base", "place", "train", "reference", "evalset", "reevaluate"}
    assert forced_stages(["ingest"]) == {"ingest", "score", "tokenizer", "pack", "base", "place", "train", "reference", "evalset", "reevaluate"}
    assert forced_stages(["place"]) == {"place", "train", "reevaluate"}
    assert forced_stages(["train"]) == {"train", "reevaluate"}


def test_one_run_fingerprints_each_stage_once_and_lists_each_source_once(prefect_harness, staged_test, mlflow_uri, monkeypatch):
    import tasks.ingest as ingest
    from tasks.graph import STAGES

    from ..conftest import CONFIGS

    calls: dict[str, int] = {}
    listings: list[str] = []
    list_source = ingest.list_source
    monkeypatch.setattr(ingest, "list_source", lambda source, *args: listings.append(source.name) or list_source(source, *args))
    for stage in STAGES:
        def counted(target, upstream, store, stage=stage, fingerprint=type(stage).fingerprint):
            calls[stage.name] = calls.get(stage.name, 0) + 1
            return fingerprint(stage, target, upstream, store)

        monkeypatch.setattr(stage, "fingerprint", counted)
    with environment({"TRECFLOW_STORE": staged_test["store"].url}):
        state = cpt_pipeline(PipelineRun(recipe_path=str(CONFIGS / "test.yaml"), variant="uniform", until="place"), return_state=True)
    assert state.is_completed(), state
    assert calls == dict.fromkeys(("ingest", "score", "predict", "tokenizer", "pack", "place"), 1)
    assert sorted(listings) == ["debian-copyright", "stdlib-docs"]
    outcome = state.result()
    # the staged store holds everything but a variant's index (which depends on the test order)
    assert all(outcome[stage]["reused"] for stage in ("ingest", "score", "predict", "tokenizer", "pack"))
    assert outcome["pack"]["fingerprint"] == staged_test["pack"].fingerprint
