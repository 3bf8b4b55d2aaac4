"""Pipeline benchmark: rows/s from a writer's store to a worker's data handler.

Run by hand; it prints a table. Every number is the median of ``--runs`` runs
and every ratio is computed per run from measurements taken in that run, then
the median of those ratios is shown: the machine is noisy and shared, so lone
absolute times mean little.

What is measured (``--quick`` uses the small sizes in brackets):

1. Live pipeline, two processes over TCP on 127.0.0.1. The writer process
   (`start_writer`, SQLite file) persists N ``m.room.message`` events
   [20k; 200k by default] in batches of ``--batch`` through
   `EventsStore.persist_events`, generated before the clock starts; its
   streamer publishes them as RDATA while the writes go on. The worker process
   (`make_worker` + `connect_worker`, its catch-up source reading the writer's
   file) counts rows in its data handler's `process_rows`. Times come from
   ``time.monotonic()``, which is one system-wide clock on Linux. Reported:
   - end to end: N / (worker's last row - writer's first write), against the
     rate of the writer's write loop (N / time of the writes, streaming going
     on meanwhile) in the same run: how much of the store's write speed
     reaches the worker;
   - receive: N / (worker's last row - worker's first row).
2. Replay: the exact bytes our writer sends for N events [20k; 200k],
   captured once from a real writer over TCP (the ``SERVER`` and first
   ``PING`` lines, the ``POSITION events`` line and every ``RDATA events``
   line; the ``POSITION`` lines of the other streams are left out), are sent
   over TCP on 127.0.0.1 by this process into a receiver process, one of:
   (a) ours: `make_worker` + `connect_worker`, i.e. `ClientReplicationProtocol`
   + `ReplicationCommandHandler` + a `ReplicationDataHandler` whose
   `process_rows` counts;
   (b) Synapse's: `ClientReplicationStreamProtocol` with Synapse's own
   `ReplicationCommandHandler`, built on a minimal fake HomeServer (no
   database; every stream of Synapse's `STREAMS_MAP` is constructed, stores
   are stubs, the events id generator is a dict that the counting data
   handler advances as Synapse's store would), its per-stream
   `BackgroundQueue`, `run_as_background_process`, logcontexts and prometheus
   counters all real; the data handler's ``async on_rdata`` counts;
   (c) bare: a `LineOnlyReceiver` that splits each RDATA line and
   ``orjson.loads`` its row, the ceiling for any Python receiver.
   Rate: rows / (last row counted - first row counted), in the receiver.
   All three run under the same interpreter (Synapse's venv when present).
3. Catch-up: a worker 1M [100k] rows behind (and, with ``--big``, one 5M
   rows behind), in its own process, reading an SQLite file of that many events built once with
   `persist_events` (10k per call) and cached in ``--workdir``: a POSITION
   makes `ReplicationCommandHandler` fetch every row through
   `EventsStore.get_updates` (pages of `HandlerLimits.catch_up_row_count`
   rows, i.e. 500 ``ev`` rows per events query) into a counting data handler.
   Reference: a bare ``sqlite3`` loop running the same events query
   (``_NEW_EVENTS_SQL`` of storage/events.py) with the same 500-row pages and
   ``fetchall``, in its own process, same file, page cache warmed first.
   The catch-up process's peak RSS (``VmHWM``; see `_peak_rss_kib`) is
   reported at 1M and, with ``--big``, at 5M behind.

The receivers that are not ours live in pipeline_receivers.py, which never
imports this package: ours and Synapse's register prometheus metrics of the
same names in the global registry, so the two cannot be imported into one
process. Synapse's receive path is measured twice: (b) as above, which is the
target's reference, and with Synapse's protocol class feeding a minimal
synchronous handler (parse_row, batching, token check; no command queue), a
lower bound of Synapse's cost. Without Synapse's venv the replay compares ours
with the bare receiver only and says how to make the venv (HOW_TO_COMPARE). ``--profile DIR`` runs every
child under cProfile and leaves one ``.prof`` file per child in DIR.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, Final

from _events import SEED, EventSource
from _harness import Child, Env, Row
from _harness import format_rate as _rate
from _harness import format_ratio as _ratio
from _harness import log as _log
from _harness import median as _median
from _harness import print_table
from _harness import remove_db as _remove_db
from _harness import run_child, run_reactor, say, wait_for
from pipeline_receivers import (
    EVENTS,
    FACTORIES,
    SERVER_NAME,
    WORKER,
    WRITER,
    RowCounter,
)
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from zope.interface import implementer

from synapse_replication.commands import Command, PositionCommand
from synapse_replication.data_handler import ReplicationDataHandler
from synapse_replication.handler import HandlerLimits, ReplicationCommandHandler
from synapse_replication.instance import (
    connect_worker,
    make_worker,
    reader_streams,
    start_writer,
)
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.storage import (
    SCHEMA_VERSION,
    Database,
    EventsStore,
    StreamIdGenerator,
    open_stores,
)
from synapse_replication.storage.events import _NEW_EVENTS_SQL
from synapse_replication.streams import StreamUpdateResult

SYNAPSE_VERSION: Final = "1.163.2"
DEFAULT_SYNAPSE_PYTHON: Final = "/tmp/synapse-venv/bin/python"
HOW_TO_COMPARE: Final = f"""\
Synapse comparison skipped: no Python with matrix-synapse and this package. Make one:
    python3 -m venv /tmp/synapse-venv
    /tmp/synapse-venv/bin/pip install matrix-synapse=={SYNAPSE_VERSION} orjson -e .
