"""`coil-allocator`: the central service that owns pools, block claims and allocation records.

Every flag can also be set through a `COIL_` environment variable (shown in --help), so that an
etcd password never has to appear on a command line.
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
from coil_allocator.etcd_store import EtcdConfig, EtcdStore
from coil_core.errors import CoilError
from coil_core.flags import LOG_FORMAT, Flag, env_parser

log = logging.getLogger("coil.allocator")

FLAGS: tuple[Flag, ...] = (
    # flag, env, default, help
    ("--listen", "COIL_LISTEN", "127.0.0.1:9380", 'gRPC address: "host:port" or "unix:PATH"'),
    ("--etcd-endpoints", "COIL_ETCD_ENDPOINTS", "127.0.0.1:2379", "comma-separated etcd endpoints"),
    ("--etcd-prefix", "COIL_ETCD_PREFIX", "/coil/", "key prefix of coil's data in etcd"),
    ("--etcd-username", "COIL_ETCD_USERNAME", "", "etcd user (with --etcd-password)"),
    (
        "--etcd-password",
        "COIL_ETCD_PASSWORD",
        "",
        "etcd password (prefer --etcd-password-file or the environment variable)",
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
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = env_parser(
        "coil-allocator",
        "coil's allocator: pools, address blocks and allocation records in etcd.",
        FLAGS,
        "COIL_",
    )
    args = parser.parse_args(argv)
    try:
        args.etcd_timeout = float(args.etcd_timeout)
        if args.etcd_timeout <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--etcd-timeout {args.etcd_timeout!r}: not a positive number of seconds")
    if args.etcd_password and args.etcd_password_file:
        parser.error(
            "--etcd-password (COIL_ETCD_PASSWORD) and --etcd-password-file "
            "(COIL_ETCD_PASSWORD_FILE) exclude each other: give one"
        )
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    if args.tls_client_ca and not args.tls_cert:
        parser.error("--tls-client-ca needs --tls-cert and --tls-key")
    return args


def _read_file(path: str, flag: str) -> bytes:
    """A file's bytes; ValueError naming the flag and the path when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: {e.strerror or e}") from None


def _read_password(path: str) -> str:
    """The password in `path`, without one trailing newline; ValueError naming the flag when the
    file cannot be read, is not UTF-8 or holds nothing."""
    raw = _read_file(path, "--etcd-password-file")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"--etcd-password-file {path!r}: not UTF-8 text") from None
    password = text.removesuffix("\n").removesuffix("\r")
    if not password:
        raise ValueError(f"--etcd-password-file {path!r}: the file is empty")
    return password


def _warn_if_exposed(path: str, flag: str) -> None:
    """Log a warning when a secret file can be read by users other than this process's own user
    and groups: world-readable, or group-readable by a group this process is not in."""
    try:
        st = os.stat(path)
    except OSError:
        return  # reading it reports the error, naming the flag
    own_groups = {os.getegid(), *os.getgroups()}
    if st.st_mode & 0o004:
        who = "every user"
    elif st.st_mode & 0o040 and st.st_gid not in own_groups:
        who = f"group {st.st_gid}"
    else:
        return
    log.warning(
        "%s %r is readable by %s (mode %o): make it readable by this user only (chmod 600)",
        flag,
        path,
        who,
        st.st_mode & 0o777,
    )


def _split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=LOG_FORMAT,
        stream=sys.stderr,
    )
    import grpc
    from grpc_health.v1 import health, health_pb2
    from prometheus_client import start_http_server

    from coil_allocator.metrics import AllocatorMetrics
    from coil_allocator.servicer import serve

    for path, flag in (
        (args.etcd_password_file, "--etcd-password-file"),
        (args.etcd_tls_key, "--etcd-tls-key"),
        (args.tls_key, "--tls-key"),
    ):
        if path:
            _warn_if_exposed(path, flag)
    password = args.etcd_password
    if args.etcd_password_file:
        try:
            password = _read_password(args.etcd_password_file)
        except ValueError as e:
            print(f"coil-allocator: {e}", file=sys.stderr)
            return 2
    try:
        store = EtcdStore(
            EtcdConfig(
                endpoints=tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip()),
                username=args.etcd_username or None,
                password=password or None,
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
    allocator = Allocator(store, args.etcd_prefix, events=metrics)
    metrics.watch_usage(allocator)
    credentials = None
    if args.tls_cert:
        try:
            cert = _read_file(args.tls_cert, "--tls-cert")
            key = _read_file(args.tls_key, "--tls-key")
            client_ca = (
                _read_file(args.tls_client_ca, "--tls-client-ca") if args.tls_client_ca else None
            )
        except ValueError as e:
            print(f"coil-allocator: {e}", file=sys.stderr)
            return 2
        credentials = grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=bool(client_ca)
        )
    health_servicer = health.HealthServicer()
    try:
        server, _ = serve(
            allocator,
            args.listen,
            observe=metrics.observe_rpc,
            credentials=credentials,
            health=health_servicer,
        )
    except RuntimeError as e:
        hint = " (check that --tls-cert and --tls-key are a PEM certificate and its key)"
        print(f"coil-allocator: {e}{hint if credentials else ''}", file=sys.stderr)
        return 2
    if args.metrics_addr:
        host, port = _split_hostport(args.metrics_addr)
        start_http_server(port, addr=host, registry=metrics.registry)
    stop = threading.Event()

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
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    log.info(
        "serving on %s, etcd %s, prefix %s", args.listen, args.etcd_endpoints, args.etcd_prefix
    )
    # Everything built so far lives as long as the process: keep it out of the cyclic collector's
    # scans, which otherwise revisit it under load.
    gc.freeze()
    stop.wait()
    log.info("stopping")
    server.stop(grace=5).wait()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
