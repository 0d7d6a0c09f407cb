"""``cluster_box``: the production path's services on loopback, once per test session (slow tests).

See tests/cluster/services.py for what runs and the helpers the tests use."""

from __future__ import annotations

import pytest

from .services import ClusterBox, start_box, stop_box


@pytest.fixture(scope="session")
def cluster_box(s3_endpoint) -> ClusterBox:
    """A Ray cluster of two nodes (head with the job server + a worker node), an MLflow server with
    its artifacts in moto's S3, a Prefect server with a process pool and its worker; stopped (and
    its folders removed) at the end of the session, whatever the tests did."""
    box = start_box(s3_endpoint)
    try:
        yield box
    finally:
        stop_box(box)
