"""Many messages at once: Mailer.enqueue_many (announcements) and group commit (concurrent
enqueues share their syncs), each still durable before the caller hears "queued" (issue 14)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, RedisServer, SmtpServer, run_cli
from test_durability_syscalls import (  # the strace machinery of the durability tests
    STRACE,
    WRITES,
    Step,
    first_index,
    marker,
    moved_into,
    opened_dir,
    run_snippet,
    synced,
)
from test_http_api import (  # its HTTP client and started-service fixture
    error_reply,
    http_call,
    json_reply,
    make_service,  # noqa: F401  (the started-service fixture)
    wait_mails,
)

import sysmail

DOMAIN = "example.com"
ANNOUNCEMENT = {"title": "Maintenance", "body": "We will be down for an hour."}


def mailer(spool: Path, **env: str) -> sysmail.Mailer:
    return sysmail.Mailer(sysmail.Config.from_env({
        "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(spool), **env}))


def spooled(spool: Path) -> list[sysmail.SpooledMessage]:
    queue = sysmail.Spool(spool)
    claims, _ = queue.claim(10_000)
    return [queue.read(claim) for claim in claims]


def test_enqueue_many_queues_one_message_per_recipient_with_its_own_variables(
        tmp_path: Path) -> None:
    """300 recipients (two batches): 300 Message-IDs in order, each message to its own
    recipient alone, with its own variables over the shared ones."""
    target = mailer(tmp_path / "spool")
    recipients = [f"user{n}@example.org" if n % 2 else {"to": f"user{n}@example.org",
                                                         "name": f"Person {n}"}
                  for n in range(300)]
    ids = target.enqueue_many("service-announcement", recipients, **ANNOUNCEMENT)
    assert len(ids) == len(set(ids)) == 300
    messages = {m.message_id: m for m in spooled(tmp_path / "spool")}
    assert set(messages) == set(ids)
    for number in (0, 1, 256, 299):
        message = messages[ids[number]]
        assert message.rcpts == (f"user{number}@example.org",)
        greeting = f"Hi Person {number}," if number % 2 == 0 else "Hi there,"
        assert greeting.encode() in message.data, message.data[:600]
        assert b"We will be down for an hour." in message.data


@pytest.mark.parametrize("bad", [{"to": "not an address"}, {"to": "x@example.org", "nope": "1"},
                                 {"to": "x@example.org", "title": ""}])
def test_one_bad_recipient_anywhere_queues_nothing(bad: dict, tmp_path: Path) -> None:
    """A bad address, an unknown variable or a missing required one in the 290th recipient:
    a MessageError naming it, and not one message queued."""
    target = mailer(tmp_path / "spool")
    recipients: list = [f"user{n}@example.org" for n in range(289)] + [bad, "last@example.org"]
    with pytest.raises(sysmail.MessageError):
        target.enqueue_many("service-announcement", recipients, **ANNOUNCEMENT)
    assert spooled(tmp_path / "spool") == []


@pytest.fixture
def tiny_disk(small_mount: Callable[[str], Path]) -> Path:
    """A 1 MiB tmpfs: room for a few hundred messages, not a thousand."""
    return small_mount("size=1m,mode=0700")


def test_a_disk_that_fills_mid_batch_says_exactly_what_was_queued(tiny_disk: Path) -> None:
    """The disk fills during the batch: QueueUnavailable whose `queued` lists the Message-IDs
    queued, a prefix of the recipients; exactly those are in the spool, whole, and no
    half-written file stays in tmp/. Resuming after them queues each recipient once."""
    target = mailer(tiny_disk / "spool")
    recipients = [f"user{n}@example.org" for n in range(2000)]
    with pytest.raises(sysmail.QueueUnavailable) as failure:
        target.enqueue_many("service-announcement", recipients, **ANNOUNCEMENT)
    queued = failure.value.queued
    assert 0 < len(queued) < 2000
    messages = spooled(tiny_disk / "spool")
    assert sorted(m.message_id for m in messages) == sorted(queued)
    assert sorted(m.rcpts[0] for m in messages) == sorted(recipients[:len(queued)])
    assert list((tiny_disk / "spool" / "tmp").iterdir()) == []


def test_with_redis_a_full_disk_sends_the_rest_of_the_batch_to_redis(
        tiny_disk: Path, redis_server: RedisServer) -> None:
    """With the Redis fallback, the batch is queued whole: the spool's share and then Redis."""
    target = mailer(tiny_disk / "spool", REDIS_URL=redis_server.url)
    ids = target.enqueue_many("service-announcement",
                              [f"user{n}@example.org" for n in range(1500)], **ANNOUNCEMENT)
    assert len(set(ids)) == 1500
    in_spool = len(spooled(tiny_disk / "spool"))
    in_redis = target.fallback.counts()["new"]
    assert in_spool > 0 and in_redis > 0 and in_spool + in_redis == 1500


