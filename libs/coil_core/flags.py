"""Command lines whose every flag can also come from an environment variable (coil-allocator and
coild), so that secrets such as an etcd password never have to be on a command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

Flag = tuple[str, str, str, str]
"""(flag, environment variable, default, help)."""


def env_parser(prog: str, description: str, flags: Iterable[Flag]) -> argparse.ArgumentParser:
    """A parser whose flags default to their environment variable, else to their default."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for flag, env, default, text in flags:
        parser.add_argument(
            flag,
            default=os.environ.get(env, default),
            help=f"{text} (env {env}; default {default!r})",
        )
    return parser
