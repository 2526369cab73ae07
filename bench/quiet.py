"""Section "quiet": what a cluster costs while nothing changes, and what churn does to etcd.

1. The call pattern of one real coild: a coild runs in a namespace against the allocator for a
   while; its RPCs are counted from the allocator's metrics (per method, per second).
2. Many nodes: `bench.loadgen` plays N coilds with that pattern against two allocator replicas
   and one etcd, where N nodes hold a block and two records each; they start over a ramp, and
   the time until every node is up is reported (the start storm). Over a measured window that
   begins once every node is up (or 300 s after the ramp), it
   reads the CPU time of the allocators and etcd (/proc), the allocators' RPC counters, etcd's
   gRPC counters (requests/s), etcd's revision (revisions/min) and its database size.
3. The same for the polling design, in the same run: the allocator and coild of the baseline
   commit (`BENCH_QUIET_BASELINE`, the last one before WatchNode), unpacked from git into a
   scratch directory, and the simulated nodes polling as that coild does.
4. Churn: pods come and go on 1,000 watching nodes (100 ADDs/s, each released 10 s later) for
   `BENCH_CHURN_S` seconds (600 by default) with compaction on; etcd's database size is sampled
   all along, and every watcher checks that it saw each of its records appear and go.

For investigations: BENCH_QUIET_DESIGNS=watch|poll, BENCH_QUIET_SIZES=1000,10000 and
BENCH_QUIET_PARTS=quiet|churn run parts of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from bench.common import Lab, create_pool, lab, metric_sum, pick, rss_kb, scrape
from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_core.errors import AlreadyExists
from coil_core.model import Owner, RecordRequest
from tests.harness.cluster import Proc, spawn, wait_until
from tests.harness.etcd import free_port

ROOT = Path(__file__).resolve().parent.parent
BASELINE = os.environ.get("BENCH_QUIET_BASELINE", "0f13cbe")
CHURN_S = float(os.environ.get("BENCH_CHURN_S", pick("600", "60")))
POOL_SUBNET = "10.0.0.0/8"
BLOCK_BITS = 6
PREFIX = "q-"
TICKS = os.sysconf("SC_CLK_TCK")
# Compaction for the churn run: often enough to show a flat database within the run.
START_TIMEOUT = float(pick("300", "60"))
CHURN_COMPACTION = ["--compaction-interval", "15", "--compaction-retention", "60"]
PROBE_FREES = 100
"""Records an operator frees (`address free`) after a watch run's window, on as many nodes."""
PROBE_WAIT = 10.0
"""Seconds the probe's changes have to reach the simulated nodes before they stop."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def baseline_tree(scratch: Path) -> Path:
    """The services and stubs of the baseline commit, unpacked under `scratch`."""
    out = scratch / f"baseline-{BASELINE}"
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", BASELINE, "services", "gen"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive, check=True)
    return out


def _pythonpath(tree: Path | None) -> dict[str, str]:
    if tree is None:
        return {}
    paths = [tree / "services/allocator", tree / "services/nodeagent", tree / "gen/python"]
    return {"PYTHONPATH": ":".join(str(p) for p in paths)}


def start_allocator(
    the_lab: Lab, name: str, tree: Path | None, extra: list[str] | None = None
) -> tuple[Proc, str, int]:
    """An allocator process (the baseline's when `tree` is given), metrics on a loopback port."""
    sock = f"unix:{the_lab.root}/{name}.sock"
    port = free_port()
    proc = spawn(
        name,
        [
            sys.executable,
            "-m",
            "coil_allocator.main",
            "--listen",
            sock,
            "--etcd-endpoints",
            the_lab.etcd.endpoint,
            "--metrics-addr",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            *(extra or []),
        ],
        the_lab.root / f"{name}.log",
        env=_pythonpath(tree),
    )
    the_lab.stack.callback(proc.stop)

    def answers() -> bool:
        try:
            scrape(f"http://127.0.0.1:{port}/metrics")
            return Path(sock[5:]).exists()
        except OSError:
            return False

    wait_until(name, answers, proc=proc, timeout=60)
    time.sleep(0.5)
    return proc, sock, port


def populate(endpoint: str, nodes: int, log: Callable[[str], None]) -> None:
    """`nodes` nodes named q-00000... each holding one block with two records."""
    import ipaddress

    store = EtcdStore(EtcdConfig((endpoint,)))
    allocator = Allocator(store, "/coil/")
    subnet = ipaddress.ip_network(POOL_SUBNET)
    size = 2**BLOCK_BITS

    def one(i: int) -> None:
        name = f"{PREFIX}{i:05d}"
        block = ipaddress.ip_network(f"{subnet.network_address + (i + 1) * size}/{32 - BLOCK_BITS}")
        try:
            allocator.claim_specific_block(name, "default", str(block))
        except AlreadyExists:
            return
        allocator.record(
            name,
            [
                RecordRequest(
                    block.network_address + 1 + j,
                    "default",
                    block,
                    Owner("bench", f"{name}-p{j}", f"{name}-c{j}", "eth0"),
                )
                for j in range(2)
            ],
        )

    t0 = time.perf_counter()
    try:
        with futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(one, range(nodes)))
    finally:
        store.close()
    log(f"  {nodes} nodes hold a block and 2 records each ({time.perf_counter() - t0:.0f} s)")


