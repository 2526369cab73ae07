"""Security of a coil deployment, checked against real processes: etcd over TLS with client
certificates and with username/password auth (token expiry included), the allocator's gRPC over TLS
with client certificates (coilctl, coild's client, the real coild), coild's CNI socket permissions,
metrics bound to loopback, and secrets kept out of command lines, logs and error messages.

Certificates come from a throwaway CA made with the `openssl` command (`tests.harness.pki`).
Tests that need root (namespaces, other users) are marked `root` and remove what they create.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pyetcd import etcdrpc

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.store import Put
from coild.allocator_client import AllocatorClient
from coild.errors import AllocatorRejected, AllocatorUnavailable
from tests.conftest import snapshot
from tests.harness.cluster import BIN, Proc, spawn, start_allocator, start_coild, wait_until
from tests.harness.etcd import EtcdServer, free_port, start_etcd
from tests.harness.net import Netns
from tests.harness.pki import Ca, KeyPair, Pki
from tests.harness.relay import relay_into

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
ETCDCTL = str(BIN / "etcdctl")
TOKEN_TTL = 2  # seconds, etcd's --auth-token-ttl on the auth etcd


@dataclass(frozen=True)
class Certs:
    ca: Ca
    other_ca: Ca
    etcd: KeyPair  # server certificate of the TLS etcd
    allocator: KeyPair  # server certificate of the allocator's gRPC
    client: (
        KeyPair  # signed by `ca`: etcd's client; an operator of the allocator (O coil:operators)
    )
    foreign: KeyPair  # a client certificate signed by `other_ca`
    node_tls: KeyPair  # the kubelet-style certificates of nodes "node-tls" and "node-good"
    node_good: KeyPair


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    pki = Pki(tmp_path_factory.mktemp("pki"))
    ca, other_ca = pki.ca("coil-test-ca"), pki.ca("other-ca")
    return Certs(
        ca=ca,
        other_ca=other_ca,
        etcd=pki.issue(ca, "etcd", server=True),
        allocator=pki.issue(ca, "coil-allocator", server=True),
        client=pki.operator(ca, "coil-client"),
        foreign=pki.issue(other_ca, "intruder"),
        node_tls=pki.node(ca, "node-tls"),
        node_good=pki.node(ca, "node-good"),
    )


def credentials(ca: Path | None, pair: KeyPair | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=pair.key.read_bytes() if pair else None,
        certificate_chain=pair.cert.read_bytes() if pair else None,
    )


def channel(addr: str, creds: grpc.ChannelCredentials | None) -> grpc.Channel:
    if creds is None:
        return grpc.insecure_channel(addr)
    # Over a UNIX socket gRPC checks the server's certificate against the socket's path (URL
    # encoded), not "localhost": name the certificate's host explicitly.
    options = [("grpc.ssl_target_name_override", "localhost")] if addr.startswith("unix:") else []
    return grpc.secure_channel(addr, creds, options=options)


def run_allocator(
    tmp: Path,
    etcd_endpoints: str,
    prefix: str,
    extra: list[str] | None = None,
    env: dict[str, str] | None = None,
    wrapper: list[str] | None = None,
    listen: str = "",
) -> tuple[Proc, str]:
    """Spawn coil-allocator, without waiting, on `listen` or a UNIX socket in `tmp`; returns it
    and its address."""
    addr = listen or f"unix:{tmp}/allocator-{uuid.uuid4().hex[:6]}.sock"
    args = [
        *(wrapper or []),
        str(BIN / "coil-allocator"),
        "--listen",
        addr,
        "--etcd-endpoints",
        etcd_endpoints,
        "--etcd-prefix",
        prefix,
        "--etcd-timeout",
        "2",
        "--metrics-addr",
        "",
        *(extra or []),
    ]
    return spawn("coil-allocator", args, tmp / "allocator.log", env), addr


def health(addr: str, creds: grpc.ChannelCredentials | None = None) -> int | None:
    """The allocator's overall health status, or None while it does not answer."""
    try:
        with channel(addr, creds) as ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return int(reply.status)
    except grpc.RpcError:
        return None


def wait_answering(proc: Proc, addr: str, creds: grpc.ChannelCredentials | None = None) -> None:
    wait_until(f"allocator on {addr}", lambda: health(addr, creds) is not None, proc=proc)


def wait_exit(proc: Proc, timeout: float = 20) -> int:
    try:
        return proc.popen.wait(timeout=timeout)
    finally:
        proc.kill()


def create_pool(addr: str, creds: grpc.ChannelCredentials | None, name: str, subnet: str) -> None:
    with channel(addr, creds) as ch:
        apb_grpc.AllocatorServiceStub(ch).CreatePool(
            apb.CreatePoolRequest(name=name, subnets=[subnet], block_size_bits=3), timeout=10
        )


def pool_names(addr: str, creds: grpc.ChannelCredentials | None) -> list[str]:
    with channel(addr, creds) as ch:
        listed = apb_grpc.AllocatorServiceStub(ch).ListPools(apb.ListPoolsRequest(), timeout=10)
    return [p.name for p in listed.pools]


def etcdctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([ETCDCTL, *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)}: {proc.stderr.strip()}")
    return proc


# -- 1. etcd over TLS with client certificates ------------------------------------------------


