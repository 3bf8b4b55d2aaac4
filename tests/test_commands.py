"""Tests for synapse_replication.commands: the replication wire format."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, Final

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_replication.commands import (
    COMMAND_MAP,
    VALID_CLIENT_COMMANDS,
    VALID_SERVER_COMMANDS,
    AnyCommand,
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
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
    encode_command,
    parse_command_from_line,
)
from synapse_replication.errors import (
    CommandEncodeError,
    CommandParseError,
    ReplicationError,
)
from tests.fakes import TypedTestCase
from tests.wire_vectors import wire_lines

ALL_NAMES: Final = frozenset(
    {
        "SERVER",
        "RDATA",
        "POSITION",
        "ERROR",
        "PING",
        "NAME",
        "REPLICATE",
        "USER_SYNC",
        "CLEAR_USER_SYNC",
        "FEDERATION_ACK",
        "USER_IP",
        "REMOTE_SERVER_UP",
        "LOCK_RELEASED",
        "NEW_ACTIVE_TASK",
        "CANCEL_TASK",
    }
)

SECRET: Final = "syt_c2VjcmV0_TOPSECRETTOKEN_0x1234"

# One example line for each of the fifteen commands, with the command it holds.
EXAMPLES: Final[tuple[tuple[str, AnyCommand], ...]] = (
    ("SERVER test.local", ServerCommand("test.local")),
    (
        'RDATA events master 12 ["ev",["$e","!r","m.room.message",null,null,null,null,0,0]]',
        RdataCommand(
            "events",
            "master",
            12,
            ["ev", ["$e", "!r", "m.room.message", None, None, None, None, 0, 0]],
        ),
    ),
    ("POSITION events master 1 5", PositionCommand("events", "master", 1, 5)),
    ("ERROR Failed to keep up", ErrorCommand("Failed to keep up")),
    ("PING 1700000000000", PingCommand("1700000000000")),
    ("NAME worker1", NameCommand("worker1")),
    ("REPLICATE ", ReplicateCommand()),
    (
        "USER_SYNC worker1 @alice:test.local ABCDEF start 1700000000000",
        UserSyncCommand("worker1", "@alice:test.local", "ABCDEF", True, 1700000000000),
    ),
    ("CLEAR_USER_SYNC worker1", ClearUserSyncCommand("worker1")),
    (
        "FEDERATION_ACK federation_sender 42",
        FederationAckCommand("federation_sender", 42),
    ),
    (
        f'USER_IP @alice:test.local ["{SECRET}","10.0.0.1","Mozilla/5.0 (X11)","ABCDEF",1700000000000]',
        UserIpCommand(
            "@alice:test.local",
            SECRET,
            "10.0.0.1",
            "Mozilla/5.0 (X11)",
            "ABCDEF",
            1700000000000,
        ),
    ),
    ("REMOTE_SERVER_UP other.example", RemoteServerUpCommand("other.example")),
    (
        'LOCK_RELEASED ["master","lock_name","lock_key"]',
        LockReleasedCommand("master", "lock_name", "lock_key"),
    ),
    ("NEW_ACTIVE_TASK task1", NewActiveTaskCommand("task1")),
    ("CANCEL_TASK task1", CancelTaskCommand("task1")),
)


def rest_of(line: str) -> str:
    """What follows ``NAME `` on `line`."""
    return line.partition(" ")[2]


def parse_error(line: str) -> CommandParseError:
    """The CommandParseError that parsing `line` raises (fails the test if none)."""
    try:
        cmd = parse_command_from_line(line)
    except CommandParseError as e:
        return e
    raise AssertionError(f"{line[:200]!r} parsed as {cmd!r}")


def vector_line(predicate: Callable[[str], bool]) -> str:
    """The first wire vector line for which `predicate` is true."""
    for line in wire_lines():
        if predicate(line):
            return line
    raise AssertionError("no wire vector line matches")


def parses_or_refuses(line: str) -> None:
    """Parse `line`, letting anything but CommandParseError escape."""
    try:
        cmd = parse_command_from_line(line)
    except CommandParseError:
        return
    assert isinstance(cmd, Command)


# ---- strategies -------------------------------------------------------------

# Any code point, lone surrogates included.
ANY_TEXT: Final = st.text(st.characters(codec=None, exclude_categories=()))
# Names and ids: non-empty, no space, no newline, valid Unicode.
WORDS: Final = st.text(
    st.characters(codec=None, exclude_categories=["Cs"], exclude_characters=" \n"),
    min_size=1,
)
# Free text on one line: ERROR and PING arguments.
ONE_LINE_TEXT: Final = st.text(
    st.characters(codec=None, exclude_categories=["Cs"], exclude_characters="\n")
)
TOKENS: Final = (
    st.integers()
    | st.integers(min_value=2**64, max_value=2**200)
    | st.integers(min_value=-(2**200), max_value=-(2**64))
)
ROWS: Final = st.recursive(
    st.none()
    | st.booleans()
    | TOKENS
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(ANY_TEXT, children, max_size=4)
    ),
    max_leaves=12,
)

VALID_COMMANDS: Final[st.SearchStrategy[AnyCommand]] = st.one_of(
    st.builds(ServerCommand, WORDS),
    st.builds(RdataCommand, WORDS, WORDS, st.none() | TOKENS, ROWS),
    st.builds(PositionCommand, WORDS, WORDS, TOKENS, TOKENS),
    st.builds(ErrorCommand, ONE_LINE_TEXT),
    st.builds(PingCommand, ONE_LINE_TEXT),
    st.builds(NameCommand, WORDS),
    st.just(ReplicateCommand()),
    st.builds(
        UserSyncCommand,
        WORDS,
        WORDS,
        # A device literally named "None" reads back as no device, as in Synapse.
        st.none() | WORDS.filter(lambda d: d != "None"),
        st.booleans(),
        TOKENS,
    ),
    st.builds(ClearUserSyncCommand, WORDS),
    st.builds(FederationAckCommand, WORDS, TOKENS),
    st.builds(
        UserIpCommand,
        WORDS,
        ANY_TEXT,
        ANY_TEXT,
        ANY_TEXT,
        st.none() | ANY_TEXT,
        TOKENS,
    ),
    st.builds(RemoteServerUpCommand, WORDS),
    st.builds(LockReleasedCommand, ANY_TEXT, ANY_TEXT, ANY_TEXT),
    st.builds(NewActiveTaskCommand, WORDS),
    st.builds(CancelTaskCommand, WORDS),
)

# Characters that matter to the parser, to make random rests reach deep.
_INTERESTING: Final = (
    ' 0123456789-+.[]{}",:\\batchNoneInfinityNaNstartend\u0661\u00b2\t'
)
RANDOM_RESTS: Final = ANY_TEXT | st.text(st.sampled_from(_INTERESTING))

WIRE_LINES: Final = st.deferred(lambda: st.sampled_from(wire_lines()))


@st.composite
def mutated_lines(draw: st.DrawFn) -> str:
    """A wire vector line with one to four random mutations."""
    line: str = draw(WIRE_LINES)
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(
            st.sampled_from(
                (
                    "delete",
                    "insert",
                    "replace",
                    "truncate",
                    "double_space",
                    "swap_fields",
                    "digit_to_letter",
                    "inject_constant",
                )
            )
        )
        pos = draw(st.integers(min_value=0, max_value=len(line)))
        if kind == "delete":
            line = line[:pos] + line[pos + 1 :]
        elif kind == "insert":
            line = (
                line[:pos] + draw(st.sampled_from(_INTERESTING) | ANY_TEXT) + line[pos:]
            )
        elif kind == "replace":
            line = (
                line[:pos]
                + draw(st.characters(codec=None, exclude_categories=()))
                + line[pos + 1 :]
            )
        elif kind == "truncate":
            line = line[:pos]
        elif kind == "double_space":
            spaces = [i for i, c in enumerate(line) if c == " "]
            if spaces:
                i = draw(st.sampled_from(spaces))
                line = line[:i] + " " + line[i:]
        elif kind == "swap_fields":
            fields = line.split(" ")
            i = draw(st.integers(min_value=0, max_value=len(fields) - 1))
            j = draw(st.integers(min_value=0, max_value=len(fields) - 1))
            fields[i], fields[j] = fields[j], fields[i]
            line = " ".join(fields)
        elif kind == "digit_to_letter":
            digits = [i for i, c in enumerate(line) if c.isdigit()]
            if digits:
                i = draw(st.sampled_from(digits))
                line = line[:i] + draw(st.sampled_from("aOlxe")) + line[i + 1 :]
        else:
            constant = draw(st.sampled_from(("NaN", "Infinity", "-Infinity")))
            numbers = [i for i, c in enumerate(line) if c.isdigit()]
            on_a_digit = draw(st.booleans())
            if numbers and on_a_digit:
                i = draw(st.sampled_from(numbers))
                line = line[:i] + constant + line[i + 1 :]
            else:
                line = line[:pos] + constant + line[pos:]
    return line


FUZZ: Final = settings(max_examples=1000, deadline=None)


# ---- wire vectors -----------------------------------------------------------


class WireVectorTests(TypedTestCase):
    """Every line a real Synapse 1.163 sent parses and re-encodes to the same bytes."""

    def test_vectors_present(self) -> None:
        """The wire vectors hold RDATA, POSITION, LOCK_RELEASED and REPLICATE lines."""
        names = {line.partition(" ")[0] for line in wire_lines()}
        self.assertTrue(
            {"RDATA", "POSITION", "LOCK_RELEASED", "REPLICATE"} <= names, names
        )

    def test_every_line_parses_to_its_command_class(self) -> None:
        """Every vector line parses to the class COMMAND_MAP gives for its name."""
        for line in wire_lines():
            cmd = parse_command_from_line(line)
            self.assertIs(type(cmd), COMMAND_MAP[line.partition(" ")[0]], line)

    def test_every_line_reencodes_to_same_bytes(self) -> None:
        """encode_command of every parsed vector line gives that line's bytes."""
        for line in wire_lines():
            self.assertEqual(
                encode_command(parse_command_from_line(line)), line.encode(), line
            )

    def test_every_line_is_name_space_to_line(self) -> None:
        """NAME + " " + to_line() of every parsed vector line is that line."""
        for line in wire_lines():
            cmd = parse_command_from_line(line)
            self.assertEqual(cmd.NAME + " " + cmd.to_line(), line)

    def test_replicate_has_trailing_space(self) -> None:
        """Synapse's REPLICATE line is "REPLICATE " and is re-encoded with the space."""
        line = vector_line(lambda line: line.startswith("REPLICATE"))
        self.assertEqual(line, "REPLICATE ")
        self.assertEqual(encode_command(parse_command_from_line(line)), b"REPLICATE ")

    def test_rdata_batch_token_is_none(self) -> None:
        """An RDATA line with token `batch` parses with token None."""
        line = vector_line(lambda line: line.startswith("RDATA events master batch "))
        cmd = parse_command_from_line(line)
        assert isinstance(cmd, RdataCommand)
        self.assertEqual(
            (cmd.stream_name, cmd.instance_name, cmd.token), ("events", "master", None)
        )

    def test_rdata_numeric_token_is_int(self) -> None:
        """An RDATA line with a numeric token parses with that int."""
        line = vector_line(lambda line: line.startswith("RDATA presence master 2 "))
        cmd = parse_command_from_line(line)
        assert isinstance(cmd, RdataCommand)
        self.assertEqual(cmd.token, 2)
        self.assertIs(type(cmd.token), int)

    def test_rdata_row_is_decoded_json(self) -> None:
        """An RDATA row is the decoded JSON value, SQLite booleans as 0 and 1."""
        line = vector_line(
            lambda line: line.startswith('RDATA events master batch ["ev",')
        )
        cmd = parse_command_from_line(line)
        assert isinstance(cmd, RdataCommand)
        self.assertEqual(cmd.row, json.loads(rest_of(line).split(" ", 3)[3]))
        self.assertEqual(cmd.row[1][-2:], [0, 0])

    def test_position_tokens_are_ints(self) -> None:
        """A POSITION line parses to its stream, instance and int tokens."""
        cmd = parse_command_from_line(wire_lines()[0])
        self.assertEqual(cmd, PositionCommand("events", "master", 1, 1))
        assert isinstance(cmd, PositionCommand)
        self.assertIs(type(cmd.prev_token), int)
        self.assertIs(type(cmd.new_token), int)

    def test_lock_released_fields(self) -> None:
        """A LOCK_RELEASED line parses to its instance, lock name and key."""
        cmd = parse_command_from_line(
            vector_line(lambda line: line.startswith("LOCK_RELEASED "))
        )
        self.assertEqual(
            cmd,
            LockReleasedCommand(
                "master",
                "new_event_during_purge_lock",
                "!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw",
            ),
        )

    def test_presence_row_escapes_decoded(self) -> None:
        """The presence row with \\u00e9, \\u2603, \\ud83c\\udf89, quotes and \\\\ decodes."""
        line = vector_line(lambda line: "\\ud83c\\udf89" in line)
        cmd = parse_command_from_line(line)
        assert isinstance(cmd, RdataCommand)
        self.assertEqual(cmd.row[5], 'h\u00e9llo \u2603 \U0001f389 "quoted" \\ back')

    def test_presence_row_escapes_reencoded_identically(self) -> None:
        """The presence row with non-ASCII text and escapes re-encodes byte for byte."""
        line = vector_line(lambda line: "\\ud83c\\udf89" in line)
        self.assertIn('\\"quoted\\" \\\\ back', line)
        self.assertEqual(encode_command(parse_command_from_line(line)), line.encode())


