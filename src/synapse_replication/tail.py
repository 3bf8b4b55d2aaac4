# -*- test-case-name: tests.test_tail -*-
"""``synapse-replication tail``: watch what flows on a replication bus.

An operator who wonders "is the events stream moving? who writes typing? what
did that worker just announce?" attaches `tail` to the bus and reads:

- over TCP it connects to one of our writers as a client named ``tail-<hex>``.
  The client handshake always sends ``REPLICATE`` (the protocol has no
  handshake without it), so the writer answers with one POSITION per stream;
  that is harmless, and it is what a worker connecting would cause;
- over Redis it only SUBSCRIBEs, to ``<server_name>`` (and to
  ``<server_name>/USER_IP`` with ``--user-ip``), so it can watch any
  deployment, a real Synapse included, without taking part in it. It
  publishes nothing unless ``--replicate`` is given; then it publishes one
  ``REPLICATE`` per subscription (after the SUBSCRIBE is confirmed, so that
  the answers are not missed), which asks every writer for its positions.

It needs no stream, store or `ReplicationCommandHandler`: over TCP a
`TailCommandHandler` forwards every command the transport delivers, and a
protocol subclass shows the lines the handler never gets (``SERVER``,
``PING``, ``ERROR`` and lines that do not parse, which a worker would treat
as fatal: a tail shows them, marked, and stays connected). Over Redis the
bare RESP client delivers each message.

Every command becomes a `TailRecord`; records pass the filters
(`TailFilter`) and then either a line sink (`JsonFormatter`: one object per
line for ``jq``; `TableFormatter`: aligned fixed-width columns) or the
`StatsCollector` view. With ``--catch-up-from`` a `CatchUp` sits in front:
it fetches the rows a stream's writer wrote after a token from its HTTP
endpoint, prints them, then releases the live commands it held meanwhile,
dropping those rows it already printed.

Secrets never reach the output or the logs: access tokens in ``USER_IP`` are
masked (`mask_access_token`), and so is anything shaped like a Matrix access
token elsewhere (Synapse's ``caches`` stream carries tokens as cache keys when
one is invalidated); the Redis password and the replication secret are only
ever sent where they belong.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import math
import os
import re
import secrets
import shutil
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, Protocol, TextIO
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from synapse_replication._argtypes import positive_float, positive_int
from synapse_replication._json import JsonValue
from synapse_replication.commands import (
    COMMAND_MAP,
    AnyCommand,
    CancelTaskCommand,
    ClearUserSyncCommand,
    ErrorCommand,
    FederationAckCommand,
    LockReleasedCommand,
    NameCommand,
    NewActiveTaskCommand,
    PingCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    ServerCommand,
    UserIpCommand,
    UserSyncCommand,
    parse_command_from_line,
)
from synapse_replication.errors import CommandParseError, ReplicationError
from synapse_replication.interfaces import (
    IReplicationCommandHandler,
    IReplicationConnection,
)
from synapse_replication.streams import STREAMS_MAP, StreamUpdateResult

if TYPE_CHECKING:
    from synapse_replication.http import HttpReplicationClient, InstanceLocation
    from synapse_replication.redis import RedisSettings
    from synapse_replication.redis.client import (
        ReconnectingRedisClient,
        RedisClientProtocol,
    )
    from synapse_replication.tcp import ReplicationClientFactory

__all__ = [
    "CatchUp",
    "CatchUpError",
    "CatchUpOptions",
    "CatchUpProgress",
    "Formatter",
    "JsonFormatter",
    "LineSink",
    "StatsCollector",
    "StatsSink",
    "StatsSnapshot",
    "StreamStatsLine",
    "TableFormatter",
    "TailCommandHandler",
    "TailFilter",
    "TailOptions",
    "TailRecord",
    "UsageError",
    "add_tail_arguments",
    "mask_access_token",
    "options_from_args",
    "parse_redis_url",
    "read_line",
    "record_from_command",
    "record_from_line",
    "record_from_row",
    "render_stats",
    "run_tail",
    "run_tail_command",
    "scrub_text",
    "summarize",
]

_log: Final = Logger(namespace="synapse_replication.tail")

# The cli's exit codes (not imported: cli imports this module lazily).
EXIT_OK: Final = 0
EXIT_FAILED: Final = 1
EXIT_USAGE: Final = 2
EXIT_SETUP_FAILED: Final = 3

# `command` of a line that is not a command we know how to read.
NOT_UNDERSTOOD: Final = "?"
BATCH: Final = "batch"

# The highest token the HTTP endpoint accepts (19 digits): the upper bound of
# a catch-up whose target is not known.
MAX_TOKEN: Final = 2**63 - 1

# Live commands held while a catch-up runs; past this the newest are dropped
# (and counted): a catch-up that slow would otherwise hold unbounded memory.
CATCH_UP_BUFFER_LIMIT: Final = 200_000

DEFAULT_STATS_INTERVAL: Final = 1.0
DEFAULT_STATS_WINDOW: Final = 10.0
DEFAULT_CATCH_UP_WAIT: Final = 5.0


class UsageError(ReplicationError):
    """The options do not make sense; the message says which and why, and
    never repeats a secret."""


# -- secrets


# Access and refresh tokens as Synapse mints them (``syt_``, ``syr_``, ...)
# and the macaroons older versions used. Matched wherever they appear, so that
# a token in a cache invalidation or a hand-published line is not printed.
_TOKEN_RE: Final = re.compile(
    r"(?<![A-Za-z0-9])(?:sy[a-z]_[A-Za-z0-9_\-]{6,}|MDAx[A-Za-z0-9+/=_\-]{20,})"
)
_ELLIPSIS: Final = "\u2026"


def mask_access_token(token: str) -> str:
    """What may be shown of an access token: its first four characters
    (``syt_`` says which kind it is) when at least twelve more stay hidden,
    else nothing."""
    if len(token) >= 16:
        return token[:4] + _ELLIPSIS
    return "<redacted>"


def scrub_text(text: str) -> str:
    """`text` with everything shaped like an access token masked."""
    if _TOKEN_RE.search(text) is None:
        return text
    return _TOKEN_RE.sub(lambda m: mask_access_token(m.group(0)), text)


def _scrub_value(value: JsonValue) -> JsonValue:
    """`value` with every string scrubbed (a copy where anything changed)."""
    if isinstance(value, str):
        return scrub_text(value)
    if isinstance(value, list):
        return [_scrub_value(v) for v in value]
    if isinstance(value, dict):
        return {scrub_text(k): _scrub_value(v) for k, v in value.items()}
    return value


def _mask_row(stream: str, row: JsonValue) -> JsonValue:
    """`row` with the secrets it may carry masked.

    Synapse invalidates caches keyed by access token (``get_user_by_access_token``
    and others) through the ``caches`` stream, with the token as the key: every
    string key of such a row is masked, whatever its shape (appservice tokens
    have none). Anything else shaped like a token is masked wherever it is.
    """
    if (
        stream == "caches"
        and isinstance(row, list)
        and len(row) == 3
        and isinstance(row[0], str)
        and "token" in row[0].lower()
        and isinstance(row[1], list)
    ):
        keys = [mask_access_token(k) if isinstance(k, str) else k for k in row[1]]
        row = [row[0], keys, row[2]]
    return _scrub_value(row)


# -- records


@attrs.frozen(slots=True)
class TailRecord:
    """One thing seen on the bus, as `tail` shows it.

    `stream`, `instance` and `token` are the columns every view shares (None
    where a command has none); `fields` are the command's own values, JSON
    values in output order. A line that could not be read has `command`
    ``"?"``, an `error` and its `raw` text (secrets masked);
    `guessed_command`, `stream` and `instance` are then read from the line as
    far as possible, so that filters still find it. `catch_up` marks rows
    fetched over HTTP rather than seen live.
    """

    ts: float
    source: str
    command: str
    stream: str | None = None
    instance: str | None = None
    token: int | str | None = None
    fields: Mapping[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    raw: str | None = None
    catch_up: bool = False
    guessed_command: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``--format json``."""
        out: dict[str, Any] = {
            "ts": round(self.ts, 3),
            "source": self.source,
            "command": self.command,
        }
        if self.stream is not None:
            out["stream"] = self.stream
        if self.instance is not None:
            out["instance"] = self.instance
        if self.token is not None:
            out["token"] = self.token
        out.update(self.fields)
        if self.catch_up:
            out["catch_up"] = True
        if self.error is not None:
            out["error"] = self.error
        if self.raw is not None:
            out["raw"] = self.raw
        return out


