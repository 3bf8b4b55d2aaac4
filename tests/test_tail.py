# -*- test-case-name: tests.test_tail -*-
"""Tests for `synapse-replication tail`.

The formatting, filtering, stats and catch-up pieces are tested in process,
with a fake clock where time matters. The command itself runs as a
subprocess (``python -m synapse_replication.cli tail``), as an operator runs
it, against a real redis-server carrying the lines a real Synapse published,
against a real writer over TCP, and against a writer's HTTP endpoint for
``--catch-up-from``. Every run also checks that no password, replication
secret or access token reaches stdout or stderr (logs included: runs are
verbose).
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, Final, cast

from twisted.internet import reactor as _global_reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IListeningPort, IProcessTransport
from twisted.internet.protocol import (
    Factory,
    ProcessProtocol,
    Protocol,
    ServerFactory,
    connectionDone,
)
from twisted.internet.task import Clock, deferLater
from twisted.protocols.policies import WrappingFactory
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from synapse_replication._json import decode_json
from synapse_replication.cli import build_parser
from synapse_replication.commands import (
    PositionCommand,
    RdataCommand,
    parse_command_from_line,
)
from synapse_replication.errors import HttpCatchUpError
from synapse_replication.http import (
    ReplicationHttpResource,
    listen_http,
    make_replication_site,
)
from synapse_replication.instance import WriterInstance, start_writer
from synapse_replication.streams import STREAMS_MAP, StreamUpdateResult
from synapse_replication.tail import (
    NOT_UNDERSTOOD,
    CatchUp,
    CatchUpError,
    CatchUpProgress,
    JsonFormatter,
    StatsCollector,
    StatsSink,
    TableFormatter,
    TailFilter,
    TailRecord,
    UsageError,
    mask_access_token,
    options_from_args,
    parse_redis_url,
    record_from_command,
    record_from_line,
    record_from_row,
    render_stats,
    scrub_text,
    summarize,
)
from synapse_replication.testing import inject
from tests.fakes import TypedTestCase
from tests.redis_server import RawRedis, RedisServer, start_redis, wait_until
from tests.wire_vectors import wire_lines

reactor: Final = cast(Any, _global_reactor)

SERVER: Final = "test.local"
USER_IP_CHANNEL: Final = f"{SERVER}/USER_IP"
# Secrets that must never be printed.
REDIS_PASSWORD: Final = "redis-pw-8f2c61d0"
HTTP_SECRET: Final = "repl-secret-77a1e9"
ACCESS_TOKEN: Final = "syt_YWxpY2U_QkFkVGVzdFRva2VuWHl6_0a1b2c"
SECRETS: Final = (REDIS_PASSWORD, HTTP_SECRET, ACCESS_TOKEN, ACCESS_TOKEN[4:])

GOOD_USER_IP: Final = (
    f'USER_IP @alice:{SERVER} ["{ACCESS_TOKEN}","10.1.2.3","Element/1.11",'
    '"ALICEDEVICE",1795808079000]'
)
BAD_USER_IP: Final = f'USER_IP @alice:{SERVER} ["{ACCESS_TOKEN}","10.1.2.3"]'
GARBAGE: Final = (
    b"\xff\xfeRDATA not utf-8",
    b"FROBNICATE events master 3",
    b'RDATA events master 7 ["ev",[oops',
)
AFTER_GARBAGE: Final = b'RDATA typing master 9 ["!room:test.local",["@carol:test.local"]]'


def _resolved(records: Sequence[dict[str, Any]]) -> list[list[Any]]:
    """``[token, row]`` of RDATA records, a ``batch`` row given the token of
    the row that closes its group (as the store has it)."""
    out: list[list[Any]] = []
    pending: list[dict[str, Any]] = []
    for record in records:
        pending.append(record)
        if record["token"] != "batch":
            out += [[record["token"], r["row"]] for r in pending]
            pending = []
    assert not pending, "a batch group was not closed"
    return out


def _fixed_time(ts: float) -> str:
    return "12:34:56.789"


def _wire_records() -> list[TailRecord]:
    records = []
    for line in wire_lines():
        record = record_from_line(line.encode("utf-8"), ts=1.0, source="redis:test.local")
        assert record is not None
        records.append(record)
    return records


def _assert_no_secrets(test: TypedTestCase | TestCase, *texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            test.assertNotIn(secret, text)


# -- in process


class RecordTests(TypedTestCase):
    """What each line becomes."""

    def test_every_wire_line_is_shown(self) -> None:
        """Each line Synapse published becomes a record of its command; rows
        of known streams are parsed (booleans from SQLite's 0/1 made
        booleans), rows of streams we do not know are kept raw, never
        dropped and not marked as errors."""
        lines = wire_lines()
        records = _wire_records()
        self.assertEqual(len(records), len(lines))
        for line, record in zip(lines, records, strict=True):
            cmd = parse_command_from_line(line)
            self.assertEqual(record.command, cmd.NAME)
            self.assertIsNone(record.error)
            shown = json.loads(JsonFormatter().format(record))
            self.assertEqual(shown["command"], cmd.NAME)
            if isinstance(cmd, RdataCommand):
                self.assertEqual(shown["row"], cmd.row)
                self.assertEqual(shown["token"], "batch" if cmd.token is None else cmd.token)
                self.assertEqual("parsed" in shown, cmd.stream_name in STREAMS_MAP)
        commands = {r.command for r in records}
        self.assertEqual(commands, {"POSITION", "RDATA", "LOCK_RELEASED", "REPLICATE"})
        unknown = {r.stream for r in records if r.command == "RDATA" and r.stream not in STREAMS_MAP}
        self.assertEqual(unknown, {"quarantined_media", "thread_subscriptions", "sticky_events"})

        ev = next(r for r in records if r.command == "RDATA" and r.stream == "events")
        self.assertEqual(
            ev.fields["parsed"],
            {
                "kind": "ev",
                "event_id": "$d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw",
                "room_id": "!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw",
                "type": "m.room.create",
                "state_key": "",
                "redacts": None,
                "relates_to": None,
                "membership": None,
                "rejected": False,
                "outlier": False,
            },
        )
        typing = next(r for r in records if r.stream == "typing" and r.command == "RDATA")
        self.assertEqual(
            JsonFormatter().format(typing),
            '{"ts":1.0,"source":"redis:test.local","command":"RDATA","stream":"typing",'
            '"instance":"master","token":1,"row":["!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw",'
            '["@alice:test.local"]],"parsed":{"room_id":"!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw",'
            '"user_ids":["@alice:test.local"]}}',
        )
        position = json.loads(JsonFormatter().format(records[0]))
        self.assertEqual(
            position,
            {
                "ts": 1.0,
                "source": "redis:test.local",
                "command": "POSITION",
                "stream": "events",
                "instance": "master",
                "token": 1,
                "prev_token": 1,
                "new_token": 1,
            },
        )
        lock = json.loads(JsonFormatter().format(next(r for r in records if r.command == "LOCK_RELEASED")))
        self.assertEqual(lock["instance"], "master")
        self.assertEqual(lock["lock_name"], "new_event_during_purge_lock")

    def test_lines_not_understood_are_marked(self) -> None:
        """Bytes that are not UTF-8, unknown commands, bad JSON and bad tokens
        become ``"?"`` records with the reason and the line; what they seem
        to be (command, stream, instance) is kept for the filters."""
        not_utf8, unknown, bad_json = (
            record_from_line(line, ts=2.0, source="s") for line in GARBAGE
        )
        assert not_utf8 is not None and unknown is not None and bad_json is not None
        self.assertEqual(
            not_utf8.to_json(),
            {
                "ts": 2.0,
                "source": "s",
                "command": "?",
                "error": "not UTF-8 (byte 0 of 17)",
                "raw": "\\xff\\xfeRDATA not utf-8",
            },
        )
        self.assertEqual(unknown.command, NOT_UNDERSTOOD)
        self.assertIn("unknown command 'FROBNICATE'", unknown.error or "")
        self.assertEqual(unknown.raw, "FROBNICATE events master 3")
        self.assertIsNone(unknown.stream)
        self.assertEqual(
            (bad_json.command, bad_json.guessed_command, bad_json.stream, bad_json.instance),
            ("?", "RDATA", "events", "master"),
        )
        self.assertIn("bad JSON", bad_json.error or "")
        bad_token = record_from_line(b"POSITION typing master one 2", ts=0, source="s")
        assert bad_token is not None
        self.assertIn("prev_token 'one' is not an integer", bad_token.error or "")
        self.assertEqual(bad_token.stream, "typing")
        # Blank lines are ignored, as every reader does.
        self.assertIsNone(record_from_line(b"  ", ts=0, source="s"))

    def test_rows_that_do_not_parse_are_shown_with_the_reason(self) -> None:
        """A row of a known stream that lacks its shape is shown raw, with
        the reason, and marked in the table."""
        record = record_from_line(b'RDATA typing master 3 ["!r:x"]', ts=0, source="s")
        assert record is not None
        self.assertEqual(record.command, "RDATA")
        self.assertEqual(record.fields, {"row": ["!r:x"]})
        self.assertIn("not a valid typing row", record.error or "")
        self.assertTrue(TableFormatter(clock=_fixed_time).format(record).startswith("!!"))

    def test_access_tokens_are_masked(self) -> None:
        """USER_IP shows the first four characters of the token; a USER_IP
        that does not parse shows only the user id; anything unreadable on
        the USER_IP channel is not shown; a token elsewhere (a cache
        invalidation keyed by token, a hand-made line) is masked too."""
        good = record_from_line(GOOD_USER_IP.encode(), ts=0, source="s")
        assert good is not None
        self.assertEqual(
            good.fields,
            {
                "user_id": "@alice:test.local",
                "access_token": "syt_\u2026",
                "ip": "10.1.2.3",
                "user_agent": "Element/1.11",
                "device_id": "ALICEDEVICE",
                "last_seen": 1795808079000,
            },
        )
        self.assertIn("token=syt_\u2026", TableFormatter(clock=_fixed_time).format(good))
        bad = record_from_line(BAD_USER_IP.encode(), ts=0, source="s")
        on_channel = record_from_line(
            b"NOT_A_COMMAND " + ACCESS_TOKEN.encode(), ts=0, source="s", holds_secrets=True
        )
        not_utf8 = record_from_line(b"\xff" + ACCESS_TOKEN.encode(), ts=0, source="s", holds_secrets=True)
        caches = record_from_line(
            b'RDATA caches master 5 ["get_user_by_access_token",["abcdefghijklmnopqrstuvwx"],17]',
            ts=0,
            source="s",
        )
        elsewhere = record_from_line(f"REMOTE_SERVER_UP {ACCESS_TOKEN}".encode(), ts=0, source="s")
        hand_made = record_from_line(f"ERROR bad token {ACCESS_TOKEN}".encode(), ts=0, source="s")
        for record in (bad, on_channel, not_utf8, caches, elsewhere, hand_made):
            assert record is not None
            shown = JsonFormatter().format(record) + TableFormatter().format(record)
            _assert_no_secrets(self, shown)
        assert bad is not None and caches is not None and hand_made is not None
        self.assertEqual(
            bad.raw, "USER_IP @alice:test.local <54 more characters not shown: may hold an access token>"
        )
        self.assertEqual(caches.fields["parsed"]["keys"], ["abcd\u2026"])
        self.assertEqual(hand_made.fields, {"message": "bad token syt_\u2026"})
        self.assertEqual(mask_access_token("short"), "<redacted>")
        self.assertEqual(scrub_text("event $abc_syt_x no token"), "event $abc_syt_x no token")

    def test_record_from_every_command(self) -> None:
        """Commands that only travel over TCP or between workers have their
        fields named too."""
        cases = {
            "USER_SYNC worker1 @u:x DEV start 17": {
                "command": "USER_SYNC",
                "instance": "worker1",
                "user_id": "@u:x",
                "device_id": "DEV",
                "state": "start",
                "last_sync_ms": 17,
            },
            "FEDERATION_ACK fed1 12": {"command": "FEDERATION_ACK", "instance": "fed1", "token": 12},
            "CLEAR_USER_SYNC worker1": {"command": "CLEAR_USER_SYNC", "instance": "worker1"},
            "REMOTE_SERVER_UP other.org": {"command": "REMOTE_SERVER_UP", "server": "other.org"},
            "SERVER test.local": {"command": "SERVER", "server": "test.local"},
            "NAME worker1": {"command": "NAME", "instance": "worker1"},
            "PING 1795808079000": {"command": "PING", "data": "1795808079000"},
            "ERROR Failed to keep up": {"command": "ERROR", "message": "Failed to keep up"},
            "NEW_ACTIVE_TASK t1": {"command": "NEW_ACTIVE_TASK", "task_id": "t1"},
            "CANCEL_TASK t1": {"command": "CANCEL_TASK", "task_id": "t1"},
        }
        for line, expected in cases.items():
            record = record_from_command(parse_command_from_line(line), ts=0, source="s")
            shown = record.to_json()
            del shown["ts"], shown["source"]
            self.assertEqual(shown, expected)


class TableFormatterTests(TypedTestCase):
    """The table's columns stay where they are, whatever flows."""

    def _records(self) -> list[TailRecord]:
        records = _wire_records()
        for line in (*GARBAGE, GOOD_USER_IP.encode(), b'RDATA typing master 3 ["!r:x"]'):
            record = record_from_line(line, ts=1.0, source="s")
            assert record is not None
            records.append(record)
        records.append(
            record_from_row(
                "events",
                "event_persister_with_a_long_name",
                123456789012,
                ["state-all", ["!r:x"]],
                ts=1.0,
                source="http://127.0.0.1:1",
                catch_up=True,
            )
        )
        return records

    def test_columns_are_aligned(self) -> None:
        """Every line has each column at the header's offset and width:
        long names are cut with an ellipsis, tokens right-aligned, the
        summary last. Only a token wider than its column widens its line."""
        formatter = TableFormatter(clock=_fixed_time)
        (header,) = formatter.header()
        self.assertEqual(
            header,
            "   TIME         COMMAND          STREAM                  INSTANCE              TOKEN  SUMMARY",
        )
        offsets = {name: header.index(name) for name in ("TIME", "COMMAND", "STREAM", "INSTANCE", "SUMMARY")}
        token_end = header.index("TOKEN") + len("TOKEN")
        for record in self._records():
            line = formatter.format(record)
            self.assertEqual(line[offsets["TIME"] : offsets["TIME"] + 12], "12:34:56.789")
            self.assertEqual(line[offsets["COMMAND"] :].split(" ")[0], record.command)
            stream = line[offsets["STREAM"] : offsets["INSTANCE"] - 1].rstrip()
            expected_stream = record.stream or ""
            if len(expected_stream) > 23:
                expected_stream = expected_stream[:22] + "\u2026"
            self.assertEqual(stream, expected_stream)
            token = "" if record.token is None else str(record.token)
            if len(token) <= 10:
                self.assertEqual(line[token_end - 10 : token_end], token.rjust(10))
                self.assertEqual(line[offsets["SUMMARY"] :], summarize(record))
            self.assertEqual(line[:2], "!!" if record.error else "<<" if record.catch_up else "  ")
        long_instance = formatter.format(self._records()[-1])
        self.assertIn(" event_persister\u2026 ", long_instance)
        self.assertIn(" 123456789012  state-all room=!r:x", long_instance)

    def test_content(self) -> None:
        """Rows are summarised by what identifies them; the terminal width
        cuts the summary; control characters are escaped, not sent to the
        terminal."""
        formatter = TableFormatter(clock=_fixed_time)
        lines = {summarize(r) for r in _wire_records()}
        for expected in (
            "ev m.room.create $d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw "
            "room=!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw state_key=\"\"",
            'state m.room.member "@alice:test.local" -> $u6h5U4H8wq-dLk4b5r_TyTVj3dNCot7tGb3zXxyzHIQ '
            "room=!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw",
            "!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw typing: @bob:test.local, @alice:test.local",
            "!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw typing: (nobody)",
            "m.read @bob:test.local -> $HUoL8AYh8x5igoEugSZz-tY2bi3F-PNpkWVeZPDsBJ0 "
            "room=!d_tXgWi4NVZeupIpSMBMq8d6fg7tTFudHsVTQLtqLZw thread=main",
            "prev=1 new=1",
            "lock=update_join_states_lock key=@alice:test.local",
            '[null,"EVhjAWResdhVAXKfWbDVeuRr",1]',
        ):
            self.assertIn(expected, lines)
        for record in self._records():
            self.assertTrue(len(TableFormatter(width=100, clock=_fixed_time).format(record)) <= 100)
        nasty = record_from_line(
            b'RDATA typing master 3 ["!r:x\\u001b[2J\\u202e",["@a:x"]]', ts=0, source="s"
        )
        assert nasty is not None
        line = formatter.format(nasty)
        self.assertIn("!r:x\\x1b[2J\\u202e typing: @a:x", line)
        self.assertTrue(line.isprintable())


class FilterTests(TypedTestCase):
    def test_filters(self) -> None:
        """Each option keeps records whose value is listed; options combine;
        a line not understood matches '?' and the command it seemed to be."""
        records = _wire_records()
        garbage = [record_from_line(line, ts=0, source="s") for line in GARBAGE]

        def kept(f: TailFilter, extra: Sequence[TailRecord | None] = ()) -> list[TailRecord]:
            return [r for r in [*records, *extra] if r is not None and f(r)]

        self.assertEqual(len(kept(TailFilter())), len(records))
        events = kept(TailFilter(streams=frozenset({"events"})))
        self.assertEqual({r.stream for r in events}, {"events"})
        self.assertEqual(len(events), 42 + 6)
        self.assertEqual(len(kept(TailFilter(commands=frozenset({"LOCK_RELEASED"})))), 43)
        self.assertEqual(kept(TailFilter(instances=frozenset({"worker1"}))), [])
        typing_rows = kept(
            TailFilter(
                streams=frozenset({"typing"}),
                instances=frozenset({"master"}),
                commands=frozenset({"RDATA"}),
            ),
            garbage,
        )
        self.assertEqual([r.token for r in typing_rows], [1, 2, 3, 4])
        self.assertEqual(len(kept(TailFilter(commands=frozenset({"?"})), garbage)), 3)
        # The broken RDATA line of the events stream is still shown to
        # someone watching events rows.
        broken = kept(
            TailFilter(streams=frozenset({"events"}), commands=frozenset({"RDATA"})), garbage
        )
        self.assertEqual(broken[-1].command, "?")
        self.assertEqual(len(broken), 43)


