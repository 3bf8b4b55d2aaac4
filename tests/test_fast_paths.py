"""The codec's fast paths give exactly what the plain paths give.

`parse_command_from_bytes`, the inline cases of `encode_command`, the inline
checks of the streams' `parse_row` and `fast_constructor` are speed-ups of code
that exists (and is tested) in its plain form. Each is checked here against that
plain form: same values (down to their types and reprs), same errors, same
messages. The optional C module (`synapse_replication._speedups`) is checked
against its pure-Python twins, and `encode_command` is run both ways; those
tests are skipped when the module was not built.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Callable
from types import ModuleType
from typing import Any, Final

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_replication import _json, commands
from synapse_replication._accel import SPEEDUPS
from synapse_replication._fastattrs import fast_constructor
from synapse_replication.commands import (
    AnyCommand,
    Command,
    LockReleasedCommand,
    PositionCommand,
    RdataCommand,
    UserIpCommand,
    encode_command,
    parse_command_from_bytes,
    parse_command_from_line,
)
from synapse_replication.errors import (
    CommandEncodeError,
    CommandParseError,
    StreamRowError,
)
from synapse_replication.storage import events as storage_events
from synapse_replication.streams import (
    STREAMS_MAP,
    EventsStream,
    ReceiptsStream,
    TypingStream,
)
from synapse_replication.streams import events as events_module
from synapse_replication.streams import receipts as receipts_module
from synapse_replication.streams import typing as typing_module
from synapse_replication.streams.events import (
    EventsStreamAllStateRow,
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
)
from tests.fakes import TypedTestCase
from tests.test_commands import (
    ANY_TEXT,
    ROWS,
    TOKENS,
    VALID_COMMANDS,
    WORDS,
    mutated_lines,
)
from tests.test_json import ANY_VALUES
from tests.wire_vectors import wire_lines

FUZZ: Final = settings(max_examples=1000, deadline=None)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """What calling `fn` gives, in a form that compares types and messages
    too: ("ok", type, repr, value) or ("error", type, message)."""
    try:
        value = fn()
    except (CommandParseError, CommandEncodeError, StreamRowError) as e:
        return ("error", (type(e), str(e)))
    return ("ok", (type(value), repr(value), value))


def plain_parse(line: bytes) -> AnyCommand:
    """What `parse_command_from_bytes` must be equivalent to."""
    return parse_command_from_line(line.decode("utf-8"))


# ---- parse_command_from_bytes ---------------------------------------------------


EV_ROW: Final = (
    '["ev",["$e:t","!r:t","m.room.member","@u:t",null,null,"join",0,false]]'
)
# Bytes that are not UTF-8, or are UTF-8 only in name (overlong forms,
# encoded surrogates, beyond U+10FFFF, cut short).
BAD_UTF8: Final = (
    b"\xff",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xf4\x90\x80\x80",
    b"\xe2\x98",
    b"\x80",
)


def parse_pure_python(line: bytes) -> AnyCommand:
    """parse_command_from_bytes without the C RDATA parser."""
    saved = commands._c_parse_rdata
    commands._c_parse_rdata = None
    try:
        return parse_command_from_bytes(line)
    finally:
        commands._c_parse_rdata = saved


class ParseFromBytesTests(TypedTestCase):
    def assert_same_as_plain(self, line: bytes) -> None:
        """The same outcome as from text, with and without the C module."""
        for parse in (parse_command_from_bytes, parse_pure_python):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                with self.assertRaises(CommandParseError) as caught:
                    parse(line)
                self.assertIsInstance(caught.exception.__cause__, UnicodeDecodeError)
                continue
            self.assertEqual(
                outcome(lambda: parse(line)),  # noqa: B023 (called at once)
                outcome(lambda: parse_command_from_line(text)),  # noqa: B023 (called at once)
                line,
            )

    def test_wire_vectors(self) -> None:
        """Every wire vector line parses as from text."""
        for line in wire_lines():
            self.assert_same_as_plain(line.encode("utf-8"))

    def test_fast_path_commands(self) -> None:
        """The four commands with a fast path give their commands."""
        self.assertEqual(
            parse_command_from_bytes(f"RDATA events w1 12 {EV_ROW}".encode()),
            RdataCommand(
                "events",
                "w1",
                12,
                ["ev", ["$e:t", "!r:t", "m.room.member", "@u:t", None, None, "join", 0, False]],
            ),
        )
        self.assertEqual(
            parse_command_from_bytes(b"RDATA typing w1 batch []"),
            RdataCommand("typing", "w1", None, []),
        )
        self.assertEqual(
            parse_command_from_bytes(b"POSITION events w1 5 7"),
            PositionCommand("events", "w1", 5, 7),
        )
        self.assertEqual(
            parse_command_from_bytes(
                b'USER_IP @u:t ["tok","::1","UA \\u00e9",null,5]'
            ),
            UserIpCommand("@u:t", "tok", "::1", "UA \u00e9", None, 5),
        )
        self.assertEqual(
            parse_command_from_bytes(b'LOCK_RELEASED ["w","l","k"]'),
            LockReleasedCommand("w", "l", "k"),
        )

    def test_results_are_the_real_classes(self) -> None:
        """What the fast paths build is an instance of the command class:
        frozen, hashable, weakly referenceable, equal to the constructor's."""
        for line, cmd in (
            (b"RDATA s i 1 [1]", RdataCommand("s", "i", 1, [1])),
            (b"POSITION s i 1 2", PositionCommand("s", "i", 1, 2)),
            (b'USER_IP @u:t ["t","i","u","d",1]', UserIpCommand("@u:t", "t", "i", "u", "d", 1)),
            (b'LOCK_RELEASED ["a","b","c"]', LockReleasedCommand("a", "b", "c")),
        ):
            parsed = parse_command_from_bytes(line)
            self.assertIs(type(parsed), type(cmd))
            self.assertEqual(parsed, cmd)
            self.assertEqual(repr(parsed), repr(cmd))
            if not isinstance(parsed, RdataCommand):
                self.assertEqual(hash(parsed), hash(cmd))
            self.assertIs(weakref.ref(parsed)(), parsed)
            self.assertRaises(
                attrs.exceptions.FrozenInstanceError,
                setattr,
                parsed,
                attrs.fields(type(parsed))[0].name,
                "x",
            )

    def test_edge_cases(self) -> None:
        """Lines at the edges of the fast paths give what the text path gives."""
        for line in (
            b"RDATA events w1 -1 []",
            b"RDATA events w1 +1 []",
            b"RDATA events w1 0012 []",
            b"RDATA events w1 1_0 []",
            b"RDATA events w1 " + b"9" * 5000 + b" []",
            b"RDATA events w1 " + b"9" * 999 + b" []",
            b"RDATA events w1 " + b"9" * 1000 + b" []",
            b"RDATA events w1 999999999999999999 []",
            b"RDATA events w1 1000000000000000000 []",
            b"RDATA events w1 9223372036854775807 []",
            b"RDATA events w1 9223372036854775808 []",
            b"RDATA events w1 18446744073709551616 []",
            b"RDATA events w1 0 []",
            b"RDATA events w1 000 []",
            b"RDATA events w1 batchx []",
            b"RDATA events w1 batc []",
            b"RDATA events w1 BATCH []",
            b"RDATA events w1 1 ",
            b"RDATA events w1 1",
            b"RDATA events w1 1 [1, 2] ",
            b"RDATA events w1 1 \t[]",
            b"RDATA events w1 1 []\r",
            b"RDATAX events w1 1 []",
            b"XRDATA events w1 1 []",
            b"RDATA events w1 \xd9\xa1 []",
            b"RDATA events w1 batch",
            b"RDATA events w1 batch ",
            b"RDATA  w1 1 []",
            b"RDATA events  1 []",
            b"RDATA events w1 1 [1e400]",
            b"RDATA events w1 1 NaN",
            b'RDATA events w1 1 ["\\ud800"]',
            b"RDATA events w1 1 " + b"[" * 2000 + b"]" * 2000,
            b"RDATA events w1 1 [1] [2]",
            b"RDATA \xc3\xa9v\xc3\xa9nements w1 1 []",
            b"RDATA",
            b"RDATA ",
            b"POSITION events w1 1 2 3",
            b"POSITION events w1 1",
            b"POSITION events w1 -1 2",
            b"POSITION events w1 1 " + b"9" * 5000,
            b"POSITION  w1 1 2",
            b"POSITION \xc3\xa9 w1 1 2",
            b"USER_IP",
            b"USER_IP ",
            b"USER_IP @u:t",
            b"USER_IP  []",
            b'USER_IP @u:t ["t","i","u",null,1.5]',
            b'USER_IP @u:t ["t","i","u",null,true]',
            b'USER_IP @u:t ["t","i","u",null]',
            b'USER_IP @u:t  ["t","i","u",null,1]',
            b'USER_IP @\xc3\xa9:t ["t","i","u",null,1]',
            b"LOCK_RELEASED",
            b"LOCK_RELEASED ",
            b'LOCK_RELEASED ["a","b"]',
            b'LOCK_RELEASED ["a","b",1]',
            b'LOCK_RELEASED  ["a","b","c"]',
            b"REPLICATE",
            b"PING 123",
            b"",
        ):
            self.assert_same_as_plain(line)

    def test_bad_utf8(self) -> None:
        """A line that is not UTF-8 anywhere is refused with CommandParseError,
        whose cause is the UnicodeDecodeError, in every field of every fast path."""
        for bad in BAD_UTF8:
            for line in (
                b"RDATA ev" + bad + b" w1 1 []",
                b"RDATA events w" + bad + b" 1 []",
                b'RDATA events w1 1 ["' + bad + b'"]',
                b'RDATA events w1 1 {"' + bad + b'":1}',
                b"RDATA events w1 1 [" + bad + b"]",
                b"POSITION ev" + bad + b" w1 1 2",
                b'USER_IP @u' + bad + b':t ["t","i","u",null,1]',
                b'USER_IP @u:t ["t' + bad + b'","i","u",null,1]',
                b'LOCK_RELEASED ["a","' + bad + b'","c"]',
                b"PING " + bad,
                bad,
            ):
                self.assert_same_as_plain(line)

    def test_bad_utf8_in_user_ip_hides_the_token(self) -> None:
        """The error for a USER_IP line that is not UTF-8 shows the user id only."""
        with self.assertRaises(CommandParseError) as caught:
            parse_command_from_bytes(b'USER_IP @u:t ["syt_secret\xff","i","u",null,1]')
        self.assertNotIn("secret", str(caught.exception))
        self.assertIn("@u:t", str(caught.exception))
        self.assertEqual(caught.exception.command, "USER_IP")

    @FUZZ
    @given(mutated_lines())
    def test_mutated_lines(self, line: str) -> None:
        """Mutated wire lines, as UTF-8 (lone surrogates make it invalid)."""
        self.assert_same_as_plain(line.encode("utf-8", "surrogatepass"))

    @FUZZ
    @given(st.binary())
    def test_random_bytes(self, line: bytes) -> None:
        """Random bytes."""
        self.assert_same_as_plain(line)

    @FUZZ
    @given(
        st.sampled_from((b"RDATA ", b"POSITION ", b"USER_IP ", b"LOCK_RELEASED ")),
        st.binary() | ANY_TEXT.map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
    def test_fast_path_names_and_random_rest(self, name: bytes, rest: bytes) -> None:
        """A fast-path command name and a random rest."""
        self.assert_same_as_plain(name + rest)

    @FUZZ
    @given(VALID_COMMANDS)
    def test_valid_commands(self, cmd: AnyCommand) -> None:
        """Every valid command's line parses as from text, and back to it."""
        line = encode_command(cmd)
        self.assert_same_as_plain(line)
        self.assertEqual(parse_command_from_bytes(line), cmd)


# ---- encode_command -----------------------------------------------------------


def plain_encode(cmd: Command) -> bytes:
    """What `encode_command` must be equivalent to."""
    return cmd.to_bytes()


ODD_TEXT: Final = st.sampled_from(
    ("", " ", "a b", "a\nb", "\ud800", "\x7f", "é", "🎉", "\u2028", "\\", '"', "\x00")
)
ODD_WORDS: Final = WORDS | ODD_TEXT
ODD_SCALARS: Final = (
    st.none()
    | st.booleans()
    | TOKENS
    | st.floats()
    | ANY_TEXT
    | ODD_TEXT
    | st.sampled_from((1.0, 1e16, -0.0, 2**70))
)
ODD_ROWS: Final = st.recursive(
    ODD_SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.lists(children, max_size=4).map(tuple)
        | st.dictionaries(ANY_TEXT | ODD_TEXT, children, max_size=4)
        | st.dictionaries(st.integers() | st.none(), children, max_size=2)
    ),
    max_leaves=12,
)
ODD_INTS: Final = TOKENS | st.booleans() | st.sampled_from((1.0, "1"))

