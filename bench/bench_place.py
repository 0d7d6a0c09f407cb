"""place: the placement stage at paper scale, `configs/cpt-3.9b-900b.yaml` (214,576 steps x 1,024
sequences of 4,096 tokens = 219.7M slots): plan and index build time and peak memory on this
2-core machine (goals: under 5 minutes and 8 GB per variant), and the time to look up a random
step's batch from the written index.

Catalog: 1.1 x S packed sequences (~241.7M), synthesized, no text: 20% hq, 40% mid, 40% lq, laid
out as `tasks.pack` assigns ids (per group of 4M sequences, the group's hq ids, then mid, then
lq) with seeded float32 scores inside each tier's band (hq [0.7, 1), mid [0.4, 0.7), lq [0, 0.4)).
It is built in groups, so no temporary is larger than one group. With this mix the non-hq slots
(90% of S) need more mid and lq sequences than exist (88% of S), so those tiers take the
``on_shortage: repeat`` path (~2.2M repeats each), the costlier one.

For each of ``uniform``, ``trec_valley`` (with stage 2's predicted curve) and ``ascending`` (the
same mix, then a stable sort of all S slots by score: the costliest), measured in this process:
- plan: wall time of `tasks.placement.make_plan`;
- write: wall time of `tasks.place.write_index` + the manifest commit into a fresh store in a
  temporary folder on local disk (page cache; no fsync), and the index size on disk;
- memory: the peak summed USS of this process tree (sampled every 0.25 s, `bench_score.PeakRss`)
  and the kernel's exact peak RSS of this process (``VmHWM``, reset before each variant); both
  include the ~1.2 GB catalog (tiers + scores) that any caller of `make_plan` holds;
- lookups: 1,000 random steps through `training.sample_index.SampleIndex` (just written, so the
  index is in the page cache; the first call of a chunk opens its memory map), ``batch(step)``
  and ``rank_batch(step, rank, 128)``, mean, median and p99 in microseconds.
Baselines measured in the same run, for ratios: one seeded shuffle of S uint32 ids (the least a
random plan costs), one ``np.save`` of the S ids to the same disk (the least writing costs), and a
row copy out of that file's memory map (the least a lookup costs).
Checks (outside the timed regions): hq share, hq in window, every slot filled with an existing
id (all ids < catalog size, per-tier slot counts match the plan, every step of the written
composition sums to the batch), distinct ids = S - repeats, and the lookups equal the plan's rows.

Smoke mode (``python -m bench place --smoke``): the same recipe cut to `SMOKE_STEPS` steps (the
same 1,024-sequence batch, so 204,800 slots), `SMOKE_LOOKUPS` lookups; seconds in all.
"""

from __future__ import annotations

import gc
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_score import PeakRss

CONFIG = "configs/cpt-3.9b-900b.yaml"
VARIANTS = ("uniform", "trec_valley", "ascending")
CATALOG_FACTOR = 1.1
MIX = (0.2, 0.4, 0.4)  # hq, mid, lq shares of the catalog
BANDS = ((0.7, 1.0), (0.4, 0.7), (0.0, 0.4))  # score band of each tier
GROUP = 1 << 22  # sequences per synthesized pack group
LOOKUPS = 1000
WORLD = 128
SEED = 1234
GOAL_SECONDS = 300.0
GOAL_BYTES = 8e9
SMOKE_STEPS = 200
SMOKE_LOOKUPS = 200


