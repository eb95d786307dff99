"""``traffic``'s solo test through the live configuration document: its
parameters are live with their defaults, out-of-range values are refused
with the stable code, and ``solo_z`` 0 turns it off from the command line
(pure logic, no services)."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.liveconfig.document import LiveConfig, with_changes
from gateway.liveconfig.service import parse_assignments


def test_the_solo_parameters_are_live_with_their_defaults() -> None:
    defaults = LiveConfig().detectors["traffic"]
    assert defaults["solo_tolerance"] == 0.25
    assert defaults["solo_match_rate"] == 0.2
    assert defaults["solo_z"] == 5.0  # on, gated on open-loop evidence
    assert defaults["solo_step_z"] == 3.0
    assert defaults["solo_min_gaps"] == 15
    assert defaults["solo_min_overlaps"] == 2
    doc = with_changes(
        LiveConfig(),
        parse_assignments(
            [
                "detectors.traffic.solo_z=6",
                "detectors.traffic.solo_tolerance=0.3",
                "detectors.traffic.solo_match_rate=0.24",
                "detectors.traffic.solo_step_z=2",
                "detectors.traffic.solo_min_gaps=20",
                "detectors.traffic.solo_min_overlaps=0",
            ]
        ),
    )
    traffic = doc.detectors["traffic"]
    assert traffic["solo_z"] == 6.0
    assert traffic["solo_tolerance"] == 0.3
    assert traffic["solo_match_rate"] == 0.24
    assert traffic["solo_step_z"] == 2.0
    assert traffic["solo_min_gaps"] == 20
    assert traffic["solo_min_overlaps"] == 0


@pytest.mark.parametrize(
    "changes",
    [
        {"detectors.traffic.solo_z": -1.0},
        {"detectors.traffic.solo_tolerance": 1.0},
        {"detectors.traffic.solo_match_rate": 0.0},
        {"detectors.traffic.solo_step_z": 0.0},
        {"detectors.traffic.solo_min_gaps": 1},
        {"detectors.traffic.solo_min_overlaps": -1},
    ],
)
def test_an_out_of_range_solo_parameter_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        with_changes(LiveConfig(), changes)
    assert info.value.code == "CONFIG_INVALID"
    assert "detectors.traffic" in info.value.message, info.value.message
