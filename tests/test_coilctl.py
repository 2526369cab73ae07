"""coilctl end to end: the installed `coilctl` script run as a subprocess against a running
allocator over a real etcd (the `allocator_addr` fixture).

Every error case checks the exit code, that stderr names the problem and quotes the input, and
that etcd is unchanged (`snapshot` before and after).
"""

from __future__ import annotations

import ipaddress
import json
import os
import pty
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest

from coil_allocator.allocator import Allocator
from coil_allocator.etcd_store import EtcdStore
from coil_core.model import Family, HeldBlock, Owner, RecordRequest
from coilctl.client import Allocator as CtlAllocator
from coilctl.config import resolve
from coilctl.errors import CtlError
from tests.conftest import snapshot, usable
from tests.harness.pki import Pki

COILCTL = Path(sys.executable).parent / "coilctl"

BLOCK_FIELDS = {"pool", "cidr", "node", "used", "capacity", "claim_revision", "claimed_at"}
RECORD_FIELDS = {"address", "pool", "block", "node", "owner", "created_at"}
OWNER_FIELDS = {"namespace", "pod", "container_id", "interface"}
POOL_FIELDS = {"name", "subnets", "block_size_bits"}
MAP_LINE = re.compile(r"^\s+(\S+/\d+)\s+([.o+#]+)$")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


