"""coilctl's one error type and its exit codes.

Every failure coilctl reports is a `CtlError` carrying the message printed as ``coilctl: <message>``
and the exit code; `coilctl.main` is the only place that prints it.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1
"""The allocator refused or failed the request, or an argument breaks one of the allocator's rules
(checked before connecting, `coilctl.arguments`: same message, same code as the allocator's
INVALID_ARGUMENT answer), or the operator declined a confirmation."""
EXIT_USAGE = 2
"""Bad command line, configuration file or environment; nothing was sent to the allocator."""
EXIT_UNREACHABLE = 3
"""The allocator could not be reached or did not answer in time (UNAVAILABLE, DEADLINE_EXCEEDED)."""
EXIT_FINDINGS = 4
"""`coilctl check` found warnings or critical problems that are still there."""


class CtlError(Exception):
    """A failure to report on stderr and turn into an exit code."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code


class UsageError(CtlError):
    """Bad input detected before contacting the allocator (exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, EXIT_USAGE)
