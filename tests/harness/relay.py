"""A TCP relay from inside a node's network namespace to a TCP address on the host.

coild in a node namespace cannot reach the host's loopback, and the allocator serves TLS only on
TCP (its UNIX sockets are plaintext, for root on the host). Two small forwarders carry each
connection: one in the namespace, from 127.0.0.1:PORT there to a UNIX socket (the file system is
shared), and one on the host, from that socket to the allocator's TCP address. TLS passes through
end to end, so the allocator sees coild's own certificate.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

from tests.harness.cluster import Proc, spawn, wait_until
from tests.harness.net import Netns

FORWARDER = textwrap.dedent(
    """
    import asyncio, sys

    def parse(spec):
        if spec.startswith("unix:"):
            return spec[5:], None
        host, _, port = spec.rpartition(":")
        return host, int(port)

    (listen_host, listen_port), (to_host, to_port) = parse(sys.argv[1]), parse(sys.argv[2])

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader, writer):
        try:
            if to_port is None:
                upstream_reader, upstream_writer = await asyncio.open_unix_connection(to_host)
            else:
                upstream_reader, upstream_writer = await asyncio.open_connection(to_host, to_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, upstream_writer), pipe(upstream_reader, writer))

    async def main():
        if listen_port is None:
            server = await asyncio.start_unix_server(handle, listen_host)
        else:
            server = await asyncio.start_server(handle, listen_host, listen_port)
        print("listening", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    """
)


def relay_into(ns: Netns, port: int, target: str, workdir: Path) -> list[Proc]:
    """Relay 127.0.0.1:`port` inside `ns` to `target` ("host:port") on the host; returns the two
    forwarder processes (listening), which the caller stops."""
    relay = workdir / f"relay-{ns.name}-{port}.sock"
    procs = [
        spawn(
            "host forwarder",
            [sys.executable, "-c", FORWARDER, f"unix:{relay}", target],
            workdir / f"forwarder-host-{port}.log",
        )
    ]
    try:
        wait_until("host forwarder", lambda: "listening" in procs[0].tail(), proc=procs[0])
        procs.append(
            spawn(
                "namespace forwarder",
                [
                    "ip",
                    "netns",
                    "exec",
                    ns.name,
                    sys.executable,
                    "-c",
                    FORWARDER,
                    f"127.0.0.1:{port}",
                    f"unix:{relay}",
                ],
                workdir / f"forwarder-ns-{port}.log",
            )  # fmt: skip
        )
        wait_until("namespace forwarder", lambda: "listening" in procs[1].tail(), proc=procs[1])
    except BaseException:
        for p in procs:
            p.stop()
        raise
    return procs