Run = Callable[..., Result]


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "COILCTL_ALLOCATOR"}
    env["HOME"] = str(home)
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], stdin: Any = subprocess.DEVNULL) -> Result:
    proc = subprocess.run(
        [str(COILCTL), *args], capture_output=True, text=True, env=env, stdin=stdin, timeout=60
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def run(allocator_addr: str, home: Path) -> Run:
    """Run coilctl with --allocator pointing at the test's allocator, HOME an empty directory."""

    def run(*args: str, stdin: Any = subprocess.DEVNULL, **env: str) -> Result:
        return _run(["--allocator", allocator_addr, *args], _env(home, **env), stdin)

    return run


@pytest.fixture
def unchanged(store: EtcdStore, etcd_prefix: str) -> Callable[[], AbstractContextManager[None]]:
    """A context manager asserting that nothing under the test's prefix changed inside it."""

    @contextmanager
    def check() -> Iterator[None]:
        before = snapshot(store, etcd_prefix)
        assert before, "set up some state first, or the comparison proves little"
        yield
        assert snapshot(store, etcd_prefix) == before

    return check


def failed(result: Result, code: int, *fragments: str) -> None:
    """The command failed with `code` and one ``coilctl: ...`` line naming every fragment."""
    assert result.code == code, (result.code, result.out, result.err)
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("coilctl: "), result.err
    for fragment in fragments:
        assert fragment in last, (fragment, last)


def fill(allocator: Allocator, block: HeldBlock, count: int, tag: str = "c") -> None:
    """Record the first `count` usable addresses of `block` for pods of namespace "team"."""
    requests = [
        RecordRequest.from_strings(
            str(address),
            block.pool,
            str(block.cidr),
            Owner("team", f"pod-{i}", f"{tag}{i}", "eth0"),
        )
        for i, address in enumerate(usable(allocator, block.pool, block.cidr)[:count])
    ]
    results = allocator.record(block.node, requests)
    assert all(r.outcome.value == "recorded" for r in results), results


# -- pools ---------------------------------------------------------------------------------------


def test_pool_create_list_show(run: Run, allocator: Allocator) -> None:
    r = run("pool", "create", "default", "10.100.0.0/16", "5", "--subnet", "fd00:100::/112")
    assert r.code == 0, r.err
    assert 'pool "default": 10.100.0.0/16, fd00:100::/112' in r.out
    assert [p.name for p in allocator.list_pools()] == ["default"]

    created = run("pool", "create", "team-a", "10.101.0.0/24", "2", "-o", "json").json()
    assert created == {
        "pool": {"name": "team-a", "subnets": ["10.101.0.0/24"], "block_size_bits": 2}
    }

    listed = run("pool", "list")
    assert listed.code == 0
    lines = listed.out.splitlines()
    assert lines[0].split() == ["NAME", "BLOCK", "SIZE", "SUBNETS"]
    assert lines[1].split() == ["default", "2^5", "10.100.0.0/16,", "fd00:100::/112"]
    assert lines[2].split() == ["team-a", "2^2", "10.101.0.0/24"]

    pools = run("pool", "list", "-o", "json").json()
    assert list(pools) == ["pools"]
    assert [set(p) for p in pools["pools"]] == [POOL_FIELDS, POOL_FIELDS]
    assert pools["pools"][0] == {
        "name": "default",
        "subnets": ["10.100.0.0/16", "fd00:100::/112"],
        "block_size_bits": 5,
    }

    shown = run("pool", "show", "default", "-o", "json").json()
    assert set(shown) == {"pool", "subnets"}
    assert shown["pool"]["subnets"] == ["10.100.0.0/16", "fd00:100::/112"]
    assert [(s["subnet"], s["total_blocks"], s["held"]) for s in shown["subnets"]] == [
        ("10.100.0.0/16", 2048, []),
        ("fd00:100::/112", 2048, []),
    ]


def test_global_options_after_the_command(run: Run, allocator_addr: str, home: Path) -> None:
    assert run("pool", "create", "default", "10.0.0.0/24", "2").code == 0
    r = _run(["pool", "list", "--allocator", allocator_addr, "--timeout", "5"], _env(home))
    assert r.code == 0, r.err
    assert "default" in r.out


@pytest.fixture
def existing_pool(allocator: Allocator) -> None:
    allocator.create_pool("existing", ["10.1.0.0/16"], 4)


@pytest.mark.parametrize(
    ("args", "code", "fragments"),
    [
        (["p", "10.0.0/16", "4"], 1, ['"10.0.0/16"', "not an IPv4 or IPv6 address"]),
        (["p", "banana", "4"], 1, ['"banana"', "not a CIDR"]),
        (["p", "10.9.0.0", "4"], 1, ['"10.9.0.0"', "missing prefix length"]),
        (["p", "10.0.0.1/16", "4"], 1, ['"10.0.0.1/16"', "host bits set", '"10.0.0.0/16"']),
        (["p", "10.9.0.0/24", "9"], 1, ['"10.9.0.0/24"', "2^9", "larger than subnet"]),
        (["p", "10.0.0.0/8", "17"], 1, ["2^17", "too large"]),
        (["p", "10.9.0.0/24", "-1"], 2, ['pool create "p"', '"-1"', "negative"]),
        (["p", "10.9.0.0/24", "four"], 2, ['pool create "p"', '"four"', "not a whole number"]),
        (["p", "10.9.0.0/24", str(2**32)], 2, [f'"{2**32}"', "out of range"]),
        (["Bad_Name", "10.9.0.0/24", "4"], 1, ['"Bad_Name"', "not a valid namespace name"]),
        (
            ["p", "10.1.128.0/24", "4"],
            1,
            ['"10.1.128.0/24"', "overlaps", '"10.1.0.0/16"', 'pool "existing"'],
        ),
        (
            ["p", "10.9.0.0/24", "4", "--subnet", "10.9.0.128/25"],
            1,
            ['"10.9.0.0/24"', '"10.9.0.128/25"', "overlap"],
        ),
        (["existing", "10.9.0.0/24", "4"], 1, ['"existing"', "a pool of that name exists"]),
    ],
    ids=[
        "malformed-subnet",
        "not-a-cidr",
        "no-prefix-length",
        "host-bits-set",
        "block-larger-than-subnet",
        "block-over-2^16",
        "negative-size",
        "size-not-a-number",
        "size-beyond-uint32",
        "invalid-name",
        "overlaps-another-pool",
        "overlapping-own-subnets",
        "duplicate-pool",
    ],
)
def test_pool_create_errors(
    run: Run,
    unchanged: Callable[[], AbstractContextManager[None]],
    existing_pool: None,
    args: list[str],
    code: int,
    fragments: list[str],
) -> None:
    with unchanged():
        failed(run("pool", "create", *args), code, *fragments)


def test_pool_create_usage_errors(run: Run, home: Path) -> None:
    r = run("pool", "create", "p", "10.0.0.0/24")
    failed(r, 2, "pool create", "SIZE")
    assert r.err.startswith("usage: coilctl pool create")
    failed(run("pool", "frobnicate"), 2, "pool", "frobnicate")
    failed(run("launch"), 2, "launch")


def test_pool_add_subnet(run: Run, allocator: Allocator, existing_pool: None) -> None:
    r = run("pool", "add-subnet", "existing", "fd00:1::/112")
    assert r.code == 0, r.err
    assert "10.1.0.0/16, fd00:1::/112" in r.out
    doc = run("pool", "add-subnet", "existing", "10.2.0.0/24", "-o", "json").json()
    assert doc["pool"]["subnets"] == ["10.1.0.0/16", "fd00:1::/112", "10.2.0.0/24"]
    assert [str(s) for s in allocator.list_pools()[0].subnets] == doc["pool"]["subnets"]


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["missing", "10.9.0.0/24"], ['"missing"', "no such pool"]),
        (["existing", "10.1.2.0/24"], ['"10.1.2.0/24"', "overlaps", '"10.1.0.0/16"']),
        (["existing", "10.9.0.1/24"], ['"10.9.0.1/24"', "host bits set"]),
        (["existing", "10.9.0.0/30"], ['"10.9.0.0/30"', "larger than subnet"]),
    ],
    ids=["unknown-pool", "overlap", "host-bits-set", "smaller-than-a-block"],
)
def test_pool_add_subnet_errors(
    run: Run,
    unchanged: Callable[[], AbstractContextManager[None]],
    existing_pool: None,
    args: list[str],
    fragments: list[str],
) -> None:
    with unchanged():
        failed(run("pool", "add-subnet", *args), 1, *fragments)


def test_pool_delete(run: Run, allocator: Allocator, existing_pool: None) -> None:
    allocator.create_pool("other", ["10.2.0.0/24"], 2)
    r = run("pool", "delete", "existing")
    assert r.code == 0, r.err
    assert 'deleted pool "existing"' in r.out
    assert [p.name for p in allocator.list_pools()] == ["other"]


def test_pool_delete_errors(
    run: Run,
    allocator: Allocator,
    unchanged: Callable[[], AbstractContextManager[None]],
    existing_pool: None,
) -> None:
    allocator.claim_block("node-1", "existing", Family.IPV4)
    with unchanged():
        failed(run("pool", "delete", "existing"), 1, '"existing"', "held", "node-1")
        failed(run("pool", "delete", "missing"), 1, '"missing"', "no such pool")
        failed(run("pool", "delete", "Bad_Name"), 1, '"Bad_Name"', "not a valid namespace name")


# -- pool show and the block map -----------------------------------------------------------------


def _map(out: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for line in out.splitlines() if (m := MAP_LINE.match(line))]


