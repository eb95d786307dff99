"""Feedback wire format, codes, calibration data and the CLI's file reader;
no broker needed."""

from __future__ import annotations

from pathlib import Path

import msgspec
import numpy as np
import pytest

from detectors.poisoning import CODES as POISON_CODES
from gateway import protocol
from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.feedback import guard_params
from gateway.feedback_cli import read_rows
from gateway.feedback_data import calibration_rows
from gateway.feedback_wire import (
    FEEDBACK_CODES,
    build_feedback,
    decode_envelope,
    decode_feedback,
)


def test_a_signed_record_round_trips() -> None:
    record, value, headers = build_feedback(
        key_id="mgk_000000000000",
        secret=b"s" * 32,
        model="digits",
        input_name="pixels",
        row=np.arange(64, dtype=np.float32).reshape(8, 8),
        label=7,
    )
    assert decode_feedback(value) == record
    assert record.inputs[0].shape == [1, 64]
    name, signature = headers[0]
    assert name == protocol.SIGNATURE_HEADER
    assert protocol.verify(b"s" * 32, value, signature.decode())


def test_a_signed_request_is_not_feedback_nor_the_reverse() -> None:
    _, request, _ = protocol.build_request(
        key_id="k",
        secret=b"s",
        model="digits",
        inputs={"pixels": np.zeros((1, 64), dtype=np.float32)},
    )
    with pytest.raises(msgspec.ValidationError):
        decode_feedback(request)
    _, feedback, _ = build_feedback(
        key_id="k",
        secret=b"s",
        model="digits",
        input_name="pixels",
        row=np.zeros(64, dtype=np.float32),
        label=1,
    )
    with pytest.raises(msgspec.ValidationError):
        protocol.decode_request(feedback)


def test_envelope_names_a_record_that_failed_its_schema() -> None:
    envelope = decode_envelope(b'{"feedback_id": "f-1", "label": "seven"}')
    assert envelope is not None and envelope.feedback_id == "f-1"
    assert decode_envelope(b"\xff not json") is None
    too_long = decode_envelope(b'{"feedback_id": "' + b"x" * 200 + b'"}')
    assert too_long is not None and too_long.feedback_id is None
    # One bad id does not cost the other: the rejection still names the record.
    for bad_key in (b'""', b'"' + b"k" * 10_000 + b'"', b"7"):
        envelope = decode_envelope(
            b'{"feedback_id": "f-2", "key_id": ' + bad_key + b"}"
        )
        assert envelope is not None
        assert (envelope.feedback_id, envelope.key_id) == ("f-2", None)


def test_every_code_has_a_meaning() -> None:
    assert set(POISON_CODES) <= set(FEEDBACK_CODES)
    assert "UNKNOWN_LABEL" in FEEDBACK_CODES
    assert all(FEEDBACK_CODES.values())


def test_calibration_rows_are_held_out_and_disjoint() -> None:
    (x_cal, y_cal), (x_held, _) = calibration_rows("breast_cancer")
    assert len(x_cal) + len(x_held) == 285 and len(y_cal) == len(x_cal)
    assert not {r.tobytes() for r in x_cal} & {r.tobytes() for r in x_held}
    with pytest.raises(ConfigError, match="not in the zoo"):
        calibration_rows("my_model")


def test_a_calibration_file_is_read_without_pickle(tmp_path: Path) -> None:
    good = tmp_path / "cal.npz"
    np.savez(good, x=np.zeros((30, 4)), y=np.ones(30))
    (x, _), (held, _) = calibration_rows("m", good)
    assert x.shape == (30, 4) and len(held) == 0
    bad = tmp_path / "objects.npz"
    np.savez(bad, x=np.array([{"a": 1}], dtype=object), y=np.ones(1))
    with pytest.raises(ConfigError):
        calibration_rows("m", bad)
    with pytest.raises(ConfigError):
        calibration_rows("m", tmp_path / "missing.npz")


def test_guard_params_are_checked_with_the_field_named() -> None:
    assert guard_params(load_settings()).confidence == 0.9
    with pytest.raises(ConfigError, match=r"feedback\.params: confidence"):
        guard_params(load_settings(feedback={"params": {"confidence": 2}}))
    with pytest.raises(ConfigError, match="no_such"):
        guard_params(load_settings(feedback={"params": {"no_such": 1}}))


def test_read_rows_takes_csv_and_npz(tmp_path: Path) -> None:
    csv = tmp_path / "rows.csv"
    csv.write_text("1,2,3,0\n4,5,6,1\n")
    x, y = read_rows(csv)
    assert x.dtype == np.float32 and x.shape == (2, 3) and y.tolist() == [0, 1]
    npz = tmp_path / "rows.npz"
    np.savez(npz, x=np.ones((2, 3)), y=np.array([1, 2]))
    assert read_rows(npz)[1].tolist() == [1, 2]
    for text in ("1,2,3,0.5\n", "1,2\n3\n", "", "a,b\n"):
        csv.write_text(text)
        with pytest.raises(ValueError):
            read_rows(csv)
    # NaN went out as JSON null, and the guard's refusal did not say why.
    for text in ("1,2,3,0\nnan,5,6,1\n", "1,inf,3,0\n", "1,1e39,3,0\n"):
        csv.write_text(text)
        with pytest.raises(ValueError, match="finite number"):
            read_rows(csv)
    np.savez(npz, x=np.array([[1.0, np.nan]]), y=np.array([1]))
    with pytest.raises(ValueError, match="row 0"):
        read_rows(npz)
