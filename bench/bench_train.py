"""train: the continual-pretraining job (`tasks.train.run_train`: DeepSpeed ZeRO-1 on Ray Train, 2
CPU workers, gloo) against a plain single-process PyTorch loop on the same model, batch and steps,
and the job's start-up time.

Recipe: configs/test.yaml enlarged in memory to the tiny-scale study's shape: sequences of 128
tokens, a global batch of 32 sequences (4,096 tokens per step), `STEPS` steps, the demo's tiny Llama (hidden
128, intermediate 512, 4 layers, 4 heads; 1.3M parameters with the test recipe's 1,024-token BPE),
fp32, ZeRO-1, a checkpoint every `CHECKPOINT_EVERY` steps (one mid-run, one final), weight decay
0.1. Stages 1-3 (score, tokenizer, pack, predict, the ``uniform`` index) run into a store in a
temporary ``TRECFLOW_HOME`` before anything is timed. Both sides start from the same from-scratch
weights (the tiny base's config and init seed, built as `training.cpt_job` builds them; the base
pretraining is skipped: throughput does not depend on the weights).

- job: one `run_train` call, 2 workers of 1 CPU each. Steady-state tokens/s = the audit records'
  tokens / seconds over the steps after the first `WARMUP` (a record times one optimizer step on
  rank 0: LR, batch read, forward, backward, gradient all-reduce, optimizer step, loss all-reduce;
  not the audit write or checkpoints). A thread polls the audit log and the workers' pid files
  every 0.05 s and times, from the call: both workers inside the training function (pid files
  written, after its imports), step 0 starting (first record's arrival minus its seconds), the
  last record, and the return. From these: start-up = call -> step 0 starts (Ray Train worker
  group, imports, model build, ``deepspeed.initialize``); the in-loop overhead (wall time between
  records minus their step seconds: audit writes, the mid-run checkpoint); the tail (last record
  -> return: final checkpoint, ``save_pretrained``, Ray Train shut-down, audit check, manifest).
  "Wall-clock" tokens/s: the steps after the warm-up over the wall time between their records.
- empty job: a Ray Train ``TorchTrainer`` with the same scaling whose function does nothing but
  note the time and its torch threads, ``OMP_NUM_THREADS`` and nice value: Ray Train's own fixed
  start-up and shut-down, to compare the job's with, and how many threads a worker's torch uses
  (Ray sets ``OMP_NUM_THREADS=1`` for a 1-CPU worker at run time).
- loop: this process, no Ray, no DeepSpeed: the same model (config, init seed), torch's AdamW with
  the recipe's betas, eps 1e-8 and weight decay, the LR of each step from
  `training.schedules.LRSchedule`, gradient clipping 1.0, the whole global batch of each step read
  through `training.sample_index.SampleIndex` (rank 0 of 1), the same steps, each timed the same
  way (LR and batch read to the loss read back). ``torch.set_num_threads(2)``: the whole machine,
  as a user's plain loop would use it. It runs once before and once after the job (the machine is
  shared and noisy); ratios are against the mean of the two. A third loop with 1 thread shows
  what perfect 2-way data parallelism would reach (2 x its rate).
Ratios are given on mean step time (the steady-state tokens/s), on the median step (robust to the
stalls that other processes on a shared machine cause) and on tokens per CPU-second (CPU time from
/proc: the job's two worker processes, every thread, sampled as each record appears; the loop's
``time.process_time``), which leaves out how much of the machine each side got; "cores" = CPU
seconds / wall seconds shows that share. Goal: job / loop tokens/s >= 0.8. Final losses
are printed: close (2 ranks x 16 sequences all-reduced vs one batch of 32: float rounding only).

Stages 1-3 run once per process (`staged`): `bench.bench_reevaluate`, run after this benchmark in
the same ``python -m bench`` process at the same sizes, reuses their store (`shared_staging`).

Smoke mode (``python -m bench train --smoke``, `use_sizes`): `SMOKE` sizes (6 steps of 8 sequences,
2 warm-up steps, a checkpoint at step 3, a 2-layer hidden-64 Llama, loops of 1 thread) and no empty
job (a second Ray Train start-up); everything else as above: the same 2-worker job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bench.common import start_ray, summary_dict

ROOT = Path(__file__).resolve().parent.parent
STEPS = 60
SEQ_LEN = 128
SEQUENCES = 32
WARMUP = 5  # steps left out of steady-state rates
CHECKPOINT_EVERY = 40
WORKERS = 2
LOOP_THREADS = 2
GOAL = 0.8
POLL_SECONDS = 0.05
TINY = {"hidden": 128, "intermediate": 512, "layers": 4, "heads": 4}
FULL = {"STEPS": STEPS, "SEQUENCES": SEQUENCES, "WARMUP": WARMUP, "CHECKPOINT_EVERY": CHECKPOINT_EVERY, "TINY": TINY,
        "LOOP_THREADS": LOOP_THREADS}
# 6 steps of 8 sequences (4 per worker): 2 warm-up steps, a checkpoint at step 3 (mid-run) and the final one;
# loops of 1 thread (the same code; on a loaded 2-core machine a 2-thread torch loop mostly waits for its threads)
SMOKE = {"STEPS": 6, "SEQUENCES": 8, "WARMUP": 2, "CHECKPOINT_EVERY": 3,
         "TINY": {"hidden": 64, "intermediate": 256, "layers": 2, "heads": 4}, "LOOP_THREADS": 1}


def use_sizes(smoke: bool) -> None:
    """Set this module's sizes (`STEPS`, `SEQUENCES`, `WARMUP`, `CHECKPOINT_EVERY`, `TINY`, `LOOP_THREADS`)
    to the full or the smoke ones; every function here (and `bench.bench_reevaluate`) reads them at call time."""
    globals().update({key: (dict(value) if isinstance(value, dict) else value) for key, value in (SMOKE if smoke else FULL).items()})


def bench_recipe():
    """configs/test.yaml at the demo's shape (see the module docstring)."""
    from trecflow.recipe import parse_recipe, read_yaml

    data = read_yaml((ROOT / "configs" / "test.yaml").read_text())
    data["name"] = "bench-train"
    data["model"] = {"params": 1.3e6}
    data["data"] = {"tokens": STEPS * SEQUENCES * SEQ_LEN, "seq_len": SEQ_LEN}
    data["batch"] = {"tokens": SEQUENCES * SEQ_LEN}
    data["optimizer"] = {"peak_lr": 2.0e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}
    data["base"]["tiny"] = dict(TINY)
    data["training"] = {
        "workers": WORKERS,
        "zero_stage": 1,
        "checkpoint_every": CHECKPOINT_EVERY,
        "keep_checkpoints": 2,
        "log_every": min(20, STEPS),
    }
    recipe = parse_recipe(data, source="bench-train")
    assert recipe.steps == STEPS and recipe.sequences_per_step == SEQUENCES
    return recipe


