"""MLflow tracking: one experiment per recipe name (of the "model training" kind, so MLflow 3's UI
opens it on its runs), one run per pipeline run (recipe x variant), one child run per stage.

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
from trecflow.redact import redact
from trecflow.settings import tracking_uri
from trecflow.store import Store

# MLflow caps a parameter value at 6000 characters.
MAX_PARAM_CHARS = 6000
# MLflow accepts at most 1000 metrics per batch.
METRICS_PER_BATCH = 1000
# The experiment tag that marks an experiment as model training (MLflow 3). The UI of MLflow 3.17
# decides its view from a global switch (GenAI by default), not from this tag: the links trecflow
# gives carry `UI_VIEW`, which opens "Model training" and stays through the UI's own navigation.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_VIEW = "workflowType=machine_learning"


def ui_url(base: str, route: str = "experiments") -> str:
    """An MLflow UI address (``base`` the UI's root, ``route`` e.g. ``experiments/3/runs/abc``)
    that opens MLflow's "Model training" view."""
    return f"{base.rstrip('/')}/#/{route}?{UI_VIEW}"


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
    """A thin, explicit wrapper over `mlflow.MlflowClient` for one store. Parameters and tags are
    recorded through `trecflow.redact.redact` (a URL's password as ``***``)."""

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
            return self.client.create_experiment(name, artifact_location=artifact_root, tags=EXPERIMENT_KIND)
        if experiment.artifact_location.removeprefix("file://").rstrip("/") != artifact_root:
            raise TrackingError(
                f"MLflow experiment {name!r} keeps its artifacts in {experiment.artifact_location}, "
                f"not in this store ({artifact_root}); give the recipe another name or use its store"
            )
        for key, value in EXPERIMENT_KIND.items():  # an experiment made by an older trecflow
            if experiment.tags.get(key) != value:
                self.client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id

    def newest_run(self, experiment: str, tags: dict[str, str]) -> str | None:
        """The id of the newest run of ``experiment`` carrying all of ``tags``, None if there is none."""
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            return None
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs([found.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0].info.run_id if runs else None

    def start_run(self, recipe: Recipe, run_name: str, tags: dict[str, str], with_params: bool = True) -> str:
        """A new run in the recipe's experiment (with the recipe as parameters unless
        ``with_params`` is False); returns its id."""
        run = self.client.create_run(self.experiment_id(recipe.name), run_name=run_name, tags={key: redact(str(value)) for key, value in tags.items()})
        if with_params:
            self.log_params(run.info.run_id, flatten(recipe.redacted_dump()))  # storage options' secrets as ***
        return run.info.run_id

    def log_series(self, run_id: str, series: dict[str, list[tuple[int, float]]]) -> None:
        """Metric histories (name -> [(step, value)]) in batches of `METRICS_PER_BATCH`."""
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(name, float(value), now, int(step)) for name, points in sorted(series.items()) for step, value in points]
        for start in range(0, len(metrics), METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + METRICS_PER_BATCH])

    def log_dataset(self, run_id: str, name: str, uri: str, digest: str, context: str) -> None:
        """A dataset input of the run (MLflow's ``log_input``): ``name`` at ``uri``, identified by
        ``digest`` (a stage fingerprint), used as ``context`` (e.g. training)."""
        import warnings

        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # a local path matches MLflow's two equivalent local sources
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(uri)
        dataset = MetaDataset(source, name=name, digest=digest)
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])

    def register_model(self, name: str, source: str, run_id: str, tags: dict[str, str], description: str) -> tuple[str, bool]:
        """A version of registered model ``name`` pointing at ``source`` (nothing is copied);
        the existing version with the same ``tags`` is reused. Returns (version, created)."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        query = " and ".join([f"name = '{name}'"] + [f"tags.`{key}` = '{value}'" for key, value in tags.items()])
        existing = self.client.search_model_versions(query, max_results=1)
        if existing:
            self.client.update_model_version(name, existing[0].version, description=description)
            return str(existing[0].version), False
        version = self.client.create_model_version(name, source, run_id=run_id, tags=tags, description=description)
        return str(version.version), True

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        entries = [Param(key, redact(str(value))[:MAX_PARAM_CHARS]) for key, value in sorted(params.items())]  # no URL's password
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
            self.client.set_tag(run_id, key, redact(str(value)))

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
