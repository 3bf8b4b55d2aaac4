# -*- test-case-name: tests.test_demo -*-
"""Tests for `synapse-replication demo`: a real run end to end, and the parts
that decide its verdict (digests, the comparison, the load's accounting)."""

from __future__ import annotations

import hashlib
import io
import os
import random
import re
import subprocess
import sys
from typing import Any, Final, cast

from twisted.internet import reactor as _global_reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synapse_replication.cli import EXIT_USAGE, build_parser, main
from synapse_replication.demo import (
    DEMO_STREAMS,
    SECRET_ENV,
    DemoWorkerDataHandler,
    Digest,
    Expected,
    LoadGenerator,
    ProgressDisplay,
    ProgressSnapshot,
    WorkerProgress,
    WorkerReport,
    compare_worker,
    digest_from_source,
    digest_updates,
    normalize_typing,
    render_line,
)
from synapse_replication.instance import start_writer
from synapse_replication.streams import EventsStream, ReceiptsStream, TypingStream
from synapse_replication.streams.events import (
    EventsStreamAllStateRow,
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
)
from synapse_replication.streams.receipts import ReceiptsStreamRow
from synapse_replication.streams.typing import TypingStreamRow

REACTOR: Final = cast(Any, _global_reactor)
WRITER: Final = "master"
ROOM: Final = "!room:demo.local"


def _sha(lines: list[str]) -> str:
    return hashlib.sha256("".join(line + "\n" for line in lines).encode("ascii")).hexdigest()


def _known_rows_handler() -> DemoWorkerDataHandler:
    """A worker's handler that started at token 1 of every stream and then
    received a few rows of each."""
    data = DemoWorkerDataHandler()
    for stream in DEMO_STREAMS:
        data.on_position(stream, WRITER, 1)
    ev = EventsStreamEventRow("$e", ROOM, "m.room.topic", "", None, None, None, False, False)
    state = EventsStreamCurrentStateRow(ROOM, "m.room.topic", "", "$e")
    data.on_rdata(EventsStream.NAME, WRITER, 5, [ev, state])
    data.on_rdata(EventsStream.NAME, WRITER, 6, [EventsStreamAllStateRow(ROOM)])

    def receipt(event_id: str, user: str = "@a:x", thread: str | None = None) -> ReceiptsStreamRow:
        return ReceiptsStreamRow(ROOM, "m.read", user, event_id, thread, {"ts": 1})

    data.on_rdata(ReceiptsStream.NAME, WRITER, 3, [receipt("$1")])
    data.on_rdata(ReceiptsStream.NAME, WRITER, 4, [receipt("$2")])  # replaces token 3
    data.on_rdata(ReceiptsStream.NAME, WRITER, 7, [receipt("$2", thread="main")])
    data.on_rdata(TypingStream.NAME, WRITER, 2, [TypingStreamRow(ROOM, ("@a:x",))])
    data.on_rdata(TypingStream.NAME, WRITER, 3, [TypingStreamRow("!other:x", ("@b:x", "@a:x"))])
    data.on_rdata(TypingStream.NAME, WRITER, 4, [TypingStreamRow(ROOM, ())])
    return data


class WorkerDigestTests(SynchronousTestCase):
    def test_digests_of_known_rows(self) -> None:
        """The worker hashes ``[token,row]`` lines in canonical JSON: every
        events row, and the latest receipt of each key in token order."""
        report = _known_rows_handler().report("final", "worker1", WRITER, True)
        self.assertEqual(
            report.digests[EventsStream.NAME],
            Digest(
                3,
                _sha(
                    [
                        '[5,["ev",["$e","!room:demo.local","m.room.topic","",null,null,null,false,false]]]',
                        '[5,["state",["!room:demo.local","m.room.topic","","$e"]]]',
                        '[6,["state-all",["!room:demo.local"]]]',
                    ]
                ),
            ),
        )
        self.assertEqual(
            report.digests[ReceiptsStream.NAME],
            Digest(
                2,
                _sha(
                    [
                        '[4,["!room:demo.local","m.read","@a:x","$2",null,{"ts":1}]]',
                        '[7,["!room:demo.local","m.read","@a:x","$2","main",{"ts":1}]]',
                    ]
                ),
            ),
        )
        self.assertEqual(report.rows, {"events": 3, "receipts": 3, "typing": 3})
        self.assertEqual(report.start, {"events": 1, "receipts": 1, "typing": 1})
        self.assertEqual(report.positions, {"events": 6, "receipts": 7, "typing": 4})
        # Rooms where nobody types any more are left out.
        self.assertEqual(report.typing, {"!other:x": ["@b:x", "@a:x"]})

    def test_store_form_rows_hash_the_same(self) -> None:
        """Rows as SQLite returns them (booleans as 0/1) hash like the parsed
        rows a worker receives."""
        store_rows = [
            (5, ["ev", ["$e", ROOM, "m.room.topic", "", None, None, None, 0, 0]]),
            (5, ["state", [ROOM, "m.room.topic", "", "$e"]]),
            (6, ["state-all", [ROOM]]),
        ]
        worker = _known_rows_handler().report("final", "w", WRITER, True)
        self.assertEqual(
            digest_updates(EventsStream, store_rows).value(), worker.digests[EventsStream.NAME]
        )

    def test_progress_report_has_no_digests(self) -> None:
        """Progress reports stay small: positions and counts only."""
        report = _known_rows_handler().report("progress", "w", WRITER, True)
        self.assertEqual(report.digests, {})
        self.assertNotIn("digests", report.to_json())

    def test_report_json_round_trip(self) -> None:
        """A final report survives its JSON line unchanged."""
        report = _known_rows_handler().report(
            "final", "w", WRITER, False, {"events": 2, "typing": 1}, 1
        )
        self.assertEqual(WorkerReport.from_json(report.to_json()), report)

    def test_malformed_report_is_refused(self) -> None:
        """A line that is not a report raises ValueError naming the problem."""
        good = _known_rows_handler().report("final", "w", WRITER, True).to_json()
        changes: list[tuple[dict[str, Any], str]] = [
            ({"kind": "other"}, "kind"),
            ({"positions": {"events": "1"}}, "positions"),
            ({"digests": {"events": "abc"}}, "digest"),
            ({"typing": {ROOM: "@a:x"}}, "typing"),
        ]
        for change, message in changes:
            with self.assertRaisesRegex(ValueError, message):
                WorkerReport.from_json({**good, **change})
        with self.assertRaises(ValueError):
            WorkerReport.from_json([1, 2])


class CompareTests(SynchronousTestCase):
    def _expected(self, report: WorkerReport) -> dict[str, Expected]:
        return {
            EventsStream.NAME: Expected(6, report.digests[EventsStream.NAME]),
            ReceiptsStream.NAME: Expected(7, report.digests[ReceiptsStream.NAME]),
            TypingStream.NAME: Expected(4, typing={"!other:x": ["@b:x", "@a:x"]}),
        }

    def _report(self) -> WorkerReport:
        return _known_rows_handler().report("final", "worker1", WRITER, True)

    def test_matching_worker_is_ok(self) -> None:
        """Same digests, positions and typing lists: OK."""
        report = self._report()
        verdict = compare_worker(report, self._expected(report))
        self.assertTrue(verdict.ok)
        self.assertIn("events 3 rows", verdict.describe())
        self.assertIn("receipts 2 rows (of 3 received", verdict.describe())

    def test_mismatched_digest_fails(self) -> None:
        """One row different (same count, other sha256): MISMATCH on that stream."""
        report = self._report()
        expected = self._expected(report)
        expected[EventsStream.NAME] = Expected(6, Digest(3, "0" * 64))
        verdict = compare_worker(report, expected)
        self.assertFalse(verdict.ok)
        self.assertEqual([c.stream for c in verdict.checks if not c.ok], ["events"])
        self.assertIn("events: holds 3 rows", verdict.describe())
        self.assertIn("(sha256 000000000000)", verdict.describe())

    def test_missing_rows_fail(self) -> None:
        """A worker holding fewer rows than the writer: MISMATCH."""
        report = self._report()
        expected = self._expected(report)
        expected[ReceiptsStream.NAME] = Expected(7, Digest(5, "f" * 64))
        verdict = compare_worker(report, expected)
        self.assertFalse(verdict.ok)
        self.assertIn("receipts: holds 2 rows", verdict.describe())

    def test_worker_behind_fails(self) -> None:
        """A worker whose position is not the writer's has not got every row."""
        report = self._report()
        expected = self._expected(report)
        expected[EventsStream.NAME] = Expected(9, report.digests[EventsStream.NAME])
        verdict = compare_worker(report, expected)
        self.assertFalse(verdict.ok)
        self.assertIn("at token 6, the writer at 9", verdict.describe())

    def test_typing_difference_fails(self) -> None:
        """Typing lists that differ from the writer's: MISMATCH naming the room."""
        report = self._report()
        expected = self._expected(report)
        expected[TypingStream.NAME] = Expected(4, typing={ROOM: ["@a:x"]})
        verdict = compare_worker(report, expected)
        self.assertFalse(verdict.ok)
        self.assertIn("!other:x", verdict.describe())

    def test_progress_report_is_not_a_final_one(self) -> None:
        """Without a final report there is nothing to vouch for."""
        report = self._report()
        progress = _known_rows_handler().report("progress", "worker1", WRITER, True)
        self.assertFalse(compare_worker(progress, self._expected(report)).ok)

    def test_normalize_typing(self) -> None:
        """Empty lists are dropped and rooms sorted."""
        self.assertEqual(
            normalize_typing({"!b:x": ("@u:x",), "!a:x": (), "!c:x": ["@v:x"]}),
            {"!b:x": ["@u:x"], "!c:x": ["@v:x"]},
        )


