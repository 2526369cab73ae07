"""What the deployment tests share: the CNI plugin bundle (built once per test session, the way
`make cni-bundle` builds it) and a node root filesystem holding nothing but busybox."""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "build" / "cni-bundle"
BIN = Path(sys.executable).parent
BUSYBOX = "/bin/busybox"


@functools.lru_cache(maxsize=1)
def cni_bundle() -> Path:
    """Build build/cni-bundle from the current sources (once per session); return its path."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "cni_bundle.py"), str(BUNDLE)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"make cni-bundle failed:\n{proc.stdout}\n{proc.stderr}")
    return BUNDLE


def busybox_root(root: Path) -> Path:
    """A root filesystem holding only the statically linked busybox (as /bin/busybox and
    /bin/sh): no libc, no loader, no Python. Fails naming the package when busybox is missing."""
    ldd = subprocess.run(["ldd", BUSYBOX], capture_output=True, text=True)
    if not os.path.exists(BUSYBOX) or "not a dynamic executable" not in ldd.stdout + ldd.stderr:
        raise RuntimeError(
            f"a statically linked {BUSYBOX} (Debian's busybox-static) is needed; "
            "scripts/deps.sh installs it"
        )
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    os.symlink("busybox", root / "bin" / "sh")
    for d in ("run", "tmp", "proc"):
        (root / d).mkdir()
    return root


def coil_install(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `coil-install` (as the init container runs it)."""
    return subprocess.run(
        [str(BIN / "coil-install"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def tree(root: Path) -> dict[str, str]:
    """Every path under `root` -> "dir", "link:<target>", "special" or the file's content digest."""

    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = f"link:{os.readlink(path)}"
            elif path.is_dir():
                out[rel] = "dir"
            elif not path.is_file():
                out[rel] = "special"  # a socket, a fifo
            else:
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out
