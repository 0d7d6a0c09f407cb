"""`trecflow status`, `trecflow run --dry-run` and `trecflow gc` on a real store.

The store: configs/test.yaml's committed ingest, score, tokenizer, pack and predict outputs (the
session's `staged_test`, copied), placements computed by the real runner, plus what runs leave
behind: a live lease, a partial output, checkpoints, reference-loss caches, a calibration entry,
MLflow artifacts, and a model version registered with the tags the pipeline registers models by.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save as safetensors_bytes
from typer.testing import CliRunner

from flows.cli import app, human_age, human_bytes
from tasks.calibrate import record_run
from tasks.graph import GRAPH
from tasks.reference import Reference, cache_folder, write_part
from training.calibration import CalibrationRun
from training.cpt_job import checkpoint_root
from trecflow.inventory import CHECKPOINTS, FINGERPRINT_TAG, STAGE_TAG, STORE_TAG, Removal, plan_stages, registered_outputs, remove
from trecflow.lease import Lease, Owner
from trecflow.recipe import load_recipe, read_yaml
from trecflow.runner import Runner
from trecflow.settings import expand_path
from trecflow.stage import Target
from trecflow.store import Store

from ..conftest import BUCKET, CONFIGS, ROOT

TRECFLOW = Path(sys.executable).parent / "trecflow"
LEASED_ELSEWHERE = "feedfacefeedface"  # a train output of no kept recipe, leased (a running job) with checkpoints
ORPHAN_CHECKPOINTS = "deadbeefdeadbeef"  # checkpoints whose train output is gone
UNKEPT_PARTIAL = "abcdefabcdef0001"  # files of an interrupted score run of no kept recipe
CALIBRATED = "c0ffeec0ffeec0ff"  # a re-evaluation in the calibration table
SMOLLM2 = "00000000000000b0"  # a converted base checkpoint inside the store, named by the kept recipe's base.path


def write_recipe(path: Path, store: Store, base_uri: str, **curriculum) -> Path:
    """configs/test.yaml on ``store`` with a base given as a folder, two declared variants, its
    corpus paths absolute (a run in another TRECFLOW_HOME lists the same files) and ``curriculum`` edits."""
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    data["base"] = {"path": base_uri}
    data["curriculum"].update({"variants": {"uniform": {"strategy": "uniform"}, "end": {"strategy": "end"}}, **curriculum})
    for source in data["corpus"]["sources"]:
        source["path"] = expand_path(source["path"])
    data["store"] = {"url": store.url}
    path.write_text(yaml.safe_dump(data, sort_keys=False))  # the declared order: uniform is the default variant
    return path


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and modification time."""
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*") if path.is_file()}


def put(store: Store, path: str, data: bytes) -> None:
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, data)


def table_rows(text: str, columns: int) -> dict[str, list[str]]:
    """A printed table's rows by their first cell: the lines after the title and the header, up to
    the first blank line, split into ``columns`` cells (the last one keeps its spaces)."""
    rows = {}
    for line in text.splitlines()[2:]:
        if not line.strip():
            break
        cells = line.split(None, columns - 1)
        rows[cells[0]] = cells
    return rows


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


