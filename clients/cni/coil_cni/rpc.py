"""One gRPC unary call over HTTP/2 on a UNIX socket, with nothing but the interpreter's C modules.

grpcio is most of a Python gRPC client's start-up (its compiled core alone loads in about 60 ms on
a 2-core machine, before a single byte is sent), and the plugin pays start-up on every pod. A unary
call is a small, fixed conversation, so the plugin speaks it here (HTTP/2, RFC 9113; gRPC over
HTTP/2, grpc/doc/PROTOCOL-HTTP2.md):

    client: connection preface, SETTINGS, HEADERS (POST /package.Service/Method), DATA (the
            length-prefixed request) with END_STREAM
    server: SETTINGS, HEADERS (:status 200), DATA (the length-prefixed answer), HEADERS with
            grpc-status and END_STREAM; or one HEADERS frame with everything (trailers-only)

It honours the peer's frame size and flow-control windows when sending, acknowledges SETTINGS and
PING, decodes headers with ``coil_cni.hpack``, and maps transport failures to gRPC statuses the way
grpcio does (unreachable: UNAVAILABLE, out of time: DEADLINE_EXCEEDED). coild is an ordinary
grpcio server; tests/test_cni_rpc.py runs this against one.

Limits on what the server may send: an answer of at most RECEIVE_LIMIT bytes, header blocks of at
most MAX_HEADER_LIST bytes (announced as SETTINGS_MAX_HEADER_LIST_SIZE), at most two header
blocks (headers and trailers). A request larger than EARLY_DATA_LIMIT waits for the server's
SETTINGS before its first DATA frame, so a server that opens with a small flow-control window is
honoured from the first byte.

``call`` returns the answer's bytes or raises ``RpcError`` carrying a gRPC status name and
message, and whether the status is the server's (its grpc-status or HTTP status) or the plugin's
own verdict on a failed conversation (``transport``); ``coil_cni.errors`` maps the two apart, so a
transport failure never reads as an answer of coild's. It does not retry; like grpcio's
``wait_for_ready`` it waits for a socket that refuses connections (coild restarting) until the
deadline.
"""

from __future__ import annotations

import _socket
import time

from coil_cni.hpack import Decoder, HpackError

# Frame types and flags (RFC 9113 6).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0,
    1,
    3,
    4,
    6,
    7,
    8,
    9,
)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_ENABLE_PUSH = 0x1, 0x2
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x4, 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_FRAME_LIMIT = 2**24 - 1  # RFC 9113 6.5.2
MAX_WINDOW = 2**31 - 1
STREAM = 1  # the one stream of the connection
# How much the plugin lets coild send: grpcio's default limit for a received message (4 MiB).
RECEIVE_LIMIT = 4 * 1024 * 1024
RECEIVE_WINDOW = RECEIVE_LIMIT + 5
# The largest request coild accepts: grpcio's default limit for a received message, which coild
# keeps. Checked by coil_cni.client before a call.
SEND_LIMIT = 4 * 1024 * 1024
# The largest header block (compressed, and as a header list: RFC 9113 6.5.2) the plugin accepts
# from coild; announced in SETTINGS. coild's headers and trailers are a few hundred bytes.
MAX_HEADER_LIST = 65_536
# A request body (with its 5-byte prefix) up to this size is sent without waiting for the
# server's SETTINGS; every ADD, DEL, CHECK and STATUS request is smaller. A larger one (a GC of
# many attachments) waits for them, so it never exceeds a smaller window the server announces.
EARLY_DATA_LIMIT = 1024
CONNECT_RETRY_S = 0.05  # between connection attempts while the socket refuses

STATUS_NAMES = (
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
# gRPC's statuses for HTTP answers that are not gRPC (grpc/doc/http-grpc-status-mapping.md).
HTTP_STATUS_NAMES = {
    400: "INTERNAL",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "UNIMPLEMENTED",
    429: "UNAVAILABLE",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "UNAVAILABLE",
}
# RST_STREAM and GOAWAY error codes (RFC 9113 7) as gRPC statuses (PROTOCOL-HTTP2.md).
RESET_NAMES = {7: "UNAVAILABLE", 8: "CANCELLED", 11: "RESOURCE_EXHAUSTED", 12: "PERMISSION_DENIED"}


class RpcError(Exception):
    """A call that did not succeed: ``status`` is the gRPC status name, ``message`` its details.

    ``transport`` is True when the plugin itself decided the status because the conversation
    failed (coild unreachable, out of time, the connection cut or reset, a malformed or oversized
    answer), False when it is what the server answered."""

    def __init__(self, status: str, message: str, transport: bool = True) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.transport = transport


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) whose first byte carries ``first`` in its high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal without indexing, with a literal name (RFC 7541 6.2.2)."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


