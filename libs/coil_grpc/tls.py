"""Server TLS from files, read again when they change: certificates rotate without a restart.

The allocator's certificate, its key and the client CA bundle are files. gRPC asks for the
configuration before every new connection's handshake; `ReloadingServerTls` answers with a new
one when a file's modification time or size changed, else keeps the current one. Connections
already open keep the configuration they were made with. A set of files that cannot be read or
loaded (a rotation half done) is logged once and the previous configuration stays in use.
"""

from __future__ import annotations

import logging
import os
import threading

import grpc

from coil_grpc.files import read_file

log = logging.getLogger("coil.tls")

Stamp = tuple[tuple[int, int], ...]


def _stamp(paths: tuple[str, ...]) -> Stamp:
    out = []
    for path in paths:
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((-1, -1))
    return tuple(out)


def check_key_pair(cert: bytes, key: bytes, cert_path: str, key_path: str) -> None:
    """ValueError unless `key` is the private key of `cert` (both PEM): a rotation caught
    between writing the certificate and the key must not be served."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        public = x509.load_pem_x509_certificate(cert).public_key()
        private = serialization.load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"--tls-cert {cert_path!r} / --tls-key {key_path!r}: {e}") from None
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if public.public_bytes(der, spki) != private.public_key().public_bytes(der, spki):
        raise ValueError(
            f"--tls-key {key_path!r} is not the key of the certificate in --tls-cert {cert_path!r}"
        )


class ReloadingServerTls:
    """Server credentials from `cert`, `key` and (for client certificates) `client_ca` files.

    Raises ValueError naming the flag and path when a file cannot be read at start.
    """

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self._flags = (("--tls-cert", cert), ("--tls-key", key)) + (
            (("--tls-client-ca", client_ca),) if client_ca else ()
        )
        self._paths = tuple(path for _, path in self._flags)
        self._lock = threading.Lock()
        self._stamp = _stamp(self._paths)
        self._failed: Stamp | None = None
        self.reloads = 0
        self.credentials = grpc.dynamic_ssl_server_credentials(
            self._configuration(),
            self._fetch,
            require_client_authentication=client_ca is not None,
        )

    def _configuration(self) -> grpc.ServerCertificateConfiguration:
        files = [read_file(path, flag) for flag, path in self._flags]
        check_key_pair(files[0], files[1], self._paths[0], self._paths[1])
        return grpc.ssl_server_certificate_configuration(
            [(files[1], files[0])], root_certificates=files[2] if len(files) > 2 else None
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        stamp = _stamp(self._paths)
        with self._lock:
            if stamp == self._stamp or stamp == self._failed:
                return None
            try:
                configuration = self._configuration()
            except ValueError as e:
                self._failed = stamp
                log.warning("TLS files changed but cannot be read; keeping the old ones: %s", e)
                return None
            self._stamp = stamp
            self.reloads += 1
        log.info("TLS files changed: new connections use them (%s)", ", ".join(self._paths))
        return configuration
