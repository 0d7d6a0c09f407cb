"""Resumable ingest: an attempt that dies keeps the input files its first pass finished (each
file's marker, written after its partition files); the next attempt of the same output reads only
the others and writes the same shards, byte for byte, as an uninterrupted run. Bad input still
leaves nothing behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

import tasks.ingest as ingest_module
from tasks.ingest import INGEST, CorpusOnly, IngestError, marker_name, run_ingest
from trecflow.recipe import CorpusSection
from trecflow.runner import PROGRESS, run_stage
from trecflow.stage import Target
from trecflow.store import MANIFEST, Store

from ..conftest import QUIET


def split_lines(source: Path, folder: Path, parts: int) -> list[Path]:
    """``source``'s JSON lines dealt into ``parts`` files ``part-K.jsonl`` of ``folder``."""
    lines = source.read_text().splitlines(keepends=True)
    folder.mkdir(parents=True)
    paths = []
    for part in range(parts):
        path = folder / f"part-{part}.jsonl"
        path.write_text("".join(lines[part::parts]))
        paths.append(path)
    return paths


def word_documents(source: Path, count: int, seed: int) -> list[str]:
    """``count`` distinct documents of about 1.3 kB, each 200 words drawn from ``source``'s texts."""
    words = sorted({word for line in source.read_text().splitlines() for word in json.loads(line)["text"].split()})
    return [" ".join(random.Random(seed * 1_000_003 + number).sample(words, 200)) for number in range(count)]


@pytest.fixture(scope="module")
def five_files(test_corpus, tmp_path_factory) -> CorpusSection:
    """5 input files: the test corpus's docstrings as 2, and 3 of 2,500 documents of copyright-file
    words (3 MB each, so that with a 1 MB buffer each is written in 3 flushes)."""
    root = tmp_path_factory.mktemp("five-files")
    split_lines(test_corpus["stdlib-docs"], root / "docs", 2)
    (root / "legal").mkdir()
    for part in range(3):
        texts = word_documents(test_corpus["debian-copyright"], 2500, part)
        (root / "legal" / f"part-{part}.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return CorpusSection(sources=[{"name": "docs", "path": str(root / "docs")}, {"name": "legal", "path": str(root / "legal")}],
                         partitions=3, buffer_mb=1, splits={"eval": 0.2, "cpt": 0.8})


def shard_bytes(store: Store, uri: str) -> dict[str, bytes]:
    folder = uri.removeprefix(store.url).strip("/")
    return {path.rsplit("/", 1)[1]: store.fs.cat_file(path) for path in sorted(store.fs.glob(store.path(folder, "shards", "*.parquet")))}


def test_a_rerun_reads_only_the_files_the_dead_attempt_did_not_finish(five_files, tmp_path, monkeypatch):
    expected = run_ingest(five_files, Store(str(tmp_path / "uninterrupted")), **QUIET)
    assert expected.summary.sources["legal"].files == 3 and expected.summary.documents > 0

    store = Store(str(tmp_path / "store"))
    fingerprint = INGEST.fingerprint(Target(CorpusOnly(five_files)), {}, store)
    output = store.output("ingest", fingerprint)
    work = Path(output.path) / "_work"

    # attempt 1 dies after its first pass (as a driver killed there would leave it)
    def died(*args, **kwargs):
        raise RuntimeError("the driver died")

    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "_dedup_pass", died)
        with pytest.raises(RuntimeError, match="the driver died"):
            run_ingest(five_files, store, **QUIET)
    assert not output.exists()
    markers = sorted(path.name for path in (work / "read").iterdir())
    assert markers == [f"{marker_name(s, f)}.json" for s, f in [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2)]]
    marker = json.loads((work / "read" / markers[2]).read_text())
    assert marker["of"].endswith("legal/part-0.jsonl") and marker["result"]["kept"] > 0

    # ... and make it look killed in the middle of the second copyright file (0001-000001): its
    # marker never written, its last flush missing and an earlier flush's file cut short
    killed = marker_name(1, 1)
    (work / "read" / f"{killed}.json").unlink()
    files = sorted(work.glob(f"p*/{killed}-*.parquet"), key=lambda path: path.name)
    flushes = sorted({path.name.split("-")[2] for path in files})
    assert len(flushes) >= 3, flushes  # several flushes, so that "fewer flushes" means something
    for path in files:
        if path.name.split("-")[2] == flushes[-1]:
            path.unlink()
    cut = next(path for path in files if path.exists())
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    kept_files = {path: path.stat().st_mtime_ns for path in work.glob("p*/*.parquet") if not path.name.startswith(killed)}

    # attempt 2: the kept files are not read again (their partition files untouched when pass 2
    # starts), the killed one is, and the result equals the uninterrupted run's
    lines: list[str] = []
    seen_at_pass_two: dict[Path, int] = {}
    read_progress: list[tuple[int, int]] = []

    def watch(event) -> None:
        update = event.progress
        if event.kind == PROGRESS and update is not None:
            if update.unit == "files":
                read_progress.append((update.done, update.total))
            if update.message == "deduplicated" and not seen_at_pass_two:
                seen_at_pass_two.update({path: path.stat().st_mtime_ns for path in kept_files})

    resumed = run_stage(INGEST, Target(CorpusOnly(five_files)), store, progress=lines.append, reporters=[watch])
    assert "ingest: read: 4 of 5 files from an earlier attempt" in lines, lines
    assert read_progress[0] == (4, 5) and read_progress[-1] == (5, 5)
    assert seen_at_pass_two == kept_files  # not rewritten
    assert resumed.summary == expected.summary  # the counts taken from the markers are the same
    assert shard_bytes(store, resumed.uri) == shard_bytes(expected_store := Store(str(tmp_path / "uninterrupted")), expected.uri)
    assert shard_bytes(expected_store, expected.uri)
    assert not work.exists()  # removed once committed


def test_bad_input_still_leaves_nothing_behind(five_files, tmp_path):
    """An IngestError found by the read pass (past the checked head of a file) clears the output:
    no manifest, no markers, nothing a later stage or attempt would read."""
    folder = tmp_path / "docs"
    split_lines(Path(five_files.sources[0].path) / "part-0.jsonl", folder, 2)
    bad = folder / "part-1.jsonl"
    bad.write_text(bad.read_text() * 2 + "{not json\n")  # past the 64 kB head
    corpus = CorpusSection(sources=[{"name": "docs", "path": str(folder)}], partitions=2, splits={"eval": 0.2, "cpt": 0.8})
    store = Store(str(tmp_path / "store"))
    with pytest.raises(IngestError, match=r"part-1.jsonl line \d+: not JSON"):
        run_ingest(corpus, store, **QUIET)
    (output,) = Path(store.path("ingest")).iterdir()
    assert sorted(path.name for path in output.iterdir() if not path.name.startswith("_LEASE-")) == []
    assert not (output / MANIFEST).exists()
