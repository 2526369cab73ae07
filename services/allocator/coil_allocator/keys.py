"""The etcd schema: every key coil writes, under one prefix (default "/coil/").

    pools/<pool>                                   JSON {"subnets": [...], "block_bits": n}
    blocks/<pool>/<block-id>                       the holding node's name, plain
    nodes/<node>/blocks/<pool>/<block-id>          JSON {"claimed_at": unix seconds}
    nodes/<node>/alive                             JSON {"since": unix seconds}, bound to the
                                                   node agent's lease
    nodes/<node>/status                            JSON {"seen_at", "table", "routes": [...]}
    records/<pool>/<4|6>/<block-id>/<address>      JSON allocation record (see `encode_record`)
    attachments/<container-id>/<ifname>/<4|6>      "<pool>/<block-id>/<address>" of its record

A block id is the block's CIDR with "/" replaced by "_" ("10.0.0.32_27"). A block key exists
only while a node holds the block; free space is never stored, it is what the keys leave out.
docs/schema.md describes the same with examples.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from coil_core.blocks import Address, Network, block_key, parse_block_key, validate_block_size
from coil_core.errors import InvalidArgument
from coil_core.model import AllocationRecord, Owner, Pool, parse_address
from coil_core.rules import (
    parse_subnet,
    validate_attachment,
    validate_node_name,
    validate_pool_name,
)


@dataclass(frozen=True)
class Keys:
    """Key builder for one prefix."""

    prefix: str = "/coil/"

    def __post_init__(self) -> None:
        if not self.prefix.endswith("/"):
            object.__setattr__(self, "prefix", self.prefix + "/")

    # pools
    @property
    def pools(self) -> str:
        return f"{self.prefix}pools/"

    def pool(self, name: str) -> str:
        return f"{self.prefix}pools/{name}"

    # blocks
    @property
    def all_blocks(self) -> str:
        return f"{self.prefix}blocks/"

    def blocks(self, pool: str) -> str:
        return f"{self.prefix}blocks/{pool}/"

    def block(self, pool: str, block: Network) -> str:
        return f"{self.prefix}blocks/{pool}/{block_key(block)}"

    # node index
    def node_blocks(self, node: str) -> str:
        return f"{self.prefix}nodes/{node}/blocks/"

    def node_alive(self, node: str) -> str:
        return f"{self.prefix}nodes/{node}/alive"

    def node_status(self, node: str) -> str:
        return f"{self.prefix}nodes/{node}/status"

    def node_block(self, node: str, pool: str, block: Network) -> str:
        return f"{self.prefix}nodes/{node}/blocks/{pool}/{block_key(block)}"

    # records
    @property
    def all_records(self) -> str:
        return f"{self.prefix}records/"

    def pool_records(self, pool: str) -> str:
        return f"{self.prefix}records/{pool}/"

    def family_records(self, pool: str, family: int) -> str:
        """Every record of one family of a pool: the family is in the key so that usage can be
        counted by etcd (a count-only range) instead of listing every record."""
        return f"{self.prefix}records/{pool}/{family}/"

    def records(self, pool: str, block: Network) -> str:
        return f"{self.prefix}records/{pool}/{block.version}/{block_key(block)}/"

    def record(self, pool: str, block: Network, address: Address) -> str:
        return f"{self.prefix}records/{pool}/{block.version}/{block_key(block)}/{address}"

    def parse_record(self, key: str) -> tuple[str, Network, Address]:
        """(pool, block, address) of a record key; Unreadable if not one."""
        try:
            pool, family, block_id, address = key[len(self.all_records) :].split("/", 3)
        except ValueError:
            raise Unreadable(f'not a record key "{key[:200]}"') from None
        found = parse_record_path(f"{pool}/{block_id}/{address}")
        if family != str(found[1].version):
            raise Unreadable(f'record key "{key[:200]}": family {family[:10]} is not its block\'s')
        return found

    def parse_block(self, key: str, under: str) -> tuple[str, Network]:
        """(pool, block) of a key `under` + "<pool>/<block-id>" (a block or node-index key);
        Unreadable if it is not one."""
        pool, _, block_id = key[len(under) :].partition("/")
        try:
            validate_pool_name(pool, "stored block")
            return pool, parse_block_key(block_id, "stored block")
        except InvalidArgument as e:
            raise Unreadable(f'not a block key "{key[:200]}": {e}') from None

    def attachment(self, container_id: str, interface: str, family: int) -> str:
        return f"{self.prefix}attachments/{container_id}/{interface}/{family}"

    # parsing
    def strip(self, key: str, under: str) -> str:
        """The part of `key` after the prefix `under` (which must be one of the above)."""
        return key[len(under) :]


class Unreadable(ValueError):
    """A stored key or value coil cannot read (written by hand, by another version, or damaged).

    Raised by the decoders below; whoever reads the key skips it, counts it and lets
    `coilctl check` report it (see `coil_allocator.common.Part._skip`)."""


def record_ref(pool: str, block: Network, address: Address) -> bytes:
    """The value of an attachment key: where its record lives."""
    return f"{pool}/{block_key(block)}/{address}".encode()


def parse_record_path(path: str) -> tuple[str, Network, Address]:
    """Inverse of `record_ref` (also the tail of a record key): (pool, block, address).

    Raises Unreadable if `path` is not one."""
    try:
        pool, block_id, address = path.split("/", 2)
        validate_pool_name(pool, "stored record")
        block = parse_block_key(block_id, "stored record")
        parsed = parse_address(address, "stored record")
    except (ValueError, InvalidArgument) as e:
        raise Unreadable(f'not a record reference "{path[:100]}": {e}') from None
    if parsed.version != block.version or parsed not in block:
        raise Unreadable(f'not a record reference "{path[:100]}": address outside its block')
    return pool, block, parsed


def encode_pool(pool: Pool) -> bytes:
    return json.dumps(
        {"subnets": [str(s) for s in pool.subnets], "block_bits": pool.block_bits},
        separators=(",", ":"),
    ).encode()


def _json_object(value: bytes) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except (ValueError, UnicodeDecodeError) as e:
        raise Unreadable(f"not JSON: {e}") from None
    if not isinstance(data, dict):
        raise Unreadable(f"not a JSON object but {type(data).__name__}")
    return data


def _int_field(data: dict[str, Any], name: str) -> int:
    value = data.get(name)
    if not isinstance(value, int) or isinstance(value, bool):
        raise Unreadable(f'field "{name}" is not an integer')
    return value


def _text_field(data: dict[str, Any], name: str) -> str:
    value = data.get(name)
    if not isinstance(value, str):
        raise Unreadable(f'field "{name}" is not a string')
    return value


def decode_pool(name: str, value: bytes) -> Pool:
    """The pool stored as `value`; Unreadable if its name, subnets or block size would not be
    accepted by `pool create` (a pool written by hand with block_bits 200, a `[]` value...)."""
    data = _json_object(value)
    subnets = data.get("subnets")
    if not isinstance(subnets, list) or not subnets or not all(isinstance(s, str) for s in subnets):
        raise Unreadable('field "subnets" is not a non-empty list of strings')
    bits = _int_field(data, "block_bits")
    try:
        validate_pool_name(name, "stored pool")
        parsed = tuple(parse_subnet(s, "stored pool subnet") for s in subnets)
        for subnet in parsed:
            validate_block_size(subnet, bits, "stored pool")
    except InvalidArgument as e:
        raise Unreadable(str(e)) from None
    return Pool(name=name, subnets=parsed, block_bits=bits)


def encode_record(node: str, owner: Owner, created_at: int) -> bytes:
    return json.dumps(
        {
            "node": node,
            "namespace": owner.namespace,
            "pod": owner.pod,
            "container_id": owner.container_id,
            "interface": owner.interface,
            "created_at": created_at,
        },
        separators=(",", ":"),
    ).encode()


def decode_record(pool: str, block: Network, address: Address, value: bytes) -> AllocationRecord:
    """The record stored as `value`; Unreadable if a field is missing or malformed (the node
    and the attachment must be ones coil would accept, so nothing is ever built from them)."""
    data = _json_object(value)
    node = _text_field(data, "node")
    owner = Owner(
        namespace=_text_field(data, "namespace"),
        pod=_text_field(data, "pod"),
        container_id=_text_field(data, "container_id"),
        interface=_text_field(data, "interface"),
    )
    try:
        validate_node_name(node, "stored record")
        # Only what keys are built from; a name stored before the length caps stays readable.
        validate_attachment(owner.container_id, owner.interface, "stored record")
    except InvalidArgument as e:
        raise Unreadable(str(e)) from None
    return AllocationRecord(
        address=address,
        pool=pool,
        block=block,
        node=node,
        owner=owner,
        created_at=_int_field(data, "created_at"),
    )


def decode_claimed_at(value: bytes) -> int:
    """When a node-index entry says its block was claimed; Unreadable if it does not say."""
    return _int_field(_json_object(value), "claimed_at")


@dataclass(frozen=True)
class NodeStatus:
    """A node agent's last report: when, from which table, which routes."""

    seen_at: int
    table: int
    routes: tuple[str, ...]


def decode_status(value: bytes) -> NodeStatus:
    """The node status stored as `value`; Unreadable if a field is missing or malformed."""
    data = _json_object(value)
    routes = data.get("routes")
    if not isinstance(routes, list) or not all(isinstance(r, str) for r in routes):
        raise Unreadable('field "routes" is not a list of strings')
    return NodeStatus(_int_field(data, "seen_at"), _int_field(data, "table"), tuple(routes))


def decode_holder(value: bytes) -> str:
    """The node named by a block key's value; Unreadable if it is not a valid node name."""
    try:
        return validate_node_name(value.decode(), "stored block")
    except (UnicodeDecodeError, InvalidArgument) as e:
        raise Unreadable(f"not a node name: {e}") from None
