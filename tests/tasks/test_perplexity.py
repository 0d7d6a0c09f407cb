"""The reference-LM scorer on a tiny random Llama with a tiny byte-level BPE tokenizer."""

from __future__ import annotations

import json
import math
import random
import string

import numpy as np
import pytest

from tasks.scoring.perplexity import PerplexityScorer, check_perplexity_model, loss_scores
from trecflow.recipe import PerplexitySection, RecipeError

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "SELECT name FROM users WHERE id = 42;",
    "def f(x):\n    return x * 2\n",
    "Hello",
    "Postgres stores tables in heap files; each page is eight kilobytes. " * 6,
    "buy now!!! cheap pills, limited offer, click here",
    "a",
    "",
    "The sqlite3 module provides a DB-API 2.0 interface for SQLite databases. " * 3,
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A random 2-layer Llama (hidden 32) and a 300-token byte-level BPE (no pad token)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-llama")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TEXTS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def section(model, **overrides) -> PerplexitySection:
    return PerplexitySection(**{"model": str(model), "max_tokens": 64, "batch_size": 3, "dtype": "float32", **overrides})


@pytest.fixture(scope="module")
def scorer(tiny_model):
    import torch

    torch.set_num_threads(1)
    return PerplexityScorer(section(tiny_model), device="cpu")


def reference_losses(scorer: PerplexityScorer, texts: list[str], max_tokens: int) -> list[float]:
    """One document at a time, unpadded: transformers' own loss of its first max_tokens tokens."""
    import torch

    losses = []
    with torch.inference_mode():
        for text in texts:
            ids = scorer.tokenizer(text)["input_ids"][:max_tokens]
            if len(ids) < 2:
                losses.append(math.nan)
                continue
            input_ids = torch.tensor([ids])
            losses.append(scorer.model(input_ids=input_ids, labels=input_ids).loss.item())
    return losses


def test_batched_losses_equal_one_document_at_a_time(scorer):
    assert scorer.tokenizer.pad_token_id is None  # padding without a pad token
    lengths = [len(ids) for ids in scorer.token_ids(TEXTS)]
    assert max(lengths) == 64 and min(lengths) == 0 and 1 in lengths  # truncated, empty, one token
    tokens_before = scorer.tokens
    losses = scorer.losses(TEXTS)
    assert losses.dtype == np.float64 and losses.shape == (len(TEXTS),)
    np.testing.assert_allclose(losses, reference_losses(scorer, TEXTS, 64), rtol=0, atol=1e-5)
    assert np.isnan(losses[[6, 7]]).all() and not np.isnan(np.delete(losses, [6, 7])).any()
    assert scorer.tokens - tokens_before == sum(n for n in lengths if n >= 2)
    assert scorer.seconds > 0 and scorer.tokens_per_second > 0


def test_batch_size_and_order_do_not_change_losses(tiny_model, scorer):
    one_batch = PerplexityScorer(section(tiny_model, batch_size=64), device="cpu")
    shuffled = list(reversed(TEXTS))
    np.testing.assert_allclose(one_batch.losses(shuffled)[::-1], scorer.losses(TEXTS), rtol=0, atol=1e-5, equal_nan=True)


def test_a_long_document_scores_as_its_first_max_tokens_tokens(scorer):
    long = "Debian is a free operating system. " * 40 + "".join(random.Random(1).choices(string.ascii_letters, k=400))
    ids = scorer.token_ids([long])[0]
    assert len(ids) == 64 and len(scorer.tokenizer(long)["input_ids"]) > 100
    prefix = scorer.tokenizer.decode(ids)
    assert scorer.tokenizer(prefix)["input_ids"] == ids
    loss_long, loss_prefix = scorer.losses([long, prefix, "short text here"])[:2]
    assert loss_long == pytest.approx(loss_prefix, abs=1e-6)
    assert loss_long == pytest.approx(reference_losses(scorer, [prefix], 64)[0], abs=1e-5)