@pytest.fixture(scope="module")
def tls_etcd(certs: Certs) -> Iterator[EtcdServer]:
    server = start_etcd(
        "coil-tls",
        [
            "--cert-file",
            str(certs.etcd.cert),
            "--key-file",
            str(certs.etcd.key),
            "--client-cert-auth",
            "--trusted-ca-file",
            str(certs.ca.cert),
        ],
        scheme="https",
    )
    try:
        yield server
    finally:
        server.stop()


def test_allocator_uses_etcd_over_tls_with_client_certificate(
    tls_etcd: EtcdServer, certs: Certs, tmp_path: Path
) -> None:
    endpoint = f"https://{tls_etcd.endpoint}"
    prefix = f"/coil-tls-{uuid.uuid4().hex[:8]}/"
    tls = ["--etcd-tls-ca", str(certs.ca.cert)]
    tls += ["--etcd-tls-cert", str(certs.client.cert), "--etcd-tls-key", str(certs.client.key)]
    proc, addr = run_allocator(tmp_path, endpoint, prefix, tls)
    try:
        wait_answering(proc, addr)
        create_pool(addr, None, "default", "10.71.0.0/24")
        assert pool_names(addr, None) == ["default"]
        stored = etcdctl(
            "--endpoints",
            endpoint,
            "--cacert",
            str(certs.ca.cert),
            "--cert",
            str(certs.client.cert),
            "--key",
            str(certs.client.key),
            "get",
            "--prefix",
            "--keys-only",
            prefix,
        ).stdout
        assert prefix in stored, "the pool is not in the TLS etcd"
        assert proc.alive()
    finally:
        proc.stop()


def test_leases_are_kept_alive_over_tls_with_client_certificate(
    tls_etcd: EtcdServer, certs: Certs
) -> None:
    """The keep-alive stream has channels of its own: they must use the same TLS credentials."""
    store = EtcdStore(
        EtcdConfig(
            (f"https://{tls_etcd.endpoint}",),
            tls_ca=str(certs.ca.cert),
            tls_cert=str(certs.client.cert),
            tls_key=str(certs.client.key),
            timeout=3,
        )
    )
    try:
        key = f"/coil/tls-lease-{uuid.uuid4().hex[:8]}"
        lease = store.grant_lease(2)
        store.txn([], [Put(key, b"", lease=lease)])
        store.hold_lease(lease, 2)
        assert store.keep_alive(lease) > 0
        time.sleep(4)
        assert store.get(key) is not None
        assert store.lease_held(lease)
    finally:
        store.close()


@pytest.mark.parametrize("client", ["ca-only", "foreign-cert"])
def test_allocator_without_accepted_client_certificate_cannot_use_etcd(
    tls_etcd: EtcdServer, certs: Certs, tmp_path: Path, client: str
) -> None:
    endpoint = f"https://{tls_etcd.endpoint}"
    tls = ["--etcd-tls-ca", str(certs.ca.cert)]
    if client == "foreign-cert":
        tls += ["--etcd-tls-cert", str(certs.foreign.cert)]
        tls += ["--etcd-tls-key", str(certs.foreign.key)]
    proc, addr = run_allocator(tmp_path, endpoint, f"/coil-tls-{uuid.uuid4().hex[:8]}/", tls)
    try:
        wait_answering(proc, addr)
        with pytest.raises(grpc.RpcError) as failed:
            pool_names(addr, None)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, failed.value.details()
        assert "etcd" in (failed.value.details() or "")
        with pytest.raises(grpc.RpcError):
            create_pool(addr, None, "default", "10.72.0.0/24")
        # The health service reports what the allocator cannot reach, and it keeps running.
        wait_until(
            "health NOT_SERVING",
            lambda: health(addr) == health_pb2.HealthCheckResponse.NOT_SERVING,
            timeout=15,
            proc=proc,
        )
        assert proc.alive()
    finally:
        proc.stop()
    assert proc.popen.returncode == 0, proc.tail()
    assert "Traceback" not in proc.log.read_text()


# -- 2. etcd with username and password ------------------------------------------------------


@dataclass(frozen=True)
class AuthEtcd:
    server: EtcdServer
    user: str
    password: str
    root_password: str


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[AuthEtcd]:
    """An etcd with auth enabled, simple tokens that expire after TOKEN_TTL s, and a user `coil`
    that may read and write under /coil/ only."""
    server = start_etcd("coil-auth", ["--auth-token-ttl", str(TOKEN_TTL)])
    auth = AuthEtcd(server, "coil", f"pw-{uuid.uuid4().hex}", f"root-{uuid.uuid4().hex}")
    try:
        ep = ["--endpoints", server.endpoint]
        etcdctl(*ep, "user", "add", f"root:{auth.root_password}")
        etcdctl(*ep, "user", "grant-role", "root", "root")
        etcdctl(*ep, "role", "add", "coil")
        etcdctl(*ep, "role", "grant-permission", "coil", "--prefix=true", "readwrite", "/coil/")
        etcdctl(*ep, "user", "add", f"{auth.user}:{auth.password}")
        etcdctl(*ep, "user", "grant-role", auth.user, "coil")
        etcdctl(*ep, "auth", "enable")
        yield auth
    finally:
        server.stop()


def auth_env(user: str, password: str) -> dict[str, str]:
    return {"COIL_ETCD_USERNAME": user, "COIL_ETCD_PASSWORD": password}