# ---- the fifteen commands ---------------------------------------------------


class CommandMapTests(TypedTestCase):
    """The command registry and who may send what, as in Synapse 1.163."""

    def test_command_map_names(self) -> None:
        """COMMAND_MAP holds exactly the fifteen command names."""
        self.assertEqual(set(COMMAND_MAP), ALL_NAMES)

    def test_command_map_classes_match_names(self) -> None:
        """Each COMMAND_MAP entry is the class with that NAME."""
        for name, cls in COMMAND_MAP.items():
            self.assertEqual(cls.NAME, name)

    def test_valid_server_commands(self) -> None:
        """VALID_SERVER_COMMANDS is Synapse 1.163's set."""
        self.assertEqual(
            VALID_SERVER_COMMANDS,
            {
                "SERVER",
                "RDATA",
                "POSITION",
                "ERROR",
                "PING",
                "REMOTE_SERVER_UP",
                "LOCK_RELEASED",
            },
        )

    def test_valid_client_commands(self) -> None:
        """VALID_CLIENT_COMMANDS is Synapse 1.163's set."""
        self.assertEqual(
            VALID_CLIENT_COMMANDS,
            {
                "NAME",
                "REPLICATE",
                "PING",
                "USER_SYNC",
                "CLEAR_USER_SYNC",
                "FEDERATION_ACK",
                "USER_IP",
                "ERROR",
                "REMOTE_SERVER_UP",
                "LOCK_RELEASED",
            },
        )

    def test_task_commands_in_neither_direction(self) -> None:
        """NEW_ACTIVE_TASK and CANCEL_TASK are sent by neither TCP side."""
        for name in ("NEW_ACTIVE_TASK", "CANCEL_TASK"):
            self.assertNotIn(name, VALID_SERVER_COMMANDS | VALID_CLIENT_COMMANDS)