def rpc_counts(ports: list[int]) -> dict[str, float]:
    out: dict[str, float] = {}
    for port in ports:
        for key, value in scrape(f"http://127.0.0.1:{port}/metrics").items():
            if key.startswith("coil_allocator_rpcs_total{"):
                method = key.split('method="', 1)[1].split('"', 1)[0]
                out[method] = out.get(method, 0.0) + value
    return out


def etcd_figures(the_lab: Lab) -> dict[str, float]:
    sample = scrape(the_lab.etcd_metrics)
    requests = metric_sum(sample, "grpc_server_msg_received_total")
    store = EtcdStore(EtcdConfig((the_lab.etcd.endpoint,)))
    try:
        revision = store.status().revision
    finally:
        store.close()
    return {
        "requests": requests,
        "revision": revision,
        "db_size": metric_sum(sample, "etcd_mvcc_db_total_size_in_bytes"),
        "db_in_use": metric_sum(sample, "etcd_mvcc_db_total_size_in_use_in_bytes"),
    }


def coild_pattern(
    the_lab: Lab, allocator: str, ports: list[int], seconds: float, extra: list[str]
) -> dict[str, float]:
    """RPCs per second, by method, of one real coild (as the allocators count them)."""
    before = rpc_counts(ports)
    node = f"real-{int(time.time()) % 10000}"
    proc, _, _ = the_lab.start_coild(node, allocator)
    _ = extra
    time.sleep(seconds)
    # A stream is counted when it ends: stop coild first.
    proc.stop()
    time.sleep(1)
    after = rpc_counts(ports)
    _forget(the_lab, node)
    return {m: round((after.get(m, 0) - before.get(m, 0)) / seconds, 4) for m in after}


def _forget(the_lab: Lab, node: str) -> None:
    """Delete the measured coild's alive key now: its lease expiring later would be a revision
    in a measured window."""
    from coil_allocator.store import Delete

    store = EtcdStore(EtcdConfig((the_lab.etcd.endpoint,)))
    try:
        store.txn([], [Delete(f"/coil/nodes/{node}/", prefix=True)])
    finally:
        store.close()


def _probe_pool(nodes: int) -> tuple[str, str]:
    """The pool the probe creates after a run of `nodes` (name, subnet): one of its own per run."""
    return f"probe-{nodes}", f"100.{64 + nodes // 1000 % 64}.0.0/16"


