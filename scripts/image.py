"""Build the OCI image ``localhost/coil:latest`` without a container registry (``make image``).

1. The CNI plugin bundle (scripts/cni_bundle.py, ``build/cni-bundle``).
2. A wheelhouse (``build/wheelhouse``): a wheel of this project and the exact versions of its
   runtime dependencies listed in deploy/image/requirements.lock (from PyPI, the only index the
   build uses).
3. A root filesystem made by mmdebstrap: Debian bookworm, variant minbase, with python3.11, from
   the same apt mirror this machine uses; a virtualenv at /opt/coil where pip installs
   ``coil-ipam[allocator,nodeagent]`` from the wheelhouse alone (``--no-index``); the bundle at
   /usr/lib/coil/cni-bundle; the Debian package versions in /usr/lib/coil/debian-packages.txt.
4. ``podman import`` of that tarball, with the image's configuration given by ``--change``.

The image is rebuilt only if its inputs changed: their digest (sources, lock file, this script,
the bundle's version, the apt sources) is the image's label ``coil.inputs``. ``--force`` rebuilds.
``--tag`` names the image (default localhost/coil:latest); ``--version-suffix`` builds a variant
whose bundle and label carry another version (the tests use it to upgrade).

Runs with the project's virtualenv (for pip); needs mmdebstrap and podman (scripts/deps.sh).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")
LOCK = os.path.join(ROOT, "deploy", "image", "requirements.lock")
SUITE = "bookworm"
DEFAULT_TAG = "localhost/coil:latest"
WHEELS = "/var/tmp/coil-wheels"
PATH = "/opt/coil/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
SOURCES = ["services", "clients", "gen/python", "pyproject.toml"]


def fail(message: str) -> None:
    sys.exit(f"image: {message}")


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        fail(f"{tool} is not installed (Debian package {package}; scripts/deps.sh installs it)")


def apt_mirrors() -> dict[str, str]:
    """The mirrors this machine's apt uses for Debian and its security archive (deb822 or one-line
    sources), so the image comes from the same place; deb.debian.org where none is configured."""
    found = {
        "debian": "http://deb.debian.org/debian",
        "security": "http://deb.debian.org/debian-security",
    }
    texts = []
    for path in ["/etc/apt/sources.list", *sorted(glob.glob("/etc/apt/sources.list.d/*"))]:
        try:
            with open(path) as f:
                texts.append(f.read())
        except OSError:
            continue
    uris: list[tuple[str, str]] = []  # (uri, suites)
    for text in texts:
        for stanza in text.split("\n\n"):
            fields = {}
            for line in stanza.splitlines():
                if ":" in line and not line.startswith(("#", " ")):
                    key, value = line.split(":", 1)
                    fields[key.strip().lower()] = value.strip()
            if "uris" in fields:
                uris.append((fields["uris"].split()[0], fields.get("suites", "")))
        for line in text.splitlines():
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "deb" and not parts[1].startswith("["):
                uris.append((parts[1], parts[2]))
    for uri, suites in uris:
        if f"{SUITE}-security" in suites:
            found["security"] = uri
        elif SUITE in suites.split():
            found["debian"] = uri
    return found


def inputs_digest(bundle_version: str, mirrors: dict[str, str], suffix: str) -> str:
    h = hashlib.sha256()
    files = [LOCK, os.path.abspath(__file__)]
    for source in SOURCES:
        path = os.path.join(ROOT, source)
        if os.path.isfile(path):
            files.append(path)
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            files += [
                os.path.join(dirpath, n) for n in sorted(filenames) if n.endswith((".py", ".pyi"))
            ]
    for path in files:
        h.update(os.path.relpath(path, ROOT).encode() + b"\0")
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(json.dumps([bundle_version, mirrors, suffix], sort_keys=True).encode())
    return h.hexdigest()[:16]


def image_label(tag: str, label: str) -> str | None:
    proc = subprocess.run(
        ["podman", "image", "inspect", "--format", f'{{{{index .Labels "{label}"}}}}', tag],
        capture_output=True,
        text=True,
    )
    return proc.stdout.strip() if proc.returncode == 0 else None


def project_version() -> str:
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        for line in f:
            if line.startswith("version ="):
                return line.split("=", 1)[1].strip().strip('"')
    fail("no version in pyproject.toml")
    return ""


def build_bundle(suffix: str) -> tuple[str, str]:
    """Build build/cni-bundle (and a variant copy for a suffix); (bundle dir, its version)."""
    bundle = os.path.join(BUILD, "cni-bundle")
    subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "cni_bundle.py"), bundle], check=True
    )
    with open(os.path.join(bundle, "VERSION")) as f:
        version = f.read().strip()
    if not suffix:
        return bundle, version
    variant = os.path.join(BUILD, f"cni-bundle{suffix}")
    shutil.rmtree(variant, ignore_errors=True)
    shutil.copytree(bundle, variant, symlinks=True)
    version += suffix
    with open(os.path.join(variant, "VERSION"), "w") as f:
        f.write(version + "\n")
    return variant, version


def build_wheelhouse() -> str:
    """build/wheelhouse, unless it was built from the same sources and lock file."""
    wheels = os.path.join(BUILD, "wheelhouse")
    stamp = inputs_digest("", {}, "")
    stamp_file = os.path.join(BUILD, "wheelhouse.inputs")
    try:
        with open(stamp_file) as f:
            if f.read() == stamp and os.path.isdir(wheels):
                return wheels
    except OSError:
        pass
    shutil.rmtree(wheels, ignore_errors=True)
    os.makedirs(wheels)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # The project's wheel, then exactly the locked versions of what it needs (and pip).
    subprocess.run([*pip, "wheel", "--no-deps", "--wheel-dir", wheels, ROOT], check=True)
    subprocess.run(
        [*pip, "download", "--no-deps", "--only-binary", ":all:", "--python-version", "3.11",
         "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
         "--platform", "manylinux_2_28_x86_64", "--implementation", "cp",
         "--dest", wheels, "-r", LOCK],
        check=True,
    )  # fmt: skip
    with open(stamp_file, "w") as f:
        f.write(stamp)
    return wheels


def build_rootfs(tarball: str, wheels: str, bundle: str, mirrors: dict[str, str]) -> None:
    sources = [
        f"deb {mirrors['debian']} {SUITE} main",
        f"deb {mirrors['debian']} {SUITE}-updates main",
        f"deb {mirrors['security']} {SUITE}-security main",
    ]
    pip_wheel = [w for w in os.listdir(wheels) if w.startswith("pip-") and w.endswith(".whl")]
    if len(pip_wheel) != 1:
        fail(f"the wheelhouse {wheels} must hold exactly one pip wheel, not {pip_wheel}")
    # pip runs from its own wheel (a zip on sys.path) and is not installed.
    pip = f"/opt/coil/bin/python {WHEELS}/{pip_wheel[0]}/pip"
    install = (
        f'chroot "$1" {pip} install -q --no-index --find-links {WHEELS} '
        "--no-warn-script-location 'coil-ipam[allocator,nodeagent]'"
    )
    hooks = [
        f'mkdir -p "$1{WHEELS}" "$1/usr/lib/coil"',
        f"copy-in {' '.join(sorted(glob.glob(os.path.join(wheels, '*.whl'))))} {WHEELS}",
        'chroot "$1" python3.11 -m venv --without-pip /opt/coil',
        install,
        # Not kept: the wheels, apt's lists and caches, logs.
        f"copy-in {bundle} /usr/lib/coil",
        *(
            [f'mv "$1/usr/lib/coil/{os.path.basename(bundle)}" "$1/usr/lib/coil/cni-bundle"']
            if os.path.basename(bundle) != "cni-bundle"
            else []
        ),
        'chroot "$1" dpkg-query -W > "$1/usr/lib/coil/debian-packages.txt"',
        f'rm -rf "$1{WHEELS}" "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*',
    ]
    cmd = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        "--include=python3.11",
        # /usr merged by the hook itself, not by the usrmerge package (which brings perl).
        "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
        "--dpkgopt=path-exclude=/usr/share/doc/*",
        "--dpkgopt=path-include=/usr/share/doc/*/copyright",
        "--dpkgopt=path-exclude=/usr/share/man/*",
        "--dpkgopt=path-exclude=/usr/share/locale/*",
        "--dpkgopt=path-exclude=/usr/share/info/*",
        *[f"--customize-hook={hook}" for hook in hooks],
        SUITE,
        tarball,
        *sources,
    ]
    subprocess.run(cmd, check=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="scripts/image.py", description=__doc__.splitlines()[0])
    p.add_argument("--tag", default=DEFAULT_TAG)
    p.add_argument("--force", action="store_true", help="rebuild even if the inputs are unchanged")
    p.add_argument("--version-suffix", default="", help="a variant: its bundle version gets this")
    p.add_argument(
        "--context-only",
        action="store_true",
        help="only build build/cni-bundle and build/wheelhouse (the Containerfile's input)",
    )
    args = p.parse_args(argv)
    if args.context_only:
        build_bundle("")
        build_wheelhouse()
        return 0
    if args.version_suffix and not args.version_suffix.startswith("-"):
        fail("--version-suffix must start with '-'")
    need("mmdebstrap", "mmdebstrap")
    need("podman", "podman")
    mirrors = apt_mirrors()
    bundle, bundle_version = build_bundle(args.version_suffix)
    digest = inputs_digest(bundle_version, mirrors, args.version_suffix)
    if not args.force and image_label(args.tag, "coil.inputs") == digest:
        print(f"image: {args.tag} is up to date (inputs {digest})")
        return 0
    wheels = build_wheelhouse()
    tarball = os.path.join(BUILD, f"image-rootfs{args.version_suffix}.tar")
    build_rootfs(tarball, wheels, bundle, mirrors)
    version = project_version()
    changes = [
        f"ENV PATH={PATH}",
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "WORKDIR /",
        'CMD ["coilctl", "--help"]',
        f"LABEL org.opencontainers.image.title=coil org.opencontainers.image.version={version}",
        f"LABEL coil.inputs={digest} coil.cni-bundle={bundle_version}",
    ]
    cmd = ["podman", "import", "--quiet"]
    for change in changes:
        cmd += ["--change", change]
    subprocess.run([*cmd, tarball, args.tag], check=True, stdout=subprocess.DEVNULL)
    os.unlink(tarball)
    size = subprocess.run(
        ["podman", "image", "inspect", "--format", "{{.Size}}", args.tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    mb = int(size) / 1e6
    print(f"image: {args.tag} built (inputs {digest}, bundle {bundle_version}, {mb:.0f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
