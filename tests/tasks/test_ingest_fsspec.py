"""Corpus sources on any fsspec filesystem: listed and re-joined with their protocol, read with
their own ``storage_options`` (``${VAR}`` expanded where they are read), ingested exactly as the
same files on a local path; the store's options from ``TRECFLOW_STORE_OPTIONS``; storage options
never shown or logged verbatim."""

from __future__ import annotations

import gzip
import json
import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from tasks.ingest import IngestError, ingest_file, list_source, run_ingest, source_options
from trecflow.recipe import CorpusSection, RecipeError, SourceSection, parse_recipe, read_yaml
from trecflow.settings import SettingsError
from trecflow.store import Store
from trecflow.tracking import flatten

from ..conftest import BUCKET, CONFIGS, QUIET, environment


def documents(test_corpus, count: int = 120) -> bytes:
    """JSON lines of real text (the test corpus's hq source) with an exact duplicate and an empty
    document, as a source would hold them."""
    lines = test_corpus["stdlib-docs"].read_text().splitlines()[:count]
    return ("\n".join([*lines, lines[3], json.dumps({"text": "   "})]) + "\n").encode()


def pass_one_rows(source: SourceSection, path: str, store_path: Path) -> tuple[dict, list[dict]]:
    """`ingest_file` (the pass that reads a source) run here on one file: its counts and the rows
    it wrote to the hash partitions, sorted by doc_id."""
    counts = ingest_file(source, 0, path, 0, str(store_path), None, 4, 1024**2)
    store = Store(str(store_path))
    rows = [row for name in sorted(store.fs.find(store.path("_work"))) for row in pq.read_table(name).to_pylist()]
    return counts, sorted(rows, key=lambda row: row["doc_id"])


def test_a_memory_source_ingests_like_a_local_file(test_corpus, tmp_path):
    data = documents(test_corpus)
    local = tmp_path / "docs" / "part-0.jsonl"
    local.parent.mkdir()
    local.write_bytes(data)
    memory = fsspec.filesystem("memory")
    root = f"/fsspec-{uuid.uuid4().hex[:8]}"
    memory.pipe(f"{root}/docs/part-0.jsonl", data)
    memory.pipe(f"{root}/docs/nested/part-1.jsonl.gz", gzip.compress(data))  # compressed: read through fsspec, not datasets
    memory.pipe(f"{root}/docs/README.md", b"not a source file")

    on_disk = list_source(SourceSection(name="docs", path=str(local.parent)))
    listed = list_source(SourceSection(name="docs", path=f"memory://{root}/docs"))
    assert on_disk.files == (str(local),)  # local paths stay plain
    assert listed.files == (f"memory://{root}/docs/nested/part-1.jsonl.gz", f"memory://{root}/docs/part-0.jsonl")
    globbed = list_source(SourceSection(name="docs", path=f"memory://{root}/docs/*.jsonl"))
    assert globbed.files == (f"memory://{root}/docs/part-0.jsonl",)

    source = SourceSection(name="docs", path=f"memory://{root}/docs")
    expected_counts, expected = pass_one_rows(SourceSection(name="docs", path=str(local)), str(local), tmp_path / "local-store")
    assert expected_counts == {"read": 122, "empty": 1, "kept": 121} and len(expected) == 121
    for number, url in enumerate(listed.files):
        counts, rows = pass_one_rows(source, url, tmp_path / f"memory-store-{number}")
        assert counts == expected_counts
        assert rows == expected  # the same documents, the same doc ids, the same partitions' rows

    with pytest.raises(IngestError, match=rf"corpus source docs: no jsonl files at memory://{root}/nowhere"):
        list_source(SourceSection(name="docs", path=f"memory://{root}/nowhere"))
    with pytest.raises(IngestError, match=r"corpus source web: cannot open nope://bucket/x \(ValueError: Protocol not known: nope\)"):
        list_source(SourceSection(name="web", path="nope://bucket/x"))


def test_url_sources_and_their_storage_options_ingest_through_ray(s3_endpoint, test_corpus, tmp_path):
    """A ``file://`` URL and an S3 source whose endpoint and credentials come only from its
    ``storage_options`` (the store has no endpoint) give the shards a local ingest gives."""
    data = documents(test_corpus, 60)
    lq = "\n".join(test_corpus["debian-copyright"].read_text().splitlines()[:40]).encode() + b"\n"
    (tmp_path / "hq.jsonl").write_bytes(data)
    (tmp_path / "lq.jsonl").write_bytes(lq)
    prefix = f"{BUCKET}/sources-{uuid.uuid4().hex[:8]}"
    s3 = Store(f"s3://{prefix}", s3_endpoint).fs
    s3.pipe(f"{prefix}/lq/part-0.jsonl", lq)
    options = {"key": "${AWS_ACCESS_KEY_ID}", "secret": "${AWS_SECRET_ACCESS_KEY}", "client_kwargs": {"endpoint_url": s3_endpoint}}
    settings = {"partitions": 2, "splits": {"eval": 0.1, "cpt": 0.9}}
    local = CorpusSection(sources=[{"name": "hq", "path": str(tmp_path / "hq.jsonl")}, {"name": "lq", "path": str(tmp_path / "lq.jsonl")}], **settings)
    urls = CorpusSection(
        sources=[{"name": "hq", "path": f"file://{tmp_path}/hq.jsonl"},
                 {"name": "lq", "path": f"s3://{prefix}/lq/", "storage_options": options}],
        **settings,
    )
    assert list_source(urls.sources[1]).files == (f"s3://{prefix}/lq/part-0.jsonl",)
    expected = run_ingest(local, Store(str(tmp_path / "local-store")), **QUIET)
    ingested = run_ingest(urls, Store(str(tmp_path / "url-store")), **QUIET)
    assert ingested.summary.as_json()["sources"] == expected.summary.as_json()["sources"]
    rows = shard_rows(ingested, tmp_path / "url-store")
    assert rows == shard_rows(expected, tmp_path / "local-store")
    assert {source for _, source, _ in rows} == {"hq", "lq"} and len(rows) == ingested.summary.documents


