"""Durability as the kernel sees it: the real system calls of a real process, in order (issue 15).

A SIGKILL test cannot see a missing fsync: the page cache outlives a killed process, so only a
power loss would show it. These tests run each storing operation in a subprocess under
`strace -f -y` and check, per file, that the data is written, the file fsynced, renamed (or
linked) into place and its folder fsynced, all before the process writes a marker to stdout
right after the call returned, i.e. before the caller could have been told "stored".

No mocks and no patching of `os`: the subprocess imports sysmail from the repository as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import MUTANT, REPO

STRACE = Path("/usr/bin/strace")
TRACED = ("openat,open,write,pwrite64,fsync,fdatasync,syncfs,rename,renameat,renameat2,"
          "link,linkat,unlink,unlinkat,close")
BEGIN = "BEGIN"
STORED = "STORED"

# Prelude of every snippet: `mark(word)` writes one line to fd 1 in a single write(2), so the
# trace shows exactly when the snippet learnt that the call had returned.
PRELUDE = """\
import os, time
import sysmail

def mark(word):
    os.write(1, word.encode() + b"\\n")
"""


# --------------------------------------------------------------------------- strace probe


@pytest.fixture(scope="module", autouse=True)
def _strace_works() -> None:
    """Skip the module when strace is missing or ptrace is not permitted here."""
    if not STRACE.exists():
        pytest.skip(f"{STRACE} is not installed (Debian package strace)")
    probe = subprocess.run([str(STRACE), "-f", "-o", os.devnull, "true"],
                           capture_output=True, text=True, timeout=30, check=False)
    if probe.returncode != 0:
        pytest.skip(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}")


# --------------------------------------------------------------------------- trace parsing


@dataclass(frozen=True)
class Syscall:
    """One completed system call: name, the absolute paths it touched in argument order
    (an fd argument counts as the path strace -y printed for it), the raw text of its
    arguments (for flags), and its result."""

    pid: int
    name: str
    paths: tuple[str, ...]
    args: str
    result: str
    data: str = ""  # the (strace-escaped, possibly truncated) bytes of a write

    @property
    def ok(self) -> bool:
        """True unless the call failed (returned -1 with an errno)."""
        return not self.result.startswith("-1")

    def __str__(self) -> str:
        shown = " -> ".join(self.paths) or self.args
        extra = f" {self.data!r}" if self.name in WRITES and self.fd == 1 else ""
        return f"{self.pid} {self.name}({shown}){extra} = {self.result}"

    @property
    def fd(self) -> int | None:
        """The fd number of an fd-based call (write, fsync, close...), else None."""
        found = re.match(r"(\d+)<", self.args)
        return int(found.group(1)) if found else None


WRITES = {"write", "pwrite64"}
SYNCS = {"fsync", "fdatasync"}
FD_CALLS = WRITES | SYNCS | {"close", "syncfs"}
MOVES = {"rename", "renameat", "renameat2", "link", "linkat"}

_LINE = re.compile(r"^(?:(?P<pid>\d+)\s+)?(?P<name>\w+)\((?P<args>.*)\)\s+=\s+(?P<result>.*)$")
_UNFINISHED = re.compile(r"^(?:(?P<pid>\d+)\s+)?(?P<head>.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^(?:(?P<pid>\d+)\s+)?<\.\.\. \w+ resumed>(?P<tail>.*)$")
# an fd (or AT_FDCWD) annotated with its path by -y, or a quoted string
_TOKEN = re.compile(r'(?P<fd>(?:\d+|AT_FDCWD)<(?P<fdpath>(?:[^>\\]|\\.)*)>)|"(?P<str>(?:[^"\\]|\\.)*)"')


class StraceLog:
    """The events of an `strace -f -qq -y -o FILE` log, in order; unfinished/resumed pairs
    (another traced thread ran in between) are joined at the resumption, when the call
    completed."""

    def __init__(self, text: str) -> None:
        """Parse every completed call of the traced syscalls; ignore signals and noise."""
        self.events: list[Syscall] = []
        pending: dict[str, str] = {}
        for line in text.splitlines():
            if (unfinished := _UNFINISHED.match(line)) is not None:
                pending[unfinished["pid"] or ""] = unfinished["head"]
                continue
            if (resumed := _RESUMED.match(line)) is not None:
                pid = resumed["pid"] or ""
                line = f"{pid} {pending.pop(pid, '')}{resumed['tail']}".strip()
            if (event := _parse(line)) is not None:
                self.events.append(event)


def _parse(line: str) -> Syscall | None:
    """One strace line as a Syscall, or None when it is not a completed call."""
    match = _LINE.match(line)
    if match is None:
        return None
    name, args = match["name"], match["args"]
    tokens = list(_TOKEN.finditer(args))
    data = ""
    if name in FD_CALLS:
        paths = tuple(_clean(t["fdpath"]) for t in tokens[:1] if t["fd"])
        data = next((t["str"] for t in tokens if t["str"] is not None), "")
    else:
        paths = _path_arguments(tokens)
    return Syscall(int(match["pid"] or 0), name, paths, args, match["result"], data)


def _path_arguments(tokens: list[re.Match[str]]) -> tuple[str, ...]:
    """The path arguments of a path call, each resolved against the dirfd just before it."""
    paths: list[str] = []
    base = ""
    for token in tokens:
        if token["fd"]:
            base = _clean(token["fdpath"])
        elif token["str"] is not None:
            paths.append(os.path.normpath(os.path.join(base, token["str"])))
            base = ""
    return tuple(paths)


def _clean(path: str) -> str:
    """A -y annotation as a normal path (without the ' (deleted)' strace adds)."""
    return os.path.normpath(path.removesuffix(" (deleted)"))


# --------------------------------------------------------------------------- running


@dataclass(frozen=True)
class Trace:
    """What a traced run did: its calls from the BEGIN marker on, and its stdout."""

    events: list[Syscall]
    stdout: str


def run_traced(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
               begin: str | None = BEGIN) -> Trace:
    """Run argv under strace with sysmail importable; return the calls after `begin` (all
    calls when None). Fails the test when the process fails."""
    log = cwd / f"strace-{len(list(cwd.glob('strace-*')))}.log"
    command = [str(STRACE), "-f", "-qq", "-y", "-e", f"trace={TRACED}", "-o", str(log), *argv]
    result = subprocess.run(command, cwd=cwd, env={**_env(), **(env or {})}, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, f"traced run failed:\n{result.stdout}\n{result.stderr}"
    events = StraceLog(log.read_text(errors="replace")).events
    if begin is not None:
        start = first_index(events, marker(begin))
        assert start is not None, f"no {begin} marker in the trace"
        events = events[start + 1:]
    return Trace(events, result.stdout)


def _env() -> dict[str, str]:
    """A minimal environment importing sysmail from the repository (as conftest.run_python)."""
    return {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(REPO),
            **MUTANT}


def run_snippet(tmp_path: Path, *parts: str) -> Trace:
    """Run PRELUDE + parts (each dedented) under strace; they call mark(BEGIN) before the
    operation under test and mark(STORED) right after it returns."""
    return run_traced([sys.executable, "-c", _program(parts)], tmp_path)


def _program(parts: tuple[str, ...]) -> str:
    """PRELUDE and the parts, each dedented on its own, as one script."""
    return PRELUDE + "".join(textwrap.dedent(part) for part in parts)


def run_untraced(tmp_path: Path, *parts: str) -> str:
    """Run PRELUDE + parts without strace (setup for a traced CLI run); return its stdout."""
    result = subprocess.run([sys.executable, "-c", _program(parts)],
                            cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


# --------------------------------------------------------------------------- matching


@dataclass(frozen=True)
class Step:
    """A required system call: what it is (for messages) and how to recognise it."""

    what: str
    matches: Callable[[Syscall], bool]


def created(path: Path) -> Step:
    """open/openat of path with O_CREAT."""
    return Step(f"openat({path}, O_CREAT)",
                lambda e: e.name in ("open", "openat") and e.ok and e.paths[:1] == (str(path),)
                and "O_CREAT" in e.args)


def wrote(path: Path) -> Step:
    """write/pwrite64 to an fd open on path."""
    return Step(f"write({path})", lambda e: e.name in WRITES and e.paths == (str(path),))


def synced(path: Path) -> Step:
    """fsync/fdatasync of an fd open on path (a file or a folder)."""
    return Step(f"fsync({path})", lambda e: e.name in SYNCS and e.ok and e.paths == (str(path),))


def closed(path: Path) -> Step:
    """close of an fd open on path."""
    return Step(f"close({path})", lambda e: e.name == "close" and e.paths == (str(path),))


def moved(source: Path, target: Path) -> Step:
    """A successful rename (any variant) or link of source to target."""
    return Step(f"rename({source} -> {target})",
                lambda e: e.name in MOVES and e.ok and e.paths == (str(source), str(target)))


def opened_dir(path: Path) -> Step:
    """open/openat of the folder path with O_DIRECTORY."""
    return Step(f"openat({path}, O_DIRECTORY)",
                lambda e: e.name in ("open", "openat") and e.ok and e.paths[:1] == (str(path),)
                and "O_DIRECTORY" in e.args)


def marker(word: str) -> Step:
    """The write to stdout telling that the call returned."""
    return Step(f"write(1, {word!r})",
                lambda e: e.name == "write" and e.fd == 1 and e.data.startswith(word))


def dir_synced(folder: Path) -> list[Step]:
    """The folder opened and fsynced: a name created or moved in it survives a power loss."""
    return [opened_dir(folder), synced(folder)]


def first_index(events: list[Syscall], step: Step, start: int = 0) -> int | None:
    """Index of the first event at or after start matching step, or None."""
    return next((i for i in range(start, len(events)) if step.matches(events[i])), None)


def assert_order(events: list[Syscall], steps: list[Step]) -> list[int]:
    """Assert the steps happen in this order (other calls may come between); return where."""
    __tracebackhide__ = True
    found: list[int] = []
    for number, step in enumerate(steps):
        index = first_index(events, step, found[-1] + 1 if found else 0)
        if index is None:
            after = f" after step {number - 1}: {steps[number - 1].what}" if number else ""
            raise AssertionError(_short(f"missing step {number}: {step.what}{after}\n"
                                        f"calls traced:\n{_relevant(events)}"))
        found.append(index)
    return found


def assert_none(events: list[Syscall], step: Step, start: int, end: int, why: str) -> None:
    """Assert no event in events[start:end] matches step."""
    __tracebackhide__ = True
    index = first_index(events[:end], step, start)
    assert index is None, _short(f"{why}: {events[index]}\ncalls traced:\n{_relevant(events)}")


def _short(text: str) -> str:
    """text with pytest's tmp folder prefix (/tmp/pytest-of-USER/pytest-N/TEST/) cut to .../."""
    return re.sub(r"/[^\s<>()]*/pytest-\d+/[^/\s]+/", ".../", text)


