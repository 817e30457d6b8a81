"""Several workers, crash safety under repeated SIGKILL, and sysmail as a systemd service (issue 4).

Everything is real: worker and service subprocesses started with `sysmail.py`, killed with real
signals, the aiosmtpd sink of the smtp_server fixture, a unix datagram socket standing in for
systemd's NOTIFY_SOCKET, `systemd-analyze` on the unit file, and a zipapp built with
tools/build_pyz.py and run by the system Python with `-I -S`.

"A process killed while writing leaves no partial file in new/" is not repeated here:
test_spool_and_crashes.py::test_sigkill_during_enqueue_never_leaves_a_partial_file_in_new
already SIGKILLs a subprocess enqueuing in a loop and parses every file in new/.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import dkim
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope, Session
from conftest import (
    REPO,
    RsaKey,
    SmtpServer,
    dkim_dns,
    enqueue_many,
    free_port,
    make_rsa_key,
    run_cli,
    wait_quiescent,
    wait_relay_idle,
)

import sysmail

DOMAIN = "example.com"
SYSMAIL = REPO / "sysmail.py"
UNIT = REPO / "sysmail.service"
SYSTEM_PYTHON = Path("/usr/bin/python3")
STATES = ("new", "deferred", "cur", "failed")
WATCHDOG_USEC = 2_000_000
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(<[^>\r\n]+>)", re.IGNORECASE | re.MULTILINE)
_STATUS = re.compile(r"queue: (\d+) due, (\d+) deferred, (\d+) sending, (\d+) failed")


# --------------------------------------------------------------------------- helpers


def _wait_until(condition: Callable[[], object], timeout: float, what: str,
                poll: float = 0.003) -> float:
    """Poll condition until true; return the seconds it took, or fail naming what."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"gave up after {timeout} s waiting for {what}")
        time.sleep(poll)
    return time.monotonic() - started


