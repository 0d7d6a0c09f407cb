"""Stage 1: ingestion (formats, deduplication, splits, bad input) and scoring (rules, classifier,
Ray actors on the local Ray, the store on moto's S3 server)."""

from __future__ import annotations

import hashlib
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.ingest import IngestError, assign_splits, list_source, run_ingest
from tasks.scoring.classifier import QualityClassifier, holdout_mask, train_classifier
from tasks.scoring.rules import RULE_NAMES, rule_values, rules_score, rule_table
from tasks.score import run_score
from trecflow.recipe import ClassifierSection, CorpusSection, RulesSection, load_recipe
from trecflow.store import MANIFEST, Store

from ..conftest import BUCKET, CONFIGS
from ..corpus_builder import debian_copyright, stdlib_docstrings, write_jsonl


def test_rule_values_of_a_known_text():
    text = "The cat sat on the mat.\nAnd that was it 42 ...\n\n## heading\nThe cat sat on the mat.\n"
    values = dict(zip(RULE_NAMES, rule_values(text)))
    assert values == {
        "word_count": 20.0,
        "mean_word_length": 3.1,
        "symbol_to_word_ratio": 3 / 20,  # "...", "#", "#"
        "fraction_lines_end_punctuation": 0.75,
        "duplicate_line_fraction": 0.25,
        "stop_words": 3.0,  # the, and, that
        "alpha_word_fraction": 17 / 20,
    }


def test_rule_table_agrees_with_rule_values_on_every_document(monkeypatch):
    """The batch computation (numpy on code points, in windows) equals the per-document string
    methods exactly: on real text, on non-ASCII letters, digits and symbols, a lone surrogate,
    characters outside the BMP, non-ASCII whitespace, empty documents, and a document cut into
    several windows (the window made small so that the cut is exercised)."""
    from tasks.scoring import rules

    monkeypatch.setattr(rules, "WINDOW_CHARS", 1 << 12)
    texts = stdlib_docstrings()[:80] + debian_copyright(40) + [
        "", "   ", "a", "héllo wörld ½ ² _x_ 3.14 — …", "x\ud800y z", "😀 emoji word😀 🙂 𝔘𝔫𝔦", "\xa0nbsp\xa0sep word\u2003x",
        "The THE tHe Be of AND.\n\nThe cat.\n#", "word, " * 5000 + "end",
    ]
    table = rule_table(texts)
    reference = np.array([rule_values(text) for text in texts])
    for index, name in enumerate(RULE_NAMES):
        np.testing.assert_allclose(table[f"rule_{name}"], reference[:, index], rtol=1e-12, atol=0, err_msg=name)


def test_rules_score_counts_passed_rules():
    prose = " ".join(["The quick brown fox jumps over the lazy dog and that is with the end."] * 10)
    junk = "#### $$$ 1234 5678 #### ----"
    scores = rules_score(rule_table([prose, junk]), RulesSection())
    assert scores[0] == 1.0 and scores[1] < 0.5


def test_splits_are_disjoint_stable_and_follow_the_shares():
    doc_ids = [hashlib.sha256(str(i).encode()).hexdigest()[:32] for i in range(20000)]
    shares = {"eval": 0.1, "base": 0.2, "cpt": 0.5, "reference": 0.1, "classifier": 0.1}
    splits = assign_splits(doc_ids, shares)
    assert splits == assign_splits(doc_ids, shares)
    for name, share in shares.items():
        assert splits.count(name) / len(splits) == pytest.approx(share, abs=0.015)


def test_classifier_trains_saves_and_loads():
    hq, lq = stdlib_docstrings()[:200], debian_copyright(200)
    texts = hq + lq
    doc_ids = [hashlib.sha256(text.encode()).hexdigest()[:32] for text in texts]
    labels = np.array([1] * len(hq) + [0] * len(lq))
    config = ClassifierSection(kind="hashed", hq_sources=["a"], lq_sources=["b"], features=2**16)
    classifier, metrics = train_classifier(texts, labels, doc_ids, config)
    assert metrics["classifier_accuracy"] >= 0.9
    assert metrics["classifier_holdout_documents"] == int(holdout_mask(doc_ids, 0.2).sum())
    loaded = QualityClassifier.from_bytes(*classifier.to_bytes())
    np.testing.assert_allclose(loaded.probability(texts[:20]), classifier.probability(texts[:20]), rtol=1e-5)


