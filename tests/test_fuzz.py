"""Property tests with random input for every parser and validator at coil's edges, and for the
subnet and block arithmetic under them.

The contract checked: a parser either accepts its input or raises its package's own error type
(``CNIError`` with a CNI code in the plugin, ``InvalidArgument`` in the allocator), never another
exception; and what it accepts is well formed (an accepted block key is canonical, an accepted
record's address lies in its block, ...). Runs are derandomized and keep no example database, so
the suite is repeatable; each property stays well under two seconds.
"""

from __future__ import annotations

import ipaddress
import json
import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coil_cni import config
from coil_cni.errors import (
    DECODING_FAILURE,
    INCOMPATIBLE_VERSION,
    INVALID_CONFIG,
    INVALID_ENVIRONMENT,
    CNIError,
)
from coil_core.blocks import (
    Network,
    block_at,
    block_count,
    block_index,
    block_key,
    block_of,
    find_overlap,
    overlapping,
    parse_block_key,
    parse_subnet,
    validate_block_size,
)
from coil_core.errors import InvalidArgument
from coil_core.model import (
    Owner,
    RecordRequest,
    parse_address,
)
from coil_core.rules import validate_node_name, validate_pool_name

FUZZ = settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CONFIG_CODES = {DECODING_FAILURE, INCOMPATIBLE_VERSION, INVALID_CONFIG}

# -- strategies -----------------------------------------------------------------------------------

# Characters addresses, CIDRs, block keys and names are made of, plus a few that must be refused.
ADDRESS_CHARS = st.sampled_from(list("0123456789abcdefABCDEF.:/_%-x ") + ["\n", "\u0661", "é"])
address_like = st.text(ADDRESS_CHARS, max_size=45)
any_text = st.text(max_size=80)
texts = st.one_of(address_like, any_text)

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    address_like,
    st.text(max_size=12),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)
wrong_json = st.one_of(json_scalars, st.lists(json_scalars, max_size=2))
"""A value of the wrong shape for a field: cheaper to draw than `json_values`."""


