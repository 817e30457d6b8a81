"""The token store (issue 3): the TokenStore contract for MemoryStore and SqliteStore, password
hashing, SQLite specifics (WAL, hashes only, store down) and the `user add` / `user list` CLI."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import run_cli

import sysmail

NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
HOUR = 3600.0
RESET = sysmail.RESET_PURPOSE
VERIFY = "email-verification"
STORE_KINDS = ["memory", "sqlite"]


# --------------------------------------------------------------------------- harness


@dataclass
class Harness:
    """One store under test, with the kind-specific ways to look inside it."""

    kind: str
    store: sysmail.MemoryStore | sysmail.SqliteStore
    changed: list[sysmail.User] = field(default_factory=list)

    def add_user(self, email: str, name: str = "") -> sysmail.User:
        """Create a user (both stores offer add_user(email, name))."""
        return self.store.add_user(email, name)

    def password_of(self, user: sysmail.User) -> str | None:
        """The stored password hash of a user."""
        if isinstance(self.store, sysmail.SqliteStore):
            return self.store.password_hash(user)
        return self.store.passwords.get(user.id)

    def audit_of(self, user: sysmail.User) -> list[tuple[str, float, str]]:
        """The user's audit entries as (action, at, client), oldest first."""
        if isinstance(self.store, sysmail.SqliteStore):
            return [tuple(row) for row in self.store.audit_entries(user)]
        return [(action, at, client) for uid, action, at, client in self.store.audit_log
                if uid == user.id]


def new_token() -> tuple[str, bytes]:
    """A token as the API makes one, and the hash the store keeps."""
    token = secrets.token_urlsafe(32)
    return token, sysmail.token_hash(token)


def save(store: object, user: sysmail.User, purpose: str = RESET, created: float = NOW,
         ttl: float = HOUR) -> bytes:
    """Save a fresh token for user and return its hash."""
    _, digest = new_token()
    store.save_token(digest, user, purpose, created, created + ttl)
    return digest


@pytest.fixture(params=STORE_KINDS)
def harness(request: pytest.FixtureRequest, tmp_path: Path) -> Harness:
    """Each contract test runs against MemoryStore and against SqliteStore on a real file."""
    changed: list[sysmail.User] = []
    if request.param == "memory":
        store: sysmail.MemoryStore | sysmail.SqliteStore = sysmail.MemoryStore(
            on_password_changed=changed.append)
    else:
        store = sysmail.SqliteStore(tmp_path / "tokens.db", on_password_changed=changed.append)
    return Harness(request.param, store, changed)


@pytest.fixture
def sqlite_store(tmp_path: Path) -> sysmail.SqliteStore:
    """A SqliteStore on a real file in tmp_path."""
    return sysmail.SqliteStore(tmp_path / "sysmail.db")


# --------------------------------------------------------------------------- the contract


def test_find_user_ignores_case(harness: Harness) -> None:
    """find_user matches the address case-insensitively and returns the stored user."""
    ada = harness.add_user("Ada.Lovelace@Example.COM", "Ada")
    grace = harness.add_user("grace@example.com", "Grace")
    assert ada.email == "Ada.Lovelace@example.com"  # the domain is normalised, the local part kept
    for spelling in ("ada.lovelace@example.com", "ADA.LOVELACE@EXAMPLE.COM",
                     "Ada.Lovelace@example.com"):
        assert harness.store.find_user(spelling) == ada
    assert harness.store.find_user("GRACE@example.com") == grace
    assert harness.store.find_user("ada@example.com") is None
    assert harness.store.find_user("nobody@example.com") is None


def test_token_is_consumed_exactly_once(harness: Harness) -> None:
    """The first consume returns the user, every later one None."""
    ada = harness.add_user("ada@example.com", "Ada")
    digest = save(harness.store, ada)
    assert harness.store.consume_token(digest, RESET, NOW + 1) == ada
    assert harness.store.consume_token(digest, RESET, NOW + 2) is None
    assert harness.store.consume_token(digest, RESET, NOW + 1) is None


