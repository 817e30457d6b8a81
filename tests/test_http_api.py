"""The HTTP service (issue 3) over real HTTP, a real SQLite file and real SMTP (aiosmtpd).

The password-reset flow end to end, enumeration (body, status, limits, timing), rate limits and
X-Forwarded-For, bad input, the reset page, the internal send API with idempotency, health and
readiness with the store or the spool down, /metrics as Prometheus text, no token in the log,
the consume race, and SIGTERM handling of `sysmail serve`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as DEFAULT_POLICY
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    REPO,
    SmtpServer,
    free_port,
    run_cli,
    wait_quiescent,
    wait_server_read,
)
from prometheus_client.parser import text_string_to_metric_families

import sysmail

API_KEY = "test-api-key-" + secrets.token_hex(12)
JSON_TYPE = {"Content-Type": "application/json"}
FORM_TYPE = {"Content-Type": "application/x-www-form-urlencoded"}
RESET_SUBJECT = "Reset your example.com password"
ALERT_SUBJECT = "Security alert for your example.com account"
GENERIC_TOKEN_ERROR = {"error": "this reset link is invalid, used or expired"}
TOO_MANY = {"error": "too many requests, try again later"}
UNAVAILABLE = {"error": "temporarily unavailable, try again later"}
ADA = "ada@example.com"
PASSWORD = "new password 1"
LINK = re.compile(r"(?P<base>\S*)/reset-password\?token=(?P<token>[A-Za-z0-9_-]+)")


# --------------------------------------------------------------------------- HTTP client


@dataclass
class Reply:
    """One HTTP response, read completely."""

    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)


def http_call(base: str, method: str, path: str, body: object = None,
              headers: Mapping[str, str] | None = None, timeout: float = 15) -> Reply:
    """Send one request on a new connection; dict/list bodies are sent as JSON."""
    parts = urllib.parse.urlsplit(base)
    sent_headers = dict(headers or {})
    if isinstance(body, dict | list):
        body = json.dumps(body).encode()
        sent_headers.setdefault("Content-Type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request(method, path, body=body, headers=sent_headers)
        response = connection.getresponse()
        return Reply(response.status, response.headers, response.read())
    finally:
        connection.close()


def json_reply(reply: Reply, status: int) -> Any:
    """Assert the status and the JSON, never-cached response headers; return the parsed body."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.headers["Cache-Control"] == "no-store"
    assert int(reply.headers["Content-Length"]) == len(reply.body)
    return reply.json()


def error_reply(reply: Reply, status: int) -> str:
    """Assert a JSON {"error": "..."} response with that status; return the message."""
    body = json_reply(reply, status)
    assert list(body) == ["error"], body
    assert isinstance(body["error"], str)
    assert body["error"]
    assert "Traceback" not in body["error"]
    return body["error"]


def html_reply(reply: Reply, status: int) -> str:
    """Assert an HTML page response (never cached, no referrer); return its text."""
    assert reply.status == status, (reply.status, reply.body[:300])
    assert reply.headers["Content-Type"] == "text/html; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-store"
    assert reply.headers["Referrer-Policy"] == "no-referrer"
    text = reply.body.decode()
    assert text.startswith("<!DOCTYPE html>")
    assert "<script" not in text
    return text


# --------------------------------------------------------------------------- mail


def parse_mail(data: bytes) -> EmailMessage:
    """An RFC 5322 message as an EmailMessage."""
    return BytesParser(policy=DEFAULT_POLICY).parsebytes(data)


def text_part(message: EmailMessage) -> str:
    """The text/plain body of a message."""
    part = message.get_body(preferencelist=("plain",))
    assert part is not None
    return part.get_content().replace("\r\n", "\n")


def mails(smtp: SmtpServer, to: str | None = None, subject: str | None = None
          ) -> list[EmailMessage]:
    """The messages the sink accepted so far, filtered by recipient and exact subject."""
    found = []
    for received in list(smtp.messages):
        message = parse_mail(received.data)
        if to is not None and to not in received.rcpt_tos:
            continue
        if subject is not None and message["Subject"] != subject:
            continue
        found.append(message)
    return found


def wait_mails(smtp: SmtpServer, n: int, to: str | None = None, subject: str | None = None,
               timeout: float = 10) -> list[EmailMessage]:
    """Wait until at least n matching messages arrived; return them."""
    deadline = time.monotonic() + timeout
    while True:
        found = mails(smtp, to, subject)
        if len(found) >= n:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {n} mail(s) to {to} / {subject!r}, got {len(found)}")
        time.sleep(0.02)


def reset_link(message: EmailMessage) -> tuple[str, str]:
    """The reset link of a password-reset mail (on a line of its own, after its label) and
    its token."""
    lines = [line.strip() for line in text_part(message).splitlines() if LINK.search(line)]
    assert len(lines) == 1, text_part(message)
    label, _, link = lines[0].rpartition(" ")
    match = LINK.fullmatch(link)
    assert label == "Reset password:" and match is not None, lines[0]
    return link, match["token"]


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    """A started App on 127.0.0.1:<port 0> with mail going to the aiosmtpd sink."""

    app: sysmail.App
    smtp: SmtpServer
    folder: Path

    @property
    def url(self) -> str:
        """The server's base URL."""
        return self.app.url

    @property
    def store(self) -> Any:
        """The token store the app uses."""
        return self.app.store

    @property
    def config(self) -> sysmail.Config:
        """The app's configuration."""
        return self.app.config

    def call(self, method: str, path: str, body: object = None,
             headers: Mapping[str, str] | None = None) -> Reply:
        """One request to the service."""
        return http_call(self.url, method, path, body, headers)

    def ops(self, path: str) -> Reply:
        """GET from the operators' listener (SYSMAIL_METRICS_LISTEN)."""
        return http_call(self.app.ops_url, "GET", path)

    def forgot(self, address: str, headers: Mapping[str, str] | None = None) -> Reply:
        """POST /v1/auth/forgot-password."""
        return self.call("POST", "/v1/auth/forgot-password", {"email": address}, headers)

    def reset(self, token: str, password: str = PASSWORD,
              headers: Mapping[str, str] | None = None) -> Reply:
        """POST /v1/auth/reset-password."""
        return self.call("POST", "/v1/auth/reset-password",
                         {"token": token, "password": password}, headers)

    def send(self, payload: object, headers: Mapping[str, str] | None = None) -> Reply:
        """POST /v1/emails with the API key."""
        return self.call("POST", "/v1/emails", payload,
                         {"Authorization": f"Bearer {API_KEY}", **(headers or {})})

    def token_for(self, address: str, count: int = 1) -> tuple[str, str]:
        """Ask for a reset and return (link, token) of the count-th reset mail to address."""
        assert self.forgot(address).status == 202
        message = wait_mails(self.smtp, count, to=address, subject=RESET_SUBJECT)[count - 1]
        return reset_link(message)


def base_env(smtp: SmtpServer, folder: Path) -> dict[str, str]:
    """The house configuration: a free port, the sink as relay, files in folder."""
    return {
        "SYSMAIL_LISTEN": "127.0.0.1:0",
        "SYSMAIL_METRICS_LISTEN": "127.0.0.1:0",
        "SMTP_URL": smtp.url,
        "SYSTEM_DOMAIN": "example.com",
        "SYSMAIL_ALLOW_UNSIGNED": "1",
        "SYSMAIL_SPOOL": str(folder / "spool"),
        "SYSMAIL_DB": str(folder / "sysmail.db"),
        "SYSMAIL_API_KEY": API_KEY,
    }