def test_long_texts_are_cut_before_tokenizing_without_changing_their_first_tokens(tiny_model):
    texts = [TEXTS[4] * 8, " " * 3000 + TEXTS[0], TEXTS[0] * 40, "x" * 10, ""]
    for max_tokens in (8, 64):
        short = PerplexityScorer(section(tiny_model, max_tokens=max_tokens), device="cpu")
        assert short.token_ids(texts) == [short.tokenizer(text)["input_ids"][:max_tokens] for text in texts]
        if max_tokens == 8:  # the first cut (64 characters) of texts[0] yields too few tokens: cut again, longer
            assert len(short.tokenizer(texts[0][:64])["input_ids"]) < 8 + 16


def test_scores_decrease_with_loss_and_are_half_at_center(scorer):
    losses = np.array([0.0, 1.0, 2.5, 3.0, 3.5, 6.0, 50.0, 1e6, math.nan])
    scores = scorer.scores(losses)
    assert scores[3] == 0.5  # center 3.0
    assert np.all(np.diff(scores[:-1]) < 0)
    assert np.all((scores[:-1] >= 0) & (scores[:-1] <= 1)) and np.isnan(scores[-1])
    assert scores[4] == pytest.approx(1 / (1 + math.exp(0.5 / scorer.section.scale)))  # half a nat above the center
    assert scorer.scores(losses, missing=0.5)[-1] == 0.5
    assert loss_scores(np.array([2.0]), center=2.0, scale=0.1)[0] == 0.5


def test_check_accepts_the_tiny_llama(tiny_model):
    check_perplexity_model(str(tiny_model))


def refused(path, match: str, **kwargs) -> str:
    with pytest.raises(RecipeError, match=match) as error:
        check_perplexity_model(str(path), **kwargs)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"scoring.perplexity.model: {path}")
    return message


def test_check_refuses_with_one_line(tiny_model, tmp_path):
    from transformers import BertConfig

    refused(tmp_path / "nowhere", "does not exist")
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "has no config.json")
    (tmp_path / "file").write_text("x")
    refused(tmp_path / "file", "is not a folder")
    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               architectures=["BertForMaskedLM"]).save_pretrained(bert)
    (bert / "model.safetensors").write_bytes(b"")
    (bert / "vocab.txt").write_text("[PAD]\n")
    assert refused(bert, "not a causal LM") == f"scoring.perplexity.model: {bert} is a BertForMaskedLM, not a causal LM"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    refused(broken, "cannot parse")
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "no-such-model"}))
    refused(unknown, "cannot parse")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_tokenizer / name).write_bytes((tiny_model / name).read_bytes())
    refused(no_tokenizer, "has no tokenizer")
    (no_tokenizer / "model.safetensors").unlink()
    refused(no_tokenizer, "has no weights")
    with pytest.raises(RecipeError, match=r"scoring.perplexity.max_tokens: 512 exceeds the context .* \(256 tokens\)"):
        check_perplexity_model(str(tiny_model), max_tokens=512)


def test_scorer_refuses_a_bad_model_before_loading(tmp_path):
    with pytest.raises(RecipeError, match="scoring.perplexity.model: .* does not exist"):
        PerplexityScorer(section(tmp_path / "nowhere"))


def test_a_model_in_the_store_is_copied_and_scores_the_same(tiny_model, scorer, s3_endpoint):
    import uuid

    from tests.conftest import BUCKET
    from trecflow.store import Store

    store = Store(f"s3://{BUCKET}/perplexity-{uuid.uuid4().hex[:8]}", s3_endpoint)
    store.fs.put(f"{tiny_model}/", store.path("model") + "/", recursive=True)
    uri = store.uri("model")
    check_perplexity_model(uri, s3_endpoint)
    refused(store.uri("nowhere"), "does not exist", endpoint_url=s3_endpoint)
    remote = PerplexityScorer(section(uri), endpoint_url=s3_endpoint, device="cpu")
    np.testing.assert_allclose(remote.losses(TEXTS), scorer.losses(TEXTS), rtol=0, atol=1e-9, equal_nan=True)
