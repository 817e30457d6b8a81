"""Shared pytest fixtures for sysmail: SMTP sinks, TLS, DKIM keys, Redis, CLI runner."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
LOCALHOST = "127.0.0.1"
SMTP_USER = "mailer"
SMTP_PASSWORD = "s3cret-pass"
REDIS_SERVER = Path("/usr/bin/redis-server")
MAX_MESSAGE_BYTES = 128 * 1024 * 1024
_DROP = object()


# --------------------------------------------------------------------------- ports


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOCALHOST, 0))
        return int(sock.getsockname()[1])


def bind_socket(port: int = 0) -> socket.socket:
    """Return a TCP socket bound (SO_REUSEADDR, not listening) to 127.0.0.1:port.

    proto=IPPROTO_TCP, as asyncio's own create_server uses: accepted sockets inherit it, and
    asyncio disables Nagle (TCP_NODELAY) only for those. With proto=0 each multi-line or
    pipelined reply (aiosmtpd writes line by line) waits ~40 ms for the client's delayed ACK.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((LOCALHOST, port))
    except OSError:
        sock.close()
        raise
    return sock


# --------------------------------------------------------------------------- SMTP sink


@dataclass
class Received:
    """One message accepted by the sink; queue_id is excluded from equality."""

    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    queue_id: str = field(default="", compare=False)


class SmtpSink:
    """aiosmtpd handler recording accepted mail, with thread-safe scripted failures.

    pipelining=True adds PIPELINING (RFC 2920) to the EHLO reply; aiosmtpd reads
    commands one line at a time from a buffer, so it serves pipelined clients as is.
    """

    def __init__(self, pipelining: bool = False) -> None:
        """Start with no messages, no sessions and no scripted behaviour."""
        self.pipelining = pipelining
        self.wire: list[tuple[str, bytes]] | None = None
        self._open: set[SMTP] = set()
        self.messages: list[Received] = []
        self.connections = 0
        self.data_attempts = 0
        self._lock = threading.Lock()
        self._data_script: list[str | None] = []
        self._rcpt_replies: dict[str, str] = {}
        self._drops = 0

    def script_data(self, replies: list[str | None]) -> None:
        """Replace the DATA reply script: str = reply verbatim, None = accept."""
        with self._lock:
            self._data_script = list(replies)

    def refuse_rcpt(self, mapping: dict[str, str]) -> None:
        """Replace per-recipient RCPT replies (address -> full reply line)."""
        with self._lock:
            self._rcpt_replies = {k.lower(): v for k, v in mapping.items()}

    def drop_next(self, n: int = 1) -> None:
        """Make the next n DATA transactions close the connection without a reply."""
        with self._lock:
            self._drops = n

    def record_wire(self) -> None:
        """From now on log ("client", bytes received) / ("server", reply) in wire order."""
        with self._lock:
            self.wire = []

    def log_wire(self, direction: str, data: bytes) -> None:
        """Append one wire event if recording (called by SinkSMTP on the server loop)."""
        with self._lock:
            if self.wire is not None:
                self.wire.append((direction, data))

    def opened(self, server: SMTP) -> None:
        """Track a live connection (called by SinkSMTP.connection_made)."""
        with self._lock:
            self._open.add(server)

    def closed(self, server: SMTP) -> None:
        """Forget a connection (called by SinkSMTP.connection_lost)."""
        with self._lock:
            self._open.discard(server)

    def hang_up(self, notice: str | None = None, timeout: float = 5) -> int:
        """Close every open connection, first writing notice (e.g. a 421) if given.

        Like a relay ending idle sessions (Postfix: "421 4.4.2 ... timeout exceeded").
        Returns how many connections were closed.
        """
        with self._lock:
            servers = list(self._open)
        for server in servers:
            asyncio.run_coroutine_threadsafe(_hang_up(server, notice), server.loop).result(
                timeout
            )
        deadline = time.monotonic() + timeout
        while any(server in self._open for server in servers):
            assert time.monotonic() < deadline, "connections still open after hang_up()"
            time.sleep(0.01)
        return len(servers)

    def _count_session(self, server: SMTP) -> None:
        """Count each SMTP connection once, at its first HELO/EHLO."""
        with self._lock:
            if not getattr(server, "_sink_counted", False):
                server._sink_counted = True  # type: ignore[attr-defined]
                self.connections += 1

    def _next_data_action(self) -> object:
        """Pop the next DATA action: _DROP, a reply string, or None (accept)."""
        with self._lock:
            self.data_attempts += 1
            if self._drops > 0:
                self._drops -= 1
                return _DROP
            return self._data_script.pop(0) if self._data_script else None

    def _record(self, envelope: Envelope) -> str:
        """Store the envelope as a Received and return its queue id."""
        raw = envelope.original_content or envelope.content or b""
        data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogateescape")
        queue_id = secrets.token_hex(5).upper()
        received = Received(
            envelope.mail_from or "", list(envelope.rcpt_tos), data, queue_id
        )
        with self._lock:
            self.messages.append(received)
        return queue_id

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """Count the session; keep aiosmtpd's EHLO lines, plus PIPELINING if enabled."""
        self._count_session(server)
        session.host_name = hostname
        if self.pipelining:  # aiosmtpd pushes the returned list; the last is "250 HELP"
            return [*responses[:-1], "250-PIPELINING", responses[-1]]
        return responses

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str
    ) -> str:
        """Count the session and greet like aiosmtpd's default HELO."""
        self._count_session(server)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        options: list[str],
    ) -> str:
        """Return the scripted refusal for address, else accept it."""
        with self._lock:
            refusal = self._rcpt_replies.get(address.lower())
        if refusal is not None:
            return refusal
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(
        self, server: SMTP, session: Session, envelope: Envelope
    ) -> str:
        """Drop, reply as scripted, or record and answer 250 with a queue id."""
        action = self._next_data_action()
        if action is _DROP:
            assert server.transport is not None
            server.transport.abort()
            await asyncio.sleep(3600)  # cancelled by connection_lost; never replies
        if isinstance(action, str):
            return action
        return f"250 2.0.0 Ok: queued as {self._record(envelope)}"


async def _hang_up(server: SMTP, notice: str | None) -> None:
    """On the server's loop: write notice (if any) and close the connection."""
    transport = server.transport
    if transport is None:
        return
    if notice is not None:
        server.event_handler.log_wire("server", notice.encode())
        transport.write(notice.encode() + b"\r\n")
    transport.close()


class SinkSMTP(SMTP):
    """aiosmtpd SMTP protocol reporting to its SmtpSink: open connections, wire traffic."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Register with the sink (again after STARTTLS: a set), then set up as usual."""
        super().connection_made(transport)
        self.event_handler.opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        """Unregister from the sink, then clean up as usual."""
        self.event_handler.closed(self)
        super().connection_lost(error)

    def data_received(self, data: bytes) -> None:
        """Log a chunk as it arrives (before aiosmtpd parses it), then feed it on."""
        self.event_handler.log_wire("client", bytes(data))
        super().data_received(data)

    async def push(self, status: str | bytes) -> None:
        """Log a reply line as it is sent."""
        line = status.encode("utf-8") if isinstance(status, str) else bytes(status)
        self.event_handler.log_wire("server", line)
        await super().push(status)


class _ImplicitTlsSMTP(SinkSMTP):
    """SMTP for an all-TLS (smtps) listener: AUTH allowed without STARTTLS."""

    def __init__(self, handler: Any, **kwargs: Any) -> None:
        """Build with auth_require_tls=True (no warning), then relax it."""
        super().__init__(handler, **kwargs)
        # aiosmtpd only counts STARTTLS as TLS; here the socket itself is TLS.
        self._auth_require_tls = False


class _BoundController(Controller):
    """aiosmtpd Controller serving on a socket the caller already bound."""

    def __init__(
        self, handler: Any, sock: socket.socket, smtp_class: type[SMTP], **kwargs: Any
    ) -> None:
        """Serve handler on sock with smtp_class; kwargs go to Controller/SMTP."""
        host, port = sock.getsockname()[:2]
        super().__init__(handler, hostname=host, port=port, **kwargs)
        self._sock = sock
        self._smtp_class = smtp_class

    def factory(self) -> SMTP:
        """Create the per-connection SMTP protocol."""
        return self._smtp_class(self.handler, **self.SMTP_kwargs)

    def _create_server(self) -> Any:
        """Listen on the pre-bound socket instead of binding host:port again."""
        return self.loop.create_server(
            self._factory_invoker, sock=self._sock, ssl=self.ssl_context
        )


class SmtpServer:
    """Restartable aiosmtpd server on a fixed 127.0.0.1 port sharing one SmtpSink."""

    def __init__(
        self,
        scheme: str,
        options: dict[str, Any] | None = None,
        ca_file: Path | None = None,
        credentials: tuple[str, str] | None = None,
        smtp_class: type[SMTP] = SinkSMTP,
        pipelining: bool = False,
    ) -> None:
        """Bind a free port now; options are extra Controller/SMTP kwargs."""
        self.host = LOCALHOST
        self.scheme = scheme
        self.sink = SmtpSink(pipelining)
        self.ca_file = ca_file
        self.username, self.password = credentials or (None, None)
        self._options = options or {}
        self._smtp_class = smtp_class
        self._sock: socket.socket | None = bind_socket()
        self.port = int(self._sock.getsockname()[1])
        self._controller: _BoundController | None = None

    @property
    def url(self) -> str:
        """Connection URL, with credentials when the server requires AUTH."""
        auth = f"{self.username}:{self.password}@" if self.username else ""
        return f"{self.scheme}://{auth}{self.host}:{self.port}"

    @property
    def messages(self) -> list[Received]:
        """The sink's live list of accepted messages."""
        return self.sink.messages

    @property
    def connections(self) -> int:
        """Number of SMTP sessions (HELO/EHLO'd connections) seen so far."""
        return self.sink.connections

    @property
    def running(self) -> bool:
        """True while the server accepts connections."""
        return self._controller is not None

    def start(self) -> None:
        """Start (or restart) serving on the same port; no-op if running."""
        if self._controller is not None:
            return
        sock = self._sock or bind_socket(self.port)
        self._sock = None
        controller = _BoundController(
            self.sink,
            sock,
            self._smtp_class,
            ready_timeout=10,
            server_hostname="localhost",
            data_size_limit=MAX_MESSAGE_BYTES,
            **self._options,
        )
        controller.start()
        self._controller = controller

    def stop(self) -> None:
        """Stop serving and free the port; idempotent."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def wait_for(self, n: int, timeout: float = 60) -> list[Received]:
        """Return a copy of messages once at least n arrived, else AssertionError."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < n:
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"SMTP sink on port {self.port}: expected >= {n} message(s) within "
                    f"{timeout}s, got {len(self.messages)} "
                    f"(DATA attempts: {self.sink.data_attempts})"
                )
            time.sleep(0.02)
        return list(self.messages)


def _serve(server: SmtpServer) -> Iterator[SmtpServer]:
    """Start server, yield it, and always stop it."""
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    """Plain SMTP sink, no TLS/AUTH; url smtp+plain://127.0.0.1:PORT."""
    yield from _serve(SmtpServer("smtp+plain"))


@pytest.fixture
def pipelining_smtp_server() -> Iterator[SmtpServer]:
    """Like smtp_server, but EHLO advertises PIPELINING (RFC 2920)."""
    yield from _serve(SmtpServer("smtp+plain", pipelining=True))


@pytest.fixture(params=["lockstep", "pipelining"])
def any_smtp_server(request: pytest.FixtureRequest) -> Iterator[SmtpServer]:
    """smtp_server, then pipelining_smtp_server: each test runs against both."""
    yield from _serve(SmtpServer("smtp+plain", pipelining=request.param == "pipelining"))


# --------------------------------------------------------------------------- TLS


@dataclass(frozen=True)
class TlsCert:
    """Self-signed cert for localhost/127.0.0.1; ca_file is the cert PEM itself."""

    cert_file: Path
    key_file: Path

    @property
    def ca_file(self) -> Path:
        """PEM to trust via ssl.create_default_context(cafile=...)."""
        return self.cert_file


def _cert_extensions(key: ec.EllipticCurvePrivateKey) -> list[tuple[Any, bool]]:
    """Return (extension, critical) pairs for a self-signed localhost server cert."""
    public = key.public_key()
    usage = x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    san = x509.SubjectAlternativeName(
        [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(LOCALHOST))]
    )
    return [
        (san, False),
        (x509.BasicConstraints(ca=True, path_length=None), True),
        (usage, True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.SubjectKeyIdentifier.from_public_key(public), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(public), False),
    ]