then rerun (or pass --synapse-python /path/to/venv/bin/python)."""

REPLAY_TARGET: Final = 4.0  # ours / Synapse's classes
CATCH_UP_TARGET: Final = 0.5  # ours / bare SELECT
RSS_TARGET: Final = 0.10  # change of peak RSS from 1M to 5M behind, either way

CHILD_TIMEOUT_S: Final = 1800.0
BUILD_BATCH: Final = 10_000

_SCRIPT: Final = str(Path(__file__).resolve())
_RECEIVERS_SCRIPT: Final = str(Path(__file__).resolve().with_name("pipeline_receivers.py"))
# Roles run by pipeline_receivers.py, which never imports this package.
_FOREIGN_ROLES: Final = frozenset(FACTORIES)


def _script(role: str) -> str:
    """The script that plays `role`."""
    return _RECEIVERS_SCRIPT if role in _FOREIGN_ROLES else _SCRIPT


# --------------------------------------------------------------------------
# Helpers shared by the children


def _peak_rss_kib() -> int:
    """Peak resident set size of this process, in KiB.

    ``VmHWM`` from /proc on Linux: ``ru_maxrss`` survives ``execve`` and so
    starts at the parent's size when we forked (this script's parent holds
    the replay bytes and may have built a database). Elsewhere ``ru_maxrss``
    (KiB on Linux, bytes on macOS), with that caveat.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss // 1024 if sys.platform == "darwin" else rss


