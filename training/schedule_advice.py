"""Schedule advice: what published studies (and trecflow's own) found about a recipe's LR schedule, batch and
curriculum, as advice with its source (never an error; `trecflow predict` and `trecflow plan`
print it).

Each rule looks at the recipe (and its TPP) and says something only when the finding applies:

- decay to zero vs a 10x floor: Bergsma et al., *Straight to Zero* (arXiv 2502.15938) — linear
  decay to zero beat decay to 10% of the peak, by more at higher TPP.
- WSD's cooldown length and shape: Hägele et al., *Scaling Laws and Compute-Optimal Training
  Beyond Fixed Training Durations* (arXiv 2405.18392) — a cooldown of ~20% of training matched
  cosine, and a 1-sqrt cooldown beat a linear one; Luo et al.'s multi-power law (arXiv
  2503.12811, `trecflow forecast`) forecasts a given cooldown before training it.
- a moderate final LR for ascending curricula: Luo et al., *How Learning Rate Decay Wastes Your
  Best Data* (arXiv 2511.18903) — with the best data at the end, decaying to ~0 wastes it; a final
  LR of about 1/3 of the peak (and averaging the last checkpoints) recovers the curriculum's gain.
  Each late variant is judged on its own schedule.
- the averaging span of a late variant: trecflow's own study of that paper's variants — an average
  whose oldest snapshot precedes the variant's high-quality stretch mixes in weights that never saw
  that data.
- the batch-size trend and tau: Bergsma et al., *Power Lines* (arXiv 2505.13738) — the optimal
  batch grows with the token budget as D^0.383 and the optimal tau falls as TPP^-0.527 (the
  predictor's own tau warning covers a tau far from it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from trecflow.recipe import Recipe

STRAIGHT_TO_ZERO = "Bergsma et al., Straight to Zero (arXiv 2502.15938)"
WSD_SCALING = "Hägele et al., Scaling Laws and Compute-Optimal Training Beyond Fixed Training Durations (arXiv 2405.18392)"
MULTI_POWER_LAW = "Luo et al., A Multi-Power Law for Loss Curve Prediction (arXiv 2503.12811)"
DECAY_WASTES_DATA = "Luo et al., How Learning Rate Decay Wastes Your Best Data (arXiv 2511.18903)"
POWER_LINES = "Bergsma et al., Power Lines (arXiv 2505.13738)"
OWN_STUDY = "trecflow's three-seed study of arXiv 2511.18903's variants (docs/results.md, 2026-12-02)"

BATCH_EXPONENT = 0.383  # Power Lines: B_opt grows as D^0.383
MODERATE_FINAL_RATIO = 1.0 / 3.0  # 2511.18903: final LR about 1/3 of the peak for ascending curricula
LATE_STRATEGIES = ("end", "ascending")  # variants that put the best data at the end of training
COMPUTE_OPTIMAL_TPP = 20.0  # Chinchilla's tokens per parameter, the reference point of these studies


def tpp_note(tpp: float) -> str:
    """Where the recipe's TPP sits against the compute-optimal ~20 the studies vary around."""
    where = "above" if tpp > COMPUTE_OPTIMAL_TPP else "below"
    return f"this recipe's TPP is {tpp:.3g}, {where} the compute-optimal ~{COMPUTE_OPTIMAL_TPP:g}, so expect a {'larger' if where == 'above' else 'smaller'} gap"


@dataclass(frozen=True)
class Advice:
    """One piece of advice: a short ``topic``, the ``text`` and the study it comes from."""

    topic: str
    text: str
    source: str

    def as_json(self) -> dict[str, str]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.topic}: {self.text} [{self.source}]"


def final_lr_ratio(recipe: Recipe, variant: str | None = None) -> float | None:
    """The last LR of the schedule ``variant`` trains on (its own, else the recipe's) as a fraction
    of the peak (None for kinds with no fixed end)."""
    schedule = recipe.for_variant(variant).schedule
    if schedule.kind in ("linear", "cosine"):
        return schedule.final_lr_ratio
    if schedule.kind == "step":
        return schedule.drop_factor
    if schedule.kind == "wsd":
        return schedule.final_lr_ratio
    if schedule.kind == "constant":
        return 1.0
    return None


def late_variants(recipe: Recipe) -> list[str]:
    """Declared variants whose strategy puts the high-quality data at the end of training."""
    return sorted(name for name, section in recipe.curriculum.variants.items() if section.strategy in LATE_STRATEGIES)


