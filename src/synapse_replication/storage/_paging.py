# -*- test-case-name: tests.storage.test_paging -*-
"""Paging through rows of a stream table without splitting a token.

Several rows may share a token, and a reader's position is a token: it has
either every row of a token or none. A page cut by a row limit may end in the
middle of a token's rows, so the last token of a full page is dropped and the
page ends just before it. If the page holds only that one token, its rows are
all fetched, however many there are: a page always moves the position on.

Invariant of `page_whole_tokens`: the rows returned are exactly the rows with
``from_token < token <= new_upto_token``, and `limited` is False only if
``new_upto_token == upto_token``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

RowT = TypeVar("RowT", bound=tuple[Any, ...])


def page_whole_tokens(
    fetch_range: Callable[[int, int, int], list[RowT]],
    fetch_token: Callable[[int], list[RowT]],
    from_token: int,
    upto_token: int,
    limit: int,
) -> tuple[list[RowT], int, bool]:
    """A page of rows whose first item is their token: ``(rows, upto, limited)``.

    ``fetch_range(from, upto, limit)`` returns at most `limit` rows with
    ``from < token <= upto`` in ascending token order; ``fetch_token(token)``
    returns every row at `token`.
    """
    limit = max(1, limit)
    rows = fetch_range(from_token, upto_token, limit)
    if len(rows) < limit:
        return rows, upto_token, False
    last_token: int = rows[-1][0]
    # Rows come in token order, so the rows of earlier tokens are a prefix and
    # are complete: the limit cut the page inside or after `last_token`.
    end = len(rows)
    while end > 0 and rows[end - 1][0] == last_token:
        end -= 1
    if end > 0:
        return rows[:end], last_token - 1, True
    # Even one token's rows do not fit the limit: return all of them.
    return fetch_token(last_token), last_token, last_token < upto_token
