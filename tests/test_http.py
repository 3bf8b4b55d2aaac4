# -*- test-case-name: tests.test_http -*-
# mypy: allow-untyped-calls
# (twisted.web's Agent, pool, Site, Resource and WrappingFactory carry no
# annotations; every call into them would otherwise need its own ignore.)
"""Tests for synapse_replication.http: the catch-up endpoint and its client,
over real loopback sockets (and a UNIX socket) with the global reactor."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Final, cast

from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
)
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from synapse_replication._json import decode_json, encode_json_bytes
from synapse_replication.errors import HttpCatchUpError, ReplicationError
from synapse_replication.http import (
    HttpReplicationClient,
    InstanceLocation,
    ReplicationHttpResource,
    listen_http,
    listen_http_unix,
    make_replication_site,
    stream_updates_path,
)
from synapse_replication.streams import (
    EventsStream,
    ReceiptsStream,
    Stream,
    StreamUpdate,
    StreamUpdateResult,
    TypingStream,
)
from synapse_replication.tcp import Backoff
from tests.fakes import FakeStreamSource, SourceError, capture_logs
from tests.wire_vectors import wire_file, wire_json

_tcp_reactor = cast(IReactorTCP, _global_reactor)
_time_reactor = cast(IReactorTime, _global_reactor)

_SECRET: Final = "s3cret-token"
_WRITER: Final = "master"
_OTHER: Final = "worker1"
# Short enough to keep the retry tests fast, long enough for a loaded machine.
_FAST_BACKOFF: Final = Backoff(initial=0.01, factor=2.0, maximum=0.05, jitter=0.0)
_UNKNOWN_STREAM_BODY: Final = b'{"errcode":"M_UNKNOWN","error":"Unknown stream"}'
_UNRECOGNIZED_BODY: Final = (
    b'{"errcode":"M_UNRECOGNIZED","error":"Unrecognized request"}'
)

_VECTOR_STREAMS: Final[dict[str, type[Stream[Any]]]] = {
    "events": EventsStream,
    "typing": TypingStream,
    "receipts": ReceiptsStream,
}


def _vector_name(stream_name: str) -> str:
    return f"http-get_repl_stream_updates-{stream_name}.json"


def _typing_stream(
    source: FakeStreamSource, instance_name: str = _WRITER
) -> TypingStream:
    return TypingStream(instance_name, source.current_token, source.update_function)


def _typing_rows(source: FakeStreamSource, instance_name: str, tokens: range) -> None:
    for token in tokens:
        source.add(instance_name, token, [f"!room{token}:test.local", [f"@u{token}:x"]])


def _body(updates: list[StreamUpdate], upto_token: int, limited: bool) -> bytes:
    return encode_json_bytes(
        {"updates": updates, "upto_token": upto_token, "limited": limited}
    )


def _auth(secret: str = _SECRET) -> dict[bytes, list[bytes]]:
    return {b"Authorization": [b"Bearer " + secret.encode("ascii")]}


def _query_path(stream_name: str, txn_id: str, from_token: int, upto_token: int) -> str:
    return f"{stream_updates_path(stream_name, txn_id)}?from_token={from_token}&upto_token={upto_token}"


class _Recorder(Resource):
    """Records each request's path (with query) and method, then hands the
    request to `inner`."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.requests: list[tuple[bytes, bytes]] = []

    def render(self, request: Request) -> bytes | int:
        self.requests.append((request.method, request.uri))
        result: bytes | int = self.inner.render(request)
        return result


