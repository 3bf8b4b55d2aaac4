"""Tests for synapse_replication.storage.events: persisting events and state,
and the `events` stream's update function."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Final

import attrs
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from synapse_replication.storage import (
    MAX_STATE_UPDATES_PER_ROOM,
    EventToPersist,
    Stores,
)
from synapse_replication.storage.events import EventsStore
from synapse_replication.streams import (
    EventsStream,
    StreamUpdate,
    group_updates_by_token,
)
from synapse_replication.streams.parsed import UpdateFunctionWithParsed, parse_updates
from tests.storage._helpers import (
    ALICE,
    ROOM,
    message,
    open_inline_stores,
    open_test_stores,
    state,
)
from tests.wire_vectors import wire_json

OTHER_ROOM: Final = "!other:test.local"


async def page_all(
    store: EventsStore, limit: int, from_token: int = 0
) -> tuple[list[StreamUpdate], int]:
    """Every row after `from_token`, paging with `limit`; and the number of pages."""
    upto = store.current_token("master")
    updates: list[StreamUpdate] = []
    pages = 0
    token = from_token
    while True:
        page, new_token, limited = await store.get_updates("master", token, upto, limit)
        # The parsed form of the same page, for a catch-up, is the JSON form
        # as the handler would parse and group it.
        parsed = await store.get_parsed_updates("master", token, upto, limit)
        assert parsed == (parse_updates(EventsStream, page), new_token, limited), (parsed, page)
        assert all(token < t <= new_token for t, _ in page), (token, new_token, page)
        assert not limited or new_token > token, "a limited page must move on"
        assert limited or new_token == upto
        updates.extend(page)
        pages += 1
        token = new_token
        if not limited:
            return updates, pages


def ev_row(
    event_id: str,
    event_type: str = "m.room.message",
    state_key: str | None = None,
    room_id: str = ROOM,
    redacts: str | None = None,
    relates_to: str | None = None,
    membership: str | None = None,
    rejected: int = 0,
    outlier: int = 0,
) -> list[Any]:
    return [
        "ev",
        [
            event_id,
            room_id,
            event_type,
            state_key,
            redacts,
            relates_to,
            membership,
            rejected,
            outlier,
        ],
    ]


def state_row(
    event_type: str, state_key: str, event_id: str | None, room_id: str = ROOM
) -> list[Any]:
    return ["state", [room_id, event_type, state_key, event_id]]


def many_keys(count: int, prefix: str = "$k") -> dict[tuple[str, str], str | None]:
    return {("org.example.key", f"{i:04}"): f"{prefix}{i:04}" for i in range(count)}


class PersistEventsTests(TestCase):
    async def test_ev_row_fields(self) -> None:
        """An event's row carries its ids, type, state key, redacts, relation and membership."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events(
            [
                message("$m"),
                EventToPersist(
                    event_id="$red",
                    room_id=ROOM,
                    type="m.room.redaction",
                    sender=ALICE,
                    redacts="$m",
                ),
                message("$reply", relates_to="$m", relation_type="m.thread"),
                state("$join", "m.room.member", ALICE, membership="join"),
            ]
        )
        self.assertEqual(
            await events.get_all_rows("master"),
            [
                (1, ev_row("$m")),
                (2, ev_row("$red", "m.room.redaction", redacts="$m")),
                (3, ev_row("$reply", relates_to="$m")),
                (4, ev_row("$join", "m.room.member", ALICE, membership="join")),
                (4, state_row("m.room.member", ALICE, "$join")),
            ],
        )

    async def test_state_event_changes_current_state_at_its_token(self) -> None:
        """A state event's state row shares its token and follows its ev row."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message("$m"), state("$t", "m.room.topic", "")])
        await events.persist_events([state("$t2", "m.room.topic", "")])
        self.assertEqual(
            await events.get_all_rows("master"),
            [
                (1, ev_row("$m")),
                (2, ev_row("$t", "m.room.topic", "")),
                (2, state_row("m.room.topic", "", "$t")),
                (3, ev_row("$t2", "m.room.topic", "")),
                (3, state_row("m.room.topic", "", "$t2")),
            ],
        )
        self.assertEqual(
            await events.get_current_state(ROOM), {("m.room.topic", ""): "$t2"}
        )

    async def test_explicit_state_delta_at_first_token(self) -> None:
        """A batch's explicit state delta is stamped at the batch's first token."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events(
            [state("$pl", "m.room.power_levels", ""), state("$n", "m.room.name", "")],
            state_delta={
                ROOM: {("m.room.power_levels", ""): "$pl", ("m.room.name", ""): "$n"}
            },
        )
        self.assertEqual(
            await events.get_all_rows("master"),
            [
                (1, ev_row("$pl", "m.room.power_levels", "")),
                (1, state_row("m.room.name", "", "$n")),
                (1, state_row("m.room.power_levels", "", "$pl")),
                (2, ev_row("$n", "m.room.name", "")),
            ],
        )

    async def test_rejected_event_changes_no_state(self) -> None:
        """A rejected event has an ev row (rejected 1, no membership) and no state row."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events(
            [state("$j", "m.room.member", ALICE, membership="join", rejected=True)]
        )
        self.assertEqual(
            await events.get_all_rows("master"),
            [(1, ev_row("$j", "m.room.member", ALICE, rejected=1))],
        )
        self.assertEqual(await events.get_current_state(ROOM), {})

    async def test_outlier_is_streamed_without_state(self) -> None:
        """An outlier gets an ev row with outlier 1 and changes no state (as Synapse)."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([state("$o", "m.room.topic", "", outlier=True)])
        self.assertEqual(
            await events.get_all_rows("master"),
            [(1, ev_row("$o", "m.room.topic", "", outlier=1))],
        )
        self.assertEqual(await events.get_current_state(ROOM), {})

    async def test_de_outlier_adds_ev_row_at_new_token(self) -> None:
        """A de-outliered event is streamed again at a new token, no longer an outlier."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message("$o", outlier=True), message("$m")])
        self.assertEqual(await events.de_outlier_events(["$o"]), [3])
        self.assertEqual(
            await events.get_all_rows("master"),
            [(1, ev_row("$o")), (2, ev_row("$m")), (3, ev_row("$o"))],
        )

    async def test_de_outlier_refuses_non_outliers(self) -> None:
        """De-outliering an unknown event or a non-outlier fails and writes nothing."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message("$o", outlier=True), message("$m")])
        with self.assertRaises(ValueError):
            await events.de_outlier_events(["$o", "$m"])
        with self.assertRaises(ValueError):
            await events.de_outlier_events(["$unknown"])
        self.assertEqual(
            await events.get_all_rows("master"),
            [(1, ev_row("$o", outlier=1)), (2, ev_row("$m"))],
        )

    async def test_update_current_state_without_event(self) -> None:
        """A state change without an event takes one fresh token; None removes a key."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([state("$t", "m.room.topic", "")])
        stream_id = await events.update_current_state(
            ROOM, {("m.room.topic", ""): None, ("m.room.name", ""): "$n"}
        )
        self.assertEqual(stream_id, 2)
        self.assertEqual(
            (await events.get_all_rows("master"))[2:],
            [
                (2, state_row("m.room.name", "", "$n")),
                (2, state_row("m.room.topic", "", None)),
            ],
        )
        self.assertEqual(
            await events.get_current_state(ROOM), {("m.room.name", ""): "$n"}
        )
        self.assertIsNone(await events.update_current_state(ROOM, {}))

    async def test_duplicate_event_fails_whole_batch(self) -> None:
        """A batch with an event already stored writes nothing."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message("$a")])
        with self.assertRaises(sqlite3.IntegrityError):
            await events.persist_events(
                [state("$t", "m.room.topic", ""), message("$a")]
            )
        self.assertEqual(await events.get_all_rows("master"), [(1, ev_row("$a"))])
        self.assertEqual(await events.get_current_state(ROOM), {})

    async def test_notify_after_each_write(self) -> None:
        """notify is poked after each committed write."""
        stores, pokes = await open_test_stores(self)
        before = pokes.count
        await stores.events.persist_events([message("$a")])
        after_one = pokes.count
        await stores.events.update_current_state(ROOM, {("m.room.topic", ""): "$a"})
        self.assertGreater(after_one, before)
        self.assertGreater(pokes.count, after_one)

    async def test_rows_parse_as_events_stream_rows(self) -> None:
        """Every row the store produces parses as an events stream row."""
        stores, _ = await open_test_stores(self)
        await stores.events.persist_events(
            [state("$j", "m.room.member", ALICE, membership="join"), message("$m")]
        )
        await stores.events.update_current_state(
            ROOM, many_keys(MAX_STATE_UPDATES_PER_ROOM)
        )
        for _, row in await stores.events.get_all_rows("master"):
            self.assertEqual(EventsStream.row_to_json(EventsStream.parse_row(row)), row)

    async def test_parsed_rows_are_the_parsed_json_rows(self) -> None:
        """`get_parsed_updates` gives the rows `parse_row` makes of `get_updates`'
        rows (booleans as bools), grouped by token; the update function offers it."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events(
            [
                state("$j", "m.room.member", ALICE, membership="join"),
                message("$r", rejected=True),
                message("$o", outlier=True),
                message("$m"),
            ]
        )
        await events.persist_events([message("$o2", outlier=True)])
        await events.update_current_state(ROOM, many_keys(MAX_STATE_UPDATES_PER_ROOM))
        await events.de_outlier_events(["$o"])
        upto = events.current_token("master")
        updates, _, _ = await events.get_updates("master", 0, upto, 10_000)
        groups, new_upto, limited = await events.get_parsed_updates("master", 0, upto, 10_000)
        self.assertEqual((new_upto, limited), (upto, False))
        self.assertEqual(groups, parse_updates(EventsStream, updates))
        self.assertEqual([token for token, _ in groups], [1, 2, 3, 4, 5, 6, 7])
        # "$o" is an outlier no more: its row says so, at 3 and at 7.
        flags = [(row.rejected, row.outlier) for _, rows in groups[:5] for row in rows[:1]]
        self.assertEqual(
            flags, [(False, False), (True, False), (False, False), (False, False), (False, True)]
        )
        self.assertTrue(all(type(f) is bool for pair in flags for f in pair))
        update_function = events.get_updates
        assert isinstance(update_function, UpdateFunctionWithParsed)
        self.assertEqual(
            await update_function.parsed("master", 0, upto, 10_000), (groups, upto, False)
        )

    async def test_other_writers_rows_are_not_ours(self) -> None:
        """The update function returns only the named writer's rows."""
        stores, _ = await open_test_stores(self)
        await stores.events.persist_events([message("$a")])
        self.assertEqual(
            await stores.events.get_updates("other", 0, 1, 100), ([], 1, False)
        )

    async def test_reproduces_synapse_rows(self) -> None:
        """The events of Synapse's capture, persisted here, give Synapse's rows."""
        expected = wire_json("http-get_repl_stream_updates-events.json")["updates"]
        ev_fields = {token: row[1] for token, row in expected if row[0] == "ev"}
        deltas: dict[int, dict[str, dict[tuple[str, str], str | None]]] = {}
        for token, row in expected:
            if row[0] == "state":
                room_id, event_type, state_key, event_id = row[1]
                deltas.setdefault(token, {}).setdefault(room_id, {})[
                    (event_type, state_key)
                ] = event_id
        # Synapse created the room in one batch (tokens 4 to 8), its state delta
        # stamped at the batch's first token; every other event alone.
        batches = [[4, 5, 6, 7, 8]] + [[t] for t in ev_fields if not 4 <= t <= 8]
        batches.sort()

        stores, _ = await open_test_stores(self)
        async with stores.events_id_gen.get_next():
            pass  # The capture starts at token 2.
        for batch in batches:
            events = [_event_from_ev_row(ev_fields[token]) for token in batch]
            tokens = await stores.events.persist_events(
                events, state_delta=deltas.get(batch[0], {})
            )
            self.assertEqual(tokens, batch)
        actual = await stores.events.get_all_rows("master")
        # Synapse orders the state rows of one token as it inserted them; we
        # order them by key. Everything else is identical.
        self.assertEqual(_per_token(actual), _per_token(expected))
        self.assertEqual([t for t, _ in actual], [t for t, _ in expected])