@pytest.fixture
def make_service(smtp_server: SmtpServer, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Factory: make_service(env overrides (None deletes), store=None) -> a started Service."""
    apps: list[sysmail.App] = []

    def make(env: Mapping[str, str | None] | None = None, store: object = None) -> Service:
        folder = tmp_path / f"service{len(apps)}"
        folder.mkdir()
        merged = {**base_env(smtp_server, folder), **(env or {})}
        config = sysmail.Config.from_env({k: v for k, v in merged.items() if v is not None})
        app = sysmail.build_app(config, store=store)
        apps.append(app)
        app.start()
        return Service(app, smtp_server, folder)

    try:
        yield make
    finally:
        for app in reversed(apps):
            app.stop()


@pytest.fixture
def service(make_service: Callable[..., Service]) -> Service:
    """The service with the default configuration and the SQLite store."""
    return make_service()


def fresh_window(window: float, needed: float = 3.0) -> None:
    """Sleep into the next fixed rate-limit window when this one has less than `needed` left.

    RateLimiter counts in windows aligned to the app's clock (wall time); a burst that
    straddles two windows would be counted in both halves.
    """
    left = window - time.time() % window
    if left < needed:
        time.sleep(left + 0.05)


def assert_retry_after(reply: Reply, window: float) -> None:
    """A 429 with the generic body and a Retry-After of whole seconds within the window."""
    assert json_reply(reply, 429) == TOO_MANY
    assert 1 <= int(reply.headers["Retry-After"]) <= window


def settled_mails(svc: Service) -> list[EmailMessage]:
    """Stop the service, wait until nothing more can arrive, and return every mail it sent.

    App.stop() finishes the forgot-password requests already accepted and the send in flight,
    then closes the SMTP connections; once the spool holds nothing and the sink is idle, no
    mail of this service is on its way any more. "Nothing else was sent" is then a count, not
    a guess that a sleep was long enough for a late mail to show up.
    """
    svc.app.stop()
    wait_quiescent(svc.config.spool_dir, svc.smtp)
    return mails(svc.smtp)


# --------------------------------------------------------------------------- the reset flow


def test_reset_flow_end_to_end(make_service: Callable[..., Service], tmp_path: Path) -> None:
    """Forgot -> mail with a link to this service -> reset -> hash, audit, hook, alert; no reuse."""
    changed: list[sysmail.User] = []
    store = sysmail.SqliteStore(tmp_path / "flow.db", on_password_changed=changed.append)
    ada = store.add_user(ADA, "Ada Lovelace")
    svc = make_service(store=store)

    reply = svc.forgot(ADA)
    assert json_reply(reply, 202) == {
        "status": "accepted",
        "message": "If an account uses this address, a password reset link is on its way."}
    [message] = wait_mails(svc.smtp, 1, to=ADA, subject=RESET_SUBJECT)
    assert str(message["To"]) == f"Ada Lovelace <{ADA}>"
    text = text_part(message)
    assert text.startswith("Hi Ada Lovelace,\n")
    assert "within 60 minutes" in text
    link, token = reset_link(message)
    assert link == f"{svc.url}/reset-password?token={token}"
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)  # 32 random bytes, base64url
    assert link in message.get_body(preferencelist=("html",)).get_content()

    before = time.time()
    reply = svc.reset(token, PASSWORD)
    assert json_reply(reply, 200) == {"status": "password changed"}
    stored = store.password_hash(ada)
    assert stored.startswith("scrypt$n=16384,r=8,p=1$")
    assert sysmail.verify_password(PASSWORD, stored)
    assert changed == [ada]
    [(action, at, client)] = store.audit_entries(ada)
    assert (action, client) == ("password_reset", "127.0.0.1")
    assert before - 1 <= at <= time.time() + 1

    [alert] = wait_mails(svc.smtp, 1, to=ADA, subject=ALERT_SUBJECT)
    alert_text = text_part(alert)
    assert "your password was changed" in alert_text
    assert "IP address: 127.0.0.1" in alert_text
    assert token not in alert_text

    again = svc.reset(token, "another password 2")
    assert json_reply(again, 400) == GENERIC_TOKEN_ERROR
    assert store.password_hash(ada) == stored
    assert changed == [ada]
    assert len(store.audit_entries(ada)) == 1
    assert [m["Subject"] for m in settled_mails(svc)] == [RESET_SUBJECT, ALERT_SUBJECT]


def test_reset_link_starts_with_dashboard_url(make_service: Callable[..., Service]) -> None:
    """With DASHBOARD_URL set, the mailed link is DASHBOARD_URL/reset-password?token=..."""
    svc = make_service({"DASHBOARD_URL": "https://dashboard.example.com/app/"})
    svc.store.add_user(ADA)
    link, token = svc.token_for(ADA)
    assert link == f"https://dashboard.example.com/app/reset-password?token={token}"
    assert json_reply(svc.reset(token), 200) == {"status": "password changed"}


def test_reset_link_starts_with_the_public_url(make_service: Callable[..., Service]) -> None:
    """Without DASHBOARD_URL, SYSMAIL_PUBLIC_URL (when set) is the base of sysmail's own page."""
    svc = make_service({"SYSMAIL_PUBLIC_URL": "https://mail.example.com"})
    svc.store.add_user(ADA)
    link, token = svc.token_for(ADA)
    assert link == f"https://mail.example.com/reset-password?token={token}"


def test_reset_revokes_the_users_other_tokens(service: Service) -> None:
    """Earlier tokens stay valid until one is used; then every other one is revoked."""
    ada = service.store.add_user(ADA)
    tokens = [service.token_for(ADA, count)[1] for count in (1, 2, 3)]
    assert len(set(tokens)) == 3
    first, middle, last = tokens
    assert json_reply(service.reset(middle), 200) == {"status": "password changed"}
    assert json_reply(service.reset(first, "other password 1"), 400) == GENERIC_TOKEN_ERROR
    assert json_reply(service.reset(last, "other password 2"), 400) == GENERIC_TOKEN_ERROR
    assert sysmail.verify_password(PASSWORD, service.store.password_hash(ada))


def test_garbage_tokens_are_refused_with_the_generic_error(service: Service) -> None:
    """Unknown, malformed or over-long tokens get the same 400 and change nothing."""
    ada = service.store.add_user(ADA)
    _, real = service.token_for(ADA)
    for token in (secrets.token_urlsafe(32), "abc", "!" * 43, "A" * 129, real + "x",
                  real[:-1], real.upper() if real.upper() != real else real.lower(),
                  f"{real} ", "../../etc/passwd"):
        assert json_reply(service.reset(token), 400) == GENERIC_TOKEN_ERROR, token
    assert service.store.password_hash(ada) is None
    assert json_reply(service.reset(real), 200) == {"status": "password changed"}


def test_expired_token_is_refused(make_service: Callable[..., Service]) -> None:
    """A token past SYSMAIL_RESET_TOKEN_SECONDS gets the generic 400."""
    svc = make_service({"SYSMAIL_RESET_TOKEN_SECONDS": "1"})
    ada = svc.store.add_user(ADA)
    _, token = svc.token_for(ADA)
    time.sleep(1.3)  # the token was made before its mail was queued: it has expired now
    assert json_reply(svc.reset(token), 400) == GENERIC_TOKEN_ERROR
    assert svc.store.password_hash(ada) is None


def test_password_length_is_checked_before_the_token_is_spent(service: Service) -> None:
    """7 or 1025 characters: 400 naming the rule, the token stays valid; 1024 is accepted."""
    ada = service.store.add_user(ADA)
    _, token = service.token_for(ADA)
    for password in ("x" * 7, "x" * 1025):
        error = error_reply(service.reset(token, password), 400)
        assert error == "the password must be 8 to 1024 characters long"
    assert service.store.password_hash(ada) is None
    assert json_reply(service.reset(token, "y" * 1024), 200) == {"status": "password changed"}
    assert sysmail.verify_password("y" * 1024, service.store.password_hash(ada))


def test_unencodable_password_is_a_400_and_keeps_the_token(service: Service) -> None:
    """A password that is not valid Unicode text is bad input, not an internal error."""
    ada = service.store.add_user(ADA)
    _, token = service.token_for(ADA)
    body = b'{"token": "%s", "password": "%s"}' % (token.encode(), b"\\udc80" * 8)
    error_reply(service.call("POST", "/v1/auth/reset-password", body, JSON_TYPE), 400)
    assert json_reply(service.reset(token), 200) == {"status": "password changed"}
    assert sysmail.verify_password(PASSWORD, service.store.password_hash(ada))


# --------------------------------------------------------------------------- the reset page


def test_reset_page_shows_a_form_and_never_consumes_the_token(service: Service) -> None:
    """GET /reset-password?token=... three times (mail scanners), then the JSON reset works."""
    ada = service.store.add_user(ADA)
    link, token = service.token_for(ADA)
    path = link.removeprefix(service.url)
    for _ in range(3):
        reply = service.call("GET", path)
        page = html_reply(reply, 200)
        assert reply.headers["X-Frame-Options"] == "DENY"
        assert '<form method="post" action="/reset-password">' in page
        assert f'<input type="hidden" name="token" value="{token}">' in page
        assert 'name="password" type="password"' in page
        assert 'name="confirm" type="password"' in page
    assert service.store.password_hash(ada) is None
    assert json_reply(service.reset(token), 200) == {"status": "password changed"}


def test_reset_page_without_a_usable_token_says_so(service: Service) -> None:
    """A missing or malformed token gets a 400 page without a form."""
    for path in ("/reset-password", "/reset-password?token=", "/reset-password?token=short",
                 "/reset-password?token=%3Cscript%3Ealert(1)%3C%2Fscript%3E"):
        page = html_reply(service.call("GET", path), 400)
        assert "This reset link is incomplete" in page
        assert "<form" not in page


def test_reset_form_post_changes_the_password(service: Service) -> None:
    """The form's POST: differing passwords keep the token; then it changes the password once."""
    ada = service.store.add_user(ADA)
    _, token = service.token_for(ADA)

    def post(fields: dict[str, str]) -> Reply:
        return service.call("POST", "/reset-password", urllib.parse.urlencode(fields), FORM_TYPE)

    page = html_reply(post({"token": token, "password": "8chars!!", "confirm": "8chars!?"}), 400)
    assert "The passwords differ" in page
    page = html_reply(post({"token": token, "password": "short", "confirm": "short"}), 400)
    assert "Your password was not changed" in page
    assert service.store.password_hash(ada) is None

    page = html_reply(post({"token": token, "password": "8chars!!", "confirm": "8chars!!"}), 200)
    assert "Your password has been changed" in page
    assert sysmail.verify_password("8chars!!", service.store.password_hash(ada))
    [(action, _, client)] = service.store.audit_entries(ada)
    assert (action, client) == ("password_reset", "127.0.0.1")
    wait_mails(service.smtp, 1, to=ADA, subject=ALERT_SUBJECT)

    page = html_reply(post({"token": token, "password": "other pass", "confirm": "other pass"}),
                      400)
    assert "this reset link is invalid, used or expired" in page
    assert sysmail.verify_password("8chars!!", service.store.password_hash(ada))
    error_reply(service.call("POST", "/reset-password", {"token": token}), 415)


# --------------------------------------------------------------------------- enumeration


def test_forgot_password_answers_the_same_for_unknown_addresses(service: Service) -> None:
    """Same status, byte-identical body and the same headers; mail only for the real user."""
    service.store.add_user(ADA)
    known = service.forgot(ADA)
    unknown = service.forgot("nobody@example.com")
    assert known.status == unknown.status == 202
    assert known.body == unknown.body
    assert ({k: v for k, v in known.headers.items() if k != "Date"}
            == {k: v for k, v in unknown.headers.items() if k != "Date"})
    wait_mails(service.smtp, 1, to=ADA, subject=RESET_SUBJECT)
    assert [m["To"] for m in settled_mails(service)] == [ADA]


def test_forgot_password_timing_does_not_reveal_the_user(
    make_service: Callable[..., Service],
) -> None:
    """~200 interleaved requests each: the medians for known and unknown are within 3 ms."""
    svc = make_service({"SYSMAIL_FORGOT_LIMIT_PER_CLIENT": "100000/60",
                        "SYSMAIL_FORGOT_LIMIT_PER_ADDRESS": "100000/3600"})
    svc.store.add_user(ADA)
    unknown_address = "nobody@example.com"
    timings: dict[str, list[float]] = {ADA: [], unknown_address: []}
    for round_number in range(220):
        pair = [ADA, unknown_address] if round_number % 2 else [unknown_address, ADA]
        for address in pair:
            started = time.perf_counter()
            reply = svc.forgot(address)
            elapsed = time.perf_counter() - started
            assert reply.status == 202
            if round_number >= 20:  # the first rounds warm up connections and caches
                timings[address].append(elapsed)
    known, unknown = statistics.median(timings[ADA]), statistics.median(timings[unknown_address])
    assert len(timings[ADA]) == len(timings[unknown_address]) == 200
    assert abs(known - unknown) < 0.003, (known, unknown)


# --------------------------------------------------------------------------- rate limits


def test_forgot_password_per_client_limit(service: Service) -> None:
    """10 per minute per client (any addresses); the 11th gets 429 with Retry-After."""
    service.store.add_user(ADA)
    fresh_window(60)
    for i in range(10):
        assert json_reply(service.forgot(f"user{i}@example.com"), 202)["status"] == "accepted"
    assert_retry_after(service.forgot("user10@example.com"), 60)
    assert_retry_after(service.forgot(ADA), 60)
    assert settled_mails(service) == []  # and none for the unknown user0..user9


def test_forgot_password_per_address_limit_is_the_same_for_unknown_addresses(
    service: Service,
) -> None:
    """3 per hour per address: the 4th gets the same 429 whether the user exists or not."""
    service.store.add_user(ADA)
    fresh_window(3600)
    refused = {}
    for address in (ADA, "nobody@example.com"):
        for _ in range(3):
            assert json_reply(service.forgot(address), 202)["status"] == "accepted"
        refused[address] = service.forgot(address)
        assert_retry_after(refused[address], 3600)
    assert refused[ADA].body == refused["nobody@example.com"].body
    assert_retry_after(service.forgot("ADA@EXAMPLE.COM"), 3600)  # one address, any spelling
    wait_mails(service.smtp, 3, to=ADA, subject=RESET_SUBJECT)
    assert [m["To"] for m in settled_mails(service)] == [ADA] * 3


def test_reset_password_per_client_limit(service: Service) -> None:
    """10 reset attempts per minute per client; the 11th (JSON or form) gets 429."""
    ada = service.store.add_user(ADA)
    _, token = service.token_for(ADA)
    fresh_window(60)
    for _ in range(10):
        assert json_reply(service.reset(secrets.token_urlsafe(32)), 400) == GENERIC_TOKEN_ERROR
    assert_retry_after(service.reset(token), 60)
    form = urllib.parse.urlencode({"token": token, "password": PASSWORD, "confirm": PASSWORD})
    assert_retry_after(service.call("POST", "/reset-password", form, FORM_TYPE), 60)
    assert service.store.password_hash(ada) is None


def test_forwarded_for_from_an_untrusted_peer_is_ignored(service: Service) -> None:
    """Without SYSMAIL_TRUSTED_PROXIES, a client cannot escape its limit with X-Forwarded-For."""
    fresh_window(60)
    for i in range(10):
        reply = service.forgot(f"user{i}@example.com", {"X-Forwarded-For": f"198.51.100.{i}"})
        assert reply.status == 202
    assert_retry_after(service.forgot("user10@example.com",
                                      {"X-Forwarded-For": "198.51.100.99"}), 60)


def test_forwarded_for_from_a_trusted_proxy_is_honoured(
    make_service: Callable[..., Service],
) -> None:
    """From a trusted proxy the right-most untrusted hop is the client: limits, audit, alert."""
    svc = make_service({"SYSMAIL_TRUSTED_PROXIES": "127.0.0.1/32, 10.0.0.0/8"})
    ada = svc.store.add_user(ADA)
    fresh_window(60)
    for i in range(12):  # twelve different clients behind the proxy
        reply = svc.forgot(f"user{i}@example.com", {"X-Forwarded-For": f"198.51.100.{i}"})
        assert reply.status == 202, i
    for i in range(10):  # one client, whatever it prepends itself
        reply = svc.forgot(f"other{i}@example.com",
                           {"X-Forwarded-For": f"192.0.2.{i}, 203.0.113.5, 10.1.2.3"})
        assert reply.status == 202, i
    assert_retry_after(svc.forgot("other10@example.com",
                                  {"X-Forwarded-For": "192.0.2.200, 203.0.113.5"}), 60)

    _, token = svc.token_for(ADA)
    reply = svc.reset(token, headers={"X-Forwarded-For": "203.0.113.77"})
    assert json_reply(reply, 200) == {"status": "password changed"}
    [(_, _, client)] = svc.store.audit_entries(ada)
    assert client == "203.0.113.77"
    [alert] = wait_mails(svc.smtp, 1, to=ADA, subject=ALERT_SUBJECT)
    assert "IP address: 203.0.113.77" in text_part(alert)


def test_client_address_rules() -> None:
    """client_address: the peer unless trusted, then the right-most untrusted hop."""
    trusted = sysmail.Config.from_env({"SYSMAIL_TRUSTED_PROXIES": "10.0.0.0/8"}).trusted_proxies
    assert sysmail.client_address("192.0.2.1", "203.0.113.9", ()) == "192.0.2.1"
    assert sysmail.client_address("192.0.2.1", "203.0.113.9", trusted) == "192.0.2.1"
    assert sysmail.client_address("10.0.0.2", "203.0.113.9", trusted) == "203.0.113.9"
    assert sysmail.client_address("10.0.0.2", "1.2.3.4, 203.0.113.9, 10.9.9.9",
                                  trusted) == "203.0.113.9"
    assert sysmail.client_address("10.0.0.2", "", trusted) == "10.0.0.2"
    assert sysmail.client_address("10.0.0.2", "not-an-ip", trusted) == "10.0.0.2"


# --------------------------------------------------------------------------- bad input


def test_body_over_16_kib_is_refused_with_413(service: Service) -> None:
    """16 KiB is read (and judged); one byte more is 413 before the body is read at all."""
    limit = 16 * 1024
    for path in ("/v1/auth/forgot-password", "/v1/auth/reset-password", "/v1/emails"):
        exact = service.call("POST", path, b" " * limit, JSON_TYPE)
        assert exact.status != 413
        error_reply(service.call("POST", path, b" " * (limit + 1), JSON_TYPE), 413)
    with socket.create_connection(urllib.parse.urlsplit(service.url).netloc.split(":")) as sock:
        sock.settimeout(5)
        sock.sendall(b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 50000000\r\n\r\n")
        answer = read_until_closed(sock)  # no body sent: the server must not wait for it
    assert answer.startswith(b"HTTP/1.0 413 ")
    assert answer.endswith(b'{"error":"the body must be at most 16384 bytes"}')


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def raw_exchange(svc: Service, request: bytes) -> tuple[bytes, bytes]:
    """Send raw bytes on a new connection; return the response head and body."""
    host, port = urllib.parse.urlsplit(svc.url).netloc.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(request)
        head, _, body = read_until_closed(sock).partition(b"\r\n\r\n")
    return head, body


def test_bad_framing_headers_get_a_json_4xx(service: Service) -> None:
    """An invalid Content-Length is 400, a chunked body 411; JSON either way."""
    start = (b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: x\r\n"
             b"Content-Type: application/json\r\n")
    for framing, status in ((b"Content-Length: abc\r\n", b"400"),
                            (b"Content-Length: -5\r\n", b"400"),
                            (b"Transfer-Encoding: chunked\r\n", b"411")):
        head, body = raw_exchange(service, start + framing + b"\r\n")
        assert head.startswith(b"HTTP/1.0 " + status + b" "), head
        assert b"\r\nContent-Type: application/json\r\n" in head
        assert b"\r\nCache-Control: no-store\r\n" in head
        assert list(json.loads(body)) == ["error"]


def test_non_json_content_type_is_refused_with_415(service: Service) -> None:
    """The JSON endpoints want application/json (parameters allowed), nothing else."""
    body = json.dumps({"email": ADA}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded",
                         "application/jsonx", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": content_type} if content_type else {}
        for path in ("/v1/auth/forgot-password", "/v1/auth/reset-password"):
            error_reply(service.call("POST", path, body, headers), 415)
        error_reply(service.send(body, headers), 415)
    reply = service.forgot(ADA, {"Content-Type": "application/json; charset=utf-8"})
    assert json_reply(reply, 202)["status"] == "accepted"


BAD_BODIES: list[tuple[str, bytes]] = [
    ("/v1/auth/forgot-password", b"{"),
    ("/v1/auth/forgot-password", b"not json"),
    ("/v1/auth/forgot-password", b""),
    ("/v1/auth/forgot-password", b'["ada@example.com"]'),
    ("/v1/auth/forgot-password", b'"ada@example.com"'),
    ("/v1/auth/forgot-password", b"\xff\xfe{}"),
    ("/v1/auth/forgot-password", b"{}"),
    ("/v1/auth/forgot-password", b'{"mail": "ada@example.com"}'),
    ("/v1/auth/forgot-password", b'{"email": 42}'),
    ("/v1/auth/forgot-password", b'{"email": null}'),
    ("/v1/auth/forgot-password", b'{"email": ["ada@example.com"]}'),
    ("/v1/auth/forgot-password", b'{"email": ""}'),
    ("/v1/auth/forgot-password", b'{"email": "not an address"}'),
    ("/v1/auth/forgot-password", b'{"email": "ada@"}'),
    ("/v1/auth/forgot-password", b'{"email": "@example.com"}'),
    ("/v1/auth/forgot-password", b'{"email": "ada@example.com\\r\\nBcc: eve@example.com"}'),
    ("/v1/auth/forgot-password", b'{"email": "ada@example.com\\n"}'),
    ("/v1/auth/forgot-password", b'{"email": "ada@example.com\\u0000"}'),
    ("/v1/auth/forgot-password", b'{"email": "ada@example.com", "note": "a\\rb"}'),
    ("/v1/auth/forgot-password", b'{"email": "ada@example.com", "x\\ny": "1"}'),
    ("/v1/auth/reset-password", b'{"token": "' + b"A" * 43 + b'"}'),
    ("/v1/auth/reset-password", b'{"password": "long enough password"}'),
    ("/v1/auth/reset-password", b'{"token": 12345, "password": "long enough password"}'),
    ("/v1/auth/reset-password", b'{"token": "' + b"A" * 43 + b'", "password": 12345678}'),
    ("/v1/auth/reset-password", b'{"token": "' + b"A" * 43 + b'", "password": "pass\\r\\nword"}'),
    ("/v1/auth/reset-password", b"[1, 2]"),
    ("/v1/emails", b"{"),
    ("/v1/emails", (b'{"template": "security-alert", "to": "ada@example.com\\r\\nBcc: x@y.z",'
                    b' "vars": {"event": "x"}}')),
]


def test_malformed_bodies_get_400_with_a_json_error(service: Service) -> None:
    """Malformed JSON, missing or non-string fields, bad addresses, CR/LF/NUL: 400 {"error"}."""
    service.store.add_user(ADA)
    for path, body in BAD_BODIES:
        headers = {**JSON_TYPE, "Authorization": f"Bearer {API_KEY}"}
        reply = service.call("POST", path, body, headers)
        assert reply.status == 400, (path, body, reply.status, reply.body)
        error_reply(reply, 400)
    assert settled_mails(service) == []  # nothing was queued for anyone


def test_unknown_route_404_and_wrong_method_405(service: Service) -> None:
    """404 for unknown paths; 405 with Allow for known paths with another method."""
    for path in ("/", "/nope", "/v1/auth", "/v1/auth/forgot-password/", "/healthz/x",
                 "/reset-password/" + "A" * 43, "/V1/EMAILS"):
        assert error_reply(service.call("GET", path), 404) == "no such endpoint"
        error_reply(service.call("POST", path, {}), 404)
    for method, path, allow in (
        ("GET", "/v1/auth/forgot-password", "POST"),
        ("PUT", "/v1/auth/reset-password", "POST"),
        ("DELETE", "/reset-password", "GET, POST"),
        ("PATCH", "/v1/emails", "POST"),
        ("POST", "/healthz", "GET"),
        ("POST", "/readyz", "GET"),
        ("BREW", "/healthz", "GET"),
    ):
        reply = service.call(method, path, b"{}" if method != "GET" else None, JSON_TYPE)
        error_reply(reply, 405)
        assert reply.headers["Allow"] == allow, (method, path)


def test_many_query_fields_get_a_400_not_a_dropped_connection(service: Service) -> None:
    """A query with more than 20 fields is bad input: a JSON 4xx, never a dropped connection."""
    query = "&".join(f"f{i}=1" for i in range(25))
    try:
        reply = service.call("GET", f"/healthz?{query}")
    except (http.client.HTTPException, OSError) as exc:
        pytest.fail(f"the connection was dropped: {exc!r}")
    assert 400 <= reply.status < 500
    error_reply(reply, reply.status)


# --------------------------------------------------------------------------- the send API


def test_send_api_is_off_without_an_api_key(make_service: Callable[..., Service]) -> None:
    """Without SYSMAIL_API_KEY, POST /v1/emails does not exist (404), whatever is sent."""
    svc = make_service({"SYSMAIL_API_KEY": None})
    payload = {"template": "security-alert", "to": ADA, "vars": {"event": "x"}}
    assert error_reply(svc.send(payload), 404) == "no such endpoint"
    assert error_reply(svc.call("POST", "/v1/emails", payload), 404) == "no such endpoint"
    assert settled_mails(svc) == []


def test_send_api_needs_the_bearer_key(service: Service) -> None:
    """A missing or wrong key, or another scheme: 401 with WWW-Authenticate; nothing queued."""
    payload = {"template": "security-alert", "to": ADA, "vars": {"event": "x"}}
    for authorization in (None, "", "Bearer", f"Bearer {API_KEY}x", f"Bearer {API_KEY[:-1]}",
                          f"Basic {API_KEY}", API_KEY, "Bearer wrong-key-of-some-length"):
        headers = {} if authorization is None else {"Authorization": authorization}
        reply = service.call("POST", "/v1/emails", payload, headers)
        assert error_reply(reply, 401) == "a valid bearer token is required"
        assert reply.headers["WWW-Authenticate"] == 'Bearer realm="sysmail"'
    assert settled_mails(service) == []


def test_send_api_queues_and_delivers(service: Service) -> None:
    """202 {"messageId"}; the mail with that Message-ID arrives."""
    reply = service.send({"template": "two-factor-code", "to": ["grace@example.com"],
                          "vars": {"code": "482913", "expires_minutes": 5}},
                         {"Authorization": f"bearer {API_KEY}"})
    body = json_reply(reply, 202)
    assert list(body) == ["messageId"]
    assert re.fullmatch(r"<\d+\.[0-9a-f]{20}@example\.com>", body["messageId"])
    [message] = wait_mails(service.smtp, 1, to="grace@example.com")
    assert message["Message-ID"] == body["messageId"]
    assert message["Subject"] == "Your example.com sign-in code: 482913"
    assert "expires in 5 minutes" in text_part(message)


def test_send_api_idempotency_key(service: Service) -> None:
    """The same Idempotency-Key returns the same messageId and queues nothing more."""
    payload = {"template": "security-alert", "to": ADA, "vars": {"event": "a new sign-in"}}
    first = json_reply(service.send(payload, {"Idempotency-Key": "order-42"}), 202)
    second = json_reply(service.send(payload, {"Idempotency-Key": "order-42"}), 202)
    assert first == {"messageId": first["messageId"], "duplicate": False}
    assert second == {"messageId": first["messageId"], "duplicate": True}
    other = json_reply(service.send(payload, {"Idempotency-Key": "order-43"}), 202)
    assert other["messageId"] != first["messageId"]
    assert other["duplicate"] is False
    sentinel = json_reply(service.send({**payload, "to": "sentinel@example.com"}), 202)
    wait_mails(service.smtp, 3)
    ids = [m["Message-ID"] for m in settled_mails(service)]
    assert sorted(ids) == sorted([first["messageId"], other["messageId"],
                                  sentinel["messageId"]])


def test_send_api_idempotency_key_is_free_again_after_a_refused_request(
    service: Service,
) -> None:
    """A request refused with 400 does not burn its Idempotency-Key."""
    headers = {"Idempotency-Key": "retry-me"}
    bad = {"template": "security-alert", "to": ADA, "vars": {"nope": "x"}}
    error_reply(service.send(bad, headers), 400)
    good = {"template": "security-alert", "to": ADA, "vars": {"event": "x"}}
    body = json_reply(service.send(good, headers), 202)
    assert body["duplicate"] is False
    [message] = wait_mails(service.smtp, 1, to=ADA)
    assert message["Message-ID"] == body["messageId"]


def test_send_api_bad_template_or_vars_is_400(service: Service) -> None:
    """Unknown template, unknown/missing/unsafe vars, bad recipients: 400 and nothing queued."""
    for payload in (
        {"template": "no-such-template", "to": ADA, "vars": {}},
        {"template": "security-alert", "to": ADA, "vars": {"unknown": "x", "event": "x"}},
        {"template": "security-alert", "to": ADA, "vars": {}},
        {"template": "security-alert", "to": ADA},
        {"template": "security-alert", "to": ADA, "vars": {"event": ["x"]}},
        {"template": "security-alert", "to": ADA, "vars": {"event": None}},
        {"template": "security-alert", "to": ADA, "vars": "event=x"},
        {"template": "password-reset", "to": ADA, "vars": {"reset_url": "javascript:alert(1)"}},
        {"template": "two-factor-code", "to": ADA, "vars": {"code": "1", "expires_minutes": "x"}},
        {"template": 7, "to": ADA, "vars": {"event": "x"}},
        {"to": ADA, "vars": {"event": "x"}},
        {"template": "security-alert", "vars": {"event": "x"}},
        {"template": "security-alert", "to": "not an address", "vars": {"event": "x"}},
        {"template": "security-alert", "to": [], "vars": {"event": "x"}},
        {"template": "security-alert", "to": [ADA, 5], "vars": {"event": "x"}},
        {"template": "security-alert", "to": ADA, "vars": {"event": "a\r\nBcc: eve@x.y"}},
    ):
        reply = service.send(payload)
        assert reply.status == 400, (payload, reply.body)
        error_reply(reply, 400)
    assert settled_mails(service) == []


def test_send_api_vars_named_like_parameters_are_400(service: Service) -> None:
    """vars {"to": ...} is an unknown template variable like any other: 400."""
    for key in ("to", "template", "self"):
        payload = {"template": "security-alert", "to": ADA, "vars": {"event": "x", key: "y"}}
        error_reply(service.send(payload), 400)


def test_send_api_unencodable_vars_are_400(service: Service) -> None:
    """A variable that is not valid Unicode text is bad input."""
    body = b'{"template": "security-alert", "to": "ada@example.com", "vars": {"event": "\\udc80"}}'
    error_reply(service.send(body, JSON_TYPE), 400)


# --------------------------------------------------------------------------- health, store down


def test_healthz_and_readyz(service: Service) -> None:
    """Alive and ready with a writable spool and a reachable store: the details on the
    operators' listener only, and no /metrics on the public one."""
    assert json_reply(service.call("GET", "/healthz"), 200) == {"status": "ok"}
    assert json_reply(service.call("GET", "/readyz"), 200) == {"status": "ready"}
    assert json_reply(service.ops("/readyz"), 200) == {
        "status": "ready", "checks": {"spool": True, "store": True, "relays_up": "1/1"}}
    assert json_reply(service.ops("/healthz"), 200) == {"status": "ok"}
    assert error_reply(service.call("GET", "/metrics"), 404) == "no such endpoint"
    assert error_reply(http_call(service.app.ops_url, "POST", "/v1/emails", {}), 404)


def test_store_down_forgot_and_reset_503_while_mail_keeps_flowing(
    make_service: Callable[..., Service], tmp_path: Path,
) -> None:
    """A store whose file is a directory: readyz 503, forgot/reset 503; /v1/emails still works."""
    broken = tmp_path / "db-is-a-directory"
    broken.mkdir()
    svc = make_service({"SYSMAIL_DB": str(broken)})
    assert json_reply(svc.call("GET", "/healthz"), 200) == {"status": "ok"}
    assert json_reply(svc.ops("/readyz"), 503) == {
        "status": "not ready", "checks": {"spool": True, "store": False, "relays_up": "1/1"}}
    assert json_reply(svc.call("GET", "/readyz"), 503) == {"status": "not ready"}
    for reply in (svc.forgot(ADA), svc.forgot("nobody@example.com"),
                  svc.reset(secrets.token_urlsafe(32))):
        assert json_reply(reply, 503) == UNAVAILABLE
        assert reply.headers["Retry-After"] == "5"
    body = json_reply(svc.send({"template": "security-alert", "to": ADA,
                                "vars": {"event": "store down"}}), 202)
    [message] = wait_mails(svc.smtp, 1, to=ADA)
    assert message["Message-ID"] == body["messageId"]


def test_store_locked_answers_503_then_recovers(service: Service) -> None:
    """Another connection holding BEGIN EXCLUSIVE: reset answers 503 after the busy timeout
    (the token is not spent), /v1/emails keeps working; released, readyz and the reset succeed."""
    ada = service.store.add_user(ADA)
    _, token = service.token_for(ADA)
    lock = sqlite3.connect(service.config.db_path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        assert json_reply(service.reset(token), 503) == UNAVAILABLE
        accepted = json_reply(service.send({"template": "security-alert", "to": "grace@ex.org",
                                            "vars": {"event": "x"}}), 202)
        assert wait_mails(service.smtp, 1, to="grace@ex.org")[0]["Message-ID"] == \
            accepted["messageId"]
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    assert json_reply(service.call("GET", "/readyz"), 200)["status"] == "ready"
    assert json_reply(service.reset(token), 200) == {"status": "password changed"}
    assert sysmail.verify_password(PASSWORD, service.store.password_hash(ada))


def test_unwritable_spool_is_not_ready(service: Service) -> None:
    """spool/tmp replaced by a file: readyz 503 naming the spool, /v1/emails and forgot-password
    503 (nothing could be queued); then back."""
    tmp = service.config.spool_dir / "tmp"
    tmp.rmdir()
    tmp.write_bytes(b"")
    try:
        assert json_reply(service.ops("/readyz"), 503) == {
            "status": "not ready", "checks": {"spool": False, "store": True, "relays_up": "1/1"}}
        reply = service.send({"template": "security-alert", "to": ADA, "vars": {"event": "x"}})
        assert json_reply(reply, 503) == UNAVAILABLE
        assert json_reply(service.forgot("nobody@example.com"), 503) == UNAVAILABLE
    finally:
        tmp.unlink()
        tmp.mkdir()
    assert json_reply(service.call("GET", "/readyz"), 200)["status"] == "ready"


# --------------------------------------------------------------------------- metrics


@dataclass
class Scrape:
    """A parsed /metrics page: family types and sample values."""

    types: dict[str, str] = field(default_factory=dict)
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = field(default_factory=dict)

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's value, or None when it is absent."""
        return self.samples.get((name, tuple(sorted(labels.items()))))


def scrape(svc: Service) -> Scrape:
    """GET /metrics and parse it with prometheus_client's parser."""
    reply = svc.ops("/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert reply.headers["Cache-Control"] == "no-store"
    result = Scrape()
    for family in text_string_to_metric_families(reply.body.decode()):
        result.types[family.name] = family.type
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in result.samples, key
            result.samples[key] = sample.value
    return result


def scrape_until(svc: Service, check: Callable[[Scrape], bool], timeout: float = 10) -> Scrape:
    """Scrape until check(scrape) holds."""
    deadline = time.monotonic() + timeout
    while True:
        result = scrape(svc)
        if check(result):
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never matched: {result.samples}")
        time.sleep(0.02)


def test_metrics_in_prometheus_text_format(make_service: Callable[..., Service]) -> None:
    """Queue gauges per state, outcomes, latency histogram, HTTP requests, rate-limited total."""
    svc = make_service({"SYSMAIL_FORGOT_LIMIT_PER_CLIENT": "1/3600"})
    svc.smtp.sink.script_data(["550 5.7.1 rejected by policy", "451 4.3.0 try again later"])
    payload = {"template": "security-alert", "to": ADA, "vars": {"event": "x"}}

    json_reply(svc.send(payload), 202)  # refused for good: failed
    scrape_until(svc, lambda s: s.value("sysmail_queue_messages", state="failed") == 1)
    json_reply(svc.send(payload), 202)  # deferred once (~1 s), then sent
    scrape_until(svc, lambda s: s.value("sysmail_queue_messages", state="deferred") == 1
                 and s.value("sysmail_messages_total", outcome="deferred") == 1)
    wait_mails(svc.smtp, 1, to=ADA)
    assert svc.forgot("nobody@example.com").status == 202
    assert svc.forgot("nobody2@example.com").status == 429
    assert svc.call("GET", "/no/such/path").status == 404
    page = scrape_until(svc, lambda s: s.value("sysmail_delivery_latency_seconds_count") == 1
                        and s.value("sysmail_queue_messages", state="cur") == 0)

    assert page.types == {
        "sysmail_queue_messages": "gauge",
        "sysmail_queue_oldest_age_seconds": "gauge",
        "sysmail_last_send_age_seconds": "gauge",
        "sysmail_messages": "counter",
        "sysmail_enqueued": "counter",
        "sysmail_http_requests": "counter",
        "sysmail_rate_limited": "counter",
        "sysmail_unrecorded": "counter",
        "sysmail_bounces": "counter",
        "sysmail_relay_up": "gauge",
        "sysmail_relay_last_reply_age_seconds": "gauge",
        "sysmail_relay_replies": "counter",
        "sysmail_delivery_latency_seconds": "histogram",
        "sysmail_suppressed": "counter",  # issue 12: the suppression list and bounce rates
        "sysmail_suppressions": "gauge",
        "sysmail_bounces_last_24h": "gauge",
        "sysmail_sent_last_24h": "gauge",
        "sysmail_bounce_rate_24h": "gauge",
        "sysmail_complaint_rate_24h": "gauge",
    }
    assert page.value("sysmail_sent_last_24h") == 1
    assert page.value("sysmail_bounce_rate_24h") == 0
    assert {state: page.value("sysmail_queue_messages", state=state)
            for state in ("new", "deferred", "cur", "failed")} == {
        "new": 0, "deferred": 0, "cur": 0, "failed": 1}
    assert page.value("sysmail_queue_oldest_age_seconds") == 0
    assert 0 <= page.value("sysmail_last_send_age_seconds") < 10
    assert page.value("sysmail_messages_total", outcome="sent") == 1
    assert page.value("sysmail_messages_total", outcome="failed") == 1
    assert page.value("sysmail_messages_total", outcome="deferred") == 1
    assert page.value("sysmail_enqueued_total", backend="spool") == 2
    requests = "sysmail_http_requests_total"
    assert page.value(requests, route="/v1/emails", status="202") == 2
    assert page.value(requests, route="/v1/auth/forgot-password", status="202") == 1
    assert page.value(requests, route="/v1/auth/forgot-password", status="429") == 1
    assert page.value(requests, route="unmatched", status="404") == 1
    assert page.value("sysmail_rate_limited_total", limit="forgot_client") == 1

    buckets = sorted(((float(dict(labels)["le"]), value) for (name, labels), value
                      in page.samples.items() if name == "sysmail_delivery_latency_seconds_bucket"))
    assert buckets[-1] == (float("inf"), 1)
    assert [value for _, value in buckets] == sorted(value for _, value in buckets)
    assert page.value("sysmail_delivery_latency_seconds_count") == 1
    latency = page.value("sysmail_delivery_latency_seconds_sum")
    assert latency >= 0.8  # the one sent message waited out its deferral
    assert all(value == (1 if le >= latency else 0) for le, value in buckets)


def test_metrics_labels_never_carry_a_token(service: Service) -> None:
    """Request paths with tokens are counted under their route, not their raw path."""
    token = secrets.token_urlsafe(32)
    service.call("GET", f"/reset-password?token={token}")
    service.call("GET", f"/reset-password/{token}")
    text = service.ops("/metrics").body.decode()
    assert token not in text
    assert 'sysmail_http_requests_total{route="/reset-password",status="200"} 1' in text
    assert 'sysmail_http_requests_total{route="unmatched",status="404"} 1' in text


def test_requests_refused_before_routing_are_counted(service: Service) -> None:
    """A 413 and a 411 are HTTP requests with a route and a status like any other."""
    assert service.call("POST", "/v1/auth/forgot-password", b"x" * 20000, JSON_TYPE).status == 413
    head, _ = raw_exchange(service, b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: x\r\n"
                                    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 411 ")
    page = scrape(service)
    requests = "sysmail_http_requests_total"
    assert page.value(requests, route="/v1/auth/forgot-password", status="413") == 1
    assert page.value(requests, route="/v1/auth/forgot-password", status="411") == 1


# --------------------------------------------------------------------------- the race


def race(connections: list[http.client.HTTPConnection],
         send: Callable[[http.client.HTTPConnection, int], None]) -> list[Reply | Exception]:
    """Release one thread per connection at once; each sends its request and reads the reply."""
    barrier = threading.Barrier(len(connections))
    replies: list[Reply | Exception] = [RuntimeError("no reply")] * len(connections)

    def racer(index: int) -> None:
        connection = connections[index]
        try:
            barrier.wait(30)
            send(connection, index)
            response = connection.getresponse()
            replies[index] = Reply(response.status, response.headers, response.read())
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            replies[index] = exc
        finally:
            connection.close()

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(len(connections))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return replies


def reset_request(token: str) -> Callable[[http.client.HTTPConnection, int], None]:
    """A racer's request: reset with the shared token and its own password."""
    def send(connection: http.client.HTTPConnection, index: int) -> None:
        body = json.dumps({"token": token, "password": f"password number {index}"}).encode()
        connection.request("POST", "/v1/auth/reset-password", body, JSON_TYPE)
    return send


def test_fifty_concurrent_resets_with_one_token_have_one_winner(
    make_service: Callable[..., Service],
) -> None:
    """50 concurrent POST /v1/auth/reset-password with one token: one 200, 49 generic 400s.

    The 50 connections are opened (and accepted) first, so the 50 requests race inside the
    server, at the token store, not at the listen backlog.
    """
    svc = make_service({"SYSMAIL_RESET_LIMIT_PER_CLIENT": "1000/60"})
    ada = svc.store.add_user(ADA)
    _, token = svc.token_for(ADA)
    host, port = urllib.parse.urlsplit(svc.url).netloc.split(":")
    connections = []
    for _ in range(50):
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.connect()
        connections.append(connection)
        time.sleep(0.01)  # accepted one by one: the race is at the store, not at accept()
    replies = race(connections, reset_request(token))

    assert [r for r in replies if isinstance(r, Exception)] == []
    statuses = sorted(r.status for r in replies)
    assert statuses == [200] + [400] * 49
    [winner] = [i for i, r in enumerate(replies) if r.status == 200]
    assert json_reply(replies[winner], 200) == {"status": "password changed"}
    for reply in replies:
        if reply.status == 400:
            assert json_reply(reply, 400) == GENERIC_TOKEN_ERROR
    stored = svc.store.password_hash(ada)
    assert sysmail.verify_password(f"password number {winner}", stored)
    assert not sysmail.verify_password(f"password number {(winner + 1) % 50}", stored)
    assert [client for _, _, client in svc.store.audit_entries(ada)] == ["127.0.0.1"]
    wait_mails(svc.smtp, 1, to=ADA, subject=ALERT_SUBJECT)
    assert [m["Subject"] for m in settled_mails(svc)] == [RESET_SUBJECT, ALERT_SUBJECT]


def test_fifty_clients_connecting_at_once_are_all_answered(
    make_service: Callable[..., Service],
) -> None:
    """50 clients that connect and send at the same moment all get their answer (the listen
    backlog holds them: socketserver's default of 5 made about half of them get reset)."""
    svc = make_service({"SYSMAIL_RESET_LIMIT_PER_CLIENT": "1000/60"})
    host, port = urllib.parse.urlsplit(svc.url).netloc.split(":")
    connections = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(50)]
    def send(connection: http.client.HTTPConnection, index: int) -> None:
        body = json.dumps({"token": secrets.token_urlsafe(32), "password": "short"}).encode()
        connection.request("POST", "/v1/auth/reset-password", body, JSON_TYPE)

    replies = race(connections, send)
    assert [repr(r) for r in replies if isinstance(r, Exception)] == []
    assert sorted(r.status for r in replies) == [400] * 50
    assert {r.body for r in replies} == {
        b'{"error":"the password must be 8 to 1024 characters long"}'}


# --------------------------------------------------------------------------- `sysmail serve`


@dataclass
class ServeProcess:
    """A `python sysmail.py serve` subprocess whose stderr (the JSON log) goes to a file."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        """Everything logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 5, signum: signal.Signals = signal.SIGTERM) -> int:
        """Signal it, then the exit status (AssertionError when it takes longer than timeout)."""
        self.process.send_signal(signum)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"serve did not exit within {timeout}s of SIGTERM") from None


@pytest.fixture
def serve_process(smtp_server: SmtpServer, tmp_path: Path
                  ) -> Iterator[Callable[..., ServeProcess]]:
    """Factory starting `sysmail serve` on a free port; leftovers are killed at teardown."""
    started: list[subprocess.Popen[bytes]] = []

    def start(extra: Mapping[str, str] | None = None) -> ServeProcess:
        for _attempt in range(3):
            port = free_port()
            env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1",
                   **base_env(smtp_server, tmp_path), "SYSMAIL_LISTEN": f"127.0.0.1:{port}",
                   **(extra or {})}
            log_path = tmp_path / f"serve-{len(started)}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen([sys.executable, str(REPO / "sysmail.py"), "serve"],
                                           env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                           stdout=subprocess.DEVNULL, stderr=log)
            started.append(process)
            url = f"http://127.0.0.1:{port}"
            if _wait_healthy(process, url):
                return ServeProcess(process, url, log_path)
        raise AssertionError(f"serve did not start: {log_path.read_text(errors='replace')}")

    try:
        yield start
    finally:
        for process in started:
            if process.poll() is None:
                process.kill()
                process.wait()


def _wait_healthy(process: subprocess.Popen[bytes], url: str, timeout: float = 15) -> bool:
    """True once GET /healthz answers 200; False if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_call(url, "GET", "/healthz", timeout=2).status == 200:
                return True
        time.sleep(0.05)
    process.kill()
    return False


def test_tokens_never_reach_the_log(serve_process: Callable[..., ServeProcess],
                                    smtp_server: SmtpServer, tmp_path: Path) -> None:
    """Through the whole flow, page views included, the log holds neither token nor reset URL."""
    added = run_cli(["user", "add", ADA, "--name", "Ada"],
                    {"SYSMAIL_DB": str(tmp_path / "sysmail.db")}, input="", cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    server = serve_process()
    assert http_call(server.url, "POST", "/v1/auth/forgot-password", {"email": ADA}).status == 202
    [message] = wait_mails(smtp_server, 1, to=ADA, subject=RESET_SUBJECT)
    link, token = reset_link(message)
    assert link.startswith(f"{server.url}/reset-password?token=")
    path = link.removeprefix(server.url)
    for _ in range(3):
        assert http_call(server.url, "GET", path).status == 200
    assert http_call(server.url, "GET", f"/reset-password/{token}").status == 404
    assert http_call(server.url, "PUT", path).status == 405
    form = urllib.parse.urlencode({"token": token, "password": "a", "confirm": "b"})
    assert http_call(server.url, "POST", "/reset-password", form, FORM_TYPE).status == 400
    reset = {"token": token, "password": PASSWORD}
    assert http_call(server.url, "POST", "/v1/auth/reset-password", reset).status == 200
    assert http_call(server.url, "POST", "/v1/auth/reset-password", reset).status == 400
    wait_mails(smtp_server, 1, to=ADA, subject=ALERT_SUBJECT)
    assert server.stop() == 0

    log = server.log()
    assert token not in log
    assert "reset-password?token" not in log
    assert "token=" not in log
    events = [json.loads(line) for line in log.splitlines()]
    http_routes = [(e["method"], e["route"], e["status"]) for e in events if e["event"] == "http"]
    assert http_routes.count(("GET", "/reset-password", 200)) == 3
    assert ("GET", "unmatched", 404) in http_routes
    assert ("POST", "/v1/auth/reset-password", 200) in http_routes
    changed = [e for e in events if e["event"] == "password_changed"]
    assert [(e["user"], e["client"]) for e in changed] == [("1", "127.0.0.1")]
    assert {"listening", "sent", "stopping"} <= {e["event"] for e in events}


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_while_idle_exits_0(serve_process: Callable[..., ServeProcess],
                                   signum: signal.Signals) -> None:
    """An idle `serve` exits 0 within 5 s of SIGTERM or SIGINT, logging that it stops."""
    server = serve_process()
    started = time.monotonic()
    assert server.stop(timeout=5, signum=signum) == 0
    assert time.monotonic() - started < 5
    assert '"event": "stopping"' in server.log()
    with pytest.raises(OSError):
        http_call(server.url, "GET", "/healthz", timeout=2)


def test_sigterm_lets_a_request_in_flight_finish(
    serve_process: Callable[..., ServeProcess],
) -> None:
    """SIGTERM mid-request: no new connections, the request in flight is answered, then exit 0."""
    server = serve_process()
    host, port = urllib.parse.urlsplit(server.url).netloc.split(":")
    body = json.dumps({"email": "nobody@example.com"}).encode()
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(b"POST /v1/auth/forgot-password HTTP/1.1\r\nHost: sysmail\r\n"
                     b"Content-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body[:10])
        wait_server_read(sock)  # the server has accepted the connection and waits for the body
        server.process.send_signal(signal.SIGTERM)
        _wait_refused(host, int(port))
        assert server.process.poll() is None  # still finishing the request
        sock.sendall(body[10:])
        answer = read_until_closed(sock)
    finally:
        sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 202 ")
    assert json.loads(payload)["status"] == "accepted"
    assert server.process.wait(5) == 0


def _wait_refused(host: str, port: int, timeout: float = 5) -> None:
    """Wait until the listening socket is closed (connections are refused)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            probe = socket.create_connection((host, port), timeout=1)
        except ConnectionRefusedError:
            return
        probe.close()
        time.sleep(0.05)
    raise AssertionError("the server still accepts connections after SIGTERM")
