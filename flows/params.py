"""The typed parameters of the flows: what the Prefect UI shows as a form and validates.

A deployment's parameters are one of these models, so a stage name or a missing recipe path is
refused by Prefect's schema check before a flow run starts.
"""

from __future__ import annotations

from enum import Enum

from pydantic import BaseModel, Field


class Stage(str, Enum):
    """The pipeline's stages, in order (see ``flows.pipeline.STAGE_INPUTS``)."""

    score = "score"
    predict = "predict"
    tokenizer = "tokenizer"
    pack = "pack"
    place = "place"
    train = "train"
    reevaluate = "reevaluate"


class PipelineRun(BaseModel):
    """One run of ``cpt_pipeline``: a recipe, one curriculum variant, stages to recompute."""

    recipe_path: str = Field("configs/demo.yaml", description="recipe YAML, relative to the project root or absolute")
    variant: str | None = Field(None, description="curriculum variant (default: the recipe's first)")
    force: list[Stage] = Field(default_factory=list, description="recompute these stages and everything downstream")
    retries: int = Field(2, ge=0, description="retries of each stage task after a failure (bad input is never retried)")
    mlflow_parent_run_id: str | None = Field(None, description="MLflow run to nest this run under (compare_curricula sets it)")


class Comparison(BaseModel):
    """One run of ``compare_curricula``: a recipe and the variants to compare."""

    recipe_path: str = Field("configs/demo.yaml", description="recipe YAML, relative to the project root or absolute")
    variants: list[str] = Field(default_factory=list, description="variants to compare (default: all of the recipe's)")
    concurrent: bool | None = Field(None, description="run the variants at once (default: only on a Ray cluster, RAY_ADDRESS set)")
