"""A corrupted store is never read silently: each corruption is refused in one line naming the file,
or the output is computed again (issue 16, point 3).

Every test corrupts a copy of the session's `trainable` store (scores, tokenizer, packed
sequences, prediction and the uniform index), never the shared one.
"""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.pack import run_pack
from tasks.place import run_place
from tasks.reevaluate import kept_parts, read_parts
from trecflow.lease import LEASE_PREFIX, Lease, Owner
from trecflow.store import MANIFEST, Store, StoreError
from training.sample_index import SampleIndex, chunk_name

QUIET = {"progress": lambda line: None}
COPIED_STAGES = ("score", "tokenizer", "pack", "predict", "place")


@pytest.fixture
def copy(trainable, tmp_path):
    """The `trainable` store's upstream stages copied into a store of this test's own."""
    source = trainable["store"]
    for stage in COPIED_STAGES:
        shutil.copytree(source.path(stage), tmp_path / "store" / stage)
    return {**trainable, "store": Store(str(tmp_path / "store"))}


def place_again(copy, force: bool = False):
    return run_place(copy["recipe"], "uniform", copy["store"], copy["pack"].fingerprint, copy["predict"].fingerprint, force=force, **QUIET)


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


def index_files(store: Store, fingerprint: str) -> dict[str, bytes]:
    output = store.output("place", fingerprint)
    return {name: store.fs.cat_file(output.file_path(name)) for name in output.manifest()["files"] if name != "placement.png"}


def test_a_flipped_byte_in_an_index_chunk_is_refused_naming_the_chunk(copy):
    store, fingerprint = copy["store"], copy["place"].fingerprint
    path = store.output("place", fingerprint).file_path(chunk_name(0))
    data = bytearray(store.fs.cat_file(path))
    data[-5] ^= 0x01  # one bit of one sequence id: a valid array, a different batch
    store.fs.pipe_file(path, bytes(data))
    index = SampleIndex(store, fingerprint, expected=copy["expected"])  # sizes agree: opening succeeds
    for read in (lambda: index.batch(index.steps - 1), lambda: index.batches(np.arange(3))):
        with pytest.raises(StoreError) as error:
            read()
        assert one_line(error) == f"{store.url}/place/{fingerprint}/{chunk_name(0)}: checksum differs from the manifest (corrupt file)"


