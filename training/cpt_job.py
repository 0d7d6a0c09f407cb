"""The training job: DeepSpeed ZeRO on Ray Train, following the sample index exactly.

`run_job` starts a Ray Train ``TorchTrainer`` with ``training.workers`` workers; each calls
`train_worker`, which

1. loads the causal LM (``from_pretrained`` on the base checkpoint, or a tiny Llama built from
   its config with a fixed seed), turns on Hugging Face activation checkpointing when
   ``training.activation_checkpointing`` is set, and calls ``deepspeed.initialize`` with
   ``JobSpec.deepspeed``: the recipe's ZeRO stage, micro-batch, accumulation, precision, clipping
   and AdamW (betas, weight decay; torch's AdamW, so the decay is multiplied by the LR as the
   predictor assumes), merged on the driver with the JSON ``training.deepspeed_config`` names
   (`training.deepspeed_config`);
2. resumes from Ray Train's latest checkpoint when there is one (after a worker failure, or a new
   ``fit`` of the same run after a Prefect retry), refusing one of another run or world size;
3. for every step s from there to T-1: sets the LR of step s from the same `LRSchedule` the
   predictor integrated, reads its share of the batch the index names for step s
   (`SampleIndex.tokens`), runs the micro-batches, and (rank 0) appends the audit record
   (`training.audit`) and buffers the MLflow metrics (written in batches, asynchronously);
4. every ``checkpoint_every`` steps and at the end, saves a DeepSpeed checkpoint of all ranks
   through Ray Train's storage (the store: a local folder or S3), keeping the last N;
5. at the end, rank 0 saves the model in Hugging Face format with the tokenizer.

With ``JobSpec.averaging`` (a variant's checkpoint averaging), rank 0 also adds the weights after
each snapshot step to a running weighted sum (`training.averaging.SnapshotAverage`: one
model-sized float32 buffer on the host, nothing per snapshot), saves that sum with every
checkpoint (`AVERAGE_FILE`, beside DeepSpeed's files, once the first snapshot is folded) and
restores it on resume, so a resumed run delivers the same average; ``keep_checkpoints`` is not
involved. At the end the averaged weights are the delivered model (``model/``) and the raw final
weights are saved beside them (``final_model/``). ZeRO-3 is refused with averaging (its
parameters are partitioned; rank 0 does not hold them whole).

With ``JobSpec.collapse`` (the run's family curve and the monitor's settings), rank 0 also feeds
each step's loss to the collapse monitor (`training.collapse.CollapseMonitor`, O(1) a step; a
resumed run replays its earlier steps from the audit log first), logs ``collapse_residual``,
``collapse_threshold`` and ``collapse_final_loss_estimate`` with the other metrics, and writes
`COLLAPSE_EVENT` and the MLflow tag `COLLAPSE_TAG` at the first drift and at the end. With
``stop`` it broadcasts its decision each step (one 4-byte collective); on a drift every rank
checkpoints and leaves the loop, the model is not saved, and the event says ``stopped``.

``JobSpec.lr_fault`` (a testing aid, `FAULT_ENV`) multiplies the LR of some steps; the audit log
records the LR applied.

Everything the workers need travels in a JSON-able `JobSpec`. Nothing here imports Prefect.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from trecflow.store import Store

CHECKPOINT_TAG = "ds"
CHECKPOINT_INFO = "trecflow_checkpoint.json"
MODEL_DIR = "model"  # the delivered model: the average of the snapshots when the run averages
FINAL_MODEL_DIR = "final_model"  # with averaging: the raw final weights, beside the average
AVERAGE_FILE = "trecflow_average.pt"  # with averaging: the running sum of the snapshots folded so far
PID_DIR = "_work/pids"
COLLAPSE_EVENT = "_work/collapse.json"  # the collapse monitor's state: written at the first drift, a stop, the end
COLLAPSE_TAG = "trecflow.collapse"  # MLflow tag: drift, stopped or ok
# A testing aid: "<first step>:<steps>:<factor>" multiplies the LR of those steps (read on the driver).
FAULT_ENV = "TRECFLOW_FAULT_LR_SPIKE"


class JobError(ValueError):
    """A job that must not start (bad input found before training)."""


@dataclass
class JobSpec:
    """What every worker needs, JSON-able (Ray ships it to the workers)."""

    recipe: dict[str, Any]
    store_url: str
    endpoint_url: str | None
    index_fingerprint: str
    index_inputs: dict[str, str]
    tokenizer_fingerprint: str
    output_path: str  # the stage folder, a path inside the store
    run_fingerprint: str
    base_uri: str | None = None  # a Hugging Face folder (local path or store URL)
    model_config: dict[str, Any] | None = None  # a from-scratch model when there is no base
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    # The engine's DeepSpeed config: the recipe merged with the JSON ``training.deepspeed_config``
    # names (`training.deepspeed_config.engine_config`). Resolved where the spec is made (the
    # driver) when not given, so the workers, which receive it filled in, never read the file.
    deepspeed: dict[str, Any] | None = None
    # The collapse monitor: {"family": FamilyCurve.as_json(), "threshold", "patience", "stop"}; None: off.
    collapse: dict[str, Any] | None = None
    # A testing aid (`injected_lr_fault`): {"first", "steps", "factor"}; None: no fault.
    lr_fault: dict[str, Any] | None = None
    # Checkpoint averaging: {"snapshots": [step, ...], "weights": [w, ...]} oldest first; None: off.
    averaging: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.deepspeed is None:
            self.deepspeed = deepspeed_config(self.recipe_object())

    def recipe_object(self):
        from trecflow.recipe import parse_recipe

        return parse_recipe(self.recipe)


def injected_lr_fault(steps: int) -> dict[str, Any] | None:
    """The LR fault `FAULT_ENV` asks for in a run of ``steps`` steps (a testing aid: how the
    collapse monitor's detection is measured), or None when it is unset. Raises `RecipeError`
    (one line naming the variable) for a value that is not ``<first step>:<steps>:<factor>``
    with the steps inside the run and a factor > 0."""
    import math

    from trecflow.recipe import RecipeError

    raw = os.environ.get(FAULT_ENV, "").strip()
    if not raw:
        return None
    parts = raw.split(":")
    try:
        first, count, factor = int(parts[0]), int(parts[1]), float(parts[2])
        if len(parts) != 3:
            raise ValueError
    except (ValueError, IndexError):
        raise RecipeError(f"{FAULT_ENV}: {raw!r} is not <first step>:<steps>:<factor> (e.g. 200:5:20)") from None
    if first < 0 or count <= 0 or not (math.isfinite(factor) and factor > 0):
        raise RecipeError(f"{FAULT_ENV}: {raw!r}: the first step must be >= 0, the steps > 0 and the factor > 0")
    if first + count > steps:
        raise RecipeError(f"{FAULT_ENV}: {raw!r}: steps {first}..{first + count - 1} are not all inside this run's {steps} steps")
    return {"first": first, "steps": count, "factor": factor}


def deepspeed_config(recipe) -> dict[str, Any]:
    """The DeepSpeed config of a recipe: its decisions (batch, ZeRO stage, precision, clipping,
    AdamW; the LR is set per step by us) merged with the JSON ``training.deepspeed_config`` names,
    read from the current directory. Raises `RecipeError` (one line) when the file is missing,
    invalid or conflicts with the recipe."""
    from training.deepspeed_config import resolve

    return resolve(recipe)


def checkpoint_root(store: Store, run_fingerprint: str) -> str:
    """Where Ray Train keeps this run's checkpoints (a path inside the store)."""
    return store.path("checkpoints", run_fingerprint)


def latest_checkpoint(store: Store, run_fingerprint: str) -> dict[str, Any] | None:
    """The newest checkpoint's `CHECKPOINT_INFO` (with its ``path``), or None."""
    root = checkpoint_root(store, run_fingerprint)
    found = store.fs.glob(f"{root}/*/checkpoint_*/{CHECKPOINT_INFO}")
    best = None
    for path in found:
        info = json.loads(store.fs.cat_file(path))
        info["path"] = path.rsplit("/", 1)[0]
        if best is None or info["step"] > best["step"]:
            best = info
    return best


def check_resumable(store: Store, spec: JobSpec, world_size: int) -> dict[str, Any] | None:
    """The checkpoint a new ``fit`` would resume from, checked: same run, same world size."""
    info = latest_checkpoint(store, spec.run_fingerprint)
    if info is None:
        return None
    if info.get("run") != spec.run_fingerprint:
        raise JobError(f"{info['path']}: checkpoint of run {info.get('run')!r}, not of this run {spec.run_fingerprint!r}")
    if info.get("world_size") != world_size:
        raise JobError(
            f"{info['path']}: the checkpoint was written by {info.get('world_size')} workers; resuming needs the same "
            f"world size, but training.workers is {world_size} (restore the setting, or force the train stage to start over)"
        )
    return info


def _load_model(spec: JobSpec):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from training.models import fetch_checkpoint

    if spec.base_uri is not None:
        folder = fetch_checkpoint(spec.base_uri, spec.endpoint_url)
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = dict(spec.model_config)
    seed = config.pop("init_seed", 0)
    torch.manual_seed(seed)  # every rank builds the same initial weights
    return AutoModelForCausalLM.from_config(LlamaConfig(**config))


def _skip_inference_shm_op() -> None:
    """Do not JIT-compile DeepSpeed's CPU shared-memory all-reduce op: only its
    ``inference_all_reduce`` uses it (training reduces through torch.distributed), and compiling
    it costs about two minutes on every fresh machine."""
    import deepspeed.ops

    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


class _MetricBuffer:
    """Rank 0's MLflow metrics, written in batches and asynchronously (the step does not wait)."""

    def __init__(self, spec: JobSpec, every: int):
        self.client = None
        self.every = every
        self.pending: list = []
        self.monitor = None
        if spec.mlflow_run_id and spec.tracking_uri:
            from mlflow import MlflowClient

            self.client = MlflowClient(spec.tracking_uri)
            self.run_id = spec.mlflow_run_id
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, samples_before_logging=1)
                self.monitor.start()
            except Exception:  # system metrics are a convenience; training goes on without them
                self.monitor = None

    def add(self, step: int, values: dict[str, float]) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending.extend(Metric(key, float(value), now, step) for key, value in values.items())
        if len(self.pending) >= self.every * len(values):
            self.flush(synchronous=False)

    def flush(self, synchronous: bool = True) -> None:
        if self.client is None or not self.pending:
            return
        batch, self.pending = self.pending, []
        for first in range(0, len(batch), 1000):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, metrics=batch[first : first + 1000], synchronous=synchronous)

    def close(self) -> None:
        self.flush(synchronous=True)
        if self.monitor is not None:
            self.monitor.finish()


