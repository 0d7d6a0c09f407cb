"""The typed parameters of the flows: what the Prefect UI shows as a form and validates.

A deployment's parameters are one of these models, so a stage name or a missing recipe path is
refused by Prefect's schema check before a flow run starts. The stage choices come from the graph
(`tasks.graph.STAGE_NAMES`).
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field

from tasks.graph import STAGE_NAMES

# Compared when a comparison names none and the recipe declares none.
DEFAULT_VARIANTS = ("uniform", "end", "trec_valley")


def default_variant(recipe) -> str:
    """The recipe's first declared variant, else ``trec_valley``."""
    return next(iter(recipe.curriculum.variants), "trec_valley")

Stage = Enum("Stage", {name: name for name in STAGE_NAMES}, type=str, module=__name__)
Stage.__doc__ = "The pipeline's stages, in the graph's order (`tasks.graph.STAGES`)."


class RecipeSource(BaseModel):
    """A recipe file, the overlay files merged into it in order, and ``--set`` edits after them."""

    recipe_path: str = Field("configs/demo.yaml", description="recipe YAML, relative to the project root or absolute")
    overlays: list[str] = Field(default_factory=list, description="overlay YAML files merged into the recipe in order (e.g. configs/overlays/smoke.yaml)")
    set: list[str] = Field(default_factory=list, description="KEY.PATH=VALUE edits applied after the overlays (e.g. training.workers=2)")


class PipelineRun(RecipeSource):
    """One run of ``cpt_pipeline``: a recipe, one curriculum variant, stages to recompute."""

    variant: str | None = Field(None, description="curriculum variant (default: the recipe's first)")
    force: list[Stage] = Field(default_factory=list, description="recompute these stages and everything downstream")
    until: Stage | None = Field(None, description="run only the stages this one needs, and it (default: every stage)")
    retries: int = Field(2, ge=0, description="retries of each stage task after a failure (bad input is never retried)")
    mlflow_parent_run_id: str | None = Field(None, description="MLflow run to nest this run under (compare_curricula sets it)")


class StageRun(RecipeSource):
    """One stage and the cached stages it needs (``trecflow score|place|train|reevaluate|base``)."""

    stage: Stage = Field(description="the stage to run")
    variant: str | None = Field(None, description="curriculum variant, for variant-scoped stages (default: the recipe's first)")
    force: bool = Field(False, description="recompute the stage even if its output exists")
    retries: int = Field(2, ge=0, description="retries of each stage task after a failure")


class Comparison(RecipeSource):
    """One run of ``compare_curricula``: a recipe and the variants to compare."""

    variants: list[str] = Field(default_factory=list, description="variants to compare (default: all of the recipe's)")
    concurrent: bool | None = Field(None, description="run the variants at once (default: only on a Ray cluster, RAY_ADDRESS set, or with max_concurrent above 1)")
    max_concurrent: int | None = Field(
        None, ge=1,
        description="at most this many variants at once when concurrent (default: as many trainings as the local Ray's CPUs hold at once; on a cluster every variant)",
    )
