"""The trained quality classifier: hashed word n-grams and a logistic-regression head.

Why this model: scikit-learn is a well-kept dependency the stack already installs (through
MLflow); ``HashingVectorizer`` is stateless (no vocabulary to fit, store or ship to workers), so the
saved model is just a weight vector plus its hashing parameters; it scores thousands of documents
per second per core; and its files are plain numbers (``.npz`` + JSON), not pickles, so loading a
model from the store cannot run code. fastText would add a compiled dependency for little gain at
the sizes the demo and tests need.

The classifier reads the first `MAX_CHARS` characters of a document. Its probability that a
document is high quality is ``sigmoid(x . w + b)``.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np

from trecflow.recipe import ClassifierSection

MAX_CHARS = 20_000
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QualityClassifier:
    """A trained classifier: hashing parameters and the linear head."""

    ngrams: int
    features: int
    weights: np.ndarray
    bias: float

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

    def to_bytes(self) -> tuple[bytes, bytes]:
        """(weights.npz, classifier.json) for the store and MLflow."""
        buffer = io.BytesIO()
        np.savez_compressed(buffer, weights=self.weights.astype(np.float32), bias=np.array([self.bias]))
        meta = {"format": FORMAT_VERSION, "kind": "hashed-ngram-logistic", "ngrams": self.ngrams, "features": self.features}
        return buffer.getvalue(), json.dumps(meta, indent=2).encode()

    @classmethod
    def from_bytes(cls, weights: bytes, meta: bytes) -> QualityClassifier:
        info = json.loads(meta)
        if info.get("format") != FORMAT_VERSION:
            raise ValueError(f"classifier format {info.get('format')} is not {FORMAT_VERSION}")
        arrays = np.load(io.BytesIO(weights), allow_pickle=False)
        return cls(ngrams=info["ngrams"], features=info["features"], weights=arrays["weights"], bias=float(arrays["bias"][0]))


def holdout_mask(doc_ids: list[str], fraction: float) -> np.ndarray:
    """Documents held out from training, by a hash of their doc_id (stable across runs)."""
    return np.array([int(doc_id[16:24], 16) for doc_id in doc_ids], dtype=np.float64) / 2**32 < fraction


def train_classifier(texts: list[str], labels: np.ndarray, doc_ids: list[str], config: ClassifierSection) -> tuple[QualityClassifier, dict]:
    """Fit on the documents not held out; report accuracy on the held-out ones."""
    from sklearn.linear_model import SGDClassifier

    labels = np.asarray(labels, dtype=np.int64)
    held = holdout_mask(doc_ids, config.holdout)
    train = ~held
    for name, mask in (("training", train), ("held-out", held)):
        if len(set(labels[mask].tolist())) < 2:
            raise ValueError(f"scoring.classifier: the {name} documents lack one of the classes (hq and lq both needed)")
    empty = QualityClassifier(config.ngrams, config.features, np.zeros(config.features, dtype=np.float32), 0.0)
    matrix = empty.features_of(texts)
    model = SGDClassifier(
        loss="log_loss", alpha=1e-5, max_iter=config.epochs, tol=None, class_weight="balanced", random_state=config.seed
    )
    model.fit(matrix[train], labels[train])
    classifier = QualityClassifier(config.ngrams, config.features, model.coef_[0].astype(np.float32), float(model.intercept_[0]))
    predicted = classifier.probability([texts[i] for i in np.flatnonzero(held)]) >= 0.5
    accuracy = float(np.mean(predicted == labels[held].astype(bool)))
    return classifier, {
        "classifier_accuracy": accuracy,
        "classifier_train_documents": int(train.sum()),
        "classifier_holdout_documents": int(held.sum()),
    }
