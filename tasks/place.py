"""Stage 3c, placement: the global sample index of one curriculum variant.

Reads the packed sequences' tiers and scores (`tasks.pack`) and stage 2's whole predicted curve,
makes the plan (`tasks.placement`) and writes ``<store>/place/<fingerprint>/``:
``index/steps-*.npy`` (sequence ids, steps x sequences-per-step, in chunks), ``composition.npy``,
``index.json`` (shape and chunking), ``summary.json``, ``placement.png`` (hq share per step over
the predicted TREC, window marked) and the manifest last. The manifest's ``inputs`` are the
fingerprints of the recipe's data and batch, the scored data, the tokenizer, the packed
sequences, the prediction, the strategy and the seed; `training.sample_index.SampleIndex`
refuses an index whose inputs differ from the ones its reader expects.

The same inputs and seed give byte-identical index files (no timestamps, fixed chunking).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np

from tasks.placement import Plan, PlanRequest, check_request, make_plan
from trecflow.fingerprint import fingerprint
from trecflow.progress import as_progress
from trecflow.recipe import TREC_WEIGHTED_K, Recipe
from trecflow.stage import SUMMARY_FILE, VARIANT_SCOPE, Stage, StageContext, StageResult, Summary, Target, omitted_when_none
from trecflow.store import StageOutput, Store
from training.sample_index import COMPOSITION_FILE, INDEX_META, PACK_STAGE, PLACE_STAGE, chunk_name, npy_bytes

STAGE = PLACE_STAGE
STAGE_VERSION = 1  # the summary.json it writes is unchanged, so is the fingerprint
CHUNK_BYTES = 64 * 1024**2  # index chunk files of at most this size (whole steps)
PLOT_FILE = "placement.png"


@dataclass(frozen=True)
class PlacedTier(Summary):
    """One tier in the index: sequences packed (supply), slots given to it, repeated and never placed."""

    supply: int
    slots: int
    repeated: int
    unplaced: int


@dataclass(frozen=True)
class PlaceSummary(Summary):
    """A variant's sample index: its shape, hq share and window (fractions of training and steps;
    None for a strategy without one), repeats and leftovers per tier, strategy and seed. ``variant``
    is not stored (one index can serve several variants): the runner's view adds it, last."""

    steps: int
    sequences_per_step: int
    sequences: int
    hq_fraction: float
    window: tuple[float, float] | None
    window_steps: tuple[int, int] | None
    hq_in_window: float | None
    repeated_sequences: int
    unplaced_sequences: int
    tiers: Mapping[str, PlacedTier]
    strategy: str
    seed: int
    hq_tokens: int
    fingerprint: str
    variant: str | None = omitted_when_none()


def plan_request(recipe: Recipe, variant: str) -> PlanRequest:
    """The plan a variant asks for (``RecipeError`` for an unknown variant)."""
    section = recipe.curriculum.variant(variant)
    params = section.params
    window = params.get("window")
    return PlanRequest(
        steps=recipe.steps,
        batch=recipe.sequences_per_step,
        strategy=section.strategy,
        hq_fraction=float(params.get("hq_fraction", recipe.curriculum.hq_fraction)),
        seed=int(params.get("seed", recipe.curriculum.seed)),
        on_shortage=recipe.curriculum.on_shortage,
        tier_weights=recipe.curriculum.tier_weights,
        window=tuple(window) if window is not None else None,
        k=float(params.get("k", TREC_WEIGHTED_K)),
    )


def index_inputs(recipe: Recipe, variant: str, pack_fp: str, score_fp: str, tokenizer_fp: str, predict_fp: str) -> dict[str, str]:
    """The fingerprints an index of ``variant`` records, and that its readers expect."""
    request = plan_request(recipe, variant)
    strategy = {
        "strategy": request.strategy,
        "hq_fraction": request.hq_fraction,
        "window": request.window,
        "on_shortage": request.on_shortage,
        "tier_weights": request.tier_weights,
    }
    if request.strategy == "trec_weighted":  # only there: the other strategies' fingerprints stay as they were
        strategy["k"] = request.k
    return {
        "recipe": fingerprint("recipe", 1, recipe.section("data", "batch")),
        "score": score_fp,
        "tokenizer": tokenizer_fp,
        "pack": pack_fp,
        "predict": predict_fp,
        "strategy": fingerprint("strategy", 1, strategy),
        "seed": str(request.seed),
    }


def place_fingerprint(inputs: dict[str, str]) -> str:
    return fingerprint(STAGE, STAGE_VERSION, {}, inputs)


def steps_per_chunk(batch: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (batch * itemsize))