def test_a_batch_reaches_the_relay(smtp_server: SmtpServer, tmp_path: Path) -> None:
    target = mailer(tmp_path / "spool", SMTP_URL=smtp_server.url, SYSMAIL_ALLOW_UNSIGNED="1")
    target.enqueue_many("service-announcement", [f"u{n}@example.org" for n in range(20)],
                        **ANNOUNCEMENT)
    sender = target.sender()
    try:
        assert sender.run_once().sent == 20
    finally:
        sender.close()
    assert sorted(m.rcpt_tos[0] for m in smtp_server.messages) == sorted(
        f"u{n}@example.org" for n in range(20))


# --------------------------------------------------------------------------- durability


@pytest.mark.skipif(not STRACE.exists(), reason=f"{STRACE} is not installed")
def test_a_batch_is_on_disk_before_enqueue_many_returns(tmp_path: Path) -> None:
    """Under strace: every file of the batch written, then one sync of their file system
    (syncfs on one of them) after the last write, then each renamed into new/, then new/ fsynced once: all
    before enqueue_many returns."""
    spool = tmp_path / "spool"
    trace = run_snippet(tmp_path, f"""
        mailer = sysmail.Mailer(sysmail.Config.from_env({{"SYSMAIL_SPOOL": {str(spool)!r}}}))
        mark("BEGIN")
        mailer.enqueue_many("service-announcement", ["a@example.org", "b@example.org",
                            "c@example.org"], title="T", body="B")
        mark("STORED")
    """)
    events = trace.events
    stored = first_index(events, marker("STORED"))
    names = sorted((spool / "new").iterdir())
    assert len(names) == 3 and stored is not None
    sources = [moved_into(events, new) for new in names]
    last_write = max(i for i, e in enumerate(events)
                     if e.name in WRITES and e.paths and Path(e.paths[0]) in sources)
    sync = first_index(events, Step("syncfs of the batch's file system", lambda e: (
        e.name == "syncfs" and e.ok and bool(e.paths) and Path(e.paths[0]) in sources)),
        last_write)
    assert sync is not None, "no syncfs after the last write"
    moves = [first_index(events, Step("move", lambda e, s=s, n=n: e.paths == (str(s), str(n))))
             for s, n in zip(sources, names, strict=True)]
    assert all(m is not None and sync < m for m in moves)
    opened = first_index(events, opened_dir(spool / "new"), max(moves))
    assert opened is not None
    folder_sync = first_index(events, synced(spool / "new"), opened)
    assert folder_sync is not None and folder_sync < stored


@pytest.mark.skipif(not STRACE.exists(), reason=f"{STRACE} is not installed")
def test_concurrent_enqueues_each_return_only_once_durable(tmp_path: Path) -> None:
    """Eight threads enqueue at once (group commit): for each message, its data is synced
    (its own fsync, or a syncfs after its last write) before its rename into new/, and new/
    is fsynced after that rename and before the thread is told "queued"."""
    spool = tmp_path / "spool"
    trace = run_snippet(tmp_path, f"""
        import threading
        queue = sysmail.Spool({str(spool)!r})
        header = {{"message_id": "<m@example.com>", "from": "noreply@example.com",
                  "to": ["a@example.org"], "template": "", "queued_at": 0, "expires_at": 9e9}}
        gate = threading.Barrier(8)
        def one():
            gate.wait()
            ident = queue.enqueue(header, b"Subject: x\\r\\n\\r\\nbody\\r\\n", 1)
            mark("STORED " + ident)
        mark("BEGIN")
        threads = [threading.Thread(target=one) for _ in range(8)]
        for thread in threads: thread.start()
        for thread in threads: thread.join()
    """)
    events = trace.events
    for new in sorted((spool / "new").iterdir()):
        ident = sysmail.SpoolName.parse(new.name).id
        tmp = moved_into(events, new)
        move = first_index(events, Step("move", lambda e, t=tmp, n=new: e.paths == (str(t), str(n))))
        last_write = max(i for i, e in enumerate(events[:move])
                         if e.name in WRITES and e.paths == (str(tmp),))
        data_sync = first_index(events, Step("sync", lambda e, t=tmp: e.ok and (
            e.name == "syncfs" or (e.name == "fsync" and e.paths == (str(t),)))), last_write)
        assert data_sync is not None and data_sync < move, f"{ident}: data not synced"
        stored = first_index(events, marker(f"STORED {ident}"))
        folder_sync = first_index(events, synced(spool / "new"), move)
        assert stored is not None and folder_sync is not None and folder_sync < stored, ident
    assert len(list((spool / "new").iterdir())) == 8


# --------------------------------------------------------------------------- group commit


