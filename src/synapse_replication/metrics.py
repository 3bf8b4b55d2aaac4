# -*- test-case-name: tests.test_metrics -*-
# mypy: allow-untyped-calls
# (twisted.web's Resource and Site, and prometheus_client's MetricsResource,
# have no annotated constructors.)
"""Prometheus metrics of replication, and the listener that serves them.

Names follow Synapse's for the same things, so that its dashboards keep
working; what Synapse lacks is prefixed ``synapse_replication_``.

Recorded as things happen, in prometheus_client's global ``REGISTRY`` (once
per process, at import; per-line counts are plain ints exposed by a collector,
see below):

- ``synapse_replication_tcp_protocol_inbound_commands_total{command,transport}``
  and ``..._outbound_commands_total``: every command parsed from, or accepted
  for sending to, a TCP connection or Redis (``transport`` is ``tcp`` or
  ``redis``). Synapse labels them with the peer's name instead; a name a peer
  chooses is no label for a counter that lives as long as the process.
- ``synapse_replication_rows_received_total{stream,instance}``: rows handed to
  the data handler, live or through a catch-up, by stream and writer.
- ``synapse_replication_tcp_resource_stream_updates_total{stream_name}``: rows
  published by the streamer.
- ``synapse_replication_catch_up_duration_seconds{stream}`` (histogram, on the
  handler's clock), ``synapse_replication_catch_up_rows_total{stream}`` and
  ``synapse_replication_catch_up_failures_total{stream}``.

Read when scraped, from what is alive then (nothing to update per row, and a
connection's series go when it does):

- ``synapse_replication_connections{transport,side}``: live connections
  (``side``: ``server``/``client`` over TCP, ``subscriber``/``publisher`` for
  Redis); ``synapse_replication_tcp_resource_total_connections``: those a
  command handler uses (all but Redis publishers), as Synapse counts them.
- ``synapse_replication_tcp_protocol_pending_commands{transport,name,conn_id}``
  and ``synapse_replication_pending_bytes{...}``: commands waiting to be sent,
  per TCP connection (its paused-transport queue) and per Redis client (its
  publish queue). ``name`` is the peer's name (``anon`` until it gave one,
  ``redis`` for Redis), ``conn_id`` a number unique in the process.
- With `register_replication_collector`: ``synapse_replication_stream_position
  {stream,instance}`` (the reader's position per writer, from the data
  handler), ``synapse_replication_stream_lag{stream,instance}`` (the latest
  token that writer announced, through RDATA or POSITION, minus that
  position; absent until the reader has a position) and
  ``synapse_replication_tcp_command_queue{stream_name}`` (RDATA/POSITION
  waiting in the handler's per-stream queues), in the registry given.

``instance`` is the writer's name. Prometheus sets a target label of the same
name, so without ``honor_labels`` it stores ours as ``exported_instance``.

No label ever carries a command's arguments beyond stream and instance names:
``USER_IP`` holds an access token, and it shows nowhere.

The scrape runs in a thread of the reactor's pool (prometheus_client's Twisted
resource is a WSGI app), so what it reads from the reactor thread is copied
in one step (``dict.copy()`` holds the GIL) or under this module's lock.
"""

from __future__ import annotations

import itertools
import threading
import typing
import weakref
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Protocol, cast

import attrs
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from twisted.internet.interfaces import IListeningPort, IReactorTCP
from twisted.internet.protocol import ServerFactory
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site

from synapse_replication.commands import COMMAND_MAP
from synapse_replication.data_handler import (
    IReplicationDataHandler,
    ReplicationDataHandler,
)

__all__ = [
    "REDIS",
    "TCP",
    "register_replication_collector",
    "start_metrics_listener",
]

TCP: Final = "tcp"
REDIS: Final = "redis"

# (stream name, writer instance name), as in the handler.
_Key = tuple[str, str]


# -- recorded as things happen

# Counts on hot paths (a line, a row) are plain ints in dicts, bumped on the
# reactor thread and turned into counters when scraped: ``d[k] += 1`` costs
# tens of nanoseconds where a prometheus_client child's ``inc()`` (a lock per
# call) costs about a microsecond, a sizeable share of handling a line.
# Only the reactor thread writes them; a scrape reads a copy.

