"""The peak memory of a process tree: this process (or another) and every process under it.

On the embedded default that is the flow process, Prefect's temporary server and the local Ray
(its GCS, raylet, and every worker and actor: DeepSpeed's training workers, re-evaluation
actors), all started under this process. On a cluster the Ray work runs elsewhere and is not in
the tree. A background thread sums, every `SAMPLE_SECONDS`, each process's

- RSS (resident pages; shared ones such as the libraries every Ray worker maps, or Ray's object
  store, counted once per process that maps them: an upper bound), and
- PSS (proportional set size: a shared page counted as its share per process, so the sum is the
  memory the tree really holds, read from ``/proc/<pid>/smaps_rollup`` on Linux; None elsewhere).

A peak between two samples is missed, so both are lower bounds of the true peak of their kind.
PSS is not free: the kernel walks each process's page tables for ``smaps_rollup``, ~3-4 ms of CPU
per Ray process on a 2-core machine (measured: 14 processes, 45-65 ms a sample), so a long-running
flow samples every few seconds (`flows.compare`: 2 s) and a benchmark more often.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import psutil

SAMPLE_SECONDS = 0.5


@dataclass
class TreePeak:
    """The largest sums seen: RSS and PSS in bytes (PSS None where the platform has none), the
    most processes at once, and how many samples were taken."""

    rss: int = 0
    pss: int | None = None
    processes: int = 0
    samples: int = 0

    def as_json(self) -> dict[str, float | int | None]:
        return {"peak_rss_mb": round(self.rss / 2**20, 1), "peak_pss_mb": None if self.pss is None else round(self.pss / 2**20, 1),
                "peak_processes": self.processes, "samples": self.samples}

    def text(self) -> str:
        """``PSS 1,234 MiB (RSS 2,345 MiB), 31 processes at most``."""
        pss = "PSS unknown" if self.pss is None else f"PSS {self.pss / 2**20:,.0f} MiB"
        return f"{pss} (RSS {self.rss / 2**20:,.0f} MiB), {self.processes} processes at most"

    def as_metrics(self) -> dict[str, float]:
        """``peak_rss_mb``, ``peak_pss_mb`` (when known), ``peak_processes``: MLflow metrics."""
        metrics = {"peak_rss_mb": self.rss / 2**20, "peak_processes": float(self.processes)}
        if self.pss is not None:
            metrics["peak_pss_mb"] = self.pss / 2**20
        return metrics


def tree_memory(root: psutil.Process) -> tuple[int, int | None, int]:
    """One sample: summed RSS, summed PSS (None if unreadable) and the count of ``root`` and its
    descendants. A process that ends while it is read is left out of this sample."""
    rss, pss, count, pss_known = 0, 0, 0, True
    try:
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0, None, 0
    for process in processes:
        try:
            info = process.memory_full_info()
        except psutil.AccessDenied:
            try:
                info = process.memory_info()
            except psutil.Error:
                continue
        except psutil.Error:  # it ended
            continue
        rss += info.rss
        count += 1
        if hasattr(info, "pss"):
            pss += info.pss
        else:
            pss_known = False
    return rss, (pss if pss_known else None), count


class PeakMemory:
    """``with PeakMemory() as peak:`` samples the tree under ``pid`` (default: this process) in a
    daemon thread until the block ends; ``peak.result`` is the `TreePeak` so far (final after it)."""

    def __init__(self, pid: int | None = None, interval: float = SAMPLE_SECONDS):
        self.root = psutil.Process(pid)
        self.interval = interval
        self.result = TreePeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def sample(self) -> None:
        rss, pss, count = tree_memory(self.root)
        peak = self.result
        peak.samples += 1
        peak.rss = max(peak.rss, rss)
        peak.processes = max(peak.processes, count)
        if pss is not None:
            peak.pss = max(peak.pss or 0, pss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()  # the tree as the block ends
