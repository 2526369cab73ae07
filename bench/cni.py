"""Section 1: the CNI plugin exec'd as a runtime (or ptp delegating to its IPAM) does it, beside the
floor (bench/floor_plugin.py against a canned server in this process) and host-local (Go).

Each pod's ADD (then CHECK, then DEL) is run for every subject in turn, so load from elsewhere on
the machine falls on all subjects alike; the 16-way throughput runs subject after subject."""

from __future__ import annotations

import compileall
import json
import os
import socketserver
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from bench.common import Exec, Lab, create_pool, exec_plugin, peak_rss_kb, pick, summary_ms
from coil.v1 import nodeagent_pb2 as npb
from coil.v1 import nodeagent_pb2_grpc as npb_grpc
from tests.harness.cluster import SYSTEM_CNI, install_plugin

BENCH_DIR = Path(__file__).resolve().parent
FLOOR = BENCH_DIR / "floor_plugin.py"
PARALLEL = 16


class CannedAgent(npb_grpc.NodeAgentServiceServicer):
    """A node agent that does no work: the same answer to every call."""

    ALLOCATED = npb.AllocateResponse(
        addresses=[npb.PodAddress(address="10.1.2.3/32", gateway="10.1.0.1", pool="default")]
    )

    def Allocate(self, request: Any, context: Any) -> Any:
        return self.ALLOCATED

    def Release(self, request: Any, context: Any) -> Any:
        return npb.ReleaseResponse(addresses=["10.1.2.3/32"])

    def Check(self, request: Any, context: Any) -> Any:
        return npb.CheckResponse(addresses=self.ALLOCATED.addresses)

    def GarbageCollect(self, request: Any, context: Any) -> Any:
        return npb.GarbageCollectResponse()

    def Status(self, request: Any, context: Any) -> Any:
        return npb.StatusResponse(pools=["default"])


def serve_canned(path: Path) -> grpc.Server:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    npb_grpc.add_NodeAgentServiceServicer_to_server(CannedAgent(), server)
    server.add_insecure_port(f"unix:{path}")
    server.start()
    return server


@dataclass
class Subject:
    """A plugin as a runtime sees it: the command line and the `ipam` section it is given."""

    name: str
    argv: list[str]
    ipam: dict[str, Any]
    add: list[Exec] = field(default_factory=list)
    check: list[Exec] = field(default_factory=list)
    delete: list[Exec] = field(default_factory=list)
    failures: int = 0
    every: int = 1  # takes part in every `every`-th pod of the sequential phases

    def conf(self, prev: dict[str, Any] | None = None) -> bytes:
        conf: dict[str, Any] = {
            "cniVersion": "1.0.0",
            "name": "bench-net",
            "type": "ptp",
            "ipMasq": False,
            "ipam": self.ipam,
        }
        if prev is not None:
            conf["prevResult"] = prev
        return json.dumps(conf).encode()

    def env(self, command: str, pod: str) -> dict[str, str]:
        return {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod,
            "CNI_NETNS": f"/var/run/netns/{pod[:12]}",
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": (
                f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p-{pod[:8]};"
                f"K8S_POD_INFRA_CONTAINER_ID={pod}"
            ),
            "CNI_PATH": SYSTEM_CNI,
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }

    def run(self, command: str, pod: str, prev: dict[str, Any] | None = None) -> Exec:
        result = exec_plugin(self.argv, self.env(command, pod), self.conf(prev))
        if result.code != 0:
            self.failures += 1
            if self.failures <= 3:
                print(f"  {self.name} {command} failed ({result.code}): {result.stdout[:300]!r}")
        return result

    def rss_mb(self, pods: int, scratch: Path) -> dict[str, float]:
        """Peak RSS of ADD and DEL execs, measured apart from the timed runs (see peak_rss_kb)."""
        add, delete = [], []
        for _ in range(pods):
            pod = uuid.uuid4().hex
            add.append(peak_rss_kb(self.argv, self.env("ADD", pod), self.conf(), scratch))
            delete.append(peak_rss_kb(self.argv, self.env("DEL", pod), self.conf(), scratch))
        return {
            "add_max": round(max(add) / 1024, 1),
            "add_p50": round(sorted(add)[len(add) // 2] / 1024, 1),
            "del_max": round(max(delete) / 1024, 1),
        }


RAW_PLUGIN = """#!{python} -IS
import json, os, socket, sys
conf = json.loads(sys.stdin.buffer.read())
env = os.environ
request = {{"command": env["CNI_COMMAND"], "container_id": env["CNI_CONTAINERID"],
           "interface": env["CNI_IFNAME"]}}
with socket.socket(socket.AF_UNIX) as s:
    s.connect(conf["ipam"]["socket"])
    s.sendall(json.dumps(request).encode() + b"\\n")
    reply = json.loads(s.makefile("rb").readline())
if env["CNI_COMMAND"] == "ADD":
    sys.stdout.write(json.dumps({{"cniVersion": conf["cniVersion"], "ips": reply["ips"]}}) + "\\n")
sys.stdout.flush()
os._exit(0)
"""


def serve_raw(path: Path) -> socketserver.ThreadingUnixStreamServer:
    """A canned JSON-lines server: what a plugin would talk to if coild spoke no gRPC to it."""

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            self.rfile.readline()
            self.wfile.write(b'{"ips": [{"address": "10.1.2.3/32", "gateway": "10.1.0.1"}]}\n')

    server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def launcher(path: Path, paths: list[str], defer: bool, fast_exit: bool) -> list[str]:
    """A `-IS` launcher for the floor (as coil_cni.install writes coil's); returns its argv."""
    lines = [f"#!{sys.executable} -IS", "import sys", f"sys.path[0:0] = {paths!r}"]
    if defer:
        lines += ["from deferred import defer_asyncio", "defer_asyncio()"]
    lines += ["import floor_plugin", f"floor_plugin.main(fast_exit={fast_exit})", ""]
    path.write_text("\n".join(lines))
    path.chmod(0o755)
    return [str(path)]


def sequential(subjects: list[Subject], pods: int, log: Callable[[str], None]) -> None:
    """ADD every pod with every subject in turn, then CHECK all, then DEL all."""
    ids = [uuid.uuid4().hex for _ in range(pods)]
    results: dict[tuple[str, str], dict[str, Any] | None] = {}
    for phase in ("ADD", "CHECK", "DEL"):
        started = time.monotonic()
        for n, pod in enumerate(ids):
            for subject in subjects:
                if n % subject.every:
                    continue
                prev = results.get((subject.name, pod)) if phase == "CHECK" else None
                r = subject.run(phase, pod, prev)
                if phase == "ADD":
                    subject.add.append(r)
                    results[(subject.name, pod)] = json.loads(r.stdout) if r.stdout else None
                elif phase == "CHECK":
                    subject.check.append(r)
                else:
                    subject.delete.append(r)
        log(f"  sequential {phase} x{pods} x{len(subjects)}: {time.monotonic() - started:.1f} s")


def parallel_ops(subject: Subject, pods: int) -> dict[str, float]:
    """ADD then DEL `pods` pods with PARALLEL execs at a time; execs (ADD or DEL) per second."""
    ids = [uuid.uuid4().hex for _ in range(pods)]

    def one(pod: str) -> int:
        return (subject.run("ADD", pod).code != 0) + (subject.run("DEL", pod).code != 0)

    started = time.perf_counter()
    with futures.ThreadPoolExecutor(PARALLEL) as pool:
        failed = sum(pool.map(one, ids))
    elapsed = time.perf_counter() - started
    return {
        "pods": pods,
        "execs": 2 * pods,
        "seconds": round(elapsed, 3),
        "ops_per_s": round(2 * pods / elapsed, 2),
        "failed": failed,
    }


def stats(subject: Subject) -> dict[str, Any]:
    return {
        "add_ms": summary_ms([r.seconds for r in subject.add]),
        "check_ms": summary_ms([r.seconds for r in subject.check]),
        "del_ms": summary_ms([r.seconds for r in subject.delete]),
        "failures": subject.failures,
    }


def run(lab: Lab, allocator: str, log: Callable[[str], None]) -> dict[str, Any]:
    pods = pick(int(os.environ.get("BENCH_PODS", "1000")), 15)
    par_pods = pick(64, 8)
    startup_n = pick(40, 4)
    create_pool(allocator, "default", "10.0.0.0/12", 6)
    _, coild_sock, _ = lab.start_coild("bench-node", allocator)
    plugin = install_plugin(lab.root / "bin")
    compileall.compile_file(str(FLOOR), quiet=1)
    canned_sock = lab.root / "floor.sock"
    canned = serve_canned(canned_sock)
    lab.stack.callback(canned.stop, None)
    hl_dir = lab.root / "host-local"
    hl_dir.mkdir()

    coil = Subject("coil", [str(plugin)], {"type": "coil", "socket": str(coild_sock)})
    floor = Subject(
        "floor",
        [sys.executable, str(FLOOR)],
        {"type": "coil", "socket": str(canned_sock)},
        every=pick(5, 1),  # the floor's ~150 ms a exec: every 5th pod still gives 200 samples
    )
    host_local = Subject(
        "host-local",
        [f"{SYSTEM_CNI}/host-local"],
        {"type": "host-local", "ranges": [[{"subnet": "10.250.0.0/16"}]], "dataDir": str(hl_dir)},
    )
    subjects = [coil, floor, host_local]
    for s in subjects:  # warm caches once; not counted
        s.run("ADD", "warmup0")
        s.run("DEL", "warmup0")
        s.failures = 0
    log(
        f"  {pods} pods, each ADD/CHECK/DEL by coil and host-local in turn, "
        f"and every {floor.every}th by the floor"
    )
    sequential(subjects, pods, log)
    out: dict[str, Any] = {"pods": pods, "subjects": {s.name: stats(s) for s in subjects}}
    rss_pods = pick(20, 2)
    for s in subjects:
        out["subjects"][s.name]["peak_rss_mb"] = s.rss_mb(rss_pods, lab.root)
    out["raw_add_ms"] = {s.name: [round(r.seconds * 1000, 3) for r in s.add] for s in subjects}

    log(f"  {PARALLEL}-way ADD+DEL, {par_pods} pods per subject")
    for s in subjects:
        out["subjects"][s.name]["parallel"] = parallel_ops(s, par_pods)
        log(f"    {s.name}: {out['subjects'][s.name]['parallel']['ops_per_s']} execs/s")

    # Start-up options of the floor: the same script and the same canned server, started
    # differently; plus the interpreter alone for reference.
    # The floor needs grpcio and the generated stubs, which coil's own launcher does not list.
    stubs_root = str(Path(npb.__file__ or "").resolve().parents[2])  # .../coil/v1/x_pb2.py
    grpc_root = str(Path(grpc.__file__ or "").resolve().parents[1])  # .../grpc/__init__.py
    paths = [grpc_root, stubs_root, str(BENCH_DIR)]
    py = sys.executable
    variants = [
        ("python -c pass (interpreter only, no RPC)", [py, "-c", "pass"], False),
        ("python -I -S -c pass (interpreter only, no RPC)", [py, "-I", "-S", "-c", "pass"], False),
        ("python -c 'import grpc' (no RPC)", [py, "-c", "import grpc"], False),
        ("floor: python floor_plugin.py (plain)", [sys.executable, str(FLOOR)], True),
        (
            "floor: -I -S, explicit sys.path",
            launcher(lab.root / "floor-is", paths, defer=False, fast_exit=False),
            True,
        ),
        (
            "floor: -I -S, sys.path, asyncio deferred",
            launcher(lab.root / "floor-isd", paths, defer=True, fast_exit=False),
            True,
        ),
        (
            "floor: -I -S, sys.path, asyncio deferred, os._exit (coil's recipe with grpcio)",
            launcher(lab.root / "floor-isdx", paths, defer=True, fast_exit=True),
            True,
        ),
    ]
    vsubjects = [
        Subject(name, argv, {"type": "coil", "socket": str(canned_sock)})
        for name, argv, _ in variants
    ]
    # Not a gRPC client: what the plugin would cost if coild offered it a plain protocol.
    raw_sock = lab.root / "raw.sock"
    raw = serve_raw(raw_sock)
    lab.stack.callback(raw.server_close)
    lab.stack.callback(raw.shutdown)
    raw_script = lab.root / "raw-plugin"
    raw_script.write_text(RAW_PLUGIN.format(python=sys.executable))
    raw_script.chmod(0o755)
    vsubjects.append(
        Subject(
            "no grpc: -I -S, json over a plain UNIX socket, os._exit (other protocol)",
            [str(raw_script)],
            {"type": "coil", "socket": str(raw_sock)},
        )
    )
    vsubjects.append(Subject("coil plugin (coil_cni launcher) against coild", coil.argv, coil.ipam))
    ids = [uuid.uuid4().hex for _ in range(startup_n)]
    for pod in ids:
        for s in vsubjects:
            s.add.append(s.run("ADD", pod))
    for pod in ids:  # give coild its addresses back
        vsubjects[-1].run("DEL", pod)
    base = None
    startup: list[dict[str, Any]] = []
    for s in vsubjects:
        st = summary_ms([r.seconds for r in s.add])
        if s.name.startswith("floor: python floor_plugin.py"):
            base = st["p50"]
        startup.append(
            {
                "variant": s.name,
                "add_ms": st,
                "peak_rss_mb": s.rss_mb(pick(3, 1), lab.root)["add_max"],
                "failures": s.failures,
            }
        )
    for row in startup:
        row["saves_ms_vs_plain_floor"] = (
            round(base - row["add_ms"]["p50"], 1) if base is not None else None
        )
    out["startup"] = startup
    out["startup_n"] = startup_n
    return out