# Received and sent commands by name, pre-filled so that every command shows
# (at 0) from the start. Indexed by `cmd.NAME` of a parsed command, always a key.
TCP_INBOUND: Final[dict[str, int]] = dict.fromkeys(COMMAND_MAP, 0)
TCP_OUTBOUND: Final[dict[str, int]] = dict.fromkeys(COMMAND_MAP, 0)
REDIS_INBOUND: Final[dict[str, int]] = dict.fromkeys(COMMAND_MAP, 0)
REDIS_OUTBOUND: Final[dict[str, int]] = dict.fromkeys(COMMAND_MAP, 0)
# Rows by (stream, writer) and by stream; streams and writers are few.
_rows_received: Final[dict[_Key, int]] = {}
_stream_updates: Final[dict[str, int]] = {}
_catch_up_rows: Final[dict[str, int]] = {}


def count_rows_received(key: _Key, count: int) -> None:
    """`count` rows of (stream, writer) `key` went to the data handler."""
    _rows_received[key] = _rows_received.get(key, 0) + count


def count_stream_updates(stream_name: str, count: int) -> None:
    """The streamer published `count` rows of `stream_name`."""
    _stream_updates[stream_name] = _stream_updates.get(stream_name, 0) + count


def count_catch_up_rows(stream_name: str, count: int) -> None:
    """A catch-up delivered `count` rows of `stream_name` (also counted as
    received by the caller)."""
    _catch_up_rows[stream_name] = _catch_up_rows.get(stream_name, 0) + count


