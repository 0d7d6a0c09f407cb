"""The stage protocol: what every pipeline stage declares, and the one result type.

A stage is a declaration plus a pure function. It names itself (``name``, which is also its store
folder and Prefect task), its ``version`` (bumped whenever its output for the same inputs would
change), the stages it reads (``inputs``) and its ``scope`` (``recipe``: shared by every variant;
``variant``: one output per curriculum variant). The runner (`trecflow.runner`) asks it:

- `applies(target)`: whether the recipe has what the stage needs (a missing section: not run);
- `fingerprint(target, upstream, store)`: the content address of its output, from the recipe and
  the upstream *results* (not only their fingerprints), computed once per run (``store`` gives the
  endpoint for sources it lists);
- `run(target, upstream, output, context)`: compute into ``output`` (data files only: the runner
  writes ``summary.json`` and commits the manifest last) and return the summary;
- `rows(summary)` / `metrics(summary)` / `artifacts(summary)`: how the summary reads for people
  (the CLI's text and the Prefect markdown come from the same rows), for MLflow, and which of its
  files are logged as artifacts.

A stage's summary is a frozen dataclass deriving from `Summary`, declared in the class statement
(``summary_type=PackSummary``): `Summary.as_json` is exactly what ``summary.json`` holds and what
``--json`` shows (its fields in order; a field marked `omitted_when_none` is left out when None),
`Summary.from_json` reads a stored one back (a missing or unknown key is a `SummaryError`). A stage
that declares no ``summary_type`` (a test's ad-hoc stage) keeps a plain JSON dict.

A stage with nothing to compute (a base model given as a path, the base model as the reference)
returns its result from `resolve` instead, and is never run. Nothing here imports Prefect, Ray,
torch or MLflow.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Mapping, TypeVar, Union

if TYPE_CHECKING:
    from trecflow.progress import Progress
    from trecflow.recipe import Recipe
    from trecflow.store import StageOutput, Store

SUMMARY_FILE = "summary.json"
RECIPE_SCOPE = "recipe"
VARIANT_SCOPE = "variant"


class SummaryError(ValueError):
    """A stored summary that does not match its stage's summary type (a missing or unknown key)."""


OMIT_NONE = "omit_none"


