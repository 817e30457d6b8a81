"""Several relays in order of preference: failover that costs no attempt, and the way back."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FakeClock, SmtpServer

import sysmail

DOMAIN = "example.com"


class Busy421:
    """A relay that greets every connection with 421 and hangs up (a real socket server)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"smtp+plain://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.sendall(b"421 4.3.2 too busy, try another relay\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def busy_relay() -> Iterator[Busy421]:
    relay = Busy421()
    yield relay
    relay.close()


def refused_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"smtp+plain://127.0.0.1:{sock.getsockname()[1]}"  # nobody listens there


def build(first: str, second: SmtpServer, tmp_path: Path,
          clock: FakeClock) -> tuple[sysmail.App, sysmail.Sender]:
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": f"{first},{second.url}",
        "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(tmp_path / "spool"),
        "SMTP_TIMEOUT_SECONDS": "5", "SYSMAIL_SMTP_CONNECTIONS": "1"})
    app = sysmail.build_app(config, clock=clock)
    return app, app.sender()


def first_down(kind: str, busy: Busy421, plain: SmtpServer) -> str:
    if kind == "refused":
        return refused_url()
    if kind == "421":
        return busy.url
    return plain.url.replace("smtp+plain://", "smtp://")  # no STARTTLS: smtp:// will not send


@pytest.mark.parametrize("kind", ["refused", "421", "no-tls"])
def test_a_relay_that_cannot_be_used_hands_every_message_to_the_next(
        kind: str, busy_relay: Busy421, smtp_server: SmtpServer, tmp_path: Path) -> None:
    """The first relay is refused, answers 421 or offers no TLS: every message goes through
    the second at once, with no attempt counted and nothing deferred."""
    clock, plain = FakeClock(), SmtpServer("smtp+plain")
    plain.start()
    app, sender = build(first_down(kind, busy_relay, plain), smtp_server, tmp_path, clock)
    for number in range(5):
        app.enqueuer.enqueue_message(f"user{number}@example.org", "Hello", "Text.")
    try:
        counts = sender.run_once()
    finally:
        sender.close()
        plain.stop()
    assert plain.messages == []
    assert (counts.sent, counts.deferred, counts.released, counts.failed) == (5, 0, 0, 0)
    assert len(smtp_server.messages) == 5
    status = app.api.readyz(sysmail.Request("GET", "/readyz", {}, {}, b"", "127.0.0.1"))
    assert b'"status":"degraded"' in status.body and status.status == 200
    page = app.api.metrics_page(sysmail.Request("GET", "/metrics", {}, {}, b"", "x")).body
    assert b'sysmail_relay_up{relay="127.0.0.1:' in page
    assert page.count(b"sysmail_relay_up{") == 2 and b"} 0\n" in page


def test_the_first_relay_is_used_again_once_it_is_back(smtp_server: SmtpServer,
                                                       tmp_path: Path) -> None:
    primary = SmtpServer("smtp+plain")
    clock = FakeClock()
    app, sender = build(primary.url, smtp_server, tmp_path, clock)
    try:
        app.enqueuer.enqueue_message("ada@example.org", "While down", "Text.")
        sender.run_once()  # the primary is not started: the backup takes it
        assert len(smtp_server.messages) == 1
        primary.start()
        clock.advance(120)  # past the primary's own backoff
        app.enqueuer.enqueue_message("ada@example.org", "Back", "Text.")
        sender.run_once()
        assert len(primary.messages) == 1 and len(smtp_server.messages) == 1
    finally:
        sender.close()
        primary.stop()


def test_a_5xx_from_the_first_relay_stands(smtp_server: SmtpServer, tmp_path: Path) -> None:
    """A relay's refusal is its answer: the message is not shopped around."""
    primary = SmtpServer("smtp+plain")
    primary.start()
    primary.sink.script_data(["554 5.7.1 policy refusal"])
    clock = FakeClock()
    app, sender = build(primary.url, smtp_server, tmp_path, clock)
    try:
        app.enqueuer.enqueue_message("ada@example.org", "Hello", "Text.")
        counts = sender.run_once()
    finally:
        sender.close()
        primary.stop()
    assert counts.failed == 1 and smtp_server.messages == []


def test_check_probes_every_relay(busy_relay: Busy421, smtp_server: SmtpServer,
                                  tmp_path: Path) -> None:
    from conftest import run_cli

    env = {"SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": f"{busy_relay.url},{smtp_server.url}",
           "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(tmp_path / "spool")}
    result = run_cli(["check"], env)
    assert result.returncode == 0, result.stderr
    port = busy_relay.url.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}: DOWN" in result.stdout
    assert f"127.0.0.1:{smtp_server.port}: connected" in result.stdout


# --------------------------------------------------------------------------- pace


