"""The scoring models as pure components: the fastText and hashed quality classifiers, language ID.

Real text (tests/corpus_builder.py): standard-library docstrings (hq) and Debian copyright files (lq).
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest

from tasks.scoring.classifier import (
    FASTTEXT_MODEL_FILE,
    HASHED_WEIGHTS_FILE,
    META_FILE,
    FastTextClassifier,
    HashedClassifier,
    holdout_mask,
    load_classifier,
    train_classifier,
)
from tasks.scoring.language import LanguageIdentifier, lid_languages
from trecflow.recipe import LID_LANGUAGES, ClassifierSection, LanguageSection, RecipeError, parse_recipe, read_yaml

from ..conftest import CONFIGS
from ..corpus_builder import debian_copyright, stdlib_docstrings

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog, and the cat sleeps quietly on the warm sofa all afternoon.",
    "de": "Der schnelle braune Fuchs springt über den faulen Hund, und die Katze schläft den ganzen Nachmittag auf dem Sofa.",
    "fr": "Le renard brun rapide saute par-dessus le chien paresseux, et le chat dort tranquillement sur le canapé tout l'après-midi.",
    "zh": "我们今天下午去公园散步，天气非常好，很多孩子在草地上放风筝，大家都很开心。",
}


def doc_id(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], np.ndarray, list[str]]:
    hq = stdlib_docstrings()
    lq = sorted({text[:4000] for text in debian_copyright(300)})
    texts = hq + lq
    return texts, np.array([1] * len(hq) + [0] * len(lq)), [doc_id(text) for text in texts]


def section(kind: str, **overrides) -> ClassifierSection:
    values = {"kind": kind, "hq_sources": ["stdlib-docs"], "lq_sources": ["debian-copyright"], "features": 2**16, "dim": 8, "epochs": 5}
    return ClassifierSection(**(values | overrides))


@pytest.fixture(scope="module")
def fasttext_model(corpus):
    return train_classifier(*corpus, section("fasttext"))


def held_out(corpus, fraction: float = 0.2) -> tuple[list[str], np.ndarray]:
    texts, labels, ids = corpus
    held = holdout_mask(ids, fraction)
    return [text for text, keep in zip(texts, held) if keep], labels[held]


def test_fasttext_separates_hq_from_lq(corpus, fasttext_model):
    classifier, metrics = fasttext_model
    assert isinstance(classifier, FastTextClassifier)
    assert metrics["classifier_accuracy"] >= 0.9
    assert metrics["classifier_train_documents"] + metrics["classifier_holdout_documents"] == len(corpus[0])
    texts, labels = held_out(corpus)
    probability = classifier.probability(texts)
    assert probability.dtype == np.float64 and np.all((probability >= 0) & (probability <= 1))
    assert probability[labels == 1].mean() > 0.7
    assert probability[labels == 0].mean() < 0.3


def test_fasttext_training_repeats_exactly(corpus, fasttext_model):
    again, metrics = train_classifier(*corpus, section("fasttext"))
    texts = corpus[0][::5]
    assert np.array_equal(again.probability(texts), fasttext_model[0].probability(texts))
    assert metrics == fasttext_model[1]


def test_fasttext_round_trips_through_its_files(corpus, fasttext_model):
    classifier = fasttext_model[0]
    files = classifier.files()
    assert set(files) == {FASTTEXT_MODEL_FILE, META_FILE}
    meta = json.loads(files[META_FILE])
    assert meta["kind"] == "fasttext" and meta["dim"] == 8 and meta["features"] == 2**16
    loaded = load_classifier(files.__getitem__)
    assert isinstance(loaded, FastTextClassifier)
    texts = corpus[0][::3]
    assert np.array_equal(loaded.probability(texts), classifier.probability(texts))


def test_hashed_round_trips_through_its_files(corpus):
    classifier, metrics = train_classifier(*corpus, section("hashed", features=2**14))
    assert isinstance(classifier, HashedClassifier)
    assert metrics["classifier_accuracy"] >= 0.9
    files = classifier.files()
    assert set(files) == {HASHED_WEIGHTS_FILE, META_FILE}
    loaded = load_classifier(files.__getitem__)
    texts = corpus[0][::3]
    assert np.array_equal(loaded.probability(texts), classifier.probability(texts))
    # a format-1 store (before the fastText kind) still loads
    legacy_meta = {"format": 1, "kind": "hashed-ngram-logistic", "ngrams": 2, "features": 2**14}
    legacy = {HASHED_WEIGHTS_FILE: files[HASHED_WEIGHTS_FILE], META_FILE: json.dumps(legacy_meta).encode()}
    assert np.array_equal(load_classifier(legacy.__getitem__).probability(texts), classifier.probability(texts))


@pytest.mark.parametrize("kind", ["fasttext", "hashed"])
def test_a_one_class_training_set_is_a_one_line_error(corpus, kind):
    texts, labels, ids = corpus
    with pytest.raises(ValueError) as error:
        train_classifier(texts, np.ones_like(labels), ids, section(kind))
    message = str(error.value)
    assert "scoring.classifier" in message and "\n" not in message


def test_newlines_empty_texts_and_label_tokens_score(fasttext_model):
    texts = ["first line\nsecond line\r\nthird", "", "   ", "__label__hq __label__lq buy now"]
    probability = fasttext_model[0].probability(texts)
    assert probability.shape == (4,) and np.all(np.isfinite(probability))
    assert np.all((probability >= 0) & (probability <= 1))
    assert fasttext_model[0].probability([]).shape == (0,)


def test_language_identifier_names_the_languages():
    identifier = LanguageIdentifier(LanguageSection(languages=["en"]))
    codes = list(SENTENCES)
    top, allowed = identifier.detect([SENTENCES[code] for code in codes] + ["line one\nline two", ""])
    assert top[:4].tolist() == codes
    assert allowed.dtype == np.float64 and np.all((allowed >= 0) & (allowed <= 1))
    assert allowed[0] > 0.5 and allowed[1] < 0.1
    assert identifier.keep(allowed)[:4].tolist() == [True, False, False, False]


def test_language_identifier_sums_the_allowed_languages():
    identifier = LanguageIdentifier(LanguageSection(languages=["de", "fr"], min_score=0.5))
    top, allowed = identifier.detect([SENTENCES[code] for code in ("en", "de", "fr", "zh")])
    assert identifier.keep(allowed).tolist() == [False, True, True, False]


def test_lid_languages_match_the_model():
    assert len(lid_languages()) == 176
    assert set(lid_languages()) == LID_LANGUAGES


def test_an_unknown_language_code_is_a_recipe_error():
    data = copy.deepcopy(read_yaml((CONFIGS / "test.yaml").read_text()))
    data.setdefault("scoring", {})["language"] = {"languages": ["en", "xx"]}
    with pytest.raises(RecipeError) as error:
        parse_recipe(data)
    assert "scoring.language.languages" in str(error.value) and "'xx'" in str(error.value)


def test_a_predict_only_fasttext_module_is_a_one_line_error(corpus, monkeypatch):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "fasttext", types.SimpleNamespace(load_model=lambda path: None))
    with pytest.raises(RuntimeError) as error:
        train_classifier(*corpus, section("fasttext"))
    message = str(error.value)
    assert "pip install --force-reinstall --no-deps fasttext-numpy2-wheel==0.9.2" in message and "\n" not in message