ODD_COMMANDS: Final[st.SearchStrategy[Command]] = st.one_of(
    st.builds(RdataCommand, ODD_WORDS, ODD_WORDS, st.none() | ODD_INTS, ODD_ROWS),
    st.builds(PositionCommand, ODD_WORDS, ODD_WORDS, ODD_INTS, ODD_INTS),
    st.builds(
        UserIpCommand,
        ODD_WORDS,
        ANY_TEXT | ODD_TEXT,
        ANY_TEXT | ODD_TEXT | st.none(),
        ANY_TEXT | ODD_TEXT | st.integers(),
        st.none() | ANY_TEXT | ODD_TEXT,
        ODD_INTS,
    ),
    st.builds(
        LockReleasedCommand,
        ANY_TEXT | ODD_TEXT,
        ANY_TEXT | ODD_TEXT,
        ANY_TEXT | ODD_TEXT | st.none() | st.integers(),
    ),
)


class EncodeCommandTests(TypedTestCase):
    def assert_same_as_plain(self, cmd: Command) -> None:
        def run(fn: Callable[[Command], bytes]) -> tuple[str, Any]:
            try:
                return ("ok", fn(cmd))
            except CommandEncodeError:
                # The messages may differ: the fast path leaves every error
                # to the plain one, so they are the same; but other
                # exceptions (TypeError, ValueError) must match by type.
                return ("error", CommandEncodeError)
            except Exception as e:
                return ("other", type(e))

        self.assertEqual(run(encode_command), run(plain_encode), cmd)

    def test_examples(self) -> None:
        """A few lines of each fast-path command, and their refusals."""
        for cmd in (
            RdataCommand("events", "w1", 12, ["ev", ["$e", None, True, 0]]),
            RdataCommand("events", "w1", None, {"a": [1, "é", "🎉", "\x7f"]}),
            RdataCommand("events", "w1", 1, [1.5]),
            RdataCommand("events", "w1", 1, [float("nan")]),
            RdataCommand("events", "w 1", 1, []),
            RdataCommand("events", "w1\n", 1, []),
            RdataCommand("", "w1", 1, []),
            RdataCommand("évé", "w1", 1, []),
            RdataCommand("\ud800", "w1", 1, []),
            RdataCommand("s", "i", True, []),
            RdataCommand("s", "i", 2**70, [2**70, -(2**70)]),
            PositionCommand("s", "i", 1, 2),
            PositionCommand("s", "i", True, 2),
            PositionCommand("s", "i\n", 1, 2),
            PositionCommand("s\ud800", "i", 1, 2),
            UserIpCommand("@u:t", "t", "::1", "UA é", None, 5),
            UserIpCommand("@u:t", "t", "::1", "UA", "\x7f", 5),
            UserIpCommand("@u :t", "t", "::1", "UA", None, 5),
            UserIpCommand("@u:t", "t", "::1", "UA", None, 5.0),  # type: ignore[arg-type]  # refused
            LockReleasedCommand("a", "b", "c\n"),
            LockReleasedCommand("a", "b", "\ud800"),
        ):
            self.assert_same_as_plain(cmd)

    @FUZZ
    @given(VALID_COMMANDS)
    def test_valid_commands(self, cmd: AnyCommand) -> None:
        """Every valid command encodes as its own to_bytes does."""
        self.assert_same_as_plain(cmd)

    @FUZZ
    @given(ODD_COMMANDS)
    def test_odd_commands(self, cmd: Command) -> None:
        """Commands with odd fields encode, or fail, as their to_bytes does."""
        self.assert_same_as_plain(cmd)

    @FUZZ
    @given(ODD_COMMANDS | VALID_COMMANDS)
    def test_odd_commands_pure_python(self, cmd: Command) -> None:
        """The same with the pure-Python RDATA and JSON writers, whether or not
        the C module is there."""
        self.patch(commands, "_encode_rdata", commands._encode_rdata_py)
        self.patch(commands, "ascii_json", _json._ascii_json_py)
        self.assert_same_as_plain(cmd)


