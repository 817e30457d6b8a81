"""Fuzzing the HTTP service over raw sockets (issue 3), and slow or oversized clients.

About 1,200 malformed requests, built deterministically from random.Random(SEED) plus
hand-written nasty cases, go to a real server on a loopback port over raw sockets, so every
byte is under the test's control. Each one must get a complete answer with a status line:
2xx, or 4xx with a JSON {"error": ...} body (an HTML page only from /reset-password), always
with Cache-Control: no-store, never a 5xx, never a connection dropped without an answer.

The corpus is split into families; some target one class of input that once broke the
server (deep JSON, lone surrogates, reserved variable names, malformed authorities, empty
lines before the request line, ...), so each stays guarded by name.
"""

from __future__ import annotations

import json
import random
import re
import socket
import string
import struct
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import wait_server_read

import sysmail

API_KEY = "k" * 32
SEED = 20_261_127
LOCALHOST = "127.0.0.1"
KNOWN_EMAIL = "ada@example.com"
OTHER_EMAIL = "grace@example.com"
FORGOT = b"/v1/auth/forgot-password"
RESET = b"/v1/auth/reset-password"
PAGE = b"/reset-password"
EMAILS = b"/v1/emails"
ROUTES: dict[bytes, tuple[bytes, ...]] = {  # path -> the methods it answers
    FORGOT: (b"POST",),
    RESET: (b"POST",),
    PAGE: (b"GET", b"POST"),
    EMAILS: (b"POST",),
    b"/healthz": (b"GET",),
    b"/readyz": (b"GET",),
}
UNKNOWN_PATHS = (b"/", b"/metrics", b"/nope", b"/v1", b"/v1/auth", b"/healthz/", b"/HEALTHZ", b"/v2/emails")
ALL_PATHS = (*ROUTES, *UNKNOWN_PATHS)
STANDARD_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"HEAD",
                    b"TRACE", b"CONNECT")
JSON_TYPE = "application/json"
HTML_TYPE = "text/html; charset=utf-8"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TEMPLATES = ("password-reset", "email-verification", "two-factor-code", "security-alert",
             "billing-notification", "service-announcement", "account-suspension")
TEMPLATE_VARS = ("reset_url", "expires_minutes", "name", "verify_url", "code", "event", "ip",
                 "time", "summary", "amount", "due_date", "billing_url", "title", "body",
                 "reason", "appeal_url")
# Nasty characters for JSON string values. Lone surrogates, "[" / "]" and NFKC-unsafe forms
# in URLs and non-ASCII "digits" have families of their own ("surrogate-vars", "bad-url-var",
# "non-ascii-digit").
_SAFE_CHARS = (string.ascii_letters + string.digits + string.punctuation.replace("[", "")
               .replace("]", "") + " \t\x0b\x0c\x1c\x7f\x85\xa0\u2028\u2029\ufeff\u00e9\u00df"
               "\u4e2d\u0627\U0001f600\U0010fffd<>&\"'$%{}")
SLOW_MARGIN_SECONDS = 2.5
RESERVED_VARS = ("to", "template")  # Mailer.enqueue's own parameters ("reserved-vars")


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    """The running app, its SQLite store, and reset tokens saved for the corpus to use."""

    app: sysmail.App
    port: int
    tokens: dict[str, str] = field(default_factory=dict)


def make_config(tmp: Path) -> sysmail.Config:
    """A loopback service with an outbox relay, an API key and rate limits out of the way."""
    return sysmail.Config.from_env({
        "SYSMAIL_LISTEN": f"{LOCALHOST}:0",
        "SYSMAIL_METRICS_LISTEN": f"{LOCALHOST}:0",
        "SYSTEM_DOMAIN": "example.com",
        "SYSMAIL_SPOOL": str(tmp / "spool"),
        "SYSMAIL_OUTBOX": str(tmp / "outbox"),
        "SYSMAIL_DB": str(tmp / "db.sqlite"),
        "SYSMAIL_API_KEY": API_KEY,
        "SYSMAIL_FORGOT_LIMIT_PER_CLIENT": "100000/60",
        "SYSMAIL_FORGOT_LIMIT_PER_ADDRESS": "100000/60",
        "SYSMAIL_RESET_LIMIT_PER_CLIENT": "100000/60",
    })


def save_token(store: sysmail.SqliteStore, user: sysmail.User, token: str) -> None:
    """Store a reset token the way the app does: only its hash, valid for an hour."""
    now = time.time()
    store.save_token(sysmail.token_hash(token), user, sysmail.RESET_PURPOSE, now, now + 3600)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One real server (SQLite store) for the whole module, with two users and saved tokens."""
    app = sysmail.build_app(make_config(tmp_path_factory.mktemp("fuzz")))
    store = app.store
    assert isinstance(store, sysmail.SqliteStore)
    ada = store.add_user(KNOWN_EMAIL, "Ada")
    grace = store.add_user(OTHER_EMAIL, "Grace")
    tokens = {"json": "J" * 43, "form": "F" * 43, "surrogate": "S" * 43}
    save_token(store, ada, tokens["json"])
    save_token(store, grace, tokens["form"])
    app.start()
    try:
        yield Service(app, int(app.url.rsplit(":", 1)[1]), tokens)
    finally:
        app.stop()


# --------------------------------------------------------------------------- raw HTTP


@dataclass(frozen=True)
class Reply:
    """What came back on one connection, parsed as far as it goes."""

    raw: bytes
    status: int | None
    headers: dict[str, list[str]]
    body: bytes
    socket_errors: tuple[str, ...]
    seconds: float

    def header(self, name: str) -> str | None:
        """The single value of a header, None when absent (a repeated header is a failure)."""
        values = self.headers.get(name.lower(), [])
        assert len(values) <= 1, f"header {name} repeated: {values}"
        return values[0] if values else None


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")


def parse_reply(raw: bytes, socket_errors: tuple[str, ...], seconds: float) -> Reply:
    """Split a raw answer into status, headers and body; status None without a status line."""
    match = _STATUS_LINE.match(raw)
    head, separator, body = raw.partition(b"\r\n\r\n")
    if match is None or not separator:
        return Reply(raw, None, {}, b"", socket_errors, seconds)
    headers: dict[str, list[str]] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return Reply(raw, int(match.group(1)), headers, body, socket_errors, seconds)


def exchange(port: int, raw: bytes, *, half_close: bool = True, timeout: float = 15.0) -> Reply:
    """Send raw bytes on a new connection, optionally half-close, read until the server closes.

    A send error is recorded, not raised: the server may answer (413, 431) and close before
    it has read everything, and the answer must still be there to read.
    """
    started = time.monotonic()
    errors: list[str] = []
    chunks: list[bytes] = []
    with socket.create_connection((LOCALHOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(raw)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"send: {exc!r}")
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError as exc:
                errors.append(f"recv: {exc!r}")
                break
            if not chunk:
                break
            chunks.append(chunk)
    return parse_reply(b"".join(chunks), tuple(errors), time.monotonic() - started)


def build(method: bytes, target: bytes, *, body: bytes | None = None,
          headers: list[tuple[bytes, bytes]] | None = None, version: bytes = b"HTTP/1.1",
          content_type: bytes | None = b"application/json", length: bytes | None = None,
          eol: bytes = b"\r\n") -> bytes:
    """Assemble a request; Host and, with a body, Content-Type and Content-Length by default."""
    lines = [b" ".join(part for part in (method, target, version) if part)]
    given = headers if headers is not None else [(b"Host", b"127.0.0.1")]
    lines += [name + b": " + value for name, value in given]
    if body is not None and content_type is not None:
        lines.append(b"Content-Type: " + content_type)
    if length is not None or body is not None:
        lines.append(b"Content-Length: " + (length if length is not None else b"%d" % len(body)))
    return eol.join(lines) + eol + eol + (body or b"")


def bearer() -> tuple[bytes, bytes]:
    """The Authorization header holding the configured API key."""
    return (b"Authorization", b"Bearer " + API_KEY.encode())


# --------------------------------------------------------------------------- cases and checks


@dataclass(frozen=True)
class Case:
    """One fuzz request: its label, bytes, and (when the test knows it) the exact status."""

    label: str
    raw: bytes
    expect: int | None = None

    @property
    def request_line(self) -> bytes:
        """The first line as the server's readline() sees it (up to the first LF)."""
        return self.raw.split(b"\n", 1)[0]

    @property
    def head(self) -> bool:
        """True for a HEAD request, whose answer carries no body."""
        return self.request_line.split(b" ", 1)[0] == b"HEAD"

    @property
    def route(self) -> str:
        """The path the server routes on: the target's path, a leading // made one /."""
        words = self.request_line.decode("latin-1").split()
        if len(words) < 2:
            return ""
        target = words[1]
        if target.startswith("//"):
            target = "/" + target.lstrip("/")
        try:
            return urllib.parse.urlsplit(target).path
        except ValueError:
            return ""


def problems_with(case: Case, reply: Reply) -> list[str]:
    """Everything wrong with one answer, as readable sentences (empty when it is fine)."""
    if reply.status is None:
        return [(f"no status line: got {len(reply.raw)} bytes {reply.raw[:120]!r} "
                f"(socket: {', '.join(reply.socket_errors) or 'closed cleanly'})")]
    problems = []
    status, body = reply.status, reply.body
    if not (200 <= status < 300 or 400 <= status < 500):
        problems.append(f"status {status}: {body[:200]!r}")
    if case.expect is not None and status != case.expect:
        problems.append(f"status {status}, expected {case.expect}: {body[:200]!r}")
    if reply.header("Cache-Control") != "no-store":
        problems.append(f"Cache-Control is {reply.header('Cache-Control')!r}")
    if reply.header("Content-Length") != str(len(body)) and not case.head:
        problems.append(f"Content-Length {reply.header('Content-Length')} for {len(body)} bytes")
    if case.head:
        if body:
            problems.append(f"a body in a HEAD answer: {body[:80]!r}")
        return problems
    content_type = reply.header("Content-Type")
    allowed = {JSON_TYPE} | ({HTML_TYPE} if case.route == "/reset-password" else set())
    if 200 <= status < 300 and case.route == "/metrics":
        allowed.add(METRICS_TYPE)
    if content_type not in allowed:
        problems.append(f"Content-Type {content_type!r} for status {status}")
    elif content_type == JSON_TYPE:
        problems += _json_problems(status, body)
    elif content_type == HTML_TYPE and b"<script" in body.lower():
        problems.append("a <script> in the reset page")
    if b"Traceback" in body:
        problems.append("a traceback in the body")
    return problems


def _json_problems(status: int, body: bytes) -> list[str]:
    try:
        payload = json.loads(body)
    except ValueError:
        return [f"status {status} with a body that is not JSON: {body[:120]!r}"]
    if status >= 400 and not (isinstance(payload, dict) and isinstance(payload.get("error"), str)
                              and payload["error"]):
        return [f"status {status} without an error string: {payload!r:.200}"]
    return []


def run_family(service: Service, cases: list[Case]) -> list[str]:
    """Send every case in order; return one line per case that went wrong."""
    failures = []
    for case in cases:
        reply = exchange(service.port, case.raw)
        failures += [f"{case.label}: {problem}" for problem in problems_with(case, reply)]
    return failures


def assert_healthy(service: Service) -> None:
    """The server still answers GET /healthz with 200 {"status": "ok"} within a second."""
    reply = exchange(service.port, build(b"GET", b"/healthz"), timeout=5)
    assert (reply.status, json.loads(reply.body)) == (200, {"status": "ok"}), reply.raw
    assert reply.seconds < 1.0, f"/healthz took {reply.seconds:.2f}s"


# --------------------------------------------------------------------------- generators


def random_text(rng: random.Random, low: int = 0, high: int = 40) -> str:
    """A string of nasty-but-safe characters (see _SAFE_CHARS)."""
    return "".join(rng.choice(_SAFE_CHARS) for _ in range(rng.randint(low, high)))


