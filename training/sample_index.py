"""The global sample index and the packed token sequences it names: formats and the reader.

Training and re-evaluation read their batches only through `SampleIndex`, so both see exactly the
sequences the placement stage planned.

Packed sequences (``<store>/pack/<fingerprint>/``):
- ``tokens/<group>-<tier>.npy``: a 2-D array (sequences x seq_len) of token ids; every sequence
  of a file has one tier. Sequence ids are global and contiguous: a file holds the ids
  ``first_id .. first_id + count - 1``, listed in ``token_files.parquet`` (file, tier, first_id,
  count).
- ``sequences/scores.npy`` (float32) and ``sequences/tiers.npy`` (int8, index into TIERS): one
  entry per sequence id.

The index (``<store>/place/<fingerprint>/``):
- ``index/steps-<first step>.npy``: 2-D arrays (steps x sequences per step) of sequence ids, in
  chunks of ``steps_per_chunk`` steps; row s - first step is the global batch of step s.
- ``composition.npy``: (steps x 3) int32, the hq / mid / lq sequences of each step.
- ``index.json``: shape, dtype, chunking and the fingerprints the index was built from.

Packed token files are memory-mapped locally and read by byte ranges in an object store (one
request per run of consecutive sequences), so nothing loads a whole token array to serve one batch.

What is verified on read: opening an index or packed sequences verifies the output
(`trecflow.integrity.verify_output`: its manifest is this stage's and fingerprint's, every file
is present with its recorded size: one listing). An index chunk is read whole on first use
(at most ``tasks.place.CHUNK_BYTES``, 64 MiB) and its SHA-256 checked against the manifest: a
flipped byte in the index is a `StoreError` naming the chunk, never a silently different batch.
Cost: every process reads each chunk it uses once (the whole index over a run; about 0.1 s of
hashing per chunk) and holds at most `CACHED_CHUNKS` in memory. Packed token files are checked by
size only: hashing them would reread the whole corpus (terabytes at 900B tokens).
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from trecflow.integrity import verify_output
from trecflow.store import StageOutput, Store

PACK_STAGE = "pack"
PLACE_STAGE = "place"
TIERS = ("hq", "mid", "lq")
TOKEN_FILES = "token_files.parquet"
SCORES_FILE = "sequences/scores.npy"
TIERS_FILE = "sequences/tiers.npy"
INDEX_META = "index.json"
COMPOSITION_FILE = "composition.npy"
# The fingerprints an index records; a reader that expects others refuses it, naming each mismatch.
INDEX_KEYS = ("recipe", "score", "tokenizer", "pack", "strategy", "seed")
CACHED_CHUNKS = 2  # verified index chunks a reader keeps in memory (a step's batch and the next chunk's)


class IndexMismatchError(ValueError):
    """An index (or packed data) built from other inputs than the reader expects."""


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as the bytes of a ``.npy`` file (for `StageOutput.write_bytes`)."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def read_npy(output: StageOutput, name: str) -> np.ndarray:
    """A ``.npy`` file of a committed output, read whole (checksum verified)."""
    return np.load(io.BytesIO(output.read_bytes(name)))


def chunk_name(first_step: int) -> str:
    return f"index/steps-{first_step:09d}.npy"


def batch_hash(sequence_ids: np.ndarray) -> str:
    """The audit hash of a global batch: SHA-256 (16 hex digits) of its sorted ids as int64."""
    ordered = np.sort(np.asarray(sequence_ids, dtype=np.int64))
    return hashlib.sha256(ordered.tobytes()).hexdigest()[:16]


def rank_share(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """Rank ``rank``'s contiguous, equal share of a global batch of sequence ids."""
    if world_size <= 0 or len(batch) % world_size:
        raise ValueError(f"{len(batch)} sequences per step do not divide across {world_size} workers")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside 0..{world_size - 1}")
    share = len(batch) // world_size
    return batch[rank * share : (rank + 1) * share]


