"""Redis path benchmark: a writer and its workers through a real redis-server.

Run by hand; it prints a table. Every number is the median of ``--runs`` runs,
and every ratio is computed per run from two measurements taken in that run
(one after the other, alternating which goes first), then the median of those
ratios is shown: the machine is noisy and shared, so lone absolute numbers mean
little. ``--quick`` uses the sizes in brackets.

The script starts its own ``redis-server`` on a free port of 127.0.0.1
(persistence off, no output-buffer limit for pub/sub clients, so that a
subscriber that falls behind is never cut off and every run counts every row).
Each measurement runs in fresh child processes of this script:

- *writer*: `start_writer` (a new SQLite file, no TCP listener) and a
  `RedisReplicationClient` for it; it persists ``m.room.message`` events,
  generated before the clock starts, through `EventsStore.persist_events`, and
  its streamer publishes them.
- *worker*: one or more `RedisReplicationClient`, each with its own
  `ReplicationCommandHandler` (instance ``worker1``, ``worker2``...) following
  `events` (catch-up source: the writer's file, opened read-only) into a data
  handler whose `process_rows` counts rows and notes when each token arrived.
- *bare publisher* / *bare subscriber*, the reference: a Twisted `Protocol`
  writing pre-encoded ``PUBLISH`` requests, and one that sends ``SUBSCRIBE``
  and splits the pushes with a minimal RESP reader. The payloads are the exact
  RDATA lines our writer publishes for the same events (checked: see
  ``check_payloads`` in the writer).

Clocks: writer and worker are separate processes; their timestamps are
``time.monotonic()``, i.e. CLOCK_MONOTONIC, one system-wide clock on Linux.

What is measured:

1. Throughput: the writer persists N [20k; 100k] events in batches of
   ``--batch`` (100) as fast as it can; one worker counts them.
   ours = N / (worker's last row - writer's first write). References, each
   measured in the same run: the bare pair pushing the same N payloads as fast
   as it can (in batches of ``--batch`` per reactor turn), N / (last received -
   first sent); and the rate at which the writer's store accepted the writes
   while publishing (N / time of the writes). No target.
2. Latency, at a steady ``--rate`` (200 rows/s) for ``--seconds`` [5; 20] s,
   one event per `persist_events` call: from the moment `persist_events`
   returns in the writer (the row is committed; the store has already poked
   the streamer) to `on_rdata` for that token in the worker. Reference: the
   bare pair at the same rate, same payloads: from just before the PUBLISH is
   written to the socket to the subscriber's ``dataReceived`` holding it. The
   first second of each run is left out (connections warm up). p50 and p99,
   ours / bare; target p99 within 3x.
3. Writer CPU per row, 20 workers against 1: the writer persists at
   ``--cpu-rate`` (1000 rows/s, in batches of 10) for ``--cpu-seconds``
   [5; 15] s, while 1 or 20 workers (every one a `RedisReplicationClient` with
   its own subscriber connection, all in one separate process) follow it.
   ours = the writer process's ``getrusage(RUSAGE_SELF)`` user+sys, all
   threads, from the first write until every worker has every row, per row;
   20 workers / 1 worker, target within 1.2x.

``--profile DIR`` runs every child under cProfile (one ``.prof`` per child);
the timings then include the profiler's overhead.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

import attrs
from _events import EventSource
from _harness import (
    Child,
    Env,
    Row,
    format_rate,
    format_ratio,
    free_port,
    log,
    median,
    print_table,
    remove_db,
    run_reactor,
    say,
    spread,
    wait_for,
)
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from synapse_replication.commands import RdataCommand, encode_command
from synapse_replication.data_handler import ReplicationDataHandler
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.instance import reader_streams, start_writer
from synapse_replication.redis import RedisReplicationClient, RedisSettings
from synapse_replication.storage import Database, EventsStore, StreamIdGenerator
from synapse_replication.storage.events import EventToPersist

WRITER: Final = "master"
SERVER_NAME: Final = "localhost"  # also the Redis channel
EVENTS: Final = "events"

LATENCY_P99_TARGET: Final = 3.0  # ours / bare, at most
CPU_TARGET: Final = 1.2  # 20 workers / 1 worker, at most
WARM_UP_S: Final = 1.0

CHILD_TIMEOUT_S: Final = 900.0
READY_TIMEOUT_S: Final = 60.0

_SCRIPT: Final = str(Path(__file__).resolve())


# --------------------------------------------------------------------------
# The RDATA lines of the events


def rdata_payload(token: int, event: EventToPersist) -> bytes:
    """The message our writer publishes for `event` at `token`: its RDATA line
    (an ``ev`` row as SQLite returns it: booleans as 0/1), without newline."""
    row = [
        "ev",
        [event.event_id, event.room_id, event.type, None, None, event.relates_to, None, 0, 0],
    ]
    return encode_command(RdataCommand(EVENTS, WRITER, token, row))


# --------------------------------------------------------------------------
# Helpers shared by the children


async def _expect_line(expected: str) -> None:
    line = await deferToThread(sys.stdin.readline)
    if line.strip() != expected:
        raise RuntimeError(f"expected {expected!r} from the parent, got {line!r}")


def _cpu_s() -> float:
    """User + system CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _until(reactor: Any, condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        await deferLater(reactor, 0.01, lambda: None)


async def _sleep_until(reactor: Any, due: float) -> None:
    delay = due - time.monotonic()
    if delay > 0:
        await deferLater(reactor, delay, lambda: None)


async def _connect(reactor: Any, port: int, proto: Protocol) -> None:
    # connectProtocol is untyped in Twisted: given its signature here.
    connect: Callable[[TCP4ClientEndpoint, Protocol], Deferred[Protocol]] = connectProtocol
    await connect(TCP4ClientEndpoint(reactor, "127.0.0.1", port), proto)


def _settings(port: int) -> RedisSettings:
    return RedisSettings(host="127.0.0.1", port=port)


# --------------------------------------------------------------------------
# Child: the writer


async def writer_child(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    """Persist events (as fast as possible, or paced), publishing through Redis.

    args: db, port, events, batch, and ``rate`` (rows/s) for a paced run.
    """
    n: int = args["events"]
    batch: int = args["batch"]
    rate: float | None = args.get("rate")
    events = EventSource().batch(0, n)
    batches = [events[i : i + batch] for i in range(0, n, batch)]
    writer = await start_writer(
        reactor, db_path=args["db"], instance_name=WRITER, server_name=SERVER_NAME, port=None
    )
    client = RedisReplicationClient(
        reactor=reactor,
        handler=writer.handler,
        server_name=SERVER_NAME,
        instance_name=WRITER,
        settings=_settings(args["port"]),
    )
    client.start()
    await _until(
        reactor,
        lambda: client.connection is not None and client.publisher_connected,
        READY_TIMEOUT_S,
        "both Redis connections",
    )
    store = writer.stores.events
    say("READY")
    await _expect_line("GO")

    committed: list[tuple[int, float]] = []
    cpu_start = _cpu_s()
    start = time.monotonic()
    if rate is None:
        for events_batch in batches:
            await store.persist_events(events_batch)
    else:
        interval = batch / rate
        for i, events_batch in enumerate(batches):
            await _sleep_until(reactor, start + i * interval)
            ids = await store.persist_events(events_batch)
            now = time.monotonic()
            committed.extend((token, now) for token in ids)
    end = time.monotonic()
    await writer.streamer.wait_until_idle()
    say("WRITTEN")
    await _expect_line("STOP")
    cpu = _cpu_s() - cpu_start

    # The bare reference publishes `rdata_payload` lines: they must be the
    # bytes this writer published.
    updates, _, _ = await store.get_updates(WRITER, 0, min(n, 200), 1000)
    for (token, row), event in zip(updates, events, strict=False):
        ours = encode_command(RdataCommand(EVENTS, WRITER, token, row))
        if ours != rdata_payload(token, event):
            raise RuntimeError(f"rdata_payload differs from our writer's line: {ours!r}")

    await client.stop()
    await writer.stop()
    return {"start": start, "end": end, "cpu": cpu, "committed": committed}


# --------------------------------------------------------------------------
# Child: the worker(s)


class CountingDataHandler(ReplicationDataHandler):
    """Counts rows; notes when each token arrived (if asked) and the last row."""

    def __init__(self, expected: int, record: bool) -> None:
        super().__init__()
        self.expected = expected
        self.rows = 0
        self.last: float | None = None
        self.times: list[tuple[int, float]] | None = [] if record else None
        self.done: Deferred[None] = Deferred()

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> None:
        now = time.monotonic()
        if self.times is not None:
            self.times.append((token, now))
        self.rows += len(rows)
        if self.rows >= self.expected and self.last is None:
            self.last = now
            self.done.callback(None)


async def worker_child(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    """``workers`` followers of the writer, each with its own Redis connections.

    args: db, port, events (rows to expect), workers, record, timeout.
    """
    n: int = args["events"]
    db = Database.sqlite_reader(args["db"], reactor)
    # Only read: this store's id generator never hands out an id.
    source = EventsStore(db, StreamIdGenerator(WRITER, 0), WRITER, lambda: None)
    handlers: list[CountingDataHandler] = []
    clients: list[RedisReplicationClient] = []
    for i in range(args["workers"]):
        name = f"worker{i + 1}"
        data = CountingDataHandler(n, record=args["record"] and i == 0)
        handler = ReplicationCommandHandler(
            instance_name=name,
            clock=reactor,
            streams=reader_streams(name, {EVENTS: source.get_updates}),
            data_handler=data,
            stream_writers={EVENTS: [WRITER]},
        )
        client = RedisReplicationClient(
            reactor=reactor,
            handler=handler,
            server_name=SERVER_NAME,
            instance_name=name,
            settings=_settings(args["port"]),
        )
        client.start()
        handlers.append(data)
        clients.append(client)
    for data in handlers:
        # The writer's POSITION answers our REPLICATE.
        await wait_for(
            reactor,
            data.wait_for_stream_position(EVENTS, WRITER, 0),
            READY_TIMEOUT_S,
            "the writer's POSITION",
        )
    say("READY")
    for data in handlers:
        await wait_for(reactor, data.done, args["timeout"], f"{n} rows in every worker")
    result = {
        "last": max(data.last or 0.0 for data in handlers),
        "rows": [data.rows for data in handlers],
        "times": handlers[0].times,
    }
    for client in clients:
        await client.stop()
    db.close()
    return result


# --------------------------------------------------------------------------
# Children: the bare reference


class BarePublisher(Protocol):
    """Writes pre-encoded PUBLISH requests; counts the replies (one line each)."""

    def __init__(self) -> None:
        self.replies = 0

    def dataReceived(self, data: bytes) -> None:
        self.replies += data.count(b"\n")


def _publish_request(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n$7\r\nPUBLISH\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
        len(channel),
        channel,
        len(payload),
        payload,
    )


async def bare_publisher_child(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    """args: port, events, batch, and ``rate`` (rows/s) for a paced run."""
    n: int = args["events"]
    batch: int = args["batch"]
    rate: float | None = args.get("rate")
    channel = SERVER_NAME.encode()
    requests = [
        _publish_request(channel, rdata_payload(i + 1, event))
        for i, event in enumerate(EventSource().batch(0, n))
    ]
    proto = BarePublisher()
    await _connect(reactor, args["port"], proto)
    transport = proto.transport
    assert transport is not None
    say("READY")
    await _expect_line("GO")

    sent: list[tuple[int, float]] = []
    start = time.monotonic()
    if rate is None:
        for i in range(0, n, batch):
            for request in requests[i : i + batch]:
                transport.write(request)
            # One reactor turn per batch, as our writer gets per write.
            await deferLater(reactor, 0, lambda: None)
    else:
        interval = batch / rate
        for i in range(0, n, batch):
            await _sleep_until(reactor, start + (i // batch) * interval)
            now = time.monotonic()
            for j in range(i, min(i + batch, n)):
                sent.append((j + 1, now))
                transport.write(requests[j])
    end = time.monotonic()
    await _until(reactor, lambda: proto.replies >= n, 300, f"{n} PUBLISH replies")
    say("WRITTEN")
    await _expect_line("STOP")
    transport.loseConnection()
    return {"start": start, "end": end, "committed": sent}


class BareSubscriber(Protocol):
    """SUBSCRIBEs, then reads pushes (arrays of bulk strings and integers)."""

    def __init__(self, channel: bytes, expected: int, record: bool) -> None:
        self.channel = channel
        self.expected = expected
        self.rows = 0
        self.last: float | None = None
        self.times: list[tuple[int, float]] | None = [] if record else None
        self.subscribed: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()
        self._buf = bytearray()

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(
            b"*2\r\n$9\r\nSUBSCRIBE\r\n$%d\r\n%s\r\n" % (len(self.channel), self.channel)
        )

    def dataReceived(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self._buf
        buf += data
        pos = 0
        while True:
            parsed = _read_push(buf, pos)
            if parsed is None:
                break
            items, pos = parsed
            if items[0] == b"message":
                payload = items[2]
                assert isinstance(payload, bytes)
                if self.times is not None:
                    self.times.append((int(payload.split(b" ", 4)[3]), now))
                self.rows += 1
                if self.rows >= self.expected and self.last is None:
                    self.last = now
                    self.done.callback(None)
            elif items[0] == b"subscribe":
                self.subscribed.callback(None)
        del buf[:pos]


def _read_push(buf: bytearray, pos: int) -> tuple[list[bytes | int], int] | None:
    """One array of bulk strings and integers at `pos`, and where it ends;
    None if it is not all there yet."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    if buf[pos] != 0x2A:  # "*"
        raise ValueError(f"not an array: {bytes(buf[pos : pos + 20])!r}")
    count = int(buf[pos + 1 : end])
    pos = end + 2
    items: list[bytes | int] = []
    for _ in range(count):
        end = buf.find(b"\r\n", pos)
        if end < 0:
            return None
        kind = buf[pos]
        if kind == 0x24:  # "$"
            start = end + 2
            stop = start + int(buf[pos + 1 : end])
            if len(buf) < stop + 2:
                return None
            items.append(bytes(buf[start:stop]))
            pos = stop + 2
        elif kind == 0x3A:  # ":"
            items.append(int(buf[pos + 1 : end]))
            pos = end + 2
        else:
            raise ValueError(f"unexpected item: {bytes(buf[pos : pos + 20])!r}")
    return items, pos


async def bare_subscriber_child(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    """args: port, events, record, timeout."""
    proto = BareSubscriber(SERVER_NAME.encode(), args["events"], args["record"])
    await _connect(reactor, args["port"], proto)
    await wait_for(reactor, proto.subscribed, READY_TIMEOUT_S, "SUBSCRIBE")
    say("READY")
    await wait_for(reactor, proto.done, args["timeout"], f"{args['events']} messages")
    assert proto.transport is not None
    proto.transport.loseConnection()
    return {"last": proto.last, "rows": [proto.rows], "times": proto.times}


_CHILDREN: Final[
    dict[str, Callable[[Any, dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]]
] = {
    "writer": writer_child,
    "worker": worker_child,
    "bare-pub": bare_publisher_child,
    "bare-sub": bare_subscriber_child,
}


def child_main(role: str, args: dict[str, Any]) -> None:
    # Warnings and errors to stderr (the child's log file); stdout talks to
    # the parent.
    globalLogBeginner.beginLoggingTo(
        [
            FilteringLogObserver(
                textFileLogObserver(sys.stderr),
                [LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)],
            )
        ],
        redirectStandardIO=False,
    )
    main = _CHILDREN[role]
    say("RESULT", run_reactor(lambda reactor: main(reactor, args)))


# --------------------------------------------------------------------------
# The parent


@attrs.define
class RedisEnv(Env):
    redis_port: int = 0


def _script(role: str) -> str:
    return _SCRIPT


class RedisProcess:
    """A redis-server on 127.0.0.1: no persistence, no pub/sub buffer limit."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not on PATH (Debian: apt-get install redis-server)")
        self.port = free_port()
        self._log = (workdir / "redis-server.log").open("w")
        command = [
            binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(workdir),
            "--daemonize", "no",
            "--loglevel", "warning",
            "--client-output-buffer-limit", "pubsub 0 0 0",
        ]  # fmt: skip
        self.proc = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.port), timeout=1
            ) as s:
                s.sendall(b"PING\r\n")
                if s.recv(64).startswith(b"+PONG"):
                    break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"redis-server did not start; see {self._log.name}")
            time.sleep(0.05)
        self.version = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, check=False
        ).stdout.split()[2].removeprefix("v=")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def run_pair(
    env: RedisEnv,
    impl: str,
    *,
    events: int,
    batch: int,
    rate: float | None,
    workers: int = 1,
    record: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One measurement: a publisher (our writer or the bare one) and a receiver
    process (our worker(s) or the bare subscriber). The receiver starts once
    the publisher is connected; the publisher starts writing once the receiver
    is ready; it stops (and takes its CPU time) once every row arrived."""
    timeout = 600.0
    port = env.redis_port
    db = env.workdir / "writer.db"
    if impl == "ours":
        remove_db(db)
        pub_role, sub_role = "writer", "worker"
        pub_args: dict[str, Any] = {"db": str(db), "port": port}
        sub_args: dict[str, Any] = {"db": str(db), "port": port, "workers": workers}
    else:
        assert workers == 1
        pub_role, sub_role = "bare-pub", "bare-sub"
        pub_args, sub_args = {"port": port}, {"port": port}
    pub_args |= {"events": events, "batch": batch, "rate": rate}
    sub_args |= {"events": events, "record": record, "timeout": timeout}
    pub = Child(env, pub_role, pub_args)
    sub: Child | None = None
    try:
        pub.expect("READY")
        sub = Child(env, sub_role, sub_args)
        sub.expect("READY")
        pub.send("GO")
        pub.expect("WRITTEN")
        received = sub.expect("RESULT")
        sub.finish()
        pub.send("STOP")
        published = pub.expect("RESULT")
        pub.finish()
    finally:
        pub.kill()
        if sub is not None:
            sub.kill()
    if any(rows != events for rows in received["rows"]):
        raise RuntimeError(f"{impl}: expected {events} rows, counted {received['rows']}")
    return published, received


def latencies_ms(published: dict[str, Any], received: dict[str, Any]) -> list[float]:
    """Per token, write to receipt, in ms; the first WARM_UP_S left out."""
    sent: dict[int, float] = dict(published["committed"])
    start: float = published["start"]
    out = [
        (t - sent[token]) * 1000
        for token, t in received["times"]
        if sent[token] - start >= WARM_UP_S
    ]
    if not out:
        raise RuntimeError("no latency samples after the warm-up")
    return out


def percentile(values: Sequence[float], p: float) -> float:
    """The `p`-th percentile, nearest rank."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(p / 100 * len(ordered))))
    return ordered[rank - 1]


def _order(run: int) -> tuple[str, str]:
    return ("ours", "bare") if run % 2 == 0 else ("bare", "ours")


def measure_throughput(env: RedisEnv, runs: int, events: int, batch: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"ours": [], "bare": [], "store": [], "ratio": [], "store_ratio": []}
    for run in range(runs):
        rates: dict[str, float] = {}
        lag = 0.0
        for impl in _order(run):
            published, received = run_pair(env, impl, events=events, batch=batch, rate=None)
            rates[impl] = events / (received["last"] - published["start"])
            if impl == "ours":
                rates["store"] = events / (published["end"] - published["start"])
                lag = received["last"] - published["end"]
        log(
            f"  throughput run {run + 1}: ours {rates['ours']:,.0f} rows/s, bare "
            f"{rates['bare']:,.0f}, store writes {rates['store']:,.0f} (the worker's "
            f"last row {lag:.2f} s after the last write)"
        )
        for key in ("ours", "bare", "store"):
            out[key].append(rates[key])
        out["ratio"].append(rates["ours"] / rates["bare"])
        out["store_ratio"].append(rates["ours"] / rates["store"])
    return out


def measure_latency(env: RedisEnv, runs: int, rate: float, seconds: float) -> dict[str, list[float]]:
    events = round(rate * seconds)
    out: dict[str, list[float]] = {
        key: [] for key in ("ours_p50", "ours_p99", "bare_p50", "bare_p99", "p50_ratio", "p99_ratio")
    }
    for run in range(runs):
        stats: dict[str, float] = {}
        for impl in _order(run):
            published, received = run_pair(
                env, impl, events=events, batch=1, rate=rate, record=True
            )
            samples = latencies_ms(published, received)
            stats[f"{impl}_p50"] = percentile(samples, 50)
            stats[f"{impl}_p99"] = percentile(samples, 99)
            stats[f"{impl}_max"] = max(samples)
        stats["p50_ratio"] = stats["ours_p50"] / stats["bare_p50"]
        stats["p99_ratio"] = stats["ours_p99"] / stats["bare_p99"]
        log(
            f"  latency run {run + 1}: ours p50 {stats['ours_p50']:.2f} ms p99 "
            f"{stats['ours_p99']:.2f} max {stats['ours_max']:.1f}; bare p50 "
            f"{stats['bare_p50']:.2f} p99 {stats['bare_p99']:.2f} max {stats['bare_max']:.1f}"
        )
        for key in out:
            out[key].append(stats[key])
    return out


def measure_cpu(
    env: RedisEnv, runs: int, rate: float, seconds: float, batch: int, many: int
) -> dict[str, list[float]]:
    events = round(rate * seconds)
    out: dict[str, list[float]] = {"one": [], "many": [], "ratio": []}
    for run in range(runs):
        per_row: dict[int, float] = {}
        for workers in (1, many) if run % 2 == 0 else (many, 1):
            published, _ = run_pair(
                env, "ours", events=events, batch=batch, rate=rate, workers=workers
            )
            per_row[workers] = published["cpu"] / events * 1e6
        log(
            f"  writer CPU run {run + 1}: 1 worker {per_row[1]:.1f} us/row, "
            f"{many} workers {per_row[many]:.1f} us/row"
        )
        out["one"].append(per_row[1])
        out["many"].append(per_row[many])
        out["ratio"].append(per_row[many] / per_row[1])
    return out


# --------------------------------------------------------------------------
# The table


def _ratio(values: Sequence[float]) -> str:
    """A ratio of the table: the median of per-run ratios, with their range
    even when there is one run."""
    return format_ratio(values, "x", range_from=1)


def table_rows(
    throughput: dict[str, list[float]] | None,
    latency: dict[str, list[float]] | None,
    cpu: dict[str, list[float]] | None,
    many: int,
) -> list[Row]:
    rows: list[Row] = []
    if throughput is not None:
        ours = format_rate(throughput["ours"])
        rows.append(
            Row(
                "throughput writer->worker",
                ours,
                f"bare pub/sub {format_rate(throughput['bare'])}",
                _ratio(throughput["ratio"]),
                "-",
                "info",
            )
        )
        rows.append(
            Row(
                "throughput vs store writes",
                ours,
                f"store writes {format_rate(throughput['store'])}",
                _ratio(throughput["store_ratio"]),
                "-",
                "info",
            )
        )
    if latency is not None:
        for p, target in (("p50", None), ("p99", LATENCY_P99_TARGET)):
            ratio = median(latency[f"{p}_ratio"])
            rows.append(
                Row(
                    f"latency write->on_rdata {p}",
                    f"{median(latency[f'ours_{p}']):.2f} ms{spread(latency[f'ours_{p}'])}",
                    f"bare PUBLISH->message {median(latency[f'bare_{p}']):.2f} ms"
                    f"{spread(latency[f'bare_{p}'])}",
                    _ratio(latency[f"{p}_ratio"]),
                    "-" if target is None else f"<= {target:g}x",
                    "info" if target is None else ("PASS" if ratio <= target else "BELOW"),
                )
            )
    if cpu is not None:
        ratio = median(cpu["ratio"])
        rows.append(
            Row(
                "writer CPU per row",
                f"{many} workers {median(cpu['many']):.1f} us{spread(cpu['many'])}",
                f"1 worker {median(cpu['one']):.1f} us{spread(cpu['one'])}",
                _ratio(cpu["ratio"]),
                f"<= {CPU_TARGET:g}x",
                "PASS" if ratio <= CPU_TARGET else "BELOW",
            )
        )
    return rows


# --------------------------------------------------------------------------
# Main


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 runs")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 5, quick 3)")
    parser.add_argument("--events", type=int, help="events of the throughput run")
    parser.add_argument("--batch", type=int, default=100, help="events per write (throughput)")
    parser.add_argument("--rate", type=float, default=200.0, help="rows/s of the latency run")
    parser.add_argument("--seconds", type=float, help="length of the latency run")
    parser.add_argument("--cpu-rate", type=float, default=1000.0, help="rows/s of the CPU run")
    parser.add_argument("--cpu-batch", type=int, default=10, help="events per write (CPU run)")
    parser.add_argument("--cpu-seconds", type=float, help="length of the CPU run")
    parser.add_argument("--workers", type=int, default=20, help="workers of the CPU run")
    parser.add_argument(
        "--only",
        choices=("throughput", "latency", "cpu"),
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument("--workdir", type=Path, help="where files go (default: a temp dir)")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="cProfile every child into DIR")
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "JSON"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)

    if ns.child:
        child_main(ns.child[0], json.loads(ns.child[1]))
        return 0

    runs: int = ns.runs or (3 if ns.quick else 5)
    events: int = ns.events or (20_000 if ns.quick else 100_000)
    seconds: float = ns.seconds or (5.0 if ns.quick else 20.0)
    cpu_seconds: float = ns.cpu_seconds or (5.0 if ns.quick else 15.0)
    parts = set(ns.only or ("throughput", "latency", "cpu"))
    if seconds <= WARM_UP_S:
        parser.error(f"--seconds must be more than the {WARM_UP_S} s warm-up")

    workdir: Path = ns.workdir or Path(tempfile.mkdtemp(prefix="redis-path-"))
    workdir.mkdir(parents=True, exist_ok=True)
    if ns.profile is not None:
        ns.profile.mkdir(parents=True, exist_ok=True)
    env = RedisEnv(
        workdir=workdir,
        profile_dir=ns.profile,
        script=_script,
        child_timeout_s=CHILD_TIMEOUT_S,
        close_stdin_on_finish=False,
    )
    redis = RedisProcess(workdir)
    env.redis_port = redis.port
    try:
        print(
            f"redis_path.py: {platform.node()}, {os.cpu_count()} CPUs, load "
            f"{os.getloadavg()[0]:.2f}; Python {platform.python_version()}, "
            f"redis-server {redis.version}; {runs} runs each; medians, ±half the "
            f"min-max spread, ratios per run (min-max)"
        )
        print(
            f"  throughput: {events:,} events in writes of {ns.batch}; latency: "
            f"{ns.rate:g} rows/s for {seconds:g} s (first {WARM_UP_S:g} s left out); "
            f"CPU: {ns.cpu_rate:g} rows/s in writes of {ns.cpu_batch} for "
            f"{cpu_seconds:g} s, 1 vs {ns.workers} workers"
        )
        throughput = latency = cpu = None
        if "throughput" in parts:
            log("throughput...")
            throughput = measure_throughput(env, runs, events, ns.batch)
        if "latency" in parts:
            log("latency...")
            latency = measure_latency(env, runs, ns.rate, seconds)
        if "cpu" in parts:
            log("writer CPU...")
            cpu = measure_cpu(env, runs, ns.cpu_rate, cpu_seconds, ns.cpu_batch, ns.workers)
    finally:
        redis.stop()
        if ns.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print()
    print_table(table_rows(throughput, latency, cpu, ns.workers))
    return 0


if __name__ == "__main__":
    sys.exit(main())
