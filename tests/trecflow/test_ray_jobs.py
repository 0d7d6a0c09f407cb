"""The Ray Jobs launcher's pure parts: submission ids, the runtime_env (code, settings, no credential)."""

from __future__ import annotations

import pytest

from trecflow.ray_jobs import ROOT, UPLOAD_EXCLUDES, forwarded_env, jobs_address, runtime_env, submission_id

CANARY = "trecflow-canary-SECRET-do-not-leak"


def test_runtime_env_carries_code_and_settings_but_no_credential():
    environ = {
        "TRECFLOW_STORE": "s3://bucket/store",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
        "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000",
        "AWS_ACCESS_KEY_ID": "AKIA-canary",
        "AWS_SECRET_ACCESS_KEY": CANARY,
        "AWS_SESSION_TOKEN": CANARY,
        "MLFLOW_TRACKING_TOKEN": CANARY,
        "MLFLOW_TRACKING_PASSWORD": CANARY,
    }
    env = runtime_env(environ)
    assert env["env_vars"] == {key: environ[key] for key in ("TRECFLOW_STORE", "AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI")}
    assert CANARY not in repr(env) and "AKIA-canary" not in repr(env)
    assert env["working_dir"] == str(ROOT)  # this checkout
    assert ".venv" in env["excludes"] and ".git" in env["excludes"] and env["excludes"] == UPLOAD_EXCLUDES
    assert "working_dir" not in runtime_env({**environ, "TRECFLOW_RAY_CODE": "image"})


def test_forwarded_env_is_only_the_allowed_settings():
    assert forwarded_env({"HOME": "/root", "AWS_DEFAULT_REGION": "us-east-1"}) == {"AWS_DEFAULT_REGION": "us-east-1"}


def test_submission_ids_name_stage_fingerprint_and_attempt():
    assert submission_id("train", "ab12", 3) == "train-ab12-3"


def test_jobs_address_is_the_dashboard_url_and_ray_client_is_refused(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs_address() == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # inside a job: the cluster's own address
    assert jobs_address() is None
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    with pytest.raises(ValueError, match="Ray Client is not supported"):
        jobs_address()