@dataclass
class NpyArray:
    """A 2-D ``.npy`` file in the store, read by rows without loading it whole."""

    store: Store
    path: str
    shape: tuple[int, int] = field(init=False)
    dtype: np.dtype = field(init=False)
    _offset: int = field(init=False, repr=False)
    _mapped: np.ndarray | None = field(init=False, default=None, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.store.fs, LocalFileSystem):
            self._mapped = np.load(self.path, mmap_mode="r")
            self.shape, self.dtype = self._mapped.shape, self._mapped.dtype
            return
        head = self.store.fs.cat_file(self.path, start=0, end=4096)
        major = head[6]
        length_bytes = 2 if major == 1 else 4
        header_length = int.from_bytes(head[8 : 8 + length_bytes], "little")
        self._offset = 8 + length_bytes + header_length
        header = ast.literal_eval(head[8 + length_bytes : self._offset].decode("latin1"))
        if header["fortran_order"] or len(header["shape"]) != 2:
            raise ValueError(f"{self.path}: expected a C-ordered 2-D array, got {header}")
        self.shape, self.dtype = tuple(header["shape"]), np.dtype(header["descr"])

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The given rows (any order, repeats allowed) as an in-memory array."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.shape[0]):
            raise IndexError(f"{self.path}: rows outside 0..{self.shape[0] - 1}")
        if self._mapped is not None:
            return np.asarray(self._mapped[rows])
        out = np.empty((rows.size, self.shape[1]), dtype=self.dtype)
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        row_bytes = self.shape[1] * self.dtype.itemsize
        # one range request per run of consecutive rows
        breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
        for run in np.split(np.arange(ordered.size), breaks):
            if run.size == 0:
                continue
            first, last = int(ordered[run[0]]), int(ordered[run[-1]])
            start = self._offset + first * row_bytes
            data = self.store.fs.cat_file(self.path, start=start, end=start + (last - first + 1) * row_bytes)
            block = np.frombuffer(data, dtype=self.dtype).reshape(-1, self.shape[1])
            out[order[run]] = block[ordered[run] - first]
        return out


class PackedSequences:
    """Random access to the packed sequences of one pack output, by global sequence id."""

    def __init__(self, output: StageOutput):
        self.output = output
        manifest = verify_output(output)  # every token file present with its recorded size
        self.fingerprint = output.fingerprint
        self.seq_len = int(manifest["counts"]["seq_len"])
        table = pq.read_table(io.BytesIO(output.read_bytes(TOKEN_FILES)))  # a few KB: checksum verified
        self.files = table["file"].to_pylist()
        self.first_ids = table["first_id"].to_numpy()
        self.counts = table["count"].to_numpy()
        self.total = int(self.counts.sum())
        self._arrays: dict[int, NpyArray] = {}

    def _array(self, number: int) -> NpyArray:
        if number not in self._arrays:
            self._arrays[number] = NpyArray(self.output.store, self.output.file_path(self.files[number]))
        return self._arrays[number]

    def tokens(self, sequence_ids: np.ndarray) -> np.ndarray:
        """Token ids of the given sequences, shape (len(ids), seq_len), in the order given."""
        ids = np.asarray(sequence_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.total):
            raise IndexError(f"sequence ids must be in 0..{self.total - 1}")
        out = np.empty((ids.size, self.seq_len), dtype=np.int64)
        numbers = np.searchsorted(self.first_ids, ids, side="right") - 1
        for number in np.unique(numbers):
            where = np.flatnonzero(numbers == number)
            out[where] = self._array(int(number)).rows(ids[where] - self.first_ids[number])
        return out