def _proc_token(pid: int) -> str:
    """The claim owner of the Spool docstring: pid-starttime (field 22 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return f"{pid}-{fields[19]}"


def _dead_token() -> str:
    """The owner token of a process that has exited and been reaped."""
    with subprocess.Popen(["sleep", "60"]) as proc:
        token = _proc_token(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=10) == -signal.SIGKILL
    return token


def _env(smtp_url: str, spool: Path, **extra: str) -> dict[str, str]:
    """A complete, minimal environment for a sysmail subprocess: one sender process each
    (these tests count processes; test_sender_processes.py covers several)."""
    return {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "SMTP_URL": smtp_url,
            "SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(spool),
            "SYSMAIL_LOG_LEVEL": "warning", "SYSMAIL_SENDERS": "1", **extra}


def _enqueue_many(spool: Path, count: int) -> list[str]:
    """Queue count ad-hoc mails in-process; their Message-IDs, all of them in new/."""
    message_ids = enqueue_many(spool, count, DOMAIN)
    assert len(os.listdir(spool / "new")) == count
    return message_ids


def _enqueue_deferred(spool: Path, subject: str) -> str:
    """Queue one message due in an hour (so no sender touches it); return its spool file name."""
    now = time.time()
    message_id = f"<{subject}.{secrets.token_hex(6)}@{DOMAIN}>"
    data = (f"From: noreply@{DOMAIN}\r\nTo: ada@example.org\r\nSubject: {subject}\r\n"
            f"Message-ID: {message_id}\r\n\r\n{subject}\r\n").encode()
    header = {"message_id": message_id, "from": f"noreply@{DOMAIN}", "to": ["ada@example.org"],
              "template": "", "queued_at": now, "expires_at": now + 86400}
    ident = sysmail.Spool(spool).enqueue(header, data, sysmail.BULK, due=now + 3600)
    [name] = [e for e in os.listdir(spool / "new") if e.endswith(f".{ident}")]
    return name


def _plant_orphan_claim(spool: Path) -> str:
    """A deferred message claimed by a dead process (cur/NAME.DEADOWNER); return NAME."""
    name = _enqueue_deferred(spool, "orphan")
    os.rename(spool / "new" / name, spool / "cur" / f"{name}.{_dead_token()}")
    return name


def _message_ids(messages: list) -> list[str]:
    """The Message-ID header of each received message, in arrival order."""
    ids = []
    for received in list(messages):
        found = _MESSAGE_ID.search(received.data)
        assert found, received.data[:300]
        ids.append(found.group(1).decode())
    return ids


def _status(env: dict[str, str]) -> dict[str, int]:
    """The four queue counts of `status --json`."""
    result = run_cli(["status", "--json"], env)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    return {key: status[key] for key in STATES}


def _spool_empty(spool: Path) -> bool:
    return not os.listdir(spool / "new") and not os.listdir(spool / "cur")


@dataclass
class Proc:
    """A `sysmail.py COMMAND` subprocess; stdout and stderr go to files."""

    popen: subprocess.Popen[bytes]
    out: Path
    err: Path
    token: str = ""

    @property
    def pid(self) -> int:
        return self.popen.pid

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.popen.wait(timeout=10) == -signal.SIGKILL

    def term(self, timeout: float = 10) -> int:
        os.kill(self.pid, signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Proc]]:
    """Start sysmail subprocesses; any still running at teardown is killed and reaped."""
    started: list[Proc] = []

    def start_(env: dict[str, str], command: str, *args: str) -> Proc:
        n = len(started)
        out, err = tmp_path / f"{command}-{n}.out", tmp_path / f"{command}-{n}.err"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            popen = subprocess.Popen([sys.executable, str(SYSMAIL), command, *args], env=env,
                                     stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                                     cwd=tmp_path)
        proc = Proc(popen, out, err)
        proc.token = _proc_token(popen.pid)  # the start time is the fork's: stable across exec
        started.append(proc)
        return proc

    yield start_
    for proc in started:
        if proc.popen.poll() is None:
            proc.popen.kill()
            proc.popen.wait()


# --------------------------------------------------------------------------- several workers


def test_four_workers_send_5000_mails_each_exactly_once(
        smtp_server: SmtpServer, tmp_path: Path, start: Callable[..., Proc]) -> None:
    spool = tmp_path / "spool"
    ids = _enqueue_many(spool, 5000)
    env = _env(smtp_server.url, spool)
    crew = [start(env, "worker") for _ in range(4)]
    owners_seen: set[str] = set()

    def done() -> bool:  # meanwhile, note whose claims are in cur/
        owners_seen.update(e.rpartition(".")[2] for e in os.listdir(spool / "cur"))
        return len(smtp_server.messages) >= len(ids) and _spool_empty(spool)

    _wait_until(done, 120, "5000 messages at the sink and an empty spool", poll=0.02)
    assert [w.popen.poll() for w in crew] == [None] * 4, "a worker died while draining"
    assert [w.term() for w in crew] == [0, 0, 0, 0]
    # no worker is left and the sink has seen every connection end: a late duplicate would
    # be in the count now, however slow this machine is
    received = _message_ids(wait_quiescent(spool, smtp_server))
    per_id = Counter(received)
    assert set(per_id) == set(ids)
    assert [(mid, n) for mid, n in per_id.items() if n != 1] == []
    assert len(received) == len(ids)
    assert owners_seen == {w.token for w in crew}, "not every worker took part"
    assert _status(env) == {"new": 0, "deferred": 0, "cur": 0, "failed": 0}
    for worker in crew:
        assert "Traceback" not in worker.stderr()


# --------------------------------------------------------------------------- crash safety


def test_ten_sigkills_while_draining_1000_mails_lose_nothing(
        smtp_server: SmtpServer, tmp_path: Path, start: Callable[..., Proc]) -> None:
    spool = tmp_path / "spool"
    ids = _enqueue_many(spool, 1000)
    env = _env(smtp_server.url, spool)
    rng = random.Random()
    # ten moments spread over the drain: after 40-80, 125-165, ... 805-845 deliveries
    thresholds = [40 + 85 * i + rng.randrange(41) for i in range(10)]
    orphans: list[str] = []  # claims the last killed worker left in cur/
    orphan_counts = []
    kills = 0
    for threshold in thresholds:
        # No worker runs now. The sink may still be reading the DATA the killed one had sent
        # (that message then counts, and is sent again: a duplicate): the count is final only
        # once every connection has ended. Read earlier, a late record of the dead worker's
        # would pass for its successor's first delivery.
        before = wait_relay_idle(smtp_server)
        worker = start(env, "worker")
        # generous timeouts: they bound a failure, the verdict does not depend on them
        _wait_until(lambda b=before: len(smtp_server.messages) > b, 60,
                    "the restarted worker to deliver again")
        # the dead worker's claims were taken back at once, before the first delivery of its
        # successor: not after a lease or a timeout
        assert not set(orphans) & set(os.listdir(spool / "cur")), "claims of the dead worker"
        _wait_until(lambda t=threshold: len(smtp_server.messages) >= t, 120,
                    f"{threshold} deliveries")
        worker.kill()
        kills += 1
        assert len(set(_message_ids(smtp_server.messages))) < len(ids), "killed after the drain"
        orphans = [e for e in os.listdir(spool / "cur") if e.endswith(f".{worker.token}")]
        orphan_counts.append(len(orphans))
    assert sum(n > 0 for n in orphan_counts) >= 5, f"kills rarely left claims: {orphan_counts}"

    before = wait_relay_idle(smtp_server)
    final = start(env, "worker")
    _wait_until(lambda: len(smtp_server.messages) > before, 60, "the final worker to deliver")
    assert not set(orphans) & set(os.listdir(spool / "cur")), "claims of the last dead worker"
    _wait_until(lambda: len(smtp_server.messages) >= len(ids) and _spool_empty(spool), 120,
                "the spool drained", poll=0.02)
    assert final.term() == 0
    received = _message_ids(wait_quiescent(spool, smtp_server))  # the final count
    per_id = Counter(received)
    assert set(ids) - set(per_id) == set(), "lost messages"
    assert set(per_id) == set(ids)
    duplicates = len(received) - len(per_id)
    assert duplicates <= kills, f"{duplicates} duplicates for {kills} kills"
    assert _status(env) == {"new": 0, "deferred": 0, "cur": 0, "failed": 0}


# --------------------------------------------------------------------------- the unit file


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.skip("systemd-analyze is not installed (CI installs Debian's systemd package)")
    return found


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    analyze = _systemd_analyze()
    result = subprocess.run([analyze, "verify", str(UNIT)], capture_output=True, text=True,
                            timeout=60, check=False)
    about_unit = [line for line in result.stderr.splitlines() if "sysmail" in line]
    assert about_unit == [], result.stderr
    assert result.returncode == 0, result.stderr
    # the check can fail: the same verify does report a flaw in a copy of the unit
    broken = tmp_path / "sysmail.service"
    broken.write_text(UNIT.read_text().replace("[Service]\n", "[Service]\nRestartt=always\n", 1))
    flagged = subprocess.run([analyze, "verify", str(broken)], capture_output=True, text=True,
                             timeout=60, check=False)
    assert "Restartt" in flagged.stderr and "sysmail.service" in flagged.stderr, flagged.stderr


def test_systemd_analyze_security_rates_the_unit_2_or_better() -> None:
    analyze = _systemd_analyze()
    result = subprocess.run([analyze, "security", "--offline=true", str(UNIT)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    found = re.search(r"Overall exposure level for sysmail\.service: (\d+\.\d+)", result.stdout)
    assert found, result.stdout[-2000:]
    assert float(found.group(1)) <= 2.0, result.stdout


def _unit_settings(text: str) -> dict[str, dict[str, list[str]]]:
    """The unit's sections and their settings (a key may repeat), comments dropped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a setting: {raw!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