@st.composite
def netconfs(draw: st.DrawFn) -> dict[str, Any]:
    """Configurations near a real one: the keys coil reads, each absent, valid or random."""

    def maybe(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
        return st.one_of(valid, wrong_json)

    conf: dict[str, Any] = draw(st.dictionaries(st.text(max_size=8), wrong_json, max_size=2))
    fields: dict[str, st.SearchStrategy[Any]] = {
        "cniVersion": maybe(st.sampled_from([*config.SUPPORTED_VERSIONS, "0.1.0", "1.1"])),
        "ipam": maybe(
            st.fixed_dictionaries(
                {},
                optional={
                    "type": maybe(st.just("coil")),
                    "socket": maybe(st.sampled_from(["/run/coild.sock", "coild.sock", ""])),
                    "timeout": maybe(st.floats(allow_nan=True) | st.integers()),
                },
            )
        ),
        "runtimeConfig": maybe(st.fixed_dictionaries({"ips": maybe(st.lists(address_like))})),
        "args": maybe(
            st.fixed_dictionaries(
                {"cni": maybe(st.fixed_dictionaries({"ips": maybe(st.lists(address_like))}))}
            )
        ),
        "prevResult": maybe(
            st.fixed_dictionaries(
                {"ips": maybe(st.lists(st.fixed_dictionaries({"address": maybe(address_like)})))}
            )
        ),
        "cni.dev/valid-attachments": maybe(
            st.lists(st.fixed_dictionaries({"containerID": maybe(texts), "ifname": maybe(texts)}))
        ),
    }
    for key, strategy in fields.items():
        if draw(st.booleans()):
            conf[key] = draw(strategy)
    return conf


def environment_values() -> st.SearchStrategy[str]:
    """What os.environ can hold: any bytes but NUL, decoded as Python decodes the environment."""
    raw = st.binary(max_size=40).map(lambda b: b.replace(b"\0", b""))
    return st.one_of(texts, raw.map(os.fsdecode))


def _cni_error(e: CNIError, codes: set[int]) -> None:
    assert e.code in codes, (e.code, e.msg)
    assert e.msg


# -- the CNI plugin's parsers ---------------------------------------------------------------------


@FUZZ
@given(st.binary(max_size=200))
def test_netconf_random_bytes_parse_or_fail_with_code_6(data: bytes) -> None:
    try:
        conf = config.parse_netconf(data)
    except CNIError as e:
        _cni_error(e, {DECODING_FAILURE})
    else:
        assert isinstance(conf, dict)


@FUZZ
@given(json_values)
def test_netconf_random_json_parse_or_fail_with_code_6(value: Any) -> None:
    data = json.dumps(value).encode()
    try:
        conf = config.parse_netconf(data)
    except CNIError as e:
        assert not isinstance(value, dict)
        _cni_error(e, {DECODING_FAILURE})
    else:
        assert isinstance(value, dict) and conf == json.loads(data)


@settings(FUZZ, max_examples=200)
@given(netconfs(), st.sampled_from(config.COMMANDS))
def test_netconf_sections_parse_or_fail_with_a_config_code(
    conf: dict[str, Any], command: str
) -> None:
    # Through JSON and back, as the plugin reads it.
    conf = config.parse_netconf(json.dumps(conf).encode())
    readers = [
        lambda: config.config_version(conf, command),
        lambda: config.parse_ipam(conf),
        lambda: config.requested_addresses(conf),
        lambda: config.valid_attachments(conf),
        lambda: config.prev_result_addresses(conf),
    ]
    for read in readers:
        try:
            read()
        except CNIError as e:
            _cni_error(e, CONFIG_CODES)


@settings(FUZZ, max_examples=200)
@given(netconfs())
def test_requested_addresses_are_bare_unique_addresses(conf: dict[str, Any]) -> None:
    try:
        addresses = config.requested_addresses(conf)
    except CNIError as e:
        _cni_error(e, {INVALID_CONFIG})
        return
    assert len(addresses) == len(set(addresses))
    for address in addresses:
        assert "/" not in address
        assert str(ipaddress.ip_address(address)) == address


@settings(FUZZ, max_examples=200)
@given(netconfs())
def test_ipam_section_accepted_only_when_well_formed(conf: dict[str, Any]) -> None:
    try:
        ipam = config.parse_ipam(conf)
    except CNIError as e:
        _cni_error(e, {INVALID_CONFIG})
        return
    assert conf["ipam"]["type"] == "coil"
    assert ipam.socket.startswith("/")
    assert ipam.timeout > 0 and ipam.timeout != float("inf")


@FUZZ
@given(
    st.one_of(
        environment_values(),
        st.lists(
            st.tuples(
                st.sampled_from([*config.KNOWN_ARGS, "FOO", "", "ignoreunknown"]),
                st.sampled_from(["", "=", "=1", "=true", "=False", "=x;", "=a=b"]),
                environment_values(),
            ).map(lambda t: f"{t[0]}{t[1]}{t[2]}"),
            max_size=5,
        ).map(";".join),
    )
)
def test_cni_args_parse_or_fail_with_code_4(value: str) -> None:
    try:
        pod = config.parse_cni_args(value)
    except CNIError as e:
        _cni_error(e, {INVALID_ENVIRONMENT})
        return
    assert pod.namespace


@FUZZ
@given(
    st.dictionaries(st.sampled_from(["CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"]), texts),
    st.sampled_from(config.COMMANDS),
)
def test_cni_environment_parse_or_fail_with_code_4(env: dict[str, str], command: str) -> None:
    try:
        attachment = config.attachment_from_env(env, command)
    except CNIError as e:
        _cni_error(e, {INVALID_ENVIRONMENT})
        return
    assert attachment.container_id and attachment.ifname


@FUZZ
@given(
    st.tuples(st.binary(max_size=6), st.binary(max_size=6)).map(
        lambda t: os.fsdecode(t[0].replace(b"\0", b"") + b"\x80" + t[1].replace(b"\0", b""))
    ),
    st.sampled_from(config.COMMANDS),
)
def test_cni_environment_undecodable_ifname_fails_with_code_4(ifname: str, command: str) -> None:
    env = {"CNI_CONTAINERID": "4f3a9c0e1b2d", "CNI_IFNAME": ifname, "CNI_NETNS": "/x"}
    try:
        config.attachment_from_env(env, command)
    except CNIError as e:
        _cni_error(e, {INVALID_ENVIRONMENT})


# -- the allocator's request validators -----------------------------------------------------------


@FUZZ
@given(texts)
def test_parse_address_returns_an_address_or_invalid_argument(text: str) -> None:
    try:
        address = parse_address(text, "fuzz")
    except InvalidArgument as e:
        assert str(e).startswith("fuzz")
        return
    assert address == ipaddress.ip_address(text)


@FUZZ
@given(st.one_of(texts, st.from_regex(r"[a-z0-9][a-z0-9.\-]{0,260}", fullmatch=True)))
def test_validate_node_name(text: str) -> None:
    try:
        assert validate_node_name(text, "fuzz") == text
    except InvalidArgument as e:
        assert str(e).startswith("fuzz")
        return
    assert 1 <= len(text) <= 253 and text.isascii()


@FUZZ
@given(st.one_of(texts, st.from_regex(r"[a-z0-9][a-z0-9-]{0,64}", fullmatch=True)))
def test_validate_pool_name(text: str) -> None:
    try:
        assert validate_pool_name(text, "fuzz") == text
    except InvalidArgument as e:
        assert str(e).startswith(f'fuzz "{text}"')
        return
    assert 1 <= len(text) <= 63 and text.isascii() and text == text.lower()


@FUZZ
@given(texts, texts)
def test_owner_validate(container_id: str, interface: str) -> None:
    owner = Owner("default", "pod", container_id, interface)
    try:
        assert owner.validate("fuzz") is owner
    except InvalidArgument as e:
        assert str(e).startswith("fuzz")
        return
    assert 1 <= len(container_id) <= 255 and 1 <= len(interface) <= 15


@FUZZ
@given(texts)
def test_parse_subnet_accepts_only_canonical_networks(text: str) -> None:
    try:
        subnet = parse_subnet(text, "fuzz")
    except InvalidArgument as e:
        assert str(e).startswith(f'fuzz "{text}"')
        return
    assert ipaddress.ip_network(text) == subnet  # strict: no host bits
    assert parse_subnet(str(subnet), "fuzz") == subnet


@FUZZ
@given(st.one_of(texts, address_like.map(lambda t: t.replace("/", "_"))))
def test_parse_block_key_accepts_only_canonical_keys(key: str) -> None:
    try:
        block = parse_block_key(key, "fuzz")
    except InvalidArgument as e:
        assert str(e).startswith(f'fuzz "{key}"')
        return
    assert block_key(block) == key


@st.composite
def record_fields(draw: st.DrawFn) -> tuple[str, str, str, Owner]:
    """Record requests near valid ones: an address and a block of 10.0.0.0/24, or random text."""
    address = draw(st.one_of(st.integers(0, 255).map(lambda i: f"10.0.0.{i}"), texts))
    length = draw(st.integers(24, 32))
    start = draw(st.integers(0, 255)) >> (32 - length) << (32 - length)
    block = draw(st.one_of(st.just(f"10.0.0.{start}/{length}"), texts))
    pool = draw(st.one_of(st.just("default"), texts))
    owner = Owner(
        "default",
        "pod",
        draw(st.one_of(st.just("c1"), texts)),
        draw(st.one_of(st.just("eth0"), texts)),
    )
    return address, pool, block, owner


@FUZZ
@given(record_fields())
def test_record_request_from_strings(fields: tuple[str, str, str, Owner]) -> None:
    address, pool, block, owner = fields
    try:
        request = RecordRequest.from_strings(address, pool, block, owner)
    except InvalidArgument as e:
        assert str(e).startswith("record")
        return
    assert request.address in request.block
    assert request.pool == pool and request.owner is owner


# -- subnet and block arithmetic ------------------------------------------------------------------


@st.composite
def subnets_and_bits(draw: st.DrawFn) -> tuple[Network, int]:
    """A valid subnet of either family and a block size that fits it."""
    version = draw(st.sampled_from([4, 6]))
    max_prefixlen = 32 if version == 4 else 128
    prefixlen = draw(st.integers(0, max_prefixlen))
    host = max_prefixlen - prefixlen
    start = draw(st.integers(0, 2**max_prefixlen - 1)) >> host << host
    subnet: Network = (
        ipaddress.IPv4Network((start, prefixlen))
        if version == 4
        else ipaddress.IPv6Network((start, prefixlen))
    )
    bits = draw(st.integers(0, min(16, host)))
    return subnet, bits


@FUZZ
@given(subnets_and_bits(), st.data())
def test_block_at_index_of_agree(subnet_bits: tuple[Network, int], data: st.DataObject) -> None:
    subnet, bits = subnet_bits
    validate_block_size(subnet, bits, "fuzz")
    count = block_count(subnet, bits)
    assert count == subnet.num_addresses >> bits
    index = data.draw(st.integers(0, count - 1))
    block = block_at(subnet, bits, index, "fuzz")
    assert block.version == subnet.version
    assert block.num_addresses == 2**bits
    assert block.subnet_of(subnet)  # type: ignore[arg-type]
    assert block_index(subnet, bits, block, "fuzz") == index
    offset = data.draw(st.integers(0, 2**bits - 1))
    assert block_of(subnet, bits, block.network_address + offset, "fuzz") == block
    assert parse_block_key(block_key(block), "fuzz") == block


@FUZZ
@given(subnets_and_bits(), st.integers(min_value=-(2**20), max_value=2**130))
def test_block_at_out_of_range_is_invalid_argument(
    subnet_bits: tuple[Network, int], index: int
) -> None:
    subnet, bits = subnet_bits
    try:
        block = block_at(subnet, bits, index, "fuzz")
    except InvalidArgument:
        assert not 0 <= index < block_count(subnet, bits)
        return
    assert block_index(subnet, bits, block, "fuzz") == index


@FUZZ
@given(subnets_and_bits(), subnets_and_bits())
def test_overlapping_is_symmetric_and_agrees_with_ipaddress(
    a: tuple[Network, int], b: tuple[Network, int]
) -> None:
    x, y = a[0], b[0]
    assert overlapping(x, y) == overlapping(y, x)
    expected = x.version == y.version and x.overlaps(y)  # type: ignore[arg-type]
    assert overlapping(x, y) == expected
    assert overlapping(x, x)


small_subnets = st.builds(
    lambda length, start: ipaddress.IPv4Network(
        (0x0A000000 + (start >> (32 - length) << (32 - length)), length)
    ),
    st.integers(26, 32),
    st.integers(0, 63),
)


@FUZZ
@given(small_subnets, st.lists(small_subnets, max_size=6))
def test_find_overlap_agrees_with_brute_force(
    new: ipaddress.IPv4Network, existing: list[ipaddress.IPv4Network]
) -> None:
    named = [(f"pool-{i}", s) for i, s in enumerate(existing)]
    addresses = set(new)
    expected = next(((n, s) for n, s in named if addresses & set(s)), None)
    assert find_overlap(new, named) == expected
