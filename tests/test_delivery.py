"""Delivery tests: spool -> Sender -> real aiosmtpd relays, DKIM, retries, CLI, thread, outbox.

Time is a FakeClock injected into Mailer/Spool/Sender; jitter is an injected rand().
Tests marked @both_paths run twice: against a relay without PIPELINING (lockstep MAIL, RCPT,
DATA) and against one advertising it (RFC 2920: MAIL + RCPTs + DATA in one write).
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from conftest import (
    Ed25519Key,
    FakeClock,
    Received,
    RsaKey,
    SinkSMTP,
    SmtpServer,
    dkim_dns,
    run_cli,
)

import sysmail
from sysmail import DeliveryCounts

DOMAIN = "example.com"
RSA_DNS = f"default._domainkey.{DOMAIN}."
ED_DNS = f"ed25519._domainkey.{DOMAIN}."
RESET_URL = "https://dashboard.example.com/reset?token=tok-1234567890"
SENDER = f"noreply@{DOMAIN}"
RELAY_FIXTURES = {"lockstep": "smtp_server", "pipelining": "pipelining_smtp_server"}
both_paths = pytest.mark.parametrize("relay", list(RELAY_FIXTURES))


# --------------------------------------------------------------------------- helpers


def sequence(*values: float) -> Callable[[], float]:
    """A rand() returning values in turn, then repeating the last one."""
    pending = list(values)

    def rand() -> float:
        return pending.pop(0) if len(pending) > 1 else pending[0]

    return rand


def base_env(tmp_path: Path, rsa_key: RsaKey, server: SmtpServer | None = None) -> dict[str, str]:
    """Environment for a Config: the server's relay (outbox when None), RSA key, spool."""
    env = {
        "SYSTEM_DOMAIN": DOMAIN,
        "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem,
        "SYSMAIL_SPOOL": str(tmp_path / "spool"),
        "SYSMAIL_OUTBOX": str(tmp_path / "outbox"),
    }
    if server is not None:
        env["SMTP_URL"] = server.url
        if server.ca_file is not None:
            env["SMTP_CA_FILE"] = str(server.ca_file)
    return env


@dataclass
class Rig:
    """A Mailer and a Sender sharing one spool and one fake clock, against one relay."""

    clock: FakeClock
    mailer: sysmail.Mailer
    sender: sysmail.Sender
    server: SmtpServer
    spool: Path


def build_rig(
    env: dict[str, str],
    server: SmtpServer,
    rand: Callable[[], float] | None = None,
    batch_size: int = sysmail.SENDER_BATCH_SIZE,
) -> Rig:
    """Mailer(config, clock) plus Sender(...) with the config's retry schedules and rand (0.5:
    no jitter)."""
    config = sysmail.Config.from_env(env)
    clock = FakeClock()
    mailer = sysmail.Mailer(config, clock=clock)
    sender = sysmail.Sender(
        mailer.spool,
        sysmail.transport_from_config(config),
        sysmail.DkimSigner.from_config(config),
        clock=clock,
        retry=sysmail.RetryPolicy(config.retry_schedule, config.retry_schedules),
        rand=rand or sequence(0.5),
        batch_size=batch_size,
    )
    return Rig(clock, mailer, sender, server, config.spool_dir)


def send_now(transport: sysmail.Transport, rcpts: tuple[str, ...],
             data: bytes) -> sysmail.SendResult:
    """One message through the Transport contract: begin, then finish."""
    envelope = transport.begin(SENDER, rcpts)
    assert envelope.accepted == rcpts
    return transport.finish(data)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    """Rigs built in a test; their SMTP connections are closed afterwards."""
    built: list[Rig] = []
    yield built
    for rig in built:
        rig.sender.transport.close()


@pytest.fixture
def relay() -> str:
    """The relay's transaction path; @both_paths parametrizes it to each of RELAY_FIXTURES."""
    return "lockstep"


@pytest.fixture
def relay_server(request: pytest.FixtureRequest, relay: str) -> SmtpServer:
    """The plain SMTP sink, advertising PIPELINING when relay == "pipelining"."""
    server: SmtpServer = request.getfixturevalue(RELAY_FIXTURES[relay])
    assert server.sink.pipelining == (relay == "pipelining")
    return server