_TIME_UNITS = {"us": 1e-6, "ms": 1e-3, "": 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0,
               "h": 3600.0, "hr": 3600.0}


def _timespan(value: str) -> float:
    """A systemd time span ("90s", "1min 30s", "90") in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value)
    assert parts and "".join(n + u for n, u in parts) == value.replace(" ", ""), value
    return sum(float(n) * _TIME_UNITS[u] for n, u in parts)


def test_the_unit_has_the_settings_the_spec_names() -> None:
    unit = _unit_settings(UNIT.read_text())
    service = unit["Service"]

    def one(key: str) -> str:
        assert key in service, f"{key}= is missing"
        return service[key][-1]

    assert one("Type") == "notify"
    assert service["EnvironmentFile"] == ["/etc/sysmail/sysmail.env"]
    assert service["LoadCredential"] == ["dkim.pem:/etc/sysmail/dkim.pem"]
    assert "dkim.pem" in sysmail.CREDENTIAL_FILES
    assert one("StateDirectory") == "sysmail"
    assert one("DynamicUser") == "yes"
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus").split() == [str(sysmail.EX_CONFIG)] == ["78"]
    smtp_timeout = sysmail.Config().smtp_timeout
    assert smtp_timeout == 30.0
    assert _timespan(one("TimeoutStopSec")) > smtp_timeout + sysmail.REQUEST_DEADLINE_SECONDS
    # the sender loop pings at least once per idle poll: the watchdog must allow two polls
    assert _timespan(one("WatchdogSec")) >= 2 * sysmail.SENDER_IDLE_POLL_SECONDS
    command = shlex.split(one("ExecStart"))
    assert command[0] == str(SYSTEM_PYTHON) and command[1].endswith("sysmail.pyz")
    assert command[2:] == ["serve"]
    environment = dict(item.split("=", 1) for value in service.get("Environment", [])
                       for item in shlex.split(value))
    # spool and database in the StateDirectory, set in the env file only: the operator's
    # `sysmail --env-file /etc/sysmail/sysmail.env status` must find the service's spool
    install_steps = "\n".join(line for line in UNIT.read_text().splitlines()
                              if line.startswith("#"))
    for variable in ("SYSMAIL_SPOOL", "SYSMAIL_DB"):
        assert variable not in environment, environment
        assert f"{variable}=/var/lib/sysmail/" in install_steps
    assert "SYSTEM_DKIM_PRIVATE_KEY" not in environment  # the key comes as a credential
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


# --------------------------------------------------------------------------- sd_notify


@dataclass
class NotifySocket:
    """A SOCK_DGRAM unix socket standing in for systemd; records every datagram it receives."""

    address: str  # what NOTIFY_SOCKET says: a path, or "@name" for an abstract socket
    sock: socket.socket = field(init=False, repr=False)
    received: list[tuple[float, dict[str, str]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        bound = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        self.sock.bind(bound)

    def close(self) -> None:
        self.sock.close()

    def receive(self, timeout: float) -> dict[str, str] | None:
        """The next datagram as KEY=VALUE pairs, or None after timeout seconds."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return None
        lines = data.decode().split("\n")
        fields = dict(line.split("=", 1) for line in lines)
        assert len(fields) == len(lines), data  # no key twice in one datagram
        self.received.append((time.monotonic(), fields))
        return fields

    def wait_for(self, key: str, timeout: float) -> tuple[float, dict[str, str]]:
        """Receive until a datagram with key arrives; return when, and the datagram."""
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            fields = self.receive(remaining)
            if fields is not None and key in fields:
                return self.received[-1][0], fields
        seen = [f for _, f in self.received]
        raise AssertionError(f"no {key} within {timeout} s; received {seen}")

    def collect(self, seconds: float) -> list[tuple[float, dict[str, str]]]:
        """Everything that arrives in the next seconds."""
        first = len(self.received)
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.receive(remaining)
        return self.received[first:]


