"""Pool, subnet and block arithmetic, and the address chooser of one block.

Pure logic: no etcd, gRPC or netlink. A pool's subnet is cut into aligned blocks of ``2**bits``
addresses; the allocator hands whole blocks to nodes and the node agent hands out single addresses
of its blocks with `BlockAddresses`. The rules for text input (names, subnets, addresses) live in
`coil_core.rules`.

Functions that can reject their input take an ``op`` argument (``"pool create"``,
``"pool add-subnet"``, ...) and raise the domain errors of `coil_core.errors` with messages
that start with it and quote the input, e.g. ``pool create "Bad_Name": not a valid namespace
name``. Arguments that only a caller bug can get wrong (a block size that was not validated with
`validate_block_size`) raise ``ValueError`` instead.
"""

import functools
import ipaddress
from collections.abc import Iterable

from coil_core.errors import AlreadyExists, InvalidArgument, PoolExhausted
from coil_core.rules import Address, Network, parse_subnet, validate_subnet_scope

MAX_BLOCK_BITS = 16
"""Largest block: 2**16 addresses, so that a block's records and `BlockAddresses` stay bounded."""


def host_bits(subnet: Network) -> int:
    """Return the number of host bits of ``subnet`` (32 or 128 minus its prefix length)."""
    return subnet.max_prefixlen - subnet.prefixlen


def validate_block_size(subnet: Network, bits: int, op: str) -> None:
    """Check that blocks of ``2**bits`` addresses can be cut from ``subnet``.

    ``bits`` must lie in ``0..min(16, host bits of subnet)``: blocks hold at most 2**16 addresses
    (`MAX_BLOCK_BITS`) and at most the whole subnet. ``bits == 0`` means one-address blocks.

    Raises:
        InvalidArgument: ``bits`` is negative, larger than 16, or larger than the subnet's host
            bits.
    """
    if bits < 0:
        raise InvalidArgument(f"{op}: block size bits {bits} is negative (a block is 2^bits)")
    if bits > MAX_BLOCK_BITS:
        raise InvalidArgument(
            f"{op}: block size 2^{bits} is too large; at most 2^{MAX_BLOCK_BITS} "
            f"(bits at most {MAX_BLOCK_BITS})"
        )
    if bits > host_bits(subnet):
        raise InvalidArgument(
            f'{op}: block size 2^{bits} is larger than subnet "{subnet}" '
            f"(2^{host_bits(subnet)} addresses)"
        )


def block_count(subnet: Network, bits: int) -> int:
    """Return how many blocks of ``2**bits`` addresses ``subnet`` holds.

    Raises:
        ValueError: ``bits`` is negative or larger than the subnet's host bits (a caller bug:
            validate with `validate_block_size` first).
    """
    _check_bits(subnet, bits)
    return 2 ** (host_bits(subnet) - bits)


def block_at(subnet: Network, bits: int, index: int, op: str) -> Network:
    """Return the ``index``-th (0-based) block of ``2**bits`` addresses of ``subnet``.

    Raises:
        InvalidArgument: ``index`` is not in ``0..block_count(subnet, bits) - 1``.
        ValueError: ``bits`` is out of range for ``subnet`` (see `block_count`).
    """
    count = block_count(subnet, bits)
    if not 0 <= index < count:
        raise InvalidArgument(
            f'{op} "{subnet}": block index {index} is out of range (0-{count - 1} '
            f"for blocks of 2^{bits})"
        )
    start = int(subnet.network_address) + (index << bits)
    return _network(subnet, start, subnet.max_prefixlen - bits)


def block_index(subnet: Network, bits: int, block: Network, op: str) -> int:
    """Return the index of ``block`` among the blocks of ``2**bits`` addresses of ``subnet``.

    The inverse of `block_at`.

    Raises:
        InvalidArgument: ``block`` is of another family, not of size ``2**bits``, or not within
            ``subnet`` (an aligned block within it is all it can be, since it is a network).
        ValueError: ``bits`` is out of range for ``subnet`` (see `block_count`).
    """
    _check_bits(subnet, bits)
    if block.version != subnet.version or not _within(block, subnet):
        raise InvalidArgument(f'{op} "{block}": not within subnet "{subnet}"')
    if block.prefixlen != subnet.max_prefixlen - bits:
        raise InvalidArgument(
            f'{op} "{block}": not a block of subnet "{subnet}" '
            f"(blocks are /{subnet.max_prefixlen - bits})"
        )
    return (int(block.network_address) - int(subnet.network_address)) >> bits


def block_of(subnet: Network, bits: int, address: Address, op: str) -> Network:
    """Return the block of ``2**bits`` addresses of ``subnet`` that contains ``address``.

    Raises:
        InvalidArgument: ``address`` is not in ``subnet`` (including another family).
        ValueError: ``bits`` is out of range for ``subnet`` (see `block_count`).
    """
    _check_bits(subnet, bits)
    if not _contains(subnet, address):
        raise InvalidArgument(f'{op} "{address}": not in subnet "{subnet}"')
    start = int(address) >> bits << bits
    return _network(subnet, start, subnet.max_prefixlen - bits)