def make_self_signed_cert(directory: Path) -> TlsCert:
    """Write cert.pem/key.pem for CN=localhost + SAN IP 127.0.0.1 into directory."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
    )
    for extension, critical in _cert_extensions(key):
        builder = builder.add_extension(extension, critical=critical)
    cert = builder.sign(key, hashes.SHA256())
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(_pkcs8_pem(key).encode())
    return TlsCert(cert_file, key_file)


def server_ssl_context(cert: TlsCert) -> ssl.SSLContext:
    """Return a server-side SSLContext loaded with cert."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert.cert_file, cert.key_file)
    return context


def _authenticate(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    """Accept only mailer / s3cret-pass; anything else gets aiosmtpd's 535."""
    ok = isinstance(auth_data, LoginPassword) and auth_data == LoginPassword(
        SMTP_USER.encode(), SMTP_PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@pytest.fixture(scope="session")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> TlsCert:
    """Session-wide self-signed certificate for localhost / 127.0.0.1."""
    return make_self_signed_cert(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_smtp_server(tls_cert: TlsCert) -> Iterator[SmtpServer]:
    """SMTP sink requiring STARTTLS then AUTH PLAIN/LOGIN (mailer/s3cret-pass)."""
    options = {
        "tls_context": server_ssl_context(tls_cert),
        "require_starttls": True,
        "auth_require_tls": True,
        "auth_required": True,
        "authenticator": _authenticate,
    }
    creds = (SMTP_USER, SMTP_PASSWORD)
    yield from _serve(SmtpServer("smtp", options, tls_cert.ca_file, creds))


@pytest.fixture
def smtps_server(tls_cert: TlsCert) -> Iterator[SmtpServer]:
    """Implicit-TLS SMTP sink requiring AUTH PLAIN/LOGIN (mailer/s3cret-pass)."""
    options = {
        "ssl_context": server_ssl_context(tls_cert),
        "auth_required": True,
        "authenticator": _authenticate,
    }
    creds = (SMTP_USER, SMTP_PASSWORD)
    server = SmtpServer("smtps", options, tls_cert.ca_file, creds, _ImplicitTlsSMTP)
    yield from _serve(server)


# --------------------------------------------------------------------------- DKIM keys


@dataclass(frozen=True)
class RsaKey:
    """RSA private key as PKCS#8/PKCS#1 PEM plus its DKIM TXT record."""

    pem: str
    pem_pkcs1: str
    dns_record: bytes
    bits: int


@dataclass(frozen=True)
class Ed25519Key:
    """Ed25519 key as base64 raw seed / PKCS#8 PEM plus its DKIM TXT record."""

    seed_b64: str
    pem: str
    dns_record: bytes
    public_b64: str


def _pkcs8_pem(key: Any) -> str:
    """Serialize a private key as unencrypted PKCS#8 PEM."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def make_rsa_key(bits: int = 2048) -> RsaKey:
    """Generate an RSA key of the given size."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pkcs1 = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(spki)
    return RsaKey(_pkcs8_pem(key), pkcs1, record, bits)


def make_ed25519_key() -> Ed25519Key:
    """Generate an Ed25519 key."""
    key = ed25519.Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    seed = key.private_bytes(
        raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    public = base64.b64encode(
        key.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    )
    record = b"v=DKIM1; k=ed25519; p=" + public
    return Ed25519Key(
        base64.b64encode(seed).decode(), _pkcs8_pem(key), record, public.decode()
    )


@pytest.fixture(scope="session")
def rsa_key() -> RsaKey:
    """Session-wide 2048-bit RSA DKIM key."""
    return make_rsa_key(2048)


@pytest.fixture(scope="session")
def small_rsa_key() -> RsaKey:
    """Session-wide 1024-bit RSA key, for too-weak-key rejection tests."""
    return make_rsa_key(1024)


@pytest.fixture(scope="session")
def ed25519_key() -> Ed25519Key:
    """Session-wide Ed25519 DKIM key."""
    return make_ed25519_key()


def _dns_key(name: str | bytes) -> str:
    """Normalise a DNS name: str, lower-case, no trailing dot."""
    text = name.decode("ascii") if isinstance(name, bytes) else name
    return text.rstrip(".").lower()


def dkim_dns(
    records: Mapping[str, bytes] | Mapping[bytes, bytes],
) -> Callable[..., bytes]:
    """Return a dkimpy dnsfunc(name, timeout=5): records[name], else b""."""
    table = {
        _dns_key(name): value.encode() if isinstance(value, str) else value
        for name, value in records.items()
    }

    def dnsfunc(name: str | bytes, timeout: float = 5) -> bytes:
        """Look name up in the static table."""
        return table.get(_dns_key(name), b"")

    return dnsfunc


# --------------------------------------------------------------------------- Redis


class RedisServer:
    """A redis-server subprocess on a fixed 127.0.0.1 port, restartable."""

    def __init__(self, workdir: Path, binary: Path = REDIS_SERVER) -> None:
        """Prepare (but do not start) a server running in workdir."""
        self.host = LOCALHOST
        self.port = free_port()
        self.workdir = workdir
        self.binary = binary
        self.log_file = workdir / "redis.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """redis:// URL for database 0."""
        return f"redis://{self.host}:{self.port}/0"

    def _command(self) -> list[str]:
        """Return the redis-server argv (no persistence, loopback only)."""
        return [
            str(self.binary),
            "--port",
            str(self.port),
            "--bind",
            self.host,
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.workdir),
            "--logfile",
            str(self.log_file),
        ]

    def _pings(self) -> bool:
        """True if the server answers PING right now."""
        client = redis.Redis(host=self.host, port=self.port, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def _wait_ready(self, timeout: float) -> None:
        """Block until PING answers; raise RuntimeError if it dies or times out."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not self._pings():
            if self.process.poll() is not None or time.monotonic() >= deadline:
                log = (
                    self.log_file.read_text(errors="replace")[-2000:]
                    if self.log_file.exists()
                    else ""
                )
                self.stop()
                raise RuntimeError(
                    f"redis-server on port {self.port} not ready:\n{log}"
                )
            time.sleep(0.02)

    def start(self, timeout: float = 10) -> None:
        """Start (or restart) on the same port; no-op if running."""
        if self.process is not None and self.process.poll() is None:
            return
        self.process = subprocess.Popen(
            self._command(),
            cwd=self.workdir,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._wait_ready(timeout)

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 10 s); idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            stop_process(process)


def _redis_binary() -> Path:
    """Return the redis-server path, skipping the test only if none is installed."""
    if REDIS_SERVER.exists():
        return REDIS_SERVER
    found = shutil.which("redis-server")
    if found:
        return Path(found)
    pytest.skip(f"redis-server not installed ({REDIS_SERVER} missing, not on PATH)")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """Fresh redis-server on a free loopback port; always killed at teardown."""
    binary = _redis_binary()
    server = RedisServer(tmp_path, binary)
    try:
        _first_start(server)
        yield server
    finally:
        server.stop()


def _first_start(server: RedisServer, attempts: int = 3) -> None:
    """Start server, moving to another free port if the chosen one was taken."""
    for attempt in range(attempts):
        try:
            server.start()
            return
        except RuntimeError:
            if attempt == attempts - 1:
                raise
            server.port = free_port()


# --------------------------------------------------------------------------- CLI


# mutmut selects a mutant by this variable; a subprocess must see it to run the same mutant
# (only a mutant's name: its other values, such as "stats", need mutmut's own process)
MUTANT = {k: v for k, v in os.environ.items() if k == "MUTANT_UNDER_TEST" and "__mutmut_" in v}


def run_python(
    script: Path,
    args: list[str],
    env: dict[str, str],
    input: str | None = None,
    timeout: float = 60,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run script with this Python; env = PATH, PYTHONDONTWRITEBYTECODE=1, **env (and the
    mutant under test, in a mutation run: tools/mutation.py)."""
    full_env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", **MUTANT, **env}
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=full_env,
        input=input,
        timeout=timeout,
        cwd=cwd,
        capture_output=True,
        text=True,
        check=False,
    )


def run_cli(
    args: list[str],
    env: dict[str, str],
    input: str | None = None,
    timeout: float = 60,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run sysmail.py with args and a minimal environment (see run_python)."""
    return run_python(REPO / "sysmail.py", args, env, input, timeout, cwd)


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """The run_cli function, as a fixture."""
    return run_cli


class FakeClock:
    """A wall clock that only moves when told to (sysmail takes its clock as an argument)."""

    def __init__(self, start: float | None = None) -> None:
        """Start at start, or at a whole second near the real time."""
        self.now = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        """Return the current fake time."""
        return self.now

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        self.now += seconds


def stop_process(process: subprocess.Popen) -> None:
    """SIGTERM a subprocess and wait for it; SIGKILL after 10 s."""
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def enqueue_many(spool: Path, count: int, domain: str = "example.com") -> list[str]:
    """Queue count ad-hoc mails through the embedding API, eight threads sharing one Mailer
    as in a web application (their fsyncs overlap); return their Message-IDs."""
    import sysmail  # the fixtures above do not need the module under test; this helper does

    mailer = sysmail.Mailer(sysmail.Config.from_env({"SYSTEM_DOMAIN": domain,
                                                     "SYSMAIL_SPOOL": str(spool)}))

    def enqueue(i: int) -> str:
        return mailer.enqueue_message(f"user{i}@example.org", f"Notice {i}", f"Body {i}\n")

    with ThreadPoolExecutor(8) as pool:
        message_ids = list(pool.map(enqueue, range(count)))
    assert len(set(message_ids)) == count
    return message_ids


# --------------------------------------------------------------------------- quiescence
#
# "Nothing else arrived" is shown by waiting for a state in which nothing more can arrive,
# never by a fixed sleep followed by a count: a sleep proves nothing on a busy machine.


def open_sessions(server: SmtpServer) -> int:
    """How many SMTP connections the sink holds open right now."""
    sink = server.sink
    with sink._lock:
        return len(sink._open)


def wait_relay_idle(server: SmtpServer, timeout: float = 30) -> int:
    """Wait until the sink has no open connection; return how many messages it holds then.

    aiosmtpd records a message before it answers the end of DATA, on its own thread, and a
    connection that has ended records nothing more. So once the clients that could send are
    gone (killed, stopped) and the sink has seen each of their connections end, this count is
    final; read right after a SIGKILL instead, it races the sink still reading the last DATA.
    (A connection the sink has not accepted yet cannot hold a message: the client waits for
    the greeting, sent only once it is accepted.)
    """
    deadline = time.monotonic() + timeout
    while open_sessions(server):
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"SMTP sink on port {server.port}: {open_sessions(server)} connection(s) "
                f"still open after {timeout}s"
            )
        time.sleep(0.01)
    return len(server.messages)


def spool_pending(spool_dir: str | os.PathLike[str]) -> list[str]:
    """The entries of the spool's new/ and cur/ ("new/NAME", ...); a missing folder is empty."""
    pending = []
    for state in ("new", "cur"):
        try:
            pending += [f"{state}/{name}" for name in sorted(os.listdir(Path(spool_dir) / state))]
        except (FileNotFoundError, NotADirectoryError):
            pass
    return pending


def wait_quiescent(
    spool_dir: str | os.PathLike[str] | None,
    smtp_server: SmtpServer,
    idle_seconds: float = 0.5,
    timeout: float = 60,
    predicate: Callable[[], bool] | None = None,
) -> list[Received]:
    """Wait until the queue is settled and the relay idle; return a copy of the messages.

    Quiescent means, without a break for idle_seconds: predicate() holds (without one: the
    spool's new/ and cur/ are empty; spool_dir None: no queue check), the sink has no open
    connection, and it has seen no new connection, DATA attempt or message. Stop the senders
    that keep idle SMTP connections open (a worker, Mailer.stop(), App.stop()) before calling:
    then nothing more can arrive, and a count taken now is the final one.
    AssertionError, naming what is still going on, when that does not happen within timeout.
    """
    started = time.monotonic()
    quiet_since = started
    last: tuple[int, ...] | None = None
    while True:
        now = time.monotonic()
        if predicate is not None:
            settled = bool(predicate())
        else:
            settled = spool_dir is None or not spool_pending(spool_dir)
        sink = smtp_server.sink
        activity = (len(sink.messages), sink.data_attempts, sink.connections,
                    open_sessions(smtp_server))
        if not settled or activity[3] or activity != last:
            last, quiet_since = activity, now
        elif now - quiet_since >= idle_seconds:
            return list(sink.messages)
        if now - started >= timeout:
            queue = ("predicate false" if predicate is not None and not settled else
                     f"spool pending {spool_pending(spool_dir)[:10]}" if spool_dir else "")
            raise AssertionError(
                f"not quiescent within {timeout}s: {queue}; sink: {activity[0]} message(s), "
                f"{activity[1]} DATA attempt(s), {activity[2]} session(s), "
                f"{activity[3]} connection(s) open"
            )
        time.sleep(0.01)


# --------------------------------------------------------------------------- server-side TCP


def _tcp_table_row(client: socket.socket, server_end: bool = True) -> tuple[int, int, int] | None:
    """(bytes queued to send, bytes not read yet, socket inode) of one end of client's TCP
    connection, from /proc/net/tcp(6): the server's end, or client's own. The server's inode is
    0 while the connection waits in the accept queue. None when the kernel lists no such socket
    (not yet, or no longer: closed or reset)."""
    ours = client.getsockname()[:2]
    theirs = client.getpeername()[:2]
    (here_host, here_port), (there_host, there_port) = (
        (theirs, ours) if server_end else (ours, theirs))
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            (here, port), (there, peer_port) = (
                _proc_address(fields[1]), _proc_address(fields[2]))
            if (port, peer_port) != (here_port, there_port):
                continue
            if _same_host(here, here_host) and _same_host(there, there_host):
                tx_queue, rx_queue = (int(n, 16) for n in fields[4].split(":"))
                return tx_queue, rx_queue, int(fields[9])
    return None


def _proc_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """Decode /proc/net/tcp's ADDR:PORT (the address as 32-bit words in host order)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    packed = b"".join(
        int.from_bytes(raw[i : i + 4], "big").to_bytes(4, sys.byteorder)
        for i in range(0, len(raw), 4)
    )
    return ipaddress.ip_address(packed), int(port, 16)


def _same_host(listed: ipaddress.IPv4Address | ipaddress.IPv6Address, host: str) -> bool:
    wanted = ipaddress.ip_address(host)
    if isinstance(listed, ipaddress.IPv6Address) and listed.ipv4_mapped is not None:
        listed = listed.ipv4_mapped
    return listed == wanted


def wait_server_read(client: socket.socket, timeout: float = 30) -> int:
    """Wait until the server has accepted client's connection and read every byte sent on it
    so far; return the inode of the server's socket (see wait_socket_released).

    The proof that a handler is at work on the connection, from the kernel's own table
    (Linux), instead of a sleep that guesses how long the server takes on this machine.
    """
    deadline = time.monotonic() + timeout
    while True:
        # our end: every byte acknowledged, so it is in the server's socket (or read already);
        # the server's end: accepted (it has an inode) and nothing left unread
        sent = _tcp_table_row(client, server_end=False)
        row = _tcp_table_row(client)
        if sent is not None and sent[0] == 0 and row is not None and row[2] and not row[1]:
            return row[2]
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"the server did not accept and read the connection within {timeout}s "
                f"(client (unacked, unread, inode): {sent}; server: {row})"
            )
        time.sleep(0.005)


def wait_socket_released(inode: int, pid: int | None = None, timeout: float = 30) -> None:
    """Wait until process pid (default: this one) holds no file descriptor for the socket
    with that inode: the server has finished with the connection and closed it."""
    fd_dir = Path(f"/proc/{pid or os.getpid()}/fd")
    target = f"socket:[{inode}]"

    def held() -> bool:
        for fd in os.listdir(fd_dir):
            try:
                if os.readlink(fd_dir / fd) == target:
                    return True
            except OSError:
                continue
        return False

    deadline = time.monotonic() + timeout
    while held():
        if time.monotonic() >= deadline:
            raise AssertionError(f"socket {inode} still open in {fd_dir} after {timeout}s")
        time.sleep(0.01)


@pytest.fixture
def small_mount(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount real tmpfs file systems of a given size (root only; skipped elsewhere)."""
    mounted: list[Path] = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                              capture_output=True, text=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)
