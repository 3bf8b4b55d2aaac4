# -*- test-case-name: tests.test_app -*-
"""`synapse_replication.app`: instances started from YAML worker configs, in
one reactor, talking over real sockets: loopback TCP, a real redis-server and
a real PostgreSQL (see `tests.redis_server`, `tests.postgres_server`).

Each test writes the configs an operator would, loads them with
`load_config` and starts them with `start_instance`, so what is tested is the
wiring the config selects (database, publish/follow, transports, listeners)
and not a hand-built stack. The oracle is the writing instance: a reader must
hold each of its rows exactly once, and typing state equal to the writer's.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from typing import Any, Final

import yaml
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase
from twisted.web.server import Request

from synapse_replication.app import RunningInstance, start_instance
from synapse_replication.commands import ClearUserSyncCommand, Command
from synapse_replication.config import WorkerConfig, load_config
from synapse_replication.data_handler import IReplicationDataHandler
from synapse_replication.errors import ConfigError
from synapse_replication.interfaces import HandlerResult, IReplicationConnection
from synapse_replication.storage import MultiWriterIdGenerator
from synapse_replication.streams import EventsStream, ReceiptsStream, TypingStream
from synapse_replication.streams.events import EventsStreamEventRow
from synapse_replication.streams.typing import TypingStreamRow
from synapse_replication.testing import TestReplicationDataHandler, inject
from tests.postgres_server import fresh_database
from tests.redis_server import start_redis

# The global reactor, untyped: it provides every reactor interface.
REACTOR: Final[Any] = reactor
SERVER: Final = "test.local"
SECRET: Final = "app-test-secret"
EVENTS: Final = EventsStream.NAME
RECEIPTS: Final = ReceiptsStream.NAME
TYPING: Final = TypingStream.NAME
ROOM: Final = "!room:test.local"
# Quick reconnects, so that a test never waits on a production backoff.
FAST_LIMITS: Final = {"reconnect": {"initial": 0.05, "maximum": 0.3}}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Let the reactor run until `predicate()` holds; fail after `timeout`."""
    deadline = REACTOR.seconds() + timeout
    while not predicate():
        if REACTOR.seconds() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await deferLater(REACTOR, 0.01, lambda: None)


def http_listener(port: int) -> dict[str, Any]:
    return {"type": "http", "port": port, "resources": [{"names": ["replication"]}]}


def typing_state(data: TestReplicationDataHandler, writer: str) -> dict[str, tuple[str, ...]]:
    """Each room's typing list as a reader holds it: the last row wins."""
    state: dict[str, tuple[str, ...]] = {}
    for call in data.rdata_calls:
        if call.stream_name == TYPING and call.instance_name == writer:
            for row in call.rows:
                assert isinstance(row, TypingStreamRow)
                state[row.room_id] = row.user_ids
    return state


def event_ids(data: TestReplicationDataHandler, writer: str) -> list[str]:
    return [
        row.event_id
        for call in data.rdata_calls
        if call.stream_name == EVENTS and call.instance_name == writer
        for row in call.rows
        if isinstance(row, EventsStreamEventRow)
    ]


