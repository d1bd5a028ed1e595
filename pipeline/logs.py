"""Structured, quiet-by-default logs: one JSON object per line on stderr.

Call sites pass fields with ``extra={"fields": {...}}`` (or use :func:`event`) so log lines stay machine-readable.
Every line is redacted (:func:`pipeline.redact.redact`): a source URL in a message, a field or a traceback loses
its user info and query string, and no configured password appears, whoever logged it.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from pipeline.redact import redact


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "t": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        line.update({k: redact(v) if isinstance(v, str) else v for k, v in getattr(record, "fields", {}).items()})
        if record.exc_info:
            line["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=lambda v: redact(str(v)))


class SlowStepFilter(logging.Filter):
    """kafka-python warns whenever one step of its network loop took over 0.1 s. On a machine short of CPU that is
    every few seconds in every worker, says nothing a user can act on and buries the lines that do; it is kept for
    DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        slow_step = record.name == "kafka.net.selector" and str(record.msg).startswith("Task %r ran for")
        return not slow_step or logging.getLogger().getEffectiveLevel() <= logging.DEBUG


def configure(level: str = "WARNING") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(SlowStepFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.Formatter.converter = time.gmtime


def event(logger: logging.Logger, level: int, msg: str, **fields) -> None:
    """Log ``msg`` with structured fields."""
    logger.log(level, msg, extra={"fields": fields})
