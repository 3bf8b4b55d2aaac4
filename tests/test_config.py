# -*- test-case-name: tests.test_config -*-
"""Tests for synapse_replication.config: the YAML worker configuration."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from synapse_replication.config import (
    ANY_INSTANCE_STREAMS,
    MAIN_ONLY_STREAMS,
    WRITER_KEYS,
    ListenerType,
    PostgresDatabaseConfig,
    Secret,
    SqliteDatabaseConfig,
    WorkerConfig,
    load_config,
    parse_config,
)
from synapse_replication.errors import ConfigError, ReplicationError
from synapse_replication.handler import HandlerLimits
from synapse_replication.http import InstanceLocation
from synapse_replication.streams import STREAMS_MAP
from synapse_replication.tcp import Backoff, ConnectionLimits

EXAMPLE: Final = Path(__file__).resolve().parent.parent / "docs" / "worker.example.yaml"

# Distinctive values, so that a leak is found by a plain substring search.
SECRET: Final = "replication-secret-XYZZY"
REDIS_PASSWORD: Final = "redis-password-PLUGH"
DB_PASSWORD: Final = "db-password-FROBOZZ"
SSL_PASSWORD: Final = "ssl-password-GRUE"
ALL_SECRETS: Final = (SECRET, REDIS_PASSWORD, DB_PASSWORD, SSL_PASSWORD)

FUZZ: Final = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def minimal() -> dict[str, Any]:
    """The smallest valid config: one instance, every default."""
    return {"server_name": "example.com"}


def multi() -> dict[str, Any]:
    """A valid config of a worker among several instances, with every secret
    given inline."""
    return {
        "server_name": "example.com",
        "instance_name": "worker1",
        "worker_replication_secret": SECRET,
        "instance_map": {
            "main": {"host": "10.0.0.1", "port": 9093},
            "worker1": {"host": "10.0.0.2", "port": 9093},
        },
        "stream_writers": {"events": ["master", "worker1"], "typing": "master"},
        "redis": {"enabled": True, "host": "10.0.0.1", "password": REDIS_PASSWORD},
        "database": {
            "name": "psycopg2",
            "args": {
                "user": "synapse",
                "password": DB_PASSWORD,
                "database": "synapse",
                "host": "10.0.0.1",
                "sslpassword": SSL_PASSWORD,
            },
        },
        "listeners": [
            {
                "type": "http",
                "port": 9093,
                "bind_addresses": ["10.0.0.2"],
                "resources": [{"names": ["replication"]}],
            }
        ],
        "replication_limits": {"max_line_length": 4096, "reconnect": {"initial": 2.0}},
    }


def with_(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`base` with top-level keys replaced (a value of None removes the key)."""
    doc = copy.deepcopy(base)
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    return doc


def tcp_worker(**changes: Any) -> dict[str, Any]:
    """A valid worker following `master` over TCP (no Redis)."""
    doc = {
        "server_name": "example.com",
        "instance_name": "worker1",
        "instance_map": {"main": {"host": "127.0.0.1", "port": 9093}},
        "replication_connect": {"port": 9092},
    }
    return with_(doc, **changes)


class ConfigTestCase(SynchronousTestCase):
    """Helpers: a temporary config directory and error assertions."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def write(self, name: str, content: str | bytes) -> str:
        """Write a file under the config directory; returns its path."""
        path = os.path.join(self.dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        data = content.encode("utf-8") if isinstance(content, str) else content
        with open(path, "wb") as f:
            f.write(data)
        return path

    def parse(self, doc: object) -> WorkerConfig:
        return parse_config(doc, base_dir=self.dir)

    def assertConfigError(self, doc: object, key: str, *fragments: str) -> ConfigError:
        """Parsing `doc` fails at `key`, the message naming it and containing
        every fragment (and no secret)."""
        error: ConfigError = self.assertRaises(ConfigError, self.parse, doc)
        self.assertEqual(error.key, key, str(error))
        if key:
            self.assertTrue(str(error).startswith(f"{key}: "), str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        for secret in ALL_SECRETS:
            self.assertNotIn(secret, str(error))
        return error

    def assertLoadError(self, path: str, *fragments: str) -> ConfigError:
        """Loading the file at `path` fails, the message naming the file."""
        error: ConfigError = self.assertRaises(ConfigError, load_config, path)
        self.assertIn(path, str(error))
        for fragment in fragments:
            self.assertIn(fragment, str(error))
        return error


class DefaultsTests(ConfigTestCase):
    def test_minimal_config_is_one_master(self) -> None:
        """With only server_name, this instance is master and writes everything."""
        config = self.parse(minimal())
        self.assertEqual(config.server_name, "example.com")
        self.assertEqual(config.instance_name, "master")
        self.assertEqual(dict(config.instance_map), {})
        self.assertEqual(
            dict(config.stream_writers), dict.fromkeys(WRITER_KEYS, ("master",))
        )

    def test_minimal_config_has_no_optional_sections(self) -> None:
        """Without them, there is no secret, database, listener or connect target."""
        config = self.parse(minimal())
        self.assertIsNone(config.worker_replication_secret)
        self.assertIsNone(config.database)
        self.assertEqual(config.listeners, ())
        self.assertIsNone(config.replication_connect)
        self.assertFalse(config.redis.enabled)

    def test_default_limits(self) -> None:
        """Without replication_limits the library's defaults apply."""
        config = self.parse(minimal())
        self.assertEqual(config.connection_limits, ConnectionLimits())
        self.assertEqual(config.handler_limits, HandlerLimits())
        self.assertEqual(config.reconnect_backoff, Backoff())

    def test_null_sections_are_empty(self) -> None:
        """A section left empty in YAML (null) counts as absent."""
        doc = yaml.safe_load(
            "server_name: a\ninstance_map:\nstream_writers:\nredis:\nlisteners:\n"
            "replication_limits:\n"
        )
        config = self.parse(doc)
        self.assertEqual(config, WorkerConfig(server_name="a"))

    def test_config_is_frozen(self) -> None:
        """Neither the config nor its mappings can be changed."""
        config = self.parse(multi())
        with self.assertRaises(AttributeError):
            config.instance_name = "other"  # type: ignore[misc]  # the point: frozen refuses it
        with self.assertRaises(TypeError):
            config.instance_map["x"] = InstanceLocation.unix("/x")  # type: ignore[index]  # the point: read-only mapping


class InstanceTests(ConfigTestCase):
    def test_server_name_required(self) -> None:
        """A config without server_name is refused, naming the key."""
        self.assertConfigError(
            {"instance_name": "w"}, "server_name", "missing", "required"
        )

    def test_server_name_with_space(self) -> None:
        """A server name with a space cannot travel on the wire."""
        self.assertConfigError({"server_name": "a b"}, "server_name", "without spaces")

    def test_instance_name(self) -> None:
        """instance_name names this instance."""
        config = self.parse(tcp_worker())
        self.assertEqual(config.instance_name, "worker1")

    def test_worker_name_is_synapses_alias(self) -> None:
        """Synapse's worker_name sets the instance name too."""
        doc = tcp_worker(instance_name=None, worker_name="worker7")
        self.assertEqual(self.parse(doc).instance_name, "worker7")

    def test_instance_name_and_worker_name_conflict(self) -> None:
        """Giving both instance_name and worker_name is an error."""
        self.assertConfigError(
            tcp_worker(worker_name="w2"), "worker_name", "instance_name", "only one"
        )

    def test_instance_name_main_refused(self) -> None:
        """`main` is the main process's instance_map name, not an instance name."""
        self.assertConfigError(
            with_(minimal(), instance_name="main"), "instance_name", "'master'"
        )

    def test_instance_name_wrong_type(self) -> None:
        """A non-string instance name is a type error naming the key."""
        self.assertConfigError(
            with_(minimal(), instance_name=3),
            "instance_name",
            "expected a string",
            "integer",
        )


