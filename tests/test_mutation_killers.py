"""Tests that kill the mutants mutation testing found surviving in the critical sections (issue 15).

Each test names what it pins down; tools/mutation-report.md lists which mutant each one kills.
They talk to real parts only: real files and SQLite databases in tmp_path, the Redis server
fixture, real processes; no mocks and no patching.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import hashlib
import http.client
import json
import logging
import os
import secrets
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest
import redis
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import (
    Ed25519Key,
    FakeClock,
    RedisServer,
    RsaKey,
    SmtpServer,
    SmtpSink,
    dkim_dns,
    free_port,
)

import sysmail

DOMAIN = "example.com"
RELAXED = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


# --------------------------------------------------------------------------- DKIM signing


def _dkimpy_relaxed(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    headers, body = dkim.rfc822_parse(message)
    return ([tuple(h) for h in RELAXED.canonicalize_headers(headers)],
            RELAXED.canonicalize_body(body))


@pytest.mark.parametrize("message", [
    # CRLF separator, but a bare LF inside a header: dkimpy's parser, not the fast path
    b"From: a@example.com\r\nSubject: one\nTwo: x\r\n\r\nbody\r\n",
    # CRLF throughout but no blank line: headers only
    b"From: a@example.com\r\nSubject: no body\r\n",
    # a bare LF in the body only
    b"From: a@example.com\r\nSubject: s\r\n\r\nline one\nline two\r\n",
    # a body ending in X, before the trailing blank lines
    b"From: a@example.com\r\nSubject: s\r\n\r\nends with XX\r\n\r\n\r\n",
    b"From: a@example.com\r\nSubject: s\r\n\r\nX\r\n",
])
def test_relaxed_matches_dkimpy_on_mixed_line_ends_and_mbox_lines(message: bytes) -> None:
    """The fast path is taken only where it gives dkimpy's result byte for byte."""
    fields, body = sysmail._relaxed(message, RELAXED)
    assert ([tuple(f) for f in fields], body) == _dkimpy_relaxed(message)


def test_relaxed_skips_an_mbox_from_line_like_dkimpy() -> None:
    """dkimpy skips a "From " line among the headers; the fast path raises on it instead."""
    message = b"From: a@example.com\r\nFrom someone@example.com\r\nSubject: s\r\n\r\nbody\r\n"
    fields, body = sysmail._relaxed(message, RELAXED)
    assert ([tuple(f) for f in fields], body) == _dkimpy_relaxed(message)


def test_relaxed_names_the_bad_header_line() -> None:
    """A header line that is no field says which line, cut at 60 bytes."""
    bad = b"no colon here " + b"y" * 70
    message = b"From: a@example.com\r\n" + bad + b"\r\n\r\nbody\r\n"
    with pytest.raises(dkim.MessageFormatError) as caught:
        sysmail._relaxed(message, RELAXED)
    assert str(caught.value) == f"unexpected characters in a header line: {bad[:60]!r}"


def test_a_message_with_bare_line_feeds_is_signed_like_dkimpy(rsa_key: RsaKey) -> None:
    """sign() hands dkimpy's canonicalization the relaxed policy for non-CRLF messages too."""
    message = b"From: a@example.com\nTo: b@example.com\nSubject: bare\n\nhello  world \n"
    signer = sysmail.DkimSigner(DOMAIN, ("default", rsa_key.pem.encode()))
    signed = signer.sign(message)
    dns = dkim_dns({"default._domainkey.example.com.": rsa_key.dns_record})
    assert dkim.verify(signed, dnsfunc=dns)


def test_signer_from_a_config_with_only_an_ed25519_key(ed25519_key: Ed25519Key) -> None:
    """No RSA key configured: one ed25519 signature, for the From address's domain."""
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SYSTEM_FROM": "no-reply@mail.example.com",
        "SYSTEM_DKIM_ED25519_PRIVATE_KEY": ed25519_key.seed_b64,
        "SYSTEM_DKIM_ED25519_SELECTOR": "ed"})
    signer = sysmail.DkimSigner.from_config(config)
    assert signer is not None
    message = b"From: no-reply@mail.example.com\r\nTo: b@example.com\r\nSubject: s\r\n\r\nhi\r\n"
    signed = signer.sign(message)
    assert signed.count(b"DKIM-Signature:") == 1
    dns = dkim_dns({"ed._domainkey.mail.example.com.": ed25519_key.dns_record})
    assert dkim.verify(signed, dnsfunc=dns)


# --------------------------------------------------------------------------- token store


def test_token_hash_of_a_lone_surrogate_replaces_it() -> None:
    """A token that is not valid UTF-8 text is hashed with '?' for the bad code point."""
    assert sysmail.token_hash("ab\udcffcd") == hashlib.sha256(b"ab?cd").digest()


def test_memory_store_add_user_keeps_name_and_password_and_counts_ids_from_one() -> None:
    """MemoryStore.add_user: ids 1, 2, ... like SQLite's; the name; a password as a hash."""
    store = sysmail.MemoryStore()
    ada = store.add_user("ada@example.com", password="correct horse")
    bob = store.add_user("bob@example.com", "Bob")
    assert (ada.id, ada.name, bob.id, bob.name) == ("1", "", "2", "Bob")
    assert sysmail.verify_password("correct horse", store.passwords[ada.id])
    assert bob.id not in store.passwords


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_both_stores_keep_a_users_language_and_refuse_a_malformed_one(
        kind: str, tmp_path: Path) -> None:
    """The locale given to add_user is on the User returned and on the one found later (the
    reset mail's language); "english!" is no language tag."""
    store = sysmail.MemoryStore() if kind == "memory" else sysmail.SqliteStore(tmp_path / "s.db")
    assert store.add_user("ada@example.com", locale="de").locale == "de"
    assert store.find_user("ada@example.com").locale == "de"
    assert store.add_user("bob@example.com").locale == ""
    with pytest.raises(sysmail.MessageError, match="language tag"):
        store.add_user("eve@example.com", locale="english!")
    assert store.find_user("eve@example.com") is None


def test_memory_store_keeps_when_a_token_was_made() -> None:
    """save_token records the creation time next to the expiry."""
    store = sysmail.MemoryStore()
    ada = store.add_user("ada@example.com")
    store.save_token(b"h" * 32, ada, sysmail.RESET_PURPOSE, 100.0, 200.0)
    assert store.tokens[b"h" * 32] == {"user": ada, "purpose": sysmail.RESET_PURPOSE,
                                       "created_at": 100.0, "expires_at": 200.0,
                                       "used_at": None}


def test_sqlite_add_user_hashes_the_password_and_lists_users(tmp_path: Path) -> None:
    """add_user with a password stores its scrypt hash; users() shows every column."""
    store = sysmail.SqliteStore(tmp_path / "s.db", clock=lambda: 1234.5)
    ada = store.add_user("ada@example.com", password="correct horse")
    bob = store.add_user("bob@example.com", "Bob")
    assert (ada.name, bob.name) == ("", "Bob")
    assert sysmail.verify_password("correct horse", store.password_hash(ada))
    assert store.password_hash(bob) is None
    assert store.users() == [
        {"id": ada.id, "email": "ada@example.com", "name": "", "has_password": True,
         "created_at": 1234.5, "locale": ""},
        {"id": bob.id, "email": "bob@example.com", "name": "Bob", "has_password": False,
         "created_at": 1234.5, "locale": ""}]
    assert repr(store) == f"SqliteStore({str(tmp_path / 's.db')!r})"


def test_sqlite_unknown_user_has_no_password_hash(tmp_path: Path) -> None:
    """password_hash of a user id the file does not hold is None."""
    store = sysmail.SqliteStore(tmp_path / "s.db")
    assert store.password_hash(sysmail.User("99", "nobody@example.com", "")) is None


