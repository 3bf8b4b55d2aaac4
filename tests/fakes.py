"""Fakes shared by the handler, streamer and data handler tests.

- `FakeConnection`: an `IReplicationConnection` that records what is sent on it
  and whether it was closed.
- `FakeStreamSource`: an in-memory source for a stream (rows per writer, a
  current-token function and an update function keeping the update-function
  contract), with knobs to make calls fail or wait.
- `BlockingDataHandler`: a recording data handler whose `on_rdata` can be made
  to wait, to test per-stream ordering.
- `LogCapture`: collects log events so tests can check what was reported.
- `TypedTestCase`: trial's SynchronousTestCase with typed assertion signatures.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from synapse_replication._json import JsonValue
from synapse_replication.commands import Command
from synapse_replication.data_handler import PositionKey
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.streams import StreamUpdate, StreamUpdateResult
from synapse_replication.testing import TestReplicationDataHandler


class TypedTestCase(SynchronousTestCase):
    """trial's SynchronousTestCase, with typed signatures for the assertions
    these tests use (trial's own are untyped, which `mypy --strict` refuses)."""

    if TYPE_CHECKING:

        def assertEqual(self, first: object, second: object, msg: object = None) -> None: ...

        def assertIs(self, first: object, second: object, msg: object = None) -> None: ...

        def assertIsNone(self, value: object, msg: object = None) -> None: ...

        def assertIn(self, containee: object, container: object, msg: object = None) -> None: ...

        def assertNotIn(
            self, containee: object, container: object, msg: object = None
        ) -> None: ...

        def assertTrue(self, condition: object, msg: object = None) -> None: ...

        def assertFalse(self, condition: object, msg: object = None) -> None: ...

        def assertNoResult(self, deferred: Deferred[Any]) -> None: ...

        def flushLoggedErrors(self, *errorTypes: type[BaseException]) -> list[Any]: ...


@implementer(IReplicationConnection)
class FakeConnection:
    """A connection that records the commands sent on it and `close()`.

    Closing does not tell the handler: tests call `lost_connection` when the
    scenario needs it, as a transport would.
    """

    def __init__(self, name: str = "peer") -> None:
        self.name = name
        self.sent: list[Command] = []
        self.closed = False

    def send_command(self, cmd: Command) -> None:
        self.sent.append(cmd)

    def close(self) -> None:
        self.closed = True

    def describe(self) -> str:
        return f"fake:{self.name}"

    def peer_name(self) -> str | None:
        return self.name


class SourceError(Exception):
    """The failure a `FakeStreamSource` injects."""


class FakeStreamSource:
    """Rows of one stream held in memory, per writer instance.

    `update_function` returns the rows with ``from_token < token <= upto_token``
    in token order; past `target_row_count` rows it stops at the end of a token
    (never splitting one) and says `limited`, with the last token returned as the
    new upper bound. Every call is recorded in `calls`.
    """

    def __init__(self) -> None:
        self.rows: dict[str, list[StreamUpdate]] = {}
        self.tokens: dict[str, int] = {}
        self.calls: list[tuple[str, int, int, int]] = []
        # Calls to let through before failing, then how many to fail.
        self._fail_after = 0
        self._fail_count = 0
        self._block_count = 0
        self.blocked: list[Deferred[None]] = []

    def add(self, instance_name: str, token: int, row: JsonValue) -> None:
        """Append a row written by `instance_name` at `token` (moving its token)."""
        assert token >= self.tokens.get(instance_name, 0), "rows must come in token order"
        self.rows.setdefault(instance_name, []).append((token, row))
        self.tokens[instance_name] = token

    def advance(self, instance_name: str, token: int) -> None:
        """Move the writer's token without a row (a rolled-back id, say)."""
        assert token >= self.tokens.get(instance_name, 0)
        self.tokens[instance_name] = token

    def current_token(self, instance_name: str) -> int:
        return self.tokens.get(instance_name, 0)

    def fail_next(self, count: int = 1, after: int = 0) -> None:
        """Let `after` calls succeed, then make `count` calls raise SourceError."""
        self._fail_after = after
        self._fail_count = count

    def block_next(self, count: int = 1) -> None:
        """Make the next `count` calls wait until `release()`."""
        self._block_count = count

    def release(self) -> None:
        """Let the oldest waiting call return."""
        self.blocked.pop(0).callback(None)

    async def update_function(
        self, instance_name: str, from_token: int, upto_token: int, target_row_count: int
    ) -> StreamUpdateResult:
        self.calls.append((instance_name, from_token, upto_token, target_row_count))
        if self._fail_count:
            if self._fail_after:
                self._fail_after -= 1
            else:
                self._fail_count -= 1
                raise SourceError(f"injected failure of {instance_name} {from_token}..{upto_token}")
        # The answer is what the source held when asked, even if it waits.
        result = self._updates(instance_name, from_token, upto_token, target_row_count)
        if self._block_count:
            self._block_count -= 1
            d: Deferred[None] = Deferred()
            self.blocked.append(d)
            await d
        return result

    def _updates(
        self, instance_name: str, from_token: int, upto_token: int, target_row_count: int
    ) -> StreamUpdateResult:
        wanted = [
            (t, r) for t, r in self.rows.get(instance_name, []) if from_token < t <= upto_token
        ]
        if len(wanted) <= target_row_count:
            return wanted, upto_token, False
        last = wanted[target_row_count - 1][0]
        taken = [(t, r) for t, r in wanted if t <= last]
        if len(taken) == len(wanted):
            return taken, upto_token, False
        return taken, last, True


@implementer(ILogObserver)
class LogCapture:
    """Every log event published while installed."""

    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def __call__(self, event: LogEvent) -> None:
        self.events.append(event)

    def messages(
        self, min_level: LogLevel = LogLevel.warn, namespace: str | None = None
    ) -> list[str]:
        """Formatted messages at `min_level` or above (from `namespace` if given)."""
        return [
            formatEvent(e)
            for e in self.events
            if e["log_level"] >= min_level
            and (namespace is None or e.get("log_namespace") == namespace)
        ]


def capture_logs(add_cleanup: Callable[..., object]) -> LogCapture:
    """Start collecting log events; `add_cleanup` (a test's `addCleanup`) stops it."""
    capture = LogCapture()
    globalLogPublisher.addObserver(capture)
    add_cleanup(globalLogPublisher.removeObserver, capture)
    return capture


class BlockingDataHandler(TestReplicationDataHandler):
    """A recording data handler whose `on_rdata`, for the streams in `blocking`,
    waits until the test calls `release(stream_name)`.

    `arrivals` records every `on_rdata` call as it is made, before it is
    processed; `rdata_calls` (inherited) records rows once processed.
    """

    __test__ = False

    def __init__(self, initial_positions: Mapping[PositionKey, int] | None = None) -> None:
        super().__init__(initial_positions)
        self.blocking: set[str] = set()
        self.arrivals: list[tuple[str, str, int]] = []
        self._waiting: list[tuple[str, Deferred[None]]] = []

    def on_rdata(
        self, stream_name: str, instance_name: str, token: int, rows: list[Any]
    ) -> Awaitable[None] | None:
        self.arrivals.append((stream_name, instance_name, token))
        if stream_name not in self.blocking:
            return super().on_rdata(stream_name, instance_name, token, rows)
        d: Deferred[None] = Deferred()
        self._waiting.append((stream_name, d))
        return self._after(d, stream_name, instance_name, token, rows)

    async def _after(
        self,
        d: Deferred[None],
        stream_name: str,
        instance_name: str,
        token: int,
        rows: list[Any],
    ) -> None:
        await d
        result = super().on_rdata(stream_name, instance_name, token, rows)
        if result is not None:
            await result

    def waiting(self, stream_name: str) -> int:
        """How many `on_rdata` calls of `stream_name` wait for `release`."""
        return sum(1 for name, _ in self._waiting if name == stream_name)

    def release(self, stream_name: str) -> None:
        """Let the oldest waiting `on_rdata` call of `stream_name` proceed."""
        for i, (name, d) in enumerate(self._waiting):
            if name == stream_name:
                del self._waiting[i]
                d.callback(None)
                return
        raise AssertionError(f"no on_rdata call of {stream_name!r} is waiting")

    def fail(self, stream_name: str, error: Exception) -> None:
        """Make the oldest waiting `on_rdata` call of `stream_name` raise `error`."""
        for i, (name, d) in enumerate(self._waiting):
            if name == stream_name:
                del self._waiting[i]
                d.errback(error)
                return
        raise AssertionError(f"no on_rdata call of {stream_name!r} is waiting")
