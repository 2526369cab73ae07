"""bench.h2watch, the load generator's own reader of WatchNode streams, against a real allocator
process on a UNIX socket and a real etcd: many streams on one connection bring what grpcio
brings, a refusal surfaces with the server's status, a cancelled stream ends (and the server lets
it go) while its neighbours go on, and the allocator's stop or death fails every stream
UNAVAILABLE; the pool then reconnects. One test of pure framing logic feeds a connection
hand-built frames cut at every size (messages across frames, several in one, padding, header
blocks of streams nobody reads, GOAWAY)."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import hpack
import pytest

from bench import h2watch
from coil.v1 import allocator_pb2 as apb
from coil.v1 import allocator_pb2_grpc as apb_grpc
from coil_cni import rpc
from coil_cni.rpc import RpcError
from tests.harness.cluster import Proc, start_allocator
from tests.harness.etcd import EtcdServer

WATCH_NODE = "/coil.v1.AllocatorService/WatchNode"
T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 60) -> T:
    """Run ``coro`` on a fresh event loop, failing after ``timeout`` seconds."""

    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def watch_request(node: str) -> bytes:
    return apb.WatchNodeRequest(node=node).SerializeToString()


async def message(stream: h2watch.Stream, timeout: float = 20) -> apb.WatchNodeResponse:
    raw = await asyncio.wait_for(stream.read(), timeout)
    assert raw is not None, f"stream {stream.id} ended without a message"
    return apb.WatchNodeResponse.FromString(raw)


class Allocator:
    """A coil-allocator process on a UNIX socket, over the test's etcd prefix."""

    def __init__(self, etcd: EtcdServer, prefix: str, extra: list[str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="h2w-"))  # short: a socket path is limited
        self.target = f"unix:{self.dir}/allocator.sock"
        self._etcd, self._prefix, self._extra = etcd, prefix, extra
        self.proc: Proc | None = None
        self.channel: grpc.Channel | None = None

    def start(self) -> None:
        if self.channel is not None:
            self.channel.close()
        self.proc = start_allocator(
            self._etcd.endpoint, self._prefix, self.target, self.dir / "allocator.log", self._extra
        )
        self.channel = grpc.insecure_channel(self.target)
        self.stub = apb_grpc.AllocatorServiceStub(self.channel)

    def create_pool(self, name: str, subnets: list[str]) -> None:
        self.stub.CreatePool(
            apb.CreatePoolRequest(name=name, subnets=subnets, block_size_bits=5), timeout=20
        )

    def close(self) -> None:
        if self.channel is not None:
            self.channel.close()
        if self.proc is not None:
            self.proc.kill()


@pytest.fixture
def allocators(etcd_server: EtcdServer, etcd_prefix: str) -> Iterator[Any]:
    made: list[Allocator] = []

    def make(*extra: str) -> Allocator:
        a = Allocator(etcd_server, etcd_prefix, list(extra))
        made.append(a)
        a.start()
        return a

    yield make
    for a in made:
        a.close()
        shutil.rmtree(a.dir, ignore_errors=True)


def test_many_streams_on_one_connection_bring_what_grpcio_brings(allocators: Any) -> None:
    alloc = allocators()
    alloc.create_pool("default", ["10.0.0.0/16"])
    nodes = [f"n-{i:03d}" for i in range(120)]
    # The same nodes through grpcio, one stream each: the reference.
    reference = [alloc.stub.WatchNode(apb.WatchNodeRequest(node=n)) for n in nodes]
    try:
        ref_snapshots = [next(r) for r in reference]

        async def scenario() -> tuple[list[Any], list[Any], int]:
            conn = await h2watch.connect(alloc.target)
            streams = [conn.open(WATCH_NODE, watch_request(n)) for n in nodes]
            snapshots = [await message(s) for s in streams]
            # A pool whose message is larger than a frame (16 KiB): it spans DATA frames, which
            # the server interleaves across the streams.
            subnets = [f"10.{1 + i // 256}.{i % 256}.0/24" for i in range(1500)]
            await asyncio.to_thread(alloc.create_pool, "team", subnets)
            changes = [await message(s) for s in streams]
            active = conn.active
            conn.close()
            return snapshots, changes, active

        snapshots, changes, active = run(scenario())
        ref_changes = [next(r) for r in reference]
    finally:
        for r in reference:
            r.cancel()
    assert active == len(nodes)  # all of them on the one connection, all still open
    for mine, theirs in zip(snapshots, ref_snapshots, strict=True):
        assert mine.snapshot and [p.name for p in mine.pools] == ["default"]
        mine.ClearField("revision")  # a snapshot is as of when it was taken
        theirs.ClearField("revision")
        assert mine == theirs
    for mine, theirs in zip(changes, ref_changes, strict=True):
        assert not mine.snapshot
        assert "team" in [p.name for p in mine.pools]
        assert mine.ByteSize() > 16_384
        assert mine == theirs  # the same change: the same message, revision included


def test_a_refusal_surfaces_with_the_servers_status_and_cancel_ends_one_stream(
    allocators: Any,
) -> None:
    alloc = allocators("--max-watchers", "10")
    alloc.create_pool("default", ["10.0.0.0/16"])
    with pytest.raises(grpc.RpcError) as grpcio_refusal:
        next(alloc.stub.WatchNode(apb.WatchNodeRequest(node="Bad Name!")))

    async def scenario() -> None:
        pool = h2watch.Pool(alloc.target, per_connection=100)
        streams = [await pool.open(WATCH_NODE, watch_request(f"n-{i}")) for i in range(10)]
        for s in streams:
            assert (await message(s)).snapshot
        # A name the allocator refuses: its status and message, as grpcio reports them.
        bad = await pool.open(WATCH_NODE, watch_request("Bad Name!"))
        with pytest.raises(RpcError) as refusal:
            await bad.read()
        assert refusal.value.status == grpcio_refusal.value.code().name == "INVALID_ARGUMENT"
        assert refusal.value.message == grpcio_refusal.value.details()
        assert not refusal.value.transport
        # One stream more than the allocator serves: UNAVAILABLE.
        extra = await pool.open(WATCH_NODE, watch_request("n-extra"))
        with pytest.raises(RpcError, match="serves 10 watchers already") as full:
            await extra.read()
        assert full.value.status == "UNAVAILABLE"
        # A cancelled stream ends at once, its neighbours on the connection go on.
        assert streams[0].cancel()
        assert streams[0].cancelled and await streams[0].read() is None
        assert not streams[0].cancel()  # once
        # The server let it go: a new stream finds room (once the reset has reached it).
        deadline = time.monotonic() + 10
        while True:
            again = await pool.open(WATCH_NODE, watch_request("n-again"))
            try:
                assert (await message(again)).snapshot
                break
            except RpcError as e:
                assert "watchers already" in e.message and time.monotonic() < deadline, e
                await asyncio.sleep(0.1)
        await asyncio.to_thread(alloc.create_pool, "team", ["10.9.0.0/16"])
        for s in [*streams[1:], again]:
            assert "team" in [p.name for p in (await message(s)).pools]
        assert await streams[0].read() is None
        assert len(pool.connections) == 1
        pool.close()

    run(scenario())


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_the_allocators_end_fails_every_stream_unavailable_and_the_pool_reconnects(
    allocators: Any, how: str
) -> None:
    alloc = allocators()
    alloc.create_pool("default", ["10.0.0.0/16"])
    assert alloc.proc is not None

    async def scenario() -> None:
        pool = h2watch.Pool(alloc.target, per_connection=10)
        streams = [await pool.open(WATCH_NODE, watch_request(f"n-{i}")) for i in range(25)]
        assert sorted(c.active for c in pool.connections) == [5, 10, 10]
        for s in streams:
            assert (await message(s)).snapshot
        assert alloc.proc is not None
        if how == "stop":
            alloc.proc.popen.send_signal(signal.SIGTERM)  # a clean stop: 5 s of grace
        else:
            alloc.proc.popen.kill()
        for s in streams:
            with pytest.raises(RpcError) as ended:
                await asyncio.wait_for(s.read(), 20)
            assert ended.value.status == "UNAVAILABLE", ended.value
        await asyncio.to_thread(alloc.proc.popen.wait, 20)
        # Nothing listens: opening fails UNAVAILABLE, and works again once it is back.
        with pytest.raises(RpcError) as refused:
            await pool.open(WATCH_NODE, watch_request("n-0"))
        assert refused.value.status == "UNAVAILABLE"
        await asyncio.to_thread(alloc.start)
        back = await pool.open(WATCH_NODE, watch_request("n-0"))
        assert (await message(back)).snapshot
        assert len(pool.connections) == 1  # the dead ones are gone
        pool.close()

    run(scenario())


