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
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from tasks.placement import Plan, PlanRequest, check_request, make_plan
from tasks.stage_task import stage_task
from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe
from trecflow.store import Store
from training.sample_index import COMPOSITION_FILE, INDEX_META, PACK_STAGE, PLACE_STAGE, chunk_name, npy_bytes

STAGE = PLACE_STAGE
STAGE_VERSION = 1
CHUNK_BYTES = 64 * 1024**2  # index chunk files of at most this size (whole steps)
SUMMARY_FILE = "summary.json"
PLOT_FILE = "placement.png"


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


def pack_inputs(store: Store, pack_fp: str) -> dict[str, str]:
    """The score and tokenizer fingerprints a committed pack output was built from."""
    return store.output(PACK_STAGE, pack_fp).manifest()["inputs"]


def steps_per_chunk(batch: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // (batch * itemsize))


@dataclass(frozen=True)
class PlaceResult:
    fingerprint: str
    uri: str
    summary: dict[str, Any]
    reused: bool


def write_index(plan: Plan, output, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Write the index chunks, the composition and ``index.json``; return the metadata."""
    per_chunk = steps_per_chunk(plan.batch, plan.ids.dtype.itemsize)
    by_step = plan.ids.reshape(plan.steps, plan.batch)
    chunks = []
    for first in range(0, plan.steps, per_chunk):
        name = chunk_name(first)
        output.write_bytes(name, npy_bytes(np.ascontiguousarray(by_step[first : first + per_chunk])))
        chunks.append(name)
        if len(chunks) % 8 == 0:
            progress(f"place: wrote {len(chunks)} of {-(-plan.steps // per_chunk)} index chunks")
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


def run_place(
    recipe: Recipe, variant: str, store: Store, pack_fp: str, predict_fp: str, force: bool = False, progress: Callable[[str], None] = print
) -> PlaceResult:
    """Build (or reuse) the sample index of ``variant`` from committed pack and predict outputs."""
    from tasks.pack import read_catalog
    from tasks.predict import read_curve
    from training.trec_plot import plot_placement

    request = plan_request(recipe, variant)
    check_request(request)  # a window too small for w: an error before reading anything
    upstream = pack_inputs(store, pack_fp)
    inputs = index_inputs(recipe, variant, pack_fp, upstream["score"], upstream["tokenizer"], predict_fp)
    fp = place_fingerprint(inputs)
    output = store.output(STAGE, fp)
    if output.exists() and not force:
        return PlaceResult(fp, output.uri, {**json.loads(output.read_bytes(SUMMARY_FILE)), "variant": variant}, reused=True)
    output.invalidate()

    tiers, scores = read_catalog(store, pack_fp)
    curve = read_curve(store, predict_fp)
    trec = curve["trec_pred"].to_numpy()
    progress(f"place: {variant} ({request.strategy}): {request.slots:,} slots from {tiers.size:,} packed sequences")
    plan = make_plan(request, tiers, scores, trec)
    summary = {
        **plan.summary(),
        "strategy": request.strategy,
        "seed": request.seed,
        "hq_tokens": plan.hq_slots * recipe.data.seq_len,
        "fingerprint": fp,
    }
    try:
        write_index(plan, output, progress)
        output.write_bytes(SUMMARY_FILE, json.dumps(summary, indent=2).encode())
        output.write_bytes(
            PLOT_FILE,
            plot_placement(
                curve["fraction"].to_numpy(), trec, plan.hq_share_per_step(), summary["window"], summary["hq_fraction"],
                title=f"{recipe.name} / {variant}: {request.strategy} placement",
            ),
        )
        output.commit(inputs=inputs, counts={"steps": plan.steps, "sequences": plan.ids.size, "repeated": plan.repeated_sequences})
    except BaseException:
        output.invalidate()
        raise
    progress(
        f"place: hq share {summary['hq_fraction']:.4f}, window {summary['window']}, hq in window {summary['hq_in_window']}, "
        f"repeated {summary['repeated_sequences']:,}, unplaced {summary['unplaced_sequences']:,}"
    )
    return PlaceResult(fp, output.uri, {**summary, "variant": variant}, reused=False)


def _task_fingerprint(recipe: Recipe, store: Store, variant: str, pack_fp: str, predict_fp: str) -> str:
    upstream = pack_inputs(store, pack_fp)
    return place_fingerprint(index_inputs(recipe, variant, pack_fp, upstream["score"], upstream["tokenizer"], predict_fp))


@stage_task("place_curriculum", STAGE, _task_fingerprint, retry_delay_seconds=5)
def place_curriculum(
    recipe: Recipe, store_url: str, endpoint_url: str | None = None, force: bool = False, *, variant: str, pack_fp: str, predict_fp: str
) -> PlaceResult:
    """Prefect task around `run_place`; its cache key is the stage fingerprint (and the store)."""
    from prefect import get_run_logger

    return run_place(recipe, variant, Store(store_url, endpoint_url), pack_fp, predict_fp, force=force, progress=get_run_logger().info)
