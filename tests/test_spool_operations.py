"""What operators rely on from the spool, called in-process (issue 15).

`sysmail queue`, `show`, `delete` and `status` reach Spool.entries, messages, peek, delete and
counts from a subprocess (tests/test_day_two.py), where mutation testing cannot see them; these
tests call the same methods directly, on a real spool folder with the injected clock. They also
pin down Spool.enqueue_many (every entry readable, private, due now, in order) and the census
behind counts (a settled folder is not read again). Real files only: no mocks, no patching.
"""

from __future__ import annotations

import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
from conftest import FakeClock

import sysmail

T0 = 1_800_000_000.0  # fake-clock epoch: 13 hex digits of microseconds, like real spool ids
URGENT, BULK = sysmail.URGENT, sysmail.BULK


def _header(to: str, template: str = "", now: float = T0) -> dict:
    return {"message_id": f"<{to}.{now}@example.com>", "from": "noreply@example.com",
            "to": [to], "template": template, "queued_at": now, "expires_at": now + 86400}


def _spool(root: Path, clock: FakeClock) -> sysmail.Spool:
    """A spool whose due index runs on the same fake clock."""
    return sysmail.Spool(root, clock=clock, index=sysmail._DueIndex(clock))


def _claim(spool: sysmail.Spool, ident: str) -> sysmail.Claim:
    """Claim the message ident (claiming everything due, then putting the rest back)."""
    claims, _ = spool.claim(100)
    [mine] = [c for c in claims if c.name.id == ident]
    for other in claims:
        if other is not mine:
            spool.release(other)
    return mine


# --------------------------------------------------------------------------- queue listing


@pytest.fixture
def operated(tmp_path: Path) -> tuple[sysmail.Spool, FakeClock, dict[str, str]]:
    """A spool holding one message in every situation an operator meets; ids by role."""
    clock = FakeClock(T0)
    spool = _spool(tmp_path / "spool", clock)
    ids = {"urgent": spool.enqueue(_header("u@example.org", "password-reset"), b"U", URGENT),
           "bulk": spool.enqueue(_header("b@example.org"), b"B", BULK)}
    for role in ("busy", "quiet", "sending", "gone", "silent"):
        ids[role] = spool.enqueue(_header(f"{role}@example.org", "welcome"), b"x", BULK)
    spool.defer(_claim(spool, ids["busy"]), T0 + 600, "451 4.2.1 Mailbox busy")
    spool.defer(_claim(spool, ids["quiet"]), T0 + 300)  # deferred without a reply kept
    _claim(spool, ids["sending"])  # a live worker (this process) holds it
    spool.fail(_claim(spool, ids["gone"]), {"reason": "rejected", "reply": "550 5.1.1 No user"})
    spool.fail(_claim(spool, ids["silent"]), {"reason": "expired"})
    return spool, clock, ids


def test_queue_lists_every_waiting_message_with_its_recipient_attempt_and_last_reply(
        operated: tuple) -> None:
    """`sysmail queue`: every message waiting or being sent, sending first, then urgent before
    bulk, then soonest due; with its id, Message-ID, kind, recipients, age, attempt, next try
    and the relay's last reply (only a deferred message has one)."""
    spool, _, ids = operated
    rows = spool.entries()
    assert [row["id"] for row in rows] == [ids[r] for r in ("sending", "urgent", "bulk",
                                                            "quiet", "busy")]
    by_id = {row["id"]: row for row in rows}
    assert by_id[ids["sending"]] == {
        "id": ids["sending"], "state": "sending", "message_id": f"<sending@example.org.{T0}"
        "@example.com>", "kind": "welcome", "to": ["sending@example.org"], "queued_at": T0,
        "attempt": 0, "next_try": T0, "priority": "bulk", "last_reply": ""}
    assert by_id[ids["urgent"]] == {
        "id": ids["urgent"], "state": "new", "message_id": f"<u@example.org.{T0}@example.com>",
        "kind": "password-reset", "to": ["u@example.org"], "queued_at": T0, "attempt": 0,
        "next_try": T0, "priority": "urgent", "last_reply": ""}
    assert (by_id[ids["bulk"]]["kind"], by_id[ids["bulk"]]["to"]) == ("ad-hoc",
                                                                       ["b@example.org"])
    busy, quiet = by_id[ids["busy"]], by_id[ids["quiet"]]
    assert (busy["state"], busy["attempt"], busy["next_try"], busy["last_reply"]) == (
        "new", 1, T0 + 600, "451 4.2.1 Mailbox busy")
    assert (quiet["attempt"], quiet["next_try"], quiet["last_reply"]) == (1, T0 + 300, "")


