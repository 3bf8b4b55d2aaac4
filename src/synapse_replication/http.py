# -*- test-case-name: tests.test_http -*-
# mypy: allow-untyped-calls
# (twisted.web's Request, Site, Agent, pool and UNIX endpoint carry no
# annotations; every call into them would otherwise need its own ignore.)
"""The HTTP catch-up endpoint for streams held in memory, and its client.

A reader that learns from a POSITION that it missed rows of a stream whose
rows live only in the writer's memory (``typing``, say) asks that writer:

    GET /_synapse/replication/get_repl_stream_updates/<stream>/<txn_id>
        ?from_token=A&upto_token=B
    Authorization: Bearer <worker replication secret>

and gets ``{"updates":[[token,row],...],"upto_token":N,"limited":bool}``,
the rows the writer itself wrote in ``(A, N]``. With `limited`, it asks again
from N. This is the same request and answer as Synapse's, byte for byte, so
either side can be Synapse.

Server (`ReplicationHttpResource`):

- never serves without a secret: with none configured every request is
  refused, and the secret is compared in constant time and never logged;
- answers are cached by (stream, txn id) for a bounded time and count, and
  concurrent requests with one txn id share one call of the update function,
  so a client retrying after a timeout does not double the load;
- errors are Matrix-style JSON bodies (``errcode``, ``error``) with Synapse's
  error codes; unlike Synapse, a missing or wrong secret gets 401/403 rather
  than a 500.

Client (`HttpReplicationClient`): `update_function(stream)` gives a stream's
update function that asks the instance named in each call, found in the
instance map (TCP, TLS or a UNIX socket). One txn id per call, reused by its
retries; each attempt has a deadline; connection failures, timeouts and 5xx
answers are retried with jittered exponential backoff, a 4xx or a malformed
answer is not. Every failure ends as `HttpCatchUpError`.
"""

from __future__ import annotations

