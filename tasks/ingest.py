"""Stage 1a, ingest: corpus sources -> deduplicated, split, normalized parquet shards.

Passes of Ray tasks (a local Ray, or a cluster through ``RAY_ADDRESS``); memory is bounded by
batch and buffer sizes and by partitions, never by the corpus:

1. `ingest_file`, one task per input file: reads it with Hugging Face ``datasets`` (streaming),
   checks it, and gives every non-empty document ``doc_id`` = SHA-256 of its UTF-8 text (32 hex
   digits) and length fields. Rows go to hash partition ``int(doc_id[:8], 16) % corpus.partitions``;
   every ``corpus.buffer_mb`` of text, one parquet file per partition is written under ``_work/``.
2. `dedup_partition`, one task per partition: drops exact duplicates (equal texts share a doc_id
   and so a partition; the first occurrence by source order, then file order, is kept). Without
   near-duplicate removal it writes the shards (step 5) at once. With it, it writes the unique rows
   to ``_work/unique/`` and signs each document (`tasks.near_dedup`: MinHash of word shingles);
   each band of a signature becomes a band row (band, key, doc_id, source rank, sketch) in band
   partition ``key % corpus.partitions`` under ``_work/bands/``.
3. `bucket_partition`, one task per band partition: documents sharing a (band, key) bucket are
   candidates; a member whose estimated Jaccard similarity with its bucket's representative (first
   by source rank, then doc_id) reaches ``near_duplicates.threshold`` gives an edge
   (``_work/edges/``).
4. `cluster_near_duplicates`, one task: the connected components of all edges; of each, the document
   of the earliest source (then smallest doc_id) is kept, the others are written per partition to
   ``_work/removed/``. Its memory grows with the number of near-duplicate documents only (the
   documents with an edge), not with the corpus.
5. `write_partition`, one task per partition: the unique rows less the removed ones; assigns the
   split from the doc_id hash (``int(doc_id[8:16], 16) / 2**32`` against the cumulative shares of
   ``corpus.splits``) and writes ``shards/part-PPPPP-KKK.parquet``.

Sources are local paths or URLs of any installed fsspec protocol (`list_source` lists them and
puts the protocol back with ``fs.unstrip_protocol``), read with the source's ``storage_options``
(`source_options`). Which documents are removed does not depend on ``corpus.partitions`` or on
the order tasks run in.
Output ``<store>/ingest/<fingerprint>/``: ``shards/`` (doc_id, source, text, chars, bytes, words,
split), ``stats.json`` (documents per source and split; dropped documents by reason) and the
manifest last.

Resumable (`IngestStage.resumable`): every task of a pass ends by writing its result as a marker
(`marked_task`: ``_work/read/SSSS-FFFFFF.json`` per input file, ``_work/dedup/pPPPPP.json`` and
``_work/written/pPPPPP.json`` per partition, ``_work/bucket/qQQQQQ.json`` per band partition,
``_work/cluster/clusters.json``), whole and after the files it vouches
for. A later attempt of the same output takes marked results as they are and runs only the
other tasks (a note: ``ingest: read: 3 of 5 files from an earlier attempt``); a file without a
marker is read again and rewrites its partition files (fixed names, flush by flush, the same
content) over whatever a dead attempt left of them. `IngestError` (bad input) removes the whole
partial output. A source's fingerprint hashes its file listing (path, size, mtime or ETag), not
its content; the corpus settings (near-duplicate ones included) are hashed too. Bad input raises
`IngestError` naming the source and file (and line) before any output exists: `check_files` reads
the head of every file first (empty, binary, a bad or over-long JSON line, a parquet schema without
a text column, a truncated compressed file); a problem further into a file is found by pass 1.
``_work/`` is removed at the end, markers first (an attempt killed while removing it never finds a
marker whose work is gone).
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from tasks import near_dedup
from trecflow.fingerprint import fingerprint
from trecflow.progress import Progress, as_progress
from trecflow.recipe import SPLITS, CorpusSection, NearDuplicateSection, SourceSection
from trecflow.settings import expand_options, expand_path, merge_options
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store

STAGE = "ingest"
STAGE_VERSION = 2
READ_BATCH = 1000
EXTENSIONS = {"jsonl": (".jsonl", ".json", ".jsonl.gz", ".json.gz"), "parquet": (".parquet",), "arrow": (".arrow",)}
SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("source", pa.string()),
        ("text", pa.large_string()),
        ("chars", pa.int64()),
        ("bytes", pa.int64()),
        ("words", pa.int64()),
    ]
)


class IngestError(ValueError):
    """Input that cannot be ingested; the message names the source and the file."""


@dataclass(frozen=True)
class Dropped(Summary):
    """Documents dropped: empty (no text), exact duplicates (a later copy of a kept text) and
    near-duplicates (a similar document of an earlier source, or of the same source with a
    smaller doc_id, is kept)."""

    empty: int
    duplicate: int
    near_duplicate: int


@dataclass(frozen=True)
class IngestedSource(Summary):
    """One source's counts: input files, documents read and dropped, and kept documents per split."""

    files: int
    read: int
    dropped_empty: int
    dropped_duplicate: int
    dropped_near_duplicate: int
    splits: Mapping[str, int]
    documents: int


@dataclass(frozen=True)
class IngestSummary(Summary):
    """The ingested corpus: counts per source (in the recipe's order), drops, kept documents and
    the shard files (sorted, relative to the output)."""

    sources: Mapping[str, IngestedSource]
    dropped: Dropped
    documents: int
    shards: tuple[str, ...]


