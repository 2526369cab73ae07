"""How coilctl shows the allocator's answers: tables and block maps for people, dicts for JSON.

Pure functions from response messages to text or to JSON-ready dicts; no I/O. JSON field names are
the proto's (snake_case); integers stay JSON numbers (not strings as in the proto3 JSON mapping),
enums are their proto names ("FAMILY_IPV4"), and an absent message is null. docs/coilctl.md lists
every document.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterable, Sequence
from typing import Any

from coil.v1 import allocator_pb2 as pb

MAP_WIDTH = 64
"""Blocks per line of a block map."""
MAP_LIMIT = 4096
"""Subnets with more blocks than this are summarized instead of drawn."""
FREE, EMPTY, PARTLY, FULL = ".", "o", "+", "#"
LEGEND = f"legend: {FREE} free  {EMPTY} held, empty  {PARTLY} held, partly used  {FULL} held, full"


# -- JSON ----------------------------------------------------------------------------------------


def pool_dict(pool: pb.Pool) -> dict[str, Any]:
    return {
        "name": pool.name,
        "subnets": list(pool.subnets),
        "block_size_bits": pool.block_size_bits,
    }


def block_dict(block: pb.Block) -> dict[str, Any]:
    return {
        "pool": block.pool,
        "cidr": block.cidr,
        "node": block.node,
        "used": block.used,
        "capacity": block.capacity,
        "claim_revision": block.claim_revision,
        "claimed_at": block.claimed_at,
    }


def record_dict(record: pb.AllocationRecord) -> dict[str, Any]:
    return {
        "address": record.address,
        "pool": record.pool,
        "block": record.block,
        "node": record.node,
        "owner": {
            "namespace": record.owner.namespace,
            "pod": record.owner.pod,
            "container_id": record.owner.container_id,
            "interface": record.owner.interface,
        },
        "created_at": record.created_at,
    }


def get_pool_dict(response: pb.GetPoolResponse) -> dict[str, Any]:
    return {
        "pool": pool_dict(response.pool),
        "subnets": [
            {
                "subnet": s.subnet,
                "total_blocks": s.total_blocks,
                "held": [block_dict(b) for b in s.held],
            }
            for s in response.subnets
        ],
    }


def node_blocks_dict(response: pb.ListNodeBlocksResponse) -> dict[str, Any]:
    return {
        "blocks": [block_dict(b) for b in response.blocks],
        "records": [record_dict(r) for r in response.records],
        "revision": response.revision,
    }


def release_node_dict(response: pb.ReleaseNodeResponse) -> dict[str, Any]:
    return {
        "blocks": [block_dict(b) for b in response.blocks],
        "records_removed": response.records_removed,
    }


def get_address_dict(response: pb.GetAddressResponse) -> dict[str, Any]:
    return {
        "pool": response.pool,
        "block": response.block,
        "node": response.node,
        "record": record_dict(response.record) if response.HasField("record") else None,
    }


def usage_dict(response: pb.GetUsageResponse) -> dict[str, Any]:
    return {
        "usage": [
            {
                "pool": u.pool,
                "family": pb.Family.Name(u.family),
                "blocks_held": u.blocks_held,
                "blocks_total": u.blocks_total,
                "addresses_used": u.addresses_used,
                "addresses_total": u.addresses_total,
            }
            for u in response.usage
        ]
    }


# -- tables --------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Columns left-aligned, two spaces apart, without trailing blanks."""
    cells = [list(headers)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def when(seconds: int) -> str:
    """A Unix time as UTC ("2024-05-01T12:00:00Z"); "-" for 0 (unknown)."""
    if seconds <= 0:
        return "-"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _family(family: pb.Family.ValueType) -> str:
    names: dict[pb.Family.ValueType, str] = {pb.FAMILY_IPV4: "IPv4", pb.FAMILY_IPV6: "IPv6"}
    return names.get(family, str(family))


def _block_size(bits: int) -> str:
    return f"2^{bits} = {2**bits} address{'es' if bits else ''}"


def pool_line(pool: pb.Pool) -> str:
    subnets = ", ".join(pool.subnets)
    return f'pool "{pool.name}": {subnets}; blocks of {_block_size(pool.block_size_bits)}'


def pools_table(response: pb.ListPoolsResponse) -> str:
    if not response.pools:
        return "no pools"
    return table(
        ("NAME", "BLOCK SIZE", "SUBNETS"),
        ((p.name, f"2^{p.block_size_bits}", ", ".join(p.subnets)) for p in response.pools),
    )


def block_state(block: pb.Block) -> str:
    """The map character of a held block: empty, partly used or full."""
    if block.used == 0:
        return EMPTY
    return FULL if block.used >= block.capacity else PARTLY


def block_map(subnet: str, total_blocks: int, bits: int, held: Sequence[pb.Block]) -> list[str]:
    """One character per block of `subnet` in address order, MAP_WIDTH per line, each line
    labelled with its first block; a summary line instead when the subnet has more than
    MAP_LIMIT blocks."""
    states = [block_state(b) for b in held]
    if total_blocks > MAP_LIMIT:
        counts = {s: states.count(s) for s in (FULL, PARTLY, EMPTY)}
        return [
            f"map not drawn ({total_blocks} blocks, more than {MAP_LIMIT}): "
            f"{FULL} {counts[FULL]} full, {PARTLY} {counts[PARTLY]} partly used, "
            f"{EMPTY} {counts[EMPTY]} empty, {FREE} {total_blocks - len(held)} free"
        ]
    net = ipaddress.ip_network(subnet)
    start = int(net.network_address)
    cells = [FREE] * total_blocks
    for block, state in zip(held, states, strict=True):
        index = (int(ipaddress.ip_network(block.cidr).network_address) - start) >> bits
        if 0 <= index < total_blocks:
            cells[index] = state
    prefixlen = net.max_prefixlen - bits
    labels = [
        str(ipaddress.ip_network((start + (line << bits), prefixlen)))
        for line in range(0, total_blocks, MAP_WIDTH)
    ]
    width = max(len(label) for label in labels)
    return [
        f"{label.ljust(width)}  {''.join(cells[i * MAP_WIDTH : (i + 1) * MAP_WIDTH])}"
        for i, label in enumerate(labels)
    ]


def pool_show(response: pb.GetPoolResponse) -> str:
    pool = response.pool
    out = [pool_line(pool)]
    for s in response.subnets:
        held = list(s.held)
        out += [
            "",
            f"subnet {s.subnet}: {s.total_blocks} blocks, {len(held)} held, "
            f"{s.total_blocks - len(held)} free",
        ]
        if held:
            rows = ((b.cidr, b.node, f"{b.used}/{b.capacity}") for b in held)
            out += ["  " + line for line in table(("BLOCK", "NODE", "USED"), rows).splitlines()]
        out.append("")
        lines = block_map(s.subnet, s.total_blocks, pool.block_size_bits, held)
        out += ["  " + line for line in lines]
    out += ["", LEGEND]
    return "\n".join(out)


def _records_table(records: Iterable[pb.AllocationRecord]) -> str:
    return table(
        ("ADDRESS", "POOL", "BLOCK", "NAMESPACE", "POD", "CONTAINER", "INTERFACE", "CREATED"),
        (
            (
                r.address,
                r.pool,
                r.block,
                r.owner.namespace,
                r.owner.pod,
                r.owner.container_id,
                r.owner.interface,
                when(r.created_at),
            )
            for r in records
        ),
    )


def blocks_table(blocks: Iterable[pb.Block]) -> str:
    return table(
        ("POOL", "BLOCK", "USED", "CLAIMED"),
        ((b.pool, b.cidr, f"{b.used}/{b.capacity}", when(b.claimed_at)) for b in blocks),
    )


def node_blocks(node: str, response: pb.ListNodeBlocksResponse) -> str:
    if not response.blocks:
        return f'node "{node}" holds no block'
    out = blocks_table(response.blocks)
    if response.records:
        out += "\n\n" + _records_table(response.records)
    return out


def release_node(node: str, response: pb.ReleaseNodeResponse) -> str:
    return (
        f'node "{node}": released {len(response.blocks)} block(s) and '
        f"{response.records_removed} address record(s)\n" + blocks_table(response.blocks)
    )


def _owner(record: pb.AllocationRecord) -> str:
    o = record.owner
    return (
        f'pod {o.namespace}/{o.pod}, container "{o.container_id}" interface "{o.interface}" '
        f'on node "{record.node}"'
    )


def address_info(address: str, response: pb.GetAddressResponse) -> str:
    rows: list[tuple[str, str]] = [
        ("address", address),
        ("pool", response.pool),
        ("block", response.block),
        ("node", response.node or "- (the block is free)"),
    ]
    if response.HasField("record"):
        r = response.record
        rows += [
            ("namespace", r.owner.namespace),
            ("pod", r.owner.pod),
            ("container", r.owner.container_id),
            ("interface", r.owner.interface),
            ("recorded by", r.node),
            ("created", when(r.created_at)),
        ]
    else:
        rows.append(("allocated", "no"))
    width = max(len(k) for k, _ in rows) + 1
    return "\n".join(f"{(k + ':').ljust(width)}  {v}" for k, v in rows)


def address_freed(response: pb.FreeAddressResponse) -> str:
    r = response.record
    return f'address "{r.address}" freed; it was held by {_owner(r)}'


def usage_table(response: pb.GetUsageResponse) -> str:
    if not response.usage:
        return "no pools"
    return table(
        ("POOL", "FAMILY", "BLOCKS", "HELD", "ADDRESSES", "USED"),
        (
            (
                u.pool,
                _family(u.family),
                f"{u.blocks_held}/{u.blocks_total}",
                percent(u.blocks_held, u.blocks_total),
                f"{u.addresses_used}/{u.addresses_total}",
                percent(u.addresses_used, u.addresses_total),
            )
            for u in response.usage
        ),
    )


_SEVERITY = {
    pb.SEVERITY_INFO: "info",
    pb.SEVERITY_WARNING: "WARNING",
    pb.SEVERITY_CRITICAL: "CRITICAL",
}


def check_dict(response: pb.CheckStoreResponse) -> dict[str, Any]:
    return {
        "revision": response.revision,
        "findings": [
            {
                "severity": _SEVERITY.get(f.severity, "?").lower(),
                "kind": f.kind,
                "subject": f.subject,
                "message": f.message,
                "repaired": f.repaired,
            }
            for f in response.findings
        ],
    }


def open_findings(response: pb.CheckStoreResponse) -> list[pb.Finding]:
    """Warnings and critical findings that no repair fixed."""
    return [
        f
        for f in response.findings
        if f.severity >= pb.SEVERITY_WARNING
        and (not f.repaired or f.repaired.startswith("not repaired"))
    ]


def check_report(response: pb.CheckStoreResponse) -> str:
    if not response.findings:
        return f"no problems found (etcd revision {response.revision})"
    lines = []
    for f in response.findings:
        lines.append(f"{_SEVERITY.get(f.severity, '?'):8}  {f.kind:30}  {f.subject}: {f.message}")
        if f.repaired:
            lines.append(f"{'':8}  {'':30}  repaired: {f.repaired}")
    counts: dict[str, int] = {}
    for f in response.findings:
        name = _SEVERITY.get(f.severity, "?").lower()
        counts[name] = counts.get(name, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    lines.append(
        f"{len(response.findings)} finding(s): {summary} (etcd revision {response.revision})"
    )
    return "\n".join(lines)
