"""The training audit log on a local store: parts, attempts, the newest record, and the verdicts
of the exactly-once check (missing steps, wrong batches, re-executed steps, order)."""

from __future__ import annotations

from training.audit import PART_STEPS, AuditWriter, attempts, check_audit, latest_record, read_audit
from trecflow.store import Store


def planned(step: int) -> str:
    return f"hash-{step}"


def write(store: Store, folder: str, steps: range, hashes=planned) -> AuditWriter:
    writer = AuditWriter.next_attempt(store, folder)
    for step in steps:
        writer.record(step, hashes(step), lr=0.001, loss=10.0 - step / 100, tokens=512, seconds=0.01)
    return writer


def test_attempts_parts_and_the_newest_record(tmp_path):
    store = Store(str(tmp_path))
    folder = store.path("train", "fp")
    assert attempts(store, folder) == [] and latest_record(store, folder) is None
    write(store, folder, range(0, 130))  # attempt 1 dies after step 129
    assert attempts(store, folder) == [1]
    assert len(store.fs.ls(f"{folder}/audit/attempt-001")) == 2  # parts of PART_STEPS lines
    assert PART_STEPS == 100 and latest_record(store, folder)["step"] == 129
    write(store, folder, range(120, 250))  # attempt 2 resumes from the checkpoint of step 120
    assert attempts(store, folder) == [1, 2]
    newest = latest_record(store, folder)
    assert newest["step"] == 249 and newest["attempt"] == 2
    records = read_audit(store, folder)
    assert len(records) == 260 and [r["attempt"] for r in records[:130]] == [1] * 130

    report = check_audit(records, 250, planned)
    assert report.exactly_once and report.reexecuted_steps == 10 and report.attempts == [1, 2]
    assert [r["step"] for r in report.final] == list(range(250)) and report.final[125]["attempt"] == 2


def test_the_check_names_missing_steps_wrong_batches_and_disorder(tmp_path):
    store = Store(str(tmp_path))
    folder = store.path("train", "fp")
    write(store, folder, range(0, 50), hashes=lambda step: "other" if step == 7 else planned(step))
    report = check_audit(read_audit(store, folder), 60, planned)
    assert not report.exactly_once
    assert report.missing_steps == list(range(50, 60)) and report.wrong_batches == [7]
    assert report.summary()["exactly_once"] is False

    shuffled = Store(str(tmp_path / "b"))
    other = shuffled.path("train", "fp")
    write(shuffled, other, [0, 1, 3, 2, 4])
    report = check_audit(read_audit(shuffled, other), 5, planned)
    assert report.out_of_order and not report.missing_steps and not report.exactly_once


def test_a_reader_on_s3_sees_attempts_written_after_it_last_looked(s3_endpoint):
    """A driver polls the newest record while Ray Train restarts its workers: the attempt the new
    workers write must be in the final read (s3fs caches listings; the audit must not use them)."""
    import uuid

    from ..conftest import BUCKET

    folder_url = f"s3://{BUCKET}/audit-{uuid.uuid4().hex[:8]}"
    reader = Store(folder_url, s3_endpoint)
    write(reader, reader.path("train"), range(0, 4))
    assert latest_record(reader, reader.path("train"))["step"] == 3  # the listing is now cached
    import json

    import boto3

    lines = "".join(json.dumps({"step": step, "attempt": 2, "batch_hash": planned(step), "lr": 1e-3, "loss": 2.0, "tokens": 512,
                                "seconds": 0.1}) + "\n" for step in range(8))
    key = f"{reader.path('train').split('/', 1)[1]}/audit/attempt-002/part-000000000.jsonl"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").put_object(Bucket=BUCKET, Key=key, Body=lines.encode())
    assert attempts(reader, reader.path("train")) == [1, 2]
    assert latest_record(reader, reader.path("train"))["attempt"] == 2
    assert len(read_audit(reader, reader.path("train"))) == 12
