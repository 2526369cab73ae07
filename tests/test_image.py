"""The image (`make image`) run the way the Kubernetes manifests run it, two nodes on one machine.

Each node is a network namespace with its own host-like /opt/cni/bin and /etc/cni/net.d (the node
directory stands for the node's /). The two namespaces are joined by a veth pair, the "node
network". Everything runs from localhost/coil:latest with podman (runc, cgroupfs), each container in
its node's namespace as a hostNetwork pod would be, with only the capabilities the manifests grant:

- node-1 is also the control plane: etcd (the test's own etcd binary, on node-1's loopback) and the
  allocator container (no capabilities) listening on the node network;
- on each node the init container (`coil-install`, no capabilities) installs the plugin bundle and
  the conflist into the node's directories, then coild runs (NET_ADMIN only) with its socket in
  the node's run/coil;
- pods are containers that podman attaches with its CNI backend (`network_backend = "cni"`,
  plugin and configuration directories of that node) through Debian's ptp and the installed coil.
  podman itself runs in the node's namespace (nsenter --net), so the pods' veths land there.

Where podman or mmdebstrap is missing the test fails and says so: scripts/deps.sh installs them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.harness.cluster import coild_answers, wait_until
from tests.harness.deploy import REPO, tree
from tests.harness.etcd import etcd_binary
from tests.harness.net import Netns, run

# The first test also builds the image (mmdebstrap, about two minutes) unless it is up to date.
pytestmark = [pytest.mark.root, pytest.mark.slow, pytest.mark.timeout(1800)]

IMAGE = "localhost/coil:latest"
PREFIX = "coilt-"
POOL = ipaddress.ip_network("10.140.0.0/24")
NODE_NET = {"node-1": "192.168.77.1", "node-2": "192.168.77.2"}
ALLOCATOR = f"{NODE_NET['node-1']}:9380"
# What the manifests grant (docs/image.md): the allocator and the installer nothing, coild the
# right to change routes.
CAPS = {"allocator": [], "install": [], "coild": ["NET_ADMIN"]}
# Not the installer's: podman's lock in the configuration directory, coild's socket directory.
NOT_INSTALLED = (
    "etc/cni/net.d/cni.lock",
    "run",
    "run/coil",
    "run/coil/coild.sock",
    "run/coil/coild.sock.lock",  # coild's, like its socket: it outlives coild (flock)
)


def require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(
            f"{tool} is not installed (Debian package {package}); scripts/deps.sh installs it"
        )
    return path


@pytest.fixture(scope="module")
def image() -> str:
    """localhost/coil:latest, built by `make image` (a no-op when its inputs are unchanged)."""
    for tool, package in [("podman", "podman"), ("runc", "runc"), ("mmdebstrap", "mmdebstrap")]:
        require(tool, package)
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image.py")],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if proc.returncode != 0:
        pytest.fail(f"make image failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return IMAGE


def containers_conf(path: Path, root: Path) -> Path:
    """podman's configuration for one node: runc and cgroupfs (crun and systemd cgroups fail on
    such machines), resource limits it may set without CAP_SYS_RESOURCE, and the CNI backend
    with the node's plugin and configuration directories."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    nofile = min(soft, 4096)
    path.write_text(
        "[containers]\n"
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc=4096:4096"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "[network]\n"
        'network_backend = "cni"\n'
        f'cni_plugin_dirs = ["{root}/opt/cni/bin"]\n'
        f'network_config_dir = "{root}/etc/cni/net.d"\n'
    )
    return path


