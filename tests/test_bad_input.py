"""Bad input at every front door of coil, in one table: the CNI plugin's configuration, environment
and CNI_ARGS (the installed launcher against a real coild), coild's gRPC API, the allocator's gRPC
API, coilctl's command line, and pool definitions.

Each case states the error it must produce (CNI code, gRPC status or record outcome, exit code), a
fragment of the message that names the problem by quoting the bad input, and that etcd is
unchanged afterwards (`snapshot` before and after). The world every case starts from: pool
"default" (10.100.0.0/16 and fd00:100::/48, blocks of 2^5) and pool "v6only" (fd00:200::/48,
blocks of 2^8); node-x holds 10.100.0.0/27 with 10.100.0.5 recorded for container c-existing,
node-y holds 10.100.1.0/27. coild runs as node-x with a recording route sink.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdStore
from coil_core.blocks import Network
from coil_core.model import Owner, RecordRequest
from coild.agent import AgentConfig, NodeAgent
from coild.allocator_client import AllocatorClient
from coild.server import serve as serve_agent
from tests.conftest import snapshot

NODE = "node-x"
COILCTL = Path(sys.executable).parent / "coilctl"
CONTAINER = "4f3a9c0e1b2d"


# -- the world every case starts from --------------------------------------------------------------


def build_world(allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.100.0.0/16", "fd00:100::/48"], 5)
    allocator.create_pool("v6only", ["fd00:200::/48"], 8)
    allocator.claim_specific_block(NODE, "default", "10.100.0.0/27")
    allocator.claim_specific_block("node-y", "default", "10.100.1.0/27")
    owner = Owner("default", "web-0", "c-existing", "eth0")
    request = RecordRequest.from_strings("10.100.0.5", "default", "10.100.0.0/27", owner)
    allocator.record(NODE, [request])


class RecordingRoutes:
    """A RouteSink that records what it was asked to install instead of touching the kernel."""

    def __init__(self) -> None:
        self.desired: list[set[Network]] = []

    def sync(self, desired: set[Network]) -> None:
        self.desired.append(set(desired))

    def current(self) -> set[Network]:
        return self.desired[-1] if self.desired else set()


def _started_clock() -> Callable[[], float]:
    # Counted from zero so that the agent's background maintenance never comes due in a test.
    start = time.monotonic()
    return lambda: time.monotonic() - start


@dataclass
class World:
    allocator_addr: str
    allocator_stub: apb_grpc.AllocatorServiceStub
    launcher: str
    home: Path
    coild_socket: str = ""
    agent_stub: npb_grpc.NodeAgentServiceStub | None = None


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The CNI plugin launcher, installed the way an operator installs it."""
    dest = tmp_path_factory.mktemp("cni-bin")
    subprocess.run(
        [sys.executable, "-m", "coil_cni.install", str(dest)],
        capture_output=True,
        text=True,
        check=True,
    )
    return str(dest / "coil")


@pytest.fixture
def coild(allocator_addr: str) -> Iterator[str]:
    """coild as node-x, serving on a UNIX socket in a short directory; yields the socket path."""
    directory = tempfile.mkdtemp(prefix="coil-bad-")  # socket paths are limited to 107 bytes
    socket = os.path.join(directory, "coild.sock")
    client = AllocatorClient(allocator_addr, timeout=5.0)
    agent = NodeAgent(
        AgentConfig(node=NODE, maintain_interval=3600.0, release_grace=3600.0),
        client,
        RecordingRoutes(),
        clock=_started_clock(),
    )
    agent.start(wait=True)
    server = serve_agent(agent, socket, workers=4)
    try:
        yield socket
    finally:
        server.stop(grace=None).wait()
        agent.stop()
        client.close()
        shutil.rmtree(directory, ignore_errors=True)


# -- running one input -----------------------------------------------------------------------------


class Outcome(NamedTuple):
    code: object  # CNI code (int), gRPC status or record/release outcome name (str), exit code
    message: str


Action = Callable[[World], Outcome]


def cni(
    command: str | None = "ADD",
    conf: Callable[[str], Any] | bytes | str | None = None,
    env: dict[str, str | None] | None = None,
) -> Action:
    """Exec the plugin: ``conf`` builds the configuration from coild's socket (default: a valid
    one), or is the raw text of stdin; ``env`` entries override ADD_ENV (None removes one)."""

    def run(world: World) -> Outcome:
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **ADD_ENV}
        if command is not None:
            full_env["CNI_COMMAND"] = command
        for key, value in (env or {}).items():
            if value is None:
                full_env.pop(key, None)
            else:
                full_env[key] = value
        if conf is None:
            stdin = json.dumps(netconf(world.coild_socket)).encode()
        elif isinstance(conf, bytes):
            stdin = conf
        elif isinstance(conf, str):
            stdin = conf.encode()
        else:
            stdin = json.dumps(conf(world.coild_socket)).encode()
        done = subprocess.run(
            [world.launcher], input=stdin, env=full_env, capture_output=True, timeout=60
        )
        assert done.stderr == b"", done.stderr
        assert done.returncode == 1, done.stdout
        error = json.loads(done.stdout)
        assert set(error) == {"cniVersion", "code", "msg", "details"}, error
        return Outcome(error["code"], f"{error['msg']} | {error['details']}")

    return run


ADD_ENV = {
    "CNI_CONTAINERID": CONTAINER,
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/var/run/netns/cni-1234",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-1",
}


def netconf(socket: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ptp",
        "ipam": {"type": "coil", "socket": socket, "timeout": 5},
    }
    conf.update(extra)
    return conf


def ipam(**changes: Any) -> Callable[[str], Any]:
    """A valid configuration whose ipam section has ``changes`` (None removes a key)."""

    def build(socket: str) -> Any:
        conf = netconf(socket)
        for key, value in changes.items():
            if value is None:
                conf["ipam"].pop(key, None)
            else:
                conf["ipam"][key] = value
        return conf

    return build