def _record(command: str, stream: str, token: int | str, instance: str = "master") -> TailRecord:
    fields: dict[str, Any] = {"row": []}
    if command == "POSITION":
        fields = {"prev_token": token, "new_token": token}
    return TailRecord(
        ts=0, source="s", command=command, stream=stream, instance=instance, token=token, fields=fields
    )


class StatsTests(TypedTestCase):
    """The --stats view for a known sequence, on a fake clock."""

    def test_rates_tokens_and_counts(self) -> None:
        """Rates are rows in the window over the window (or the time since
        start, at least a second); tokens are the latest seen, batch rows do
        not move them; a stream with several writers gets a total line."""
        collector = StatsCollector(start=100.0, window=10.0)
        collector.observe(_record("POSITION", "events", 5), 100.0)
        for i in range(20):  # 20 rows in the first two seconds
            collector.observe(_record("RDATA", "events", 6 + i), 100.0 + i * 0.1)
        collector.observe(_record("RDATA", "events", "batch"), 102.0)
        collector.observe(_record("RDATA", "events", 3, instance="persister2"), 102.5)
        collector.observe(_record("RDATA", "typing", 9), 103.0)
        collector.observe(_record("POSITION", "typing", 12), 103.5)
        lock = record_from_line(b'LOCK_RELEASED ["master","l","k"]', ts=0, source="s")
        garbage = record_from_line(b"nonsense", ts=0, source="s")
        assert lock is not None and garbage is not None
        collector.observe(lock, 103.5)
        collector.observe(garbage, 103.5)

        snapshot = collector.snapshot(104.0)
        by_key = {(line.stream, line.instance): line for line in snapshot.lines}
        self.assertEqual(
            [(line.stream, line.instance) for line in snapshot.lines],
            [("events", "master"), ("events", "persister2"), ("events", "*"), ("typing", "master")],
        )
        self.assertEqual(by_key[("events", "master")].rate, 21 / 4)
        self.assertEqual(by_key[("events", "master")].token, 25)
        self.assertEqual(by_key[("events", "master")].rows, 21)
        self.assertEqual(by_key[("events", "master")].positions, 1)
        self.assertEqual(by_key[("events", "*")].token, 3)
        self.assertEqual(by_key[("events", "*")].rows, 22)
        self.assertEqual(by_key[("typing", "master")].token, 12)
        self.assertEqual(by_key[("typing", "master")].rate, 1 / 4)
        self.assertEqual(snapshot.not_understood, 1)
        self.assertEqual(snapshot.total, 27)

        # Twenty seconds later nothing is recent: the rates fall to zero,
        # the tokens and counts stay.
        later = collector.snapshot(124.0)
        self.assertEqual([line.rate for line in later.lines], [0.0, 0.0, 0.0, 0.0])
        self.assertEqual(later.lines[0].token, 25)

        text = render_stats(snapshot, "redis:test.local", clock=_fixed_time)
        self.assertEqual(
            text,
            [
                "tail redis:test.local | 12:34:56.789 | up 4 s | rates over the last 10 s",
                "STREAM                   INSTANCE             ROWS/S        TOKEN       ROWS  POSITIONS",
                "events                   master                  5.2           25         21          1",
                "events                   persister2              0.2            3          1          0",
                "events                   *                       5.5            3         22          1",
                "typing                   master                  0.2           12          1          1",
                "27 commands (? 1, LOCK_RELEASED 1, POSITION 2, RDATA 23); 1 not understood",
            ],
        )

    def test_sink_refreshes_on_the_clock(self) -> None:
        """The sink shows a block per interval (or a JSON object with
        --format json), counts only what passes the filter, and is done
        after --count refreshes."""
        clock = Clock()
        clock.advance(1000)
        out = io.StringIO()
        done: list[bool] = []
        sink = StatsSink(
            out=out,
            clock=clock,
            accept=TailFilter(streams=frozenset({"events"})),
            source="tcp://x",
            interval=0.5,
            window=10.0,
            ansi=False,
            as_json=True,
            width=None,
            count=2,
            on_done=lambda: done.append(True),
        )
        sink.start()
        sink(_record("RDATA", "events", 1))
        sink(_record("RDATA", "typing", 1))
        clock.advance(0.5)
        sink(_record("RDATA", "events", 2))
        clock.advance(0.5)
        clock.advance(0.5)
        sink.stop()
        blocks = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(len(blocks), 2)
        self.assertEqual(
            [(s["stream"], s["token"], s["rows"]) for s in blocks[-1]["streams"]],
            [("events", 2, 2)],
        )
        self.assertEqual(blocks[-1]["streams"][0]["rate"], 2.0)
        self.assertEqual(done, [True])


