"""coil's values: pools, held blocks, owners, allocation records, requests and results.

Immutable dataclasses, free of etcd and gRPC. Requests are validated when built (`from_strings`
constructors), so the allocator only ever sees well-formed values.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from coil_core.blocks import (
    block_key,
    find_overlap,
    parse_block_key,
    reserved_addresses,
    validate_block_size,
    validate_pool_subnet,
)
from coil_core.errors import InvalidArgument
from coil_core.rules import (
    Address,
    Network,
    parse_address,
    parse_subnet,
    validate_attachment,
    validate_pod,
    validate_pool_name,
)


class Family(enum.IntEnum):
    """IP family, numbered like `ipaddress` versions."""

    IPV4 = 4
    IPV6 = 6


@dataclass(frozen=True, slots=True)
class Pool:
    """An address pool: subnets carved into blocks of 2^block_bits addresses."""

    name: str
    subnets: tuple[Network, ...]
    block_bits: int

    @classmethod
    def from_strings(
        cls, name: str, subnets: Sequence[str], block_bits: int, op: str = "pool create"
    ) -> Pool:
        """A new pool, checked on its own (not against other pools): the allocator's
        `pool create` and coilctl's check before sending it apply this one rule.

        Raises:
            InvalidArgument: the name is not a namespace name; no subnet is given; the block
                size is negative; a subnet is not a CIDR, overlaps a range pods cannot use, is
                too small, or is smaller than a block; two of the subnets overlap.
        """
        validate_pool_name(name, op)
        if not subnets:
            raise InvalidArgument(f'{op} "{name}": at least one subnet is required')
        if block_bits < 0:
            raise InvalidArgument(f'{op} "{name}": block size {block_bits} is negative')
        parsed: list[Network] = []
        for text in subnets:
            subnet = parse_subnet(text, f'{op} "{name}" subnet')
            validate_pool_subnet(subnet, f'{op} "{name}" subnet')
            validate_block_size(subnet, block_bits, f'{op} "{name}"')
            clash = find_overlap(subnet, [(name, s) for s in parsed])
            if clash:
                raise InvalidArgument(f'{op} "{name}": subnets "{clash[1]}" and "{subnet}" overlap')
            parsed.append(subnet)
        return cls(name, tuple(parsed), block_bits)

    def subnets_of(self, family: Family) -> tuple[Network, ...]:
        return tuple(s for s in self.subnets if s.version == family)

    def families(self) -> tuple[Family, ...]:
        return tuple(f for f in (Family.IPV4, Family.IPV6) if self.subnets_of(f))

    def reserved(self) -> tuple[Address, ...]:
        """Addresses of the pool never handed to pods (see `blocks.reserved_addresses`)."""
        return tuple(a for s in self.subnets for a in reserved_addresses(s))

    def reserved_in(self, block: Network) -> int:
        """How many of the pool's reserved addresses lie in `block`."""
        subnet = self.subnet_of(block)
        if subnet is None:
            return 0
        return sum(1 for a in reserved_addresses(subnet) if a in block)

    def subnet_of(self, address: Address | Network) -> Network | None:
        """The pool subnet containing `address` (or the block), or None."""
        for subnet in self.subnets:
            if subnet.version != address.version:
                continue
            if isinstance(address, ipaddress.IPv4Network | ipaddress.IPv6Network):
                if address.subnet_of(subnet):  # type: ignore[arg-type]
                    return subnet
            elif address in subnet:
                return subnet
        return None


@dataclass(frozen=True, slots=True)
class HeldBlock:
    """A block held by a node."""

    pool: str
    cidr: Network
    node: str
    claim_revision: int
    claimed_at: int = 0
    used: int = 0
    reserved: int = 0
    """Addresses of the block reserved in its subnet (network address, gateway, broadcast)."""

    @property
    def key_id(self) -> str:
        return block_key(self.cidr)

    @property
    def capacity(self) -> int:
        """Addresses pods can get from the block."""
        return int(self.cidr.num_addresses) - self.reserved