import hmac
import math
import random
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final, cast
from urllib.parse import quote, unquote, unquote_to_bytes

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectionClosed, DNSLookupError
from twisted.internet.interfaces import (
    IListeningPort,
    IReactorTCP,
    IReactorTime,
    IReactorUNIX,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    PartialDownloadError,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from synapse_replication._json import decode_json, encode_json_bytes
from synapse_replication.errors import HttpCatchUpError, shorten
from synapse_replication.streams._base import (
    DEFAULT_TARGET_ROW_COUNT,
    Stream,
    StreamUpdate,
    StreamUpdateResult,
    UpdateFunction,
)
from synapse_replication.tcp import Backoff

__all__ = [
    "DEFAULT_BACKOFF",
    "DEFAULT_RESPONSE_CACHE_SIZE",
    "DEFAULT_RESPONSE_CACHE_TIMEOUT_S",
    "DEFAULT_RETRIES",
    "DEFAULT_TIMEOUT_S",
    "ENDPOINT_PATH_PREFIX",
    "HttpReplicationClient",
    "InstanceLocation",
    "ReplicationHttpResource",
    "listen_http",
    "listen_http_unix",
    "make_replication_site",
    "stream_updates_path",
]

_log: Final = Logger(namespace="synapse_replication.http")

# The endpoint's path up to the stream name; Synapse's endpoint name.
ENDPOINT_PATH_PREFIX: Final = "/_synapse/replication/get_repl_stream_updates/"
_PREFIX_BYTES: Final = ENDPOINT_PATH_PREFIX.encode("ascii")

# Synapse keeps answers for 30 minutes; we also bound how many.
DEFAULT_RESPONSE_CACHE_TIMEOUT_S: Final = 30 * 60.0
DEFAULT_RESPONSE_CACHE_SIZE: Final = 256

DEFAULT_TIMEOUT_S: Final = 30.0
DEFAULT_RETRIES: Final = 3
DEFAULT_BACKOFF: Final = Backoff(initial=0.5, factor=2.0, maximum=30.0, jitter=0.25)

# Matrix error codes, as Synapse uses them on this endpoint.
_M_UNKNOWN: Final = "M_UNKNOWN"
_M_UNRECOGNIZED: Final = "M_UNRECOGNIZED"
_M_MISSING_TOKEN: Final = "M_MISSING_TOKEN"
_M_FORBIDDEN: Final = "M_FORBIDDEN"
_M_MISSING_PARAM: Final = "M_MISSING_PARAM"
_M_INVALID_PARAM: Final = "M_INVALID_PARAM"

# Tokens are non-negative 64-bit stream ids; 19 digits is the most a signed
# 64-bit integer needs, and the bound keeps int() of a huge text off the table.
_TOKEN_RE: Final = re.compile(rb"[0-9]{1,19}")
# 19 digits still reach past it: a larger token would overflow the
# database's integers (a 500 instead of a 400).
_MAX_TOKEN: Final = 2**63 - 1
_JSON_CONTENT_TYPE: Final = b"application/json"


def stream_updates_path(stream_name: str, txn_id: str) -> str:
    """The endpoint's path for `stream_name` and `txn_id`, each segment
    percent-encoded (so a name can never add a path segment)."""
    return (
        f"{ENDPOINT_PATH_PREFIX}{quote(stream_name, safe='')}/{quote(txn_id, safe='')}"
    )


def _check_secret(secret: str | None) -> bytes | None:
    """The secret as header bytes; None for no secret (None or empty, as
    Synapse reads an empty secret). Refuses secrets that cannot travel in a
    Bearer header, without ever showing the secret."""
    if not secret:
        return None
    if not secret.isascii() or not secret.isprintable() or " " in secret:
        raise ValueError(
            "The replication secret must be printable ASCII without spaces "
            "(it travels in an HTTP Authorization header)"
        )
    return secret.encode("ascii")


# -- server


class _HttpError(Exception):
    """An answer other than 200, raised while handling a request."""

    def __init__(
        self,
        code: int,
        errcode: str,
        message: str,
        headers: Mapping[bytes, bytes] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.errcode = errcode
        self.message = message
        self.headers = headers or {}


def _error_body(errcode: str, message: str) -> bytes:
    """A Matrix error body, compact as Synapse writes it."""
    return encode_json_bytes({"errcode": errcode, "error": message})


@attrs.define
class _CachedAnswer:
    """One txn id's answer: being computed (`body` None, `waiters` waiting
    for it) or computed (`body` set, kept until `expires_at`)."""

    from_token: int
    upto_token: int
    body: bytes | None = None
    expires_at: float = math.inf
    waiters: list[Deferred[bytes]] = attrs.Factory(list)


class ReplicationHttpResource(Resource):
    """Serves ``get_repl_stream_updates`` for the streams this instance writes.

    A leaf resource: it reads the whole request path itself, so it answers the
    same wherever it is mounted as long as requests carry the full path (put
    it at the root of its site, as `make_replication_site` does).

    Requests are checked in Synapse's order: path (404), method (405), secret
    (401/403), stream (400), tokens (400). Rows come from
    ``streams[name].update_function(instance_name, from, upto,
    target_row_count)``: the rows of *this* instance only.
    """

    isLeaf = True

    def __init__(
        self,
        *,
        instance_name: str,
        streams: Mapping[str, Stream[Any]],
        secret: str | None,
        clock: IReactorTime,
        target_row_count: int = DEFAULT_TARGET_ROW_COUNT,
        response_cache_size: int = DEFAULT_RESPONSE_CACHE_SIZE,
        response_cache_timeout_s: float = DEFAULT_RESPONSE_CACHE_TIMEOUT_S,
    ) -> None:
        super().__init__()
        if target_row_count < 1:
            raise ValueError(
                f"target_row_count must be positive, got {target_row_count}"
            )
        if response_cache_size < 1:
            raise ValueError(
                f"response_cache_size must be positive, got {response_cache_size}"
            )
        if response_cache_timeout_s < 0:
            raise ValueError(
                f"response_cache_timeout_s must not be negative, got {response_cache_timeout_s}"
            )
        self._instance_name = instance_name
        self._streams = streams
        self._secret = _check_secret(secret)
        self._clock = clock
        self._target_row_count = target_row_count
        self._cache_size = response_cache_size
        self._cache_timeout_s = response_cache_timeout_s
        self._cache: OrderedDict[tuple[str, str], _CachedAnswer] = OrderedDict()
        if self._secret is None:
            _log.warn(
                "No replication secret configured: the HTTP replication endpoint "
                "of {instance!r} will refuse every request",
                instance=instance_name,
            )

    def render(self, request: Request) -> bytes | int:
        try:
            stream_name, txn_id = self._route(request)
            self._check_auth(request)
            stream = self._streams.get(stream_name)
            if stream is None:
                raise _HttpError(400, _M_UNKNOWN, "Unknown stream")
            args = cast(dict[bytes, list[bytes]], request.args)
            from_token = _parse_token(args, "from_token")
            upto_token = _parse_token(args, "upto_token")
        except _HttpError as e:
            return _render_error(request, e)
        Deferred.fromCoroutine(
            self._respond(request, stream_name, stream, txn_id, from_token, upto_token)
        ).addErrback(
            lambda f: _log.failure("Could not answer a replication request", f)
        )
        return NOT_DONE_YET

    @staticmethod
    def _route(request: Request) -> tuple[str, str]:
        """(stream name, txn id) from the path, else 404; then 405 unless GET."""
        path = request.path
        segments = path.removeprefix(_PREFIX_BYTES).split(b"/")
        if (
            not path.startswith(_PREFIX_BYTES)
            or len(segments) != 2
            or not all(segments)
        ):
            raise _HttpError(404, _M_UNRECOGNIZED, "Unrecognized request")
        try:
            stream_name, txn_id = (
                unquote_to_bytes(s).decode("utf-8") for s in segments
            )
        except UnicodeDecodeError:
            raise _HttpError(404, _M_UNRECOGNIZED, "Unrecognized request") from None
        if request.method != b"GET":
            raise _HttpError(
                405, _M_UNRECOGNIZED, "Unrecognized request", {b"Allow": b"GET"}
            )
        return stream_name, txn_id

    def _check_auth(self, request: Request) -> None:
        """Exactly one ``Bearer <secret>`` header, compared in constant time."""
        if self._secret is None:
            raise _HttpError(
                403,
                _M_FORBIDDEN,
                "No replication secret is configured on this instance, so it "
                "refuses replication requests",
            )
        headers = request.requestHeaders.getRawHeaders(b"Authorization")
        if not headers:
            raise _HttpError(
                401,
                _M_MISSING_TOKEN,
                "Missing Authorization header with the replication secret",
                {b"WWW-Authenticate": b"Bearer"},
            )
        scheme, _, token = headers[0].partition(b" ")
        valid = (
            len(headers) == 1
            and scheme.lower() == b"bearer"
            and hmac.compare_digest(token, self._secret)
        )
        if not valid:
            _log.info(
                "Refused a replication request from {peer}: wrong secret",
                peer=_peer(request),
            )
            raise _HttpError(403, _M_FORBIDDEN, "Invalid replication secret")

    async def _respond(
        self,
        request: Request,
        stream_name: str,
        stream: Stream[Any],
        txn_id: str,
        from_token: int,
        upto_token: int,
    ) -> None:
        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)
        try:
            body = await self._answer(
                stream_name, stream, txn_id, from_token, upto_token
            )
        except _HttpError as e:
            error = e
        except Exception:
            # Logged once where it happened, not once per waiting request.
            error = _HttpError(500, _M_UNKNOWN, "Internal server error")
        else:
            if not gone:
                _write(request, 200, body)
            return
        if not gone:
            request.write(_render_error(request, error))
            request.finish()

    async def _answer(
        self,
        stream_name: str,
        stream: Stream[Any],
        txn_id: str,
        from_token: int,
        upto_token: int,
    ) -> bytes:
        """The 200 body for this request: cached, being computed, or computed now."""
        key = (stream_name, txn_id)
        self._prune()
        entry = self._cache.get(key)
        if entry is not None:
            if (entry.from_token, entry.upto_token) != (from_token, upto_token):
                raise _HttpError(
                    400,
                    _M_INVALID_PARAM,
                    f"Transaction id {txn_id!r} was already used with other tokens",
                )
            if entry.body is not None:
                return entry.body
            waiter: Deferred[bytes] = Deferred()
            entry.waiters.append(waiter)
            return await waiter

        entry = _CachedAnswer(from_token, upto_token)
        self._cache[key] = entry
        while len(self._cache) > self._cache_size:
            # An evicted answer still being computed still reaches its waiters.
            self._cache.popitem(last=False)
        try:
            updates, new_upto, limited = await stream.update_function(
                self._instance_name, from_token, upto_token, self._target_row_count
            )
            body = encode_json_bytes(
                {"updates": updates, "upto_token": new_upto, "limited": limited}
            )
        except Exception:
            failure = Failure()
            _log.failure(
                "Update function of stream {stream!r} failed for ({start}, {end}]",
                failure,
                stream=stream_name,
                start=from_token,
                end=upto_token,
            )
            # Failures are not kept: a retry computes again.
            if self._cache.get(key) is entry:
                del self._cache[key]
            waiters, entry.waiters = entry.waiters, []
            for w in waiters:
                w.errback(failure)
            raise
        entry.body = body
        entry.expires_at = self._clock.seconds() + self._cache_timeout_s
        waiters, entry.waiters = entry.waiters, []
        for w in waiters:
            w.callback(body)
        return body

    def _prune(self) -> None:
        """Forget computed answers past their time (at most the cache size)."""
        now = self._clock.seconds()
        expired = [k for k, e in self._cache.items() if e.expires_at <= now]
        for k in expired:
            del self._cache[k]


def _peer(request: Request) -> str:
    address = request.getClientAddress()
    host = getattr(address, "host", None)
    return f"{host}:{getattr(address, 'port', '')}" if host else str(address)


def _parse_token(args: Mapping[bytes, list[bytes]], name: str) -> int:
    """The first value of query parameter `name` as a non-negative integer
    (Synapse's codes: M_MISSING_PARAM if absent, M_INVALID_PARAM if not one)."""
    values = args.get(name.encode("ascii"))
    if not values:
        raise _HttpError(
            400, _M_MISSING_PARAM, f"Missing query parameter {name} (an integer token)"
        )
    if _TOKEN_RE.fullmatch(values[0]) is None or int(values[0]) > _MAX_TOKEN:
        raise _HttpError(
            400,
            _M_INVALID_PARAM,
            f"Query parameter {name} must be a non-negative 64-bit integer token, "
            f"not {shorten(values[0].decode('utf-8', 'replace'), 40)!r}",
        )
    return int(values[0])


def _set_json_headers(request: Request, code: int, length: int) -> None:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", _JSON_CONTENT_TYPE)
    request.setHeader(b"Content-Length", b"%d" % (length,))
    request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")


def _write(request: Request, code: int, body: bytes) -> None:
    _set_json_headers(request, code, len(body))
    request.write(body)
    request.finish()


def _render_error(request: Request, error: _HttpError) -> bytes:
    """Sets the status and headers of `error`; returns its body."""
    body = _error_body(error.errcode, error.message)
    _set_json_headers(request, error.code, len(body))
    for name, value in error.headers.items():
        request.setHeader(name, value)
    return body


def make_replication_site(resource: ReplicationHttpResource) -> Site:
    """A site serving `resource` at its root, showing no tracebacks."""
    site = Site(resource)
    site.displayTracebacks = False
    return site


def listen_http(
    reactor: IReactorTCP,
    port: int,
    site: ServerFactory[Any],
    interface: str = "127.0.0.1",
) -> IListeningPort:
    """Listen for HTTP on `interface`:`port` (loopback unless told otherwise:
    the secret travels in clear unless a TLS proxy is in front)."""
    return reactor.listenTCP(port, site, interface=interface)


def listen_http_unix(
    reactor: IReactorUNIX, path: str, site: ServerFactory[Any], mode: int = 0o600
) -> IListeningPort:
    """Listen for HTTP on the UNIX socket `path` (owner-only by default)."""
    return reactor.listenUNIX(path, site, mode=mode)


# -- client


def _check_port(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{attribute.name} must be a TCP port number, got {value!r}")


@attrs.frozen
class InstanceLocation:
    """Where an instance's HTTP replication endpoint listens: `host`:`port`
    (over TLS if `tls`), or the UNIX socket `path` (then host, port and tls
    are unused; see `unix`)."""

    host: str = ""
    port: int = attrs.field(default=0, validator=_check_port)
    tls: bool = False
    path: str | None = None

    def __attrs_post_init__(self) -> None:
        if self.path is not None:
            if not self.path:
                raise ValueError("A UNIX socket path must not be empty")
            if self.tls:
                raise ValueError("TLS over a UNIX socket is not supported")
        elif not self.host or self.port == 0:
            raise ValueError(
                f"An instance location needs a host and a port, or a UNIX socket "
                f"path; got host={self.host!r} port={self.port}"
            )

    @classmethod
    def unix(cls, path: str) -> InstanceLocation:
        """The location of an endpoint listening on the UNIX socket `path`."""
        return cls(path=path)

    def describe(self) -> str:
        if self.path is not None:
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def host_header(self) -> bytes:
        """The Host header for requests to this location."""
        if self.path is not None:
            return b"localhost"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}".encode("idna")


@implementer(IAgentEndpointFactory)
class _InstanceEndpointFactory:
    """Connects to the instance named by a request URI's host.

    The client's URIs are ``http://<percent-encoded instance name>/...``, so
    the connection pool keeps one set of connections per instance and any
    kind of location (TCP, TLS, UNIX) goes through one agent.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        instance_map: Mapping[str, InstanceLocation],
        tls_policy: IPolicyForHTTPS,
    ) -> None:
        self._reactor = reactor
        self._instance_map = instance_map
        self._tls_policy = tls_policy

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        name = unquote(uri.host.decode("ascii"))
        location = self._instance_map[name]
        if location.path is not None:
            return UNIXClientEndpoint(self._reactor, location.path)
        endpoint: IStreamClientEndpoint = HostnameEndpoint(
            self._reactor, location.host, location.port
        )
        if location.tls:
            creator = self._tls_policy.creatorForNetloc(
                location.host.encode("idna"), location.port
            )
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint


class _RetriableStatus(Exception):
    """A 5xx answer: the instance may answer better next time."""


class _Fatal(Exception):
    """A failure that retrying will not cure (a 4xx, a malformed answer)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class _Timeout(Exception):
    """No complete answer within the per-request deadline."""


# What a later attempt may not meet: the connection, the deadline, the server.
_RETRIABLE: Final = (
    ConnectError,
    DNSLookupError,
    ConnectionClosed,
    ResponseFailed,
    ResponseNeverReceived,
    RequestTransmissionFailed,
    PartialDownloadError,
    _Timeout,
    _RetriableStatus,
)


def _describe_error(e: BaseException) -> str:
    """A one-line account of `e`, unwrapping Twisted's wrapper exceptions."""
    reasons = getattr(e, "reasons", None)
    if isinstance(reasons, list) and reasons:
        inner = "; ".join(
            _describe_error(r.value)
            if isinstance(r, Failure) and r.value is not None
            else repr(r)
            for r in reasons
        )
        return f"{type(e).__name__}({inner})"
    return shorten(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)


def _error_reason(code: int, body: bytes) -> str:
    """`code` and, if the body is a Matrix error, its errcode and message."""
    try:
        parsed = decode_json(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and "errcode" in parsed:
        return shorten(f"HTTP {code} {parsed.get('errcode')}: {parsed.get('error')}")
    return shorten(f"HTTP {code}: {body.decode('utf-8', 'replace')!r}")


def _parse_updates_body(body: bytes, from_token: int) -> StreamUpdateResult:
    """The (updates, upto_token, limited) of a 200 body; `_Fatal` unless it
    has exactly the endpoint's shape and its rows lie in order in
    ``(from_token, upto_token]`` (rows elsewhere would be delivered at the
    wrong position)."""
    try:
        parsed = decode_json(body)
    except ValueError as e:
        raise _Fatal(f"answer is not JSON ({e}): {shorten(repr(body))}") from None
    if type(parsed) is not dict:
        raise _Fatal(f"answer is not a JSON object: {shorten(repr(body))}")
    updates_in = parsed.get("updates")
    upto = parsed.get("upto_token")
    limited = parsed.get("limited")
    if type(updates_in) is not list:
        raise _Fatal(f"answer's 'updates' is not a list: {shorten(repr(body))}")
    if type(upto) is not int:
        raise _Fatal(f"answer's 'upto_token' is not an integer: {upto!r:.80}")
    if type(limited) is not bool:
        raise _Fatal(f"answer's 'limited' is not a boolean: {limited!r:.80}")
    updates: list[StreamUpdate] = []
    previous = from_token
    for update in updates_in:
        if type(update) is not list or len(update) != 2 or type(update[0]) is not int:
            raise _Fatal(
                f"answer holds an update that is not [token, row]: {update!r:.200}"
            )
        token = update[0]
        if not previous <= token <= upto or token == from_token:
            raise _Fatal(
                f"answer holds a row at token {token}, out of order or outside "
                f"({from_token}, {upto}]"
            )
        previous = token
        updates.append((token, update[1]))
    if limited and upto <= from_token:
        raise _Fatal(f"answer is limited but does not move past token {from_token}")
    return updates, upto, limited


class HttpReplicationClient:
    """Fetches missed rows from the instance that wrote them.

    `instance_map` (copied when constructed) says where each instance
    listens; there is no default instance. `secret` goes in a Bearer header
    and nowhere else. Each attempt may take `timeout_s`; after a retriable
    failure the client waits (`backoff`, jittered by `rand`) and tries again,
    up to `retries` more times, with the same txn id, so that the server can
    answer a retry from its cache.

    Connections are kept in `pool` (by default a persistent pool of our own);
    `close()` closes the idle ones.
    """

    def __init__(
        self,
        reactor: IReactorTCP,
        instance_map: Mapping[str, InstanceLocation],
        secret: str | None,
        *,
        clock: IReactorTime | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retries: int = DEFAULT_RETRIES,
        backoff: Backoff = DEFAULT_BACKOFF,
        rand: Callable[[], float] = random.random,
        pool: HTTPConnectionPool | None = None,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        """`clock` defaults to `reactor`; `rand` returns floats in [0, 1)."""
        if clock is None:
            if not IReactorTime.providedBy(reactor):
                raise TypeError("reactor does not provide IReactorTime: pass a clock")
            clock = cast(IReactorTime, reactor)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        if retries < 0:
            raise ValueError(f"retries must not be negative, got {retries}")
        for name, location in instance_map.items():
            if not name:
                raise ValueError("instance_map holds an empty instance name")
            if not isinstance(location, InstanceLocation):
                raise TypeError(
                    f"instance_map[{name!r}] must be an InstanceLocation, not {location!r}"
                )
            if location.path is not None and not IReactorUNIX.providedBy(reactor):
                raise ValueError(
                    f"instance {name!r} listens on a UNIX socket, which the reactor "
                    "cannot reach"
                )
        self._instance_map: dict[str, InstanceLocation] = dict(instance_map)
        self._secret = _check_secret(secret)
        self._clock = clock
        self._timeout_s = timeout_s
        self._retries = retries
        self._backoff = backoff
        self._rand = rand
        self._pool = pool if pool is not None else HTTPConnectionPool(reactor)
        self._agent = Agent.usingEndpointFactory(
            reactor,
            _InstanceEndpointFactory(
                reactor, self._instance_map, tls_policy or BrowserLikePolicyForHTTPS()
            ),
            pool=self._pool,
        )

    def update_function(self, stream_name: str) -> UpdateFunction:
        """The update function of `stream_name` for readers: each call asks
        the instance it names. Its `target_row_count` is not sent: the server
        decides how many rows an answer holds, as Synapse's does."""

        async def fetch(
            instance_name: str, from_token: int, upto_token: int, target_row_count: int
        ) -> StreamUpdateResult:
            return await self.get_updates(
                stream_name, instance_name, from_token, upto_token
            )

        return fetch

    async def get_updates(
        self, stream_name: str, instance_name: str, from_token: int, upto_token: int
    ) -> StreamUpdateResult:
        """The rows `instance_name` wrote to `stream_name` in
        ``(from_token, upto_token]``, as its endpoint answers; with `limited`,
        only up to the returned token. Raises `HttpCatchUpError`."""

        def failed(reason: str, status: int | None = None) -> HttpCatchUpError:
            return HttpCatchUpError(
                instance_name=instance_name,
                stream_name=stream_name,
                from_token=from_token,
                upto_token=upto_token,
                reason=reason,
                status=status,
            )

        location = self._instance_map.get(instance_name)
        if location is None:
            known = ", ".join(repr(n) for n in sorted(self._instance_map)) or "none"
            raise failed(
                f"instance {instance_name!r} is not in the instance map (known: {known})"
            )
        txn_id = f"{int(self._clock.seconds() * 1000)}-{secrets.token_hex(8)}"
        path = stream_updates_path(stream_name, txn_id)
        uri = (
            f"http://{quote(instance_name, safe='')}{path}"
            f"?from_token={from_token}&upto_token={upto_token}"
        ).encode("ascii")
        headers = Headers({b"Host": [location.host_header()]})
        if self._secret is not None:
            headers.setRawHeaders(b"Authorization", [b"Bearer " + self._secret])

        delay = self._backoff.initial
        attempt = 0
        while True:
            attempt += 1
            status: int | None = None
            try:
                status, body = await self._attempt(uri, headers)
                if status == 200:
                    return _parse_updates_body(body, from_token)
                if status >= 500:
                    raise _RetriableStatus(_error_reason(status, body))
                raise _Fatal(_error_reason(status, body), status)
            except _Fatal as e:
                raise failed(e.reason, e.status) from None
            except _RETRIABLE as e:
                last_error = _describe_error(e)
            except CancelledError:
                raise
            except Exception as e:
                raise failed(f"unexpected error: {_describe_error(e)}") from e
            if attempt > self._retries:
                raise failed(
                    f"gave up after {attempt} attempts; last error: {last_error}",
                    status,
                )
            wait = delay * (1 - self._backoff.jitter * self._rand())
            delay = min(delay * self._backoff.factor, self._backoff.maximum)
            _log.warn(
                "Fetching {stream!r} ({start}, {end}] from {instance!r} at {where} "
                "failed ({error}); attempt {next} in {wait:.2f}s",
                stream=stream_name,
                start=from_token,
                end=upto_token,
                instance=instance_name,
                where=location.describe(),
                error=last_error,
                next=attempt + 1,
                wait=wait,
            )
            await deferLater(self._clock, wait)

    async def _attempt(self, uri: bytes, headers: Headers) -> tuple[int, bytes]:
        """One request: (status, body), or `_Timeout` past the deadline (the
        request is cancelled, which closes its connection)."""
        d = Deferred.fromCoroutine(self._request(uri, headers))
        timed_out = False

        def time_out() -> None:
            nonlocal timed_out
            timed_out = True
            d.cancel()

        timer = self._clock.callLater(self._timeout_s, time_out)
        try:
            return await d
        except Exception as e:
            if timed_out:
                raise _Timeout(f"no complete answer within {self._timeout_s}s") from e
            raise
        finally:
            if timer.active():
                timer.cancel()

    async def _request(self, uri: bytes, headers: Headers) -> tuple[int, bytes]:
        response = await self._agent.request(b"GET", uri, headers)
        body = await readBody(response)
        return response.code, body

    def close(self) -> Deferred[None]:
        """Close the pool's idle connections; fires once they are closed."""
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed
