# -*- test-case-name: tests.test_config -*-
"""The worker configuration: a YAML file read into frozen, validated settings.

Keys are Synapse's wherever the meaning is the same, so a Synapse operator
recognises them::

    server_name: example.com            # required
    instance_name: event_persister1     # default: master (Synapse: worker_name)
    worker_replication_secret_path: replication.secret   # or worker_replication_secret
    instance_map:                       # where each instance's HTTP replication
      main: {host: 10.0.0.1, port: 9093}     # endpoint listens; `main` is the
      event_persister1: {host: 10.0.0.2, port: 9093, tls: false}   # main process
      typing1: {path: /run/synapse/typing1.sock}
    stream_writers:                     # default: every stream written by master
      events: [master, event_persister1]
      typing: typing1                   # exactly one writer
    redis: {enabled: true, host: 10.0.0.1, port: 6379, password_path: redis.secret}
    database:
      name: psycopg2
      args: {user: synapse, password: ..., database: synapse, host: 10.0.0.1}
    listeners:
      - type: http
        port: 9093
        bind_addresses: ["10.0.0.2"]    # default: ["127.0.0.1"]
        resources: [{names: [replication]}]
    replication_connect: {host: 10.0.0.1, port: 9092}   # TCP, without Redis
    replication_limits: {max_line_length: 16384, catch_up_row_count: 1000,
                         reconnect: {initial: 1.0, maximum: 30.0}}

Where this differs from Synapse, on purpose:

- Every unknown key is an error, with a "did you mean" suggestion: a typo
  must not silently leave a default in force.
- Listeners bind to 127.0.0.1 unless told otherwise (Synapse: every address).
- ``type: replication`` listeners (direct TCP replication, which Synapse
  dropped) are supported: this library still speaks it.
- `instance_map` may name the main process `main` (Synapse's name there) or
  `master` (its instance name everywhere else), not both. Synapse requires
  `main` on every worker; we require the location of every *writer* as soon
  as there is more than one instance, which includes the main process
  whenever it writes anything (by default it writes everything).
- An empty secret is refused rather than read as "no secret", and an HTTP
  listener serving replication needs a secret (without one it refuses every
  request).
- Relative paths are relative to the config file's directory, not to the
  current directory.
- Files are only read, and TLS files only checked, for sections in use
  (`redis` only when enabled), as Synapse does.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import math
import os
import types
from collections.abc import Collection, Iterable, Mapping
from typing import Any, Final, Literal, NoReturn, TypeVar

import attrs
import yaml

from synapse_replication.errors import ConfigError, shorten
from synapse_replication.handler import HandlerLimits
from synapse_replication.http import InstanceLocation
from synapse_replication.streams import STREAMS_MAP
from synapse_replication.tcp import Backoff, ConnectionLimits

__all__ = [
    "ANY_INSTANCE_STREAMS",
    "DEFAULT_BIND_ADDRESSES",
    "MAIN_INSTANCE_MAP_NAME",
    "MAIN_INSTANCE_NAME",
    "MAIN_ONLY_STREAMS",
    "SINGLE_WRITER_KEYS",
    "WRITER_KEYS",
    "ConfigError",
    "DatabaseConfig",
    "HttpResourceConfig",
    "ListenerConfig",
    "ListenerType",
    "PostgresDatabaseConfig",
    "RedisConfig",
    "ReplicationConnectConfig",
    "Secret",
    "SqliteDatabaseConfig",
    "WorkerConfig",
    "load_config",
    "parse_config",
]

# The main process's instance name, on the wire and in stream_writers.
MAIN_INSTANCE_NAME: Final = "master"
# What Synapse calls the main process in `instance_map`.
MAIN_INSTANCE_MAP_NAME: Final = "main"

# Listeners bind here unless the config says otherwise.
DEFAULT_BIND_ADDRESSES: Final = ("127.0.0.1",)

# The keys of `stream_writers` (Synapse's, all of them), each with the streams
# (wire names) its writers write, grouped as Synapse groups them.
WRITER_KEYS: Final[Mapping[str, tuple[str, ...]]] = types.MappingProxyType(
    {
        "events": ("events", "backfill", "profile_updates", "sticky_events"),
        "typing": ("typing",),
        "to_device": ("to_device",),
        # Room tags travel in the account_data stream.
        "account_data": ("account_data",),
        "receipts": ("receipts",),
        "presence": ("presence", "presence_federation"),
        "push_rules": ("push_rules",),
        "device_lists": ("device_lists",),
        "thread_subscriptions": ("thread_subscriptions",),
        "quarantined_media_changes": ("quarantined_media",),
    }
)
# The keys whose streams Synapse allows exactly one writer; every other key
# needs at least one.
SINGLE_WRITER_KEYS: Final = frozenset(
    {"typing", "to_device", "account_data", "presence", "push_rules"}
)
# Streams no config assigns: always written by the main process...
MAIN_ONLY_STREAMS: Final = frozenset(
    {"pushers", "federation", "un_partial_stated_room", "un_partial_stated_event"}
)
# ... or by any instance (every instance invalidates caches).
ANY_INSTANCE_STREAMS: Final = frozenset({"caches"})

_STREAM_TO_KEY: Final[Mapping[str, str]] = types.MappingProxyType(
    {stream: key for key, streams in WRITER_KEYS.items() for stream in streams}
)

# Largest secret file read; anything bigger is surely the wrong file (and a
# FIFO or device is not read forever).
_MAX_SECRET_FILE_BYTES: Final = 64 * 1024

_T = TypeVar("_T")
_Path = tuple[str | int, ...]


def _freeze(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only copy of `mapping`, so that a frozen config stays frozen."""
    return types.MappingProxyType(dict(mapping))


# -- values


