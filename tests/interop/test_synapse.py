"""Interoperability with a real Synapse: matrix-synapse 1.163.2 (the version
the wire vectors were captured from), installed from PyPI.

One Synapse main process per test process serves every test here: SQLite,
Redis replication through a redis-server of our own, the replication HTTP
listener with a secret, the client API on 127.0.0.1. The first test to run
installs Synapse if needed (see `synapse_env`), starts it and plays the
scenario once (`scenario()`); every test then checks one behaviour of what was
recorded, and the HTTP tests also ask Synapse's catch-up endpoint themselves.
If the scenario fails (no network to PyPI, Synapse does not start...), every
test fails with the reason: nothing is skipped.

The scenario, while two recorders listen on Synapse's channel:

- *our reader*: a `RedisReplicationClient` with a `ReplicationCommandHandler`
  following ``events``, ``typing`` and ``receipts`` of ``master``, catching up
  through `HttpReplicationClient` from Synapse's endpoint (every catch-up call
  is recorded: there should be none);
- *a raw subscriber* keeping every message published on the channel.

Our reader connects (and publishes its REPLICATE); then two users register,
create a room, invite and join, send messages (one non-ASCII), change state
(topic, name, a state event whose type and key are non-ASCII), reply in a
thread, type, send read receipts (unthreaded, ``main``, in a thread, private;
one replacing an earlier one), redact, set account data, presence, send a
to-device message, add a push rule and subscribe to a thread. Once the bus is
quiet our instance publishes USER_SYNC (start, end), LOCK_RELEASED,
REMOTE_SERVER_UP and CLEAR_USER_SYNC, then REPLICATE again.

Processes (Synapse, redis-server) run outside the reactor and are stopped at
exit whatever happened (see `synapse_env`); the scenario's own connections are
closed before its test ends, so no test leaves anything in the reactor.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final
from urllib.parse import quote

import attrs
from twisted.internet import reactor as _reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEvent,
    globalLogPublisher,
)
from twisted.trial import unittest
from zope.interface import implementer

from synapse_replication._json import JsonValue
from synapse_replication.commands import (
    ClearUserSyncCommand,
    Command,
    LockReleasedCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    UserSyncCommand,
    parse_command_from_line,
)
from synapse_replication.errors import HttpCatchUpError
from synapse_replication.handler import ReplicationCommandHandler
from synapse_replication.http import HttpReplicationClient, InstanceLocation
from synapse_replication.instance import reader_streams
from synapse_replication.redis import RedisReplicationClient, RedisSettings
from synapse_replication.streams import (
    STREAMS_MAP,
    AccountDataStream,
    EventsStream,
    PresenceStream,
    ReceiptsStream,
    StreamUpdate,
    StreamUpdateResult,
    TypingStream,
    UpdateFunction,
    group_updates_by_token,
)
from synapse_replication.streams.account_data import AccountDataStreamRow
from synapse_replication.streams.events import (
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
)
from synapse_replication.streams.receipts import ReceiptsStreamRow
from synapse_replication.tcp import Backoff
from synapse_replication.testing import RdataCall, TestReplicationDataHandler
from tests.interop.synapse_env import (
    MAIN_INSTANCE,
    SERVER_NAME,
    Homeserver,
    MatrixClient,
    RedisProcess,
    SynapseUnavailable,
    ensure_synapse_venv,
)
from tests.redis_server import RawRedis, wait_until
from tests.wire_vectors import wire_lines

reactor: Any = _reactor

OUR_INSTANCE: Final = "interop-reader"
FOLLOWED: Final = (EventsStream.NAME, TypingStream.NAME, ReceiptsStream.NAME)
ALICE: Final = f"@alice:{SERVER_NAME}"
BOB: Final = f"@bob:{SERVER_NAME}"

# Non-ASCII where it reaches replication rows: a state event's type and key
# (events rows), an account data type, a presence status (astral characters
# travel as surrogate pairs, quotes and backslashes escaped).
STATE_TYPE: Final = "org.example.st\u00e4te"
STATE_KEY: Final = "cl\u00e9 \u2603 \U0001f389"
ACCOUNT_DATA_TYPE: Final = "org.example.t\u00e9st\u2603"
STATUS_MSG: Final = 'h\u00e9llo \u2603 \U0001f389 "quoted" \\ back'

# The limit of each wait of the scenario (for Redis, Synapse, our reader).
WAIT_S: Final = 30.0
# The bus counts as quiet after this long without a message.
QUIET_S: Final = 1.0
# A test's limit: the first one also installs Synapse (pip alone may take
# synapse_env.INSTALL_TIMEOUT_S) and starts it.
TEST_TIMEOUT_S: Final = 570


# -- what the scenario recorded


@attrs.frozen
class _Sample:
    """One Prometheus sample."""

    name: str
    labels: frozenset[tuple[str, str]]
    value: float


@attrs.frozen
class Scenario:
    """Everything the scenario saw, for the tests to check."""

    homeserver: Homeserver
    # Every message on Synapse's channel, in the order Redis delivered them
    # (Synapse's and ours), from just before our reader connected.
    lines: tuple[str, ...]
    # Synapse's POSITIONs answering our REPLICATE on connect, and the one
    # published after the activity, by stream.
    first_answer: Mapping[str, PositionCommand]
    final_answer: Mapping[str, PositionCommand]
    # Our reader's positions of the followed streams of master just before
    # the final REPLICATE, and once it handled the answer.
    positions_before_final: Mapping[str, int | None]
    positions_after_final: Mapping[str, int | None]
    rdata_calls: tuple[RdataCall, ...]
    # Calls our reader made to its update functions (catch-ups over HTTP).
    catch_ups: tuple[tuple[str, str, int, int], ...]
    # What our library logged, at warning and at error level or above.
    our_warnings: tuple[str, ...]
    our_errors: tuple[str, ...]
    room_id: str
    event_ids: Mapping[str, str]
    # What our instance published besides REPLICATE.
    our_commands: tuple[Command, ...]
    # Synapse's metrics before we published them and after it handled them.
    metrics_before: tuple[_Sample, ...]
    metrics_after: tuple[_Sample, ...]
    # Synapse's log from just before our reader connected to the end.
    synapse_log: str


def _parse_metrics(text: str) -> tuple[_Sample, ...]:
    """Samples of Prometheus' text format (enough of it for Synapse's)."""
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, label_text = head.partition("{")
        labels = []
        for item in label_text.rstrip("}").split(","):
            if item:
                key, _, quoted = item.partition("=")
                labels.append((key, quoted.strip('"')))
        samples.append(_Sample(name, frozenset(labels), float(value)))
    return tuple(samples)


def _metric(samples: Iterable[_Sample], metric: str, /, **labels: str) -> float:
    """The sum of the samples of `metric` that have every one of `labels`."""
    wanted = set(labels.items())
    return sum(s.value for s in samples if s.name == metric and wanted <= s.labels)


_INBOUND: Final = "synapse_replication_tcp_protocol_inbound_commands_total"


# -- the module's one scenario

# The scenario's result (or why it failed), once played.
_outcome: list[Scenario | BaseException] = []


async def scenario() -> Scenario:
    """The scenario, played by the first test that asks for it."""
    if not _outcome:
        try:
            _outcome.append(await _play())
        except BaseException as e:
            _outcome.append(e)
            raise
    result = _outcome[0]
    if isinstance(result, BaseException):
        reason = str(result).splitlines()[0] if str(result) else type(result).__name__
        raise unittest.FailTest(
            f"The Synapse scenario failed in an earlier test (see its error): {reason}"
        ) from result
    return result


async def _play() -> Scenario:
    python = await deferToThread(ensure_synapse_venv)
    # Under trial's working directory, so that the logs stay for a look.
    base = tempfile.mkdtemp(prefix="synapse-interop-", dir=os.getcwd())
    # Both are stopped when this process exits (`synapse_env` registers
    # that), not at reactor shutdown: trial fires "shutdown" after every
    # test when it runs them in worker processes (--jobs).
    redis = RedisProcess(os.path.join(base, "redis"))
    await redis.start(reactor)
    homeserver = Homeserver(os.path.join(base, "synapse"), python, redis.port)
    os.makedirs(homeserver.directory)
    try:
        await deferToThread(homeserver.generate_keys)
        await homeserver.start(reactor)
        return await _record(homeserver, redis.port)
    except SynapseUnavailable:
        homeserver.stop()
        redis.stop()
        raise
    except BaseException as e:
        homeserver.stop()
        redis.stop()
        raise unittest.FailTest(f"{type(e).__name__}: {e}\n{homeserver.log_tail()}") from e


@implementer(ILogObserver)
class _OurLogs:
    """Our library's log events at warning level and above."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self.errors: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        if not str(event.get("log_namespace", "")).startswith("synapse_replication"):
            return
        level = event.get("log_level")
        if level is None or level < LogLevel.warn:
            return
        target = self.warnings if level == LogLevel.warn else self.errors
        target.append(formatEvent(event))


