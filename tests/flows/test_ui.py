"""``trecflow ui`` in a real headless browser: Debian's chromium driven by Playwright.

With `flows.ui.running_ui` up on free loopback ports (a Prefect server with the project's
deployments and a process worker, and the MLflow UI, all on the session's shared compare
fixture's home):

- the MLflow UI opens the experiment on its runs (not its GenAI view) and shows the comparison run
  ``compare`` and, nested under it, one run per variant, named after the variant;
- the Prefect UI lists the deployments ``cpt-pipeline`` and ``compare-curricula``; the server's
  scheduler has turned cpt-pipeline's cron schedule into scheduled runs; a "Quick run" clicked on
  the cpt-pipeline page runs on the worker and completes: it trains a third variant, ``end``
  (the shared stages are cache hits in the fixture's store; the run stops after training,
  ``until: train``, as nothing below looks at its re-evaluation);
- the Prefect UI shows the quick run's training progress artifact (``progress-train-<recipe>-end``)
  finished at 100%;
- MLflow's compare page of the three variant runs lists ``variant.strategy`` under "Show diff
  only", and the metric page of ``loss`` draws the three variants' curves on one chart.

Screenshots of these pages are saved in the test's tmp_path (and in
``TRECFLOW_SCREENSHOTS`` when set; `docs/` holds one of each, taken this way).

The test applies a copy of ``prefect.yaml`` whose cpt-pipeline parameters name the fixture's
recipe, the variant ``end`` and ``until: train`` (the project file's defaults name ``configs/demo.yaml``); its daily
02:00 UTC schedule is kept (a cron run would start during the test only if it spans 02:00 UTC,
and would be as cheap). `test_prefect_yaml_matches_the_flows` checks the project file itself,
without services.

Chromium comes from Debian (``make test`` installs it); Playwright never downloads a browser here.
On a failure the page's screenshot and the services' logs are left in the test's tmp_path.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
import yaml

from flows.ui import PREFECT_FILE, PROJECT_ROOT, WORK_POOL
from trecflow.tracking import ui_url

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Generous: 2 busy cores, a React app compiling its first page, a flow run importing torch.
PAGE_TIMEOUT_MS = 90_000
RUN_TIMEOUT_S = 600  # the quick run trains a variant
TERMINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_prefect_yaml_matches_the_flows():
    """The project's prefect.yaml: both deployments on the local process pool, entrypoints that
    exist, default parameters the flows' models accept, the pipeline scheduled, a pull step."""
    from flows.params import Comparison, PipelineRun

    config = yaml.safe_load(PREFECT_FILE.read_text())
    deployments = {entry["name"]: entry for entry in config["deployments"]}
    assert set(deployments) == {"cpt-pipeline", "compare-curricula"}
    for entry in deployments.values():
        assert entry["work_pool"]["name"] == WORK_POOL
        path, _, function = entry["entrypoint"].partition(":")
        assert f"def {function}(" in (PROJECT_ROOT / path).read_text()
    run = PipelineRun(**deployments["cpt-pipeline"]["parameters"]["run"])
    assert (PROJECT_ROOT / run.recipe_path).is_file() and run.force == []
    comparison = Comparison(**deployments["compare-curricula"]["parameters"]["comparison"])
    assert (PROJECT_ROOT / comparison.recipe_path).is_file() and comparison.variants == []
    assert [schedule["cron"] for schedule in deployments["cpt-pipeline"]["schedules"]] == ["0 2 * * *"]
    assert not deployments["compare-curricula"].get("schedules")
    (pull_step,) = config["pull"]
    assert "prefect.deployments.steps.set_working_directory" in pull_step


def test_a_taken_port_is_a_clear_error_before_anything_starts(tmp_path, monkeypatch):
    from flows.ui import UIError, running_ui

    monkeypatch.setenv("TRECFLOW_HOME", str(tmp_path))
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UIError, match=f"port {port} on 127.0.0.1 is already in use.*--mlflow-port"):
            with running_ui(free_port(), port, progress=lambda line: None):
                pass
    assert not (tmp_path / "ui-logs").exists()


THIRD_VARIANT = "end"  # trained by the test's quick run, beside the fixture's two


def deployments_for_test(compared: dict, folder: Path) -> Path:
    """The project's prefect.yaml with cpt-pipeline pointed at the fixture's recipe and `THIRD_VARIANT`."""
    config = yaml.safe_load(PREFECT_FILE.read_text())
    for entry in config["deployments"]:
        if entry["name"] == "cpt-pipeline":
            entry["parameters"]["run"] = {"recipe_path": compared["recipe_path"], "variant": THIRD_VARIANT, "force": [], "until": "train"}
    path = folder / "prefect.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def api(url: str, method: str = "GET", body: dict | None = None):
    import httpx

    response = httpx.request(method, url, json=body, timeout=30)
    response.raise_for_status()
    return response.json()


def flow_run_logs(api_url: str, flow_run_id: str) -> str:
    entries = api(f"{api_url}/logs/filter", "POST", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "limit": 200})
    return "\n".join(entry["message"] for entry in entries)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # run alone, this test's setup also builds the shared compare fixture
