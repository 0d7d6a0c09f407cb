"""Stage 1, score: ingest the corpus, train the quality classifier, score and tier every document.

Steps (each reusing its output when the fingerprint matches):
1. `tasks.ingest.run_ingest`: normalized, deduplicated, split shards.
2. The classifier (if configured) trains on the ``classifier`` split of its hq/lq sources; those
   documents are never scored (they are counted as ``classifier_training``).
3. Ray Data hands the ingest shards to a pool of actors (`tasks.scoring.workers.BatchScorer`, each
   loading the classifier once from the store) that add the rule values, each scorer's score, the
   combined score (weighted mean, in [0, 1]) and the tier, write the scored shards and return
   partial statistics, aggregated here into per-source x tier statistics and the score histogram.
   Quantile tiers take their thresholds from a deterministic sample scored first.

Output ``<store>/score/<fingerprint>/``: ``shards/*.parquet`` (every ingest column plus
``rule_*``, ``score_rules``, ``score_classifier``, ``score``, ``tier``), ``classifier/`` (weights
and metadata), ``stats.json``, ``score_histogram.png``, manifest last.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.scoring.classifier import train_classifier
from tasks.scoring.workers import CLASSIFIER_META, CLASSIFIER_WEIGHTS, HISTOGRAM_BINS, BatchScorer
from trecflow.fingerprint import fingerprint
from trecflow.recipe import TIERS, Recipe, RecipeError, ScoringSection
from tasks.ingest import Dropped
from trecflow.stage import SUMMARY_FILE, Stage, StageContext, StageResult, Summary, Target, omitted_when_none
from trecflow.store import StageOutput, Store

STAGE = "score"
STAGE_VERSION = 2  # 2: the summary is summary.json (was stats.json); ingest is its own stage
HISTOGRAM_FILE = "score_histogram.png"


@dataclass(frozen=True)
class Thresholds(Summary):
    """The tier thresholds: hq is score >= hq, lq is score < lq."""

    hq: float
    lq: float


@dataclass(frozen=True)
class ScoredSource(Summary):
    """One source's scored documents: count, mean score, documents per tier and per split, and what ingest dropped."""

    documents: int
    mean_score: float
    tier_counts: Mapping[str, int]
    splits: Mapping[str, int]
    dropped_empty: int
    dropped_duplicate: int


@dataclass(frozen=True, kw_only=True)
class ScoreSummary(Summary):
    """The scored corpus: totals, the classifier's held-out accuracy (None without a classifier; its
    document counts only with one), tier thresholds, tier shares and counts, per-source statistics,
    score histograms (per source, 0..1 in equal bins) and the scored shard files."""

    documents: int
    dropped: Dropped
    classifier_training: int
    classifier_accuracy: float | None
    classifier_train_documents: int | None = omitted_when_none()
    classifier_holdout_documents: int | None = omitted_when_none()
    thresholds: Thresholds
    tiers: Mapping[str, Mapping[str, float]]  # source -> tier -> share of its documents
    tier_totals: Mapping[str, int]
    sources: Mapping[str, ScoredSource]
    histograms: Mapping[str, tuple[int, ...]]
    shards: tuple[str, ...]


def require_sections(recipe: Recipe) -> ScoringSection:
    if recipe.corpus is None:
        raise RecipeError("corpus: the score stage needs a corpus section")
    return recipe.scoring or ScoringSection(scorers=["rules"], weights={"rules": 1.0})


def score_fingerprint(recipe: Recipe, ingest_fp: str) -> str:
    scoring = require_sections(recipe)
    return fingerprint(STAGE, STAGE_VERSION, scoring.model_dump(mode="json"), {"ingest": ingest_fp})


def ingest_tables(store: Store, ingest: StageResult, columns: list[str]) -> Iterator[pa.Table]:
    """The ingest shards in order, one table (of ``columns``) at a time."""
    output = store.output("ingest", ingest.fingerprint)
    for name in ingest.summary.shards:
        with store.fs.open(output.file_path(name), "rb") as handle:
            yield pq.read_table(handle, columns=columns)


def _read_training_documents(store: Store, ingest: StageResult, scoring: ScoringSection) -> tuple[list[str], np.ndarray, list[str]]:
    """The classifier split of the hq and lq sources, capped per class, in shard order."""
    config = scoring.classifier
    label_of = {**{name: 1 for name in config.hq_sources}, **{name: 0 for name in config.lq_sources}}
    texts, labels, doc_ids, taken = [], [], [], {0: 0, 1: 0}
    for table in ingest_tables(store, ingest, ["doc_id", "source", "text", "split"]):
        table = table.filter(pc.and_(pc.equal(table["split"], "classifier"), pc.is_in(table["source"], pa.array(list(label_of)))))
        for doc_id, source, text in zip(table["doc_id"].to_pylist(), table["source"].to_pylist(), table["text"].to_pylist()):
            label = label_of[source]
            if taken[label] < config.max_documents:
                taken[label] += 1
                texts.append(text)
                labels.append(label)
                doc_ids.append(doc_id)
        if min(taken.values()) >= config.max_documents:
            break
    return texts, np.array(labels), doc_ids


def _quantile_thresholds(store: Store, ingest: StageResult, scorer: BatchScorer, tiers) -> tuple[float, float]:
    """hq/lq thresholds from a deterministic sample (the first shards, classifier split excluded)."""
    scores: list[np.ndarray] = []
    seen = 0
    for table in ingest_tables(store, ingest, ["text", "split"]):
        texts = table.filter(pc.not_equal(table["split"], "classifier"))["text"].to_pylist()[: tiers.quantile_sample - seen]
        scores.append(scorer.scores(texts)["score"])
        seen += len(texts)
        if seen >= tiers.quantile_sample:
            break
    return quantile_thresholds(np.concatenate(scores), tiers.hq, tiers.lq)


def quantile_thresholds(scores: np.ndarray, hq_share: float, lq_share: float) -> tuple[float, float]:
    """(hq_min, lq_max) so that about ``hq_share`` of ``scores`` are >= hq_min and ``lq_share`` < lq_max."""
    return float(np.quantile(scores, 1.0 - hq_share)), float(np.quantile(scores, lq_share))


def histogram_png(stats: ScoreSummary) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for source, histogram in sorted(stats.histograms.items()):
        counts = np.asarray(histogram, dtype=np.float64)
        axis.plot(centers, counts / max(counts.sum(), 1), label=source, linewidth=1.3)
    hq_min, lq_max = stats.thresholds.hq, stats.thresholds.lq
    axis.axvline(hq_min, color="green", linestyle="--", linewidth=0.9, label=f"hq >= {hq_min:.3f}")
    axis.axvline(lq_max, color="red", linestyle="--", linewidth=0.9, label=f"lq < {lq_max:.3f}")
    axis.set_xlabel("combined quality score")
    axis.set_ylabel("share of the source's documents")
    axis.set_title("quality score by source")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


class ScoreStage(
    Stage[ScoreSummary], name=STAGE, version=STAGE_VERSION, inputs=("ingest",), sections=("corpus",), title="Quality scores",
    task_name="score_corpus", ray=True, figure=HISTOGRAM_FILE, summary_type=ScoreSummary
):
    """Stage 1b: train the quality classifier, score and tier every ingested document."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return score_fingerprint(target.recipe, upstream["ingest"].fingerprint)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> ScoreSummary:
        return _score(target.recipe, require_sections(target.recipe), context.store, upstream["ingest"], output, context.progress)

    def counts(self, summary: ScoreSummary) -> dict[str, Any]:
        return {"documents": summary.documents, "dropped": summary.dropped.as_json(), "classifier_training": summary.classifier_training}

    def rows(self, summary: ScoreSummary) -> list[tuple[str, str]]:
        rows = [(source, f"{entry.documents:,} documents; hq {summary.tiers[source]['hq']:.3f}, mid {summary.tiers[source]['mid']:.3f}, "
                         f"lq {summary.tiers[source]['lq']:.3f}; mean score {entry.mean_score:.3f}")
                for source, entry in summary.sources.items()]
        rows += [
            ("documents scored", f"{summary.documents:,} (tiers {dict(summary.tier_totals)})"),
            ("dropped", str(summary.dropped.as_json())),
            ("classifier training", f"{summary.classifier_training:,} documents reserved"),
        ]
        if summary.classifier_accuracy is not None:
            rows.append(("classifier accuracy", f"{summary.classifier_accuracy:.4f} on {summary.classifier_holdout_documents:,} held-out documents"))
        rows.append(("tier thresholds", f"hq >= {summary.thresholds.hq:.4f}, lq < {summary.thresholds.lq:.4f}"))
        return rows

    def metrics(self, summary: ScoreSummary) -> dict[str, float]:
        metrics = {
            "documents": summary.documents,
            "dropped_empty": summary.dropped.empty,
            "dropped_duplicate": summary.dropped.duplicate,
            "classifier_training_documents": summary.classifier_training,
        }
        if summary.classifier_accuracy is not None:
            metrics["classifier_accuracy"] = summary.classifier_accuracy
        for source, fractions in summary.tiers.items():
            for tier, fraction in fractions.items():
                metrics[f"tier_fraction.{source}.{tier}"] = fraction
        return metrics

    def artifacts(self, summary: ScoreSummary) -> list[str]:
        files = [SUMMARY_FILE, HISTOGRAM_FILE]
        return files + ([CLASSIFIER_WEIGHTS, CLASSIFIER_META] if summary.classifier_accuracy is not None else [])


SCORE = ScoreStage()


def run_score(recipe: Recipe, store: Store, force: bool = False, progress=print) -> StageResult[ScoreSummary]:
    """Ingest and score the recipe's corpus alone (the runner: reuse, or compute under a lease)."""
    from tasks.ingest import INGEST
    from trecflow.runner import run_stage

    target = Target(recipe)
    ingested = run_stage(INGEST, target, store, force=force, progress=progress)
    return run_stage(SCORE, target, store, {"ingest": ingested}, force=force, progress=progress)