class _CountCollector:
    """The counts above, as counters."""

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[CounterMetricFamily]:
        return [
            CounterMetricFamily(
                "synapse_replication_tcp_protocol_inbound_commands",
                "Commands received, by command and transport",
                labels=["command", "transport"],
            ),
            CounterMetricFamily(
                "synapse_replication_tcp_protocol_outbound_commands",
                "Commands sent (written or queued), by command and transport",
                labels=["command", "transport"],
            ),
            CounterMetricFamily(
                "synapse_replication_rows_received",
                "Rows handed to the data handler, live or by catch-up, by stream and writer",
                labels=["stream", "instance"],
            ),
            CounterMetricFamily(
                "synapse_replication_tcp_resource_stream_updates",
                "Rows published by the streamer, by stream",
                labels=["stream_name"],
            ),
            CounterMetricFamily(
                "synapse_replication_catch_up_rows",
                "Rows delivered through catch-up, by stream",
                labels=["stream"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        inbound, outbound, rows, updates, catch_up = families = self._families()
        for family, transport, counts in (
            (inbound, TCP, TCP_INBOUND),
            (inbound, REDIS, REDIS_INBOUND),
            (outbound, TCP, TCP_OUTBOUND),
            (outbound, REDIS, REDIS_OUTBOUND),
        ):
            for command, count in counts.copy().items():
                family.add_metric([command, transport], count)
        for (stream_name, instance_name), count in sorted(_rows_received.copy().items()):
            rows.add_metric([stream_name, instance_name], count)
        for stream_name, count in sorted(_stream_updates.copy().items()):
            updates.add_metric([stream_name], count)
        for stream_name, count in sorted(_catch_up_rows.copy().items()):
            catch_up.add_metric([stream_name], count)
        return families


REGISTRY.register(_CountCollector())

# Rare events: prometheus_client's own metrics.
CATCH_UP_DURATION: Final = Histogram(
    "synapse_replication_catch_up_duration_seconds",
    "Time to fetch the rows a POSITION showed were missed, by stream",
    ["stream"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
CATCH_UP_FAILURES: Final = Counter(
    "synapse_replication_catch_up_failures",
    "Catch-ups that failed and will be retried, by stream",
    ["stream"],
)


def observe_catch_up(stream_name: str, seconds: float) -> None:
    """A catch-up of `stream_name` finished after `seconds`."""
    CATCH_UP_DURATION.labels(stream=stream_name).observe(seconds)


def count_catch_up_failure(stream_name: str) -> None:
    """A catch-up of `stream_name` failed (it will be retried)."""
    CATCH_UP_FAILURES.labels(stream=stream_name).inc()


# -- live connections and send queues, read when scraped


class SendQueue(Protocol):
    """Something holding commands not yet sent."""

    @property
    def pending_commands(self) -> int: ...

    @property
    def pending_bytes(self) -> int: ...


@typing.runtime_checkable
class _Named(Protocol):
    def peer_name(self) -> str | None: ...


_lock: Final = threading.Lock()
# Weak keys, and values that do not refer to them: a connection dropped
# without its loss being reported (a test that just lets a pair go) is
# neither kept alive nor reported by metrics once it is garbage.
# connection -> (transport, side)
_connections: Final[weakref.WeakKeyDictionary[object, tuple[str, str]]] = (
    weakref.WeakKeyDictionary()
)
# queue -> (transport, conn_id)
_queues: Final[weakref.WeakKeyDictionary[SendQueue, tuple[str, str]]] = (
    weakref.WeakKeyDictionary()
)
_conn_ids: Final = itertools.count(1)

# Sides a command handler sees as a connection: all but Redis publishers.
_HANDLER_SIDES: Final = frozenset({"server", "client", "subscriber"})


def track_connection(
    conn: object, *, transport: str, side: str, queue: SendQueue | None = None
) -> None:
    """Count `conn` as live until `untrack_connection(conn)` (or until it is
    garbage). With `queue` (usually `conn` itself), also report its pending
    commands for as long."""
    with _lock:
        _connections[conn] = (transport, side)
    if queue is not None:
        track_send_queue(queue, transport=transport)


def untrack_connection(conn: object, queue: SendQueue | None = None) -> None:
    """`conn` is gone, and `queue` with it (idempotent)."""
    with _lock:
        _connections.pop(conn, None)
        if queue is not None:
            _queues.pop(queue, None)


def track_send_queue(queue: SendQueue, *, transport: str) -> None:
    """Report `queue`'s pending commands until `untrack_send_queue(queue)` (or
    until it is garbage). It is labelled with its `peer_name()` if it has
    one, else ``anon`` (``redis`` for Redis)."""
    conn_id = str(next(_conn_ids))
    with _lock:
        _queues[queue] = (transport, conn_id)


def untrack_send_queue(queue: SendQueue) -> None:
    with _lock:
        _queues.pop(queue, None)


class _TransportCollector:
    """Connections and send queues alive at scrape time."""

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "synapse_replication_connections",
                "Live replication connections, by transport and side",
                labels=["transport", "side"],
            ),
            GaugeMetricFamily(
                "synapse_replication_tcp_resource_total_connections",
                "Live connections used by command handlers (all but Redis publishers)",
            ),
            GaugeMetricFamily(
                "synapse_replication_tcp_protocol_pending_commands",
                "Commands waiting to be sent, per connection (TCP) or client (Redis)",
                labels=["transport", "name", "conn_id"],
            ),
            GaugeMetricFamily(
                "synapse_replication_pending_bytes",
                "Bytes of the commands waiting to be sent, per connection or client",
                labels=["transport", "name", "conn_id"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        with _lock:
            connections = list(_connections.values())
            queues = list(_queues.items())
        by_side: dict[tuple[str, str], int] = {}
        for transport_side in connections:
            by_side[transport_side] = by_side.get(transport_side, 0) + 1
        per_side, total, pending, pending_bytes = families = self._families()
        for (transport, side), count in sorted(by_side.items()):
            per_side.add_metric([transport, side], count)
        total.add_metric(
            [], sum(n for (_, side), n in by_side.items() if side in _HANDLER_SIDES)
        )
        for queue, (transport, conn_id) in queues:
            name = queue.peer_name() if isinstance(queue, _Named) else None
            labels = [transport, name or (REDIS if transport == REDIS else "anon"), conn_id]
            pending.add_metric(labels, queue.pending_commands)
            pending_bytes.add_metric(labels, queue.pending_bytes)
        return families


REGISTRY.register(_TransportCollector())


# -- stream positions and lag, read from a handler and its data handler


class SupportsReplicationMetrics(Protocol):
    """What the collector reads from a command handler
    (`ReplicationCommandHandler` provides it)."""

    def announced_positions(self) -> Mapping[_Key, int]:
        """The latest token each (stream, writer) announced."""

    def queued_commands(self) -> Mapping[str, int]:
        """RDATA/POSITION waiting, per stream with any."""


@attrs.frozen(eq=False)
class _Source:
    handler: weakref.ref[SupportsReplicationMetrics]
    data_handler: weakref.ref[IReplicationDataHandler]


class _ReplicationCollector:
    """Positions, lag and inbound queues of the registered handlers.

    A process normally has one reader; should several report the same
    (stream, writer), the first registered wins.
    """

    def __init__(self) -> None:
        self._sources: list[_Source] = []

    def add(self, source: _Source) -> None:
        with _lock:
            self._sources.append(source)

    def remove(self, source: _Source) -> None:
        with _lock:
            if source in self._sources:
                self._sources.remove(source)

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def _families(self) -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "synapse_replication_stream_position",
                "Token up to which this instance handled a writer's rows",
                labels=["stream", "instance"],
            ),
            GaugeMetricFamily(
                "synapse_replication_stream_lag",
                "Latest token a writer announced minus this instance's position for it",
                labels=["stream", "instance"],
            ),
            GaugeMetricFamily(
                "synapse_replication_tcp_command_queue",
                "Inbound RDATA/POSITION commands queued for processing, by stream",
                labels=["stream_name"],
            ),
        ]

    def collect(self) -> Iterable[Metric]:
        with _lock:
            sources = list(self._sources)
        position_family, lag_family, queue_family = families = self._families()
        positions_seen: dict[_Key, int] = {}
        lags_seen: dict[_Key, int] = {}
        queued: dict[str, int] = {}
        for source in sources:
            handler, data_handler = source.handler(), source.data_handler()
            if handler is None or data_handler is None:
                self.remove(source)
                continue
            announced = handler.announced_positions()
            positions = _positions(data_handler, announced)
            for key, token in positions.items():
                positions_seen.setdefault(key, token)
            for key, latest in announced.items():
                position = positions.get(key)
                if position is not None:
                    lags_seen.setdefault(key, max(0, latest - position))
            for stream_name, count in handler.queued_commands().items():
                queued[stream_name] = queued.get(stream_name, 0) + count
        for (stream_name, instance_name), token in sorted(positions_seen.items()):
            position_family.add_metric([stream_name, instance_name], token)
        for (stream_name, instance_name), lag in sorted(lags_seen.items()):
            lag_family.add_metric([stream_name, instance_name], lag)
        for stream_name, count in sorted(queued.items()):
            queue_family.add_metric([stream_name], count)
        return families


def _positions(data_handler: IReplicationDataHandler, announced: Iterable[_Key]) -> dict[_Key, int]:
    """Every position the data handler knows; for one that cannot list them,
    those of the writers that announced something."""
    if isinstance(data_handler, ReplicationDataHandler):
        return data_handler.positions()
    found = {key: data_handler.get_position(*key) for key in announced}
    return {key: token for key, token in found.items() if token is not None}


_replication_collectors: Final[
    weakref.WeakKeyDictionary[CollectorRegistry, _ReplicationCollector]
] = weakref.WeakKeyDictionary()


def register_replication_collector(
    handler: SupportsReplicationMetrics,
    data_handler: IReplicationDataHandler,
    registry: CollectorRegistry = REGISTRY,
) -> Callable[[], None]:
    """Report `handler`'s stream positions (from `data_handler`), lag and
    inbound queues in `registry`, computed when scraped.

    Both are held weakly: once either is garbage it is no longer reported.
    Returns a function that stops reporting them now.
    """
    with _lock:
        collector = _replication_collectors.get(registry)
        if collector is None:
            collector = _ReplicationCollector()
            registry.register(collector)
            _replication_collectors[registry] = collector
    source = _Source(weakref.ref(handler), weakref.ref(data_handler))
    collector.add(source)
    return lambda: collector.remove(source)


# -- the listener


class _QuietSite(Site):
    """A Site that writes no access log line per scrape."""

    def log(self, request: Request) -> None:
        pass


def start_metrics_listener(
    reactor: IReactorTCP,
    port: int,
    bind_address: str = "127.0.0.1",
    registry: CollectorRegistry = REGISTRY,
) -> IListeningPort:
    """Serve `registry` at ``/metrics`` on `bind_address`:`port` (loopback
    unless told otherwise: metrics tell a lot about a deployment).

    The scrape itself runs in the global reactor's thread pool, as
    prometheus_client's Twisted resource does it.
    """
    # Imported here: it imports the global reactor, which importing this
    # module (and so the transports) must not install.
    from prometheus_client.twisted import MetricsResource

    root = Resource()
    root.putChild(b"metrics", MetricsResource(registry))
    site = _QuietSite(root)
    site.noisy = False
    return reactor.listenTCP(port, cast(ServerFactory[Any], site), interface=bind_address)
