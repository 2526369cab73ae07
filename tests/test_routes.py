"""RouteExporter against a real kernel, each test in a network namespace of its own.

Assertions read the kernel with `ip -n NAME ... route show`, an independent view, never through
the exporter's own `current()`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Any

import pytest

from coild.errors import RouteError
from coild.routes import RouteExporter, SyncResult

Network = IPv4Network | IPv6Network


def nets(*texts: str) -> list[Network]:
    return [ip_network(text) for text in texts]


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"coiltest-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def ip_json(ns: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["ip", "-n", ns, "-j", *args], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(out) if out.strip() else []


def kernel_routes(ns: str, table: int = 119, proto: str = "30") -> list[dict[str, Any]]:
    """Routes of one table and protocol (as `ip` names it: "30", "static"), both families.

    Read from `table all`, which also works when the table does not exist (yet) for a family.
    """
    routes = []
    for family in ("-4", "-6"):
        routes += ip_json(ns, family, "route", "show", "table", "all")
    return [r for r in routes if r.get("table") == str(table) and r.get("protocol") == proto]


def dst(route: dict[str, Any]) -> Network:
    # `ip` prints a host route without its prefix length.
    return ip_network(route["dst"])


def kernel_networks(ns: str, table: int = 119, proto: str = "30") -> set[Network]:
    return {dst(route) for route in kernel_routes(ns, table, proto)}


def ip_run(ns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", ns, *args], check=True)


@pytest.mark.root
def test_sync_creates_exactly_the_blocks_as_blackholes(netns: str) -> None:
    blocks = nets("10.0.0.0/27", "10.0.0.32/27", "10.64.0.0/24", "fd00:1::/64", "fd00:2::/120")

    result = RouteExporter(netns=netns).sync(blocks)

    assert set(result.added) == set(blocks)
    assert result.removed == ()
    routes = kernel_routes(netns)
    assert sorted(map(dst, routes), key=str) == sorted(blocks, key=str)
    for route in routes:
        assert route["type"] == "blackhole", route
    # Independent of the filter: every table in the namespace, table 119 holds them with proto 30.
    everywhere = ip_json(netns, "-4", "route", "show", "table", "all")
    everywhere += ip_json(netns, "-6", "route", "show", "table", "all")
    ours = [r for r in everywhere if r.get("table") == "119"]
    assert {dst(r) for r in ours} == set(blocks)
    assert {r.get("protocol") for r in ours} == {"30"}


@pytest.mark.root
def test_resync_applies_only_the_difference_and_repeats_as_noop(netns: str) -> None:
    exporter = RouteExporter(netns=netns)
    exporter.sync(nets("10.0.0.0/27", "10.0.0.32/27", "fd00:1::/64", "fd00:2::/64"))

    result = exporter.sync(nets("10.0.0.32/27", "10.0.0.64/27", "fd00:2::/64", "fd00:3::/64"))

    assert result == SyncResult(
        added=tuple(nets("10.0.0.64/27", "fd00:3::/64")),
        removed=tuple(nets("10.0.0.0/27", "fd00:1::/64")),
    )
    assert kernel_networks(netns) == set(
        nets("10.0.0.32/27", "10.0.0.64/27", "fd00:2::/64", "fd00:3::/64")
    )

    again = exporter.sync(nets("10.0.0.32/27", "10.0.0.64/27", "fd00:2::/64", "fd00:3::/64"))

    assert again == SyncResult()
    assert not again.changed
    assert kernel_networks(netns) == set(
        nets("10.0.0.32/27", "10.0.0.64/27", "fd00:2::/64", "fd00:3::/64")
    )


@pytest.mark.root
def test_foreign_routes_are_left_alone(netns: str) -> None:
    ip_run(netns, "link", "set", "lo", "up")
    ip_run(netns, "route", "add", "blackhole", "10.9.0.0/24", "table", "119", "proto", "static")
    ip_run(netns, "route", "add", "blackhole", "10.9.1.0/24", "table", "119", "proto", "31")
    ip_run(netns, "-6", "route", "add", "blackhole", "fd09::/64", "table", "119", "proto", "31")
    ip_run(netns, "route", "add", "blackhole", "10.9.2.0/24", "proto", "30")  # main table
    ip_run(netns, "route", "add", "blackhole", "10.9.3.0/24", "table", "120", "proto", "30")
    exporter = RouteExporter(netns=netns)

    exporter.sync(nets("10.0.0.0/27", "fd00::/64"))
    cleared = exporter.clear()

    assert set(cleared.removed) == set(nets("10.0.0.0/27", "fd00::/64"))
    assert kernel_networks(netns) == set()
    assert kernel_networks(netns, proto="static") == set(nets("10.9.0.0/24"))
    assert kernel_networks(netns, proto="31") == set(nets("10.9.1.0/24", "fd09::/64"))
    main = ip_json(netns, "-4", "route", "show", "table", "main", "proto", "30")
    assert {dst(r) for r in main} == set(nets("10.9.2.0/24"))
    assert kernel_networks(netns, table=120) == set(nets("10.9.3.0/24"))


@pytest.mark.root
def test_other_table_and_protocol(netns: str) -> None:
    exporter = RouteExporter(table=200, protocol=31, netns=netns)
    ip_run(netns, "route", "add", "blackhole", "10.9.0.0/24", "table", "119", "proto", "30")

    exporter.sync(nets("10.1.0.0/26", "fd00:5::/64"))
    exporter.sync(nets("10.1.0.64/26", "fd00:5::/64"))

    assert kernel_networks(netns, table=200, proto="31") == set(nets("10.1.0.64/26", "fd00:5::/64"))
    assert kernel_networks(netns, table=119, proto="30") == set(nets("10.9.0.0/24"))


@pytest.mark.root
def test_table_above_255(netns: str) -> None:
    exporter = RouteExporter(table=1119, netns=netns)

    exporter.sync(nets("10.2.0.0/27", "fd00:6::/64"))
    result = exporter.sync(nets("10.2.0.0/27"))

    assert result == SyncResult(removed=tuple(nets("fd00:6::/64")))
    assert kernel_networks(netns, table=1119) == set(nets("10.2.0.0/27"))


@pytest.mark.root
def test_non_blackhole_route_of_ours_is_replaced(netns: str) -> None:
    ip_run(netns, "route", "add", "unreachable", "10.3.0.0/27", "table", "119", "proto", "30")
    ip_run(netns, "route", "add", "prohibit", "10.3.0.32/27", "table", "119", "proto", "30")

    result = RouteExporter(netns=netns).sync(nets("10.3.0.0/27"))

    assert result == SyncResult(
        added=tuple(nets("10.3.0.0/27")), removed=tuple(nets("10.3.0.32/27"))
    )
    routes = kernel_routes(netns)
    assert [(dst(r), r["type"]) for r in routes] == [(ip_network("10.3.0.0/27"), "blackhole")]


@pytest.mark.root
def test_thousand_blocks_then_clear(netns: str) -> None:
    v4 = [ip_network(f"10.{i // 8}.{(i % 8) * 32}.0/27") for i in range(600)]
    v6 = [ip_network(f"fd00:0:{i:x}::/64") for i in range(400)]
    exporter = RouteExporter(netns=netns)

    added = exporter.sync(v4 + v6)

    assert len(added.added) == 1000
    assert len(ip_json(netns, "-4", "route", "show", "table", "119", "proto", "30")) == 600
    assert len(ip_json(netns, "-6", "route", "show", "table", "119", "proto", "30")) == 400
    assert kernel_networks(netns) == set(v4 + v6)

    cleared = exporter.clear()

    assert len(cleared.removed) == 1000
    assert kernel_routes(netns) == []


@pytest.mark.root
def test_missing_namespace_raises_route_error_naming_it() -> None:
    name = f"coiltest-missing-{uuid.uuid4().hex[:8]}"

    with pytest.raises(RouteError, match=name):
        RouteExporter(netns=name).sync(nets("10.0.0.0/27"))

    # Entering must not have created it.
    listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True)
    assert name not in listed.stdout


@pytest.mark.root
def test_refused_route_raises_route_error_naming_it(netns: str) -> None:
    # Without CAP_NET_ADMIN the kernel refuses every change with EPERM; the dump still works.
    script = (
        "import sys\n"
        "from ipaddress import ip_network\n"
        "from coild.errors import RouteError\n"
        "from coild.routes import RouteExporter\n"
        "try:\n"
        "    RouteExporter(netns=sys.argv[1]).sync([ip_network('10.4.0.0/27')])\n"
        "except RouteError as e:\n"
        "    print(e)\n"
        "    sys.exit(3)\n"
    )
    child = subprocess.run(
        [
            "setpriv",
            "--inh-caps=-net_admin",
            "--bounding-set=-net_admin",
            sys.executable,
            "-c",
            script,
            netns,
        ],
        capture_output=True,
        text=True,
    )

    assert child.returncode == 3, child.stderr
    assert "10.4.0.0/27" in child.stdout
    assert "Operation not permitted" in child.stdout
    assert kernel_routes(netns) == []


@pytest.mark.parametrize("table", [0, 253, 254, 255, 2**32], ids=str)
def test_reserved_tables_are_refused(table: int) -> None:
    with pytest.raises(ValueError, match=str(table)):
        RouteExporter(table=table)


@pytest.mark.parametrize("protocol", [0, 2, 4, 256], ids=str)
def test_kernel_protocols_are_refused(protocol: int) -> None:
    with pytest.raises(ValueError, match=str(protocol)):
        RouteExporter(protocol=protocol)
