"""The trained quality classifier: fastText (the default) or hashed n-grams + logistic regression.

Both kinds read the first `MAX_CHARS` characters of a document and give P(high quality), and both
share one interface: ``probability(texts)``, ``files()`` (the stage output's ``classifier/`` files)
and `load_classifier` (reads ``classifier/classifier.json`` and dispatches on its ``kind``).
`train_classifier` fits either kind on the documents that `holdout_mask` does not hold out and
reports its accuracy on those it does.

- ``fasttext`` (`FastTextClassifier`): a fastText supervised model (``fasttext.train_supervised``):
  word and word n-gram embeddings (n-grams hashed into ``features`` buckets of ``dim`` floats),
  averaged, then a softmax over the two labels ``hq`` and ``lq``. The learned embeddings share
  evidence between related words and n-grams, so it generalises better than a linear model over
  raw hashed counts, and it is the usual choice of pretraining-data pipelines (CCNet, DCLM's
  fastText filter, FineWeb-Edu's fastText baselines). It trains on one thread, with the recipe's
  seed and a seeded shuffle of the training lines, so a run repeats exactly. Its file is fastText's
  own binary format (``classifier/model.bin``: numbers and a vocabulary, never code). Loss:
  softmax, not one-vs-all logistic: with two mutually exclusive labels the softmax gives
  P(hq) + P(lq) = 1, so P(hq) is a calibrated probability in one number. Needs the full
  ``fasttext`` module (``fasttext-numpy2-wheel``) to train; loading and predicting need only
  ``load_model``/``predict``.
- ``hashed`` (`HashedClassifier`, historically `QualityClassifier`): scikit-learn's stateless
  ``HashingVectorizer`` over word 1..ngrams-grams (``features`` dimensions, L2 normalised) and a
  logistic-regression head trained by SGD with balanced class weights; P(hq) is
  ``sigmoid(x . w + b)``. Its files are a weight vector and the hashing parameters
  (``classifier/weights.npz`` + JSON), no vocabulary.

No pickles: loading a model from the store cannot run code.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from trecflow.recipe import ClassifierSection

MAX_CHARS = 20_000
FORMAT_VERSION = 2
META_FILE = "classifier/classifier.json"
HASHED_WEIGHTS_FILE = "classifier/weights.npz"
FASTTEXT_MODEL_FILE = "classifier/model.bin"
HQ_LABEL = "__label__hq"
LQ_LABEL = "__label__lq"
FASTTEXT_MIN_COUNT = 2
FASTTEXT_REINSTALL = "pip install --force-reinstall --no-deps fasttext-numpy2-wheel==0.9.2"


class Classifier(Protocol):
    """What a scoring worker needs of a trained classifier."""

    kind: str

    def probability(self, texts: list[str]) -> np.ndarray: ...

    def files(self) -> dict[str, bytes]: ...


def fasttext_module(train: bool = False):
    """The ``fasttext`` module; with ``train``, one that can train (not the predict-only build)."""
    try:
        import fasttext
    except ImportError:
        raise RuntimeError(f"the fasttext module is not installed: {FASTTEXT_REINSTALL}") from None
    if train and not hasattr(fasttext, "train_supervised"):
        raise RuntimeError(
            f"the installed fasttext module is the predict-only one (fasttext-predict) and cannot train: {FASTTEXT_REINSTALL}"
        )
    fasttext_api = getattr(fasttext, "FastText", None)
    if fasttext_api is not None and hasattr(fasttext_api, "eprint"):
        fasttext_api.eprint = lambda *args, **kwargs: None  # the load_model warning, once per load
    return fasttext


def fasttext_line(text: str, max_chars: int) -> str:
    """A document as one fastText input line: its first ``max_chars`` characters, line breaks as
    spaces, and no token that fastText would read as a label."""
    return text[:max_chars].replace("\n", " ").replace("\r", " ").replace("__label__", "_label_")


# -- hashed n-grams + logistic regression ------------------------------------------------------------


@dataclass(frozen=True)
class HashedClassifier:
    """A trained hashed-n-gram classifier: hashing parameters and the linear head."""

    ngrams: int
    features: int
    weights: np.ndarray
    bias: float
    kind = "hashed"

    def _vectorizer(self):
        from sklearn.feature_extraction.text import HashingVectorizer

        return HashingVectorizer(
            n_features=self.features, ngram_range=(1, self.ngrams), alternate_sign=False, norm="l2", dtype=np.float32
        )

    def features_of(self, texts: list[str]):
        return self._vectorizer().transform([text[:MAX_CHARS] for text in texts])

    def probability(self, texts: list[str]) -> np.ndarray:
        """P(high quality) of each document, float64 in [0, 1]."""
        if not texts:
            return np.zeros(0)
        logits = self.features_of(texts) @ self.weights + self.bias
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "kind": self.kind, "ngrams": self.ngrams, "features": self.features}

    def files(self) -> dict[str, bytes]:
        """{name under the stage output: bytes}: the weights and ``classifier/classifier.json``."""
        weights, meta = self.to_bytes()
        return {HASHED_WEIGHTS_FILE: weights, META_FILE: meta}

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(weights.npz, classifier.json)."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, weights=self.weights.astype(np.float32), bias=np.array([self.bias]))
        return buffer.getvalue(), json.dumps(self.metadata(), indent=2).encode()

    @classmethod
    def from_bytes(cls, weights: bytes, meta: bytes | dict) -> HashedClassifier:
        info = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
        _check_format(info)
        arrays = np.load(io.BytesIO(weights), allow_pickle=False)
        return cls(ngrams=info["ngrams"], features=info["features"], weights=arrays["weights"], bias=float(arrays["bias"][0]))


QualityClassifier = HashedClassifier  # the name before the fastText kind existed


def _train_hashed(texts: list[str], labels: np.ndarray, train: np.ndarray, config: ClassifierSection) -> HashedClassifier:
    from sklearn.linear_model import SGDClassifier

    empty = HashedClassifier(config.ngrams, config.features, np.zeros(config.features, dtype=np.float32), 0.0)
    matrix = empty.features_of([texts[i] for i in np.flatnonzero(train)])
    model = SGDClassifier(
        loss="log_loss", alpha=1e-5, max_iter=config.epochs, tol=None, class_weight="balanced", random_state=config.seed
    )
    model.fit(matrix, labels[train])
    return HashedClassifier(config.ngrams, config.features, model.coef_[0].astype(np.float32), float(model.intercept_[0]))


# -- fastText -----------------------------------------------------------------------------------------


class FastTextClassifier:
    """A trained fastText supervised model over the labels ``hq`` and ``lq``."""

    kind = "fasttext"

    def __init__(self, model, parameters: dict[str, Any]):
        self.model = model
        self.parameters = parameters
        self._hq = self.model.get_labels().index(HQ_LABEL)

    def probability(self, texts: list[str]) -> np.ndarray:
        """P(high quality) of each document, float64 in [0, 1] (one batched predict call)."""
        if not texts:
            return np.zeros(0)
        labels, probabilities = self.model.predict([fasttext_line(text, MAX_CHARS) for text in texts], k=2, threshold=0.0)
        result = np.full(len(texts), 0.5)
        for i, (names, values) in enumerate(zip(labels, probabilities)):
            for name, value in zip(names, values):
                if name == HQ_LABEL:
                    result[i] = value
                    break
            else:
                if len(names):  # only lq came back: P(hq) = 1 - P(lq)
                    result[i] = 1.0 - float(values[0])
        return np.clip(result, 0.0, 1.0)

    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT_VERSION, "kind": self.kind, **self.parameters}

    def model_bytes(self) -> bytes:
        with tempfile.TemporaryDirectory(prefix="trecflow-fasttext-") as folder:
            path = os.path.join(folder, "model.bin")
            self.model.save_model(path)
            with open(path, "rb") as handle:
                return handle.read()

    def files(self) -> dict[str, bytes]:
        """{name under the stage output: bytes}: ``classifier/model.bin`` (fastText's binary
        format) and ``classifier/classifier.json``."""
        return {FASTTEXT_MODEL_FILE: self.model_bytes(), META_FILE: json.dumps(self.metadata(), indent=2).encode()}

    @classmethod
    def from_bytes(cls, model: bytes, meta: bytes | dict) -> FastTextClassifier:
        info = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
        _check_format(info)
        fasttext = fasttext_module()
        with tempfile.TemporaryDirectory(prefix="trecflow-fasttext-") as folder:
            path = os.path.join(folder, "model.bin")
            with open(path, "wb") as handle:
                handle.write(model)
            loaded = fasttext.load_model(path)
        parameters = {key: value for key, value in info.items() if key not in ("format", "kind")}
        return cls(loaded, parameters)


# fastText's trainer, run in a fresh interpreter: in a process that has already made large
# allocations (e.g. one ``predict`` call on some thousands of long documents), fastText 0.9.2's
# training was seen to read garbage and stop with "Encountered NaN" (same data, same seed; fine in
# a fresh process). A child process gives every training the same clean state, so it repeats exactly.
_TRAIN_SCRIPT = """
import json, sys
import fasttext
arguments = json.loads(sys.argv[1])
output = arguments.pop("output")
try:
    model = fasttext.train_supervised(**arguments)
