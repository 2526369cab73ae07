"""What a node agent holds, in memory: its blocks with their addresses, and its attachments.

Pure logic: no gRPC, etcd or netlink; the agent guards it with one lock. Addresses are chosen
round-robin inside a block (`BlockAddresses`), from the oldest block that has room, so that
younger blocks drain and can be given back.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from coil_core.blocks import Address, BlockAddresses, Network
from coil_core.errors import AlreadyExists, InvalidArgument
from coild.errors import AddressTaken, InvalidRequest

AttachmentKey = tuple[str, str]  # (container ID, interface)


@dataclass
class NodeBlock:
    """A block this node holds."""

    pool: str
    cidr: Network
    addresses: BlockAddresses
    claim_revision: int
    retiring: bool = False
    release_in_doubt: bool = False
    """Its release failed with the outcome unknown (it may have committed): hand out nothing
    from it, and ask again until the allocator says whether it is still held."""
    empty_since: float | None = None

    @property
    def family(self) -> int:
        return self.cidr.version


@dataclass(frozen=True)
class Allocation:
    """One address of an attachment."""

    address: Address
    pool: str
    block: Network


@dataclass
class Attachment:
    """The addresses of one (container ID, interface). `done` is set once its records are
    committed (or failed); until then a repeated request waits for it.

    An attachment whose allocation failed with an outcome unknown (a record call that timed
    out may still commit) stays, `failed` and `uncertain`, with the addresses that may be
    recorded: they stay used in memory and are released on DEL, on garbage collection, or
    before the attachment is allocated again."""

    container_id: str
    interface: str
    namespace: str
    pod: str
    allocations: list[Allocation] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    failed: bool = False
    uncertain: bool = False

    @property
    def key(self) -> AttachmentKey:
        return (self.container_id, self.interface)


class NodeState:
    """Blocks and attachments of one node. Not thread-safe: callers hold the agent's lock."""

    def __init__(self) -> None:
        self.blocks: list[NodeBlock] = []
        self.attachments: dict[AttachmentKey, Attachment] = {}

    # -- blocks -----------------------------------------------------------------------------

    def add_block(
        self,
        pool: str,
        cidr: Network,
        claim_revision: int,
        reserved: Iterable[Address] = (),
        used: Iterable[Address] = (),
        last: Address | None = None,
        now: float | None = None,
    ) -> NodeBlock:
        """Hold a block (again); returns it. Re-adding a held block returns the existing one."""
        for b in self.blocks:
            if b.cidr == cidr and b.pool == pool:
                return b
        block = NodeBlock(
            pool,
            cidr,
            BlockAddresses(cidr, used=used, last=last, reserved=reserved),
            claim_revision,
        )
        if block.addresses.is_empty:
            block.empty_since = now
        self.blocks.append(block)
        self.blocks.sort(key=lambda b: (b.claim_revision, int(b.cidr.network_address)))
        return block

    def drop_block(self, pool: str, cidr: Network) -> NodeBlock | None:
        """Forget a block (released, or taken away); returns it, or None if not held."""
        for i, b in enumerate(self.blocks):
            if b.cidr == cidr and b.pool == pool:
                return self.blocks.pop(i)
        return None

    def block_of(self, pool: str, address: Address) -> NodeBlock | None:
        for b in self.blocks:
            if b.pool == pool and b.cidr.version == address.version and address in b.cidr:
                return b
        return None

    def blocks_of(self, pool: str, family: int) -> list[NodeBlock]:
        return [b for b in self.blocks if b.pool == pool and b.family == family]

    def usage(self, pool: str, family: int) -> tuple[int, int]:
        """(used, capacity) over the blocks of a pool and family that are not retiring."""
        used = capacity = 0
        for b in self.blocks_of(pool, family):
            if not b.retiring:
                used += b.addresses.used_count
                capacity += b.addresses.capacity
        return used, capacity

    def routes(self) -> set[Network]:
        """Every held block: what the kernel table must hold."""
        return {b.cidr for b in self.blocks}

    # -- addresses --------------------------------------------------------------------------

    def choose(self, pool: str, family: int, now: float) -> tuple[NodeBlock, Address] | None:
        """Take the next free address of the oldest non-retiring block with room, or None."""
        for b in self.blocks:
            if b.pool == pool and b.family == family and not b.retiring and not b.addresses.is_full:
                address = b.addresses.allocate()
                b.empty_since = None
                return b, address
        return None

    def take(self, pool: str, address: Address) -> NodeBlock | None:
        """Take a specific address if this node holds its block; None if it does not.

        Raises AddressTaken if the address is in use, InvalidRequest if it cannot be handed out
        (reserved, or its block is being given back).
        """
        block = self.block_of(pool, address)
        if block is None:
            return None
        if block.retiring:
            raise InvalidRequest(f'address "{address}": its block {block.cidr} is being returned')
        try:
            block.addresses.take(address)
        except AlreadyExists:
            raise AddressTaken(f'address "{address}" is in use by another pod') from None
        except InvalidArgument as e:
            raise InvalidRequest(f'address "{address}": {e}') from None
        block.empty_since = None
        return block

    def free(self, pool: str, address: Address, now: float) -> None:
        """Return an address to its block (a no-op if the block is no longer held)."""
        block = self.block_of(pool, address)
        if block is not None and block.addresses.release(address) and block.addresses.is_empty:
            block.empty_since = now

    # -- attachments ------------------------------------------------------------------------

    def committed(self) -> Iterator[Attachment]:
        for a in self.attachments.values():
            if a.done.is_set() and not a.failed:
                yield a
