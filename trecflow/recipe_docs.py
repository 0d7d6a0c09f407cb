"""The recipe reference (``docs/recipe.md``), generated from the pydantic models of `trecflow.recipe`.

``python -m trecflow.recipe_docs > docs/recipe.md`` regenerates it; ``python -m trecflow.recipe_docs
--check`` exits 1 with a one-line message when ``docs/recipe.md`` differs from what `render` gives.

`render` walks `Recipe` depth-first in declaration order: one markdown section per recipe section
(nested ones named by their dotted path: ``scoring.rules``, ``corpus.sources[]``,
``curriculum.variants.<name>``) with the model's docstring and a table of field | type | default |
description. A model already documented (``base.pretrain.optimizer`` is an ``optimizer``) is referred
to, not repeated. Imports only the recipe module (pydantic, PyYAML): no Prefect, Ray, torch or MLflow.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from trecflow import recipe as recipe_module
from trecflow.recipe import Recipe

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "recipe.md"
COMMAND = "python -m trecflow.recipe_docs > docs/recipe.md"

_SCALARS = {int: "int", float: "float", str: "string", bool: "bool"}


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def _without_none(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``None``, whether it allowed None)."""
    args = _union_args(annotation)
    if args is None or type(None) not in args:
        return annotation, False
    rest = tuple(arg for arg in args if arg is not type(None))
    return (rest[0] if len(rest) == 1 else typing.Union[rest]), True


def _literal_values(annotation: Any) -> tuple[Any, ...] | None:
    return typing.get_args(annotation) if typing.get_origin(annotation) is typing.Literal else None


def _type_name(annotation: Any, path: str) -> str:
    """A reader's name for a field type (``path``: the section a model in it is documented as)."""
    annotation, optional = _without_none(annotation)
    text = _type_name_required(annotation, path)
    return f"{text}, or null" if optional else text


def _type_name_required(annotation: Any, path: str) -> str:
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if annotation is Any:
        return "any"
    if _is_model(annotation):
        return f"section `{path}`"
    values = _literal_values(annotation)
    if values is not None:
        listed = ", ".join(f"`{_value(value)}`" for value in values)
        return listed if len(values) == 1 else f"one of {listed}"
    args = _union_args(annotation)
    if args is not None:
        return " or ".join(_type_name_required(arg, path) for arg in args)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is tuple:
        return "[" + ", ".join(_type_name_required(arg, path) for arg in args) + "]"
    if origin is list:
        return f"list of {_type_name_required(args[0], path)}"
    if origin is dict:
        key, value = args
        keys = _literal_values(key)
        key_text = "keys " + ", ".join(f"`{k}`" for k in keys) if keys else f"{_type_name_required(key, path)} keys"
        return f"map ({key_text}) of {_type_name_required(value, path)}"
    return getattr(annotation, "__name__", str(annotation))


def _constraints(field: FieldInfo) -> list[str]:
    """The field's bounds and patterns, as text."""
    out = []
    for item in field.metadata:
        if isinstance(item, annotated_types.Gt):
            out.append(f"> {_value(item.gt)}")
        elif isinstance(item, annotated_types.Ge):
            out.append(f">= {_value(item.ge)}")
        elif isinstance(item, annotated_types.Lt):
            out.append(f"< {_value(item.lt)}")
        elif isinstance(item, annotated_types.Le):
            out.append(f"<= {_value(item.le)}")
        elif isinstance(item, annotated_types.MinLen):
            out.append("not empty" if item.min_length == 1 else f"at least {item.min_length} long")
        elif isinstance(item, annotated_types.MaxLen):
            out.append(f"at most {item.max_length} long")
        elif getattr(item, "pattern", None):
            out.append(f"matches `{item.pattern}`")
    return out


