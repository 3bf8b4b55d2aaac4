# mypy: allow-untyped-calls
# (twisted.web's Request and DummyChannel carry no annotations.)
"""Fuzzing what a peer controls beyond the line parser (which, with the
config loader, is fuzzed in tests/test_commands.py and tests/test_config.py):

- the row parser of every stream in `STREAMS_MAP`, on random JSON values and
  on real rows (Synapse's, from the wire vectors) with random mutations: it
  returns a row of the stream's type or raises `StreamRowError`, nothing
  else, and a row it returns survives `row_to_json` unchanged;
- the HTTP catch-up endpoint, on random paths, query strings, methods and
  Authorization headers, through Twisted's real request parsing: it always
  answers 200 or a 4xx with a JSON body, never a 500 or an exception.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from typing import Any, Final
from urllib.parse import quote

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from synapse_replication._json import JsonValue, decode_json
from synapse_replication.errors import StreamRowError
from synapse_replication.http import (
    ENDPOINT_PATH_PREFIX,
    ReplicationHttpResource,
    make_replication_site,
)
from synapse_replication.storage import Database, TypingWriter, open_stores
from synapse_replication.streams import (
    STREAMS_MAP,
    EventsStream,
    ReceiptsStream,
    Stream,
    TypingStream,
)
from synapse_replication.testing import inject
from tests.fakes import TypedTestCase
from tests.wire_vectors import wire_lines

FUZZ: Final = settings(
    max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

# Valid rows of the streams Synapse's vectors have no RDATA for.
_EXTRA_ROWS: Final[dict[str, list[JsonValue]]] = {
    "caches": [
        ["get_user_by_id", ["@alice:test.local"], 1_700_000_000_000],
        ["cs_cache_fake", None, 1],
    ],
    "push_rules": [["@alice:test.local"]],
    "pushers": [["@alice:test.local", "m.http", "key", False]],
    "typing": [["!r:test.local", []]],
}


def seed_rows() -> dict[str, list[JsonValue]]:
    """Valid rows of every stream: Synapse's own, from the wire vectors, and
    a few written here for streams they do not show."""
    rows: dict[str, list[JsonValue]] = {name: list(r) for name, r in _EXTRA_ROWS.items()}
    for line in wire_lines():
        if not line.startswith("RDATA "):
            continue
        _, stream, _, _, row = line.split(" ", 4)
        if stream in STREAMS_MAP:
            rows.setdefault(stream, []).append(decode_json(row))
    return rows


SEEDS: Final = seed_rows()

_LEAVES: Final = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
    | st.sampled_from(["", "ev", "state", "state-all", "@a:x", "!r:x", "$e", "main"])
)
JSON: Final = st.recursive(
    _LEAVES,
    lambda children: st.lists(children, max_size=10)
    | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=25,
)


@st.composite
def mutated_rows(draw: st.DrawFn) -> tuple[str, JsonValue]:
    """A stream and one of its real rows, changed in one to three places."""
    stream = draw(st.sampled_from(sorted(SEEDS)))
    row: Any = json.loads(json.dumps(draw(st.sampled_from(SEEDS[stream]))))
    for _ in range(draw(st.integers(1, 3))):
        row = _mutate(draw, row)
    return stream, row


def _mutate(draw: st.DrawFn, value: Any) -> Any:
    """`value` with one of its parts (or itself) replaced, removed or added to."""
    if isinstance(value, list) and value and draw(st.booleans()):
        i = draw(st.integers(0, len(value) - 1))
        action = draw(st.sampled_from(("dive", "replace", "delete", "insert")))
        copy = list(value)
        if action == "dive":
            copy[i] = _mutate(draw, copy[i])
        elif action == "replace":
            copy[i] = draw(JSON)
        elif action == "delete":
            del copy[i]
        else:
            copy.insert(i, draw(JSON))
        return copy
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: _mutate(draw, value[key])}
    return draw(JSON)


def parses_or_refuses(stream: str, row: JsonValue) -> None:
    """The stream's parser returns a row of its type, which survives
    `row_to_json`, or raises StreamRowError."""
    cls = STREAMS_MAP[stream]
    try:
        parsed = cls.parse_row(row)
    except StreamRowError:
        return
    assert isinstance(parsed, cls.ROW_TYPE), (stream, row, parsed)
    again = cls.parse_row(json.loads(json.dumps(cls.row_to_json(parsed))))
    assert again == parsed, (stream, row, parsed, again)


class RowParserFuzzTests(TypedTestCase):
    """Whatever a peer sends as a row, the parser returns a row or refuses it."""

    def test_every_stream_has_valid_seed_rows(self) -> None:
        """Each stream in STREAMS_MAP has valid rows to mutate (a new stream needs one here)."""
        self.assertEqual(set(SEEDS), set(STREAMS_MAP))
        for stream, rows in SEEDS.items():
            for row in rows:
                self.assertIsInstance(STREAMS_MAP[stream].parse_row(row), STREAMS_MAP[stream].ROW_TYPE)

    @FUZZ
    @given(st.sampled_from(sorted(STREAMS_MAP)), JSON)
    def test_random_json(self, stream: str, row: JsonValue) -> None:
        """Random JSON values parse to a row or raise StreamRowError, for every stream."""
        parses_or_refuses(stream, row)

    @FUZZ
    @given(mutated_rows())
    def test_mutated_real_rows(self, stream_and_row: tuple[str, JsonValue]) -> None:
        """Real rows with random changes parse to a row or raise StreamRowError."""
        parses_or_refuses(*stream_and_row)


# -- the HTTP endpoint

SECRET: Final = "fuzz-secret"
WRITER: Final = "master"
_KNOWN_CODES: Final = frozenset({200, 400, 401, 403, 404, 405})

_VALID_TOKENS: Final = st.one_of(
    st.integers(0, 50),
    st.sampled_from([2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1, 10**19 - 1]),
    st.integers(0, 2**64),
).map(str)
_TOKENS: Final = st.one_of(
    _VALID_TOKENS,
    st.integers(-(2**64), -1).map(str),
    st.sampled_from(["", "0x10", "1e3", "١٢", " 1", "1 ", "+1", "00000000000000000001", "9" * 20]),
    st.text(max_size=12),
)
_SEGMENTS: Final = st.one_of(
    st.sampled_from(["events", "typing", "receipts", "caches", "nope", "", "..", "%2F"]),
    st.text(max_size=10).map(lambda t: quote(t, safe="")),
    st.text(max_size=10),
)


def _param(name: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.tuples(name, _TOKENS).map(lambda kv: f"{quote(kv[0])}={quote(kv[1], safe='')}")


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, bytes, list[bytes]]:
    """(method, uri, Authorization header values) of a random request: most
    are well formed but for a part or two, so that they get past the
    checks that come first."""
    method = draw(st.sampled_from([b"GET"] * 8 + [b"POST", b"PUT", b"HEAD", b"DELETE", b"get"]))
    def usually(good: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
        return draw(good) if draw(st.sampled_from((True, True, True, True, False))) else draw(other)

    method = usually(st.just(b"GET"), st.sampled_from([b"POST", b"PUT", b"HEAD", b"DELETE", b"get"]))
    stream = usually(st.sampled_from(["events", "typing", "receipts"]), _SEGMENTS)
    txn = usually(st.text(min_size=1, max_size=8).map(lambda t: quote(t, safe="")), _SEGMENTS)
    segments = usually(st.just([stream, txn]), st.lists(_SEGMENTS, max_size=3))
    prefix = usually(st.just(ENDPOINT_PATH_PREFIX), st.sampled_from(["/", "/_synapse/replication/"]))
    path = prefix + "/".join(segments)
    params = [
        f"from_token={quote(usually(_VALID_TOKENS, _TOKENS), safe='')}",
        f"upto_token={quote(usually(_VALID_TOKENS, _TOKENS), safe='')}",
    ]
    names = st.sampled_from(["from_token", "upto_token", "x", ""])
    if not usually(st.just(True), st.just(False)):
        params = draw(st.permutations(params + draw(st.lists(_param(names) | st.text(max_size=10), max_size=3))))
        params = params[: draw(st.integers(0, len(params)))]
    query = "&".join(params).encode("utf-8", "surrogatepass")
    uri = path.encode("utf-8", "surrogatepass") + (b"?" + query if params else b"")
    uri += usually(st.just(b""), st.binary(max_size=6))
    good = f"Bearer {SECRET}".encode()
    header = st.one_of(
        st.just(good),
        st.just(good.lower()),
        st.just(good + b" "),
        st.just(b"Bearer"),
        st.just(b"Basic " + SECRET.encode()),
        st.binary(max_size=40),
        st.text(max_size=40).map(lambda t: t.encode("utf-8", "surrogatepass")),
    )
    auth = usually(st.just([good]), st.lists(header, max_size=3))
    return method, uri, auth


class HttpEndpointFuzzTests(TypedTestCase):
    """The catch-up endpoint answers every request with 200 or a 4xx and JSON."""

    def setUp(self) -> None:
        self.clock = Clock()
        stores = self.successResultOf(
            _deferred(open_stores(Database.sqlite_inline(":memory:"), WRITER, lambda: None))
        )
        self.addCleanup(stores.close)
        room = "!fuzz:test.local"
        for i in range(5):
            self.successResultOf(_deferred(inject.inject_message(stores.events, room, "@a:x", f"{i}")))
            self.successResultOf(
                _deferred(inject.inject_receipt(stores.receipts, room, f"@u{i}:x", f"$e{i}"))
            )
        typing = TypingWriter(self.clock, WRITER, lambda: None)
        typing.started_typing(room, "@a:x", 10_000)
        streams: dict[str, Stream[Any]] = {
            "events": EventsStream(WRITER, stores.events.current_token, stores.events.get_updates),
            "receipts": ReceiptsStream(
                WRITER, stores.receipts.current_token, stores.receipts.get_updates
            ),
            "typing": TypingStream(WRITER, typing.current_token, typing.get_updates),
        }
        self.site = make_replication_site(
            ReplicationHttpResource(
                instance_name=WRITER, streams=streams, secret=SECRET, clock=self.clock
            )
        )

    def _answer(self, method: bytes, uri: bytes, auth: list[bytes]) -> tuple[int, bytes]:
        channel = DummyChannel()
        channel.site = self.site
        request = Request(channel)
        request.gotLength(0)
        for value in auth:
            request.requestHeaders.addRawHeader(b"Authorization", value)
        request.requestReceived(method, uri, b"HTTP/1.1")
        assert request.finished, (method, uri, auth)
        written = channel.transport.written.getvalue()
        head, _, body = written.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, body

    @FUZZ
    @given(requests())
    def test_random_requests(self, request: tuple[bytes, bytes, list[bytes]]) -> None:
        """Random paths, query strings, methods and Authorization headers get 200 or a 4xx, with JSON."""
        method, uri, auth = request
        status, body = self._answer(method, uri, auth)
        self.assertIn(status, _KNOWN_CODES, (request, status, body))
        if method == b"HEAD":
            return
        answer = json.loads(body)
        if status == 200:
            self.assertEqual(set(answer), {"updates", "upto_token", "limited"})
        else:
            self.assertIn("errcode", answer)
        self.assertEqual(self.flushLoggedErrors(), [])


def _deferred(coroutine: Coroutine[Any, Any, Any]) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)
