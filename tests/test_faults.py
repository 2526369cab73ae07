"""Faults under load: etcd members, allocator replicas and node agents killed with SIGKILL while
thousands of CNI operations run, etcd gone altogether, an allocator killed in the middle of a
burst of block claims, and etcd's quorum lost (both followers stopped) while ADDs are in flight.

Every pod operation goes through the installed CNI plugin, exec'd directly as IPAM (no main
plugin) in the host namespace; coild runs in node namespaces this module creates ("coilt-...")
and removes. What must hold: a failed operation is a clean CNI error with code 11 (try again
later), a retried one eventually succeeds, no address is ever held by two pods at once, and the
store is consistent afterwards."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from coil_allocator.etcd_store import EtcdStore
from tests.harness.cluster import (
    Proc,
    cni_args,
    install_plugin,
    start_allocator,
    start_coild,
    wait_until,
)
from tests.harness.etcd import EtcdCluster, EtcdServer, start_etcd_cluster
from tests.harness.net import Netns

pytestmark = [pytest.mark.root, pytest.mark.slow]

PREFIX = "coilt-"
TRY_AGAIN = 11
NOT_AVAILABLE = 50
# Storm size: pods added (each is deleted too, so twice as many operations). The environment
# variable makes a quick run possible while working on the test.
STORM_PODS = int(os.environ.get("COIL_FAULT_PODS", "2500"))
STORM_WORKERS = int(os.environ.get("COIL_FAULT_WORKERS", "12"))
# Share of storm operations exec'ing the plugin; the rest call coild's gRPC socket as the plugin
# would. Each plugin exec costs about 0.12 s of CPU (mostly importing grpc): 5,000 of them alone
# would take most of this machine's two cores for five minutes.
PLUGIN_SHARE = float(os.environ.get("COIL_FAULT_PLUGIN_SHARE", "0.6"))
MAX_TRIES = 60
RETRY_SLEEP = 0.5


@pytest.fixture(scope="module")
def plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return install_plugin(tmp_path_factory.mktemp("cni-bin"))


@dataclass
class CniAnswer:
    rc: int
    out: dict[str, Any] | None
    seconds: float

    @property
    def code(self) -> int:
        return int((self.out or {}).get("code", 0)) if self.rc else 0

    def addresses(self) -> list[str]:
        return [ip["address"].split("/")[0] for ip in (self.out or {}).get("ips", [])]


def cni(
    plugin: Path,
    command: str,
    socket: Path,
    container_id: str = "",
    args: str = "",
    version: str = "1.0.0",
) -> CniAnswer:
    """Exec the plugin once as a runtime would exec an IPAM plugin, in the host namespace."""
    env = {
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container_id,
        "CNI_NETNS": f"/var/run/netns/fake-{container_id[:8]}" if container_id else "",
        "CNI_IFNAME": "eth0",
        "CNI_ARGS": args,
        "CNI_PATH": str(plugin.parent),
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    }
    conf = {
        "cniVersion": version,
        "name": "n",
        "type": "ptp",
        "ipam": {"type": "coil", "socket": str(socket)},
    }
    started = time.monotonic()
    proc = subprocess.run(
        [str(plugin)], input=json.dumps(conf), capture_output=True, text=True, env=env, timeout=90
    )
    seconds = time.monotonic() - started
    try:
        out = json.loads(proc.stdout) if proc.stdout.strip() else None
    except json.JSONDecodeError:
        out = {"code": -1, "msg": f"not JSON: {proc.stdout!r} {proc.stderr!r}"}
    return CniAnswer(proc.returncode, out, seconds)


def coild_call(channel: grpc.Channel, command: str, container_id: str, pod: str) -> CniAnswer:
    """ADD or DEL through coild's gRPC socket, as the plugin makes it (same timeout and
    wait_for_ready), with the plugin's status mapping for the statuses a retry may cure."""
    stub = npb_grpc.NodeAgentServiceStub(channel)
    attachment = npb.Attachment(container_id=container_id, interface="eth0")
    started = time.monotonic()
    try:
        if command == "ADD":
            response = stub.Allocate(
                npb.AllocateRequest(attachment=attachment, namespace="default", pod=pod),
                timeout=5,
                wait_for_ready=True,
            )
            out = {"ips": [{"address": a.address} for a in response.addresses]}
        else:
            stub.Release(npb.ReleaseRequest(attachment=attachment), timeout=5, wait_for_ready=True)
            out = {}
        return CniAnswer(0, out, time.monotonic() - started)
    except grpc.RpcError as e:
        code = e.code() if isinstance(e, grpc.Call) else None
        transient = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        text = f"{code}: {e.details() if isinstance(e, grpc.Call) else e}"
        return CniAnswer(
            1, {"code": TRY_AGAIN if transient else -1, "msg": text}, time.monotonic() - started
        )