class LoadTests(TestCase):
    async def test_load_counts_what_the_store_streams(self) -> None:
        """The load's row counts are the rows the streams carry, and the mix
        has every kind of row the demo claims to write."""
        writer = await start_writer(
            REACTOR, db_path=self.mktemp(), server_name="demo.local", port=None
        )
        self.addCleanup(writer.stop)
        load = LoadGenerator(writer, random.Random(1), REACTOR)
        await load.prepare()
        start = {
            name: writer.streams[name].current_token(WRITER) for name in DEMO_STREAMS
        }
        steps = 300
        for i in range(steps):
            await load.step(30, i / steps)

        events = writer.streams[EventsStream.NAME]
        end = events.current_token(WRITER)
        updates = []
        token = start[EventsStream.NAME]
        while True:
            page, token, limited = await events.update_function(WRITER, token, end, 10_000)
            updates.extend(page)
            if not limited:
                break
        self.assertEqual(load.rows[EventsStream.NAME], len(updates))
        digest = await digest_from_source(
            EventsStream, events.update_function, WRITER, start[EventsStream.NAME], end
        )
        self.assertEqual(digest.count, len(updates))
        # Every receipt takes a token of its own.
        receipts_end = writer.streams[ReceiptsStream.NAME].current_token(WRITER)
        self.assertEqual(
            load.rows[ReceiptsStream.NAME], receipts_end - start[ReceiptsStream.NAME]
        )
        self.assertEqual(load.rows_written(TypingStream.NAME), load.typing_rows())

        rows = [EventsStream.parse_row(row) for _, row in updates]
        ev_rows = [r for r in rows if isinstance(r, EventsStreamEventRow)]
        self.assertTrue(any(isinstance(r, EventsStreamAllStateRow) for r in rows))
        self.assertTrue(
            any(isinstance(r, EventsStreamCurrentStateRow) and r.event_id is None for r in rows),
            "no state reset removing a key",
        )
        self.assertTrue(any(r.relates_to is not None for r in ev_rows), "no thread reply")
        self.assertTrue(any(r.redacts is not None for r in ev_rows), "no redaction")
        memberships = {r.membership for r in ev_rows}
        self.assertLessEqual({"join", "leave"}, memberships)
        types = {r.type for r in ev_rows}
        self.assertLessEqual(
            {"m.room.message", "m.room.topic", "m.room.name", "m.room.power_levels"}, types
        )
        # Made real during the load: outliers no longer.
        self.assertIn("backfill", load.actions)
        self.assertFalse(any(r.outlier for r in ev_rows))

        receipts, _, _ = await writer.streams[ReceiptsStream.NAME].update_function(
            WRITER, start[ReceiptsStream.NAME], receipts_end, 10_000
        )
        threads = {row[4] for _, row in receipts}
        self.assertIn(None, threads)
        self.assertIn("main", threads)
        self.assertTrue(any(t is not None and t.startswith("$") for t in threads))


