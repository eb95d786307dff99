"""``evaluation.poisoning_measure`` with restarts: a guard restarted with its
submitters' state and the shared class windows judges exactly as one never
restarted; one whose windows start empty (before they were shared in Redis)
lets more of a patch through."""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.poisoning import PoisoningParams
from evaluation.poisoning_measure import measure

pytestmark = pytest.mark.timeout(120)


def test_a_restart_with_shared_windows_changes_no_verdict(tmp_path: Path) -> None:
    # Without the distance check, which refuses every carrier of this patch
    # from the first whatever the windows hold (the windows are what is
    # tested here).
    params = PoisoningParams(distance_check=False)
    steady = measure("digits", "patch", 3, tmp_path, params)
    shared = measure("digits", "patch", 3, tmp_path, params, restart_every=20)
    forgot = measure(
        "digits", "patch", 3, tmp_path, params, restart_every=20, keep_windows=False
    )
    assert (shared.caught, shared.clean_rejected, shared.by_code) == (
        steady.caught,
        steady.clean_rejected,
        steady.by_code,
    )
    assert forgot.poisoned == steady.poisoned
    assert forgot.caught < steady.caught, (forgot.caught, steady.caught)
