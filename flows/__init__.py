"""Prefect flows, deployments and the `trecflow` CLI: the pipeline's outer layer.

Importing this package points Prefect and MLflow at ``TRECFLOW_HOME`` (unless the user set them)
before anything imports Prefect, and masks credentials in every log record of the process
(`trecflow.redact.install_log_redaction`: Prefect's logs of a failed flow carry its exception).
"""

from trecflow.redact import install_log_redaction
from trecflow.settings import configure_environment

configure_environment()
install_log_redaction()