class SampleIndex:
    """The global sample index of one placement: which sequences every step trains on.

    Guarantees: `batch(s)` is the same array on every call, process and machine; the ranks of a
    world of size W split it into W contiguous, equal slices (`rank_batch`); an index whose
    recorded fingerprints differ from the ``expected`` ones is refused before anything is read.
    """

    def __init__(self, store: Store, fingerprint: str, expected: dict[str, str] | None = None):
        output = store.output(PLACE_STAGE, fingerprint)
        manifest = verify_output(output)
        recorded = manifest["inputs"]
        if expected:
            differ = [
                f"{key} {recorded.get(key)!r} (expected {value!r})"
                for key, value in expected.items()
                if recorded.get(key) != value
            ]
            if differ:
                raise IndexMismatchError(
                    f"{output.uri}: the sample index was built for other inputs: " + "; ".join(differ)
                )
        self.output = output
        self.fingerprint = fingerprint
        self.inputs = recorded
        self.meta: dict[str, Any] = json.loads(output.read_bytes(INDEX_META))
        self.steps = int(self.meta["steps"])
        self.batch_size = int(self.meta["sequences_per_step"])
        self.steps_per_chunk = int(self.meta["steps_per_chunk"])
        self._chunks: dict[int, np.ndarray] = {}  # verified chunks, the most recently used last
        self._composition: np.ndarray | None = None
        self._sequences: PackedSequences | None = None

    def _chunk(self, number: int) -> np.ndarray:
        """Chunk ``number``, read whole and checked against the manifest's SHA-256 (StoreError
        naming the file if it differs); the last `CACHED_CHUNKS` used are kept."""
        chunk = self._chunks.pop(number, None)
        if chunk is None:
            chunk = read_npy(self.output, chunk_name(number * self.steps_per_chunk))
            while len(self._chunks) >= CACHED_CHUNKS:
                self._chunks.pop(next(iter(self._chunks)))
        self._chunks[number] = chunk
        return chunk

    def _check_step(self, step: int) -> None:
        if not 0 <= step < self.steps:
            raise IndexError(f"step {step} is outside 0..{self.steps - 1}")

    def batch(self, step: int) -> np.ndarray:
        """The sequence ids of step ``step``'s global batch (int64, in batch order)."""
        self._check_step(step)
        number, row = divmod(step, self.steps_per_chunk)
        return self._chunk(number)[row].astype(np.int64)

    def batches(self, steps: np.ndarray) -> np.ndarray:
        """The global batches of ``steps`` (any order) as a (len(steps), sequences) int64 array,
        read with one request per chunk and run of consecutive steps."""
        steps = np.asarray(steps, dtype=np.int64)
        if steps.size and (steps.min() < 0 or steps.max() >= self.steps):
            raise IndexError(f"steps must be in 0..{self.steps - 1}")
        out = np.empty((steps.size, self.batch_size), dtype=np.int64)
        numbers = steps // self.steps_per_chunk
        for number in np.unique(numbers):
            where = np.flatnonzero(numbers == number)
            out[where] = self._chunk(int(number))[steps[where] - number * self.steps_per_chunk]
        return out

    def rank_batch(self, step: int, rank: int, world_size: int) -> np.ndarray:
        """Data-parallel rank ``rank``'s contiguous share of step ``step``'s global batch."""
        return rank_share(self.batch(step), rank, world_size)

    def composition(self, step: int) -> dict[str, int]:
        """How many sequences of each tier step ``step`` trains on."""
        self._check_step(step)
        if self._composition is None:
            self._composition = read_npy(self.output, COMPOSITION_FILE)
        return dict(zip(TIERS, map(int, self._composition[step])))

    @property
    def sequences(self) -> PackedSequences:
        """The packed sequences this index refers to."""
        if self._sequences is None:
            self._sequences = PackedSequences(self.output.store.output(PACK_STAGE, self.inputs["pack"]))
        return self._sequences

    def tokens(self, step: int, rank: int = 0, world_size: int = 1) -> np.ndarray:
        """Token ids (int64, sequences x seq_len) of a rank's share of step ``step``."""
        return self.sequences.tokens(self.rank_batch(step, rank, world_size))
