"""BIRD 2 on a node of the demo or the end-to-end tests: its configuration, and the daemon run
inside the node's network namespace.

The configuration is the one docs/bird.md explains (deploy/bird/bird.conf.example is the same for
a real node): BIRD learns the blackhole routes coild keeps in kernel table 119 (protocol 30),
announces them over iBGP to every other node with itself as next hop, and installs what the other
nodes announce into the node's main table. One session per peer and family: IPv4 blocks over the
peers' IPv4 underlay addresses, IPv6 blocks over their IPv6 ones.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from tests.harness.cluster import Proc, spawn
from tests.harness.net import Netns

BIRD = "/usr/sbin/bird"
BIRDC = "/usr/sbin/birdc"

DEFAULT_ASN = 64512
"""A private AS number (RFC 6996): every node is in the same AS, so the sessions are iBGP."""


@dataclass(frozen=True)
class Peer:
    """A node as BIRD sees it: its name and underlay addresses."""

    name: str
    ipv4: ipaddress.IPv4Address
    ipv6: ipaddress.IPv6Address

    @property
    def label(self) -> str:
        """The name made safe for a BIRD protocol name (letters, digits, underscores)."""
        return re.sub(r"[^A-Za-z0-9_]", "_", self.name)


@dataclass(frozen=True)
class BirdSettings:
    """What a node's BIRD configuration depends on besides the nodes themselves."""

    asn: int = DEFAULT_ASN
    table_id: int = 119
    """The kernel table coild exports its blocks to (coild --table-id)."""
    protocol_id: int = 30
    """The route protocol of coild's routes (coild --protocol-id)."""
    scan_time: int = 2
    """Seconds between BIRD's full rescans of the kernel tables; netlink notifications usually
    bring changes in at once, the scan is the safety net."""
    hold_time: int = 6
    """BGP hold time: a peer that stops answering is dropped, with its routes, after this long."""
    keepalive_time: int = 2


_HEAD = """\
# BIRD 2 configuration of coil node {name}.
#
# coild keeps each address block this node holds as a blackhole route of protocol
# {protocol} in kernel table {table}. BIRD learns those routes, announces them over iBGP
# to every other node with this node as next hop, and installs the blocks the other
# nodes announce into the kernel's main table.

log stderr all;
router id {ipv4};

# Interfaces and their addresses: BGP needs them to reach its peers.
protocol device {{
  scan time 10;
}}
"""

_FAMILY = """\
# {title}: coild's blocks. "learn" makes BIRD read routes other programs put into
# table {table}; only coild's (protocol {protocol}) are taken. Nothing is written there.
{family} table blocks{v};

protocol kernel coil_blocks{v} {{
  kernel table {table};
  learn;
  scan time {scan};
  {family} {{
    table blocks{v};
    import where krt_source = {protocol};
    export none;
  }};
}}

# The blocks join the main BIRD table, where the BGP sessions pick them up.
protocol pipe blocks{v}_to_master {{
  table blocks{v};
  peer table master{v};
  import none;
  export all;
}}

# The other nodes' blocks, learned over BGP, go into the kernel's main table, so that
# traffic to a remote pod leaves towards the node that holds its block.
protocol kernel main{v} {{
  scan time {scan};
  merge paths on;
  {family} {{
    import none;
    export where source = RTS_BGP;
  }};
}}
"""

_TEMPLATE = """\
# iBGP, one AS for the whole cluster. "direct": peers share a segment, so next hops
# are used as they are, without a recursive lookup. Short timers, so that a dead node's
# routes go within seconds and sessions come up quickly.
template bgp coil_node {{
  local as {asn};
  direct;
  hold time {hold};
  keepalive time {keepalive};
  connect delay time 1;
  connect retry time 2;
  error wait time 1, 10;
}}
"""

_SESSION = """\
protocol bgp {label}_{v} from coil_node {{
  local {local} as {asn};
  neighbor {remote} as {asn};
  {family} {{
    import all;
    export where proto = "coil_blocks{v}";
    next hop self;
  }};
}}
"""


