"""Prefect flows, deployments and the `trecflow` CLI: the pipeline's outer layer.

Importing this package points Prefect and MLflow at ``TRECFLOW_HOME`` (unless the user set them)
before anything imports Prefect.
"""

from trecflow.settings import configure_environment

configure_environment()
