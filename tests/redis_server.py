"""Real Redis for the Redis transport tests: `redis-server` processes, a raw
client to observe them, a proxy that can hold Redis's replies, and TLS files.

- `RedisServer` runs ``redis-server`` on a free port of 127.0.0.1 (and
  optionally a unix socket, a password, TLS) in a temporary directory, with
  persistence off, and waits until it answers. It can be restarted on the same
  port with a different password, and paused (SIGSTOP) to play a hung server.
  `start_redis` starts one and registers its stop as a cleanup, so it is
  stopped whatever the test's outcome.
- `RawRedis` is a plain client (the library's own RESP protocol, nothing of
  replication) to publish, subscribe and inspect the server.
- `HoldingProxy` forwards TCP connections to Redis and can hold back what
  Redis sends, to show what a client does before a reply arrives.
- `make_tls_files` writes a CA, a server certificate for 127.0.0.1 and a
  client certificate.

redis-server must be installed (CI installs it with apt): without it these
helpers raise `RedisServerMissing`, which fails the test, not skips it.
"""

from __future__ import annotations

import datetime
import enum
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IListeningPort, ITransport
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from synapse_replication.redis import (
    RedisClientProtocol,
    RedisSettings,
    RespValue,
    redis_endpoint,
)
from synapse_replication.redis.client import _ProtocolFactory
from synapse_replication.tcp import Backoff

__all__ = [
    "HoldingProxy",
    "RawRedis",
    "RedisServer",
    "RedisServerMissing",
    "TlsFiles",
    "make_tls_files",
    "start_redis",
    "wait_until",
]

# How long a server may take to start or stop, and a raw request to answer.
STARTUP_TIMEOUT: Final = 10.0
STOP_TIMEOUT: Final = 5.0
RAW_REPLY_TIMEOUT: Final = 5.0


class RedisServerMissing(Exception):
    """redis-server is not installed; the Redis tests need it."""


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerMissing(
            "redis-server is not on PATH: the Redis transport tests start a real one. "
            "Install it (Debian: apt-get install redis-server; scripts/test does this "
            "when run as root)."
        )
    return path


async def wait_until(
    reactor: Any,
    condition: Callable[[], bool],
    what: str,
    timeout: float = 10.0,
    interval: float = 0.01,
) -> None:
    """Turn the reactor until `condition()` holds; fail after `timeout` s."""
    deadline = reactor.seconds() + timeout
    while not condition():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting until {what}")
        await deferLater(reactor, interval, lambda: None)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@attrs.frozen
