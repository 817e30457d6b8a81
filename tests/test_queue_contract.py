"""The Queue contract: one suite run over every queue, sysmail.Spool and sysmail.RedisQueue.

Each test checks one line of the contract through behaviour only (what enqueue, claim, read,
counts and failed() show), so it holds for both: the spool on a real folder, the Redis queue
on the real redis-server of the redis_server fixture under a prefix of its own, both on one
FakeClock. A dead owner is a real process that claims and exits without settling.
Where the two legitimately differ (Spool.counts' oldest_age_seconds, the "queue" key of a
Redis dead letter, the order a released message takes among others due), only the common
contract is tested.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, FakeClock, run_python

import sysmail

T0 = 1_800_000_000.0  # fake-clock epoch (whole milliseconds all the way, so due times compare)
HOUR = 3600.0
SENDER = "noreply@example.com"
ADA, BOB, CY = "ada@example.org", "bob@example.org", "cy@example.org"
STATES = ("new", "deferred", "cur", "failed")
EMPTY = dict.fromkeys(STATES, 0)
REJECTED = {"reason": "rejected", "code": 550, "reply": "550 5.1.1 No such user"}
AnyQueue = sysmail.Spool | sysmail.RedisQueue  # sysmail.Queue once the refactor lands

# Run in its own process: claim up to LIMIT messages at NOW, print their ids, and die
# without settling them (os._exit skips every cleanup a normal exit would run).
CLAIM_AND_DIE = """
import os
import sys

import sysmail

kind, location, prefix, now, limit = sys.argv[1:]
clock = lambda: float(now)
if kind == "spool":
    queue = sysmail.Spool(location, clock=clock)
else:
    queue = sysmail.RedisQueue(location, clock=clock, prefix=prefix)
