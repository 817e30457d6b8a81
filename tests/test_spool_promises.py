"""Promises of the spool's settling and maintenance calls, one test each (issue 15).

Each test calls sysmail's Spool and helpers directly on a real spool folder under tmp_path:
the injected clock for anything about time, file ages set on the real files, real processes
and real tmpfs mounts where ownership or a file system's figures matter; nothing is patched.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FakeClock

import sysmail

DAY = 86400.0
DEAD_LETTER_AGE = 14 * DAY


def _spool(root: Path, clock: FakeClock) -> sysmail.Spool:
    return sysmail.Spool(root, clock=clock)


def _queue(spool: sysmail.Spool, subject: str) -> str:
    header = {"message_id": f"<{subject}@example.com>", "from": "noreply@example.com",
              "to": ["ada@example.org"], "template": "", "queued_at": spool.clock(),
              "expires_at": spool.clock() + DAY}
    return spool.enqueue(header, f"Subject: {subject}\r\n\r\n{subject}\r\n".encode(),
                         sysmail.BULK)


def _claim_all(spool: sysmail.Spool) -> dict[str, sysmail.Claim]:
    claims, _ = spool.claim(100)
    return {claim.name.id: claim for claim in claims}


def _bury(spool: sysmail.Spool, subject: str, reason: dict | None = None) -> str:
    """Queue a message, claim it and make it a dead letter; return its id."""
    ident = _queue(spool, subject)
    spool.fail(_claim_all(spool)[ident], reason or {"reason": "rejected", "code": 550})
    return ident


def _letter_files(spool: sysmail.Spool, ident: str) -> list[str]:
    return sorted(e for e in os.listdir(spool.root / "failed") if ident in e)


def _age(folder: Path, names: list[str], seconds: float) -> None:
    """Make files look as if they were last written `seconds` ago (real time)."""
    then = time.time() - seconds
    for name in names:
        os.utime(folder / name, (then, then))


def test_old_dead_letters_are_forgotten_with_their_reason_and_young_ones_kept(
        tmp_path: Path) -> None:
    """A dead letter older than the dead-letter age is forgotten with its reason file; a
    younger one and its reason stay; the count returned is the letters removed."""
    spool = _spool(tmp_path / "spool", FakeClock(time.time()))
    old = [_bury(spool, f"old{n}") for n in range(2)]
    young = _bury(spool, "young")
    for ident in old:
        files = _letter_files(spool, ident)
        assert len(files) == 2 and sum(f.endswith(".json") for f in files) == 1, files
        _age(spool.root / "failed", files, DEAD_LETTER_AGE + DAY)
    _age(spool.root / "failed", _letter_files(spool, young), DEAD_LETTER_AGE - DAY)
    assert spool.clean_failed(DEAD_LETTER_AGE) == 2
    assert [_letter_files(spool, ident) for ident in old] == [[], []]
    assert len(_letter_files(spool, young)) == 2
    assert [letter["id"] for letter in spool.failed()] == [young]
    assert spool.clean_failed(DEAD_LETTER_AGE) == 0


def test_a_file_vanishing_during_a_cleanup_is_skipped(tmp_path: Path) -> None:
    """A name in tmp/ or failed/ that leads nowhere (here a dangling symbolic link, as a file
    removed by another process between the listing and its age check) is passed over."""
    spool = _spool(tmp_path / "spool", FakeClock(time.time()))
    for folder in ("tmp", "failed"):
        (spool.root / folder / "1.0.0.gone.json").symlink_to(tmp_path / "nowhere")
    assert spool.clean_tmp() == 0
    assert spool.clean_failed(0) == 0


def test_a_spool_others_can_write_to_or_with_a_linked_folder_is_refused(
        tmp_path: Path) -> None:
    """check_private: a spool folder writable by group or others is refused with the chmod
    that fixes it; execute or read bits for others are fine; a subfolder that is a symbolic
    link is refused by name; a missing spool is no objection."""
    root = tmp_path / "spool"
    spool = _spool(root, FakeClock())
    for harmless in (0o700, 0o701, 0o755):
        root.chmod(harmless)
        spool.check_private()
    for unsafe in (0o720, 0o702):
        root.chmod(unsafe)
        with pytest.raises(sysmail.ConfigError) as caught:
            spool.check_private()
        assert caught.value.problems == [
            f"the spool {root} is writable by other users (chmod 700 {root})"]
    root.chmod(0o700)
    (root / "replies").rmdir()
    (root / "replies").symlink_to(tmp_path)
    with pytest.raises(sysmail.ConfigError) as caught:
        spool.check_private()
    assert caught.value.problems == [
        (f"the spool folder {root / 'replies'} is a symbolic link; "
         "a spool keeps its folders inside it")]
    gone = _spool(tmp_path / "gone", FakeClock())
    gone.root.rename(tmp_path / "elsewhere")
    gone.check_private()


def test_release_puts_a_claim_back_with_the_same_attempt_due_when_asked(
        tmp_path: Path) -> None:
    """release(claim) puts the message back due now with its attempt unchanged;
    release(claim, due) makes it due at that time (to the millisecond), not before."""
    clock = FakeClock(1_800_000_000.0)
    spool = _spool(tmp_path / "spool", clock)
    ident = _queue(spool, "held")
    [claim] = _claim_all(spool).values()
    spool.defer(claim, clock() + 60)
    clock.advance(60)
    claim = _claim_all(spool)[ident]
    assert claim.name.attempt == 1
    spool.release(claim)
    again = _claim_all(spool)[ident]
    assert (again.name.attempt, again.name.due_ms) == (1, claim.name.due_ms)
    later = clock() + 600.25
    spool.release(again, later)
    [entry] = os.listdir(spool.root / "new")
    assert sysmail.SpoolName.parse(entry) == sysmail.SpoolName(
        claim.name.priority, int(later * 1000), 1, ident)
    claims, next_due = spool.claim(10)
    assert claims == [] and next_due == int(later * 1000) / 1000
    clock.advance(600.25)
    assert _claim_all(spool)[ident].name.attempt == 1


def test_retry_skips_redacted_dead_letters_and_retries_the_rest(tmp_path: Path) -> None:
    """A dead letter whose link or code was redacted is never retried (the user asks again);
    every other one is put back, whatever order the folder lists them in."""
    spool = _spool(tmp_path / "spool", FakeClock(1_800_000_000.0))
    redacted, plain = set(), set()
    for n in range(8):  # in turns: some redacted one is listed before a plain one (ext4 hash
        # order puts all 8 plain first 1 time in 12,870; creation order never)
        redacted.add(_bury(spool, f"reset{n}", {"reason": "rejected", "redacted": True}))
        plain.add(_bury(spool, f"welcome{n}"))
    assert set(spool.retry()) == plain
    assert {letter["id"] for letter in spool.failed()} == redacted
    assert set(_claim_all(spool)) == plain


def test_settling_a_deferred_message_forgets_its_last_reply(tmp_path: Path) -> None:
    """defer keeps the relay's last reply only when one is given; once the message is
    delivered (ack) or becomes a dead letter (fail, whose reason holds the reply), the
    kept reply is removed."""
    clock = FakeClock(1_800_000_000.0)
    spool = _spool(tmp_path / "spool", clock)
    replies = spool.root / "replies"
    quiet, delivered, buried = (_queue(spool, s) for s in ("quiet", "delivered", "buried"))
    claims = _claim_all(spool)
    spool.defer(claims[quiet], clock() + 60)
    assert os.listdir(replies) == []
    for ident in (delivered, buried):
        spool.defer(claims[ident], clock() + 60, "451 4.3.0 try later")
    assert sorted(os.listdir(replies)) == sorted([delivered, buried])
    clock.advance(60)
    claims = _claim_all(spool)
    spool.ack(claims[delivered])
    assert os.listdir(replies) == [buried]
    spool.fail(claims[buried], {"reason": "expired", "reply": "451 4.3.0 try later"})
    assert os.listdir(replies) == []
    spool.ack(claims[quiet])


def test_a_partial_dead_letter_has_no_next_try(tmp_path: Path) -> None:
    """add_failed (some recipients refused, others served) writes a dead letter whose next
    try is 0: it is not due at any time until retried."""
    spool = _spool(tmp_path / "spool", FakeClock(1_800_000_000.0))
    ident = _queue(spool, "split")
    claim = _claim_all(spool)[ident]
    spool.add_failed(spool.read(claim), ("ada@example.org",), {"reason": "rejected"})
    spool.ack(claim)
    [row] = spool.entries(("failed",))
    assert (row["state"], row["next_try"], row["to"]) == ("failed", 0, ["ada@example.org"])


def test_dead_letters_without_a_readable_reason_are_listed_first(tmp_path: Path) -> None:
    """failed() sorts by failure time; a letter whose reason file is gone counts as failed at
    the epoch, before one that failed half a second after it."""
    spool = _spool(tmp_path / "spool", FakeClock(0.5))
    dated = _bury(spool, "dated")
    lost = _bury(spool, "lost")
    os.unlink(spool.root / "failed" / next(
        e for e in os.listdir(spool.root / "failed") if lost in e and e.endswith(".json")))
    assert [letter["id"] for letter in spool.failed()] == [lost, dated]


def test_the_sent_stamp_of_a_service_spool_belongs_to_the_service(tmp_path: Path) -> None:
    """mark_sent run as root in a spool owned by a service user creates last-sent owned by
    that user (the service must be able to touch it later)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to own files as another user")
    root = tmp_path / "spool"
    root.mkdir()
    os.chown(root, 65534, 65534)
    spool = _spool(root, FakeClock())
    spool.mark_sent()
    stamp = (root / "last-sent").stat()
    assert (stamp.st_uid, stamp.st_gid) == (65534, 65534)


