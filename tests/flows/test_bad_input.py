"""Bad input, table-driven: recipes, corpus files, base checkpoints, tokenizers and store URLs.

Each bad input is refused with one line naming the file and the field, line or URL, before any
work. Most cases call the checks the CLI runs before any flow (`flows.cli.check_before_work`: the
recipe loader, `tasks.ingest.check_files`, `tasks.base_model.check_base`,
`tasks.tokenizer.check_tokenizer`, `trecflow.preflight.check_store`) in process; a representative
row of each table goes through the real CLI in a subprocess (all at once), which must exit 2 with
exactly one stderr line, no traceback, and no store folder, MLflow database or Prefect home created.
Good input next to each table stays accepted (a UTF-8 byte-order mark included).

Cases of the same kind tested elsewhere are not repeated here: unknown sections and keys, a
variant with an unknown strategy, numbers out of range or of the wrong type
(tests/trecflow/test_recipe.py, ``BAD_RECIPES``), a corpus path that matches nothing or has an
unknown protocol (tests/tasks/test_ingest_fsspec.py), a bad ``--set`` or overlay file
(tests/trecflow/test_recipe_yaml.py), a perplexity model that is not a causal LM (tests/tasks/test_perplexity.py).
"""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.base_model import check_base
from tasks.ingest import IngestError, check_files, iter_texts, list_source
from tasks.tokenizer import check_tokenizer
from trecflow.preflight import PreflightError, check_store
from trecflow.recipe import RecipeError, SourceSection, load_recipe, parse_recipe, read_yaml

from ..conftest import BUCKET, CONFIGS, ROOT, free_port

BASE_TEXT = (CONFIGS / "test.yaml").read_text()
BASE = read_yaml(BASE_TEXT)
BASE_LINES = BASE_TEXT.count("\n")
EOS = "<|endoftext|>"


def one_line(error: Exception) -> str:
    message = str(error)
    assert "\n" not in message and message, message
    return message


# --- recipes ----------------------------------------------------------------------------------


def _alias_bomb() -> str:
    """Billion laughs: 9 levels of 9 aliases to the level below (9^9 strings once expanded)."""
    lines = ["a: &a [" + ", ".join(["lol"] * 9) + "]"]
    for level in range(1, 9):
        name, below = chr(ord("a") + level), chr(ord("a") + level - 1)
        lines.append(f"{name}: &{name} [" + ", ".join([f"*{below}"] * 9) + "]")
    return BASE_TEXT + "\n".join(lines) + "\n"


def _dumped(path: str, value) -> str:
    data = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[leaf] = value
    return yaml.safe_dump(data)