def hq_stretch_start(recipe: Recipe, variant: str) -> int:
    """The first step of the stretch where a late variant's high-quality data lies: the last
    ``hq_fraction`` of the steps (the variant's own share when it sets one)."""
    share = recipe.curriculum.variants[variant].params.get("hq_fraction", recipe.curriculum.hq_fraction)
    return recipe.steps - round(share * recipe.steps)


def averaging_before_best_data(recipe: Recipe) -> list[tuple[str, int, int]]:
    """Late variants that average snapshots taken before their high-quality stretch begins:
    (variant, oldest snapshot's step, the stretch's first step)."""
    from training.averaging import snapshot_steps  # numpy: kept out of the CLI's start-up

    found = []
    for name in late_variants(recipe):
        averaging = recipe.averaging(name)
        if averaging is None or averaging.checkpoints < 2:
            continue
        oldest = int(snapshot_steps(averaging, recipe.steps)[0])
        start = hq_stretch_start(recipe, name)
        if oldest < start:
            found.append((name, oldest, start))
    return found


def schedule_advice(recipe: Recipe) -> list[Advice]:
    """The advice that applies to ``recipe``, in a fixed order."""
    tpp = recipe.data.tokens / recipe.model.params
    schedule = recipe.schedule
    ratio = final_lr_ratio(recipe)
    advice: list[Advice] = []
    if schedule.kind in ("linear", "cosine") and ratio is not None and ratio >= 0.05:
        advice.append(Advice(
            "decay to zero",
            f"this {schedule.kind} schedule ends at {ratio:g} x peak; linear decay to zero beat a 10x floor, "
            f"by more at higher tokens per parameter ({tpp_note(tpp)})",
            STRAIGHT_TO_ZERO,
        ))
    if schedule.kind in ("step", "constant", "inverse_sqrt"):
        advice.append(Advice(
            "decay to zero",
            f"a {schedule.kind} schedule does not end at zero; linear decay to zero beat step, constant and 10x-floor "
            f"schedules, by more at higher tokens per parameter ({tpp_note(tpp)})",
            STRAIGHT_TO_ZERO,
        ))
    if schedule.kind == "wsd":
        if not 0.1 <= schedule.cooldown <= 0.3:
            advice.append(Advice(
                "WSD cooldown",
                f"the cooldown is {schedule.cooldown:g} of training; about 0.2 matched a cosine schedule, and longer "
                f"cooldowns helped less per step; `trecflow forecast` predicts a given cooldown's loss",
                WSD_SCALING,
            ))
        if schedule.cooldown_shape == "linear":
            advice.append(Advice(
                "WSD cooldown shape",
                "a 1-sqrt cooldown (schedule.cooldown_shape: 1-sqrt) beat a linear one at the same length",
                WSD_SCALING,
            ))
    wasted = [(name, final_lr_ratio(recipe, name)) for name in late_variants(recipe)]
    wasted = [(name, end) for name, end in wasted if end is not None and end < MODERATE_FINAL_RATIO * 0.75]
    if wasted:
        ends = ", ".join(f"{name} ({end:g} x peak)" for name, end in wasted)
        advice.append(Advice(
            "ascending curricula",
            f"variant(s) {ends} put the best data at the end, where the LR is that low; "
            f"a final LR of about 1/3 of the peak (and averaging the last checkpoints) kept the curriculum's gain",
            DECAY_WASTES_DATA,
        ))
    for name, oldest, start in averaging_before_best_data(recipe):
        advice.append(Advice(
            "averaging span",
            f"variant {name} averages snapshots from step {oldest} on, but its best data starts at step {start} "
            f"(the last hq_fraction of training): the average mixes in weights that never saw it; keep "
            f"(checkpoints - 1) x every well below {recipe.steps - start} steps. On the study recipe an EMA reaching back "
            f"twice the HQ stretch lost 0.13-0.17 nats of HQ loss against the raw final model, and one inside it 0.06-0.08",
            OWN_STUDY,
        ))
    advice.append(Advice(
        "batch size",
        f"the optimal batch grew with the token budget as D^{BATCH_EXPONENT} (2x tokens: {2 ** BATCH_EXPONENT:.2f}x batch); "
        f"when you change the batch, keep tau = 1/(peak_lr * weight_decay * steps) by rescaling the weight decay",
        POWER_LINES,
    ))
    return advice
