"""Daemon logging: to stderr, in journald's priority format under systemd.

Logging (``setup_logging``)
    To stderr. Under systemd (``JOURNAL_STREAM`` set and naming our stderr)
    each line is ``<N>logger: message`` with N the syslog priority, which
    journald turns into the entry's priority, and no timestamp (journald adds
    one). Otherwise ``2026-01-01 12:00:00.123 LEVEL logger: message``.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from xenbind.errors import ConfigError

log = logging.getLogger(__name__)


_SYSLOG_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = 7
        for level, p in sorted(_SYSLOG_PRIORITY.items()):
            if record.levelno >= level:
                prio = p
        text = super().format(record)
        # every line of a multi-line message (tracebacks) keeps the priority
        return "\n".join(f"<{prio}>{line}" for line in text.split("\n"))


def under_journal(stream: Any = None) -> bool:
    """True when ``stream`` (default stderr) is connected to journald."""
    js = os.environ.get("JOURNAL_STREAM")
    if not js:
        return False
    stream = stream if stream is not None else sys.stderr
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def setup_logging(level: str | int = "info", *, stream: Any = None) -> None:
    """Configure the root logger for a daemon (see the module docstring)."""
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    if under_journal(stream):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        fmt = logging.Formatter(
            "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S"
        )
        handler.setFormatter(fmt)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    if isinstance(level, str):
        lv = logging.getLevelName(level.upper())
        if not isinstance(lv, int):
            raise ConfigError(f"unknown log level {level!r} (debug, info, warning, error)")
        level = lv
    root.setLevel(level)
