# -*- test-case-name: tests.test_json -*-
"""JSON exactly as Synapse puts it on the wire, but faster.

Synapse encodes with the standard library (compact separators, ASCII only with
``\\uXXXX`` escapes, NaN refused) and decodes with it too (NaN refused). Bytes we
emit must be identical to Synapse's, so the standard library is the definition
and `msgspec` is only a fast path, taken when it provably gives the same result:

- decoding: msgspec accepts exactly RFC 8259 JSON (no NaN, no Infinity) and
  keeps integers of any size exact, which is what Synapse's decoder does, except
  for lone surrogate escapes, numbers too large for a float, and very deep
  nesting; only those go to the standard decoder.
- encoding: msgspec writes UTF-8 and formats floats differently, and writes NaN
  as ``null``. Its output is used only for values made of str, int, bool, None,
  lists, tuples and str-keyed dicts (no float anywhere) and when that output is
  pure printable ASCII; otherwise the standard encoder produces the text, and
  raises for NaN and Infinity as Synapse's does.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Callable
from typing import Any, Final

import msgspec

from synapse_replication._accel import SPEEDUPS

# A JSON value as decoded: what a row or a command argument can be.
JsonValue = Any

_std_encoder: Final = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, separators=(",", ":")
)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_std_decoder: Final = json.JSONDecoder(parse_constant=_refuse_constant)
_fast_decode: Final = msgspec.json.Decoder().decode
_fast_encode: Final = msgspec.json.Encoder().encode
# msgspec's ValidationError is a DecodeError; neither is a ValueError.
_FastDecodeError: Final = msgspec.DecodeError

# For hot paths that cannot afford the call to `decode_json`: what
# `fast_decode_json` returns is what `decode_json` returns for the same input;
# when it raises one of `FAST_DECODE_ERRORS` (msgspec refused the text, or the
# bytes are not UTF-8), `decode_json` must decide.
fast_decode_json: Final = _fast_decode
FAST_DECODE_ERRORS: Final = (_FastDecodeError, UnicodeDecodeError, RecursionError)
_FastEncodeErrors: Final = (msgspec.EncodeError, UnicodeEncodeError, OverflowError)
_NoneType: Final = type(None)


# Values nested deeper than this are left to the standard encoder.
_MAX_DEPTH: Final = 100


def _plain(value: Any, depth: int = 0) -> bool:
    """True if `value` holds only types that msgspec encodes as the standard
    library does: no float (formatting and NaN differ), no exotic types; and no
    list, tuple or dict nested `_MAX_DEPTH` deep."""
    t = type(value)
    if t is str or t is int or t is _NoneType or t is bool:
        return True
    if depth >= _MAX_DEPTH:
        return False
    if t is list or t is tuple:
        for item in value:
            it = type(item)
            if it is str or it is int or it is _NoneType or it is bool:
                continue
            if not _plain(item, depth + 1):
                return False
        return True
    if t is dict:
        for key, item in value.items():
            if type(key) is not str:
                return False
            it = type(item)
            if it is str or it is int or it is _NoneType or it is bool:
                continue
            if not _plain(item, depth + 1):
                return False
        return True
    return False



def _escape_errors(error: UnicodeError) -> tuple[str, int]:
    """Codec error handler: the characters ASCII cannot hold as the standard
    encoder writes them in JSON strings, ``\\uXXXX`` (surrogate pairs beyond
    the BMP)."""
    assert isinstance(error, UnicodeEncodeError)
    escaped = []
    for char in error.object[error.start : error.end]:
        code = ord(char)
        if code > 0xFFFF:
            code -= 0x10000
            escaped.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
        else:
            escaped.append(f"\\u{code:04x}")
    return "".join(escaped), error.end


_ESCAPE: Final = "synapse_replication.json_escape"
codecs.register_error(_ESCAPE, _escape_errors)


def _ascii_json_py(value: JsonValue, encode: Callable[[JsonValue], bytes]) -> bytes | None:
    """What `encode_json_bytes` returns for `value`, from msgspec's output
    (`encode`), if `value` is plain; None to leave it to the standard encoder.

    For plain values msgspec writes what the standard encoder writes, except
    that it leaves non-ASCII characters and DEL as they are, in strings (JSON
    has nothing else outside them): those are escaped here. The C twin
    `_speedups.ascii_json` gives the same results.
    """
    if not _plain(value):
        return None
    try:
        out = encode(value)
    except _FastEncodeErrors:
        # Lone surrogates have no UTF-8 form: the standard encoder escapes them.
        return None
    if not out.isascii():
        out = out.decode("utf-8").encode("ascii", _ESCAPE)
    if b"\x7f" in out:
        out = out.replace(b"\x7f", b"\\u007f")
    return out


# For hot paths that cannot afford the call to `encode_json_bytes`:
# `ascii_json(value, fast_encode_json)` is what it returns, or None when the
# standard encoder must decide; `plain_json` is the check it starts with.
plain_json: Final[Callable[[Any], bool]] = (
    _plain if SPEEDUPS is None else SPEEDUPS.plain_json
)
ascii_json: Final[Callable[[JsonValue, Callable[[JsonValue], bytes]], bytes | None]] = (
    _ascii_json_py if SPEEDUPS is None else SPEEDUPS.ascii_json
)
fast_encode_json: Final = _fast_encode
FAST_ENCODE_ERRORS: Final = _FastEncodeErrors


def encode_json_bytes(value: JsonValue) -> bytes:
    """`value` as compact ASCII JSON bytes, byte for byte what Synapse writes.

    Raises ValueError for NaN or Infinity and TypeError for values JSON cannot
    hold, as the standard encoder does.
    """
    out = ascii_json(value, _fast_encode)
    if out is not None:
        return out
    return _std_encoder.encode(value).encode("ascii")


def encode_json(value: JsonValue) -> str:
    """`encode_json_bytes(value)` as a str."""
    return encode_json_bytes(value).decode("ascii")


def decode_json(text: str | bytes) -> JsonValue:
    """Parse one JSON document as Synapse does: NaN and Infinity refused.

    Raises ValueError (json.JSONDecodeError) for anything that is not a single
    valid JSON value; never any other exception.
    """
    try:
        return _fast_decode(text)
    except (_FastDecodeError, RecursionError):
        # The few inputs the standard decoder accepts and msgspec does not
        # (lone surrogate escapes, 1e400, deep nesting) get a second chance,
        # so that we accept exactly what Synapse accepts.
        pass
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    try:
        return _std_decoder.decode(text)
    except RecursionError:
        # The standard decoder recurses once per nesting level.
        raise json.JSONDecodeError("JSON nested too deeply", text, 0) from None
