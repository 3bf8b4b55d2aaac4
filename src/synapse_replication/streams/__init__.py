# -*- test-case-name: tests.streams.test_streams -*-
"""Every stream this library knows, by wire name.

Adding a stream is one module defining a `Stream` subclass and one line here.
"""

from __future__ import annotations

from typing import Any, Final

from synapse_replication.streams._base import (
    DEFAULT_TARGET_ROW_COUNT,
    CurrentTokenFunction,
    Stream,
    StreamUpdate,
    StreamUpdateResult,
    Token,
    UpdateFunction,
    group_updates_by_token,
)
from synapse_replication.streams.account_data import AccountDataStream
from synapse_replication.streams.caches import CachesStream
from synapse_replication.streams.device_lists import DeviceListsStream
from synapse_replication.streams.events import EventsStream
from synapse_replication.streams.presence import PresenceStream
from synapse_replication.streams.push_rules import PushRulesStream
from synapse_replication.streams.pushers import PushersStream
from synapse_replication.streams.receipts import ReceiptsStream
from synapse_replication.streams.to_device import ToDeviceStream
from synapse_replication.streams.typing import TypingStream

STREAMS_MAP: Final[dict[str, type[Stream[Any]]]] = {
    stream.NAME: stream
    for stream in (
        EventsStream,
        TypingStream,
        ReceiptsStream,
        CachesStream,
        AccountDataStream,
        ToDeviceStream,
        PresenceStream,
        DeviceListsStream,
        PushRulesStream,
        PushersStream,
    )
}

__all__ = [
    "DEFAULT_TARGET_ROW_COUNT",
    "STREAMS_MAP",
    "AccountDataStream",
    "CachesStream",
    "CurrentTokenFunction",
    "DeviceListsStream",
    "EventsStream",
    "PresenceStream",
    "PushRulesStream",
    "PushersStream",
    "ReceiptsStream",
    "Stream",
    "StreamUpdate",
    "StreamUpdateResult",
    "ToDeviceStream",
    "Token",
    "TypingStream",
    "UpdateFunction",
    "group_updates_by_token",
]