@dataclass(frozen=True)
class SourceFiles:
    """A source and its input files (sorted), with the fingerprint of that listing."""

    source: SourceSection
    files: tuple[str, ...]
    listing_fingerprint: str


def source_options(source: SourceSection, path: str, endpoint_url: str | None) -> dict[str, Any]:
    """fsspec options for reading ``path`` of ``source`` (a fresh dict): for an ``s3://`` path the
    store's endpoint, then the source's ``storage_options`` (``${VAR}`` expanded in this process)
    merged over it; a local path takes none."""
    if not _is_url(path):
        return {}
    options = {"client_kwargs": {"endpoint_url": endpoint_url}} if path.startswith("s3://") and endpoint_url else {}
    return merge_options(options, expand_options(source.storage_options or {}))


def _is_url(path: str) -> bool:
    """Whether ``path`` names a filesystem by protocol (``s3://``, ``memory://``, ``simplecache::...``),
    other than the local one."""
    return ("://" in path or "::" in path) and not path.startswith(("file://", "local://"))


def source_filesystem(source: SourceSection, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path without protocol) of the source's ``path``, any installed fsspec protocol."""
    path = expand_path(source.path)
    try:
        return fsspec.core.url_to_fs(path, **source_options(source, path, endpoint_url))
    except (ImportError, ValueError, TypeError) as error:  # an unknown protocol, its package missing, a bad option
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IngestError(f"corpus source {source.name}: cannot open {path} ({type(error).__name__}: {message})") from None


def _full_url(fs: fsspec.AbstractFileSystem, name: str) -> str:
    """A listed name as a path to read: local paths stay plain, others get their protocol back."""
    return name if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(name)


def list_source(source: SourceSection, endpoint_url: str | None = None) -> SourceFiles:
    """The input files of a source: plain paths when local, else full URLs (``fs.unstrip_protocol``).
    IngestError if the path matches nothing."""
    path = expand_path(source.path)
    fs, target = source_filesystem(source, endpoint_url)
    if source.format == "disk":
        if not fs.isdir(target):
            raise IngestError(f"corpus source {source.name}: {path} is not a saved dataset folder")
        files = [target]
        entries = [fs.info(entry) for entry in sorted(fs.find(target))]
    else:
        if "*" in target:
            files = sorted(fs.glob(target))
        elif fs.isdir(target):
            files = sorted(entry for entry in fs.find(target) if entry.endswith(EXTENSIONS[source.format]))
        elif fs.exists(target):
            files = [target]
        else:
            files = []
        entries = [fs.info(entry) for entry in files]
    if not files:
        raise IngestError(f"corpus source {source.name}: no {source.format} files at {path}")
    listing = [
        [entry["name"], entry.get("size"), str(entry.get("ETag") or entry.get("mtime") or entry.get("LastModified"))]
        for entry in entries
    ]
    return SourceFiles(
        source=source,
        files=tuple(_full_url(fs, name) for name in files),
        listing_fingerprint=fingerprint("source", 1, {"listing": listing, "format": source.format}),
    )


def ingest_fingerprint(corpus: CorpusSection, listings: list[SourceFiles]) -> str:
    config = corpus.model_dump(mode="json", exclude={"sources"})
    sources = [
        {"name": item.source.name, "text_field": item.source.text_field, "listing": item.listing_fingerprint}
        for item in listings
    ]
    return fingerprint(STAGE, STAGE_VERSION, {**config, "sources": sources})


def iter_texts(source: SourceSection, path: str, endpoint_url: str | None = None) -> Iterator[list[Any]]:
    """Batches of raw text values of one input file: JSON lines by `json_lines`, the rest with
    ``datasets`` (streaming)."""
    options = source_options(source, path, endpoint_url)
    try:
        if source.format == "jsonl" and not path.endswith(JSON_DOCUMENTS):
            yield from _jsonl_texts(source, path, options)
            return
        import datasets

        datasets.disable_progress_bars()
        if source.format == "disk":
            dataset = datasets.load_from_disk(path, storage_options=copy.deepcopy(options) or None)
            if source.text_field not in dataset.column_names:
                raise IngestError(
                    f"corpus source {source.name}: {path} has no text field {source.text_field!r} "
                    f"(columns: {', '.join(dataset.column_names)})"
                )
            for batch in dataset.iter(batch_size=READ_BATCH):
                yield batch[source.text_field]
            return
        builder = {"jsonl": "json", "parquet": "parquet", "arrow": "arrow"}[source.format]
        dataset = datasets.load_dataset(
            builder, data_files=[path], split="train", streaming=True, storage_options=copy.deepcopy(options)
        )
        for batch in dataset.iter(batch_size=READ_BATCH):
            if source.text_field not in batch:
                raise IngestError(
                    f"corpus source {source.name}: {path} has no text field {source.text_field!r} "
                    f"(fields: {', '.join(sorted(batch))})"
                )
            yield batch[source.text_field]
    except IngestError:
        raise
    except UnicodeDecodeError:
        raise IngestError(f"corpus source {source.name}: {path} is not valid UTF-8 text") from None
    except Exception as error:  # datasets/pyarrow raise many types for unreadable files
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "utf-8" in message.lower() or "utf8" in message.lower():
            raise IngestError(f"corpus source {source.name}: {path} is not valid UTF-8 text ({message})") from None
        raise IngestError(f"corpus source {source.name}: cannot read {path} ({type(error).__name__}: {message})") from None


JSON_DOCUMENTS = (".json",)  # may hold one JSON array rather than lines: read by ``datasets``