class CommandTests(TypedTestCase):
    """NAME, from_line, to_line, equality and repr of all fifteen commands."""

    def test_examples_cover_every_command(self) -> None:
        """The examples hold one command of each of the fifteen classes."""
        self.assertEqual({type(cmd) for _, cmd in EXAMPLES}, set(COMMAND_MAP.values()))

    def test_name(self) -> None:
        """Each command's NAME is the first word of its line."""
        for line, cmd in EXAMPLES:
            self.assertEqual(cmd.NAME, line.split(" ")[0])

    def test_from_line(self) -> None:
        """Each class's from_line parses the rest of its example line."""
        for line, cmd in EXAMPLES:
            self.assertEqual(type(cmd).from_line(rest_of(line)), cmd, line)

    def test_to_line(self) -> None:
        """Each command's to_line gives the rest of its example line."""
        for line, cmd in EXAMPLES:
            self.assertEqual(cmd.to_line(), rest_of(line))

    def test_parse_command_from_line(self) -> None:
        """parse_command_from_line gives each example's command."""
        for line, cmd in EXAMPLES:
            self.assertEqual(parse_command_from_line(line), cmd, line)

    def test_encode_command(self) -> None:
        """encode_command gives each example's line as UTF-8 bytes."""
        for line, cmd in EXAMPLES:
            self.assertEqual(encode_command(cmd), line.encode())

    def test_equal_when_fields_equal(self) -> None:
        """Two commands parsed from the same line are equal."""
        for line, _ in EXAMPLES:
            self.assertEqual(
                parse_command_from_line(line), parse_command_from_line(line)
            )

    def test_unequal_when_a_field_differs(self) -> None:
        """Changing any one field makes a command unequal to the original."""
        for _, cmd in EXAMPLES:
            for field in attrs.fields(type(cmd)):
                value = getattr(cmd, field.name)
                changed: Any = (
                    not value
                    if isinstance(value, bool)
                    else value + 1
                    if isinstance(value, int)
                    else [value]
                    if value is None or isinstance(value, list)
                    else value + "x"
                )
                self.assertNotEqual(
                    attrs.evolve(cmd, **{field.name: changed}), cmd, field.name
                )

    def test_unequal_across_classes(self) -> None:
        """Commands of different classes with the same data are unequal."""
        self.assertNotEqual(ServerCommand("x"), NameCommand("x"))
        self.assertNotEqual(NewActiveTaskCommand("t"), CancelTaskCommand("t"))

    def test_frozen(self) -> None:
        """Commands are immutable."""
        self.assertRaises(
            attrs.exceptions.FrozenInstanceError, setattr, NameCommand("a"), "data", "b"
        )

    def test_repr_names_class_and_fields(self) -> None:
        """repr shows the class name and its fields' values."""
        self.assertEqual(
            repr(PositionCommand("events", "master", 1, 5)),
            "PositionCommand(stream_name='events', instance_name='master', prev_token=1, new_token=5)",
        )

    def test_repr_of_every_command(self) -> None:
        """repr of each command starts with its class name."""
        for _, cmd in EXAMPLES:
            self.assertTrue(repr(cmd).startswith(type(cmd).__name__ + "("), repr(cmd))

    def test_user_ip_repr_hides_access_token(self) -> None:
        """repr of a USER_IP command does not contain the access token."""
        cmd = UserIpCommand("@alice:test.local", SECRET, "10.0.0.1", "UA", "DEV", 1)
        self.assertNotIn(SECRET, repr(cmd))
        self.assertNotIn(SECRET, str(cmd))

    def test_user_ip_repr_shows_other_fields(self) -> None:
        """repr of a USER_IP command still shows the user, address and agent."""
        text = repr(
            UserIpCommand("@alice:test.local", SECRET, "10.0.0.1", "UA", "DEV", 1)
        )
        for shown in ("@alice:test.local", "10.0.0.1", "UA", "DEV", "<redacted>"):
            self.assertIn(shown, text)

    def test_user_ip_fields(self) -> None:
        """A USER_IP line parses to typed fields, a null device as None."""
        cmd = UserIpCommand.from_line(f'@a:t ["{SECRET}","::1","UA",null,5]')
        self.assertEqual(cmd, UserIpCommand("@a:t", SECRET, "::1", "UA", None, 5))

    def test_user_sync_end(self) -> None:
        """A USER_SYNC with state `end` has is_syncing False."""
        cmd = parse_command_from_line("USER_SYNC w @a:t D end 5")
        self.assertEqual(cmd, UserSyncCommand("w", "@a:t", "D", False, 5))

    def test_user_sync_device_none(self) -> None:
        """A USER_SYNC device `None` parses as None and is written back as `None`."""
        line = "USER_SYNC w @a:t None start 5"
        cmd = parse_command_from_line(line)
        self.assertEqual(cmd, UserSyncCommand("w", "@a:t", None, True, 5))
        self.assertEqual(encode_command(cmd), line.encode())

    def test_clear_user_sync_instance_id(self) -> None:
        """CLEAR_USER_SYNC exposes its argument as instance_id."""
        self.assertEqual(ClearUserSyncCommand("worker1").instance_id, "worker1")

    def test_replicate_without_space(self) -> None:
        """A bare `REPLICATE`, without the trailing space, parses too."""
        self.assertEqual(parse_command_from_line("REPLICATE"), ReplicateCommand())

    def test_ping_without_argument(self) -> None:
        """A bare `PING` parses with empty data."""
        self.assertEqual(parse_command_from_line("PING"), PingCommand(""))

    def test_error_keeps_spaces(self) -> None:
        """ERROR keeps the whole rest of the line, spaces included."""
        self.assertEqual(
            parse_command_from_line("ERROR  a  b "), ErrorCommand(" a  b ")
        )

    def test_negative_and_big_tokens(self) -> None:
        """Tokens may be negative or beyond 64 bits."""
        line = f"POSITION s i -5 {2**100}"
        self.assertEqual(
            parse_command_from_line(line), PositionCommand("s", "i", -5, 2**100)
        )

    def test_batch_encoded_for_none_token(self) -> None:
        """An RDATA with token None is written with token `batch`."""
        self.assertEqual(
            encode_command(RdataCommand("s", "i", None, [])), b"RDATA s i batch []"
        )


