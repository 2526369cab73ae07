"""Where a server listens: UNIX sockets only their owner (and root) can reach, and TCP only with
TLS unless explicitly insecure. Both servers bind through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from coil_grpc.files import owner_only, prepare_socket_path, seal_socket


class Server(Protocol):
    """What binding needs of a server: `grpc.Server`, or `coil_grpc.aio.AioServer`."""

    def add_insecure_port(self, address: str) -> int: ...

    def add_secure_port(self, address: str, credentials: grpc.ServerCredentials) -> int: ...

    def start(self) -> None: ...


def split_addresses(text: str | Sequence[str]) -> list[str]:
    """ "unix:/a.sock,0.0.0.0:9380" -> ["unix:/a.sock", "0.0.0.0:9380"]."""
    items = text.split(",") if isinstance(text, str) else list(text)
    return [a.strip() for a in items if a.strip()]


def is_unix(address: str) -> bool:
    return address.startswith("unix:")


def _bind(add: Callable[[str], int], address: str, what: str) -> int:
    try:
        return add(address)
    except RuntimeError as e:
        raise ValueError(f"{what}: cannot listen on {address!r}: {e}") from None


def listen_and_start(
    server: Server,
    addresses: Sequence[str],
    credentials: grpc.ServerCredentials | None = None,
    *,
    insecure: bool = False,
    what: str = "server",
) -> int:
    """Bind `server` to every address and start it; returns the first TCP port bound (0 if none).

    A "unix:PATH" address is served in plaintext on a socket of mode 0600 from its creation, in a
    directory others cannot write (`coil_grpc.files`). A "host:port" address is served with
    `credentials`; without them only when `insecure`. Raises ValueError naming the address when
    one is refused or cannot be bound.
    """
    if not addresses:
        raise ValueError(f"{what}: no address to listen on")
    sockets: list[str] = []
    first_port = 0
    with owner_only():
        for address in addresses:
            if is_unix(address):
                path = address.removeprefix("unix:")
                prepare_socket_path(path)
                _bind(server.add_insecure_port, address, what)
                sockets.append(path)
                continue
            if credentials is not None:
                port = _bind(lambda a: server.add_secure_port(a, credentials), address, what)
            elif insecure:
                port = _bind(server.add_insecure_port, address, what)
            else:
                raise ValueError(
                    f"{what}: {address!r} is a TCP address: it needs TLS with client "
                    "certificates (or --insecure)"
                )
            if port == 0:
                raise ValueError(f"{what}: cannot listen on {address!r}")
            first_port = first_port or port
        server.start()
    for path in sockets:
        seal_socket(path)
    return first_port
