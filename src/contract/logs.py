"""One logging set-up for every process.

Every line names the role (coordinator, up, or the worker's name) and the host;
lines logged while serving a request also carry its request id, which the
coordinator sets per HTTP request and passes to workers in gRPC metadata.
Human-readable by default, JSON lines with format="json".
"""

from __future__ import annotations

import json
import logging
import socket
import sys
from contextvars import ContextVar

# The request being served in this task, or "-" outside requests.
request_id: ContextVar[str] = ContextVar("request_id", default="-")
# Where the id travels: HTTP header (any case) and gRPC metadata key (lower case).
REQUEST_ID_HEADER = "x-request-id"

TEXT_FORMAT = "%(asctime)s %(levelname)s %(role)s@%(host)s [%(request_id)s] %(name)s: %(message)s"


class _ContextFilter(logging.Filter):
    def __init__(self, role: str, host: str) -> None:
        super().__init__()
        self.role, self.host = role, host

    def filter(self, record: logging.LogRecord) -> bool:
        record.role, record.host = self.role, self.host
        record.request_id = request_id.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "role": getattr(record, "role", ""),
            "host": getattr(record, "host", ""),
            "request_id": getattr(record, "request_id", "-"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(
    role: str, level: str = "INFO", fmt: str = "text", file: str | None = None
) -> None:
    """Configure the root logger of this process.

    Args:
        role: "coordinator", "up", or the worker's name.
        level: a logging level name.
        fmt: "text" or "json".
        file: also append to this file (one file per process).
    """
    if fmt not in {"text", "json"}:
        raise ValueError(f"log format must be 'text' or 'json', got {fmt!r}")
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if file:
        handlers.append(logging.FileHandler(file))
    context = _ContextFilter(role, socket.gethostname())
    formatter = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    for handler in handlers:
        handler.addFilter(context)
        handler.setFormatter(formatter)
    logging.basicConfig(level=level.upper(), handlers=handlers, force=True)