def synth_catalog(sequences: int, seed: int = SEED) -> tuple[np.ndarray, np.ndarray]:
    """(tiers int8, scores float32) of ``sequences`` packed sequences, built group by group."""
    tiers = np.empty(sequences, dtype=np.int8)
    scores = np.empty(sequences, dtype=np.float32)
    rng = np.random.default_rng(seed)
    for first in range(0, sequences, GROUP):
        size = min(GROUP, sequences - first)
        counts = [round(size * MIX[0]), round(size * MIX[1])]
        counts.append(size - sum(counts))
        at = first
        for code, count in enumerate(counts):
            low, high = BANDS[code]
            tiers[at : at + count] = code
            band = scores[at : at + count]
            rng.random(count, dtype=np.float32, out=band)
            band *= np.float32(high - low)
            band += np.float32(low)
            at += count
    return tiers, scores


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (``VmHWM``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def time_calls(function, arguments) -> np.ndarray:
    """Microseconds of each call."""
    times = np.empty(len(arguments))
    for k, args in enumerate(arguments):
        started = time.perf_counter_ns()
        function(*args)
        times[k] = (time.perf_counter_ns() - started) / 1e3
    return times


def stats(times: np.ndarray) -> tuple[float, float, float]:
    """Mean, median and p99."""
    return float(times.mean()), float(np.median(times)), float(np.percentile(times, 99))


def baselines(slots: int, steps: int, batch: int, folder: Path, lookups: int = LOOKUPS) -> dict[str, float]:
    """Irreducible costs at the same scale: shuffle S ids, save them, copy one row of the file."""
    ids = np.arange(slots, dtype=np.uint32)
    started = time.perf_counter()
    np.random.default_rng(SEED).shuffle(ids)
    shuffle = time.perf_counter() - started
    path = folder / "baseline.npy"
    started = time.perf_counter()
    np.save(path, ids.reshape(steps, batch))
    save = time.perf_counter() - started
    del ids
    mapped = np.load(path, mmap_mode="r")
    rows = np.random.default_rng(SEED + 1).integers(0, steps, lookups)
    lookup = time_calls(lambda row: np.array(mapped[row]).astype(np.int64), [(int(row),) for row in rows])
    mapped = None  # close the map before removing the file
    path.unlink()
    return {"shuffle": shuffle, "save": save, "lookup": stats(lookup)}


def check_plan(plan, request, catalog: int) -> dict[str, object]:
    """Sanity figures of a plan (not timed): shares, fill, distinct ids."""
    ids = plan.ids
    max_id = int(ids.max())
    tier_slots = [int(np.count_nonzero(plan.tiers == code)) for code in range(3)]
    expected = [plan.counts[tier]["slots"] for tier in ("hq", "mid", "lq")]
    seen = np.zeros(catalog, dtype=bool)
    seen[ids] = True
    distinct = int(np.count_nonzero(seen))
    del seen
    return {
        "hq_share": plan.hq_slots / ids.size,
        "hq_in_window": plan.hq_in_window(),
        "window": plan.window_steps,
        "ids_below_catalog": max_id < catalog,
        "tier_slots_match": tier_slots == expected and sum(tier_slots) == request.slots,
        "distinct": distinct,
        "repeated": plan.repeated_sequences,
        "distinct_ok": distinct == ids.size - plan.repeated_sequences,
        "unplaced": sum(entry["unplaced"] for entry in plan.counts.values()),
    }


def check_index(store, plan, steps: np.ndarray) -> dict[str, object]:
    """The written index holds every slot, and lookups return the plan's rows."""
    from training.sample_index import COMPOSITION_FILE, SampleIndex, read_npy

    index = SampleIndex(store, "bench")
    output = index.output
    rows = sum(np.load(output.file_path(name), mmap_mode="r").shape[0] for name in index.meta["chunks"])
    composition = read_npy(output, COMPOSITION_FILE)
    by_step = plan.ids.reshape(plan.steps, plan.batch)
    same = all(np.array_equal(index.batch(int(step)), by_step[step]) for step in steps[:100])
    share = plan.batch // WORLD
    same_rank = all(
        np.array_equal(index.rank_batch(int(step), 5, WORLD), by_step[step, 5 * share : 6 * share]) for step in steps[:100]
    )
    return {
        "index_rows_ok": rows == plan.steps,
        "composition_ok": bool((composition.sum(axis=1) == plan.batch).all()) and int(composition[:, 0].sum()) == plan.hq_slots,
        "lookups_match": same and same_rank,
    }


def run_variant(recipe, variant: str, tiers, scores, trec, folder: Path, lookup_steps: np.ndarray) -> dict[str, object]:
    from tasks.place import plan_request, write_index
    from tasks.placement import make_plan
    from trecflow.store import Store
    from training.sample_index import SampleIndex

    request = plan_request(recipe, variant)
    store_dir = folder / f"store-{variant}"
    store = Store(str(store_dir))
    gc.collect()
    exact = reset_peak_rss()
    with PeakRss() as memory:
        started = time.perf_counter()
        plan = make_plan(request, tiers, scores, trec if request.strategy == "trec_valley" else None)
        plan_seconds = time.perf_counter() - started
        plan_peak = memory.peak
        plan_hwm = peak_rss()
        output = store.output("place", "bench")
        started = time.perf_counter()
        write_index(plan, output, progress=lambda line: None)
        output.commit(inputs={"pack": "none"}, counts={})
        write_seconds = time.perf_counter() - started
    result: dict[str, object] = {
        "strategy": request.strategy,
        "plan_s": plan_seconds,
        "write_s": write_seconds,
        "peak_uss": memory.peak,
        "plan_peak_uss": plan_peak,
        "peak_rss": peak_rss() if exact else None,
        "plan_peak_rss": plan_hwm if exact else None,
        "index_bytes": folder_bytes(output.path),
    }
    result.update(check_plan(plan, request, tiers.size))

    index = SampleIndex(store, "bench")
    result["batch_us"] = stats(time_calls(index.batch, [(int(step),) for step in lookup_steps]))
    ranks = np.random.default_rng(SEED + 2).integers(0, WORLD, lookup_steps.size)
    index = SampleIndex(store, "bench")  # fresh: rank_batch pays its own first opens
    result["rank_us"] = stats(
        time_calls(index.rank_batch, [(int(step), int(rank), WORLD) for step, rank in zip(lookup_steps, ranks)])
    )
    del index
    result.update(check_index(store, plan, lookup_steps))
    del plan
    gc.collect()
    shutil.rmtree(store_dir)
    return result


def gib(value: float) -> str:
    return f"{value / 2**30:6.2f}"


def load_bench_recipe(smoke: bool):
    """The paper-scale recipe; in smoke mode cut to `SMOKE_STEPS` steps of the same batch."""
    from trecflow.recipe import load_recipe, parse_recipe, read_yaml

    path = Path(__file__).resolve().parent.parent / CONFIG
    if not smoke:
        return load_recipe(path)
    data = read_yaml(path.read_text())
    data["name"] = f"{data.get('name', path.stem)}-smoke"
    data["data"]["tokens"] = SMOKE_STEPS * int(data["batch"]["tokens"])
    return parse_recipe(data, source=f"{CONFIG} (smoke)")


def run(smoke: bool = False) -> None:
    from training.trec import predict

    began = time.perf_counter()
    recipe = load_bench_recipe(smoke)
    lookups = SMOKE_LOOKUPS if smoke else LOOKUPS
    steps, batch = recipe.steps, recipe.sequences_per_step
    slots = steps * batch
    catalog = round(CATALOG_FACTOR * slots)
    if smoke:
        print("place: smoke mode: tiny sizes, not a measurement")
    print(f"place: {recipe.name}: {steps:,} steps x {batch:,} sequences = {slots:,} slots; catalog {catalog:,} sequences "
          f"({' / '.join(f'{share:.0%}' for share in MIX)} hq / mid / lq), hq_fraction {recipe.curriculum.hq_fraction:g}")
    started = time.perf_counter()
    tiers, scores = synth_catalog(catalog)
    synth_seconds = time.perf_counter() - started
    trec = predict(recipe).trec
    print(f"  catalog synthesized in {synth_seconds:.1f} s ({(tiers.nbytes + scores.nbytes) / 2**30:.2f} GiB: tiers int8 + scores float32)")
    lookup_steps = np.random.default_rng(SEED + 3).integers(0, steps, lookups)
    results = {}
    with tempfile.TemporaryDirectory(prefix="trecflow-bench-place-") as folder:
        base = baselines(slots, steps, batch, Path(folder), lookups)
        for variant in VARIANTS:
            results[variant] = run_variant(recipe, variant, tiers, scores, trec, Path(folder), lookup_steps)
            r = results[variant]
            print(f"  {variant}: plan {r['plan_s']:.1f} s, write {r['write_s']:.1f} s, peak USS {gib(r['peak_uss']).strip()} GiB", flush=True)
    del tiers, scores

    print()
    print(f"place: index build and lookups, {CONFIG}{f' cut to {steps:,} steps (smoke)' if smoke else ''} ({os.cpu_count()} cores)")
    header = (f"  {'variant':<12} {'plan s':>7} {'write s':>8} {'total s':>8} {'peak USS':>9} {'peak RSS':>9} {'plan RSS':>9} "
              f"{'index MiB':>10} {'batch us':>9} {'p50':>6} {'p99':>6} {'rank us':>8} {'p50':>6} {'p99':>6}  goals (<300 s, <8 GB)")
    print(header)
    for variant, r in results.items():
        total = r["plan_s"] + r["write_s"]
        peak = max(r["peak_uss"], r["peak_rss"] or 0)
        verdict = f"time {'OK' if total < GOAL_SECONDS else 'FAIL'}, memory {'OK' if peak < GOAL_BYTES else 'FAIL'}"
        rss = gib(r["peak_rss"]) if r["peak_rss"] is not None else "   n/a"
        plan_rss = gib(r["plan_peak_rss"]) if r["plan_peak_rss"] is not None else "   n/a"
        print(f"  {variant:<12} {r['plan_s']:>7.1f} {r['write_s']:>8.1f} {total:>8.1f} {gib(r['peak_uss']):>9} {rss:>9} {plan_rss:>9} "
              f"{r['index_bytes'] / 2**20:>10,.0f} {r['batch_us'][0]:>9.1f} {r['batch_us'][1]:>6.1f} {r['batch_us'][2]:>6.1f} "
              f"{r['rank_us'][0]:>8.1f} {r['rank_us'][1]:>6.1f} {r['rank_us'][2]:>6.1f}  {verdict}")
    print("  (memory in GiB; peak USS: sampled, summed over the process tree; peak RSS: exact kernel high-water mark of this"
          " process, whole variant; plan RSS: the same during make_plan only; goal verdicts take the larger, against 8e9 bytes)")
    print(f"  baselines: shuffle of {slots:,} uint32 ids {base['shuffle']:.1f} s; np.save of them {base['save']:.1f} s; "
          f"mmap row copy mean {base['lookup'][0]:.1f} us, p50 {base['lookup'][1]:.1f}, p99 {base['lookup'][2]:.1f}")
    print("  (lookups in microseconds; the first lookup in each of the index's chunks opens its memory map, which is what"
          " the p99 shows; lookup ratios compare medians)")
    for variant, r in results.items():
        print(f"  ratio {variant:<12} plan / shuffle {r['plan_s'] / base['shuffle']:5.1f}x, write / np.save "
              f"{r['write_s'] / base['save']:5.1f}x, batch() / mmap row {r['batch_us'][1] / base['lookup'][1]:5.1f}x, "
              f"rank_batch() / mmap row {r['rank_us'][1] / base['lookup'][1]:5.1f}x")
    print("  checks:")
    for variant, r in results.items():
        in_window = "n/a" if r["hq_in_window"] is None else f"{r['hq_in_window']:.4f}"
        filled = all(r[key] for key in ("ids_below_catalog", "tier_slots_match", "distinct_ok", "index_rows_ok", "composition_ok"))
        print(f"    {variant:<12} hq share {r['hq_share']:.4f}, hq in window {in_window} (window steps {r['window']}), "
              f"distinct ids {r['distinct']:,}, repeated {r['repeated']:,}, unplaced {r['unplaced']:,}; "
              f"all slots filled with existing ids {'OK' if filled else 'FAIL'}, lookups match plan {'OK' if r['lookups_match'] else 'FAIL'}")
        if not filled:
            print(f"      details: {({key: r[key] for key in ('ids_below_catalog', 'tier_slots_match', 'distinct_ok', 'index_rows_ok', 'composition_ok')})}")
    print(f"  total benchmark time {time.perf_counter() - began:.0f} s")