except Exception as error:
    print(f"{type(error).__name__}: {error}", file=sys.stderr)
    sys.exit(3)
model.save_model(output)
"""


def _train_fasttext(texts: list[str], labels: np.ndarray, train: np.ndarray, config: ClassifierSection) -> FastTextClassifier:
    fasttext = fasttext_module(train=True)
    rows = np.flatnonzero(train)
    # fastText reads its training file in order: shuffle the lines (seeded) so that SGD sees the
    # classes interleaved; one thread and the seed make the run repeat exactly.
    order = rows[np.random.default_rng(config.seed).permutation(len(rows))]
    with tempfile.TemporaryDirectory(prefix="trecflow-fasttext-") as folder:
        path = os.path.join(folder, "train.txt")
        with open(path, "w", encoding="utf-8", errors="replace") as handle:
            for i in order.tolist():
                handle.write(f"{HQ_LABEL if labels[i] else LQ_LABEL} {fasttext_line(texts[i], MAX_CHARS)}\n")
        arguments = {
            "input": path,
            "output": os.path.join(folder, "model.bin"),
            "lr": config.learning_rate,
            "dim": config.dim,
            "epoch": config.epochs,
            "wordNgrams": config.ngrams,
            "bucket": config.features,
            "minCount": FASTTEXT_MIN_COUNT,
            "minn": 0,
            "maxn": 0,
            "loss": "softmax",
            "thread": 1,
            "seed": config.seed,
            "verbose": 0,
        }
        done = subprocess.run([sys.executable, "-c", _TRAIN_SCRIPT, json.dumps(arguments)], capture_output=True, text=True)
        if done.returncode != 0:
            lines = (done.stderr or "").strip().splitlines() or [f"exit status {done.returncode}"]
            raise RuntimeError(f"scoring.classifier: fastText training failed: {lines[-1]}")
        model = fasttext.load_model(arguments["output"])
    parameters = {
        "ngrams": config.ngrams,
        "features": config.features,
        "dim": config.dim,
        "learning_rate": config.learning_rate,
        "epochs": config.epochs,
        "min_count": FASTTEXT_MIN_COUNT,
        "loss": "softmax",
        "seed": config.seed,
        "max_chars": MAX_CHARS,
    }
    return FastTextClassifier(model, parameters)


# -- both kinds ---------------------------------------------------------------------------------------


def _check_format(info: dict) -> None:
    if info.get("format") not in (1, FORMAT_VERSION):
        raise ValueError(f"classifier format {info.get('format')} is not {FORMAT_VERSION}")


def load_classifier(read: Callable[[str], bytes]) -> HashedClassifier | FastTextClassifier:
    """The classifier stored under a stage output; ``read(name)`` returns the bytes of
    ``<output>/<name>`` (e.g. ``lambda name: fs.cat_file(f"{path}/{name}")``). Reads
    ``classifier/classifier.json`` first, then the kind's model file."""
    info = json.loads(read(META_FILE))
    _check_format(info)
    kind = info.get("kind")
    if kind in ("hashed", "hashed-ngram-logistic"):  # the second: format 1
        return HashedClassifier.from_bytes(read(HASHED_WEIGHTS_FILE), info)
    if kind == "fasttext":
        return FastTextClassifier.from_bytes(read(FASTTEXT_MODEL_FILE), info)
    raise ValueError(f"{META_FILE}: unknown classifier kind {kind!r} (fasttext or hashed)")