def conf_with(
    version: Any = "1.0.0",
    drop: tuple[str, ...] = (),
    fields: dict[str, Any] | None = None,
    **extra: Any,
) -> Callable[[str], Any]:
    """A configuration with ``extra`` and ``fields`` set and the keys in ``drop`` removed."""

    def build(socket: str) -> Any:
        conf = netconf(socket, version, **extra, **(fields or {}))
        for key in drop:
            conf.pop(key, None)
        return conf

    return build


def _grpc(call: Callable[[Any], Any]) -> Outcome:
    try:
        response = call(None)
    except grpc.RpcError as e:
        assert isinstance(e, grpc.Call)
        return Outcome(e.code().name, e.details() or "")
    raise AssertionError(f"the call succeeded: {response}")


def agent_call(method: str, request: Any) -> Action:
    """Call coild's NodeAgentService over its socket; the error status and message."""

    def run(world: World) -> Outcome:
        stub = world.agent_stub
        assert stub is not None
        return _grpc(lambda _: getattr(stub, method)(request, timeout=30))

    return run


def raw_call(service: str, method: str, data: bytes) -> Action:
    """Send ``data`` as the request of ``service``'s ``method`` as it is, undecoded: bytes no
    generated class would produce. ``service`` is "coild" or "allocator"."""

    def run(world: World) -> Outcome:
        if service == "coild":
            target, name = f"unix:{world.coild_socket}", "coil.v1.NodeAgentService"
        else:
            target, name = world.allocator_addr, "coil.v1.AllocatorService"
        with grpc.insecure_channel(target) as channel:
            call = channel.unary_unary(f"/{name}/{method}")
            return _grpc(lambda _: call(data, timeout=30))

    return run


def allocator_call(method: str, request: Any) -> Action:
    """Call the AllocatorService; the error status and message."""

    def run(world: World) -> Outcome:
        return _grpc(lambda _: getattr(world.allocator_stub, method)(request, timeout=30))

    return run


def record_item(
    address: str,
    block: str = "10.100.0.0/27",
    pool: str = "default",
    container_id: str = "c-new",
    interface: str = "eth0",
    node: str = NODE,
) -> Action:
    """RecordAllocations of one item; the item's outcome and message (the call itself succeeds)."""

    def run(world: World) -> Outcome:
        owner = apb.Owner(
            namespace="default", pod="web-9", container_id=container_id, interface=interface
        )
        item = apb.RecordItem(address=address, pool=pool, block=block, owner=owner)
        response = world.allocator_stub.RecordAllocations(
            apb.RecordAllocationsRequest(node=node, items=[item]), timeout=30
        )
        (result,) = response.results
        return Outcome(apb.RecordOutcome.Name(result.outcome), result.message)

    return run


def release_item(address: str) -> Action:
    def run(world: World) -> Outcome:
        response = world.allocator_stub.ReleaseAllocations(
            apb.ReleaseAllocationsRequest(node=NODE, items=[apb.ReleaseItem(address=address)]),
            timeout=30,
        )
        (result,) = response.results
        return Outcome(apb.ReleaseOutcome.Name(result.outcome), result.message)

    return run


def coilctl(*args: str, allocator: bool = True) -> Action:
    """Run the installed coilctl (HOME empty, stdin not a terminal); exit code and stderr."""

    def run(world: World) -> Outcome:
        env = {k: v for k, v in os.environ.items() if k != "COILCTL_ALLOCATOR"}
        env["HOME"] = str(world.home)
        argv = [str(COILCTL), *(["--allocator", world.allocator_addr] if allocator else []), *args]
        done = subprocess.run(
            argv, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=60
        )
        assert "Traceback" not in done.stderr, done.stderr
        lines = done.stderr.strip().splitlines()
        assert lines and lines[-1].startswith("coilctl: "), done.stderr
        return Outcome(done.returncode, lines[-1])

    return run


# -- the table -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    id: str
    source: str  # cni-config, cni-env, cni-args, coild, allocator, pool, coilctl
    action: Action
    code: object
    fragments: tuple[str, ...]
    bug: str = ""  # a real bug: the case states the right behaviour and is a strict xfail


def case(
    id: str, source: str, action: Action, code: object, *fragments: str, bug: str = ""
) -> Case:
    return Case(id, source, action, code, fragments, bug)


A = apb
N = npb
GOOD_ATTACHMENT = N.Attachment(container_id=CONTAINER, interface="eth0")