def _relevant(events: list[Syscall]) -> str:
    """The calls worth showing in a failure: those on pytest's tmp folders, and stdout."""
    shown = [f"  #{i} {e}" for i, e in enumerate(events)
             if e.fd == 1 or any("/pytest-" in p for p in e.paths)]
    return "\n".join(shown) or "  (none)"


def moved_into(events: list[Syscall], target: Path) -> Path:
    """The source of the (first successful) rename or link that created target."""
    for event in events:
        if event.name in MOVES and event.ok and event.paths[1:] == (str(target),):
            return Path(event.paths[0])
    raise AssertionError(f"nothing was renamed to {target}\ncalls traced:\n{_relevant(events)}")


def only_entry(folder: Path) -> Path:
    """The one file in a spool folder (reason .json files aside)."""
    entries = [p for p in folder.iterdir() if not p.name.endswith(".json")]
    assert len(entries) == 1, entries
    return entries[0]


def enqueue_steps(spool: Path, name: str) -> list[Step]:
    """A message stored durably: tmp/NAME created, written, fsynced, closed, moved to new/NAME,
    new/ fsynced."""
    tmp, new = spool / "tmp" / name, spool / "new" / name
    return [created(tmp), wrote(tmp), synced(tmp), closed(tmp), moved(tmp, new),
            *dir_synced(spool / "new")]


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    """A spool root path without symlinks (strace -y prints real paths)."""
    return tmp_path.resolve() / "spool"


