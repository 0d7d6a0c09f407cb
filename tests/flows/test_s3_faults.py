"""S3 faults (issue 16, point 1): the store and MLflow's artifacts on moto's S3 server behind our
fault-injecting proxy (`tests.s3_fault_proxy`), with trecflow's retry settings
(`trecflow.store_s3.S3_OPTIONS`, ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS``).

- The store alone: faults at a high rate are ridden out, the injection is the same for the same
  seed, and a store that is down fails with one line naming the object and the operation.
- The pipeline on configs/test.yaml: every stage completes through faults at a moderate rate; a
  total outage during re-evaluation fails the run with one line, leaves no manifest, and the rerun
  after recovery keeps the re-evaluation parts written before the outage; the results equal the
  fault-free run of the session (`compared_test`, the same recipe on the same S3 server).
"""

from __future__ import annotations

import io
import json
import re
import uuid

import boto3
import numpy as np
import pyarrow.parquet as pq
import pytest

from trecflow.store import Store, StoreUnavailable

from ..conftest import BUCKET, environment
from ..s3_fault_proxy import S3FaultProxy

FAULT_RATE = 0.06
SEED = 16
BYTE_IDENTICAL = ("score", "tokenizer", "pack", "place")  # score shards, tokenizer, packed tokens, sample index
VOLATILE = ("_MANIFEST.json", "summary.json")  # timings, attempts and timestamps may differ
REEVALUATE_PART = r"/reevaluate/[0-9a-f]+/steps/part-[^/]+\.parquet$"


def objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (read from moto directly, not through the proxy), by the
    name after the prefix; lease files and temporary files left out."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for entry in page.get("Contents", []):
            name = entry["Key"][len(prefix) + 1 :]
            if "/_LEASE-" not in name and not name.rsplit("/", 1)[-1].startswith("."):
                found[name] = client.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
    return found


def store_operations(store: Store) -> list[bytes]:
    """A fixed sequence of the store's operations (whole-file and streamed writes and reads, an
    atomic put, a listing, a commit); returns what was read back."""
    output = store.output("stage", "fp")
    read = []
    for index in range(3):
        data = bytes(range(256)) * (64 + index * 200)
        output.write_bytes(f"file-{index}", data)
        read.append(store.fs.cat_file(output.file_path(f"file-{index}")))
        with store.fs.open(output.file_path(f"stream-{index}"), "wb") as handle:
            handle.write(data)
        with store.fs.open(output.file_path(f"stream-{index}"), "rb") as handle:
            read.append(handle.read())
        store.put_atomic(output.file_path(f"atomic-{index}"), data)
    read.append(str(sorted(store.fs.ls(output.path, detail=False))).encode())
    output.commit()
    return read


def test_the_store_rides_out_faults_the_same_way_for_a_seed_and_names_the_object_when_s3_is_down(s3_endpoint, monkeypatch):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = f"faults-unit-{uuid.uuid4().hex[:8]}"
    reports, contents = [], []
    for _ in range(2):  # twice from an empty prefix with the same seed: the same faults
        client.delete_objects(Bucket=BUCKET, Delete={"Objects": [{"Key": f"{prefix}/{name}"} for name in objects(client, prefix)] or [{"Key": "none"}]})
        with S3FaultProxy(s3_endpoint, rate=0.3, seed=SEED, slow_seconds=0.2) as proxy:
            read = store_operations(Store(f"s3://{BUCKET}/{prefix}", proxy.url))
            reports.append((proxy.report(), dict(proxy.seen)))
        contents.append(objects(client, prefix))
        expected = [bytes(range(256)) * (64 + index * 200) for index in range(3) for _ in range(2)]
        assert read[:-1] == expected
    assert reports[0] == reports[1]
    report = reports[0][0]
    print("store alone at 30 %:", report)
    assert report["injected"] >= 10 and {"error500", "error503", "slowdown", "reset", "slow"} <= set(report["faults"])
    assert report["retries"] == report["injected"] - report["faults"].get("slow", 0)  # every failed request was retried, and got through
    assert {name: data for name, data in contents[0].items() if name != "stage/fp/_MANIFEST.json"} == {
        name: data for name, data in contents[1].items() if name != "stage/fp/_MANIFEST.json"}

    # S3 down: one line naming the object, the operation, the attempts and the answer (2 attempts
    # through TRECFLOW_STORE_OPTIONS, merged over trecflow's retry settings; SlowDown gets s3fs's 2 rounds)
    monkeypatch.setenv("TRECFLOW_STORE_OPTIONS", json.dumps({"config_kwargs": {"retries": {"total_max_attempts": 2}}}))
    with S3FaultProxy(s3_endpoint) as proxy:
        store = Store(f"s3://{BUCKET}/{prefix}", proxy.url)
        assert store.storage_options()["config_kwargs"] == {"retries": {"mode": "standard", "total_max_attempts": 2},
                                                            "connect_timeout": 10, "read_timeout": 60}
        proxy.outage = True
        with pytest.raises(StoreUnavailable) as raised:
            store.fs.cat_file(store.output("stage", "fp").file_path("file-0"))
        assert str(raised.value) == f"s3://{BUCKET}/{prefix}/stage/fp/file-0: read failed after 2 attempts: HTTP 503"  # a HEAD: no body
        with pytest.raises(StoreUnavailable) as raised:
            store.fs.pipe_file(store.output("stage", "fp").file_path("new"), b"data")
        assert str(raised.value) == f"s3://{BUCKET}/{prefix}/stage/fp/new: write failed after 4 attempts: 503 SlowDown"
        assert proxy.report()["faults"] == {"outage": 6} and proxy.retries == 4
        proxy.outage = False
        assert not store.fs.exists(store.output("stage", "fp").file_path("new"))  # a 404 is still an answer, not an outage


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("prefect_harness", "test_corpus")
def test_the_pipeline_survives_s3_faults_and_resumes_after_an_outage_with_the_fault_free_results(compared_test, s3_endpoint, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.params import PipelineRun
    from flows.pipeline import cpt_pipeline

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = f"faults-{uuid.uuid4().hex[:8]}"
    recipe_path = compared_test["recipe_path"]
    with S3FaultProxy(s3_endpoint, rate=FAULT_RATE, seed=SEED, slow_seconds=0.5) as proxy:
        env = {
            "TRECFLOW_STORE": f"s3://{BUCKET}/{prefix}",
            "AWS_ENDPOINT_URL": proxy.url,
            "MLFLOW_S3_ENDPOINT_URL": proxy.url,  # MLflow's artifacts in the store go through the proxy too
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
            "TRECFLOW_LEASE_SECONDS": "30",  # a lease the outage kept from being released expires soon
        }
        with environment(env):
            # 1. every stage up to training, through faults at FAULT_RATE
            state = cpt_pipeline(PipelineRun(recipe_path=recipe_path, variant="uniform", until="train"), return_state=True)
            assert state.is_completed(), state
            survived = proxy.report()

            # 2. S3 goes down once re-evaluation has written its first part: one line, exit 1. Two
            # attempts a request (TRECFLOW_STORE_OPTIONS), each retried at once (at most one fault in a row)
            proxy.max_in_a_row = 1
            proxy.outage_after("PUT", REEVALUATE_PART)
            with environment({"TRECFLOW_STORE_OPTIONS": json.dumps({"config_kwargs": {"retries": {"total_max_attempts": 2}}})}):
                result = CliRunner().invoke(app, ["run", recipe_path, "--variant", "uniform"])
            assert proxy.outage
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            print("outage:", lines[-1:], proxy.report())
            assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
            assert len(lines) == 1 and re.fullmatch(rf"error: .*s3://{BUCKET}/{prefix}/\S+: (read|write|delete) failed after \d+ attempts: 503 SlowDown", lines[0]), lines
            stored = objects(client, prefix)
            parts = sorted(name for name in stored if re.search(REEVALUATE_PART, f"/{name}"))
            folder = parts[0].split("/steps/")[0]
            assert not any(name.startswith("reevaluate/") and name.endswith("_MANIFEST.json") for name in stored)  # no manifest
            assert f"{folder}/_MANIFEST.json" not in stored and parts

            # 3. S3 is back: the rerun completes and keeps the parts written before the outage
            proxy.outage, proxy.max_in_a_row = False, 2
            before = dict(proxy.seen)
            state = cpt_pipeline(PipelineRun(recipe_path=recipe_path, variant="uniform"), return_state=True)
            assert state.is_completed(), state
            outcome = state.result()
            rewritten = [part for part in parts if proxy.seen.get(f"PUT /{BUCKET}/{prefix}/{part}", 0) > before.get(f"PUT /{BUCKET}/{prefix}/{part}", 0)]
            assert rewritten == [], rewritten
        final = proxy.report()
    print(f"faults up to training: {survived}; whole test: {final}; re-evaluation parts kept across the outage: {len(parts)}")
    assert final["injected"] - final["faults"].get("outage", 0) >= 20 and len(final["faults"]) >= 6

    # the results equal the fault-free run's
    reference = compared_test["result"]["outcomes"]["uniform"]
    reference_prefix = compared_test["env"]["TRECFLOW_STORE"].removeprefix(f"s3://{BUCKET}/")
    for stage in BYTE_IDENTICAL:
        assert outcome[stage]["fingerprint"] == reference[stage]["fingerprint"], stage
        folder = f"{stage}/{reference[stage]['fingerprint']}"
        ours, theirs = objects(client, f"{prefix}/{folder}"), objects(client, f"{reference_prefix}/{folder}")
        for name in VOLATILE:
            ours.pop(name, None), theirs.pop(name, None)
        assert ours.keys() == theirs.keys() and ours, stage
        assert [name for name in ours if ours[name] != theirs[name]] == [], stage
    assert outcome["train"]["final_loss"] == pytest.approx(reference["train"]["final_loss"], abs=1e-4)
    curves = [pq.read_table(io.BytesIO(objects(client, f"{where}/reevaluate/{run['reevaluate']['fingerprint']}")["trec.parquet"]))
              for where, run in ((prefix, outcome), (reference_prefix, reference))]
    assert curves[0].column_names == curves[1].column_names and curves[0].num_rows == curves[1].num_rows
    for column in curves[0].column_names:
        ours, theirs = curves[0].column(column).to_numpy(zero_copy_only=False), curves[1].column(column).to_numpy(zero_copy_only=False)
        if np.issubdtype(ours.dtype, np.number):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6, err_msg=column)
        else:
            assert list(ours) == list(theirs), column