CASES = [
    # --- CNI: network configuration on stdin ---
    case("conf-not-json", "cni-config", cni(conf="{not json"), 6, "not valid JSON", "{not json"),
    case("conf-empty-stdin", "cni-config", cni(conf=""), 6, "not valid JSON", "''"),
    case("conf-json-array", "cni-config", cni(conf="[1, 2]"), 6, "not a JSON object", "[1, 2]"),
    case(
        "conf-invalid-utf8",
        "cni-config",
        cni(conf=b"\xff\xfe{}"),
        6,
        "not valid JSON",
    ),
    case(
        "conf-deeply-nested-json",
        "cni-config",
        cni(conf="[" * 100_000 + "]" * 100_000),
        6,
        "not valid JSON",
        "[[[[",
    ),
    case(
        "conf-no-cniVersion",
        "cni-config",
        cni(conf=conf_with(drop=("cniVersion",))),
        1,
        "no cniVersion",
    ),
    case(
        "conf-cniVersion-number",
        "cni-config",
        cni(conf=conf_with(version=1)),
        7,
        "cniVersion",
        "got 1",
    ),
    case(
        "conf-cniVersion-9.9.9",
        "cni-config",
        cni(conf=conf_with(version="9.9.9")),
        1,
        "'9.9.9'",
        "supported",
    ),
    case(
        "conf-CHECK-with-cniVersion-0.3.1",
        "cni-config",
        cni("CHECK", conf_with(version="0.3.1")),
        1,
        "'0.3.1'",
        "CHECK",
    ),
    case(
        "conf-no-ipam",
        "cni-config",
        cni(conf=conf_with(drop=("ipam",))),
        7,
        "no ipam section",
        "missing",
    ),
    case(
        "conf-ipam-string",
        "cni-config",
        cni(conf=conf_with(ipam="coil")),
        7,
        "not an object",
        '"coil"',
    ),
    case(
        "conf-ipam-type-host-local",
        "cni-config",
        cni(conf=ipam(type="host-local")),
        7,
        '"host-local"',
    ),
    case(
        "conf-ipam-socket-relative",
        "cni-config",
        cni(conf=ipam(socket="coild.sock")),
        7,
        '"coild.sock"',
    ),
    case(
        "conf-ipam-socket-missing-file",
        "cni-config",
        cni(conf=ipam(socket="/nonexistent/coild.sock")),
        11,
        "/nonexistent/coild.sock",
    ),
    case(
        "conf-ipam-timeout-negative",
        "cni-config",
        cni(conf=ipam(timeout=-1)),
        7,
        "ipam.timeout",
        "-1",
    ),
    case(
        "conf-ipam-timeout-string",
        "cni-config",
        cni(conf=ipam(timeout="5s")),
        7,
        "ipam.timeout",
        '"5s"',
    ),
    case(
        "conf-ipam-timeout-true",
        "cni-config",
        cni(conf=ipam(timeout=True)),
        7,
        "ipam.timeout",
        "true",
    ),
    case(
        "conf-runtimeConfig-not-object",
        "cni-config",
        cni(conf=conf_with(runtimeConfig=["ips"])),
        7,
        "runtimeConfig",
        '["ips"]',
    ),
    case(
        "conf-runtimeConfig-ips-string",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": "10.100.0.9"})),
        7,
        "runtimeConfig.ips",
        '"10.100.0.9"',
    ),
    case(
        "conf-runtimeConfig-ips-not-an-ip",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["not-an-ip"]})),
        7,
        "'not-an-ip'",
    ),
    case(
        "conf-args-cni-ips-prefix-33",
        "cni-config",
        cni(conf=conf_with(args={"cni": {"ips": ["10.100.0.9/33"]}})),
        7,
        "args.cni.ips",
        "'10.100.0.9/33'",
    ),
    case(
        "conf-ips-outside-pool-192.168.0.9",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["192.168.0.9/24"]})),
        7,
        '"192.168.0.9"',
        '"default"',
    ),
    case(
        "conf-ips-two-ipv4",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["10.100.0.9", "10.100.0.10"]})),
        7,
        "10.100.0.9, 10.100.0.10",
        "at most one per family",
    ),
    case(
        "conf-ips-reserved-gateway-10.100.0.1",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["10.100.0.1"]})),
        7,
        '"10.100.0.1"',
        "reserved",
    ),
    case(
        "conf-ips-in-use-10.100.0.5",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["10.100.0.5"]})),
        102,
        '"10.100.0.5"',
    ),
    case(
        "conf-ips-in-other-nodes-block-10.100.1.5",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["10.100.1.5"]})),
        102,
        "10.100.1.5",
        '"node-y"',
    ),
    case(
        "conf-ips-with-scope-id-fd00:100::9%eth0",
        "cni-config",
        cni(conf=conf_with(runtimeConfig={"ips": ["fd00:100::9%eth0"]})),
        7,
        "fd00:100::9%eth0",
    ),
    case(
        "conf-GC-without-valid-attachments",
        "cni-config",
        cni("GC", conf_with(version="1.1.0")),
        7,
        "'cni.dev/valid-attachments'",
        "missing",
    ),
    case(
        "conf-GC-valid-attachments-object",
        "cni-config",
        cni("GC", conf_with(version="1.1.0", fields={"cni.dev/valid-attachments": {"a": 1}})),
        7,
        "must be a list",
        '{"a": 1}',
    ),
    case(
        "conf-CHECK-without-prevResult",
        "cni-config",
        cni("CHECK", conf_with()),
        7,
        "prevResult",
        "null",
    ),
    # --- CNI: environment ---
    case("env-no-CNI_COMMAND", "cni-env", cni(None), 4, "CNI_COMMAND is missing"),
    case("env-CNI_COMMAND-lowercase-add", "cni-env", cni("add"), 4, "'add'"),
    case(
        "env-ADD-without-CNI_CONTAINERID",
        "cni-env",
        cni(env={"CNI_CONTAINERID": None}),
        4,
        "CNI_CONTAINERID",
        "missing",
    ),
    case(
        "env-CNI_CONTAINERID-leading-dash",
        "cni-env",
        cni(env={"CNI_CONTAINERID": "-abc"}),
        4,
        "'-abc'",
    ),
    case(
        "env-CNI_CONTAINERID-300-chars",
        "cni-env",
        cni(env={"CNI_CONTAINERID": "a" * 300}),
        4,
        "a" * 300,
    ),
    case("env-CNI_IFNAME-with-colon", "cni-env", cni(env={"CNI_IFNAME": "eth0:1"}), 4, "'eth0:1'"),
    case(
        "env-CNI_IFNAME-16-bytes",
        "cni-env",
        cni(env={"CNI_IFNAME": "x" * 16}),
        4,
        "'" + "x" * 16 + "'",
    ),
    case(
        "env-CNI_IFNAME-not-utf8",
        "cni-env",
        cni(env={"CNI_IFNAME": os.fsdecode(b"eth\x80")}),
        4,
        "CNI_IFNAME",
    ),
    case("env-ADD-without-CNI_NETNS", "cni-env", cni(env={"CNI_NETNS": ""}), 4, "CNI_NETNS"),
    case(
        "env-DEL-without-CNI_IFNAME",
        "cni-env",
        cni("DEL", env={"CNI_IFNAME": None}),
        4,
        "DEL needs CNI_IFNAME",
    ),
    # --- CNI: CNI_ARGS ---
    case(
        "args-item-without-equals",
        "cni-args",
        cni(env={"CNI_ARGS": "K8S_POD_NAME"}),
        4,
        "'K8S_POD_NAME'",
        "KEY=VALUE",
    ),
    case("args-empty-key", "cni-args", cni(env={"CNI_ARGS": "=web-0"}), 4, "'=web-0'"),
    case(
        "args-unknown-key-without-IgnoreUnknown",
        "cni-args",
        cni(env={"CNI_ARGS": "FOO=bar;K8S_POD_NAME=web-0"}),
        4,
        "'FOO'",
    ),
    case(
        "args-IgnoreUnknown-maybe",
        "cni-args",
        cni(env={"CNI_ARGS": "IgnoreUnknown=maybe"}),
        4,
        "'maybe'",
    ),
    case(
        "args-pod-namespace-not-utf8",
        "cni-args",
        cni(env={"CNI_ARGS": "K8S_POD_NAMESPACE=" + os.fsdecode(b"team\xff")}),
        4,
        "K8S_POD_NAMESPACE",
    ),
    # --- coild's NodeAgentService ---
    case(
        "coild-allocate-empty-container-id",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=N.Attachment(container_id="", interface="eth0")),
        ),
        "INVALID_ARGUMENT",
        "container ID",
    ),
    case(
        "coild-allocate-empty-interface",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=N.Attachment(container_id=CONTAINER, interface="")),
        ),
        "INVALID_ARGUMENT",
        "interface",
    ),
    case(
        "coild-release-no-attachment",
        "coild",
        agent_call("Release", N.ReleaseRequest()),
        "INVALID_ARGUMENT",
        "container ID",
    ),
    case(
        "coild-check-unknown-attachment",
        "coild",
        agent_call("Check", N.CheckRequest(attachment=GOOD_ATTACHMENT)),
        "NOT_FOUND",
        f"{CONTAINER}/eth0",
    ),
    case(
        "coild-requested-10.100.0.300",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["10.100.0.300"]),
        ),
        "INVALID_ARGUMENT",
        '"10.100.0.300"',
    ),
    case(
        "coild-requested-empty-string",
        "coild",
        agent_call(
            "Allocate", N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=[""])
        ),
        "INVALID_ARGUMENT",
        '""',
    ),
    case(
        "coild-requested-with-prefix-10.100.0.7/24",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["10.100.0.7/24"]),
        ),
        "INVALID_ARGUMENT",
        '"10.100.0.7/24"',
    ),
    case(
        "coild-requested-outside-pool-192.168.1.1",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["192.168.1.1"]),
        ),
        "INVALID_ARGUMENT",
        '"192.168.1.1"',
    ),
    case(
        "coild-requested-other-pool-fd00:200::5",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["fd00:200::5"]),
        ),
        "INVALID_ARGUMENT",
        '"fd00:200::5"',
    ),
    case(
        "coild-requested-two-ipv6",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(
                attachment=GOOD_ATTACHMENT, requested_addresses=["fd00:100::9", "fd00:100::a"]
            ),
        ),
        "INVALID_ARGUMENT",
        "fd00:100::9, fd00:100::a",
        "at most one per family",
    ),
    case(
        "coild-requested-same-address-twice",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(
                attachment=GOOD_ATTACHMENT, requested_addresses=["10.100.0.9", "10.100.0.9"]
            ),
        ),
        "INVALID_ARGUMENT",
        "10.100.0.9",
        "at most one per family",
    ),
    case(
        "coild-requested-broadcast-in-unheld-block-10.100.255.255",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["10.100.255.255"]),
        ),
        "INVALID_ARGUMENT",
        '"10.100.255.255"',
        "reserved",
    ),
    case(
        "coild-requested-with-scope-id-fd00:100::9%eth0",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["fd00:100::9%eth0"]),
        ),
        "INVALID_ARGUMENT",
        '"fd00:100::9%eth0"',
    ),
    case(
        "coild-container-id-with-slash",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=N.Attachment(container_id="../etc", interface="eth0")),
        ),
        "INVALID_ARGUMENT",
        '"../etc"',
    ),
    case(
        "coild-interface-16-chars",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=N.Attachment(container_id=CONTAINER, interface="i" * 16)),
        ),
        "INVALID_ARGUMENT",
        '"' + "i" * 16 + '"',
    ),
    # An empty valid list must be an explicit choice: a message that decodes as empty must not
    # release every attachment of the node (c-existing is recorded; etcd must stay unchanged).
    case(
        "coild-gc-empty-message",
        "coild",
        raw_call("coild", "GarbageCollect", b""),
        "INVALID_ARGUMENT",
        "valid_list_complete",
    ),
    case(
        "coild-gc-field-of-the-wrong-wire-type",
        "coild",
        raw_call("coild", "GarbageCollect", b"\x08\x01"),
        "INVALID_ARGUMENT",
        "valid_list_complete",
    ),
    case(
        "coild-gc-braces",
        "coild",
        raw_call("coild", "GarbageCollect", b"{}"),
        "INVALID_ARGUMENT",
        "GarbageCollect",
    ),
    case(
        "coild-gc-list-without-mark",
        "coild",
        agent_call(
            "GarbageCollect",
            N.GarbageCollectRequest(valid_attachments=[GOOD_ATTACHMENT]),
        ),
        "INVALID_ARGUMENT",
        "valid_list_complete",
    ),
    # Malformed protobuf is the caller's mistake, not an internal error.
    case(
        "coild-malformed-protobuf",
        "coild",
        raw_call("coild", "Allocate", b"\x0a\xff\xff"),
        "INVALID_ARGUMENT",
        "Allocate",
        "not a valid protobuf message",
    ),
    case(
        "alloc-malformed-protobuf",
        "allocator",
        raw_call("allocator", "RecordAllocations", b"\x12\x05\x0a"),
        "INVALID_ARGUMENT",
        "RecordAllocations",
        "not a valid protobuf message",
    ),
    # A 10 KB input is quoted cut short, so the status still fits its trailer.
    case(
        "coild-container-id-10kb",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=N.Attachment(container_id="x" * 10_000, interface="e")),
        ),
        "INVALID_ARGUMENT",
        "container ID",
        "(10000 characters)",
    ),
    case(
        "coild-requested-address-10kb",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, requested_addresses=["9" * 10_000]),
        ),
        "INVALID_ARGUMENT",
        "not an IP address",
        "(10000 characters)",
    ),
    case(
        "alloc-pool-name-10kb",
        "allocator",
        allocator_call("DeletePool", A.DeletePoolRequest(name="p" * 10_000)),
        "INVALID_ARGUMENT",
        "not a valid namespace name",
    ),
    # Names: the lengths Kubernetes allows, and the interface names Linux (and the plugin) allow.
    case(
        "coild-pod-name-1mb",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, pod="p" * 1_000_000),
        ),
        "INVALID_ARGUMENT",
        "pod name",
        "more than 253",
    ),
    case(
        "coild-namespace-64-chars",
        "coild",
        agent_call(
            "Allocate",
            N.AllocateRequest(attachment=GOOD_ATTACHMENT, namespace="n" * 64),
        ),
        "INVALID_ARGUMENT",
        "namespace",
        "more than 63",
    ),
    *(
        case(
            f"coild-interface-{label}",
            "coild",
            agent_call(
                "Allocate",
                N.AllocateRequest(attachment=N.Attachment(container_id=CONTAINER, interface=name)),
            ),
            "INVALID_ARGUMENT",
            "not a valid interface name",
        )
        for label, name in [
            ("dot", "."),
            ("dot-dot", ".."),
            ("nul", "e\0th"),
            ("60-byte-emoji", "\U0001f600" * 15),
            ("16-bytes-of-utf8", "\u00e9" * 8),
        ]
    ),
    # --- the allocator's AllocatorService ---
    case(
        "alloc-delete-pool-in-use",
        "allocator",
        allocator_call("DeletePool", A.DeletePoolRequest(name="default")),
        "FAILED_PRECONDITION",
        '"default"',
        "node-x",
    ),
    case(
        "alloc-delete-pool-missing",
        "allocator",
        allocator_call("DeletePool", A.DeletePoolRequest(name="nope")),
        "NOT_FOUND",
        '"nope"',
    ),
    case(
        "alloc-delete-pool-Bad_Name",
        "allocator",
        allocator_call("DeletePool", A.DeletePoolRequest(name="Bad_Name")),
        "INVALID_ARGUMENT",
        '"Bad_Name"',
    ),
    case(
        "alloc-get-pool-foreign-subnet",
        "allocator",
        allocator_call("GetPool", A.GetPoolRequest(name="default", subnet="10.1.0.0/16")),
        "NOT_FOUND",
        '"10.1.0.0/16"',
    ),
    case(
        "alloc-get-pool-subnet-host-bits",
        "allocator",
        allocator_call("GetPool", A.GetPoolRequest(name="default", subnet="10.100.0.1/16")),
        "INVALID_ARGUMENT",
        '"10.100.0.1/16"',
    ),
    case(
        "alloc-release-node-unknown",
        "allocator",
        allocator_call("ReleaseNode", A.ReleaseNodeRequest(node="node-gone")),
        "NOT_FOUND",
        '"node-gone"',
    ),
    case(
        "alloc-release-node-Node_X",
        "allocator",
        allocator_call("ReleaseNode", A.ReleaseNodeRequest(node="Node_X")),
        "INVALID_ARGUMENT",
        '"Node_X"',
    ),
    case(
        "alloc-release-node-empty",
        "allocator",
        allocator_call("ReleaseNode", A.ReleaseNodeRequest(node="")),
        "INVALID_ARGUMENT",
        'node ""',
    ),
    case(
        "alloc-node-blocks-with-space",
        "allocator",
        allocator_call("ListNodeBlocks", A.ListNodeBlocksRequest(node="node x")),
        "INVALID_ARGUMENT",
        '"node x"',
    ),
    case(
        "alloc-free-unallocated-10.100.0.9",
        "allocator",
        allocator_call("FreeAddress", A.FreeAddressRequest(address="10.100.0.9")),
        "NOT_FOUND",
        '"10.100.0.9"',
    ),
    case(
        "alloc-free-not-an-ip",
        "allocator",
        allocator_call("FreeAddress", A.FreeAddressRequest(address="not-an-ip")),
        "INVALID_ARGUMENT",
        '"not-an-ip"',
    ),
    case(
        "alloc-address-info-in-no-pool",
        "allocator",
        allocator_call("GetAddress", A.GetAddressRequest(address="10.255.0.1")),
        "NOT_FOUND",
        '"10.255.0.1"',
    ),
    case(
        "alloc-claim-missing-pool",
        "allocator",
        allocator_call("ClaimBlock", A.ClaimBlockRequest(node=NODE, pool="nope")),
        "NOT_FOUND",
        '"nope"',
    ),
    case(
        "alloc-claim-ipv4-from-v6only",
        "allocator",
        allocator_call(
            "ClaimBlock", A.ClaimBlockRequest(node=NODE, pool="v6only", family=A.FAMILY_IPV4)
        ),
        "INVALID_ARGUMENT",
        '"v6only"',
        "IPv4",
    ),
    case(
        "alloc-claim-unknown-family-7",
        "allocator",
        allocator_call("ClaimBlock", A.ClaimBlockRequest(node=NODE, pool="default", family=7)),  # type: ignore[arg-type]
        "INVALID_ARGUMENT",
        "family 7",
    ),
    case(
        "alloc-claim-node-UPPER",
        "allocator",
        allocator_call("ClaimBlock", A.ClaimBlockRequest(node="UPPER", pool="default")),
        "INVALID_ARGUMENT",
        '"UPPER"',
    ),
    case(
        "alloc-claim-block-wrong-size-/26",
        "allocator",
        allocator_call(
            "ClaimBlock",
            A.ClaimBlockRequest(node=NODE, pool="default", block="10.100.2.0/26"),
        ),
        "INVALID_ARGUMENT",
        '"10.100.2.0/26"',
    ),
    case(
        "alloc-claim-block-host-bits",
        "allocator",
        allocator_call(
            "ClaimBlock",
            A.ClaimBlockRequest(node=NODE, pool="default", block="10.100.2.3/27"),
        ),
        "INVALID_ARGUMENT",
        "10.100.2.3",
    ),
    case(
        "alloc-claim-block-outside-pool",
        "allocator",
        allocator_call(
            "ClaimBlock",
            A.ClaimBlockRequest(node=NODE, pool="default", block="10.200.0.0/27"),
        ),
        "INVALID_ARGUMENT",
        '"10.200.0.0/27"',
    ),
    case(
        "alloc-claim-block-held-by-node-y",
        "allocator",
        allocator_call(
            "ClaimBlock",
            A.ClaimBlockRequest(node=NODE, pool="default", block="10.100.1.0/27"),
        ),
        "ALREADY_EXISTS",
        '"10.100.1.0/27"',
        '"node-y"',
    ),
    case(
        "alloc-release-block-not-held",
        "allocator",
        allocator_call(
            "ReleaseBlock",
            A.ReleaseBlockRequest(node=NODE, pool="default", block="10.100.2.0/27"),
        ),
        "FAILED_PRECONDITION",
        '"10.100.2.0/27"',
        "not held",
    ),
    case(
        "alloc-release-block-of-node-y",
        "allocator",
        allocator_call(
            "ReleaseBlock",
            A.ReleaseBlockRequest(node=NODE, pool="default", block="10.100.1.0/27"),
        ),
        "FAILED_PRECONDITION",
        '"10.100.1.0/27"',
        '"node-y"',
    ),
    case(
        "alloc-release-block-with-records",
        "allocator",
        allocator_call(
            "ReleaseBlock",
            A.ReleaseBlockRequest(node=NODE, pool="default", block="10.100.0.0/27"),
        ),
        "FAILED_PRECONDITION",
        '"10.100.0.0/27"',
        "still recorded",
    ),
    case(
        "alloc-release-block-bad-id",
        "allocator",
        allocator_call(
            "ReleaseBlock", A.ReleaseBlockRequest(node=NODE, pool="default", block="block-1")
        ),
        "INVALID_ARGUMENT",
        '"block-1"',
    ),
    case(
        "alloc-record-node-empty",
        "allocator",
        allocator_call("RecordAllocations", A.RecordAllocationsRequest(node="")),
        "INVALID_ARGUMENT",
        'node ""',
    ),
    case(
        "alloc-record-address-outside-block",
        "allocator",
        record_item("10.100.0.200"),
        "RECORD_OUTCOME_INVALID",
        '"10.100.0.200"',
        '"10.100.0.0/27"',
    ),
    case(
        "alloc-record-address-not-an-ip",
        "allocator",
        record_item("10.100.0.x"),
        "RECORD_OUTCOME_INVALID",
        '"10.100.0.x"',
    ),
    case(
        "alloc-record-block-not-a-cidr",
        "allocator",
        record_item("10.100.0.9", block="10.100.0.0"),
        "RECORD_OUTCOME_INVALID",
        "10.100.0.0",
    ),
    case(
        "alloc-record-address-with-scope-id",
        "allocator",
        record_item("fd00:100::9%eth0", block="fd00:100::/123"),
        "RECORD_OUTCOME_INVALID",
        '"fd00:100::9%eth0"',
    ),
    case(
        "alloc-record-pool-empty",
        "allocator",
        record_item("10.100.0.9", pool=""),
        "RECORD_OUTCOME_INVALID",
        "pool is empty",
    ),
    case(
        "alloc-record-container-id-with-space",
        "allocator",
        record_item("10.100.0.9", container_id="c 1"),
        "RECORD_OUTCOME_INVALID",
        '"c 1"',
    ),
    case(
        "alloc-record-interface-with-slash",
        "allocator",
        record_item("10.100.0.9", interface="eth/0"),
        "RECORD_OUTCOME_INVALID",
        '"eth/0"',
    ),
    case(
        "alloc-record-block-held-by-node-y",
        "allocator",
        record_item("10.100.1.9", block="10.100.1.0/27"),
        "RECORD_OUTCOME_BLOCK_NOT_HELD",
        '"10.100.1.0/27"',
        '"node-y"',
    ),
    case(
        "alloc-record-block-of-unknown-pool",
        "allocator",
        record_item("10.100.0.9", pool="nope"),
        "RECORD_OUTCOME_INVALID",
        '"10.100.0.9"',
        'no pool "nope"',
    ),
    case(
        "alloc-record-address-in-use-10.100.0.5",
        "allocator",
        record_item("10.100.0.5"),
        "RECORD_OUTCOME_ADDRESS_IN_USE",
        '"10.100.0.5"',
        '"c-existing"',
    ),
    case(
        "alloc-release-item-not-an-ip",
        "allocator",
        release_item("bogus"),
        "RELEASE_OUTCOME_INVALID",
        '"bogus"',
    ),
    # --- pool definitions (CreatePool, AddSubnet) ---
    case(
        "pool-name-Bad_Name",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="Bad_Name", subnets=["10.1.0.0/16"])),
        "INVALID_ARGUMENT",
        '"Bad_Name"',
        "'B'",
    ),
    case(
        "pool-name-empty",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="", subnets=["10.1.0.0/16"])),
        "INVALID_ARGUMENT",
        '""',
        "empty",
    ),
    case(
        "pool-name-trailing-dash",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team-", subnets=["10.1.0.0/16"])),
        "INVALID_ARGUMENT",
        '"team-"',
    ),
    case(
        "pool-name-64-chars",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="a" * 64, subnets=["10.1.0.0/16"])),
        "INVALID_ARGUMENT",
        '"' + "a" * 64 + '"',
        "64 characters",
    ),
    case(
        "pool-no-subnet",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team")),
        "INVALID_ARGUMENT",
        '"team"',
        "at least one subnet",
    ),
    case(
        "pool-subnet-without-prefix",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team", subnets=["10.1.0.0"])),
        "INVALID_ARGUMENT",
        '"10.1.0.0"',
        "missing prefix length",
    ),
    case(
        "pool-subnet-prefix-33",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team", subnets=["10.1.0.0/33"])),
        "INVALID_ARGUMENT",
        '"10.1.0.0/33"',
        "out of range",
    ),
    case(
        "pool-subnet-ipv6-prefix-129",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team", subnets=["fd01::/129"])),
        "INVALID_ARGUMENT",
        '"fd01::/129"',
    ),
    case(
        "pool-subnet-netmask-form",
        "pool",
        allocator_call(
            "CreatePool", A.CreatePoolRequest(name="team", subnets=["10.1.0.0/255.255.0.0"])
        ),
        "INVALID_ARGUMENT",
        '"10.1.0.0/255.255.0.0"',
    ),
    case(
        "pool-subnet-not-an-address",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team", subnets=["banana/8"])),
        "INVALID_ARGUMENT",
        '"banana"',
    ),
    case(
        "pool-subnet-host-bits-set",
        "pool",
        allocator_call(
            "CreatePool",
            A.CreatePoolRequest(name="team", subnets=["10.1.2.3/16"], block_size_bits=5),
        ),
        "INVALID_ARGUMENT",
        '"10.1.2.3/16"',
        '"10.1.0.0/16"',
    ),
    case(
        "pool-block-size-17",
        "pool",
        allocator_call(
            "CreatePool",
            A.CreatePoolRequest(name="team", subnets=["10.0.0.0/8"], block_size_bits=17),
        ),
        "INVALID_ARGUMENT",
        "2^17",
        "too large",
    ),
    case(
        "report-node-route-not-a-cidr",
        "allocator",
        allocator_call(
            "ReportNode",
            A.ReportNodeRequest(node=NODE, routes=["10.100.0.0/27", "banana"], table=119),
        ),
        "INVALID_ARGUMENT",
        "route #2",
        '"banana"',
    ),
    case(
        "report-node-route-one-megabyte",
        "allocator",
        allocator_call("ReportNode", A.ReportNodeRequest(node=NODE, routes=["x" * 2**20])),
        "INVALID_ARGUMENT",
        "route #1",
        "1048576 characters",
    ),
    case(
        "report-node-too-many-routes",
        "allocator",
        allocator_call(
            "ReportNode",
            A.ReportNodeRequest(
                node=NODE, routes=[f"10.{i // 256}.{i % 256}.0/24" for i in range(5000)]
            ),
        ),
        "INVALID_ARGUMENT",
        "5000 routes",
        "at most 4096",
    ),
    case(
        "pool-block-size-larger-than-subnet",
        "pool",
        allocator_call(
            "CreatePool",
            A.CreatePoolRequest(name="team", subnets=["10.1.0.0/24"], block_size_bits=9),
        ),
        "INVALID_ARGUMENT",
        '"10.1.0.0/24"',
        "2^9",
    ),
    case(
        "pool-block-size-uint32-max",
        "pool",
        allocator_call(
            "CreatePool",
            A.CreatePoolRequest(name="team", subnets=["fd01::/48"], block_size_bits=2**32 - 1),
        ),
        "INVALID_ARGUMENT",
        f"2^{2**32 - 1}",
    ),
    case(
        "pool-two-own-subnets-overlap",
        "pool",
        allocator_call(
            "CreatePool",
            A.CreatePoolRequest(name="team", subnets=["10.1.0.0/16", "10.1.128.0/17"]),
        ),
        "INVALID_ARGUMENT",
        '"10.1.0.0/16"',
        '"10.1.128.0/17"',
    ),
    case(
        "pool-subnet-overlaps-default",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="team", subnets=["10.100.5.0/24"])),
        "ALREADY_EXISTS",
        '"10.100.5.0/24"',
        '"default"',
    ),
    case(
        "pool-duplicate-default",
        "pool",
        allocator_call("CreatePool", A.CreatePoolRequest(name="default", subnets=["10.1.0.0/16"])),
        "ALREADY_EXISTS",
        '"default"',
    ),
    case(
        "pool-add-subnet-missing-pool",
        "pool",
        allocator_call("AddSubnet", A.AddSubnetRequest(pool="nope", subnet="10.1.0.0/16")),
        "NOT_FOUND",
        '"nope"',
    ),
    case(
        "pool-add-subnet-overlapping-v6only",
        "pool",
        allocator_call("AddSubnet", A.AddSubnetRequest(pool="default", subnet="fd00:200:0:1::/64")),
        "ALREADY_EXISTS",
        '"fd00:200:0:1::/64"',
        '"v6only"',
    ),
    case(
        "pool-add-subnet-smaller-than-block",
        "pool",
        allocator_call("AddSubnet", A.AddSubnetRequest(pool="default", subnet="10.150.0.0/28")),
        "INVALID_ARGUMENT",
        '"10.150.0.0/28"',
    ),
    case(
        "pool-add-subnet-empty",
        "pool",
        allocator_call("AddSubnet", A.AddSubnetRequest(pool="default", subnet="")),
        "INVALID_ARGUMENT",
        '""',
    ),
    # --- coilctl ---
    case("ctl-no-arguments", "coilctl", coilctl(), 2, "required"),
    case("ctl-unknown-command-frobnicate", "coilctl", coilctl("frobnicate"), 2, "'frobnicate'"),
    case(
        "ctl-pool-create-missing-size",
        "coilctl",
        coilctl("pool", "create", "team", "10.1.0.0/16"),
        2,
        "SIZE",
    ),
    case(
        "ctl-pool-create-size-five",
        "coilctl",
        coilctl("pool", "create", "team", "10.1.0.0/16", "five"),
        2,
        '"five"',
        "whole number",
    ),
    case(
        "ctl-pool-create-size-negative",
        "coilctl",
        coilctl("pool", "create", "team", "10.1.0.0/16", "-3"),
        2,
        '"-3"',
        "negative",
    ),
    case(
        "ctl-pool-create-size-2^40",
        "coilctl",
        coilctl("pool", "create", "team", "10.1.0.0/16", str(2**40)),
        2,
        f'"{2**40}"',
        "out of range",
    ),
    case(
        "ctl-pool-list-output-yaml",
        "coilctl",
        coilctl("pool", "list", "-o", "yaml"),
        2,
        "'yaml'",
    ),
    case(
        "ctl-timeout-abc",
        "coilctl",
        coilctl("--timeout", "abc", "pool", "list"),
        2,
        '"abc"',
    ),
    case(
        "ctl-node-release-without-yes",
        "coilctl",
        coilctl("node", "release", NODE),
        2,
        f'"{NODE}"',
        "--yes",
    ),
    case(
        "ctl-address-info-10.100.0.300",
        "coilctl",
        coilctl("address", "info", "10.100.0.300"),
        1,
        '"10.100.0.300"',
    ),
    case(
        "ctl-address-free-not-allocated",
        "coilctl",
        coilctl("address", "free", "10.100.0.9", "--yes"),
        1,
        '"10.100.0.9"',
        "not allocated",
    ),
    case(
        "ctl-node-release-Node_X",
        "coilctl",
        coilctl("node", "release", "Node_X", "--yes"),
        1,
        '"Node_X"',
    ),
    case(
        "ctl-pool-create-Bad_Name",
        "coilctl",
        coilctl("pool", "create", "Bad_Name", "10.1.0.0/16", "5"),
        1,
        '"Bad_Name"',
    ),
    case(
        "ctl-pool-create-host-bits",
        "coilctl",
        coilctl("pool", "create", "team", "10.1.0.1/16", "5"),
        1,
        '"10.1.0.1/16"',
    ),
    case(
        "ctl-pool-create-overlap",
        "coilctl",
        coilctl("pool", "create", "team", "10.100.0.0/24", "5"),
        1,
        '"10.100.0.0/24"',
        '"default"',
    ),
    case(
        "ctl-pool-create-size-17",
        "coilctl",
        coilctl("pool", "create", "team", "10.0.0.0/8", "17"),
        1,
        "2^17",
    ),
    case(
        "ctl-pool-delete-in-use",
        "coilctl",
        coilctl("pool", "delete", "default"),
        1,
        '"default"',
        "held",
    ),
    case(
        "ctl-pool-show-foreign-subnet",
        "coilctl",
        coilctl("pool", "show", "default", "10.1.0.0/16"),
        1,
        '"10.1.0.0/16"',
    ),
    case(
        "ctl-allocator-address-without-port",
        "coilctl",
        coilctl("--allocator", "allocator.example", "pool", "list", allocator=False),
        2,
        '"allocator.example"',
        "host:port",
    ),
    case(
        "ctl-allocator-address-unbalanced-bracket",
        "coilctl",
        coilctl("--allocator", "http://[::1", "pool", "list", allocator=False),
        2,
        '"http://[::1"',
    ),
]