def test_callers_waiting_during_a_flush_share_the_next_one() -> None:
    """While one flush runs, five more callers arrive: the next flush takes all five items
    at once, and each caller returns only after the flush that holds its item."""
    flushed: list[list[int]] = []
    running, release = threading.Event(), threading.Event()

    def flush(items: list[int]) -> None:
        flushed.append(list(items))
        if len(flushed) == 1:
            running.set()
            release.wait(10)

    group = sysmail._GroupSync(flush)
    done: list[int] = []
    first = threading.Thread(target=lambda: (group.wait(0), done.append(0)))
    first.start()
    assert running.wait(10)
    others = [threading.Thread(target=lambda n=n: (group.wait(n), done.append(n)))
              for n in range(1, 6)]
    for thread in others:
        thread.start()
    while len(group._pending) < 5:  # all five are waiting behind the running flush
        threading.Event().wait(0.001)
    assert done == []
    release.set()
    for thread in (first, *others):
        thread.join(10)
    assert flushed[0] == [0] and sorted(flushed[1]) == [1, 2, 3, 4, 5] and len(flushed) == 2
    assert sorted(done) == [0, 1, 2, 3, 4, 5]


def test_a_failed_flush_fails_every_caller_of_its_round_and_the_next_round_works() -> None:
    calls: list[list[int]] = []

    def flush(items: list[int]) -> None:
        calls.append(items)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    group = sysmail._GroupSync(flush)
    with pytest.raises(OSError):
        group.wait(1)
    group.wait(2)
    assert calls == [[1], [2]]


def test_every_caller_whose_item_was_in_a_failed_flush_gets_its_error() -> None:
    """Three callers wait behind a running flush; the flush that takes their items fails:
    each of the three gets the error (none returns as if its message were durable). After
    70 failed rounds the errors kept are the last 64, and each round still fails alone."""
    calls: list[list[int]] = []
    running, release = threading.Event(), threading.Event()

    def flush(items: list[int]) -> None:
        calls.append(sorted(items))
        if len(calls) == 1:
            running.set()
            release.wait(10)
            return
        raise OSError(5, "Input/output error")

    group = sysmail._GroupSync(flush)
    first = threading.Thread(target=group.wait, args=(0,))
    first.start()
    assert running.wait(10)
    outcomes: dict[int, object] = {}

    def caller(item: int) -> None:
        try:
            group.wait(item)
            outcomes[item] = "durable"
        except OSError as exc:
            outcomes[item] = exc.errno

    others = [threading.Thread(target=caller, args=(n,)) for n in (1, 2, 3)]
    for thread in others:
        thread.start()
    while len(group._pending) < 3:  # all three are waiting behind the running flush
        threading.Event().wait(0.001)
    release.set()
    for thread in (first, *others):
        thread.join(10)
    assert calls[:2] == [[0], [1, 2, 3]]
    assert outcomes == {1: 5, 2: 5, 3: 5}
    for item in range(70):
        with pytest.raises(OSError):
            group.wait(item)
    assert len(group._errors) == 64


# --------------------------------------------------------------------------- over HTTP


def test_the_batch_form_of_post_v1_emails(make_service, smtp_server: SmtpServer) -> None:  # noqa: F811
    """"recipients" instead of "to": one message per recipient, each with its own vars,
    202 with the Message-IDs in order; an Idempotency-Key makes a retried batch a no-op;
    a batch larger than 16 KiB is accepted from a caller holding the key, and only from it."""
    svc = make_service()
    recipients = [{"to": f"user{n}@example.org", "vars": {"name": f"P{n}"}} for n in range(3)]
    payload = {"template": "service-announcement", "vars": ANNOUNCEMENT,
               "recipients": [*recipients, "plain@example.org"]}
    body = json_reply(svc.send(payload, {"Idempotency-Key": "batch-1"}), 202)
    assert len(body["messageIds"]) == 4 and body["duplicate"] is False
    again = json_reply(svc.send(payload, {"Idempotency-Key": "batch-1"}), 202)
    assert again == {**body, "duplicate": True}
    mails = wait_mails(smtp_server, 4)
    by_recipient = {m["To"].addresses[0].addr_spec: m for m in mails}
    assert set(by_recipient) == {"user0@example.org", "user1@example.org", "user2@example.org",
                                 "plain@example.org"}
    assert [m["Message-ID"] for m in mails
            if m["To"].addresses[0].addr_spec == "user1@example.org"] == [body["messageIds"][1]]
    big = {**payload, "recipients": [f"u{n}@example.org" for n in range(1000)]}  # ~22 KiB
    assert len(json.dumps(big)) > sysmail.MAX_BODY_BYTES
    assert len(json_reply(svc.send(big), 202)["messageIds"]) == 1000
    refused = http_call(svc.url, "POST", "/v1/emails", big, {"Authorization": "Bearer wrong"})
    assert refused.status == 413  # unread: a stranger may not send a large body


