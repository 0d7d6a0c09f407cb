"""S3 faults (issue 16, point 1): the store and MLflow's artifacts on moto's S3 server behind our
fault-injecting proxy (`tests.s3_fault_proxy`), with trecflow's retry settings
(`trecflow.store_s3.S3_OPTIONS`, ``AWS_RETRY_MODE``/``AWS_MAX_ATTEMPTS``).

- The store alone: faults at a high rate are ridden out, the injection is the same for the same
  seed, and a store that is down fails with one line naming the object and the operation.
- The pipeline on configs/test.yaml: the session's compare (`compared_test`, two variants at once)
  ran through faults at a moderate rate and its results equal the fault-free local runs of the
  same recipe; a total outage during re-evaluation fails the run with one line and no manifest,
  and the rerun after recovery keeps the parts written before it and gives the same curve.
"""

from __future__ import annotations

import io
import json
import re

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from trecflow.store import Store, StoreUnavailable

from ..conftest import BUCKET, environment
from ..s3_fault_proxy import S3FaultProxy

SEED = 16
BYTE_IDENTICAL = ("score", "tokenizer", "pack", "place")  # score shards, tokenizer, packed tokens, sample index
VOLATILE = ("_MANIFEST.json", "summary.json")  # timings, attempts and timestamps may differ


