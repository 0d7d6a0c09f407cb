"""Recipe files as data: YAML that reads ``3.9e9`` as a number, overlays merged in order, and
``--set key.path=value`` edits — everything before validation (`trecflow.recipe`).

- An overlay is a YAML mapping merged into the recipe: mappings merge key by key, any other value
  (a list, a number, a string) replaces, and ``null`` removes the key (so an overlay can take a
  ``base.tiny`` out and put a ``base.path`` in).
- ``--set a.b.c=VALUE`` sets one key after the overlays; VALUE is read as YAML (``2``, ``true``,
  ``[0.9, 0.95]``, ``null``), so ``--set training.workers=2`` sets a number.

Every problem is a `RecipeError` of one line naming the file (and line) or the ``--set`` argument.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used. ``str(err)`` is one line naming the file and field."""


class _NumberLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``3.9e9`` and ``1e-3`` as floats (YAML 1.2 style)."""


_NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str) -> Any:
    """Parse YAML with the recipe loader (``3.9e9`` is a number). Raises yaml.YAMLError."""
    return yaml.load(text, Loader=_NumberLoader)


def read_file(path: str | Path, what: str = "recipe") -> Any:
    """A YAML file's data; `RecipeError` naming the file (and line) when unreadable or invalid."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read {what} ({error.strerror})") from None
    try:
        return read_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{path}:{where} invalid YAML: {problem}") from None


def merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` merged into a copy of ``base`` (see the module docstring)."""
    merged = dict(base)
    for key, value in overlay.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_set(expression: str) -> tuple[list[str], Any]:
    """``a.b.c=VALUE`` as (["a", "b", "c"], VALUE read as YAML)."""
    key, equals, text = expression.partition("=")
    parts = key.strip().split(".")
    if not equals or not all(re.fullmatch(r"[A-Za-z0-9_-]+", part) for part in parts):
        raise RecipeError(f"--set {expression}: expected KEY.PATH=VALUE, e.g. training.workers=2")
    try:
        value = read_yaml(text) if text.strip() else ""
    except yaml.YAMLError as error:
        raise RecipeError(f"--set {expression}: the value is not valid YAML ({getattr(error, 'problem', error)})") from None
    return parts, value


def apply_set(data: dict[str, Any], expression: str) -> dict[str, Any]:
    """``data`` with one ``--set`` applied: the key is set (``null`` removes it); missing
    sections on the way are created."""
    parts, value = parse_set(expression)
    return _assign(data, parts, value, expression, 0)


def _assign(data: dict[str, Any], parts: list[str], value: Any, expression: str, depth: int) -> dict[str, Any]:
    head = parts[depth]
    if depth == len(parts) - 1:
        return {key: item for key, item in data.items() if key != head} if value is None else {**data, head: value}
    inner = data.get(head, {})
    if not isinstance(inner, dict):
        raise RecipeError(f"--set {expression}: {'.'.join(parts[: depth + 1])} is a {type(inner).__name__}, not a section")
    return {**data, head: _assign(inner, parts, value, expression, depth + 1)}


def compose(data: Any, overlays: Iterable[str | Path] = (), sets: Iterable[str] = (), source: str = "recipe") -> Any:
    """The recipe's data with each overlay file merged in order, then each ``--set`` applied."""
    overlays, sets = list(overlays), list(sets)
    if not overlays and not sets:
        return data
    if not isinstance(data, dict):
        return data  # validation names the problem
    for path in overlays:
        overlay = read_file(path, "overlay")
        if overlay is None:
            continue
        if not isinstance(overlay, dict):
            raise RecipeError(f"{path}: an overlay must be a mapping of recipe sections, got {type(overlay).__name__}")
        data = merge(data, overlay)
    for expression in sets:
        data = apply_set(data, expression)
    return data
