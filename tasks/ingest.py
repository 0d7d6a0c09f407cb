"""Stage 1a, ingest: corpus sources -> deduplicated, split, normalized parquet shards.

Two passes of Ray tasks (a local Ray, or a cluster through ``RAY_ADDRESS``); memory is bounded by
batch and buffer sizes, never by the corpus:

1. One task per input file reads it with Hugging Face ``datasets`` (streaming), checks it, and gives
   every non-empty document ``doc_id`` = SHA-256 of its UTF-8 text (32 hex digits) and length
   fields. Rows go to hash partition ``int(doc_id[:8], 16) % corpus.partitions``; every
   ``corpus.buffer_mb`` of text, one parquet file per partition is written under ``_work/``.
2. One task per partition drops exact duplicates (equal texts share a doc_id and so a partition;
   the first occurrence by source order, then file order, is kept), assigns the split from the
   doc_id hash (``int(doc_id[8:16], 16) / 2**32`` against the cumulative shares of
   ``corpus.splits``), and writes ``shards/part-PPPPP-KKK.parquet``.

Output ``<store>/ingest/<fingerprint>/``: ``shards/`` (doc_id, source, text, chars, bytes, words,
split), ``stats.json`` (documents per source and split; dropped documents by reason) and the
manifest last. A source's fingerprint hashes its file listing (path, size, mtime or ETag), not
its content. Bad input raises `IngestError` naming the source and file before any output exists.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trecflow.fingerprint import fingerprint
from trecflow.recipe import SPLITS, CorpusSection, SourceSection
from trecflow.settings import expand_path
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store

STAGE = "ingest"
STAGE_VERSION = 1
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
    """Documents dropped: empty (no text) and exact duplicates (a later copy of a kept text)."""

    empty: int
    duplicate: int


@dataclass(frozen=True)
class IngestedSource(Summary):
    """One source's counts: input files, documents read and dropped, and kept documents per split."""

    files: int
    read: int
    dropped_empty: int
    dropped_duplicate: int
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


def _source_store(source: SourceSection, endpoint_url: str | None) -> Store:
    """A filesystem for the source's location (its folder, or the folder of a glob or file)."""
    path = expand_path(source.path)
    base = path.split("*", 1)[0].rsplit("/", 1)[0] if "*" in path else path
    return Store(base or "/", endpoint_url)


def list_source(source: SourceSection, endpoint_url: str | None = None) -> SourceFiles:
    """The input files of a source. IngestError if the path matches nothing."""
    path = expand_path(source.path)
    store = _source_store(source, endpoint_url)
    fs, protocol = store.fs, ("s3://" if path.startswith("s3://") else "")
    target = path.removeprefix("s3://")
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
        files=tuple(protocol + name for name in files),
        listing_fingerprint=fingerprint("source", 1, {"listing": listing, "format": source.format}),
    )


def ingest_fingerprint(corpus: CorpusSection, listings: list[SourceFiles]) -> str:
    config = corpus.model_dump(mode="json", exclude={"sources"})
    sources = [
        {"name": item.source.name, "text_field": item.source.text_field, "listing": item.listing_fingerprint}
        for item in listings
    ]
    return fingerprint(STAGE, STAGE_VERSION, {**config, "sources": sources})


def _storage_options(path: str, endpoint_url: str | None) -> dict[str, Any]:
    return Store(path.rsplit("/", 1)[0] or "/", endpoint_url).storage_options() if path.startswith("s3://") else {}


def iter_texts(source: SourceSection, path: str, endpoint_url: str | None = None) -> Iterator[list[Any]]:
    """Batches of raw text values of one input file, read with ``datasets`` (streaming)."""
    import datasets

    datasets.disable_progress_bars()
    options = _storage_options(path, endpoint_url)
    try:
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
        if source.format == "jsonl" and path.startswith("s3://") and path.endswith(COMPRESSED):
            yield from _compressed_jsonl_texts(source, path, options)
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


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def _compressed_jsonl_texts(source: SourceSection, path: str, options: dict[str, Any]) -> Iterator[list[Any]]:
    """Batches of text values of a compressed JSON-lines file in S3, decompressed as it streams.
    (``datasets`` opens compressed files with HTTP client options that S3's client refuses.)"""
    import fsspec

    batch: list[Any] = []
    with fsspec.open(path, "rt", compression="infer", encoding="utf-8", **copy.deepcopy(options)) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise IngestError(f"corpus source {source.name}: {path} line {number}: not JSON ({error.msg})") from None
            if not isinstance(record, dict) or source.text_field not in record:
                raise IngestError(f"corpus source {source.name}: {path} line {number} has no text field {source.text_field!r}")
            batch.append(record[source.text_field])
            if len(batch) == READ_BATCH:
                yield batch
                batch = []
    if batch:
        yield batch


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


