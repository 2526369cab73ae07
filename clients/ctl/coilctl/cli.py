"""coilctl's command line: the argparse parser and the command tree completion scripts are made of.

Global options (--allocator, --timeout, --tls-*) are accepted before or after the command. Parse
errors print the usage and ``coilctl: <message>`` and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from coilctl.errors import EXIT_USAGE

OUTPUTS = ("table", "json")
SHELLS = ("bash", "zsh", "fish")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        where = self.prog.removeprefix("coilctl").strip()
        self.exit(EXIT_USAGE, f"coilctl: {where + ': ' if where else ''}{message}\n")


class CommandTree:
    """Commands, subcommands and their options, recorded while the parser is built."""

    def __init__(self) -> None:
        self.commands: dict[str, dict[str, list[str]]] = {}
        self.global_options: list[str] = []
        self.help: dict[str, str] = {}
        """One line per command and subcommand, keyed "pool" or "pool create"."""

    def options(self, command: str, sub: str = "") -> list[str]:
        return self.commands.get(command, {}).get(sub, [])


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Subcommands repeat the global options with SUPPRESS so a value given before the command is
    # not reset to the default by the subcommand's parser.
    def default(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--allocator",
        metavar="ADDR",
        default=default(None),
        help='allocator address, "host:port" or "unix:PATH" (default: $COILCTL_ALLOCATOR, '
        'else "allocator:" in ~/.coilctl.yaml, else unix:/run/coil/allocator.sock)',
    )
    group.add_argument(
        "--timeout",
        metavar="SECONDS",
        default=default(None),
        help="how long to wait for each answer (default: 10)",
    )
    group.add_argument(
        "--tls-ca", metavar="FILE", default=default(None), help="CA bundle to verify the allocator"
    )
    group.add_argument(
        "--tls-cert", metavar="FILE", default=default(None), help="client certificate (PEM)"
    )
    group.add_argument("--tls-key", metavar="FILE", default=default(None), help="client key (PEM)")


def _output(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=OUTPUTS,
        default="table",
        help="output format (default: table)",
    )


def _yes(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-y",
        "--yes",
        action="store_true",
        help="do not ask for confirmation (needed without a TTY)",
    )


def build_parser() -> tuple[argparse.ArgumentParser, CommandTree]:
    """The parser and the tree of what it accepts (for completion scripts)."""
    tree = CommandTree()
    parser = _Parser(
        prog="coilctl",
        description="Inspect and manage coil's address pools, blocks and addresses through "
        "the allocator (coil-allocator).",
    )
    _global_options(parser, top=True)
    tree.global_options = ["--allocator", "--timeout", "--tls-ca", "--tls-cert", "--tls-key"]
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, help: str, group: Any = commands, parent: str = ""
    ) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help, description=help)
        _global_options(sub, top=False)
        tree.help[f"{parent} {name}".strip()] = help
        if parent:
            tree.commands.setdefault(parent, {})[name] = []
        else:
            tree.commands.setdefault(name, {})
        return sub

    def record_options(parent: str, name: str, sub: argparse.ArgumentParser) -> None:
        opts = [o for a in sub._actions for o in a.option_strings if o.startswith("--")]
        tree.commands[parent][name] = [o for o in opts if o not in tree.global_options]

    # pool
    pool = command("pool", "address pools")
    pools = pool.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command("create", "create a pool", pools, "pool")
    p.add_argument("name", metavar="NAME", help='pool name: "default" or a namespace\'s name')
    p.add_argument("subnet", metavar="SUBNET", help='first subnet, e.g. "10.100.0.0/16"')
    p.add_argument("size", metavar="SIZE", help="block size exponent: 5 means 32-address blocks")
    p.add_argument(
        "--subnet",
        dest="extra_subnets",
        metavar="SUBNET",
        action="append",
        default=[],
        help="another subnet (repeatable), e.g. an IPv6 one",
    )
    _output(p)
    record_options("pool", "create", p)
    p = command("add-subnet", "add a subnet to a pool", pools, "pool")
    p.add_argument("name", metavar="NAME")
    p.add_argument("subnet", metavar="SUBNET")
    _output(p)
    record_options("pool", "add-subnet", p)
    p = command("list", "list pools", pools, "pool")
    _output(p)
    record_options("pool", "list", p)
    p = command("show", "show a pool, its held blocks and a map of its blocks", pools, "pool")
    p.add_argument("name", metavar="NAME")
    p.add_argument("subnet", metavar="SUBNET", nargs="?", default="", help="only this subnet")
    _output(p)
    record_options("pool", "show", p)
    p = command("delete", "delete a pool that has no held block", pools, "pool")
    p.add_argument("name", metavar="NAME")
    record_options("pool", "delete", p)

    # node
    node = command("node", "nodes' blocks")
    nodes = node.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command("blocks", "list the blocks a node holds", nodes, "node")
    p.add_argument("node", metavar="NODE")
    p.add_argument("--records", action="store_true", help="also list the addresses recorded")
    _output(p)
    record_options("node", "blocks", p)
    p = command(
        "release", "give back every block and address of a node that is gone", nodes, "node"
    )
    p.add_argument("node", metavar="NODE")
    p.add_argument(
        "--force",
        action="store_true",
        help="release even though the node's agent is alive (its pods lose their addresses)",
    )
    _yes(p)
    _output(p)
    record_options("node", "release", p)

    # address
    address = command("address", "single addresses")
    addresses = address.add_subparsers(dest="action", metavar="ACTION", required=True)
    p = command("info", "where an address lies and who holds it", addresses, "address")
    p.add_argument("address", metavar="ADDRESS")
    _output(p)
    record_options("address", "info", p)
    p = command("free", "remove an address's record (repair)", addresses, "address")
    p.add_argument("address", metavar="ADDRESS")
    _yes(p)
    _output(p)
    record_options("address", "free", p)

    p = command("check", "audit the store and the nodes' routes; --repair fixes what is safe")
    p.add_argument(
        "--repair", action="store_true", help="fix what is safe to fix (never frees addresses)"
    )
    p.add_argument(
        "--empty-grace",
        type=int,
        default=600,
        metavar="SECONDS",
        help="report empty blocks held longer than this (default 600)",
    )
    _output(p)
    record_options("check", "", p)
    p = command("usage", "blocks and addresses used per pool and family")
    _output(p)
    record_options("usage", "", p)
    p = command("completion", "print a shell completion script")
    p.add_argument("shell", choices=SHELLS, metavar="SHELL", help="bash, zsh or fish")
    p = command("version", "print coilctl's version")
    _output(p)
    record_options("version", "", p)
    return parser, tree


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; exits with code 2 (after printing the usage) on errors."""
    parser, _ = build_parser()
    return parser.parse_args(argv)