def _tuples_as_lists(instance: Any, field: Any, value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _parsed_fields(row: Any) -> dict[str, Any]:
    """A typed row as a JSON object: its fields by name, tuples as lists, and
    the kind of row first for streams with several (``events``: ``ev``,
    ``state``, ``state-all``), under ``kind`` because events have a ``type``."""
    values: dict[str, Any] = attrs.asdict(row, value_serializer=_tuples_as_lists)
    kind = getattr(type(row), "TYPE_ID", None)
    if isinstance(kind, str):
        return {"kind": kind, **values}
    return values


def record_from_row(
    stream: str,
    instance: str,
    token: int | None,
    row: JsonValue,
    *,
    ts: float,
    source: str,
    catch_up: bool = False,
) -> TailRecord:
    """An RDATA record: the raw `row` and, when the stream is known and the
    row has its shape, the typed fields under ``parsed``. A row that does not
    parse is shown with the reason; an unknown stream is shown raw."""
    row = _mask_row(stream, row)
    fields: dict[str, Any] = {"row": row}
    error = None
    stream_class = STREAMS_MAP.get(stream)
    if stream_class is not None:
        try:
            parsed = stream_class.parse_row(row)
        except Exception as e:  # a StreamRowError, or any surprise: shown, never fatal
            error = scrub_text(f"row is not a valid {stream} row: {e}")
        else:
            fields["parsed"] = _parsed_fields(parsed)
    return TailRecord(
        ts=ts,
        source=source,
        command=RdataCommand.NAME,
        stream=stream,
        instance=instance,
        token=BATCH if token is None else token,
        fields=fields,
        error=error,
        catch_up=catch_up,
    )


def record_from_command(cmd: AnyCommand, *, ts: float, source: str) -> TailRecord:
    """The record for a parsed command."""
    if isinstance(cmd, RdataCommand):
        return record_from_row(
            cmd.stream_name, cmd.instance_name, cmd.token, cmd.row, ts=ts, source=source
        )
    stream = instance = None
    token: int | None = None
    fields: dict[str, Any] = {}
    if isinstance(cmd, PositionCommand):
        stream, instance, token = cmd.stream_name, cmd.instance_name, cmd.new_token
        fields = {"prev_token": cmd.prev_token, "new_token": cmd.new_token}
    elif isinstance(cmd, UserSyncCommand):
        instance = cmd.instance_id
        fields = {
            "user_id": cmd.user_id,
            "device_id": cmd.device_id,
            "state": "start" if cmd.is_syncing else "end",
            "last_sync_ms": cmd.last_sync_ms,
        }
    elif isinstance(cmd, UserIpCommand):
        fields = {
            "user_id": cmd.user_id,
            "access_token": mask_access_token(cmd.access_token),
            "ip": cmd.ip,
            "user_agent": cmd.user_agent,
            "device_id": cmd.device_id,
            "last_seen": cmd.last_seen,
        }
    elif isinstance(cmd, LockReleasedCommand):
        instance = cmd.instance_name
        fields = {"lock_name": cmd.lock_name, "lock_key": cmd.lock_key}
    elif isinstance(cmd, FederationAckCommand):
        instance, token = cmd.instance_name, cmd.token
    elif isinstance(cmd, ClearUserSyncCommand):
        instance = cmd.instance_id
    elif isinstance(cmd, ServerCommand | RemoteServerUpCommand):
        fields = {"server": cmd.data}
    elif isinstance(cmd, NameCommand):
        instance = cmd.data
    elif isinstance(cmd, PingCommand):
        fields = {"data": cmd.data}
    elif isinstance(cmd, ErrorCommand):
        fields = {"message": cmd.data}
    elif isinstance(cmd, NewActiveTaskCommand | CancelTaskCommand):
        fields = {"task_id": cmd.data}
    elif isinstance(cmd, ReplicateCommand):
        pass
    return TailRecord(
        ts=ts,
        source=source,
        command=cmd.NAME,
        stream=stream,
        instance=instance,
        token=token,
        # Any text may carry a token, if only by mistake.
        fields=_scrub_value(fields),
    )


def _not_understood(
    ts: float,
    source: str,
    text: str | None,
    *,
    error: str | None = None,
    parse_error: CommandParseError | None = None,
    holds_secrets: bool,
) -> TailRecord:
    """The record of a line that is not a command we can read.

    What it seemed to be is kept for the filters (its first word if that is a
    command name; stream and instance for RDATA and POSITION). A line that
    may hold an access token (one on the USER_IP channel, or starting with
    USER_IP) is shown only up to its user id, and so is the error about it
    (`UserIpCommand`'s errors show only the user id; others show the line).
    """
    words = text.split(" ", 3) if text is not None else []
    guessed = words[0] if words and words[0] in COMMAND_MAP else None
    stream = instance = None
    if guessed in (RdataCommand.NAME, PositionCommand.NAME):
        stream = words[1] if len(words) > 1 and words[1] else None
        instance = words[2] if len(words) > 2 and words[2] else None
    secret = holds_secrets or guessed == UserIpCommand.NAME
    if parse_error is not None:
        if not secret or parse_error.command == UserIpCommand.NAME:
            error = str(parse_error)
        else:
            error = f"not a command ({guessed or 'unknown command'})"
    assert error is not None
    raw: str | None
    if text is None:
        raw = None
    elif secret:
        shown = " ".join(words[:2]) if guessed == UserIpCommand.NAME else ""
        hidden = len(text) - len(shown) - (1 if shown else 0)
        raw = f"{shown} <{hidden} more characters not shown: may hold an access token>".lstrip()
    else:
        raw = scrub_text(text)
    return TailRecord(
        ts=ts,
        source=source,
        command=NOT_UNDERSTOOD,
        stream=stream,
        instance=instance,
        error=scrub_text(error),
        raw=raw,
        guessed_command=guessed,
    )


def read_line(
    data: bytes, *, ts: float, source: str, holds_secrets: bool = False
) -> AnyCommand | TailRecord | None:
    """The command on one line (without its newline) as it came off the
    wire; a ``"?"`` record if it is not one; None for a blank line, which
    every reader ignores.

    Never raises: bytes that are not UTF-8, unknown commands and malformed
    arguments all become a record. `holds_secrets`: the line came from where
    access tokens travel (the USER_IP channel); if it is unreadable, it is
    not shown.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        return _not_understood(
            ts,
            source,
            None if holds_secrets else data.decode("utf-8", "backslashreplace"),
            error=f"not UTF-8 (byte {e.start} of {len(data)})",
            holds_secrets=holds_secrets,
        )
    if not text.strip():
        return None
    try:
        return parse_command_from_line(text)
    except CommandParseError as e:
        return _not_understood(ts, source, text, parse_error=e, holds_secrets=holds_secrets)


def record_from_line(
    data: bytes, *, ts: float, source: str, holds_secrets: bool = False
) -> TailRecord | None:
    """`read_line`, with a command made into its record."""
    result = read_line(data, ts=ts, source=source, holds_secrets=holds_secrets)
    if result is None or isinstance(result, TailRecord):
        return result
    return record_from_command(result, ts=ts, source=source)


# -- filters


@attrs.frozen
class TailFilter:
    """Which records are shown: each non-empty set must contain the record's
    value. A line not understood matches ``--command '?'`` and the command it
    seemed to be; it has a stream and an instance only if they could be read,
    so it is hidden by ``--stream`` and ``--instance`` otherwise."""

    streams: frozenset[str] = frozenset()
    instances: frozenset[str] = frozenset()
    commands: frozenset[str] = frozenset()

    def __call__(self, record: TailRecord) -> bool:
        if (
            self.commands
            and record.command not in self.commands
            and record.guessed_command not in self.commands
        ):
            return False
        if self.streams and record.stream not in self.streams:
            return False
        return not self.instances or record.instance in self.instances


# -- formatting


def _compact(value: JsonValue) -> str:
    return json.dumps(value, ensure_ascii=True, separators=(",", ":"))


def _text(value: JsonValue) -> str:
    return value if isinstance(value, str) else _compact(value)


# Control characters (C0, DEL, C1) would let a row rewrite the operator's
# terminal; they are shown escaped.
_CONTROL: Final = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))}


def _printable(text: str) -> str:
    """`text` safe to write to a terminal: control and other non-printable
    characters (bidi overrides, line separators) escaped."""
    if text.isprintable():
        return text
    text = text.translate(_CONTROL)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in text)


def _row_summary(stream: str | None, parsed: Mapping[str, Any] | None, row: JsonValue) -> str:
    """A row in a few words: the fields that identify it first, nulls left out."""
    if parsed is None:
        return _compact(row)
    p = parsed
    if stream == "events":
        kind = p.get("kind")
        if kind == "ev":
            parts = ["ev", p["type"], p["event_id"], f"room={p['room_id']}"]
            if p["state_key"] is not None:
                parts.append(f"state_key={_compact(p['state_key'])}")
            for key in ("membership", "redacts", "relates_to"):
                if p[key] is not None:
                    parts.append(f"{key}={p[key]}")
            parts += [flag for flag in ("rejected", "outlier") if p[flag]]
            return " ".join(parts)
        if kind == "state":
            target = p["event_id"] if p["event_id"] is not None else "(removed)"
            return (
                f"state {p['type']} {_compact(p['state_key'])} -> {target} room={p['room_id']}"
            )
        if kind == "state-all":
            return f"state-all room={p['room_id']}"
    if stream == "typing":
        users = ", ".join(p["user_ids"]) or "(nobody)"
        return f"{p['room_id']} typing: {users}"
    if stream == "receipts":
        thread = f" thread={p['thread_id']}" if p["thread_id"] is not None else ""
        return (
            f"{p['receipt_type']} {p['user_id']} -> {p['event_id']} "
            f"room={p['room_id']}{thread}"
        )
    return " ".join(f"{k}={_text(v)}" for k, v in p.items() if v is not None)


def summarize(record: TailRecord) -> str:
    """The last column of the table: what the command says, in a few words."""
    f = record.fields
    if record.command == NOT_UNDERSTOOD:
        return f"{record.error}" + (f": {record.raw}" if record.raw is not None else "")
    if record.command == RdataCommand.NAME:
        if record.error is not None:
            return f"{record.error}; row {_compact(f['row'])}"
        return _row_summary(record.stream, f.get("parsed"), f["row"])
    if record.command == PositionCommand.NAME:
        return f"prev={f['prev_token']} new={f['new_token']}"
    if record.command == UserSyncCommand.NAME:
        return f"{f['user_id']} device={f['device_id']} {f['state']} last_sync_ms={f['last_sync_ms']}"
    if record.command == UserIpCommand.NAME:
        return (
            f"{f['user_id']} ip={f['ip']} device={f['device_id']} "
            f"token={f['access_token']} last_seen={f['last_seen']} "
            f"user_agent={_compact(f['user_agent'])}"
        )
    if record.command == LockReleasedCommand.NAME:
        return f"lock={f['lock_name']} key={f['lock_key']}"
    return " ".join(_text(v) for v in f.values())


class Formatter(Protocol):
    """Turns records into output lines."""

    def header(self) -> list[str]:
        """Lines written once, before any record."""

    def format(self, record: TailRecord) -> str:
        """One line, without its newline."""


class JsonFormatter:
    """One compact, ASCII JSON object per line, for ``jq`` and scripts."""

    def header(self) -> list[str]:
        return []

    def format(self, record: TailRecord) -> str:
        return _compact(record.to_json())


def _local_time(ts: float) -> str:
    """``HH:MM:SS.mmm`` in local time."""
    millis = int(ts * 1000) % 1000
    return time.strftime("%H:%M:%S", time.localtime(ts)) + f".{millis:03d}"


class TableFormatter:
    """Fixed-width columns, so that they line up whatever flows:

    ``!!`` in the first column marks something not understood (a bad line, a
    row that does not parse), ``<<`` a row fetched by ``--catch-up-from``.
    Text longer than its column is cut with ``…``; tokens are never cut (a
    token over 10 digits widens its own line only). Lines are cut to `width`
    (the terminal's) when given, so that they never wrap.
    """

    COLUMNS: Final = (("", 2), ("TIME", 12), ("COMMAND", 16), ("STREAM", 23), ("INSTANCE", 16))
    TOKEN_WIDTH: Final = 10

    def __init__(self, width: int | None = None, clock: Callable[[float], str] = _local_time) -> None:
        self._width = width
        self._time = clock

    def header(self) -> list[str]:
        cells = [name.ljust(size) for name, size in self.COLUMNS]
        return [self._join(cells, "TOKEN".rjust(self.TOKEN_WIDTH), "SUMMARY")]

    def format(self, record: TailRecord) -> str:
        if record.error is not None:
            mark = "!!"
        elif record.catch_up:
            mark = "<<"
        else:
            mark = ""
        values = (mark, self._time(record.ts), record.command, record.stream, record.instance)
        cells = [
            _fit(value or "", size) for value, (_, size) in zip(values, self.COLUMNS, strict=True)
        ]
        token = "" if record.token is None else _printable(str(record.token))
        return self._join(cells, token.rjust(self.TOKEN_WIDTH), _printable(summarize(record)))

    def _join(self, cells: list[str], token: str, summary: str) -> str:
        line = " ".join(cells) + " " + token + "  " + summary
        if self._width is not None and len(line) > self._width:
            line = line[: self._width - 1] + _ELLIPSIS
        return line


def _fit(text: str, size: int) -> str:
    text = _printable(text)
    if len(text) > size:
        return text[: size - 1] + _ELLIPSIS
    return text.ljust(size)


# -- line output


class _Output:
    """Writes to stdout until it is closed on us (``tail | head``): then the
    tail ends quietly, as Unix tools do."""

    def __init__(self, out: TextIO, on_closed: Callable[[], None]) -> None:
        self._out = out
        self._on_closed = on_closed
        self.closed = False

    def write(self, text: str) -> None:
        if self.closed:
            return
        try:
            self._out.write(text)
            self._out.flush()
        except (BrokenPipeError, ValueError):  # ValueError: the file was closed
            self.closed = True
            self._on_closed()


class LineSink:
    """Shows each record that passes the filter as one line; after `count`
    lines calls `on_done`."""

    def __init__(
        self,
        *,
        out: TextIO,
        formatter: Formatter,
        accept: Callable[[TailRecord], bool],
        count: int | None,
        on_done: Callable[[], None],
    ) -> None:
        self._output = _Output(out, on_done)
        self._formatter = formatter
        self._accept = accept
        self._count = count
        self._on_done = on_done
        self.printed = 0

    def start(self) -> None:
        for line in self._formatter.header():
            self._output.write(line + "\n")

    def stop(self) -> None:
        pass

    def __call__(self, record: TailRecord) -> None:
        if self._output.closed or (self._count is not None and self.printed >= self._count):
            return
        if not self._accept(record):
            return
        self._output.write(self._formatter.format(record) + "\n")
        self.printed += 1
        if self._count is not None and self.printed >= self._count:
            self._on_done()


# -- stats


# Rates are counted in buckets of a tenth of a second.
_BUCKETS_PER_S: Final = 10


def _bucket(t: float) -> int:
    # The epsilon keeps 0.3 s in bucket 3 although 0.3 * 10 < 3 in floats.
    return math.floor(t * _BUCKETS_PER_S + 1e-6)


@attrs.define
class _WriterStats:
    rows: int = 0
    positions: int = 0
    token: int | None = None
    # [bucket number, rows in it], oldest first.
    buckets: deque[list[int]] = attrs.Factory(deque)

    def add_row(self, now: float) -> None:
        bucket = _bucket(now)
        if self.buckets and self.buckets[-1][0] == bucket:
            self.buckets[-1][1] += 1
        else:
            self.buckets.append([bucket, 1])

    def recent(self, now: float, window: float) -> int:
        first = _bucket(now - window)
        while self.buckets and self.buckets[0][0] < first:
            self.buckets.popleft()
        return sum(count for _, count in self.buckets)


@attrs.frozen
class StreamStatsLine:
    """One (stream, writer) of a stats view; `instance` ``*`` is the whole
    stream when it has several writers (rates and counts summed; the token is
    the lowest, the stream's position for a reader)."""

    stream: str
    instance: str
    rate: float
    token: int | None
    rows: int
    positions: int


@attrs.frozen
class StatsSnapshot:
    """What the stats view shows at one moment."""

    ts: float
    uptime: float
    window: float
    lines: tuple[StreamStatsLine, ...]
    commands: Mapping[str, int]
    total: int
    not_understood: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ts": round(self.ts, 3),
            "uptime": round(self.uptime, 3),
            "window": self.window,
            "streams": [
                {
                    "stream": line.stream,
                    "instance": line.instance,
                    "rate": round(line.rate, 3),
                    "token": line.token,
                    "rows": line.rows,
                    "positions": line.positions,
                }
                for line in self.lines
            ],
            "commands": dict(self.commands),
            "total": self.total,
            "not_understood": self.not_understood,
        }


class StatsCollector:
    """Counts what flows, per stream and writer: rows per second over the
    last `window` seconds (over the time since `start` while that is shorter,
    and never over less than a second, so a burst at start-up does not read
    as a huge rate), the current token (the latest RDATA or POSITION token
    seen; ``batch`` rows do not move it) and counts."""

    def __init__(self, *, start: float, window: float = DEFAULT_STATS_WINDOW) -> None:
        self._start = start
        self._window = window
        self._writers: dict[tuple[str, str], _WriterStats] = {}
        self._commands: dict[str, int] = {}
        self._total = 0

    def observe(self, record: TailRecord, now: float) -> None:
        self._total += 1
        self._commands[record.command] = self._commands.get(record.command, 0) + 1
        if record.command not in (RdataCommand.NAME, PositionCommand.NAME):
            return
        assert record.stream is not None and record.instance is not None
        stats = self._writers.get((record.stream, record.instance))
        if stats is None:
            stats = self._writers[(record.stream, record.instance)] = _WriterStats()
        if isinstance(record.token, int):
            stats.token = record.token
        if record.command == RdataCommand.NAME:
            stats.rows += 1
            stats.add_row(now)
        else:
            stats.positions += 1

    def snapshot(self, now: float) -> StatsSnapshot:
        span = max(min(self._window, now - self._start), 1.0)
        lines: list[StreamStatsLine] = []
        for stream in sorted({s for s, _ in self._writers}):
            per_writer = [
                StreamStatsLine(
                    stream,
                    instance,
                    stats.recent(now, self._window) / span,
                    stats.token,
                    stats.rows,
                    stats.positions,
                )
                for (s, instance), stats in sorted(self._writers.items())
                if s == stream
            ]
            lines += per_writer
            if len(per_writer) > 1:
                tokens = [line.token for line in per_writer if line.token is not None]
                lines.append(
                    StreamStatsLine(
                        stream,
                        "*",
                        sum(line.rate for line in per_writer),
                        min(tokens) if tokens else None,
                        sum(line.rows for line in per_writer),
                        sum(line.positions for line in per_writer),
                    )
                )
        return StatsSnapshot(
            ts=now,
            uptime=now - self._start,
            window=self._window,
            lines=tuple(lines),
            commands=dict(sorted(self._commands.items())),
            total=self._total,
            not_understood=self._commands.get(NOT_UNDERSTOOD, 0),
        )


def render_stats(snapshot: StatsSnapshot, source: str, clock: Callable[[float], str] = _local_time) -> list[str]:
    """The stats view as text lines (the same on a terminal and in a pipe)."""
    lines = [
        _printable(
            f"tail {source} | {clock(snapshot.ts)} | up {snapshot.uptime:.0f} s | "
            f"rates over the last {snapshot.window:g} s"
        ),
        f"{'STREAM':<24} {'INSTANCE':<16} {'ROWS/S':>10} {'TOKEN':>12} {'ROWS':>10} {'POSITIONS':>10}",
    ]
    for line in snapshot.lines:
        token = "-" if line.token is None else str(line.token)
        lines.append(
            f"{_fit(line.stream, 24)} {_fit(line.instance, 16)} {line.rate:>10.1f} "
            f"{token:>12} {line.rows:>10} {line.positions:>10}"
        )
    if not snapshot.lines:
        lines.append("(no RDATA or POSITION yet)")
    commands = ", ".join(f"{name} {count}" for name, count in snapshot.commands.items())
    lines.append(
        _printable(f"{snapshot.total} commands ({commands or 'none'}); {snapshot.not_understood} not understood")
    )
    return lines


class StatsSink:
    """Counts the records that pass the filter and shows the counts every
    `interval` seconds: redrawn in place on a terminal (`ansi`), as a block
    of lines (or, with `as_json`, one JSON object) per refresh otherwise.
    After `count` refreshes calls `on_done`."""

    def __init__(
        self,
        *,
        out: TextIO,
        clock: IReactorTime,
        accept: Callable[[TailRecord], bool],
        source: str,
        interval: float,
        window: float,
        ansi: bool,
        as_json: bool,
        width: int | None,
        count: int | None,
        on_done: Callable[[], None],
    ) -> None:
        self._output = _Output(out, on_done)
        self._clock = clock
        self._accept = accept
        self._source = source
        self._interval = interval
        self._ansi = ansi
        self._as_json = as_json
        self._width = width
        self._count = count
        self._on_done = on_done
        self.collector = StatsCollector(start=clock.seconds(), window=window)
        self.printed = 0
        self._loop: LoopingCall | None = None

    def start(self) -> None:
        loop = LoopingCall(self.refresh)
        loop.clock = self._clock
        loop.start(self._interval, now=False)
        self._loop = loop

    def stop(self) -> None:
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def __call__(self, record: TailRecord) -> None:
        if self._accept(record):
            self.collector.observe(record, self._clock.seconds())

    def refresh(self) -> None:
        if self._count is not None and self.printed >= self._count:
            return
        snapshot = self.collector.snapshot(self._clock.seconds())
        if self._as_json:
            self._output.write(_compact(snapshot.to_json()) + "\n")
        else:
            lines = render_stats(snapshot, self._source)
            if self._width is not None:
                lines = [line[: self._width] for line in lines]
            if self._ansi:
                # Home and clear: the view replaces itself, like top(1).
                self._output.write("\x1b[H\x1b[2J" + "\n".join(lines) + "\n")
            else:
                self._output.write("\n".join(lines) + "\n\n")
        self.printed += 1
        if self._count is not None and self.printed >= self._count:
            self._on_done()


# -- catch-up


FetchFunction = Callable[[str, int, int], Awaitable[StreamUpdateResult]]


class CatchUpError(ReplicationError):
    """The catch-up could not start or could not fetch its rows."""


class CatchUpProgress:
    """Reports a catch-up on stderr: a bar redrawn in place on a terminal,
    else a line when it starts, at most one every few seconds, and one when
    it ends."""

    BAR_WIDTH: Final = 30
    PLAIN_EVERY_S: Final = 2.0

    def __init__(self, out: TextIO, *, tty: bool, clock: IReactorTime) -> None:
        self._out = out
        self._tty = tty
        self._clock = clock
        self._from = 0
        self._target: int | None = None
        self._label = ""
        self._last_plain = 0.0

    def _write(self, text: str) -> None:
        try:
            self._out.write(text)
            self._out.flush()
        except (OSError, ValueError):
            pass

    def start(self, label: str, from_token: int, target: int | None, where: str) -> None:
        self._label, self._from, self._target = label, from_token, target
        self._last_plain = self._clock.seconds()
        upto = "the writer's current position" if target is None else str(target)
        if not self._tty:
            self._write(f"catch-up {label}: fetching rows after {from_token} up to {upto} from {where}\n")
        self.update(0, from_token)

    def update(self, rows: int, token: int) -> None:
        target = "?" if self._target is None else str(self._target)
        text = f"catch-up {self._label}: {rows} rows, token {token}/{target}"
        if self._tty:
            bar = ""
            if self._target is not None and self._target > self._from:
                done = min(max((token - self._from) / (self._target - self._from), 0.0), 1.0)
                filled = round(done * self.BAR_WIDTH)
                bar = "[" + "#" * filled + "." * (self.BAR_WIDTH - filled) + "] "
            self._write("\r\x1b[K" + bar + text)
            return
        now = self._clock.seconds()
        if now - self._last_plain >= self.PLAIN_EVERY_S:
            self._last_plain = now
            self._write(text + "\n")

    def finish(self, rows: int, token: int) -> None:
        text = f"catch-up {self._label}: done, {rows} rows up to token {token}"
        self._write(("\r\x1b[K" if self._tty else "") + text + "\n")


class CatchUp:
    """Shows the rows of `stream` that writers wrote after `from_token`, then
    the live commands, without a row twice.

    Live records are held from the start. The target of each writer is the
    first position of it seen live: a POSITION's new token (the answer to
    REPLICATE), or else the token of an RDATA (a writer only sends rows up to
    its position, so every row up to that token can be fetched). Rows in
    ``(from_token, target]`` are fetched page by page (`fetch` loops while the
    answer is `limited`) and shown as they come; then the held records are
    released, and live rows of that writer at or below the caught-up token
    are dropped, with the ``batch`` rows before them (a group is dropped or
    shown whole), until the first live row past it.

    Without `instances`, the writer is the first instance seen announcing the
    stream. When no position is seen within `wait_s`, rows are fetched until
    the endpoint says `limited` is false and the caught-up token is the last
    row's (a row committed out of order at that very moment could then be
    missed: --replicate, or TCP, gives an exact target).
    """

    def __init__(
        self,
        *,
        clock: IReactorTime,
        stream: str,
        instances: Sequence[str],
        from_token: int,
        fetch: Callable[[str], FetchFunction],
        where: Callable[[str], str],
        emit: Callable[[TailRecord], None],
        progress: CatchUpProgress,
        wait_s: float = DEFAULT_CATCH_UP_WAIT,
        buffer_limit: int = CATCH_UP_BUFFER_LIMIT,
    ) -> None:
        self._clock = clock
        self._stream = stream
        self._instances = list(instances)
        self._from_token = from_token
        self._fetch = fetch
        self._where = where
        self._emit = emit
        self._progress = progress
        self._wait_s = wait_s
        self._buffer_limit = buffer_limit
        self.catching_up = True
        self._held_live: deque[TailRecord] = deque()
        # The first position seen live of each writer of the stream, in order.
        self._seen: dict[str, int] = {}
        self._waiters: list[Deferred[None]] = []
        # Writer -> caught-up token, while its live rows may repeat fetched ones.
        self._thresholds: dict[str, int] = {}
        self._held_batch: dict[str, list[TailRecord]] = {}
        self.fetched = 0
        self.duplicates = 0
        self.dropped = 0

    def __call__(self, record: TailRecord) -> None:
        """A live record from the bus."""
        if not self.catching_up:
            self._release(record)
            return
        if len(self._held_live) >= self._buffer_limit:
            self.dropped += 1
        else:
            self._held_live.append(record)
        # Held first: learning a target may resume `run`, which may finish
        # and release the held records before this call returns.
        self._learn(record)

    def _learn(self, record: TailRecord) -> None:
        if record.stream != self._stream or record.instance is None:
            return
        if record.command == PositionCommand.NAME:
            token = record.fields["new_token"]
        elif record.command == RdataCommand.NAME and isinstance(record.token, int):
            token = record.token
        else:
            return
        if record.instance not in self._seen:
            self._seen[record.instance] = token
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                if not d.called:
                    d.callback(None)

    async def _until(self, condition: Callable[[], bool], deadline: float) -> bool:
        """Wait until `condition()` holds (True) or `deadline` passes (False)."""
        while not condition():
            remaining = deadline - self._clock.seconds()
            if remaining <= 0:
                return False
            d: Deferred[None] = Deferred()
            self._waiters.append(d)

            def wake(d: Deferred[None] = d) -> None:
                if not d.called:
                    d.callback(None)

            timer = self._clock.callLater(remaining, wake)
            try:
                await d
            finally:
                if timer.active():
                    timer.cancel()
                if d in self._waiters:
                    self._waiters.remove(d)
        return True

    async def run(self) -> None:
        """Fetch and show the missed rows, then release the live records.
        Raises `CatchUpError` (or `HttpCatchUpError`) if that fails."""
        deadline = self._clock.seconds() + self._wait_s
        instances = self._instances
        if not instances:
            if not await self._until(lambda: bool(self._seen), deadline):
                raise CatchUpError(
                    f"no writer of stream {self._stream!r} announced itself within "
                    f"{self._wait_s:g} s; name it with --instance (and use --replicate "
                    "over Redis to ask writers for their positions)"
                )
            instances = [next(iter(self._seen))]
        for instance in instances:
            await self._until(functools.partial(self._seen.__contains__, instance), deadline)
            caught_up = await self._fetch_rows(instance, self._seen.get(instance))
            self._thresholds[instance] = max(caught_up, self._from_token)
        self.catching_up = False
        held, self._held_live = self._held_live, deque()
        for record in held:
            self._release(record)
        if self.dropped:
            _log.warn(
                "{count} live commands were dropped while catching up (more than "
                "{limit} arrived during the catch-up)",
                count=self.dropped,
                limit=self._buffer_limit,
            )

    async def _fetch_rows(self, instance: str, target: int | None) -> int:
        """Show the rows of `instance` in ``(from_token, target]``; the token
        caught up to."""
        label = f"{self._stream} from {instance}"
        current = self._from_token
        self._progress.start(label, current, target, self._where(instance))
        if target is not None and target <= current:
            self._progress.finish(0, current)
            return current
        if target is None:
            _log.warn(
                "No position of {instance} for {stream} seen within {wait} s: fetching "
                "until the writer has no more rows",
                instance=instance,
                stream=self._stream,
                wait=self._wait_s,
            )
        fetch = self._fetch(instance)
        rows = 0
        while True:
            updates, upto, limited = await fetch(
                instance, current, MAX_TOKEN if target is None else target
            )
            now = self._clock.seconds()
            last_row = current
            for token, row in updates:
                self._emit(
                    record_from_row(
                        self._stream,
                        instance,
                        token,
                        row,
                        ts=now,
                        source=self._where(instance),
                        catch_up=True,
                    )
                )
                last_row = token
            rows += len(updates)
            self.fetched += len(updates)
            if limited:
                current = upto
            elif target is not None:
                current = max(upto, current)
            else:
                current = last_row
            self._progress.update(rows, current)
            if not limited:
                break
        self._progress.finish(rows, current)
        return current

    def _release(self, record: TailRecord) -> None:
        """Show a live record, unless it is a row already fetched."""
        instance = record.instance
        if (
            record.command != RdataCommand.NAME
            or record.stream != self._stream
            or instance is None
            or instance not in self._thresholds
        ):
            self._emit(record)
            return
        if not isinstance(record.token, int):
            # A `batch` row: its token comes with the last row of its group.
            self._held_batch.setdefault(instance, []).append(record)
            return
        group = self._held_batch.pop(instance, [])
        group.append(record)
        if record.token <= self._thresholds[instance]:
            self.duplicates += len(group)
            return
        # Past the caught-up token: from here on every row of this writer is new.
        del self._thresholds[instance]
        for row_record in group:
            self._emit(row_record)


# -- the transports


@implementer(IReplicationCommandHandler)
class TailCommandHandler:
    """A command handler that handles nothing: it passes every command a
    transport delivers to `emit`, and keeps the live connections so that they
    can be closed at the end. A tail keeps no positions and fetches nothing,
    so it needs no streams."""

    def __init__(self, emit: Callable[[AnyCommand, IReplicationConnection], None]) -> None:
        self._emit = emit
        self.connections: list[IReplicationConnection] = []

    def new_connection(self, connection: IReplicationConnection) -> None:
        _log.info("Connected: {conn}", conn=connection.describe())
        self.connections.append(connection)

    def lost_connection(self, connection: IReplicationConnection) -> None:
        _log.info("Disconnected: {conn}", conn=connection.describe())
        if connection in self.connections:
            self.connections.remove(connection)

    def on_replicate(self, connection: IReplicationConnection, cmd: ReplicateCommand) -> None:
        self._emit(cmd, connection)

    def on_rdata(self, connection: IReplicationConnection, cmd: RdataCommand) -> None:
        self._emit(cmd, connection)

    def on_position(self, connection: IReplicationConnection, cmd: PositionCommand) -> None:
        self._emit(cmd, connection)

    def on_user_sync(self, connection: IReplicationConnection, cmd: UserSyncCommand) -> None:
        self._emit(cmd, connection)

    def on_clear_user_sync(
        self, connection: IReplicationConnection, cmd: ClearUserSyncCommand
    ) -> None:
        self._emit(cmd, connection)

    def on_federation_ack(
        self, connection: IReplicationConnection, cmd: FederationAckCommand
    ) -> None:
        self._emit(cmd, connection)

    def on_user_ip(self, connection: IReplicationConnection, cmd: UserIpCommand) -> None:
        self._emit(cmd, connection)

    def on_remote_server_up(
        self, connection: IReplicationConnection, cmd: RemoteServerUpCommand
    ) -> None:
        self._emit(cmd, connection)

    def on_lock_released(
        self, connection: IReplicationConnection, cmd: LockReleasedCommand
    ) -> None:
        self._emit(cmd, connection)

    def on_new_active_task(
        self, connection: IReplicationConnection, cmd: NewActiveTaskCommand
    ) -> None:
        self._emit(cmd, connection)

    def on_cancel_task(self, connection: IReplicationConnection, cmd: CancelTaskCommand) -> None:
        self._emit(cmd, connection)


class _Source(Protocol):
    description: str

    def start(self) -> None: ...

    async def stop(self) -> None: ...


# The commands a server sends that the protocol handles itself; the handler
# never sees them, so the protocol shows them.
_PROTOCOL_COMMANDS: Final = frozenset({ServerCommand.NAME, PingCommand.NAME, ErrorCommand.NAME})


def _tcp_factory(
    reactor: Any,
    *,
    server_name: str,
    instance_name: str,
    handler: TailCommandHandler,
    on_record: Callable[[TailRecord], None],
    source: str,
) -> ReplicationClientFactory:
    """A reconnecting client factory whose protocols show every line.

    A worker's protocol closes the connection on a line it cannot read (a
    worker must not guess); a tail's shows the line, marked, and stays. Lines
    the handler receives are left to the handler, and lines that go nowhere
    (a client-only command sent by a server) are shown and otherwise ignored.
    """
    from synapse_replication.commands import VALID_SERVER_COMMANDS
    from synapse_replication.tcp import (
        Backoff,
        ClientReplicationProtocol,
        ReplicationClientFactory,
    )

    class TailClientProtocol(ClientReplicationProtocol):
        def lineReceived(self, line: bytes) -> None:
            text = line[:-1] if line[-1:] == b"\r" else line
            ts = reactor.seconds()
            result = read_line(text, ts=ts, source=source)
            if result is None:
                return
            if isinstance(result, TailRecord):
                on_record(result)
                return
            if result.NAME not in VALID_SERVER_COMMANDS:
                on_record(record_from_command(result, ts=ts, source=source))
                return
            if result.NAME in _PROTOCOL_COMMANDS:
                on_record(record_from_command(result, ts=ts, source=source))
            # The protocol parses the line again: it must see every line the
            # peer sends (keepalive, handshake) and its handler gets the rest.
            super().lineReceived(line)

    class TailClientFactory(ReplicationClientFactory):
        def buildProtocol(self, addr: Any) -> ClientReplicationProtocol:
            proto = TailClientProtocol(
                clock=reactor,
                handler=handler,
                server_name=server_name,
                instance_name=instance_name,
                on_handshake=self.resetDelay,
            )
            proto.factory = self
            return proto

    return TailClientFactory(
        clock=reactor,
        handler=handler,
        server_name=server_name,
        instance_name=instance_name,
        backoff=Backoff(initial=0.5, factor=2.0, maximum=10.0),
    )


class _TcpSource:
    """Follows one writer over TCP."""

    def __init__(
        self,
        reactor: Any,
        *,
        host: str,
        port: int,
        server_name: str,
        instance_name: str,
        emit: Callable[[TailRecord], None],
    ) -> None:
        self._reactor = reactor
        self._host = host
        self._port = port
        shown_host = f"[{host}]" if ":" in host else host
        self.source = f"tcp://{shown_host}:{port}"
        self.description = f"{self.source} (server {server_name}, as {instance_name})"

        def on_command(cmd: AnyCommand, connection: IReplicationConnection) -> None:
            emit(record_from_command(cmd, ts=reactor.seconds(), source=self.source))

        self._handler = TailCommandHandler(on_command)
        self._factory = _tcp_factory(
            reactor,
            server_name=server_name,
            instance_name=instance_name,
            handler=self._handler,
            on_record=emit,
            source=self.source,
        )

    def start(self) -> None:
        from synapse_replication.tcp import connect_replication_client

        connect_replication_client(self._reactor, self._host, self._port, self._factory, timeout=10)

    async def stop(self) -> None:
        from twisted.internet.task import deferLater

        self._factory.stopTrying()
        for connection in list(self._handler.connections):
            connection.close()
        # Give the close a moment to reach the writer; never wait long.
        deadline = self._reactor.seconds() + 2.0
        while self._handler.connections and self._reactor.seconds() < deadline:
            await deferLater(self._reactor, 0.01, lambda: None)


class _RedisSource:
    """Subscribes to the replication channels; publishes nothing, except one
    REPLICATE per confirmed subscription with `replicate`."""

    def __init__(
        self,
        reactor: Any,
        *,
        settings: RedisSettings,
        server_name: str,
        user_ip: bool,
        replicate: bool,
        emit: Callable[[TailRecord], None],
    ) -> None:
        from synapse_replication.redis import redis_endpoint, user_ip_channel
        from synapse_replication.redis.client import ReconnectingRedisClient

        self._reactor = reactor
        self._emit = emit
        self._channel = server_name.encode("utf-8")
        self._user_ip_channel = user_ip_channel(server_name).encode("utf-8")
        channels = [self._channel]
        if user_ip:
            channels.append(self._user_ip_channel)
        self._channels = channels
        self.description = f"redis {settings.address()} channel {server_name}"
        endpoint = redis_endpoint(reactor, settings)
        self._subscriber: ReconnectingRedisClient = ReconnectingRedisClient(
            clock=reactor,
            endpoint=endpoint,
            settings=settings,
            name=f"Redis subscriber {settings.address()} (tail)",
            prepare=self._subscribe,
            on_ready=self._on_subscribed,
            on_lost=lambda proto: None,
            on_message=self._on_message,
        )
        self._publisher: ReconnectingRedisClient | None = None
        self._replicate_due = False
        if replicate:
            self._publisher = ReconnectingRedisClient(
                clock=reactor,
                endpoint=endpoint,
                settings=settings,
                name=f"Redis publisher {settings.address()} (tail --replicate)",
                on_ready=lambda proto: self._send_replicate(),
                on_lost=lambda proto: None,
            )

    async def _subscribe(self, proto: RedisClientProtocol) -> None:
        await proto.subscribe(self._channels)

    def _on_subscribed(self, proto: RedisClientProtocol) -> None:
        _log.info("Subscribed: {source}", source=self.description)
        if self._publisher is not None:
            self._replicate_due = True
            self._send_replicate()

    def _send_replicate(self) -> None:
        """REPLICATE once per subscription, once the publisher is up."""
        from synapse_replication.commands import encode_command

        if not self._replicate_due or self._publisher is None:
            return
        proto = self._publisher.ready_protocol
        if proto is None:
            return
        self._replicate_due = False
        proto.send(b"PUBLISH", self._channel, encode_command(ReplicateCommand()))

    def _on_message(self, channel: bytes, payload: bytes) -> None:
        if channel not in self._channels:
            return
        record = record_from_line(
            payload,
            ts=self._reactor.seconds(),
            source="redis:" + channel.decode("utf-8", "replace"),
            holds_secrets=channel == self._user_ip_channel,
        )
        if record is not None:
            self._emit(record)

    def start(self) -> None:
        self._subscriber.start()
        if self._publisher is not None:
            self._publisher.start()

    async def stop(self) -> None:
        await self._subscriber.stop()
        if self._publisher is not None:
            await self._publisher.stop()


# -- options


@attrs.frozen(kw_only=True)
class CatchUpOptions:
    """Where and from which token to catch up (``--catch-up-from``)."""

    stream: str
    from_token: int
    instances: tuple[str, ...]
    # Either one URL for every instance or an instance map.
    writer_url: InstanceLocation | None
    instance_map: Mapping[str, InstanceLocation] | None
    secret: str = attrs.field(repr=False)
    wait_s: float


@attrs.frozen(kw_only=True)
class TailOptions:
    """Everything `run_tail` needs, checked."""

    server_name: str
    tcp: tuple[str, int] | None = None
    redis: RedisSettings | None = None
    instance_name: str = "tail"
    user_ip: bool = False
    replicate: bool = False
    format: str = "json"
    filter: TailFilter = TailFilter()
    count: int | None = None
    timeout: float | None = None
    stats: bool = False
    stats_json: bool = False
    stats_interval: float = DEFAULT_STATS_INTERVAL
    stats_window: float = DEFAULT_STATS_WINDOW
    catch_up: CatchUpOptions | None = None


def _token(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or len(text) > 19:
        raise argparse.ArgumentTypeError(f"not a stream token (a non-negative integer): {text!r}")
    return int(text)


def add_tail_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``synapse-replication tail``."""
    bus = parser.add_argument_group(
        "the bus (give --tcp, or --redis or --redis-host/--redis-path)"
    )
    bus.add_argument(
        "--server-name",
        required=True,
        help="the homeserver's name: the Redis channel, and the name a TCP writer must give",
    )
    bus.add_argument(
        "--tcp",
        metavar="HOST:PORT",
        help="connect to a writer's TCP replication listener (the handshake sends REPLICATE)",
    )
    bus.add_argument(
        "--name",
        default=None,
        help="over TCP, the instance name to connect as (default: tail-<random>)",
    )
    bus.add_argument(
        "--redis",
        metavar="URL",
        help="redis://[[user]:password@]host[:port][/dbid], rediss://... (TLS) or "
        "unix:///path[?db=N]; prefer --redis-password-file to a password in the URL",
    )
    bus.add_argument("--redis-host", help="Redis host (default: localhost)")
    bus.add_argument("--redis-port", type=int, help="Redis port (default: 6379)")
    bus.add_argument("--redis-path", metavar="SOCKET", help="Redis unix socket")
    bus.add_argument("--redis-dbid", type=int, metavar="N", help="Redis database number")
    bus.add_argument("--redis-username", help="Redis ACL user (needs a password)")
    bus.add_argument(
        "--redis-password", help="Redis password (visible to other local users: prefer the file)"
    )
    bus.add_argument("--redis-password-file", metavar="FILE", help="file holding the Redis password")
    bus.add_argument("--redis-tls", action="store_true", help="connect to Redis over TLS")
    bus.add_argument("--redis-ca-file", metavar="PEM", help="CA bundle for the Redis server (TLS)")
    bus.add_argument("--redis-cert-file", metavar="PEM", help="client certificate (TLS)")
    bus.add_argument("--redis-key-file", metavar="PEM", help="client certificate's key (TLS)")
    bus.add_argument(
        "--user-ip",
        action="store_true",
        help="over Redis, also subscribe to <server>/USER_IP (access tokens are masked)",
    )
    bus.add_argument(
        "--replicate",
        action="store_true",
        help="over Redis, publish one REPLICATE once subscribed, so that every writer "
        "announces its positions (without it, tail publishes nothing)",
    )

    out = parser.add_argument_group("output")
    out.add_argument(
        "--format",
        choices=("json", "table"),
        default=None,
        help="json: one object per line; table: aligned columns ('!!' not understood, "
        "'<<' fetched by the catch-up). Default: table on a terminal, else json",
    )
    out.add_argument(
        "--stream", action="append", default=[], metavar="NAME", help="only this stream (repeatable)"
    )
    out.add_argument(
        "--instance",
        action="append",
        default=[],
        metavar="NAME",
        help="only this instance (repeatable); with --catch-up-from, the writers to catch up from",
    )
    out.add_argument(
        "--command",
        action="append",
        default=[],
        metavar="NAME",
        help="only this command (repeatable; '?' for lines not understood)",
    )
    out.add_argument(
        "--count", type=positive_int, metavar="N", help="stop after N lines (N refreshes with --stats)"
    )
    out.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="stop after this long (exit 1 if --count lines were not all printed by then)",
    )
    out.add_argument(
        "--stats",
        action="store_true",
        help="instead of lines, a view per stream and writer (rows/s, token, counts), "
        "refreshed in place on a terminal, printed as blocks otherwise (JSON with --format json)",
    )
    out.add_argument(
        "--stats-interval",
        type=positive_float,
        default=DEFAULT_STATS_INTERVAL,
        metavar="SECONDS",
        help="refresh period of --stats (default: %(default)g)",
    )
    out.add_argument(
        "--stats-window",
        type=positive_float,
        default=DEFAULT_STATS_WINDOW,
        metavar="SECONDS",
        help="rates are averaged over this many seconds (default: %(default)g)",
    )

    catch = parser.add_argument_group(
        "catch-up: first show the rows of one --stream written after a token"
    )
    catch.add_argument(
        "--catch-up-from",
        type=_token,
        metavar="TOKEN",
        help="fetch the rows after TOKEN from the writer's HTTP replication endpoint, "
        "show them, then follow live without repeating a row",
    )
    catch.add_argument(
        "--writer-url", metavar="URL", help="the writer's HTTP endpoint, http(s)://host:port"
    )
    catch.add_argument(
        "--instance-map-file",
        metavar="YAML",
        help="a file with an instance_map (a worker or homeserver config, or the map alone)",
    )
    catch.add_argument(
        "--secret", help="worker replication secret (visible to other local users: prefer the file)"
    )
    catch.add_argument("--secret-file", metavar="FILE", help="file holding the replication secret")
    catch.add_argument(
        "--catch-up-wait",
        type=positive_float,
        default=DEFAULT_CATCH_UP_WAIT,
        metavar="SECONDS",
        help="how long to wait for the writer's position before fetching without one "
        "(default: %(default)g)",
    )


def _redact_url(url: str) -> str:
    """`url` without its user information (which may hold a password)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<the URL>"
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}://{netloc}{slash}{path}"


def parse_redis_url(url: str) -> dict[str, Any]:
    """`RedisSettings` keyword arguments from a Redis URL. Errors never show
    the password."""
    shown = _redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise UsageError(f"--redis: not a valid URL: {shown}") from None
    scheme = parts.scheme.lower()
    values: dict[str, Any] = {}
    if parts.password:
        values["password"] = unquote(parts.password)
    if parts.username:
        values["username"] = unquote(parts.username)
        if "password" not in values:
            raise UsageError(f"--redis: a username needs a password: {shown}")
    query = parse_qs(parts.query)
    db_text: str | None = None
    if scheme in ("redis", "rediss"):
        values["host"] = parts.hostname or "localhost"
        if port is not None:
            values["port"] = port
        values["use_tls"] = scheme == "rediss"
        if parts.path.strip("/"):
            db_text = parts.path.strip("/")
    elif scheme == "unix":
        if not parts.path:
            raise UsageError(f"--redis: a unix:// URL needs a socket path: {shown}")
        values["path"] = unquote(parts.path)
    else:
        raise UsageError(
            f"--redis: expected a redis://, rediss:// or unix:// URL, got {shown}"
        )
    if "db" in query:
        db_text = query["db"][0]
    if db_text is not None:
        if not (db_text.isascii() and db_text.isdigit()):
            raise UsageError(f"--redis: the database number must be an integer: {shown}")
        values["dbid"] = int(db_text)
    return values


def _read_secret(path: str, what: str) -> str:
    """A secret from a file (surrounding whitespace stripped); the path is
    named in errors, the content never."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 * 1024 + 1)
    except OSError as e:
        raise UsageError(f"cannot read the {what} file {path!r}: {e.strerror or e}") from None
    if len(data) > 64 * 1024:
        raise UsageError(f"the {what} file {path!r} is too large to hold just a secret")
    try:
        secret = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UsageError(f"the {what} file {path!r} is not UTF-8 text") from None
    if not secret:
        raise UsageError(f"the {what} file {path!r} is empty")
    return secret


def _one_secret(inline: str | None, path: str | None, what: str, flag: str) -> str | None:
    if inline is not None and path is not None:
        raise UsageError(f"give {flag} or {flag}-file, not both")
    if path is not None:
        return _read_secret(path, what)
    if inline is not None and not inline:
        raise UsageError(f"{flag} is empty")
    return inline


def _redis_settings(args: argparse.Namespace) -> RedisSettings | None:
    from synapse_replication.redis import RedisSettings
    from synapse_replication.tcp import Backoff

    separate = {
        "host": args.redis_host,
        "port": args.redis_port,
        "path": args.redis_path,
    }
    if args.redis is None and all(v is None for v in separate.values()):
        for flag in ("redis_tls", "user_ip", "replicate"):
            if getattr(args, flag):
                raise UsageError(f"--{flag.replace('_', '-')} is for Redis: give --redis URL")
        return None
    values: dict[str, Any] = {}
    if args.redis is not None:
        if any(v is not None for v in separate.values()):
            raise UsageError("give --redis URL or --redis-host/--redis-port/--redis-path, not both")
        values = parse_redis_url(args.redis)
    else:
        values = {k: v for k, v in separate.items() if v is not None}
    if args.redis_dbid is not None:
        values["dbid"] = args.redis_dbid
    if args.redis_username is not None:
        values["username"] = args.redis_username
    password = _one_secret(
        args.redis_password, args.redis_password_file, "Redis password", "--redis-password"
    )
    if password is not None:
        if "password" in values:
            raise UsageError("the Redis password is given twice (in the URL and as an option)")
        values["password"] = password
    if args.redis_tls:
        values["use_tls"] = True
    for flag, key in (
        ("redis_ca_file", "ca_file"),
        ("redis_cert_file", "certificate_file"),
        ("redis_key_file", "private_key_file"),
    ):
        value = getattr(args, flag)
        if value is not None:
            values[key] = value
    try:
        return RedisSettings(
            **values,
            connect_timeout=10.0,
            backoff=Backoff(initial=0.5, factor=2.0, maximum=10.0),
        )
    except (ValueError, TypeError) as e:
        # RedisSettings' messages name options, never the password.
        raise UsageError(f"Redis options: {e}") from None


def _parse_host_port(text: str, flag: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not (port_text.isascii() and port_text.isdigit()):
        raise UsageError(f"{flag}: expected HOST:PORT, got {text!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise UsageError(f"{flag}: not a port number: {port_text!r}")
    return host, port


def _writer_location(url: str) -> InstanceLocation:
    from synapse_replication.http import InstanceLocation

    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"--writer-url: expected http(s)://host:port, got {_redact_url(url)}")
    if parts.username or parts.password:
        raise UsageError("--writer-url: the secret goes in --secret-file, not in the URL")
    tls = parts.scheme == "https"
    return InstanceLocation(host=parts.hostname, port=port or (443 if tls else 80), tls=tls)


def _load_instance_map(path: str) -> dict[str, InstanceLocation]:
    """The instance map in a YAML file: a Synapse (or worker) config with an
    ``instance_map`` key, or the map alone, checked as the worker config
    checks it (``main`` is the main process, ``master``)."""
    import yaml

    from synapse_replication.config import _Parser
    from synapse_replication.errors import ConfigError

    try:
        with open(path, "rb") as f:
            document = yaml.safe_load(f)
    except OSError as e:
        raise UsageError(f"cannot read --instance-map-file {path!r}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        # Where and what, never the text around it (it could be a secret).
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "not valid YAML"
        raise UsageError(
            f"--instance-map-file {path!r} is not valid YAML{where}: {problem}"
        ) from None
    if isinstance(document, dict) and "instance_map" in document:
        document = document["instance_map"]
    if not isinstance(document, dict):
        # Not shown: a secret file given here by mistake must not be echoed.
        raise UsageError(
            f"--instance-map-file {path!r}: expected an instance_map (a mapping of "
            f"instance names to host and port), or a config holding one; got a "
            f"{type(document).__name__}"
        )
    try:
        return _Parser(os.path.dirname(os.path.abspath(path)))._instance_map(document)
    except ConfigError as e:
        raise UsageError(f"--instance-map-file {path!r}: {e}") from None


def _catch_up_options(args: argparse.Namespace) -> CatchUpOptions | None:
    flags = ("writer_url", "instance_map_file", "secret", "secret_file")
    if args.catch_up_from is None:
        for flag in flags:
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for --catch-up-from")
        return None
    if len(args.stream) != 1:
        raise UsageError("--catch-up-from needs exactly one --stream: the stream to catch up")
    if (args.writer_url is None) == (args.instance_map_file is None):
        raise UsageError(
            "--catch-up-from needs --writer-url URL or --instance-map-file FILE (one of them)"
        )
    secret = _one_secret(args.secret, args.secret_file, "replication secret", "--secret")
    if secret is None:
        raise UsageError("--catch-up-from needs the replication secret: --secret-file FILE")
    from synapse_replication.http import _check_secret

    try:
        _check_secret(secret)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return CatchUpOptions(
        stream=args.stream[0],
        from_token=args.catch_up_from,
        instances=tuple(args.instance),
        writer_url=None if args.writer_url is None else _writer_location(args.writer_url),
        instance_map=(
            None if args.instance_map_file is None else _load_instance_map(args.instance_map_file)
        ),
        secret=secret,
        wait_s=args.catch_up_wait,
    )


def options_from_args(args: argparse.Namespace, *, stdout_tty: bool) -> TailOptions:
    """Check the parsed options; `UsageError` says what is wrong."""
    redis = _redis_settings(args)
    tcp = None if args.tcp is None else _parse_host_port(args.tcp, "--tcp")
    if (redis is None) == (tcp is None):
        raise UsageError(
            "give one bus: --tcp HOST:PORT, or --redis URL (or --redis-host/--redis-path)"
        )
    unknown = [c for c in args.command if c != NOT_UNDERSTOOD and c not in COMMAND_MAP]
    if unknown:
        raise UsageError(
            f"--command: unknown command {unknown[0]!r}; expected one of "
            f"{', '.join(sorted(COMMAND_MAP))} or '?'"
        )
    fmt = args.format or ("table" if stdout_tty else "json")
    return TailOptions(
        server_name=args.server_name,
        tcp=tcp,
        redis=redis,
        instance_name=args.name or f"tail-{secrets.token_hex(3)}",
        user_ip=args.user_ip,
        replicate=args.replicate,
        format=fmt,
        filter=TailFilter(
            streams=frozenset(args.stream),
            instances=frozenset(args.instance),
            commands=frozenset(args.command),
        ),
        count=args.count,
        timeout=args.timeout,
        stats=args.stats,
        stats_json=args.format == "json",
        stats_interval=args.stats_interval,
        stats_window=args.stats_window,
        catch_up=_catch_up_options(args),
    )


# -- running


def _terminal_width(stream: TextIO) -> int | None:
    if not stream.isatty():
        return None
    return shutil.get_terminal_size().columns


class _HttpFetchers:
    """One HTTP client per writer, made when first needed (the writer's name
    may only be learned from the bus)."""

    def __init__(self, reactor: Any, options: CatchUpOptions) -> None:
        self._reactor = reactor
        self._options = options
        self._clients: dict[str, HttpReplicationClient] = {}

    def location(self, instance: str) -> InstanceLocation | None:
        if self._options.writer_url is not None:
            return self._options.writer_url
        assert self._options.instance_map is not None
        return self._options.instance_map.get(instance)

    def where(self, instance: str) -> str:
        location = self.location(instance)
        return location.describe() if location is not None else f"http:{instance}"

    def fetch(self, instance: str) -> FetchFunction:
        from synapse_replication.http import HttpReplicationClient

        client = self._clients.get(instance)
        if client is None:
            location = self.location(instance)
            instance_map = {} if location is None else {instance: location}
            client = HttpReplicationClient(self._reactor, instance_map, self._options.secret)
            self._clients[instance] = client
        stream = self._options.stream

        async def fetch(name: str, from_token: int, upto_token: int) -> StreamUpdateResult:
            return await client.get_updates(stream, name, from_token, upto_token)

        return fetch

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


async def run_tail(reactor: Any, options: TailOptions, *, stdout: TextIO, stderr: TextIO) -> int:
    """Follow the bus until `count` lines, the timeout, stdout closing or
    cancellation (Ctrl-C); the exit code."""
    finished: Deferred[int] = Deferred()

    def finish(code: int) -> None:
        if not finished.called:
            finished.callback(code)

    width = _terminal_width(stdout)
    sink: LineSink | StatsSink
    source_name = (
        f"tcp://{options.tcp[0]}:{options.tcp[1]}"
        if options.tcp is not None
        else f"redis:{options.server_name}"
    )
    if options.stats:
        sink = StatsSink(
            out=stdout,
            clock=reactor,
            accept=options.filter,
            source=source_name,
            interval=options.stats_interval,
            window=options.stats_window,
            ansi=width is not None and not options.stats_json,
            as_json=options.stats_json,
            width=width,
            count=options.count,
            on_done=lambda: finish(EXIT_OK),
        )
    else:
        formatter: Formatter = (
            TableFormatter(width) if options.format == "table" else JsonFormatter()
        )
        sink = LineSink(
            out=stdout,
            formatter=formatter,
            accept=options.filter,
            count=options.count,
            on_done=lambda: finish(EXIT_OK),
        )

    emit: Callable[[TailRecord], None] = sink
    catch_up: CatchUp | None = None
    fetchers: _HttpFetchers | None = None
    if options.catch_up is not None:
        fetchers = _HttpFetchers(reactor, options.catch_up)
        catch_up = CatchUp(
            clock=reactor,
            stream=options.catch_up.stream,
            instances=options.catch_up.instances,
            from_token=options.catch_up.from_token,
            fetch=fetchers.fetch,
            where=fetchers.where,
            emit=sink,
            progress=CatchUpProgress(stderr, tty=stderr.isatty(), clock=reactor),
            wait_s=options.catch_up.wait_s,
        )
        emit = catch_up

    source: _Source
    try:
        if options.tcp is not None:
            source = _TcpSource(
                reactor,
                host=options.tcp[0],
                port=options.tcp[1],
                server_name=options.server_name,
                instance_name=options.instance_name,
                emit=emit,
            )
        else:
            assert options.redis is not None
            source = _RedisSource(
                reactor,
                settings=options.redis,
                server_name=options.server_name,
                user_ip=options.user_ip,
                replicate=options.replicate,
                emit=emit,
            )
    except (OSError, ValueError, ImportError) as e:
        # TLS files that cannot be read or parsed, TLS support not installed.
        stderr.write(f"tail: cannot set up {source_name}: {e}\n")
        return EXIT_SETUP_FAILED
    _log.info("Following {source}", source=source.description)

    timer: IDelayedCall | None = None
    if options.timeout is not None:

        def timed_out() -> None:
            if options.count is not None and sink.printed < options.count:
                stderr.write(
                    f"tail: timed out after {options.timeout:g} s with {sink.printed} of "
                    f"{options.count} {'refreshes' if options.stats else 'lines'}\n"
                )
                finish(EXIT_FAILED)
            else:
                finish(EXIT_OK)

        timer = reactor.callLater(options.timeout, timed_out)

    sink.start()
    running: Deferred[None] | None = None
    if catch_up is not None:

        def catch_up_failed(failure: Any) -> None:
            if failure.check(CancelledError):
                return
            stderr.write(f"tail: catch-up failed: {failure.getErrorMessage()}\n")
            finish(EXIT_SETUP_FAILED)

        running = Deferred.fromCoroutine(catch_up.run())
        running.addErrback(catch_up_failed)

    source.start()
    try:
        return await finished
    finally:
        if timer is not None and timer.active():
            timer.cancel()
        if running is not None and not running.called:
            running.cancel()
        sink.stop()
        await source.stop()
        if fetchers is not None:
            await fetchers.close()
        if isinstance(sink, StatsSink) and sink.printed and width is not None:
            stdout.write("\n")


async def run_tail_command(reactor: Any, args: argparse.Namespace) -> int:
    """``synapse-replication tail``: check the options, then `run_tail` on
    the process's stdout and stderr."""
    try:
        options = options_from_args(args, stdout_tty=sys.stdout.isatty())
    except UsageError as e:
        sys.stderr.write(f"synapse-replication tail: error: {e}\n")
        return EXIT_USAGE
    if isinstance(sys.stdout, io.TextIOWrapper):
        # A row can hold any character; a terminal or pipe that cannot show
        # one gets an escape rather than a crash.
        sys.stdout.reconfigure(errors="backslashreplace")
    return await run_tail(reactor, options, stdout=sys.stdout, stderr=sys.stderr)