def test_queue_shows_no_stale_reply_for_a_message_never_deferred(operated: tuple) -> None:
    """A reply kept for an id whose message is on its first attempt (left by a defer that
    crashed before its rename) is not shown: only a deferred message has a last reply."""
    spool, _, ids = operated
    (spool.root / "replies" / ids["bulk"]).write_text("421 stale")
    assert {row["id"]: row["last_reply"] for row in spool.entries()}[ids["bulk"]] == ""


def test_queue_lists_an_unreadable_entry_by_its_name(operated: tuple) -> None:
    """A file in new/ that is no queue entry is still listed (so it can be deleted): kind
    "unreadable", no recipients, its age from the time in its id."""
    spool, _, _ = operated
    ident = f"{int((T0 - 60) * 1e6):x}abc"
    (spool.root / "new" / f"1.{int(T0 * 1000):014d}.0.{ident}").write_bytes(b"garbage")
    [row] = [row for row in spool.entries() if row["id"] == ident]
    assert (row["kind"], row["to"], row["message_id"], row["queued_at"]) == (
        "unreadable", [], "", T0 - 60)


def test_dead_letters_listed_with_the_reply_that_failed_them(operated: tuple) -> None:
    """entries(("failed",)): each dead letter once (not its reason file), with the relay's
    reply from its reason, or none."""
    spool, _, ids = operated
    rows = {row["id"]: row for row in spool.entries(("failed",))}
    assert set(rows) == {ids["gone"], ids["silent"]}
    assert rows[ids["gone"]]["state"] == "failed"
    assert (rows[ids["gone"]]["last_reply"], rows[ids["silent"]]["last_reply"]) == (
        "550 5.1.1 No user", "")
    (spool.root / "failed" / next(e for e in os.listdir(spool.root / "failed")
                                  if ids["silent"] in e and e.endswith(".json"))).unlink()
    assert {row["id"]: row["last_reply"] for row in spool.entries(("failed",))} == {
        ids["gone"]: "550 5.1.1 No user", ids["silent"]: ""}


def test_messages_names_each_message_once_with_its_state_and_file(operated: tuple) -> None:
    """messages(): (state, name, path) of every message in new/, cur/ and failed/; reason
    files and foreign names are not messages."""
    spool, _, ids = operated
    (spool.root / "new" / "README").write_text("not mail")
    found = sorted((state, name.id) for state, name, _ in spool.messages())
    assert found == sorted([("new", ids[r]) for r in ("urgent", "bulk", "busy", "quiet")]
                           + [("cur", ids["sending"]), ("failed", ids["gone"]),
                              ("failed", ids["silent"])])
    for state, name, path in spool.messages():
        assert path.parent == spool.root / state and path.is_file()
        assert path.name.startswith(str(name))
    assert sorted(n.id for _, n, _ in spool.messages(("failed",))) == sorted(
        [ids["gone"], ids["silent"]])


def test_peek_shows_a_message_as_stored_even_under_another_key(tmp_path: Path) -> None:
    """`sysmail show`: peek reads a message without authenticating it (an operator may look
    at mail written under another queue key); None when it is gone or not an entry."""
    clock = FakeClock(T0)
    root = tmp_path / "spool"
    writer = sysmail.Spool(root, clock=clock, key=b"another key" * 3)
    ident = writer.enqueue(_header("ada@example.org", "welcome"), b"Subject: hi\r\n\r\nhi\r\n",
                           URGENT)
    spool = sysmail.Spool(root, clock=clock)
    [(state, name, path)] = list(spool.messages())
    assert state == "new"
    message = spool.peek(name, path)
    assert message is not None
    assert (message.id, message.rcpts, message.template, message.priority, message.data) == (
        ident, ("ada@example.org",), "welcome", URGENT, b"Subject: hi\r\n\r\nhi\r\n")
    path.unlink()
    assert spool.peek(name, path) is None
    path.write_bytes(b"garbage")
    assert spool.peek(name, path) is None