class AppTestCase(TestCase):
    """Writes configs into a temporary directory and starts instances from
    them, each stopped when the test ends."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="synrepl-app-")

    def config(self, name: str, document: Mapping[str, Any]) -> WorkerConfig:
        """`document` written as ``<name>.yaml`` and loaded back."""
        path = os.path.join(self.dir, f"{name}.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(dict(document), f)
        return load_config(path)

    async def start(
        self,
        config: WorkerConfig,
        data_handler: IReplicationDataHandler | None = None,
        on_other_command: Callable[[IReplicationConnection, Command], HandlerResult] | None = None,
    ) -> RunningInstance:
        instance = await start_instance(
            REACTOR, config, data_handler=data_handler, on_other_command=on_other_command
        )
        self.addCleanup(instance.stop)
        return instance

    async def heard_from(
        self, data: TestReplicationDataHandler, writer: str, streams: tuple[str, ...]
    ) -> None:
        await wait_until(
            lambda: all(data.get_position(s, writer) is not None for s in streams),
            f"a position of {streams} from {writer}",
        )

    async def caught_up(
        self, data: TestReplicationDataHandler, writer: RunningInstance, streams: tuple[str, ...]
    ) -> None:
        """Until `data` holds every stream's rows up to the writer's token."""
        name = writer.config.instance_name

        def done() -> bool:
            for stream in streams:
                position = data.get_position(stream, name)
                if position is None or position < writer.streams[stream].current_token(name):
                    return False
            return True

        await wait_until(done, f"{streams} of {name} caught up")


class EmbeddedDefaultTests(AppTestCase):
    async def test_sqlite_writer_and_tcp_worker(self) -> None:
        """The embedded default: a master on SQLite with replication and HTTP
        listeners, a worker over direct TCP reading the master's file for
        missed events and receipts and asking it over HTTP for typing. Rows of
        every stream arrive once; the worker's stop tells the master
        (CLEAR_USER_SYNC)."""
        http_port = free_port()
        db = os.path.join(self.dir, "homeserver.db")
        common = {
            "server_name": SERVER,
            "worker_replication_secret": SECRET,
            "instance_map": {"main": {"host": "127.0.0.1", "port": http_port}},
            "replication_limits": FAST_LIMITS,
        }
        cleared: list[str] = []

        def on_other(connection: IReplicationConnection, cmd: Command) -> None:
            if isinstance(cmd, ClearUserSyncCommand):
                cleared.append(cmd.instance_id)

        master = await self.start(
            self.config(
                "master",
                {
                    **common,
                    "database": {"name": "sqlite3", "args": {"database": db}},
                    "listeners": [{"type": "replication", "port": 0}, http_listener(http_port)],
                },
            ),
            on_other_command=on_other,
        )
        self.assertEqual(master.published, (EVENTS, RECEIPTS, TYPING))
        assert master.stores is not None and master.typing is not None
        # Rows written before the worker connects are not sent to it.
        await inject.inject_message(master.stores.events, ROOM, "@a:test.local", "early")

        (replication_port,) = master.ports("replication")
        data = TestReplicationDataHandler()
        worker = await self.start(
            self.config(
                "worker1",
                {
                    **common,
                    "instance_name": "worker1",
                    "database": {"name": "sqlite3", "args": {"database": db}},
                    "replication_connect": {"host": "127.0.0.1", "port": replication_port},
                },
            ),
            data,
        )
        self.assertEqual(worker.published, ())
        self.assertIsNotNone(worker.reader_db)
        await self.heard_from(data, "master", (EVENTS, RECEIPTS, TYPING))

        sent = [
            await inject.inject_message(master.stores.events, ROOM, "@a:test.local", f"m{i}")
            for i in range(5)
        ]
        await inject.inject_receipt(master.stores.receipts, ROOM, "@b:test.local", sent[-1])
        inject.inject_typing(master.typing, ROOM, "@c:test.local")
        await self.caught_up(data, master, (EVENTS, RECEIPTS, TYPING))

        self.assertEqual(event_ids(data, "master"), sent)
        receipts = [row for _, row in data.rows_for(RECEIPTS)]
        self.assertEqual([(r.user_id, r.event_id) for r in receipts], [("@b:test.local", sent[-1])])
        self.assertEqual(typing_state(data, "master"), master.typing.typing_state())

        await worker.stop()
        await wait_until(lambda: cleared == ["worker1"], "the master hears CLEAR_USER_SYNC")


class RedisDeploymentTests(AppTestCase):
    async def test_worker_catches_up_typing_from_its_writer_over_http(self) -> None:
        """On Redis, a worker (`typer`) writes typing. `w2` gets its rows live;
        then `w2` stops, typing changes, and `w2` restarts with its positions:
        it catches up over HTTP from `typer` (the request reaches `typer`'s
        port) and ends with `typer`'s typing state."""
        redis = await start_redis(self, REACTOR)
        master_http, typer_http = free_port(), free_port()
        common = {
            "server_name": SERVER,
            "worker_replication_secret": SECRET,
            "instance_map": {
                "main": {"host": "127.0.0.1", "port": master_http},
                "typer": {"host": "127.0.0.1", "port": typer_http},
            },
            "stream_writers": {"typing": "typer"},
            "redis": {"enabled": True, "host": "127.0.0.1", "port": redis.port},
            "replication_limits": FAST_LIMITS,
        }
        master = await self.start(
            self.config(
                "master",
                {
                    **common,
                    "database": {
                        "name": "sqlite3",
                        "args": {"database": os.path.join(self.dir, "master.db")},
                    },
                    "listeners": [http_listener(master_http)],
                },
            )
        )
        typer = await self.start(
            self.config(
                "typer",
                {**common, "instance_name": "typer", "listeners": [http_listener(typer_http)]},
            )
        )
        self.assertEqual((master.published, typer.published), ((EVENTS, RECEIPTS), (TYPING,)))
        assert typer.typing is not None and master.stores is not None
        w2_config = self.config("w2", {**common, "instance_name": "w2"})
        data = TestReplicationDataHandler()
        w2 = await self.start(w2_config, data)
        self.assertIn(TYPING, w2.followed)
        await self.heard_from(data, "typer", (TYPING,))
        await self.heard_from(data, "master", (EVENTS, RECEIPTS))

        # Live, over Redis.
        inject.inject_typing(typer.typing, ROOM, "@alice:test.local")
        sent = await inject.inject_message(master.stores.events, ROOM, "@alice:test.local")
        await self.caught_up(data, typer, (TYPING,))
        await self.caught_up(data, master, (EVENTS,))
        self.assertEqual(typing_state(data, "typer"), {ROOM: ("@alice:test.local",)})
        self.assertEqual(event_ids(data, "master"), [sent])

        # Gone while typing changes.
        await w2.stop()
        position = data.get_position(TYPING, "typer")
        assert position is not None
        inject.inject_typing(typer.typing, ROOM, "@bob:test.local")
        inject.inject_typing(typer.typing, ROOM, "@alice:test.local", typing=False)
        inject.inject_typing(typer.typing, "!other:test.local", "@carol:test.local")
        self.assertGreater(typer.typing.current_token("typer"), position)

        requests: list[tuple[int, bytes]] = []
        resource = typer.http_resource
        assert resource is not None
        render = resource.render

        def recording_render(request: Request) -> bytes | int:
            requests.append((request.getHost().port, request.path))
            return render(request)

        resource.render = recording_render  # type: ignore[method-assign]  # the test swaps in a recording method

        # Back, with the positions it had.
        w2 = await self.start(w2_config, data)
        await self.caught_up(data, typer, (TYPING,))
        self.assertTrue(requests, "w2 did not ask typer over HTTP")
        for port, path in requests:
            self.assertEqual(port, typer_http)
            self.assertTrue(path.startswith(b"/_synapse/replication/get_repl_stream_updates/typing/"))
        self.assertEqual(typing_state(data, "typer"), typer.typing.typing_state())
        self.assertEqual(data.resets, [])