def test_ui_runs_the_deployment_and_shows_the_comparison(compared_test, tmp_path, monkeypatch):
    from playwright.sync_api import sync_playwright

    from flows.ui import running_ui

    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium (apt-get install -y chromium)")
    home = Path(compared_test["home"])
    monkeypatch.setenv("TRECFLOW_HOME", str(home))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", compared_test.get("tracking_uri") or f"sqlite:///{home / 'mlflow.db'}")
    for key, value in compared_test.get("env", {}).items():  # the fixture's store (S3 endpoint, prefix)
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))  # the UI server's own database
    recipe, variants = compared_test["recipe_name"], compared_test["variants"]
    lines: list[str] = []
    started = time.monotonic()

    def progress(line: str) -> None:
        lines.append(f"[{time.monotonic() - started:5.1f} s] {line}")
        print(lines[-1], flush=True)

    prefect_file = deployments_for_test(compared_test, tmp_path)
    with running_ui(free_port(), free_port(), progress=progress, prefect_file=prefect_file) as ui, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            # MLflow: the comparison run and its variants, nested under it.
            experiment = api(f"{ui.mlflow_url}/api/2.0/mlflow/experiments/get-by-name?experiment_name={recipe}")["experiment"]
            page.goto(ui_url(ui.mlflow_url, f"experiments/{experiment['experiment_id']}"))  # as trecflow links it
            page.get_by_text("compare", exact=True).first.wait_for()
            assert page.get_by_text("Traces", exact=True).count() <= 1  # the runs table, not the GenAI overview
            progress("MLflow UI opens the experiment on its runs and shows the comparison run")
            expand_children(page, compared_test["compare_run_id"])
            for variant in variants:
                page.get_by_text(variant, exact=True).first.wait_for()
            progress(f"MLflow UI shows its variants {variants}")

            # Prefect: the deployments, then a quick run from the pipeline's page.
            page.goto(f"{ui.prefect_url}/deployments")
            page.get_by_text("compare-curricula", exact=True).first.wait_for()
            page.get_by_role("link", name="cpt-pipeline", exact=True).first.click()
            page.wait_for_url("**/deployment/**")
            deployment_id = page.url.split("/deployment/")[1].split("?")[0].split("/")[0]
            wait_for_scheduled_runs(ui.prefect_api_url, deployment_id, ui.log_dir)
            progress("the scheduler created the cron runs")
            quick_run(page, ui.prefect_api_url, deployment_id)
            progress("clicked Run > Quick run on the cpt-pipeline page: a flow run exists")
            flow_run = wait_for_flow_run(ui.prefect_api_url, deployment_id)
            state = flow_run["state"]["type"]
            progress(f"flow run {flow_run['name']}: {state}")
            assert state == "COMPLETED", (
                f"flow run {flow_run['name']} ended {state}:\n{flow_run_logs(ui.prefect_api_url, flow_run['id'])}\n"
                f"worker log: {ui.log_dir / 'prefect-worker.log'}"
            )
            assert flow_run["parameters"]["run"]["recipe_path"] == compared_test["recipe_path"]
            page.goto(f"{ui.prefect_url}/runs/flow-run/{flow_run['id']}")
            page.get_by_text("Completed").first.wait_for()
            progress("the Prefect UI shows the run Completed")
            key = f"progress-train-{recipe}-{THIRD_VARIANT}"  # the training task's progress artifact, finished
            artifact = api(f"{ui.prefect_api_url}/artifacts/latest/filter", "POST", {"artifacts": {"key": {"any_": [key]}}})
            assert artifact and artifact[0]["type"] == "progress" and artifact[0]["data"] == 100.0, artifact
            page.goto(f"{ui.prefect_url}/artifacts/key/{key}")
            page.get_by_text(key).first.wait_for()
            page.get_by_text("done in").first.wait_for()
            screenshot(page, tmp_path, "prefect-progress-artifact.png")
            progress("the Prefect UI shows the training task's progress artifact at 100%")

            # MLflow: the three variants side by side.
            runs = variant_runs(ui.mlflow_url, experiment["experiment_id"], [*variants, THIRD_VARIANT])
            ids, experiments = json.dumps(list(runs.values())), json.dumps([experiment["experiment_id"]])
            page.goto(f"{ui.mlflow_url}/#/compare-runs?runs={ids}&experiments={experiments}")
            page.get_by_text("Show diff only").first.wait_for()
            page.get_by_text("Show diff only").first.click()
            page.get_by_text("variant.strategy", exact=True).first.wait_for()
            for variant in runs:
                page.get_by_text(variant, exact=True).first.wait_for()
            screenshot(page, tmp_path, "mlflow-compare-variants.png")
            progress("MLflow's compare page shows the variants' differing parameters")
            metric = json.dumps("loss")
            page.goto(f"{ui.mlflow_url}/#/metric/loss?runs={ids}&metric={metric}&experiments={experiments}"
                      f"&plot_metric_keys={json.dumps(['loss'])}&plot_layout={{}}&x_axis=step&y_axis_scale=linear")
            for variant in runs:  # the chart's legend names every run
                page.get_by_text(variant, exact=True).first.wait_for()
            page.locator(".js-plotly-plot, canvas, svg.main-svg").first.wait_for()
            screenshot(page, tmp_path, "mlflow-loss-curves.png")
            progress("MLflow's metric page draws the three variants' loss curves on one chart")
        except BaseException:
            page.screenshot(path=str(tmp_path / "failure.png"), full_page=True)
            (tmp_path / "failure.html").write_text(page.content())
            print(f"screenshot and page at {tmp_path}; service logs at {ui.log_dir}", flush=True)
            raise
        finally:
            browser.close()