@pytest.fixture(scope="module")
def shelf(staged_test, tmp_path_factory):
    staged = staged_test
    root = tmp_path_factory.mktemp("inventory")
    store = Store(str(root / "store"))
    source = staged["store"]
    ingest_fp = source.output("score", staged["score"].fingerprint).manifest()["inputs"]["ingest"]
    for stage, fp in (("ingest", ingest_fp), ("score", staged["score"].fingerprint), ("tokenizer", staged["tokenizer"].fingerprint),
                      ("pack", staged["pack"].fingerprint), ("predict", staged["predict"].fingerprint)):
        shutil.copytree(source.path(stage, fp), store.path(stage, fp))
    base = store.output("base", SMOLLM2)  # as `trecflow base smollm2` writes it
    base.write_bytes("model/config.json", json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 1024}).encode())
    base.write_bytes("model/model.safetensors", safetensors_bytes({"embed": np.zeros((4, 4), dtype=np.float32)}))  # run's pre-flight reads its header
    base.commit()
    base_uri = base.file_uri("model")

    kept_path = write_recipe(root / "kept.yaml", store, base_uri)
    kept = load_recipe(kept_path)
    unkept = load_recipe(write_recipe(root / "unkept.yaml", store, base_uri, seed=1))
    registered = load_recipe(write_recipe(root / "registered.yaml", store, base_uri, seed=2))
    runner = Runner(GRAPH, store)
    computed = runner.run(Target(kept, "uniform"), until="place")  # the real runner: all reused but the placement
    unkept_place = runner.run(Target(unkept, "uniform"), until="place")["place"]
    registered_place = runner.run(Target(registered, "uniform"), until="place")["place"]

    plans = {plan.stage: plan for plan in plan_stages(GRAPH, store, Target(kept, "uniform"))}
    train_fp, evalset_fp = plans["train"].fingerprint, plans["evalset"].fingerprint
    owner = Owner.this_process()
    assert Lease(store.output("train", train_fp), owner, seconds=3600).try_acquire() is None  # kept recipe's training, running
    assert checkpoint_root(store, train_fp) == store.path(CHECKPOINTS, train_fp)  # where gc looks for them
    put(store, store.path("checkpoints", train_fp, "checkpoint_000000", "state.pt"), b"c" * 300)
    store.output("evalset", evalset_fp).write_bytes("tokens.npy", b"e" * 200)  # an interrupted held-out set

    assert Lease(store.output("train", LEASED_ELSEWHERE), owner, seconds=3600).try_acquire() is None
    store.output("train", LEASED_ELSEWHERE).write_bytes("audit/attempt-001/part-0.jsonl", b"{}\n")
    put(store, store.path("checkpoints", LEASED_ELSEWHERE, "checkpoint_000001", "state.pt"), b"r" * 400)
    put(store, store.path("checkpoints", ORPHAN_CHECKPOINTS, "checkpoint_000003", "state.pt"), b"o" * 500)
    store.output("score", UNKEPT_PARTIAL).write_bytes("shards/part-00000.parquet", b"p" * 600)

    calibrated = store.output("reevaluate", CALIBRATED)
    calibrated.write_bytes("trec.parquet", b"t" * 700)
    calibrated.commit()
    record_run(store, CalibrationRun(key=CALIBRATED, recipe="test", variant="uniform", schedule="linear", tpp=0.12, tau=0.3,
                                     m_star=0.4, r_p_fit=0.9, steps=48))

    pack_fp = computed["pack"].fingerprint
    cache_in_use = cache_folder(store, Reference("base", plans["reference"].fingerprint, base_uri), pack_fp)
    cache_unused = cache_folder(store, Reference("base", "0123456789abcdef", "elsewhere"), pack_fp)
    for folder in (cache_in_use, cache_unused):
        write_part(store, folder, np.arange(4), np.full(4, 2.5))
    put(store, store.path("mlflow", "1", "0a1b2c", "artifacts", "model", "MLmodel"), b"artifact_path: model\n")
    return {
        "root": root, "store": store, "kept_path": kept_path, "kept": kept, "computed": computed, "plans": plans,
        "unkept_place": unkept_place, "registered_place": registered_place, "owner": owner, "base_uri": base_uri,
        "cache_in_use": cache_in_use.rsplit("/", 1)[-1], "cache_unused": cache_unused.rsplit("/", 1)[-1],
    }