def request_headers(path: str, timeout_ms: int | None, user_agent: bytes = b"coil-cni") -> bytes:
    """The HPACK block of a gRPC request: POST ``path`` with a ``grpc-timeout`` (none when
    ``timeout_ms`` is None: a call without a deadline, such as a long-lived stream)."""
    timeout = (
        b""
        if timeout_ms is None
        else _literal(b"grpc-timeout", f"{min(timeout_ms, 99_999_999)}m".encode())
    )
    return (
        b"\x83"  # :method POST (static index 3)
        + b"\x86"  # :scheme http (static index 6)
        + _literal(b":path", path.encode())
        + _literal(b":authority", b"localhost")
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"te", b"trailers")
        + timeout
        + _literal(b"user-agent", user_agent)
    )


_HEX = b"0123456789abcdefABCDEF"


def _percent_decode(text: bytes) -> str:
    """grpc-message is percent-encoded UTF-8 (PROTOCOL-HTTP2.md)."""
    out = bytearray()
    i = 0
    while i < len(text):
        digits = text[i + 1 : i + 3]
        if text[i] == 0x25 and len(digits) == 2 and all(d in _HEX for d in digits):
            out.append(int(digits, 16))
            i += 3
            continue
        out.append(text[i])
        i += 1
    return out.decode("utf-8", "replace")


