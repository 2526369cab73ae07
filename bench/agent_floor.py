"""The floor of section 2: a NodeAgentService server that does no work.

It is set up as coild's server is (grpcio's synchronous server, 32 worker threads, a UNIX socket)
and answers Allocate and Release at once with a canned address, so the bench's load generator
measures what gRPC alone costs per call on this machine: the ceiling any coild built on grpcio
could reach here. Run as ``python -m bench.agent_floor SOCKET``; it serves until killed.
"""

from __future__ import annotations

import sys
import threading
from concurrent import futures

import grpc

from coil.v1 import nodeagent_pb2 as pb

WORKERS = 32  # as coild.server.serve


def main() -> None:
    socket_path = sys.argv[1]
    allocated = pb.AllocateResponse(
        addresses=[pb.PodAddress(address="10.64.0.5/24", gateway="10.64.0.1", pool="default")]
    ).SerializeToString()
    released = pb.ReleaseResponse(addresses=["10.64.0.5"]).SerializeToString()
    handlers = {
        "Allocate": grpc.unary_unary_rpc_method_handler(lambda request, context: allocated),
        "Release": grpc.unary_unary_rpc_method_handler(lambda request, context: released),
    }
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS))
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("coil.v1.NodeAgentService", handlers),)
    )
    server.add_insecure_port(f"unix:{socket_path}")
    server.start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
