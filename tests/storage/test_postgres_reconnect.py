"""A PostgreSQL `Database` whose server sessions are terminated goes on
working: found by the torture suite (`pg_terminate_backend` on a writer), which
saw every later transaction fail with "connection already closed"."""

from __future__ import annotations

import psycopg2
from twisted.enterprise import adbapi
from twisted.trial.unittest import TestCase

from synapse_replication.storage import Database
from tests.postgres_server import fresh_database, terminate_backends
from tests.storage._helpers import REACTOR

APPLICATION_NAME = "reconnect-test"
POOL_SIZE = 3


class ReconnectTests(TestCase):
    async def test_terminated_sessions_are_replaced(self) -> None:
        """After its sessions are terminated, each pooled connection fails at most one transaction, then every transaction succeeds."""
        conn_args = fresh_database(self)
        db = Database.postgres({**conn_args, "application_name": APPLICATION_NAME}, REACTOR, POOL_SIZE)
        self.addCleanup(db.close)
        # Open every connection of the pool.
        for _ in range(POOL_SIZE * 2):
            self.assertEqual(await db.execute("warm up", "SELECT 1"), [(1,)])
        self.assertEqual(terminate_backends(conn_args, APPLICATION_NAME), POOL_SIZE)

        failures = 0
        for _ in range(POOL_SIZE * 3):
            try:
                await db.execute("after terminate", "SELECT 1")
            except psycopg2.Error:
                failures += 1
        self.assertLessEqual(failures, POOL_SIZE)
        for _ in range(POOL_SIZE * 2):
            self.assertEqual(await db.execute("recovered", "SELECT 1"), [(1,)])
        # adbapi logs the failed rollbacks that tell it a connection died.
        self.flushLoggedErrors(psycopg2.Error, adbapi.ConnectionLost)
