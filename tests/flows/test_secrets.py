"""Credentials stay where they belong (issue 16, point 5): planted fake credentials never reach
MLflow, Prefect, the store, Ray's metadata or a command's output; a URL's password is shown as ***.

The scanner is `tests.secret_scan`; its numbers (files and bytes read, hits) are printed.
"""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from trecflow.ray_jobs import forwarded_env
from trecflow.redact import redact, redact_error
from trecflow.store import MANIFEST

from ..conftest import BUCKET, CONFIGS, ROOT, free_port
from ..secret_scan import PASSWORD, PLANTED, planted_env, scan, url_with_password

TRECFLOW = Path(sys.executable).parent / "trecflow"


@pytest.mark.parametrize(("text", "shown"), [
    ("postgresql://mlflow:secret@db.internal:5432/mlflow", "postgresql://mlflow:***@db.internal:5432/mlflow"),
    ('Could not connect to the endpoint URL: "http://minio:p%40ss@10.0.0.5:9000/bucket?list-type=2"',
     'Could not connect to the endpoint URL: "http://minio:***@10.0.0.5:9000/bucket?list-type=2"'),
    ("https://s3.example/b/k?X-Amz-Credential=AKIA/x&X-Amz-Signature=abc123&part=2",
     "https://s3.example/b/k?X-Amz-Credential=***&X-Amz-Signature=***&part=2"),
    ("https://host/api?token=t0k3n", "https://host/api?token=***"),
    ("s3://AKIAFAKE7QX2M9TRCKEY:s3cr3t@bucket/store (key AKIAFAKE7QX2M9TRCKEY)", "s3://***:***@bucket/store (key ***)"),
    ("s3://bucket/prefix http://127.0.0.1:9000 postgresql://user@db/x a=b", "s3://bucket/prefix http://127.0.0.1:9000 postgresql://user@db/x a=b"),
])
def test_redact_masks_passwords_credential_parameters_and_key_ids_only(text, shown):
    assert redact(text) == shown


def test_an_error_keeps_its_type_and_loses_its_password():
    from botocore.exceptions import EndpointConnectionError

    try:
        try:
            raise OSError(111, "Connection refused", url_with_password("http://127.0.0.1:1/b"))
        except OSError as cause:
            raise EndpointConnectionError(endpoint_url=url_with_password("http://127.0.0.1:1/b")) from cause
    except EndpointConnectionError as caught:
        error = caught
        redacted = redact_error(caught)
    assert redacted is error and isinstance(redacted, EndpointConnectionError)
    assert str(error) == 'Could not connect to the endpoint URL: "http://fakeuser:***@127.0.0.1:1/b"'
    assert PASSWORD not in str(error.__cause__) and "fakeuser:***@" in str(error.__cause__)
    assert error.kwargs["endpoint_url"] == "http://fakeuser:***@127.0.0.1:1/b"  # what a pickle of it keeps


def test_log_records_lose_passwords_in_their_message_and_exception():
    import io
    import logging

    import flows  # noqa: F401 (installs the log redaction, as every flow process does)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("trecflow.test-secrets")
    logger.addHandler(handler)
    try:
        try:
            raise RuntimeError(f"API request to {url_with_password('http://127.0.0.1:1')}/api failed")
        except RuntimeError:
            logger.error("tracking %s", "postgresql://" + url_with_password("http://db/mlflow").split("://", 1)[1], exc_info=True)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert "tracking postgresql://fakeuser:***@db/mlflow" in text and "http://fakeuser:***@127.0.0.1:1/api" in text
    assert scan(texts={"log": text}).hits == []


def test_a_store_endpoint_with_a_password_is_refused_in_words_that_mask_it():
    from trecflow.store import Store

    with pytest.raises(ValueError) as error:
        Store(f"s3://{BUCKET}/x", url_with_password("http://127.0.0.1:9000"))
    assert str(error.value).startswith("S3 endpoint http://fakeuser:***@127.0.0.1:9000: an endpoint URL takes no user name or password")


def test_a_url_holding_a_password_is_not_forwarded_to_a_ray_job():
    environ = {"MLFLOW_TRACKING_URI": "postgresql://mlflow:secret@db/mlflow", "AWS_ENDPOINT_URL": "http://minio:9000",
               "MLFLOW_S3_ENDPOINT_URL": url_with_password("http://minio:9000"), "AWS_SECRET_ACCESS_KEY": "x"}
    assert forwarded_env(environ) == {"AWS_ENDPOINT_URL": "http://minio:9000"}


