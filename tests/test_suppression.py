"""Issue 12, after the relay's 250: VERP envelope senders, the suppression list and what it
blocks, one-click unsubscribe, Feedback-ID, and their HTTP, CLI and metrics faces.

Real parts only: an aiosmtpd sink as the relay, a redis-server for the shared list, sysmail
serve's HTTP over 127.0.0.1, `python3 sysmail.py` subprocesses, and the injected clock for time.
"""

from __future__ import annotations

import base64
import email
import email.policy
import http.client
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from conftest import FakeClock, RedisServer, SmtpServer, dkim_dns, free_port, run_cli
from prometheus_client.parser import text_string_to_metric_families

import sysmail

KEY = b"k" * 32
DOMAIN = "example.com"
ADA, BOB = "ada@example.org", "bob@example.net"
API_KEY = "suppression-api-key-" + secrets.token_hex(8)
DAY = 86400


def config(tmp_path: Path, **env: str) -> sysmail.Config:
    """A Config with a spool in tmp_path, unsigned, and the given variables."""
    return sysmail.Config.from_env({"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(tmp_path / "spool"),
                                    "SYSMAIL_OUTBOX": str(tmp_path / "outbox"),
                                    "SYSMAIL_QUEUE_KEY": "q" * 40, **env})


def parsed(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)


# --------------------------------------------------------------------------- VERP tags


def test_a_verp_address_fits_a_local_part_and_names_its_recipient_only() -> None:
    now = 1_800_000_000.0
    address = sysmail.verp_address("bounces@b.example", KEY, "<1.abc@example.com>", ADA, now)
    local, _, domain = address.rpartition("@")
    tag = local.removeprefix("bounces+")
    assert domain == "b.example" and len(local) <= 64 and len(tag) == 24
    assert tag == tag.lower() and set(tag) <= set("abcdefghijklmnopqrstuvwxyz234567")
    assert sysmail.verp_recipient(local, [BOB, ADA], KEY, now) == ADA
    assert sysmail.verp_recipient(local.upper(), [ADA.upper()], KEY, now) == ADA.upper()
    assert sysmail.verp_recipient(local, [BOB], KEY, now) is None  # names someone else
    assert sysmail.verp_recipient(local, [ADA], b"x" * 32, now) is None  # another key
    assert sysmail.verp_recipient(local, [ADA], KEY, now + 61 * DAY) is None  # expired
    assert sysmail.verp_recipient(local, [ADA], KEY, now + 59 * DAY) == ADA
    flipped = tag[:-1] + ("a" if tag[-1] != "a" else "b")
    for forged in (f"bounces+{flipped}", "bounces", "bounces+", "bounces+!!", "bounces+" + "a" * 23,
                   "bounces+" + "a" * 24, f"bounces+{tag}x"):
        assert sysmail.verp_recipient(forged, [ADA], KEY, now) is None, forged


def test_each_recipient_gets_its_own_verp_envelope_sender(tmp_path: Path,
                                                          smtp_server: SmtpServer) -> None:
    cfg = config(tmp_path, SMTP_URL=smtp_server.url, SYSMAIL_ALLOW_UNSIGNED="1",
                 SYSMAIL_BOUNCE_DOMAIN="errors@b.example")
    mailer = sysmail.Mailer(cfg)
    message_id = mailer.enqueue("security-alert", to=[ADA, BOB], event="a new sign-in")
    counts = mailer.sender().run_once()
    assert counts.sent == 2 and counts.failed == 0
    received = {m.rcpt_tos[0]: m for m in smtp_server.wait_for(2)}
    assert sorted(received) == [ADA, BOB]
    for rcpt, message in received.items():
        local, _, domain = message.mail_from.rpartition("@")
        assert domain == "b.example" and local.startswith("errors+")
        assert sysmail.verp_recipient(local, [ADA, BOB], cfg.queue_key, time.time()) == rcpt
        assert parsed(message.data)["Message-ID"] == message_id
        assert parsed(message.data)["To"] == f"{ADA}, {BOB}"


def test_without_a_bounce_domain_the_envelope_sender_is_from(tmp_path: Path,
                                                             smtp_server: SmtpServer) -> None:
    mailer = sysmail.Mailer(config(tmp_path, SMTP_URL=smtp_server.url, SYSMAIL_ALLOW_UNSIGNED="1"))
    mailer.enqueue("security-alert", to=[ADA, BOB], event="a new sign-in")
    assert mailer.sender().run_once().sent == 1
    (message,) = smtp_server.wait_for(1)
    assert message.mail_from == f"noreply@{DOMAIN}" and message.rcpt_tos == [ADA, BOB]