def token_of(auth: AuthEtcd) -> str:
    with grpc.insecure_channel(auth.server.endpoint) as ch:
        reply = etcdrpc.AuthStub(ch).Authenticate(
            etcdrpc.AuthenticateRequest(name=auth.user, password=auth.password), timeout=5
        )
    return str(reply.token)


def token_works(auth: AuthEtcd, token: str) -> bool:
    with grpc.insecure_channel(auth.server.endpoint) as ch:
        try:
            etcdrpc.KVStub(ch).Range(
                etcdrpc.RangeRequest(key=b"/coil/probe"), timeout=5, metadata=[("token", token)]
            )
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAUTHENTICATED, e.details()
            return False
    return True


def test_allocator_authenticates_with_password_from_environment(
    auth_etcd: AuthEtcd, tmp_path: Path
) -> None:
    prefix = f"/coil/sec-{uuid.uuid4().hex[:8]}/"
    proc, addr = run_allocator(
        tmp_path,
        auth_etcd.server.endpoint,
        prefix,
        ["--log-level", "debug"],
        env=auth_env(auth_etcd.user, auth_etcd.password),
    )
    try:
        wait_answering(proc, addr)
        create_pool(addr, None, "default", "10.73.0.0/24")
        assert pool_names(addr, None) == ["default"]
        cmdline = Path(f"/proc/{proc.popen.pid}/cmdline").read_bytes()
        assert b"coil-allocator" in cmdline
        assert auth_etcd.password.encode() not in cmdline

        # Outlive etcd's simple tokens: a token unused for TOKEN_TTL s is refused, and the
        # allocator authenticates again by itself.
        probe = token_of(auth_etcd)
        assert token_works(auth_etcd, probe)
        time.sleep(TOKEN_TTL + 1.5)
        assert not token_works(auth_etcd, probe), "etcd did not expire the simple token"
        assert pool_names(addr, None) == ["default"]
        create_pool(addr, None, "team-a", "10.73.1.0/24")
        assert sorted(pool_names(addr, None)) == ["default", "team-a"]
        assert proc.alive()
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert "serving on" in log
    assert auth_etcd.password not in log


def test_allocator_reads_etcd_password_from_file(auth_etcd: AuthEtcd, tmp_path: Path) -> None:
    """The way the Kubernetes manifest passes it: a Secret mounted as a file, newline-ended."""
    secret = tmp_path / "password"
    secret.write_text(auth_etcd.password + "\n")
    secret.chmod(0o600)
    prefix = f"/coil/sec-{uuid.uuid4().hex[:8]}/"
    proc, addr = run_allocator(
        tmp_path,
        auth_etcd.server.endpoint,
        prefix,
        env={"COIL_ETCD_USERNAME": auth_etcd.user, "COIL_ETCD_PASSWORD_FILE": str(secret)},
    )
    try:
        wait_answering(proc, addr)
        create_pool(addr, None, "default", "10.74.0.0/24")
        assert pool_names(addr, None) == ["default"]
        environ = Path(f"/proc/{proc.popen.pid}/environ").read_bytes()
        assert auth_etcd.password.encode() not in environ
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert auth_etcd.password not in log
    assert "readable by" not in log, log  # mode 0600: no warning


@pytest.mark.parametrize(
    "content, mode, error",
    [
        (None, 0o600, "No such file or directory"),
        ("", 0o600, "the file is empty"),
        ("\n", 0o600, "the file is empty"),
        (b"\xff\xfe", 0o600, "not UTF-8 text"),
    ],
    ids=["missing", "empty", "only-newline", "not-utf8"],
)
def test_bad_etcd_password_file_is_named(
    auth_etcd: AuthEtcd, tmp_path: Path, content: str | bytes | None, mode: int, error: str
) -> None:
    secret = tmp_path / "password"
    if isinstance(content, bytes):
        secret.write_bytes(content)
    elif content is not None:
        secret.write_text(content)
    if content is not None:
        secret.chmod(mode)
    proc, _ = run_allocator(
        tmp_path,
        auth_etcd.server.endpoint,
        "/coil/sec-badfile/",
        ["--etcd-password-file", str(secret)],
        env={"COIL_ETCD_USERNAME": auth_etcd.user},
    )
    code = wait_exit(proc)
    log = proc.log.read_text()
    assert code == 2, log
    assert "Traceback" not in log
    assert f"--etcd-password-file {str(secret)!r}: {error}" in log


def test_etcd_password_and_password_file_exclude_each_other(
    auth_etcd: AuthEtcd, tmp_path: Path
) -> None:
    secret = tmp_path / "password"
    secret.write_text(auth_etcd.password)
    secret.chmod(0o600)
    proc, _ = run_allocator(
        tmp_path,
        auth_etcd.server.endpoint,
        "/coil/sec-both/",
        ["--etcd-password-file", str(secret)],
        env=auth_env(auth_etcd.user, auth_etcd.password),
    )
    code = wait_exit(proc)
    log = proc.log.read_text()
    assert code == 2, log
    assert "COIL_ETCD_PASSWORD and --etcd-password-file (COIL_ETCD_PASSWORD_FILE) exclude" in log
    assert auth_etcd.password not in log


