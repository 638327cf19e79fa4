"""Log output: one readable line per event, or JSON lines for collectors (--log-format json).

Logged values come from requests (pool ids, option keys, addresses, error sentences that quote
them), so they must not be able to forge a line. In the text format every value has its line
breaks and other control characters escaped (``\\n``, ``\\x1b``); a traceback keeps its lines,
but each is indented, and no record line ever starts with anything but a timestamp. JSON lines
are escaped by JSON itself. Both cut overlong values, so a large request cannot flood the log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

# Extra fields a log call may carry (server.py adds them to request lines).
REQUEST_FIELDS = ("method", "network", "endpoint", "pool", "address", "outcome", "duration_ms")

# Longer than any sentence pybridge writes itself (they quote request values cut to 60
# characters), far shorter than what a request could carry.
MAX_VALUE_CHARS = 512
# A line of a traceback: code lines are short; exception messages may quote anything.
MAX_TRACEBACK_LINE_CHARS = 2000
TRACEBACK_INDENT = "  | "

# C0 controls (line feed, carriage return, tab, escape...), DEL, C1 controls (NEL among them),
# the Unicode line and paragraph separators, and the bidirectional overrides and isolates
# that make a terminal show text in another order than it is.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: control characters become escapes (``\\n``, ``\\x1b``)."""
    return _UNSAFE.sub(_escape_char, text)


def cut(text: str, limit: int = MAX_VALUE_CHARS) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more characters]"


def _bounded(value: object) -> object:
    # Numbers carry no text (and %d/%.1f need them as numbers); anything else is formatted
    # as its string, cut to size.
    if isinstance(value, (int, float)):
        return value
    return cut(str(value))


def bounded_message(record: logging.LogRecord) -> str:
    """The record's message with each argument cut to size (not yet escaped)."""
    message = str(record.msg)
    args = record.args
    if not args:
        return message
    if isinstance(args, Mapping):
        return message % {key: _bounded(value) for key, value in args.items()}
    return message % tuple(_bounded(value) for value in args)


def _indented(block: str) -> str:
    return "\n".join(
        TRACEBACK_INDENT + escape(cut(line, MAX_TRACEBACK_LINE_CHARS))
        for line in block.rstrip("\n").split("\n")
    )


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE``; a traceback follows on indented lines."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape(bounded_message(record))
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + _indented(record.exc_text)
        if record.stack_info:
            text += "\n" + _indented(self.formatStack(record.stack_info))
        return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": bounded_message(record),
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = cut(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(level: str, fmt: str = "text", stream: str = "stderr") -> None:
    # dockerd logs a managed plugin's stderr at level "error" whatever it says; its stdout at
    # "info", so config.json sends the plugin's log to stdout.
    handler = logging.StreamHandler(sys.stdout if stream == "stdout" else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