def _recording(
    name: str, update: UpdateFunction, calls: list[tuple[str, str, int, int]]
) -> UpdateFunction:
    """`update`, recording each call as (stream, instance, from, upto)."""

    async def recorded(
        instance_name: str, from_token: int, upto_token: int, target_row_count: int
    ) -> StreamUpdateResult:
        calls.append((name, instance_name, from_token, upto_token))
        return await update(instance_name, from_token, upto_token, target_row_count)

    return recorded


async def _record(homeserver: Homeserver, redis_port: int) -> Scenario:
    settings = RedisSettings(
        host="127.0.0.1",
        port=redis_port,
        connect_timeout=5.0,
        ping_interval=2.0,
        reply_timeout=10.0,
        close_timeout=2.0,
        backoff=Backoff(initial=0.1, factor=2.0, maximum=1.0, jitter=0.1),
    )
    logs = _OurLogs()
    globalLogPublisher.addObserver(logs)
    http = _http_client(homeserver)
    raw: RawRedis | None = None
    client: RedisReplicationClient | None = None
    try:
        raw = await RawRedis.connect(reactor, settings)
        await raw.subscribe(SERVER_NAME)
        messages = raw.messages
        data = TestReplicationDataHandler()
        catch_ups: list[tuple[str, str, int, int]] = []
        handler = ReplicationCommandHandler(
            instance_name=OUR_INSTANCE,
            clock=reactor,
            streams=reader_streams(
                OUR_INSTANCE,
                {
                    name: _recording(name, http.update_function(name), catch_ups)
                    for name in FOLLOWED
                },
            ),
            data_handler=data,
            stream_writers={name: [MAIN_INSTANCE] for name in FOLLOWED},
        )

        def positions() -> dict[str, int | None]:
            return {name: data.get_position(name, MAIN_INSTANCE) for name in FOLLOWED}

        # Synapse's own REPLICATE at start-up is answered by now, or soon.
        await _wait_quiet(messages)
        log_start = len(homeserver.log_text())
        connect_index = len(messages)
        client = RedisReplicationClient(
            reactor=reactor,
            handler=handler,
            server_name=SERVER_NAME,
            instance_name=OUR_INSTANCE,
            settings=settings,
        )
        client.start()
        first_answer = await _answer_to_replicate(messages, connect_index)
        await wait_until(
            reactor,
            lambda: None not in positions().values(),
            "our reader has a position for events, typing and receipts",
            WAIT_S,
        )

        room_id, event_ids = await _activity(homeserver)
        await wait_until(
            reactor,
            lambda: _activity_published([p for _, p in messages], event_ids),
            "Synapse has published the rows of the whole activity",
            WAIT_S,
        )
        await _wait_quiet(messages)
        await wait_until(reactor, handler.is_idle, "our reader has handled every command", WAIT_S)
        positions_before_final = positions()

        metrics_before = await _metrics(homeserver)
        now_ms = int(time.time() * 1000)
        ours: tuple[Command, ...] = (
            UserSyncCommand(OUR_INSTANCE, ALICE, "INTEROPDEVICE", True, now_ms),
            UserSyncCommand(OUR_INSTANCE, ALICE, "INTEROPDEVICE", False, now_ms + 1),
            LockReleasedCommand(OUR_INSTANCE, "interop_lock", "interop-key"),
            RemoteServerUpCommand("remote.invalid"),
            ClearUserSyncCommand(OUR_INSTANCE),
        )
        for cmd in ours:
            client.publish_command(cmd)
        final_index = len(messages)
        client.publish_command(ReplicateCommand())
        final_answer = await _answer_to_replicate(messages, final_index)
        await wait_until(reactor, handler.is_idle, "our reader has handled the POSITIONs", WAIT_S)
        positions_after_final = positions()

        # Synapse handles USER_SYNC and CLEAR_USER_SYNC in the background:
        # wait until it counted every command and finished that work.
        async def handled() -> bool:
            samples = await _metrics(homeserver)
            counted = all(
                _metric(samples, _INBOUND, command=name) - _metric(metrics_before, _INBOUND, command=name)
                >= count
                for name, count in Counter(c.NAME for c in ours).items()
            )
            busy = sum(
                _metric(samples, "synapse_background_process_in_flight_count", name=f"replication-{name}")
                for name in ("USER_SYNC", "CLEAR_USER_SYNC")
            )
            return counted and busy == 0

        await _poll(handled, WAIT_S)
        metrics_after = await _metrics(homeserver)
        await _wait_quiet(messages)
        synapse_log = homeserver.log_text()[log_start:]
        lines = tuple(payload for _, payload in messages[connect_index:])
    finally:
        if client is not None:
            await client.stop()
        if raw is not None:
            await raw.close()
        await http.close()
        globalLogPublisher.removeObserver(logs)
    return Scenario(
        homeserver=homeserver,
        lines=lines,
        first_answer=first_answer,
        final_answer=final_answer,
        positions_before_final=positions_before_final,
        positions_after_final=positions_after_final,
        rdata_calls=tuple(data.rdata_calls),
        catch_ups=tuple(catch_ups),
        our_warnings=tuple(logs.warnings),
        our_errors=tuple(logs.errors),
        room_id=room_id,
        event_ids=event_ids,
        our_commands=ours,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
        synapse_log=synapse_log,
    )


