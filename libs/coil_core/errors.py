"""coil's domain errors, raised by the allocator and the node agent alike.

Every error that leaves a service is a `CoilError`; each class here maps to one gRPC status code,
in one place (`coil_grpc.status`), and the node agent's own errors (`coild.errors`) subclass these
so that the same mapping serves both servers. Messages name the operation and quote the input,
for example ``pool create "Bad_Name": not a valid namespace name``.
"""


class CoilError(Exception):
    """Base class of coil's domain errors."""


class InvalidArgument(CoilError):
    """The request is malformed: a field is missing, out of range or not parseable."""


class NotFound(CoilError):
    """A named pool, node, block or address does not exist."""


class AlreadyExists(CoilError):
    """A pool of that name exists, or a subnet overlaps a subnet of some pool."""


class FailedPrecondition(CoilError):
    """The current state forbids the change (pool in use, block not held, block not empty)."""


class PoolExhausted(CoilError):
    """The pool has no free block (or address) of the requested family."""


class Conflict(CoilError):
    """The change lost a compare-and-swap race more times than the retry bound allows."""


class Unavailable(CoilError):
    """The store (etcd) cannot be reached or did not answer in time."""


class Internal(CoilError):
    """Something failed that the caller cannot fix by changing the request (a refused route, an
    answer the service did not expect); the message says what."""


class Compacted(CoilError):
    """A watch asked for history the store has compacted away: the caller must read the current
    state afresh (a list) and watch from the revision of that read."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision
