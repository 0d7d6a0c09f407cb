"""Stage 1b, score: train the quality classifier, filter by language, score and tier every document.

Steps (the runner reuses the output when the fingerprint matches):
1. ``scoring.workers`` Ray actors (`tasks.scoring.workers.BatchScorer`) start; each loads the
   language-ID model and, when configured, the perplexity model once, while the driver trains the
   classifier (if configured) on the ``classifier`` split of its hq/lq sources (fastText by
   default; those documents are never scored: they are counted as ``classifier_training``).
2. Quantile tiers take their thresholds from a deterministic sample scored by one actor.
3. The actors take the ingest shards as they free up (two queued per actor, so none waits for
   the driver between shards): they drop documents
   whose language is not allowed, add the rule values, each scorer's score, the combined score
   (weighted mean, in [0, 1]), drop documents below ``rules.drop_below``, tier the rest, write the
   scored shards and return grouped counts, aggregated here into the per-source data card.

Output ``<store>/score/<fingerprint>/``: ``shards/*.parquet`` (every ingest column plus
``language``, ``language_score``, ``rule_*``, ``score_rules``, ``score_classifier``,
``score_perplexity`` (and ``perplexity_loss`` with that scorer), ``score``, ``tier``),
``classifier/`` (the model and its metadata), ``summary.json`` (with the data card per source),
``data_card.md``, ``score_histogram.png``, manifest last. Nothing is dropped silently: every
document ingest read is in the card, kept or dropped by reason.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.scoring.classifier import META_FILE, train_classifier
from tasks.scoring.workers import DROPPED_LANGUAGE, DROPPED_RULES, HISTOGRAM_BINS, KEPT, BatchScorer, ShardStatistics
from trecflow.fingerprint import fingerprint
from trecflow.progress import as_progress
from trecflow.recipe import TIERS, Recipe, RecipeError, ScoringSection
from trecflow.stage import SUMMARY_FILE, Stage, StageContext, StageResult, Summary, Target, omitted_when_none
from trecflow.store import StageOutput, Store

STAGE = "score"
STAGE_VERSION = 3  # 3: language filter, rules drop, fastText classifier, the data card; 2: summary.json
HISTOGRAM_FILE = "score_histogram.png"
DATA_CARD_FILE = "data_card.md"
DROP_REASONS = ("empty", "exact_duplicates", "near_duplicates", "language", "rules")
LANGUAGES_SHOWN = 5  # the data card's most frequent detected languages per source


@dataclass(frozen=True)
class Thresholds(Summary):
    """The tier thresholds: hq is score >= hq, lq is score < lq."""

    hq: float
    lq: float


@dataclass(frozen=True)
class Drops(Summary):
    """Documents dropped, by reason: empty, exact and near duplicates (ingest), language and rules (scoring)."""

    empty: int
    exact_duplicates: int
    near_duplicates: int
    language: int
    rules: int


@dataclass(frozen=True)
class ScoredSource(Summary):
    """One source's data card: documents read, dropped by reason, reserved for the classifier,
    scored and kept (per tier and split), mean score, and the languages detected (before the filter)."""

    documents_in: int
    dropped: Drops
    classifier_training: int
    documents: int
    mean_score: float
    tier_counts: Mapping[str, int]
    splits: Mapping[str, int]
    languages: Mapping[str, int]


@dataclass(frozen=True, kw_only=True)
class ScoreSummary(Summary):
    """The scored corpus: totals, drops by reason, the classifier (its kind, held-out accuracy and
    document counts; None without one), tier thresholds, tier shares and counts, the per-source
    data card, score histograms (per source, 0..1 in equal bins) and the scored shard files."""

    documents: int
    dropped: Drops
    classifier_training: int
    classifier_kind: str | None = omitted_when_none()
    classifier_accuracy: float | None
    classifier_train_documents: int | None = omitted_when_none()
    classifier_holdout_documents: int | None = omitted_when_none()
    classifier_files: tuple[str, ...] | None = omitted_when_none()
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


def quantile_thresholds(scores: np.ndarray, hq_share: float, lq_share: float) -> tuple[float, float]:
    """(hq_min, lq_max) so that about ``hq_share`` of ``scores`` are >= hq_min and ``lq_share`` < lq_max."""
    return float(np.quantile(scores, 1.0 - hq_share)), float(np.quantile(scores, lq_share))


def histogram_png(stats: ScoreSummary) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from training.trec_plot import png_bytes

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
    return png_bytes(figure)


class ScoreStage(
    Stage[ScoreSummary], name=STAGE, version=STAGE_VERSION, inputs=("ingest",), sections=("corpus",), title="Quality scores",
    task_name="score_corpus", ray=True, figure=HISTOGRAM_FILE, summary_type=ScoreSummary
):
    """Stage 1b: train the quality classifier, filter by language, score and tier every ingested document."""

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        return score_fingerprint(target.recipe, upstream["ingest"].fingerprint)

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> ScoreSummary:
        return _score(require_sections(target.recipe), context.store, upstream["ingest"], output, context.progress)

    def counts(self, summary: ScoreSummary) -> dict[str, Any]:
        return {"documents": summary.documents, "dropped": summary.dropped.as_json(), "classifier_training": summary.classifier_training}

    def rows(self, summary: ScoreSummary) -> list[tuple[str, str]]:
        rows = [(source, f"{entry.documents:,} of {entry.documents_in:,} documents; hq {summary.tiers[source]['hq']:.3f}, "
                         f"mid {summary.tiers[source]['mid']:.3f}, lq {summary.tiers[source]['lq']:.3f}; mean score {entry.mean_score:.3f}")
                for source, entry in summary.sources.items()]
        rows += [
            ("documents scored", f"{summary.documents:,} (tiers {dict(summary.tier_totals)})"),
            ("dropped", ", ".join(f"{reason.replace('_', ' ')} {count:,}" for reason, count in summary.dropped.as_json().items())),
            ("classifier training", f"{summary.classifier_training:,} documents reserved"),
        ]
        if summary.classifier_accuracy is not None:
            rows.append(("classifier accuracy", f"{summary.classifier_accuracy:.4f} ({summary.classifier_kind}) on "
                                                f"{summary.classifier_holdout_documents:,} held-out documents"))
        rows.append(("tier thresholds", f"hq >= {summary.thresholds.hq:.4f}, lq < {summary.thresholds.lq:.4f}"))
        return rows

    def metrics(self, summary: ScoreSummary) -> dict[str, float]:
        metrics = {"documents": summary.documents, "classifier_training_documents": summary.classifier_training}
        metrics |= {f"dropped_{reason}": count for reason, count in summary.dropped.as_json().items()}
        if summary.classifier_accuracy is not None:
            metrics["classifier_accuracy"] = summary.classifier_accuracy
        for source, fractions in summary.tiers.items():
            for tier, fraction in fractions.items():
                metrics[f"tier_fraction.{source}.{tier}"] = fraction
        return metrics

    def artifacts(self, summary: ScoreSummary) -> list[str]:
        files = [SUMMARY_FILE, DATA_CARD_FILE, HISTOGRAM_FILE]
        return files + list(summary.classifier_files or ())


SCORE = ScoreStage()


def run_score(recipe: Recipe, store: Store, force: bool = False, progress=print) -> StageResult[ScoreSummary]:
    """Ingest and score the recipe's corpus alone (the runner: reuse, or compute under a lease)."""
    from tasks.ingest import INGEST
    from trecflow.runner import run_stage

    target = Target(recipe)
    ingested = run_stage(INGEST, target, store, force=force, progress=progress)
    return run_stage(SCORE, target, store, {"ingest": ingested}, force=force, progress=progress)