@pytest.mark.parametrize("stage", ["score", "pack"])
def test_a_truncated_data_file_is_refused_before_the_next_stage_runs(copy, stage):
    """A score shard (read by packing) or a packed token file (read by placement and training),
    cut short: the stage reusing that output refuses it, naming the file, before any work."""
    store = copy["store"]
    fingerprint = copy[stage].fingerprint
    output = store.output(stage, fingerprint)
    name = next(name for name, entry in output.manifest()["files"].items() if name.endswith((".parquet", ".npy")) and entry["bytes"] > 100
                and (stage != "pack" or name.startswith("tokens/")))
    recorded = output.manifest()["files"][name]["bytes"]
    store.fs.pipe_file(output.file_path(name), store.fs.cat_file(output.file_path(name))[: recorded // 2])
    shutil.rmtree(store.output("place", copy["place"].fingerprint).path)
    with pytest.raises(StoreError) as error:
        if stage == "score":
            run_pack(copy["recipe"], store, fingerprint, copy["tokenizer"].fingerprint, force=True, **QUIET)
        else:
            place_again(copy)
    assert one_line(error).startswith(f"{output.file_uri(name)}: {recorded // 2:,} bytes, the manifest records {recorded:,} (truncated")
    assert store.output("pack", copy["pack"].fingerprint).exists()  # refused before the forced pack cleared anything
    assert not store.fs.exists(store.output("place", copy["place"].fingerprint).path)  # nor was an index computed


def test_a_truncated_reevaluation_part_is_evaluated_again_and_never_read(tmp_path):
    """Parts an interrupted re-evaluation keeps: one cut short is removed (its steps run again);
    reading the parts names one that cannot be decoded."""
    store = Store(str(tmp_path / "store"))
    folder = store.path("reevaluate", "f" * 16)
    parts = {}
    for first in (0, 4):
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.table({"step": np.arange(first, first + 4), "loss": np.linspace(2.0, 1.0, 4)}), buffer)
        parts[f"part-{first:09d}.parquet"] = buffer.getvalue().to_pybytes()
    for name, data in parts.items():
        store.put_atomic(f"{folder}/steps/{name}", data)
    assert read_parts(store, folder)["step"].to_pylist() == list(range(8))
    cut = f"{folder}/steps/part-000000004.parquet"
    store.fs.pipe_file(cut, parts["part-000000004.parquet"][:-10])
    with pytest.raises(StoreError) as error:
        read_parts(store, folder)
    assert one_line(error).startswith(f"{store.url}/reevaluate/{'f' * 16}/steps/part-000000004.parquet: not a readable parquet file")
    notes: list[str] = []
    assert kept_parts(store, folder, notes.append) == {"part-000000000.parquet"}
    assert not store.fs.exists(cut) and len(notes) == 1 and "part-000000004.parquet" in notes[0] and "evaluating its steps again" in notes[0]


def test_a_deleted_manifest_means_the_output_is_computed_again(copy):
    store, fingerprint = copy["store"], copy["place"].fingerprint
    before = index_files(store, fingerprint)
    store.fs.rm(store.output("place", fingerprint).file_path(MANIFEST))
    with pytest.raises(StoreError) as error:
        SampleIndex(store, fingerprint)  # a reader refuses the incomplete output
    assert one_line(error) == f"{store.url}/place/{fingerprint}: no {MANIFEST}; the place output is incomplete"
    result = place_again(copy)
    assert not result.reused and index_files(store, fingerprint) == before


def test_files_without_a_manifest_are_cleared_and_computed_again(copy):
    store, fingerprint = copy["store"], copy["place"].fingerprint
    before = index_files(store, fingerprint)
    output = store.output("place", fingerprint)
    store.fs.rm(output.file_path(MANIFEST))
    store.fs.pipe_file(output.file_path("foreign.bin"), b"not ours")
    store.fs.pipe_file(output.file_path(chunk_name(0)), b"\x93NUMPY foreign")
    result = place_again(copy)
    assert not result.reused and index_files(store, fingerprint) == before
    assert not store.fs.exists(output.file_path("foreign.bin"))


@pytest.mark.parametrize("foreign", ["another stage", "another fingerprint", "unreadable"])
def test_a_foreign_manifest_is_refused_naming_it_and_force_computes_again(copy, foreign):
    store, fingerprint = copy["store"], copy["place"].fingerprint
    before = index_files(store, fingerprint)
    place = store.output("place", fingerprint).path
    shutil.rmtree(place)
    if foreign == "another stage":
        shutil.copytree(store.output("tokenizer", copy["tokenizer"].fingerprint).path, place)
    else:
        shutil.copytree(store.output("pack", copy["pack"].fingerprint).path, place)
    manifest = f"{place}/{MANIFEST}"
    if foreign == "another fingerprint":
        data = json.loads(store.fs.cat_file(manifest))
        store.fs.pipe_file(manifest, json.dumps({**data, "stage": "place"}).encode())
    elif foreign == "unreadable":
        store.fs.pipe_file(manifest, b'{"stage": "place", "fingerp')
    with pytest.raises(StoreError) as error:
        place_again(copy)
    owner = {"another stage": f"tokenizer {copy['tokenizer'].fingerprint}", "another fingerprint": f"place {copy['pack'].fingerprint}"}
    expected = (f"{store.url}/place/{fingerprint}/{MANIFEST}: "
                + (f"the manifest of {owner[foreign]}, not of place {fingerprint} (a foreign folder)" if foreign in owner else "unreadable manifest"))
    assert one_line(error).startswith(expected) and one_line(error).endswith("remove the folder or rerun with --force place")
    result = place_again(copy, force=True)
    assert not result.reused and index_files(store, fingerprint) == before


@pytest.mark.parametrize("lease", ["expired", "unreadable"])
def test_a_stale_lease_is_taken_over_at_once(copy, lease):
    """A lease left by a runner that died (expired, never released) or a lease file that cannot be
    read: the next runner takes the next generation and computes, without waiting."""
    store, fingerprint = copy["store"], copy["place"].fingerprint
    before = index_files(store, fingerprint)
    output = store.output("place", fingerprint)
    shutil.rmtree(output.path)
    dead = Owner("process", "elsewhere:4242:dead", "elsewhere", 4242)
    record = {"owner": dead.__dict__, "expires_unix": time.time() - 1, "released": False}
    store.fs.makedirs(output.path, exist_ok=True)
    store.fs.pipe_file(output.file_path(f"{LEASE_PREFIX}000001.json"), json.dumps(record).encode() if lease == "expired" else b'{"owner": {"ki')
    began = time.monotonic()
    result = place_again(copy)
    assert not result.reused and index_files(store, fingerprint) == before
    assert time.monotonic() - began < 30  # a live lease would have had it wait for the 120 s expiry
    current = Lease(output, Owner.this_process()).current()
    assert current.generation == 2 and current.released and current.owner.host != "elsewhere"
