"""Install the ``coil`` CNI plugin: ``python -m coil_cni.install [DEST_DIR]``, by default into
/opt/cni/bin.

Writes ``DEST_DIR/coil``, a small launcher run by this very interpreter with ``-IS`` (isolated, no
``site``): ``site`` costs start-up time on every pod and would read the environment, but without it
neither site-packages nor the editable install's path hooks are on ``sys.path``. So the launcher
lists the real directory of coil_cni (the plugin needs nothing else outside the standard library:
no grpcio, see coil_cni.rpc; no generated stubs or protobuf, see coil_cni.wire), found now from
the imported module. It also precompiles the package, because a host that does not write
bytecode would otherwise compile it again on every exec.

The interpreter flags are written as one word ("-IS"): Linux passes everything after the
interpreter path on a ``#!`` line as a single argument, and Python rejects "-I -S" as one argument.
"""

from __future__ import annotations

import compileall
import os
import sys
import tempfile
from types import ModuleType

DEFAULT_DEST = "/opt/cni/bin"


def _root_of(module: ModuleType, levels: int) -> str:
    """The sys.path entry ``module`` was imported from: its __file__ ``levels`` directories up."""
    path = os.path.abspath(module.__file__ or "")
    for _ in range(levels):
        path = os.path.dirname(path)
    return path


def package_dirs() -> tuple[list[str], list[str]]:
    """(sys.path entries the launcher needs, package directories to precompile).

    The plugin needs nothing outside coil_cni and the standard library: no grpcio (coil_cni.rpc
    speaks gRPC itself), no generated stubs and no protobuf runtime (coil_cni.wire)."""
    import coil_cni

    return [_root_of(coil_cni, 2)], [_root_of(coil_cni, 1)]


def launcher_text(interpreter: str, paths: list[str]) -> str:
    """The launcher script for ``interpreter`` with ``paths`` put first on sys.path."""
    return (
        f"#!{interpreter} -IS\n"
        '"""coil CNI IPAM plugin launcher, written by `python -m coil_cni.install`."""\n'
        "import sys\n"
        f"sys.path[0:0] = {paths!r}\n"
        "from coil_cni.main import main\n"
        "main()\n"
    )


def install(dest_dir: str) -> str:
    """Write ``dest_dir/coil`` (atomically, mode 0755), precompile its packages; return its path.

    Raises OSError if dest_dir cannot be written.
    """
    paths, packages = package_dirs()
    interpreter = os.path.abspath(sys.executable)
    for package in packages:
        if os.path.isdir(package):
            compileall.compile_dir(package, quiet=1)
        else:
            compileall.compile_file(package, quiet=1)
    os.makedirs(dest_dir, exist_ok=True)
    target = os.path.join(dest_dir, "coil")
    # Replace, never rewrite in place: a runtime may be executing the old launcher right now.
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".coil.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(launcher_text(interpreter, paths))
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise
    print(f"installed {target}: runs {interpreter} -IS with {paths} first on sys.path")
    print(f"precompiled: {' '.join(packages)}")
    return target


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print(
            "usage: python -m coil_cni.install [DEST_DIR]  (default /opt/cni/bin)", file=sys.stderr
        )
        return 2
    install(args[0] if args else DEFAULT_DEST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
