"""The streams: their registry, their row types and field orders (checked
against rows Synapse sent), the booleans both of Synapse's databases send,
the errors for malformed rows, and the `Stream` base's use of the functions
passed in."""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.trial.unittest import TestCase

from synapse_replication.commands import RdataCommand, parse_command_from_line
from synapse_replication.errors import StreamRowError
from synapse_replication.streams import (
    STREAMS_MAP,
    AccountDataStream,
    CachesStream,
    DeviceListsStream,
    EventsStream,
    PresenceStream,
    PushersStream,
    ReceiptsStream,
    Stream,
    StreamUpdateResult,
    ToDeviceStream,
    TypingStream,
    group_updates_by_token,
)
from synapse_replication.streams.events import (
    EventsStreamAllStateRow,
    EventsStreamCurrentStateRow,
    EventsStreamEventRow,
)
from tests.wire_vectors import wire_json, wire_lines

HTTP_VECTORS = {
    "events": "http-get_repl_stream_updates-events.json",
    "receipts": "http-get_repl_stream_updates-receipts.json",
    "typing": "http-get_repl_stream_updates-typing.json",
}


def synapse_rdata() -> list[RdataCommand]:
    """Every RDATA of the wire vectors for a stream we know."""
    commands = [parse_command_from_line(line) for line in wire_lines()]
    return [c for c in commands if isinstance(c, RdataCommand) and c.stream_name in STREAMS_MAP]


class RegistryTests(TestCase):
    def test_streams_by_wire_name(self) -> None:
        """STREAMS_MAP holds the streams a worker commonly needs, by NAME."""
        self.assertEqual(
            set(STREAMS_MAP),
            {
                "events",
                "typing",
                "receipts",
                "caches",
                "account_data",
                "to_device",
                "presence",
                "device_lists",
                "push_rules",
                "pushers",
            },
        )
        for name, stream in STREAMS_MAP.items():
            self.assertEqual(stream.NAME, name)
            self.assertTrue(issubclass(stream, Stream))

    def test_row_types_are_frozen_attrs(self) -> None:
        """Every stream's rows are frozen attrs instances: a row cannot change
        after it is handed to user code."""
        for rdata in synapse_rdata():
            row = STREAMS_MAP[rdata.stream_name].parse_row(rdata.row)
            self.assertTrue(attrs.has(type(row)), rdata)
            self.assertIsInstance(row, STREAMS_MAP[rdata.stream_name].ROW_TYPE)
            field = attrs.fields(type(row))[0].name
            with self.assertRaises(attrs.exceptions.FrozenInstanceError):
                setattr(row, field, "changed")


