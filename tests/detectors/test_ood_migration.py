"""``ood`` reads a client's state saved by the release before ``lattice_block``
(no ring of off-lattice bits), deriving the ring conservatively.

The recorded states (tests/detectors/data/ood_state_before_lattice_block.npz)
were written by that release's code; the script beside them says how. The
derived ring is checked against what this release builds from the same
rows, and, where the old counters cannot say which outliers were off the
lattice, against the true ring as both windows slide.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from detectors import OodParams, OutOfDistributionDetector
from detectors._state import StateBlob, decode_blob, encode_blob
from tests.detectors.conftest import Digits

RECORDED = Path(__file__).parent / "data" / "ood_state_before_lattice_block.npz"
# The layout that release gave these states (window 50, 64 features), as
# recorded in them: pinned so that a change of the declared migration's
# idea of "before" cannot go unnoticed.
OLD_LAYOUT = (
    "ewma:<f8:;first_s:<f8:;has_outlier:|u1:;last_outlier:|u1:64;"
    "n_off_lattice:<i8:;n_seen:<i8:;n_wide:<i8:;outlier:|u1:50;"
    "outlier_len:<i8:;outlier_pos:<i8:"
)
BLOCK_SHARE = 1.5 * OodParams().threshold


def _fresh(digits: Digits, **params: object) -> OutOfDistributionDetector:
    detector = OutOfDistributionDetector(OodParams.model_validate(params))
    detector.learn_baseline(digits.train)
    return detector


def _recorded(client: str) -> tuple[bytes, npt.NDArray[np.float64]]:
    data = np.load(RECORDED)
    return data[f"blob_{client}"].tobytes(), data[f"rows_{client}"]


def _values(
    detector: OutOfDistributionDetector, client: str
) -> dict[str, npt.NDArray[np.float64]]:
    """The client's state as arrays, read back from its blob."""
    blob = detector.dump_state(client)
    assert blob is not None and detector._arena is not None
    fields = decode_blob(blob).fields
    return {
        name: np.frombuffer(fields[name], dtype=spec.dtype)
        .reshape(spec.shape)
        .astype(np.float64)
        for name, spec in detector._arena.fields.items()
    }


def _as_old(detector: OutOfDistributionDetector, client: str) -> bytes:
    """The client's state as the release before lattice_block would have
    saved it: the same fields without the off-lattice ring."""
    blob = detector.dump_state(client)
    assert blob is not None
    state = decode_blob(blob)
    fields = {k: v for k, v in state.fields.items() if not k.startswith("off_lattice")}
    return encode_blob(
        StateBlob(
            format=state.format,
            detector=state.detector,
            n_features=state.n_features,
            layout=OLD_LAYOUT,
            fields=fields,
        )
    )


@pytest.mark.parametrize("client", ["young", "old"])
def test_a_recorded_state_of_the_previous_release_loads_as_this_release_builds_it(
    digits: Digits, client: str
) -> None:
    blob, rows = _recorded(client)
    assert decode_blob(blob).layout == OLD_LAYOUT

    migrated = _fresh(digits)
    assert migrated.load_state(client, blob) is True

    # The same rows through this release: in both streams every outlier the
    # window holds is off the lattice, and for "old" the counters show that
    # at least 10 (34 sent, 24 queries gone) are in the window, so the
    # derived ring is exact. The first query's time is the clock's.
    replayed = _fresh(digits)
    replayed.score_batch([client] * len(rows), rows, learn=[False] * len(rows))
    got, want = _values(migrated, client), _values(replayed, client)
    assert set(got) == set(want)
    for name in want:
        if name != "first_s":
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert int(got["off_lattice"].sum()) == (3 if client == "young" else 10)


def test_a_migrated_run_of_off_lattice_queries_is_refused_at_the_next_one(
    digits: Digits,
) -> None:
    blob, rows = _recorded("old")
    detector = _fresh(digits)
    detector.load_state("old", blob)
    # The window still holds 10 off-lattice queries: the next synthetic one
    # meets lattice_block at once, as it would have without the upgrade.
    step = np.clip(rows[-1] + 0.05, 0.0, 1.0)[None, :]
    assert detector.off_lattice(step)[0] > 0
    (score,) = detector.score_batch(["old"], step, learn=[False])
    assert score.score == pytest.approx(BLOCK_SHARE)
    assert score.flagged


def test_the_derived_ring_never_counts_more_than_the_true_one(digits: Digits) -> None:
    """With on-lattice outliers beside the off-lattice ones, the old counters
    cannot say which outliers were off the lattice: the derived ring puts
    the fewest the counters allow on the oldest outliers, so as the window
    slides its count stays at or under the true one, and equal once the
    old queries have left it."""
    rng = np.random.default_rng(7)
    detector = _fresh(digits)
    # Off-lattice: Jacobian-like steps. On-lattice outliers: random pixels
    # at the reference's levels (k/16), far from any digit.
    steps = np.clip(digits.test[:60] + 0.1 * rng.choice([-1, 1], (60, 64)), 0, 1)
    odd = np.round(rng.uniform(0, 1, (60, 64)) * 16) / 16
    assert (detector.off_lattice(steps) > 0).all()
    assert (detector.off_lattice(odd) == 0).all()
    stream = np.concatenate([steps[:20], odd[:20], steps[20:35], odd[20:40]])
    detector.score_batch(["t"] * len(stream), stream, learn=[False] * len(stream))
    true = _values(detector, "t")
    assert true["n_seen"] == 75 and true["n_off_lattice"] == 35
    # The window (last 50) holds 15 off-lattice queries and on-lattice
    # outliers around them.
    assert int(true["off_lattice"].sum()) == 15
    assert int(true["outlier"].sum()) > 15

    detector.load_state("m", _as_old(detector, "t"))
    derived = _values(detector, "m")
    # At least 35 - 25 = 10 of the 35 are in the window: 10 bits, each on an
    # outlier, none where the true ring has none after it.
    assert int(derived["off_lattice"].sum()) == 10
    assert (derived["off_lattice"] <= derived["outlier"]).all()

    ordinary = digits.test[
        (detector.off_lattice(digits.test) == 0)
        & (detector.outside_range(digits.test) == 0)
    ][:50]
    counts = []
    for row in ordinary:
        detector.score_batch(["t", "m"], np.stack([row, row]), learn=[False, False])
        t, m = _values(detector, "t"), _values(detector, "m")
        counts.append((int(m["off_lattice"].sum()), int(t["off_lattice"].sum())))
    assert all(m <= t for m, t in counts), counts
    assert counts[-1] == (0, 0)
    assert any(m < t for m, t in counts)


def test_states_the_migration_cannot_carry_over_are_refused(
    digits: Digits,
) -> None:
    blob, _ = _recorded("old")
    state = decode_blob(blob)
    # 45 sent, 24 gone: at least 21 in a window holding 10 outliers.
    fields = {**state.fields, "n_off_lattice": np.array(45, "<i8").tobytes()}
    forged = encode_blob(
        StateBlob(
            format=state.format,
            detector="ood",
            n_features=64,
            layout=state.layout,
            fields=fields,
        )
    )
    detector = _fresh(digits)
    with pytest.raises(ValueError, match="off-lattice queries in the window"):
        detector.load_state("old", forged)
    assert detector.dump_state("old") is None

    # Another window is another structural parameter, not a known change:
    # refused as before, whichever release wrote it.
    blob, _ = _recorded("young")
    with pytest.raises(ValueError, match="a structural parameter changed"):
        _fresh(digits, window=40).load_state("young", blob)