def test_a_queue_entry_with_someone_elses_verp_sender_is_not_sent(tmp_path: Path,
                                                                 smtp_server: SmtpServer) -> None:
    """The sender accepts a VERP envelope sender only when its tag names the one recipient."""
    cfg = config(tmp_path, SMTP_URL=smtp_server.url, SYSMAIL_ALLOW_UNSIGNED="1",
                 SYSMAIL_BOUNCE_DOMAIN="b.example")
    app = sysmail.build_app(cfg)
    other = sysmail.verp_address(cfg.bounce_address, cfg.queue_key, "<x@y>", BOB, time.time())
    header = {"message_id": "<x@y>", "from": other, "to": [ADA], "template": "",
              "queued_at": time.time(), "expires_at": time.time() + 60}
    app.spool.enqueue(header, b"Subject: hi\r\n\r\nhi\r\n", sysmail.URGENT)
    counts = app.sender().run_once()
    assert counts.failed == 1 and smtp_server.messages == []
    assert app.spool.failed()[0]["reason"] == "unauthenticated"


@pytest.mark.parametrize("value", ["not a domain", "a+b@b.example", "x" * 31 + "@b.example"])
def test_a_bad_bounce_domain_is_a_configuration_error(tmp_path: Path, value: str) -> None:
    # check reads the whole configuration (the queue commands read the spool settings only)
    result = run_cli(["check"], {"SYSMAIL_SPOOL": str(tmp_path), "SYSMAIL_BOUNCE_DOMAIN": value})
    assert result.returncode == 78 and "SYSMAIL_BOUNCE_DOMAIN" in result.stderr
    assert "Traceback" not in result.stderr


def test_dns_prints_what_the_bounce_domain_needs(tmp_path: Path) -> None:
    result = run_cli(["dns"], {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(tmp_path),
                               "SYSMAIL_BOUNCE_DOMAIN": "b.example.com"})
    assert result.returncode == 0, result.stderr
    assert "b.example.com. IN MX 10 " in result.stdout
    assert 'b.example.com. IN TXT "v=spf1 mx -all"' in result.stdout
    assert "sysmail bounce" in result.stdout
    plain = run_cli(["dns"], {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(tmp_path)})
    assert " MX " not in plain.stdout


# --------------------------------------------------------------------------- the list


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_800_000_000.0)


def listed(tmp_path: Path, clock: FakeClock, **kwargs: object) -> sysmail.SuppressionList:
    return sysmail.SuppressionList(tmp_path / "spool", clock, **kwargs)


def test_hard_bounces_and_complaints_suppress_with_their_expiry(tmp_path: Path,
                                                               clock: FakeClock) -> None:
    suppressions = listed(tmp_path, clock, hard_bounce_seconds=30 * DAY)
    hard = suppressions.record_bounce("hard", ADA, "550 5.1.1 no such user", "hard bounce 5.1.1")
    complaint = suppressions.record_bounce("complaint", BOB, "abuse", "complaint")
    assert (hard.reason, hard.scope, hard.expires) == ("hard-bounce", "all", clock.now + 30 * DAY)
    assert (complaint.reason, complaint.expires) == ("complaint", None)
    assert suppressions.blocks(ADA, "billing-notification", sysmail.BULK) == "hard-bounce"
    clock.advance(30 * DAY)
    assert suppressions.blocks(ADA, "billing-notification", sysmail.BULK) is None
    assert suppressions.blocks(BOB, "billing-notification", sysmail.BULK) == "complaint"
    assert [e.address for e in suppressions.entries()] == [BOB]
    assert suppressions.bounces_last_24h() == {"hard": 0, "soft": 0, "complaint": 0}
    clock.advance(-DAY / 2)
    assert suppressions.bounces_last_24h() == {"hard": 0, "soft": 0, "complaint": 0}


def test_bounce_counts_cover_the_last_24_hours(tmp_path: Path, clock: FakeClock) -> None:
    suppressions = listed(tmp_path, clock)
    suppressions.record_bounce("hard", ADA, "", "")
    clock.advance(3600)
    suppressions.record_bounce("hard", BOB, "", "")
    suppressions.record_bounce("complaint", BOB, "", "")
    assert suppressions.bounces_last_24h() == {"hard": 2, "soft": 0, "complaint": 1}
    clock.advance(23 * 3600)
    assert suppressions.bounces_last_24h() == {"hard": 1, "soft": 0, "complaint": 1}


