"""The receivers of benchmarks/pipeline.py that are not ours, and what the
children of that script share.

This module never imports `synapse_replication`: Synapse's receive path runs
in a process of its own, because both packages register prometheus metrics of
the same names (``synapse_replication_tcp_protocol_inbound_commands``, ...) in
prometheus_client's global registry, and importing Synapse's
``synapse.replication.tcp.protocol`` after ours raises ``DuplicateTimeseries``.

Run as ``python pipeline_receivers.py --child ROLE JSON`` by pipeline.py; it
prints ``RESULT <json>`` when done.
"""

from __future__ import annotations

import importlib
import json
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, Final
from unittest.mock import Mock

from _harness import run_reactor, say, wait_for
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory
from twisted.protocols.basic import LineOnlyReceiver

WRITER: Final = "master"
WORKER: Final = "worker1"
SERVER_NAME: Final = "localhost"
EVENTS: Final = "events"


# --------------------------------------------------------------------------
# What every child uses


class RowCounter:
    """Counts rows; remembers when the first and the `expected`-th arrived,
    by the clock and by this process's CPU time (all threads)."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.rows = 0
        self.first: float | None = None
        self.last: float | None = None
        self.first_cpu = 0.0
        self.last_cpu = 0.0
        self.done: Deferred[None] = Deferred()

    def add(self, n: int) -> None:
        if self.first is None:
            self.first = time.monotonic()
            self.first_cpu = time.process_time()
        self.rows += n
        if self.rows >= self.expected and self.last is None:
            self.last = time.monotonic()
            self.last_cpu = time.process_time()
            self.done.callback(None)

    def result(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "first": self.first,
            "last": self.last,
            "cpu": self.last_cpu - self.first_cpu,
        }


async def _receive(
    reactor: Any,
    args: dict[str, Any],
    factory: Callable[[Any, RowCounter], ClientFactory[Any]],
) -> dict[str, Any]:
    counter = RowCounter(args["rows"])
    reactor.connectTCP("127.0.0.1", args["port"], factory(reactor, counter))
    await wait_for(reactor, counter.done, args["timeout"], "rows")
    return counter.result()


# --------------------------------------------------------------------------
# (c) the bare receiver


def bare_factory(reactor: Any, counter: RowCounter) -> ClientFactory[Any]:
    """A `LineOnlyReceiver` that splits each RDATA line and decodes its row
    with orjson; nothing else: the ceiling for a Python receiver."""
    loads = importlib.import_module("orjson").loads

    class BareReceiver(LineOnlyReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 16 * 1024

        def connectionMade(self) -> None:
            assert self.transport is not None
            self.transport.write(f"NAME {WORKER}\nREPLICATE \n".encode())

        def lineReceived(self, line: bytes) -> None:
            if line.startswith(b"RDATA "):
                loads(line.split(b" ", 4)[4])
                counter.add(1)

    class Factory(ClientFactory[Any]):
        def buildProtocol(self, addr: Any) -> Any:
            return BareReceiver()

    return Factory()


# --------------------------------------------------------------------------
# (b) Synapse's receive path


def synapse_factory(reactor: Any, counter: RowCounter) -> ClientFactory[Any]:
    """A client factory building Synapse's `ClientReplicationStreamProtocol`
    with Synapse's `ReplicationCommandHandler`, on a minimal fake HomeServer.

    Everything on the receive path is Synapse's own: line framing, command
    parsing, the per-stream `BackgroundQueue` run through
    `run_as_background_process` (logcontexts, metrics), POSITION handling,
    `EventsStream.parse_row`, batching and the token check against the
    events id generator. Only the data handler (counting, and advancing the
    id generator as Synapse's store would) and the stores are stand-ins.
    """
    # Through importlib, so that Synapse's modules are typed Any.
    run_as_background_process = importlib.import_module(
        "synapse.metrics.background_process_metrics"
    ).run_as_background_process
    command_handler_class = importlib.import_module(
        "synapse.replication.tcp.handler"
    ).ReplicationCommandHandler
    protocol_class = importlib.import_module(
        "synapse.replication.tcp.protocol"
    ).ClientReplicationStreamProtocol
    clock = importlib.import_module("synapse.util.clock").Clock(reactor, server_name=SERVER_NAME)

    class IdGen:
        """What streams ask of an id generator: per-writer positions."""

        def __init__(self) -> None:
            self.positions: dict[str, int] = {}

        def get_current_token_for_writer(self, instance_name: str) -> int:
            return self.positions.get(instance_name, 0)

        def get_minimal_local_current_token(self) -> int:
            return 0

        def get_current_token(self) -> int:
            return max(self.positions.values(), default=0)

    class Store:
        """Id generators by name; any other attribute is a stub returning 0
        (stream constructors only take references to update functions)."""

        def __getattr__(self, name: str) -> Any:
            value: Any = IdGen() if name.endswith("_id_gen") else Mock(return_value=0)
            setattr(self, name, value)
            return value

    store = Store()
    events_id_gen: IdGen = store._stream_id_gen

    class DataHandler:
        async def on_rdata(
            self, stream_name: str, instance_name: str, token: int, rows: list[Any]
        ) -> None:
            counter.add(len(rows))
            if stream_name == EVENTS:
                events_id_gen.positions[instance_name] = token

        async def on_position(self, stream_name: str, instance_name: str, token: int) -> None:
            pass

    writers = SimpleNamespace(
        **{
            name: [WRITER]
            for name in (
                "events",
                "typing",
                "to_device",
                "account_data",
                "receipts",
                "presence",
                "push_rules",
                "thread_subscriptions",
                "device_lists",
                "quarantined_media_changes",
            )
        }
    )
    presence = Mock()
    presence.get_currently_syncing_users_for_replication.return_value = []
    data_handler = DataHandler()

    class FakeHomeServer:
        """What `ReplicationCommandHandler.__init__`, the stream constructors
        and the protocol ask of a HomeServer, for a generic worker."""

        hostname = SERVER_NAME
        config = SimpleNamespace(
            worker=SimpleNamespace(
                writers=writers,
                worker_app="synapse.app.generic_worker",
                run_background_tasks=False,
                send_federation=False,
                instance_map={},
                worker_replication_secret=None,
            ),
            redis=SimpleNamespace(redis_enabled=False),
        )

        def get_replication_data_handler(self) -> Any:
            return data_handler

        def get_presence_handler(self) -> Any:
            return presence

        def get_datastores(self) -> Any:
            return SimpleNamespace(main=store)

        def get_notifier(self) -> Any:
            return Mock()

        def get_clock(self) -> Any:
            return clock

        def get_instance_id(self) -> str:
            return "benchmark"

        def get_instance_name(self) -> str:
            return WORKER

        def should_send_federation(self) -> bool:
            return False

        def get_typing_handler(self) -> Any:
            return Mock()

        def get_replication_client(self) -> Any:
            return Mock()

        def run_as_background_process(
            self, desc: str, func: Callable[..., Any], *args: Any, **kwargs: Any
        ) -> Any:
            # What HomeServer.run_as_background_process does, minus the
            # bookkeeping for shutdown.
            return run_as_background_process(desc, self.hostname, func, *args, **kwargs)

    hs = FakeHomeServer()
    handler = command_handler_class(hs)

    class Factory(ClientFactory[Any]):
        def buildProtocol(self, addr: Any) -> Any:
            return protocol_class(hs, WORKER, SERVER_NAME, clock, handler)

    return Factory()


def synapse_minimal_factory(reactor: Any, counter: RowCounter) -> ClientFactory[Any]:
    """Synapse's `ClientReplicationStreamProtocol` (framing, command parsing,
    logcontext per line, metrics) with a minimal handler in place of
    Synapse's `ReplicationCommandHandler`: it parses each row with Synapse's
    stream class, batches rows of token ``batch``, checks the token and counts,
    all synchronously: no per-stream queue, no background process. A lower
    bound for Synapse's receive path, shown for comparison."""
    streams_map = importlib.import_module("synapse.replication.tcp.streams").STREAMS_MAP
    protocol_class = importlib.import_module(
        "synapse.replication.tcp.protocol"
    ).ClientReplicationStreamProtocol
    clock = importlib.import_module("synapse.util.clock").Clock(reactor, server_name=SERVER_NAME)

    class MinimalHandler:
        def __init__(self) -> None:
            self.positions: dict[tuple[str, str], int] = {}
            self.pending: dict[str, list[Any]] = {}

        def new_connection(self, connection: Any) -> None:
            pass

        def lost_connection(self, connection: Any) -> None:
            pass

        def on_POSITION(self, connection: Any, cmd: Any) -> None:
            self.positions[(cmd.stream_name, cmd.instance_name)] = cmd.new_token

        def on_RDATA(self, connection: Any, cmd: Any) -> None:
            row = streams_map[cmd.stream_name].parse_row(cmd.row)
            if cmd.token is None:
                self.pending.setdefault(cmd.stream_name, []).append(row)
                return
            rows = self.pending.pop(cmd.stream_name, [])
            rows.append(row)
            key = (cmd.stream_name, cmd.instance_name)
            if cmd.token > self.positions.get(key, 0):
                self.positions[key] = cmd.token
                counter.add(len(rows))

    handler = MinimalHandler()
    # The protocol only asks the HomeServer to run handler coroutines, and
    # this handler returns none.
    hs = SimpleNamespace(run_as_background_process=None)

    class Factory(ClientFactory[Any]):
        def buildProtocol(self, addr: Any) -> Any:
            return protocol_class(hs, WORKER, SERVER_NAME, clock, handler)

    return Factory()


FACTORIES: Final[dict[str, Callable[[Any, RowCounter], ClientFactory[Any]]]] = {
    "recv-bare": bare_factory,
    "recv-synapse": synapse_factory,
    "recv-synapse-min": synapse_minimal_factory,
}


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] != "--child" or sys.argv[2] not in FACTORIES:
        print(f"usage: {sys.argv[0]} --child {{{','.join(FACTORIES)}}} JSON", file=sys.stderr)
        return 2
    factory = FACTORIES[sys.argv[2]]
    args = json.loads(sys.argv[3])
    say("RESULT", run_reactor(lambda reactor: _receive(reactor, args, factory)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
