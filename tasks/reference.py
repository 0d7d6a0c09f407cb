"""The reference model of the difficulty correction, and its per-sequence loss cache.

- ``reevaluation.reference: base``: the CPT run's own base model (costs nothing to train).
- ``reevaluation.reference: trained``: the recipe's ``uniform`` run trained from the same base on
  the ``reference`` split (disjoint from the ``cpt`` data by construction), by the same job as the
  CPT run; output ``<store>/reference/<fingerprint>/``.
- ``reevaluation.reference: shuffled``: the same ``uniform`` run on the ``cpt`` split itself at
  ``reevaluation.reference_seed``: it trains on much of the measured run's data (and on other parts
  of the same documents), once, at steps unrelated to the run's, so its loss on a sequence carries
  the content the run learned from it without the run's order (the recipe refuses a reference seed
  equal to the run's). Output as for ``trained``.

Reference losses are cached per packed sequence id in ``<store>/refcache/<model fp>-<pack fp>/``:
immutable parquet parts (``sequence_id``, ``loss``), each written whole, so variants that permute
the same sequences share them and an interrupted pass keeps what it finished.
"""

from __future__ import annotations

import io
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from trecflow.recipe import Recipe, RecipeError, parse_recipe
from trecflow.fingerprint import fingerprint
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target, omitted_when_none
from trecflow.integrity import read_parquet
from trecflow.store import StageOutput, Store, StoreError
from training.reevaluation import ActorPool, Unit

STAGE = "reference"
STAGE_VERSION = 2  # 2: a derived run of the graph (its training lives under train/)
CACHE = "refcache"


@dataclass(frozen=True)
class Reference:
    kind: str  # base | trained | shuffled
    fingerprint: str
    uri: str


@dataclass(frozen=True)
class ReferenceSummary(Summary):
    """The reference model: ``kind`` (``base``: the CPT run's base model, not stored; ``trained``:
    see `TrainedReferenceSummary`) and its checkpoint."""

    kind: str
    model_uri: str


@dataclass(frozen=True)
class TrainedReferenceSummary(ReferenceSummary):
    """A reference trained from the base (``kind`` "trained": on the reference split; "shuffled": on
    the cpt split at the reference seed): its training run, final loss, and what it trained on."""

    train_fingerprint: str
    final_loss: float
    slots: int | None = omitted_when_none()  # sequence slots of the reference run (None: stored before they were recorded)
    repeated_sequences: int | None = omitted_when_none()  # slots filled by a sequence already used once
    repeated_share: float | None = omitted_when_none()
    split: str | None = omitted_when_none()  # the split it trained on (None: stored before it was recorded, "reference")
    split_sequences: int | None = omitted_when_none()  # the packed sequences of that split
    unique_sequences: int | None = omitted_when_none()  # of them, how many it trained on


ReferenceSummary.forms = {"base": ReferenceSummary, "trained": TrainedReferenceSummary, "shuffled": TrainedReferenceSummary}


def reference_split(recipe: Recipe) -> str:
    """The split a trained reference learns from: ``cpt`` for ``shuffled``, else ``reference``."""
    return "cpt" if recipe.reevaluation.reference == "shuffled" else "reference"


def reference_recipe(recipe: Recipe) -> Recipe:
    """The CPT recipe with one ``uniform`` variant, for the reference run (``shuffled``: its
    curriculum and training seeds are ``reevaluation.reference_seed``)."""
    data = recipe.model_dump(mode="json")
    curriculum = dict(data["curriculum"], variants={"uniform": {"strategy": "uniform"}}, on_shortage="repeat")
    if recipe.reevaluation.reference == "shuffled":
        seed = recipe.reevaluation.reference_seed
        curriculum["seed"] = seed
        data["training"] = dict(data["training"], seed=seed)
        data["reevaluation"] = dict(data["reevaluation"], reference="none")  # the reference run has none of its own
    data.update(name=f"{recipe.name}-reference", curriculum=curriculum)
    return parse_recipe(data, source=f"{recipe.name}: reevaluation.reference")


