# -*- test-case-name: tests.storage.test_typing -*-
"""The typing writer: who is typing where, in memory, and the source of the
`typing` stream's rows.

Each change to a room's typing list bumps a serial (the stream token) and
records it as the room's latest serial. A row is the room's whole current list,
so a reader only needs each room's latest row: `get_updates` returns one row
per room whose latest serial is in the range, with the list as it is now.

Invariant: a room's row at its latest serial is its current list, and every
room changed after `from_token` has its row in ``(from_token, upto_token]`` or
later, so a reader that applies the rows it gets ends with the writer's lists.

Nothing is persisted. A restarted writer is a new `TypingWriter`: its serial
starts again at 0 and nobody is typing. Readers see the token go backwards and
must treat it as a new stream (Synapse's readers reset their typing state).
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from synapse_replication.streams._base import StreamUpdate, StreamUpdateResult, Token


class TypingWriter:
    """The typing state of the instance that writes the `typing` stream.

    A user who starts typing is removed when their timeout passes, unless
    they start again (which only extends the timeout) or stop first. `notify`
    is called after each change, once the new serial is current.
    """

    def __init__(
        self,
        clock: IReactorTime,
        instance_name: str,
        notify: Callable[[], None],
    ) -> None:
        self._clock = clock
        self._instance_name = instance_name
        self._notify = notify
        self._serial = 0
        # room id -> the room's latest serial.
        self._room_serials: dict[str, int] = {}
        # room id -> user ids typing there, in the order they started (dict
        # keys: ordered, and O(1) removal).
        self._typing: dict[str, dict[str, None]] = {}
        self._timeouts: dict[tuple[str, str], IDelayedCall] = {}

    def started_typing(self, room_id: str, user_id: str, timeout_ms: int) -> None:
        """`user_id` types in `room_id` for `timeout_ms` from now.

        Already typing: only the timeout moves (no new row, as in Synapse).
        """
        if timeout_ms < 0:
            raise ValueError(f"timeout must not be negative: {timeout_ms}")
        key = (room_id, user_id)
        timeout = self._timeouts.pop(key, None)
        if timeout is not None and timeout.active():
            timeout.cancel()
        self._timeouts[key] = self._clock.callLater(
            timeout_ms / 1000, self._timed_out, room_id, user_id
        )
        users = self._typing.setdefault(room_id, {})
        if user_id not in users:
            users[user_id] = None
            self._changed(room_id)

    def stopped_typing(self, room_id: str, user_id: str) -> None:
        """`user_id` stops typing in `room_id` (nothing if they were not)."""
        timeout = self._timeouts.pop((room_id, user_id), None)
        if timeout is not None and timeout.active():
            timeout.cancel()
        self._remove(room_id, user_id)

    def _timed_out(self, room_id: str, user_id: str) -> None:
        del self._timeouts[(room_id, user_id)]
        self._remove(room_id, user_id)

    def _remove(self, room_id: str, user_id: str) -> None:
        users = self._typing.get(room_id)
        if users is not None and user_id in users:
            del users[user_id]
            self._changed(room_id)

    def _changed(self, room_id: str) -> None:
        self._serial += 1
        self._room_serials[room_id] = self._serial
        self._notify()

    def stop(self) -> None:
        """Cancel the pending timeouts (on shutdown); the state is kept."""
        for timeout in self._timeouts.values():
            if timeout.active():
                timeout.cancel()
        self._timeouts.clear()

    def current_token(self, instance_name: str) -> Token:
        """The latest serial (one writer: the same whoever asks)."""
        return self._serial

    async def get_updates(
        self, instance_name: str, from_token: Token, upto_token: Token, limit: int
    ) -> StreamUpdateResult:
        """The `typing` stream's update function: ``[room_id, [user_id, ...]]``
        for each room whose latest serial is in ``(from_token, upto_token]``,
        by serial; at most `limit` rows, and then `upto_token` is the last
        row's serial and `limited` is True.
        """
        rows: list[StreamUpdate] = sorted(
            (serial, [room_id, list(self._typing.get(room_id, ()))])
            for room_id, serial in self._room_serials.items()
            if from_token < serial <= upto_token
        )
        # Serials are unique per room, so the rows have distinct tokens and
        # cutting the list never splits a token.
        limit = max(1, limit)
        if len(rows) > limit:
            rows = rows[:limit]
            return rows, rows[-1][0], True
        return rows, upto_token, False

    def typing_state(self) -> dict[str, tuple[str, ...]]:
        """Who is typing in each room that has had typing (empty tuples too)."""
        return {room_id: tuple(users) for room_id, users in self._typing.items()}