def test_unknown_token_is_refused(harness: Harness) -> None:
    """A hash the store never saw gives None."""
    ada = harness.add_user("ada@example.com")
    save(harness.store, ada)
    assert harness.store.consume_token(new_token()[1], RESET, NOW + 1) is None


def test_expired_token_is_refused_from_its_expiry_on(harness: Harness) -> None:
    """expires_at itself is already too late; a moment before it the token still works."""
    ada = harness.add_user("ada@example.com")
    digest = save(harness.store, ada, created=NOW, ttl=HOUR)
    assert harness.store.consume_token(digest, RESET, NOW + HOUR + 60) is None
    assert harness.store.consume_token(digest, RESET, NOW + HOUR) is None
    assert harness.store.consume_token(digest, RESET, NOW + HOUR - 0.5) == ada


def test_wrong_purpose_is_refused_and_leaves_the_token_usable(harness: Harness) -> None:
    """A token saved for one purpose cannot be used for another, and the attempt spends nothing."""
    ada = harness.add_user("ada@example.com")
    digest = save(harness.store, ada, purpose=VERIFY)
    assert harness.store.consume_token(digest, RESET, NOW + 1) is None
    assert harness.store.consume_token(digest, VERIFY, NOW + 1) == ada


def test_consuming_revokes_the_users_other_tokens_only(harness: Harness) -> None:
    """Using one token revokes the same user's unused tokens (older and newer), not other users'."""
    ada = harness.add_user("ada@example.com")
    grace = harness.add_user("grace@example.com")
    older, used, newer = (save(harness.store, ada, created=NOW + i) for i in range(3))
    other = save(harness.store, grace)
    assert harness.store.consume_token(used, RESET, NOW + 10) == ada
    assert harness.store.consume_token(older, RESET, NOW + 11) is None
    assert harness.store.consume_token(newer, RESET, NOW + 11) is None
    assert harness.store.consume_token(other, RESET, NOW + 11) == grace


def test_consuming_keeps_the_users_tokens_of_other_purposes(harness: Harness) -> None:
    """The Protocol: consume_token revokes the user's other tokens *of that purpose*."""
    ada = harness.add_user("ada@example.com")
    reset = save(harness.store, ada, purpose=RESET)
    verify = save(harness.store, ada, purpose=VERIFY)
    assert harness.store.consume_token(reset, RESET, NOW + 1) == ada
    assert harness.store.consume_token(verify, VERIFY, NOW + 2) == ada


def test_user_ids_stay_unique_and_duplicates_are_refused(harness: Harness) -> None:
    """An existing address (any case) is refused; every user keeps an id of its own."""
    harness.add_user("ada@example.com")
    with contextlib.suppress(sysmail.MessageError):
        harness.add_user("ADA@example.com")
    grace = harness.add_user("grace@example.com")
    ada = harness.store.find_user("ada@example.com")
    assert ada.id != grace.id
    ada_token, grace_token = save(harness.store, ada), save(harness.store, grace)
    assert harness.store.consume_token(ada_token, RESET, NOW + 1) == ada
    assert harness.store.consume_token(grace_token, RESET, NOW + 2) == grace
    with pytest.raises(sysmail.MessageError, match="exists already"):
        harness.add_user("Grace@example.com")


def test_fifty_threads_racing_for_one_token_have_one_winner(harness: Harness) -> None:
    """50 threads consume the same token at once: exactly one gets the user, no one an error."""
    ada = harness.add_user("ada@example.com")
    for i in range(5):  # other unused tokens, revoked by the winner
        save(harness.store, ada, created=NOW + i)
    digest = save(harness.store, ada)
    barrier = threading.Barrier(50)
    results: list[object] = []
    lock = threading.Lock()

    def racer() -> None:
        barrier.wait()
        try:
            outcome: object = harness.store.consume_token(digest, RESET, NOW + 10)
        except Exception as exc:  # noqa: BLE001 - recorded and asserted on below
            outcome = exc
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=racer) for _ in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(results) == 50
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    assert results.count(ada) == 1
    assert results.count(None) == 49


