"""Several relays in order of preference: failover that costs no attempt, and the way back."""

from __future__ import annotations

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