@dataclass
class Node:
    name: str
    ns: Netns
    root: Path
    conf: Path
    pristine: dict[str, str] = field(default_factory=dict)  # the tree before coil-install
    containers: list[str] = field(default_factory=list)

    @property
    def socket(self) -> Path:
        return self.root / "run" / "coil" / "coild.sock"

    def podman(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        """podman as this node runs it: in the node's network namespace, with its configuration."""
        proc = subprocess.run(
            ["nsenter", f"--net={self.ns.path}", "podman", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "CONTAINERS_CONF": str(self.conf)},
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} on {self.name}: {proc.stderr.strip()}")
        return proc

    def host_network(self, role: str, name: str) -> list[str]:
        """`podman run` options of a hostNetwork container of this node with `role`'s rights."""
        self.containers.append(name)
        caps = [f"--cap-add={c}" for c in CAPS[role]]
        return ["--name", name, "--network", f"ns:{self.ns.path}", "--cap-drop=all", *caps]

    def install(self, image: str, *extra: str) -> subprocess.CompletedProcess[str]:
        """The DaemonSet's init container."""
        name = f"{PREFIX}install-{uuid.uuid4().hex[:8]}"
        return self.podman(
            "run",
            "--rm",
            *self.host_network("install", name),
            "-v",
            f"{self.root}:/host",
            image,
            "coil-install",
            "--host-root",
            "/host",
            "--socket",
            str(self.socket),
            *extra,
        )

    def coilctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        name = f"{PREFIX}ctl-{uuid.uuid4().hex[:8]}"
        return self.podman(
            "run",
            "--rm",
            *self.host_network("allocator", name),
            IMAGE,
            "coilctl",
            "--allocator",
            ALLOCATOR,
            *args,
            check=False,
        )

    def pod(self, image: str) -> tuple[str, str]:
        """Start a pod on this node; (its name, its address)."""
        name = f"{PREFIX}pod-{uuid.uuid4().hex[:8]}"
        self.containers.append(name)
        self.podman("run", "-d", "--name", name, "--network", "coil-net", image, "sleep", "600")
        inspect = self.podman("inspect", "--format", "{{json .NetworkSettings.Networks}}", name)
        return name, json.loads(inspect.stdout)["coil-net"]["IPAddress"]

    def remove(self, name: str) -> subprocess.CompletedProcess[str]:
        proc = self.podman("rm", "-f", "-t", "0", name, check=False)
        if name in self.containers:
            self.containers.remove(name)
        return proc

    def table_119(self) -> list[ipaddress.IPv4Network]:
        return [ipaddress.ip_network(r["dst"]) for r in self.ns.routes("119", "-4")]

    def logs(self) -> str:
        out = []
        for name in self.containers:
            logs = self.podman("logs", "--tail", "20", name, check=False)
            out.append(f"--- {name}\n{logs.stdout}{logs.stderr}")
        return "\n".join(out)


@pytest.fixture
def cluster(image: str, tmp_path: Path) -> Iterator[dict[str, Node]]:
    """node-1 (control plane: etcd, the allocator; coild) and node-2 (coild), both installed."""
    nodes: dict[str, Node] = {}
    etcd: subprocess.Popen[bytes] | None = None
    try:
        for name in NODE_NET:
            root = tmp_path / name
            for d in ("opt/cni/bin", "etc/cni/net.d", "run/coil"):
                (root / d).mkdir(parents=True)
            for plugin in ("ptp", "loopback"):
                shutil.copy2(f"/usr/lib/cni/{plugin}", root / "opt/cni/bin" / plugin)
            ns = Netns.create(PREFIX)
            conf = containers_conf(tmp_path / f"{name}.conf", root)
            nodes[name] = Node(name, ns, root, conf, tree(root))
        one, two = nodes["node-1"], nodes["node-2"]
        link = f"c{uuid.uuid4().hex[:6]}"
        run("ip", "-n", one.ns.name, "link", "add", f"{link}a", "type", "veth", "peer", "name",
            f"{link}b", "netns", two.ns.name)  # fmt: skip
        for node, dev in ((one, f"{link}a"), (two, f"{link}b")):
            node.ns.ip("addr", "add", f"{NODE_NET[node.name]}/24", "dev", dev)
            node.ns.ip("link", "set", dev, "up")

        # The control plane on node-1: etcd on its loopback, then the allocator.
        etcd_log = open(tmp_path / "etcd.log", "wb")  # noqa: SIM115 - lives with the process
        etcd = subprocess.Popen(
            ["ip", "netns", "exec", one.ns.name, etcd_binary(), "--data-dir",
             str(tmp_path / "etcd"), "--listen-client-urls", "http://127.0.0.1:2379",
             "--advertise-client-urls", "http://127.0.0.1:2379", "--listen-peer-urls",
             "http://127.0.0.1:2380", "--log-level", "error"],
            stdout=etcd_log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        name = f"{PREFIX}allocator-{uuid.uuid4().hex[:8]}"
        # Plaintext TCP on the test's own node network (--insecure: every caller is an operator);
        # what mutual TLS and the node identities allow is tests/test_authz.py's subject.
        one.podman(
            "run", "-d", *one.host_network("allocator", name), image, "coil-allocator",
            "--listen", f"0.0.0.0:{ALLOCATOR.split(':')[1]}", "--insecure", "--etcd-endpoints",
            "127.0.0.1:2379", "--etcd-prefix", "/coil/",
        )  # fmt: skip
        wait_until(
            "the allocator creates the pool",
            lambda: one.coilctl("pool", "create", "default", str(POOL), "3").returncode == 0,
            timeout=60,
        )
        for node in nodes.values():
            installed = node.install(image, "--grace", "2")
            assert installed.returncode == 0, installed.stderr
            name = f"{PREFIX}coild-{node.name}-{uuid.uuid4().hex[:6]}"
            node.podman(
                "run", "-d", *node.host_network("coild", name), "-v",
                f"{node.root}/run/coil:/run/coil", image, "coild", "--node-name", node.name,
                "--allocator", ALLOCATOR, "--socket", "/run/coil/coild.sock",
            )  # fmt: skip
        for node in nodes.values():
            try:
                wait_until(f"coild on {node.name}", lambda n=node: coild_answers(n.socket), 60)
            except TimeoutError as e:
                raise AssertionError(f"{e}\n{node.logs()}") from None
        yield nodes
    finally:
        for node in nodes.values():
            for name in list(node.containers):
                node.remove(name)
        if etcd is not None:
            etcd.kill()
            etcd.wait(timeout=10)
        for node in nodes.values():
            node.ns.delete()


@contextlib.contextmanager
def upgraded(image: str, node: Node) -> Iterator[str]:
    """The same image with a bundle of another version, as a new image would bring."""
    tag = "localhost/coil:test-upgrade"
    name = f"{PREFIX}upgrade-{uuid.uuid4().hex[:8]}"
    bump = "v=$(cat VERSION) && echo $v-upgrade > VERSION"
    node.podman("run", "--name", name, "--network", "none", "-w", "/usr/lib/coil/cni-bundle",
                image, "sh", "-c", bump)  # fmt: skip
    try:
        node.podman("commit", "-q", name, tag)
    finally:
        node.podman("rm", "-f", name, check=False)
    try:
        yield tag
    finally:
        node.podman("rmi", "-f", tag, check=False)


def test_two_nodes_from_the_image(cluster: dict[str, Node], image: str) -> None:
    nodes = list(cluster.values())

    # Pods on both nodes: distinct addresses inside the pool, each covered by a block of its
    # node's routes in table 119 (in the node's namespace, where coild runs).
    pods: dict[str, tuple[Node, str]] = {}
    for node in nodes:
        for _ in range(3):
            name, address = node.pod(image)
            pods[name] = (node, address)
    addresses = [ipaddress.ip_address(a) for _, a in pods.values()]
    assert len(set(addresses)) == len(addresses), pods
    assert all(a in POOL for a in addresses), pods
    for node, address in pods.values():
        blocks = node.table_119()
        assert any(ipaddress.ip_address(address) in b for b in blocks), (address, blocks)
        other = next(n for n in nodes if n is not node)
        assert not any(ipaddress.ip_address(address) in b for b in other.table_119())

    # An upgrade of the image with pods running and being added and deleted: the init container
    # of the new image runs on each node while pods come and go; no ADD and no DEL fails.
    failures: list[str] = []
    done = threading.Event()
    churned = {"count": 0}

    def churn(node: Node) -> None:
        deadline = time.monotonic() + 300
        while not done.is_set() and time.monotonic() < deadline:
            try:
                name, _ = node.pod(image)
            except AssertionError as e:
                failures.append(f"ADD on {node.name}: {e}")
                return
            removed = node.remove(name)
            if removed.returncode != 0 or "rror" in removed.stderr:
                failures.append(f"DEL on {node.name}: {removed.stderr.strip()}")
            churned["count"] += 1

    with upgraded(image, nodes[0]) as new_image:
        threads = [threading.Thread(target=churn, args=(n,)) for n in nodes]
        for t in threads:
            t.start()
        try:
            for node in nodes:
                up = node.install(new_image, "--grace", "2")
                assert up.returncode == 0, up.stderr
                assert "-upgrade" in up.stdout, up.stdout
        finally:
            done.set()
            for t in threads:
                t.join(timeout=300)
    assert not failures, failures
    assert churned["count"] >= 2, churned
    for node in nodes:
        versions = [
            v for v in os.listdir(node.root / "opt/cni/bin/coil.d") if v != "installed.json"
        ]
        assert len(versions) == 1 and versions[0].endswith("-upgrade"), versions
        # Pods started before the upgrade are deleted by the new version.
    for name, (node, _) in pods.items():
        removed = node.remove(name)
        assert removed.returncode == 0 and "rror" not in removed.stderr, removed.stderr
    # Every DEL reached coild: no address is left in use.
    usage = json.loads(nodes[0].coilctl("usage", "-o", "json").stdout)["usage"]
    assert usage and sum(row["addresses_used"] for row in usage) == 0, usage

    # Uninstall: the node's directories are as they were before coil was installed.
    for node in nodes:
        gone = node.install(image, "--uninstall")
        assert gone.returncode == 0, gone.stderr
        after = {p: d for p, d in tree(node.root).items() if p not in NOT_INSTALLED}
        assert after == {p: d for p, d in node.pristine.items() if p not in NOT_INSTALLED}


def test_the_containerfile_builds_the_same_layout(image: str, tmp_path: Path) -> None:
    """deploy/image/Containerfile on a Debian bookworm base with Python 3.11 and no coil (the
    image with /opt/coil and /usr/lib/coil removed, standing in for python:3.11-slim-bookworm,
    which this test cannot pull) gives the layout `make image` gives."""
    for d in ("opt/cni/bin", "etc/cni/net.d"):
        (tmp_path / d).mkdir(parents=True)
    conf = containers_conf(tmp_path / "build.conf", tmp_path)
    env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def podman(*args: str) -> str:
        proc = subprocess.run(
            ["podman", *args], capture_output=True, text=True, timeout=600, env=env
        )
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr[-2000:]}"
        return proc.stdout

    context = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "image.py"), "--context-only"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert context.returncode == 0, context.stderr[-3000:]
    base, built = "localhost/coil:test-base", "localhost/coil:test-containerfile"
    name = f"{PREFIX}base-{uuid.uuid4().hex[:8]}"
    layout = (
        "ls /opt/coil/bin | grep -E '^coil' ; ls /usr/lib/coil/cni-bundle ; "
        "for p in coil-allocator coild coilctl coil-install; do "
        "$p --help >/dev/null || echo FAIL $p; done"
    )
    try:
        podman("run", "--name", name, "--network", "none", image, "rm", "-rf", "/opt/coil",
               "/usr/lib/coil")  # fmt: skip
        podman("commit", "-q", name, base)
        podman("build", "-q", "--network", "none", "--build-arg", f"BASE={base}", "-f",
               str(REPO / "deploy/image/Containerfile"), "-t", built, str(REPO))  # fmt: skip
        expected = podman("run", "--rm", "--network", "none", image, "sh", "-c", layout)
        got = podman("run", "--rm", "--network", "none", built, "sh", "-c", layout)
    finally:
        subprocess.run(["podman", "rm", "-f", name], capture_output=True, env=env)
        subprocess.run(["podman", "rmi", "-f", built, base], capture_output=True, env=env)
    assert "FAIL" not in got and "coild" in got and "VERSION" in got, got
    assert got == expected
