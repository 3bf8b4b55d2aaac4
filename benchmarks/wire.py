"""Wire benchmark: parse and serialize a realistic mix of replication lines, ours vs Synapse's.

- parse: a framed line as received from the socket (bytes, without the newline)
  to a command, and for RDATA on to the stream's typed row. Ours: what the TCP
  protocol calls, ``parse_command_from_bytes(line)``, then
  ``STREAMS_MAP[cmd.stream_name].parse_row(cmd.row)``; Synapse's:
  ``parse_command_from_line(line.decode("utf-8"))`` and the stream's
  ``parse_row`` from ``synapse.replication.tcp.commands`` and
  ``synapse.replication.tcp.streams``, as its protocol and command handler do on
  receipt.
- serialize: a command object to its framed bytes. Ours: ``encode_command(cmd) +
  b"\\n"``; Synapse's: what ``BaseReplicationStreamProtocol.send_command`` does
  (``"%s %s" % (cmd.NAME, cmd.to_line())``, newline check, UTF-8 encode, then the
  delimiter that ``sendLine`` appends).

The mix (~20k lines, seeded, so every run sees the same bytes) is mostly `events`
RDATA, with typing, receipts, POSITION, USER_IP and LOCK_RELEASED. Before timing,
both sides must produce identical bytes for every command and parse every line,
and our parsed commands must re-serialize to the original bytes; otherwise the
script aborts. Each measurement processes the whole mix with the garbage
collector disabled; the table shows medians over the runs and the ratio
ours/Synapse's (Synapse's time over ours, per run, then the median).

Run it under a Python that has both `matrix-synapse` and this package (see
benchmarks/README.md); without Synapse it times ours alone and says so.
"""

from __future__ import annotations

import argparse
import base64
import copy
import gc
import importlib
import json
import platform
import random
import statistics
import string
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any, Final

import attrs
from _harness import print_markdown

from synapse_replication._accel import SPEEDUPS
from synapse_replication.commands import (
    COMMAND_MAP,
    Command,
    LockReleasedCommand,
    PositionCommand,
    RdataCommand,
    UserIpCommand,
    encode_command,
    parse_command_from_bytes,
)
from synapse_replication.streams import STREAMS_MAP

PARSE_TARGET: Final = 3.0
SERIALIZE_TARGET: Final = 3.0

SYNAPSE_VERSION: Final = "1.163.2"
HOW_TO_COMPARE: Final = f"""\
To compare with Synapse, run this script under a Python that has both:
    python3 -m venv /tmp/synapse-venv
    /tmp/synapse-venv/bin/pip install matrix-synapse=={SYNAPSE_VERSION} -e .
    /tmp/synapse-venv/bin/python benchmarks/wire.py"""

# One command of the mix: its NAME and the constructor arguments, which are the
# same for our class and Synapse's class of that name.
Spec = tuple[str, tuple[Any, ...]]

# --------------------------------------------------------------------------
# The mix


_B64URL: Final = string.ascii_letters + string.digits + "-_"
_NON_ASCII: Final = ("é", "☃", "🎉")
_NON_ASCII_RATE: Final = 0.05
_SERVERS: Final = ("example.com",) * 8 + ("matrix.org", "example.org")
_MEMBERSHIPS: Final = ("join",) * 6 + ("leave",) * 2 + ("invite", "ban")
_OTHER_STATE_TYPES: Final = (
    "m.room.name",
    "m.room.topic",
    "m.room.avatar",
    "m.room.power_levels",
    "m.room.join_rules",
    "m.room.pinned_events",
    "m.space.child",
    "im.vector.modular.widgets",
    "org.matrix.msc3401.call.member",
)
_USER_AGENTS: Final = (
    "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Element/1.11.85 Chrome/130.0.6723.137 Electron/33.2.1 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10.15; rv:133.0) Gecko/20100101 Firefox/133.0",
    "Element X/25.01.2 (iPhone15,2; iOS 18.2.1; Scale/3.00)",
    "Element/1.6.34 (iPhone; iOS 17.5.1; Scale/3.00)",
    "Element/1.6.24 (Google Pixel 7; Android 14; UP1A.231005.007; Flavour GooglePlay; "
    "MatrixAndroidSdk2 1.6.24)",
    "Element - X/0.7.6 [0.7.6] (Samsung SM-S918B; Android 14; "
    "UP1A.231005.007; Sdk 6b2ce2b)",
    "FluffyChat/1.22.1 (Linux; Android 13)",
    "python-requests/2.32.3",
    "mautrix-whatsapp/v0.11.2 mautrix-go/v0.22.1",
    "curl/8.5.0",
)
_STREAM_WRITERS: Final = (
    ("events", ("event_persister1", "event_persister2")),
    ("typing", ("typing1",)),
    ("receipts", ("receipts1",)),
    ("caches", ("master", "event_persister1", "event_persister2")),
    ("presence", ("presence1",)),
    ("to_device", ("to_device1",)),
    ("account_data", ("account_data1",)),
    ("device_lists", ("master",)),
    ("push_rules", ("master",)),
    ("backfill", ("event_persister1",)),
    ("federation", ("federation_sender1",)),
)
_LOCK_NAMES: Final = (
    "new_event_during_purge_lock",
    "purge_pagination_lock",
    "update_join_states_lock",
    "federation_inbound_pdu",
    "upload_media",
)