class CountingDataHandler(ReplicationDataHandler):
    """Our data handler, counting the rows given to `process_rows`."""

    def __init__(
        self, counter: RowCounter, initial_positions: dict[tuple[str, str], int] | None = None
    ) -> None:
        super().__init__(initial_positions)
        self.counter = counter

    def process_rows(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> None:
        self.counter.add(len(rows))


@implementer(IReplicationConnection)
class NullConnection:
    """A connection that goes nowhere, to hand a POSITION to a handler."""

    def send_command(self, cmd: Command) -> None:
        pass

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return "null connection"

    def peer_name(self) -> str | None:
        return WRITER


async def _no_catch_up(
    instance_name: str, from_token: int, upto_token: int, target_row_count: int
) -> StreamUpdateResult:
    """The replay worker's source: it starts at the writer's position, so it
    never needs one; a call would mean rows were dropped."""
    raise AssertionError(f"unexpected catch-up from {from_token} to {upto_token}")


def reader_store(reactor: Any, path: str) -> tuple[Database, EventsStore]:
    """A worker's read-only view of the writer's file, as the worker service
    opens it (app.py): its store only reads, its id generator is never used."""
    db = Database.sqlite_reader(path, reactor)
    return db, EventsStore(db, StreamIdGenerator(WRITER, 0), WRITER, lambda: None)


# --------------------------------------------------------------------------
# Children: the live writer and worker


async def live_writer(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    n: int = args["events"]
    batch: int = args["batch"]
    source = EventSource()
    batches = [source.batch(i, min(batch, n - i)) for i in range(0, n, batch)]
    writer = await start_writer(
        reactor, db_path=args["db"], instance_name=WRITER, server_name=SERVER_NAME
    )
    say("PORT", writer.listening_port())
    if (await deferToThread(sys.stdin.readline)).strip() != "GO":
        raise RuntimeError("expected GO")
    start = time.monotonic()
    for events in batches:
        await writer.stores.events.persist_events(events)
    end = time.monotonic()
    await writer.streamer.wait_until_idle()
    if (await deferToThread(sys.stdin.readline)).strip() != "STOP":
        raise RuntimeError("expected STOP")
    await writer.stop()
    return {"write_start": start, "write_end": end, "peak_rss_kib": _peak_rss_kib()}


async def live_worker(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    n: int = args["events"]
    # The worker's catch-up source is the writer's own file, read-only, as in
    # the embedded default; a fresh writer announces position 0, so it is unused.
    db, events_store = reader_store(reactor, args["db"])
    counter = RowCounter(n)
    data = CountingDataHandler(counter)
    worker = make_worker(
        reactor,
        instance_name=WORKER,
        server_name=SERVER_NAME,
        sources={EVENTS: events_store.get_updates},
        data_handler=data,
        stream_writers={EVENTS: [WRITER]},
    )
    connect_worker(reactor, worker, "127.0.0.1", args["port"])
    await wait_for(reactor, data.wait_for_stream_position(EVENTS, WRITER, 0), 60, "POSITION")
    say("READY")
    await wait_for(reactor, counter.done, args["timeout"], f"{n} rows")
    worker.stop()
    db.close()
    return {**counter.result(), "peak_rss_kib": _peak_rss_kib()}


# --------------------------------------------------------------------------
# Child: capture the bytes a writer sends


class _Capture(Protocol):
    _MARKER: Final = b"\nRDATA events "

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.rdata_lines = 0
        self._tail = b""

    def connectionMade(self) -> None:
        # No PING: the writer would then time us out after 25 s of silence.
        assert self.transport is not None
        self.transport.write(b"NAME capture\nREPLICATE \n")

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        # The tail is one byte shorter than the marker, so no marker is
        # counted twice.
        joined = self._tail + data
        self.rdata_lines += joined.count(self._MARKER)
        self._tail = joined[-(len(self._MARKER) - 1) :]

    def has(self, marker: bytes) -> bool:
        return marker in b"".join(self.chunks)


def _keep_line(line: bytes) -> bool:
    """Lines of the replay: everything for `events`, and the greeting."""
    name, _, rest = line.partition(b" ")
    if name in (b"RDATA", b"POSITION"):
        return rest.startswith(b"events ")
    return name in (b"SERVER", b"PING")


async def capture(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    n: int = args["events"]
    batch: int = args["batch"]
    source = EventSource()
    writer = await start_writer(
        reactor, db_path=args["db"], instance_name=WRITER, server_name=SERVER_NAME
    )
    proto = _Capture()
    factory = ClientFactory.forProtocol(lambda: proto)
    reactor.connectTCP("127.0.0.1", writer.listening_port(), factory)
    for _ in range(600):
        if proto.has(b"POSITION events "):
            break
        await deferLater(reactor, 0.05)
    else:
        raise RuntimeError("no POSITION from the writer")
    for i in range(0, n, batch):
        await writer.stores.events.persist_events(source.batch(i, min(batch, n - i)))
    for _ in range(int(args["timeout"] / 0.05)):
        # Each event has its own token: one RDATA line per event (the first
        # line of the stream has no leading newline but is SERVER).
        if proto.rdata_lines >= n and b"".join(proto.chunks).endswith(b"\n"):
            break
        await deferLater(reactor, 0.05)
    else:
        raise RuntimeError(f"captured {proto.rdata_lines} of {n} RDATA lines")
    await writer.stop()
    lines = b"".join(proto.chunks).split(b"\n")
    kept: list[bytes] = []
    pings = 0
    for line in lines:
        if not line or not _keep_line(line):
            continue
        if line.startswith(b"PING "):
            pings += 1
            if pings > 1:
                continue
        kept.append(line)
    rdata = sum(1 for line in kept if line.startswith(b"RDATA "))
    Path(args["out"]).write_bytes(b"\n".join(kept) + b"\n")
    return {"lines": len(kept), "rdata": rdata}


# --------------------------------------------------------------------------
# Children: the replay receivers


async def recv_ours(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    counter = RowCounter(args["rows"])
    worker = make_worker(
        reactor,
        instance_name=WORKER,
        server_name=SERVER_NAME,
        sources={EVENTS: _no_catch_up},
        data_handler=CountingDataHandler(counter),
        stream_writers={EVENTS: [WRITER]},
    )
    connect_worker(reactor, worker, "127.0.0.1", args["port"])
    await wait_for(reactor, counter.done, args["timeout"], "rows")
    worker.stop()
    return counter.result()


# --------------------------------------------------------------------------
# Children: catch-up


async def catch_up_ours(reactor: Any, args: dict[str, Any]) -> dict[str, Any]:
    db, events_store = reader_store(reactor, args["db"])
    ((upto,),) = await db.execute("max_token", "SELECT MAX(stream_ordering) FROM events")
    counter = RowCounter(args["rows"])
    data = CountingDataHandler(counter, {(EVENTS, WRITER): 0})
    handler = ReplicationCommandHandler(
        instance_name=WORKER,
        clock=reactor,
        streams=reader_streams(WORKER, {EVENTS: events_store.get_updates}),
        data_handler=data,
        stream_writers={EVENTS: [WRITER]},
        limits=HandlerLimits(catch_up_row_count=args["page"]),
    )
    connection = NullConnection()
    handler.new_connection(connection)
    rss_before = _peak_rss_kib()
    start = time.monotonic()
    start_cpu = time.process_time()
    handler.on_position(connection, PositionCommand(EVENTS, WRITER, upto, upto))
    # The row count, not wait_for_stream_position: a waiter makes the data
    # handler scan its waiters after every token, which is not ours to time.
    await wait_for(reactor, counter.done, args["timeout"], "catch-up")
    end = time.monotonic()
    cpu = time.process_time() - start_cpu
    db.close()
    return {
        "rows": counter.rows,
        "seconds": end - start,
        "cpu": cpu,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _peak_rss_kib(),
    }


def catch_up_bare(args: dict[str, Any]) -> dict[str, Any]:
    """The events query alone, in pages of the size ours asks for."""
    conn = sqlite3.connect(args["db"])
    (upto,) = conn.execute("SELECT MAX(stream_ordering) FROM events").fetchone()
    sql = _NEW_EVENTS_SQL + " LIMIT ?"
    per_query = max(1, args["page"] // 2)  # as EventsStore.get_updates splits it
    rss_before = _peak_rss_kib()
    start = time.monotonic()
    start_cpu = time.process_time()
    token = 0
    rows = 0
    while True:
        page = conn.execute(sql, (token, upto, WRITER, per_query)).fetchall()
        rows += len(page)
        if len(page) < per_query:
            break
        token = page[-1][0]
    end = time.monotonic()
    cpu = time.process_time() - start_cpu
    conn.close()
    return {
        "rows": rows,
        "seconds": end - start,
        "cpu": cpu,
        "rss_before_kib": rss_before,
        "peak_rss_kib": _peak_rss_kib(),
    }


_REACTOR_CHILDREN: Final[
    dict[str, Callable[[Any, dict[str, Any]], Coroutine[Any, Any, dict[str, Any]]]]
] = {
    "live-writer": live_writer,
    "live-worker": live_worker,
    "capture": capture,
    "recv-ours": recv_ours,
    "catch-up-ours": catch_up_ours,
}


def child_main(role: str, args: dict[str, Any]) -> None:
    if role == "catch-up-bare":
        result = catch_up_bare(args)
    else:
        main = _REACTOR_CHILDREN[role]
        result = run_reactor(lambda reactor: main(reactor, args))
    say("RESULT", result)


# --------------------------------------------------------------------------
# The parent: children, the replay sender, caches


def ensure_capture(env: Env, events: int, batch: int, rebuild: bool) -> Path:
    out = env.workdir / f"capture-{events}-{SEED}.rdata"
    if out.exists() and not rebuild:
        return out
    _log(f"capturing the RDATA of {events} events from a real writer...")
    db = env.workdir / "capture.db"
    _remove_db(db)
    tmp = out.with_suffix(".tmp")
    result = run_child(
        env,
        "capture",
        {"db": str(db), "events": events, "batch": batch, "out": str(tmp), "timeout": 1200},
    )
    _remove_db(db)
    if result["rdata"] != events:
        raise RuntimeError(f"captured {result['rdata']} RDATA lines for {events} events")
    tmp.rename(out)
    return out


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never waits on the reactor (an inline database)."""
    d = Deferred.fromCoroutine(coro)
    outcome: list[Any] = []
    d.addBoth(outcome.append)
    assert outcome, "coroutine waited on the reactor"
    if hasattr(outcome[0], "raiseException"):
        outcome[0].raiseException()
    return outcome[0]


def ensure_db(env: Env, events: int, rebuild: bool) -> Path:
    """An SQLite file holding `events` events written by `persist_events`."""
    path = env.workdir / f"events-{events}-{SEED}-v{SCHEMA_VERSION}.db"
    if path.exists() and not rebuild:
        return path
    tmp = path.with_suffix(".building")
    _remove_db(tmp)
    _log(f"building {path.name} ({events:,} events through persist_events)...")
    db = Database.sqlite_inline(str(tmp))
    stores = _drive(open_stores(db, WRITER, lambda: None))
    source = EventSource()
    start = time.monotonic()
    for i in range(0, events, BUILD_BATCH):
        _drive(stores.events.persist_events(source.batch(i, min(BUILD_BATCH, events - i))))
        if i and i % (BUILD_BATCH * 50) == 0:
            rate = i / (time.monotonic() - start)
            _log(f"  {i:,} events ({rate:,.0f}/s)")
    # Closing the last connection checkpoints the WAL into the file.
    stores.close()
    _remove_db(path)
    tmp.rename(path)
    return path


class BlobServer:
    """Listens on 127.0.0.1 and sends `blob` to the first client, as fast as it
    reads; the connection stays open until `close`."""

    def __init__(self, blob: bytes) -> None:
        self._blob = blob
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._sock.getsockname()[1]
        self._conn: socket.socket | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._sock.settimeout(120)
            conn, _ = self._sock.accept()
            self._conn = conn
            conn.sendall(self._blob)
        except BaseException as e:  # reported by close()
            self._error = e

    def close(self) -> None:
        self._thread.join(timeout=60)
        if self._conn is not None:
            self._conn.close()
        self._sock.close()
        if self._error is not None:
            raise RuntimeError(f"replay sender failed: {self._error!r}")


# --------------------------------------------------------------------------
# The measurements


def measure_live(env: Env, events: int, batch: int) -> dict[str, float]:
    db = env.workdir / "live.db"
    _remove_db(db)
    writer = Child(env, "live-writer", {"db": str(db), "events": events, "batch": batch})
    worker: Child | None = None
    try:
        port = writer.expect("PORT")
        worker = Child(
            env,
            "live-worker",
            {"db": str(db), "port": port, "events": events, "timeout": 1200},
        )
        worker.expect("READY")
        writer.send("GO")
        received = worker.expect("RESULT")
        worker.finish()
        writer.send("STOP")
        written = writer.expect("RESULT")
        writer.finish()
    finally:
        writer.kill()
        if worker is not None:
            worker.kill()
    _remove_db(db)
    if received["rows"] != events:
        raise RuntimeError(f"live worker got {received['rows']} rows, expected {events}")
    write_s = written["write_end"] - written["write_start"]
    e2e_s = received["last"] - written["write_start"]
    return {
        "persist": events / write_s,
        "e2e": events / e2e_s,
        "receive": events / (received["last"] - received["first"]),
        "lag_ms": (received["last"] - written["write_end"]) * 1000,
        "ratio": write_s / e2e_s,
    }


def measure_replay(env: Env, impl: str, blob: bytes, rows: int, python: str) -> dict[str, float]:
    server = BlobServer(blob)
    try:
        result = run_child(
            env,
            f"recv-{impl}",
            {"port": server.port, "rows": rows, "timeout": 600},
            python=python,
        )
    finally:
        server.close()
    if result["rows"] != rows:
        raise RuntimeError(f"{impl} receiver counted {result['rows']} rows, expected {rows}")
    return {"rate": rows / (result["last"] - result["first"]), "cpu_rate": rows / result["cpu"]}


def measure_catch_up(env: Env, impl: str, db: Path, rows: int, page: int) -> dict[str, float]:
    result = run_child(
        env,
        f"catch-up-{impl}",
        {"db": str(db), "rows": rows, "page": page, "timeout": 3600},
    )
    if result["rows"] != rows:
        raise RuntimeError(f"{impl} catch-up delivered {result['rows']} rows, expected {rows}")
    return {
        "rate": rows / result["seconds"],
        "cpu_rate": rows / result["cpu"],
        "rss_mib": result["peak_rss_kib"] / 1024,
        "rss_before_mib": result["rss_before_kib"] / 1024,
    }


def _rotate(items: Sequence[str], run: int) -> list[str]:
    k = run % len(items)
    return [*items[k:], *items[:k]]


# --------------------------------------------------------------------------
# The table


def _status(ratio: float, target: float) -> str:
    return "PASS" if ratio >= target else "BELOW"


# --------------------------------------------------------------------------
# Main


def _synapse_python(requested: str | None) -> str | None:
    candidate = requested or os.environ.get("SYNAPSE_PYTHON") or DEFAULT_SYNAPSE_PYTHON
    if not Path(candidate).exists():
        return None
    check = subprocess.run(
        [candidate, "-c", "import synapse, synapse_replication, orjson"],
        capture_output=True,
        check=False,
    )
    if check.returncode != 0:
        return None
    return candidate


_VERSIONS_SCRIPT: Final = """
import platform
from importlib import metadata
versions = [f"Python {platform.python_version()}"]
for dist in ("Twisted", "msgspec", "orjson", "matrix-synapse"):
    try:
        versions.append(f"{dist} {metadata.version(dist)}")
    except metadata.PackageNotFoundError:
        versions.append(f"{dist} absent")
print(", ".join(versions))
"""


def _versions(python: str) -> str:
    return subprocess.run(
        [python, "-c", _VERSIONS_SCRIPT], capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 runs")
    parser.add_argument("--big", action="store_true", help="also catch up 5M rows behind")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 5, quick 3)")
    parser.add_argument("--live-events", type=int, help="events of the live run")
    parser.add_argument("--replay-events", type=int, help="events of the replayed stream")
    parser.add_argument("--catch-up-events", type=int, help="rows behind of the catch-up")
    parser.add_argument("--big-events", type=int, default=5_000_000, help="rows behind with --big")
    parser.add_argument("--batch", type=int, default=100, help="events per persist_events call")
    parser.add_argument(
        "--page",
        type=int,
        default=HandlerLimits().catch_up_row_count,
        help="catch-up rows per update-function call",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "synapse-replication-pipeline",
        help="where databases and captures are cached",
    )
    parser.add_argument("--rebuild", action="store_true", help="ignore cached files")
    parser.add_argument(
        "--synapse-python", help=f"default $SYNAPSE_PYTHON or {DEFAULT_SYNAPSE_PYTHON}"
    )
    parser.add_argument(
        "--only",
        choices=("live", "replay", "catch-up"),
        action="append",
        help="run only these parts (repeatable)",
    )
    parser.add_argument(
        "--profile", type=Path, metavar="DIR", help="cProfile every child into DIR"
    )
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "JSON"), help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)

    if ns.child:
        child_main(ns.child[0], json.loads(ns.child[1]))
        return 0

    runs: int = ns.runs or (3 if ns.quick else 5)
    live_events: int = ns.live_events or (20_000 if ns.quick else 200_000)
    replay_events: int = ns.replay_events or (20_000 if ns.quick else 200_000)
    catch_up_events: int = ns.catch_up_events or (100_000 if ns.quick else 1_000_000)
    parts = set(ns.only or ("live", "replay", "catch-up"))

    ns.workdir.mkdir(parents=True, exist_ok=True)
    if ns.profile is not None:
        ns.profile.mkdir(parents=True, exist_ok=True)
    synapse_python = _synapse_python(ns.synapse_python)
    env = Env(
        workdir=ns.workdir,
        profile_dir=ns.profile,
        script=_script,
        child_timeout_s=CHILD_TIMEOUT_S,
        close_stdin_on_finish=True,
    )
    # The replay receivers all run under one interpreter, Synapse's if any.
    replay_python = synapse_python or sys.executable

    print(f"pipeline.py: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}")
    print(f"  ours: {sys.executable}: {_versions(sys.executable)}")
    if synapse_python is not None:
        print(f"  replay receivers: {synapse_python}: {_versions(synapse_python)}")
    print(f"  {runs} runs each; medians, ±half the min-max spread; workdir {ns.workdir}")
    print()

    table: list[Row] = []
    notes: list[str] = []

    if "live" in parts:
        _log(f"live: {live_events:,} events, batches of {ns.batch}...")
        live = [measure_live(env, live_events, ns.batch) for _ in range(runs)]
        e2e = [r["e2e"] for r in live]
        table.append(
            Row(
                f"live {live_events // 1000}k: store -> worker on_rdata, end to end",
                _rate(e2e),
                f"{_rate([r['persist'] for r in live])} (writer's write loop)",
                _ratio([r["ratio"] for r in live]),
                "-",
                "info",
            )
        )
        table.append(
            Row(
                "live: worker receive (first -> last row)",
                _rate([r["receive"] for r in live]),
                "-",
                "-",
                "-",
                "info",
            )
        )
        notes.append(
            f"live: worker's last row came {_median([r['lag_ms'] for r in live]):.0f} ms "
            "(median) after the writer's last commit"
        )

    if "replay" in parts:
        capture_path = ensure_capture(env, replay_events, ns.batch, ns.rebuild)
        blob = capture_path.read_bytes()
        impls = ["ours", "bare"] + (["synapse", "synapse-min"] if synapse_python else [])
        _log(
            f"replay: {replay_events:,} rows ({len(blob) / 1e6:.1f} MB) into {', '.join(impls)}..."
        )
        replays: dict[str, list[dict[str, float]]] = {impl: [] for impl in impls}
        for run in range(runs):
            for impl in _rotate(impls, run):
                replays[impl].append(measure_replay(env, impl, blob, replay_events, replay_python))
        label = f"replay {replay_events // 1000}k RDATA"
        references: list[tuple[str, str, float | None]] = [("bare", "bare orjson receiver", None)]
        if synapse_python:
            references[:0] = [
                ("synapse", "Synapse's classes", REPLAY_TARGET),
                ("synapse-min", "Synapse protocol + parse_row only", None),
            ]
        else:
            table.append(
                Row(
                    f"{label}: ours vs Synapse's classes",
                    "-",
                    "-",
                    "-",
                    f">= {REPLAY_TARGET:g}x",
                    "skipped",
                )
            )
            notes.append(HOW_TO_COMPARE)
        ours = [r["rate"] for r in replays["ours"]]
        for impl, name, target in references:
            theirs = [r["rate"] for r in replays[impl]]
            ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
            ratio = _median(ratios)
            cpu_ratio = _median(
                [
                    o["cpu_rate"] / t["cpu_rate"]
                    for o, t in zip(replays["ours"], replays[impl], strict=True)
                ]
            )
            table.append(
                Row(
                    f"{label}: ours vs {name}",
                    _rate(ours),
                    _rate(theirs),
                    _ratio(ratios, "x"),
                    "-" if target is None else f">= {target:g}x",
                    "info" if target is None else _status(ratio, target),
                )
            )
            notes.append(f"{label}: ours vs {name}: {cpu_ratio:.2f}x in rows per CPU-second")

    if "catch-up" in parts:
        sizes = [catch_up_events] + ([ns.big_events] if ns.big else [])
        rss: dict[int, list[float]] = {}
        for size in sizes:
            db = ensure_db(env, size, ns.rebuild)
            size_runs = runs if size <= 1_000_000 else min(runs, 3)
            _log(f"catch-up: {size:,} rows behind, {size_runs} runs...")
            measure_catch_up(env, "bare", db, size, ns.page)  # warm the page cache
            results: dict[str, list[dict[str, float]]] = {"ours": [], "bare": []}
            for run in range(size_runs):
                for impl in _rotate(["ours", "bare"], run):
                    results[impl].append(measure_catch_up(env, impl, db, size, ns.page))
            ours_rates = [r["rate"] for r in results["ours"]]
            bare_rates = [r["rate"] for r in results["bare"]]
            ratios = [o / b for o, b in zip(ours_rates, bare_rates, strict=True)]
            cpu_ratios = [
                o["cpu_rate"] / b["cpu_rate"]
                for o, b in zip(results["ours"], results["bare"], strict=True)
            ]
            label = f"{size / 1e6:g}M" if size >= 1_000_000 else f"{size // 1000}k"
            table.append(
                Row(
                    f"catch-up {label} behind: handler vs bare SELECT",
                    _rate(ours_rates),
                    _rate(bare_rates),
                    _ratio(ratios),
                    f">= {CATCH_UP_TARGET:g}",
                    _status(_median(ratios), CATCH_UP_TARGET),
                )
            )
            rss[size] = [r["rss_mib"] for r in results["ours"]]
            before = _median([r["rss_before_mib"] for r in results["ours"]])
            bare_rss = _median([r["rss_mib"] for r in results["bare"]])
            notes.append(
                f"catch-up {label}: handler vs bare SELECT: {_median(cpu_ratios):.2f} in rows "
                "per CPU-second (ours uses two threads: reactor and database)"
            )
            notes.append(
                f"catch-up {label}: worker RSS {before:.0f} MiB before, "
                f"{_median(rss[size]):.0f} MiB peak (bare SELECT process: {bare_rss:.0f} MiB peak)"
            )
        small = _median(rss[catch_up_events])
        if ns.big:
            big = _median(rss[ns.big_events])
            growth = big / small - 1
            table.append(
                Row(
                    f"catch-up peak RSS: {ns.big_events / 1e6:g}M vs {catch_up_events / 1e6:g}M behind",
                    f"{big:.0f} MiB",
                    f"{small:.0f} MiB",
                    f"{growth * 100:+.1f}%",
                    f"within ±{RSS_TARGET * 100:.0f}%",
                    "PASS" if abs(growth) <= RSS_TARGET else "BELOW",
                )
            )
        else:
            table.append(
                Row(
                    f"catch-up peak RSS at {catch_up_events / 1e6:g}M behind",
                    f"{small:.0f} MiB",
                    "-",
                    "-",
                    "run --big",
                    "info",
                )
            )

    print_table(table)
    if notes:
        print()
        for note in notes:
            print(note)
    print(f"\nload at the end: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
