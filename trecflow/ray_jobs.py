"""Stages on a Ray cluster as Ray Jobs: submit, re-attach, follow, verify.

On a cluster (``RAY_ADDRESS`` is the head's dashboard URL, ``http://head:8265``) the flow process
never joins Ray. A stage that does Ray work (ingest, score, pack, train, re-evaluate) is submitted
through Ray's Jobs API (`ray.job_submission.JobSubmissionClient`) as a job whose driver runs on the
cluster (`trecflow.stage_job`): it takes the stage's lease with the job as its owner, computes and
commits the output exactly as an in-process run would. The flow's task only launches and watches:

- submission id ``<stage>-<fingerprint>-<attempt>`` (Ray refuses a reused id, even after a failure);
- the newest attempt PENDING or RUNNING: **attach** (a flow run that died left it running: the next
  flow run follows it instead of starting a second one);
- SUCCEEDED with the output committed: reuse it; FAILED or STOPPED (or none yet): submit the next
  attempt;
- follow its status and log lines (as progress) until it ends, then verify the manifest: a job that
  ends SUCCEEDED without one is an error, not a success.

A flow run that dies does not stop its job: jobs live with the cluster, not with their submitter.
The job's code comes from the ``runtime_env``'s ``working_dir`` (this checkout, uploaded by Ray),
or from the image (``TRECFLOW_RAY_CODE=image``). Credentials never travel in the ``runtime_env``
(Ray shows it in the dashboard and the job metadata): the cluster's nodes read their own, from
their environment (Kubernetes secrets). Only the non-secret settings in `FORWARDED_ENV` travel.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from trecflow.redact import redact
from trecflow.stage import StageResult, Target
from trecflow.store import Store

ROOT = Path(__file__).resolve().parent.parent
SPEC_FOLDER = "_jobs"
JOBS_ADDRESS_ENV = "TRECFLOW_RAY_JOBS_ADDRESS"  # the Jobs API address, inside a job (Ray sets RAY_ADDRESS to the cluster's own)
# Settings the job's driver and workers need and may see in Ray's metadata: never a credential.
FORWARDED_ENV = (
    "TRECFLOW_STORE",
    "TRECFLOW_BUCKET",
    "TRECFLOW_LEASE_SECONDS",
    "AWS_ENDPOINT_URL",
    "AWS_DEFAULT_REGION",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
)
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|ACCESS_KEY|CREDENTIAL", re.I)
# What the working_dir upload leaves out (Ray caps a working_dir at 500 MiB; outputs never travel).
UPLOAD_EXCLUDES = [".venv", ".git", ".trecflow", "**/__pycache__", "*.egg-info", ".pytest_cache", "node_modules"]
ACTIVE = ("PENDING", "RUNNING")
POLL_SECONDS = 2.0


class StageJobFailed(RuntimeError):
    """A stage's Ray job ended FAILED or STOPPED, or SUCCEEDED without committing its output
    (retryable: the next attempt resumes what the store keeps)."""


def jobs_address() -> str | None:
    """The Ray Jobs API address when stages run as jobs on a cluster (``RAY_ADDRESS`` of the form
    ``http(s)://head:8265``), else None (the embedded default: Ray in this process)."""
    address = os.environ.get("RAY_ADDRESS", "")
    if address.startswith(("http://", "https://")):
        return address
    if address.startswith("ray://"):
        raise ValueError(f"RAY_ADDRESS={address}: Ray Client is not supported for training; give the head's dashboard address (http://HEAD:8265) to run stages as Ray Jobs")
    return None


def submission_id(stage: str, fingerprint: str, attempt: int) -> str:
    return f"{stage}-{fingerprint}-{attempt}"


def forwarded_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The settings a job gets through its ``runtime_env``: `FORWARDED_ENV` only, never a credential:
    a URL holding a password (``MLFLOW_TRACKING_URI=postgresql://user:pass@db/...``) is not
    forwarded (the cluster's nodes set it in their own environment, as they do credentials)."""
    environ = os.environ if environ is None else environ
    env = {key: environ[key] for key in FORWARDED_ENV if key in environ and redact(environ[key]) == environ[key]}
    leaked = [key for key in env if SECRET_NAME.search(key)]
    if leaked:  # FORWARDED_ENV is a constant; this guards its future edits
        raise AssertionError(f"credentials must not travel in a runtime_env: {leaked}")
    return env


def runtime_env(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job's ``runtime_env``: this checkout as ``working_dir`` (unless the image carries the code) and `forwarded_env`."""
    environ = os.environ if environ is None else environ
    env: dict[str, Any] = {"env_vars": forwarded_env(environ)}
    if environ.get("TRECFLOW_RAY_CODE", "working_dir") != "image":
        env["working_dir"] = str(ROOT)
        env["excludes"] = UPLOAD_EXCLUDES
    return env


@dataclass(frozen=True)
class StageJobSpec:
    """What the job's driver needs to compute one stage (JSON in the store under ``_jobs/``)."""

    stage: str
    fingerprint: str
    recipe: dict[str, Any]
    variant: str | None
    split: str
    upstream: dict[str, dict[str, Any]]
    force: bool
    tracking_run_id: str | None
    submission_id: str

    def target(self) -> Target:
        from trecflow.recipe import parse_recipe

        return Target(parse_recipe(self.recipe, source=f"job {self.submission_id}"), self.variant, self.split)

    def upstream_results(self, graph) -> dict[str, StageResult]:
        """The upstream results, their summaries typed by the graph's stages."""
        from dataclasses import replace

        return {name: replace(StageResult.from_dict(name, data["result"], graph[name].summary_type), inputs=data["inputs"])
                for name, data in self.upstream.items()}


def spec_path(store: Store, submission: str) -> str:
    return store.path(SPEC_FOLDER, f"{submission}.json")


def write_spec(store: Store, spec: StageJobSpec) -> str:
    from dataclasses import asdict

    path = spec_path(store, spec.submission_id)
    store.fs.makedirs(store.path(SPEC_FOLDER), exist_ok=True)
    store.fs.pipe_file(path, json.dumps(asdict(spec), default=str).encode())
    return path


def read_spec(store: Store, submission: str) -> StageJobSpec:
    return StageJobSpec(**json.loads(store.fs.cat_file(spec_path(store, submission))))


class JobLauncher:
    """Computes a Ray stage as a Ray Job on the cluster at ``address`` (see the module docstring)."""

    def __init__(self, address: str, store: Store, client: Any = None):
        if client is None:
            from ray.job_submission import JobSubmissionClient

            client = JobSubmissionClient(address)
        self.address = address
        self.store = store
        self.client = client

    def attempts(self, stage: str, fingerprint: str) -> list[tuple[int, str]]:
        """(attempt, status) of this stage output's jobs on the cluster, oldest first."""
        prefix = f"{stage}-{fingerprint}-"
        found = []
        for job in self.client.list_jobs():
            sid = job.submission_id or ""
            if sid.startswith(prefix) and sid[len(prefix):].isdigit():
                found.append((int(sid[len(prefix):]), str(job.status)))
        return sorted(found)

    def compute(self, stage_name: str, target: Target, upstream: Mapping[str, StageResult], fingerprint: str, force: bool,
                tracking_run_id: str | None, progress: Callable[[str], None]) -> None:
        """Attach to the stage's live job, or submit the next attempt, and follow it to its end;
        raises `StageJobFailed` unless it ends SUCCEEDED with the output committed."""
        output = self.store.output(stage_name, fingerprint)
        attempts = self.attempts(stage_name, fingerprint)
        last, status = attempts[-1] if attempts else (0, None)
        if status in ACTIVE:
            submission = submission_id(stage_name, fingerprint, last)
            progress(f"{stage_name}: attaching to Ray job {submission} ({status}) on {self.address}")
        elif status == "SUCCEEDED" and output.exists() and not force:
            progress(f"{stage_name}: Ray job {submission_id(stage_name, fingerprint, last)} already computed {output.uri}")
            return
        else:
            submission = submission_id(stage_name, fingerprint, last + 1)
            self.submit(submission, stage_name, target, upstream, fingerprint, force, tracking_run_id)
            progress(f"{stage_name}: submitted Ray job {submission} to {self.address}" + (f" (attempt {last + 1}; the last ended {status})" if status else ""))
        final = self.follow(submission, progress)
        if final != "SUCCEEDED":
            info = self.client.get_job_info(submission)
            raise StageJobFailed(f"{stage_name}: Ray job {submission} ended {final}: {(info.message or '').strip()[-500:]}")
        if not output.exists():
            raise StageJobFailed(f"{stage_name}: Ray job {submission} ended SUCCEEDED but {output.uri} has no manifest")

    def submit(self, submission: str, stage_name: str, target: Target, upstream: Mapping[str, StageResult], fingerprint: str,
               force: bool, tracking_run_id: str | None) -> None:
        upstream_json = {name: {"result": result.as_dict(), "inputs": dict(result.inputs)} for name, result in upstream.items()}
        spec = StageJobSpec(stage_name, fingerprint, target.recipe.model_dump(mode="json"), target.variant, target.split,
                       upstream_json, force, tracking_run_id, submission)
        write_spec(self.store, spec)
        entrypoint = " ".join(shlex.quote(part) for part in ("python", "-m", "trecflow.stage_job", self.store.url, submission))
        environment = runtime_env()
        environment["env_vars"][JOBS_ADDRESS_ENV] = self.address  # so the job can ask about other jobs' leases
        self.client.submit_job(
            entrypoint=entrypoint,
            submission_id=submission,
            runtime_env=environment,
            metadata={"trecflow.stage": stage_name, "trecflow.fingerprint": fingerprint, "trecflow.target": target.label},
        )

    def follow(self, submission: str, progress: Callable[[str], None]) -> str:
        """Stream the job's log lines to ``progress`` until it ends; its final status."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(submission):
                for line in chunk.splitlines():
                    if line.strip():
                        progress(line)

        try:
            asyncio.run(tail())
        except Exception as error:  # the log stream broke (a head restart): fall back to polling the status
            progress(f"{submission}: log stream lost ({type(error).__name__}: {error}); polling the job's status")
        while True:
            status = str(self.client.get_job_status(submission))
            if status not in ACTIVE:
                return status
            time.sleep(POLL_SECONDS)


def job_alive(owner_id: str, address: str | None = None) -> bool:
    """True when the Ray job ``owner_id`` is PENDING or RUNNING on the cluster (a lease it holds
    stays its own even when the heartbeat lapsed)."""
    address = address or jobs_address() or os.environ.get(JOBS_ADDRESS_ENV)
    if not address:
        return False
    from ray.job_submission import JobSubmissionClient

    try:
        return str(JobSubmissionClient(address).get_job_status(owner_id)) in ACTIVE
    except Exception:  # unknown job, or no job server: treat as not running
        print(f"trecflow: cannot ask {address} about job {owner_id}: {sys.exc_info()[1]}", file=sys.stderr)
        return False