@functools.lru_cache(maxsize=65_536)  # str() of a network is slow and every record needs it
def block_key(block: Network) -> str:
    """Return the etcd-key-safe id of ``block``: ``"10.0.0.32_27"``, ``"fd00::20_123"``."""
    return str(block).replace("/", "_")


@functools.lru_cache(maxsize=65_536)  # every record names its block; networks are immutable
def parse_block_key(key: str, op: str) -> Network:
    """Return the block whose `block_key` is ``key``.

    Only canonical keys are accepted, so that one block has exactly one key. Results are cached;
    errors are not.

    Raises:
        InvalidArgument: ``key`` is not the `block_key` of any network.
    """
    try:
        block = parse_subnet(key.replace("_", "/", 1), op)
    except InvalidArgument:
        block = None
    if block is None or block_key(block) != key:
        raise InvalidArgument(
            f'{op} "{key}": not a block id (expected an address, "_" and a prefix length, '
            'like "10.0.0.32_27")'
        )
    return block


def overlapping(a: Network, b: Network) -> bool:
    """Return whether ``a`` and ``b`` share an address; networks of different families never do."""
    return (
        a.version == b.version
        and int(a.network_address) <= int(b.broadcast_address)
        and int(b.network_address) <= int(a.broadcast_address)
    )


def blocks_overlapping(subnet: Network, bits: int, other: Network) -> list[Network]:
    """Return the blocks of ``2**bits`` addresses of ``subnet`` that share an address with
    ``other`` (none if it is of another family or outside the subnet), lowest first.

    Raises:
        ValueError: ``bits`` is out of range for ``subnet`` (see `block_count`).
    """
    _check_bits(subnet, bits)
    if not overlapping(subnet, other):
        return []
    start = max(int(subnet.network_address), int(other.network_address)) >> bits << bits
    end = min(int(subnet.broadcast_address), int(other.broadcast_address))
    return [
        _network(subnet, a, subnet.max_prefixlen - bits) for a in range(start, end + 1, 1 << bits)
    ]


def find_overlap(
    new: Network, existing: Iterable[tuple[str, Network]]
) -> tuple[str, Network] | None:
    """Return the first ``(pool name, subnet)`` of ``existing`` that overlaps ``new``, or None."""
    for name, subnet in existing:
        if overlapping(new, subnet):
            return name, subnet
    return None


def family_of(net_or_addr: Network | Address) -> int:
    """Return the IP family of a network or address: 4 or 6."""
    return net_or_addr.version


MIN_SUBNET_ADDRESSES = 4
"""A pool subnet needs room for its network address, the pods' gateway and at least one pod
(and, in IPv4, the broadcast address)."""


def gateway_of(subnet: Network) -> Address:
    """The pods' gateway in a pool subnet: its first address after the network address.

    The main plugin (ptp) puts it on the host side of every pod's link as a /32 (/128), so one
    address serves as gateway on every node. It must lie inside the prefix the pod gets: the
    pod's default route goes through it without an on-link flag.
    """
    return subnet.network_address + 1


def reserved_addresses(subnet: Network) -> tuple[Address, ...]:
    """Addresses of a pool subnet never handed to pods: the network address, the gateway and,
    in IPv4, the broadcast address."""
    out: tuple[Address, ...] = (subnet.network_address, gateway_of(subnet))
    if subnet.version == 4:
        out += (subnet.broadcast_address,)
    return out


def validate_pool_subnet(subnet: Network, op: str) -> None:
    """Raise InvalidArgument if `subnet` is too small to serve pods (fewer than 4 addresses) or
    overlaps a range pods cannot use (see `coil_core.rules.validate_subnet_scope`)."""
    validate_subnet_scope(subnet, op)
    if subnet.num_addresses < MIN_SUBNET_ADDRESSES:
        raise InvalidArgument(
            f'{op} "{subnet}": too small; a pool subnet needs at least {MIN_SUBNET_ADDRESSES} '
            "addresses (its network address and the pods' gateway are reserved)"
        )


def _check_bits(subnet: Network, bits: int) -> None:
    if not 0 <= bits <= host_bits(subnet):
        raise ValueError(f"block size bits {bits} out of range for subnet {subnet}")


def _network(like: Network, start: int, prefixlen: int) -> Network:
    # ip_network() guesses the family from the integer; a low IPv6 address would come out IPv4.
    if isinstance(like, ipaddress.IPv4Network):
        return ipaddress.IPv4Network((start, prefixlen))
    return ipaddress.IPv6Network((start, prefixlen))


def _contains(network: Network, address: Address) -> bool:
    return network.version == address.version and int(network.network_address) <= int(
        address
    ) <= int(network.broadcast_address)


def _within(inner: Network, outer: Network) -> bool:
    return int(outer.network_address) <= int(inner.network_address) and int(
        inner.broadcast_address
    ) <= int(outer.broadcast_address)


