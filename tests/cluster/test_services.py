"""Smoke tests of the cluster in a box (tests/cluster/conftest.py): each service does its part of
the production path, reached the way production reaches it."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from .services import ROOT, WORKING_DIR_EXCLUDES, deploy, flow_run_processes, ray_nodes, run_deployment_and_wait

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def test_ray_two_nodes_job_from_working_dir_spread_and_no_secret_in_job(cluster_box):
    from ray.job_submission import JobStatus, JobSubmissionClient

    box = cluster_box
    nodes = ray_nodes(box)
    assert len(nodes) == 2
    assert sorted(node["is_head_node"] for node in nodes) == [False, True]
    cpus = {node["is_head_node"]: node["resources_total"]["CPU"] for node in nodes}
    assert cpus == {True: box.head_cpus, False: box.worker_cpus}

    started = time.monotonic()
    client = JobSubmissionClient(box.ray_dashboard)
    job_id = client.submit_job(
        entrypoint="python tests/cluster/ray_smoke_job.py",
        runtime_env={"working_dir": str(ROOT), "excludes": WORKING_DIR_EXCLUDES},
        metadata={"purpose": "cluster-box smoke"},
    )
    deadline = time.monotonic() + 180
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.monotonic() < deadline, f"job {job_id} still {status}:\n{client.get_job_logs(job_id)}"
        time.sleep(0.5)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs
    print(f"\nRay smoke job: {time.monotonic() - started:.1f} s")
    [line] = [line for line in logs.splitlines() if line.startswith("SMOKE ")]
    report = json.loads(line.removeprefix("SMOKE "))

    # the code came through the job's working_dir (each node's package cache), not this checkout
    head = {node["node_id"]: node["is_head_node"] for node in nodes}
    placed = [(report["driver_tasks_file"], True)] + [(task["tasks_file"], head[task["node_id"]]) for task in report["tasks"]]
    for path, on_head in placed:
        cache = (box.ray_temp_dir if on_head else box.ray_worker_temp_dir).resolve()
        assert Path(path).resolve().is_relative_to(cache), path
        assert "/runtime_resources/working_dir_files/" in path, path
        assert not Path(path).resolve().is_relative_to(ROOT.resolve()), path

    # SPREAD put the two tasks on the two nodes
    assert {task["node_id"] for task in report["tasks"]} == {node["node_id"] for node in nodes}

    # the nodes read the secret from their own environment ...
    assert all(task["secret_sha256"] == digest(box.secret) for task in report["tasks"])
    assert all(task["endpoint"] == box.s3_endpoint for task in report["tasks"])
    # ... and it travelled in nothing of the job's: metadata, runtime_env, entrypoint, logs
    info = client.get_job_info(job_id)
    listed = [job for job in client.list_jobs() if job.submission_id == job_id]
    for text in (json.dumps(info.dict(), default=str), json.dumps([job.dict() for job in listed], default=str), logs):
        assert box.secret not in text
    assert info.runtime_env is not None and "env_vars" not in info.runtime_env


def test_mlflow_server_keeps_artifacts_in_s3(cluster_box, tmp_path):
    from mlflow.tracking import MlflowClient

    box = cluster_box
    client = MlflowClient(tracking_uri=box.mlflow_uri)
    experiment_id = client.create_experiment("box-smoke")
    run = client.create_run(experiment_id)
    run_id = run.info.run_id
    client.log_metric(run_id, "loss", 1.5, step=3)
    artifact = tmp_path / "hello.txt"
    artifact.write_text("hello from the box")
    client.log_artifact(run_id, str(artifact), artifact_path="notes")
    client.set_terminated(run_id)

    # read back through the server
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(3, 1.5)]
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    assert [f.path for f in client.list_artifacts(run_id, "notes")] == ["notes/hello.txt"]

    # the object is in moto's S3, under the server's --artifacts-destination
    prefix = box.mlflow_artifacts.removeprefix(f"s3://{box.bucket}/")
    keys = [key for key in box.s3_keys(prefix) if key.endswith("notes/hello.txt") and run_id in key]
    assert len(keys) == 1, box.s3_keys(prefix)
    body = box.s3_client().get_object(Bucket=box.bucket, Key=keys[0])["Body"].read()
    assert body == b"hello from the box"
    # and nowhere on local disk
    for folder in (box.mlflow_dir, ROOT, Path.cwd()):
        assert not (folder / "mlruns").exists() and not (folder / "mlartifacts").exists(), folder


def test_prefect_deployment_runs_through_the_worker(cluster_box):
    box = cluster_box
    started = time.monotonic()
    name = deploy(box, HERE / "smoke.prefect.yaml", "box-smoke")
    deployed = time.monotonic() - started
    assert name == "box-smoke/box-smoke"

    key = f"smoke/{time.time_ns()}.json"
    state = run_deployment_and_wait(box, name, {"tag": "from-test", "key": key}, timeout_s=180)
    ran = time.monotonic() - started - deployed
    print(f"\nPrefect smoke: deploy {deployed:.1f} s, run {ran:.1f} s")
    assert state.is_completed(), state
    flow_run_id = str(state.state_details.flow_run_id)

    # the flow ran in a process the worker started, in this checkout, with the box's settings
    store_prefix = box.store.removeprefix(f"s3://{box.bucket}/")
    facts = json.loads(box.s3_client().get_object(Bucket=box.bucket, Key=f"{store_prefix}/{key}")["Body"].read())
    assert facts["tag"] == "from-test"
    assert facts["flow_run_id"] == flow_run_id
    assert Path(facts["cwd"]).resolve() == ROOT.resolve()
    assert facts["ray_address"] == box.ray_dashboard
    assert facts["secret_sha256"] == digest(box.secret)
    assert facts["pid"] != box.services.prefect_worker.pid
    # and its process exits once it has reported the final state
    deadline = time.monotonic() + 60
    while flow_run_processes(flow_run_id):
        assert time.monotonic() < deadline, flow_run_processes(flow_run_id)
        time.sleep(0.5)