def paced_app(url: str, tmp_path: Path, clock: FakeClock) -> tuple[sysmail.App, sysmail.Sender]:
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": url, "SYSMAIL_ALLOW_UNSIGNED": "1",
        "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSMAIL_SMTP_CONNECTIONS": "1"})
    app = sysmail.build_app(config, clock=clock)
    return app, app.sender()


def drain_for(sender: sysmail.Sender, clock: FakeClock, server: SmtpServer, seconds: float,
              step: float = 0.01) -> list[float]:
    """Run the sender on the fake clock for a while; return when each message arrived."""
    arrivals: list[float] = []
    end = clock() + seconds
    while clock() < end:
        before = len(server.messages)
        sender.run_once()
        arrivals += [clock()] * (len(server.messages) - before)
        clock.advance(step)
    return arrivals


def test_a_relay_gets_no_more_than_its_rate_and_urgent_mail_goes_first(
        smtp_server: SmtpServer, tmp_path: Path) -> None:
    """?rate=20: over 5 seconds of a bulk backlog the relay receives about 100 messages and
    never more than 20 in any second (plus the one-message share kept for urgent mail); a
    two-factor code queued in the middle of the backlog leaves at once."""
    clock = FakeClock()
    app, sender = paced_app(f"{smtp_server.url}?rate=20", tmp_path, clock)
    for number in range(300):
        app.enqueuer.enqueue_message(f"user{number}@example.org", "News", "Text.")
    try:
        arrivals = drain_for(sender, clock, smtp_server, 2.5)
        app.enqueuer.enqueue_template("two-factor-code", "ada@example.org", {"code": "123456"})
        urgent_queued = clock()
        arrivals += drain_for(sender, clock, smtp_server, 2.5)
    finally:
        sender.close()
    start = arrivals[0]
    per_second = [sum(start + s <= t < start + s + 1 for t in arrivals) for s in range(4)]
    assert all(count <= 21 for count in per_second), per_second
    assert 80 <= len(arrivals) <= 101  # paced, not stalled (the 10 ms steps round it down)
    codes = [i for i, m in enumerate(smtp_server.messages) if b"sign-in code" in m.data]
    assert len(codes) == 1
    assert arrivals[codes[0]] - urgent_queued <= 0.02  # not behind the backlog
    assert sum(1 for m in smtp_server.messages) == len(arrivals)


def test_a_throttling_reply_slows_the_relay_and_costs_no_attempt(
        smtp_server: SmtpServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """451 4.7.1 "rate exceeded": the message waits without spending an attempt, the relay's
    pace halves, and a log line says when pacing starts and when it ends."""
    caplog.set_level(logging.INFO, logger="sysmail")
    clock = FakeClock()
    app, sender = paced_app(smtp_server.url, tmp_path, clock)
    smtp_server.sink.script_data(["451 4.7.1 Maximum sending rate exceeded"])
    app.enqueuer.enqueue_message("ada@example.org", "Hello", "Text.")
    try:
        counts = sender.run_once()
        assert (counts.paced, counts.deferred, counts.failed) == (1, 0, 0)
        ((name),) = (tmp_path / "spool" / "new").iterdir()
        assert name.name.split(".")[2] == "0"  # no attempt spent
        assert sysmail.SpoolName.parse(name.name).due_ms / 1000 > clock()  # back when paced
        page = app.api.metrics_page(sysmail.Request("GET", "/metrics", {}, {}, b"", "x")).body
        assert b"sysmail_relay_rate{" in page  # the relay is paced now
        clock.advance(3)
        assert sender.run_once().sent == 1
    finally:
        sender.close()
    events = [r.getMessage() for r in caplog.records]
    assert events.index("pacing_started") < events.index("pacing_ended")


def test_a_daily_quota_keeps_a_share_for_urgent_mail(smtp_server: SmtpServer,
                                                     tmp_path: Path) -> None:
    """?daily=10: bulk stops at 8, urgent mail still goes out up to 10."""
    clock = FakeClock()
    app, sender = paced_app(f"{smtp_server.url}?daily=10", tmp_path, clock)
    for number in range(12):
        app.enqueuer.enqueue_message(f"user{number}@example.org", "News", "Text.")
    try:
        drain_for(sender, clock, smtp_server, 1)
        assert len(smtp_server.messages) == 8
        for number in range(3):
            app.enqueuer.enqueue_template("two-factor-code", f"u{number}@example.org",
                                          {"code": "123456"})
        drain_for(sender, clock, smtp_server, 1)
    finally:
        sender.close()
    assert len(smtp_server.messages) == 10


def test_relay_limits_are_checked_in_the_url() -> None:
    url = sysmail.SmtpUrl.parse("smtps://u:p@relay.example:465?rate=14&daily=50000")
    assert (url.rate, url.daily, url.port) == (14.0, 50000, 465)
    for bad in ("smtp://h?rate=fast", "smtp://h?rate=0", "smtp://h?burst=3"):
        with pytest.raises(ValueError):
            sysmail.SmtpUrl.parse(bad)


def fleet_app(url: str, redis_url: str, folder: Path,
              clock: FakeClock) -> tuple[sysmail.App, sysmail.Sender]:
    """One host of a fleet: its own spool, the fleet's Redis."""
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": url, "SYSMAIL_ALLOW_UNSIGNED": "1",
        "SYSMAIL_SPOOL": str(folder / "spool"), "SYSMAIL_SMTP_CONNECTIONS": "1",
        "REDIS_URL": redis_url})
    app = sysmail.build_app(config, clock=clock)
    return app, app.sender()