RDATA_ARGS: Final = st.tuples(
    ODD_WORDS, ODD_WORDS, st.none() | ODD_INTS | st.just(10**5000), ODD_ROWS
)


class SpeedupsTests(TypedTestCase):
    """The C module against its pure-Python twins."""

    def setUp(self) -> None:
        if SPEEDUPS is None:
            # CI sets this: there the module must have been built, and a build
            # that silently failed must not turn these tests into skips.
            if os.environ.get("SYNAPSE_REPLICATION_REQUIRE_SPEEDUPS"):
                self.fail("synapse_replication._speedups is not built (or not importable)")
            self.skipTest("synapse_replication._speedups is not built")

    @settings(max_examples=2000, deadline=None)
    @given(ANY_VALUES | ODD_ROWS)
    def test_plain_json(self, value: Any) -> None:
        """plain_json gives what _plain gives."""
        assert SPEEDUPS is not None
        self.assertEqual(SPEEDUPS.plain_json(value), _json._plain(value))

    @settings(max_examples=2000, deadline=None)
    @given(ANY_VALUES | ODD_ROWS)
    def test_ascii_json(self, value: Any) -> None:
        """ascii_json gives what _ascii_json_py gives, and when it gives
        bytes they are the standard library's."""
        assert SPEEDUPS is not None
        out = SPEEDUPS.ascii_json(value, _json.fast_encode_json)
        self.assertEqual(out, _json._ascii_json_py(value, _json.fast_encode_json))
        if out is not None:
            self.assertEqual(out, _json._std_encoder.encode(value).encode("ascii"))

    def test_ascii_json_escapes(self) -> None:
        """Every kind of character that needs an escape, both ways."""
        assert SPEEDUPS is not None
        text = "a\x7f\x80\xe9\u07ff\u0800\u2028\ufeff\uffff\U00010000\U0001f389\U0010ffff\x00\n\"\\/"
        for value in ([text], {text: text}, text * 3, ["\x7f" * 5, "\U0010ffff"]):
            expected = _json._std_encoder.encode(value).encode("ascii")
            self.assertEqual(SPEEDUPS.ascii_json(value, _json.fast_encode_json), expected)
            self.assertEqual(_json._ascii_json_py(value, _json.fast_encode_json), expected)
        self.assertIsNone(SPEEDUPS.ascii_json(["\ud800"], _json.fast_encode_json))
        self.assertIsNone(_json._ascii_json_py(["\ud800"], _json.fast_encode_json))
        self.assertIsNone(SPEEDUPS.ascii_json([1.5], _json.fast_encode_json))
        self.assertIsNone(SPEEDUPS.ascii_json([], lambda v: "not bytes"))

    def test_plain_json_depth(self) -> None:
        """Both refuse containers nested 100 deep, and take 99."""
        assert SPEEDUPS is not None
        for depth, expected in ((99, True), (100, True), (101, False), (5000, False)):
            value: Any = 1
            for _ in range(depth):
                value = [value]
            self.assertEqual(SPEEDUPS.plain_json(value), expected, depth)
            if depth < 500:
                self.assertEqual(_json._plain(value), expected, depth)
        self.assertFalse(SPEEDUPS.plain_json({"a": {1: 2}}))
        self.assertFalse(SPEEDUPS.plain_json([1, 2.0]))

    @settings(max_examples=2000, deadline=None)
    @given(RDATA_ARGS)
    def test_encode_rdata(self, args: tuple[Any, Any, Any, Any]) -> None:
        """encode_rdata gives what _encode_rdata_py gives."""
        assert SPEEDUPS is not None
        self.assertEqual(
            SPEEDUPS.encode_rdata(*args, _json.fast_encode_json),
            commands._encode_rdata_py(*args, _json.fast_encode_json),
            args,
        )

    def test_encode_rdata_examples(self) -> None:
        """A few lines, and the cases left to the plain path."""
        assert SPEEDUPS is not None
        enc = _json.fast_encode_json
        args: tuple[Any, Any, Any, Any]
        for args in (
            ("events", "w1", 12, ["ev", ["$e", None, True, 0, {"k": "v"}]]),
            ("events", "w1", None, []),
            ("évé", "w1", -3, [2**70]),
            ("events", "w1", 1, ["é"]),
            ("events", "w1", 1, ["\x7f"]),
            ("events", "w1", 1, ["\ud800"]),
            ("events", "w1", 1, [1.5]),
            ("events", "w 1", 1, []),
            ("events", "w1\n", 1, []),
            ("", "w1", 1, []),
            ("\ud800", "w1", 1, []),
            ("events", "w1", True, []),
            ("events", "w1", 10**5000, []),
        ):
            stream_name, instance_name, token, row = args
            self.assertEqual(
                SPEEDUPS.encode_rdata(*args, enc),
                commands._encode_rdata_py(stream_name, instance_name, token, row, enc),
                args,
            )

        def boom(value: Any) -> bytes:
            raise RuntimeError("boom")

        self.assertIsNone(SPEEDUPS.encode_rdata("s", "i", 1, [], boom))
        self.assertIsNone(SPEEDUPS.encode_rdata("s", "i", 1, [], lambda v: "not bytes"))
        self.assertRaises(TypeError, SPEEDUPS.encode_rdata, "s", "i", 1, [])

    def test_parse_rdata_hands_over(self) -> None:
        """parse_rdata leaves to the Python path whatever it does not take,
        and lets nothing escape from `decode` or `new`."""
        assert SPEEDUPS is not None
        parse = SPEEDUPS.parse_rdata
        decode = _json.fast_decode_json

        def boom(*args: Any) -> Any:
            raise RuntimeError("boom")

        line = b"RDATA s i 1 [1]"
        self.assertEqual(parse(line, decode, RdataCommand), RdataCommand("s", "i", 1, [1]))
        self.assertIsNone(parse(line, boom, RdataCommand))
        self.assertIsNone(parse(line, decode, boom))
        self.assertIsNone(parse("RDATA s i 1 [1]", decode, RdataCommand))
        self.assertIsNone(parse(bytearray(line), decode, RdataCommand))
        self.assertIsNone(parse(b"POSITION s i 1 2", decode, RdataCommand))
        self.assertRaises(TypeError, parse, line, decode)

    def test_build_row(self) -> None:
        """build_row checks each field against its spec character."""
        assert SPEEDUPS is not None
        build = SPEEDUPS.build_row

        def collect(*args: Any) -> tuple[Any, ...]:
            return args

        self.assertEqual(
            build(collect, ["a", None, "b", 1, False, {}, ["x", "y"]], b"sosbbdL"),
            ("a", None, "b", True, False, {}, ("x", "y")),
        )
        for values, spec in (
            (["a"], b"ss"),
            (("a",), b"s"),
            ([None], b"s"),
            ([StrSubclass("a")], b"s"),
            ([1], b"o"),
            ([2], b"b"),
            ([-1], b"b"),
            ([2**70], b"b"),
            ([1.0], b"b"),
            ([None], b"b"),
            ([[]], b"d"),
            ([("a",)], b"L"),
            ([["a", 1]], b"L"),
        ):
            self.assertIsNone(build(collect, values, spec), (values, spec))
        self.assertRaises(ValueError, build, collect, ["a"], b"?")
        self.assertRaises(TypeError, build, collect, ["a"], "s")
        self.assertRaises(ValueError, build, collect, [], b"s" * 17)
        self.assertRaises(TypeError, build, collect, [])

        def boom(*args: Any) -> Any:
            raise RuntimeError("boom")

        self.assertRaises(RuntimeError, build, boom, ["a"], b"s")

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(min_value=1, max_value=2**62),
                *(st.none() | ANY_TEXT for _ in range(7)),
                st.sampled_from((0, 1, False, True)),
                st.sampled_from((0, 1, False, True)),
            ),
            max_size=20,
        )
    )
    def test_group_rows_is_the_events_page_builder(self, rows: list[tuple[Any, ...]]) -> None:
        """group_rows, as the events store uses it, makes what its pure-Python
        twin makes: one group per row, each an `EventsStreamEventRow` with
        bools, equal down to the types."""
        assert SPEEDUPS is not None
        fast = storage_events._ev_groups(rows)
        plain = storage_events._ev_groups_py(rows)
        self.assertEqual(fast, plain)
        self.assertEqual(
            [(type(t), [type(r) for r in g]) for t, g in fast],
            [(type(t), [type(r) for r in g]) for t, g in plain],
        )
        for (_, [a]), (_, [b]) in zip(fast, plain, strict=True):
            self.assertIs(type(a.rejected), bool)
            self.assertIs(a.rejected, b.rejected)
            self.assertIs(a.outlier, b.outlier)

    def test_group_rows_errors(self) -> None:
        """A row of the wrong shape or a bad spec is an error, not a guess."""
        assert SPEEDUPS is not None
        group = SPEEDUPS.group_rows

        def collect(*args: Any) -> tuple[Any, ...]:
            return args

        self.assertEqual(
            group(collect, b"ob", [(7, "a", 2), (8, None, 0)]),
            [(7, [("a", True)]), (8, [(None, False)])],
        )
        self.assertEqual(group(collect, b"ob", []), [])
        for spec, rows in (
            (b"ob", [(7, "a")]),
            (b"ob", [[7, "a", 1]]),
            (b"ob", [(7, "a", 1, 2)]),
        ):
            with self.assertRaises(TypeError) as cm:
                group(collect, spec, rows)
            self.assertIn("row 0", str(cm.exception))
        self.assertRaises(TypeError, group, collect, b"o", ((1, "a"),))
        self.assertRaises(TypeError, group, collect, "o", [(1, "a")])
        self.assertRaises(ValueError, group, collect, b"s", [(1, "a")])
        self.assertRaises(ValueError, group, collect, b"o" * 17, [])
        self.assertRaises(TypeError, group, collect, b"o")

        class Untruthful:
            def __bool__(self) -> bool:
                raise RuntimeError("no truth")

        self.assertRaises(RuntimeError, group, collect, b"b", [(1, Untruthful())])

        # A column that empties the list while it is read: the rows given are
        # the rows grouped, and nothing is read from freed memory.
        shrinking: list[tuple[Any, ...]] = []

        class Emptier:
            def __bool__(self) -> bool:
                shrinking.clear()
                return True

        shrinking.extend([(1, Emptier()), (2, 0), (3, 1)])
        self.assertEqual(
            group(collect, b"b", shrinking), [(1, [(True,)]), (2, [(False,)]), (3, [(True,)])]
        )

        def boom(*args: Any) -> Any:
            raise RuntimeError("boom")

        self.assertRaises(RuntimeError, group, boom, b"o", [(1, "a")])

    def test_builder_refuses_what_is_not_a_slot(self) -> None:
        """Builder wants the class's own plain slots, and the right arguments."""
        assert SPEEDUPS is not None
        builder = SPEEDUPS.Builder
        self.assertRaises(AttributeError, builder, PositionCommand, ("nope",))
        self.assertRaises(TypeError, builder, PositionCommand, ("NAME",))
        self.assertRaises(TypeError, builder, PositionCommand, ("__weakref__",))
        self.assertRaises(TypeError, builder, int, ())
        self.assertRaises(TypeError, builder, PositionCommand, ["stream_name"])
        new = builder(PositionCommand, ("stream_name", "instance_name", "prev_token", "new_token"))
        self.assertEqual(new("s", "i", 1, 2), PositionCommand("s", "i", 1, 2))
        self.assertRaises(TypeError, new, "s", "i", 1)
        self.assertRaises(TypeError, new, "s", "i", 1, 2, 3)
        self.assertRaises(TypeError, new, "s", "i", 1, new_token=2)


