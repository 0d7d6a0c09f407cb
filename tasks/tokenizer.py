"""Stage 3a, the tokenizer: its own cached step, so the base model and the packed data share it.

- ``tokenizer: {train_bpe: {vocab: N}}``: a byte-level BPE trained with ``tokenizers`` on the
  ``base`` split of the ingested corpus (at most ``max_documents`` documents, in shard order, so
  the same corpus gives the same tokenizer). The base model of the demo is built with it.
- ``tokenizer: {from_base: DIR}``: the ``tokenizer.json`` of a base checkpoint (a local folder or
  a store URL); when DIR has a ``config.json``, a tokenizer larger than its ``vocab_size`` is an
  error.

Output ``<store>/tokenizer/<fingerprint>/``: ``tokenizer.json`` and ``tokenizer_config.json``
(loadable with ``AutoTokenizer.from_pretrained``), ``tokenizer_info.json`` (vocabulary size,
end-of-text id, how it was made), manifest last.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import pyarrow.compute as pc

from trecflow.fingerprint import fingerprint
from trecflow.recipe import Recipe, RecipeError, TokenizerSection
from trecflow.settings import expand_path
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target, omitted_when_none
from trecflow.store import StageOutput, Store

STAGE = "tokenizer"
STAGE_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
INFO_FILE = "tokenizer_info.json"


@dataclass(frozen=True)
class TokenizerSummary(Summary):
    """The tokenizer built: its vocabulary, end-of-text token and how it was made (``train_bpe``:
    the documents it was trained on and the ingest output; ``from_base``: the folder it came from);
    the same object as ``tokenizer_info.json``."""

    vocab_size: int
    eos_token: str
    eos_id: int
    method: str
    documents: int | None = omitted_when_none()
    ingest: str | None = omitted_when_none()
    from_base: str | None = omitted_when_none()


def require_tokenizer(recipe: Recipe) -> TokenizerSection:
    if recipe.tokenizer is None:
        raise RecipeError("tokenizer: placement needs a tokenizer section ({train_bpe: {vocab: N}} or {from_base: DIR})")
    return recipe.tokenizer


def _base_files(section: TokenizerSection, endpoint_url: str | None) -> tuple[bytes, int | None]:
    """``tokenizer.json`` of ``from_base`` and the model's ``vocab_size`` (None without config.json)."""
    from training.models import location_filesystem

    location = expand_path(section.from_base).rstrip("/")
    fs, root = location_filesystem(location, endpoint_url)
    try:
        data = fs.cat_file(f"{root}/{TOKENIZER_FILE}")
    except FileNotFoundError:
        raise RecipeError(f"tokenizer.from_base: {location} has no {TOKENIZER_FILE}") from None
    try:
        config = json.loads(fs.cat_file(f"{root}/config.json"))
    except FileNotFoundError:
        return data, None
    except ValueError as error:
        raise RecipeError(f"tokenizer.from_base: {location}/config.json is not JSON ({error})") from None
    return data, config.get("vocab_size") if isinstance(config, dict) else None


def check_tokenizer(recipe: Recipe, endpoint_url: str | None = None) -> int | None:
    """The most token ids the recipe's tokenizer can emit (None without a tokenizer section), after
    what can be checked without training: a ``from_base`` folder's tokenizer.json loads, holds
    ``eos_token`` and fits the model's vocab_size (its config.json beside it); `RecipeError` in one
    line otherwise. ``train_bpe``: its vocab (nothing to read)."""
    from tokenizers import Tokenizer

    section = recipe.tokenizer
    if section is None:
        return None
    if section.train_bpe is not None:
        return section.train_bpe.vocab
    data, model_vocab = _base_files(section, endpoint_url)
    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as error:  # not UTF-8, not JSON, not a tokenizer: tokenizers raises its own Exception
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"tokenizer.from_base: {expand_path(section.from_base).rstrip('/')}/{TOKENIZER_FILE} is not a tokenizer ({message})") from None
    if tokenizer.token_to_id(section.eos_token) is None:
        raise RecipeError(f"tokenizer.eos_token: {section.eos_token!r} is not in the tokenizer's vocabulary ({expand_path(section.from_base)})")
    check_vocabulary(tokenizer.get_vocab_size(), model_vocab, "tokenizer.from_base")
    return tokenizer.get_vocab_size()


def check_vocabulary(tokenizer_vocab: int, model_vocab: int | None, where: str) -> None:
    """A tokenizer may not emit ids the model has no embedding for."""
    if model_vocab is not None and tokenizer_vocab > model_vocab:
        raise RecipeError(f"{where}: the tokenizer has {tokenizer_vocab:,} tokens but the model's vocab_size is {model_vocab:,}")


def tokenizer_fingerprint(recipe: Recipe, store: Store, ingest_fp: str | None) -> str:
    """Fingerprint of the tokenizer: the section plus the base-split data (train_bpe) or the
    base checkpoint's tokenizer.json content (from_base)."""
    section = require_tokenizer(recipe)
    config = section.model_dump(mode="json")
    if section.train_bpe is not None:
        if ingest_fp is None:
            raise RecipeError("tokenizer.train_bpe: training a tokenizer needs a corpus section (its base split)")
        return fingerprint(STAGE, STAGE_VERSION, config, {"ingest": ingest_fp})
    data, _ = _base_files(section, store.endpoint_url)
    config["from_base"] = None  # the content decides, not where it was read from
    return fingerprint(STAGE, STAGE_VERSION, config, {"tokenizer.json": hashlib.sha256(data).hexdigest()})