@attrs.frozen(repr=False)
class Secret:
    """A secret string that does not show itself: its repr and str are
    ``Secret('***')``. `reveal` gives the value, for the one place that needs
    it."""

    _value: str = attrs.field(alias="value")

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


@attrs.frozen(kw_only=True)
class RedisConfig:
    """Synapse's `redis` section: the pub/sub bus between instances.

    `path` (a UNIX socket) replaces `host` and `port`. The TLS files
    (`certificate_file` and `private_key_file` together, for a client
    certificate; `ca_file` or the directory `ca_path` to check the server)
    exist if `use_tls`."""

    enabled: bool = False
    host: str = "localhost"
    port: int = 6379
    path: str | None = None
    username: str | None = None
    password: Secret | None = None
    dbid: int | None = None
    use_tls: bool = False
    certificate_file: str | None = None
    private_key_file: str | None = None
    ca_file: str | None = None
    ca_path: str | None = None


@attrs.frozen(kw_only=True)
class SqliteDatabaseConfig:
    """``database: {name: sqlite3, args: {database: PATH}}``; `path` is
    absolute, or ``:memory:``."""

    path: str

    @property
    def name(self) -> Literal["sqlite3"]:
        return "sqlite3"


@attrs.frozen(kw_only=True)
class PostgresDatabaseConfig:
    """``database: {name: psycopg2, args: {...}}``.

    `database` is ``args.database`` or its libpq spelling ``args.dbname``;
    `cp_min`/`cp_max` size the connection pool, as in Synapse; `options` are
    the other libpq connection parameters given (file parameters made
    absolute, `sslpassword` a `Secret`)."""

    user: str | None = None
    password: Secret | None = None
    database: str | None = None
    host: str | None = None
    port: int | None = None
    cp_min: int | None = None
    cp_max: int | None = None
    options: Mapping[str, str | int | Secret] = attrs.field(
        factory=dict, converter=_freeze
    )

    @property
    def name(self) -> Literal["psycopg2"]:
        return "psycopg2"

    def connect_kwargs(self) -> dict[str, str | int]:
        """Keyword arguments for ``psycopg2.connect``, secrets revealed (pool
        sizes excluded)."""
        kwargs: dict[str, str | int] = {}
        for key in ("user", "database", "host", "port"):
            value = getattr(self, key)
            if value is not None:
                kwargs["dbname" if key == "database" else key] = value
        if self.password is not None:
            kwargs["password"] = self.password.reveal()
        for key, option in self.options.items():
            kwargs[key] = option.reveal() if isinstance(option, Secret) else option
        return kwargs


DatabaseConfig = SqliteDatabaseConfig | PostgresDatabaseConfig


class ListenerType(enum.StrEnum):
    REPLICATION = "replication"
    HTTP = "http"
    METRICS = "metrics"


@attrs.frozen(kw_only=True)
class HttpResourceConfig:
    """One entry of an HTTP listener's `resources`."""

    names: tuple[str, ...]


@attrs.frozen(kw_only=True)
class ListenerConfig:
    """One entry of `listeners`: TCP on `port` at each of `bind_addresses`
    (port 0: any free port), or, for HTTP, the UNIX socket `path` with
    permissions `mode` (then `port` is None and `bind_addresses` empty)."""

    type: ListenerType
    port: int | None = None
    bind_addresses: tuple[str, ...] = DEFAULT_BIND_ADDRESSES
    path: str | None = None
    mode: int | None = None
    resources: tuple[HttpResourceConfig, ...] = ()

    def serves(self, resource: str) -> bool:
        """Whether this is an HTTP listener serving `resource`."""
        return any(resource in r.names for r in self.resources)


@attrs.frozen(kw_only=True)
class ReplicationConnectConfig:
    """Where a worker reaches a ``type: replication`` listener over TCP
    (used when Redis is disabled)."""

    host: str = "127.0.0.1"
    port: int


@attrs.frozen(kw_only=True)
class WorkerConfig:
    """One instance's configuration, validated as a whole.

    `instance_map` has the main process under `master` (its instance name),
    whichever name the file used. `stream_writers` has every key of
    `WRITER_KEYS`, defaults filled in.
    """

    server_name: str
    instance_name: str = MAIN_INSTANCE_NAME
    instance_map: Mapping[str, InstanceLocation] = attrs.field(
        factory=dict, converter=_freeze
    )
    stream_writers: Mapping[str, tuple[str, ...]] = attrs.field(
        factory=lambda: dict.fromkeys(WRITER_KEYS, (MAIN_INSTANCE_NAME,)),
        converter=_freeze,
    )
    worker_replication_secret: Secret | None = None
    redis: RedisConfig = attrs.Factory(RedisConfig)
    database: DatabaseConfig | None = None
    listeners: tuple[ListenerConfig, ...] = ()
    replication_connect: ReplicationConnectConfig | None = None
    connection_limits: ConnectionLimits = attrs.Factory(ConnectionLimits)
    handler_limits: HandlerLimits = attrs.Factory(HandlerLimits)
    reconnect_backoff: Backoff = attrs.Factory(Backoff)

    def writers_of(self, stream: str) -> list[str]:
        """The instances that write `stream` (a wire name, e.g. ``events``).

        For a stream every instance writes (``caches``): every instance the
        config names. Raises ValueError for a stream this config knows
        nothing about."""
        key = _STREAM_TO_KEY.get(stream)
        if key is not None:
            return list(self.stream_writers[key])
        if stream in MAIN_ONLY_STREAMS:
            return [MAIN_INSTANCE_NAME]
        if stream in ANY_INSTANCE_STREAMS:
            return sorted({self.instance_name, *self.instance_map, *self._writers()})
        raise ValueError(f"Unknown stream {stream!r}")

    def writes(self, stream: str) -> bool:
        """Whether this instance writes `stream`."""
        if stream in ANY_INSTANCE_STREAMS:
            return True
        return self.instance_name in self.writers_of(stream)

    def written_streams(self) -> list[str]:
        """The streams of `STREAMS_MAP` this instance writes, sorted."""
        return sorted(name for name in STREAMS_MAP if self.writes(name))

    def writers_by_stream(self) -> dict[str, list[str]]:
        """Every stream of `STREAMS_MAP` with a fixed set of writers, with
        them: the `stream_writers` argument of the command handler (which
        accepts any writer for the streams left out, like ``caches``)."""
        return {
            name: self.writers_of(name)
            for name in sorted(STREAMS_MAP)
            if name not in ANY_INSTANCE_STREAMS
        }

    def location_of(self, instance: str) -> InstanceLocation:
        """Where `instance`'s HTTP replication endpoint listens (``main`` is
        the main process). Raises ConfigError if `instance_map` lacks it."""
        name = MAIN_INSTANCE_NAME if instance == MAIN_INSTANCE_MAP_NAME else instance
        location = self.instance_map.get(name)
        if location is None:
            entry = MAIN_INSTANCE_MAP_NAME if name == MAIN_INSTANCE_NAME else name
            raise ConfigError(
                "instance_map",
                f"no location for instance {instance!r}; add "
                f"instance_map.{entry} with host and port (or path)",
            )
        return location

    def _writers(self) -> set[str]:
        return {w for writers in self.stream_writers.values() for w in writers}