def queued(root: Path) -> str:
    """Snippet: open the spool at root as `spool` and queue one message in it."""
    return f"""\
        spool = sysmail.Spool({str(root)!r})
        spool.enqueue({{"to": ["ada@example.org"]}}, b"Subject: hi\\r\\n\\r\\nbody\\r\\n", 1)
        """


CLAIMED = """\
    claim = spool.claim(1)[0][0]
    print(claim.path, flush=True)
    """
FAILED = """\
    spool.fail(claim, {"reason": "refused", "code": 550})
    """


def claim_path(stdout: str) -> Path:
    """The claim path a snippet printed (CLAIMED): its one stdout line that is a path."""
    paths = [line for line in stdout.splitlines() if line.startswith("/")]
    assert len(paths) == 1, stdout
    return Path(paths[0])


def unclaimed(claim: Path, folder: Path) -> Path:
    """The entry's name in folder: the claim's name without its .OWNER suffix."""
    return folder / claim.name.rsplit(".", 1)[0]


# --------------------------------------------------------------------------- 1. enqueue


def _enqueue_via(api: str, root: Path) -> str:
    """Snippet: one enqueue between the markers, through Spool or through Mailer."""
    if api == "spool":
        return f"""\
            spool = sysmail.Spool({str(root)!r})
            mark("BEGIN")
            spool.enqueue({{"to": ["ada@example.org"]}}, b"Subject: hi\\r\\n\\r\\nbody\\r\\n", 1)
            mark("STORED")
            """
    return f"""\
        env = {{"SYSTEM_DOMAIN": "example.com", "SYSMAIL_SPOOL": {str(root)!r}}}
        mailer = sysmail.Mailer(sysmail.Config.from_env(env))
        mark("BEGIN")
        mailer.enqueue_message("ada@example.org", "Notice", "Body\\n")
        mark("STORED")
        """


