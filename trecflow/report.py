"""How results read for people: number and window cells, aligned text and markdown tables from
(quantity, value) rows, shared by the CLI's text, the Prefect artifacts and the comparison table."""

from __future__ import annotations

from typing import Any


def number(value: float | None, missing: str = "n/a") -> str:
    """A loss or correlation to 4 decimals, or ``missing`` where there is none."""
    return missing if value is None else f"{value:.4f}"


def window_text(window: tuple[float, float] | list[float] | None) -> str:
    """An HQ window as ``[start, end]`` (fractions of training), or what spreading the data means."""
    return "spread (none)" if window is None else f"[{window[0]:.3f}, {window[1]:.3f}]"


def reevaluation_rows(summary: Any) -> list[tuple[str, str]]:
    """Stage 5's summary (`tasks.reevaluate.ReevaluateSummary`) as (quantity, value) rows:
    agreement, valley, held-out losses, sampling."""
    reference = summary.reference
    rows = [
        ("steps evaluated", f"{summary.steps_evaluated:,} of {summary.steps:,} ({summary.sequences_per_step} sequences each)"),
        ("reference", "none" if reference is None else f"{reference.kind} ({reference.from_cache:,} of {reference.sequences:,} losses cached)"),
    ]
    if reference is not None and reference.beta is not None:
        how = "fitted on the other half of the steps" if reference.beta_fitted else "fixed"
        rows.append(("beta", f"{', '.join(f'{beta:.3f}' for beta in reference.beta)} ({how})"))
    if getattr(summary, "noise_raw", None) is not None:
        rows.append(("noise (nats)", f"raw {number(summary.noise_raw)}" + ("" if summary.noise_corrected is None else f", corrected {number(summary.noise_corrected)}")))
    rows += [
        ("r_p", f"{number(summary.trec_pearson)} ({summary.curve} curve, m = {summary.m:g})"),
        ("r_p raw", number(summary.trec_pearson_raw)),
        ("r_p with m = 0", number(summary.trec_pearson_m0)),
        ("r_p with the best m", f"{number(summary.trec_pearson_fit)} (m_fit = {summary.m_fit:g})"),
        ("valley", f"measured {number(summary.trec_valley_measured)}, predicted {number(summary.trec_valley_predicted)}, "
                   f"error {number(summary.trec_valley_error)}"),
        ("val_loss_hq", number(summary.val_loss_hq)),
        ("val_loss_general", number(summary.val_loss_general)),
    ]
    rows += [(f"  val_loss {source}", number(loss)) for source, loss in summary.val_loss_by_source.items()]
    final = getattr(summary, "final_model", None)
    if final is not None:  # the model evaluated is an average of checkpoints: the raw final model beside it
        rows += [
            ("raw final model", final.model_uri),
            ("  its val_loss_hq / general", f"{number(final.val_loss_hq)} / {number(final.val_loss_general)}"),
            ("  r_p vs its prediction", f"{number(final.trec_pearson)} (valley {number(final.trec_valley_predicted)}; the average's prediction: "
                                        f"{number(summary.trec_pearson)})"),
        ]
    for name, entry in (summary.sampling_study or {}).items():
        rows.append((f"r_p {name.replace('_', ' ')}", ", ".join(f"{kind} {number(value)}" for kind, value in entry.items())))
    rows.append(("content-confounded", "yes: the tier mix moves in time; not used for calibration" if summary.content_confounded else "no"))
    if summary.retried_units:
        rows.append(("retried units", f"{summary.retried_units:,} (an actor died; their steps were evaluated again)"))
    return rows


def aligned(rows: list[tuple[str, str]]) -> str:
    """(quantity, value) rows as text, the values in one column."""
    if not rows:
        return ""
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key:<{width}}  {value}" for key, value in rows)


def markdown_table(title: str, rows: list[tuple[str, str]]) -> str:
    """A markdown section: a title and a quantity/value table."""
    table = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return f"# {title}\n\n| quantity | value |\n|---|---|\n{table}\n"