def _http_client(homeserver: Homeserver, secret: str | None = None, retries: int = 3) -> HttpReplicationClient:
    return HttpReplicationClient(
        reactor,
        {MAIN_INSTANCE: InstanceLocation("127.0.0.1", homeserver.replication_port)},
        homeserver.secret if secret is None else secret,
        timeout_s=10.0,
        retries=retries,
        backoff=Backoff(initial=0.1, factor=2.0, maximum=1.0, jitter=0.1),
    )


async def _metrics(homeserver: Homeserver) -> tuple[_Sample, ...]:
    client = MatrixClient(reactor, f"http://127.0.0.1:{homeserver.replication_port}")
    code, body = await client.raw("GET", "/_synapse/metrics")
    if code != 200:
        raise AssertionError(f"Synapse's metrics answered {code}: {body[:200]!r}")
    return _parse_metrics(body.decode("utf-8"))


async def _poll(condition: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    """Ask `condition` until it holds (True) or `timeout` passed (False)."""
    deadline = reactor.seconds() + timeout
    while not await condition():
        if reactor.seconds() > deadline:
            return False
        await deferLater(reactor, 0.1, lambda: None)
    return True


async def _wait_quiet(messages: list[tuple[str, str]]) -> None:
    """Until no message arrived for `QUIET_S`."""
    deadline = reactor.seconds() + WAIT_S
    count, since = len(messages), reactor.seconds()
    while reactor.seconds() - since < QUIET_S:
        if reactor.seconds() > deadline:
            raise AssertionError(f"Synapse's channel was not quiet for {QUIET_S} s within {WAIT_S} s")
        await deferLater(reactor, 0.05, lambda: None)
        if len(messages) != count:
            count, since = len(messages), reactor.seconds()


def _position_burst(lines: Iterable[str]) -> tuple[dict[str, PositionCommand], bool]:
    """The first run of POSITIONs from master with prev == new, one per
    stream (Synapse's answer to a REPLICATE), among `lines`; and whether it
    ended (another line follows it)."""
    burst: dict[str, PositionCommand] = {}
    for line in lines:
        if line.startswith("POSITION "):
            cmd = parse_command_from_line(line)
            assert isinstance(cmd, PositionCommand)
            if (
                cmd.instance_name == MAIN_INSTANCE
                and cmd.prev_token == cmd.new_token
                and cmd.stream_name not in burst
            ):
                burst[cmd.stream_name] = cmd
                continue
        if burst:
            return burst, True
    return burst, False


def synapse_streams() -> frozenset[str]:
    """The streams Synapse 1.163's main process announced in the wire vectors."""
    burst, _ = _position_burst(wire_lines())
    return frozenset(burst)


async def _answer_to_replicate(
    messages: list[tuple[str, str]], start: int
) -> dict[str, PositionCommand]:
    """Synapse's answer to the first REPLICATE at or after `start`."""
    expected = synapse_streams()

    def found() -> tuple[dict[str, PositionCommand], bool] | None:
        lines = [payload for _, payload in messages[start:]]
        if "REPLICATE " not in lines:
            return None
        return _position_burst(lines[lines.index("REPLICATE ") + 1 :])

    def answered() -> bool:
        result = found()
        return result is not None and (result[1] or set(result[0]) >= expected)

    await wait_until(reactor, answered, "Synapse answers our REPLICATE", WAIT_S)
    result = found()
    assert result is not None
    return result[0]


# -- the activity, through the client API


def _q(text: str) -> str:
    return quote(text, safe="")


async def _activity(homeserver: Homeserver) -> tuple[str, dict[str, str]]:
    """Drive Synapse through its client API; the room and the event ids."""
    anonymous = MatrixClient(reactor, homeserver.client_base)
    alice = await anonymous.register("alice", secrets.token_hex(12))
    bob = await anonymous.register("bob", secrets.token_hex(12))
    created = await alice.call(
        "POST",
        "/_matrix/client/v3/createRoom",
        {"name": "Interop \u2603", "preset": "private_chat", "invite": [BOB]},
    )
    room_id = str(created["room_id"])
    room = _q(room_id)
    await bob.call("POST", f"/_matrix/client/v3/join/{room}", {})
    ids: dict[str, str] = {}
    ids["root"] = await alice.send_event(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "hello"}
    )
    ids["main"] = await bob.send_event(
        room_id,
        "m.room.message",
        {"msgtype": "m.text", "body": "h\u00e9llo w\u00f6rld \u2603 \U0001f389"},
    )
    ids["state"] = await alice.send_state(room_id, STATE_TYPE, STATE_KEY, {"v": "w\u00e9rt"})
    ids["topic"] = await alice.send_state(room_id, "m.room.topic", "", {"topic": "T\u00f6pic"})
    ids["name"] = await alice.send_state(room_id, "m.room.name", "", {"name": "Renamed \u2603"})
    ids["reply"] = await bob.send_event(
        room_id,
        "m.room.message",
        {
            "msgtype": "m.text",
            "body": "in the thread",
            "m.relates_to": {"rel_type": "m.thread", "event_id": ids["root"]},
        },
    )
    ids["doomed"] = await alice.send_event(
        room_id, "m.room.message", {"msgtype": "m.text", "body": "to be redacted"}
    )
    redacted = await alice.call(
        "PUT",
        f"/_matrix/client/v3/rooms/{room}/redact/{_q(ids['doomed'])}/{secrets.token_hex(8)}",
        {"reason": "interop"},
    )
    ids["redaction"] = str(redacted["event_id"])

    # Typing: both start, both stop (a typing left on would time out later
    # and move the room's row past the tokens the tests compare).
    for user, client, typing in (
        (ALICE, alice, True),
        (BOB, bob, True),
        (ALICE, alice, False),
        (BOB, bob, False),
    ):
        body: dict[str, JsonValue] = {"typing": True, "timeout": 30000} if typing else {"typing": False}
        await client.call("PUT", f"/_matrix/client/v3/rooms/{room}/typing/{_q(user)}", body)

    # Receipts: unthreaded, "main", in a thread, private; then an unthreaded
    # one of bob's replacing his first.
    for client, receipt_type, event, body in (
        (bob, "m.read", ids["root"], {}),
        (bob, "m.read", ids["main"], {"thread_id": "main"}),
        (alice, "m.read", ids["reply"], {"thread_id": ids["root"]}),
        (alice, "m.read.private", ids["main"], {}),
        (bob, "m.read", ids["main"], {}),
    ):
        await client.call(
            "POST", f"/_matrix/client/v3/rooms/{room}/receipt/{receipt_type}/{_q(event)}", body
        )

    # Streams beyond the three we follow.
    await alice.call(
        "PUT",
        f"/_matrix/client/v3/user/{_q(ALICE)}/account_data/{_q(ACCOUNT_DATA_TYPE)}",
        {"k": "v\u00e9"},
    )
    await alice.call(
        "PUT", f"/_matrix/client/v3/user/{_q(ALICE)}/rooms/{room}/tags/u.interop", {"order": 0.5}
    )
    await alice.call(
        "PUT",
        f"/_matrix/client/v3/presence/{_q(ALICE)}/status",
        {"presence": "online", "status_msg": STATUS_MSG},
    )
    await alice.call(
        "PUT",
        f"/_matrix/client/v3/sendToDevice/org.example.interop/{secrets.token_hex(8)}",
        {"messages": {BOB: {"*": {"hello": "w\u00f6rld"}}}},
    )
    await alice.call(
        "PUT",
        "/_matrix/client/v3/pushrules/global/override/org.example.interop",
        {
            "actions": ["dont_notify"],
            "conditions": [{"kind": "event_match", "key": "content.body", "pattern": "interop"}],
        },
    )
    await bob.call(
        "PUT",
        f"/_matrix/client/unstable/io.element.msc4306/rooms/{room}/thread/{_q(ids['root'])}"
        "/subscription",
        {},
    )
    return room_id, ids


