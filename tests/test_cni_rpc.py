"""The plugin's own gRPC call (coil_cni.rpc), header decoding (coil_cni.hpack) and JSON
(coil_cni.jsonio), each checked against an independent implementation: a real grpcio server on a
UNIX socket, the ``hpack`` package's encoder, and the ``json`` module."""

from __future__ import annotations

import contextlib
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


# --- a scripted HTTP/2 server, frame by frame --------------------------------------------------


class _Peer:
    """The server side of one connection, read and written frame by frame by a test."""

    def __init__(self, conn: socket.socket) -> None:
        self.conn = conn
        self.buffer = b""

    def _read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError
            self.buffer += chunk
        out, self.buffer = self.buffer[:size], self.buffer[size:]
        return out

    def preface(self) -> None:
        assert self._read(24) == rpc.PREFACE

    def frame(self) -> tuple[int, int, int, bytes]:
        head = self._read(9)
        length = int.from_bytes(head[:3], "big")
        return head[3], head[4], int.from_bytes(head[5:9], "big"), self._read(length)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)


def _scripted_server(path: str, script: Callable[[_Peer], None]) -> Callable[[], None]:
    """Runs ``script`` on the first connection to ``path``; returns a function that waits for it
    and closes everything (the script's own failure is re-raised there)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    failures: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        try:
            script(_Peer(conn))
        except (EOFError, BrokenPipeError, ConnectionResetError):
            pass  # the plugin hung up: what the script does next no longer matters
        except BaseException as e:  # reported by finish()
            failures.append(e)
        finally:
            conn.close()

    thread = threading.Thread(target=serve)
    thread.start()

    def finish() -> None:
        thread.join(15)
        listener.close()
        assert not thread.is_alive()
        if failures:
            raise failures[0]

    return finish


def _setting(key: int, value: int) -> bytes:
    return key.to_bytes(2, "big") + value.to_bytes(4, "big")


def _echo_answer(body: bytes) -> bytes:
    """HEADERS, DATA (in frames of 16 KiB) and trailers of a successful call answering ``body``."""
    encoder = hpack.Encoder()
    headers = encoder.encode([(":status", "200"), ("content-type", "application/grpc")])
    message = b"\x00" + len(body).to_bytes(4, "big") + body
    data = b"".join(
        _frame(0, 0, 1, message[i : i + 16_384]) for i in range(0, len(message), 16_384)
    )
    return (
        _frame(1, 0x4, 1, headers)
        + data
        + _frame(1, 0x5, 1, encoder.encode([("grpc-status", "0")]))
    )


def test_server_with_a_small_window_is_honoured_from_the_first_byte(scratch: Path) -> None:
    """A server opens with SETTINGS_INITIAL_WINDOW_SIZE of 1,000 bytes and grants more with
    WINDOW_UPDATE as it reads; it counts its window from its own SETTINGS and resets the stream
    (FLOW_CONTROL_ERROR) on any byte beyond it. The plugin must read those SETTINGS before it
    sends a large body instead of sending the default 64 KiB first."""
    window = 1000
    request = os.urandom(20_000)
    path = str(scratch / "small-window.sock")
    seen: list[int] = []

    def script(peer: _Peer) -> None:
        peer.send(_frame(4, 0, 0, _setting(rpc.SETTINGS_INITIAL_WINDOW_SIZE, window)))
        peer.preface()
        allowed, body = window, b""
        while True:
            kind, flags, stream, payload = peer.frame()
            if kind == 4 and not flags & 1:
                peer.send(_frame(4, 1, 0))
            if kind != 0 or stream != 1:
                continue
            body += payload
            seen.append(len(payload))
            if len(body) > allowed:
                peer.send(_frame(3, 0, 1, (3).to_bytes(4, "big")))  # FLOW_CONTROL_ERROR
                return
            if flags & 1:  # END_STREAM
                peer.send(_echo_answer(body[5:]))
                return
            grant = len(payload).to_bytes(4, "big")
            peer.send(_frame(8, 0, 1, grant) + _frame(8, 0, 0, grant))
            allowed += len(payload)

    finish = _scripted_server(path, script)
    try:
        assert rpc.call(path, "/test.v1.Test/Echo", request, 5) == request
    finally:
        finish()
    assert max(seen) <= window


def test_small_requests_do_not_wait_for_the_servers_settings(scratch: Path) -> None:
    """Every ADD fits EARLY_DATA_LIMIT: it goes out with the headers, before the server speaks."""
    path = str(scratch / "early.sock")
    request = b"x" * (rpc.EARLY_DATA_LIMIT - 5)

    def script(peer: _Peer) -> None:
        peer.preface()
        body = b""
        while True:  # the whole request arrives before the server sends anything
            kind, flags, stream, payload = peer.frame()
            if kind == 0 and stream == 1:
                body += payload
                if flags & 1:
                    break
        peer.send(_frame(4, 0, 0) + _echo_answer(body[5:]))

    finish = _scripted_server(path, script)
    try:
        assert rpc.call(path, "/test.v1.Test/Echo", request, 5) == request
    finally:
        finish()


def _open_and(then: bytes) -> Callable[[_Peer], None]:
    """A server that opens the connection and, once the request has arrived, sends ``then``."""

    def script(peer: _Peer) -> None:
        peer.send(_frame(4, 0, 0))
        peer.preface()
        while True:
            kind, flags, stream, _ = peer.frame()
            if kind == 0 and stream == 1 and flags & 1:
                break
        peer.send(then)
        with contextlib.suppress(TimeoutError):
            peer.frame()  # hold the connection until the plugin hangs up

    return script


def test_endless_header_block_fails_at_once(scratch: Path) -> None:
    """HEADERS without END_HEADERS, then CONTINUATION frames that never end the block: the plugin
    stops at MAX_HEADER_LIST bytes instead of buffering until its deadline."""
    path = str(scratch / "endless.sock")
    continuation = _frame(9, 0, 1, b"\x00" * 16_000)  # never END_HEADERS
    flood = _frame(1, 0, 1, b"\x88") + continuation * 300  # 4.8 MB
    finish = _scripted_server(path, _open_and(flood))
    started = time.monotonic()
    try:
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"x", 4)
    finally:
        finish()
    assert (raised.value.status, raised.value.transport) == ("INTERNAL", True)
    assert f"more than {rpc.MAX_HEADER_LIST} bytes" in raised.value.message
    assert time.monotonic() - started < 3  # not the deadline


def test_small_block_that_decodes_to_a_huge_header_list_fails(scratch: Path) -> None:
    """HPACK lets 1 byte stand for a 4 KB header from the dynamic table: the decoded list is
    bounded too."""
    path = str(scratch / "bomb.sock")
    big = hpack.Encoder().encode([("x", "v" * 4000)])  # added to the dynamic table
    block = big + b"\xbe" * 2000  # index 62, the entry just added, 2,000 times: 8 MB of headers
    finish = _scripted_server(path, _open_and(_frame(1, 0x5, 1, block)))
    try:
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"x", 4)
    finally:
        finish()
    assert (raised.value.status, raised.value.transport) == ("INTERNAL", True)
    assert "header list" in raised.value.message


@pytest.mark.parametrize(
    ("then", "status"),
    [
        (_frame(3, 0, 1, (11).to_bytes(4, "big")), "RESOURCE_EXHAUSTED"),  # ENHANCE_YOUR_CALM
        (_frame(3, 0, 1, (8).to_bytes(4, "big")), "CANCELLED"),
        (_frame(3, 0, 1, (7).to_bytes(4, "big")), "UNAVAILABLE"),  # REFUSED_STREAM
        (_frame(3, 0, 1, (1).to_bytes(4, "big")), "INTERNAL"),  # PROTOCOL_ERROR
        (_frame(7, 0, 0, bytes(4) + (11).to_bytes(4, "big")), "UNAVAILABLE"),  # GOAWAY, last 0
        (_frame(0, 0, 1, b"\x00" + (rpc.RECEIVE_LIMIT + 1).to_bytes(4, "big")), "INTERNAL"),
    ],
    ids=["reset-11", "reset-cancel", "reset-refused", "reset-protocol", "goaway", "oversized"],
)
def test_transport_failures_are_marked_as_the_plugins(
    scratch: Path, then: bytes, status: str
) -> None:
    """Statuses the plugin decides itself carry transport=True, so coil_cni.errors never reads
    them as coild's answer (RESOURCE_EXHAUSTED from coild means "pool exhausted")."""
    path = str(scratch / "transport.sock")
    finish = _scripted_server(path, _open_and(then))
    try:
        with pytest.raises(rpc.RpcError) as raised:
            rpc.call(path, "/test.v1.Test/Echo", b"x", 4)
    finally:
        finish()
    assert (raised.value.status, raised.value.transport) == (status, True)


def test_servers_status_is_not_marked_as_transport(server: Server) -> None:
    with pytest.raises(rpc.RpcError) as raised:
        rpc.call(server.path, "/test.v1.Test/Fail", b"RESOURCE_EXHAUSTED pool full", 5)
    assert (raised.value.status, raised.value.transport) == ("RESOURCE_EXHAUSTED", False)
