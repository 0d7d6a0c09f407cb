"""Causal LMs for the job: a tiny from-scratch Llama, base checkpoints in the store, HF output.

- `tiny_llama_config`: a ``LlamaConfig`` from the recipe's ``base.tiny`` shape, the tokenizer's
  vocabulary and end-of-text id, and ``data.seq_len`` as the context.
- `fetch_checkpoint`: a Hugging Face folder (local path or store URL) as a local folder; folders
  in an object store are downloaded once into a cache keyed by their URL.
- `model_vocab_size`: the vocabulary of a checkpoint, read from its ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import fsspec

from trecflow.recipe import TinyModelSection
from trecflow.settings import expand_path, home


def tiny_llama_args(section: TinyModelSection, vocab_size: int, eos_id: int, seq_len: int) -> dict:
    """The ``LlamaConfig`` arguments of `tiny_llama_config`, without importing transformers (the
    base stage's fingerprint hashes them: `trecflow status` computes it and stays light)."""
    return {
        "vocab_size": vocab_size,
        "hidden_size": section.hidden,
        "intermediate_size": section.intermediate,
        "num_hidden_layers": section.layers,
        "num_attention_heads": section.heads,
        "num_key_value_heads": section.kv_heads or section.heads,
        "max_position_embeddings": seq_len,
        "tie_word_embeddings": section.tie_embeddings,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
    }


def tiny_llama_config(section: TinyModelSection, vocab_size: int, eos_id: int, seq_len: int):
    from transformers import LlamaConfig

    return LlamaConfig(**tiny_llama_args(section, vocab_size, eos_id, seq_len))


def location_filesystem(location: str, endpoint_url: str | None):
    """(filesystem, path) of a local path or URL; an ``s3://`` location is opened as the store is
    (`trecflow.store.filesystem`: ``endpoint_url``, the retry settings, ``TRECFLOW_STORE_OPTIONS``)."""
    from trecflow.store import filesystem

    if location.startswith("s3://"):
        return filesystem(location, endpoint_url)
    return fsspec.core.url_to_fs(location)


def fetch_checkpoint(location: str, endpoint_url: str | None = None) -> Path:
    """A local folder holding the checkpoint at ``location`` (downloaded once if remote)."""
    location = expand_path(location).rstrip("/")
    fs, root = location_filesystem(location, endpoint_url)
    if fs.protocol in ("file", "local") or (isinstance(fs.protocol, tuple) and "file" in fs.protocol):
        return Path(root)
    cache = home() / "cache" / "checkpoints" / hashlib.sha256(location.encode()).hexdigest()[:16]
    done = cache / ".complete"
    if not done.exists():
        cache.mkdir(parents=True, exist_ok=True)
        fs.get(f"{root}/", f"{cache}/", recursive=True)
        done.write_text(location)
    return cache


def model_vocab_size(location: str, endpoint_url: str | None = None) -> int | None:
    """``vocab_size`` from a checkpoint's config.json (None when it has none)."""
    location = expand_path(location).rstrip("/")
    fs, root = location_filesystem(location, endpoint_url)
    try:
        return json.loads(fs.cat_file(f"{root}/config.json")).get("vocab_size")
    except FileNotFoundError:
        return None