# --------------------------------------------------------------------------- delete


def test_delete_removes_exactly_the_named_message_and_what_it_kept(operated: tuple) -> None:
    """`sysmail delete`: a queued message goes (with its kept reply), a dead letter goes with
    its reason; nothing else is touched; an unknown id is "missing"."""
    spool, _, ids = operated
    before = {state: sorted(os.listdir(spool.root / state)) for state in ("new", "failed")}
    for role in ("bulk", "urgent", "quiet"):  # each one, whichever the folder lists first
        assert spool.delete(ids[role]) == "deleted"
    assert spool.delete(ids["busy"]) == "deleted"
    assert not (spool.root / "replies" / ids["busy"]).exists()
    assert os.listdir(spool.root / "new") == []
    assert sorted(os.listdir(spool.root / "failed")) == before["failed"]
    assert spool.delete(ids["gone"]) == "deleted"
    assert [e for e in os.listdir(spool.root / "failed") if ids["gone"] in e] == []
    assert spool.delete(ids["gone"]) == "missing"
    assert spool.delete("nosuchid") == "missing"
    assert sorted(n.id for _, n, _ in spool.messages()) == sorted([ids["sending"],
                                                                    ids["silent"]])


def test_delete_refuses_a_message_a_live_worker_holds(operated: tuple) -> None:
    """A claim in cur/ is under way (its SMTP transaction may be): delete says "sending" and
    leaves it whole."""
    spool, _, ids = operated
    [held] = os.listdir(spool.root / "cur")
    content = (spool.root / "cur" / held).read_bytes()
    assert spool.delete(ids["sending"]) == "sending"
    assert (spool.root / "cur" / held).read_bytes() == content


# --------------------------------------------------------------------------- enqueue_many


def test_enqueue_many_writes_every_entry_readable_private_due_now_in_order(
        tmp_path: Path) -> None:
    """Every entry of a batch is stored: ids returned in the batch's order, each readable with
    its own header and data, private (0600), due now on attempt 0; nothing left in tmp/."""
    clock = FakeClock(T0)
    spool = _spool(tmp_path / "spool", clock)
    batch = [(_header(f"u{n}@example.org"), f"body {n}".encode(), URGENT if n == 1 else BULK)
             for n in range(3)]
    ids = spool.enqueue_many(batch)
    assert len(set(ids)) == 3
    rows = {row["id"]: row for row in spool.entries()}
    assert [(rows[i]["to"], rows[i]["attempt"], rows[i]["next_try"], rows[i]["priority"])
            for i in ids] == [(["u0@example.org"], 0, T0, "bulk"),
                              (["u1@example.org"], 0, T0, "urgent"),
                              (["u2@example.org"], 0, T0, "bulk")]
    for entry in os.listdir(spool.root / "new"):
        assert stat.S_IMODE((spool.root / "new" / entry).stat().st_mode) == 0o600
    claims, _ = spool.claim(10)
    assert [c.name.id for c in claims] == [ids[1], ids[0], ids[2]]  # urgent first
    assert {c.name.id: spool.read(c).data for c in claims} == {
        ids[n]: f"body {n}".encode() for n in range(3)}
    assert os.listdir(spool.root / "tmp") == []
    assert spool.enqueue_many([(_header("solo@example.org"), b"solo", BULK)]) != []


