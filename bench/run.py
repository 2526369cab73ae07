"""`make bench` (`python -m bench.run`): coil against the cheapest possible Python client, against
host-local, and at the limits of etcd and Kubernetes.

Writes bench/results/latest.md, latest.json and add-latency.svg; prints PASS or MISS per target.
BENCH_QUICK=1 runs a smoke version (under a minute); BENCH_ONLY=cni,agent,claims,scale,routes
runs some sections only. Needs root (network namespaces) and the CNI plugins in /usr/lib/cni.
Every process and namespace it starts is removed when it ends, also on failure or Ctrl-C."""

from __future__ import annotations

import json
import os
import platform
import signal
import traceback
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# grpc logs every fork of a process with gRPC threads at INFO (pyroute2 forks into namespaces).
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from bench import agent, claims, cni, common, routes, scale, svg  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SECTIONS = ("cni", "agent", "claims", "scale", "routes")


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
            Target("cni", "coil ADD p50 / floor ADD p50", round(coil["add_ms"]["p50"] / floor["add_ms"]["p50"], 3), 1.10, "x"),
            Target("cni", "coil DEL p50 / floor DEL p50", round(coil["del_ms"]["p50"] / floor["del_ms"]["p50"], 3), 1.10, "x"),
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
    if "agent" in r:
        top = r["agent"]["runs"][-1]
        out.append(
            Target("agent", f"coild durable allocations/s at {top['clients']} clients", top["allocations_per_s"], 2000, "/s", True)
        )
    if "claims" in r:
        for run in r["claims"]["runs"]:
            n = run["replicas"]
            ok = run["claimed"] == run["nodes"]
            out.append(
                Target("claims", f"claim storm, {n} allocator(s): all {run['nodes']} nodes hold a block", run["all_held_s"] if ok else None, 3, "s")
            )
            out.append(Target("claims", f"claim storm, {n} allocator(s): retries per claim", run["retries_per_claim"], 0.5, ""))
    if "scale" in r:
        sc = r["scale"]
        out.append(
            Target("scale", f"coilctl usage over {sc['records']} records", sc["coilctl_usage"].get("median_s"), 1, "s")
        )
        out.append(
            Target("scale", "coild ready with 110 pods", sc["coild_ready_110_pods"].get("median_s"), 1, "s")
        )
    if "routes" in r:
        out.append(Target("routes", f"{r['routes']['blocks']} routes into table 119 (fresh)", r["routes"]["fresh"]["median_s"], 1, "s"))
    return out


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def markdown(r: dict[str, Any], tgts: list[Target]) -> str:
    m = r["machine"]
    lines = [
        "# coil benchmark results",
        "",
        f"Run {r['finished']} ({'QUICK smoke run' if r['quick'] else 'full run'}), {r['duration_s']:.0f} s. "
        f"Machine: {m['nproc']} cores, {m['cpu']}, Python {m['python']}, {m['kernel']}. "
        f"Load average before/after: {m['load_before']} / {m['load_after']} "
        "(other work on the machine may have been running).",
        "",
        "## Targets",
        "",
        "| | target | measured |",
        "|---|---|---|",
    ]
    for t in tgts:
        lines.append(f"| {'PASS' if t.passed else '**MISS**'} | {t.line().split(': ', 1)[0]} | {t.line().split(': ', 1)[1]} |")
    if "cni" in r:
        c = r["cni"]
        s = c["subjects"]
        lines += [
            "",
            f"## 1. CNI plugin exec'd as IPAM ({c['pods']} pods sequential, interleaved; 16-way: "
            f"{s['coil']['parallel']['pods']} pods ADD+DEL per subject)",
            "",
            "Floor = bench/floor_plugin.py run plain (`python floor_plugin.py`: site, full imports, "
            "normal exit) against a canned server in the bench process. host-local = /usr/lib/cni/host-local.",
            "",
            "| figure | coil | floor (plain) | host-local | coil/floor | coil/host-local |",
            "|---|---|---|---|---|---|",
        ]
        for label, key, stat in (
            ("ADD p50 ms", "add_ms", "p50"),
            ("ADD p99 ms", "add_ms", "p99"),
            ("CHECK p50 ms", "check_ms", "p50"),
            ("CHECK p99 ms", "check_ms", "p99"),
            ("DEL p50 ms", "del_ms", "p50"),
            ("DEL p99 ms", "del_ms", "p99"),
        ):
            a, b, h = (s[n][key][stat] for n in ("coil", "floor", "host-local"))
            lines.append(f"| {label} | {a:.1f} | {b:.1f} | {h:.1f} | {ratio(a, b)} | {ratio(a, h)} |")
        a, b, h = (s[n]["parallel"]["ops_per_s"] for n in ("coil", "floor", "host-local"))
        lines.append(f"| 16-way ADD+DEL execs/s | {a:.1f} | {b:.1f} | {h:.1f} | {ratio(a, b)} | {ratio(a, h)} |")
        a, b, h = (s[n]["peak_rss_mb"]["add_max"] for n in ("coil", "floor", "host-local"))
        lines.append(f"| peak RSS per exec, MB | {a:.1f} | {b:.1f} | {h:.1f} | {ratio(a, b)} | {ratio(a, h)} |")
        fails = {n: s[n]["failures"] for n in s}
        lines += [
            "",
            f"Failed execs: {fails}. Peak RSS is measured under /usr/bin/time apart from the timed runs.",
            "",
            "![ADD latency CDF](add-latency.svg)",
            "",
            f"### Start-up options of the floor ({c['startup_n']} ADDs each, interleaved)",
            "",
            "| variant | ADD p50 ms | ADD p99 ms | peak RSS MB | saves vs plain floor (p50) |",
            "|---|---|---|---|---|",
        ]
        for row in c["startup"]:
            lines.append(
                f"| {row['variant']} | {row['add_ms']['p50']:.1f} | {row['add_ms']['p99']:.1f} | "
                f"{row['peak_rss_mb']:.1f} | {row['saves_ms_vs_plain_floor']:+.1f} ms |"
            )
    if "agent" in r:
        lines += [
            "",
            f"## 2. coild alone ({r['agent']['seconds_per_run']} s per run; Allocate then Release per pod, records durable in etcd)",
            "",
            "| clients | allocations/s | Allocate p50 / p99 ms | Release p50 / p99 ms | allocator RPCs per alloc+release | etcd txns per alloc+release | etcd puts per alloc+release | coild mean batch | errors |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for run in r["agent"]["runs"]:
            lines.append(
                f"| {run['clients']} | {run['allocations_per_s']:.0f} | {run['allocate_ms']['p50']:.2f} / {run['allocate_ms']['p99']:.2f} | "
                f"{run['release_ms']['p50']:.2f} / {run['release_ms']['p99']:.2f} | {run['allocator_rpcs_per_allocation']} | "
                f"{run['etcd_txns_per_allocation']} | {run['etcd_puts_per_allocation']} | {run['coild_mean_batch']} | {run['errors']} |"
            )
    if "claims" in r:
        lines += [
            "",
            "## 3. Claim storm (every node claims its first block at once)",
            "",
            "| allocators | nodes | pool | all hold a block after s | claim p50 / p99 ms | retries per claim | max retries | errors |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for run in r["claims"]["runs"]:
            lines.append(
                f"| {run['replicas']} | {run['claimed']}/{run['nodes']} | {run['pool']} | {run['all_held_s']} | "
                f"{run['claim_ms']['p50']:.0f} / {run['claim_ms']['p99']:.0f} | {run['retries_per_claim']} | {run['max_retries']} | {run['errors']} |"
            )
    if "scale" in r:
        sc = r["scale"]

        def t(key: str) -> str:
            v = sc[key]
            return f"{v['median_s']} s" if "median_s" in v else f"error: {v.get('error')}"

        lines += [
            "",
            f"## 4. Scale ({sc['nodes']} nodes holding blocks, {sc['records']} records, one node with {sc['big_node_records']} pods)",
            "",
            "| figure | value |",
            "|---|---|",
            f"| state written (domain API in-process, 8 threads) | claims {sc['claim_s']} s, records {sc['record_s']} s ({sc['records_per_s_written']}/s) |",
            f"| `coilctl usage` (wall, incl. CLI start) | {t('coilctl_usage')} |",
            f"| GetUsage RPC alone | {t('rpc_get_usage')} |",
            f"| `coilctl pool show default` | {t('coilctl_pool_show')} |",
            f"| GetPool RPC alone | {t('rpc_get_pool')} |",
            f"| `coilctl address info ADDR` | {t('coilctl_address_info')} |",
            f"| GetAddress RPC alone | {t('rpc_get_address')} |",
            f"| `coilctl version` (CLI start, no RPC) | {t('coilctl_version')} |",
            f"| coild start to ready, 110 pods | {t('coild_ready_110_pods')} (runs {sc['coild_ready_110_pods'].get('runs_s')}) |",
            f"| coil-allocator RSS after the reads | {sc['allocator_rss_mb']} MB (peak {sc['allocator_peak_rss_mb']} MB; before reads {sc['allocator_rss_mb_before_reads']} MB) |",
            f"| etcd bytes per record (db in use, growth / records) | {sc['etcd_bytes_per_record']} |",
            f"| etcd db size after | in use {sc['etcd_db_in_use_bytes_after'] / 2**20:.1f} MiB, file {sc['etcd_db_total_bytes_after'] / 2**20:.1f} MiB |",
        ]
    if "routes" in r:
        ro = r["routes"]
        lines += [
            "",
            f"## 5. Route export ({ro['blocks']} blocks, table 119, median of 3 namespaces)",
            "",
            "| case | seconds |",
            "|---|---|",
            f"| fresh namespace | {ro['fresh']['median_s']} |",
            f"| new exporter, same set (no-op) | {ro['restart_noop']['median_s']} |",
            f"| new exporter, 10% replaced | {ro['restart_10pct_changed']['median_s']} |",
            "",
            f"Checks: {ro['checks']}",
        ]
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
    }
    runners: dict[str, Callable[[common.Lab], Any]] = {
        "cni": lambda lab: cni.run(lab, lab.allocators[0][1], log),
        "agent": lambda lab: agent.run(lab, lab.allocators[0][2], log),
        "claims": lambda lab: claims.run(lab, log),
        "scale": lambda lab: scale.run(lab, log),
        "routes": lambda lab: routes.run(lab, log),
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
        {"section": t.section, "what": t.what, "measured": t.measured, "limit": t.limit, "unit": t.unit, "pass": t.passed}
        for t in tgts
    ]
    RESULTS.mkdir(exist_ok=True)
    if "cni" in r:
        raw = r["cni"]["raw_add_ms"]
        chart = svg.add_latency_cdf(
            {"coil": raw["coil"], "floor (plain Python gRPC client)": raw["floor"], "host-local (Go)": raw["host-local"]},
            f"CNI ADD latency, {r['cni']['pods']} sequential execs each",
        )
        (RESULTS / "add-latency.svg").write_text(chart)
    (RESULTS / "latest.json").write_text(json.dumps(r, indent=1) + "\n")
    (RESULTS / "latest.md").write_text(markdown(r, tgts))
    print()
    for t in tgts:
        print(f"{'PASS' if t.passed else 'MISS'}  {t.line()}")
    print(f"\nwrote {RESULTS}/latest.md, latest.json" + (", add-latency.svg" if "cni" in r else ""))
    return 1 if r.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
