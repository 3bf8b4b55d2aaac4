# -*- test-case-name: tests.test_redis -*-
"""Replication over Redis pub/sub: the transport that lets instances on many
machines follow each other through one Redis server.

- `RedisReplicationClient` connects a command handler to Redis (one
  subscriber and one publisher connection, each reconnecting on its own) and
  offers each subscriber session to the handler as a
  `RedisReplicationConnection`;
- `RedisSettings` says where Redis is and how to reach it (password, database,
  unix socket, TLS, timeouts, backoff, queue bounds);
- `resp` is the wire format without I/O and `client` the minimal Redis client
  built on it, usable on their own.

No Redis client library is needed: the commands used (AUTH, SELECT,
SUBSCRIBE, PUBLISH, PING) are few and RESP2 is small.
"""

from __future__ import annotations

from synapse_replication.redis.client import (
    ReconnectingRedisClient,
    RedisClientProtocol,
    RedisReplyError,
)
from synapse_replication.redis.replication import (
    RedisReplicationClient,
    RedisReplicationConnection,
    user_ip_channel,
)
from synapse_replication.redis.resp import (
    RespError,
    RespParser,
    RespProtocolError,
    RespPush,
    RespValue,
    encode_request,
)
from synapse_replication.redis.settings import (
    RedisSettings,
    redis_endpoint,
    redis_tls_options,
)

__all__ = [
    "ReconnectingRedisClient",
    "RedisClientProtocol",
    "RedisReplicationClient",
    "RedisReplicationConnection",
    "RedisReplyError",
    "RedisSettings",
    "RespError",
    "RespParser",
    "RespProtocolError",
    "RespPush",
    "RespValue",
    "encode_request",
    "redis_endpoint",
    "redis_tls_options",
    "user_ip_channel",
]
