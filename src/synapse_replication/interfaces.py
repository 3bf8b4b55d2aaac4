# -*- test-case-name: tests.test_tcp -*-
"""The two interfaces that separate transports from the command handler.

A transport (TCP, Redis) owns framing, the handshake and keepalive; it offers
each live link to a peer as an `IReplicationConnection`. The handler owns what
commands mean; it implements `IReplicationCommandHandler`. Transports deliver
commands through `dispatch_table`, an explicit map from command name to handler
method, so both sides of the contract are visible to the type checker.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import Interface

from synapse_replication.commands import (
    CancelTaskCommand,
    ClearUserSyncCommand,
    Command,
    FederationAckCommand,
    LockReleasedCommand,
    NewActiveTaskCommand,
    PositionCommand,
    RdataCommand,
    RemoteServerUpCommand,
    ReplicateCommand,
    UserIpCommand,
    UserSyncCommand,
)

_log: Final = Logger(namespace="synapse_replication.interfaces")

# What a handler method may return: nothing, or work still running.
HandlerResult = Awaitable[None] | None


class IReplicationConnection(Interface):
    """One live link to a peer, as a handler sees it."""

    def send_command(cmd: Command) -> None:
        """Queue `cmd` for the peer. Never blocks and never raises for a slow
        peer: a peer that cannot keep up is disconnected by the transport."""

    def close() -> None:
        """Close the link; the handler's `lost_connection` follows."""

    def describe() -> str:
        """A short name for logs: transport, peer address and peer name."""

    def peer_name() -> str | None:
        """The name the peer gave (NAME or SERVER), or None before it did."""


class IReplicationCommandHandler(Interface):
    """What a transport delivers to. Each `on_*` gets the connection the command
    came on and the parsed command, and may return an awaitable; the transport
    logs its failure and never lets it break the connection."""

    def new_connection(connection: IReplicationConnection) -> None:
        """`connection` finished its handshake and may be used."""

    def lost_connection(connection: IReplicationConnection) -> None:
        """`connection` is gone; forget anything that belongs to it."""

    def on_replicate(connection: IReplicationConnection, cmd: ReplicateCommand) -> HandlerResult:
        """The peer asks for the current position of every stream we write."""

    def on_rdata(connection: IReplicationConnection, cmd: RdataCommand) -> HandlerResult:
        """One row of a stream."""

    def on_position(connection: IReplicationConnection, cmd: PositionCommand) -> HandlerResult:
        """A writer's position moved (or is being announced)."""

    def on_user_sync(connection: IReplicationConnection, cmd: UserSyncCommand) -> HandlerResult:
        """A user started or stopped syncing on the peer."""

    def on_clear_user_sync(
        connection: IReplicationConnection, cmd: ClearUserSyncCommand
    ) -> HandlerResult:
        """The peer is going away: drop all its syncing users."""

    def on_federation_ack(
        connection: IReplicationConnection, cmd: FederationAckCommand
    ) -> HandlerResult:
        """The federation sender has handled the federation stream up to a token."""

    def on_user_ip(connection: IReplicationConnection, cmd: UserIpCommand) -> HandlerResult:
        """A user was seen from an address."""

    def on_remote_server_up(
        connection: IReplicationConnection, cmd: RemoteServerUpCommand
    ) -> HandlerResult:
        """A federation peer came back."""

    def on_lock_released(
        connection: IReplicationConnection, cmd: LockReleasedCommand
    ) -> HandlerResult:
        """A cross-worker lock was released."""

    def on_new_active_task(
        connection: IReplicationConnection, cmd: NewActiveTaskCommand
    ) -> HandlerResult:
        """A scheduled task is ready to run."""

    def on_cancel_task(
        connection: IReplicationConnection, cmd: CancelTaskCommand
    ) -> HandlerResult:
        """A scheduled task must stop."""


# A handler method as a transport calls it.
CommandCallback = Callable[[IReplicationConnection, Any], HandlerResult]


def dispatch_table(handler: IReplicationCommandHandler) -> dict[str, CommandCallback]:
    """Command name -> handler method, for every command a handler receives.

    SERVER, NAME, PING and ERROR are absent: they belong to the transport.
    """
    return {
        ReplicateCommand.NAME: handler.on_replicate,
        RdataCommand.NAME: handler.on_rdata,
        PositionCommand.NAME: handler.on_position,
        UserSyncCommand.NAME: handler.on_user_sync,
        ClearUserSyncCommand.NAME: handler.on_clear_user_sync,
        FederationAckCommand.NAME: handler.on_federation_ack,
        UserIpCommand.NAME: handler.on_user_ip,
        RemoteServerUpCommand.NAME: handler.on_remote_server_up,
        LockReleasedCommand.NAME: handler.on_lock_released,
        NewActiveTaskCommand.NAME: handler.on_new_active_task,
        CancelTaskCommand.NAME: handler.on_cancel_task,
    }


def deliver(
    callback: CommandCallback, connection: IReplicationConnection, cmd: Command
) -> None:
    """Call a handler method and make sure a failure, now or later, is logged
    against the connection and the command rather than lost or raised into the
    transport."""
    try:
        result = callback(connection, cmd)
    except Exception:
        _log.failure(
            "Handler failed on {cmd} from {conn}", cmd=cmd.NAME, conn=connection.describe()
        )
        return
    if result is None:
        return
    if isinstance(result, Coroutine):
        result = Deferred.fromCoroutine(result)
    if isinstance(result, Deferred):
        result.addErrback(
            lambda f: _log.failure(
                "Handler failed on {cmd} from {conn}",
                f,
                cmd=cmd.NAME,
                conn=connection.describe(),
            )
        )
