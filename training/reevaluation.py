"""Forward-only loss of a model on packed sequences, on a pool of Ray actors.

Each `LossActor` holds one model at a time (eval mode, no autograd; bf16 on a GPU when asked),
loaded once per model: a pool evaluates a reference and then the final model in the same actors
(each call names its model; an actor loads it when it holds another). It returns the mean
per-token cross-entropy of every sequence it is given, computed exactly as the
training loss is (next-token prediction over ``seq_len - 1`` positions, logits in fp32), so a
batch's loss is the mean of its sequences' losses.

`ActorPool.run` splits the work into units, keeps one unit in flight per actor, and retries a unit
whose actor died (Ray restarts the actor, which reloads its model) up to ``max_retries`` times;
every result is handed to ``on_result`` as it arrives, so callers stream results to the store and a
retried run skips the units already written. Nothing is dropped silently: a unit that keeps
failing fails the run, naming the unit.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np

# Test hook: when set to a path that does not exist yet, the first actor to evaluate creates it
# and exits mid-unit, as a crashed or preempted worker would (tests/tasks/test_reevaluate.py).
FAULT_ENV = "TRECFLOW_FAULT_REEVAL_EXIT_ONCE"
RESTART_PROBE_SECONDS = 0.5  # between probes of an actor Ray is restarting


@dataclass(frozen=True)
class ModelSpec:
    """Which model an actor loads and how it evaluates."""

    uri: str
    endpoint_url: str | None = None
    precision: str = "fp32"  # bf16 only on a GPU
    use_gpu: bool = False
    micro_batch: int = 32
    threads: int = 1


def load_eval_model(spec: ModelSpec):
    """The model at ``spec.uri`` (a local folder or a store URL), in eval mode on its device."""
    import torch
    from transformers import AutoModelForCausalLM

    from training.models import fetch_checkpoint

    dtype = torch.bfloat16 if spec.precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(fetch_checkpoint(spec.uri, spec.endpoint_url), dtype=dtype)
    model.eval()
    return model.to("cuda" if spec.use_gpu else "cpu")


def sequence_losses(model, tokens: np.ndarray, micro_batch: int) -> np.ndarray:
    """Mean next-token cross-entropy of each row of ``tokens`` (float64, one per sequence)."""
    import torch

    device = next(model.parameters()).device
    out = np.empty(len(tokens), dtype=np.float64)
    with torch.inference_mode():
        for start in range(0, len(tokens), micro_batch):
            ids = torch.as_tensor(np.asarray(tokens[start : start + micro_batch], dtype=np.int64), device=device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out[start : start + len(ids)] = losses.mean(dim=1).double().cpu().numpy()
    return out


class LossActor:
    """A Ray actor holding one model; ``losses`` evaluates token arrays or packed sequence ids."""

    def __init__(self, spec: ModelSpec, store_url: str | None = None, endpoint_url: str | None = None, pack_fp: str | None = None,
                 fault_marker: str | None = None):
        import torch

        torch.set_num_threads(spec.threads)
        self.spec = spec
        self.model = load_eval_model(spec)
        self.sequences = None
        if pack_fp is not None:
            from trecflow.store import Store
            from training.sample_index import PACK_STAGE, PackedSequences

            self.sequences = PackedSequences(Store(store_url, endpoint_url).output(PACK_STAGE, pack_fp))
        self.fault_marker = fault_marker

    def pid(self) -> int:
        return os.getpid()

    def losses(self, work: np.ndarray, by_id: bool = True, spec: ModelSpec | None = None) -> np.ndarray:
        """Per-sequence losses of ``work`` (sequence ids, any shape, of the pack, or a 2-D token
        array) under the model of ``spec`` (loaded first when the actor holds another; ``None``: the
        one it holds)."""
        if spec is not None and spec != self.spec:
            self.model = None  # free the old weights before loading the new ones
            self.model, self.spec = load_eval_model(spec), spec
        ids = np.asarray(work)
        tokens = self.sequences.tokens(ids.reshape(-1)) if by_id else ids
        if self.fault_marker and not os.path.exists(self.fault_marker):
            open(self.fault_marker, "w").close()
            sequence_losses(self.model, tokens[: max(1, len(tokens) // 2)], self.spec.micro_batch)
            os._exit(1)
        losses = sequence_losses(self.model, tokens, self.spec.micro_batch)
        return losses.reshape(ids.shape) if by_id else losses


@dataclass(frozen=True)
class Unit:
    """One piece of work: a key the caller understands, and the ids or tokens to evaluate."""

    key: Any
    work: np.ndarray
    tokens: int  # tokens evaluated, for throughput


class UnitFailed(RuntimeError):
    """A unit of work failed on every attempt."""


class ActorPool:
    """``size`` actors, started with the model of ``spec``; `run` evaluates units with retries and
    progress, under ``spec`` or the model its caller names."""

    def __init__(self, size: int, spec: ModelSpec, store_url: str | None = None, endpoint_url: str | None = None,
                 pack_fp: str | None = None, max_retries: int = 2, cpus_per_actor: int = 1):
        import ray

        from trecflow.ray_runtime import ensure_ray

        ensure_ray()
        remote = ray.remote(LossActor).options(
            num_cpus=cpus_per_actor, num_gpus=1 if spec.use_gpu else 0, max_restarts=max_retries, max_task_retries=0
        )
        fault = os.environ.get(FAULT_ENV)
        self.actors = [remote.remote(spec, store_url, endpoint_url, pack_fp, fault) for _ in range(size)]
        self.spec = spec
        self.max_retries = max_retries
        self.retried = 0

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def __enter__(self) -> ActorPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(self, units: Iterable[Unit], on_result: Callable[[Unit, np.ndarray], None], by_id: bool = True,
            progress: Callable[[str], None] | None = None, label: str = "evaluate", interval: float = 15.0,
            spec: ModelSpec | None = None) -> None:
        """Evaluate every unit under the model of ``spec`` (default: the pool's own, which a
        restarted actor holds again); ``on_result(unit, losses)`` is called in the driver as each finishes,
        and ``progress`` advances by one unit (`trecflow.progress`; ``label`` names the pass in the
        message). ``interval`` bounds how long the driver waits for a result before checking on
        restarting actors.

        A unit whose actor dies goes back to the queue; the actor is used again only once Ray has
        restarted it and it answers (a probe call), or is dropped when it cannot be restarted."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        from trecflow.progress import as_progress

        progress = as_progress(progress, label)
        pending = list(enumerate(units))
        total = len(pending)
        attempts: dict[int, int] = {}
        in_flight: dict[Any, tuple[int, Unit, int]] = {}  # ref -> (actor, unit, position)
        probes: dict[Any, int] = {}  # ref of a pid() call -> actor being waited for after a failure
        restarting: dict[int, float] = {}  # actor -> when to probe it again (Ray is still restarting it)
        free = list(range(len(self.actors)))
        alive = set(free)
        done = tokens = 0
        if total:
            progress.advance(0, total, "units", f"({label})")
        while pending or in_flight:
            if not alive:
                raise UnitFailed(f"{label}: every actor died and could not be restarted; {len(pending) + len(in_flight)} units left")
            while free and pending:
                position, unit = pending.pop(0)
                actor = free.pop(0)
                in_flight[self.actors[actor].losses.remote(unit.work, by_id, spec or self.spec)] = (actor, unit, position)
            now = time.monotonic()
            for actor, when in list(restarting.items()):
                if when <= now:
                    del restarting[actor]
                    probes[self.actors[actor].pid.remote()] = actor
            timeout = min([interval, *(when - now for when in restarting.values())])
            if in_flight or probes:
                ready, _ = ray.wait([*in_flight, *probes], num_returns=1, timeout=max(timeout, 0.0))
            else:  # every usable actor is restarting: wait for the next probe's time
                time.sleep(max(timeout, 0.0))
                ready = []
            for ref in ready:
                if ref in probes:
                    actor = probes.pop(ref)
                    try:
                        ray.get(ref)
                        free.append(actor)
                    except ActorUnavailableError:  # still restarting: ask again shortly, without blocking the others
                        restarting[actor] = time.monotonic() + RESTART_PROBE_SECONDS
                    except RayActorError:  # out of restarts
                        alive.discard(actor)
                    continue
                actor, unit, position = in_flight.pop(ref)
                try:
                    losses = ray.get(ref)
                except RayActorError as error:
                    attempts[position] = attempts.get(position, 0) + 1
                    if attempts[position] > self.max_retries:
                        raise UnitFailed(f"{label}: unit {unit.key} failed {attempts[position]} times; last: {error}") from error
                    self.retried += 1
                    progress(f"{label}: an actor died on unit {unit.key}; retrying it (attempt {attempts[position] + 1})")
                    pending.insert(0, (position, unit))
                    probes[self.actors[actor].pid.remote()] = actor
                    continue
                free.append(actor)
                on_result(unit, losses)
                done += 1
                tokens += unit.tokens
                progress.advance(done, total, "units", f"({label}, {tokens:,} tokens)" if tokens else f"({label})")