def allocator_stub(addr: str) -> apb_grpc.AllocatorServiceStub:
    return apb_grpc.AllocatorServiceStub(grpc.insecure_channel(addr))


def readyz(ns: Netns) -> int:
    """HTTP status of coild's /readyz inside its node namespace (0 when it does not answer)."""
    proc = ns.exec(
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "3",
        "-w",
        "%{http_code}",
        "http://127.0.0.1:9384/readyz",
        check=False,
        timeout=10,
    )
    return int(proc.stdout.strip() or 0)


def kill_all(procs: Iterable[Proc]) -> None:
    for p in list(procs):
        p.kill()


def node_namespace(stack: contextlib.ExitStack) -> Netns:
    ns = Netns.create(PREFIX)
    stack.callback(ns.delete)
    return ns


def bad_findings(findings: Any) -> list[str]:
    """CRITICAL findings and any about records or attachments, as text."""
    return [
        f"{apb.Severity.Name(f.severity)} {f.kind} {f.subject}: {f.message}"
        for f in findings
        if f.severity == apb.SEVERITY_CRITICAL
        or f.kind.startswith("record-")
        or f.kind.startswith("attachment-")
    ]


# -- 1. the storm -----------------------------------------------------------------------------


@dataclass
class Holding:
    """One pod's hold of one address: from its ADD's answer to the start of its DEL."""

    address: str
    container_id: str
    added: float
    del_started: float = float("inf")
    deleted: bool = False


@dataclass
class StormPod:
    container_id: str
    name: str
    node: int
    addresses: list[str] = field(default_factory=list)


