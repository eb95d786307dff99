"""The policy ladder: from detector scores to an action per request.

Pure logic with per-client memory of past flags; no I/O. The worker applies the
verdict (alerts, Redis block with cool-down) and the policy never sees Kafka or
Redis. Risk here is the largest warm detector's score divided by its threshold,
so 1.0 means "at threshold" whatever the detector's own scale.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from detectors import DetectorScore
from gateway.config import PolicyConfig

logger = logging.getLogger(__name__)


class _ClientPolicyState(msgspec.Struct):
    flags: int = 0
    queries: int = 0
    first_flag_query: int = -1


@dataclass(frozen=True, slots=True)
class Verdict:
    """What policy decided for one query.

    ``action`` is what the rules say (recorded on the decisions topic even in
    shadow mode); ``enforced`` is what the client experiences.
    """

    action: str
    enforced: str
    risk: float
    flagged: tuple[DetectorScore, ...] = ()
    reasons: tuple[str, ...] = field(default=())

    @property
    def shadow(self) -> bool:
        return self.action != self.enforced


class Policy:
    """Maps each query's detector scores to allow, flag or block.

    A query whose risk reaches ``flag_at`` is flagged (alert, still answered).
    A client is blocked when one query's risk reaches ``block_at`` or after
    ``block_after_flags`` flagged queries; the cool-down itself lives in Redis
    so every worker honours it.
    """

    def __init__(self, config: PolicyConfig) -> None:
        self.config = config
        self._clients: dict[str, _ClientPolicyState] = {}

    def set_config(self, config: PolicyConfig) -> None:
        """Take a new ladder while running (live configuration); the memory of
        each client's past flags is kept."""
        self.config = config

    def good_standing(self, client_id: str) -> bool:
        """True while a client has never been flagged: only such clients may
        teach the detectors what normal traffic looks like."""
        state = self._clients.get(client_id)
        return state is None or state.flags == 0

    def decide(self, client_id: str, scores: Sequence[DetectorScore]) -> Verdict:
        state = self._clients.setdefault(client_id, _ClientPolicyState())
        state.queries += 1

        # Risk: the strongest warm detector, relative to its own threshold.
        risk = 0.0
        for s in scores:
            if s.warm and s.threshold > 0:
                risk = max(risk, s.score / s.threshold)
        flagged = tuple(s for s in scores if s.flagged)
        if risk < self.config.flag_at or not flagged:
            return Verdict("allow", "allow", risk)

        # Flagged: count it, then see whether this tips the client into a block.
        state.flags += 1
        if state.first_flag_query < 0:
            state.first_flag_query = state.queries
        reasons = tuple(f"{s.detector}: {s.evidence}" for s in flagged)
        action = "flag"
        if risk >= self.config.block_at or state.flags >= self.config.block_after_flags:
            action = "block"
        # Shadow mode enforces nothing: the client is answered as if merely
        # flagged (the alert still goes out) while ``action`` keeps the rule's.
        enforced = "flag" if self.config.shadow else action
        return Verdict(action, enforced, risk, flagged, reasons)

    def forget(self, client_id: str) -> None:
        self._clients.pop(client_id, None)

    def dump_state(self, client_id: str) -> bytes | None:
        state = self._clients.get(client_id)
        return None if state is None else msgspec.msgpack.encode(state)

    def load_state(self, client_id: str, blob: bytes) -> None:
        self._clients[client_id] = msgspec.msgpack.decode(blob, type=_ClientPolicyState)
