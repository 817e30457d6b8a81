"""The Redis fallback queue (issue 4, "Redis fallback" and Redis crash safety).

Everything is real: a redis-server subprocess (the redis_server fixture, or one started here
with AOF for the tests where Redis must keep its data across a restart), the aiosmtpd relay,
worker subprocesses killed with SIGKILL, the HTTP service on a real socket. Faults are real
too: the spool is made unusable on disk (tests run as root, so permissions would not stop a
write: the spool path is a regular file, or new/ (and tmp/) became regular files after the
spool was made), and Redis is stopped, or stopped and started again.

Each test once showed a bug of the Redis path (lost retries, dead letters that could not
be written, a broken spool stopping the service); they now guard the fixes.
"""

from __future__ import annotations

import email
import email.policy
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

import pytest
import redis
from aiosmtpd.controller import Controller
from conftest import REPO, FakeClock, RedisServer, SmtpServer, free_port, run_cli

import sysmail

DOMAIN = "example.com"
SENDER_ADDRESS = f"noreply@{DOMAIN}"
T0 = 1_800_000_000.0  # fake-clock epoch
PREFIX = "sysmail:"
API_KEY = "redis-fallback-test-key-0123456789"
EMPTY = {"new": 0, "deferred": 0, "cur": 0, "failed": 0}
LOCALHOST = "127.0.0.1"
UNCLAIM_BUG = (
    "BUG: the _REDIS_UNCLAIM script (used by RedisQueue.defer, release and recover) puts the "
    "message back in ARGV[5] .. 'queue:' .. priority, and ARGV[5] is the message-hash prefix "
    "'sysmail:msg:': it lands in sysmail:msg:queue:P, which claim and counts never read, so the "
    "message is never sent again")


# --------------------------------------------------------------------------- helpers


class ShiftedClock:
    """The real time plus an offset the test can raise (time passing faster)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class Events(logging.Handler):
    """Keeps every record of the "sysmail" logger (whatever its propagate setting)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self._lock_records = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock_records:
            self.records.append(record)

    def fields(self, event: str) -> list[dict]:
        """The fields of every record of one event, in order."""
        with self._lock_records:
            return [dict(getattr(r, "fields", {}), level=r.levelname) for r in self.records
                    if r.getMessage() == event]