# ---- malformed input ---------------------------------------------------------


class ParseErrorTests(TypedTestCase):
    """Malformed lines raise CommandParseError naming the command and the line."""

    def test_parse_error_is_value_error(self) -> None:
        """CommandParseError is a ValueError and a ReplicationError."""
        self.assertTrue(issubclass(CommandParseError, ValueError))
        self.assertTrue(issubclass(CommandParseError, ReplicationError))

    def test_message_names_command_and_line(self) -> None:
        """The message names the command and shows the offending line."""
        line = "POSITION events master x 1"
        e = parse_error(line)
        self.assertEqual((e.command, e.line), ("POSITION", line))
        self.assertIn("POSITION", str(e))
        self.assertIn(repr(line), str(e))

    def test_unknown_command(self) -> None:
        """An unknown command name is refused, the name shown."""
        e = parse_error("FROB a b c")
        self.assertIsNone(e.command)
        self.assertIn("FROB", str(e))

    def test_lowercase_command(self) -> None:
        """Command names are case-sensitive."""
        parse_error("rdata events master 1 []")

    def test_empty_line(self) -> None:
        """An empty line is not a command."""
        parse_error("")

    def test_long_line_shortened(self) -> None:
        """A 20 KB line gives a message well under 1 KB that starts the line."""
        lines = (
            "FROB " + "x" * 20000,
            "RDATA events master 1 [" + '"x",' * 5000,
            "POSITION events master 1 " + "9" * 20000,
            "POSITION events master 1 " + "x" * 20000,
            "LOCK_RELEASED " + "x" * 20000,
            "USER_SYNC " + "x " * 10000,
            "SERVER" + "x" * 20000,
        )
        for line in lines:
            message = str(parse_error(line))
            self.assertLess(len(message), 1000, message[:100])
            self.assertIn(line[:100], message)

    def test_missing_fields(self) -> None:
        """Lines with too few fields are refused."""
        for line in (
            "RDATA events master 1",
            "RDATA events master",
            "RDATA",
            "POSITION events master 1",
            "POSITION",
            "USER_SYNC w @a:t D start",
            "FEDERATION_ACK sender",
            "FEDERATION_ACK",
            "USER_IP @a:t",
            "SERVER",
            "NAME",
            "CLEAR_USER_SYNC",
            "REMOTE_SERVER_UP ",
            "NEW_ACTIVE_TASK",
            "CANCEL_TASK ",
            "LOCK_RELEASED",
        ):
            self.assertEqual(parse_error(line).command, line.split(" ")[0], line)

    def test_extra_fields(self) -> None:
        """Lines with too many fields are refused."""
        for line in (
            "POSITION events master 1 2 3",
            "POSITION events master 1 2 ",
            "FEDERATION_ACK sender 1 2",
            "USER_SYNC w @a:t D start 5 6",
        ):
            self.assertEqual(parse_error(line).command, line.split(" ")[0], line)

    def test_non_integer_token(self) -> None:
        """A token that str(int) could not have written is refused everywhere."""
        for bad in (
            "1.5",
            " 1",
            "\t1",
            "1\t",
            "+1",
            "\u0661",
            "\u00b2",
            "\uff11",
            "1_000",
            "0x10",
            "1e3",
            "",
            "-",
            "--1",
            "one",
            "\u00a01",
        ):
            for line in (
                f"POSITION events master {bad} 1",
                f"POSITION events master 1 {bad}",
                f"RDATA events master {bad} []",
                f"FEDERATION_ACK sender {bad}",
                f"USER_SYNC w @a:t D start {bad}",
            ):
                parse_error(line)

    def test_too_many_digits(self) -> None:
        """A token with more digits than Python converts is refused, not a crash."""
        parse_error("FEDERATION_ACK sender " + "1" * 5000)

    def test_bad_json(self) -> None:
        """A row that is not JSON is refused."""
        for line in (
            "RDATA events master 1 [",
            "RDATA events master 1 [1,]",
            "RDATA events master 1 {'a':1}",
            "RDATA events master 1 [1] [2]",
            "RDATA events master 1 ",
            'LOCK_RELEASED ["a","b"',
        ):
            self.assertIn("JSON", str(parse_error(line)), line)

    def test_nan_and_infinity_in_row_refused(self) -> None:
        """NaN, Infinity and -Infinity in a row are refused."""
        for constant in ("NaN", "Infinity", "-Infinity"):
            parse_error(f'RDATA events master 1 ["x",{constant}]')
            parse_error(f"RDATA events master 1 {constant}")

    def test_deeply_nested_row_refused(self) -> None:
        """A row nested 100000 deep is refused with CommandParseError."""
        parse_error("RDATA events master 1 " + "[" * 100000)

    def test_lock_released_shape(self) -> None:
        """LOCK_RELEASED needs a JSON list of exactly three strings."""
        for rest in (
            '["a","b"]',
            '["a","b","c","d"]',
            '["a","b",1]',
            '{"a":"b"}',
            '"abc"',
        ):
            parse_error("LOCK_RELEASED " + rest)

    def test_user_sync_bad_state(self) -> None:
        """A USER_SYNC state other than `start` or `end` is refused."""
        for state in ("START", "stop", "begin", "true", "1", ""):
            parse_error(f"USER_SYNC w @a:t D {state} 5")

    def test_replicate_with_argument(self) -> None:
        """REPLICATE with an argument is refused."""
        e = parse_error("REPLICATE events")
        self.assertEqual(e.command, "REPLICATE")

    def test_empty_stream_name(self) -> None:
        """An empty stream name is refused in RDATA and POSITION."""
        parse_error("RDATA  master 1 []")
        parse_error("POSITION  master 1 1")

    def test_empty_instance_name(self) -> None:
        """An empty instance name is refused in RDATA, POSITION and FEDERATION_ACK."""
        parse_error("RDATA events  1 []")
        parse_error("POSITION events  1 1")
        parse_error("FEDERATION_ACK  1")

    def test_user_ip_bad_shape(self) -> None:
        """USER_IP needs [str, str, str, str or null, int]."""
        for rest in (
            f'["{SECRET}","ip","ua","dev"]',
            f'["{SECRET}","ip","ua","dev",1,2]',
            f'["{SECRET}","ip","ua","dev","1"]',
            f'["{SECRET}","ip","ua",5,1]',
            f'["{SECRET}",null,"ua","dev",1]',
            f'["{SECRET}","ip","ua","dev",1.5]',
            f'["{SECRET}","ip","ua","dev",true]',
            f'{{"t":"{SECRET}"}}',
        ):
            self.assertEqual(parse_error("USER_IP @a:t " + rest).command, "USER_IP")