def test_set_password_stores_a_hash_that_verifies(harness: Harness) -> None:
    """The stored value is a hash (not the password) that verify_password accepts."""
    ada = harness.add_user("ada@example.com")
    assert harness.password_of(ada) is None
    harness.store.set_password(ada, sysmail.hash_password("correct horse battery"))
    stored = harness.password_of(ada)
    assert stored is not None
    assert "correct horse battery" not in stored
    assert sysmail.verify_password("correct horse battery", stored)
    assert not sysmail.verify_password("correct horse battery!", stored)
    assert not sysmail.verify_password("", stored)
    harness.store.set_password(ada, sysmail.hash_password("a second password"))
    assert sysmail.verify_password("a second password", harness.password_of(ada))
    assert not sysmail.verify_password("correct horse battery", harness.password_of(ada))


def test_same_password_gets_a_different_hash_per_user(harness: Harness) -> None:
    """A per-user random salt: equal passwords do not give equal hashes."""
    ada = harness.add_user("ada@example.com")
    grace = harness.add_user("grace@example.com")
    harness.store.set_password(ada, sysmail.hash_password("shared password"))
    harness.store.set_password(grace, sysmail.hash_password("shared password"))
    ada_hash, grace_hash = harness.password_of(ada), harness.password_of(grace)
    assert ada_hash != grace_hash
    assert ada_hash.split("$")[2] != grace_hash.split("$")[2]  # the salts differ
    assert sysmail.verify_password("shared password", ada_hash)
    assert sysmail.verify_password("shared password", grace_hash)


def test_audit_entries_keep_user_action_time_and_client(harness: Harness) -> None:
    """Audit entries are kept per user, in order, with the client address."""
    ada = harness.add_user("ada@example.com")
    grace = harness.add_user("grace@example.com")
    harness.store.audit(ada, "password_reset", NOW, "203.0.113.7")
    harness.store.audit(grace, "password_reset", NOW + 1, "2001:db8::1")
    harness.store.audit(ada, "password_reset", NOW + 2, "198.51.100.20")
    assert harness.audit_of(ada) == [("password_reset", NOW, "203.0.113.7"),
                                     ("password_reset", NOW + 2, "198.51.100.20")]
    assert harness.audit_of(grace) == [("password_reset", NOW + 1, "2001:db8::1")]


def test_password_changed_hook_is_called_with_the_user(harness: Harness) -> None:
    """password_changed calls the session-invalidation callback once per call, with the user."""
    ada = harness.add_user("ada@example.com")
    grace = harness.add_user("grace@example.com")
    assert harness.changed == []
    harness.store.password_changed(ada)
    harness.store.password_changed(grace)
    assert harness.changed == [ada, grace]


def test_password_changed_without_a_hook_does_nothing(tmp_path: Path) -> None:
    """Both stores work without a callback."""
    for store in (sysmail.MemoryStore(), sysmail.SqliteStore(tmp_path / "plain.db")):
        user = store.add_user("ada@example.com")
        store.password_changed(user)
        store.ping()


# --------------------------------------------------------------------------- password hashing


def test_hash_records_scrypt_and_its_parameters() -> None:
    """scrypt$n=..,r=..,p=..$salt$digest, and the digest is scrypt of the password and salt."""
    stored = sysmail.hash_password("correct horse battery")
    scheme, params, salt_b64, digest_b64 = stored.split("$")
    assert scheme == "scrypt"
    assert stored.startswith("scrypt$")
    cost = dict(item.split("=") for item in params.split(","))
    assert cost == {"n": str(2**14), "r": "8", "p": "1"}
    salt, digest = base64.b64decode(salt_b64), base64.b64decode(digest_b64)
    assert len(salt) == 16
    assert len(digest) == 32
    expected = hashlib.scrypt(b"correct horse battery", salt=salt, n=2**14, r=8, p=1,
                              maxmem=64 * 1024 * 1024, dklen=32)
    assert digest == expected


