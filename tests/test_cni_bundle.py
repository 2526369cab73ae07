"""The CNI plugin bundle (`make cni-bundle`) and its installer (`coil-install`), on a directory tree
standing for a node's root.

The node here is a root filesystem holding only a statically linked busybox: no libc, no loader,
no Python. `coil-install --host-root` puts the bundle and the conflist into it, and the plugin runs
in a chroot of it for every CNI command against a real coild (in a node namespace) and a real
allocator and etcd. The installer's upgrade is exercised while ADDs run."""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil.v1 import nodeagent_pb2_grpc
from coil_cni.node_install import default_conflist
from tests.harness.cluster import BIN, Proc, cni_args, start_allocator, start_coild, wait_until
from tests.harness.deploy import busybox_root, cni_bundle, coil_install, tree
from tests.harness.etcd import EtcdServer
from tests.harness.net import Netns
from tests.test_cni_plugin import FakeNodeAgent

PREFIX = "coilt-"
NODE = "bundle-node"
POOL = ipaddress.ip_network("10.120.0.0/24")
CHROOT = shutil.which("chroot") or "/usr/sbin/chroot"


@dataclass
class ChrootNode:
    root: Path
    allocator_addr: str
    coild: Proc

    def cni(
        self, command: str, conf: dict[str, Any] | None = None, **env: str
    ) -> tuple[int, dict[str, Any] | None]:
        """Run the installed /opt/cni/bin/coil inside the chroot, as a runtime runs it."""
        proc = subprocess.run(
            [CHROOT, str(self.root), "/opt/cni/bin/coil"],
            input=json.dumps(conf).encode() if conf is not None else b"",
            capture_output=True,
            env={"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin", **env},
            timeout=60,
        )
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
        return proc.returncode, out

    def address_owner(self, address: str) -> str:
        with grpc.insecure_channel(self.allocator_addr) as ch:
            got = apb_grpc.AllocatorServiceStub(ch).GetAddress(
                apb.GetAddressRequest(address=address), timeout=5
            )
        return got.record.owner.pod if got.HasField("record") else ""


def netconf(version: str = "1.1.0", **extra: Any) -> dict[str, Any]:
    """The ptp plugin's entry of the installed conflist, as ptp hands it to its IPAM plugin."""
    plugin = default_conflist("/run/coild.sock")["plugins"][0]
    return {"cniVersion": version, "name": "coil-net", **plugin, **extra}


def attachment(container_id: str, pod: str) -> dict[str, str]:
    return {
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": "/proc/1/ns/net",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": cni_args("default", pod),
    }


@pytest.fixture(scope="module")
def bundle() -> Path:
    return cni_bundle()


@pytest.fixture(scope="module")
def node(
    etcd_server: EtcdServer, bundle: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ChrootNode]:
    tmp = tmp_path_factory.mktemp("bundle-node")
    root = busybox_root(tmp / "root")
    installed = coil_install("--host-root", str(root), "--grace", "0", "--bundle", str(bundle))
    assert installed.returncode == 0, installed.stderr
    addr = f"unix:{tmp}/allocator.sock"
    prefix = f"/coil-bundle-{uuid.uuid4().hex[:8]}/"
    allocator = start_allocator(etcd_server.endpoint, prefix, addr, tmp / "allocator.log")
    ns: Netns | None = None
    coild: Proc | None = None
    try:
        with grpc.insecure_channel(addr) as ch:
            apb_grpc.AllocatorServiceStub(ch).CreatePool(
                apb.CreatePoolRequest(name="default", subnets=[str(POOL)], block_size_bits=4)
            )
        ns = Netns.create(PREFIX)
        coild = start_coild(
            ns, NODE, addr, root / "run" / "coild.sock", tmp / "coild.log", ["--release-grace", "1"]
        )
        yield ChrootNode(root, addr, coild)
    finally:
        if coild is not None:
            coild.stop()
        allocator.stop()
        if ns is not None:
            ns.delete()


