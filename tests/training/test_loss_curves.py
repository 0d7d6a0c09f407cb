"""The store's catalog of training runs: only finished outputs with a run.json, on S3 too."""

from __future__ import annotations

import json
import uuid

from trecflow.store import MANIFEST, Store
from training import loss_curves
from training.loss_curves import RUN_FILE, catalog

from ..conftest import BUCKET


def test_the_catalog_lists_finished_described_runs_in_batches(s3_endpoint, monkeypatch):
    store = Store(f"s3://{BUCKET}/catalog-{uuid.uuid4().hex[:8]}", s3_endpoint)
    runs = {"a1": (True, True), "b2": (True, False), "c3": (False, True), "d4": (True, True), "e5": (True, True)}
    for fingerprint, (described, finished) in runs.items():
        if described:
            store.fs.pipe_file(store.path("train", fingerprint, RUN_FILE), json.dumps({"recipe": fingerprint}).encode())
        if finished:
            store.fs.pipe_file(store.path("train", fingerprint, MANIFEST), b"{}")
    monkeypatch.setattr(loss_curves, "CATALOG_BATCH", 2)  # two batched reads for the three runs
    assert list(catalog(store)) == [(name, {"recipe": name}) for name in ("a1", "d4", "e5")]