@pytest.mark.parametrize("flag", ["--etcd-password-file", "--etcd-tls-key"])
def test_world_readable_secret_file_is_warned_about(
    auth_etcd: AuthEtcd, tmp_path: Path, flag: str
) -> None:
    """A secret any local user can read still works, but the log says so and how to fix it."""
    secret = tmp_path / "secret"
    secret.write_text(auth_etcd.password + "\n")
    secret.chmod(0o644)
    extra = [flag, str(secret)]
    env = {"COIL_ETCD_USERNAME": auth_etcd.user}
    if flag != "--etcd-password-file":
        env["COIL_ETCD_PASSWORD"] = auth_etcd.password
    proc, _ = run_allocator(tmp_path, auth_etcd.server.endpoint, "/coil/sec-ww/", extra, env=env)
    try:
        # The warning comes first; the allocator may exit after it (an etcd TLS key without
        # its certificate is refused), so do not fail on the exit itself.
        wait_until("the warning", lambda: "readable by" in proc.log.read_text() or not proc.alive())
    finally:
        proc.stop()
    log = proc.log.read_text()
    assert f"{flag} {str(secret)!r} is readable by every user (mode 644)" in log, log
    assert "chmod 600" in log
    assert auth_etcd.password not in log


def test_store_authenticates_again_after_token_expiry(auth_etcd: AuthEtcd) -> None:
    """The adapter itself, with no health thread keeping the token fresh."""
    store = EtcdStore(
        EtcdConfig(
            (auth_etcd.server.endpoint,), username=auth_etcd.user, password=auth_etcd.password
        )
    )
    try:
        key = f"/coil/sec-{uuid.uuid4().hex[:8]}"
        assert store.get(key) is None
        time.sleep(TOKEN_TTL + 1.5)
        assert store.get(key) is None
    finally:
        store.close()


# -- 6. (and 2.) no secret in errors ---------------------------------------------------------


def test_wrong_etcd_password_fails_at_start_without_revealing_it(
    auth_etcd: AuthEtcd, tmp_path: Path
) -> None:
    wrong = f"wrong-{uuid.uuid4().hex}"
    proc, _ = run_allocator(
        tmp_path,
        auth_etcd.server.endpoint,
        "/coil/sec-wrong/",
        env=auth_env(auth_etcd.user, wrong),
    )
    code = wait_exit(proc)
    log = proc.log.read_text()
    assert code != 0, log
    assert "Traceback" not in log
    assert "coil-allocator:" in log and "etcd" in log
    assert "authentication failed" in log
    assert wrong not in log
    assert auth_etcd.password not in log


@pytest.mark.root
@pytest.mark.parametrize("which", ["etcd-tls-key", "etcd-tls-cert", "etcd-tls-ca"])
def test_unreadable_etcd_tls_file_is_named_without_secrets(
    tls_etcd: EtcdServer, certs: Certs, tmp_path: Path, which: str
) -> None:
    """The allocator runs as nobody; one of its TLS files is root's with mode 0600."""
    shared = Path(tempfile.mkdtemp(prefix="coil-sec-"))
    try:
        shared.chmod(0o755)
        files = {
            "etcd-tls-ca": certs.ca.cert,
            "etcd-tls-cert": certs.client.cert,
            "etcd-tls-key": certs.client.key,
        }
        flags: list[str] = []
        for flag, source in files.items():
            copy = shared / source.name
            shutil.copyfile(source, copy)
            copy.chmod(0o600 if flag == which else 0o644)
            flags += [f"--{flag}", str(copy)]
        password = f"pw-{uuid.uuid4().hex}"
        proc, _ = run_allocator(
            shared,
            f"https://{tls_etcd.endpoint}",
            "/coil/sec-unreadable/",
            flags,
            env=auth_env("coil", password),
            wrapper=NOBODY,
        )
        code = wait_exit(proc)
        log = proc.log.read_text()
        unreadable = shared / files[which].name
        assert code == 2, log
        assert "Traceback" not in log
        assert str(unreadable) in log and "Permission denied" in log
        assert password not in log
    finally:
        shutil.rmtree(shared, ignore_errors=True)


# -- 3. the allocator's gRPC over TLS with client certificates -------------------------------


@dataclass
class TlsAllocator:
    addr: str
    prefix: str
    proc: Proc
    store: EtcdStore
    certs: Certs

    def snapshot(self) -> dict[str, bytes]:
        return snapshot(self.store, self.prefix)

    def client_credentials(self) -> grpc.ChannelCredentials:
        return credentials(self.certs.ca.cert, self.certs.client)

    def coilctl(self, *args: str, pair: KeyPair | None = None) -> subprocess.CompletedProcess[str]:
        tls = ["--tls-ca", str(self.certs.ca.cert)]
        if pair is not None:
            tls += ["--tls-cert", str(pair.cert), "--tls-key", str(pair.key)]
        env = {k: v for k, v in os.environ.items() if k != "COILCTL_ALLOCATOR"}
        env["HOME"] = str(self.proc.log.parent)
        return subprocess.run(
            [str(BIN / "coilctl"), "--allocator", self.addr, "--timeout", "3", *tls, *args],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )


def start_tls_allocator(
    etcd: EtcdServer, store: EtcdStore, certs: Certs, tmp: Path, listen: str
) -> TlsAllocator:
    """The real allocator serving gRPC over TLS on `listen`, requiring client certificates
    signed by the test CA, with a pool "default"."""
    prefix = f"/coil-sec-{uuid.uuid4().hex[:8]}/"
    tls = ["--tls-cert", str(certs.allocator.cert), "--tls-key", str(certs.allocator.key)]
    tls += ["--tls-client-ca", str(certs.ca.cert)]
    proc, addr = run_allocator(tmp, etcd.endpoint, prefix, tls, listen=listen)
    try:
        allocator = TlsAllocator(addr, prefix, proc, store, certs)
        wait_answering(proc, addr, allocator.client_credentials())
        create_pool(addr, allocator.client_credentials(), "default", "10.74.0.0/24")
    except BaseException:
        proc.stop()
        raise
    return allocator


