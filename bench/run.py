"""`make bench` (`python -m bench.run`): coil against the cheapest possible Python client, against
host-local, and at the limits of etcd and Kubernetes.

Writes bench/results/latest.md, latest.json and add-latency.svg (with BENCH_ONLY: only-<sections>.md
and .json, so a partial run does not replace the full one); prints PASS or MISS per target.
BENCH_QUICK=1 runs a smoke version (under a minute, more with the quiet section);
BENCH_ONLY=cni,bundle,agent,claims,scale,routes,quiet
runs some sections only; BENCH_CHURN_S sets the
length of the quiet section's churn run (600 s by default). Needs root (network namespaces) and
the CNI plugins in /usr/lib/cni. Every process and namespace it starts is removed when it ends,
also on failure or Ctrl-C."""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# grpc logs every fork of a process with gRPC threads at INFO (pyroute2 forks into namespaces).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from bench import agent, bundle, claims, cni, common, quiet, routes, scale, svg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("cni", "bundle", "agent", "claims", "scale", "routes", "quiet")


@dataclass
class Target:
    section: str
    what: str
    measured: float | None
    limit: float
    unit: str
    higher_is_better: bool = False

    @property
    def passed(self) -> bool:
        if self.measured is None:
            return False
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit

    def line(self) -> str:
        sign = "≥" if self.higher_is_better else "≤"
        shown = "n/a" if self.measured is None else f"{self.measured:g}"
        return f"{self.what}: {shown} {self.unit} (target {sign} {self.limit:g})"


def log(text: str) -> None:
    print(text, flush=True)


