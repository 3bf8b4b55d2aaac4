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
from typing import ClassVar, Final, Self, TypeAlias

import attrs

from synapse_replication._json import (
    JsonValue,
    decode_json,
    encode_json,
    encode_json_bytes,
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
    "parse_command_from_line",
]

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

    __slots__ = ()

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
        # The most frequent line of all: plain digits are converted inline.
        token: int | None
        if token_text.isdigit() and token_text.isascii():
            token = int(token_text)
        elif token_text == BATCH_TOKEN:
            token = None
        else:
            token = _parse_int(cls.NAME, line, "token", token_text)
        return cls(stream_name, instance_name, token, _parse_json(cls.NAME, line, row_json))

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
        return cls(
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
        return cls(user_id, access_token, ip, user_agent, device_id, last_seen)

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
        return cls(value[0], value[1], value[2])

    def to_line(self) -> str:
        return _encode_json(self.NAME, [self.instance_name, self.lock_name, self.lock_key])


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


def encode_command(cmd: Command) -> bytes:
    """The line for `cmd`, UTF-8 encoded, without the newline.

    Raises CommandEncodeError if the line would contain a newline (a reader would
    see two lines), a lone surrogate (it has no UTF-8 form) or a field would
    split wrongly.
    """
    return cmd.to_bytes()