def _jsonl_texts(source: SourceSection, path: str, options: dict[str, Any]) -> Iterator[list[Any]]:
    """Batches of text values of a JSON-lines file (compressed or not, local or at a URL),
    decompressed as it streams, each line checked and bounded (`json_lines`: a bad line is named
    by its number). (``datasets`` opens compressed files with HTTP client options that S3's client
    refuses, numbers rows rather than lines and reads a line of any length whole.)"""
    batch: list[Any] = []
    with fsspec.open(path, "rb", compression="infer", **copy.deepcopy(options)) as handle:
        for _, value in json_lines(source, path, handle):
            batch.append(value)
            if len(batch) == READ_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


READ_BLOCK = 1024**2  # bytes read at a time from a JSON-lines file
MAX_LINE_BYTES = 16 * 1024**2  # a JSON line (one document) longer than this is refused, never read whole
CHECK_BYTES = 64 * 1024  # what `check_file` reads of each file (and at most one longer line) before any work
CHECK_THREADS = 16  # files checked at once (the reads are small; an object store answers each in ms)


def json_lines(source: SourceSection, path: str, handle, stop_after: int | None = None) -> Iterator[tuple[int, Any]]:
    """(line number, text value) of each non-blank line of a binary JSON-lines stream, lines
    numbered as an editor does (from 1). `IngestError` naming the file and line for a line longer
    than `MAX_LINE_BYTES` (never read whole), not UTF-8, not a JSON object, without the text field
    or with a text field that is not text. Stops after about ``stop_after`` bytes when given."""
    where = f"corpus source {source.name}: {path}"
    read = 0
    for number, line in enumerate(_lines(handle, MAX_LINE_BYTES, min(READ_BLOCK, stop_after or READ_BLOCK)), 1):
        if stop_after is not None and read >= stop_after:
            return
        read += len(line)
        if len(line) > MAX_LINE_BYTES:
            raise IngestError(f"{where} line {number}: longer than {MAX_LINE_BYTES // 1024**2} MiB (one document per line)")
        if not line.strip():
            continue
        if b"\x00" in line:
            raise IngestError(f"{where} line {number}: holds a NUL byte, not text (a binary file?)")
        try:
            record = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))  # a byte-order mark may open a file
        except UnicodeDecodeError:
            raise IngestError(f"{where} line {number}: not UTF-8 text (a binary file?)") from None
        except json.JSONDecodeError as error:
            raise IngestError(f"{where} line {number}: not JSON ({error.msg} at column {error.colno})") from None
        if not isinstance(record, dict):
            raise IngestError(f"{where} line {number}: not a JSON object but a {type(record).__name__}")
        if source.text_field not in record:
            raise IngestError(f"{where} line {number} has no text field {source.text_field!r} (fields: {', '.join(sorted(record))})")
        value = record[source.text_field]
        if value is not None and not isinstance(value, str):
            raise IngestError(f"{where} line {number}: field {source.text_field!r} holds {type(value).__name__}, not text")
        yield number, value


def _lines(handle, limit: int, block: int) -> Iterator[bytes]:
    """The lines of a binary stream (newline kept), read ``block`` bytes at a time. A line longer
    than ``limit`` is yielded as its first ``limit + 1`` bytes, and nothing after it: memory stays
    within ``limit + block`` bytes whatever the file holds."""
    buffer = bytearray()
    while True:
        chunk = handle.read(block)
        start = 0
        if chunk:
            buffer.extend(chunk)
            while (end := buffer.find(b"\n", start)) >= 0:
                yield bytes(buffer[start : end + 1])
                start = end + 1
            del buffer[:start]
        if len(buffer) > limit:
            yield bytes(buffer[: limit + 1])
            return
        if not chunk:
            if buffer:
                yield bytes(buffer)
            return


def check_file(source: SourceSection, path: str, endpoint_url: str | None = None) -> None:
    """Refuse a listed input file before any work, in one `IngestError` line naming it (and the
    line): gone since listing, empty, not the source's format, or — within its first `CHECK_BYTES`
    (decompressed) — a bad JSON line or a parquet schema without a text column. Reads at most
    `CHECK_BYTES` plus one line of at most `MAX_LINE_BYTES`; errors further into a file are found
    when ingest reads it."""
    where = f"corpus source {source.name}: {path}"
    if source.format in ("disk", "arrow"):
        return  # a saved dataset is checked by `datasets` when loaded; nothing cheap to add
    try:
        fs, target = fsspec.core.url_to_fs(path, **source_options(source, path, endpoint_url))
        if fs.size(target) == 0:
            raise IngestError(f"{where}: the file is empty")
        if source.format == "parquet":
            with fs.open(target, "rb") as handle:
                _check_parquet(where, source.text_field, handle)
            return
        with fsspec.open(path, "rb", compression="infer", **source_options(source, path, endpoint_url)) as handle:
            if path.endswith(JSON_DOCUMENTS) and handle.read(1) == b"[":
                return  # a JSON array file (``datasets`` reads those too): no line to check
            handle.seek(0)
            if sum(1 for _ in json_lines(source, path, handle, stop_after=CHECK_BYTES)) == 0 and handle.read(1) == b"":
                raise IngestError(f"{where}: holds no JSON line (empty or blank)")
    except IngestError:
        raise
    except FileNotFoundError:
        raise IngestError(f"{where}: listed but gone when read (deleted or moved while listing?)") from None
    except (OSError, EOFError, ValueError) as error:  # a truncated or corrupt compressed stream, an unreadable file
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise IngestError(f"{where}: cannot read it ({type(error).__name__}: {message})") from None


