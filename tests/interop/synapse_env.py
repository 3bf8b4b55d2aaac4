# mypy: allow-untyped-calls
# (twisted.web's Agent and readBody carry no annotations.)
"""A real Synapse for the interoperability tests: installed from PyPI into a
virtual environment of its own, run as a main process on 127.0.0.1 with
SQLite and Redis replication, and driven through its client API.

- `ensure_synapse_venv` installs ``matrix-synapse[redis]`` at the version the
  wire vectors were captured with, once: the environment is kept in
  ``~/.cache/synapse-replication/synapse-venv-<version>`` (or
  ``$SYNAPSE_REPLICATION_SYNAPSE_VENV``) and reused while it imports. Two test
  processes installing at once take turns through a file lock. When pip
  cannot install it, it raises `SynapseUnavailable` ("cannot install
  matrix-synapse from PyPI: ..."), which fails the test: the suite never
  passes or skips without having talked to Synapse.
- `RedisProcess` and `Homeserver` run ``redis-server`` and Synapse as child
  processes outside the reactor (`subprocess`), so that one instance can
  serve every test of a module without leaving anything in the reactor
  between tests. Each runs in its own process group; the group is killed on
  `stop()` and at interpreter exit, and the child is told by the kernel to
  die with us (``PR_SET_PDEATHSIG``) should we be killed outright. (Not at
  reactor shutdown: trial fires "shutdown" after every test when it runs
  them in worker processes, ``--jobs``.) Ports taken by someone else before
  the child could bind them are replaced and the child started again.
- `MatrixClient` speaks the client API as plain JSON over HTTP (Twisted's
  Agent): no new dependency.

Every wait has a timeout, and a failure shows the tail of Synapse's log.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import io
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, Final
from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import FailTest
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from synapse_replication._json import JsonValue, decode_json, encode_json_bytes

__all__ = [
    "MAIN_INSTANCE",
    "SERVER_NAME",
    "SYNAPSE_REQUIREMENT",
    "SYNAPSE_VERSION",
    "VENV_ENV",
    "Homeserver",
    "MatrixClient",
    "MatrixError",
    "RedisProcess",
    "SynapseUnavailable",
    "ensure_synapse_venv",
    "free_port",
    "synapse_venv_dir",
]

# The version the wire vectors (shared/wire) were captured from.
SYNAPSE_VERSION: Final = "1.163.2"
SYNAPSE_REQUIREMENT: Final = f"matrix-synapse[redis]=={SYNAPSE_VERSION}"
VENV_ENV: Final = "SYNAPSE_REPLICATION_SYNAPSE_VENV"

SERVER_NAME: Final = "test.local"
# Synapse's name for its main process on the replication bus.
MAIN_INSTANCE: Final = "master"

INSTALL_TIMEOUT_S: Final = 420.0
KEYGEN_TIMEOUT_S: Final = 60.0
START_TIMEOUT_S: Final = 120.0
STOP_TIMEOUT_S: Final = 15.0
REQUEST_TIMEOUT_S: Final = 30.0
REDIS_START_TIMEOUT_S: Final = 10.0

# Written into the environment once it installed and imported; its content
# is the requirement, so that a change of version reinstalls.
_MARKER: Final = ".synapse-replication-installed"


class SynapseUnavailable(FailTest):
    """Synapse could not be installed or started: the test fails (trial
    reports a failure, never a skip)."""


# -- the virtual environment


def synapse_venv_dir() -> str:
    """Where the Synapse environment lives: ``$SYNAPSE_REPLICATION_SYNAPSE_VENV``,
    else a directory under ``~/.cache`` named after the version."""
    override = os.environ.get(VENV_ENV)
    if override:
        return os.path.abspath(override)
    return os.path.join(
        os.path.expanduser("~"),
        ".cache",
        "synapse-replication",
        f"synapse-venv-{SYNAPSE_VERSION}",
    )


def _venv_python(venv_dir: str) -> str:
    return os.path.join(venv_dir, "bin", "python")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _installed_version(python: str) -> str | None:
    """The Synapse version `python` imports (with its Redis client), or None."""
    if not os.path.exists(python):
        return None
    try:
        result = subprocess.run(
            [python, "-c", "import synapse, txredisapi; print(synapse.__version__)"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return None
    return result.stdout.strip()


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) while inside."""
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def ensure_synapse_venv(venv_dir: str | None = None) -> str:
    """The python of an environment where ``matrix-synapse[redis]`` at
    `SYNAPSE_VERSION` is installed, installing it if needed. Blocks (call it
    in a thread). Raises `SynapseUnavailable`."""
    venv_dir = venv_dir or synapse_venv_dir()
    python = _venv_python(venv_dir)
    marker = os.path.join(venv_dir, _MARKER)
    os.makedirs(os.path.dirname(venv_dir), exist_ok=True)
    with _locked(venv_dir + ".lock"):
        if _read(marker) == SYNAPSE_REQUIREMENT and _installed_version(python) == SYNAPSE_VERSION:
            return python
        shutil.rmtree(venv_dir, ignore_errors=True)
        try:
            subprocess.run(
                [sys.executable, "-m", "venv", venv_dir],
                check=True,
                capture_output=True,
                text=True,
                timeout=120,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.SubprocessError) as e:
            output = getattr(e, "stderr", None) or ""
            raise SynapseUnavailable(
                f"cannot create a virtual environment for Synapse in {venv_dir}: {e}\n"
                f"{_tail(output)}"
            ) from None
        command = [
            python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--timeout",
            "60",
            "--retries",
            "3",
            SYNAPSE_REQUIREMENT,
        ]
        try:
            result = subprocess.run(
                command,
                check=False,
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise SynapseUnavailable(
                f"cannot install matrix-synapse from PyPI: pip install {SYNAPSE_REQUIREMENT} "
                f"took over {INSTALL_TIMEOUT_S:.0f} s"
            ) from None
        except OSError as e:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise SynapseUnavailable(f"cannot install matrix-synapse from PyPI: {e}") from None
        if result.returncode != 0:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise SynapseUnavailable(
                f"cannot install matrix-synapse from PyPI: pip install {SYNAPSE_REQUIREMENT} "
                f"exited with {result.returncode}:\n{_tail(result.stderr or result.stdout)}"
            )
        version = _installed_version(python)
        if version != SYNAPSE_VERSION:
            raise SynapseUnavailable(
                f"cannot install matrix-synapse from PyPI: after pip install, the "
                f"environment {venv_dir} imports Synapse {version!r}, not {SYNAPSE_VERSION}"
            )
        with open(marker, "w", encoding="utf-8") as f:
            f.write(SYNAPSE_REQUIREMENT)
        return python


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError:
        return None


# -- child processes


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Runs a command so that the kernel kills it (SIGKILL) when its parent, our
# process, dies without cleaning up (PR_SET_PDEATHSIG = 1 survives exec on
# Linux; elsewhere prctl is missing and this only execs). A launcher rather
# than Popen's preexec_fn, which is unsafe in a process with threads.
_DIE_WITH_PARENT: Final = (
    "import ctypes, os, signal, sys\n"
    "try:\n"
    "    ctypes.CDLL(None).prctl(1, signal.SIGKILL)\n"
    "except Exception:\n"
    "    pass\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit('parent already gone')\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


# Every child still running, so that they can be stopped at exit.
_running: dict[int, subprocess.Popen[bytes]] = {}


def _spawn(args: list[str], *, cwd: str, output_path: str, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    """Start `args` (``args[0]`` a path) in its own process group, output to
    `output_path`, killed by the kernel if we die.

    Call it from the main thread: the kernel ties the child's death signal to
    the thread that started it.
    """
    with open(output_path, "ab") as output:
        process = subprocess.Popen(
            [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *args],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
    _running[process.pid] = process
    return process


def _stop(process: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, SIGKILL it after `timeout`, and reap."""
    _running.pop(process.pid, None)
    if process.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def stop_all_children() -> None:
    """Stop every child started here and still running."""
    for process in list(_running.values()):
        _stop(process, timeout=5.0)


atexit.register(stop_all_children)


# -- redis-server


# How many times a child is started again on fresh ports when one it was
# given was taken meanwhile (by another test process) before it could bind.
PORT_ATTEMPTS: Final = 3


@attrs.define
class RedisProcess:
    """A ``redis-server`` on 127.0.0.1 with persistence off."""

    directory: str
    port: int = attrs.field(factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def output_path(self) -> str:
        return os.path.join(self.directory, "redis.log")

    async def start(self, reactor: Any) -> None:
        """Start it and wait until *it* answers on `port` (another server
        answering there would mean that ours could not bind it)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise SynapseUnavailable(
                "redis-server is not on PATH: the Synapse interoperability tests start "
                "one (Debian: apt-get install redis-server; scripts/test does this as root)"
            )
        os.makedirs(self.directory, exist_ok=True)
        for attempt in range(1, PORT_ATTEMPTS + 1):
            args = [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(self.port),
                "--save", "",
                "--appendonly", "no",
                "--dir", self.directory,
                "--daemonize", "no",
                "--loglevel", "warning",
            ]  # fmt: skip
            process = self.process = _spawn(
                args,
                cwd=self.directory,
                output_path=self.output_path,
                env=os.environ,
            )
            deadline = time.monotonic() + REDIS_START_TIMEOUT_S
            while _redis_pid(self.port) != process.pid:
                if process.poll() is not None:
                    break
                if time.monotonic() > deadline:
                    self.stop()
                    raise SynapseUnavailable(
                        f"redis-server did not answer on port {self.port} within "
                        f"{REDIS_START_TIMEOUT_S:.0f} s:\n{_tail(_read(self.output_path) or '')}"
                    )
                await deferLater(reactor, 0.05, lambda: None)
            else:
                return
            output = _read(self.output_path) or ""
            if "in use" not in output or attempt == PORT_ATTEMPTS:
                raise SynapseUnavailable(f"redis-server exited at start:\n{_tail(output)}")
            self.port = free_port()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


def _redis_pid(port: int) -> int | None:
    """The process id of the Redis server answering on `port`, if one does."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
            s.sendall(b"INFO server\r\n")
            data = b""
            while b"\r\ntcp_port:" not in data and len(data) < 65536:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.split(b"\r\n"):
        if line.startswith(b"process_id:"):
            return int(line.partition(b":")[2])
    return None


# -- Synapse


# Python logging configuration for Synapse: everything at INFO into one file.
def _log_config(log_path: str) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "filename": log_path,
                "formatter": "precise",
                "encoding": "utf-8",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "WARNING"}},
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }


# Rate limits out of the way: the tests send a burst of requests.
_GENEROUS: Final = {"per_second": 1000, "burst_count": 1000}


@attrs.define
class Homeserver:
    """A Synapse main process: client API on `client_port`, the replication
    HTTP endpoints on `replication_port` (with `secret`), Redis replication
    through the redis-server on `redis_port`, SQLite in `directory`."""

    directory: str
    python: str
    redis_port: int
    client_port: int = attrs.field(factory=free_port)
    replication_port: int = attrs.field(factory=free_port)
    secret: str = attrs.field(factory=lambda: secrets.token_hex(16))
    process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> str:
        return os.path.join(self.directory, "homeserver.yaml")

    @property
    def log_path(self) -> str:
        """Synapse's log (Python logging)."""
        return os.path.join(self.directory, "homeserver.log")

    @property
    def output_path(self) -> str:
        """What the process wrote to stdout and stderr (start-up failures)."""
        return os.path.join(self.directory, "homeserver.out")

    @property
    def client_base(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    def config(self) -> dict[str, Any]:
        d = self.directory
        return {
            "server_name": SERVER_NAME,
            "pid_file": os.path.join(d, "homeserver.pid"),
            "listeners": [
                {
                    "port": self.client_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                },
                {
                    "port": self.replication_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["replication", "metrics"], "compress": False}],
                },
            ],
            "database": {
                "name": "sqlite3",
                "args": {"database": os.path.join(d, "homeserver.db")},
            },
            "log_config": os.path.join(d, "log_config.yaml"),
            "media_store_path": os.path.join(d, "media_store"),
            "signing_key_path": os.path.join(d, "signing.key"),
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "registration_shared_secret": secrets.token_hex(16),
            "enable_registration": True,
            "enable_registration_without_verification": True,
            "redis": {"enabled": True, "host": "127.0.0.1", "port": self.redis_port},
            "worker_replication_secret": self.secret,
            "enable_metrics": True,
            # Thread subscriptions (MSC4306) feed a stream this library does
            # not model: the tests need one to show such rows kept raw.
            "experimental_features": {"msc4306_enabled": True},
            "instance_map": {
                "main": {"host": "127.0.0.1", "port": self.replication_port}
            },
            "rc_message": _GENEROUS,
            "rc_registration": _GENEROUS,
            "rc_login": {"address": _GENEROUS, "account": _GENEROUS, "failed_attempts": _GENEROUS},
            "rc_joins": {"local": _GENEROUS, "remote": _GENEROUS},
            "rc_invites": {"per_room": _GENEROUS, "per_user": _GENEROUS, "per_issuer": _GENEROUS},
            "rc_room_creation": _GENEROUS,
            "rc_presence": {"per_user": _GENEROUS},
        }

    def write_config(self) -> None:
        """homeserver.yaml and the logging config (JSON is YAML)."""
        os.makedirs(os.path.join(self.directory, "media_store"), exist_ok=True)
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump(self.config(), f, indent=1)
        with open(os.path.join(self.directory, "log_config.yaml"), "w", encoding="utf-8") as f:
            json.dump(_log_config(self.log_path), f, indent=1)

    def generate_keys(self) -> None:
        """The signing key, with Synapse's own ``--generate-keys``. Blocks
        (call it in a thread)."""
        self.write_config()
        command = [
            self.python, "-m", "synapse.app.homeserver",
            "-c", self.config_path, "--generate-keys",
        ]  # fmt: skip
        try:
            result = subprocess.run(
                command,
                check=False,
                cwd=self.directory,
                capture_output=True,
                text=True,
                timeout=KEYGEN_TIMEOUT_S,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            raise SynapseUnavailable(
                f"Synapse's --generate-keys took over {KEYGEN_TIMEOUT_S:.0f} s"
            ) from None
        if result.returncode != 0:
            raise SynapseUnavailable(
                f"Synapse's --generate-keys failed ({result.returncode}):\n"
                f"{_tail(result.stderr + result.stdout)}"
            )

    async def start(self, reactor: Any) -> None:
        """Start Synapse (keys generated first) and wait until it listens on
        both ports, has published its REPLICATE on Redis and its client API
        answers; on failure, stop it and raise with its log's tail. A port taken before Synapse could bind it is
        replaced and Synapse started again."""
        for attempt in range(1, PORT_ATTEMPTS + 1):
            self.write_config()
            if await self._start_once(reactor):
                return
            if attempt == PORT_ATTEMPTS:
                raise SynapseUnavailable(
                    f"Synapse could not bind its ports {PORT_ATTEMPTS} times:\n{self.log_tail()}"
                )
            self.client_port, self.replication_port = free_port(), free_port()

    async def _start_once(self, reactor: Any) -> bool:
        """True once started; False if a port was taken (Synapse exited)."""
        log_start = len(self.log_text())
        process = self.process = _spawn(
            [self.python, "-m", "synapse.app.homeserver", "-c", self.config_path],
            cwd=self.directory,
            output_path=self.output_path,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        client = MatrixClient(reactor, self.client_base)
        # Listening on both ports, and on the Redis bus: subscribed, with its
        # own REPLICATE out (its answers follow at once).
        ready = [
            *(
                f"Synapse now listening on TCP port {port}\n"
                for port in (self.client_port, self.replication_port)
            ),
            "REPLICATE successfully sent\n",
        ]
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log = self.log_text()[log_start:] + (_read(self.output_path) or "")
                if "Address already in use" in log:
                    return False
                raise SynapseUnavailable(
                    f"Synapse exited at start with {process.returncode}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise SynapseUnavailable(
                    f"Synapse did not start within {START_TIMEOUT_S:.0f} s:\n{self.log_tail()}"
                )
            log = self.log_text()[log_start:]
            if all(line in log for line in ready):
                try:
                    code, _ = await client.raw("GET", "/health", timeout=2.0)
                except Exception:
                    code = 0
                if code == 200:
                    return True
            await deferLater(reactor, 0.1, lambda: None)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return _read(self.log_path) or ""

    def log_tail(self, lines: int = 60) -> str:
        """The end of Synapse's log and of its output, for failure messages."""
        parts = [
            f"--- {self.log_path} (last {lines} lines) ---",
            _tail(self.log_text(), lines),
            f"--- {self.output_path} ---",
            _tail(_read(self.output_path) or "", 20),
        ]
        return "\n".join(parts)


# -- the client API


class MatrixError(FailTest):
    """The client API answered other than expected."""


class MatrixClient:
    """JSON requests to a homeserver's client API, each with a timeout."""

    def __init__(self, reactor: Any, base_url: str, access_token: str | None = None) -> None:
        self._reactor = reactor
        self._base = base_url
        self.access_token = access_token
        # Not persistent: no connection outlives its request.
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    def as_user(self, access_token: str) -> MatrixClient:
        return MatrixClient(self._reactor, self._base, access_token)

    async def raw(
        self,
        method: str,
        path: str,
        body: JsonValue | None = None,
        *,
        timeout: float = REQUEST_TIMEOUT_S,
    ) -> tuple[int, bytes]:
        headers = Headers({b"User-Agent": [b"synapse-replication-interop"]})
        if self.access_token is not None:
            headers.addRawHeader(b"Authorization", f"Bearer {self.access_token}".encode("ascii"))
        producer = None
        if body is not None:
            headers.addRawHeader(b"Content-Type", b"application/json")
            producer = FileBodyProducer(io.BytesIO(encode_json_bytes(body)))
        d: Deferred[IResponse] = self._agent.request(
            method.encode("ascii"), (self._base + path).encode("ascii"), headers, producer
        )
        d.addTimeout(timeout, self._reactor)
        response = await d
        body_d: Deferred[bytes] = readBody(response)
        body_d.addTimeout(timeout, self._reactor)
        return response.code, await body_d

    async def call(
        self, method: str, path: str, body: JsonValue | None = None, *, expect: int = 200
    ) -> dict[str, Any]:
        """A request whose answer must have status `expect` and a JSON object."""
        code, data = await self.raw(method, path, body)
        if code != expect:
            raise MatrixError(
                f"{method} {path} answered {code}, expected {expect}: "
                f"{data[:500].decode('utf-8', 'replace')}"
            )
        parsed = decode_json(data) if data else {}
        if not isinstance(parsed, dict):
            raise MatrixError(f"{method} {path} answered with no JSON object: {data[:200]!r}")
        return parsed

    # Conveniences for the calls the tests make.

    async def register(self, username: str, password: str) -> MatrixClient:
        """Register `username` (dummy auth) and return a client acting as it."""
        answer = await self.call(
            "POST",
            "/_matrix/client/v3/register",
            {
                "username": username,
                "password": password,
                "auth": {"type": "m.login.dummy"},
                "inhibit_login": False,
                "initial_device_display_name": "interop",
            },
        )
        token = answer.get("access_token")
        if not isinstance(token, str):
            raise MatrixError(f"registering {username} gave no access token: {answer}")
        return self.as_user(token)

    async def send_event(self, room_id: str, event_type: str, content: JsonValue) -> str:
        txn = secrets.token_hex(8)
        answer = await self.call(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/send/"
            f"{quote(event_type, safe='')}/{txn}",
            content,
        )
        return _event_id(answer)

    async def send_state(
        self, room_id: str, event_type: str, state_key: str, content: JsonValue
    ) -> str:
        answer = await self.call(
            "PUT",
            f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/state/"
            f"{quote(event_type, safe='')}/{quote(state_key, safe='')}",
            content,
        )
        return _event_id(answer)


def _event_id(answer: Mapping[str, Any]) -> str:
    event_id = answer.get("event_id")
    if not isinstance(event_id, str):
        raise MatrixError(f"no event_id in {answer}")
    return event_id