def stage(recipe, store, quiet):
    """Stages 1-3 and the uniform index; returns (place fingerprint, expected inputs, base)."""
    from tasks.pack import run_pack
    from tasks.place import index_inputs, run_place
    from tasks.predict import run_predict
    from tasks.score import run_score
    from tasks.tokenizer import run_tokenizer
    from tasks.base_model import STAGE_VERSION, tiny_config
    from tasks.train import BaseModel
    from trecflow.fingerprint import fingerprint

    scored = run_score(recipe, store, **quiet)
    tokenizer = run_tokenizer(recipe, store, **quiet)
    packed = run_pack(recipe, store, scored.fingerprint, tokenizer.fingerprint, **quiet)
    predicted = run_predict(recipe, store)
    placed = run_place(recipe, "uniform", store, packed.fingerprint, predicted.fingerprint, **quiet)
    expected = index_inputs(recipe, "uniform", packed.fingerprint, scored.fingerprint, tokenizer.fingerprint, predicted.fingerprint)
    config = tiny_config(recipe, tokenizer.summary)
    base = BaseModel(fingerprint("base", STAGE_VERSION, {"tiny": config}), config=config)
    return placed.fingerprint, expected, base, summary_dict(packed.summary)


class JobWatcher:
    """Polls the job's audit log and pid files: when records and workers appear, the workers'
    scheduling priority (nice), and their CPU time (all threads) when each record appears."""

    def __init__(self, output_path: str):
        self.output_path = output_path
        self.started = time.perf_counter()
        self.record_seen: dict[int, float] = {}  # record count -> first time seen
        self.pids_seen: float | None = None
        self.worker_nice: dict[int, int] = {}
        self.pids: list[int] = []
        self.cpu_at: dict[int, float] = {}  # record count -> the workers' summed CPU seconds then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> JobWatcher:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def _count(self) -> int:
        count = 0
        for part in glob.glob(f"{self.output_path}/audit/attempt-*/part-*.jsonl"):
            try:
                with open(part, "rb") as handle:
                    count += handle.read().count(b"\n")
            except OSError:
                pass
        return count

    def _read_pids(self) -> None:
        from training.cpt_job import PID_DIR

        files = glob.glob(f"{self.output_path}/{PID_DIR}/rank-*.json")
        if len(files) < WORKERS:
            return
        seen = time.perf_counter()
        nice, pids = {}, []
        for path in files:
            try:
                entry = json.loads(Path(path).read_text())
                nice[entry["rank"]] = os.getpriority(os.PRIO_PROCESS, entry["pid"])
                pids.append(entry["pid"])
            except (OSError, ValueError, KeyError):
                return  # a file still being written: next poll
        self.pids_seen, self.worker_nice, self.pids = seen, nice, pids

    def _cpu(self) -> float:
        total = 0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # utime + stime, clock ticks
        return total / os.sysconf("SC_CLK_TCK")

    def _poll(self) -> None:
        last = 0
        while True:
            stopping = self._stop.is_set()  # one more pass after the stop, so no record is missed
            if self.pids_seen is None:
                self._read_pids()
            count = self._count()
            if count > last:
                now = time.perf_counter()
                cpu = self._cpu()
                for number in range(last + 1, count + 1):
                    self.record_seen[number] = now
                    self.cpu_at[number] = cpu
                last = count
            if stopping:
                return
            time.sleep(POLL_SECONDS)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_job(recipe, store, place_fp, expected, base) -> dict:
    from tasks.train import run_train, train_fingerprint
    from training.audit import read_audit

    output = store.output("train", train_fingerprint(recipe, place_fp, base.fingerprint))
    with JobWatcher(output.path) as watcher:
        called = time.perf_counter()
        result = run_train(recipe, store, place_fp, expected, base, progress=lambda line: None)
        returned = time.perf_counter()
    assert not result.reused and summary_dict(result.summary)["audit"]["exactly_once"]
    records = read_audit(store, output.path)
    seconds = [record["seconds"] for record in records]
    tokens = [record["tokens"] for record in records]
    seen = watcher.record_seen
    first_seen, last_seen = seen[1], seen[len(records)]
    after = range(WARMUP, len(records))
    return {
        "wall": returned - called,
        "steps": len(records),
        "seconds": seconds,
        "tokens_per_step": tokens[0],
        "steady": sum(tokens[k] for k in after) / sum(seconds[k] for k in after),
        # steps WARMUP.. over the wall time from the record before them to the last record
        "wall_steady": sum(tokens[k] for k in after) / (last_seen - seen[WARMUP]),
        "steady_wall_seconds": last_seen - seen[WARMUP],
        "workers_up": (watcher.pids_seen - called) if watcher.pids_seen else None,
        "first_step_start": first_seen - seconds[0] - called,
        "first_step": seconds[0],
        "loop_wall": last_seen - first_seen,
        "loop_steps": sum(seconds[1:]),
        "tail": returned - last_seen,
        "final_loss": records[-1]["loss"],
        "worker_nice": watcher.worker_nice,
        # both workers' CPU seconds over the steps after the warm-up (audit writes, checkpoint included)
        "cpu_steady": watcher.cpu_at[len(records)] - watcher.cpu_at[WARMUP] if watcher.pids else None,
        "lrs": [record["lr"] for record in records],
    }


def run_loop(recipe, store, place_fp, base, threads: int) -> dict:
    """The plain single-process loop (see the module docstring)."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training.sample_index import SampleIndex
    from training.schedules import LRSchedule

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        training, optimizer_section = recipe.training, recipe.optimizer
        torch.manual_seed(training.seed)
        config = dict(base.config)
        torch.manual_seed(config.pop("init_seed", 0))  # as training.cpt_job builds a from-scratch model
        model = AutoModelForCausalLM.from_config(LlamaConfig(**config))
        model.train()
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=optimizer_section.peak_lr, betas=tuple(optimizer_section.betas), eps=1e-8,
            weight_decay=optimizer_section.weight_decay,
        )
        schedule = LRSchedule.from_recipe(recipe)
        index = SampleIndex(store, place_fp)
        seconds, cpu, losses, lrs = [], [], [], []
        for step in range(index.steps):
            began, began_cpu = time.perf_counter(), time.process_time()
            lr = schedule.lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            tokens = torch.from_numpy(np.ascontiguousarray(index.tokens(step)))
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            if training.gradient_clipping > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), training.gradient_clipping)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            seconds.append(time.perf_counter() - began)
            cpu.append(time.process_time() - began_cpu)
            lrs.append(lr)
        tokens_per_step = recipe.sequences_per_step * recipe.data.seq_len
        after = seconds[WARMUP:]
        return {
            "threads": threads,
            "steps": len(seconds),
            "seconds": seconds,
            "steady": tokens_per_step * len(after) / sum(after),
            "wall": sum(seconds),
            "cpu_steady": sum(cpu[WARMUP:]),
            "final_loss": losses[-1],
            "lrs": lrs,
            "params": sum(parameter.numel() for parameter in model.parameters()),
        }
    finally:
        torch.set_num_threads(previous_threads)


def load_average() -> str:
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "n/a"


@contextlib.contextmanager
def isolated_home(prefix: str) -> Iterator[Path]:
    """A temporary TRECFLOW_HOME (with Prefect's home and MLflow's database in it) for one
    benchmark; removed afterwards, the environment restored, and Ray shut down if it started here."""
    import ray

    home = tempfile.mkdtemp(prefix=prefix)
    saved = {key: os.environ.get(key) for key in ("TRECFLOW_HOME", "PREFECT_HOME", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE")}
    os.environ["TRECFLOW_HOME"] = home  # before anything reads it (the recipe's corpus paths, Prefect's home)
    os.environ["PREFECT_HOME"] = os.path.join(home, "prefect")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{home}/mlflow.db"
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray_was_up = ray.is_initialized()
    try:
        yield Path(home)
    finally:
        if not ray_was_up and ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(home, ignore_errors=True)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@dataclass(frozen=True)
class Staged:
    """Stages 1-3 and the uniform index of `bench_recipe`, in a store under a temporary home."""

    home: Path
    recipe: Any
    store: Any
    place_fp: str
    expected: dict
    base: Any
    pack_stats: dict
    seconds: float  # the staging's wall time when it ran
    reused: bool = False  # staged earlier in this process (`shared_staging`)


_SHARED: contextlib.ExitStack | None = None
_STAGED: dict[str, Staged] = {}


@contextlib.contextmanager
def shared_staging() -> Iterator[None]:
    """While open, the benchmarks of this process that stage the same recipe (`train` and
    `reevaluate`, at the same sizes) stage it once: the temporary home, its store and the local
    Ray it started live until this closes (`python -m bench` runs every benchmark inside one)."""
    global _SHARED
    with contextlib.ExitStack() as stack:
        _SHARED = stack
        try:
            yield
        finally:
            _SHARED = None
            _STAGED.clear()


@contextlib.contextmanager
def staged(prefix: str) -> Iterator[Staged]:
    """Stages 1-3 of `bench_recipe` at the current sizes, staged before anything is timed (Ray
    started first); reused within `shared_staging`, else in a home removed afterwards."""
    key = json.dumps({"steps": STEPS, "sequences": SEQUENCES, "seq_len": SEQ_LEN, "tiny": TINY, "checkpoint_every": CHECKPOINT_EVERY})
    if _SHARED is not None and key in _STAGED:
        yield dataclasses.replace(_STAGED[key], reused=True)
        return
    with contextlib.ExitStack() as own:
        home = (_SHARED or own).enter_context(isolated_home(prefix))
        result = _stage_into(home)
        if _SHARED is not None:
            _STAGED[key] = result
        yield result


def _stage_into(home: Path) -> Staged:
    import logging

    from tests.corpus_builder import build_test_corpus
    from trecflow.store import Store

    logging.getLogger("ray.data").setLevel(logging.WARNING)  # the staging's progress lines
    build_test_corpus(home / "corpus" / "test")
    recipe = bench_recipe()
    store = Store(str(home / "store"))
    start_ray()
    started = time.perf_counter()
    place_fp, expected, base, pack_stats = stage(recipe, store, {"progress": lambda line: None})
    return Staged(home, recipe, store, place_fp, expected, base, pack_stats, time.perf_counter() - started)


def run(smoke: bool = False) -> None:
    began = time.perf_counter()
    use_sizes(smoke)
    try:
        if smoke:
            print("train: smoke mode: tiny sizes, not a measurement", flush=True)
        load_before = load_average()
        with staged("trecflow-bench-train-") as staging:
            _run(staging, began, load_before, smoke)
    finally:
        use_sizes(False)


def _probe_worker(config: dict) -> None:
    """The empty job's training function: when it starts, and the worker's thread settings."""
    entered = time.time()
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    info = {"entered": entered, "torch_threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"), "nice": os.nice(0)}
    info["left"] = time.time()
    Path(config["folder"], f"rank-{rank}.json").write_text(json.dumps(info))


def empty_fit(recipe, folder: Path) -> dict:
    """An empty Ray Train job with the job's scaling: Ray Train's own start-up and shut-down, and
    the threads and nice value a worker's torch gets."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    folder.mkdir(parents=True)
    training = recipe.training
    trainer = TorchTrainer(
        _probe_worker,
        train_loop_config={"folder": str(folder)},
        scaling_config=ScalingConfig(num_workers=training.workers, resources_per_worker={"CPU": training.cpus_per_worker}),
        run_config=RunConfig(name="probe", storage_path=str(folder / "ray")),
    )
    called = time.time()
    trainer.fit()
    returned = time.time()
    infos = [json.loads(path.read_text()) for path in sorted(folder.glob("rank-*.json"))]
    return {
        "wall": returned - called,
        "to_function": max(info["entered"] for info in infos) - called,
        "after_function": returned - max(info["left"] for info in infos),
        "workers": [(info["torch_threads"], info["omp"], info["nice"]) for info in infos],
    }


