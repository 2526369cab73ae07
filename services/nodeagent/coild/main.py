"""`coild`: coil's node agent, one per node. Every flag can also be set through the environment
variable shown in --help."""

from __future__ import annotations

import argparse
import gc
import logging
import signal
import sys
import threading

from coil_core.flags import LOG_FORMAT, Flag, check_numbers, env_parser
from coil_grpc.files import key_file_warning, read_file

log = logging.getLogger("coild")

FLAGS: tuple[Flag, ...] = (
    # flag, env, default, help
    ("--node-name", "COIL_NODE_NAME", "", "this node's name (required)"),
    (
        "--allocator",
        "COIL_ALLOCATOR",
        "unix:/run/coil/allocator.sock",
        'allocator: "unix:PATH" (as root) or "host:port" (with TLS and the node\'s certificate)',
    ),
    ("--socket", "COILD_SOCKET", "/run/coild.sock", "UNIX socket for the CNI plugin"),
    ("--table-id", "COILD_TABLE_ID", "119", "kernel routing table to export blocks to"),
    ("--protocol-id", "COILD_PROTOCOL_ID", "30", "route protocol number of exported routes"),
    (
        "--metrics-addr",
        "COILD_METRICS_ADDR",
        "127.0.0.1:9384",
        '/metrics, /healthz, /readyz; ""=off',
    ),
    ("--spare-threshold", "COILD_SPARE_THRESHOLD", "0.8", "claim a spare block at this usage"),
    ("--release-grace", "COILD_RELEASE_GRACE", "60", "seconds a block stays empty before return"),
    ("--allocator-timeout", "COILD_ALLOCATOR_TIMEOUT", "5", "seconds per allocator request"),
    (
        "--resync-interval",
        "COILD_RESYNC_INTERVAL",
        "600",
        "seconds between safety-net re-reads of pools, blocks and records (changes are pushed)",
    ),
    ("--allocator-tls-ca", "COILD_ALLOCATOR_TLS_CA", "", "CA of the allocator's certificate"),
    (
        "--allocator-tls-cert",
        "COILD_ALLOCATOR_TLS_CERT",
        "",
        "client certificate for the allocator",
    ),
    ("--allocator-tls-key", "COILD_ALLOCATOR_TLS_KEY", "", "client key for the allocator"),
    (
        "--allocator-tls-server-name",
        "COILD_ALLOCATOR_TLS_SERVER_NAME",
        "",
        'name the allocator\'s certificate must carry ("localhost" for unix: addresses)',
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = env_parser("coild", "coil's node agent.", FLAGS, "COILD_")
    args = parser.parse_args(argv)
    if not args.node_name:
        parser.error("--node-name (or COIL_NODE_NAME) is required")
    check_numbers(
        parser,
        args,
        (
            ("table_id", int, 1, 2**32 - 1),
            ("protocol_id", int, 5, 255),
            ("spare_threshold", float, 0.01, 1.0),
            ("release_grace", float, 0.0, 86400 * 365),
            ("allocator_timeout", float, 0.1, 600.0),
            ("resync_interval", float, 1.0, 86400.0),
        ),
    )
    if args.table_id in (253, 254, 255):
        parser.error(f"--table-id {args.table_id}: that is a kernel table (default, main, local)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    import grpc

    from coild.agent import AgentConfig, NodeAgent
    from coild.allocator_client import AllocatorClient
    from coild.observe import AgentMetrics, serve_http
    from coild.routes import RouteExporter
    from coild.server import AgentSocket, SocketError, serve

    # Before anything else: a second coild on the same socket must stop here, touching nothing.
    claim = AgentSocket(args.socket)
    try:
        claim.claim()
    except SocketError as e:
        raise SystemExit(f"coild: {e}") from None

    credentials = None
    if args.allocator_tls_ca or args.allocator_tls_cert:

        def read(path: str, flag: str) -> bytes | None:
            if not path:
                return None
            try:
                return read_file(path, flag)
            except ValueError as e:
                raise SystemExit(f"coild: {e}") from None

        warning = (
            key_file_warning(args.allocator_tls_key, "--allocator-tls-key")
            if args.allocator_tls_key
            else None
        )
        if warning:
            log.warning("%s", warning)

        credentials = grpc.ssl_channel_credentials(
            read(args.allocator_tls_ca, "--allocator-tls-ca"),
            read(args.allocator_tls_key, "--allocator-tls-key"),
            read(args.allocator_tls_cert, "--allocator-tls-cert"),
        )
    metrics = AgentMetrics()
    agent = NodeAgent(
        AgentConfig(
            node=args.node_name,
            spare_threshold=args.spare_threshold,
            release_grace=args.release_grace,
            table=args.table_id,
            pool_refresh=args.resync_interval,
            report_interval=args.resync_interval,
            reconcile_interval=args.resync_interval,
        ),
        AllocatorClient(
            args.allocator, args.allocator_timeout, credentials, args.allocator_tls_server_name
        ),
        RouteExporter(args.table_id, args.protocol_id),
        events=metrics,
    )

    def blocks() -> list[tuple[str, int, int, int]]:
        return [
            (b.pool, b.family, b.addresses.used_count, b.addresses.capacity)
            for b in list(agent.state.blocks)
        ]

    metrics.watch_blocks(blocks)

    def readiness() -> str | None:
        if not agent.ready.is_set():
            return "state not rebuilt from the allocator yet"
        if not agent.allocator_ok:
            return f"allocator at {args.allocator} unreachable"
        if not agent.routes_synced:
            return f"routes not synced to table {args.table_id}"
        return claim.problem()

    http = serve_http(args.metrics_addr, metrics.registry, readiness) if args.metrics_addr else None
    agent.start(wait=False)
    try:
        server = serve(agent, args.socket, observe=metrics.observe_rpc, claim=claim)
    except (ValueError, OSError) as e:
        print(f"coild: --socket {args.socket!r}: {e}", file=sys.stderr)
        agent.stop()
        if http:
            http.shutdown()
        claim.release()
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info(
        "node %s serving on %s; allocator %s; routes to table %d proto %d",
        args.node_name,
        args.socket,
        args.allocator,
        args.table_id,
        args.protocol_id,
    )
    # Everything built so far lives as long as the process: keep it out of the cyclic collector's
    # scans, which otherwise revisit it under load.
    gc.freeze()
    # Wake now and then: a signal delivered to another thread (the WatchNode stream's, gRPC's)
    # runs its handler only when the main thread runs Python code.
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    # Routes stay: pods keep their addresses across a coild restart.
    server.stop(grace=5).wait()
    claim.release()
    agent.stop()
    if http:
        http.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