def test_soft_bounces_on_three_days_within_a_week_count_as_hard(tmp_path: Path,
                                                                clock: FakeClock) -> None:
    suppressions = listed(tmp_path, clock)
    for _ in range(5):  # many on one day are one day
        assert suppressions.record_bounce("soft", ADA, "452 mailbox full", "soft") is None
    clock.advance(3 * DAY)
    assert suppressions.record_bounce("soft", ADA, "452", "soft") is None
    assert suppressions.blocks(ADA, "service-announcement", sysmail.BULK) is None
    clock.advance(3 * DAY)  # the third day, 6 days after the first
    entry = suppressions.record_bounce("soft", ADA, "452", "soft")
    assert entry is not None and entry.reason == "soft-bounces"
    assert suppressions.blocks(ADA, "service-announcement", sysmail.BULK) == "soft-bounces"


def test_soft_bounces_spread_over_more_than_a_week_do_not(tmp_path: Path,
                                                          clock: FakeClock) -> None:
    suppressions = listed(tmp_path, clock)
    for _ in range(4):
        assert suppressions.record_bounce("soft", ADA, "452", "soft") is None
        clock.advance(4 * DAY)
    assert suppressions.entries() == []


def test_the_list_survives_a_restart_in_a_private_file(tmp_path: Path, clock: FakeClock) -> None:
    first = listed(tmp_path, clock)
    first.suppress(ADA, "manual", "cli")
    first.record_bounce("hard", BOB, "", "hard bounce")
    path = tmp_path / "spool" / "suppressions.json"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []  # written via tmp/, then renamed
    again = listed(tmp_path, clock)
    assert {(e.address, e.reason) for e in again.entries()} == {(ADA.lower(), "manual"),
                                                                (BOB, "hard-bounce")}
    assert again.unsuppress(ADA.upper()) == 1 and again.unsuppress(ADA) == 0
    assert [e.address for e in listed(tmp_path, clock).entries()] == [BOB]


def test_another_process_change_is_seen_on_refresh(tmp_path: Path, clock: FakeClock) -> None:
    reader, writer = listed(tmp_path, clock), listed(tmp_path, clock)
    writer.suppress(ADA, "manual", "cli")
    assert reader.blocks(ADA, "", sysmail.BULK) is None  # memory until the refresh
    reader.refresh_if_due()  # not due yet
    assert reader.blocks(ADA, "", sysmail.BULK) is None
    clock.advance(sysmail.SUPPRESSION_REFRESH_SECONDS)
    reader.refresh_if_due()
    assert reader.blocks(ADA, "", sysmail.BULK) == "manual"