@pytest.fixture
def tls_allocator(
    etcd_server: EtcdServer, store: EtcdStore, certs: Certs, tmp_path: Path
) -> Iterator[TlsAllocator]:
    """A TLS allocator on a loopback TCP port (see start_tls_allocator)."""
    allocator = start_tls_allocator(etcd_server, store, certs, tmp_path, f"127.0.0.1:{free_port()}")
    try:
        yield allocator
    finally:
        allocator.proc.stop()


def test_coilctl_with_client_certificate_lists_pools(tls_allocator: TlsAllocator) -> None:
    done = tls_allocator.coilctl("pool", "list", "-o", "json", pair=tls_allocator.certs.client)
    assert done.returncode == 0, done.stderr
    assert [p["name"] for p in json.loads(done.stdout)["pools"]] == ["default"]


@pytest.mark.parametrize("client", ["no-cert", "foreign-cert"])
def test_coilctl_without_accepted_certificate_is_refused(
    tls_allocator: TlsAllocator, client: str
) -> None:
    pair = tls_allocator.certs.foreign if client == "foreign-cert" else None
    before = tls_allocator.snapshot()
    listed = tls_allocator.coilctl("pool", "list", pair=pair)
    assert listed.returncode == 3, listed.stdout + listed.stderr
    assert "Traceback" not in listed.stderr
    created = tls_allocator.coilctl("pool", "create", "intruder", "10.75.0.0/24", "3", pair=pair)
    assert created.returncode == 3, created.stdout + created.stderr
    assert tls_allocator.snapshot() == before


def test_coild_client_with_certificate_claims_a_block(tls_allocator: TlsAllocator) -> None:
    """coild's client with its node's certificate claims for its node, and only for it."""
    node = credentials(tls_allocator.certs.ca.cert, tls_allocator.certs.node_tls)
    client = AllocatorClient(tls_allocator.addr, 5, node)
    try:
        before = tls_allocator.snapshot()
        with pytest.raises(AllocatorRejected, match='may act only for itself, not for "node-x"'):
            client.claim_block("node-x", "default", 4)
        assert tls_allocator.snapshot() == before
        assert [p.name for p in client.list_pools()] == ["default"]
        block = client.claim_block("node-tls", "default", 4)
        assert block.node == "node-tls"
        held = client.node_blocks("node-tls")
        assert [b.cidr for b in held.blocks] == [block.cidr]
    finally:
        client.close()
    block_key = f"{tls_allocator.prefix}blocks/default/{str(block.cidr).replace('/', '_')}"
    assert tls_allocator.snapshot()[block_key] == b"node-tls"


@pytest.mark.parametrize("client", ["plaintext", "no-cert", "foreign-cert", "foreign-ca"])
def test_coild_client_without_accepted_certificate_changes_nothing(
    tls_allocator: TlsAllocator, client: str
) -> None:
    certs = tls_allocator.certs
    creds = {
        "plaintext": None,
        "no-cert": credentials(certs.ca.cert),
        "foreign-cert": credentials(certs.ca.cert, certs.foreign),
        # A valid client certificate, but the allocator's own certificate is not trusted.
        "foreign-ca": credentials(certs.other_ca.cert, certs.client),
    }[client]
    before = tls_allocator.snapshot()
    client_ = AllocatorClient(tls_allocator.addr, 1, creds)
    try:
        with pytest.raises(AllocatorUnavailable):
            client_.list_pools()
        with pytest.raises(AllocatorUnavailable):
            client_.claim_block("node-intruder", "default", 4)
    finally:
        client_.close()
    assert tls_allocator.snapshot() == before
    assert tls_allocator.proc.alive()


@pytest.fixture
def node_ns() -> Iterator[Netns]:
    ns = Netns.create("coilt-")
    try:
        yield ns
    finally:
        ns.delete()


def allocate(socket: Path, container_id: str, timeout: float = 10) -> npb.AllocateResponse:
    with grpc.insecure_channel(f"unix:{socket}") as ch:
        return npb_grpc.NodeAgentServiceStub(ch).Allocate(
            npb.AllocateRequest(
                attachment=npb.Attachment(container_id=container_id, interface="eth0"),
                namespace="default",
                pod=f"pod-{container_id[:6]}",
            ),
            timeout=timeout,
        )


