"""Per-client detector state across rebalances and restarts, through Redis.

Kafka partitions keyed by client give each worker a disjoint set of clients,
so their detector and policy state lives in the worker's memory. When a client
first shows up in a batch its snapshot is loaded (``load_new``). When its
partition is revoked its state is saved and dropped (``hand_over``); when the
worker stops it is saved (``snapshot``). Either way the next owner starts
from the client's history instead of from nothing.

Between those moments ``maintain`` runs after every batch: every
``worker.checkpoint_interval_s`` it saves the clients seen since the last
save (so a worker that dies without a hand-over costs at most that much
history), and it saves and drops clients silent for ``worker.client_idle_s``
(so memory follows the active clients, not every client ever seen; a
returning client is loaded again like a new one). A save Redis refuses
keeps its clients (in memory, still to be saved) and pauses every save until
the next interval, so an outage neither erases history nor makes each batch
wait out a Redis timeout.

Restoring and dumping state is CPU work (measured on the shared 2-core
machine with the digits model, 21.9 KiB snapshots: 1.0 ms per client to
restore, so 0.3 s for a rebalance handing 300 clients over, and 60 µs per
client to dump), so it runs in the default executor, never on the event
loop, and each step awaits it to the end. That keeps the worker's ordering:
a batch's new clients are restored before the batch is scored, and nothing
else touches the scorer meanwhile, because the worker awaits a batch's
steps one after another and a revoke waits for the batch in flight. A step
cancelled while its thread runs waits for the thread before it ends.

No Kafka I/O happens here; the worker decides when to call each step.
"""

from __future__ import annotations

import logging
import time

from aiokafka import TopicPartition

from gateway.batch import BatchItem
from gateway.config import WorkerConfig
from gateway.enforce import decided_without_store
from gateway.errors import StoreError
from gateway.metrics import WorkerMetrics
from gateway.offloop import in_thread
from gateway.scoring import Scorer
from gateway.store import CounterStore

logger = logging.getLogger(__name__)

# How long a saved snapshot waits for the next owner, in seconds (7 days).
_STATE_TTL_S = 7 * 86_400
# After a failed save, how long, in seconds, saves pause when checkpoints are
# off (``checkpoint_interval_s`` 0); otherwise they pause for one interval.
_SAVE_RETRY_S = 30.0


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
        self,
        store: CounterStore,
        scorer: Scorer,
        metrics: WorkerMetrics,
        config: WorkerConfig | None = None,
    ) -> None:
        self._store = store
        self._scorer = scorer
        self._metrics = metrics
        self._config = config or WorkerConfig()
        self._client_tp: dict[str, TopicPartition] = {}
        # Monotonic time each client was last in a batch; oldest first,
        # because a client seen again is moved to the end.
        self._last_seen: dict[str, float] = {}
        # Clients scored since their last save, in the order first seen.
        self._dirty: dict[str, None] = {}
        self._last_checkpoint = time.monotonic()
        # Monotonic time before which no save is tried, after one failed.
        self._saves_paused_until = 0.0

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
        self._note_seen(items)
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
        if blobs:
            # Off the loop (see the module docstring), and awaited: the batch
            # that brought these clients is scored only after it returns.
            await in_thread(lambda: self._restore_all(blobs))

    def _restore_all(self, blobs: dict[str, bytes]) -> None:
        for client_id, blob in blobs.items():
            self._scorer.restore(client_id, blob)

    def _note_seen(self, items: list[BatchItem]) -> None:
        # A client whose snapshot did not load is marked too, but only held
        # clients are ever saved, so its empty state never overwrites it.
        now = time.monotonic()
        for item in items:
            if item.key is None:
                continue
            client_id = item.key.client_id
            self._last_seen.pop(client_id, None)
            self._last_seen[client_id] = now
            self._dirty[client_id] = None

    async def maintain(self, now: float | None = None) -> None:
        """Save the clients seen since the last checkpoint when one is due,
        and save then drop clients idle for ``client_idle_s``; at most
        ``checkpoint_max_clients`` saves per call. Redis failures are logged
        (see :meth:`snapshot`), never raised; the clients of a failed save
        stay in memory and are saved again once the pause it starts is over
        (one ``checkpoint_interval_s``)."""
        now = time.monotonic() if now is None else now
        if now < self._saves_paused_until:
            return
        budget = self._config.checkpoint_max_clients
        idle_before = now - self._config.client_idle_s
        idle: list[str] = []
        for client_id, seen in self._last_seen.items():
            if seen > idle_before or len(idle) >= budget:
                break
            idle.append(client_id)
        if idle:
            saved = await self.snapshot([c for c in idle if c in self._client_tp])
            # Clients never held (their snapshot did not load) have nothing
            # worth keeping; held ones stay until their history is in Redis.
            for client_id in idle:
                if saved or client_id not in self._client_tp:
                    self.forget(client_id)
            if not saved:
                self._pause_saves(now)
                return
            logger.info("idle clients saved and dropped", extra={"clients": len(idle)})
            budget -= len(idle)
        interval_s = self._config.checkpoint_interval_s
        due = interval_s > 0 and now - self._last_checkpoint >= interval_s
        if not due or budget <= 0:
            return
        chunk = [c for c in list(self._dirty)[:budget] if c in self._client_tp]
        for client_id in list(self._dirty)[:budget]:
            del self._dirty[client_id]
        if not await self.snapshot(chunk):
            # Still unsaved: first in line at the next attempt.
            self._dirty = dict.fromkeys([*chunk, *self._dirty])
            self._last_checkpoint = now
            self._pause_saves(now)
            return
        if not self._dirty:
            # The whole backlog is saved: the next checkpoint is a full
            # interval away; until then each batch saves another chunk.
            self._last_checkpoint = now
        if chunk:
            logger.debug("clients checkpointed", extra={"clients": len(chunk)})

    def _pause_saves(self, now: float) -> None:
        interval_s = self._config.checkpoint_interval_s
        self._saves_paused_until = now + (
            interval_s if interval_s > 0 else _SAVE_RETRY_S
        )

    async def snapshot(self, client_ids: list[str]) -> bool:
        """Save these clients' state for their next owner; a Redis failure is
        logged and costs only their history.

        Returns
        -------
        bool
            False when Redis refused the save, True otherwise (nothing to
            save included).
        """
        if not client_ids:
            return True
        blobs = await in_thread(lambda: {c: self._scorer.dump(c) for c in client_ids})
        try:
            await self._store.save_states(blobs, _STATE_TTL_S)
        except StoreError:
            logger.warning(
                "detector state of %d clients not saved",
                len(blobs),
                extra={"clients": len(blobs)},
            )
            return False
        return True

    def forget(self, client_id: str) -> None:
        """Drop a client's state from memory (after its snapshot)."""
        self._client_tp.pop(client_id, None)
        self._last_seen.pop(client_id, None)
        self._dirty.pop(client_id, None)
        self._scorer.forget(client_id)
        self._metrics.clients.set(len(self._client_tp))