def _run(staging: Staged, began: float, load_before: str, smoke: bool = False) -> None:
    import numpy as np

    home, recipe, store, place_fp = staging.home, staging.recipe, staging.store, staging.place_fp
    expected, base, pack_stats = staging.expected, staging.base, staging.pack_stats
    staging_seconds = 0.0 if staging.reused else staging.seconds
    print(f"train: stages 1-3 {'reused (staged earlier in this process)' if staging.reused else f'staged in {staging.seconds:.0f} s'} "
          f"({pack_stats.get('sequences', '?')} packed cpt sequences); loop 1 ({LOOP_THREADS} threads) ...", flush=True)

    loops = [run_loop(recipe, store, place_fp, base, LOOP_THREADS)]
    if smoke:
        print(f"  loop 1: {loops[0]['steady']:,.0f} tokens/s; empty Ray Train job skipped (smoke); job ...", flush=True)
        empty = None
    else:
        print(f"  loop 1: {loops[0]['steady']:,.0f} tokens/s; empty Ray Train job ...", flush=True)
        empty = empty_fit(recipe, home / "probe")
        print(f"  empty job: {empty['wall']:.1f} s; job ...", flush=True)
    job = run_job(recipe, store, place_fp, expected, base)
    print(f"  job: {job['steady']:,.0f} tokens/s in {job['wall']:.1f} s; loop 2 ...", flush=True)
    loops.append(run_loop(recipe, store, place_fp, base, LOOP_THREADS))
    print(f"  loop 2: {loops[1]['steady']:,.0f} tokens/s; 1-thread reference loop ...", flush=True)
    single = run_loop(recipe, store, place_fp, base, 1)
    load_after = load_average()

    # the same LR at every step on both sides
    same_lr = all(np.allclose(loop["lrs"], job["lrs"], rtol=1e-12, atol=0) for loop in (*loops, single))
    tokens_per_step = job["tokens_per_step"]
    params = loops[0]["params"]

    def median_rate(seconds: list[float]) -> float:
        return tokens_per_step / float(np.median(seconds[WARMUP:]))

    loop_mean = sum(loop["steady"] for loop in loops) / len(loops)
    loop_median = sum(median_rate(loop["seconds"]) for loop in loops) / len(loops)
    ratio = job["steady"] / loop_mean
    ratio_median = median_rate(job["seconds"]) / loop_median

    steady_tokens = tokens_per_step * (STEPS - WARMUP)

    def per_cpu(side: dict) -> float | None:
        """Steady-state tokens per CPU-second (what the side computes with the CPU it got)."""
        return steady_tokens / side["cpu_steady"] if side.get("cpu_steady") else None

    def row(name: str, side: dict, steady_wall: float) -> None:
        seconds = side["seconds"]
        after = seconds[WARMUP:]
        cores = f"{side['cpu_steady'] / steady_wall:5.2f}" if side.get("cpu_steady") else "  n/a"
        efficiency = f"{per_cpu(side):,.0f}" if per_cpu(side) else "n/a"
        print(f"  {name:<46} {side['steady']:>9,.0f} {median_rate(seconds):>9,.0f} {1e3 * sum(after) / len(after):>8.0f} "
              f"{1e3 * float(np.median(after)):>7.0f} {1e3 * max(after):>7.0f} {1e3 * seconds[0]:>7.0f} {cores:>6} "
              f"{efficiency:>9} {side['wall']:>7.1f} {side['final_loss']:>10.6f}")

    print()
    print(f"train: the job vs a plain PyTorch loop, {os.cpu_count()} cores; tiny Llama {params / 1e6:.2f}M parameters "
          f"(hidden {TINY['hidden']}, intermediate {TINY['intermediate']}, {TINY['layers']} layers, {TINY['heads']} heads, "
          f"vocab {base.config['vocab_size']}), {STEPS} steps x {SEQUENCES} sequences x {SEQ_LEN} tokens = "
          f"{tokens_per_step:,} tokens/step, fp32")
    print(f"  {'':<46} {'tokens/s':>9} {'(median)':>9} {'ms/step':>8} {'median':>7} {'max':>7} {'step 0':>7} {'cores':>6} "
          f"{'tok/CPU-s':>9} {'wall s':>7} {'final loss':>10}")
    row(f"job: ZeRO-{recipe.training.zero_stage}, {WORKERS} Ray Train workers x 1 CPU", job, job["steady_wall_seconds"])
    for number, loop in enumerate(loops, 1):
        row(f"loop {number}: 1 process x {LOOP_THREADS} threads, {'before' if number == 1 else 'after'} the job", loop,
            sum(loop["seconds"][WARMUP:]))
    row("reference loop: 1 process x 1 thread", single, sum(single["seconds"][WARMUP:]))
    print(f"  (steady state: steps {WARMUP}..{STEPS - 1}; tokens/s = their tokens / their seconds, (median) = tokens per step / "
          f"median step; cores = CPU seconds / wall seconds over them (the job: both workers, all threads, between their "
          f"records), tok/CPU-s = tokens per CPU-second; wall: the run_train call, the loops' summed steps; the same LR at "
          f"every step on all sides: {'yes' if same_lr else 'NO'})")
    print(f"  ratio job / loop, steady tokens/s (loop: mean of 2 runs)   {ratio:5.2f}   goal >= {GOAL}: {'OK' if ratio >= GOAL else 'FAIL'}"
          f"   (vs loop 1 {job['steady'] / loops[0]['steady']:.2f}, vs loop 2 {job['steady'] / loops[1]['steady']:.2f})")
    print(f"  ratio job / loop, median step                              {ratio_median:5.2f}   goal >= {GOAL}: "
          f"{'OK' if ratio_median >= GOAL else 'FAIL'}   (robust to the stalls a shared machine causes)")
    loop_cpu = [per_cpu(loop) for loop in loops]
    if per_cpu(job) and all(loop_cpu):
        print(f"  ratio job / loop, tokens per CPU-second                    {per_cpu(job) / (sum(loop_cpu) / len(loop_cpu)):5.2f}   "
              f"(the CPU each side got does not enter: what is left of the ratio on a machine shared with others)")
    print(f"  ratio job wall-clock / loop                                {job['wall_steady'] / loop_mean:5.2f}   "
          f"({job['wall_steady']:,.0f} tokens/s between the job's records: audit writes, step-{CHECKPOINT_EVERY} checkpoint included)")
    print(f"  ratio job end-to-end / loop                                {tokens_per_step * STEPS / job['wall'] / loop_mean:5.2f}   "
          f"({tokens_per_step * STEPS / job['wall']:,.0f} tokens/s over the whole run_train call, start-up included)")
    print(f"  ratio job / ideal (2 x the 1-thread loop)                  {job['steady'] / (2 * single['steady']):5.2f}   "
          f"(loop with {LOOP_THREADS} threads / 1 thread: {loop_mean / single['steady']:.2f}x)")
    step_sum = sum(job["seconds"])
    print(f"  job start-up and overheads: run_train wall {job['wall']:.1f} s = {step_sum:.1f} s in steps + {job['wall'] - step_sum:.1f} s outside:")
    lines = []
    if job["workers_up"] is not None:
        lines += [
            ("run_train call -> both workers in train_worker (Ray Train worker group, imports)", job["workers_up"]),
            ("  ... -> step 0 starts (model build, deepspeed.initialize)", job["first_step_start"] - job["workers_up"]),
        ]
    lines += [
        ("run_train call -> step 0 starts: START-UP", job["first_step_start"]),
        ("step 0 (first step, not in the steady state)", job["first_step"]),
        (f"in-loop overhead, steps 1..{STEPS - 1} (wall {job['loop_wall']:.1f} s - steps {job['loop_steps']:.1f} s)",
         job["loop_wall"] - job["loop_steps"]),
        ("last record -> run_train returns (final checkpoint, model save, shut-down)", job["tail"]),
    ]
    if empty is not None:
        lines += [
            ("for comparison, an empty Ray Train job (same scaling): whole fit", empty["wall"]),
            ("  ... call -> both workers in the training function", empty["to_function"]),
            ("  ... training function returns -> fit returns", empty["after_function"]),
        ]
    for label, seconds in lines:
        print(f"    {label:<92} {seconds:6.1f} s")
    threads = "; ".join(f"torch threads {t}, OMP_NUM_THREADS={omp}, nice {nice}" for t, omp, nice in empty["workers"]) if empty else "n/a (smoke)"
    nice = ", ".join(f"rank {rank} nice {value}" for rank, value in sorted(job["worker_nice"].items()))
    print(f"  workers: empty job's workers: {threads}; the job's workers: {nice or 'not read'} (this process: nice {os.nice(0)})")
    losses = [loop["final_loss"] for loop in (*loops, single)]
    print(f"  final loss: job {job['final_loss']:.6f}, loops {', '.join(format(value, '.6f') for value in losses)}; "
          f"largest difference from the job {max(abs(value - job['final_loss']) for value in losses):.1e}")
    print(f"  load average (1/5/15 min) before {load_before}, after {load_after} on {os.cpu_count()} cores: the machine is shared")
    print(f"  total benchmark time {time.perf_counter() - began:.0f} s (staging {staging_seconds:.0f} s)")


if __name__ == "__main__":
    run()