def test_sqlite_token_of_a_deleted_user_gives_no_user(tmp_path: Path) -> None:
    """A token whose user row was removed (by hand, in the file) is consumed but names nobody."""
    store = sysmail.SqliteStore(tmp_path / "s.db")
    ada = store.add_user("ada@example.com")
    store.save_token(b"t" * 32, ada, sysmail.RESET_PURPOSE, 0.0, 100.0)
    with contextlib.closing(sqlite3.connect(tmp_path / "s.db")) as db:
        db.execute("DELETE FROM users")
        db.commit()
    assert store.consume_token(b"t" * 32, sysmail.RESET_PURPOSE, 1.0) is None


def test_sqlite_busy_store_gives_up_after_its_own_timeout(tmp_path: Path) -> None:
    """A held write lock is waited for SQLITE_BUSY_TIMEOUT_SECONDS, not SQLite's default 5 s."""
    path = tmp_path / "s.db"
    store = sysmail.SqliteStore(path)
    store.ping()
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as holder:
        holder.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(sysmail.StoreError):
            store.add_user("ada@example.com")
        waited = time.monotonic() - started
        holder.execute("ROLLBACK")
    assert sysmail.SQLITE_BUSY_TIMEOUT_SECONDS - 0.2 <= waited < sysmail.SQLITE_BUSY_TIMEOUT_SECONDS + 1.5


# --------------------------------------------------------------------------- HTTP auth

API_KEY = "k" * 24 + "-mutation-key"


def _api(tmp_path: Path) -> sysmail.Api:
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_API_KEY": API_KEY,
        "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSMAIL_DB": str(tmp_path / "s.db")})
    return sysmail.build_app(config, sysmail.MemoryStore()).api


def _send(api: sysmail.Api, authorization: str) -> sysmail.Response:
    headers = http.client.HTTPMessage()  # what the HTTP handler hands the API
    headers["Content-Type"] = "application/json"
    headers["Authorization"] = authorization
    body = json.dumps({"template": "security-alert", "to": "ada@example.com",
                       "vars": {"event": "x"}}).encode()
    return api.handle(sysmail.Request("POST", "/v1/emails", {}, headers, body, "127.0.0.1"))


def test_bearer_token_after_more_than_one_space_is_accepted(tmp_path: Path) -> None:
    """The scheme ends at the first space; blanks around the token do not matter."""
    api = _api(tmp_path)
    assert _send(api, f"Bearer  {API_KEY}").status == 202
    assert _send(api, f"Bearer {API_KEY}  ").status == 202
    assert _send(api, f"Bearer  {API_KEY}x").status == 401


# --------------------------------------------------------------------------- idempotency


class Clock:
    """A clock the test sets."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC


def _key_file(folder: Path, key: str) -> Path:
    return folder / hashlib.sha256(key.encode()).hexdigest()


def test_idempotency_key_file_is_private(tmp_path: Path) -> None:
    """The key file holding a message id is readable by the service user only."""
    keys = sysmail.IdempotencyKeys(tmp_path / "keys", Clock(T0))
    assert keys.remember("k", lambda: "<id-1>") == ("<id-1>", True)
    assert _key_file(tmp_path / "keys", "k").stat().st_mode & 0o777 == 0o600


def test_idempotency_key_expired_between_prunes_makes_a_new_message(tmp_path: Path) -> None:
    """A key older than 24 h that the hourly prune has not removed yet counts as new."""
    clock = Clock(T0)
    keys = sysmail.IdempotencyKeys(tmp_path / "keys", clock)
    assert keys.remember("k", lambda: "<old>") == ("<old>", True)  # prunes at T0
    stale = T0 - sysmail.IDEMPOTENCY_SECONDS - 1
    os.utime(_key_file(tmp_path / "keys", "k"), (stale, stale))
    clock.now = T0 + 1  # no prune within the hour
    assert keys.remember("k", lambda: "<new>") == ("<new>", True)
    assert keys.remember("k", lambda: "<newer>") == ("<new>", False)


def test_idempotency_key_exactly_24_hours_old_still_counts(tmp_path: Path) -> None:
    """Expiry is strictly older than 24 h, in the lookup and in the prune."""
    clock = Clock(T0)
    folder = tmp_path / "keys"
    keys = sysmail.IdempotencyKeys(folder, clock)
    keys.remember("a", lambda: "<a>")  # prunes at T0
    clock.now = T0 + 10
    edge = clock.now - sysmail.IDEMPOTENCY_SECONDS
    os.utime(_key_file(folder, "a"), (edge, edge))
    assert keys.remember("a", lambda: "<again>") == ("<a>", False)
    clock.now = T0 + 3600  # the next prune is due exactly now
    edge = clock.now - sysmail.IDEMPOTENCY_SECONDS
    os.utime(_key_file(folder, "a"), (edge, edge))
    old = _key_file(folder, "gone")
    old.write_text("<gone>")
    os.utime(old, (edge - 1, edge - 1))
    keys.remember("b", lambda: "<b>")
    assert _key_file(folder, "a").exists()
    assert not old.exists()


def test_idempotency_key_whose_first_request_failed_is_taken_by_the_waiting_one(
        tmp_path: Path) -> None:
    """A second request waiting for the first one's id takes the key over when the first
    one fails and gives the key up."""
    keys = sysmail.IdempotencyKeys(tmp_path / "keys", Clock(T0))
    entered, fail = threading.Event(), threading.Event()

    def failing_id() -> str:
        entered.set()
        fail.wait(10)
        raise RuntimeError("enqueue failed")

    def first() -> None:
        with contextlib.suppress(RuntimeError):
            keys.remember("k", failing_id)

    thread = threading.Thread(target=first)
    thread.start()
    assert entered.wait(10)
    threading.Timer(0.2, fail.set).start()
    assert keys.remember("k", lambda: "<second>") == ("<second>", True)
    thread.join(10)


def test_idempotency_key_still_in_progress_is_a_409_after_about_a_second(
        tmp_path: Path) -> None:
    """A first request that never finishes: the second gets 409 after ~1 s of polling."""
    keys = sysmail.IdempotencyKeys(tmp_path / "keys", Clock(T0))
    entered, done = threading.Event(), threading.Event()

    def slow_id() -> str:
        entered.set()
        done.wait(30)
        return "<slow>"

    thread = threading.Thread(target=keys.remember, args=("k", slow_id))
    thread.start()
    try:
        assert entered.wait(10)
        started = time.monotonic()
        with pytest.raises(sysmail.HttpError) as caught:
            keys.remember("k", lambda: "<second>")
        assert time.monotonic() - started < 5
        assert caught.value.status == 409
        assert str(caught.value) == "a request with this Idempotency-Key is still in progress"
    finally:
        done.set()
        thread.join(10)


def test_idempotency_key_taken_exactly_the_taken_time_ago_is_still_in_progress(
        tmp_path: Path) -> None:
    """An empty key (a first request still writing) counts as abandoned only once it is
    strictly older than IDEMPOTENCY_TAKEN_SECONDS: at exactly that age it is a 409."""
    folder = tmp_path / "keys"
    keys = sysmail.IdempotencyKeys(folder, Clock(T0))
    keys.remember("other", lambda: "<other>")  # makes the folder and prunes at T0
    taken = _key_file(folder, "k")
    taken.touch()
    edge = T0 - sysmail.IDEMPOTENCY_TAKEN_SECONDS
    os.utime(taken, (edge, edge))
    with pytest.raises(sysmail.HttpError) as caught:
        keys.remember("k", lambda: "<second>")
    assert caught.value.status == 409
    os.utime(taken, (edge - 1, edge - 1))
    assert keys.remember("k", lambda: "<second>") == ("<second>", True)


def test_idempotency_key_the_full_disk_cannot_bind_is_released_not_wedged(
        small_mount: Callable[[str], Path], caplog: pytest.LogCaptureFixture) -> None:
    """The message is queued but its id cannot be written into the key (ENOSPC): the key is
    released with a warning naming the message, so a retry of the request is not refused
    with 409 for a key that holds nothing."""
    caplog.set_level(logging.INFO, logger="sysmail")
    disk = small_mount("size=64k")
    folder = disk / "keys"
    keys = sysmail.IdempotencyKeys(folder, Clock(T0))
    keys.remember("warm", lambda: "<warm>")
    filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    for size in (4096, 1):  # to the last byte
        with contextlib.suppress(OSError):
            while True:
                os.write(filler, b"\0" * size)
    os.close(filler)
    assert keys.remember("k", lambda: "<first>") == ("<first>", True)
    assert not _key_file(folder, "k").exists()
    released = [r for r in caplog.records if r.getMessage() == "idempotency_key_released"]
    assert [(r.levelno, r.fields) for r in released] == [
        (logging.WARNING, {"messageId": "<first>"})]
    (disk / "filler").unlink()
    assert keys.remember("k", lambda: "<retry>") == ("<retry>", True)


# --------------------------------------------------------------------------- rate limits


def test_rate_limit_window_of_a_new_key_starts_at_the_window_boundary() -> None:
    """A first hit at 0.5 s opens the window [0, 10): the next is refused for 9.5 s."""
    limiter = sysmail.RateLimiter(Clock(0.5))
    assert limiter.hit("k", 1, 10.0) is None
    assert limiter.hit("k", 1, 10.0) == pytest.approx(9.5)


def test_rate_limit_retry_after_below_a_second_is_exact() -> None:
    """Half a second before the window ends, retry after half a second."""
    clock = Clock(1.0)
    limiter = sysmail.RateLimiter(clock)
    assert limiter.hit("k", 1, 10.0) is None
    clock.now = 9.5
    assert limiter.hit("k", 1, 10.0) == pytest.approx(0.5)


def test_rate_limit_eviction_keeps_the_latest_ending_windows() -> None:
    """Full of live windows, the limiter drops the half that ends first, by end time."""
    clock = Clock(0.0)
    limiter = sysmail.RateLimiter(clock, max_keys=2)
    assert limiter.hit("z", 5, 10.0) is None  # ends at 10, two hits
    assert limiter.hit("z", 5, 10.0) is None
    assert limiter.hit("a", 1, 20.0) is None  # ends at 20, one hit
    clock.now = 1.0
    assert limiter.hit("m", 1, 30.0) is None  # full: "z" goes, "a" stays
    assert limiter.hit("a", 1, 20.0) == pytest.approx(19.0)
    assert limiter.hit("z", 1, 10.0) is None


def test_rate_limit_eviction_keeps_live_windows_when_one_just_ended() -> None:
    """A window that ends right now is expired: it goes, and the live ones all stay."""
    clock = Clock(0.0)
    limiter = sysmail.RateLimiter(clock, max_keys=4)
    limiter.hit("a", 1, 10.0)
    for key in ("b", "c", "d"):
        limiter.hit(key, 1, 20.0)
    clock.now = 10.0
    assert limiter.hit("e", 1, 20.0) is None
    for key in ("b", "c", "d"):
        assert limiter.hit(key, 1, 20.0) == pytest.approx(10.0)


def test_redis_rate_limiter_counts_locally_while_redis_is_unreachable() -> None:
    """Nothing listens on the Redis port: the in-memory fallback counts, the one given or its own."""
    port = free_port()
    own = sysmail.RedisRateLimiter(f"redis://127.0.0.1:{port}/0")
    assert own.hit("k", 1, 60.0) is None
    assert own.hit("k", 1, 60.0) is not None
    local = sysmail.RateLimiter()
    shared = sysmail.RedisRateLimiter(f"redis://127.0.0.1:{port}/0", local)
    assert shared.hit("j", 1, 60.0) is None
    assert local.hit("j", 1, 60.0) is not None


def test_redis_rate_limiter_gives_up_on_a_redis_that_never_answers() -> None:
    """A server that accepts but never replies: the hit falls back after the socket timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        limiter = sysmail.RedisRateLimiter(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        assert limiter.hit("k", 1, 60.0) is None
        # its own 2 s, not redis-py's default 5 s read timeout
        assert time.monotonic() - started < sysmail.REDIS_TIMEOUT_SECONDS + 1.5


def test_redis_rate_limiter_retry_after_is_the_ttl(redis_server: RedisServer) -> None:
    """Refused hits wait the key's remaining TTL; a counter without TTL, the 1 ms minimum."""
    limiter = sysmail.RedisRateLimiter(redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    key = f"mutation-{secrets.token_hex(4)}"
    assert limiter.hit(key, 1, 60.0) is None
    retry = limiter.hit(key, 1, 60.0)
    ttl = client.pttl(f"{sysmail.REDIS_PREFIX}rate:{key}")
    assert ttl / 1000 <= retry <= ttl / 1000 + 0.05
    client.set(f"{sysmail.REDIS_PREFIX}rate:{key}-forever", 5)
    assert limiter.hit(f"{key}-forever", 1, 60.0) == 0.001


# --------------------------------------------------------------------------- settle and retry

RESET_URL = "https://dashboard.example.com/reset?token=tok-1234567890"


@dataclasses.dataclass
class Rig:
    """A Mailer and a Sender on one spool and one fake clock, against the aiosmtpd sink."""

    clock: FakeClock
    mailer: sysmail.Mailer
    sender: sysmail.Sender
    server: SmtpServer


def _unsigned_mailer(server: SmtpServer, tmp_path: Path, clock: FakeClock) -> sysmail.Mailer:
    return sysmail.Mailer(sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_ALLOW_UNSIGNED": "1", "SMTP_URL": server.url,
        "SYSMAIL_SPOOL": str(tmp_path / "spool")}), clock=clock)