class _CollapseWatch:
    """Rank 0's collapse monitor (see the module docstring): the readings of each step as metrics,
    the first drift and the end as `COLLAPSE_EVENT` and `COLLAPSE_TAG`."""

    def __init__(self, spec: JobSpec, store: Store, metrics: _MetricBuffer, steps: int, earlier_losses: list[float]):
        from training.collapse import CollapseMonitor, FamilyCurve

        settings = spec.collapse
        self.store, self.metrics, self.steps = store, metrics, steps
        self.path = f"{spec.output_path}/{COLLAPSE_EVENT}"
        store.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        self.family = FamilyCurve.from_json(settings["family"])
        self.threshold = settings["threshold"]
        self.monitor = CollapseMonitor(self.family, steps, self.threshold, settings["patience"])
        self.largest: dict[str, Any] = {"score": 0.0, "step": None}
        self.last_estimate: float | None = None
        for step, loss in enumerate(earlier_losses):  # a resumed run: the state it had at this step
            self._follow(self.monitor.update(step, loss))
        self.reported = self.monitor.first_drift is not None

    def _follow(self, reading) -> None:
        if reading.residual is not None:
            score = abs(reading.residual) * self.threshold / reading.threshold
            if score > self.largest["score"]:
                self.largest = {"score": score, "step": reading.step, "residual": reading.residual}
            self.last_estimate = reading.final_loss

    def update(self, step: int, loss: float) -> tuple[Any, dict[str, float]]:
        """Feed one step: its `training.collapse.Reading` and its MLflow metrics (none before the
        residual exists, or when it is not finite); the first drift writes the event and tag."""
        import math

        reading = self.monitor.update(step, loss)
        self._follow(reading)
        values = {}
        if reading.residual is not None and math.isfinite(reading.residual):
            values = {"collapse_residual": reading.residual, "collapse_threshold": reading.threshold,
                      "collapse_final_loss_estimate": reading.final_loss}
        if reading.drift and not self.reported:
            self.reported = True
            self.write("drift")
        return reading, values

    def write(self, state: str, stopped_after: int | None = None) -> None:
        """The event file (the whole state so far) and the MLflow tag."""
        first = self.monitor.first_drift
        event = {
            "state": state,
            "first_drift": first.as_json() if first else None,
            "stopped_after_step": stopped_after,
            "largest": self.largest,
            "final_loss_estimate": self.last_estimate,
            "threshold": self.threshold,
            "patience_steps": self.monitor.patience_steps,
            "steps": self.steps,
            "family": {"runs": self.family.runs, "description": self.family.description, "members": list(self.family.members)},
        }
        self.store.fs.pipe_file(self.path, json.dumps(event, indent=2).encode())
        if self.metrics.client is not None:
            self.metrics.client.set_tag(self.metrics.run_id, COLLAPSE_TAG, state)
            if first is not None:
                self.metrics.client.set_tag(self.metrics.run_id, f"{COLLAPSE_TAG}_step", str(first.step))


