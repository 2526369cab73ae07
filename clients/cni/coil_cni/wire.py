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
RESPONSE_ADDRESSES = 1  # AllocateResponse, CheckResponse
POD_ADDRESS_ADDRESS = 1
POD_ADDRESS_GATEWAY = 2
POD_ADDRESS_POOL = 3

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
    return b"".join(_field(GC_VALID, attachment(c, i)) for c, i in valid)


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


def fields(data: bytes) -> list[tuple[int, bytes]]:
    """The length-delimited fields of a message, in order; other wire types are skipped.

    Raises ValueError for a message that is not well formed."""
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, pos = _read_varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == _LEN:
            size, pos = _read_varint(data, pos)
            if pos + size > len(data):
                raise ValueError("truncated field")
            out.append((number, data[pos : pos + size]))
            pos += size
        else:
            raise ValueError(f"unsupported wire type {wire}")
    if pos != len(data):
        raise ValueError("truncated field")
    return out


def pod_addresses(response: bytes) -> list[tuple[str, str]]:
    """(address, gateway) of each PodAddress in an AllocateResponse or CheckResponse."""
    found = []
    for number, payload in fields(response):
        if number != RESPONSE_ADDRESSES:
            continue
        values = {n: v.decode() for n, v in fields(payload)}
        found.append((values.get(POD_ADDRESS_ADDRESS, ""), values.get(POD_ADDRESS_GATEWAY, "")))
    return found