def _event_from_ev_row(fields: list[Any]) -> EventToPersist:
    """The event an ``ev`` row describes (not rejected, not an outlier)."""
    event_id, room_id, event_type, state_key, redacts, relates_to, membership = fields[
        :7
    ]
    return EventToPersist(
        event_id=event_id,
        room_id=room_id,
        type=event_type,
        sender=ALICE,
        state_key=state_key,
        redacts=redacts,
        relates_to=relates_to,
        relation_type="m.thread" if relates_to else None,
        membership=membership,
    )


def _per_token(updates: Sequence[Any]) -> list[tuple[int, Any, list[str]]]:
    """Per token: its ev rows in order, then its other rows as sorted JSON."""
    grouped = []
    for token, rows in group_updates_by_token((t, r) for t, r in updates):
        evs = [r for r in rows if r[0] == "ev"]
        others = sorted(repr(r) for r in rows if r[0] != "ev")
        if evs:
            assert rows[0][0] == "ev", rows
        grouped.append((token, evs, others))
    return grouped


class UpdateFunctionTests(TestCase):
    async def test_many_events_paged(self) -> None:
        """Many events, paged with a small target: every row once, in order."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message(f"$m{i}") for i in range(57)])
        updates, pages = await page_all(events, 10)
        self.assertEqual(updates, [(i + 1, ev_row(f"$m{i}")) for i in range(57)])
        self.assertGreater(pages, 5)

    async def test_huge_state_change_is_one_state_all_row(self) -> None:
        """200 keys changed in one room at one token give one state-all row."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([state("$t", "m.room.topic", "")])
        await events.update_current_state(ROOM, many_keys(200))
        updates, _ = await page_all(events, 10)
        self.assertEqual(
            updates,
            [
                (1, ev_row("$t", "m.room.topic", "")),
                (1, state_row("m.room.topic", "", "$t")),
                (2, ["state-all", [ROOM]]),
            ],
        )

    async def test_state_all_is_per_room(self) -> None:
        """At one token, only the room with 150 changes gets a state-all row."""
        stores, _ = await open_test_stores(self)
        await stores.events.persist_events(
            [message("$m")],
            state_delta={
                ROOM: many_keys(MAX_STATE_UPDATES_PER_ROOM),
                OTHER_ROOM: many_keys(MAX_STATE_UPDATES_PER_ROOM - 1, "$o"),
            },
        )
        updates, _ = await page_all(stores.events, 7)
        kinds = [(token, row[0], row[1][0]) for token, row in updates]
        self.assertEqual(kinds[0], (1, "ev", "$m"))
        self.assertEqual(
            kinds[1:],
            [(1, "state", OTHER_ROOM)] * (MAX_STATE_UPDATES_PER_ROOM - 1)
            + [(1, "state-all", ROOM)],
        )

    async def test_one_token_is_never_split(self) -> None:
        """100 keys at one token come as 100 state rows in one page, target 10."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message("$a")])
        await events.update_current_state(ROOM, many_keys(100))
        await events.persist_events([message("$b")])
        page, upto, limited = await events.get_updates("master", 1, 3, 10)
        self.assertEqual(len(page), 100)
        self.assertEqual({token for token, _ in page}, {2})
        self.assertEqual((upto, limited), (2, True))
        rest, _ = await page_all(events, 10, from_token=2)
        self.assertEqual(rest, [(3, ev_row("$b"))])

    async def test_state_changes_over_many_tokens_paged(self) -> None:
        """State changes spread over many tokens, small target: exactly the store's rows."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        for i in range(30):
            await events.update_current_state(
                ROOM,
                {
                    ("org.example.key", f"{i}-{j}"): f"$e{i}-{j}"
                    for j in range(i % 4 + 1)
                },
            )
            if i % 3 == 0:
                await events.persist_events([state(f"$s{i}", "m.room.topic", "")])
        expected = await events.get_all_rows_unpaged("master")
        self.assertEqual(len(expected), 73 + 20)
        for limit in (1, 2, 3, 5, 10):
            updates, _ = await page_all(events, limit)
            self.assertEqual(updates, expected)

    async def test_mixed_sources_every_limit(self) -> None:
        """Events, state changes and ex-outliers paged at every limit equal the unpaged rows."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events(
            [message("$o1", outlier=True), state("$t", "m.room.topic", "")]
        )
        await events.update_current_state(ROOM, many_keys(5))
        await events.persist_events(
            [message(f"$m{i}") for i in range(4)]
            + [state("$j", "m.room.member", ALICE, membership="join")],
            state_delta={ROOM: {("m.room.member", ALICE): "$j"}},
        )
        await events.de_outlier_events(["$o1"])
        await events.persist_events([message("$o2", outlier=True)])
        await events.update_current_state(OTHER_ROOM, many_keys(3, "$x"))
        await events.de_outlier_events(["$o2"])
        expected = await events.get_all_rows_unpaged("master")
        self.assertEqual(await events.get_all_rows("master"), expected)
        for limit in range(1, len(expected) + 2):
            updates, _ = await page_all(events, limit)
            self.assertEqual(updates, expected, f"limit {limit}")

    async def test_open_transaction_holds_the_token(self) -> None:
        """While an id is in flight, later committed rows stay beyond the current token."""
        stores, _ = await open_test_stores(self)
        events = stores.events
        await events.persist_events([message("$a")])
        release: Deferred[None] = Deferred()

        async def slow_writer() -> None:
            async with stores.events_id_gen.get_next() as stream_id:
                self.assertEqual(stream_id, 2)
                await release

        writer = Deferred.fromCoroutine(slow_writer())
        self.assertEqual(await events.persist_events([message("$b")]), [3])
        self.assertEqual(events.current_token("master"), 1)
        self.assertEqual(await events.get_all_rows("master"), [(1, ev_row("$a"))])
        release.callback(None)
        await writer
        self.assertEqual(events.current_token("master"), 3)
        self.assertEqual(
            await events.get_all_rows("master"), [(1, ev_row("$a")), (3, ev_row("$b"))]
        )


# A workload for the property test: a list of operations, each a plain tuple.
ROOMS: Final = (ROOM, OTHER_ROOM)
EVENT_KINDS: Final = ("message", "topic", "member", "redaction", "reply")

event_specs = st.tuples(
    st.sampled_from(EVENT_KINDS),
    st.sampled_from(ROOMS),
    st.sampled_from(["", "a", "b"]),
    st.booleans(),  # outlier
    st.booleans(),  # rejected
)
operations = st.one_of(
    st.tuples(
        st.just("persist"), st.lists(event_specs, min_size=1, max_size=5), st.booleans()
    ),
    st.tuples(
        st.just("update"),
        st.sampled_from(ROOMS),
        st.one_of(st.integers(1, 4), st.sampled_from([149, 150, 170])),
        st.booleans(),  # remove instead of set
    ),
    st.tuples(st.just("de_outlier")),
)


@attrs.define
class _Model:
    """What the store should hold, computed without the store."""

    rows: list[tuple[tuple[Any, ...], StreamUpdate]] = attrs.Factory(list)
    events: dict[str, list[Any]] = attrs.Factory(dict)
    event_rows: list[tuple[int, str]] = attrs.Factory(list)
    outliers: list[str] = attrs.Factory(list)
    state: dict[str, dict[tuple[str, str], str]] = attrs.Factory(dict)

    def add_delta(
        self, token: int, room_id: str, changes: dict[tuple[str, str], str | None]
    ) -> None:
        if len(changes) >= MAX_STATE_UPDATES_PER_ROOM:
            self.rows.append(((token, 2, room_id), (token, ["state-all", [room_id]])))
        else:
            for (event_type, state_key), event_id in changes.items():
                self.rows.append(
                    (
                        (token, 1, room_id, event_type, state_key),
                        (token, state_row(event_type, state_key, event_id, room_id)),
                    )
                )
        room_state = self.state.setdefault(room_id, {})
        for key, event_id in changes.items():
            if event_id is None:
                room_state.pop(key, None)
            else:
                room_state[key] = event_id

    def expected(self) -> list[StreamUpdate]:
        rows = list(self.rows)
        for token, event_id in self.event_rows:
            fields = list(self.events[event_id])
            fields[8] = 1 if event_id in self.outliers else 0
            rows.append(((token, 0), (token, ["ev", fields])))
        rows.sort(key=lambda item: item[0])
        return [update for _, update in rows]


def _event_for(spec: tuple[str, str, str, bool, bool], n: int) -> EventToPersist:
    kind, room_id, key, outlier, rejected = spec
    event_id = f"$e{n}"
    common: dict[str, Any] = {
        "room_id": room_id,
        "outlier": outlier,
        "rejected": rejected,
    }
    if kind == "topic":
        return state(event_id, "m.room.topic", key, **common)
    if kind == "member":
        return state(event_id, "m.room.member", f"@u{key}", membership="join", **common)
    if kind == "redaction":
        return EventToPersist(
            event_id=event_id,
            type="m.room.redaction",
            sender=ALICE,
            redacts="$x",
            **common,
        )
    if kind == "reply":
        return message(event_id, relates_to="$x", relation_type="m.thread", **common)
    return message(event_id, **common)


async def _run_workload(stores: Stores, workload: list[tuple[Any, ...]]) -> _Model:
    events = stores.events
    model = _Model()
    n = 0
    for op in workload:
        if op[0] == "persist":
            batch = []
            for spec in op[1]:
                n += 1
                batch.append(_event_for(spec, n))
            explicit: dict[str, dict[tuple[str, str], str | None]] | None = None
            if op[2]:
                explicit = {}
                for event in batch:
                    if event.state_key is not None:
                        explicit.setdefault(event.room_id, {})[
                            (event.type, event.state_key)
                        ] = event.event_id
            tokens = await events.persist_events(batch, state_delta=explicit)
            for event, token in zip(batch, tokens, strict=True):
                model.events[event.event_id] = [
                    event.event_id,
                    event.room_id,
                    event.type,
                    event.state_key,
                    None if event.rejected else event.redacts,
                    None if event.rejected else event.relates_to,
                    None if event.rejected else event.membership,
                    1 if event.rejected else 0,
                    None,
                ]
                model.event_rows.append((token, event.event_id))
                if event.outlier:
                    model.outliers.append(event.event_id)
                if (
                    explicit is None
                    and event.state_key is not None
                    and not (event.rejected or event.outlier)
                ):
                    model.add_delta(
                        token,
                        event.room_id,
                        {(event.type, event.state_key): event.event_id},
                    )
            for room_id, room_changes in (explicit or {}).items():
                model.add_delta(tokens[0], room_id, room_changes)
        elif op[0] == "update":
            _, room_id, count, remove = op
            n += 1
            changes: dict[tuple[str, str], str | None] = {
                ("org.example.key", f"{i}"): None if remove else f"$u{n}-{i}"
                for i in range(count)
            }
            stream_id = await events.update_current_state(room_id, changes)
            assert stream_id is not None
            model.add_delta(stream_id, room_id, changes)
        elif model.outliers:
            event_id = model.outliers.pop(0)
            (token,) = await events.de_outlier_events([event_id])
            model.event_rows.append((token, event_id))
    return model


class UpdateFunctionPropertyTests(SynchronousTestCase):
    """Random workloads on an inline database (hypothesis examples cannot wait
    for the reactor), checked against a model of what was written."""

    @settings(max_examples=60, deadline=None)
    @given(
        workload=st.lists(operations, max_size=8),
        limits=st.lists(st.integers(1, 60), min_size=1, max_size=4),
    )
    def test_pages_concatenate_to_the_written_rows(
        self, workload: list[tuple[Any, ...]], limits: list[int]
    ) -> None:
        """For any workload and limit, the pages concatenate to the model's rows."""
        stores, _ = self.successResultOf(Deferred.fromCoroutine(open_inline_stores()))
        try:
            model = self.successResultOf(
                Deferred.fromCoroutine(_run_workload(stores, workload))
            )
            expected = model.expected()
            unpaged = self.successResultOf(
                Deferred.fromCoroutine(stores.events.get_all_rows_unpaged("master"))
            )
            self.assertEqual(unpaged, expected)
            for limit in [1, *limits, len(expected) + 1]:
                updates, _ = self.successResultOf(
                    Deferred.fromCoroutine(page_all(stores.events, limit))
                )
                self.assertEqual(updates, expected, f"limit {limit}")
            for room_id in ROOMS:
                current = self.successResultOf(
                    Deferred.fromCoroutine(stores.events.get_current_state(room_id))
                )
                self.assertEqual(current, model.state.get(room_id, {}))
        finally:
            stores.close()