def _score(recipe: Recipe, scoring: ScoringSection, store: Store, ingest: StageResult, output: StageOutput, progress) -> ScoreSummary:
    import ray

    from trecflow.ray_runtime import ensure_ray

    classifier_metrics: dict[str, Any] = {}
    classifier_dir = None
    if "classifier" in scoring.scorers:
        texts, labels, doc_ids = _read_training_documents(store, ingest, scoring)
        progress(f"score: training the classifier on {len(texts):,} documents ({int(labels.sum()):,} hq)")
        classifier, classifier_metrics = train_classifier(texts, labels, doc_ids, scoring.classifier)
        weights, meta = classifier.to_bytes()
        info = {**json.loads(meta), **classifier_metrics, "fingerprint": output.fingerprint}
        output.write_bytes(CLASSIFIER_WEIGHTS, weights)
        output.write_bytes(CLASSIFIER_META, json.dumps(info, indent=2).encode())
        classifier_dir = output.path
        progress(f"score: classifier held-out accuracy {classifier_metrics['classifier_accuracy']:.4f}")

    tiers = scoring.tiers
    thresholds = (tiers.hq, tiers.lq)
    if tiers.method == "quantiles":
        sampler = BatchScorer(scoring.model_dump(mode="json"), store.url, store.endpoint_url, None, classifier_dir, thresholds)
        thresholds = _quantile_thresholds(store, ingest, sampler, tiers)
        progress(f"score: quantile thresholds hq >= {thresholds[0]:.4f}, lq < {thresholds[1]:.4f}")

    ensure_ray()
    ingest_output = store.output("ingest", ingest.fingerprint)
    shards = [ingest_output.file_path(name) for name in ingest.summary.shards]
    progress(f"score: scoring {ingest.summary.documents:,} documents in {len(shards)} shards with {scoring.workers} actors")
    partial = (
        ray.data.from_items([{"path": path} for path in shards], override_num_blocks=len(shards))
        .map_batches(
            BatchScorer,
            fn_constructor_kwargs={
                "scoring": scoring.model_dump(mode="json"),
                "store_url": store.url,
                "endpoint_url": store.endpoint_url,
                "output_path": output.path,
                "classifier_path": classifier_dir,
                "thresholds": thresholds,
            },
            batch_size=1,  # one shard per call; the actor reads it in scoring.batch_size rows
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=scoring.workers),
        )
        .take_all()
    )
    files = sorted({row["file"] for row in partial})
    for name in files:
        output.record_file(name)
    stats = ScoreSummary.from_json(_combine(partial, ingest, thresholds, classifier_metrics) | {"shards": files})
    output.write_bytes(HISTOGRAM_FILE, histogram_png(stats))
    progress(f"score: {stats.documents:,} documents scored; tiers {dict(stats.tier_totals)}")
    return stats


def _combine(partial: list[dict], ingest: StageResult, thresholds: tuple[float, float], classifier_metrics: dict) -> dict[str, Any]:
    """The summary as JSON (without the shard files)."""
    per_source: dict[str, dict[str, Any]] = {}
    histograms: dict[str, np.ndarray] = {}
    for row in partial:
        entry = per_source.setdefault(row["source"], {"documents": 0, "score_sum": 0.0, "tiers": dict.fromkeys(TIERS, 0), "splits": {}})
        entry["documents"] += row["count"]
        entry["score_sum"] += row["score_sum"]
        entry["tiers"][row["tier"]] += row["count"]
        entry["splits"][row["split"]] = entry["splits"].get(row["split"], 0) + row["count"]
        histograms[row["source"]] = histograms.get(row["source"], np.zeros(HISTOGRAM_BINS, dtype=np.int64)) + np.asarray(row["histogram"])
    tiers = {
        source: {tier: entry["tiers"][tier] / entry["documents"] for tier in TIERS} for source, entry in sorted(per_source.items())
    }
    documents = sum(entry["documents"] for entry in per_source.values())
    ingested = ingest.summary.sources
    classifier_training = sum(entry.splits.get("classifier", 0) for entry in ingested.values())
    return {
        "documents": documents,
        "dropped": ingest.summary.dropped.as_json(),
        "classifier_training": classifier_training,
        "classifier_accuracy": classifier_metrics.get("classifier_accuracy"),
        **{key: value for key, value in classifier_metrics.items() if key != "classifier_accuracy"},
        "thresholds": {"hq": thresholds[0], "lq": thresholds[1]},
        "tiers": tiers,
        "tier_totals": {tier: sum(entry["tiers"][tier] for entry in per_source.values()) for tier in TIERS},
        "sources": {
            source: {
                "documents": entry["documents"],
                "mean_score": entry["score_sum"] / entry["documents"],
                "tier_counts": entry["tiers"],
                "splits": entry["splits"],
                "dropped_empty": ingested[source].dropped_empty,
                "dropped_duplicate": ingested[source].dropped_duplicate,
            }
            for source, entry in sorted(per_source.items())
        },
        "histograms": {source: values.tolist() for source, values in sorted(histograms.items())},
    }
