"""Per-client detector state across rebalances and restarts, through Redis.

Kafka partitions keyed by client give each worker a disjoint set of clients,
so their detector and policy state lives in the worker's memory. When a client
first shows up in a batch its snapshot is loaded (``load_new``). When its
partition is revoked its state is saved and dropped (``hand_over``); when the
worker stops it is saved (``snapshot``). Either way the next owner starts
from the client's history instead of from nothing.

No Kafka I/O happens here; the worker decides when to call each step.
"""

from __future__ import annotations

import logging

from aiokafka import TopicPartition

from gateway.batch import BatchItem
from gateway.enforce import decided_without_store
from gateway.errors import StoreError
from gateway.metrics import WorkerMetrics
from gateway.scoring import Scorer
from gateway.store import CounterStore

logger = logging.getLogger(__name__)

# How long a saved snapshot waits for the next owner, in seconds (7 days).
_STATE_TTL_S = 7 * 86_400


class ClientStates:
    """The clients a worker holds state for, and the partition of each.

    Parameters
    ----------
    store
        Where snapshots are saved and loaded.
    scorer
        Holds the clients' detector and policy state in memory.
    metrics
        The ``clients`` gauge follows the number of clients held.
    """

    def __init__(
        self, store: CounterStore, scorer: Scorer, metrics: WorkerMetrics
    ) -> None:
        self._store = store
        self._scorer = scorer
        self._metrics = metrics
        self._client_tp: dict[str, TopicPartition] = {}

    def held(self) -> list[str]:
        """Every client this worker holds state for."""
        return list(self._client_tp)

    async def hand_over(self, partitions: set[TopicPartition]) -> list[str]:
        """Snapshot, then forget, the clients of these (revoked) partitions.

        Returns
        -------
        list of str
            The ids of the clients handed over.
        """
        leaving = [c for c, tp in self._client_tp.items() if tp in partitions]
        try:
            await self.snapshot(leaving)
        finally:
            for client_id in leaving:
                self.forget(client_id)
        return leaving

    async def load_new(self, items: list[BatchItem]) -> None:
        """Bring in the snapshot of clients this worker sees for the first time
        (after a rebalance or restart), in one round trip.

        Raises
        ------
        StoreError
            Redis is unreachable and the batch was admitted with it (the batch
            is retried): marking the clients known with empty state would let
            the next revoke erase their history.
        """
        new = {
            i.key.client_id: TopicPartition(i.topic, i.partition)
            for i in items
            if i.key is not None and i.key.client_id not in self._client_tp
        }
        if not new:
            return
        # Admitted without Redis (fail modes open or closed): the clients are
        # served with fresh detector state and stay unknown, so a later batch
        # loads their snapshot.
        try:
            blobs = await self._store.load_states(list(new))
        except StoreError:
            if not decided_without_store(items):
                raise
            logger.warning(
                "detector state of new clients not loaded", extra={"clients": len(new)}
            )
            return
        self._client_tp.update(new)
        self._metrics.clients.set(len(self._client_tp))
        for client_id, blob in blobs.items():
            self._scorer.restore(client_id, blob)

    async def snapshot(self, client_ids: list[str]) -> None:
        """Save these clients' state for their next owner; a Redis failure is
        logged and costs only their history."""
        if not client_ids:
            return
        blobs = {c: self._scorer.dump(c) for c in client_ids}
        try:
            await self._store.save_states(blobs, _STATE_TTL_S)
        except StoreError:
            logger.warning(
                "detector state of %d clients not saved",
                len(blobs),
                extra={"clients": len(blobs)},
            )

    def forget(self, client_id: str) -> None:
        """Drop a client's state from memory (after its snapshot)."""
        self._client_tp.pop(client_id, None)
        self._scorer.forget(client_id)
        self._metrics.clients.set(len(self._client_tp))