class DisplayTests(SynchronousTestCase):
    def _snapshot(self, note: str = "") -> ProgressSnapshot:
        return ProgressSnapshot(
            phase="load",
            elapsed_s=2.0,
            phase_total_s=10.0,
            writer_rates={"events": 1500.0, "receipts": 300.0, "typing": 100.0},
            writer_tokens={"events": 4000, "receipts": 600, "typing": 200},
            workers=(
                WorkerProgress(
                    "worker1",
                    "connected",
                    {"events": 1490.0, "receipts": 300.0, "typing": 99.0},
                    {"events": 12, "receipts": 0, "typing": 1},
                    note,
                ),
            ),
        )

    def test_line_per_refresh_when_not_a_terminal(self) -> None:
        """Without a terminal each refresh is one plain line."""
        out = io.StringIO()
        display = ProgressDisplay(out, tty=False)
        display.show(self._snapshot())
        display.show(self._snapshot())
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertEqual(
            lines[0],
            "[load 2.0s of 10s] writer rows/s 1,500/300/100 | "
            "worker1 rows/s 1,490/300/99 lag 12/0/1",
        )
        self.assertNotIn("\x1b", out.getvalue())

    def test_table_is_redrawn_in_place_on_a_terminal(self) -> None:
        """On a terminal the second refresh moves the cursor back up over the
        table (ANSI) and draws it again."""
        out = io.StringIO()
        display = ProgressDisplay(out, tty=True, columns=100)
        display.show(self._snapshot())
        first = out.getvalue()
        self.assertNotIn("\x1b", first)
        self.assertEqual(len(first.splitlines()), 5)
        self.assertRegex(first.splitlines()[2], r"^events\s+1,500\s+4,000\s+1,490\s+12$")
        display.show(self._snapshot("dropped 1x, caught up 5 rows"))
        second = out.getvalue()[len(first) :]
        self.assertTrue(second.startswith("\x1b[5A\r\x1b[J"))
        self.assertIn("worker1: connected (dropped 1x, caught up 5 rows)", second)

    def test_narrow_terminal_gets_lines(self) -> None:
        """A table wider than the terminal would wrap: lines instead."""
        out = io.StringIO()
        ProgressDisplay(out, tty=True, columns=40).show(self._snapshot())
        self.assertEqual(out.getvalue(), render_line(self._snapshot()) + "\n")


class CliTests(SynchronousTestCase):
    def test_no_subcommand_is_a_usage_error(self) -> None:
        """Without a subcommand: help on stderr and exit code 2."""
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main([]), EXIT_USAGE)

    def test_help_lists_demo_but_not_the_worker(self) -> None:
        """The internal demo-worker subcommand is hidden from --help."""
        help_text = build_parser().format_help()
        self.assertIn("demo", help_text)
        self.assertNotIn("demo-worker", help_text)

    def test_bad_arguments_exit_2(self) -> None:
        """Nonsense values are refused by the parser, with exit code 2."""
        self.patch(sys, "stderr", io.StringIO())
        for argv in (["demo", "--rate", "0"], ["demo", "--workers", "x"], ["nope"]):
            with self.assertRaises(SystemExit) as caught:
                build_parser().parse_args(argv)
            self.assertEqual(caught.exception.code, 2)

    def test_demo_options(self) -> None:
        """Defaults: 10 s, 2 workers, a drop of connection halfway."""
        args = build_parser().parse_args(["demo"])
        self.assertEqual((args.duration, args.workers, args.disconnect), (10.0, 2, True))
        args = build_parser().parse_args(["demo", "--no-disconnect", "--seed", "5"])
        self.assertEqual((args.disconnect, args.seed), (False, 5))


def _run_cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "synapse_replication.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


class DemoRunTests(TestCase):
    def test_demo_run_every_worker_has_every_row(self) -> None:
        """A real, short run: two worker processes, one of which drops its
        connection and catches up; both end with every row. The temporary
        directory is removed and no worker is left behind."""
        tmp = os.path.abspath(self.mktemp())
        os.makedirs(tmp)
        env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
        env["TMPDIR"] = tmp
        result = _run_cli(
            ["demo", "--duration", "3", "--rate", "500", "--seed", "7"], env, timeout=90
        )
        output = result.stdout
        self.assertEqual(result.returncode, 0, f"stdout:\n{output}\nstderr:\n{result.stderr}")
        self.assertIn(
            "OK: all 2 workers have every row of every stream, in order, "
            "and the writer's typing state.",
            output,
        )
        self.assertRegex(output, r"worker1\s+OK\s+events [0-9,]+ rows")
        self.assertRegex(output, r"worker2\s+OK\s+events [0-9,]+ rows")
        self.assertRegex(output, r"worker2 dropped its connection once and caught up")
        # One progress line per second, as stdout is not a terminal.
        self.assertGreaterEqual(len(re.findall(r"^\[load ", output, re.M)), 2)
        self.assertNotIn("\x1b", output)
        self.assertNotIn("Traceback", result.stderr)
        self.assertEqual(os.listdir(tmp), [])

    def test_demo_worker_needs_the_secret(self) -> None:
        """A worker started without the secret in its environment says so
        and exits with the usage code, without printing any secret."""
        env = {k: v for k, v in os.environ.items() if k != SECRET_ENV}
        result = _run_cli(
            [
                "demo-worker",
                "--name",
                "w",
                "--writer-port",
                "1",
                "--server-name",
                "x",
                "--http-port",
                "1",
                "--db",
                "/nonexistent",
            ],
            env,
            timeout=30,
        )
        self.assertEqual(result.returncode, EXIT_USAGE)
        self.assertIn(SECRET_ENV, result.stderr)