def variant_runs(mlflow_url: str, experiment_id: str, variants: list[str]) -> dict[str, str]:
    """The newest variant run of each of ``variants`` (MLflow's REST API), by variant."""
    found = {}
    for variant in variants:
        query = f"tags.`trecflow.kind` = 'variant' and tags.`trecflow.variant` = '{variant}'"
        runs = api(f"{mlflow_url}/api/2.0/mlflow/runs/search", "POST",
                   {"experiment_ids": [experiment_id], "filter": query, "order_by": ["attributes.start_time DESC"], "max_results": 1})["runs"]
        assert runs, f"no MLflow run of variant {variant}"
        found[variant] = runs[0]["info"]["run_id"]
    return found


def screenshot(page, folder: Path, name: str) -> None:
    """The page as ``name`` in ``folder`` and in ``TRECFLOW_SCREENSHOTS`` when set."""
    page.wait_for_timeout(1500)  # charts animate in
    page.screenshot(path=str(folder / name))
    if os.environ.get("TRECFLOW_SCREENSHOTS"):
        Path(os.environ["TRECFLOW_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(os.environ["TRECFLOW_SCREENSHOTS"]) / name))


def expand_children(page, parent_run_id: str) -> None:
    """Show the nested runs of a parent row in MLflow's runs table (collapsed by default): click
    the expander button in the Run Name cell of the row that links to the parent run."""
    link = page.locator(f'a[href$="/runs/{parent_run_id}"]').first
    link.wait_for()
    row = page.locator('[role="row"]', has=link).first
    row.locator('[role="gridcell"] button').first.click()


def wait_for_scheduled_runs(api_url: str, deployment_id: str, log_dir: Path, timeout_s: float = 90) -> None:
    """The server's scheduler turns the deployment's cron schedule into scheduled flow runs.

    Guards the bug where Prefect 3.8.8's scheduler fails on SQLAlchemy 2.1 ("Can't evaluate bulk
    DML statement", in the server log) and a scheduled deployment never runs."""
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "limit": 5}
    deadline = time.monotonic() + timeout_s
    while not any(run["auto_scheduled"] for run in api(f"{api_url}/flow_runs/filter", "POST", body)):
        if time.monotonic() > deadline:
            raise AssertionError(f"no scheduled flow run {timeout_s:.0f} s after the deployment; see {log_dir / 'prefect-server.log'}")
        time.sleep(2)


def manual_runs(api_url: str, deployment_id: str) -> list[dict]:
    """The deployment's flow runs not made by its schedule, newest first."""
    body = {"flow_runs": {"deployment_id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_DESC", "limit": 5}
    return [run for run in api(f"{api_url}/flow_runs/filter", "POST", body) if not run["auto_scheduled"]]


def quick_run(page, api_url: str, deployment_id: str) -> None:
    """Run > Quick run on a deployment's page, until the flow run exists.

    When the flow's parameter schema has required parameters (``cpt_pipeline(run: PipelineRun)``
    has no default), the Prefect UI opens a "Run Deployment" dialog filled with the deployment's
    parameters instead of starting at once; its "Run" button submits them as they are."""
    page.get_by_role("button", name="Run", exact=True).click()
    page.get_by_text("Quick run", exact=True).click()
    dialog = page.get_by_role("dialog")
    deadline = time.monotonic() + 60
    while not manual_runs(api_url, deployment_id):
        if time.monotonic() > deadline:
            raise AssertionError("no flow run 60 s after clicking Quick run")
        if dialog.count() and dialog.first.is_visible():
            dialog.first.get_by_role("button", name="Run", exact=True).click()
            dialog.first.wait_for(state="hidden")
        time.sleep(1)


def wait_for_flow_run(api_url: str, deployment_id: str) -> dict:
    """The deployment's manually created flow run, once it reaches a terminal state."""
    deadline = time.monotonic() + RUN_TIMEOUT_S
    latest = None
    while time.monotonic() < deadline:
        runs = manual_runs(api_url, deployment_id)
        if runs:
            latest = runs[0]
            if latest["state"] and latest["state"]["type"] in TERMINAL_STATES:
                return latest
        time.sleep(2)
    state = latest and latest["state"] and latest["state"]["type"]
    raise AssertionError(f"no terminal state after {RUN_TIMEOUT_S} s (flow run: {latest and latest['name']}, state {state})")
