"""``traffic``'s lower member bar through the live configuration document:
both parameters are live, a ``strong_cohort_z`` under ``cohort_z`` is refused
with the stable code, and the lower bar turns off from the command line
(pure logic, no services)."""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.liveconfig.document import LiveConfig, with_changes
from gateway.liveconfig.service import parse_assignments


@pytest.mark.parametrize(
    "changes",
    [
        {"detectors.traffic.strong_cohort_z": 5.0},
        {"detectors.traffic.cohort_z": 10.0},
        {"detectors.traffic.strong_member_z": -1.0},
    ],
)
def test_a_strong_cohort_z_under_cohort_z_is_refused(changes: dict[str, float]) -> None:
    with pytest.raises(ConfigError) as info:
        with_changes(LiveConfig(), changes)
    assert info.value.code == "CONFIG_INVALID"
    assert "detectors.traffic" in info.value.message, info.value.message
    assert "strong_" in info.value.message, info.value.message


def test_both_parameters_are_live_and_the_lower_bar_turns_off() -> None:
    doc = with_changes(
        LiveConfig(),
        parse_assignments(
            [
                "detectors.traffic.cohort_z=10",
                "detectors.traffic.strong_cohort_z=12.5",
                "detectors.traffic.strong_member_z=3",
            ]
        ),
    )
    traffic = doc.detectors["traffic"]
    assert traffic["strong_cohort_z"] == 12.5
    assert traffic["strong_member_z"] == traffic["member_z"] == 3.0
    defaults = LiveConfig().detectors["traffic"]
    assert defaults["strong_cohort_z"] == defaults["cohort_z"] == 6.0
