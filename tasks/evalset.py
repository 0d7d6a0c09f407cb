"""The held-out set: the ``eval`` split's documents packed per source, for the final model's
held-out losses (``val_loss_hq``, ``val_loss_general`` and per source).

Documents of each (source, tier) are concatenated with end-of-text after each and cut into
sequences of ``data.seq_len`` tokens, up to ``reevaluation.eval_tokens_per_source`` tokens per
source (documents in shard order, which is a hash order: a fair sample); the rest of a source is
counted as unused, never read into memory. Output ``<store>/evalset/<fingerprint>/``:
``tokens.npy`` (sequences x seq_len), ``sequences.parquet`` (source, tier of each row),
``summary.json``, manifest last.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.tokenizer import load_tokenizer
from trecflow.fingerprint import fingerprint
from trecflow.progress import as_progress
from trecflow.recipe import Recipe, RecipeError
from trecflow.stage import Stage, StageContext, StageResult, Summary, Target
from trecflow.store import StageOutput, Store
from training.sample_index import npy_bytes, read_npy

STAGE = "evalset"
STAGE_VERSION = 2  # 2: the summary is summary.json (was stats.json)
READ_ROWS = 1024


def evalset_fingerprint(recipe: Recipe, score_fp: str, tokenizer_fp: str) -> str:
    config = {"seq_len": recipe.data.seq_len, "tokens_per_source": recipe.reevaluation.eval_tokens_per_source}
    return fingerprint(STAGE, STAGE_VERSION, config, {"score": score_fp, "tokenizer": tokenizer_fp})


@dataclass(frozen=True)
class EvalDocuments(Summary):
    """Eval-split documents packed (used) and left out beyond the per-source budget (unused)."""

    used: int
    unused: int


@dataclass(frozen=True)
class EvalsetSummary(Summary):
    """The held-out set: whole sequences, tokens taken per source (up to the budget), documents
    used and left out, and the tail tokens that made no whole sequence."""

    sequences: int
    tokens_per_source: Mapping[str, int]
    documents: EvalDocuments
    tail_tokens_dropped: int


@dataclass(frozen=True)
class EvalSet:
    fingerprint: str
    tokens: np.ndarray  # (sequences, seq_len)
    sources: list[str]
    tiers: list[str]
    stats: EvalsetSummary


class EvalSetStage(
    Stage[EvalsetSummary], name=STAGE, version=STAGE_VERSION, inputs=("score", "tokenizer"), sections=("corpus", "tokenizer", "base"),
    title="Held-out set", task_name="build_evalset", summary_type=EvalsetSummary
):
    """The held-out set: the ``eval`` split packed per source and tier, up to a token budget per source."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return evalset_fingerprint(target.recipe, upstream["score"].fingerprint, upstream["tokenizer"].fingerprint)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> EvalsetSummary:
        return _pack(target.recipe, context.store, output, upstream["score"].fingerprint, upstream["tokenizer"].fingerprint, context.progress)

    def counts(self, summary: EvalsetSummary) -> dict[str, Any]:
        return {"sequences": summary.sequences}

    def rows(self, summary: EvalsetSummary) -> list[tuple[str, str]]:
        return [("held-out sequences", f"{summary.sequences:,} from {len(summary.tokens_per_source)} sources")]


EVALSET = EvalSetStage()


def load_evalset(store: Store, result: StageResult[EvalsetSummary]) -> EvalSet:
    """The committed held-out set of ``result`` in memory (it is small: a budget per source)."""
    output = store.output(STAGE, result.fingerprint)
    table = pq.read_table(io.BytesIO(output.read_bytes("sequences.parquet")))
    return EvalSet(result.fingerprint, read_npy(output, "tokens.npy"), table["source"].to_pylist(), table["tier"].to_pylist(), result.summary)


def build_evalset(recipe: Recipe, store: Store, score_fp: str, tokenizer_fp: str, progress: Callable[[str], None] = print) -> EvalSet:
    """Pack (or reuse) the held-out set alone; RecipeError when the eval split has no whole sequence."""
    from trecflow.runner import run_stage

    return load_evalset(store, run_stage(EVALSET, Target(recipe), store, {"score": score_fp, "tokenizer": tokenizer_fp}, progress=progress))


def _pack(recipe: Recipe, store: Store, output: StageOutput, score_fp: str, tokenizer_fp: str, progress: Callable[[str], None]) -> EvalsetSummary:
    seq_len = recipe.data.seq_len
    budget = recipe.reevaluation.eval_tokens_per_source
    tokenizer = load_tokenizer(store, tokenizer_fp)
    eos = json.loads(store.output("tokenizer", tokenizer_fp).read_bytes("tokenizer_info.json"))["eos_id"]
    score_output = store.output("score", score_fp)
    shards = sorted(name for name in score_output.manifest()["files"] if name.startswith("shards/"))
    streams: dict[tuple[str, str], list[np.ndarray]] = {}
    used: dict[str, int] = {}
    documents = {"used": 0, "unused": 0}
    progress = as_progress(progress, "evalset")
    progress.advance(0, len(shards), "shards", "read")
    for done, name in enumerate(shards, 1):
        with store.fs.open(score_output.file_path(name), "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=READ_ROWS, columns=["text", "split", "source", "tier"]):
                table = pa.Table.from_batches([batch])
                table = table.filter(pc.equal(table["split"], "eval"))
                if table.num_rows == 0:
                    continue
                sources, tiers = table["source"].to_pylist(), table["tier"].to_pylist()
                wanted = [i for i, source in enumerate(sources) if used.get(source, 0) < budget]
                documents["unused"] += table.num_rows - len(wanted)
                texts = table["text"].to_pylist()
                for row, encoding in zip(wanted, tokenizer.encode_batch([texts[i] for i in wanted], add_special_tokens=False)):
                    source = sources[row]
                    if used.get(source, 0) >= budget:
                        documents["unused"] += 1
                        continue
                    ids = np.asarray(encoding.ids + [eos], dtype=np.int64)
                    streams.setdefault((source, tiers[row]), []).append(ids)
                    used[source] = used.get(source, 0) + ids.size
                    documents["used"] += 1
        progress.advance(done, len(shards), "shards", "read")
    blocks, rows_source, rows_tier = [], [], []
    dropped = 0
    for (source, tier), parts in sorted(streams.items()):
        stream = np.concatenate(parts)
        count = stream.size // seq_len
        dropped += stream.size - count * seq_len
        if count:
            blocks.append(stream[: count * seq_len].reshape(count, seq_len))
            rows_source += [source] * count
            rows_tier += [tier] * count
    if not blocks:
        raise RecipeError(f"corpus.splits.eval: the eval split holds no whole sequence of {seq_len} tokens; held-out losses need one")
    tokens = np.concatenate(blocks).astype(np.uint32)
    buffer = io.BytesIO()
    pq.write_table(pa.table({"source": rows_source, "tier": rows_tier}), buffer)
    output.write_bytes("tokens.npy", npy_bytes(tokens))
    output.write_bytes("sequences.parquet", buffer.getvalue())
    stats = EvalsetSummary(sequences=len(rows_source), tokens_per_source=used, documents=documents, tail_tokens_dropped=int(dropped))
    progress(f"evalset: {len(rows_source):,} held-out sequences from {len(used)} sources ({documents['used']:,} documents; "
             f"{documents['unused']:,} beyond the per-source budget left out)")
    return stats