class _Connection:
    """The client side of one HTTP/2 connection carrying stream 1."""

    def __init__(self, sock: _socket.socket, deadline: float) -> None:
        self._sock = sock
        self._deadline = deadline
        self._buffer = b""
        self._decoder = Decoder()
        self.send_window = DEFAULT_WINDOW  # connection-level
        self.stream_window = DEFAULT_WINDOW
        self._initial_window = DEFAULT_WINDOW
        self.max_frame = DEFAULT_MAX_FRAME
        self.headers: list[list[tuple[bytes, bytes]]] = []  # header blocks of stream 1, in order
        self.data = bytearray()
        self.closed = False  # stream 1 ended (END_STREAM from the server)
        self.settings_seen = False  # the server's first SETTINGS has been applied
        self.write_closed = False  # coild stopped reading (it answered, or went away)

    def _remaining(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise RpcError("DEADLINE_EXCEEDED", "deadline exceeded waiting for coild")
        return left

    def send(self, data: bytes) -> None:
        """Send, unless coild has stopped reading: then the answer may already be waiting, so
        the caller goes on reading and fails only if it is not there."""
        if self.write_closed:
            return
        self._sock.settimeout(self._remaining())
        try:
            self._sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            self.write_closed = True

    def _read_exact(self, size: int) -> bytes:
        while len(self._buffer) < size:
            self._sock.settimeout(self._remaining())
            chunk = self._sock.recv(max(65_536, size - len(self._buffer)))
            if not chunk:
                raise RpcError("UNAVAILABLE", "coild closed the connection")
            self._buffer += chunk
        out, self._buffer = self._buffer[:size], self._buffer[size:]
        return out

    def _frame(self) -> tuple[int, int, int, bytes]:
        head = self._read_exact(9)
        length = int.from_bytes(head[:3], "big")
        if length > DEFAULT_MAX_FRAME:  # the plugin never announces a larger frame size
            raise RpcError("INTERNAL", f"coild sent a {length}-byte frame (not HTTP/2 from gRPC?)")
        stream = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
        return head[3], head[4], stream, self._read_exact(length)

    def read_frame(self) -> None:
        """Read and handle one frame (with its CONTINUATION frames)."""
        kind, flags, stream, payload = self._frame()
        if kind == SETTINGS:
            if not flags & ACK:
                self._settings(payload)
                self.settings_seen = True
                self.send(_frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if not flags & ACK:
                self.send(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            increment = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            if increment == 0:
                raise RpcError("INTERNAL", "coild sent a WINDOW_UPDATE of zero")
            if stream == 0:
                self.send_window += increment
            elif stream == STREAM:
                self.stream_window += increment
            if max(self.send_window, self.stream_window) > MAX_WINDOW:
                raise RpcError("INTERNAL", "coild let a flow-control window overflow")
        elif kind == GOAWAY:
            last = int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
            code = int.from_bytes(payload[4:8], "big")
            if last < STREAM:
                raise RpcError("UNAVAILABLE", f"coild refused the call (GOAWAY, error {code})")
        elif stream != STREAM:
            return  # nothing else on other streams concerns this call
        elif kind == RST_STREAM:
            code = int.from_bytes(payload[:4], "big")
            raise RpcError(
                RESET_NAMES.get(code, "INTERNAL"), f"coild reset the call (HTTP/2 error {code})"
            )
        elif kind == HEADERS:
            block = self._unpad(flags, payload)
            if flags & PRIORITY:
                if len(block) < 5:
                    raise RpcError("INTERNAL", "coild sent a HEADERS frame with invalid priority")
                block = block[5:]
            while not flags & END_HEADERS:
                if len(block) > MAX_HEADER_LIST:  # checked per frame: memory stays bounded
                    break
                kind, cont_flags, cont_stream, more = self._frame()
                if kind != CONTINUATION or cont_stream != stream:
                    raise RpcError("INTERNAL", "coild sent a header block without its continuation")
                block += more
                flags = (flags & END_STREAM) | (cont_flags & END_HEADERS)
            if len(block) > MAX_HEADER_LIST:
                raise RpcError(
                    "INTERNAL", f"coild sent a header block of more than {MAX_HEADER_LIST} bytes"
                )
            if len(self.headers) == 2:  # gRPC answers with headers and trailers, no more
                raise RpcError("INTERNAL", "coild sent more than two header blocks")
            try:
                decoded = self._decoder.decode(block)
            except HpackError as e:
                raise RpcError("INTERNAL", f"coild's headers are not readable: {e}") from None
            # The header list's size as RFC 9113 6.5.2 counts it: HPACK references can make a
            # small block a large list.
            if sum(len(n) + len(v) + 32 for n, v in decoded) > MAX_HEADER_LIST:
                raise RpcError(
                    "INTERNAL", f"coild sent a header list of more than {MAX_HEADER_LIST} bytes"
                )
            self.headers.append(decoded)
            self.closed = bool(flags & END_STREAM)
        elif kind == DATA:
            self.data += self._unpad(flags, payload)
            # The length prefix says at once whether the answer fits (flow control would
            # otherwise stall a larger one until the deadline).
            # INTERNAL, not grpcio's RESOURCE_EXHAUSTED: that status is coild's "pool exhausted".
            if len(self.data) > RECEIVE_WINDOW or (
                len(self.data) >= 5 and int.from_bytes(self.data[1:5], "big") > RECEIVE_LIMIT
            ):
                raise RpcError(
                    "INTERNAL",
                    f"coild's answer exceeds the plugin's limit of {RECEIVE_LIMIT} bytes",
                )
            self.closed = bool(flags & END_STREAM)

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise RpcError("INTERNAL", "coild sent a frame with invalid padding")
        return payload[1 : len(payload) - payload[0]]

    def _settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise RpcError("INTERNAL", "coild sent a SETTINGS frame of a wrong length")
        for i in range(0, len(payload) - 5, 6):
            key = int.from_bytes(payload[i : i + 2], "big")
            value = int.from_bytes(payload[i + 2 : i + 6], "big")
            if key == SETTINGS_INITIAL_WINDOW_SIZE:  # applies to open streams as a delta
                if value > MAX_WINDOW:
                    raise RpcError("INTERNAL", f"coild announced a window of {value} bytes")
                self.stream_window += value - self._initial_window
                self._initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                    raise RpcError("INTERNAL", f"coild announced a frame size of {value} bytes")
                self.max_frame = value

    def send_data(self, body: bytes) -> None:
        """Send ``body`` on stream 1 with END_STREAM, within the peer's frame size and windows.

        A body over EARLY_DATA_LIMIT waits for the server's SETTINGS first: sent before them, it
        would be counted against the default window of 65,535 bytes while the server may have
        announced less, and a server that grants credit only for what fits its own window would
        leave the call waiting for its deadline."""
        while len(body) > EARLY_DATA_LIMIT and not self.settings_seen:
            self.read_frame()
            if self.closed:
                return  # the server answered without the body (e.g. an error)
        sent = 0
        while not self.write_closed:
            allowed = min(self.send_window, self.stream_window, self.max_frame)
            if allowed <= 0 and sent < len(body):
                self.read_frame()  # wait for WINDOW_UPDATE or SETTINGS
                if self.closed:
                    return  # the server answered before reading it all (e.g. an error)
                continue
            chunk = body[sent : sent + allowed]
            sent += len(chunk)
            last = sent >= len(body)
            self.send(_frame(DATA, END_STREAM if last else 0, STREAM, chunk))
            self.send_window -= len(chunk)
            self.stream_window -= len(chunk)
            if last:
                return


def _connect(path: str, deadline: float) -> _socket.socket:
    """A connected socket; waits while the socket refuses (its server is restarting)."""
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.connect(path)
            return sock
        except (ConnectionRefusedError, FileNotFoundError, BlockingIOError) as e:
            # Refused: coild is restarting. BlockingIOError (EAGAIN): its accept queue is full.
            sock.close()
            if time.monotonic() + CONNECT_RETRY_S >= deadline:
                raise RpcError(
                    "DEADLINE_EXCEEDED", f"deadline exceeded while {path} refused connections ({e})"
                ) from None
            time.sleep(CONNECT_RETRY_S)
        except TimeoutError:
            sock.close()
            raise RpcError("DEADLINE_EXCEEDED", f"deadline exceeded connecting to {path}") from None
        except OSError as e:
            sock.close()
            raise RpcError("UNAVAILABLE", f"cannot connect to {path}: {e}") from None


def status_of(headers: list[list[tuple[bytes, bytes]]], peer: str = "coild") -> tuple[str, str]:
    """(status name, message) from an answer's header blocks (headers and trailers, in order):
    grpc-status if present, else what the HTTP status means (as grpcio decides). ``peer`` names
    the server in the messages this makes up."""
    fields: dict[bytes, bytes] = {}
    for block in headers:
        fields.update(block)
    raw = fields.get(b"grpc-status")
    if raw is not None:
        number = int(raw) if raw.isdigit() else -1
        name = STATUS_NAMES[number] if 0 <= number < len(STATUS_NAMES) else "UNKNOWN"
        return name, _percent_decode(fields.get(b"grpc-message", b""))
    http_status = fields.get(b":status", b"")
    if http_status != b"200":
        code = int(http_status) if http_status.isdigit() else 0
        return HTTP_STATUS_NAMES.get(code, "UNKNOWN"), f"{peer} answered HTTP status {code}"
    return "UNKNOWN", f"{peer}'s answer has no grpc-status"


def call(socket_path: str, method: str, request: bytes, timeout: float) -> bytes:
    """Call ``method`` ("/package.Service/Method") on the gRPC server at ``socket_path`` with the
    serialized ``request``; return the serialized answer. Raises RpcError; never retries."""
    deadline = time.monotonic() + timeout
    sock = _connect(socket_path, deadline)
    try:
        conn = _Connection(sock, deadline)
        window_bump = RECEIVE_WINDOW - DEFAULT_WINDOW
        settings = b"".join(
            key.to_bytes(2, "big") + value.to_bytes(4, "big")
            for key, value in (
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
                (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST),
            )
        )
        conn.send(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, window_bump.to_bytes(4, "big"))
            + _frame(
                HEADERS,
                END_HEADERS,
                STREAM,
                request_headers(method, max(1, int((deadline - time.monotonic()) * 1000))),
            )
        )
        conn.send_data(b"\x00" + len(request).to_bytes(4, "big") + request)
        while not conn.closed:
            conn.read_frame()
        status, message = status_of(conn.headers)
        if status != "OK":
            raise RpcError(status, message, transport=False)
        data = bytes(conn.data)
        if len(data) < 5 or data[0] != 0 or int.from_bytes(data[1:5], "big") != len(data) - 5:
            raise RpcError("INTERNAL", "coild's answer is not one uncompressed gRPC message")
        return data[5:]
    except TimeoutError:
        raise RpcError("DEADLINE_EXCEEDED", "deadline exceeded waiting for coild") from None
    except OSError as e:
        raise RpcError("UNAVAILABLE", f"connection to coild failed: {e}") from None
    finally:
        sock.close()
