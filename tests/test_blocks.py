"""Tests of coil_core.blocks: names, subnets, block arithmetic and the address chooser.

Block arithmetic is checked against `ipaddress`'s own enumeration (`subnets(new_prefix=...)`) and
integer arithmetic; `BlockAddresses` against `ModelBlock`, a list-based cursor written to be
obviously right rather than fast.
"""

import ipaddress
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from coil_core.blocks import (
    Address,
    BlockAddresses,
    Network,
    block_at,
    block_count,
    block_index,
    block_key,
    block_of,
    blocks_overlapping,
    family_of,
    find_overlap,
    overlapping,
    parse_block_key,
    parse_subnet,
    validate_block_size,
)
from coil_core.errors import AlreadyExists, InvalidArgument, PoolExhausted
from coil_core.rules import validate_pool_name

OP = "pool create"


def net(text: str) -> Network:
    return ipaddress.ip_network(text)


def addr(text: str) -> Address:
    return ipaddress.ip_address(text)


def addresses_of(network: Network) -> list[Address]:
    """Every address of ``network``, lowest first (typed, unlike iterating a network union)."""
    return [network.network_address + i for i in range(network.num_addresses)]


# --- pool names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["default", "a", "0", "kube-system", "a-0", "9lives", "a" * 63], ids=repr
)
def test_valid_pool_names(name: str) -> None:
    assert validate_pool_name(name, OP) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 64,
        "Default",
        "ALLCAPS",
        "bad_name",
        "-abc",
        "abc-",
        "-",
        "a.b",
        "a b",
        "ä",
        "abc\n",
    ],
    ids=repr,
)
def test_invalid_pool_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_pool_name(name, OP)
    message = str(caught.value)
    assert message.startswith(f'{OP} "{name}": ')
    assert "namespace name" in message


# --- subnets -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("10.0.0.0/16", "10.0.0.0/16"),
        ("10.1.2.3/32", "10.1.2.3/32"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("10.0.0.0/08", "10.0.0.0/8"),
        ("fd00::/48", "fd00::/48"),
        ("FD00:0:0:0::/64", "fd00::/64"),
        ("fd00::1/128", "fd00::1/128"),
        ("::/0", "::/0"),
    ],
    ids=lambda value: value,
)
def test_parse_good_subnets(text: str, canonical: str) -> None:
    subnet = parse_subnet(text, OP)
    assert str(subnet) == canonical
    assert subnet.version == (6 if ":" in text else 4)


@pytest.mark.parametrize(
    ("text", "suggestion"),
    [
        ("10.0.0.1/16", "10.0.0.0/16"),
        ("10.0.255.255/17", "10.0.128.0/17"),
        ("fd00::1/64", "fd00::/64"),
        ("FD00::1:0/111", "fd00::/111"),
    ],
    ids=lambda value: value,
)
def test_parse_subnet_with_host_bits_suggests_the_network(text: str, suggestion: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_subnet(text, "pool add-subnet")
    message = str(caught.value)
    assert message.startswith(f'pool add-subnet "{text}": ')
    assert "not a network address" in message
    assert f'"{suggestion}"' in message


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "not a CIDR"),
        ("abc", "not a CIDR"),
        ("abc/24", "not an IPv4 or IPv6 address"),
        ("10.0.0.256/24", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/33", "out of range"),
        ("fd00::/129", "out of range"),
        ("10.0.0.0/999", "out of range"),
        ("10.0.0.0", "missing prefix length"),
        ("fd00::", "missing prefix length"),
        ("10.0.0.0/", "not a CIDR"),
        ("/24", "not a CIDR"),
        ("10.0.0.0/255.0.0.0", "not a CIDR"),
        ("10.0.0.0/-1", "not a CIDR"),
        ("10.0.0.0/+8", "not a CIDR"),
        ("10.0.0.0/8/8", "not a CIDR"),
        (" 10.0.0.0/8", "not an IPv4 or IPv6 address"),
        ("10.0.0.0/8 ", "not a CIDR"),
        ("fe80::%eth0/64", "not an IPv4 or IPv6 address"),
    ],
    ids=repr,
)
def test_parse_malformed_subnets(text: str, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_subnet(text, OP)
    message = str(caught.value)
    assert message.startswith(f'{OP} "{text}": ')
    assert reason in message


# --- block sizes -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subnet", "bits"),
    [
        ("10.0.0.0/24", 0),
        ("10.0.0.0/24", 5),
        ("10.0.0.0/24", 8),  # the whole subnet is one block
        ("10.0.0.7/32", 0),
        ("fd00::1/128", 0),
        ("fd00::/64", 16),
        ("10.0.0.0/8", 16),
    ],
    ids=lambda value: str(value),
)
def test_valid_block_sizes(subnet: str, bits: int) -> None:
    validate_block_size(net(subnet), bits, OP)