class _HangFirst(Resource):
    """Never answers its first request; hands the others to `inner`."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self.inner = inner
        self.hung: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        if not self.hung:
            self.hung.append(request)
            return NOT_DONE_YET
        result: bytes | int = self.inner.render(request)
        return result


class _Fixed(Resource):
    """Answers every request with `code` and `body`."""

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.count = 0

    def render(self, request: Request) -> bytes:
        self.count += 1
        request.setResponseCode(self.code)
        request.setHeader(b"Content-Type", b"application/json")
        return self.body


class _HttpTestCase(TestCase):
    """Serves resources on loopback ports and closes everything afterwards:
    listeners, client connections, and the server side of every connection."""

    timeout = 30

    def setUp(self) -> None:
        self.pool = HTTPConnectionPool(_global_reactor, persistent=False)

    def resource(
        self,
        streams: dict[str, Stream[Any]],
        secret: str | None = _SECRET,
        **kwargs: Any,
    ) -> ReplicationHttpResource:
        kwargs.setdefault("clock", _time_reactor)
        return ReplicationHttpResource(
            instance_name=_WRITER, streams=streams, secret=secret, **kwargs
        )

    def serve(self, resource: Resource) -> int:
        """Listen on a free loopback port; returns it."""
        tracked = WrappingFactory(Site(resource))
        self.tracked = tracked
        port = listen_http(_tcp_reactor, 0, cast(ServerFactory[Any], tracked))
        self.addCleanup(self._stop, port, tracked)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        return address.port

    async def _stop(self, port: IListeningPort, tracked: WrappingFactory) -> None:
        stopped = port.stopListening()
        if stopped is not None:
            await stopped
        for protocol in list(tracked.protocols):
            protocol.transport.loseConnection()
        await self.until(lambda: not tracked.protocols)

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait, turning the reactor, until `condition()` holds."""
        while not condition():
            await deferLater(_time_reactor, 0.005)

    def client(
        self,
        instance_map: dict[str, InstanceLocation],
        secret: str | None = _SECRET,
        **kwargs: Any,
    ) -> HttpReplicationClient:
        kwargs.setdefault("backoff", _FAST_BACKOFF)
        client = HttpReplicationClient(
            _tcp_reactor, instance_map, secret, pool=self.pool, **kwargs
        )
        self.addCleanup(client.close)
        return client

    async def catch_up_error(
        self, fetching: Coroutine[Any, Any, StreamUpdateResult]
    ) -> HttpCatchUpError:
        """The HttpCatchUpError `fetching` raises (failing the test if none)."""
        try:
            result = await fetching
        except HttpCatchUpError as e:
            return e
        raise self.failureException(f"no HttpCatchUpError, but {result!r:.200}")

    async def get(
        self,
        port: int,
        path: str,
        headers: dict[bytes, list[bytes]] | None = None,
        method: bytes = b"GET",
    ) -> tuple[int, Headers, bytes]:
        """A raw request: (status, headers, body)."""
        agent = Agent(_global_reactor, pool=self.pool)
        response = await agent.request(
            method,
            f"http://127.0.0.1:{port}{path}".encode("ascii"),
            Headers(headers or {}),
        )
        body = await readBody(response)
        return response.code, response.headers, body

    def assertError(
        self, answer: tuple[int, Headers, bytes], code: int, errcode: str
    ) -> dict[str, Any]:
        """`answer` is a JSON error with `code` and `errcode`; returns its body."""
        status, headers, body = answer
        self.assertEqual(
            (status, headers.getRawHeaders(b"Content-Type")),
            (code, [b"application/json"]),
        )
        parsed = cast(dict[str, Any], decode_json(body))
        self.assertEqual(parsed["errcode"], errcode)
        self.assertIsInstance(parsed["error"], str)
        return parsed


