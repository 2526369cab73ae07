"""The access model's pure parts: the policy file, the per-RPC decision, the audit line, the
bound on expensive reads; and identities read from real certificates by a real gRPC server.

The full authorization table against a real allocator and etcd is in tests/test_authz.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from coil.v1 import allocator_pb2 as pb
from coil.v1 import allocator_pb2_grpc as pb_grpc
from coil_grpc.access import RULES, Decision, Identity, Via, decide, rule_of, targets
from coil_grpc.auditlog import AuditLog, audit_line
from coil_grpc.files import key_file_warning, prepare_socket_path, socket_directory_problem
from coil_grpc.guard import AccessGuard
from coil_grpc.http import serve_http
from coil_grpc.identity import Identifier, subject_of
from coil_grpc.limits import ExpensiveReads
from coil_grpc.policy import (
    DEFAULT_POLICY,
    Grant,
    PolicyError,
    Role,
    Subject,
    load_policy,
    parse_policy,
)
from tests.harness.pki import Ca, KeyPair, Pki

A = "/coil.v1.AllocatorService/"

# -- the policy ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "grant"),
    [
        (Subject("system:node:node-1", ("system:nodes",)), Grant(Role.NODE, "node-1")),
        # The kubelet's CN without its group, or the group with another CN: no role.
        (Subject("system:node:node-1"), None),
        (Subject("node-1", ("system:nodes",)), None),
        (Subject("system:node:", ("system:nodes",)), None),
        (Subject("alice", ("coil:operators",)), Grant(Role.OPERATOR)),
        (Subject("bob", ("coil:viewers",)), Grant(Role.VIEWER)),
        # First match wins: a node that is also in coil:operators is a node.
        (
            Subject("system:node:n2", ("coil:operators", "system:nodes")),
            Grant(Role.NODE, "n2"),
        ),
        (Subject("kube-apiserver-kubelet-client", ("system:masters",)), None),
        (Subject(""), None),
    ],
    ids=lambda v: repr(v) if not isinstance(v, Subject) else f"{v.common_name}/{v.organizations}",
)
def test_default_policy(subject: Subject, grant: Grant | None) -> None:
    assert DEFAULT_POLICY.grant(subject) == grant


def test_policy_file_with_san_and_common_name_rules(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        """
        [[match]]
        role = "operator"
        san = "spiffe://cluster.local/ns/coil/sa/admin"
        [[match]]
        role = "viewer"
        common_name = "prometheus"
        [[match]]
        role = "node"
        common_name_prefix = "node:"
        """
    )
    policy = load_policy(str(path))
    admin = Subject("x", (), ("spiffe://cluster.local/ns/coil/sa/admin",))
    assert policy.grant(admin) == Grant(Role.OPERATOR)
    assert policy.grant(Subject("prometheus")) == Grant(Role.VIEWER)
    assert policy.grant(Subject("node:worker-3")) == Grant(Role.NODE, "worker-3")
    # Only what the file says: the kubelet's certificate means nothing under this policy.
    assert policy.grant(Subject("system:node:n1", ("system:nodes",))) is None
    assert load_policy("") is DEFAULT_POLICY


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[match]]\nrole = 'admin'\norganization = 'x'", "match #1: role 'admin' is not one of"),
        ("[[match]]\norganization = 'x'", "match #1: role is missing"),
        ("[[match]]\nrole = 'viewer'", "match #1: no condition"),
        ("[[match]]\nrole = 'node'\norganization = 'x'", "needs common_name_prefix"),
        ("[[match]]\nrole = 'viewer'\ncn = 'x'", "match #1: unknown key 'cn'"),
        ("[[match]]\nrole = 'viewer'\norganization = ''", "organization must be a non-empty"),
        ("[[match]]\nrole = 'viewer'\norganization = 3", "organization must be a non-empty"),
        ("[unix]\noperator = [0]", "unknown key 'unix'"),
        ("match = 'x'", "match must be an array"),
        ("[[match]\n", "not valid TOML"),
    ],
)
def test_bad_policy_is_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "policy file 'p.toml'")
    assert str(e.value).startswith("policy file 'p.toml'")
    assert message in str(e.value)


def test_unreadable_policy_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"policy file '.*missing.toml': No such file"):
        load_policy(str(tmp_path / "missing.toml"))


# -- the decision --------------------------------------------------------------------------------

NODE1 = Identity("system:node:node-1", Via.CERTIFICATE, Grant(Role.NODE, "node-1"))
VIEWER = Identity("bob", Via.CERTIFICATE, Grant(Role.VIEWER))
OPERATOR = Identity("alice", Via.CERTIFICATE, Grant(Role.OPERATOR))
NOBODY = Identity("stranger", Via.CERTIFICATE)
ANONYMOUS = Identity("anonymous", Via.NONE)


def test_node_acts_only_for_itself() -> None:
    claim = rule_of(A + "ClaimBlock")
    assert decide(A + "ClaimBlock", claim, NODE1, pb.ClaimBlockRequest(node="node-1")).allowed
    other = decide(A + "ClaimBlock", claim, NODE1, pb.ClaimBlockRequest(node="node-2"))
    assert other == Decision(
        "PERMISSION_DENIED", 'ClaimBlock: node "node-1" may act only for itself, not for "node-2"'
    )
    missing = decide(A + "ClaimBlock", claim, NODE1, pb.ClaimBlockRequest())
    assert missing.code == "PERMISSION_DENIED" and "names no node" in missing.reason
    # Not a prefix match: "node-1" is not "node-10".
    assert not decide(A + "ClaimBlock", claim, NODE1, pb.ClaimBlockRequest(node="node-10")).allowed


def test_viewer_reads_and_check_without_repair_only() -> None:
    check = rule_of(A + "CheckStore")
    assert decide(A + "CheckStore", check, VIEWER, pb.CheckStoreRequest()).allowed
    refused = decide(A + "CheckStore", check, VIEWER, pb.CheckStoreRequest(repair=True))
    assert refused == Decision("PERMISSION_DENIED", 'CheckStore: viewer "bob" may only read')
    assert decide(A + "CheckStore", check, OPERATOR, pb.CheckStoreRequest(repair=True)).allowed


def test_no_role_and_no_identity() -> None:
    rule = rule_of(A + "ListPools")
    assert decide(A + "ListPools", rule, NOBODY, pb.ListPoolsRequest()).code == "PERMISSION_DENIED"
    assert decide(A + "ListPools", rule, ANONYMOUS, pb.ListPoolsRequest()).code == (
        "UNAUTHENTICATED"
    )
    health = rule_of("/grpc.health.v1.Health/Check")
    assert decide("/grpc.health.v1.Health/Check", health, ANONYMOUS, None).allowed


def test_a_method_without_rule_is_for_operators_only() -> None:
    rule = rule_of(A + "SomethingNew")
    assert decide(A + "SomethingNew", rule, OPERATOR, None).allowed
    for who in (NODE1, VIEWER):
        assert decide(A + "SomethingNew", rule, who, None).code == "PERMISSION_DENIED"


def test_every_rpc_of_both_services_has_a_rule() -> None:
    from coil.v1 import allocator_pb2, nodeagent_pb2

    for module, service in (
        (allocator_pb2, "AllocatorService"),
        (nodeagent_pb2, "NodeAgentService"),
    ):
        methods = module.DESCRIPTOR.services_by_name[service].methods_by_name
        for name in methods:
            assert f"/coil.v1.{service}/{name}" in RULES, name


# -- the audit line ------------------------------------------------------------------------------


def test_audit_line_is_one_line_whatever_the_request_says() -> None:
    request = pb.ReleaseAllocationsRequest(
        node="node-1\nforged=yes",
        items=[pb.ReleaseItem(address=f"10.0.0.{i}") for i in range(10)],
    )
    line = audit_line(NODE1, A + "ReleaseAllocations", request, "PERMISSION_DENIED", "why so")
    assert "\n" not in line
    assert line.startswith("audit method=ReleaseAllocations identity=system:node:node-1 ")
    assert 'node="node-1\\nforged=yes"' in line
    assert "addresses=10.0.0.0,10.0.0.1," in line and ",10.0.0.7,...+2 " in line
    assert line.endswith('outcome=PERMISSION_DENIED reason="why so"')


def test_targets_name_what_a_request_touches() -> None:
    assert targets(pb.CreatePoolRequest(name="p", subnets=["10.0.0.0/24"])) == [
        ("pool", "p"),
        ("subnets", "10.0.0.0/24"),
    ]
    assert targets(pb.FreeAddressRequest(address="10.0.0.5")) == [("address", "10.0.0.5")]


# -- the bound on expensive reads ---------------------------------------------------------------


def test_expensive_reads_never_wait() -> None:
    reads = ExpensiveReads(2)
    assert reads.try_enter() and reads.try_enter()
    assert not reads.try_enter()
    reads.leave()
    assert reads.try_enter()
    with pytest.raises(ValueError):
        ExpensiveReads(0)


# -- files ---------------------------------------------------------------------------------------


def test_key_file_readable_by_others_is_warned_about(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("secret")
    key.chmod(0o600)
    assert key_file_warning(str(key), "--tls-key") is None
    key.chmod(0o640)  # its group is ours: nobody else reads it
    assert key_file_warning(str(key), "--tls-key") is None
    key.chmod(0o644)
    assert key_file_warning(str(key), "--tls-key") == (
        f"--tls-key {str(key)!r} is readable by every user (mode 644): "
        "make it readable by this user only (chmod 600)"
    )


def test_socket_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "can be written by group or others" in (socket_directory_problem(str(shared)) or "")
    shared.chmod(0o1777)  # sticky, like /tmp
    assert socket_directory_problem(str(shared)) is None
    with pytest.raises(ValueError, match="can be written"):
        (tmp_path / "open").mkdir(mode=0o777)
        (tmp_path / "open").chmod(0o777)
        prepare_socket_path(str(tmp_path / "open" / "a.sock"))
    regular = tmp_path / "file.sock"
    regular.write_text("")
    with pytest.raises(ValueError, match="not a socket"):
        prepare_socket_path(str(regular))


# -- identities from real certificates ----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Pki, Ca]:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    return pki, pki.ca("access-ca")


def test_subject_of_a_kubelet_style_certificate(pki: tuple[Pki, Ca]) -> None:
    p, ca = pki
    node = p.node(ca, "node-7")
    assert subject_of(node.cert.read_bytes()) == Subject("system:node:node-7", ("system:nodes",))
    spiffe = p.issue(ca, "svc", subject="/O=a/O=b/CN=svc", sans=("URI:spiffe://c/x", "DNS:x.y"))
    assert subject_of(spiffe.cert.read_bytes()) == Subject(
        "svc", ("a", "b"), ("spiffe://c/x", "x.y")
    )
    assert subject_of(b"-----BEGIN CERTIFICATE-----\nnot one\n-----END CERTIFICATE-----\n") is None


class _Echo(pb_grpc.AllocatorServiceServicer):
    """Answers ListPools and ClaimBlock; counts the calls that got through."""

    def __init__(self) -> None:
        self.calls = 0

    def ListPools(self, request: Any, context: Any) -> pb.ListPoolsResponse:
        self.calls += 1
        return pb.ListPoolsResponse()

    def ClaimBlock(self, request: Any, context: Any) -> pb.ClaimBlockResponse:
        self.calls += 1
        return pb.ClaimBlockResponse(block=pb.Block(node=request.node))

    def CheckStore(self, request: Any, context: Any) -> pb.CheckStoreResponse:
        self.calls += 1
        time.sleep(0.5)
        return pb.CheckStoreResponse()


@pytest.fixture
def guarded(pki: tuple[Pki, Ca], tmp_path: Path) -> Iterator[tuple[_Echo, int, str, list[str]]]:
    """A real gRPC server behind the guard: mTLS on a TCP port, plaintext on a UNIX socket."""
    p, ca = pki
    server_pair = p.issue(ca, f"server-{tmp_path.name}", server=True)
    echo = _Echo()
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(f"test.audit.{tmp_path.name}")
    logger.addHandler(Capture())
    logger.setLevel(logging.INFO)
    guard = AccessGuard(Identifier(DEFAULT_POLICY), audit=AuditLog(logger), reads=ExpensiveReads(1))
    server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[guard])
    pb_grpc.add_AllocatorServiceServicer_to_server(echo, server)
    creds = grpc.ssl_server_credentials(
        [(server_pair.key.read_bytes(), server_pair.cert.read_bytes())],
        root_certificates=ca.cert.read_bytes(),
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", creds)
    sock = str(tmp_path / "guarded.sock")
    server.add_insecure_port(f"unix:{sock}")
    server.start()
    try:
        yield echo, port, sock, lines
    finally:
        server.stop(None)


def _tls_stub(port: int, ca: Ca, pair: KeyPair) -> tuple[grpc.Channel, Any]:
    creds = grpc.ssl_channel_credentials(
        ca.cert.read_bytes(), pair.key.read_bytes(), pair.cert.read_bytes()
    )
    channel = grpc.secure_channel(f"127.0.0.1:{port}", creds)
    return channel, pb_grpc.AllocatorServiceStub(channel)


def test_guard_identifies_certificates_and_unix_peers(
    guarded: tuple[_Echo, int, str, list[str]], pki: tuple[Pki, Ca]
) -> None:
    echo, port, sock, lines = guarded
    p, ca = pki
    node = p.node(ca, "node-1")
    channel, stub = _tls_stub(port, ca, node)
    with channel:
        assert stub.ClaimBlock(pb.ClaimBlockRequest(node="node-1"), timeout=5).block.node == (
            "node-1"
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.ClaimBlock(pb.ClaimBlockRequest(node="node-2"), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == (
            'ClaimBlock: node "node-1" may act only for itself, not for "node-2"'
        )
    assert echo.calls == 1
    assert lines == [
        "audit method=ClaimBlock identity=system:node:node-1 via=certificate role=node "
        "as_node=node-1 node=node-1 outcome=OK",
        "audit method=ClaimBlock identity=system:node:node-1 via=certificate role=node "
        'as_node=node-1 node=node-2 outcome=PERMISSION_DENIED reason="ClaimBlock: node '
        '\\"node-1\\" may act only for itself, not for \\"node-2\\""',
    ]
    # A certificate the policy gives no role: refused, and the refusal audited even for a read.
    stranger = p.issue(ca, "stranger")
    channel, stub = _tls_stub(port, ca, stranger)
    with channel:
        with pytest.raises(grpc.RpcError) as e:
            stub.ListPools(pb.ListPoolsRequest(), timeout=5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "identity=stranger" in lines[-1] and "role=none" in lines[-1]
    # The UNIX socket's peer (this test's own uid, or root): an operator.
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        reply = pb_grpc.AllocatorServiceStub(ch).ClaimBlock(
            pb.ClaimBlockRequest(node="node-9"), timeout=5
        )
    assert reply.block.node == "node-9"
    assert "via=unix role=operator" in lines[-1]


def test_guard_bounds_expensive_reads(
    guarded: tuple[_Echo, int, str, list[str]], pki: tuple[Pki, Ca]
) -> None:
    echo, port, sock, lines = guarded
    codes: list[grpc.StatusCode] = []

    def check() -> None:
        with grpc.insecure_channel(f"unix:{sock}") as ch:
            try:
                pb_grpc.AllocatorServiceStub(ch).CheckStore(pb.CheckStoreRequest(), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as e:
                codes.append(e.code())
                assert "too many expensive reads in progress (at most 1)" in (e.details() or "")

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    # Cheap calls go through while the bound is taken.
    with grpc.insecure_channel(f"unix:{sock}") as ch:
        pb_grpc.AllocatorServiceStub(ch).ListPools(pb.ListPoolsRequest(), timeout=5)
    for t in threads:
        t.join(10)
    assert codes.count(grpc.StatusCode.OK) >= 1
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert codes.count(grpc.StatusCode.UNAVAILABLE) >= 1


# -- the metrics HTTP server --------------------------------------------------------------------


def test_http_server_drops_idle_connections_and_caps_them() -> None:
    server = serve_http(
        "127.0.0.1:0",
        {"/metrics": lambda: (200, b"ok\n", "text/plain")},
        max_connections=4,
        read_timeout=1.0,
    )
    port = server.server_address[1]
    try:
        before = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(20)]
        time.sleep(0.3)
        # No more handler threads than the cap, however many connect.
        assert threading.active_count() <= before + 4
        for s in idle:
            s.close()
        # The idle connections are dropped after the read timeout; a scrape then gets through.
        deadline = time.monotonic() + 10
        body = b""
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                body = s.makefile("rb").read()
            if body:
                break
            time.sleep(0.2)
        assert body.startswith(b"HTTP/1.0 200") and body.endswith(b"ok\n")
    finally:
        server.shutdown()
        server.server_close()
