"""Leases on stage output folders, so that two runners on one store never compute the same output
at once nor delete a folder the other is writing.

A lease is a small JSON file ``_LEASE-<generation>.json`` inside ``<store>/<stage>/<fingerprint>/``
naming its owner (a process, or a job that outlives it) and an expiry that a heartbeat renews. The
lease in force is the highest generation. Taking a lease creates the next generation's file with an
*exclusive* write: ``O_EXCL``-style link on a local folder, a conditional PUT (``If-None-Match: *``)
on S3. Of two runners racing for generation *n*, exactly one creates it; the other sees a live
lease and waits. A released or expired lease is taken over by creating generation *n + 1*, and so
is the live lease of a process that is gone: one of this host and PID namespace whose PID no longer
runs (a driver killed with SIGKILL, or by the OOM killer, never released its lease; waiting for it
to expire would only delay its rerun). A holder that finds a higher generation than its own when
it renews has lost the lease (`LeaseLost`) and stops. Nothing here deletes a lease file: the files are a few hundred bytes and
record who computed what. A lease file is always replaced whole, so one that cannot be read (a
corrupted store) counts as expired: it is taken over like the lease of a process that died.

Why not Prefect's transaction locks: Prefect 3 isolates a cache key with a lock manager that lives
with one Prefect installation (a file lock in ``PREFECT_HOME``, or Redis), so two flow processes
with their own homes, or a flow and a Ray job, do not see each other's locks, and such a lock knows
nothing of a job that outlives the flow run that started it. The store is the one thing every
runner shares, so the lease lives there.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any, Callable

from trecflow.store import StageOutput

LEASE_PREFIX = "_LEASE-"
PROCESS = "process"
JOB = "job"


class LeaseLost(RuntimeError):
    """Another runner took over this lease (ours expired): stop writing."""


@dataclass(frozen=True)
class Owner:
    """Who holds a lease: a process (host, pid) or a job (its submission id) that outlives it."""

    kind: str
    id: str
    host: str = ""
    pid: int = 0

    @classmethod
    def this_process(cls) -> Owner:
        """This process: ``id`` is ``host:pid:random`` and, where the PID namespace is known,
        ``:ns<inode>`` (`gone` trusts a PID only within the namespace it was taken in)."""
        host = socket.gethostname()
        namespace = pid_namespace()
        return cls(PROCESS, f"{host}:{os.getpid()}:{uuid.uuid4().hex[:8]}" + (f":ns{namespace}" if namespace else ""), host, os.getpid())

    def describe(self) -> str:
        return f"job {self.id}" if self.kind == JOB else f"process {self.pid} on {self.host}"

    def gone(self) -> bool:
        """True only for a process owner of this host and PID namespace whose PID no longer runs (or
        is a zombie). Anything else (a job, another host or container, an owner recorded without
        its namespace, a PID reused by another process) is not known to be gone: False."""
        if self.kind != PROCESS or self.host != socket.gethostname():
            return False
        parts = self.id.rsplit(":", 3)
        namespace = pid_namespace()
        if not namespace or len(parts) != 4 or parts[1] != str(self.pid) or parts[3] != f"ns{namespace}":
            return False
        return not process_running(self.pid)


def pid_namespace() -> str:
    """The inode of this process's PID namespace (Linux), else ""."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a running process of this PID namespace (a zombie is not)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # there, but not ours to read
        return True


@dataclass(frozen=True)
class LeaseRecord:
    """One generation of a lease as read from the store."""

    generation: int
    owner: Owner
    expires_unix: float
    released: bool

    def live(self, now: float | None = None) -> bool:
        return not self.released and (now or time.time()) < self.expires_unix


def lease_seconds() -> float:
    """How long a lease lives without a heartbeat (``TRECFLOW_LEASE_SECONDS``, default 120)."""
    return float(os.environ.get("TRECFLOW_LEASE_SECONDS", "120"))


