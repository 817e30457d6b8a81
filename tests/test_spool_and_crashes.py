"""The Maildir spool and crash safety (issue 2).

Spool unit behaviour (with a fake clock where time matters), writers and workers killed with
SIGKILL, several workers on one spool, the cross-process wake-up, SIGTERM, and the worker,
status, failed and retry commands. Everything is real: files on disk, subprocesses, signals and
the aiosmtpd relay of the smtp_server fixture (two tests serve conftest's SmtpServer with a
protocol that holds back its 250, to open the crash-duplicate window on purpose and to keep a
worker's claims held until it is killed). Where a test needs a state (a worker idle, nothing
more in flight) it waits for that state to show, never for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import json
import os
import random
import re
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

import pytest
from conftest import REPO, FakeClock, SinkSMTP, SmtpServer, enqueue_many, run_cli

import sysmail

DOMAIN = "example.com"
SYSMAIL = REPO / "sysmail.py"
T0 = 1_800_000_000.0  # fake-clock epoch: 13 hex digits of microseconds, like real spool ids
HOUR = 3600.0
STATES = ("new", "deferred", "cur", "failed")
SPOOL_FORMAT = b"sysmail-spool/2 "  # the first line of a spool file: this, a MAC, then JSON
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)


# --------------------------------------------------------------------------- helpers


def _proc_token(pid: int) -> str:
    """The owner token of the Spool docstring: pid-starttime (field 22 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return f"{pid}-{fields[19]}"


def _mail(subject: str, now: float) -> tuple[dict, bytes]:
    """A spool header and the RFC 5322 bytes of a small message."""
    message_id = f"<{subject.replace(' ', '-')}.{int(now * 1000)}.{os.urandom(4).hex()}@{DOMAIN}>"
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = f"noreply@{DOMAIN}"
    msg["To"] = "ada@example.org"
    msg["Subject"] = subject
    msg["Message-ID"] = message_id
    msg.set_content(f"{subject}\n")
    header = {"message_id": message_id, "from": f"noreply@{DOMAIN}", "to": ["ada@example.org"],
              "template": "", "queued_at": now, "expires_at": now + HOUR}
    return header, msg.as_bytes()


def _enqueue(spool: sysmail.Spool, subject: str, priority: int = sysmail.BULK,
             due: float | None = None, attempt: int = 0) -> tuple[str, dict, bytes]:
    header, data = _mail(subject, spool.clock())
    return spool.enqueue(header, data, priority, due=due, attempt=attempt), header, data


def _split_spool_file(raw: bytes) -> tuple[dict, bytes]:
    """The (header, message bytes) of a spool file: one 'sysmail-spool/2 MAC JSON' line, then
    the data."""
    head, newline, data = raw.partition(b"\n")
    assert newline, "a spool file starts with a header line"
    assert head.startswith(SPOOL_FORMAT), head[:40]
    mac, _, header = head[len(SPOOL_FORMAT):].partition(b" ")
    assert len(mac) == 64, mac
    return json.loads(header), data


def _ls(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def _only(folder: Path) -> str:
    entries = _ls(folder)
    assert len(entries) == 1, f"{folder.name}/ holds {entries}"
    return entries[0]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(0.003)


def _wait_quiet(probe: Callable[[], object], quiet: float, timeout: float, what: str) -> object:
    """Wait until probe() has not changed for `quiet` seconds in a row; return its value."""
    deadline = time.monotonic() + timeout
    value, since = probe(), time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not stay still for {quiet} s within {timeout} s")
        time.sleep(0.01)
        if (now := probe()) != value:
            value, since = now, time.monotonic()
    return value


def _env(server: SmtpServer, spool: Path) -> dict[str, str]:
    """One sender process per worker: these tests count processes and their claims."""
    return {"SMTP_URL": server.url, "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_ALLOW_UNSIGNED": "1",
            "SYSMAIL_SPOOL": str(spool), "SYSMAIL_SENDERS": "1"}


def _process_env(env: dict[str, str]) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", **env}


def _enqueue_many(spool: Path, count: int) -> list[str]:
    """Queue count ad-hoc mails through the embedding API; return their Message-IDs."""
    return enqueue_many(spool, count, DOMAIN)


def _received_ids(server: SmtpServer) -> list[str]:
    """The Message-ID of every message the sink accepted, in arrival order."""
    ids = []
    for received in list(server.messages):
        found = _MESSAGE_ID.search(received.data)
        assert found, received.data[:300]
        ids.append(found.group(1).decode())
    return ids


def _spool_empty(spool: Path) -> bool:
    return not os.listdir(spool / "new") and not os.listdir(spool / "cur")


def _status(env: dict[str, str]) -> dict:
    """`status --json`: exactly one JSON object with integer counts."""
    result = run_cli(["status", "--json"], env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    status = json.loads(lines[0])
    assert isinstance(status, dict)
    for key in STATES:
        assert type(status[key]) is int, (key, status)
    return status


def _counts(status: dict) -> dict[str, int]:
    return {key: status[key] for key in STATES}


def _send(env: dict[str, str], subject: str = "Hello") -> str:
    result = run_cli(["send", "--to", "ada@example.org", "--subject", subject,
                      "--text", "Hello there."], env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _json_lines(text: str) -> list[dict]:
    events = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):  # a line the worker is still writing
                events.append(json.loads(line))
    return events


@dataclass
class Worker:
    """A `sysmail.py worker` subprocess; its stderr (JSON log lines) goes to a file."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def token(self) -> str:
        return _proc_token(self.proc.pid)

    def events(self, name: str | None = None) -> list[dict]:
        found = _json_lines(self.log.read_text(errors="replace"))
        return [e for e in found if name is None or e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 60) -> None:
        _wait_until(lambda: self.events(name), timeout, f"a {name!r} log line")

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=10) == -signal.SIGKILL

    def term(self, timeout: float = 3) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start worker subprocesses; any still running at teardown is killed and reaped."""
    started: list[Worker] = []

    def start(env: dict[str, str], *args: str) -> Worker:
        log = tmp_path / f"worker-{len(started)}.log"
        with log.open("wb") as stderr:
            proc = subprocess.Popen([sys.executable, str(SYSMAIL), "worker", *args],
                                    env=_process_env(env), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=stderr)
        started.append(Worker(proc, log))
        return started[-1]

    yield start
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


# --------------------------------------------------------------------------- Spool unit behaviour


def test_enqueue_writes_one_complete_private_file_in_new(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root, clock=FakeClock(T0))
    spool_id, header, data = _enqueue(spool, "first", priority=sysmail.URGENT)
    for folder in ("", "tmp", "new", "cur", "failed"):
        assert _mode(root / folder) == 0o700, folder
    assert _ls(root / "tmp") == []
    assert _ls(root / "cur") == [] and _ls(root / "failed") == []
    entry = _only(root / "new")
    assert entry == f"0.{int(T0 * 1000):014d}.0.{spool_id}"  # PRIORITY.DUE_MS.ATTEMPT.ID
    path = root / "new" / entry
    assert _mode(path) == 0o600
    assert path.stat().st_nlink == 1  # the tmp/ name is gone, not merely hidden
    assert _split_spool_file(path.read_bytes()) == (header, data)

    other_id, _, _ = _enqueue(spool, "second")
    assert other_id != spool_id
    assert len(_ls(root / "new")) == 2 and _ls(root / "tmp") == []


def test_claim_renames_into_cur_with_the_owner_and_no_other_spool_gets_it(tmp_path: Path) -> None:
    root, clock = tmp_path / "spool", FakeClock(T0)
    first, second = sysmail.Spool(root, clock=clock), sysmail.Spool(root, clock=clock)
    bulk_old, header, data = _enqueue(first, "bulk old", due=T0 - 2)
    urgent, _, _ = _enqueue(first, "urgent", priority=sysmail.URGENT, due=T0 - 1)
    bulk_now, _, _ = _enqueue(first, "bulk now")
    later, _, _ = _enqueue(first, "later", due=T0 + 60)

    claims, _ = first.claim(2)
    assert [c.name.id for c in claims] == [urgent, bulk_old]  # urgent first, then oldest due
    owner = _proc_token(os.getpid())
    for claim in claims:
        assert claim.path == root / "cur" / f"{claim.name}.{owner}"
        assert claim.path.is_file()
    assert len(_ls(root / "new")) == 2
    message = first.read(claims[1])
    assert (message.id, message.message_id, message.attempt) == (bulk_old, header["message_id"], 0)
    assert message.data == data

    other_claims, next_due = second.claim(10)
    assert [c.name.id for c in other_claims] == [bulk_now]  # not the claimed ones, not `later`
    assert next_due == pytest.approx(T0 + 60, abs=0.001)
    assert first.claim(10)[0] == [] and second.claim(10)[0] == []
    clock.advance(60)
    assert [c.name.id for c in second.claim(10)[0]] == [later]
    assert _ls(root / "new") == [] and len(_ls(root / "cur")) == 4


@pytest.mark.parametrize("batch", [1, 10], ids=["one-at-a-time", "one-batch"])
@pytest.mark.parametrize("claimer", ["same-spool", "another-spool"])
def test_claims_come_urgent_first_then_oldest_due_and_none_before_due(
        tmp_path: Path, batch: int, claimer: str) -> None:
    """README: urgent mail always goes before bulk, each by due time, and nothing before it is
    due. Queued in a mixed order, the messages come out of claim() in the order written here
    (claimed by the writing Spool, and by another one that finds them on disk)."""
    root, clock = tmp_path / "spool", FakeClock(T0)
    writer = sysmail.Spool(root, clock=clock)
    subjects = {}
    for subject, priority, due in [  # the order they are queued in: not the claim order
            ("bulk due now", sysmail.BULK, T0),
            ("bulk later", sysmail.BULK, T0 + 20),
            ("urgent later", sysmail.URGENT, T0 + 25),
            ("bulk overdue", sysmail.BULK, T0 - 30),
            ("urgent due now", sysmail.URGENT, T0),
            ("urgent overdue", sysmail.URGENT, T0 - 5)]:
        _, header, _ = _enqueue(writer, subject, priority, due=due)
        subjects[header["message_id"]] = subject
    spool = writer if claimer == "same-spool" else sysmail.Spool(root, clock=clock)

    def claim_all() -> tuple[list[str], float | None]:
        order = []
        while True:
            claims, next_due = spool.claim(batch)
            if not claims:
                return order, next_due
            order += [subjects[spool.read(claim).message_id] for claim in claims]

    assert claim_all() == (["urgent overdue", "urgent due now", "bulk overdue", "bulk due now"],
                           pytest.approx(T0 + 20, abs=0.001))
    clock.advance(30)  # both later ones are due now, the bulk one for longer
    assert claim_all() == (["urgent later", "bulk later"], None)


def test_a_worker_with_one_connection_delivers_urgent_first_then_oldest_due(
        smtp_server: SmtpServer, tmp_path: Path) -> None:
    """What the relay receives, in order: urgent mail first, each kind oldest first
    (SYSMAIL_SMTP_CONNECTIONS=1 keeps strict order, README)."""
    spool = tmp_path / "spool"
    env = {**_env(smtp_server, spool), "SYSMAIL_SMTP_CONNECTIONS": "1"}
    clock = FakeClock(time.time() - 60)  # queued over the last minute: all due
    mailer = sysmail.Mailer(sysmail.Config.from_env(env), clock=clock)
    subjects = {}
    for subject, priority in [("bulk 1", sysmail.BULK), ("bulk 2", sysmail.BULK),
                              ("urgent 1", sysmail.URGENT), ("bulk 3", sysmail.BULK),
                              ("urgent 2", sysmail.URGENT)]:
        message_id = mailer.enqueue_message("ada@example.org", subject, "text\n",
                                            priority=priority)
        subjects[message_id] = subject
        clock.advance(1)
    result = run_cli(["worker", "--once"], env)
    assert result.returncode == 0, result.stderr
    assert [subjects[m] for m in _received_ids(smtp_server)] == [
        "urgent 1", "urgent 2", "bulk 1", "bulk 2", "bulk 3"]


CLAIM_LOOP = """
import os, sys
sys.path.insert(0, sys.argv[1])
import sysmail
spool = sysmail.Spool(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
names = []
while True:
    claims, _ = spool.claim(5)
    names += [c.path.name for c in claims]
    if not claims and not os.listdir(os.path.join(sys.argv[2], "new")):
        break
print("\\n".join(names))
"""


def test_concurrent_claims_in_three_processes_never_overlap(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root)
    for i in range(90):
        _enqueue(spool, f"race {i}")
    names = set(_ls(root / "new"))
    procs = [subprocess.Popen([sys.executable, "-c", CLAIM_LOOP, str(REPO), str(root)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    tokens, claimed = [], []
    try:
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
            tokens.append(_proc_token(proc.pid))
        for proc in procs:  # all three are ready: release them together
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        for proc, token in zip(procs, tokens, strict=True):
            out, _ = proc.communicate(timeout=30)
            assert proc.returncode == 0
            mine = out.split()
            assert all(name.endswith(f".{token}") for name in mine)
            claimed += mine
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    bases = [name.rpartition(".")[0] for name in claimed]
    assert len(bases) == len(set(bases)), "a message was claimed twice"
    assert set(bases) == names
    assert set(_ls(root / "cur")) == set(claimed)
    assert _ls(root / "new") == []


def test_ack_defer_release_fail_and_retry_move_files_as_documented(tmp_path: Path) -> None:
    root, clock = tmp_path / "spool", FakeClock(T0)
    spool = sysmail.Spool(root, clock=clock)
    raw = {}
    for subject in ("acked", "deferred", "released", "failed"):
        spool_id, _, _ = _enqueue(spool, subject)
        raw[subject] = (spool_id, (root / "new" / _only_with(root / "new", spool_id)).read_bytes())
    claims = {c.name.id: c for c in spool.claim(10)[0]}
    by_subject = {subject: claims[spool_id] for subject, (spool_id, _) in raw.items()}
    assert _ls(root / "new") == []

    spool.ack(by_subject["acked"])  # sent: gone from every folder
    assert not any(raw["acked"][0] in e for f in ("tmp", "new", "cur", "failed")
                   for e in os.listdir(root / f))

    spool.defer(by_subject["deferred"], T0 + 30)  # attempt+1, due later, same bytes
    deferred_name = f"1.{int((T0 + 30) * 1000):014d}.1.{raw['deferred'][0]}"
    assert (root / "new" / deferred_name).read_bytes() == raw["deferred"][1]

    spool.release(by_subject["released"])  # unchanged name: no attempt spent
    released = by_subject["released"].name
    assert (root / "new" / str(released)).read_bytes() == raw["released"][1]
    assert released.attempt == 0 and released.due_ms == int(T0 * 1000)

    reason = {"reason": "rejected", "code": 550, "reply": "550 5.7.1 no thanks"}
    spool.fail(by_subject["failed"], reason)
    failed_name = str(by_subject["failed"].name)
    assert _ls(root / "failed") == sorted([failed_name, f"{failed_name}.json"])
    assert (root / "failed" / failed_name).read_bytes() == raw["failed"][1]
    assert json.loads((root / "failed" / f"{failed_name}.json").read_bytes()) == {
        **reason, "failed_at": T0}
    assert spool.failed() == [{"id": raw["failed"][0], **reason, "failed_at": T0}]
    assert _ls(root / "cur") == []
    assert {k: spool.counts()[k] for k in STATES} == {"new": 1, "deferred": 1, "cur": 0,
                                                       "failed": 1}

    # the deferred message fails on its second attempt; retry brings it back at attempt 0
    clock.advance(30)
    [again] = [c for c in spool.claim(10)[0] if c.name.id == raw["deferred"][0]]
    assert again.name.attempt == 1
    spool.fail(again, {"reason": "attempts exhausted"})
    clock.advance(5)
    assert spool.retry(["no-such-id"]) == []
    assert spool.retry([raw["deferred"][0]]) == [raw["deferred"][0]]
    retried = f"1.{int((T0 + 35) * 1000):014d}.0.{raw['deferred'][0]}"
    assert (root / "new" / retried).read_bytes() == raw["deferred"][1]
    assert _ls(root / "failed") == sorted([failed_name, f"{failed_name}.json"])
    assert spool.retry() == [raw["failed"][0]]  # --all
    assert _ls(root / "failed") == []
    assert f"1.{int((T0 + 35) * 1000):014d}.0.{raw['failed'][0]}" in _ls(root / "new")


def _only_with(folder: Path, spool_id: str) -> str:
    [entry] = [e for e in os.listdir(folder) if e.endswith(f".{spool_id}")]
    return entry


CLAIM_AND_HANG = """
import sys
sys.path.insert(0, sys.argv[1])
import sysmail
claims, _ = sysmail.Spool(sys.argv[2]).claim(1)
print(claims[0].path.name, flush=True)
sys.stdin.read()
"""


def test_recover_takes_back_the_claim_of_a_sigkilled_process_only(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root)
    for subject in ("theirs", "ours"):
        _enqueue(spool, subject)
    with subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(REPO), str(root)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        theirs = proc.stdout.readline().strip()
        assert theirs.endswith(f".{_proc_token(proc.pid)}")
        [ours] = spool.claim(1)[0]
        assert spool.recover() == 0  # both owners alive: nothing is taken
        assert set(_ls(root / "cur")) == {theirs, ours.path.name}
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    assert spool.recover() == 1
    base = theirs.rpartition(".")[0]
    assert _ls(root / "new") == [base]
    assert _ls(root / "cur") == [ours.path.name]
    assert spool.recover() == 0
    [reclaimed] = spool.claim(1)[0]
    assert str(reclaimed.name) == base
    assert spool.read(reclaimed).data.startswith(b"From: ")


def _proc_state(pid: int) -> str:
    """The state letter of /proc/PID/stat (R, S, Z for a zombie...)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]


def test_recover_takes_back_the_claim_of_a_killed_process_not_yet_reaped(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root)
    _enqueue(spool, "orphan")
    with subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, str(REPO), str(root)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        theirs = proc.stdout.readline().strip()
        os.kill(proc.pid, signal.SIGKILL)
        _wait_until(lambda: _proc_state(proc.pid) == "Z", 5, "the killed claimer to be a zombie")
        assert spool.recover() == 1  # its process is gone; only its exit status is left
        assert _ls(root / "new") == [theirs.rpartition(".")[0]]


def test_recover_checks_the_start_time_not_just_the_pid(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root)
    for subject in ("reused pid", "dead pid"):
        _enqueue(spool, subject)
    claims = spool.claim(2)[0]
    # a claim of an earlier process that had our pid: same pid, another start time
    pid, start = _proc_token(os.getpid()).split("-")
    reused = root / "cur" / f"{claims[0].name}.{pid}-{int(start) + 1}"
    claims[0].path.rename(reused)
    # a claim of a process that has exited (and been reaped)
    with subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                          stdin=subprocess.PIPE) as short_lived:
        dead_token = _proc_token(short_lived.pid)
    assert short_lived.returncode == 0
    claims[1].path.rename(root / "cur" / f"{claims[1].name}.{dead_token}")
    (root / "cur" / "notes.txt").write_text("not a claim")

    assert spool.recover() == 2
    assert set(_ls(root / "new")) == {str(claims[0].name), str(claims[1].name)}
    assert _ls(root / "cur") == ["notes.txt"]


def test_clean_tmp_removes_only_files_older_than_36_hours(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root)
    queued, _, _ = _enqueue(spool, "queued")
    now = time.time()
    ages = {"ten-days": 240 * HOUR, "just-over": 36 * HOUR + 60, "just-under": 36 * HOUR - 60,
            "fresh": 0.0}
    for name, age in ages.items():
        path = root / "tmp" / name
        path.write_bytes(b"partial")
        os.utime(path, (now - age, now - age))
    assert spool.clean_tmp() == 2
    assert _ls(root / "tmp") == ["fresh", "just-under"]
    assert spool.clean_tmp() == 0
    assert _only(root / "new").endswith(f".{queued}")


def test_counts_tell_due_from_deferred_with_a_fake_clock(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    spool = sysmail.Spool(tmp_path / "spool", clock=clock)

    def counts() -> dict[str, int]:
        return {k: spool.counts()[k] for k in STATES}

    assert spool.counts() == {"new": 0, "deferred": 0, "cur": 0, "failed": 0,
                              "oldest_age_seconds": 0, "next_retry_in_seconds": None}
    urgent, _, _ = _enqueue(spool, "urgent", priority=sysmail.URGENT)
    _enqueue(spool, "bulk")
    _enqueue(spool, "later", due=T0 + 60)
    assert counts() == {"new": 2, "deferred": 1, "cur": 0, "failed": 0}
    clock.advance(30)
    assert spool.counts()["oldest_age_seconds"] == 30.0
    [claim] = spool.claim(1)[0]
    assert claim.name.id == urgent
    assert counts() == {"new": 1, "deferred": 1, "cur": 1, "failed": 0}
    spool.fail(claim, {"reason": "rejected"})
    assert counts() == {"new": 1, "deferred": 1, "cur": 0, "failed": 1}
    clock.advance(29.999)
    assert counts() == {"new": 1, "deferred": 1, "cur": 0, "failed": 1}
    clock.advance(0.002)
    assert counts() == {"new": 2, "deferred": 0, "cur": 0, "failed": 1}
    assert spool.counts()["oldest_age_seconds"] == pytest.approx(60.001)


def test_claim_ignores_foreign_names_in_new(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool = sysmail.Spool(root, clock=FakeClock(T0))
    foreign = ["README", "notes.txt", "1.2.3", "a.b.c.d", ".hidden", "0.soon.0.abc",
               "x.00000000000000.0.abc"]
    for name in foreign:
        (root / "new" / name).write_bytes(b"not a spool entry")
    queued, _, _ = _enqueue(spool, "real")
    assert {k: spool.counts()[k] for k in STATES} == {"new": 1, "deferred": 0, "cur": 0,
                                                       "failed": 0}
    claims, next_due = spool.claim(50)
    assert [c.name.id for c in claims] == [queued]
    assert next_due is None
    assert _ls(root / "new") == sorted(foreign)
    assert all((root / "new" / n).read_bytes() == b"not a spool entry" for n in foreign)
    assert spool.claim(50) == ([], None)


def test_worker_moves_an_unreadable_spool_file_to_failed_and_sends_the_rest(
        smtp_server: SmtpServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)
    [good] = _enqueue_many(spool, 1)
    garbage = f"0.{int(time.time() * 1000) - 5000:014d}.0.0badc0ffee"
    (spool / "new" / garbage).write_bytes(b"sysmail-spool/1 {not json\nrest")
    result = run_cli(["worker", "--once"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent 1, deferred 0, failed 1, expired 0, released 0"
    assert _received_ids(smtp_server) == [good]
    letters = json.loads(run_cli(["failed", "--json"], env).stdout)
    assert [(x["id"], x["reason"]) for x in letters] == [("0badc0ffee", "unauthenticated")]
    assert _counts(_status(env)) == {"new": 0, "deferred": 0, "cur": 0, "failed": 1}


# --------------------------------------------------------------------------- crashes

ENQUEUE_FOREVER = """
import sys
sys.path.insert(0, sys.argv[1])
import sysmail
mailer = sysmail.Mailer(sysmail.Config.from_env({"SYSTEM_DOMAIN": "example.com",
                                                 "SYSMAIL_SPOOL": sys.argv[2]}))
body = "All work and no play makes a dull message.\\n" * 3000
print("ready", flush=True)
i = 0
while True:
    mailer.enqueue_message("ada@example.org", f"{sys.argv[3]}-{i}", body, "<p>dull</p>")
    i += 1
"""
CRASH_BODY = "All work and no play makes a dull message.\n" * 3000


def _assert_complete(path: Path) -> str:
    """A spool file is a header line plus a whole message; return its Message-ID."""
    header, data = _split_spool_file(path.read_bytes())
    assert set(header) >= {"message_id", "from", "to", "queued_at", "expires_at"}
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Message-ID"] == header["message_id"]
    assert not msg.defects and all(not part.defects for part in msg.walk())
    assert msg.get_body(("plain",)).get_content().replace("\r\n", "\n") == CRASH_BODY
    assert msg.get_body(("html",)).get_content().strip() == "<p>dull</p>"
    return header["message_id"]


def _assert_whole(path: Path) -> None:
    """A quick look at a file as it appears in new/: header, Message-ID, closing boundary."""
    header, data = _split_spool_file(path.read_bytes())
    assert header["message_id"].encode() in data
    assert data.rstrip().endswith(b"--"), data[-80:]


def test_sigkill_during_enqueue_never_leaves_a_partial_file_in_new(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    rng = random.Random()
    delays = [rng.uniform(0.03, 0.3) for _ in range(5)]
    checked: dict[str, str] = {}
    seen: set[str] = set()
    for round_, delay in enumerate(delays):
        with subprocess.Popen([sys.executable, "-c", ENQUEUE_FOREVER, str(REPO), str(root),
                               f"round{round_}"], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:
            try:
                assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline:  # every name is whole as soon as it shows up
                    for entry in set(os.listdir(root / "new")) - seen:
                        _assert_whole(root / "new" / entry)
                        seen.add(entry)
            finally:  # the writer never stops by itself
                os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=10) == -signal.SIGKILL
        entries = _ls(root / "new")
        assert set(checked) <= set(entries)
        checked.update({e: _assert_complete(root / "new" / e) for e in entries if e not in checked})
    message_ids = list(checked.values())
    assert len(set(message_ids)) == len(entries)
    assert len(entries) >= len(delays), f"too few messages written to test anything ({delays})"
    assert _ls(root / "cur") == [] and _ls(root / "failed") == []
    # a leftover in tmp/ is either a crash before the link (invisible) or after it (same inode)
    for leftover in _ls(root / "tmp"):
        twin = root / "new" / leftover
        if twin.exists():
            assert twin.stat().st_ino == (root / "tmp" / leftover).stat().st_ino
    spool = sysmail.Spool(root)
    claims, _ = spool.claim(1000)
    assert len(claims) == len(entries)
    assert {spool.read(c).message_id for c in claims} == set(message_ids)


class SlowAckSMTP(SinkSMTP):
    """The sink's SMTP that, while `hold` is set, records a message and waits before its 250."""

    hold = threading.Event()
    delay = 5.0  # seconds between recording a message and its 250, while held

    async def push(self, status: str | bytes) -> None:
        text = status if isinstance(status, str) else status.decode(errors="replace")
        if text.startswith("250 2.0.0") and self.hold.is_set():
            await asyncio.sleep(self.delay)
        await super().push(status)


@contextlib.contextmanager
def held_relay(smtp_class: type[SlowAckSMTP]) -> Iterator[SmtpServer]:
    """A plain relay of a SlowAckSMTP class, stopped (and its hold let go) afterwards."""
    relay = SmtpServer("smtp+plain", smtp_class=smtp_class)
    relay.start()
    try:
        yield relay
    finally:
        smtp_class.hold.clear()
        relay.stop()


def test_the_duplicate_window_is_one_message_per_crashed_worker(
        tmp_path: Path, workers: Callable[..., Worker]) -> None:
    with held_relay(SlowAckSMTP) as relay:
        spool = tmp_path / "spool"
        ids = _enqueue_many(spool, 8)
        env = _env(relay, spool)
        SlowAckSMTP.hold.set()  # the relay has the message; the worker waits for its 250
        relay.sink.record_wire()
        worker = workers(env)
        _wait_until(lambda: relay.messages, 60, "a message at the relay")
        first_recorded = time.monotonic()
        # every message in flight has reached the relay: the relay has recorded nothing and
        # received not a byte, on any connection, for 1 s (well inside the 5 s hold)
        quiet = 1.0
        in_flight, _ = _wait_quiet(lambda: (len(relay.messages), len(relay.sink.wire or [])),
                                   quiet, SlowAckSMTP.delay - 1, "the relay's traffic")
        worker.kill()
        assert time.monotonic() - first_recorded < SlowAckSMTP.delay, "the hold ran out"
        SlowAckSMTP.hold.clear()
        result = run_cli(["worker", "--once"], env)
        assert result.returncode == 0, result.stderr
        received = _received_ids(relay)
    assert set(received) == set(ids)
    assert len(received) - len(ids) == in_flight  # each accepted-unacknowledged one again
    # however many connections (4 by default) sign and negotiate at once, content is
    # sent and settled one message at a time: one accepted-but-unforgotten message at most
    assert in_flight == 1, f"{in_flight} messages resent after one SIGKILL"


class BriefAckSMTP(SlowAckSMTP):
    """SlowAckSMTP with a hold of its own and a 250 one second late while held."""

    hold = threading.Event()
    delay = 1.0


class KillAckSMTP(SlowAckSMTP):
    """SlowAckSMTP with a hold of its own (a worker is killed while it waits for a 250)."""

    hold = threading.Event()


@pytest.mark.parametrize("connections", ["1", None],
                         ids=["one-connection", "default-connections"])
def test_sigkilled_worker_loses_nothing_after_restart(
        tmp_path: Path, workers: Callable[..., Worker], connections: str | None) -> None:
    """Two workers SIGKILLed mid-queue, each while it holds claims (the relay holds back its
    250s at that moment, so the kill cannot fall between two batches), then a third: every
    message arrives, at most one twice per kill, and the spool ends empty."""
    with held_relay(KillAckSMTP) as relay:
        spool = tmp_path / "spool"
        ids = _enqueue_many(spool, 300)
        env = _env(relay, spool)
        if connections is not None:  # None: SYSMAIL_SMTP_CONNECTIONS unset, its default
            env["SYSMAIL_SMTP_CONNECTIONS"] = connections
        orphaned_claims = []
        for threshold in (60, 160):
            worker = workers(env)
            token = worker.token
            _wait_until(lambda n=threshold: len(relay.messages) >= n, 60,
                        f"{threshold} messages at the relay")
            KillAckSMTP.hold.set()  # the next 250 waits: the worker holds its claims
            _wait_until(lambda t=token: any(e.endswith(f".{t}") for e in _ls(spool / "cur")),
                        10, "the worker to hold a claim")
            worker.kill()
            KillAckSMTP.hold.clear()
            orphaned_claims.append([e for e in _ls(spool / "cur") if e.endswith(f".{token}")])
        assert all(orphaned_claims), "a kill left no claim in cur/: recovery not exercised"
        assert len(set(_received_ids(relay))) < len(ids), "killed after it had finished"

        final = workers(env)
        _wait_until(lambda: set(_received_ids(relay)) >= set(ids) and _spool_empty(spool),
                    60, "every message delivered and the spool drained")
        assert final.term(timeout=10) == 0
        received = _received_ids(relay)
    per_id = Counter(received)
    assert set(per_id) == set(ids)
    # what can be resent: the message between the relay's 250 and the unlink, one per crashed
    # worker whatever its connections (README; test_the_duplicate_window_is_one_message_...)
    duplicates = len(received) - len(per_id)
    assert duplicates <= len(orphaned_claims), f"{duplicates} duplicates: {per_id.most_common(4)}"
    assert _counts(_status(env)) == {"new": 0, "deferred": 0, "cur": 0, "failed": 0}


def test_a_running_worker_takes_back_the_claims_of_a_killed_peer(
        tmp_path: Path, workers: Callable[..., Worker]) -> None:
    # While held, every 250 comes 1 s late, so the victim keeps its batch claimed until it is
    # killed, however slowly the two processes start (unheld, a victim that starts first can
    # send all 300 before the survivor runs).
    with held_relay(BriefAckSMTP) as relay:
        spool = tmp_path / "spool"
        ids = _enqueue_many(spool, 300)
        env = _env(relay, spool)
        BriefAckSMTP.hold.set()
        victim = workers(env)
        victim_token = victim.token

        def victim_claims() -> list[str]:
            return [e for e in os.listdir(spool / "cur") if e.endswith(f".{victim_token}")]

        _wait_until(lambda: len(victim_claims()) >= 5, 60, "the victim to hold a batch of claims")
        survivor = workers(env)
        survivor.wait_event("sender_started")  # running; its start-up recovery found no orphan
        held = victim_claims()  # each 250 is 1 s late: the victim still holds these at its death
        assert held, "the victim let go of its claims before it was killed"
        victim.kill()
        BriefAckSMTP.hold.clear()
        _wait_until(lambda: set(_received_ids(relay)) >= set(ids) and _spool_empty(spool),
                    60, "the survivor to deliver everything, the victim's claims included")
        assert survivor.term(timeout=10) == 0
        received = _received_ids(relay)
        sent_by_survivor = {event["id"] for event in survivor.events("sent")}
    assert {sysmail.SpoolName.parse(name).id for name in held} & sent_by_survivor, \
        "the survivor sent none of the messages the victim held when it died"
    assert set(received) == set(ids)
    assert len(received) - len(set(received)) <= 1  # one crashed worker: one message at most


def test_three_workers_on_one_spool_send_each_message_exactly_once(
        smtp_server: SmtpServer, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)
    crew = [workers(env) for _ in range(3)]
    for worker in crew:
        worker.wait_event("sender_started")
    ids = _enqueue_many(spool, 600)  # each one wakes all three: they race for every message
    _wait_until(lambda: len(smtp_server.messages) >= len(ids) and _spool_empty(spool), 90,
                "600 messages at the sink and an empty spool")
    assert [w.term(timeout=10) for w in crew] == [0, 0, 0]
    per_id = Counter(_received_ids(smtp_server))
    assert set(per_id) == set(ids)
    assert [mid for mid, n in per_id.items() if n != 1] == []
    sent = [len(w.events("sent")) for w in crew]
    assert sum(sent) == len(ids)
    assert sum(n > 0 for n in sent) >= 2, f"the workers did not share the queue: {sent}"
    assert _counts(_status(env)) == {"new": 0, "deferred": 0, "cur": 0, "failed": 0}


# --------------------------------------------------------------------------- wake-up and signals


class Heartbeats:
    """A stand-in for systemd's NOTIFY_SOCKET that counts a worker's WATCHDOG=1 pings.

    With WATCHDOG_USEC this short every turn of the sender loop pings (at most every quarter
    of it), right before the loop waits: n pings mean n turns done and the loop waiting."""

    WATCHDOG_USEC = 40_000

    def __init__(self) -> None:
        self.address = f"@sysmail-test-{os.getpid()}-{os.urandom(6).hex()}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.pings: list[float] = []

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.address, "WATCHDOG_USEC": str(self.WATCHDOG_USEC)}

    def count(self) -> int:
        """Read what has arrived; return the number of WATCHDOG=1 pings so far."""
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return len(self.pings)
            if b"WATCHDOG=1" in data.split(b"\n"):
                self.pings.append(time.monotonic())


@pytest.fixture
def heartbeats() -> Iterator[Heartbeats]:
    beats = Heartbeats()
    yield beats
    beats.sock.close()


def test_an_idle_worker_wakes_at_once_when_another_process_queues_mail(
        smtp_server: SmtpServer, tmp_path: Path, workers: Callable[..., Worker],
        heartbeats: Heartbeats) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)
    worker = workers({**env, **heartbeats.env()})
    worker.wait_event("sender_started")
    # past its first idle poll, waiting now: the loop's second turn has pinged
    _wait_until(lambda: heartbeats.count() >= 2, 60, "two turns of the sender loop")
    latencies = []
    for i in range(4):
        message_id = _send(env, f"Wake {i}")
        queued = time.monotonic()
        _wait_until(lambda m=message_id: m in _received_ids(smtp_server), 5, message_id)
        latencies.append(time.monotonic() - queued)
    # Each send after the first starts right after a delivery, when a worker that only polled
    # (every second) would have just gone back to sleep: it would take ~0.8 s every time.
    assert max(latencies) < 1.0, latencies
    assert statistics.median(latencies) < 0.4, latencies
    assert worker.term() == 0


def test_sigterm_stops_an_idle_worker_with_exit_0(
        smtp_server: SmtpServer, tmp_path: Path, workers: Callable[..., Worker],
        heartbeats: Heartbeats) -> None:
    spool = tmp_path / "spool"
    worker = workers({**_env(smtp_server, spool), **heartbeats.env()})
    worker.wait_event("sender_started")
    assert len(_ls(spool / "wake")) == 1  # its wake-up listener is registered
    # idle: its loop has turned once and waits; the queue is empty, the relay has seen no
    # connection, and nothing (spool, relay, the worker's log) has changed for 0.3 s
    _wait_until(lambda: heartbeats.count() >= 1, 60, "a turn of the sender loop")
    state = _wait_quiet(lambda: (_spool_empty(spool), smtp_server.connections,
                                 len(smtp_server.messages), worker.log.stat().st_size),
                        0.3, 10, "the idle worker")
    assert state[:3] == (True, 0, 0)
    started = time.monotonic()
    assert worker.term(timeout=3) == 0
    assert time.monotonic() - started < 3
    assert worker.events("sender_stopped")
    assert _ls(spool / "wake") == []


def test_sigterm_with_the_relay_down_leaves_the_mail_queued(
        smtp_server: SmtpServer, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)
    smtp_server.stop()
    worker = workers(env)
    worker.wait_event("sender_started")
    message_id = _send(env)
    worker.wait_event("relay_unavailable")
    started = time.monotonic()
    assert worker.term(timeout=3) == 0
    assert time.monotonic() - started < 3
    entry = _only(spool / "new")
    assert sysmail.SpoolName.parse(entry).attempt == 0  # an outage burns no attempt
    header, _ = _split_spool_file((spool / "new" / entry).read_bytes())
    assert header["message_id"] == message_id
    assert _counts(_status(env)) == {"new": 1, "deferred": 0, "cur": 0, "failed": 0}
    smtp_server.start()
    assert run_cli(["worker", "--once"], env).returncode == 0
    assert _received_ids(smtp_server) == [message_id]


def test_sigterm_stops_a_busy_worker_after_its_current_message(
        smtp_server: SmtpServer, tmp_path: Path, workers: Callable[..., Worker]) -> None:
    spool = tmp_path / "spool"
    ids = _enqueue_many(spool, 200)
    env = _env(smtp_server, spool)
    worker = workers(env)
    _wait_until(lambda: len(smtp_server.messages) >= 10, 60, "10 messages at the sink")
    at_signal = len(smtp_server.messages)
    started = time.monotonic()
    assert worker.term(timeout=3) == 0
    assert time.monotonic() - started < 3
    delivered = set(_received_ids(smtp_server))
    # the messages in flight (one per connection) are finished; the rest of the batch of 50
    # goes back unsent
    assert len(delivered) <= at_signal + 10, f"{at_signal} at SIGTERM, {len(delivered)} at exit"
    status = _status(env)
    assert _counts(status) == {"new": len(ids) - len(delivered), "deferred": 0, "cur": 0,
                               "failed": 0}
    assert {sysmail.SpoolName.parse(e).attempt for e in _ls(spool / "new")} == {0}
    assert worker.events("sender_stopped")


# --------------------------------------------------------------------------- CLI


def test_status_counts_after_enqueue_failure_and_send(smtp_server: SmtpServer,
                                                      tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)
    first = _send(env, "Rejected")
    status = _status(env)
    assert _counts(status) == {"new": 1, "deferred": 0, "cur": 0, "failed": 0}
    assert status["last_sent_at"] is None

    smtp_server.sink.script_data(["550 5.7.1 Message rejected by policy"])
    result = run_cli(["worker", "--once"], env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent 0, deferred 0, failed 1, expired 0, released 0"
    [second] = _enqueue_many(spool, 1)
    assert _counts(_status(env)) == {"new": 1, "deferred": 0, "cur": 0, "failed": 1}
    plain = run_cli(["status"], env)
    assert plain.returncode == 0, plain.stderr
    lines = dict(line.split(": ", 1) for line in plain.stdout.splitlines())
    assert {k: lines[k] for k in STATES} == {"new": "1", "deferred": "0", "cur": "0",
                                             "failed": "1"}
    assert lines["last sent at"] == "never"

    assert run_cli(["worker", "--once"], env).returncode == 0
    status = _status(env)
    assert _counts(status) == {"new": 0, "deferred": 0, "cur": 0, "failed": 1}
    assert isinstance(status["last_sent_at"], str) and status["last_sent_at"][:2] == "20"
    assert _received_ids(smtp_server) == [second]
    assert [x["rfcMessageId"] for x in sysmail.Spool(spool).failed()] == [first]


def test_worker_once_with_the_relay_down_exits_75_and_keeps_the_mail(
        smtp_server: SmtpServer, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)
    smtp_server.stop()
    message_id = _send(env)
    result = run_cli(["worker", "--once"], env)
    assert result.returncode == 75
    assert result.stdout.strip() == "sent 0, deferred 0, failed 0, expired 0, released 1"
    sentences = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(sentences) == 1, result.stderr
    assert sentences[0].startswith("sysmail: ") and "relay" in sentences[0]
    assert sentences[0].count(". ") == 0
    assert [e["event"] for e in _json_lines(result.stderr)].count("relay_unavailable") == 1
    entry = _only(spool / "new")
    assert sysmail.SpoolName.parse(entry).attempt == 0
    assert _split_spool_file((spool / "new" / entry).read_bytes())[0]["message_id"] == message_id
    assert _counts(_status(env)) == {"new": 1, "deferred": 0, "cur": 0, "failed": 0}


def test_worker_once_leaves_451_deferred_mail_for_later(smtp_server: SmtpServer,
                                                        tmp_path: Path) -> None:
    root = tmp_path / "spool"
    # after a 4th failed attempt the next delay is 10 minutes (+-20 %): however slowly this
    # machine runs the second worker and the status below, the message is not due yet
    env = {**_env(smtp_server, root), "SYSMAIL_RETRY_SCHEDULE": "1,2,4,10m"}
    _, header, _ = _enqueue(sysmail.Spool(root), "Deferred", attempt=3)
    smtp_server.sink.script_data(["451 4.3.0 Try again later"])
    before = time.time()
    result = run_cli(["worker", "--once"], env)
    after = time.time()
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent 0, deferred 1, failed 0, expired 0, released 0"
    name = sysmail.SpoolName.parse(_only(root / "new"))
    assert name.attempt == 4
    assert before + 600 * 0.8 <= name.due_ms / 1000 <= after + 600 * 1.2
    assert _counts(_status(env)) == {"new": 0, "deferred": 1, "cur": 0, "failed": 0}

    again = run_cli(["worker", "--once"], env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "sent 0, deferred 0, failed 0, expired 0, released 0"
    assert smtp_server.sink.data_attempts == 1 and smtp_server.messages == []
    assert _counts(_status(env)) == {"new": 0, "deferred": 1, "cur": 0, "failed": 0}
    assert sysmail.SpoolName.parse(_only(root / "new")) == name
    assert header["message_id"] not in _received_ids(smtp_server)


def test_failed_lists_dead_letters_and_retry_puts_them_back(smtp_server: SmtpServer,
                                                            tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    env = _env(smtp_server, spool)

    def counts() -> dict[str, int]:
        return {k: sysmail.Spool(spool).counts()[k] for k in STATES}

    message_ids = _enqueue_many(spool, 2)
    smtp_server.sink.script_data(["550 5.1.1 No such user", "554 5.7.1 Looks like spam"])
    assert run_cli(["worker", "--once"], env).stdout.strip() == (
        "sent 0, deferred 0, failed 2, expired 0, released 0")
    listed = run_cli(["failed", "--json"], env)
    assert listed.returncode == 0
    letters = {x["rfcMessageId"]: x for x in json.loads(listed.stdout)}
    assert set(letters) == set(message_ids)
    replies = {(x["reason"], x["code"], x["reply"].removeprefix(f"{x['code']} "))
               for x in letters.values()}
    assert replies == {("rejected", 550, "5.1.1 No such user"),
                       ("rejected", 554, "5.7.1 Looks like spam")}
    first_id, second_id = (letters[m]["id"] for m in message_ids)
    plain = run_cli(["failed"], env).stdout
    assert f"{first_id}  ad-hoc  to user0@example.org: rejected 5" in plain
    assert f"{second_id}  ad-hoc  to user1@example.org: rejected 5" in plain
    assert len(plain.splitlines()) == 2

    unknown = run_cli(["retry", "feedbeef"], env)
    assert unknown.returncode == 65
    assert unknown.stderr.splitlines()[-1] == "sysmail: no failed message with id feedbeef"
    assert counts() == {"new": 0, "deferred": 0, "cur": 0, "failed": 2}

    retried = run_cli(["retry", first_id], env)
    assert (retried.returncode, retried.stdout.strip()) == (0, "requeued 1 message(s)")
    assert counts() == {"new": 1, "deferred": 0, "cur": 0, "failed": 1}
    retried = run_cli(["retry", "--all"], env)
    assert (retried.returncode, retried.stdout.strip()) == (0, "requeued 1 message(s)")
    assert counts() == {"new": 2, "deferred": 0, "cur": 0, "failed": 0}
    assert _ls(spool / "failed") == []
    assert {sysmail.SpoolName.parse(e).id for e in _ls(spool / "new")} == {first_id, second_id}
    assert all(sysmail.SpoolName.parse(e).attempt == 0 for e in _ls(spool / "new"))

    assert run_cli(["worker", "--once"], env).returncode == 0
    assert sorted(_received_ids(smtp_server)) == sorted(message_ids)  # same Message-IDs
    assert _counts(_status(env)) == {"new": 0, "deferred": 0, "cur": 0, "failed": 0}


def test_an_index_holding_ten_names_still_claims_thirty_five_in_order(tmp_path: Path) -> None:
    """The due index holds at most `limit` names (a million queued must not cost hundreds of
    MB): with a limit of 10, 35 queued messages are all claimed, each once, urgent first and
    then oldest due first, and an urgent one queued mid-way goes next."""
    clock = FakeClock(T0)
    spool = sysmail.Spool(tmp_path / "spool", clock=clock, index=sysmail._DueIndex(limit=10))
    subjects = {}
    for number in range(35):
        _, header, _ = _enqueue(spool, f"bulk {number:02d}", due=T0 - 100 + number)
        subjects[header["message_id"]] = f"bulk {number:02d}"
    order: list[str] = []
    claims, _ = spool.claim(4)
    order += [subjects[spool.read(claim).message_id] for claim in claims]
    assert sum(map(len, spool._index._heaps.values())) == 6  # 10 indexed, 4 claimed
    _, header, _ = _enqueue(spool, "urgent", sysmail.URGENT, due=T0)
    subjects[header["message_id"]] = "urgent"
    while claims:
        claims, _ = spool.claim(4)
        order += [subjects[spool.read(claim).message_id] for claim in claims]
    assert order[:5] == ["bulk 00", "bulk 01", "bulk 02", "bulk 03", "urgent"]
    assert order[5:] == [f"bulk {n:02d}" for n in range(4, 35)]