def targets(r: dict[str, Any]) -> list[Target]:
    out = []
    if "cni" in r:
        s = r["cni"]["subjects"]
        coil, floor = s["coil"], s["floor"]
        out += [
            Target(
                "cni",
                "coil ADD p50 / floor ADD p50",
                round(coil["add_ms"]["p50"] / floor["add_ms"]["p50"], 3),
                1.10,
                "x",
            ),
            Target(
                "cni",
                "coil DEL p50 / floor DEL p50",
                round(coil["del_ms"]["p50"] / floor["del_ms"]["p50"], 3),
                1.10,
                "x",
            ),
            Target(
                "cni",
                "coil 16-way ADD+DEL throughput / floor's",
                round(coil["parallel"]["ops_per_s"] / floor["parallel"]["ops_per_s"], 3),
                0.90,
                "x",
                higher_is_better=True,
            ),
            Target("cni", "coil ADD p50", coil["add_ms"]["p50"], 60, "ms"),
        ]
    if "bundle" in r:
        b = r["bundle"]["subjects"]
        out.append(
            Target(
                "bundle",
                "bundle ADD p50 / venv launcher ADD p50",
                round(b["bundle"]["add_ms"]["p50"] / b["venv launcher"]["add_ms"]["p50"], 3),
                1.10,
                "x",
            )
        )
    if "agent" in r:
        top = r["agent"]["runs"][-1]
        out.append(
            Target(
                "agent",
                f"coild durable allocations/s at {top['clients']} clients",
                top["allocations_per_s"],
                2000,
                "/s",
                True,
            )
        )
    if "claims" in r:
        for run in r["claims"]["runs"]:
            n = run["replicas"]
            ok = run["claimed"] == run["nodes"]
            out.append(
                Target(
                    "claims",
                    f"claim storm, {n} allocator(s): all {run['nodes']} nodes hold a block",
                    run["all_held_s"] if ok else None,
                    3,
                    "s",
                )
            )
            out.append(
                Target(
                    "claims",
                    f"claim storm, {n} allocator(s): retries per claim",
                    run["retries_per_claim"],
                    0.5,
                    "",
                )
            )
    if "scale" in r:
        sc = r["scale"]
        out.append(
            Target(
                "scale",
                f"coilctl usage over {sc['records']} records",
                sc["coilctl_usage"].get("median_s"),
                1,
                "s",
            )
        )
        out.append(
            Target(
                "scale",
                "coild ready with 110 pods",
                sc["coild_ready_110_pods"].get("median_s"),
                1,
                "s",
            )
        )
    if "routes" in r:
        out.append(
            Target(
                "routes",
                f"{r['routes']['blocks']} routes into table 119 (fresh)",
                r["routes"]["fresh"]["median_s"],
                1,
                "s",
            )
        )
    if "quiet" in r:
        q = r["quiet"]
        for run in q.get("quiet", {}).get("runs", []):
            if run["mode"] == "watch" and run["nodes"] == 10000:
                out.append(
                    Target(
                        "quiet",
                        "quiet cluster, 10,000 nodes: two allocators + etcd",
                        run["total_cores"],
                        0.25,
                        "cores",
                    )
                )
            if run["mode"] == "watch":
                out.append(
                    Target(
                        "quiet",
                        f"quiet cluster, {run['nodes']} nodes: etcd revisions written",
                        run["revisions_per_min"],
                        0,
                        "/min",
                    )
                )
            for what, label, limit in (
                ("pool_change", "a new pool reached every coild", 2),
                ("address_free", "an operator's address free reached its coild", 5),
            ):
                got = run.get(what)
                if got is None and run.get("probe_error"):
                    got = {"reached": 0, "expected": 1}  # the change itself failed
                if got is not None:
                    # Every arrival counts: one that never came fails the target.
                    complete = got["reached"] == got["expected"]
                    out.append(
                        Target(
                            "quiet",
                            f"quiet cluster, {run['nodes']} nodes: {label} (slowest)",
                            got.get("max_s") if complete else None,
                            limit,
                            "s",
                        )
                    )
            if run["mode"] == "watch" and run["nodes"] == 20000:
                out.append(
                    Target(
                        "quiet",
                        "quiet cluster, 20,000 nodes: coilds not ready",
                        run["not_ready_at_end"],
                        0,
                        "",
                    )
                )
        churn = q.get("churn")
        if churn:
            out.append(
                Target(
                    "quiet",
                    "churn: changes a watcher missed",
                    churn.get("missed_puts", 1) + churn.get("missed_dels", 1),
                    0,
                    "",
                )
            )
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def header(*cells: str) -> list[str]:
    return [row(*cells), "|" + "---|" * len(cells)]


def timed(v: dict[str, Any]) -> str:
    return f"{v['median_s']} s" if "median_s" in v else f"error: {v.get('error')}"


