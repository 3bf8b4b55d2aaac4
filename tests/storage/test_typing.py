"""Tests for synapse_replication.storage.typing: the in-memory typing writer."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from synapse_replication.storage import TypingWriter
from synapse_replication.streams import StreamUpdateResult
from tests.storage._helpers import Pokes
from tests.wire_vectors import wire_json

ROOM = "!room:test.local"
OTHER = "!other:test.local"


class TypingWriterTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.pokes = Pokes()
        self.writer = TypingWriter(self.clock, "master", self.pokes)

    def updates(
        self, from_token: int, upto: int, limit: int = 100
    ) -> StreamUpdateResult:
        return self.successResultOf(
            Deferred.fromCoroutine(
                self.writer.get_updates("master", from_token, upto, limit)
            )
        )

    def test_start_and_stop(self) -> None:
        """Starting and stopping each bump the serial and change the room's list."""
        self.writer.started_typing(ROOM, "@a", 30_000)
        self.writer.started_typing(ROOM, "@b", 30_000)
        self.assertEqual(self.writer.typing_state(), {ROOM: ("@a", "@b")})
        self.writer.stopped_typing(ROOM, "@a")
        self.assertEqual(self.writer.typing_state(), {ROOM: ("@b",)})
        self.assertEqual(self.writer.current_token("master"), 3)
        self.assertEqual(self.pokes.count, 3)

    def test_repeats_change_nothing(self) -> None:
        """Starting again while typing, or stopping while not, makes no new serial."""
        self.writer.started_typing(ROOM, "@a", 30_000)
        self.writer.started_typing(ROOM, "@a", 30_000)
        self.writer.stopped_typing(ROOM, "@nobody")
        self.assertEqual(self.writer.current_token("master"), 1)

    def test_timeout_expires(self) -> None:
        """A user whose timeout passes stops typing, with a new serial."""
        self.writer.started_typing(ROOM, "@a", 10_000)
        self.clock.advance(9.9)
        self.assertEqual(self.writer.typing_state(), {ROOM: ("@a",)})
        self.clock.advance(0.1)
        self.assertEqual(self.writer.typing_state(), {ROOM: ()})
        self.assertEqual(self.writer.current_token("master"), 2)
        self.assertEqual(self.updates(1, 2), ([(2, [ROOM, []])], 2, False))

    def test_starting_again_extends_the_timeout(self) -> None:
        """Typing again before the timeout moves the timeout."""
        self.writer.started_typing(ROOM, "@a", 10_000)
        self.clock.advance(8)
        self.writer.started_typing(ROOM, "@a", 10_000)
        self.clock.advance(8)
        self.assertEqual(self.writer.typing_state(), {ROOM: ("@a",)})
        self.clock.advance(2)
        self.assertEqual(self.writer.typing_state(), {ROOM: ()})

    def test_stopping_cancels_the_timeout(self) -> None:
        """A user who stops has no timeout left to fire."""
        self.writer.started_typing(ROOM, "@a", 10_000)
        self.writer.stopped_typing(ROOM, "@a")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_updates_give_latest_list_per_room(self) -> None:
        """Each changed room comes once, at its latest serial, with its current list."""
        self.writer.started_typing(ROOM, "@a", 30_000)
        self.writer.started_typing(OTHER, "@c", 30_000)
        self.writer.started_typing(ROOM, "@b", 30_000)
        self.assertEqual(
            self.updates(0, 3),
            ([(2, [OTHER, ["@c"]]), (3, [ROOM, ["@a", "@b"]])], 3, False),
        )
        self.assertEqual(self.updates(2, 3), ([(3, [ROOM, ["@a", "@b"]])], 3, False))
        self.assertEqual(self.updates(3, 3), ([], 3, False))

    def test_updates_limited(self) -> None:
        """More rooms than the limit: the first ones, and upto is the last serial sent."""
        for i in range(5):
            self.writer.started_typing(f"!r{i}", "@a", 30_000)
        self.assertEqual(
            self.updates(0, 5, limit=2),
            ([(1, ["!r0", ["@a"]]), (2, ["!r1", ["@a"]])], 2, True),
        )
        self.assertEqual(self.updates(2, 5, limit=3)[1:], (5, False))

    def test_restart_resets_the_token(self) -> None:
        """A restarted writer is a new TypingWriter: serial 0, nobody typing."""
        self.writer.started_typing(ROOM, "@a", 30_000)
        self.writer.stop()
        restarted = TypingWriter(self.clock, "master", self.pokes)
        self.assertEqual(restarted.current_token("master"), 0)
        self.assertEqual(restarted.typing_state(), {})
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_negative_timeout_refused(self) -> None:
        """A negative timeout is a mistake."""
        with self.assertRaises(ValueError):
            self.writer.started_typing(ROOM, "@a", -1)

    def test_reproduces_synapse_rows(self) -> None:
        """Two users starting then stopping give Synapse's captured rows."""
        expected = wire_json("http-get_repl_stream_updates-typing.json")
        [[_, [room_id, _]]] = expected["updates"]
        self.writer.started_typing(room_id, "@alice:test.local", 30_000)
        self.writer.started_typing(room_id, "@bob:test.local", 30_000)
        self.writer.stopped_typing(room_id, "@alice:test.local")
        self.writer.stopped_typing(room_id, "@bob:test.local")
        updates, upto, limited = self.updates(0, self.writer.current_token("master"))
        self.assertEqual(
            {
                "updates": [list(u) for u in updates],
                "upto_token": upto,
                "limited": limited,
            },
            expected,
        )
