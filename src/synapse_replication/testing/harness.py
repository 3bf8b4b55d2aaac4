# -*- test-case-name: tests.test_end_to_end -*-
"""A writer and workers in one reactor, for tests of replication end to end.

The writer is a real `WriterInstance` on an SQLite file. Each worker records
what it receives in a `TestReplicationDataHandler` and catches up from the
writer's own stores (the same file, the same process). Workers are connected
either in memory through `twisted.test.iosim` (``transport="memory"``) or over
real TCP on 127.0.0.1 (``transport="tcp"``); `pump_until_quiet` moves bytes
and reactor turns until nothing is left in flight and every connected worker
has reached the writer's positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.task import deferLater
from twisted.test import iosim as _iosim_module

from synapse_replication.handler import HandlerLimits
from synapse_replication.instance import (
    WRITER_STREAMS,
    WorkerInstance,
    WriterInstance,
    connect_worker,
    make_worker,
    start_writer,
)
from synapse_replication.streams import UpdateFunction
from synapse_replication.tcp import Backoff
from synapse_replication.testing import TestReplicationDataHandler

Transport = Literal["memory", "tcp"]

# twisted.test.iosim has no annotations; going through Any keeps mypy --strict
# from refusing every call while the rest of this module stays checked.
iosim: Any = _iosim_module


class HarnessTimeout(AssertionError):
    """The instances did not settle in time; the message says what was pending."""


@attrs.define
class HarnessWorker:
    """A worker of the harness and what it received."""

    name: str
    instance: WorkerInstance
    data: TestReplicationDataHandler
    pump: Any = None  # an iosim.IOPump while connected in memory
    connected: bool = False
    # Over TCP, whether the instance's client factory was stopped for good.
    stopped: bool = False


class ReplicationHarness:
    """Owns a writer and its workers; `stop` tears everything down."""

    def __init__(
        self,
        writer: WriterInstance,
        transport: Transport,
        reactor: Any,
        handler_limits: HandlerLimits | None,
    ) -> None:
        self.writer = writer
        self.transport = transport
        self.reactor = reactor
        self._handler_limits = handler_limits
        self.workers: list[HarnessWorker] = []

    @classmethod
    async def start(
        cls,
        db_path: str,
        *,
        workers: int | Sequence[str] = 1,
        transport: Transport = "memory",
        writer_name: str = "master",
        server_name: str = "test.local",
        handler_limits: HandlerLimits | None = None,
        reactor: Any = None,
    ) -> ReplicationHarness:
        """Start a writer on `db_path` and connect `workers` (a count, or names)."""
        reactor = reactor or global_reactor
        writer = await start_writer(
            reactor,
            db_path=db_path,
            instance_name=writer_name,
            server_name=server_name,
            port=0 if transport == "tcp" else None,
        )
        harness = cls(writer, transport, reactor, handler_limits)
        names = [f"worker{i + 1}" for i in range(workers)] if isinstance(workers, int) else workers
        for name in names:
            harness.add_worker(name)
        await harness.pump_until_quiet()
        return harness

    def _sources(self) -> dict[str, UpdateFunction]:
        return {name: stream.update_function for name, stream in self.writer.streams.items()}

    def add_worker(self, name: str, data: TestReplicationDataHandler | None = None) -> HarnessWorker:
        """Create and connect a worker following the writer's streams."""
        instance = self._make_instance(name, data or TestReplicationDataHandler())
        assert isinstance(instance.data_handler, TestReplicationDataHandler)
        worker = HarnessWorker(name, instance, instance.data_handler)
        self.workers.append(worker)
        self.connect(worker)
        return worker

    def _make_instance(self, name: str, data: TestReplicationDataHandler) -> WorkerInstance:
        return make_worker(
            self.reactor,
            instance_name=name,
            server_name=self.writer.server_name,
            sources=self._sources(),
            data_handler=data,
            stream_writers={s: [self.writer.instance_name] for s in WRITER_STREAMS},
            limits=self._handler_limits,
            backoff=Backoff(initial=0.05, maximum=0.5),
        )

    def worker(self, name: str) -> HarnessWorker:
        return next(w for w in self.workers if w.name == name)

    def connect(self, worker: HarnessWorker) -> None:
        """(Re)connect a disconnected worker; it catches up through POSITION."""
        assert not worker.connected, f"{worker.name} is already connected"
        if self.transport == "memory":
            server = self.writer.server_factory.buildProtocol(None)
            client = worker.instance.client_factory.buildProtocol(None)
            worker.pump = iosim.connect(
                server,
                iosim.FakeTransport(server, isServer=True),
                client,
                iosim.FakeTransport(client, isServer=False),
                greet=False,
            )
        else:
            if worker.stopped:
                # A stopped factory stays stopped: build a fresh worker around
                # the same data handler, as a restarted worker process would.
                worker.instance = self._make_instance(worker.name, worker.data)
                worker.stopped = False
            connect_worker(self.reactor, worker.instance, "127.0.0.1", self.writer.listening_port())
        worker.connected = True

    def disconnect(self, worker: HarnessWorker) -> None:
        """Cut the worker's connection (both ends see it lost) and keep it down."""
        assert worker.connected, f"{worker.name} is not connected"
        if self.transport == "memory":
            assert worker.pump is not None
            worker.pump.clientIO.loseConnection()
            worker.pump.serverIO.loseConnection()
            worker.pump.flush()
            worker.pump = None
        else:
            worker.instance.stop()
            worker.stopped = True
        worker.connected = False

    def is_caught_up(self, worker: HarnessWorker) -> bool:
        """The worker has reached the writer's position on every stream."""
        writer = self.writer
        for name in WRITER_STREAMS:
            token = writer.streams[name].current_token(writer.instance_name)
            position = worker.data.get_position(name, writer.instance_name)
            if position is None or position < token:
                return False
        return True

    def _pending(self) -> list[str]:
        pending = []
        if not self.writer.streamer.is_idle():
            pending.append("writer streamer busy")
        if not self.writer.handler.is_idle():
            pending.append("writer handler busy")
        for worker in self.workers:
            if not worker.connected:
                continue
            if not worker.instance.handler.is_idle():
                pending.append(f"{worker.name} handler busy")
            if not worker.instance.handler.connected():
                pending.append(f"{worker.name} not connected yet")
            elif not self.is_caught_up(worker):
                pending.append(f"{worker.name} behind the writer")
        return pending

    async def pump_until_quiet(self, timeout: float = 30.0) -> None:
        """Move bytes and reactor turns until nothing is in flight and every
        connected worker has the writer's positions; HarnessTimeout otherwise."""
        deadline = self.reactor.seconds() + timeout
        quiet_rounds = 0
        while True:
            moved = False
            for worker in self.workers:
                if worker.pump is not None:
                    moved = worker.pump.pump() or moved
            pending = self._pending()
            quiet_rounds = 0 if (moved or pending) else quiet_rounds + 1
            if quiet_rounds >= 3:
                return
            if self.reactor.seconds() > deadline:
                raise HarnessTimeout(
                    f"not quiet after {timeout}s: {', '.join(pending) or 'bytes still moving'}"
                )
            delay = 0.0 if self.transport == "memory" and moved else 0.002
            await deferLater(self.reactor, delay, lambda: None)

    async def stop(self) -> None:
        """Disconnect every worker and stop the writer."""
        for worker in self.workers:
            if worker.connected:
                self.disconnect(worker)
        await self.writer.stop()
        # Let closing connections finish in this reactor turn's successors.
        await deferLater(self.reactor, 0.01, lambda: None)