def _probe_records(nodes: int) -> list[tuple[str, str]]:
    """("node/container", address) of the records the probe frees: PROBE_FREES of the run's
    nodes, spread over them, a different set for each run size (a later run still has its own)."""
    import ipaddress

    subnet = ipaddress.ip_network(POOL_SUBNET)
    step, offset = max(1, nodes // PROBE_FREES), nodes // 1000
    out = []
    for k in range(min(PROBE_FREES, nodes)):
        i = k * step + offset
        if i >= nodes:
            break
        name = f"{PREFIX}{i:05d}"
        address = subnet.network_address + (i + 1) * 2**BLOCK_BITS + 1  # its record "-c0"
        out.append((f"{name}/{name}-c0", str(address)))
    return out


def probe(allocator: str, nodes: int) -> tuple[float, dict[str, float]]:
    """What an operator does while every node watches: a new pool, then `address free` of
    PROBE_FREES records. Returns when the pool was asked for and when each free was (wall
    clock, as the load generator notes arrivals)."""
    name, subnet = _probe_pool(nodes)
    asked = time.time()
    create_pool(allocator, name, subnet, BLOCK_BITS)
    freed: dict[str, float] = {}
    with grpc.insecure_channel(allocator) as ch:
        stub = apb_grpc.AllocatorServiceStub(ch)
        for key, address in _probe_records(nodes):
            freed[key] = time.time()
            stub.FreeAddress(apb.FreeAddressRequest(address=address), timeout=10)
    return asked, freed


def _sample_cpu(
    pids: list[int], gen: int, began: float, seconds: float, out: list[tuple[float, float, float]]
) -> None:
    """Append (seconds since `began`, CPU-seconds of `pids` together, of `gen`) every 0.25 s."""
    while True:
        now = time.time() - began
        out.append((now, sum(cpu_seconds(p) for p in pids), cpu_seconds(gen)))
        if now >= seconds:
            return
        time.sleep(0.25)


def reached(asked: float, seen: list[float], expected: int) -> dict[str, Any]:
    """How long `expected` arrivals took after `asked`: count, p50, p99 and max seconds."""
    delays = sorted(t - asked for t in seen)
    if not delays:
        return {"expected": expected, "reached": 0}
    return {
        "expected": expected,
        "reached": len(delays),
        "p50_s": round(delays[len(delays) // 2], 3),
        "p99_s": round(delays[min(len(delays) - 1, int(len(delays) * 0.99))], 3),
        "max_s": round(delays[-1], 3),
    }


def measure(
    the_lab: Lab,
    allocators: list[tuple[Proc, str, int]],
    mode: str,
    nodes: int,
    loadgen_args: list[str],
    window: float,
    log: Callable[[str], None],
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run the load generator with `nodes`, measure the steady state over `window` seconds."""
    # Nodes start over the ramp as coilds of a cluster would, not all at once: a first report
    # writes (a lease, the alive key, the status), about 150 a second on this machine.
    ramp = max(5.0, nodes / 150)
    gen = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.loadgen",
            "--allocators",
            ",".join(sock for _, sock, _ in allocators),
            "--nodes",
            str(nodes),
            "--node-prefix",
            PREFIX,
            "--mode",
            mode,
            "--ramp",
            str(ramp),
            # The window measures the quiet state: it starts once every node is up, or
            # START_TIMEOUT s after the ramp (the start storm is reported on its own).
            "--start-timeout",
            str(START_TIMEOUT),
            *(["--probe-pool", _probe_pool(nodes)[0]] if mode == "watch" else []),
            *loadgen_args,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert gen.stdin is not None and gen.stdout is not None
    try:
        line = gen.stdout.readline()
        if not line:
            raise RuntimeError(f"loadgen ended early: {gen.wait()}")
        started = json.loads(line)
        log(
            f"  {mode} {nodes:>6} nodes: {started['up']} up {started['start_s']} s after the "
            f"first started (over a {ramp:.0f} s ramp; up at {started.get('up_at')})"
        )
        time.sleep(5)  # let the last starts' calls settle
        pids = [p.popen.pid for p, _, _ in allocators]
        ports = [port for _, _, port in allocators]
        cpu0 = [cpu_seconds(pid) for pid in pids]
        etcd_cpu0 = cpu_seconds(the_lab.etcd.proc.pid)
        gen_cpu0 = cpu_seconds(gen.pid)
        rpcs0 = rpc_counts(ports)
        etcd0 = etcd_figures(the_lab)
        t0 = time.monotonic()
        time.sleep(window)
        dt = time.monotonic() - t0
        cpu1 = [cpu_seconds(pid) for pid in pids]
        etcd_cpu1 = cpu_seconds(the_lab.etcd.proc.pid)
        gen_cpu1 = cpu_seconds(gen.pid)
        rpcs1 = rpc_counts(ports)
        etcd1 = etcd_figures(the_lab)
        asked, began = 0.0, 0.0
        freed: dict[str, float] = {}
        probe_error = ""
        # CPU-seconds of the allocators and of the load generator while the probe's changes go
        # out: (seconds after the probe began, allocators, load generator), every 0.25 s.
        cpu_during: list[tuple[float, float, float]] = []
        if mode == "watch":
            # After the window (its writes are not the quiet state's): does an operator's
            # change reach every node in time?
            began = time.time()
            sampler = threading.Thread(
                target=_sample_cpu, args=(pids, gen.pid, began, PROBE_WAIT, cpu_during)
            )
            sampler.start()
            try:
                asked, freed = probe(allocators[0][1], nodes)
            except grpc.RpcError as e:
                probe_error = f"{e.code().name}: {e.details()}"
                log(f"  {mode} {nodes:>6} nodes: the probe's change failed: {probe_error}")
            sampler.join()
        gen.stdin.close()
        result = json.loads(gen.stdout.read().strip().splitlines()[-1])
    finally:
        if gen.poll() is None:
            gen.kill()
        gen.wait()
    allocator_cores = sum(b - a for a, b in zip(cpu0, cpu1, strict=True)) / dt
    etcd_cores = (etcd_cpu1 - etcd_cpu0) / dt
    out = {
        "mode": mode,
        "nodes": nodes,
        "window_s": round(dt, 1),
        "allocator_cores": round(allocator_cores, 3),
        "etcd_cores": round(etcd_cores, 3),
        "total_cores": round(allocator_cores + etcd_cores, 3),
        "loadgen_cores": round((gen_cpu1 - gen_cpu0) / dt, 3),
        "rpcs_per_s": {
            m: round((rpcs1.get(m, 0) - rpcs0.get(m, 0)) / dt, 2)
            for m in sorted(rpcs1)
            if rpcs1.get(m, 0) - rpcs0.get(m, 0) > 0
        },
        "etcd_requests_per_s": round((etcd1["requests"] - etcd0["requests"]) / dt, 1),
        "revisions_per_min": round((etcd1["revision"] - etcd0["revision"]) * 60 / dt, 1),
        "db_growth_mb_per_day": round(
            (etcd1["db_in_use"] - etcd0["db_in_use"]) / dt * 86400 / 1e6, 1
        ),
        "db_in_use_mb": round(etcd1["db_in_use"] / 1e6, 1),
        "allocator_rss_mb": [round(rss_kb(pid)["VmRSS"] / 1024) for pid in pids],
        "up_before_window": started["up"],
        "start_s": started["start_s"],
        "up_at": started.get("up_at", {}),
        "not_ready_at_end": result["not_ready_at_end"],
        "errors": result["errors"],
        "latency": result["latency"],
        "snapshots": result["snapshots"],
    }
    if probe_error:
        out["probe_error"] = probe_error
    elif "probe" in result:
        seen = result["probe"]["freed_seen"]
        out["pool_change"] = reached(asked, result["probe"]["pool_seen"], nodes)
        if cpu_during and "max_s" in out["pool_change"]:
            # Until the slowest node had the pool: how busy was each side?
            until = asked - began + out["pool_change"]["max_s"]
            first = cpu_during[0]
            last = next((c for c in cpu_during if c[0] >= until), cpu_during[-1])
            out["pool_change"]["cpu_s"] = {
                "over_s": round(last[0] - first[0], 2),
                "allocators": round(last[1] - first[1], 2),
                "loadgen": round(last[2] - first[2], 2),
            }
        out["address_free"] = reached(
            0.0, [seen[k] - t for k, t in freed.items() if k in seen], len(freed)
        )
    log(
        f"  {mode} {nodes:>6} nodes: allocators {out['allocator_cores']} + etcd "
        f"{out['etcd_cores']} cores, {sum(out['rpcs_per_s'].values()):.0f} RPC/s, etcd "
        f"{out['etcd_requests_per_s']} req/s, {out['revisions_per_min']} rev/min, "
        f"not ready {out['not_ready_at_end']}, errors {out['errors']}"
    )
    for what in ("pool_change", "address_free"):
        if what in out:
            log(f"  {mode} {nodes:>6} nodes: {what.replace('_', ' ')} reached {out[what]}")
    return out


def _poll_args() -> list[str]:
    return ["--pools", "10", "--report", "30", "--blocks", "60"]


def _watch_args() -> list[str]:
    # coild while its stream is open: a report at start only (the lease rides on the stream),
    # and a fresh snapshot every --resync-interval (600 s) as the safety net.
    return ["--report", "0", "--resync", "600"]


def run_quiet(log: Callable[[str], None]) -> dict[str, Any]:
    sizes = pick([1000, 10000, 20000], [200, 1000])
    if os.environ.get("BENCH_QUIET_SIZES"):
        sizes = [int(n) for n in os.environ["BENCH_QUIET_SIZES"].split(",")]
    poll_sizes = pick([1000, 10000], [200])
    # 120 s: every held lease is refreshed exactly once in the window (see _Held.period).
    window = pick(120.0, 15.0)
    pattern_s = pick(60.0, 25.0)
    out: dict[str, Any] = {"baseline": BASELINE, "window_s": window, "runs": []}
    with tempfile.TemporaryDirectory(prefix="coil-baseline-") as scratch:
        tree = baseline_tree(Path(scratch))
        designs = os.environ.get("BENCH_QUIET_DESIGNS", "watch,poll").split(",")
        for design, mode, runs in (("watch", "watch", sizes), ("poll", "poll", poll_sizes)):
            if design not in designs:
                continue
            with lab() as the_lab:
                base = tree if design == "poll" else None
                allocators = [
                    start_allocator(the_lab, f"{design}-a", base),
                    start_allocator(the_lab, f"{design}-b", base),
                ]
                create_pool(allocators[0][1], "default", POOL_SUBNET, BLOCK_BITS)
                ports = [p for _, _, p in allocators]
                out[f"coild_pattern_{design}"] = (
                    coild_pattern(the_lab, allocators[0][1], ports, pattern_s, [])
                    if design == "watch"
                    else _baseline_coild_pattern(the_lab, allocators[0][1], ports, pattern_s, tree)
                )
                log(f"  one real coild ({design}): {out[f'coild_pattern_{design}']} RPC/s")
                populate(the_lab.etcd.endpoint, max(runs), log)
                for n in runs:
                    # Each run's nodes include the previous run's: they report afresh, so the
                    # alive keys move to new leases and the old leases expire with no key on
                    # them (no revision in the next run's window).
                    args = _watch_args() if mode == "watch" else _poll_args()
                    out["runs"].append(measure(the_lab, allocators, mode, n, args, window, log))
    return out


def _baseline_coild_pattern(
    the_lab: Lab, allocator: str, ports: list[int], seconds: float, tree: Path
) -> dict[str, float]:
    """The baseline coild's pattern: its own process from the baseline tree."""
    ns = the_lab.netns()
    sock = the_lab.root / "coild-baseline.sock"
    before = rpc_counts(ports)
    proc = spawn(
        "coild baseline",
        [
            "ip",
            "netns",
            "exec",
            ns.name,
            sys.executable,
            "-m",
            "coild.main",
            "--node-name",
            "baseline-node",
            "--allocator",
            allocator,
            "--socket",
            str(sock),
            "--metrics-addr",
            "",
            "--log-level",
            "warning",
        ],
        the_lab.root / "coild-baseline.log",
        env=_pythonpath(tree),
    )
    the_lab.stack.callback(proc.stop)
    time.sleep(seconds)
    proc.stop()
    time.sleep(1)
    after = rpc_counts(ports)
    _forget(the_lab, "baseline-node")
    return {m: round((after.get(m, 0) - before.get(m, 0)) / seconds, 4) for m in after}


def run_churn(log: Callable[[str], None]) -> dict[str, Any]:
    nodes = pick(1000, 200)
    rate = pick(100.0, 20.0)
    with lab() as the_lab:
        allocators = [
            start_allocator(the_lab, "churn-a", None, CHURN_COMPACTION),
            start_allocator(the_lab, "churn-b", None, CHURN_COMPACTION),
        ]
        create_pool(allocators[0][1], "default", POOL_SUBNET, BLOCK_BITS)
        populate(the_lab.etcd.endpoint, nodes, log)
        samples: list[tuple[float, float, float]] = []
        stop = threading.Event()
        t0 = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                f = etcd_figures(the_lab)
                samples.append((round(time.monotonic() - t0), f["db_size"], f["db_in_use"]))
                stop.wait(10)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        gen = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.loadgen",
                "--allocators",
                ",".join(sock for _, sock, _ in allocators),
                "--nodes",
                str(nodes),
                "--node-prefix",
                PREFIX,
                "--mode",
                "watch",
                "--report",
                "0",
                "--safety",
                "0",
                "--resync",
                "0",  # every change must arrive as a change, to be counted
                "--ramp",
                "5",
                "--churn",
                str(rate),
                "--churn-nodes",
                str(nodes),
                "--duration",
                str(CHURN_S),
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=CHURN_S + 300,
        )
        stop.set()
        sampler.join(15)
        result = json.loads(gen.stdout.strip().splitlines()[-1])
        compactions = sum(
            metric_sum(
                scrape(f"http://127.0.0.1:{port}/metrics"), "coil_allocator_compactions_total"
            )
            for _, _, port in allocators
        )
    third = [s for s in samples if s[0] >= CHURN_S / 3]
    out = {
        "nodes": nodes,
        "adds_per_s": rate,
        "seconds": CHURN_S,
        "compaction": " ".join(CHURN_COMPACTION),
        "compactions": compactions,
        "db_samples": [
            (t, round(size / 1e6, 2), round(used / 1e6, 2)) for t, size, used in samples
        ],
        "db_in_use_mb_at_third": round(third[0][2] / 1e6, 2) if third else None,
        "db_in_use_mb_at_end": round(samples[-1][2] / 1e6, 2) if samples else None,
        "db_size_mb_at_end": round(samples[-1][1] / 1e6, 2) if samples else None,
        **result.get("churn", {}),
        "errors": result["errors"],
    }
    log(
        f"  churn {nodes} nodes, {rate}/s for {CHURN_S:.0f} s: {out.get('adds')} adds, "
        f"{out.get('dels')} dels, missed {out.get('missed_puts')}/{out.get('missed_dels')}; "
        f"DB in use {out['db_in_use_mb_at_third']} MB at 1/3, {out['db_in_use_mb_at_end']} MB "
        f"at the end; {compactions:.0f} compactions"
    )
    return out


def run(log: Callable[[str], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    parts = os.environ.get("BENCH_QUIET_PARTS", "quiet,churn").split(",")
    for name, part in (("quiet", run_quiet), ("churn", run_churn)):
        if name not in parts:
            continue
        try:
            out[name] = part(log)
        except Exception as e:  # one part failing keeps the other's figures
            log(f"  {name} failed: {e!r}")
            out.setdefault("errors", {})[name] = repr(e)
    return out
