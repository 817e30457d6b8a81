"""Timing safety of forgot-password and expiry driven by the injected clock (issue 15).

The forgot-password route must answer before the store is asked anything, so an attacker cannot
tell known from unknown addresses by latency: shown deterministically with a store that blocks
until released, and statistically against the real SQLite store. Idempotency keys, rate-limit
windows and reset tokens expire with the injected FakeClock, never with sleeps.
"""

from __future__ import annotations

import http.client
import json
import re
import statistics
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from email.parser import BytesParser
from email.policy import default as DEFAULT_POLICY
from pathlib import Path

import pytest
from conftest import FakeClock

import sysmail

ADA = "ada@example.com"
NOBODY = "nobody@example.com"
PASSWORD = "new password 1"
FORGOT = "/v1/auth/forgot-password"
RESET = "/v1/auth/reset-password"
GENERIC_TOKEN_ERROR = {"error": "this reset link is invalid, used or expired"}
TOKEN_IN_LINK = re.compile(r"/reset-password\?token=(?P<token>[A-Za-z0-9_-]+)")
START = 1_700_000_000.0  # a fixed epoch far from the real time: file times prove their clock
HOUR = 3600.0
FAR_FUTURE = 4_000_000_000.0
GATE_SECONDS = 30.0  # a blocked store call gives up after this, so a failing test cannot hang


# --------------------------------------------------------------------------- helpers


def service_env(folder: Path, **extra: str) -> dict[str, str]:
    """A service on a free loopback port, no relay (outbox mode), files in folder."""
    return {
        "SYSMAIL_LISTEN": "127.0.0.1:0", "SYSMAIL_METRICS_LISTEN": "127.0.0.1:0",
        "SYSTEM_DOMAIN": "example.com",
        "SYSMAIL_SPOOL": str(folder / "spool"),
        "SYSMAIL_OUTBOX": str(folder / "outbox"),
        "SYSMAIL_DB": str(folder / "sysmail.db"),
        **extra,
    }