def _activity_published(lines: list[str], ids: Mapping[str, str]) -> bool:
    """Synapse published the last row the activity makes in each followed
    stream (and in thread_subscriptions, the last stream it touches)."""

    def count(prefix: str) -> int:
        return sum(1 for line in lines if line.startswith(prefix))

    return (
        count(f"RDATA typing {MAIN_INSTANCE} ") >= 4
        and count(f"RDATA receipts {MAIN_INSTANCE} ") >= 5
        and count(f"RDATA thread_subscriptions {MAIN_INSTANCE} ") >= 1
        and any(
            line.startswith(f"RDATA events {MAIN_INSTANCE} ") and ids["redaction"] in line
            for line in lines
        )
    )


# -- reading what was recorded


def _commands(lines: Iterable[str]) -> list[Command]:
    return [parse_command_from_line(line) for line in lines]


def _rdata_groups(lines: Iterable[str], stream: str, after: int) -> list[tuple[int, list[JsonValue]]]:
    """Synapse's RDATA rows of `stream` with a token above `after`, as
    (token, rows): rows sent with token ``batch`` belong to the next row
    with a real token."""
    groups: list[tuple[int, list[JsonValue]]] = []
    pending: list[JsonValue] = []
    for cmd in _commands(lines):
        if not (
            isinstance(cmd, RdataCommand)
            and cmd.stream_name == stream
            and cmd.instance_name == MAIN_INSTANCE
        ):
            continue
        pending.append(cmd.row)
        if cmd.token is not None:
            if cmd.token > after:
                groups.append((cmd.token, pending))
            pending = []
    if pending:
        raise AssertionError(f"{stream}: a batch of {len(pending)} rows never ended")
    return groups