def cni_section(c: dict[str, Any]) -> list[str]:
    s = c["subjects"]
    names = ("coil", "floor", "host-local")
    lines = [
        "",
        f"## 1. CNI plugin exec'd as IPAM ({c['pods']} pods sequential, interleaved; the floor "
        f"took {s['floor']['add_ms']['n']} of them, spread over the run; 16-way: "
        f"{s['coil']['parallel']['pods']} pods ADD+DEL per subject)",
        "",
        "Floor = bench/floor_plugin.py run plain (`python floor_plugin.py`: site, full imports, "
        "normal exit) against a canned server in the bench process. "
        "host-local = /usr/lib/cni/host-local.",
        "",
        *header("figure", "coil", "floor (plain)", "host-local", "coil/floor", "coil/host-local"),
    ]
    for label, key, stat in (
        ("ADD p50 ms", "add_ms", "p50"),
        ("ADD p99 ms", "add_ms", "p99"),
        ("CHECK p50 ms", "check_ms", "p50"),
        ("CHECK p99 ms", "check_ms", "p99"),
        ("DEL p50 ms", "del_ms", "p50"),
        ("DEL p99 ms", "del_ms", "p99"),
    ):
        a, b, h = (s[n][key][stat] for n in names)
        lines.append(row(label, f"{a:.1f}", f"{b:.1f}", f"{h:.1f}", ratio(a, b), ratio(a, h)))
    a, b, h = (s[n]["parallel"]["ops_per_s"] for n in names)
    lines.append(
        row("16-way ADD+DEL execs/s", f"{a:.1f}", f"{b:.1f}", f"{h:.1f}", ratio(a, b), ratio(a, h))
    )
    a, b, h = (s[n]["peak_rss_mb"]["add_max"] for n in names)
    lines.append(
        row("peak RSS per exec, MB", f"{a:.1f}", f"{b:.1f}", f"{h:.1f}", ratio(a, b), ratio(a, h))
    )
    fails = {n: s[n]["failures"] for n in s}
    lines += [
        "",
        f"Failed execs: {fails}. Peak RSS is measured under /usr/bin/time, apart from the "
        "timed runs.",
        "",
        "![ADD latency CDF](add-latency.svg)",
        "",
        f"### Start-up options of the floor ({c['startup_n']} ADDs each, interleaved)",
        "",
        *header("variant", "ADD p50 ms", "ADD p99 ms", "peak RSS MB", "saves vs plain floor (p50)"),
    ]
    for v in c["startup"]:
        ms = v["add_ms"]
        if v["failures"]:  # a failing exec's time says nothing about the variant
            lines.append(row(v["variant"], f"FAILED ({v['failures']} execs)", "", "", ""))
            continue
        saved = f"{v['saves_ms_vs_plain_floor']:+.1f} ms"
        lines.append(
            row(v["variant"], f"{ms['p50']:.1f}", f"{ms['p99']:.1f}", v["peak_rss_mb"], saved)
        )
    return lines


def bundle_section(b: dict[str, Any]) -> list[str]:
    s = b["subjects"]
    venv, bun = s["venv launcher"], s["bundle"]
    lines = [
        "",
        f"## 1b. The plugin bundle against the venv launcher ({b['pods']} pods sequential, "
        f"interleaved, same coild; VERSION {b['version_n']} execs each)",
        "",
        f"Bundle = `make cni-bundle` ({b['bundle_mb']} MB: Debian's CPython 3.11 with its own "
        "loader and libc, behind a /bin/sh launcher) installed by coil-install; venv launcher = "
        "`python -m coil_cni.install` (this virtualenv's interpreter).",
        "",
        *header("figure", "bundle", "venv launcher", "bundle/venv"),
    ]
    for label, key, stat in (
        ("ADD p50 ms", "add_ms", "p50"),
        ("ADD p99 ms", "add_ms", "p99"),
        ("CHECK p50 ms", "check_ms", "p50"),
        ("DEL p50 ms", "del_ms", "p50"),
    ):
        a, v = bun[key][stat], venv[key][stat]
        lines.append(row(label, f"{a:.1f}", f"{v:.1f}", ratio(a, v)))
    a, v = (b["version_ms"][n]["p50"] for n in ("bundle", "venv launcher"))
    lines.append(row("VERSION p50 ms", f"{a:.1f}", f"{v:.1f}", ratio(a, v)))
    a, v = bun["peak_rss_mb"]["add_max"], venv["peak_rss_mb"]["add_max"]
    lines.append(row("peak RSS per ADD, MB", f"{a:.1f}", f"{v:.1f}", ratio(a, v)))
    lines += ["", f"Failed execs: bundle {bun['failures']}, venv launcher {venv['failures']}."]
    return lines


