"""Promises under faults nobody planned for: a full disk mid-send, a relay's recipient limit."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dkim
import pytest
import redis
from aiosmtpd.smtp import SMTP, Envelope, Session
from conftest import REPO, FakeClock, RedisServer, RsaKey, SmtpServer, SmtpSink, dkim_dns, run_cli

import sysmail

DOMAIN = "example.com"


@pytest.fixture
def small_disk(small_mount: Callable[[str], Path]) -> Path:
    """A 4 MiB tmpfs of its own: a real file system that a test can fill to the brim."""
    return small_mount("size=4m,mode=0700")


def fill(disk: Path) -> Path:
    """Write a filler file until the file system is full; return it (delete it to free)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def rig(spool: Path, server: SmtpServer, clock: FakeClock) -> tuple[sysmail.Mailer,
                                                                     sysmail.Sender]:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": server.url,
                                      "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(spool),
                                      "SYSMAIL_SMTP_CONNECTIONS": "1"})
    mailer = sysmail.Mailer(config, clock=clock)
    return mailer, mailer.sender()


def test_a_full_disk_never_resends_to_recipients_who_accepted(
        small_disk: Path, smtp_server: SmtpServer, caplog: pytest.LogCaptureFixture) -> None:
    """Some recipients accept, one is refused for now, and the copy for the refused one cannot
    be written (disk full): the accepted ones get the message once, however many cycles pass,
    and an error line says what waits in memory; the rest is recorded once the disk has room,
    and delivered then."""
    caplog.set_level(logging.INFO, logger="sysmail")
    clock = FakeClock()
    mailer, sender = rig(small_disk / "spool", smtp_server, clock)
    smtp_server.sink.refuse_rcpt({"busy@example.org": "450 4.2.1 mailbox busy"})
    message_id = mailer.enqueue_message(["ada@example.org", "busy@example.org"], "Invoice",
                                        "Your invoice.")
    [entry] = os.listdir(small_disk / "spool" / "new")
    filler = fill(small_disk)
    try:
        for _ in range(12):
            sender.run_once()
            clock.advance(1)
        assert [m.rcpt_tos for m in smtp_server.messages] == [["ada@example.org"]]
        assert "sysmail_unrecorded_total 1\n" in mailer.metrics.render({})  # once, not 12 times
        [record] = [r for r in caplog.records if r.getMessage() == "unrecorded"]
        assert record.levelno == logging.ERROR
        assert "No space left on device" in record.fields.pop("reason")
        assert record.fields == {
            "id": entry.split(".")[3], "rfcMessageId": message_id, "to": ["busy@example.org"],
            "note": "delivered to the others; kept in memory and recorded again later"}
        assert os.listdir(small_disk / "spool" / "tmp") == []  # no half-written copy
        filler.unlink()
        smtp_server.sink.refuse_rcpt({})
        for _ in range(3):
            clock.advance(30)
            sender.run_once()
    finally:
        sender.close()
    assert [m.rcpt_tos for m in smtp_server.messages] == [["ada@example.org"],
                                                           ["busy@example.org"]]
    assert mailer.spool.counts()["cur"] == 0


class LimitedSink(SmtpSink):
    """A relay that takes at most two recipients a transaction: 452 past that (RFC 5321)."""

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if len(envelope.rcpt_tos) >= 2:
            return "452 4.5.3 Too many recipients"
        return await super().handle_RCPT(server, session, envelope, address, options)


