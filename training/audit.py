"""The training audit log: one record per optimizer step of every attempt, durable in the store.

Layout under a training output folder: ``audit/attempt-<NNN>/part-<first step>.jsonl``. Every
start of the training function (the first, each Ray Train restart after a worker failure, each
Prefect retry) is a new attempt, numbered after the ones already in the store. Rank 0 writes one
JSON line per step: ``step``, ``attempt``, ``batch_hash`` (`training.sample_index.batch_hash` of
the global batch), ``lr`` (the LR the optimizer applied), ``loss`` (mean over micro-batches and
ranks), ``tokens`` and ``seconds``. The current part (at most `PART_STEPS` lines) is rewritten
after every step, so a record is in the store as soon as its step ends, on a local folder and on
S3 alike, at the cost of one small write per step.

"Exactly once" (`check_audit`): the last record of each step, by attempt, covers steps 0..T-1
in order with the hash the plan names for that step; records of the same step in earlier
attempts are re-executions, counted and reported.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from trecflow.store import Store

AUDIT_DIR = "audit"
PART_STEPS = 100
_ATTEMPT = re.compile(r"attempt-(\d+)$")


def attempts(store: Store, folder: str) -> list[int]:
    """Attempt numbers already recorded under ``folder`` (a path inside the store), sorted."""
    root = f"{folder}/{AUDIT_DIR}"
    if not store.fs.exists(root):
        return []
    found = []
    for entry in store.fs.ls(root, detail=False):
        match = _ATTEMPT.search(entry.rstrip("/"))
        if match:
            found.append(int(match.group(1)))
    return sorted(found)


class AuditWriter:
    """Rank 0's writer for one attempt. `record` makes the step's line durable before returning."""

    def __init__(self, store: Store, folder: str, attempt: int):
        self.store = store
        self.attempt = attempt
        self.folder = f"{folder}/{AUDIT_DIR}/attempt-{attempt:03d}"
        self._lines: list[str] = []
        self._first: int | None = None

    @classmethod
    def next_attempt(cls, store: Store, folder: str) -> AuditWriter:
        done = attempts(store, folder)
        return cls(store, folder, (done[-1] + 1) if done else 1)

    def record(self, step: int, batch_hash: str, lr: float, loss: float, tokens: int, seconds: float) -> None:
        if self._first is None or len(self._lines) >= PART_STEPS:
            self._first, self._lines = step, []
        entry = {"step": step, "attempt": self.attempt, "batch_hash": batch_hash, "lr": lr, "loss": loss, "tokens": tokens, "seconds": seconds}
        self._lines.append(json.dumps(entry))
        self.store.fs.makedirs(self.folder, exist_ok=True)
        self.store.fs.pipe_file(f"{self.folder}/part-{self._first:09d}.jsonl", ("\n".join(self._lines) + "\n").encode())


def latest_record(store: Store, folder: str) -> dict[str, Any] | None:
    """The newest record of the newest attempt (reads one part file: cheap at any length)."""
    done = attempts(store, folder)
    if not done:
        return None
    newest = f"{folder}/{AUDIT_DIR}/attempt-{done[-1]:03d}"
    parts = sorted(path for path in store.fs.ls(newest, detail=False) if path.endswith(".jsonl"))
    if not parts:
        return None
    lines = store.fs.cat_file(parts[-1]).decode().splitlines()
    return json.loads(lines[-1]) if lines else None


def read_audit(store: Store, folder: str) -> list[dict[str, Any]]:
    """Every record of every attempt, by attempt, then in the order written."""
    records: list[dict[str, Any]] = []
    for attempt in attempts(store, folder):
        root = f"{folder}/{AUDIT_DIR}/attempt-{attempt:03d}"
        for part in sorted(store.fs.ls(root, detail=False)):
            if part.endswith(".jsonl"):
                text = store.fs.cat_file(part).decode()
                records.extend(json.loads(line) for line in text.splitlines() if line)
    return records


@dataclass
class AuditReport:
    """What the audit log says about one training run."""

    steps: int
    records: int
    attempts: list[int]
    reexecuted_steps: int
    missing_steps: list[int] = field(default_factory=list)
    wrong_batches: list[int] = field(default_factory=list)
    out_of_order: bool = False
    final: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def exactly_once(self) -> bool:
        return not self.missing_steps and not self.wrong_batches and not self.out_of_order

    def summary(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "records": self.records,
            "attempts": self.attempts,
            "reexecuted_steps": self.reexecuted_steps,
            "missing_steps": self.missing_steps[:20],
            "wrong_batches": self.wrong_batches[:20],
            "out_of_order": self.out_of_order,
            "exactly_once": self.exactly_once,
        }


def last_records(records: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each step's last record (records by attempt, as `read_audit` returns them: a re-executed
    step's latest attempt wins), keyed by step."""
    return {record["step"]: record for record in records}


def check_audit(records: list[dict[str, Any]], steps: int, planned_hash: Callable[[int], str]) -> AuditReport:
    """Compare the final trajectory (each step's last record) with the plan's batch hashes."""
    last = last_records(records)
    final = [last[step] for step in sorted(last)]
    report = AuditReport(
        steps=steps,
        records=len(records),
        attempts=sorted({record["attempt"] for record in records}),
        reexecuted_steps=len(records) - len(last),
        final=final,
    )
    report.missing_steps = [step for step in range(steps) if step not in last]
    report.wrong_batches = [record["step"] for record in final if record["batch_hash"] != planned_hash(record["step"])]
    # within each attempt, steps must run in increasing order without gaps
    for attempt in report.attempts:
        run = [record["step"] for record in records if record["attempt"] == attempt]
        if any(b != a + 1 for a, b in zip(run, run[1:])):
            report.out_of_order = True
    return report