class InstanceMapTests(ConfigTestCase):
    def test_tcp_location(self) -> None:
        """host and port give a plain-HTTP location."""
        config = self.parse(multi())
        self.assertEqual(
            config.instance_map["worker1"], InstanceLocation(host="10.0.0.2", port=9093)
        )
        self.assertFalse(config.instance_map["worker1"].tls)

    def test_tls_location(self) -> None:
        """tls: true asks for HTTPS."""
        doc = multi()
        doc["instance_map"]["worker1"]["tls"] = True
        self.assertTrue(self.parse(doc).instance_map["worker1"].tls)

    def test_unix_location_relative_to_config_dir(self) -> None:
        """A UNIX socket path is resolved against the config directory."""
        doc = multi()
        doc["instance_map"]["worker1"] = {"path": "run/w1.sock"}
        location = self.parse(doc).instance_map["worker1"]
        self.assertEqual(
            location, InstanceLocation.unix(os.path.join(self.dir, "run/w1.sock"))
        )

    def test_main_is_stored_as_master(self) -> None:
        """Synapse's `main` entry is the location of instance `master`."""
        config = self.parse(multi())
        self.assertIn("master", config.instance_map)
        self.assertNotIn("main", config.instance_map)

    def test_master_key_accepted(self) -> None:
        """The main process may also be listed under its instance name."""
        doc = multi()
        doc["instance_map"]["master"] = doc["instance_map"].pop("main")
        self.assertEqual(self.parse(doc).instance_map["master"].host, "10.0.0.1")

    def test_main_and_master_conflict(self) -> None:
        """Listing the main process as both `main` and `master` is an error."""
        doc = multi()
        doc["instance_map"]["master"] = {"host": "h", "port": 1}
        self.assertConfigError(doc, "instance_map.master", "twice")

    def test_host_and_path_conflict(self) -> None:
        """An entry with both a TCP address and a socket path is refused."""
        doc = multi()
        doc["instance_map"]["worker1"]["path"] = "/run/x.sock"
        self.assertConfigError(doc, "instance_map.worker1", "either host and port")

    def test_missing_port(self) -> None:
        """An entry without a port names the missing key."""
        doc = multi()
        del doc["instance_map"]["worker1"]["port"]
        self.assertConfigError(doc, "instance_map.worker1.port", "missing")

    def test_port_zero_refused(self) -> None:
        """Port 0 cannot be connected to."""
        doc = multi()
        doc["instance_map"]["worker1"]["port"] = 0
        self.assertConfigError(
            doc, "instance_map.worker1.port", "out of range", "got 0"
        )

    def test_unknown_key_in_entry(self) -> None:
        """A misspelt entry key is named, with a suggestion."""
        doc = multi()
        doc["instance_map"]["worker1"]["hots"] = "x"
        self.assertConfigError(
            doc, "instance_map.worker1.hots", "unknown key", "'host'"
        )

    def test_entry_not_a_mapping(self) -> None:
        """An entry must be a mapping."""
        doc = multi()
        doc["instance_map"]["worker1"] = "10.0.0.2:9093"
        self.assertConfigError(
            doc, "instance_map.worker1", "expected a mapping", "a string"
        )

    def test_location_of(self) -> None:
        """location_of gives an instance's entry."""
        config = self.parse(multi())
        self.assertEqual(config.location_of("worker1").host, "10.0.0.2")

    def test_location_of_main_alias(self) -> None:
        """location_of accepts `main` and `master` for the main process."""
        config = self.parse(multi())
        self.assertEqual(config.location_of("main"), config.location_of("master"))

    def test_location_of_unknown_instance(self) -> None:
        """location_of an instance not in instance_map is a ConfigError naming it."""
        config = self.parse(multi())
        error = self.assertRaises(ConfigError, config.location_of, "worker9")
        self.assertIn("'worker9'", str(error))
        self.assertIn("instance_map", str(error))


