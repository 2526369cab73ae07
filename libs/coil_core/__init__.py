"""coil's shared core: what the allocator, the node agent and coilctl all need, with no I/O.

- `coil_core.rules`: the input rules (names, attachments, subnets, addresses), defined once;
- `coil_core.blocks`: address, network and block arithmetic, and `BlockAddresses`, the choice of
  an address inside a block;
- `coil_core.model`: the value types (pools, held blocks, owners, records, requests, results);
- `coil_core.errors`: the domain errors both services raise;
- `coil_core.flags`: command lines whose flags can come from the environment.

It imports nothing of the project and nothing outside the standard library (an import-linter
contract in `make lint` says so): no etcd, gRPC or netlink.
"""