class UserIpSecrecyTests(TypedTestCase):
    """No error about a USER_IP line shows its access token."""

    def assert_secret_hidden(self, line: str) -> None:
        e = parse_error(line)
        for text in (str(e), repr(e), e.line, e.reason, *map(str, e.args)):
            self.assertNotIn(SECRET, text)
            self.assertNotIn(SECRET[:12], text)

    def test_bad_json_hides_token(self) -> None:
        """Truncated JSON after the token does not show the token."""
        self.assert_secret_hidden(f'USER_IP @a:t ["{SECRET}","10.0.0.1"')

    def test_bad_escape_hides_token(self) -> None:
        """A bad escape next to the token does not show the token."""
        self.assert_secret_hidden(f'USER_IP @a:t ["{SECRET}\\x","ip","ua",null,1]')

    def test_nan_hides_token(self) -> None:
        """NaN in the list does not show the token."""
        self.assert_secret_hidden(f'USER_IP @a:t ["{SECRET}","ip","ua",null,NaN]')

    def test_wrong_length_hides_token(self) -> None:
        """A list of the wrong length does not show the token."""
        self.assert_secret_hidden(f'USER_IP @a:t ["{SECRET}","ip"]')

    def test_wrong_types_hides_token(self) -> None:
        """A list of wrong types does not show the token."""
        self.assert_secret_hidden(f'USER_IP @a:t ["{SECRET}","ip","ua",null,"x"]')

    def test_unquoted_token_hides_token(self) -> None:
        """A token written without quotes, so not JSON, is not shown."""
        self.assert_secret_hidden(f"USER_IP @a:t [{SECRET},ip,ua,null,1]")

    def test_long_line_hides_token(self) -> None:
        """A 20 KB USER_IP line gives a short message without the token."""
        line = f'USER_IP @a:t ["{SECRET}","{"x" * 20000}"'
        self.assert_secret_hidden(line)
        self.assertLess(len(str(parse_error(line))), 1000)

    def test_message_names_command_and_user(self) -> None:
        """A USER_IP error still names the command and the user."""
        message = str(parse_error(f'USER_IP @alice:test.local ["{SECRET}"'))
        self.assertIn("USER_IP", message)
        self.assertIn("@alice:test.local", message)