@dataclass(frozen=True, slots=True)
class Owner:
    """Who an address was handed to: the pod and its CNI attachment."""

    namespace: str
    pod: str
    container_id: str
    interface: str

    def validate(self, op: str) -> Owner:
        """Return self if the attachment fields are well formed and the pod's names are not
        longer than Kubernetes allows; else InvalidArgument (see
        `coil_core.rules.validate_attachment` and `validate_pod`)."""
        validate_attachment(self.container_id, self.interface, op)
        validate_pod(self.namespace, self.pod, op)
        return self


@dataclass(frozen=True, slots=True)
class AllocationRecord:
    """The durable record of one address handed to one attachment."""

    address: Address
    pool: str
    block: Network
    node: str
    owner: Owner
    created_at: int


@dataclass(frozen=True, slots=True)
class NodeChange:
    """What changed for one node up to `revision` (etcd's): what the allocator's WatchNode
    stream carries. Every part is idempotent: puts say "is now", removals "is gone".

    A `snapshot` holds everything instead (every pool, the node's blocks and their records as
    read at `revision`): the follower replaces what it knew. `lease_lost` says the node's alive
    key went away (its lease expired, or an operator released the node).
    """

    revision: int
    pools: tuple[Pool, ...] = ()
    deleted_pools: tuple[str, ...] = ()
    blocks: tuple[HeldBlock, ...] = ()
    released_blocks: tuple[HeldBlock, ...] = ()
    records: tuple[AllocationRecord, ...] = ()
    released_records: tuple[AllocationRecord, ...] = ()
    lease_lost: bool = False
    snapshot: bool = False

    def __bool__(self) -> bool:
        return bool(
            self.snapshot
            or self.pools
            or self.deleted_pools
            or self.blocks
            or self.released_blocks
            or self.records
            or self.released_records
            or self.lease_lost
        )


@dataclass(frozen=True, slots=True)
class NodeBlocks:
    """The blocks a node holds and their records, oldest first, as read at one revision."""

    blocks: tuple[HeldBlock, ...]
    records: tuple[AllocationRecord, ...]


@dataclass(frozen=True, slots=True)
class RecordRequest:
    """One address a node handed out and wants recorded."""

    address: Address
    pool: str
    block: Network
    owner: Owner

    @classmethod
    def from_strings(
        cls, address: str, pool: str, block: str, owner: Owner, op: str = "record"
    ) -> RecordRequest:
        """Build and validate; raises InvalidArgument naming the bad field."""
        addr = parse_address(address, op)
        net = parse_block_key(block.replace("/", "_", 1), f"{op} block")
        if addr.version != net.version or addr not in net:
            raise InvalidArgument(f'{op} "{address}": not in block "{block}"')
        if not pool:
            raise InvalidArgument(f'{op} "{address}": pool is empty')
        return cls(addr, pool, net, owner.validate(op))


class RecordOutcome(enum.Enum):
    RECORDED = "recorded"
    EXISTING = "existing"
    ADDRESS_IN_USE = "address in use"
    BLOCK_NOT_HELD = "block not held"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class RecordResult:
    outcome: RecordOutcome
    record: AllocationRecord | None = None
    message: str = ""


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """An address to release, optionally only if this attachment holds it."""

    address: Address
    container_id: str = ""
    interface: str = ""


class ReleaseOutcome(enum.Enum):
    RELEASED = "released"
    NOT_RECORDED = "not recorded"
    OWNER_MISMATCH = "owner mismatch"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class ReleaseResult:
    outcome: ReleaseOutcome
    message: str = ""
    record: AllocationRecord | None = None


@dataclass(frozen=True, slots=True)
class SubnetBlocks:
    """The held blocks of one subnet of a pool."""

    subnet: Network
    total_blocks: int
    held: tuple[HeldBlock, ...]


@dataclass(frozen=True, slots=True)
class AddressInfo:
    """Where an address lies and who holds it."""

    address: Address
    pool: str
    block: Network
    node: str
    record: AllocationRecord | None


@dataclass(frozen=True, slots=True)
class PoolUsage:
    pool: str
    family: Family
    blocks_held: int
    blocks_total: int
    addresses_used: int
    addresses_total: int
