"""The plugin's own gRPC call (coil_cni.rpc), header decoding (coil_cni.hpack) and JSON
(coil_cni.jsonio), each checked against an independent implementation: a real grpcio server on a
UNIX socket, the ``hpack`` package's encoder, and the ``json`` module."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest
from hpack import huffman_constants
from hpack.table import HeaderTable

from coil_cni import hpack as coil_hpack
from coil_cni import jsonio, rpc

# --- HPACK -------------------------------------------------------------------------------------


def test_static_table_is_rfc_7541s() -> None:
    assert list(coil_hpack.STATIC_TABLE) == list(HeaderTable.STATIC_TABLE)


def test_huffman_codes_are_rfc_7541s() -> None:
    assert [c for c, _ in coil_hpack.HUFFMAN_CODES] == list(huffman_constants.REQUEST_CODES)
    assert [n for _, n in coil_hpack.HUFFMAN_CODES] == list(huffman_constants.REQUEST_CODES_LENGTH)


def _random_headers(rng: random.Random, n: int) -> list[tuple[str, str]]:
    names = [":status", "content-type", "grpc-status", "grpc-message", "x-trace", "date", "server"]
    alphabet = "abcXYZ019 %/-_.:~\t" + "é€\x7f\x01"
    headers = []
    for _ in range(n):
        name = rng.choice(names) if rng.random() < 0.7 else f"x-h{rng.randrange(1000)}"
        value = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))
        headers.append((name, value))
    return headers


@pytest.mark.parametrize("huffman", [False, True], ids=["literal", "huffman"])
@pytest.mark.parametrize("table_size", [4096, 256, 0], ids=lambda s: f"table{s}")
def test_decoder_reads_what_hpack_encodes(huffman: bool, table_size: int) -> None:
    """Many blocks on one connection: the dynamic table, evictions and size updates must agree."""
    rng = random.Random(table_size * 2 + huffman)
    encoder = hpack.Encoder()
    decoder = coil_hpack.Decoder()
    for block_no in range(200):
        if block_no == 50:
            encoder.header_table_size = table_size  # the next block starts with a size update
        headers = _random_headers(rng, rng.randrange(1, 12))
        block = encoder.encode(headers, huffman=huffman)
        expected = [(n.encode(), v.encode()) for n, v in headers]
        assert decoder.decode(block) == expected, block_no


def test_decoder_reads_never_indexed_fields() -> None:
    encoder = hpack.Encoder()
    block = encoder.encode([hpack.NeverIndexedHeaderTuple("authorization", "secret")])
    assert coil_hpack.Decoder().decode(block) == [(b"authorization", b"secret")]


@pytest.mark.parametrize(
    "block",
    [
        b"\x80",  # index 0
        b"\xbf\x20",  # index 63: the dynamic table is empty
        b"\x40\x05ab",  # name shorter than its length
        b"\x00\x81\x00",  # Huffman string with an empty code (all zero bits, not padding)
        b"\x3f\xe2\x1f",  # table size update to 4,097, past the 4,096 announced
        b"\xff\xff\xff\xff\xff\xff",  # integer that never ends
        b"\x00\x81\xff",  # Huffman: 8 bits of padding
    ],
    ids=["index0", "beyond-table", "truncated", "bad-huffman", "size-update", "integer", "padding"],
)
def test_decoder_rejects_malformed_blocks(block: bytes) -> None:
    with pytest.raises(coil_hpack.HpackError):
        coil_hpack.Decoder().decode(block)


# --- JSON --------------------------------------------------------------------------------------

DOCUMENTS = [
    b'{"cniVersion": "1.1.0", "ipam": {"type": "coil", "timeout": 2.5}}',
    b'  \n{"a": [1, -2, 3.5e10, true, false, null, "\\u00e9\\ud83d\\ude00"]}\r\n\t',
    '\ufeff{"bom": "allowed"}'.encode(),
    b'{"n": NaN, "i": Infinity, "m": -Infinity}',
    b'{"dup": 1, "dup": 2}',
    '{"utf8": "ü€😀"}'.encode(),
    b"[]",
    b'"just a string"',
    b"12345678901234567890123",
    '{"utf16": "é"}'.encode("utf-16"),
    "[1, 2]".encode("utf-32-le"),
    b'"\xed\xa0\x80"',  # a lone surrogate in UTF-8, which json lets through
]
BAD_DOCUMENTS = [
    b"",
    b"   ",
    b"{",
    b'{"a": 1} x',
    b'{"a": 1}{"b": 2}',
    b"{'single': 1}",
    b'{"ctl": "\x01"}',
    b"[1,]",
    b"[" * 100_000,
]


@pytest.mark.parametrize("doc", DOCUMENTS, ids=range(len(DOCUMENTS)))
def test_jsonio_reads_like_json(doc: bytes) -> None:
    got, want = jsonio.loads(doc), json.loads(doc)
    assert json.dumps(got) == json.dumps(want)  # NaN compares unequal; its text does not


@pytest.mark.parametrize("doc", BAD_DOCUMENTS, ids=range(len(BAD_DOCUMENTS)))
def test_jsonio_rejects_like_json(doc: bytes) -> None:
    with pytest.raises((ValueError, RecursionError)) as ours:
        jsonio.loads(doc)
    with pytest.raises((ValueError, RecursionError)) as theirs:
        json.loads(doc)
    assert type(ours.value) is type(theirs.value)
    assert str(ours.value) == str(theirs.value)


def test_jsonio_rejects_invalid_utf8() -> None:
    with pytest.raises(ValueError):
        jsonio.loads(b'{"a": "\xff"}')


@pytest.mark.parametrize(
    "value",
    [
        {"cniVersion": "1.1.0", "ips": [{"address": "10.0.0.5/24", "gateway": "10.0.0.1"}]},
        {"text": 'é\n"\\\u2028😀', "n": [1, 2.5, -0.0, 1e300, True, False, None]},
        "plain",
        [],
        {"nested": {"deep": [[{}]]}},
    ],
    ids=range(5),
)
def test_jsonio_writes_like_json(value: Any) -> None:
    assert jsonio.dumps(value) == json.dumps(value)


def test_jsonio_refuses_what_json_refuses() -> None:
    with pytest.raises(TypeError):
        jsonio.dumps({"a": object()})
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(ValueError, match="Circular reference"):
        jsonio.dumps(circular)


# --- the call ----------------------------------------------------------------------------------

Behaviour = Callable[[bytes, grpc.ServicerContext], bytes]


class Server:
    """A grpcio server on a UNIX socket whose methods are plain functions of the raw bytes."""

    def __init__(self, path: str, methods: dict[str, Behaviour]) -> None:
        self.path = path
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(behaviour)
            for name, behaviour in methods.items()
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("test.v1.Test", handlers),)
        )
        self.server.add_insecure_port(f"unix:{path}")
        self.server.start()

    def stop(self) -> None:
        self.server.stop(grace=None).wait(5)


def _echo(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _big(request: bytes, context: grpc.ServicerContext) -> bytes:
    return bytes(range(256)) * (int(request.decode()) // 256)


def _metadata(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.send_initial_metadata(
        (("x-initial", "v a l u e " * 40), ("x-blob-bin", os.urandom(300)))
    )
    context.set_trailing_metadata((("x-trailer", "t" * 500), ("x-trailer-bin", b"\x00\xff" * 99)))
    return b"with metadata"


def _slow(request: bytes, context: grpc.ServicerContext) -> bytes:
    time.sleep(3)
    return b"late"


def _fail(request: bytes, context: grpc.ServicerContext) -> bytes:
    code_name, _, message = request.decode().partition(" ")
    context.abort(grpc.StatusCode[code_name], message)
    raise AssertionError("abort returns only by raising")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    directory = tempfile.mkdtemp(prefix="coil-rpc-")
    methods = {"Echo": _echo, "Big": _big, "Metadata": _metadata, "Slow": _slow, "Fail": _fail}
    srv = Server(os.path.join(directory, "s.sock"), methods)
    try:
        yield srv
    finally:
        srv.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.parametrize("size", [0, 1, 16_379, 16_380, 70_000, 3_000_000], ids=lambda s: f"{s}B")
def test_call_carries_requests_of_any_size(server: Server, size: int) -> None:
    """Past one frame (16 KiB) and past the initial flow-control window (64 KiB)."""
    request = os.urandom(size)
    assert rpc.call(server.path, "/test.v1.Test/Echo", request, 10) == request


def test_call_reads_large_answers(server: Server) -> None:
    answer = rpc.call(server.path, "/test.v1.Test/Big", b"2000000", 10)
    assert answer == bytes(range(256)) * (2_000_000 // 256)


def test_call_reads_answers_with_metadata(server: Server) -> None:
    assert rpc.call(server.path, "/test.v1.Test/Metadata", b"", 10) == b"with metadata"


@pytest.mark.parametrize(
    "status",
    [
        "INVALID_ARGUMENT",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "UNAVAILABLE",
        "INTERNAL",
        "UNAUTHENTICATED",
    ],
)
def test_call_reports_the_servers_status_and_message(server: Server, status: str) -> None:
    message = f'pool "default" 100% used: é€ {status}'
    with pytest.raises(rpc.RpcError) as raised:
        rpc.call(server.path, "/test.v1.Test/Fail", f"{status} {message}".encode(), 10)
    assert (raised.value.status, raised.value.message) == (status, message)


def test_unknown_method_is_unimplemented(server: Server) -> None:
    with pytest.raises(rpc.RpcError) as raised:
        rpc.call(server.path, "/test.v1.Test/Nope", b"", 10)
    assert raised.value.status == "UNIMPLEMENTED"


def test_slow_server_runs_out_the_deadline(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(rpc.RpcError) as raised:
        rpc.call(server.path, "/test.v1.Test/Slow", b"", 0.3)
    assert raised.value.status == "DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 2.5  # it did not wait for the answer


def test_calls_agree_with_grpcio(server: Server) -> None:
    """The same calls through grpcio's own client give the same answers and statuses."""
    with grpc.insecure_channel(f"unix:{server.path}") as channel:
        for method, request in [("Echo", b"abc"), ("Fail", b"ABORTED lost a race: 50%")]:
            theirs: tuple[str, Any]
            try:
                theirs = ("OK", channel.unary_unary(f"/test.v1.Test/{method}")(request, timeout=5))
            except grpc.RpcError as e:
                theirs = (e.code().name, e.details())  # type: ignore[attr-defined]
            ours: tuple[str, Any]
            try:
                ours = ("OK", rpc.call(server.path, f"/test.v1.Test/{method}", request, 5))
            except rpc.RpcError as e:
                ours = (e.status, e.message)
            assert ours == theirs


