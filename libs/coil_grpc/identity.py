"""Who is calling: the identity of a gRPC caller, from its client certificate or its UNIX socket.

- A verified client certificate (mutual TLS) is read with the `cryptography` package: its common
  name, organizations and subject alternative names go through the policy. gRPC has already
  checked it against the client CA; only the leaf is read here.
- A UNIX-socket peer. grpcio does not give a servicer the connection's file descriptor, so the
  peer's uid cannot be read with SO_PEERCRED per call. What is enforceable instead: the server
  creates its socket with mode 0600 (no window: the umask is set before the bind), in a directory
  others cannot write (`coil_grpc.files.serve_unix_socket`). The kernel then lets only the
  socket's owner, the server's own uid, and root connect. Either already holds everything the
  server holds (its keys, its etcd credentials; it could read its memory), so a UNIX peer is an
  operator. A server run as root (as coild and the allocator are) is reachable by root only:
  a non-root local user's connect() fails with EACCES, and the call with UNAVAILABLE.
- Anything else (plaintext TCP) has no identity. With --insecure it is trusted as an operator.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from coil_grpc.access import Identity, Via
from coil_grpc.policy import Grant, Policy, Role, Subject

MAX_CACHED = 256


def subject_of(pem: bytes) -> Subject | None:
    """The subject of a PEM certificate; None when it cannot be parsed or names more than one
    common name (ambiguous: no role is better than the wrong one)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) > 1:
        return None
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = tuple(str(name.value) for name in san)
    except x509.ExtensionNotFound:
        sans = ()
    return Subject(
        common_name=str(cns[0].value) if cns else "",
        organizations=tuple(str(o.value) for o in orgs),
        sans=sans,
    )


class Identifier:
    """Turns a call's context into an `Identity`; thread-safe.

    insecure: callers without a certificate on TCP are operators (--insecure).
    """

    def __init__(self, policy: Policy, *, insecure: bool = False) -> None:
        self.policy = policy
        uid = os.geteuid()
        name = "unix peer (uid 0)" if uid == 0 else f"unix peer (uid {uid} or 0)"
        self.unix = Identity(name, Via.UNIX, Grant(Role.OPERATOR))
        self.anonymous = Identity(
            "anonymous (--insecure)" if insecure else "anonymous",
            Via.NONE,
            Grant(Role.OPERATOR) if insecure else None,
        )
        self._lock = threading.Lock()
        self._certs: dict[bytes, Identity] = {}

    def identify(self, context: Any) -> Identity:
        """The caller of the call whose grpc.ServicerContext is `context`."""
        # UNIX sockets are always plaintext (coil_grpc.listen): no certificate to look for.
        if context.peer().startswith("unix:"):
            return self.unix
        pem = context.auth_context().get("x509_pem_cert")
        if pem:
            return self.certificate(pem[0])
        return self.anonymous

    def certificate(self, pem: bytes) -> Identity:
        with self._lock:
            known = self._certs.get(pem)
        if known is not None:
            return known
        subject = subject_of(pem)
        if subject is None:
            identity = Identity("unreadable certificate", Via.CERTIFICATE)
        else:
            identity = Identity(
                subject.common_name
                or f"certificate without common name ({','.join(subject.sans)})",
                Via.CERTIFICATE,
                self.policy.grant(subject),
            )
        with self._lock:
            if len(self._certs) >= MAX_CACHED:
                self._certs.clear()
            self._certs[pem] = identity
        return identity