class TlsFiles:
    """PEM files for a TLS Redis: a CA, the server's pair, a client's pair."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str


class _Output(ProcessProtocol):
    """Keeps the last output of a process and tells when it ended."""

    def __init__(self) -> None:
        self.output = b""
        self.ended = False
        self._waiters: list[Deferred[None]] = []

    def outReceived(self, data: bytes) -> None:
        self.output = (self.output + data)[-8192:]

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def when_ended(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.ended:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d


class _Keep(enum.Enum):
    """Restart with the password the server had."""

    KEEP = enum.auto()


def _info_field(info: RespValue, name: str) -> str | None:
    """One ``name:value`` field of an ``INFO`` answer."""
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == name:
            return value.strip()
    return None


class RedisServer:
    """One redis-server on 127.0.0.1, restartable on the same port."""

    def __init__(
        self,
        reactor: Any,
        *,
        password: str | None = None,
        unix_socket: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self._binary = redis_server_binary()
        self._reactor = reactor
        self.password = password
        self.tls = tls
        # A short path: unix socket paths are limited to ~107 bytes.
        self.dir = tempfile.mkdtemp(prefix="srr-")
        self.socket_path = os.path.join(self.dir, "redis.sock") if unix_socket else None
        self.port = _free_port()
        self._process: Any = None
        self._output: _Output | None = None
        self._paused = False

    def settings(self, **overrides: Any) -> RedisSettings:
        """Settings to reach this server, with fast timeouts for tests."""
        values: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": self.port,
            "password": self.password,
            "connect_timeout": 2.0,
            "ping_interval": 1.0,
            "reply_timeout": 3.0,
            "close_timeout": 1.0,
            "backoff": Backoff(initial=0.05, factor=2.0, maximum=0.3, jitter=0.25),
        }
        if self.tls is not None:
            values.update(
                use_tls=True,
                ca_file=self.tls.ca,
                certificate_file=self.tls.client_cert,
                private_key_file=self.tls.client_key,
            )
        values.update(overrides)
        return RedisSettings(**values)

    def _args(self) -> list[str]:
        args = [
            self._binary,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self.dir,
            "--daemonize", "no",
            "--loglevel", "warning",
            "--databases", "16",
        ]  # fmt: skip
        if self.tls is None:
            args += ["--port", str(self.port)]
        else:
            args += [
                "--port", "0",
                "--tls-port", str(self.port),
                "--tls-cert-file", self.tls.server_cert,
                "--tls-key-file", self.tls.server_key,
                "--tls-ca-cert-file", self.tls.ca,
                # Clients must present a certificate signed by the CA.
                "--tls-auth-clients", "yes",
            ]  # fmt: skip
        if self.socket_path is not None:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    async def start(self) -> None:
        """Start and wait until it answers; on a port taken meanwhile, move."""
        for attempt in range(3):
            output = _Output()
            self._output = output
            self._process = self._reactor.spawnProcess(
                output, self._binary, self._args(), env=dict(os.environ), path=self.dir
            )
            try:
                await self._wait_ready(output)
                return
            except AssertionError:
                if output.ended and b"in use" in output.output and attempt < 2:
                    self.port = _free_port()
                    continue
                await self.stop()
                raise

    async def _wait_ready(self, output: _Output) -> None:
        deadline = self._reactor.seconds() + STARTUP_TIMEOUT
        while True:
            if output.ended:
                raise AssertionError(
                    "redis-server exited at start:\n" + output.output.decode("utf-8", "replace")
                )
            try:
                raw = await RawRedis.connect(self._reactor, self.settings())
            except Exception:
                if self._reactor.seconds() > deadline:
                    raise AssertionError(
                        "redis-server did not accept connections within "
                        f"{STARTUP_TIMEOUT} s:\n" + output.output.decode("utf-8", "replace")
                    ) from None
                await deferLater(self._reactor, 0.02, lambda: None)
                continue
            try:
                info = await raw.execute("INFO", "server")
            finally:
                await raw.close()
            pid = _info_field(info, "process_id")
            if pid == str(self._process.pid):
                return
            # Another Redis answers on our port (taken between _free_port and
            # our bind): ours will exit with "in use", and start() moves.
            if self._reactor.seconds() > deadline:
                raise AssertionError(
                    f"a redis-server with pid {pid}, not ours ({self._process.pid}), "
                    f"answers on port {self.port}"
                )
            await deferLater(self._reactor, 0.02, lambda: None)

    async def stop(self) -> None:
        """Stop the server (also when paused) and wait until it exited."""
        output = self._output
        if output is None or output.ended:
            return
        if self._paused:
            self.resume()
        self._process.signalProcess("TERM")
        ended = output.when_ended()
        timer = self._reactor.callLater(STOP_TIMEOUT, self._kill)
        await ended
        if timer.active():
            timer.cancel()

    def _kill(self) -> None:
        if self._output is not None and not self._output.ended:
            self._process.signalProcess("KILL")

    async def restart(self, *, password: str | _Keep | None = _Keep.KEEP) -> None:
        """Stop, then start again on the same port (with a new password)."""
        await self.stop()
        if password is not _Keep.KEEP:
            self.password = password
        await self.start()

    def pause(self) -> None:
        """SIGSTOP: the server holds its connections and answers nothing."""
        os.kill(self._process.pid, signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        os.kill(self._process.pid, signal.SIGCONT)
        self._paused = False

    async def cleanup(self) -> None:
        await self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


async def start_redis(test: TestCase, reactor: Any, **kwargs: Any) -> RedisServer:
    """A started `RedisServer`, stopped and removed when `test` ends."""
    server = RedisServer(reactor, **kwargs)
    test.addCleanup(lambda: Deferred.fromCoroutine(server.cleanup()))
    await server.start()
    return server


class RawRedis:
    """A bare Redis client for observing: run commands, subscribe and keep
    every message received."""

    def __init__(self, reactor: Any, proto: RedisClientProtocol) -> None:
        self._reactor = reactor
        self.proto = proto
        self.messages: list[tuple[str, str]] = []

    @classmethod
    async def connect(cls, reactor: Any, settings: RedisSettings) -> RawRedis:
        holder: list[RawRedis] = []

        def on_message(channel: bytes, payload: bytes) -> None:
            holder[0].messages.append(
                (channel.decode("utf-8"), payload.decode("utf-8", "replace"))
            )

        def build() -> RedisClientProtocol:
            return RedisClientProtocol(
                clock=reactor,
                name="raw test client",
                reply_timeout=RAW_REPLY_TIMEOUT,
                close_timeout=1.0,
                on_message=on_message,
            )

        proto = await redis_endpoint(reactor, settings).connect(_ProtocolFactory(build))
        assert isinstance(proto, RedisClientProtocol)
        raw = cls(reactor, proto)
        holder.append(raw)
        try:
            if settings.password is not None:
                if settings.username is not None:
                    await proto.execute("AUTH", settings.username, settings.password)
                else:
                    await proto.execute("AUTH", settings.password)
        except BaseException:
            await raw.close()
            raise
        return raw

    async def execute(self, *args: bytes | str | int) -> RespValue:
        return await self.proto.execute(*args)

    async def subscribe(self, *channels: str) -> None:
        await self.proto.subscribe([c.encode("utf-8") for c in channels])

    async def client_list(self) -> list[dict[str, str]]:
        """``CLIENT LIST``, one dict per connection, without this one."""
        own = await self.execute("CLIENT", "ID")
        text = await self.execute("CLIENT", "LIST")
        assert isinstance(text, bytes)
        clients = []
        for line in text.decode("utf-8").splitlines():
            fields = dict(f.split("=", 1) for f in line.split(" ") if "=" in f)
            if fields.get("id") != str(own):
                clients.append(fields)
        return clients

    def lines_on(self, channel: str) -> list[str]:
        return [payload for ch, payload in self.messages if ch == channel]

    async def close(self) -> None:
        self.proto.close()
        await self.proto.when_lost()


class _ProxyToRedis(Protocol):
    """The proxy's connection to Redis: passes Redis's bytes to the client
    side, or keeps them while the proxy holds."""

    def __init__(self, proxy: HoldingProxy, client: _ProxyFromClient) -> None:
        self._proxy = proxy
        self._client = client
        self.held: list[bytes] = []

    def connectionMade(self) -> None:
        self._client.redis_connected(self)

    def dataReceived(self, data: bytes) -> None:
        if self._proxy.holding:
            self.held.append(data)
        else:
            self._client.send(data)

    def release(self) -> None:
        held, self.held = self.held, []
        for data in held:
            self._client.send(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._client.close()


class _ProxyFromClient(Protocol):
    """A client's connection to the proxy."""

    def __init__(self, proxy: HoldingProxy) -> None:
        self._proxy = proxy
        self._redis: _ProxyToRedis | None = None
        self._early: list[bytes] = []

    def connectionMade(self) -> None:
        self._proxy.clients.append(self)
        endpoint = HostnameEndpoint(self._proxy.reactor, "127.0.0.1", self._proxy.redis_port)
        d = endpoint.connect(_AnyFactory(lambda: _ProxyToRedis(self._proxy, self)))
        d.addErrback(lambda _: self.close())

    def redis_connected(self, redis: _ProxyToRedis) -> None:
        self._redis = redis
        assert redis.transport is not None
        for data in self._early:
            redis.transport.write(data)
        self._early = []

    def dataReceived(self, data: bytes) -> None:
        if self._redis is None or self._redis.transport is None:
            self._early.append(data)
        else:
            self._redis.transport.write(data)

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def release(self) -> None:
        if self._redis is not None:
            self._redis.release()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self in self._proxy.clients:
            self._proxy.clients.remove(self)
        redis = self._redis
        if redis is not None and redis.transport is not None:
            transport: ITransport = redis.transport
            transport.loseConnection()


