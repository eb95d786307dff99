"""Logging set-up for modelgate's commands (libraries never configure logging).

Records carry context in ``extra=`` fields (client, request, detector,
partition, offset, ...); the formatter appends whichever are present as
``key=value`` pairs so that log lines stay greppable by client or request.
"""

from __future__ import annotations

import logging
import sys

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class FieldsFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` with the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        base = super().format(record)
        fields = [
            f"{key}={value}"
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