def shard_rows(result, store_path: Path) -> list[tuple[str, str, str]]:
    """(doc_id, source, split) of every document in an ingest output's shards, sorted."""
    output = Store(str(store_path)).output("ingest", result.fingerprint)
    return sorted((row["doc_id"], row["source"], row["split"]) for name in result.summary.shards
                  for row in pq.read_table(output.file_path(name), columns=["doc_id", "source", "split"]).to_pylist())


def test_storage_options_expand_variables_where_read_and_merge_with_the_endpoint(monkeypatch):
    monkeypatch.setenv("SOURCE_TOKEN", "s3cr3t")
    source = SourceSection(name="web", path="s3://bucket/web/", storage_options={"secret": "${SOURCE_TOKEN}", "client_kwargs": {"region_name": "eu-west-1"}})
    assert source_options(source, "s3://bucket/web/a.jsonl", "http://127.0.0.1:9000") == {
        "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9000", "region_name": "eu-west-1"}
    }
    assert source.storage_options["secret"] == "${SOURCE_TOKEN}"  # the recipe keeps the reference, not the secret
    own = SourceSection(name="web", path="s3://bucket/web/", storage_options={"client_kwargs": {"endpoint_url": "http://other:9000"}})
    assert source_options(own, "s3://bucket/web/a.jsonl", "http://127.0.0.1:9000")["client_kwargs"]["endpoint_url"] == "http://other:9000"
    assert source_options(source, "/data/web/a.jsonl", "http://127.0.0.1:9000") == {}  # a local file takes none
    assert source_options(SourceSection(name="h", path="hf://datasets/x/y"), "hf://datasets/x/y/a.parquet", "http://e") == {}


def test_the_store_takes_its_options_from_the_environment(s3_endpoint):
    prefix = f"{BUCKET}/store-options-{uuid.uuid4().hex[:8]}"
    with environment({"TRECFLOW_STORE_OPTIONS": json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})}):
        store = Store(f"s3://{prefix}")  # no endpoint_url: it comes from TRECFLOW_STORE_OPTIONS
        output = store.output("ingest", "0123456789abcdef")
        output.write_bytes("a.txt", b"hello")
        output.commit()
        assert Store(f"s3://{prefix}").output("ingest", "0123456789abcdef").read_bytes("a.txt") == b"hello"
        assert Store(f"s3://{prefix}", "http://ignored:1").storage_options()["client_kwargs"]["endpoint_url"] == s3_endpoint
        assert Store("/tmp/local-store").storage_options() == {}  # a local folder takes none
    with environment({"TRECFLOW_STORE_OPTIONS": '{"secret": "abc", oops}'}):
        with pytest.raises(SettingsError) as error:
            Store(f"s3://{prefix}")
    assert str(error.value).startswith("TRECFLOW_STORE_OPTIONS: not valid JSON") and "abc" not in str(error.value)
    with environment({"TRECFLOW_STORE_OPTIONS": '["a"]'}):
        with pytest.raises(SettingsError, match="TRECFLOW_STORE_OPTIONS: must be a JSON object of fsspec options, got a list"):
            Store(f"s3://{prefix}")


def test_storage_options_are_redacted_for_mlflow_and_never_echoed():
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["corpus"]["sources"][0]["storage_options"] = {"key": "${AWS_ACCESS_KEY_ID}", "secret": "s3cr3t-value",
                                                      "client_kwargs": {"endpoint_url": "http://minio:9000"}}
    recipe = parse_recipe(data)
    params = flatten(recipe.redacted_dump())
    assert "s3cr3t-value" not in json.dumps(params) and "http://minio:9000" not in json.dumps(params)
    assert "${AWS_ACCESS_KEY_ID}" in str(params["corpus.sources"])  # a reference names the secret without holding it
    assert recipe.model_dump(mode="json")["corpus"]["sources"][0]["storage_options"]["secret"] == "s3cr3t-value"  # jobs still get it
    data["corpus"]["sources"][0]["storage_options"] = "secret=s3cr3t-value"
    with pytest.raises(RecipeError) as error:
        parse_recipe(data, source="r.yaml")
    assert str(error.value) == "r.yaml: corpus.sources.0.storage_options: must be a mapping of fsspec options, got a str"
