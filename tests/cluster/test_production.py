"""The production path on one machine: the cluster deployment of the paper-scale recipe (with the
smoke overlay) triggered through Prefect's API, run by a process worker, its Ray stages submitted
as Ray jobs to a two-node cluster, the store and MLflow's artifacts in S3, MLflow over HTTP.

One flow run is SIGKILLed while its training job runs; the next flow run of the deployment
re-attaches to that job (one training job, every batch once) and completes. A second training
(another variant) loses the Ray worker node mid-run and recovers on the head.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from .seed import BASE_PREFIX, seed_bucket
from .services import (
    ClusterBox,
    deploy,
    flow_run_pid,
    kill_flow_run,
    kill_worker_node,
    ray_nodes,
    restart_worker_node,
    start_deployment,
    wait_for_flow_run,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = "configs/cpt-3.9b-900b.yaml"
SMOKE = "configs/overlays/smoke.yaml"
DEPLOYMENT = "cpt-3.9b-900b"

pytestmark = pytest.mark.slow


def jobs(box: ClusterBox, prefix: str = "") -> list:
    from ray.job_submission import JobSubmissionClient

    return [job for job in JobSubmissionClient(box.ray_dashboard).list_jobs() if (job.submission_id or "").startswith(prefix)]


def wait_for(condition, what: str, timeout_s: float, box: ClusterBox, poll_s: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        box.check()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(poll_s)


def flow_run_logs(box: ClusterBox, flow_run_id: str) -> list[str]:
    """The log messages of a flow run, as the Prefect UI shows them."""
    from uuid import UUID

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with SyncPrefectClient(api=box.prefect_api_url) as client:
        return [log.message for log in client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[UUID(flow_run_id)])))]


def stage_summaries(box: ClusterBox, stage: str) -> dict[str, dict]:
    """The committed summaries of ``stage`` in the store, by output folder."""
    s3 = box.s3_client()
    prefix = f"store/{stage}/"
    found = {}
    for key in box.s3_keys(prefix):
        if key.endswith("/_MANIFEST.json"):
            folder = key.rsplit("/", 1)[0]
            found[folder] = json.loads(s3.get_object(Bucket=box.bucket, Key=f"{folder}/summary.json")["Body"].read())
    return found


@pytest.fixture(scope="module")
def deployed(cluster_box: ClusterBox) -> str:
    """The bucket seeded as a user would (corpus and base checkpoint at the recipe's paths) and the
    cluster deployment file deployed on the box, its parameters pointed at the smoke overlay."""
    seeded = seed_bucket(cluster_box.bucket, cluster_box.s3_endpoint, {"AWS_ACCESS_KEY_ID": cluster_box.access_key,
                                                                       "AWS_SECRET_ACCESS_KEY": cluster_box.secret})
    assert seeded["vocab"] == 512
    return deploy(cluster_box, ROOT / "infra" / "prefect" / "prefect.yaml", DEPLOYMENT, overrides={
        "parameters": {"run": {"recipe_path": RECIPE, "variant": "trec_valley", "overlays": [SMOKE], "set": []}},
        "job_variables": {"env": {"TRECFLOW_BUCKET": cluster_box.bucket, "TRECFLOW_LEASE_SECONDS": "30"}},
    })


def test_a_killed_flow_run_is_followed_by_one_that_reattaches_to_its_training_job(cluster_box: ClusterBox, deployed: str):
    box = cluster_box
    began = time.monotonic()
    first = start_deployment(box, deployed)
    flow_run_pid(first, timeout_s=120)
    running = wait_for(lambda: [job for job in jobs(box, "train-") if str(job.status) == "RUNNING"],
                       "the training job running", 600, box, poll_s=2.0)
    (training,) = running  # killed while the job starts its workers: the next flow run finds it still running
    assert kill_flow_run(first), "no process of the first flow run to kill"
    crashed = wait_for_flow_run(box, first, timeout_s=120)
    assert crashed.is_crashed(), crashed  # the worker saw its process die: the deployment's slot is free

    second = start_deployment(box, deployed)
    final = wait_for_flow_run(box, second, timeout_s=600)
    assert final.is_completed(), final
    seconds = time.monotonic() - began

    # one training job, which the second flow run attached to and followed; every Ray stage ran as a job
    assert any(f"attaching to Ray job {training.submission_id} (RUNNING)" in message for message in flow_run_logs(box, second)), \
        "the second flow run did not attach to the running training job"
    train_jobs = jobs(box, "train-")
    assert [job.submission_id for job in train_jobs] == [training.submission_id] and str(train_jobs[0].status) == "SUCCEEDED"
    stages = {job.submission_id.split("-", 1)[0] for job in jobs(box) if str(job.status) == "SUCCEEDED"}
    assert {"ingest", "score", "pack", "train", "reevaluate"} <= stages
    (train,) = stage_summaries(box, "train").values()
    assert train["audit"]["exactly_once"] and train["audit"]["records"] == train["steps"] == 40
    assert train["audit"]["attempts"] == [1], train["audit"]  # the job ran once, undisturbed by the dead flow

    # the workers ran on both nodes, from the code the job's runtime_env brought
    s3 = box.s3_client()
    train_folder = next(iter(stage_summaries(box, "train")))
    ranks = [json.loads(s3.get_object(Bucket=box.bucket, Key=f"{train_folder}/_work/pids/rank-{rank}.json")["Body"].read()) for rank in (0, 1)]
    assert len({rank["node"] for rank in ranks}) == 2, ranks
    for rank in ranks:
        assert "runtime_resources" in rank["code"] and not rank["code"].startswith(str(ROOT)), rank["code"]

    # no credential in what Ray shows of any job (entrypoint, metadata, runtime_env), in any encoding
    from ray.job_submission import JobSubmissionClient

    from ..secret_scan import scan

    client = JobSubmissionClient(box.ray_dashboard)
    shown = {job.submission_id: json.dumps(client.get_job_info(job.submission_id).dict(), default=str) for job in jobs(box)}
    assert any("runtime_env" in text for text in shown.values())
    assert scan(texts=shown, planted={"access key": box.access_key, "secret key": box.secret}).hits == []

    # outputs and MLflow artifacts in S3, readable through the MLflow server; nothing on the flow's disk
    for stage in ("ingest", "score", "tokenizer", "pack", "place", "train", "evalset", "reevaluate"):
        assert stage_summaries(box, stage), f"no committed {stage} output in S3"
    assert not list(Path(box.env["TRECFLOW_HOME"]).glob("**/_MANIFEST.json"))
    assert box.s3_keys("store/mlflow/"), "no MLflow artifact in S3"  # trecflow sets each experiment's artifact location in the store
    from mlflow import MlflowClient

    tracking = MlflowClient(box.mlflow_uri)
    experiment = tracking.get_experiment_by_name("cpt-3.9b-900b")
    runs = tracking.search_runs([experiment.experiment_id])
    assert any(run.data.tags.get("trecflow.overlays") == SMOKE for run in runs)
    train_runs = [run for run in runs if run.data.tags.get("trecflow.stage") == "train" or run.info.run_name.endswith("train")]
    assert any(tracking.get_metric_history(run.info.run_id, "loss") for run in train_runs), "no loss curve through the server"
    # artifacts as the UI reads them: the server lists and serves them from S3 itself
    import requests

    def files(run_id: str, path: str = "") -> list[str]:
        listed = requests.get(f"{box.mlflow_uri}/ajax-api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": path},
                              timeout=30).json().get("files", [])
        return [name for item in listed for name in (files(run_id, item["path"]) if item["is_dir"] else [item["path"]])]

    served = [(run.info.run_id, path) for run in runs for path in files(run.info.run_id)]
    assert any(path.endswith(".png") for _, path in served), served  # the stages' plots
    run_id, path = served[0]
    artifact = requests.get(f"{box.mlflow_uri}/get-artifact", params={"path": path, "run_uuid": run_id}, timeout=30)
    assert artifact.status_code == 200 and artifact.content, (path, artifact.status_code)

    # the final model in S3 loads with from_pretrained
    from transformers import AutoModelForCausalLM

    from training.models import fetch_checkpoint

    model = AutoModelForCausalLM.from_pretrained(fetch_checkpoint(train["model_uri"], box.s3_endpoint))
    assert model.config.vocab_size == 512 and train["model_uri"].startswith(f"s3://{box.bucket}/")
    print(f"\ncluster e2e: {seconds:.0f} s from the first flow run to the second's completion; base {BASE_PREFIX}")


def test_training_recovers_on_the_head_after_the_worker_node_is_lost(cluster_box: ClusterBox, deployed: str):
    box = cluster_box
    began = time.monotonic()
    trained_before = set(stage_summaries(box, "train"))
    jobs_before = {job.submission_id for job in jobs(box, "train-")}
    run = start_deployment(box, deployed, parameters={"run": {"recipe_path": RECIPE, "variant": "uniform", "overlays": [SMOKE],
                                                              "set": [], "until": "train"}})
    (job,) = wait_for(lambda: [job for job in jobs(box, "train-") if job.submission_id not in jobs_before and str(job.status) == "RUNNING"],
                      "the uniform variant's training job running", 600, box, poll_s=2.0)
    run_fingerprint = job.submission_id.split("-")[1]
    # Ray Train writes its run state there at once; a checkpoint is a checkpoint_* folder with our info file
    wait_for(lambda: [key for key in box.s3_keys(f"store/checkpoints/{run_fingerprint}/") if key.endswith("/trecflow_checkpoint.json")],
             "the uniform run's first checkpoint (step 10)", 300, box, poll_s=0.5)
    s3 = box.s3_client()

    def registered() -> bool:
        """Ray Train's controller registered a checkpoint (every rank reported it): it writes its
        manager's snapshot then, and a restarted worker group resumes only from a registered one."""
        keys = [key for key in box.s3_keys(f"store/checkpoints/{run_fingerprint}/") if key.endswith("/checkpoint_manager_snapshot.json")]
        snapshots = [json.loads(s3.get_object(Bucket=box.bucket, Key=key)["Body"].read()) for key in keys]
        return any(snapshot.get("latest_checkpoint_result") for snapshot in snapshots)

    wait_for(registered, "Ray Train registering the uniform run's first checkpoint", 120, box, poll_s=0.5)
    placed = [json.loads(s3.get_object(Bucket=box.bucket, Key=f"store/train/{run_fingerprint}/_work/pids/rank-{rank}.json")["Body"].read())
              for rank in (0, 1)]
    assert len({rank["node"] for rank in placed}) == 2, placed  # SPREAD: one worker on the node about to be lost
    kill_worker_node(box)
    assert len(ray_nodes(box)) == 1
    final = wait_for_flow_run(box, run, timeout_s=600)
    assert final.is_completed(), final
    (new,) = set(stage_summaries(box, "train")) - trained_before
    summary = stage_summaries(box, "train")[new]
    assert summary["steps"] == 40 and summary["audit"]["exactly_once"], summary["audit"]
    assert len(summary["audit"]["attempts"]) >= 2, summary["audit"]  # Ray Train restarted the workers on the head
    restarted = sorted(key for key in box.s3_keys(f"{new}/audit/") if "/attempt-002/" in key)
    first = json.loads(s3.get_object(Bucket=box.bucket, Key=restarted[0])["Body"].read().decode().splitlines()[0])
    assert first["step"] >= 10, first  # the restarted workers resumed from a checkpoint, not from step 0
    assert [j.submission_id for j in jobs(box, "train-") if j.submission_id not in jobs_before] == [job.submission_id]
    print(f"\nnode loss: {time.monotonic() - began:.0f} s, audit {summary['audit']}")
    restart_worker_node(box)
