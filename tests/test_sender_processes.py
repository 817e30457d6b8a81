"""serve and worker send from several processes (SYSMAIL_SENDERS, one per core by default),
supervised: a sender that dies is restarted, SIGTERM stops them all, a killed serve takes its
senders with it, and a crash of all of them resends at most one message per process
(issue 14). Real processes, real signals, the real test relay."""

from __future__ import annotations

import os
import re
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from conftest import SmtpServer, free_port
from test_workers_and_service import (  # the process machinery of the worker tests
    Proc,
    _enqueue_many,
    _env,
    _message_ids,
    _spool_empty,
    _wait_until,
    start,  # noqa: F401  (the fixture)
)


def children(pid: int) -> list[int]:
    """The live child processes of pid (zombies left out)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(stat[1]) == pid and stat[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


def serve_env(smtp: SmtpServer, spool: Path, senders: int) -> dict[str, str]:
    return _env(smtp.url, spool, SYSMAIL_SENDERS=str(senders),
                SYSMAIL_LISTEN=f"127.0.0.1:{free_port()}", SYSMAIL_METRICS_LISTEN="off",
                SYSMAIL_LOG_LEVEL="info", SYSMAIL_SMTP_CONNECTIONS="1")


def test_serve_sends_from_several_processes_and_restarts_one_that_dies(
        smtp_server: SmtpServer, tmp_path: Path, start: Callable[..., Proc]) -> None:  # noqa: F811
    """SYSMAIL_SENDERS=3: serve runs two `worker` processes besides itself; one killed with
    SIGKILL is restarted (a new process, a `sender_died` log line), and the queue still
    drains exactly once; SIGTERM then stops serve and both senders within seconds."""
    spool = tmp_path / "spool"
    ids = _enqueue_many(spool, 300)
    serve = start(serve_env(smtp_server, spool, 3), "serve")
    _wait_until(lambda: len(children(serve.pid)) == 2, 15, "two sender processes")
    first, second = children(serve.pid)
    os.kill(first, signal.SIGKILL)
    _wait_until(lambda: first not in children(serve.pid) and len(children(serve.pid)) == 2, 15,
                "the killed sender to be replaced")
    assert second in children(serve.pid)
    _wait_until(lambda: _spool_empty(spool) and len(smtp_server.messages) >= 300, 60,
                "the queue to drain")
    received = Counter(_message_ids(smtp_server.messages))
    assert set(received) == set(ids) and max(received.values()) <= 2  # one crash, one resend
    assert sum(received.values()) - 300 <= 1
    senders = children(serve.pid)
    stopping = time.monotonic()
    assert serve.term(timeout=20) == 0
    assert time.monotonic() - stopping < 8
    assert not any(alive(pid) for pid in senders)
    assert '"event": "sender_died"' in serve.stderr()
    assert f'"pid": {first}' in serve.stderr()


def test_a_killed_serve_takes_its_senders_with_it(smtp_server: SmtpServer, tmp_path: Path,
                                                  start: Callable[..., Proc]) -> None:  # noqa: F811
    """SIGKILL to serve (no chance to stop them): the kernel tells its senders
    (PR_SET_PDEATHSIG), and they stop instead of draining on as orphans."""
    serve = start(serve_env(smtp_server, tmp_path / "spool", 3), "serve")
    _wait_until(lambda: serve.stderr().count('"event": "sender_started"') == 3, 15,
                "serve and its two senders to be sending")
    senders = children(serve.pid)
    serve.kill()
    _wait_until(lambda: not any(alive(pid) for pid in senders), 15, "the senders to stop")


def test_killing_every_sender_mid_drain_resends_at_most_one_message_each(
        smtp_server: SmtpServer, tmp_path: Path, start: Callable[..., Proc]) -> None:  # noqa: F811
    """Three sender processes SIGKILLed together in the middle of a drain, then serve again:
    every message arrives, and at most one per killed process arrives twice."""
    spool = tmp_path / "spool"
    ids = _enqueue_many(spool, 600)
    env = serve_env(smtp_server, spool, 3)
    serve = start(env, "serve")
    _wait_until(lambda: len(children(serve.pid)) == 2 and len(smtp_server.messages) >= 100, 30,
                "the drain to be under way")
    group = [serve.pid, *children(serve.pid)]
    for pid in group:
        os.kill(pid, signal.SIGKILL)
    serve.popen.wait(10)
    _wait_until(lambda: not any(alive(pid) for pid in group), 10, "every sender to be gone")
    again = start({**env, "SYSMAIL_LISTEN": f"127.0.0.1:{free_port()}"}, "serve")
    _wait_until(lambda: _spool_empty(spool) and set(_message_ids(smtp_server.messages)) >= set(ids),
                60, "the rest to be delivered")
    received = Counter(_message_ids(smtp_server.messages))
    assert set(received) == set(ids)
    assert sum(received.values()) - len(ids) <= len(group), received.most_common(5)
    assert again.term(timeout=20) == 0


def test_metrics_count_the_mail_of_every_sender_process(
        smtp_server: SmtpServer, tmp_path: Path, start: Callable[..., Proc]) -> None:  # noqa: F811
    """/metrics of serve adds the counts its sender processes publish (spool/senders/): 300
    messages sent by three processes show as 300 sent, not as serve's own share."""
    spool = tmp_path / "spool"
    _enqueue_many(spool, 300)
    port = free_port()
    env = {**serve_env(smtp_server, spool, 3), "SYSMAIL_METRICS_LISTEN": f"127.0.0.1:{port}"}
    serve = start(env, "serve")
    _wait_until(lambda: _spool_empty(spool) and len(smtp_server.messages) >= 300, 60,
                "the queue to drain")

    def sent() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            page = reply.read().decode()
        found = re.search(r'^sysmail_messages_total\{outcome="sent"\} (\d+)', page,
                          re.MULTILINE)
        return int(found.group(1)) if found else -1
    _wait_until(lambda: sent() == len(smtp_server.messages), 15, "every process's sends counted")
    assert len(list((spool / "senders").glob("*.json"))) == 2
    assert serve.term(timeout=20) == 0
