"""The HTTP server stays available (issue 9): no one client, and no pile of slow or bloated
requests, takes it from the others.

Real servers on loopback. Clients speak from different loopback addresses (the whole of
127.0.0.0/8 is loopback on Linux): the good client binds 127.0.0.2, attackers 127.0.0.3 and up,
so the server sees different client addresses. Every loop is bounded in count and time.

The limits, each with a test that fails without it: the per-client cap while busy (and the
ceiling of BUSY_CONNECTIONS for a lone client), the header deadline while busy, the 64 KiB of
request line and headers per request, and the shared budget of header bytes per listener.
The two attacks of the issue: 200 half-sent requests from one client (/healthz answers 200 for
another all along), and large unfinished headers against `sysmail serve` (its RSS stays under
150 MB).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, wait_server_read

import sysmail

GOOD = "127.0.0.2"
ATTACKER = "127.0.0.3"
HALF_SENT = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-A: b\r\n"  # never finished
BUSY_BODY = {"error": "too many connections, try again later"}
RSS_LIMIT_MB = 150


def attacker(index: int) -> str:
    """The index-th attacker address: 127.0.0.3, 127.0.0.4, ..."""
    return f"127.0.0.{3 + index}"


# --------------------------------------------------------------------------- the server


def make_config(tmp: Path, extra: Mapping[str, str] | None = None) -> sysmail.Config:
    return sysmail.Config.from_env({
        "SYSMAIL_LISTEN": "127.0.0.1:0", "SYSMAIL_METRICS_LISTEN": "127.0.0.1:0",
        "SYSTEM_DOMAIN": "example.com", "SYSMAIL_SPOOL": str(tmp / "spool"),
        "SYSMAIL_OUTBOX": str(tmp / "outbox"), "SYSMAIL_DB": str(tmp / "db.sqlite"),
        **(extra or {})})


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[Callable[..., sysmail.App]]:
    """Factory: a started app (optional env overrides); stopped at teardown."""
    apps: list[sysmail.App] = []

    def make(extra: Mapping[str, str] | None = None) -> sysmail.App:
        app = sysmail.build_app(make_config(tmp_path, extra), store=sysmail.MemoryStore())
        app.start()
        apps.append(app)
        return app

    try:
        yield make
    finally:
        for app in apps:
            app.stop()


@pytest.fixture
def app(make_app: Callable[..., sysmail.App]) -> sysmail.App:
    return make_app()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def held(app: sysmail.App) -> int:
    """How many connections the public listener handles now."""
    assert app.server is not None
    return app.server.open_connections


# --------------------------------------------------------------------------- clients


def connect(port: int, source: str, timeout: float = 5) -> socket.socket:
    """A connection to 127.0.0.1:port from the loopback address source."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except OSError:
        sock.close()
        raise
    return sock


@dataclass(frozen=True)
class Answer:
    status: int | None
    headers: dict[str, str]
    body: bytes


def parse(raw: bytes) -> Answer:
    head, _, body = raw.partition(b"\r\n\r\n")
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(match.group(1)) if match else None, headers, body)


