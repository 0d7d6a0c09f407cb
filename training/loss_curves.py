"""Training loss curves read from the store: what the forecast, the collapse monitor and the
comparison read, found through the training output's fingerprint (never through MLflow's layout).

- `final_trajectory`: each step's last audit record (a re-executed step's last attempt wins).
- `read_curve`: a finished run's curve as arrays (step, the LR applied, the loss) with its
  `RUN_FILE` descriptor.
- `RUN_FILE` (``run.json``), written into every training output by stage 4 (`run_descriptor`):
  what places a run in a family of comparable runs (schedule section, peak LR, weight decay, steps,
  TPP, tau, sequences per step, sequence length). Outputs trained before it existed have none and
  are not catalogued.
- `catalog`: the descriptors of every finished training output of a store, one listing of
  ``train/*/run.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from trecflow.recipe import Recipe
from trecflow.store import MANIFEST, Store
from training.audit import last_records, read_audit

TRAIN_STAGE = "train"
RUN_FILE = "run.json"
CATALOG_BATCH = 256  # run.json files read per batched request


def run_descriptor(recipe: Recipe, variant: str | None = None) -> dict[str, Any]:
    """What makes two runs comparable (JSON-able): the schedule section, the optimizer's peak LR
    and weight decay, the steps, TPP, tau = 1/(peak_lr * weight_decay * T), the batch shape."""
    optimizer = recipe.optimizer
    return {
        "recipe": recipe.name,
        "variant": variant,
        "schedule": recipe.schedule.model_dump(mode="json"),
        "peak_lr": optimizer.peak_lr,
        "weight_decay": optimizer.weight_decay,
        "steps": recipe.steps,
        "tpp": recipe.data.tokens / recipe.model.params,
        "tau": 1.0 / (optimizer.peak_lr * optimizer.weight_decay * recipe.steps),
        "sequences_per_step": recipe.sequences_per_step,
        "seq_len": recipe.data.seq_len,
        "params": recipe.model.params,
    }


def final_trajectory(store: Store, train_fp: str) -> list[dict[str, Any]]:
    """Each step's last audit record of the training output ``train_fp``, by step."""
    last = last_records(read_audit(store, store.output(TRAIN_STAGE, train_fp).path))
    return [last[step] for step in sorted(last)]


@dataclass(frozen=True)
class LossCurve:
    """One run's loss curve: ``steps`` (0-based), ``lrs`` (the LR each step applied) and
    ``losses`` (its training loss), equal-length arrays; ``descriptor`` is its `RUN_FILE` content
    (empty for a curve that is not a stored run, e.g. one read from a CSV file)."""

    name: str
    steps: np.ndarray
    lrs: np.ndarray
    losses: np.ndarray
    descriptor: dict[str, Any] = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return int(self.descriptor.get("steps") or (int(self.steps[-1]) + 1 if self.steps.size else 0))


def read_curve(store: Store, train_fp: str, name: str | None = None) -> LossCurve:
    """The loss curve of the training output ``train_fp`` (its descriptor when it has one)."""
    records = final_trajectory(store, train_fp)
    return LossCurve(
        name=name or train_fp,
        steps=np.array([record["step"] for record in records], dtype=np.int64),
        lrs=np.array([record["lr"] for record in records], dtype=np.float64),
        losses=np.array([record["loss"] for record in records], dtype=np.float64),
        descriptor=read_descriptor(store, train_fp) or {},
    )


def read_descriptor(store: Store, train_fp: str) -> dict[str, Any] | None:
    """The `RUN_FILE` of a training output, or None when it has none."""
    path = store.output(TRAIN_STAGE, train_fp).file_path(RUN_FILE)
    return json.loads(store.fs.cat_file(path)) if store.fs.exists(path) else None


def catalog(store: Store) -> Iterator[tuple[str, dict[str, Any]]]:
    """(fingerprint, descriptor) of every finished (manifest present) training output that has a
    descriptor, in fingerprint order: two listings, then the descriptors in batched reads."""
    root = store.path(TRAIN_STAGE)
    described = {path.rsplit("/", 2)[-2]: path for path in store.fs.glob(f"{root}/*/{RUN_FILE}")}
    finished = {path.rsplit("/", 2)[-2] for path in store.fs.glob(f"{root}/*/{MANIFEST}")}
    names = sorted(set(described) & finished)
    for first in range(0, len(names), CATALOG_BATCH):  # one batched read per CATALOG_BATCH runs (concurrent on S3)
        paths = [described[name] for name in names[first : first + CATALOG_BATCH]]
        contents = store.fs.cat(paths)
        for name, path in zip(names[first : first + CATALOG_BATCH], paths):
            yield name, json.loads(contents[path])