def _earlier_losses(store: Store, folder: str, start: int) -> list[float]:
    """Steps 0..start-1's losses from the audit log of earlier attempts (each step's last record)."""
    from training.audit import last_records, read_audit

    last = last_records(read_audit(store, folder))
    return [last[step]["loss"] for step in range(start)]


def train_worker(config: dict[str, Any]) -> None:
    """The Ray Train worker function (see the module docstring)."""
    import deepspeed
    import numpy as np
    import ray.train
    import torch
    import torch.distributed as dist

    from training.audit import AuditWriter
    from training.deepspeed_config import enable_activation_checkpointing
    from training.sample_index import SampleIndex, batch_hash, rank_share
    from training.schedules import LRSchedule
    from training.torch_schedule import set_step_lr

    spec = JobSpec(**config)
    recipe = spec.recipe_object()
    training = recipe.training
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    store = Store(spec.store_url, spec.endpoint_url)
    index = SampleIndex(store, spec.index_fingerprint, expected=spec.index_inputs)
    steps, micro, accumulation = index.steps, recipe.micro_batch, training.accumulation
    schedule = LRSchedule.from_recipe(recipe)

    store.fs.makedirs(f"{spec.output_path}/{PID_DIR}", exist_ok=True)
    import importlib.util

    where = {"pid": os.getpid(), "rank": rank, "node": ray.get_runtime_context().get_node_id(), "host": os.uname().nodename,
             "code": importlib.util.find_spec("tasks").origin}  # where this worker runs, and which code it imports
    store.fs.pipe_file(f"{spec.output_path}/{PID_DIR}/rank-{rank}.json", json.dumps(where).encode())

    _skip_inference_shm_op()
    torch.manual_seed(training.seed)
    model = _load_model(spec)
    if training.activation_checkpointing:
        enable_activation_checkpointing(model)
    # the merged config the driver resolved (`JobSpec.deepspeed`): workers never read the JSON
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=spec.deepspeed)

    start = 0
    average = None
    if spec.averaging is not None and rank == 0:
        from training.averaging import SnapshotAverage

        average = SnapshotAverage(spec.averaging["snapshots"], spec.averaging["weights"])
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            info = json.loads(open(os.path.join(folder, CHECKPOINT_INFO)).read())
            if info["run"] != spec.run_fingerprint or info["world_size"] != world:
                raise JobError(f"checkpoint {info} is not of this run ({spec.run_fingerprint}) and world size {world}")
            _, client_state = engine.load_checkpoint(folder, tag=CHECKPOINT_TAG)
            start = int(client_state["step"])
            if average is not None:
                saved = os.path.join(folder, AVERAGE_FILE)
                state = torch.load(saved, weights_only=True) if os.path.exists(saved) else {"folded": [], "sums": {}}
                try:
                    average.restore(state, start)
                except ValueError as error:
                    raise JobError(f"checkpoint of step {start}: {error}") from None

    watched = rank == 0 and spec.collapse is not None
    earlier_losses = _earlier_losses(store, spec.output_path, start) if watched else []  # read before this attempt writes
    writer = AuditWriter.next_attempt(store, spec.output_path) if rank == 0 else None
    metrics = _MetricBuffer(spec, training.log_every) if rank == 0 else None
    watch = _CollapseWatch(spec, store, metrics, steps, earlier_losses) if watched else None
    stop_on_drift = spec.collapse is not None and spec.collapse["stop"]
    fault = spec.lr_fault
    tokens_per_step = recipe.sequences_per_step * recipe.data.seq_len
    device = engine.device
    last_loss = float("nan")
    drifting = False  # rank 0's monitor: the last step is in drift
    stopped_after = None
    for step in range(start, steps):
        began = time.perf_counter()
        set_step_lr(engine.optimizer, schedule, step)
        if fault is not None and fault["first"] <= step < fault["first"] + fault["steps"]:
            for group in engine.optimizer.param_groups:  # the testing aid: the audit records this LR
                group["lr"] *= fault["factor"]
        global_batch = index.batch(step)  # read once: this rank's share, and rank 0's audit hash
        own = index.sequences.tokens(rank_share(global_batch, rank, world))
        tokens = torch.from_numpy(np.ascontiguousarray(own)).to(device)
        losses = []
        for number in range(accumulation):
            batch = tokens[number * micro : (number + 1) * micro]
            loss = engine(input_ids=batch, labels=batch).loss
            engine.backward(loss)
            engine.step()
            losses.append(loss.detach().float())
        applied_lr = float(engine.optimizer.param_groups[0]["lr"])
        if average is not None and average.wants(step):
            average.fold(step, engine.module.named_parameters())
        mean = torch.stack(losses).mean()
        dist.all_reduce(mean, op=dist.ReduceOp.SUM)
        last_loss = float(mean) / world
        seconds = time.perf_counter() - began
        if rank == 0:
            writer.record(step, batch_hash(global_batch), applied_lr, last_loss, tokens_per_step, seconds)
            hq_share = index.composition(step)["hq"] / recipe.sequences_per_step
            values = {"loss": last_loss, "lr": applied_lr, "tokens_per_second": tokens_per_step / seconds, "hq_share": hq_share}
            if watch is not None:
                reading, collapse_values = watch.update(step, last_loss)
                drifting = reading.drift
                values.update(collapse_values)
            metrics.add(step, values)
        stop = False
        if stop_on_drift and step + 1 < steps:  # rank 0's decision, the same on every rank
            flag = torch.tensor([1.0 if drifting else 0.0], device=device)
            dist.broadcast(flag, src=0)
            stop = bool(flag.item())
        if stop or (step + 1) % training.checkpoint_every == 0 or step + 1 == steps:
            _save_checkpoint(engine, spec, step + 1, world, last_loss, rank, average)
        if stop:
            stopped_after = step
            break
    if rank == 0:
        metrics.close()
        if watch is not None:
            watch.write("stopped" if stopped_after is not None else ("drift" if watch.monitor.first_drift else "ok"), stopped_after)
    if stopped_after is None:
        if spec.averaging is None:
            _save_model(engine, spec, store, rank, training.zero_stage, MODEL_DIR)
        else:
            _save_model(engine, spec, store, rank, training.zero_stage, FINAL_MODEL_DIR)
            if average is not None:
                if not average.complete:
                    raise JobError(f"averaging: snapshots {sorted(set(average.weights) - set(average.folded))} were never folded in")
                with torch.no_grad():  # training is over: the module takes the averaged weights
                    for name, parameter in engine.module.named_parameters():
                        parameter.copy_(average.sums[name])
            _save_model(engine, spec, store, rank, training.zero_stage, MODEL_DIR)