# ---- parse_row ------------------------------------------------------------------

ODD_VALUES: Final = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-2, max_value=3)
    | st.floats(allow_nan=False)
    | st.sampled_from(("", "ev", "state", "state-all", "x", 0.0, 1.0))
    | st.lists(st.sampled_from(("a", 1, None)), max_size=3)
    | st.dictionaries(st.sampled_from(("ts", "a")), st.integers(), max_size=2)
)


@st.composite
def near_rows(draw: st.DrawFn, shape: tuple[st.SearchStrategy[Any], ...]) -> Any:
    """A row of the given shape, with zero to two fields replaced by odd values
    and sometimes one too many or too few."""
    row = [draw(field) for field in shape]
    for _ in range(draw(st.integers(min_value=0, max_value=2))):
        row[draw(st.integers(min_value=0, max_value=len(row) - 1))] = draw(ODD_VALUES)
    change = draw(st.sampled_from(("none", "none", "none", "more", "fewer", "tuple")))
    if change == "more":
        row.append(draw(ODD_VALUES))
    elif change == "fewer":
        row.pop()
    elif change == "tuple":
        return tuple(row)
    return row


OPT_STR: Final = st.none() | WORDS
BOOLISH: Final = st.booleans() | st.sampled_from((0, 1))
EV_FIELDS: Final = near_rows(
    (WORDS, WORDS, WORDS, OPT_STR, OPT_STR, OPT_STR, OPT_STR, BOOLISH, BOOLISH)
)
STATE_FIELDS: Final = near_rows((WORDS, WORDS, WORDS, OPT_STR))
EVENTS_ROWS: Final = near_rows(
    (
        st.sampled_from(("ev", "state", "state-all", "other")) | ODD_VALUES,
        EV_FIELDS | STATE_FIELDS | near_rows((WORDS,)) | ODD_VALUES,
    )
)
TYPING_ROWS: Final = near_rows(
    (WORDS, st.lists(WORDS, max_size=4) | near_rows((WORDS, WORDS)))
)
RECEIPTS_ROWS: Final = near_rows(
    (
        WORDS,
        WORDS,
        WORDS,
        WORDS,
        OPT_STR,
        st.dictionaries(WORDS, st.integers(), max_size=2),
    )
)