def test_a_garbled_file_is_reported_and_never_overwritten(tmp_path: Path, clock: FakeClock,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    suppressions = listed(tmp_path, clock)
    suppressions.suppress(ADA, "manual", "cli")
    path = tmp_path / "spool" / "suppressions.json"
    path.write_text("{garbled")
    with caplog.at_level(logging.ERROR, logger="sysmail"):
        fresh = listed(tmp_path, clock)
    assert "suppressions_unreadable" in caplog.text and fresh.entries() == []
    with pytest.raises(sysmail.QueueUnavailable, match="cannot be written"):
        fresh.suppress(BOB, "manual", "cli")
    assert path.read_text() == "{garbled"


def test_the_list_is_shared_through_redis(tmp_path: Path, clock: FakeClock,
                                          redis_server: RedisServer) -> None:
    host_a = sysmail.SuppressionList(tmp_path / "a", clock, redis_url=redis_server.url)
    host_b = sysmail.SuppressionList(tmp_path / "b", clock, redis_url=redis_server.url)
    host_a.record_bounce("complaint", ADA, "", "complaint")
    host_b.record_bounce("hard", BOB, "", "hard bounce")
    host_b.refresh()
    host_a.refresh()
    for host in (host_a, host_b):
        assert {e.address for e in host.entries()} == {ADA, BOB}
        assert host.bounces_last_24h() == {"hard": 1, "soft": 0, "complaint": 1}
    # b's file is its local copy: with Redis down it still knows both
    redis_server.stop()
    offline = sysmail.SuppressionList(tmp_path / "b", clock, redis_url=redis_server.url)
    assert {e.address for e in offline.entries()} == {ADA, BOB}
    with pytest.raises(sysmail.QueueUnavailable, match="Redis"):
        offline.unsuppress(ADA)
    assert offline.blocks(ADA, "", sysmail.BULK) == "complaint"  # nothing changed
    redis_server.start()  # empty: this test's Redis keeps nothing across a restart
    assert host_a.unsuppress(ADA) == 1  # Redis is seeded from a's copy first
    host_b.refresh()
    assert {e.address for e in host_b.entries()} == {BOB}
    assert host_b.bounces_last_24h() == {"hard": 1, "soft": 0, "complaint": 1}


def test_a_redis_that_lost_the_list_is_seeded_from_the_local_copy(
        tmp_path: Path, clock: FakeClock, redis_server: RedisServer) -> None:
    import redis

    host = sysmail.SuppressionList(tmp_path, clock, redis_url=redis_server.url)
    host.suppress(ADA, "manual", "cli")
    redis.Redis.from_url(redis_server.url).flushall()
    host.refresh()
    assert [e.address for e in host.entries()] == [ADA]
    other = sysmail.SuppressionList(tmp_path / "other", clock, redis_url=redis_server.url)
    assert [e.address for e in other.entries()] == [ADA]


def test_the_redis_hash_lives_under_the_queue_prefix(tmp_path: Path, clock: FakeClock,
                                                     redis_server: RedisServer) -> None:
    import redis

    suppressions = sysmail.SuppressionList(tmp_path, clock, redis_url=redis_server.url)
    suppressions.suppress(ADA, "manual", "api")
    client = redis.Redis.from_url(redis_server.url)
    fields = client.hgetall("sysmail:suppressions")
    assert json.loads(fields[f"all {ADA}".encode()])["source"] == "api"


# --------------------------------------------------------------------------- what it blocks


@pytest.fixture
def suppressed_mailer(tmp_path: Path, clock: FakeClock) -> Iterator[sysmail.Mailer]:
    mailer = sysmail.Mailer(config(tmp_path), clock=clock)
    mailer.app.suppressions.record_bounce("hard", ADA, "550 5.1.1", "hard bounce 5.1.1")
    yield mailer


def queued(mailer: sysmail.Mailer) -> list[str]:
    """The recipients of every message waiting in the spool."""
    claims, _ = mailer.spool.claim(100)
    rcpts = [r for c in claims for r in mailer.spool.read(c).rcpts]
    for claim in claims:
        mailer.spool.release(claim)
    return sorted(rcpts)


@pytest.mark.parametrize("template,variables", [
    ("service-announcement", {"title": "T", "body": "B"}),
    ("billing-notification", {"summary": "S"}),
    ("account-suspension", {"reason": "R"}),
])
def test_bulk_kinds_are_not_sent_to_a_suppressed_address(
        suppressed_mailer: sysmail.Mailer, template: str, variables: dict,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="sysmail"):
        result = suppressed_mailer.enqueue_template(template, [ADA, BOB], variables)
    assert isinstance(result, str) and result.startswith("<")
    assert result.suppressed == (ADA,)
    assert queued(suppressed_mailer) == [BOB]
    (line,) = [r for r in caplog.records if r.getMessage() == "suppressed"]
    assert line.fields["to"] == ADA and line.fields["template"] == template
    assert line.fields["reason"] == "hard-bounce"
    text = suppressed_mailer.app.api.metrics.render({})
    assert f'sysmail_suppressed_total{{template="{template}"}} 1' in text


def test_mail_the_user_asked_for_still_goes_once_an_hour(suppressed_mailer: sysmail.Mailer,
                                                          clock: FakeClock) -> None:
    mailer = suppressed_mailer
    assert mailer.enqueue("two-factor-code", to=ADA, code="123456").suppressed == ()
    assert mailer.enqueue("password-reset", to=ADA,
                          reset_url="https://x.example/r?t=1").suppressed == (ADA,)
    assert mailer.enqueue_message(ADA, "S", "T", priority=sysmail.URGENT).suppressed == (ADA,)
    clock.advance(3600)
    assert mailer.enqueue("email-verification", to=ADA,
                          verify_url="https://x.example/v").suppressed == ()
    assert mailer.enqueue_message(ADA, "S", "T").suppressed == (ADA,)  # ad-hoc bulk
    assert queued(mailer) == [ADA, ADA]


def test_an_all_suppressed_message_queues_nothing_and_returns_normally(
        suppressed_mailer: sysmail.Mailer) -> None:
    result = suppressed_mailer.enqueue("billing-notification", to=ADA, summary="S")
    assert result.suppressed == (ADA,) and queued(suppressed_mailer) == []


def test_unsubscribed_addresses_miss_announcements_only(tmp_path: Path, clock: FakeClock) -> None:
    mailer = sysmail.Mailer(config(tmp_path), clock=clock)
    mailer.app.suppressions.suppress(ADA, "unsubscribe", "one-click link",
                                     scope="service-announcement")
    assert mailer.enqueue("service-announcement", to=ADA, title="T", body="B").suppressed == (ADA,)
    assert mailer.enqueue("billing-notification", to=ADA, summary="S").suppressed == ()
    assert mailer.enqueue("two-factor-code", to=ADA, code="1").suppressed == ()


# --------------------------------------------------------------------------- headers


def test_feedback_id_on_every_message_and_unsubscribe_on_announcements_only(
        tmp_path: Path, smtp_server: SmtpServer, rsa_key) -> None:
    cfg = config(tmp_path, SMTP_URL=smtp_server.url, SYSTEM_DKIM_PRIVATE_KEY=rsa_key.pem,
                 SYSMAIL_PUBLIC_URL="https://mail.example.com", SYSMAIL_BOUNCE_DOMAIN="b.example")
    mailer = sysmail.Mailer(cfg)
    mailer.enqueue("service-announcement", to=[ADA, BOB], title="T", body="B")
    mailer.enqueue("password-reset", to=ADA, reset_url="https://x.example/r?t=1")
    mailer.enqueue_message(BOB, "S", "T")
    assert mailer.sender().run_once().sent == 4
    dns = dkim_dns({"default._domainkey.example.com": rsa_key.dns_record})
    by_kind: dict[str, list] = {}
    for received in smtp_server.wait_for(4):
        message = parsed(received.data)
        assert dkim.verify(received.data, dnsfunc=dns)
        kind = message["Feedback-ID"].split(":")[0]
        assert message["Feedback-ID"] == f"{kind}:sysmail:{DOMAIN}"
        by_kind.setdefault(kind, []).append((received.rcpt_tos[0], message))
    assert sorted(by_kind) == ["ad-hoc", "password-reset", "service-announcement"]
    for kind in ("ad-hoc", "password-reset"):
        (_, message), = by_kind[kind]
        assert message["List-Unsubscribe"] is None and message["List-Unsubscribe-Post"] is None
    for rcpt, message in by_kind["service-announcement"]:
        assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
        https, mailto = (link.strip().strip("<>") for link in
                         str(message["List-Unsubscribe"]).split(","))
        token = urllib.parse.parse_qs(urllib.parse.urlsplit(https).query)["t"][0]
        assert https.startswith("https://mail.example.com/v1/unsubscribe?t=")
        assert mailto == f"mailto:bounces@b.example?subject=unsubscribe%20{token}"
        assert sysmail.unsubscribe_target(cfg.queue_key, token) == ("service-announcement", rcpt)
        signed = [h.strip() for h in dkim_tags(received.data)["h"].split(":")]
        assert signed.count("list-unsubscribe") == 2 and signed.count("list-unsubscribe-post") == 2


def dkim_tags(data: bytes) -> dict[str, str]:
    value = "".join(parsed(data)["DKIM-Signature"].split())
    return dict(tag.partition("=")[::2] for tag in value.split(";") if tag)


def test_a_forged_unsubscribe_token_names_nobody() -> None:
    token = sysmail.unsubscribe_token(KEY, ADA)
    assert sysmail.unsubscribe_target(KEY, token) == ("service-announcement", ADA)
    assert sysmail.unsubscribe_target(b"z" * 32, token) is None
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[len("service-announcement ")] ^= 1  # another address, the same MAC
    forged = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad in (forged, "", "!!!", token[:10], "A" * 40):
        assert sysmail.unsubscribe_target(KEY, bad) is None, bad


# --------------------------------------------------------------------------- HTTP


def call(base: str, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict, bytes]:
    parts = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.headers), response.read()
    finally:
        connection.close()