def corpus(tmp_path, **sources) -> CorpusSection:
    return CorpusSection(
        sources=[{"name": name, **spec} for name, spec in sources.items()],
        partitions=3,
        splits={"eval": 0.2, "base": 0.2, "cpt": 0.6},
    )


def read_shards(store: Store, result) -> pa.Table:
    output = store.output("ingest", result.fingerprint)
    return pa.concat_tables(pq.read_table(output.file_path(name)) for name in result.summary.shards)


def test_ingest_formats_dedup_and_empty_documents(tmp_path):
    texts = stdlib_docstrings()[:60]
    write_jsonl(tmp_path / "a" / "one.jsonl", texts[:30] + ["   ", ""])
    pq.write_table(pa.table({"body": texts[20:50]}), tmp_path / "b.parquet")  # 10 repeat source a
    import datasets

    datasets.Dataset.from_dict({"text": texts[50:55] + [None]}).save_to_disk(str(tmp_path / "disk"))
    with pa.ipc.new_stream(str(tmp_path / "c.arrow"), pa.schema([("text", pa.string())])) as writer:
        writer.write_table(pa.table({"text": texts[55:60]}))
    spec = corpus(
        tmp_path,
        folder={"path": str(tmp_path / "a"), "format": "jsonl"},
        table={"path": str(tmp_path / "b.parquet"), "format": "parquet", "text_field": "body"},
        saved={"path": str(tmp_path / "disk"), "format": "disk"},
        stream={"path": str(tmp_path / "*.arrow"), "format": "arrow"},
    )
    store = Store(str(tmp_path / "store"))
    result = run_ingest(spec, store)
    stats = result.summary
    assert stats.sources["folder"].dropped_empty == 2 and stats.sources["saved"].dropped_empty == 1
    assert stats.sources["table"].dropped_duplicate == 10  # the first occurrence (source order) is kept
    assert stats.dropped.as_json() == {"empty": 3, "duplicate": 10, "near_duplicate": 0}
    assert stats.documents == 60
    assert {name: entry.documents for name, entry in stats.sources.items()} == {
        "folder": 30, "table": 20, "saved": 5, "stream": 5
    }
    table = read_shards(store, result)
    assert table.num_rows == 60 and len(set(table["doc_id"].to_pylist())) == 60
    assert set(table["split"].to_pylist()) <= {"eval", "base", "cpt"}
    row = table.filter(pa.compute.equal(table["source"], "saved")).slice(0, 1).to_pylist()[0]
    assert row["chars"] == len(row["text"]) and row["words"] == len(row["text"].split())
    assert run_ingest(spec, store).reused


def _missing_field(folder):
    write_jsonl(folder / "x.jsonl", ["a document"])
    return {"path": str(folder / "x.jsonl"), "text_field": "body"}


def _unreadable_shard(folder):
    (folder / "x.parquet").write_bytes(b"PAR1 this is not parquet")
    return {"path": str(folder / "x.parquet"), "format": "parquet"}


def _non_utf8(folder):
    (folder / "x.jsonl").write_bytes(b'{"text": "caf\xe9 \xff\xfe"}\n')
    return {"path": str(folder / "x.jsonl")}


def _no_files(folder):
    return {"path": str(folder / "absent.jsonl")}


def _only_empty(folder):
    write_jsonl(folder / "x.jsonl", ["  ", "\n"])
    return {"path": str(folder / "x.jsonl")}