@pytest.mark.parametrize("api", ["spool", "mailer"])
def test_enqueue_is_durable_before_it_returns(api: str, spool: Path) -> None:
    """Spool.enqueue and Mailer.enqueue_message return only after tmp/NAME was created, written,
    fsynced and closed, then renamed (or linked) to new/NAME, then new/ fsynced: the file's
    fsync comes before the rename, the folder's after it, and no data follows the fsync."""
    trace = run_snippet(spool.parent, _enqueue_via(api, spool))
    name = only_entry(spool / "new").name
    where = assert_order(trace.events, [*enqueue_steps(spool, name), marker(STORED)])
    assert_none(trace.events, wrote(spool / "tmp" / name), where[2] + 1, where[-1],
                "data written to the spool file after its fsync")


# --------------------------------------------------------------------------- 2. claim


def test_claim_is_a_single_rename(spool: Path) -> None:
    """Spool.claim moves new/N to cur/N.OWNER with exactly one rename: the entry is not
    opened for writing, copied, rewritten, linked or unlinked."""
    trace = run_snippet(spool.parent, queued(spool), """\
        mark("BEGIN")
        claim = spool.claim(1)[0][0]
        mark("STORED")
        print(claim.path, flush=True)
        """)
    claimed = claim_path(trace.stdout)
    source = unclaimed(claimed, spool / "new")
    assert claimed.parent == spool / "cur"
    end = assert_order(trace.events, [moved(source, claimed), marker(STORED)])[-1]
    touching = [e for e in trace.events[:end] if {str(source), str(claimed)} & set(e.paths)]
    assert [e.name for e in touching] in (["rename"], ["renameat"], ["renameat2"]), (
        "a claim must be one rename and nothing else on the entry:\n"
        + "\n".join(map(str, touching)))


# --------------------------------------------------------------------------- 3. retries


