"""Import grpc without the asyncio machinery a synchronous unary call never touches: one of the
start-up options the bench measures on the floor plugin (coil's own plugin no longer imports grpc).

``import grpc`` imports ``grpc.aio`` and, through the compiled core, ``asyncio``: about 45 ms of a
grpcio client's ~130 ms start on this project's machines, paid by every pod for code a synchronous
client never runs. ``defer_asyncio()`` puts stand-ins for both in ``sys.modules`` before grpc is
imported. A stand-in is an empty module object whose first attribute lookup imports the real module
(removing the stand-in from ``sys.modules`` first) and answers from it, so anything that does use
asyncio or grpc.aio later still works, only without the saving. (``importlib.util.LazyLoader``
cannot do this: the import statement itself reads ``__spec__`` of a module found in
``sys.modules``, which makes a lazy module load at once.)
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

DEFERRED = ("asyncio", "grpc.aio")


class _StandIn(types.ModuleType):
    """Takes the place of a module until one of its attributes is read."""

    def __getattr__(self, attr: str) -> Any:
        name = self.__name__
        if sys.modules.get(name) is self:
            del sys.modules[name]
        real = importlib.import_module(name)
        return getattr(real, attr)


def defer_asyncio() -> None:
    """Install the stand-ins, unless asyncio or grpc is already imported (then it is too late to
    save anything and the real modules must stay)."""
    if any(name in sys.modules for name in ("asyncio", "grpc")):
        return
    for name in DEFERRED:
        sys.modules[name] = _StandIn(name)
