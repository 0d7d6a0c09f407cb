"""Stage 2 logic without Prefect: the stored curve, reuse, forced reruns and identical results on
a local folder and on S3."""

from __future__ import annotations

import io
import json
import uuid

import numpy as np
import pyarrow.parquet as pq

from tasks.predict import CURVE_FILE, PLOT_FILE, STAGE, SUMMARY_FILE, predict_fingerprint, read_curve, run_predict
from trecflow.recipe import load_recipe
from trecflow.store import MANIFEST, Store
from training.trec import predict

from ..conftest import BUCKET, CONFIGS

RECIPE = load_recipe(CONFIGS / "test.yaml")


def test_curve_file_holds_every_step(tmp_path):
    store = Store(str(tmp_path / "store"))
    result = run_predict(RECIPE, store)
    table = read_curve(store, result.fingerprint)
    assert table.column_names == ["step", "fraction", "lr", "c", "trec_pred"]
    expected = predict(RECIPE)
    assert table.num_rows == RECIPE.steps
    np.testing.assert_array_equal(table["step"].to_numpy(), np.arange(RECIPE.steps))
    np.testing.assert_array_equal(table["fraction"].to_numpy(), np.arange(1, RECIPE.steps + 1) / RECIPE.steps)
    np.testing.assert_array_equal(table["trec_pred"].to_numpy(), expected.trec)
    np.testing.assert_array_equal(table["lr"].to_numpy(), expected.lrs)
    assert result.summary.valley_step == expected.valley_step
    assert store.output(STAGE, result.fingerprint).read_bytes(PLOT_FILE).startswith(b"\x89PNG")


def test_reuse_force_and_partial_outputs(tmp_path):
    store = Store(str(tmp_path / "store"))
    first = run_predict(RECIPE, store)
    assert not first.reused
    output = store.output(STAGE, first.fingerprint)
    created = output.manifest()["created_unix"]
    again = run_predict(RECIPE, store)
    assert again.reused and again.summary == first.summary
    assert output.manifest()["created_unix"] == created
    forced = run_predict(RECIPE, store, force=True)
    assert not forced.reused and output.manifest()["created_unix"] > created
    # An attempt that died before its manifest leaves a folder that does not count.
    store.fs.rm(output.file_path(MANIFEST))
    store.fs.pipe_file(output.file_path("stray.tmp"), b"half")
    rerun = run_predict(RECIPE, store)
    assert not rerun.reused
    assert not store.fs.exists(output.file_path("stray.tmp"))
    assert set(output.manifest()["files"]) == {CURVE_FILE, SUMMARY_FILE, PLOT_FILE}


def test_fingerprint_follows_what_the_prediction_reads():
    data = RECIPE.model_dump()
    changed = RECIPE.model_validate({**data, "optimizer": {**data["optimizer"], "peak_lr": 1e-3}})
    renamed = RECIPE.model_validate({**data, "name": "other"})
    assert predict_fingerprint(changed) != predict_fingerprint(RECIPE)
    assert predict_fingerprint(renamed) == predict_fingerprint(RECIPE)  # the name is not an input


def test_local_and_s3_outputs_are_identical(tmp_path, s3_endpoint):
    local = Store(str(tmp_path / "store"))
    remote = Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)
    a, b = run_predict(RECIPE, local), run_predict(RECIPE, remote)
    assert a.fingerprint == b.fingerprint and a.summary == b.summary
    files_a = local.output(STAGE, a.fingerprint).manifest()["files"]
    files_b = remote.output(STAGE, b.fingerprint).manifest()["files"]
    assert files_a[CURVE_FILE] == files_b[CURVE_FILE]  # byte-identical curve (same sha256)
    table = pq.read_table(io.BytesIO(remote.output(STAGE, b.fingerprint).read_bytes(CURVE_FILE)))
    assert table.equals(read_curve(local, a.fingerprint))
    assert json.loads(remote.output(STAGE, b.fingerprint).read_bytes(SUMMARY_FILE))["recipe"] == "test"
