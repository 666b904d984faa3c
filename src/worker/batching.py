"""Sessions that decode together share batched caches on this worker.

A decode step for B > 1 sessions (one new token each) runs the layers once on
[B, 1, D] with mlx-lm's batch caches (BatchKVCache, BatchRotatingKVCache:
left padding, a cache offset per row, masks that hide the padding). Which
sessions share a batch persists from step to step, so copying KV into a batch
happens only when the membership changes: a session joining is merged in, one
leaving is extracted back into its own caches (or just dropped when it ends).

A session is either on its own (`Session.caches` holds its caches) or a row of
one BatchGroup (`Session.group` is set and `Session.caches` is stale).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlx_cluster.worker.sessions import Session


def can_batch(caches: Sequence[Any]) -> bool:
    """Whether mlx-lm can merge caches of these kinds into batch caches.

    (KVCache and RotatingKVCache can; quantized and chunked caches cannot.)
    """
    return all(hasattr(c, "merge") for c in caches)


class BatchGroup:
    """Sessions decoding together: row i of every batch cache is `members[i]`."""

    def __init__(self, members: list[Session], caches: list[Any]) -> None:
        self.members = members
        self.caches = caches
        for session in members:
            session.group = self
            session.caches = []

    @classmethod
    def merge(cls, sessions: Sequence[Session]) -> BatchGroup:
        """A batch of sessions that are on their own; their caches are copied in."""
        per_layer = zip(*(s.caches for s in sessions), strict=True)
        caches = [type(layer[0]).merge(list(layer)) for layer in per_layer]
        return cls(list(sessions), caches)

    def rows(self, sessions: Sequence[Session]) -> list[int]:
        """The row of each session, in the order given."""
        index = {id(s): i for i, s in enumerate(self.members)}
        return [index[id(s)] for s in sessions]

    def absorb(self, other: BatchGroup) -> None:
        """Append the rows of another batch to this one; `other` is empty afterwards."""
        for mine, theirs in zip(self.caches, other.caches, strict=True):
            mine.extend(theirs)
        self.members.extend(other.members)
        for session in other.members:
            session.group = self
        other.members, other.caches = [], []

    def remove(self, session: Session, keep_caches: bool) -> None:
        """Take a session out of the batch, with its own caches back if `keep_caches`.

        A batch left with one member dissolves: that member gets its caches back,
        so a session stepping alone runs exactly as it would never have been batched.
        """
        row = self.members.index(session)
        if keep_caches:
            session.caches = [c.extract(row) for c in self.caches]
        session.group = None
        keep = [i for i in range(len(self.members)) if i != row]
        self.members.pop(row)
        if len(self.members) == 1:
            last = self.members[0]
            last.caches = [c.extract(keep[0]) for c in self.caches]
            last.group = None
            self.members, self.caches = [], []
        elif self.members:
            for c in self.caches:
                c.filter(keep)


def batch_for(sessions: Sequence[Session]) -> tuple[BatchGroup, list[int]]:
    """The batch holding exactly these sessions, built or reshaped as needed, and their rows.

    Members of the sessions' current batches that are not stepping now leave
    those batches with their caches; the batches that remain are joined, and
    sessions on their own are merged in.
    """
    wanted = {id(s) for s in sessions}
    groups: list[BatchGroup] = []
    for session in sessions:
        if session.group is not None and session.group not in groups:
            groups.append(session.group)
    for group in groups:
        for member in [m for m in group.members if id(m) not in wanted]:
            group.remove(member, keep_caches=True)
    groups = [g for g in groups if g.members]
    base = max(groups, key=lambda g: len(g.members)) if groups else None
    for group in groups:
        if group is not base and base is not None:
            base.absorb(group)
    alone = [s for s in sessions if s.group is None]
    if alone:
        merged = BatchGroup.merge(alone)
        if base is None:
            base = merged
        else:
            base.absorb(merged)
    assert base is not None
    return base, base.rows(sessions)