def _param(c: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=c.bug)] if c.bug else []
    return pytest.param(c, id=f"{c.source}:{c.id}", marks=marks)


def test_case_ids_are_unique() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("bad", [_param(c) for c in CASES])
def test_bad_input(
    bad: Case,
    request: pytest.FixtureRequest,
    allocator: Allocator,
    allocator_addr: str,
    store: EtcdStore,
    etcd_prefix: str,
    launcher: str,
    tmp_path: Path,
) -> None:
    build_world(allocator)
    channel = grpc.insecure_channel(allocator_addr)
    home = tmp_path / "home"
    home.mkdir()
    world = World(allocator_addr, apb_grpc.AllocatorServiceStub(channel), launcher, home)
    try:
        if bad.source in ("cni-config", "cni-env", "cni-args", "coild"):
            world.coild_socket = request.getfixturevalue("coild")
            agent_channel = grpc.insecure_channel(f"unix:{world.coild_socket}")
            request.addfinalizer(agent_channel.close)
            world.agent_stub = npb_grpc.NodeAgentServiceStub(agent_channel)
        before = snapshot(store, etcd_prefix)

        outcome = bad.action(world)

        assert outcome.code == bad.code, outcome
        for fragment in bad.fragments:
            assert fragment in outcome.message, (fragment, outcome.message)
        assert snapshot(store, etcd_prefix) == before
    finally:
        channel.close()
