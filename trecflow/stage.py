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

A stage with nothing to compute (a base model given as a path, the base model as the reference)
returns its result from `resolve` instead, and is never run. Nothing here imports Prefect, Ray,
torch or MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

if TYPE_CHECKING:
    from trecflow.recipe import Recipe
    from trecflow.store import StageOutput, Store

SUMMARY_FILE = "summary.json"
RECIPE_SCOPE = "recipe"
VARIANT_SCOPE = "variant"


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


@dataclass(frozen=True)
class StageResult:
    """One stage's output: where it is, what it read, its summary, and whether this run reused it.

    ``inputs`` are the fingerprints recorded in the manifest (what a reader checks it against);
    ``uri`` is None for a stage that stores nothing (it was resolved, not computed)."""

    stage: str
    fingerprint: str
    uri: str | None
    summary: dict[str, Any]
    reused: bool
    inputs: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The JSON view the CLI and flows return: ``fingerprint``, ``uri``, ``reused`` and the summary."""
        return {"fingerprint": self.fingerprint, "uri": self.uri, "reused": self.reused, **self.summary}


@dataclass
class StageContext:
    """What a running stage may use besides its inputs: the store, a progress callback, whether it
    was forced, the tracking run it reports to (if any) and the runner (for derived runs)."""

    store: Store
    progress: Callable[[str], None]
    force: bool = False
    tracking_run_id: str | None = None
    runner: Any = None


class Stage:
    """Base class of every stage declaration (see the module docstring). A stage declares itself in
    its class statement: ``class PackStage(Stage, name="pack", version=2, inputs=("score", "tokenizer"),
    sections=("corpus", "tokenizer"), title="Packed sequences", task_name="pack_sequences")``."""

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

    def __init_subclass__(cls, **declaration: Any) -> None:
        super().__init_subclass__()
        unknown = [key for key in declaration if key not in Stage.__annotations__]
        if unknown:
            raise TypeError(f"{cls.__name__}: unknown stage declaration {unknown} (known: {', '.join(Stage.__annotations__)})")
        for key, value in declaration.items():
            setattr(cls, key, value)

    def applies(self, target: Target) -> bool:
        """True when the recipe has every section the stage needs."""
        return all(getattr(target.recipe, section) is not None for section in self.sections)

    def requirement(self, target: Target, source: str) -> str | None:
        """One line naming the first section the stage needs and the recipe (``source``) lacks, else None."""
        missing = self.missing(target)
        if not missing:
            return None
        return f"{source}: {missing[0]}: {self.purpose or f'the {self.name} stage'} needs {', '.join(self.sections)} sections"

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

    def run(self, target: Target, upstream: Mapping[str, StageResult], output: StageOutput, context: StageContext) -> dict[str, Any]:
        raise NotImplementedError

    def view(self, target: Target, summary: dict[str, Any]) -> dict[str, Any]:
        """The summary as this target sees it (a variant's name on a shared index)."""
        return summary

    def manifest_inputs(self, target: Target, upstream: Mapping[str, StageResult], fingerprint: str) -> dict[str, str]:
        """The fingerprints the manifest records (default: each upstream stage's)."""
        return {name: result.fingerprint for name, result in upstream.items()}

    def counts(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest's counts."""
        return {}

    def clear(self, target: Target, fingerprint: str, store: Store) -> None:
        """Remove what a forced run must not reuse outside the output folder (checkpoints)."""

    def rows(self, summary: Mapping[str, Any]) -> list[tuple[str, str]]:
        """The summary as (quantity, value) rows for people."""
        return []

    def metrics(self, summary: Mapping[str, Any]) -> dict[str, float]:
        """The summary's MLflow metrics."""
        return {}

    def tags(self, summary: Mapping[str, Any]) -> dict[str, str]:
        """MLflow tags besides the fingerprint."""
        return {}

    def artifacts(self, summary: Mapping[str, Any]) -> list[str]:
        """Files of the output logged as MLflow artifacts (under the stage's name)."""
        return []
