"""Stage 3 on real text: the tokenizer step, packing by tier, the index of each variant and its
reader, the ``trecflow place`` command, bad input, and every sequence used the planned number of
times on the demo corpus."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from tasks.pack import read_catalog, run_pack
from tasks.place import index_inputs, run_place
from tasks.predict import run_predict
from tasks.score import run_score
from tasks.ingest import run_ingest
from tasks.tokenizer import load_tokenizer, run_tokenizer
from trecflow.recipe import RecipeError, parse_recipe, read_yaml
from trecflow.store import Store
from training.sample_index import IndexMismatchError, PackedSequences, SampleIndex

from ..conftest import BUCKET, CONFIGS, QUIET, ROOT

TRECFLOW = Path(sys.executable).parent / "trecflow"


@pytest.fixture(scope="module")
def staged(staged_test):
    return staged_test


def place(staged, variant: str, force: bool = False, recipe=None):
    return run_place(recipe or staged["recipe"], variant, staged["store"], staged["pack"].fingerprint, staged["predict"].fingerprint, force=force, **QUIET)


def expected_inputs(staged, variant: str, recipe=None, **overrides) -> dict[str, str]:
    inputs = index_inputs(
        recipe or staged["recipe"], variant, staged["pack"].fingerprint, staged["score"].fingerprint,
        staged["tokenizer"].fingerprint, staged["predict"].fingerprint,
    )
    return inputs | overrides


def test_tokenizer_trains_on_the_base_split_and_loads_with_transformers(staged):
    from transformers import AutoTokenizer

    info = staged["tokenizer"].summary
    assert info.method == "train_bpe" and info.vocab_size == 1024 and info.eos_id == 0
    ingested = run_ingest(staged["recipe"].corpus, staged["store"], **QUIET)  # reused: what the tokenizer reads
    assert ingested.reused
    assert info.documents == sum(source.splits.get("base", 0) for source in ingested.summary.sources.values())
    folder = staged["store"].output("tokenizer", staged["tokenizer"].fingerprint).path
    hf = AutoTokenizer.from_pretrained(folder)
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == 0 and len(hf) == 1024
    text = "Return the number of items in a container."
    assert hf(text).input_ids == load_tokenizer(staged["store"], staged["tokenizer"].fingerprint).encode(text).ids
    assert hf.decode(hf(text).input_ids) == text
    again = run_tokenizer(staged["recipe"], staged["store"], **QUIET)
    assert again.reused and again.fingerprint == staged["tokenizer"].fingerprint


def test_from_base_reads_a_checkpoints_tokenizer_and_checks_the_vocabulary(staged, tmp_path):
    folder = Path(staged["store"].output("tokenizer", staged["tokenizer"].fingerprint).path)
    base = tmp_path / "base"
    base.mkdir()
    (base / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["tokenizer"] = {"from_base": str(base)}
    recipe = parse_recipe(data)
    store = Store(str(tmp_path / "store"))
    copied = run_tokenizer(recipe, store, **QUIET)
    assert copied.summary.method == "from_base" and copied.summary.vocab_size == 1024
    # the content decides the fingerprint, not the folder it was read from
    moved = tmp_path / "moved"
    base.rename(moved)
    data["tokenizer"] = {"from_base": str(moved)}
    assert run_tokenizer(parse_recipe(data), store, **QUIET).fingerprint == copied.fingerprint

    (moved / "config.json").write_text(json.dumps({"vocab_size": 512}))
    other = Store(str(tmp_path / "other"))
    with pytest.raises(RecipeError, match="tokenizer.from_base: the tokenizer has 1,024 tokens but the model's vocab_size is 512"):
        run_tokenizer(parse_recipe(data), other, **QUIET)
    assert not other.fs.exists(other.path("tokenizer"))  or not any(other.output("tokenizer", fp).exists() for fp in other.fs.ls(other.path("tokenizer")))
    data["tokenizer"] = {"from_base": str(tmp_path / "nowhere")}
    with pytest.raises(RecipeError, match="tokenizer.from_base: .*nowhere has no tokenizer.json"):
        run_tokenizer(parse_recipe(data), other, **QUIET)
    data["tokenizer"] = {"from_base": str(moved), "eos_token": "</s>"}
    with pytest.raises(RecipeError, match="tokenizer.eos_token: '</s>' is not in the tokenizer's vocabulary"):
        run_tokenizer(parse_recipe(data), other, **QUIET)


def test_packing_gives_one_tier_per_sequence_scored_by_its_documents(staged):
    stats = staged["pack"].summary
    store = staged["store"]
    tiers, scores = read_catalog(store, staged["pack"].fingerprint)
    assert tiers.size == scores.size == stats.sequences > 0
    thresholds = staged["score"].summary.thresholds
    # every document of an hq sequence scored >= the hq threshold, so the token-weighted mean does too
    assert scores[tiers == 0].min() >= thresholds.hq - 1e-6
    assert scores[tiers == 2].max() < thresholds.lq
    sequences = PackedSequences(store.output("pack", staged["pack"].fingerprint))
    tokenizer = load_tokenizer(store, staged["tokenizer"].fingerprint)
    for code, tier in enumerate(("hq", "mid", "lq")):
        entry = stats.tiers[tier]
        assert entry.tokens == entry.sequences * 64 + entry.tail_tokens_dropped
        assert 0 <= entry.tail_tokens_dropped < 64 * stats.groups
        ids = np.flatnonzero(tiers == code)
        assert ids.size == entry.sequences
        tokens = sequences.tokens(ids)
        separators = int((tokens == 0).sum())
        assert 0 <= entry.documents - separators <= entry.tail_tokens_dropped  # one per document
    # the first hq sequence starts with the first cpt hq document, in shard order
    score_output = store.output("score", staged["score"].fingerprint)
    first_shard = sorted(name for name in score_output.manifest()["files"] if name.startswith("shards/"))[0]
    table = pq.read_table(score_output.file_path(first_shard))
    texts = [t for t, split, tier in zip(table["text"].to_pylist(), table["split"].to_pylist(), table["tier"].to_pylist())
             if split == "cpt" and tier == "hq"]
    first = sequences.tokens(np.flatnonzero(tiers == 0)[:1])[0]
    prefix = tokenizer.decode(first[: np.flatnonzero(first == 0)[0]].tolist() if (first == 0).any() else first.tolist())
    assert texts[0].startswith(prefix) and len(prefix) > 20


def test_index_is_deterministic_exact_and_refuses_other_inputs(staged):
    store = staged["store"]
    result = place(staged, "trec_valley")
    summary = result.summary
    assert summary.steps == 48 and summary.sequences == 384 and summary.hq_fraction == 0.25
    assert summary.hq_in_window >= 0.95 and summary.repeated_sequences == 0
    output = store.output("place", result.fingerprint)
    manifest = output.manifest()
    assert set(manifest["inputs"]) == {"recipe", "score", "tokenizer", "pack", "predict", "strategy", "seed"}
    before = {name: entry["sha256"] for name, entry in manifest["files"].items() if name != "placement.png"}
    again = place(staged, "trec_valley", force=True)
    after = {name: entry["sha256"] for name, entry in output.manifest()["files"].items() if name != "placement.png"}
    assert again.fingerprint == result.fingerprint and not again.reused and after == before
    assert place(staged, "trec_valley").reused

    index = SampleIndex(store, result.fingerprint, expected=expected_inputs(staged, "trec_valley"))
    tiers, _ = read_catalog(store, staged["pack"].fingerprint)
    ids = np.concatenate([index.batch(step) for step in range(index.steps)])
    _, counts = np.unique(ids, return_counts=True)
    assert counts.max() == 1 and ids.size == 384  # every planned sequence exactly once
    assert np.count_nonzero(tiers[ids] == 0) == 96
    start, end = summary.window_steps
    assert sum(index.composition(step)["hq"] for step in range(start, end)) >= 0.95 * 96
    assert np.array_equal(index.tokens(7, rank=1, world_size=2), index.sequences.tokens(index.batch(7)[4:]))

    # an index for another tokenizer, dataset or recipe is refused, naming what differs
    with pytest.raises(IndexMismatchError, match=r"tokenizer '[0-9a-f]+' \(expected 'f00'\)"):
        SampleIndex(store, result.fingerprint, expected=expected_inputs(staged, "trec_valley", tokenizer="f00"))
    with pytest.raises(IndexMismatchError, match=r"score '[0-9a-f]+' \(expected 'bad'\)"):
        SampleIndex(store, result.fingerprint, expected=expected_inputs(staged, "trec_valley", score="bad"))
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["batch"]["tokens"] = 1024
    with pytest.raises(IndexMismatchError, match=r"built for other inputs: recipe"):
        SampleIndex(store, result.fingerprint, expected=expected_inputs(staged, "trec_valley", recipe=parse_recipe(data)))
    other_seed = place(staged, "uniform").fingerprint
    with pytest.raises(IndexMismatchError, match="strategy"):
        SampleIndex(store, other_seed, expected=expected_inputs(staged, "trec_valley"))


def test_trec_weighted_reads_the_prediction_and_its_k_is_in_the_fingerprint(staged):
    from tasks.place import plan_request
    from tasks.placement import weighted_counts
    from tasks.predict import read_curve

    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"four": {"strategy": "trec_weighted", "params": {"k": 4}},
                                      "steep": {"strategy": "trec_weighted", "params": {"k": 8.0}}}
    recipe = parse_recipe(data)
    default = place(staged, "trec_weighted", recipe=recipe)
    assert place(staged, "four", recipe=recipe).fingerprint == default.fingerprint  # k defaults to 4
    steep = place(staged, "steep", recipe=recipe)
    assert steep.fingerprint != default.fingerprint
    assert expected_inputs(staged, "steep", recipe)["strategy"] != expected_inputs(staged, "trec_weighted", recipe)["strategy"]
    trec = read_curve(staged["store"], staged["predict"].fingerprint)["trec_pred"].to_numpy()
    valley = place(staged, "trec_valley").summary
    for result, k in ((default, 4.0), (steep, 8.0)):
        summary = result.summary
        index = SampleIndex(staged["store"], result.fingerprint, expected=expected_inputs(staged, "steep" if k == 8 else "four", recipe))
        per_step = [index.composition(step)["hq"] for step in range(index.steps)]
        counts, window = weighted_counts(plan_request(recipe, "steep" if k == 8 else "four"), trec)
        assert per_step == counts.tolist() and sum(per_step) == 96 and max(per_step) <= 8
        assert summary.strategy == "trec_weighted" and summary.window == valley.window and summary.window_steps == tuple(window)
        assert 0 < summary.hq_in_window <= 1


def test_other_seed_gives_other_order_and_short_hq_is_repeated_or_fails(staged):
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"seeded": {"strategy": "uniform", "params": {"seed": 5}}}
    recipe = parse_recipe(data)
    base = SampleIndex(staged["store"], place(staged, "uniform").fingerprint)
    seeded = SampleIndex(staged["store"], place(staged, "seeded", recipe=recipe).fingerprint)
    assert not np.array_equal(base.batch(0), seeded.batch(0))
    assert [base.composition(s)["hq"] for s in range(48)] == [seeded.composition(s)["hq"] for s in range(48)]  # same hq slots

    supply = staged["pack"].summary.tiers["hq"].sequences
    need = supply + 100  # more hq than was packed
    data["data"]["tokens"] = 512 * 400
    data["curriculum"]["hq_fraction"] = need / (400 * 8)
    data["curriculum"]["tier_weights"] = {"mid": 0.0, "lq": 1.0}
    data["curriculum"]["variants"] = {}
    short = parse_recipe(data)
    predicted = run_predict(short, staged["store"])
    repeated = run_place(short, "end", staged["store"], staged["pack"].fingerprint, predicted.fingerprint, **QUIET).summary
    assert repeated.tiers["hq"].as_json() == {"supply": supply, "slots": need, "repeated": 100, "unplaced": 0}
    assert repeated.repeated_sequences == 100 + repeated.tiers["lq"].repeated
    data["curriculum"]["on_shortage"] = "fail"
    failing = parse_recipe(data)
    with pytest.raises(ValueError, match=f"needs {need:,} hq sequences but the packed data has {supply:,}"):
        run_place(failing, "end", staged["store"], staged["pack"].fingerprint, predicted.fingerprint, **QUIET)


def test_reader_reads_the_same_tokens_from_s3(staged, s3_endpoint):
    local = staged["store"]
    result = place(staged, "uniform")
    remote = Store(f"s3://{BUCKET}/place-copy", s3_endpoint)
    for stage, fp in (("pack", staged["pack"].fingerprint), ("place", result.fingerprint)):
        remote.fs.put(local.output(stage, fp).path, remote.path(stage) + "/", recursive=True)
    expected = expected_inputs(staged, "uniform")
    local_index = SampleIndex(local, result.fingerprint, expected=expected)
    remote_index = SampleIndex(remote, result.fingerprint, expected=expected)
    for step in (0, 13, 47):
        assert np.array_equal(remote_index.batch(step), local_index.batch(step))
        assert np.array_equal(remote_index.tokens(step, 1, 4), local_index.tokens(step, 1, 4))


def run_cli(*args: str, home: Path, store: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TRECFLOW_", "PREFECT_", "MLFLOW_"))}
    env |= {"TRECFLOW_HOME": str(home), "TRECFLOW_STORE": str(store), "PYTHONPATH": str(ROOT)}
    return subprocess.run([str(TRECFLOW), *args], env=env, capture_output=True, text=True, cwd=ROOT)


@pytest.mark.slow
def test_place_command_prints_the_documented_json(staged, tmp_path):
    home = Path(os.environ["TRECFLOW_HOME"])  # where the test corpus is
    result = run_cli("place", str(CONFIGS / "test.yaml"), "--variant", "end", "--json", home=home, store=Path(staged["store"].url))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["steps"] == 48 and summary["sequences"] == 384 and summary["hq_fraction"] == 0.25
    assert summary["window"] == [0.75, 1.0] and summary["hq_in_window"] == 1.0
    assert summary["repeated_sequences"] == 0 and summary["fingerprint"] == place(staged, "end").fingerprint


def test_place_command_refuses_bad_input_before_any_work(tmp_path):
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"narrow": {"strategy": "window", "params": {"window": [0.5, 0.55]}}}
    narrow = tmp_path / "narrow.yaml"
    narrow.write_text(yaml.safe_dump(data))
    store = tmp_path / "store"
    result = run_cli("place", str(narrow), "--variant", "narrow", home=tmp_path / "home", store=store)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: window [0.5, 0.55] holds steps 24..25 = 16 sequences, fewer than the 96 hq sequences of w=0.25; "
        "widen the window or lower hq_fraction"
    )
    data["curriculum"]["variants"] = {"bad": {"strategy": "end", "params": {"window": [0.1, 0.2]}}}
    narrow.write_text(yaml.safe_dump(data))
    result = run_cli("place", str(narrow), "--variant", "bad", home=tmp_path / "home", store=store)
    assert result.returncode == 2 and "curriculum.variants.bad: params: end does not take ['window']" in result.stderr
    del data["tokenizer"], data["curriculum"]["variants"]
    narrow.write_text(yaml.safe_dump(data))
    result = run_cli("place", str(narrow), home=tmp_path / "home", store=store)
    assert result.returncode == 2 and "tokenizer: placement needs corpus, tokenizer sections" in result.stderr
    assert not store.exists()


@pytest.mark.slow
def test_every_demo_sequence_is_placed_the_planned_number_of_times(demo_corpus, tmp_path, monkeypatch):
    cache, _, _, _ = demo_corpus
    data = read_yaml((CONFIGS / "demo.yaml").read_text())
    for source in data["corpus"]["sources"]:
        source["path"] = str(cache / Path(source["path"]).name)
    data["tokenizer"]["train_bpe"]["max_documents"] = 2000  # the tokenizer's quality is not under test
    recipe = parse_recipe(data)
    store = Store(str(tmp_path / "store"))
    scored = run_score(recipe, store, **QUIET)
    tokenizer = run_tokenizer(recipe, store, **QUIET)
    packed = run_pack(recipe, store, scored.fingerprint, tokenizer.fingerprint, **QUIET)
    predicted = run_predict(recipe, store)
    tiers, _ = read_catalog(store, packed.fingerprint)
    for variant in ("uniform", "end", "trec_valley"):
        result = run_place(recipe, variant, store, packed.fingerprint, predicted.fingerprint, **QUIET)
        summary = result.summary
        index = SampleIndex(store, result.fingerprint)
        ids = np.concatenate([index.batch(step) for step in range(index.steps)])
        used, counts = np.unique(ids, return_counts=True)
        assert ids.size == recipe.steps * recipe.sequences_per_step == summary.sequences
        for code, tier in enumerate(("hq", "mid", "lq")):
            entry = summary.tiers[tier]
            in_tier = tiers[used] == code
            # used once each, plus the counted repetitions; the rest of the supply is counted unplaced
            assert counts[in_tier].sum() == entry.slots
            assert counts[in_tier].sum() - in_tier.sum() == entry.repeated
            assert entry.supply - in_tier.sum() == entry.unplaced
            if entry.slots <= entry.supply:
                assert counts[in_tier].max() == 1
        assert summary.hq_fraction == 0.1
        if variant == "trec_valley":
            assert summary.hq_in_window >= 0.95 and summary.window[0] < predicted.summary.valley_fraction <= summary.window[1]
        if variant == "uniform":
            share = np.array([index.composition(step)["hq"] for step in range(index.steps)]) / recipe.sequences_per_step
            assert all(abs(segment.mean() - 0.1) <= 0.02 for segment in np.array_split(share, 10))