def read_answer(sock: socket.socket, timeout: float = 5) -> Answer:
    """Read until the server closes (a reset after its answer is fine) or timeout."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return parse(b"".join(chunks))


def get(url: str, path: str = "/healthz", source: str = GOOD, *, headers: bytes = b"",
        timeout: float = 5) -> Answer:
    """One GET on a new connection from source."""
    with connect(port_of(url), source, timeout) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        return read_answer(sock, timeout)


def wait_until(condition: Callable[[], bool], timeout: float = 5, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
        time.sleep(0.02)


def open_many(port: int, source: str, count: int, first: bytes = b"") -> list[socket.socket]:
    """count connections from source, 2 ms apart (the listen backlog is MAX_CONNECTIONS), each
    sending first (and nothing more)."""
    opened = []
    for _ in range(count):
        sock = connect(port, source)
        if first:
            with contextlib.suppress(OSError):  # refused at once: the server may have closed
                sock.sendall(first)
        opened.append(sock)
        time.sleep(0.002)
    return opened


def refused(sockets: list[socket.socket], wait: float = 2.0) -> list[Answer]:
    """The answers on the sockets that got one within wait seconds: the refused ones (a held
    connection is answered nothing)."""
    selector = selectors.DefaultSelector()
    for sock in sockets:
        selector.register(sock, selectors.EVENT_READ)
    answers, deadline = [], time.monotonic() + wait
    while selector.get_map() and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(min(left, 0.2)):
            selector.unregister(key.fileobj)
            answers.append(read_answer(key.fileobj, 2))
    selector.close()
    return answers


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def assert_busy_503(answer: Answer) -> None:
    assert answer.status == 503, answer
    assert json.loads(answer.body) == BUSY_BODY
    assert (answer.headers["cache-control"], answer.headers["retry-after"]) == ("no-store", "1")


# --------------------------------------------------------------------------- connection caps


def test_200_half_sent_requests_from_one_client_leave_healthz_to_the_others(
        app: sysmail.App) -> None:
    """One client opens 200 connections, each with a request line and some headers, never
    finished: it holds at most BUSY_CONNECTIONS of them, the rest get a JSON 503 at once; another
    client's /healthz answers 200 every time meanwhile, and so do the operators' /healthz and
    /metrics."""
    port = port_of(app.url)
    attack = open_many(port, ATTACKER, 200, HALF_SENT)
    try:
        wait_until(lambda: held(app) == sysmail.BUSY_CONNECTIONS, what="64 held")
        answers = refused(attack)
        statuses = []
        for _ in range(8):  # several times, well within HEADER_DEADLINE_SECONDS
            statuses.append(get(app.url).status)
            assert get(app.ops_url).status == 200
            metrics = get(app.ops_url, "/metrics")
            assert metrics.status == 200
            time.sleep(0.2)
        still_held = held(app)
    finally:
        close_all(attack)
    assert statuses == [200] * 8
    assert len(answers) == 200 - sysmail.BUSY_CONNECTIONS
    for answer in answers:
        assert_busy_503(answer)
    assert still_held == sysmail.BUSY_CONNECTIONS  # the good client's came and went
    assert (f'sysmail_http_requests_total{{route="refused",status="503"}} '
            f"{200 - sysmail.BUSY_CONNECTIONS}").encode() in metrics.body


def test_a_busy_server_holds_each_client_to_its_share(app: sysmail.App) -> None:
    """Once half the slots are taken, a client address holding MAX_CONNECTIONS_PER_CLIENT gets
    no more; others still get in, up to MAX_CONNECTIONS in all."""
    port, share = port_of(app.url), sysmail.MAX_CONNECTIONS_PER_CLIENT
    opened: list[socket.socket] = []
    try:
        opened += open_many(port, ATTACKER, 40)  # a quiet server: more than a share is fine
        wait_until(lambda: held(app) == 40)
        opened += open_many(port, ATTACKER, 30)  # up to BUSY_CONNECTIONS only
        wait_until(lambda: held(app) == sysmail.BUSY_CONNECTIONS)
        second = open_many(port, attacker(1), share + 4)
        opened += second
        wait_until(lambda: held(app) == sysmail.BUSY_CONNECTIONS + share)
        over = refused(second)
        assert len(over) == 4
        for answer in over:
            assert_busy_503(answer)
        assert get(app.url).status == 200  # a client with none gets in
        for index in range(2, 5):  # the last slots go to clients under their share
            opened += open_many(port, attacker(index), share)
        wait_until(lambda: held(app) == sysmail.MAX_CONNECTIONS)
        assert_busy_503(get(app.url, source=attacker(5)))  # full: the overall cap
        assert get(app.ops_url).status == 200  # the operators' listener has its own slots
    finally:
        close_all(opened)
    wait_until(lambda: held(app) == 0)
    assert get(app.url, source=ATTACKER).status == 200


def test_a_trusted_proxy_is_held_only_by_the_overall_cap(
        make_app: Callable[..., sysmail.App]) -> None:
    """A proxy speaks for many clients: its connections are not capped per client."""
    app = make_app({"SYSMAIL_TRUSTED_PROXIES": f"{ATTACKER}/32"})
    opened = open_many(port_of(app.url), ATTACKER, 100)
    try:
        wait_until(lambda: held(app) == 100)
        assert refused(opened, wait=0.3) == []
        assert get(app.url, source=ATTACKER).status == 200
    finally:
        close_all(opened)


def test_clients_are_counted_by_address_and_ipv6_by_their_64(
        make_app: Callable[..., sysmail.App]) -> None:
    """An IPv6 host usually has a /64 to itself: it counts as one client; an IPv4-mapped
    address as its IPv4 one; a trusted proxy not at all."""
    app = make_app({"SYSMAIL_TRUSTED_PROXIES": "10.0.0.0/8,2001:db8:1::/48"})
    assert app.server is not None
    key = app.server.client_key
    assert key("2001:db8::1") == key("2001:db8::ffff:1") == "2001:db8::/64"
    assert key("2001:db8:0:1::1") == "2001:db8:0:1::/64"
    assert key("::ffff:127.0.0.3") == key("127.0.0.3") == "127.0.0.3"
    assert key("fe80::1%eth0") == "fe80::/64"
    assert key("10.1.2.3") is None and key("::ffff:10.1.2.3") is None
    assert key("2001:db8:1:2::7") is None
    assert key("11.1.2.3") == "11.1.2.3"


# --------------------------------------------------------------------------- deadlines


def test_a_busy_server_cuts_unfinished_headers_at_the_header_deadline(app: sysmail.App) -> None:
    """While busy, connections whose headers are not in after HEADER_DEADLINE_SECONDS are cut;
    one whose headers are in and whose body is late keeps REQUEST_DEADLINE_SECONDS."""
    port = port_of(app.url)
    body_late = connect(port, GOOD, timeout=20)
    body_late.sendall(b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: x\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"em")
    opened = time.monotonic()
    attack = open_many(port, ATTACKER, sysmail.BUSY_CONNECTIONS - 1, HALF_SENT)
    try:
        wait_until(lambda: held(app) == sysmail.BUSY_CONNECTIONS)
        selector = selectors.DefaultSelector()
        for sock in attack:
            selector.register(sock, selectors.EVENT_READ)
        cut_after = []
        give_up = opened + sysmail.REQUEST_DEADLINE_SECONDS + 5
        while selector.get_map() and time.monotonic() < give_up:
            for key, _ in selector.select(0.2):
                selector.unregister(key.fileobj)
                cut_after.append(time.monotonic() - opened)
                assert read_answer(key.fileobj, 1).status is None  # cut, not answered
        selector.close()
        wait_until(lambda: held(app) == 1, what="the cut ones gone")
        body_open_after_headers_cut = not select.select([body_late], [], [], 0)[0]
        body_late.settimeout(sysmail.REQUEST_DEADLINE_SECONDS + 5)
        with contextlib.suppress(ConnectionResetError):
            assert body_late.recv(1024) == b""
        body_cut_after = time.monotonic() - opened
    finally:
        close_all([*attack, body_late])
    header_deadline = sysmail.HEADER_DEADLINE_SECONDS
    assert len(cut_after) == sysmail.BUSY_CONNECTIONS - 1
    assert header_deadline - 0.5 <= min(cut_after) <= max(cut_after) <= header_deadline + 2
    assert body_open_after_headers_cut
    deadline = sysmail.REQUEST_DEADLINE_SECONDS
    assert deadline - 0.5 <= body_cut_after <= deadline + 2.5


# --------------------------------------------------------------------------- header bytes


def headers_of(size: int, line: int = 8000) -> bytes:
    """Header lines of line bytes each (name and CRLF included), about size bytes in all."""
    count = size // line
    return b"".join(b"X-Pad-%03d: " % i + b"v" * (line - 13) + b"\r\n" for i in range(count))


def test_request_line_and_headers_are_bounded_at_64_kib(app: sysmail.App) -> None:
    """No single line is long (http.server's own limit is 64 KiB a line, 100 lines), but all of
    them together past MAX_HEADER_BYTES get a JSON 431."""
    fits = get(app.url, headers=headers_of(sysmail.MAX_HEADER_BYTES - 2000))
    assert fits.status == 200, fits
    too_many = get(app.url, headers=headers_of(sysmail.MAX_HEADER_BYTES + 8000))
    assert too_many.status == 431, too_many
    assert json.loads(too_many.body) == {
        "error": f"the request line and headers must be at most {sysmail.MAX_HEADER_BYTES} bytes"}
    assert too_many.headers["cache-control"] == "no-store"
    long_line = get(app.url, "/healthz?" + "q" * 70_000)
    assert long_line.status == 414 and "error" in json.loads(long_line.body)
    assert get(app.url).status == 200


def send_and_settle(port: int, source: str, raw: bytes) -> tuple[socket.socket, Answer | None]:
    """Send raw on a new connection and wait until the server has either read all of it (the
    connection is held: None) or answered (the answer)."""
    sock = connect(port, source)
    sock.sendall(raw)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if select.select([sock], [], [], 0.01)[0]:
            return sock, read_answer(sock, 2)
        with contextlib.suppress(AssertionError):
            wait_server_read(sock, timeout=0.01)
            time.sleep(0.01)  # the handler counts what its buffer took from the socket
            if not select.select([sock], [], [], 0)[0]:
                return sock, None
    raise AssertionError("the server neither read nor answered")


def test_large_headers_draw_on_a_shared_budget(app: sysmail.App) -> None:
    """Beyond HEADER_BYTES_PER_CONNECTION, header bytes come from HEADER_BYTES_SHARED: when one
    client's unfinished large headers have spent it, other large-header requests get a JSON 503
    with Retry-After, small ones are served; the budget comes back when they close."""
    port = port_of(app.url)
    bloated = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers_of(sysmail.MAX_HEADER_BYTES - 8000)
    drawn = len(bloated) - sysmail.HEADER_BYTES_PER_CONNECTION
    fit = sysmail.HEADER_BYTES_SHARED // drawn
    count = fit + 5  # still under BUSY_CONNECTIONS: no header deadline, no per-client cap
    assert count < sysmail.BUSY_CONNECTIONS
    attack, answers = [], []
    try:
        for _ in range(count):
            sock, answer = send_and_settle(port, ATTACKER, bloated)
            attack.append(sock)
            if answer is not None:
                answers.append(answer)
        wait_until(lambda: held(app) == fit, what="the refused ones closed")
        assert len(answers) == count - fit
        for answer in answers:
            assert answer.status == 503, answer
            assert json.loads(answer.body) == {"error": "the server is busy, try again later"}
            assert answer.headers["retry-after"] == "1"
        assert sysmail.HEADER_BYTES_SHARED - fit * drawn < drawn  # what is left is too little
        assert get(app.url).status == 200  # within its own HEADER_BYTES_PER_CONNECTION
        assert get(app.url, headers=headers_of(sysmail.MAX_HEADER_BYTES - 8000)).status == 503
    finally:
        close_all(attack)
    wait_until(lambda: held(app) == 0)
    assert get(app.url, headers=headers_of(sysmail.MAX_HEADER_BYTES - 8000)).status == 200


# --------------------------------------------------------------------------- `sysmail serve` RSS


@dataclass
class Serve:
    process: subprocess.Popen[bytes]
    url: str
    ops_url: str

    def rss_mb(self, field: str = "VmRSS") -> float:
        """VmRSS (now) or VmHWM (peak) of the process, in MB."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """`python sysmail.py serve` on loopback ports of its choosing, read from its log."""
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1",
           "SYSMAIL_LISTEN": "127.0.0.1:0", "SYSMAIL_METRICS_LISTEN": "127.0.0.1:0",
           "SYSTEM_DOMAIN": "example.com", "SYSMAIL_SPOOL": str(tmp_path / "spool"),
           "SYSMAIL_OUTBOX": str(tmp_path / "outbox"), "SYSMAIL_DB": str(tmp_path / "db.sqlite")}
    log_path = tmp_path / "serve.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, str(REPO / "sysmail.py"), "serve"], env=env,
                                   cwd=tmp_path, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 15
        while not (listening := [json.loads(line) for line in log_path.read_text().splitlines()
                                 if '"listening"' in line]):
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        event = listening[0]
        yield Serve(process, event["url"], event["metrics"].removesuffix("/metrics"))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def flood(port: int, sources: list[tuple[str, int]], *, seconds: float,
          during: Callable[[], None]) -> dict[str, int]:
    """Unfinished requests with large headers, from each (address, count): every other one
    sends header lines of 8,000 bytes up to just under MAX_HEADER_BYTES (the most this server
    holds), the others lines of 65,000 bytes up to 6.4 MB (the most http.server alone would
    hold: 99 lines of 64 KiB); none ever sends the blank line. Sockets are non-blocking, served
    round-robin for at most seconds; during() is called every 0.5 s. Returns counts of what
    happened to the connections."""
    selector = selectors.DefaultSelector()
    pending: dict[socket.socket, memoryview] = {}
    outcome = {"connected": 0, "answered": 0, "held": 0, "refused at connect": 0}
    small = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers_of(sysmail.MAX_HEADER_BYTES - 4096)
    large = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + headers_of(99 * 65_000, line=65_000)
    for source, count in sources:
        for index in range(count):
            try:
                sock = connect(port, source)
            except OSError:
                outcome["refused at connect"] += 1
                continue
            outcome["connected"] += 1
            sock.setblocking(False)
            pending[sock] = memoryview(large if index % 2 else small)
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
            time.sleep(0.002)
    started = next_call = time.monotonic()
    answered: set[socket.socket] = set()
    try:
        while time.monotonic() - started < seconds:
            for key, events in selector.select(0.05):
                sock = key.fileobj
                if events & selectors.EVENT_READ:  # the server answered or closed: done
                    answered.add(sock)
                    selector.unregister(sock)
                    continue
                try:
                    sent = sock.send(pending[sock][:262_144])
                except OSError:
                    answered.add(sock)
                    selector.unregister(sock)
                    continue
                pending[sock] = pending[sock][sent:]
                if not pending[sock]:  # all sent, never finished: wait for the server
                    selector.modify(sock, selectors.EVENT_READ)
            if time.monotonic() >= next_call:
                during()
                next_call = time.monotonic() + 0.5
        outcome["answered"] = len(answered)
        outcome["held"] = outcome["connected"] - len(answered)
    finally:
        selector.close()
        close_all(list(pending))
    return outcome


def test_large_unfinished_headers_keep_serve_under_150_mb(serve: Serve) -> None:
    """The issue's second attack against `sysmail serve`: 200 unfinished requests with large
    headers from one client, then 8 clients filling every slot. Peak RSS (VmHWM) stays under
    150 MB; /healthz answers 200 for another client during the first, and on the operators'
    listener during both."""
    port = port_of(serve.url)
    before = serve.rss_mb()
    public: list[int | None] = []
    ops: list[int | None] = []

    def probe_both() -> None:
        public.append(get(serve.url, timeout=3).status)
        ops.append(get(serve.ops_url, timeout=3).status)

    one_client = flood(port, [(ATTACKER, 200)], seconds=3, during=probe_both)
    peak_one = serve.rss_mb("VmHWM")
    time.sleep(0.5)

    def probe_ops() -> None:
        ops.append(get(serve.ops_url, timeout=3).status)

    many = flood(port, [(attacker(i), 24) for i in range(1, 9)], seconds=3, during=probe_ops)
    peak = serve.rss_mb("VmHWM")
    print(f"RSS before {before:.1f} MB; peak after one client {peak_one:.1f} MB, after eight "
          f"{peak:.1f} MB; one client {one_client}; eight {many}; public /healthz {public}")
    assert one_client["connected"] == 200
    assert len(public) >= 4 and public == [200] * len(public)
    assert len(ops) >= 8 and ops == [200] * len(ops)
    assert peak < RSS_LIMIT_MB, f"peak RSS {peak:.1f} MB"
    assert get(serve.url).status == 200
