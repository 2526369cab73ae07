"""The CNI plugin `coil`, driven as a runtime drives it: the launcher installed by
`python -m coil_cni.install` is exec'd with the CNI_* environment and the configuration on stdin.

coild is replaced by an in-process fake NodeAgentService on a UNIX socket that records requests and
answers what a test configures: these tests cover the plugin's translation only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import pytest

from coil.v1 import nodeagent_pb2, nodeagent_pb2_grpc
from tests import test_cni_rpc as rpc_tests

# Modules the plugin must never load: they belong to the daemons, or cost start-up time.
FORBIDDEN_MODULES = ("pyroute2", "pyetcd", "etcd3", "prometheus_client", "coil_allocator", "coild")

CONTAINER = "4f3a9c0e1b2d"
ADD_ENV = {
    "CNI_CONTAINERID": CONTAINER,
    "CNI_IFNAME": "eth0",
    "CNI_NETNS": "/var/run/netns/cni-1234",
    "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;K8S_POD_NAME=web-0;"
    "K8S_POD_INFRA_CONTAINER_ID=4f3a9c0e1b2d;K8S_POD_UID=0b8c",
    "CNI_PATH": "/opt/cni/bin",
}
V4 = nodeagent_pb2.PodAddress(address="10.1.0.5/16", gateway="10.1.0.1", pool="default")
V6 = nodeagent_pb2.PodAddress(address="fd00:10::5/64", gateway="fd00:10::1", pool="default")


class FakeNodeAgent(nodeagent_pb2_grpc.NodeAgentServiceServicer):
    """Records every request as (method, request); answers `responses[method]`, or aborts with
    `errors[method]`, after sleeping `delay` seconds."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, Any]] = []
        self.responses: dict[str, Any] = {
            "Allocate": nodeagent_pb2.AllocateResponse(addresses=[V4]),
            "Release": nodeagent_pb2.ReleaseResponse(addresses=["10.1.0.5"]),
            "Check": nodeagent_pb2.CheckResponse(addresses=[V4]),
            "GarbageCollect": nodeagent_pb2.GarbageCollectResponse(),
            "Status": nodeagent_pb2.StatusResponse(pools=["default"]),
        }
        self.errors: dict[str, tuple[grpc.StatusCode, str]] = {}
        self.delay = 0.0

    def _answer(self, method: str, request: Any, context: grpc.ServicerContext) -> Any:
        self.requests.append((method, request))
        if self.delay:
            time.sleep(self.delay)
        if method in self.errors:
            code, message = self.errors[method]
            context.abort(code, message)
        return self.responses[method]

    def Allocate(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("Allocate", request, context)

    def Release(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("Release", request, context)

    def Check(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("Check", request, context)

    def GarbageCollect(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("GarbageCollect", request, context)

    def Status(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        return self._answer("Status", request, context)


class Fake(NamedTuple):
    agent: FakeNodeAgent
    socket: str


class Outcome(NamedTuple):
    rc: int
    stdout: str
    output: Any  # stdout decoded as JSON, or None if empty


@pytest.fixture(scope="session")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The launcher, installed the way an operator installs it."""
    dest = tmp_path_factory.mktemp("cni-bin")
    done = subprocess.run(
        [sys.executable, "-m", "coil_cni.install", str(dest)],
        capture_output=True,
        text=True,
        check=True,
    )
    path = dest / "coil"
    assert str(path) in done.stdout
    return str(path)


@pytest.fixture
def fake() -> Iterator[Fake]:
    # A short directory: UNIX socket paths are limited to 107 bytes, test ids are long.
    directory = tempfile.mkdtemp(prefix="coil-cni-")
    socket = os.path.join(directory, "coild.sock")
    agent = FakeNodeAgent()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    nodeagent_pb2_grpc.add_NodeAgentServiceServicer_to_server(agent, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        yield Fake(agent, socket)
    finally:
        server.stop(0)
        shutil.rmtree(directory, ignore_errors=True)


def netconf(socket: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """A ptp configuration delegating to coil, as a runtime passes it."""
    conf: dict[str, Any] = {
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "ptp",
        "ipam": {"type": "coil", "socket": socket, "timeout": 5},
    }
    conf.update(extra)
    return conf


def run(
    launcher: str,
    command: str | None,
    conf: dict[str, Any] | str | None,
    env: dict[str, str] | None = None,
    modules_to: Path | None = None,
) -> Outcome:
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    if command is not None:
        full_env["CNI_COMMAND"] = command
    full_env.update(env or {})
    if modules_to is not None:
        full_env["COIL_CNI_DEBUG_MODULES"] = str(modules_to)
    stdin = conf if isinstance(conf, str) else json.dumps(conf) if conf is not None else ""
    done = subprocess.run(
        [launcher], input=stdin, env=full_env, capture_output=True, text=True, timeout=30
    )
    assert done.stderr == "", done.stderr
    return Outcome(done.returncode, done.stdout, json.loads(done.stdout) if done.stdout else None)


# --- installation --------------------------------------------------------------------------------


def test_launcher_runs_this_interpreter_isolated(launcher: str) -> None:
    first = Path(launcher).read_text().splitlines()[0]
    assert first == f"#!{os.path.abspath(sys.executable)} -IS"
    assert os.access(launcher, os.X_OK)


# --- ADD -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", ["1.1.0", "1.0.0"])
def test_add_result_without_ip_versions(launcher: str, fake: Fake, version: str) -> None:
    out = run(launcher, "ADD", netconf(fake.socket, version), ADD_ENV)
    assert out.rc == 0
    assert out.output == {
        "cniVersion": version,
        "ips": [{"address": "10.1.0.5/16", "gateway": "10.1.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_add_result_with_ip_versions(launcher: str, fake: Fake, version: str) -> None:
    out = run(launcher, "ADD", netconf(fake.socket, version), ADD_ENV)
    assert out.rc == 0
    assert out.output == {
        "cniVersion": version,
        "ips": [{"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1"}],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {},
    }


@pytest.mark.parametrize("version", ["0.4.0", "1.1.0"])
def test_add_dual_stack(launcher: str, fake: Fake, version: str) -> None:
    fake.agent.responses["Allocate"] = nodeagent_pb2.AllocateResponse(addresses=[V4, V6])
    out = run(launcher, "ADD", netconf(fake.socket, version), ADD_ENV)
    assert out.rc == 0
    ips = out.output["ips"]
    assert [(ip["address"], ip["gateway"]) for ip in ips] == [
        ("10.1.0.5/16", "10.1.0.1"),
        ("fd00:10::5/64", "fd00:10::1"),
    ]
    if version == "0.4.0":
        assert [ip["version"] for ip in ips] == ["4", "6"]
    else:
        assert all("version" not in ip for ip in ips)
    assert out.output["routes"] == [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]
    assert "interfaces" not in out.output


def test_add_ipv6_only_route(launcher: str, fake: Fake) -> None:
    fake.agent.responses["Allocate"] = nodeagent_pb2.AllocateResponse(addresses=[V6])
    out = run(launcher, "ADD", netconf(fake.socket), ADD_ENV)
    assert out.output["routes"] == [{"dst": "::/0"}]


def test_add_sends_attachment_namespace_and_pod(launcher: str, fake: Fake) -> None:
    run(launcher, "ADD", netconf(fake.socket), ADD_ENV)
    [(method, request)] = fake.agent.requests
    assert method == "Allocate"
    assert request.attachment.container_id == CONTAINER
    assert request.attachment.interface == "eth0"
    assert (request.namespace, request.pod) == ("team-a", "web-0")
    assert list(request.requested_addresses) == []


@pytest.mark.parametrize(
    "cni_args", ["", "IgnoreUnknown=1;K8S_POD_NAME=web-0"], ids=["empty", "no-ns"]
)
def test_add_namespace_defaults(launcher: str, fake: Fake, cni_args: str) -> None:
    out = run(launcher, "ADD", netconf(fake.socket), {**ADD_ENV, "CNI_ARGS": cni_args})
    assert out.rc == 0, out.output
    [(_, request)] = fake.agent.requests
    assert request.namespace == "default"


def test_add_requested_ips_from_runtime_config(launcher: str, fake: Fake) -> None:
    conf = netconf(fake.socket, runtimeConfig={"ips": ["10.1.0.9/16", "fd00:10::9"]})
    assert run(launcher, "ADD", conf, ADD_ENV).rc == 0
    [(_, request)] = fake.agent.requests
    assert list(request.requested_addresses) == ["10.1.0.9", "fd00:10::9"]


def test_add_requested_ips_from_args(launcher: str, fake: Fake) -> None:
    conf = netconf(fake.socket, args={"cni": {"ips": ["10.1.0.7"]}})
    assert run(launcher, "ADD", conf, ADD_ENV).rc == 0
    [(_, request)] = fake.agent.requests
    assert list(request.requested_addresses) == ["10.1.0.7"]


@pytest.mark.parametrize(
    ("cni_args", "conf", "requested"),
    [
        ("IP=10.1.0.7", {}, ["10.1.0.7"]),  # podman's --ip; IP is a known key
        ("IgnoreUnknown=1;K8S_POD_NAMESPACE=team-a;IP=10.1.0.7/16", {}, ["10.1.0.7"]),
        ("IP=10.1.0.7,fd00:10::7", {}, ["10.1.0.7", "fd00:10::7"]),
        ("IP=", {}, []),  # empty: not given
        ("IP=10.1.0.7", {"runtimeConfig": {"ips": ["10.1.0.7/16"]}}, ["10.1.0.7"]),
        ("IP=fd00:10::7", {"runtimeConfig": {"ips": ["10.1.0.7"]}}, ["10.1.0.7", "fd00:10::7"]),
        # Two of a family: coild refuses them (test_cni_e2e.py, with the real coild).
        ("IP=10.1.0.9", {"runtimeConfig": {"ips": ["10.1.0.8"]}}, ["10.1.0.8", "10.1.0.9"]),
    ],
    ids=["one", "with-k8s-args", "dual-stack", "empty", "same-as-runtime-config", "merged", "two"],
)
def test_add_requested_ips_from_cni_args_ip(
    launcher: str, fake: Fake, cni_args: str, conf: dict[str, Any], requested: list[str]
) -> None:
    """CNI_ARGS IP= is asked for like runtimeConfig.ips, merged with it (as host-local does)."""
    out = run(launcher, "ADD", netconf(fake.socket, **conf), {**ADD_ENV, "CNI_ARGS": cni_args})
    assert out.rc == 0, out.output
    [(_, request)] = fake.agent.requests
    assert list(request.requested_addresses) == requested


def test_add_uses_default_timeout_and_type_only_ipam(launcher: str, fake: Fake) -> None:
    conf = netconf(fake.socket)
    del conf["ipam"]["timeout"]
    assert run(launcher, "ADD", conf, ADD_ENV).rc == 0


# --- bad input: an error before any call to coild ------------------------------------------------

GOOD = "1.0.0"


def _conf(socket: str, case: dict[str, Any]) -> dict[str, Any] | str:
    if "raw" in case:
        return str(case["raw"])
    conf = netconf(socket, case.get("version", GOOD))
    if case.get("no_version"):
        del conf["cniVersion"]
    for key, value in case.get("set", {}).items():
        conf[key] = value
    for key, value in case.get("ipam", {}).items():
        conf["ipam"][key] = value
    for key in case.get("drop", ()):
        del conf[key]
    return conf


BAD_INPUTS: list[tuple[str, dict[str, Any], int, str]] = [
    # (id, case, CNI code, text the message must contain)
    ("malformed-json", {"raw": '{"cniVersion": "1.0.0",'}, 6, "not valid JSON"),
    ("json-not-object", {"raw": '["coil"]'}, 6, "not a JSON object"),
    ("empty-stdin", {"raw": ""}, 6, "not valid JSON"),
    ("no-ipam", {"drop": ["ipam"]}, 7, "no ipam section"),
    ("ipam-not-object", {"set": {"ipam": "coil"}}, 7, '"coil"'),
    ("ipam-type-host-local", {"ipam": {"type": "host-local"}}, 7, '"host-local"'),
    ("ipam-type-missing", {"set": {"ipam": {"socket": "/run/coild.sock"}}}, 7, "ipam.type"),
    ("timeout-string", {"ipam": {"timeout": "5"}}, 7, "ipam.timeout must be a number of seconds"),
    ("timeout-huge", {"ipam": {"timeout": 1e300}}, 7, "at most 3600"),
    ("timeout-huge-int", {"ipam": {"timeout": 10**400}}, 7, "at most 3600"),
    ("timeout-zero", {"ipam": {"timeout": 0}}, 7, "ipam.timeout"),
    ("timeout-negative", {"ipam": {"timeout": -1.5}}, 7, "-1.5"),
    ("timeout-bool", {"ipam": {"timeout": True}}, 7, "true"),
    ("socket-relative", {"ipam": {"socket": "coild.sock"}}, 7, '"coild.sock"'),
    ("socket-number", {"ipam": {"socket": 42}}, 7, "ipam.socket"),
    ("version-unsupported", {"version": "0.2.0"}, 1, "'0.2.0'; supported: 0.3.0"),
    ("version-future", {"version": "2.0.0"}, 1, "'2.0.0'"),
    ("version-missing", {"no_version": True}, 1, "no cniVersion"),
    ("version-not-string", {"set": {"cniVersion": 1.0}}, 7, "cniVersion must be a string"),
    ("check-at-0.3.1", {"version": "0.3.1", "command": "CHECK"}, 1, "does not allow CHECK"),
    ("gc-at-1.0.0", {"version": "1.0.0", "command": "GC"}, 1, "does not allow GC"),
    ("status-at-0.4.0", {"version": "0.4.0", "command": "STATUS"}, 1, "does not allow STATUS"),
    ("no-command", {"command": None}, 4, "CNI_COMMAND is missing"),
    ("unknown-command", {"command": "UPDATE"}, 4, "'UPDATE'"),
    ("lowercase-command", {"command": "add"}, 4, "'add'"),
    ("add-no-containerid", {"unset": ["CNI_CONTAINERID"]}, 4, "CNI_CONTAINERID"),
    ("add-no-ifname", {"unset": ["CNI_IFNAME"]}, 4, "CNI_IFNAME"),
    ("add-no-netns", {"unset": ["CNI_NETNS"]}, 4, "CNI_NETNS"),
    ("add-empty-netns", {"env": {"CNI_NETNS": ""}}, 4, "CNI_NETNS"),
    ("containerid-leading-dash", {"env": {"CNI_CONTAINERID": "-abc"}}, 4, "'-abc'"),
    ("containerid-slash", {"env": {"CNI_CONTAINERID": "ab/../c"}}, 4, "'ab/../c'"),
    ("ifname-too-long", {"env": {"CNI_IFNAME": "eth0123456789abc"}}, 4, "'eth0123456789abc'"),
    ("ifname-slash", {"env": {"CNI_IFNAME": "eth/0"}}, 4, "'eth/0'"),
    ("cni-args-no-equals", {"env": {"CNI_ARGS": "K8S_POD_NAMESPACE"}}, 4, "'K8S_POD_NAMESPACE'"),
    ("cni-args-empty-key", {"env": {"CNI_ARGS": "=x"}}, 4, "'=x'"),
    ("cni-args-unknown-key", {"env": {"CNI_ARGS": "K8S_POD_NAME=a;COLOR=blue"}}, 4, "'COLOR'"),
    (
        "cni-args-unknown-key-ignore-false",
        {"env": {"CNI_ARGS": "IgnoreUnknown=0;COLOR=blue"}},
        4,
        "'COLOR'",
    ),
    ("cni-args-ignore-not-bool", {"env": {"CNI_ARGS": "IgnoreUnknown=maybe"}}, 4, "'maybe'"),
    ("requested-ip-bad", {"set": {"runtimeConfig": {"ips": ["10.1.0.300"]}}}, 7, "'10.1.0.300'"),
    ("requested-ip-word", {"set": {"args": {"cni": {"ips": ["web"]}}}}, 7, "args.cni.ips: 'web'"),
    ("requested-ip-bad-prefix", {"set": {"runtimeConfig": {"ips": ["10.1.0.5/40"]}}}, 7, "/40"),
    ("requested-ips-not-list", {"set": {"runtimeConfig": {"ips": "10.1.0.5"}}}, 7, "a list"),
    ("requested-ips-number", {"set": {"args": {"cni": {"ips": [10]}}}}, 7, "[10]"),
    ("runtime-config-not-object", {"set": {"runtimeConfig": []}}, 7, "runtimeConfig must be"),
    ("del-no-ifname", {"command": "DEL", "unset": ["CNI_IFNAME"]}, 4, "CNI_IFNAME"),
    ("check-no-prev-result", {"command": "CHECK", "version": "1.0.0"}, 7, "prevResult"),
    ("gc-no-valid-attachments", {"command": "GC", "version": "1.1.0"}, 7, "valid-attachments"),
    (
        "gc-bad-attachment",
        {
            "command": "GC",
            "version": "1.1.0",
            "set": {"cni.dev/valid-attachments": [{"containerID": 7}]},
        },
        7,
        '"containerID": 7',
    ),
    (
        "gc-bad-container-id",
        {
            "command": "GC",
            "version": "1.1.0",
            "set": {"cni.dev/valid-attachments": [{"containerID": "-x/../y", "ifname": "eth0"}]},
        },
        7,
        "containerID '-x/../y' is not a valid container ID",
    ),
    (
        "gc-bad-ifname",
        {
            "command": "GC",
            "version": "1.1.0",
            "set": {"cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "a b"}]},
        },
        7,
        "ifname 'a b' is not a valid interface name",
    ),
    (
        "check-prev-result-bad-address",
        {
            "command": "CHECK",
            "set": {"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5/99"}]}},
        },
        7,
        "'10.1.0.5/99' is not an address",
    ),
    (
        "check-prev-result-no-prefix",
        {
            "command": "CHECK",
            "set": {"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.5"}]}},
        },
        7,
        "'10.1.0.5' is not an address with a prefix length",
    ),
    ("socket-nul", {"ipam": {"socket": "/run/coild\u0000.sock"}}, 7, "no NUL"),
    ("socket-too-long", {"ipam": {"socket": "/" + "s" * 107}}, 7, "at most 107 bytes"),
    ("cni-args-ip-bad", {"env": {"CNI_ARGS": "IP=10.1.0.300"}}, 7, "CNI_ARGS IP: '10.1.0.300'"),
    ("cni-args-ip-empty-entry", {"env": {"CNI_ARGS": "IP=10.1.0.9,"}}, 7, "CNI_ARGS IP: ''"),
]


@pytest.mark.parametrize(
    ("case", "code", "text"),
    [pytest.param(case, code, text, id=name) for name, case, code, text in BAD_INPUTS],
)
def test_bad_input(launcher: str, fake: Fake, case: dict[str, Any], code: int, text: str) -> None:
    env = {**ADD_ENV, **case.get("env", {})}
    for name in case.get("unset", ()):
        del env[name]
    out = run(launcher, case.get("command", "ADD"), _conf(fake.socket, case), env)
    assert out.rc == 1
    assert out.output["code"] == code, out.output
    assert text in out.output["msg"], out.output
    assert fake.agent.requests == []


HUGE = "q" * 20_000


@pytest.mark.parametrize(
    ("command", "case"),
    [
        ("ADD", {"env": {"CNI_CONTAINERID": "-" + HUGE}}),
        ("ADD", {"env": {"CNI_IFNAME": HUGE}}),
        ("ADD", {"env": {"CNI_ARGS": f"COLOR={HUGE}"}}),
        ("ADD", {"env": {"CNI_ARGS": f"{HUGE}"}}),
        ("ADD", {"env": {"CNI_ARGS": f"IP={HUGE}"}}),
        ("ADD", {"ipam": {"type": HUGE}}),
        ("ADD", {"ipam": {"socket": HUGE}}),
        ("ADD", {"set": {"runtimeConfig": {"ips": [HUGE]}}}),
        ("ADD", {"set": {"cniVersion": HUGE}}),
        ("CHECK", {"set": {"prevResult": {"ips": [{"address": HUGE}]}}}),
        ("GC", {"version": "1.1.0", "set": {"cni.dev/valid-attachments": [{"containerID": HUGE}]}}),
        (HUGE, {}),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 10 else None,
)
def test_errors_quote_huge_inputs_cut_short(
    launcher: str, fake: Fake, command: str, case: dict[str, Any]
) -> None:
    env = {**ADD_ENV, **case.get("env", {})}
    out = run(launcher, command, _conf(fake.socket, case), env)
    assert out.rc == 1
    assert out.output["code"] in (1, 4, 7), out.output
    assert "qqqq" in out.output["msg"]  # it still quotes the start of what was wrong
    assert len(out.stdout) < 1500, out.stdout


def test_huge_pod_name_and_coild_message_are_cut_short(launcher: str, fake: Fake) -> None:
    fake.agent.errors["Allocate"] = (grpc.StatusCode.INVALID_ARGUMENT, f"bad pod {HUGE}")
    env = {**ADD_ENV, "CNI_ARGS": f"K8S_POD_NAMESPACE=ns;K8S_POD_NAME={HUGE}"}
    out = run(launcher, "ADD", netconf(fake.socket), env)
    assert out.output["code"] == 7
    assert out.output["details"].startswith("bad pod qqqq")
    assert len(out.stdout) < 2500, out.stdout


def test_error_reports_the_configuration_version(launcher: str, fake: Fake) -> None:
    out = run(launcher, "ADD", netconf(fake.socket, "0.4.0", ipam={"type": "dhcp"}), ADD_ENV)
    assert out.output["cniVersion"] == "0.4.0"
    assert set(out.output) == {"cniVersion", "code", "msg", "details"}


# --- coild's answers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "code", "text"),
    [
        (grpc.StatusCode.UNAVAILABLE, 11, "try again later"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 101, "pool exhausted"),
        (grpc.StatusCode.ALREADY_EXISTS, 102, "requested address in use"),
        (grpc.StatusCode.FAILED_PRECONDITION, 103, "no pool serves the namespace"),
        (grpc.StatusCode.INVALID_ARGUMENT, 7, "rejected"),
        (grpc.StatusCode.ABORTED, 11, "try again later"),
        (grpc.StatusCode.INTERNAL, 999, "INTERNAL"),
    ],
    ids=lambda v: v.name if isinstance(v, grpc.StatusCode) else None,
)
def test_add_status_mapping(
    launcher: str, fake: Fake, status: grpc.StatusCode, code: int, text: str
) -> None:
    fake.agent.errors["Allocate"] = (status, "coild says no")
    out = run(launcher, "ADD", netconf(fake.socket), ADD_ENV)
    assert out.rc == 1
    assert out.output["code"] == code
    assert text in out.output["msg"]
    assert CONTAINER in out.output["msg"]
    assert out.output["details"] == "coild says no"
    # Runtimes print "msg; details": coild's message shows once.
    assert f"{out.output['msg']}; {out.output['details']}".count("coild says no") == 1


@pytest.mark.parametrize(
    ("then", "code"),
    [
        (rpc_tests._frame(3, 0, 1, (11).to_bytes(4, "big")), 11),  # reset ENHANCE_YOUR_CALM
        (rpc_tests._frame(3, 0, 1, (8).to_bytes(4, "big")), 11),  # reset CANCEL
        (rpc_tests._frame(3, 0, 1, (7).to_bytes(4, "big")), 11),  # reset REFUSED_STREAM
        (rpc_tests._frame(7, 0, 0, bytes(4) + (0).to_bytes(4, "big")), 11),  # GOAWAY before it
        (rpc_tests._frame(3, 0, 1, (1).to_bytes(4, "big")), 999),  # reset PROTOCOL_ERROR
        (rpc_tests._frame(0, 0, 1, b"\x00" + (5 << 20).to_bytes(4, "big")), 999),  # 5 MiB answer
        (rpc_tests._frame(1, 0, 1, b"\x88") + rpc_tests._frame(9, 0, 1, bytes(16_000)) * 10, 999),
    ],
    ids=["reset-11", "cancel", "refused", "goaway", "protocol-error", "oversized", "headers"],
)
def test_transport_failures_are_never_coils_own_codes(
    launcher: str, tmp_path: Path, then: bytes, code: int
) -> None:
    """Failures of the conversation itself are 11 (outcome unknown, try again) or 999, never 101
    ("pool exhausted"), however grpcio would name them."""
    directory = tempfile.mkdtemp(prefix="coil-cni-")
    socket = os.path.join(directory, "coild.sock")
    finish = rpc_tests._scripted_server(socket, rpc_tests._open_and(then))
    try:
        out = run(launcher, "ADD", netconf(socket), ADD_ENV)
    finally:
        finish()
        shutil.rmtree(directory, ignore_errors=True)
    assert out.rc == 1
    assert out.output["code"] == code, out.output
    assert "pool exhausted" not in out.output["msg"]
    assert CONTAINER in out.output["msg"]


def test_add_unavailable_names_socket(launcher: str, fake: Fake) -> None:
    fake.agent.errors["Allocate"] = (grpc.StatusCode.UNAVAILABLE, "etcd is away")
    out = run(launcher, "ADD", netconf(fake.socket), ADD_ENV)
    assert fake.socket in out.output["msg"]
    assert "allocator or etcd" in out.output["msg"]


def test_add_deadline_is_try_again(launcher: str, fake: Fake) -> None:
    fake.agent.delay = 2.0
    conf = netconf(fake.socket, ipam={"type": "coil", "socket": fake.socket, "timeout": 0.3})
    started = time.monotonic()
    out = run(launcher, "ADD", conf, ADD_ENV)
    assert time.monotonic() - started < 1.8
    assert out.output["code"] == 11
    assert "DEADLINE_EXCEEDED" in out.output["msg"]


def test_add_missing_socket_is_try_again(launcher: str, tmp_path: Path) -> None:
    socket = str(tmp_path / "nothing.sock")
    out = run(launcher, "ADD", netconf(socket), ADD_ENV)
    assert out.rc == 1
    assert out.output["code"] == 11
    assert socket in out.output["msg"]


def test_del_of_unknown_attachment_succeeds_silently(launcher: str, fake: Fake) -> None:
    fake.agent.responses["Release"] = nodeagent_pb2.ReleaseResponse()
    env = {"CNI_CONTAINERID": CONTAINER, "CNI_IFNAME": "eth0"}  # no CNI_NETNS: it may be gone
    out = run(launcher, "DEL", netconf(fake.socket), env)
    assert (out.rc, out.stdout) == (0, "")
    [(method, request)] = fake.agent.requests
    assert method == "Release"
    assert (request.attachment.container_id, request.attachment.interface) == (CONTAINER, "eth0")


def test_del_unavailable_is_try_again(launcher: str, fake: Fake) -> None:
    fake.agent.errors["Release"] = (grpc.StatusCode.UNAVAILABLE, "allocator away")
    out = run(launcher, "DEL", netconf(fake.socket), ADD_ENV)
    assert out.output["code"] == 11


def _prev(*addresses: str) -> dict[str, Any]:
    return {"cniVersion": "1.0.0", "ips": [{"address": a} for a in addresses]}


def test_check_matching(launcher: str, fake: Fake) -> None:
    conf = netconf(fake.socket, prevResult=_prev("10.1.0.5/16"))
    out = run(launcher, "CHECK", conf, ADD_ENV)
    assert (out.rc, out.stdout) == (0, "")
    assert [m for m, _ in fake.agent.requests] == ["Check"]


def test_check_mismatch(launcher: str, fake: Fake) -> None:
    conf = netconf(fake.socket, "0.4.0", prevResult=_prev("10.1.0.6/16"))
    out = run(launcher, "CHECK", conf, ADD_ENV)
    assert out.output["code"] == 999
    assert "10.1.0.5/16" in out.output["msg"] and "10.1.0.6/16" in out.output["msg"]
    assert f"{CONTAINER}/eth0" in out.output["msg"]


def test_check_unknown_container(launcher: str, fake: Fake) -> None:
    fake.agent.errors["Check"] = (grpc.StatusCode.NOT_FOUND, "no such attachment")
    conf = netconf(fake.socket, prevResult=_prev("10.1.0.5/16"))
    out = run(launcher, "CHECK", conf, ADD_ENV)
    assert out.output["code"] == 3
    assert f"{CONTAINER}/eth0" in out.output["msg"]


def test_gc_sends_valid_attachments(launcher: str, fake: Fake) -> None:
    valid = [{"containerID": "aaa", "ifname": "eth0"}, {"containerID": "bbb", "ifname": "net1"}]
    conf = netconf(fake.socket, "1.1.0", **{"cni.dev/valid-attachments": valid})
    out = run(launcher, "GC", conf, {"CNI_CONTAINERID": "", "CNI_IFNAME": "", "CNI_NETNS": ""})
    assert (out.rc, out.stdout) == (0, "")
    [(method, request)] = fake.agent.requests
    assert method == "GarbageCollect"
    assert [(a.container_id, a.interface) for a in request.valid_attachments] == [
        ("aaa", "eth0"),
        ("bbb", "net1"),
    ]


def test_gc_with_no_valid_attachments_sends_empty_list(launcher: str, fake: Fake) -> None:
    conf = netconf(fake.socket, "1.1.0", **{"cni.dev/valid-attachments": []})
    assert run(launcher, "GC", conf).rc == 0
    [(_, request)] = fake.agent.requests
    assert list(request.valid_attachments) == []
    assert request.valid_list_complete  # coild refuses a GC without it


def test_gc_request_over_coilds_message_limit_is_invalid_config(launcher: str, fake: Fake) -> None:
    """coild's gRPC server refuses a message over 4 MiB with RESOURCE_EXHAUSTED; the plugin must
    not send it (that status reads as "pool exhausted") but name the configuration."""
    valid = [{"containerID": f"{i:064x}", "ifname": "eth0"} for i in range(60_000)]
    conf = netconf(fake.socket, "1.1.0", **{"cni.dev/valid-attachments": valid})
    out = run(launcher, "GC", conf)
    assert out.rc == 1
    assert out.output["code"] == 7, out.output
    assert "message limit" in out.output["msg"]
    assert fake.agent.requests == []


def test_status_ok(launcher: str, fake: Fake) -> None:
    out = run(launcher, "STATUS", netconf(fake.socket, "1.1.0"))
    assert (out.rc, out.stdout) == (0, "")
    assert [m for m, _ in fake.agent.requests] == ["Status"]


@pytest.mark.parametrize(
    "status", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL], ids=lambda s: s.name
)
def test_status_failing_is_not_available(
    launcher: str, fake: Fake, status: grpc.StatusCode
) -> None:
    fake.agent.errors["Status"] = (status, "etcd unreachable")
    out = run(launcher, "STATUS", netconf(fake.socket, "1.1.0"))
    assert out.rc == 1
    assert out.output["code"] == 50
    assert out.output["msg"].startswith("coil is not available: ")
    assert out.output["details"] == "etcd unreachable"
    assert f"{out.output['msg']}; {out.output['details']}".count("etcd unreachable") == 1


def test_status_missing_socket_is_not_available(launcher: str, tmp_path: Path) -> None:
    out = run(launcher, "STATUS", netconf(str(tmp_path / "gone.sock"), "1.1.0"))
    assert out.output["code"] == 50
    assert "gone.sock" in out.output["msg"]


# --- VERSION and start-up cost -------------------------------------------------------------------


def test_version_without_server_or_stdin(launcher: str) -> None:
    out = run(launcher, "VERSION", None)
    assert out.rc == 0
    assert out.output == {
        "cniVersion": "1.1.0",
        "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"],
    }


def _loaded(path: Path) -> set[str]:
    return set(path.read_text().split())


def _forbidden_in(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == n or m.startswith(n + ".") for n in names))


def test_add_imports_nothing_heavy(launcher: str, fake: Fake, tmp_path: Path) -> None:
    modules_to = tmp_path / "modules"
    out = run(launcher, "ADD", netconf(fake.socket), ADD_ENV, modules_to=modules_to)
    assert out.rc == 0
    modules = _loaded(modules_to)
    assert "coil_cni.rpc" in modules and "coil_cni.wire" in modules  # the hook works
    # The call is coil_cni.rpc over the interpreter's C modules: no grpcio, no generated stubs, no
    # protobuf runtime, not even the socket module's Python layer (enum, selectors) or asyncio.
    heavy = ("grpc", "google", "coil.v1", "asyncio", "socket", "selectors", "enum", "logging")
    heavy += ("json", "re", "typing", "collections", "ipaddress", "encodings.utf_8_sig")
    assert _forbidden_in(modules, FORBIDDEN_MODULES + heavy + ("site",)) == []


def test_version_does_not_import_grpc(launcher: str, tmp_path: Path) -> None:
    modules_to = tmp_path / "modules"
    assert run(launcher, "VERSION", None, modules_to=modules_to).rc == 0
    modules = _loaded(modules_to)
    assert "coil_cni.main" in modules
    assert _forbidden_in(modules, FORBIDDEN_MODULES + ("grpc", "coil", "google", "asyncio")) == []


def test_config_error_does_not_import_grpc(launcher: str, tmp_path: Path) -> None:
    modules_to = tmp_path / "modules"
    out = run(launcher, "ADD", {"cniVersion": "9.9.9"}, ADD_ENV, modules_to=modules_to)
    assert out.output["code"] == 1
    assert _forbidden_in(_loaded(modules_to), ("grpc", "google")) == []
