"""The reference model of the difficulty correction, and its per-sequence loss cache.

- ``reevaluation.reference: base``: the CPT run's own base model (costs nothing to train).
- ``reevaluation.reference: trained``: the recipe's ``uniform`` run trained from the same base on
  the ``reference`` split (disjoint from the ``cpt`` data by construction), by the same job as the
  CPT run; output ``<store>/reference/<fingerprint>/``.

Reference losses are cached per packed sequence id in ``<store>/refcache/<model fp>-<pack fp>/``:
immutable parquet parts (``sequence_id``, ``loss``), each written whole, so variants that permute
the same sequences share them and an interrupted pass keeps what it finished.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.train import BaseModel
from trecflow.recipe import Recipe, RecipeError, parse_recipe
from trecflow.store import Store
from training.reevaluation import ActorPool, ModelSpec, Unit

STAGE = "reference"
CACHE = "refcache"


@dataclass(frozen=True)
class Reference:
    kind: str  # base | trained
    fingerprint: str
    uri: str


def reference_recipe(recipe: Recipe) -> Recipe:
    """The CPT recipe with one ``uniform`` variant, for the run on the reference split."""
    data = recipe.model_dump(mode="json")
    curriculum = dict(data["curriculum"], variants={"uniform": {"strategy": "uniform"}}, on_shortage="repeat")
    data.update(name=f"{recipe.name}-reference", curriculum=curriculum)
    return parse_recipe(data, source=f"{recipe.name}: reevaluation.reference")


def reference_fingerprint(recipe: Recipe, base: BaseModel, score_fp: str, tokenizer_fp: str) -> str | None:
    """The configured reference's fingerprint, computed from fingerprints alone (nothing trained)."""
    kind = recipe.reevaluation.reference
    if kind == "none":
        return None
    if kind == "base":
        return base.fingerprint
    from tasks.pack import pack_fingerprint
    from tasks.place import index_inputs, place_fingerprint
    from tasks.predict import predict_fingerprint
    from tasks.train import train_fingerprint

    ref_recipe = reference_recipe(recipe)
    pack_fp = pack_fingerprint(recipe, score_fp, tokenizer_fp, "reference")
    inputs = index_inputs(ref_recipe, "uniform", pack_fp, score_fp, tokenizer_fp, predict_fingerprint(ref_recipe))
    return train_fingerprint(ref_recipe, place_fingerprint(inputs), base.fingerprint, stage=STAGE)


def resolve_reference(recipe: Recipe, store: Store, base: BaseModel, score_fp: str, tokenizer_fp: str,
                      progress: Callable[[str], None] = print) -> Reference | None:
    """The configured reference model (training it when ``trained`` and not yet in the store)."""
    kind = recipe.reevaluation.reference
    if kind == "none":
        return None
    if base.uri is None:
        raise RecipeError("reevaluation.reference: the base model has no checkpoint to evaluate with")
    if kind == "base":
        return Reference("base", base.fingerprint, base.uri)
    from tasks.pack import run_pack
    from tasks.place import index_inputs, run_place
    from tasks.predict import run_predict
    from tasks.train import run_train

    if recipe.corpus is None or recipe.corpus.splits.get("reference", 0.0) <= 0:
        raise RecipeError("reevaluation.reference: trained needs a reference split with a positive share (corpus.splits.reference)")
    packed = run_pack(recipe, store, score_fp, tokenizer_fp, progress=progress, split="reference")
    if packed.stats["sequences"] == 0:
        raise RecipeError("reevaluation.reference: the reference split packed into no sequences")
    ref_recipe = reference_recipe(recipe)
    predicted = run_predict(ref_recipe, store)
    placed = run_place(ref_recipe, "uniform", store, packed.fingerprint, predicted.fingerprint, progress=progress)
    expected = index_inputs(ref_recipe, "uniform", packed.fingerprint, score_fp, tokenizer_fp, predicted.fingerprint)
    trained = run_train(ref_recipe, store, placed.fingerprint, expected, base, progress=progress, stage=STAGE)
    if trained.fingerprint != reference_fingerprint(recipe, base, score_fp, tokenizer_fp):
        raise RuntimeError("reference: the trained reference's fingerprint differs from the one computed ahead (a bug)")
    return Reference("trained", trained.fingerprint, trained.summary["model_uri"])


def cache_folder(store: Store, reference: Reference, pack_fp: str) -> str:
    return store.path(CACHE, f"{reference.fingerprint}-{pack_fp}")


def read_cache(store: Store, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted sequence ids, their losses) of every complete part in ``folder``."""
    if not store.fs.exists(folder):
        return np.empty(0, np.int64), np.empty(0, np.float64)
    tables = []
    for path in sorted(store.fs.glob(f"{folder}/part-*.parquet")):
        with store.fs.open(path, "rb") as handle:
            tables.append(pq.read_table(handle))
    if not tables:
        return np.empty(0, np.int64), np.empty(0, np.float64)
    table = pa.concat_tables(tables)
    ids = table["sequence_id"].to_numpy()
    ids, first = np.unique(ids, return_index=True)
    return ids, table["loss"].to_numpy()[first]


def write_part(store: Store, folder: str, ids: np.ndarray, losses: np.ndarray) -> None:
    """One immutable part, written whole (`Store.put_atomic`)."""
    buffer = io.BytesIO()
    pq.write_table(pa.table({"sequence_id": pa.array(ids, pa.int64()), "loss": pa.array(losses, pa.float64())}), buffer)
    store.put_atomic(f"{folder}/part-{uuid.uuid4().hex}.parquet", buffer.getvalue())


def reference_losses(store: Store, reference: Reference, pack_fp: str, needed: np.ndarray, pool_settings: dict,
                     seq_len: int, progress: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Reference losses of the sequence ids ``needed``: from the cache, evaluating only the missing
    ids (and caching them). Returns (sorted unique ids, losses, counts)."""
    folder = cache_folder(store, reference, pack_fp)
    needed = np.unique(np.asarray(needed, dtype=np.int64))
    cached_ids, cached_losses = read_cache(store, folder)
    missing = needed[~np.isin(needed, cached_ids)]
    counts = {"sequences": int(needed.size), "from_cache": int(needed.size - missing.size), "evaluated": int(missing.size)}
    progress(f"reference ({reference.kind}): {counts['from_cache']:,} of {needed.size:,} sequence losses cached; evaluating {missing.size:,}")
    if missing.size:
        unit_size = max(1, min(4096, -(-missing.size // (pool_settings["size"] * 4))))
        units = [Unit(start, missing[start : start + unit_size], min(unit_size, missing.size - start) * seq_len)
                 for start in range(0, missing.size, unit_size)]
        spec = ModelSpec(reference.uri, store.endpoint_url, **pool_settings["model"])
        with ActorPool(pool_settings["size"], spec, store.url, store.endpoint_url, pack_fp, pool_settings["max_retries"],
                       pool_settings["cpus_per_actor"]) as pool:
            pool.run(units, lambda unit, losses: write_part(store, folder, unit.work, losses), progress=progress, label="reference")
            counts["retried_units"] = pool.retried
        cached_ids, cached_losses = read_cache(store, folder)
    where = np.searchsorted(cached_ids, needed)
    return needed, cached_losses[where], counts
