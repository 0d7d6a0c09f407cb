"""Near-duplicate removal in ingest: the MinHash/LSH logic (tasks/near_dedup.py) on constructed
texts, and `run_ingest` end to end (the local Ray) on a planted corpus of standard-library
docstrings: near copies removed, documents that merely share a footer kept, the earliest source's
copy kept, the same result for any partition count."""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import near_dedup
from tasks.ingest import run_ingest
from trecflow.recipe import CorpusSection
from trecflow.store import Store

from ..conftest import ROOT
from ..corpus_builder import stdlib_docstrings, write_jsonl

QUIET = {"progress": lambda line: None}
SHINGLE, BANDS, ROWS = 5, 14, 8  # the recipe's defaults


def shingle_set(text: str, shingle: int = SHINGLE) -> set[int]:
    return set(np.concatenate([np.empty(0, np.uint64), *near_dedup.shingle_hashes(text, shingle)]).tolist())


def true_jaccard(left: str, right: str) -> float:
    a, b = shingle_set(left), shingle_set(right)
    return len(a & b) / len(a | b)


def edited(text: str, share: float, seed: int) -> str:
    """``text`` with ``share`` of its words (at least one) replaced by words of no other text."""
    rng = random.Random(seed)
    tokens = re.split(r"(\s+)", text)  # words at even positions, the whitespace between them kept
    words = [index for index in range(0, len(tokens), 2) if tokens[index]]
    for index in rng.sample(words, max(1, round(share * len(words)))):
        tokens[index] = f"edit{seed}x{index}"
    return "".join(tokens)


@functools.lru_cache(maxsize=None)
def distinct_docstrings(count: int, min_words: int = 150) -> list[str]:
    """Long docstrings (at least 3 paragraphs), no two sharing 10% of their shingles."""
    chosen: list[str] = []
    sets: list[set[int]] = []
    for text in stdlib_docstrings():
        if len(text.split()) < min_words or len([p for p in text.split("\n\n") if p.strip()]) < 3:
            continue
        own = shingle_set(text)
        if all(len(own & other) / len(own | other) < 0.1 for other in sets):
            chosen.append(text)
            sets.append(own)
        if len(chosen) == count:
            return chosen
    raise AssertionError(f"only {len(chosen)} distinct long docstrings")


# --- pure logic -----------------------------------------------------------------------------


def test_normalization_and_shingles():
    assert near_dedup.normalize("  The CAT, sat;\n\ton the\u00a0mat!! ") == "the cat sat on the mat"
    mixed = "Ünïcode «quotes» — and\x1cASCII\x00 control, don't_stop"
    assert near_dedup.normalized_words(mixed) == [w.encode() for w in near_dedup.normalize(mixed).split()]
    assert near_dedup.normalized_words("plain ASCII, text\x1fhere") == [b"plain", b"ascii", b"text", b"here"]
    # punctuation and case do not change the shingles; word order does
    assert shingle_set("One two three four five six") == shingle_set("one, TWO; three four... five six!")
    assert shingle_set("one two three four five six") != shingle_set("two one three four five six")
    assert len(shingle_set("one two three four five six")) == 2
    # fewer words than a shingle: one shingle of them all; no word: no shingle, no signature
    assert len(shingle_set("just three words")) == 1 and shingle_set("just three words") != shingle_set("just three")
    assert shingle_set("!!! ...") == set()
    signer = near_dedup.Signer(BANDS * ROWS, 1, SHINGLE)
    assert signer.signature("?!") is None and signer.signature("a b") is not None
    # values are the same in every process: CRC-32 and fixed mixing, no hash()
    assert near_dedup.combine(np.array([1, 2, 3], dtype=np.uint64), 3).tolist() == near_dedup.combine(
        np.array([1, 2, 3], dtype=np.uint64), 3
    ).tolist()


