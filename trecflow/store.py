"""The artifact store: a URL (a local folder or any fsspec URL: ``s3://bucket/prefix``,
``gs://...``, ``memory://...``) handled through fsspec. Its filesystem options are the S3 endpoint
(``endpoint_url``) and, for ``s3://``, the retry settings `trecflow.store_s3.S3_OPTIONS`, with
``TRECFLOW_STORE_OPTIONS`` (`trecflow.settings.store_options`) merged over them.

An S3 request that still fails after every retry (a 5xx answer, throttling, a lost connection)
raises `StoreUnavailable`, one line naming the object's URL, the operation, the attempts and the
last answer (`trecflow.store_s3.RetryingS3FileSystem`); a missing object is still ``FileNotFoundError``.

Layout: each stage writes under ``<store>/<stage>/<fingerprint>/``. Data files are written first
and ``_MANIFEST.json`` (fingerprint, inputs, counts, file sizes and SHA-256 checksums) last, by an
atomic rename or a single object PUT: a folder without a manifest does not exist. Nothing here
branches on local versus S3 beyond building the filesystem.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from trecflow.redact import has_password, redact
from trecflow.settings import merge_options, store_options

MANIFEST = "_MANIFEST.json"

class StoreError(RuntimeError):
    """A store that cannot be reached or an output that is missing or corrupt."""


class StoreUnavailable(OSError):
    """An S3 request that failed after every retry; its message is one line naming the object's
    URL, the operation, the attempts and the last answer (an ``OSError``, as s3fs's errors are)."""


def filesystem(url: str, endpoint_url: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path) of a store URL or a location inside one, with `storage_options`: an
    ``s3://`` URL gets a `trecflow.store_s3.RetryingS3FileSystem`, other URLs fsspec's own."""
    options = storage_options(url, endpoint_url)
    if url.startswith("s3://"):
        from trecflow.store_s3 import RetryingS3FileSystem  # s3fs takes seconds to import: only for S3

        fs = RetryingS3FileSystem(**options)
        return fs, fs._strip_protocol(url)
    return fsspec.core.url_to_fs(url, **options)


def storage_options(url: str, endpoint_url: str | None = None) -> dict[str, Any]:
    """fsspec options for ``url`` (a fresh dict on every call: callers may mutate it): for
    ``s3://`` the endpoint and the retry settings (`trecflow.store_s3.S3_OPTIONS`), then
    ``TRECFLOW_STORE_OPTIONS`` merged over them (a local path takes none)."""
    if "://" not in url:
        return {}
    options: dict[str, Any] = {}
    if url.startswith("s3://"):
        from trecflow.store_s3 import S3_OPTIONS

        options = merge_options(copy.deepcopy(S3_OPTIONS), {"client_kwargs": {"endpoint_url": endpoint_url}} if endpoint_url else {})
    return merge_options(options, store_options())


@dataclass
class Store:
    """A store rooted at ``url``; ``endpoint_url`` points s3fs at an S3-compatible server."""

    url: str
    endpoint_url: str | None = None
    fs: fsspec.AbstractFileSystem = field(init=False, repr=False)
    root: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        url = self.url.removeprefix("file://")
        if "://" not in url:  # a local folder: always absolute, so URLs recorded elsewhere stay valid
            url = os.path.abspath(os.path.expanduser(url))
        self.url = url.rstrip("/")
        if has_password(self.endpoint_url):  # botocore and aiohttp refuse it, in words that do not say which URL
            raise ValueError(f"S3 endpoint {redact(self.endpoint_url)}: an endpoint URL takes no user name or password; "
                             f"give S3 credentials as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or a profile)")
        self.fs, self.root = filesystem(self.url, self.endpoint_url)

    def storage_options(self) -> dict[str, Any]:
        """fsspec options for this store's URL (`storage_options`)."""
        return storage_options(self.url, self.endpoint_url)

    def output(self, stage: str, fingerprint: str) -> StageOutput:
        """The output folder of one stage run."""
        return StageOutput(self, stage, fingerprint)

    def path(self, *parts: str) -> str:
        """Filesystem path (no protocol) of a location inside the store."""
        return "/".join([self.root.rstrip("/"), *parts])

    def put_atomic(self, path: str, data: bytes) -> None:
        """Write a whole file so that readers see the complete file or none (used for parts that
        outlive a failed attempt): on an object store one PUT (atomic by itself; a temporary
        object and a move would be a copy and a delete, which a retried request can break), on
        a folder a temporary file moved into place."""
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.pipe_file(path, data)
            return
        folder, name = path.rsplit("/", 1)
        self.fs.makedirs(folder, exist_ok=True)
        temporary = f"{folder}/.{name}.tmp"
        self.fs.pipe_file(temporary, data)
        self.fs.mv(temporary, path)

    def uri(self, *parts: str) -> str:
        """Full URL of a location inside the store."""
        return "/".join([self.url, *parts])


@dataclass
class StageOutput:
    """``<store>/<stage>/<fingerprint>/``: write files, then `commit` the manifest last."""

    store: Store
    stage: str
    fingerprint: str
    _files: dict[str, dict[str, Any]] = field(default_factory=dict, init=False, repr=False)

    @property
    def path(self) -> str:
        return self.store.path(self.stage, self.fingerprint)

    @property
    def uri(self) -> str:
        return self.store.uri(self.stage, self.fingerprint)

    def file_path(self, name: str) -> str:
        return f"{self.path}/{name}"

    def file_uri(self, name: str) -> str:
        return f"{self.uri}/{name}"

    def exists(self) -> bool:
        """True when the manifest is present, i.e. the output is complete (asked of the store itself:
        S3 stores keep no listing cache, `trecflow.store_s3.S3_OPTIONS`)."""
        return self.store.fs.exists(self.file_path(MANIFEST))

    def manifest(self) -> dict[str, Any]:
        """The committed manifest; StoreError if the output is incomplete or unreadable."""
        try:
            return json.loads(self.store.fs.cat_file(self.file_path(MANIFEST)))
        except FileNotFoundError:
            raise StoreError(f"{self.uri}: no {MANIFEST}; the {self.stage} output is incomplete") from None

    def invalidate(self) -> None:
        """Remove the manifest first (the output stops existing), then any stale files; lease files
        (``_LEASE-*``, see `trecflow.lease`) stay: only the lease holder invalidates."""
        fs = self.store.fs
        if fs.exists(self.file_path(MANIFEST)):
            fs.rm(self.file_path(MANIFEST))
        if fs.exists(self.path):
            for entry in fs.ls(self.path, detail=False):  # lease files sit at the top of the folder
                if not entry.rstrip("/").rsplit("/", 1)[-1].startswith("_LEASE-"):
                    fs.rm(entry, recursive=True)
        self._files.clear()

    def write_bytes(self, name: str, data: bytes) -> str:
        """Write one data file and record its size and checksum for the manifest."""
        if name == MANIFEST:
            raise ValueError(f"{MANIFEST} is written by commit()")
        fs = self.store.fs
        fs.makedirs(self.file_path(name).rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(self.file_path(name), data)
        self._files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        return self.file_uri(name)

    def record_file(self, name: str) -> None:
        """Record a data file written directly through ``store.fs`` (e.g. by Ray workers).

        Its size goes into the manifest; no checksum, since re-reading terabytes of shards to hash
        them would double the stage's I/O (parquet carries its own page checksums)."""
        self._files[name] = {"bytes": self.store.fs.info(self.file_path(name))["size"]}

    def read_bytes(self, name: str) -> bytes:
        """Read a file of a committed output, checking it against the manifest's checksum."""
        entry = self.manifest()["files"].get(name)
        if entry is None:
            raise StoreError(f"{self.uri}: {name} is not in the manifest")
        data = self.store.fs.cat_file(self.file_path(name))
        if "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise StoreError(f"{self.file_uri(name)}: checksum differs from the manifest (corrupt file)")
        return data

    def commit(self, inputs: dict[str, str] | None = None, counts: dict[str, Any] | None = None) -> dict:
        """Write ``_MANIFEST.json`` last and atomically; returns the manifest."""
        manifest = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "inputs": inputs or {},
            "counts": counts or {},
            "files": dict(sorted(self._files.items())),
            "created_unix": time.time(),
        }
        self.store.put_atomic(self.file_path(MANIFEST), json.dumps(manifest, indent=2).encode())
        return manifest