class SynapseRowsTests(TestCase):
    """Rows Synapse 1.163 sent parse, and turn back into the same JSON."""

    def test_every_rdata_row_round_trips(self) -> None:
        seen: set[str] = set()
        for rdata in synapse_rdata():
            stream = STREAMS_MAP[rdata.stream_name]
            row = stream.parse_row(rdata.row)
            # 0/1 from SQLite come back as false/true, which compare equal.
            self.assertEqual(stream.row_to_json(row), rdata.row, rdata)
            self.assertEqual(stream.parse_row(stream.row_to_json(row)), row)
            seen.add(rdata.stream_name)
        for name in ("events", "typing", "receipts", "account_data", "to_device", "presence"):
            self.assertIn(name, seen, "the wire vectors should exercise this stream")

    def test_http_catch_up_rows(self) -> None:
        """The rows of Synapse's HTTP catch-up answers are the same rows."""
        for name, vector in HTTP_VECTORS.items():
            body = wire_json(vector)
            self.assertTrue(body["updates"], vector)
            for token, row in body["updates"]:
                self.assertIsInstance(token, int)
                parsed = STREAMS_MAP[name].parse_row(row)
                self.assertEqual(STREAMS_MAP[name].row_to_json(parsed), row)

    def test_events_field_order(self) -> None:
        ev = EventsStream.parse_row(
            ["ev", ["$e", "!r", "m.room.member", "@a:x", None, "$rel", "join", 0, 1]]
        )
        self.assertEqual(
            ev,
            EventsStreamEventRow(
                event_id="$e",
                room_id="!r",
                type="m.room.member",
                state_key="@a:x",
                redacts=None,
                relates_to="$rel",
                membership="join",
                rejected=False,
                outlier=True,
            ),
        )
        state = EventsStream.parse_row(["state", ["!r", "m.room.name", "", None]])
        self.assertEqual(
            state,
            EventsStreamCurrentStateRow(
                room_id="!r", type="m.room.name", state_key="", event_id=None
            ),
        )
        self.assertEqual(
            EventsStream.parse_row(["state-all", ["!r"]]), EventsStreamAllStateRow(room_id="!r")
        )
        self.assertEqual(
            EventsStream.row_to_json(state), ["state", ["!r", "m.room.name", "", None]]
        )

    def test_other_streams_field_order(self) -> None:
        typing = TypingStream.parse_row(["!r", ["@a:x", "@b:x"]])
        self.assertEqual((typing.room_id, typing.user_ids), ("!r", ("@a:x", "@b:x")))
        receipt = ReceiptsStream.parse_row(["!r", "m.read", "@a:x", "$e", "main", {"ts": 5}])
        self.assertEqual(
            (
                receipt.room_id,
                receipt.receipt_type,
                receipt.user_id,
                receipt.event_id,
                receipt.thread_id,
                receipt.data,
            ),
            ("!r", "m.read", "@a:x", "$e", "main", {"ts": 5}),
        )
        presence = PresenceStream.parse_row(["@a:x", "online", 1, 2, 3, None, 1])
        self.assertEqual(
            (presence.user_id, presence.state, presence.last_active_ts, presence.currently_active),
            ("@a:x", "online", 1, True),
        )
        caches = CachesStream.parse_row(["get_user", ["@a:x"], 7])
        self.assertEqual(
            (caches.cache_func, caches.keys, caches.invalidation_ts), ("get_user", ("@a:x",), 7)
        )
        self.assertIsNone(CachesStream.parse_row(["get_all", None, 7]).keys)
        account = AccountDataStream.parse_row(["@a:x", None, "m.push_rules"])
        self.assertEqual(
            (account.user_id, account.room_id, account.data_type), ("@a:x", None, "m.push_rules")
        )
        self.assertEqual(ToDeviceStream.parse_row(["@a:x"]).entity, "@a:x")


class BooleanTests(TestCase):
    """Booleans arrive as 0/1 (SQLite) or false/true (PostgreSQL)."""

    def test_both_spellings(self) -> None:
        for false, true in ((0, 1), (False, True)):
            ev = EventsStream.parse_row(
                ["ev", ["$e", "!r", "m.text", None, None, None, None, true, false]]
            )
            assert isinstance(ev, EventsStreamEventRow)
            self.assertIs(ev.rejected, True)
            self.assertIs(ev.outlier, False)
            self.assertIs(DeviceListsStream.parse_row(["@a:x", false, true]).hosts_calculated, True)
            self.assertIs(PushersStream.parse_row(["@a:x", "app", "key", true]).deleted, True)

    def test_other_values_refused(self) -> None:
        for bad in (2, -1, "true", None, 1.0, [1]):
            with self.assertRaises(StreamRowError) as caught:
                EventsStream.parse_row(
                    ["ev", ["$e", "!r", "m.text", None, None, None, None, bad, 0]]
                )
            self.assertIn("rejected", str(caught.exception))
            with self.assertRaises(StreamRowError):
                DeviceListsStream.parse_row(["@a:x", bad, 0])


