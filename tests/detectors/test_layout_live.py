"""No parameter a detector lets change live shapes its per-client state.

A live change reaches every worker between two batches, with no hand-over:
were a live parameter to change a layout, every client handed over
afterwards would be refused by its next owner (and, before snapshots were
restored part by part, forgotten whole). docs/detectors.md ("Per-client
state on hand-over and upgrade") relies on this to need no resize
migration; the parameters that do shape state are refused in the live
document (tests/gateway/test_liveconfig.py).
"""

from __future__ import annotations

from typing import Any

import pytest

from detectors import DETECTORS
from detectors._state import describe_layout

N_FEATURES = (9, 64)


def _other_values(value: Any) -> list[Any]:
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value * 2, max(value - 1, 0)]
    if isinstance(value, float):
        return [value * 1.5, value * 0.5]
    return []


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_no_live_parameter_changes_the_state_layout(name: str) -> None:
    cls = DETECTORS[name]
    base = cls()
    tried = 0
    for param in sorted(cls._mutable_params):
        for value in _other_values(getattr(base.params, param)):
            merged = {**base.params.model_dump(), param: value}
            try:
                params = cls.Params.model_validate(merged)
            except ValueError:
                continue  # out of its bounds: cannot be published either
            tried += 1
            changed = cls(params)
            for n in N_FEATURES:
                assert describe_layout(changed._layout(n)) == describe_layout(
                    base._layout(n)
                ), f"{name}.{param}={value!r} changes the layout at {n} features"
    assert tried > 0