def train_bpe(texts, vocab: int, min_frequency: int, eos_token: str):
    """A byte-level BPE (``tokenizers``) trained on ``texts``; ``eos_token`` is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        min_frequency=min_frequency,
        special_tokens=[eos_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _base_split_texts(store: Store, ingest, limit: int, counter: dict[str, int]):
    """Texts of the ``base`` split, in shard order, at most ``limit``."""
    from tasks.score import ingest_tables

    for table in ingest_tables(store, ingest, ["text", "split"]):
        for text in table.filter(pc.equal(table["split"], "base"))["text"].to_pylist():
            if counter["documents"] >= limit:
                return
            counter["documents"] += 1
            yield text


def hf_files(tokenizer, eos_token: str) -> dict[str, bytes]:
    """``tokenizer.json`` and ``tokenizer_config.json`` as ``save_pretrained`` writes them."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos_token, pad_token=eos_token)
    with tempfile.TemporaryDirectory() as folder:
        wrapped.save_pretrained(folder)
        return {path.name: path.read_bytes() for path in sorted(Path(folder).iterdir()) if path.is_file()}


class TokenizerStage(
    Stage[TokenizerSummary], name=STAGE, version=STAGE_VERSION, inputs=("ingest",), sections=("tokenizer",), title="Tokenizer",
    task_name="build_tokenizer", summary_type=TokenizerSummary
):
    """Stage 3a: the tokenizer, trained on the base split (``train_bpe``) or copied from a base."""

    def required_inputs(self, target: Target) -> tuple[str, ...]:
        """Only a trained BPE reads the corpus."""
        return ("ingest",) if target.recipe.tokenizer.train_bpe is not None else ()

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        ingest = upstream.get("ingest")
        return tokenizer_fingerprint(target.recipe, store, ingest.fingerprint if ingest else None)

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        return {"ingest": upstream["ingest"].fingerprint} if target.recipe.tokenizer.train_bpe is not None else {}

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> TokenizerSummary:
        return build(target.recipe, context.store, upstream.get("ingest"), output, context.progress)

    def counts(self, summary: TokenizerSummary) -> dict[str, Any]:
        return {"vocab_size": summary.vocab_size, "eos_id": summary.eos_id}

    def rows(self, summary: TokenizerSummary) -> list[tuple[str, str]]:
        return [("vocabulary", f"{summary.vocab_size:,} tokens ({summary.method}); end of text {summary.eos_token!r} = {summary.eos_id}")]

    def metrics(self, summary: TokenizerSummary) -> dict[str, float]:
        return {"tokenizer_vocab_size": summary.vocab_size}


TOKENIZER = TokenizerStage()


def run_tokenizer(recipe: Recipe, store: Store, force: bool = False, progress=print) -> StageResult[TokenizerSummary]:
    """Build (or reuse) the recipe's tokenizer alone (ingesting the corpus first for a BPE)."""
    from tasks.ingest import INGEST
    from trecflow.runner import run_stage

    section = require_tokenizer(recipe)
    upstream = {}
    if section.train_bpe is not None:
        if recipe.corpus is None:
            raise RecipeError("tokenizer.train_bpe: training a tokenizer needs a corpus section (its base split)")
        upstream["ingest"] = run_stage(INGEST, Target(recipe), store, progress=progress)
    return run_stage(TOKENIZER, Target(recipe), store, upstream, force=force, progress=progress)


def build(recipe: Recipe, store: Store, ingest: StageResult | None, output: StageOutput, progress) -> TokenizerSummary:
    """Train or copy the tokenizer into ``output``; returns its info."""
    from tokenizers import Tokenizer

    section = require_tokenizer(recipe)
    if section.train_bpe is not None:
        bpe = section.train_bpe
        counter = {"documents": 0}
        tokenizer = train_bpe(_base_split_texts(store, ingest, bpe.max_documents, counter), bpe.vocab, bpe.min_frequency, section.eos_token)
        if counter["documents"] == 0:
            raise RecipeError("tokenizer.train_bpe: the corpus has no documents in the base split (corpus.splits.base)")
        made = {"method": "train_bpe", "documents": counter["documents"], "ingest": ingest.fingerprint}
        model_vocab = None
        progress(f"tokenizer: trained a {tokenizer.get_vocab_size():,}-token BPE on {counter['documents']:,} base-split documents")
    else:
        data, model_vocab = _base_files(section, store.endpoint_url)
        tokenizer = Tokenizer.from_str(data.decode())
        made = {"method": "from_base", "from_base": expand_path(section.from_base)}
    eos_id = tokenizer.token_to_id(section.eos_token)
    if eos_id is None:
        raise RecipeError(f"tokenizer.eos_token: {section.eos_token!r} is not in the tokenizer's vocabulary")
    vocab_size = tokenizer.get_vocab_size()
    check_vocabulary(vocab_size, model_vocab, "tokenizer.from_base")
    info = {"vocab_size": vocab_size, "eos_token": section.eos_token, "eos_id": eos_id, **made}
    for name, data in hf_files(tokenizer, section.eos_token).items():
        output.write_bytes(name, data)
    output.write_bytes(INFO_FILE, json.dumps(info, indent=2).encode())
    return TokenizerSummary.from_json(info)


def load_tokenizer(store: Store, fp: str):
    """The ``tokenizers.Tokenizer`` of a committed tokenizer output (checksum verified)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(store.output(STAGE, fp).read_bytes(TOKENIZER_FILE).decode())