def test_estimated_jaccard_tracks_true_shingle_jaccard():
    signer = near_dedup.Signer(BANDS * ROWS, 1, SHINGLE)
    texts = distinct_docstrings(6)
    errors = []
    for number, text in enumerate(texts):
        for share in (0.01, 0.04, 0.1, 0.25):
            copy = edited(text, share, seed=number)
            sketch = near_dedup.sketches(np.stack([signer.signature(text), signer.signature(copy)]))
            errors.append(float(near_dedup.estimated_jaccard(sketch[0], sketch[1])) - true_jaccard(text, copy))
    # 112 permutations: a standard error of about 0.045; the byte sketch adds little
    assert max(abs(error) for error in errors) <= 0.15, errors
    assert abs(float(np.mean(errors))) <= 0.04, errors
    unrelated = near_dedup.sketches(np.stack([signer.signature(texts[0]), signer.signature(texts[1])]))
    assert near_dedup.estimated_jaccard(unrelated[0], unrelated[1]) <= 0.05
    # equal texts: identical signatures, band keys and an estimate of 1
    same = np.stack([signer.signature(texts[2]), signer.signature(texts[2])])
    assert (near_dedup.band_keys(same, BANDS, ROWS)[0] == near_dedup.band_keys(same, BANDS, ROWS)[1]).all()
    assert near_dedup.estimated_jaccard(*near_dedup.sketches(same)) == 1.0