def _save_checkpoint(engine, spec: JobSpec, next_step: int, world: int, loss: float, rank: int, average=None) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as folder:
        state = {"step": next_step, "run": spec.run_fingerprint, "world_size": world}
        engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state=state)
        if rank == 0:
            with open(os.path.join(folder, CHECKPOINT_INFO), "w") as handle:
                json.dump(state, handle)
            if average is not None and average.folded:
                torch.save(average.state(), os.path.join(folder, AVERAGE_FILE))
        ray.train.report({"step": next_step, "loss": loss}, checkpoint=Checkpoint.from_directory(folder))


def _save_model(engine, spec: JobSpec, store: Store, rank: int, zero_stage: int, name: str) -> None:
    """Rank 0 writes the module's weights (``save_pretrained``) and the tokenizer under ``name``."""
    import contextlib

    import deepspeed

    gather = deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None) if zero_stage == 3 else contextlib.nullcontext()
    with gather:
        if rank != 0:
            return
        tokenizer = store.output("tokenizer", spec.tokenizer_fingerprint)
        with tempfile.TemporaryDirectory() as folder:
            engine.module.save_pretrained(folder, safe_serialization=True)
            for file in ("tokenizer.json", "tokenizer_config.json"):
                with open(os.path.join(folder, file), "wb") as handle:
                    handle.write(tokenizer.read_bytes(file))
            destination = f"{spec.output_path}/{name}"
            store.fs.makedirs(destination, exist_ok=True)
            for file in sorted(os.listdir(folder)):
                store.fs.put_file(os.path.join(folder, file), f"{destination}/{file}")


def run_job(spec: JobSpec, progress: Callable[[str], None] = print):
    """Run (or resume) the job; returns Ray Train's ``Result``. Raises ``JobError`` before any
    training for a checkpoint of another run or world size."""
    import pyarrow.fs
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from trecflow.ray_runtime import ensure_ray

    recipe = spec.recipe_object()
    training = recipe.training
    store = Store(spec.store_url, spec.endpoint_url)
    resumable = check_resumable(store, spec, training.workers)
    if resumable is not None:
        progress(f"train: resuming from the checkpoint of step {resumable['step']} ({resumable['path']})")
    ensure_ray()
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=asdict(spec),
        scaling_config=ScalingConfig(
            num_workers=training.workers, use_gpu=training.use_gpu, resources_per_worker={"CPU": training.cpus_per_worker},
            placement_strategy=training.placement,
        ),
        run_config=RunConfig(
            name="ray",
            storage_path=checkpoint_root(store, spec.run_fingerprint),
            storage_filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(store.fs)),
            checkpoint_config=CheckpointConfig(num_to_keep=training.keep_checkpoints),
            failure_config=FailureConfig(max_failures=training.max_failures),
        ),
    )
    return trainer.fit()