# ---- encoding ------------------------------------------------------------------


class EncodeTests(TypedTestCase):
    """encode_command writes Synapse's bytes and refuses what would not read back."""

    def encode_row(self, row: Any) -> bytes:
        return encode_command(RdataCommand("s", "i", 1, row))

    def test_compact_separators(self) -> None:
        """Rows use compact separators."""
        self.assertEqual(
            self.encode_row({"a": [1, 2], "b": None}),
            b'RDATA s i 1 {"a":[1,2],"b":null}',
        )

    def test_non_ascii_escaped(self) -> None:
        """Non-ASCII text in a row is written as \\uXXXX escapes."""
        self.assertEqual(
            self.encode_row(["\u00e9\u2603"]), b'RDATA s i 1 ["\\u00e9\\u2603"]'
        )

    def test_astral_as_surrogate_pair(self) -> None:
        """An astral character in a row is written as a surrogate pair."""
        self.assertEqual(self.encode_row("\U0001f389"), b'RDATA s i 1 "\\ud83c\\udf89"')

    def test_key_order_kept(self) -> None:
        """Row keys are written in insertion order."""
        self.assertEqual(
            self.encode_row({"z": 1, "a": 2}), b'RDATA s i 1 {"z":1,"a":2}'
        )

    def test_del_escaped(self) -> None:
        """DEL in a row is written as \\u007f."""
        self.assertEqual(self.encode_row("\x7f"), b'RDATA s i 1 "\\u007f"')

    def test_control_chars_as_json(self) -> None:
        """Control characters in a row are escaped exactly as Python's json does."""
        text = "".join(map(chr, range(0x20))) + '"\\\x7f'
        expected = json.dumps(text, ensure_ascii=True, separators=(",", ":"))
        self.assertEqual(self.encode_row(text), b"RDATA s i 1 " + expected.encode())

    def test_newline_in_row_escaped(self) -> None:
        """A newline inside a row's text is escaped, not refused."""
        self.assertEqual(self.encode_row("a\nb"), b'RDATA s i 1 "a\\nb"')

    def test_encode_error_is_value_error(self) -> None:
        """CommandEncodeError is a ValueError and a ReplicationError."""
        self.assertTrue(issubclass(CommandEncodeError, ValueError))
        self.assertTrue(issubclass(CommandEncodeError, ReplicationError))

    def test_nan_refused(self) -> None:
        """NaN in a row is refused with CommandEncodeError."""
        self.assertRaises(CommandEncodeError, self.encode_row, [float("nan")])

    def test_infinity_refused(self) -> None:
        """Infinity in a row is refused with CommandEncodeError."""
        self.assertRaises(CommandEncodeError, self.encode_row, {"a": float("inf")})

    def test_negative_infinity_refused(self) -> None:
        """-Infinity in a row is refused with CommandEncodeError."""
        self.assertRaises(CommandEncodeError, self.encode_row, float("-inf"))

    def test_unserialisable_row_refused(self) -> None:
        """A row JSON cannot hold is refused with CommandEncodeError."""
        self.assertRaises(CommandEncodeError, self.encode_row, {1, 2})

    def test_space_in_name_refused(self) -> None:
        """A space in a stream, instance, user or device name is refused."""
        for cmd in (
            RdataCommand("a b", "i", 1, []),
            RdataCommand("s", "a b", 1, []),
            PositionCommand("a b", "i", 1, 1),
            PositionCommand("s", "a b", 1, 1),
            FederationAckCommand("a b", 1),
            UserSyncCommand("a b", "@u:t", None, True, 1),
            UserSyncCommand("w", "@u :t", None, True, 1),
            UserSyncCommand("w", "@u:t", "D E", True, 1),
            UserIpCommand("@u :t", SECRET, "ip", "ua", None, 1),
        ):
            self.assertRaises(CommandEncodeError, encode_command, cmd)

    def test_empty_name_refused(self) -> None:
        """An empty stream, instance or required argument is refused."""
        for cmd in (
            RdataCommand("", "i", 1, []),
            PositionCommand("s", "", 1, 1),
            FederationAckCommand("", 1),
            ServerCommand(""),
            NameCommand(""),
        ):
            self.assertRaises(CommandEncodeError, encode_command, cmd)

    def test_newline_refused(self) -> None:
        """A newline anywhere in the line is refused."""
        for cmd in (
            ServerCommand("a\nb"),
            NameCommand("w\n"),
            ErrorCommand("oops\nRDATA s i 1 []"),
            PingCommand("\n"),
            ClearUserSyncCommand("\nw"),
            RemoteServerUpCommand("a\n"),
            NewActiveTaskCommand("t\n"),
            CancelTaskCommand("t\n"),
            RdataCommand("s\n", "i", 1, []),
            RdataCommand("s", "i\n", 1, []),
            PositionCommand("s", "i\n", 1, 1),
            FederationAckCommand("\ni", 1),
            UserSyncCommand("w", "@u:t", "D\n", False, 1),
            UserIpCommand("@u:t\n", SECRET, "ip", "ua", None, 1),
        ):
            self.assertRaises(CommandEncodeError, encode_command, cmd)

    def test_lone_surrogate_refused(self) -> None:
        """A lone surrogate in a name is refused with CommandEncodeError."""
        self.assertRaises(CommandEncodeError, encode_command, NameCommand("w\ud800"))

    def test_lone_surrogate_in_row_escaped(self) -> None:
        """A lone surrogate in a row's text is escaped, as json does."""
        self.assertEqual(self.encode_row("\ud800"), b'RDATA s i 1 "\\ud800"')

    def test_big_tokens_written_in_full(self) -> None:
        """Tokens beyond 64 bits are written in full."""
        self.assertEqual(
            encode_command(PositionCommand("s", "i", -(2**70), 2**70)),
            f"POSITION s i {-(2**70)} {2**70}".encode(),
        )


