"""Groups of API keys acting as one attacker, across workers.

After a batch is scored, :class:`CrossClient` sends its fingerprints to the
Redis store shared by all workers (:mod:`gateway.fingerprints`), counts the
near-duplicates each client shares with every other in a
:class:`detectors.linking.KeyLinks`, and writes each client's group and the
group's risk (the largest risk of any member) on its items, so that the
decision record carries ``group_id`` and ``group_risk`` for policy to act on.

Round trips per batch: one ``EVALSHA`` for the fingerprints, one pipeline for
links and risks. The script blocks the shared Redis while it runs (about
0.5 ms per row on the loaded development machine), so only rows worth it go
(:func:`select_rows`): those the worker's own store already found
near-duplicates of, and a sample of the rest, at most
``cross_client.store_max_rows`` per batch. Fail-open: if Redis fails here the
batch is still answered with the per-worker detectors' judgement, and a
warning is logged; the admission step already fails the batch when Redis is
down for good.

Region links (:mod:`detectors.region`, ``docs/region-links.md``): the rows
the scorer counted (``ood`` outliers in a region the reference rarely
visits) go to the Redis region store (:mod:`gateway.regions`, one more
``EVALSHA`` per batch, only when the batch has such rows); a pair of clients
gets a report per counted row of one in a region where the other stored one
within ``link_window_s``. Those reports are counted in a :class:`KeyLinks` of
their own (threshold ``region_min_shared``), whose links join the
fingerprint links in one union-find, so a group is one group whatever linked
it.

Known shortcoming: each worker keeps its own union-find. It learns links made
elsewhere one hop at a time (the neighbours of its own batch's clients, read
from Redis), so two workers can briefly disagree about a group's membership
and id until their clients' next batches.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pydantic

from detectors.linking import KeyLinks, group_risk
from detectors.region import region_reports
from gateway.batch import BatchItem
from gateway.config import CrossClientConfig, Settings
from gateway.errors import StoreError
from gateway.fingerprints import RedisFingerprintStore
from gateway.liveconfig.document import LIVE_LINK_FIELDS
from gateway.regions import RedisRegionStore
from gateway.store import RedisClient, redis_guard

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class FingerprintBatch:
    """The fingerprints one model's detectors computed for a batch.

    ``remember`` says per row whether the shared store should keep it (the
    scorer keeps every row, as the per-worker store does).
    """

    model: str
    client_ids: list[str]
    hashes: npt.NDArray[np.uint64]
    remember: list[bool]
    match_threshold: int
    input_keys: npt.NDArray[np.uint64] | None = None
    local_near: npt.NDArray[np.bool_] | None = None
    """Per row, whether the worker's own store found a near-duplicate of it
    (the client's own or another client's; an exact copy of a popular input
    does not count); ``None``: unknown, every row is a candidate for the
    shared store."""


@dataclass(frozen=True, slots=True)
class RegionBatch:
    """The counted rows of one model's batch (``gateway.scoring``): per row,
    its client and coarse region id (:class:`detectors.region.RegionMap`)."""

    model: str
    client_ids: list[str]
    regions: npt.NDArray[np.uint64]


def select_rows(
    batch: FingerprintBatch, *, sample_every: int, max_rows: int
) -> npt.NDArray[np.int64]:
    """Rows of ``batch`` worth sending to the shared store, in row order.

    Rows with a local near-duplicate come first, then a sample of the others
    (input key divisible by ``sample_every``; every row when the keys are
    unknown), at most ``max_rows`` in all, so a batch costs Redis a bounded
    time whatever its size.

    Known shortcoming: a row left out is neither compared nor stored, so an
    attack that sends each near-duplicate to a different worker, and never
    two to the same one, is seen only through the sample.
    """
    n = len(batch.client_ids)
    if batch.local_near is None:
        near = np.ones(n, dtype=bool)
    else:
        near = np.asarray(batch.local_near, dtype=bool)
    if batch.input_keys is None or sample_every == 1:
        sampled = np.ones(n, dtype=bool)
    else:
        sampled = np.asarray(batch.input_keys, dtype=np.uint64) % np.uint64(
            sample_every
        ) == np.uint64(0)
    first = np.flatnonzero(near)[:max_rows]
    extra = np.flatnonzero(sampled & ~near)[: max_rows - len(first)]
    chosen: npt.NDArray[np.int64] = np.sort(np.concatenate([first, extra]))
    return chosen


class CrossClient:
    """Cross-worker fingerprint store, key links and group risk.

    Parameters
    ----------
    redis
        The worker's Redis client.
    settings
        ``cross_client`` and ``redis`` sections.
    """

    def __init__(self, redis: RedisClient, settings: Settings) -> None:
        self._redis = redis
        self._config = settings.cross_client
        # The settings file's values: what a live document without a
        # ``links`` section means.
        self._file_config = settings.cross_client
        self._prefix = settings.redis.key_prefix
        self._timeout_s = settings.redis.socket_timeout_s
        self._stores: dict[int, RedisFingerprintStore] = {}
        self.links = KeyLinks(
            min_shared=self._config.link_min_shared,
            window_s=self._config.link_window_s,
            link_ttl_s=self._config.link_ttl_s,
        )
        # Region reports have their own threshold, so they are counted apart;
        # a pair they link is linked in ``links`` too (one union-find).
        self.region_links = KeyLinks(
            min_shared=self._config.region_min_shared,
            window_s=self._config.link_window_s,
            link_ttl_s=self._config.link_ttl_s,
        )
        self._regions = RedisRegionStore(
            redis,
            self._prefix,
            ttl_s=self._config.link_window_s,
            entries_per_region=self._config.region_entries,
            timeout_s=self._timeout_s,
        )
        # Until this time (epoch seconds) a batch caps its clients' link sets
        # in Redis at the current link_ttl_s: set when a live change shortens
        # it, for as long as a set written under the old value can live.
        self._cap_links_until_s = 0.0

    @property
    def config(self) -> CrossClientConfig:
        """The cross-client settings in force (live ones included)."""
        return self._config

    def merged(self, links: Mapping[str, Any] | None) -> CrossClientConfig:
        """The settings file's ``[cross_client]`` with a live document's
        ``links`` section over it (``None``: the file's values); raises
        ``ValueError`` naming the field when a value breaks its bounds."""
        try:
            return CrossClientConfig.model_validate(
                {**self._file_config.model_dump(), **(links or {})}
            )
        except pydantic.ValidationError as exc:
            raise ValueError(
                "; ".join(
                    f"links.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"
                    for err in exc.errors()
                )
            ) from exc

    def reconfigure(self, config: CrossClientConfig) -> None:
        """Take new live cross-client settings between batches.

        Counts and links are kept (:meth:`KeyLinks.reconfigure` says when each
        new rule bites). The region store reads rows within the new
        ``link_window_s`` from the next batch on. Fields that shape the shared
        stores (``fingerprint_ttl_s``, ``entries_per_hash``,
        ``region_entries``) and the region map (``region_components``,
        ``region_cell_sd``) must equal the running ones: ``ValueError``
        otherwise, changing nothing.

        A shortened ``link_ttl_s`` also reaches the link sets already in
        Redis: for as long as a set written under the old value can live,
        each batch caps its clients' sets at the new TTL (``PEXPIRE ... LT``)
        before adopting links from them, so a link outlives the new TTL only
        by the time until its client's next batch on this worker.
        """
        # Every field outside the live document's must stay as it runs.
        for name in CrossClientConfig.model_fields:
            if name in LIVE_LINK_FIELDS:
                continue
            if getattr(config, name) != getattr(self._config, name):
                raise ValueError(f"cross_client.{name}: cannot change while running")
        # Checked before either KeyLinks changes (a model_copy skips the
        # model's own bounds).
        if (
            min(config.link_min_shared, config.region_min_shared) < 1
            or config.link_window_s <= 0
            or config.link_ttl_s <= 0
        ):
            raise ValueError(
                "link_min_shared, region_min_shared, link_window_s and "
                "link_ttl_s must be positive"
            )
        self.links.reconfigure(
            min_shared=config.link_min_shared,
            window_s=config.link_window_s,
            link_ttl_s=config.link_ttl_s,
        )
        self.region_links.reconfigure(
            min_shared=config.region_min_shared,
            window_s=config.link_window_s,
            link_ttl_s=config.link_ttl_s,
        )
        self._regions.ttl_ms = max(1, round(config.link_window_s * 1000))
        if config.link_ttl_s < self._config.link_ttl_s:
            self._cap_links_until_s = max(
                self._cap_links_until_s, time.time() + self._config.link_ttl_s
            )
        self._config = config

    def _store(self, match_threshold: int) -> RedisFingerprintStore:
        store = self._stores.get(match_threshold)
        if store is None:
            store = RedisFingerprintStore(
                self._redis,
                self._prefix,
                match_threshold=match_threshold,
                ttl_s=self._config.fingerprint_ttl_s,
                entries_per_hash=self._config.entries_per_hash,
                timeout_s=self._timeout_s,
            )
            self._stores[match_threshold] = store
        return store

    def _client_key(self, client_id: str, suffix: str) -> str:
        return f"{self._prefix}:{{c:{client_id}}}:{suffix}"

    async def after_scoring(
        self,
        items: Sequence[BatchItem],
        batches: Sequence[FingerprintBatch],
        regions: Sequence[RegionBatch] = (),
    ) -> None:
        """Update the shared stores and links; set ``group_id``/``group_risk``
        on every scored item. Never raises for a Redis failure."""
        if not self._config.enabled:
            return
        try:
            await self._after_scoring(items, batches, regions)
        except StoreError as exc:
            logger.warning(
                "cross-client step skipped: %s", exc, extra={"items": len(items)}
            )

    async def _region_links(
        self, regions: Sequence[RegionBatch], now_s: float
    ) -> list[tuple[str, str]]:
        """Send the counted rows to the region store; return the pairs they
        linked, after linking them in ``links``."""
        if not self._config.region_enabled:
            return []
        reports: dict[tuple[str, str], int] = defaultdict(int)
        for batch in regions:
            n = min(len(batch.client_ids), self._config.region_max_rows)
            if not n:
                continue
            clients = batch.client_ids[:n]
            others = await self._regions.observe(
                batch.model, clients, batch.regions[:n]
            )
            for pair, count in region_reports(clients, others).items():
                reports[pair] += count
        if not reports:
            return []
        new_links = self.region_links.observe(
            ((a, b, n) for (a, b), n in reports.items()), now_s
        )
        for a, b in new_links:
            logger.info(
                "linked keys %s and %s",
                a,
                b,
                extra={"client": a, "linked": b, "via": "region", "detector": "region"},
            )
        # A pair still reported keeps its link alive in the shared union-find.
        live = set(self.region_links.links())
        for a, b in reports:
            pair = (a, b) if a < b else (b, a)
            if pair in live:
                self.links.link(*pair, now_s=now_s)
        return new_links

    async def _after_scoring(
        self,
        items: Sequence[BatchItem],
        batches: Sequence[FingerprintBatch],
        regions: Sequence[RegionBatch] = (),
    ) -> None:
        now_s = time.time()
        reports: dict[tuple[str, str], int] = defaultdict(int)
        for batch in batches:
            rows = select_rows(
                batch,
                sample_every=self._config.store_sample_every,
                max_rows=self._config.store_max_rows,
            )
            if not rows.size:
                continue
            client_ids = [batch.client_ids[r] for r in rows.tolist()]
            matches = await self._store(batch.match_threshold).observe(
                client_ids,
                batch.hashes[rows],
                [batch.remember[r] for r in rows.tolist()],
                None if batch.input_keys is None else batch.input_keys[rows],
            )
            for client, match in zip(client_ids, matches, strict=True):
                for other in match.others:
                    # One report per query: how many of the other's entries
                    # matched says more about the attack's density than about
                    # the link.
                    reports[(client, other)] += 1
        new_links = self.links.observe(
            ((a, b, n) for (a, b), n in reports.items()), now_s
        )
        for a, b in new_links:
            logger.info("linked keys %s and %s", a, b, extra={"client": a, "linked": b})
        new_links += [
            pair
            for pair in await self._region_links(regions, now_s)
            if pair not in new_links
        ]

        # Latest risk of each client of this batch (its worst query).
        risks: dict[str, float] = {}
        for item in items:
            owner = item.client_id
            if owner is None or item.verdict is None:
                continue
            # The enforced risk, without detectors in shadow: a shadowed
            # detector must not block a client through its group.
            risks[owner] = max(risks.get(owner, 0.0), item.verdict.enforced_risk)
        if not risks:
            return
        clients = sorted(risks)
        members = {c: self.links.members(c) for c in clients}
        others = sorted({m for group in members.values() for m in group} - set(risks))

        ttl_ms = max(1, round(self._config.risk_ttl_s * 1000))
        link_ttl_ms = max(1, round(self._config.link_ttl_s * 1000))
        async with redis_guard("groups", self._timeout_s, self._redis):
            pipe = self._redis.pipeline(transaction=False)
            for a, b in new_links:
                for x, y in ((a, b), (b, a)):
                    key = self._client_key(x, "links")
                    pipe.sadd(key, y)
                    pipe.pexpire(key, link_ttl_ms)
            for client in clients:
                pipe.set(
                    self._client_key(client, "risk"), repr(risks[client]), px=ttl_ms
                )
            if now_s < self._cap_links_until_s:
                for client in clients:
                    key = self._client_key(client, "links")
                    pipe.pexpire(key, link_ttl_ms, lt=True)
            for client in clients:
                pipe.smembers(self._client_key(client, "links"))
            for other in others:
                pipe.get(self._client_key(other, "risk"))
            replies = await pipe.execute()
        tail = replies[len(replies) - len(clients) - len(others) :]
        neighbours, stored = tail[: len(clients)], tail[len(clients) :]
        known = dict(risks)
        for other, raw in zip(others, stored, strict=True):
            if raw is not None:
                known[other] = float(raw)

        # Links other workers made: adopted now, counted in the next batch's
        # group (one hop per batch; see the module docstring).
        for client, found in zip(clients, neighbours, strict=True):
            for raw in found or ():
                other = raw.decode() if isinstance(raw, bytes) else str(raw)
                self.links.link(client, other, now_s=now_s)

        for item in items:
            owner = item.client_id
            if owner is None or owner not in risks:
                continue
            item.group_id = self.links.group_of(owner)
            group = self.links.members(owner)
            # A client alone has no group risk: its own risk coming back as a
            # group score would count its flags twice (policy.note_group's
            # guard misses it once the client's fused risk has decayed a
            # little; the evaluation blocked an honest key that way).
            item.group_risk = group_risk(group, known) if len(group) > 1 else 0.0