class ServerTests(_HttpTestCase):
    """The endpoint, asked by a plain HTTP client."""

    def typing_server(self, **kwargs: Any) -> tuple[FakeStreamSource, int]:
        source = FakeStreamSource()
        return source, self.serve(
            self.resource({"typing": _typing_stream(source)}, **kwargs)
        )

    async def test_rows_as_json(self) -> None:
        """A good request gets the update function's rows as compact JSON."""
        source, port = self.typing_server()
        _typing_rows(source, _WRITER, range(1, 6))
        status, headers, body = await self.get(
            port, _query_path("typing", "t1", 1, 4), _auth()
        )
        self.assertEqual(status, 200)
        self.assertEqual(headers.getRawHeaders(b"Content-Type"), [b"application/json"])
        self.assertEqual(body, _body(source.rows[_WRITER][1:4], 4, False))
        self.assertEqual(source.calls, [(_WRITER, 1, 4, 100)])

    async def test_only_own_rows(self) -> None:
        """The endpoint answers with the rows its own instance wrote only."""
        source, port = self.typing_server()
        _typing_rows(source, _OTHER, range(1, 4))
        _typing_rows(source, _WRITER, range(4, 6))
        _, _, body = await self.get(port, _query_path("typing", "t1", 0, 5), _auth())
        self.assertEqual(body, _body(source.rows[_WRITER], 5, False))

    async def test_target_row_count(self) -> None:
        """The server's own target row count limits an answer."""
        source, port = self.typing_server(target_row_count=2)
        _typing_rows(source, _WRITER, range(1, 6))
        _, _, body = await self.get(port, _query_path("typing", "t1", 0, 5), _auth())
        self.assertEqual(body, _body(source.rows[_WRITER][:2], 2, True))

    async def _check_vector(self, stream_name: str) -> None:
        vector = wire_file(_vector_name(stream_name)).read_bytes()
        parsed = wire_json(_vector_name(stream_name))

        async def update_function(
            instance_name: str, from_token: int, upto_token: int, limit: int
        ) -> StreamUpdateResult:
            return parsed["updates"], parsed["upto_token"], parsed["limited"]

        stream = _VECTOR_STREAMS[stream_name](_WRITER, lambda _: 0, update_function)
        port = self.serve(self.resource({stream_name: stream}))
        path = _query_path(stream_name, "v1", 0, parsed["upto_token"])
        status, _, body = await self.get(port, path, _auth())
        self.assertEqual((status, body), (200, vector))

    async def test_events_vector_body(self) -> None:
        """The events answer is byte-identical to Synapse's captured body."""
        await self._check_vector("events")

    async def test_typing_vector_body(self) -> None:
        """The typing answer is byte-identical to Synapse's captured body."""
        await self._check_vector("typing")

    async def test_receipts_vector_body(self) -> None:
        """The receipts answer is byte-identical to Synapse's captured body."""
        await self._check_vector("receipts")

    async def test_missing_secret(self) -> None:
        """No Authorization header: 401 M_MISSING_TOKEN, rows not read."""
        source, port = self.typing_server()
        answer = await self.get(port, _query_path("typing", "t1", 0, 1))
        self.assertError(answer, 401, "M_MISSING_TOKEN")
        self.assertEqual(answer[1].getRawHeaders(b"WWW-Authenticate"), [b"Bearer"])
        self.assertEqual(source.calls, [])

    async def test_wrong_secret(self) -> None:
        """A wrong secret: 403 M_FORBIDDEN, rows not read."""
        source, port = self.typing_server()
        answer = await self.get(port, _query_path("typing", "t1", 0, 1), _auth("nope"))
        self.assertError(answer, 403, "M_FORBIDDEN")
        self.assertEqual(source.calls, [])

    async def test_not_bearer(self) -> None:
        """The right secret under another auth scheme is refused with 403."""
        _, port = self.typing_server()
        headers = {b"Authorization": [b"Basic " + _SECRET.encode("ascii")]}
        answer = await self.get(port, _query_path("typing", "t1", 0, 1), headers)
        self.assertError(answer, 403, "M_FORBIDDEN")

    async def test_no_secret_configured(self) -> None:
        """Without a configured secret every request is refused with 403."""
        source, port = self.typing_server(secret=None)
        answer = await self.get(port, _query_path("typing", "t1", 0, 1), _auth(""))
        parsed = self.assertError(answer, 403, "M_FORBIDDEN")
        self.assertIn("No replication secret is configured", parsed["error"])
        self.assertEqual(source.calls, [])

    async def test_unknown_stream(self) -> None:
        """An unknown stream: 400 with Synapse's exact body."""
        _, port = self.typing_server()
        status, _, body = await self.get(port, _query_path("nope", "t1", 0, 1), _auth())
        self.assertEqual((status, body), (400, _UNKNOWN_STREAM_BODY))

    async def test_missing_token(self) -> None:
        """A missing from_token: 400 M_MISSING_PARAM naming it."""
        _, port = self.typing_server()
        path = stream_updates_path("typing", "t1") + "?upto_token=1"
        parsed = self.assertError(
            await self.get(port, path, _auth()), 400, "M_MISSING_PARAM"
        )
        self.assertIn("from_token", parsed["error"])

    async def test_invalid_token(self) -> None:
        """A non-integer from_token: 400 M_INVALID_PARAM naming it."""
        _, port = self.typing_server()
        path = stream_updates_path("typing", "t1") + "?from_token=abc&upto_token=1"
        parsed = self.assertError(
            await self.get(port, path, _auth()), 400, "M_INVALID_PARAM"
        )
        self.assertIn("from_token", parsed["error"])

    async def test_negative_token(self) -> None:
        """A negative token: 400 M_INVALID_PARAM, as Synapse refuses it."""
        _, port = self.typing_server()
        path = stream_updates_path("typing", "t1") + "?from_token=0&upto_token=-1"
        self.assertError(await self.get(port, path, _auth()), 400, "M_INVALID_PARAM")

    async def test_token_past_64_bits(self) -> None:
        """A 19-digit token above 2**63 - 1: 400 M_INVALID_PARAM, not a 500 from the database."""
        # Found by tests/torture/test_fuzz.py.
        _, port = self.typing_server()
        path = stream_updates_path("typing", "t1") + f"?from_token=0&upto_token={2**63}"
        self.assertError(await self.get(port, path, _auth()), 400, "M_INVALID_PARAM")

    async def test_no_txn_id(self) -> None:
        """The path without its txn id segment: 404 M_UNRECOGNIZED."""
        _, port = self.typing_server()
        path = "/_synapse/replication/get_repl_stream_updates/typing?from_token=0&upto_token=1"
        status, _, body = await self.get(port, path, _auth())
        self.assertEqual((status, body), (404, _UNRECOGNIZED_BODY))

    async def test_other_path(self) -> None:
        """Any other path: 404 M_UNRECOGNIZED."""
        _, port = self.typing_server()
        status, _, body = await self.get(
            port, "/_synapse/replication/other/typing/t1", _auth()
        )
        self.assertEqual((status, body), (404, _UNRECOGNIZED_BODY))

    async def test_post(self) -> None:
        """Another method on the endpoint's path: 405, allowing GET."""
        source, port = self.typing_server()
        answer = await self.get(
            port, _query_path("typing", "t1", 0, 1), _auth(), b"POST"
        )
        self.assertError(answer, 405, "M_UNRECOGNIZED")
        self.assertEqual(answer[1].getRawHeaders(b"Allow"), [b"GET"])
        self.assertEqual(source.calls, [])

    async def test_same_txn_id_cached(self) -> None:
        """A repeated txn id gets the first answer without a second call."""
        source, port = self.typing_server()
        _typing_rows(source, _WRITER, range(1, 3))
        first = await self.get(port, _query_path("typing", "t1", 0, 2), _auth())
        _typing_rows(source, _WRITER, range(3, 4))
        second = await self.get(port, _query_path("typing", "t1", 0, 2), _auth())
        self.assertEqual(second[2], first[2])
        self.assertEqual(len(source.calls), 1)

    async def test_concurrent_same_txn_id_share(self) -> None:
        """Concurrent requests with one txn id share one call."""
        source = FakeStreamSource()
        _typing_rows(source, _WRITER, range(1, 3))
        recorder = _Recorder(self.resource({"typing": _typing_stream(source)}))
        port = self.serve(recorder)
        source.block_next()
        path = _query_path("typing", "t1", 0, 2)
        both = [Deferred.fromCoroutine(self.get(port, path, _auth())) for _ in range(2)]
        await self.until(
            lambda: len(recorder.requests) == 2 and len(source.blocked) == 1
        )
        source.release()
        first, second = [await d for d in both]
        self.assertEqual(
            (first[0], first[2]), (200, _body(source.rows[_WRITER], 2, False))
        )
        self.assertEqual(second[2], first[2])
        self.assertEqual(len(source.calls), 1)

    async def test_txn_id_reused_with_other_tokens(self) -> None:
        """A txn id reused for other tokens is refused, not answered wrongly."""
        source, port = self.typing_server()
        await self.get(port, _query_path("typing", "t1", 0, 2), _auth())
        answer = await self.get(port, _query_path("typing", "t1", 2, 4), _auth())
        self.assertError(answer, 400, "M_INVALID_PARAM")
        self.assertEqual(len(source.calls), 1)

    async def test_cache_bounded_in_count(self) -> None:
        """Past the cache size the oldest answer is forgotten."""
        source, port = self.typing_server(response_cache_size=1)
        for txn_id in ("a", "b", "a"):
            await self.get(port, _query_path("typing", txn_id, 0, 2), _auth())
        self.assertEqual(len(source.calls), 3)

    async def test_cache_bounded_in_time(self) -> None:
        """An answer is forgotten once its time in the cache is over."""
        clock = Clock()
        source, port = self.typing_server(clock=clock, response_cache_timeout_s=60)
        await self.get(port, _query_path("typing", "a", 0, 2), _auth())
        clock.advance(59)
        await self.get(port, _query_path("typing", "a", 0, 2), _auth())
        clock.advance(1)
        await self.get(port, _query_path("typing", "a", 0, 2), _auth())
        self.assertEqual(len(source.calls), 2)

    async def test_update_function_failure(self) -> None:
        """A failing update function: 500 with a generic error, logged with
        the stream name, and not cached."""
        source, port = self.typing_server()
        source.fail_next()
        logs = capture_logs(self.addCleanup)
        answer = await self.get(port, _query_path("typing", "t1", 0, 2), _auth())
        parsed = self.assertError(answer, 500, "M_UNKNOWN")
        self.assertEqual(parsed["error"], "Internal server error")
        self.assertEqual(len(self.flushLoggedErrors(SourceError)), 1)
        [message] = logs.messages(namespace="synapse_replication.http")
        self.assertIn("'typing'", message)
        retried = await self.get(port, _query_path("typing", "t1", 0, 2), _auth())
        self.assertEqual(retried[0], 200)

    async def test_secret_never_logged(self) -> None:
        """Neither the secret nor a wrong one offered appears in the logs."""
        _, port = self.typing_server()
        logs = capture_logs(self.addCleanup)
        await self.get(port, _query_path("typing", "t1", 0, 1), _auth("guess-123"))
        await self.get(port, _query_path("typing", "t2", 0, 1), _auth())
        text = "\n".join(str(e) for e in logs.events)
        self.assertNotIn(_SECRET, text)
        self.assertNotIn("guess-123", text)

    def test_make_replication_site(self) -> None:
        """The site serves the resource at its root without tracebacks."""
        resource = self.resource({})
        site = make_replication_site(resource)
        self.assertIs(site.resource, resource)
        self.assertFalse(site.displayTracebacks)


