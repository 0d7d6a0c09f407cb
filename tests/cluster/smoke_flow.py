"""A trivial flow for tests/cluster/test_services.py: what the flow-run process sees, written to S3.

Run by the box's Prefect worker; it proves the run happened in a process the worker started with
the box's settings (store endpoint, credentials from its own environment, Ray address)."""

from __future__ import annotations

import hashlib
import json
import os

from prefect import flow, task


@task
def facts(tag: str) -> dict:
    return {
        "tag": tag,
        "cwd": os.getcwd(),
        "pid": os.getpid(),
        "flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID"),
        "ray_address": os.environ.get("RAY_ADDRESS"),
        "store": os.environ.get("TRECFLOW_STORE"),
        # a digest, never the secret itself
        "secret_sha256": hashlib.sha256(os.environ.get("AWS_SECRET_ACCESS_KEY", "").encode()).hexdigest(),
    }


@flow(name="box-smoke")
def box_smoke(tag: str = "default", key: str = "smoke/facts.json") -> dict:
    import boto3

    result = facts(tag)
    bucket, _, prefix = os.environ["TRECFLOW_STORE"].removeprefix("s3://").partition("/")
    # endpoint and credentials from this process's environment (AWS_ENDPOINT_URL, AWS_*)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=json.dumps(result).encode())
    return result
