"""Where trecflow keeps its state on the embedded default, and how a run finds its services.

- ``TRECFLOW_HOME`` (default ``./.trecflow``) holds the MLflow SQLite database (``mlflow.db``),
  ``PREFECT_HOME`` (``prefect/``) and the default store (``store/``).
- The store URL: the recipe's ``store.url``, else ``TRECFLOW_STORE``, else ``<home>/store``.
- The S3 endpoint: the recipe's ``store.endpoint_url``, else ``AWS_ENDPOINT_URL``.
- The store's other fsspec options: ``TRECFLOW_STORE_OPTIONS``, a JSON object (`store_options`),
  read by every process that opens the store (the flow, Ray tasks, actors and jobs), each from its
  own environment, as credentials are: never from the recipe, so they are not in MLflow, in a
  job's spec in the store or in a ``runtime_env``.
- ``MLFLOW_TRACKING_URI`` overrides the tracking database.
- S3 retries: every S3 client trecflow makes uses botocore's ``standard`` retry mode with
  `S3_MAX_ATTEMPTS` attempts (`trecflow.store_s3.S3_OPTIONS` for the store; ``AWS_RETRY_MODE`` and
  ``AWS_MAX_ATTEMPTS``, unless set, for MLflow's own boto3 client of artifacts in an S3 store).

`configure_environment` must run before Prefect is imported: Prefect reads ``PREFECT_HOME`` then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trecflow.recipe import Recipe

STORE_OPTIONS_ENV = "TRECFLOW_STORE_OPTIONS"
# botocore's retry policy for every S3 client (why: docs/cluster.md, "An object store that throttles or fails")
S3_RETRY_MODE = "standard"
S3_MAX_ATTEMPTS = 5


class SettingsError(ValueError):
    """An environment setting that cannot be used; the message names the variable (one line)."""


def home() -> Path:
    """The trecflow home folder (absolute; not created)."""
    return Path(os.environ.get("TRECFLOW_HOME", ".trecflow")).expanduser().resolve()


def store_url(recipe: Recipe | None = None) -> str:
    """The store URL a run writes to."""
    if recipe is not None and recipe.store.url:
        return recipe.store.url
    return os.environ.get("TRECFLOW_STORE") or str(home() / "store")


def store_endpoint(recipe: Recipe | None = None) -> str | None:
    """The S3-compatible endpoint of the store, if any."""
    if recipe is not None and recipe.store.endpoint_url:
        return recipe.store.endpoint_url
    return os.environ.get("AWS_ENDPOINT_URL") or None


def store_options() -> dict[str, Any]:
    """The store's extra fsspec options from ``TRECFLOW_STORE_OPTIONS`` (a JSON object; ``{}``
    when unset). `SettingsError` names the variable, never its value (it may hold credentials)."""
    raw = os.environ.get(STORE_OPTIONS_ENV, "").strip()
    if not raw:
        return {}
    try:
        options = json.loads(raw)
    except json.JSONDecodeError as error:
        raise SettingsError(f"{STORE_OPTIONS_ENV}: not valid JSON ({error.msg} at character {error.pos})") from None
    if not isinstance(options, dict):
        raise SettingsError(f"{STORE_OPTIONS_ENV}: must be a JSON object of fsspec options, got a {type(options).__name__}")
    return options


def merge_options(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated with ``extra``, nested mappings merged (``client_kwargs`` of both kept)."""
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_options(merged[key], value)
        else:
            merged[key] = value
    return merged


def expand_options(value: Any) -> Any:
    """``value`` (storage options) with ``${VAR}`` and ``$VAR`` expanded in every string, as
    `expand_path` does; called where a filesystem is built, so secrets stay in the environment."""
    if isinstance(value, dict):
        return {key: expand_options(item) for key, item in value.items()}
    if isinstance(value, list):
        return [expand_options(item) for item in value]
    return expand_path(value) if isinstance(value, str) else value


def tracking_uri() -> str:
    """The MLflow tracking URI: ``MLFLOW_TRACKING_URI`` or SQLite in the home folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def configure_environment() -> None:
    """Point Prefect and MLflow at the home folder unless the user configured them.

    Idempotent; sets environment variables only (creates nothing on disk)."""
    root = home()
    os.environ.setdefault("PREFECT_HOME", str(root / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    # A fresh ephemeral database migrates on first start: slower than Prefect's 20 s on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri())
    # MLflow's boto3 client (artifacts in an S3 store) reads botocore's retry policy from the
    # environment: the store's policy, unless the user chose one
    os.environ.setdefault("AWS_RETRY_MODE", S3_RETRY_MODE)
    os.environ.setdefault("AWS_MAX_ATTEMPTS", str(S3_MAX_ATTEMPTS))
    # Ray 2.60 turns token authentication on by default; the embedded cluster is loopback only.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def ensure_home() -> None:
    """Create the home folder and Prefect's home (Prefect's SQLite database needs the folder)."""
    home().mkdir(parents=True, exist_ok=True)
    Path(os.environ.get("PREFECT_HOME", home() / "prefect")).expanduser().mkdir(parents=True, exist_ok=True)


def expand_path(path: str) -> str:
    """Expand ``${VAR}`` and ``~`` in a configured path; ``TRECFLOW_HOME`` defaults to the home."""
    with_home = path.replace("${TRECFLOW_HOME}", str(home())).replace("$TRECFLOW_HOME", str(home()))
    return os.path.expanduser(os.path.expandvars(with_home))
