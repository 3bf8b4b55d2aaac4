# -*- test-case-name: tests.test_app -*-
"""Running one instance from its `WorkerConfig`: the service layer.

`start_instance` reads the role off the config and wires the pieces in the
one order that works (stores, streams, handler, streamer, transports,
listeners); `RunningInstance.stop` takes them down in the order that loses
nothing (see its docstring). `ReplicationService` wraps both as a Twisted
`Service`, for ``twistd`` and for applications that compose services.

What the config decides:

- **What we publish**: the streams this instance writes that have a source
  here (`PUBLISHED_STREAMS`: events and receipts in the database, typing in
  memory). Other streams assigned to us (``to_device``, ...) have no source
  in this library and are only reported.
- **What we follow**: every stream of `STREAMS_MAP` that another instance
  writes. Rows we missed come from the database for events and receipts when
  one is configured, otherwise from the writing instance over HTTP (found in
  `instance_map`); typing, and the streams we do not store, always over HTTP.
- **How**: Redis if enabled; otherwise direct TCP, as a server (a
  ``replication`` listener) and/or a client (`replication_connect`). A
  ``replication`` listener also runs next to Redis, serving the same handler.

Some configs are valid YAML but cannot work here; `check_config` refuses
them with a `ConfigError` naming the key (see there for why each is refused).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, cast

import attrs
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.logger import ILogObserver, Logger
from twisted.protocols.policies import WrappingFactory
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer

from synapse_replication import metrics
from synapse_replication.commands import ClearUserSyncCommand, Command
from synapse_replication.config import (
    MAIN_INSTANCE_NAME,
    ListenerConfig,
    ListenerType,
    PostgresDatabaseConfig,
    SqliteDatabaseConfig,
    WorkerConfig,
)
from synapse_replication.data_handler import (
    IReplicationDataHandler,
    ReplicationDataHandler,
    SupportsAdvance,
    WriterReplicationDataHandler,
)
from synapse_replication.errors import ConfigError
from synapse_replication.handler import OtherCommandCallback, ReplicationCommandHandler
from synapse_replication.http import (
    HttpReplicationClient,
    ReplicationHttpResource,
    listen_http,
    make_replication_site,
)
from synapse_replication.instance import Notifier
from synapse_replication.interfaces import HandlerResult, IReplicationConnection
from synapse_replication.redis import RedisReplicationClient, RedisSettings
from synapse_replication.redis.replication import RedisReplicationConnection
from synapse_replication.storage import (
    Database,
    EventsStore,
    MultiWriterIdGenerator,
    ReceiptsStore,
    Stores,
    StreamIdGenerator,
    TypingWriter,
    open_sqlite_store,
)
from synapse_replication.streamer import (
    EVENTS_WRITER_ANNOUNCE_EVERY_S,
    ReplicationStreamer,
)
from synapse_replication.streams import (
    STREAMS_MAP,
    EventsStream,
    ReceiptsStream,
    Stream,
    TypingStream,
    UpdateFunction,
)
from synapse_replication.tcp import (
    ClientReplicationProtocol,
    ReplicationClientFactory,
    ReplicationServerFactory,
    connect_replication_client,
    listen_replication,
)

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

__all__ = [
    "PUBLISHED_STREAMS",
    "BoundListener",
    "MetricsStarter",
    "ReplicationService",
    "RunningInstance",
    "check_config",
    "start_instance",
]

_log: Final = Logger(namespace="synapse_replication.app")

# The streams an instance can publish: those with a source in this library.
PUBLISHED_STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME, TypingStream.NAME)
# The published streams kept in the database (the rest: typing, in memory).
_PERSISTED_STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME)

# Bounds of the waits in `RunningInstance.stop`: a peer or a source that does
# not answer must not hold a shutdown forever.
_FLUSH_TIMEOUT_S: Final = 10.0
_IDLE_TIMEOUT_S: Final = 5.0
_POLL_S: Final = 0.01

# Starts the metrics endpoint of a ``type: metrics`` listener on one
# interface: ``(reactor, port, interface) -> listening port``.
MetricsStarter = Callable[[Any, int, str], IListeningPort]


# -- checking a config against what the service can run


def check_config(config: WorkerConfig) -> None:
    """Refuse, with a `ConfigError` naming the key, a config that parses but
    cannot run as described:

    - a direct TCP *client* that writes a stream: a client may not send RDATA
      or POSITION, so nobody would ever hear of its rows;
    - `replication_connect` with Redis enabled: everything goes through
      Redis, and a client connection would carry our RDATA to a server that
      refuses it;
    - over direct TCP, a stream written by an instance we cannot hear from: a
      client hears only the one instance it connects to, and an instance that
      only listens hears nobody;
    - several writers of `events` or `receipts` on SQLite, whose stream ids
      are handed out in one process's memory (several writers need
      PostgreSQL and its sequences);
    - a reader of another process's ``:memory:`` SQLite database.
    """
    me = config.instance_name
    my_keys = [key for key, writers in config.stream_writers.items() if me in writers]
    tcp_client = config.replication_connect is not None
    if config.redis.enabled and tcp_client:
        raise ConfigError(
            "replication_connect",
            "direct TCP replication is not used when redis is enabled (every "
            "instance replicates through Redis); remove replication_connect, or "
            "set redis.enabled: false",
        )
    if not config.redis.enabled:
        if tcp_client and my_keys:
            key = my_keys[0]
            raise ConfigError(
                f"stream_writers.{key}",
                f"this instance ({me!r}) writes {key} but reaches the others as a "
                "direct TCP client (replication_connect), and a TCP client cannot "
                "send its rows (RDATA and POSITION go from server to client only); "
                "enable redis, or make it a server with a 'type: replication' "
                "listener instead of replication_connect",
            )
        _check_tcp_reachability(config)
    database = config.database
    if isinstance(database, SqliteDatabaseConfig):
        for stream in _PERSISTED_STREAMS:
            writers = config.writers_of(stream)
            if len(writers) > 1:
                raise ConfigError(
                    f"stream_writers.{stream}",
                    f"{len(writers)} writers ({', '.join(writers)}) of {stream} on "
                    "SQLite; SQLite supports one writer per stream, several writers "
                    "need PostgreSQL (database.name: psycopg2)",
                )
        reads_others = any(me not in config.writers_of(s) for s in _PERSISTED_STREAMS)
        writes_any = any(me in config.writers_of(s) for s in _PERSISTED_STREAMS)
        if database.path == ":memory:" and reads_others and not writes_any:
            raise ConfigError(
                "database.args.database",
                "':memory:' is a database of this process only; a reader needs the "
                "path of the writer's SQLite file (or no database: rows then come "
                "over HTTP)",
            )


def _check_tcp_reachability(config: WorkerConfig) -> None:
    me = config.instance_name
    # The other instances whose rows we follow (every instance writes
    # `caches`, which nobody publishes here: left out).
    sources: dict[str, str] = {}
    for key, writers in config.stream_writers.items():
        for writer in writers:
            if writer != me:
                sources.setdefault(writer, key)
    if config.replication_connect is not None:
        if len(sources) > 1:
            names = sorted(sources)
            raise ConfigError(
                "replication_connect",
                f"this instance follows streams written by {', '.join(names)}, but "
                "direct TCP replication connects to one instance and carries only "
                "its rows; enable redis for several writers",
            )
    elif sources:
        writer, key = sorted(sources.items())[0]
        raise ConfigError(
            f"stream_writers.{key}",
            f"{writer!r} writes {key}, but this instance only listens for TCP "
            "replication clients and so never hears from it; enable redis, or "
            "connect to it with replication_connect",
        )


# -- the running instance


@attrs.frozen
class BoundListener:
    """One bound socket of a configured listener."""

    config: ListenerConfig
    port: IListeningPort
    # Where it was bound (``host:port``, ``[v6]:port`` or ``unix:<path>``)
    # and the port number (None on a UNIX socket): read once, as a stopped
    # port no longer knows.
    address: str
    port_number: int | None

    @classmethod
    def of(cls, config: ListenerConfig, port: IListeningPort) -> BoundListener:
        host = port.getHost()
        number: int | None = None
        if isinstance(host, IPv4Address):
            address, number = f"{host.host}:{host.port}", host.port
        elif isinstance(host, IPv6Address):
            address, number = f"[{host.host}]:{host.port}", host.port
        elif isinstance(host, UNIXAddress) and host.name is not None:
            name = host.name
            address = f"unix:{name.decode() if isinstance(name, bytes) else name}"
        else:
            address = str(host)
        return cls(config, port, address, number)


@implementer(IReplicationDataHandler)
class _AdvancingDataHandler:
    """The user's data handler, plus what `WriterReplicationDataHandler` does:
    every position reached for another writer of a stream we write with
    several writers also advances that stream's id generator (after the
    user's handler processed the rows up to it)."""

    def __init__(
        self, inner: IReplicationDataHandler, id_generators: dict[str, SupportsAdvance]
    ) -> None:
        self.inner = inner
        self._id_generators = id_generators

    def get_position(self, stream_name: str, instance_name: str) -> int | None:
        return self.inner.get_position(stream_name, instance_name)

    def on_rdata(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        return self._then_advance(
            self.inner.on_rdata(stream_name, instance_name, token, rows),
            stream_name,
            instance_name,
        )

    def on_position(
        self, stream_name: str, instance_name: str, token: int
    ) -> Awaitable[None] | None:
        return self._then_advance(
            self.inner.on_position(stream_name, instance_name, token),
            stream_name,
            instance_name,
        )

    def on_stream_reset(
        self, stream_name: str, instance_name: str, token: int
    ) -> Awaitable[None] | None:
        return self.inner.on_stream_reset(stream_name, instance_name, token)

    def _then_advance(
        self, result: Awaitable[None] | None, stream_name: str, instance_name: str
    ) -> Awaitable[None] | None:
        if result is None:
            self._advance(stream_name, instance_name)
            return None
        return self._advance_after(result, stream_name, instance_name)

    async def _advance_after(
        self, result: Awaitable[None], stream_name: str, instance_name: str
    ) -> None:
        await result
        self._advance(stream_name, instance_name)

    def _advance(self, stream_name: str, instance_name: str) -> None:
        id_gen = self._id_generators.get(stream_name)
        position = self.inner.get_position(stream_name, instance_name)
        if id_gen is not None and position is not None:
            id_gen.advance(instance_name, position)


@attrs.define(eq=False)
class RunningInstance:
    """One started instance: its pieces, for inspection and for writing
    (`stores`, `typing`), and `stop`.

    `published` are the streams it writes and publishes, `followed` those it
    receives from other instances. `data_handler` is the one the handler
    calls: the one given to `start_instance`, or a wrapper around it that
    also advances the id generators of the multi-writer streams we write.
    """

    config: WorkerConfig
    reactor: Any
    handler: ReplicationCommandHandler
    data_handler: IReplicationDataHandler
    streams: dict[str, Stream[Any]]
    published: tuple[str, ...]
    followed: tuple[str, ...]
    streamer: ReplicationStreamer | None = None
    stores: Stores | None = None
    typing: TypingWriter | None = None
    reader_db: Database | None = None
    http_client: HttpReplicationClient | None = None
    http_resource: ReplicationHttpResource | None = None
    redis: RedisReplicationClient | None = None
    tcp_server: ReplicationServerFactory | None = None
    tcp_client: ReplicationClientFactory | None = None
    listeners: list[BoundListener] = attrs.Factory(list)
    _http_factory: WrappingFactory | None = None
    _unregister_metrics: Callable[[], None] | None = None
    _stopping: Deferred[None] | None = None

    def ports(self, kind: ListenerType | str) -> list[int]:
        """The port numbers bound for listeners of `kind` (``replication``,
        ``http``, ``metrics``), in config order: how to find a port 0."""
        return [
            bound.port_number
            for bound in self.listeners
            if bound.config.type == kind and bound.port_number is not None
        ]

    def stop(self) -> Deferred[None]:
        """Shut down cleanly; idempotent (later calls wait for the first).

        In this order, so that nothing owed is lost:

        1. stop accepting replication clients and stop reconnecting;
        2. let the streamer publish everything already poked (rows committed
           before the stop reach readers still connected);
        3. tell the others that our users stopped syncing (``CLEAR_USER_SYNC``,
           sent by a worker as a TCP client or on Redis: Synapse's shutdown);
        4. close Redis and every TCP connection, and wait until they are gone;
        5. let catch-ups under way finish (they use the HTTP client and the
           database closed next);
        6. close the HTTP listeners, their connections and the HTTP client;
        7. stop the typing timers and close the database.

        Waits on peers are bounded, so a stuck peer cannot hold the shutdown.
        """
        if self._stopping is None:
            self._stopping = Deferred.fromCoroutine(self._stop())
        d: Deferred[None] = Deferred()

        def relay(result: object) -> None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(None)

        self._stopping.addBoth(relay)
        return d

    async def _stop(self) -> None:
        name = self.config.instance_name
        _log.info("Stopping instance {instance}", instance=name)
        try:
            if self.tcp_client is not None:
                self.tcp_client.stopTrying()
            await self._stop_listening(ListenerType.REPLICATION)

            if self.streamer is not None:
                self.streamer.stop()
                if not await _wait(
                    self.reactor, self.streamer.wait_until_idle(), _FLUSH_TIMEOUT_S
                ):
                    _log.warn(
                        "The streamer did not finish publishing within {t} s; stopping anyway",
                        t=_FLUSH_TIMEOUT_S,
                    )

            if name != MAIN_INSTANCE_NAME:
                for connection in self.handler.connections():
                    if isinstance(
                        connection, ClientReplicationProtocol | RedisReplicationConnection
                    ):
                        _log.info(
                            "{conn}: sending CLEAR_USER_SYNC {instance}",
                            conn=connection.describe(),
                            instance=name,
                        )
                        connection.send_command(ClearUserSyncCommand(name))

            if self.redis is not None:
                # Redis has our last PUBLISHes (rows, CLEAR_USER_SYNC) before
                # the connection goes.
                await self.redis.flush()
                await self.redis.stop()
            for connection in self.handler.connections():
                connection.close()
            close_timeout = self.config.connection_limits.close_timeout + 1.0
            await _wait_until(
                self.reactor,
                lambda: not self.handler.connections()
                and not (self.tcp_server is not None and self.tcp_server.connections),
                close_timeout,
            )
            if not await _wait_until(self.reactor, self.handler.is_idle, _IDLE_TIMEOUT_S):
                _log.warn(
                    "Commands still being handled after {t} s; stopping anyway",
                    t=_IDLE_TIMEOUT_S,
                )

            await self._stop_listening(ListenerType.HTTP)
            if self._http_factory is not None:
                await self._close_http_connections(self._http_factory, close_timeout)
            if self.http_client is not None:
                await self.http_client.close()
            await self._stop_listening(ListenerType.METRICS)
        finally:
            if self._unregister_metrics is not None:
                self._unregister_metrics()
            if self.typing is not None:
                self.typing.stop()
            if self.stores is not None:
                self.stores.close()
            if self.reader_db is not None:
                self.reader_db.close()
        _log.info("Stopped instance {instance}", instance=name)

    async def _stop_listening(self, kind: ListenerType) -> None:
        for bound in [b for b in self.listeners if b.config.type is kind]:
            self.listeners.remove(bound)
            stopped = bound.port.stopListening()
            if stopped is not None:
                await stopped
            _log.info(
                "Stopped listening for {kind} on {address}",
                kind=kind.value,
                address=bound.address,
            )

    async def _close_http_connections(
        self, factory: WrappingFactory, timeout: float
    ) -> None:
        """Close the connections other instances keep open to our HTTP
        endpoint (their pools keep them); abort those that linger."""
        for wrapper in list(factory.protocols):
            wrapper.transport.loseConnection()
        if not await _wait_until(self.reactor, lambda: not factory.protocols, timeout):
            for wrapper in list(factory.protocols):
                transport = wrapper.transport
                abort = getattr(transport, "abortConnection", None)
                if abort is not None:
                    abort()


async def _wait_until(reactor: Any, condition: Callable[[], bool], timeout: float) -> bool:
    """Turn the reactor until `condition()` holds (True) or `timeout` passes
    (False)."""
    clock = cast("IReactorTime", reactor)
    deadline = clock.seconds() + timeout
    while not condition():
        if clock.seconds() >= deadline:
            return False
        await deferLater(clock, _POLL_S, lambda: None)
    return True


async def _wait(reactor: Any, d: Deferred[None], timeout: float) -> bool:
    """Whether `d` fired within `timeout` (it is left running otherwise)."""
    fired: list[object] = []
    d.addBoth(fired.append)
    return await _wait_until(reactor, lambda: bool(fired), timeout)


# -- starting


def _log_other_command(
    user_callback: OtherCommandCallback | None,
) -> OtherCommandCallback:
    """Report commands the handler passes on: CLEAR_USER_SYNC (an instance
    going away) at info, the rest at debug by name only (USER_IP carries an
    access token)."""

    def on_other(connection: IReplicationConnection, cmd: Command) -> HandlerResult:
        if isinstance(cmd, ClearUserSyncCommand):
            _log.info(
                "{conn}: CLEAR_USER_SYNC {instance}: that instance stopped",
                conn=connection.describe(),
                instance=cmd.instance_id,
            )
        else:
            _log.debug("{conn}: received {cmd}", conn=connection.describe(), cmd=cmd.NAME)
        if user_callback is not None:
            return user_callback(connection, cmd)
        return None

    return on_other


def _ignore() -> None:
    """The notify callback of stores this instance only reads."""


async def _open_database(
    reactor: Any, config: WorkerConfig, notify: Callable[[], None]
) -> tuple[Stores | None, Database | None, EventsStore | None, ReceiptsStore | None]:
    """(read-write stores, read-only database, events source, receipts
    source) for `config.database`; all None without one."""
    database = config.database
    me = config.instance_name
    if isinstance(database, PostgresDatabaseConfig):
        from synapse_replication.storage.postgres import open_postgres_stores

        pool_size = database.cp_max or database.cp_min or 5
        stores = await open_postgres_stores(
            database.connect_kwargs(),
            me,
            reactor,
            notify,
            events_writers=config.writers_of(EventsStream.NAME),
            receipts_writers=config.writers_of(ReceiptsStream.NAME),
            pool_size=pool_size,
        )
        return stores, None, stores.events, stores.receipts
    if isinstance(database, SqliteDatabaseConfig):
        if any(config.writes(s) for s in _PERSISTED_STREAMS):
            stores = await open_sqlite_store(database.path, me, reactor, notify)
            return stores, None, stores.events, stores.receipts
        # A pure reader of another process's file: read-only, never holding
        # up the writer. The stores only read: their id generators never
        # hand out an id.
        db = Database.sqlite_reader(database.path, reactor)
        events_writer = config.writers_of(EventsStream.NAME)[0]
        receipts_writer = config.writers_of(ReceiptsStream.NAME)[0]
        return (
            None,
            db,
            EventsStore(db, StreamIdGenerator(events_writer, 0), events_writer, _ignore),
            ReceiptsStore(
                db, StreamIdGenerator(receipts_writer, 0), receipts_writer, _ignore
            ),
        )
    return None, None, None, None


def _no_local_position(instance_name: str) -> int:
    """A followed stream publishes nothing from here."""
    return 0


def _redis_settings(config: WorkerConfig) -> RedisSettings:
    redis = config.redis
    return RedisSettings(
        host=redis.host,
        port=redis.port,
        path=redis.path,
        username=redis.username,
        password=redis.password.reveal() if redis.password is not None else None,
        dbid=redis.dbid,
        use_tls=redis.use_tls,
        certificate_file=redis.certificate_file,
        private_key_file=redis.private_key_file,
        ca_file=redis.ca_file,
        ca_path=redis.ca_path,
        backoff=config.reconnect_backoff,
    )


async def start_instance(
    reactor: Any,
    config: WorkerConfig,
    *,
    data_handler: IReplicationDataHandler | None = None,
    on_other_command: OtherCommandCallback | None = None,
    start_metrics: MetricsStarter | None = None,
) -> RunningInstance:
    """Start the instance `config` describes, in `reactor` (a real reactor:
    it runs the database pool and binds sockets).

    `data_handler` receives the rows of the streams we follow; it defaults to
    a `ReplicationDataHandler` (position bookkeeping only). When this instance
    writes a stream that has several writers, positions of the other writers
    also advance that stream's id generator (`WriterReplicationDataHandler`,
    or a wrapper around the handler given). `on_other_command` receives the
    commands that are not about streams (USER_SYNC, CLEAR_USER_SYNC, ...).
    `start_metrics` binds a ``type: metrics`` listener on one address
    (default: `metrics.start_metrics_listener`, Prometheus at ``/metrics``);
    with one, the handler's positions and lag are reported too.

    Returns once every listener is bound and the transports are started (not
    necessarily connected). Raises `ConfigError` for a config `check_config`
    refuses, `CannotListenError` for a port in use; what was started is
    stopped again first.
    """
    check_config(config)
    me = config.instance_name
    published = tuple(s for s in PUBLISHED_STREAMS if config.writes(s))
    followed = tuple(
        sorted(
            name
            for name in STREAMS_MAP
            if name not in published and any(w != me for w in config.writers_of(name))
        )
    )
    unpublished = sorted(
        key
        for key, writers in config.stream_writers.items()
        if me in writers and key not in PUBLISHED_STREAMS
    )
    transport = (
        f"redis {config.redis.path or f'{config.redis.host}:{config.redis.port}'}"
        if config.redis.enabled
        else "direct TCP"
    )
    _log.info(
        "Starting instance {instance} of {server}: publishes {published}; follows "
        "{followed}; replication over {transport}",
        instance=me,
        server=config.server_name,
        published=", ".join(published) or "nothing",
        followed=", ".join(followed) or "nothing",
        transport=transport,
    )
    if unpublished:
        _log.info(
            "Also assigned to {instance} but without a source in this service, so "
            "not published: {streams}",
            instance=me,
            streams=", ".join(unpublished),
        )

    notifier = Notifier()
    stores, reader_db, events_source, receipts_source = await _open_database(
        reactor, config, notifier.poke
    )
    typing: TypingWriter | None = None
    http_client: HttpReplicationClient | None = None
    try:
        secret = config.worker_replication_secret
        revealed = secret.reveal() if secret is not None else None
        if TypingStream.NAME in published:
            typing = TypingWriter(reactor, me, notifier.poke)

        # The published streams, their sources read by us (to publish) and
        # by the HTTP endpoint (for others' catch-up).
        streams: dict[str, Stream[Any]] = {}
        for name in published:
            if name == TypingStream.NAME:
                assert typing is not None
                streams[name] = TypingStream(me, typing.current_token, typing.get_updates)
                continue
            store = events_source if name == EventsStream.NAME else receipts_source
            if store is None or stores is None:
                raise ConfigError(
                    "database",
                    f"this instance writes {name}, which is kept in a database; "
                    "configure one (database.name: sqlite3 or psycopg2)",
                )
            streams[name] = STREAMS_MAP[name](me, store.current_token, store.get_updates)

        # The followed streams, each with where missed rows come from.
        for name in followed:
            update: UpdateFunction
            if name == EventsStream.NAME and events_source is not None:
                update = events_source.get_updates
            elif name == ReceiptsStream.NAME and receipts_source is not None:
                update = receipts_source.get_updates
            else:
                if http_client is None:
                    http_client = HttpReplicationClient(
                        reactor, config.instance_map, revealed
                    )
                update = http_client.update_function(name)
            streams[name] = STREAMS_MAP[name](me, _no_local_position, update)

        id_generators: dict[str, SupportsAdvance] = {}
        if stores is not None:
            for name, id_gen in (
                (EventsStream.NAME, stores.events_id_gen),
                (ReceiptsStream.NAME, stores.receipts_id_gen),
            ):
                if name in published and isinstance(id_gen, MultiWriterIdGenerator):
                    id_generators[name] = id_gen
        chosen: IReplicationDataHandler
        if not id_generators:
            chosen = data_handler or ReplicationDataHandler()
        elif data_handler is None:
            chosen = WriterReplicationDataHandler(id_generators)
        else:
            chosen = _AdvancingDataHandler(data_handler, id_generators)

        handler = ReplicationCommandHandler(
            instance_name=me,
            clock=reactor,
            streams=streams,
            data_handler=chosen,
            writer_streams=published,
            stream_writers=config.writers_by_stream(),
            limits=config.handler_limits,
            on_other_command=_log_other_command(on_other_command),
        )
    except BaseException:
        if typing is not None:
            typing.stop()
        if http_client is not None:
            await http_client.close()
        if stores is not None:
            stores.close()
        if reader_db is not None:
            reader_db.close()
        raise

    instance = RunningInstance(
        config=config,
        reactor=reactor,
        handler=handler,
        data_handler=chosen,
        streams=streams,
        published=published,
        followed=followed,
        stores=stores,
        typing=typing,
        reader_db=reader_db,
        http_client=http_client,
    )
    try:
        await _start_transports(reactor, instance, notifier, revealed, start_metrics)
    except BaseException:
        await instance.stop()
        raise
    _log.info("Instance {instance} started", instance=me)
    return instance


async def _start_transports(
    reactor: Any,
    instance: RunningInstance,
    notifier: Notifier,
    secret: str | None,
    start_metrics: MetricsStarter | None,
) -> None:
    config = instance.config
    me = config.instance_name
    handler = instance.handler
    published = instance.published

    if published:
        # An idle writer of a stream with several writers moves its position
        # without a poke (it follows the others): announce it periodically.
        several = any(
            len(config.writers_of(s)) > 1 for s in published if s in _PERSISTED_STREAMS
        )
        streamer = ReplicationStreamer(
            clock=reactor,
            command_handler=handler,
            streams=[instance.streams[name] for name in published],
            announce_positions_every_s=EVENTS_WRITER_ANNOUNCE_EVERY_S if several else None,
        )
        notifier.add(streamer.on_notifier_poke)
        instance.streamer = streamer

    listeners = config.listeners
    replication = [lst for lst in listeners if lst.type is ListenerType.REPLICATION]
    if replication:
        factory = ReplicationServerFactory(
            clock=reactor,
            handler=handler,
            server_name=config.server_name,
            limits=config.connection_limits,
        )
        # Our own line per bound address replaces Twisted's per factory.
        factory.noisy = False
        instance.tcp_server = factory
        for listener in replication:
            assert listener.port is not None
            for address in listener.bind_addresses:
                port = listen_replication(reactor, listener.port, factory, interface=address)
                _bound(instance, listener, port)

    http = [lst for lst in listeners if lst.serves("replication")]
    if http:
        resource = ReplicationHttpResource(
            instance_name=me,
            streams={name: instance.streams[name] for name in published},
            secret=secret,
            clock=reactor,
        )
        instance.http_resource = resource
        # Keeps the live connections, to close them on stop.
        site_factory = make_replication_site(resource)
        site_factory.noisy = False
        wrapping = WrappingFactory(site_factory)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        wrapping.noisy = False
        instance._http_factory = wrapping
        site = cast(ServerFactory, wrapping)
        for listener in http:
            if listener.path is not None:
                # wantPID: a lock file next to the socket lets a restart
                # replace the socket of a process that died, and only then.
                port = reactor.listenUNIX(
                    listener.path, site, mode=listener.mode or 0o666, wantPID=True
                )
                _bound(instance, listener, port)
                continue
            assert listener.port is not None
            for address in listener.bind_addresses:
                _bound(instance, listener, listen_http(reactor, listener.port, site, address))

    metrics_listeners = [lst for lst in listeners if lst.type is ListenerType.METRICS]
    if metrics_listeners:
        instance._unregister_metrics = metrics.register_replication_collector(
            handler, instance.data_handler
        )
    for listener in metrics_listeners:
        assert listener.port is not None
        for address in listener.bind_addresses:
            starter = start_metrics or metrics.start_metrics_listener
            _bound(instance, listener, starter(reactor, listener.port, address))

    if config.redis.enabled:
        redis = RedisReplicationClient(
            reactor=reactor,
            handler=handler,
            server_name=config.server_name,
            instance_name=me,
            settings=_redis_settings(config),
            subscribe_user_ip=me == MAIN_INSTANCE_NAME,
        )
        instance.redis = redis
        redis.start()
    elif config.replication_connect is not None:
        connect = config.replication_connect
        client = ReplicationClientFactory(
            clock=reactor,
            handler=handler,
            server_name=config.server_name,
            instance_name=me,
            limits=config.connection_limits,
            backoff=config.reconnect_backoff,
        )
        client.noisy = False
        instance.tcp_client = client
        connect_replication_client(reactor, connect.host, connect.port, client)


def _bound(instance: RunningInstance, listener: ListenerConfig, port: IListeningPort) -> None:
    bound = BoundListener.of(listener, port)
    instance.listeners.append(bound)
    _log.info(
        "Listening for {kind} on {address}",
        kind=listener.type.value,
        address=bound.address,
    )


# -- as a Twisted service


class ReplicationService(Service):
    """An instance as a Twisted `Service`: `startService` starts it,
    `stopService` stops it (and waits for a start under way).

    A start that fails is logged and stops the reactor, as a process that
    cannot do its job should not linger. `log_observer`, if given, is set on
    the twistd application this service joins, which makes twistd log through
    it (see `synapse_replication._logging.twistd_log_observer`).
    """

    name = "synapse-replication"

    def __init__(
        self,
        config: WorkerConfig,
        *,
        data_handler: IReplicationDataHandler | None = None,
        log_observer: ILogObserver | None = None,
        start_metrics: MetricsStarter | None = None,
    ) -> None:
        self.config = config
        self.instance: RunningInstance | None = None
        self._data_handler = data_handler
        self._log_observer = log_observer
        self._start_metrics = start_metrics
        self._starting: Deferred[None] | None = None

    def setServiceParent(self, parent: Any) -> None:
        if (
            self._log_observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver) is None  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        ):
            parent.setComponent(ILogObserver, self._log_observer)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        super().setServiceParent(parent)  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        self._starting = Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        from twisted.internet import reactor

        try:
            self.instance = await start_instance(
                reactor,
                self.config,
                data_handler=self._data_handler,
                start_metrics=self._start_metrics,
            )
        except Exception:
            _log.failure("Could not start instance {instance}", instance=self.config.instance_name)
            if reactor.running:
                reactor.stop()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]  # Twisted leaves it unannotated
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self._starting is not None:
            await self._starting
        if self.instance is not None:
            await self.instance.stop()


