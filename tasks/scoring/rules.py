"""Heuristic quality rules in the Gopher / C4 family (Rae et al. 2021; Raffel et al. 2020).

Each rule has a value per document (recorded as column ``rule_<name>``) and passes when the value
is inside the range of `RulesSection`. The rules score is the fraction of rules a document passes.

Cost: no Python loop per word or per character. The word statistics (count, mean length, share
of words containing a letter) are computed for a whole batch at once with numpy on the batch's
code points, in windows of `WINDOW_CHARS` characters (a document longer than a window is cut at
whitespace, so memory is bounded whatever a document's size); the line and stop-word rules are a
few C-level string scans per document. Words are runs of non-whitespace characters (as
``str.split()`` cuts them); a letter is what the regular expression ``[^\\W\\d_]`` matches.
`rule_values` computes the same values one document at a time (the reference the tests compare with).
"""

from __future__ import annotations

import itertools
import re
from operator import methodcaller

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
WINDOW_CHARS = 1 << 20  # code points per numpy window (about 14 bytes of working memory each)

# Every capitalization of every stop word (ASCII letters only: no other character lowercases to
# one of them), so one split of the text finds them case-insensitively without lowercasing it.
_STOP_WORD_FORMS = {
    "".join(form): word
    for word in STOP_WORDS
    for form in itertools.product(*((letter, letter.upper()) for letter in word))
}
_ALPHA_WORD = re.compile(r"\S*[^\W\d_]\S*")
_ENDS_IN_PUNCTUATION = methodcaller("endswith", TERMINAL_PUNCTUATION)
_WHITESPACE = re.compile(r"\s")


def _tables() -> tuple[np.ndarray, np.ndarray]:
    """Whitespace and letter flags of every code point of the Basic Multilingual Plane."""
    characters = "".join(map(chr, range(0x10000)))
    space = np.array([c.isspace() for c in characters], dtype=bool)
    letter = np.zeros(0x10000, dtype=bool)
    letter[[m.start() for m in re.finditer(r"[^\W\d_]", characters)]] = True
    return space, letter


_SPACE, _LETTER = _tables()


def _flags(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is whitespace, is a letter) per code point; the few outside the BMP are looked up one by one."""
    if codes.size == 0 or codes.max() < 0x10000:
        return _SPACE[codes], _LETTER[codes]
    inside = codes < 0x10000
    clipped = np.where(inside, codes, 0)
    space, letter = _SPACE[clipped], _LETTER[clipped]
    outside = np.flatnonzero(~inside)
    for value in np.unique(codes[outside]).tolist():
        at = outside[codes[outside] == value]
        space[at] = chr(value).isspace()
        letter[at] = bool(re.match(r"[^\W\d_]", chr(value)))
    return space, letter


def _windows(texts: list[str]):
    """(document indices, texts) of at most about WINDOW_CHARS characters each; a longer document
    is cut at whitespace into pieces (its word statistics add up over the pieces)."""
    indices: list[int] = []
    pieces: list[str] = []
    size = 0
    for index, text in enumerate(texts):
        start = 0
        while len(text) - start > WINDOW_CHARS:
            cut = _WHITESPACE.search(text, start + WINDOW_CHARS)
            if cut is None:
                break
            indices.append(index)
            pieces.append(text[start : cut.start()])
            start = cut.start()
            yield indices, pieces
            indices, pieces, size = [], [], 0
        indices.append(index)
        pieces.append(text[start:] if start else text)
        size += len(text) - start
        if size >= WINDOW_CHARS:
            yield indices, pieces
            indices, pieces, size = [], [], 0
    if pieces:
        yield indices, pieces


def word_statistics(texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: words, characters in words, and words containing a letter (float64 each)."""
    size = len(texts)
    words, characters, alpha = np.zeros(size), np.zeros(size), np.zeros(size)
    for indices, pieces in _windows(texts):
        joined = " ".join(pieces) + " "  # every piece followed by one separator
        space, letter = _flags(np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32))
        lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=len(pieces)) + 1
        offsets = np.cumsum(lengths) - lengths
        owners = np.asarray(indices, dtype=np.int64)
        starts = np.flatnonzero(~space[1:] & space[:-1]) + 1  # word starts (position 0 is never one: see below)
        if not space[0]:
            starts = np.concatenate([[0], starts])
        owner_of_word = owners[np.searchsorted(offsets, starts, side="right") - 1]
        # A word's segment runs to the next word's start: the whitespace after it has no letter.
        has_letter = np.logical_or.reduceat(letter, starts) if starts.size else np.zeros(0, dtype=bool)
        spaces = np.add.reduceat(space, offsets, dtype=np.int64)
        words += np.bincount(owner_of_word, minlength=size)
        alpha += np.bincount(owner_of_word[has_letter], minlength=size)
        characters += np.bincount(owners, weights=lengths - spaces, minlength=size)
    return words, characters, alpha


def _line_values(text: str) -> tuple[float, float, float, float]:
    """(symbols, share of non-empty lines ending in terminal punctuation, share of repeated
    non-empty lines, distinct stop words) of one document."""
    lines = list(filter(None, map(str.strip, text.splitlines())))
    symbols = sum(text.count(symbol) for symbol in SYMBOLS)
    return (
        float(symbols),
        (sum(map(_ENDS_IN_PUNCTUATION, lines)) / len(lines)) if lines else 0.0,
        (1.0 - len(set(lines)) / len(lines)) if lines else 0.0,
        float(len({_STOP_WORD_FORMS[form] for form in _STOP_WORD_FORMS.keys() & set(text.split())})),
    )


def rule_table(texts: list[str]) -> dict[str, np.ndarray]:
    """Rule values of a batch of documents, one float64 array per rule (``rule_<name>``)."""
    words, characters, alpha = word_statistics(texts)
    lines = np.array([_line_values(text) for text in texts], dtype=np.float64).reshape(len(texts), 4)
    symbols = lines[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        has_words = words > 0
        values = {
            "word_count": words,
            "mean_word_length": np.where(has_words, characters / words, 0.0),
            "symbol_to_word_ratio": np.where(has_words, symbols / words, (symbols > 0).astype(np.float64)),
            "fraction_lines_end_punctuation": lines[:, 1],
            "duplicate_line_fraction": lines[:, 2],
            "stop_words": lines[:, 3],
            "alpha_word_fraction": np.where(has_words, alpha / words, 0.0),
        }
    return {f"rule_{name}": values[name] for name in RULE_NAMES}


def rule_values(text: str) -> tuple[float, ...]:
    """The value of every rule of `RULE_NAMES`, in order, for one document (plain string methods:
    the reference `rule_table` must agree with)."""
    words = text.split()
    count = len(words)
    symbols, punctuation, duplicates, stop_words = _line_values(text)
    return (
        float(count),
        (sum(map(len, words)) / count) if count else 0.0,
        (symbols / count) if count else float(symbols > 0),
        punctuation,
        duplicates,
        stop_words,
        (len(_ALPHA_WORD.findall(text)) / count) if count else 0.0,
    )


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