def _check_parquet(where: str, text_field: str, handle) -> None:
    """A parquet file's footer: readable, with a string column ``text_field``."""
    try:
        schema = pq.ParquetFile(handle).schema_arrow
    except pa.ArrowException as error:
        raise IngestError(f"{where}: not a readable parquet file ({str(error).splitlines()[0]})") from None
    if text_field not in schema.names:
        raise IngestError(f"{where}: parquet schema has no text column {text_field!r} (columns: {', '.join(schema.names)})")
    kind = schema.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise IngestError(f"{where}: parquet column {text_field!r} is {kind}, not text")


def check_files(listings: list[SourceFiles], endpoint_url: str | None = None) -> None:
    """`check_file` on every listed file, `CHECK_THREADS` at a time; the first problem in listing
    order is raised."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [(item.source, path) for item in listings for path in item.files]
    with ThreadPoolExecutor(max_workers=CHECK_THREADS) as pool:
        for future in [pool.submit(check_file, source, path, endpoint_url) for source, path in jobs]:
            future.result()


def _as_text(value: Any, source: SourceSection, path: str) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            raise IngestError(f"corpus source {source.name}: {path} holds non-UTF-8 text in {source.text_field!r}") from None
    raise IngestError(
        f"corpus source {source.name}: {path}: field {source.text_field!r} holds {type(value).__name__}, not text"
    )


def partition_of(doc_id: str, partitions: int) -> int:
    return int(doc_id[:8], 16) % partitions


def split_fractions(doc_ids: list[str]) -> np.ndarray:
    """A uniform number in [0, 1) per doc_id, independent of its partition."""
    return np.array([int(doc_id[8:16], 16) for doc_id in doc_ids], dtype=np.float64) / 2**32


def assign_splits(doc_ids: list[str], shares: dict[str, float]) -> list[str]:
    """The split of each doc_id: disjoint by construction, stable across runs and machines."""
    names = [name for name in SPLITS if shares.get(name, 0.0) > 0]
    edges = np.cumsum([shares[name] for name in names])
    edges[-1] = 1.0 + 1e-12
    index = np.searchsorted(edges, split_fractions(doc_ids), side="right")
    return [names[i] for i in index]


def ingest_file(
    source: SourceSection,
    source_index: int,
    path: str,
    file_index: int,
    output_url: str,
    endpoint_url: str | None,
    partitions: int,
    buffer_bytes: int,
) -> dict[str, int]:
    """Pass 1 for one input file: normalized rows to per-partition parquet files under _work/.
    Rows are buffered until ``buffer_bytes`` of text, then flushed to every partition's file."""
    store = Store(output_url, endpoint_url)
    buffers: dict[int, list[tuple]] = {}
    buffered = 0
    counts = {"read": 0, "empty": 0, "kept": 0}
    flushes = 0

    def flush() -> None:
        # One file per partition per flush, each closed at once: memory does not grow with the
        # number of partitions (no open writer per partition), and sorted names keep the order.
        nonlocal flushes
        for partition, rows in buffers.items():
            folder = store.path("_work", f"p{partition:05d}")
            store.fs.makedirs(folder, exist_ok=True)
            columns = [pa.array(column) for column in zip(*rows)]
            with store.fs.open(f"{folder}/{source_index:04d}-{file_index:06d}-{flushes:06d}.parquet", "wb") as handle:
                pq.write_table(pa.Table.from_arrays(columns, schema=SCHEMA), handle, compression="zstd")
        buffers.clear()
        flushes += 1

    for batch in iter_texts(source, path, endpoint_url):
        for value in batch:
            counts["read"] += 1
            text = _as_text(value, source, path)
            if text is None or not text.strip():
                counts["empty"] += 1
                continue
            data = text.encode("utf-8")
            doc_id = hashlib.sha256(data).hexdigest()[:32]
            buffers.setdefault(partition_of(doc_id, partitions), []).append(
                (doc_id, source.name, text, len(text), len(data), len(text.split()))
            )
            buffered += len(data)
            counts["kept"] += 1
        if buffered > buffer_bytes:
            flush()
            buffered = 0
    flush()
    return counts


def marker_name(source_index: int, file_index: int) -> str:
    """The name of an input file's pass-1 marker (``SSSS-FFFFFF``, as its partition files begin)."""
    return f"{source_index:04d}-{file_index:06d}"


def marked_task(folder: str, name: str, of: str, output_url: str, endpoint_url: str | None, function, *args: Any) -> Any:
    """``function(*args)``, then its result as the marker ``_work/<folder>/<name>.json`` (with ``of``,
    what it was computed for), written whole after the work it vouches for: a later attempt of the
    same output takes the result from the marker instead of doing the work again."""
    result = function(*args)
    store = Store(output_url, endpoint_url)
    store.put_atomic(store.path("_work", folder, f"{name}.json"), json.dumps({"of": of, "result": result}).encode())
    return result


def kept_markers(store: Store, output: StageOutput, folder: str) -> dict[str, dict[str, Any]]:
    """The markers an earlier attempt of ``output`` left in ``_work/<folder>/`` (name -> content):
    one small entry per input file or partition; a marker's temporary file is ignored."""
    path = output.file_path(f"_work/{folder}")
    if not store.fs.exists(path):
        return {}
    kept = {}
    for entry in store.fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("."):
            kept[name[: -len(".json")]] = json.loads(store.fs.cat_file(entry))
    return kept


def _read_parquet_files(store: Store, files: list[str]) -> pa.Table | None:
    tables = []
    for name in files:
        with store.fs.open(name, "rb") as handle:
            tables.append(pq.read_table(handle))
    return pa.concat_tables(tables) if tables else None


