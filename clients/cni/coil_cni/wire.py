"""The few NodeAgentService messages the plugin sends and reads, in protobuf's wire format.

Importing the generated stubs and protobuf's runtime costs every pod about a quarter of the
plugin's start; the plugin only builds five small requests and reads one repeated field back, so
it encodes them here. The field numbers are those of proto/coil/v1/nodeagent.proto, and
tests/test_cni_wire.py checks every encoder and decoder against the generated classes, so the
two cannot drift apart unnoticed. Unknown fields in answers are skipped, as protobuf does.
"""

from __future__ import annotations

# Field numbers (proto/coil/v1/nodeagent.proto).
ATTACHMENT_CONTAINER_ID = 1
ATTACHMENT_INTERFACE = 2
ALLOCATE_ATTACHMENT = 1
ALLOCATE_NAMESPACE = 2
ALLOCATE_POD = 3
ALLOCATE_REQUESTED = 4
REQUEST_ATTACHMENT = 1  # ReleaseRequest, CheckRequest
GC_VALID = 1
GC_VALID_LIST_COMPLETE = 2
RESPONSE_ADDRESSES = 1  # AllocateResponse, CheckResponse
POD_ADDRESS_ADDRESS = 1
POD_ADDRESS_GATEWAY = 2
POD_ADDRESS_POOL = 3

_VARINT_WIRE = 0  # wire type of integers and booleans
_LEN = 2  # wire type of strings and embedded messages


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | _LEN) + _varint(len(payload)) + payload


def _string(number: int, text: str) -> bytes:
    # proto3 leaves empty strings out.
    return _field(number, text.encode()) if text else b""


def attachment(container_id: str, interface: str) -> bytes:
    return _string(ATTACHMENT_CONTAINER_ID, container_id) + _string(ATTACHMENT_INTERFACE, interface)


def allocate_request(
    container_id: str, interface: str, namespace: str, pod: str, requested: list[str]
) -> bytes:
    return (
        _field(ALLOCATE_ATTACHMENT, attachment(container_id, interface))
        + _string(ALLOCATE_NAMESPACE, namespace)
        + _string(ALLOCATE_POD, pod)
        + b"".join(_field(ALLOCATE_REQUESTED, a.encode()) for a in requested)
    )


def attachment_request(container_id: str, interface: str) -> bytes:
    """ReleaseRequest and CheckRequest."""
    return _field(REQUEST_ATTACHMENT, attachment(container_id, interface))


def gc_request(valid: list[tuple[str, str]]) -> bytes:
    """GarbageCollectRequest: CNI GC always carries the complete valid list, so it says so
    (coild refuses a GC without that mark)."""
    return (
        b"".join(_field(GC_VALID, attachment(c, i)) for c, i in valid)
        + _varint(GC_VALID_LIST_COMPLETE << 3 | _VARINT_WIRE)
        + _varint(1)
    )


_VARINT, _I64, _START_GROUP, _END_GROUP, _I32 = 0, 1, 3, 4, 5
_MAX_FIELD = 2**29 - 1
_MAX_DEPTH = 100  # protobuf's default recursion limit, for nested groups


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or oversized varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7


def _key(data: bytes, pos: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the key); ValueError for an invalid key."""
    key, pos = _read_varint(data, pos)
    number, wire = key >> 3, key & 7
    if not 0 < number <= _MAX_FIELD:
        raise ValueError(f"invalid field number {number}")
    return number, wire, pos


def _skip(data: bytes, pos: int, number: int, wire: int, depth: int) -> int:
    """The position after the value of a field whose key ended at ``pos``; a group is skipped
    up to its matching end-group key, as protobuf skips unknown groups."""
    if wire == _VARINT:
        return _read_varint(data, pos)[1]
    if wire == _I64:
        end = pos + 8
    elif wire == _I32:
        end = pos + 4
    elif wire == _LEN:
        size, pos = _read_varint(data, pos)
        end = pos + size
    elif wire == _START_GROUP:
        if depth >= _MAX_DEPTH:
            raise ValueError("groups nested too deeply")
        while True:
            if pos >= len(data):
                raise ValueError(f"group {number} has no end")
            inner, inner_wire, pos = _key(data, pos)
            if inner_wire == _END_GROUP:
                if inner != number:
                    raise ValueError(f"group {number} ended by end-group {inner}")
                return pos
            pos = _skip(data, pos, inner, inner_wire, depth + 1)
    elif wire == _END_GROUP:
        raise ValueError(f"end-group {number} outside a group")
    else:
        raise ValueError(f"invalid wire type {wire}")
    if end > len(data):
        raise ValueError("truncated field")
    return end


def fields(data: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a message, in order, as (field number, payload); fields of
    every other wire type, groups included, are checked and skipped.

    Raises ValueError for a message that is not well formed."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        number, wire, pos = _key(data, pos)
        if wire == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            out.append((number, data[pos : pos + size]))
            pos += size
        else:
            pos = _skip(data, pos, number, wire, 0)
    return out


def _text(payload: bytes, what: str) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{what} is not UTF-8 text") from None


def pod_addresses(response: bytes) -> list[tuple[str, str]]:
    """(address, gateway) of each PodAddress in an AllocateResponse or CheckResponse.

    Only the fields the plugin knows are decoded; every other field, of any wire type and at any
    depth, is skipped as protobuf skips unknown fields (so a newer coild may add fields), and so
    is a known field number arriving with another wire type. Raises ValueError for a message that
    is not well formed or a known string that is not UTF-8."""
    found = []
    for number, payload in fields(response):
        if number != RESPONSE_ADDRESSES:
            continue
        address = gateway = ""
        for inner, value in fields(payload):
            if inner == POD_ADDRESS_ADDRESS:
                address = _text(value, "PodAddress.address")
            elif inner == POD_ADDRESS_GATEWAY:
                gateway = _text(value, "PodAddress.gateway")
        found.append((address, gateway))
    return found
