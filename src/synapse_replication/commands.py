# -*- test-case-name: tests.test_commands -*-
"""The replication wire format: one class per command, no I/O.

A command travels as one UTF-8 line: its NAME, a space, then the text that the
command's `to_line()` returns (``REPLICATE`` has an empty rest, so its line is
``"REPLICATE "``). `parse_command_from_line` is the only way in from the wire and
raises `CommandParseError`, and nothing else, for a line that is not a command.
`encode_command` is the only way out and refuses to build a line that a reader
would split differently from how it was meant.

Which side may send what: `VALID_SERVER_COMMANDS` are sent by the side that
accepted a TCP connection, `VALID_CLIENT_COMMANDS` by the side that opened it.
`NEW_ACTIVE_TASK` and `CANCEL_TASK` are in neither set, as in Synapse: they only
travel over Redis, where there are no sides.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import ClassVar, Final, Self, TypeAlias, cast

import attrs

from synapse_replication._accel import SPEEDUPS
from synapse_replication._fastattrs import fast_constructor
from synapse_replication._json import (
    FAST_DECODE_ERRORS,
    JsonValue,
    ascii_json,
    decode_json,
    encode_json,
    encode_json_bytes,
    fast_decode_json,
    fast_encode_json,
)
from synapse_replication.errors import CommandEncodeError, CommandParseError

__all__ = [
    "COMMAND_MAP",
    "VALID_CLIENT_COMMANDS",
    "VALID_SERVER_COMMANDS",
    "AnyCommand",
    "CancelTaskCommand",
    "ClearUserSyncCommand",
    "Command",
    "ErrorCommand",
    "FederationAckCommand",
    "LockReleasedCommand",
    "NameCommand",
    "NewActiveTaskCommand",
    "PingCommand",
    "PositionCommand",
    "RdataCommand",
    "RemoteServerUpCommand",
    "ReplicateCommand",
    "ServerCommand",
    "UserIpCommand",
    "UserSyncCommand",
    "encode_command",
    "parse_command_from_bytes",
    "parse_command_from_line",
]

# Integers with this many digits or more are left to `_parse_int` (Python
# refuses to convert more than 4300 by default).
_MAX_DIGITS: Final = 1000

# The token Synapse writes instead of a number for every row but the last of a
# group of rows that share one stream id.
BATCH_TOKEN: Final = "batch"


def _parse_int(cmd: str, line: str, what: str, text: str) -> int:
    """`text` as an integer: ASCII digits with an optional leading minus, as
    Synapse writes them (no sign, spaces, underscores or other digits that
    Python's `int()` would also take)."""
    digits = text[1:] if text[:1] == "-" else text
    if digits.isdigit() and digits.isascii():
        try:
            return int(text)
        except ValueError:  # more digits than Python converts
            pass
    raise CommandParseError(cmd, line, f"{what} {text[:40]!r} is not an integer")


def _check_word(cmd: str, what: str, value: str) -> None:
    """Refuse to write a field that a reader would split in two or lose."""
    if not value or " " in value:
        raise CommandEncodeError(
            f"Cannot send {cmd}: {what} {value!r} is empty or contains a space"
        )


def _parse_json(cmd: str, line: str, text: str) -> JsonValue:
    try:
        return decode_json(text)
    except ValueError as e:
        raise CommandParseError(cmd, line, f"bad JSON: {e}") from None


def _encode_json(cmd: str, value: JsonValue) -> str:
    try:
        return encode_json(value)
    except (ValueError, TypeError) as e:
        raise CommandEncodeError(f"Cannot send {cmd}: {e}") from None


class Command(abc.ABC):
    """A replication command. Subclasses are frozen attrs classes.

    `from_line` takes the text after ``NAME `` and raises `CommandParseError`;
    `to_line` gives that text back, so that ``NAME + " " + to_line()`` is the line.
    """

    # The weak reference slot lives here rather than in each command class
    # (where attrs would add it): a class adding no slot but its fields has the
    # layout that `fast_constructor` needs.
    __slots__ = ("__weakref__",)

    NAME: ClassVar[str]

    @classmethod
    @abc.abstractmethod
    def from_line(cls, line: str) -> Self:
        """Parse the rest of a line (what follows ``NAME ``)."""

    @abc.abstractmethod
    def to_line(self) -> str:
        """The rest of the line for this command (what follows ``NAME ``)."""

    def to_bytes(self) -> bytes:
        """The whole line, UTF-8 encoded, without the newline (see
        `encode_command`, which is the way to call this)."""
        line = f"{self.NAME} {self.to_line()}"
        if "\n" in line:
            raise CommandEncodeError(
                f"Cannot send {self.NAME}: the line contains a newline"
            )
        try:
            return line.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate in a name or text field
            raise CommandEncodeError(
                f"Cannot send {self.NAME}: the line is not valid Unicode"
            ) from None


@attrs.frozen(slots=True)
class _SimpleCommand(Command):
    """A command whose whole rest of line is one string, `data`."""

    data: str

    # Whether an empty `data` is meaningless for this command.
    _NEEDS_DATA: ClassVar[bool] = True

    @classmethod
    def from_line(cls, line: str) -> Self:
        if cls._NEEDS_DATA and not line:
            raise CommandParseError(cls.NAME, line, "missing argument")
        return cls(line)

    def to_line(self) -> str:
        if self._NEEDS_DATA and not self.data:
            raise CommandEncodeError(f"Cannot send {self.NAME}: empty argument")
        return self.data


@attrs.frozen(slots=True)
class ServerCommand(_SimpleCommand):
    """``SERVER <server_name>``: the first line a server sends on a TCP connection.

    Sent by the server. The client closes the connection if the name is not the
    one it expects.
    """

    NAME = "SERVER"


@attrs.frozen(slots=True)
class NameCommand(_SimpleCommand):
    """``NAME <instance_name>``: the first line a client sends, naming itself.

    Sent by the client.
    """

    NAME = "NAME"


@attrs.frozen(slots=True)
class PingCommand(_SimpleCommand):
    """``PING <now_ms>``: keepalive, carrying the sender's clock in milliseconds.

    Sent by both sides at least every 5 s; the text is informational only.
    """

    NAME = "PING"
    _NEEDS_DATA = False


@attrs.frozen(slots=True)
class ErrorCommand(_SimpleCommand):
    """``ERROR <text>``: the peer did something wrong; usually followed by a close.

    Sent by both sides.
    """

    NAME = "ERROR"
    _NEEDS_DATA = False


@attrs.frozen(slots=True)
class ClearUserSyncCommand(_SimpleCommand):
    """``CLEAR_USER_SYNC <instance_id>``: forget every user syncing on that
    instance, sent by a worker as it shuts down.

    Sent by the client.
    """

    NAME = "CLEAR_USER_SYNC"

    @property
    def instance_id(self) -> str:
        return self.data


@attrs.frozen(slots=True)
class RemoteServerUpCommand(_SimpleCommand):
    """``REMOTE_SERVER_UP <server_name>``: a federation peer came back online.

    Sent by both sides.
    """

    NAME = "REMOTE_SERVER_UP"


@attrs.frozen(slots=True)
class NewActiveTaskCommand(_SimpleCommand):
    """``NEW_ACTIVE_TASK <task_id>``: a scheduled task is ready to run.

    Redis only (in neither direction set).
    """

    NAME = "NEW_ACTIVE_TASK"


@attrs.frozen(slots=True)
class CancelTaskCommand(_SimpleCommand):
    """``CANCEL_TASK <task_id>``: a running scheduled task must stop.

    Redis only (in neither direction set).
    """

    NAME = "CANCEL_TASK"


@attrs.frozen(slots=True)
class ReplicateCommand(Command):
    """``REPLICATE``: ask every writer to announce its positions with POSITION.

    Sent by the client. Synapse writes it with a trailing space, ``"REPLICATE "``,
    because the rest of the line is empty; a line without the space parses too.
    """

    NAME = "REPLICATE"

    @classmethod
    def from_line(cls, line: str) -> Self:
        if line.strip():
            raise CommandParseError(cls.NAME, line, "takes no argument")
        return cls()

    def to_line(self) -> str:
        return ""


@attrs.frozen(slots=True)
class RdataCommand(Command):
    """``RDATA <stream_name> <instance_name> <token> <row_json>``: one stream row.

    Sent by the server. `token` is None, written ``batch``, for every row but the
    last of rows sharing a stream id: the reader holds them until the row with the
    real token arrives, then hands the group over at once. `row` is the row as
    JSON values; the stream's `parse_row` gives the typed row.

        RDATA events master 12 ["ev",["$ev","!room","m.room.message",null,...]]
    """

    NAME = "RDATA"

    stream_name: str
    instance_name: str
    token: int | None
    row: JsonValue

    @classmethod
    def from_line(cls, line: str) -> Self:
        parts = line.split(" ", 3)
        if len(parts) != 4:
            raise CommandParseError(
                cls.NAME, line, "expected <stream> <instance> <token> <row json>"
            )
        stream_name, instance_name, token_text, row_json = parts
        if not stream_name or not instance_name:
            raise CommandParseError(cls.NAME, line, "empty stream or instance name")
        token: int | None
        if token_text == BATCH_TOKEN:
            token = None
        else:
            token = _parse_int(cls.NAME, line, "token", token_text)
        # _new_rdata builds RdataCommands, and cls is RdataCommand when it is used.
        new = cast("type[Self]", _new_rdata) if cls is RdataCommand else cls
        return new(stream_name, instance_name, token, _parse_json(cls.NAME, line, row_json))

    def _head(self) -> str:
        _check_word(self.NAME, "stream name", self.stream_name)
        _check_word(self.NAME, "instance name", self.instance_name)
        token = self.token
        return (
            f"{self.stream_name} {self.instance_name} "
            f"{BATCH_TOKEN if token is None else int(token)} "
        )

    def to_line(self) -> str:
        return self._head() + _encode_json(self.NAME, self.row)

    def to_bytes(self) -> bytes:
        # The row's JSON is ASCII without newlines by construction: only the
        # names need the checks, and the JSON goes out as the bytes it was
        # encoded to, never through a str.
        head = f"RDATA {self._head()}"
        if "\n" in head:
            raise CommandEncodeError("Cannot send RDATA: a name contains a newline")
        try:
            row = encode_json_bytes(self.row)
        except (ValueError, TypeError) as e:
            raise CommandEncodeError(f"Cannot send RDATA: {e}") from None
        try:
            return head.encode("utf-8") + row
        except UnicodeEncodeError:
            raise CommandEncodeError("Cannot send RDATA: a name is not valid Unicode") from None


@attrs.frozen(slots=True)
class PositionCommand(Command):
    """``POSITION <stream_name> <instance_name> <prev_token> <new_token>``.

    Sent by the server: the writer `instance_name` wrote no row of the stream
    between `prev_token` (exclusive) and `new_token` (inclusive). A reader whose
    position for that writer is outside that range fetches what it missed.
    """

    NAME = "POSITION"

    stream_name: str
    instance_name: str
    prev_token: int
    new_token: int

    @classmethod
    def from_line(cls, line: str) -> Self:
        parts = line.split(" ")
        if len(parts) != 4:
            raise CommandParseError(
                cls.NAME,
                line,
                "expected <stream> <instance> <prev_token> <new_token>, "
                f"got {len(parts)} fields",
            )
        stream_name, instance_name, prev_text, new_text = parts
        if not stream_name or not instance_name:
            raise CommandParseError(cls.NAME, line, "empty stream or instance name")
        # _new_position builds PositionCommands, and cls is PositionCommand when it is used.
        new = cast("type[Self]", _new_position) if cls is PositionCommand else cls
        return new(
            stream_name,
            instance_name,
            _parse_int(cls.NAME, line, "prev_token", prev_text),
            _parse_int(cls.NAME, line, "new_token", new_text),
        )

    def to_line(self) -> str:
        _check_word(self.NAME, "stream name", self.stream_name)
        _check_word(self.NAME, "instance name", self.instance_name)
        return (
            f"{self.stream_name} {self.instance_name} "
            f"{int(self.prev_token)} {int(self.new_token)}"
        )


@attrs.frozen(slots=True)
class UserSyncCommand(Command):
    """``USER_SYNC <instance_id> <user_id> <device_id> <start|end> <last_sync_ms>``.

    Sent by the client when a user starts or stops syncing on it. A missing
    device is written ``None``, as Synapse does.
    """

    NAME = "USER_SYNC"

    instance_id: str
    user_id: str
    device_id: str | None
    is_syncing: bool
    last_sync_ms: int

    @classmethod
    def from_line(cls, line: str) -> Self:
        parts = line.split(" ")
        if len(parts) != 5:
            raise CommandParseError(
                cls.NAME,
                line,
                "expected <instance_id> <user_id> <device_id> <start|end> "
                f"<last_sync_ms>, got {len(parts)} fields",
            )
        instance_id, user_id, device_id, state, last_sync_text = parts
        if not instance_id or not user_id or not device_id:
            raise CommandParseError(cls.NAME, line, "empty field")
        if state not in ("start", "end"):
            raise CommandParseError(
                cls.NAME, line, f"state {state[:40]!r} is neither 'start' nor 'end'"
            )
        return cls(
            instance_id,
            user_id,
            None if device_id == "None" else device_id,
            state == "start",
            _parse_int(cls.NAME, line, "last_sync_ms", last_sync_text),
        )

    def to_line(self) -> str:
        _check_word(self.NAME, "instance id", self.instance_id)
        _check_word(self.NAME, "user id", self.user_id)
        if self.device_id is not None:
            _check_word(self.NAME, "device id", self.device_id)
        return (
            f"{self.instance_id} {self.user_id} {self.device_id} "
            f"{'start' if self.is_syncing else 'end'} {int(self.last_sync_ms)}"
        )


@attrs.frozen(slots=True)
class FederationAckCommand(Command):
    """``FEDERATION_ACK <instance_name> <token>``: the federation sender has
    handled the `federation` stream up to `token`.

    Sent by the client.
    """

    NAME = "FEDERATION_ACK"

    instance_name: str
    token: int

    @classmethod
    def from_line(cls, line: str) -> Self:
        parts = line.split(" ")
        if len(parts) != 2 or not parts[0]:
            raise CommandParseError(cls.NAME, line, "expected <instance> <token>")
        return cls(parts[0], _parse_int(cls.NAME, line, "token", parts[1]))

    def to_line(self) -> str:
        _check_word(self.NAME, "instance name", self.instance_name)
        return f"{self.instance_name} {int(self.token)}"


def _redact(_: str) -> str:
    return "'<redacted>'"


@attrs.frozen(slots=True)
class UserIpCommand(Command):
    """``USER_IP <user_id> [access_token, ip, user_agent, device_id, last_seen]``.

    Sent by the client: a user was seen from an address. The access token is a
    secret: it is never shown in a repr.
    """

    NAME = "USER_IP"

    user_id: str
    access_token: str = attrs.field(repr=_redact)
    ip: str
    user_agent: str
    device_id: str | None
    last_seen: int

    @classmethod
    def from_line(cls, line: str) -> Self:
        user_id, sep, json_text = line.partition(" ")
        # The line holds an access token: errors show only the user id.
        shown = f"{user_id[:100]} [...]"
        if not sep or not user_id:
            raise CommandParseError(cls.NAME, shown, "expected <user_id> <json>")
        try:
            value = decode_json(json_text)
        except ValueError as e:
            raise CommandParseError(cls.NAME, shown, f"bad JSON: {e}") from None
        if type(value) is not list or len(value) != 5:
            raise CommandParseError(
                cls.NAME,
                shown,
                "expected a JSON list [access_token, ip, user_agent, device_id, "
                "last_seen]",
            )
        access_token, ip, user_agent, device_id, last_seen = value
        if not (
            type(access_token) is str
            and type(ip) is str
            and type(user_agent) is str
            and (device_id is None or type(device_id) is str)
            and type(last_seen) is int
        ):
            raise CommandParseError(
                cls.NAME,
                shown,
                "fields must be [str, str, str, str or null, int]",
            )
        # _new_user_ip builds UserIpCommands, and cls is UserIpCommand when it is used.
        new = cast("type[Self]", _new_user_ip) if cls is UserIpCommand else cls
        return new(user_id, access_token, ip, user_agent, device_id, last_seen)

    def to_line(self) -> str:
        _check_word(self.NAME, "user id", self.user_id)
        return self.user_id + " " + _encode_json(
            self.NAME,
            [self.access_token, self.ip, self.user_agent, self.device_id, self.last_seen],
        )


@attrs.frozen(slots=True)
class LockReleasedCommand(Command):
    """``LOCK_RELEASED ["<instance_name>","<lock_name>","<lock_key>"]``: a
    cross-worker lock was released, so waiters may try again.

    Sent by both sides.
    """

    NAME = "LOCK_RELEASED"

    instance_name: str
    lock_name: str
    lock_key: str

    @classmethod
    def from_line(cls, line: str) -> Self:
        value = _parse_json(cls.NAME, line, line)
        if (
            type(value) is not list
            or len(value) != 3
            or not all(type(v) is str for v in value)
        ):
            raise CommandParseError(
                cls.NAME, line, "expected a JSON list of three strings"
            )
        # _new_lock_released builds LockReleasedCommands, and cls is LockReleasedCommand when it is used.
        new = cast("type[Self]", _new_lock_released) if cls is LockReleasedCommand else cls
        return new(value[0], value[1], value[2])

    def to_line(self) -> str:
        return _encode_json(self.NAME, [self.instance_name, self.lock_name, self.lock_key])


# Constructors for the commands built once per received line, for values the
# parsers have already checked (see `fast_constructor`).
_new_rdata: Final = fast_constructor(RdataCommand)
_new_position: Final = fast_constructor(PositionCommand)
_new_user_ip: Final = fast_constructor(UserIpCommand)
_new_lock_released: Final = fast_constructor(LockReleasedCommand)


AnyCommand: TypeAlias = (
    ServerCommand
    | RdataCommand
    | PositionCommand
    | ErrorCommand
    | PingCommand
    | NameCommand
    | ReplicateCommand
    | UserSyncCommand
    | ClearUserSyncCommand
    | FederationAckCommand
    | UserIpCommand
    | RemoteServerUpCommand
    | LockReleasedCommand
    | NewActiveTaskCommand
    | CancelTaskCommand
)

_COMMANDS: Final[tuple[type[AnyCommand], ...]] = (
    ServerCommand,
    RdataCommand,
    PositionCommand,
    ErrorCommand,
    PingCommand,
    NameCommand,
    ReplicateCommand,
    UserSyncCommand,
    ClearUserSyncCommand,
    FederationAckCommand,
    UserIpCommand,
    RemoteServerUpCommand,
    LockReleasedCommand,
    NewActiveTaskCommand,
    CancelTaskCommand,
)

COMMAND_MAP: Final[dict[str, type[AnyCommand]]] = {c.NAME: c for c in _COMMANDS}

VALID_SERVER_COMMANDS: Final[frozenset[str]] = frozenset(
    {
        ServerCommand.NAME,
        RdataCommand.NAME,
        PositionCommand.NAME,
        ErrorCommand.NAME,
        PingCommand.NAME,
        RemoteServerUpCommand.NAME,
        LockReleasedCommand.NAME,
    }
)

VALID_CLIENT_COMMANDS: Final[frozenset[str]] = frozenset(
    {
        NameCommand.NAME,
        ReplicateCommand.NAME,
        PingCommand.NAME,
        UserSyncCommand.NAME,
        ClearUserSyncCommand.NAME,
        FederationAckCommand.NAME,
        UserIpCommand.NAME,
        ErrorCommand.NAME,
        RemoteServerUpCommand.NAME,
        LockReleasedCommand.NAME,
    }
)


def parse_command_from_line(line: str) -> AnyCommand:
    """The command on `line` (without its newline).

    Raises CommandParseError, naming the command and showing the line, for an
    unknown command or malformed arguments; never any other exception.
    """
    name, _, rest = line.partition(" ")
    cmd_cls = COMMAND_MAP.get(name)
    if cmd_cls is None:
        raise CommandParseError(None, line, f"unknown command {name[:40]!r}")
    try:
        return cmd_cls.from_line(rest)
    except CommandParseError as e:
        if cmd_cls is UserIpCommand:
            # Its message shows the user id only: the line holds an access token.
            raise
        raise CommandParseError(name, line, e.reason) from None


_c_parse_rdata: Callable[..., RdataCommand | None] | None = (
    None if SPEEDUPS is None else SPEEDUPS.parse_rdata
)


def parse_command_from_bytes(line: bytes) -> AnyCommand:
    """The command on `line`, a line as it comes off the wire: UTF-8 bytes,
    without the newline.

    The same command as ``parse_command_from_line(line.decode("utf-8"))``, and
    the same errors, but faster for the frequent commands: RDATA, POSITION,
    USER_IP and LOCK_RELEASED lines are split as bytes and their JSON is handed
    to the decoder without a detour through `str`. Raises CommandParseError,
    and nothing else, also for a line that is not UTF-8 (with the
    UnicodeDecodeError as its ``__cause__``).
    """
    # The fast paths below take only lines that are certainly well formed;
    # anything unusual (not UTF-8, signs or huge numbers, JSON that msgspec
    # does not take, wrong types) goes the long way at the end, which decides
    # and words the error.
    if _c_parse_rdata is not None:
        # The C twin of the RDATA case below.
        cmd = _c_parse_rdata(line, fast_decode_json, _new_rdata)
        if cmd is not None:
            return cmd
    parts = line.split(b" ", 4)
    name = parts[0]
    if name == b"RDATA":
        if len(parts) == 5:
            _, stream_name, instance_name, token_text, row_json = parts
            token: int | None = -1
            if token_text.isdigit():  # bytes: ASCII digits only
                if len(token_text) < _MAX_DIGITS:
                    token = int(token_text)
            elif token_text == b"batch":
                token = None
            if stream_name and instance_name and token != -1:
                try:
                    return _new_rdata(
                        stream_name.decode("utf-8"),
                        instance_name.decode("utf-8"),
                        token,
                        fast_decode_json(row_json),
                    )
                except FAST_DECODE_ERRORS:
                    pass
    elif name == b"POSITION":
        if len(parts) == 5:
            _, stream_name, instance_name, prev_text, new_text = parts
            if (
                stream_name
                and instance_name
                and prev_text.isdigit()
                and new_text.isdigit()  # and so no space: a fifth field
                and len(prev_text) < _MAX_DIGITS
                and len(new_text) < _MAX_DIGITS
            ):
                try:
                    return _new_position(
                        stream_name.decode("utf-8"),
                        instance_name.decode("utf-8"),
                        int(prev_text),
                        int(new_text),
                    )
                except UnicodeDecodeError:
                    pass
    elif name == b"USER_IP":
        if len(parts) > 2 and parts[1]:
            user_id = parts[1]
            try:
                value = fast_decode_json(line[9 + len(user_id) :])
            except FAST_DECODE_ERRORS:
                pass
            else:
                if type(value) is list and len(value) == 5:
                    access_token, ip, user_agent, device_id, last_seen = value
                    if (
                        type(access_token) is str
                        and type(ip) is str
                        and type(user_agent) is str
                        and (device_id is None or type(device_id) is str)
                        and type(last_seen) is int
                    ):
                        try:
                            return _new_user_ip(
                                user_id.decode("utf-8"),
                                access_token,
                                ip,
                                user_agent,
                                device_id,
                                last_seen,
                            )
                        except UnicodeDecodeError:
                            pass
    elif name == b"LOCK_RELEASED" and len(parts) > 1:
        try:
            value = fast_decode_json(line[14:])
        except FAST_DECODE_ERRORS:
            pass
        else:
            if type(value) is list and len(value) == 3:
                instance_name_str, lock_name, lock_key = value
                if (
                    type(instance_name_str) is str
                    and type(lock_name) is str
                    and type(lock_key) is str
                ):
                    return _new_lock_released(instance_name_str, lock_name, lock_key)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        cmd_name = name.decode("utf-8", "replace")
        if cmd_name == UserIpCommand.NAME:
            # Show no access token: the user id only, as its parser does.
            shown_user = parts[1] if len(parts) > 1 else b""
            shown = f"{shown_user[:100].decode('utf-8', 'backslashreplace')} [...]"
        else:
            shown = line.decode("utf-8", "backslashreplace")
        raise CommandParseError(
            cmd_name if cmd_name in COMMAND_MAP else None,
            shown,
            f"invalid UTF-8 at byte {e.start}",
        ) from e
    return parse_command_from_line(text)


def _encode_rdata_py(
    stream_name: str,
    instance_name: str,
    token: int | None,
    row: JsonValue,
    encode: Callable[[JsonValue], bytes],
) -> bytes | None:
    """The RDATA line for these fields, written in one go, if every field has
    the expected type and is plainly valid; None to leave the line, and every
    error, to `RdataCommand.to_bytes`. `encode` is `fast_encode_json`.

    The C twin `_speedups.encode_rdata` gives exactly the same results.
    """
    if (
        type(stream_name) is str
        and type(instance_name) is str
        and (token is None or type(token) is int)
        and stream_name
        and instance_name
        and " " not in stream_name
        and " " not in instance_name
        and "\n" not in stream_name
        and "\n" not in instance_name
    ):
        try:
            head = f"RDATA {stream_name} {instance_name} {'batch' if token is None else token} "
            out = ascii_json(row, encode)
            # ASCII JSON has no newline.
            if out is not None:
                return head.encode("utf-8") + out
        except (UnicodeEncodeError, ValueError):
            # A lone surrogate in a name; a token with more digits than
            # Python writes.
            pass
    return None


_encode_rdata: Final[
    Callable[[str, str, int | None, JsonValue, Callable[[JsonValue], bytes]], bytes | None]
] = _encode_rdata_py if SPEEDUPS is None else SPEEDUPS.encode_rdata


def encode_command(cmd: Command) -> bytes:
    """The line for `cmd`, UTF-8 encoded, without the newline.

    Raises CommandEncodeError if the line would contain a newline (a reader would
    see two lines), a lone surrogate (it has no UTF-8 form) or a field would
    split wrongly.
    """
    # The frequent commands are written here in one go when every field is of
    # the expected type and plainly valid; anything else, and every error, is
    # left to the command's own `to_bytes`. The JSON is ASCII without control
    # characters, so it holds no newline.
    if type(cmd) is RdataCommand:
        out = _encode_rdata(
            cmd.stream_name, cmd.instance_name, cmd.token, cmd.row, fast_encode_json
        )
        if out is not None:
            return out
    elif type(cmd) is UserIpCommand:
        user_id = cmd.user_id
        device_id = cmd.device_id
        if (
            type(user_id) is str
            and user_id
            and " " not in user_id
            and "\n" not in user_id
            and type(cmd.access_token) is str
            and type(cmd.ip) is str
            and type(cmd.user_agent) is str
            and (device_id is None or type(device_id) is str)
            and type(cmd.last_seen) is int
        ):
            out = ascii_json(
                [cmd.access_token, cmd.ip, cmd.user_agent, device_id, cmd.last_seen],
                fast_encode_json,
            )
            if out is not None:
                try:
                    return b"USER_IP " + user_id.encode("utf-8") + b" " + out
                except UnicodeEncodeError:
                    pass
    elif type(cmd) is PositionCommand:
        stream_name = cmd.stream_name
        instance_name = cmd.instance_name
        prev_token = cmd.prev_token
        new_token = cmd.new_token
        if (
            type(stream_name) is str
            and type(instance_name) is str
            and type(prev_token) is int
            and type(new_token) is int
            and stream_name
            and instance_name
            and " " not in stream_name
            and " " not in instance_name
        ):
            line = f"POSITION {stream_name} {instance_name} {prev_token} {new_token}"
            if "\n" not in line:
                try:
                    return line.encode("utf-8")
                except UnicodeEncodeError:
                    pass
    elif type(cmd) is LockReleasedCommand:
        instance_name = cmd.instance_name
        lock_name = cmd.lock_name
        lock_key = cmd.lock_key
        if type(instance_name) is str and type(lock_name) is str and type(lock_key) is str:
            out = ascii_json([instance_name, lock_name, lock_key], fast_encode_json)
            if out is not None:
                return b"LOCK_RELEASED " + out
    return cmd.to_bytes()
