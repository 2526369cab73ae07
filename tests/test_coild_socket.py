"""coild's socket: one coild per socket path, and it never deletes what it did not create.

Real coild processes in a node namespace this module creates, against a real allocator and etcd.
"""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.harness.cluster import (
    BIN,
    coild_answers,
    spawn,
    start_allocator,
    start_coild,
    wait_until,
)
from tests.harness.etcd import EtcdServer
from tests.harness.net import Netns
from tests.test_faults import readyz

pytestmark = pytest.mark.root


def readyz_body(ns: Netns) -> str:
    return ns.exec(
        "curl", "-s", "-m", "3", "http://127.0.0.1:9384/readyz", check=False, timeout=10
    ).stdout


def test_one_coild_per_socket_and_only_a_socket_is_replaced(
    etcd_server: EtcdServer, tmp_path: Path
) -> None:
    prefix = f"/coil-sock-{uuid.uuid4().hex[:8]}/"
    with contextlib.ExitStack() as stack:
        ns = Netns.create("coils-")
        stack.callback(ns.delete)
        listen = f"unix:{tmp_path}/allocator.sock"
        allocator = start_allocator(etcd_server.endpoint, prefix, listen, tmp_path / "alloc.log")
        stack.callback(allocator.stop)
        subprocess.run(
            [
                str(BIN / "coilctl"),
                "--allocator",
                listen,
                "pool",
                "create",
                "default",
                "10.77.0.0/24",
                "3",
            ],
            check=True,
            capture_output=True,
        )
        socket = tmp_path / "coild.sock"
        first = start_coild(ns, "node-s", listen, socket, tmp_path / "first.log")
        stack.callback(first.stop)
        wait_until("first coild ready", lambda: readyz(ns) == 200, proc=first)

        # A second coild on the same socket refuses to start and leaves the first one serving.
        second = spawn(
            "coild second",
            [
                "ip",
                "netns",
                "exec",
                ns.name,
                str(BIN / "coild"),
                "--node-name",
                "node-s",
                "--allocator",
                listen,
                "--socket",
                str(socket),
                "--metrics-addr",
                "127.0.0.1:9385",
            ],
            tmp_path / "second.log",
        )
        stack.callback(second.kill)
        try:
            second.popen.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second coild started on the same socket:\n{second.tail()}")
        assert second.popen.returncode != 0
        assert "another coild serves on it" in second.tail()
        assert "Traceback" not in second.tail()
        assert coild_answers(socket)
        assert readyz(ns) == 200

        # The socket vanishing (deleted by someone else) makes the first coild not ready.
        socket.unlink()
        wait_until("readiness notices the socket", lambda: readyz(ns) == 503, proc=first)
        assert "socket" in readyz_body(ns)
        first.stop()
        assert first.popen.returncode == 0, first.tail()

        # A path that is a regular file or a directory is refused, and left as it was.
        regular = tmp_path / "file.sock"
        regular.write_text("precious")
        directory = tmp_path / "dir.sock"
        directory.mkdir()
        for path in (regular, directory):
            refused = start_coild(
                ns, "node-s", listen, path, tmp_path / f"{path.name}.log", wait=False
            )
            stack.callback(refused.kill)
            refused.popen.wait(timeout=20)
            assert refused.popen.returncode != 0
            assert str(path) in refused.tail() and "Traceback" not in refused.tail()
        assert regular.read_text() == "precious" and directory.is_dir()

        # A coild that stops removes its own socket; one that died leaves it, and the next
        # coild replaces it.
        again = start_coild(ns, "node-s", listen, socket, tmp_path / "again.log")
        stack.callback(again.kill)
        again.stop()
        assert not socket.exists()
        died = start_coild(ns, "node-s", listen, socket, tmp_path / "died.log")
        died.kill()
        assert socket.exists()
        last = start_coild(ns, "node-s", listen, socket, tmp_path / "last.log")
        stack.callback(last.stop)
        assert coild_answers(socket)