def test_hash_is_salted_each_time() -> None:
    """Hashing the same password twice gives two different results that both verify."""
    first, second = sysmail.hash_password("same password"), sysmail.hash_password("same password")
    assert first != second
    assert sysmail.verify_password("same password", first)
    assert sysmail.verify_password("same password", second)


def test_verify_honours_the_recorded_parameters() -> None:
    """A hash made with other (recorded) scrypt parameters still verifies."""
    salt = b"0123456789abcdef"
    digest = hashlib.scrypt(b"old password", salt=salt, n=2**10, r=4, p=2, dklen=24)
    stored = "$".join(("scrypt", "n=1024,r=4,p=2", base64.b64encode(salt).decode(),
                       base64.b64encode(digest).decode()))
    assert sysmail.verify_password("old password", stored)
    assert not sysmail.verify_password("old passwort", stored)


@pytest.mark.parametrize("stored", [
    "",
    "not a hash",
    "bcrypt$n=16384,r=8,p=1$MDEyMzQ1Njc4OWFiY2RlZg==$AAAA",
    "scrypt$n=16384,r=8$MDEyMzQ1Njc4OWFiY2RlZg==$AAAA",
    "scrypt$n=abc,r=8,p=1$MDEyMzQ1Njc4OWFiY2RlZg==$AAAA",
    "scrypt$n=1000,r=8,p=1$MDEyMzQ1Njc4OWFiY2RlZg==$AAAA",
    "scrypt$n=16384,r=8,p=1$!!!$???",
    "scrypt$n=16384,r=8,p=1$MDEyMzQ1Njc4OWFiY2RlZg==",
    "scrypt$n=16384,r=8,p=1$MDEyMzQ1Njc4OWFiY2RlZg==$",
])
def test_verify_rejects_malformed_hashes_without_raising(stored: str) -> None:
    """Anything that is not a well-formed scrypt hash is simply not a match."""
    assert sysmail.verify_password("password1", stored) is False


def test_token_hash_is_sha256() -> None:
    """The store keeps the SHA-256 digest of the token."""
    token = secrets.token_urlsafe(32)
    assert sysmail.token_hash(token) == hashlib.sha256(token.encode()).digest()
    assert len(sysmail.token_hash(token)) == 32


# --------------------------------------------------------------------------- SqliteStore


