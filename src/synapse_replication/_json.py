# -*- test-case-name: tests.test_json -*-
"""JSON exactly as Synapse puts it on the wire, but faster.

Synapse encodes with the standard library (compact separators, ASCII only with
``\\uXXXX`` escapes, NaN refused) and decodes with it too (NaN refused). Bytes we
emit must be identical to Synapse's, so the standard library is the definition
and `orjson` is only a fast path that is taken when it provably gives the same
text:

- decoding: orjson accepts exactly RFC 8259 JSON (no NaN, no Infinity), which is
  what Synapse's decoder accepts, except lone surrogate escapes and nesting
  deeper than 1024; for those the standard decoder is tried. orjson silently
  turns integers beyond 64 bits into floats, so a text holding a run of 19 or
  more digits (the only way to write such an integer) goes to the standard
  decoder directly.
- encoding: orjson writes UTF-8 and formats floats differently, and writes NaN as
  ``null``. Its output is used only for values made of str, int, bool, None,
  lists, tuples and str-keyed dicts (no float anywhere) and when that output is
  pure printable ASCII; otherwise the standard encoder produces the text, and
  raises for NaN and Infinity as Synapse's does.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

import orjson

# A JSON value as decoded: what a row or a command argument can be.
JsonValue = Any

_std_encoder: Final = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, separators=(",", ":")
)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_std_decoder: Final = json.JSONDecoder(parse_constant=_refuse_constant)
_orjson_loads: Final = orjson.loads
_orjson_dumps: Final = orjson.dumps
_OrjsonDecodeError: Final = orjson.JSONDecodeError
_OrjsonEncodeError: Final = orjson.JSONEncodeError
_NoneType: Final = type(None)
# Every integer orjson decodes as an int (-2**63 to 2**64 - 1) has at most 19
# digits, and every one it turns into a float at least 19.
_MAYBE_BIG_INT: Final = re.compile("[0-9]{19}")
_MAYBE_BIG_INT_BYTES: Final = re.compile(b"[0-9]{19}")


def _plain(value: Any) -> bool:
    """True if `value` holds only types that orjson encodes as the standard
    library does: no float (formatting and NaN differ), no exotic types."""
    t = type(value)
    if t is str or t is int or t is _NoneType or t is bool:
        return True
    if t is list or t is tuple:
        for item in value:
            it = type(item)
            if it is str or it is int or it is _NoneType or it is bool:
                continue
            if not _plain(item):
                return False
        return True
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            it = type(item)
            if it is str or it is int or it is _NoneType or it is bool:
                continue
            if not _plain(item):
                return False
        return True
    return False


def encode_json(value: JsonValue) -> str:
    """`value` as compact ASCII JSON, byte for byte what Synapse writes.

    Raises ValueError for NaN or Infinity and TypeError for values JSON cannot
    hold, as the standard encoder does.
    """
    if _plain(value):
        try:
            out = _orjson_dumps(value)
        except _OrjsonEncodeError:
            # Integers beyond 64 bits: the standard encoder handles them.
            pass
        else:
            # Non-ASCII must become \uXXXX escapes and DEL is escaped by the
            # standard encoder but not by orjson; both are rare on the wire.
            if out.isascii() and b"\x7f" not in out:
                return out.decode("ascii")
    return _std_encoder.encode(value)


def encode_json_bytes(value: JsonValue) -> bytes:
    """`encode_json(value)` as ASCII bytes, skipping a decode on the fast path."""
    if _plain(value):
        try:
            out = _orjson_dumps(value)
        except _OrjsonEncodeError:
            pass
        else:
            if out.isascii() and b"\x7f" not in out:
                return out
    return _std_encoder.encode(value).encode("ascii")


def decode_json(text: str | bytes) -> JsonValue:
    """Parse one JSON document as Synapse does: NaN and Infinity refused.

    Raises ValueError (json.JSONDecodeError or orjson's subclass of it) for
    anything that is not a single valid JSON value.
    """
    if isinstance(text, bytes):
        maybe_big_int = _MAYBE_BIG_INT_BYTES.search(text) is not None
    else:
        maybe_big_int = _MAYBE_BIG_INT.search(text) is not None
    if not maybe_big_int:
        try:
            return _orjson_loads(text)
        except _OrjsonDecodeError:
            # orjson refuses a few inputs the standard decoder accepts (lone
            # surrogate escapes, deep nesting); give those a second chance so
            # that we accept everything Synapse accepts.
            pass
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return _std_decoder.decode(text)
    except RecursionError:
        # The standard decoder recurses once per nesting level.
        raise json.JSONDecodeError("JSON nested too deeply", text, 0) from None