@pytest.mark.parametrize(
    ("subnet", "bits", "reason"),
    [
        ("10.0.0.0/24", -1, "negative"),
        ("10.0.0.0/24", 9, "larger than subnet"),
        ("10.0.0.7/32", 1, "larger than subnet"),
        ("fd00::1/128", 1, "larger than subnet"),
        ("fd00::/64", 17, "too large"),
        ("10.0.0.0/8", 17, "too large"),
        ("10.0.0.0/8", 32, "too large"),
    ],
    ids=lambda value: str(value),
)
def test_invalid_block_sizes(subnet: str, bits: int, reason: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_block_size(net(subnet), bits, OP)
    message = str(caught.value)
    assert message.startswith(OP)
    assert reason in message
    assert str(bits) in message


# --- block arithmetic against ipaddress's enumeration ------------------------------------------

SMALL_CASES = [
    ("10.0.0.0/24", 5),
    ("10.0.0.0/24", 0),
    ("10.0.0.0/24", 8),
    ("10.0.0.0/22", 8),
    ("10.0.0.7/32", 0),
    ("192.168.3.128/25", 2),
    ("255.255.255.0/24", 4),
    ("fd00::/120", 4),
    ("fd00::/120", 0),
    ("fd00::40/122", 6),
    ("fd00::1/128", 0),
    ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120", 3),
]


@pytest.mark.parametrize(("subnet_text", "bits"), SMALL_CASES, ids=lambda value: str(value))
def test_block_arithmetic_matches_enumeration(subnet_text: str, bits: int) -> None:
    subnet = net(subnet_text)
    reference: list[Network] = list(subnet.subnets(new_prefix=subnet.max_prefixlen - bits))

    assert block_count(subnet, bits) == len(reference)
    for index, block in enumerate(reference):
        assert block_at(subnet, bits, index, OP) == block
        assert block_index(subnet, bits, block, OP) == index
    assert block_at(subnet, bits, len(reference) - 1, OP) == reference[-1]
    assert reference[-1].broadcast_address == subnet.broadcast_address
    for address in addresses_of(subnet):
        (containing,) = [block for block in reference if address in block]
        assert block_of(subnet, bits, address, OP) == containing


@pytest.mark.parametrize(("subnet_text", "bits"), SMALL_CASES, ids=lambda value: str(value))
def test_blocks_overlapping_matches_enumeration(subnet_text: str, bits: int) -> None:
    subnet = net(subnet_text)
    reference: list[Network] = list(subnet.subnets(new_prefix=subnet.max_prefixlen - bits))
    others = [subnet, subnet.supernet(), *reference[:2], *reference[-1:]]
    if subnet.prefixlen < subnet.max_prefixlen:
        others += list(subnet.subnets())  # each half
    others += [ipaddress.ip_network("10.200.0.0/16"), ipaddress.ip_network("fd99::/64")]
    for other in others:
        expected = [b for b in reference if overlapping(b, other)]
        assert blocks_overlapping(subnet, bits, other) == expected, other


@pytest.mark.parametrize(("subnet_text", "bits"), SMALL_CASES, ids=lambda value: str(value))
def test_block_at_rejects_out_of_range_index(subnet_text: str, bits: int) -> None:
    subnet = net(subnet_text)
    count = len(list(subnet.subnets(new_prefix=subnet.max_prefixlen - bits)))
    for index in (-1, count, count + 1):
        with pytest.raises(InvalidArgument) as caught:
            block_at(subnet, bits, index, OP)
        assert str(caught.value).startswith(f'{OP} "{subnet}": ')
        assert str(index) in str(caught.value)


@pytest.mark.parametrize(
    ("subnet", "bits", "index", "block"),
    [
        ("10.0.0.0/16", 8, 255, "10.0.255.0/24"),
        ("10.0.0.0/8", 0, 2**24 - 1, "10.255.255.255/32"),
        ("fd00::/48", 16, 2**64 - 1, "fd00:0:0:ffff:ffff:ffff:ffff:0/112"),
        ("fd00::/64", 0, 2**64 - 1, "fd00::ffff:ffff:ffff:ffff/128"),
        ("::/0", 16, 1, "::1:0/112"),
    ],
    ids=lambda value: str(value),
)
def test_last_and_low_blocks_of_large_subnets(
    subnet: str, bits: int, index: int, block: str
) -> None:
    assert block_at(net(subnet), bits, index, OP) == net(block)
    assert block_index(net(subnet), bits, net(block), OP) == index


def test_low_ipv6_blocks_stay_ipv6() -> None:
    block = block_at(net("::/96"), 4, 2, OP)
    assert block == net("::20/124")
    assert block.version == 6


@pytest.mark.parametrize(
    ("subnet", "bits", "block", "reason"),
    [
        ("10.0.0.0/24", 5, "10.0.0.0/28", "not a block"),
        ("10.0.0.0/24", 5, "10.0.0.0/26", "not a block"),
        ("10.0.0.0/24", 5, "10.0.1.0/27", "not within"),
        ("10.0.0.0/24", 8, "10.0.0.0/23", "not within"),
        ("10.0.0.0/24", 5, "::/123", "not within"),
        ("fd00::/120", 5, "10.0.0.0/27", "not within"),
    ],
    ids=lambda value: str(value),
)
def test_block_index_rejects_foreign_blocks(
    subnet: str, bits: int, block: str, reason: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        block_index(net(subnet), bits, net(block), OP)
    assert str(caught.value).startswith(f'{OP} "{block}": ')
    assert reason in str(caught.value)


@pytest.mark.parametrize(
    ("subnet", "address"),
    [
        ("10.0.0.0/24", "10.0.1.0"),
        ("10.0.0.0/24", "9.255.255.255"),
        ("10.0.0.0/24", "::a00:1"),
        ("::/120", "0.0.0.1"),
    ],
    ids=lambda value: str(value),
)
def test_block_of_rejects_addresses_outside(subnet: str, address: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        block_of(net(subnet), 4, addr(address), OP)
    assert str(caught.value).startswith(f'{OP} "{address}": ')


@pytest.mark.parametrize("bits", [-1, 9])
def test_arithmetic_rejects_unvalidated_block_sizes(bits: int) -> None:
    subnet = net("10.0.0.0/24")
    with pytest.raises(ValueError):
        block_count(subnet, bits)
    with pytest.raises(ValueError):
        block_at(subnet, bits, 0, OP)
    with pytest.raises(ValueError):
        block_of(subnet, bits, addr("10.0.0.1"), OP)
    with pytest.raises(ValueError):
        block_index(subnet, bits, net("10.0.0.0/24"), OP)


# --- block arithmetic: properties ---------------------------------------------------------------


@st.composite
def subnets(draw: st.DrawFn, max_host_bits: int = 128) -> Network:
    version = draw(st.sampled_from([4, 6]))
    width = 32 if version == 4 else 128
    host = draw(st.integers(0, min(width, max_host_bits)))
    start = draw(st.integers(0, 2**width - 1)) >> host << host
    if version == 4:
        return ipaddress.IPv4Network((start, width - host))
    return ipaddress.IPv6Network((start, width - host))


@st.composite
def subnets_and_bits(draw: st.DrawFn, max_host_bits: int = 128) -> tuple[Network, int]:
    subnet = draw(subnets(max_host_bits))
    host = subnet.max_prefixlen - subnet.prefixlen
    return subnet, draw(st.integers(0, min(16, host)))


def addresses_in(subnet: Network) -> st.SearchStrategy[Address]:
    first = int(subnet.network_address)
    return st.integers(first, first + subnet.num_addresses - 1).map(
        lambda value: subnet.network_address + (value - first)
    )


@given(st.data(), subnets_and_bits())
def test_block_at_and_block_index_round_trip(
    data: st.DataObject, case: tuple[Network, int]
) -> None:
    subnet, bits = case
    validate_block_size(subnet, bits, OP)
    count = block_count(subnet, bits)
    assert count * 2**bits == subnet.num_addresses
    index = data.draw(st.integers(0, count - 1))
    block = block_at(subnet, bits, index, OP)
    assert block.version == subnet.version
    assert block.num_addresses == 2**bits
    assert int(block.network_address) == int(subnet.network_address) + index * 2**bits
    assert block.subnet_of(subnet)  # type: ignore[arg-type]
    assert block_index(subnet, bits, block, OP) == index


@given(st.data(), subnets_and_bits())
def test_every_address_lies_in_its_block_only(
    data: st.DataObject, case: tuple[Network, int]
) -> None:
    subnet, bits = case
    address = data.draw(addresses_in(subnet))
    block = block_of(subnet, bits, address, OP)
    assert address in block
    index = block_index(subnet, bits, block, OP)
    assert index == (int(address) - int(subnet.network_address)) // 2**bits
    for neighbour in (index - 1, index + 1):
        if 0 <= neighbour < block_count(subnet, bits):
            assert address not in block_at(subnet, bits, neighbour, OP)


@given(subnets_and_bits(max_host_bits=10))
def test_blocks_are_disjoint_and_cover_the_subnet(case: tuple[Network, int]) -> None:
    subnet, bits = case
    blocks = [block_at(subnet, bits, i, OP) for i in range(block_count(subnet, bits))]
    seen: set[Address] = set()
    for block in blocks:
        addresses = set(addresses_of(block))
        assert not addresses & seen
        seen |= addresses
    assert seen == set(addresses_of(subnet))
    for address in addresses_of(subnet):
        assert address in block_of(subnet, bits, address, OP)


# --- block keys --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "key"),
    [
        ("10.0.0.32/27", "10.0.0.32_27"),
        ("10.0.0.7/32", "10.0.0.7_32"),
        ("fd00::20/123", "fd00::20_123"),
        ("fd00::1/128", "fd00::1_128"),
        ("::/0", "::_0"),
    ],
    ids=lambda value: value,
)
def test_block_keys(block: str, key: str) -> None:
    assert block_key(net(block)) == key
    assert parse_block_key(key, OP) == net(block)


@pytest.mark.parametrize(
    "key",
    [
        "",
        "abc",
        "10.0.0.32/27",
        "10.0.0.32-27",
        "10.0.0.32_",
        "10.0.0.32",
        "10.0.0.33_27",
        "10.0.0.32_27_1",
        "10.0.0.32_027",
        "FD00::20_123",
        "fd00:0::20_123",
    ],
    ids=repr,
)
def test_parse_block_key_rejects_non_canonical_keys(key: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_block_key(key, "node release-block")
    assert str(caught.value).startswith(f'node release-block "{key}": ')


@given(subnets())
def test_block_key_round_trip(block: Network) -> None:
    key = block_key(block)
    assert "/" not in key
    assert parse_block_key(key, OP) == block


# --- overlaps and families ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("10.0.0.0/24", "10.0.0.0/24", True),
        ("10.0.0.0/16", "10.0.3.0/24", True),
        ("10.0.3.0/24", "10.0.0.0/16", True),
        ("10.0.0.0/24", "10.0.1.0/24", False),
        ("10.0.0.255/32", "10.0.1.0/24", False),
        ("10.0.0.0/24", "10.0.0.255/32", True),
        ("0.0.0.0/0", "fd00::/8", False),
        ("10.0.0.0/8", "::ffff:10.0.0.0/104", False),
        ("::/0", "0.0.0.0/0", False),
        ("fd00::/64", "fd00::8000/113", True),
        ("fd00::/64", "fd00:0:0:1::/64", False),
    ],
    ids=lambda value: str(value),
)
def test_overlapping(a: str, b: str, expected: bool) -> None:
    assert overlapping(net(a), net(b)) is expected
    assert overlapping(net(b), net(a)) is expected


@given(subnets(max_host_bits=6), subnets(max_host_bits=6))
def test_overlapping_matches_shared_addresses(a: Network, b: Network) -> None:
    # Squeeze both into one small subnet so that overlaps are common.
    space = 2**8
    a = type(a)((int(a.network_address) % space, a.prefixlen))
    b = type(b)((int(b.network_address) % space, b.prefixlen))
    shared = a.version == b.version and bool(set(a) & set(b))
    assert overlapping(a, b) is shared


def test_find_overlap_returns_the_first_overlapping_pool() -> None:
    existing: list[tuple[str, Network]] = [
        ("default", net("10.0.0.0/16")),
        ("v6", net("fd00::/48")),
        ("other", net("10.1.0.0/16")),
        ("wide", net("10.0.0.0/8")),
    ]
    assert find_overlap(net("10.1.2.0/24"), existing) == ("other", net("10.1.0.0/16"))
    assert find_overlap(net("fd00:0:0:1::/64"), existing) == ("v6", net("fd00::/48"))
    assert find_overlap(net("10.2.0.0/16"), existing) == ("wide", net("10.0.0.0/8"))
    assert find_overlap(net("192.168.0.0/16"), existing) is None
    assert find_overlap(net("::/0"), existing[:1]) is None
    assert find_overlap(net("10.0.0.0/8"), iter(existing)) == ("default", net("10.0.0.0/16"))
    assert find_overlap(net("10.0.0.0/8"), []) is None


@pytest.mark.parametrize(
    ("value", "family"),
    [
        (net("10.0.0.0/8"), 4),
        (addr("10.0.0.1"), 4),
        (net("fd00::/8"), 6),
        (addr("::ffff:10.0.0.1"), 6),
        (addr("::1"), 6),
    ],
    ids=str,
)
def test_family_of(value: Network | Address, family: int) -> None:
    assert family_of(value) == family


# --- BlockAddresses: examples ------------------------------------------------------------------


def test_fresh_block_hands_out_addresses_in_order() -> None:
    chooser = BlockAddresses(net("10.0.0.0/30"))
    assert chooser.capacity == 4
    assert chooser.is_empty
    assert [str(chooser.allocate()) for _ in range(4)] == [
        "10.0.0.0",
        "10.0.0.1",
        "10.0.0.2",
        "10.0.0.3",
    ]
    assert chooser.is_full
    with pytest.raises(PoolExhausted) as caught:
        chooser.allocate()
    assert "10.0.0.0/30" in str(caught.value)


def test_reserved_addresses_are_skipped_and_not_counted() -> None:
    chooser = BlockAddresses(
        net("10.0.0.0/30"),
        reserved=[addr("10.0.0.0"), addr("10.0.0.3"), addr("10.0.1.255"), addr("fd00::")],
    )
    assert chooser.capacity == 2
    assert {str(chooser.allocate()), str(chooser.allocate())} == {"10.0.0.1", "10.0.0.2"}
    assert chooser.is_full
    with pytest.raises(PoolExhausted):
        chooser.allocate()


def test_single_address_blocks() -> None:
    for block in (net("10.0.0.9/32"), net("fd00::9/128")):
        chooser = BlockAddresses(block)
        assert chooser.allocate() == block.network_address
        with pytest.raises(PoolExhausted):
            chooser.allocate()
        assert chooser.release(block.network_address)
        assert chooser.allocate() == block.network_address


def test_last_resumes_after_the_cursor_and_wraps() -> None:
    chooser = BlockAddresses(
        net("fd00::/126"), used=[addr("fd00::1")], last=addr("fd00::2"), reserved=[]
    )
    assert chooser.allocate() == addr("fd00::3")
    assert chooser.allocate() == addr("fd00::")
    assert chooser.allocate() == addr("fd00::2")
    assert chooser.last == addr("fd00::2")


def test_release_does_not_reuse_at_once() -> None:
    chooser = BlockAddresses(net("10.0.0.0/29"))
    first = chooser.allocate()
    assert chooser.release(first)
    assert not chooser.release(first)
    assert chooser.allocate() != first


def test_take_and_membership() -> None:
    chooser = BlockAddresses(net("10.0.0.0/29"), reserved=[addr("10.0.0.0")])
    chooser.take(addr("10.0.0.5"))
    assert addr("10.0.0.5") in chooser
    assert addr("10.0.0.4") not in chooser
    assert addr("10.0.1.5") not in chooser
    assert "10.0.0.5" not in chooser
    with pytest.raises(AlreadyExists) as exists:
        chooser.take(addr("10.0.0.5"))
    assert '"10.0.0.5"' in str(exists.value)
    with pytest.raises(InvalidArgument) as reserved:
        chooser.take(addr("10.0.0.0"))
    assert '"10.0.0.0"' in str(reserved.value)
    for outside in ("10.0.0.8", "::a00:5"):
        with pytest.raises(InvalidArgument) as caught:
            chooser.take(addr(outside))
        assert f'"{outside}"' in str(caught.value)
    assert chooser.used() == [addr("10.0.0.5")]
    assert not chooser.release(addr("10.0.1.5"))
    assert not chooser.release(addr("10.0.0.0"))


@pytest.mark.parametrize(
    ("used", "last", "reserved"),
    [
        (["10.0.1.1"], None, []),
        (["::a00:1"], None, []),
        ([], "10.0.1.1", []),
        (["10.0.0.1"], None, ["10.0.0.1"]),
    ],
    ids=str,
)
def test_inconsistent_state_is_rejected(
    used: list[str], last: str | None, reserved: list[str]
) -> None:
    with pytest.raises(InvalidArgument):
        BlockAddresses(
            net("10.0.0.0/29"),
            used=[addr(a) for a in used],
            last=None if last is None else addr(last),
            reserved=[addr(a) for a in reserved],
        )


def test_blocks_larger_than_the_limit_are_refused() -> None:
    BlockAddresses(net("10.0.0.0/16"))
    with pytest.raises(ValueError):
        BlockAddresses(net("10.0.0.0/15"))


def test_allocate_in_a_mostly_free_large_block_is_quick() -> None:
    chooser = BlockAddresses(net("fd00::/112"))
    handed_out = [chooser.allocate() for _ in range(2**16)]
    assert len(set(handed_out)) == 2**16
    assert chooser.is_full


# --- BlockAddresses against a reference model ---------------------------------------------------


class ModelBlock:
    """A deliberately naive round-robin chooser: a list of the block's addresses and a cursor."""

    def __init__(
        self,
        block: Network,
        used: Iterable[Address],
        last: Address | None,
        reserved: Iterable[Address],
    ) -> None:
        self.addresses = addresses_of(block)
        self.used = list(used)
        self.reserved = [a for a in reserved if a.version == block.version and a in block]
        self.cursor = 0 if last is None else self.addresses.index(last) + 1

    def free(self) -> list[Address]:
        return [a for a in self.addresses if a not in self.used and a not in self.reserved]

    def allocate(self) -> Address | None:
        count = len(self.addresses)
        for step in range(count):
            position = (self.cursor + step) % count
            candidate = self.addresses[position]
            if candidate not in self.used and candidate not in self.reserved:
                self.used.append(candidate)
                self.cursor = position + 1
                return candidate
        return None

    def take(self, address: Address) -> str:
        if address not in self.addresses or address in self.reserved:
            return "invalid"
        if address in self.used:
            return "exists"
        self.used.append(address)
        return "ok"

    def release(self, address: Address) -> bool:
        if address in self.used:
            self.used.remove(address)
            return True
        return False


@st.composite
def block_states(
    draw: st.DrawFn,
) -> tuple[Network, list[Address], Address | None, list[Address]]:
    version = draw(st.sampled_from([4, 6]))
    bits = draw(st.integers(0, 5))
    if version == 4:
        block: Network = ipaddress.IPv4Network(
            (int(addr("10.0.0.0")) + draw(st.integers(0, 255)) * 2**bits, 32 - bits)
        )
    else:
        block = ipaddress.IPv6Network(
            (int(addr("fd00::")) + draw(st.integers(0, 255)) * 2**bits, 128 - bits)
        )
    offsets = list(range(block.num_addresses))
    reserved_offsets = draw(st.sets(st.sampled_from(offsets)))
    used_offsets = draw(st.sets(st.sampled_from(offsets)).map(lambda s: s - reserved_offsets))
    last = draw(st.none() | st.sampled_from(offsets))
    # Reserved addresses just outside the block must be ignored.
    outside = [block.network_address - 1, block.broadcast_address + 1]
    reserved = [block.network_address + o for o in sorted(reserved_offsets)]
    reserved += draw(st.lists(st.sampled_from(outside), max_size=2))
    return (
        block,
        [block.network_address + o for o in sorted(used_offsets)],
        None if last is None else block.network_address + last,
        reserved,
    )


operations = st.lists(
    st.tuples(st.sampled_from(["allocate", "take", "release"]), st.integers(-1, 33)),
    max_size=80,
)


@given(block_states(), operations)
def test_block_addresses_behave_like_the_model(
    state: tuple[Network, list[Address], Address | None, list[Address]],
    ops: list[tuple[str, int]],
) -> None:
    block, used, last, reserved = state
    chooser = BlockAddresses(block, used=used, last=last, reserved=reserved)
    model = ModelBlock(block, used, last, reserved)
    for name, offset in ops:
        address = block.network_address + offset
        if name == "allocate":
            expected = model.allocate()
            if expected is None:
                with pytest.raises(PoolExhausted):
                    chooser.allocate()
            else:
                assert chooser.allocate() == expected
                assert chooser.last == expected
        elif name == "take":
            outcome = model.take(address)
            if outcome == "invalid":
                with pytest.raises(InvalidArgument):
                    chooser.take(address)
            elif outcome == "exists":
                with pytest.raises(AlreadyExists):
                    chooser.take(address)
            else:
                chooser.take(address)
        else:
            assert chooser.release(address) is model.release(address)
        assert chooser.used() == sorted(model.used)
        assert chooser.used_count == len(model.used)
        assert chooser.capacity == len(model.addresses) - len(model.reserved)
        assert chooser.is_full is (not model.free())
        assert chooser.is_empty is (not model.used)
        assert (address in chooser) is (address in model.used)


@given(block_states())
def test_allocate_hands_out_each_free_address_once_until_full(
    state: tuple[Network, list[Address], Address | None, list[Address]],
) -> None:
    block, used, last, reserved = state
    chooser = BlockAddresses(block, used=used, last=last, reserved=reserved)
    free = {a for a in addresses_of(block) if a not in used and a not in reserved}
    handed_out = [chooser.allocate() for _ in range(len(free))]
    assert len(handed_out) == len(set(handed_out))
    assert set(handed_out) == free
    assert chooser.is_full
    with pytest.raises(PoolExhausted):
        chooser.allocate()
    assert set(chooser.used()) == free | set(used)


@given(block_states())
def test_released_address_comes_back_only_after_every_other_free_address(
    state: tuple[Network, list[Address], Address | None, list[Address]],
) -> None:
    block, used, last, reserved = state
    chooser = BlockAddresses(block, used=used, last=last, reserved=reserved)
    if chooser.is_full:
        return
    released = chooser.allocate()
    assert chooser.release(released)
    others = {a for a in addresses_of(block) if a not in used and a not in reserved} - {released}
    next_ones = [chooser.allocate() for _ in range(len(others))]
    assert set(next_ones) == others
    assert chooser.allocate() == released
