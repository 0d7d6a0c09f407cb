"""Where trecflow keeps its state on the embedded default, and how a run finds its services.

- ``TRECFLOW_HOME`` (default ``./.trecflow``) holds the MLflow SQLite database (``mlflow.db``),
  ``PREFECT_HOME`` (``prefect/``) and the default store (``store/``).
- The store URL: the recipe's ``store.url``, else ``TRECFLOW_STORE``, else ``<home>/store``.
- The S3 endpoint: the recipe's ``store.endpoint_url``, else ``AWS_ENDPOINT_URL``.
- ``MLFLOW_TRACKING_URI`` overrides the tracking database.

`configure_environment` must run before Prefect is imported: Prefect reads ``PREFECT_HOME`` then.
"""

from __future__ import annotations

import os
from pathlib import Path

from trecflow.recipe import Recipe


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
