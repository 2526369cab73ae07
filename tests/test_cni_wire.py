"""The CNI plugin's hand-written wire format against the generated protobuf classes: every
request it builds parses into the message it means, and it reads every answer coild may send."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
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
    # The CNI GC always carries the complete list, even an empty one, and says so.
    assert got.valid_list_complete


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


# --- forward compatibility: a newer coild's answers --------------------------------------------


def _future_classes() -> tuple[Any, Any]:
    """AllocateResponse and PodAddress as a newer coild might define them: the fields the plugin
    knows plus new ones of every wire type (varint, zigzag, 64-bit, 32-bit, bytes that are not
    text, nested messages, packed repeated, groups with nested groups, a large field number),
    built with protobuf's descriptor API so protobuf itself does the encoding."""
    f = descriptor_pb2.FieldDescriptorProto
    optional, repeated = f.LABEL_OPTIONAL, f.LABEL_REPEATED

    def field(name: str, number: int, kind: int, label: int = optional, type_name: str = "") -> Any:
        made = f(name=name, number=number, type=kind, label=label)
        if type_name:
            made.type_name = type_name
        return made

    nested = descriptor_pb2.DescriptorProto(
        name="Nested",
        field=[
            field("blob", 1, f.TYPE_BYTES),
            field("text", 2, f.TYPE_STRING),
            field("child", 3, f.TYPE_MESSAGE, type_name=".future.v1.Nested"),
            field("n", 4, f.TYPE_SINT64),
        ],
    )
    inner_group = descriptor_pb2.DescriptorProto(
        name="Inner", field=[field("x", 15, f.TYPE_FIXED32), field("y", 16, f.TYPE_BYTES)]
    )
    legacy_group = descriptor_pb2.DescriptorProto(
        name="Legacy",
        field=[
            field("note", 12, f.TYPE_STRING),
            field("blob", 13, f.TYPE_BYTES),
            field("inner", 14, f.TYPE_GROUP, type_name=".future.v1.PodAddress.Legacy.Inner"),
        ],
        nested_type=[inner_group],
    )
    packed = field("packed", 10, f.TYPE_INT32, repeated)
    packed.options.packed = True
    pod_address = descriptor_pb2.DescriptorProto(
        name="PodAddress",
        field=[
            field("address", 1, f.TYPE_STRING),
            field("gateway", 2, f.TYPE_STRING),
            field("pool", 3, f.TYPE_STRING),
            field("raw", 4, f.TYPE_BYTES),
            field("count", 5, f.TYPE_UINT64),
            field("f64", 6, f.TYPE_FIXED64),
            field("f32", 7, f.TYPE_FIXED32),
            field("d", 8, f.TYPE_DOUBLE),
            field("nested", 9, f.TYPE_MESSAGE, type_name=".future.v1.Nested"),
            packed,
            field("legacy", 11, f.TYPE_GROUP, type_name=".future.v1.PodAddress.Legacy"),
            field("s", 17, f.TYPE_SINT64),
            field("far", 536_870_911, f.TYPE_STRING),  # the largest field number
        ],
        nested_type=[legacy_group],
    )
    response = descriptor_pb2.DescriptorProto(
        name="AllocateResponse",
        field=[
            field("addresses", 1, f.TYPE_MESSAGE, repeated, ".future.v1.PodAddress"),
            field("extra", 2, f.TYPE_MESSAGE, type_name=".future.v1.Nested"),
            field("stamp", 3, f.TYPE_FIXED64),
            field("flag", 4, f.TYPE_BOOL),
            field("blob", 5, f.TYPE_BYTES),
        ],
    )
    file = descriptor_pb2.FileDescriptorProto(
        name="future/v1/nodeagent.proto",
        package="future.v1",
        syntax="proto2",  # groups need proto2
        message_type=[nested, pod_address, response],
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("future.v1.AllocateResponse")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("future.v1.PodAddress")),
    )


def _future_answer() -> bytes:
    response_class, address_class = _future_classes()
    not_text = b"\xff\xfe\x00\xc3"  # bytes a text decoder refuses

    def address(cidr: str, gateway: str) -> Any:
        item = address_class(
            address=cidr,
            gateway=gateway,
            pool="default",
            raw=not_text,
            count=2**63,
            f64=7,
            f32=9,
            d=1.5,
            packed=[1, -1, 300],
            s=-5,
            far="far away",
        )
        item.nested.blob = not_text
        item.nested.child.blob = not_text
        item.nested.child.child.n = -1
        item.legacy.note = "old"
        item.legacy.blob = not_text
        item.legacy.inner.x = 3
        item.legacy.inner.y = not_text
        return item

    response = response_class(
        addresses=[address("10.0.0.5/16", "10.0.0.1"), address("fd00::5/64", "fd00::1")],
        stamp=1,
        flag=True,
        blob=not_text,
    )
    response.extra.blob = not_text
    return bytes(response.SerializeToString())


def test_answers_of_a_newer_coild_are_read() -> None:
    """Today's generated classes read the newer answer; so must the plugin, field for field."""
    data = _future_answer()
    today = pb.AllocateResponse.FromString(data)
    expected = [(a.address, a.gateway) for a in today.addresses]
    assert expected == [("10.0.0.5/16", "10.0.0.1"), ("fd00::5/64", "fd00::1")]
    assert wire.pod_addresses(data) == expected


def test_known_field_with_another_wire_type_is_skipped() -> None:
    """Protobuf treats a known field number with an unexpected wire type as an unknown field."""
    data = pb.AllocateResponse(
        addresses=[pb.PodAddress(address="10.0.0.5/16", gateway="10.0.0.1")]
    ).SerializeToString()
    odd_address = bytes([(1 << 3) | 0, 5])  # PodAddress.address as a varint
    odd_response = bytes([(1 << 3) | 5]) + bytes(4)  # AllocateResponse.addresses as fixed32
    inner = pb.PodAddress(address="10.0.0.6/16").SerializeToString() + odd_address
    data += bytes([(1 << 3) | 2, len(inner)]) + inner + odd_response
    expected = [(a.address, a.gateway) for a in pb.AllocateResponse.FromString(data).addresses]
    assert (
        wire.pod_addresses(data)
        == expected
        == [
            ("10.0.0.5/16", "10.0.0.1"),
            ("10.0.0.6/16", ""),
        ]
    )


@pytest.mark.parametrize(
    "data",
    [
        bytes([(1 << 3) | 3]) + bytes([(2 << 3) | 4]),  # group 1 ended by end-group 2
        bytes([(1 << 3) | 4]),  # end-group outside any group
        bytes([(1 << 3) | 3]) * 101 + bytes([(1 << 3) | 4]) * 101,  # nested past the limit
        bytes([0 << 3 | 2, 0]),  # field number 0
        bytes([(1 << 3) | 6]),  # wire type 6
        bytes([(1 << 3) | 1]) + bytes(7),  # truncated fixed64
        bytes([(3 << 3) | 2, 1]) + b"\x0a\x02\xff\xfe",  # a known string that is not UTF-8
    ],
    ids=[
        "mismatched-group",
        "stray-end-group",
        "deep-groups",
        "field-0",
        "wire-6",
        "short-i64",
        "bad-utf8",
    ],
)
def test_malformed_answers_that_protobuf_also_refuses(data: bytes) -> None:
    if "\xff" not in data.decode("latin-1"):
        with pytest.raises(DecodeError):
            pb.AllocateResponse.FromString(data)
    with pytest.raises(ValueError):
        wire.pod_addresses(data)
