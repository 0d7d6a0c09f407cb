"""Ingest reads compressed JSON lines from S3 (which `datasets` cannot: its decompressing
filesystem passes HTTP client options that S3's client refuses)."""

from __future__ import annotations

import gzip
import json
import uuid

import pytest

from tasks.ingest import IngestError, iter_texts, list_source
from trecflow.recipe import SourceSection
from trecflow.store import Store

from ..conftest import BUCKET


def test_gzipped_jsonl_in_s3_is_read_in_order_and_bad_lines_are_named(s3_endpoint):
    prefix = f"{BUCKET}/corpus-{uuid.uuid4().hex[:8]}"
    store = Store(f"s3://{prefix}", s3_endpoint)
    texts = [f"document {number} " * 3 for number in range(2500)]
    store.fs.pipe(f"{prefix}/a.jsonl.gz", gzip.compress("".join(json.dumps({"text": t}) + "\n" for t in texts).encode()))
    source = SourceSection(name="web", path=f"s3://{prefix}/*.jsonl.gz")
    (path,) = list_source(source, s3_endpoint).files
    batches = list(iter_texts(source, f"s3://{path}", s3_endpoint))
    assert [text for batch in batches for text in batch] == texts and len(batches) > 1

    # in a folder of its own: the listing above is cached by the (shared) S3 filesystem, and a file
    # written after it would be looked up in that cache
    store.fs.pipe(f"{prefix}-bad/b.jsonl.gz", gzip.compress(b'{"text": "fine"}\n{"body": "no text"}\n'))
    with pytest.raises(IngestError, match=r"corpus source web: s3://.*/b.jsonl.gz line 2 has no text field 'text'"):
        list(iter_texts(source, f"s3://{prefix}-bad/b.jsonl.gz", s3_endpoint))