class StreamWritersTests(ConfigTestCase):
    def test_single_name(self) -> None:
        """A writer may be given as one name."""
        config = self.parse(multi())
        self.assertEqual(config.stream_writers["typing"], ("master",))

    def test_list_of_names(self) -> None:
        """Several writers are given as a list, in order."""
        config = self.parse(multi())
        self.assertEqual(config.stream_writers["events"], ("master", "worker1"))

    def test_every_synapse_key_accepted(self) -> None:
        """Every stream_writers key Synapse accepts is accepted."""
        doc = multi()
        doc["stream_writers"] = dict.fromkeys(WRITER_KEYS, "worker1")
        config = self.parse(doc)
        self.assertEqual(set(config.stream_writers), set(WRITER_KEYS))

    def test_writers_of_events_group(self) -> None:
        """The events writers write Synapse's event-persistence streams too."""
        config = self.parse(multi())
        for stream in ("events", "backfill", "profile_updates", "sticky_events"):
            self.assertEqual(config.writers_of(stream), ["master", "worker1"])

    def test_writers_of_presence_federation(self) -> None:
        """presence_federation follows the presence writer."""
        doc = multi()
        doc["stream_writers"]["presence"] = "worker1"
        self.assertEqual(self.parse(doc).writers_of("presence_federation"), ["worker1"])

    def test_writers_of_quarantined_media(self) -> None:
        """Synapse's quarantined_media_changes key writes the quarantined_media stream."""
        doc = multi()
        doc["stream_writers"]["quarantined_media_changes"] = ["worker1"]
        self.assertEqual(self.parse(doc).writers_of("quarantined_media"), ["worker1"])

    def test_writers_of_main_only_stream(self) -> None:
        """Streams no config assigns (pushers) are written by master."""
        self.assertEqual(self.parse(multi()).writers_of("pushers"), ["master"])

    def test_writers_of_caches_is_every_instance(self) -> None:
        """Every instance the config names writes caches."""
        self.assertEqual(
            self.parse(multi()).writers_of("caches"), ["master", "worker1"]
        )

    def test_writers_of_unknown_stream(self) -> None:
        """Asking about a stream nobody knows is a ValueError."""
        config = self.parse(minimal())
        self.assertRaises(ValueError, config.writers_of, "nonsense")

    def test_every_library_stream_has_writers(self) -> None:
        """Every stream of STREAMS_MAP has a writer rule (adding one needs a decision here)."""
        config = self.parse(minimal())
        for name in STREAMS_MAP:
            self.assertEqual(config.writers_of(name), ["master"], name)

    def test_writes(self) -> None:
        """writes tells whether this instance writes a stream."""
        config = self.parse(multi())
        self.assertTrue(config.writes("events"))
        self.assertFalse(config.writes("typing"))
        self.assertTrue(config.writes("caches"))

    def test_written_streams(self) -> None:
        """written_streams lists this instance's streams of STREAMS_MAP."""
        self.assertEqual(self.parse(multi()).written_streams(), ["caches", "events"])

    def test_writers_by_stream(self) -> None:
        """writers_by_stream covers every fixed-writer stream of STREAMS_MAP."""
        writers = self.parse(multi()).writers_by_stream()
        self.assertEqual(set(writers), set(STREAMS_MAP) - ANY_INSTANCE_STREAMS)
        self.assertEqual(writers["events"], ["master", "worker1"])

    def test_typing_two_writers(self) -> None:
        """typing takes exactly one writer."""
        doc = multi()
        doc["stream_writers"]["typing"] = ["master", "worker1"]
        self.assertConfigError(
            doc,
            "stream_writers.typing",
            "exactly one writer",
            "got 2",
            "master, worker1",
        )

    def test_single_writer_streams_like_synapse(self) -> None:
        """to_device, account_data, presence and push_rules take one writer too."""
        for key in ("to_device", "account_data", "presence", "push_rules"):
            doc = multi()
            doc["stream_writers"][key] = ["master", "worker1"]
            self.assertConfigError(doc, f"stream_writers.{key}", "exactly one writer")

    def test_empty_writer_list(self) -> None:
        """A multi-writer stream still needs at least one writer."""
        doc = multi()
        doc["stream_writers"]["events"] = []
        self.assertConfigError(doc, "stream_writers.events", "at least one writer")

    def test_writer_wrong_type(self) -> None:
        """A writer must be a name or a list of names."""
        doc = multi()
        doc["stream_writers"]["events"] = {"master": 1}
        self.assertConfigError(
            doc, "stream_writers.events", "expected an instance name"
        )

    def test_writer_listed_twice(self) -> None:
        """A writer listed twice is a mistake."""
        doc = multi()
        doc["stream_writers"]["events"] = ["worker1", "worker1"]
        self.assertConfigError(doc, "stream_writers.events[1]", "twice")

    def test_main_as_writer(self) -> None:
        """`main` is not an instance name in stream_writers."""
        doc = multi()
        doc["stream_writers"]["events"] = ["main"]
        self.assertConfigError(doc, "stream_writers.events[0]", "'master'")

    def test_unknown_stream_suggests(self) -> None:
        """A misspelt stream is named, with a suggestion and the valid keys."""
        doc = multi()
        doc["stream_writers"]["tpying"] = "master"
        self.assertConfigError(
            doc,
            "stream_writers.tpying",
            "unknown stream",
            "did you mean 'typing'?",
            "receipts",
        )

    def test_caches_not_assignable(self) -> None:
        """caches has no configurable writer: every instance writes it."""
        doc = multi()
        doc["stream_writers"]["caches"] = "master"
        self.assertConfigError(doc, "stream_writers.caches", "every instance")

    def test_pushers_not_assignable(self) -> None:
        """pushers is always written by master, as in Synapse."""
        doc = multi()
        doc["stream_writers"]["pushers"] = "worker1"
        self.assertConfigError(
            doc, "stream_writers.pushers", "always written by 'master'"
        )

    def test_grouped_stream_not_assignable(self) -> None:
        """backfill's writers are the events writers; the error says so."""
        doc = multi()
        doc["stream_writers"]["backfill"] = "worker1"
        self.assertConfigError(doc, "stream_writers.backfill", "those of 'events'")

    def test_writer_missing_from_instance_map(self) -> None:
        """A writer without an instance_map entry is named with the stream."""
        doc = multi()
        doc["stream_writers"]["receipts"] = ["worker2"]
        self.assertConfigError(
            doc,
            "stream_writers.receipts",
            "'worker2'",
            "not in instance_map",
            "instance_map.worker2",
        )

    def test_default_master_missing_from_instance_map(self) -> None:
        """A worker needs `main` in instance_map when master writes (by default)."""
        doc = tcp_worker(instance_map={"worker1": {"host": "h", "port": 1}})
        self.assertConfigError(
            doc,
            "stream_writers.events",
            "'master'",
            "(the default)",
            "instance_map.main",
        )

    def test_single_instance_needs_no_instance_map(self) -> None:
        """One instance writing everything itself needs no instance_map."""
        doc = with_(
            minimal(),
            instance_name="solo",
            stream_writers=dict.fromkeys(WRITER_KEYS, "solo"),
        )
        self.assertTrue(self.parse(doc).writes("typing"))

    def test_worker_writing_nothing_of_master_needs_no_main(self) -> None:
        """A worker need not know master's location if master writes nothing."""
        doc = tcp_worker(
            stream_writers=dict.fromkeys(WRITER_KEYS, "worker1"),
            instance_map={"worker1": {"host": "h", "port": 1}},
            replication_connect=None,
        )
        self.assertEqual(self.parse(doc).writers_of("events"), ["worker1"])


