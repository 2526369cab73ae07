"""Pools that overlap in etcd (written by hand, or by a restore mix-up; the API refuses them),
against a real etcd: a claim never takes a block that shares addresses with a block held in any
other pool, even from a stale view or when the other pool claims in between, and `coilctl check`
reports the overlap and any doubly held space as critical."""

from __future__ import annotations

import ipaddress
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.audit import Severity
from coil_allocator.etcd_store import EtcdStore
from coil_allocator.store import KeyValue, Put
from coil_core import errors
from coil_core.blocks import Network, overlapping
from coil_core.model import HeldBlock

A_END = ipaddress.IPv4Address("10.5.1.0")


def write_pool(store: EtcdStore, allocator: Allocator, name: str, subnet: str, bits: int) -> None:
    """A pool put straight into etcd, as etcdctl or a restore would, bypassing the overlap check."""
    value = json.dumps({"subnets": [subnet], "block_bits": bits}).encode()
    store.txn([], [Put(allocator.keys.pool(name), value)])


def held_blocks(allocator: Allocator, *pools: str) -> list[tuple[str, Network]]:
    out = []
    for pool in pools:
        _, subnets = allocator.get_pool(pool)
        out += [(pool, b.cidr) for s in subnets for b in s.held]
    return out


def assert_no_shared_address(held: list[tuple[str, Network]]) -> None:
    for (pa, a), (pb, b) in itertools.combinations(held, 2):
        assert not overlapping(a, b), f"{a} of {pa} and {b} of {pb} share addresses"


def claim_until_exhausted(allocator: Allocator, node: str, pool: str) -> list[HeldBlock]:
    got = []
    for _ in range(100):
        try:
            got.append(allocator.claim_block(node, pool)[0])
        except errors.PoolExhausted:
            return got
    raise AssertionError("never exhausted")


def test_claims_never_share_addresses_across_overlapping_pools(
    allocator: Allocator, store: EtcdStore
) -> None:
    allocator.create_pool("a", ["10.5.0.0/24"], 4)  # 16 blocks of 16
    for _ in range(3):
        allocator.claim_block("node-a", "a")
    write_pool(store, allocator, "b", "10.5.0.0/23", 6)  # 8 blocks of 64, half over "a"
    # Both pools claim in turns until neither has a free block.
    b = claim_until_exhausted(allocator, "node-b", "b")
    a = claim_until_exhausted(allocator, "node-a", "a")
    held = held_blocks(allocator, "a", "b")
    assert_no_shared_address(held)
    assert len(b) >= 4  # 10.5.1.0/24 is b's alone
    # All of 10.5.0.0/24 is used by one pool or the other: 3 + len(a) blocks of 16 and
    # the b blocks there.
    in_a_space = [c for p, c in held if p == "b" and int(c.broadcast_address) < int(A_END)]
    assert (3 + len(a)) * 16 + len(in_a_space) * 64 == 256


def test_specific_claim_of_a_block_overlapping_another_pools_block_is_refused(
    allocator: Allocator, store: EtcdStore
) -> None:
    allocator.create_pool("a", ["10.5.0.0/24"], 4)
    write_pool(store, allocator, "b", "10.5.0.0/24", 6)
    allocator.claim_specific_block("node-b", "b", "10.5.0.64/26")
    with pytest.raises(errors.AlreadyExists, match='"10.5.0.80/28".*pool "b".*node "node-b"'):
        allocator.claim_specific_block("node-a", "a", "10.5.0.80/28")
    allocator.claim_specific_block("node-a", "a", "10.5.0.0/28")  # outside b's block: fine


def test_a_replica_with_a_view_from_before_the_overlap_still_refuses(
    store: EtcdStore, etcd_prefix: str
) -> None:
    first = Allocator(store, etcd_prefix)
    first.create_pool("a", ["10.5.0.0/26"], 4)  # 4 blocks
    first.claim_block("node-a", "a")  # caches its view of the pools
    second = Allocator(store, etcd_prefix)
    write_pool(store, second, "b", "10.5.0.0/26", 4)
    taken = claim_until_exhausted(second, "node-b", "b")
    assert len(taken) == 3
    with pytest.raises(errors.PoolExhausted, match="other pools that overlap"):
        first.claim_block("node-a", "a")
    assert_no_shared_address(held_blocks(first, "a", "b"))


class InterleavingStore:
    """The real store, but once a read of `prefix` returns, `hook` runs: another replica's
    claim lands between a claim's read of the other pool and its transaction."""

    def __init__(self, store: EtcdStore, prefix: str, hook: Callable[[], object]) -> None:
        self._store = store
        self._prefix = prefix
        self._hook: Callable[[], object] | None = hook

    def range(self, prefix: str, **kw: Any) -> tuple[list[KeyValue], int]:
        result = self._store.range(prefix, **kw)
        if prefix == self._prefix and self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


def test_a_claim_racing_the_overlapping_pool_loses_the_compare(
    store: EtcdStore, etcd_prefix: str
) -> None:
    other = Allocator(store, etcd_prefix)
    other.create_pool("a", ["10.5.0.0/28"], 4)  # one block
    write_pool(store, other, "b", "10.5.0.0/28", 4)  # the same block, by hand
    racing = Allocator(
        InterleavingStore(  # type: ignore[arg-type]
            store,
            other.keys.blocks("b"),
            lambda: other.claim_specific_block("node-b", "b", "10.5.0.0/28"),
        ),
        etcd_prefix,
    )
    with pytest.raises(errors.PoolExhausted):
        racing.claim_block("node-a", "a")
    assert held_blocks(other, "a", "b") == [("b", next(iter(held_blocks(other, "b")))[1])]


def test_check_reports_overlapping_pools_and_doubly_held_space(
    allocator: Allocator, store: EtcdStore
) -> None:
    allocator.create_pool("a", ["10.5.0.0/24"], 4)
    held = allocator.claim_specific_block("node-a", "a", "10.5.0.16/28")
    write_pool(store, allocator, "b", "10.5.0.0/23", 6)
    # The duplicate a claim now refuses, as an older allocator or a restore left it.
    b_block = allocator.keys.block("b", held.cidr.supernet(new_prefix=26))
    store.txn(
        [],
        [
            Put(b_block, b"node-b"),
            Put(
                allocator.keys.node_block("node-b", "b", held.cidr.supernet(new_prefix=26)),
                b'{"claimed_at": 1}',
            ),
        ],
    )
    findings, _ = allocator.check_store(False)
    by_kind = {f.kind: f for f in findings}
    assert by_kind["pools-overlap"].severity == Severity.CRITICAL
    assert by_kind["pools-overlap"].subject == "pools a and b"
    twice = by_kind["address-space-held-twice"]
    assert twice.severity == Severity.CRITICAL
    assert "10.5.0.16/28" in twice.subject + twice.message
    assert "10.5.0.0/26" in twice.subject + twice.message