@pytest.mark.parametrize("recipients", [[], "ada@example.org", [{"to": 3}], [["a@b.org"]],
                                        ["ada@example.org", "not an address"]])
def test_a_bad_batch_is_a_400_and_queues_nothing(make_service, recipients: object) -> None:  # noqa: F811
    svc = make_service()
    reply = svc.send({"template": "service-announcement", "vars": ANNOUNCEMENT,
                      "recipients": recipients})
    assert error_reply(reply, 400)
    assert svc.app.spool.counts()["new"] == 0


# --------------------------------------------------------------------------- send --to-file


def test_send_to_file_queues_one_mail_per_csv_row_with_its_variables(tmp_path: Path) -> None:
    """A CSV with a header: email, then variables and a locale per row; one Message-ID a row
    on stdout, each mail in its recipient's language with its own name."""
    rows = ["email,name,locale", "ada@example.org,Ada,de", "bob@example.org,Bob,"]
    (tmp_path / "users.csv").write_text("\n".join(rows) + "\n")
    env = {"SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSTEM_DOMAIN": DOMAIN}
    result = run_cli(["send", "--to-file", str(tmp_path / "users.csv"), "--template",
                      "service-announcement", "--var", "title=Wartung", "--var", "body=B."], env)
    assert result.returncode == 0, result.stderr
    ids = result.stdout.split()
    messages = {m.message_id: m for m in spooled(tmp_path / "spool")}
    assert list(messages) and set(messages) == set(ids) and len(ids) == 2
    ada, bob = messages[ids[0]], messages[ids[1]]
    assert ada.rcpts == ("ada@example.org",) and b'lang="de"' in ada.data and b"Ada" in ada.data
    assert bob.rcpts == ("bob@example.org",) and b'lang="en"' in bob.data and b"Bob" in bob.data


def test_send_to_file_with_one_bad_line_queues_nothing(tmp_path: Path) -> None:
    (tmp_path / "list.txt").write_text("a@example.org\n# a comment\n\nnot an address\n")
    env = {"SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSTEM_DOMAIN": DOMAIN}
    result = run_cli(["send", "--to-file", str(tmp_path / "list.txt"), "--template",
                      "service-announcement", "--var", "title=T", "--var", "body=B"], env)
    assert result.returncode == 65 and "Traceback" not in result.stderr
    assert "not an address" in result.stderr
    assert spooled(tmp_path / "spool") == []


def test_send_to_file_on_a_full_disk_says_how_to_resume(tiny_disk: Path) -> None:
    """The disk fills: exit 75, stdout holds the Message-IDs queued (the first recipients),
    stderr the --skip that resumes; with room again, the resumed run queues the rest, and
    every recipient has exactly one mail."""
    recipients = [f"user{n}@example.org" for n in range(2000)]
    (tiny_disk.parent / "list.txt").write_text("\n".join(recipients) + "\n")
    env = {"SYSMAIL_SPOOL": str(tiny_disk / "spool"), "SYSTEM_DOMAIN": DOMAIN}
    command = ["send", "--to-file", str(tiny_disk.parent / "list.txt"), "--template",
               "service-announcement", "--var", "title=T", "--var", "body=B"]
    first = run_cli(command, env)
    assert first.returncode == 75 and "Traceback" not in first.stderr
    done = first.stdout.split()
    assert 0 < len(done) < 2000 and f"--skip {len(done)}" in first.stderr
    subprocess.run(["mount", "-o", "remount,size=16m", str(tiny_disk)], check=True)
    second = run_cli([*command, "--skip", str(len(done))], env)
    assert second.returncode == 0, second.stderr
    messages = spooled(tiny_disk / "spool")
    assert sorted(m.rcpts[0] for m in messages) == sorted(recipients)
    assert sorted(m.message_id for m in messages) == sorted(done + second.stdout.split())


def test_send_to_file_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """stderr on a terminal (a real pty) shows how many are queued; stdout stays the IDs."""
    import pty
    (tmp_path / "list.txt").write_text("\n".join(f"u{n}@example.org" for n in range(600)))
    main, child = pty.openpty()
    env = {"PATH": os.environ["PATH"], "SYSMAIL_SPOOL": str(tmp_path / "spool"),
           "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_LOG_LEVEL": "warning"}
    result = subprocess.run([sys.executable, str(REPO / "sysmail.py"), "send", "--to-file",
                             str(tmp_path / "list.txt"), "--template", "service-announcement",
                             "--var", "title=T", "--var", "body=B"], env=env, stderr=child,
                            stdout=subprocess.PIPE, text=True, timeout=60, check=False)
    os.close(child)
    shown = os.read(main, 65536).decode()
    os.close(main)
    assert result.returncode == 0
    assert "queued 256 of 600" in shown and "queued 600 of 600" in shown
    assert len(result.stdout.split()) == 600