@pytest.fixture
def notify_path(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(str(tmp_path / "notify.sock"))
    assert len(listener.address) < 100  # sun_path's limit
    yield listener
    listener.close()


@pytest.fixture
def notify_abstract() -> Iterator[NotifySocket]:
    listener = NotifySocket(f"@sysmail-test-{secrets.token_hex(8)}")
    yield listener
    listener.close()


def _serve_env(smtp_url: str, tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    return _env(smtp_url, tmp_path / "spool", SYSMAIL_LISTEN=f"127.0.0.1:{port}", SYSMAIL_METRICS_LISTEN="off",
                SYSMAIL_DB=str(tmp_path / "sysmail.db"), **extra)


def _status_counts(status: str) -> tuple[int, ...]:
    found = _STATUS.fullmatch(status)
    assert found, status
    return tuple(int(n) for n in found.groups())


def _healthz(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
        assert json.loads(response.read()) == {"status": "ok"}
        return response.status


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_serve_notifies_ready_watchdog_and_stopping_on_a_datagram_socket(
        kind: str, request: pytest.FixtureRequest, smtp_server: SmtpServer, tmp_path: Path,
        start: Callable[..., Proc]) -> None:
    notify: NotifySocket = request.getfixturevalue(f"notify_{kind}")
    spool = tmp_path / "spool"
    deferred = _enqueue_deferred(spool, "later")
    orphan = _plant_orphan_claim(spool)  # READY must wait until it is recovered
    port = free_port()
    env = _serve_env(smtp_server.url, tmp_path, port, NOTIFY_SOCKET=notify.address,
                     WATCHDOG_USEC=str(WATCHDOG_USEC))
    service = start(env, "serve")

    ready_at, ready = notify.wait_for("READY", 15)
    with socket.create_connection(("127.0.0.1", port), timeout=2):
        pass  # the HTTP port accepts connections the moment READY=1 arrives
    assert _healthz(port) == 200
    assert ready["READY"] == "1"
    # the spool was recovered before READY: the dead worker's claim is back in new/
    assert _status_counts(ready["STATUS"]) == (0, 2, 0, 0)
    assert os.listdir(spool / "cur") == []
    assert sorted(os.listdir(spool / "new")) == sorted([deferred, orphan])

    window = notify.collect(3.5)
    pings = [at for at, fields in window if fields.get("WATCHDOG") == "1"]
    assert len(pings) >= 3, window
    gaps = [b - a for a, b in itertools.pairwise([ready_at, *pings])]
    assert max(gaps) < WATCHDOG_USEC / 1e6, gaps
    assert all("READY" not in fields for _, fields in window)  # READY=1 is sent once

    assert service.popen.poll() is None
    os.kill(service.pid, signal.SIGTERM)
    _, stopping = notify.wait_for("STOPPING", 10)
    assert stopping["STOPPING"] == "1"
    assert service.popen.wait(timeout=15) == 0
    assert "Traceback" not in service.stderr()
    assert smtp_server.messages == []  # the deferred mail stayed deferred


def test_worker_notifies_ready_after_recovery_and_stopping_on_sigterm(
        smtp_server: SmtpServer, tmp_path: Path, notify_path: NotifySocket,
        start: Callable[..., Proc]) -> None:
    spool = tmp_path / "spool"
    orphan = _plant_orphan_claim(spool)
    # systemd watches another process (WATCHDOG_PID): this one must not send WATCHDOG=1
    env = _env(smtp_server.url, spool, NOTIFY_SOCKET=notify_path.address,
               WATCHDOG_USEC=str(WATCHDOG_USEC), WATCHDOG_PID="1")
    worker = start(env, "worker")
    _, ready = notify_path.wait_for("READY", 15)
    assert ready["READY"] == "1"
    assert _status_counts(ready["STATUS"]) == (0, 1, 0, 0)
    assert os.listdir(spool / "new") == [orphan] and os.listdir(spool / "cur") == []
    # The sender's first heartbeat sends STATUS=, and WATCHDOG=1 with it were it allowed to
    # ping: that datagram (before or after READY) is the proof, not a wait of fixed length.
    def heartbeat_seen() -> bool:
        notify_path.receive(0.2)
        return any("STATUS" in f and "READY" not in f for _, f in notify_path.received)

    _wait_until(heartbeat_seen, 15, "the first heartbeat's STATUS=")
    assert [f for _, f in notify_path.received if "WATCHDOG" in f] == []
    assert worker.term() == 0
    _, stopping = notify_path.wait_for("STOPPING", 5)
    assert stopping["STOPPING"] == "1"
    assert "Traceback" not in worker.stderr()


def test_serve_without_notify_socket_starts_and_stops_cleanly(
        smtp_server: SmtpServer, tmp_path: Path, start: Callable[..., Proc]) -> None:
    port = free_port()
    env = _serve_env(smtp_server.url, tmp_path, port, WATCHDOG_USEC=str(WATCHDOG_USEC))
    service = start(env, "serve")

    def answers() -> bool:
        try:
            return _healthz(port) == 200
        except OSError:
            assert service.popen.poll() is None, service.stderr()
            return False

    _wait_until(answers, 15, "the service to answer /healthz")
    # a delivery proves a sender cycle ran its heartbeat (the sender beats before each send)
    # with no socket to notify, where a sleep would only guess that one had run by now
    [message_id] = enqueue_many(tmp_path / "spool", 1, DOMAIN)
    [received] = smtp_server.wait_for(1, timeout=30)
    assert _message_ids([received]) == [message_id]
    assert service.popen.poll() is None
    assert service.term() == 0
    assert len(wait_quiescent(tmp_path / "spool", smtp_server)) == 1
    log = service.stderr()
    assert "Traceback" not in log
    levels = {json.loads(line)["level"] for line in log.splitlines() if line.startswith("{")}
    assert levels <= {"warning"}, log


class _SlowRelay:
    """An aiosmtpd handler taking its time, like a busy real relay: `data_delay` seconds before
    answering the end of DATA, `command_delay` before answering EHLO, MAIL FROM and RCPT TO."""

    def __init__(self, data_delay: float, command_delay: float = 0.0) -> None:
        self.data_delay = data_delay
        self.command_delay = command_delay
        self.count = 0

    async def handle_EHLO(self, server: object, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        await asyncio.sleep(self.command_delay)
        session.host_name = hostname
        return responses

    async def handle_MAIL(self, server: object, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        await asyncio.sleep(self.command_delay)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: object, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        await asyncio.sleep(self.command_delay)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: object, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.data_delay)
        self.count += 1
        return "250 2.0.0 Ok: queued"


class WatchdogSilent(AssertionError):
    """The service stayed silent longer than WATCHDOG_USEC: systemd would have killed it."""


def _longest_silence(notify: NotifySocket, start: float, end: float) -> float:
    """The longest time between start, the WATCHDOG=1 pings received until end, and end."""
    pings = [at for at, f in notify.received if f.get("WATCHDOG") == "1" and start < at < end]
    return max(b - a for a, b in itertools.pairwise([start, *pings, end]))


def test_watchdog_pings_continue_while_a_backlog_drains(
        tmp_path: Path, notify_path: NotifySocket, start: Callable[..., Proc]) -> None:
    relay = _SlowRelay(0.025)
    controller = Controller(relay, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        spool = tmp_path / "spool"
        _enqueue_many(spool, 160)
        port = free_port()
        env = _serve_env(f"smtp+plain://127.0.0.1:{controller.port}", tmp_path, port,
                         NOTIFY_SOCKET=notify_path.address, WATCHDOG_USEC=str(WATCHDOG_USEC),
                         SYSMAIL_SMTP_CONNECTIONS="1")  # one connection: the drain outlasts 4 s
        service = start(env, "serve")
        ready_at, _ = notify_path.wait_for("READY", 15)
        deadline = time.monotonic() + 30
        while relay.count < 160 and time.monotonic() < deadline:
            notify_path.receive(0.05)
        drained_at = time.monotonic()
        assert relay.count == 160, f"only {relay.count} of 160 delivered"
        assert service.term() == 0
    finally:
        controller.stop()
    limit = WATCHDOG_USEC / 1e6
    assert drained_at - ready_at > 2 * limit  # the drain outlasts the watchdog interval
    silence = _longest_silence(notify_path, ready_at, drained_at)
    if silence >= limit:
        raise WatchdogSilent(f"no WATCHDOG=1 for {silence:.2f} s while draining "
                             f"(WATCHDOG_USEC={WATCHDOG_USEC})")


def test_watchdog_outlasts_one_slow_but_successful_smtp_transaction(
        tmp_path: Path, notify_path: NotifySocket, start: Callable[..., Proc]) -> None:
    unit = _unit_settings(UNIT.read_text())["Service"]
    smtp_timeout = 2.0  # the unit's ratio of WatchdogSec to SMTP_TIMEOUT_SECONDS, scaled down
    watchdog = smtp_timeout * _timespan(unit["WatchdogSec"][-1]) / sysmail.Config().smtp_timeout
    relay = _SlowRelay(data_delay=0.6, command_delay=0.6)  # every reply well within the timeout
    controller = Controller(relay, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        spool = tmp_path / "spool"
        env = _serve_env(f"smtp+plain://127.0.0.1:{controller.port}", tmp_path, free_port(),
                         NOTIFY_SOCKET=notify_path.address, SMTP_TIMEOUT_SECONDS=str(smtp_timeout),
                         WATCHDOG_USEC=str(int(watchdog * 1e6)))
        service = start(env, "serve")
        ready_at, _ = notify_path.wait_for("READY", 15)
        notify_path.collect(1.2)  # idle: the pings come every second
        mailer = sysmail.Mailer(sysmail.Config.from_env({"SYSTEM_DOMAIN": DOMAIN,
                                                         "SYSMAIL_SPOOL": str(spool)}))
        mailer.enqueue_message("ada@example.org", "Slow", "A slow relay.\n")
        deadline = time.monotonic() + 15
        while relay.count < 1 and time.monotonic() < deadline:
            notify_path.receive(0.05)
        assert relay.count == 1, "the slow relay never got the message"
        notify_path.collect(1.2)
        end = time.monotonic()
        assert service.term() == 0
    finally:
        controller.stop()
    assert "relay_unavailable" not in service.stderr()  # slow, but never timed out
    assert os.listdir(spool / "new") == os.listdir(spool / "cur") == []
    silence = _longest_silence(notify_path, ready_at, end)
    if silence >= watchdog:
        raise WatchdogSilent(f"no WATCHDOG=1 for {silence:.2f} s during one SMTP transaction "
                             f"(watchdog {watchdog} s, SMTP timeout {smtp_timeout} s)")


# --------------------------------------------------------------------------- credentials


def _verify(data: bytes, key: RsaKey) -> bool:
    return dkim.verify(data, dnsfunc=dkim_dns({f"default._domainkey.{DOMAIN}.": key.dns_record}))


@pytest.mark.parametrize("env_key", [False, True], ids=["credential-only", "credential-wins"])
def test_the_dkim_key_comes_from_credentials_directory(
        env_key: bool, smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "dkim.pem").write_text(rsa_key.pem)
    env = {"SMTP_URL": smtp_server.url, "SYSTEM_DOMAIN": DOMAIN,
           "SYSMAIL_SPOOL": str(tmp_path / "spool"), "CREDENTIALS_DIRECTORY": str(credentials)}
    other = make_rsa_key() if env_key else None
    if other is not None:
        env["SYSTEM_DKIM_PRIVATE_KEY"] = other.pem
    # no SYSMAIL_ALLOW_UNSIGNED: without a key the configuration would be refused (exit 78)
    sent = run_cli(["send", "--to", "ada@example.org", "--template", "two-factor-code",
                    "--var", "code=123456"], env)
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    worked = run_cli(["worker", "--once"], env)
    assert worked.returncode == 0, worked.stderr
    [received] = smtp_server.wait_for(1)
    assert _message_ids([received]) == [message_id]
    assert received.data.startswith(b"DKIM-Signature:")
    assert b"123456" in received.data
    assert _verify(received.data, rsa_key)
    if other is not None:
        assert not _verify(received.data, other)  # the env key did not sign it


def test_without_credentials_the_environment_key_still_signs(
        smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey) -> None:
    env = {"SMTP_URL": smtp_server.url, "SYSTEM_DOMAIN": DOMAIN,
           "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem,
           "CREDENTIALS_DIRECTORY": str(tmp_path / "empty")}
    (tmp_path / "empty").mkdir()
    sent = run_cli(["send", "--to", "ada@example.org", "--subject", "Hi", "--text", "Hi."], env)
    assert sent.returncode == 0, sent.stderr
    assert run_cli(["worker", "--once"], env).returncode == 0
    [received] = smtp_server.wait_for(1)
    assert _verify(received.data, rsa_key)


# --------------------------------------------------------------------------- zipapp


@pytest.fixture(scope="module")
def pyz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sysmail.pyz built once by tools/build_pyz.py (pip fetches the dependencies)."""
    output = tmp_path_factory.mktemp("pyz") / "sysmail.pyz"
    result = subprocess.run([sys.executable, str(REPO / "tools" / "build_pyz.py"), "--output",
                             str(output)], capture_output=True, text=True, timeout=180,
                            check=False, cwd=output.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert output.is_file()
    return output


def test_the_zipapp_sends_from_an_empty_folder_with_the_system_python(
        pyz: Path, smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey) -> None:
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (the unit's ExecStart interpreter) is not installed")
    with zipfile.ZipFile(pyz) as archive:
        names = archive.namelist()
    assert {"__main__.py", "sysmail.py", "dkim/__init__.py", "templates/de/strings.json",
            "templates/de/password-reset.txt"} <= set(names)
    assert not [n for n in names if n.endswith((".so", ".pyd"))]
    # -I -S: no site-packages, no PYTHON* variables: the system Python alone lacks dkimpy
    bare = subprocess.run([str(SYSTEM_PYTHON), "-I", "-S", "-c", "import dkim"],
                          capture_output=True, text=True, env={}, timeout=30, check=False)
    assert bare.returncode != 0 and "dkim" in bare.stderr

    folder = tmp_path / "empty"
    folder.mkdir()
    env = {"SMTP_URL": smtp_server.url, "SYSTEM_DOMAIN": DOMAIN,
           "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem}  # env -i: nothing else, not even PATH

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(SYSTEM_PYTHON), "-I", "-S", str(pyz), *args], env=env,
                              cwd=folder, capture_output=True, text=True, timeout=60, check=False)

    sent = run("send", "--to", "a@example.com", "--template", "two-factor-code",
               "--var", "code=123456")
    assert sent.returncode == 0, sent.stderr
    message_id = sent.stdout.strip()
    assert re.fullmatch(r"<[^<>@\s]+@example\.com>", message_id), sent.stdout
    assert len(os.listdir(folder / "spool" / "new")) == 1  # ./spool, the default
    worked = run("worker", "--once")
    assert worked.returncode == 0, worked.stderr
    assert worked.stdout.startswith("sent 1,"), worked.stdout
    [received] = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["a@example.com"]
    assert _message_ids([received]) == [message_id]
    assert b"123456" in received.data
    assert _verify(received.data, rsa_key)  # dkimpy, from inside the zip, signed it
    assert os.listdir(folder) == ["spool"]
    assert os.listdir(folder / "spool" / "new") == os.listdir(folder / "spool" / "cur") == []
    # the shipped translations travel inside the zip: a German sign-in code, lang="de"
    sent = run("send", "--to", "a@example.com", "--template", "two-factor-code", "--locale",
               "de-AT", "--var", "code=654321")
    assert sent.returncode == 0, sent.stderr
    assert run("worker", "--once").returncode == 0
    german = smtp_server.wait_for(2)[1].data
    assert b"Subject: =?utf-8?q?Ihr_Anmeldecode_f=C3=BCr_example=2Ecom=3A_654321?=" in german
    assert b'<html lang=3D"de" dir=3D"ltr">' in german