def test_defer_is_durable_before_it_returns(spool: Path) -> None:
    """Spool.defer renames the claim into new/ under its later name, then fsyncs new/, before
    it returns: else a power loss can undo the move after the worker moved on."""
    trace = run_snippet(spool.parent, queued(spool), CLAIMED, """\
        mark("BEGIN")
        spool.defer(claim, time.time() + 600)
        mark("STORED")
        """)
    deferred = only_entry(spool / "new")
    assert deferred.name.split(".")[2] == "1", "defer counts one attempt"
    assert_order(trace.events, [moved(claim_path(trace.stdout), deferred), *dir_synced(spool / "new"),
                                marker(STORED)])


def test_retry_of_a_dead_letter_is_durable_before_it_returns(spool: Path) -> None:
    """Spool.retry renames failed/N into new/ (attempt 0, due now), then fsyncs new/, before
    it returns."""
    trace = run_snippet(spool.parent, queued(spool), CLAIMED, FAILED, """\
        mark("BEGIN")
        assert len(spool.retry()) == 1
        mark("STORED")
        """)
    dead = unclaimed(claim_path(trace.stdout), spool / "failed")
    assert_order(trace.events, [moved(dead, only_entry(spool / "new")),
                                *dir_synced(spool / "new"), marker(STORED)])


def test_cli_retry_is_durable_before_it_reports(spool: Path) -> None:
    """`sysmail.py retry --all` prints "requeued 1 message(s)" only after the dead letter was
    renamed into new/ and new/ fsynced."""
    dead = unclaimed(claim_path(run_untraced(spool.parent, queued(spool), CLAIMED, FAILED)),
                     spool / "failed")
    trace = run_traced([sys.executable, str(REPO / "sysmail.py"), "retry", "--all"],
                       spool.parent, {"SYSMAIL_SPOOL": str(spool)}, begin=None)
    assert "requeued 1 message(s)" in trace.stdout
    assert_order(trace.events, [moved(dead, only_entry(spool / "new")),
                                *dir_synced(spool / "new"), marker("requeued")])


# --------------------------------------------------------------------------- 4. dead letters


def _fail_one(spool: Path) -> Trace:
    """Queue and claim a message, then fail it between the markers."""
    return run_snippet(spool.parent, queued(spool), CLAIMED, 'mark("BEGIN")\n', FAILED,
                       'mark("STORED")\n')


def test_dead_letter_reason_is_durable_before_the_entry_moves(spool: Path) -> None:
    """Spool.fail first makes failed/N.json durable (a new file written, fsynced, renamed to
    failed/N.json, failed/ fsynced), and only then renames the claim to failed/N."""
    trace = _fail_one(spool)
    claimed = claim_path(trace.stdout)
    entry = unclaimed(claimed, spool / "failed")
    reason = entry.with_name(entry.name + ".json")
    assert json.loads(reason.read_text())["reason"] == "refused"
    origin = moved_into(trace.events, reason)
    assert_order(trace.events, [created(origin), wrote(origin), synced(origin),
                                moved(origin, reason), *dir_synced(spool / "failed"),
                                moved(claimed, entry), marker(STORED)])


def test_dead_letter_move_is_durable_before_fail_returns(spool: Path) -> None:
    """Spool.fail fsyncs failed/ after renaming the claim into it, before it returns."""
    trace = _fail_one(spool)
    claimed = claim_path(trace.stdout)
    assert_order(trace.events, [moved(claimed, unclaimed(claimed, spool / "failed")),
                                *dir_synced(spool / "failed"), marker(STORED)])


# --------------------------------------------------------------------------- 5. idempotency


def test_idempotency_key_is_stored_after_its_message_is_durable(spool: Path) -> None:
    """IdempotencyKeys.remember writes the spool id into the key file only after make_id's
    message is durable in new/ (its own write, fsync, rename, new/ fsync), and returns only
    after the key file and then the idempotency folder were fsynced."""
    folder = spool.parent / "idempotency"
    trace = run_snippet(spool.parent, f"""\
        spool = sysmail.Spool({str(spool)!r})
        keys = sysmail.IdempotencyKeys(sysmail.Path({str(folder)!r}), time.time)
        mark("BEGIN")
        keys.remember("request-1", lambda: spool.enqueue(
            {{"to": ["ada@example.org"]}}, b"Subject: hi\\r\\n\\r\\nbody\\r\\n", 1))
        mark("STORED")
        """)
    name = only_entry(spool / "new").name
    key = folder / hashlib.sha256(b"request-1").hexdigest()
    assert key.read_text() == name.split(".")[3]
    origin = _origin(trace.events, key)
    message = enqueue_steps(spool, name)
    where = assert_order(trace.events, [
        *message, wrote(origin), synced(origin), *([moved(origin, key)] if origin != key else []),
        *dir_synced(folder), marker(STORED)])
    assert_none(trace.events, wrote(origin), 0, where[len(message) - 1],
                "key data written before its message was durable")