# -- loading


def load_config(path: str | os.PathLike[str]) -> WorkerConfig:
    """Read and validate the YAML worker config at `path`; relative paths in
    it are relative to its directory. Every problem is a ConfigError naming
    the file and the key."""
    filename = os.fspath(path)
    try:
        with open(filename, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError(
            "", f"cannot read the config file: {e.strerror or e}", file=filename
        ) from None
    try:
        document = yaml.load(data, Loader=_StrictLoader)  # a SafeLoader
    except yaml.MarkedYAMLError as e:
        raise ConfigError("", _describe_yaml_error(e), file=filename) from None
    except yaml.YAMLError as e:
        # Not positioned (a bad encoding, say).
        raise ConfigError(
            "", f"not valid YAML: {shorten(str(e))}", file=filename
        ) from None
    except RecursionError:
        raise ConfigError(
            "", "the YAML document is nested too deeply", file=filename
        ) from None
    try:
        return parse_config(
            document, base_dir=os.path.dirname(os.path.abspath(filename))
        )
    except ConfigError as e:
        raise ConfigError(e.key, e.reason, file=filename) from None


def parse_config(config: object, *, base_dir: str | os.PathLike[str]) -> WorkerConfig:
    """Validate `config` (a loaded YAML document; anything else is refused
    with a ConfigError) into a WorkerConfig; relative paths are relative to
    `base_dir`."""
    return _Parser(os.path.abspath(os.fspath(base_dir))).parse(config)


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping
    (PyYAML keeps the last silently). Keys brought in by a merge (``<<``)
    may still be overridden."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:
                # Unhashable: PyYAML's own constructor reports it.
                continue
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    f"while constructing a mapping (key {shorten(str(key), 60)!r} "
                    f"first given at line {first.line + 1})",
                    node.start_mark,
                    "found a duplicate key",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _describe_yaml_error(e: yaml.MarkedYAMLError) -> str:
    """Where and what, without PyYAML's snippet of the line (which could show
    a secret)."""
    mark = e.problem_mark or e.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    what = "; ".join(part for part in (e.context, e.problem) if part)
    return f"YAML syntax error{where}: {what or 'invalid YAML'}"


# -- describing values in errors


def _fmt_path(path: _Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.isidentifier() or (
            part and all(c.isalnum() or c in "_-" for c in part)
        ):
            out += f".{part}" if out else part
        else:
            out += f"[{shorten(part, 60)!r}]"
    return out


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"a {type(value).__name__}"


def _show(value: object, *, secret: bool = False) -> str:
    """`value` as an error message shows it: its kind, and for a scalar that
    is not a secret the value itself (shortened)."""
    kind = _kind(value)
    if secret or value is None or isinstance(value, Mapping | list | tuple):
        return kind
    if isinstance(value, bool):
        return f"{kind} ({str(value).lower()})"
    if isinstance(value, str | int | float):
        return f"{kind} ({shorten(repr(value), 80)})"
    return kind


def _fail(path: _Path, reason: str) -> NoReturn:
    raise ConfigError(_fmt_path(path), reason)


def _join(names: Iterable[str]) -> str:
    return ", ".join(sorted(names))


def _suggest(word: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}? " if close else ""


# -- the parser


class _Parser:
    """Walks the document, keeping the key path for error messages."""

    def __init__(self, base_dir: str) -> None:
        self._base_dir = base_dir

    # generic pieces

    def _mapping(
        self,
        value: object,
        path: _Path,
        *,
        allowed: Collection[str] | None = None,
        required: Collection[str] = (),
        what: str = "a mapping",
    ) -> dict[str, Any]:
        """`value` as a mapping with string keys; with `allowed`, no other
        keys; every `required` key present and not null."""
        if value is None and not required:
            return {}
        if not isinstance(value, Mapping):
            _fail(path, f"expected {what}, got {_show(value)}")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                _fail(path, f"keys must be strings, got {_show(key)}")
            if allowed is not None and key not in allowed:
                _fail(
                    (*path, key),
                    f"unknown key; {_suggest(key, allowed)}expected one of: {_join(allowed)}",
                )
            out[key] = item
        for key in required:
            if out.get(key) is None:
                _fail((*path, key), "missing; this key is required")
        return out

    def _str(self, value: object, path: _Path, *, secret: bool = False) -> str:
        if not isinstance(value, str):
            _fail(path, f"expected a string, got {_show(value, secret=secret)}")
        return value

    def _nonempty_str(self, value: object, path: _Path) -> str:
        text = self._str(value, path)
        if not text.strip():
            _fail(path, "expected a non-empty string")
        return text

    def _name(self, value: object, path: _Path, what: str) -> str:
        """A name that travels as one field of a wire line (instance and
        server names): non-empty, printable, no whitespace."""
        text = self._str(value, path)
        if not text or not text.isprintable() or any(c.isspace() for c in text):
            _fail(
                path,
                f"expected {what}: non-empty, printable, without spaces; got {_show(value)}",
            )
        return text

    def _bool(self, value: object, path: _Path) -> bool:
        if not isinstance(value, bool):
            _fail(path, f"expected true or false, got {_show(value)}")
        return value

    def _int(
        self, value: object, path: _Path, *, low: int, high: int | None = None
    ) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected an integer, got {_show(value)}")
        if value < low or (high is not None and value > high):
            bounds = (
                f"between {low} and {high}" if high is not None else f"at least {low}"
            )
            _fail(path, f"expected an integer {bounds}, got {value}")
        return value

    def _port(self, value: object, path: _Path, *, allow_zero: bool = False) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, f"expected a port number (integer), got {_show(value)}")
        low = 0 if allow_zero else 1
        if not low <= value <= 65535:
            _fail(path, f"port out of range: expected {low} to 65535, got {value}")
        return value

    def _number(self, value: object, path: _Path) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(path, f"expected a number, got {_show(value)}")
        if not math.isfinite(value):
            _fail(path, f"expected a finite number, got {value}")
        return float(value)

    def _path(self, value: object, path: _Path) -> str:
        """A file path, made absolute against the config's directory."""
        text = self._str(value, path)
        if not text or "\0" in text:
            _fail(path, "expected a file path (non-empty, without NUL characters)")
        return os.path.normpath(os.path.join(self._base_dir, text))

    def _existing_file(self, value: object, path: _Path) -> str:
        file = self._path(value, path)
        if not os.path.isfile(file):
            _fail(path, f"file {file!r} does not exist (or is not a file)")
        return file

    def _read_secret_file(self, value: object, path: _Path) -> str:
        """The secret in a file, surrounding whitespace (the final newline)
        stripped. The path is shown in errors, the content never."""
        file = self._path(value, path)
        try:
            with open(file, "rb") as f:
                data = f.read(_MAX_SECRET_FILE_BYTES + 1)
        except OSError as e:
            _fail(path, f"cannot read the secret file {file!r}: {e.strerror or e}")
        except ValueError:
            _fail(path, f"cannot read the secret file {file!r}: not a valid file name")
        if len(data) > _MAX_SECRET_FILE_BYTES:
            _fail(
                path,
                f"the secret file {file!r} is larger than {_MAX_SECRET_FILE_BYTES} "
                "bytes; expected a file holding just the secret",
            )
        try:
            return data.decode("utf-8").strip()
        except UnicodeDecodeError:
            _fail(path, f"the secret file {file!r} is not UTF-8 text")

    def _secret(
        self, section: Mapping[str, Any], path: _Path, key: str, path_key: str
    ) -> str | None:
        """The secret given inline under `key` or in the file named under
        `path_key` (not both); None if neither."""
        inline = section.get(key)
        file = section.get(path_key)
        if inline is not None and file is not None:
            _fail(
                (*path, path_key),
                f"both {key!r} and {path_key!r} are set; give only one of them",
            )
        if inline is not None:
            return self._str(inline, (*path, key), secret=True)
        if file is not None:
            return self._read_secret_file(file, (*path, path_key))
        return None

    # sections

    def parse(self, document: object) -> WorkerConfig:
        if not isinstance(document, Mapping):
            got = "an empty document" if document is None else _show(document)
            raise ConfigError(
                "", f"the top level of the config must be a mapping of keys, got {got}"
            )
        top = self._mapping(
            document, (), allowed=_TOP_LEVEL_KEYS, required=("server_name",)
        )

        server_name = self._name(top["server_name"], ("server_name",), "a server name")
        instance_name = self._instance_name(top)
        instance_map = self._instance_map(top.get("instance_map"))
        stream_writers = self._stream_writers(top.get("stream_writers"))
        secret = self._replication_secret(top)
        redis = self._redis(top.get("redis"))
        database = self._database(top.get("database"))
        listeners = self._listeners(top.get("listeners"))
        connect = self._replication_connect(top.get("replication_connect"))
        connection_limits, handler_limits, backoff = self._limits(
            top.get("replication_limits")
        )

        self._check_writer_locations(
            instance_name,
            instance_map,
            stream_writers,
            explicit=top.get("stream_writers"),
        )
        for i, listener in enumerate(listeners):
            if listener.serves("replication") and secret is None:
                _fail(
                    ("listeners", i),
                    "serves replication over HTTP but no worker_replication_secret "
                    "(or worker_replication_secret_path) is set; without one every "
                    "request would be refused",
                )
        others = sorted(
            {w for ws in stream_writers.values() for w in ws} - {instance_name}
        )
        serves_tcp = any(lst.type is ListenerType.REPLICATION for lst in listeners)
        if others and not redis.enabled and connect is None and not serves_tcp:
            _fail(
                ("replication_connect",),
                f"missing; this instance follows streams written by {others[0]!r} and "
                "Redis is disabled, so it needs the host and port of a "
                "'type: replication' listener to connect to (or enable redis)",
            )

        return WorkerConfig(
            server_name=server_name,
            instance_name=instance_name,
            instance_map=instance_map,
            stream_writers=stream_writers,
            worker_replication_secret=Secret(secret) if secret is not None else None,
            redis=redis,
            database=database,
            listeners=listeners,
            replication_connect=connect,
            connection_limits=connection_limits,
            handler_limits=handler_limits,
            reconnect_backoff=backoff,
        )

    def _instance_name(self, top: Mapping[str, Any]) -> str:
        name = top.get("instance_name")
        alias = top.get("worker_name")
        if name is not None and alias is not None:
            _fail(
                ("worker_name",),
                "both 'instance_name' and 'worker_name' (Synapse's name for it) "
                "are set; give only one of them",
            )
        key = "instance_name" if alias is None else "worker_name"
        value = name if alias is None else alias
        if value is None:
            return MAIN_INSTANCE_NAME
        value = self._name(value, (key,), "an instance name")
        if value == MAIN_INSTANCE_MAP_NAME:
            _fail(
                (key,),
                f"{MAIN_INSTANCE_MAP_NAME!r} is the instance_map name of the main "
                f"process, whose instance name is {MAIN_INSTANCE_NAME!r}; use "
                f"{MAIN_INSTANCE_NAME!r} (or omit the key) for the main process",
            )
        return value

    def _replication_secret(self, top: Mapping[str, Any]) -> str | None:
        secret = self._secret(
            top, (), "worker_replication_secret", "worker_replication_secret_path"
        )
        if secret is None:
            return None
        key = (
            "worker_replication_secret"
            if top.get("worker_replication_secret") is not None
            else "worker_replication_secret_path"
        )
        if not secret:
            _fail((key,), "the secret is empty; omit the key for no secret")
        if not secret.isascii() or not secret.isprintable() or " " in secret:
            _fail(
                (key,),
                "the secret must be printable ASCII without spaces (it is sent "
                "in an HTTP Authorization header)",
            )
        return secret

    def _instance_map(self, value: object) -> dict[str, InstanceLocation]:
        path: _Path = ("instance_map",)
        entries = self._mapping(
            value, path, what="a mapping of instance names to locations"
        )
        if MAIN_INSTANCE_MAP_NAME in entries and MAIN_INSTANCE_NAME in entries:
            _fail(
                (*path, MAIN_INSTANCE_NAME),
                f"the main process is given twice, as {MAIN_INSTANCE_MAP_NAME!r} "
                f"and {MAIN_INSTANCE_NAME!r}; keep {MAIN_INSTANCE_MAP_NAME!r}",
            )
        out: dict[str, InstanceLocation] = {}
        for name, entry in entries.items():
            self._name(name, path, "an instance name as key")
            location = self._location(entry, (*path, name))
            out[MAIN_INSTANCE_NAME if name == MAIN_INSTANCE_MAP_NAME else name] = (
                location
            )
        return out

    def _location(self, value: object, path: _Path) -> InstanceLocation:
        entry = self._mapping(
            value,
            path,
            allowed=("host", "port", "tls", "path"),
            what="a mapping with host and port (and tls), or path",
        )
        if "path" in entry:
            if entry.keys() - {"path"}:
                _fail(
                    path,
                    "give either host and port (and tls) or path (a UNIX socket), "
                    f"not both; got {_join(entry)}",
                )
            return InstanceLocation.unix(self._path(entry["path"], (*path, "path")))
        entry = self._mapping(entry, path, required=("host", "port"))
        host = self._nonempty_str(entry["host"], (*path, "host"))
        port = self._port(entry["port"], (*path, "port"))
        tls = (
            self._bool(entry["tls"], (*path, "tls"))
            if entry.get("tls") is not None
            else False
        )
        return InstanceLocation(host=host, port=port, tls=tls)

    def _stream_writers(self, value: object) -> dict[str, tuple[str, ...]]:
        path: _Path = ("stream_writers",)
        given = self._mapping(value, path, what="a mapping of streams to writers")
        out: dict[str, tuple[str, ...]] = dict.fromkeys(
            WRITER_KEYS, (MAIN_INSTANCE_NAME,)
        )
        for key, writers in given.items():
            if key not in WRITER_KEYS:
                if key in MAIN_ONLY_STREAMS:
                    hint = f"the {key} stream is always written by {MAIN_INSTANCE_NAME!r}; "
                elif key in ANY_INSTANCE_STREAMS:
                    hint = f"the {key} stream is written by every instance; "
                elif key in _STREAM_TO_KEY:
                    hint = f"its writers are those of {_STREAM_TO_KEY[key]!r}; "
                else:
                    hint = _suggest(key, WRITER_KEYS)
                _fail(
                    (*path, key),
                    f"unknown stream; {hint}expected one of: {_join(WRITER_KEYS)}",
                )
            out[key] = self._writer_list(key, writers, (*path, key))
        return out

    def _writer_list(self, key: str, value: object, path: _Path) -> tuple[str, ...]:
        items: list[object]
        if isinstance(value, str):
            items = [value]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            _fail(
                path, f"expected an instance name or a list of them, got {_show(value)}"
            )
        names: list[str] = []
        for i, item in enumerate(items):
            item_path = (*path, i) if not isinstance(value, str) else path
            name = self._name(item, item_path, "an instance name")
            if name == MAIN_INSTANCE_MAP_NAME:
                _fail(
                    item_path,
                    f"{MAIN_INSTANCE_MAP_NAME!r} is only the instance_map name of the "
                    f"main process; here it is called {MAIN_INSTANCE_NAME!r}",
                )
            if name in names:
                _fail(item_path, f"instance {name!r} is listed twice")
            names.append(name)
        if key in SINGLE_WRITER_KEYS and len(names) != 1:
            _fail(
                path,
                f"the {key} stream must have exactly one writer, got {len(names)}"
                + (f" ({_join(names)})" if names else ""),
            )
        if not names:
            _fail(path, f"the {key} stream needs at least one writer, got none")
        return tuple(names)

    def _check_writer_locations(
        self,
        instance_name: str,
        instance_map: Mapping[str, InstanceLocation],
        stream_writers: Mapping[str, tuple[str, ...]],
        *,
        explicit: object,
    ) -> None:
        """Every writer has an instance_map entry, unless the config describes
        just this one instance (which writes everything, and which nobody
        else needs to reach)."""
        writers = {w for ws in stream_writers.values() for w in ws}
        if writers <= {instance_name} and instance_map.keys() <= {instance_name}:
            return
        given = explicit if isinstance(explicit, Mapping) else {}
        for key, names in stream_writers.items():
            for name in names:
                if name in instance_map:
                    continue
                entry = MAIN_INSTANCE_MAP_NAME if name == MAIN_INSTANCE_NAME else name
                default = "" if key in given else " (the default)"
                _fail(
                    ("stream_writers", key),
                    f"instance {name!r} writes {key}{default} but is not in "
                    f"instance_map; add instance_map.{entry} with the host and port "
                    "(or path) of its HTTP replication listener",
                )

    def _redis(self, value: object) -> RedisConfig:
        path: _Path = ("redis",)
        section = self._mapping(value, path, allowed=_REDIS_KEYS)

        def opt(key: str, parse: Any) -> Any:
            item = section.get(key)
            return None if item is None else parse(item, (*path, key))

        enabled = opt("enabled", self._bool) or False
        host = opt("host", self._nonempty_str)
        port = opt("port", self._port)
        sock = opt("path", self._path)
        if sock is not None and (host is not None or port is not None):
            _fail(
                (*path, "path"),
                "give either path (a UNIX socket) or host and port, not both",
            )
        username = opt("username", self._str)
        dbid = opt("dbid", lambda v, p: self._int(v, p, low=0))
        use_tls = opt("use_tls", self._bool) or False
        if use_tls and sock is not None:
            _fail((*path, "use_tls"), "TLS over a UNIX socket is not supported")
        # Parsed for types either way; files are read and checked only in use.
        file_parse = self._existing_file if enabled and use_tls else self._path
        cert = opt("certificate_file", file_parse)
        key = opt("private_key_file", file_parse)
        ca_file = opt("ca_file", file_parse)
        ca_path = opt("ca_path", self._path)
        if (cert is None) != (key is None):
            missing = "private_key_file" if key is None else "certificate_file"
            _fail(
                (*path, missing),
                "missing; a client certificate needs both certificate_file and "
                "private_key_file",
            )
        if enabled and use_tls and ca_path is not None and not os.path.isdir(ca_path):
            _fail((*path, "ca_path"), f"directory {ca_path!r} does not exist")
        password: str | None
        if enabled:
            password = self._secret(section, path, "password", "password_path")
        else:
            if (
                section.get("password") is not None
                and section.get("password_path") is not None
            ):
                _fail(
                    (*path, "password_path"),
                    "both 'password' and 'password_path' are set; give only one of them",
                )
            opt("password", lambda v, p: self._str(v, p, secret=True))
            opt("password_path", self._path)
            password = None
        if username is not None and password is None and enabled:
            _fail(
                (*path, "username"),
                "a username needs a password (password or password_path)",
            )
        return RedisConfig(
            enabled=enabled,
            host="localhost" if host is None else host,
            port=6379 if port is None else port,
            path=sock,
            username=username,
            password=Secret(password) if password is not None else None,
            dbid=dbid,
            use_tls=use_tls,
            certificate_file=cert,
            private_key_file=key,
            ca_file=ca_file,
            ca_path=ca_path,
        )

    def _database(self, value: object) -> DatabaseConfig | None:
        path: _Path = ("database",)
        if value is None:
            return None
        section = self._mapping(value, path, allowed=("name", "args"))
        engine = section.get("name")
        if engine is None:
            engine = "sqlite3"
        if engine not in ("sqlite3", "psycopg2"):
            suggestion = (
                _suggest(engine, ("sqlite3", "psycopg2"))
                if isinstance(engine, str)
                else ""
            )
            _fail(
                (*path, "name"),
                f"unsupported database {_show(engine)}; {suggestion}expected "
                "'sqlite3' or 'psycopg2'",
            )
        args_path = (*path, "args")
        if engine == "sqlite3":
            args = self._mapping(
                section.get("args"),
                args_path,
                allowed=("database",),
                required=("database",),
            )
            db = self._str(args["database"], (*args_path, "database"))
            if db != ":memory:":
                db = self._path(db, (*args_path, "database"))
            return SqliteDatabaseConfig(path=db)
        args = self._mapping(section.get("args"), args_path, allowed=_POSTGRES_ARGS)
        if args.get("database") is not None and args.get("dbname") is not None:
            _fail(
                (*args_path, "dbname"),
                "both 'database' and 'dbname' are set; they are the same setting, "
                "give only one of them",
            )
        fields: dict[str, Any] = {}
        options: dict[str, str | int | Secret] = {}
        for key, item in args.items():
            if item is None:
                continue
            item_path = (*args_path, key)
            if key in ("port",):
                fields[key] = self._port(item, item_path)
            elif key in ("cp_min", "cp_max"):
                fields[key] = self._int(item, item_path, low=1)
            elif key in ("password", "sslpassword"):
                secret = Secret(self._str(item, item_path, secret=True))
                if key == "password":
                    fields[key] = secret
                else:
                    options[key] = secret
            elif key in ("user", "host"):
                fields[key] = self._nonempty_str(item, item_path)
            elif key in ("database", "dbname"):
                fields["database"] = self._nonempty_str(item, item_path)
            elif key in _POSTGRES_FILE_ARGS:
                options[key] = self._path(item, item_path)
            elif isinstance(item, bool) or not isinstance(item, str | int):
                _fail(item_path, f"expected a string or an integer, got {_show(item)}")
            else:
                options[key] = item
        cp_min, cp_max = fields.get("cp_min"), fields.get("cp_max")
        if cp_min is not None and cp_max is not None and cp_min > cp_max:
            _fail(
                (*args_path, "cp_max"),
                f"the pool's maximum size ({cp_max}) is below its minimum (cp_min: {cp_min})",
            )
        return PostgresDatabaseConfig(options=options, **fields)

    def _listeners(self, value: object) -> tuple[ListenerConfig, ...]:
        path: _Path = ("listeners",)
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            _fail(path, f"expected a list of listeners, got {_show(value)}")
        listeners = tuple(
            self._listener(item, (*path, i)) for i, item in enumerate(value)
        )
        seen: dict[tuple[str, int], int] = {}
        for i, listener in enumerate(listeners):
            if listener.port is None or listener.port == 0:
                continue
            for address in listener.bind_addresses:
                first = seen.setdefault((address, listener.port), i)
                if first != i:
                    _fail(
                        (*path, i),
                        f"listeners[{first}] already listens on {address} port "
                        f"{listener.port}",
                    )
        return listeners

    def _listener(self, value: object, path: _Path) -> ListenerConfig:
        entry = self._mapping(value, path, allowed=_LISTENER_KEYS, required=("type",))
        raw_type = entry["type"]
        kinds = [t.value for t in ListenerType]
        if raw_type not in kinds:
            suggestion = _suggest(raw_type, kinds) if isinstance(raw_type, str) else ""
            _fail(
                (*path, "type"),
                f"unknown listener type {_show(raw_type)}; {suggestion}expected one "
                f"of: {_join(kinds)}",
            )
        kind = ListenerType(raw_type)
        port = entry.get("port")
        sock = entry.get("path")
        if sock is not None:
            if kind is not ListenerType.HTTP:
                _fail(
                    (*path, "path"),
                    f"a {kind} listener cannot use a UNIX socket; give a port",
                )
            if port is not None or entry.get("bind_addresses") is not None:
                _fail(
                    (*path, "path"),
                    "give either path (a UNIX socket) or port and bind_addresses, not both",
                )
            mode = (
                self._int(entry["mode"], (*path, "mode"), low=0, high=0o777)
                if entry.get("mode") is not None
                else 0o666
            )
            resources = self._resources(kind, entry.get("resources"), path)
            return ListenerConfig(
                type=kind,
                port=None,
                bind_addresses=(),
                path=self._path(sock, (*path, "path")),
                mode=mode,
                resources=resources,
            )
        if entry.get("mode") is not None:
            _fail(
                (*path, "mode"),
                "mode is the permissions of a UNIX socket; it needs path",
            )
        if port is None:
            _fail(
                (*path, "port"),
                "missing; a listener needs a port (or, for http, a path)",
            )
        port = self._port(port, (*path, "port"), allow_zero=True)
        addresses = self._bind_addresses(
            entry.get("bind_addresses"), (*path, "bind_addresses")
        )
        resources = self._resources(kind, entry.get("resources"), path)
        return ListenerConfig(
            type=kind, port=port, bind_addresses=addresses, resources=resources
        )

    def _bind_addresses(self, value: object, path: _Path) -> tuple[str, ...]:
        if value is None:
            return DEFAULT_BIND_ADDRESSES
        if not isinstance(value, list | tuple):
            _fail(path, f"expected a list of IP addresses, got {_show(value)}")
        if not value:
            _fail(path, "expected at least one IP address (omit the key for 127.0.0.1)")
        addresses: list[str] = []
        for i, item in enumerate(value):
            text = self._str(item, (*path, i))
            try:
                ipaddress.ip_address(text)
            except ValueError:
                _fail(
                    (*path, i),
                    f"expected an IP address such as 127.0.0.1 or ::1, got {_show(item)}",
                )
            if text in addresses:
                _fail((*path, i), f"address {text} is listed twice")
            addresses.append(text)
        return tuple(addresses)

    def _resources(
        self, kind: ListenerType, value: object, path: _Path
    ) -> tuple[HttpResourceConfig, ...]:
        res_path = (*path, "resources")
        if kind is not ListenerType.HTTP:
            if value is not None:
                _fail(
                    res_path,
                    f"only http listeners have resources, this is a {kind} listener",
                )
            return ()
        if value is None:
            _fail(
                res_path,
                "missing; an http listener needs resources: [{names: [replication]}]",
            )
        if not isinstance(value, list | tuple) or not value:
            _fail(
                res_path, f"expected a non-empty list of resources, got {_show(value)}"
            )
        out: list[HttpResourceConfig] = []
        for i, item in enumerate(value):
            entry = self._mapping(
                item, (*res_path, i), allowed=("names",), required=("names",)
            )
            names_path = (*res_path, i, "names")
            names = entry["names"]
            if not isinstance(names, list | tuple) or not names:
                _fail(
                    names_path,
                    f"expected a non-empty list of resource names, got {_show(names)}",
                )
            checked: list[str] = []
            for j, name in enumerate(names):
                name = self._str(name, (*names_path, j))
                if name not in _HTTP_RESOURCES:
                    _fail(
                        (*names_path, j),
                        f"unknown or unsupported resource {name!r}; this library "
                        f"serves: {_join(_HTTP_RESOURCES)}",
                    )
                checked.append(name)
            out.append(HttpResourceConfig(names=tuple(checked)))
        return tuple(out)

    def _replication_connect(self, value: object) -> ReplicationConnectConfig | None:
        path: _Path = ("replication_connect",)
        if value is None:
            return None
        entry = self._mapping(value, path, allowed=("host", "port"), required=("port",))
        host = entry.get("host")
        return ReplicationConnectConfig(
            host="127.0.0.1"
            if host is None
            else self._nonempty_str(host, (*path, "host")),
            port=self._port(entry["port"], (*path, "port")),
        )

    def _limits(self, value: object) -> tuple[ConnectionLimits, HandlerLimits, Backoff]:
        path: _Path = ("replication_limits",)
        allowed = {*_CONNECTION_LIMIT_DEFAULTS, *_HANDLER_LIMIT_DEFAULTS, "reconnect"}
        section = self._mapping(value, path, allowed=allowed)
        connection = self._limit_values(section, path, _CONNECTION_LIMIT_DEFAULTS)
        handler = self._limit_values(section, path, _HANDLER_LIMIT_DEFAULTS)
        reconnect_path = (*path, "reconnect")
        reconnect_section = self._mapping(
            section.get("reconnect"), reconnect_path, allowed=_BACKOFF_DEFAULTS
        )
        backoff = self._limit_values(
            reconnect_section, reconnect_path, _BACKOFF_DEFAULTS, zero_ok=("jitter",)
        )
        retry_initial = handler.get(
            "catch_up_retry_initial_s", HandlerLimits().catch_up_retry_initial_s
        )
        retry_max = handler.get(
            "catch_up_retry_max_s", HandlerLimits().catch_up_retry_max_s
        )
        if retry_max < retry_initial:
            _fail(
                (*path, "catch_up_retry_max_s"),
                f"must not be below catch_up_retry_initial_s ({retry_initial}), got {retry_max}",
            )
        return (
            self._build(ConnectionLimits, connection, path),
            HandlerLimits(**handler),
            self._build(Backoff, backoff, reconnect_path),
        )

    def _limit_values(
        self,
        section: Mapping[str, Any],
        path: _Path,
        defaults: Mapping[str, int | float],
        *,
        zero_ok: Collection[str] = (),
    ) -> dict[str, Any]:
        """The keys of `section` that are in `defaults`, each of its default's
        type (an int, or a finite number), positive (or zero if `zero_ok`)."""
        values: dict[str, Any] = {}
        for key, default in defaults.items():
            item = section.get(key)
            if item is None:
                continue
            low = 0 if key in zero_ok else 1
            if isinstance(default, int):
                values[key] = self._int(item, (*path, key), low=low)
            else:
                number = self._number(item, (*path, key))
                if number < 0 or (number == 0 and key not in zero_ok):
                    _fail(
                        (*path, key),
                        f"expected a {'non-negative' if key in zero_ok else 'positive'} "
                        f"number, got {number}",
                    )
                values[key] = number
        return values

    def _build(self, cls: type[_T], values: Mapping[str, Any], path: _Path) -> _T:
        """`cls(**values)`, its own checks (between fields) reported at `path`."""
        try:
            return cls(**values)
        except (ValueError, TypeError) as e:
            _fail(path, str(e))


def _defaults(cls: type) -> dict[str, int | float]:
    return {
        field.name: field.default
        for field in attrs.fields(cls)
        if isinstance(field.default, int | float)
        and not isinstance(field.default, bool)
    }


_CONNECTION_LIMIT_DEFAULTS: Final = _defaults(ConnectionLimits)
_HANDLER_LIMIT_DEFAULTS: Final = _defaults(HandlerLimits)
_BACKOFF_DEFAULTS: Final = _defaults(Backoff)

_TOP_LEVEL_KEYS: Final = frozenset(
    {
        "server_name",
        "instance_name",
        "worker_name",
        "instance_map",
        "stream_writers",
        "worker_replication_secret",
        "worker_replication_secret_path",
        "redis",
        "database",
        "listeners",
        "replication_connect",
        "replication_limits",
    }
)
_REDIS_KEYS: Final = frozenset(
    {
        "enabled",
        "host",
        "port",
        "path",
        "username",
        "password",
        "password_path",
        "dbid",
        "use_tls",
        "certificate_file",
        "private_key_file",
        "ca_file",
        "ca_path",
    }
)
_LISTENER_KEYS: Final = frozenset(
    {"type", "port", "bind_addresses", "path", "mode", "resources"}
)
# The HTTP resources this library can serve.
_HTTP_RESOURCES: Final = frozenset({"replication"})
# libpq parameters naming files, made absolute like every other path.
_POSTGRES_FILE_ARGS: Final = frozenset(
    {"passfile", "sslcert", "sslkey", "sslrootcert", "sslcrl", "sslcrldir"}
)
# The psycopg2 arguments accepted: libpq's connection parameters, psycopg2's
# `database`, and Synapse's pool sizes.
_POSTGRES_ARGS: Final = frozenset(
    {
        "user",
        "password",
        "database",
        "dbname",
        "host",
        "hostaddr",
        "port",
        "cp_min",
        "cp_max",
        "application_name",
        "fallback_application_name",
        "channel_binding",
        "client_encoding",
        "connect_timeout",
        "options",
        "keepalives",
        "keepalives_idle",
        "keepalives_interval",
        "keepalives_count",
        "tcp_user_timeout",
        "target_session_attrs",
        "load_balance_hosts",
        "service",
        "gssencmode",
        "krbsrvname",
        "gsslib",
        "sslmode",
        "sslcompression",
        "sslpassword",
        "sslcertmode",
        "sslsni",
        "ssl_min_protocol_version",
        "ssl_max_protocol_version",
        "requirepeer",
        *_POSTGRES_FILE_ARGS,
    }
)