def agent_section(a: dict[str, Any]) -> list[str]:
    lines = [
        "",
        f"## 2. coild alone ({a['seconds_per_run']} s per run; Allocate then Release per pod, "
        "records durable in etcd)",
        "",
        "Per alloc+release cycle: allocator RPCs (coil_allocator_rpcs_total), etcd Txn and Range "
        "requests (etcd's grpc_server_started_total), keys written (etcd_mvcc_put_total).",
        "",
        *header(
            "clients",
            "allocations/s",
            "Allocate p50 / p99 ms",
            "Release p50 / p99 ms",
            "allocator RPCs",
            "etcd Txn",
            "etcd Range",
            "etcd puts",
            "coild mean batch",
            "errors",
        ),
    ]
    for run in a["runs"]:
        al, rl = run["allocate_ms"], run["release_ms"]
        lines.append(
            row(
                run["clients"],
                f"{run['allocations_per_s']:.0f}",
                f"{al['p50']:.2f} / {al['p99']:.2f}",
                f"{rl['p50']:.2f} / {rl['p99']:.2f}",
                run["allocator_rpcs_per_allocation"],
                run["etcd_txns_per_allocation"],
                run["etcd_ranges_per_allocation"],
                run["etcd_puts_per_allocation"],
                run["coild_mean_batch"],
                run["errors"],
            )
        )
    names = list(a["runs"][0]["cpu_ms_per_allocation"])
    lines += [
        "",
        "CPU time per alloc+release cycle, ms (from /proc/PID/stat; all threads):",
        "",
        *header("clients", *names, "total", "2-core ceiling, cycles/s"),
    ]
    for run in a["runs"]:
        cpu = run["cpu_ms_per_allocation"]
        total = sum(cpu.values())
        cells = [f"{cpu[n]:.2f}" for n in names]
        lines.append(row(run["clients"], *cells, f"{total:.2f}", f"{2000 / total:.0f}"))
    floor = a.get("floor")
    if floor:
        top = a["runs"][-1]
        fcpu = floor["cpu_ms_per_allocation"]
        lines += [
            "",
            "The floor: the same load generator against a NodeAgentService server that does no "
            "work (bench/agent_floor.py: grpcio's synchronous server with 32 workers, as coild's, "
            "answering at once), in the same run. It is the most any coild built on grpcio "
            "could reach on this machine.",
            "",
            *header(
                "server",
                "clients",
                "alloc+release cycles/s",
                "Allocate p50 / p99 ms",
                "server CPU ms per cycle",
                "load generator CPU ms per cycle",
            ),
            row(
                "coild (records durable in etcd)",
                top["clients"],
                f"{top['allocations_per_s']:.0f}",
                f"{top['allocate_ms']['p50']:.2f} / {top['allocate_ms']['p99']:.2f}",
                f"{top['cpu_ms_per_allocation']['coild']:.2f}",
                f"{top['cpu_ms_per_allocation']['load generator (bench)']:.2f}",
            ),
            row(
                "no-work gRPC server (floor)",
                floor["clients"],
                f"{floor['allocations_per_s']:.0f}",
                f"{floor['allocate_ms']['p50']:.2f} / {floor['allocate_ms']['p99']:.2f}",
                f"{fcpu['no-work server']:.2f}",
                f"{fcpu['load generator (bench)']:.2f}",
            ),
            "",
            f"coild reaches {top['allocations_per_s'] / floor['allocations_per_s']:.2f}x the "
            "floor's rate.",
        ]
    return lines


def claims_section(cl: dict[str, Any]) -> list[str]:
    lines = [
        "",
        "## 3. Claim storm (every node claims its first block at once)",
        "",
        *header(
            "allocators",
            "nodes",
            "pool",
            "all hold a block after s",
            "claim p50 / p99 ms",
            "retries per claim",
            "max retries",
            "errors",
        ),
    ]
    for run in cl["runs"]:
        ms = run["claim_ms"]
        lines.append(
            row(
                run["replicas"],
                f"{run['claimed']}/{run['nodes']}",
                run["pool"],
                run["all_held_s"],
                f"{ms['p50']:.0f} / {ms['p99']:.0f}",
                run["retries_per_claim"],
                run["max_retries"],
                run["errors"],
            )
        )
    return lines


