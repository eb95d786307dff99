"""Logging set-up for modelgate's commands (libraries never configure logging).

Records carry context in ``extra=`` fields (client, request, detector,
partition, offset, ...); the formatter appends whichever are present as
``key=value`` pairs so that log lines stay greppable by client or request.
"""

from __future__ import annotations

import logging
import sys

# Attributes every LogRecord has; anything else on a record came from ``extra``.
# uvicorn's ``color_message`` repeats the message with terminal colours.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}


# Characters a value must not bring into a log line as they are: C0 and C1
# controls (a newline would start a forged line of its own, an escape
# sequence would rewrite the terminal), the Unicode line and paragraph
# separators, and the bidirectional overrides that reorder what a reader
# sees. Each is written as its Python escape instead.
_UNSAFE = [
    *range(0x20),
    *range(0x7F, 0xA0),
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]
_ESCAPES = {code: repr(chr(code))[1:-1] for code in _UNSAFE}


def _escaped(text: str) -> str:
    return text.translate(_ESCAPES)


class FieldsFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the extra fields.

    The message and the fields are escaped (``_UNSAFE``): they quote what
    clients send (request ids, model names, error messages), and one record
    must stay one line. A traceback keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _escaped(super().formatMessage(record))

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = [
            f"{key}={_escaped(str(value))}"
            for key, value in record.__dict__.items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        return f"{base} {' '.join(fields)}" if fields else base


def configure(level: str = "INFO") -> None:
    """Send modelgate's logs to stderr; quieten chatty libraries."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs each request's whole URL at INFO (httpcore its traffic at
    # DEBUG): a webhook's path and query often hold its secret
    # (docs/alerts.md), and a backend's or receiver's URL is the settings'
    # business, not every log line's.
    for noisy in ("aiokafka", "kafka", "httpx", "httpcore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
