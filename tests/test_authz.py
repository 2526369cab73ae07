"""Who may do what, against the real coil-allocator and the real coild: every RPC of both
services, called by each kind of caller.

The callers: no certificate, node-1 acting for itself, node-1 acting for node-2, a viewer, an
operator (certificates from a throwaway CA, under the default policy), root on the UNIX socket,
and a non-root user on the UNIX socket (`setpriv --reuid=65534`). Each case asserts that the call
was allowed (it succeeded) or its exact status, and after a refusal that etcd is unchanged.

The allocator listens on mutual TLS (TCP, loopback) and on its UNIX socket; coild serves only its
UNIX socket, so a certificate gets nothing there (the TLS handshake fails: UNAVAILABLE).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from pyetcd import etcdrpc

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil.v1 import nodeagent_pb2 as npb
from coil_allocator.etcd_store import EtcdStore
from tests.conftest import snapshot
from tests.harness.cluster import BIN, Proc, spawn, start_coild, wait_until
from tests.harness.etcd import EtcdServer, free_port
from tests.harness.net import Netns
from tests.harness.pki import Ca, KeyPair, Pki

pytestmark = pytest.mark.root  # the non-root caller is made with setpriv

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
OK = "OK"
CALLERS = ("no-cert", "node-1-self", "node-1-for-node-2", "viewer", "operator", "root", "nobody")
DEFAULT_POOL = "default"
DEFAULT_SUBNET = "10.160.0.0/12"
COILD_NODE = "node-coild"

# A non-root caller in its own process: the method and the serialized request in, the status out.
RAW_CALL = textwrap.dedent(
    """
    import sys, grpc
    target, method, body = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
    with grpc.insecure_channel(target) as ch:
        try:
            ch.unary_unary(method)(body, timeout=5)
            print("OK")
        except grpc.RpcError as e:
            print(e.code().name)
    """
)


@dataclass(frozen=True)
class Certs:
    ca: Ca
    server: KeyPair
    node1: KeyPair
    viewer: KeyPair
    operator: KeyPair


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    pki = Pki(tmp_path_factory.mktemp("authz-pki"))
    ca = pki.ca("authz-ca")
    return Certs(
        ca=ca,
        server=pki.issue(ca, "coil-allocator", server=True),
        node1=pki.node(ca, "node-1"),
        viewer=pki.viewer(ca, "bob"),
        operator=pki.operator(ca, "alice"),
    )


@dataclass
class Allocator:
    """The real allocator: mutual TLS on `tcp`, plaintext on the UNIX socket `unix`."""

    proc: Proc
    tcp: str
    unix: str
    prefix: str
    store: EtcdStore
    certs: Certs

    def channel(self, caller: str) -> grpc.Channel:
        """A channel as `caller` ("root" and "nobody" aside: see `call`)."""
        if caller == "root":
            return grpc.insecure_channel(self.unix)
        pair = {
            "no-cert": None,
            "node-1-self": self.certs.node1,
            "node-1-for-node-2": self.certs.node1,
            "viewer": self.certs.viewer,
            "operator": self.certs.operator,
        }[caller]
        creds = grpc.ssl_channel_credentials(
            self.certs.ca.cert.read_bytes(),
            pair.key.read_bytes() if pair else None,
            pair.cert.read_bytes() if pair else None,
        )
        return grpc.secure_channel(self.tcp, creds)

    def snapshot(self) -> dict[str, bytes]:
        """Every key of this allocator but those of COILD_NODE, whose coild (when the coild
        tests started it) changes them by itself at any time."""
        return {
            k: v
            for k, v in snapshot(self.store, self.prefix).items()
            if COILD_NODE not in k and COILD_NODE.encode() not in v
        }


def call_as(
    caller: str, target: str, channel: Callable[[str], grpc.Channel], method: str, request: Any
) -> str:
    """Make one call as `caller`; its status code's name ("OK" when it succeeded)."""
    if caller == "nobody":
        done = subprocess.run(
            [
                *NOBODY,
                sys.executable,
                "-c",
                RAW_CALL,
                target,
                method,
                request.SerializeToString().hex(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()
    with channel(caller) as ch:
        try:
            if method.endswith("/WatchNode"):
                # A server stream: allowed when its first message (the snapshot) arrives.
                stream = ch.unary_stream(
                    method,
                    request_serializer=type(request).SerializeToString,
                    response_deserializer=lambda b: b,
                )(request, timeout=10)
                next(stream)
                stream.cancel()
                return OK
            ch.unary_unary(
                method,
                request_serializer=type(request).SerializeToString,
                response_deserializer=lambda b: b,
            )(request, timeout=10)
            return OK
        except grpc.RpcError as e:
            return e.code().name


@pytest.fixture(scope="module")
def shared_dir() -> Iterator[Path]:
    """A directory everyone may enter: only the sockets' own modes keep a non-root user out."""
    d = Path(tempfile.mkdtemp(prefix="coil-authz-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def allocator(
    etcd_server: EtcdServer,
    certs: Certs,
    shared_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Allocator]:
    from coil_allocator.etcd_store import EtcdConfig

    prefix = f"/coil-authz-{uuid.uuid4().hex[:8]}/"
    tcp = f"127.0.0.1:{free_port()}"
    unix = f"unix:{shared_dir}/allocator.sock"
    log = tmp_path_factory.mktemp("authz") / "allocator.log"
    proc = spawn(
        "coil-allocator",
        [
            str(BIN / "coil-allocator"),
            "--listen",
            f"{unix},{tcp}",
            "--tls-cert",
            str(certs.server.cert),
            "--tls-key",
            str(certs.server.key),
            "--tls-client-ca",
            str(certs.ca.cert),
            "--etcd-endpoints",
            etcd_server.endpoint,
            "--etcd-prefix",
            prefix,
            "--metrics-addr",
            "",
        ],
        log,
    )
    store = EtcdStore(EtcdConfig((etcd_server.endpoint,)))
    alloc = Allocator(proc, tcp, unix, prefix, store, certs)
    try:

        def answers() -> bool:
            return (
                call_as(
                    "root",
                    unix,
                    alloc.channel,
                    "/coil.v1.AllocatorService/ListPools",
                    apb.ListPoolsRequest(),
                )
                == OK
            )

        wait_until("allocator", answers, proc=proc)
        with alloc.channel("root") as ch:
            apb_grpc.AllocatorServiceStub(ch).CreatePool(
                apb.CreatePoolRequest(
                    name=DEFAULT_POOL, subnets=[DEFAULT_SUBNET], block_size_bits=4
                ),
                timeout=10,
            )
        yield alloc
    finally:
        proc.stop()
        store.close()
    assert "Traceback" not in proc.log.read_text()


# -- the allocator's cases ---------------------------------------------------------------------

_serial = itertools.count(1)


class Setup:
    """Makes, as root (an operator), what one case's request needs; names are unique per case."""

    def __init__(self, allocator: Allocator) -> None:
        self.channel = allocator.channel("root")
        self.stub = apb_grpc.AllocatorServiceStub(self.channel)
        self.n = next(_serial)

    def close(self) -> None:
        self.channel.close()

    def block(self, node: str) -> apb.Block:
        return self.stub.ClaimBlock(
            apb.ClaimBlockRequest(node=node, pool=DEFAULT_POOL, family=apb.FAMILY_IPV4),
            timeout=10,
        ).block

    def record(self, node: str) -> tuple[str, str]:
        """A recorded address of `node`, and its container ID."""
        import ipaddress

        block = self.block(node)
        address = str(ipaddress.ip_network(block.cidr).network_address + 5)
        cid = f"c{self.n}-{uuid.uuid4().hex[:6]}"
        result = self.stub.RecordAllocations(
            apb.RecordAllocationsRequest(
                node=node,
                items=[
                    apb.RecordItem(
                        address=address,
                        pool=DEFAULT_POOL,
                        block=block.cidr,
                        owner=apb.Owner(
                            namespace="default", pod="p", container_id=cid, interface="eth0"
                        ),
                    )
                ],
            ),
            timeout=10,
        ).results[0]
        assert result.outcome == apb.RECORD_OUTCOME_RECORDED, result.message
        return address, cid


def allocator_request(method: str, node: str, setup: Setup) -> Any:
    """A request of `method` that succeeds when allowed, acting for `node`."""
    n = setup.n
    if method == "CreatePool":
        return apb.CreatePoolRequest(
            name=f"new-{n}", subnets=[f"fd01:{n:x}::/120"], block_size_bits=4
        )
    if method == "AddSubnet":
        return apb.AddSubnetRequest(pool=DEFAULT_POOL, subnet=f"fd02:{n:x}::/120")
    if method == "ListPools":
        return apb.ListPoolsRequest()
    if method == "GetPool":
        return apb.GetPoolRequest(name=DEFAULT_POOL)
    if method == "DeletePool":
        setup.stub.CreatePool(
            apb.CreatePoolRequest(
                name=f"old-{n}", subnets=[f"fd03:{n:x}::/120"], block_size_bits=4
            ),
            timeout=10,
        )
        return apb.DeletePoolRequest(name=f"old-{n}")
    if method == "ClaimBlock":
        return apb.ClaimBlockRequest(node=node, pool=DEFAULT_POOL, family=apb.FAMILY_IPV4)
    if method == "ReleaseBlock":
        return apb.ReleaseBlockRequest(node=node, pool=DEFAULT_POOL, block=setup.block(node).cidr)
    if method == "ListNodeBlocks":
        setup.record(node)
        return apb.ListNodeBlocksRequest(node=node, with_records=True)
    if method == "ReleaseNode":
        setup.record(node)
        return apb.ReleaseNodeRequest(node=node, force=True)
    if method == "RecordAllocations":
        import ipaddress

        block = setup.block(node)
        return apb.RecordAllocationsRequest(
            node=node,
            items=[
                apb.RecordItem(
                    address=str(ipaddress.ip_network(block.cidr).network_address + 6),
                    pool=DEFAULT_POOL,
                    block=block.cidr,
                    owner=apb.Owner(
                        namespace="default", pod="p", container_id=f"r{n}", interface="eth0"
                    ),
                )
            ],
        )
    if method == "ReleaseAllocations":
        address, cid = setup.record(node)
        return apb.ReleaseAllocationsRequest(
            node=node, items=[apb.ReleaseItem(address=address, container_id=cid, interface="eth0")]
        )
    if method == "GetAddress":
        return apb.GetAddressRequest(address=setup.record(node)[0])
    if method == "FreeAddress":
        return apb.FreeAddressRequest(address=setup.record(node)[0])
    if method == "GetUsage":
        return apb.GetUsageRequest()
    if method == "ReportNode":
        return apb.ReportNodeRequest(node=node, lease_id=0, routes=[], table=119)
    if method == "CheckStore":
        return apb.CheckStoreRequest(repair=False)
    if method == "WatchNode":
        return apb.WatchNodeRequest(node=node)
    if method == "CheckStore+repair":
        return apb.CheckStoreRequest(repair=True)
    raise AssertionError(f"no case for {method}: add one to the table")


ALLOCATOR_METHODS = [
    m for m in apb.DESCRIPTOR.services_by_name["AllocatorService"].methods_by_name
] + ["CheckStore+repair"]
NODE_SELF = {
    "ListPools",
    "ClaimBlock",
    "ReleaseBlock",
    "ListNodeBlocks",
    "RecordAllocations",
    "ReleaseAllocations",
    "ReportNode",
    "WatchNode",
}
VIEWER_READS = {"ListPools", "GetPool", "ListNodeBlocks", "GetAddress", "GetUsage", "CheckStore"}


def expected_allocator(caller: str, method: str) -> str:
    if caller in ("no-cert", "nobody"):
        return "UNAVAILABLE"  # no TLS handshake without a certificate; no connect() for nobody
    if caller in ("operator", "root"):
        return OK
    if caller == "viewer":
        return OK if method in VIEWER_READS else "PERMISSION_DENIED"
    if caller == "node-1-self":
        return OK if method in NODE_SELF else "PERMISSION_DENIED"
    # node-1 for node-2: only what names no node.
    return OK if method == "ListPools" else "PERMISSION_DENIED"


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method", ALLOCATOR_METHODS)
def test_allocator_authorization(allocator: Allocator, method: str, caller: str) -> None:
    node = "node-2" if caller == "node-1-for-node-2" else "node-1"
    setup = Setup(allocator)
    try:
        request = allocator_request(method, node, setup)
    finally:
        setup.close()
    rpc = f"/coil.v1.AllocatorService/{method.split('+')[0]}"
    target = allocator.unix if caller in ("root", "nobody") else allocator.tcp
    before = allocator.snapshot()
    got = call_as(caller, target, allocator.channel, rpc, request)
    assert got == expected_allocator(caller, method)
    if got != OK:
        assert allocator.snapshot() == before, "a refused call changed etcd"


def test_refusals_are_audited(allocator: Allocator) -> None:
    """One structured line per refusal and per change, naming who, what and the outcome."""
    with allocator.channel("node-1-for-node-2") as ch, pytest.raises(grpc.RpcError) as e:
        apb_grpc.AllocatorServiceStub(ch).ReleaseNode(
            apb.ReleaseNodeRequest(node="node-2", force=True), timeout=10
        )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert e.value.details() == 'ReleaseNode: node "node-1" may not call it (operators only)'
    with allocator.channel("operator") as ch:
        apb_grpc.AllocatorServiceStub(ch).CreatePool(
            apb.CreatePoolRequest(name="audited", subnets=["fd09::/120"], block_size_bits=4),
            timeout=10,
        )

    def lines() -> list[str]:
        return [ln for ln in allocator.proc.log.read_text().splitlines() if "msg=audit " in ln]

    wait_until("audit lines", lambda: any("pool=audited" in ln for ln in lines()))
    refused = [ln for ln in lines() if "method=ReleaseNode" in ln and "as_node=node-1" in ln]
    assert refused and refused[-1].endswith(
        'node=node-2 force=True outcome=PERMISSION_DENIED reason="ReleaseNode: node '
        '\\"node-1\\" may not call it (operators only)"'
    )
    created = [ln for ln in lines() if "pool=audited" in ln][-1]
    assert "logger=coil.audit" in created
    assert "method=CreatePool identity=alice via=certificate role=operator pool=audited" in created
    assert created.endswith("outcome=OK")


# -- one node cannot keep another's lease alive ------------------------------------------------


def lease_ttl(etcd: EtcdServer, lease_id: int) -> int:
    """The seconds etcd says are left on a lease (-1 once it expired)."""
    with grpc.insecure_channel(etcd.endpoint) as ch:
        reply = etcdrpc.LeaseStub(ch).LeaseTimeToLive(
            etcdrpc.LeaseTimeToLiveRequest(ID=lease_id), timeout=5
        )
    return int(reply.TTL)


def node2_lease_running_down(
    allocator: Allocator, etcd_server: EtcdServer
) -> tuple[apb.ReportNodeResponse, int]:
    """node-2's agent reports and gets its lease (lease IDs are easy to guess: sequential);
    2.5 s later its TTL is running down. Returns the report's answer and the seconds left."""
    with allocator.channel("root") as ch:
        node2 = apb_grpc.AllocatorServiceStub(ch).ReportNode(
            apb.ReportNodeRequest(node="node-2", routes=[], table=119), timeout=10
        )
    time.sleep(2.5)
    left = lease_ttl(etcd_server, node2.lease_id)
    assert 0 < left <= node2.ttl - 2
    return node2, left


def test_a_node_cannot_keep_another_nodes_lease_alive(
    allocator: Allocator, etcd_server: EtcdServer
) -> None:
    node2, left = node2_lease_running_down(allocator, etcd_server)
    # node-1, with its own certificate, reports for itself but sends node-2's lease ID.
    with allocator.channel("node-1-self") as ch:
        node1 = apb_grpc.AllocatorServiceStub(ch).ReportNode(
            apb.ReportNodeRequest(node="node-1", lease_id=node2.lease_id, table=119), timeout=10
        )
    # It gets a lease of its own; node-2's was not refreshed, nor bound to node-1.
    assert node1.lease_id != node2.lease_id
    assert lease_ttl(etcd_server, node2.lease_id) <= left
    kvs, _ = allocator.store.range(f"{allocator.prefix}nodes/node-1/alive")
    assert [kv.lease for kv in kvs] == [node1.lease_id]


def test_a_node_cannot_keep_another_nodes_lease_alive_by_watching(
    allocator: Allocator, etcd_server: EtcdServer
) -> None:
    node2, left = node2_lease_running_down(allocator, etcd_server)
    with allocator.channel("node-1-self") as ch:
        stub = apb_grpc.AllocatorServiceStub(ch)
        node1 = stub.ReportNode(apb.ReportNodeRequest(node="node-1", table=119), timeout=10)
        # node-1, with its own certificate, watches itself but names node-2's lease: told
        # lease_lost at once, as for a dead lease, and the stream ends.
        stream = stub.WatchNode(
            apb.WatchNodeRequest(node="node-1", lease_id=node2.lease_id), timeout=10
        )
        answers = list(stream)
        assert [a.lease_lost for a in answers] == [True]
        # node-2's lease was not refreshed, and nobody keeps it alive: it runs out.
        assert lease_ttl(etcd_server, node2.lease_id) <= left
        time.sleep(1.5)
        assert lease_ttl(etcd_server, node2.lease_id) <= left - 1
        # With its own lease, node-1's stream is served.
        own = stub.WatchNode(
            apb.WatchNodeRequest(node="node-1", lease_id=node1.lease_id), timeout=10
        )
        first = next(own)
        assert first.snapshot and not first.lease_lost
        own.cancel()
    log = allocator.proc.log.read_text()
    assert f'watch node "node-1": lease {node2.lease_id} is not the one' in log


# -- coild's NodeAgentService -------------------------------------------------------------------


@dataclass
class Coild:
    proc: Proc
    socket: Path
    certs: Certs

    @property
    def target(self) -> str:
        return f"unix:{self.socket}"

    def channel(self, caller: str) -> grpc.Channel:
        if caller == "root":
            return grpc.insecure_channel(self.target)
        pair = {
            "no-cert": None,
            "node-1-self": self.certs.node1,
            "node-1-for-node-2": self.certs.node1,
            "viewer": self.certs.viewer,
            "operator": self.certs.operator,
        }[caller]
        creds = grpc.ssl_channel_credentials(
            self.certs.ca.cert.read_bytes(),
            pair.key.read_bytes() if pair else None,
            pair.cert.read_bytes() if pair else None,
        )
        return grpc.secure_channel(
            self.target, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )


@pytest.fixture(scope="module")
def coild(
    allocator: Allocator, shared_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Coild]:
    ns = Netns.create("coilz-")
    proc: Proc | None = None
    try:
        socket = shared_dir / "coild.sock"
        log = tmp_path_factory.mktemp("authz-coild") / "coild.log"
        proc = start_coild(ns, COILD_NODE, allocator.unix, socket, log)
        yield Coild(proc, socket, allocator.certs)
    finally:
        if proc is not None:
            proc.stop()
        ns.delete()


def attachment(n: int) -> npb.Attachment:
    return npb.Attachment(container_id=f"authz-{n}-{uuid.uuid4().hex[:6]}", interface="eth0")


def coild_request(method: str, coild: Coild, touched: list[str] | None = None) -> Any:
    """A request of `method` that succeeds when allowed; the container IDs it would change (or
    that a refusal must leave alone) are added to `touched`."""
    n = next(_serial)
    touched = [] if touched is None else touched

    def allocated() -> npb.Attachment:
        att = attachment(n)
        touched.append(att.container_id)
        with coild.channel("root") as ch:
            ch.unary_unary(
                "/coil.v1.NodeAgentService/Allocate",
                request_serializer=npb.AllocateRequest.SerializeToString,
                response_deserializer=lambda b: b,
            )(npb.AllocateRequest(attachment=att, namespace="default", pod="p"), timeout=10)
        return att

    if method == "Allocate":
        att = attachment(n)
        touched.append(att.container_id)
        return npb.AllocateRequest(attachment=att, namespace="default", pod="p")
    if method == "Release":
        return npb.ReleaseRequest(attachment=allocated())
    if method == "Check":
        return npb.CheckRequest(attachment=allocated())
    if method == "GarbageCollect":
        allocated()  # not in the list: collected when allowed
        return npb.GarbageCollectRequest(valid_attachments=[allocated()], valid_list_complete=True)
    if method == "Status":
        return npb.StatusRequest()
    raise AssertionError(f"no case for {method}: add one to the table")


NODE_AGENT_METHODS = list(npb.DESCRIPTOR.services_by_name["NodeAgentService"].methods_by_name)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("method", NODE_AGENT_METHODS)
def test_coild_authorization(allocator: Allocator, coild: Coild, method: str, caller: str) -> None:
    """Only root on the node reaches coild: a certificate is no way in (coild serves no TLS),
    and a non-root user cannot connect to its socket."""
    touched: list[str] = []
    request = coild_request(method, coild, touched)

    def keys_of_this_case() -> dict[str, bytes]:
        # Only what this case's attachments own: coild changes other keys by itself at any time
        # (heartbeats, spare blocks, releases it defers).
        return {
            k: v
            for k, v in allocator.snapshot().items()
            if any(cid in k or cid.encode() in v for cid in touched)
        }

    before = keys_of_this_case()
    got = call_as(
        caller, coild.target, coild.channel, f"/coil.v1.NodeAgentService/{method}", request
    )
    assert got == (OK if caller == "root" else "UNAVAILABLE")
    if got != OK:
        assert keys_of_this_case() == before, "a refused call changed etcd"
    assert coild.proc.alive()


def test_coild_audits_changes(coild: Coild) -> None:
    request = coild_request("Release", coild)
    assert call_as("root", coild.target, coild.channel, "/coil.v1.NodeAgentService/Release",
                   request) == OK  # fmt: skip
    cid = request.attachment.container_id

    def line() -> str | None:
        for ln in coild.proc.log.read_text().splitlines():
            if "method=Release " in ln and f"container_id={cid}" in ln:
                return ln
        return None

    found = wait_until("coild's audit line", line)
    assert "logger=coil.audit" in found
    assert 'identity="unix peer (uid 0)" via=unix role=operator' in found
    assert found.endswith("interface=eth0 outcome=OK")


# -- a non-root local user reaches neither service ----------------------------------------------

CONNECT = textwrap.dedent(
    """
    import socket, sys
    for path in sys.argv[1:]:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            print("ok")
        except OSError as e:
            print(e.strerror)
        finally:
            s.close()
    """
)


def test_non_root_user_reaches_neither_service(allocator: Allocator, coild: Coild) -> None:
    sockets = [allocator.unix.removeprefix("unix:"), str(coild.socket)]
    for path in sockets:
        st = Path(path).lstat()
        assert (oct(st.st_mode & 0o777), st.st_uid) == (oct(0o600), 0), path
        assert Path(path).parent.stat().st_mode & 0o005, "the directory must let others in"

    def connect(wrapper: list[str]) -> list[str]:
        done = subprocess.run(
            [*wrapper, sys.executable, "-c", CONNECT, *sockets],
            capture_output=True,
            text=True,
            timeout=30,
            cwd="/",
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()

    assert connect(NOBODY) == ["Permission denied", "Permission denied"]
    assert connect([]) == ["ok", "ok"]


@pytest.mark.parametrize("caller", ["operator", "root", "viewer", "node-1-self"])
def test_an_undecodable_request_is_refused_whoever_sends_it(
    allocator: Allocator, caller: str
) -> None:
    """Bytes that are no protobuf message: whoever may make the call gets INVALID_ARGUMENT from
    the decoding; a node (which must name itself) and a viewer asking for a change are refused by
    the access check first. Nothing changes and nothing fails inside."""
    before = allocator.snapshot()
    for method in ("CheckStore", "ClaimBlock", "ListNodeBlocks"):
        may = caller in ("operator", "root") or (
            caller == "viewer" and method in ("CheckStore", "ListNodeBlocks")
        )
        with allocator.channel(caller) as ch, pytest.raises(grpc.RpcError) as e:
            ch.unary_unary(f"/coil.v1.AllocatorService/{method}")(b"\xff\xff\xff", timeout=10)
        expected = "INVALID_ARGUMENT" if may else "PERMISSION_DENIED"
        assert e.value.code().name == expected, (method, e.value.details())
    assert allocator.snapshot() == before
    assert "Traceback" not in allocator.proc.log.read_text()


def test_an_undecodable_watch_request_is_refused_as_invalid(allocator: Allocator) -> None:
    """The stream is served on the allocator's event loop; its undecodable request still gets
    INVALID_ARGUMENT from the decoding, with no traceback in the log."""
    with allocator.channel("operator") as ch, pytest.raises(grpc.RpcError) as e:
        list(ch.unary_stream("/coil.v1.AllocatorService/WatchNode")(b"\xff\xff\xff", timeout=10))
    assert e.value.code().name == "INVALID_ARGUMENT", e.value.details()
    assert "not a valid protobuf message" in (e.value.details() or "")
    assert "Traceback" not in allocator.proc.log.read_text()
