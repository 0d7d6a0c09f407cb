"""What is verified when a committed output is read, so that a corrupted store is refused in one
line naming the file instead of being read silently.

- `verify_output`: before a committed output is reused (`trecflow.runner`), its manifest must
  parse, name this stage and fingerprint (a foreign folder is refused), and every file it lists
  must exist with the recorded size (a truncated or deleted file is refused). Cost: one GET of the
  manifest and one recursive listing of the folder (one LIST request per 1,000 objects on S3, a
  directory walk locally); no data byte is read.
- Checksums: files read whole through `StageOutput.read_bytes` (summaries, ``index.json``, the
  catalog arrays, the predicted curve, ...) are hashed against the manifest on every read; the
  sample index's chunks are hashed on first use (`training.sample_index.SampleIndex`).
  Large data written by workers (shards, packed tokens, checkpoints) carry sizes only: hashing
  them would reread terabytes at 900B tokens.
- `read_parquet` / `open_parquet`: a parquet file that cannot be decoded (a truncated footer,
  a corrupt page) is a `StoreError` naming it, not a pyarrow traceback.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from trecflow.store import MANIFEST, StageOutput, Store, StoreError


def _force_hint(output: StageOutput) -> str:
    return f"remove the folder or rerun with --force {output.stage}"


def verify_output(output: StageOutput) -> dict[str, Any]:
    """The manifest of a committed output after checking that it belongs here and that every file
    it lists is present with its recorded size; StoreError naming the first file that is not."""
    fs = output.store.fs
    manifest_uri = output.file_uri(MANIFEST)
    try:
        raw = fs.cat_file(output.file_path(MANIFEST))
    except FileNotFoundError:
        raise StoreError(f"{output.uri}: no {MANIFEST}; the {output.stage} output is incomplete") from None
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        owner = (manifest["stage"], manifest["fingerprint"])
    except (ValueError, KeyError, TypeError) as error:
        raise StoreError(f"{manifest_uri}: unreadable manifest ({type(error).__name__}: {error}); {_force_hint(output)}") from None
    if owner != (output.stage, output.fingerprint):
        raise StoreError(f"{manifest_uri}: the manifest of {owner[0]} {owner[1]}, not of {output.stage} {output.fingerprint} "
                         f"(a foreign folder); {_force_hint(output)}")
    prefix = output.path.rstrip("/") + "/"
    sizes = {path[len(prefix):]: info.get("size") for path, info in fs.find(output.path, detail=True).items() if path.startswith(prefix)}
    for name, entry in files.items():
        if name not in sizes:
            raise StoreError(f"{output.file_uri(name)}: listed in the manifest but missing; {_force_hint(output)}")
        if "bytes" in entry and sizes[name] != entry["bytes"]:
            raise StoreError(f"{output.file_uri(name)}: {sizes[name]:,} bytes, the manifest records {entry['bytes']:,} "
                             f"(truncated or overwritten); {_force_hint(output)}")
    return manifest


def store_uri(store: Store, path: str) -> str:
    """The URL of a filesystem path inside ``store`` (for messages)."""
    root = store.root.rstrip("/")
    return store.url + path[len(root):] if path.startswith(root) else path


def read_parquet(store: Store, path: str, columns: Sequence[str] | None = None) -> pa.Table:
    """A whole parquet file of the store; StoreError naming it when it cannot be decoded."""
    with open_parquet(store, path) as parquet:
        return parquet.read(columns=columns)


@contextlib.contextmanager
def open_parquet(store: Store, path: str) -> Iterator[pq.ParquetFile]:
    """A parquet file of the store, opened for reading (e.g. ``iter_batches``); a decoding error
    inside the block (a truncated file, a corrupt page) is a StoreError naming the file."""
    with store.fs.open(path, "rb") as handle:
        try:
            yield pq.ParquetFile(handle)
        except pa.ArrowException as error:
            raise StoreError(f"{store_uri(store, path)}: not a readable parquet file (truncated or corrupt): {error}") from None
