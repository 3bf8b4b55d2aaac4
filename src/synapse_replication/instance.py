# -*- test-case-name: tests.test_end_to_end -*-
"""Assembling instances: a writer with its store, streamer and listener, and a
worker that follows it.

These are the embedded default's building blocks (SQLite and direct TCP on
127.0.0.1), used by the demo, the test harness and the service. Every piece is
also usable on its own; this module only wires them together in the one order
that works: store, streams, handler, streamer, then the listener.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs
from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IListeningPort

from synapse_replication.data_handler import (
    IReplicationDataHandler,
    ReplicationDataHandler,
)
from synapse_replication.handler import HandlerLimits, ReplicationCommandHandler
from synapse_replication.storage import Stores, TypingWriter, open_sqlite_store
from synapse_replication.streamer import ReplicationStreamer
from synapse_replication.streams import (
    STREAMS_MAP,
    EventsStream,
    ReceiptsStream,
    Stream,
    TypingStream,
    UpdateFunction,
)
from synapse_replication.tcp import (
    Backoff,
    ConnectionLimits,
    ReplicationClientFactory,
    ReplicationServerFactory,
    connect_replication_client,
    listen_replication,
)

# The streams an embedded writer writes.
WRITER_STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME, TypingStream.NAME)


class Notifier:
    """Calls every registered callback when poked.

    Stores are opened before the streamer that listens to them exists, so
    they are given this notifier's `poke` and the streamer subscribes later.
    """

    def __init__(self) -> None:
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        self._callbacks.append(callback)

    def poke(self) -> None:
        for callback in self._callbacks:
            callback()


@attrs.define
class WriterInstance:
    """One writer of `events`, `receipts` and `typing` on an SQLite file,
    serving replication over TCP."""

    instance_name: str
    server_name: str
    stores: Stores
    typing: TypingWriter
    streams: dict[str, Stream[Any]]
    handler: ReplicationCommandHandler
    streamer: ReplicationStreamer
    server_factory: ReplicationServerFactory
    port: IListeningPort | None

    def listening_port(self) -> int:
        assert self.port is not None, "not listening"
        host = self.port.getHost()
        assert isinstance(host, IPv4Address)
        return host.port

    async def stop(self) -> None:
        """Stop listening, drop connections, stop typing timers, close the store."""
        if self.port is not None:
            stopped = self.port.stopListening()
            self.port = None
            if stopped is not None:
                await stopped
        for connection in list(self.server_factory.connections):
            connection.close()
        self.typing.stop()
        await self.streamer.wait_until_idle()
        self.stores.close()


async def start_writer(
    reactor: Any,
    *,
    db_path: str,
    instance_name: str = "master",
    server_name: str = "localhost",
    port: int | None = 0,
    interface: str = "127.0.0.1",
    data_handler: IReplicationDataHandler | None = None,
    connection_limits: ConnectionLimits | None = None,
) -> WriterInstance:
    """Open (or create) the store at `db_path` and start publishing it.

    `port=None` starts no listener (the caller connects transports itself,
    e.g. in memory); `port=0` picks a free one.
    """
    notifier = Notifier()
    stores = await open_sqlite_store(db_path, instance_name, reactor, notifier.poke)
    typing = TypingWriter(reactor, instance_name, notifier.poke)
    streams: dict[str, Stream[Any]] = {
        EventsStream.NAME: EventsStream(
            instance_name, stores.events.current_token, stores.events.get_updates
        ),
        ReceiptsStream.NAME: ReceiptsStream(
            instance_name, stores.receipts.current_token, stores.receipts.get_updates
        ),
        TypingStream.NAME: TypingStream(instance_name, typing.current_token, typing.get_updates),
    }
    handler = ReplicationCommandHandler(
        instance_name=instance_name,
        clock=reactor,
        streams=streams,
        data_handler=data_handler or ReplicationDataHandler(),
        writer_streams=WRITER_STREAMS,
        stream_writers={name: [instance_name] for name in WRITER_STREAMS},
    )
    streamer = ReplicationStreamer(
        clock=reactor, command_handler=handler, streams=list(streams.values())
    )
    notifier.add(streamer.on_notifier_poke)
    factory = ReplicationServerFactory(
        clock=reactor,
        handler=handler,
        server_name=server_name,
        limits=connection_limits or ConnectionLimits(),
    )
    listening = None
    if port is not None:
        listening = listen_replication(reactor, port, factory, interface=interface)
    return WriterInstance(
        instance_name=instance_name,
        server_name=server_name,
        stores=stores,
        typing=typing,
        streams=streams,
        handler=handler,
        streamer=streamer,
        server_factory=factory,
        port=listening,
    )


def _no_local_position(instance_name: str) -> int:
    """A reader's streams publish nothing, so their own position is nil."""
    return 0


def reader_streams(
    instance_name: str, sources: Mapping[str, UpdateFunction]
) -> dict[str, Stream[Any]]:
    """Streams for a reader: each followed stream with the function that
    fetches rows it missed (from the database, or from the writer over HTTP)."""
    return {
        name: STREAMS_MAP[name](instance_name, _no_local_position, update)
        for name, update in sources.items()
    }


@attrs.define
class WorkerInstance:
    """A reader that follows a writer over TCP."""

    instance_name: str
    handler: ReplicationCommandHandler
    data_handler: IReplicationDataHandler
    client_factory: ReplicationClientFactory

    def stop(self) -> None:
        """Stop reconnecting and close the live connection, if any."""
        self.client_factory.stopTrying()
        for connection in self.handler.connections():
            connection.close()


def make_worker(
    reactor: Any,
    *,
    instance_name: str,
    server_name: str,
    sources: Mapping[str, UpdateFunction],
    data_handler: IReplicationDataHandler,
    stream_writers: Mapping[str, list[str]] | None = None,
    limits: HandlerLimits | None = None,
    connection_limits: ConnectionLimits | None = None,
    backoff: Backoff | None = None,
) -> WorkerInstance:
    """A worker following the streams in `sources`, not yet connected."""
    handler = ReplicationCommandHandler(
        instance_name=instance_name,
        clock=reactor,
        streams=reader_streams(instance_name, sources),
        data_handler=data_handler,
        stream_writers=stream_writers,
        limits=limits,
    )
    factory = ReplicationClientFactory(
        clock=reactor,
        handler=handler,
        server_name=server_name,
        instance_name=instance_name,
        limits=connection_limits or ConnectionLimits(),
        backoff=backoff or Backoff(),
    )
    return WorkerInstance(instance_name, handler, data_handler, factory)


def connect_worker(reactor: Any, worker: WorkerInstance, host: str, port: int) -> None:
    """Connect (and keep reconnecting) `worker` to a writer's listener."""
    connect_replication_client(reactor, host, port, worker.client_factory)
