"""The store on a local folder and on an S3 protocol server (moto on loopback) behaves the same:
data first, manifest last; no manifest means no output; checksums catch corruption."""

from __future__ import annotations

import json
import uuid

import pytest

from trecflow.store import MANIFEST, Store, StoreError

from ..conftest import BUCKET


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> Store:
    if request.param == "local":
        return Store(str(tmp_path / "store"))
    endpoint = request.getfixturevalue("s3_endpoint")
    return Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=endpoint)


def test_output_exists_only_after_commit(store):
    output = store.output("predict", "abc123")
    assert not output.exists()
    output.write_bytes("a.bin", b"payload")
    assert not output.exists()  # data without a manifest does not exist
    with pytest.raises(StoreError, match="incomplete"):
        output.manifest()
    manifest = output.commit(counts={"rows": 1})
    assert output.exists()
    assert manifest["files"]["a.bin"]["bytes"] == 7
    assert json.loads(store.fs.cat_file(output.file_path(MANIFEST)))["counts"] == {"rows": 1}
    assert output.read_bytes("a.bin") == b"payload"
    assert output.uri == f"{store.url}/predict/abc123"


def test_invalidate_removes_manifest_and_files(store):
    output = store.output("predict", "def456")
    output.write_bytes("a.bin", b"x")
    output.commit()
    output.invalidate()
    assert not output.exists()
    assert not store.fs.exists(output.file_path("a.bin"))


def test_corrupt_file_is_detected(store):
    output = store.output("predict", "0badc0de")
    output.write_bytes("a.bin", b"original")
    output.commit()
    store.fs.pipe_file(output.file_path("a.bin"), b"tampered")
    with pytest.raises(StoreError, match="checksum"):
        output.read_bytes("a.bin")
    with pytest.raises(StoreError, match="not in the manifest"):
        output.read_bytes("other.bin")


def test_manifest_name_is_reserved(store):
    with pytest.raises(ValueError):
        store.output("predict", "x").write_bytes(MANIFEST, b"{}")


def test_storage_options_are_fresh_each_call(s3_endpoint):
    store = Store(f"s3://{BUCKET}/p", endpoint_url=s3_endpoint)
    options = store.storage_options()
    options["hf"] = True  # datasets mutates the dict it is given
    assert "hf" not in store.storage_options()


def test_a_listing_always_asks_s3_not_a_memory_of_an_earlier_one(s3_endpoint):
    """Another writer (a process, or a client with other options) adds and removes parts between
    two listings in this process: the second listing, ``glob`` and ``exists`` see both changes.
    (With s3fs's listing cache, once a folder had been listed they answered from memory: a rerun
    "kept" a part that was gone, and read it into a 404.)"""
    import boto3

    store = Store(f"s3://{BUCKET}/listing-{uuid.uuid4().hex[:8]}", endpoint_url=s3_endpoint)
    output = store.output("reevaluate", "fp")
    for name in ("steps/part-1.parquet", "steps/part-2.parquet"):
        output.write_bytes(name, b"x")
    folder = output.file_path("steps")
    assert [path.rsplit("/", 1)[1] for path in store.fs.ls(folder, detail=False)] == ["part-1.parquet", "part-2.parquet"]
    other = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    key = folder.removeprefix(f"{BUCKET}/")
    other.delete_object(Bucket=BUCKET, Key=f"{key}/part-2.parquet")
    other.put_object(Bucket=BUCKET, Key=f"{key}/part-3.parquet", Body=b"y")
    assert [path.rsplit("/", 1)[1] for path in store.fs.glob(f"{folder}/part-*.parquet")] == ["part-1.parquet", "part-3.parquet"]
    assert not store.fs.exists(f"{folder}/part-2.parquet") and store.fs.exists(f"{folder}/part-3.parquet")
    assert [path.rsplit("/", 1)[1] for path in store.fs.ls(folder, detail=False)] == ["part-1.parquet", "part-3.parquet"]


def test_local_urls_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Store("relative/store/").url == str(tmp_path / "relative" / "store")
    assert Store(f"file://{tmp_path}/x").url == str(tmp_path / "x")