@pytest.fixture
def service(tmp_path: Path, smtp_server: SmtpServer) -> Iterator[sysmail.App]:
    port = free_port()
    cfg = config(tmp_path, SMTP_URL=smtp_server.url, SYSMAIL_ALLOW_UNSIGNED="1",
                 SYSMAIL_LISTEN=f"127.0.0.1:{port}", SYSMAIL_METRICS_LISTEN="127.0.0.1:0",
                 SYSMAIL_PUBLIC_URL=f"http://127.0.0.1:{port}", SYSMAIL_API_KEY=API_KEY,
                 SYSMAIL_DB=str(tmp_path / "db.sqlite"))
    app = sysmail.build_app(cfg)
    app.start()
    try:
        yield app
    finally:
        app.stop()


AUTH = {"Authorization": f"Bearer {API_KEY}"}


def test_internal_callers_manage_suppressions_over_http(service: sysmail.App) -> None:
    base = service.url
    status, _, body = call(base, "POST", "/v1/suppressions",
                           json.dumps({"address": ADA, "reason": "asked by support"}).encode(),
                           {**AUTH, "Content-Type": "application/json"})
    assert status == 201, body
    assert json.loads(body)["reason"] == "asked by support" and json.loads(body)["source"] == "api"
    status, _, body = call(base, "GET", "/v1/suppressions", headers=AUTH)
    assert status == 200 and [e["address"] for e in json.loads(body)["suppressions"]] == [ADA]
    status, _, body = call(base, "GET", "/v1/suppressions/" + urllib.parse.quote(ADA), headers=AUTH)
    assert status == 200 and json.loads(body)["suppressions"][0]["expires"] is None
    status, _, body = call(base, "POST", "/v1/emails", json.dumps(
        {"template": "billing-notification", "to": [ADA, BOB], "vars": {"summary": "S"}}).encode(),
        {**AUTH, "Content-Type": "application/json"})
    assert status == 202 and json.loads(body)["suppressed"] == [ADA]
    status, _, body = call(base, "POST", "/v1/emails", json.dumps(
        {"template": "billing-notification", "recipients": [ADA, BOB], "vars": {"summary": "S"}}
    ).encode(), {**AUTH, "Content-Type": "application/json"})
    assert status == 202 and json.loads(body)["suppressed"] == [ADA]
    assert len(json.loads(body)["messageIds"]) == 2
    status, _, body = call(base, "DELETE", f"/v1/suppressions/{ADA}", headers=AUTH)
    assert (status, json.loads(body)) == (200, {"removed": 1})
    status, _, body = call(base, "DELETE", f"/v1/suppressions/{ADA}", headers=AUTH)
    assert status == 404 and "error" in json.loads(body)
    assert call(base, "GET", "/v1/suppressions")[0] == 401
    assert call(base, "DELETE", f"/v1/suppressions/{ADA}",
                headers={"Authorization": "Bearer wrong"})[0] == 401
    status, _, body = call(base, "GET", "/v1/suppressions/not-an-address", headers=AUTH)
    assert status == 400 and "error" in json.loads(body)
    status, headers, _ = call(base, "PUT", "/v1/suppressions/x@y.example", headers=AUTH)
    assert status == 405 and headers["Allow"] == "DELETE, GET"


