"""Shared pieces of the benchmark suite: statistics, a plugin exec that reads the child's own peak
RSS, Prometheus scrapes, and a `Lab` that owns every process, namespace and directory a run creates
and removes them all on exit."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from tests.harness.cluster import Proc, start_allocator, start_coild
from tests.harness.etcd import EtcdServer, free_port, start_etcd
from tests.harness.net import Netns, cleanup_prefix

_T = TypeVar("_T")
QUICK = os.environ.get("BENCH_QUICK", "") not in ("", "0")
NS_PREFIX = "coilb-"


def pick(full: _T, quick: _T) -> _T:
    return quick if QUICK else full


# -- statistics --------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Linear-interpolated percentile (p in 0..100) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        return math.nan
    k = (len(data) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean of a list of durations, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "max": round(max(ms), 3) if ms else math.nan,
        "mean": round(sum(ms) / len(ms), 3) if ms else math.nan,
    }


# -- exec a plugin -----------------------------------------------------------------------------


@dataclass
class Exec:
    seconds: float
    code: int
    stdout: bytes
    max_rss_kb: int


def exec_plugin(argv: Sequence[str], env: dict[str, str], stdin: bytes) -> Exec:
    """Run one plugin as a runtime does (environment, configuration on stdin, result on stdout).

    Time runs from before the fork to the reap. The child is reaped with wait4, but its ru_maxrss
    is not the plugin's own: Linux carries the high-water mark of the address space replaced at
    exec into it, and a child of this process starts as a copy of (or, vforked, shares) this large
    process. Use `peak_rss_kb` for the plugin's memory."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(stdin)
    proc.stdin.close()
    out = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
    return Exec(elapsed, proc.returncode, out, usage.ru_maxrss)


def peak_rss_kb(argv: Sequence[str], env: dict[str, str], stdin: bytes, scratch: Path) -> int:
    """The plugin's own peak RSS (KiB): run it under /usr/bin/time, a small parent, so the
    high-water mark starts from time's few pages rather than from this process."""
    out = scratch / f"rss-{uuid.uuid4().hex}"
    subprocess.run(
        ["/usr/bin/time", "-f", "%M", "-o", str(out), *argv],
        input=stdin,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=60,
        check=False,
    )
    try:
        return int(out.read_text().split()[-1])
    finally:
        out.unlink(missing_ok=True)


# -- metrics -----------------------------------------------------------------------------------


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as {"name{labels}": value} (comments dropped)."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(value)
    return out


def metric_sum(sample: dict[str, float], name: str, contains: str = "") -> float:
    """Sum of every series of `name` (optionally only those whose labels contain `contains`)."""
    total = 0.0
    for key, value in sample.items():
        base = key.split("{", 1)[0]
        if base == name and contains in key:
            total += value
    return total


def rss_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


# -- the lab -----------------------------------------------------------------------------------


@dataclass
class Lab:
    """One etcd, coil-allocator processes, coild in namespaces; everything removed by close()."""

    root: Path
    etcd: EtcdServer
    stack: contextlib.ExitStack
    allocators: list[tuple[Proc, str, int]] = field(default_factory=list)
    namespaces: list[Netns] = field(default_factory=list)

    @property
    def etcd_metrics(self) -> str:
        return f"http://{self.etcd.endpoint}/metrics"

    def start_allocator(self, name: str) -> tuple[Proc, str, int]:
        """A coil-allocator process on a UNIX socket, metrics on a loopback port."""
        sock = f"unix:{self.root}/{name}.sock"
        port = free_port()
        proc = start_allocator(
            self.etcd.endpoint,
            "/coil/",
            sock,
            self.root / f"{name}.log",
            extra=["--metrics-addr", f"127.0.0.1:{port}", "--log-level", "warning"],
        )
        self.stack.callback(proc.stop)
        self.allocators.append((proc, sock, port))
        return proc, sock, port

    def netns(self) -> Netns:
        ns = Netns.create(NS_PREFIX)
        self.namespaces.append(ns)
        self.stack.callback(ns.delete)
        return ns

    def start_coild(self, node: str, allocator: str, wait: bool = True) -> tuple[Proc, Path, Netns]:
        ns = self.netns()
        sock = self.root / f"coild-{node}.sock"
        proc = start_coild(
            ns,
            node,
            allocator,
            sock,
            self.root / f"coild-{node}.log",
            extra=["--log-level", "warning"],
            wait=wait,
        )
        self.stack.callback(proc.stop)
        return proc, sock, ns

    def close(self) -> None:
        self.stack.close()


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    root = Path(tempfile.mkdtemp(prefix="coil-bench-"))
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, root, True)
    etcd = start_etcd("coil-bench")
    stack.callback(etcd.stop)
    the_lab = Lab(root, etcd, stack)
    try:
        yield the_lab
    finally:
        the_lab.close()


def create_pool(allocator: str, name: str, subnet: str, block_bits: int) -> None:
    with grpc.insecure_channel(allocator) as ch:
        apb_grpc.AllocatorServiceStub(ch).CreatePool(
            apb.CreatePoolRequest(name=name, subnets=[subnet], block_size_bits=block_bits),
            timeout=10,
        )


def cleanup_leftovers() -> None:
    """Remove namespaces a killed earlier run left behind (only this suite's prefix)."""
    for name in cleanup_prefix(NS_PREFIX):
        print(f"bench: removed leftover namespace {name}")


def git_commit() -> str:
    """The commit the services run from, with "+changes" if the tree differs (other work)."""
    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return head + ("+changes" if dirty else "") if head else "unknown"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


__all__ = ["Any"]