@pytest.fixture
def limited_relay() -> Iterator[SmtpServer]:
    server = SmtpServer("smtp+plain")
    server.sink = LimitedSink()
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_a_relay_recipient_limit_splits_the_transaction(
        limited_relay: SmtpServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A relay answering 452 past its recipient limit gets the rest in new transactions at
    once, costing no attempt (each split is logged at attempt 0 with the relay's reply);
    nobody becomes a dead letter and nobody gets two copies."""
    caplog.set_level(logging.INFO, logger="sysmail")
    clock = FakeClock()
    mailer, sender = rig(tmp_path / "spool", limited_relay, clock)
    rcpts = [f"user{i}@example.org" for i in range(5)]
    mailer.enqueue_message(rcpts, "Notice", "A notice.")
    try:
        counts = sender.run_once()  # no clock advance: the rest goes in the same pass
    finally:
        sender.close()
    assert [m.rcpt_tos for m in limited_relay.messages] == [rcpts[:2], rcpts[2:4], rcpts[4:]]
    split = [(r.fields["to"], r.fields["attempt"], r.fields["code"], r.fields["reason"])
             for r in caplog.records if r.getMessage() == "deferred"]
    assert split == [(rcpts[2:], 0, 452, "452 4.5.3 Too many recipients"),
                     (rcpts[4:], 0, 452, "452 4.5.3 Too many recipients")]
    assert counts.sent == 3
    assert counts.failed == 0 and mailer.spool.failed() == []
    assert mailer.spool.counts() == {**mailer.spool.counts(), "new": 0, "deferred": 0,
                                     "cur": 0, "failed": 0}


# --------------------------------------------------------------------------- forged entries

FORGED_DATA = b"From: ceo@example.com\r\nTo: victim@example.org\r\nSubject: wire the money\r\n\r\nNow.\r\n"


def forged_header(rcpts: list[str], sender: str = f"noreply@{DOMAIN}") -> dict:
    return {"message_id": "<forged@example.com>", "from": sender, "to": rcpts,
            "template": "", "queued_at": 1e9, "expires_at": 9e12}


def plant_in_redis(url: str, ident: str, entry: bytes) -> None:
    """Write an entry straight into the fallback queue, as anyone who can reach Redis could."""
    client = redis.Redis.from_url(url)
    client.hset(f"sysmail:msg:{ident}", mapping={"entry": entry, "priority": 0, "attempt": 0})
    client.zadd("sysmail:queue:0", {ident: 0})


def redis_rig(redis_server: RedisServer, server: SmtpServer, tmp_path: Path,
              key: str) -> tuple[sysmail.Config, sysmail.Sender]:
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": server.url, "SYSMAIL_ALLOW_UNSIGNED": "1",
        "SYSMAIL_SPOOL": str(tmp_path / "spool"), "REDIS_URL": redis_server.url,
        "SYSMAIL_QUEUE_KEY": key})
    return config, sysmail.build_app(config).sender()


def test_entries_planted_in_redis_are_dead_letters_not_mail(
        redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path) -> None:
    """An entry written into Redis without the queue key (any From, any body, a CR LF in the
    recipients) is never sent; it becomes an `unauthenticated` dead letter. The same entry
    under the right key is sent: the check is the key, nothing else."""
    config, sender = redis_rig(redis_server, smtp_server, tmp_path, "k" * 40)
    wrong = sysmail._entry_bytes(forged_header(["victim@example.org\r\nRCPT TO:<x@evil.test>"]),
                                 FORGED_DATA, b"a guess at the key")
    plant_in_redis(redis_server.url, "forged1", wrong)
    right = sysmail._entry_bytes(forged_header(["ok@example.org"]), FORGED_DATA,
                                 config.queue_key)
    plant_in_redis(redis_server.url, "genuine1", right)
    try:
        sender.run_once()
    finally:
        sender.close()
    assert [m.rcpt_tos for m in smtp_server.messages] == [["ok@example.org"]]
    letters = sender.fallback.failed()
    assert [(d["id"], d["reason"]) for d in letters] == [("forged1", "unauthenticated")]


def test_an_authentic_entry_must_still_be_from_the_brand_to_plain_addresses(
        redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path) -> None:
    """Even under the right key (a leaked one), From must be SYSTEM_FROM and every recipient
    one plain address: such an entry is refused, not sent."""
    config, sender = redis_rig(redis_server, smtp_server, tmp_path, "k" * 40)
    for ident, header in (("othersender", forged_header(["a@example.org"], "ceo@example.com")),
                          ("crlf", forged_header(["a@example.org\r\nRCPT TO:<x@evil.test>"]))):
        plant_in_redis(redis_server.url, ident,
                       sysmail._entry_bytes(header, FORGED_DATA, config.queue_key))
    try:
        sender.run_once()
    finally:
        sender.close()
    assert smtp_server.messages == []
    assert sorted((d["id"], d["reason"]) for d in sender.fallback.failed()) == [
        ("crlf", "unauthenticated"), ("othersender", "unauthenticated")]


def test_a_truncated_spool_entry_is_never_sent(smtp_server: SmtpServer, tmp_path: Path) -> None:
    """A spool file cut short (a disk that filled under an older writer, a bad copy) fails its
    MAC: a dead letter, never a message with half a body."""
    clock = FakeClock()
    mailer, sender = rig(tmp_path / "spool", smtp_server, clock)
    mailer.enqueue_message("ada@example.org", "Invoice", "Line one.\n" * 200)
    (path,) = (tmp_path / "spool" / "new").iterdir()
    path.write_bytes(path.read_bytes()[:-700])
    try:
        sender.run_once()
    finally:
        sender.close()
    assert smtp_server.messages == []
    assert [d["reason"] for d in mailer.spool.failed()] == ["unauthenticated"]


# --------------------------------------------------------------------------- wake-ups

SEND_DATAGRAMS = """
import os, socket, sys
if len(sys.argv) > 3:
    os.setgid(65534); os.setuid(65534)  # nobody: another local user
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    for _ in range(int(sys.argv[2])):
        sock.sendto(sys.argv[1].encode(), "\\0sysmail-wake-" + os.environ["LISTENER"])
"""


def send_wakeups(tmp_path: Path, listener: str, entry: str, count: int, as_nobody: bool) -> None:
    script = tmp_path / "wake.py"
    script.write_text(SEND_DATAGRAMS, encoding="utf-8")
    args = [sys.executable, str(script), entry, str(count)] + (["nobody"] if as_nobody else [])
    subprocess.run(args, env={"LISTENER": listener}, check=True, timeout=30)


def test_wake_ups_come_only_from_the_same_user_and_cost_a_lookup(tmp_path: Path) -> None:
    """Another local user's datagrams are dropped; names that are not in new/ are dropped
    after one lookup; a real entry from the service's own user wakes the sender."""
    if os.getuid() != 0:
        pytest.skip("needs root to send as another user")
    spool = sysmail.Spool(tmp_path / "spool")
    woken = threading.Semaphore(0)
    listener = spool.listen(woken.release)
    assert listener is not None
    try:
        (tmp_path / "spool").chmod(0o755)  # let nobody's interpreter start; the socket is abstract
        ident = spool.enqueue({"message_id": "<w@example.com>", "from": "a@example.com",
                               "to": ["b@example.org"], "template": "", "queued_at": 0,
                               "expires_at": 9e12}, b"Subject: x\r\n\r\nx\r\n", sysmail.BULK)
        (entry,) = os.listdir(tmp_path / "spool" / "new")
        assert ident in entry
        while woken.acquire(blocking=False):
            pass  # the enqueue's own wake-up, called in this thread
        send_wakeups(tmp_path, listener.name, entry, 200, as_nobody=True)
        send_wakeups(tmp_path, listener.name, "1.00000000000001.0.doesnotexist", 200,
                     as_nobody=False)
        send_wakeups(tmp_path, listener.name, entry, 1, as_nobody=False)  # the one that counts
        assert woken.acquire(timeout=5)
        # datagrams are received in order: the foreign and fake ones came before this one
        assert not woken.acquire(blocking=False), "a foreign or fake datagram woke the sender"
    finally:
        listener.close()


# --------------------------------------------------------------------------- idempotency

API_KEY = "k" * 32


def send_request(key: str) -> sysmail.Request:
    body = json.dumps({"template": "two-factor-code", "to": "ada@example.org",
                       "vars": {"code": "123456"}}).encode()
    return sysmail.Request("POST", "/v1/emails", {}, {
        "Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json",
        "Idempotency-Key": key}, body, "127.0.0.1")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_key_that_cannot_be_kept_is_released_not_wedged(
        small_disk: Path, redis_server: RedisServer) -> None:
    """The spool's disk is full, Redis takes the mail: the answer is 202 with the Message-ID,
    the key is released (a retry queues again rather than answering 409 for a day), and no
    file descriptor leaks."""
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(small_disk / "spool"),
        "REDIS_URL": redis_server.url, "SYSMAIL_API_KEY": API_KEY})
    app = sysmail.build_app(config, store=sysmail.MemoryStore())
    assert app.spool.writable()  # its folders exist before the disk fills
    filler = fill(small_disk)
    replies = [app.api.handle(send_request("order-42"))]  # opens Redis and the wake-up socket
    before = open_fds()
    replies += [app.api.handle(send_request("order-42")) for _ in range(2)]
    assert [r.status for r in replies] == [202, 202, 202]
    ids = [json.loads(r.body)["messageId"] for r in replies]
    assert len(set(ids)) == 3  # released each time: never a 409, never a 500
    assert app.fallback.counts()["new"] == 3
    assert open_fds() == before
    filler.unlink()
    first = app.api.handle(send_request("order-43"))
    again = app.api.handle(send_request("order-43"))
    assert json.loads(again.body) == {**json.loads(first.body), "duplicate": True}


