"""A minimal asyncio reader of gRPC server-streaming calls over HTTP/2, for the load generator.

The quiet section simulates up to 20,000 coilds in one process, each holding a WatchNode stream.
grpc.aio's client costs 60-125 µs of the load generator's CPU per received message, and the
load generator shares the machine with the allocators it measures: a pool change fanned out to
20,000 streams would take 2.5 CPU-seconds of it. Real coilds run on their own nodes, so that cost
is the simulator's, not the system's. This module reads the streams itself and costs a few
microseconds a message: frames are parsed straight from what the socket delivered, and a message
goes into its stream's queue, waking the reader only when one waits.

It speaks just what a client of server-streaming calls needs (HTTP/2, RFC 9113; gRPC over HTTP/2,
grpc/doc/PROTOCOL-HTTP2.md), reusing the CNI plugin's frame constants, request headers and HPACK
decoder (``coil_cni.rpc``, ``coil_cni.hpack``):

- one ``Connection`` (an ``asyncio.Protocol``) per socket, many streams on it. It announces the
  largest windows HTTP/2 allows, so that flow control costs nothing per message (the windows are
  topped up once half of them is used, so that a long run never stalls), acknowledges SETTINGS
  and PING, and decodes every header block with the connection's one HPACK decoder, in order,
  also those of streams nobody reads any more (the dynamic table spans them).
- a ``Stream`` per call: ``async for message in stream`` yields each message's bytes; the
  iteration ends when the server ends the call with OK, or after ``stream.cancel()`` (which
  resets the stream; ``stream.cancelled`` tells), and raises ``coil_cni.rpc.RpcError`` (the gRPC
  status name and message) when the call ends otherwise: a non-OK grpc-status (in trailers or
  trailers-only), RST_STREAM, a GOAWAY that leaves the stream out, the connection lost
  (UNAVAILABLE).
- a ``Pool`` per target (``unix:PATH`` or ``host:port``): connections opened when needed, at most
  ``per_connection`` streams on each, a new one when the others are full, closing or dead.

Requests are small (one frame, at most ``coil_cni.rpc.EARLY_DATA_LIMIT`` bytes); they still wait
when the server's flow-control windows leave no room for them.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque

from coil_cni.hpack import Decoder, HpackError
from coil_cni.rpc import (
    ACK,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    DEFAULT_WINDOW,
    EARLY_DATA_LIMIT,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    MAX_HEADER_LIST,
    MAX_WINDOW,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    RESET_NAMES,
    RST_STREAM,
    SETTINGS,
    SETTINGS_ENABLE_PUSH,
    SETTINGS_INITIAL_WINDOW_SIZE,
    WINDOW_UPDATE,
    RpcError,
    _frame,
    request_headers,
    status_of,
)

SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
NO_ERROR, PROTOCOL_ERROR, CANCEL = 0x0, 0x1, 0x8  # HTTP/2 error codes (RFC 9113 7)
MAX_STREAM_ID = 2**31 - 1
# A window is topped up once this much of it has been used: never per message, and long before
# the sender would have to wait.
REFILL = MAX_WINDOW // 2
# The largest message a stream accepts (the load generator's grpc.aio channels allowed as much).
MAX_MESSAGE = 64 * 1024 * 1024
USER_AGENT = b"coil-bench-h2watch"

_HEAD = struct.Struct(">BHBBL")  # a frame header: length (8 + 16 bits), type, flags, stream
_PREFIX = struct.Struct(">BL")  # a gRPC message's prefix: compressed flag, length
_WORD = struct.Struct(">L")


class ProtocolError(Exception):
    """The server broke HTTP/2 or gRPC on the connection: every stream on it fails."""


class Stream:
    """One server-streaming call. Iterate it for the messages' bytes (see the module's doc)."""

    __slots__ = (
        "id",
        "cancelled",
        "ended",
        "_conn",
        "_queue",
        "_waiter",
        "_chunks",
        "_have",
        "_need",
        "_headers",
        "_error",
        "_unacked",
        "_body",
        "_send_window",
    )

    def __init__(self, conn: Connection, stream_id: int, body: bytes) -> None:
        self.id = stream_id
        self.cancelled = False  # ended by cancel()
        self.ended = False  # no more messages will come (some may still be queued)
        self._conn = conn
        self._queue: deque[bytes] = deque()
        self._waiter: asyncio.Future[None] | None = None
        # The start of a message whose end has not come yet: its pieces, their bytes, and the
        # bytes it needs (its prefix, or the whole message once the prefix is known).
        self._chunks: list[bytes] = []
        self._have = 0
        self._need = 0
        self._headers: list[list[tuple[bytes, bytes]]] = []  # header blocks, in order
        self._error: RpcError | None = None
        self._unacked = 0  # bytes received since the stream's window was last topped up
        self._body = body  # the request, until it is sent
        self._send_window = 0  # what the server lets this stream send (while the body waits)

    def __aiter__(self) -> Stream:
        return self

    async def __anext__(self) -> bytes:
        queue = self._queue
        while not queue:
            if self.ended:
                if self._error is not None:
                    raise self._error
                raise StopAsyncIteration
            waiter = self._waiter = self._conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        return queue.popleft()

    async def read(self) -> bytes | None:
        """The next message, or None when the call ended with OK or was cancelled."""
        try:
            return await self.__anext__()
        except StopAsyncIteration:
            return None

    def cancel(self) -> bool:
        """End the call now (RST_STREAM CANCEL to the server): the iteration ends, what was
        queued is dropped. False if it had ended already."""
        if self.ended:
            return False
        self.cancelled = True
        self._queue.clear()
        self._conn.reset(self, None)
        return True

    def _end(self, error: RpcError | None) -> None:
        self.ended = True
        self._error = error
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _received(self, data: bytes, start: int, stop: int) -> RpcError | None:
        """Take the DATA payload ``data[start:stop]``: queue each message it completes. Returns
        the error that ends the stream when a message cannot be taken."""
        if self._have:  # the rest of a message that began in an earlier frame
            self._chunks.append(data[start:stop])
            self._have += stop - start
            if self._have < self._need:
                return None  # joined once it is whole: a large message is copied once
            data = b"".join(self._chunks)
            start, stop = 0, len(data)
            self._chunks = []
            self._have = 0
        queue = self._queue
        before = len(queue)
        limit = self._conn.max_message
        need = 5
        while stop - start >= 5:
            compressed, size = _PREFIX.unpack_from(data, start)
            if compressed:
                return RpcError("INTERNAL", "the server sent a compressed message (none asked)")
            if size > limit:
                return RpcError(
                    "RESOURCE_EXHAUSTED", f"a message of {size} bytes exceeds the {limit} allowed"
                )
            end = start + 5 + size
            if end > stop:
                need = 5 + size
                break
            queue.append(data[start + 5 : end])
            start = end
        if start < stop:
            self._chunks = [data[start:stop]]
            self._have = stop - start
            self._need = need
        if len(queue) > before:
            self._wake()
        return None


class Connection(asyncio.Protocol):
    """The client side of one HTTP/2 connection carrying many server-streaming calls."""

    def __init__(self, target: str, max_message: int = MAX_MESSAGE) -> None:
        self.target = target
        self.max_message = max_message
        self.loop = asyncio.get_running_loop()
        self.closed = False  # the connection is gone (or going: no more reading)
        self.going_away = False  # the server sent GOAWAY: no new streams here
        self.max_streams = MAX_STREAM_ID  # the server's SETTINGS_MAX_CONCURRENT_STREAMS
        self._transport: asyncio.Transport | None = None
        self._streams: dict[int, Stream] = {}
        self._next_id = 1
        self._buffer = b""  # the start of a frame whose end has not come yet
        self._decoder = Decoder()
        self._block: bytes | None = None  # a header block waiting for its CONTINUATION frames
        self._block_stream = 0
        self._block_ends_stream = False
        self._unacked = 0  # bytes received since the connection's window was last topped up
        self._send_window = DEFAULT_WINDOW  # what the server lets this connection send
        self._peer_window = DEFAULT_WINDOW  # the server's SETTINGS_INITIAL_WINDOW_SIZE
        self._waiting: deque[Stream] = deque()  # streams whose request waits for window

    # -- what the pool asks --------------------------------------------------------------------

    @property
    def active(self) -> int:
        """Streams open on the connection."""
        return len(self._streams)

    def usable(self) -> bool:
        """True while new streams may be opened here."""
        return not self.closed and not self.going_away and self._next_id <= MAX_STREAM_ID

    def open(self, path: str, request: bytes) -> Stream:
        """Start the call ``path`` ("/package.Service/Method") with the serialized ``request``."""
        if not self.usable():
            raise RpcError("UNAVAILABLE", f"the connection to {self.target} takes no new calls")
        body = b"\x00" + len(request).to_bytes(4, "big") + request
        if len(body) > EARLY_DATA_LIMIT:
            raise ValueError(f"a request of {len(request)} bytes is more than this client sends")
        stream = Stream(self, self._next_id, body)
        self._next_id += 2
        self._streams[stream.id] = stream
        self._write(
            _frame(HEADERS, END_HEADERS, stream.id, request_headers(path, None, USER_AGENT))
        )
        stream._send_window = self._peer_window
        self._waiting.append(stream)
        self._send_waiting()
        return stream

    def close(self) -> None:
        """Close the connection: its open streams fail UNAVAILABLE."""
        if self._transport is not None:
            self._transport.close()

    def reset(self, stream: Stream, error: RpcError | None) -> None:
        """End ``stream`` here and tell the server (RST_STREAM CANCEL)."""
        if self._streams.pop(stream.id, None) is not None:
            self._write(_frame(RST_STREAM, 0, stream.id, _WORD.pack(CANCEL)))
        stream._end(error)
        self._close_if_done()

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        settings = b"".join(
            key.to_bytes(2, "big") + value.to_bytes(4, "big")
            for key, value in (
                (SETTINGS_ENABLE_PUSH, 0),
                (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            )
        )
        transport.write(
            PREFACE
            + _frame(SETTINGS, 0, 0, settings)
            + _frame(WINDOW_UPDATE, 0, 0, _WORD.pack(MAX_WINDOW - DEFAULT_WINDOW))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        why = f": {exc}" if exc else ""
        self._fail_all(RpcError("UNAVAILABLE", f"the connection to {self.target} was lost{why}"))

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        end = len(data)
        pos = 0
        streams = self._streams
        unpack = _HEAD.unpack_from
        try:
            while end - pos >= 9:
                high, low, kind, flags, stream_id = unpack(data, pos)
                length = high << 16 | low
                if length > DEFAULT_MAX_FRAME:  # the largest this side allows (never raised)
                    raise ProtocolError(f"a frame of {length} bytes")
                start = pos + 9
                stop = start + length
                if stop > end:
                    break
                pos = stop
                stream_id &= MAX_STREAM_ID
                if self._block is not None and kind != CONTINUATION:
                    raise ProtocolError("a header block without its CONTINUATION")
                if kind == DATA:
                    if flags & PADDED:
                        start, stop = _unpad(data, start, stop)
                    self._unacked += length
                    stream = streams.get(stream_id)
                    if stream is not None:
                        error = stream._received(data, start, stop)
                        if error is not None:
                            self.reset(stream, error)
                        elif flags & END_STREAM:
                            self._finish(
                                stream, RpcError("INTERNAL", "the call ended without trailers")
                            )
                        else:
                            stream._unacked += length
                            if stream._unacked >= REFILL:
                                self._write(
                                    _frame(WINDOW_UPDATE, 0, stream_id, _WORD.pack(stream._unacked))
                                )
                                stream._unacked = 0
                    if self._unacked >= REFILL:
                        self._write(_frame(WINDOW_UPDATE, 0, 0, _WORD.pack(self._unacked)))
                        self._unacked = 0
                elif kind == HEADERS:
                    if flags & PADDED:
                        start, stop = _unpad(data, start, stop)
                    if flags & PRIORITY:
                        start += 5
                        if start > stop:
                            raise ProtocolError("a HEADERS frame with a cut priority")
                    self._header_block(stream_id, flags, data[start:stop])
                elif kind == CONTINUATION:
                    if self._block is None or stream_id != self._block_stream:
                        raise ProtocolError("a CONTINUATION frame out of place")
                    self._block += data[start:stop]
                    if len(self._block) > MAX_HEADER_LIST:
                        raise ProtocolError(f"a header block of more than {MAX_HEADER_LIST} bytes")
                    if flags & END_HEADERS:
                        block, self._block = self._block, None
                        self._headers(stream_id, self._block_ends_stream, block)
                else:
                    self._control(kind, flags, stream_id, data[start:stop])
                if self.closed:
                    return
        except ProtocolError as e:
            self._abort(f"the server broke HTTP/2: {e}")
            return
        if pos < end:
            self._buffer = data[pos:]

    # -- frames ----------------------------------------------------------------------------

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        if flags & END_HEADERS:
            self._headers(stream_id, bool(flags & END_STREAM), block)
        else:
            self._block = block
            self._block_stream = stream_id
            self._block_ends_stream = bool(flags & END_STREAM)

    def _headers(self, stream_id: int, ends_stream: bool, block: bytes) -> None:
        # Every block goes through the decoder, also one of a stream nobody reads any more.
        try:
            headers = self._decoder.decode(block)
        except HpackError as e:
            raise ProtocolError(f"unreadable headers ({e})") from None
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        stream._headers.append(headers)
        if not ends_stream:
            return
        status, message = status_of(stream._headers, self.target)
        if status != "OK":
            self._finish(stream, RpcError(status, message, transport=False))
        elif stream._have:
            self._finish(stream, RpcError("INTERNAL", "the call ended inside a message"))
        else:
            self._finish(stream, None)

    def _control(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if kind == RST_STREAM:
            if len(payload) != 4:
                raise ProtocolError("a RST_STREAM frame of a wrong length")
            stream = self._streams.get(stream_id)
            if stream is not None:
                code = _WORD.unpack(payload)[0]
                self._finish(
                    stream,
                    RpcError(
                        RESET_NAMES.get(code, "INTERNAL"),
                        f"{self.target} reset the call (HTTP/2 error {code})",
                    ),
                )
        elif kind == SETTINGS:
            if flags & ACK:
                return
            if len(payload) % 6:
                raise ProtocolError("a SETTINGS frame of a wrong length")
            for i in range(0, len(payload), 6):
                key = int.from_bytes(payload[i : i + 2], "big")
                value = int.from_bytes(payload[i + 2 : i + 6], "big")
                if key == SETTINGS_INITIAL_WINDOW_SIZE:
                    if value > MAX_WINDOW:
                        raise ProtocolError(f"a window of {value} bytes")
                    for stream in self._waiting:  # a change applies to open streams as a delta
                        stream._send_window += value - self._peer_window
                    self._peer_window = value
                elif key == SETTINGS_MAX_CONCURRENT_STREAMS:
                    self.max_streams = value
            self._write(_frame(SETTINGS, ACK, 0))
            self._send_waiting()
        elif kind == PING:
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            if len(payload) < 8:
                raise ProtocolError("a GOAWAY frame too short")
            last = _WORD.unpack_from(payload)[0] & MAX_STREAM_ID
            code = _WORD.unpack_from(payload, 4)[0]
            self.going_away = True
            for stream_id in [s for s in self._streams if s > last]:
                self._finish(
                    self._streams[stream_id],
                    RpcError(
                        "UNAVAILABLE", f"{self.target} went away (GOAWAY, HTTP/2 error {code})"
                    ),
                )
            self._close_if_done()
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise ProtocolError("a WINDOW_UPDATE frame of a wrong length")
            increment = _WORD.unpack(payload)[0] & MAX_WINDOW
            if stream_id == 0:
                self._send_window += increment
            else:
                for stream in self._waiting:
                    if stream.id == stream_id:
                        stream._send_window += increment
            self._send_waiting()
        # PRIORITY, PUSH_PROMISE (push is off) and unknown types: nothing to do.

    # -- helpers -------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if not self.closed and self._transport is not None:
            self._transport.write(data)

    def _send_waiting(self) -> None:
        """Send the requests that wait, in order, as far as the server's windows allow."""
        waiting = self._waiting
        while waiting:
            stream = waiting[0]
            if stream.ended:
                waiting.popleft()
                continue
            size = len(stream._body)
            if size > self._send_window or size > stream._send_window:
                return
            waiting.popleft()
            self._send_window -= size
            self._write(_frame(DATA, END_STREAM, stream.id, stream._body))
            stream._body = b""

    def _finish(self, stream: Stream, error: RpcError | None) -> None:
        """The server ended ``stream`` (nothing to tell it)."""
        self._streams.pop(stream.id, None)
        stream._end(error)
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self.going_away and not self._streams:
            self.close()

    def _fail_all(self, error: RpcError) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._end(error)

    def _abort(self, why: str) -> None:
        self._write(_frame(GOAWAY, 0, 0, _WORD.pack(0) + _WORD.pack(PROTOCOL_ERROR)))
        self.closed = True
        self._fail_all(RpcError("INTERNAL", why))
        if self._transport is not None:
            self._transport.close()


def _unpad(data: bytes, start: int, stop: int) -> tuple[int, int]:
    if start >= stop or data[start] >= stop - start:
        raise ProtocolError("a frame with invalid padding")
    return start + 1, stop - data[start]


async def connect(target: str, max_message: int = MAX_MESSAGE) -> Connection:
    """A connection to ``target``: "unix:PATH" (or "unix:///PATH") or "host:port". Raises
    RpcError UNAVAILABLE when it cannot be made."""
    loop = asyncio.get_running_loop()
    conn = Connection(target, max_message)
    try:
        if target.startswith("unix:"):
            path = target[5:]
            if path.startswith("//"):
                path = path[2:]
            await loop.create_unix_connection(lambda: conn, path)
        else:
            host, _, port = target.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f'target "{target}": neither "unix:PATH" nor "host:port"')
            await loop.create_connection(lambda: conn, host.strip("[]"), int(port))
    except OSError as e:
        raise RpcError("UNAVAILABLE", f"cannot connect to {target}: {e}") from None
    return conn


class Pool:
    """Connections to one target, at most ``per_connection`` streams on each, opened as needed."""

    def __init__(self, target: str, per_connection: int = 100, max_message: int = MAX_MESSAGE):
        if per_connection < 1:
            raise ValueError(f"per_connection {per_connection}: at least one stream a connection")
        self.target = target
        self.per_connection = per_connection
        self.max_message = max_message
        self.connections: list[Connection] = []
        self._connecting: asyncio.Future[None] | None = None

    async def open(self, path: str, request: bytes) -> Stream:
        """Start the call ``path`` on a connection with room. Raises RpcError UNAVAILABLE when
        no connection can be made."""
        while True:
            conn = self._room()
            if conn is not None:
                return conn.open(path, request)
            if self._connecting is None:
                self._connecting = asyncio.ensure_future(self._connect())
                # Its failure reaches every caller waiting then; none waiting is no news.
                self._connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
            await asyncio.shield(self._connecting)

    def close(self) -> None:
        """Close every connection: their open streams fail UNAVAILABLE."""
        for conn in self.connections:
            conn.close()

    def _room(self) -> Connection | None:
        conns = self.connections
        if any(c.closed for c in conns):
            conns[:] = [c for c in conns if not c.closed]
        for conn in conns:
            if conn.usable() and conn.active < min(self.per_connection, conn.max_streams):
                return conn
        return None

    async def _connect(self) -> None:
        try:
            self.connections.append(await connect(self.target, self.max_message))
        finally:
            self._connecting = None
