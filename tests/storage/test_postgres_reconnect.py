"""A PostgreSQL `Database` whose server sessions are terminated goes on
working: found by the torture suite (`pg_terminate_backend` on a writer), which
saw every later transaction fail with "connection already closed"."""

from __future__ import annotations

from typing import Any

import psycopg2
from twisted.enterprise import adbapi
from twisted.trial.unittest import TestCase

from synapse_replication.storage import Database
from tests.postgres_server import fresh_database
from tests.storage._helpers import REACTOR

APPLICATION_NAME = "reconnect-test"
POOL_SIZE = 3


def _terminate(conn_args: dict[str, Any]) -> int:
    """Terminate every session of the database under test; how many."""
    conn = psycopg2.connect(**conn_args)
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name = %s",
                (APPLICATION_NAME,),
            )
            return len(cursor.fetchall())
    finally:
        conn.close()


class ReconnectTests(TestCase):
    async def test_terminated_sessions_are_replaced(self) -> None:
        """After its sessions are terminated, each pooled connection fails at most one transaction, then every transaction succeeds."""
        conn_args = fresh_database(self)
        db = Database.postgres({**conn_args, "application_name": APPLICATION_NAME}, REACTOR, POOL_SIZE)
        self.addCleanup(db.close)
        # Open every connection of the pool.
        for _ in range(POOL_SIZE * 2):
            self.assertEqual(await db.execute("warm up", "SELECT 1"), [(1,)])
        self.assertEqual(_terminate(conn_args), POOL_SIZE)

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