def test_a_key_taken_by_a_request_that_died_is_taken_over(tmp_path: Path) -> None:
    """An empty key file (its request died between taking the key and binding it) blocks the
    key only while that request could still be running, then a retry takes it over."""
    clock = FakeClock()
    keys = sysmail.IdempotencyKeys(tmp_path / "keys", clock)
    (tmp_path / "keys").mkdir()
    taken = tmp_path / "keys" / hashlib.sha256(b"order-7").hexdigest()
    taken.touch()
    os.utime(taken, (clock(), clock()))
    with pytest.raises(sysmail.HttpError) as busy:
        keys.remember("order-7", lambda: "<new@example.com>")
    assert busy.value.status == 409
    clock.advance(31)
    assert keys.remember("order-7", lambda: "<new@example.com>") == ("<new@example.com>", True)
    assert keys.remember("order-7", lambda: "<other@example.com>") == ("<new@example.com>", False)


# --------------------------------------------------------------------------- live credentials

RESET_LINK = "https://dashboard.example.com/reset-password?token=" + "S3cr3tT0ken" * 4


def every_byte(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.rglob("*") if p.is_file())


def test_a_rejected_reset_mail_leaves_no_working_link_behind(
        smtp_server: SmtpServer, tmp_path: Path) -> None:
    """A reset mail refused with 550 becomes a dead letter that keeps enough to diagnose (who,
    which template, the relay's reply) and not the link; it cannot be retried into a mail
    without its link, and it is removed once its retention has passed."""
    clock = FakeClock(time.time())
    mailer, sender = rig(tmp_path / "spool", smtp_server, clock)
    smtp_server.sink.refuse_rcpt({"ada@example.org": "550 5.1.1 no such user"})
    mailer.enqueue("password-reset", to="ada@example.org", reset_url=RESET_LINK)
    mailer.enqueue("two-factor-code", to="ada@example.org", code="913377")
    try:
        sender.run_once()
    finally:
        sender.close()
    spool = tmp_path / "spool"
    assert b"S3cr3tT0ken" not in every_byte(spool) and b"913377" not in every_byte(spool)
    letters = mailer.spool.failed()
    assert sorted((d["template"], d["code"], d["redacted"]) for d in letters) == [
        ("password-reset", 550, True), ("two-factor-code", 550, True)]
    assert mailer.spool.retry() == []
    clock.advance(15 * 86400)
    assert mailer.spool.clean_failed(14 * 86400) == 2
    assert mailer.spool.failed() == []