def test_sqlite_file_uses_wal(sqlite_store: sysmail.SqliteStore) -> None:
    """The database file is in WAL mode, as another connection sees it."""
    sqlite_store.add_user("ada@example.com")
    with sqlite3.connect(sqlite_store.path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert sqlite_store.path.with_name(sqlite_store.path.name + "-wal").exists()


def test_sqlite_state_survives_a_new_store_instance(tmp_path: Path) -> None:
    """A token saved through one SqliteStore is consumed through another on the same file."""
    path = tmp_path / "shared.db"
    first = sysmail.SqliteStore(path)
    ada = first.add_user("ada@example.com", "Ada")
    digest = save(first, ada)
    second = sysmail.SqliteStore(path)
    assert second.find_user("ADA@example.com") == ada
    assert second.consume_token(digest, RESET, NOW + 1) == ada
    assert first.consume_token(digest, RESET, NOW + 2) is None


def test_sqlite_never_stores_the_raw_token(sqlite_store: sysmail.SqliteStore) -> None:
    """Only SHA-256 digests reach the database file and its WAL, never the tokens."""
    ada = sqlite_store.add_user("ada@example.com")
    tokens = [new_token() for _ in range(20)]
    for token, digest in tokens:
        sqlite_store.save_token(digest, ada, RESET, NOW, NOW + HOUR)
    assert sqlite_store.consume_token(tokens[7][1], RESET, NOW + 1) == ada
    files = [sqlite_store.path.with_name(sqlite_store.path.name + suffix)
             for suffix in ("", "-wal", "-shm")]
    raw = b"".join(path.read_bytes() for path in files if path.exists())
    assert len(raw) > 0
    for token, digest in tokens:
        assert token.encode() not in raw
        assert digest in raw
        assert hashlib.sha256(token.encode()).digest() == digest


def test_sqlite_add_user_refuses_a_duplicate_address(sqlite_store: sysmail.SqliteStore) -> None:
    """The address is unique whatever its case; the error is a MessageError."""
    sqlite_store.add_user("ada@example.com")
    with pytest.raises(sysmail.MessageError, match="exists already"):
        sqlite_store.add_user("ADA@Example.com")
    assert [u["email"] for u in sqlite_store.users()] == ["ada@example.com"]


def test_sqlite_store_down_when_the_path_is_a_directory(tmp_path: Path) -> None:
    """A database path that cannot be opened makes every operation raise StoreError."""
    folder = tmp_path / "not-a-file.db"
    folder.mkdir()
    store = sysmail.SqliteStore(folder)
    user = sysmail.User("1", "ada@example.com")
    operations: list[Callable[[], object]] = [
        store.ping,
        lambda: store.find_user("ada@example.com"),
        lambda: store.save_token(new_token()[1], user, RESET, NOW, NOW + HOUR),
        lambda: store.consume_token(new_token()[1], RESET, NOW),
        lambda: store.set_password(user, sysmail.hash_password("password1")),
        lambda: store.audit(user, "password_reset", NOW, "127.0.0.1"),
    ]
    for operation in operations:
        with pytest.raises(sysmail.StoreError, match="token store is unavailable"):
            operation()


@pytest.fixture
def exclusive_lock(sqlite_store: sysmail.SqliteStore) -> Iterator[sqlite3.Connection]:
    """Another connection holding BEGIN EXCLUSIVE on the store's file (rolled back at the end)."""
    sqlite_store.ping()  # create the file and schema first
    db = sqlite3.connect(sqlite_store.path, isolation_level=None, check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")
    try:
        yield db
    finally:
        if db.in_transaction:
            db.execute("ROLLBACK")
        db.close()


def test_sqlite_store_down_while_locked_then_back(
    sqlite_store: sysmail.SqliteStore, exclusive_lock: sqlite3.Connection
) -> None:
    """A held write lock makes ping fail after the busy timeout; released, the store works."""
    ada = sqlite_store.find_user("ada@example.com")  # reads still work in WAL mode
    assert ada is None
    started = time.monotonic()
    with pytest.raises(sysmail.StoreError, match="token store is unavailable"):
        sqlite_store.ping()
    waited = time.monotonic() - started
    assert sysmail.SQLITE_BUSY_TIMEOUT_SECONDS - 0.2 <= waited < 10
    exclusive_lock.execute("ROLLBACK")
    sqlite_store.ping()
    ada = sqlite_store.add_user("ada@example.com")
    digest = save(sqlite_store, ada)
    assert sqlite_store.consume_token(digest, RESET, NOW + 1) == ada


# --------------------------------------------------------------------------- CLI


def cli_env(db: Path) -> dict[str, str]:
    """The environment of the user commands: just the database path."""
    return {"SYSMAIL_DB": str(db)}


def test_cli_user_add_and_list(tmp_path: Path) -> None:
    """user add (password on stdin or none), then user list as text and as JSON."""
    db = tmp_path / "users.db"
    started = time.time()
    added = run_cli(["user", "add", "ada@example.com", "--name", "Ada Lovelace"], cli_env(db),
                    input="correct horse battery\n", cwd=tmp_path)
    assert (added.returncode, added.stderr) == (0, "")
    assert added.stdout == "added user 1: ada@example.com with a password\n"
    added = run_cli(["user", "add", "Grace@Example.COM"], cli_env(db), input="", cwd=tmp_path)
    assert (added.returncode, added.stderr) == (0, "")
    assert added.stdout == "added user 2: Grace@example.com\n"

    listed = run_cli(["user", "list"], cli_env(db), cwd=tmp_path)
    assert listed.returncode == 0
    assert listed.stdout == ("1  ada@example.com  Ada Lovelace  password set\n"
                             "2  Grace@example.com  -  no password\n")
    listed = run_cli(["user", "list", "--json"], cli_env(db), cwd=tmp_path)
    assert listed.returncode == 0
    users = json.loads(listed.stdout)
    created = [u.pop("created_at") for u in users]
    assert users == [
        {"id": "1", "email": "ada@example.com", "name": "Ada Lovelace", "has_password": True,
         "locale": ""},
        {"id": "2", "email": "Grace@example.com", "name": "", "has_password": False,
         "locale": ""},
    ]
    assert all(started - 1 <= c <= time.time() + 1 for c in created)

    store = sysmail.SqliteStore(db)
    ada = store.find_user("ADA@example.com")
    assert ada == sysmail.User("1", "ada@example.com", "Ada Lovelace")
    stored = store.password_hash(ada)
    assert stored.startswith("scrypt$")
    assert sysmail.verify_password("correct horse battery", stored)  # the newline is not kept
    assert not sysmail.verify_password("correct horse battery\n", stored)
    assert store.password_hash(store.find_user("grace@example.com")) is None


def test_cli_user_add_duplicate_exits_65(tmp_path: Path) -> None:
    """Adding an address that exists (in any case) is a data error, exit 65; nothing changes."""
    db = tmp_path / "users.db"
    assert run_cli(["user", "add", "ada@example.com"], cli_env(db), input="",
                   cwd=tmp_path).returncode == 0
    again = run_cli(["user", "add", "ADA@example.com", "--name", "Other"], cli_env(db),
                    input="another password\n", cwd=tmp_path)
    assert again.returncode == 65
    assert again.stdout == ""
    assert again.stderr == "sysmail: a user with the address ADA@example.com exists already\n"
    users = json.loads(run_cli(["user", "list", "--json"], cli_env(db), cwd=tmp_path).stdout)
    assert [(u["email"], u["name"], u["has_password"]) for u in users] == [
        ("ada@example.com", "", False)]


@pytest.mark.parametrize("password", ["short12", "x" * 1025], ids=["7-chars", "1025-chars"])
def test_cli_user_add_bad_password_length_exits_65(tmp_path: Path, password: str) -> None:
    """A password under 8 or over 1024 characters is refused (exit 65) and no user is added."""
    db = tmp_path / "users.db"
    result = run_cli(["user", "add", "ada@example.com"], cli_env(db), input=password + "\n",
                     cwd=tmp_path)
    assert result.returncode == 65
    assert result.stderr == "sysmail: the password must be 8 to 1024 characters long\n"
    listed = run_cli(["user", "list", "--json"], cli_env(db), cwd=tmp_path)
    assert listed.returncode == 0
    assert json.loads(listed.stdout) == []


def test_cli_user_add_invalid_address_exits_65(tmp_path: Path) -> None:
    """An address that is not one is a data error too."""
    result = run_cli(["user", "add", "not-an-address"], cli_env(tmp_path / "users.db"),
                     input="", cwd=tmp_path)
    assert result.returncode == 65
    assert result.stderr.startswith("sysmail: ")
    assert "not a valid email address" in result.stderr


def test_cli_user_commands_with_the_store_down_exit_75(tmp_path: Path) -> None:
    """A database path that cannot be opened is a temporary failure (exit 75), said plainly."""
    folder = tmp_path / "db-is-a-directory"
    folder.mkdir()
    for args in (["user", "list"], ["user", "add", "ada@example.com"]):
        result = run_cli(args, cli_env(folder), input="", cwd=tmp_path)
        assert result.returncode == 75, args
        assert result.stdout == ""
        assert result.stderr == "sysmail: the token store is unavailable (OperationalError)\n"