class _AnyFactory(Factory):
    noisy = False

    def __init__(self, build: Callable[[], Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> Protocol:
        return self._build()


class HoldingProxy:
    """A TCP proxy to Redis on 127.0.0.1 that can hold back Redis's replies."""

    def __init__(self, reactor: Any, redis_port: int) -> None:
        self.reactor = reactor
        self.redis_port = redis_port
        self.holding = False
        self.clients: list[_ProxyFromClient] = []
        self._port: IListeningPort = reactor.listenTCP(
            0, _AnyFactory(lambda: _ProxyFromClient(self)), interface="127.0.0.1"
        )

    @property
    def port(self) -> int:
        port: int = self._port.getHost().port  # type: ignore[attr-defined]  # IAddress has no port; this is TCP
        return port

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        for client in list(self.clients):
            client.release()

    async def stop(self) -> None:
        for client in list(self.clients):
            client.close()
        await self._port.stopListening()  # type: ignore[misc]  # a TCP port always returns a Deferred


def make_tls_files(directory: str, hosts: Sequence[str] = ("127.0.0.1",)) -> TlsFiles:
    """A CA, and a server and a client certificate it signed, as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, filename: str) -> str:
        path = os.path.join(directory, filename)
        with open(path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            )
        return path

    def write_cert(cert: x509.Certificate, filename: str) -> str:
        path = os.path.join(directory, filename)
        with open(path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("test CA"))
        .issuer_name(name("test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(cn: str, usage: x509.ObjectIdentifier, sans: list[x509.GeneralName]) -> tuple[
        ec.EllipticCurvePrivateKey, x509.Certificate
    ]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key, server_cert = leaf(hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, sans)
    client_key, client_cert = leaf("test client", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    return TlsFiles(
        ca=write_cert(ca_cert, "ca.crt"),
        server_cert=write_cert(server_cert, "server.crt"),
        server_key=write_key(server_key, "server.key"),
        client_cert=write_cert(client_cert, "client.crt"),
        client_key=write_key(client_key, "client.key"),
    )