def _not_text(folder):
    (folder / "x.jsonl").write_text('{"text": 5}\n')
    return {"path": str(folder / "x.jsonl")}


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (_missing_field, "has no text field 'body'"),
        (_unreadable_shard, "x.parquet: not a readable parquet file"),
        (_non_utf8, "UTF-8"),
        (_no_files, "no jsonl files"),
        (_only_empty, "yielded no documents"),
        (_not_text, "holds int, not text"),
    ],
    ids=["missing-text-field", "unreadable-shard", "non-utf8", "no-files", "only-empty", "not-text"],
)
def test_bad_input_names_the_file_and_leaves_no_output(tmp_path, setup, message):
    source_dir = tmp_path / "in"
    source_dir.mkdir()
    spec = setup(source_dir)
    store = Store(str(tmp_path / "store"))
    with pytest.raises(IngestError, match=message) as error:
        run_ingest(corpus(tmp_path, bad=spec), store)
    assert "corpus source bad" in str(error.value) and "\n" not in str(error.value)
    if message != "no jsonl files":
        assert str(source_dir) in str(error.value)
    assert not list(store.fs.glob(store.path("ingest", "*", MANIFEST)))


def test_source_fingerprint_follows_the_listing_not_the_content(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", ["one document here"])
    source = CorpusSection(sources=[{"name": "x", "path": str(path)}]).sources[0]
    first = list_source(source).listing_fingerprint
    assert list_source(source).listing_fingerprint == first
    write_jsonl(path, ["one document here", "and another"])
    assert list_source(source).listing_fingerprint != first


@pytest.mark.slow
def test_scoring_on_s3_through_ray_actors_and_cache(tmp_path, s3_endpoint, test_corpus):
    """Sources and store on moto's S3 server; Ray actors of the local Ray score; the data card
    accounts for every document ingest read."""
    recipe = load_recipe(CONFIGS / "test.yaml")
    store = Store(f"s3://{BUCKET}/{uuid.uuid4().hex}", endpoint_url=s3_endpoint)
    for name, path in test_corpus.items():
        store.fs.put_file(str(path), store.path("raw", f"{name}.jsonl"))
    sources = [{"name": s.name, "path": store.uri("raw", f"{s.name}.jsonl")} for s in recipe.corpus.sources]
    recipe = recipe.model_validate({**recipe.model_dump(), "corpus": {**recipe.corpus.model_dump(), "sources": sources}})

    result = run_score(recipe, store)
    stats = result.summary
    assert stats.classifier_accuracy >= 0.9
    assert stats.tiers["stdlib-docs"]["hq"] >= 0.9 and stats.tiers["debian-copyright"]["lq"] >= 0.9
    output = store.output("score", result.fingerprint)
    scored = pa.concat_tables(pq.read_table(store.fs.open(output.file_path(name), "rb")) for name in stats.shards)
    assert scored.num_rows == stats.documents
    assert "classifier" not in set(scored["split"].to_pylist())  # never scores its own training data
    for column in ("score", "score_rules", "score_classifier", "tier", *(f"rule_{name}" for name in RULE_NAMES)):
        assert column in scored.column_names
    assert all(0.0 <= value <= 1.0 for value in scored["score"].to_pylist())
    manifest = output.manifest()
    assert set(manifest["files"]) >= {"summary.json", "score_histogram.png", "data_card.md", "classifier/model.bin", *stats.shards}
    assert stats.classifier_kind == "fasttext"
    assert set(scored["language"].to_pylist()) == {"en"} and min(scored["language_score"].to_pylist()) >= 0.2
    for name, entry in stats.sources.items():  # nothing lost: every document read is kept, reserved or dropped by reason
        assert entry.documents_in == entry.documents + entry.classifier_training + sum(entry.dropped.as_json().values()), name
        assert entry.documents == sum(entry.tier_counts.values()) == scored.filter(pa.compute.equal(scored["source"], name)).num_rows
    assert stats.dropped.exact_duplicates > 0 and stats.dropped.near_duplicates > 0  # the test corpus has both
    card = output.read_bytes("data_card.md").decode()
    assert all(f"| {name} | {entry.documents_in:,} |" in card for name, entry in stats.sources.items())
    assert json.loads(output.read_bytes("classifier/classifier.json"))["classifier_accuracy"] == stats.classifier_accuracy
    assert run_score(recipe, store).reused  # same inputs: a hit, nothing recomputed


def test_quantile_thresholds_give_the_configured_shares():
    from tasks.score import quantile_thresholds
    from tasks.scoring.workers import tier_of

    scores = np.random.default_rng(3).random(100_000)
    hq_min, lq_max = quantile_thresholds(scores, hq_share=0.2, lq_share=0.3)
    tiers = tier_of(scores, hq_min, lq_max)
    assert np.mean(tiers == "hq") == pytest.approx(0.2, abs=0.001)
    assert np.mean(tiers == "lq") == pytest.approx(0.3, abs=0.001)
    assert np.mean(tiers == "mid") == pytest.approx(0.5, abs=0.002)


@pytest.mark.slow
@pytest.mark.usefixtures("prefect_harness")
def test_score_command_fails_fast_on_bad_input(tmp_path, monkeypatch):
    """A missing text field past the head the CLI checks before the flow (`check_files`): found
    by ingest's read pass, one line naming the file and line, exit 2, no traceback, no retry."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterName
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("TRECFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    source = write_jsonl(tmp_path / "docs.jsonl", [f"document {i} with some text of its own" for i in range(2000)])  # ~100 kB
    with source.open("a") as handle:
        handle.write('{"body": "a document without the text field"}\n')
    recipe = (CONFIGS / "test.yaml").read_text().split("corpus:")[0] + (
        f"corpus:\n  sources:\n    - {{name: docs, path: '{source}'}}\n  splits: {{eval: 0.5, cpt: 0.5}}\n"
        "scoring: {scorers: [rules], weights: {rules: 1.0}}\n"
    )
    path = tmp_path / "bad.yaml"
    path.write_text(recipe)
    result = CliRunner().invoke(app, ["score", str(path)])
    assert result.exit_code == 2, result.output
    line = result.stderr.strip().splitlines()[-1]
    assert line == f"error: corpus source docs: {source} line 2001 has no text field 'text' (fields: body)"
    assert "Traceback" not in result.stderr
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_="ingest_corpus")))
    attempts = [run.run_count for run in runs if run.state.is_failed()]
    assert attempts == [1]  # bad input is not retried (ingest is the stage that reads the text)
    assert not list((tmp_path / "store").glob("*/*/_MANIFEST.json"))


def test_run_refuses_a_missing_corpus_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("TRECFLOW_STORE", str(tmp_path / "store"))
    recipe = (CONFIGS / "test.yaml").read_text().replace("${TRECFLOW_HOME}/corpus/test", str(tmp_path / "absent"))
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    for command in ("run", "score"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert result.stderr.strip() == f"error: corpus source stdlib-docs: no jsonl files at {tmp_path}/absent/stdlib-docs.jsonl"
    assert not (tmp_path / "store").exists()


def test_new_scoring_pieces_refuse_bad_input_in_one_line_before_any_work(tmp_path, monkeypatch):
    """An unknown language code (when the recipe is read) and a perplexity model that is not a
    causal LM (before ingest reads anything): exit 2, one line naming the field, nothing in the store."""
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.setenv("TRECFLOW_STORE", str(tmp_path / "store"))
    source = write_jsonl(tmp_path / "docs.jsonl", stdlib_docstrings()[:20])
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"]}))
    base = (CONFIGS / "test.yaml").read_text().split("corpus:")[0] + (
        f"corpus:\n  sources:\n    - {{name: docs, path: '{source}'}}\n  splits: {{eval: 0.5, cpt: 0.5}}\n"
    )
    cases = {
        "language": ("validate", "scoring: {scorers: [rules], weights: {rules: 1.0}, language: {languages: [en, xx]}}\n",
                     "scoring.language.languages"),
        "perplexity": ("score", f"scoring: {{scorers: [rules, perplexity], weights: {{rules: 0.5, perplexity: 0.5}}, "
                                f"perplexity: {{model: '{bert}'}}}}\n", f"scoring.perplexity.model: {bert} is a BertForMaskedLM, not a causal LM"),
    }
    for name, (command, scoring, expected) in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(base + scoring)
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, (name, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (name, lines)
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))
