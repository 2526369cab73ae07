"""coilctl: the operator's command-line client of the allocator.

Each command is one RPC (`coilctl.client`) and a rendering of its answer (`coilctl.render`).
Arguments are first checked with the allocator's own rules (`coilctl.arguments`), without
connecting. Errors go to stderr as ``coilctl: <message>`` with the exit codes of `coilctl.errors`:
1 when the allocator refuses (or would, by those rules), 2 for usage errors, 3 when the allocator
cannot be reached, 4 when `check` finds problems it did not repair; never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from coilctl import cli, config
from coilctl.errors import EXIT_FAILED, EXIT_FINDINGS, EXIT_OK, CtlError, UsageError

if TYPE_CHECKING:
    from coilctl.client import Allocator


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("coil-ipam")
    except PackageNotFoundError:
        return "unknown"


def _emit(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    if getattr(args, "output", "table") == "json":
        print(json.dumps(document, indent=2))
    else:
        print(text)


def confirm(question: str, subject: str, yes: bool) -> None:
    """Ask `question` on the terminal unless `yes`.

    Raises UsageError when stdin is not a terminal (the operator must pass --yes) and CtlError
    (exit 1) when the answer is not yes; `subject` (operation and input) starts both messages.
    """
    if yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(f"{subject}: not confirmed: stdin is not a terminal; pass --yes")
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    try:
        answer = sys.stdin.readline()
    except (EOFError, OSError):
        answer = ""
    if not sys.stderr.isatty():
        # The terminal echoed the answer, not stderr: end the prompt's line in a log.
        print(file=sys.stderr)
    if answer.strip().lower() not in ("y", "yes"):
        raise CtlError(f"{subject}: not confirmed; nothing was changed", EXIT_FAILED)


def _pool(args: argparse.Namespace, allocator: Allocator) -> None:
    from coilctl import render

    if args.action == "create":
        from coilctl.arguments import block_size

        bits = block_size(args.name, args.size)
        created = allocator.create_pool(args.name, [args.subnet, *args.extra_subnets], bits)
        _emit(
            args,
            {"pool": render.pool_dict(created.pool)},
            "created " + render.pool_line(created.pool),
        )
    elif args.action == "add-subnet":
        added = allocator.add_subnet(args.name, args.subnet)
        _emit(
            args, {"pool": render.pool_dict(added.pool)}, "updated " + render.pool_line(added.pool)
        )
    elif args.action == "list":
        pools = allocator.list_pools()
        _emit(
            args, {"pools": [render.pool_dict(p) for p in pools.pools]}, render.pools_table(pools)
        )
    elif args.action == "show":
        shown = allocator.get_pool(args.name, args.subnet)
        _emit(args, render.get_pool_dict(shown), render.pool_show(shown))
    elif args.action == "delete":
        allocator.delete_pool(args.name)
        print(f'deleted pool "{args.name}"')


def _node(args: argparse.Namespace, allocator: Allocator) -> None:
    from coilctl import render

    if args.action == "blocks":
        blocks = allocator.node_blocks(args.node, args.records)
        _emit(args, render.node_blocks_dict(blocks), render.node_blocks(args.node, blocks))
    elif args.action == "release":
        released = allocator.release_node(args.node, args.force)
        _emit(args, render.release_node_dict(released), render.release_node(args.node, released))


def _address(args: argparse.Namespace, allocator: Allocator) -> None:
    from coilctl import render

    if args.action == "info":
        info = allocator.get_address(args.address)
        _emit(args, render.get_address_dict(info), render.address_info(args.address, info))
    elif args.action == "free":
        freed = allocator.free_address(args.address)
        _emit(args, {"record": render.record_dict(freed.record)}, render.address_freed(freed))


def _usage(args: argparse.Namespace, allocator: Allocator) -> None:
    from coilctl import render

    usage = allocator.usage()
    _emit(args, render.usage_dict(usage), render.usage_table(usage))


def _check(args: argparse.Namespace, allocator: Allocator) -> None:
    from coilctl import render

    if args.empty_grace < 0:
        raise UsageError(f'check: --empty-grace "{args.empty_grace}" is negative')
    result = allocator.check(args.repair, args.empty_grace)
    _emit(args, render.check_dict(result), render.check_report(result))
    if render.open_findings(result):
        raise CtlError("check: problems found (see above)", EXIT_FINDINGS)


CHECKED = {
    ("pool", "create"),
    ("pool", "add-subnet"),
    ("pool", "show"),
    ("pool", "delete"),
    ("node", "blocks"),
    ("node", "release"),
    ("address", "info"),
    ("address", "free"),
}
"""(command, action) pairs whose arguments `coilctl.arguments` checks with the allocator's rules;
only these load coil_core."""

HANDLERS = {
    "pool": _pool,
    "node": _node,
    "address": _address,
    "usage": _usage,
    "check": _check,
}


def run(args: argparse.Namespace) -> None:
    """Carry out the parsed command. Raises CtlError."""
    if args.command == "completion":
        from coilctl.completion import script

        _, tree = cli.build_parser()
        print(script(args.shell, tree), end="")
        return
    if args.command == "version":
        _emit(args, {"version": _version()}, f"coilctl {_version()}")
        return
    settings = config.resolve(
        allocator=args.allocator,
        timeout=args.timeout,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )
    # Check and confirm before connecting, so a refusal never reaches the allocator.
    if (args.command, getattr(args, "action", "")) in CHECKED:
        from coilctl import arguments

        arguments.check(args)
    if args.command == "node" and args.action == "release":
        confirm(
            f'Release every block and address of node "{args.node}"?',
            f'node release "{args.node}"',
            args.yes,
        )
    elif args.command == "address" and args.action == "free":
        confirm(
            f'Free address "{args.address}" (remove its record, whoever holds it)?',
            f'address free "{args.address}"',
            args.yes,
        )
    from coilctl.client import Allocator

    with Allocator(settings) as allocator:
        HANDLERS[args.command](args, allocator)


def main(argv: Sequence[str] | None = None) -> int:
    """Run coilctl with `argv` (default: sys.argv[1:]); return the exit code."""
    args = cli.parse(argv)
    try:
        run(args)
    except CtlError as e:
        print(f"coilctl: {e.message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("coilctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`coilctl pool list | head -1`); not an error.
        sys.stderr.close()
        return EXIT_OK
    except Exception as e:  # noqa: BLE001 - the promise is a message, never a traceback
        print(f"coilctl: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