# (id, file content, overlays {name: content}, what the one line must contain)
BAD_RECIPES = [
    ("binary-png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)), {}, "bad.yaml: line 1 is not UTF-8 text (byte 0x89: a binary file?)"),
    ("latin-1-text", BASE_TEXT.encode() + "# caf\u00e9\n".encode("latin-1"), {}, f"bad.yaml: line {BASE_LINES + 1} is not UTF-8 text (byte 0xe9"),
    ("control-character", BASE_TEXT + "extra: \x00\n", {}, f"bad.yaml: line {BASE_LINES + 1} invalid YAML: unacceptable character #x0000"),
    ("duplicate-key", BASE_TEXT.replace("  seq_len: 64", "  seq_len: 64\n  seq_len: 128"), {}, "bad.yaml: line 10 invalid YAML: duplicate key 'seq_len' (first at line 9)"),
    ("duplicate-section", BASE_TEXT + "model:\n  params: 3.0e5\n", {}, f"bad.yaml: line {BASE_LINES + 1} invalid YAML: duplicate key 'model' (first at line 5)"),
    ("alias-bomb", _alias_bomb(), {}, "invalid YAML: expands to more than 100,000 values (aliases counted each time they are used)"),
    ("deep-nesting", BASE_TEXT + "extra: " + "[" * 60 + "]" * 60 + "\n", {}, f"bad.yaml: line {BASE_LINES + 1} invalid YAML: nested deeper than 50 levels"),
    ("deeper-than-the-parser-recursion", BASE_TEXT + "extra:\n" + "".join("  " * i + "-\n" for i in range(1000)), {}, "invalid YAML: nested deeper than 50 levels"),
    ("python-object-tag", BASE_TEXT + "extra: !!python/object/apply:os.system [ls]\n", {}, f"line {BASE_LINES + 1} invalid YAML: could not determine a constructor"),
    ("boolean-as-number", _dumped("data.tokens", True), {}, "bad.yaml: data.tokens: must be a number, got true"),
    ("integer-out-of-range", _dumped("model.params", 1e30), {}, "bad.yaml: model.params: Unable to parse input string as an integer, exceeded maximum size"),
    ("infinite-number", BASE_TEXT.replace("params: 2.0e5", "params: .inf"), {}, "bad.yaml: model.params: Input should be a finite number (got inf)"),
    ("not-a-number", BASE_TEXT.replace("peak_lr: 2.0e-3", "peak_lr: .nan"), {}, "bad.yaml: optimizer.peak_lr: Input should be greater than 0 (got nan)"),
    ("empty-file", "", {}, "bad.yaml: the recipe must be a mapping of sections, got NoneType"),
    ("a-list-not-a-mapping", "- model\n- data\n", {}, "bad.yaml: the recipe must be a mapping of sections, got list"),
    ("overlays-that-conflict", BASE_TEXT, {"hub.yaml": "tokenizer: {from_base: /models/hub}\n", "bpe.yaml": "tokenizer: {train_bpe: {vocab: 512}}\n"},
     "bad.yaml + hub.yaml + bpe.yaml: tokenizer: give exactly one of from_base or train_bpe"),
    ("overlay-with-duplicate-keys", BASE_TEXT, {"twice.yaml": "trec:\n  p: 0.5\n  p: 0.7\n"}, "twice.yaml: line 3 invalid YAML: duplicate key 'p' (first at line 2)"),
]


def _write_recipe(folder: Path, content, overlays: dict[str, str]) -> tuple[Path, list[Path]]:
    path = folder / "bad.yaml"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    written = []
    for name, text in overlays.items():
        (folder / name).write_text(text)
        written.append(folder / name)
    return path, written


@pytest.mark.parametrize(("content", "overlays", "expected"), [case[1:] for case in BAD_RECIPES], ids=[case[0] for case in BAD_RECIPES])
def test_a_bad_recipe_is_one_line_naming_the_file_and_line_or_field(tmp_path, content, overlays, expected):
    path, overlay_paths = _write_recipe(tmp_path, content, overlays)
    with pytest.raises(RecipeError) as error:
        load_recipe(path, overlay_paths)
    message = one_line(error.value)
    assert expected in message.replace(f"{tmp_path}/", ""), message


@pytest.mark.parametrize("prefix", ["\ufeff", "\ufeff# a comment first\n"], ids=["bom", "bom-then-comment"])
def test_a_recipe_with_a_utf8_byte_order_mark_is_accepted(tmp_path, prefix):
    path = tmp_path / "bom.yaml"
    path.write_bytes((prefix + BASE_TEXT).encode("utf-8"))
    assert load_recipe(path).steps == 48


def test_anchors_and_aliases_within_bounds_stay_accepted(tmp_path):
    text = BASE_TEXT.replace("optimizer:\n  peak_lr: 2.0e-3", "optimizer: &opt\n  peak_lr: 2.0e-3")
    text = text.replace("    optimizer: {peak_lr: 3.0e-3, weight_decay: 0.1}", "    optimizer: *opt")
    path = tmp_path / "aliases.yaml"
    path.write_text(text)
    recipe = load_recipe(path)
    assert recipe.base.pretrain.optimizer.peak_lr == recipe.optimizer.peak_lr == 2.0e-3


# --- corpus files -----------------------------------------------------------------------------

GOOD_LINES = "".join(json.dumps({"text": f"document {i} of the corpus"}) + "\n" for i in range(100))


def _jsonl(text: str | bytes):
    return lambda path: path.write_bytes(text if isinstance(text, bytes) else text.encode())


def _hundred_megabyte_line(path: Path) -> None:
    """One 100 MB line (an unterminated JSON string), made in no time as a sparse file."""
    with path.open("wb") as handle:
        handle.write(b'{"text": "')
        handle.truncate(100 * 1024**2)


def _parquet(table: pa.Table, cut: int = 0):
    def write(path: Path) -> None:
        pq.write_table(table, path)
        if cut:
            path.write_bytes(path.read_bytes()[:-cut])

    return write


def _gzip(text: str, cut: int = 0):
    return lambda path: path.write_bytes(gzip.compress(text.encode(), mtime=0)[: -cut or None])


# (id, file name, writer, what the one line must contain after "corpus source web: <path>")
BAD_CORPORA = [
    ("empty-file", "a.jsonl", _jsonl(b""), ": the file is empty"),
    ("blank-lines-only", "a.jsonl", _jsonl("\n  \n\n"), ": holds no JSON line (empty or blank)"),
    ("binary-file", "a.jsonl", _jsonl(bytes(range(256)) * 16), " line 1: holds a NUL byte, not text (a binary file?)"),
    ("invalid-utf8", "a.jsonl", _jsonl(GOOD_LINES.encode() + b'{"text": "caf\xe9"}\n'), " line 101: not UTF-8 text (a binary file?)"),
    ("100-mb-single-line", "a.jsonl", _hundred_megabyte_line, " line 1: longer than 16 MiB (one document per line)"),
    ("invalid-json-in-the-middle", "a.jsonl", _jsonl(GOOD_LINES + "{not json\n" + GOOD_LINES), " line 101: not JSON (Expecting property name enclosed in double quotes at column 2)"),
    ("text-field-of-wrong-type", "a.jsonl", _jsonl(GOOD_LINES + json.dumps({"text": 42}) + "\n"), " line 101: field 'text' holds int, not text"),
    ("no-text-field", "a.jsonl", _jsonl(GOOD_LINES + json.dumps({"body": "x"}) + "\n"), " line 101 has no text field 'text' (fields: body)"),
    ("line-not-an-object", "a.jsonl", _jsonl('["a", "list"]\n'), " line 1: not a JSON object but a list"),
    ("truncated-gzip", "a.jsonl.gz", _gzip(GOOD_LINES, cut=40), ": cannot read it (EOFError: Compressed file ended before the end-of-stream marker was reached)"),
    ("gz-name-not-gzip", "a.jsonl.gz", _jsonl(GOOD_LINES), ": cannot read it (BadGzipFile: Not a gzipped file"),
    ("parquet-schema-mismatch", "a.parquet", _parquet(pa.table({"text": [1, 2, 3]})), ": parquet column 'text' is int64, not text"),
    ("parquet-without-text-column", "a.parquet", _parquet(pa.table({"body": ["a", "b"]})), ": parquet schema has no text column 'text' (columns: body)"),
    ("truncated-parquet", "a.parquet", _parquet(pa.table({"text": ["a", "b"]}), cut=30), ": not a readable parquet file (Parquet magic bytes not found in footer"),
]


def _source(path: Path) -> SourceSection:
    return SourceSection(name="web", path=str(path), format="parquet" if path.suffix == ".parquet" else "jsonl")


@pytest.mark.parametrize(("name", "write", "expected"), [case[1:] for case in BAD_CORPORA], ids=[case[0] for case in BAD_CORPORA])
def test_a_bad_corpus_file_is_one_line_naming_the_file_and_line(tmp_path, name, write, expected):
    path = tmp_path / name
    write(path)
    with pytest.raises(IngestError) as error:
        check_files([list_source(_source(path))])
    assert one_line(error.value) .startswith(f"corpus source web: {path}{expected}"), str(error.value)


def test_a_long_line_is_refused_having_read_no_more_than_its_bound(tmp_path):
    """The 100 MB line is never held whole: the reader stops one block past `MAX_LINE_BYTES`."""
    from tasks.ingest import MAX_LINE_BYTES, READ_BLOCK, json_lines

    path = tmp_path / "a.jsonl"
    _hundred_megabyte_line(path)
    with path.open("rb") as handle:
        with pytest.raises(IngestError, match=r"line 1: longer than 16 MiB"):
            list(json_lines(_source(path), str(path), handle))
        assert MAX_LINE_BYTES < handle.tell() <= MAX_LINE_BYTES + READ_BLOCK < path.stat().st_size


def test_a_corpus_file_that_disappears_between_listing_and_reading_is_named(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(GOOD_LINES)
    listing = list_source(_source(path))
    path.unlink()
    with pytest.raises(IngestError) as error:
        check_files([listing])
    assert one_line(error.value) == f"corpus source web: {path}: listed but gone when read (deleted or moved while listing?)"


def test_a_bad_line_past_the_checked_head_is_named_by_the_read_pass(tmp_path):
    """What `check_files` does not read (past its head) is read, line-numbered and bounded, by
    ingest's first pass: the same one line, before any shard is written."""
    path = tmp_path / "a.jsonl"
    lines = GOOD_LINES * 30  # ~100 kB: past the 64 kB head
    path.write_text(lines + "{not json\n")
    check_files([list_source(_source(path))])  # the head is fine
    with pytest.raises(IngestError) as error:
        for _ in iter_texts(_source(path), str(path)):
            pass
    assert one_line(error.value) == f"corpus source web: {path} line 3001: not JSON (Expecting property name enclosed in double quotes at column 2)"


@pytest.mark.parametrize("name, write", [
    ("a.jsonl", _jsonl("\ufeff" + GOOD_LINES)),
    ("a.jsonl.gz", _gzip(GOOD_LINES)),
    ("a.jsonl", _jsonl(GOOD_LINES + "\n\n" + json.dumps({"text": None, "id": 3}) + "\n")),
    ("a.parquet", _parquet(pa.table({"text": pa.array(["a", "b"], type=pa.large_string()), "id": [1, 2]}))),
], ids=["utf8-bom", "gzip", "blank-lines-and-null-text", "parquet-large-string"])
def test_good_corpus_files_stay_accepted(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    check_files([list_source(_source(path))])
    if path.suffix != ".parquet":  # (parquet is read by ``datasets``, whose import alone takes seconds)
        texts = [text for batch in iter_texts(_source(path), str(path)) for text in batch]
        assert texts[:2] == ["document 0 of the corpus", "document 1 of the corpus"] and len(texts) == 100 + (name == "a.jsonl" and None in texts)


# --- base checkpoints and tokenizers ----------------------------------------------------------

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024, "hidden_size": 16, "intermediate_size": 32,
         "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 64}


def _checkpoint(folder: Path, config: dict | str | None = LLAMA, weights: str = "whole") -> Path:
    """A Hugging Face checkpoint folder: config.json and a real safetensors file (or a damaged one)."""
    import numpy as np
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights == "none":
        return folder
    save_file({"embed": np.zeros((8, 4), dtype=np.float32), "head": np.ones((4, 8), dtype=np.float32)}, str(folder / "model.safetensors"))
    if weights == "truncated":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[:-50])
    if weights == "sharded-missing":
        (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"embed": "model-00001-of-00002.safetensors", "head": "model-00002-of-00002.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


def _base_recipe(folder: Path, tokenizer: dict | None = None):
    data = copy.deepcopy(BASE)
    data["base"] = {"path": str(folder)}
    data["corpus"]["splits"] = {"eval": 0.1, "cpt": 0.5, "reference": 0.1, "classifier": 0.3}
    if tokenizer is not None:
        data["tokenizer"] = tokenizer
    return parse_recipe(data)


# (id, make the folder, what the one line must contain after "base.path: <folder>")
BAD_BASES = [
    ("folder-missing", lambda folder: folder, " does not exist"),
    ("no-config-json", lambda folder: _checkpoint(folder, config=None), " has no config.json (not a Hugging Face checkpoint)"),
    ("config-json-not-json", lambda folder: _checkpoint(folder, config="{'model_type': llama"), " has a config.json that transformers cannot parse"),
    ("non-causal-architecture", lambda folder: _checkpoint(folder, {**LLAMA, "architectures": ["BertForMaskedLM"], "model_type": "bert"}), " is a BertForMaskedLM, not a causal LM"),
    ("no-weights", lambda folder: _checkpoint(folder, weights="none"), " has no weights (model.safetensors or pytorch_model.bin)"),
    ("truncated-safetensors", lambda folder: _checkpoint(folder, weights="truncated"), " has a broken model.safetensors: "),
    ("missing-shard", lambda folder: _checkpoint(folder, weights="sharded-missing"), " lacks the shard model-00002-of-00002.safetensors"),
    ("vocabulary-smaller-than-the-tokenizer", lambda folder: _checkpoint(folder, {**LLAMA, "vocab_size": 512}),
     " has a vocabulary of 512 tokens, fewer than the tokenizer's 1,024: token ids past it would have no embedding"),
]


@pytest.mark.parametrize(("make", "expected"), [case[1:] for case in BAD_BASES], ids=[case[0] for case in BAD_BASES])
def test_a_bad_base_checkpoint_is_one_line_naming_the_field_and_folder(tmp_path, make, expected):
    folder = make(tmp_path / "base")
    with pytest.raises(RecipeError) as error:
        check_base(_base_recipe(folder))  # the recipe's tokenizer: a 1,024-token BPE
    assert one_line(error.value).startswith(f"base.path: {folder}{expected}"), str(error.value)


def test_a_good_base_checkpoint_is_accepted(tmp_path):
    check_base(_base_recipe(_checkpoint(tmp_path / "base")))


def _tokenizer_folder(folder: Path, tokens: list[str], model_vocab: int | None = 1024, text: str | None = None) -> Path:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel

    folder.mkdir(parents=True, exist_ok=True)
    if text is None and tokens:
        text = Tokenizer(WordLevel({token: i for i, token in enumerate(tokens)}, unk_token=tokens[0])).to_str()
    if text is not None:
        (folder / "tokenizer.json").write_text(text)
    if model_vocab is not None:
        (folder / "config.json").write_text(json.dumps({**LLAMA, "vocab_size": model_vocab}))
    return folder


# (id, make the folder, what the one line must contain)
BAD_TOKENIZERS = [
    ("no-tokenizer-json", lambda folder: _tokenizer_folder(folder, []), "tokenizer.from_base: {folder} has no tokenizer.json"),
    ("tokenizer-json-not-a-tokenizer", lambda folder: _tokenizer_folder(folder, [], text='{"model": "nonsense"}'), "tokenizer.from_base: {folder}/tokenizer.json is not a tokenizer ("),
    ("eos-token-not-in-vocabulary", lambda folder: _tokenizer_folder(folder, ["<unk>", "a", "b"]), f"tokenizer.eos_token: {EOS!r} is not in the tokenizer's vocabulary"),
    ("more-tokens-than-the-model", lambda folder: _tokenizer_folder(folder, ["<unk>", "a", "b", EOS], model_vocab=3),
     "tokenizer.from_base: the tokenizer has 4 tokens but the model's vocab_size is 3"),
    ("config-json-not-json", lambda folder: (_tokenizer_folder(folder, ["<unk>", EOS], model_vocab=None) / "config.json").write_text("{"),
     "tokenizer.from_base: {folder}/config.json is not JSON"),
]


@pytest.mark.parametrize(("make", "expected"), [case[1:] for case in BAD_TOKENIZERS], ids=[case[0] for case in BAD_TOKENIZERS])
def test_a_bad_tokenizer_is_one_line_naming_the_field_and_folder(tmp_path, make, expected):
    folder = tmp_path / "hub"
    make(folder)
    data = copy.deepcopy(BASE)
    data["tokenizer"] = {"from_base": str(folder)}
    with pytest.raises(RecipeError) as error:
        check_tokenizer(parse_recipe(data))
    assert one_line(error.value).startswith(expected.format(folder=folder)), str(error.value)


def test_a_good_tokenizer_folder_is_accepted_and_bounds_the_base_vocabulary(tmp_path):
    folder = _tokenizer_folder(tmp_path / "hub", ["<unk>", "a", EOS])
    data = copy.deepcopy(BASE)
    data["tokenizer"] = {"from_base": str(folder)}
    assert check_tokenizer(parse_recipe(data)) == 3


# --- store URLs -------------------------------------------------------------------------------


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_store_urls_that_cannot_work_are_one_line_naming_the_url(tmp_path, s3_endpoint, monkeypatch, request):
    """Eight store URLs, each refused before anything is created; two good ones accepted."""
    from moto.core.authorization import enable_iam_authentication

    afile = tmp_path / "a-file"
    afile.write_text("")
    dead = f"http://127.0.0.1:{free_port()}"
    cases = [
        ("unknown-scheme", "nope://bucket/store", None, "store nope://bucket/store: unknown scheme 'nope'"),
        ("no-bucket", "s3:///store", s3_endpoint, "store s3:///store: no bucket named (s3://BUCKET/prefix)"),
        ("unreachable-endpoint", f"s3://{BUCKET}/store", dead, f"store s3://{BUCKET}/store (endpoint {dead}): cannot connect to the S3 endpoint {dead}"),
        ("missing-bucket", "s3://no-such-bucket/store", s3_endpoint, f"store s3://no-such-bucket/store (endpoint {s3_endpoint}): the bucket 'no-such-bucket' does not exist"),
        ("credentials-in-the-url", f"s3://AKIAFAKE:s3cr3t@{BUCKET}/store", s3_endpoint, f"store s3://AKIAFAKE:***@{BUCKET}/store: credentials in the URL are not read"),
        ("local-path-is-a-file", str(afile), None, f"store {afile}: {afile} is a file, not a folder"),
        ("local-path-under-a-file", str(afile / "store"), None, f"store {afile / 'store'}: cannot create {afile / 'store'}: {afile} is a file, not a folder"),
    ]
    for name, url, endpoint, expected in cases:
        with pytest.raises(PreflightError) as error:
            check_store(url, endpoint)
        assert one_line(error.value).startswith(expected), (name, str(error.value))
        assert "s3cr3t" not in str(error.value)
    with enable_iam_authentication():  # moto checks the signature: its "testing" key is no IAM user's
        with pytest.raises(PreflightError, match=rf"^store s3://{BUCKET}/store \(endpoint .*\): access to the bucket '{BUCKET}' denied \(wrong credentials"):
            check_store(f"s3://{BUCKET}/store", s3_endpoint)
    request.getfixturevalue("no_aws_credentials")
    with pytest.raises(PreflightError, match=rf"^store s3://{BUCKET}/store \(endpoint .*\): no S3 credentials"):
        check_store(f"s3://{BUCKET}/store", s3_endpoint)
    monkeypatch.setenv("TRECFLOW_STORE_OPTIONS", '{"key": "testing", "secret": "testing"}')  # the store's own options are used
    check_store(f"s3://{BUCKET}/store", s3_endpoint)
    check_store(str(tmp_path / "new" / "store"))
    assert not (tmp_path / "new").exists()  # checked, not created


# --- the real CLI: one representative row per table, all at once -------------------------------


def _cli_recipe(folder: Path, corpus_file: Path, **changes) -> Path:
    data = copy.deepcopy(BASE)
    for source in data["corpus"]["sources"]:
        source["path"] = str(corpus_file)
    data.update(changes)
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def cli_cases(tmp_path_factory, s3_endpoint):
    """Each CLI case's folder, arguments and environment (its own home, store and MLflow database)."""
    root = tmp_path_factory.mktemp("cli-bad-input")
    good = root / "good.jsonl"
    good.write_text(GOOD_LINES)
    cases: dict[str, tuple[Path, list[str], dict[str, str]]] = {}

    def case(name: str, args: list[str], env: dict[str, str] | None = None) -> Path:
        folder = root / name
        folder.mkdir()
        cases[name] = (folder, [args[0], str(folder / "recipe.yaml"), *args[1:]], {
            "TRECFLOW_HOME": str(folder / "home"), "PREFECT_HOME": str(folder / "home" / "prefect"), "TRECFLOW_STORE": str(folder / "store"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}", **(env or {})})
        return folder

    folder = case("binary-recipe", ["validate"])
    (folder / "recipe.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    folder = case("alias-bomb-recipe", ["run"])
    (folder / "recipe.yaml").write_text(_alias_bomb())
    folder = case("corpus-invalid-json-line", ["run"])
    (folder / "mid.jsonl").write_text(GOOD_LINES + "{not json\n" + GOOD_LINES)
    _cli_recipe(folder, folder / "mid.jsonl")
    folder = case("corpus-100-mb-line", ["score"])
    _hundred_megabyte_line(folder / "long.jsonl")
    _cli_recipe(folder, folder / "long.jsonl")
    folder = case("base-truncated-safetensors", ["run", "--variant", "uniform"])
    _checkpoint(folder / "base", weights="truncated")
    recipe = _cli_recipe(folder, good, base={"path": str(folder / "base")})
    data = yaml.safe_load(recipe.read_text())
    data["corpus"]["splits"] = {"eval": 0.1, "cpt": 0.5, "reference": 0.1, "classifier": 0.3}  # no tiny base reads a base split
    recipe.write_text(yaml.safe_dump(data))
    folder = case("tokenizer-without-eos", ["place", "--variant", "uniform"])
    _tokenizer_folder(folder / "hub", ["<unk>", "a"])
    _cli_recipe(folder, good, tokenizer={"from_base": str(folder / "hub")})
    folder = case("store-missing-bucket", ["run"], {"TRECFLOW_STORE": "s3://no-such-bucket/store", "AWS_ENDPOINT_URL": s3_endpoint})
    _cli_recipe(folder, good)
    folder = case("store-unknown-scheme", ["score"], {"TRECFLOW_STORE": "nope://bucket/store"})
    _cli_recipe(folder, good)
    folder = case("good-recipe-with-bom", ["validate"])
    (folder / "recipe.yaml").write_bytes(("\ufeff" + BASE_TEXT).encode())
    return cases


SUBPROCESS_CASES = ("binary-recipe", "corpus-invalid-json-line", "store-missing-bucket", "good-recipe-with-bom")


@pytest.fixture(scope="module")
def cli_subprocesses(cli_cases):
    """`SUBPROCESS_CASES` through ``python -m flows.cli``, started together: (returncode, stdout, stderr)."""
    running = {
        name: subprocess.Popen([sys.executable, "-m", "flows.cli", *cli_cases[name][1]], cwd=cli_cases[name][0],
                               env={**os.environ, "PYTHONPATH": str(ROOT), **cli_cases[name][2]}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name in SUBPROCESS_CASES
    }
    results = {}
    for name, process in running.items():
        stdout, stderr = process.communicate(timeout=300)
        results[name] = (process.returncode, stdout, stderr)
    return results


# (id, what the one stderr line must contain); the first of each table runs in a subprocess (what a
# terminal shows), the others in process through typer's runner (the same command, no interpreter start)
CLI_CASES = [
    ("binary-recipe", "recipe.yaml: line 1 is not UTF-8 text (byte 0x89: a binary file?)"),
    ("alias-bomb-recipe", "invalid YAML: expands to more than 100,000 values"),
    ("corpus-invalid-json-line", "mid.jsonl line 101: not JSON"),
    ("corpus-100-mb-line", "long.jsonl line 1: longer than 16 MiB"),
    ("base-truncated-safetensors", "/base has a broken model.safetensors: "),
    ("tokenizer-without-eos", "tokenizer.eos_token: '<|endoftext|>' is not in the tokenizer's vocabulary"),
    ("store-missing-bucket", "store s3://no-such-bucket/store (endpoint http://127.0.0.1:"),
    ("store-unknown-scheme", "store nope://bucket/store: unknown scheme 'nope'"),
]


@pytest.mark.parametrize(("name", "expected"), CLI_CASES, ids=[case[0] for case in CLI_CASES])
def test_the_cli_refuses_bad_input_in_one_line_before_any_work(request, cli_cases, monkeypatch, name, expected):
    folder, args, env = cli_cases[name]
    if name in SUBPROCESS_CASES:
        returncode, stdout, stderr = request.getfixturevalue("cli_subprocesses")[name]
    else:
        from typer.testing import CliRunner

        from flows.cli import app

        for key, value in env.items():
            monkeypatch.setenv(key, value)
        monkeypatch.chdir(folder)
        result = CliRunner().invoke(app, args)
        assert isinstance(result.exception, SystemExit), result.exception  # an exit, not an exception escaping the command
        returncode, stdout, stderr = result.exit_code, result.stdout, result.stderr
    lines = stderr.splitlines()
    assert returncode == 2, (returncode, stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert "Traceback" not in stderr and stdout == ""
    for path in (folder / "home", folder / "store", folder / "mlflow.db"):  # no store folder, no MLflow database, no Prefect home
        assert not path.exists(), f"{path} was created"


def test_the_cli_accepts_a_recipe_with_a_byte_order_mark(cli_subprocesses):
    returncode, stdout, stderr = cli_subprocesses["good-recipe-with-bom"]
    assert returncode == 0 and stdout.startswith("ok: test: 48 steps of 512 tokens"), (stdout, stderr)


def test_prefect_logs_bad_input_found_while_running_without_its_traceback():
    """A bad line past the head the CLI checks fails ingest inside the flow: Prefect's record of
    it keeps the message and drops the traceback; any other failure keeps its traceback."""
    from flows.cli import BadInputWithoutTraceback

    def record(error: Exception) -> logging.LogRecord:
        try:
            raise error
        except Exception:
            return logging.LogRecord("prefect.flow_runs", logging.ERROR, __file__, 1, "Encountered exception: %r", (error,), sys.exc_info())

    refused, crashed = record(IngestError("corpus source web: a.jsonl line 3001: not JSON")), record(RuntimeError("worker died"))
    assert BadInputWithoutTraceback().filter(refused) and BadInputWithoutTraceback().filter(crashed)
    formatted = logging.Formatter().format(refused)
    assert "Traceback" not in formatted and "line 3001: not JSON" in formatted
    assert "Traceback" in logging.Formatter().format(crashed)