def test_pool_show_draws_the_block_map(run: Run, allocator: Allocator) -> None:
    # 10.0.0.0/22 in blocks of 4 addresses: 256 blocks, 4 lines of 64.
    allocator.create_pool("default", ["10.0.0.0/22", "fd00::/120"], 2)
    # Blocks away from the subnet's reserved first and last addresses, so "full" can be full.
    full = allocator.claim_specific_block("node-1", "default", "10.0.1.0/30")
    partly = allocator.claim_specific_block("node-1", "default", "10.0.1.4/30")
    empty = allocator.claim_specific_block("node-2", "default", "10.0.2.0/30")
    v6, _ = allocator.claim_block("node-2", "default", Family.IPV6)
    fill(allocator, full, 4, "f")
    fill(allocator, partly, 1, "p")

    r = run("pool", "show", "default", "10.0.0.0/22")
    assert r.code == 0, r.err
    assert "subnet 10.0.0.0/22: 256 blocks, 3 held, 253 free" in r.out
    assert "fd00::/120" not in r.out.split("\n", 1)[1], "only the subnet asked for"
    rows = {line.split()[0]: line.split()[1:] for line in r.out.splitlines() if "node-" in line}
    assert rows == {
        str(full.cidr): ["node-1", "4/4"],
        str(partly.cidr): ["node-1", "1/4"],
        str(empty.cidr): ["node-2", "0/4"],
    }
    drawn = _map(r.out)
    assert [label for label, _ in drawn] == [
        "10.0.0.0/30",
        "10.0.1.0/30",
        "10.0.2.0/30",
        "10.0.3.0/30",
    ]
    assert [len(cells) for _, cells in drawn] == [64, 64, 64, 64]
    cells = "".join(c for _, c in drawn)
    assert (cells.count("#"), cells.count("+"), cells.count("o"), cells.count(".")) == (
        1,
        1,
        1,
        253,
    )
    base = int(ipaddress.ip_network("10.0.0.0/22").network_address)
    for block, char in ((full, "#"), (partly, "+"), (empty, "o")):
        assert cells[(int(block.cidr.network_address) - base) >> 2] == char
    assert "legend: . free  o held, empty  + held, partly used  # held, full" in r.out

    both = run("pool", "show", "default")
    assert "subnet fd00::/120: 64 blocks, 1 held, 63 free" in both.out
    v6_cells = "".join(c for label, c in _map(both.out) if ":" in label)
    assert len(v6_cells) == 64
    assert (
        v6_cells.index("o")
        == (int(v6.cidr.network_address) - int(ipaddress.ip_address("fd00::"))) >> 2
    )
    assert v6_cells.count(".") == 63

    doc = run("pool", "show", "default", "-o", "json").json()
    assert doc["pool"] == {
        "name": "default",
        "subnets": ["10.0.0.0/22", "fd00::/120"],
        "block_size_bits": 2,
    }
    v4 = doc["subnets"][0]
    assert set(v4) == {"subnet", "total_blocks", "held"}
    assert (v4["subnet"], v4["total_blocks"]) == ("10.0.0.0/22", 256)
    assert all(set(b) == BLOCK_FIELDS for b in v4["held"])
    assert {b["cidr"]: (b["node"], b["used"], b["capacity"]) for b in v4["held"]} == {
        str(full.cidr): ("node-1", 4, 4),
        str(partly.cidr): ("node-1", 1, 4),
        str(empty.cidr): ("node-2", 0, 4),
    }


def test_pool_show_summarizes_large_subnets(run: Run, allocator: Allocator) -> None:
    allocator.create_pool("wide", ["10.0.0.0/16"], 0)  # 65536 one-address blocks
    held = allocator.claim_specific_block("node-1", "wide", "10.0.5.5/32")
    allocator.claim_specific_block("node-1", "wide", "10.0.5.6/32")
    fill(allocator, held, 1)
    r = run("pool", "show", "wide")
    assert r.code == 0, r.err
    assert _map(r.out) == []
    assert "map not drawn (65536 blocks" in r.out
    assert "# 1 full, + 0 partly used, o 1 empty, . 65534 free" in r.out


def test_pool_show_errors(
    run: Run, unchanged: Callable[[], AbstractContextManager[None]], existing_pool: None
) -> None:
    with unchanged():
        failed(run("pool", "show", "missing"), 1, '"missing"', "no such pool")
        failed(run("pool", "show", "existing", "10.9.0.0/24"), 1, '"10.9.0.0/24"', "not one of the")
        failed(run("pool", "show", "existing", "10.9.0.1/24"), 1, '"10.9.0.1/24"', "host bits")


# -- nodes ---------------------------------------------------------------------------------------


