"""Shared fixtures: a real etcd server per test session, an isolated key prefix per test, and a
running coil-allocator (in-process gRPC server on a UNIX socket) per test that needs one."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.keys import Keys
from coil_allocator.servicer import serve
from coil_allocator.view import ClusterView
from coil_core.blocks import Address, Network, reserved_addresses
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


@pytest.fixture
def store(etcd_server: EtcdServer) -> Iterator[EtcdStore]:
    s = EtcdStore(EtcdConfig((etcd_server.endpoint,)))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def allocator(store: EtcdStore, etcd_prefix: str) -> Iterator[Allocator]:
    """An allocator as a replica runs it: with its watch-fed view of the prefix."""
    view = ClusterView(store, Keys(etcd_prefix))
    view.start(wait=5)
    try:
        yield Allocator(store, etcd_prefix, view=view)
    finally:
        view.stop()


def snapshot(store: EtcdStore, prefix: str) -> dict[str, bytes]:
    """Every key and value under `prefix`: compare two to prove a failed request changed nothing."""
    kvs, _ = store.range(prefix)
    return {kv.key: kv.value for kv in kvs}


@pytest.fixture
def allocator_addr(allocator: Allocator, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A running allocator gRPC server (in-process, on a UNIX socket) over this test's prefix."""
    path = tmp_path_factory.mktemp("alloc") / "allocator.sock"
    server, _ = serve(allocator, f"unix:{path}")
    try:
        yield f"unix:{path}"
    finally:
        server.stop(grace=None)


def usable(allocator: Allocator, pool: str, block: Network) -> list[Address]:
    """The addresses of a block that may be recorded: all but the pool subnet's reserved ones
    (network address, gateway, IPv4 broadcast)."""
    subnet = next(p for p in allocator.list_pools() if p.name == pool).subnet_of(block)
    assert subnet is not None
    reserved = set(reserved_addresses(subnet))
    every = (block.network_address + i for i in range(block.num_addresses))
    return [a for a in every if a not in reserved]
