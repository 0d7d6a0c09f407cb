"""Two runners on one store: each stage is computed once, a dead holder's lease is taken over.

Each process gets its own ``TRECFLOW_HOME`` (its own Prefect and MLflow databases) and shares one
``TRECFLOW_STORE``; what each computed is counted from its stage events (``TRECFLOW_EVENTS``).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from trecflow.lease import JOB, PROCESS, Lease, LeaseLost, Owner, pid_namespace
from trecflow.store import Store

from ..conftest import BUCKET, CONFIGS, ROOT, environment


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def computed(records: list[dict]) -> dict[str, int]:
    """How many times each stage finished computing (not reused) in these events."""
    counts: dict[str, int] = {}
    for record in records:
        if record["kind"] == "finished" and record["depth"] == 0:
            counts[record["stage"]] = counts.get(record["stage"], 0) + 1
    return counts


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_lease_is_exclusive_expires_and_is_taken_over(where, tmp_path, s3_endpoint):
    store = Store(str(tmp_path / "store")) if where == "local" else Store(f"s3://{BUCKET}/lease-{uuid.uuid4().hex[:8]}", s3_endpoint)
    output = store.output("predict", "0123456789abcdef")
    first, second = Lease(output, Owner.this_process(), seconds=1.0), Lease(output, Owner.this_process(), seconds=1.0)
    assert first.try_acquire() is None and first.generation == 1
    holder = second.try_acquire()
    assert holder is not None and holder.owner == first.owner and holder.live()
    first.renew()  # the holder keeps it alive
    time.sleep(1.2)
    assert second.try_acquire() is None and second.generation == 2  # expired: taken over
    with pytest.raises(LeaseLost):
        first.renew()
    second.release()
    third = Lease(output, Owner.this_process(), seconds=1.0)
    assert third.try_acquire() is None and third.generation == 3  # released: taken at once
    output.write_bytes("data.bin", b"x")
    output.invalidate()  # the holder clears the data, never the lease
    assert third.current().generation == 3


def test_an_expired_lease_of_a_running_job_stays_the_jobs(tmp_path):
    output = Store(str(tmp_path / "store")).output("train", "0123456789abcdef")
    job = Lease(output, Owner(JOB, "train-0123456789abcdef-1"), seconds=0.5)
    assert job.try_acquire() is None
    time.sleep(0.7)  # the job's heartbeat lapsed (its flow died, or the store was unreachable)
    asked: list[str] = []

    def running(submission: str) -> bool:
        asked.append(submission)
        return True

    newcomer = Lease(output, Owner.this_process(), seconds=0.5)
    holder = newcomer.try_acquire(running)
    assert holder is not None and holder.owner == job.owner and asked == ["train-0123456789abcdef-1"]
    assert newcomer.try_acquire(lambda submission: False) is None and newcomer.generation == 2  # the job ended: taken over


def test_two_threads_on_a_cold_store_compute_each_shared_stage_once(staged_test, tmp_path):
    """As a concurrent compare does: two variants at once; the shared stages run once."""
    from tasks.graph import GRAPH
    from trecflow.runner import FINISHED, Runner
    from trecflow.stage import Target

    store = Store(str(tmp_path / "store"))
    recipe = staged_test["recipe"]
    finished: list[tuple[str, str]] = []
    lock = threading.Lock()

    def count(event):
        if event.kind == FINISHED:
            with lock:
                finished.append((event.stage.name, event.fingerprint))

    results = {}

    def run(variant: str) -> None:
        results[variant] = Runner(GRAPH, store, reporters=[count], poll_seconds=0.2).run(Target(recipe, variant), until="place")

    threads = [threading.Thread(target=run, args=(variant,)) for variant in ("uniform", "trec_valley")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert set(results) == {"uniform", "trec_valley"}
    names = [name for name, _ in finished]
    for shared in ("ingest", "score", "predict", "tokenizer", "pack"):
        assert names.count(shared) == 1, (shared, finished)
        assert results["uniform"][shared].fingerprint == results["trec_valley"][shared].fingerprint
    assert names.count("place") == 2  # one index per variant
    for shared in ("score", "tokenizer", "pack", "predict"):  # the same outputs as the stage tests computed
        assert results["uniform"][shared].fingerprint == staged_test[shared].fingerprint


def run_processes(tmp_path: Path, env: dict[str, str], argv: list[str], count: int = 2) -> list[tuple[subprocess.CompletedProcess, list[dict]]]:
    """``count`` processes of ``argv`` at once, each with its own home and event log."""
    processes = []
    for number in range(count):
        home = tmp_path / f"home-{number}"
        log = tmp_path / f"events-{number}.jsonl"
        process_env = {**os.environ, **env, "TRECFLOW_HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
                       "MLFLOW_TRACKING_URI": f"sqlite:///{home}/mlflow.db", "TRECFLOW_EVENTS": str(log)}
        processes.append((subprocess.Popen(argv, cwd=ROOT, env=process_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
    done = []
    for process, log in processes:
        out, _ = process.communicate(timeout=600)
        done.append((subprocess.CompletedProcess(argv, process.returncode, out), events(log)))
    return done


@pytest.mark.slow
def test_two_pipeline_processes_on_a_cold_s3_store_compute_each_stage_once(tmp_path, test_corpus, s3_endpoint):
    """Two `trecflow run` processes at once on one cold S3 store (its lease is a conditional PUT):
    each shared stage is computed once. On a local store the same is covered by two processes
    contending for a lease (`test_a_killed_holder_is_taken_over_after_the_lease_expires`) and by
    two pipelines in one process (`test_two_threads_on_a_cold_store_compute_each_shared_stage_once`)."""
    corpus_home = test_corpus["stdlib-docs"].parent.parent.parent  # sources read ${TRECFLOW_HOME}/corpus/test
    recipe = tmp_path / "test.yaml"
    recipe.write_text((CONFIGS / "test.yaml").read_text().replace("${TRECFLOW_HOME}", str(corpus_home)))
    # ingest and the tokenizer keep the lease short
    env = {"TRECFLOW_STORE": f"s3://{BUCKET}/two-{uuid.uuid4().hex[:8]}", "AWS_ENDPOINT_URL": s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint}
    env["TRECFLOW_LEASE_SECONDS"] = "20"
    argv = [sys.executable, "-m", "flows.cli", "run", str(recipe), "--until", "tokenizer"]
    runs = run_processes(tmp_path, env, argv)
    for process, _ in runs:
        assert process.returncode == 0, process.stdout[-3000:]
    counts = [computed(records) for _, records in runs]
    stages = {"ingest", "tokenizer"}
    total = {stage: sum(count.get(stage, 0) for count in counts) for stage in stages}
    assert total == dict.fromkeys(stages, 1), counts
    fingerprints = [{r["stage"]: r["fingerprint"] for r in records if r["kind"] in ("finished", "reused") and r["depth"] == 0} for _, records in runs]
    assert fingerprints[0] == fingerprints[1] and set(fingerprints[0]) == stages
    store = Store(env["TRECFLOW_STORE"], env.get("AWS_ENDPOINT_URL"))
    assert all(store.output(stage, fp).exists() for stage, fp in fingerprints[0].items())


@pytest.mark.parametrize("where, holder", [("local", "here"), ("s3", "here"), ("local", "elsewhere")])
def test_a_killed_holder_is_taken_over_at_once_here_and_after_the_lease_expires_elsewhere(where, holder, tmp_path, s3_endpoint):
    """A holder SIGKILLed (it never released its lease): a process of this host and PID namespace
    that is gone is taken over at once; one named as of another host (its death cannot be seen
    from here) only once its lease expires."""
    url = str(tmp_path / "store") if where == "local" else f"s3://{BUCKET}/kill-{uuid.uuid4().hex[:8]}"
    endpoint = s3_endpoint if where == "s3" else ""
    store = Store(url, endpoint or None)
    output = store.output("slow", "0123456789abcdef")
    env = {**os.environ, "TRECFLOW_LEASE_SECONDS": "6"}
    argv = [sys.executable, "-m", "tests.trecflow.lease_worker", url, endpoint]
    first = subprocess.Popen(argv + ["60"] + (["elsewhere"] if holder == "elsewhere" else []), cwd=ROOT,
                             env={**env, "TRECFLOW_EVENTS": str(tmp_path / "a.jsonl")}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 60
    while not store.fs.exists(output.file_path("started.txt")):
        assert time.monotonic() < deadline and first.poll() is None, "the first runner never started its stage"
        time.sleep(0.1)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert Lease(output, Owner.this_process()).current().live()  # never released
    began = time.monotonic()
    second = subprocess.run(argv + ["0.5"], cwd=ROOT, env={**env, "TRECFLOW_EVENTS": str(tmp_path / "b.jsonl")},
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"pid={second.stdout.split('pid=')[1].split()[0]}" in second.stdout and "reused=False" in second.stdout
    records = events(tmp_path / "b.jsonl")
    if holder == "here":
        assert [r["kind"] for r in records] == ["started", "note", "finished"]
        assert records[1]["message"] == f"slow: took over {output.uri} from process {first.pid} on {socket.gethostname()}, which is gone; starting over"
        assert records[1]["unix"] - records[0]["unix"] < 3  # never waited for the lease (6 s) to run out
    else:
        assert [r["kind"] for r in records] == ["started", "waiting", "note", "finished"]
        assert records[2]["message"] == f"slow: took over {output.uri} from process {first.pid} on elsewhere, which let it expire; starting over"
        assert time.monotonic() - began >= 1.0  # it waited for the dead holder's lease to run out
    assert output.exists() and output.read_bytes("done.txt") != str(first.pid).encode()
    assert Lease(output, Owner.this_process()).current().generation == 2


def test_a_process_is_gone_only_when_this_host_and_namespace_see_its_pid_ended(tmp_path):
    me = Owner.this_process()
    assert me.id.endswith(f":ns{pid_namespace()}") and not me.gone()
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exits, not reaped yet: a zombie
    while open(f"/proc/{zombie.pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.05)
    for pid, gone in ((ended.pid, True), (zombie.pid, True), (os.getpid(), False)):
        owner = Owner(PROCESS, me.id.replace(f":{os.getpid()}:", f":{pid}:"), me.host, pid)
        assert owner.gone() is gone, pid
    zombie.wait()
    dead_id = me.id.replace(f":{os.getpid()}:", f":{ended.pid}:")
    assert not Owner(PROCESS, dead_id, "elsewhere", ended.pid).gone()  # another host
    assert not Owner(PROCESS, dead_id.rsplit(":", 1)[0] + ":ns1", me.host, ended.pid).gone()  # another PID namespace (a container)
    assert not Owner(PROCESS, dead_id.rsplit(":", 1)[0], me.host, ended.pid).gone()  # recorded without its namespace
    assert not Owner(JOB, "train-0123456789abcdef-1").gone()