def test_status_lists_every_stage_with_fingerprint_state_size_and_age(shelf):
    store = shelf["store"]
    result = invoke("status", str(shelf["kept_path"]), "--variant", "uniform", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["recipe"] == "test" and report["variant"] == "uniform" and report["store"] == store.url
    stages = {entry["stage"]: entry for entry in report["stages"]}
    assert list(stages) == list(GRAPH.names)
    computed = shelf["computed"]
    for name in ("ingest", "score", "predict", "tokenizer", "pack", "place"):  # the runner's own fingerprints
        entry = stages[name]
        assert (entry["fingerprint"], entry["state"], entry["action"]) == (computed[name].fingerprint, "complete", "reuse"), name
        assert entry["uri"] == store.uri(name, entry["fingerprint"])
        assert entry["bytes"] == sum(path.stat().st_size for path in Path(store.path(name, entry["fingerprint"])).rglob("*") if path.is_file())
        assert 0 <= entry["age_seconds"] < 3600 and entry["lease"] is None
    assert stages["place"]["scope"] == "variant" and stages["ingest"]["scope"] == "recipe"
    base = stages["base"]
    assert base["state"] == "resolved" and base["uri"] == shelf["base_uri"] and base["reason"] == "nothing to compute"
    assert stages["reference"]["state"] == "resolved" and stages["reference"]["fingerprint"] == base["fingerprint"]  # reference: base

    train = stages["train"]
    assert train["state"] == "leased" and train["fingerprint"] == shelf["plans"]["train"].fingerprint
    assert train["lease"]["pid"] == os.getpid() and train["lease"]["host"] == socket.gethostname()
    assert train["lease"]["expires_unix"] > report["stages"][0]["modified_unix"]
    assert stages["evalset"]["state"] == "partial" and stages["evalset"]["bytes"] == 200
    reevaluate = stages["reevaluate"]
    assert (reevaluate["fingerprint"], reevaluate["state"], reevaluate["unknown_until"]) == (None, "unknown", "train")

    other = {entry["stage"]: entry for entry in json.loads(invoke("status", str(shelf["kept_path"]), "--variant", "end", "--json").stdout)["stages"]}
    assert other["place"]["state"] == "missing" and other["place"]["fingerprint"] not in (None, computed["place"].fingerprint)
    assert other["place"]["bytes"] == 0 and other["place"]["modified_unix"] is None
    assert (other["train"]["state"], other["train"]["unknown_until"]) == ("unknown", "place")
    assert other["ingest"]["fingerprint"] == computed["ingest"].fingerprint  # shared by every variant

    text = invoke("status", str(shelf["kept_path"]), "--variant", "uniform").stdout
    rows = {stage: " ".join(cells) for stage, cells in table_rows(text, 99).items()}
    assert rows["train"].split()[2] == "leased" and f"by process {os.getpid()} on {socket.gethostname()} until " in rows["train"]
    assert rows["reevaluate"].split()[1:5] == ["unknown", "until", "train", "unknown"]
    assert rows["evalset"].split()[2:5] == ["partial", "200", "B"]


def test_run_dry_run_says_what_it_would_reuse_or_compute_and_writes_nothing(shelf, tmp_path):
    store_root = Path(shelf["store"].path())
    before = snapshot(store_root)
    home = tmp_path / "home"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("TRECFLOW_", "PREFECT_", "MLFLOW_"))}
    result = subprocess.run([str(TRECFLOW), "run", str(shelf["kept_path"]), "--variant", "uniform", "--dry-run"], cwd=tmp_path,
                            env={**env, "TRECFLOW_HOME": str(home), "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout, 4)
    for name in ("ingest", "score", "predict", "tokenizer", "pack", "place"):
        assert rows[name][1:] == ["reuse", shelf["computed"][name].fingerprint, "complete output with the same fingerprint"], rows[name]
    assert rows["base"][1] == "reuse" and rows["base"][3] == "nothing to compute"
    assert rows["train"][1] == "compute" and rows["train"][3].startswith(f"leased by process {os.getpid()} on ")
    assert rows["train"][3].endswith(": the run waits for it, then reuses its output")
    assert rows["evalset"][1:] == ["compute", shelf["plans"]["evalset"].fingerprint, "partial output (no manifest): cleared and computed again"]
    assert rows["reevaluate"][1:] == ["compute", "-", "fingerprint unknown until train is computed"]
    assert result.stdout.rstrip().endswith("8 to reuse, 3 to compute, 0 skipped")
    assert snapshot(store_root) == before  # nothing written to the store
    assert not (home / "mlflow.db").exists() and not list(home.rglob("*.db"))  # no MLflow run, no Prefect flow run (no database)

    forced = invoke("run", str(shelf["kept_path"]), "--variant", "uniform", "--dry-run", "--force", "place", "--until", "train")
    assert forced.exit_code == 0, forced.output
    actions = {stage: cells[1:] for stage, cells in table_rows(forced.stdout, 4).items()}
    assert list(actions) == ["ingest", "score", "predict", "tokenizer", "pack", "base", "place", "train"]  # what train needs
    assert actions["pack"][0] == "reuse" and actions["place"][0::2] == ["compute", "forced"] and actions["train"][0::2] == ["compute", "forced"]
    assert snapshot(store_root) == before
    unknown = invoke("run", str(shelf["kept_path"]), "--variant", "nosuch", "--dry-run")
    assert unknown.exit_code == 2 and "unknown variant 'nosuch'" in unknown.stderr


def test_gc_removes_only_what_nothing_protects(shelf, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    store, root = shelf["store"], Path(shelf["store"].path())
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    client = MlflowClient(tracking_uri=tracking)
    client.create_registered_model("tiny")
    registered, unkept = shelf["registered_place"].fingerprint, shelf["unkept_place"].fingerprint
    client.create_model_version("tiny", source=store.uri("place", registered), tags={STORE_TAG: store.url, STAGE_TAG: "place", FINGERPRINT_TAG: registered})
    client.create_model_version("tiny", source=f"s3://elsewhere/place/{unkept}", tags={STORE_TAG: "s3://elsewhere", STAGE_TAG: "place", FINGERPRINT_TAG: unkept})
    assert registered_outputs(store, tracking, page_size=1) == {("place", registered)}  # every page read; other stores ignored

    refused = invoke("gc", "--dry-run")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1 and refused.stderr.startswith("error: gc: --keep RECIPE is required")

    before = snapshot(root)
    dry = invoke("gc", "--keep", str(shelf["kept_path"]), "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    planned = json.loads(dry.stdout)
    expected = {f"place/{unkept}": "complete", f"score/{UNKEPT_PARTIAL}": "partial", f"checkpoints/{ORPHAN_CHECKPOINTS}": "-",
                f"refcache/{shelf['cache_unused']}": "-"}
    assert {item["location"]: item["state"] for item in planned["removed"]} == expected
    sizes = {item["location"]: item["bytes"] for item in planned["removed"]}
    assert sizes[f"score/{UNKEPT_PARTIAL}"] == 600 and sizes[f"checkpoints/{ORPHAN_CHECKPOINTS}"] == 500
    assert sizes[f"place/{unkept}"] == sum(path.stat().st_size for path in Path(store.path("place", unkept)).rglob("*") if path.is_file())
    assert planned["total_bytes"] == sum(sizes.values()) and planned["dry_run"] is True
    kept = planned["kept"]
    assert kept["registered model"] == 1 and kept["calibration table"] == 1 and kept["leased"] == 1
    assert kept["checkpoints of a running job"] == 1 and kept["reference-loss cache in use"] == 1
    # the kept recipe: 6 committed outputs of uniform, its leased train, partial evalset, base folder in the store, train's checkpoints
    assert kept["kept recipe"] == 10
    assert planned["running_unreferenced"] == [f"train/{LEASED_ELSEWHERE} (leased by process {os.getpid()} on {socket.gethostname()} until "
                                               + planned["running_unreferenced"][0].rsplit(" until ", 1)[1]]
    assert dry.stderr.startswith(f"warning: train/{LEASED_ELSEWHERE} (leased by process") and "keep its recipe (--keep)" in dry.stderr
    assert snapshot(root) == before  # --dry-run removes nothing

    text = invoke("gc", "--keep", str(shelf["kept_path"]))
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert lines[0] == "removed" and any(line.startswith(f"score/{UNKEPT_PARTIAL}") and "600 B" in line for line in lines)
    assert any(line.startswith("total") and line.endswith(f"4 folders, {human_bytes(planned['total_bytes'])}") for line in lines)
    after = snapshot(root)
    for location in expected:
        assert not Path(store.path(location)).exists(), location
    assert {name for name in before if not name.startswith(tuple(expected))} == set(after)  # everything else is still there
    for protected in (f"place/{registered}", f"reevaluate/{CALIBRATED}", f"train/{LEASED_ELSEWHERE}", f"checkpoints/{LEASED_ELSEWHERE}",
                      f"refcache/{shelf['cache_in_use']}", f"base/{SMOLLM2}", "mlflow/1", "calibration/runs"):
        assert Path(store.path(protected)).exists(), protected
    status = {entry["stage"]: entry["state"] for entry in json.loads(invoke("status", str(shelf["kept_path"]), "--json").stdout)["stages"]}
    assert status["place"] == "complete" and status["train"] == "leased" and status["evalset"] == "partial"

    # a re-evaluation of no kept recipe is running: it may be writing any cache, so every cache stays
    stray = cache_folder(store, Reference("base", "fedcba9876543210", "elsewhere"), shelf["computed"]["pack"].fingerprint)
    write_part(store, stray, np.arange(2), np.full(2, 1.0))
    running = Lease(store.output("reevaluate", "5555666677778888"), Owner.this_process(), seconds=3600)
    assert running.try_acquire() is None
    busy = json.loads(invoke("gc", "--keep", str(shelf["kept_path"]), "--dry-run", "--json").stdout)
    assert busy["removed"] == [] and busy["kept"]["reference-loss cache in use"] == 2 and busy["kept"]["leased"] == 2
    assert remove(store, Removal("reevaluate", "5555666677778888", "", 0, "leased"), "train", "refcache") is False  # the holder keeps it
    running.release()
    done = json.loads(invoke("gc", "--keep", str(shelf["kept_path"]), "--json").stdout)
    assert {item["location"] for item in done["removed"]} == {"reevaluate/5555666677778888", f"refcache/{stray.rsplit('/', 1)[-1]}"}
    assert not Path(store.path("reevaluate", "5555666677778888")).exists() and not Path(stray).exists()


def test_gc_on_s3_and_bad_keeps(s3_endpoint, tmp_path, monkeypatch):
    """The same listing, states and removal through s3fs (moto's server)."""
    import uuid

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    store = Store(f"s3://{BUCKET}/inventory-{uuid.uuid4().hex[:8]}", s3_endpoint)
    data = read_yaml((CONFIGS / "test.yaml").read_text())
    for section in ("corpus", "scoring", "tokenizer", "base"):  # only the prediction applies: no Ray, milliseconds
        data.pop(section)
    data["store"] = {"url": store.url, "endpoint_url": s3_endpoint}
    kept_path = tmp_path / "kept.yaml"
    kept_path.write_text(yaml.safe_dump(data))
    other_path = tmp_path / "other.yaml"
    other_path.write_text(yaml.safe_dump({**data, "optimizer": {**data["optimizer"], "peak_lr": 1.0e-3}}))
    runner = Runner(GRAPH, store)
    kept = runner.run(Target(load_recipe(kept_path)), until="predict")["predict"]
    other = runner.run(Target(load_recipe(other_path)), until="predict")["predict"]
    assert kept.fingerprint != other.fingerprint
    assert Lease(store.output("train", LEASED_ELSEWHERE), Owner.this_process(), seconds=3600).try_acquire() is None
    store.output("score", UNKEPT_PARTIAL).write_bytes("shards/part-00000.parquet", b"p" * 600)

    stages = {entry["stage"]: entry for entry in json.loads(invoke("status", str(kept_path), "--json").stdout)["stages"]}
    assert stages["predict"]["state"] == "complete" and stages["predict"]["fingerprint"] == kept.fingerprint
    assert stages["predict"]["bytes"] > 0 and 0 <= stages["predict"]["age_seconds"] < 600
    assert stages["ingest"]["state"] == "skipped" and stages["ingest"]["reason"] == "no corpus section"

    done = json.loads(invoke("gc", "--keep", str(kept_path), "--json").stdout)
    assert {item["location"] for item in done["removed"]} == {f"predict/{other.fingerprint}", f"score/{UNKEPT_PARTIAL}"}
    assert done["kept"]["kept recipe"] == 1 and done["kept"]["leased"] == 1
    store.fs.invalidate_cache()
    assert not store.output("predict", other.fingerprint).exists() and not store.fs.exists(store.path("predict", other.fingerprint))
    assert not store.fs.exists(store.path("score", UNKEPT_PARTIAL)) and store.output("predict", kept.fingerprint).exists()
    assert store.fs.exists(store.path("train", LEASED_ELSEWHERE))

    elsewhere = tmp_path / "elsewhere.yaml"
    elsewhere.write_text(yaml.safe_dump({**data, "store": {"url": str(tmp_path / "store")}}))
    mixed = invoke("gc", "--keep", str(kept_path), "--keep", str(elsewhere), "--dry-run")
    assert mixed.exit_code == 2 and "--keep: the recipes use different stores" in mixed.stderr
    bad = invoke("gc", "--keep", str(tmp_path / "missing.yaml"))
    assert bad.exit_code == 2 and bad.stderr.count("\n") == 1


def test_sizes_and_ages_read_for_people():
    assert [human_bytes(count) for count in (None, 0, 999, 1000, 1_234_567, 5.2e12)] == ["-", "0 B", "999 B", "1.0 kB", "1.2 MB", "5.2 TB"]
    assert [human_age(seconds) for seconds in (None, 4.9, 61, 7200, 3 * 86400)] == ["-", "4 s", "1 min", "2 h", "3 d"]