def _origin(events: list[Syscall], path: Path) -> Path:
    """The file whose data ends up at path: the source of a rename to it, else path itself."""
    try:
        return moved_into(events, path)
    except AssertionError:
        return path


# --------------------------------------------------------------------------- 6. SQLite store


def test_sqlite_store_is_wal_with_full_sync(tmp_path: Path) -> None:
    """The token store's file is in WAL mode (read back by a fresh connection: the mode is
    persistent) and the store's own connection runs synchronous=FULL (2)."""
    import sysmail  # the module under test, imported only where a test needs it in-process

    database = tmp_path / "tokens.db"
    store = sysmail.SqliteStore(database)
    user = store.add_user("ada@example.org")
    store.save_token(b"h" * 32, user, "password-reset", 0.0, 600.0)
    assert store._db().execute("PRAGMA synchronous").fetchone()[0] == 2
    fresh = sqlite3.connect(database)
    try:
        assert fresh.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        fresh.close()


def test_sqlite_token_is_synced_before_save_token_returns(tmp_path: Path) -> None:
    """SqliteStore.save_token returns only after the WAL frames were written to the -wal file
    and that file was fsynced (or fdatasynced): synchronous=FULL at work."""
    database = tmp_path.resolve() / "tokens.db"
    trace = run_snippet(tmp_path, f"""\
        store = sysmail.SqliteStore({str(database)!r})
        user = store.add_user("ada@example.org")
        mark("BEGIN")
        store.save_token(b"h" * 32, user, "password-reset", time.time(), time.time() + 600)
        mark("STORED")
        """)
    wal = database.with_name(database.name + "-wal")
    assert_order(trace.events, [wrote(wal), synced(wal), marker(STORED)])


# --------------------------------------------------------------------------- the parser itself


def test_parser_reads_threads_unfinished_calls_and_relative_paths() -> None:
    """StraceLog keeps pids, joins <unfinished ...>/<... resumed> pairs at the resumption,
    resolves paths against their dirfd, and reads fd paths and write data from -y output."""
    log = StraceLog(textwrap.dedent("""\
        7 openat(AT_FDCWD</s>, "tmp/a", O_WRONLY|O_CREAT|O_EXCL|O_CLOEXEC, 0600) = 3</s/tmp/a>
        7 fsync(3</s/tmp/a> <unfinished ...>
        8 write(1<pipe:[9]>, "STORED\\n", 7) = 7
        7 <... fsync resumed>) = 0
        --- SIGCHLD {si_signo=SIGCHLD} ---
        7 renameat2(AT_FDCWD</s>, "/s/tmp/a", AT_FDCWD</s>, "new/a", RENAME_NOREPLACE) = 0
        7 close(4</s/new/a (deleted)>) = 0
        7 unlink("/s/x") = -1 ENOENT (No such file or directory)
        """))
    assert [(e.pid, e.name, e.paths) for e in log.events] == [
        (7, "openat", ("/s/tmp/a",)),
        (8, "write", ("pipe:[9]",)),
        (7, "fsync", ("/s/tmp/a",)),
        (7, "renameat2", ("/s/tmp/a", "/s/new/a")),
        (7, "close", ("/s/new/a",)),
        (7, "unlink", ("/s/x",)),
    ]
    assert [e.ok for e in log.events] == [True] * 5 + [False]
    assert assert_order(log.events, [created(Path("/s/tmp/a")), marker(STORED),
                                     synced(Path("/s/tmp/a")),
                                     moved(Path("/s/tmp/a"), Path("/s/new/a"))]) == [0, 1, 2, 3]