def omitted_when_none() -> Any:
    """A summary field that defaults to None and is left out of the JSON when None (keys that
    only some outputs have, e.g. the classifier's document counts)."""
    return field(default=None, metadata={OMIT_NONE: True})


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` (as JSON or as built) in the form its field's type declares: nested summaries
    from dicts, tuples from lists, dicts (copied) for mappings; anything else as it is."""
    if value is None:
        return None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Union or origin is types.UnionType:
        options = [arg for arg in args if arg is not type(None)]
        return _coerce(value, options[0]) if len(options) == 1 else value
    if isinstance(hint, type) and issubclass(hint, Summary):
        return value if isinstance(value, hint) else hint.from_json(value)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(item, args[0]) for item in value)
        return tuple(_coerce(item, arg) for item, arg in zip(value, args)) if args else tuple(value)
    if origin in (collections.abc.Mapping, dict):
        return {key: _coerce(item, args[1]) if args else item for key, item in value.items()}
    return value


def _as_json(value: Any) -> Any:
    if isinstance(value, Summary):
        return value.as_json()
    if isinstance(value, (tuple, list)):
        return [_as_json(item) for item in value]
    if isinstance(value, Mapping):
        return {key: _as_json(item) for key, item in value.items()}
    return value


SummaryT = TypeVar("SummaryT", bound="Summary")


class Summary:
    """Base of every stage's summary: a frozen dataclass whose fields, in order, are the keys of
    its ``summary.json``. Lists are held as tuples, nested objects as nested summaries or dicts;
    a value built from lists or dicts is converted on construction."""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            coerced = _coerce(value, hints[item.name])
            if coerced is not value:
                object.__setattr__(self, item.name, coerced)

    def as_json(self) -> dict[str, Any]:
        """The JSON object: what ``summary.json`` holds and ``--json`` shows."""
        out: dict[str, Any] = {}
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            if value is None and item.metadata.get(OMIT_NONE):
                continue
            out[item.name] = _as_json(value)
        return out

    # A summary with several forms (the base model: a path, a config or a pretrained tiny model)
    # maps each ``kind`` to its class; `concrete` picks the form of the data.
    forms: ClassVar[Mapping[str, type[Summary]]] = {}

    @classmethod
    def concrete(cls, data: Mapping[str, Any]) -> type[Summary]:
        """The class that reads ``data``: this one, or for a summary with several `forms` the one
        its ``kind`` names (SummaryError for another kind)."""
        forms = cls.__dict__.get("forms")
        if not forms:
            return cls
        if data.get("kind") not in forms:
            raise SummaryError(f"{cls.__name__}: kind {data.get('kind')!r} is none of {', '.join(forms)}")
        return forms[data["kind"]]

    @classmethod
    def from_json(cls: type[SummaryT], data: Mapping[str, Any]) -> SummaryT:
        """A stored summary read back; SummaryError naming the keys when one is missing or unknown."""
        if not isinstance(data, Mapping):
            raise SummaryError(f"{cls.__name__}: a summary is a JSON object, not {type(data).__name__}")
        concrete = cls.concrete(data)
        if concrete is not cls:
            return concrete.from_json(data)
        known = {item.name: item for item in dataclasses.fields(cls) if item.init}
        missing = [name for name, item in known.items() if name not in data
                   and item.default is dataclasses.MISSING and item.default_factory is dataclasses.MISSING]
        unknown = [key for key in data if key not in known]
        if missing or unknown:
            problems = ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has unknown keys {', '.join(map(str, unknown))}"] if unknown else [])
            raise SummaryError(f"{cls.__name__}: the summary {' and '.join(problems)} (written by another version of trecflow?)")
        return cls(**{name: data[name] for name in known if name in data})


def summary_json(summary: Summary | Mapping[str, Any]) -> dict[str, Any]:
    """The JSON object of a summary (a typed one's `Summary.as_json`; an untyped one as it is)."""
    return summary.as_json() if isinstance(summary, Summary) else dict(summary)


def read_summary(summary_type: type[Summary] | None, data: Mapping[str, Any]) -> Any:
    """A summary as its stage's type (already typed: as it is; no type: the JSON dict)."""
    if summary_type is None or isinstance(data, summary_type):
        return data
    return summary_type.from_json(data)


@dataclass(frozen=True)
class Target:
    """What a run of the graph computes: a recipe, a curriculum variant (for variant-scoped
    stages) and the corpus split that packing and training read (``cpt``; the tiny base and the
    trained reference run the same graph on a derived recipe and the ``base`` / ``reference``
    split)."""

    recipe: Recipe
    variant: str | None = None
    split: str = "cpt"

    @property
    def label(self) -> str:
        """How events name the target: ``recipe``, ``recipe/variant`` or ``recipe[split]``."""
        name = self.recipe.name + (f"/{self.variant}" if self.variant else "")
        return name if self.split == "cpt" else f"{name}[{self.split}]"


S = TypeVar("S", bound="Summary | Mapping[str, Any]")


@dataclass(frozen=True)
class StageResult(Generic[S]):
    """One stage's output: where it is, what it read, its summary, and whether this run reused it.

    ``inputs`` are the fingerprints recorded in the manifest (what a reader checks it against);
    ``uri`` is None for a stage that stores nothing (it was resolved, not computed)."""

    stage: str
    fingerprint: str
    uri: str | None
    summary: S
    reused: bool
    inputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON view the CLI and flows return: ``fingerprint``, ``uri``, ``reused`` and the summary."""
        return {"fingerprint": self.fingerprint, "uri": self.uri, "reused": self.reused, **summary_json(self.summary)}

    @classmethod
    def from_dict(cls, stage: str, data: Mapping[str, Any], summary_type: type[Summary] | None) -> StageResult:
        """A result back from its `as_dict` view (what a flow returns), the summary typed."""
        data = dict(data)
        uri, reused = data.pop("uri"), data.pop("reused")
        keeps_fingerprint = summary_type is not None and "fingerprint" in {item.name for item in dataclasses.fields(summary_type.concrete(data))}
        fingerprint = data["fingerprint"] if keeps_fingerprint else data.pop("fingerprint")
        return cls(stage, fingerprint, uri, read_summary(summary_type, data), reused)


@dataclass
class StageContext:
    """What a running stage may use besides its inputs: the store, a progress callback, whether it
    was forced, the tracking run it reports to (if any) and the runner (for derived runs)."""

    store: Store
    progress: Progress  # progress("note"), progress.advance(done, total, unit, message)
    force: bool = False
    tracking_run_id: str | None = None
    runner: Any = None


class Stage(Generic[S]):
    """Base class of every stage declaration (see the module docstring). A stage declares itself in
    its class statement: ``class PackStage(Stage[PackSummary], name="pack", version=2, inputs=("score", "tokenizer"),
    sections=("corpus", "tokenizer"), title="Packed sequences", task_name="pack_sequences", summary_type=PackSummary)``."""

    name: ClassVar[str]
    version: ClassVar[int] = 1
    inputs: ClassVar[tuple[str, ...]] = ()
    scope: ClassVar[str] = RECIPE_SCOPE
    sections: ClassVar[tuple[str, ...]] = ()  # recipe sections the stage needs
    title: ClassVar[str] = ""  # what reports call it
    task_name: ClassVar[str] = ""  # its Prefect task
    purpose: ClassVar[str] = ""  # how errors name what it does ("placement needs corpus, tokenizer sections")
    figure: ClassVar[str | None] = None  # an output file (PNG) reports show with the rows
    resumable: ClassVar[bool] = False  # an incomplete output is continued, not cleared, when not forced
    ray: ClassVar[bool] = False  # its work runs on Ray: on a cluster, as a Ray job (`trecflow.ray_jobs`)
    summary_type: ClassVar[type[Summary] | None] = None  # what `run` returns and summary.json holds (None: a plain JSON dict)

    def __init_subclass__(cls, **declaration: Any) -> None:
        super().__init_subclass__()
        unknown = [key for key in declaration if key not in Stage.__annotations__]
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown stage declaration {unknown} (known: {', '.join(Stage.__annotations__)})")
        summary_type = declaration.get("summary_type")
        if summary_type is not None and not (isinstance(summary_type, type) and issubclass(summary_type, Summary)):
            raise TypeError(f"{cls.__name__}: summary_type must be a Summary subclass, not {summary_type!r}")
        for key, value in declaration.items():
            setattr(cls, key, value)

    def applies(self, target: Target) -> bool:
        """True when the recipe has every section the stage needs."""
        return all(getattr(target.recipe, section) is not None for section in self.sections)

    def requirement(self, target: Target, source: str) -> str | None:
        """One line naming the first section the stage needs and the recipe (``source``) lacks, else
        its `refusal`, else None."""
        missing = self.missing(target)
        if not missing:
            refusal = self.refusal(target)
            return None if refusal is None else f"{source}: {refusal}"
        return f"{source}: {missing[0]}: {self.purpose or f'the {self.name} stage'} needs {', '.join(self.sections)} sections"

    def refusal(self, target: Target) -> str | None:
        """One line saying why the stage will not run ``target`` although the recipe has the
        sections it needs (the recipe asks for work the stage does not do yet), else None. A run
        never silently does less than asked: `requirement`, `Graph.check_runnable` and
        `Graph.check_refusals` report it before any work, and the runner raises it as a
        `RecipeError` before it fingerprints the stage."""
        return None

    def required_inputs(self, target: Target) -> tuple[str, ...]:
        """The inputs this target cannot run without (default: all of them); the others are optional."""
        return self.inputs

    def missing(self, target: Target) -> list[str]:
        """The recipe sections the stage needs and the recipe lacks."""
        return [section for section in self.sections if getattr(target.recipe, section) is None]

    def fingerprint(self, target: Target, upstream: Mapping[str, StageResult], store: Store) -> str:
        raise NotImplementedError

    def resolve(self, target: Target, upstream: Mapping[str, StageResult], store: Store, fingerprint: str) -> StageResult | None:
        """The result of a stage that has nothing to compute for this target, else None."""
        return None

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> S:
        raise NotImplementedError

    def view(self, target: Target, summary: S) -> S:
        """The summary as this target sees it (a variant's name on a shared index)."""
        return summary

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        """The fingerprints the manifest records (default: each upstream stage's)."""
        return {name: result.fingerprint for name, result in upstream.items()}

    def counts(self, summary: S) -> dict[str, Any]:
        """The manifest's counts."""
        return {}

    def clear(self, target: Target, fingerprint: str, store: Store) -> None:
        """Remove what a forced run must not reuse outside the output folder (checkpoints)."""

    def rows(self, summary: S) -> list[tuple[str, str]]:
        """The summary as (quantity, value) rows for people."""
        return []

    def metrics(self, summary: S) -> dict[str, float]:
        """The summary's MLflow metrics."""
        return {}

    def tags(self, summary: S) -> dict[str, str]:
        """MLflow tags besides the fingerprint."""
        return {}

    def artifacts(self, summary: S) -> list[str]:
        """Files of the output logged as MLflow artifacts (under the stage's name)."""
        return []
