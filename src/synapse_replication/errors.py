# -*- test-case-name: tests.test_commands -*-
"""Every exception this library raises on purpose, under one base class.

Callers that want to survive any bad input from a peer catch `ReplicationError`;
the codec's errors are also `ValueError`s, so code written against Synapse's
`parse_command_from_line` (which raises plain exceptions) keeps working.
"""

from __future__ import annotations

# Long lines are cut to this many characters in error messages: enough to
# recognise the line, short enough not to flood a log with a 16 KiB row.
MAX_SHOWN_LINE = 200


def shorten(text: str, limit: int = MAX_SHOWN_LINE) -> str:
    """`text`, cut to `limit` characters with a marker saying how much is hidden."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[{len(text) - limit} more chars]"


class ReplicationError(Exception):
    """Base class of every error this library raises deliberately."""


class CommandParseError(ReplicationError, ValueError):
    """A line from a peer is not a valid replication command.

    `command` is the command name when it could be read (None if the name itself
    is unknown or missing), `line` the offending text and `reason` what is wrong.
    The message always names both, with the line shortened if long.
    """

    def __init__(self, command: str | None, line: str, reason: str) -> None:
        self.command = command
        self.line = line
        self.reason = reason
        where = f"{command} command" if command else "command"
        super().__init__(f"Invalid {where} ({reason}): {shorten(line)!r}")


class CommandEncodeError(ReplicationError, ValueError):
    """A command cannot be put on the wire without corrupting the line format
    (a space in a name field, a newline, NaN in a row, a line over the limit)."""


class StreamRowError(ReplicationError, ValueError):
    """A row received for a stream does not have that stream's shape."""


class HttpCatchUpError(ReplicationError):
    """Rows a reader missed could not be fetched over HTTP from the instance
    that wrote them: unknown instance, refused request, bad answer, or
    retries exhausted. Nothing of a failed fetch is delivered, so the caller
    may simply ask again (the command handler does, after a delay).

    Names the instance, stream and token range asked for, `reason` (the last
    error) and `status`, the HTTP status of the last answer if there was one.
    """

    def __init__(
        self,
        *,
        instance_name: str,
        stream_name: str,
        from_token: int,
        upto_token: int,
        reason: str,
        status: int | None = None,
    ) -> None:
        self.instance_name = instance_name
        self.stream_name = stream_name
        self.from_token = from_token
        self.upto_token = upto_token
        self.reason = reason
        self.status = status
        super().__init__(
            f"Could not fetch {stream_name} rows ({from_token}, {upto_token}] "
            f"from instance {instance_name!r} over HTTP: {reason}"
        )


class ConfigError(ReplicationError, ValueError):
    """A worker configuration is wrong.

    `key` is the path of the offending key (``redis.port``,
    ``listeners[1].bind_addresses``; empty for the document as a whole) and
    `reason` what is wrong and what is expected. The message is
    ``"<key>: <reason>"``, prefixed with the file when it came from one. It
    never contains the value of a secret.
    """

    def __init__(self, key: str, reason: str, *, file: str | None = None) -> None:
        self.key = key
        self.reason = reason
        self.file = file
        where = f"{key}: " if key else ""
        prefix = f"{file}: " if file else ""
        super().__init__(f"{prefix}{where}{reason}")