claims, _ = queue.claim(int(limit))
print(" ".join(claim.name.id for claim in claims), flush=True)
os._exit(0)
"""


# --------------------------------------------------------------------------- harness


@dataclass(frozen=True)
class Backend:
    """Where one queue implementation keeps its messages, and how to open it again."""

    kind: str
    location: str  # the spool folder, or the Redis URL
    prefix: str  # the Redis key prefix ("" for the spool)
    clock: FakeClock

    def open(self) -> AnyQueue:
        """A new handle on the same messages, as another worker process would open it."""
        if self.kind == "spool":
            return sysmail.Spool(self.location, clock=self.clock)
        return sysmail.RedisQueue(self.location, clock=self.clock, prefix=self.prefix)

    def claim_in_a_process_that_dies(self, folder: Path, limit: int = 1) -> list[str]:
        """Claim up to limit messages in a subprocess that exits unsettled; their ids."""
        script = folder / "claim_and_die.py"
        script.write_text(CLAIM_AND_DIE)
        args = [self.kind, self.location, self.prefix, repr(self.clock()), str(limit)]
        done = run_python(script, args, {"PYTHONPATH": str(REPO)}, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()


@pytest.fixture
def clock() -> FakeClock:
    """The one fake clock the queue under test reads."""
    return FakeClock(T0)


@pytest.fixture(params=["spool", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Backend:
    """Each contract test runs against the spool, then against Redis (started only for it)."""
    if request.param == "spool":
        return Backend("spool", str(tmp_path / "spool"), "", clock)
    server = request.getfixturevalue("redis_server")
    return Backend("redis", server.url, f"contract-{secrets.token_hex(4)}:", clock)


@pytest.fixture
def queue(backend: Backend) -> AnyQueue:
    """The queue implementation under test."""
    return backend.open()


def mail(subject: str, now: float, to: Iterable[str] = (ADA,)) -> tuple[dict, bytes]:
    """A queue header and the RFC 5322 bytes of a small message."""
    rcpts = list(to)
    message_id = f"<{subject.replace(' ', '-')}.{secrets.token_hex(4)}@example.com>"
    header = {"message_id": message_id, "from": SENDER, "to": rcpts, "template": "contract",
              "queued_at": now, "expires_at": now + HOUR}
    data = (f"From: {SENDER}\r\nTo: {', '.join(rcpts)}\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\n{subject}\r\n").encode()
    return header, data


def put(queue: AnyQueue, subject: str, priority: int = sysmail.BULK, due: float | None = None,
        attempt: int = 0, to: Iterable[str] = (ADA,)) -> str:
    """Enqueue a small message; its id."""
    header, data = mail(subject, queue.clock(), to)
    return queue.enqueue(header, data, priority, due=due, attempt=attempt)


def ids(claims: list[sysmail.Claim]) -> list[str]:
    """The message ids of claims, in claim order."""
    return [claim.name.id for claim in claims]


def claim_one(queue: AnyQueue) -> sysmail.Claim:
    """Claim the single message due now (failing when there is not exactly one)."""
    [claim], _ = queue.claim(10)
    return claim


def states(queue: AnyQueue) -> dict[str, int]:
    """The four counts every queue reports (Spool adds oldest_age_seconds)."""
    counts = queue.counts()
    return {state: counts[state] for state in STATES}


# --------------------------------------------------------------------------- enqueue, read


def test_enqueue_stores_the_message_and_read_gives_it_back(
    backend: Backend, queue: AnyQueue,
) -> None:
    """enqueue: store durably, return an id; read(claim): the same header fields and bytes."""
    header, data = mail("Your code", T0, to=(ADA, BOB))
    ident = queue.enqueue(header, data, sysmail.URGENT)
    assert isinstance(ident, str) and ident
    worker = backend.open()  # stored, not just held by the handle that wrote it
    claim = claim_one(worker)
    assert (claim.name.id, claim.name.priority, claim.name.attempt) == (ident, sysmail.URGENT, 0)
    message = worker.read(claim)
    assert message.header() == header
    assert (message.id, message.mail_from, message.rcpts) == (ident, SENDER, (ADA, BOB))
    assert (message.priority, message.attempt, message.data) == (sysmail.URGENT, 0, data)


def test_enqueue_returns_a_new_id_for_every_message(queue: AnyQueue) -> None:
    """enqueue: return an id (one per message, even at one and the same clock time)."""
    queued = [put(queue, f"Notice {i}") for i in range(20)]
    assert len(set(queued)) == 20
    assert sorted(ids(queue.claim(50)[0])) == sorted(queued)


def test_enqueue_keeps_the_attempt_it_is_given(queue: AnyQueue) -> None:
    """enqueue(..., attempt): the message is stored with that attempt count."""
    put(queue, "Third try", attempt=2)
    claim = claim_one(queue)
    assert claim.name.attempt == 2
    assert queue.read(claim).attempt == 2


# --------------------------------------------------------------------------- claim


def test_a_message_due_later_is_claimed_only_from_its_due_time(
    clock: FakeClock, queue: AnyQueue,
) -> None:
    """claim: only due messages; the next due time of what is left is reported."""
    ident = put(queue, "Later", due=T0 + 60)
    assert queue.claim(10) == ([], T0 + 60)
    clock.advance(59)
    assert queue.claim(10) == ([], T0 + 60)
    clock.advance(1)
    claims, next_due = queue.claim(10)
    assert (ids(claims), next_due) == ([ident], None)


def test_claim_reports_the_earliest_due_time_across_priorities(queue: AnyQueue) -> None:
    """claim: also the next due time of what is left (the earliest, whatever its priority)."""
    now = put(queue, "Now")
    put(queue, "Urgent later", sysmail.URGENT, due=T0 + 30)
    put(queue, "Bulk sooner", sysmail.BULK, due=T0 + 10)
    claims, next_due = queue.claim(10)
    assert (ids(claims), next_due) == ([now], T0 + 10)


def test_claim_reports_the_due_time_of_due_messages_the_limit_left(queue: AnyQueue) -> None:
    """claim: also the next due time of what is left, when the limit left due messages."""
    first = put(queue, "First", due=T0 - 2)
    put(queue, "Second", due=T0 - 1)
    claims, next_due = queue.claim(1)
    assert (ids(claims), next_due) == ([first], T0 - 1)


def test_urgent_messages_are_claimed_before_bulk(queue: AnyQueue) -> None:
    """claim: most urgent priority first, even before bulk mail that was due earlier."""
    older = put(queue, "Old newsletter", sysmail.BULK, due=T0 - 60)
    newer = put(queue, "Newsletter", sysmail.BULK, due=T0 - 30)
    urgent = put(queue, "Your code", sysmail.URGENT)
    assert ids(queue.claim(1)[0]) == [urgent]
    assert ids(queue.claim(10)[0]) == [older, newer]


def test_within_a_priority_the_earliest_due_is_claimed_first(queue: AnyQueue) -> None:
    """claim: within a priority, by due time (not by the order of enqueueing)."""
    late = put(queue, "Due last", due=T0 - 10)
    early = put(queue, "Due first", due=T0 - 20)
    middle = put(queue, "Due between", due=T0 - 15)
    assert ids(queue.claim(10)[0]) == [early, middle, late]


def test_claim_takes_at_most_limit_messages(queue: AnyQueue) -> None:
    """claim(limit): up to limit due messages per call, each message once."""
    queued = {put(queue, f"Notice {i}") for i in range(5)}
    batches = [ids(queue.claim(2)[0]) for _ in range(4)]
    assert [len(batch) for batch in batches] == [2, 2, 1, 0]
    claimed = [ident for batch in batches for ident in batch]
    assert sorted(claimed) == sorted(queued)


def test_a_claimed_message_is_not_claimed_again(backend: Backend, queue: AnyQueue) -> None:
    """claim: a claimed message is no one else's to claim, in this handle or another."""
    put(queue, "Once")
    claim_one(queue)
    assert queue.claim(10) == ([], None)
    assert backend.open().claim(10) == ([], None)
    assert states(queue) == {**EMPTY, "cur": 1}


