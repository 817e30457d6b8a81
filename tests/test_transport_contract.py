"""One contract, every Transport: the SMTP relay (lockstep and pipelining) and the outbox folder.

begin() negotiates the envelope, finish() sends the content of what begin() opened, abort()
gives it up; open() says whether it opened, probe() connects without sending, close() is safe
at any time. The sender relies on each line, so each is checked through behaviour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SmtpServer

import sysmail

SENDER = "noreply@example.com"
DATA = b"Subject: contract\r\nMessage-ID: <contract@example.com>\r\n\r\n.a dotted line\r\nend\r\n"


@dataclass
class Rig:
    """A transport and a way to read what it delivered (envelope recipients, bytes)."""

    transport: sysmail.Transport
    delivered: Callable[[], list[tuple[list[str], bytes]]]


def _smtp_rig(server: SmtpServer) -> Rig:
    config = sysmail.Config.from_env({"SMTP_URL": server.url, "SYSTEM_DOMAIN": "example.com",
                                      "SYSMAIL_ALLOW_UNSIGNED": "1"})
    return Rig(sysmail.transport_from_config(config),
               lambda: [(m.rcpt_tos, m.data) for m in server.messages])


def _outbox_rig(folder: Path) -> Rig:
    def delivered() -> list[tuple[list[str], bytes]]:
        files = sorted(folder.glob("*.eml")) if folder.is_dir() else []
        return [([], path.read_bytes()) for path in files]
    return Rig(sysmail.OutboxTransport(folder), delivered)


@pytest.fixture(params=["smtp-lockstep", "smtp-pipelining", "outbox"])
def rig(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Rig]:
    if request.param == "outbox":
        made = _outbox_rig(tmp_path / "outbox")
    else:
        fixture = "pipelining_smtp_server" if "pipelining" in request.param else "smtp_server"
        made = _smtp_rig(request.getfixturevalue(fixture))
    yield made
    made.transport.close()


def _content(rig: Rig) -> list[bytes]:
    return [data for _, data in rig.delivered()]


def test_open_says_whether_it_opened(rig: Rig) -> None:
    """open: make sure a usable connection is open; True when a new one was opened."""
    assert rig.transport.open() is True
    assert rig.transport.open() is False


def test_begin_then_finish_delivers_the_bytes(rig: Rig) -> None:
    """begin negotiates and accepts; finish sends the content and returns the final reply."""
    envelope = rig.transport.begin(SENDER, ("ada@example.org", "bob@example.org"))
    assert envelope == sysmail.Envelope(("ada@example.org", "bob@example.org"), {})
    result = rig.transport.finish(DATA)
    assert (result.code, result.accepted) == (250, ("ada@example.org", "bob@example.org"))
    assert _content(rig) == [DATA]


def test_abort_sends_nothing_and_the_next_transaction_works(rig: Rig) -> None:
    """abort: give up the open transaction without sending its content."""
    rig.transport.begin(SENDER, ("ada@example.org",))
    rig.transport.abort()
    assert _content(rig) == []
    rig.transport.begin(SENDER, ("bob@example.org",))
    assert rig.transport.finish(DATA).code == 250
    assert _content(rig) == [DATA]


def test_many_transactions_in_a_row(rig: Rig) -> None:
    """One transport serves transaction after transaction."""
    for number in range(5):
        rig.transport.begin(SENDER, (f"user{number}@example.org",))
        rig.transport.finish(DATA)
    assert _content(rig) == [DATA] * 5


def test_probe_checks_without_sending(rig: Rig) -> None:
    """probe: connect and log in without sending; return what was checked."""
    steps = rig.transport.probe()
    assert steps and all(isinstance(step, str) for step in steps)
    assert _content(rig) == []


def test_close_is_safe_at_any_time(rig: Rig) -> None:
    """close: safe before use, twice, and after a transaction; the transport serves again."""
    rig.transport.close()
    for _ in range(2):
        rig.transport.begin(SENDER, ("ada@example.org",))
        rig.transport.finish(DATA)
        rig.transport.close()
        rig.transport.close()
    assert _content(rig) == [DATA, DATA]


@pytest.mark.parametrize("fixture", ["smtp_server", "pipelining_smtp_server"])
def test_begin_reports_refused_recipients_as_data(request: pytest.FixtureRequest,
                                                  fixture: str) -> None:
    """begin: who is accepted and who is refused (with the reply) is a value, not an error."""
    server: SmtpServer = request.getfixturevalue(fixture)
    server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user"})
    rig = _smtp_rig(server)
    try:
        envelope = rig.transport.begin(SENDER, ("ok@example.org", "bad@example.org"))
        assert envelope == sysmail.Envelope(("ok@example.org",),
                                            {"bad@example.org": (550, "5.1.1 no such user")})
        assert rig.transport.finish(DATA).accepted == ("ok@example.org",)
        assert rig.delivered() == [(["ok@example.org"], DATA)]
    finally:
        rig.transport.close()


@pytest.mark.parametrize("fixture", ["smtp_server", "pipelining_smtp_server"])
def test_refusals_at_data_are_errors_with_the_code(request: pytest.FixtureRequest,
                                                   fixture: str) -> None:
    """finish raises TemporaryDeliveryError or PermanentDeliveryError carrying the SMTP code."""
    server: SmtpServer = request.getfixturevalue(fixture)
    server.sink.script_data(["451 4.3.0 try later", "554 5.7.1 rejected"])
    rig = _smtp_rig(server)
    try:
        for error, code in ((sysmail.TemporaryDeliveryError, 451),
                            (sysmail.PermanentDeliveryError, 554)):
            rig.transport.begin(SENDER, ("ada@example.org",))
            with pytest.raises(error) as caught:
                rig.transport.finish(DATA)
            assert caught.value.smtp_code == code
        assert _content(rig) == []
    finally:
        rig.transport.close()


def test_an_unreachable_relay_is_relay_unavailable(smtp_server: SmtpServer) -> None:
    """begin raises RelayUnavailable (no message's fault) when the relay cannot be reached."""
    rig = _smtp_rig(smtp_server)
    smtp_server.stop()
    with pytest.raises(sysmail.RelayUnavailable):
        rig.transport.begin(SENDER, ("ada@example.org",))
