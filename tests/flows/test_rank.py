"""`trecflow rank` and the `rank_recipes` flow: the ranking on constructed outcomes, the proxy recipe
each candidate becomes, bad candidates refused before any work (exit 2, one line), and one real
ranking of two tiny candidates of configs/test.yaml through Prefect's harness (local Ray, DeepSpeed
on CPU, MLflow on SQLite) whose rerun reuses every stage."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from flows.rank import (COLUMNS, PROXY_SETTINGS, Ranking, candidate_name, load_candidates, metric_description, metric_value, proxy_lr, rank,
                        ranking_csv, ranking_rows, ranking_text, ranks)

from ..conftest import CONFIGS, assert_refused, environment

TEST_RECIPE = str(CONFIGS / "test.yaml")
# a candidate's stage tasks: the shared tokenizer, base and held-out set are given, not run
CANDIDATE_TASKS = ("ingest_corpus", "score_corpus", "predict_trec", "pack_sequences", "place_curriculum", "train_cpt", "reevaluate_trec")


def candidate_flow_runs(flow_run_id) -> dict:
    """The rank_candidate subflow runs of a rank_recipes flow run, by candidate."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentTaskRunId

    with get_client(sync_client=True) as client:
        parents = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[task.id for task in parents])))
    return {run.parameters["candidate"]["name"]: run for run in runs}


def outcome(general: float | None, hq: float | None = None, by_source: dict[str, float] | None = None, run: str = "run") -> dict:
    """What a candidate's proxy run returns, as far as the ranking reads it."""
    return {"reevaluate": {"val_loss_general": general, "val_loss_hq": hq, "val_loss_by_source": by_source or {}},
            "train": {"final_loss": 3.0}, "mlflow_run_id": run}


def test_ranks_put_the_lowest_loss_first_and_ties_share_the_better_rank():
    assert ranks({"a": 2.0, "b": 1.0, "c": 2.0, "d": 3.0}) == {"a": 2, "b": 1, "c": 2, "d": 4}
    assert ranks({"only": 5.0}) == {"only": 1}
    with pytest.raises(ValueError, match="candidate broken: no finite value"):
        ranks({"fine": 1.0, "broken": float("nan")})
    with pytest.raises(ValueError, match="candidate missing"):
        ranks({"fine": 1.0, "missing": None})