def test_redis_dead_letters_are_redacted_and_expire(
        redis_server: RedisServer, smtp_server: SmtpServer, tmp_path: Path) -> None:
    """In Redis too: no link in the dead letter, and the dead letter has an expiry."""
    spool = tmp_path / "spool"
    spool.write_bytes(b"not a folder\n")  # the spool cannot be written: Redis takes the mail
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": smtp_server.url, "SYSMAIL_ALLOW_UNSIGNED": "1",
        "SYSMAIL_SPOOL": str(spool), "REDIS_URL": redis_server.url,
        "SYSMAIL_DEAD_LETTER_DAYS": "2"})
    app = sysmail.build_app(config)
    smtp_server.sink.refuse_rcpt({"ada@example.org": "550 5.1.1 no such user"})
    app.enqueuer.enqueue_template("password-reset", "ada@example.org",
                                  {"reset_url": RESET_LINK})
    sender = app.sender()
    try:
        sender.run_once()
    finally:
        sender.close()
    client = redis.Redis.from_url(redis_server.url)
    keys = client.keys("sysmail:msg:*")
    assert keys and all(b"S3cr3tT0ken" not in b"".join(client.hvals(k)) for k in keys)
    assert all(0 < client.ttl(k) <= 2 * 86400 for k in keys)
    assert [d["redacted"] for d in app.fallback.failed()] == [True]


