"""The scoring workers: what runs inside the Ray actors of stage 1's scoring pass (no Prefect here).

`BatchScorer` loads its models once per actor (the classifier from the stage output, the language
model of lid.176, the perplexity model when configured). For each ingest shard it reads
``scoring.batch_size`` rows at a time, drops the ``classifier`` split (counted, never scored), then
filters by language, computes the rule values, each scorer's score and the combined score, drops
documents below ``rules.drop_below``, tiers the rest, writes them to
``<output>/shards/part-<first doc_id>-<rows>.parquet`` (a deterministic name, so a retried shard
overwrites its own files) and returns partial statistics (`ShardStatistics`): counts and score
sums per (source, split, status, tier), score histograms and detected languages per source. One
pass over the data does both; an actor's memory is bounded by the batch size, whatever the corpus.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.scoring.rules import rule_table, rules_score
from trecflow.recipe import ScoringSection
from trecflow.store import Store

HISTOGRAM_BINS = 50
KEPT = "kept"
DROPPED_LANGUAGE = "language"
DROPPED_RULES = "rules"


def tier_of(scores: np.ndarray, hq_min: float, lq_max: float) -> np.ndarray:
    """``hq`` at or above hq_min, ``lq`` below lq_max, else ``mid``."""
    return np.where(scores >= hq_min, "hq", np.where(scores < lq_max, "lq", "mid"))


@dataclass
class ShardStatistics:
    """What scoring returns to the driver: grouped counts as plain dicts (small, and cheap to send:
    pickling Arrow tables cost 3-4 ms per Ray call, 5% of a shard's scoring). Add shards' with `update`."""

    files: list[str] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # (source, split, status, tier or None) -> documents
    score_sums: Counter = field(default_factory=Counter)  # (source, split, status, tier) of kept documents -> sum of scores
    histograms: Counter = field(default_factory=Counter)  # (source, score bin) -> kept documents
    languages: Counter = field(default_factory=Counter)  # (source, detected language) -> documents, before the filter

    def update(self, other: ShardStatistics) -> None:
        self.files += other.files
        for name in ("counts", "score_sums", "histograms", "languages"):
            getattr(self, name).update(getattr(other, name))


def _add_grouped(table: pa.Table, keys: list[str], counts: Counter, score_sums: Counter | None = None) -> None:
    """Add the rows of ``table`` grouped by ``keys`` to ``counts`` (and their ``score`` sums to ``score_sums``)."""
    if table.num_rows == 0:
        return
    grouped = table.group_by(keys).aggregate([(keys[0], "count")] + ([("score", "sum")] if score_sums is not None else []))
    groups = list(zip(*(grouped[key].to_pylist() for key in keys)))
    counts.update(dict(zip(groups, grouped[f"{keys[0]}_count"].to_pylist())))
    if score_sums is not None:
        score_sums.update(dict(zip(groups, grouped["score_sum"].to_pylist())))


class BatchScorer:
    """A Ray actor (or a plain object): scores, filters, tiers and writes shards."""

    def __init__(self, scoring: dict, store_url: str, endpoint_url: str | None, output_path: str | None, classifier_path: str | None):
        self.scoring = ScoringSection.model_validate(scoring)
        pa.set_cpu_count(1)  # one actor per CPU: Arrow's own threads would only contend with the others
        self.store = Store(store_url, endpoint_url)
        self.output_path = output_path
        self.classifier_path = classifier_path  # loaded on first use: the driver trains it while the actors start
        self.classifier = None
        self.language = None
        if self.scoring.language.enabled:
            from tasks.scoring.language import LanguageIdentifier

            self.language = LanguageIdentifier(self.scoring.language)
        self.perplexity = None
        if "perplexity" in self.scoring.scorers:
            from tasks.scoring.perplexity import PerplexityScorer

            self.perplexity = PerplexityScorer(self.scoring.perplexity, endpoint_url)

    def ready(self) -> bool:
        """Load the classifier (written by now) and score one short document, so that every
        model and lazy import is loaded before the first shard; True then."""
        if self.classifier_path is not None and self.classifier is None:
            from tasks.scoring.classifier import load_classifier

            fs, folder = self.store.fs, self.classifier_path
            self.classifier = load_classifier(lambda name: fs.cat_file(f"{folder}/{name}"))
            warm_up = pa.table({"doc_id": ["0" * 32], "source": [""], "text": ["A short warm-up document."], "split": ["cpt"]})
            self.score_table(warm_up, (1.0, 0.0))
        return True

    def scores(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Rule values, per-scorer scores and the combined score (the weighted mean, in [0, 1], of
        the scorers that have a value: a document too short for the perplexity scorer is scored
        by the others)."""
        self.ready()
        columns = rule_table(texts)
        parts = {"rules": rules_score(columns, self.scoring.rules)}
        if self.classifier is not None:
            parts["classifier"] = self.classifier.probability(texts)
        if self.perplexity is not None:
            losses = self.perplexity.losses(texts)
            columns["perplexity_loss"] = losses
            parts["perplexity"] = self.perplexity.scores(losses)
        names = self.scoring.scorers
        values = np.stack([parts[name] for name in names])
        weights = np.array([self.scoring.weights[name] for name in names])[:, None]
        present = ~np.isnan(values)
        total = np.maximum((present * weights).sum(axis=0), 1e-12)
        combined = (np.where(present, values, 0.0) * weights).sum(axis=0) / total
        for name in ("rules", "classifier", "perplexity"):
            columns[f"score_{name}"] = parts.get(name, np.full(len(texts), np.nan))
        columns["score"] = np.clip(combined, 0.0, 1.0)
        return columns

    def score_table(self, table: pa.Table, thresholds: tuple[float, float]) -> tuple[pa.Table, pa.Table, pa.Table]:
        """(scored documents kept, every document's status row, languages detected). The
        classifier split is dropped before anything (its documents are counted by ingest)."""
        table = table.filter(pc.not_equal(table["split"], "classifier"))
        status = np.full(table.num_rows, KEPT, dtype=object)
        if self.language is not None:
            codes, allowed = self.language.detect(table["text"].to_pylist())
            table = table.append_column("language", pa.array(codes.tolist(), type=pa.string()))
            table = table.append_column("language_score", pa.array(allowed, type=pa.float64()))
            status[~self.language.keep(allowed)] = DROPPED_LANGUAGE
        languages = table.select(["source", "language"]) if self.language is not None else None
        kept = table.filter(pa.array(status == KEPT))
        columns = self.scores(kept["text"].to_pylist())
        for name, values in columns.items():
            kept = kept.append_column(name, pa.array(values, type=pa.float64()))
        if self.scoring.rules.drop_below is not None:
            passed = columns["score_rules"] >= self.scoring.rules.drop_below
            status[np.flatnonzero(status == KEPT)[~passed]] = DROPPED_RULES
            kept = kept.filter(pa.array(passed))
        tiers = tier_of(kept["score"].to_numpy(), *thresholds)
        kept = kept.append_column("tier", pa.array(tiers.tolist(), type=pa.string()))
        rows = pa.table({"source": table["source"], "split": table["split"], "status": pa.array(status.tolist(), type=pa.string())})
        return kept, rows, languages

    def sample_scores(self, paths: list[str], documents: int) -> np.ndarray:
        """Combined scores of the first ``documents`` kept documents of ``paths`` (the quantile
        tiers' deterministic sample; nothing written)."""
        scores, seen = [], 0
        for path in paths:
            for batch in self._batches(path):
                kept, _, _ = self.score_table(pa.Table.from_batches([batch]), (1.0, 0.0))
                scores.append(kept["score"].to_numpy()[: documents - seen])
                seen += len(scores[-1])
                if seen >= documents:
                    return np.concatenate(scores)
        return np.concatenate(scores) if scores else np.zeros(0)

    def _batches(self, path: str):
        with self.store.fs.open(path, "rb") as handle:
            yield from pq.ParquetFile(handle).iter_batches(batch_size=self.scoring.batch_size)

    def score_shard(self, path: str, thresholds: tuple[float, float]) -> ShardStatistics:
        """Score one ingest shard, ``batch_size`` rows at a time; write each scored batch and
        return the statistics of all of them. Memory is bounded by the batch size."""
        statistics = ShardStatistics()
        self.store.fs.makedirs(f"{self.output_path}/shards", exist_ok=True)
        for batch in self._batches(path):
            kept, rows, detected = self.score_table(pa.Table.from_batches([batch]), thresholds)
            if detected is not None:
                _add_grouped(detected, ["source", "language"], statistics.languages)
            dropped = rows.filter(pc.not_equal(rows["status"], KEPT))
            _add_grouped(dropped.append_column("tier", pa.nulls(dropped.num_rows, pa.string())), ["source", "split", "status", "tier"], statistics.counts)
            if kept.num_rows == 0:
                continue
            name = f"shards/part-{kept['doc_id'][0].as_py()[:16]}-{kept.num_rows:06d}.parquet"
            with self.store.fs.open(f"{self.output_path}/{name}", "wb") as out:
                pq.write_table(kept, out, compression="zstd")
            statistics.files.append(name)
            statuses = pa.array([KEPT] * kept.num_rows, type=pa.string())
            _add_grouped(kept.select(["source", "split", "tier", "score"]).append_column("status", statuses),
                         ["source", "split", "status", "tier"], statistics.counts, statistics.score_sums)
            bins = np.minimum((kept["score"].to_numpy() * HISTOGRAM_BINS).astype(np.int64), HISTOGRAM_BINS - 1)
            _add_grouped(pa.table({"source": kept["source"], "bin": bins}), ["source", "bin"], statistics.histograms)
        return statistics
