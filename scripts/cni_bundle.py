"""Build the CNI plugin bundle: ``python3 scripts/cni_bundle.py [OUT_DIR]`` (``make cni-bundle``).

The bundle is one directory that runs the plugin on any x86-64 Linux node, with neither Python nor
a particular glibc there. It is made from Debian bookworm packages (fetched with
``apt-get download`` from the machine's own apt sources, so a fresh Debian 12 gets the same
thing) and the project's files only:

    coil                         the entry point: a /bin/sh launcher (see LAUNCHER)
    VERSION                      <project version>-<digest of everything below>
    MANIFEST                     the Debian packages (name=version) the files came from
    bin/python3.11               Debian's interpreter (python3.11-minimal)
    lib/ld-linux-x86-64.so.2     its own dynamic loader, libc and the libraries it links
    lib/python3.11/...           just the standard library modules the plugin loads, compiled
    lib/python3.11/coil_cni/     the plugin

The launcher runs the bundled loader on the bundled interpreter with ``--library-path`` pointing
into the bundle, so the node's loader and libc are never used; ``-I -S`` keep the environment,
the user's site directory and ``site`` out; ``-X utf8`` makes the standard streams UTF-8 whatever
the runtime's locale, so no other codec module is ever needed. The interpreter finds its standard
library from its own path (``lib/python3.11/os.py`` next to ``bin/``), and the plugin sits inside
that directory, so nothing is added to ``sys.path``.

Which standard library modules: the union of (1) every module the plugin's code can import (a
static scan with ``modulefinder``, including imports inside functions and error paths) and (2)
the modules a real run loads (the interpreter's own start-up modules), found by running the
plugin with the bundled interpreter for each command. ``typing`` is left out: the plugin imports
it only under ``TYPE_CHECKING``.

Only the standard library is used here, so any Python 3 can run this script.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN_SRC = os.path.join(ROOT, "clients", "cni", "coil_cni")
# Installer modules are not part of the plugin.
PLUGIN_EXCLUDE = {"install.py", "node_install.py"}
PY = "python3.11"
MULTIARCH = "x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
# The Debian packages the files come from: the interpreter, its pure-Python core library, the
# full standard library (for _json and the modules a scan finds outside the core), libc (loader,
# libc, libm), and the libraries the interpreter links.
DEBS = ["python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6"]
DEBS += ["zlib1g", "libexpat1"]

LAUNCHER = """#!/bin/sh
# coil CNI IPAM plugin: the bundled CPython, run by the bundled loader and libc (make cni-bundle).
case $0 in */*) d=${0%/*} ;; *) d=. ;; esac
exec "$d/lib/ld-linux-x86-64.so.2" --library-path "$d/lib" "$d/bin/python3.11" -I -S -X utf8 \\
  -c 'from coil_cni.main import main; main()'
"""

# Run by the extracted interpreter (-I -S -X utf8, as the launcher runs it): imports the given
# modules with nothing else loaded, so that sys.modules ends up holding the interpreter's start-up
# modules and exactly what those imports load at run time; prints "name<TAB>file" lines.
SCAN = r"""
import sys
for name in sys.argv[1:]:
    __import__(name)
for name, module in sorted(sys.modules.items()):
    spec = getattr(module, "__spec__", None)
    origin = getattr(module, "__file__", None)
    if origin is None and spec is not None and spec.origin == "frozen" and spec.loader_state:
        origin = getattr(spec.loader_state, "filename", None)
    print(name + "\t" + (origin or ""))
"""


def direct_imports(package: str) -> set[str]:
    """Every module the plugin's code imports (at any depth: in functions and error paths too,
    but not under ``if TYPE_CHECKING:``), outside the plugin itself."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", "") == "TYPE_CHECKING":
                continue
            if isinstance(child, ast.Import):
                names.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names.add(child.module)
            visit(child)

    for name in sorted(os.listdir(package)):
        if name.endswith(".py") and name not in PLUGIN_EXCLUDE:
            with open(os.path.join(package, name)) as f:
                visit(ast.parse(f.read()))
    return {n for n in names if n.split(".")[0] != "coil_cni"}


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kw)


def apt_candidates(names: list[str]) -> dict[str, str]:
    """{package: apt's candidate version} (one apt-cache call); packages apt does not know are
    left out."""
    out = subprocess.run(
        ["apt-cache", "policy", *names], check=True, capture_output=True, text=True
    ).stdout
    found: dict[str, str] = {}
    current = ""
    for line in out.splitlines():
        if line and not line[0].isspace() and line.endswith(":"):
            current = line[:-1].split(":")[0]
        elif "Candidate:" in line and current:
            candidate = line.split(":", 1)[1].strip()
            if candidate != "(none)":
                found[current] = candidate
    return found


def fetch_debs(cache: str) -> dict[str, str]:
    """Download the packages (apt's candidate versions) into ``cache``; {name: .deb path}."""
    os.makedirs(cache, exist_ok=True)
    versions = apt_candidates(DEBS)
    if len(versions) < len(DEBS) and os.geteuid() == 0:
        # A fresh machine (or image) may have no package lists yet.
        run(["apt-get", "update", "-qq"])
        versions = apt_candidates(DEBS)
    missing = [name for name in DEBS if name not in versions]
    if missing:
        sys.exit(f"cni-bundle: apt knows no candidate for {missing}; run apt-get update first")
    debs = {}
    for name, version in versions.items():
        found = glob.glob(os.path.join(cache, f"{name}_{version.replace(':', '%3a')}_*.deb"))
        if not found:
            run(["apt-get", "download", "-q", f"{name}={version}"], cwd=cache)
            found = glob.glob(os.path.join(cache, f"{name}_{version.replace(':', '%3a')}_*.deb"))
        if not found:
            sys.exit(f"cni-bundle: apt-get download {name}={version} left no .deb in {cache}")
        debs[f"{name}={version}"] = found[0]
    return debs


def needed_libs(loader: str, libpath: str, elf: str) -> list[str]:
    """Paths of the shared libraries ``elf`` needs, resolved by the bundled loader itself."""
    out = subprocess.run(
        [loader, "--library-path", libpath, "--list", elf],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    libs = []
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and parts[parts.index("=>") + 1].startswith("/"):
            libs.append(parts[parts.index("=>") + 1])
    return libs


def trace_modules(python: list[str], plugin_parent: str) -> set[str]:
    """Module names a real run of the plugin loads, for every command (no coild needed: the
    paths that reach coild are covered by the static scan)."""
    names: set[str] = set()
    confs = {
        "VERSION": b"",
        "ADD": b'{"cniVersion":"1.1.0","name":"n","ipam":{"type":"coil","socket":"/nonexistent"}}',
        "BAD": b"{not json",
    }
    with tempfile.TemporaryDirectory() as tmp:
        for command in ("VERSION", "ADD", "DEL", "CHECK", "GC", "STATUS", "BAD"):
            out = os.path.join(tmp, command)
            env = {
                "CNI_COMMAND": "ADD" if command == "BAD" else command,
                "CNI_CONTAINERID": "c",
                "CNI_NETNS": "/proc/1/ns/net",
                "CNI_IFNAME": "eth0",
                "CNI_PATH": "/nonexistent",
                "COIL_CNI_DEBUG_MODULES": out,
            }
            stdin = confs.get(command, confs["ADD"])
            code = (
                "import sys; sys.path.insert(0, sys.argv[1]); "
                "from coil_cni.main import main; main()"
            )
            subprocess.run(
                [*python, "-I", "-S", "-X", "utf8", "-c", code, plugin_parent],
                input=stdin,
                env=env,
                capture_output=True,
                check=False,
            )
            with open(out) as f:
                names.update(line.strip() for line in f if line.strip())
    return names


def digest(tree: str) -> str:
    """Of every file but the compiled modules (marshal's output varies from run to run; they
    follow from the sources, which are in)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(tree):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, tree).encode() + b"\0")
            if os.path.islink(path):
                h.update(os.readlink(path).encode())
            else:
                with open(path, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()[:12]


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        for line in f:
            if line.startswith("version ="):
                return line.split("=", 1)[1].strip().strip('"')
    sys.exit("cni-bundle: no version in pyproject.toml")


def inputs_stamp(debs: dict[str, str]) -> str:
    """What the bundle is made of: this script, the plugin's sources, the packages' versions."""
    h = hashlib.sha256()
    files = [os.path.abspath(__file__)]
    files += [
        os.path.join(PLUGIN_SRC, n) for n in sorted(os.listdir(PLUGIN_SRC)) if n.endswith(".py")
    ]
    for path in files:
        with open(path, "rb") as f:
            h.update(path.encode() + b"\0" + f.read())
    h.update(" ".join(sorted(debs)).encode())
    return h.hexdigest()


def build(out: str, cache: str) -> str:
    debs = fetch_debs(cache)
    stamp = inputs_stamp(debs)
    stamp_file = out.rstrip("/") + ".inputs"
    try:
        with open(stamp_file) as f, open(os.path.join(out, "VERSION")) as v:
            if f.read() == stamp:
                return v.read().strip()  # up to date
    except OSError:
        pass
    version = _build(out, cache, debs)
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return version


def _build(out: str, cache: str, debs: dict[str, str]) -> str:
    work = tempfile.mkdtemp(prefix="cni-bundle.", dir=os.path.dirname(out))
    try:
        root = os.path.join(work, "root")
        for deb in debs.values():
            run(["dpkg-deb", "-x", deb, root])
        libdirs = [os.path.join(root, "lib", MULTIARCH), os.path.join(root, "usr/lib", MULTIARCH)]
        libpath = ":".join(libdirs)
        loader = os.path.join(root, "lib", MULTIARCH, LOADER)
        python = os.path.join(root, "usr/bin", PY)
        stdlib = os.path.join(root, "usr/lib", PY)
        run_py = [loader, "--library-path", libpath, python]

        dynamic = trace_modules(run_py, os.path.dirname(PLUGIN_SRC))
        scan = subprocess.run(
            [
                *run_py,
                "-I",
                "-S",
                "-X",
                "utf8",
                "-c",
                SCAN,
                *sorted(direct_imports(PLUGIN_SRC)),
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        files = dict(line.split("\t", 1) for line in scan.stdout.splitlines())
        missing = sorted(n for n in dynamic if n not in files and not n.startswith("coil_cni"))
        if missing:
            sys.exit(f"cni-bundle: a run of the plugin loaded modules the scan missed: {missing}")

        stage = os.path.join(work, "bundle")
        dest_lib = os.path.join(stage, "lib")
        dest_std = os.path.join(dest_lib, PY)
        os.makedirs(os.path.join(stage, "bin"))
        os.makedirs(os.path.join(dest_std, "lib-dynload"))
        shutil.copy2(python, os.path.join(stage, "bin", PY))
        # The landmark the interpreter finds its prefix by, whether or not os is frozen.
        wanted = {os.path.join(stdlib, "os.py")}
        extensions = []
        for origin in files.values():
            if not origin:
                continue
            origin = os.path.realpath(origin)
            if not origin.startswith(os.path.realpath(stdlib) + os.sep):
                sys.exit(f"cni-bundle: module file outside the standard library: {origin}")
            if origin.endswith(".so"):
                extensions.append(origin)
            wanted.add(origin)
        # Packages need their __init__ on the way down.
        for origin in list(wanted):
            rel = os.path.relpath(origin, os.path.realpath(stdlib))
            parts = rel.split(os.sep)[:-1]
            for i in range(1, len(parts) + 1):
                init = os.path.join(stdlib, *parts[:i], "__init__.py")
                if os.path.exists(init):
                    wanted.add(os.path.realpath(init))
        for origin in sorted(wanted):
            rel = os.path.relpath(os.path.realpath(origin), os.path.realpath(stdlib))
            target = os.path.join(dest_std, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(origin, target)
        # The loader, libc and whatever the interpreter and the extension modules link.
        libs = {loader}
        for elf in [python, *extensions]:
            libs.update(needed_libs(loader, libpath, elf))
        for lib in sorted(libs):
            shutil.copy(os.path.realpath(lib), os.path.join(dest_lib, os.path.basename(lib)))
        # The plugin itself.
        plugin_dest = os.path.join(dest_std, "coil_cni")
        os.makedirs(plugin_dest)
        for name in sorted(os.listdir(PLUGIN_SRC)):
            if name.endswith(".py") and name not in PLUGIN_EXCLUDE:
                shutil.copy2(os.path.join(PLUGIN_SRC, name), plugin_dest)
        # Compile with the bundled interpreter; unchecked hashes: no source stat on every import.
        subprocess.run(
            [
                *run_py,
                "-I",
                "-S",
                "-c",
                "import compileall, sys; sys.exit(not compileall.compile_dir("
                "sys.argv[1], quiet=1, invalidation_mode="
                "__import__('py_compile').PycInvalidationMode.UNCHECKED_HASH))",
                dest_std,
            ],
            check=True,
        )
        launcher = os.path.join(stage, "coil")
        with open(launcher, "w") as f:
            f.write(LAUNCHER)
        os.chmod(launcher, 0o755)
        with open(os.path.join(stage, "MANIFEST"), "w") as f:
            f.write("".join(f"{name}\n" for name in sorted(debs)))
        version = f"{project_version()}-{digest(stage)}"
        with open(os.path.join(stage, "VERSION"), "w") as f:
            f.write(version + "\n")
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(stage, out)
        return version
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    out = os.path.abspath(
        sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "build/cni-bundle")
    )
    cache = os.path.join(os.path.dirname(out), "debs")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    version = build(out, cache)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    print(f"cni-bundle: {out} version {version}, {size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