class ReferenceStage(
    Stage[ReferenceSummary], name=STAGE, version=STAGE_VERSION, inputs=("score", "tokenizer", "base"), sections=("corpus", "tokenizer", "base"),
    title="Reference model", task_name="train_reference", summary_type=ReferenceSummary
):
    """The reference model of the difficulty correction. ``base``: the base model itself (nothing to
    compute; forcing it is a no-op). ``trained`` / ``shuffled``: the graph run on the reference
    recipe and the ``reference`` / ``cpt`` split — pack, predict, a ``uniform`` placement, training
    from the base."""

    def applies(self, target: Target) -> bool:
        return super().applies(target) and target.recipe.reevaluation.reference != "none"

    def missing(self, target: Target) -> list[str]:
        return super().missing(target) or (["reevaluation.reference"] if target.recipe.reevaluation.reference == "none" else [])

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        recipe = target.recipe
        if recipe.reevaluation.reference == "base":
            return upstream["base"].fingerprint
        config = reference_recipe(recipe).section("data", "batch", "optimizer", "schedule", "curriculum", "training", "trec")
        if recipe.reevaluation.reference == "shuffled":
            config["split"] = "cpt"  # a trained reference's fingerprint stays what it was
        return fingerprint(STAGE, STAGE_VERSION, config, {name: result.fingerprint for name, result in upstream.items()})

    def resolve(self, target: Target, upstream: Mapping[str, StageResult], store: Store, fp: str) -> StageResult | None:
        model_uri = upstream["base"].summary.model_uri
        if model_uri is None:
            raise RecipeError("reevaluation.reference: the base model has no checkpoint to evaluate with")
        if target.recipe.reevaluation.reference != "base":
            return None
        return StageResult(STAGE, fp, model_uri, ReferenceSummary(kind="base", model_uri=model_uri), True)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> TrainedReferenceSummary:
        recipe = target.recipe
        kind, split = recipe.reevaluation.reference, reference_split(recipe)
        if split == "reference" and recipe.corpus.splits.get("reference", 0.0) <= 0:
            raise RecipeError("reevaluation.reference: trained needs a reference split with a positive share (corpus.splits.reference)")
        runner = context.runner.derived(forced=("train",) if context.force else ())
        derived = Target(reference_recipe(recipe), "uniform", split=split)
        results = runner.run(derived, until="pack", given=dict(upstream))
        split_sequences = results["pack"].summary.sequences
        if split_sequences == 0:
            raise RecipeError(f"reevaluation.reference: the {split} split packed into no sequences")
        results = runner.run(derived, until="place", given=results)
        placed = results["place"].summary
        check_repeats(placed.repeated_sequences, placed.sequences, recipe.reevaluation.reference_max_repeat)
        share = placed.repeated_sequences / placed.sequences
        unique = placed.sequences - placed.repeated_sequences
        context.progress(f"reference ({kind}): {placed.repeated_sequences:,} of {placed.sequences:,} sequence slots repeat a sequence ({share:.1%}); "
                         f"it trains on {unique:,} of the {split} split's {split_sequences:,} sequences")
        trained = runner.run(derived, until="train", given=results)["train"]
        return TrainedReferenceSummary(kind=kind, model_uri=trained.summary.model_uri, train_fingerprint=trained.fingerprint,
                                       final_loss=trained.summary.final_loss, slots=placed.sequences,
                                       repeated_sequences=placed.repeated_sequences, repeated_share=share,
                                       split=split, split_sequences=split_sequences, unique_sequences=unique)

    def rows(self, summary: ReferenceSummary) -> list[tuple[str, str]]:
        rows = [("reference", f"{summary.kind}: {summary.model_uri}")]
        if getattr(summary, "repeated_share", None) is not None:
            rows.append(("repeated", f"{summary.repeated_sequences:,} of {summary.slots:,} sequence slots ({summary.repeated_share:.1%})"))
        if getattr(summary, "split", None) is not None:
            rows.append(("trained on", f"{summary.unique_sequences:,} of the {summary.split} split's {summary.split_sequences:,} sequences"))
        return rows


REFERENCE = ReferenceStage()


def check_repeats(repeated: int, slots: int, limit: float) -> None:
    """RecipeError when a trained reference would repeat more than ``limit`` of its sequence slots:
    a reference that has seen its data several times is not the model of content difficulty the
    correction assumes (and nothing would say so)."""
    if slots and repeated / slots > limit:
        raise RecipeError(
            f"reevaluation.reference_max_repeat: the trained reference would repeat {repeated:,} of its {slots:,} sequence slots "
            f"({repeated / slots:.0%}, limit {limit:.0%}): the reference split is too small for the CPT token budget; "
            "raise corpus.splits.reference, lower data.tokens, raise the limit, or use reevaluation.reference: base"
        )


def reference_of(result: StageResult[ReferenceSummary]) -> Reference:
    return Reference(result.summary.kind, result.fingerprint, result.summary.model_uri)


def cache_folder(store: Store, reference: Reference, pack_fp: str) -> str:
    return store.path(CACHE, f"{reference.fingerprint}-{pack_fp}")


def read_cache(store: Store, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted sequence ids, their losses) of every complete part in ``folder``; a part that cannot
    be decoded (truncated or corrupt) is removed, so its sequences are evaluated again."""
    if not store.fs.exists(folder):
        return np.empty(0, np.int64), np.empty(0, np.float64)
    tables = []
    for path in sorted(store.fs.glob(f"{folder}/part-*.parquet")):
        try:
            tables.append(read_parquet(store, path))
        except StoreError:
            store.fs.rm(path)
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


def reference_losses(store: Store, reference: Reference, pack_fp: str, needed: np.ndarray, pool: ActorPool,
                     seq_len: int, progress: Callable[[str], None] = print) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Reference losses of the sequence ids ``needed``: from the cache, evaluating only the missing
    ids (and caching them) on ``pool``'s actors, which load the reference for it. Returns (sorted
    unique ids, losses, counts)."""
    folder = cache_folder(store, reference, pack_fp)
    needed = np.unique(np.asarray(needed, dtype=np.int64))
    cached_ids, cached_losses = read_cache(store, folder)
    missing = needed[~np.isin(needed, cached_ids)]
    counts = {"sequences": int(needed.size), "from_cache": int(needed.size - missing.size), "evaluated": int(missing.size)}
    progress(f"reference ({reference.kind}): {counts['from_cache']:,} of {needed.size:,} sequence losses cached; evaluating {missing.size:,}")
    if missing.size:
        unit_size = max(1, min(4096, -(-missing.size // (len(pool.actors) * 4))))
        units = [Unit(start, missing[start : start + unit_size], min(unit_size, missing.size - start) * seq_len)
                 for start in range(0, missing.size, unit_size)]
        spec = replace(pool.spec, uri=reference.uri)
        retried = pool.retried
        pool.run(units, lambda unit, losses: write_part(store, folder, unit.work, losses), progress=progress, label="reference", spec=spec)
        counts["retried_units"] = pool.retried - retried
        cached_ids, cached_losses = read_cache(store, folder)
    where = np.searchsorted(cached_ids, needed)
    return needed, cached_losses[where], counts
