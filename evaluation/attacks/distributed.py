"""Spread any attack's queries over several API keys (a distributed attacker).

``SpreadOracle`` is itself a ``QueryFn``: the attack code does not change, and
each of its calls is split row by row over the per-key oracles, round-robin
(row i of the attacker's whole stream goes to key i mod n) or at random. The
keys' shares of a call are sent concurrently, one thread per key, as separate
clients would.

When the gateway refuses one key (blocked, throttled), that key is dropped and
its unanswered rows go to the keys still alive, as a patient attacker who owns
other accounts would do; the attack stops only when every key is refused or
the shared budget is spent.

Imports numpy and the standard library; the per-key oracles are ``QueryFn``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import numpy as np

from evaluation.oracle import BudgetExhausted, QueryFn, QueryRefused, QueryStopped

logger = logging.getLogger(__name__)

Array = np.ndarray[Any, Any]


class SpreadOracle:
    """One oracle over many keys.

    Parameters
    ----------
    oracles
        One ``QueryFn`` per API key.
    budget
        Rows allowed over all keys together.
    mode
        ``round_robin`` or ``random``.
    seed
        Seeds the random assignment.
    n_classes
        Width of the answers.

    Attributes
    ----------
    counts
        Rows answered per key, in ``oracles`` order.
    """

    def __init__(
        self,
        oracles: Sequence[QueryFn],
        *,
        budget: int,
        mode: Literal["round_robin", "random"] = "round_robin",
        seed: int = 0,
        n_classes: int = 10,
    ) -> None:
        if not oracles:
            raise ValueError("at least one oracle is needed")
        self._oracles = list(oracles)
        self._alive = [True] * len(oracles)
        self._mode = mode
        self._rng = np.random.default_rng(seed)
        self._next = 0
        self._budget_left = budget
        self._n_classes = n_classes
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(
            max_workers=len(oracles), thread_name_prefix="spread"
        )
        self.counts = [0] * len(oracles)
        self.refusals: dict[int, str] = {}

    def close(self) -> None:
        """Stop the threads that send each key's share."""
        self._pool.shutdown(wait=True)

    def _assign(self, n_rows: int) -> Array:
        live = np.flatnonzero(self._alive)
        if self._mode == "random":
            return np.asarray(self._rng.choice(live, size=n_rows))
        slots = (self._next + np.arange(n_rows)) % len(live)
        self._next = int((self._next + n_rows) % len(live))
        return np.asarray(live[slots])

    def __call__(self, rows: Array) -> Array:
        rows = np.atleast_2d(np.asarray(rows, dtype=np.float32))
        n_rows = len(rows)
        with self._lock:
            granted = max(0, min(n_rows, self._budget_left))
            self._budget_left -= granted
        proba = np.zeros((n_rows, self._n_classes), dtype=np.float32)
        answered = np.zeros(n_rows, dtype=bool)
        pending = np.arange(granted)
        halted: str | None = None

        # Send each live key its share; re-route the shares of refused keys.
        while pending.size and any(self._alive) and halted is None:
            owners = self._assign(len(pending))
            futures = {
                key: self._pool.submit(self._oracles[key], rows[pending[owners == key]])
                for key in np.unique(owners)
            }
            retry: list[Array] = []
            for key, future in futures.items():
                mine = pending[owners == key]
                try:
                    answer = future.result()
                    got = np.ones(len(mine), dtype=bool)
                except QueryRefused as stop:
                    answer, got = stop.probabilities, stop.answered
                    self._alive[key] = False
                    self.refusals[int(key)] = stop.reason
                    logger.info("key refused", extra={"key": int(key)})
                except QueryStopped as stop:
                    # Cancelled (or a key's own budget spent): the whole attack
                    # ends, keeping what was answered.
                    answer, got = stop.probabilities, stop.answered
                    halted = stop.reason
                proba[mine[got]] = answer[got]
                answered[mine[got]] = True
                self.counts[key] += int(got.sum())
                retry.append(mine[~got])
            pending = np.concatenate(retry) if retry else np.empty(0, dtype=int)

        # Rows never sent go back to the budget.
        with self._lock:
            self._budget_left += int(pending.size)
        if not answered.all():
            if halted is not None:
                raise QueryStopped(halted, answered, proba)
            if not any(self._alive):
                reason = next(iter(self.refusals.values()), "BLOCKED")
                raise QueryRefused(reason, answered, proba)
            if granted < n_rows:
                raise BudgetExhausted("BUDGET", answered, proba)
            raise QueryStopped("CANCELLED", answered, proba)
        return proba
