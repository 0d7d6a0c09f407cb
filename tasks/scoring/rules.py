"""Heuristic quality rules in the Gopher / C4 family (Rae et al. 2021; Raffel et al. 2020).

Each rule has a value per document (recorded as column ``rule_<name>``) and passes when the value
is inside the range of `RulesSection`. The rules score is the fraction of rules a document passes.
The cost is a few string scans per document (no per-token Python loop).
"""

from __future__ import annotations

import re

import numpy as np

from trecflow.recipe import RulesSection

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})  # Gopher's list
TERMINAL_PUNCTUATION = (".", "!", "?", '"', "'", ":", ";", ")")
SYMBOLS = ("#", "...", "\u2026")
RULE_NAMES = (
    "word_count",
    "mean_word_length",
    "symbol_to_word_ratio",
    "fraction_lines_end_punctuation",
    "duplicate_line_fraction",
    "stop_words",
    "alpha_word_fraction",
)


# Whitespace-delimited words containing a letter, and the stop words, found by one C-level scan each.
_ALPHA_WORD = re.compile(r"(?<!\S)\S*?[^\W\d_]\S*")
_STOP_WORD = re.compile(r"(?<!\S)(?:" + "|".join(sorted(STOP_WORDS)) + r")(?!\S)", re.IGNORECASE)


def rule_values(text: str) -> tuple[float, ...]:
    """The value of every rule of `RULE_NAMES`, in order, for one document."""
    words = text.split()
    count = len(words)
    lines = [line for line in map(str.strip, text.splitlines()) if line]
    symbols = sum(text.count(symbol) for symbol in SYMBOLS)
    return (
        float(count),
        (sum(map(len, words)) / count) if count else 0.0,
        (symbols / count) if count else float(symbols > 0),
        (sum(line.endswith(TERMINAL_PUNCTUATION) for line in lines) / len(lines)) if lines else 0.0,
        (1.0 - len(set(lines)) / len(lines)) if lines else 0.0,
        float(len({match.lower() for match in _STOP_WORD.findall(text)})),
        (len(_ALPHA_WORD.findall(text)) / count) if count else 0.0,
    )


def rule_table(texts: list[str]) -> dict[str, np.ndarray]:
    """Rule values of a batch of documents, one float64 array per rule (``rule_<name>``)."""
    values = np.array([rule_values(text) for text in texts], dtype=np.float64).reshape(len(texts), len(RULE_NAMES))
    return {f"rule_{name}": values[:, index] for index, name in enumerate(RULE_NAMES)}


def rule_passes(values: dict[str, np.ndarray], rules: RulesSection) -> dict[str, np.ndarray]:
    """Whether each document passes each rule."""
    return {
        "word_count": (values["rule_word_count"] >= rules.min_words) & (values["rule_word_count"] <= rules.max_words),
        "mean_word_length": (values["rule_mean_word_length"] >= rules.min_mean_word_length)
        & (values["rule_mean_word_length"] <= rules.max_mean_word_length),
        "symbol_to_word_ratio": values["rule_symbol_to_word_ratio"] <= rules.max_symbol_to_word_ratio,
        "fraction_lines_end_punctuation": values["rule_fraction_lines_end_punctuation"]
        >= rules.min_fraction_lines_end_punctuation,
        "duplicate_line_fraction": values["rule_duplicate_line_fraction"] <= rules.max_duplicate_line_fraction,
        "stop_words": values["rule_stop_words"] >= rules.min_stop_words,
        "alpha_word_fraction": values["rule_alpha_word_fraction"] >= rules.min_alpha_word_fraction,
    }


def rules_score(values: dict[str, np.ndarray], rules: RulesSection) -> np.ndarray:
    """Fraction of rules passed, in [0, 1]."""
    passes = rule_passes(values, rules)
    return np.mean(np.stack(list(passes.values())), axis=0).astype(np.float64)
