"""Recipe files as data: YAML that reads ``3.9e9`` as a number, overlays merged in order, and
``--set key.path=value`` edits — everything before validation (`trecflow.recipe`).

- An overlay is a YAML mapping merged into the recipe: mappings merge key by key, any other value
  (a list, a number, a string) replaces, and ``null`` removes the key (so an overlay can take a
  ``base.tiny`` out and put a ``base.path`` in).
- ``--set a.b.c=VALUE`` sets one key after the overlays; VALUE is read as YAML (``2``, ``true``,
  ``[0.9, 0.95]``, ``null``), so ``--set training.workers=2`` sets a number.

Every problem is a `RecipeError` of one line naming the file (and line) or the ``--set`` argument.
Before any value is built, a document is refused when it is not UTF-8 text, repeats a key in a
mapping, nests deeper than `MAX_DEPTH` levels, or would expand (aliases counted each time they are
used) to more than `MAX_NODES` nodes: a "billion laughs" alias bomb costs nothing to refuse.
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


MAX_DEPTH = 50  # mappings and lists nested in each other; a recipe needs 6
MAX_NODES = 100_000  # nodes after expanding aliases; the largest shipped recipe has a few hundred


class _Refused(yaml.MarkedYAMLError):
    """A document refused before it is built (the error's mark names the line)."""


def _construct_mapping(loader: _NumberLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose keys are unique: a repeated key names both lines."""
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if isinstance(key, (str, int, float, bool)) or key is None:
            if key in seen:
                raise _Refused(None, None, f"duplicate key {key!r} (first at line {seen[key].start_mark.line + 1})", key_node.start_mark)
            seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_NumberLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _check_size(root: yaml.Node | None) -> None:
    """`_Refused` when the node graph nests deeper than `MAX_DEPTH` or expands to more than
    `MAX_NODES` nodes (a node reached through several aliases counts each time; memoized, so the
    check is linear in the document's text)."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node, depth: int) -> int:
        if depth > MAX_DEPTH:
            raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
        if id(node) in sizes:
            return sizes[id(node)]
        children = [] if isinstance(node, yaml.ScalarNode) else (
            [item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else node.value)
        total = 1 + sum(size(child, depth + 1) for child in children)
        if total > MAX_NODES:
            raise _Refused(None, None, f"expands to more than {MAX_NODES:,} values (aliases counted each time they are used)", node.start_mark)
        sizes[id(node)] = total
        return total

    if root is not None:
        size(root, 0)


def read_yaml(text: str) -> Any:
    """Parse YAML with the recipe loader (``3.9e9`` is a number; no repeated keys; bounded depth
    and expanded size). Raises yaml.YAMLError."""
    loader = _NumberLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:  # the composer recurses per level: a mark-less refusal
            raise _Refused(None, None, f"nested deeper than {MAX_DEPTH} levels", loader.get_mark()) from None
        _check_size(root)
        return None if root is None else loader.construct_document(root)
    finally:
        loader.dispose()


def read_file(path: str | Path, what: str = "recipe") -> Any:
    """A YAML file's data; `RecipeError` naming the file (and line) when unreadable or invalid."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise RecipeError(f"{path}: cannot read {what} ({error.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise RecipeError(f"{path}: line {line} is not UTF-8 text (byte 0x{data[error.start]:02x}: a binary file?)") from None
    try:
        return read_yaml(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = getattr(error, "position", None)  # a ReaderError (a control character) has no mark
        line = mark.line + 1 if mark else (text.count("\n", 0, position) + 1 if position is not None else None)
        where = f" line {line}" if line else ""
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
