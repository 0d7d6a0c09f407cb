"""Stage 3b, packing: one split's documents -> fixed-length token sequences, per tier.

The curriculum packs the ``cpt`` split; a tiny base model is pretrained on the ``base`` split,
packed the same way.

The scored shards are cut into groups of about ``packing.group_mb`` of parquet; one Ray task per
group reads its shards in batches, tokenizes the ``cpt`` documents (the Rust tokenizer, batched),
and, separately for each tier, concatenates them with the end-of-text separator after every
document and cuts the stream into sequences of ``data.seq_len`` tokens. So every sequence has one
tier; its score is the token-weighted mean of its documents' scores (the separator counts for the
document it ends). A group's last partial sequence of each tier is dropped and counted
(``tail_tokens_dropped``): less than one sequence per tier and group.

Sequence ids are assigned after all groups finish, in group order and then tier order, so the same
inputs give the same ids whatever order the tasks finished in. Memory per task is bounded by the
group's tokens (2 or 4 bytes each), never by the corpus. The layout is in
`training.sample_index` (the reader); output ``<store>/pack/<fingerprint>/``, manifest last.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from trecflow.fingerprint import fingerprint
from trecflow.progress import Progress, as_progress
from trecflow.recipe import Recipe
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store
from training.sample_index import PACK_STAGE, SCORES_FILE, TIERS, TIERS_FILE, TOKEN_FILES, npy_bytes, read_npy

STAGE = PACK_STAGE
STAGE_VERSION = 2  # 2: the summary is summary.json (was stats.json)
READ_ROWS = 1024  # documents tokenized per batch inside a task


@dataclass(frozen=True)
class PackedTier(Summary):
    """One tier's packing counts: documents and tokens read, whole sequences cut, tail tokens dropped."""

    documents: int
    tokens: int
    sequences: int
    tail_tokens_dropped: int


@dataclass(frozen=True)
class PackSummary(Summary):
    """One split packed into sequences of ``seq_len`` tokens: totals, and counts per tier (hq, mid, lq, in that order)."""

    split: str
    seq_len: int
    token_dtype: str
    groups: int
    files: int
    sequences: int
    tail_tokens_dropped: int
    tiers: Mapping[str, PackedTier]


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def pack_fingerprint(recipe: Recipe, score_fp: str, tokenizer_fp: str, split: str = "cpt") -> str:
    config = {"seq_len": recipe.data.seq_len, "group_mb": recipe.packing.group_mb, "split": split}
    return fingerprint(STAGE, STAGE_VERSION, config, {"score": score_fp, "tokenizer": tokenizer_fp})


def group_shards(files: list[tuple[str, int]], group_bytes: int) -> list[list[str]]:
    """Consecutive shards in groups of at most ``group_bytes`` (a larger shard is a group alone)."""
    groups: list[list[str]] = []
    size = 0
    for name, nbytes in files:
        if not groups or size + nbytes > group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def sequence_scores(lengths: np.ndarray, scores: np.ndarray, seq_len: int, sequences: int) -> np.ndarray:
    """Token-weighted mean document score of each packed sequence.

    ``lengths`` are the documents' token counts (separator included) in stream order. The score
    mass up to position x is piecewise linear between document boundaries, so each sequence's
    mass is a difference of two interpolations: no loop over tokens or documents.
    """
    boundaries = np.concatenate(([0], np.cumsum(lengths, dtype=np.int64)))
    mass = np.concatenate(([0.0], np.cumsum(lengths * scores, dtype=np.float64)))
    edges = np.arange(sequences + 1, dtype=np.int64) * seq_len
    return (np.diff(np.interp(edges, boundaries, mass)) / seq_len).astype(np.float32)


