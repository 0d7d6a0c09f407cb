"""docs/recipe.md is generated from the recipe models and stays in step with them; every field of
every recipe model says what it does."""

from __future__ import annotations

import subprocess
import sys

from pydantic import BaseModel

from trecflow import recipe, recipe_docs

from ..conftest import ROOT


def _recipe_models() -> list[type[BaseModel]]:
    """Every pydantic model defined in trecflow/recipe.py (the sections and the Recipe)."""
    return [
        value
        for value in vars(recipe).values()
        if isinstance(value, type) and issubclass(value, BaseModel) and value.__module__ == recipe.__name__
    ]


def test_docs_recipe_md_is_up_to_date():
    path = ROOT / "docs" / "recipe.md"
    assert path.exists(), f"docs/recipe.md is missing: generate it with `{recipe_docs.COMMAND}`"
    assert path.read_text() == recipe_docs.render(), (
        f"docs/recipe.md differs from the recipe models: regenerate it with `{recipe_docs.COMMAND}`"
    )


def test_every_field_has_a_description():
    missing = [
        f"{model.__name__}.{name}"
        for model in _recipe_models()
        for name, field in model.model_fields.items()
        if not (field.description or "").strip()
    ]
    assert len(_recipe_models()) >= 20
    assert not missing, f"fields without a description: {', '.join(missing)}"


def test_every_section_and_field_is_rendered():
    text = recipe_docs.render()
    for path in ("`model`", "`schedule`", "`scoring.rules`", "`corpus.sources[]`", "`curriculum.variants.<name>`",
                 "`base.pretrain`", "`training`", "`reevaluation`"):
        assert f"## {path}" in text, path
    for model in _recipe_models():
        if model.__name__.startswith("_"):
            continue
        for name in model.model_fields:
            assert f"| `{name}` |" in text, f"{model.__name__}.{name}"
    # the reused optimizer/schedule sections of base.pretrain point at the top-level ones
    assert "| `optimizer` | section `optimizer` | required |" in text
    # declaration order: sections appear as the Recipe declares them
    order = [text.index(f"## `{name}`") for name in recipe.Recipe.model_fields if f"## `{name}`" in text]
    assert order == sorted(order)


def test_check_flag_and_no_heavy_imports(tmp_path):
    """`--check` passes on the committed file; the module imports none of Prefect, Ray, torch, MLflow."""
    code = (
        "import sys, trecflow.recipe_docs as d; code = d.main(['--check']);"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in {'prefect', 'ray', 'torch', 'mlflow'});"
        "print(heavy); sys.exit(code or (1 if heavy else 0))"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == "[]"


def test_check_reports_a_stale_file_in_one_line(monkeypatch, tmp_path, capsys):
    stale = tmp_path / "recipe.md"
    stale.write_text("# Recipe reference\n\nstale\n")
    monkeypatch.setattr(recipe_docs, "DOC_PATH", stale)
    assert recipe_docs.main(["--check"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and recipe_docs.COMMAND in err[0], err
