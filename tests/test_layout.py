"""The packages' layering as a user of the images sees it: the node agent and coilctl run without
the allocator's package (their images need not ship it). import-linter checks the same from the
source in `make lint`; this checks what really gets loaded."""

from __future__ import annotations

import subprocess
import sys

import pytest

AGENT = (
    "coild.main",
    "coild.agent",
    "coild.server",
    "coild.allocator_client",
    "coild.state",
    "coild.routes",
    "coild.observe",
    "coild.batcher",
    "coild.follow",
)
CTL = (
    "coilctl.main",
    "coilctl.arguments",
    "coilctl.client",
    "coilctl.render",
    "coilctl.completion",
)


def _loaded(modules: tuple[str, ...]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.split()


@pytest.mark.parametrize("modules", [AGENT, CTL], ids=["coild", "coilctl"])
def test_never_imports_the_allocator(modules: tuple[str, ...]) -> None:
    loaded = _loaded(modules)
    assert set(modules) <= set(loaded)  # the check looks at the right thing
    assert [m for m in loaded if m == "coil_allocator" or m.startswith("coil_allocator.")] == []
