"""A replication server and client exchanging commands over TCP on 127.0.0.1.

The server writes nothing: it answers the client's REPLICATE with a POSITION
and then sends one RDATA row; the client prints what it receives and stops.
Run: python examples/exchange.py
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import react
from zope.interface import implementer

from synapse_replication.commands import Command, PositionCommand, RdataCommand
from synapse_replication.interfaces import (
    IReplicationCommandHandler,
    IReplicationConnection,
)
from synapse_replication.tcp import (
    ReplicationClientFactory,
    ReplicationServerFactory,
    connect_replication_client,
    listen_replication,
)


@implementer(IReplicationCommandHandler)
class Handler:
    """Both sides' handler: the server answers REPLICATE, the client prints."""

    def __init__(self, done: Deferred[None] | None = None) -> None:
        self.done = done

    def new_connection(self, connection: IReplicationConnection) -> None:
        pass

    def lost_connection(self, connection: IReplicationConnection) -> None:
        pass

    def on_replicate(self, connection: IReplicationConnection, cmd: Command) -> None:
        connection.send_command(PositionCommand("typing", "master", 0, 0))
        connection.send_command(RdataCommand("typing", "master", 1, ["!room:x", ["@alice:x"]]))

    def on_position(self, connection: IReplicationConnection, cmd: PositionCommand) -> None:
        print("client got", cmd)

    def on_rdata(self, connection: IReplicationConnection, cmd: RdataCommand) -> None:
        print("client got", cmd)
        if self.done is not None:
            self.done.callback(None)

    # The commands this example does not use.
    def _ignore(self, connection: IReplicationConnection, cmd: Command) -> None:
        pass

    on_user_sync = on_clear_user_sync = on_federation_ack = on_user_ip = _ignore
    on_remote_server_up = on_lock_released = on_new_active_task = on_cancel_task = _ignore


async def main(reactor: Any) -> None:
    server = ReplicationServerFactory(clock=reactor, handler=Handler(), server_name="example.com")
    port = listen_replication(reactor, 0, server)  # binds 127.0.0.1
    done: Deferred[None] = Deferred()
    client = ReplicationClientFactory(
        clock=reactor, handler=Handler(done), server_name="example.com", instance_name="worker1"
    )
    address = port.getHost()
    assert isinstance(address, IPv4Address)
    connect_replication_client(reactor, "127.0.0.1", address.port, client)
    await done
    client.stopTrying()
    for connection in list(server.connections):
        connection.close()
    await maybeDeferred(port.stopListening)


if __name__ == "__main__":
    react(lambda reactor: Deferred.fromCoroutine(main(reactor)))
