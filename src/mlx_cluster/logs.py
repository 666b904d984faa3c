"""One logging set-up for every process; each line names the role and host."""

from __future__ import annotations

import logging
import socket


def setup_logging(role: str, level: str = "INFO") -> None:
    """Log to stderr as `time level role@host logger: message`."""
    host = socket.gethostname()
    logging.basicConfig(
        level=level.upper(),
        format=f"%(asctime)s %(levelname)s {role}@{host} %(name)s: %(message)s",
        force=True,
    )