def scan_recipe(tmp_path: Path, test_corpus: dict[str, Path], endpoint_url: str | None = None) -> Path:
    """configs/test.yaml with its corpus at the session's files, a planted secret in a source's
    storage options and, when given, the store's endpoint."""
    data = yaml.safe_load((CONFIGS / "test.yaml").read_text())
    for source in data["corpus"]["sources"]:
        source["path"] = str(test_corpus[source["name"]])
    data["corpus"]["sources"][0]["storage_options"] = {"password": PLANTED["recipe storage option"]}
    if endpoint_url:
        data["store"] = {"endpoint_url": endpoint_url}
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def run_cli(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([str(TRECFLOW), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def ray_tmp():
    """A short folder for Ray's session (its socket paths must stay short), removed after the test."""
    folder = tempfile.mkdtemp(prefix="rs", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def planted_run_env(tmp_path: Path, s3_endpoint: str, prefix: str, ray_tmp: str) -> dict[str, str]:
    """A `trecflow` process's environment: the planted credentials, its own home (MLflow's SQLite
    database, Prefect's result storage), Ray's session folder ``ray_tmp``, the
    session's Prefect server and the store ``s3://<bucket>/<prefix>`` on moto."""
    import prefect.settings

    base_env = {key: value for key, value in os.environ.items() if not key.startswith(("TRECFLOW_", "PREFECT_", "MLFLOW_", "AWS_"))}
    home = tmp_path / "home"
    return {**base_env, **planted_env(), "PYTHONPATH": str(ROOT), "TRECFLOW_HOME": str(home),
            "RAY_TMPDIR": ray_tmp,
            "PREFECT_API_URL": prefect.settings.PREFECT_API_URL.value(), "AWS_DEFAULT_REGION": "us-east-1",
            "TRECFLOW_STORE": f"s3://{BUCKET}/{prefix}", "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
            "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}"}


def scan_run(env: dict[str, str], s3_endpoint: str, outputs: dict[str, subprocess.CompletedProcess]):
    """`scan` of everything the runs with ``env`` wrote: their home, Ray's session folder, the
    Prefect server's database folder, every object under the store's prefix, and their output."""
    import boto3
    import prefect.settings

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing")
    prefix = env["TRECFLOW_STORE"].removeprefix(f"s3://{BUCKET}/")
    objects = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for entry in page.get("Contents", []):
            objects[f"s3://{BUCKET}/{entry['Key']}"] = s3.get_object(Bucket=BUCKET, Key=entry["Key"])["Body"].read()
    prefect_db = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split(":///", 1)[1])
    texts = dict(objects)
    for name, completed in outputs.items():
        texts |= {f"{name} stdout": completed.stdout, f"{name} stderr": completed.stderr}
    result = scan([Path(env["TRECFLOW_HOME"]), prefect_db.parent, Path(env["RAY_TMPDIR"])], texts)
    print(f"secret scan: {result.files} files ({result.bytes:,} bytes) and {result.texts} texts ({len(objects)} store objects) "
          f"searched for {len(PLANTED)} planted credentials: {len(result.hits)} hits")
    return result, objects


@pytest.mark.slow
def test_planted_credentials_appear_nowhere_a_run_writes(prefect_harness, s3_endpoint, test_corpus, tmp_path, ray_tmp):
    """`trecflow run --until ingest` (a Prefect flow and task, MLflow runs, the S3 store, Ray
    tasks) with credentials planted in the environment and the recipe: nothing it wrote or printed
    holds one."""
    env = planted_run_env(tmp_path, s3_endpoint, f"secrets-{os.getpid()}", ray_tmp)
    ran = run_cli(["run", str(scan_recipe(tmp_path, test_corpus)), "--until", "ingest"], env)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    result, objects = scan_run(env, s3_endpoint, {"run": ran})
    assert any("/ingest/" in key and key.endswith(MANIFEST) for key in objects)
    with sqlite3.connect(Path(env["TRECFLOW_HOME"], "mlflow.db")) as db:  # the recipe went to MLflow, its secret masked
        sources = db.execute("select value from params where key = 'corpus.sources'").fetchall()
    assert len(sources) == 1 and "'storage_options': {'password': '***'}" in sources[0][0], sources
    assert result.files > 50 and any(Path(env["RAY_TMPDIR"]).rglob("*.log"))  # Ray's session logs were scanned
    assert result.hits == [], result.hits


@pytest.mark.slow
@pytest.mark.parametrize("where", ["store endpoint", "tracking URI"])
def test_a_url_with_a_password_fails_in_one_line_that_masks_it(prefect_harness, s3_endpoint, test_corpus, tmp_path, ray_tmp, where):
    """A run whose store endpoint is a URL with a password (S3 clients refuse one: bad input, exit 2)
    or whose MLflow tracking server is such a URL that cannot be reached (exit 1): one error line
    naming the URL with its password as ***, and nothing written or printed holds a planted
    credential (Prefect's log of the failed flow included)."""
    env = planted_run_env(tmp_path, s3_endpoint, f"secrets-{os.getpid()}-{where.split()[0]}", ray_tmp)
    closed = url_with_password(f"http://127.0.0.1:{free_port()}")
    recipe = scan_recipe(tmp_path, test_corpus, closed if where == "store endpoint" else None)
    if where == "tracking URI":  # an MLflow server behind basic authentication, asked once
        env |= {"MLFLOW_TRACKING_URI": closed, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
    failed = run_cli(["run", str(recipe), "--until", "ingest"], env, timeout=300)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(r"//fakeuser:\*\*\*@127\.0\.0\.1", errors[0]), (failed.stdout[-2000:], failed.stderr[-2000:])
    assert failed.returncode == (2 if where == "store endpoint" else 1), errors  # bad input; a service that cannot be reached
    result, _ = scan_run(env, s3_endpoint, {"failed run": failed})
    assert result.hits == [], result.hits