# --- framing, fed by hand ----------------------------------------------------------------------


class Recorder(asyncio.Transport):
    """What the connection writes, as (type, flags, stream, payload) frames after the preface."""

    def __init__(self) -> None:
        super().__init__()
        self.data = b""
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += bytes(data)

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[tuple[int, int, int, bytes]]:
        assert self.data.startswith(rpc.PREFACE)
        data, out = self.data[len(rpc.PREFACE) :], []
        while data:
            length = int.from_bytes(data[:3], "big")
            out.append((data[3], data[4], int.from_bytes(data[5:9], "big"), data[9 : 9 + length]))
            data = data[9 + length :]
        return out


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


def server_bytes() -> bytes:
    """What a server says to streams 1, 3, 5 (cancelled by the client) and 7."""
    enc = hpack.Encoder()  # indexes what it sends: later blocks refer to earlier ones
    head = [(":status", "200"), ("content-type", "application/grpc"), ("x-trace", "abc")]
    long = b"L" * 40_000
    spanning = grpc_message(long)
    out = [
        frame(rpc.SETTINGS, 0, 0, (3).to_bytes(2, "big") + (100).to_bytes(4, "big")),
        frame(rpc.HEADERS, rpc.END_HEADERS, 5, enc.encode(head)),  # a stream nobody reads
        frame(rpc.HEADERS, rpc.END_HEADERS, 1, enc.encode(head)),  # refers to 5's entries
        frame(rpc.HEADERS, rpc.END_HEADERS, 3, enc.encode(head)),
        frame(rpc.DATA, 0, 5, grpc_message(b"ignored")),
        frame(rpc.DATA, 0, 1, grpc_message(b"one") + grpc_message(b"") + grpc_message(b"three")),
        frame(rpc.DATA, 0, 3, spanning[:3]),  # the prefix cut in two
        frame(rpc.DATA, 0, 3, spanning[3:16_000]),
        frame(rpc.PING, 0, 0, b"12345678"),
        # padded: pad length 4, then the data, then 4 bytes of padding
        frame(rpc.DATA, rpc.PADDED, 3, b"\x04" + spanning[16_000:30_000] + b"\x00" * 4),
        frame(rpc.DATA, 0, 3, spanning[30_000:] + grpc_message(b"after")),
    ]
    headers_7 = enc.encode([*head, ("x-more", "a value long enough to be cut")])
    out += [
        # stream 7: its headers in a HEADERS and a CONTINUATION frame
        frame(rpc.HEADERS, 0, 7, headers_7[:4]),
        frame(rpc.CONTINUATION, rpc.END_HEADERS, 7, headers_7[4:]),
        frame(rpc.GOAWAY, 0, 0, (5).to_bytes(4, "big") + (0).to_bytes(4, "big")),
        frame(rpc.HEADERS, rpc.END_HEADERS | rpc.END_STREAM, 1, enc.encode([("grpc-status", "0")])),
        frame(
            rpc.HEADERS,
            rpc.END_HEADERS | rpc.END_STREAM,
            3,
            enc.encode([("grpc-status", "5"), ("grpc-message", "no%20such pool")]),
        ),
    ]
    return b"".join(out)