def write_index(plan: Plan, output, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the index chunks, the composition and ``index.json``; return the metadata."""
    progress = as_progress(progress, "place")
    per_chunk = steps_per_chunk(plan.batch, plan.ids.dtype.itemsize)
    by_step = plan.ids.reshape(plan.steps, plan.batch)
    total = -(-plan.steps // per_chunk)
    chunks = []
    progress.advance(0, total, "chunks", "of the index written")
    for first in range(0, plan.steps, per_chunk):
        name = chunk_name(first)
        output.write_bytes(name, npy_bytes(np.ascontiguousarray(by_step[first : first + per_chunk])))
        chunks.append(name)
        progress.advance(len(chunks), total, "chunks", "of the index written")
    output.write_bytes(COMPOSITION_FILE, npy_bytes(plan.composition()))
    meta = {
        "steps": plan.steps,
        "sequences_per_step": plan.batch,
        "id_dtype": plan.ids.dtype.name,
        "steps_per_chunk": per_chunk,
        "chunks": chunks,
        "window_steps": list(plan.window_steps) if plan.window_steps else None,
    }
    output.write_bytes(INDEX_META, json.dumps(meta, indent=2).encode())
    return meta


class PlaceStage(
    Stage[PlaceSummary], name=STAGE, version=STAGE_VERSION, inputs=("score", "tokenizer", "pack", "predict"), scope=VARIANT_SCOPE,
    sections=("corpus", "tokenizer"), title="Curriculum placement", task_name="place_curriculum", purpose="placement",
    figure=PLOT_FILE, summary_type=PlaceSummary
):
    """Stage 3c: the global sample index of one curriculum variant (for every optimizer step,
    which packed sequences it trains on). Its manifest records `index_inputs`, which training and
    re-evaluation check the index against."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return place_fingerprint(self.manifest_inputs(target, upstream, ""))

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        return index_inputs(target.recipe, target.variant, upstream["pack"].fingerprint, upstream["score"].fingerprint,
                            upstream["tokenizer"].fingerprint, upstream["predict"].fingerprint)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> PlaceSummary:
        return place(target.recipe, target.variant, context.store, upstream["pack"].fingerprint, upstream["predict"].fingerprint,
                     output, context.progress)

    def view(self, target: Target, summary: PlaceSummary) -> PlaceSummary:
        return replace(summary, variant=target.variant)

    def counts(self, summary: PlaceSummary) -> dict[str, Any]:
        return {"steps": summary.steps, "sequences": summary.sequences, "repeated": summary.repeated_sequences}

    def rows(self, summary: PlaceSummary) -> list[tuple[str, str]]:
        window = summary.window
        rows = [
            ("variant", f"{summary.variant} ({summary.strategy}, seed {summary.seed})"),
            ("index", f"{summary.steps:,} steps x {summary.sequences_per_step:,} sequences = {summary.sequences:,}"),
            ("hq share", f"{summary.hq_fraction:.4f} ({summary.hq_tokens:,} tokens)"),
            ("window", "none (the strategy has none)" if window is None else
             f"[{window[0]:.4f}, {window[1]:.4f}] (steps {summary.window_steps[0]:,}..{summary.window_steps[1] - 1:,})"),
            ("hq inside the window", "n/a" if summary.hq_in_window is None else f"{summary.hq_in_window:.4f}"),
            ("repeated sequences", f"{summary.repeated_sequences:,}"),
            ("unplaced sequences", f"{summary.unplaced_sequences:,}"),
        ]
        rows += [
            (f"  {tier}", f"{entry.slots:,} placed of {entry.supply:,} packed; {entry.repeated:,} repeated, {entry.unplaced:,} unplaced")
            for tier, entry in summary.tiers.items()
        ]
        return rows

    def metrics(self, summary: PlaceSummary) -> dict[str, float]:
        metrics = {
            "hq_fraction_placed": summary.hq_fraction,
            "hq_tokens": summary.hq_tokens,
            "repeated_sequences": summary.repeated_sequences,
            "unplaced_sequences": summary.unplaced_sequences,
        }
        if summary.window is not None:
            metrics |= {"placement_window_start": summary.window[0], "placement_window_end": summary.window[1]}
        if summary.hq_in_window is not None:
            metrics["hq_in_window"] = summary.hq_in_window
        return metrics

    def artifacts(self, summary: PlaceSummary) -> list[str]:
        return [PLOT_FILE, SUMMARY_FILE, INDEX_META]


PLACE = PlaceStage()


def run_place(
    recipe: Recipe, variant: str, store: Store, pack_fp: str, predict_fp: str, force: bool = False, progress: Callable[[str], None] = print
) -> StageResult[PlaceSummary]:
    """The sample index of ``variant`` alone, from the committed pack and predict outputs."""
    from trecflow.runner import run_stage, stored

    check_request(plan_request(recipe, variant))  # a window too small for w: an error before reading anything
    packed = stored(store, PACK_STAGE, pack_fp)
    upstream = {"score": packed.inputs["score"], "tokenizer": packed.inputs["tokenizer"], "pack": packed, "predict": predict_fp}
    return run_stage(PLACE, Target(recipe, variant), store, upstream, force=force, progress=progress)


def place(recipe: Recipe, variant: str, store: Store, pack_fp: str, predict_fp: str, output: StageOutput, progress: Callable[[str], None]) -> PlaceSummary:
    """Plan the variant's index from the packed catalog and the predicted curve; write it."""
    from tasks.pack import read_catalog
    from tasks.predict import read_curve
    from training.trec_plot import plot_placement

    request = plan_request(recipe, variant)
    check_request(request)
    tiers, scores = read_catalog(store, pack_fp)
    curve = read_curve(store, predict_fp)
    trec = curve["trec_pred"].to_numpy()
    progress(f"place: {variant} ({request.strategy}): {request.slots:,} slots from {tiers.size:,} packed sequences")
    plan = make_plan(request, tiers, scores, trec)
    summary = PlaceSummary(
        **plan.summary(),
        strategy=request.strategy,
        seed=request.seed,
        hq_tokens=plan.hq_slots * recipe.data.seq_len,
        fingerprint=output.fingerprint,
    )
    write_index(plan, output, progress)
    output.write_bytes(
        PLOT_FILE,
        plot_placement(
            curve["fraction"].to_numpy(), trec, plan.hq_share_per_step(), summary.window, summary.hq_fraction,
            title=f"{recipe.name} / {variant}: {request.strategy} placement",
        ),
    )
    progress(
        f"place: hq share {summary.hq_fraction:.4f}, window {None if summary.window is None else list(summary.window)}, hq in window {summary.hq_in_window}, "
        f"repeated {summary.repeated_sequences:,}, unplaced {summary.unplaced_sequences:,}"
    )
    return summary
