"""The allocator: pools, block claims and allocation records, each change one etcd transaction.

`Allocator` is the thin front the servicer calls; each call is answered by the part that owns
its keys (each module's docstring states its keys and transactions):

- `coil_allocator.pools`: pools (create, add a subnet, list, show, delete) and their usage;
- `coil_allocator.claims`: block claims and releases, with the claim cache;
- `coil_allocator.records`: allocation records (record, release, look up, free), with the pools
  cache;
- `coil_allocator.nodes`: a node's blocks, its heartbeat and lease, releasing a node;
- `coil_allocator.checks`: the store audit and its repairs.

With a `ClusterView` (`coil_allocator.view`, one etcd watch per replica) the pool list and the
liveness checks of a report come from memory; `coil_allocator.feed` serves WatchNode from it.

Every state change is a single transaction guarded by compares on exactly the keys it depends on
(see docs/design.md). When a compare is lost to a concurrent writer the change is retried by its
part, and only there, after re-reading what changed, a bounded number of times with jittered
backoff; then `Conflict` is raised. Store unavailability (`Unavailable`) is never retried here: a
transaction whose reply was lost may have committed, so the caller decides.

All public methods raise the domain errors of `coil_core.errors`: `InvalidArgument`, `NotFound`,
`AlreadyExists`, `FailedPrecondition`, `PoolExhausted`, `Conflict`, `Unavailable`, as the parts'
docstrings say.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from coil_allocator.checks import StoreCheck
from coil_allocator.claims import Claims
from coil_allocator.common import AllocatorEvents, Context, NoEvents
from coil_allocator.keys import Keys
from coil_allocator.nodes import NODE_TTL, Nodes
from coil_allocator.pools import Pools
from coil_allocator.records import Records
from coil_allocator.store import Store
from coil_allocator.view import ClusterView


class Allocator:
    """Pools, blocks and records over a `Store`. Thread-safe; replicas may run side by side."""

    def __init__(
        self,
        store: Store,
        prefix: str = "/coil/",
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        events: AllocatorEvents | None = None,
        sleep: Callable[[float], None] = time.sleep,
        node_ttl: int = NODE_TTL,
        view: ClusterView | None = None,
    ) -> None:
        self.store = store
        self.keys = Keys(prefix)
        self.view = view
        self.node_ttl = node_ttl
        context = Context(
            store, self.keys, clock, rng or random.Random(), events or NoEvents(), sleep, view=view
        )
        self.pools = Pools(context)
        self.claims = Claims(context)
        self.records = Records(context)
        self.nodes = Nodes(context, self.claims, node_ttl)
        self.checks = StoreCheck(context)
        # The calls the servicer makes, each bound to the part that owns it.
        self.create_pool = self.pools.create_pool
        self.add_subnet = self.pools.add_subnet
        self.list_pools = self.pools.list_pools
        self.get_pool = self.pools.get_pool
        self.delete_pool = self.pools.delete_pool
        self.usage = self.pools.usage
        self.claim_block = self.claims.claim_block
        self.claim_specific_block = self.claims.claim_specific_block
        self.release_block = self.claims.release_block
        self.record = self.records.record
        self.release = self.records.release
        self.address_info = self.records.address_info
        self.free_address = self.records.free_address
        self.node_blocks = self.nodes.node_blocks
        self.node_blocks_page = self.nodes.node_blocks_page
        self.release_node = self.nodes.release_node
        self.report_node = self.nodes.report_node
        self.check_store = self.checks.check_store