@pytest.mark.parametrize("cut", [1, 5, 9, 10, 4096, 1 << 20])
def test_frames_cut_anywhere_bring_every_message_and_status(
    cut: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h2watch, "REFILL", 20_000)  # the windows' top-ups, seen in a short run
    data = server_bytes()

    async def scenario() -> None:
        conn = h2watch.Connection("unix:/test")
        out = Recorder()
        conn.connection_made(out)
        s1, s3, s5, s7 = (conn.open(WATCH_NODE, watch_request(f"n-{i}")) for i in range(4))
        assert [s1.id, s3.id, s5.id, s7.id] == [1, 3, 5, 7]
        s5.cancel()
        for i in range(0, len(data), cut):
            conn.data_received(data[i : i + cut])
        assert [m async for m in s1] == [b"one", b"", b"three"]
        with pytest.raises(RpcError) as not_found:
            assert await s3.read() == b"L" * 40_000
            assert await s3.read() == b"after"
            await s3.read()
        assert (not_found.value.status, not_found.value.message) == ("NOT_FOUND", "no such pool")
        with pytest.raises(RpcError, match="GOAWAY") as away:
            await s7.read()
        assert away.value.status == "UNAVAILABLE"
        assert await s5.read() is None
        with pytest.raises(RpcError, match="no new calls"):
            conn.open(WATCH_NODE, watch_request("n-late"))
        assert out.closed  # away, and no stream left
        frames = out.frames()
        settings = frames[0]
        assert settings[0] == rpc.SETTINGS
        assert (rpc.SETTINGS_INITIAL_WINDOW_SIZE).to_bytes(2, "big") + (2**31 - 1).to_bytes(
            4, "big"
        ) in settings[3]
        assert frames[1] == (rpc.WINDOW_UPDATE, 0, 0, (2**31 - 1 - 65_535).to_bytes(4, "big"))
        assert (rpc.RST_STREAM, 0, 5, (8).to_bytes(4, "big")) in frames  # CANCEL
        assert (rpc.SETTINGS, rpc.ACK, 0, b"") in frames
        assert (rpc.PING, rpc.ACK, 0, b"12345678") in frames
        requests = [f for f in frames if f[0] == rpc.DATA]
        assert [f[2] for f in requests] == [1, 3, 5, 7]
        assert all(f[1] == rpc.END_STREAM for f in requests)
        assert apb.WatchNodeRequest.FromString(requests[1][3][5:]).node == "n-1"
        # The windows are topped up once REFILL bytes came: the connection's for all of them,
        # stream 3's for its own (40 KB).
        updates = [f for f in frames if f[0] == rpc.WINDOW_UPDATE][1:]
        assert {f[2] for f in updates} == {0, 3}
        for stream in (0, 3):
            topped = sum(int.from_bytes(f[3], "big") for f in updates if f[2] == stream)
            assert 20_000 <= topped <= 40_100

    run(scenario(), timeout=30)


def test_a_request_waits_for_the_servers_window() -> None:
    async def scenario() -> None:
        conn = h2watch.Connection("unix:/test")
        out = Recorder()
        conn.connection_made(out)
        # The server lets no stream send before it says so.
        conn.data_received(frame(rpc.SETTINGS, 0, 0, (4).to_bytes(2, "big") + bytes(4)))
        stream = conn.open(WATCH_NODE, watch_request("n-0"))
        assert [f[0] for f in out.frames() if f[2] == stream.id] == [rpc.HEADERS]
        conn.data_received(frame(rpc.WINDOW_UPDATE, 0, stream.id, (100).to_bytes(4, "big")))
        sent = [f for f in out.frames() if f[2] == stream.id]
        assert [f[0] for f in sent] == [rpc.HEADERS, rpc.DATA]
        assert sent[1][3] == grpc_message(watch_request("n-0"))

    run(scenario(), timeout=10)