@pytest.fixture
def scratch() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="coil-rpc-"))
    try:
        yield directory
    finally:
        for child in directory.iterdir():
            child.unlink()
        directory.rmdir()


def test_socket_that_refuses_waits_until_the_deadline(scratch: Path) -> None:
    """A socket file left by a dead coild refuses connections: the call waits, like grpcio's
    wait_for_ready, and ends with DEADLINE_EXCEEDED (CNI code 11)."""
    path = str(scratch / "dead.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)  # bound, never listening: connect() is refused
    try:
        started = time.monotonic()
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"", 0.5)
        assert raised.value.status == "DEADLINE_EXCEEDED"
        assert 0.4 <= time.monotonic() - started < 3
    finally:
        dead.close()


def test_server_that_comes_up_during_the_wait_is_reached(scratch: Path) -> None:
    path = str(scratch / "late.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    holder: list[Server] = []

    def start_later() -> None:
        time.sleep(0.4)
        dead.close()
        os.unlink(path)
        holder.append(Server(path, {"Echo": _echo}))

    thread = threading.Thread(target=start_later)
    thread.start()
    try:
        assert rpc.call(path, "/test.v1.Test/Echo", b"hello", 10) == b"hello"
    finally:
        thread.join()
        for srv in holder:
            srv.stop()


def _raw_server(path: str, reply: bytes) -> tuple[socket.socket, threading.Thread]:
    """Accepts one connection, reads what arrives, answers ``reply`` and closes."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(2)
        try:
            conn.recv(65536)
            conn.sendall(reply)
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()
    return listener, thread


@pytest.mark.parametrize(
    "reply",
    [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n", b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"],
    ids=["closes", "http1", "settings-then-close"],
)
def test_server_that_is_not_grpc_is_unavailable(scratch: Path, reply: bytes) -> None:
    path = str(scratch / "raw.sock")
    listener, thread = _raw_server(path, reply)
    try:
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"x", 5)
        assert raised.value.status in ("UNAVAILABLE", "INTERNAL")
    finally:
        thread.join()
        listener.close()


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def _answer(
    headers: list[tuple[str, str]], body: bytes | None, trailers: list[tuple[str, str]]
) -> bytes:
    """A server's side of a call, encoded by an independent HPACK encoder."""
    encoder = hpack.Encoder()
    out = _frame(4, 0, 0)  # SETTINGS
    if body is None:  # trailers-only
        return out + _frame(1, 0x5, 1, encoder.encode(headers + trailers))
    out += _frame(1, 0x4, 1, encoder.encode(headers))
    out += _frame(0, 0, 1, b"\x00" + len(body).to_bytes(4, "big") + body)
    return out + _frame(1, 0x5, 1, encoder.encode(trailers))


def test_answer_sent_before_the_server_closes_is_read(scratch: Path) -> None:
    """coild answers and closes (e.g. stopping) before the plugin acknowledges its SETTINGS: the
    acknowledgement fails, the answer is still there and counts."""
    path = str(scratch / "closing.sock")
    reply = _answer(
        [(":status", "200"), ("content-type", "application/grpc")],
        b"the answer",
        [("grpc-status", "0")],
    )
    for _ in range(5):  # the race is the server's close against the plugin's reply
        listener, thread = _raw_server(path, reply)
        try:
            assert rpc.call(path, "/test.v1.Test/Echo", b"x", 5) == b"the answer"
        finally:
            thread.join()
            listener.close()
            os.unlink(path)


@pytest.mark.parametrize(
    ("headers", "trailers", "status"),
    [
        ([(":status", "500")], [("grpc-status", "5"), ("grpc-message", "gone")], "NOT_FOUND"),
        ([(":status", "200")], [], "UNKNOWN"),
        ([(":status", "503")], [], "UNAVAILABLE"),
        ([(":status", "404")], [], "UNIMPLEMENTED"),
    ],
    ids=["grpc-status-wins", "no-status", "http-503", "http-404"],
)
def test_status_is_decided_as_grpcio_does(
    scratch: Path, headers: list[tuple[str, str]], trailers: list[tuple[str, str]], status: str
) -> None:
    path = str(scratch / "status.sock")
    listener, thread = _raw_server(path, _answer(headers, None, trailers))
    try:
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"x", 5)
        assert raised.value.status == status
    finally:
        thread.join()
        listener.close()


