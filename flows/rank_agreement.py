"""How well small proxies rank data recipes, at the recipe's LR and at a reduced LR,
against the ranking of a model with 4x the proxy's parameters at the full LR (arXiv 2512.24503).

Three `flows.rank.rank_recipes` runs of configs/demo.yaml on the same candidate overlays (default
every file in configs/rank/candidates/): the proxy (configs/rank/proxy.yaml, 0.66M parameters) at
``--lr-scale`` (default 0.01) and at 1, and the target (configs/rank/target.yaml, 2.6M) at 1. Each
ranks on ``val_loss_general`` of its recipe's held-out set (proxy and target share it: same corpus,
scoring, tokenizer and token budget). Printed: each candidate's metric and rank under the three
runs; Spearman's rho (scipy) of each proxy ranking against the target's, with its one-sided p-value
(exact: the share of all orderings that agree at least as well); each run's spread (worst minus
best metric); the
top-1 regret (the target's metric of the proxy's first pick minus the best target metric); each
run's wall time and its proxies' training and re-evaluation seconds. ``--json`` writes the same.

Runs in ``$TRECFLOW_HOME`` (set it to a private folder: its store, MLflow database and Prefect
home), one after another, every cached stage reused: a rerun recomputes nothing. The demo corpus
is fetched into ``$TRECFLOW_HOME/corpus/demo`` when missing (Debian and npm registries)::

    TRECFLOW_HOME=/tmp/rank-home nice -n 5 python -m flows.rank_agreement --json /tmp/rank-proxies.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "configs" / "demo.yaml"
PROXY = ROOT / "configs" / "rank" / "proxy.yaml"
TARGET = ROOT / "configs" / "rank" / "target.yaml"
CANDIDATES = ROOT / "configs" / "rank" / "candidates"
METRIC = "val_loss_general"
EXACT_UP_TO = 8  # candidates; 8! = 40,320 orderings


def spearman(proxy: dict[str, float], target: dict[str, float]) -> tuple[float, float]:
    """Spearman's rho of two candidates -> metric maps (scipy; ties averaged) and its one-sided
    p-value: the share of the proxy's orderings that agree with the target's at least as well,
    counted over every ordering up to `EXACT_UP_TO` candidates (scipy's t approximation beyond)."""
    from scipy.stats import spearmanr

    names = sorted(target)
    ours, theirs = [proxy[name] for name in names], [target[name] for name in names]
    rho = float(spearmanr(ours, theirs).statistic)
    if len(names) > EXACT_UP_TO:
        return rho, float(spearmanr(ours, theirs, alternative="greater").pvalue)
    at_least = sum(spearmanr(order, theirs).statistic >= rho - 1e-12 for order in itertools.permutations(ours))
    return rho, float(at_least) / math.factorial(len(names))


def top1_regret(proxy: dict[str, float], target: dict[str, float]) -> float:
    """The target's metric of the proxy's best candidate minus the best target metric (0: the same pick)."""
    pick = min(sorted(proxy), key=proxy.__getitem__)
    return target[pick] - min(target.values())


def ranking(overlay: Path, candidates: list[Path], lr_scale: float) -> dict:
    """One `rank_recipes` run; its result, the wall seconds and the candidates' stage seconds."""
    from flows.rank import Ranking, rank_recipes

    began = time.perf_counter()
    result = rank_recipes(Ranking(recipe_path=str(RECIPE), overlays=[str(overlay)], candidates=[str(path) for path in candidates],
                                  lr_scale=lr_scale, metric=METRIC))
    seconds = time.perf_counter() - began
    stage_seconds = {stage: sum(outcome["seconds"].get(stage, 0.0) for outcome in result["outcomes"].values())
                     for stage in ("score", "pack", "place", "train", "reevaluate")}
    return {"result": result, "wall_seconds": seconds, "candidate_stage_seconds": stage_seconds,
            "shared_seconds": result["shared"]["seconds"]}


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.rank_agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=Path, default=CANDIDATES, help="folder of candidate overlays (*.yaml)")
    parser.add_argument("--lr-scale", type=float, default=0.01, help="the reduced LR's share of the recipe's")
    parser.add_argument("--json", type=Path, help="write the measurement here")
    args = parser.parse_args(argv)
    if "TRECFLOW_HOME" not in os.environ:
        sys.exit("set TRECFLOW_HOME to a private folder (its store, MLflow database and Prefect home)")
    home = Path(os.environ["TRECFLOW_HOME"]).expanduser().resolve()
    candidates = sorted(args.candidates.glob("*.yaml"))
    if len(candidates) < 2:
        sys.exit(f"{args.candidates}: needs at least 2 candidate overlays (*.yaml)")
    corpus = home / "corpus" / "demo"
    if not (corpus / "spam.jsonl").exists():
        from demo.corpus import build_demo_corpus

        build_demo_corpus(corpus, progress=print)
    os.chdir(ROOT)  # relative paths in the flows' parameters resolve against the project

    began = time.perf_counter()
    runs = {
        f"proxy x{args.lr_scale:g}": ranking(PROXY, candidates, args.lr_scale),
        "proxy x1": ranking(PROXY, candidates, 1.0),
        "target x1": ranking(TARGET, candidates, 1.0),
    }
    total = time.perf_counter() - began
    values = {label: {row["candidate"]: row["value"] for row in run["result"]["candidates"]} for label, run in runs.items()}
    ranks = {label: {row["candidate"]: row["rank"] for row in run["result"]["candidates"]} for label, run in runs.items()}
    target = values["target x1"]
    agreement = {label: dict(zip(("spearman", "p_value"), spearman(values[label], target)), top1_regret=top1_regret(values[label], target))
                 for label in runs if label != "target x1"}

    labels = list(runs)
    width = max(len(name) for name in target)
    print(f"\n{METRIC} (rank) of {len(target)} candidates; proxy {PROXY.name}, target {TARGET.name}")
    print(f"{'candidate':<{width}}  " + "  ".join(f"{label:>18}" for label in labels))
    for name in sorted(target, key=target.__getitem__):
        print(f"{name:<{width}}  " + "  ".join(f"{values[label][name]:>13.5f} ({ranks[label][name]})" for label in labels))
    print()
    print("spread   " + "  ".join(f"{label} {max(values[label].values()) - min(values[label].values()):.5f}" for label in labels))
    for label, entry in agreement.items():
        print(f"{label} vs target x1: Spearman {entry['spearman']:+.3f} (one-sided p {entry['p_value']:.4f}), "
              f"top-1 regret {entry['top1_regret']:.5f} nats")
    for label, run in runs.items():
        stages = ", ".join(f"{stage} {seconds:.0f}" for stage, seconds in run["candidate_stage_seconds"].items())
        print(f"{label}: {run['wall_seconds']:.0f} s wall (candidates' stages, s: {stages}; shared: "
              f"{sum(run['shared_seconds'].values()):.0f} s), peak LR {run['result']['peak_lr']:g}")
    print(f"total {total:.0f} s")
    if args.json:
        report = {"metric": METRIC, "candidates": [path.name for path in candidates], "values": values, "ranks": ranks, "agreement": agreement,
                  "seconds": {label: {"wall": run["wall_seconds"], "candidate_stages": run["candidate_stage_seconds"],
                                      "shared": run["shared_seconds"]} for label, run in runs.items()},
                  "total_seconds": total, "held_out": runs["target x1"]["result"]["held_out"],
                  "mlflow_run_ids": {label: run["result"]["mlflow_run_id"] for label, run in runs.items()}}
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