@contextlib.contextmanager
def relay_with(sink: SmtpSink) -> Iterator[SmtpServer]:
    """A relay on loopback answering through sink (a scripted SmtpSink subclass)."""
    server = SmtpServer("smtp+plain")
    server.sink = sink
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def rig(smtp_server: SmtpServer, tmp_path: Path) -> Iterator[Rig]:
    """An unsigned sender (rand() = 0.5: no jitter) with its own Metrics, logs at INFO."""
    clock = FakeClock()
    mailer = _unsigned_mailer(smtp_server, tmp_path, clock)
    sender = sysmail.Sender(mailer.spool, sysmail.transport_from_config(mailer.config), None,
                            clock=clock, rand=lambda: 0.5, metrics=sysmail.Metrics(),
                            retry=sysmail.RetryPolicy(schedule=(1.0, 100.0)))
    yield Rig(clock, mailer, sender, smtp_server)
    sender.transport.close()


def _events(caplog: pytest.LogCaptureFixture, event: str) -> list[dict]:
    return [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == event]


def _spool_id(rig: Rig, state: str = "new") -> str:
    (entry,) = os.listdir(rig.mailer.spool.root / state)
    return entry.split(".")[3]


def test_classify_reply_at_every_boundary() -> None:
    """2xx ok; 421 and below 200 unavailable; 5xx permanent; anything else temporary."""
    expected = {199: "unavailable", 200: "ok", 250: "ok", 299: "ok", 300: "temporary",
                420: "temporary", 421: "unavailable", 422: "temporary", 451: "temporary",
                499: "temporary", 500: "permanent", 501: "permanent", 550: "permanent",
                599: "permanent", 600: "temporary", 0: "unavailable"}
    assert {code: sysmail.classify_reply(code) for code in expected} == expected


def _relay_waits(failures: int, rand: float) -> float:
    backoff = sysmail._RelayBackoff(FakeClock(T_QUEUE), lambda: rand)
    for _ in range(failures):
        backoff.down(sysmail.RelayUnavailable("down"))
    return backoff.seconds_left()


def test_relay_delay_doubles_from_the_base_up_to_the_cap_with_jitter() -> None:
    """1, 2, 4 ... 60 s after 1, 2, 3 ... failures; jitter +-20 % around it."""
    assert [_relay_waits(n, 0.5) for n in (1, 2, 3, 6, 7, 20)] == [1, 2, 4, 32, 60, 60]
    assert _relay_waits(1, 0.0) == pytest.approx(0.8)
    assert _relay_waits(1, 1.0) == pytest.approx(1.2)
    assert _relay_waits(3, 0.25) == pytest.approx(3.6)