def announcement_link(app: sysmail.App, smtp_server: SmtpServer, rcpt: str) -> str:
    app.enqueuer.enqueue_template("service-announcement", rcpt, {"title": "T", "body": "B"})
    app.sending.sender.wake()
    message = parsed(smtp_server.wait_for(1)[-1].data)
    https = str(message["List-Unsubscribe"]).split(",")[0].strip().strip("<>")
    return urllib.parse.urlsplit(https).path + "?" + urllib.parse.urlsplit(https).query


def test_one_click_unsubscribe_over_real_http(service: sysmail.App,
                                              smtp_server: SmtpServer) -> None:
    link = announcement_link(service, smtp_server, ADA)
    for _ in range(2):  # a mail scanner following the link changes nothing
        status, headers, body = call(service.url, "GET", link)
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert b'<form method="post">' in body and ADA.encode() in body
    assert service.suppressions.entries() == []
    status, _, body = call(service.url, "POST", link, b"List-Unsubscribe=One-Click",
                           {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 200 and b"You are unsubscribed" in body
    (entry,) = service.suppressions.entries()
    assert (entry.address, entry.scope, entry.reason) == (ADA, "service-announcement",
                                                          "unsubscribe")
    again = service.enqueuer.enqueue_template("service-announcement", ADA,
                                              {"title": "T", "body": "B"})
    assert again.suppressed == (ADA,)
    assert service.enqueuer.enqueue_template("billing-notification", ADA,
                                             {"summary": "S"}).suppressed == ()
    forged = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
    for path in (forged, "/v1/unsubscribe", "/v1/unsubscribe?t=" + "x" * 2000):
        status, _, body = call(service.url, "POST", path, b"List-Unsubscribe=One-Click")
        assert status == 400 and b"not valid" in body
    assert len(service.suppressions.entries()) == 1


def test_metrics_show_the_list_bounces_and_rates(service: sysmail.App,
                                                 smtp_server: SmtpServer) -> None:
    for i in range(4):
        service.enqueuer.enqueue_message(f"user{i}@example.org", "S", "T")
    service.sending.sender.wake()
    smtp_server.wait_for(4)
    service.suppressions.record_bounce("hard", ADA, "", "hard bounce")
    service.suppressions.record_bounce("complaint", BOB, "", "complaint")
    service.suppressions.suppress("carol@example.org", "asked", "cli")
    status, _, body = call(service.ops_url, "GET", "/metrics")
    assert status == 200
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("sysmail_suppressions", (("reason", "hard-bounce"),))] == 1
    assert samples[("sysmail_suppressions", (("reason", "complaint"),))] == 1
    assert samples[("sysmail_suppressions", (("reason", "manual"),))] == 1
    assert samples[("sysmail_bounces_last_24h", (("kind", "hard"),))] == 1
    assert samples[("sysmail_sent_last_24h", ())] == 4
    assert samples[("sysmail_bounce_rate_24h", ())] == 0.25
    assert samples[("sysmail_complaint_rate_24h", ())] == 0.25


# --------------------------------------------------------------------------- CLI


def test_the_cli_lists_adds_and_removes(tmp_path: Path) -> None:
    env = {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(tmp_path / "spool"),
           "SYSMAIL_OUTBOX": str(tmp_path / "outbox")}
    assert run_cli(["suppressed"], env).stdout == "no suppressed addresses\n"
    added = run_cli(["suppress", ADA, "--reason", "asked by phone"], env)
    assert added.returncode == 0 and added.stdout == f"suppressed {ADA}\n"
    table = run_cli(["suppressed"], env).stdout
    assert table.startswith(f"{ADA}  all  asked by phone  (cli, ") and "until removed" in table
    (entry,) = json.loads(run_cli(["suppressed", "--json"], env).stdout)
    assert entry["address"] == ADA and entry["expires"] is None
    sent = run_cli(["send", "--to", ADA, "--to", BOB, "--subject", "S", "--text", "T"], env)
    assert sent.returncode == 0 and sent.stdout.startswith("<")
    assert f"not queued for {ADA}: suppressed" in sent.stderr
    assert run_cli(["unsuppress", ADA], env).returncode == 0
    missing = run_cli(["unsuppress", ADA], env)
    assert missing.returncode == 65 and "not suppressed" in missing.stderr
    bad = run_cli(["suppress", "not an address"], env)
    assert bad.returncode == 65 and "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- the bounce hook


def test_a_bounce_suppresses_only_the_recipient_its_verp_tag_names(tmp_path: Path,
                                                                  clock: FakeClock) -> None:
    suppressions = listed(tmp_path, clock)
    to_ada = sysmail.verp_address("bounces@b.example", KEY, "<m@x>", ADA, clock.now)
    assert sysmail.apply_bounce(suppressions, KEY, "hard", [BOB], to_ada) is None  # other rcpt
    assert sysmail.apply_bounce(suppressions, KEY, "hard", [ADA], "bounces@b.example") is None
    assert sysmail.apply_bounce(suppressions, b"x" * 32, "hard", [ADA], to_ada) is None
    for kind in ("auto-reply", "none"):
        assert sysmail.apply_bounce(suppressions, KEY, kind, [ADA], to_ada) is None
    assert suppressions.entries() == [] and suppressions.bounces_last_24h()["hard"] == 0
    entry = sysmail.apply_bounce(suppressions, KEY, "hard", [BOB, ADA.upper()], to_ada.upper(),
                                 "550 5.1.1 unknown", "5.1.1")
    assert entry is not None and entry.address == ADA and entry.source == "hard bounce 5.1.1"
    complaint = sysmail.apply_bounce(suppressions, KEY, "complaint", [ADA], f"<{to_ada}>")
    assert complaint.reason == "complaint" and complaint.expires is None


# --------------------------------------------------------------------------- no I/O to check

CHECKS = """
import os, sys
sys.path.insert(0, {repo!r})
import sysmail
mailer = sysmail.Mailer(sysmail.Config.from_env({{"SYSMAIL_SPOOL": {spool!r}}}))
suppressions = mailer.app.suppressions
suppressions.suppress("ada@example.org", "manual", "test")
os.write(1, b"CHECKS-START\\n")
blocked = sum(suppressions.blocks(f"user{{i % 50}}@example.org", "billing-notification",
                                  sysmail.BULK) is not None for i in range(5000))
blocked += suppressions.blocks("ada@example.org", "billing-notification", sysmail.BULK) is not None
os.write(1, b"CHECKS-END %d\\n" % blocked)
"""


def test_checking_the_list_costs_no_system_call(tmp_path: Path) -> None:
    """5,001 checks between two marker writes: strace sees nothing in between."""
    if not shutil.which("strace"):
        pytest.skip("strace is not installed")
    script = tmp_path / "checks.py"
    script.write_text(CHECKS.format(repo=str(Path(sysmail.__file__).parent),
                                    spool=str(tmp_path / "spool")))
    log = tmp_path / "strace.log"
    result = subprocess.run(["strace", "-qq", "-o", str(log), sys.executable, str(script)],
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "CHECKS-END 1" in result.stdout
    calls = log.read_text().splitlines()
    start = next(i for i, line in enumerate(calls) if "CHECKS-START" in line)
    end = next(i for i, line in enumerate(calls) if "CHECKS-END" in line)
    assert calls[start + 1:end] == []


def test_enqueue_many_leaves_suppressed_recipients_out(suppressed_mailer: sysmail.Mailer) -> None:
    ids = suppressed_mailer.enqueue_many("billing-notification", [ADA, BOB, {"to": "c@x.example"}],
                                         summary="S")
    assert [i.suppressed for i in ids] == [(ADA,), (), ()]
    assert all(i.startswith("<") for i in ids)
    assert queued(suppressed_mailer) == [BOB, "c@x.example"]


def test_the_service_sees_another_process_suppress_within_its_cadence(tmp_path: Path,
                                                                     smtp_server: SmtpServer) -> None:
    """`sysmail suppress` in another process; serve's sender loop re-reads the list once
    SUPPRESSION_REFRESH_SECONDS have passed on its clock, and then leaves the address out."""
    clock = FakeClock()
    cfg = config(tmp_path, SMTP_URL=smtp_server.url, SYSMAIL_ALLOW_UNSIGNED="1",
                 SYSMAIL_LISTEN="127.0.0.1:0", SYSMAIL_METRICS_LISTEN="off",
                 SYSMAIL_DB=str(tmp_path / "db.sqlite"))
    app = sysmail.build_app(cfg, clock=clock)
    app.start()
    try:
        env = {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(tmp_path / "spool")}
        assert run_cli(["suppress", ADA], env).returncode == 0
        assert app.enqueuer.enqueue_message(ADA, "S", "T").suppressed == ()  # not re-read yet
        clock.advance(sysmail.SUPPRESSION_REFRESH_SECONDS)
        deadline = time.monotonic() + 10
        while app.suppressions.blocks(ADA, "", sysmail.BULK) is None:
            assert time.monotonic() < deadline, "the sender loop never refreshed the list"
            time.sleep(0.05)
        assert app.enqueuer.enqueue_message(ADA, "S", "T").suppressed == (ADA,)
    finally:
        app.stop()


def test_garbled_redis_fields_fall_back_to_the_local_copy(tmp_path: Path, clock: FakeClock,
                                                          redis_server: RedisServer,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    import redis

    host = sysmail.SuppressionList(tmp_path, clock, redis_url=redis_server.url)
    host.suppress(ADA, "manual", "cli")
    client = redis.Redis.from_url(redis_server.url)
    client.hset("sysmail:suppressions", "all x@y.example", "{not json")
    client.hset("sysmail:suppressions", "bounces soon hard", "1")
    client.incr("sysmail:suppressions:version")
    with caplog.at_level(logging.WARNING, logger="sysmail"):
        host.refresh()
    assert "suppressions_from_file" in caplog.text
    assert [e.address for e in host.entries()] == [ADA]  # the local copy still answers
    client.hdel("sysmail:suppressions", "all x@y.example")
    client.incr("sysmail:suppressions:version")
    host.refresh()
    assert host.bounces_last_24h() == {"hard": 0, "soft": 0, "complaint": 0}
    host.record_bounce("hard", BOB, "", "hard bounce")  # drops the foreign counter
    assert b"bounces soon hard" not in client.hkeys("sysmail:suppressions")
