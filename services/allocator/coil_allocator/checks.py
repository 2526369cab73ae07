"""The store check behind `coilctl check`: run the audit (`coil_allocator.audit`) over one
snapshot of every key under the prefix, and apply its repairs.

Owns nothing in etcd of its own. Each repair is the transaction its finding carries, applied only
if the keys it read are unchanged; it is not retried (a changed key means: check again).
"""

from __future__ import annotations

from coil_allocator.audit import Finding, Snapshot, audit
from coil_allocator.common import Part
from coil_allocator.keys import Unreadable


class StoreCheck(Part):
    """Audit the store and apply the safe repairs."""

    def check_store(self, repair: bool, empty_grace: int = 600) -> tuple[list[Finding], int]:
        """Audit every key under the prefix at one revision; with `repair`, apply the safe
        repairs (each its own transaction, applied only if what it read is unchanged).

        Returns the findings (with what was repaired) and the revision read. A key that cannot
        be read is a finding of its own (and counted, see `Part._skip`); no repair is built
        from it.
        """
        kvs, revision = self.store.range(self.keys.prefix)
        snap = Snapshot.from_kvs(self.keys, revision, kvs)
        for kind, kv, why in snap.unreadable:
            self._skip(kind, kv.key, Unreadable(why))
        findings = audit(snap, self._now(), empty_grace)
        if repair:
            for finding in findings:
                if finding.repair is None:
                    continue
                result = self.store.txn(finding.repair.compares, finding.repair.ops)
                if result.succeeded:
                    finding.repaired = finding.repair.description
            # A repair may fix another finding too (claiming a block back re-creates its index
            # entry): look again, and call what is gone fixed.
            kvs, revision = self.store.range(self.keys.prefix)
            after = audit(Snapshot.from_kvs(self.keys, revision, kvs), self._now(), empty_grace)
            remaining = {(f.kind, f.subject) for f in after}
            for finding in findings:
                if finding.repair is None or finding.repaired:
                    continue
                finding.repaired = (
                    "fixed by another repair"
                    if (finding.kind, finding.subject) not in remaining
                    else "not repaired: the keys changed meanwhile; run the check again"
                )
        return findings, revision