def random_json(rng: random.Random, depth: int = 0, keys: tuple[str, ...] = ()) -> object:
    """A random JSON value, at most five levels deep, keys drawn from keys or random text."""
    kind = rng.randrange(9 if depth < 5 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**63, -(2**64), 10**300, rng.randint(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 1e-308, rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return random_text(rng)
    if kind in (6, 7):
        names = keys or ("a",)
        return {(rng.choice(names) if rng.random() < 0.7 else random_text(rng, 0, 8)):
                random_json(rng, depth + 1, keys) for _ in range(rng.randint(0, 5))}
    return [random_json(rng, depth + 1, keys) for _ in range(rng.randint(0, 5))]


def without_reserved_vars(value: object) -> object:
    """Drop "to" and "template" from a payload's "vars" object (see "reserved-vars")."""
    if isinstance(value, dict) and isinstance(value.get("vars"), dict):
        value["vars"] = {k: v for k, v in value["vars"].items() if k not in RESERVED_VARS}
    return value


def random_bytes(rng: random.Random, size: int, exclude: bytes = b"") -> bytes:
    """size random bytes, none of them in exclude."""
    pool = bytes(b for b in range(256) if b not in exclude)
    return bytes(rng.choice(pool) for _ in range(size))


def expected_for(method: bytes, path: bytes) -> int | None:
    """The status a bodiless request must get when routing alone decides it, else None."""
    allowed = ROUTES.get(path)
    if allowed is None:
        return 404
    if method not in allowed:
        return 405
    if method == b"GET" and path in (b"/healthz", b"/readyz"):
        return 200
    return None


def method_cases(rng: random.Random) -> list[Case]:
    """Standard, lower-case, mixed-case, very long and binary methods on every path."""
    cases = []
    for path in ALL_PATHS:
        methods = [*STANDARD_METHODS, b"get", b"post", b"PoSt", b"X" * rng.randint(100, 9000),
                   random_bytes(rng, rng.randint(1, 40), b" \t\r\n\x0b\x0c\x1c\x1d\x1e\x1f\x85\xa0")]
        for method in methods:
            cases.append(Case(f"method {method[:20]!r} {path!r}", build(method, path),
                              expected_for(method, path)))
    # whitespace inside a binary method makes extra words: "Bad request syntax", a 400
    cases.append(Case("method with NUL and tab", build(b"G\x00E\tT", b"/healthz"), 400))
    cases.append(Case("method with vertical tab", build(b"GE\x0bT", b"/healthz"), 400))
    cases.append(Case("method of 70,000 bytes", build(b"A" * 70_000, b"/healthz"), 414))
    return cases


def path_cases(rng: random.Random) -> list[Case]:
    """%00, ../, ~10 KB, unicode, odd forms, query strings (at most 20 fields: see
    "too-many-query-fields"), and only "/"-rooted random targets (see "bad-authority")."""
    token = "t" * 43
    targets: list[tuple[bytes, int | None]] = [
        (b"/healthz%00", 404), (b"/healthz\x00", 404), (b"/%00", 404), (b"/../../etc/passwd", 404),
        (b"/v1/../healthz", 404), (b"/%2e%2e/%2e%2e/etc/passwd", 404), (b"/healthz/..", 404),
        (b"/" + b"a" * 10_000, 404), (b"/healthz?" + b"x" * 10_000, 200),
        ("/ünïcödé/ﬁ/中文/😀".encode(), 404), ("/healthz?q=ünï".encode(), 200),
        (b"/\xff\xfe\x80", 404), (b"/%ff%fe%c0%af", 404), (b"/%", 404), (b"/%zz", 404),
        (b"/healthz#fragment", 200), (b"/healthz?", 200), (b"/healthz??", 200),
        (b"/healthz;param", 404), (b"/healthz\\", 404), (b"\\healthz", 404), (b"*", 404),
        (b"healthz", 404), (b"//healthz", 200), (b"///healthz", 200), (b"/./healthz", 404),
        (b"http://example.com/healthz", 200), (b"https://evil.example/metrics", 404),
        (b"http://127.0.0.1:1/nope", 404), (b"/healthz?token=" + b"A" * 43, 200),
        (b"/metrics?token=secret", 404), (b"/readyz?a=1&a=2&a=3", 200),
        (b"/healthz?" + b"&".join(b"f%d=%d" % (i, i) for i in range(20)), 200),
        (b"/reset-password?token=" + token.encode(), 200),
        (b"/reset-password?token=" + token.encode() + b"&x=1", 200),
        (b"/reset-password?token=short", 400), (b"/reset-password", 400),
        (b"/reset-password?token=", 400), (b"/reset-password?token=%00" + b"a" * 30, 400),
        (b"/reset-password?token=" + b"a" * 129, 400), (b"/reset-password?token=" + b"a" * 128, 200),
        (b"/reset-password?token=<script>alert(1)</script>aaaaaaaaaaaaaaaaaaaa", 400),
        (b"/reset-password?token=%22%3E%3Cscript%3E" + b"a" * 30, 400),
        (b"/reset-password?token=a&token=" + token.encode(), 200),
        (b"/reset-password?token=" + token.encode() + b"&token=bad", 400),
        (b"/reset-password?TOKEN=" + token.encode(), 400),
        (b"/reset-password/?token=" + token.encode(), 404), (b"//reset-password?token=x", 400),
        (b"/reset-password?token=\xff\xfe" + b"a" * 30, 400),
        ("/reset-password?token=é".encode() + b"a" * 30, 400),
    ]
    cases = [Case(f"GET {t[:60]!r}", build(b"GET", t), expect) for t, expect in targets]
    cases += [Case(f"POST {t[:60]!r}", build(b"POST", t, body=b"{}"), None) for t, _ in targets]
    path_bytes = bytes(b for b in range(0x21, 0x100)
                       if b not in b"&\x85\xa0" and not chr(b).isspace())
    for index in range(80):
        segments = [bytes(rng.choice(path_bytes) for _ in range(rng.randint(0, 30)))
                    for _ in range(rng.randint(1, 6))]
        target = rng.choice(ALL_PATHS) if index % 3 == 0 else b"/" + b"/".join(segments)
        fields = [urllib.parse.quote(random_text(rng, 0, 10)) + "=" +
                  urllib.parse.quote(random_text(rng, 0, 30)) for _ in range(rng.randint(0, 20))]
        if fields:
            target += b"?" + "&".join(fields).encode()
        cases.append(Case(f"random path #{index} {target[:40]!r}",
                          build(rng.choice([b"GET", b"POST", b"HEAD"]), target)))
    return cases


def version_cases(rng: random.Random) -> list[Case]:
    """HTTP/1.x spellings that http.server accepts: each must be answered normally."""
    cases = []
    for version in (b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.2", b"HTTP/1.9", b"HTTP/1.10", b"HTTP/01.1",
                    b"HTTP/1.01", b"HTTP/1.0000000001", b"HTTP/0.10", b"HTTP/00.9"):
        for path in (b"/healthz", b"/nope", FORGOT):
            cases.append(Case(f"{version!r} {path!r}", build(b"GET", path, version=version),
                              expected_for(b"GET", path)))
    cases.append(Case("LF-only line endings", build(b"GET", b"/healthz", eol=b"\n"), 200))
    cases.append(Case("spaces in the target", build(b"GET", b"/a b c"), 400))
    cases.append(Case("tabs between words", b"GET\t/healthz\tHTTP/1.1\r\n\r\n", 200))
    cases.append(Case("many spaces between words", b"GET    /healthz    HTTP/1.1\r\n\r\n", 200))
    cases.append(Case("trailing spaces", b"GET /healthz HTTP/1.1   \r\n\r\n", 200))
    cases.append(Case("pipelined requests", build(b"GET", b"/healthz") * 3, 200))
    cases.append(Case("request then garbage", build(b"GET", b"/healthz") + random_bytes(rng, 500),
                      200))
    return cases


def header_cases(rng: random.Random) -> list[Case]:
    """Content-Length and Transfer-Encoding abuse, huge and many headers, odd line endings."""
    good = json.dumps({"email": "nobody@example.com"}).encode()
    host = (b"Host", b"127.0.0.1")
    cases = []
    lengths: list[tuple[bytes, int | None]] = [
        (b"-1", 400), (b"-0", 400), (b"-99999999999999999999", 400), (b"abc", 400), (b"", 400),
        (b"1e3", 400), (b"0x10", 400), (b"\xb2", 400), (b"9" * 40, 413), (b"16385", 413),
        (b"1000000000", 413), (b" %d " % len(good), 202), (b"+%d" % len(good), 400),
        (b"%d" % (len(good) - 1), 400), (b"0", 400), (b"%d" % (len(good) + 50), 202),
        (b"1_0", 400), (b"%d, %d" % (len(good), len(good)), 400),  # RFC 9110: 1*DIGIT
    ]
    for value, expect in lengths:
        raw = build(b"POST", FORGOT, body=good, length=value)
        cases.append(Case(f"Content-Length {value[:20]!r}", raw, expect))
    duplicates = [(b"%d" % len(good), b"%d" % len(good)), (b"%d" % len(good), b"5"),
                  (b"5", b"%d" % len(good)), (b"%d" % len(good), b"-1"), (b"abc", b"%d" % len(good))]
    for first, second in duplicates:
        headers = [host, (b"Content-Type", b"application/json"), (b"Content-Length", first),
                   (b"Content-Length", second)]
        cases.append(Case(f"duplicate Content-Length {first!r} {second!r}",
                          build(b"POST", FORGOT, headers=headers, content_type=None) + good))
    for encoding in (b"chunked", b"gzip, chunked", b"identity", b"CHUNKED", b" chunked"):
        headers = [host, (b"Content-Type", b"application/json"), (b"Transfer-Encoding", encoding)]
        chunked = b"%x\r\n" % len(good) + good + b"\r\n0\r\n\r\n"
        cases.append(Case(f"Transfer-Encoding {encoding!r}",
                          build(b"POST", FORGOT, headers=headers, content_type=None) + chunked, 411))
        headers.append((b"Content-Length", b"%d" % len(chunked)))
        cases.append(Case(f"Transfer-Encoding {encoding!r} and Content-Length",
                          build(b"POST", FORGOT, headers=headers, content_type=None) + chunked, 411))
    for size, expect in ((60_000, 200), (65_600, 431), (200_000, 431)):
        cases.append(Case(f"a header line of {size} bytes",
                          build(b"GET", b"/healthz", headers=[host, (b"X-Big", b"v" * size)]), expect))
        cases.append(Case(f"a header name of {size} bytes",
                          build(b"GET", b"/healthz", headers=[host, (b"N" * size, b"v")]), expect))
    # http.client counts the blank line too: 99 header lines pass, the 100th is too many
    for count, expect in ((99, 200), (100, 431), (101, 431), (200, 431), (5000, 431)):
        many = [host] + [(b"X-H%d" % i, b"v") for i in range(count - 1)]
        cases.append(Case(f"{count} headers", build(b"GET", b"/healthz", headers=many), expect))
    odd: list[tuple[str, list[tuple[bytes, bytes]], int | None]] = [
        ("no Host", [], 200), ("two Hosts", [host, (b"Host", b"evil.example")], 200),
        ("Host garbage", [(b"Host", b"\xff\x00 \x01")], 200), ("NUL in a value", [(b"X", b"a\x00b")], 200),
        ("high bytes in a value", [(b"X", bytes(range(0x80, 0x100)))], 200),
        ("high bytes in a name", [(b"\xe4\xf6", b"1")], 200), ("empty name", [(b"", b"1")], 200),
        ("space before colon", [(b"Host ", b"x")], 200), ("Expect", [(b"Expect", b"100-continue")], 200),
        ("keep-alive", [(b"Connection", b"keep-alive")], 200), ("Connection garbage", [(b"Connection", b"\xff")], 200),
        ("X-Forwarded-For garbage", [(b"X-Forwarded-For", b"\xff, ::1, not-an-ip, " + b"1," * 500)], 200),
        ("Upgrade h2c", [(b"Connection", b"Upgrade, HTTP2-Settings"), (b"Upgrade", b"h2c")], 200),
    ]
    for label, headers, expect in odd:
        cases.append(Case(f"header: {label}", build(b"GET", b"/healthz", headers=headers), expect))
    cases.append(Case("header line without a colon",
                      b"GET /healthz HTTP/1.1\r\nHost: x\r\nno colon here\r\nX: y\r\n\r\n", 200))
    cases.append(Case("obs-fold continuation",
                      b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: a\r\n  b\r\n\tc\r\n\r\n", 200))
    cases.append(Case("CR-only endings after the request line",
                      b"GET /healthz HTTP/1.1\r\nHost: x\rX-A: b\r\r", 200))
    cases.append(Case("headers never finished", b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b", 200))
    cases.append(Case("request line only, no blank line", b"GET /healthz HTTP/1.1\r\n", 200))
    content_types: list[tuple[bytes, int]] = [
        (b"application/json; charset=utf-16", 202), (b"APPLICATION/JSON", 202),
        (b" application/json ;x=y", 202), (b"application/json, text/plain", 415),
        (b"text/plain", 415), (b"application/x-www-form-urlencoded", 415), (b"", 415),
        (b"multipart/form-data; boundary=x", 415), (b"application/" + b"j" * 5000, 415),
        (b"application/jso\xff", 415),
    ]
    for value, expect in content_types:
        raw = build(b"POST", FORGOT, body=good, content_type=value)
        cases.append(Case(f"Content-Type {value[:40]!r}", raw, expect))
    cases.append(Case("no Content-Type", build(b"POST", FORGOT, body=good, content_type=None), 415))
    message = json.dumps({"template": "security-alert", "to": "ops@example.com",
                          "vars": {"event": "fuzz"}}).encode()
    auths: list[tuple[bytes | None, int]] = [
        (None, 401), (b"", 401), (b"Bearer", 401), (b"Bearer ", 401), (b"Basic " + API_KEY.encode(), 401),
        (b"Bearer " + API_KEY.encode()[:-1], 401), (b"Bearer " + API_KEY.encode() * 2, 401),
        (b"Bearer\t" + API_KEY.encode(), 401), (b"Bearer " + API_KEY.encode()[:-1] + b"\xff", 401),
        (b"Bearer " + b"\x00" * 32, 401), (b"Bearer " + b"k" * 10_000, 401),
        (b"bearer " + API_KEY.encode(), 202), (b"BEARER  " + API_KEY.encode() + b"  ", 202),
    ]
    for value, expect in auths:
        headers = [host] + ([(b"Authorization", value)] if value is not None else [])
        cases.append(Case(f"Authorization {(value or b'')[:30]!r}",
                          build(b"POST", EMAILS, body=message, headers=headers), expect))
    keys: list[tuple[bytes, int]] = [(b"k" * 255, 202), (b"k" * 256, 400), (b"a\x00b", 400),
                                     (b"\xff\xfe", 202), (b"", 202), (b" ", 202), (b"\x7f", 202)]
    for value, expect in keys:
        headers = [host, bearer(), (b"Idempotency-Key", value)]
        cases.append(Case(f"Idempotency-Key {value[:20]!r}",
                          build(b"POST", EMAILS, body=message, headers=headers), expect))
    for index in range(40):
        headers = [host] if rng.random() < 0.8 else []
        for _ in range(rng.randint(0, 12)):
            name = bytes(rng.choice(b"abcXYZ-_019\xe9") for _ in range(rng.randint(1, 20)))
            value = random_bytes(rng, rng.randint(0, 200), b"\r\n")
            headers.append((name, value))
        path = rng.choice(ALL_PATHS)
        cases.append(Case(f"random headers #{index}",
                          build(rng.choice([b"GET", b"POST"]), path, headers=headers)))
    return cases


def body_cases(rng: random.Random, tokens: dict[str, str]) -> list[Case]:
    """Broken, mistyped and hostile bodies for every route that reads one (and some that do not)."""
    hand = [
        b"", b" ", b"{", b"}", b"{}", b"[]", b"null", b"true", b"0", b'"text"', b"{" * 3, b"[" * 50,
        b'{"email":', b'{"email": "a@example.com"', b'{"email" "a@example.com"}', b"{'email': 'x'}",
        b"[" * 200 + b"]" * 200, b'{"a":' * 150 + b"1" + b"}" * 150,
        b"\xff\xfe{\x00}\x00", b"\xef\xbb\xbf{}", b"\x00" * 64, b"\xc3\x28", b"\xed\xa0\x80",
        b'{"email": "a@example.com\x00"}', b'{"email": "a\\u0000@example.com"}',
        b'{"email": "a@example.com\\r\\nBcc: x@evil.example"}', b'{"email": "a@example.com\r\n"}',
        b'{"email": "a@example.com\\nX"}', b'{"email": 1}', b'{"email": null}', b'{"email": true}',
        b'{"email": ["a@example.com"]}', b'{"email": {"email": "a@example.com"}}', b'{"email": ""}',
        b'{"email": "' + b"a" * 300 + b'@example.com"}', b'{"email": "a@' + b"b" * 300 + b'.com"}',
        b'{"email": "a@example.com", "email": "b@example.com"}', b'{"email": 1' + b"0" * 5000 + b"}",
        b'{"email": 1' + b"0" * 4000 + b"}", b'{"email": 1e999}', b'{"email": -0.0}',
        b'{"email": NaN}', b'{"email": Infinity}', b'{"email": "\\ud800@example.com"}',
        b'{"email": "a@\\udfff.com"}', b'{"token": "\\ud800", "password": "\\udfff\\udfff\\udfff"}',
        b'{"token": 1, "password": 2}', b'{"token": "' + b"a" * 43 + b'", "password": "short"}',
        b'{"token": "' + b"a" * 43 + b'", "password": "' + b"p" * 1025 + b'"}',
        b'{"token": "' + b"a" * 43 + b'", "password": "' + b"p" * 1024 + b'"}',
        b'{"token": "' + b"a" * 19 + b'", "password": "long enough"}',
        b'{"token": "' + b"a" * 129 + b'", "password": "long enough"}',
        '{"email": "ü@exämple.com"}'.encode(), '{"email": "a@bücher.example"}'.encode("utf-16"),
        json.dumps({"email": KNOWN_EMAIL}).encode(), json.dumps({"email": KNOWN_EMAIL.upper()}).encode(),
        json.dumps({"template": "security-alert", "to": [], "vars": {}}).encode(),
        json.dumps({"template": "security-alert", "to": ["a@example.com"] * 51,
                    "vars": {"event": "x"}}).encode(),
        json.dumps({"template": "nope", "to": "a@example.com"}).encode(),
        json.dumps({"template": "security-alert", "to": "a@example.com", "vars": []}).encode(),
        json.dumps({"template": "security-alert", "to": "a@example.com",
                    "vars": {"event": "x", "ip": 1.5}}).encode(),
        json.dumps({"template": "security-alert", "to": "a@example.com",
                    "vars": {"event": "x\r\nBcc: evil@example.com"}}).encode(),
        json.dumps({"template": "password-reset", "to": "a@example.com",
                    "vars": {"reset_url": "javascript:alert(1)"}}).encode(),
        json.dumps({"template": "password-reset", "to": "a@example.com",
                    "vars": {"reset_url": "https://x.example", "expires_minutes": "10081"}}).encode(),
        b"x" * (16 * 1024), b"{" + b" " * (16 * 1024 - 2) + b"}",
    ]
    routes: list[tuple[str, bytes, list[tuple[bytes, bytes]], bytes]] = [
        ("forgot", FORGOT, [], b"application/json"),
        ("reset", RESET, [], b"application/json"),
        ("emails+key", EMAILS, [bearer()], b"application/json"),
        ("emails-key", EMAILS, [], b"application/json"),
        ("form", PAGE, [], b"application/x-www-form-urlencoded"),
        ("healthz", b"/healthz", [], b"application/json"),
    ]
    cases = []
    for name, path, extra, content_type in routes:
        method = b"GET" if path == b"/healthz" else b"POST"
        # a route that never reads the body (GET, or 401 first) gets every tenth body only
        step = 10 if name in ("healthz", "emails-key") else 1
        for index, body in list(enumerate(hand))[::step]:
            raw = build(method, path, body=body, headers=[(b"Host", b"x"), *extra],
                        content_type=content_type)
            cases.append(Case(f"{name} hand body #{index} {body[:30]!r}", raw))
    cases += _json_route_cases(rng)
    cases += _form_cases(rng)
    cases += _token_cases(tokens)
    return cases


def _json_route_cases(rng: random.Random) -> list[Case]:
    """Random JSON for the JSON routes: objects with the right keys and wrong or odd values."""
    cases = []
    for index in range(160):
        path = (FORGOT, RESET, EMAILS)[index % 3]
        if path == EMAILS:
            payload = _random_message(rng)
        else:
            keys = ("email",) if path == FORGOT else ("token", "password")
            payload = random_json(rng, 0, keys) if rng.random() < 0.3 else {
                key: (random_text(rng, 0, 80) if rng.random() < 0.7 else random_json(rng, 1, keys))
                for key in keys}
        body = json.dumps(payload, ensure_ascii=rng.random() < 0.5).encode()
        if len(body) > 16 * 1024:
            body = body[: 16 * 1024]
        cut = rng.random()
        if cut < 0.1:
            body = body[: rng.randint(0, len(body))]
        headers = [(b"Host", b"x")] + ([bearer()] if rng.random() < 0.85 else [])
        cases.append(Case(f"random JSON #{index} to {path!r}",
                          build(b"POST", path, body=body, headers=headers)))
    return cases


def _random_message(rng: random.Random) -> object:
    """A /v1/emails payload: mostly well formed, with random templates, recipients and vars.

    Never "template" or "to" among the vars ("reserved-vars"), every string from _SAFE_CHARS.
    """
    roll = rng.random()
    if roll < 0.1:
        return without_reserved_vars(random_json(rng, 0, ("template", "to", "vars")))
    addresses = ["a@example.com", "b@example.com", "bad", "", "a@b", "x@" + "y" * 70 + ".com",
                 "ü@example.com", "a@bücher.example", "a b@example.com", 7]
    to: object = rng.choice(addresses)
    if rng.random() < 0.3:
        to = rng.sample(addresses, rng.randint(0, 4))
    variables: dict[str, object] = {}
    for _ in range(rng.randint(0, 5)):
        name = rng.choice(TEMPLATE_VARS) if rng.random() < 0.8 else random_text(rng, 0, 10)
        if name in RESERVED_VARS:
            continue
        value: object = random_text(rng, 0, 60)
        if name.endswith("_url"):
            value = rng.choice(["https://ok.example/path?x=1", "http://a.example", "ftp://x",
                                "https://", "javascript:alert(1)", "https://a b", "//x", ""])
        elif name == "expires_minutes":
            value = rng.choice(["0", "1", "60", "10080", "10081", "-1", "abc", "", " 5", "1.5",
                                60, 0, True, "٣"])
        elif rng.random() < 0.2:
            value = rng.choice([1, -5, 2**70, True, False, None, 1.5, [], {}])
        variables[name] = value
    return {"template": rng.choice([*TEMPLATES, "nope", "", "../etc/passwd"]), "to": to,
            "vars": variables if rng.random() < 0.9 else rng.choice([[], "x", None, 3])}


def _form_cases(rng: random.Random) -> list[Case]:
    """Form posts to /reset-password: too many fields, broken encodings, odd values."""
    forms = [
        b"", b"token", b"=", b"&&&&", b"a=1&" * 11, b"token=x&password=y&confirm=y" + b"&z=1" * 8,
        b"%ff%fe=%c0%af", b"\xff\xfe", b"token=%00&password=%00%00%00%00%00%00%00%00&confirm=%00",
        b"token=" + b"A" * 43 + b"&password=short&confirm=short",
        b"token=" + b"A" * 43 + b"&password=longenough&confirm=different",
        b"token=" + b"A" * 43 + b"&password=longenough&confirm=longenough",
        b"token=<script>&password=longenough&confirm=longenough",
        b"token=" + b"A" * 43 + b"&password=" + b"p" * 1025 + b"&confirm=" + b"p" * 1025,
        b"token=" + b"A" * 43 + b"&password=%0D%0Alonger&confirm=%0D%0Alonger",
        b"token=a&token=b&password=longenough&confirm=longenough",
    ]
    cases = []
    for index, form in enumerate(forms):
        cases.append(Case(f"form #{index} {form[:40]!r}",
                          build(b"POST", PAGE, body=form,
                                content_type=b"application/x-www-form-urlencoded")))
    for index in range(40):
        pairs = [(random_text(rng, 0, 10), random_text(rng, 0, 40))
                 for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.5:
            password = random_text(rng, 0, 20)
            pairs += [("token", "A" * rng.randint(18, 130)), ("password", password),
                      ("confirm", password)]
        body = urllib.parse.urlencode(pairs).encode()
        cases.append(Case(f"random form #{index}",
                          build(b"POST", PAGE, body=body,
                                content_type=b"application/x-www-form-urlencoded")))
    return cases


def _token_cases(tokens: dict[str, str]) -> list[Case]:
    """Real tokens: the first use changes the password, the replay is refused."""
    reset = json.dumps({"token": tokens["json"], "password": "fuzzed-password-1"}).encode()
    form = urllib.parse.urlencode({"token": tokens["form"], "password": "fuzzed-password-2",
                                   "confirm": "fuzzed-password-2"}).encode()
    form_type = b"application/x-www-form-urlencoded"
    return [
        Case("real token, JSON reset", build(b"POST", RESET, body=reset), 200),
        Case("real token, JSON reset again", build(b"POST", RESET, body=reset), 400),
        Case("real token, form reset", build(b"POST", PAGE, body=form, content_type=form_type), 200),
        Case("real token, form reset again",
             build(b"POST", PAGE, body=form, content_type=form_type), 400),
    ]


def mixed_cases(rng: random.Random) -> list[Case]:
    """Everything at once: random method, path, accepted version, headers, body and length."""
    versions = (b"HTTP/1.0", b"HTTP/1.1", b"HTTP/1.5")
    content_types = (b"application/json", b"application/x-www-form-urlencoded", b"text/plain",
                     None)
    cases = []
    for index in range(140):
        method = rng.choice([b"GET", b"POST", b"POST", b"PUT", b"post", b"DELETE", b"HEAD"])
        path = rng.choice(ALL_PATHS)
        headers = [(b"Host", b"x")]
        if rng.random() < 0.5:
            headers.append(bearer())
        if rng.random() < 0.2:
            headers.append((b"Idempotency-Key", random_text(rng, 0, 30).encode("utf-8")[:60]
                            .replace(b"\r", b"").replace(b"\n", b"")))
        kind = rng.random()
        if kind < 0.4:
            keys = ("email", "token", "password", "template", "to", "vars")
            body = json.dumps(without_reserved_vars(random_json(rng, 0, keys))).encode()
        elif kind < 0.6:
            body = random_bytes(rng, rng.randint(0, 2000))
        elif kind < 0.8:
            body = urllib.parse.urlencode([(random_text(rng, 0, 8), random_text(rng, 0, 20))
                                           for _ in range(rng.randint(0, 11))]).encode()
        else:
            body = b""
        length = None
        if rng.random() < 0.25:
            length = rng.choice([b"0", b"-3", b"%d" % (len(body) + 7), b"%d" % (len(body) // 2),
                                 b"x", b"99999999"])
        raw = build(method, path, body=body, headers=headers, version=rng.choice(versions),
                    content_type=rng.choice(content_types), length=length)
        cases.append(Case(f"mixed #{index} {method!r} {path!r}", raw))
    return cases


# --------------------------------------------------------------------------- known-bug families


def unparsed_request_line_cases(rng: random.Random) -> list[Case]:
    """Request lines http.server rejects before it knows the version, plus HTTP/0.9 ones."""
    lines = [
        b"GET /healthz GARBAGE", b"GET /healthz HTTP/2.0", b"GET /healthz HTTP/3", b"GET /healthz HTTP/1",
        b"GET /healthz HTTP/1.1.1", b"GET /healthz HTTP/x.y", b"GET /healthz http/1.1",
        b"GET /healthz HTTP/0.9", b"POST /v1/auth/forgot-password HTTP/2.0", b"GET /healthz \xff\xfe",
        b"GET /healthz HTTP/" + b"1" * 20 + b".1", b"GET /healthz", b"POST /v1/emails",
        b"GET /reset-password?token=" + b"A" * 43, b"GET", b"\xff\xfe\xfd", b"GET /a b HTTP/1.1 x",
    ]
    cases = [Case(f"request line {line[:40]!r}", line + b"\r\n\r\n") for line in lines]
    cases.append(Case("CR-only line endings", b"GET /healthz HTTP/1.1\rHost: x\r\r"))
    cases.append(Case("CR-only POST", b"POST /v1/auth/forgot-password HTTP/1.1\rContent-Length: 2"
                                      b"\rContent-Type: application/json\r\r{}"))
    for index in range(20):
        garbage = random_bytes(rng, rng.randint(1, 300), b"\n")
        cases.append(Case(f"garbage request #{index}", garbage.lstrip(b" \t\r") + b"x\r\n\r\n"))
    return cases


def deep_json_cases() -> list[Case]:
    """JSON nested deeper than the Python stack allows."""
    bodies = [b"[" * 10_000, b"[" * 8000 + b"]" * 8000, b'{"a":' * 2000 + b"1" + b"}" * 2000,
              b'{"email": ' + b"[" * 600 + b"]" * 600 + b"}"]  # each under the 16 KiB limit
    cases = []
    for path, extra in ((FORGOT, []), (RESET, []), (EMAILS, [bearer()])):
        for body in bodies:
            cases.append(Case(f"{path!r} nested {body[:12]!r}",
                              build(b"POST", path, body=body, headers=[(b"Host", b"x"), *extra])))
    return cases


def _message_cases(label: str, payloads: list[object]) -> list[Case]:
    return [Case(f"{label} #{index}", build(b"POST", EMAILS, body=json.dumps(p).encode(),
                                            headers=[(b"Host", b"x"), bearer()]))
            for index, p in enumerate(payloads)]


def reserved_var_cases() -> list[Case]:
    """/v1/emails vars named like Mailer.enqueue's own parameters."""
    return _message_cases("vars naming an enqueue parameter", [
        {"template": "security-alert", "to": "a@example.com", "vars": {"event": "x", "to": "b@x.io"}},
        {"template": "security-alert", "to": "a@example.com", "vars": {"template": "x"}},
    ])


def surrogate_var_cases() -> list[Case]:
    """/v1/emails vars holding lone UTF-16 surrogates (valid JSON escapes)."""
    return [Case(f"vars with a lone surrogate #{index}",
                 build(b"POST", EMAILS, body=body, headers=[(b"Host", b"x"), bearer()]))
            for index, body in enumerate([
                b'{"template": "security-alert", "to": "a@example.com", "vars": {"event": "\\ud800"}}',
                (b'{"template": "service-announcement", "to": "a@example.com",'
                b' "vars": {"title": "ok", "body": "x\\udfffy"}}'),
            ])]


def non_ascii_digit_cases() -> list[Case]:
    """expires_minutes made of characters str.isdigit() accepts but int() refuses."""
    return _message_cases("expires_minutes non-ASCII digit", [
        {"template": "password-reset", "to": "a@example.com",
         "vars": {"reset_url": "https://x.example", "expires_minutes": "²"}},
        {"template": "two-factor-code", "to": "a@example.com",
         "vars": {"code": "1", "expires_minutes": "1①"}},
    ])


def bad_url_var_cases() -> list[Case]:
    """*_url vars whose host part urllib.parse.urlsplit() refuses with ValueError."""
    return _message_cases("url var urlsplit refuses", [
        {"template": "email-verification", "to": "a@example.com",
         "vars": {"verify_url": "https://[::1"}},
        {"template": "billing-notification", "to": "a@example.com",
         "vars": {"summary": "x", "billing_url": "https://a\uff03b/"}},
        {"template": "account-suspension", "to": "a@example.com",
         "vars": {"reason": "x", "appeal_url": "https://[not-an-ip]/"}},
    ])


def too_many_query_fields_cases() -> list[Case]:
    """More than the 20 query fields _read_request() lets parse_qsl() take."""
    return [Case(f"{count} query fields on {path!r}",
                 build(b"GET", path + b"?" + b"&".join(b"f%d=1" % i for i in range(count))))
            for path, count in ((b"/healthz", 21), (PAGE, 50), (b"/nope", 1000))]


def bad_authority_cases() -> list[Case]:
    """Absolute-form targets whose authority urlsplit() refuses with ValueError."""
    return [Case(f"target {target!r}", build(b"GET", target))
            for target in (b"http://[::1/healthz", b"http://]/", b"http://[x]/healthz")]


def leading_empty_line_cases() -> list[Case]:
    """An empty line before the request line (RFC 9112 section 2.2: SHOULD be ignored)."""
    return [Case("CRLF first", b"\r\n" + build(b"GET", b"/healthz")),
            Case("LF first", b"\n" + build(b"GET", b"/healthz")),
            Case("blank spaces first", b"   \r\n" + build(b"GET", b"/healthz"))]


# --------------------------------------------------------------------------- the fuzz tests

Family = Callable[[random.Random, dict[str, str]], list[Case]]
FAMILIES: dict[str, Family] = {
    "methods": lambda rng, tokens: method_cases(rng),
    "paths": lambda rng, tokens: path_cases(rng),
    "versions": lambda rng, tokens: version_cases(rng),
    "headers": lambda rng, tokens: header_cases(rng),
    "bodies": body_cases,
    "mixed": lambda rng, tokens: mixed_cases(rng),
    "unparsed-request-line": lambda rng, tokens: unparsed_request_line_cases(rng),
    "deep-json": lambda rng, tokens: deep_json_cases(),
    "reserved-vars": lambda rng, tokens: reserved_var_cases(),
    "surrogate-vars": lambda rng, tokens: surrogate_var_cases(),
    "non-ascii-digit": lambda rng, tokens: non_ascii_digit_cases(),
    "bad-url-var": lambda rng, tokens: bad_url_var_cases(),
    "too-many-query-fields": lambda rng, tokens: too_many_query_fields_cases(),
    "bad-authority": lambda rng, tokens: bad_authority_cases(),
    "leading-empty-line": lambda rng, tokens: leading_empty_line_cases(),
}


def corpus(name: str, tokens: dict[str, str]) -> list[Case]:
    """The deterministic cases of one family (its own Random, so families are independent)."""
    family = FAMILIES[name]
    return family(random.Random(f"{SEED}-{name}"), tokens)


def test_corpus_size_and_determinism() -> None:
    """About 1,000 requests in all, the same bytes on every run."""
    tokens = {"json": "J" * 43, "form": "F" * 43, "surrogate": "S" * 43}
    names = list(FAMILIES)
    sizes = {name: len(corpus(name, tokens)) for name in names}
    assert 1000 <= sum(sizes.values()) <= 1300, sizes
    for name in names:
        assert [c.raw for c in corpus(name, tokens)] == [c.raw for c in corpus(name, tokens)]


@pytest.mark.parametrize("name", list(FAMILIES))
def test_fuzz_family_gets_json_4xx_or_2xx(service: Service, name: str,
                                          capfd: pytest.CaptureFixture[str]) -> None:
    """Every request of the family is answered: 2xx, or a JSON (or reset-page HTML) 4xx."""
    cases = corpus(name, service.tokens)
    failures = run_family(service, cases)
    assert not failures, f"{len(failures)} of {len(cases)} failed:\n" + "\n".join(failures[:40])
    assert_healthy(service)
    assert "Traceback" not in capfd.readouterr().err


def test_surrogate_password_is_refused_without_burning_the_token(service: Service) -> None:
    """A password with a lone surrogate gets a 400 and the reset link still works afterwards."""
    store = service.app.store
    assert isinstance(store, sysmail.SqliteStore)
    user = store.add_user("surrogate@example.com")
    token = service.tokens["surrogate"]
    save_token(store, user, token)
    body = b'{"token": "' + token.encode() + b'", "password": "\\ud800-longer-than-8"}'
    first = exchange(service.port, build(b"POST", RESET, body=body))
    valid = json.dumps({"token": token, "password": "a-fine-password"}).encode()
    second = exchange(service.port, build(b"POST", RESET, body=valid))
    assert (first.status, second.status) == (400, 200), (
        f"surrogate password: {first.raw[-60:]!r}; then a valid one: {second.raw[-60:]!r}")


# --------------------------------------------------------------------------- size and slow clients


def read_reply(sock: socket.socket, limit: float) -> tuple[bytes, float]:
    """Read until the server closes (or limit seconds pass); return the bytes and the time."""
    started = time.monotonic()
    sock.settimeout(limit)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except TimeoutError:
        pass
    return b"".join(chunks), time.monotonic() - started


def test_oversized_body_gets_413_without_being_sent(service: Service) -> None:
    """Content-Length: 1,000,000 with no body sent: a JSON 413 at once, then the server closes."""
    head = (b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000000\r\n\r\n")
    with socket.create_connection((LOCALHOST, service.port), timeout=5) as sock:
        sock.sendall(head)  # and nothing more: no half-close either
        raw, seconds = read_reply(sock, 5.0)
    reply = parse_reply(raw, (), seconds)
    assert reply.status == 413, raw
    assert json.loads(reply.body) == {"error": f"the body must be at most {16 * 1024} bytes"}
    assert reply.header("Cache-Control") == "no-store"
    assert seconds < 1.0, f"the 413 took {seconds:.2f}s"


@pytest.mark.parametrize(("length", "status"), [(16 * 1024, 400), (16 * 1024 + 1, 413)])
def test_body_limit_is_exactly_16_kib(service: Service, length: int, status: int) -> None:
    """16,384 bytes are read (and refused as bad JSON); one more byte is refused unread."""
    reply = exchange(service.port, build(b"POST", FORGOT, body=b"x" * length))
    assert reply.status == status, reply.raw[:200]
    assert "error" in json.loads(reply.body)


def _watch_close(sock: socket.socket, opened: float, result: dict[str, object]) -> None:
    """Record when (seconds after opened) and how the server ended this connection."""
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
        result["how"] = "closed"
    except ConnectionResetError:
        result["how"] = "reset"
    except TimeoutError:
        result["how"] = "still open"
    result["after"] = time.monotonic() - opened
    result["data"] = data


def _trickle(sock: socket.socket, stop: threading.Event) -> None:
    """Send one more header byte every 0.4 s until the server cuts the connection."""
    while not stop.wait(0.4):
        try:
            sock.sendall(b"a")
        except OSError:
            return


def test_slowloris_is_cut_at_the_deadline_while_others_are_served(service: Service) -> None:
    """Slow clients are cut at REQUEST_DEADLINE_SECONDS; meanwhile /healthz answers at once."""
    deadline = sysmail.REQUEST_DEADLINE_SECONDS
    partials = {
        "partial request line": b"GET /heal",
        "partial headers": b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: x\r\nContent-Le",
        "partial body": build(b"POST", FORGOT, body=b'{"email": "a@example.com"}')[:-10],
        "trickled header": b"GET /healthz HTTP/1.1\r\nX-Slow: ",
    }
    stop = threading.Event()
    results: dict[str, dict[str, object]] = {name: {} for name in partials}
    sockets, threads = [], []
    try:
        for name, raw in partials.items():
            sock = socket.create_connection((LOCALHOST, service.port), timeout=deadline + 10)
            opened = time.monotonic()
            sock.sendall(raw)
            sockets.append(sock)
            threads.append(threading.Thread(target=_watch_close, args=(sock, opened, results[name])))
            if name == "trickled header":
                threads.append(threading.Thread(target=_trickle, args=(sock, stop)))
        for thread in threads:
            thread.start()
        served = []
        give_up = time.monotonic() + deadline + 10
        while not all("after" in r for r in results.values()) and time.monotonic() < give_up:
            served.append(exchange(service.port, build(b"GET", b"/healthz"), timeout=5))
            time.sleep(0.2)
    finally:
        stop.set()
        for sock in sockets:
            sock.close()
        for thread in threads:
            thread.join(deadline + 15)
    for name, result in results.items():
        assert result.get("how") in ("closed", "reset"), (name, result)
        assert result["data"] == b"", (name, result)
        assert deadline - 0.5 <= result["after"] <= deadline + SLOW_MARGIN_SECONDS, (name, result)
    assert len(served) >= deadline * 3, len(served)
    assert all(reply.status == 200 for reply in served), [r.raw for r in served if r.status != 200]
    assert max(reply.seconds for reply in served) < 1.0


def open_paced(port: int, count: int) -> list[socket.socket]:
    """Open count idle connections, 5 ms apart: slow enough for the listen backlog of 5."""
    opened = []
    for _ in range(count):
        opened.append(socket.create_connection((LOCALHOST, port), timeout=5))
        time.sleep(0.005)
    return opened


def test_idle_connections_do_not_block_a_normal_request(service: Service) -> None:
    """20 connections held open without a byte sent; real requests are still answered at once."""
    idle = open_paced(service.port, 20)
    try:
        health = exchange(service.port, build(b"GET", b"/healthz"))
        forgot = exchange(service.port, build(b"POST", FORGOT, body=b'{"email": "z@example.com"}'))
    finally:
        for sock in idle:
            sock.close()
    assert (health.status, json.loads(health.body)) == (200, {"status": "ok"})
    assert forgot.status == 202, forgot.raw
    assert max(health.seconds, forgot.seconds) < 1.0


def test_connection_cap_answers_503_json_then_recovers(service: Service) -> None:
    """With MAX_CONNECTIONS held open the next client gets a JSON 503; closing them frees slots."""
    held = open_paced(service.port, sysmail.MAX_CONNECTIONS)
    try:
        give_up = time.monotonic() + 5  # until the server has accepted every held connection
        while (refused := exchange(service.port, build(b"GET", b"/healthz"), timeout=5)).status == 200:
            assert time.monotonic() < give_up, "never refused"
            time.sleep(0.05)
    finally:
        for sock in held:
            sock.close()
    assert refused.status == 503, refused.raw
    assert json.loads(refused.body) == {"error": "too many connections, try again later"}
    assert (refused.header("Cache-Control"), refused.header("Retry-After")) == ("no-store", "1")
    give_up = time.monotonic() + 5
    while (reply := exchange(service.port, build(b"GET", b"/healthz"))).status != 200:
        assert time.monotonic() < give_up, reply.raw
        time.sleep(0.05)
    assert_healthy(service)


def test_a_burst_of_connections_is_accepted_without_delay(service: Service) -> None:
    """30 clients connecting at once (well under MAX_CONNECTIONS) all get in within 0.9 s."""
    started = time.monotonic()
    burst = []
    try:
        for _ in range(30):
            burst.append(socket.create_connection((LOCALHOST, service.port), timeout=10))
        seconds = time.monotonic() - started
    finally:
        for sock in burst:
            sock.close()
    assert seconds < 0.9, f"30 connects took {seconds:.2f}s"


def test_a_client_reset_mid_request_leaves_no_traceback_on_stderr(
        service: Service, capfd: pytest.CaptureFixture[str]) -> None:
    """A client that sends half a body, then resets the connection, is not a server error."""
    capfd.readouterr()
    with socket.create_connection((LOCALHOST, service.port), timeout=5) as sock:
        sock.sendall(build(b"POST", FORGOT, body=b'{"email": "a@example.com"}', length=b"100"))
        wait_server_read(sock)  # the handler has the request line and waits for the body
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST
    assert_healthy(service)
    # every handler thread has ended: whatever it had to print is on stderr now
    wait_handlers_done()
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def wait_handlers_done(timeout: float = 30) -> None:
    """Wait until no request-handling thread is alive (socketserver's ThreadingMixIn names
    them "Thread-N (process_request_thread)"): none is left to print anything."""
    deadline = time.monotonic() + timeout
    while busy := [t.name for t in threading.enumerate() if "process_request_thread" in t.name]:
        assert time.monotonic() < deadline, f"handler threads still running: {busy}"
        time.sleep(0.01)


def test_stop_is_not_held_up_by_an_idle_connection(tmp_path: Path) -> None:
    """An open connection that never sent a byte is not a request in flight: stop at once."""
    app = sysmail.build_app(make_config(tmp_path), store=sysmail.MemoryStore())
    app.start()
    idle = socket.create_connection((LOCALHOST, int(app.url.rsplit(":", 1)[1])), timeout=5)
    wait_server_read(idle)  # the server has accepted it: a handler thread waits for a line
    leave = threading.Timer(2.5, idle.close)  # bounds this test when stop() does wait
    leave.start()
    try:
        started = time.monotonic()
        app.stop()
        seconds = time.monotonic() - started
    finally:
        leave.cancel()
        idle.close()
    assert seconds < 2.0, f"App.stop() took {seconds:.2f}s with one idle connection open"