# How often each kind of step happens on a busy homeserver; an events step
# writes one to several lines (an event and its state changes share a token).
_STEPS: Final = (
    ("event", 55),
    ("typing", 10),
    ("receipt", 12),
    ("user_ip", 8),
    ("position", 4),
    ("lock_released", 2),
)


class _MixGenerator:
    """Deterministic (seeded) lines of a busy homeserver."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.rooms = [self._room_id() for _ in range(300)]
        # Rooms are not equally busy: a few carry most of the traffic.
        self.room_weights = [1.0 / (i + 1) ** 0.8 for i in range(len(self.rooms))]
        self.users = [self._user_id(n) for n in rng.sample(range(1, 100_000), 3000)]
        self.recent_events: list[str] = [self._event_id() for _ in range(50)]
        self.events_token = 1_854_203
        self.typing_token = 412_377
        self.receipts_token = 96_112
        self.now_ms = 1_764_000_000_000

    # -- identifiers

    def _maybe_non_ascii(self, text: str) -> str:
        if self.rng.random() < _NON_ASCII_RATE:
            cut = self.rng.randint(0, len(text))
            return text[:cut] + self.rng.choice(_NON_ASCII) + text[cut:]
        return text

    def _event_id(self) -> str:
        return "$" + "".join(self.rng.choices(_B64URL, k=43))

    def _room_id(self) -> str:
        return "!" + "".join(self.rng.choices(string.ascii_letters, k=18)) + ":example.com"

    def _user_id(self, n: int) -> str:
        local = self._maybe_non_ascii(f"user{n}")
        return f"@{local}:{self.rng.choice(_SERVERS)}"

    def _device_id(self) -> str:
        return "".join(self.rng.choices(string.ascii_uppercase, k=10))

    def _access_token(self, user_id: str) -> str:
        local = user_id[1:].partition(":")[0].encode("utf-8")
        encoded = base64.urlsafe_b64encode(local).decode("ascii").rstrip("=")
        rand = "".join(self.rng.choices(string.ascii_letters, k=20))
        crc = "".join(self.rng.choices(string.ascii_letters + string.digits, k=6))
        return f"syt_{encoded}_{rand}_{crc}"

    def _room(self) -> str:
        return self.rng.choices(self.rooms, self.room_weights)[0]

    def _user(self) -> str:
        return self.rng.choice(self.users)

    def _recent_event(self) -> str:
        return self.rng.choice(self.recent_events)

    def _bool(self, value: bool) -> bool | int:
        """A boolean as Synapse writes it: 0/1 from SQLite, false/true from
        PostgreSQL."""
        return value if self.rng.random() < 0.5 else int(value)

    def _tick(self) -> int:
        self.now_ms += self.rng.randint(0, 40)
        return self.now_ms

    # -- steps

    def step(self) -> list[Spec]:
        steps: dict[str, Callable[[], list[Spec]]] = {
            "event": self._step_event,
            "typing": self._step_typing,
            "receipt": self._step_receipt,
            "user_ip": self._step_user_ip,
            "position": self._step_position,
            "lock_released": self._step_lock_released,
        }
        kind = self.rng.choices([k for k, _ in _STEPS], [w for _, w in _STEPS])[0]
        return steps[kind]()

    def _step_event(self) -> list[Spec]:
        rng = self.rng
        room = self._room()
        event_id = self._event_id()
        self.recent_events[rng.randrange(len(self.recent_events))] = event_id
        state_key: str | None = None
        redacts: str | None = None
        relates_to: str | None = None
        membership: str | None = None
        roll = rng.random()
        if roll < 0.68:
            event_type = "m.room.message"
            if rng.random() < 0.15:  # thread reply or edit
                relates_to = self._recent_event()
        elif roll < 0.78:
            event_type = "m.reaction"
            relates_to = self._recent_event()
        elif roll < 0.80:
            event_type = "m.room.redaction"
            redacts = self._recent_event()
        elif roll < 0.94:
            event_type = "m.room.member"
            state_key = self._user()
            membership = rng.choice(_MEMBERSHIPS)
        else:
            event_type = rng.choice(_OTHER_STATE_TYPES)
            state_key = "" if rng.random() < 0.6 else self._maybe_non_ascii(
                rng.choice((self._user(), self._device_id().lower(), "example.com"))
            )
        rows: list[list[Any]] = [
            [
                "ev",
                [
                    event_id,
                    room,
                    event_type,
                    state_key,
                    redacts,
                    relates_to,
                    membership,
                    self._bool(rng.random() < 0.01),
                    self._bool(rng.random() < 0.02),
                ],
            ]
        ]
        if state_key is not None:
            rows.append(["state", [room, event_type, state_key, event_id]])
            # Sometimes one event changes several keys (state resolution after
            # a join over federation), or one is removed.
            for _ in range(rng.choice((0, 0, 0, 0, 1, 3))):
                other_key = self._user()
                rows.append(
                    [
                        "state",
                        [
                            room,
                            "m.room.member",
                            other_key,
                            None if rng.random() < 0.05 else self._event_id(),
                        ],
                    ]
                )
        if rng.random() < 0.002:
            rows.append(["state-all", [room]])
        self.events_token += rng.randint(1, 3)
        writer = rng.choice(("event_persister1", "event_persister2"))
        return [
            (
                "RDATA",
                ("events", writer, None if i < len(rows) - 1 else self.events_token, row),
            )
            for i, row in enumerate(rows)
        ]

    def _step_typing(self) -> list[Spec]:
        self.typing_token += 1
        users = self.rng.sample(self.users, self.rng.choice((0, 0, 1, 1, 1, 2, 2, 3, 4, 5)))
        return [("RDATA", ("typing", "typing1", self.typing_token, [self._room(), users]))]

    def _step_receipt(self) -> list[Spec]:
        rng = self.rng
        self.receipts_token += 1
        thread_roll = rng.random()
        thread_id = (
            None if thread_roll < 0.6 else "main" if thread_roll < 0.85 else self._recent_event()
        )
        receipt_type = "m.read" if rng.random() < 0.85 else "m.read.private"
        row = [
            self._room(),
            receipt_type,
            self._user(),
            self._recent_event(),
            thread_id,
            {"ts": self._tick()},
        ]
        return [("RDATA", ("receipts", "receipts1", self.receipts_token, row))]

    def _step_user_ip(self) -> list[Spec]:
        rng = self.rng
        user = self._user()
        if rng.random() < 0.7:
            ip = ".".join(str(rng.randint(1, 254)) for _ in range(4))
        else:
            ip = "2001:db8:" + ":".join(f"{rng.randint(0, 0xFFFF):x}" for _ in range(6))
        device = None if rng.random() < 0.05 else self._maybe_non_ascii(self._device_id())
        args = (
            user,
            self._access_token(user),
            ip,
            self._maybe_non_ascii(rng.choice(_USER_AGENTS)),
            device,
            self._tick(),
        )
        return [("USER_IP", args)]

    def _step_position(self) -> list[Spec]:
        stream, writers = self.rng.choice(_STREAM_WRITERS)
        new = self.events_token if stream == "events" else self.rng.randint(1, 2_000_000)
        prev = new - self.rng.choice((0, 0, 1, 2, 5, 17))
        return [("POSITION", (stream, self.rng.choice(writers), prev, new))]

    def _step_lock_released(self) -> list[Spec]:
        instance = self.rng.choice(("master", "event_persister1", "event_persister2"))
        lock = self.rng.choice(_LOCK_NAMES)
        key = self._room() if "media" not in lock else self._maybe_non_ascii(
            "".join(self.rng.choices(string.ascii_letters, k=24))
        )
        return [("LOCK_RELEASED", (instance, lock, key))]


def build_mix(count: int, seed: int) -> list[Spec]:
    gen = _MixGenerator(seed)
    specs: list[Spec] = []
    while len(specs) < count:
        specs.extend(gen.step())
    return specs[:count]


_ref_encoder: Final = json.JSONEncoder(ensure_ascii=True, allow_nan=False, separators=(",", ":"))


def reference_line(spec: Spec) -> bytes:
    """The framed line for `spec`, written from the wire facts alone (compact,
    ASCII-escaped JSON; UTF-8 line; newline), independent of both libraries."""
    name, args = spec
    enc = _ref_encoder.encode
    if name == "RDATA":
        stream, instance, token, row = args
        rest = f"{stream} {instance} {'batch' if token is None else token} {enc(row)}"
    elif name == "POSITION":
        rest = " ".join(str(a) for a in args)
    elif name == "USER_IP":
        rest = f"{args[0]} {enc(list(args[1:]))}"
    elif name == "LOCK_RELEASED":
        rest = enc(list(args))
    else:
        raise AssertionError(name)
    return f"{name} {rest}\n".encode()


def describe_mix(specs: Sequence[Spec], lines: Sequence[bytes]) -> list[str]:
    kinds: Counter[str] = Counter()
    batch = 0
    for name, args in specs:
        if name == "RDATA":
            stream, _, token, row = args
            kinds[f"RDATA {stream}" + (f" {row[0]}" if stream == "events" else "")] += 1
            batch += token is None
        else:
            kinds[name] += 1
    non_ascii = sum(1 for line in lines if not line.isascii())
    escaped = sum(1 for line in lines if b"\\u" in line)
    total = len(lines)
    out = [
        f"mix: {total} lines, {sum(map(len, lines)):,} bytes "
        f"({non_ascii} with raw UTF-8, {escaped} with \\u escapes)"
    ]
    for kind, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
        out.append(f"  {kind:<24} {n:>6}  {100 * n / total:5.1f}%")
    out.append(f"  (RDATA with token `batch`: {batch}, {100 * batch / total:.1f}%)")
    return out


# --------------------------------------------------------------------------
# The two implementations, one line at a time (used by the checks). The timed
# loops below inline exactly these steps.


def ours_parse_line(line: bytes) -> tuple[Command, Any]:
    cmd = parse_command_from_bytes(line)
    row = None
    if isinstance(cmd, RdataCommand):
        row = STREAMS_MAP[cmd.stream_name].parse_row(cmd.row)
    return cmd, row


def ours_serialize(cmd: Command) -> bytes:
    return encode_command(cmd) + b"\n"


class SynapseSide:
    """Synapse's commands, streams and send path, imported from a Synapse
    install (typed as Any: Synapse is not a dependency of this package)."""

    def __init__(self) -> None:
        self.commands: Any = importlib.import_module("synapse.replication.tcp.commands")
        self.streams: Any = importlib.import_module("synapse.replication.tcp.streams")
        self.version = metadata.version("matrix-synapse")

    def build(self, spec: Spec) -> Any:
        name, args = spec
        # Separate objects from ours, same content.
        return self.commands.COMMAND_MAP[name](*copy.deepcopy(args))

    def parse_line(self, line: bytes) -> tuple[Any, Any]:
        cmd = self.commands.parse_command_from_line(line.decode("utf-8"))
        row = None
        if isinstance(cmd, self.commands.RdataCommand):
            row = self.streams.STREAMS_MAP[cmd.stream_name].parse_row(cmd.row)
        return cmd, row

    @staticmethod
    def serialize(cmd: Any) -> bytes:
        # BaseReplicationStreamProtocol.send_command, then sendLine.
        string = "%s %s" % (cmd.NAME, cmd.to_line())  # noqa: UP031 (as Synapse)
        if "\n" in string:
            raise Exception("Unexpected newline in command: %r", string)
        return string.encode("utf-8") + b"\n"


# --------------------------------------------------------------------------
# Timed loops: the whole mix, results dropped as a protocol would after handling.


def ours_parse_all(lines: Sequence[bytes]) -> None:
    parse = parse_command_from_bytes
    streams = STREAMS_MAP
    rdata = RdataCommand
    for line in lines:
        cmd = parse(line)
        if isinstance(cmd, rdata):
            streams[cmd.stream_name].parse_row(cmd.row)


def ours_serialize_all(cmds: Sequence[Command]) -> None:
    encode = encode_command
    for cmd in cmds:
        encode(cmd) + b"\n"


def make_synapse_loops(
    side: SynapseSide,
) -> tuple[Callable[[Sequence[bytes]], None], Callable[[Sequence[Any]], None]]:
    parse = side.commands.parse_command_from_line
    streams = side.streams.STREAMS_MAP
    rdata = side.commands.RdataCommand

    def synapse_parse_all(lines: Sequence[bytes]) -> None:
        for line in lines:
            cmd = parse(line.decode("utf-8"))
            if isinstance(cmd, rdata):
                streams[cmd.stream_name].parse_row(cmd.row)

    def synapse_serialize_all(cmds: Sequence[Any]) -> None:
        for cmd in cmds:
            string = "%s %s" % (cmd.NAME, cmd.to_line())  # noqa: UP031 (as Synapse)
            if "\n" in string:
                raise Exception("Unexpected newline in command: %r", string)
            string.encode("utf-8") + b"\n"

    return synapse_parse_all, synapse_serialize_all


# --------------------------------------------------------------------------
# Checks


class CheckFailed(Exception):
    pass


def _norm(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_norm(v) for v in value)
    if isinstance(value, dict):
        return {k: _norm(v) for k, v in value.items()}
    return value


def _row_fields(row: Any) -> Any:
    """A typed row's field values, for comparing ours with Synapse's (Synapse
    wraps `events` rows as ``EventsStreamRow(type, data)``)."""
    if hasattr(row, "type") and hasattr(row, "data") and attrs.has(type(row.data)):
        row = row.data
    return _norm(attrs.astuple(row, recurse=False))


def check(
    lines: Sequence[bytes],
    ours_cmds: Sequence[Command],
    synapse: SynapseSide | None,
    synapse_cmds: Sequence[Any],
) -> None:
    def fail(i: int, what: str) -> CheckFailed:
        return CheckFailed(f"line {i} of the mix: {what}\n  line: {lines[i][:300]!r}")

    for i, line in enumerate(lines):
        framed = line + b"\n"
        # serialize: identical bytes, equal to the wire facts
        try:
            ours_bytes = ours_serialize(ours_cmds[i])
        except Exception as e:
            raise fail(i, f"ours cannot serialize it: {e!r}") from e
        if ours_bytes != framed:
            raise fail(i, f"ours serializes it as {ours_bytes[:300]!r}")
        # parse, and re-serialize what was parsed
        try:
            cmd, row = ours_parse_line(line)
        except Exception as e:
            raise fail(i, f"ours cannot parse it: {e!r}") from e
        if ours_serialize(cmd) != framed:
            raise fail(i, f"ours re-serializes it as {ours_serialize(cmd)[:300]!r}")
        if cmd != ours_cmds[i]:
            raise fail(i, f"ours parses it as {cmd!r:.300}")
        if synapse is None:
            continue
        try:
            synapse_bytes = synapse.serialize(synapse_cmds[i])
        except Exception as e:
            raise fail(i, f"Synapse cannot serialize it: {e!r}") from e
        if synapse_bytes != framed:
            raise fail(i, f"Synapse serializes it as {synapse_bytes[:300]!r}")
        try:
            _, synapse_row = synapse.parse_line(line)
        except Exception as e:
            raise fail(i, f"Synapse cannot parse it: {e!r}") from e
        if row is not None and _row_fields(row) != _row_fields(synapse_row):
            raise fail(i, f"typed rows differ: ours {row!r:.200}, Synapse's {synapse_row!r:.200}")


# --------------------------------------------------------------------------
# Timing


def _time_ns(fn: Callable[[Sequence[Any]], None], data: Sequence[Any]) -> int:
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter_ns()
        fn(data)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


@attrs.frozen
class Result:
    name: str
    ours_ns: list[int]
    synapse_ns: list[int]  # empty without Synapse

    @property
    def ratios(self) -> list[float]:
        """Per run: Synapse's time over ours (how many times faster ours is)."""
        return [s / o for o, s in zip(self.ours_ns, self.synapse_ns, strict=True)]