def scale_section(sc: dict[str, Any]) -> list[str]:
    ready = sc["coild_ready_110_pods"]
    return [
        "",
        f"## 4. Scale ({sc['nodes']} nodes holding blocks, {sc['records']} records, "
        f"one node with {sc['big_node_records']} pods)",
        "",
        *header("figure", "value"),
        row(
            "state written (domain API in-process, 8 threads)",
            f"claims {sc['claim_s']} s, records {sc['record_s']} s "
            f"({sc['records_per_s_written']}/s)",
        ),
        row("`coilctl usage` (wall, incl. CLI start)", timed(sc["coilctl_usage"])),
        row("GetUsage RPC alone", timed(sc["rpc_get_usage"])),
        row("`coilctl pool show default`", timed(sc["coilctl_pool_show"])),
        row("GetPool RPC alone", timed(sc["rpc_get_pool"])),
        row("`coilctl address info ADDR`", timed(sc["coilctl_address_info"])),
        row("GetAddress RPC alone", timed(sc["rpc_get_address"])),
        row("`coilctl version` (CLI start, no RPC)", timed(sc["coilctl_version"])),
        row("coild start to ready, 110 pods", f"{timed(ready)} (runs {ready.get('runs_s')})"),
        row(
            "coil-allocator RSS after the reads",
            f"{sc['allocator_rss_mb']} MB (peak {sc['allocator_peak_rss_mb']} MB; "
            f"before the reads {sc['allocator_rss_mb_before_reads']} MB)",
        ),
        row("etcd bytes per record (db in use: growth / records)", sc["etcd_bytes_per_record"]),
        row(
            "etcd db size after",
            f"in use {sc['etcd_db_in_use_bytes_after'] / 2**20:.1f} MiB, "
            f"file {sc['etcd_db_total_bytes_after'] / 2**20:.1f} MiB",
        ),
    ]


def routes_section(ro: dict[str, Any]) -> list[str]:
    return [
        "",
        f"## 5. Route export ({ro['blocks']} blocks, table 119, median of 3 namespaces)",
        "",
        *header("case", "seconds"),
        row("fresh namespace", ro["fresh"]["median_s"]),
        row("new exporter, same set (no-op)", ro["restart_noop"]["median_s"]),
        row("new exporter, 10% replaced", ro["restart_10pct_changed"]["median_s"]),
        "",
        f"Checks: {ro['checks']}",
    ]


