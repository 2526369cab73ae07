"""Node leases and the store audit (`coilctl check`) against a real etcd: each kind of damage is
made by writing etcd directly, found with the right severity, and repaired only where safe."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.audit import Severity
from coil_allocator.etcd_store import EtcdStore
from coil_allocator.store import Delete, Put
from coil_core import errors
from coil_core.model import Family, Owner, RecordRequest
from tests.conftest import snapshot, usable

COILCTL = str(Path(sys.executable).parent / "coilctl")


def record(allocator: Allocator, node: str, pool: str, block: object, i: int, cid: str) -> str:
    address = usable(allocator, pool, block)[i]  # type: ignore[arg-type]
    (result,) = allocator.record(
        node,
        [RecordRequest.from_strings(str(address), pool, str(block), Owner("ns", cid, cid, "eth0"))],
    )
    assert result.outcome.value == "recorded", result
    return str(address)


def kinds(allocator: Allocator, repair: bool = False, grace: int = 600) -> dict[str, Severity]:
    findings, _ = allocator.check_store(repair, grace)
    return {f.kind: f.severity for f in findings}


@pytest.fixture
def live(allocator: Allocator) -> Allocator:
    """A pool with node-a alive (reporting the right routes) and holding one used block."""
    allocator.create_pool("default", ["10.1.0.0/24", "fd00:1::/120"], 4)
    block, _ = allocator.claim_block("node-a", "default", Family.IPV4)
    record(allocator, "node-a", "default", block.cidr, 0, "c0")
    allocator.report_node("node-a", 0, [str(block.cidr)], 119)
    return allocator


def test_clean_store_has_no_findings(live: Allocator) -> None:
    assert kinds(live) == {}


def test_live_node_cannot_be_released_without_force(live: Allocator) -> None:
    with pytest.raises(errors.FailedPrecondition, match="agent is alive"):
        live.release_node("node-a")
    blocks, removed = live.release_node("node-a", force=True)
    assert len(blocks) == 1 and removed == 1


def test_lease_expires_when_the_agent_stops_reporting(store: EtcdStore, etcd_prefix: str) -> None:
    allocator = Allocator(store, etcd_prefix, node_ttl=2)
    allocator.create_pool("default", ["10.1.0.0/24"], 4)
    block, _ = allocator.claim_block("node-b", "default")
    lease, ttl = allocator.report_node("node-b", 0, [str(block.cidr)], 119)
    assert ttl == 2
    # Reports keep the same lease alive.
    for _ in range(3):
        time.sleep(1)
        again, _ = allocator.report_node("node-b", lease, [str(block.cidr)], 119)
        assert again == lease
    assert "node-agent-gone" not in kinds(allocator)
    time.sleep(3.5)  # the lease (2 s) runs out: the agent counts as gone
    assert kinds(allocator)["node-agent-gone"] == Severity.WARNING
    blocks, _ = allocator.release_node("node-b")  # no force needed any more
    assert [b.cidr for b in blocks] == [block.cidr]
    # A report after expiry gets a new lease.
    new, _ = allocator.report_node("node-b", lease, [], 119)
    assert new != lease


def test_record_outside_held_block_is_critical_and_repaired_by_claiming(
    live: Allocator, store: EtcdStore
) -> None:
    block = live.node_blocks("node-a")[0][0]
    keys = live.keys
    store.txn(
        [],
        [
            Delete(keys.block("default", block.cidr)),
            Delete(keys.node_block("node-a", "default", block.cidr)),
        ],
    )
    assert kinds(live)["record-outside-held-block"] == Severity.CRITICAL
    findings, _ = live.check_store(repair=True)
    repaired = [f for f in findings if f.kind == "record-outside-held-block"]
    assert repaired[0].repaired.startswith("claimed block")
    assert [b.cidr for b in live.node_blocks("node-a")[0]] == [block.cidr]
    assert kinds(live) == {}


def test_attachment_and_index_drift_are_repaired(live: Allocator, store: EtcdStore) -> None:
    keys = live.keys
    block = live.node_blocks("node-a")[0][0]
    address = usable(live, "default", block.cidr)[0]
    # An attachment pointing at nothing, a record whose attachment is gone, a stale index entry
    # and a held block missing from its node's index.
    store.txn(
        [],
        [
            Put(keys.attachment("ghost", "eth0", 4), b"default/10.1.0.0_28/10.1.0.9"),
            Delete(keys.attachment("c0", "eth0", 4)),
            Put(keys.node_block("node-z", "default", block.cidr), b'{"claimed_at": 0}'),
        ],
    )
    other, _ = live.claim_block("node-a", "default", Family.IPV4)
    store.txn([], [Delete(keys.node_block("node-a", "default", other.cidr))])
    found = kinds(live)
    assert found == {
        "attachment-without-record": Severity.WARNING,
        "record-without-attachment": Severity.WARNING,
        "stale-node-index": Severity.WARNING,
        "block-missing-from-node-index": Severity.WARNING,
        "routes-out-of-step": Severity.WARNING,  # node-a reported one block, holds two
    }
    live.check_store(repair=True)
    live.report_node("node-a", 0, [str(block.cidr), str(other.cidr)], 119)
    assert kinds(live) == {}
    # The repaired attachment works: a repeat of the record finds it.
    (again,) = live.record(
        "node-a",
        [
            RecordRequest.from_strings(
                str(address), "default", str(block.cidr), Owner("ns", "c0", "c0", "eth0")
            )
        ],
    )
    assert again.outcome.value == "recorded"


def test_gone_node_and_its_empty_blocks(live: Allocator, store: EtcdStore) -> None:
    used, _ = live.claim_block("node-gone", "default", Family.IPV4)
    empty, _ = live.claim_block("node-gone", "default", Family.IPV6)
    record(live, "node-gone", "default", used.cidr, 0, "g0")
    found = kinds(live, grace=0)
    assert found["node-agent-gone"] == Severity.WARNING
    assert found["empty-block-held"] == Severity.WARNING
    before = snapshot(store, live.keys.prefix)
    live.check_store(repair=False, empty_grace=0)
    assert snapshot(store, live.keys.prefix) == before  # no repair without --repair
    findings, _ = live.check_store(repair=True, empty_grace=0)
    assert any(f.kind == "empty-block-held" and f.repaired for f in findings)
    # The empty block went back; the used one stays for the operator's node release.
    held = {b.cidr for b in live.node_blocks("node-gone")[0]}
    assert held == {used.cidr}
    assert "node-agent-gone" in kinds(live)


def test_record_in_foreign_block_is_not_repaired(live: Allocator, store: EtcdStore) -> None:
    block = live.node_blocks("node-a")[0][0]
    store.txn([], [Put(live.keys.block("default", block.cidr), b"node-b")])
    before = snapshot(store, live.keys.prefix)
    findings, _ = live.check_store(repair=True)
    foreign = [f for f in findings if f.kind == "record-in-foreign-block"]
    assert foreign and foreign[0].severity == Severity.CRITICAL and not foreign[0].repaired
    assert "node-b" in foreign[0].message
    after = snapshot(store, live.keys.prefix)
    assert (
        after[live.keys.block("default", block.cidr)]
        == before[live.keys.block("default", block.cidr)]
    )


def coilctl(addr: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [COILCTL, "--allocator", addr, *args], capture_output=True, text=True, timeout=60
    )


def test_coilctl_check(allocator_addr: str, live: Allocator, store: EtcdStore) -> None:
    clean = coilctl(allocator_addr, "check")
    assert clean.returncode == 0 and "no problems found" in clean.stdout, clean
    store.txn([], [Delete(live.keys.attachment("c0", "eth0", 4))])
    found = coilctl(allocator_addr, "check")
    assert found.returncode == 4, found
    assert "record-without-attachment" in found.stdout and "WARNING" in found.stdout
    doc = json.loads(coilctl(allocator_addr, "check", "-o", "json").stdout)
    assert doc["findings"][0]["kind"] == "record-without-attachment"
    assert doc["findings"][0]["severity"] == "warning"
    repaired = coilctl(allocator_addr, "check", "--repair")
    assert repaired.returncode == 0, repaired
    assert "repaired: re-created the attachment key" in repaired.stdout
    assert coilctl(allocator_addr, "check").returncode == 0
    refused = coilctl(allocator_addr, "node", "release", "node-a", "--yes")
    assert refused.returncode == 1 and "agent is alive" in refused.stderr
    forced = coilctl(allocator_addr, "node", "release", "node-a", "--yes", "--force")
    assert forced.returncode == 0, forced


def test_unreadable_keys_are_findings_not_failures(live: Allocator, store: EtcdStore) -> None:
    store.txn(
        [],
        [
            Put(live.keys.prefix + "records/default/4/not-a-block/10.1.0.9", b"{}"),
            Put(live.keys.prefix + "blocks/default/garbage", b"node-a"),
            Put(live.keys.prefix + "attachments/c9/eth0/4", b"\xff\xfe"),
        ],
    )
    findings, _ = live.check_store(repair=True)
    malformed = sorted(f.subject for f in findings if f.kind == "malformed-key")
    assert len(malformed) == 3 and all(f.startswith(live.keys.prefix) for f in malformed)
    assert all(f.severity == Severity.CRITICAL for f in findings if f.kind == "malformed-key")


def test_coilctl_check_empty_grace_zero(allocator_addr: str, live: Allocator) -> None:
    live.claim_block("node-gone", "default", Family.IPV6)
    found = coilctl(allocator_addr, "check", "--empty-grace", "0", "-o", "json")
    doc = json.loads(found.stdout)
    assert found.returncode == 4
    assert "empty-block-held" in {f["kind"] for f in doc["findings"]}
    default = json.loads(coilctl(allocator_addr, "check", "-o", "json").stdout)
    assert "empty-block-held" not in {f["kind"] for f in default["findings"]}