def pack_group(
    group: int,
    shard_paths: list[str],
    store_url: str,
    endpoint_url: str | None,
    output_path: str,
    tokenizer_json: str,
    eos_id: int,
    seq_len: int,
    dtype: str,
    split: str = "cpt",
) -> dict[str, Any]:
    """Pack one group of scored shards; write ``tokens/g<group>-<tier>.npy`` per non-empty tier.

    Returns per tier: the file name (or None), the sequence scores, and the counts of documents,
    tokens and dropped tail tokens."""
    from tokenizers import Tokenizer

    store = Store(store_url, endpoint_url)
    tokenizer = Tokenizer.from_str(tokenizer_json)
    streams: dict[str, list[np.ndarray]] = {tier: [] for tier in TIERS}
    lengths: dict[str, list[np.ndarray]] = {tier: [] for tier in TIERS}
    doc_scores: dict[str, list[np.ndarray]] = {tier: [] for tier in TIERS}
    separator = np.array([eos_id], dtype=dtype)
    for path in shard_paths:
        with store.fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_ROWS, columns=["text", "split", "score", "tier"]):
                table = pa.Table.from_batches([batch])
                table = table.filter(pc.equal(table["split"], split))
                if table.num_rows == 0:
                    continue
                encodings = tokenizer.encode_batch(table["text"].to_pylist(), add_special_tokens=False)
                tiers = np.asarray(table["tier"].to_pylist())
                scores = table["score"].to_numpy()
                for tier in TIERS:
                    rows = np.flatnonzero(tiers == tier)
                    for row in rows:
                        streams[tier].append(np.asarray(encodings[row].ids, dtype=dtype))
                        streams[tier].append(separator)
                    lengths[tier].append(np.array([len(encodings[row].ids) + 1 for row in rows], dtype=np.int64))
                    doc_scores[tier].append(scores[rows])
    result: dict[str, Any] = {"group": group, "tiers": {}}
    for tier in TIERS:
        tokens = np.concatenate(streams[tier]) if streams[tier] else np.empty(0, dtype=dtype)
        streams[tier] = []
        count = tokens.size // seq_len
        name = None
        if count:
            name = f"tokens/g{group:06d}-{tier}.npy"
            store.fs.makedirs(f"{output_path}/tokens", exist_ok=True)
            with store.fs.open(f"{output_path}/{name}", "wb") as out:
                np.lib.format.write_array(out, tokens[: count * seq_len].reshape(count, seq_len))
        tier_lengths = np.concatenate(lengths[tier]) if lengths[tier] else np.empty(0, dtype=np.int64)
        tier_scores = np.concatenate(doc_scores[tier]) if doc_scores[tier] else np.empty(0)
        result["tiers"][tier] = {
            "file": name,
            "scores": sequence_scores(tier_lengths, tier_scores, seq_len, count),
            "documents": int(tier_lengths.size),
            "tokens": int(tokens.size),
            "tail_tokens_dropped": int(tokens.size - count * seq_len),
        }
    return result


