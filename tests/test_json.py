"""Tests for synapse_replication._json: JSON exactly as Synapse writes and reads it."""

from __future__ import annotations

import contextlib
import json
from typing import Any, Final

from hypothesis import given, settings
from hypothesis import strategies as st

from synapse_replication._json import decode_json, encode_json, encode_json_bytes
from tests.fakes import TypedTestCase


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# Synapse's decoder: the standard one, with NaN and Infinity refused.
_SYNAPSE_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def synapse_encode(value: Any) -> str:
    """What Synapse puts on the wire for `value`."""
    return json.dumps(value, ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def without_tuples(value: Any) -> Any:
    """`value` as it comes back from JSON: tuples become lists."""
    if isinstance(value, (list, tuple)):
        return [without_tuples(v) for v in value]
    if isinstance(value, dict):
        return {k: without_tuples(v) for k, v in value.items()}
    return value


# Any code point, lone surrogates included.
ANY_CHAR: Final = st.characters(codec=None, exclude_categories=())
ANY_TEXT: Final = st.text(ANY_CHAR)
BIG_INTS: Final = st.integers(min_value=2**64, max_value=2**300) | st.integers(
    min_value=-(2**300), max_value=-(2**63) - 1
)
SCALARS: Final = (
    st.none() | st.booleans() | st.integers() | BIG_INTS | st.floats() | ANY_TEXT
)


def json_values(scalars: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nested lists, tuples and str-keyed dicts of `scalars`."""
    return st.recursive(
        scalars,
        lambda children: (
            st.lists(children, max_size=5)
            | st.lists(children, max_size=5).map(tuple)
            | st.dictionaries(ANY_TEXT, children, max_size=5)
        ),
        max_leaves=20,
    )


# Anything the encoder is meant to handle, NaN and Infinity included.
ANY_VALUES: Final = json_values(SCALARS)
# Values that survive a round trip: no NaN, no Infinity.
FINITE_VALUES: Final = json_values(
    st.none()
    | st.booleans()
    | st.integers()
    | BIG_INTS
    | st.floats(allow_nan=False, allow_infinity=False)
    | ANY_TEXT
)
# Text likely to be nearly JSON.
JSONISH_TEXT: Final = (
    ANY_TEXT
    | st.text(st.sampled_from('[]{}",: \t\n-+.0123456789eEtrufalsenNIiy\\u'))
    | ANY_VALUES.map(json.dumps)
)

FUZZ: Final = settings(max_examples=300, deadline=None)


class EncodeJsonTests(TypedTestCase):
    """encode_json writes what Synapse's json.dumps writes."""

    def test_compact_separators(self) -> None:
        """No space follows `,` or `:`."""
        self.assertEqual(
            encode_json({"a": [1, 2], "b": {"c": None}}), '{"a":[1,2],"b":{"c":null}}'
        )

    def test_key_order_kept(self) -> None:
        """Keys are written in insertion order, not sorted."""
        self.assertEqual(encode_json({"z": 1, "a": 2, "m": 3}), '{"z":1,"a":2,"m":3}')

    def test_non_ascii_escaped(self) -> None:
        """Non-ASCII characters are written as lowercase `\\uXXXX` escapes."""
        self.assertEqual(encode_json("h\u00e9llo \u2603"), '"h\\u00e9llo \\u2603"')

    def test_astral_as_surrogate_pair(self) -> None:
        """A character beyond the BMP is written as a surrogate pair."""
        self.assertEqual(encode_json("\U0001f389"), '"\\ud83c\\udf89"')

    def test_lone_surrogate_escaped(self) -> None:
        """A lone surrogate is written as its escape, as the standard library does."""
        self.assertEqual(encode_json(["\ud800"]), '["\\ud800"]')

    def test_output_is_ascii(self) -> None:
        """The output is pure ASCII whatever the input text."""
        self.assertTrue(encode_json(["\u00e9", "\U0001f389", "\x00"]).isascii())

    def test_del_escaped(self) -> None:
        """DEL (0x7f) is written as `\\u007f`, as the standard library does."""
        self.assertEqual(encode_json("a\x7fb"), '"a\\u007fb"')

    def test_control_chars_as_standard_library(self) -> None:
        """Every ASCII control character is escaped exactly as json.dumps does."""
        for code in [*range(0x20), 0x7F]:
            char = chr(code)
            self.assertEqual(encode_json([char]), synapse_encode([char]), repr(char))

    def test_short_escapes(self) -> None:
        """Quote, backslash and the usual controls use their two-character escapes."""
        self.assertEqual(encode_json('"\\\b\f\n\r\t'), '"\\"\\\\\\b\\f\\n\\r\\t"')

    def test_slash_not_escaped(self) -> None:
        """A slash is written as is."""
        self.assertEqual(encode_json("a/b"), '"a/b"')

    def test_booleans_and_null(self) -> None:
        """True, False and None are `true`, `false` and `null`, not numbers."""
        self.assertEqual(
            encode_json([True, False, None, 1, 0]), "[true,false,null,1,0]"
        )

    def test_big_int(self) -> None:
        """Integers beyond 64 bits are written in full."""
        self.assertEqual(
            encode_json([2**64, -(2**63) - 1]),
            "[18446744073709551616,-9223372036854775809]",
        )

    def test_float_as_standard_library(self) -> None:
        """Floats are formatted as Python's repr, as the standard library does."""
        self.assertEqual(encode_json([1.0, 0.1, 1e100, -0.0]), "[1.0,0.1,1e+100,-0.0]")

    def test_tuple_as_list(self) -> None:
        """A tuple is written as a JSON array."""
        self.assertEqual(encode_json(("a", (1, 2))), '["a",[1,2]]')

    def test_non_string_keys_as_standard_library(self) -> None:
        """Non-string dict keys are converted as json.dumps converts them."""
        value = {1: "a", False: "b", None: "c", 1.5: "d"}
        self.assertEqual(encode_json(value), synapse_encode(value))

    def test_nan_refused(self) -> None:
        """NaN is refused with ValueError."""
        self.assertRaises(ValueError, encode_json, [float("nan")])

    def test_infinity_refused(self) -> None:
        """Infinity is refused with ValueError."""
        self.assertRaises(ValueError, encode_json, {"a": float("inf")})

    def test_negative_infinity_refused(self) -> None:
        """-Infinity is refused with ValueError."""
        self.assertRaises(ValueError, encode_json, float("-inf"))

    def test_unserialisable_refused(self) -> None:
        """A value JSON cannot hold is refused with TypeError."""
        self.assertRaises(TypeError, encode_json, [{1, 2}])

    def test_bytes_variant_matches(self) -> None:
        """encode_json_bytes gives encode_json's text as ASCII bytes."""
        value = {"a": ["\u00e9", 1, None, 2**70, 0.5]}
        self.assertEqual(encode_json_bytes(value), encode_json(value).encode("ascii"))

    @FUZZ
    @given(ANY_VALUES)
    def test_same_as_standard_library(self, value: Any) -> None:
        """For any value, the output is json.dumps's, or both raise ValueError."""
        try:
            expected = synapse_encode(value)
        except ValueError:
            self.assertRaises(ValueError, encode_json, value)
        else:
            self.assertEqual(encode_json(value), expected)

    @FUZZ
    @given(FINITE_VALUES)
    def test_bytes_variant_same_as_standard_library(self, value: Any) -> None:
        """For any finite value, encode_json_bytes gives json.dumps's text as bytes."""
        self.assertEqual(
            encode_json_bytes(value), synapse_encode(value).encode("ascii")
        )

    @FUZZ
    @given(FINITE_VALUES)
    def test_round_trip(self, value: Any) -> None:
        """decode_json(encode_json(v)) gives v back, types included, tuples as lists."""
        # repr tells 1 from 1.0 and -0.0 from 0.0, which == does not.
        self.assertEqual(
            repr(decode_json(encode_json(value))), repr(without_tuples(value))
        )


class DecodeJsonTests(TypedTestCase):
    """decode_json reads what Synapse's decoder reads, and nothing else."""

    def test_nan_refused(self) -> None:
        """NaN is refused with ValueError."""
        self.assertRaises(ValueError, decode_json, "[1,NaN]")

    def test_infinity_refused(self) -> None:
        """Infinity is refused with ValueError."""
        self.assertRaises(ValueError, decode_json, '{"a":Infinity}')

    def test_negative_infinity_refused(self) -> None:
        """-Infinity is refused with ValueError."""
        self.assertRaises(ValueError, decode_json, "-Infinity")

    def test_constants_refused_from_bytes(self) -> None:
        """NaN and Infinity are refused in bytes input too."""
        for text in (b"NaN", b"[Infinity]", b"[-Infinity]"):
            self.assertRaises(ValueError, decode_json, text)

    def test_lone_surrogate_escape_accepted(self) -> None:
        """A lone surrogate escape decodes to that surrogate, as the standard library does."""
        self.assertEqual(decode_json('["\\ud800","\\udc00x"]'), ["\ud800", "\udc00x"])

    def test_surrogate_pair_escape_joined(self) -> None:
        """A surrogate pair escape decodes to the astral character."""
        self.assertEqual(decode_json('"\\ud83c\\udf89"'), "\U0001f389")

    def test_huge_int_accepted(self) -> None:
        """Integers beyond 64 bits decode to exact ints, not floats."""
        value = decode_json(f"[18446744073709551616,-9223372036854775809,{10**100}]")
        self.assertEqual(repr(value), repr([2**64, -(2**63) - 1, 10**100]))

    def test_huge_int_from_bytes_accepted(self) -> None:
        """Integers beyond 64 bits decode to exact ints from bytes input too."""
        self.assertEqual(
            repr(decode_json(b'{"a":18446744073709551617}')), repr({"a": 2**64 + 1})
        )

    def test_64_bit_bounds_are_ints(self) -> None:
        """The 64-bit boundary integers decode to ints."""
        bounds = [-(2**63), 2**63 - 1, 2**63, 2**64 - 1]
        self.assertEqual(repr(decode_json(json.dumps(bounds))), repr(bounds))

    def test_long_digit_string_unchanged(self) -> None:
        """A long run of digits inside a string is kept as text."""
        self.assertEqual(
            decode_json('["12345678901234567890123"]'), ["12345678901234567890123"]
        )

    def test_float_stays_float(self) -> None:
        """A number with a fraction decodes to a float."""
        self.assertEqual(repr(decode_json("[1.0,-0.0,1e2]")), repr([1.0, -0.0, 100.0]))

    def test_utf8_bytes_accepted(self) -> None:
        """UTF-8 bytes decode like the text they encode."""
        self.assertEqual(decode_json('["h\u00e9"]'.encode()), ["h\u00e9"])

    def test_invalid_utf8_refused(self) -> None:
        """Bytes that are not UTF-8 are refused with ValueError."""
        self.assertRaises(ValueError, decode_json, b'["\xff"]')

    def test_trailing_data_refused(self) -> None:
        """A second document after the first is refused."""
        self.assertRaises(ValueError, decode_json, "[1] [2]")

    def test_empty_refused(self) -> None:
        """An empty text is refused."""
        self.assertRaises(ValueError, decode_json, "")

    def test_deep_nesting_refused_with_value_error(self) -> None:
        """100000 opening brackets raise ValueError, not RecursionError."""
        self.assertRaises(ValueError, decode_json, "[" * 100000)

    def test_deep_balanced_nesting_refused_with_value_error(self) -> None:
        """100000 nested arrays, closed, raise ValueError, not RecursionError."""
        self.assertRaises(ValueError, decode_json, "[" * 100000 + "]" * 100000)

    def test_deep_object_nesting_refused_with_value_error(self) -> None:
        """100000 nested objects raise ValueError, not RecursionError."""
        self.assertRaises(ValueError, decode_json, '{"a":' * 100000)

    def test_deep_nesting_with_big_int_refused_with_value_error(self) -> None:
        """Deep nesting holding a long digit run raises ValueError too."""
        self.assertRaises(ValueError, decode_json, "[" * 100000 + "1" * 30)

    @FUZZ
    @given(JSONISH_TEXT)
    def test_same_as_standard_library(self, text: str) -> None:
        """For any text, decode_json gives what Synapse's decoder gives, or both refuse."""
        try:
            expected = _SYNAPSE_DECODER.decode(text)
        except ValueError:
            self.assertRaises(ValueError, decode_json, text)
        else:
            self.assertEqual(repr(decode_json(text)), repr(expected))

    @FUZZ
    @given(JSONISH_TEXT | st.binary().map(lambda b: b.decode("latin-1")))
    def test_only_value_error(self, text: str) -> None:
        """For any text, decode_json returns a value or raises ValueError."""
        with contextlib.suppress(ValueError):
            decode_json(text)

    @FUZZ
    @given(st.binary())
    def test_only_value_error_from_bytes(self, data: bytes) -> None:
        """For any bytes, decode_json returns a value or raises ValueError."""
        with contextlib.suppress(ValueError):
            decode_json(data)