class SecretTests(ConfigTestCase):
    def test_inline_secret(self) -> None:
        """worker_replication_secret is kept as a Secret."""
        secret = self.parse(multi()).worker_replication_secret
        assert secret is not None
        self.assertEqual(secret.reveal(), SECRET)

    def test_secret_file_stripped(self) -> None:
        """A secret file's trailing newline is not part of the secret."""
        self.write("secret", SECRET + "\n")
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="secret",
        )
        secret = self.parse(doc).worker_replication_secret
        assert secret is not None
        self.assertEqual(secret.reveal(), SECRET)

    def test_secret_file_relative_to_config_dir(self) -> None:
        """A relative secret path is read from the config directory, not the cwd."""
        self.write("sub/secret", SECRET)
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="sub/secret",
        )
        secret = self.parse(doc).worker_replication_secret
        assert secret is not None
        self.assertEqual(secret.reveal(), SECRET)

    def test_unreadable_secret_file(self) -> None:
        """A missing secret file names the key, the path and the OS error."""
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="nope",
        )
        self.assertConfigError(
            doc,
            "worker_replication_secret_path",
            os.path.join(self.dir, "nope"),
            "No such file or directory",
        )

    def test_secret_file_is_directory(self) -> None:
        """A directory given as the secret file is an OS error, reported."""
        os.makedirs(os.path.join(self.dir, "adir"))
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="adir",
        )
        self.assertConfigError(doc, "worker_replication_secret_path", "cannot read")

    def test_secret_file_not_utf8(self) -> None:
        """A secret file that is not text is refused, without showing it."""
        self.write("bin", b"\xff\xfe" + SECRET.encode())
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="bin",
        )
        self.assertConfigError(doc, "worker_replication_secret_path", "not UTF-8")

    def test_secret_file_too_large(self) -> None:
        """A huge file is surely not the secret file."""
        self.write("big", "x" * 100_000)
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="big",
        )
        self.assertConfigError(doc, "worker_replication_secret_path", "larger than")

    def test_secret_and_path_conflict(self) -> None:
        """Giving the secret inline and as a file is an error."""
        self.write("secret", SECRET)
        doc = with_(multi(), worker_replication_secret_path="secret")
        self.assertConfigError(
            doc, "worker_replication_secret_path", "both", "only one"
        )

    def test_empty_secret(self) -> None:
        """An empty secret is refused rather than read as "no secret"."""
        self.write("empty", "\n")
        doc = with_(
            multi(),
            worker_replication_secret=None,
            worker_replication_secret_path="empty",
        )
        self.assertConfigError(doc, "worker_replication_secret_path", "empty")

    def test_secret_with_space_not_shown(self) -> None:
        """A secret that cannot travel in a header is refused without showing it."""
        doc = with_(multi(), worker_replication_secret=f"{SECRET} x")
        self.assertConfigError(doc, "worker_replication_secret", "without spaces")

    def test_secret_wrong_type_not_shown(self) -> None:
        """A secret of the wrong type is reported by type only."""
        doc = with_(multi(), worker_replication_secret=987654321)
        error = self.assertConfigError(doc, "worker_replication_secret", "an integer")
        self.assertNotIn("987654321", str(error))

    def test_secret_repr(self) -> None:
        """A Secret shows as Secret('***') and reveals its value on request."""
        secret = Secret(SECRET)
        self.assertEqual(repr(secret), "Secret('***')")
        self.assertEqual(str(secret), "Secret('***')")
        self.assertEqual(secret.reveal(), SECRET)

    def test_no_secret_in_config_repr(self) -> None:
        """No secret appears in the repr or str of a whole config."""
        config = self.parse(multi())
        for text in (repr(config), str(config)):
            for secret in ALL_SECRETS:
                self.assertNotIn(secret, text)
        self.assertIn("Secret('***')", repr(config))

    def test_no_secret_in_yaml_error(self) -> None:
        """A YAML syntax error on a secret's line does not quote the line."""
        path = self.write(
            "c.yaml", f"server_name: a\nworker_replication_secret: {SECRET}: [\n"
        )
        error = self.assertLoadError(path, "line 2")
        self.assertNotIn(SECRET, str(error))

    def test_http_replication_listener_needs_secret(self) -> None:
        """Serving replication over HTTP without a secret is refused."""
        doc = with_(multi(), worker_replication_secret=None)
        self.assertConfigError(doc, "listeners[0]", "worker_replication_secret")


class RedisTests(ConfigTestCase):
    def test_disabled_by_default(self) -> None:
        """Redis is off unless enabled."""
        self.assertFalse(self.parse(minimal()).redis.enabled)

    def test_enabled_defaults(self) -> None:
        """Enabled Redis defaults to localhost:6379, no TLS, no password."""
        redis = self.parse(with_(minimal(), redis={"enabled": True})).redis
        self.assertEqual((redis.host, redis.port), ("localhost", 6379))
        self.assertFalse(redis.use_tls)
        self.assertIsNone(redis.password)
        self.assertIsNone(redis.dbid)

    def test_all_fields(self) -> None:
        """host, port, dbid, username and password are kept."""
        section = {
            "enabled": True,
            "host": "10.0.0.1",
            "port": 6380,
            "dbid": 2,
            "username": "synapse",
            "password": REDIS_PASSWORD,
        }
        redis = self.parse(with_(minimal(), redis=section)).redis
        self.assertEqual((redis.host, redis.port, redis.dbid), ("10.0.0.1", 6380, 2))
        self.assertEqual(redis.username, "synapse")
        assert redis.password is not None
        self.assertEqual(redis.password.reveal(), REDIS_PASSWORD)

    def test_password_path(self) -> None:
        """password_path is read and stripped."""
        self.write("redis.pw", REDIS_PASSWORD + "\n")
        redis = self.parse(
            with_(minimal(), redis={"enabled": True, "password_path": "redis.pw"})
        ).redis
        assert redis.password is not None
        self.assertEqual(redis.password.reveal(), REDIS_PASSWORD)

    def test_password_path_unreadable(self) -> None:
        """An unreadable password_path names the key and the path."""
        doc = with_(minimal(), redis={"enabled": True, "password_path": "gone"})
        self.assertConfigError(
            doc, "redis.password_path", os.path.join(self.dir, "gone")
        )

    def test_password_and_path_conflict(self) -> None:
        """password and password_path together are refused."""
        self.write("redis.pw", "x")
        doc = with_(
            minimal(),
            redis={
                "enabled": True,
                "password": REDIS_PASSWORD,
                "password_path": "redis.pw",
            },
        )
        self.assertConfigError(doc, "redis.password_path", "only one")

    def test_disabled_reads_no_file(self) -> None:
        """With Redis disabled, password_path and TLS files are not touched."""
        redis = self.parse(
            with_(
                minimal(),
                redis={"password_path": "gone", "use_tls": True, "ca_file": "gone.pem"},
            )
        ).redis
        self.assertIsNone(redis.password)

    def test_disabled_still_checks_keys(self) -> None:
        """Even disabled, a misspelt Redis key is reported."""
        doc = with_(minimal(), redis={"enabled": False, "prot": 1})
        self.assertConfigError(doc, "redis.prot", "did you mean 'port'?")

    def test_unix_socket(self) -> None:
        """path is a UNIX socket, resolved against the config directory."""
        redis = self.parse(
            with_(minimal(), redis={"enabled": True, "path": "redis.sock"})
        ).redis
        self.assertEqual(redis.path, os.path.join(self.dir, "redis.sock"))

    def test_unix_socket_and_host_conflict(self) -> None:
        """A socket path and a host together are ambiguous."""
        doc = with_(minimal(), redis={"enabled": True, "path": "s", "host": "h"})
        self.assertConfigError(doc, "redis.path", "not both")

    def test_tls_files(self) -> None:
        """With TLS, the certificate, key and CA files are kept as absolute paths."""
        for name in ("cert.pem", "key.pem", "ca.pem"):
            self.write(name, "x")
        redis = self.parse(
            with_(
                minimal(),
                redis={
                    "enabled": True,
                    "use_tls": True,
                    "certificate_file": "cert.pem",
                    "private_key_file": "key.pem",
                    "ca_file": "ca.pem",
                },
            )
        ).redis
        self.assertTrue(redis.use_tls)
        self.assertEqual(redis.certificate_file, os.path.join(self.dir, "cert.pem"))
        self.assertEqual(redis.private_key_file, os.path.join(self.dir, "key.pem"))
        self.assertEqual(redis.ca_file, os.path.join(self.dir, "ca.pem"))

    def test_tls_missing_file(self) -> None:
        """A TLS file that does not exist is named with its path."""
        doc = with_(
            minimal(), redis={"enabled": True, "use_tls": True, "ca_file": "ca.pem"}
        )
        self.assertConfigError(
            doc, "redis.ca_file", os.path.join(self.dir, "ca.pem"), "does not exist"
        )

    def test_tls_missing_ca_path(self) -> None:
        """A CA directory that does not exist is named."""
        doc = with_(
            minimal(), redis={"enabled": True, "use_tls": True, "ca_path": "certs"}
        )
        self.assertConfigError(doc, "redis.ca_path", "does not exist")

    def test_certificate_without_key(self) -> None:
        """A client certificate needs its private key."""
        self.write("cert.pem", "x")
        doc = with_(
            minimal(),
            redis={"enabled": True, "use_tls": True, "certificate_file": "cert.pem"},
        )
        self.assertConfigError(doc, "redis.private_key_file", "both")

    def test_tls_over_unix_socket(self) -> None:
        """TLS over a UNIX socket is refused."""
        doc = with_(minimal(), redis={"enabled": True, "use_tls": True, "path": "s"})
        self.assertConfigError(doc, "redis.use_tls", "UNIX socket")

    def test_username_without_password(self) -> None:
        """A Redis username needs a password, as in Synapse."""
        doc = with_(minimal(), redis={"enabled": True, "username": "u"})
        self.assertConfigError(doc, "redis.username", "password")

    def test_port_out_of_range(self) -> None:
        """redis.port above 65535 is refused with the range."""
        doc = with_(minimal(), redis={"enabled": True, "port": 70000})
        self.assertConfigError(doc, "redis.port", "out of range", "65535", "70000")

    def test_port_wrong_type(self) -> None:
        """A port given as a string is a type error."""
        doc = with_(minimal(), redis={"enabled": True, "port": "6379"})
        self.assertConfigError(doc, "redis.port", "integer", "a string")

    def test_port_boolean_refused(self) -> None:
        """YAML's `yes` is not a port number."""
        doc = with_(minimal(), redis={"enabled": True, "port": True})
        self.assertConfigError(doc, "redis.port", "a boolean")

    def test_enabled_wrong_type(self) -> None:
        """enabled must be a boolean."""
        doc = with_(minimal(), redis={"enabled": "yes"})
        self.assertConfigError(doc, "redis.enabled", "true or false", "'yes'")

    def test_password_wrong_type_not_shown(self) -> None:
        """A password of the wrong type is reported by type only."""
        doc = with_(minimal(), redis={"enabled": True, "password": 24682468})
        error = self.assertConfigError(doc, "redis.password", "an integer")
        self.assertNotIn("24682468", str(error))

    def test_negative_dbid(self) -> None:
        """dbid is a non-negative integer."""
        doc = with_(minimal(), redis={"enabled": True, "dbid": -1})
        self.assertConfigError(doc, "redis.dbid", "at least 0")


