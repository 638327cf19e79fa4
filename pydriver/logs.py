"""Log output: one readable line per event, or JSON lines for collectors (--log-format json)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

# Extra fields a log call may carry (server.py adds them to request lines).
REQUEST_FIELDS = ("method", "network", "endpoint", "pool", "address", "outcome", "duration_ms")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in REQUEST_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(level: str, fmt: str = "text", stream: str = "stderr") -> None:
    # dockerd logs a managed plugin's stderr at level "error" whatever it says; its stdout at
    # "info", so config.json sends the plugin's log to stdout.
    handler = logging.StreamHandler(sys.stdout if stream == "stdout" else sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
