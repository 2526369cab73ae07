"""coilctl's check of a command's arguments before it connects, with the allocator's own rules.

The allocator checks every request with the rules of `coil_core` (`coil_core.rules`,
`coil_core.model.Pool.from_strings`). coilctl applies the same rules, with the same operation names
and in the same order, before it opens a channel: a bad argument is refused without a round trip,
and without an allocator at all, with exactly the message the allocator's INVALID_ARGUMENT answer
would carry and the same exit code (1, `EXIT_FAILED`). Only what needs no stored state is checked
here: whether a pool exists, whether a subnet overlaps another pool's or is large enough for the
pool's blocks (`pool add-subnet`) is still for the allocator to say.

Only commands that take such arguments import this module (and with it coil_core); `version`,
`completion`, `pool list`, `usage` and `check` do not.
"""

from __future__ import annotations

import argparse

from coil_core.blocks import validate_pool_subnet
from coil_core.errors import InvalidArgument
from coil_core.model import Pool
from coil_core.rules import parse_address, parse_subnet, validate_node_name, validate_pool_name
from coilctl.errors import EXIT_FAILED, CtlError, UsageError

MAX_UINT32 = 2**32 - 1


def block_size(name: str, text: str) -> int:
    """SIZE of `pool create` as a number. The proto field is unsigned, so a size that is not a
    whole number in 0..2^32-1 cannot even be sent: UsageError (exit 2), checked before any rule."""
    op = f'pool create "{name}"'
    try:
        bits = int(text, 10)
    except ValueError:
        raise UsageError(f'{op}: block size "{text}" is not a whole number') from None
    if bits < 0:
        raise UsageError(
            f'{op}: block size "{text}" is negative (SIZE is the exponent: blocks of 2^SIZE '
            "addresses)"
        )
    if bits > MAX_UINT32:
        raise UsageError(f'{op}: block size "{text}" is out of range')
    return bits


def _apply_rules(args: argparse.Namespace) -> None:
    # Each branch mirrors the allocator's method for the command's RPC (coil_allocator's
    # pools.py, nodes.py, records.py): same rules, same `op`, same order.
    command, action = args.command, getattr(args, "action", "")
    if command == "pool":
        if action == "create":
            subnets = [args.subnet, *args.extra_subnets]
            Pool.from_strings(args.name, subnets, block_size(args.name, args.size), "pool create")
        elif action == "add-subnet":
            op = "pool add-subnet"
            validate_pool_name(args.name, op)
            subnet = parse_subnet(args.subnet, f'{op} "{args.name}" subnet')
            validate_pool_subnet(subnet, f'{op} "{args.name}" subnet')
        elif action == "show":
            validate_pool_name(args.name, "pool show")
            if args.subnet:
                parse_subnet(args.subnet, "pool show")
        elif action == "delete":
            validate_pool_name(args.name, "pool delete")
    elif command == "node":
        validate_node_name(args.node, f"node {action}")
    elif command == "address":
        parse_address(args.address, f"address {action}")


def check(args: argparse.Namespace) -> None:
    """Check the parsed command's arguments as the allocator would, without contacting it.

    Raises:
        UsageError: `pool create`'s SIZE is not a number the request can carry (exit 2).
        CtlError: an argument breaks one of the allocator's rules (exit 1, the rule's message).
    """
    try:
        _apply_rules(args)
    except InvalidArgument as e:
        raise CtlError(str(e), EXIT_FAILED) from None