def quiet_section(q: dict[str, Any]) -> list[str]:
    lines = ["", "## 6. A quiet cluster (two allocator replicas, one etcd; nothing changes)", ""]
    quiet_runs = q.get("quiet", {})
    for design in ("watch", "poll"):
        pattern = quiet_runs.get(f"coild_pattern_{design}")
        if pattern:
            calls = ", ".join(f"{m} {v:g}/s" for m, v in sorted(pattern.items()) if v)
            lines.append(f"One real coild ({design} design), counted by the allocator: {calls}.")
    lines += [
        "",
        f"Polling design: allocator and coild of commit {quiet_runs.get('baseline')} (ListPools "
        "every 10 s, ReportNode every 30 s, ListNodeBlocks every 60 s); watch design: this "
        "commit (WatchNode stream, a fresh snapshot on it every 600 s as the safety net). "
        "Measured over "
        f"{quiet_runs.get('window_s')} s, from when every simulated node was up (or 300 s "
        "after the ramp).",
        "",
        *header(
            "design",
            "nodes",
            "allocators (cores)",
            "etcd (cores)",
            "total",
            "RPC/s by method",
            "etcd requests/s",
            "revisions/min",
            "DB growth MB/day",
            "up when measured (start s; when half, 90% and 99% were up)",
            "not ready",
            "allocator RSS (MB)",
            "errors",
        ),
    ]
    for run in quiet_runs.get("runs", []):
        lines.append(
            row(
                run["mode"],
                run["nodes"],
                run["allocator_cores"],
                run["etcd_cores"],
                run["total_cores"],
                ", ".join(f"{m} {v:g}" for m, v in run["rpcs_per_s"].items()) or "0",
                run["etcd_requests_per_s"],
                run["revisions_per_min"],
                run["db_growth_mb_per_day"],
                f"{run.get('up_before_window', '-')} ({run.get('start_s', '-')}"
                + "".join(f"; {k} at {v}" for k, v in run.get("up_at", {}).items() if k != "100%")
                + ")",
                run["not_ready_at_end"],
                " / ".join(str(m) for m in run.get("allocator_rss_mb", [])),
                run["errors"] or "",
            )
        )
    probed = [r for r in quiet_runs.get("runs", []) if "pool_change" in r]
    if probed:
        lines += [
            "",
            f"After each watch run's window, an operator's changes (a new pool, then `address "
            f"free` of {probed[0]['address_free']['expected']} records on as many nodes), and "
            "when the simulated nodes' streams brought them (seconds after each was asked for), "
            "and the CPU-seconds the two allocators and the load generator (one process, all "
            "the nodes' streams) spent from the probe's start until the slowest node had the "
            "new pool:",
            "",
            *header(
                "nodes",
                "change",
                "reached",
                "p50",
                "p99",
                "slowest",
                "CPU-s: allocators / load generator (over s)",
            ),
        ]
        for run in probed:
            for what, label in (("pool_change", "new pool"), ("address_free", "address free")):
                got = run[what]
                lines.append(
                    row(
                        run["nodes"],
                        label,
                        f"{got['reached']} of {got['expected']}",
                        got.get("p50_s", "-"),
                        got.get("p99_s", "-"),
                        got.get("max_s", "-"),
                        (
                            f"{got['cpu_s']['allocators']} / {got['cpu_s']['loadgen']} "
                            f"({got['cpu_s']['over_s']})"
                            if "cpu_s" in got
                            else "-"
                        ),
                    )
                )
    by = {(r["mode"], r["nodes"]): r for r in quiet_runs.get("runs", [])}
    for nodes in sorted({n for _, n in by}):
        watch, poll = by.get(("watch", nodes)), by.get(("poll", nodes))
        if watch and poll and watch["total_cores"] > 0:
            lines.append(
                f"\n{nodes} nodes: watching {watch['total_cores']} cores against polling "
                f"{poll['total_cores']} ({poll['total_cores'] / watch['total_cores']:.1f}x), "
                f"{watch['etcd_requests_per_s']} etcd requests/s against "
                f"{poll['etcd_requests_per_s']}."
            )
    churn = q.get("churn")
    if churn:
        lines += [
            "",
            f"### Churn: {churn['adds_per_s']:g} pod ADDs/s (each released 10 s later) on "
            f"{churn['nodes']} watching nodes for {churn['seconds']:.0f} s, compaction "
            f"`{churn['compaction']}`",
            "",
            *header("figure", "value"),
            row("records added / removed", f"{churn.get('adds')} / {churn.get('dels')}"),
            row(
                "changes a watcher missed (adds / removals)",
                f"{churn.get('missed_puts')} / {churn.get('missed_dels')}",
            ),
            row("compactions", churn["compactions"]),
            row(
                "etcd DB in use at 1/3 of the run → at the end",
                f"{churn['db_in_use_mb_at_third']} MB → {churn['db_in_use_mb_at_end']} MB "
                f"(file {churn['db_size_mb_at_end']} MB)",
            ),
            row("errors", churn["errors"] or "none"),
            "",
            "DB samples (s, file MB, in use MB): "
            + ", ".join(f"({t}, {a}, {b})" for t, a, b in churn["db_samples"]),
        ]
    return lines