def render_config(node: Peer, peers: list[Peer], settings: BirdSettings | None = None) -> str:
    """The BIRD 2 configuration of `node`, with an iBGP session per family to every other node
    of `peers` (`node` itself may be among them)."""
    s = settings or BirdSettings()
    parts = [_HEAD.format(name=node.name, protocol=s.protocol_id, table=s.table_id, ipv4=node.ipv4)]
    for family, v in (("ipv4", "4"), ("ipv6", "6")):
        parts.append(
            _FAMILY.format(
                title=f"IPv{v}",
                family=family,
                v=v,
                table=s.table_id,
                protocol=s.protocol_id,
                scan=s.scan_time,
            )
        )
    parts.append(_TEMPLATE.format(asn=s.asn, hold=s.hold_time, keepalive=s.keepalive_time))
    for peer in peers:
        if peer.name == node.name:
            continue
        parts.append(f"# Sessions to {peer.name}, one per address family.")
        for family, v, local, remote in (
            ("ipv4", "4", node.ipv4, peer.ipv4),
            ("ipv6", "6", node.ipv6, peer.ipv6),
        ):
            parts.append(
                _SESSION.format(
                    label=peer.label, v=v, local=local, remote=remote, asn=s.asn, family=family
                )
            )
    return "\n".join(parts)


def check_config(conf: Path) -> None:
    """Parse a configuration with `bird -p`; raise RuntimeError quoting BIRD's complaint."""
    proc = subprocess.run([BIRD, "-p", "-c", str(conf)], capture_output=True, text=True, timeout=10)
    if proc.returncode != 0:
        raise RuntimeError(f"bird -p -c {conf}: {proc.stderr.strip() or proc.stdout.strip()}")


@dataclass
class Bird:
    """A BIRD daemon running in a node's namespace, controlled through its socket."""

    node: Netns
    conf: Path
    socket: Path
    pidfile: Path
    proc: Proc

    def birdc(self, *args: str, timeout: float = 10) -> str:
        """Run one birdc command; returns its output, or raises RuntimeError if birdc fails.

        birdc talks to the daemon over the UNIX socket, which needs no network namespace.
        """
        proc = subprocess.run(
            [BIRDC, "-s", str(self.socket), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"birdc {' '.join(args)}: {proc.stdout}{proc.stderr}".strip())
        return proc.stdout

    def show_route(self) -> str:
        return self.birdc("show", "route")

    def established(self) -> dict[str, bool]:
        """Each BGP protocol's name and whether its session is established."""
        out = self.birdc("show", "protocols")
        sessions = {}
        for line in out.splitlines():
            fields = line.split()
            if len(fields) >= 2 and fields[1] == "BGP":
                sessions[fields[0]] = "Established" in line
        return sessions

    def stop(self) -> None:
        """Stop the daemon (SIGTERM, then SIGKILL); BIRD removes the routes it exported."""
        self.proc.stop(timeout=5)
        self.pidfile.unlink(missing_ok=True)
        self.socket.unlink(missing_ok=True)


def start_bird(node: Netns, conf: Path, workdir: Path, log: Path, timeout: float = 10) -> Bird:
    """Start BIRD in `node`'s namespace with configuration file `conf`; return once its control
    socket answers. Raises RuntimeError if it exits or does not answer within `timeout` seconds."""
    check_config(conf)
    socket = workdir / f"{conf.stem}.ctl"
    pidfile = workdir / f"{conf.stem}.pid"
    proc = spawn(
        f"bird {node.name}",
        [
            "ip",
            "netns",
            "exec",
            node.name,
            BIRD,
            "-f",
            "-c",
            str(conf),
            "-s",
            str(socket),
            "-P",
            str(pidfile),
        ],
        log,
    )
    bird = Bird(node, conf, socket, pidfile, proc)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"bird in {node.name} exited:\n{proc.tail()}")
        if socket.exists():
            try:
                bird.birdc("show", "status", timeout=2)
                return bird
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        time.sleep(0.05)
    bird.stop()
    raise RuntimeError(f"bird in {node.name} did not answer on {socket} within {timeout} s")
