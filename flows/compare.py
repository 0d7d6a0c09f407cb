"""The ``compare_curricula`` flow: `cpt_pipeline` for several variants of one recipe, then one
MLflow comparison run with the variants' runs nested under it.

Variants share the cached stages (scoring, prediction, tokenizer, packing, the base model), so only
placement, training and re-evaluation run per variant. On one machine the variants run one after
another.
"""

from __future__ import annotations

from typing import Any

from trecflow.settings import ensure_home

ensure_home()  # before the ephemeral Prefect server opens its database there

from prefect import flow, get_run_logger  # noqa: E402

from flows.params import Comparison, PipelineRun
from flows.pipeline import cpt_pipeline, tracked_run
from trecflow.recipe import RecipeError, load_recipe
from trecflow.settings import store_endpoint, store_url
from trecflow.store import Store


def compared_variants(comparison: Comparison, declared: list[str]) -> list[str]:
    """The variants to run: the requested ones (each declared, no repeats) or all declared."""
    names = comparison.variants or declared
    unknown = [name for name in names if name not in declared]
    if unknown:
        raise RecipeError(f"variants: unknown {', '.join(map(repr, unknown))} (declared: {', '.join(declared)})")
    if len(set(names)) != len(names):
        raise RecipeError(f"variants: repeated names in {names}")
    return list(names)


@flow(name="compare_curricula")
def compare_curricula(comparison: Comparison) -> dict[str, Any]:
    """Run ``cpt_pipeline`` for each variant under one MLflow comparison run."""
    logger = get_run_logger()
    recipe = load_recipe(comparison.recipe_path)
    variants = compared_variants(comparison, list(recipe.curriculum.variants))
    store = Store(store_url(recipe), store_endpoint(recipe))
    tags = {"trecflow.kind": "compare", "trecflow.recipe_path": comparison.recipe_path, "trecflow.variants": ",".join(variants)}
    outcomes: dict[str, Any] = {}
    with tracked_run(store, recipe, f"compare-{recipe.name}", tags) as (tracker, parent_id):
        for variant in variants:
            logger.info("variant %s (%d of %d)", variant, len(outcomes) + 1, len(variants))
            run = PipelineRun(recipe_path=comparison.recipe_path, variant=variant, mlflow_parent_run_id=parent_id)
            outcomes[variant] = cpt_pipeline(run)
    return {"recipe": recipe.name, "store": store.url, "mlflow_run_id": parent_id, "variants": outcomes}