class PackStage(
    Stage[PackSummary], name=STAGE, version=STAGE_VERSION, inputs=("score", "tokenizer"), sections=("corpus", "tokenizer"),
    title="Packed sequences", task_name="pack_sequences", ray=True, summary_type=PackSummary
):
    """Stage 3b: tokenize the target's split of the scored documents and pack them into
    fixed-length sequences, grouped by tier, with a per-sequence score and tier catalog."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return pack_fingerprint(target.recipe, upstream["score"].fingerprint, upstream["tokenizer"].fingerprint, target.split)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> PackSummary:
        return pack(target.recipe, context.store, upstream["score"].fingerprint, upstream["tokenizer"].fingerprint, output, context.progress, target.split)

    def counts(self, summary: PackSummary) -> dict[str, Any]:
        return {"seq_len": summary.seq_len, "sequences": summary.sequences, "tail_tokens_dropped": summary.tail_tokens_dropped}

    def rows(self, summary: PackSummary) -> list[tuple[str, str]]:
        return [("sequences", f"{summary.sequences:,} of {summary.seq_len} tokens ({summary.split} split): "
                              + ", ".join(f"{entry.sequences:,} {tier}" for tier, entry in summary.tiers.items())),
                ("tail tokens dropped", f"{summary.tail_tokens_dropped:,}")]

    def metrics(self, summary: PackSummary) -> dict[str, float]:
        metrics = {"packed_sequences": summary.sequences, "pack_tail_tokens_dropped": summary.tail_tokens_dropped}
        return metrics | {f"packed_sequences.{tier}": entry.sequences for tier, entry in summary.tiers.items()}


PACK = PackStage()


def run_pack(
    recipe: Recipe, store: Store, score_fp: str, tokenizer_fp: str, force: bool = False, progress=print, split: str = "cpt"
) -> StageResult[PackSummary]:
    """Pack one split alone, from the committed score and tokenizer outputs ``score_fp`` and ``tokenizer_fp``."""
    from trecflow.runner import run_stage

    return run_stage(PACK, Target(recipe, split=split), store, {"score": score_fp, "tokenizer": tokenizer_fp}, force=force, progress=progress)


def pack(recipe: Recipe, store: Store, score_fp: str, tokenizer_fp: str, output: StageOutput, progress, split: str) -> PackSummary:
    """Pack the scored documents of ``split`` with the tokenizer into ``output`` on Ray tasks."""
    import ray

    from trecflow.ray_runtime import ensure_ray

    score_output = store.output("score", score_fp)
    tokenizer_output = store.output("tokenizer", tokenizer_fp)
    tokenizer_info = json.loads(tokenizer_output.read_bytes("tokenizer_info.json"))
    tokenizer_json = tokenizer_output.read_bytes("tokenizer.json").decode()
    shard_files = [(name, entry["bytes"]) for name, entry in score_output.manifest()["files"].items() if name.startswith("shards/")]
    groups = group_shards(shard_files, recipe.packing.group_mb * 1024**2)
    dtype = token_dtype(tokenizer_info["vocab_size"]).name
    progress = as_progress(progress, "pack")
    progress(f"pack: the {split} split of {len(shard_files)} scored shards, in {len(groups)} groups -> sequences of {recipe.data.seq_len} tokens")
    ensure_ray()
    progress.advance(0, len(groups), "groups", "packed")
    remote = ray.remote(pack_group).options(max_retries=2, retry_exceptions=[OSError])
    try:
        pending: list = []
        results: dict[int, dict] = {}
        for number, names in enumerate(groups):
            if len(pending) >= recipe.packing.workers:
                done, pending = ray.wait(pending, num_returns=1)
                _collect(ray.get(done[0]), results, len(groups), progress)
            paths = [score_output.file_path(name) for name in names]
            pending.append(
                remote.remote(number, paths, store.url, store.endpoint_url, output.path, tokenizer_json, tokenizer_info["eos_id"], recipe.data.seq_len, dtype, split)
            )
        for ref in pending:
            _collect(ray.get(ref), results, len(groups), progress)
        stats = _write_catalog(recipe, output, results, dtype, split)
    except BaseException:
        output.invalidate()
        raise
    progress(f"pack: {stats.sequences:,} sequences ({stats.tiers['hq'].sequences:,} hq, {stats.tiers['mid'].sequences:,} mid, "
             f"{stats.tiers['lq'].sequences:,} lq); {stats.tail_tokens_dropped:,} tail tokens dropped")
    return stats


def _collect(result: dict, results: dict, total: int, progress: Progress) -> None:
    results[result["group"]] = result
    progress.advance(len(results), total, "groups", "packed")


def _write_catalog(recipe: Recipe, output, results: dict[int, dict], dtype: str, split: str) -> PackSummary:
    """Assign global ids (group order, then tier order); write the token-file table and the
    per-sequence scores and tiers; return the statistics."""
    files, tiers, first_ids, counts, scores, tier_codes = [], [], [], [], [], []
    totals = {tier: {"documents": 0, "tokens": 0, "sequences": 0, "tail_tokens_dropped": 0} for tier in TIERS}
    next_id = 0
    for group in sorted(results):
        for code, tier in enumerate(TIERS):
            entry = results[group]["tiers"][tier]
            count = int(entry["scores"].size)
            for key in ("documents", "tokens", "tail_tokens_dropped"):
                totals[tier][key] += entry[key]
            totals[tier]["sequences"] += count
            if count == 0:
                continue
            output.record_file(entry["file"])
            files.append(entry["file"])
            tiers.append(tier)
            first_ids.append(next_id)
            counts.append(count)
            scores.append(entry["scores"])
            tier_codes.append(np.full(count, code, dtype=np.int8))
            next_id += count
    table = pa.table(
        {"file": files, "tier": tiers, "first_id": pa.array(first_ids, pa.int64()), "count": pa.array(counts, pa.int64())}
    )
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    output.write_bytes(TOKEN_FILES, buffer.getvalue())
    output.write_bytes(SCORES_FILE, npy_bytes(np.concatenate(scores) if scores else np.empty(0, np.float32)))
    output.write_bytes(TIERS_FILE, npy_bytes(np.concatenate(tier_codes) if tier_codes else np.empty(0, np.int8)))
    return PackSummary(
        split=split,
        seq_len=recipe.data.seq_len,
        token_dtype=dtype,
        groups=len(results),
        files=len(files),
        sequences=next_id,
        tail_tokens_dropped=sum(entry["tail_tokens_dropped"] for entry in totals.values()),
        tiers=totals,
    )


def read_catalog(store: Store, fp: str) -> tuple[np.ndarray, np.ndarray]:
    """(tiers int8, scores float32) of every packed sequence, indexed by sequence id."""
    output = store.output(STAGE, fp)
    tiers = read_npy(output, TIERS_FILE)
    scores = read_npy(output, SCORES_FILE)
    return tiers, scores
