"""The log line format of modelgate's commands (gateway.logs): one record, one
line, whatever a client put in the values it logs."""

from __future__ import annotations

import logging

from gateway.logs import FieldsFormatter

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _line(message: str, *args: object, **extra: object) -> str:
    record = logging.LogRecord(
        "gateway.answers", logging.INFO, __file__, 1, message, args, None
    )
    record.__dict__.update(extra)
    return FieldsFormatter(FORMAT).format(record)


def test_a_client_value_cannot_start_a_log_line_of_its_own() -> None:
    # A request id is the client's to choose (1-128 characters, any); one
    # holding a newline forged a whole ERROR line in the worker's log.
    forged = "r1\n2026-12-06 02:00:00,000 ERROR gateway.admin: FORGED"
    line = _line("alert", client="c", request=forged)
    assert "\n" not in line, line
    assert line.endswith(
        r"client=c request=r1\n2026-12-06 02:00:00,000 ERROR gateway.admin: FORGED"
    ), line
    # In the message's arguments too, and every other control character,
    # line separator or bidirectional override.
    line = _line("request %s is already pending", "a\r\x1b[31mb\u2028c\u202ed")
    assert line.endswith(r"request a\r\x1b[31mb\u2028c\u202ed is already pending"), line


def test_a_traceback_keeps_its_lines() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        import sys

        record = logging.LogRecord(
            "gateway.worker", logging.ERROR, __file__, 1, "failed", (), sys.exc_info()
        )
    text = FieldsFormatter(FORMAT).format(record)
    assert text.count("\n") >= 2 and "Traceback" in text, text


def test_uvicorns_coloured_copy_of_the_message_is_left_out() -> None:
    line = _line("Uvicorn running", color_message="\x1b[1mUvicorn\x1b[0m running")
    assert line.endswith("gateway.answers: Uvicorn running"), line
