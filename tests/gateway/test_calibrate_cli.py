"""``modelgate calibrate`` prints thresholds live configuration accepts."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from detectors import DETECTORS
from gateway.cli import app
from gateway.liveconfig.document import LiveConfig
from gateway.liveconfig.service import parse_assignments


def test_calibrate_writes_a_snippet_live_config_accepts(tmp_path: Path) -> None:
    out = tmp_path / "thresholds.json"
    result = CliRunner().invoke(
        app,
        [
            *("calibrate", "--clients", "4", "--queries", "80"),
            *("--target-fpr", "0.05", "--out", str(out)),
        ],
        env={"MODELGATE_MODELS__DIRECTORY": str(tmp_path / "models")},
    )
    assert result.exit_code == 0, result.output
    snippet = json.loads(out.read_text())
    assert set(snippet["detectors"]) <= set(DETECTORS)
    assert {"margin", "coverage", "traffic"} <= set(snippet["detectors"])
    doc = LiveConfig.model_validate(snippet)
    for name, values in snippet["detectors"].items():
        assert doc.detectors[name]["threshold"] == values["threshold"]
    lines = result.output.splitlines()
    at = next(i for i, x in enumerate(lines) if "modelgate config set" in x)
    line = lines[at]
    # The line that applies them live carries the docs' warning beside it,
    # naming each detector it makes more sensitive.
    rows = [x.split() for x in lines if x.split()[:1] and x.split()[0] in DETECTORS]
    lowered = [r[0] for r in rows if float(r[1]) < float(r[2])]
    assert lowered, "this replay lowers some threshold: the case to warn about"
    assert lines[at + 1].startswith("warning: this lowers the threshold of "), lines
    for name in lowered:
        assert name in lines[at + 1], (name, lines[at + 1])
    assert "policy.shadow=true" in lines[at + 1]
    changes = parse_assignments(line.split("modelgate config set ")[1].split())
    assert (
        changes["detectors.margin.threshold"]
        == snippet["detectors"]["margin"]["threshold"]
    )


def test_calibrate_refuses_an_unknown_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["calibrate", "--model", "nope", "--clients", "1", "--queries", "5"],
        env={"MODELGATE_MODELS__DIRECTORY": str(tmp_path / "models")},
    )
    assert result.exit_code == 1
    assert "not served" in result.output