# -- the bundle on a node with nothing but busybox -------------------------------------------------


@pytest.mark.root
@pytest.mark.slow
def test_every_command_runs_in_a_busybox_only_chroot(node: ChrootNode) -> None:
    # Nothing of the host's: no libc or loader in the root but the bundle's own.
    assert not (node.root / "lib").exists() and not (node.root / "usr").exists()

    rc, out = node.cni("VERSION")
    assert rc == 0 and out is not None and "1.1.0" in out["supportedVersions"]

    cid = uuid.uuid4().hex
    rc, added = node.cni("ADD", netconf(), **attachment(cid, "chroot-pod"))
    assert rc == 0, added
    assert added is not None
    address = ipaddress.ip_interface(added["ips"][0]["address"])
    assert address.ip in POOL
    assert node.address_owner(str(address.ip)) == "chroot-pod"

    rc, out = node.cni("CHECK", netconf(prevResult=added), **attachment(cid, "chroot-pod"))
    assert (rc, out) == (0, None)

    valid = {"cni.dev/valid-attachments": [{"containerID": cid, "ifname": "eth0"}]}
    rc, out = node.cni("GC", netconf(**valid))
    assert (rc, out) == (0, None)
    assert node.address_owner(str(address.ip)) == "chroot-pod", "GC freed a valid attachment"

    rc, out = node.cni("STATUS", netconf())
    assert (rc, out) == (0, None)

    rc, out = node.cni("DEL", netconf(), **attachment(cid, "chroot-pod"))
    assert (rc, out) == (0, None)
    assert node.address_owner(str(address.ip)) == ""

    # An error comes back as a CNI error object: coild's socket missing is "try again later".
    rc, out = node.cni(
        "ADD",
        netconf(ipam={"type": "coil", "socket": "/run/none.sock"}),
        **attachment(uuid.uuid4().hex, "p"),
    )
    assert rc == 1 and out is not None and out["code"] == 11, out


# -- the installer ---------------------------------------------------------------------------------


def _node_tree(tmp_path: Path) -> Path:
    """A node's root with another plugin and another network configuration already there."""
    root = tmp_path / "host"
    (root / "opt/cni/bin").mkdir(parents=True)
    (root / "etc/cni/net.d").mkdir(parents=True)
    (root / "opt/cni/bin/ptp").write_text("another plugin\n")
    (root / "etc/cni/net.d/99-other.conflist").write_text('{"name": "other"}\n')
    return root