class DatabaseTests(ConfigTestCase):
    def test_sqlite_relative_path(self) -> None:
        """An SQLite file is resolved against the config directory."""
        doc = with_(
            minimal(), database={"name": "sqlite3", "args": {"database": "h.db"}}
        )
        self.assertEqual(
            self.parse(doc).database,
            SqliteDatabaseConfig(path=os.path.join(self.dir, "h.db")),
        )

    def test_sqlite_absolute_path(self) -> None:
        """An absolute SQLite path is kept."""
        doc = with_(
            minimal(), database={"name": "sqlite3", "args": {"database": "/d/h.db"}}
        )
        database = self.parse(doc).database
        assert isinstance(database, SqliteDatabaseConfig)
        self.assertEqual(database.path, "/d/h.db")
        self.assertEqual(database.name, "sqlite3")

    def test_sqlite_memory(self) -> None:
        """:memory: is not a path."""
        doc = with_(
            minimal(), database={"name": "sqlite3", "args": {"database": ":memory:"}}
        )
        self.assertEqual(
            self.parse(doc).database, SqliteDatabaseConfig(path=":memory:")
        )

    def test_name_defaults_to_sqlite(self) -> None:
        """Without name the engine is sqlite3, as in Synapse."""
        doc = with_(minimal(), database={"args": {"database": "h.db"}})
        self.assertIsInstance(self.parse(doc).database, SqliteDatabaseConfig)

    def test_sqlite_missing_database(self) -> None:
        """SQLite needs args.database."""
        doc = with_(minimal(), database={"name": "sqlite3", "args": {}})
        self.assertConfigError(doc, "database.args.database", "missing")

    def test_sqlite_unknown_arg(self) -> None:
        """SQLite takes only args.database."""
        doc = with_(
            minimal(),
            database={"name": "sqlite3", "args": {"database": "a", "host": "h"}},
        )
        self.assertConfigError(doc, "database.args.host", "unknown key")

    def test_postgres_fields(self) -> None:
        """psycopg2's user, password, database, host and port are kept."""
        database = self.parse(multi()).database
        assert isinstance(database, PostgresDatabaseConfig)
        self.assertEqual(database.name, "psycopg2")
        self.assertEqual(
            (database.user, database.database, database.host),
            ("synapse", "synapse", "10.0.0.1"),
        )
        assert database.password is not None
        self.assertEqual(database.password.reveal(), DB_PASSWORD)

    def test_postgres_dbname_alias(self) -> None:
        """libpq's dbname is the same as database."""
        doc = with_(
            minimal(),
            database={"name": "psycopg2", "args": {"dbname": "s", "port": 5433}},
        )
        database = self.parse(doc).database
        assert isinstance(database, PostgresDatabaseConfig)
        self.assertEqual((database.database, database.port), ("s", 5433))

    def test_postgres_database_and_dbname_conflict(self) -> None:
        """database and dbname together are refused."""
        doc = with_(
            minimal(),
            database={"name": "psycopg2", "args": {"dbname": "a", "database": "b"}},
        )
        self.assertConfigError(doc, "database.args.dbname", "only one")

    def test_postgres_connect_kwargs(self) -> None:
        """connect_kwargs reveals the secrets for psycopg2.connect."""
        database = self.parse(multi()).database
        assert isinstance(database, PostgresDatabaseConfig)
        self.assertEqual(
            database.connect_kwargs(),
            {
                "user": "synapse",
                "dbname": "synapse",
                "host": "10.0.0.1",
                "password": DB_PASSWORD,
                "sslpassword": SSL_PASSWORD,
            },
        )

    def test_postgres_file_args_resolved(self) -> None:
        """libpq file parameters are resolved against the config directory."""
        doc = with_(
            minimal(),
            database={
                "name": "psycopg2",
                "args": {"sslrootcert": "ca.pem", "sslmode": "verify-full"},
            },
        )
        database = self.parse(doc).database
        assert isinstance(database, PostgresDatabaseConfig)
        self.assertEqual(
            database.options["sslrootcert"], os.path.join(self.dir, "ca.pem")
        )
        self.assertEqual(database.options["sslmode"], "verify-full")

    def test_postgres_pool_sizes(self) -> None:
        """cp_min and cp_max size the pool, as in Synapse."""
        args = {"cp_min": 2, "cp_max": 5}
        doc = with_(minimal(), database={"name": "psycopg2", "args": args})
        database = self.parse(doc).database
        assert isinstance(database, PostgresDatabaseConfig)
        self.assertEqual((database.cp_min, database.cp_max), (2, 5))

    def test_postgres_pool_max_below_min(self) -> None:
        """A pool maximum below its minimum is refused."""
        args = {"cp_min": 6, "cp_max": 5}
        doc = with_(minimal(), database={"name": "psycopg2", "args": args})
        self.assertConfigError(doc, "database.args.cp_max", "below")

    def test_postgres_unknown_arg(self) -> None:
        """An argument libpq does not know is refused with a suggestion."""
        doc = with_(minimal(), database={"name": "psycopg2", "args": {"usr": "s"}})
        self.assertConfigError(doc, "database.args.usr", "did you mean 'user'?")

    def test_postgres_port_out_of_range(self) -> None:
        """The database port is checked like every port."""
        doc = with_(minimal(), database={"name": "psycopg2", "args": {"port": 0}})
        self.assertConfigError(doc, "database.args.port", "out of range")

    def test_unsupported_engine(self) -> None:
        """Only sqlite3 and psycopg2 are supported, as in Synapse."""
        doc = with_(minimal(), database={"name": "mysql", "args": {}})
        self.assertConfigError(
            doc, "database.name", "'mysql'", "'sqlite3' or 'psycopg2'"
        )