def _start_actors(scoring: ScoringSection, store: Store, output: StageOutput, classifier_dir: str | None) -> list:
    """``scoring.workers`` scoring actors (1 CPU and ``perplexity.gpus`` GPUs each); a dead actor
    restarts and its shard is retried (shard outputs have deterministic names)."""
    import ray

    gpus = scoring.perplexity.gpus if "perplexity" in scoring.scorers else 0
    actor = ray.remote(BatchScorer).options(num_cpus=1, num_gpus=gpus, max_restarts=2, max_task_retries=2)
    config = scoring.model_dump(mode="json")
    return [actor.remote(config, store.url, store.endpoint_url, output.path, classifier_dir) for _ in range(scoring.workers)]


QUEUED_PER_ACTOR = 2  # shards sent to an actor ahead of its results: it never idles between shards


def _score_shards(actors: list, shards: list[str], thresholds: tuple[float, float]) -> Iterator[ShardStatistics]:
    """Each shard scored once by whichever actor frees up first; statistics as shards finish."""
    import ray

    queue = list(reversed(shards))
    free = [actor for actor in actors for _ in range(QUEUED_PER_ACTOR)]
    running: dict = {}
    while queue or running:
        while queue and free:
            actor = free.pop()
            running[actor.score_shard.remote(queue.pop(), thresholds)] = actor
        (finished,), _ = ray.wait(list(running), num_returns=1)
        free.append(running.pop(finished))
        yield ray.get(finished)