def test_long_document_is_signed_in_chunks_with_bounded_memory(monkeypatch):
    # windows do not change the signature: a 200-word window and one window give the same values
    text = " ".join(distinct_docstrings(4))
    signer = near_dedup.Signer(BANDS * ROWS, 1, SHINGLE)
    whole = signer.signature(text)
    monkeypatch.setattr(near_dedup, "TEXT_WINDOW_CHARS", 1000)
    assert (signer.signature(text) == whole).all()
    monkeypatch.undo()

    # a 27 MB single-line document, signed in a fresh process: MinHash never gets more than
    # CHUNK_SHINGLES shingles at a time, and the peak memory grows by far less than splitting the
    # whole text would take (4.6 million words: some 250 MB)
    script = """
import json, random, resource
from datasketch import MinHash
from tasks import near_dedup
rng = random.Random(0)
block = " ".join(f"w{rng.randrange(50_000)}" for _ in range(100_000))
big = " ".join([block] * 46)
sizes = []
original = MinHash.update_batch
MinHash.update_batch = lambda self, values: (sizes.append(len(values)), original(self, values))[1]
signer = near_dedup.Signer(4, 1, 5)  # few permutations: this measures memory, not MinHash
signer.signature("warm up every code path once")
sizes.clear()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
values = signer.signature(big)
growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
print(json.dumps({"chars": len(big), "growth_kib": growth, "max_chunk": max(sizes), "shingles": sum(sizes)}))
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    measured = json.loads(done.stdout)
    assert measured["chars"] > 25 * 1024**2
    assert measured["max_chunk"] <= near_dedup.CHUNK_SHINGLES and measured["shingles"] == 4_600_000 - SHINGLE + 1
    assert measured["growth_kib"] < 64 * 1024, measured


def test_buckets_pick_the_priority_representative_and_verify_similarity():
    signer = near_dedup.Signer(BANDS * ROWS, 1, SHINGLE)
    base, other = distinct_docstrings(2)
    texts = [edited(base, 0.01, 1), base, other, edited(base, 0.01, 2)]
    sketch = near_dedup.sketches(np.stack([signer.signature(text) for text in texts]))
    # one bucket holding all four (as if their band collided), ranks 1, 0, 0, 0
    band, key = np.zeros(4, np.int32), np.full(4, 7, np.uint64)
    rank, doc_id = np.array([1, 0, 0, 0]), np.array(["a", "c", "b", "d"], dtype=object)
    members, representatives = near_dedup.bucket_edges(band, key, rank, doc_id, sketch, 0.7)
    # representative: rank 0 first, then smallest doc_id -> row 2 ("b", the unrelated text): no
    # member is similar to it, so a bucket dominated by an unrelated representative gives nothing
    assert members.size == 0
    rank = np.array([1, 0, 1, 0])
    members, representatives = near_dedup.bucket_edges(band, key, rank, doc_id, sketch, 0.7)
    # "c" (rank 0, before "d") represents; the edited copies "a" (rank 1) and "d" are similar, "b" is not
    assert sorted(zip(members.tolist(), representatives.tolist())) == [(0, 1), (3, 1)]
    doc_id = np.array(["a", "c", "z", "d"], dtype=object)
    rank = np.array([0, 0, 1, 1])
    members, representatives = near_dedup.bucket_edges(band, key, rank, doc_id, sketch, 0.7)
    assert sorted(zip(members.tolist(), representatives.tolist())) == [(1, 0), (3, 0)]
    # other bands and keys are other buckets
    members, _ = near_dedup.bucket_edges(np.array([0, 1, 0, 0]), np.array([1, 1, 2, 3], np.uint64), rank, doc_id, sketch, 0.7)
    assert members.size == 0


def test_clusters_keep_the_priority_member_and_are_transitive():
    # chain c-b, b-a (a and c never compared) and a separate pair e-d; ranks: a 1, b 0, c 0, d 2, e 1
    left = np.array(["c", "b", "e"], dtype=object)
    right = np.array(["b", "a", "d"], dtype=object)
    left_rank, right_rank = np.array([0, 0, 1]), np.array([0, 1, 2])
    removed, ranks = near_dedup.removed_documents(left, left_rank, right, right_rank)
    assert removed.tolist() == ["a", "c", "d"] and ranks.tolist() == [1, 0, 2]  # keeps b (rank 0, before c) and e (rank 1)
    # the edge order and direction do not matter
    again, _ = near_dedup.removed_documents(right[::-1], right_rank[::-1], left[::-1], left_rank[::-1])
    assert again.tolist() == removed.tolist()
    assert near_dedup.removed_documents(left[:0], left_rank[:0], right[:0], right_rank[:0])[0].size == 0


# --- end to end through run_ingest ----------------------------------------------------------

FOOTER = (
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this software and "
    "associated documentation files, to deal in the Software without restriction, including without "
    "limitation the rights to use, copy, modify, merge, publish, distribute, sublicense, and/or sell "
    "copies of the Software, subject to the conditions above."
)


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Two sources of docstrings with planted near-duplicates; the expected removals per source.

    The planted pairs have a true shingle Jaccard of 0.9 (1% of the words changed) or more (a
    header line, paragraphs rotated): the default 14 bands x 8 rows make them candidates with
    probability >= 0.9996 each. (At 2% changed, J ~ 0.8, that is ~0.93; at 3%, J ~ 0.74, ~0.7.)"""
    folder = tmp_path_factory.mktemp("planted")
    base = distinct_docstrings(14)
    b, footed, mirror_own = base[:6], base[6:12], base[12]

    def reordered(text: str) -> str:
        paragraphs = text.split("\n\n")
        return "\n\n".join(paragraphs[1:] + paragraphs[:1])

    def new_header(text: str, header: str) -> str:
        return f"{header}\n{text}"

    docs = [
        b[0],
        b[1],
        b[2],
        b[4],
        new_header(b[4], "Archived from docs.python.org on 2024-01-01"),  # same source: the smaller doc_id is kept
        edited(b[3], 0.01, 3),  # the earliest source has the edited copy: it is kept, mirror's original removed
        *(f"{text}\n\n{FOOTER}" for text in footed),  # distinct documents with the same footer: all kept
    ]
    mirror = [
        edited(b[0], 0.01, 10),
        edited(b[0], 0.01, 11),  # a second copy of b[0] (a cluster of three)
        reordered(b[1]),
        new_header(b[2], "Mirrored by ftp.example.org, retrieved 2023-06-30"),
        b[3],
        b[5],
        mirror_own,
        new_header(mirror_own, "Mirrored by ftp.example.org, retrieved 2023-06-30"),
        b[1],  # an exact duplicate: dropped as such, not as a near-duplicate
    ]
    write_jsonl(folder / "docs.jsonl", docs)
    write_jsonl(folder / "mirror.jsonl", mirror)
    unique = {doc_id(text): text for text in docs + mirror}
    same_source_pairs = [(docs[3], docs[4]), (mirror[6], mirror[7])]
    removed = {doc_id(text) for text in mirror[:5]} | {max(doc_id(a), doc_id(c)) for a, c in same_source_pairs}
    removed_per_source = {"docs": 1, "mirror": 6}
    return {
        "folder": folder,
        "unique": unique,
        "removed": removed,
        "removed_per_source": removed_per_source,
        "kept": set(unique) - removed,
        "footed": {doc_id(text) for text in docs[6:]},
        "pairs": [(docs[0], mirror[0]), (docs[0], mirror[1]), (docs[1], mirror[2]), (docs[2], mirror[3]), (docs[5], mirror[4]), *same_source_pairs],
    }