class SharedHandlerTests(AppTestCase):
    async def test_one_handler_serves_tcp_and_redis(self) -> None:
        """An instance with a replication listener and Redis feeds both from
        one handler: a TCP reader and a Redis reader each get its rows once."""
        redis = await start_redis(self, REACTOR)
        http_port = free_port()
        db = os.path.join(self.dir, "master.db")
        common = {
            "server_name": SERVER,
            "worker_replication_secret": SECRET,
            "instance_map": {"main": {"host": "127.0.0.1", "port": http_port}},
            "replication_limits": FAST_LIMITS,
        }
        redis_section = {"enabled": True, "host": "127.0.0.1", "port": redis.port}
        master = await self.start(
            self.config(
                "master",
                {
                    **common,
                    "redis": redis_section,
                    "database": {"name": "sqlite3", "args": {"database": db}},
                    "listeners": [{"type": "replication", "port": 0}, http_listener(http_port)],
                },
            )
        )
        assert master.stores is not None
        (replication_port,) = master.ports("replication")
        over_tcp, over_redis = TestReplicationDataHandler(), TestReplicationDataHandler()
        await self.start(
            self.config(
                "tcp_reader",
                {
                    **common,
                    "instance_name": "tcp_reader",
                    "database": {"name": "sqlite3", "args": {"database": db}},
                    "replication_connect": {"host": "127.0.0.1", "port": replication_port},
                },
            ),
            over_tcp,
        )
        await self.start(
            self.config(
                "redis_reader", {**common, "instance_name": "redis_reader", "redis": redis_section}
            ),
            over_redis,
        )
        for data in (over_tcp, over_redis):
            await self.heard_from(data, "master", (EVENTS,))
        kinds = {type(c).__name__ for c in master.handler.connections()}
        self.assertEqual(kinds, {"ServerReplicationProtocol", "RedisReplicationConnection"})

        sent = [
            await inject.inject_message(master.stores.events, ROOM, "@a:test.local", f"m{i}")
            for i in range(4)
        ]
        for data in (over_tcp, over_redis):
            await self.caught_up(data, master, (EVENTS,))
            self.assertEqual(event_ids(data, "master"), sent)