def dedup_partition(partition: int, output_url: str, endpoint_url: str | None, shares: dict[str, float], rows_per_shard: int) -> dict[str, Any]:
    """Pass 2 for one partition: drop repeated doc_ids (first kept), assign splits, write shards."""
    store = Store(output_url, endpoint_url)
    folder = store.path("_work", f"p{partition:05d}")
    files = sorted(store.fs.ls(folder, detail=False)) if store.fs.exists(folder) else []
    if not files:
        return {"partition": partition, "documents": {}, "duplicates": {}, "files": []}
    tables = []
    for name in files:
        with store.fs.open(name, "rb") as handle:
            tables.append(pq.read_table(handle))
    table = pa.concat_tables(tables)
    doc_ids = table["doc_id"].to_numpy(zero_copy_only=False)
    _, first = np.unique(doc_ids, return_index=True)
    keep = np.sort(first)
    duplicates: dict[str, int] = {}
    if keep.size < table.num_rows:
        dropped = np.ones(table.num_rows, dtype=bool)
        dropped[keep] = False
        for source, count in zip(*np.unique(table["source"].to_numpy(zero_copy_only=False)[dropped], return_counts=True)):
            duplicates[str(source)] = int(count)
    table = table.take(pa.array(keep))
    splits = assign_splits(table["doc_id"].to_pylist(), shares)
    table = table.append_column("split", pa.array(splits, type=pa.string()))
    documents: dict[str, dict[str, int]] = {}
    for source, split in zip(table["source"].to_pylist(), splits):
        documents.setdefault(source, {}).setdefault(split, 0)
        documents[source][split] += 1
    written = []
    store.fs.makedirs(store.path("shards"), exist_ok=True)
    for index, start in enumerate(range(0, table.num_rows, rows_per_shard)):
        name = f"shards/part-{partition:05d}-{index:03d}.parquet"
        with store.fs.open(store.path(name), "wb") as handle:
            pq.write_table(table.slice(start, rows_per_shard), handle, compression="zstd")
        written.append(name)
    return {"partition": partition, "documents": documents, "duplicates": duplicates, "files": written}


def _merge(total: dict, part: dict) -> None:
    for key, value in part.items():
        if isinstance(value, dict):
            _merge(total.setdefault(key, {}), value)
        else:
            total[key] = total.get(key, 0) + value


class IngestStage(Stage[IngestSummary], name=STAGE, version=STAGE_VERSION, sections=("corpus",), title="Ingest", task_name="ingest_corpus", ray=True,
                  summary_type=IngestSummary):
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
    """Read every listed file on Ray tasks, deduplicate per hash partition, write the shards."""
    import ray

    from trecflow.ray_runtime import ensure_ray

    endpoint = store.endpoint_url
    ensure_ray()
    remote_file = ray.remote(ingest_file).options(max_retries=2, retry_exceptions=[OSError])
    remote_partition = ray.remote(dedup_partition).options(max_retries=2, retry_exceptions=[OSError])
    try:
        pending = {
            remote_file.remote(
                item.source, s, path, f, output.uri, endpoint, corpus.partitions, corpus.buffer_mb * 1024**2
            ): (item.source.name, path)
            for s, item in enumerate(listings)
            for f, path in enumerate(item.files)
        }
        read: dict[str, dict[str, int]] = {}
        for done, ref in enumerate(pending, start=1):
            name, path = pending[ref]
            _merge(read.setdefault(name, {}), _unwrap(ray.get, ref))
            progress(f"ingest: read {done}/{len(pending)} files ({name}: {path.rsplit('/', 1)[-1]})")
        for item in listings:
            if read.get(item.source.name, {}).get("kept", 0) == 0:
                raise IngestError(f"corpus source {item.source.name}: yielded no documents from {expand_path(item.source.path)}")
        refs = [
            remote_partition.remote(p, output.uri, endpoint, dict(corpus.splits), corpus.rows_per_shard)
            for p in range(corpus.partitions)
        ]
        parts = [_unwrap(ray.get, ref) for ref in refs]
    except BaseException:
        output.invalidate()
        raise
    store.fs.rm(output.file_path("_work"), recursive=True)
    stats: dict[str, Any] = {"sources": {}, "dropped": {"empty": 0, "duplicate": 0}, "documents": 0, "shards": []}
    for item in listings:
        name = item.source.name
        stats["sources"][name] = {
            "files": len(item.files),
            "read": read[name]["read"],
            "dropped_empty": read[name]["empty"],
            "dropped_duplicate": 0,
            "splits": {},
        }
        stats["dropped"]["empty"] += read[name]["empty"]
    for part in parts:
        stats["shards"].extend(part["files"])
        for name, count in part["duplicates"].items():
            stats["sources"][name]["dropped_duplicate"] += count
            stats["dropped"]["duplicate"] += count
        for name, splits in part["documents"].items():
            _merge(stats["sources"][name]["splits"], splits)
    for entry in stats["sources"].values():
        entry["documents"] = sum(entry["splits"].values())
        stats["documents"] += entry["documents"]
    stats["shards"].sort()
    for name in stats["shards"]:
        output.record_file(name)
    progress(f"ingest: {stats['documents']:,} documents in {len(stats['shards'])} shards; dropped {stats['dropped']}")
    return IngestSummary.from_json(stats)


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
