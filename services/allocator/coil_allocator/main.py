"""`coil-allocator`: the central service that owns pools, block claims and allocation records.

Every flag can also be set through a `COIL_` environment variable (shown in --help). Secrets come
from files or the environment, never from flags (a command line is readable by every local user):
the etcd password from COIL_ETCD_PASSWORD or --etcd-password-file.

Safe by default (docs/security.md): without TLS flags the allocator serves only its UNIX socket
(mode 0600, root only); a TCP address needs a server certificate and a client CA, or --insecure.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import threading

from coil_allocator.allocator import Allocator
from coil_allocator.compaction import Compactor
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_allocator.keys import Keys
from coil_allocator.view import ClusterView
from coil_core.errors import CoilError
from coil_core.flags import LOG_FORMAT, Flag, check_numbers, env_parser
from coil_grpc.files import key_file_warning, read_file
from coil_grpc.listen import is_unix, split_addresses

log = logging.getLogger("coil.allocator")

DEFAULT_LISTEN = "unix:/run/coil/allocator.sock"

FLAGS: tuple[Flag, ...] = (
    # flag, env, default, help
    (
        "--listen",
        "COIL_LISTEN",
        DEFAULT_LISTEN,
        'gRPC addresses, comma-separated: "unix:PATH" (root only) or "host:port" (mutual TLS)',
    ),
    ("--etcd-endpoints", "COIL_ETCD_ENDPOINTS", "127.0.0.1:2379", "comma-separated etcd endpoints"),
    ("--etcd-prefix", "COIL_ETCD_PREFIX", "/coil/", "key prefix of coil's data in etcd"),
    (
        "--etcd-username",
        "COIL_ETCD_USERNAME",
        "",
        "etcd user; its password from $COIL_ETCD_PASSWORD or --etcd-password-file",
    ),
    (
        "--etcd-password-file",
        "COIL_ETCD_PASSWORD_FILE",
        "",
        "file holding the etcd password (one trailing newline is dropped)",
    ),
    ("--etcd-tls-ca", "COIL_ETCD_TLS_CA", "", "CA certificate file that signed etcd's certificate"),
    ("--etcd-tls-cert", "COIL_ETCD_TLS_CERT", "", "client certificate file for etcd"),
    ("--etcd-tls-key", "COIL_ETCD_TLS_KEY", "", "client key file for etcd"),
    ("--etcd-timeout", "COIL_ETCD_TIMEOUT", "5", "seconds to wait for each etcd request"),
    (
        "--metrics-addr",
        "COIL_METRICS_ADDR",
        "127.0.0.1:9381",
        'Prometheus "host:port"; "" disables',
    ),
    ("--tls-cert", "COIL_TLS_CERT", "", "serve gRPC over TLS with this certificate file"),
    ("--tls-key", "COIL_TLS_KEY", "", "key file of --tls-cert"),
    ("--tls-client-ca", "COIL_TLS_CLIENT_CA", "", "require client certificates signed by this CA"),
    (
        "--policy",
        "COIL_POLICY",
        "",
        "policy file: certificate subjects to roles (default: built in)",
    ),
    (
        "--expensive-reads",
        "COIL_EXPENSIVE_READS",
        "4",
        "CheckStore and GetPool served at once; more get UNAVAILABLE",
    ),
    (
        "--max-watchers",
        "COIL_MAX_WATCHERS",
        "20000",
        "WatchNode streams served at once (they wait on one event loop); more are refused",
    ),
    (
        "--compaction-interval",
        "COIL_COMPACTION_INTERVAL",
        "60",
        "seconds between compaction turns (one replica compacts etcd); 0 turns it off",
    ),
    (
        "--compaction-retention",
        "COIL_COMPACTION_RETENTION",
        "600",
        "seconds of etcd history kept for watchers to resume from",
    ),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = env_parser(
        "coil-allocator",
        "coil's allocator: pools, address blocks and allocation records in etcd.",
        FLAGS,
        "COIL_",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        default=os.environ.get("COIL_INSECURE", "") in ("1", "true", "yes"),
        help="allow TCP without client certificates: every caller is then an operator "
        "(env COIL_INSECURE=1; never in production)",
    )
    parser.add_argument("--etcd-password", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.etcd_password is not None:
        parser.error(
            "--etcd-password: a password on the command line is readable by every local user; "
            "set COIL_ETCD_PASSWORD or use --etcd-password-file"
        )
    args.etcd_password = os.environ.get("COIL_ETCD_PASSWORD", "")
    if args.etcd_password and args.etcd_password_file:
        parser.error(
            "COIL_ETCD_PASSWORD and --etcd-password-file (COIL_ETCD_PASSWORD_FILE) exclude each "
            "other: give one"
        )
    check_numbers(parser, args, [("expensive_reads", int, 1, 1000)])
    args.listen = split_addresses(args.listen)
    if not args.listen:
        parser.error("--listen: no address")
    tcp = [a for a in args.listen if not is_unix(a)]
    if tcp and not (args.tls_cert and args.tls_client_ca) and not args.insecure:
        parser.error(
            f"--listen {tcp[0]}: a TCP address needs --tls-cert, --tls-key and --tls-client-ca "
            "(every caller then shows a certificate); --insecure allows it without"
        )
    try:
        args.etcd_timeout = float(args.etcd_timeout)
        if args.etcd_timeout <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--etcd-timeout {args.etcd_timeout!r}: not a positive number of seconds")
    try:
        args.max_watchers = int(args.max_watchers)
        if args.max_watchers < 0:
            raise ValueError
    except ValueError:
        parser.error(f"--max-watchers {args.max_watchers!r}: not a count >= 0")
    for flag in ("compaction_interval", "compaction_retention"):
        text = getattr(args, flag)
        try:
            value = float(text)
            if value < 0:
                raise ValueError
        except ValueError:
            parser.error(f"--{flag.replace('_', '-')} {text!r}: not a number of seconds >= 0")
        setattr(args, flag, value)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    return args


def _read_password(path: str) -> str:
    """The password in `path`, without one trailing newline; ValueError naming the flag when the
    file cannot be read, is not UTF-8 or holds nothing."""
    raw = read_file(path, "--etcd-password-file")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"--etcd-password-file {path!r}: not UTF-8 text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"--etcd-password-file {path!r}: the file is empty")
    return password


GC_THRESHOLDS = (50_000, 20, 10)
"""The cyclic collector's thresholds (the interpreter's defaults: 700, 10, 10); see `main`."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    from grpc_health.v1 import health, health_pb2
    from prometheus_client import Gauge, generate_latest

    from coil_allocator.metrics import AllocatorMetrics
    from coil_allocator.servicer import serve
    from coil_grpc.http import serve_http
    from coil_grpc.policy import PolicyError, load_policy

    # From here on a SIGTERM stops cleanly, also while start-up still waits for etcd.
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        policy = load_policy(args.policy)
        if args.etcd_password_file:
            args.etcd_password = _read_password(args.etcd_password_file)
    except (PolicyError, ValueError) as e:
        print(f"coil-allocator: {e}", file=sys.stderr)
        return 2
    for path, flag in (
        (args.tls_key, "--tls-key"),
        (args.etcd_tls_key, "--etcd-tls-key"),
        (args.etcd_password_file, "--etcd-password-file"),
    ):
        warning = key_file_warning(path, flag) if path else None
        if warning:
            log.warning("%s", warning)
    if args.insecure:
        log.warning(
            "--insecure: TCP callers need no certificate and every one of them is an operator; "
            "anyone who reaches %s can do anything",
            ",".join(a for a in args.listen if not is_unix(a)) or "the allocator",
        )
    try:
        store = EtcdStore(
            EtcdConfig(
                endpoints=tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip()),
                username=args.etcd_username or None,
                password=args.etcd_password or None,
                tls_ca=args.etcd_tls_ca or None,
                tls_cert=args.etcd_tls_cert or None,
                tls_key=args.etcd_tls_key or None,
                timeout=args.etcd_timeout,
            )
        )
    except CoilError as e:
        print(f"coil-allocator: {e}", file=sys.stderr)
        return 2
    metrics = AllocatorMetrics()
    # Pools and what node agents need of their nodes, from memory, current through one watch.
    view = ClusterView(store, Keys(args.etcd_prefix))
    view.start(wait=args.etcd_timeout)
    allocator = Allocator(store, args.etcd_prefix, events=metrics, view=view)
    metrics.watch_usage(allocator)
    credentials = None
    if args.tls_cert:
        from coil_grpc.tls import ReloadingServerTls

        try:
            credentials = ReloadingServerTls(
                args.tls_cert, args.tls_key, args.tls_client_ca or None
            ).credentials
        except ValueError as e:
            print(f"coil-allocator: {e}", file=sys.stderr)
            return 2
    health_servicer = health.HealthServicer()
    try:
        server, _ = serve(
            allocator,
            args.listen,
            max_watchers=args.max_watchers,
            observe=metrics.observe_rpc,
            credentials=credentials,
            health=health_servicer,
            policy=policy,
            insecure=args.insecure,
            expensive_reads=args.expensive_reads,
        )
    except (RuntimeError, ValueError, OSError) as e:
        hint = " (check that --tls-cert and --tls-key are a PEM certificate and its key)"
        print(f"coil-allocator: {e}{hint if credentials else ''}", file=sys.stderr)
        return 2
    Gauge(
        "coil_allocator_insecure",
        "1 when started with --insecure: TCP callers need no certificate and are operators.",
        registry=metrics.registry,
    ).set(1 if args.insecure else 0)
    if args.metrics_addr:
        try:
            serve_http(
                args.metrics_addr,
                {
                    "/metrics": lambda: (
                        200,
                        generate_latest(metrics.registry),
                        "text/plain; version=0.0.4",
                    )
                },
                name="metrics",
            )
        except (OSError, ValueError) as e:
            print(f"coil-allocator: --metrics-addr {args.metrics_addr!r}: {e}", file=sys.stderr)
            server.stop(None)
            return 2

    def check_etcd() -> None:
        # The health service says SERVING only while etcd answers.
        while not stop.is_set():
            try:
                store.get(allocator.keys.pools)
                status = health_pb2.HealthCheckResponse.SERVING
            except CoilError as e:
                log.warning("etcd check failed: %s", e)
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            health_servicer.set("", status)
            health_servicer.set("coil.v1.AllocatorService", status)
            stop.wait(5)

    threading.Thread(target=check_etcd, name="etcd-health", daemon=True).start()
    compactor = None
    if args.compaction_interval > 0:
        compactor = Compactor(
            store,
            allocator.keys.prefix,
            interval=args.compaction_interval,
            retention=args.compaction_retention,
            events=metrics,
        )
        compactor.start()
    log.info(
        "serving on %s, etcd %s, prefix %s",
        ",".join(args.listen),
        args.etcd_endpoints,
        args.etcd_prefix,
    )
    # Everything built so far lives as long as the process: keep it out of the cyclic collector's
    # scans, which otherwise revisit it under load.
    gc.freeze()
    # What comes later (a coroutine chain per stream, the view's history) is long-lived too. With
    # the default thresholds a full collection runs whenever it has grown by a quarter, each one
    # longer: at 10,000 streams on a replica, 13 to 14 while the nodes started, up to 1.5 s each
    # with the event loop stopped. Collecting the young generation 70 times less often left one
    # full collection (0.28 s) in the same start.
    gc.set_threshold(*GC_THRESHOLDS)
    # Wake now and then: a signal delivered to another thread (etcd streams, the view, the
    # keep-alive stream) runs its handler only when the main thread runs Python code.
    while not stop.wait(1.0):
        pass
    log.info("stopping")
    server.stop(grace=5).wait()
    view.stop()
    if compactor is not None:
        compactor.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