# --------------------------------------------------------------------------- settling a claim


def test_ack_forgets_the_message(backend: Backend, queue: AnyQueue) -> None:
    """ack(claim): forget a delivered message."""
    put(queue, "Delivered")
    queue.ack(claim_one(queue))
    assert states(queue) == EMPTY
    assert queue.claim(10) == ([], None)
    assert backend.open().claim(10) == ([], None)
    assert queue.failed() == []


def test_defer_makes_the_message_due_at_due_with_one_more_attempt(
    clock: FakeClock, queue: AnyQueue,
) -> None:
    """defer(claim, due): back for another attempt at due; attempt + 1."""
    header, data = mail("Try again", T0)
    ident = queue.enqueue(header, data, sysmail.BULK, attempt=1)
    queue.defer(claim_one(queue), T0 + 120)
    assert states(queue) == {**EMPTY, "deferred": 1}
    assert queue.claim(10) == ([], T0 + 120)
    clock.advance(119)
    assert queue.claim(10) == ([], T0 + 120)
    clock.advance(1)
    claim = claim_one(queue)
    assert (claim.name.id, claim.name.attempt) == (ident, 2)
    message = queue.read(claim)
    assert (message.attempt, message.header(), message.data) == (2, header, data)


def test_release_makes_the_message_due_now_with_the_same_attempt(
    clock: FakeClock, queue: AnyQueue,
) -> None:
    """release(claim): back unchanged, due now (attempt unchanged)."""
    header, data = mail("Relay down", T0)
    ident = queue.enqueue(header, data, sysmail.URGENT, attempt=3)
    clock.advance(30)
    queue.release(claim_one(queue))
    assert states(queue) == {**EMPTY, "new": 1}
    claim = claim_one(queue)  # at once: the clock has not moved
    assert (claim.name.id, claim.name.attempt) == (ident, 3)
    message = queue.read(claim)
    assert (message.attempt, message.header(), message.data) == (3, header, data)


def test_fail_makes_a_dead_letter_with_its_reason(queue: AnyQueue) -> None:
    """fail(claim, reason): dead letter with reason."""
    ident = put(queue, "Bounced")
    queue.fail(claim_one(queue), REJECTED)
    [letter] = queue.failed()
    assert letter["id"] == ident
    assert letter.items() >= REJECTED.items()
    assert states(queue) == {**EMPTY, "failed": 1}
    assert queue.claim(10) == ([], None)