class PostgresMultiWriterTests(AppTestCase):
    async def test_two_event_persisters_and_a_reader_on_redis(self) -> None:
        """Two event persisters on one PostgreSQL and a reader, on Redis: the
        reader gets each writer's rows once, and its stream token reaches the
        busier writer's even though the other stopped writing (the idle one
        follows and announces)."""
        conn_args = fresh_database(self)
        redis = await start_redis(self, REACTOR)
        master_http, p2_http = free_port(), free_port()
        writers = ["master", "persister2"]
        common = {
            "server_name": SERVER,
            "worker_replication_secret": SECRET,
            "instance_map": {
                "main": {"host": "127.0.0.1", "port": master_http},
                "persister2": {"host": "127.0.0.1", "port": p2_http},
            },
            "stream_writers": {"events": writers, "receipts": writers},
            "redis": {"enabled": True, "host": "127.0.0.1", "port": redis.port},
            "database": {
                "name": "psycopg2",
                "args": {**conn_args, "cp_min": 2, "cp_max": 3},
            },
            "replication_limits": FAST_LIMITS,
        }
        master = await self.start(
            self.config("master", {**common, "listeners": [http_listener(master_http)]})
        )
        # A data handler of our own: the app wraps it so that the other
        # writer's positions still reach the id generator.
        p2_data = TestReplicationDataHandler()
        p2 = await self.start(
            self.config(
                "persister2",
                {**common, "instance_name": "persister2", "listeners": [http_listener(p2_http)]},
            ),
            p2_data,
        )
        assert master.stores is not None and p2.stores is not None
        self.assertIsInstance(p2.stores.events_id_gen, MultiWriterIdGenerator)
        data = TestReplicationDataHandler()
        reader = await self.start(self.config("reader", {**common, "instance_name": "reader"}), data)
        self.assertEqual(reader.published, ())
        for writer in writers:
            await self.heard_from(data, writer, (EVENTS, RECEIPTS))

        sent: dict[str, list[str]] = {writer: [] for writer in writers}
        for i in range(6):
            for instance in (master, p2):
                name = instance.config.instance_name
                assert instance.stores is not None
                sent[name].append(
                    await inject.inject_message(
                        instance.stores.events, f"!{name}:test.local", "@a:test.local", f"{name}{i}"
                    )
                )
        # Only master goes on.
        for i in range(3):
            sent["master"].append(
                await inject.inject_message(master.stores.events, ROOM, "@a:test.local", f"late{i}")
            )
        for instance in (master, p2):
            await self.caught_up(data, instance, (EVENTS,))
        for writer in writers:
            self.assertEqual(event_ids(data, writer), sent[writer])
        # persister2 hears master's rows through its (wrapped) handler.
        self.assertEqual(event_ids(p2_data, "master"), sent["master"])
        target = master.stores.events.current_token("master")
        await wait_until(
            lambda: (data.get_stream_token(EVENTS, writers) or 0) >= target,
            "the reader's events token passes master's last write",
        )
        self.assertEqual(data.resets, [])


class ConfigErrorTests(AppTestCase):
    """Configs that parse but cannot run fail at start, naming the key."""

    def base(self, **extra: Any) -> dict[str, Any]:
        return {
            "server_name": SERVER,
            "instance_name": "w1",
            "worker_replication_secret": SECRET,
            "instance_map": {
                "main": {"host": "127.0.0.1", "port": 8001},
                "w1": {"host": "127.0.0.1", "port": 8002},
            },
            **extra,
        }

    async def assert_refused(self, document: dict[str, Any], key: str, words: str) -> None:
        config = self.config("refused", document)
        try:
            await start_instance(REACTOR, config)
        except ConfigError as e:
            self.assertEqual(e.key, key)
            self.assertIn(key, str(e))
            self.assertIn(words, str(e))
        else:
            self.fail(f"started despite {key}")

    async def test_tcp_client_writing_a_stream(self) -> None:
        await self.assert_refused(
            self.base(
                stream_writers={"typing": "w1"},
                replication_connect={"host": "127.0.0.1", "port": 9},
            ),
            "stream_writers.typing",
            "TCP client cannot send its rows",
        )

    async def test_replication_connect_with_redis(self) -> None:
        await self.assert_refused(
            self.base(
                redis={"enabled": True, "port": 9},
                replication_connect={"host": "127.0.0.1", "port": 9},
            ),
            "replication_connect",
            "not used when redis is enabled",
        )

    async def test_tcp_client_of_two_writers(self) -> None:
        document = self.base(
            stream_writers={"typing": "typer"},
            replication_connect={"host": "127.0.0.1", "port": 9},
        )
        document["instance_map"]["typer"] = {"host": "127.0.0.1", "port": 8003}
        await self.assert_refused(document, "replication_connect", "master, typer")

    async def test_several_writers_on_sqlite(self) -> None:
        await self.assert_refused(
            self.base(
                stream_writers={"events": ["master", "w1"]},
                redis={"enabled": True, "port": 9},
                database={"name": "sqlite3", "args": {"database": "x.db"}},
            ),
            "stream_writers.events",
            "need PostgreSQL",
        )