@pytest.mark.root
def test_real_coild_uses_tls_with_client_certificate(
    etcd_server: EtcdServer, store: EtcdStore, certs: Certs, node_ns: Netns, tmp_path: Path
) -> None:
    """The real coild in a node namespace reaches the TLS allocator as "127.0.0.1:9380" (the
    certificate names 127.0.0.1) through a relay into its namespace, with the kubelet-style
    certificate of its node; another node's certificate gets it nothing."""
    allocator = start_tls_allocator(etcd_server, store, certs, tmp_path, f"127.0.0.1:{free_port()}")
    try:
        forwarders = relay_into(node_ns, 9380, allocator.addr, tmp_path)
    except BaseException:
        allocator.proc.stop()
        raise

    def coild(node: str, pair: KeyPair, wait: bool = True) -> tuple[Proc, Path]:
        socket = tmp_path / f"{node}.sock"
        tls = ["--allocator-tls-ca", str(certs.ca.cert)]
        tls += ["--allocator-tls-cert", str(pair.cert), "--allocator-tls-key", str(pair.key)]
        tls += ["--allocator-timeout", "1"]
        log = tmp_path / f"{node}.log"
        proc = start_coild(node_ns, node, "127.0.0.1:9380", socket, log, tls, wait=wait)
        return proc, socket

    try:
        good, socket = coild("node-good", certs.node_good)
        try:
            addresses = allocate(socket, uuid.uuid4().hex).addresses
            assert [a.pool for a in addresses] == ["default"]
            assert addresses[0].address.startswith("10.74.0.")
            with channel(allocator.addr, allocator.client_credentials()) as ch:
                held = apb_grpc.AllocatorServiceStub(ch).ListNodeBlocks(
                    apb.ListNodeBlocksRequest(node="node-good"), timeout=5
                )
            assert len(held.blocks) == 1
        finally:
            good.stop()

        before = allocator.snapshot()
        # The allocator refuses the foreign certificate: coild never gets its state, so it
        # cannot become ready nor give addresses.
        bad, socket = coild("node-bad", certs.foreign, wait=False)
        try:
            wait_until(
                "coild node-bad failing to reach the allocator",
                lambda: "cannot rebuild state yet" in bad.tail(),
                proc=bad,
            )
            assert "allocator at 127.0.0.1:9380 unreachable" in bad.tail()
            with pytest.raises(grpc.RpcError) as failed:
                allocate(socket, uuid.uuid4().hex)
            assert failed.value.code() != grpc.StatusCode.OK
            assert bad.alive()
        finally:
            bad.stop()
        assert allocator.snapshot() == before
        assert not any("node-bad" in key for key in before)
        assert any(key.startswith(f"{allocator.prefix}nodes/node-good/") for key in before)

        # node-good's certificate in another node's coild: every node call is refused.
        imposter, socket = coild("node-imposter", certs.node_good, wait=False)
        try:
            wait_until(
                "coild node-imposter refused",
                lambda: "cannot rebuild state yet" in imposter.tail(),
                proc=imposter,
            )
            assert 'node "node-good" may act only for itself, not for "node-imposter"' in (
                imposter.tail()
            )
            with pytest.raises(grpc.RpcError):
                allocate(socket, uuid.uuid4().hex)
        finally:
            imposter.stop()
        assert allocator.snapshot() == before
    finally:
        for forwarder in forwarders:
            forwarder.stop()
        allocator.proc.stop()


# -- 4. coild's CNI socket ---------------------------------------------------------------------

PROBE = textwrap.dedent(
    """
    import socket, sys
    import grpc
    from coil.v1 import nodeagent_pb2 as pb, nodeagent_pb2_grpc as pb_grpc
    path = sys.argv[1]
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        print("connect: ok")
    except OSError as e:
        print("connect:", e.strerror)
    with grpc.insecure_channel("unix:" + path) as ch:
        try:
            pb_grpc.NodeAgentServiceStub(ch).Check(
                pb.CheckRequest(attachment=pb.Attachment(container_id="probe", interface="x")),
                timeout=3,
            )
            print("rpc: OK")
        except grpc.RpcError as e:
            print("rpc:", e.code().name)
    """
)


@pytest.mark.root
def test_coild_socket_is_for_root_only(
    etcd_server: EtcdServer, node_ns: Netns, tmp_path: Path
) -> None:
    prefix = f"/coil-sec-{uuid.uuid4().hex[:8]}/"
    addr = f"unix:{tmp_path}/allocator.sock"
    allocator = start_allocator(etcd_server.endpoint, prefix, addr, tmp_path / "allocator.log")
    # The socket's directory lets everyone in, so only the socket's own mode can keep them out.
    shared = Path(tempfile.mkdtemp(prefix="coil-sec-"))
    coild: Proc | None = None
    try:
        shared.chmod(0o755)
        create_pool(addr, None, "default", "10.76.0.0/24")
        socket = shared / "coild.sock"
        coild = start_coild(node_ns, "node-sock", addr, socket, tmp_path / "coild.log")
        st = socket.lstat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert (st.st_uid, st.st_gid) == (0, 0)

        def probe(wrapper: list[str]) -> list[str]:
            done = subprocess.run(
                [*wrapper, sys.executable, "-c", PROBE, str(socket)],
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
            assert done.returncode == 0, done.stderr
            return done.stdout.splitlines()

        assert probe(NOBODY) == ["connect: Permission denied", "rpc: UNAVAILABLE"]
        assert probe([]) == ["connect: ok", "rpc: NOT_FOUND"]

        # The CNI plugin as the runtime runs it: nobody gets CNI code 11, root an address.
        def plugin(wrapper: list[str]) -> tuple[int, dict[str, Any]]:
            conf = {
                "cniVersion": "1.0.0",
                "name": "coil-net",
                "type": "coil",
                "ipam": {"type": "coil", "socket": str(socket), "timeout": 1},
            }
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "CNI_COMMAND": "ADD",
                "CNI_CONTAINERID": uuid.uuid4().hex,
                "CNI_NETNS": node_ns.path,
                "CNI_IFNAME": "eth0",
                "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=p",
                "CNI_PATH": str(BIN),
            }
            done = subprocess.run(
                [*wrapper, sys.executable, "-m", "coil_cni.main"],
                input=json.dumps(conf),
                capture_output=True,
                text=True,
                env=env,
                timeout=30,
                cwd="/",
            )
            return done.returncode, json.loads(done.stdout)

        code, out = plugin(NOBODY)
        assert code != 0 and out["code"] == 11, out
        code, out = plugin([])
        assert code == 0, out
        assert [ip["address"].split(".")[:3] for ip in out["ips"]] == [["10", "76", "0"]]
    finally:
        if coild is not None:
            coild.stop()
        allocator.stop()
        shutil.rmtree(shared, ignore_errors=True)


