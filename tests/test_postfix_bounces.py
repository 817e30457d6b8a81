"""Issue 12 end to end with a real MTA: Debian's Postfix, started here as a second instance with
its own configuration folder on a free loopback port.

sysmail sends (as `python3 sysmail.py send` and `worker --once`) through Postfix to an unknown
local user; Postfix's local delivery bounces it, its bounce daemon sends the DSN to the VERP
envelope sender bounces+TAG@b.example, the transport map hands b.example to a `pipe` service
running `sysmail bounce`, and the unknown user ends on the suppression list. A forged bounce
through the same pipe changes nothing.

Postfix's master must start as root, and the pipe must not run as root: the fixture needs root
(CI runs as root) and runs every sysmail process as `nobody` with Debian's /usr/bin/python3.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, free_port
from test_bounce_suppression import DSN  # a DSN naming {rcpt}, sent to {to}

PYTHON = "/usr/bin/python3"  # readable by nobody (the test's own Python may sit under /root)
BOUNCE_DOMAIN = "b.example"
UNKNOWN = "nosuchuser@localhost"
DISCARDED = "ada@ok.example"

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup unix n - n 60 1 pickup
cleanup unix n - n - 0 cleanup
qmgr unix n - n 300 1 qmgr
rewrite unix - - n - - trivial-rewrite
bounce unix - - n - 0 bounce
defer unix - - n - 0 bounce
trace unix - - n - 0 bounce
verify unix - - n - 1 verify
flush unix n - n 1000? 0 flush
proxymap unix - - n - - proxymap
smtp unix - - n - - smtp
showq unix n - n - - showq
error unix - - n - - error
retry unix - - n - - error
discard unix - - n - - discard
local unix - n n - - local
anvil unix - - n - 1 anvil
scache unix - - n - 1 scache
postlog unix-dgram n - n - 1 postlogd
sysmail-bounce unix - n n - - pipe
  flags=Rq user=nobody argv={python} {sysmail} --env-file {env} bounce --recipient ${{original_recipient}}
"""

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = mta.sysmail.test
mydomain = sysmail.test
myorigin = $myhostname
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
# unknown local users are accepted, then bounced by local delivery: a DSN, not a 550 at RCPT
mydestination = localhost
local_recipient_maps =
alias_maps =
alias_database =
# the bounce domain goes to the pipe into sysmail bounce; ok.example is thrown away
transport_maps = inline:{{ {bounce_domain}=sysmail-bounce: ok.example=discard: }}
recipient_delimiter = +
biff = no
smtputf8_enable = no
maillog_file = {base}/maillog
syslog_name = sysmail-test-postfix
smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination
"""


@dataclass
class Postfix:
    """A running Postfix instance and the sysmail environment its pipe uses."""

    base: Path
    port: int
    env_file: Path
    spool: Path

    def log(self) -> str:
        try:
            return (self.base / "maillog").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, count: int = 1, timeout: float = 60) -> list[str]:
        """The maillog lines matching pattern, once there are count of them."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.findall(f".*{pattern}.*", self.log())
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"no {count} log line(s) like {pattern!r}:\n{self.log()[-3000:]}")
            time.sleep(0.1)

    def sysmail(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `python3 sysmail.py --env-file ENV ARGS` as nobody, as the pipe runs it."""
        result = subprocess.run([PYTHON, str(self.base / "sysmail.py"), "--env-file",
                                 str(self.env_file), *args], capture_output=True, text=True,
                                user="nobody", group="nogroup", env={"PATH": "/usr/bin:/bin"},
                                cwd=self.base, timeout=60, check=False)
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    if os.geteuid() != 0 or not shutil.which("postfix") or not os.path.exists(PYTHON):
        pytest.skip("Postfix as a fixture needs root, the postfix package and /usr/bin/python3")
    # not under /tmp/pytest-of-root (0700): postfix and nobody must reach these folders
    base = Path(tempfile.mkdtemp(prefix="sysmail-postfix-", dir="/var/tmp"))
    try:
        yield _started(base)
    finally:
        _stop(base)
        shutil.rmtree(base, ignore_errors=True)


def _stop(base: Path) -> None:
    """`postfix stop`, then wait until this instance's master (and so its children) is gone."""
    try:
        pid = int((base / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = 0
    subprocess.run(["postfix", "-c", str(base / "etc"), "stop"], capture_output=True,
                   check=False, timeout=60)
    deadline = time.monotonic() + 30
    while pid and time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


def _started(base: Path) -> Postfix:
    os.chmod(base, 0o755)
    for folder in ("etc", "queue", "data", "spool"):
        (base / folder).mkdir(mode=0o755)
    shutil.chown(base / "data", "postfix", "postfix")
    shutil.chown(base / "spool", "nobody", "nogroup")
    os.chmod(base / "spool", 0o700)
    shutil.copy(REPO / "sysmail.py", base / "sysmail.py")  # the repository may not be readable
    port = free_port()
    env_file = base / "sysmail.env"
    env_file.write_text(f"SYSTEM_DOMAIN=example.com\nSYSMAIL_SPOOL={base}/spool\n"
                        f"SYSMAIL_QUEUE_KEY={'q' * 40}\nSYSMAIL_BOUNCE_DOMAIN={BOUNCE_DOMAIN}\n"
                        f"SMTP_URL=smtp+plain://127.0.0.1:{port}\nSYSMAIL_ALLOW_UNSIGNED=1\n")
    (base / "etc" / "main.cf").write_text(MAIN_CF.format(base=base, bounce_domain=BOUNCE_DOMAIN))
    (base / "etc" / "master.cf").write_text(MASTER_CF.format(
        port=port, python=PYTHON, sysmail=base / "sysmail.py", env=env_file))
    started = subprocess.run(["postfix", "-c", str(base / "etc"), "start"], capture_output=True,
                             text=True, timeout=60, check=False)
    assert started.returncode == 0, started.stderr
    server = Postfix(base, port, env_file, base / "spool")
    server.wait_log("daemon started")
    return server


def suppressed(postfix: Postfix) -> dict[str, dict]:
    listing = postfix.sysmail("suppressed", "--json")
    return {e["address"]: e for e in json.loads(listing.stdout)}


def test_a_postfix_bounce_suppresses_the_right_address(postfix: Postfix) -> None:
    sent = postfix.sysmail("send", "--to", UNKNOWN, "--to", DISCARDED, "--template",
                           "service-announcement", "--var", "title=T", "--var", "body=B")
    message_id = sent.stdout.strip()
    assert postfix.sysmail("worker", "--once").stdout.startswith("sent 2")
    # Postfix: local delivery bounces the unknown user, the DSN goes to the VERP address,
    # and the pipe hands it to sysmail bounce, which exits 0
    assert postfix.wait_log(r"to=<nosuchuser@localhost>.*dsn=5\.1\.1, status=bounced")
    (piped,) = postfix.wait_log(r"to=<bounces\+[a-z2-7]{24}@b\.example>, relay=sysmail-bounce")
    assert "status=sent" in piped, postfix.log()[-3000:]
    entries = suppressed(postfix)
    assert list(entries) == [UNKNOWN]
    assert entries[UNKNOWN]["reason"] == "hard-bounce"
    assert entries[UNKNOWN]["source"] == "hard bounce 5.1.1"
    assert entries[UNKNOWN]["expires"] is not None
    assert message_id.startswith("<")
    # what the list now blocks: the next announcement goes to the other address only
    again = postfix.sysmail("send", "--to", UNKNOWN, "--to", DISCARDED, "--template",
                            "billing-notification", "--var", "summary=S")
    assert f"not queued for {UNKNOWN}: suppressed" in again.stderr


def test_a_forged_bounce_through_postfix_changes_nothing(postfix: Postfix) -> None:
    import smtplib

    forged_to = f"bounces+{'a' * 24}@{BOUNCE_DOMAIN}"
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=30) as smtp:
        smtp.sendmail("", [forged_to], DSN.format(to=forged_to, rcpt=DISCARDED).encode())
    (piped,) = postfix.wait_log(rf"to=<{re.escape(forged_to)}>, relay=sysmail-bounce")
    assert "status=sent" in piped  # handled (exit 0): the MTA need not retry
    assert suppressed(postfix) == {}
