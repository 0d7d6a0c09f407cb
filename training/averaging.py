"""Checkpoint averaging: which snapshots, their weights, the EMA coefficients of the averaged model
as the TREC predictor sees it (docs/trec-math.md, "Averaged checkpoints"), and `SnapshotAverage`,
the running sum the training job keeps to deliver that model.

The snapshot after step k holds theta_k = prod_{s<=k}(1 - alpha_s) * theta_0 + sum_{t<=k} c_t(k) x_t,
with c_t(k) = alpha_t * prod_{t<s<=k}(1 - alpha_s) for t <= k and 0 after k: the predictor's EMA
recursion run only up to k. An average of snapshots with weights w_j is an average of their
weights, so its coefficients are sum_j w_j c(k_j) and its weight on theta_0 is
sum_j w_j prod_{s<=k_j}(1 - alpha_s). Everything is vectorised numpy: K x T numbers, no loop over
steps (K snapshots, T steps).

Conventions (every array oldest snapshot first):
- snapshot j of K is taken after step T - 1 - (K - 1 - j) * S, so the newest is after the last step;
- ``sma`` weights are 1/K; ``ema`` folds snapshots in from the oldest, theta <- (1 - A) theta + A theta_k,
  which gives the newest A, the i-th newest A (1 - A)^(i-1) and the oldest (1 - A)^(K-1).
"""

from __future__ import annotations

import numpy as np

from trecflow.recipe import AveragingSection
from training.schedules import decay_rates


def snapshot_steps(averaging: AveragingSection, steps: int) -> np.ndarray:
    """The step after which each snapshot is taken, oldest first (the last is ``steps - 1``).
    ValueError when the oldest would precede step 0 (the recipe refuses such an averaging)."""
    span = (averaging.checkpoints - 1) * averaging.every
    if span >= steps:
        raise ValueError(f"averaging: {averaging.checkpoints} checkpoints {averaging.every} steps apart do not fit in {steps} steps")
    return steps - 1 - span + averaging.every * np.arange(averaging.checkpoints, dtype=np.int64)


def averaging_weights(averaging: AveragingSection) -> np.ndarray:
    """Each snapshot's weight in the average, oldest first; they sum to 1."""
    count = averaging.checkpoints
    if averaging.kind == "sma":
        return np.full(count, 1.0 / count)
    alpha = float(averaging.alpha)
    newer = np.arange(count - 1, -1, -1, dtype=np.float64)  # snapshots newer than each one: K-1 for the oldest .. 0
    weights = alpha * (1.0 - alpha) ** newer
    weights[0] = (1.0 - alpha) ** (count - 1)  # the oldest starts the fold: only the later (1 - A) factors shrink it
    return weights


def checkpoint_coefficients(lrs: np.ndarray, weight_decay: float, snapshots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The EMA coefficients of every snapshot, as a K x T matrix (row j: c_t(k_j), zero for t > k_j),
    and each snapshot's weight on the initial weights (K values).

    Row j equals `training.trec.ema_coefficients` of ``lrs[:k_j + 1]`` padded with zeros. Computed as
    exp(L_k - L_t) with L the inclusive cumulative sum of log1p(-alpha): every exponent is <= 0,
    so nothing overflows however long the run."""
    alpha = decay_rates(lrs, weight_decay)
    snapshots = np.asarray(snapshots, dtype=np.int64)
    if snapshots.size == 0 or snapshots.min() < 0 or snapshots.max() >= alpha.size:
        raise ValueError(f"snapshot steps must lie in 0..{alpha.size - 1}, got {snapshots.tolist()}")
    inclusive = np.cumsum(np.log1p(-alpha))
    exponent = inclusive[snapshots][:, None] - inclusive[None, :]  # L_k - L_t: <= 0 where t <= k
    after = np.arange(alpha.size)[None, :] > snapshots[:, None]
    coefficients = np.where(after, 0.0, alpha[None, :] * np.exp(np.where(after, 0.0, exponent)))
    return coefficients, np.exp(inclusive[snapshots])


def averaged_coefficients(lrs: np.ndarray, weight_decay: float, averaging: AveragingSection) -> tuple[np.ndarray, float]:
    """The averaged model's EMA coefficient of every step and its weight on the initial weights:
    the averaging weights applied to `checkpoint_coefficients`. They sum to 1 up to rounding, as
    the final model's do."""
    lrs = np.asarray(lrs, dtype=np.float64)
    weights = averaging_weights(averaging)
    per_snapshot, initial = checkpoint_coefficients(lrs, weight_decay, snapshot_steps(averaging, lrs.size))
    return weights @ per_snapshot, float(weights @ initial)


class SnapshotAverage:
    """The averaged model a training run delivers, built while it trains: after each snapshot step
    k_j the current weights are added with their weight w_j (`averaging_weights`), so after the
    last snapshot the sums are sum_j w_j theta_{k_j} — the SMA, or the EMA fold from the oldest,
    which expands to the same weighted sum. One model-sized buffer (float32, or float64 for float64
    weights) holds the sums; nothing is kept per snapshot. `state` / `restore` carry the sums and
    the steps folded so far through a checkpoint, so a resumed run delivers the same average."""

    def __init__(self, snapshots, weights):
        self.weights = {int(step): float(weight) for step, weight in zip(snapshots, weights, strict=True)}
        self.folded: list[int] = []
        self.sums: dict = {}

    def wants(self, step: int) -> bool:
        """Whether the weights after ``step`` are a snapshot not folded in yet."""
        return step in self.weights and step not in self.folded

    def fold(self, step: int, named_tensors) -> None:
        """Add the weights after ``step`` (``(name, tensor)`` pairs) with the snapshot's weight."""
        import torch

        if not self.wants(step):
            raise ValueError(f"step {step} is not a snapshot still to fold (snapshots {sorted(self.weights)}, folded {self.folded})")
        weight = self.weights[step]
        for name, tensor in named_tensors:
            value = tensor.detach().to("cpu")
            dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
            total = self.sums.get(name)
            if total is None:
                total = self.sums[name] = torch.zeros(value.shape, dtype=dtype)
            total.add_(value.to(dtype), alpha=weight)
        self.folded.append(step)

    @property
    def complete(self) -> bool:
        return len(self.folded) == len(self.weights)

    def state(self) -> dict:
        return {"folded": list(self.folded), "sums": self.sums}

    def restore(self, state: dict, next_step: int) -> None:
        """Take a checkpoint's state; ValueError unless it folded exactly the snapshots before
        ``next_step`` (the step the resumed run starts at)."""
        expected = sorted(step for step in self.weights if step < next_step)
        if sorted(state["folded"]) != expected:
            raise ValueError(f"the checkpoint's average folded the snapshots {sorted(state['folded'])}, "
                             f"but a run resuming at step {next_step} needs exactly {expected}")
        self.folded, self.sums = list(state["folded"]), state["sums"]