class MalformedRowTests(TestCase):
    """A malformed row raises StreamRowError naming the stream and what is wrong."""

    def test_malformed_rows(self) -> None:
        cases: list[tuple[type[Stream[Any]], Any, str]] = [
            (EventsStream, ["ev", ["$e"]], "events"),
            (EventsStream, ["nope", ["!r"]], "events"),
            (EventsStream, "ev", "events"),
            (EventsStream, ["state", ["!r", "t", 5, None]], "state_key"),
            (EventsStream, ["state-all", []], "events"),
            (TypingStream, ["!r", "@a:x"], "typing"),
            (TypingStream, ["!r", ["@a:x", 3]], "typing"),
            (ReceiptsStream, ["!r", "m.read", "@a:x", "$e", None, "ts"], "receipts"),
            (ReceiptsStream, ["!r", "m.read", "@a:x", "$e", None], "receipts"),
            (PresenceStream, ["@a:x", "online", "1", 2, 3, None, 1], "presence"),
            (CachesStream, ["f", "k", 1], "caches"),
            (AccountDataStream, [None, None, "t"], "account_data"),
            (ToDeviceStream, [5], "to_device"),
        ]
        for stream, row, fragment in cases:
            with self.assertRaises(StreamRowError, msg=f"{stream.NAME} {row!r}") as caught:
                stream.parse_row(row)
            self.assertIn(fragment, str(caught.exception), row)
            self.assertIsInstance(caught.exception, ValueError)

    def test_huge_row_message_is_short(self) -> None:
        with self.assertRaises(StreamRowError) as caught:
            TypingStream.parse_row(["!r"] * 10000)
        self.assertLess(len(str(caught.exception)), 400)


class StreamBaseTests(TestCase):
    """A stream reads its source only through the functions it was given."""

    def _stream(self, rows: list[tuple[int, Any]]) -> tuple[TypingStream, list[tuple[Any, ...]]]:
        position = {"w": 0}
        calls: list[tuple[Any, ...]] = []

        def current(instance: str) -> int:
            return position[instance]

        async def updates(
            instance: str, from_token: int, upto: int, limit: int
        ) -> StreamUpdateResult:
            calls.append((instance, from_token, upto, limit))
            found = [(t, json.loads(json.dumps(r))) for t, r in rows if from_token < t <= upto]
            if len(found) > limit:
                found = found[:limit]
                return list(found), found[-1][0], True
            return list(found), upto, False

        stream = TypingStream("w", current, updates)
        position["w"] = max((t for t, _ in rows), default=0)
        return stream, calls

    async def test_get_updates_moves_last_token(self) -> None:
        rows = [(t, ["!r", [f"@u{t}:x"]]) for t in range(1, 6)]
        stream, calls = self._stream(rows)
        self.assertEqual(stream.last_token, 0)
        updates, upto, limited = await stream.get_updates(target_row_count=2)
        self.assertEqual((len(updates), upto, limited), (2, 2, True))
        self.assertEqual(stream.last_token, 2)
        updates, upto, limited = await stream.get_updates(target_row_count=10)
        self.assertEqual(([t for t, _ in updates], upto, limited), ([3, 4, 5], 5, False))
        self.assertEqual(calls, [("w", 0, 5, 2), ("w", 2, 5, 10)])
        # Nothing new: the update function is not called.
        self.assertEqual(await stream.get_updates(), ([], 5, False))
        self.assertEqual(len(calls), 2)

    def test_discard_updates_and_advance(self) -> None:
        stream, calls = self._stream([(1, ["!r", []]), (2, ["!r", []])])
        stream.discard_updates_and_advance()
        self.assertEqual((stream.last_token, calls), (2, []))
        self.assertEqual(stream.current_token("w"), 2)

    def test_group_updates_by_token(self) -> None:
        updates = [(1, "a"), (2, "b"), (2, "c"), (3, "d"), (5, "e"), (5, "f")]
        self.assertEqual(
            list(group_updates_by_token(updates)),
            [(1, ["a"]), (2, ["b", "c"]), (3, ["d"]), (5, ["e", "f"])],
        )
        self.assertEqual(list(group_updates_by_token([])), [])