def test_enqueue_many_wakes_a_listening_worker_with_the_first_name(tmp_path: Path) -> None:
    """Another worker on the spool is woken by a batch and can claim its first message before
    its next rescan."""
    clock = FakeClock(T0)
    worker = _spool(tmp_path / "spool", clock)
    worker.enqueue(_header("old@example.org"), b"old", BULK)
    worker.enqueue(_header("old2@example.org"), b"old2", BULK)
    woken = threading.Semaphore(0)
    listener = worker.listen(woken.release)
    assert listener is not None
    try:
        worker.claim(1)  # its index is built: one bulk message left due
        writer = sysmail.Spool(tmp_path / "spool", clock=clock)
        first, _ = writer.enqueue_many([(_header("a@example.org"), b"a", URGENT),
                                        (_header("b@example.org"), b"b", BULK)])
        assert woken.acquire(timeout=5)
        assert [c.name.id for c in worker.claim(1)[0]] == [first]
    finally:
        listener.close()


def test_enqueue_many_on_a_spool_without_tmp_stores_nothing_and_says_why(
        tmp_path: Path) -> None:
    """A failed batch is a SpoolError naming the spool and the cause, with no id stored."""
    spool = sysmail.Spool(tmp_path / "spool", clock=FakeClock(T0))
    (tmp_path / "spool" / "tmp").rmdir()
    with pytest.raises(sysmail.SpoolError) as caught:
        spool.enqueue_many([(_header("a@example.org"), b"a", BULK),
                            (_header("b@example.org"), b"b", BULK)])
    assert str(caught.value) == (f"cannot write to the spool {tmp_path / 'spool'}: "
                                 "No such file or directory")
    assert caught.value.queued == []
    assert os.listdir(tmp_path / "spool" / "new") == []


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files away needs root")
def test_enqueue_many_as_root_gives_the_entries_to_the_spool_owner(tmp_path: Path) -> None:
    """What an operator's root shell queues into a service's spool, the service can read."""
    root = tmp_path / "spool"
    sysmail.Spool(root)
    for folder in (root, *(root / sub for sub in sysmail.SPOOL_FOLDERS)):
        os.chown(folder, 65534, 65534)
    sysmail.Spool(root, clock=FakeClock(T0)).enqueue_many(
        [(_header("a@example.org"), b"a", BULK), (_header("b@example.org"), b"b", BULK)])
    owners = {((root / "new" / e).stat().st_uid, (root / "new" / e).stat().st_gid)
              for e in os.listdir(root / "new")}
    assert owners == {(65534, 65534)}


# --------------------------------------------------------------------------- counts


def test_counts_say_how_many_wait_and_when_the_next_retry_is(tmp_path: Path) -> None:
    """`status`/metrics: due now, deferred, the oldest age and the next retry in seconds,
    both rounded to the millisecond."""
    clock = FakeClock(T0)
    spool = _spool(tmp_path / "spool", clock)
    spool.enqueue(_header("now@example.org"), b"n", BULK)
    spool.enqueue(_header("later@example.org"), b"l", BULK, due=T0 + 90.25)
    clock.advance(0.1004)
    assert spool.counts() == {"new": 1, "deferred": 1, "cur": 0, "failed": 0,
                              "oldest_age_seconds": 0.1, "next_retry_in_seconds": 90.15}
    clock.advance(90.5)
    assert spool.counts() == {"new": 2, "deferred": 0, "cur": 0, "failed": 0,
                              "oldest_age_seconds": 90.6, "next_retry_in_seconds": None}


def test_counts_of_a_spool_whose_folders_are_missing_are_zero(tmp_path: Path) -> None:
    clock = FakeClock(T0 + 10 * 365 * 86400)  # far ahead of the real clock
    spool = _spool(tmp_path / "spool", clock)
    spool.enqueue(_header("a@example.org"), b"a", BULK)
    clock.advance(2)
    shutil.rmtree(tmp_path / "spool" / "cur")
    shutil.rmtree(tmp_path / "spool" / "failed")
    assert spool.counts() == {"new": 1, "deferred": 0, "cur": 0, "failed": 0,
                              "oldest_age_seconds": 2.0, "next_retry_in_seconds": None}
    shutil.rmtree(tmp_path / "spool" / "new")
    assert spool.counts() == {"new": 0, "deferred": 0, "cur": 0, "failed": 0,
                              "oldest_age_seconds": 0, "next_retry_in_seconds": None}
    assert _spool(tmp_path / "empty", clock).counts()["oldest_age_seconds"] == 0


