"""Section 5: route export. coild's RouteExporter brings N blocks into table 119 of a fresh
namespace, then a second exporter object (as after a coild restart) syncs the same set (a no-op),
then a set with 10% of the blocks replaced. Each case is repeated in a new namespace."""

from __future__ import annotations

import ipaddress
import statistics
import time
from collections.abc import Callable
from typing import Any

from bench.common import Lab, pick
from coild.routes import RouteExporter

REPEATS = 3


def _blocks(count: int, offset: int = 0) -> list[ipaddress.IPv4Network]:
    base = int(ipaddress.ip_address("10.0.0.0"))
    return [
        ipaddress.IPv4Network(f"{ipaddress.ip_address(base + (offset + i) * 64)}/26")
        for i in range(count)
    ]


def run(lab: Lab, log: Callable[[str], None]) -> dict[str, Any]:
    count = pick(1000, 1000)
    cases: dict[str, list[float]] = {"fresh": [], "restart_noop": [], "restart_10pct_changed": []}
    checks = []
    for _ in range(REPEATS):
        ns = lab.netns()
        desired = _blocks(count)
        t0 = time.perf_counter()
        first = RouteExporter(netns=ns.name).sync(desired)
        cases["fresh"].append(time.perf_counter() - t0)
        second = RouteExporter(netns=ns.name)
        t0 = time.perf_counter()
        noop = second.sync(desired)
        cases["restart_noop"].append(time.perf_counter() - t0)
        changed = desired[: count - count // 10] + _blocks(count // 10, offset=count)
        third = RouteExporter(netns=ns.name)
        t0 = time.perf_counter()
        diff = third.sync(changed)
        cases["restart_10pct_changed"].append(time.perf_counter() - t0)
        checks.append(
            {
                "added_fresh": len(first.added),
                "noop_changed": noop.changed,
                "added": len(diff.added),
                "removed": len(diff.removed),
                "kernel_routes_after": len(ns.routes(table="119")),
            }
        )
        ns.delete()
    out: dict[str, Any] = {"blocks": count, "checks": checks[0]}
    for case, times in cases.items():
        out[case] = {
            "median_s": round(statistics.median(times), 4),
            "runs_s": [round(t, 4) for t in times],
        }
    log(
        f"  {count} routes: fresh {out['fresh']['median_s']} s, restart no-op "
        f"{out['restart_noop']['median_s']} s, "
        f"10% changed {out['restart_10pct_changed']['median_s']} s"
    )
    return out
