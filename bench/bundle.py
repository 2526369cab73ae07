"""Section "bundle": the plugin bundle (`make cni-bundle`, installed by coil-install) against the
venv launcher (`python -m coil_cni.install`), the same plugin code against the same coild.

The bundle runs Debian's CPython 3.11 through its own loader and libc behind a /bin/sh launcher;
the venv launcher runs this virtualenv's interpreter directly from its `#!` line. Each pod's ADD
(then CHECK, then DEL) is run by both in turn, so load from elsewhere falls on both alike."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cni import Subject, sequential, stats
from bench.common import Lab, exec_plugin, pick, summary_ms
from tests.harness.cluster import install_plugin
from tests.harness.deploy import cni_bundle


def run(lab: Lab, allocator: str, log: Callable[[str], None]) -> dict[str, Any]:
    pods = pick(int(os.environ.get("BENCH_BUNDLE_PODS", "300")), 10)
    version_n = pick(200, 10)
    _, coild_sock, _ = lab.start_coild("bundle-node", allocator)
    started = time.monotonic()
    bundle = cni_bundle()
    log(f"  make cni-bundle: {time.monotonic() - started:.1f} s")
    host = lab.root / "bundle-host"
    host.mkdir()
    subprocess.run(
        [str(Path(sys.executable).parent / "coil-install"), "--host-root", str(host), "--bundle",
         str(bundle), "--grace", "0"],
        check=True,
        capture_output=True,
    )  # fmt: skip
    venv = install_plugin(lab.root / "venv-bin")
    ipam = {"type": "coil", "socket": str(coild_sock)}
    subjects = [
        Subject("venv launcher", [str(venv)], ipam),
        Subject("bundle", [str(host / "opt/cni/bin/coil")], ipam),
    ]
    for s in subjects:  # warm caches once; not counted
        s.run("ADD", "warmup0")
        s.run("DEL", "warmup0")
        s.failures = 0
    log(f"  {pods} pods, each ADD/CHECK/DEL by the venv launcher and the bundle in turn")
    sequential(subjects, pods, log)
    out: dict[str, Any] = {"pods": pods, "subjects": {s.name: stats(s) for s in subjects}}
    version: dict[str, list[float]] = {s.name: [] for s in subjects}
    for _ in range(version_n):
        for s in subjects:
            r = exec_plugin(s.argv, {"CNI_COMMAND": "VERSION"}, b"")
            version[s.name].append(r.seconds)
    out["version_ms"] = {name: summary_ms(v) for name, v in version.items()}
    out["version_n"] = version_n
    out["bundle_mb"] = round(
        sum(f.stat().st_size for f in bundle.rglob("*") if f.is_file()) / 1e6, 1
    )
    for s in subjects:
        out["subjects"][s.name]["peak_rss_mb"] = s.rss_mb(pick(10, 2), lab.root)
    return out