class StrSubclass(str):
    pass


ROW_MODULES: Final[tuple[ModuleType, ...]] = (events_module, typing_module, receipts_module)


class ParseRowTests(TypedTestCase):
    def assert_same_as_checked(
        self, stream: Any, checked: Callable[[Any], Any], row: Any
    ) -> None:
        """parse_row gives what the per-field checks give, with the C row
        builder (if built) and with the pure-Python inline checks."""
        expected = outcome(lambda: checked(row))
        self.assertEqual(outcome(lambda: stream.parse_row(row)), expected, row)
        saved = [vars(module)["_c_build_row"] for module in ROW_MODULES]
        for module in ROW_MODULES:
            vars(module)["_c_build_row"] = None
        try:
            self.assertEqual(outcome(lambda: stream.parse_row(row)), expected, row)
        finally:
            for module, c_build_row in zip(ROW_MODULES, saved, strict=True):
                vars(module)["_c_build_row"] = c_build_row

    def test_examples(self) -> None:
        """Rows at the edges of the inline checks."""
        ev: list[Any] = ["$e", "!r", "m.room.member", "@u", None, None, "join", 0, False]
        row: Any
        for row in (
            ["ev", ev],
            ["ev", [*ev[:7], 1, True]],
            ["ev", [*ev[:7], 2, False]],
            ["ev", [*ev[:7], 1.0, False]],
            ["ev", [*ev[:7], 0, None]],
            ["ev", [*ev, 1]],
            ["ev", ev[:8]],
            ["ev", tuple(ev)],
            ("ev", ev),
            [StrSubclass("ev"), ev],
            ["ev", [StrSubclass("$e"), *ev[1:]]],
            ["state", ["!r", "m.room.member", "@u", None]],
            ["state", ["!r", "m.room.member", None, "$e"]],
            ["state-all", ["!r"]],
            ["nope", []],
            [],
            None,
        ):
            self.assert_same_as_checked(EventsStream, events_module._parse_checked, row)
        for row in (
            ["!r", []],
            ["!r", ["@a", "@b"]],
            ["!r", ["@a", 1]],
            ["!r", ("@a",)],
            [None, []],
            ["!r", [StrSubclass("@a")]],
        ):
            self.assert_same_as_checked(TypingStream, typing_module._parse_checked, row)
        for row in (
            ["!r", "m.read", "@u", "$e", None, {"ts": 1}],
            ["!r", "m.read", "@u", "$e", "main", {}],
            ["!r", "m.read", "@u", "$e", 1, {}],
            ["!r", "m.read", "@u", "$e", None, []],
            ["!r", "m.read", "@u", None, None, {}],
        ):
            self.assert_same_as_checked(ReceiptsStream, receipts_module._parse_checked, row)

    def test_rows_are_the_real_classes(self) -> None:
        """Rows from the inline paths are real, frozen, hashable row instances."""
        fields = ("$e", "!r", "m.room.member", "@u", None, None, "join")
        row = EventsStream.parse_row(["ev", [*fields, 1, False]])
        expected = EventsStreamEventRow(*fields, True, False)
        self.assertIs(type(row), EventsStreamEventRow)
        self.assertEqual(row, expected)
        assert isinstance(row, EventsStreamEventRow)
        self.assertIs(row.rejected, True)
        self.assertEqual(hash(row), hash(expected))
        self.assertRaises(attrs.exceptions.FrozenInstanceError, setattr, row, "type", "x")
        self.assertIs(weakref.ref(row)(), row)
        state = EventsStream.parse_row(["state", ["!r", "t", "", None]])
        self.assertIs(type(state), EventsStreamCurrentStateRow)
        self.assertIs(type(EventsStream.parse_row(["state-all", ["!r"]])), EventsStreamAllStateRow)

    @FUZZ
    @given(EVENTS_ROWS)
    def test_events(self, row: Any) -> None:
        """events rows, well formed or nearly."""
        self.assert_same_as_checked(EventsStream, events_module._parse_checked, row)

    @FUZZ
    @given(TYPING_ROWS)
    def test_typing(self, row: Any) -> None:
        """typing rows, well formed or nearly."""
        self.assert_same_as_checked(TypingStream, typing_module._parse_checked, row)

    @FUZZ
    @given(RECEIPTS_ROWS)
    def test_receipts(self, row: Any) -> None:
        """receipts rows, well formed or nearly."""
        self.assert_same_as_checked(ReceiptsStream, receipts_module._parse_checked, row)

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(STREAMS_MAP)), ROWS)
    def test_any_stream_any_row(self, name: str, row: Any) -> None:
        """Any JSON row gives a row or StreamRowError, on every stream."""
        with contextlib.suppress(StreamRowError):
            STREAMS_MAP[name].parse_row(row)


