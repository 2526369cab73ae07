"""coil's input rules, defined once: names, attachments, subnets and addresses as text.

Pure logic. Each function takes an ``op`` (``"pool create"``, ``"allocate"``...) and raises
`coil_core.errors.InvalidArgument` with a message that starts with it and quotes the input, e.g.
``pool create "Bad_Name": not a valid namespace name``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import TypeAlias

from coil_core.errors import InvalidArgument

Network: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
Address: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address

MAX_POOL_NAME_LENGTH = 63
_CIDR = re.compile(r"(?P<address>[^/]+)/(?P<prefixlen>[0-9]{1,3})")
_DNS1123_RULE = (
    "DNS-1123 label: 1-63 characters of lowercase a-z, 0-9 and '-', "
    "starting and ending with a letter or digit"
)
_POOL_NAME_CHARS = re.compile(r"[a-z0-9-]*")


def validate_pool_name(name: str, op: str) -> str:
    """Return ``name`` if it is a valid Kubernetes namespace name (a DNS-1123 label).

    Raises:
        InvalidArgument: ``name`` is empty, longer than 63 characters, contains anything but
            lowercase a-z, 0-9 and '-', or starts or ends with '-'.
    """
    if not name:
        reason = "empty"
    elif len(name) > MAX_POOL_NAME_LENGTH:
        reason = f"{len(name)} characters, more than {MAX_POOL_NAME_LENGTH}"
    elif not _POOL_NAME_CHARS.fullmatch(name):
        bad = next(c for c in name if not _POOL_NAME_CHARS.fullmatch(c))
        reason = f"character {bad!r} is not allowed"
    elif name.startswith("-") or name.endswith("-"):
        reason = "starts or ends with '-'"
    else:
        return name
    raise InvalidArgument(
        f"{op} {quoted(name)}: not a valid namespace name: {reason} ({_DNS1123_RULE})"
    )


def parse_subnet(text: str, op: str) -> Network:
    """Parse a CIDR such as ``"10.0.0.0/16"`` or ``"fd00::/48"`` strictly.

    The prefix length must be written in decimal (no netmask form) and the address must be the
    network address. ``str()`` of the result is the canonical form (IPv6 compressed, lowercase).

    Raises:
        InvalidArgument: ``text`` is not a CIDR, lacks the prefix length, has a prefix length out
            of range for its family, or has host bits set (the message suggests the network
            address).
    """
    match = _CIDR.fullmatch(text)
    if match is None:
        if "/" not in text and _is_address(text):
            raise InvalidArgument(
                f'{op} "{text}": missing prefix length (expected a CIDR like "{text}/<length>")'
            )
        raise InvalidArgument(
            f'{op} "{text}": not a CIDR (expected an address and a prefix length, '
            'like "10.0.0.0/16" or "fd00::/48")'
        )
    address_text = match["address"]
    if not _is_address(address_text):
        raise InvalidArgument(f'{op} "{text}": "{address_text}" is not an IPv4 or IPv6 address')
    address = ipaddress.ip_address(address_text)
    prefixlen = int(match["prefixlen"])
    if prefixlen > address.max_prefixlen:
        raise InvalidArgument(
            f'{op} "{text}": prefix length {prefixlen} is out of range for '
            f"IPv{address.version} (0-{address.max_prefixlen})"
        )
    network = ipaddress.ip_network((address, prefixlen), strict=False)
    if network.network_address != address:
        raise InvalidArgument(
            f'{op} "{text}": not a network address (host bits set); did you mean "{network}"?'
        )
    return network


def _is_address(text: str) -> bool:
    # A scope id ("fe80::1%eth0") names an interface; it has no place in a pool's subnet.
    if "%" in text:
        return False
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


_UNUSABLE_RANGES: tuple[tuple[Network, str], ...] = tuple(
    (ipaddress.ip_network(cidr), what)
    for cidr, what in (
        ("0.0.0.0/8", "the unspecified range"),
        ("127.0.0.0/8", "the loopback range"),
        ("169.254.0.0/16", "the link-local range"),
        ("224.0.0.0/4", "the multicast range"),
        ("::/128", "the unspecified address"),
        ("::1/128", "the loopback address"),
        ("::ffff:0:0/96", "the IPv4-mapped range (it would overlap IPv4 pools)"),
        ("fe80::/10", "the link-local range"),
        ("ff00::/8", "the multicast range"),
    )
)


def validate_subnet_scope(subnet: Network, op: str) -> Network:
    """Return `subnet` if pods can use its addresses: it must not overlap the unspecified,
    loopback, link-local or multicast ranges, nor (IPv6) the IPv4-mapped range ``::ffff:0:0/96``,
    whose addresses stand for IPv4 ones and would overlap IPv4 pools.

    Raises:
        InvalidArgument: naming the subnet and the range it overlaps.
    """
    for reserved, what in _UNUSABLE_RANGES:
        if (
            reserved.version == subnet.version
            and int(reserved.network_address) <= int(subnet.broadcast_address)
            and int(subnet.network_address) <= int(reserved.broadcast_address)
        ):
            raise InvalidArgument(
                f'{op} "{subnet}": overlaps {what} {reserved}; pods cannot be given such addresses'
            )
    return subnet


_CONTAINER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,254}")
MAX_INTERFACE_BYTES = 15  # IFNAMSIZ - 1
MAX_NAMESPACE_LENGTH = 63  # a Kubernetes namespace name is a DNS-1123 label
MAX_POD_NAME_LENGTH = 253  # a Kubernetes pod name is a DNS-1123 subdomain
QUOTE_LIMIT = 80
"""Characters of an input an error message quotes; the rest is cut (`quoted`)."""
_NODE_NAME = re.compile(r"[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?")


def validate_node_name(node: str, op: str) -> str:
    """Return `node` if it is a valid node name (DNS-1123 subdomain); else InvalidArgument."""
    if not _NODE_NAME.fullmatch(node or ""):
        raise InvalidArgument(
            f'{op} node {quoted(node)}: not a valid node name (lowercase a-z, 0-9, "-" and ".", '
            "starting and ending with a letter or digit, at most 253 characters)"
        )
    return node


def parse_address(text: str, op: str) -> Address:
    """Parse a bare IP address ("10.0.0.5", "fd00::5"); InvalidArgument if it is not one."""
    if "%" in text:
        raise InvalidArgument(
            f"{op} {quoted(text)}: a scoped (link-local) address cannot be allocated"
        )
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise InvalidArgument(f"{op} {quoted(text)}: not an IP address") from None


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` in double quotes for an error message, cut after ``limit`` characters with a
    note of its full length (an error quoting a 10 KB input must still fit a status trailer)."""
    if len(text) <= limit:
        return f'"{text}"'
    return f'"{text[:limit]}..." ({len(text)} characters)'


