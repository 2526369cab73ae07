"""CNI error codes, the plugin's one exception type, and the one mapping from gRPC status names to
CNI error codes.

This module imports nothing: the mapping is keyed by status *names* (``grpc.StatusCode.X.name``) so
that the VERSION path and configuration errors never load grpc.
"""

from __future__ import annotations

# Codes defined by the CNI specification (1.1.0).
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENVIRONMENT = 4
IO_FAILURE = 5
DECODING_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
NOT_AVAILABLE = 50  # STATUS only
# coil's own codes (the spec reserves 100 and up for plugins).
POOL_EXHAUSTED = 101
ADDRESS_IN_USE = 102
NO_POOL = 103
OTHER = 999


QUOTE_LIMIT = 320  # characters of an input quoted in a message (a 255-character ID fits)
DETAILS_LIMIT = 1000  # characters of coild's message carried in details


def cut(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text``, or its first ``limit`` characters and how long it was: a message quotes what was
    wrong without repeating a huge input."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...({len(text)} characters)"


def quote(value: str) -> str:
    """``value`` quoted as Python's repr, cut to QUOTE_LIMIT characters."""
    return cut(repr(value))


class CNIError(Exception):
    """An error the plugin reports to the runtime as a CNI error object.

    ``msg`` says what was wrong and quotes the input; ``details`` carries what a lower layer said
    (coild's status message, a parser's complaint), or "".
    """

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg
        self.details = details

    def as_result(self, cni_version: str) -> dict[str, object]:
        """The CNI error object printed on stdout."""
        return {
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        }


# Transport failures after which the call's outcome is unknown, or it never reached coild, and a
# later attempt may succeed: coild unreachable or out of time (UNAVAILABLE, DEADLINE_EXCEEDED, also
# a GOAWAY before the call or a REFUSED_STREAM reset), the call reset with CANCEL (coild stopping)
# or ENHANCE_YOUR_CALM (coild shedding load; grpcio calls it RESOURCE_EXHAUSTED). Every other
# transport failure (a malformed answer, a protocol-error reset, an answer or header block over
# the plugin's limits) is 999: a retry would meet the same answer.
_TRANSPORT_RETRY = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED")


def error_from_status(
    status: str,
    server_msg: str,
    *,
    command: str,
    subject: str,
    socket: str,
    transport: bool = False,
) -> CNIError:
    """Translate a failed call to coild into the CNI error the runtime sees.

    ``status`` is the gRPC status name (e.g. "UNAVAILABLE"), ``server_msg`` what came with it,
    ``subject`` names what the call was about (an attachment, "garbage collection", ...).
    ``transport`` says the status is the plugin's own verdict on a conversation that failed, not
    coild's answer. This is the only place gRPC statuses become CNI codes:

    * STATUS: any failure is 50 (the plugin is not available).
    * a transport failure: 11 if the call did not reach coild or its outcome is unknown
      (``_TRANSPORT_RETRY``), else 999; never one of coil's own codes.
    * UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED: 11, the runtime may retry.
    * RESOURCE_EXHAUSTED 101, ALREADY_EXISTS 102, FAILED_PRECONDITION 103 (coil's own codes).
    * INVALID_ARGUMENT: 7 (coild rejected something taken from the configuration).
    * NOT_FOUND on CHECK: 3 (coild holds nothing for the container).
    * anything else: 999.

    ``msg`` says what failed; ``details`` carries coild's message, which ``msg`` does not repeat
    (runtimes print "msg; details"); it is cut to DETAILS_LIMIT characters.
    """
    server_msg = cut(server_msg, DETAILS_LIMIT)
    if command == "STATUS":
        what = "the call failed" if transport else "it answered"
        return CNIError(
            NOT_AVAILABLE,
            f"coil is not available: coild at {socket!r}: {what} {status}",
            server_msg,
        )
    if transport:
        if status in _TRANSPORT_RETRY:
            return CNIError(
                TRY_AGAIN_LATER,
                f"coil {command} {subject}: the call to coild at {socket!r} did not complete "
                f"({status}); coild, or the allocator or etcd behind it, may be unreachable or "
                "restarting; try again later",
                server_msg,
            )
        return CNIError(
            OTHER,
            f"coil {command} {subject}: the conversation with coild at {socket!r} failed "
            f"({status})",
            server_msg,
        )
    if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED"):
        return CNIError(
            TRY_AGAIN_LATER,
            f"coil {command} {subject}: coild at {socket!r}, or the allocator or etcd behind it, "
            f"is unreachable or busy ({status}); try again later",
            server_msg,
        )
    if status == "RESOURCE_EXHAUSTED":
        return CNIError(
            POOL_EXHAUSTED,
            f"coil {command} {subject}: pool exhausted, no free address of a needed family",
            server_msg,
        )
    if status == "ALREADY_EXISTS":
        return CNIError(
            ADDRESS_IN_USE,
            f"coil {command} {subject}: requested address in use by another pod",
            server_msg,
        )
    if status == "FAILED_PRECONDITION":
        return CNIError(
            NO_POOL, f"coil {command} {subject}: no pool serves the namespace", server_msg
        )
    if status == "INVALID_ARGUMENT":
        return CNIError(
            INVALID_CONFIG, f"coil {command} {subject}: coild rejected the request", server_msg
        )
    if status == "NOT_FOUND" and command == "CHECK":
        return CNIError(
            UNKNOWN_CONTAINER,
            f"coil CHECK {subject}: coild holds no addresses for it",
            server_msg,
        )
    return CNIError(
        OTHER, f"coil {command} {subject}: coild at {socket!r} failed with {status}", server_msg
    )
