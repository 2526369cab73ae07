"""The CNI IPAM plugin ``coil``: translates one CNI command into one call to the node agent coild.

A runtime (or a main plugin such as ptp) execs this for every pod, so its start-up is part of every
pod's start. It imports no third-party package: the call to coild is ``coil_cni.rpc`` (gRPC over
HTTP/2 on the interpreter's ``_socket``), messages are encoded by ``coil_cni.wire`` and JSON goes
through ``coil_cni.jsonio``; ``typing``, ``json``, ``re`` and ``enum`` are never loaded on the path
of a successful ADD. The configuration parser is loaded for commands that read a configuration,
the client only for commands that call coild (never for VERSION), and the process ends with
``os._exit`` to skip interpreter teardown.

Input: CNI_COMMAND (ADD, DEL, CHECK, GC, STATUS, VERSION), CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME,
CNI_ARGS in the environment, the network configuration on stdin. Output: the result (ADD) or
nothing on stdout and exit status 0; or a CNI error object on stdout and exit status 1.

Debugging aid: with COIL_CNI_DEBUG_MODULES=<path> the plugin writes the sorted names of every
imported module to <path> (one per line) before it exits; the tests use it to guard start-up cost.
"""

from __future__ import annotations

import os
import sys

from coil_cni.errors import INVALID_ENVIRONMENT, OTHER, CNIError, cut, quote

TYPE_CHECKING = False  # typing itself would cost every pod its import
if TYPE_CHECKING:
    from collections.abc import Mapping
    from typing import Any

    from coil_cni.client import NodeAgent
    from coil_cni.config import IpamConfig


def _node_agent(ipam: IpamConfig, command: str, subject: str) -> NodeAgent:
    """A client of coild; a missing socket file fails at once."""
    if not os.path.exists(ipam.socket):
        from coil_cni.errors import error_from_status

        raise error_from_status(
            "UNAVAILABLE",
            f"socket {ipam.socket} does not exist (is coild running on this node?)",
            command=command,
            subject=subject,
            socket=ipam.socket,
            transport=True,
        )
    from coil_cni.client import NodeAgent

    return NodeAgent(ipam, command)


def _add(conf: dict[str, Any], env: Mapping[str, str], version: str) -> dict[str, Any]:
    from coil_cni import config

    attachment = config.attachment_from_env(env, "ADD")
    args = config.parse_cni_args(env.get("CNI_ARGS", ""))
    ipam = config.parse_ipam(conf)
    requested = config.requested_addresses(conf, args.ip)
    addresses = _node_agent(ipam, "ADD", str(attachment)).allocate(attachment, args, requested)
    if not addresses:
        raise CNIError(OTHER, f"coil ADD {attachment}: coild answered with no addresses")
    return config.ipam_result(version, addresses)


def _del(conf: dict[str, Any], env: Mapping[str, str], version: str) -> None:
    from coil_cni import config

    attachment = config.attachment_from_env(env, "DEL")
    ipam = config.parse_ipam(conf)
    _node_agent(ipam, "DEL", str(attachment)).release(attachment)


def _check(conf: dict[str, Any], env: Mapping[str, str], version: str) -> None:
    from coil_cni import config

    attachment = config.attachment_from_env(env, "CHECK")
    ipam = config.parse_ipam(conf)
    expected = config.prev_result_addresses(conf)
    held = [a.address for a in _node_agent(ipam, "CHECK", str(attachment)).check(attachment)]
    if not config.same_addresses(held, expected):
        raise CNIError(
            OTHER,
            f"coil CHECK {attachment}: coild holds {cut(str(held))} but prevResult has "
            f"{cut(str(expected))}",
        )


def _gc(conf: dict[str, Any], env: Mapping[str, str], version: str) -> None:
    from coil_cni import config

    ipam = config.parse_ipam(conf)
    valid = config.valid_attachments(conf)
    _node_agent(ipam, "GC", "garbage collection").garbage_collect(valid)


def _status(conf: dict[str, Any], env: Mapping[str, str], version: str) -> None:
    from coil_cni import config

    ipam = config.parse_ipam(conf)
    _node_agent(ipam, "STATUS", "status").status()


_HANDLERS = {"ADD": _add, "DEL": _del, "CHECK": _check, "GC": _gc, "STATUS": _status}


def run(env: Mapping[str, str], stdin: bytes | None) -> tuple[int, dict[str, Any] | None]:
    """Run one CNI command; returns the exit status and what to print (None: nothing).

    ``stdin`` is read only by commands that take a configuration (not VERSION). Never raises: every
    failure becomes a CNI error object (unexpected ones with code 999).
    """
    from coil_cni import config

    command = env.get("CNI_COMMAND", "")
    conf: dict[str, Any] = {}
    try:
        if not command:
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"CNI_COMMAND is missing or empty; expected one of {', '.join(config.COMMANDS)}",
            )
        if command not in config.COMMANDS:
            raise CNIError(
                INVALID_ENVIRONMENT,
                f"unknown CNI_COMMAND {quote(command)}; "
                f"expected one of {', '.join(config.COMMANDS)}",
            )
        if command == "VERSION":
            return 0, config.version_result()
        conf = config.parse_netconf(stdin or b"")
        version = config.config_version(conf, command)
        return 0, _HANDLERS[command](conf, env, version)
    except CNIError as e:
        error = e
    except Exception as e:  # the runtime gets a CNI error object, never a traceback
        error = CNIError(OTHER, f"coil {quote(command)}: unexpected error: {cut(repr(e))}")
    # Errors are reported in the configuration's version if coil supports it.
    conf_version = conf.get("cniVersion")
    if isinstance(conf_version, str) and conf_version in config.SUPPORTED_VERSIONS:
        return 1, error.as_result(conf_version)
    return 1, error.as_result(config.LATEST_VERSION)


def _exit(code: int) -> None:
    """Flush stdout and leave without interpreter teardown (grpc's shutdown alone costs ms)."""
    modules_path = os.environ.get("COIL_CNI_DEBUG_MODULES")
    if modules_path:
        with open(modules_path, "w") as f:
            f.write("".join(f"{name}\n" for name in sorted(sys.modules)))
    try:
        sys.stdout.flush()
    except OSError:
        code = code or 1
    os._exit(code)


def main() -> None:
    """Entry point of the ``coil`` executable; does not return."""
    env = os.environ
    needs_stdin = env.get("CNI_COMMAND", "") in _HANDLERS
    stdin = sys.stdin.buffer.read() if needs_stdin else None
    code, output = run(env, stdin)
    if output is not None:
        from coil_cni import jsonio

        sys.stdout.write(jsonio.dumps(output) + "\n")
    _exit(code)


if __name__ == "__main__":
    main()
