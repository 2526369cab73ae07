"""Command lines whose every flag can also come from an environment variable (coil-allocator and
coild), so that secrets such as an etcd password never have to be on a command line."""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable

Flag = tuple[str, str, str, str]
"""(flag, environment variable, default, help)."""

Number = tuple[str, type[int] | type[float], float, float]
"""(argument name, int or float, lowest, highest) of a numeric flag, for `check_numbers`."""

LOG_FORMAT = "time=%(asctime)s level=%(levelname)s logger=%(name)s msg=%(message)s"
"""The services' log line: logfmt-like, one event per line."""


def env_parser(
    prog: str, description: str, flags: Iterable[Flag], env_prefix: str
) -> argparse.ArgumentParser:
    """A parser whose flags default to their environment variable, else to their default.

    Every service also gets ``--log-level`` (environment variable ``<env_prefix>LOG_LEVEL``),
    after its own flags.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description)
    log_level = ("--log-level", f"{env_prefix}LOG_LEVEL", "info", "debug, info, warning or error")
    for flag, env, default, text in (*flags, log_level):
        parser.add_argument(
            flag,
            default=os.environ.get(env, default),
            help=f"{text} (env {env}; default {default!r})",
        )
    return parser


def check_numbers(
    parser: argparse.ArgumentParser, args: argparse.Namespace, numbers: Iterable[Number]
) -> None:
    """Turn each named argument of ``args`` into its number type, in place.

    Exits through ``parser.error`` (status 2) naming the flag and its range when a value is not
    a number or lies outside ``lowest..highest``.
    """
    for name, kind, low, high in numbers:
        raw = getattr(args, name)
        try:
            value = kind(raw)
            if not low <= value <= high:
                raise ValueError
        except ValueError:
            parser.error(
                f"--{name.replace('_', '-')} {raw!r}: must be a number from {low} to {high}"
            )
        setattr(args, name, value)
