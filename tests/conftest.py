"""Shared fixtures: a real etcd server per test session, an isolated key prefix per test, and a
running coil-allocator (in-process gRPC server on a UNIX socket) per test that needs one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from tests.harness.etcd import EtcdServer, start_etcd


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    server = start_etcd()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def etcd_prefix() -> str:
    """A key prefix no other test uses, so tests share one etcd without seeing each other."""
    return f"/coil-test-{uuid.uuid4().hex[:10]}/"
