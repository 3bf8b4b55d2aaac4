"""Torture, topology (b): one SQLite writer and readers that all replicate
through a real redis-server (see `tests.torture.sqlite_cluster`), with Redis
restarts, connections killed by Redis, and subscribers that stop reading
until Redis drops them."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.redis_server import start_redis
from tests.torture import seeds
from tests.torture.runner import REACTOR, check_logged_errors
from tests.torture.sqlite_cluster import SqliteScenario


class RedisTortureTests(TestCase):
    """Topology (b) under random schedules."""

    timeout = 3600 if seeds.long_mode() else 240

    async def test_readers_through_redis(self) -> None:
        """Readers following through Redis end with every row once and in order."""
        server = await start_redis(self, REACTOR)
        steps = seeds.schedule_length(60, 200)

        async def one(seed: int) -> None:
            scenario = SqliteScenario(self, seed, steps, ("redis",), clock_jumps=False, redis=server)
            await scenario.run()
            check_logged_errors(self, seed)

        await seeds.run_seeds(self.id(), seeds.seeds(3000, 4, 10), one)