RUNS: dict = {}


def ingest_planted(planted, tmp_path_factory, partitions: int, enabled: bool = True, force: bool = False):
    """run_ingest of the planted corpus into a store per (partitions, enabled); cached per module."""
    key = (partitions, enabled)
    if key not in RUNS or force:
        if key not in RUNS:
            RUNS[key] = {"store": Store(str(tmp_path_factory.mktemp(f"store-{partitions}-{enabled}")))}
        corpus = CorpusSection(
            sources=[
                {"name": "docs", "path": str(planted["folder"] / "docs.jsonl")},
                {"name": "mirror", "path": str(planted["folder"] / "mirror.jsonl")},
            ],
            partitions=partitions,
            splits={"eval": 0.2, "base": 0.2, "cpt": 0.6},
            near_duplicates={"enabled": enabled},
        )
        RUNS[key]["result"] = run_ingest(corpus, RUNS[key]["store"], force=force, **QUIET)
    store, result = RUNS[key]["store"], RUNS[key]["result"]
    output = store.output("ingest", result.fingerprint)
    table = pa.concat_tables(pq.read_table(output.file_path(name)) for name in result.summary.shards)
    return result, table.sort_by("doc_id")


def test_planted_near_duplicates_are_removed_and_the_earliest_copy_kept(planted, tmp_path_factory):
    result, table = ingest_planted(planted, tmp_path_factory, partitions=3)
    summary = result.summary
    kept = table["doc_id"].to_pylist()
    assert set(kept) == planted["kept"] and len(kept) == len(set(kept))
    assert planted["footed"] <= set(kept)  # sharing a footer does not make documents near-duplicates
    assert {name: entry.dropped_near_duplicate for name, entry in summary.sources.items()} == planted["removed_per_source"]
    assert summary.dropped.as_json() == {"empty": 0, "duplicate": 1, "near_duplicate": 7}
    assert summary.sources["mirror"].dropped_duplicate == 1
    assert summary.documents == len(planted["unique"]) - 7 == sum(entry.documents for entry in summary.sources.values())
    # every mirror copy of a docs document is gone; the documents kept are the docs versions
    by_id = dict(zip(kept, table["source"].to_pylist()))
    for first, second in planted["pairs"][:5]:
        assert by_id[doc_id(first)] == "docs" and doc_id(second) not in by_id
    store = RUNS[(3, True)]["store"]
    assert not store.fs.exists(store.output("ingest", result.fingerprint).file_path("_work"))


def test_the_same_documents_for_any_partition_count_and_run(planted, tmp_path_factory):
    _, three = ingest_planted(planted, tmp_path_factory, partitions=3)
    rerun, again = ingest_planted(planted, tmp_path_factory, partitions=3, force=True)
    assert not rerun.reused and again.equals(three)
    for partitions in (1, 8):
        result, table = ingest_planted(planted, tmp_path_factory, partitions=partitions)
        assert table.select(["doc_id", "source", "text", "split"]).equals(three.select(["doc_id", "source", "text", "split"]))
        assert {name: entry.dropped_near_duplicate for name, entry in result.summary.sources.items()} == planted["removed_per_source"]


def test_disabled_near_duplicates_removes_none(planted, tmp_path_factory):
    result, table = ingest_planted(planted, tmp_path_factory, partitions=3, enabled=False)
    assert set(table["doc_id"].to_pylist()) == set(planted["unique"])
    assert result.summary.dropped.as_json() == {"empty": 0, "duplicate": 1, "near_duplicate": 0}
    assert all(entry.dropped_near_duplicate == 0 for entry in result.summary.sources.values())
    enabled, _ = ingest_planted(planted, tmp_path_factory, partitions=3)
    assert result.fingerprint != enabled.fingerprint  # the settings are part of the fingerprint