# ---- fast_constructor -----------------------------------------------------------


class FastConstructorTests(TypedTestCase):
    def test_every_row_type_and_hot_command(self) -> None:
        """The row types and the four hot commands get a builder; what it builds
        is equal to, and indistinguishable from, what the class builds."""
        classes: list[type[Any]] = [s.ROW_TYPE for s in STREAMS_MAP.values()]
        classes.remove(EventsStream.ROW_TYPE)
        classes += [
            EventsStreamEventRow,
            EventsStreamCurrentStateRow,
            EventsStreamAllStateRow,
            RdataCommand,
            PositionCommand,
            UserIpCommand,
            LockReleasedCommand,
        ]
        for cls, speedups in [(c, s) for c in classes for s in {None, SPEEDUPS}]:
            new = fast_constructor(cls, speedups=speedups)
            self.assertIsNot(new, cls, cls)
            args = [f"v{i}" for i in range(len(attrs.fields(cls)))]
            built = new(*args)
            expected = cls(*args)
            self.assertIs(type(built), cls)
            self.assertEqual(built, expected)
            self.assertEqual(repr(built), repr(expected))
            self.assertEqual(hash(built), hash(expected))
            self.assertEqual(attrs.astuple(built), attrs.astuple(expected))
            self.assertIs(weakref.ref(built)(), built)
            self.assertRaises(
                attrs.exceptions.FrozenInstanceError,
                setattr,
                built,
                attrs.fields(cls)[0].name,
                "x",
            )

    def test_ineligible_classes_unchanged(self) -> None:
        """Classes the builder cannot provably handle get themselves back."""

        @attrs.frozen(slots=True)
        class OwnWeakref:  # the weakref slot after the fields: layout differs
            a: int

        @attrs.frozen(slots=True)
        class Validated:
            a: int = attrs.field(validator=attrs.validators.instance_of(int))

        @attrs.frozen(slots=True)
        class Defaulted:
            a: int = 1

        @attrs.frozen(slots=True)
        class PostInit:
            a: int

            def __attrs_post_init__(self) -> None:
                pass

        @attrs.frozen
        class NoSlots:
            a: int

        @attrs.frozen(slots=True, cache_hash=True)
        class CachedHash:
            a: int

        class NotAttrs:
            pass

        for cls in (OwnWeakref, Validated, Defaulted, PostInit, NoSlots, CachedHash, NotAttrs):
            self.assertIs(fast_constructor(cls), cls, cls)
            self.assertIs(fast_constructor(cls, speedups=None), cls, cls)


# ---- the JSON helpers the fast paths use -----------------------------------------


class FastJsonHelpersTests(TypedTestCase):
    def test_plain_json_is_plain(self) -> None:
        """plain_json is the check encode_json_bytes relies on: the C one if
        it was built, else _plain."""
        self.assertIs(
            _json.plain_json, _json._plain if SPEEDUPS is None else SPEEDUPS.plain_json
        )
        self.assertTrue(_json.plain_json(["ev", [1, "a", None, True, {"k": []}]]))
        for value in (1.0, [1.5], {"a": float("nan")}, {1: 2}, [b"x"], [StrSubclass()]):
            self.assertFalse(_json.plain_json(value), value)