# --------------------------------------------------------------------------- smaller promises

def long_values(template: sysmail.Template) -> dict[str, str]:
    """Each variable at a length a careless caller might send: URLs of 1,500 characters,
    texts of 300 words, one 1,200-character word in every text."""
    values = {}
    for name in template.variables:
        if name.endswith("_url"):
            values[name] = "https://dashboard.example.com/" + "a" * 1500
        elif name.endswith("_email"):
            values[name] = "a" * 64 + "@" + "b" * 60 + ".example.com"
        elif name in ("code", "expires_minutes"):
            values[name] = template.samples.get(name) or template.defaults[name]
        else:
            values[name] = " ".join(["word"] * 300) + " " + "x" * 1200
    return values


@pytest.mark.parametrize("name", sorted(sysmail.TEMPLATES))
def test_no_header_line_is_longer_than_998_characters(
        name: str, smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey) -> None:
    """Each template with its longest variables either is refused at enqueue (MessageError,
    so exit 65 or 400) or reaches the relay with every line within 998 characters and a DKIM
    signature that verifies."""
    config = sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": smtp_server.url, "SYSMAIL_SPOOL": str(tmp_path),
        "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem})
    app = sysmail.build_app(config)
    try:
        app.enqueuer.enqueue_template(name, "ada@example.org", long_values(
            sysmail.TEMPLATES[name]))
    except sysmail.MessageError as refused:
        assert "998" in str(refused)
        return
    sender = app.sender()
    try:
        sender.run_once()
    finally:
        sender.close()
    (received,) = smtp_server.messages
    assert max(len(line) for line in received.data.split(b"\r\n")) <= 998
    assert dkim.verify(received.data, dnsfunc=dkim_dns({
        f"default._domainkey.{DOMAIN}": rsa_key.dns_record}))


def test_a_subject_word_too_long_to_fold_is_refused(tmp_path: Path) -> None:
    mailer = sysmail.Mailer(sysmail.Config.from_env({"SYSMAIL_SPOOL": str(tmp_path)}))
    with pytest.raises(sysmail.MessageError, match="998"):
        mailer.enqueue_message("ada@example.org", "x" * 1200, "text")
    assert os.listdir(tmp_path / "new") == [] and os.listdir(tmp_path / "tmp") == []


