"""The CNI plugin's hand-written wire format against the generated protobuf classes: every
request it builds parses into the message it means, and it reads every answer coild may send."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coil.v1 import nodeagent_pb2 as pb
from coil_cni import wire

text = st.text(max_size=40)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text, text, text, text, st.lists(text, max_size=3))
def test_allocate_request(cid: str, ifname: str, ns: str, pod: str, requested: list[str]) -> None:
    got = pb.AllocateRequest.FromString(wire.allocate_request(cid, ifname, ns, pod, requested))
    want = pb.AllocateRequest(
        attachment=pb.Attachment(container_id=cid, interface=ifname),
        namespace=ns,
        pod=pod,
        requested_addresses=requested,
    )
    assert got == want


@settings(max_examples=200, deadline=None, derandomize=True)
@given(text, text)
def test_attachment_requests(cid: str, ifname: str) -> None:
    attachment = pb.Attachment(container_id=cid, interface=ifname)
    encoded = wire.attachment_request(cid, ifname)
    assert pb.ReleaseRequest.FromString(encoded) == pb.ReleaseRequest(attachment=attachment)
    assert pb.CheckRequest.FromString(encoded) == pb.CheckRequest(attachment=attachment)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.lists(st.tuples(text, text), max_size=5))
def test_gc_request(valid: list[tuple[str, str]]) -> None:
    got = pb.GarbageCollectRequest.FromString(wire.gc_request(valid))
    assert [(a.container_id, a.interface) for a in got.valid_attachments] == valid


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(st.tuples(text, text, text), max_size=4))
def test_pod_addresses_from_both_answers(addresses: list[tuple[str, str, str]]) -> None:
    items = [pb.PodAddress(address=a, gateway=g, pool=p) for a, g, p in addresses]
    for message in (pb.AllocateResponse(addresses=items), pb.CheckResponse(addresses=items)):
        got = wire.pod_addresses(message.SerializeToString())
        assert got == [(a, g) for a, g, _ in addresses]


def test_unknown_fields_are_skipped() -> None:
    """A newer coild may add fields of any wire type; the plugin reads past them."""
    known = pb.AllocateResponse(
        addresses=[pb.PodAddress(address="10.0.0.5/16", gateway="10.0.0.1", pool="p")]
    ).SerializeToString()
    extra = (
        bytes([(9 << 3) | 0])
        + bytes([0x96, 0x01])  # varint field 9
        + bytes([(10 << 3) | 1])
        + bytes(8)  # fixed64 field 10
        + bytes([(11 << 3) | 5])
        + bytes(4)  # fixed32 field 11
        + bytes([(12 << 3) | 2, 3])
        + b"new"  # string field 12
    )
    assert wire.pod_addresses(extra + known + extra) == [("10.0.0.5/16", "10.0.0.1")]


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05abc", b"\x0a", b"\x0b", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"],
    ids=["truncated-field", "missing-length", "group-wire-type", "endless-varint"],
)
def test_malformed_answers_raise_value_error(data: bytes) -> None:
    with pytest.raises(ValueError):
        wire.pod_addresses(data)
