# -*- test-case-name: tests.streams.test_streams -*-
"""The `caches` stream: cache invalidations, ``[cache_func, keys, invalidation_ts]``.

`keys` is null when the whole cache is to be cleared.
"""

from __future__ import annotations

from typing import Any, Final

import attrs

from synapse_replication._json import JsonValue
from synapse_replication.errors import StreamRowError
from synapse_replication.streams._base import (
    RowBase,
    Stream,
    check_int,
    check_str,
    row_list,
)

NAME: Final = "caches"


@attrs.frozen(slots=True)
class CachesStreamRow(RowBase):
    cache_func: str
    keys: tuple[Any, ...] | None
    invalidation_ts: int


class CachesStream(Stream[CachesStreamRow]):
    NAME = NAME
    ROW_TYPE = CachesStreamRow

    @classmethod
    def parse_row(cls, row: JsonValue) -> CachesStreamRow:
        f = row_list(NAME, row, 3)
        keys = f[1]
        if keys is not None and type(keys) is not list:
            raise StreamRowError(f"caches row: keys must be a list or null, not {keys!r:.80}")
        return CachesStreamRow(
            check_str(NAME, "cache_func", f[0]),
            None if keys is None else tuple(keys),
            check_int(NAME, "invalidation_ts", f[2]),
        )

    @classmethod
    def row_to_json(cls, row: CachesStreamRow) -> JsonValue:
        keys = None if row.keys is None else list(row.keys)
        return [row.cache_func, keys, row.invalidation_ts]