def _read_folder(store: Store, *parts: str) -> pa.Table | None:
    """The parquet files of a ``_work/`` folder (sorted by name) as one table; None when absent."""
    folder = store.path(*parts)
    files = sorted(store.fs.ls(folder, detail=False)) if store.fs.exists(folder) else []
    return _read_parquet_files(store, files)


def _read_file(store: Store, *parts: str) -> pa.Table | None:
    path = store.path(*parts)
    return _read_parquet_files(store, [path]) if store.fs.exists(path) else None


def _write_table(store: Store, table: pa.Table, *parts: str) -> None:
    store.fs.makedirs(store.path(*parts[:-1]), exist_ok=True)
    with store.fs.open(store.path(*parts), "wb") as handle:
        pq.write_table(table, handle, compression="zstd")


def _count(values: list[str] | np.ndarray) -> dict[str, int]:
    names, counts = np.unique(np.asarray(values, dtype=object), return_counts=True)
    return {str(name): int(count) for name, count in zip(names, counts)}


def _write_shards(store: Store, partition: int, table: pa.Table, shares: dict[str, float], rows_per_shard: int) -> dict[str, Any]:
    """A partition's kept rows with their split, as ``shards/part-PPPPP-KKK.parquet``: the documents
    per source and split, and the files written."""
    splits = assign_splits(table["doc_id"].to_pylist(), shares)
    table = table.append_column("split", pa.array(splits, type=pa.string()))
    documents: dict[str, dict[str, int]] = {}
    for source, split in zip(table["source"].to_pylist(), splits):
        documents.setdefault(source, {}).setdefault(split, 0)
        documents[source][split] += 1
    written = []
    for index, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        name = f"part-{partition:05d}-{index:03d}.parquet"
        _write_table(store, table.slice(start, rows_per_shard), "shards", name)
        written.append(f"shards/{name}")
    return {"documents": documents, "files": written}


def dedup_partition(
    partition: int,
    output_url: str,
    endpoint_url: str | None,
    shares: dict[str, float],
    rows_per_shard: int,
    near: NearDuplicateSection | None,
    ranks: dict[str, int],
    band_partitions: int,
) -> dict[str, Any]:
    """Pass 2 for one partition: drop repeated doc_ids (first kept). Without ``near``, write the
    shards; with it, write the unique rows to ``_work/unique/`` and each signed document's band
    rows to ``_work/bands/qQQQQQ/pPPPPP.parquet`` (band partition ``key % band_partitions``)."""
    store = Store(output_url, endpoint_url)
    empty = {"partition": partition, "documents": {}, "duplicates": {}, "files": [], "signed": 0}
    table = _read_folder(store, "_work", f"p{partition:05d}")
    if table is None:
        return empty
    doc_ids = table["doc_id"].to_numpy(zero_copy_only=False)
    _, first = np.unique(doc_ids, return_index=True)
    keep = np.sort(first)
    duplicates: dict[str, int] = {}
    if keep.size < table.num_rows:
        dropped = np.ones(table.num_rows, dtype=bool)
        dropped[keep] = False
        duplicates = _count(table["source"].to_numpy(zero_copy_only=False)[dropped])
    table = table.take(pa.array(keep))
    if near is None:
        return {**empty, **_write_shards(store, partition, table, shares, rows_per_shard), "duplicates": duplicates}
    _write_table(store, table, "_work", "unique", f"p{partition:05d}.parquet")
    signed = _write_band_rows(store, partition, table, near, ranks, band_partitions)
    return {**empty, "duplicates": duplicates, "signed": signed}


def _write_band_rows(
    store: Store, partition: int, table: pa.Table, near: NearDuplicateSection, ranks: dict[str, int], band_partitions: int
) -> int:
    """Sign the documents of ``table`` and write their band rows, grouped by band partition (one
    file per band partition). Returns how many documents were signed (those with a word)."""
    num_perm = near.bands * near.rows
    signer = near_dedup.Signer(num_perm, near.seed, near.shingle)
    texts = table["text"]
    batches = (text for start in range(0, len(texts), READ_BATCH) for text in texts.slice(start, READ_BATCH).to_pylist())
    signatures, has_words = signer.signatures(batches, len(texts))
    signed = np.flatnonzero(has_words)
    if signed.size == 0:
        return 0
    keys = near_dedup.band_keys(signatures[signed], near.bands, near.rows).ravel()  # document-major
    sketches = near_dedup.sketches(signatures[signed])
    del signatures
    documents = np.repeat(np.arange(signed.size), near.bands)
    bands = np.tile(np.arange(near.bands, dtype=np.int32), signed.size)
    targets = keys % np.uint64(band_partitions)
    order = np.argsort(targets, kind="stable")
    doc_ids = table["doc_id"].take(pa.array(signed))
    source_ranks = np.array([ranks[name] for name in table["source"].take(pa.array(signed)).to_pylist()], dtype=np.int32)
    bounds = np.flatnonzero(np.diff(targets[order])) + 1
    for rows in np.split(order, bounds):
        target = int(targets[rows[0]])
        members = documents[rows]
        band_table = pa.table(
            {
                "band": pa.array(bands[rows]),
                "key": pa.array(keys[rows]),
                "doc_id": doc_ids.take(pa.array(members)),
                "source_rank": pa.array(source_ranks[members]),
                "sketch": _fixed_binary(sketches[members]),
            }
        )
        _write_table(store, band_table, "_work", "bands", f"q{target:05d}", f"p{partition:05d}.parquet")
    return int(signed.size)


def _fixed_binary(matrix: np.ndarray) -> pa.Array:
    """A (rows, width) uint8 matrix as a fixed-size binary array of ``width`` bytes per row."""
    matrix = np.ascontiguousarray(matrix, dtype=np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(matrix.shape[1]), len(matrix), [None, pa.py_buffer(matrix.tobytes())])