class Storm:
    """Runs pod ADDs and DELs through the plugin from worker threads, retrying code-11 failures,
    and keeps every holding and counter the assertions need. A fault schedule hooks in through
    `on_progress`, called (from the workers) after every attempt."""

    def __init__(self, plugin: Path, sockets: list[Path], pods: int) -> None:
        self.plugin = plugin
        self.sockets = sockets
        self.pods_to_add = pods
        self.lock = threading.Lock()
        self.rng = random.Random(0xC011)
        self.live: list[StormPod] = []
        self.adds_started = 0
        self.ok = Counter[str]()  # command -> successes
        self.seconds: defaultdict[str, float] = defaultdict(float)  # command -> exec time
        self.attempts = 0
        self.phase = "start"
        self.failures: Counter[str] = Counter()  # phase -> code-11 failures
        self.retries: Counter[str] = Counter()  # phase -> retried operations
        self.wrong: list[str] = []  # failures that were not code 11
        self.gave_up: list[str] = []
        self.holdings: list[Holding] = []
        self.by_container: dict[str, list[Holding]] = {}
        self.deleted: list[StormPod] = []
        self.on_progress: Callable[[], None] = lambda: None
        self.channels = [grpc.insecure_channel(f"unix:{s}") for s in sockets]
        self.by_path: Counter[str] = Counter()  # "plugin"/"grpc" -> successful operations
        self.stop = threading.Event()
        self.proper_done = threading.Event()  # every pod added: faults would come too late

    def close(self) -> None:
        for channel in self.channels:
            channel.close()

    def ops(self) -> int:
        with self.lock:
            return self.ok["ADD"] + self.ok["DEL"]

    def target(self, done: int) -> int:
        """How many pods should be alive: a wave between 16 and 200 with a period of 800
        operations, so nodes fill several blocks and then empty them again."""
        t = done % 800
        return 16 + (184 * t // 400 if t < 400 else 184 * (800 - t) // 400)

    def _attempt(self, command: str, pod: StormPod) -> CniAnswer:
        """One operation, retried while it fails with code 11; records the outcome."""
        args = cni_args("default", pod.name)
        phase_seen: str | None = None
        for _ in range(MAX_TRIES):
            if self.stop.is_set():
                break
            with self.lock:
                path = "plugin" if self.rng.random() < PLUGIN_SHARE else "grpc"
            if path == "plugin":
                answer = cni(self.plugin, command, self.sockets[pod.node], pod.container_id, args)
            else:
                answer = coild_call(self.channels[pod.node], command, pod.container_id, pod.name)
            with self.lock:
                self.attempts += 1
                phase = self.phase
            self.on_progress()
            if answer.rc == 0:
                with self.lock:
                    self.seconds[f"{command} {path}"] += answer.seconds
                    self.by_path[f"{command} {path}"] += 1
                return answer
            if answer.code != TRY_AGAIN:
                with self.lock:
                    self.wrong.append(
                        f"{command} ({path}) {pod.container_id} in {phase}: {answer.out}"
                    )
                self.stop.set()
                return answer
            with self.lock:
                self.failures[phase] += 1
                if phase_seen is None:
                    self.retries[phase] += 1
            phase_seen = phase
            time.sleep(RETRY_SLEEP)
        with self.lock:
            self.gave_up.append(f"{command} {pod.container_id}: still failing after {MAX_TRIES}")
        self.stop.set()
        return CniAnswer(1, None, 0)

    def add(self, pod: StormPod) -> None:
        answer = self._attempt("ADD", pod)
        if answer.rc != 0:
            return
        now = time.monotonic()
        pod.addresses = answer.addresses()
        with self.lock:
            self.ok["ADD"] += 1
            held = [Holding(a, pod.container_id, now) for a in pod.addresses]
            self.holdings.extend(held)
            self.by_container[pod.container_id] = held
            self.live.append(pod)

    def delete(self, pod: StormPod) -> None:
        started = time.monotonic()
        with self.lock:
            # A pod's hold ends when its first DEL starts: a DEL that answered 11 may still have
            # released its addresses (a late commit), so a later retry must not move the end.
            for h in self.by_container[pod.container_id]:
                h.del_started = min(h.del_started, started)
        answer = self._attempt("DEL", pod)
        if answer.rc != 0:
            return
        with self.lock:
            self.ok["DEL"] += 1
            for h in self.by_container[pod.container_id]:
                h.deleted = True
            self.deleted.append(pod)

    def _next(self, drain: bool) -> tuple[str, StormPod] | None:
        with self.lock:
            done = self.ok["ADD"] + self.ok["DEL"]
            want_add = not drain and self.adds_started < self.pods_to_add
            if want_add and (len(self.live) < self.target(done) or not self.live):
                self.adds_started += 1
                cid = uuid.uuid4().hex
                return "ADD", StormPod(cid, f"pod-{cid[:8]}", self.rng.randrange(len(self.sockets)))
            if not want_add and not drain:
                return None  # every pod added: the storm proper is over
            if not self.live:
                return None
            pod = self.live.pop(self.rng.randrange(len(self.live)))
            return "DEL", pod

    def work(self, drain: bool = False) -> None:
        while not self.stop.is_set():
            step = self._next(drain)
            if step is None:
                return
            command, pod = step
            if command == "ADD":
                self.add(pod)
            else:
                self.delete(pod)

    def run(self, workers: int, drain: bool = False) -> None:
        threads = [
            threading.Thread(target=self.work, args=(drain,), name=f"storm-{i}")
            for i in range(workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        self.proper_done.set()
        assert not any(t.is_alive() for t in threads), "storm workers hung"

    def double_holdings(self) -> list[str]:
        """Addresses two pods held at the same time: both ADDs had answered and neither pod's
        DEL had started."""
        by_address: dict[str, list[Holding]] = defaultdict(list)
        for h in self.holdings:
            by_address[h.address].append(h)
        out = []
        for address, hs in by_address.items():
            hs.sort(key=lambda h: h.added)
            for a, b in zip(hs, hs[1:], strict=False):
                if b.added < a.del_started:
                    out.append(f"{address}: {a.container_id} and {b.container_id}")
        return out


@dataclass
class Faults:
    """The fault schedule of the storm, driven by operation counts; runs in its own thread so
    that kills and restarts never block a worker."""

    storm: Storm
    cluster: EtcdCluster
    restart_allocator_a: Callable[[], None]
    kill_allocator_a: Callable[[], None]
    kill_coild: Callable[[], None]
    restart_coild: Callable[[], None]
    log: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    started: float = field(default_factory=time.monotonic)

    def _wait_ops(self, ops: int) -> bool:
        while not self.storm.stop.is_set() and not self.storm.proper_done.is_set():
            if self.storm.ops() >= ops:
                return True
            time.sleep(0.05)
        return False

    def _wait_attempts_or(self, attempts: int, seconds: float) -> None:
        with self.storm.lock:
            start = self.storm.attempts
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.storm.stop.is_set():
            with self.storm.lock:
                if self.storm.attempts - start >= attempts:
                    return
            time.sleep(0.05)

    def _phase(self, name: str) -> None:
        with self.storm.lock:
            self.storm.phase = name
        self.log.append(
            f"{time.monotonic() - self.started:6.1f} s ops={self.storm.ops()} -> {name}"
        )

    def run(self, total_ops: int) -> None:
        try:
            self._run(total_ops)
        except Exception as e:  # reported by the test, never lost in a thread
            self.errors.append(repr(e))
            self.storm.stop.set()
        finally:
            self.done.set()

    def _run(self, total: int) -> None:
        self._phase("steady")
        if not self._wait_ops(total * 10 // 100):
            return
        leader = self.cluster.leader()
        assert leader is not None, "no etcd leader"
        follower = next(m for m in self.cluster.members if m is not leader)
        follower.kill()
        self._phase(f"etcd-follower-{follower.name}-down")
        if not self._wait_ops(total * 20 // 100):
            return
        leader = self.cluster.leader() or leader
        leader.kill()
        self._phase(f"etcd-leader-{leader.name}-down-no-quorum")
        # Without quorum nothing completes: end the outage after enough failed attempts.
        self._wait_attempts_or(60, 12)
        follower.start()
        leader.start()
        self._phase("etcd-restarted")
        self.cluster.wait_healthy(60)
        self._phase("etcd-healthy")
        if not self._wait_ops(total * 40 // 100):
            return
        self.kill_allocator_a()
        self._phase("allocator-a-down")
        self._wait_attempts_or(40, 5)
        self.restart_allocator_a()
        self._phase("allocator-a-restarted")
        if not self._wait_ops(total * 60 // 100):
            return
        self.kill_coild()
        self._phase("coild-1-down")
        self._wait_attempts_or(20, 3)
        self.restart_coild()
        self._phase("coild-1-restarted")
        self._wait_attempts_or(100, 10)
        self._phase("calm")


@pytest.mark.timeout(900)
def test_storm_through_etcd_allocator_and_coild_crashes(plugin: Path, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        cluster = start_etcd_cluster(3)
        stack.callback(cluster.stop)
        prefix = f"/coil-faults-{uuid.uuid4().hex[:8]}/"
        addr = {r: f"unix:{tmp_path}/allocator-{r}.sock" for r in "ab"}
        allocators: dict[str, Proc] = {}

        def start_replica(r: str) -> None:
            allocators[r] = start_allocator(
                cluster.endpoints, prefix, addr[r], tmp_path / f"allocator-{r}.log"
            )

        for r in "ab":
            start_replica(r)
        stack.callback(kill_all, allocators.values())
        stub = allocator_stub(addr["b"])
        stub.CreatePool(
            apb.CreatePoolRequest(
                name="default", subnets=["10.60.0.0/16", "fd00:60::/112"], block_size_bits=4
            ),
            timeout=10,
        )
        nodes = [node_namespace(stack) for _ in range(4)]
        sockets = [tmp_path / f"coild-{i}.sock" for i in range(4)]
        coilds: list[Proc] = []
        extra = ["--release-grace", "2"]

        def start_node(i: int) -> Proc:
            return start_coild(
                nodes[i],
                f"node-{i}",
                addr["a" if i < 2 else "b"],
                sockets[i],
                tmp_path / f"coild-{i}.log",
                extra,
            )

        stack.callback(kill_all, coilds)
        for i in range(4):
            coilds.append(start_node(i))

        def kill_allocator_a() -> None:
            allocators["a"].kill()

        def kill_coild() -> None:
            coilds[1].kill()

        def restart_coild() -> None:
            coilds[1] = start_node(1)

        storm = Storm(plugin, sockets, STORM_PODS)
        stack.callback(storm.close)
        faults = Faults(
            storm, cluster, lambda: start_replica("a"), kill_allocator_a, kill_coild, restart_coild
        )
        total = 2 * STORM_PODS
        fault_thread = threading.Thread(target=faults.run, args=(total,), name="faults")
        started = time.monotonic()
        fault_thread.start()
        storm.run(STORM_WORKERS)
        live_check_at = time.monotonic()
        # The fault schedule ends before the storm does; wait for it (bounded) before judging.
        assert faults.done.wait(120), "fault schedule did not finish"
        assert not faults.errors, faults.errors
        assert faults.log[-1].endswith("calm"), f"not every fault happened: {faults.log}"
        assert not storm.wrong, f"failures other than code 11: {storm.wrong[:10]}"
        assert not storm.gave_up, storm.gave_up[:10]
        assert storm.ok["ADD"] == STORM_PODS

        # Every pod alive now has its records; every deleted pod has none.
        live = list(storm.live)
        for pod in live:
            assert len(pod.addresses) == 2, pod
            for address in pod.addresses:
                got = stub.GetAddress(apb.GetAddressRequest(address=address), timeout=10)
                assert got.record.owner.container_id == pod.container_id, (address, got)
        deleted = {p.container_id for p in storm.deleted}
        recorded: dict[str, str] = {}
        for i in range(4):
            listed = stub.ListNodeBlocks(
                apb.ListNodeBlocksRequest(node=f"node-{i}", with_records=True), timeout=10
            )
            recorded.update({r.address: r.owner.container_id for r in listed.records})
        stale = {a: c for a, c in recorded.items() if c in deleted}
        assert not stale, f"records of deleted pods: {list(stale.items())[:10]}"
        assert len(recorded) == 2 * len(live), (len(recorded), len(live))

        # The rest of the pods go, through the plugin as well.
        storm.run(STORM_WORKERS, drain=True)
        duration = time.monotonic() - started
        assert not storm.wrong, f"failures other than code 11: {storm.wrong[:10]}"
        assert not storm.gave_up, storm.gave_up[:10]
        assert storm.ok["DEL"] == STORM_PODS
        through_plugin = sum(n for k, n in storm.by_path.items() if k.endswith("plugin"))
        ops = storm.ok["ADD"] + storm.ok["DEL"]
        assert 2 * through_plugin > ops, f"only {through_plugin} of {ops} through the plugin"
        doubles = storm.double_holdings()
        assert not doubles, f"addresses held twice at once: {doubles[:10]}"
        for pod in storm.deleted:
            for address in pod.addresses:
                got = stub.GetAddress(apb.GetAddressRequest(address=address), timeout=10)
                assert got.record.owner.container_id != pod.container_id, (address, got)

        usage = stub.GetUsage(apb.GetUsageRequest(), timeout=10).usage
        assert usage and all(u.addresses_used == 0 for u in usage), usage
        findings = stub.CheckStore(apb.CheckStoreRequest(), timeout=30).findings
        assert not bad_findings(findings), bad_findings(findings)

        print(f"\nstorm: {ops} operations ({storm.attempts} attempts) in {duration:.1f} s")
        print(
            f"  {ops / duration:.1f} ops/s; records checked after {live_check_at - started:.1f} s"
        )
        handed = Counter(h.address for h in storm.holdings)
        reused = sum(1 for n in handed.values() if n > 1)
        print(f"  {len(handed)} distinct addresses handed out, {reused} of them to several pods")
        print(f"  workers {STORM_WORKERS}; plugin share {PLUGIN_SHARE}")
        for key, n in sorted(storm.by_path.items()):
            print(f"  {key}: {n} ok, mean {storm.seconds[key] / n:.3f} s")
        for i in range(4):
            text = (tmp_path / f"coild-{i}.log").read_text(errors="replace")
            claimed, returned = text.count("claimed block"), text.count("returned empty block")
            print(f"  node-{i}: blocks claimed {claimed}, returned {returned}")
        for line in faults.log:
            print(f"  {line}")
        for phase in dict.fromkeys([*storm.failures, *storm.retries]):
            print(
                f"  phase {phase}: {storm.failures[phase]} code-11 failures, "
                f"{storm.retries[phase]} operations retried"
            )
        print(f"  findings (none critical): {[f.kind for f in findings]}")


# -- 2. etcd unreachable ----------------------------------------------------------------------


def test_etcd_unreachable_then_back(plugin: Path, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        cluster = start_etcd_cluster(1, name="coil-solo")
        stack.callback(cluster.stop)
        addr = f"unix:{tmp_path}/allocator.sock"
        allocator = start_allocator(
            cluster.endpoints, "/coil-down/", addr, tmp_path / "allocator.log"
        )
        stack.callback(allocator.kill)
        allocator_stub(addr).CreatePool(
            apb.CreatePoolRequest(name="default", subnets=["10.61.0.0/24"], block_size_bits=4),
            timeout=10,
        )
        ns = node_namespace(stack)
        socket = tmp_path / "coild.sock"
        coild = start_coild(ns, "node-0", addr, socket, tmp_path / "coild.log")
        stack.callback(coild.kill)
        first = cni(plugin, "ADD", socket, uuid.uuid4().hex, cni_args("default", "first"))
        assert first.rc == 0, first.out
        wait_until("coild ready", lambda: readyz(ns) == 200, timeout=30, proc=coild)

        for m in cluster.members:
            m.kill()
        cid = uuid.uuid4().hex
        down = cni(plugin, "ADD", socket, cid, cni_args("default", "second"))
        assert down.rc != 0 and down.code == TRY_AGAIN, down.out
        assert down.seconds < 15, f"ADD took {down.seconds:.1f} s to fail"
        status = cni(plugin, "STATUS", socket, version="1.1.0")
        assert status.rc != 0 and status.code == NOT_AVAILABLE, status.out
        unready_after = time.monotonic()
        wait_until("coild not ready", lambda: readyz(ns) == 503, timeout=40, proc=coild)
        unready_after = time.monotonic() - unready_after

        for m in cluster.members:
            m.start()
        cluster.wait_healthy(30)
        back = time.monotonic()
        for _ in range(MAX_TRIES):
            again = cni(plugin, "ADD", socket, cid, cni_args("default", "second"))
            if again.rc == 0:
                break
            assert again.code == TRY_AGAIN, again.out
            time.sleep(RETRY_SLEEP)
        assert again.rc == 0, again.out
        add_back = time.monotonic() - back
        wait_until("coild ready again", lambda: readyz(ns) == 200, timeout=40, proc=coild)
        status = cni(plugin, "STATUS", socket, version="1.1.0")
        assert status.rc == 0, status.out
        print(
            f"\nADD failed after {down.seconds:.2f} s; /readyz 503 after {unready_after:.1f} s; "
            f"ADD succeeded {add_back:.1f} s after etcd was back; ready after "
            f"{time.monotonic() - back:.1f} s"
        )


# -- 3. a burst of block claims cut off by a crash ---------------------------------------------


def test_block_claims_cut_off_by_allocator_crash(
    etcd_server: EtcdServer, store: EtcdStore, tmp_path: Path
) -> None:
    prefix = f"/coil-claimcrash-{uuid.uuid4().hex[:8]}/"
    addr = f"unix:{tmp_path}/allocator.sock"
    allocator = start_allocator(etcd_server.endpoint, prefix, addr, tmp_path / "allocator.log")
    try:
        stub = allocator_stub(addr)
        stub.CreatePool(
            apb.CreatePoolRequest(
                name="default", subnets=["10.62.0.0/16", "fd00:62::/112"], block_size_bits=4
            ),
            timeout=10,
        )
        claimed: list[tuple[str, str]] = []
        failed: Counter[str] = Counter()
        lock = threading.Lock()
        kill_at = 150

        def claim(i: int) -> None:
            node = f"n{i % 8}"
            family = apb.FAMILY_IPV4 if i % 2 else apb.FAMILY_IPV6
            try:
                got = stub.ClaimBlock(
                    apb.ClaimBlockRequest(node=node, pool="default", family=family), timeout=20
                )
            except grpc.RpcError as e:
                with lock:
                    failed[e.code().name] += 1
                return
            with lock:
                claimed.append((got.block.cidr, got.block.node))
                if len(claimed) == kill_at:
                    allocator.popen.kill()

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(claim, range(1000)))
        allocator.kill()
        assert len(claimed) >= kill_at and sum(failed.values()) > 0, (len(claimed), failed)

        # Every block key has its node's index entry and the other way round.
        blocks, _ = store.range(f"{prefix}blocks/")
        index, _ = store.range(f"{prefix}nodes/")
        by_block = {kv.key.removeprefix(f"{prefix}blocks/"): kv.value.decode() for kv in blocks}
        indexed = {
            f"{parts[3]}/{parts[4]}": parts[1]
            for kv in index
            if len(parts := kv.key.removeprefix(prefix).split("/")) == 5 and parts[2] == "blocks"
        }
        assert by_block == indexed
        for cidr, node in claimed:
            assert by_block.get(f"default/{cidr.replace('/', '_')}") == node, cidr

        allocator = start_allocator(etcd_server.endpoint, prefix, addr, tmp_path / "again.log")
        findings = allocator_stub(addr).CheckStore(apb.CheckStoreRequest(), timeout=30).findings
        index_findings = [
            f"{f.kind} {f.subject}: {f.message}"
            for f in findings
            if f.kind in ("block-missing-from-node-index", "stale-node-index")
        ]
        assert not index_findings, index_findings
        print(
            f"\n{len(claimed)} claims answered, {len(by_block)} blocks stored, "
            f"failed: {dict(failed)}"
        )
    finally:
        allocator.kill()


# -- 4. quorum lost while ADDs are in flight ---------------------------------------------------


def test_quorum_loss_during_adds_leaks_nothing(plugin: Path, tmp_path: Path) -> None:
    """Both followers of a 3-member etcd are stopped (SIGSTOP) while ADDs are in flight: the
    leader keeps their transactions pending, coild's record calls time out and the ADDs fail
    with 11; the followers come back within the (long) election timeout and the pending
    transactions commit late. After every pod is deleted, no record may be left.

    Regression: coild forgot the attachments of the failed ADDs, so their DELs answered success
    without telling the allocator and the late records stayed for good."""
    pods = 12
    with contextlib.ExitStack() as stack:
        cluster = start_etcd_cluster(
            3,
            name="coil-q",
            extra_args=("--heartbeat-interval", "500", "--election-timeout", "10000"),
        )
        stack.callback(cluster.stop)
        leader = cluster.wait_healthy(60)
        followers = [m for m in cluster.members if m is not leader]
        for m in followers:
            stack.callback(m.resume)  # before stop(): a stopped member must not stay stopped
        addr = f"unix:{tmp_path}/allocator.sock"
        # Only the leader: the allocator must not wait on a stopped member.
        allocator = start_allocator(
            leader.endpoint, "/coil-quorum/", addr, tmp_path / "allocator.log"
        )
        stack.callback(allocator.kill)
        stub = allocator_stub(addr)
        stub.CreatePool(
            apb.CreatePoolRequest(name="default", subnets=["10.64.0.0/24"], block_size_bits=5),
            timeout=10,
        )
        ns = node_namespace(stack)
        socket = tmp_path / "coild.sock"
        # coild gives up on the allocator before the allocator gives up on etcd: the record
        # is still pending in etcd when coild answers.
        coild = start_coild(
            ns, "node-q", addr, socket, tmp_path / "coild.log", ["--allocator-timeout", "2"]
        )
        stack.callback(coild.kill)
        warm = cni(plugin, "ADD", socket, uuid.uuid4().hex, cni_args("default", "warm"))
        assert warm.rc == 0, warm.out  # the block is claimed before quorum is lost
        ids = {f"q{i}": uuid.uuid4().hex for i in range(pods)}

        for m in followers:
            m.pause()
        try:
            with ThreadPoolExecutor(pods) as pool:
                answers = dict(
                    zip(
                        ids,
                        pool.map(
                            lambda pod: cni(
                                plugin, "ADD", socket, ids[pod], cni_args("default", pod)
                            ),
                            ids,
                        ),
                        strict=True,
                    )
                )
        finally:
            for m in followers:
                m.resume()
        failed = [pod for pod, a in answers.items() if a.rc != 0]
        assert failed, "no ADD failed while quorum was lost"
        assert all(answers[pod].code == TRY_AGAIN for pod in failed), {
            pod: answers[pod].out for pod in failed
        }
        cluster.wait_healthy(60)

        def records() -> list[Any]:
            request = apb.ListNodeBlocksRequest(node="node-q", with_records=True)
            return list(stub.ListNodeBlocks(request, timeout=10).records)

        # The pending transactions commit once the followers are back.
        late = wait_until(
            "late commits",
            lambda: len(records()) > 1 + pods - len(failed) and records(),
            timeout=30,
        )
        # The runtime deletes every pod: the failed ones (as kubelet does after a failed ADD)
        # and the others; a DEL answered 11 is retried.
        for pod, cid in ids.items():
            for _ in range(MAX_TRIES):
                gone = cni(plugin, "DEL", socket, cid, cni_args("default", pod))
                if gone.rc == 0:
                    break
                assert gone.code == TRY_AGAIN, gone.out
                time.sleep(RETRY_SLEEP)
            assert gone.rc == 0, gone.out
        left = [r for r in records() if r.owner.pod != "warm"]
        assert left == [], f"leaked records: {[(r.address, r.owner.pod) for r in left]}"
        print(
            f"\n{len(failed)} of {pods} ADDs failed with 11 during the quorum loss; "
            f"{len(late) - 1} records committed; 0 leaked after the DELs"
        )