def test_with_redis_two_hosts_share_one_relay_rate(smtp_server: SmtpServer, redis_server,
                                                   tmp_path: Path) -> None:
    """?rate=20 with REDIS_URL: two hosts draining their backlogs at once send the relay 20 a
    second between them, not 20 each; they share the daily quota as well."""
    clock = FakeClock()
    hosts = [fleet_app(f"{smtp_server.url}?rate=20&daily=70", redis_server.url,
                       tmp_path / name, clock) for name in ("a", "b")]
    for app, _ in hosts:
        for number in range(60):
            app.enqueuer.enqueue_message(f"user{number}@example.org", "News", "Text.")
    arrivals: list[float] = []
    start = clock()
    try:
        while clock() < start + 4:
            for _, sender in hosts:
                before = len(smtp_server.messages)
                sender.run_once()
                arrivals += [clock()] * (len(smtp_server.messages) - before)
            clock.advance(0.01)
    finally:
        for _, sender in hosts:
            sender.close()
    per_second = [sum(start + s <= t < start + s + 1 for t in arrivals) for s in range(4)]
    assert all(count <= 22 for count in per_second), per_second
    assert len(arrivals) == 56, per_second  # bulk's share of the day's 70 (80 %), then no more
    held = [app.spool.counts()["new"] + app.spool.counts()["deferred"] for app, _ in hosts]
    assert sum(held) == 120 - 56 and all(held), held  # both sent, both still hold mail


def test_with_redis_down_each_host_paces_alone(smtp_server: SmtpServer, redis_server,
                                               tmp_path: Path) -> None:
    """Redis stops answering: a host keeps its own pace and still sends."""
    clock = FakeClock()
    app, sender = fleet_app(f"{smtp_server.url}?rate=20", redis_server.url, tmp_path, clock)
    for number in range(40):
        app.enqueuer.enqueue_message(f"user{number}@example.org", "News", "Text.")
    redis_server.stop()
    try:
        arrivals = drain_for(sender, clock, smtp_server, 1.0)
    finally:
        sender.close()
    assert 15 <= len(arrivals) <= 22


def test_each_relay_has_its_own_tls_settings(tls_smtp_server: SmtpServer, tmp_path: Path,
                                             cli) -> None:
    """ca_file= and tls_verify= per relay: one relay is checked against its own CA, another
    (a lab relay) unchecked, while SMTP_CA_FILE names neither's certificate."""
    from conftest import make_self_signed_cert
    (tmp_path / "other").mkdir()
    other_ca = make_self_signed_cert(tmp_path / "other").ca_file
    first = f"{tls_smtp_server.url}?ca_file={tls_smtp_server.ca_file}"
    second = f"{tls_smtp_server.url}?tls_verify=0"
    env = {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_ALLOW_UNSIGNED": "1",
           "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SMTP_CA_FILE": str(other_ca)}
    for url, reached in ((first, True), (second, True), (tls_smtp_server.url, False)):
        result = cli(["check"], {**env, "SMTP_URL": url})
        assert ("relay: logged in as mailer" in result.stdout) == reached, \
            result.stdout + result.stderr
    for bad in (f"{tls_smtp_server.url}?ca_file=/nonexistent", "smtp://h?tls_verify=maybe"):
        result = cli(["check"], {**env, "SMTP_URL": bad})
        assert result.returncode == 78 and "Traceback" not in result.stderr


def test_the_smtp_url_credential_holds_the_list(smtp_server: SmtpServer, tmp_path: Path,
                                                cli) -> None:
    """systemd's LoadCredential=smtp-url: a file holding two relays (and a trailing newline)
    is the same list as SMTP_URL; check probes both."""
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    down = refused_url()
    (credentials / "smtp-url").write_text(f"{down},{smtp_server.url}\n")
    result = cli(["check"], {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_ALLOW_UNSIGNED": "1",
                             "SYSMAIL_SPOOL": str(tmp_path / "spool"),
                             "CREDENTIALS_DIRECTORY": str(credentials)})
    assert result.returncode == 0, result.stderr
    assert f"127.0.0.1:{down.rsplit(':', 1)[1]}: DOWN" in result.stdout
    assert f"127.0.0.1:{smtp_server.port}: connected" in result.stdout