def test_writable_trusts_inode_figures_only_where_the_file_system_counts_inodes(
        tmp_path: Path, small_mount: Callable[[str], Path]) -> None:
    """A file system that reports no inode count (tmpfs with nr_inodes=0: unlimited) is not
    full; one whose only inode is used (tmp/ a tmpfs mount of one inode) is."""
    unlimited = sysmail.Spool(small_mount("size=8m,nr_inodes=0") / "spool")
    assert os.statvfs(unlimited.root).f_files == 0
    assert unlimited.writable()
    spool = sysmail.Spool(tmp_path / "spool")
    one_inode = small_mount("size=8m,nr_inodes=1")
    os.rmdir(spool.root / "tmp")
    os.symlink(one_inode, spool.root / "tmp")
    disk = os.statvfs(spool.root / "tmp")
    assert (disk.f_files, disk.f_favail) == (1, 0)
    assert not spool.writable()


def test_an_entry_changed_after_it_was_queued_is_refused(tmp_path: Path) -> None:
    """A spool entry with the right format tag whose header was changed (a recipient
    swapped), or that was written under another queue key, fails its authentication."""
    key = b"k" * 32
    spool = sysmail.Spool(tmp_path / "spool", clock=FakeClock(1_800_000_000.0), key=key)
    forged, foreign = _queue(spool, "forged"), _queue(spool, "foreign")
    [forged_entry] = [e for e in os.listdir(spool.root / "new") if forged in e]
    path = spool.root / "new" / forged_entry
    path.write_bytes(path.read_bytes().replace(b"ada@example.org", b"eve@example.org"))
    claims = _claim_all(spool)
    with pytest.raises(sysmail.UnauthenticatedEntry, match=f"queue entry {forged} fails"):
        spool.read(claims[forged])
    assert spool.read(claims[foreign]).rcpts == ("ada@example.org",)
    other = sysmail.Spool(spool.root, clock=spool.clock, key=b"o" * 32)
    with pytest.raises(sysmail.UnauthenticatedEntry):
        other.read(claims[foreign])


