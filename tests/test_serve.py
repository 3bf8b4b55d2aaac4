# -*- test-case-name: tests.test_serve -*-
"""``synapse-replication serve`` and ``twistd -n synapse-replication`` as an
operator runs them: real processes, started from the documented embedded
configs (``docs/embedded*.example.yaml``, with free ports and a temporary
directory), followed over loopback by instances in the test's reactor.

What is checked is what an operator relies on: the listeners are bound on
127.0.0.1 and answer; SIGTERM stops the process cleanly and quickly; a worker
that stops tells the main process (CLEAR_USER_SYNC); ``--log-level`` works;
a bad config exits 2 naming the key; no secret is ever printed.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any, Final

import yaml
from twisted.internet import reactor
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, readBody

from synapse_replication.app import RunningInstance, start_instance
from synapse_replication.commands import ClearUserSyncCommand, Command
from synapse_replication.config import load_config
from synapse_replication.http import HttpReplicationClient
from synapse_replication.interfaces import IReplicationConnection
from synapse_replication.streams import EventsStream, ReceiptsStream, TypingStream
from synapse_replication.testing import TestReplicationDataHandler

REACTOR: Final[Any] = reactor
DOCS: Final = Path(__file__).resolve().parent.parent / "docs"
SECRET: Final = "serve-test-secret-QUUX"
STREAMS: Final = (EventsStream.NAME, ReceiptsStream.NAME, TypingStream.NAME)
# How long a process may take to start (interpreter and imports included)
# and to stop after SIGTERM.
START_TIMEOUT_S: Final = 20.0
STOP_TIMEOUT_S: Final = 5.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def script(name: str) -> list[str]:
    """The installed console script `name` of this interpreter."""
    path = os.path.join(os.path.dirname(sys.executable), name)
    if not os.path.exists(path):
        found = shutil.which(name)
        assert found is not None, f"{name} is not installed"
        path = found
    return [path]


async def wait_until(predicate: Any, what: str, timeout: float = 15.0) -> None:
    deadline = REACTOR.seconds() + timeout
    while not predicate():
        if REACTOR.seconds() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await deferLater(REACTOR, 0.02, lambda: None)


class Process(ProcessProtocol):
    """A child process: its output so far, and how it ended."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv
        self.out = ""
        self.err = ""
        self.reason: Failure | None = None

    def outReceived(self, data: bytes) -> None:
        self.out += data.decode("utf-8", "replace")

    def errReceived(self, data: bytes) -> None:
        self.err += data.decode("utf-8", "replace")

    def processEnded(self, reason: Failure) -> None:
        self.reason = reason

    @property
    def output(self) -> str:
        return self.out + self.err

    async def wait_for(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        """The first match of `pattern` in the output, once it is there."""
        deadline = REACTOR.seconds() + timeout
        while True:
            match = re.search(pattern, self.output)
            if match is not None:
                return match
            if self.reason is not None or REACTOR.seconds() > deadline:
                raise AssertionError(
                    f"{pattern!r} not in the output of {' '.join(self.argv)}"
                    f" ({'ended' if self.reason else 'timed out'}):\n{self.output}"
                )
            await deferLater(REACTOR, 0.02, lambda: None)

    async def ended(self, timeout: float = STOP_TIMEOUT_S) -> tuple[int | None, int | None]:
        """(exit code, signal) once it ends within `timeout`."""
        await wait_until(lambda: self.reason is not None, f"{self.argv[0]} exits", timeout)
        assert self.reason is not None
        value = self.reason.value
        if isinstance(value, ProcessDone):
            return 0, None
        assert isinstance(value, ProcessTerminated)
        return value.exitCode, value.signal

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)  # type: ignore[union-attr]  # Twisted types it loosely


