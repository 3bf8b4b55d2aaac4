"""Tests for synapse_replication.storage._paging: pages never split a token."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from synapse_replication.storage._paging import page_whole_tokens

Row = tuple[int, str]


class _Table:
    """Rows in token order, queried as the stores' SQL does."""

    def __init__(self, rows: list[Row]) -> None:
        self.rows = sorted(rows, key=lambda row: row[0])

    def fetch_range(self, low: int, high: int, limit: int) -> list[Row]:
        return [row for row in self.rows if low < row[0] <= high][:limit]

    def fetch_token(self, token: int) -> list[Row]:
        return [row for row in self.rows if row[0] == token]

    def page(self, low: int, high: int, limit: int) -> tuple[list[Row], int, bool]:
        return page_whole_tokens(self.fetch_range, self.fetch_token, low, high, limit)


class PageWholeTokensTests(SynchronousTestCase):
    def test_fewer_rows_than_limit(self) -> None:
        """Fewer rows than the limit: all of them, up to the asked token."""
        table = _Table([(1, "a"), (3, "b")])
        self.assertEqual(table.page(0, 5, 3), ([(1, "a"), (3, "b")], 5, False))

    def test_partial_last_token_dropped(self) -> None:
        """A full page ends just before its last token, which may be partial."""
        table = _Table([(1, "a"), (2, "b"), (2, "c"), (4, "d")])
        self.assertEqual(table.page(0, 9, 3), ([(1, "a")], 1, True))

    def test_one_token_larger_than_limit(self) -> None:
        """A token with more rows than the limit comes whole, in one page."""
        table = _Table([(2, "a"), (2, "b"), (2, "c"), (3, "d")])
        self.assertEqual(table.page(0, 9, 2), ([(2, "a"), (2, "b"), (2, "c")], 2, True))

    def test_one_large_token_at_the_end(self) -> None:
        """A large last token that is the asked upper token ends the paging."""
        table = _Table([(2, "a"), (2, "b"), (2, "c")])
        self.assertEqual(
            table.page(0, 2, 1), ([(2, "a"), (2, "b"), (2, "c")], 2, False)
        )

    @given(
        tokens=st.lists(st.integers(min_value=1, max_value=30), max_size=60),
        limit=st.integers(min_value=0, max_value=12),
        upto=st.integers(min_value=0, max_value=35),
    )
    def test_pages_concatenate_to_all_rows(
        self, tokens: list[int], limit: int, upto: int
    ) -> None:
        """Paging while limited yields every row up to the asked token once, in order."""
        table = _Table([(token, f"row{i}") for i, token in enumerate(tokens)])
        seen: list[Row] = []
        position = 0
        while True:
            rows, new_position, limited = table.page(position, upto, limit)
            self.assertTrue(all(position < row[0] <= new_position for row in rows))
            if limited:
                self.assertGreater(new_position, position)
            seen.extend(rows)
            position = new_position
            if not limited:
                break
        self.assertEqual(position, upto)
        self.assertEqual(seen, table.fetch_range(0, upto, len(tokens) + 1))