def _updates_by_token(updates: list[StreamUpdate]) -> list[tuple[int, list[JsonValue]]]:
    return list(group_updates_by_token(updates))


def _latest_per_key(
    groups: list[tuple[int, list[JsonValue]]], key: Callable[[Any], object]
) -> list[tuple[int, list[JsonValue]]]:
    """Of every row, only the last one with its `key`, grouped by token:
    what a table that replaces a key's row (and its token) still holds."""
    last: dict[object, tuple[int, JsonValue]] = {}
    for token, rows in groups:
        for row in rows:
            last[key(row)] = (token, row)
    flat = sorted(last.values(), key=lambda item: item[0])
    return _updates_by_token(flat)


async def _fetch_all(
    client: HttpReplicationClient, stream: str, from_token: int, upto_token: int
) -> list[StreamUpdate]:
    """Every update Synapse's endpoint gives in (from, upto], asking again
    while limited."""
    updates: list[StreamUpdate] = []
    token = from_token
    while True:
        rows, token, limited = await client.get_updates(stream, MAIN_INSTANCE, token, upto_token)
        updates += rows
        if not limited:
            return updates


class SynapseInteropTests(unittest.TestCase):
    """Our library against a real Synapse 1.163.2."""

    timeout = TEST_TIMEOUT_S

    async def _http_updates(self, s: Scenario, stream: str) -> list[tuple[int, list[JsonValue]]]:
        client = _http_client(s.homeserver)
        self.addCleanup(client.close)
        updates = await _fetch_all(
            client,
            stream,
            s.first_answer[stream].new_token,
            s.final_answer[stream].new_token,
        )
        return _updates_by_token(updates)

    def _redis_groups(self, s: Scenario, stream: str) -> list[tuple[int, list[JsonValue]]]:
        return _rdata_groups(s.lines, stream, s.first_answer[stream].new_token)

    # -- 1. every line Synapse publishes

    async def test_every_line_parses_and_round_trips(self) -> None:
        """Every message on Synapse's channel parses, and `to_line` gives its bytes back."""
        s = await scenario()
        self.assertGreater(len(s.lines), 100)
        for line in s.lines:
            cmd = parse_command_from_line(line)
            self.assertEqual(f"{cmd.NAME} {cmd.to_line()}", line)
        names = {line.partition(" ")[0] for line in s.lines}
        self.assertTrue({"RDATA", "POSITION", "REPLICATE", "LOCK_RELEASED"} <= names, names)

    async def test_rows_of_known_streams_parse_and_others_are_kept_raw(self) -> None:
        """RDATA rows of every stream we model parse; rows of the others stay raw JSON."""
        s = await scenario()
        parsed: dict[str, int] = {}
        raw: dict[str, list[JsonValue]] = {}
        for cmd in _commands(s.lines):
            if not isinstance(cmd, RdataCommand):
                continue
            stream = STREAMS_MAP.get(cmd.stream_name)
            if stream is None:
                raw.setdefault(cmd.stream_name, []).append(cmd.row)
            else:
                self.assertIsInstance(stream.parse_row(cmd.row), stream.ROW_TYPE)
                parsed[cmd.stream_name] = parsed.get(cmd.stream_name, 0) + 1
        # The activity reached every one of these streams.
        self.assertEqual(
            set(parsed),
            {"events", "typing", "receipts", "presence", "account_data",
             "device_lists", "to_device", "push_rules"},
        )  # fmt: skip
        # Thread subscriptions are not modelled: their rows are kept as sent.
        self.assertEqual(
            raw.get("thread_subscriptions"), [[BOB, s.room_id, s.event_ids["root"]]]
        )
        self.assertEqual(set(raw), {"thread_subscriptions"})

    async def test_streams_not_followed_are_dropped_with_one_warning_each(self) -> None:
        """Our reader warns once per stream it does not follow and logs no error."""
        s = await scenario()
        self.assertEqual(s.our_errors, ())
        unfollowed = synapse_streams() - set(FOLLOWED)
        for stream in unfollowed:
            self.assertEqual(
                sum(1 for w in s.our_warnings if f"unknown stream {stream!r}" in w),
                1,
                (stream, s.our_warnings),
            )
        self.assertEqual(len(s.our_warnings), len(unfollowed), s.our_warnings)

    async def test_non_ascii_travels_escaped_and_parses_back_exactly(self) -> None:
        """Non-ASCII is \\u-escaped on the wire (astral as surrogate pairs) and parses back intact."""
        s = await scenario()
        self.assertTrue(all(line.isascii() for line in s.lines))
        state_lines = [line for line in s.lines if s.event_ids["state"] in line and '"state"' in line]
        self.assertEqual(len(state_lines), 1, state_lines)
        self.assertIn("cl\\u00e9 \\u2603 \\ud83c\\udf89", state_lines[0])
        cmd = parse_command_from_line(state_lines[0])
        assert isinstance(cmd, RdataCommand)
        self.assertEqual(
            EventsStream.parse_row(cmd.row),
            EventsStreamCurrentStateRow(s.room_id, STATE_TYPE, STATE_KEY, s.event_ids["state"]),
        )
        rdata = [c for c in _commands(s.lines) if isinstance(c, RdataCommand)]
        presence = [
            PresenceStream.parse_row(c.row) for c in rdata if c.stream_name == PresenceStream.NAME
        ]
        self.assertIn((ALICE, STATUS_MSG), [(row.user_id, row.status_msg) for row in presence])
        account_data = [
            AccountDataStream.parse_row(c.row)
            for c in rdata
            if c.stream_name == AccountDataStream.NAME
        ]
        self.assertIn(
            AccountDataStreamRow(ALICE, None, ACCOUNT_DATA_TYPE), account_data
        )

    # -- our reader

    async def test_reader_gets_every_row_of_the_followed_streams_once(self) -> None:
        """Our reader delivers exactly Synapse's rows of events, typing and receipts, a token per call."""
        s = await scenario()
        for stream in FOLLOWED:
            parse = STREAMS_MAP[stream].parse_row
            expected = [
                RdataCall(stream, MAIN_INSTANCE, token, tuple(parse(row) for row in rows))
                for token, rows in self._redis_groups(s, stream)
            ]
            self.assertTrue(expected, stream)
            self.assertEqual([c for c in s.rdata_calls if c.stream_name == stream], expected)
        self.assertEqual(
            {c.stream_name for c in s.rdata_calls}, set(FOLLOWED), "rows of other streams"
        )

    async def test_events_rows_carry_threads_redactions_and_state(self) -> None:
        """The reader's event rows show the thread reply, the redaction and the state changes."""
        s = await scenario()
        rows = [r for c in s.rdata_calls if c.stream_name == "events" for r in c.rows]
        events = {r.event_id: r for r in rows if isinstance(r, EventsStreamEventRow)}
        ids = s.event_ids
        self.assertEqual(events[ids["reply"]].relates_to, ids["root"])
        self.assertEqual(events[ids["redaction"]].redacts, ids["doomed"])
        self.assertEqual(events[ids["state"]].state_key, STATE_KEY)
        self.assertEqual(events[ids["state"]].type, STATE_TYPE)
        self.assertFalse(events[ids["state"]].rejected)
        self.assertFalse(events[ids["state"]].outlier)
        state = {
            (r.type, r.state_key): r.event_id
            for r in rows
            if isinstance(r, EventsStreamCurrentStateRow)
        }
        self.assertEqual(state[("m.room.topic", "")], ids["topic"])
        self.assertEqual(state[("m.room.name", "")], ids["name"])
        self.assertEqual(state[(STATE_TYPE, STATE_KEY)], ids["state"])

    async def test_threaded_receipts_arrive_with_their_thread_ids(self) -> None:
        """Receipts arrive unthreaded (null), for "main" and for a thread root, private ones too."""
        s = await scenario()
        rows = [r for c in s.rdata_calls if c.stream_name == "receipts" for r in c.rows]
        assert all(isinstance(r, ReceiptsStreamRow) for r in rows)
        ids = s.event_ids
        self.assertEqual(
            [(r.receipt_type, r.user_id, r.event_id, r.thread_id) for r in rows],
            [
                ("m.read", BOB, ids["root"], None),
                ("m.read", BOB, ids["main"], "main"),
                ("m.read", ALICE, ids["reply"], ids["root"]),
                ("m.read.private", ALICE, ids["main"], None),
                ("m.read", BOB, ids["main"], None),
            ],
        )
        self.assertTrue(all(r.room_id == s.room_id and "ts" in r.data for r in rows))

    # -- 2. REPLICATE and positions

    async def test_replicate_is_answered_with_a_position_for_every_stream(self) -> None:
        """Synapse answers our REPLICATE with one POSITION per stream it writes, prev == new."""
        s = await scenario()
        for answer in (s.first_answer, s.final_answer):
            self.assertEqual(set(answer), synapse_streams())
            for name, cmd in answer.items():
                self.assertEqual(cmd.instance_name, MAIN_INSTANCE)
                self.assertEqual(cmd.prev_token, cmd.new_token, name)
        self.assertEqual(s.lines.count("REPLICATE "), 2, "ours only: Synapse sent none")

    async def test_our_reader_publishes_no_position(self) -> None:
        """A reader writes no stream, so it announces no POSITION on Synapse's bus.

        Synapse would take one as a writer's: for a stream it writes it
        catches up from that instance and hands the rows to its own handlers
        (an error for ``typing``: "Typing writer instance got typing info over
        replication"); for a stream it does not know, a KeyError drops its
        Redis connection.
        """
        s = await scenario()
        ours = [
            cmd
            for cmd in _commands(s.lines)
            if isinstance(cmd, PositionCommand) and cmd.instance_name != MAIN_INSTANCE
        ]
        self.assertEqual(ours, [])

    async def test_reader_positions_match_synapse_without_catching_up(self) -> None:
        """After the activity our reader's positions are Synapse's, reached by RDATA alone."""
        s = await scenario()
        announced = {name: s.final_answer[name].new_token for name in FOLLOWED}
        self.assertEqual(s.positions_before_final, announced)
        self.assertEqual(s.positions_after_final, announced)
        for name in FOLLOWED:
            last_rdata = self._redis_groups(s, name)[-1][0]
            self.assertEqual(last_rdata, announced[name], name)
            self.assertGreater(announced[name], s.first_answer[name].new_token, name)
        self.assertEqual(s.catch_ups, (), "our reader never needed to fetch rows")

    # -- 3. HTTP catch-up from Synapse's endpoint

    async def test_http_catch_up_of_events_gives_the_rows_sent_over_redis(self) -> None:
        """Synapse's endpoint gives the same events rows, token by token, as came over Redis."""
        s = await scenario()
        self.assertEqual(await self._http_updates(s, "events"), self._redis_groups(s, "events"))

    async def test_http_catch_up_of_typing_gives_each_rooms_latest_row(self) -> None:
        """Synapse's typing endpoint gives one row per room: its latest, at its latest token."""
        s = await scenario()
        redis = self._redis_groups(s, "typing")
        self.assertEqual(len(redis), 4)
        latest = _latest_per_key(redis, key=lambda row: row[0])
        self.assertEqual(latest, [(s.final_answer["typing"].new_token, [[s.room_id, []]])])
        self.assertEqual(await self._http_updates(s, "typing"), latest)

    async def test_http_catch_up_of_receipts_gives_the_latest_row_per_key(self) -> None:
        """Synapse's receipts endpoint gives every receipt but those replaced since."""
        s = await scenario()
        redis = self._redis_groups(s, "receipts")
        # room, receipt type, user, thread: a new receipt replaces the old row.
        latest = _latest_per_key(redis, key=lambda row: (row[0], row[1], row[2], row[4]))
        self.assertEqual(len(latest), len(redis) - 1)
        self.assertEqual(await self._http_updates(s, "receipts"), latest)

    async def test_http_catch_up_with_a_wrong_secret_fails_clearly(self) -> None:
        """A wrong secret: Synapse answers 500, and our client says so."""
        s = await scenario()
        client = _http_client(s.homeserver, secret="not-" + s.homeserver.secret, retries=0)
        self.addCleanup(client.close)
        with self.assertRaises(HttpCatchUpError) as raised:
            await client.get_updates("typing", MAIN_INSTANCE, 0, 1)
        self.assertEqual(raised.exception.status, 500)

    # -- 4. what our instance publishes

    async def test_synapse_counts_every_command_we_publish(self) -> None:
        """Synapse parsed and handled each command our instance published."""
        s = await scenario()
        before, after = s.metrics_before, s.metrics_after
        sent = Counter(c.NAME for c in s.our_commands)
        self.assertEqual(
            set(sent), {"USER_SYNC", "LOCK_RELEASED", "REMOTE_SERVER_UP", "CLEAR_USER_SYNC"}
        )
        for name, count in sent.items():
            self.assertEqual(
                _metric(after, _INBOUND, command=name) - _metric(before, _INBOUND, command=name),
                count,
                name,
            )
        # What we published went on the channel exactly as we encoded it.
        for cmd in s.our_commands:
            self.assertIn(f"{cmd.NAME} {cmd.to_line()}", s.lines)
        user_syncs = "synapse_replication_tcp_resource_user_sync_total"
        self.assertEqual(_metric(after, user_syncs) - _metric(before, user_syncs), 2)

    async def test_synapse_logs_no_error_for_our_commands(self) -> None:
        """From our connection to the end, Synapse logged no error, traceback or bad line."""
        s = await scenario()
        bad = [
            line
            for line in s.synapse_log.splitlines()
            if " - ERROR - " in line
            or " - CRITICAL - " in line
            or "Traceback" in line
            or "Failed to parse replication line" in line
            or "Unhandled command" in line
        ]
        self.assertEqual(bad, [], f"see {s.homeserver.log_path}")
        # The log does cover our commands: Synapse answered our REPLICATEs.
        self.assertGreaterEqual(s.synapse_log.count("Sending position for events"), 2)