class _FakeWriter:
    """Rows of one stream by token, served like the HTTP endpoint: at most
    `page` rows an answer, never splitting a token."""

    def __init__(self, rows: list[tuple[int, Any]], page: int = 100) -> None:
        self.rows = rows
        self.page = page
        self.calls: list[tuple[str, int, int]] = []
        self.fail: Exception | None = None

    async def fetch(self, instance: str, from_token: int, upto_token: int) -> StreamUpdateResult:
        self.calls.append((instance, from_token, upto_token))
        if self.fail is not None:
            raise self.fail
        wanted = [(t, r) for t, r in self.rows if from_token < t <= upto_token]
        if len(wanted) <= self.page:
            return wanted, upto_token, False
        last = wanted[self.page - 1][0]
        return [(t, r) for t, r in wanted if t <= last], last, True


def _typing_row(token: int) -> list[Any]:
    return ["!r:x", [f"@u{token}:x"]]


class CatchUpTests(TypedTestCase):
    """--catch-up-from in process: the fetched rows first, then live ones,
    none twice."""

    def _catch_up(
        self, writer: _FakeWriter, instances: Sequence[str] = (), from_token: int = 2
    ) -> tuple[CatchUp, Clock, list[TailRecord], io.StringIO]:
        clock = Clock()
        shown: list[TailRecord] = []
        progress = io.StringIO()
        catch_up = CatchUp(
            clock=clock,
            stream="typing",
            instances=instances,
            from_token=from_token,
            fetch=lambda instance: writer.fetch,
            where=lambda instance: "http://w:1",
            emit=shown.append,
            progress=CatchUpProgress(progress, tty=False, clock=clock),
            wait_s=5.0,
        )
        return catch_up, clock, shown, progress

    def _live(self, line: str) -> TailRecord:
        record = record_from_line(line.encode(), ts=0, source="redis:test.local")
        assert record is not None
        return record

    def test_target_from_first_live_row_and_no_duplicates(self) -> None:
        """The first live row of the writer is the target (a writer sends
        rows only up to its position); fetched rows come first, in pages;
        held live rows at or below the target (a whole batch group) are
        dropped, everything else is shown after, in order."""
        writer = _FakeWriter([(t, _typing_row(t)) for t in range(1, 11)], page=3)
        catch_up, _, shown, progress = self._catch_up(writer)
        running = Deferred.fromCoroutine(catch_up.run())
        catch_up(self._live('LOCK_RELEASED ["master","l","k"]'))
        catch_up(self._live("RDATA typing master batch " + json.dumps(_typing_row(9))))
        self.assertEqual(shown, [])
        catch_up(self._live("RDATA typing master 9 " + json.dumps(_typing_row(9))))
        self.successResultOf(running)
        catch_up(self._live("POSITION typing master 9 10"))
        catch_up(self._live("RDATA typing master batch " + json.dumps(_typing_row(10))))
        catch_up(self._live("RDATA typing master 10 " + json.dumps(_typing_row(10))))
        catch_up(self._live("RDATA typing master 11 " + json.dumps(_typing_row(11))))
        self.assertEqual(
            [(r.command, r.token, r.catch_up) for r in shown],
            [
                *[("RDATA", t, True) for t in range(3, 10)],
                ("LOCK_RELEASED", None, False),
                ("POSITION", 10, False),
                ("RDATA", "batch", False),
                ("RDATA", 10, False),
                ("RDATA", 11, False),
            ],
        )
        self.assertEqual([c[1:] for c in writer.calls], [(2, 9), (5, 9), (8, 9)])
        self.assertEqual(catch_up.duplicates, 2)
        self.assertEqual(shown[0].source, "http://w:1")
        self.assertIn("catch-up typing from master: done, 7 rows up to token 9", progress.getvalue())

    def test_target_from_position(self) -> None:
        """A POSITION's new token is the target: the rows up to it are
        fetched, later live ones shown, earlier ones dropped."""
        writer = _FakeWriter([(t, _typing_row(t)) for t in range(1, 8)])
        catch_up, _, shown, _ = self._catch_up(writer, instances=["master"])
        running = Deferred.fromCoroutine(catch_up.run())
        catch_up(self._live("POSITION typing master 5 7"))
        self.successResultOf(running)
        catch_up(self._live("RDATA typing master 7 " + json.dumps(_typing_row(7))))
        catch_up(self._live("RDATA typing master 8 " + json.dumps(_typing_row(8))))
        self.assertEqual([r.token for r in shown], [3, 4, 5, 6, 7, 7, 8])
        self.assertEqual(
            [r.command for r in shown], ["RDATA"] * 5 + ["POSITION", "RDATA"]
        )
        self.assertEqual(writer.calls, [("master", 2, 7)])

    def test_no_position_seen(self) -> None:
        """With the writer named but silent, rows are fetched until the
        writer has no more; with no writer named and none seen, the error
        says what to do."""
        writer = _FakeWriter([(t, _typing_row(t)) for t in range(1, 6)])
        catch_up, clock, shown, _ = self._catch_up(writer, instances=["master"])
        running = Deferred.fromCoroutine(catch_up.run())
        clock.advance(5)
        self.successResultOf(running)
        self.assertEqual([r.token for r in shown], [3, 4, 5])
        catch_up(self._live("RDATA typing master 5 " + json.dumps(_typing_row(5))))
        catch_up(self._live("RDATA typing master 6 " + json.dumps(_typing_row(6))))
        self.assertEqual([r.token for r in shown], [3, 4, 5, 6])

        anonymous, clock, _, _ = self._catch_up(writer)
        failed = Deferred.fromCoroutine(anonymous.run())
        clock.advance(5)
        error = self.failureResultOf(failed, CatchUpError).value
        self.assertIn("name it with --instance", str(error))

    def test_fetch_failure_is_reported(self) -> None:
        writer = _FakeWriter([])
        writer.fail = HttpCatchUpError(
            instance_name="master",
            stream_name="typing",
            from_token=2,
            upto_token=4,
            reason="HTTP 403 M_FORBIDDEN: Invalid replication secret",
            status=403,
        )
        catch_up, _, shown, _ = self._catch_up(writer)
        running = Deferred.fromCoroutine(catch_up.run())
        catch_up(self._live("POSITION typing master 4 4"))
        self.failureResultOf(running, HttpCatchUpError)
        self.assertEqual(shown, [])


