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

from coil_core.blocks import Address, Network, block_key, parse_block_key
from coil_core.model import AllocationRecord, Owner, Pool, parse_address


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
        """(pool, block, address) of a record key; ValueError or InvalidArgument if not one."""
        pool, _family, block_id, address = key[len(self.all_records) :].split("/", 3)
        return (
            pool,
            parse_block_key(block_id, "stored record"),
            parse_address(address, "stored record"),
        )

    def attachment(self, container_id: str, interface: str, family: int) -> str:
        return f"{self.prefix}attachments/{container_id}/{interface}/{family}"

    # parsing
    def strip(self, key: str, under: str) -> str:
        """The part of `key` after the prefix `under` (which must be one of the above)."""
        return key[len(under) :]


def record_ref(pool: str, block: Network, address: Address) -> bytes:
    """The value of an attachment key: where its record lives."""
    return f"{pool}/{block_key(block)}/{address}".encode()


def parse_record_path(path: str) -> tuple[str, Network, Address]:
    """Inverse of `record_ref` (also the tail of a record key): (pool, block, address)."""
    pool, block_id, address = path.split("/", 2)
    return pool, parse_block_key(block_id, "stored record"), parse_address(address, "stored record")


def encode_pool(pool: Pool) -> bytes:
    return json.dumps(
        {"subnets": [str(s) for s in pool.subnets], "block_bits": pool.block_bits},
        separators=(",", ":"),
    ).encode()


def decode_pool(name: str, value: bytes) -> Pool:
    import ipaddress

    data = json.loads(value)
    return Pool(
        name=name,
        subnets=tuple(ipaddress.ip_network(s) for s in data["subnets"]),
        block_bits=int(data["block_bits"]),
    )


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
    data = json.loads(value)
    return AllocationRecord(
        address=address,
        pool=pool,
        block=block,
        node=data["node"],
        owner=Owner(
            namespace=data["namespace"],
            pod=data["pod"],
            container_id=data["container_id"],
            interface=data["interface"],
        ),
        created_at=int(data["created_at"]),
    )