# ---- fuzzing -------------------------------------------------------------------


class FuzzTests(TypedTestCase):
    """Whatever arrives, the parser returns a command or raises CommandParseError."""

    @FUZZ
    @given(ANY_TEXT)
    def test_random_text(self, line: str) -> None:
        """Random text parses or raises CommandParseError, nothing else."""
        parses_or_refuses(line)

    @FUZZ
    @given(st.sampled_from(sorted(ALL_NAMES)), RANDOM_RESTS)
    def test_command_name_and_random_rest(self, name: str, rest: str) -> None:
        """A command name and a random rest parse or raise CommandParseError."""
        parses_or_refuses(name + " " + rest)

    @FUZZ
    @given(mutated_lines())
    def test_mutated_wire_lines(self, line: str) -> None:
        """Mutated wire vector lines parse or raise CommandParseError."""
        parses_or_refuses(line)

    @FUZZ
    @given(mutated_lines())
    def test_parsed_mutants_encode_or_refuse(self, line: str) -> None:
        """A command parsed from a mutated line encodes or raises CommandEncodeError."""
        try:
            cmd = parse_command_from_line(line)
        except CommandParseError:
            return
        with contextlib.suppress(CommandEncodeError):
            encode_command(cmd)

    @FUZZ
    @given(VALID_COMMANDS)
    def test_round_trip(self, cmd: AnyCommand) -> None:
        """A valid command of any type reads back equal from its encoding."""
        self.assertEqual(
            parse_command_from_line(encode_command(cmd).decode("utf-8")), cmd
        )