# --------------------------------------------------------------------------- dead letters


def test_retry_brings_the_given_dead_letters_back_due_now_with_attempt_zero(
    clock: FakeClock, queue: AnyQueue,
) -> None:
    """retry(ids): those dead letters back, due now, attempt 0; returns the ids moved."""
    first = put(queue, "First", attempt=4)
    second = put(queue, "Second", attempt=4)
    for claim in queue.claim(10)[0]:
        queue.fail(claim, REJECTED)
    clock.advance(600)
    assert queue.retry([first]) == [first]
    assert [letter["id"] for letter in queue.failed()] == [second]
    assert states(queue) == {**EMPTY, "new": 1, "failed": 1}
    claim = claim_one(queue)
    assert (claim.name.id, claim.name.attempt, queue.read(claim).attempt) == (first, 0, 0)


def test_retry_without_ids_brings_every_dead_letter_back(queue: AnyQueue) -> None:
    """retry(None): all dead letters back; ids that are no dead letter move nothing."""
    queued = {put(queue, f"Notice {i}") for i in range(3)}
    for claim in queue.claim(10)[0]:
        queue.fail(claim, REJECTED)
    assert queue.retry(["no-such-id"]) == []
    assert sorted(queue.retry()) == sorted(queued)
    assert queue.failed() == []
    assert queue.retry() == []
    assert sorted(ids(queue.claim(10)[0])) == sorted(queued)


def test_add_failed_makes_a_dead_letter_for_the_given_recipients_only(queue: AnyQueue) -> None:
    """add_failed(message, rcpts, reason): a dead letter for some recipients."""
    header, data = mail("Team news", T0, to=(ADA, BOB, CY))
    queue.enqueue(header, data, sysmail.BULK)
    claim = claim_one(queue)
    queue.add_failed(queue.read(claim), (BOB,), REJECTED)
    queue.ack(claim)  # ADA and CY were served
    [letter] = queue.failed()
    assert letter.items() >= REJECTED.items()
    assert states(queue) == {**EMPTY, "failed": 1}
    assert queue.retry() == [letter["id"]]
    message = queue.read(claim_one(queue))
    assert message.rcpts == (BOB,)
    assert message.header() == {**header, "to": [BOB]}
    assert message.data == data


# --------------------------------------------------------------------------- maintenance, status


def test_recover_takes_back_the_claim_of_a_dead_owner_only(
    backend: Backend, queue: AnyQueue, tmp_path: Path,
) -> None:
    """recover(): claims of dead owners back to the queue; returns how many."""
    header, data = mail("Orphan", T0)
    orphan = queue.enqueue(header, data, sysmail.BULK, due=T0 - 1, attempt=1)
    ours = put(queue, "Ours")
    assert backend.claim_in_a_process_that_dies(tmp_path) == [orphan]
    assert states(queue) == {**EMPTY, "new": 1, "cur": 1}
    mine = claim_one(queue)
    assert mine.name.id == ours
    assert queue.recover() == 1  # ours: its owner, this process, is alive
    assert states(queue) == {**EMPTY, "new": 1, "cur": 1}
    assert queue.recover() == 0
    claim = claim_one(queue)
    assert (claim.name.id, claim.name.attempt) == (orphan, 1)
    assert (queue.read(claim).header(), queue.read(claim).data) == (header, data)


def test_counts_tells_new_deferred_cur_and_failed_apart(queue: AnyQueue) -> None:
    """counts(): at least new (due now), deferred (due later), cur (claimed), failed."""
    assert states(queue) == EMPTY
    put(queue, "Sending", sysmail.URGENT)
    put(queue, "Bouncing", sysmail.URGENT)
    put(queue, "Waiting", sysmail.BULK)
    put(queue, "Later", sysmail.BULK, due=T0 + 60)
    sending, bouncing = queue.claim(2)[0]
    queue.fail(bouncing, REJECTED)
    assert states(queue) == {"new": 1, "deferred": 1, "cur": 1, "failed": 1}
    queue.ack(sending)
    assert states(queue) == {"new": 1, "deferred": 1, "cur": 0, "failed": 1}
