# -*- test-case-name: tests.test_redis -*-
"""RESP2, the Redis wire format, without any I/O.

`RespParser` takes bytes as they arrive, in pieces of any size, and returns
the replies they complete; `encode_request` turns one command into bytes. The
Twisted protocol in `synapse_replication.redis.client` is a thin shell around
the two, so framing is tested here byte by byte without a socket.

What a reply becomes:

- simple string ``+OK`` -> `str`;
- error ``-ERR ...`` -> `RespError` (a value, not an exception: the caller
  decides which request it answers);
- integer ``:1`` -> `int`;
- bulk string ``$3 abc`` -> `bytes`; null bulk string ``$-1`` -> None;
- array ``*2 ...`` -> `list`, nested to any depth the limits allow; null array
  ``*-1`` -> None;
- push ``>3 ...`` (RESP3 pub/sub messages) -> `RespPush`.

The invariant: every byte is consumed exactly once, either as part of a
returned reply or kept for the next `feed`; anything that is not RESP raises
`RespProtocolError`, after which the parser refuses further input (the byte
stream can no longer be framed, so the connection must go).
"""

from __future__ import annotations

import enum
from typing import Final, TypeAlias

import attrs

from synapse_replication.errors import ReplicationError, shorten

__all__ = [
    "RespError",
    "RespParser",
    "RespProtocolError",
    "RespPush",
    "RespValue",
    "encode_request",
]

CRLF: Final = b"\r\n"


class RespProtocolError(ReplicationError):
    """Bytes from Redis that are not RESP, or that exceed our limits."""


@attrs.frozen(slots=True)
class RespError:
    """An error reply, e.g. ``-WRONGPASS invalid username-password pair``."""

    message: str

    @property
    def code(self) -> str:
        """The error's first word (``ERR``, ``WRONGPASS``, ``NOAUTH``...)."""
        return self.message.split(" ", 1)[0]


@attrs.frozen(slots=True)
class RespPush:
    """An out-of-band push (RESP3 ``>``): a pub/sub message, never a reply."""

    items: tuple[RespValue, ...]


RespValue: TypeAlias = "str | int | bytes | RespError | RespPush | list[RespValue] | None"


class _More(enum.Enum):
    """"No complete value yet": distinct from None, which is a RESP value."""

    MORE = enum.auto()



@attrs.define
class _Frame:
    """An array or push being read: how many items it has and those read so far."""

    length: int
    push: bool
    items: list[RespValue] = attrs.Factory(list)

    def value(self) -> RespValue:
        return RespPush(tuple(self.items)) if self.push else self.items


class RespParser:
    """Incremental RESP2 (plus RESP3 push) reply parser.

    Limits, as class attributes in the manner of `LineOnlyReceiver.MAX_LENGTH`,
    bound what one reply may make us hold: a header line, a bulk string, the
    items of one array and the nesting depth. Redis itself allows 512 MiB bulk
    strings; replication messages are a few KiB.
    """

    MAX_LINE_LENGTH: int = 64 * 1024
    MAX_BULK_LENGTH: int = 64 * 1024 * 1024
    MAX_ARRAY_LENGTH: int = 1024 * 1024
    MAX_DEPTH: int = 32

    def __init__(self) -> None:
        self._buffer = bytearray()
        # Arrays being read, outermost first.
        self._stack: list[_Frame] = []
        # Length of the bulk string whose header was read and body was not.
        self._bulk_length: int | None = None
        self._failed = False

    def feed(self, data: bytes) -> list[RespValue]:
        """Add `data` and return every reply it completes, in order."""
        if self._failed:
            raise RespProtocolError("parser already failed; the connection must be dropped")
        self._buffer += data
        buf = self._buffer
        pos = 0
        out: list[RespValue] = []
        try:
            while True:
                if self._bulk_length is not None:
                    end = pos + self._bulk_length
                    if len(buf) < end + 2:
                        break
                    if buf[end : end + 2] != CRLF:
                        raise self._error("bulk string not followed by CRLF", buf[end : end + 2])
                    value: RespValue = bytes(buf[pos:end])
                    pos = end + 2
                    self._bulk_length = None
                else:
                    eol = buf.find(CRLF, pos)
                    if eol < 0:
                        if len(buf) - pos > self.MAX_LINE_LENGTH:
                            raise self._error("header line too long", buf[pos : pos + 40])
                        break
                    line = bytes(buf[pos:eol])
                    pos = eol + 2
                    if len(line) > self.MAX_LINE_LENGTH:
                        raise self._error("header line too long", line[:40])
                    parsed = self._header(line)
                    if parsed is _More.MORE:
                        continue
                    value = parsed
                complete = self._complete(value)
                if complete is not _More.MORE:
                    out.append(complete)
        finally:
            del buf[:pos]
        return out

    def _header(self, line: bytes) -> RespValue | _More:
        """A value from a header line, or `_More.MORE` when items or a body follow."""
        if not line:
            raise self._error("empty line", line)
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode("utf-8", "replace")
        if kind == b"-":
            return RespError(rest.decode("utf-8", "replace"))
        if kind == b":":
            return self._integer(rest)
        if kind == b"$":
            length = self._integer(rest)
            if length == -1:
                return None
            if length < 0 or length > self.MAX_BULK_LENGTH:
                raise self._error("bad bulk string length", line)
            self._bulk_length = length
            return _More.MORE
        if kind in (b"*", b">"):
            push = kind == b">"
            length = self._integer(rest)
            if length == -1 and not push:
                return None
            if length < 0 or length > self.MAX_ARRAY_LENGTH:
                raise self._error("bad array length", line)
            if length == 0:
                return RespPush(()) if push else []
            if len(self._stack) >= self.MAX_DEPTH:
                raise self._error("arrays nested too deep", line)
            self._stack.append(_Frame(length, push))
            return _More.MORE
        raise self._error("unknown reply type", line)

    def _complete(self, value: RespValue) -> RespValue | _More:
        """Put `value` into the arrays being read; return the outermost value
        once it is whole, else `_More.MORE`."""
        while self._stack:
            frame = self._stack[-1]
            frame.items.append(value)
            if len(frame.items) < frame.length:
                return _More.MORE
            self._stack.pop()
            value = frame.value()
        return value

    def _integer(self, text: bytes) -> int:
        # int() would also take " 1", "1_0" and "+1": RESP has only -?[0-9]+.
        digits = text[1:] if text[:1] == b"-" else text
        if not digits or not digits.isdigit() or len(digits) > 19:
            raise self._error("bad integer", text)
        return int(text)

    def _error(self, reason: str, data: bytes | bytearray) -> RespProtocolError:
        self._failed = True
        return RespProtocolError(f"Invalid RESP from Redis ({reason}): {shorten(repr(bytes(data)), 80)}")


def encode_request(*args: bytes | str | int) -> bytes:
    """One command as Redis reads it: an array of bulk strings. `str`
    arguments are UTF-8 encoded, `int`s written in decimal."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, str):
            data = arg.encode("utf-8")
        elif isinstance(arg, int):
            data = b"%d" % arg
        else:
            data = arg
        parts.append(b"$%d\r\n" % len(data))
        parts.append(data)
        parts.append(CRLF)
    return b"".join(parts)