class BlockAddresses:
    """The addresses of one block in use on a node, and the choice of the next one.

    Addresses are handed out round robin: a cursor follows the most recently handed-out address
    and `allocate` returns the first free address after it, wrapping around at the end of the
    block. So a released address is handed out again only after the cursor has gone once round
    the block: every address that is free when it is released and lies between the cursor and it
    goes first (right after ``release(allocate())`` that is every other free address).

    Reserved addresses are never handed out and do not count in `capacity`; reserved addresses
    outside the block are ignored, so callers may pass the pool subnet's network and broadcast
    addresses for every block.

    Each `allocate` scans from the cursor and stops at the first free address, so it costs the
    length of the run of used addresses after the cursor, not the size of the block.
    """

    def __init__(
        self,
        block: Network,
        used: Iterable[Address] = (),
        last: Address | None = None,
        reserved: Iterable[Address] = (),
    ) -> None:
        """Build the chooser from the block's current state.

        ``last`` is the most recently handed-out address (the cursor; see `last`), None to start
        at the block's first address.

        Raises:
            InvalidArgument: a used address or ``last`` is outside the block, or a used address
                is reserved.
            ValueError: ``block`` holds more than 2**16 addresses.
        """
        if host_bits(block) > MAX_BLOCK_BITS:
            raise ValueError(f"block {block} is larger than 2^{MAX_BLOCK_BITS} addresses")
        self._block = block
        self._size = block.num_addresses
        self._reserved = frozenset(
            self._offset(address) for address in reserved if _contains(block, address)
        )
        self._used: set[int] = set()
        for address in used:
            offset = self._checked_offset(address, "used address")
            if offset in self._reserved:
                raise InvalidArgument(f'block {block}: used address "{address}" is reserved')
            self._used.add(offset)
        self._last: int | None = None
        if last is not None:
            self._last = self._checked_offset(last, "last address")

    @property
    def block(self) -> Network:
        """The block whose addresses this chooser hands out."""
        return self._block

    @property
    def last(self) -> Address | None:
        """The most recently allocated address (the cursor), None if none yet.

        Pass it back to the constructor to resume the round robin where it stopped.
        """
        return None if self._last is None else self._address(self._last)

    @property
    def capacity(self) -> int:
        """How many addresses can be in use at once: the block's size minus reserved addresses."""
        return self._size - len(self._reserved)

    @property
    def used_count(self) -> int:
        """How many addresses are in use."""
        return len(self._used)

    @property
    def is_empty(self) -> bool:
        """Whether no address is in use."""
        return not self._used

    @property
    def is_full(self) -> bool:
        """Whether every address but the reserved ones is in use."""
        return len(self._used) == self.capacity

    def __contains__(self, address: object) -> bool:
        """Return whether ``address`` is in use (False for anything outside the block)."""
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            return False
        return _contains(self._block, address) and self._offset(address) in self._used

    def used(self) -> list[Address]:
        """Return the addresses in use, lowest first."""
        return [self._address(offset) for offset in sorted(self._used)]

    def allocate(self) -> Address:
        """Mark the next free address after the cursor as used, move the cursor to it, return it.

        Raises:
            PoolExhausted: every address but the reserved ones is in use.
        """
        if self.is_full:
            raise PoolExhausted(
                f"block {self._block}: no free address ({self.used_count} in use, "
                f"{len(self._reserved)} reserved)"
            )
        offset = 0 if self._last is None else (self._last + 1) % self._size
        while offset in self._used or offset in self._reserved:
            offset = (offset + 1) % self._size
        self._used.add(offset)
        self._last = offset
        return self._address(offset)

    def take(self, address: Address) -> None:
        """Mark a specific ``address`` as used (a static request).

        The cursor does not move: moving it could land just before an address released a moment
        ago and hand that out next.

        Raises:
            InvalidArgument: ``address`` is outside the block or reserved.
            AlreadyExists: ``address`` is already in use.
        """
        offset = self._checked_offset(address, "address")
        if offset in self._reserved:
            raise InvalidArgument(f'block {self._block}: address "{address}" is reserved')
        if offset in self._used:
            raise AlreadyExists(f'block {self._block}: address "{address}" is already in use')
        self._used.add(offset)

    def release(self, address: Address) -> bool:
        """Mark ``address`` as free; return whether it was in use (False if outside the block).

        The cursor does not move, so the address is not handed out again at once.
        """
        if not _contains(self._block, address):
            return False
        offset = self._offset(address)
        if offset not in self._used:
            return False
        self._used.remove(offset)
        return True

    def _offset(self, address: Address) -> int:
        return int(address) - int(self._block.network_address)

    def _address(self, offset: int) -> Address:
        return self._block.network_address + offset

    def _checked_offset(self, address: Address, what: str) -> int:
        if not _contains(self._block, address):
            raise InvalidArgument(f'block {self._block}: {what} "{address}" is outside the block')
        return self._offset(address)
