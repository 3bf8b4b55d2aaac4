# -*- test-case-name: tests.test_redis -*-
"""How to reach Redis: `RedisSettings` and the endpoint it describes.

The settings are a frozen value checked when built, so a wrong combination
(a username without a password, a certificate without its key, TLS over a
unix socket) is refused at start-up rather than found on the first connect.
The password is a plain string here: reading ``password_path`` belongs to the
configuration layer. It never appears in a repr or a log.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.endpoints import (
    HostnameEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IReactorTime,
    IStreamClientEndpoint,
)

from synapse_replication.tcp import Backoff

if TYPE_CHECKING:
    # Importing twisted.internet.ssl needs pyOpenSSL; only TLS users have it.
    from twisted.internet import ssl
    from twisted.internet._sslverify import IOpenSSLTrustRoot

__all__ = ["RedisSettings", "redis_endpoint", "redis_tls_options"]


def _positive(_: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise ValueError(f"{attribute.name} must be positive, got {value!r}")


def _redacted(value: str | None) -> str:
    return "None" if value is None else "'<redacted>'"


@attrs.frozen(kw_only=True)
class RedisSettings:
    """One Redis server and how to talk to it.

    - `host`, `port`: TCP address; ignored when `path` (a unix socket) is set.
    - `username`, `password`: ``AUTH [username] password`` on every
      connection; a username needs a password (Redis ACL users).
    - `dbid`: ``SELECT dbid`` on every connection when set. Pub/sub channels
      are shared by all databases; Synapse selects it anyway, and so do we.
    - `use_tls`, `certificate_file` + `private_key_file` (a client certificate,
      both or neither), `ca_file` (a PEM bundle) and `ca_path` (a directory of
      PEM files): the authorities the server certificate must chain to, the
      system's trust store when neither is set. The server's name (`host`, a
      DNS name or an IP address) is always verified.
    - `connect_timeout`: seconds a TCP connect may take.
    - `ping_interval`: seconds between PINGs on each connection.
    - `reply_timeout`: seconds Redis may take to answer any request (a PING,
      AUTH, SUBSCRIBE, PUBLISH); past it the connection is taken for dead,
      aborted and made again. This is what finds a hung server or a
      half-open TCP connection.
    - `close_timeout`: seconds a clean close may wait before aborting.
    - `backoff`: delays between reconnection attempts, reset once a
      connection is ready.
    - `max_queued_commands`, `max_queued_bytes`: bounds of the queue of
      commands waiting while the publish connection is down. Past either,
      the oldest are dropped (readers then catch up through POSITION).
    - `max_line_length`: longest message, in bytes, that we take from the
      channel (the TCP transport's line limit). A longer one is dropped with
      a warning; if it was an RDATA, the subscriber session is started again
      so that the row is fetched by catch-up instead of lost.
    """

    host: str = "localhost"
    port: int = attrs.field(
        default=6379, validator=[attrs.validators.ge(0), attrs.validators.le(65535)]
    )
    path: str | None = None
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=_redacted)
    dbid: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(attrs.validators.ge(0))
    )
    use_tls: bool = False
    certificate_file: str | None = None
    private_key_file: str | None = None
    ca_file: str | None = None
    ca_path: str | None = None
    connect_timeout: float = attrs.field(default=30.0, validator=_positive)
    ping_interval: float = attrs.field(default=10.0, validator=_positive)
    reply_timeout: float = attrs.field(default=20.0, validator=_positive)
    close_timeout: float = attrs.field(default=5.0, validator=_positive)
    backoff: Backoff = attrs.field(factory=Backoff)
    max_queued_commands: int = attrs.field(default=10_000, validator=_positive)
    max_queued_bytes: int = attrs.field(default=16 * 1024 * 1024, validator=_positive)
    max_line_length: int = attrs.field(default=16 * 1024, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.username is not None and self.password is None:
            raise ValueError("a Redis username needs a password")
        if (self.certificate_file is None) != (self.private_key_file is None):
            raise ValueError("certificate_file and private_key_file go together")
        if not self.use_tls and (
            self.certificate_file is not None
            or self.ca_file is not None
            or self.ca_path is not None
        ):
            raise ValueError(
                "certificate_file, private_key_file, ca_file and ca_path need use_tls"
            )
        if self.use_tls and self.path is not None:
            raise ValueError("use_tls is for TCP; a unix socket (path) is not encrypted")

    def address(self) -> str:
        """Where Redis is, for logs: ``host:port`` or ``unix:<path>``."""
        if self.path is not None:
            return f"unix:{self.path}"
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def redis_tls_options(settings: RedisSettings) -> IOpenSSLClientConnectionCreator:
    """The TLS client options `settings` ask for: verify the server against
    `ca_file` and `ca_path` (or the system's trust store) and its name against
    `host`, and present the client certificate if one is given.

    Reads the files now, so a missing or malformed one fails at start-up.
    Needs pyOpenSSL and service_identity (``Twisted[tls]``), imported here so
    that plain TCP works without them.
    """
    from twisted.internet import ssl

    # Untyped in Twisted: given their signatures here.
    trust_root_from: Callable[[list[ssl.Certificate]], IOpenSSLTrustRoot] = (
        ssl.trustRootFromCertificates
    )
    load_private: Callable[[bytes], ssl.PrivateCertificate] = ssl.PrivateCertificate.loadPEM
    authorities: list[ssl.Certificate] = []
    if settings.ca_file is not None:
        with open(settings.ca_file, "rb") as f:
            in_file = _pem_certificates(f.read())
        if not in_file:
            raise ValueError(f"no PEM certificate in ca_file {settings.ca_file!r}")
        authorities += in_file
    if settings.ca_path is not None:
        in_directory: list[ssl.Certificate] = []
        for entry in sorted(os.listdir(settings.ca_path)):
            path = os.path.join(settings.ca_path, entry)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    in_directory += _pem_certificates(f.read())
        if not in_directory:
            raise ValueError(f"no PEM certificate in ca_path {settings.ca_path!r}")
        authorities += in_directory
    trust_root: IOpenSSLTrustRoot | None = None
    if authorities:
        trust_root = trust_root_from(authorities)
    client_certificate = None
    if settings.certificate_file is not None and settings.private_key_file is not None:
        with open(settings.certificate_file, "rb") as f:
            certificate = f.read()
        with open(settings.private_key_file, "rb") as f:
            key = f.read()
        client_certificate = load_private(certificate + b"\n" + key)
    return ssl.optionsForClientTLS(
        settings.host, trustRoot=trust_root, clientCertificate=client_certificate
    )


_PEM_BEGIN = b"-----BEGIN CERTIFICATE-----"
_PEM_END = b"-----END CERTIFICATE-----"


def _pem_certificates(data: bytes) -> list[ssl.Certificate]:
    """Every PEM certificate in `data` (a bundle, or a file with other PEM
    blocks such as keys, which are skipped)."""
    from twisted.internet import ssl

    certificates = []
    for block in data.split(_PEM_END):
        start = block.find(_PEM_BEGIN)
        if start >= 0:
            certificates.append(ssl.Certificate.loadPEM(block[start:] + _PEM_END))
    return certificates


def redis_endpoint(reactor: Any, settings: RedisSettings) -> IStreamClientEndpoint:
    """The endpoint to connect to: a unix socket, TCP, or TLS over TCP.

    `reactor` must provide `IReactorTime` and, for the endpoint chosen,
    `IReactorUNIX` or `IReactorTCP` (with `IReactorPluggableNameResolver`
    for host names), as Twisted's own reactors do.
    """
    if settings.path is not None:
        unix: Callable[..., IStreamClientEndpoint] = UNIXClientEndpoint
        return unix(reactor, settings.path, timeout=settings.connect_timeout)
    endpoint: IStreamClientEndpoint = HostnameEndpoint(
        reactor, settings.host, settings.port, timeout=settings.connect_timeout
    )
    if settings.use_tls:
        clock: IReactorTime = reactor
        endpoint = wrapClientTLS(redis_tls_options(settings), endpoint, clock=clock)
    return endpoint