def test_ranking_rows_read_the_chosen_metric_best_first():
    outcomes = {"base": outcome(6.30, 6.60, {"ham": 6.1, "spam": 6.5}, "r1"), "strict": outcome(6.28, 6.70, {"ham": 6.2, "spam": 6.4}, "r2"),
                "loose": outcome(6.35, 6.50, {"ham": 6.0, "spam": 6.6}, "r3")}
    candidates = [("base", "b.yaml"), ("strict", "s.yaml"), ("loose", "l.yaml")]
    rows = ranking_rows(candidates, outcomes, "val_loss_general")
    assert [(row["rank"], row["candidate"], row["overlay"], row["value"], row["mlflow_run_id"]) for row in rows] == [
        (1, "strict", "s.yaml", 6.28, "r2"), (2, "base", "b.yaml", 6.30, "r1"), (3, "loose", "l.yaml", 6.35, "r3")]
    assert {row["metric"] for row in rows} == {"val_loss_general"}
    assert [row["candidate"] for row in ranking_rows(candidates, outcomes, "val_loss_hq")] == ["loose", "base", "strict"]
    assert [row["candidate"] for row in ranking_rows(candidates, outcomes, "val_loss_spam")] == ["strict", "base", "loose"]
    assert metric_value(outcomes["base"]["reevaluate"], "val_loss_ham") == 6.1
    assert metric_value(outcomes["base"]["reevaluate"], "val_loss_nope") is None
    lines = ranking_csv(rows).decode().splitlines()
    assert lines[0] == ",".join(COLUMNS) and lines[1].startswith("1,strict,s.yaml,val_loss_general,6.28,")
    tied = ranking_rows(candidates, {**outcomes, "loose": outcome(6.28, run="r3")}, "val_loss_general")
    assert [(row["rank"], row["candidate"]) for row in tied] == [(1, "loose"), (1, "strict"), (3, "base")]
    held_out = {"fingerprint": "e1", "sequences": 30, "hq": 10, "general": 20, "sources": ["ham", "spam"]}
    text = ranking_text({"metric": "val_loss_general", "metric_description": metric_description("val_loss_general"), "candidates": rows,
                         "held_out": held_out, "peak_lr": 2e-5, "recipe_peak_lr": 2e-3, "lr_scale": 0.01, "weight_decay": 5.56,
                         "outcomes": {"strict": {"seconds": {"train": 30.4}}, "base": {"seconds": {}}, "loose": {"seconds": {}}}}).splitlines()
    assert [line.split() for line in text[:4]] == [
        ["rank", "candidate", "val_loss_general", "vs", "best", "val_loss_hq", "val_loss_general", "overlay"],
        ["1", "strict", "6.28000", "+0.00000", "6.7000", "6.2800", "s.yaml"], ["2", "base", "6.30000", "+0.02000", "6.6000", "6.3000", "b.yaml"],
        ["3", "loose", "6.35000", "+0.07000", "6.5000", "6.3500", "l.yaml"]]
    assert text[5] == ("metric   val_loss_general of the recipe's held-out set: mean loss over the sequences outside the hq tier, 30 sequences "
                       "(10 hq, 20 general by the recipe's scoring), the same for every candidate (evalset e1)")
    assert text[6].startswith("proxies  uniform curriculum at peak LR 2e-05 (the recipe's 0.002 x 0.01), weight decay 5.56 kept")
    assert text[7] == "stage times (s): strict: train 30; base: ; loose: "


def test_a_candidate_is_the_recipe_with_its_overlay_at_the_reduced_lr(tmp_path):
    (tmp_path / "Loose Tiers.yaml").write_text("scoring:\n  tiers: {hq: 0.6, lq: 0.3}\n")
    (tmp_path / "baseline.yaml").write_text("# the recipe itself\n")
    ranking = Ranking(recipe_path=TEST_RECIPE, candidates=[str(tmp_path / "Loose Tiers.yaml"), str(tmp_path / "baseline.yaml")],
                      set=["reevaluation.random_steps=4"])
    recipe, (loose, baseline) = load_candidates(ranking)
    assert (loose.name, baseline.name) == ("loose-tiers", "baseline") == (candidate_name("Loose Tiers.yaml"), candidate_name("baseline.yaml"))
    assert recipe.optimizer.peak_lr == 2e-3 and proxy_lr(recipe, 0.01) == 2e-5
    for candidate in (loose, baseline):
        proxy = candidate.recipe
        assert proxy.optimizer.peak_lr == 2e-5 and proxy.optimizer.weight_decay == 34.7  # lambda kept: tau 100x the recipe's
        assert proxy.curriculum.variant(candidate.name).strategy == "uniform"
        assert proxy.reevaluation.reference == "none" and proxy.reevaluation.random_steps == 4  # the user's --set wins over the proxy default
        assert (proxy.model, proxy.data, proxy.tokenizer, proxy.base) == (recipe.model, recipe.data, recipe.tokenizer, recipe.base)
        assert candidate.run.set[: len(PROXY_SETTINGS)] == list(PROXY_SETTINGS) and candidate.run.set[-2] == "optimizer.peak_lr=2e-05"
    assert (loose.recipe.scoring.tiers.hq, loose.recipe.scoring.tiers.lq) == (0.6, 0.3)
    assert baseline.recipe.scoring == recipe.scoring and loose.run.overlays == [str(tmp_path / "Loose Tiers.yaml")]
    standard = load_candidates(ranking.model_copy(update={"lr_scale": 1.0}))[1][0]
    assert standard.recipe.optimizer.peak_lr == 2e-3


