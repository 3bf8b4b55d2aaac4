# -*- test-case-name: tests.test_serve -*-
"""Logging for the service: Twisted's logger, one line per event.

Every line is ``<time> <LEVEL> <namespace>: <message>``, the time in UTC to
the millisecond (ISO 8601), so that lines from several instances on several
machines sort together. A logged failure adds its traceback on the lines that
follow. `--log-level` (``debug``, ``info``, ``warn``, ``error``) drops what is
below it.

The modules of this library log through `twisted.logger.Logger` with their
module's namespace; no secret is ever a field of a log event (the config
types hide theirs: see `config.Secret`).
"""

from __future__ import annotations

import datetime
import sys
from collections.abc import Mapping
from typing import IO, Any, Final

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    eventAsText,
    globalLogBeginner,
)

__all__ = [
    "DEFAULT_LOG_LEVEL",
    "LOG_LEVELS",
    "format_event",
    "log_observer",
    "parse_log_level",
    "start_logging",
    "twistd_log_observer",
]

# The names accepted by --log-level, and their levels.
LOG_LEVELS: Final[Mapping[str, LogLevel]] = {
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "error": LogLevel.error,
}
DEFAULT_LOG_LEVEL: Final = "info"

# Also accepted: the spellings of Python's logging module.
_ALIASES: Final[Mapping[str, str]] = {"warning": "warn", "critical": "error"}


def parse_log_level(text: str) -> LogLevel:
    """The level named `text` (case-insensitive); ValueError naming the
    choices otherwise."""
    name = text.strip().lower()
    name = _ALIASES.get(name, name)
    level = LOG_LEVELS.get(name)
    if level is None:
        raise ValueError(
            f"unknown log level {text!r}; expected one of: {', '.join(LOG_LEVELS)}"
        )
    return level


def _format_time(when: float | None) -> str:
    if when is None:
        return "-"
    moment = datetime.datetime.fromtimestamp(when, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def format_event(event: LogEvent) -> str | None:
    """One event as text: a line, plus the traceback of a logged failure."""
    text = eventAsText(
        event, includeTimestamp=False, includeSystem=False, includeTraceback=True
    )
    if not text:
        return None
    level: Any = event.get("log_level")
    level_name = getattr(level, "name", "-").upper()
    namespace = event.get("log_namespace") or "-"
    if namespace == "log_legacy":
        # twisted.python.log.msg: Twisted's older messages, named by their
        # system when they have one.
        system = event.get("log_system")
        namespace = system if system and system != "-" else "twisted"
    return f"{_format_time(event.get('log_time'))} {level_name} {namespace}: {text}\n"


def log_observer(level: LogLevel, stream: IO[str] | None = None) -> ILogObserver:
    """An observer writing events at `level` and above to `stream` (stderr)."""
    return FilteringLogObserver(
        FileLogObserver(stream or sys.stderr, format_event),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )


def start_logging(level: LogLevel, stream: IO[str] | None = None) -> None:
    """Send Twisted's global log to `stream` (stderr) from `level` up. Once
    per process; standard output is left alone (it is not a log)."""
    globalLogBeginner.beginLoggingTo(
        [log_observer(level, stream)], redirectStandardIO=False
    )


def twistd_log_observer(server_options: Mapping[str, Any], level: LogLevel) -> ILogObserver | None:
    """For the twistd plugin: our format and level, written where twistd's
    options say (``--logfile``; standard output with ``-n`` and no logfile,
    as twistd does). None with ``--syslog``, which is left to twistd."""
    if server_options.get("syslog"):
        return None
    logfile = server_options.get("logfile")
    stream: IO[str]
    if logfile == "-" or (not logfile and server_options.get("nodaemon")):
        stream = sys.stdout
    else:
        from twisted.python.logfile import LogFile

        # LogFile is a text file with rotation, untyped in Twisted.
        stream = LogFile.fromFullPath(logfile or "twistd.log")  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
    return log_observer(level, stream)