class ClientTests(_HttpTestCase):
    """The client, against the endpoint and against misbehaving servers."""

    def typing_server(self, **kwargs: Any) -> tuple[FakeStreamSource, int]:
        source = FakeStreamSource()
        return source, self.serve(
            self.resource({"typing": _typing_stream(source)}, **kwargs)
        )

    async def test_paging(self) -> None:
        """Looping while limited fetches every row exactly once, in order."""
        source, port = self.typing_server(target_row_count=3)
        _typing_rows(source, _WRITER, range(1, 11))
        source.add(_WRITER, 10, ["!shared:test.local", []])
        fetch = self.client(
            {_WRITER: InstanceLocation("127.0.0.1", port)}
        ).update_function("typing")
        fetched: list[StreamUpdate] = []
        token, limited = 0, True
        while limited:
            updates, token, limited = await fetch(_WRITER, token, 10, 1)
            fetched.extend(updates)
        self.assertEqual(fetched, source.rows[_WRITER])
        self.assertEqual(token, 10)
        self.assertEqual(len(source.calls), 4)

    async def _check_vector(self, stream_name: str) -> None:
        vector = wire_file(_vector_name(stream_name)).read_bytes()
        parsed = wire_json(_vector_name(stream_name))
        port = self.serve(_Fixed(200, vector))
        client = self.client({_WRITER: InstanceLocation("127.0.0.1", port)})
        result = await client.get_updates(stream_name, _WRITER, 0, parsed["upto_token"])
        expected = ([(t, r) for t, r in parsed["updates"]], parsed["upto_token"], False)
        self.assertEqual(result, expected)

    async def test_events_vector_parsed(self) -> None:
        """Synapse's events body parses to its updates, token and limited."""
        await self._check_vector("events")

    async def test_typing_vector_parsed(self) -> None:
        """Synapse's typing body parses to its updates, token and limited."""
        await self._check_vector("typing")

    async def test_receipts_vector_parsed(self) -> None:
        """Synapse's receipts body parses to its updates, token and limited."""
        await self._check_vector("receipts")

    async def test_asks_named_instance(self) -> None:
        """Each call asks the instance it names, each answering its own rows."""
        sources: dict[str, FakeStreamSource] = {}
        instance_map: dict[str, InstanceLocation] = {}
        for name, tokens in ((_WRITER, range(1, 3)), (_OTHER, range(5, 8))):
            source = FakeStreamSource()
            _typing_rows(source, name, tokens)
            resource = ReplicationHttpResource(
                instance_name=name,
                streams={"typing": _typing_stream(source, name)},
                secret=_SECRET,
                clock=_time_reactor,
            )
            sources[name] = source
            instance_map[name] = InstanceLocation("127.0.0.1", self.serve(resource))
        fetch = self.client(instance_map).update_function("typing")
        for name, source in sources.items():
            self.assertEqual(
                await fetch(name, 0, 10, 100), (source.rows[name], 10, False)
            )
            self.assertEqual(source.calls, [(name, 0, 10, 100)])

    async def test_unknown_instance(self) -> None:
        """An instance missing from the map is an error naming it."""
        client = self.client({_WRITER: InstanceLocation("127.0.0.1", 1)})
        e = await self.catch_up_error(client.get_updates("typing", "ghost", 0, 5))
        self.assertIn("'ghost'", str(e))
        self.assertIn("'master'", str(e))
        self.assertEqual(
            (e.instance_name, e.stream_name, e.status), ("ghost", "typing", None)
        )

    async def test_fresh_txn_id_per_call(self) -> None:
        """Every call uses a new txn id and the Synapse path and query."""
        source = FakeStreamSource()
        recorder = _Recorder(self.resource({"typing": _typing_stream(source)}))
        port = self.serve(recorder)
        client = self.client({_WRITER: InstanceLocation("127.0.0.1", port)})
        await client.get_updates("typing", _WRITER, 0, 5)
        await client.get_updates("typing", _WRITER, 0, 5)
        self.assertEqual(len(source.calls), 2)
        prefix = b"/_synapse/replication/get_repl_stream_updates/typing/"
        txn_ids = []
        for method, uri in recorder.requests:
            self.assertEqual(method, b"GET")
            path, _, query = uri.partition(b"?")
            self.assertTrue(path.startswith(prefix), path)
            self.assertEqual(query, b"from_token=0&upto_token=5")
            txn_ids.append(path[len(prefix) :])
        self.assertNotEqual(txn_ids[0], txn_ids[1])

    async def test_timeout_then_retry(self) -> None:
        """A request without answer times out; the retry, with the same txn
        id, succeeds."""
        source = FakeStreamSource()
        _typing_rows(source, _WRITER, range(1, 3))
        hang = _HangFirst(self.resource({"typing": _typing_stream(source)}))
        recorder = _Recorder(hang)
        port = self.serve(recorder)
        client = self.client(
            {_WRITER: InstanceLocation("127.0.0.1", port)}, timeout_s=0.3
        )
        logs = capture_logs(self.addCleanup)
        result = await client.get_updates("typing", _WRITER, 0, 2)
        [warning] = logs.messages(namespace="synapse_replication.http")
        self.assertIn("no complete answer within 0.3s", warning)
        self.assertEqual(result, (source.rows[_WRITER], 2, False))
        [first, second] = recorder.requests
        self.assertEqual(first, second)
        self.assertEqual(len(source.calls), 1)

    async def test_5xx_retried_until_exhausted(self) -> None:
        """5xx answers are retried `retries` times, then an error names the
        instance, stream, tokens and last error."""
        source, port = self.typing_server()
        source.fail_next(count=10)
        client = self.client({_WRITER: InstanceLocation("127.0.0.1", port)}, retries=2)
        e = await self.catch_up_error(client.get_updates("typing", _WRITER, 3, 7))
        self.flushLoggedErrors(SourceError)
        self.assertEqual(len(source.calls), 3)
        self.assertEqual(e.status, 500)
        for part in ("typing", "'master'", "(3, 7]", "3 attempts", "M_UNKNOWN"):
            self.assertIn(part, str(e))

    async def test_connection_refused_exhausted(self) -> None:
        """An instance nobody listens for is retried, then reported."""
        listener = listen_http(_tcp_reactor, 0, Site(Resource()))
        address = listener.getHost()
        assert isinstance(address, IPv4Address)
        port = address.port
        stopped = listener.stopListening()
        if stopped is not None:
            await stopped
        client = self.client({_WRITER: InstanceLocation("127.0.0.1", port)}, retries=1)
        e = await self.catch_up_error(client.get_updates("typing", _WRITER, 0, 1))
        self.assertIn("2 attempts", str(e))
        self.assertIn("ConnectionRefusedError", str(e))
        self.assertIsInstance(e, ReplicationError)

    async def test_4xx_not_retried(self) -> None:
        """A 4xx answer (a wrong secret) fails at once, with its error."""
        source = FakeStreamSource()
        recorder = _Recorder(self.resource({"typing": _typing_stream(source)}))
        port = self.serve(recorder)
        client = self.client(
            {_WRITER: InstanceLocation("127.0.0.1", port)}, secret="wrong"
        )
        e = await self.catch_up_error(client.get_updates("typing", _WRITER, 0, 1))
        self.assertEqual(len(recorder.requests), 1)
        self.assertEqual(e.status, 403)
        self.assertIn("M_FORBIDDEN", str(e))
        self.assertNotIn("wrong", str(e).replace("M_FORBIDDEN", ""))

    async def test_malformed_body(self) -> None:
        """Answers not of the endpoint's shape are refused without retry."""
        bodies = [
            b"not json",
            b"[]",
            b'{"updates":{},"upto_token":1,"limited":false}',
            b'{"updates":[],"upto_token":"1","limited":false}',
            b'{"updates":[],"upto_token":1,"limited":0}',
            b'{"updates":[[1]],"upto_token":1,"limited":false}',
            b'{"updates":[["1",[]]],"upto_token":1,"limited":false}',
            b'{"updates":[[2,[]]],"upto_token":1,"limited":false}',
            b'{"updates":[[0,[]]],"upto_token":1,"limited":false}',
            b'{"updates":[[1,[]],[0,[]]],"upto_token":1,"limited":false}',
            b'{"updates":[],"upto_token":0,"limited":true}',
        ]
        for body in bodies:
            fixed = _Fixed(200, body)
            port = self.serve(fixed)
            client = self.client({_WRITER: InstanceLocation("127.0.0.1", port)})
            e = await self.catch_up_error(client.get_updates("typing", _WRITER, 0, 1))
            self.assertIn("answer", e.reason, body)
            self.assertEqual(fixed.count, 1, body)

    async def test_secret_not_logged(self) -> None:
        """Retries log their failures, never the secret."""
        source, port = self.typing_server()
        source.fail_next(count=1)
        logs = capture_logs(self.addCleanup)
        client = self.client({_WRITER: InstanceLocation("127.0.0.1", port)})
        await client.get_updates("typing", _WRITER, 0, 1)
        self.flushLoggedErrors(SourceError)
        warnings = logs.messages(namespace="synapse_replication.http")
        self.assertEqual(len(warnings), 2)
        self.assertIn("attempt 2", warnings[1])
        self.assertNotIn(_SECRET, "\n".join(str(e) for e in logs.events))

    async def test_persistent_connection(self) -> None:
        """By default calls to one instance share a connection, which
        `close()` closes."""
        source, port = self.typing_server()
        client = HttpReplicationClient(
            _tcp_reactor, {_WRITER: InstanceLocation("127.0.0.1", port)}, _SECRET
        )
        self.addCleanup(client.close)
        for _ in range(3):
            await client.get_updates("typing", _WRITER, 0, 1)
        self.assertEqual(len(source.calls), 3)
        self.assertEqual(len(self.tracked.protocols), 1)
        await client.close()
        await self.until(lambda: not self.tracked.protocols)

    async def test_unix_socket(self) -> None:
        """An instance listening on a UNIX socket is asked through it."""
        directory = tempfile.mkdtemp(prefix="srhttp")
        self.addCleanup(shutil.rmtree, directory)
        path = str(Path(directory) / "repl.sock")
        source = FakeStreamSource()
        _typing_rows(source, _WRITER, range(1, 3))
        tracked = WrappingFactory(
            make_replication_site(self.resource({"typing": _typing_stream(source)}))
        )
        listener = listen_http_unix(
            cast(IReactorUNIX, _global_reactor), path, cast(ServerFactory[Any], tracked)
        )
        self.addCleanup(self._stop, listener, tracked)
        client = self.client({_WRITER: InstanceLocation.unix(path)})
        result = await client.get_updates("typing", _WRITER, 0, 2)
        self.assertEqual(result, (source.rows[_WRITER], 2, False))


class InstanceLocationTests(SynchronousTestCase):
    """Where an instance listens."""

    def test_needs_host_and_port_or_path(self) -> None:
        """A location without host and port, or without a path, is refused."""
        bad: list[dict[str, Any]] = [
            {"host": "h"},
            {"port": 8080},
            {"path": ""},
            {"path": "/s", "tls": True},
        ]
        for kwargs in bad:
            self.assertRaises(ValueError, InstanceLocation, **kwargs)
        self.assertEqual(InstanceLocation.unix("/s").describe(), "unix:/s")
        self.assertEqual(InstanceLocation("h", 8443, True).describe(), "https://h:8443")

    def test_bad_secret_refused_without_showing_it(self) -> None:
        """A secret that cannot travel in a header is refused, unshown."""
        e = self.assertRaises(
            ValueError,
            HttpReplicationClient,
            _tcp_reactor,
            {},
            "bad secret\n",
        )
        self.assertNotIn("bad secret", str(e))
