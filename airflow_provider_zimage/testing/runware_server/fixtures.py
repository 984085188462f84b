"""Pytest fixtures of the test server; tests/conftest.py loads them as a pytest plugin.

Function scope on purpose: a server starts in milliseconds, and a fresh one per test means counters
and faults can never leak from one test into the next.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .server import RunwareTestServer

__all__ = ["runware_server", "runware_server_factory"]


@pytest.fixture
def runware_server_factory() -> Iterator[Callable[..., RunwareTestServer]]:
    """Start servers with options (`factory(delay=0.2, api_key="k")`); all are stopped at teardown."""
    servers: list[RunwareTestServer] = []

    def factory(**options: Any) -> RunwareTestServer:
        server = RunwareTestServer(**options).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest.fixture
def runware_server() -> Iterator[RunwareTestServer]:
    """A running server with default options (api key "test-key", no delay)."""
    with RunwareTestServer() as server:
        yield server