@pytest.fixture
def rig(
    rigs: list[Rig], relay_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> Rig:
    """A rig against the plain SMTP sink (jitter rand() = 0.5, i.e. none)."""
    made = build_rig(base_env(tmp_path, rsa_key, relay_server), relay_server)
    rigs.append(made)
    return made


def entries(spool: Path, state: str) -> list[tuple[int, int, int, str]]:
    """(priority, due_ms, attempt, id) of the messages in a spool folder."""
    found = []
    for path in sorted((spool / state).iterdir()):
        if path.name.endswith(".json"):
            continue
        priority, due, attempt, ident = path.name.split(".")[:4]
        found.append((int(priority), int(due), int(attempt), ident))
    return found


def spool_header(spool: Path, state: str) -> dict:
    """The JSON header of the only message in a spool folder."""
    (path,) = [p for p in (spool / state).iterdir() if not p.name.endswith(".json")]
    head = path.read_bytes().partition(b"\n")[0]
    return json.loads(head.split(b" ", 2)[2])  # sysmail-spool/2 MAC JSON


def parse(data: bytes) -> email.message.Message:
    """Parse received bytes keeping raw header values."""
    return email.message_from_bytes(data, policy=email.policy.compat32)


def dkim_tags(header_value: str) -> dict[str, str]:
    """The tags of a (folded) DKIM-Signature header value."""
    unfolded = re.sub(r"\s+", "", header_value)
    return dict(tag.partition("=")[::2] for tag in unfolded.split(";") if tag)


def verify_all(data: bytes, dns: Callable[..., bytes]) -> list[bool]:
    """Verify every DKIM-Signature of a message, by index."""
    count = len(parse(data).get_all("DKIM-Signature") or [])
    return [bool(dkim.DKIM(data).verify(idx=i, dnsfunc=dns)) for i in range(count)]


def key_chunks(pem: str, size: int = 40) -> list[str]:
    """A few size-character pieces of the base64 body of a PEM key."""
    body = "".join(line for line in pem.splitlines() if not line.startswith("-----"))
    chunks = [body[i : i + size] for i in range(0, len(body) - size, size)]
    picked = [chunks[0], chunks[len(chunks) // 2], chunks[-1]]
    assert all(len(c) == size for c in picked)
    return picked


def wait_until(condition: Callable[[], bool], timeout: float = 5) -> None:
    """Poll condition until true, else fail."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def rsa_dns(rsa_key: RsaKey) -> Callable[..., bytes]:
    """dnsfunc publishing the RSA key under default._domainkey.example.com."""
    return dkim_dns({RSA_DNS: rsa_key.dns_record})


# --------------------------------------------------------------------------- DKIM


@both_paths
def test_queued_mail_arrives_with_valid_rsa_signature(rig: Rig, rsa_key: RsaKey) -> None:
    """enqueue + run_once delivers one signed message and empties the spool."""
    message_id = rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)

    counts = rig.sender.run_once()

    assert counts == DeliveryCounts(sent=1)
    (received,) = rig.server.messages
    assert received.mail_from == f"noreply@{DOMAIN}"
    assert received.rcpt_tos == ["ada@example.org"]
    message = parse(received.data)
    assert message["Message-ID"] == message_id
    assert message["Auto-Submitted"] == "auto-generated"
    assert dkim.verify(received.data, dnsfunc=rsa_dns(rsa_key))
    assert not dkim.verify(received.data, dnsfunc=dkim_dns({}))  # the key really is used
    (signature,) = message.get_all("DKIM-Signature")
    tags = dkim_tags(signature)
    assert tags["a"] == "rsa-sha256"
    assert tags["c"] == "relaxed/relaxed"
    assert "l" not in tags
    assert tags["d"] == DOMAIN
    assert tags["s"] == "default"
    signed = tags["h"].lower().split(":")
    assert signed[:6] == ["from", "from", "to", "to", "subject", "subject"]
    assert signed.count("message-id") == 2
    for name in ("date", "mime-version", "content-type", "auto-submitted"):
        assert name in signed
    for state in ("new", "cur", "failed"):
        assert entries(rig.spool, state) == []


@pytest.mark.parametrize("form", ["pem", "seed_b64"])
def test_dual_rsa_and_ed25519_signatures_both_verify(
    rigs: list[Rig],
    smtp_server: SmtpServer,
    tmp_path: Path,
    rsa_key: RsaKey,
    ed25519_key: Ed25519Key,
    form: str,
) -> None:
    """With an ed25519 key too, two DKIM-Signature headers arrive and each verifies."""
    env = base_env(tmp_path, rsa_key, smtp_server)
    env["SYSTEM_DKIM_ED25519_PRIVATE_KEY"] = getattr(ed25519_key, form)
    rig = build_rig(env, smtp_server)
    rigs.append(rig)
    rig.mailer.enqueue("two-factor-code", to="ada@example.org", code="482913")

    assert rig.sender.run_once() == DeliveryCounts(sent=1)

    data = rig.server.messages[0].data
    dns = dkim_dns({RSA_DNS: rsa_key.dns_record, ED_DNS: ed25519_key.dns_record})
    signatures = [dkim_tags(v) for v in parse(data).get_all("DKIM-Signature")]
    assert [(t["a"], t["s"], t["d"]) for t in signatures] == [
        ("rsa-sha256", "default", DOMAIN),
        ("ed25519-sha256", "ed25519", DOMAIN),
    ]
    assert verify_all(data, dns) == [True, True]
    assert dkim.verify(data, dnsfunc=dns)
    # each signature depends on its own published key
    only_rsa = dkim_dns({RSA_DNS: rsa_key.dns_record})
    assert verify_all(data, only_rsa) == [True, False]


def test_added_header_copies_break_the_signature(rig: Rig, rsa_key: RsaKey) -> None:
    """Over-signing: a second From/To/Subject/Message-ID, at the top or bottom, fails."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    rig.sender.run_once()
    data = rig.server.messages[0].data
    dns = rsa_dns(rsa_key)
    assert dkim.verify(data, dnsfunc=dns)
    forged = [
        b"From: Mallory <mallory@example.com>",
        b"To: mallory@example.net",
        b"Subject: Please wire the money",
        b"Message-ID: <forged@example.com>",
    ]
    for header in forged:
        top = header + b"\r\n" + data
        bottom = data.replace(b"\r\n\r\n", b"\r\n" + header + b"\r\n\r\n", 1)
        assert not dkim.verify(top, dnsfunc=dns), header
        assert not dkim.verify(bottom, dnsfunc=dns), header


def test_signature_domain_follows_from_and_reply_to_is_over_signed(
    rigs: list[Rig], smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """d= is the From domain (not SYSTEM_DOMAIN); Reply-To is signed twice when set."""
    env = base_env(tmp_path, rsa_key, smtp_server)
    env["SYSTEM_FROM"] = "alerts@mail.example.net"
    env["SYSTEM_REPLY_TO"] = "support@example.com"
    rig = build_rig(env, smtp_server)
    rigs.append(rig)
    rig.mailer.enqueue("security-alert", to="ada@example.org", event="new sign-in")
    rig.sender.run_once()

    data = rig.server.messages[0].data
    tags = dkim_tags(parse(data)["DKIM-Signature"])
    assert tags["d"] == "mail.example.net"
    assert tags["h"].lower().split(":").count("reply-to") == 2
    dns = dkim_dns({"default._domainkey.mail.example.net.": rsa_key.dns_record})
    assert dkim.verify(data, dnsfunc=dns)
    forged = data.replace(b"\r\n\r\n", b"\r\nReply-To: mallory@example.net\r\n\r\n", 1)
    assert not dkim.verify(forged, dnsfunc=dns)


@both_paths
def test_signature_survives_non_ascii_dot_lines_and_long_lines(
    rigs: list[Rig], relay_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """RFC 2047 headers, quoted-printable parts and dot-stuffed lines still verify."""
    env = base_env(tmp_path, rsa_key, relay_server)
    env["SYSTEM_FROM_NAME"] = "Équipe Exemple ✓"
    rig = build_rig(env, relay_server)
    rigs.append(rig)
    text = "Grüße aus Köln\n.a line starting with a dot\n..two dots\n" + "x" * 1200 + "\n"
    message_id = rig.mailer.enqueue_message(
        ["ada@example.org", f"{'u' * 60}@example.org"],
        "Résumé prêt ✓ " + "long words " * 12,
        text,
        "<p>héllo</p>\n.dot line",
    )

    assert rig.sender.run_once() == DeliveryCounts(sent=1)

    data = rig.server.messages[0].data
    assert dkim.verify(data, dnsfunc=rsa_dns(rsa_key))
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Message-ID"] == message_id
    assert message["Subject"].startswith("Résumé prêt ✓")
    plain = message.get_body(("plain",)).get_content().replace("\r\n", "\n")
    assert ".a line starting with a dot\n..two dots\n" + "x" * 1200 in plain


# --------------------------------------------------------------------------- retries


@both_paths
def test_451_twice_then_delivered_once_with_backoff_and_jitter(
    rigs: list[Rig], relay_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """Two 451s defer by 1 s then 2 s (jitter +-20 %); the third try delivers, once."""
    rig = build_rig(base_env(tmp_path, rsa_key, relay_server), relay_server, sequence(0.0, 0.999))
    rigs.append(rig)
    clock, sink = rig.clock, relay_server.sink
    message_id = rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    ((_, _, attempt0, ident),) = entries(rig.spool, "new")
    assert attempt0 == 0
    sink.script_data(["451 4.3.0 later", "451 4.3.0 later"])

    assert rig.sender.run_once() == DeliveryCounts(deferred=1)
    ((_, due1, attempt1, ident1),) = entries(rig.spool, "new")
    assert (attempt1, ident1) == (1, ident)
    assert abs(due1 - (clock() + 0.8) * 1000) <= 1  # 1 s with jitter -20 %
    assert message_id.encode() in next((rig.spool / "new").iterdir()).read_bytes()

    clock.advance(0.79)
    assert rig.sender.run_once() == DeliveryCounts()  # not due yet
    assert sink.data_attempts == 1
    clock.advance(0.02)
    assert rig.sender.run_once() == DeliveryCounts(deferred=1)
    ((_, due2, attempt2, ident2),) = entries(rig.spool, "new")
    assert (attempt2, ident2) == (2, ident)
    assert abs(due2 - (clock() + 2 * 1.1996) * 1000) <= 1  # 2 s with jitter +19.96 %
    assert message_id.encode() in next((rig.spool / "new").iterdir()).read_bytes()

    clock.advance(2.39)
    assert rig.sender.run_once() == DeliveryCounts()
    assert sink.data_attempts == 2
    clock.advance(0.02)
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    clock.advance(60)
    assert rig.sender.run_once() == DeliveryCounts()

    assert sink.data_attempts == 3
    (received,) = relay_server.messages
    assert parse(received.data)["Message-ID"] == message_id
    assert dkim.verify(received.data, dnsfunc=rsa_dns(rsa_key))
    for state in ("new", "cur", "failed"):
        assert entries(rig.spool, state) == []


@both_paths
def test_550_fails_with_reply_and_cli_retry_brings_it_back(
    rig: Rig, rsa_key: RsaKey
) -> None:
    """550 -> failed/ with code and reply; `sysmail failed` lists it; `retry ID` requeues it.
    (A mail carrying a one-time link or code is redacted instead: see test_faults.py.)"""
    message_id = rig.mailer.enqueue("security-alert", to="ada@example.org",
                                    event="a new sign-in")
    rig.server.sink.script_data(["550 5.7.1 message content rejected"])

    assert rig.sender.run_once() == DeliveryCounts(failed=1)
    assert rig.server.messages == []
    assert entries(rig.spool, "new") == []
    ((_, _, _, ident),) = entries(rig.spool, "failed")
    (letter,) = rig.mailer.spool.failed()
    assert letter["id"] == ident
    assert letter["reason"] == "rejected"
    assert letter["code"] == 550
    assert "5.7.1 message content rejected" in letter["reply"]
    assert letter["rfcMessageId"] == message_id
    assert letter["to"] == ["ada@example.org"]

    cli_env = {"SYSMAIL_SPOOL": str(rig.spool)}
    listed = run_cli(["failed"], cli_env)
    assert listed.returncode == 0, listed.stderr
    (line,) = [ln for ln in listed.stdout.splitlines() if ident in ln]
    assert "security-alert" in line
    assert "rejected 550" in line
    assert "5.7.1 message content rejected" in line
    as_json = run_cli(["failed", "--json"], cli_env)
    assert json.loads(as_json.stdout) == [letter]

    retried = run_cli(["retry", ident], cli_env)
    assert retried.returncode == 0, retried.stderr
    assert "requeued 1 message(s)" in retried.stdout
    assert [(a, i) for _, _, a, i in entries(rig.spool, "new")] == [(0, ident)]
    assert list((rig.spool / "failed").iterdir()) == []

    rig.clock.advance(60)  # the CLI stamped "due now" with the real clock
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    (received,) = rig.server.messages
    assert parse(received.data)["Message-ID"] == message_id
    assert dkim.verify(received.data, dnsfunc=rsa_dns(rsa_key))
    assert rig.mailer.spool.failed() == []


@both_paths
def test_temporary_failures_are_retried_until_the_deliver_by_time(rig: Rig) -> None:
    """451 after 451: retried 1, 2, 4, 8, 16 ... s apart, then every 15 minutes, until the
    next try would fall after the message's deliver-by time (a reset link's 60 minutes); then
    it expires into failed/ with the relay's last reply. No fixed number of attempts."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    rig.server.sink.script_data(["451 4.3.0 later"] * 100)
    deadline = rig.clock() + 3600
    delays = []
    while rig.sender.run_once() == DeliveryCounts(deferred=1):
        ((_, due, _, _),) = entries(rig.spool, "new")
        delays.append(round(due / 1000 - rig.clock()))
        rig.clock.advance(due / 1000 - rig.clock() + 0.01)
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 900, 900]
    assert rig.clock() + 900 >= deadline  # one more try would come too late
    assert rig.server.sink.data_attempts == len(delays) + 1
    assert rig.server.messages == []
    (letter,) = rig.mailer.spool.failed()
    assert (letter["reason"], letter["code"]) == ("expired", 451)
    assert "4.3.0 later" in letter["reply"]
    rig.clock.advance(3600)
    assert rig.sender.run_once() == DeliveryCounts()


@both_paths
def test_a_relay_answering_451_for_ten_minutes_delivers_when_it_recovers(rig: Rig) -> None:
    """A billing notice (deliver-by: 3 days) refused for ten minutes goes out after that."""
    rig.mailer.enqueue("billing-notification", to="ada@example.org", summary="Invoice")
    rig.server.sink.script_data(["451 4.7.0 greylisted, try later"] * 9)  # 1+2+...+256 = 511 s
    started = rig.clock()
    while not rig.server.messages:
        counts = rig.sender.run_once()
        assert counts.failed == counts.expired == 0
        if not rig.server.messages:
            ((_, due, _, _),) = entries(rig.spool, "new")
            rig.clock.advance(due / 1000 - rig.clock() + 0.01)
    assert 500 < rig.clock() - started < 1200
    assert rig.server.sink.data_attempts == 10
    assert rig.mailer.spool.failed() == []


def test_a_retry_schedule_is_set_per_kind_from_the_environment(tmp_path: Path) -> None:
    config = sysmail.Config.from_env({"SYSMAIL_SPOOL": str(tmp_path),
                                      "SYSMAIL_RETRY_SCHEDULE": "5,1m,1h",
                                      "SYSMAIL_RETRY_SCHEDULE_TWO_FACTOR_CODE": "1,2"})
    policy = sysmail.RetryPolicy(config.retry_schedule, config.retry_schedules)
    assert [policy.delay(n, 0.5) for n in (1, 2, 3, 9)] == [5, 60, 3600, 3600]
    assert [policy.delay(n, 0.5, "two-factor-code") for n in (1, 2, 5)] == [1, 2, 2]
    for bad in ({"SYSMAIL_RETRY_SCHEDULE": "soon"}, {"SYSMAIL_RETRY_SCHEDULE": "0,5"}):
        with pytest.raises(sysmail.ConfigError, match="SYSMAIL_RETRY_SCHEDULE"):
            sysmail.Config.from_env(bad)
    typo = sysmail.Config.from_env({"SYSMAIL_SPOOL": str(tmp_path),
                                    "SYSMAIL_RETRY_SCHEDULE_TWO_FACTOR": "1"})
    with pytest.raises(sysmail.ConfigError, match="names no kind of mail"):
        sysmail.build_app(typo).sender()


def test_a_deferred_message_waits_by_the_schedule_of_its_kind(
        smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey, rigs: list[Rig]) -> None:
    """SYSMAIL_RETRY_SCHEDULE_TWO_FACTOR_CODE=7: a code the relay defers is due again in 7 s,
    an alert by the general schedule (5 minutes)."""
    rig = build_rig({**base_env(tmp_path, rsa_key, smtp_server), "SYSMAIL_RETRY_SCHEDULE": "5m",
                     "SYSMAIL_RETRY_SCHEDULE_TWO_FACTOR_CODE": "7"}, smtp_server)
    rigs.append(rig)
    rig.mailer.enqueue("two-factor-code", to="ada@example.org", code="123456")
    rig.mailer.enqueue("security-alert", to="bob@example.org", event="x")
    smtp_server.sink.script_data(["451 4.3.0 later", "451 4.3.0 later"])
    assert rig.sender.run_once() == DeliveryCounts(deferred=2)
    due = sorted(due_ms / 1000 - rig.clock() for _, due_ms, _, _ in entries(rig.spool, "new"))
    assert due == [7, 300]


@pytest.mark.parametrize(("waited", "outcome"), [(59.5, "deferred"), (60, "expired")])
def test_a_retry_due_at_the_deliver_by_time_expires_now(
        smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey, rigs: list[Rig],
        waited: float, outcome: str) -> None:
    """A message that must be delivered within 120 s, deferred by the relay 60 s after it
    was queued with 60 s to the next try: that try would fall at its deliver-by time, too
    late, so it expires with the relay's reply now; half a second earlier it is deferred."""
    rig = build_rig({**base_env(tmp_path, rsa_key, smtp_server),
                     "SYSMAIL_RETRY_SCHEDULE": "60"}, smtp_server)
    rigs.append(rig)
    rig.mailer.enqueue_message("ada@example.org", "Hello", "Text.", ttl_seconds=120)
    rig.clock.advance(waited)
    smtp_server.sink.script_data(["451 4.3.0 later"])
    counts = rig.sender.run_once()
    assert (counts.deferred, counts.expired) == ((1, 0) if outcome == "deferred" else (0, 1))


def test_a_deferred_message_keeps_the_relays_reply_for_the_queue_listing(rig: Rig) -> None:
    """A 451 defers the message, and `sysmail queue` (Spool.entries) shows that reply as its
    last one: code and text, as the relay said them."""
    rig.mailer.enqueue("security-alert", to="ada@example.org", event="x")
    rig.server.sink.script_data(["451 4.3.0 Try again later"])
    assert rig.sender.run_once() == DeliveryCounts(deferred=1)
    (row,) = rig.mailer.spool.entries()
    assert (row["attempt"], row["last_reply"]) == (1, "451 4.3.0 Try again later")


def test_status_shows_the_waiting_retries_and_the_soonest(rig: Rig) -> None:
    rig.mailer.enqueue("security-alert", to="ada@example.org", event="x")
    rig.server.sink.script_data(["451 4.3.0 later"])
    assert rig.sender.run_once() == DeliveryCounts(deferred=1)
    counts = rig.mailer.spool.counts()  # on the fake clock: the retry is due in 1 s
    assert (counts["deferred"], counts["next_retry_in_seconds"]) == (1, 1.0)
    result = run_cli(["status", "--json"], {"SYSMAIL_SPOOL": str(rig.spool)})
    assert "next_retry_in_seconds" in json.loads(result.stdout)  # the CLI runs on real time


# --------------------------------------------------------------------------- relay outages


@both_paths
@pytest.mark.parametrize("pooled", [False, True], ids=["cold", "pooled-connection"])
def test_stopped_relay_burns_no_attempt_and_mail_goes_out_on_restart(
    rig: Rig, pooled: bool
) -> None:
    """Connection refused: claims released unchanged, even over more than 5 passes."""
    if pooled:  # a connection kept open from an earlier delivery dies with the relay
        rig.mailer.enqueue("two-factor-code", to="first@example.org", code="000001")
        assert rig.sender.run_once() == DeliveryCounts(sent=1)
        rig.server.messages.clear()
    message_id = rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    before = sorted(p.name for p in (rig.spool / "new").iterdir())
    rig.server.stop()

    for _ in range(7):
        assert rig.sender.run_once() == DeliveryCounts(released=1)
        assert sorted(p.name for p in (rig.spool / "new").iterdir()) == before
        assert list((rig.spool / "cur").iterdir()) == []
        assert rig.mailer.spool.failed() == []
        rig.clock.advance(30)
    assert entries(rig.spool, "new")[0][2] == 0

    rig.server.start()
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    (received,) = rig.server.messages
    assert parse(received.data)["Message-ID"] == message_id
    assert entries(rig.spool, "new") == []


@both_paths
@pytest.mark.parametrize("fault", ["421 at DATA", "dropped connection", "421 at RCPT"])
def test_421_and_dropped_connection_burn_no_attempt(rig: Rig, fault: str) -> None:
    """A 421 reply or a connection dropped at DATA is the relay's fault: release, retry."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    before = sorted(p.name for p in (rig.spool / "new").iterdir())
    if fault == "421 at DATA":
        rig.server.sink.script_data(["421 4.3.2 service shutting down"])
    elif fault == "421 at RCPT":
        rig.server.sink.refuse_rcpt({"ada@example.org": "421 4.3.2 service shutting down"})
    else:
        rig.server.sink.drop_next(1)

    assert rig.sender.run_once() == DeliveryCounts(released=1)
    rig.server.sink.refuse_rcpt({})
    assert rig.server.sink.data_attempts == (0 if fault == "421 at RCPT" else 1)
    assert rig.server.messages == []
    assert sorted(p.name for p in (rig.spool / "new").iterdir()) == before  # attempt 0 kept
    assert rig.mailer.spool.failed() == []

    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert rig.server.sink.data_attempts == (1 if fault == "421 at RCPT" else 2)
    assert len(rig.server.messages) == 1
    assert entries(rig.spool, "new") == []


def test_cli_worker_once_with_relay_stopped_exits_75_and_keeps_mail(rig: Rig) -> None:
    """`worker --once` against a dead relay: exit 75, the message stays queued untouched."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    before = sorted(p.name for p in (rig.spool / "new").iterdir())
    env = {
        "SMTP_URL": rig.server.url,
        "SYSTEM_DOMAIN": DOMAIN,
        "SYSTEM_DKIM_PRIVATE_KEY": rig.mailer.config.dkim_key.decode(),  # the same queue key
        "SYSMAIL_SPOOL": str(rig.spool),
    }
    rig.server.stop()

    result = run_cli(["worker", "--once"], env)

    assert result.returncode == 75, result.stderr
    assert "released 1" in result.stdout
    assert sorted(p.name for p in (rig.spool / "new").iterdir()) == before
    assert rig.mailer.spool.failed() == []


@both_paths
def test_connection_closed_while_idle_is_reopened_at_once(rig: Rig) -> None:
    """The relay restarted: the dead pooled connection is replaced, not taken for an outage."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    rig.server.stop()
    rig.server.start()  # the relay restarted: the idle pooled connection is gone
    rig.mailer.enqueue("password-reset", to="bob@example.org", reset_url=RESET_URL)

    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert [m.rcpt_tos for m in rig.server.messages] == [["ada@example.org"], ["bob@example.org"]]
    assert rig.server.connections == 2


@both_paths
@pytest.mark.parametrize("notice", [
    pytest.param(None, id="silently"),
    pytest.param("421 4.4.2 localhost Error: timeout exceeded", id="with-421"),
])
def test_connection_the_relay_hung_up_while_idle_is_reopened_at_once(
    rig: Rig, notice: str | None
) -> None:
    """The relay ended the idle session (Postfix says 421 first): reconnect, no outage."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert rig.server.sink.hang_up(notice) == 1
    rig.mailer.enqueue("password-reset", to="bob@example.org", reset_url=RESET_URL)

    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert [m.rcpt_tos for m in rig.server.messages] == [["ada@example.org"], ["bob@example.org"]]
    assert rig.server.connections == 2


# --------------------------------------------------------------------------- expiry


@pytest.mark.parametrize(
    ("template", "variables", "minutes", "expired"),
    [
        ("two-factor-code", {"code": "482913", "expires_minutes": "10"}, 11, True),
        ("two-factor-code", {"code": "482913", "expires_minutes": "10"}, 9, False),
        ("password-reset", {"reset_url": RESET_URL}, 61, True),
        ("password-reset", {"reset_url": RESET_URL}, 59, False),
    ],
)
def test_mail_past_its_deliver_by_time_is_not_sent(
    rig: Rig, template: str, variables: dict[str, str], minutes: int, expired: bool
) -> None:
    """Past its lifetime a message goes to failed/ 'expired' without touching the relay."""
    message_id = rig.mailer.enqueue(template, to="ada@example.org", **variables)
    rig.clock.advance(minutes * 60)

    counts = rig.sender.run_once()

    if expired:
        assert counts == DeliveryCounts(expired=1)
        assert rig.server.messages == []
        assert rig.server.sink.data_attempts == 0
        assert rig.server.connections == 0
        (letter,) = rig.mailer.spool.failed()
        assert letter["reason"] == "expired"
        assert letter["rfcMessageId"] == message_id
    else:
        assert counts == DeliveryCounts(sent=1)
        assert len(rig.server.messages) == 1
        assert rig.mailer.spool.failed() == []
    assert entries(rig.spool, "new") == []


# --------------------------------------------------------------------------- recipients


@both_paths
def test_permanently_refused_recipient_fails_alone(rig: Rig, rsa_key: RsaKey) -> None:
    """RCPT 550 for one of two: the other gets the mail; failed/ holds the refused one only."""
    rig.server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user"})
    message_id = rig.mailer.enqueue(
        "password-reset", to=["good@example.org", "bad@example.org"], reset_url=RESET_URL
    )

    assert rig.sender.run_once() == DeliveryCounts(sent=1, failed=1)

    (received,) = rig.server.messages
    assert received.rcpt_tos == ["good@example.org"]
    assert parse(received.data)["Message-ID"] == message_id
    assert dkim.verify(received.data, dnsfunc=rsa_dns(rsa_key))
    (letter,) = rig.mailer.spool.failed()
    assert letter["to"] == ["bad@example.org"]
    assert letter["reason"] == "rejected"
    assert letter["code"] == 550
    assert "5.1.1 no such user" in letter["reply"]
    assert entries(rig.spool, "new") == []
    assert entries(rig.spool, "cur") == []
    rig.clock.advance(3600)
    assert rig.sender.run_once() == DeliveryCounts()
    assert len(rig.server.messages) == 1


def test_per_recipient_dead_letter_keeps_template_and_message_id(rig: Rig) -> None:
    """A recipient's dead letter carries template and Message-ID like a whole message's."""
    rig.server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user"})
    message_id = rig.mailer.enqueue(
        "password-reset", to=["good@example.org", "bad@example.org"], reset_url=RESET_URL
    )
    rig.sender.run_once()

    (letter,) = rig.mailer.spool.failed()
    listed = run_cli(["failed"], {"SYSMAIL_SPOOL": str(rig.spool)})
    (line,) = [ln for ln in listed.stdout.splitlines() if letter["id"] in ln]
    assert "password-reset" in line
    assert "bad@example.org" in line
    assert "good@example.org" not in line
    assert letter["template"] == "password-reset"
    assert letter["rfcMessageId"] == message_id


@both_paths
def test_temporarily_refused_recipient_is_deferred_then_delivered(
    rig: Rig, rsa_key: RsaKey
) -> None:
    """RCPT 450 for one of two: it gets its own deferred entry, delivered once lifted."""
    rig.server.sink.refuse_rcpt({"busy@example.org": "450 4.2.1 mailbox busy"})
    message_id = rig.mailer.enqueue(
        "password-reset", to=["ok@example.org", "busy@example.org"], reset_url=RESET_URL
    )

    assert rig.sender.run_once() == DeliveryCounts(sent=1, deferred=1)
    assert [m.rcpt_tos for m in rig.server.messages] == [["ok@example.org"]]
    ((_, due, attempt, _),) = entries(rig.spool, "new")
    assert attempt == 1
    assert abs(due - (rig.clock() + 1) * 1000) <= 1
    header = spool_header(rig.spool, "new")
    assert header["to"] == ["busy@example.org"]
    assert header["message_id"] == message_id
    assert rig.mailer.spool.failed() == []

    rig.server.sink.refuse_rcpt({})
    assert rig.sender.run_once() == DeliveryCounts()  # not due yet
    rig.clock.advance(1.01)
    assert rig.sender.run_once() == DeliveryCounts(sent=1)

    assert [m.rcpt_tos for m in rig.server.messages] == [
        ["ok@example.org"],
        ["busy@example.org"],
    ]
    late = rig.server.messages[1].data
    assert parse(late)["Message-ID"] == message_id
    assert dkim.verify(late, dnsfunc=rsa_dns(rsa_key))
    assert entries(rig.spool, "new") == []


# --------------------------------------------------------------------------- connections


@both_paths
def test_one_connection_for_twenty_messages_and_the_next_pass(rig: Rig) -> None:
    """20 messages in one run_once share one SMTP session, and the next pass reuses it."""
    ids = {
        rig.mailer.enqueue("email-verification", to=f"user{i}@example.org",
                           verify_url=f"https://dashboard.example.com/v?t={i}")
        for i in range(20)
    }

    assert rig.sender.run_once() == DeliveryCounts(sent=20)
    assert rig.server.connections == 1
    assert {parse(m.data)["Message-ID"] for m in rig.server.messages} == ids

    rig.mailer.enqueue("email-verification", to="late@example.org",
                       verify_url="https://dashboard.example.com/v?t=late")
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert rig.server.connections == 1
    assert len(rig.server.messages) == 21


@both_paths
def test_connection_refreshed_after_max_messages(
    relay_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """SmtpTransport(max_messages=5) opens a new session every 5 messages."""
    config = sysmail.Config.from_env(base_env(tmp_path, rsa_key, relay_server))
    clock = FakeClock()
    mailer = sysmail.Mailer(config, clock=clock)
    assert config.smtp is not None
    transport = sysmail.SmtpTransport(config.smtp, max_messages=5)
    sender = sysmail.Sender(mailer.spool, transport, None, clock=clock, rand=sequence(0.5))
    try:
        for i in range(12):
            mailer.enqueue("two-factor-code", to=f"u{i}@example.org", code=f"{i:06d}")
        assert sender.run_once() == DeliveryCounts(sent=12)
    finally:
        transport.close()
    assert relay_server.connections == 3
    assert len(relay_server.messages) == 12


# --------------------------------------------------------------------------- transaction paths

NOBODY = "nobody@relay.invalid"


def transcript(wire: list[tuple[str, bytes]] | None, start: bytes) -> list[tuple[str, bytes]]:
    """The wire events from the first client chunk beginning with start (any case) on."""
    assert wire is not None, "call sink.record_wire() first"
    for index, (side, data) in enumerate(wire):
        if side == "client" and data.upper().startswith(start.upper()):
            return wire[index:]
    raise AssertionError(f"{start!r} never reached the relay: {wire!r}")


def spooled_data(spool: Path) -> bytes:
    """The message bytes (after the JSON header line) of the only entry in new/."""
    (path,) = [p for p in (spool / "new").iterdir() if not p.name.endswith(".json")]
    return path.read_bytes().partition(b"\n")[2]


@both_paths
def test_mail_rcpt_and_data_share_one_write_only_when_the_relay_offers_pipelining(
    rig: Rig, relay: str
) -> None:
    """PIPELINING: MAIL, both RCPTs and DATA reach the relay before it answers MAIL."""
    rig.server.sink.record_wire()
    rig.mailer.enqueue("two-factor-code", to=["ada@example.org", "bob@example.org"],
                       code="482913")

    assert rig.sender.run_once() == DeliveryCounts(sent=1)

    (received,) = rig.server.messages
    assert received.rcpt_tos == ["ada@example.org", "bob@example.org"]
    rcpt_ok, go_ahead = b"250 2.1.5 Ok", b"354 End data with <CR><LF>.<CR><LF>"
    if relay == "pipelining":  # sysmail writes the commands itself, in one send()
        commands = (f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<ada@example.org>\r\n"
                    "RCPT TO:<bob@example.org>\r\nDATA\r\n").encode()
        expected = [("client", commands), ("server", b"250 OK"),
                    ("server", rcpt_ok), ("server", rcpt_ok), ("server", go_ahead)]
    else:  # smtplib's mail(), rcpt() and data(), each waiting for its reply
        expected = [("client", f"mail FROM:<{SENDER}>\r\n".encode()), ("server", b"250 OK"),
                    ("client", b"rcpt TO:<ada@example.org>\r\n"), ("server", rcpt_ok),
                    ("client", b"rcpt TO:<bob@example.org>\r\n"), ("server", rcpt_ok),
                    ("client", b"data\r\n"), ("server", go_ahead)]
    events = transcript(rig.server.sink.wire, b"MAIL FROM:")
    assert events[: len(expected)] == expected
    content, final = events[len(expected) : -1], events[-1]
    assert {side for side, _ in content} == {"client"}
    assert not received.data.startswith(b".")
    stuffed = received.data.replace(b"\r\n.", b"\r\n..") + b".\r\n"
    assert b"".join(data for _, data in content) == stuffed
    assert final == ("server", f"250 2.0.0 Ok: queued as {received.queue_id}".encode())


@both_paths
def test_lines_starting_with_a_dot_arrive_byte_identical(rig: Rig, rsa_key: RsaKey) -> None:
    """Dot-stuffing: the relay gets the signed spool bytes exactly, and raw edge cases too."""
    rig.mailer.enqueue_message("ada@example.org", "Dots", ".\n..\n.leading\n...three\n. \nend\n",
                               "<p>x</p>\n.\n.dot")
    spooled = spooled_data(rig.spool)
    assert b"\r\n.\r\n..\r\n.leading\r\n...three\r\n. \r\nend\r\n" in spooled
    assert b"\r\n.\r\n.dot\r\n" in spooled

    assert rig.sender.run_once() == DeliveryCounts(sent=1)

    (received,) = rig.server.messages
    signature, tail = received.data[: -len(spooled)], received.data[-len(spooled) :]
    assert tail == spooled
    assert re.fullmatch(rb"DKIM-Signature: [^\r\n]+(\r\n[ \t][^\r\n]+)*\r\n", signature)
    assert dkim.verify(received.data, dnsfunc=rsa_dns(rsa_key))
    raw = [
        b".starts with a dot\r\n\r\nbody\r\n",
        b"Subject: last line\r\n\r\nbody\r\n.\r\n",
        b"Subject: dots only\r\n\r\n.\r\n.\r\n..\r\n...\r\n.\r\n",
    ]
    for data in raw:
        result = send_now(rig.sender.transport, ("bob@example.org",), data)
        assert (result.code, result.accepted) == (250, ("bob@example.org",))
    assert [m.data for m in rig.server.messages[1:]] == raw
    assert rig.server.connections == 1


@both_paths
def test_refused_recipients_are_settled_each_by_its_own_reply(rig: Rig, rsa_key: RsaKey) -> None:
    """RCPT 550, 250, 450: one sent, one dead letter, one deferred copy delivered later."""
    rig.server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user",
                                 "busy@example.org": "450 4.2.1 mailbox busy"})
    message_id = rig.mailer.enqueue(
        "password-reset", to=["bad@example.org", "ok@example.org", "busy@example.org"],
        reset_url=RESET_URL,
    )

    assert rig.sender.run_once() == DeliveryCounts(sent=1, deferred=1, failed=1)

    assert [m.rcpt_tos for m in rig.server.messages] == [["ok@example.org"]]
    (letter,) = rig.mailer.spool.failed()
    assert letter["to"] == ["bad@example.org"]
    assert (letter["reason"], letter["code"]) == ("rejected", 550)
    assert "5.1.1 no such user" in letter["reply"]
    assert letter["rfcMessageId"] == message_id
    ((_, due, attempt, _),) = entries(rig.spool, "new")
    assert attempt == 1
    assert abs(due - (rig.clock() + 1) * 1000) <= 1
    assert spool_header(rig.spool, "new")["to"] == ["busy@example.org"]
    assert entries(rig.spool, "cur") == []

    rig.server.sink.refuse_rcpt({})
    rig.clock.advance(1.01)
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert [m.rcpt_tos for m in rig.server.messages] == [["ok@example.org"], ["busy@example.org"]]
    late = rig.server.messages[1].data
    assert parse(late)["Message-ID"] == message_id
    assert dkim.verify(late, dnsfunc=rsa_dns(rsa_key))
    assert entries(rig.spool, "new") == []
    assert rig.server.connections == 1


@both_paths
@pytest.mark.parametrize("other", ["553 5.1.3 mailbox gone", "450 4.2.1 mailbox busy"],
                         ids=["all-permanent", "permanent-and-temporary"])
def test_message_no_recipient_accepted_is_settled_and_the_connection_kept(
    rig: Rig, other: str
) -> None:
    """Every RCPT refused: no DATA content is sent, the refusals are settled, and the next
    message goes out on the same connection."""
    rig.server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user",
                                 "other@example.org": other})
    refused_id = rig.mailer.enqueue("password-reset", to=["bad@example.org", "other@example.org"],
                                    reset_url=RESET_URL)
    rig.clock.advance(0.01)
    rig.mailer.enqueue("password-reset", to="ok@example.org", reset_url=RESET_URL)
    temporary = other.startswith("4")

    counts = rig.sender.run_once()

    assert counts == DeliveryCounts(sent=1, failed=1, deferred=int(temporary))
    assert [m.rcpt_tos for m in rig.server.messages] == [["ok@example.org"]]
    assert rig.server.sink.data_attempts == 1
    assert rig.server.connections == 1
    (letter,) = rig.mailer.spool.failed()
    assert letter["to"] == (["bad@example.org"] if temporary
                            else ["bad@example.org", "other@example.org"])
    assert (letter["reason"], letter["code"]) == ("rejected", 550)
    assert "5.1.1 no such user" in letter["reply"]
    assert letter["rfcMessageId"] == refused_id
    if temporary:
        ((_, _, attempt, _),) = entries(rig.spool, "new")
        assert attempt == 1
        assert spool_header(rig.spool, "new")["to"] == ["other@example.org"]
    else:
        assert entries(rig.spool, "new") == []
    assert entries(rig.spool, "cur") == []


@pytest.mark.parametrize("relay", ["lockstep", "pipelining"])
def test_421_for_one_of_two_recipients_releases_the_message_at_once(
    rigs: list[Rig], relay_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """RCPT 421 after another RCPT was accepted: released at attempt 0 without a stall."""
    env = base_env(tmp_path, rsa_key, relay_server)
    env["SMTP_TIMEOUT_SECONDS"] = "2"
    rig = build_rig(env, relay_server)
    rigs.append(rig)
    relay_server.sink.refuse_rcpt({"bob@example.org": "421 4.3.2 service shutting down"})
    rig.mailer.enqueue("password-reset", to=["ada@example.org", "bob@example.org"],
                       reset_url=RESET_URL)
    before = sorted(p.name for p in (rig.spool / "new").iterdir())

    started = time.monotonic()
    counts = rig.sender.run_once()
    elapsed = time.monotonic() - started

    assert counts == DeliveryCounts(released=1)
    assert sorted(p.name for p in (rig.spool / "new").iterdir()) == before
    assert rig.mailer.spool.failed() == []
    assert (relay_server.messages, relay_server.sink.data_attempts) == ([], 0)
    assert elapsed < 1, f"run_once took {elapsed:.2f} s (SMTP_TIMEOUT_SECONDS=2)"
    relay_server.sink.refuse_rcpt({})
    assert rig.sender.run_once() == DeliveryCounts(sent=1)
    assert [m.rcpt_tos for m in relay_server.messages] == [["ada@example.org", "bob@example.org"]]


class _GoAheadForNobodySMTP(SinkSMTP):
    """A non-compliant pipelining relay: DATA gets 354 even when every RCPT was refused."""

    async def smtp_DATA(self, arg: str) -> None:
        """Pretend someone was accepted (aiosmtpd would answer 503), then go on as usual."""
        envelope = self.envelope
        if envelope is not None and envelope.mail_from and not envelope.rcpt_tos:
            envelope.rcpt_tos.append(NOBODY)
        await super().smtp_DATA(arg)


@pytest.fixture
def sloppy_relay() -> Iterator[SmtpServer]:
    """A PIPELINING sink that answers DATA with 354 although no RCPT was accepted."""
    server = SmtpServer("smtp+plain", smtp_class=_GoAheadForNobodySMTP, pipelining=True)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize("end_reply", ["554 5.5.1 Error: no valid recipients", None],
                         ids=["then-554", "then-250"])
def test_go_ahead_after_every_recipient_was_refused_is_ended_with_a_bare_dot(
    sloppy_relay: SmtpServer, tmp_path: Path, rsa_key: RsaKey, end_reply: str | None
) -> None:
    """354 to a DATA nobody may receive: "." at once, all refused, the connection still works."""
    config = sysmail.Config.from_env(
        {**base_env(tmp_path, rsa_key, sloppy_relay), "SMTP_TIMEOUT_SECONDS": "3"}
    )
    transport = sysmail.transport_from_config(config)
    sink = sloppy_relay.sink
    sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user",
                      "busy@example.org": "450 4.2.1 mailbox busy"})
    sink.script_data([end_reply])
    sink.record_wire()
    data = b"Subject: hello\r\n\r\nhello\r\n"
    try:
        nobody = transport.begin(SENDER, ("bad@example.org", "busy@example.org"))
        delivered = send_now(transport, ("ok@example.org",), data)
    finally:
        transport.close()

    assert nobody == sysmail.Envelope((), {
        "bad@example.org": (550, "5.1.1 no such user"),
        "busy@example.org": (450, "4.2.1 mailbox busy"),
    })
    *empty, last = sloppy_relay.messages
    assert delivered == sysmail.SendResult(
        250, f"2.0.0 Ok: queued as {last.queue_id}", ("ok@example.org",), {}
    )
    assert last == Received(SENDER, ["ok@example.org"], data)
    assert empty == ([] if end_reply else [Received(SENDER, [NOBODY], b"")])
    end = end_reply or f"250 2.0.0 Ok: queued as {empty[0].queue_id}"
    commands = (f"MAIL FROM:<{SENDER}>\r\nRCPT TO:<bad@example.org>\r\n"
                "RCPT TO:<busy@example.org>\r\nDATA\r\n").encode()
    assert transcript(sink.wire, b"MAIL FROM:")[:9] == [
        ("client", commands),
        ("server", b"250 OK"),
        ("server", b"550 5.1.1 no such user"),
        ("server", b"450 4.2.1 mailbox busy"),
        ("server", b"354 End data with <CR><LF>.<CR><LF>"),
        ("client", b".\r\n"),
        ("server", end.encode()),
        ("client", b"rset\r\n"),
        ("server", b"250 OK"),
    ]
    assert sink.data_attempts == 2
    assert sloppy_relay.connections == 1


# --------------------------------------------------------------------------- TLS and AUTH


@pytest.mark.parametrize("fixture", ["tls_smtp_server", "smtps_server"])
def test_starttls_and_implicit_tls_with_auth_deliver(
    request: pytest.FixtureRequest,
    rigs: list[Rig],
    tmp_path: Path,
    rsa_key: RsaKey,
    fixture: str,
) -> None:
    """STARTTLS + AUTH and implicit TLS + AUTH, certificate verified via SMTP_CA_FILE."""
    server: SmtpServer = request.getfixturevalue(fixture)
    rig = build_rig(base_env(tmp_path, rsa_key, server), server)
    rigs.append(rig)
    message_id = rig.mailer.enqueue("two-factor-code", to="ada@example.org", code="111222")

    assert rig.sender.run_once() == DeliveryCounts(sent=1)

    (received,) = server.messages
    assert parse(received.data)["Message-ID"] == message_id
    assert dkim.verify(received.data, dnsfunc=rsa_dns(rsa_key))


def wrong_password_url(server: SmtpServer) -> str:
    """The server's URL with a wrong password."""
    return f"{server.scheme}://mailer:Wr0ng-pa55-Zq7@{server.host}:{server.port}"


def test_wrong_password_keeps_mail_queued(
    rigs: list[Rig],
    tls_smtp_server: SmtpServer,
    tmp_path: Path,
    rsa_key: RsaKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A refused login is RelayUnavailable: the message stays in new/, attempt 0."""
    caplog.set_level(logging.DEBUG, logger="sysmail")
    env = base_env(tmp_path, rsa_key, tls_smtp_server)
    env["SMTP_URL"] = wrong_password_url(tls_smtp_server)
    rig = build_rig(env, tls_smtp_server)
    rigs.append(rig)
    rig.mailer.enqueue("two-factor-code", to="ada@example.org", code="111222")
    before = sorted(p.name for p in (rig.spool / "new").iterdir())

    with pytest.raises(sysmail.RelayUnavailable) as raised:
        rig.sender.transport.open()
    assert raised.value.smtp_code == 535
    assert rig.sender.run_once() == DeliveryCounts(released=1)

    assert sorted(p.name for p in (rig.spool / "new").iterdir()) == before
    assert rig.mailer.spool.failed() == []
    assert tls_smtp_server.messages == []
    assert "Wr0ng-pa55-Zq7" not in caplog.text
    assert any(r.getMessage() == "relay_unavailable" for r in caplog.records)


def test_cli_check_probes_starttls_and_login(
    tls_smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """`sysmail check` succeeds: TLS with a verified certificate, logged in, no password shown."""
    result = run_cli(["check"], base_env(tmp_path, rsa_key, tls_smtp_server))

    assert result.returncode == 0, result.stderr
    assert re.search(r"TLS\S* TLSv1\.[23] with a verified certificate", result.stdout)
    assert "logged in as mailer" in result.stdout
    assert tls_smtp_server.password not in result.stdout + result.stderr
    assert tls_smtp_server.messages == []


def test_cli_check_wrong_password_exits_78_without_the_password(
    tls_smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """A refused login is a configuration problem naming SMTP_URL, secret not echoed."""
    env = base_env(tmp_path, rsa_key, tls_smtp_server)
    env["SMTP_URL"] = wrong_password_url(tls_smtp_server)

    result = run_cli(["check"], env)

    assert result.returncode == 78
    assert "SMTP_URL" in result.stderr
    assert "Wr0ng-pa55-Zq7" not in result.stdout + result.stderr


def test_cli_check_with_relay_stopped_exits_75(
    tls_smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """An unreachable relay is a temporary failure (EX_TEMPFAIL)."""
    env = base_env(tmp_path, rsa_key, tls_smtp_server)
    tls_smtp_server.stop()

    result = run_cli(["check"], env)

    assert result.returncode == 75
    assert "cannot reach the relay" in result.stderr
    assert tls_smtp_server.password not in result.stdout + result.stderr


# --------------------------------------------------------------------------- secrets


def secret_chunks(rsa_key: RsaKey, ed25519_key: Ed25519Key) -> list[str]:
    """Recognisable pieces of both private keys (PEM bodies and the ed25519 seed)."""
    return [*key_chunks(rsa_key.pem), *key_chunks(ed25519_key.pem), ed25519_key.seed_b64]


def files_under(*roots: Path) -> list[Path]:
    """Every regular file below the given folders."""
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def test_keys_are_in_no_spool_file_and_no_log(
    rigs: list[Rig],
    smtp_server: SmtpServer,
    tmp_path: Path,
    rsa_key: RsaKey,
    ed25519_key: Ed25519Key,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """After enqueue, a deferral and a rejection, no file or log line holds key bytes."""
    caplog.set_level(logging.DEBUG, logger="sysmail")
    env = base_env(tmp_path, rsa_key, smtp_server)
    env["SYSTEM_DKIM_ED25519_PRIVATE_KEY"] = ed25519_key.pem
    rig = build_rig(env, smtp_server)
    rigs.append(rig)
    for code in ("111111", "222222"):
        rig.mailer.enqueue("two-factor-code", to="ada@example.org", code=code)
    smtp_server.sink.script_data(["451 4.3.0 later", "550 5.7.1 rejected"])

    assert rig.sender.run_once() == DeliveryCounts(deferred=1, failed=1)

    files = files_under(rig.spool)
    assert {p.parent.name for p in files} >= {"new", "failed"}
    assert any(p.name.endswith(".json") for p in files)
    formatter = sysmail.JsonLogFormatter()
    logged = caplog.text + "\n".join(formatter.format(r) for r in caplog.records)
    events = {r.getMessage() for r in caplog.records}
    assert {"queued", "deferred", "failed"} <= events
    for chunk in secret_chunks(rsa_key, ed25519_key):
        for path in files:
            assert chunk.encode() not in path.read_bytes(), path
        assert chunk not in logged


def test_keys_are_not_in_cli_output_spool_or_outbox(
    tmp_path: Path, rsa_key: RsaKey, ed25519_key: Ed25519Key
) -> None:
    """`send` + `worker --once` (outbox, debug logs): no key bytes in stderr or any file."""
    env = base_env(tmp_path, rsa_key)
    env["SYSTEM_DKIM_ED25519_PRIVATE_KEY"] = ed25519_key.pem
    env["SYSMAIL_LOG_LEVEL"] = "debug"
    sent = run_cli(["send", "--to", "ada@example.org", "--template", "password-reset",
                    "--var", f"reset_url={RESET_URL}"], env)
    worked = run_cli(["worker", "--once"], env)
    assert sent.returncode == 0, sent.stderr
    assert worked.returncode == 0, worked.stderr
    assert '"event": "queued"' in sent.stderr
    assert '"event": "sent"' in worked.stderr

    files = files_under(tmp_path / "spool", tmp_path / "outbox")
    assert any(p.suffix == ".eml" for p in files)
    output = sent.stdout + sent.stderr + worked.stdout + worked.stderr
    assert "tok-1234567890" not in sent.stderr + worked.stderr  # nor the reset token
    for chunk in secret_chunks(rsa_key, ed25519_key):
        assert chunk not in output
        for path in files:
            assert chunk.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- priorities


def test_two_factor_code_overtakes_a_flood_of_announcements(
    rigs: list[Rig], smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """30 announcements then 1 two-factor code, batch_size 5: the code is received first."""
    rig = build_rig(base_env(tmp_path, rsa_key, smtp_server), smtp_server, batch_size=5)
    rigs.append(rig)
    for i in range(30):
        rig.mailer.enqueue("service-announcement", to=f"user{i}@example.org",
                           title=f"Maintenance {i}", body="Read-only for an hour.")
        rig.clock.advance(0.01)  # distinct due_ms: FIFO within a priority
    code_id = rig.mailer.enqueue("two-factor-code", to="ada@example.org", code="987654")

    assert rig.sender.run_once() == DeliveryCounts(sent=31)

    first = parse(smtp_server.messages[0].data)
    assert first["Message-ID"] == code_id
    assert smtp_server.messages[0].rcpt_tos == ["ada@example.org"]
    later = [parse(m.data)["Subject"] for m in smtp_server.messages[1:]]
    assert later == [f"Maintenance {i}" for i in range(30)]


# --------------------------------------------------------------------------- thread


def sender_threads() -> list[threading.Thread]:
    """Live sysmail sender threads."""
    return [t for t in threading.enumerate() if t.name == "sysmail-sender"]


def test_sender_thread_delivers_survives_poison_and_stops_promptly(
    smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """Mailer.start(): mail goes out; a garbage spool entry is failed 'unreadable'; stop()."""
    config = sysmail.Config.from_env(base_env(tmp_path, rsa_key, smtp_server))
    clock = FakeClock()
    mailer = sysmail.Mailer(config, clock=clock)
    before = set(sender_threads())
    mailer.start()
    try:
        (thread,) = set(sender_threads()) - before
        first = mailer.enqueue("two-factor-code", to="ada@example.org", code="123456")
        received = smtp_server.wait_for(1, timeout=5)
        assert parse(received[0].data)["Message-ID"] == first

        name = f"0.{int(clock() * 1000):014d}.0.poisoned0001"
        garbage = tmp_path / "spool" / "tmp" / name
        garbage.write_bytes(b"\x00\xffnot a spool entry at all\n\x01")
        garbage.rename(tmp_path / "spool" / "new" / name)
        mailer.spool.notify()
        wait_until(lambda: any(d["id"] == "poisoned0001" for d in mailer.spool.failed()))
        (letter,) = mailer.spool.failed()
        assert letter["reason"] == "unauthenticated"  # garbage cannot carry the queue's MAC
        assert (tmp_path / "spool" / "failed" / name).is_file()

        second = mailer.enqueue("two-factor-code", to="bob@example.org", code="654321")
        received = smtp_server.wait_for(2, timeout=5)
        assert parse(received[1].data)["Message-ID"] == second
        assert thread.is_alive()
    finally:
        started = time.monotonic()
        mailer.stop()
        elapsed = time.monotonic() - started
    assert elapsed < 2
    assert not thread.is_alive()
    assert len(smtp_server.messages) == 2


def test_entry_without_recipients_is_kept_as_a_dead_letter(rig: Rig) -> None:
    """An entry listing no recipient cannot be sent: a dead letter, not lost or stuck."""
    rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    (path,) = list((rig.spool / "new").iterdir())
    head, _, data = path.read_bytes().partition(b"\n")
    header = json.loads(head.split(b" ", 2)[2])
    header["to"] = []  # written under the right key: authentic, but with nobody to send to
    path.write_bytes(sysmail._entry_bytes(header, data, rig.mailer.config.queue_key))

    counts = rig.sender.run_once()

    assert rig.server.sink.data_attempts == 0
    assert entries(rig.spool, "new") == []
    assert entries(rig.spool, "cur") == []
    assert counts == DeliveryCounts(failed=1)
    (letter,) = rig.mailer.spool.failed()
    assert letter["id"] == path.name.split(".")[3]


def test_sender_thread_wakes_at_once_for_mail_queued_in_process(
    smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey
) -> None:
    """Mail queued while the thread idles goes out long before its idle poll would fire."""
    config = sysmail.Config.from_env(base_env(tmp_path, rsa_key, smtp_server))
    mailer = sysmail.Mailer(config, clock=FakeClock())
    latencies = []
    beats: list[float] = []
    mailer.start(on_cycle=lambda: beats.append(time.monotonic()))  # the sender loop's hook
    spool = tmp_path / "spool"

    def idle() -> bool:
        """The spool is empty, and the sender has beaten since: a beat with nothing left to
        send is the one that ends a pass, just before the thread waits (poll: 1 s)."""
        if entries(spool, "new") or entries(spool, "cur"):
            return False
        seen = len(beats)
        wait_until(lambda: len(beats) > seen, timeout=10)
        return True

    try:
        mailer.enqueue("two-factor-code", to="warm@example.org", code="000000")
        smtp_server.wait_for(1, timeout=5)
        for i in range(2):
            wait_until(idle, timeout=10)  # the thread has finished its pass and idles
            started = time.monotonic()
            mailer.enqueue("two-factor-code", to=f"u{i}@example.org", code=f"{i:06d}")
            smtp_server.wait_for(i + 2, timeout=5)
            latencies.append(time.monotonic() - started)
    finally:
        mailer.stop()
    assert min(latencies) < 0.5 * sysmail.SENDER_IDLE_POLL_SECONDS, latencies


def test_sender_thread_resumes_when_the_relay_returns(
    smtp_server: SmtpServer,
    tmp_path: Path,
    rsa_key: RsaKey,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Relay down: the thread releases the mail (attempt 0), then delivers once it is back."""
    caplog.set_level(logging.INFO, logger="sysmail")
    config = sysmail.Config.from_env(base_env(tmp_path, rsa_key, smtp_server))
    clock = FakeClock()
    mailer = sysmail.Mailer(config, clock=clock)
    smtp_server.stop()
    mailer.start()
    try:
        message_id = mailer.enqueue("two-factor-code", to="ada@example.org", code="123456")
        wait_until(lambda: any(r.getMessage() == "relay_unavailable" for r in caplog.records))
        wait_until(lambda: len(entries(tmp_path / "spool", "new")) == 1)
        assert entries(tmp_path / "spool", "new")[0][2] == 0
        assert mailer.spool.failed() == []

        smtp_server.start()
        clock.advance(120)  # past the sender's relay backoff (at most 60 s + 20 %)
        (received,) = smtp_server.wait_for(1, timeout=30)  # a bound for a loaded machine
    finally:
        mailer.stop()
    assert parse(received.data)["Message-ID"] == message_id
    assert entries(tmp_path / "spool", "new") == []


# --------------------------------------------------------------------------- outbox


def test_outbox_mode_worker_once_writes_a_signed_eml(tmp_path: Path, rsa_key: RsaKey) -> None:
    """No SMTP_URL: `send` then `worker --once` writes one .eml that parses as the message."""
    env = base_env(tmp_path, rsa_key)
    sent = run_cli(["send", "--to", "ada@example.org", "--template", "two-factor-code",
                    "--var", "code=482913"], env)
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    assert re.fullmatch(r"<[^@<>\s]+@example\.com>", message_id)

    worked = run_cli(["worker", "--once"], env)

    assert worked.returncode == 0, worked.stderr
    assert "sent 1" in worked.stdout
    events = [json.loads(line)["event"] for line in worked.stderr.splitlines()]
    assert "outbox_mode" in events
    outbox = tmp_path / "outbox"
    (eml,) = list(outbox.iterdir())
    assert eml.suffix == ".eml"
    data = eml.read_bytes()
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message["Message-ID"] == message_id
    assert message["To"] == "ada@example.org"
    assert "482913" in message["Subject"]
    assert message.get_content_type() == "multipart/alternative"
    assert "482913" in message.get_body(("plain",)).get_content()
    assert "482913" in message.get_body(("html",)).get_content()
    assert dkim.verify(data, dnsfunc=rsa_dns(rsa_key))
    assert entries(tmp_path / "spool", "new") == []