def _byte_matrix(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size binary column as a (rows, width) uint8 matrix."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    data = np.frombuffer(array.buffers()[1], dtype=np.uint8)
    return data[array.offset * width : (array.offset + len(array)) * width].reshape(len(array), width)


EDGE_SCHEMA = pa.schema(
    [("doc_id", pa.string()), ("source_rank", pa.int32()), ("representative", pa.string()), ("representative_rank", pa.int32())]
)


def bucket_partition(band_partition: int, output_url: str, endpoint_url: str | None, near: NearDuplicateSection) -> dict[str, int]:
    """Pass 3 for one band partition: the edges of its (band, key) buckets (`near_dedup.bucket_edges`)
    to ``_work/edges/qQQQQQ.parquet``. Returns the band rows read and the edges written."""
    store = Store(output_url, endpoint_url)
    table = _read_folder(store, "_work", "bands", f"q{band_partition:05d}")
    if table is None:
        return {"band_rows": 0, "edges": 0}
    doc_ids = table["doc_id"].to_numpy(zero_copy_only=False)
    ranks = table["source_rank"].to_numpy()
    members, representatives = near_dedup.bucket_edges(
        table["band"].to_numpy(),
        table["key"].to_numpy(),
        ranks,
        doc_ids,
        _byte_matrix(table["sketch"], near.bands * near.rows),
        near.threshold,
    )
    if members.size:
        edges = pa.Table.from_arrays(
            [
                pa.array(doc_ids[members], type=pa.string()),
                pa.array(ranks[members]),
                pa.array(doc_ids[representatives], type=pa.string()),
                pa.array(ranks[representatives]),
            ],
            schema=EDGE_SCHEMA,
        )
        _write_table(store, edges, "_work", "edges", f"q{band_partition:05d}.parquet")
    return {"band_rows": table.num_rows, "edges": int(members.size)}


def cluster_near_duplicates(output_url: str, endpoint_url: str | None, names: list[str], partitions: int) -> dict[str, int]:
    """Clustering, one task: the connected components of every edge (`near_dedup.removed_documents`);
    the removed doc_ids go to ``_work/removed/pPPPPP.parquet`` by doc partition. Returns the
    removed documents per source (name). Memory grows with the documents that have an edge only."""
    store = Store(output_url, endpoint_url)
    edges = _read_folder(store, "_work", "edges")
    if edges is None:
        return {}
    removed, ranks = near_dedup.removed_documents(
        edges["doc_id"].to_numpy(zero_copy_only=False),
        edges["source_rank"].to_numpy(),
        edges["representative"].to_numpy(zero_copy_only=False),
        edges["representative_rank"].to_numpy(),
    )
    del edges
    sources = np.array(names, dtype=object)[ranks]
    targets = np.array([partition_of(doc_id, partitions) for doc_id in removed], dtype=np.int64)
    order = np.argsort(targets, kind="stable")
    for rows in np.split(order, np.flatnonzero(np.diff(targets[order])) + 1):
        if rows.size:
            table = pa.table({"doc_id": pa.array(removed[rows], type=pa.string()), "source": pa.array(sources[rows], type=pa.string())})
            _write_table(store, table, "_work", "removed", f"p{int(targets[rows[0]]):05d}.parquet")
    return _count(sources) if sources.size else {}


def write_partition(partition: int, output_url: str, endpoint_url: str | None, shares: dict[str, float], rows_per_shard: int) -> dict[str, Any]:
    """Final pass for one partition: its unique rows less the removed near-duplicates, split and
    written as shards (`_write_shards`)."""
    store = Store(output_url, endpoint_url)
    table = _read_file(store, "_work", "unique", f"p{partition:05d}.parquet")
    if table is None:
        return {"partition": partition, "documents": {}, "files": []}
    removed = _read_file(store, "_work", "removed", f"p{partition:05d}.parquet")
    if removed is not None:
        table = table.filter(pc.invert(pc.is_in(table["doc_id"], value_set=removed["doc_id"].combine_chunks())))
    return {"partition": partition, **_write_shards(store, partition, table, shares, rows_per_shard)}


def _merge(total: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _merge(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


class IngestStage(Stage[IngestSummary], name=STAGE, version=STAGE_VERSION, sections=("corpus",), title="Ingest", task_name="ingest_corpus", ray=True,
                  resumable=True, summary_type=IngestSummary):
    """Stage 1a: read every source, normalize, deduplicate exactly and split into shards.

    Its fingerprint hashes each source's listing (names, sizes, ETags or mtimes): listing a source
    is cheap, reading it is not. The listing is taken once per run and reused by `run`."""

    def __init__(self) -> None:
        self._listings: dict[str, list[SourceFiles]] = {}

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        corpus = target.recipe.corpus
        listings = [list_source(source, store.endpoint_url) for source in corpus.sources]  # errors before any work
        fp = ingest_fingerprint(corpus, listings)
        self._listings[fp] = listings
        return fp

    def listings(self, target: Target, fp: str, store: Store) -> list[SourceFiles]:
        """The listing that gave ``fp`` (listed again only in a process that did not fingerprint)."""
        if fp not in self._listings:
            self.fingerprint(target, {}, store)
        return self._listings[fp]

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        return {item.source.name: item.listing_fingerprint for item in self._listings[fingerprint]}

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> IngestSummary:
        return ingest(target.recipe.corpus, self.listings(target, output.fingerprint, context.store), context.store, output, context.progress)

    def counts(self, summary: IngestSummary) -> dict[str, Any]:
        return {"documents": summary.documents, "dropped": summary.dropped.as_json()}

    def rows(self, summary: IngestSummary) -> list[tuple[str, str]]:
        return [("documents", f"{summary.documents:,} in {len(summary.shards)} shards"), ("dropped", str(summary.dropped.as_json()))]

    def metrics(self, summary: IngestSummary) -> dict[str, float]:
        return {"ingested_documents": summary.documents}


INGEST = IngestStage()


def run_ingest(corpus: CorpusSection, store: Store, force: bool = False, progress=print) -> StageResult[IngestSummary]:
    """Stage 1a alone on ``corpus`` (the runner: reuse, or compute under a lease)."""
    from trecflow.runner import run_stage

    return run_stage(INGEST, Target(CorpusOnly(corpus)), store, force=force, progress=progress)


@dataclass(frozen=True)
class CorpusOnly:
    """A stand-in recipe holding only a corpus section (ingesting a corpus alone)."""

    corpus: CorpusSection
    name: str = "corpus"


def ingest(corpus: CorpusSection, listings: list[SourceFiles], store: Store, output: StageOutput, progress) -> IngestSummary:
    """Read every listed file on Ray tasks, deduplicate per hash partition, remove near-duplicates
    (when enabled), write the shards; one function per pass, each reported as structured progress
    (files read, then partitions)."""
    from trecflow.ray_runtime import ensure_ray

    progress = as_progress(progress, "ingest")
    ensure_ray()
    near = corpus.near_duplicates if corpus.near_duplicates.enabled else None
    try:
        check_files(listings, store.endpoint_url)  # the CLI checked them before the flow; a deployment's run checks here
        read = _read_pass(corpus, listings, store, output, progress)
        deduplicated = _dedup_pass(corpus, listings, near, store, output, progress)
        removed: dict[str, int] = {}
        written = deduplicated  # without near-duplicate removal, pass 2 wrote the shards
        if near is not None:
            _bucket_pass(corpus, near, store, output, progress)
            removed = _cluster_pass(corpus, listings, store, output, progress)
            written = _write_pass(corpus, store, output, progress)
    except IngestError:  # bad input: nothing of it is kept (its source must change, and with it the fingerprint)
        output.invalidate()
        raise
    _remove_work(store, output)
    stats = _stats(listings, read, deduplicated, removed, written)
    for name in stats["shards"]:
        output.record_file(name)
    progress(f"ingest: {stats['documents']:,} documents in {len(stats['shards'])} shards; dropped {stats['dropped']}")
    return IngestSummary.from_json(stats)


CANCEL_WAIT_SECONDS = 60  # how long bad input waits for a pass's cancelled tasks to end before the output is cleared
MARKER_FOLDERS = ("read", "dedup", "bucket", "cluster", "written")  # one per pass, under _work/


def _remove_work(store: Store, output: StageOutput) -> None:
    """Remove ``_work/``: its markers first, so that an attempt killed while removing it never finds
    a marker whose work is gone (it redoes what lost its marker, and rewrites the same files)."""
    for folder in MARKER_FOLDERS:
        if store.fs.exists(output.file_path(f"_work/{folder}")):
            store.fs.rm(output.file_path(f"_work/{folder}"), recursive=True)
    store.fs.rm(output.file_path("_work"), recursive=True)


def _remote(function):
    import ray

    return ray.remote(function).options(max_retries=2, retry_exceptions=[OSError])


@dataclass(frozen=True)
class Job:
    """One task of a pass: its marker's name, what it is computed for (a kept marker counts only
    for the same), the function and its arguments."""

    name: str
    of: str
    function: Any
    args: tuple


def _run_pass(store: Store, output: StageOutput, folder: str, jobs: list[Job], progress: Progress, message: str,
              unit: str = "partitions", on_result=None) -> list:
    """The results of one pass's jobs, in order: each job whose marker an earlier attempt left (for
    the same ``of``) is taken from it, the others run as Ray tasks (`marked_task`), each writing its
    marker when done. ``progress`` advances by one ``unit`` as each task ends (``on_result(job,
    result)`` first); a note says how many were kept. Bad input in one task (`IngestError`) cancels
    the others, so that none writes into the output the caller then clears."""
    import ray

    kept = kept_markers(store, output, folder)
    results: dict[int, Any] = {}
    for number, job in enumerate(jobs):
        marker = kept.get(job.name)
        if marker is not None and marker.get("of") == job.of:
            results[number] = marker["result"]
    if results:
        progress(f"ingest: {message}: {len(results)} of {len(jobs)} {unit} from an earlier attempt")
    task = _remote(marked_task)
    pending = {task.remote(folder, job.name, job.of, output.uri, store.endpoint_url, job.function, *job.args): number
               for number, job in enumerate(jobs) if number not in results}
    for number in sorted(results):
        if on_result is not None:
            on_result(jobs[number], results[number])
    progress.advance(len(results), len(jobs), unit, message)
    waiting = list(pending)
    while waiting:
        ready, waiting = ray.wait(waiting, num_returns=1)
        number = pending[ready[0]]
        try:
            results[number] = _unwrap(ray.get, ready[0])
        except IngestError:
            for ref in waiting:
                ray.cancel(ref)
            if waiting:  # the running ones end (interrupted, or done) before the caller clears the output
                ray.wait(waiting, num_returns=len(waiting), timeout=CANCEL_WAIT_SECONDS)
            raise
        if on_result is not None:
            on_result(jobs[number], results[number])
        progress.advance(len(jobs) - len(waiting), len(jobs), unit, message)
    return [results[number] for number in range(len(jobs))]


def _read_pass(corpus: CorpusSection, listings: list[SourceFiles], store: Store, output: StageOutput, progress) -> dict[str, dict[str, int]]:
    """Pass 1: every input file on its own task (a file an earlier attempt finished is not read
    again: its counts come from its marker); IngestError if a source yields no document."""
    jobs = [
        Job(marker_name(s, f), path, ingest_file,
            (item.source, s, path, f, output.uri, store.endpoint_url, corpus.partitions, corpus.buffer_mb * 1024**2))
        for s, item in enumerate(listings)
        for f, path in enumerate(item.files)
    ]
    read: dict[str, dict[str, int]] = {}
    _run_pass(store, output, "read", jobs, progress, "read", unit="files",
              on_result=lambda job, counts: _merge(read.setdefault(job.args[0].name, {}), counts))
    for item in listings:
        if read.get(item.source.name, {}).get("kept", 0) == 0:
            raise IngestError(f"corpus source {item.source.name}: yielded no documents from {expand_path(item.source.path)}")
    return read


def _dedup_pass(corpus: CorpusSection, listings: list[SourceFiles], near: NearDuplicateSection | None, store: Store, output: StageOutput, progress) -> list[dict[str, Any]]:
    """Pass 2: exact duplicates per partition (and the signatures' band rows, or the shards)."""
    ranks = {item.source.name: rank for rank, item in enumerate(listings)}
    jobs = [Job(f"p{p:05d}", f"p{p:05d}", dedup_partition,
                (p, output.uri, store.endpoint_url, dict(corpus.splits), corpus.rows_per_shard, near, ranks, corpus.partitions))
            for p in range(corpus.partitions)]
    parts = _run_pass(store, output, "dedup", jobs, progress, "deduplicated")
    duplicates = sum(sum(part["duplicates"].values()) for part in parts)
    signed = f"; signed {sum(part['signed'] for part in parts):,} documents" if near is not None else ""
    progress(f"ingest: {duplicates:,} exact duplicates dropped in {corpus.partitions} partitions{signed}")
    return parts


def _bucket_pass(corpus: CorpusSection, near: NearDuplicateSection, store: Store, output: StageOutput, progress) -> None:
    """Pass 3: near-duplicate edges per band partition."""
    jobs = [Job(f"q{q:05d}", f"q{q:05d}", bucket_partition, (q, output.uri, store.endpoint_url, near)) for q in range(corpus.partitions)]
    parts = _run_pass(store, output, "bucket", jobs, progress, "bucketed")
    edges = sum(part["edges"] for part in parts)
    band_rows = sum(part["band_rows"] for part in parts)
    progress(f"ingest: near-duplicates: {edges:,} similar pairs (counted per band) among {band_rows:,} band rows")


def _cluster_pass(corpus: CorpusSection, listings: list[SourceFiles], store: Store, output: StageOutput, progress) -> dict[str, int]:
    """Clustering (one task): the near-duplicates removed, per source."""
    names = [item.source.name for item in listings]
    job = Job("clusters", "clusters", cluster_near_duplicates, (output.uri, store.endpoint_url, names, corpus.partitions))
    (removed,) = _run_pass(store, output, "cluster", [job], progress, "clustered", unit="tasks")
    progress(f"ingest: near-duplicates: removing {sum(removed.values()):,} documents {removed}")
    return removed


def _write_pass(corpus: CorpusSection, store: Store, output: StageOutput, progress: Progress) -> list[dict[str, Any]]:
    """Final pass (after near-duplicate removal): the shards of every partition."""
    jobs = [Job(f"p{p:05d}", f"p{p:05d}", write_partition, (p, output.uri, store.endpoint_url, dict(corpus.splits), corpus.rows_per_shard))
            for p in range(corpus.partitions)]
    return _run_pass(store, output, "written", jobs, progress, "written")


def _stats(
    listings: list[SourceFiles], read: dict[str, dict[str, int]], deduplicated: list[dict], removed: dict[str, int], written: list[dict]
) -> dict[str, Any]:
    """The summary's JSON: counts per source, drops by reason, documents and shard files."""
    stats: dict[str, Any] = {"sources": {}, "dropped": {"empty": 0, "duplicate": 0, "near_duplicate": 0}, "documents": 0, "shards": []}
    for item in listings:
        name = item.source.name
        stats["sources"][name] = {
            "files": len(item.files),
            "read": read[name]["read"],
            "dropped_empty": read[name]["empty"],
            "dropped_duplicate": 0,
            "dropped_near_duplicate": removed.get(name, 0),
            "splits": {},
        }
        stats["dropped"]["empty"] += read[name]["empty"]
        stats["dropped"]["near_duplicate"] += removed.get(name, 0)
    for part in deduplicated:
        for name, count in part["duplicates"].items():
            stats["sources"][name]["dropped_duplicate"] += count
            stats["dropped"]["duplicate"] += count
    for part in written:
        stats["shards"].extend(part["files"])
        for name, splits in part["documents"].items():
            _merge(stats["sources"][name]["splits"], splits)
    for entry in stats["sources"].values():
        entry["documents"] = sum(entry["splits"].values())
        stats["documents"] += entry["documents"]
    stats["shards"].sort()
    return stats


def _unwrap(get, ref):
    """ray.get that re-raises an IngestError from a task as itself (one clear line)."""
    import ray

    try:
        return get(ref)
    except ray.exceptions.RayTaskError as error:
        cause = getattr(error, "cause", None)
        if isinstance(cause, IngestError):
            raise IngestError(str(cause)) from None
        raise