def _score(scoring: ScoringSection, store: Store, ingest: StageResult, output: StageOutput, progress) -> ScoreSummary:
    import ray
    from trecflow.ray_runtime import ensure_ray

    progress = as_progress(progress, "score")

    if "perplexity" in scoring.scorers:
        from tasks.scoring.perplexity import check_perplexity_model

        check_perplexity_model(scoring.perplexity.model, store.endpoint_url)
    ensure_ray()
    classifier_metrics: dict[str, Any] = {}
    classifier_dir = output.path if "classifier" in scoring.scorers else None
    started = time.perf_counter()
    actors = _start_actors(scoring, store, output, classifier_dir)  # they start while the classifier trains
    try:
        if classifier_dir is not None:
            texts, labels, doc_ids = _read_training_documents(store, ingest, scoring)
            progress(f"score: training the {scoring.classifier.kind} classifier on {len(texts):,} documents ({int(labels.sum()):,} hq)")
            classifier, classifier_metrics = train_classifier(texts, labels, doc_ids, scoring.classifier)
            files = classifier.files()
            files[META_FILE] = json.dumps(json.loads(files[META_FILE]) | classifier_metrics, indent=2).encode()
            for name, data in files.items():
                output.write_bytes(name, data)
            classifier_metrics |= {"classifier_kind": scoring.classifier.kind, "classifier_files": sorted(files)}
            progress(f"score: classifier held-out accuracy {classifier_metrics['classifier_accuracy']:.4f}")
        ray.get([actor.ready.remote() for actor in actors])
        progress(f"score: {len(actors)} scoring actors ready in {time.perf_counter() - started:.1f} s (models loaded)")
        ingest_output = store.output("ingest", ingest.fingerprint)
        shards = [ingest_output.file_path(name) for name in ingest.summary.shards]
        tiers = scoring.tiers
        thresholds = (tiers.hq, tiers.lq)
        if tiers.method == "quantiles":
            sample = ray.get(actors[0].sample_scores.remote(shards, tiers.quantile_sample))
            thresholds = quantile_thresholds(sample, tiers.hq, tiers.lq)
            progress(f"score: quantile thresholds hq >= {thresholds[0]:.4f}, lq < {thresholds[1]:.4f} (from {len(sample):,} documents)")
        progress(f"score: scoring {ingest.summary.documents:,} documents in {len(shards)} shards with {len(actors)} actors")
        total = ShardStatistics()
        progress.advance(0, len(shards), "shards", "scored")
        for done, part in enumerate(_score_shards(actors, shards, thresholds), 1):
            total.update(part)
            progress.advance(done, len(shards), "shards", "scored")
    finally:
        for actor in actors:
            ray.kill(actor)
    files = sorted(total.files)
    for name in files:
        output.record_file(name)
    stats = ScoreSummary.from_json(_combine(total, ingest, thresholds, classifier_metrics) | {"shards": files})
    output.write_bytes(HISTOGRAM_FILE, histogram_png(stats))
    output.write_bytes(DATA_CARD_FILE, data_card(stats).encode())
    progress(f"score: {stats.documents:,} documents scored; tiers {dict(stats.tier_totals)}; dropped {stats.dropped.as_json()}")
    return stats


