"""coilctl's connection to the allocator: one channel per run, one unary call per request.

Only commands that talk to the allocator import this module (grpc and the generated stubs are
most of coilctl's start-up). Every call raises `CtlError` instead of `grpc.RpcError`: exit code 3
when the allocator is unreachable or too slow (UNAVAILABLE, DEADLINE_EXCEEDED), 1 for any other
status, whose message (it names the operation and quotes the input) is passed on as it is.
Nothing here retries.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from coil.v1 import allocator_pb2 as pb
from coil.v1 import allocator_pb2_grpc as pb_grpc
from coilctl.config import Settings
from coilctl.errors import EXIT_FAILED, EXIT_UNREACHABLE, CtlError, UsageError

UNREACHABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)

NODE_BLOCKS_PAGE = 2000
"""Records per ListNodeBlocks page: about 0.5 MiB, far under gRPC's 4 MiB receive limit."""


def _address_key(text: str) -> tuple[int, int]:
    address = ipaddress.ip_address(text)
    return address.version, int(address)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as e:
        raise UsageError(f'TLS {what} "{path}": cannot read: {e.strerror or e}') from None


def _channel(settings: Settings) -> grpc.Channel:
    if not settings.tls:
        return grpc.insecure_channel(settings.allocator)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca, "CA"),
        private_key=_read(settings.tls_key, "key"),
        certificate_chain=_read(settings.tls_cert, "certificate"),
    )
    # Over a UNIX socket gRPC would check the certificate against the socket's path; the
    # allocator's certificate is expected to name "localhost" there.
    options = (
        [("grpc.ssl_target_name_override", "localhost")]
        if settings.allocator.startswith("unix:")
        else []
    )
    return grpc.secure_channel(settings.allocator, credentials, options=options)


class Allocator:
    """The allocator's RPCs, each returning the response message or raising `CtlError`."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._channel = _channel(settings)
        self._stub = pb_grpc.AllocatorServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Allocator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Callable[..., Any], request: Any) -> Any:
        try:
            return method(request, timeout=self._settings.timeout)
        except grpc.RpcError as e:
            raise self._error(e) from None

    def _error(self, e: grpc.RpcError) -> CtlError:
        code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
        details = (e.details() if isinstance(e, grpc.Call) else "") or code.name
        where = f'allocator at "{self._settings.allocator}"'
        if self._settings.source != "--allocator":
            where += f" (from {self._settings.source})"
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return CtlError(
                f"{where} did not answer within {self._settings.timeout:g}s "
                "(raise --timeout if it is busy)",
                EXIT_UNREACHABLE,
            )
        if code == grpc.StatusCode.UNAVAILABLE:
            return CtlError(f"cannot reach the {where}: {details}", EXIT_UNREACHABLE)
        return CtlError(details, EXIT_FAILED)

    def create_pool(
        self, name: str, subnets: list[str], block_size_bits: int
    ) -> pb.CreatePoolResponse:
        request = pb.CreatePoolRequest(name=name, subnets=subnets, block_size_bits=block_size_bits)
        return self._call(self._stub.CreatePool, request)

    def add_subnet(self, pool: str, subnet: str) -> pb.AddSubnetResponse:
        return self._call(self._stub.AddSubnet, pb.AddSubnetRequest(pool=pool, subnet=subnet))

    def list_pools(self) -> pb.ListPoolsResponse:
        return self._call(self._stub.ListPools, pb.ListPoolsRequest())

    def get_pool(self, name: str, subnet: str) -> pb.GetPoolResponse:
        return self._call(self._stub.GetPool, pb.GetPoolRequest(name=name, subnet=subnet))

    def delete_pool(self, name: str) -> pb.DeletePoolResponse:
        return self._call(self._stub.DeletePool, pb.DeletePoolRequest(name=name))

    def node_blocks(
        self, node: str, with_records: bool, page_size: int = NODE_BLOCKS_PAGE
    ) -> pb.ListNodeBlocksResponse:
        """The node's blocks and, with `with_records`, all their records oldest first, fetched
        in pages (all read at the first page's etcd revision) and merged into one answer."""
        request = pb.ListNodeBlocksRequest(
            node=node, with_records=with_records, page_size=page_size
        )
        merged: pb.ListNodeBlocksResponse = self._call(self._stub.ListNodeBlocks, request)
        token = merged.next_page_token
        while token:
            request.page_token = token
            page: pb.ListNodeBlocksResponse = self._call(self._stub.ListNodeBlocks, request)
            merged.records.extend(page.records)
            token = page.next_page_token
        records = sorted(merged.records, key=lambda r: (r.created_at, _address_key(r.address)))
        del merged.records[:]
        merged.records.extend(records)
        merged.next_page_token = ""
        return merged

    def release_node(self, node: str, force: bool = False) -> pb.ReleaseNodeResponse:
        return self._call(self._stub.ReleaseNode, pb.ReleaseNodeRequest(node=node, force=force))

    def check(self, repair: bool, empty_grace: int) -> pb.CheckStoreResponse:
        request = pb.CheckStoreRequest(repair=repair, empty_grace_seconds=empty_grace)
        return self._call(self._stub.CheckStore, request)

    def get_address(self, address: str) -> pb.GetAddressResponse:
        return self._call(self._stub.GetAddress, pb.GetAddressRequest(address=address))

    def free_address(self, address: str) -> pb.FreeAddressResponse:
        return self._call(self._stub.FreeAddress, pb.FreeAddressRequest(address=address))

    def usage(self) -> pb.GetUsageResponse:
        return self._call(self._stub.GetUsage, pb.GetUsageRequest())