BAD_CANDIDATES = {
    "bad-field": ("scoring:\n  tiers: {hq: 1.5}\n", "candidate bad-field: {recipe} + {path}: scoring.tiers.hq: Input should be less than 1"),
    "faster": ("optimizer: {peak_lr: 0.01}\n", "candidate faster: {path}: optimizer: a candidate overlay changes only the data"),
    "resplit": ("corpus:\n  splits: {eval: 0.2, base: 0.2, cpt: 0.2, reference: 0.1, classifier: 0.3}\n",
                "candidate resplit: {path}: corpus.splits: the splits decide the held-out set"),
    "missing-source": ("corpus:\n  sources:\n    - {name: stdlib-docs, path: /nonexistent/docs.jsonl}\n"
                       "    - {name: debian-copyright, path: /nonexistent/copyright.jsonl}\n",
                       "candidate missing-source: corpus source stdlib-docs: no jsonl files at /nonexistent/docs.jsonl"),
}


@pytest.mark.parametrize("case", [*BAD_CANDIDATES, "duplicate", "alone", "lr-scale", "metric", "unreadable"])
def test_bad_candidates_are_one_line_and_exit_2_before_any_work(case, tmp_path, monkeypatch):
    store, tracking = tmp_path / "store", tmp_path / "mlflow.db"
    monkeypatch.setenv("TRECFLOW_STORE", str(store))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tracking}")
    good = tmp_path / "good.yaml"
    good.write_text("curriculum: {hq_fraction: 0.5}\n")
    options, expected = [], ""
    if case in BAD_CANDIDATES:
        text, expected = BAD_CANDIDATES[case]
        path = tmp_path / f"{case}.yaml"
        path.write_text(text)
        options, expected = ["--candidates", str(good), "--candidates", str(path)], expected.format(recipe=TEST_RECIPE, path=path)
    elif case == "duplicate":
        (tmp_path / "other").mkdir()
        twin = tmp_path / "other" / "good.yaml"
        twin.write_text("curriculum: {hq_fraction: 0.4}\n")
        options, expected = ["--candidates", str(good), "--candidates", str(twin)], f"--candidates: {good} and {twin} both name candidate 'good'"
    elif case == "alone":
        options, expected = ["--candidates", str(good)], "--candidates: ranking needs at least 2 candidate overlays, got 1"
    elif case == "lr-scale":
        options, expected = ["--candidates", str(good), "--candidates", str(good), "--lr-scale", "0"], "--lr-scale: must be a number > 0, got 0"
    elif case == "metric":
        options = ["--candidates", str(good), "--metric", "val_loss_nope"]
        expected = "--metric: unknown metric 'val_loss_nope' (known: val_loss_general, val_loss_hq, val_loss_stdlib-docs"
    elif case == "unreadable":
        absent = tmp_path / "absent.yaml"
        options, expected = ["--candidates", str(good), "--candidates", str(absent)], f"candidate absent: {absent}: cannot read overlay"
    app = typer.Typer()
    app.command()(rank)
    result = CliRunner().invoke(app, [TEST_RECIPE, *options])
    assert_refused(result, expected, store, tracking)  # nothing computed, no MLflow run


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_rank_recipes_ranks_the_proxies_on_the_shared_held_out_set_and_a_rerun_reuses_every_stage(
        prefect_harness, trainable, mlflow_uri, tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.rank import rank_recipes
    from tasks.evalset import evalset_fingerprint
    from trecflow.runner import stored

    from .test_flow import task_states

    store = trainable["store"]  # the session's test store: ingest, scores, tokenizer and the tiny base are there
    loose, rich = tmp_path / "loose-tiers.yaml", tmp_path / "hq-rich.yaml"
    loose.write_text("scoring:\n  tiers: {hq: 0.6, lq: 0.3}\n")  # re-scored: other tiers of every split, the eval split's too
    rich.write_text("curriculum: {hq_fraction: 0.5}\n")
    # 12 steps (of the recipe's 48): the proxies' runs are what this test adds to the session's work
    ranking = Ranking(recipe_path=TEST_RECIPE, candidates=[str(loose), str(rich)], set=["data.tokens=6144"])
    app = typer.Typer()
    app.command()(rank)
    with environment({"TRECFLOW_STORE": store.url}):
        state = rank_recipes(ranking, return_state=True)
        assert state.is_completed(), state
        first = state.result()
        # the rerun through the command (its text output)
        command = CliRunner().invoke(app, [TEST_RECIPE, "--candidates", str(loose), "--candidates", str(rich), "--set", "data.tokens=6144"])
    assert command.exit_code == 0, (command.stdout, command.stderr, command.exception)
    client = mlflow.MlflowClient(mlflow_uri)
    again_id = command.stdout.split("mlflow rank run ", 1)[1].split()[0]
    again_flow_run = client.get_run(again_id).data.tags["prefect.flow_run_id"]

    shared, outcomes = first["shared"], first["outcomes"]
    assert shared["base"]["fingerprint"] == trainable["base"].fingerprint and shared["tokenizer"]["fingerprint"] == trainable["tokenizer"].fingerprint
    measured = {}
    for name, outcome in outcomes.items():
        # the shared tokenizer, base and held-out set, read by every candidate's own stages
        assert {stage: outcome[stage]["fingerprint"] for stage in ("tokenizer", "base", "evalset")} == {
            stage: shared[stage]["fingerprint"] for stage in ("tokenizer", "base", "evalset")}
        assert store.output("reevaluate", outcome["reevaluate"]["fingerprint"]).manifest()["inputs"]["evalset"] == shared["evalset"]["fingerprint"]
        assert store.output("train", outcome["train"]["fingerprint"]).manifest()["inputs"]["base"] == shared["base"]["fingerprint"]
        measured[name] = stored(store, "reevaluate", outcome["reevaluate"]["fingerprint"]).summary
        assert measured[name].reference is None and measured[name].steps_evaluated == 8
    # re-scoring gave the loose candidate other tiers, so on its own it would have measured another held-out set
    assert outcomes["loose-tiers"]["score"]["fingerprint"] != shared["score"]["fingerprint"]
    recipe = load_candidates(ranking)[1][0].recipe
    assert evalset_fingerprint(recipe, outcomes["loose-tiers"]["score"]["fingerprint"], shared["tokenizer"]["fingerprint"]) != shared["evalset"]["fingerprint"]
    assert measured["loose-tiers"].val_sequences == measured["hq-rich"].val_sequences
    assert outcomes["hq-rich"]["place"]["hq_fraction"] == pytest.approx(0.5, abs=0.02)

    # the ranking is the order of the stored val_loss_general, lowest first
    order = sorted(measured, key=lambda name: measured[name].val_loss_general)
    assert [row["candidate"] for row in first["candidates"]] == order and [row["rank"] for row in first["candidates"]] == [1, 2]
    for row in first["candidates"]:
        assert row["value"] == measured[row["candidate"]].val_loss_general and row["metric"] == "val_loss_general"
    assert first["peak_lr"] == 2e-5 and first["held_out"]["sequences"] == measured[order[0]].val_sequences.hq + measured[order[0]].val_sequences.general

    # the rerun prints the same ranking, every stage task Cached: the shared ones in the rank flow
    # run, the others in each candidate's
    lines = command.stdout.splitlines()
    table_lines = lines[next(number for number, line in enumerate(lines) if line.startswith("rank  candidate")):]
    assert table_lines[0].split()[:3] == ["rank", "candidate", "val_loss_general"]
    assert [line.split()[:3] for line in table_lines[1:3]] == [[str(row["rank"]), row["candidate"], f"{row['value']:.5f}"] for row in first["candidates"]]
    assert "metric   val_loss_general of the recipe's held-out set" in command.stdout and "peak LR 2e-05 (the recipe's 0.002 x 0.01)" in command.stdout
    assert json.loads(open(client.download_artifacts(again_id, "ranking.json")).read())[0]["value"] == first["candidates"][0]["value"]
    with get_client(sync_client=True) as prefect:
        assert prefect.read_flow_run(state.state_details.flow_run_id).name == "test/rank"
        table = prefect.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["recipe-ranking-test"])))
    assert table and [row["candidate"] for row in json.loads(table[0].data)] == order
    for flow_run_id in (state.state_details.flow_run_id, again_flow_run):
        subflows = candidate_flow_runs(flow_run_id)
        assert {name: flow_run.name for name, flow_run in subflows.items()} == {"loose-tiers": "test/rank/loose-tiers", "hq-rich": "test/rank/hq-rich"}
    shared_tasks = {name: task for name, task in task_states(again_flow_run).items() if not name.startswith("rank_candidate")}
    assert shared_tasks == dict.fromkeys(("ingest_corpus", "score_corpus", "build_tokenizer", "build_base", "build_evalset"), "Cached")
    for name, flow_run in subflows.items():
        assert task_states(flow_run.id) == dict.fromkeys(CANDIDATE_TASKS, "Cached"), name

    # MLflow: the rank run with its table and plot, the shared stages' and the candidates' runs nested under it
    parent = client.get_run(first["mlflow_run_id"])
    assert parent.data.tags["trecflow.kind"] == "rank" and parent.info.run_name == "rank" and parent.info.status == "FINISHED"
    assert {artifact.path for artifact in client.list_artifacts(parent.info.run_id)} >= {"ranking.json", "ranking.csv", "ranking.png"}
    assert json.loads(open(client.download_artifacts(parent.info.run_id, "ranking.json")).read()) == first["candidates"]
    assert parent.data.metrics[f"{order[0]}.rank"] == 1 and parent.data.metrics[f"{order[1]}.val_loss_general"] == measured[order[1]].val_loss_general
    nested = {run.info.run_name: run for run in client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")}
    assert set(nested) == {"loose-tiers", "hq-rich", "shared/ingest", "shared/score", "shared/tokenizer", "shared/base", "shared/evalset"}
    for name in ("loose-tiers", "hq-rich"):
        run = nested[name]
        assert run.data.tags["trecflow.kind"] == "rank-candidate" and run.data.params["optimizer.peak_lr"] == "2e-05"
        assert run.data.metrics["val_loss_general"] == measured[name].val_loss_general and run.data.metrics["rank"] == order.index(name) + 1
        assert max(point.value for point in client.get_metric_history(run.info.run_id, "lr")) <= 2e-5 * (1 + 1e-6)


def test_the_agreement_measure_is_spearman_with_an_exact_p_value_and_the_top1_regret():
    from flows.rank_agreement import spearman, top1_regret

    target = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0}
    assert spearman(target, target) == (pytest.approx(1.0), pytest.approx(1 / 24))  # one ordering of 24 agrees fully
    reversed_order = {"a": 4.0, "b": 3.0, "c": 2.0, "d": 1.0}
    assert spearman(reversed_order, target) == (pytest.approx(-1.0), pytest.approx(1.0))  # every ordering agrees at least as well
    rho, p_value = spearman({"a": 1.0, "b": 3.0, "c": 2.0, "d": 4.0}, target)
    assert rho == pytest.approx(0.8) and p_value == pytest.approx(4 / 24)  # rho 1 once, 0.8 for each of 3 adjacent swaps
    assert top1_regret({"a": 0.5, "b": 0.1, "c": 0.9, "d": 0.7}, target) == pytest.approx(1.0)  # picks b: 2.0 - 1.0
    assert top1_regret(target, target) == 0.0