class ServeTestCase(TestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="synrepl-serve-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        with open(os.path.join(self.dir, "replication.secret"), "w") as f:
            f.write(SECRET + "\n")
        self.http_port = free_port()

    def write(self, name: str, document: dict[str, Any]) -> str:
        path = os.path.join(self.dir, name)
        with open(path, "w") as f:
            yaml.safe_dump(document, f)
        return path

    def main_config(self, replication_port: int = 0) -> str:
        """docs/embedded.example.yaml, on free ports in our directory."""
        with open(DOCS / "embedded.example.yaml") as f:
            document = yaml.safe_load(f)
        document["instance_map"]["main"]["port"] = self.http_port
        document["replication_limits"] = {"reconnect": {"initial": 0.05, "maximum": 0.3}}
        for listener in document["listeners"]:
            listener["port"] = (
                self.http_port if listener["type"] == "http" else replication_port
            )
        return self.write("main.yaml", document)

    def worker_config(self, replication_port: int) -> str:
        """docs/embedded-worker.example.yaml, following our main process."""
        with open(DOCS / "embedded-worker.example.yaml") as f:
            document = yaml.safe_load(f)
        document["instance_map"]["main"]["port"] = self.http_port
        document["replication_connect"]["port"] = replication_port
        document["replication_limits"] = {"reconnect": {"initial": 0.05, "maximum": 0.3}}
        return self.write("worker.yaml", document)

    def spawn(self, argv: list[str]) -> Process:
        process = Process(argv)
        REACTOR.spawnProcess(process, argv[0], argv, env=dict(os.environ), path=self.dir)

        def kill() -> None:
            if process.reason is None:
                process.signal("KILL")

        self.addCleanup(kill)
        return process

    async def start_in_test(
        self, path: str, data: TestReplicationDataHandler | None = None, **kwargs: Any
    ) -> RunningInstance:
        instance = await start_instance(REACTOR, load_config(path), data_handler=data, **kwargs)
        self.addCleanup(instance.stop)
        return instance

    async def follow(self, replication_port: int) -> tuple[RunningInstance, TestReplicationDataHandler]:
        """A worker in the test's reactor, following the main process."""
        data = TestReplicationDataHandler()
        worker = await self.start_in_test(self.worker_config(replication_port), data)
        await wait_until(
            lambda: all(data.get_position(s, "master") is not None for s in STREAMS),
            "the worker hears every stream of the main process",
        )
        return worker, data

    def assert_clean_stop(self, output: str) -> None:
        self.assertIn("Received SIGTERM", output)
        self.assertIn("Stopping instance master", output)
        self.assertIn("Stopped instance master", output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn(SECRET, output)


class ServeTests(ServeTestCase):
    async def test_serve_the_embedded_default(self) -> None:
        """The main process from the documented config: its three listeners
        are bound on 127.0.0.1 and answer (a worker follows it, the HTTP
        endpoint answers with the secret, metrics are served); SIGTERM stops
        it within seconds with exit code 0, and the log shows it. Logged at
        the default level: no debug lines."""
        config = self.main_config()
        main = self.spawn([*script("synapse-replication"), "serve", "-c", config])
        await main.wait_for("Instance master started")
        ports = {
            kind: int(port)
            for kind, port in re.findall(
                r"Listening for (\w+) on 127\.0\.0\.1:(\d+)", main.output
            )
        }
        self.assertEqual(set(ports), {"replication", "http", "metrics"})
        self.assertEqual(ports["http"], self.http_port)

        worker, _ = await self.follow(ports["replication"])
        client = HttpReplicationClient(REACTOR, load_config(config).instance_map, SECRET)
        self.addCleanup(client.close)
        self.assertEqual(
            await client.get_updates(TypingStream.NAME, "master", 0, 0), ([], 0, False)
        )
        response = await Agent(REACTOR).request(
            b"GET", f"http://127.0.0.1:{ports['metrics']}/metrics".encode()
        )
        self.assertEqual(response.code, 200)
        self.assertIn(b"synapse_replication", await readBody(response))

        main.signal("TERM")
        self.assertEqual(await main.ended(), (0, None))
        self.assert_clean_stop(main.err)
        self.assertIsNone(re.search(r"^\S+ DEBUG ", main.err, re.MULTILINE))
        # Its connections went with it.
        await wait_until(lambda: not worker.handler.connected(), "the worker is disconnected")

    async def test_worker_process_clears_its_user_syncs(self) -> None:
        """A worker process, at debug level, following a main process in the
        test: on SIGTERM it sends CLEAR_USER_SYNC (Synapse's shutdown of a
        worker) before it closes, then exits 0."""
        cleared: list[tuple[str, str | None]] = []

        def on_other(connection: IReplicationConnection, cmd: Command) -> None:
            if isinstance(cmd, ClearUserSyncCommand):
                cleared.append((cmd.instance_id, connection.peer_name()))

        main = await self.start_in_test(self.main_config(), on_other_command=on_other)
        (replication_port,) = main.ports("replication")
        worker = self.spawn(
            [
                *script("synapse-replication"),
                "serve",
                "-c",
                self.worker_config(replication_port),
                "--log-level",
                "debug",
            ]
        )
        await worker.wait_for("Instance worker1 started")
        await wait_until(
            lambda: any(c.peer_name() == "worker1" for c in main.handler.connections()),
            "the worker process connects",
        )
        await worker.wait_for(r"First position of 'typing' from 'master'")

        worker.signal("TERM")
        self.assertEqual(await worker.ended(), (0, None))
        self.assertEqual(cleared, [("worker1", "worker1")])
        self.assertIn("sending CLEAR_USER_SYNC worker1", worker.err)
        self.assertIn("Stopped instance worker1", worker.err)
        self.assertIsNotNone(re.search(r"^\S+ DEBUG ", worker.err, re.MULTILINE))
        self.assertNotIn(SECRET, worker.output)

    async def test_bad_configs_exit_2_naming_the_key(self) -> None:
        """A config that does not parse, and one that parses but cannot run
        (a TCP client that writes typing): exit code 2, the file and the key
        on stderr, before anything starts."""
        typo = self.write("typo.yaml", {"server_name": "example.com", "listners": []})
        tcp_writer = self.write(
            "tcp_writer.yaml",
            {
                "server_name": "example.com",
                "instance_name": "worker1",
                "worker_replication_secret": SECRET,
                "instance_map": {
                    "main": {"host": "127.0.0.1", "port": 8001},
                    "worker1": {"host": "127.0.0.1", "port": 8002},
                },
                "stream_writers": {"typing": "worker1"},
                "replication_connect": {"port": 8003},
            },
        )
        for path, key in ((typo, "listners"), (tcp_writer, "stream_writers.typing")):
            process = self.spawn([*script("synapse-replication"), "serve", "-c", path])
            self.assertEqual(await process.ended(START_TIMEOUT_S), (2, None))
            self.assertIn(f"{path}: {key}:", process.err)
            self.assertNotIn("Instance", process.err)
            self.assertNotIn(SECRET, process.output)


class TwistdTests(ServeTestCase):
    async def test_twistd_plugin_starts_and_stops(self) -> None:
        """``twistd -n synapse-replication -c ...`` runs the same service: the
        plugin is listed, the listeners answer, SIGTERM stops it cleanly
        (twistd then ends by the signal, as it always does), and a bad
        config is a usage error naming the key."""
        twistd = script("twistd")
        help_process = self.spawn([*twistd, "--help"])
        await help_process.ended(START_TIMEOUT_S)
        self.assertIn("synapse-replication", help_process.out)

        main = self.spawn(
            [*twistd, "-n", "--pidfile=", "synapse-replication", "-c", self.main_config()]
        )
        await main.wait_for("Instance master started")
        port = int((await main.wait_for(r"Listening for replication on 127\.0\.0\.1:(\d+)"))[1])
        await self.follow(port)

        main.signal("TERM")
        code, by_signal = await main.ended()
        # twistd re-raises the signal that stopped it once it has shut down.
        self.assertIn((code, by_signal), [(0, None), (None, signal.SIGTERM)])
        self.assert_clean_stop(main.out)
        self.assertIn("Server Shut Down", main.out)

        bad = self.write("bad.yaml", {"server_name": "example.com", "listners": []})
        process = self.spawn(
            [*twistd, "-n", "--pidfile=", "synapse-replication", "-c", bad]
        )
        code, _ = await process.ended(START_TIMEOUT_S)
        self.assertEqual(code, 1)
        self.assertIn(f"{bad}: listners:", process.output)