def measure(
    name: str,
    ours: Callable[[Sequence[Any]], None],
    ours_data: Sequence[Any],
    synapse: Callable[[Sequence[Any]], None] | None,
    synapse_data: Sequence[Any],
    runs: int,
) -> Result:
    # Warm-up (and first touch of every object).
    ours(ours_data)
    if synapse is not None:
        synapse(synapse_data)
    ours_ns: list[int] = []
    synapse_ns: list[int] = []
    for run in range(runs):
        # Alternate who goes first, so that neither always runs in the other's wake.
        if synapse is not None and run % 2:
            synapse_ns.append(_time_ns(synapse, synapse_data))
            ours_ns.append(_time_ns(ours, ours_data))
        else:
            ours_ns.append(_time_ns(ours, ours_data))
            if synapse is not None:
                synapse_ns.append(_time_ns(synapse, synapse_data))
    return Result(name, ours_ns, synapse_ns)


def _rate(ns: int, count: int) -> str:
    return f"{count * 1e9 / ns:,.0f}"


def print_table(results: Sequence[Result], count: int, targets: dict[str, float]) -> None:
    header = (
        "benchmark",
        "ours ms",
        "ours lines/s",
        "Synapse ms",
        "Synapse lines/s",
        "ours/Synapse",
        "(min-max)",
        "target",
        "",
    )
    rows: list[tuple[str, ...]] = []
    for r in results:
        ours_med = int(statistics.median(r.ours_ns))
        if r.synapse_ns:
            syn_med = int(statistics.median(r.synapse_ns))
            ratio = statistics.median(r.ratios)
            target = targets[r.name]
            rows.append(
                (
                    r.name,
                    f"{ours_med / 1e6:.1f}",
                    _rate(ours_med, count),
                    f"{syn_med / 1e6:.1f}",
                    _rate(syn_med, count),
                    f"{ratio:.2f}x",
                    f"{min(r.ratios):.2f}-{max(r.ratios):.2f}",
                    f">= {target:g}x",
                    "PASS" if ratio >= target else "BELOW",
                )
            )
        else:
            rows.append(
                (r.name, f"{ours_med / 1e6:.1f}", _rate(ours_med, count))
                + ("-",) * 5
                + ("skipped",)
            )
    print_markdown(header, rows, right_align=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--lines", type=int, default=20_000, help="lines in the mix")
    parser.add_argument("--runs", type=int, default=15, help="timed runs (at least 5)")
    parser.add_argument("--seed", type=int, default=20251127, help="seed of the mix")
    args = parser.parse_args(argv)
    if args.runs < 5:
        parser.error("--runs must be at least 5")

    synapse: SynapseSide | None
    try:
        synapse = SynapseSide()
    except Exception as e:  # ImportError, or Synapse failing as it loads
        synapse = None
        skipped_because = f"{type(e).__name__}: {e}"

    specs = build_mix(args.lines, args.seed)
    lines = [reference_line(spec)[:-1] for spec in specs]
    ours_cmds: list[Command] = [COMMAND_MAP[name](*a) for name, a in specs]
    assert all(
        isinstance(c, RdataCommand | PositionCommand | UserIpCommand | LockReleasedCommand)
        for c in ours_cmds
    )
    synapse_cmds = [synapse.build(spec) for spec in specs] if synapse is not None else []

    print(
        f"Python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.machine()}, synapse-replication "
        f"{metadata.version('synapse-replication')} "
        f"({'with' if SPEEDUPS is not None else 'without'} its C speed-ups), "
        f"msgspec {metadata.version('msgspec')}, "
        + (f"Synapse {synapse.version}" if synapse is not None else "no Synapse")
    )
    for text in describe_mix(specs, lines):
        print(text)

    try:
        check(lines, ours_cmds, synapse, synapse_cmds)
    except CheckFailed as e:
        print(f"\nABORTED: check failed, nothing timed.\n{e}", file=sys.stderr)
        return 2
    print(
        "checks: "
        + (
            "ours and Synapse's serialize every command to the same bytes, both "
            "parse every line to the same typed rows, ours re-serializes what it "
            "parsed to the original bytes"
            if synapse is not None
            else "ours serializes every command to the expected bytes, parses every "
            "line and re-serializes it to the original bytes"
        )
    )

    syn_parse, syn_serialize = make_synapse_loops(synapse) if synapse is not None else (None, None)
    results = [
        measure("parse", ours_parse_all, lines, syn_parse, lines, args.runs),
        measure("serialize", ours_serialize_all, ours_cmds, syn_serialize, synapse_cmds, args.runs),
    ]
    print(
        f"\n{args.runs} runs after a warm-up, gc disabled during each; medians of the "
        f"time for the whole mix; ours/Synapse = Synapse's time / ours, per run, median\n"
    )
    print_table(results, len(lines), {"parse": PARSE_TARGET, "serialize": SERIALIZE_TARGET})
    if synapse is None:
        print(f"\nComparison with Synapse SKIPPED: cannot import synapse ({skipped_because}).")
        print(HOW_TO_COMPARE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
