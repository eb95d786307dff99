"""What a batch's verdicts change in Redis: throttles, blocks, released slots.

The policy ladder (gateway/policy.py) decides per request; the steps here carry
those decisions into the shared counters, one round trip each and none when
there is nothing to do:

- ``apply_throttle`` refuses throttled clients' requests beyond their
  penalised rate (gateway/throttle.py);
- ``restore_hidden`` (before scoring, no round trip) puts blocks and
  throttles served hidden back into the policy's memory from the record
  admission read, for clients whose memory lost them;
- ``enforce_blocks`` stores the blocks the batch decided;
- ``record_hidden`` records the blocks and throttles the batch served
  hidden, when Redis does not hold them yet;
- ``release_unserved`` gives back the request ids of admitted requests that
  were refused after all, so that their retry is not a duplicate;
- ``release_in_flight`` gives back the in-flight slots of answered requests.

No Kafka I/O happens here.
"""

from __future__ import annotations

import logging

from gateway.batch import BatchItem
from gateway.errors import PolicyError, StoreError
from gateway.intake import admit_item
from gateway.limits import Admitter
from gateway.policy import SEVERITY, Policy
from gateway.store import CounterStore, HiddenAction
from gateway.throttle import ThrottleCheck, ThrottleStore, plan_rate

logger = logging.getLogger(__name__)

# A hidden record is written again only when the batch's verdict outlasts it
# by more than this (ms): the policy's end and the record's PTTL drift apart
# by the time between admission and scoring, which must not cost a write per
# batch for every hidden-blocked client.
_HIDDEN_SLACK_MS = 1000


def decided_without_store(items: list[BatchItem]) -> bool:
    """Whether admission answered part of this batch without Redis (fail mode
    ``open`` or ``closed``), so that a later Redis failure must not retry it."""
    return any(i.admission is not None and i.admission.without_store for i in items)


async def apply_throttle(
    items: list[BatchItem],
    policy: Policy,
    throttle: ThrottleStore,
    store: CounterStore | None = None,
) -> None:
    """Refuse the requests of throttled clients beyond their penalised rate
    (gateway/throttle.py); one round trip, and none when no client of the
    batch is throttled.

    Parameters
    ----------
    store
        Resolves each client's plan (with its key's overrides), whose slowest
        rate and tightest burst the penalty divides
        (:func:`gateway.throttle.plan_rate`); without it, the ``limits``
        section's rate.

    Raises
    ------
    StoreError
        Redis is unreachable: the batch is retried, as for admission.
    """
    live: dict[str, list[BatchItem]] = {}
    for item in items:
        if (
            item.error is None
            and item.key is not None
            and item.admission is not None
            and item.admission.outcome == "ok"
        ):
            live.setdefault(item.key.client_id, []).append(item)
    checks: list[ThrottleCheck] = []
    for client_id, client_items in live.items():
        factor = policy.rate_factor(client_id)
        if factor <= 1.0:
            continue
        rate = None
        if store is not None:
            rate = plan_rate(store.compiled(admit_item(client_items[0])).plan)
        checks.append(
            ThrottleCheck(
                client_id,
                factor,
                len(client_items),
                rate_per_s=None if rate is None else rate[0],
                burst=None if rate is None else rate[1],
            )
        )
    if not checks:
        return
    results = await throttle.check(checks)
    for check, waits in zip(checks, results, strict=True):
        for item, wait_ms in zip(live[check.client_id], waits, strict=True):
            if wait_ms > 0:
                item.fail(
                    PolicyError(
                        "rate limit exceeded", code="RATE_LIMITED", retriable=True
                    ),
                    action="throttle",
                )
                item.throttle_retry_ms = wait_ms


async def enforce_blocks(
    items: list[BatchItem], store: CounterStore, default_cooldown_s: float
) -> None:
    """Store the blocks this batch decided, one per client.

    Parameters
    ----------
    default_cooldown_s
        Block length, in seconds, for a verdict that names none
        (``policy.block_cooldown_s``).
    """
    to_block = {
        i.key.client_id: i.verdict
        for i in items
        if i.key is not None
        and i.verdict is not None
        and i.verdict.enforced == "block"
        # 0: a redelivered record's standing, not a new block.
        and i.verdict.cooldown_s > 0
    }
    for client_id, verdict in to_block.items():
        try:
            await store.block(
                client_id,
                verdict.cooldown_s or default_cooldown_s,
                "; ".join(verdict.reasons) if verdict else "",
            )
        except StoreError:
            # The answers still say BLOCKED; the next batch re-derives the
            # block from the same detector state.
            logger.warning("block not stored", extra={"client": client_id})


