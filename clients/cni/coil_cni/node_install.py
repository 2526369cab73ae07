"""``coil-install``: put the CNI plugin bundle and a conflist on a node (the init container).

    coil-install --host-root /host [--bundle DIR] [--conflist FILE] [--socket PATH] [--grace S]
    coil-install --host-root /host --uninstall

What it writes under the host root (and nothing else):

    opt/cni/bin/coil                    a launcher into the current version (written last)
    opt/cni/bin/coil.d/<version>/       a copy of the bundle (``make cni-bundle``)
    opt/cni/bin/coil.d/installed.json   what was installed, for upgrades and --uninstall
    etc/cni/net.d/<name>                the network configuration (default 10-coil.conflist)

Every file is replaced atomically (written to a temporary name in the same directory, then renamed
over the old one) and a version directory appears only complete (copied under a temporary name,
then renamed). So a runtime that runs ``coil`` at any moment runs either the old version or the new
one, each complete. The launcher finds its version directory next to itself (``$0``), so the same
files work whatever the host root is mounted as.

An upgrade (a bundle of another version) copies the new version, switches the launcher, then waits
``--grace`` seconds before it removes the older versions: a plugin started just before the switch
still loads its modules from the old directory. Running it again with the same bundle changes
nothing. ``--uninstall`` removes the conflist, the launcher and ``coil.d``; it is idempotent too.

The plugin itself never imports this module (it runs in the image's Python, not the bundle's).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

BIN = "opt/cni/bin"
NETD = "etc/cni/net.d"
STATE = "installed.json"
MARKER = "written by coil-install"
DEFAULT_CONFLIST_NAME = "10-coil.conflist"
DEFAULT_SOCKET = "/run/coild.sock"
DEFAULT_BUNDLE = "/usr/lib/coil/cni-bundle"
BUNDLE_ENV = "COIL_CNI_BUNDLE"
CONFLIST_ENV = "COIL_CNI_CONFLIST"

# Kept in step with the bundle's own launcher (scripts/cni_bundle.py): the bundled loader runs the
# bundled interpreter, isolated, on the plugin inside the bundle's standard library directory.
LAUNCHER = """#!/bin/sh
# coil CNI IPAM plugin {version}, {marker}: runs the bundle in coil.d/{version}/.
case $0 in */*) d=${{0%/*}}/coil.d/{version} ;; *) d=./coil.d/{version} ;; esac
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/python3.11" -I -S -X utf8 \\
  -c 'from coil_cni.main import main; main()'
"""


class InstallError(Exception):
    """Bad input or a host tree the installer cannot use; nothing was changed."""


def default_conflist(socket: str) -> dict[str, Any]:
    """The ptp network configuration the README shows, with coil as IPAM on ``socket``."""
    return {
        "cniVersion": "1.0.0",
        "name": "coil-net",
        "plugins": [
            {
                "type": "ptp",
                "mtu": 1500,
                "ipMasq": False,
                "capabilities": {"ips": True},
                "ipam": {"type": "coil", "socket": socket, "timeout": 5},
            }
        ],
    }


def check_conflist(text: str, origin: str) -> dict[str, Any]:
    """Parse and check a conflist: JSON with cniVersion, name and a non-empty plugins list."""
    try:
        conf = json.loads(text)
    except ValueError as e:
        raise InstallError(f"{origin} is not JSON: {e}") from None
    if not isinstance(conf, dict):
        raise InstallError(f"{origin} must be a JSON object (a CNI conflist)")
    for key in ("cniVersion", "name"):
        if not isinstance(conf.get(key), str) or not conf[key]:
            raise InstallError(f"{origin} has no {key!r} string")
    plugins = conf.get("plugins")
    if (
        not isinstance(plugins, list)
        or not plugins
        or not all(isinstance(p, dict) for p in plugins)
    ):
        raise InstallError(f"{origin} has no 'plugins' list of objects")
    return conf


def find_bundle(given: str | None) -> str:
    """The bundle directory: --bundle, else $COIL_CNI_BUNDLE, else the image's, else the source
    tree's build/cni-bundle (``make cni-bundle``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    candidates = [given] if given else []
    if not given and os.environ.get(BUNDLE_ENV):
        candidates = [os.environ[BUNDLE_ENV]]
    if not candidates:
        source = os.path.dirname(os.path.dirname(os.path.dirname(here)))
        candidates = [DEFAULT_BUNDLE, os.path.join(source, "build", "cni-bundle")]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "VERSION")):
            return os.path.abspath(path)
    raise InstallError(
        f"no CNI plugin bundle (a directory with a VERSION file) at {' or '.join(candidates)}; "
        "build one with `make cni-bundle` or pass --bundle"
    )


def bundle_version(bundle: str) -> str:
    with open(os.path.join(bundle, "VERSION")) as f:
        version = f.read().strip()
    if not version or "/" in version or version.startswith(".") or len(version) > 100:
        raise InstallError(f"{bundle}/VERSION holds no usable version: {version!r}")
    for needed in ("bin/python3.11", "lib/ld-linux-x86-64.so.2", "lib/python3.11/coil_cni/main.py"):
        if not os.path.exists(os.path.join(bundle, needed)):
            raise InstallError(f"{bundle} is not a complete bundle: {needed} is missing")
    return version


def write_atomic(path: str, data: bytes, mode: int) -> bool:
    """Replace ``path`` with ``data`` (temporary file, fsync, rename); False if already so."""
    try:
        with open(path, "rb") as f:
            if f.read() == data and (os.stat(path).st_mode & 0o777) == mode:
                return False
    except OSError:
        pass
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return True


def read_state(coil_d: str) -> dict[str, Any]:
    try:
        with open(os.path.join(coil_d, STATE)) as f:
            state = json.load(f)
        return state if isinstance(state, dict) else {}
    except (OSError, ValueError):
        return {}


def is_ours(launcher: str) -> bool:
    try:
        with open(launcher, "rb") as f:
            return MARKER.encode() in f.read(512)
    except OSError:
        return False


def log(message: str) -> None:
    print(f"coil-install: {message}", flush=True)


def install(
    host_root: str, bundle: str, conflist: dict[str, Any], conflist_name: str, grace: float
) -> str:
    """Install (or upgrade to) ``bundle`` under ``host_root``; return the version now current."""
    version = bundle_version(bundle)
    bin_dir = os.path.join(host_root, BIN)
    netd = os.path.join(host_root, NETD)
    coil_d = os.path.join(bin_dir, "coil.d")
    os.makedirs(coil_d, exist_ok=True)
    os.makedirs(netd, exist_ok=True)
    previous = read_state(coil_d)

    # Record first what is about to be written, so that --uninstall finds it even if this
    # install dies half way.
    conflists = sorted({*previous.get("conflists", []), conflist_name})
    write_atomic(
        os.path.join(coil_d, STATE),
        json.dumps({"version": previous.get("version", version), "conflists": conflists}).encode(),
        0o644,
    )

    target = os.path.join(coil_d, version)
    if os.path.isdir(target):
        log(f"version {version} is already in {target}")
    else:
        tmp = tempfile.mkdtemp(dir=coil_d, prefix=f".{version}.")
        try:
            shutil.copytree(bundle, tmp, symlinks=True, dirs_exist_ok=True)
            os.chmod(tmp, 0o755)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log(f"copied the bundle {version} to {target}")

    launcher = os.path.join(bin_dir, "coil")
    text = LAUNCHER.format(version=version, marker=MARKER)
    if write_atomic(launcher, text.encode(), 0o755):
        log(f"{launcher} now runs version {version}")
    conf_path = os.path.join(netd, conflist_name)
    if write_atomic(conf_path, (json.dumps(conflist, indent=2) + "\n").encode(), 0o644):
        log(f"wrote {conf_path}")
    for old in conflists:
        if old != conflist_name:
            _remove(os.path.join(netd, old))
    write_atomic(
        os.path.join(coil_d, STATE),
        json.dumps({"version": version, "conflists": [conflist_name]}).encode(),
        0o644,
    )

    stale = [e for e in sorted(os.listdir(coil_d)) if e not in (version, STATE)]
    if stale:
        versions = [e for e in stale if not e.startswith(".")]
        if versions and grace > 0:
            log(f"waiting {grace:g} s for plugins still running {', '.join(versions)}")
            time.sleep(grace)
        if read_state(coil_d).get("version") == version:  # not switched again meanwhile
            for entry in stale:
                _remove(os.path.join(coil_d, entry))
            log(f"removed {', '.join(stale)}")
    return version


def _remove(path: str) -> bool:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
        return True
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def uninstall(host_root: str) -> list[str]:
    """Remove what install wrote: the conflists it recorded, the launcher (if it is ours) and
    coil.d; return the paths removed. The conflist goes first, so runtimes stop calling coil."""
    bin_dir = os.path.join(host_root, BIN)
    coil_d = os.path.join(bin_dir, "coil.d")
    state = read_state(coil_d)
    removed = []
    for name in state.get("conflists", []):
        if "/" in name:
            continue
        path = os.path.join(host_root, NETD, name)
        if _remove(path):
            removed.append(path)
    launcher = os.path.join(bin_dir, "coil")
    if is_ours(launcher) and _remove(launcher):
        removed.append(launcher)
    if os.path.isdir(coil_d):
        shutil.rmtree(coil_d)
        removed.append(coil_d)
    return removed


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="coil-install",
        description="Install the coil CNI plugin bundle and a conflist on a node (or remove them).",
    )
    p.add_argument("--host-root", default="/", help="where the node's / is mounted (default /)")
    p.add_argument("--uninstall", action="store_true", help="remove what coil-install installed")
    p.add_argument(
        "--bundle",
        help=f"the bundle directory (default ${BUNDLE_ENV}, else {DEFAULT_BUNDLE}, "
        "else build/cni-bundle of the source tree)",
    )
    p.add_argument(
        "--conflist",
        help=f"a file holding the CNI conflist to install (default ${CONFLIST_ENV} if set, "
        "else ptp with coil as IPAM)",
    )
    p.add_argument(
        "--conflist-name",
        default=DEFAULT_CONFLIST_NAME,
        help=f"its file name in etc/cni/net.d (default {DEFAULT_CONFLIST_NAME})",
    )
    p.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help=f"coild's socket in the default conflist (default {DEFAULT_SOCKET})",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=10.0,
        help="seconds to wait after switching versions before removing older ones (default 10)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host_root = os.path.abspath(args.host_root)
    try:
        if not os.path.isdir(host_root):
            raise InstallError(f"--host-root {args.host_root} is not a directory")
        if args.uninstall:
            removed = uninstall(host_root)
            log(f"removed {', '.join(removed)}" if removed else "nothing to remove")
            return 0
        name = args.conflist_name
        if "/" in name or not name.endswith((".conflist", ".conf")) or name.startswith("."):
            raise InstallError(
                f"--conflist-name {name!r} must be a plain file name ending in .conflist or .conf"
            )
        if args.grace < 0:
            raise InstallError(f"--grace must not be negative (got {args.grace:g})")
        if args.conflist:
            try:
                with open(args.conflist) as f:
                    conflist = check_conflist(f.read(), f"--conflist {args.conflist}")
            except OSError as e:
                raise InstallError(f"--conflist {args.conflist}: {e.strerror}") from None
        elif os.environ.get(CONFLIST_ENV):
            conflist = check_conflist(os.environ[CONFLIST_ENV], f"${CONFLIST_ENV}")
        else:
            conflist = default_conflist(args.socket)
        version = install(host_root, find_bundle(args.bundle), conflist, name, args.grace)
        log(f"installed version {version} under {host_root}")
        return 0
    except InstallError as e:
        print(f"coil-install: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