def valid_interface(name: str) -> bool:
    """Whether Linux accepts ``name`` for an interface (what its ``dev_valid_name`` checks):
    1-15 bytes of printable UTF-8, not "." or "..", without "/", ":" or whitespace. The CNI
    plugin applies the same rule to CNI_IFNAME."""
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        return False
    return (
        0 < size <= MAX_INTERFACE_BYTES
        and name.isprintable()
        and name not in (".", "..")
        and not any(c in name for c in "/:")
        and not any(c.isspace() for c in name)
    )


def validate_attachment(container_id: str, interface: str, op: str) -> None:
    """Check a CNI attachment: its container ID and interface name.

    Raises:
        InvalidArgument: the container ID is not 1-255 letters, digits, '_', '.' and '-'
            starting with a letter or digit, or the interface is not a name Linux accepts
            (`valid_interface`).
    """
    if not _CONTAINER_ID.fullmatch(container_id):
        raise InvalidArgument(
            f"{op} container ID {quoted(container_id)}: must be 1-255 characters of "
            "letters, digits, '_', '.' and '-', starting with a letter or digit"
        )
    if not valid_interface(interface):
        raise InvalidArgument(
            f"{op} interface {quoted(interface)}: not a valid interface name (1-15 bytes of "
            'printable UTF-8, not "." or "..", without "/", ":" or whitespace)'
        )


def validate_pod(namespace: str, pod: str, op: str) -> None:
    """Check the pod an attachment belongs to: only the lengths Kubernetes allows (a namespace
    of at most 63 characters, a pod name of at most 253), so one huge name cannot fail the
    batch it is recorded in.

    Raises:
        InvalidArgument: a name is longer than that.
    """
    if len(namespace) > MAX_NAMESPACE_LENGTH:
        raise InvalidArgument(
            f"{op} namespace {quoted(namespace)}: {len(namespace)} characters, more than "
            f"{MAX_NAMESPACE_LENGTH}"
        )
    if len(pod) > MAX_POD_NAME_LENGTH:
        raise InvalidArgument(
            f"{op} pod name {quoted(pod)}: {len(pod)} characters, more than {MAX_POD_NAME_LENGTH}"
        )
