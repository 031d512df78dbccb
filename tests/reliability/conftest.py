"""Fixtures of the reliability tests: one real ``mlflow server`` per test worker."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on its own SQLite store, started once per test worker (10 to
    20 s each start) and shared by the tests that front it with a proxy or a gate. Its store
    holds every such test's runs: a test finds its own by run id, or by the runs it added."""
    pytest.importorskip("mlflow")
    from tests.reliability.servers import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server"))
    server.start()
    try:
        yield server
    finally:
        server.stop()
