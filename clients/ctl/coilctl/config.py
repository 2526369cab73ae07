"""Where coilctl finds the allocator: flags, then the environment, then ``~/.coilctl.yaml``.

The configuration file is a tiny subset of YAML, parsed here by hand: one ``key: value`` per line,
``#`` comments, optional single or double quotes around a value. Keys are listed in `FILE_KEYS`;
anything else is an error naming the file and the line, so a typo is not silently ignored.
Nothing here touches the network.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from coilctl.errors import UsageError

# The allocator's default: a UNIX socket only root can reach (the allocator serves TCP only with
# mutual TLS, see docs/security.md).
DEFAULT_ALLOCATOR = "unix:/run/coil/allocator.sock"
DEFAULT_TIMEOUT = 10.0
ENV_ALLOCATOR = "COILCTL_ALLOCATOR"
CONFIG_NAME = ".coilctl.yaml"
FILE_KEYS = ("allocator", "tls-ca", "tls-cert", "tls-key", "timeout")


@dataclass(frozen=True, slots=True)
class Settings:
    """How to reach the allocator. TLS is used when any of the three TLS paths is set."""

    allocator: str
    timeout: float = DEFAULT_TIMEOUT
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    source: str = "default"
    """Where `allocator` came from ("--allocator", "$COILCTL_ALLOCATOR", a file path or "default");
    quoted in errors so the operator knows what to fix."""

    @property
    def tls(self) -> bool:
        return any(p is not None for p in (self.tls_ca, self.tls_cert, self.tls_key))


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    # An unquoted value ends at a " #" comment, as in YAML.
    cut = value.find(" #")
    return value[:cut].rstrip() if cut >= 0 else value


def parse_config(text: str, path: Path) -> dict[str, str]:
    """The keys and values of a configuration file's text.

    Raises UsageError naming `path` and the line for a line without ``key: value``, an unknown
    key, a repeated key or an empty value.
    """
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or not key:
            raise UsageError(f'{where}: expected "key: value", got "{line}"')
        if key not in FILE_KEYS:
            known = ", ".join(FILE_KEYS)
            raise UsageError(f'{where}: unknown key "{key}" (known keys: {known})')
        if key in values:
            raise UsageError(f'{where}: key "{key}" is repeated')
        value = _unquote(value.strip())
        if not value:
            raise UsageError(f'{where}: key "{key}" has no value')
        values[key] = value
    return values


def read_config(path: Path) -> dict[str, str]:
    """The file's keys and values; empty if the file does not exist. Raises UsageError."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read: {e}") from None
    return parse_config(text, path)


def check_address(address: str, source: str) -> str:
    """Return `address` if it looks like "host:port" or "unix:PATH"; else UsageError."""
    if address.startswith("unix:"):
        if len(address) > len("unix:"):
            return address
    else:
        host, _, port = address.rpartition(":")
        bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
        plain = bool(host) and not any(c in host for c in "[]/") and "://" not in address
        if (bracketed or plain) and port.isdigit() and 0 < int(port) < 65536:
            return address
    raise UsageError(
        f'allocator address "{address}" (from {source}): expected "host:port" or "unix:PATH"'
    )


def parse_timeout(text: str, source: str) -> float:
    """Seconds as a positive finite number; UsageError otherwise."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise UsageError(f'timeout "{text}" (from {source}): expected a positive number of seconds')
    return seconds


def resolve(
    *,
    allocator: str | None,
    timeout: str | None,
    tls_ca: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    environ: Mapping[str, str] | None = None,
    home: Path | None = None,
) -> Settings:
    """Settings from flags (the arguments; None when not given), the environment and the file.

    The allocator address comes from the flag, else $COILCTL_ALLOCATOR, else the file's
    ``allocator:``, else unix:/run/coil/allocator.sock; the other settings from the flag, else
    the file. Relative paths in the file are relative to the file's directory. Raises UsageError.
    """
    env = os.environ if environ is None else environ
    path = (home if home is not None else Path.home()) / CONFIG_NAME
    file = read_config(path)

    def from_file(key: str) -> Path | None:
        value = file.get(key)
        return None if value is None else path.parent / Path(value).expanduser()

    if allocator is not None:
        address, source = allocator, "--allocator"
    elif env.get(ENV_ALLOCATOR):
        address, source = env[ENV_ALLOCATOR], f"${ENV_ALLOCATOR}"
    elif "allocator" in file:
        address, source = file["allocator"], str(path)
    else:
        address, source = DEFAULT_ALLOCATOR, "default"
    if timeout is not None:
        seconds = parse_timeout(timeout, "--timeout")
    elif "timeout" in file:
        seconds = parse_timeout(file["timeout"], str(path))
    else:
        seconds = DEFAULT_TIMEOUT
    settings = Settings(
        allocator=check_address(address, source),
        timeout=seconds,
        tls_ca=Path(tls_ca) if tls_ca is not None else from_file("tls-ca"),
        tls_cert=Path(tls_cert) if tls_cert is not None else from_file("tls-cert"),
        tls_key=Path(tls_key) if tls_key is not None else from_file("tls-key"),
        source=source,
    )
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise UsageError("TLS: --tls-cert and --tls-key (tls-cert/tls-key) go together")
    return settings