def holdout_mask(doc_ids: list[str], fraction: float) -> np.ndarray:
    """Documents held out from training, by a hash of their doc_id (stable across runs)."""
    return np.array([int(doc_id[16:24], 16) for doc_id in doc_ids], dtype=np.float64) / 2**32 < fraction


def train_classifier(
    texts: list[str], labels: np.ndarray, doc_ids: list[str], config: ClassifierSection
) -> tuple[HashedClassifier | FastTextClassifier, dict]:
    """Fit ``config.kind`` on the documents not held out; report accuracy on the held-out ones."""
    labels = np.asarray(labels, dtype=np.int64)
    held = holdout_mask(doc_ids, config.holdout)
    train = ~held
    for name, mask in (("training", train), ("held-out", held)):
        if len(set(labels[mask].tolist())) < 2:
            raise ValueError(f"scoring.classifier: the {name} documents lack one of the classes (hq and lq both needed)")
    if config.kind == "fasttext":
        classifier = _train_fasttext(texts, labels, train, config)
    else:
        classifier = _train_hashed(texts, labels, train, config)
    predicted = classifier.probability([texts[i] for i in np.flatnonzero(held)]) >= 0.5
    accuracy = float(np.mean(predicted == labels[held].astype(bool)))
    return classifier, {
        "classifier_accuracy": accuracy,
        "classifier_train_documents": int(train.sum()),
        "classifier_holdout_documents": int(held.sum()),
    }
