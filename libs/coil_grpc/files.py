"""Secrets from files, and UNIX sockets only their owner (and root) can reach.

Secrets (keys, passwords) come from files or the environment, never from flags: a command line
is readable by every local user in /proc. `key_file_warning` tells when a key file is readable by
group or others.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator


def read_file(path: str, flag: str) -> bytes:
    """A file's bytes; ValueError naming the flag and the path when it cannot be read."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"{flag} {path!r}: {e.strerror or e}") from None


def key_file_warning(path: str, flag: str) -> str | None:
    """A warning when users other than this process's own user and groups can read the secret
    file at `path` (world-readable, or group-readable by a group this process is not in); None
    otherwise, and when it cannot be read at all (reading it will say why)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    own_groups = {os.getegid(), *os.getgroups()}
    if st.st_mode & 0o004:
        who = "every user"
    elif st.st_mode & 0o040 and st.st_gid not in own_groups:
        who = f"group {st.st_gid}"
    else:
        return None
    return (
        f"{flag} {path!r} is readable by {who} (mode {st.st_mode & 0o777:o}): "
        "make it readable by this user only (chmod 600)"
    )


def socket_directory_problem(directory: str) -> str | None:
    """Why a UNIX socket may not be served from `directory`, or None.

    Another user who can write the directory could replace the socket with their own (and so
    answer in the server's name); a sticky directory (/tmp) keeps them from that.
    """
    try:
        st = os.stat(directory)
    except OSError as e:
        return f"socket directory {directory!r}: {e.strerror or e}"
    if st.st_uid not in (0, os.geteuid()):
        return f"socket directory {directory!r} belongs to uid {st.st_uid}, not to root or to us"
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        return (
            f"socket directory {directory!r} can be written by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): they could replace the socket"
        )
    return None


def prepare_socket_path(path: str) -> None:
    """Make ready to bind a UNIX socket at `path`: create its directory (mode 0755) if missing,
    check the directory, and remove a stale socket.

    Raises ValueError when the directory is unsafe or `path` exists and is not a socket."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o755, exist_ok=True)
    problem = socket_directory_problem(directory)
    if problem:
        raise ValueError(problem)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{path!r} exists and is not a socket: not replacing it")
    os.unlink(path)


@contextlib.contextmanager
def owner_only() -> Iterator[None]:
    """Files and sockets created inside get mode 0600 at creation: a socket is never, even for
    an instant, open to others. (The umask is process-wide: use it at start-up.)"""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def seal_socket(path: str) -> None:
    """Set the bound socket at `path` to mode 0600 and check it; ValueError if it is not."""
    os.chmod(path, 0o600)
    st = os.lstat(path)
    if stat.S_IMODE(st.st_mode) != 0o600 or st.st_uid != os.geteuid():
        raise ValueError(f"socket {path!r}: mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
