"""Real coil processes for tests and the demo: coil-allocator, coild inside a node's namespace,
the CNI plugin driven as a container runtime drives it, and pods as network namespaces."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from tests.harness.net import Netns, run

BIN = Path(sys.executable).parent
SYSTEM_CNI = "/usr/lib/cni"


@dataclass
class Proc:
    """A process with its log file; `stop()` sends SIGTERM, then SIGKILL."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 10) -> None:
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)

    def kill(self) -> None:
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def spawn(name: str, args: list[str], log: Path, env: dict[str, str] | None = None) -> Proc:
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115 - the child owns it
    popen = subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    return Proc(name, popen, log)


def wait_until(what: str, check: Any, timeout: float = 20, proc: Proc | None = None) -> Any:
    """Poll `check()` until it returns a truthy value; raise naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not within {timeout} s" + (f"\n{proc.tail()}" if proc else ""))


def start_allocator(
    etcd_endpoints: str, prefix: str, listen: str, log: Path, extra: list[str] | None = None
) -> Proc:
    proc = spawn(
        "coil-allocator",
        [
            str(BIN / "coil-allocator"),
            "--listen",
            listen,
            "--etcd-endpoints",
            etcd_endpoints,
            "--etcd-prefix",
            prefix,
            "--metrics-addr",
            "",
            *(extra or []),
        ],
        log,
    )

    def answers() -> bool:
        try:
            with grpc.insecure_channel(listen) as ch:
                apb_grpc.AllocatorServiceStub(ch).ListPools(apb.ListPoolsRequest(), timeout=1)
            return True
        except grpc.RpcError:
            return False

    wait_until(f"allocator on {listen}", answers, proc=proc)
    return proc


def start_coild(
    node: Netns,
    node_name: str,
    allocator: str,
    socket: Path,
    log: Path,
    extra: list[str] | None = None,
    wait: bool = True,
) -> Proc:
    proc = spawn(
        f"coild {node_name}",
        [
            "ip",
            "netns",
            "exec",
            node.name,
            str(BIN / "coild"),
            "--node-name",
            node_name,
            "--allocator",
            allocator,
            "--socket",
            str(socket),
            "--metrics-addr",
            "127.0.0.1:9384",
            *(extra or []),
        ],
        log,
    )
    if wait:
        wait_coild_ready(socket, proc)
    return proc


def coild_answers(socket: Path) -> bool:
    """Whether coild serves on `socket` (a Check of an unknown attachment gets its NOT_FOUND)."""
    if not socket.exists():
        return False
    try:
        with grpc.insecure_channel(f"unix:{socket}") as ch:
            npb_grpc.NodeAgentServiceStub(ch).Check(
                npb.CheckRequest(attachment=npb.Attachment(container_id="probe", interface="x")),
                timeout=1,
            )
    except grpc.RpcError as e:
        return e.code() == grpc.StatusCode.NOT_FOUND
    return True


def wait_coild_ready(socket: Path, proc: Proc | None = None, timeout: float = 20) -> None:
    wait_until(f"coild on {socket}", lambda: coild_answers(socket), timeout=timeout, proc=proc)


def install_plugin(dest: Path) -> Path:
    """Install the coil CNI plugin launcher into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    run(sys.executable, "-m", "coil_cni.install", str(dest), timeout=120)
    return dest / "coil"


@dataclass
class CniResult:
    code: int
    out: dict[str, Any] | None
    stderr: str

    @property
    def ok(self) -> bool:
        return self.code == 0

    def ips(self) -> list[str]:
        return [ip["address"] for ip in (self.out or {}).get("ips", [])]


@dataclass
class Runtime:
    """Drives a main CNI plugin (ptp by default) inside a node namespace as a runtime does."""

    node: Netns
    plugin_dir: Path
    socket: Path
    cni_version: str = "1.0.0"
    main_plugin: str = "ptp"
    network: str = "coil-net"
    extra_ipam: dict[str, Any] = field(default_factory=dict)

    def config(self, **extra: Any) -> dict[str, Any]:
        conf: dict[str, Any] = {
            "cniVersion": self.cni_version,
            "name": self.network,
            "type": self.main_plugin,
            "ipam": {"type": "coil", "socket": str(self.socket), **self.extra_ipam},
        }
        conf.update(extra)
        return conf

    def call(
        self,
        command: str,
        container_id: str,
        netns: str = "",
        ifname: str = "eth0",
        args: str = "",
        config: dict[str, Any] | None = None,
        plugin: str | None = None,
    ) -> CniResult:
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": container_id,
            "CNI_NETNS": netns,
            "CNI_IFNAME": ifname,
            "CNI_ARGS": args,
            "CNI_PATH": f"{self.plugin_dir}:{SYSTEM_CNI}",
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        exe = plugin or f"{SYSTEM_CNI}/{self.main_plugin}"
        proc = subprocess.run(
            ["ip", "netns", "exec", self.node.name, exe],
            input=json.dumps(config or self.config()),
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return CniResult(proc.returncode, out, proc.stderr)


@dataclass
class Pod:
    """A pod: a network namespace attached to a node through the CNI plugin."""

    ns: Netns
    container_id: str
    namespace: str
    name: str
    result: CniResult

    @property
    def cni_args(self) -> str:
        return cni_args(self.namespace, self.name)


def cni_args(namespace: str, pod: str) -> str:
    return (
        f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={pod};"
        f"K8S_POD_INFRA_CONTAINER_ID={uuid.uuid4().hex};K8S_POD_UID={uuid.uuid4()}"
    )


def add_pod(
    runtime: Runtime, prefix: str, namespace: str = "default", name: str = "", **config: Any
) -> Pod:
    """Create a pod namespace and ADD it; on failure the namespace is removed and it raises.

    IPv6 duplicate address detection is turned off in the pod's namespace: ptp waits for it to
    settle (about 2 s per pod), which says nothing about coil and slows every test down.
    """
    ns = Netns.create(prefix)
    ns.sysctl("net.ipv6.conf.all.accept_dad", "0")
    ns.sysctl("net.ipv6.conf.default.accept_dad", "0")
    container_id = uuid.uuid4().hex
    name = name or f"pod-{container_id[:6]}"
    result = runtime.call(
        "ADD",
        container_id,
        ns.path,
        args=cni_args(namespace, name),
        config=runtime.config(**config) if config else None,
    )
    if not result.ok:
        ns.delete()
        raise RuntimeError(f"ADD {name} failed: {result.out} {result.stderr}")
    return Pod(ns, container_id, namespace, name, result)


def del_pod(runtime: Runtime, pod: Pod) -> CniResult:
    result = runtime.call("DEL", pod.container_id, pod.ns.path, args=pod.cni_args)
    pod.ns.delete()
    return result