class ListenerTests(ConfigTestCase):
    def test_default_bind_address_is_loopback(self) -> None:
        """A listener without bind_addresses binds to 127.0.0.1 only."""
        doc = with_(minimal(), listeners=[{"type": "replication", "port": 9092}])
        (listener,) = self.parse(doc).listeners
        self.assertEqual(listener.bind_addresses, ("127.0.0.1",))
        self.assertEqual(listener.type, ListenerType.REPLICATION)
        self.assertEqual(listener.port, 9092)

    def test_every_type_defaults_to_loopback(self) -> None:
        """http and metrics listeners also default to 127.0.0.1."""
        doc = with_(
            multi(),
            listeners=[
                {"type": "http", "port": 1, "resources": [{"names": ["replication"]}]},
                {"type": "metrics", "port": 2},
            ],
        )
        for listener in self.parse(doc).listeners:
            self.assertEqual(listener.bind_addresses, ("127.0.0.1",))

    def test_explicit_bind_addresses(self) -> None:
        """bind_addresses takes IPv4 and IPv6 addresses."""
        doc = with_(
            minimal(),
            listeners=[
                {"type": "replication", "port": 1, "bind_addresses": ["0.0.0.0", "::"]}
            ],
        )
        self.assertEqual(self.parse(doc).listeners[0].bind_addresses, ("0.0.0.0", "::"))

    def test_http_resources(self) -> None:
        """An http listener lists its resources as in Synapse."""
        (listener,) = self.parse(multi()).listeners
        self.assertEqual(listener.type, ListenerType.HTTP)
        self.assertTrue(listener.serves("replication"))

    def test_http_unix_socket(self) -> None:
        """An http listener may use a UNIX socket, mode 0o666 by default."""
        doc = with_(
            multi(),
            listeners=[
                {
                    "type": "http",
                    "path": "r.sock",
                    "resources": [{"names": ["replication"]}],
                }
            ],
        )
        (listener,) = self.parse(doc).listeners
        self.assertEqual(listener.path, os.path.join(self.dir, "r.sock"))
        self.assertEqual(listener.mode, 0o666)
        self.assertIsNone(listener.port)

    def test_port_zero_allowed(self) -> None:
        """Port 0 (any free port) is allowed for a listener."""
        doc = with_(minimal(), listeners=[{"type": "replication", "port": 0}])
        self.assertEqual(self.parse(doc).listeners[0].port, 0)

    def test_bind_addresses_error_names_index(self) -> None:
        """A bad address in the second listener is named by index."""
        doc = with_(
            multi(),
            listeners=[
                multi()["listeners"][0],
                {"type": "metrics", "port": 9101, "bind_addresses": ["localhost"]},
            ],
        )
        self.assertConfigError(
            doc, "listeners[1].bind_addresses[0]", "IP address", "'localhost'"
        )

    def test_bind_addresses_not_a_list(self) -> None:
        """bind_addresses must be a list."""
        doc = with_(
            minimal(),
            listeners=[{"type": "metrics", "port": 1, "bind_addresses": "::1"}],
        )
        self.assertConfigError(doc, "listeners[0].bind_addresses", "expected a list")

    def test_bind_addresses_empty(self) -> None:
        """An empty bind_addresses would bind nothing."""
        doc = with_(
            minimal(), listeners=[{"type": "metrics", "port": 1, "bind_addresses": []}]
        )
        self.assertConfigError(doc, "listeners[0].bind_addresses", "at least one")

    def test_unknown_listener_key(self) -> None:
        """Synapse's bind_address (singular) gets a suggestion."""
        doc = with_(
            minimal(), listeners=[{"type": "metrics", "port": 1, "bind_address": "::1"}]
        )
        self.assertConfigError(
            doc,
            "listeners[0].bind_address",
            "unknown key",
            "did you mean 'bind_addresses'?",
        )

    def test_unknown_type(self) -> None:
        """An unknown listener type is named with the valid ones."""
        doc = with_(minimal(), listeners=[{"type": "manhole", "port": 1}])
        self.assertConfigError(
            doc, "listeners[0].type", "'manhole'", "http, metrics, replication"
        )

    def test_missing_type(self) -> None:
        """type is required."""
        doc = with_(minimal(), listeners=[{"port": 1}])
        self.assertConfigError(doc, "listeners[0].type", "missing")

    def test_missing_port(self) -> None:
        """A TCP listener needs a port."""
        doc = with_(minimal(), listeners=[{"type": "replication"}])
        self.assertConfigError(doc, "listeners[0].port", "missing")

    def test_port_out_of_range(self) -> None:
        """A negative listener port is refused."""
        doc = with_(minimal(), listeners=[{"type": "replication", "port": -1}])
        self.assertConfigError(doc, "listeners[0].port", "out of range", "0 to 65535")

    def test_http_without_resources(self) -> None:
        """An http listener must say what it serves."""
        doc = with_(multi(), listeners=[{"type": "http", "port": 1}])
        self.assertConfigError(doc, "listeners[0].resources", "missing", "replication")

    def test_unknown_resource(self) -> None:
        """Resources this library does not serve (client) are refused."""
        doc = with_(
            multi(),
            listeners=[
                {"type": "http", "port": 1, "resources": [{"names": ["client"]}]}
            ],
        )
        self.assertConfigError(
            doc, "listeners[0].resources[0].names[0]", "'client'", "replication"
        )

    def test_resources_on_replication_listener(self) -> None:
        """Only http listeners have resources."""
        doc = with_(
            minimal(),
            listeners=[
                {
                    "type": "replication",
                    "port": 1,
                    "resources": [{"names": ["replication"]}],
                }
            ],
        )
        self.assertConfigError(doc, "listeners[0].resources", "only http")

    def test_socket_path_on_replication_listener(self) -> None:
        """Only http listeners take a UNIX socket."""
        doc = with_(minimal(), listeners=[{"type": "replication", "path": "s"}])
        self.assertConfigError(doc, "listeners[0].path", "UNIX socket")

    def test_mode_without_path(self) -> None:
        """mode only makes sense with a socket path."""
        doc = with_(
            minimal(), listeners=[{"type": "replication", "port": 1, "mode": 0o600}]
        )
        self.assertConfigError(doc, "listeners[0].mode", "needs path")

    def test_same_port_twice(self) -> None:
        """Two listeners on one address and port are refused."""
        doc = with_(
            minimal(),
            listeners=[
                {"type": "replication", "port": 9},
                {"type": "metrics", "port": 9},
            ],
        )
        self.assertConfigError(doc, "listeners[1]", "listeners[0]", "127.0.0.1 port 9")

    def test_listeners_not_a_list(self) -> None:
        """listeners must be a list."""
        doc = with_(minimal(), listeners={"type": "replication"})
        self.assertConfigError(doc, "listeners", "expected a list", "a mapping")