class OptionsTests(TypedTestCase):
    """Options are checked before anything starts; errors never repeat a
    password."""

    def _options(self, *argv: str) -> Any:
        args = build_parser().parse_args(["tail", "--server-name", SERVER, *argv])
        return options_from_args(args, stdout_tty=False)

    def test_usage_errors(self) -> None:
        for argv, message in (
            ((), "give one bus"),
            (("--tcp", "h:1", "--redis", "redis://h"), "give one bus"),
            (("--tcp", "nowhere"), "expected HOST:PORT"),
            (("--tcp", "h:1", "--command", "RDTA"), "unknown command 'RDTA'"),
            (("--tcp", "h:1", "--replicate"), "--replicate is for Redis"),
            (("--tcp", "h:1", "--catch-up-from", "3"), "exactly one --stream"),
            (("--tcp", "h:1", "--catch-up-from", "3", "--stream", "typing"), "--writer-url"),
            (
                ("--tcp", "h:1", "--catch-up-from", "3", "--stream", "typing", "--writer-url", "http://h:2"),
                "replication secret",
            ),
            (("--tcp", "h:1", "--secret-file", "x"), "is for --catch-up-from"),
            ((f"--redis=redis://:{REDIS_PASSWORD}@h:port",), "not a valid URL"),
            ((f"--redis=redis://:{REDIS_PASSWORD}@h/x",), "database number"),
            ((f"--redis=http://:{REDIS_PASSWORD}@h",), "expected a redis://"),
            (("--redis", "redis://h", "--redis-password-file", "/nonexistent/pw"), "cannot read"),
            (("--redis", "redis://h", "--redis-ca-file", "ca.pem"), "need use_tls"),
        ):
            with self.assertRaises(UsageError) as raised:
                self._options(*argv)
            self.assertIn(message, str(raised.exception))
            self.assertNotIn(REDIS_PASSWORD, str(raised.exception))

    def test_catch_up_locations(self) -> None:
        """The writer's endpoint comes from --writer-url or from an
        instance_map, Synapse's (``main`` is the main process, ``master``),
        in a config file or alone; the secret from its file."""
        config = self.mktemp()
        with open(config, "w") as f:
            f.write(
                "server_name: test.local\n"
                "instance_map:\n"
                "  main: {host: 10.0.0.1, port: 9093}\n"
                "  persister1: {host: 10.0.0.2, port: 9094, tls: true}\n"
            )
        secret = self.mktemp()
        with open(secret, "w") as f:
            f.write(HTTP_SECRET + "\n")
        bad_yaml = self.mktemp()
        with open(bad_yaml, "w") as f:
            f.write(f"{HTTP_SECRET}: [\n")
        common = ("--tcp", "h:1", "--stream", "events", "--catch-up-from", "7", "--secret-file", secret)
        options = self._options(*common, "--instance-map-file", config, "--instance", "persister1")
        catch_up = options.catch_up
        self.assertEqual((catch_up.stream, catch_up.from_token, catch_up.instances), ("events", 7, ("persister1",)))
        self.assertEqual(catch_up.secret, HTTP_SECRET)
        self.assertNotIn(HTTP_SECRET, repr(options))
        self.assertEqual(
            {name: location.describe() for name, location in catch_up.instance_map.items()},
            {"master": "http://10.0.0.1:9093", "persister1": "https://10.0.0.2:9094"},
        )
        by_url = self._options(*common, "--writer-url", "https://writer.example:8443").catch_up
        self.assertEqual(by_url.writer_url.describe(), "https://writer.example:8443")
        for argv, message in (
            (("--writer-url", "ftp://h:1"), "expected http(s)://host:port"),
            (("--writer-url", f"http://u:{HTTP_SECRET}@h:1"), "not in the URL"),
            (("--writer-url", "http://h:1", "--instance-map-file", config), "one of them"),
            (("--instance-map-file", secret), "instance_map"),
            (("--instance-map-file", bad_yaml), "not valid YAML at line 2, column 1"),
        ):
            with self.assertRaises(UsageError) as raised:
                self._options(*common, *argv)
            self.assertIn(message, str(raised.exception))
            self.assertNotIn(HTTP_SECRET, str(raised.exception))

    def test_redis_settings(self) -> None:
        """The URL and the separate options give the same settings; the
        default format follows the terminal."""
        self.assertEqual(
            parse_redis_url(f"rediss://user:{REDIS_PASSWORD}@redis.example:6380/4"),
            {
                "password": REDIS_PASSWORD,
                "username": "user",
                "host": "redis.example",
                "port": 6380,
                "use_tls": True,
                "dbid": 4,
            },
        )
        self.assertEqual(
            parse_redis_url("unix:///run/redis.sock?db=2"), {"path": "/run/redis.sock", "dbid": 2}
        )
        options = self._options("--redis-host", "r", "--redis-port", "7000", "--redis-dbid", "1")
        self.assertEqual((options.redis.host, options.redis.port, options.redis.dbid), ("r", 7000, 1))
        self.assertEqual(options.format, "json")
        args = build_parser().parse_args(["tail", "--server-name", SERVER, "--tcp", "[::1]:9"])
        tty = options_from_args(args, stdout_tty=True)
        self.assertEqual((tty.format, tty.tcp), ("table", ("::1", 9)))
        self.assertTrue(tty.instance_name.startswith("tail-"))


# -- the command, as a subprocess