def _value(value: Any) -> str:
    """A value as it would be written in YAML flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseModel):
        return _value(value.model_dump(mode="json"))
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_value(key)}: {_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    annotation, _ = _without_none(field.annotation)
    if isinstance(value, BaseModel) or (_is_model(annotation) and value is not None):
        return "its defaults"
    if value == {} or value == []:
        return f"`{_value(value)}` (empty)"
    return f"`{_value(value)}`"


def _escape(text: str) -> str:
    """Markdown-safe text: RST ``code`` becomes `code`; outside code spans, ``|``, ``*`` and ``<``
    are escaped (a table cell, emphasis, an HTML tag)."""
    text = re.sub(r"``(.+?)``", r"`\1`", text)
    parts = re.split(r"(`[^`]*`)", text)
    for index in range(0, len(parts), 2):
        parts[index] = parts[index].replace("\\", "\\\\").replace("*", "\\*").replace("<", "&lt;")
    return "".join(part.replace("|", "\\|") for part in parts)


def _docstring(model: type[BaseModel]) -> str:
    return _escape(inspect.cleandoc(model.__doc__ or ""))


def _nested(annotation: Any, path: str) -> tuple[type[BaseModel], str] | None:
    """The model a field holds (directly, optionally, or as list items / map values) and its path."""
    annotation, _ = _without_none(annotation)
    if _is_model(annotation):
        return annotation, path
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is list and args and _is_model(args[0]):
        return args[0], f"{path}[]"
    if origin is dict and len(args) == 2 and _is_model(args[1]):
        return args[1], f"{path}.<name>"
    return None


def _table(model: type[BaseModel], path: str, documented: dict[type, str]) -> list[str]:
    lines = ["| field | type | default | description |", "|---|---|---|---|"]
    for name, field in model.model_fields.items():
        child = f"{path}.{name}" if path else name
        nested = _nested(field.annotation, child)
        type_path = nested[1] if nested else child
        if nested and nested[0] in documented and documented[nested[0]] != nested[1]:
            type_path = documented[nested[0]]  # the same model, documented under its first path
        type_text = _type_name(field.annotation, type_path)
        constraints = _constraints(field)
        if constraints:
            type_text += "; " + ", ".join(constraints)
        cells = [f"`{name}`", type_text.replace("|", "\\|"), _default(field).replace("|", "\\|"), _escape(field.description or "")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sections(model: type[BaseModel], path: str, depth: int, documented: dict[type, str], out: list[str]) -> None:
    """Each nested section of ``model`` (under ``path``), depth-first in declaration order."""
    for name, field in model.model_fields.items():
        nested = _nested(field.annotation, f"{path}.{name}" if path else name)
        if nested is None:
            continue
        child_model, child_path = nested
        if child_model in documented:
            continue
        documented[child_model] = child_path
        heading = "#" * min(depth, 6)
        out += ["", f"{heading} `{child_path}`", ""]
        doc = _docstring(child_model)
        if doc:
            out += [doc, ""]
        out += _table(child_model, child_path, documented)
        _sections(child_model, child_path, depth + 1, documented, out)


def _first_pass(model: type[BaseModel], path: str, documented: dict[type, str]) -> None:
    """Where each model is documented first (depth-first, declaration order), so that tables can
    name the section a reused model is described in."""
    for name, field in model.model_fields.items():
        nested = _nested(field.annotation, f"{path}.{name}" if path else name)
        if nested is not None and nested[0] not in documented:
            documented[nested[0]] = nested[1]
            _first_pass(nested[0], nested[1], documented)


def render() -> str:
    """The whole reference, as markdown (ends with one newline)."""
    first: dict[type, str] = {}
    _first_pass(Recipe, "", first)
    conventions = recipe_module.__doc__.split("Guarantees:", 1)[1].strip()
    out = [
        "# Recipe reference",
        "",
        f"<!-- Generated from trecflow/recipe.py: do not edit; regenerate with `{COMMAND}`. -->",
        "",
        "A recipe is one YAML file; `trecflow validate RECIPE.yaml` checks it without doing any work. Every section is "
        "frozen and refuses unknown keys; integer fields accept integral floats (`3.9e9`). A section marked *required* "
        "must be given; the others take the defaults shown.",
        "",
        _escape(conventions),
        "",
        "## Top level",
        "",
        _docstring(Recipe),
        "",
    ]
    out += _table(Recipe, "", first)
    documented: dict[type, str] = {}
    _sections(Recipe, "", 2, documented, out)
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trecflow.recipe_docs", description="Print the recipe reference (markdown).")
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {DOC_PATH.name} differs from the models")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        try:
            current = DOC_PATH.read_text()
        except OSError:
            current = None
        if current != text:
            what = "is missing" if current is None else "is out of date with trecflow/recipe.py"
            print(f"docs/recipe.md {what}: regenerate it with `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