def test_install_is_idempotent_and_uninstall_leaves_the_node_as_it_was(
    bundle: Path, tmp_path: Path
) -> None:
    root = _node_tree(tmp_path)
    before = tree(root)
    first = coil_install("--host-root", str(root), "--bundle", str(bundle))
    assert first.returncode == 0, first.stderr
    version = (bundle / "VERSION").read_text().strip()

    conflist = json.loads((root / "etc/cni/net.d/10-coil.conflist").read_text())
    assert conflist == default_conflist("/run/coild.sock")
    launcher = root / "opt/cni/bin/coil"
    assert os.access(launcher, os.X_OK)
    assert sorted(os.listdir(root / "opt/cni/bin/coil.d")) == [version, "installed.json"]
    # The launcher runs the installed copy (not the bundle it was copied from).
    shutil.move(bundle, tmp_path / "moved-bundle")
    try:
        run = subprocess.run(
            [str(launcher)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30
        )
    finally:
        shutil.move(tmp_path / "moved-bundle", bundle)
    assert run.returncode == 0 and b"supportedVersions" in run.stdout, run

    # Again with the same bundle: nothing changes, not even the files' identity.
    installed = tree(root)
    stat = launcher.stat()
    again = coil_install("--host-root", str(root), "--bundle", str(bundle))
    assert again.returncode == 0, again.stderr
    assert tree(root) == installed
    assert (launcher.stat().st_ino, launcher.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    gone = coil_install("--host-root", str(root), "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert tree(root) == before
    assert coil_install("--host-root", str(root), "--uninstall").returncode == 0
    assert tree(root) == before


def test_uninstall_keeps_a_coil_it_did_not_write(tmp_path: Path) -> None:
    root = _node_tree(tmp_path)
    (root / "opt/cni/bin/coil").write_text("#!/bin/sh\n# a venv launcher\n")
    before = tree(root)
    assert coil_install("--host-root", str(root), "--uninstall").returncode == 0
    assert tree(root) == before


@pytest.mark.parametrize(
    ("args", "env", "names"),
    [
        ([], {"COIL_CNI_CONFLIST": "{not json"}, "$COIL_CNI_CONFLIST is not JSON"),
        ([], {"COIL_CNI_CONFLIST": '{"cniVersion": "1.0.0", "name": "x"}'}, "'plugins'"),
        (["--conflist", "/nonexistent.conflist"], {}, "--conflist /nonexistent.conflist"),
        (["--conflist-name", "../evil.conflist"], {}, "--conflist-name"),
        (["--conflist-name", "coil.json"], {}, "--conflist-name"),
        (["--grace", "-1"], {}, "--grace"),
        (["--bundle", "/nonexistent"], {}, "no CNI plugin bundle"),
    ],
)
def test_bad_input_is_refused_and_changes_nothing(
    bundle: Path, tmp_path: Path, args: list[str], env: dict[str, str], names: str
) -> None:
    root = _node_tree(tmp_path)
    before = tree(root)
    if "--bundle" not in args:
        args = [*args, "--bundle", str(bundle)]
    proc = coil_install("--host-root", str(root), *args, env=env)
    assert proc.returncode == 2, proc
    assert names in proc.stderr
    assert tree(root) == before


def test_a_new_conflist_name_replaces_the_old_file(bundle: Path, tmp_path: Path) -> None:
    root = _node_tree(tmp_path)
    custom = tmp_path / "custom.conflist"
    conf = default_conflist("/run/other.sock")
    conf["name"] = "custom-net"
    custom.write_text(json.dumps(conf))
    b = ["--bundle", str(bundle), "--host-root", str(root)]
    assert (
        coil_install(*b, "--conflist", str(custom), "--conflist-name", "05-c.conflist").returncode
        == 0
    )
    assert json.loads((root / "etc/cni/net.d/05-c.conflist").read_text()) == conf
    assert coil_install(*b).returncode == 0
    names = sorted(os.listdir(root / "etc/cni/net.d"))
    assert names == ["10-coil.conflist", "99-other.conflist"]
    assert coil_install(*b, "--uninstall").returncode == 0
    assert sorted(os.listdir(root / "etc/cni/net.d")) == ["99-other.conflist"]


def _variant(bundle: Path, dest: Path, version: str) -> Path:
    """A copy of the bundle that calls itself `version` (an upgrade as the installer sees it)."""
    shutil.copytree(bundle, dest, symlinks=True)
    (dest / "VERSION").write_text(version + "\n")
    return dest


@pytest.mark.root
@pytest.mark.slow
def test_upgrade_while_pods_are_added_fails_no_add_or_del(
    node: ChrootNode, bundle: Path, tmp_path: Path
) -> None:
    old = (bundle / "VERSION").read_text().strip()
    new_bundle = _variant(bundle, tmp_path / "new", f"{old}-upgrade")
    coil_d = node.root / "opt/cni/bin/coil.d"
    assert sorted(os.listdir(coil_d)) == [old, "installed.json"]

    failures: list[tuple[str, int, Any]] = []
    done = threading.Event()
    counts = {"ADD": 0, "DEL": 0}

    def pods() -> None:
        deadline = time.monotonic() + 120
        for i in range(5000):
            if done.is_set() or time.monotonic() > deadline:
                return
            cid = uuid.uuid4().hex
            for command in ("ADD", "DEL"):
                rc, out = node.cni(command, netconf(), **attachment(cid, f"up-{i}"))
                counts[command] += 1
                if rc != 0:
                    failures.append((command, rc, out))

    def more_adds(n: int) -> None:
        """Wait (bounded) until the loop has run `n` more ADDs."""
        target = counts["ADD"] + n
        wait_until(f"{n} more ADDs", lambda: counts["ADD"] >= target or not loop.is_alive(), 60)

    loop = threading.Thread(target=pods)
    loop.start()
    try:
        more_adds(3)
        up = coil_install(
            "--host-root", str(node.root), "--bundle", str(new_bundle), "--grace", "1"
        )
        assert up.returncode == 0, up.stderr
        assert sorted(os.listdir(coil_d)) == [f"{old}-upgrade", "installed.json"]
        more_adds(3)
        down = coil_install("--host-root", str(node.root), "--bundle", str(bundle), "--grace", "1")
        assert down.returncode == 0, down.stderr
        assert sorted(os.listdir(coil_d)) == [old, "installed.json"]
        more_adds(3)
    finally:
        done.set()
        loop.join(timeout=120)
    assert not failures, failures[:5]
    assert counts["ADD"] >= 9, counts
    assert f"coil.d/{old}" in (node.root / "opt/cni/bin/coil").read_text()


def test_an_upgrade_waits_for_a_plugin_still_running_the_old_version(
    bundle: Path, tmp_path: Path
) -> None:
    """A CHECK that is waiting for coild when the upgrade switches versions was started from the old
    version's directory and may still load modules from it after coild answers. The installer
    switches the launcher at once but keeps the old directory for its grace period, and the CHECK
    finishes."""
    grace = 3
    root = _node_tree(tmp_path)
    old = (bundle / "VERSION").read_text().strip()
    new_bundle = _variant(bundle, tmp_path / "new", f"{old}-upgrade")
    b = ["--host-root", str(root)]
    assert coil_install(*b, "--bundle", str(bundle)).returncode == 0
    directory = tempfile.mkdtemp(prefix="coil-up-")
    socket = os.path.join(directory, "coild.sock")
    agent = FakeNodeAgent()
    agent.delay = 2.0
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    nodeagent_pb2_grpc.add_NodeAgentServiceServicer_to_server(agent, server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    try:
        conf = netconf(
            ipam={"type": "coil", "socket": socket, "timeout": 10},
            prevResult={"cniVersion": "1.1.0", "ips": [{"address": "10.1.0.5/16"}]},
        )
        check = subprocess.Popen(
            [str(root / "opt/cni/bin/coil")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={"CNI_COMMAND": "CHECK", **attachment("c1", "p")},
        )
        assert check.stdin is not None
        check.stdin.write(json.dumps(conf).encode())
        check.stdin.close()
        deadline = time.monotonic() + 10
        while not agent.requests and time.monotonic() < deadline:
            time.sleep(0.01)
        assert agent.requests, "the plugin never called coild"
        up = subprocess.Popen(
            [str(BIN / "coil-install"), *b, "--bundle", str(new_bundle), "--grace", str(grace)],
            stderr=subprocess.PIPE,
        )
        # While the installer waits out its grace period, new execs get the new version and the
        # old version's directory is still there for the CHECK in flight.
        seen_both = False
        deadline = time.monotonic() + grace + 10
        while up.poll() is None and time.monotonic() < deadline:
            names = set(os.listdir(root / "opt/cni/bin/coil.d"))
            if {old, f"{old}-upgrade"} <= names and (
                f"{old}-upgrade" in (root / "opt/cni/bin/coil").read_text()
            ):
                seen_both = True
            time.sleep(0.05)
        assert up.wait(timeout=30) == 0
        assert seen_both, "the old version was removed before its grace period ended"
        assert check.stdout is not None
        out = check.stdout.read()
        check.wait(timeout=30)
    finally:
        server.stop(0)
        shutil.rmtree(directory, ignore_errors=True)
    assert sorted(os.listdir(root / "opt/cni/bin/coil.d")) == [f"{old}-upgrade", "installed.json"]
    assert (check.returncode, out) == (0, b""), out
