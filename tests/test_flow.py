"""The cpt_pipeline flow under Prefect's test harness, with MLflow on SQLite and the store on a
local folder and on moto's S3 server: outputs, tracking, artifacts, caching and forced reruns."""

from __future__ import annotations

import io
import uuid

import mlflow
import pyarrow.parquet as pq
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId

from flows.params import PipelineRun
from flows.pipeline import cpt_pipeline, forced_stages
from tasks.predict import CURVE_FILE
from trecflow.store import Store

from .conftest import BUCKET, CONFIGS

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness", "test_corpus")]
RECIPE = str(CONFIGS / "test.yaml")
STAGE_TASKS = ("score_corpus", "predict_trec", "build_tokenizer", "pack_sequences", "place_curriculum", "build_base", "train_cpt")


def cached(*recomputed: str) -> dict[str, str]:
    """Every stage task Cached except ``recomputed`` (build_base always runs: it reuses its output)."""
    return {**dict.fromkeys(STAGE_TASKS, "Cached"), "build_base": "Completed", **dict.fromkeys(recomputed, "Completed")}


def run_flow(**parameters):
    state = cpt_pipeline(PipelineRun(recipe_path=RECIPE, **parameters), return_state=True)
    assert state.is_completed(), state
    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    return state.result(), {task.name.rsplit("-", 1)[0]: task.state.name for task in tasks}


def curve(store: Store, fingerprint: str):
    return pq.read_table(io.BytesIO(store.output("predict", fingerprint).read_bytes(CURVE_FILE)))


def test_flow_on_local_store_tracks_caches_and_forces(tmp_path, monkeypatch, mlflow_uri):
    store = Store(str(tmp_path / "store"))
    monkeypatch.setenv("TRECFLOW_STORE", store.url)

    result, states = run_flow()
    assert states == dict.fromkeys(STAGE_TASKS, "Completed")
    scored = result["score"]
    assert scored["tiers"]["stdlib-docs"]["hq"] >= 0.9 and scored["tiers"]["debian-copyright"]["lq"] >= 0.9
    assert store.output("score", scored["fingerprint"]).exists()
    predicted = result["predict"]
    assert not predicted["reused"] and predicted["steps"] == 48
    assert result["variant"] == "trec_valley"
    output = store.output("predict", predicted["fingerprint"])
    assert output.exists() and curve(store, predicted["fingerprint"]).num_rows == 48

    client = mlflow.MlflowClient(mlflow_uri)
    run = client.get_run(result["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["model.params"] == "200000" and run.data.params["schedule.kind"] == "linear"
    assert run.data.metrics["tau"] == pytest.approx(predicted["tau"])
    assert run.data.metrics["classifier_accuracy"] == pytest.approx(scored["classifier_accuracy"])
    assert run.data.metrics["tier_fraction.stdlib-docs.hq"] == pytest.approx(scored["tiers"]["stdlib-docs"]["hq"])
    assert {a.path for a in client.list_artifacts(run.info.run_id, "score")} >= {"score/stats.json", "score/score_histogram.png", "score/classifier"}
    assert run.data.metrics["trec_valley_predicted"] == pytest.approx(predicted["valley_fraction"])
    assert run.data.tags["trecflow.predict_fingerprint"] == predicted["fingerprint"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "predict")} == {"predict/trec.png", "predict/summary.json"}
    assert run.info.artifact_uri.startswith(store.uri("mlflow", "test"))  # MLflow artifacts live in the store

    with get_client(sync_client=True) as prefect:
        key = "trec-prediction-test-trec-valley"
        artifacts = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert artifacts and "predicted valley" in artifacts[0].data

    created = output.manifest()["created_unix"]
    placed = result["place"]
    assert placed["strategy"] == "trec_valley" and placed["hq_in_window"] >= 0.95 and placed["steps"] == 48
    assert run.data.metrics["hq_in_window"] == pytest.approx(placed["hq_in_window"])
    assert run.data.tags["trecflow.place_fingerprint"] == placed["fingerprint"]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "place")} == {"place/placement.png", "place/summary.json"}
    trained = result["train"]
    assert trained["steps"] == 48 and trained["audit"]["exactly_once"] and trained["resumed_from_step"] is None
    assert run.data.tags["trecflow.index_fingerprint"] == placed["fingerprint"]
    assert run.data.tags["trecflow.model_uri"] == trained["model_uri"] and store.fs.exists(trained["model_uri"] + "/model.safetensors")
    assert all(uri.startswith(store.uri("checkpoints")) for uri in run.data.tags["trecflow.checkpoints"].split())
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [metric.step for metric in history] == list(range(48))
    assert history[-1].value == pytest.approx(trained["final_loss"])
    assert len(client.get_metric_history(run.info.run_id, "hq_share")) == 48
    assert any(key.startswith("system/") for key in run.data.metrics)  # system metrics of the job

    again, states = run_flow(variant="uniform")
    # same fingerprints: no recompute, except the new variant's index
    assert states == cached("place_curriculum", "train_cpt")
    assert again["place"]["window"] is None and again["place"]["fingerprint"] != placed["fingerprint"]
    assert again["predict"]["reused"] and output.manifest()["created_unix"] == created
    assert client.get_run(again["mlflow_run_id"]).data.tags["trecflow.variant"] == "uniform"

    forced, states = run_flow(force=["place"])  # placement and everything after it, nothing before
    assert states == cached("place_curriculum", "train_cpt")
    assert forced["place"]["fingerprint"] == placed["fingerprint"] and not forced["train"]["reused"]

    # Output deleted behind Prefect's back: the cache is not trusted, the stage recomputes.
    output.invalidate()
    _, states = run_flow()
    assert states == cached("predict_trec") and output.exists()