def test_a_wake_up_naming_no_file_in_new_is_not_indexed(tmp_path: Path) -> None:
    """A worker indexes a name another process announces only when that file is in new/: a
    stale or forged datagram costs no claim; the name is found by the next scan instead."""
    clock = FakeClock(1_800_000_000.0)
    worker = sysmail.Spool(tmp_path / "spool", clock=clock,
                           index=sysmail._DueIndex(clock=FakeClock(0.0)))
    woken: list[int] = []
    listener = worker.listen(lambda: woken.append(1))
    if listener is None:
        pytest.skip("no wake-up sockets on this platform")
    try:
        assert worker.claim(10) == ([], None)  # the index is built: no rescan for a while
        writer = _spool(worker.root, clock)
        phantom = f"1.{int(clock() * 1000)}.0.phantom1"
        writer.notify(phantom)  # announced before it exists
        real = _queue(writer, "real")  # its datagram follows the phantom's
        deadline = time.monotonic() + 10
        while not woken and time.monotonic() < deadline:
            time.sleep(0.005)
        assert woken, "the worker never heard of the real entry"
        (worker.root / "new" / phantom).write_bytes(b"")
        claims, _ = worker.claim(10)
        assert [claim.name.id for claim in claims] == [real]
        assert os.listdir(worker.root / "new") == [phantom]
    finally:
        listener.close()


def test_a_spool_named_by_a_relative_path_works(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """SYSMAIL_SPOOL=spool, relative to the working directory as a user of the command line
    may set it: a message is queued into new/, claimed, deferred and delivered from there."""
    monkeypatch.chdir(tmp_path)
    clock = FakeClock()
    spool = _spool(Path("spool"), clock)
    ident = _queue(spool, "Relative")
    assert [name.rsplit(".", 1)[-1] for name in os.listdir("spool/new")] == [ident]
    (claim,) = _claim_all(spool).values()
    spool.defer(claim, clock() + 60, "451 later")
    clock.advance(61)
    (claim,) = _claim_all(spool).values()
    spool.ack(claim)
    assert os.listdir("spool/new") == os.listdir("spool/cur") == []


def test_a_message_the_spool_cannot_take_is_an_error_naming_the_spool_and_why(
        tmp_path: Path) -> None:
    """tmp/ gone (a careless cleanup): enqueue raises SpoolError naming the spool and the
    system's reason, which the log line and the Redis fallback's warning repeat."""
    spool = _spool(tmp_path / "spool", FakeClock())
    (tmp_path / "spool" / "tmp").rmdir()
    with pytest.raises(sysmail.SpoolError) as caught:
        _queue(spool, "Lost")
    assert str(caught.value) == (f"cannot write to the spool {tmp_path / 'spool'}: "
                                 "No such file or directory")
    assert os.listdir(tmp_path / "spool" / "new") == []