# -- 5. metrics bind to loopback by default ----------------------------------------------------


def test_metrics_listen_on_loopback_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from coil_allocator.main import parse_args as allocator_args
    from coild.main import parse_args as coild_args

    monkeypatch.delenv("COIL_METRICS_ADDR", raising=False)
    monkeypatch.delenv("COILD_METRICS_ADDR", raising=False)
    assert allocator_args([]).metrics_addr.startswith("127.0.0.1:")
    assert coild_args(["--node-name", "x"]).metrics_addr.startswith("127.0.0.1:")


# -- 7. safe by default --------------------------------------------------------------------------


def test_every_part_defaults_to_the_allocators_unix_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    from coil_allocator.main import parse_args as allocator_args
    from coilctl.config import DEFAULT_ALLOCATOR
    from coild.main import parse_args as coild_args

    for env in ("COIL_LISTEN", "COIL_ALLOCATOR", "COIL_INSECURE"):
        monkeypatch.delenv(env, raising=False)
    args = allocator_args([])
    assert args.listen == ["unix:/run/coil/allocator.sock"] and not args.insecure
    assert coild_args(["--node-name", "x"]).allocator == "unix:/run/coil/allocator.sock"
    assert DEFAULT_ALLOCATOR == "unix:/run/coil/allocator.sock"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ([], "a TCP address needs --tls-cert, --tls-key and --tls-client-ca"),
        (["--tls-cert", "c.pem", "--tls-key", "k.pem"], "a TCP address needs --tls-cert"),
    ],
    ids=["plaintext", "no-client-ca"],
)
def test_tcp_without_client_certificates_is_refused(
    flags: list[str], message: str, tmp_path: Path
) -> None:
    proc, _ = run_allocator(
        tmp_path, "127.0.0.1:1", "/coil-sec-refused/", flags, listen=f"127.0.0.1:{free_port()}"
    )
    code = wait_exit(proc)
    log = proc.log.read_text()
    assert code == 2, log
    assert message in log and "--insecure" in log
    assert "Traceback" not in log


def test_insecure_warns_at_start_and_on_metrics(etcd_server: EtcdServer, tmp_path: Path) -> None:
    import urllib.request

    metrics = free_port()
    proc, addr = run_allocator(
        tmp_path,
        etcd_server.endpoint,
        f"/coil-sec-{uuid.uuid4().hex[:8]}/",
        ["--insecure", "--metrics-addr", f"127.0.0.1:{metrics}"],
        listen=f"127.0.0.1:{free_port()}",
    )
    try:
        wait_answering(proc, addr)
        # Anyone who reaches the port is an operator: that is what --insecure means.
        create_pool(addr, None, "default", "10.77.0.0/24")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert "coil_allocator_insecure 1.0" in text
        log = proc.log.read_text()
        assert "level=WARNING" in log and "--insecure" in log and "is an operator" in log
        assert 'method=CreatePool identity="anonymous (--insecure)" via=none role=operator' in log
    finally:
        proc.stop()


def test_etcd_password_flag_is_refused(tmp_path: Path) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    proc, _ = run_allocator(tmp_path, "127.0.0.1:1", "/x/", ["--etcd-password", password])
    code = wait_exit(proc)
    log = proc.log.read_text()
    assert code == 2, log
    assert "--etcd-password" in log and "COIL_ETCD_PASSWORD" in log
    assert "--etcd-password-file" in log
    assert password not in log