def _combine(total: ShardStatistics, ingest: StageResult, thresholds: tuple[float, float], classifier_metrics: dict) -> dict[str, Any]:
    """The summary as JSON (without the shard files), from the shards' statistics and ingest's counts."""
    ingested = ingest.summary.sources
    per_source: dict[str, dict[str, Any]] = {
        name: {"documents": 0, "score_sum": 0.0, "tiers": dict.fromkeys(TIERS, 0), "splits": {}, "dropped": {DROPPED_LANGUAGE: 0, DROPPED_RULES: 0},
               "languages": {}, "histogram": np.zeros(HISTOGRAM_BINS, dtype=np.int64)}
        for name in ingested
    }
    for (source, split, status, tier), count in total.counts.items():
        entry = per_source[source]
        if status != KEPT:
            entry["dropped"][status] += count
            continue
        entry["documents"] += count
        entry["score_sum"] += total.score_sums[source, split, status, tier]
        entry["tiers"][tier] += count
        entry["splits"][split] = entry["splits"].get(split, 0) + count
    for (source, score_bin), count in total.histograms.items():
        per_source[source]["histogram"][score_bin] += count
    for (source, language), count in total.languages.items():
        per_source[source]["languages"][language] = count
    sources = {}
    for name, entry in per_source.items():
        read = ingested[name]
        top = sorted(entry["languages"].items(), key=lambda item: (-item[1], item[0]))[:LANGUAGES_SHOWN]
        sources[name] = {
            "documents_in": read.read,
            "dropped": {"empty": read.dropped_empty, "exact_duplicates": read.dropped_duplicate,
                        "near_duplicates": read.dropped_near_duplicate, **entry["dropped"]},
            "classifier_training": read.splits.get("classifier", 0),
            "documents": entry["documents"],
            "mean_score": entry["score_sum"] / entry["documents"] if entry["documents"] else 0.0,
            "tier_counts": entry["tiers"],
            "splits": entry["splits"],
            "languages": dict(top),
        }
    return {
        "documents": sum(entry["documents"] for entry in sources.values()),
        "dropped": {reason: sum(entry["dropped"][reason] for entry in sources.values()) for reason in DROP_REASONS},
        "classifier_training": sum(entry["classifier_training"] for entry in sources.values()),
        **{key: value for key, value in classifier_metrics.items()},
        "classifier_accuracy": classifier_metrics.get("classifier_accuracy"),
        "thresholds": {"hq": thresholds[0], "lq": thresholds[1]},
        "tiers": {name: {tier: entry["tier_counts"][tier] / max(entry["documents"], 1) for tier in TIERS} for name, entry in sources.items()},
        "tier_totals": {tier: sum(entry["tier_counts"][tier] for entry in sources.values()) for tier in TIERS},
        "sources": sources,
        "histograms": {name: entry["histogram"].tolist() for name, entry in per_source.items()},
    }


def data_card(stats: ScoreSummary) -> str:
    """The scoring run's data card as Markdown: per source, documents in, dropped by reason, tier shares."""
    reasons = list(DROP_REASONS)
    lines = [
        "# Data card",
        "",
        f"{stats.documents:,} documents scored and kept; tier thresholds hq >= {stats.thresholds.hq:.4f}, lq < {stats.thresholds.lq:.4f}.",
    ]
    if stats.classifier_accuracy is not None:
        lines.append(f"Quality classifier: {stats.classifier_kind}, held-out accuracy {stats.classifier_accuracy:.4f} "
                     f"on {stats.classifier_holdout_documents:,} documents.")
    lines += [
        "",
        "| source | in | " + " | ".join(reason.replace("_", " ") for reason in reasons) + " | classifier training | kept | hq | mid | lq | mean score | top languages |",
        "|---" * (len(reasons) + 9) + "|",
    ]
    for name, entry in stats.sources.items():
        dropped = entry.dropped.as_json()
        shares = stats.tiers[name]
        languages = ", ".join(f"{code} {count:,}" for code, count in entry.languages.items()) or "-"
        lines.append(
            f"| {name} | {entry.documents_in:,} | " + " | ".join(f"{dropped[reason]:,}" for reason in reasons)
            + f" | {entry.classifier_training:,} | {entry.documents:,} | {shares['hq']:.3f} | {shares['mid']:.3f} | {shares['lq']:.3f}"
            + f" | {entry.mean_score:.3f} | {languages} |"
        )
    return "\n".join(lines) + "\n"
