"""Torture, topology (a): one SQLite writer of `events`, `receipts` and
`typing`, and readers over loopback TCP and in memory (see
`tests.torture.sqlite_cluster` for the cluster and its faults)."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.trial.unittest import TestCase

from tests.torture import seeds
from tests.torture.runner import check_logged_errors
from tests.torture.sqlite_cluster import SqliteScenario, Transport


class SqliteTortureTests(TestCase):
    """Topology (a) under random schedules."""

    timeout = 3600 if seeds.long_mode() else 240

    async def _torture(self, base: int, transports: Sequence[Transport], clock_jumps: bool) -> None:
        steps = seeds.schedule_length(80, 250)

        async def one(seed: int) -> None:
            scenario = SqliteScenario(self, seed, steps, transports, clock_jumps)
            await scenario.run()
            check_logged_errors(self, seed)

        await seeds.run_seeds(self.id(), seeds.seeds(base, 4, 12), one)

    async def test_readers_over_tcp(self) -> None:
        """Readers over loopback TCP end with every row once and in order."""
        await self._torture(1000, ("tcp",), clock_jumps=False)

    async def test_readers_over_tcp_and_in_memory_with_clock_jumps(self) -> None:
        """Readers over TCP and in memory, with a clock that jumps, end with every row once and in order."""
        await self._torture(2000, ("tcp", "memory"), clock_jumps=True)
