"""Links between API keys that act as one attacker, and their groups.

An attacker with many API keys spreads one search over them, so no single key
looks busy. Their queries still land near each other: the fingerprint store
(:mod:`detectors.fingerprint`) reports, per query, which other clients sent a
near-duplicate. :class:`KeyLinks` counts those reports per pair of clients in
a time window, links a pair once the count reaches a threshold, and keeps the
linked clients as groups (union-find) so that policy can score and act on a
group as one client.

Pure Python; nothing from Kafka, Redis, FastAPI or ``gateway``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass(slots=True)
class _PairCount:
    count: int
    first_s: float


class KeyLinks:
    """Pair counts, links and groups of clients.

    A pair's count restarts when its first report is older than ``window_s``
    (a tumbling window per pair), so slow coincidences between honest clients
    never add up. A link lasts ``link_ttl_s`` after it was last confirmed.

    Parameters
    ----------
    min_shared
        Near-duplicate reports within ``window_s`` that link a pair.
    window_s
        Seconds over which reports of a pair are counted.
    link_ttl_s
        Seconds a link lives after its last report.
    max_pairs
        Pairs counted at once; the oldest are dropped beyond it.

    Examples
    --------
    >>> links = KeyLinks(min_shared=2)
    >>> links.observe([("a", "b", 1), ("b", "c", 2)], now_s=0.0)
    [('b', 'c')]
    >>> links.observe([("a", "b", 1)], now_s=1.0)
    [('a', 'b')]
    >>> links.group_of("c"), links.members("a")
    ('a', ['a', 'b', 'c'])
    """

    def __init__(
        self,
        *,
        min_shared: int = 10,
        window_s: float = 600.0,
        link_ttl_s: float = 3600.0,
        max_pairs: int = 100_000,
    ) -> None:
        if min_shared < 1 or window_s <= 0 or link_ttl_s <= 0 or max_pairs < 1:
            raise ValueError(
                "min_shared, window_s, link_ttl_s and max_pairs must be positive"
            )
        self.min_shared = min_shared
        self.window_s = window_s
        self.link_ttl_s = link_ttl_s
        self.max_pairs = max_pairs
        self._counts: dict[tuple[str, str], _PairCount] = {}
        self._links: dict[tuple[str, str], float] = {}
        self._parent: dict[str, str] = {}
        self._members: dict[str, set[str]] = {}

    # -- updates ------------------------------------------------------------

    def reconfigure(
        self,
        *,
        min_shared: int | None = None,
        window_s: float | None = None,
        link_ttl_s: float | None = None,
    ) -> None:
        """Change thresholds and windows in place, keeping counts and links.

        Nothing is re-judged now; each rule takes effect when its pair is next
        touched. A pair whose count already reaches a lowered ``min_shared``
        is linked at its next report; a link made under a lower threshold
        stays until it expires. A count older than a shortened ``window_s``
        restarts at its pair's next report, and links last confirmed longer
        than a shortened ``link_ttl_s`` ago expire at the next
        :meth:`observe` (a lengthened one keeps those not yet expired).
        Raises ``ValueError`` (changing nothing) for a value out of range.
        """
        new_min = self.min_shared if min_shared is None else min_shared
        new_window = self.window_s if window_s is None else window_s
        new_ttl = self.link_ttl_s if link_ttl_s is None else link_ttl_s
        if new_min < 1 or new_window <= 0 or new_ttl <= 0:
            raise ValueError("min_shared, window_s and link_ttl_s must be positive")
        self.min_shared = new_min
        self.window_s = new_window
        self.link_ttl_s = new_ttl

    def observe(
        self, reports: Iterable[tuple[str, str, int]], now_s: float
    ) -> list[tuple[str, str]]:
        """Count reports ``(client, other, near_duplicates)``; return the pairs
        that became linked (each sorted), in first-linked order."""
        self._expire(now_s)
        linked: list[tuple[str, str]] = []
        for a, b, n in reports:
            if a == b or n <= 0:
                continue
            pair = (a, b) if a < b else (b, a)
            if pair in self._links:
                self._links[pair] = now_s
                continue
            entry = self._counts.pop(pair, None)
            if entry is None or now_s - entry.first_s > self.window_s:
                entry = _PairCount(0, now_s)
            entry.count += n
            if entry.count >= self.min_shared:
                self.link(*pair, now_s=now_s)
                linked.append(pair)
                continue
            self._counts[pair] = entry  # re-inserted: oldest first
            if len(self._counts) > self.max_pairs:
                del self._counts[next(iter(self._counts))]
        return linked

    def link(self, a: str, b: str, *, now_s: float) -> None:
        """Link two clients directly (a link another worker made, say)."""
        if a == b:
            return
        pair = (a, b) if a < b else (b, a)
        self._counts.pop(pair, None)
        self._links[pair] = now_s
        self._union(a, b)

    def forget(self, client_id: str) -> None:
        """Drop every link and count of a client."""
        self._counts = {p: c for p, c in self._counts.items() if client_id not in p}
        kept = {p: t for p, t in self._links.items() if client_id not in p}
        if len(kept) != len(self._links):
            self._links = kept
            self._rebuild()

    # -- queries ------------------------------------------------------------

    def group_of(self, client_id: str) -> str:
        """The group's id: its smallest member (the client itself if alone)."""
        root = self._find(client_id)
        return min(self._members.get(root, {client_id}))

    def members(self, client_id: str) -> list[str]:
        """Every client in the same group, sorted (at least the client)."""
        root = self._find(client_id)
        return sorted(self._members.get(root, {client_id}))

    def links(self) -> list[tuple[str, str]]:
        """Live links, each pair sorted."""
        return sorted(self._links)

    # -- internals ----------------------------------------------------------

    def _expire(self, now_s: float) -> None:
        stale = [p for p, t in self._links.items() if now_s - t > self.link_ttl_s]
        if stale:
            for pair in stale:
                del self._links[pair]
            # Union-find cannot delete an edge: rebuild from the live links.
            self._rebuild()

    def _rebuild(self) -> None:
        self._parent.clear()
        self._members.clear()
        for a, b in self._links:
            self._union(a, b)

    def _find(self, x: str) -> str:
        parent = self._parent
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    def _union(self, a: str, b: str) -> None:
        ra, rb = self._find(a), self._find(b)
        if ra == rb:
            return
        ma = self._members.pop(ra, {ra})
        mb = self._members.pop(rb, {rb})
        if len(ma) < len(mb):
            ra, rb, ma, mb = rb, ra, mb, ma
        self._parent[rb] = ra
        self._parent.setdefault(ra, ra)
        ma |= mb
        self._members[ra] = ma


def group_risk(members: Iterable[str], risks: Mapping[str, float]) -> float:
    """A group's risk: the largest risk of any member (0 for unknown ones).

    The maximum, not a sum: a group is as dangerous as its most suspicious key,
    and summing would let many honest keys linked by chance add up.
    """
    return max((risks.get(m, 0.0) for m in members), default=0.0)
