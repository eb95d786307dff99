"""A client's snapshot is restored part by part with the real scorer: a
refused detector part resets that detector for the client only, a refused
policy part only the policy, and a part saved under a layout this release
migrates (``ood`` before ``lattice_block``) is migrated. The client's
enforcement lives in the policy's part, so losing a detector's history never
unblocks it or steps it down the ladder. The same through Kafka, Redis and
a worker restart is in tests/integration/test_restore_parts.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest

from detectors._state import StateBlob, decode_blob, encode_blob
from gateway.config import load_settings
from gateway.metrics import WorkerMetrics
from gateway.models import ServedModel, digits_split, ensure_digits_model, load_model
from gateway.scoring import Scorer
from tests.gateway.test_handover_scorer import _item

pytestmark = pytest.mark.timeout(120)

X_TEST = digits_split()[1]
NOISE = np.random.default_rng(3).uniform(0, 16, size=(10, 64)).astype(np.float32)
BLOCK = [{"action": "block", "risk_at": 1.0}]
LADDER: list[dict[str, Any]] = [
    {"action": "flag", "risk_at": 1.0},
    {"action": "degrade", "after_flags": 2, "degrade": "rounded"},
    {"action": "block", "after_flags": 4},
]
# ood's layout in the release before lattice_block (commit 4258bd5) for the
# digits model (64 features, window 50), as that release wrote it.
OLD_OOD_LAYOUT = (
    "ewma:<f8:;first_s:<f8:;has_outlier:|u1:;last_outlier:|u1:64;"
    "n_off_lattice:<i8:;n_seen:<i8:;n_wide:<i8:;outlier:|u1:50;"
    "outlier_len:<i8:;outlier_pos:<i8:"
)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ServedModel]:
    directory: Path = tmp_path_factory.mktemp("models")
    ensure_digits_model(directory)
    return {"digits": load_model(directory, "digits")}


def _scorer(served: dict[str, ServedModel], rules: list[dict[str, Any]]) -> Scorer:
    settings = load_settings(policy={"rules": rules, "block_cooldown_s": 600})
    return Scorer(settings, served, WorkerMetrics())


def _send(scorer: Scorer, model: ServedModel, client: str, row: np.ndarray) -> Any:
    batch = [_item(model, client, row, 1.7e9)]
    scorer.score_and_predict(batch)
    return batch[0].verdict


def _parts(blob: bytes) -> dict[str, dict[str, bytes]]:
    return msgspec.msgpack.decode(blob, type=dict[str, dict[str, bytes]])


def _with(blob: bytes, part: tuple[str, str], value: bytes) -> bytes:
    parts = _parts(blob)
    parts[part[0]][part[1]] = value
    return msgspec.msgpack.encode(parts)


def _refused(scorer: Scorer, part: str) -> float:
    value = scorer._metrics.registry.get_sample_value(
        "modelgate_state_parts_refused_total", {"detector": part}
    )
    return value or 0.0


def _blocked_thief(served: dict[str, ServedModel]) -> tuple[bytes, Scorer]:
    old = _scorer(served, BLOCK)
    verdict = _send(old, served["digits"], "thief", NOISE[0])
    assert verdict.enforced == "block", verdict
    return old.dump("thief"), old


def test_a_snapshot_of_the_previous_release_keeps_the_block_and_migrates_ood(
    served: dict[str, ServedModel],
) -> None:
    blob, _ = _blocked_thief(served)
    # The previous release wrote ood's part without the off-lattice ring,
    # under its own layout; every other part is as this release writes it.
    current = decode_blob(_parts(blob)["digits"]["ood"])
    old_ood = encode_blob(
        StateBlob(
            format=current.format,
            detector="ood",
            n_features=current.n_features,
            layout=OLD_OOD_LAYOUT,
            fields={
                k: v
                for k, v in current.fields.items()
                if not k.startswith("off_lattice")
            },
        )
    )
    new = _scorer(served, BLOCK)
    new.restore("thief", _with(blob, ("digits", "ood"), old_ood))

    # The block's cool-down came with the policy's part.
    standing = new.policy.standing("thief", model="digits")
    assert standing is not None and standing.enforced == "block", standing
    # ood migrated: its one outlier was off the lattice, so the derived ring
    # is the one this release saved.
    detectors = new.detectors_of("digits")
    assert detectors["ood"].dump_state("thief") == _parts(blob)["digits"]["ood"]
    for name, part in _parts(blob)["digits"].items():
        assert detectors[name].dump_state("thief") == part, name
    migrated = new._metrics.registry.get_sample_value(
        "modelgate_state_parts_migrated_total", {"detector": "ood"}
    )
    assert migrated == 1.0
    assert _refused(new, "ood") == 0.0
    # An honest query is still refused: the cool-down has 600 s to run.
    verdict = _send(new, served["digits"], "thief", X_TEST[0])
    assert verdict.enforced == "block", verdict
    assert any("cool-down" in r for r in verdict.reasons), verdict


def test_a_garbage_detector_part_resets_only_that_detector(
    served: dict[str, ServedModel], caplog: pytest.LogCaptureFixture
) -> None:
    blob, _ = _blocked_thief(served)
    new = _scorer(served, BLOCK)
    with caplog.at_level(logging.WARNING, logger="gateway.scoring"):
        new.restore("thief", _with(blob, ("digits", "ood"), b"\x93garbage"))

    detectors = new.detectors_of("digits")
    assert detectors["ood"].dump_state("thief") is None
    for name, part in _parts(blob)["digits"].items():
        if name != "ood":
            assert detectors[name].dump_state("thief") == part, name
    assert new.policy.dump_state("thief") == _parts(blob)["_policy"]["state"]
    assert _refused(new, "ood") == 1.0
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.__dict__["client"] == "thief"
    assert record.__dict__["detector"] == "ood"
    # ood starts afresh for the thief, but the block stands.
    verdict = _send(new, served["digits"], "thief", X_TEST[0])
    assert verdict.enforced == "block", verdict


def test_a_reset_detector_does_not_step_a_client_down_the_ladder(
    served: dict[str, ServedModel],
) -> None:
    """Degraded on two remembered flags: the flags are the policy's, so the
    client stays degraded when the detector that flagged it starts over."""
    old = _scorer(served, LADDER)
    model = served["digits"]
    verdicts = [_send(old, model, "dee", NOISE[i]).enforced for i in range(2)]
    assert verdicts == ["flag", "degrade"], verdicts
    blob = old.dump("dee")

    new = _scorer(served, LADDER)
    new.restore("dee", _with(blob, ("digits", "ood"), b"not a state"))
    assert new.detectors_of("digits")["ood"].dump_state("dee") is None
    verdict = _send(new, model, "dee", X_TEST[0])
    assert verdict.enforced == "degrade", verdict
    # And it no longer teaches the detectors what normal traffic is.
    assert not new.policy.good_standing("dee")


def test_a_refused_policy_part_resets_only_the_policy(
    served: dict[str, ServedModel],
) -> None:
    blob, _ = _blocked_thief(served)
    new = _scorer(served, BLOCK)
    new.restore("thief", _with(blob, ("_policy", "state"), b"\xc1"))

    assert new.policy.dump_state("thief") is None
    assert _refused(new, "policy") == 1.0
    detectors = new.detectors_of("digits")
    for name, part in _parts(blob)["digits"].items():
        assert detectors[name].dump_state("thief") == part, name


def test_an_unreadable_snapshot_starts_the_client_afresh(
    served: dict[str, ServedModel],
) -> None:
    new = _scorer(served, BLOCK)
    new.restore("thief", b"\xc1 not msgpack")
    assert _refused(new, "snapshot") == 1.0
    assert new.policy.dump_state("thief") is None
    assert all(
        d.dump_state("thief") is None for d in new.detectors_of("digits").values()
    )


def _policy_with(blob: bytes, **changes: Any) -> bytes:
    """``blob`` with fields of its policy part replaced (``track__field`` for
    a field of the ``live`` or ``would`` track)."""
    parts = _parts(blob)
    state = msgspec.msgpack.decode(parts["_policy"]["state"])
    for name, value in changes.items():
        track, _, field = name.partition("__")
        if field:
            state[track][field] = value
        else:
            state[name] = value
    parts["_policy"]["state"] = msgspec.msgpack.encode(state)
    return msgspec.msgpack.encode(parts)


@pytest.mark.parametrize(
    "changes",
    [
        {"live__flags": float("nan")},
        {"would__flags": -1.0},
        {"lifetime_flags": -1},
        {"queries": -5},
        {"live__blocked_until_s": 3e9},
        {"would__blocked_until_s": float("inf")},
        {"live__throttled_until_s": -1.0},
        {"live__throttle_factor": float("nan")},
        {"live__throttle_factor": -4.0},
        {"live__throttle_factor": 0.5},
        {"live__flags_at_s": 3.5e9},
        {"fused": {"ood": float("nan")}},
        {"fused": {"ood": -2.0}},
        {"fused_at_s": 4e9},
        {"group_risk": float("-inf")},
        {"group_id": "x" * 129},
    ],
    ids=lambda c: ",".join(f"{k}={v!r}"[:40] for k, v in c.items()),
)
def test_a_policy_part_out_of_range_is_refused_and_reset(
    served: dict[str, ServedModel],
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
) -> None:
    blob, _ = _blocked_thief(served)
    new = _scorer(served, BLOCK)
    with caplog.at_level(logging.WARNING, logger="gateway.scoring"):
        new.restore("thief", _policy_with(blob, **changes))

    assert new.policy.dump_state("thief") is None
    assert _refused(new, "policy") == 1.0
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert record.__dict__["client"] == "thief", record.__dict__
    assert record.__dict__["detector"] == "policy", record.__dict__
    # The detectors' parts loaded; the worker goes on scoring the client.
    detectors = new.detectors_of("digits")
    for name, part in _parts(blob)["digits"].items():
        assert detectors[name].dump_state("thief") == part, name
    verdict = _send(new, served["digits"], "thief", X_TEST[0])
    assert verdict.action in ("allow", "flag", "block"), verdict


def test_a_policy_part_from_a_worker_whose_clock_runs_ahead_loads(
    served: dict[str, ServedModel],
) -> None:
    """Workers' wall clocks differ: a block ending a little after this
    worker's now plus the longest cool-down, and times a minute in its
    future, are a skewed clock, not corruption."""
    import time

    blob, _ = _blocked_thief(served)
    ahead_s = time.time() + 60
    skewed = _policy_with(
        blob,
        live__blocked_until_s=ahead_s + 30 * 86_400,
        would__blocked_until_s=ahead_s + 30 * 86_400,
        live__flags_at_s=ahead_s,
        fused_at_s=ahead_s,
        live__throttle_factor=0.0,
    )
    new = _scorer(served, BLOCK)
    new.restore("thief", skewed)
    assert _refused(new, "policy") == 0.0
    standing = new.policy.standing("thief", model="digits")
    assert standing is not None and standing.enforced == "block", standing