def test_flow_on_s3_store_matches_local(tmp_path, monkeypatch, mlflow_uri, s3_endpoint):
    local = Store(str(tmp_path / "local"))
    monkeypatch.setenv("TRECFLOW_STORE", local.url)
    local_result, _ = run_flow()

    remote = Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)
    monkeypatch.setenv("TRECFLOW_STORE", remote.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'remote-mlflow.db'}")
    remote_result, states = run_flow()
    assert states == dict.fromkeys(STAGE_TASKS, "Completed")
    # Ingest and scoring read and write the S3 store through Ray: the same documents and tiers.
    for key in ("documents", "dropped", "tiers", "classifier_accuracy", "classifier_training"):
        assert remote_result["score"][key] == local_result["score"][key], key
    assert remote_result["score"]["uri"].startswith("s3://")
    assert remote.output("score", remote_result["score"]["fingerprint"]).exists()

    fingerprint = local_result["predict"]["fingerprint"]
    assert remote_result["predict"]["fingerprint"] == fingerprint
    assert remote_result["predict"]["uri"].startswith("s3://")
    assert curve(remote, fingerprint).equals(curve(local, fingerprint))
    # Tokenizer, packing (Ray tasks writing to S3) and the index: the same fingerprints and bytes.
    for stage in ("tokenizer", "pack", "place", "train"):
        assert remote_result[stage]["fingerprint"] == local_result[stage]["fingerprint"], stage
    # the job read the index and the base from S3 and checkpointed there through Ray Train
    assert remote_result["train"]["final_loss"] == pytest.approx(local_result["train"]["final_loss"], abs=1e-4)
    assert remote_result["train"]["model_uri"].startswith("s3://") and remote_result["train"]["checkpoints"][0].startswith("s3://")
    assert remote.fs.exists(remote_result["train"]["model_uri"] + "/config.json")
    placed = local_result["place"]["fingerprint"]
    local_files = local.output("place", placed).manifest()["files"]
    remote_files = remote.output("place", placed).manifest()["files"]
    assert {name: entry["sha256"] for name, entry in remote_files.items() if name.startswith("index/")} == {
        name: entry["sha256"] for name, entry in local_files.items() if name.startswith("index/")
    }
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'remote-mlflow.db'}")
    run = client.get_run(remote_result["mlflow_run_id"])
    assert run.info.artifact_uri.startswith(f"{remote.url}/mlflow/test")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "predict")} == {"predict/trec.png", "predict/summary.json"}
    assert remote.fs.exists(f"{remote.root}/mlflow/test")


def test_forcing_a_stage_forces_everything_downstream():
    assert forced_stages(["predict"]) == {"predict", "place", "train", "reevaluate"}
    assert forced_stages(["score"]) == {"score", "tokenizer", "pack", "place", "train", "reevaluate"}
    assert forced_stages(["tokenizer"]) == {"tokenizer", "pack", "place", "train", "reevaluate"}
    assert forced_stages(["place"]) == {"place", "train", "reevaluate"}
    assert forced_stages(["train"]) == {"train", "reevaluate"}
    assert forced_stages(None) == set()