def objects(client, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` (read from moto directly, not through the proxy), by the
    name after the prefix; lease files and temporary files left out."""
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{prefix}/"):
        for entry in page.get("Contents", []):
            name = entry["Key"][len(prefix) + 1 :]
            if not name.rsplit("/", 1)[-1].startswith(("_LEASE-", ".")):
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
    prefix = "faults-unit"  # fixed: which requests are faulted depends on their paths (and the seed)
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
    assert sum(report["retries_by"].values()) == report["retries"] and report["retries_by"].get("botocore", 0) > 0
    assert {name: data for name, data in contents[0].items() if name != "stage/fp/_MANIFEST.json"} == {
        name: data for name, data in contents[1].items() if name != "stage/fp/_MANIFEST.json"}

    # S3 down: one line naming the object, the operation, the attempts and the answer (2 attempts
    # through TRECFLOW_STORE_OPTIONS, merged over trecflow's retry settings; SlowDown gets s3fs's 3 rounds)
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
        assert str(raised.value) == f"s3://{BUCKET}/{prefix}/stage/fp/new: write failed after 6 attempts: 503 SlowDown"  # 3 rounds
        assert proxy.report()["faults"] == {"outage": 8} and proxy.retries == 6
        assert proxy.report()["retries_by"] == {"botocore": 4, "s3fs": 2}  # read: 2 attempts; write: 3 rounds of 2
        proxy.outage = False
        assert not store.fs.exists(store.output("stage", "fp").file_path("new"))  # a 404 is still an answer, not an outage


def assert_tables_close(ours: pa.Table, theirs: pa.Table, atol: float) -> None:
    """Equal column names and rows; numbers (list columns flattened) within ``atol``, the rest equal."""
    assert ours.column_names == theirs.column_names and ours.num_rows == theirs.num_rows > 0
    for name in ours.column_names:
        mine, other = ours.column(name), theirs.column(name)
        if pa.types.is_list(mine.type) or pa.types.is_large_list(mine.type) or pa.types.is_fixed_size_list(mine.type):
            assert pc.list_value_length(mine).to_pylist() == pc.list_value_length(other).to_pylist(), name
            mine, other = pc.list_flatten(mine), pc.list_flatten(other)
        mine, other = mine.to_numpy(zero_copy_only=False), other.to_numpy(zero_copy_only=False)
        if np.issubdtype(mine.dtype, np.number):
            np.testing.assert_allclose(mine, other, rtol=0, atol=atol, err_msg=name)
        else:
            assert mine.tolist() == other.tolist(), name


def local_files(store: Store, stage: str, fingerprint: str) -> dict[str, bytes]:
    """Every file of an output in a local store, by name (lease, temporary and volatile files left out)."""
    folder = store.output(stage, fingerprint).path
    names = [path[len(folder) + 1 :] for path in store.fs.find(folder)]
    return {name: store.fs.cat_file(f"{folder}/{name}") for name in names
            if name not in VOLATILE and "_LEASE-" not in name and not name.rsplit("/", 1)[-1].startswith(".")}


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.usefixtures("prefect_harness", "test_corpus")
def test_the_pipeline_survives_s3_faults_and_resumes_after_an_outage(compared_test, staged_test, trained_test, s3_faults, s3_endpoint, tmp_path):
    """``compared_test`` ran through faults at COMPARE_FAULT_RATE; its results equal the fault-free
    local runs (``staged_test``, ``trained_test``). Then its uniform re-evaluation again: S3 goes
    down after the first part, one line, no manifest; after recovery the rerun keeps the parts and
    ends with the faulted run's TREC curve."""
    from typer.testing import CliRunner

    from flows.cli import app
    from flows.params import PipelineRun
    from flows.pipeline import cpt_pipeline

    from ..conftest import COMPARE_FAULT_RATE

    faults = compared_test["faults"]
    print(f"compare through S3 faults at {COMPARE_FAULT_RATE:.0%}: {faults}")
    assert faults["injected"] >= 0.5 * COMPARE_FAULT_RATE * faults["requests"] and set(faults["faults"]) >= {
        "error500", "error503", "slowdown", "reset", "slow", "truncate"}
    assert faults["retries"] >= faults["injected"] - faults["faults"]["slow"] - 5  # (a lease poll may not come back)
    assert faults["retries_by"].get("botocore", 0) > 0 and sum(faults["retries_by"].values()) == faults["retries"]

    # every stage's output equals the fault-free run's: score shards, tokenizer, packed tokens, sample index
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    prefix = compared_test["env"]["TRECFLOW_STORE"].removeprefix(f"s3://{BUCKET}/")
    uniform = compared_test["result"]["outcomes"]["uniform"]
    reference = {**{stage: staged_test[stage] for stage in ("score", "tokenizer", "pack")}, "place": trained_test["place"]}
    for stage in BYTE_IDENTICAL:
        assert uniform[stage]["fingerprint"] == reference[stage].fingerprint, stage
        ours = objects(client, f"{prefix}/{stage}/{reference[stage].fingerprint}")
        for name in VOLATILE:
            ours.pop(name, None)
        theirs = local_files(staged_test["store"], stage, reference[stage].fingerprint)
        assert ours.keys() == theirs.keys() and ours, stage
        assert [name for name in ours if ours[name] != theirs[name]] == [], stage
    assert uniform["train"]["final_loss"] == pytest.approx(trained_test["train"].summary.final_loss, abs=1e-4)

    # the uniform re-evaluation (and the reference-loss cache) again, fault-free but for an outage
    store = Store(compared_test["env"]["TRECFLOW_STORE"], s3_endpoint)
    fingerprint = uniform["reevaluate"]["fingerprint"]
    faulted_curve = pq.read_table(io.BytesIO(store.output("reevaluate", fingerprint).read_bytes("trec.parquet")))
    store.output("reevaluate", fingerprint).invalidate()
    store.fs.rm(store.path("refcache"), recursive=True)
    env = {
        **compared_test["env"],
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",  # the compare's runs stay as they were
        "TRECFLOW_LEASE_SECONDS": "30",  # a lease the outage kept from being released expires soon
    }
    import mlflow

    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # its tables now: MLflow logs their creation to stderr
    parts = rf"/{prefix}/(reevaluate/{fingerprint}/steps|refcache/[^/]+)/part-[^/]+\.parquet$"
    try:
        with environment(env):
            # S3 goes down once the first step part is in place: 2 attempts a request (TRECFLOW_STORE_OPTIONS) for a short test
            s3_faults.outage_after("PUT", rf"/{prefix}/reevaluate/{fingerprint}/steps/part-[^/]+\.parquet$")
            options = json.dumps({"config_kwargs": {"retries": {"total_max_attempts": 2}}})
            with environment({"TRECFLOW_STORE_OPTIONS": options, "AWS_MAX_ATTEMPTS": "2"}):
                result = CliRunner().invoke(app, ["run", compared_test["recipe_path"], "--variant", "uniform"])
            assert s3_faults.outage
            lines = [line for line in result.stderr.splitlines() if line.strip()]  # the run's whole stderr
            print("outage:", lines[-3:], s3_faults.report())
            assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
            assert len(lines) == 1 and re.fullmatch(
                rf"error: .*s3://{BUCKET}/{prefix}/\S+: (read|write|delete) failed after \d+ attempts: (503 SlowDown|HTTP 503)", lines[0]), lines
            kept = sorted(name for name in objects(client, prefix) if re.search(parts, f"/{prefix}/{name}"))
            assert any("/steps/" in name for name in kept) and any(name.startswith("refcache/") for name in kept), kept
            assert not store.output("reevaluate", fingerprint).exists()  # no manifest

            # S3 is back: the rerun completes, keeps every part written before the outage, and ends with the faulted run's curve
            s3_faults.outage = False
            before = dict(s3_faults.seen)
            state = cpt_pipeline(PipelineRun(recipe_path=compared_test["recipe_path"], variant="uniform"), return_state=True)
            assert state.is_completed(), state
            rewritten = [name for name in kept if s3_faults.seen[f"PUT /{BUCKET}/{prefix}/{name}"] > before.get(f"PUT /{BUCKET}/{prefix}/{name}", 0)]
            assert rewritten == [], rewritten
    finally:
        s3_faults.outage = False
    print(f"parts kept across the outage: {len(kept)}")
    assert state.result()["reevaluate"]["fingerprint"] == fingerprint
    curve = pq.read_table(io.BytesIO(store.output("reevaluate", fingerprint).read_bytes("trec.parquet")))
    assert_tables_close(curve, faulted_curve, atol=1e-6)
