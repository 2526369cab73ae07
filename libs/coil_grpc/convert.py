"""The allocator API's messages to and from coil's core values, both ways, in one place.

The allocator's servicer turns core values into messages (`pool_pb`, `block_pb`, ...); coild's
client turns messages back into core values (`pool_from`, `block_from`, ...), so neither side's
logic ever sees a generated class. Messages from the allocator are trusted to be well formed (it
validated them); requests from clients are validated by the servicer with `coil_core.rules`.
"""

from __future__ import annotations

import functools
import ipaddress

from coil.v1 import allocator_pb2 as pb
from coil_core.blocks import Network
from coil_core.model import (
    AllocationRecord,
    Family,
    HeldBlock,
    NodeChange,
    Owner,
    Pool,
    RecordOutcome,
    RecordRequest,
    RecordResult,
    ReleaseOutcome,
    ReleaseRequest,
    ReleaseResult,
)

FAMILY_TO_PB = {Family.IPV4: pb.FAMILY_IPV4, Family.IPV6: pb.FAMILY_IPV6}
FAMILY_FROM_PB = {v: k for k, v in FAMILY_TO_PB.items()}
RECORD_OUTCOME_TO_PB = {
    RecordOutcome.RECORDED: pb.RECORD_OUTCOME_RECORDED,
    RecordOutcome.EXISTING: pb.RECORD_OUTCOME_EXISTING,
    RecordOutcome.ADDRESS_IN_USE: pb.RECORD_OUTCOME_ADDRESS_IN_USE,
    RecordOutcome.BLOCK_NOT_HELD: pb.RECORD_OUTCOME_BLOCK_NOT_HELD,
    RecordOutcome.INVALID: pb.RECORD_OUTCOME_INVALID,
}
RECORD_OUTCOME_FROM_PB = {v: k for k, v in RECORD_OUTCOME_TO_PB.items()}
RELEASE_OUTCOME_TO_PB = {
    ReleaseOutcome.RELEASED: pb.RELEASE_OUTCOME_RELEASED,
    ReleaseOutcome.NOT_RECORDED: pb.RELEASE_OUTCOME_NOT_RECORDED,
    ReleaseOutcome.OWNER_MISMATCH: pb.RELEASE_OUTCOME_OWNER_MISMATCH,
    ReleaseOutcome.INVALID: pb.RELEASE_OUTCOME_INVALID,
}
RELEASE_OUTCOME_FROM_PB = {v: k for k, v in RELEASE_OUTCOME_TO_PB.items()}

# -- core values to messages (the allocator's answers, coild's requests) --------------------


def pool_pb(pool: Pool) -> pb.Pool:
    return pb.Pool(
        name=pool.name, subnets=[str(s) for s in pool.subnets], block_size_bits=pool.block_bits
    )


def block_pb(block: HeldBlock) -> pb.Block:
    return pb.Block(
        pool=block.pool,
        cidr=str(block.cidr),
        node=block.node,
        used=block.used,
        capacity=block.capacity,
        claim_revision=block.claim_revision,
        claimed_at=block.claimed_at,
    )


def owner_pb(owner: Owner) -> pb.Owner:
    return pb.Owner(
        namespace=owner.namespace,
        pod=owner.pod,
        container_id=owner.container_id,
        interface=owner.interface,
    )


def record_pb(record: AllocationRecord) -> pb.AllocationRecord:
    return pb.AllocationRecord(
        address=str(record.address),
        pool=record.pool,
        block=str(record.block),
        node=record.node,
        owner=owner_pb(record.owner),
        created_at=record.created_at,
    )


def record_result_pb(result: RecordResult) -> pb.RecordResult:
    out = pb.RecordResult(outcome=RECORD_OUTCOME_TO_PB[result.outcome], message=result.message)
    if result.record is not None:
        out.record.CopyFrom(record_pb(result.record))
    return out


def release_result_pb(result: ReleaseResult) -> pb.ReleaseResult:
    return pb.ReleaseResult(outcome=RELEASE_OUTCOME_TO_PB[result.outcome], message=result.message)


def record_item_pb(request: RecordRequest) -> pb.RecordItem:
    return pb.RecordItem(
        address=str(request.address),
        pool=request.pool,
        block=str(request.block),
        owner=owner_pb(request.owner),
    )


def release_item_pb(request: ReleaseRequest) -> pb.ReleaseItem:
    return pb.ReleaseItem(
        address=str(request.address),
        container_id=request.container_id,
        interface=request.interface,
    )


def node_change_pb(change: NodeChange) -> pb.WatchNodeResponse:
    return pb.WatchNodeResponse(
        snapshot=change.snapshot,
        revision=change.revision,
        pools=[pool_pb(p) for p in change.pools],
        deleted_pools=list(change.deleted_pools),
        blocks=[block_pb(b) for b in change.blocks],
        released_blocks=[block_pb(b) for b in change.released_blocks],
        records=[record_pb(r) for r in change.records],
        released_records=[record_pb(r) for r in change.released_records],
        lease_lost=change.lease_lost,
    )


# -- messages to core values (coild's view of the allocator's answers) -----------------------


@functools.lru_cache(maxsize=4096)  # a node's few blocks come back in every record answer
def _network(text: str) -> Network:
    return ipaddress.ip_network(text)


def pool_from(message: pb.Pool) -> Pool:
    return Pool(
        message.name,
        tuple(_network(s) for s in message.subnets),
        message.block_size_bits,
    )


def block_from(message: pb.Block) -> HeldBlock:
    cidr = _network(message.cidr)
    return HeldBlock(
        message.pool,
        cidr,
        message.node,
        message.claim_revision,
        message.claimed_at,
        message.used,
        int(cidr.num_addresses) - message.capacity,
    )


def record_from(message: pb.AllocationRecord) -> AllocationRecord:
    owner = message.owner
    return AllocationRecord(
        ipaddress.ip_address(message.address),
        message.pool,
        _network(message.block),
        message.node,
        Owner(owner.namespace, owner.pod, owner.container_id, owner.interface),
        message.created_at,
    )


def record_result_from(message: pb.RecordResult) -> RecordResult:
    """An outcome the client does not know (a newer allocator) reads as INVALID."""
    return RecordResult(
        RECORD_OUTCOME_FROM_PB.get(message.outcome, RecordOutcome.INVALID),
        record_from(message.record) if message.HasField("record") else None,
        message.message,
    )


def release_result_from(message: pb.ReleaseResult) -> ReleaseResult:
    """An outcome the client does not know (a newer allocator) reads as INVALID."""
    return ReleaseResult(
        RELEASE_OUTCOME_FROM_PB.get(message.outcome, ReleaseOutcome.INVALID), message.message
    )


def node_change_from(message: pb.WatchNodeResponse) -> NodeChange:
    return NodeChange(
        revision=int(message.revision),
        pools=tuple(pool_from(p) for p in message.pools),
        deleted_pools=tuple(message.deleted_pools),
        blocks=tuple(block_from(b) for b in message.blocks),
        released_blocks=tuple(block_from(b) for b in message.released_blocks),
        records=tuple(record_from(r) for r in message.records),
        released_records=tuple(record_from(r) for r in message.released_records),
        lease_lost=message.lease_lost,
        snapshot=message.snapshot,
    )