def markdown(r: dict[str, Any], tgts: list[Target]) -> str:
    m = r["machine"]
    kind = "QUICK smoke run" if r["quick"] else "full run"
    lines = [
        "# coil benchmark results",
        "",
        f"Run {r['finished']} ({kind}), {r['duration_s']:.0f} s. Machine: {m['nproc']} cores, "
        f"{m['cpu']}, Python {m['python']}, kernel {m['kernel']}. Load average before/after: "
        f"{m['load_before']} / {m['load_after']} "
        "(other work on the machine may have been running). "
        f"Code: commit {r.get('commit', '?')}.",
        "",
        "## Targets",
        "",
        *header("", "target", "measured"),
    ]
    for t in tgts:
        what, measured = t.line().split(": ", 1)
        lines.append(row("PASS" if t.passed else "**MISS**", what, measured))
    if r.get("errors"):
        lines += ["", f"Sections that failed: {r['errors']}"]
    sections: dict[str, Callable[[dict[str, Any]], list[str]]] = {
        "cni": cni_section,
        "bundle": bundle_section,
        "agent": agent_section,
        "claims": claims_section,
        "scale": scale_section,
        "routes": routes_section,
        "quiet": quiet_section,
    }
    for name, render in sections.items():
        if name in r:
            lines += render(r[name])
    return "\n".join(lines) + "\n"


def main() -> int:
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces)", file=sys.stderr)
        return 2
    only = [s for s in os.environ.get("BENCH_ONLY", "").split(",") if s] or list(SECTIONS)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups
    common.cleanup_leftovers()
    started = time.time()
    r: dict[str, Any] = {
        "quick": common.QUICK,
        "machine": {
            "nproc": os.cpu_count(),
            "cpu": common.cpu_model(),
            "python": platform.python_version(),
            "kernel": platform.release(),
            "load_before": common.load_average(),
        },
        "commit": common.git_commit(),
    }
    runners: dict[str, Callable[[common.Lab], Any]] = {
        "cni": lambda lab: cni.run(lab, lab.allocators[0][1], log),
        "bundle": lambda lab: bundle.run(lab, lab.allocators[0][1], log),
        "agent": lambda lab: agent.run(lab, lab.allocators[0][2], log),
        "claims": lambda lab: claims.run(lab, log),
        "scale": lambda lab: scale.run(lab, log),
        "routes": lambda lab: routes.run(lab, log),
        "quiet": lambda lab: quiet.run(log),  # its own etcds and allocators
    }
    with common.lab() as lab:
        lab.start_allocator("alloc-a")
        if "cni" not in only:  # the pool coild and the scale section use
            common.create_pool(lab.allocators[0][1], "default", "10.0.0.0/12", 6)
        for name in SECTIONS:
            if name in only:
                log(f"== {name}")
                t0 = time.time()
                try:
                    r[name] = runners[name](lab)
                except Exception as e:  # report the others; the error goes into the results
                    traceback.print_exc()
                    r.setdefault("errors", {})[name] = repr(e)
                log(f"   ({time.time() - t0:.0f} s)")
    r["machine"]["load_after"] = common.load_average()
    r["duration_s"] = round(time.time() - started, 1)
    r["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    tgts = targets(r)
    r["targets"] = [
        {
            "section": t.section,
            "what": t.what,
            "measured": t.measured,
            "limit": t.limit,
            "unit": t.unit,
            "pass": t.passed,
        }
        for t in tgts
    ]
    RESULTS.mkdir(exist_ok=True)
    if "cni" in r:
        raw = r["cni"]["raw_add_ms"]
        chart = svg.add_latency_cdf(
            {"coil": raw["coil"], "floor (plain)": raw["floor"], "host-local": raw["host-local"]},
            f"CNI ADD latency, {r['cni']['pods']} sequential execs each",
        )
        (RESULTS / "add-latency.svg").write_text(chart)
    name = "latest" if list(only) == list(SECTIONS) else "only-" + "-".join(only)
    (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(r, tgts))
    print()
    for t in tgts:
        print(f"{'PASS' if t.passed else 'MISS'}  {t.line()}")
    print(f"\nwrote {RESULTS}/{name}.md, {name}.json" + (", add-latency.svg" if "cni" in r else ""))
    return 1 if r.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
