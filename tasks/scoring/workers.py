"""The scoring workers: what runs inside Ray Data's actor pool (no Prefect imported here).

`BatchScorer` loads the classifier once per actor. Ray Data hands it ingest shard paths; it reads
each shard ``scoring.batch_size`` rows at a time, drops the ``classifier`` split, adds every rule
value, each scorer's score, the combined score and the tier, writes the batch to
``<output>/shards/part-<first doc_id>-<rows>.parquet`` (a deterministic name, so a retried shard
overwrites its own files), and returns partial statistics: one row per (source, split, tier) with
a count, a score sum and a histogram. One pass over the data does both, and an actor's memory is
bounded by the batch size, whatever the corpus size.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.scoring.classifier import QualityClassifier
from tasks.scoring.rules import rule_table, rules_score
from trecflow.recipe import ScoringSection
from trecflow.store import Store

HISTOGRAM_BINS = 50
CLASSIFIER_WEIGHTS = "classifier/weights.npz"
CLASSIFIER_META = "classifier/classifier.json"
PARTIAL_SCHEMA = pa.schema(
    [
        ("source", pa.string()),
        ("split", pa.string()),
        ("tier", pa.string()),
        ("count", pa.int64()),
        ("score_sum", pa.float64()),
        ("histogram", pa.list_(pa.int64())),
        ("file", pa.string()),
    ]
)


def tier_of(scores: np.ndarray, hq_min: float, lq_max: float) -> np.ndarray:
    """``hq`` at or above hq_min, ``lq`` below lq_max, else ``mid``."""
    return np.where(scores >= hq_min, "hq", np.where(scores < lq_max, "lq", "mid"))


def partial_statistics(table: pa.Table, file: str) -> pa.Table:
    """One row per (source, split, tier) of a scored batch: count, score sum, score histogram."""
    scores = table["score"].to_numpy()
    bins = np.minimum((scores * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
    rows: dict[tuple[str, str, str], list] = {}
    keys = zip(table["source"].to_pylist(), table["split"].to_pylist(), table["tier"].to_pylist())
    for key, score, bucket in zip(keys, scores.tolist(), bins.tolist()):
        entry = rows.setdefault(key, [0, 0.0, [0] * HISTOGRAM_BINS])
        entry[0] += 1
        entry[1] += score
        entry[2][bucket] += 1
    return pa.table(
        {
            "source": [key[0] for key in rows],
            "split": [key[1] for key in rows],
            "tier": [key[2] for key in rows],
            "count": [value[0] for value in rows.values()],
            "score_sum": [value[1] for value in rows.values()],
            "histogram": [value[2] for value in rows.values()],
            "file": [file] * len(rows),
        },
        schema=PARTIAL_SCHEMA,
    )


class BatchScorer:
    """A Ray Data actor: scores, tiers and writes batches; returns their partial statistics."""

    def __init__(
        self,
        scoring: dict,
        store_url: str,
        endpoint_url: str | None,
        output_path: str | None,
        classifier_path: str | None,
        thresholds: tuple[float, float],
    ):
        self.scoring = ScoringSection.model_validate(scoring)
        self.thresholds = thresholds
        self.store = Store(store_url, endpoint_url)
        self.output_path = output_path
        self.classifier = None
        if classifier_path is not None:
            fs = self.store.fs
            self.classifier = QualityClassifier.from_bytes(
                fs.cat_file(f"{classifier_path}/{CLASSIFIER_WEIGHTS}"), fs.cat_file(f"{classifier_path}/{CLASSIFIER_META}")
            )

    def scores(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Rule values, per-scorer scores and the combined score (weighted mean, in [0, 1])."""
        columns = rule_table(texts)
        parts = {"rules": rules_score(columns, self.scoring.rules)}
        if self.classifier is not None:
            parts["classifier"] = self.classifier.probability(texts)
        total = sum(self.scoring.weights[name] for name in self.scoring.scorers)
        combined = sum(self.scoring.weights[name] * parts[name] for name in self.scoring.scorers) / total
        columns["score_rules"] = parts["rules"]
        columns["score_classifier"] = parts.get("classifier", np.full(len(texts), np.nan))
        columns["score"] = np.clip(combined, 0.0, 1.0)
        return columns

    def score_table(self, table: pa.Table) -> pa.Table:
        """The batch without the classifier split, with score columns and the tier."""
        table = table.filter(pc.not_equal(table["split"], "classifier"))
        columns = self.scores(table["text"].to_pylist())
        for name, values in columns.items():
            table = table.append_column(name, pa.array(values, type=pa.float64()))
        tiers = tier_of(columns["score"], *self.thresholds)
        return table.append_column("tier", pa.array(tiers.tolist(), type=pa.string()))

    def score_shard(self, path: str) -> pa.Table:
        """Score one ingest shard, ``batch_size`` rows at a time; write each scored batch and
        return the partial statistics of all of them. Memory is bounded by the batch size."""
        partials = [PARTIAL_SCHEMA.empty_table()]
        self.store.fs.makedirs(f"{self.output_path}/shards", exist_ok=True)
        with self.store.fs.open(path, "rb") as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=self.scoring.batch_size):
                table = self.score_table(pa.Table.from_batches([batch]))
                if table.num_rows == 0:
                    continue
                name = f"shards/part-{table['doc_id'][0].as_py()[:16]}-{table.num_rows:06d}.parquet"
                with self.store.fs.open(f"{self.output_path}/{name}", "wb") as out:
                    pq.write_table(table, out, compression="zstd")
                partials.append(partial_statistics(table, name))
        return pa.concat_tables(partials)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """A Ray Data batch of ingest shard paths (column ``path``) -> their partial statistics."""
        return pa.concat_tables([self.score_shard(path) for path in batch["path"].to_pylist()])