def test_full_accept_queue_is_waited_on_not_failed(scratch: Path) -> None:
    path = str(scratch / "busy.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued = []
    try:
        for _ in range(4):  # fill the accept queue; the listener never accepts
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(path)
                queued.append(s)
            except BlockingIOError:
                s.close()
                break
        started = time.monotonic()
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"", 0.5)
        assert raised.value.status == "DEADLINE_EXCEEDED"
        assert time.monotonic() - started >= 0.4
    finally:
        for s in queued:
            s.close()
        listener.close()


def test_answer_over_the_limit_fails_at_once(server: Server) -> None:
    started = time.monotonic()
    with pytest.raises(rpc.RpcError) as raised:
        rpc.call(server.path, "/test.v1.Test/Big", str(rpc.RECEIVE_LIMIT + 1024).encode(), 20)
    # The plugin's own limit, not coild's RESOURCE_EXHAUSTED (which means "pool exhausted").
    assert (raised.value.status, raised.value.transport) == ("INTERNAL", True)
    assert time.monotonic() - started < 10  # not at the deadline


@pytest.mark.parametrize(
    ("raw", "text"),
    [
        (b"50%25 used", "50% used"),
        (b"caf%C3%A9", "café"),
        (b"a% 1b%+fc%", "a% 1b%+fc%"),  # not two hex digits: left as written
        (b"%zz%4", "%zz%4"),
    ],
)
def test_grpc_message_percent_decoding(raw: bytes, text: str) -> None:
    assert rpc._percent_decode(raw) == text