def post_forgot(base: str, address: str, timeout: float = 5.0) -> tuple[int, bytes]:
    """POST /v1/auth/forgot-password on a new connection; return (status, body)."""
    parts = urllib.parse.urlsplit(base)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        connection.request("POST", FORGOT, body=json.dumps({"email": address}).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def queued_recipients(config: sysmail.Config) -> list[str]:
    """Recipients of every mail still in the spool's new/ or already written to the outbox."""
    found: list[str] = []
    spool = sysmail.Spool(config.spool_dir, clock=FakeClock(FAR_FUTURE))  # all due
    claims, _ = spool.claim(1000)
    for claim in claims:
        found += spool.read(claim).rcpts
        spool.release(claim)
    for eml in sorted(config.outbox_dir.glob("*.eml")) if config.outbox_dir.is_dir() else []:
        found.append(str(BytesParser(policy=DEFAULT_POLICY).parsebytes(eml.read_bytes())["To"]))
    return found


def json_request(method: str, path: str, payload: Mapping[str, str]) -> sysmail.Request:
    """A JSON request as the HTTP layer would hand it to the Api."""
    return sysmail.Request(method, path, {}, {"Content-Type": "application/json"},
                           json.dumps(payload).encode(), "192.0.2.10")


# --------------------------------------------------------------------------- 1. deterministic


class BlockingStore:
    """A TokenStore delegating to MemoryStore whose lookups and token writes wait for a gate.

    ping() (the request path's health probe) never blocks. find_user/save_token record that
    they were entered and count their returns, so a test can prove a call is still in progress.
    """

    def __init__(self) -> None:
        """An open store behind a closed gate."""
        self.inner = sysmail.MemoryStore()
        self.gate = threading.Event()
        self.lookup_entered = threading.Event()
        self.lookups_returned: list[str] = []
        self.tokens_saved: list[str] = []

    def _wait_for_gate(self) -> None:
        if not self.gate.wait(GATE_SECONDS):
            raise sysmail.StoreError("the test never opened the gate")

    def find_user(self, email: str) -> sysmail.User | None:
        """Block until released, then look the address up."""
        self.lookup_entered.set()
        self._wait_for_gate()
        user = self.inner.find_user(email)
        self.lookups_returned.append(email)
        return user

    def save_token(self, token_hash: bytes, user: sysmail.User, purpose: str,
                   created_at: float, expires_at: float) -> None:
        """Block until released, then keep the token hash."""
        self._wait_for_gate()
        self.inner.save_token(token_hash, user, purpose, created_at, expires_at)
        self.tokens_saved.append(user.email)

    def consume_token(self, token_hash: bytes, purpose: str, now: float) -> sysmail.User | None:
        """Delegate."""
        return self.inner.consume_token(token_hash, purpose, now)

    def set_password(self, user: sysmail.User, password_hash: str) -> None:
        """Delegate."""
        self.inner.set_password(user, password_hash)

    def audit(self, user: sysmail.User, action: str, at: float, client: str) -> None:
        """Delegate."""
        self.inner.audit(user, action, at, client)

    def password_changed(self, user: sysmail.User) -> None:
        """Delegate."""
        self.inner.password_changed(user)

    def ping(self) -> None:
        """Never blocks: the request path may probe the store."""
        self.inner.ping()


@pytest.fixture
def blocked_service(tmp_path: Path) -> Iterator[tuple[sysmail.App, BlockingStore]]:
    """The real service on a BlockingStore knowing ADA; the gate is opened before stopping."""
    store = BlockingStore()
    store.inner.add_user(ADA)
    app = sysmail.build_app(sysmail.Config.from_env(service_env(tmp_path)), store=store)
    app.start()
    try:
        yield app, store
    finally:
        store.gate.set()
        app.stop()


def test_forgot_password_answers_before_the_store_is_asked(
    blocked_service: tuple[sysmail.App, BlockingStore],
) -> None:
    """Both a known and an unknown address get the same 202 while the lookup is still blocked;
    once released, only the known address's reset mail is queued."""
    app, store = blocked_service
    try:
        known = post_forgot(app.url, ADA)
    except TimeoutError:
        pytest.fail("forgot-password waited for the blocked store before answering")
    assert store.lookup_entered.wait(5), "the forgot-password worker never looked ADA up"
    unknown = post_forgot(app.url, NOBODY)
    assert store.lookups_returned == [], "the lookup finished before the replies were checked"
    assert known[0] == unknown[0] == 202
    assert known[1] == unknown[1]
    store.gate.set()
    app.stop()  # finishes the queued forgot-password work, then stops the sender
    assert sorted(store.lookups_returned) == sorted([ADA, NOBODY])
    assert store.tokens_saved == [ADA]
    assert queued_recipients(app.config) == [ADA]


# --------------------------------------------------------------------------- 2. statistical

WARM_UP_ROUNDS = 20
MEASURED_ROUNDS = 150
# Why 1.0 ms: with forgot_password doing find_user + save_token + enqueue on the request path,
# only a known address pays for a SQLite INSERT under BEGIN IMMEDIATE with synchronous=FULL
# (a WAL fsync) and a spool enqueue (tmp write, fsync, link, fsync of new/): at least two
# fsyncs on every known request. On this 2-core machine that put the known median 1.8-2.1 ms
# above the unknown one when idle (up to 11 ms when the disk was busy) and 2.4-26 ms above it
# with both cores kept busy by other processes: always more than the tolerance. With the work
# off the request path both answers take the same path (ping, queue check, put): the statistic
# below stayed within 0.4 ms idle (15 runs) and within 0.5 ms with both cores busy (30 runs).
#
# The statistic is the median of the per-round differences (known minus unknown, sent back to
# back in alternating order), not the difference of the two medians: both requests of a pair
# see the same machine load, so drifting load cancels out. With both cores busy the plain
# difference of medians reached 0.96 and 1.13 ms on the current code (one run in 20 over the
# tolerance), the paired median 0.48 ms. A synchronous lookup slows every known request, so
# it shifts the paired median by the same ~2 ms. Both medians are in the failure message.
TOLERANCE_SECONDS = 0.001


@pytest.fixture
def sqlite_service(tmp_path: Path) -> Iterator[sysmail.App]:
    """The real service on the default SqliteStore knowing ADA, with the limits raised."""
    env = service_env(tmp_path, SYSMAIL_FORGOT_LIMIT_PER_CLIENT="100000/60",
                      SYSMAIL_FORGOT_LIMIT_PER_ADDRESS="100000/60")
    app = sysmail.build_app(sysmail.Config.from_env(env))
    app.start()
    assert isinstance(app.store, sysmail.SqliteStore)
    app.store.add_user(ADA)
    try:
        yield app
    finally:
        app.stop()


def timed_forgot(base: str, address: str) -> float:
    """Seconds one forgot-password request takes, connection set-up included; asserts 202."""
    started = time.perf_counter()
    status, _ = post_forgot(base, address)
    elapsed = time.perf_counter() - started
    assert status == 202
    return elapsed


def test_forgot_password_latency_does_not_reveal_the_user(sqlite_service: sysmail.App) -> None:
    """150 interleaved known/unknown requests on the real SQLite store: the median of their
    paired latency differences is under 1 ms, so latency does not tell which address is known."""
    timings: dict[str, list[float]] = {ADA: [], NOBODY: []}
    for round_number in range(WARM_UP_ROUNDS + MEASURED_ROUNDS):
        order = (ADA, NOBODY) if round_number % 2 else (NOBODY, ADA)
        for address in order:
            elapsed = timed_forgot(sqlite_service.url, address)
            if round_number >= WARM_UP_ROUNDS:  # the first rounds warm up caches and the WAL
                timings[address].append(elapsed)
    gap = statistics.median(k - u for k, u in zip(timings[ADA], timings[NOBODY], strict=True))
    medians = f"median known {statistics.median(timings[ADA]) * 1000:.3f} ms, " \
              f"unknown {statistics.median(timings[NOBODY]) * 1000:.3f} ms"
    assert abs(gap) < TOLERANCE_SECONDS, f"paired gap {gap * 1000:.3f} ms; {medians}"


# --------------------------------------------------------------------------- 3. idempotency keys


class IdMaker:
    """make_id for IdempotencyKeys.remember: numbered ids, counting the calls."""

    def __init__(self) -> None:
        """No id made yet."""
        self.calls = 0

    def __call__(self) -> str:
        """Return the next id."""
        self.calls += 1
        return f"<id-{self.calls}@example.com>"


def key_file_times(folder: Path) -> list[float]:
    """The modification times of the stored keys, sorted: one file per key."""
    return sorted(entry.stat().st_mtime for entry in folder.iterdir())


def test_idempotency_keys_expire_after_24_hours_by_the_injected_clock(tmp_path: Path) -> None:
    """A key is kept for 24 h of the injected clock, then pruned; a younger key survives."""
    clock, make_id, folder = FakeClock(START), IdMaker(), tmp_path / "idempotency"
    keys = sysmail.IdempotencyKeys(folder, clock)
    assert keys.remember("key-a", make_id) == ("<id-1@example.com>", True)
    assert key_file_times(folder) == [START]  # the file's age comes from the injected clock
    clock.advance(23 * HOUR)
    assert keys.remember("key-b", make_id) == ("<id-2@example.com>", True)
    assert keys.remember("key-a", make_id) == ("<id-1@example.com>", False)  # 23 h: kept
    clock.advance(2 * HOUR)
    assert keys.remember("key-c", make_id) == ("<id-3@example.com>", True)  # prunes
    assert key_file_times(folder) == [START + 23 * HOUR, START + 25 * HOUR]  # key-a is gone
    assert keys.remember("key-b", make_id) == ("<id-2@example.com>", False)  # 2 h: kept
    assert make_id.calls == 3
    assert keys.remember("key-a", make_id) == ("<id-4@example.com>", True)  # made again


def test_idempotency_prune_runs_at_most_once_an_hour_of_the_injected_clock(
    tmp_path: Path,
) -> None:
    """An expired key is left until an hour (injected clock) has passed since the last prune."""
    clock, make_id, folder = FakeClock(START), IdMaker(), tmp_path / "idempotency"
    keys = sysmail.IdempotencyKeys(folder, clock)
    keys.remember("key-x", make_id)
    clock.advance(24 * HOUR - 600)
    keys.remember("key-y", make_id)  # prunes; key-x is 10 minutes short of expiry
    clock.advance(1200)
    keys.remember("key-z", make_id)  # key-x expired, but the last prune was 20 minutes ago
    assert key_file_times(folder) == [START, START + 24 * HOUR - 600, START + 24 * HOUR + 600]
    clock.advance(HOUR)
    keys.remember("key-w", make_id)  # over an hour since the last prune: key-x goes
    assert key_file_times(folder) == [START + 24 * HOUR - 600, START + 24 * HOUR + 600,
                                      START + 25 * HOUR + 600]


# --------------------------------------------------------------------------- 4. rate limits


def make_api(config: sysmail.Config, store: sysmail.TokenStore,
             clock: FakeClock) -> sysmail.App:
    """sysmail built on the injected clock: its Api, queues and rate limiter all run on it."""
    return sysmail.build_app(config, store=store, clock=clock)


def test_forgot_password_client_limit_lifts_when_its_window_ends(tmp_path: Path) -> None:
    """The default 10/60 per client: the 11th request is refused until the window ends."""
    clock = FakeClock(START)
    api = make_api(sysmail.Config.from_env(service_env(tmp_path)), sysmail.MemoryStore(), clock)

    def forgot(number: int) -> sysmail.Response:
        return api.api.handle(json_request("POST", FORGOT,
                                           {"email": f"user{number}@example.com"}))

    assert [forgot(n).status for n in range(10)] == [202] * 10
    refused = forgot(10)
    assert refused.status == 429
    wait = int(refused.headers["Retry-After"])
    assert 1 <= wait <= 60
    clock.advance(wait - 1)
    assert forgot(11).status == 429  # still inside the window
    clock.advance(1)
    assert forgot(12).status == 202


def test_rate_limit_window_resets_exactly_at_its_end() -> None:
    """hit() tells how long the window lasts; it refuses until then and allows from then on."""
    clock = FakeClock(START)
    limiter = sysmail.RateLimiter(clock=clock)
    assert [limiter.hit("client", 10, 60) for _ in range(10)] == [None] * 10
    left = limiter.hit("client", 10, 60)
    assert left is not None and 0 < left <= 60
    clock.advance(left - 0.5)
    assert limiter.hit("client", 10, 60) is not None
    clock.advance(0.5)
    assert limiter.hit("client", 10, 60) is None


def test_rate_limiter_evicts_expired_windows_and_keeps_live_limits() -> None:
    """At the key cap, expired windows make room; live, exhausted windows stay enforced."""
    clock = FakeClock(START)
    limiter = sysmail.RateLimiter(clock=clock, max_keys=4)
    for key in ("old-1", "old-2"):
        assert limiter.hit(key, 2, 60) is None
    clock.advance(61)  # both old windows have ended
    for key in ("live-1", "live-2"):
        assert [limiter.hit(key, 2, 60) for _ in range(2)] == [None, None]
        assert limiter.hit(key, 2, 60) is not None  # at its limit now
    for key in ("new-1", "new-2"):  # the cap is reached: room must come from the old windows
        assert limiter.hit(key, 2, 60) is None
        assert len(limiter._windows) <= 4  # no public size; the cap is the promise
    for key in ("live-1", "live-2"):
        assert limiter.hit(key, 2, 60) is not None, f"{key}'s live window was evicted"


def test_rate_limiter_never_holds_more_than_max_keys() -> None:
    """However many distinct keys arrive within one window, at most max_keys are kept."""
    clock = FakeClock(START)
    limiter = sysmail.RateLimiter(clock=clock, max_keys=4)
    for number in range(25):
        assert limiter.hit(f"client-{number}", 5, 60) is None
        assert len(limiter._windows) <= 4  # no public size; the cap is the promise
        clock.advance(1)


# --------------------------------------------------------------------------- 5. reset tokens

TOKEN_SECONDS = 900


def sqlite_store(folder: Path, clock: FakeClock) -> sysmail.SqliteStore:
    """The SQLite store in a real file."""
    return sysmail.SqliteStore(folder / "tokens.db", clock=clock)


def memory_store(folder: Path, clock: FakeClock) -> sysmail.MemoryStore:
    """The in-memory store."""
    return sysmail.MemoryStore()


STORES: dict[str, Callable[[Path, FakeClock], sysmail.TokenStore]] = {
    "sqlite": sqlite_store, "memory": memory_store}


def stored_password(store: sysmail.TokenStore, user: sysmail.User) -> str | None:
    """The user's password hash, read the way each store offers it."""
    if isinstance(store, sysmail.SqliteStore):
        return store.password_hash(user)
    assert isinstance(store, sysmail.MemoryStore)
    return store.passwords.get(user.id)


def reset_token_from_spool(app: sysmail.App) -> str:
    """Claim the one queued mail and return the token in its reset link."""
    spool = app.spool
    claims, _ = spool.claim(10)
    assert len(claims) == 1, claims
    message = BytesParser(policy=DEFAULT_POLICY).parsebytes(spool.read(claims[0]).data)
    spool.ack(claims[0])
    body = message.get_body(preferencelist=("plain",))
    assert body is not None
    match = TOKEN_IN_LINK.search(body.get_content())
    assert match is not None
    return match["token"]


def request_token(app: sysmail.App, address: str) -> str:
    """Ask for a reset through the route and its worker; return the mailed token."""
    app.forgot.start()
    try:
        assert app.api.handle(json_request("POST", FORGOT, {"email": address})).status == 202
    finally:
        app.forgot.stop()  # the worker finishes the queued request before it stops
    return reset_token_from_spool(app)


@pytest.mark.parametrize("store_name", sorted(STORES))
@pytest.mark.parametrize(("offset", "works"), [(-1.0, True), (0.0, False), (1.0, False)],
                         ids=["just-before", "at-expiry", "just-after"])
def test_reset_token_expires_at_its_lifetime_by_the_injected_clock(
    tmp_path: Path, store_name: str, offset: float, works: bool,
) -> None:
    """A token works until SYSMAIL_RESET_TOKEN_SECONDS of the injected clock have passed, and
    is refused with the generic 400 from then on; no sleeping."""
    clock = FakeClock(START)
    store = STORES[store_name](tmp_path, clock)
    ada = store.add_user(ADA)
    env = service_env(tmp_path, SYSMAIL_RESET_TOKEN_SECONDS=str(TOKEN_SECONDS))
    api = make_api(sysmail.Config.from_env(env), store, clock)
    token = request_token(api, ADA)
    clock.advance(TOKEN_SECONDS + offset)
    reply = api.api.handle(json_request("POST", RESET, {"token": token, "password": PASSWORD}))
    if works:
        assert (reply.status, json.loads(reply.body)) == (200, {"status": "password changed"})
        assert sysmail.verify_password(PASSWORD, stored_password(store, ada) or "")
    else:
        assert (reply.status, json.loads(reply.body)) == (400, GENERIC_TOKEN_ERROR)
        assert stored_password(store, ada) is None
