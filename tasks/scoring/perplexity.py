"""The reference-LM scorer: a causal LM's mean per-token loss on each document's first tokens.

- `check_perplexity_model`: a cheap pre-flight of ``scoring.perplexity.model`` (no weights read):
  the folder exists, has a ``config.json`` that transformers parses, names a causal LM, and holds
  weights and a tokenizer. Otherwise a one-line `RecipeError` naming the field and the path.
  `check_causal_lm` is that check for any field (``base.path`` too), safetensors headers included.
- `PerplexityScorer`: loads the tokenizer and the model once (a folder in an object store is
  copied to a temporary folder first), then `losses` gives each document's mean cross-entropy
  (nats per predicted token) over its first ``max_tokens`` tokens, in batches of ``batch_size``
  documents sorted by length, and `scores` maps losses to [0, 1]:
  ``1 / (1 + exp((loss - center) / scale))`` (low loss, high score).

A document of 0 or 1 token has nothing to predict: its loss and score are NaN; the combined score
should leave this scorer out for that document (a weighted mean over the scorers that have a
value), which is what `scores(..., missing=...)` lets a caller replace by a fixed value instead.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np

from trecflow.recipe import PerplexitySection, RecipeError
from trecflow.settings import expand_path

FIELD = "scoring.perplexity.model"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "sentencepiece.bpe.model")
CUT_CHARS_PER_TOKEN = 8  # a text is tokenized from its first max_tokens * 8 characters (then 8 times more, ...)
CUT_MARGIN_TOKENS = 16  # ... until the cut yields max_tokens + 16 tokens or is the whole text


def _filesystem(location: str, endpoint_url: str | None):
    from training.models import location_filesystem

    return location_filesystem(location, endpoint_url)


def _causal_lm_names() -> set[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names: set[str] = set()
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([value] if isinstance(value, str) else value)
    return names


def check_perplexity_model(path: str, endpoint_url: str | None = None, max_tokens: int | None = None) -> None:
    """Raise a one-line `RecipeError` unless ``path`` (a local folder or a store URL) holds a
    Hugging Face causal LM with weights and a tokenizer (`check_causal_lm`). With ``max_tokens``,
    also refuse a model whose context (max_position_embeddings) is shorter."""
    config = check_causal_lm(path, FIELD, endpoint_url, needs_tokenizer=True)
    context = config.get("max_position_embeddings")
    if max_tokens is not None and isinstance(context, int) and 0 < context < max_tokens:
        raise RecipeError(f"scoring.perplexity.max_tokens: {max_tokens} exceeds the context of {expand_path(path).rstrip('/')} ({context} tokens)")


def check_causal_lm(path: str, field: str, endpoint_url: str | None = None, needs_tokenizer: bool = False) -> dict:
    """A Hugging Face causal LM's config.json (as a dict), or a one-line `RecipeError` naming
    ``field`` and ``path``: the folder exists, has a config.json that transformers parses, names
    a causal LM and holds weights (a safetensors file as long as its header says) and, with
    ``needs_tokenizer``, a tokenizer. Reads config.json, a listing and safetensors headers only."""
    from transformers import AutoConfig

    location = expand_path(path).rstrip("/")

    def refuse(problem: str) -> RecipeError:
        return RecipeError(f"{field}: {location} {problem}".replace("\n", " "))

    try:
        fs, root = _filesystem(location, endpoint_url)
        if not fs.exists(root):
            raise refuse("does not exist")
        if not fs.isdir(root):
            raise refuse("is not a folder (a Hugging Face checkpoint folder is expected)")
        names = {entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(root, detail=False)}
        if "config.json" not in names:
            raise refuse("has no config.json (not a Hugging Face checkpoint)")
        raw = fs.cat_file(f"{root}/config.json")
    except RecipeError:
        raise
    except Exception as error:  # an unreachable store, missing credentials, ...
        raise refuse(f"cannot be read: {type(error).__name__}: {error}") from None
    try:
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        with tempfile.TemporaryDirectory() as local:  # AutoConfig reads a folder
            (Path(local) / "config.json").write_bytes(raw)
            config = AutoConfig.from_pretrained(local)
    except Exception as error:
        raise refuse(f"has a config.json that transformers cannot parse: {type(error).__name__}: {error}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    if architectures:  # transformers' table of causal LMs (it imports torch) only when the name does not say
        if not any(name.endswith("ForCausalLM") for name in architectures) and not set(architectures) & _causal_lm_names():
            raise refuse(f"is a {'/'.join(architectures)}, not a causal LM")
    else:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise refuse(f"is a {config.model_type} model with no causal-LM head in transformers")
    if not names & set(WEIGHT_FILES):
        raise refuse(f"has no weights ({' or '.join(WEIGHT_FILES[::2])})")
    for name in _safetensors_files(fs, root, names, refuse):
        problem = safetensors_problem(fs, f"{root}/{name}")
        if problem:
            raise refuse(f"has a broken {name}: {problem}")
    if needs_tokenizer and not names & set(TOKENIZER_FILES):
        raise refuse(f"has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    return data


def _safetensors_files(fs, root: str, names: set[str], refuse) -> list[str]:
    """The safetensors files a checkpoint folder holds (its index's shards, each present)."""
    if "model.safetensors.index.json" not in names:
        return ["model.safetensors"] if "model.safetensors" in names else []
    try:
        shards = sorted(set(json.loads(fs.cat_file(f"{root}/model.safetensors.index.json"))["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise refuse(f"has a model.safetensors.index.json without a weight_map ({type(error).__name__})") from None
    missing = [name for name in shards if name not in names]
    if missing:
        raise refuse(f"lacks the shard {missing[0]} that model.safetensors.index.json names")
    return shards


def safetensors_problem(fs, path: str) -> str | None:
    """Why a safetensors file is unusable (its header unreadable, or the file shorter or longer
    than the tensors the header lays out), or None. Reads the 8-byte length and the header only."""
    size = fs.size(path)
    with fs.open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        length = int.from_bytes(head, "little")
        if length > min(size - 8, 100 * 1024**2):
            return f"its header claims {length:,} bytes of a {size:,}-byte file"
        try:
            header = json.loads(handle.read(length))
            end = max((int(item["data_offsets"][1]) for key, item in header.items() if key != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as error:
            return f"unreadable header ({type(error).__name__})"
    expected = 8 + length + end
    if size != expected:
        return f"{size:,} bytes where its header lays out {expected:,} (truncated or padded)"
    return None


def _local_copy(location: str, endpoint_url: str | None, into: str) -> str:
    """``location`` itself when local, else a copy of the folder under ``into``."""
    fs, root = _filesystem(location, endpoint_url)
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return root
    fs.get(f"{root}/", f"{into}/", recursive=True)
    return into


class PerplexityScorer:
    """One causal LM, loaded once; `losses` and `scores` of batches of texts.

    ``tokens`` (tokens fed to the model, padding excluded), ``documents`` and ``seconds`` (wall
    time inside `losses`) accumulate over calls, for a tokens/s figure."""

    def __init__(self, section: PerplexitySection, endpoint_url: str | None = None, device: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.section = section
        location = expand_path(section.model).rstrip("/")
        check_perplexity_model(location, endpoint_url, section.max_tokens)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if section.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        else:
            self.dtype = getattr(torch, section.dtype)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="trecflow-perplexity-") as scratch:
            folder = _local_copy(location, endpoint_url, scratch)
            self.tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=self.dtype)
        self.model = model.to(self.device).eval()
        self.load_seconds = time.perf_counter() - started
        pad = self.tokenizer.pad_token_id
        if pad is None:
            pad = self.tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0  # pad positions are masked and ignored anyway
        self.tokens = 0
        self.documents = 0
        self.seconds = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """Each text's first ``max_tokens`` token ids, as the tokenizer encodes the whole text (its
        own special tokens included: a leading BOS stays, an EOS only ends a text shorter than
        that). A long text is first cut at ``max_tokens * 8`` characters, and at 8 times more while
        the cut yields fewer than ``max_tokens + 16`` tokens, so a huge document costs about what a
        long one does; a cut can only change the result if one word of over 16 tokens straddles it."""
        limit = self.section.max_tokens
        result: list[list[int]] = [[] for _ in texts]
        pending, chars = list(range(len(texts))), limit * CUT_CHARS_PER_TOKEN
        while pending:
            encoded = self.tokenizer([texts[i][:chars] for i in pending], return_attention_mask=False, verbose=False)["input_ids"]
            retry = []
            for i, ids in zip(pending, encoded):
                if len(texts[i]) > chars and len(ids) < limit + CUT_MARGIN_TOKENS:
                    retry.append(i)
                else:
                    result[i] = list(ids[:limit])
            pending, chars = retry, chars * CUT_CHARS_PER_TOKEN
        return result

    def losses(self, texts: list[str]) -> np.ndarray:
        """Mean cross-entropy (nats per predicted token) of each text's first ``max_tokens`` tokens;
        NaN for a text of fewer than 2 tokens. Batches of ``batch_size`` texts, longest first."""
        import torch

        started = time.perf_counter()
        ids = self.token_ids(texts)
        result = np.full(len(texts), np.nan, dtype=np.float64)
        order = sorted((i for i, row in enumerate(ids) if len(row) >= 2), key=lambda i: -len(ids[i]))
        size = self.section.batch_size
        with torch.inference_mode():
            for start in range(0, len(order), size):
                batch = order[start : start + size]
                result[batch] = self._batch_losses([ids[i] for i in batch])
        self.tokens += sum(len(ids[i]) for i in order)
        self.documents += len(texts)
        self.seconds += time.perf_counter() - started
        return result

    def _batch_losses(self, rows: list[list[int]]) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):  # right padding: real tokens keep positions 0..n-1
            input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        logits = self.model(input_ids=input_ids, attention_mask=mask).logits[:, :-1].float()
        targets = input_ids[:, 1:]
        valid = mask[:, 1:].bool()
        token_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view(targets.shape)
        token_loss = torch.where(valid, token_loss, torch.zeros_like(token_loss))
        per_doc = token_loss.sum(dim=1, dtype=torch.float64) / valid.sum(dim=1)
        return per_doc.cpu().numpy()

    def scores(self, losses: np.ndarray, missing: float = math.nan) -> np.ndarray:
        """``1 / (1 + exp((loss - center) / scale))`` in [0, 1]; a NaN loss gives ``missing``."""
        losses = np.asarray(losses, dtype=np.float64)
        return loss_scores(losses, self.section.center, self.section.scale, missing)

    def score(self, texts: list[str], missing: float = math.nan) -> tuple[np.ndarray, np.ndarray]:
        """(losses, scores) of ``texts``."""
        losses = self.losses(texts)
        return losses, self.scores(losses, missing)


def loss_scores(losses: np.ndarray, center: float, scale: float, missing: float = math.nan) -> np.ndarray:
    """The score of each loss: 0.5 at ``center``, decreasing; NaN losses give ``missing``."""
    losses = np.asarray(losses, dtype=np.float64)
    z = np.clip((losses - center) / scale, -500.0, 500.0)
    with np.errstate(invalid="ignore"):
        scores = 1.0 / (1.0 + np.exp(z))
    return np.where(np.isnan(losses), missing, scores)