def test_bad_policy_file_stops_the_allocator(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('[[match]]\nrole = "admin"\norganization = "x"\n')
    proc, _ = run_allocator(tmp_path, "127.0.0.1:1", "/x/", ["--policy", str(policy)])
    code = wait_exit(proc)
    log = proc.log.read_text()
    assert code == 2, log
    assert f"policy file {str(policy)!r}: match #1: role 'admin' is not one of" in log


# -- 8. expensive reads cannot starve claims ----------------------------------------------------


def test_concurrent_checks_do_not_starve_claims(
    etcd_server: EtcdServer, store: EtcdStore, tmp_path: Path
) -> None:
    """40 callers running CheckStore at once: claims and records still all succeed, and the
    checks beyond the bound are refused at once with UNAVAILABLE."""
    prefix = f"/coil-sec-{uuid.uuid4().hex[:8]}/"
    proc, addr = run_allocator(tmp_path, etcd_server.endpoint, prefix, ["--expensive-reads", "2"])
    try:
        wait_answering(proc, addr)
        create_pool(addr, None, "default", "10.80.0.0/16")
        stop = threading.Event()
        outcomes: list[str] = []

        def check() -> None:
            with channel(addr, None) as ch:
                stub = apb_grpc.AllocatorServiceStub(ch)
                while not stop.is_set():
                    try:
                        stub.CheckStore(apb.CheckStoreRequest(), timeout=30)
                        outcomes.append("OK")
                    except grpc.RpcError as e:
                        outcomes.append(e.code().name)
                        if e.code() == grpc.StatusCode.UNAVAILABLE:
                            assert "too many expensive reads" in (e.details() or "")

        checkers = [threading.Thread(target=check) for _ in range(40)]
        for t in checkers:
            t.start()
        try:
            with channel(addr, None) as ch:
                stub = apb_grpc.AllocatorServiceStub(ch)
                for i in range(60):
                    block = stub.ClaimBlock(
                        apb.ClaimBlockRequest(node=f"n{i % 6}", pool="default"), timeout=5
                    ).block
                    address = str(ipaddress.ip_network(block.cidr).network_address + 4)
                    result = stub.RecordAllocations(
                        apb.RecordAllocationsRequest(
                            node=block.node,
                            items=[
                                apb.RecordItem(
                                    address=address,
                                    pool="default",
                                    block=block.cidr,
                                    owner=apb.Owner(
                                        namespace="d", pod="p", container_id=f"c{i}", interface="e"
                                    ),
                                )
                            ],
                        ),
                        timeout=5,
                    ).results[0]
                    assert result.outcome == apb.RECORD_OUTCOME_RECORDED, result.message
        finally:
            stop.set()
            for t in checkers:
                t.join(60)
        assert "OK" in outcomes
        assert "UNAVAILABLE" in outcomes
        assert set(outcomes) <= {"OK", "UNAVAILABLE"}
        assert proc.alive()
    finally:
        proc.stop()


# -- 9. the metrics server cannot be grown by idle clients ---------------------------------------


def test_idle_metrics_clients_do_not_grow_the_allocator(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    """200 connections that send nothing: at most 16 handler threads, each dropped after the
    5 s read timeout; a scrape works again afterwards."""
    import socket as socket_module
    import urllib.request

    metrics = free_port()
    proc, addr = run_allocator(
        tmp_path,
        etcd_server.endpoint,
        f"/coil-sec-{uuid.uuid4().hex[:8]}/",
        ["--metrics-addr", f"127.0.0.1:{metrics}"],
    )

    def threads() -> int:
        return len(os.listdir(f"/proc/{proc.popen.pid}/task"))

    idle: list[socket_module.socket] = []
    try:
        wait_answering(proc, addr)
        url = f"http://127.0.0.1:{metrics}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200
        before = threads()
        for _ in range(200):
            idle.append(socket_module.create_connection(("127.0.0.1", metrics), timeout=5))
        time.sleep(1)
        assert threads() <= before + 16, (before, threads())
        # The idle ones are dropped after the read timeout; then a scrape gets through.
        wait_until("threads back", lambda: threads() <= before + 1, timeout=20, proc=proc)
        for s in idle:
            s.close()
        idle.clear()
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and b"coil_allocator_rpcs" in r.read()
    finally:
        for s in idle:
            s.close()
        proc.stop()


# -- 10. certificates rotate without a restart ---------------------------------------------------


def test_allocator_reads_rotated_tls_files_for_new_connections(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    pki = Pki(tmp_path / "pki")
    old_ca, new_ca = pki.ca("old-ca"), pki.ca("new-ca")
    old_operator, new_operator = pki.operator(old_ca, "old-op"), pki.operator(new_ca, "new-op")
    server, other = pki.issue(old_ca, "srv", server=True), pki.issue(old_ca, "srv2", server=True)
    live = tmp_path / "live"
    live.mkdir()
    files = {"cert": live / "tls.crt", "key": live / "tls.key", "ca": live / "client-ca.crt"}

    def put(name: str, source: Path) -> None:  # as a rotation does: a new file renamed over
        staged = live / f".{name}.new"
        shutil.copyfile(source, staged)
        staged.chmod(0o600)
        staged.rename(files[name])

    put("cert", server.cert)
    put("key", server.key)
    put("ca", old_ca.cert)
    tls = ["--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])]
    tls += ["--tls-client-ca", str(files["ca"])]
    proc, addr = run_allocator(
        tmp_path, etcd_server.endpoint, f"/coil-sec-{uuid.uuid4().hex[:8]}/", tls,
        listen=f"127.0.0.1:{free_port()}",
    )  # fmt: skip

    def names(pair: KeyPair) -> list[str] | str:
        try:
            return pool_names(addr, credentials(old_ca.cert, pair))
        except grpc.RpcError as e:
            return e.code().name

    try:
        wait_answering(proc, addr, credentials(old_ca.cert, old_operator))
        assert names(old_operator) == [] and names(new_operator) == "UNAVAILABLE"
        # Clients move to the new CA: the bundle holds it, new connections accept it.
        put("ca", new_ca.cert)
        assert names(new_operator) == [] and names(old_operator) == "UNAVAILABLE"
        # Half a rotation (a certificate without its key) is not served: the old pair stays.
        put("cert", other.cert)
        assert names(new_operator) == []
        assert "cannot be read; keeping the old ones" in proc.log.read_text()
        assert "is not the key of the certificate" in proc.log.read_text()
        put("key", other.key)
        assert names(new_operator) == []
        assert proc.alive()
    finally:
        proc.stop()