class _TailProcess(ProcessProtocol):
    """A running ``synapse-replication tail``: its output so far and its end."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.exit_code: int | None = None
        self.ended = False
        self.process: IProcessTransport | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data

    def errReceived(self, data: bytes) -> None:
        self.err += data

    def processEnded(self, reason: Failure) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.ended = True

    @property
    def stdout(self) -> str:
        return self.out.decode("utf-8")

    @property
    def stderr(self) -> str:
        return self.err.decode("utf-8", "replace")

    def lines(self) -> list[str]:
        """The complete lines printed so far."""
        return self.stdout.split("\n")[:-1]

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.lines()]

    async def wait_exit(self, timeout: float = 20.0) -> int:
        await wait_until(reactor, lambda: self.ended, f"tail exits; stderr:\n{self.stderr}", timeout)
        assert self.exit_code is not None
        return self.exit_code


class _SubprocessTestCase(TestCase):
    timeout = 40

    def spawn(self, *argv: str) -> _TailProcess:
        proto = _TailProcess()
        args = [sys.executable, "-m", "synapse_replication.cli", "tail", "-v", *argv]
        process = reactor.spawnProcess(proto, sys.executable, args, env=dict(os.environ))
        proto.process = process

        async def kill() -> None:
            if not proto.ended:
                process.signalProcess("KILL")
                await wait_until(reactor, lambda: proto.ended, "tail is killed")

        self.addCleanup(lambda: Deferred.fromCoroutine(kill()))
        return proto

    def secret_file(self, secret: str) -> str:
        path = str(self.mktemp())
        with open(path, "w") as f:
            f.write(secret + "\n")
        return path

    async def until(self, condition: Callable[[], bool], what: str, proto: _TailProcess) -> None:
        def check() -> bool:
            if proto.ended and not condition():
                raise AssertionError(
                    f"tail exited ({proto.exit_code}) before {what}; stderr:\n{proto.stderr}"
                )
            return condition()

        await wait_until(reactor, check, what, timeout=20)


class TailRedisTests(_SubprocessTestCase):
    """tail on a real redis-server, fed what a real Synapse published."""

    async def _redis(self) -> tuple[RedisServer, RawRedis, RawRedis]:
        """A server with a password, a connection to publish with and one
        that records everything published on the channels."""
        server = await start_redis(self, reactor, password=REDIS_PASSWORD)
        publisher = await RawRedis.connect(reactor, server.settings())
        observer = await RawRedis.connect(reactor, server.settings())
        self.addCleanup(lambda: Deferred.fromCoroutine(publisher.close()))
        self.addCleanup(lambda: Deferred.fromCoroutine(observer.close()))
        await observer.subscribe(SERVER, USER_IP_CHANNEL)
        return server, publisher, observer

    async def _subscribed(self, publisher: RawRedis, proto: _TailProcess, channel: str = SERVER) -> None:
        """Until tail (and the observer) listen on `channel`."""
        deadline = reactor.seconds() + 20
        while True:
            reply = await publisher.execute("PUBSUB", "NUMSUB", channel)
            assert isinstance(reply, list) and isinstance(reply[1], int)
            if reply[1] >= 2:
                return
            if proto.ended or reactor.seconds() > deadline:
                raise AssertionError(f"tail did not subscribe to {channel}; stderr:\n{proto.stderr}")
            await deferLater(reactor, 0.02, lambda: None)

    async def _publish(self, publisher: RawRedis, lines: Sequence[bytes | str], channel: str = SERVER) -> None:
        for line in lines:
            await publisher.execute("PUBLISH", channel, line)

    async def test_every_wire_line_as_json(self) -> None:
        """Every line Synapse published is shown, in order, as JSON: known
        streams parsed, unknown ones raw, LOCK_RELEASED, REPLICATE and
        POSITION included; garbage is marked and the next line still shown;
        USER_IP has its token masked. tail publishes nothing, and neither the
        Redis password nor the token appears anywhere."""
        server, publisher, observer = await self._redis()
        wire = [line.encode("utf-8") for line in wire_lines()]
        extra_main = [*GARBAGE, AFTER_GARBAGE]
        extra_user_ip = [GOOD_USER_IP.encode(), BAD_USER_IP.encode(), b"\xff" + ACCESS_TOKEN.encode()]
        total = len(wire) + len(extra_main) + len(extra_user_ip)
        proto = self.spawn(
            "--redis", f"redis://127.0.0.1:{server.port}",
            "--redis-password-file", self.secret_file(REDIS_PASSWORD),
            "--server-name", SERVER,
            "--user-ip",
            "--count", str(total),
        )  # fmt: skip
        await self._subscribed(publisher, proto, USER_IP_CHANNEL)
        await self._publish(publisher, wire + extra_main)
        await self._publish(publisher, extra_user_ip, USER_IP_CHANNEL)
        self.assertEqual(await proto.wait_exit(), 0, proto.stderr)

        records = proto.records()
        self.assertEqual(len(records), total)
        for line, record in zip(wire_lines(), records, strict=False):
            cmd = parse_command_from_line(line)
            self.assertEqual(record["command"], cmd.NAME)
            self.assertEqual(record["source"], "redis:test.local")
            self.assertNotIn("error", record)
            if isinstance(cmd, RdataCommand):
                self.assertEqual((record["stream"], record["row"]), (cmd.stream_name, cmd.row))
                self.assertEqual("parsed" in record, cmd.stream_name in STREAMS_MAP)
        shown = {r["command"] for r in records}
        self.assertTrue({"LOCK_RELEASED", "REPLICATE", "POSITION", "RDATA", "USER_IP", "?"} <= shown)
        self.assertEqual(
            {r["stream"] for r in records[: len(wire)] if r["command"] == "RDATA" and "parsed" not in r},
            {"quarantined_media", "thread_subscriptions", "sticky_events"},
        )
        garbage = records[len(wire) : len(wire) + 3]
        self.assertEqual([r["command"] for r in garbage], ["?", "?", "?"])
        self.assertEqual(garbage[0]["raw"], "\\xff\\xfeRDATA not utf-8")
        self.assertIn("unknown command 'FROBNICATE'", garbage[1]["error"])
        self.assertIn("bad JSON", garbage[2]["error"])
        after = records[len(wire) + 3]
        self.assertEqual((after["command"], after["token"]), ("RDATA", 9))
        self.assertEqual(after["parsed"]["user_ids"], ["@carol:test.local"])
        user_ip, bad_user_ip, unreadable = records[-3:]
        self.assertEqual(user_ip["source"], "redis:test.local/USER_IP")
        self.assertEqual(user_ip["access_token"], "syt_\u2026")
        self.assertEqual((bad_user_ip["command"], unreadable["command"]), ("?", "?"))
        self.assertNotIn("raw", unreadable)
        _assert_no_secrets(self, proto.stdout, proto.stderr)
        # Only what the test published went over the channels.
        await wait_until(reactor, lambda: len(observer.messages) >= total, "the observer got all")
        self.assertEqual(len(observer.messages), total)

    async def test_filters_in_a_table(self) -> None:
        """--stream, --instance and --command together, in the table format:
        only events and typing rows of master, plus the broken events line;
        the header once, the columns aligned. The password given in the URL
        is not shown either."""
        server, publisher, _ = await self._redis()
        wire = [line.encode("utf-8") for line in wire_lines()]
        wanted = [
            line
            for line in wire_lines()
            if line.startswith(("RDATA events master", "RDATA typing master"))
        ]
        other = b'RDATA events persister2 99 ["state-all",["!r:x"]]'
        proto = self.spawn(
            "--redis", f"redis://:{REDIS_PASSWORD}@127.0.0.1:{server.port}/0",
            "--server-name", SERVER,
            "--format", "table",
            "--stream", "events", "--stream", "typing",
            "--instance", "master",
            "--command", "RDATA",
            "--count", str(len(wanted) + 2),
        )  # fmt: skip
        await self._subscribed(publisher, proto)
        await self._publish(publisher, [other, *wire, *GARBAGE, AFTER_GARBAGE])
        self.assertEqual(await proto.wait_exit(), 0, proto.stderr)
        header, *lines = proto.lines()
        self.assertTrue(header.startswith("   TIME         COMMAND          STREAM"))
        self.assertEqual(len(lines), len(wanted) + 2)
        command_at, token_end = header.index("COMMAND"), header.index("TOKEN") + len("TOKEN")
        for line, wire_line in zip(lines, wanted, strict=False):
            _, stream, instance, token, _ = wire_line.split(" ", 4)
            self.assertEqual(line[command_at:].split()[:3], ["RDATA", stream, instance])
            self.assertEqual(line[token_end - 10 : token_end], token.rjust(10))
        broken, after = lines[-2:]
        self.assertTrue(broken.startswith("!! "))
        self.assertIn(" ? ", broken)
        self.assertIn("@carol:test.local", after)
        _assert_no_secrets(self, proto.stdout, proto.stderr)

    async def test_stats_and_replicate(self) -> None:
        """--stats when stdout is not a terminal: a block of plain lines per
        refresh, with each stream's rows and latest token for what was
        published. --replicate publishes exactly one REPLICATE, once
        subscribed. SIGTERM ends tail cleanly."""
        server, publisher, observer = await self._redis()
        proto = self.spawn(
            "--redis", f"redis://127.0.0.1:{server.port}",
            "--redis-password", REDIS_PASSWORD,
            "--server-name", SERVER,
            "--replicate",
            "--stats", "--stats-interval", "0.1",
        )  # fmt: skip
        await self.until(
            lambda: observer.lines_on(SERVER) == ["REPLICATE "], "tail publishes REPLICATE", proto
        )
        await self._publish(publisher, [line.encode("utf-8") for line in wire_lines()])

        expected: dict[str, tuple[int, int]] = {}  # stream -> (latest token, rows)
        for line in wire_lines():
            cmd = parse_command_from_line(line)
            if isinstance(cmd, RdataCommand):
                token, rows = expected.get(cmd.stream_name, (0, 0))
                expected[cmd.stream_name] = (token if cmd.token is None else cmd.token, rows + 1)
            elif isinstance(cmd, PositionCommand):
                token, rows = expected.get(cmd.stream_name, (0, 0))
                expected[cmd.stream_name] = (cmd.new_token, rows)

        def last_block() -> list[str]:
            blocks = proto.stdout.split("\n\n")
            return blocks[-2].splitlines() if len(blocks) > 1 else []

        await self.until(
            lambda: any("231 commands" in line for line in last_block()),
            "a block with every published command",
            proto,
        )
        block = last_block()
        self.assertTrue(block[0].startswith(f"tail redis:{SERVER} | "))
        shown = {line.split()[0]: line.split() for line in block[2:-1]}
        self.assertEqual(set(shown), set(expected))
        for stream, (token, count) in expected.items():
            _, instance, _, shown_token, shown_rows, _ = shown[stream]
            self.assertEqual((instance, int(shown_token), int(shown_rows)), ("master", token, count))
        # Synapse's two REPLICATEs and ours.
        self.assertIn("REPLICATE 3", block[-1])
        await wait_until(
            reactor, lambda: len(observer.lines_on(SERVER)) >= 231, "the observer got all"
        )
        self.assertEqual(observer.lines_on(SERVER).count("REPLICATE "), 3)
        assert proto.process is not None
        proto.process.signalProcess("TERM")
        self.assertEqual(await proto.wait_exit(), 130)
        self.assertNotIn("Traceback", proto.stderr)
        _assert_no_secrets(self, proto.stdout, proto.stderr)


class _FakeServer(Protocol):
    """A replication server that sends what the test says, and records
    what the client sends."""

    def __init__(self, lines: list[bytes], received: list[bytes]) -> None:
        self._lines = lines
        self.received = received

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(line + b"\n" for line in self._lines))

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.received.append(b"<closed>")


class TailTcpTests(_SubprocessTestCase):
    """tail as a TCP client of a writer."""

    async def _writer(self, *, http_secret: str | None = None) -> tuple[WriterInstance, int | None]:
        writer = await start_writer(reactor, db_path=self.mktemp() + ".db", server_name=SERVER)

        async def stop() -> None:
            # The tail has exited; wait until the writer has seen it go.
            await wait_until(reactor, lambda: not writer.server_factory.connections, "tail is gone")
            await writer.stop()

        self.addCleanup(lambda: Deferred.fromCoroutine(stop()))
        http_port = None
        if http_secret is not None:
            resource = ReplicationHttpResource(
                instance_name=writer.instance_name,
                streams=writer.streams,
                secret=http_secret,
                clock=reactor,
            )
            tracked = WrappingFactory(make_replication_site(resource))
            listening = listen_http(reactor, 0, cast(ServerFactory[Any], tracked))
            self.addCleanup(lambda: Deferred.fromCoroutine(self._stop_http(listening, tracked)))
            address = listening.getHost()
            assert isinstance(address, IPv4Address)
            http_port = address.port
        return writer, http_port

    async def _stop_http(self, listening: IListeningPort, tracked: WrappingFactory) -> None:
        await listening.stopListening()  # type: ignore[misc]  # Twisted types it loosely
        for protocol in list(tracked.protocols):
            protocol.transport.loseConnection()
        await wait_until(reactor, lambda: not tracked.protocols, "HTTP connections closed")

    async def _rows(self, writer: WriterInstance, after: int) -> list[list[Any]]:
        """The store's events rows after `after`, as [token, row]."""
        events = writer.streams["events"]
        updates, _, limited = await events.update_function(
            "master", after, events.current_token("master"), 10_000
        )
        assert not limited
        return [[token, decode_json(json.dumps(row))] for token, row in updates]

    async def _tail_connected(self, writer: WriterInstance, proto: _TailProcess) -> None:
        await self.until(
            lambda: any(
                (c.peer_name() or "").startswith("tail-") for c in writer.server_factory.connections
            ),
            "tail connects and names itself",
            proto,
        )

    async def test_rows_written_show_up(self) -> None:
        """Rows written to the writer's store after tail connected are shown
        as RDATA, after the POSITIONs that answer the handshake's REPLICATE."""
        writer, _ = await self._writer()
        room = "!tail:test.local"
        proto = self.spawn(
            "--tcp", f"127.0.0.1:{writer.listening_port()}",
            "--server-name", SERVER,
            "--command", "RDATA", "--command", "POSITION",
            "--count", "7",
        )  # fmt: skip
        await self._tail_connected(writer, proto)
        await self.until(lambda: len(proto.lines()) == 3, "the handshake's POSITIONs", proto)
        before = writer.streams["events"].current_token("master")
        await inject.inject_member(writer.stores.events, room, "@alice:test.local", "join")
        await inject.inject_message(writer.stores.events, room, "@alice:test.local", "hi")
        inject.inject_typing(writer.typing, room, "@alice:test.local")
        self.assertEqual(await proto.wait_exit(), 0, proto.stderr)

        records = proto.records()
        self.assertEqual(
            sorted((r["command"], r["stream"]) for r in records[:3]),
            [("POSITION", "events"), ("POSITION", "receipts"), ("POSITION", "typing")],
        )
        self.assertTrue(all(r["source"].startswith("tcp://127.0.0.1:") for r in records))
        rows = [r for r in records[3:] if r["stream"] == "events"]
        self.assertEqual(_resolved(rows), await self._rows(writer, before))
        self.assertEqual(sorted(r["parsed"]["kind"] for r in rows), ["ev", "ev", "state"])
        (typing,) = [r for r in records[3:] if r["stream"] == "typing"]
        self.assertEqual(typing["parsed"], {"room_id": room, "user_ids": ["@alice:test.local"]})

    async def test_lines_not_understood_keep_the_connection(self) -> None:
        """A worker drops a server that sends a bad line; tail shows the line,
        marked, and goes on reading on the same connection without sending
        an ERROR. A command a server may not send is shown too."""
        received: list[bytes] = []
        lines = [
            b"SERVER " + SERVER.encode(),
            b"PING 1",
            b"\xff\xfe",
            b'RDATA events master 3 ["ev",',
            b"USER_SYNC w1 @u:x DEV start 1",
            b'RDATA typing master 7 ["!r:x",["@a:x"]]',
        ]
        factory = Factory.forProtocol(lambda: _FakeServer(lines, received))
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proto = self.spawn(
            "--tcp", f"127.0.0.1:{listening.getHost().port}",
            "--server-name", SERVER,
            "--count", str(len(lines)),
        )  # fmt: skip
        self.assertEqual(await proto.wait_exit(), 0, proto.stderr)
        await wait_until(reactor, lambda: b"<closed>" in received, "the connection is closed")
        records = proto.records()
        self.assertEqual(
            [r["command"] for r in records], ["SERVER", "PING", "?", "?", "USER_SYNC", "RDATA"]
        )
        self.assertEqual(records[-1]["parsed"], {"room_id": "!r:x", "user_ids": ["@a:x"]})
        sent = b"".join(received)
        self.assertIn(b"NAME tail-", sent)
        self.assertIn(b"REPLICATE", sent)
        self.assertNotIn(b"ERROR", sent)

    async def test_timeout_before_count(self) -> None:
        """--timeout ends a tail that has not printed --count lines yet with
        exit code 1 and says so; the lines it did print are there."""
        received: list[bytes] = []
        factory = Factory.forProtocol(lambda: _FakeServer([b"SERVER " + SERVER.encode()], received))
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        proto = self.spawn(
            "--tcp", f"127.0.0.1:{listening.getHost().port}",
            "--server-name", SERVER,
            "--count", "5",
            "--timeout", "1.5",
        )  # fmt: skip
        self.assertEqual(await proto.wait_exit(), 1)
        await wait_until(reactor, lambda: b"<closed>" in received, "the connection is closed")
        self.assertEqual([r["command"] for r in proto.records()], ["SERVER"])
        self.assertIn("tail: timed out after 1.5 s with 1 of 5 lines", proto.stderr)

    async def test_catch_up_then_live(self) -> None:
        """--catch-up-from: the rows after the token are fetched from the
        writer's HTTP endpoint and shown first (marked), then the live ones;
        no row twice; progress on stderr; the secret shown nowhere."""
        writer, http_port = await self._writer(http_secret=HTTP_SECRET)
        room = "!catchup:test.local"
        events = writer.stores.events
        await inject.inject_message(events, room, "@alice:test.local", "one")
        start = writer.streams["events"].current_token("master")
        await inject.inject_member(events, room, "@bob:test.local", "join")
        for body in ("two", "three", "four"):
            await inject.inject_message(events, room, "@bob:test.local", body)
        missed = await self._rows(writer, start)
        target = writer.streams["events"].current_token("master")
        proto = self.spawn(
            "--tcp", f"127.0.0.1:{writer.listening_port()}",
            "--server-name", SERVER,
            "--stream", "events",
            "--catch-up-from", str(start),
            "--writer-url", f"http://127.0.0.1:{http_port}",
            "--secret-file", self.secret_file(HTTP_SECRET),
            "--count", str(len(missed) + 1 + 3),
        )  # fmt: skip
        await self.until(lambda: len(proto.lines()) == len(missed) + 1, "the catch-up", proto)
        await inject.inject_member(events, room, "@carol:test.local", "join")
        await inject.inject_message(events, room, "@carol:test.local", "live")
        self.assertEqual(await proto.wait_exit(), 0, proto.stderr)

        records = proto.records()
        fetched, position, live = records[: len(missed)], records[len(missed)], records[len(missed) + 1 :]
        self.assertEqual([[r["token"], r["row"]] for r in fetched], missed)
        self.assertTrue(all(r["catch_up"] and r["source"] == f"http://127.0.0.1:{http_port}" for r in fetched))
        self.assertEqual((position["command"], position["token"]), ("POSITION", target))
        self.assertEqual(_resolved(live), await self._rows(writer, target))
        self.assertTrue(all("catch_up" not in r for r in live))
        pairs = [json.dumps(pair) for pair in [*_resolved(fetched), *_resolved(live)]]
        self.assertEqual(len(pairs), len(set(pairs)))
        self.assertIn(
            f"catch-up events from master: done, {len(missed)} rows up to token {target}",
            proto.stderr,
        )
        _assert_no_secrets(self, proto.stdout, proto.stderr)

    async def test_catch_up_with_a_bad_secret(self) -> None:
        """A wrong secret is a clear error and exit code 3; nothing is shown
        as if it had been caught up."""
        writer, http_port = await self._writer(http_secret=HTTP_SECRET)
        await inject.inject_message(writer.stores.events, "!r:test.local", "@a:test.local")
        proto = self.spawn(
            "--tcp", f"127.0.0.1:{writer.listening_port()}",
            "--server-name", SERVER,
            "--stream", "events",
            "--catch-up-from", "0",
            "--writer-url", f"http://127.0.0.1:{http_port}",
            "--secret", REDIS_PASSWORD,
        )  # fmt: skip
        self.assertEqual(await proto.wait_exit(), 3)
        self.assertIn("tail: catch-up failed:", proto.stderr)
        self.assertIn("HTTP 403 M_FORBIDDEN: Invalid replication secret", proto.stderr)
        self.assertEqual(proto.stdout, "")
        _assert_no_secrets(self, proto.stdout, proto.stderr)