class ReplicationConnectTests(ConfigTestCase):
    def test_host_defaults_to_loopback(self) -> None:
        """replication_connect's host defaults to 127.0.0.1."""
        connect = self.parse(tcp_worker()).replication_connect
        assert connect is not None
        self.assertEqual((connect.host, connect.port), ("127.0.0.1", 9092))

    def test_explicit_host(self) -> None:
        """replication_connect takes a host."""
        doc = tcp_worker(replication_connect={"host": "10.0.0.1", "port": 9092})
        connect = self.parse(doc).replication_connect
        assert connect is not None
        self.assertEqual(connect.host, "10.0.0.1")

    def test_required_without_redis(self) -> None:
        """A TCP worker following others' streams must say where to connect."""
        self.assertConfigError(
            tcp_worker(replication_connect=None),
            "replication_connect",
            "missing",
            "redis",
        )

    def test_not_required_with_redis(self) -> None:
        """With Redis enabled no replication_connect is needed."""
        doc = tcp_worker(replication_connect=None, redis={"enabled": True})
        self.assertIsNone(self.parse(doc).replication_connect)

    def test_not_required_for_the_tcp_server(self) -> None:
        """An instance with a replication listener is the server, not a client."""
        doc = tcp_worker(
            replication_connect=None, listeners=[{"type": "replication", "port": 9092}]
        )
        self.assertIsNone(self.parse(doc).replication_connect)

    def test_missing_port(self) -> None:
        """replication_connect needs a port."""
        doc = tcp_worker(replication_connect={"host": "h"})
        self.assertConfigError(doc, "replication_connect.port", "missing")


class LimitsTests(ConfigTestCase):
    def test_connection_and_handler_limits(self) -> None:
        """Keys map onto ConnectionLimits and HandlerLimits fields."""
        doc = with_(
            minimal(),
            replication_limits={
                "max_line_length": 4096,
                "close_timeout": 2,
                "catch_up_row_count": 50,
                "catch_up_retry_max_s": 10.5,
            },
        )
        config = self.parse(doc)
        self.assertEqual(
            config.connection_limits,
            ConnectionLimits(max_line_length=4096, close_timeout=2.0),
        )
        self.assertEqual(
            config.handler_limits,
            HandlerLimits(catch_up_row_count=50, catch_up_retry_max_s=10.5),
        )

    def test_reconnect_backoff(self) -> None:
        """replication_limits.reconnect maps onto Backoff."""
        doc = with_(
            minimal(),
            replication_limits={
                "reconnect": {"initial": 2, "maximum": 60, "jitter": 0}
            },
        )
        self.assertEqual(
            self.parse(doc).reconnect_backoff,
            Backoff(initial=2.0, maximum=60.0, jitter=0.0),
        )

    def test_zero_refused(self) -> None:
        """Limits must be positive."""
        doc = with_(minimal(), replication_limits={"max_pending_commands": 0})
        self.assertConfigError(
            doc, "replication_limits.max_pending_commands", "at least 1"
        )

    def test_float_for_int_refused(self) -> None:
        """A count given as a fraction is a type error."""
        doc = with_(minimal(), replication_limits={"catch_up_row_count": 1.5})
        self.assertConfigError(doc, "replication_limits.catch_up_row_count", "integer")

    def test_infinite_refused(self) -> None:
        """.inf is not a usable timeout."""
        doc = with_(minimal(), replication_limits={"close_timeout": float("inf")})
        self.assertConfigError(doc, "replication_limits.close_timeout", "finite")

    def test_cross_field_check(self) -> None:
        """ConnectionLimits' own check between fields is reported in the section."""
        doc = with_(
            minimal(),
            replication_limits={"max_line_length": 4096, "max_pending_bytes": 1024},
        )
        self.assertConfigError(doc, "replication_limits", "max_pending_bytes")

    def test_retry_max_below_initial(self) -> None:
        """catch_up_retry_max_s must not be below catch_up_retry_initial_s."""
        doc = with_(
            minimal(),
            replication_limits={
                "catch_up_retry_initial_s": 5,
                "catch_up_retry_max_s": 1,
            },
        )
        self.assertConfigError(
            doc, "replication_limits.catch_up_retry_max_s", "must not be below"
        )

    def test_bad_backoff(self) -> None:
        """A backoff that shrinks is refused by Backoff's own check."""
        doc = with_(minimal(), replication_limits={"reconnect": {"factor": 0.5}})
        self.assertConfigError(doc, "replication_limits.reconnect", "factor")

    def test_jitter_one_refused(self) -> None:
        """jitter must stay below 1."""
        doc = with_(minimal(), replication_limits={"reconnect": {"jitter": 1}})
        self.assertConfigError(doc, "replication_limits.reconnect", "jitter")

    def test_unknown_limit(self) -> None:
        """A misspelt limit gets a suggestion."""
        doc = with_(minimal(), replication_limits={"max_line_lenght": 1})
        self.assertConfigError(
            doc, "replication_limits.max_line_lenght", "did you mean 'max_line_length'?"
        )


class DocumentTests(ConfigTestCase):
    def test_unknown_top_level_key(self) -> None:
        """A misspelt top-level key is named, with a suggestion."""
        doc = with_(minimal(), stream_writer={})
        self.assertConfigError(
            doc, "stream_writer", "unknown key", "did you mean 'stream_writers'?"
        )

    def test_unknown_key_without_suggestion(self) -> None:
        """An unknown key with no close match lists the valid keys."""
        doc = with_(minimal(), zzz=1)
        error = self.assertConfigError(doc, "zzz", "unknown key", "server_name")
        self.assertNotIn("did you mean", str(error))

    def test_top_level_list(self) -> None:
        """A top level that is not a mapping is refused."""
        self.assertConfigError(["server_name"], "", "top level", "mapping", "a list")

    def test_empty_document(self) -> None:
        """An empty document is refused."""
        self.assertConfigError(None, "", "top level", "empty document")

    def test_non_string_key(self) -> None:
        """Keys must be strings."""
        self.assertConfigError({"server_name": "a", 1: 2}, "", "keys must be strings")

    def test_error_is_replication_error(self) -> None:
        """ConfigError is a ReplicationError (and a ValueError)."""
        self.assertTrue(issubclass(ConfigError, ReplicationError))
        self.assertTrue(issubclass(ConfigError, ValueError))


