"""What the topologies that replicate through a real redis-server share: the
settings every instance uses, the limit past which Redis drops a subscriber
that stops reading, and the Redis faults.

- `start_client`: an instance's `RedisReplicationClient`, started.
- `configure_redis`: Redis drops a subscriber that lets 128 KiB pile up
  (Synapse's deployments rely on the same limit, at 32 MiB); to be applied
  again after every restart of the server.
- `kill_connection`: Redis closes one connection of one instance
  (``CLIENT KILL``).
- `cut_subscriber`: an instance aborts its own subscriber connection.
- `stall_subscriber`: an instance's subscriber stops reading while rows are
  published, until Redis drops it or its own PING times out.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from twisted.internet.task import deferLater
from twisted.logger import Logger

from synapse_replication.redis import RedisSettings
from synapse_replication.tcp import Backoff
from tests.redis_server import RawRedis, RedisServer
from tests.torture.links import shrink_socket_buffers
from tests.torture.runner import REACTOR, MonitoredRedisClient, Scenario

_log: Final = Logger(namespace="tests.torture")

# How long a stalled subscriber waits for Redis (or its own PING) to drop it
# once enough rows went by.
STALL_TIMEOUT_S: Final = 4.0


def torture_settings(server: RedisServer) -> RedisSettings:
    """Fast reconnections and a small publish queue, so that a Redis restart
    fills and overflows it."""
    return server.settings(
        backoff=Backoff(initial=0.02, factor=2.0, maximum=0.2),
        max_queued_commands=300,
        max_queued_bytes=64 * 1024,
    )


def start_client(
    scenario: Scenario, handler: Any, server_name: str, instance_name: str
) -> MonitoredRedisClient:
    """Connect `handler` to Redis, with the scenario's settings."""
    assert scenario.redis_settings is not None
    client = MonitoredRedisClient(
        monitor=scenario.monitor,
        reactor=REACTOR,
        handler=handler,
        server_name=server_name,
        instance_name=instance_name,
        settings=scenario.redis_settings,
        rand=scenario.io_rng.random,
    )
    client.start()
    return client


async def configure_redis(server: RedisServer) -> None:
    """Redis drops a subscriber that lets 128 KiB pile up."""
    raw = await RawRedis.connect(REACTOR, server.settings())
    try:
        await raw.execute("CONFIG", "SET", "client-output-buffer-limit", "pubsub 128kb 64kb 1")
    finally:
        await raw.close()


async def restart_redis(server: RedisServer) -> None:
    """Restart redis-server on the same port: every connection drops."""
    await server.restart()
    await configure_redis(server)


async def kill_connection(
    scenario: Scenario, server: RedisServer, client: MonitoredRedisClient | None, which: str
) -> None:
    """Redis closes the "subscriber" or "publisher" connection of `client`
    (``CLIENT KILL``), if it is up."""
    transport = None if client is None else client.transport_of(which)
    if transport is None:
        return
    address = transport.getHost()
    raw = await RawRedis.connect(REACTOR, server.settings())
    try:
        await raw.execute("CLIENT", "KILL", "ADDR", f"{address.host}:{address.port}")
        scenario.count("redis connections killed")
    except Exception as e:
        _log.info("CLIENT KILL found nothing: {e}", e=e)
    finally:
        await raw.close()


def cut_subscriber(scenario: Scenario, client: MonitoredRedisClient | None) -> None:
    """`client` aborts its subscriber connection, if it is up."""
    transport = None if client is None else client.transport_of("subscriber")
    if transport is not None:
        transport.abortConnection()
        scenario.count("redis connections cut")


async def stall_subscriber(
    scenario: Scenario, client: MonitoredRedisClient | None, write: Callable[[], Awaitable[None]]
) -> None:
    """`client`'s subscriber stops reading while `write` publishes rows (up
    to 10 times), until Redis drops it (output buffer limit) or its own PING
    times out; then it reads again."""
    session = None if client is None else client.connection
    transport = None if client is None else client.transport_of("subscriber")
    if transport is None or session is None:
        return
    shrink_socket_buffers(transport)
    transport.pauseProducing()
    try:
        for _ in range(10):
            await write()
            if session.lost:
                break
        deadline = REACTOR.seconds() + STALL_TIMEOUT_S
        while not session.lost and REACTOR.seconds() < deadline:
            await deferLater(REACTOR, 0.02, lambda: None)
        scenario.count("redis subscribers dropped while paused", int(session.lost))
    finally:
        transport.resumeProducing()


def redis_connected(client: MonitoredRedisClient | None) -> bool:
    """Subscribed, and the publisher is up."""
    return client is not None and client.connection is not None and client.publisher_connected


def redis_busy(name: str, client: MonitoredRedisClient | None) -> list[str]:
    """Why `name`'s publisher is not done (nothing: it is)."""
    if client is not None and (client.queued_commands or not client.publisher_connected):
        return [f"{name}'s Redis publisher not done"]
    return []