def test_recipients_are_capped_for_the_cli_and_mailer_like_http(tmp_path: Path) -> None:
    env = {"SYSMAIL_SPOOL": str(tmp_path / "spool")}
    mailer = sysmail.Mailer(sysmail.Config.from_env(env))
    many = [f"user{i}@example.org" for i in range(51)]
    with pytest.raises(sysmail.MessageError, match="1 to 50 recipients"):
        mailer.enqueue_message(many, "Hello", "Text.")
    assert mailer.enqueue_message(many[:50], "Hello", "Text.")
    result = run_cli(["send", *[f"--to={a}" for a in many], "--subject", "S", "--text", "T"],
                     env)
    assert result.returncode == 65 and "Traceback" not in result.stderr


def test_bad_text_from_the_command_line_or_mailer_is_a_data_error(tmp_path: Path) -> None:
    env = {"SYSMAIL_SPOOL": str(tmp_path / "spool")}
    mailer = sysmail.Mailer(sysmail.Config.from_env(env))
    for bad in ({"to": None, "subject": "S", "text": "T"},
                {"to": 42, "subject": "S", "text": "T"},
                {"to": "ada@example.org", "subject": "caf\udce9", "text": "T"},
                {"to": "ada@example.org", "subject": "S", "text": b"bytes"}):
        with pytest.raises(sysmail.MessageError):
            mailer.enqueue_message(**bad)
    with pytest.raises(sysmail.MessageError):
        mailer.enqueue("two-factor-code", to="ada@example.org", code="12\udcff34")
    script = tmp_path / "argv.py"
    script.write_text(f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\n"
                      "import sysmail\nsys.exit(sysmail.main(['send', '--to', "
                      "'ada@example.org', '--subject', os.fsdecode(b'caf\\xe9'), "
                      "'--text', 'T']))\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(script)], env={**env, "PATH": "/usr/bin"},
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 65, result.stderr
    assert "Traceback" not in result.stderr and "valid UTF-8" in result.stderr


def test_a_fifo_in_the_spool_never_blocks_the_worker(smtp_server: SmtpServer,
                                                     tmp_path: Path) -> None:
    """A FIFO (or socket, or device) with an entry's name is set aside as a dead letter;
    `worker --once` finishes and the real mail goes out."""
    env = {"SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": smtp_server.url, "SYSMAIL_ALLOW_UNSIGNED": "1",
           "SYSMAIL_SPOOL": str(tmp_path / "spool")}
    mailer = sysmail.Mailer(sysmail.Config.from_env(env))
    os.mkfifo(tmp_path / "spool" / "new" / "0.00000000000001.0.fifo0001")
    mailer.enqueue_message("ada@example.org", "Hello", "Text.")
    result = run_cli(["worker", "--once"], env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert [m.rcpt_tos for m in smtp_server.messages] == [["ada@example.org"]], (
        result.stdout, result.stderr)
    assert [d["id"] for d in mailer.spool.failed()] == ["fifo0001"]


def test_sqlite_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    script = tmp_path / "store.py"
    script.write_text(
        f"import os, sys\nsys.path.insert(0, {str(REPO)!r})\nos.umask(0)\nimport sysmail\n"
        "store = sysmail.SqliteStore(sys.argv[1])\nstore.add_user('ada@example.org')\n"
        "print(sorted(oct(os.stat(p).st_mode & 0o777) for p in "
        "(sys.argv[1], sys.argv[1] + '-wal', sys.argv[1] + '-shm')))\n", encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "users.db")],
                            capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == str(["0o600"] * 3)


@pytest.mark.parametrize("flaw", ["writable-by-others", "symlinked-subfolder"])
def test_a_spool_others_could_tamper_with_is_refused_at_start(flaw: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    sysmail.Spool(spool)
    if flaw == "writable-by-others":
        spool.chmod(0o777)
    else:
        (tmp_path / "elsewhere").mkdir()
        os.rmdir(spool / "new")
        os.symlink(tmp_path / "elsewhere", spool / "new")
    result = run_cli(["worker"], {"SYSMAIL_SPOOL": str(spool)}, timeout=30)
    assert result.returncode == 78, result.stderr
    assert "Traceback" not in result.stderr
    assert ("writable by other users" if flaw == "writable-by-others"
            else "symbolic link") in result.stderr


class StallingSink(SmtpSink):
    """A relay that takes the content and then never answers it."""

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.data_attempts += 1
        await asyncio.sleep(120)
        return "250 OK"


def test_sigterm_stops_a_worker_whose_relay_stalls(tmp_path: Path) -> None:
    """SIGTERM while the relay sits on the final reply: the worker exits within seconds, not
    after the SMTP timeout, and the message stays queued."""
    relay = SmtpServer("smtp+plain")
    relay.sink = StallingSink()
    relay.start()
    env = {"SYSTEM_DOMAIN": DOMAIN, "SMTP_URL": relay.url, "SYSMAIL_ALLOW_UNSIGNED": "1",
           "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SMTP_TIMEOUT_SECONDS": "60",
           "PATH": "/usr/bin:/bin"}
    sysmail.Mailer(sysmail.Config.from_env(env)).enqueue_message("ada@example.org", "S", "T")
    worker = subprocess.Popen([sys.executable, str(REPO / "sysmail.py"), "worker"], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while relay.sink.data_attempts == 0:
            assert time.monotonic() < deadline, "the content never reached the relay"
            time.sleep(0.05)
        started = time.monotonic()
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=20) == 0
        assert time.monotonic() - started < 20  # the SMTP timeout is 60 s
    finally:
        if worker.poll() is None:
            worker.kill()
        relay.stop()
    counts = sysmail.Spool(tmp_path / "spool").counts()
    assert (counts["new"], counts["cur"], counts["failed"]) == (1, 0, 0)


COUNT_WITH_AUDIT = """
import sys, time
sys.path.insert(0, sys.argv[2])
import sysmail
root = sys.argv[1]
spool = sysmail.Spool(root)
for number in range(50_000):  # names only: counting never opens an entry
    open(f"{root}/new/1.{9999999999999 - number:014d}.0.id{number}", "w").close()
states = ("new", "deferred", "cur", "failed")
first = {k: v for k, v in spool.counts().items() if k in states}
settle = sysmail.CENSUS_SETTLED_NS / 1e9 + 0.1
time.sleep(settle)  # a precondition, not a proof: the folders' mtimes settle
listings = []
sys.addaudithook(lambda event, args: event in ("os.listdir", "os.scandir")
                 and listings.append(event))
again = {k: v for k, v in spool.counts().items() if k in states}
print(first, again, len(listings))
open(f"{root}/new/0.00000000000001.0.idextra", "w").close()
time.sleep(settle)
deadline = time.monotonic() + 60  # a folder slow to read (a loaded machine) is read again
while spool.counts()["new"] != 1 and time.monotonic() < deadline:  # after its throttle
    time.sleep(0.1)
print(spool.counts()["new"], len(listings))
"""


def test_counting_a_large_settled_queue_reads_no_folder(tmp_path: Path) -> None:
    """/metrics and status count from a census of each spool folder, read again only when the
    folder changed: with 50,000 messages waiting, a second count lists no folder at all, and a
    change is seen once it has settled."""
    script = tmp_path / "count.py"
    script.write_text(COUNT_WITH_AUDIT, encoding="utf-8")
    result = subprocess.run([sys.executable, str(script), str(tmp_path / "spool"), str(REPO)],
                            capture_output=True, text=True, timeout=120, check=True)
    counts = "{'new': 0, 'deferred': 50000, 'cur': 0, 'failed': 0}"
    assert result.stdout.splitlines() == [f"{counts} {counts} 0", "1 1"]