@pytest.fixture
def events() -> Iterator[Events]:
    """The sysmail logger's records during the test."""
    logger = logging.getLogger("sysmail")
    handler, level = Events(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class DurableRedis(RedisServer):
    """The fixture's redis-server, but configured as the README asks: AOF, noeviction."""

    def _command(self) -> list[str]:
        # later options win over the fixture's --appendonly no
        return [*super()._command(), "--appendonly", "yes", "--appendfsync", "always",
                "--maxmemory-policy", "noeviction"]


@pytest.fixture
def durable_redis(tmp_path: Path) -> Iterator[DurableRedis]:
    """A redis-server whose data survives a stop and start (AOF, fsync on every write)."""
    workdir = tmp_path / "durable-redis"
    workdir.mkdir()
    server = DurableRedis(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def _env(redis_url: str, smtp_url: str, spool: Path, **extra: str) -> dict[str, str]:
    return {"REDIS_URL": redis_url, "SMTP_URL": smtp_url, "SYSTEM_DOMAIN": DOMAIN,
            "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(spool), **extra}


def _config(redis_url: str, smtp_url: str, spool: Path, **extra: str) -> sysmail.Config:
    return sysmail.Config.from_env(_env(redis_url, smtp_url, spool, **extra))


def _spool_is_a_file(tmp_path: Path) -> Path:
    """A spool path that is a regular file: nothing can be created under it."""
    path = tmp_path / "spool"
    path.write_bytes(b"not a folder\n")
    return path


def _spool_without_new_and_tmp(tmp_path: Path) -> Path:
    """A spool whose new/ and tmp/ folders were replaced by regular files after it was made."""
    root = tmp_path / "spool"
    sysmail.Spool(root)
    for sub in ("new", "tmp"):
        (root / sub).rmdir()
        (root / sub).write_bytes(b"")
    return root


def _spool_new_is_a_file(tmp_path: Path) -> Path:
    """A spool whose new/ is a regular file: a message can be written in tmp/ but never linked
    into new/ (tmp/ stays usable, so the sender's housekeeping still works)."""
    root = tmp_path / "spool"
    sysmail.Spool(root)
    (root / "new").rmdir()
    (root / "new").write_bytes(b"")
    return root


BROKEN_SPOOLS: dict[str, Callable[[Path], Path]] = {
    "spool-is-a-file": _spool_is_a_file,
    "new-and-tmp-are-files": _spool_without_new_and_tmp,
    "new-is-a-file": _spool_new_is_a_file,
}


@pytest.fixture(params=sorted(BROKEN_SPOOLS))
def broken_spool(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A spool that cannot be written, checked to really refuse a message."""
    path = BROKEN_SPOOLS[request.param](tmp_path)
    spool = sysmail.Spool(path)
    assert not spool.writable()
    with pytest.raises(sysmail.SpoolError):
        spool.enqueue({"message_id": "<probe@example.com>"}, b"probe", sysmail.BULK)
    return path


def _client(url: str) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=5)


def _keys(url: str) -> list[bytes]:
    """Every sysmail key in Redis (rate limits aside)."""
    return sorted(k for k in _client(url).keys(f"{PREFIX}*") if not k.startswith(b"sysmail:rate:"))


def _message_id(data: bytes) -> str:
    message = email.message_from_bytes(data, policy=email.policy.default)
    return str(message["Message-ID"])


def _put(queue: sysmail.RedisQueue, subject: str, priority: int = sysmail.BULK,
         due: float | None = None, rcpts: tuple[str, ...] = ("ada@example.org",),
         ) -> tuple[str, str, bytes]:
    """Enqueue a small message straight into Redis; return (id, Message-ID, bytes)."""
    message_id = f"<{subject.replace(' ', '-')}.{os.urandom(4).hex()}@{DOMAIN}>"
    data = (f"From: {SENDER_ADDRESS}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\n{subject}\r\n").encode()
    now = queue.clock()
    header = {"message_id": message_id, "from": SENDER_ADDRESS, "to": list(rcpts),
              "template": "", "queued_at": now, "expires_at": now + 3600}
    return queue.enqueue(header, data, priority, due=due), message_id, data


def _ids(claims: list[sysmail.Claim]) -> list[str]:
    return [claim.name.id for claim in claims]


def _request(base_url: str, method: str, path: str, payload: object = None,
             headers: dict[str, str] | None = None) -> tuple[int, http.client.HTTPMessage, object]:
    """One HTTP request; return status, headers and the JSON body."""
    parts = urllib.parse.urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
    try:
        body = None if payload is None else json.dumps(payload).encode()
        sent = {"Content-Type": "application/json"} if body is not None else {}
        connection.request(method, path, body=body, headers={**sent, **(headers or {})})
        response = connection.getresponse()
        raw = response.read()
        assert response.headers.get_content_type() == "application/json", raw
        return response.status, response.headers, json.loads(raw)
    finally:
        connection.close()


def _forgot(app: sysmail.App, address: str) -> tuple[int, http.client.HTTPMessage, object]:
    return _request(app.url, "POST", "/v1/auth/forgot-password", {"email": address})


def _send(app: sysmail.App, headers: dict[str, str] | None = None,
          ) -> tuple[int, http.client.HTTPMessage, object]:
    payload = {"template": "two-factor-code", "to": "ada@example.org", "vars": {"code": "482913"}}
    return _request(app.url, "POST", "/v1/emails", payload,
                    {"Authorization": f"Bearer {API_KEY}", **(headers or {})})


def _sentences(stderr: str) -> list[str]:
    """The stderr lines that are not JSON log lines."""
    return [line for line in stderr.splitlines() if not line.startswith("{")]


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


# --------------------------------------------------------------------------- spool unwritable


def test_unwritable_spool_queues_the_spool_entry_in_redis_and_the_sender_delivers_it(
    broken_spool: Path, redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
    events: Events,
) -> None:
    clock = FakeClock(T0)
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url, broken_spool),
                            clock=clock)

    message_id = mailer.enqueue("two-factor-code", "ada@example.org", code="482913")

    if (broken_spool / "tmp").is_dir():
        assert list((broken_spool / "tmp").iterdir()) == []  # no half-written entry left
    assert mailer.fallback is not None
    assert mailer.fallback.counts() == {**EMPTY, "new": 1}
    client = _client(redis_server.url)
    [key] = client.keys(f"{PREFIX}msg:*")
    ident = key.decode().removeprefix(f"{PREFIX}msg:")
    stored = client.hgetall(key)
    assert stored[b"priority"] == b"0"  # two-factor-code is urgent
    assert stored[b"attempt"] == b"0"
    assert client.zrange(f"{PREFIX}queue:0", 0, -1, withscores=True) == [
        (ident.encode(), T0 * 1000)]
    head, _, data = stored[b"entry"].partition(b"\n")
    header = {"message_id": message_id, "from": SENDER_ADDRESS, "to": ["ada@example.org"],
              "template": "two-factor-code", "queued_at": T0, "expires_at": T0 + 600}
    tag, mac, header_json = head.split(b" ", 2)
    assert (tag, len(mac)) == (b"sysmail-spool/2", 64)
    assert json.loads(header_json) == header
    assert _message_id(data) == message_id
    # byte for byte what a working spool writes for the same message
    reference = sysmail.Spool(tmp_path / "reference", clock)
    reference.enqueue(header, data, sysmail.URGENT)
    [written] = (tmp_path / "reference" / "new").iterdir()
    assert stored[b"entry"] == written.read_bytes()

    [queued] = events.fields("queued")
    assert (queued["backend"], queued["id"], queued["rfcMessageId"]) == ("redis", ident,
                                                                         message_id)
    [unwritable] = events.fields("spool_unwritable")
    assert (unwritable["level"], unwritable["using"]) == ("WARNING", "redis")
    metrics = mailer.metrics.render({}).splitlines()
    assert 'sysmail_enqueued_total{backend="redis"} 1' in metrics
    assert 'sysmail_enqueued_total{backend="spool"} 0' in metrics

    assert mailer.sender().run_once() == sysmail.DeliveryCounts(sent=1)
    [received] = smtp_server.messages
    assert (received.mail_from, received.rcpt_tos) == (SENDER_ADDRESS, ["ada@example.org"])
    assert received.data == data
    assert mailer.fallback.counts() == EMPTY
    assert _keys(redis_server.url) == []


# --------------------------------------------------------------------------- RedisQueue protocol


def test_claim_returns_the_most_urgent_due_messages_first(redis_server: RedisServer) -> None:
    clock = FakeClock(T0)
    queue = sysmail.RedisQueue(redis_server.url, clock=clock)
    bulk_older, _, _ = _put(queue, "bulk older", sysmail.BULK, due=T0 - 20)
    bulk, _, _ = _put(queue, "bulk", sysmail.BULK, due=T0 - 10)
    urgent, urgent_mid, urgent_data = _put(queue, "urgent", sysmail.URGENT, due=T0)
    later, _, _ = _put(queue, "urgent later", sysmail.URGENT, due=T0 + 60)

    claims, next_due = queue.claim(2)
    assert _ids(claims) == [urgent, bulk_older]
    assert [c.name.priority for c in claims] == [sysmail.URGENT, sysmail.BULK]
    assert next_due == T0 - 10  # the earliest left, due already: as the spool reports it
    message = queue.read(claims[0])
    assert (message.id, message.message_id, message.rcpts, message.priority, message.attempt,
            message.data) == (urgent, urgent_mid, ("ada@example.org",), sysmail.URGENT, 0,
                              urgent_data)

    claims, next_due = queue.claim(10)
    assert (_ids(claims), next_due) == ([bulk], T0 + 60)
    assert queue.claim(10) == ([], T0 + 60)
    assert queue.counts() == {**EMPTY, "deferred": 1, "cur": 3}

    clock.advance(60)
    claims, next_due = queue.claim(10)
    assert (_ids(claims), next_due) == ([later], None)


def test_a_claimed_message_is_not_claimed_again_and_ack_forgets_it(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock(T0)
    first = sysmail.RedisQueue(redis_server.url, clock=clock)
    second = sysmail.RedisQueue(redis_server.url, clock=clock)
    ident, _, _ = _put(first, "once")

    [claim], _ = first.claim(10)
    assert claim.name.id == ident
    assert second.claim(10) == ([], None)
    assert second.recover() == 0  # its owner (this process) lives and its lease runs
    assert second.counts() == {**EMPTY, "cur": 1}

    first.ack(claim)
    assert second.counts() == EMPTY
    assert _keys(redis_server.url) == []


def test_defer_counts_an_attempt_and_release_does_not(redis_server: RedisServer) -> None:
    clock = FakeClock(T0)
    queue = sysmail.RedisQueue(redis_server.url, clock=clock)
    ident, _, _ = _put(queue, "again")
    [claim], _ = queue.claim(10)

    queue.defer(claim, T0 + 30)
    assert queue.counts() == {**EMPTY, "deferred": 1}
    assert queue.claim(10) == ([], T0 + 30)
    clock.advance(29.999)
    assert queue.claim(10) == ([], T0 + 30)
    clock.advance(0.001)
    [deferred], _ = queue.claim(10)
    assert (deferred.name.id, deferred.name.attempt) == (ident, 1)
    assert queue.read(deferred).attempt == 1

    clock.advance(5)
    queue.release(deferred)
    assert queue.counts() == {**EMPTY, "new": 1}
    assert _client(redis_server.url).zscore(f"{PREFIX}queue:1", ident) == (T0 + 35) * 1000
    [released], _ = queue.claim(10)
    assert (released.name.id, released.name.attempt) == (ident, 1)


def test_fail_keeps_the_reason_and_retry_puts_dead_letters_back(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock(T0)
    queue = sysmail.RedisQueue(redis_server.url, clock=clock)
    first, _, _ = _put(queue, "first", due=T0 - 2)
    second, _, _ = _put(queue, "second", due=T0 - 1)
    claim_first, claim_second = queue.claim(10)[0]
    assert (claim_first.name.id, claim_second.name.id) == (first, second)
    reason = {"reason": "rejected", "code": 550, "reply": "5.1.1 no such user"}

    queue.fail(claim_first, reason)
    assert queue.failed() == [{"id": first, **reason, "failed_at": T0, "queue": "redis"}]
    assert queue.counts() == {**EMPTY, "cur": 1, "failed": 1}
    clock.advance(1)
    queue.fail(claim_second, {"reason": "expired"})
    assert [letter["id"] for letter in queue.failed()] == [first, second]  # oldest first

    clock.advance(4)
    assert queue.retry(["not-a-dead-letter"]) == []
    assert queue.retry([first]) == [first]
    assert queue.counts() == {**EMPTY, "new": 1, "failed": 1}
    assert [letter["id"] for letter in queue.failed()] == [second]
    [again], _ = queue.claim(10)
    assert (again.name.id, again.name.attempt) == (first, 0)

    assert queue.retry() == [second]
    assert queue.failed() == []
    assert queue.counts() == {**EMPTY, "new": 1, "cur": 1}


def test_add_failed_makes_a_dead_letter_for_some_recipients(redis_server: RedisServer) -> None:
    clock = FakeClock(T0)
    queue = sysmail.RedisQueue(redis_server.url, clock=clock)
    ident, message_id, data = _put(queue, "two", rcpts=("ada@example.org", "bob@example.org"))
    [claim], _ = queue.claim(10)
    message = queue.read(claim)
    reason = {"reason": "rejected", "code": 550, "reply": "5.1.1 no such user"}

    queue.add_failed(message, ("bob@example.org",), reason)
    queue.ack(claim)

    [letter] = queue.failed()
    assert letter["id"] != ident
    assert letter == {"id": letter["id"], **reason, "failed_at": T0, "queue": "redis"}
    assert queue.counts() == {**EMPTY, "failed": 1}
    assert queue.retry() == [letter["id"]]
    [again], _ = queue.claim(10)
    retried = queue.read(again)
    assert (retried.rcpts, retried.message_id, retried.data) == (("bob@example.org",),
                                                                 message_id, data)


def test_counts_follow_the_clock(redis_server: RedisServer) -> None:
    clock = FakeClock(T0)
    queue = sysmail.RedisQueue(redis_server.url, clock=clock)
    assert queue.counts() == EMPTY
    urgent, _, _ = _put(queue, "urgent", sysmail.URGENT, due=T0)
    overdue, _, _ = _put(queue, "overdue", due=T0 - 1)
    _put(queue, "due now", due=T0)
    _put(queue, "in ten", due=T0 + 10)
    _put(queue, "in twenty", due=T0 + 20)
    assert queue.counts() == {**EMPTY, "new": 3, "deferred": 2}

    claims, _ = queue.claim(2)
    assert _ids(claims) == [urgent, overdue]
    queue.fail(claims[1], {"reason": "rejected"})
    assert queue.counts() == {"new": 1, "deferred": 2, "cur": 1, "failed": 1}
    clock.advance(10)
    assert queue.counts() == {"new": 2, "deferred": 1, "cur": 1, "failed": 1}
    clock.advance(10)
    assert queue.counts() == {"new": 3, "deferred": 0, "cur": 1, "failed": 1}


# --------------------------------------------------------------------------- retries, dead letters


def test_temporary_failures_back_off_then_the_redis_mail_is_delivered(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    clock = FakeClock(T0)
    config = _config(redis_server.url, smtp_server.url, _spool_is_a_file(tmp_path))
    mailer = sysmail.Mailer(config, clock=clock)
    message_id = mailer.enqueue_message("ada@example.org", "Invoice", "Your invoice.")
    assert mailer.fallback is not None
    [key] = _client(redis_server.url).keys(f"{PREFIX}msg:*")
    ident = key.decode().removeprefix(f"{PREFIX}msg:")
    smtp_server.sink.script_data(["451 4.3.0 Try again later", "451 4.3.0 Still busy"])
    sender = sysmail.Sender(mailer.spool, sysmail.transport_from_config(config), None,
                            clock=clock, rand=lambda: 0.5, fallback=mailer.fallback)
    client = _client(redis_server.url)
    try:
        assert sender.run_once() == sysmail.DeliveryCounts(deferred=1)
        assert mailer.fallback.counts() == {**EMPTY, "deferred": 1}
        assert client.hget(key, "attempt") == b"1"
        assert client.zscore(f"{PREFIX}queue:1", ident) == (T0 + 1) * 1000  # 1 s backoff

        clock.advance(0.999)
        assert sender.run_once() == sysmail.DeliveryCounts()
        assert smtp_server.sink.data_attempts == 1
        clock.advance(0.001)
        assert sender.run_once() == sysmail.DeliveryCounts(deferred=1)
        assert client.hget(key, "attempt") == b"2"
        assert client.zscore(f"{PREFIX}queue:1", ident) == (T0 + 3) * 1000  # then 2 s

        clock.advance(2)
        assert sender.run_once() == sysmail.DeliveryCounts(sent=1)
    finally:
        sender.transport.close()
    assert smtp_server.sink.data_attempts == 3
    [received] = smtp_server.messages
    assert _message_id(received.data) == message_id
    assert _keys(redis_server.url) == []


def test_rejected_redis_mail_is_listed_counted_and_retried_by_the_cli(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url,
                                    _spool_is_a_file(tmp_path)))
    message_id = mailer.enqueue_message("ada@example.org", "Welcome", "Hello Ada.")
    smtp_server.sink.script_data(["550 5.7.1 Message refused by policy"])
    sender = mailer.sender()
    assert sender.run_once() == sysmail.DeliveryCounts(failed=1)
    assert smtp_server.messages == []
    # the operator's shell: the same Redis, the spool repaired (an empty one: a spool that
    # does not exist is a configuration error for the queue commands)
    (tmp_path / "repaired-spool").mkdir()
    env = _env(redis_server.url, smtp_server.url, tmp_path / "repaired-spool")

    listed = run_cli(["failed", "--json"], env)
    assert listed.returncode == 0, listed.stderr
    [letter] = json.loads(listed.stdout)
    assert letter["queue"] == "redis"
    assert (letter["reason"], letter["code"], letter["reply"]) == (
        "rejected", 550, "5.7.1 Message refused by policy")
    assert (letter["rfcMessageId"], letter["to"], letter["attempts"]) == (
        message_id, ["ada@example.org"], 1)
    text = run_cli(["failed"], env)
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        (f"{letter['id']}  ad-hoc  to ada@example.org: rejected 550 "
         "(5.7.1 Message refused by policy)")]

    status = run_cli(["status", "--json"], env)
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)
    assert (counts["new"], counts["deferred"], counts["cur"], counts["failed"]) == (0, 0, 0, 1)
    assert counts["redis"] == {**EMPTY, "failed": 1}

    retried = run_cli(["retry", "--all"], env)
    assert retried.returncode == 0, retried.stderr
    assert retried.stdout == "requeued 1 message(s)\n"
    assert mailer.fallback is not None
    assert mailer.fallback.counts() == {**EMPTY, "new": 1}
    assert sender.run_once() == sysmail.DeliveryCounts(sent=1)
    [received] = smtp_server.messages
    assert _message_id(received.data) == message_id
    after = run_cli(["status", "--json"], env)
    assert json.loads(after.stdout)["failed"] == 0


def test_expired_redis_mail_becomes_a_dead_letter_without_being_sent(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    clock = FakeClock(T0)
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url,
                                    _spool_is_a_file(tmp_path)), clock=clock)
    message_id = mailer.enqueue_message("ada@example.org", "Flash sale", "Today only.",
                                        ttl_seconds=60)
    assert mailer.fallback is not None
    assert mailer.fallback.counts() == {**EMPTY, "new": 1}

    clock.advance(61)
    assert mailer.sender().run_once() == sysmail.DeliveryCounts(expired=1)
    assert smtp_server.sink.data_attempts == 0
    [letter] = mailer.fallback.failed()
    assert (letter["reason"], letter["rfcMessageId"], letter["failed_at"], letter["queue"]) == (
        "expired", message_id, T0 + 61, "redis")
    assert mailer.fallback.counts() == {**EMPTY, "failed": 1}


def test_partly_refused_redis_mail_is_a_dead_letter_for_the_refused_recipient_only(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url,
                                    _spool_is_a_file(tmp_path)))
    message_id = mailer.enqueue_message(["ada@example.org", "bob@example.org"], "Team news",
                                        "Hello both.")
    smtp_server.sink.refuse_rcpt({"bob@example.org": "550 5.1.1 No such user"})

    assert mailer.sender().run_once() == sysmail.DeliveryCounts(sent=1, failed=1)
    [received] = smtp_server.messages
    assert received.rcpt_tos == ["ada@example.org"]
    assert mailer.fallback is not None
    [letter] = mailer.fallback.failed()
    assert (letter["reason"], letter["code"], letter["to"], letter["rfcMessageId"]) == (
        "rejected", 550, ["bob@example.org"], message_id)
    assert mailer.fallback.counts() == {**EMPTY, "failed": 1}


# --------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("death", ["sigkill", "exit"])
def test_claims_of_a_dead_worker_are_taken_back_at_once_and_sent_once(
    death: str, redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url,
                                    _spool_is_a_file(tmp_path)))
    message_ids = [mailer.enqueue_message("ada@example.org", f"Notice {i}", f"Body {i}")
                   for i in range(3)]
    script = ("import sys, time, sysmail\n"
              "claims, _ = sysmail.RedisQueue(sys.argv[1]).claim(10)\n"
              "print(' '.join(c.name.id for c in claims), flush=True)\n"
              + ("time.sleep(60)\n" if death == "sigkill" else ""))
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO)}
    queue = sysmail.RedisQueue(redis_server.url)
    client = _client(redis_server.url)
    with subprocess.Popen([sys.executable, "-c", script, redis_server.url], env=env,
                          stdout=subprocess.PIPE, text=True) as worker:
        try:
            assert worker.stdout is not None
            claimed = worker.stdout.readline().split()
            assert len(claimed) == 3
            owners = {client.hget(f"{PREFIX}msg:{i}", "owner") for i in claimed}
            assert len(owners) == 1
            owner = owners.pop().decode()
            assert owner.startswith(f"{socket.gethostname()}:{worker.pid}-")
            assert queue.counts() == {**EMPTY, "cur": 3}
            if death == "sigkill":
                assert queue.recover() == 0  # alive: its claims stay its own
                worker.send_signal(signal.SIGKILL)
        finally:
            if worker.poll() is None and death != "exit":
                worker.kill()
        worker.wait(timeout=10)
    assert worker.returncode == (-signal.SIGKILL if death == "sigkill" else 0)

    assert queue.recover() == 3  # the lease has 5 minutes left: the dead owner is enough
    assert queue.counts() == {**EMPTY, "new": 3}
    assert queue.recover() == 0
    assert mailer.sender().run_once() == sysmail.DeliveryCounts(sent=3)
    received = Counter(_message_id(m.data) for m in smtp_server.messages)
    assert received == Counter(message_ids)  # each exactly once
    assert _keys(redis_server.url) == []


def test_an_expired_lease_is_taken_back_even_from_another_host(
    redis_server: RedisServer,
) -> None:
    clock = FakeClock(T0)
    queue = sysmail.RedisQueue(redis_server.url, clock=clock)
    stale, _, _ = _put(queue, "stale")
    fresh, _, _ = _put(queue, "fresh")
    assert sorted(_ids(queue.claim(10)[0])) == sorted([stale, fresh])
    client = _client(redis_server.url)
    # both claims now belong to a worker on another host (pid 1 exists here: must not matter)
    client.hset(f"{PREFIX}msg:{stale}", "owner", "otherhost:1-1")
    client.hset(f"{PREFIX}msg:{fresh}", "owner", "otherhost:1-1")
    client.zadd(f"{PREFIX}claimed", {stale: (T0 - 1) * 1000})  # its lease ran out

    assert queue.recover() == 1
    assert queue.counts() == {**EMPTY, "new": 1, "cur": 1}
    [again], _ = queue.claim(10)
    assert again.name.id == stale
    queue.ack(again)

    clock.advance(sysmail.REDIS_CLAIM_LEASE_SECONDS - 1)
    assert queue.recover() == 0  # another host's claim: only its lease can end it
    clock.advance(1)
    assert queue.recover() == 1
    [last], _ = queue.claim(10)
    assert (last.name.id, last.name.attempt) == (fresh, 0)


# --------------------------------------------------------------------------- outages


def test_redis_down_the_spool_serves_alone_with_a_warning(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path, events: Events,
) -> None:
    redis_server.stop()
    spool = tmp_path / "spool"
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url, spool))
    mailer.check_queue()
    first = mailer.enqueue_message("ada@example.org", "First", "One.")
    assert len(list((spool / "new").iterdir())) == 1
    assert [q["backend"] for q in events.fields("queued")] == ["spool"]

    assert mailer.sender().run_once() == sysmail.DeliveryCounts(sent=1)
    [warning] = events.fields("queue_unavailable")
    assert warning["level"] == "WARNING"
    assert warning["queue"] == f"RedisQueue({redis_server.url!r})"
    assert "Redis is unavailable" in warning["reason"]

    mailer.start()  # the sender thread keeps going
    try:
        second = mailer.enqueue_message("ada@example.org", "Second", "Two.")
        received = smtp_server.wait_for(2)
    finally:
        mailer.stop()
    assert [_message_id(m.data) for m in received] == [first, second]
    assert list((spool / "new").iterdir()) == []
    assert list((spool / "cur").iterdir()) == []


def test_both_down_enqueue_raises_and_send_exits_75(
    broken_spool: Path, redis_server: RedisServer, smtp_server: SmtpServer,
) -> None:
    before = sorted(p.name for p in broken_spool.iterdir()) if broken_spool.is_dir() else None
    redis_server.stop()
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url, broken_spool))

    with pytest.raises(sysmail.QueueUnavailable, match="neither the spool nor Redis"):
        mailer.enqueue_message("ada@example.org", "Lost?", "Never reported as queued.")
    with pytest.raises(sysmail.QueueUnavailable):
        mailer.check_queue()

    result = run_cli(["send", "--to", "ada@example.org", "--subject", "Lost?", "--text", "No."],
                     _env(redis_server.url, smtp_server.url, broken_spool))
    assert result.returncode == 75
    assert result.stdout == ""  # no Message-ID: nothing was queued
    assert _sentences(result.stderr) == [
        "sysmail: the message could not be queued: neither the spool nor Redis could store it"]
    assert "Traceback" not in result.stderr
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert all("traceback" not in entry for entry in logged)
    if before is not None:
        assert sorted(p.name for p in broken_spool.iterdir()) == before
        assert list((broken_spool / "cur").iterdir()) == []
        if (broken_spool / "tmp").is_dir():
            assert list((broken_spool / "tmp").iterdir()) == []


def test_http_answers_503_when_neither_spool_nor_redis_can_store(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    spool = _spool_new_is_a_file(tmp_path)
    config = _config(redis_server.url, smtp_server.url, spool,
                     SYSMAIL_LISTEN=f"{LOCALHOST}:0", SYSMAIL_METRICS_LISTEN=f"{LOCALHOST}:0", SYSMAIL_API_KEY=API_KEY)
    store = sysmail.MemoryStore()
    store.add_user("ada@example.org", "Ada")
    app = sysmail.build_app(config, store=store)
    app.start()
    try:
        # Redis up: the spool is broken but mail is stored, so requests succeed
        status, _, body = _request(app.ops_url, "GET", "/readyz")
        assert (status, body) == (200, {"status": "ready", "checks": {
            "spool": False, "store": True, "redis": True, "relays_up": "1/1"}})
        status, _, body = _send(app)
        assert status == 202
        assert isinstance(body, dict)
        [received] = smtp_server.wait_for(1)
        assert _message_id(received.data) == body["messageId"]

        redis_server.stop()
        unavailable = {"error": "temporarily unavailable, try again later"}
        status, headers, body = _send(app)
        assert (status, body, headers["Retry-After"]) == (503, unavailable, "5")
        for _ in range(2):  # an Idempotency-Key must not turn a failure into a "duplicate"
            status, _, body = _send(app, {"Idempotency-Key": "order-42"})
            assert (status, body) == (503, unavailable)
        status, _, body = _forgot(app, "ada@example.org")
        assert (status, body) == (503, unavailable)
        status, _, body = _request(app.ops_url, "GET", "/readyz")
        assert (status, body) == (503, {"status": "not ready", "checks": {
            "spool": False, "store": True, "redis": False, "relays_up": "1/1"}})
    finally:
        app.stop()
    assert len(smtp_server.messages) == 1


def test_the_service_starts_and_queues_to_redis_when_the_spool_folder_is_unusable(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    config = _config(redis_server.url, smtp_server.url, _spool_is_a_file(tmp_path),
                     SYSMAIL_LISTEN=f"{LOCALHOST}:0", SYSMAIL_METRICS_LISTEN=f"{LOCALHOST}:0", SYSMAIL_API_KEY=API_KEY)
    app = sysmail.build_app(config, store=sysmail.MemoryStore())
    app.start()
    try:
        status, _, body = _send(app)
        assert status == 202
        assert isinstance(body, dict)
        [received] = smtp_server.wait_for(1)
        assert _message_id(received.data) == body["messageId"]
    finally:
        app.stop()


@pytest.mark.parametrize("command", ["worker", "status", "failed"])
def test_the_cli_serves_redis_when_the_spool_folder_is_unusable(
    command: str, redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    spool = _spool_is_a_file(tmp_path)
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url, spool))
    message_id = mailer.enqueue_message("ada@example.org", "Queued in Redis", "Hello.")
    argv = {"worker": ["worker", "--once"], "status": ["status", "--json"],
            "failed": ["failed", "--json"]}[command]

    result = run_cli(argv, _env(redis_server.url, smtp_server.url, spool))

    assert result.returncode == 0, result.stderr
    if command == "worker":
        [received] = smtp_server.messages
        assert _message_id(received.data) == message_id
    elif command == "status":
        assert json.loads(result.stdout)["redis"] == {**EMPTY, "new": 1}
    else:
        assert json.loads(result.stdout) == []


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_the_sender_thread_drains_redis_when_the_spool_folder_is_unusable(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url,
                                    _spool_is_a_file(tmp_path)))
    mailer.start()
    try:
        message_id = mailer.enqueue_message("ada@example.org", "Queued in Redis", "Hello.")
        [received] = smtp_server.wait_for(1, timeout=3)
    finally:
        mailer.stop()
    assert _message_id(received.data) == message_id


# --------------------------------------------------------------------------- Redis restart


class RedisStoppingRelay:
    """An aiosmtpd relay that accepts all mail and stops a Redis server while answering the
    Nth message: the worker then holds a sent message it cannot acknowledge."""

    def __init__(self, redis_server: RedisServer, stop_at: int) -> None:
        self.redis_server = redis_server
        self.stop_at = stop_at
        self.received: list[bytes] = []
        self.redis_stopped = threading.Event()
        self.port = free_port()
        self._controller = Controller(self, hostname=LOCALHOST, port=self.port)

    @property
    def url(self) -> str:
        return f"smtp+plain://{LOCALHOST}:{self.port}"

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        data = envelope.original_content or envelope.content  # type: ignore[attr-defined]
        self.received.append(data)
        if len(self.received) == self.stop_at:
            self.redis_server.stop()  # before the 250: the worker cannot ack this one
            self.redis_stopped.set()
        return "250 2.0.0 Ok"

    def message_ids(self) -> Counter[str]:
        return Counter(_message_id(data) for data in list(self.received))

    def __enter__(self) -> Self:
        self._controller.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._controller.stop()


def _wait_all_arrived(relay: RedisStoppingRelay, queued: set[str], timeout: float = 60.0
                      ) -> None:
    """Wait until every queued message arrived; at the timeout, return and let the test's
    assertions name what is missing. No early return when nothing arrives for a while: on a
    busy machine a pause is not a stuck sender, and the verdict must not depend on its length.
    The timeout only bounds a failure, and is well short of REDIS_CLAIM_LEASE_SECONDS (minutes):
    a claim left for its lease to bring back is still missing then."""
    deadline = time.monotonic() + timeout
    while not set(relay.message_ids()) >= queued and time.monotonic() < deadline:
        time.sleep(0.05)


def _drain_across_a_redis_restart(
    durable_redis: DurableRedis, tmp_path: Path, events: Events, lease_passes: bool,
) -> tuple[set[str], Counter[str], sysmail.Mailer]:
    """Queue 200 mails in Redis, drain them with the sender thread while Redis is stopped
    (in the middle of a batch) and started again; return (queued ids, received ids, mailer)."""
    clock = ShiftedClock()
    with RedisStoppingRelay(durable_redis, stop_at=60) as relay:
        config = _config(durable_redis.url, relay.url, _spool_new_is_a_file(tmp_path))
        mailer = sysmail.Mailer(config, clock=clock)
        queued = {mailer.enqueue_message("ada@example.org", f"Statement {i}", f"Body {i}")
                  for i in range(200)}
        assert mailer.fallback is not None
        assert mailer.fallback.counts() == {**EMPTY, "new": 200}
        mailer.start()
        try:
            assert relay.redis_stopped.wait(20)
            assert _wait_until(lambda: any(
                "RedisQueue" in e["queue"] for e in events.fields("queue_unavailable")), 10)
            durable_redis.start()
            if lease_passes:
                clock.offset = sysmail.REDIS_CLAIM_LEASE_SECONDS + 1
            _wait_all_arrived(relay, queued)
        finally:
            mailer.stop()
        return queued, relay.message_ids(), mailer


def test_redis_restarted_mid_drain_loses_no_mail(
    durable_redis: DurableRedis, tmp_path: Path, events: Events,
) -> None:
    queued, received, mailer = _drain_across_a_redis_restart(
        durable_redis, tmp_path, events, lease_passes=True)

    assert set(received) == queued  # every message arrived, none invented
    duplicates = sum(count - 1 for count in received.values())
    assert duplicates <= 1  # at most the one sent but not acknowledged when Redis went
    assert mailer.fallback is not None
    assert mailer.fallback.counts() == EMPTY


def test_redis_restarted_mid_drain_the_interrupted_batch_is_sent_at_once(
    durable_redis: DurableRedis, tmp_path: Path, events: Events,
) -> None:
    queued, received, _ = _drain_across_a_redis_restart(
        durable_redis, tmp_path, events, lease_passes=False)

    assert set(received) == queued


# --------------------------------------------------------------------------- durability, limits


def test_startup_warns_when_redis_could_evict_or_lose_mail(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path, events: Events,
) -> None:
    mailer = sysmail.Mailer(_config(redis_server.url, smtp_server.url, tmp_path / "spool"))
    mailer.sender()
    [warning] = events.fields("redis_durability")
    assert warning["level"] == "WARNING"
    assert "AOF" in warning["warning"]
    assert "appendonly yes" in warning["warning"]

    _client(redis_server.url).config_set("maxmemory-policy", "allkeys-lru")
    mailer.sender()
    later = [w["warning"] for w in events.fields("redis_durability")[1:]]
    assert len(later) == 2
    assert any("allkeys-lru" in w and "noeviction" in w for w in later)
    assert any("AOF" in w for w in later)


def test_no_durability_warning_with_aof_and_noeviction(
    durable_redis: DurableRedis, smtp_server: SmtpServer, tmp_path: Path, events: Events,
) -> None:
    client = _client(durable_redis.url)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
    mailer = sysmail.Mailer(_config(durable_redis.url, smtp_server.url, tmp_path / "spool"))
    mailer.sender()
    assert events.fields("redis_durability") == []


def test_rate_limits_are_shared_through_redis_and_local_when_it_is_down(
    redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path,
) -> None:
    apps = [sysmail.build_app(_config(redis_server.url, smtp_server.url,
                                      tmp_path / f"spool-{i}",
                                      SYSMAIL_LISTEN=f"{LOCALHOST}:0", SYSMAIL_METRICS_LISTEN=f"{LOCALHOST}:0",
                                      SYSMAIL_FORGOT_LIMIT_PER_CLIENT="3/3600"),
                              store=sysmail.MemoryStore()) for i in range(2)]
    for app in apps:
        app.start()
    try:
        shared = [_forgot(apps[0], "u0@example.org"), _forgot(apps[0], "u1@example.org"),
                  _forgot(apps[1], "u2@example.org"), _forgot(apps[1], "u3@example.org")]
        assert [status for status, _, _ in shared] == [202, 202, 202, 429]
        _, headers, body = shared[3]
        assert body == {"error": "too many requests, try again later"}
        assert 1 <= int(headers["Retry-After"]) <= 3600

        redis_server.stop()  # each host falls back to its own counters
        local = [_forgot(apps[0], f"v{i}@example.org")[0] for i in range(4)]
        assert local == [202, 202, 202, 429]
        assert _forgot(apps[1], "w0@example.org")[0] == 202
    finally:
        for app in apps:
            app.stop()