def test_a_deferral_is_logged_with_its_reason_and_counted(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """451: the deferred event names the message, the next try and the relay's reply."""
    caplog.set_level(logging.INFO, logger="sysmail")
    rig.server.sink.script_data(["451 4.3.0 try later"])
    message_id = rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    ident = _spool_id(rig)
    assert rig.sender.run_once() == sysmail.DeliveryCounts(deferred=1)
    [fields] = _events(caplog, "deferred")
    assert fields == {"rfcMessageId": message_id, "id": ident, "to": ["ada@example.org"],
                      "attempt": 1, "next_try": sysmail._iso_time(rig.clock() + 1.0),
                      "code": 451, "reason": "451 4.3.0 try later"}
    assert 'sysmail_messages_total{outcome="deferred"} 1' in rig.sender.metrics.render({})
    assert _events(caplog, "failed") == []


def test_a_message_out_of_time_is_logged_counted_and_keeps_the_reply(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The last 451 before the deliver-by time (the next try, 100 s on, would come after a
    one-minute alert's): a dead letter with the reply, a warning, a count."""
    caplog.set_level(logging.INFO, logger="sysmail")
    rig.server.sink.script_data(["451 4.3.0 try later", "451 4.3.0 still later"])
    message_id = rig.mailer.enqueue_message("ada@example.org", "Alert", "Text.",
                                            ttl_seconds=60)
    ident = _spool_id(rig)
    rig.sender.run_once()
    rig.clock.advance(5)
    assert rig.sender.run_once() == sysmail.DeliveryCounts(expired=1)
    [letter] = rig.mailer.spool.failed()
    assert (letter["reason"], letter["code"]) == ("expired", 451)
    assert "still later" in letter["reply"]
    [fields] = _events(caplog, "expired")
    assert fields["id"] == ident
    assert (fields["reason"], fields["code"], fields["rfcMessageId"], fields["attempts"]) == (
        "expired", 451, message_id, 2)
    assert "still later" in fields["reply"]
    assert 'sysmail_messages_total{outcome="expired"} 1' in rig.sender.metrics.render({})


def test_a_sent_message_is_logged_counted_timed_and_stamped(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """250: the sent event, the outcome counter, its latency and the spool's last-sent stamp
    (touched at most once a second of the sender's clock, and again a second later)."""
    caplog.set_level(logging.INFO, logger="sysmail")
    message_id = rig.mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_URL)
    ident = _spool_id(rig)
    rig.clock.advance(0.12345)
    assert rig.mailer.spool.last_sent() is None
    assert rig.sender.run_once() == sysmail.DeliveryCounts(sent=1)
    assert rig.mailer.spool.last_sent() is not None
    [fields] = _events(caplog, "sent")
    assert {k: fields[k] for k in ("rfcMessageId", "id", "to", "template", "code")} == {
        "rfcMessageId": message_id, "id": ident, "to": ["ada@example.org"],
        "template": "password-reset", "code": 250}
    assert fields["latency_ms"] == round(0.12345 * 1000, 1)
    assert isinstance(fields["reply"], str) and fields["reply"]
    assert 0 < fields["duration_ms"] < 60_000
    assert fields["duration_ms"] == round(fields["duration_ms"], 1)
    [record] = [r for r in caplog.records if r.getMessage() == "sent"]
    assert record.levelno == logging.INFO
    page = rig.sender.metrics.render({})
    assert 'sysmail_messages_total{outcome="sent"} 1' in page
    assert "sysmail_delivery_latency_seconds_sum 0.123450" in page
    stamp = rig.mailer.spool.root / "last-sent"
    os.utime(stamp, (0, 0))
    rig.clock.advance(0.5)
    rig.mailer.enqueue_message("ada@example.org", "Hello", "ad hoc text")
    rig.sender.run_once()
    assert rig.mailer.spool.last_sent() == 0  # within the second: not touched
    assert _events(caplog, "sent")[1]["template"] == "ad-hoc"
    rig.clock.advance(0.5)  # exactly a second after the first touch
    rig.mailer.enqueue_message("ada@example.org", "Hello", "ad hoc text")
    rig.sender.run_once()
    assert rig.mailer.spool.last_sent() > 0


def test_a_claim_the_queue_could_not_take_back_is_released_later(
        redis_server: RedisServer, tmp_path: Path) -> None:
    """Redis not answering at release: the settler keeps the claim and puts it back later."""
    queue, clock = _redis_queue(redis_server)
    ident = queue.enqueue(_header(), b"body", 1)
    [claim], _ = queue.claim(1)
    spool = sysmail.Spool(tmp_path / "spool", clock=clock)
    settler = sysmail._Settler(spool, sysmail.Metrics(), clock, sysmail.RetryPolicy(),
                               lambda: 0.5)
    counts = sysmail.DeliveryCounts()
    client = redis.Redis.from_url(redis_server.url)
    paused = time.monotonic()
    client.execute_command("CLIENT", "PAUSE", 4600, "ALL")  # answers nothing for 4.6 s
    settler.release(claim, counts)  # times out after 2 s: kept
    assert counts == sysmail.DeliveryCounts(released=1)
    settler.release_leftovers()  # still paused: kept again
    time.sleep(max(0.0, paused + 4.8 - time.monotonic()))
    settler.release_leftovers()
    assert _ids(queue.claim(1)[0]) == [ident]


def test_unreadable_and_just_expired_mail_is_failed_with_its_reason(rig: Rig) -> None:
    """A garbage spool entry fails 'unreadable' with the error; a message whose deliver-by
    time is exactly now has expired."""
    rig.mailer.enqueue_message("ada@example.org", "Hi", "text", ttl_seconds=60)
    body = b"junk\n"  # authenticated under the spool's key, but not an entry
    mac = sysmail._entry_mac(rig.mailer.spool._mac_key, body)
    (rig.mailer.spool.root / "new" / "1.00000000000000.0.garbage").write_bytes(
        sysmail.SPOOL_FORMAT + mac + b" " + body)
    rig.clock.advance(60)
    assert rig.sender.run_once() == sysmail.DeliveryCounts(failed=1, expired=1)
    letters = {letter["reason"]: letter for letter in rig.mailer.spool.failed()}
    assert letters["unreadable"]["error"] == "queue entry garbage is unreadable"
    assert set(letters) == {"unreadable", "expired"}
    assert rig.server.messages == []


def test_a_per_recipient_dead_letter_is_retried_to_that_recipient_only(rig: Rig) -> None:
    """The dead letter of one refused recipient holds that recipient alone: a retry sends to
    them, not once more to the one already served."""
    rig.server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user"})
    rig.mailer.enqueue("security-alert", to=["good@example.org", "bad@example.org"],
                       event="a new sign-in")  # no link in it: its dead letter can be retried
    assert rig.sender.run_once() == sysmail.DeliveryCounts(sent=1, failed=1)
    rig.server.sink.refuse_rcpt({})
    assert len(rig.mailer.spool.retry()) == 1
    assert rig.sender.run_once() == sysmail.DeliveryCounts(sent=1)
    assert [m.rcpt_tos for m in rig.server.messages] == [["good@example.org"],
                                                         ["bad@example.org"]]


def test_a_secret_carrying_dead_letter_is_redacted_and_names_only_the_refused(rig: Rig) -> None:
    """A two-factor code to two people, one refused for good: the dead letter keeps the
    refused address alone, and not the code."""
    rig.server.sink.refuse_rcpt({"bad@example.org": "550 5.1.1 no such user"})
    rig.mailer.enqueue("two-factor-code", to=["good@example.org", "bad@example.org"],
                       code="731904")
    assert rig.sender.run_once() == sysmail.DeliveryCounts(sent=1, failed=1)
    [letter] = rig.mailer.spool.failed()
    assert (letter["to"], letter["redacted"], letter["code"]) == (["bad@example.org"], True, 550)
    [(_, name, path)] = rig.mailer.spool.messages(("failed",))  # as `sysmail show` reads it
    assert rig.mailer.spool.peek(name, path).rcpts == ("bad@example.org",)
    assert b"731904" not in b"".join(p.read_bytes()
                                     for p in (rig.mailer.spool.root / "failed").iterdir())


def test_a_deferral_without_reply_text_keeps_the_code_alone(rig: Rig) -> None:
    """A bare "451" (no text): the queue listing and the log show "451", nothing made up."""
    rig.mailer.enqueue("security-alert", to="ada@example.org", event="x")
    rig.server.sink.script_data(["451"])
    assert rig.sender.run_once() == sysmail.DeliveryCounts(deferred=1)
    (row,) = rig.mailer.spool.entries()
    assert (row["attempt"], row["last_reply"]) == (1, "451")


class RecordedBounces(sysmail.BounceHandler):
    """Keeps every report handed to handle(); raises `failure` instead when it is set."""

    def __init__(self, failure: Exception | None = None):
        super().__init__(sysmail.Metrics())
        self.failure = failure
        self.handled: list[tuple[sysmail.BounceReport, str, str]] = []

    def handle(self, report: sysmail.BounceReport, envelope_recipient: str = "",
               source: str = "report") -> None:
        if self.failure is not None:
            raise self.failure
        self.handled.append((report, envelope_recipient, source))


def _sender_with(rig: Rig, bounces: sysmail.BounceHandler | None) -> sysmail.Sender:
    return sysmail.Sender(rig.mailer.spool, rig.sender.transport, None, clock=rig.clock,
                          rand=lambda: 0.5, metrics=sysmail.Metrics(), bounces=bounces)


GONE = "550 5.1.1 <gone@example.org>: Recipient address rejected: User unknown"


def test_each_refusal_at_rcpt_is_reported_with_the_relays_own_words(rig: Rig) -> None:
    """A 450, then a 550 at RCPT TO: the 450 is no bounce, and the 550 after it is reported
    whole: hard, its address, its status, the relay's reply as the reason, the Message-ID,
    the envelope sender, from the source "rcpt"."""
    policy = "550 5.7.1 <pol@example.org>: mailbox unavailable by policy"
    vague = "550 5.0.0 <old@example.org>: User unknown"
    rig.server.sink.refuse_rcpt({"later@example.org": "450 4.2.1 mailbox busy",
                                 "gone@example.org": GONE, "pol@example.org": policy,
                                 "old@example.org": vague})
    rcpts = ["later@example.org", "gone@example.org", "pol@example.org", "old@example.org"]
    message_id = rig.mailer.enqueue_message([*rcpts, "ok@example.org"], "Hello", "Text")
    bounces = RecordedBounces()
    sender = _sender_with(rig, bounces)
    assert sender.run_once() == sysmail.DeliveryCounts(sent=1, failed=1, deferred=1)
    # the status decides (5.7.1: the relay's policy, soft, whatever the words); a vague
    # status (5.0.0) leaves it to the words
    assert bounces.handled == [
        (sysmail.BounceReport(kind, (rcpt,), status, reply, message_id),
         rig.mailer.config.from_addr, "rcpt")
        for kind, rcpt, status, reply in (("hard", rcpts[1], "5.1.1", GONE),
                                          ("soft", rcpts[2], "5.7.1", policy),
                                          ("hard", rcpts[3], "5.0.0", vague))]


def test_a_bounce_handler_that_fails_is_logged_and_the_message_stays_settled(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    """The handler raising: one error record "bounce_not_recorded" naming the spool entry,
    with the traceback; the message is settled all the same (nobody gets it twice)."""
    caplog.set_level(logging.INFO, logger="sysmail")
    rig.server.sink.refuse_rcpt({"gone@example.org": GONE})
    rig.mailer.enqueue_message(["gone@example.org", "ok@example.org"], "Hello", "Text")
    ident = _spool_id(rig)
    sender = _sender_with(rig, RecordedBounces(RuntimeError("the list is down")))
    assert sender.run_once() == sysmail.DeliveryCounts(sent=1, failed=1)
    [record] = [r for r in caplog.records if r.getMessage() == "bounce_not_recorded"]
    assert (record.levelno, record.fields, record.exc_info[0]) == (
        logging.ERROR, {"id": ident}, RuntimeError)
    assert sender.run_once() == sysmail.DeliveryCounts()
    assert [m.rcpt_tos for m in rig.server.messages] == [["ok@example.org"]]


def test_a_refusal_at_rcpt_without_a_bounce_handler_logs_no_error(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sysmail")
    rig.server.sink.refuse_rcpt({"gone@example.org": GONE})
    rig.mailer.enqueue_message("gone@example.org", "Hello", "Text")
    assert _sender_with(rig, None).run_once() == sysmail.DeliveryCounts(failed=1)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


class GatedSink(SmtpSink):
    """Holds every RCPT TO reply until the test opens the gate; says when one is waiting."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = threading.Event()
        self.gate = threading.Event()

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        self.waiting.set()
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 30)
        return await super().handle_RCPT(server, session, envelope, address, options)


class SenderRefusingSink(SmtpSink):
    """A relay that refuses the envelope sender itself (SPF, an unknown sender domain)."""

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        return "550 5.7.1 <" + address + ">: Sender address rejected: not owned by user"


def test_a_relay_refusing_the_sender_fails_the_message_with_its_reply(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A 550 at MAIL FROM refuses every recipient at once: a dead letter with that reply,
    not an internal error."""
    caplog.set_level(logging.INFO, logger="sysmail")
    with relay_with(SenderRefusingSink()) as server:
        mailer = _unsigned_mailer(server, tmp_path, FakeClock())
        mailer.enqueue_message("ada@example.org", "Hello", "Text")
        sender = mailer.sender()
        try:
            assert sender.run_once() == sysmail.DeliveryCounts(failed=1)
        finally:
            sender.close()
    [letter] = mailer.spool.failed()
    assert (letter["reason"], letter["code"]) == ("rejected", 550)
    assert "Sender address rejected" in letter["reply"]
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_stop_while_the_relay_holds_a_transaction_puts_the_message_back_unharmed(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM's path: the stop comes while the relay still holds RCPT TO; once it answers,
    the transaction is abandoned and the message goes back to the queue as it was (no
    attempt spent, no dead letter, no error), to be sent after the restart."""
    caplog.set_level(logging.INFO, logger="sysmail")
    sink, stop = GatedSink(), threading.Event()
    with relay_with(sink) as server:
        mailer = _unsigned_mailer(server, tmp_path, FakeClock())
        sender = mailer.sender()
        mailer.enqueue_message("ada@example.org", "Hello", "Text")
        worker = threading.Thread(target=sender.run, args=(stop,))
        try:
            worker.start()
            assert sink.waiting.wait(30)
            stop.set()
            sender.wake()
            sink.gate.set()
            worker.join(30)
            assert not worker.is_alive()
        finally:
            stop.set()
            sink.gate.set()
    assert [(row["state"], row["attempt"]) for row in mailer.spool.entries()] == [("new", 0)]
    assert mailer.spool.failed() == [] and server.messages == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


# --------------------------------------------------------------------------- Redis queue

T_QUEUE = 1_800_000_000.0


def _header(to: str = "ada@example.org") -> dict:
    return {"message_id": "<m@example.com>", "from": "noreply@example.com", "to": [to],
            "template": "t", "queued_at": T_QUEUE, "expires_at": T_QUEUE + 86400}


def _redis_queue(redis_server: RedisServer) -> tuple[sysmail.RedisQueue, FakeClock]:
    clock = FakeClock(T_QUEUE)
    return sysmail.RedisQueue(redis_server.url, clock=clock,
                              prefix=f"m{secrets.token_hex(3)}:"), clock


def _bury(queue: sysmail.RedisQueue, clock: FakeClock, priority: int, to: str) -> str:
    """Enqueue, claim and fail one message; return its id."""
    ident = queue.enqueue(_header(to), b"body", priority)
    [claim], _ = queue.claim(1)
    assert claim.name.id == ident
    queue.fail(claim, {"reason": "rejected"})
    clock.advance(1)
    return ident


def _redis_message(to: str, template: str) -> dict:
    return {**_header(to), "message_id": f"<{to}>", "template": template}


def test_redis_queue_lists_every_waiting_message_like_the_spool(
        redis_server: RedisServer) -> None:
    """`sysmail queue` on the Redis fallback: the message being sent first (next try: when
    its 5-minute lease ends, README), then urgent before bulk, then soonest due; each with
    its Message-ID, kind, recipients, age, attempt, next try and the last reply of a
    deferral; an entry that is no message is listed by its id."""
    queue, clock = _redis_queue(redis_server)
    sending = queue.enqueue(_redis_message("sending@example.org", "welcome"), b"x", 1)
    queue.claim(1)
    clock.advance(1)
    urgent = queue.enqueue(_redis_message("u@example.org", "password-reset"), b"x", 0)
    bulk = queue.enqueue(_redis_message("b@example.org", ""), b"x", 1)
    busy = queue.enqueue(_redis_message("busy@example.org", ""), b"x", 1)
    clock.advance(1)
    claims, _ = queue.claim(3)
    for claim in claims:
        if claim.name.id == busy:
            queue.defer(claim, T_QUEUE + 600, "451 4.2.1 Mailbox busy")
        else:
            queue.release(claim)
    client = redis.Redis.from_url(redis_server.url)
    broken = f"{int((T_QUEUE - 60) * 1e6):x}rbroken"
    client.hset(queue._key("msg", broken), mapping={"entry": b"garbage", "priority": 1})
    client.zadd(queue._key("queue", "1"), {broken: int((T_QUEUE + 900) * 1000)})

    def row(ident: str, to: str, kind: str, **changed: object) -> dict:
        return {"id": ident, "state": "new", "message_id": f"<{to}>", "kind": kind,
                "to": [to], "queued_at": T_QUEUE, "attempt": 0, "next_try": T_QUEUE + 2,
                "priority": "bulk", "last_reply": "", "queue": "redis", **changed}
    assert queue.entries() == [
        row(sending, "sending@example.org", "welcome", state="sending",
            next_try=T_QUEUE + 300),
        row(urgent, "u@example.org", "password-reset", priority="urgent"),
        row(bulk, "b@example.org", "ad-hoc"),
        row(busy, "busy@example.org", "ad-hoc", attempt=1, next_try=T_QUEUE + 600,
            last_reply="451 4.2.1 Mailbox busy"),
        {**row(broken, "", "unreadable", next_try=T_QUEUE + 900), "message_id": "", "to": [],
         "queued_at": T_QUEUE - 60}]


def test_redis_release_to_a_later_time_and_a_defer_without_a_reply(
        redis_server: RedisServer) -> None:
    """release(claim, due) holds the message until due (a paced relay's wait), and a deferral
    that came with no reply shows none."""
    queue, _ = _redis_queue(redis_server)
    held = queue.enqueue(_redis_message("held@example.org", ""), b"x", 1)
    quiet = queue.enqueue(_redis_message("quiet@example.org", ""), b"x", 1)
    claims, _ = queue.claim(2)
    for claim in claims:
        if claim.name.id == held:
            queue.release(claim, T_QUEUE + 60)
        else:
            queue.defer(claim, T_QUEUE + 30)
    assert queue.claim(2)[0] == []
    assert [(r["id"], r["attempt"], r["next_try"], r["last_reply"]) for r in queue.entries()] == [
        (quiet, 1, T_QUEUE + 30, ""), (held, 0, T_QUEUE + 60, "")]


def test_redis_retry_leaves_redacted_dead_letters_alone(redis_server: RedisServer) -> None:
    """A dead letter whose secret was redacted cannot be sent again: retry skips it."""
    queue, _ = _redis_queue(redis_server)
    ident = queue.enqueue(_header(), b"body", 0)
    [claim], _ = queue.claim(1)
    queue.fail(claim, {"reason": "rejected", "redacted": True})
    assert queue.retry() == [] and queue.retry([ident]) == []
    assert [letter["id"] for letter in queue.failed()] == [ident]


def test_redis_pace_is_kept_per_relay_and_the_daily_count_per_day(
        redis_server: RedisServer) -> None:
    """Each relay has its own bucket and its own count of the day; the count starts again
    on the next day (UTC)."""
    queue, _ = _redis_queue(redis_server)
    day = 20_000 * 86400.0

    def take(relay: str, now: float) -> tuple[float, int]:
        return queue.take_pace(relay, now, 1.0, 1.0, 1.0, 100.0, (now // 86400 + 1) * 86400)
    assert take("a", day) == (0.0, 1)
    wait, used = take("a", day)
    assert wait > 0 and used == 1  # the bucket is empty: nothing taken, nothing counted
    assert take("b", day) == (0.0, 1)  # another relay: its own bucket, its own count
    assert take("a", day + 10) == (0.0, 2)
    assert take("a", day + 86400 + 10) == (0.0, 1)  # a new day


def test_redis_dead_letters_all_listed_and_retried_one_by_id(redis_server: RedisServer) -> None:
    """failed() lists every dead letter; retry(ids) moves just those asked for."""
    queue, clock = _redis_queue(redis_server)
    idents = [_bury(queue, clock, 1, f"u{n}@example.org") for n in range(3)]
    assert [letter["id"] for letter in queue.failed()] == idents
    assert queue.retry([idents[2]]) == [idents[2]]
    assert [letter["id"] for letter in queue.failed()] == idents[:2]


def test_redis_retry_keeps_the_priority_and_queues_behind_due_mail(
        redis_server: RedisServer) -> None:
    """A priority-0 dead letter (whole, or written apart for some recipients) goes back to
    priority 0, due now: after mail that was already due."""
    queue, clock = _redis_queue(redis_server)
    whole = _bury(queue, clock, 0, "ada@example.org")
    queue.enqueue(_header("bob@example.org"), b"body", 0)
    [claim], _ = queue.claim(1)
    queue.add_failed(queue.read(claim), ("bob@example.org",), {"reason": "rejected"})
    queue.ack(claim)
    [part] = [letter["id"] for letter in queue.failed() if letter["id"] != whole]
    urgent = queue.enqueue(_header("cy@example.org"), b"body", 0)
    later = queue.enqueue(_header("dee@example.org"), b"body", 1)
    clock.advance(10)
    assert sorted(queue.retry()) == sorted([whole, part])
    claims, _ = queue.claim(4)
    order = [c.name.id for c in claims]
    assert order[0] == urgent
    assert sorted(order[1:3]) == sorted([whole, part])
    assert order[3] == later
    assert [c.name.priority for c in claims] == [0, 0, 0, 1]


def test_redis_durability_warnings_name_the_setting_to_change(
        redis_server: RedisServer) -> None:
    """An evicting Redis without AOF: two warnings, each saying what to set."""
    queue, _ = _redis_queue(redis_server)
    client = redis.Redis.from_url(redis_server.url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.config_set("appendonly", "no")
    assert queue.check_durability() == [
        "Redis maxmemory-policy is allkeys-lru: queued mail could be evicted (set noeviction)",
        ("Redis has no AOF (appendonly no): queued mail could be lost in a restart "
         "(set appendonly yes)")]
    client.config_set("maxmemory-policy", "noeviction")
    client.config_set("appendonly", "yes")
    assert queue.check_durability() == []


def test_redis_queue_gives_up_on_a_redis_that_never_answers() -> None:
    """A server that accepts but never replies: enqueue fails over after the 2 s timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        queue = sysmail.RedisQueue(f"redis://127.0.0.1:{silent.getsockname()[1]}/0")
        started = time.monotonic()
        with pytest.raises(sysmail.QueueUnavailable):
            queue.enqueue(_header(), b"body", 1)
        assert time.monotonic() - started < sysmail.REDIS_TIMEOUT_SECONDS + 1.5


# --------------------------------------------------------------------------- spool

HEADER = {"message_id": "<m@example.com>", "from": "noreply@example.com",
          "to": ["ada@example.org"], "template": "t", "queued_at": T_QUEUE,
          "expires_at": T_QUEUE + 86400}


def _spool(root: Path, clock: FakeClock) -> sysmail.Spool:
    """A spool whose due index runs on the same fake clock."""
    return sysmail.Spool(root, clock=clock, index=sysmail._DueIndex(clock))


def _ids(claims: list[sysmail.Claim]) -> list[str]:
    return [claim.name.id for claim in claims]


def test_spool_index_serves_claims_between_rescans_and_rescans_on_time(tmp_path: Path) -> None:
    """While something is due the index is not rescanned: mail another process wrote without
    a wake-up waits for the rescan, due RESCAN_SECONDS after the last one, not longer."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    first, second, fourth = (spool.enqueue(HEADER, b"m", 1) for _ in range(3))
    assert _ids(spool.claim(1)[0]) == [first]  # builds the index
    other = sysmail.Spool(tmp_path / "spool", clock=clock)  # no listener: no wake-up arrives
    urgent = other.enqueue(HEADER, b"urgent", 0)
    assert _ids(spool.claim(1)[0]) == [second]  # due exactly now: still served by the index
    clock.advance(sysmail._DueIndex.RESCAN_SECONDS - 0.001)
    assert _ids(spool.claim(1)[0]) == [fourth]
    third = spool.enqueue(HEADER, b"three", 1)
    clock.advance(0.001)  # exactly RESCAN_SECONDS after the build
    assert _ids(spool.claim(2)[0]) == [urgent, third]


def test_spool_own_enqueue_is_indexed_at_once(tmp_path: Path) -> None:
    """A message this process queues is claimable at once, in priority order, no rescan."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    spool.enqueue(HEADER, b"one", 1)
    later = spool.enqueue(HEADER, b"two", 1)
    spool.claim(1)
    urgent = spool.enqueue(HEADER, b"urgent", 0)
    assert _ids(spool.claim(2)[0]) == [urgent, later]


def test_spool_rebuilt_index_keeps_priorities_next_to_added_names(tmp_path: Path) -> None:
    """Names found by a scan and names added later share one order: priority 0 first."""
    clock = FakeClock(T_QUEUE)
    urgent = sysmail.Spool(tmp_path / "spool", clock=clock).enqueue(HEADER, b"u", 0)
    spool = _spool(tmp_path / "spool", clock)
    assert spool.claim(0) == ([], T_QUEUE)  # the scan
    spool.enqueue(HEADER, b"normal", 1)
    assert _ids(spool.claim(1)[0]) == [urgent]
    found = sysmail.Spool(tmp_path / "spool", clock=clock).enqueue(HEADER, b"found", 1)
    clock.advance(sysmail._DueIndex.RESCAN_SECONDS)
    assert spool.claim(0)[0] == []  # the next scan finds "found" (due T_QUEUE)
    earlier = spool.enqueue(HEADER, b"earlier", 1, due=T_QUEUE - 10)
    assert _ids(spool.claim(1)[0]) == [earlier]
    assert found != earlier


def test_spool_rescans_at_once_when_its_index_has_nothing_due(tmp_path: Path) -> None:
    """An index with nothing due is rebuilt before claiming: other processes' mail is found."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    assert spool.claim(1) == ([], None)
    ident = sysmail.Spool(tmp_path / "spool", clock=clock).enqueue(HEADER, b"x", 1)
    assert _ids(spool.claim(1)[0]) == [ident]


def test_spool_claim_makes_up_for_names_another_worker_took(tmp_path: Path) -> None:
    """Names already claimed elsewhere are skipped and replaced; never more than the limit."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    idents = [spool.enqueue(HEADER, str(n).encode(), 1) for n in range(4)]
    assert spool.claim(0)[0] == []  # the index holds all four
    peer = sysmail.Spool(tmp_path / "spool", clock=clock)
    assert _ids(peer.claim(1)[0]) == idents[:1]
    claims, _ = spool.claim(2)
    assert _ids(claims) == idents[1:3]
    assert [e.split(".")[3] for e in os.listdir(tmp_path / "spool" / "new")] == idents[3:]


def test_spool_wake_up_datagrams_index_other_processes_mail(tmp_path: Path) -> None:
    """A listening spool learns the names another spool queues or retries from its wake-up
    datagram, and claims them before a rescan is due."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    spool.enqueue(HEADER, b"one", 1)
    spool.enqueue(HEADER, b"two", 1)
    woken = threading.Semaphore(0)
    listener = spool.listen(woken.release)
    assert listener is not None
    try:
        spool.claim(1)
        other = sysmail.Spool(tmp_path / "spool", clock=clock)
        urgent = other.enqueue(HEADER, b"urgent", 0)
        assert woken.acquire(timeout=5)
        assert _ids(spool.claim(1)[0]) == [urgent]
        [claim], _ = other.claim(1)
        other.fail(claim, {"reason": "rejected"})
        [retried] = other.retry()
        assert woken.acquire(timeout=5)
        assert _ids(spool.claim(1)[0]) == [retried]
        other.notify()
        assert woken.acquire(timeout=5)
        spool.enqueue(HEADER, b"own", 1)  # this process's own mail wakes its own sender
        assert woken.acquire(timeout=5)
    finally:
        listener.close()


def test_spool_read_failures_name_the_entry(tmp_path: Path) -> None:
    """An entry that cannot be read, or is no spool entry, is a SpoolError naming its id."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    (tmp_path / "spool" / "new" / "1.00000000000000.0.adirectory").mkdir()
    (tmp_path / "spool" / "new" / "1.00000000000000.0.garbage").write_bytes(b"not an entry")
    claims, _ = spool.claim(2)
    errors = {}
    for claim in claims:
        with pytest.raises(sysmail.SpoolError) as caught:
            spool.read(claim)
        errors[claim.name.id] = str(caught.value)
    assert errors == {"adirectory": "spool entry adirectory is unreadable",
                      "garbage": "queue entry garbage fails its authentication"}


@pytest.mark.parametrize("to", [[], [1], None])
def test_spool_entry_without_usable_recipients_is_unreadable(to: object) -> None:
    """No recipients, or recipients that are not strings: not a queue entry."""
    key = sysmail.UNKEYED_QUEUE_KEY
    raw = sysmail._entry_bytes({**HEADER, "to": to}, b"data", key)
    with pytest.raises(sysmail.SpoolError):
        sysmail._parse_entry(raw, sysmail.SpoolName(1, 0, 0, "x"), key)


def test_spool_entry_without_a_template_reads_as_ad_hoc() -> None:
    """An entry written without "template" reads as the empty template."""
    header = {k: v for k, v in HEADER.items() if k != "template"}
    key = sysmail.UNKEYED_QUEUE_KEY
    message = sysmail._parse_entry(sysmail._entry_bytes(header, b"data", key),
                                   sysmail.SpoolName(1, 0, 2, "x"), key)
    assert (message.template, message.attempt, message.rcpts) == ("", 2, ("ada@example.org",))


def test_spool_dead_letters_listed_by_failure_time_with_reasons(tmp_path: Path) -> None:
    """failed() lists every dead letter, oldest failure first (not by name), a lost reason as
    'unknown'; per-recipient letters of one message each get their own id."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    first = spool.enqueue(HEADER, b"normal", 1)
    [claim], _ = spool.claim(1)
    spool.fail(claim, {"reason": "rejected"})
    clock.advance(10)
    second = spool.enqueue(HEADER, b"urgent", 0)
    [claim], _ = spool.claim(1)
    message = spool.read(claim)
    spool.add_failed(message, ("ada@example.org",), {"reason": "part one"})
    clock.advance(10)
    spool.add_failed(message, ("ada@example.org",), {"reason": "part two"})
    spool.ack(claim)
    letters = spool.failed()
    assert [letter["reason"] for letter in letters] == ["rejected", "part one", "part two"]
    assert letters[0]["id"] == first and second not in [letter["id"] for letter in letters]
    assert len({letter["id"] for letter in letters}) == 3
    reason_file = next((tmp_path / "spool" / "failed").glob(f"*{first}.json"))
    reason_file.unlink()
    assert spool.failed()[0] == {"id": first, "reason": "unknown"}


def test_spool_recover_takes_back_claims_of_unknown_owners_and_signals_no_one(
        tmp_path: Path) -> None:
    """A claim whose owner is no pid is taken back; asking whether a live owner runs sends it
    no signal (signal 0) and keeps its claim."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    garbage = spool.enqueue(HEADER, b"g", 1)
    alive = spool.enqueue(HEADER, b"a", 1)
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            owner = sysmail._process_token(sleeper.pid)
            new = tmp_path / "spool" / "new"
            cur = tmp_path / "spool" / "cur"
            for entry in os.listdir(new):
                suffix = "nobody-1" if garbage in entry else owner
                os.rename(new / entry, cur / f"{entry}.{suffix}")
            assert spool.recover() == 1
            with pytest.raises(subprocess.TimeoutExpired):
                sleeper.wait(0.5)
            assert [e.split(".")[3] for e in os.listdir(new)] == [garbage]
            assert any(alive in e for e in os.listdir(cur))
        finally:
            sleeper.kill()


def test_spool_clean_tmp_keeps_a_file_exactly_36_hours_old(tmp_path: Path) -> None:
    """Only tmp/ files older than 36 hours are removed."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    edge, old = tmp_path / "spool" / "tmp" / "edge", tmp_path / "spool" / "tmp" / "old"
    for path, age in ((edge, sysmail.TMP_MAX_AGE_SECONDS), (old, sysmail.TMP_MAX_AGE_SECONDS + 1)):
        path.write_bytes(b"x")
        os.utime(path, (T_QUEUE - age, T_QUEUE - age))
    assert spool.clean_tmp() == 1
    assert edge.exists() and not old.exists()


def test_spool_counts_age_of_queued_mail_only_to_the_millisecond(tmp_path: Path) -> None:
    """The oldest age counts new/ and cur/ mail, not dead letters, rounded to milliseconds."""
    clock = FakeClock(T_QUEUE)
    spool = _spool(tmp_path / "spool", clock)
    spool.enqueue(HEADER, b"x", 1)
    [claim], _ = spool.claim(1)
    spool.fail(claim, {"reason": "rejected"})
    clock.advance(100)
    assert spool.counts()["oldest_age_seconds"] == 0
    spool.enqueue(HEADER, b"y", 1)
    clock.advance(1.23456)
    assert spool.counts()["oldest_age_seconds"] == 1.235


def test_spool_mark_sent_on_a_vanished_spool_does_not_raise(tmp_path: Path) -> None:
    """A delivery that happened must not fail because the spool folder went away."""
    spool = sysmail.Spool(tmp_path / "spool")
    shutil.rmtree(tmp_path / "spool")
    spool.mark_sent()
    assert spool.last_sent() is None


def test_spool_writable_checks_room_inodes_read_only_and_folders(
        small_mount: Callable[[str], Path]) -> None:
    """writable(): room and inodes left on a writable file system, tmp/ and new/ folders."""
    roomy = sysmail.Spool(small_mount("size=8m") / "spool")
    assert roomy.writable()
    assert repr(roomy) == f"Spool({str(roomy.root)!r})"
    assert sysmail.Spool(small_mount("size=1m") / "spool").writable()  # 1 MiB left is enough
    assert not sysmail.Spool(small_mount("size=512k") / "spool").writable()
    no_inodes = small_mount("size=8m,nr_inodes=8")
    spool = sysmail.Spool(no_inodes / "spool")
    with contextlib.suppress(OSError):
        for n in range(8):
            (no_inodes / f"f{n}").touch()
    assert os.statvfs(no_inodes).f_favail == 0
    assert not spool.writable()
    read_only = small_mount("size=8m")
    spool = sysmail.Spool(read_only / "spool")
    assert spool.writable()
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    assert not spool.writable()
    (roomy.root / "new").rmdir()
    assert not roomy.writable()
    shutil.rmtree(roomy.root / "tmp")
    assert not roomy.writable()


def test_move_no_replace_refuses_an_existing_target(tmp_path: Path) -> None:
    """renameat2(NOREPLACE) onto an existing name fails with EEXIST naming the target, and
    leaves both files as they were."""
    source, target = tmp_path / "source", tmp_path / "target"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    with pytest.raises(OSError) as caught:
        sysmail._move_no_replace(str(source), str(target))
    assert (caught.value.errno, caught.value.strerror, caught.value.filename) == (
        errno.EEXIST, os.strerror(errno.EEXIST), str(target))
    assert (source.read_bytes(), target.read_bytes()) == (b"new", b"old")
    sysmail._move_no_replace(str(source), str(tmp_path / "free"))
    assert not source.exists() and (tmp_path / "free").read_bytes() == b"new"


# --------------------------------------------------------------------------- Redis dead letters

DEAD_LETTER_SECONDS = 3 * 86400  # not the 14-day default: the queue must use its setting


def _dead_letter_queue(redis_server: RedisServer) -> tuple[sysmail.RedisQueue, FakeClock]:
    clock = FakeClock(T_QUEUE)
    return sysmail.RedisQueue(redis_server.url, clock=clock, prefix=f"d{secrets.token_hex(3)}:",
                              dead_letter_seconds=DEAD_LETTER_SECONDS), clock


def _bury_part(queue: sysmail.RedisQueue, to: str) -> None:
    """Deliver a two-recipient message to one and write a dead letter for the other."""
    queue.enqueue({**_header(to), "to": ["served@example.org", to]}, b"body", 1)
    [claim], _ = queue.claim(1)
    queue.add_failed(queue.read(claim), (to,), {"reason": "rejected"})
    queue.ack(claim)


def test_a_redis_dead_letter_is_stored_for_dead_letter_seconds_and_no_longer(
        redis_server: RedisServer) -> None:
    """A dead letter (a whole message failed, or a refused recipient's part) is kept in Redis
    for dead_letter_seconds, then Redis drops it: the one key holding it carries that TTL."""
    queue, clock = _dead_letter_queue(redis_server)
    whole = _bury(queue, clock, 1, "ada@example.org")
    _bury_part(queue, "bob@example.org")
    client = redis.Redis.from_url(redis_server.url)
    letters = [letter["id"] for letter in queue.failed()]
    assert whole in letters and len(letters) == 2
    for ident in letters:
        [stored] = [key for key in client.scan_iter(match=f"{queue.prefix}*")
                    if ident.encode() in key]
        assert client.hget(stored, "reason") is not None  # the dead letter itself
        assert DEAD_LETTER_SECONDS - 5 <= client.ttl(stored) <= DEAD_LETTER_SECONDS, stored


def test_a_redis_dead_letter_is_forgotten_dead_letter_seconds_after_it_failed(
        redis_server: RedisServer) -> None:
    """By the queue's clock: a dead letter is listed (and retryable) until dead_letter_seconds
    after it failed, then it leaves the list; a younger one stays until its own time."""
    queue, clock = _dead_letter_queue(redis_server)
    old = _bury(queue, clock, 1, "ada@example.org")  # failed at T_QUEUE; the clock is at +1
    clock.advance(DEAD_LETTER_SECONDS / 2)
    _bury_part(queue, "bob@example.org")
    [young] = [letter["id"] for letter in queue.failed() if letter["id"] != old]
    clock.now = T_QUEUE + DEAD_LETTER_SECONDS - 0.5
    assert [letter["id"] for letter in queue.failed()] == [old, young]  # not before its time
    clock.now = T_QUEUE + DEAD_LETTER_SECONDS
    assert [letter["id"] for letter in queue.failed()] == [young]
    assert queue.counts()["failed"] == 1
    assert queue.retry() == [young]  # the forgotten one cannot come back
