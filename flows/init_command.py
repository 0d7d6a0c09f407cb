"""``trecflow init``: write a starter recipe from a base checkpoint and corpus locations.

A plain Typer command function; the CLI registers it with ``app.command("init")(init)``. The
recipe itself comes from `trecflow.starter.starter_recipe`; this module only names the file,
refuses to overwrite one, writes it and says what it wrote. Bad input: one line on stderr, exit 2,
before anything is written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Optional

import typer


def default_name(base: str, out: Path | None) -> str:
    """The recipe's name when ``--name`` is not given: the stem of ``--out``, else ``cpt-`` and
    the base folder's name (its parent's when the folder is called ``model``)."""
    if out is not None and str(out) != "-":
        stem = out.name.removesuffix(".yaml").removesuffix(".yml")
    else:
        parts = [part for part in re.split(r"[/:]", base) if part]
        while len(parts) > 1 and parts[-1].lower() in ("model", "models", "checkpoint"):
            parts.pop()
        stem = f"cpt-{parts[-1] if parts else 'base'}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "starter"


def init(
    base: Annotated[str, typer.Option("--base", help="the base checkpoint: a Hugging Face causal-LM folder (local or an fsspec URL)", show_default=False)],
    corpus: Annotated[list[str], typer.Option("--corpus", help="a corpus folder, file or glob, local or an fsspec URL; one source each (repeatable)", show_default=False)],
    name: Annotated[Optional[str], typer.Option(help="the recipe's name (default: the stem of --out, else cpt-<base folder>)")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="where to write the recipe (default: NAME.yaml; - for stdout)")] = None,
    force: Annotated[bool, typer.Option(help="overwrite --out if it exists")] = False,
) -> None:
    """Write a starter recipe for continuing the --base checkpoint on the --corpus sources: model
    size, tokenizer, token budget and optimizer from the checkpoint and the corpus listing. It
    validates and runs (ingest, score) as written; the values marked ASSUMPTION and CHOOSE are
    yours to check."""
    from flows.cli import fail
    from trecflow.settings import store_endpoint
    from trecflow.starter import StarterError, starter_recipe

    name = name or default_name(base, out)
    path = out if out is not None else Path(f"{name}.yaml")
    to_stdout = str(path) == "-"
    if not to_stdout and path.exists() and not force:
        raise fail(f"--out: {path} exists (--force overwrites it)")
    try:
        text = starter_recipe(base, corpus, name, endpoint_url=store_endpoint())
    except StarterError as error:
        raise fail(str(error)) from None
    if to_stdout:
        typer.echo(text, nl=False)
        return
    try:
        path.write_text(text)
    except OSError as error:
        raise fail(f"--out: cannot write {path} ({error.strerror})") from None
    typer.echo(f"wrote {path}")
    typer.echo(summary(text))
    typer.echo(f"next: check the values marked ASSUMPTION and CHOOSE, then trecflow validate {path} && trecflow score {path}")


def summary(text: str) -> str:
    """The written recipe's main numbers, one aligned row each."""
    from trecflow.recipe import parse_recipe, read_yaml
    from trecflow.report import aligned

    recipe = parse_recipe(read_yaml(text))
    sources = ", ".join(source.name for source in recipe.corpus.sources)
    splits = ", ".join(f"{split} {share:g}" for split, share in recipe.corpus.splits.items())
    return aligned([
        ("recipe", recipe.name),
        ("model", f"{recipe.model.params:,} parameters; tokenizer and weights from {recipe.base.path}"),
        ("corpus", f"{len(recipe.corpus.sources)} source{'s' if len(recipe.corpus.sources) != 1 else ''}: {sources} (splits {splits})"),
        ("run", f"{recipe.steps:,} steps of {recipe.batch.tokens:,} tokens ({recipe.sequences_per_step} x {recipe.data.seq_len}), "
                f"{recipe.data.tokens:,} tokens"),
        ("optimizer", f"peak LR {recipe.optimizer.peak_lr:g}, weight decay {recipe.optimizer.weight_decay:g}, {recipe.schedule.kind} schedule"),
        ("scoring", ", ".join(recipe.scoring.scorers) + ("" if recipe.scoring.classifier else " (the classifier is yours to choose: see CHOOSE)")),
    ])
