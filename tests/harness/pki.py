"""A throwaway PKI for TLS tests, made with the `openssl` command: a CA, server certificates valid
for 127.0.0.1 and localhost, and client certificates. Keys are ECDSA P-256, unencrypted, and every
certificate is valid for one day; nothing leaves the directory given to `Pki`.

    pki = Pki(tmp_path / "pki")
    ca = pki.ca("coil-test-ca")
    server = pki.issue(ca, "etcd", server=True)
    client = pki.issue(ca, "coil-allocator")
    node = pki.node(ca, "node-1")          # CN system:node:node-1, O system:nodes (a kubelet's)
    operator = pki.operator(ca, "alice")   # CN alice, O coil:operators
    viewer = pki.viewer(ca, "bob")         # CN bob, O coil:viewers
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class Ca:
    name: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its key; `ca` is the certificate of the CA that signed it."""

    name: str
    cert: Path
    key: Path
    ca: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed ({proc.returncode}): {proc.stderr.strip()}")


class Pki:
    """Certificates under one directory; names must be unique within it."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            raise RuntimeError("openssl not found: the TLS tests need the openssl command")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)

    def ca(self, name: str) -> Ca:
        """A self-signed CA called `name` (its common name too)."""
        cert, key = self.dir / f"{name}.crt", self.dir / f"{name}.key"
        _openssl(
            "req",
            "-x509",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            f"/CN={name}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        )
        return Ca(name, cert, key)

    def issue(
        self,
        ca: Ca,
        name: str,
        *,
        server: bool = False,
        names: str = SERVER_NAMES,
        subject: str = "",
        sans: tuple[str, ...] = (),
    ) -> KeyPair:
        """A certificate for `name` signed by `ca`: for clients only, or with `server` also for
        servers at `names` (subject alternative names; 127.0.0.1 and localhost by default).
        `subject` replaces the subject "/CN=`name`" (e.g. "/O=system:nodes/CN=system:node:n1");
        `sans` adds subject alternative names in openssl's form ("URI:spiffe://x", "DNS:a.b")."""
        cert, key, csr = (self.dir / f"{name}.{ext}" for ext in ("crt", "key", "csr"))
        extensions = self.dir / f"{name}.ext"
        usages = "serverAuth,clientAuth" if server else "clientAuth"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={usages}",
        ]
        alt_names = [*(names.split(",") if server else []), *sans]
        if alt_names:
            lines.append(f"subjectAltName={','.join(alt_names)}")
        extensions.write_text("\n".join(lines) + "\n")
        _openssl(
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(csr),
            "-subj",
            subject or f"/CN={name}",
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            str(csr),
            "-CA",
            str(ca.cert),
            "-CAkey",
            str(ca.key),
            "-set_serial",
            str(secrets.randbits(63) | 1),
            "-days",
            "1",
            "-extfile",
            str(extensions),
            "-out",
            str(cert),
        )
        csr.unlink()
        extensions.unlink()
        return KeyPair(name, cert, key, ca.cert)

    def node(self, ca: Ca, node: str) -> KeyPair:
        """A kubelet's client certificate for `node`: CN system:node:<node>, O system:nodes."""
        return self.issue(ca, f"node-{node}", subject=f"/O=system:nodes/CN=system:node:{node}")

    def operator(self, ca: Ca, name: str) -> KeyPair:
        """An operator's client certificate under the default policy: O coil:operators."""
        return self.issue(ca, name, subject=f"/O=coil:operators/CN={name}")

    def viewer(self, ca: Ca, name: str) -> KeyPair:
        """A viewer's client certificate under the default policy: O coil:viewers."""
        return self.issue(ca, name, subject=f"/O=coil:viewers/CN={name}")