class Lease:
    """The lease on one output folder, as seen by one owner."""

    def __init__(self, output: StageOutput, owner: Owner, seconds: float | None = None):
        self.output = output
        self.owner = owner
        self.seconds = seconds if seconds is not None else lease_seconds()
        self.generation: int | None = None  # ours, once acquired
        self.taken_over: LeaseRecord | None = None  # the lease we took over (expired, or of a process that is gone), if any

    def _path(self, generation: int) -> str:
        return self.output.file_path(f"{LEASE_PREFIX}{generation:06d}.json")

    def current(self) -> LeaseRecord | None:
        """The lease in force (highest generation), or None if the folder was never leased."""
        fs = self.output.store.fs
        try:
            names = [path.rsplit("/", 1)[1] for path in fs.ls(self.output.path, detail=False)]
        except FileNotFoundError:
            return None
        generations = sorted(int(name[len(LEASE_PREFIX) : -5]) for name in names if name.startswith(LEASE_PREFIX) and name.endswith(".json"))
        if not generations:
            return None
        path = self._path(generations[-1])
        try:
            data = json.loads(fs.cat_file(path))
            return LeaseRecord(generations[-1], Owner(**data["owner"]), float(data["expires_unix"]), bool(data["released"]))
        except (ValueError, KeyError, TypeError):  # written whole (atomic), so only a corrupted store has such a file
            return LeaseRecord(generations[-1], Owner(PROCESS, f"unreadable {self.output.file_uri(path.rsplit('/', 1)[1])}"), 0.0, False)

    def _record(self, released: bool = False) -> bytes:
        return json.dumps({"owner": asdict(self.owner), "expires_unix": time.time() + self.seconds, "released": released}).encode()

    def try_acquire(self, job_running: Callable[[str], bool] | None = None) -> LeaseRecord | None:
        """Take the lease if nobody holds a live one. Returns None on success, else the live lease
        that holds it. An expired or released one is taken over, except an expired lease of a job
        that ``job_running(submission_id)`` says still runs: that job keeps it (its heartbeat
        lapsed, its work did not). A live lease of a process that is `Owner.gone` is taken over."""
        current = self.current()
        if current is not None and current.live() and not current.owner.gone():
            return current
        if current is not None and not current.released and current.owner.kind == JOB and job_running and job_running(current.owner.id):
            return current
        generation = (current.generation if current else 0) + 1
        if not create_exclusive(self.output, self._path(generation), self._record()):  # another runner won it
            return self.current() or LeaseRecord(generation, Owner(PROCESS, "unknown"), time.time() + self.seconds, False)
        self.generation = generation
        self.taken_over = current if current is not None and not current.released else None
        return None

    def renew(self) -> None:
        """Push the expiry forward; LeaseLost when another runner has taken over."""
        current = self.current()
        if current is None or current.generation != self.generation:
            raise LeaseLost(f"{self.output.uri}: the lease was taken over (generation {current.generation if current else None}, ours {self.generation})")
        self._overwrite(self._path(self.generation), self._record())

    def _overwrite(self, path: str, data: bytes) -> None:
        """Replace our lease file whole: a reader never sees half a record (`Store.put_atomic`)."""
        self.output.store.put_atomic(path, data)

    def release(self) -> None:
        """Mark our lease released (the next runner takes the next generation at once)."""
        if self.generation is None:
            return
        current = self.current()
        if current is not None and current.generation == self.generation:
            self._overwrite(self._path(self.generation), self._record(released=True))
        self.generation = None

    def heartbeat(self, on_lost: Callable[[BaseException], None] | None = None) -> Heartbeat:
        return Heartbeat(self, on_lost)


class Heartbeat:
    """Renews a lease every third of its life from a daemon thread while the block runs; releases it
    at the end. A lost lease is recorded and raised when the block ends."""

    def __init__(self, lease: Lease, on_lost: Callable[[BaseException], None] | None = None):
        self.lease = lease
        self.on_lost = on_lost
        self.lost: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{lease.output.stage}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.seconds / 3):
            try:
                self.lease.renew()
            except LeaseLost as error:
                self.lost = error
                if self.on_lost:
                    self.on_lost(error)
                return
            except Exception:  # a transient store error: try again at the next beat
                continue

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        self._stop.set()
        self._thread.join()
        if self.lost is None:
            self.lease.release()
        if self.lost is not None and kind is None:
            raise self.lost


def create_exclusive(output: StageOutput, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; True if this call created it. Atomic on a
    local folder (a hard link of a complete temporary file) and on S3 (a conditional PUT)."""
    store = output.store
    fs = store.fs
    fs.makedirs(output.path, exist_ok=True)
    if store.url.startswith("s3://"):
        bucket, _, key = path.partition("/")
        try:
            fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as error:  # s3fs maps 412 Precondition Failed to an OSError/PermissionError
            if _precondition_failed(error):
                return False
            raise
        return True
    if "://" in store.url and not store.url.startswith("file://"):
        raise NotImplementedError(f"{store.url}: leases need a local folder or S3")
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
    try:
        os.link(temporary, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(temporary)


def _precondition_failed(error: BaseException) -> bool:
    text = f"{type(error).__name__} {error} {getattr(error, '__cause__', '')}"
    return "PreconditionFailed" in text or "412" in text or "ConditionalRequestConflict" in text
