"""The `trecflow predict` command: fast, light (no Prefect, MLflow or torch), writes nothing but
the optional plot, and prints the documented JSON."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import CONFIGS, ROOT

TRECFLOW = Path(sys.executable).parent / "trecflow"
CPT = str(CONFIGS / "cpt-3.9b-900b.yaml")


def run_cli(*args: str, cwd: Path, python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TRECFLOW_", "PREFECT_", "MLFLOW_"))}
    command = [sys.executable, *python_flags, "-m", "flows.cli", *args] if python_flags else [str(TRECFLOW), *args]
    return subprocess.run(command, cwd=cwd, env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)


def test_predict_json_is_fast_and_complete(tmp_path):
    started = time.perf_counter()
    result = run_cli("predict", CPT, "--json", cwd=tmp_path)
    elapsed = time.perf_counter() - started
    assert result.returncode == 0, result.stderr
    assert elapsed < 3.0, f"trecflow predict took {elapsed:.2f} s"
    summary = json.loads(result.stdout)
    assert summary["steps"] == 214_576
    assert summary["tau"] == 1 / (3e-4 * 0.1 * 214_576)
    assert summary["tpp"] == 9e11 / 3.9e9
    start, end = summary["hq_window"]
    assert summary["hq_window_steps"][1] - summary["hq_window_steps"][0] == round(0.1 * 214_576)
    assert end - start == pytest.approx(round(0.1 * 214_576) / 214_576)
    assert start <= summary["valley_fraction"] <= end
    for key in ("tau_opt", "valley_step", "weight_decay_opt", "warnings"):
        assert key in summary
    assert "Power-Lines optimum" in result.stderr  # tau is 2.7x tau_opt: warned on stderr, JSON stays clean
    assert list(tmp_path.iterdir()) == []  # wrote nothing (no .trecflow, no store)


def test_predict_imports_no_prefect_mlflow_or_torch(tmp_path):
    result = run_cli("predict", CPT, "--json", cwd=tmp_path, python_flags=("-X", "importtime"))
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    heavy = sorted(name for name in imported if re.match(r"(prefect|mlflow|torch|ray|deepspeed)(\.|$)", name))
    assert heavy == []
    assert "numpy" in imported  # the check does see real imports


def test_hq_fraction_option_and_plot(tmp_path):
    plot = tmp_path / "trec.png"
    result = run_cli("predict", CPT, "--hq-fraction", "0.3", "--plot", str(plot), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "HQ window (w = 0.3)" in result.stdout and "predicted valley" in result.stdout
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in tmp_path.iterdir()] == ["trec.png"]


def test_bad_hq_fraction_is_exit_2(tmp_path):
    result = run_cli("predict", CPT, "--hq-fraction", "1.5", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: --hq-fraction: must be in (0, 1), got 1.5"


def test_the_paper_recipe_without_its_data_sections_is_refused_before_any_work(tmp_path):
    """The scheduled job must never predict, skip the rest and end Completed: a run whose recipe
    lacks what a needed stage requires exits 2 before any work, in one line naming the sections."""
    import re

    text = (CONFIGS / "cpt-3.9b-900b.yaml").read_text()
    kept, skipping = [], False
    for line in text.splitlines(keepends=True):
        if re.match(r"^[a-z_]+:", line):
            skipping = line.split(":")[0] in ("corpus", "scoring", "tokenizer", "base")
        if not skipping:
            kept.append(line)
    stripped = tmp_path / "stripped.yaml"
    stripped.write_text("".join(kept))
    home = tmp_path / "home"
    result = subprocess.run([str(TRECFLOW), "run", str(stripped)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TRECFLOW_HOME": str(home)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {stripped}: cannot run every stage: no corpus, tokenizer, base sections"), lines
    assert "--until" in lines[0] and "Traceback" not in result.stderr
    assert not (home / "store").exists() and not (home / "mlflow.db").exists()  # nothing was started or written
    # the recipe itself is valid, and --set edits it like any recipe (64 workers x 8 x 2 = 1,024 sequences)
    listed = subprocess.run([str(TRECFLOW), "validate", str(stripped), "--set", "training.workers=64", "--set", "training.accumulation=2"],
                            cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0 and "214,576 steps" in listed.stdout, listed.stderr


def test_compare_refuses_a_malformed_fault_variable_in_one_line_before_any_work(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from flows.cli import app
    from training.cpt_job import FAULT_ENV

    monkeypatch.setenv("TRECFLOW_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv(FAULT_ENV, "24:3")
    result = CliRunner().invoke(app, ["compare", str(CONFIGS / "test.yaml"), "--variants", "uniform"])
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {FAULT_ENV}: '24:3'"), lines
    assert not (tmp_path / "store").exists() and not (tmp_path / "mlflow.db").exists()


def variant_recipe(tmp_path: Path) -> Path:
    """The paper recipe with two variants of its own: a constant LR, and the same averaged (EMA of 6)."""
    import yaml

    from trecflow.recipe import read_yaml

    data = read_yaml((CONFIGS / "cpt-3.9b-900b.yaml").read_text())
    constant = {"kind": "constant", "warmup": 0.01}
    data["curriculum"]["variants"] = {
        "constant": {"strategy": "trec_valley", "schedule": constant},
        "constant-ema": {"strategy": "trec_valley", "schedule": constant, "averaging": {"kind": "ema", "checkpoints": 6, "every": 2000, "alpha": 0.2}},
    }
    path = tmp_path / "variants.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_predict_a_variant_json_gives_its_schedule_and_averaged_model(tmp_path):
    recipe = variant_recipe(tmp_path)
    shared = json.loads(run_cli("predict", str(recipe), "--json", cwd=tmp_path).stdout)
    constant = json.loads(run_cli("predict", str(recipe), "--variant", "constant", "--json", cwd=tmp_path).stdout)
    result = run_cli("predict", str(recipe), "--variant", "constant-ema", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    averaged = json.loads(result.stdout)
    assert "variant" not in shared and "averaging" not in shared and shared["schedule"]["kind"] == "linear"
    assert constant["variant"] == "constant" and constant["schedule"]["kind"] == "constant" and "averaging" not in constant
    assert constant["valley_step"] == 214_575 and shared["valley_step"] < 214_575  # a constant LR: the valley is the last step
    assert averaged["variant"] == "constant-ema" and averaged["schedule"] == constant["schedule"]
    ema = averaged["averaging"]
    assert ema["kind"] == "ema" and ema["checkpoints"] == 6 and ema["every"] == 2000 and ema["alpha"] == 0.2
    assert ema["snapshot_steps"] == [204_575, 206_575, 208_575, 210_575, 212_575, 214_575]
    assert ema["weights"] == pytest.approx([0.8**5, 0.2 * 0.8**4, 0.2 * 0.8**3, 0.2 * 0.8**2, 0.2 * 0.8, 0.2], rel=1e-12)
    assert ema["final_valley_step"] == constant["valley_step"] and ema["final_hq_window_steps"] == constant["hq_window_steps"]
    assert ema["final_initial_weight"] == pytest.approx(constant["initial_weight"], rel=1e-12)
    assert averaged["valley_step"] == 204_575  # the oldest snapshot: older steps reach the average through more of them
    assert constant["hq_window_steps"] == [193_118, 214_576] and averaged["hq_window_steps"] == [187_118, 208_576]  # 10% ending 6,000 steps earlier
    assert averaged["initial_weight"] > constant["initial_weight"]
    text = run_cli("predict", str(recipe), "--variant", "constant-ema", cwd=tmp_path).stdout
    assert re.search(r"\npredicted valley \(averaged model\) +0\.9534 of training \(step 204,575\)\n", text), text
    assert "raw final model" in text and "ema (alpha 0.2) of 6 checkpoints 2,000 steps apart" in text
    assert list(tmp_path.iterdir()) == [recipe]  # wrote nothing


def test_predict_an_unknown_variant_is_exit_2(tmp_path):
    result = run_cli("predict", CPT, "--variant", "nope", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].startswith("error: --variant: curriculum.variants: unknown variant 'nope'")


@pytest.mark.parametrize("command", ["train", "run"])
def test_training_an_averaged_variant_under_zero3_is_refused_in_one_line_before_any_work(tmp_path, command):
    import yaml

    from trecflow.recipe import read_yaml

    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["curriculum"]["variants"] = {"avg": {"strategy": "trec_valley", "averaging": {"kind": "sma", "checkpoints": 3, "every": 5}}}
    data["training"]["zero_stage"] = 3
    recipe = tmp_path / "avg.yaml"
    recipe.write_text(yaml.safe_dump(data))
    home = tmp_path / "home"
    result = subprocess.run([str(TRECFLOW), command, str(recipe), "--variant", "avg"], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "TRECFLOW_HOME": str(home)})
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {recipe}: curriculum.variants.avg.averaging: checkpoint averaging needs training.zero_stage 0, 1 or 2 "
                     "(ZeRO-3 partitions the weights the average adds up); use ZeRO-1 or 2, or remove averaging from this variant"], lines
    assert not (home / "store").exists() and not (home / "mlflow.db").exists()  # nothing was started or written