class LoadTests(ConfigTestCase):
    def test_load_file(self) -> None:
        """load_config reads a YAML file."""
        path = self.write("c.yaml", "server_name: example.com\ninstance_name: master\n")
        self.assertEqual(load_config(path).server_name, "example.com")

    def test_relative_paths_against_file_dir(self) -> None:
        """Relative paths are resolved against the file's directory, not the cwd."""
        path = self.write(
            "conf/c.yaml",
            "server_name: a\ndatabase: {name: sqlite3, args: {database: data/h.db}}\n",
        )
        database = load_config(path).database
        assert isinstance(database, SqliteDatabaseConfig)
        self.assertEqual(database.path, os.path.join(self.dir, "conf", "data", "h.db"))

    def test_missing_file(self) -> None:
        """A missing config file is a ConfigError naming it."""
        self.assertLoadError(os.path.join(self.dir, "none.yaml"), "No such file")

    def test_yaml_syntax_error_position(self) -> None:
        """A YAML syntax error gives the line and column."""
        path = self.write("c.yaml", "server_name: a\nredis: {enabled: true\n")
        self.assertLoadError(path, "YAML syntax error", "line 3, column 1")

    def test_yaml_tab_indent(self) -> None:
        """A tab in indentation is reported with its position."""
        path = self.write("c.yaml", "server_name: a\nredis:\n\tenabled: true\n")
        self.assertLoadError(path, "line 3, column 1")

    def test_duplicate_key(self) -> None:
        """A key given twice is an error naming both lines."""
        path = self.write("c.yaml", "server_name: a\nredis: {}\nserver_name: b\n")
        self.assertLoadError(path, "duplicate key", "'server_name'", "line 1", "line 3")

    def test_merge_key_may_override(self) -> None:
        """Overriding a key merged in with << is not a duplicate."""
        path = self.write(
            "c.yaml",
            "server_name: a\n"
            "instance_map:\n"
            "  main: &loc {host: h, port: 1}\n"
            "  w1: {<<: *loc, port: 2}\n",
        )
        self.assertEqual(load_config(path).instance_map["w1"].port, 2)

    def test_python_tag_refused(self) -> None:
        """Only plain YAML is loaded (no Python objects)."""
        path = self.write("c.yaml", "server_name: !!python/object:os.system {}\n")
        self.assertLoadError(path, "YAML syntax error", "line 1")

    def test_error_names_file_and_key(self) -> None:
        """An error found in a loaded file names the file and the key."""
        path = self.write("c.yaml", "server_name: a\nredis: {enabled: true, port: 0}\n")
        error = self.assertLoadError(path, "redis.port: port out of range")
        self.assertEqual(error.key, "redis.port")
        self.assertEqual(error.file, path)

    def test_example_loads(self) -> None:
        """docs/worker.example.yaml loads, given the secret files it names."""
        shutil.copy(EXAMPLE, os.path.join(self.dir, "worker.yaml"))
        self.write("secrets/replication.secret", SECRET + "\n")
        self.write("secrets/redis.secret", REDIS_PASSWORD + "\n")
        config = load_config(os.path.join(self.dir, "worker.yaml"))
        self.assertEqual(config.instance_name, "worker1")
        self.assertTrue(config.redis.enabled)
        self.assertIsInstance(config.database, PostgresDatabaseConfig)
        self.assertEqual(config.writers_of("events"), ["master", "worker1"])
        self.assertEqual(config.writers_of("typing"), ["master"])
        self.assertEqual(config.location_of("master").host, "10.0.0.1")


# -- fuzzing

# Every key the parser knows, so that random documents reach deep sections.
_KNOWN_KEYS: Final = sorted(
    {
        *multi(),
        *multi()["redis"],
        *multi()["database"]["args"],
        *WRITER_KEYS,
        *MAIN_ONLY_STREAMS,
        "enabled",
        "host",
        "port",
        "path",
        "tls",
        "type",
        "bind_addresses",
        "resources",
        "names",
        "args",
        "name",
        "worker_replication_secret_path",
        "password_path",
        "use_tls",
        "ca_file",
        "reconnect",
        "initial",
        "jitter",
        "mode",
        "main",
        "master",
        "replication",
        "sqlite3",
        "psycopg2",
    }
)

_SCALARS: Final = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 80, 6379, 65535, 65536, -1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(_KNOWN_KEYS),
    st.sampled_from(["127.0.0.1", "::1", "10.0.0.1", "/", "..", "a\0b", ":memory:"]),
)
_KEYS: Final = st.one_of(st.sampled_from(_KNOWN_KEYS), st.text(max_size=10))
_VALUES: Final = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(_KEYS, inner, max_size=5),
    ),
    max_leaves=20,
)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every path to a value inside `value` (mapping keys and list indexes)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            out += _paths(item, (*prefix, i))
    return out


@st.composite
def _mutated_configs(draw: Callable[..., Any]) -> Any:
    """A valid config with a few parts replaced, removed or added."""
    doc: Any = multi()
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if not path:
            doc = draw(_VALUES) if action == "replace" else doc
            continue
        parent = doc
        for part in path[:-1]:
            parent = parent[part]
        last = path[-1]
        if action == "replace":
            parent[last] = draw(_VALUES)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(_KEYS)] = draw(_VALUES)
        else:
            parent.append(draw(_VALUES))
    return doc


class FuzzTests(ConfigTestCase):
    def check(self, doc: object) -> None:
        """`doc` parses or is refused with a ConfigError that shows no secret."""
        try:
            config = parse_config(doc, base_dir=self.dir)
        except ConfigError as e:
            for secret in ALL_SECRETS:
                self.assertNotIn(secret, str(e))
        else:
            self.assertIsInstance(config, WorkerConfig)
            for secret in ALL_SECRETS:
                self.assertNotIn(secret, repr(config))

    @FUZZ
    @given(_VALUES)
    def test_random_structures(self, doc: Any) -> None:
        """Any YAML-able value parses or fails with a ConfigError."""
        self.check(doc)

    @FUZZ
    @given(st.dictionaries(_KEYS, _VALUES, max_size=8))
    def test_random_mappings(self, doc: dict[str, Any]) -> None:
        """Any mapping of (mostly known) keys parses or fails with a ConfigError."""
        self.check({"server_name": "example.com", **doc})

    @FUZZ
    @given(_mutated_configs())
    def test_mutated_configs(self, doc: Any) -> None:
        """A valid config, mutated, parses or fails with a ConfigError."""
        self.check(doc)

    @FUZZ
    @given(st.data())
    def test_mutated_yaml_text(self, data: st.DataObject) -> None:
        """The example's text, mutated, loads or fails with a ConfigError."""
        text = EXAMPLE.read_text(encoding="utf-8")
        for _ in range(data.draw(st.integers(min_value=1, max_value=3))):
            at = data.draw(st.integers(min_value=0, max_value=len(text)))
            cut = data.draw(st.integers(min_value=0, max_value=5))
            insert = data.draw(
                st.text(max_size=5) | st.sampled_from([":", "\n", "- ", "{", "\t"])
            )
            text = text[:at] + insert + text[at + cut :]
        path = self.write("fuzz.yaml", text)
        try:
            config = load_config(path)
        except ConfigError as e:
            self.assertIn(path, str(e))
        else:
            self.assertIsInstance(config, WorkerConfig)
