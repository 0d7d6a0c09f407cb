"""MLflow tracking: one experiment per recipe name, one run per pipeline run (recipe x variant).

Artifacts of an experiment live in ``<store>/mlflow/<experiment>``; the tracking database is
`settings.tracking_uri()` (SQLite in the home folder unless ``MLFLOW_TRACKING_URI`` is set).
MLflow is imported on first use so that light commands never pay for it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from trecflow.recipe import Recipe
from trecflow.settings import tracking_uri
from trecflow.store import Store

# MLflow caps a parameter value at 6000 characters.
MAX_PARAM_CHARS = 6000


class TrackingError(RuntimeError):
    """The tracking server or experiment cannot be used as configured."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b": leaf}``; None leaves are dropped."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}{key}."))
        return flat
    return {} if value is None else {prefix.rstrip("."): value}


class Tracker:
    """A thin, explicit wrapper over `mlflow.MlflowClient` for one store."""

    def __init__(self, store: Store):
        import mlflow

        self.store = store
        if store.endpoint_url:  # MLflow's S3 artifact repository reads this
            os.environ.setdefault("MLFLOW_S3_ENDPOINT_URL", store.endpoint_url)
        uri = tracking_uri()
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = mlflow.MlflowClient(tracking_uri=uri)

    def experiment_id(self, name: str) -> str:
        """The experiment ``name``, created with its artifacts in the store if new."""
        artifact_root = self.store.uri("mlflow", name)
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            return self.client.create_experiment(name, artifact_location=artifact_root)
        if experiment.artifact_location.removeprefix("file://").rstrip("/") != artifact_root:
            raise TrackingError(
                f"MLflow experiment {name!r} keeps its artifacts in {experiment.artifact_location}, "
                f"not in this store ({artifact_root}); give the recipe another name or use its store"
            )
        return experiment.experiment_id

    def start_run(self, recipe: Recipe, run_name: str, tags: dict[str, str], with_params: bool = True) -> str:
        """A new run in the recipe's experiment (with the recipe as parameters unless
        ``with_params`` is False); returns its id."""
        run = self.client.create_run(self.experiment_id(recipe.name), run_name=run_name, tags=tags)
        if with_params:
            self.log_params(run.info.run_id, flatten(recipe.model_dump(mode="json")))
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, str(value)[:MAX_PARAM_CHARS]) for key, value in sorted(params.items())]
        for start in range(0, len(entries), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(run_id, params=entries[start : start + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        for key, value in sorted(metrics.items()):
            self.client.log_metric(run_id, key, float(value), step=step)

    def log_artifact_bytes(self, run_id: str, name: str, data: bytes, artifact_path: str | None = None) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / name
            path.write_bytes(data)
            self.client.log_artifact(run_id, str(path), artifact_path=artifact_path)

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(run_id, key, value)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    @contextlib.contextmanager
    def run(self, recipe: Recipe, run_name: str, tags: dict[str, str], with_params: bool = True) -> Iterator[str]:
        """`start_run` for the block: the run ends FINISHED, or FAILED if the block raises."""
        run_id = self.start_run(recipe, run_name=run_name, tags=tags, with_params=with_params)
        try:
            yield run_id
        except BaseException:
            self.end_run(run_id, status="FAILED")
            raise
        self.end_run(run_id)