def restore_hidden(items: list[BatchItem], policy: Policy) -> None:
    """Put each client's hidden block or throttle, as admission read it from
    Redis, back into the policy's memory before the batch is scored.

    No I/O: the record came with the admission decisions. A client whose
    memory still holds it is left as it is; one whose policy part was lost
    (refused on restore, snapshot deleted, handed over before a save) is put
    back in its cool-down, so it keeps being served late and coarse. A client
    with a release waiting is skipped: the release lifts the record too.
    """
    seen: set[str] = set()
    for item in items:
        admission = item.admission
        if (
            admission is None
            or admission.hidden is None
            or admission.released
            or item.key is None
        ):
            continue
        client_id = item.key.client_id
        if client_id in seen:
            continue
        seen.add(client_id)
        policy.restore_hidden(client_id, admission.hidden, admission.hidden_ms / 1000)


async def record_hidden(items: list[BatchItem], store: CounterStore) -> None:
    """Record in Redis the blocks and throttles this batch served hidden, so
    that they outlive the policy's memory (``CounterStore.record_hidden``).

    Only what Redis does not hold yet: a new block or throttle, or one the
    record (as admission read it) ends sooner than by ``_HIDDEN_SLACK_MS``, or
    a block over a recorded throttle. A client in its cool-down costs no
    write, so this is a round trip only in batches that start a hidden
    block or throttle (or meet one recorded before the record existed). A
    Redis failure is logged: the policy's memory still holds it, and the
    next batch tries again.
    """
    wanted: dict[str, tuple[HiddenAction, float]] = {}
    for item in items:
        verdict = item.verdict
        if verdict is None or verdict.hidden_action is None or item.key is None:
            continue
        client_id = item.key.client_id
        action: HiddenAction = (
            "block" if verdict.hidden_action == "block" else "throttle"
        )
        have = wanted.get(client_id)
        if have is None or (SEVERITY[action], verdict.hidden_s) > (
            SEVERITY[have[0]],
            have[1],
        ):
            wanted[client_id] = (action, verdict.hidden_s)
    recorded: dict[str, tuple[str | None, int]] = {
        i.key.client_id: (i.admission.hidden, i.admission.hidden_ms)
        for i in items
        if i.key is not None and i.admission is not None
    }
    to_write = {}
    for client_id, (action, left_s) in wanted.items():
        have_action, have_ms = recorded.get(client_id, (None, 0))
        if (
            have_action is None
            or SEVERITY[action] > SEVERITY[have_action]
            or left_s * 1000 > have_ms + _HIDDEN_SLACK_MS
        ):
            to_write[client_id] = (action, left_s)
    if not to_write:
        return
    try:
        await store.record_hidden(to_write)
    except StoreError:
        logger.warning(
            "hidden enforcement not recorded", extra={"clients": sorted(to_write)}
        )


async def release_unserved(items: list[BatchItem], store: CounterStore) -> None:
    """Requests admitted but then refused (model failure, a block decided
    on this very query) give their request id back, so that the retry
    their answer invites is not refused as a duplicate.

    Raises
    ------
    StoreError
        Redis is unreachable and the batch was admitted with it.
    """
    unserved = [
        (i.key.client_id, i.request.request_id)
        for i in items
        if i.error is not None
        and i.admission is not None
        and i.admission.outcome == "ok"
        and i.key is not None
        and i.request is not None
    ]
    try:
        await store.release_requests(unserved)
    except StoreError:
        # Without Redis (fail modes open/closed) the batch is answered
        # anyway; the cost is that a retry of these ids within the replay
        # window may be refused as a duplicate.
        if not decided_without_store(items):
            raise
        logger.warning("unserved request ids not released")


async def release_in_flight(items: list[BatchItem], admitter: Admitter) -> None:
    """Answered requests give back their in-flight slot. A failure only
    delays that until the slot's safety expiry (the in-flight rule's
    ``ttl_s``): the answers are out, so the batch must not be retried."""
    held = [
        (i.key.client_id, i.request.request_id, i.admission)
        for i in items
        if i.admission is not None
        and i.admission.in_flight
        and i.key is not None
        and i.request is not None
    ]
    if not held:
        return
    try:
        await admitter.release(held)
    except StoreError as exc:
        logger.warning(
            "in-flight slots not released; they expire by themselves: %s",
            exc,
            extra={"requests": len(held)},
        )