def test_node_blocks(run: Run, allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.0.0.0/24"], 2)
    # Blocks clear of the subnet's reserved addresses, so each offers all 4 addresses.
    a = allocator.claim_specific_block("node-1", "default", "10.0.0.16/30")
    b = allocator.claim_specific_block("node-1", "default", "10.0.0.20/30")
    allocator.claim_specific_block("node-2", "default", "10.0.0.32/30")
    fill(allocator, a, 2)

    r = run("node", "blocks", "node-1")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["POOL", "BLOCK", "USED", "CLAIMED"]
    got = {line.split()[1]: line.split()[2] for line in lines[1:]}
    assert got == {str(a.cidr): "2/4", str(b.cidr): "0/4"}
    assert all(re.search(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", line) for line in lines[1:])

    with_records = run("node", "blocks", "node-1", "--records")
    assert f"{a.cidr.network_address}  default" in with_records.out
    assert "pod-0" in with_records.out and "pod-1" in with_records.out

    doc = run("node", "blocks", "node-1", "--records", "-o", "json").json()
    assert set(doc) == {"blocks", "records", "revision"}
    assert doc["revision"] > 0
    assert all(set(x) == BLOCK_FIELDS for x in doc["blocks"])
    assert {x["cidr"]: x["used"] for x in doc["blocks"]} == {str(a.cidr): 2, str(b.cidr): 0}
    assert all(x["node"] == "node-1" and x["claimed_at"] > 0 for x in doc["blocks"])
    assert [set(x) for x in doc["records"]] == [RECORD_FIELDS, RECORD_FIELDS]
    assert set(doc["records"][0]["owner"]) == OWNER_FIELDS
    assert sorted(x["address"] for x in doc["records"]) == [str(h) for h in list(a.cidr)[:2]]

    nothing = run("node", "blocks", "node-9")
    assert (nothing.code, nothing.out.strip()) == (0, 'node "node-9" holds no block')
    assert run("node", "blocks", "node-9", "-o", "json").json()["blocks"] == []


def test_node_blocks_records_beyond_the_receive_limit_are_paged(
    run: Run, allocator: Allocator
) -> None:
    """Before: above about 10k records the one answer exceeded gRPC's 4 MiB receive limit."""
    allocator.create_pool("default", ["10.64.0.0/18"], 8)
    blocks = [allocator.claim_block("node-1", "default")[0] for _ in range(40)]
    long = "p" * 200  # long pod names and container IDs, as some runtimes make them
    items = [
        RecordRequest.from_strings(
            str(address),
            "default",
            str(block.cidr),
            Owner("default", f"{long}-{i}-{n}", f"{long}{i:03d}{n:03d}", "eth0"),
        )
        for i, block in enumerate(blocks)
        for n, address in enumerate(usable(allocator, "default", block.cidr)[:250])
    ]
    for start in range(0, len(items), 1000):
        results = allocator.record("node-1", items[start : start + 1000])
        assert {r.outcome.value for r in results} == {"recorded"}
    r = run("node", "blocks", "node-1", "--records", "-o", "json")
    assert r.code == 0, r.err[-500:]
    doc = r.json()
    assert len(doc["records"]) == 10_000
    assert len({x["address"] for x in doc["records"]}) == 10_000
    assert sum(b["used"] for b in doc["blocks"]) == 10_000
    stamps = [(x["created_at"], ipaddress.ip_address(x["address"])) for x in doc["records"]]
    assert stamps == sorted(stamps)  # oldest first, as one answer was


def test_node_blocks_invalid_name(
    run: Run, unchanged: Callable[[], AbstractContextManager[None]], existing_pool: None
) -> None:
    with unchanged():
        failed(run("node", "blocks", "Node_1"), 1, '"Node_1"', "not a valid node name")


@pytest.fixture
def tiny_pool_held(allocator: Allocator) -> list[HeldBlock]:
    """A pool of 4 blocks, all held by node-1, two with addresses recorded."""
    allocator.create_pool("tiny", ["10.0.0.0/28"], 2)
    blocks = [allocator.claim_block("node-1", "tiny", Family.IPV4)[0] for _ in range(4)]
    # The middle blocks: the first and last hold the subnet's reserved addresses.
    middle = sorted(blocks, key=lambda b: b.cidr)[1:3]
    fill(allocator, middle[0], 3, "a")
    fill(allocator, middle[1], 1, "b")
    return blocks


def test_node_release_yes(run: Run, allocator: Allocator, tiny_pool_held: list[HeldBlock]) -> None:
    doc = run("node", "release", "node-1", "--yes", "-o", "json").json()
    assert set(doc) == {"blocks", "records_removed"}
    assert doc["records_removed"] == 4
    assert sorted(b["cidr"] for b in doc["blocks"]) == sorted(str(b.cidr) for b in tiny_pool_held)
    assert all(set(b) == BLOCK_FIELDS for b in doc["blocks"])

    empty = run("node", "blocks", "node-1")
    assert (empty.code, empty.out.strip()) == (0, 'node "node-1" holds no block')
    assert run("node", "blocks", "node-1", "-o", "json").json()["blocks"] == []
    # Every block of the pool is free again.
    again = {str(allocator.claim_block("node-2", "tiny", Family.IPV4)[0].cidr) for _ in range(4)}
    assert again == {str(b.cidr) for b in tiny_pool_held}
    info = run("address", "info", "10.0.0.1", "-o", "json").json()
    assert info["record"] is None


def test_node_release_table(run: Run, tiny_pool_held: list[HeldBlock]) -> None:
    r = run("node", "release", "node-1", "-y")
    assert r.code == 0, r.err
    assert r.out.startswith('node "node-1": released 4 block(s) and 4 address record(s)')


def test_node_release_without_tty_refuses(
    run: Run, unchanged: Callable[[], AbstractContextManager[None]], tiny_pool_held: list[HeldBlock]
) -> None:
    with unchanged():
        failed(run("node", "release", "node-1"), 2, 'node release "node-1"', "pass --yes")
        # An answer on a pipe is not a confirmation either.
        failed(run("node", "release", "node-1", stdin=None), 2, "pass --yes")


def _run_on_tty(run_args: list[str], env: dict[str, str], answer: str) -> Result:
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode())
        proc = subprocess.run(
            [str(COILCTL), *run_args],
            stdin=terminal,
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        )
    finally:
        os.close(terminal)
        os.close(controller)
    assert "Traceback" not in proc.stderr
    return Result(proc.returncode, proc.stdout, proc.stderr)


def test_node_release_asks_on_a_tty(
    allocator_addr: str,
    home: Path,
    allocator: Allocator,
    unchanged: Callable[[], AbstractContextManager[None]],
    tiny_pool_held: list[HeldBlock],
) -> None:
    args = ["--allocator", allocator_addr, "node", "release", "node-1"]
    with unchanged():
        no = _run_on_tty(args, _env(home), "n\n")
        failed(no, 1, 'node release "node-1"', "not confirmed")
        assert 'Release every block and address of node "node-1"? [y/N]' in no.err
    yes = _run_on_tty(args, _env(home), "y\n")
    assert yes.code == 0, yes.err
    assert allocator.node_blocks("node-1")[0] == []


def test_node_release_errors(
    run: Run, unchanged: Callable[[], AbstractContextManager[None]], existing_pool: None
) -> None:
    with unchanged():
        failed(run("node", "release", "ghost", "--yes"), 1, '"ghost"', "holds no block")
        failed(run("node", "release", "Gh_ost", "--yes"), 1, '"Gh_ost"', "not a valid node name")


# -- addresses -----------------------------------------------------------------------------------


@pytest.fixture
def one_address(allocator: Allocator) -> HeldBlock:
    allocator.create_pool("default", ["10.0.0.0/24"], 2)
    # A block away from the subnet's reserved addresses: its first address is recordable.
    block = allocator.claim_specific_block("node-1", "default", "10.0.0.8/30")
    fill(allocator, block, 1)
    return block


def test_address_info(run: Run, one_address: HeldBlock) -> None:
    address = str(one_address.cidr.network_address)
    r = run("address", "info", address)
    assert r.code == 0, r.err
    fields = dict(line.split(":  ", 1) for line in r.out.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    assert fields["address"] == address
    assert fields["pool"] == "default"
    assert fields["block"] == str(one_address.cidr)
    assert fields["node"] == "node-1"
    assert (fields["namespace"], fields["pod"]) == ("team", "pod-0")
    assert (fields["container"], fields["interface"]) == ("c0", "eth0")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["created"])

    doc = run("address", "info", address, "-o", "json").json()
    assert set(doc) == {"pool", "block", "node", "record"}
    assert (doc["pool"], doc["block"], doc["node"]) == ("default", str(one_address.cidr), "node-1")
    assert set(doc["record"]) == RECORD_FIELDS
    assert doc["record"]["owner"] == {
        "namespace": "team",
        "pod": "pod-0",
        "container_id": "c0",
        "interface": "eth0",
    }

    unused = str(list(one_address.cidr)[3])
    assert "allocated:  no" in run("address", "info", unused).out
    assert run("address", "info", unused, "-o", "json").json()["record"] is None

    elsewhere = (
        "10.0.0.5"
        if one_address.cidr.network_address == ipaddress.ip_address("10.0.0.0")
        else "10.0.0.1"
    )
    in_free_block = run("address", "info", elsewhere, "-o", "json").json()
    assert (in_free_block["node"], in_free_block["record"]) == ("", None)
    assert "- (the block is free)" in run("address", "info", elsewhere).out


def test_address_info_errors(
    run: Run, unchanged: Callable[[], AbstractContextManager[None]], one_address: HeldBlock
) -> None:
    with unchanged():
        failed(run("address", "info", "192.168.1.1"), 1, '"192.168.1.1"', "in no pool")
        failed(run("address", "info", "10.0.0.0/24"), 1, '"10.0.0.0/24"', "not an IP address")


def test_address_free(run: Run, allocator: Allocator, one_address: HeldBlock) -> None:
    address = str(one_address.cidr.network_address)
    doc = run("address", "free", address, "--yes", "-o", "json").json()
    assert set(doc) == {"record"}
    assert set(doc["record"]) == RECORD_FIELDS
    assert doc["record"]["address"] == address
    assert allocator.address_info(address).record is None
    # The block stays held by the node: only the record went.
    assert allocator.address_info(address).node == "node-1"

    fill(allocator, one_address, 1)
    r = run("address", "free", address, "-y")
    assert r.code == 0, r.err
    assert f'address "{address}" freed' in r.out and "team/pod-0" in r.out


def test_address_free_errors(
    run: Run, unchanged: Callable[[], AbstractContextManager[None]], one_address: HeldBlock
) -> None:
    unused = str(list(one_address.cidr)[2])
    with unchanged():
        failed(run("address", "free", unused, "--yes"), 1, f'"{unused}"', "not allocated")
        failed(run("address", "free", "192.168.1.1", "--yes"), 1, '"192.168.1.1"', "not allocated")
        failed(run("address", "free", "nope", "--yes"), 1, '"nope"', "not an IP address")
        taken = str(one_address.cidr.network_address)
        failed(run("address", "free", taken), 2, f'address free "{taken}"', "pass --yes")


# -- usage ---------------------------------------------------------------------------------------


def test_usage(run: Run, allocator: Allocator) -> None:
    allocator.create_pool("default", ["10.0.0.0/22", "fd00::/120"], 2)
    allocator.create_pool("idle", ["10.9.0.0/24"], 4)
    blocks = [
        allocator.claim_specific_block("node-1", "default", cidr)
        for cidr in ("10.0.1.0/30", "10.0.1.4/30", "10.0.2.0/30")
    ]
    fill(allocator, blocks[0], 4, "a")
    fill(allocator, blocks[1], 1, "b")

    # Address totals count what pods can get: each subnet less its network address and
    # gateway, and in IPv4 its broadcast address.
    r = run("usage")
    assert r.code == 0, r.err
    rows = [line.split() for line in r.out.splitlines()]
    assert rows == [
        ["POOL", "FAMILY", "BLOCKS", "HELD", "ADDRESSES", "USED"],
        ["default", "IPv4", "3/256", "1.2%", "5/1021", "0.5%"],
        ["default", "IPv6", "0/64", "0.0%", "0/254", "0.0%"],
        ["idle", "IPv4", "0/16", "0.0%", "0/253", "0.0%"],
    ]

    doc = run("usage", "-o", "json").json()
    assert doc["usage"][0] == {
        "pool": "default",
        "family": "FAMILY_IPV4",
        "blocks_held": 3,
        "blocks_total": 256,
        "addresses_used": 5,
        "addresses_total": 1021,
    }
    assert [(u["pool"], u["family"]) for u in doc["usage"]] == [
        ("default", "FAMILY_IPV4"),
        ("default", "FAMILY_IPV6"),
        ("idle", "FAMILY_IPV4"),
    ]


# -- arguments checked before connecting --------------------------------------------------------

# Bad arguments of every command that takes any, with a fragment of the rule's message, and the
# same request sent straight to the allocator through coilctl's client (no local check).
BAD_ARGUMENTS: list[tuple[list[str], str, Callable[[CtlAllocator], object]]] = [
    (
        ["pool", "create", "Bad_Name", "10.9.0.0/24", "4"],
        "not a valid namespace name",
        lambda a: a.create_pool("Bad_Name", ["10.9.0.0/24"], 4),
    ),
    (
        ["pool", "create", "p", "10.9.0.1/24", "4"],
        "host bits set",
        lambda a: a.create_pool("p", ["10.9.0.1/24"], 4),
    ),
    (
        ["pool", "create", "p", "127.0.0.0/24", "4"],
        "loopback range",
        lambda a: a.create_pool("p", ["127.0.0.0/24"], 4),
    ),
    (
        ["pool", "create", "p", "10.9.0.0/24", "9"],
        "larger than subnet",
        lambda a: a.create_pool("p", ["10.9.0.0/24"], 9),
    ),
    (
        ["pool", "create", "p", "10.9.0.0/24", "4", "--subnet", "fe80::/64"],
        "link-local range",
        lambda a: a.create_pool("p", ["10.9.0.0/24", "fe80::/64"], 4),
    ),
    (
        ["pool", "create", "p", "10.9.0.0/24", "4", "--subnet", "10.9.0.128/25"],
        "overlap",
        lambda a: a.create_pool("p", ["10.9.0.0/24", "10.9.0.128/25"], 4),
    ),
    (
        ["pool", "add-subnet", "existing", "ff00::/64"],
        "multicast range",
        lambda a: a.add_subnet("existing", "ff00::/64"),
    ),
    (
        ["pool", "add-subnet", "Existing", "10.9.0.0/24"],
        "not a valid namespace name",
        lambda a: a.add_subnet("Existing", "10.9.0.0/24"),
    ),
    (
        ["pool", "show", "missing", "10.9.0.1/24"],
        "host bits set",
        lambda a: a.get_pool("missing", "10.9.0.1/24"),
    ),
    (
        ["pool", "show", "x-"],
        "not a valid namespace name",
        lambda a: a.get_pool("x-", ""),
    ),
    (
        ["pool", "delete", "Bad_Name"],
        "not a valid namespace name",
        lambda a: a.delete_pool("Bad_Name"),
    ),
    (
        ["node", "blocks", "Node_1"],
        "not a valid node name",
        lambda a: a.node_blocks("Node_1", False),
    ),
    (
        ["node", "release", "Gh_ost", "--yes"],
        "not a valid node name",
        lambda a: a.release_node("Gh_ost"),
    ),
    (
        ["address", "info", "10.0.0.0/24"],
        "not an IP address",
        lambda a: a.get_address("10.0.0.0/24"),
    ),
    (
        ["address", "free", "fe80::1%eth0", "--yes"],
        "scoped (link-local) address",
        lambda a: a.free_address("fe80::1%eth0"),
    ),
]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [(args, fragment) for args, fragment, _ in BAD_ARGUMENTS],
    ids=[f"{args[0]}-{args[1]}-{fragment}" for args, fragment, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_are_refused_without_an_allocator(
    home: Path, tmp_path: Path, args: list[str], fragment: str
) -> None:
    # Nothing listens at the address: a refusal that needed the allocator would be exit 3.
    address = f"unix:{tmp_path}/nobody.sock"
    r = _run(["--allocator", address, *args], _env(home))
    failed(r, 1, fragment, f"{' '.join(args[:2])} ")
    assert "cannot reach" not in r.err
    assert r.out == ""


@pytest.mark.parametrize(
    ("args", "send"),
    [(args, send) for args, _, send in BAD_ARGUMENTS],
    ids=[f"{args[0]}-{args[1]}-{fragment}" for args, fragment, _ in BAD_ARGUMENTS],
)
def test_bad_arguments_get_the_allocators_own_answer(
    allocator_addr: str,
    home: Path,
    tmp_path: Path,
    unchanged: Callable[[], AbstractContextManager[None]],
    existing_pool: None,
    args: list[str],
    send: Callable[[CtlAllocator], object],
) -> None:
    """The local refusal is exactly what the allocator answers to the same request."""
    settings = resolve(
        allocator=allocator_addr,
        timeout="10",
        tls_ca=None,
        tls_cert=None,
        tls_key=None,
        environ={},
        home=home,
    )
    with unchanged():
        with CtlAllocator(settings) as client, pytest.raises(CtlError) as refused:
            send(client)
        local = _run(["--allocator", f"unix:{tmp_path}/nobody.sock", *args], _env(home))
    assert (local.code, local.err) == (
        refused.value.exit_code,
        f"coilctl: {refused.value.message}\n",
    )


def test_node_release_checks_the_name_before_asking(home: Path, tmp_path: Path) -> None:
    # No terminal and no --yes: the bad name is reported, not the missing confirmation.
    r = _run(
        ["--allocator", f"unix:{tmp_path}/nobody.sock", "node", "release", "Gh_ost"], _env(home)
    )
    failed(r, 1, 'node release node "Gh_ost"', "not a valid node name")


def test_coil_core_is_loaded_only_to_check_arguments(home: Path, tmp_path: Path) -> None:
    nobody = f"unix:{tmp_path}/nobody.sock"
    probe = (
        "import sys\nfrom coilctl.main import main\n"
        "assert main(['completion', 'bash']) == 0\nassert main(['version']) == 0\n"
        f"assert main(['--allocator', {nobody!r}, '--timeout', '1', 'pool', 'list']) == 3\n"
        "assert 'coil_core' not in sys.modules\n"
        f"assert main(['--allocator', {nobody!r}, 'pool', 'delete', 'Bad_Name']) == 1\n"
        "assert 'coil_core' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, env=_env(home))


# -- where the allocator is ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["pool", "list"],
        ["pool", "create", "p", "10.0.0.0/24", "2"],
        ["node", "release", "node-1", "--yes"],
        ["usage", "-o", "json"],
    ],
    ids=lambda a: "-".join(a[:2]),
)
def test_unreachable_allocator(home: Path, tmp_path: Path, args: list[str]) -> None:
    address = f"unix:{tmp_path}/nobody.sock"
    r = _run(["--allocator", address, *args], _env(home))
    failed(r, 3, "cannot reach the allocator", f'"{address}"')
    assert r.out == ""


def test_unreachable_from_environment_names_the_source(home: Path, tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/nobody.sock"
    r = _run(["usage"], _env(home, COILCTL_ALLOCATOR=address))
    failed(r, 3, f'"{address}"', "$COILCTL_ALLOCATOR")


def test_silent_allocator_times_out(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(8)  # accepts connections, never speaks HTTP/2
        r = _run(["--allocator", f"unix:{path}", "--timeout", "0.5", "pool", "list"], _env(home))
    failed(r, 3, f'"unix:{path}"', "did not answer within 0.5s")


def test_allocator_from_environment(
    allocator_addr: str, home: Path, tmp_path: Path, existing_pool: None
) -> None:
    r = _run(["pool", "list"], _env(home, COILCTL_ALLOCATOR=allocator_addr))
    assert r.code == 0, r.err
    assert "existing" in r.out
    # The flag wins over the environment.
    r = _run(
        ["--allocator", allocator_addr, "pool", "list"],
        _env(home, COILCTL_ALLOCATOR=f"unix:{tmp_path}/nobody.sock"),
    )
    assert r.code == 0, r.err


def test_allocator_from_config_file(
    allocator_addr: str, home: Path, tmp_path: Path, existing_pool: None
) -> None:
    (home / ".coilctl.yaml").write_text(
        f"# coilctl settings\nallocator: {allocator_addr}  # the test's allocator\n\ntimeout: '5'\n"
    )
    r = _run(["pool", "list"], _env(home))
    assert r.code == 0, r.err
    assert "existing" in r.out
    # The environment wins over the file.
    r = _run(["pool", "list"], _env(home, COILCTL_ALLOCATOR=f"unix:{tmp_path}/nobody.sock"))
    failed(r, 3, "nobody.sock")


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("allocator: 127.0.0.1:1\nallocater: x\n", [":2:", 'unknown key "allocater"']),
        ("just words\n", [":1:", 'expected "key: value"', '"just words"']),
        ("allocator: a:1\nallocator: b:2\n", [":2:", '"allocator" is repeated']),
        ("allocator:\n", [":1:", '"allocator" has no value']),
        ("timeout: soon\n", ['timeout "soon"', "positive number"]),
        ("allocator: nowhere\n", ['"nowhere"', 'expected "host:port" or "unix:PATH"']),
        ("tls-cert: /c.pem\n", ["--tls-cert and --tls-key"]),
    ],
    ids=["unknown-key", "no-colon", "repeated", "empty", "bad-timeout", "bad-address", "half-tls"],
)
def test_config_file_errors(home: Path, text: str, fragments: list[str]) -> None:
    (home / ".coilctl.yaml").write_text(text)
    r = _run(["pool", "list"], _env(home))
    failed(r, 2, *fragments)
    if ":1:" in fragments or ":2:" in fragments:
        assert str(home / ".coilctl.yaml") in r.err


def test_bad_flags(home: Path) -> None:
    failed(_run(["--allocator", "nowhere", "usage"], _env(home)), 2, '"nowhere"', "--allocator")
    failed(_run(["--timeout", "-1", "usage"], _env(home)), 2, 'timeout "-1"')
    failed(_run(["--tls-ca", "/nonexistent/ca.pem", "usage"], _env(home)), 2, "/nonexistent")


def test_default_address(home: Path) -> None:
    """The default is the allocator's default: its root-only UNIX socket."""
    if os.path.exists("/run/coil/allocator.sock"):
        pytest.skip("an allocator serves /run/coil/allocator.sock")
    failed(_run(["usage"], _env(home)), 3, '"unix:/run/coil/allocator.sock"', "(from default)")


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost and an operator's client certificate."""
    pki = Pki(tmp_path / "tls")
    ca = pki.ca("test-ca")
    server = pki.issue(ca, "localhost", server=True)
    operator = pki.operator(ca, "alice")
    viewer = pki.viewer(ca, "bob")
    return {
        "ca.pem": ca.cert,
        "server.pem": server.cert,
        "server.key": server.key,
        "alice.pem": operator.cert,
        "alice.key": operator.key,
        "bob.pem": viewer.cert,
        "bob.key": viewer.key,
    }


def test_tls(allocator: Allocator, home: Path, tls_files: dict[str, Path]) -> None:
    import grpc

    from coil_allocator.servicer import serve

    credentials = grpc.ssl_server_credentials(
        [(tls_files["server.key"].read_bytes(), tls_files["server.pem"].read_bytes())],
        root_certificates=tls_files["ca.pem"].read_bytes(),
        require_client_auth=True,
    )
    server, port = serve(allocator, "localhost:0", credentials=credentials)
    try:
        allocator.create_pool("secure", ["10.0.0.0/24"], 2)
        address = f"localhost:{port}"
        tls = ["--tls-ca", str(tls_files["ca.pem"])]
        operator = [*tls, "--tls-cert", str(tls_files["alice.pem"])]
        operator += ["--tls-key", str(tls_files["alice.key"])]
        r = _run(["--allocator", address, *operator, "pool", "list"], _env(home))
        assert r.code == 0, r.err
        assert "secure" in r.out
        # From the config file, with paths relative to it.
        for name in ("ca.pem", "alice.pem", "alice.key"):
            (home / name).write_bytes(tls_files[name].read_bytes())
        (home / ".coilctl.yaml").write_text(
            f"allocator: {address}\ntls-ca: ca.pem\ntls-cert: alice.pem\ntls-key: alice.key\n"
        )
        r = _run(["pool", "list"], _env(home))
        assert r.code == 0, r.err
        # A viewer reads, and is refused a change with the reason.
        viewer = [*tls, "--tls-cert", str(tls_files["bob.pem"]), "--tls-key"]
        viewer += [str(tls_files["bob.key"])]
        r = _run(["--allocator", address, *viewer, "pool", "list"], _env(home / "nowhere"))
        assert r.code == 0, r.err
        r = _run(
            ["--allocator", address, *viewer, "pool", "delete", "secure"],
            _env(home / "nowhere"),
        )
        assert r.code != 0 and 'DeletePool: viewer "bob" may only read' in r.err, r.err
        assert [p.name for p in allocator.list_pools()] == ["secure"]
        # Without the CA, or without a certificate, the handshake fails: unreachable.
        failed(_run(["--allocator", address, "pool", "list"], _env(home / "nowhere")), 3, address)
        failed(
            _run(["--allocator", address, *tls, "pool", "list"], _env(home / "nowhere")),
            3,
            address,
        )
    finally:
        server.stop(grace=None)


# -- completion and version ----------------------------------------------------------------------

COMMANDS = {
    "pool": ["create", "add-subnet", "list", "show", "delete"],
    "node": ["blocks", "release"],
    "address": ["info", "free"],
    "check": [],
    "usage": [],
    "completion": [],
    "version": [],
}


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts_name_every_command(home: Path, shell: str) -> None:
    r = _run(["completion", shell], _env(home))
    assert r.code == 0, r.err
    for command, subs in COMMANDS.items():
        assert re.search(rf"\b{command}\b", r.out), command
        for sub in subs:
            assert re.search(rf"\b{sub}\b", r.out), sub
    if shell == "bash":
        subprocess.run(["bash", "-n"], input=r.out, text=True, check=True)


def _bash_complete(script: str, line: str) -> list[str]:
    words = line.split(" ")
    program = (
        f"{script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n_coilctl\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n"
    )
    out = subprocess.run(["bash", "-c", program], capture_output=True, text=True, check=True)
    return sorted(w for w in out.stdout.split("\n") if w)


def test_bash_completion_completes(home: Path) -> None:
    script = _run(["completion", "bash"], _env(home)).out
    assert _bash_complete(script, "coilctl ") == sorted(COMMANDS)
    assert _bash_complete(script, "coilctl pool ") == sorted(COMMANDS["pool"])
    assert _bash_complete(script, "coilctl --allocator unix:/x node r") == ["release"]
    assert _bash_complete(script, "coilctl node release n1 --y") == ["--yes"]
    assert _bash_complete(script, "coilctl usage -o ") == ["json", "table"]
    assert _bash_complete(script, "coilctl completion ") == ["bash", "fish", "zsh"]


def test_completion_and_version_do_not_load_grpc(home: Path) -> None:
    probe = (
        "import sys\nfrom coilctl.main import main\n"
        "assert main(['completion', 'bash']) == 0\nassert main(['version']) == 0\n"
        "loaded = [m for m in sys.modules if m == 'grpc' or m.startswith('coil.v1')]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, env=_env(home))


def test_version(home: Path) -> None:
    r = _run(["version"], _env(home))
    assert (r.code, r.out.strip()) == (0, f"coilctl {version('coil-ipam')}")
    assert _run(["version", "-o", "json"], _env(home)).json() == {"version": version("coil-ipam")}