def test_counts_of_an_unreadable_folder_name_it(tmp_path: Path) -> None:
    spool = sysmail.Spool(tmp_path / "spool")
    (tmp_path / "spool" / "new").rmdir()
    (tmp_path / "spool" / "new").symlink_to("new")  # a loop: stat fails with ELOOP
    with pytest.raises(sysmail.SpoolError) as caught:
        spool.counts()
    assert str(caught.value) == (f"cannot read the spool folder {tmp_path / 'spool' / 'new'}: "
                                 "Too many levels of symbolic links")


def test_counts_skip_foreign_names_and_reasons_and_find_the_oldest(tmp_path: Path) -> None:
    """Only mail counts (not a reason file, not a name that is no PRIORITY.DUE.ATTEMPT.ID);
    the oldest age is that of the earliest queued message, wherever the folder lists it."""
    clock = FakeClock(T0)
    spool = _spool(tmp_path / "spool", clock)
    foreign = ["README", "1.2.3", "x.1.0.abc", "1.x.0.abc", "1.1.x.abc", "a.b.c.d"]
    for n in range(12):
        for name in foreign:
            (spool.root / "new" / f"{name}{n}").write_text("not mail")
        spool.enqueue(_header(f"u{n}@example.org"), b"x", BULK, due=T0 + 7 + n)
        clock.advance(1)
    for n in range(2):
        spool.fail(_claim(spool, spool.enqueue(_header("d@example.org"), b"d", BULK)),
                   {"reason": "rejected"})
    assert spool.counts() == {"new": 6, "deferred": 6, "cur": 0, "failed": 2,
                              "oldest_age_seconds": 12.0, "next_retry_in_seconds": 1.0}


def test_counts_read_a_settled_unchanged_folder_only_once(tmp_path: Path) -> None:
    """A folder whose modification time is unchanged and over a second old is counted from
    its census, not read again (shown by a file slipped in with the folder's time put back);
    a new time, or one too recent to trust, makes it read again."""
    clock = FakeClock(T0)
    spool = _spool(tmp_path / "spool", clock)
    new = spool.root / "new"

    def slip_in(n: int, mtime_ns: int) -> None:
        (new / f"1.{int(T0 * 1000):014d}.0.{int(T0 * 1e6):x}slip{n}").write_bytes(b"")
        os.utime(new, ns=(mtime_ns, mtime_ns))

    spool.enqueue(_header("a@example.org"), b"a", BULK)
    old = time.time_ns() - 3600 * 10**9
    os.utime(new, ns=(old, old))
    assert spool.counts()["new"] == 1
    slip_in(1, old)
    assert spool.counts()["new"] == 1  # unchanged and settled: the census is kept
    slip_in(2, old + 10**9)
    assert spool.counts()["new"] == 3  # changed: read again
    future = time.time_ns() + 3600 * 10**9
    slip_in(3, future)
    assert spool.counts()["new"] == 4
    slip_in(4, future)
    assert spool.counts()["new"] == 5  # the same time, but not settled: read again


def test_counts_read_a_changed_folder_again_at_once(tmp_path: Path) -> None:
    """A folder that changed is read again on the next count, however soon it comes."""
    spool = _spool(tmp_path / "spool", FakeClock(T0))
    new = spool.root / "new"
    for n in range(2000):
        (new / f"1.{int(T0 * 1000):014d}.0.{int(T0 * 1e6):x}n{n}").write_bytes(b"")
    old = time.time_ns() - 3600 * 10**9
    os.utime(new, ns=(old, old))
    assert spool.counts()["new"] == 2000
    (new / f"1.{int(T0 * 1000):014d}.0.{int(T0 * 1e6):x}last").write_bytes(b"")
    assert spool.counts()["new"] == 2001
