"""Network namespaces for tests and the demo: created with unique names, always removed.

Every namespace this module creates is named with the prefix given to `Netns` (tests use "coilt-",
the demo "coildemo-"), so `cleanup_prefix` can remove the leftovers of a run that was killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from dataclasses import dataclass
from typing import Any


def run(
    *args: str, check: bool = True, timeout: float = 30, **kw: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command; raise with its stderr when it fails and `check` is set."""
    proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


@dataclass
class Netns:
    """A network namespace with loopback up."""

    name: str

    @classmethod
    def create(cls, prefix: str) -> Netns:
        name = f"{prefix}{uuid.uuid4().hex[:8]}"
        run("ip", "netns", "add", name)
        ns = cls(name)
        ns.ip("link", "set", "lo", "up")
        return ns

    @property
    def path(self) -> str:
        return f"/var/run/netns/{self.name}"

    def ip(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("ip", "-n", self.name, *args, check=check)

    def exec(
        self, *args: str, check: bool = True, timeout: float = 30, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        return run("ip", "netns", "exec", self.name, *args, check=check, timeout=timeout, **kw)

    def sysctl(self, key: str, value: str) -> None:
        self.exec("sysctl", "-q", "-w", f"{key}={value}")

    def routes(self, table: str = "all", family: str = "") -> list[dict[str, Any]]:
        """Routes of one table ("119", "main", or "all"), of one family ("-4", "-6") or both.

        Reads `table all` and filters, because `ip -6 route show table N` fails when the table
        has no IPv6 route yet."""
        out: list[dict[str, Any]] = []
        for fam in [family] if family else ["-4", "-6"]:
            text = self.ip("-j", fam, "route", "show", "table", "all", check=False).stdout
            out += json.loads(text) if text.strip() else []
        if table == "all":
            return out
        return [r for r in out if str(r.get("table", "main")) == table]

    def addresses(self, ifname: str) -> list[str]:
        data = json.loads(self.ip("-j", "addr", "show", "dev", ifname).stdout)
        return [f"{a['local']}/{a['prefixlen']}" for d in data for a in d.get("addr_info", [])]

    def ping(self, address: str, count: int = 1, timeout: int = 2) -> bool:
        return (
            self.exec(
                "ping",
                "-n",
                "-q",
                "-c",
                str(count),
                "-W",
                str(timeout),
                address,
                check=False,
                timeout=timeout * count + 5,
            ).returncode
            == 0
        )

    def delete(self) -> None:
        # Killing what still runs inside first lets the namespace go at once.
        pids = run("ip", "netns", "pids", self.name, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)
        run("ip", "netns", "del", self.name, check=False)


def cleanup_prefix(prefix: str) -> list[str]:
    """Delete every namespace whose name starts with `prefix`; returns their names."""
    names = [
        line.split()[0]
        for line in run("ip", "netns", "list", check=False).stdout.splitlines()
        if line.startswith(prefix)
    ]
    for name in names:
        Netns(name).delete()
    return names


def link_nodes(a: Netns, b: Netns, ifa: str, ifb: str) -> None:
    """A veth pair between two namespaces."""
    tmp_a, tmp_b = f"ct{uuid.uuid4().hex[:8]}", f"ct{uuid.uuid4().hex[:8]}"
    run("ip", "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
    run("ip", "link", "set", tmp_a, "netns", a.name, "name", ifa)
    run("ip", "link", "set", tmp_b, "netns", b.name, "name", ifb)
    a.ip("link", "set", ifa, "up")
    b.ip("link", "set", ifb, "up")
