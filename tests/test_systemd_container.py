"""sysmail.service under a real systemd: a minimal Debian booted with systemd-nspawn.

The tree is made once by debootstrap and cached in $SYSMAIL_CI_CACHE (default
/var/cache/sysmail-ci); each run boots it with --volatile=overlay (writes go to a tmpfs, the
cache stays clean). The container shares the host's network (no --private-network), so the
service reaches the test's aiosmtpd relay on 127.0.0.1 and the test reaches the service's
listeners there. --register=no and --keep-unit: nothing is asked of a host systemd, which
this machine may not run; so machinectl cannot see the container, and commands enter it with
`nsenter -t PID -a`, PID being the container's systemd (a child of systemd-nspawn).

The zipapp and the unit are installed by running the commands of the unit file's "Install:"
comment, as an operator would paste them.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
from conftest import LOCALHOST, REPO, RsaKey, SmtpServer, dkim_dns, free_port

CACHE = Path(os.environ.get("SYSMAIL_CI_CACHE", "/var/cache/sysmail-ci"))
MIRROR = os.environ.get("SYSMAIL_CI_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"  # its python3 is 3.11, the oldest sysmail runs on
PACKAGES = ("systemd", "systemd-sysv", "python3")
TREE = CACHE / f"debian-{SUITE}-{'-'.join(PACKAGES)}"  # named by what is in it
UNIT = REPO / "sysmail.service"
API_KEY = "container-test-key-0123456789abcdef"
DOMAIN = "example.com"
SOURCE = "/root/sysmail-install"  # the bind-mounted folder the install commands run in
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MESSAGE_ID = re.compile(rb"^Message-ID: (<[^>]+>)", re.MULTILINE | re.IGNORECASE)


def _unavailable() -> str | None:
    """Why this machine cannot boot the container, or None."""
    if not sys.platform.startswith("linux"):
        return "systemd-nspawn runs on Linux only"
    if os.geteuid() != 0:
        return "booting a container with systemd-nspawn needs root"
    missing = [tool for tool in ("systemd-nspawn", "debootstrap", "nsenter")
               if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (Debian packages systemd-container, "
                "debootstrap, util-linux; .ci/run installs them)")
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


def debian_tree() -> Path:
    """The cached tree, made by debootstrap on first use (under a lock: one build at a time)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (TREE / "usr" / "bin" / "python3").exists():
            return TREE
        partial = CACHE / f".{TREE.name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        built = subprocess.run(
            ["debootstrap", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
             str(partial), MIRROR], capture_output=True, text=True, timeout=900, check=False)
        if built.returncode != 0:
            shutil.rmtree(partial, ignore_errors=True)
            tail = (built.stderr or built.stdout).strip().splitlines()[-1:]
            pytest.skip(f"debootstrap could not build {TREE} from {MIRROR}: {tail}")
        partial.rename(TREE)
        return TREE


def _cannot_run_containers(tree: Path) -> str | None:
    """Start /bin/true in the tree: a machine without namespaces or overlayfs fails here."""
    result = subprocess.run(_nspawn(tree) + ["/bin/true"], capture_output=True, text=True,
                            timeout=60, check=False)
    return None if result.returncode == 0 else (result.stderr.strip() or "exit status "
                                                f"{result.returncode}")


def _nspawn(tree: Path) -> list[str]:
    return ["systemd-nspawn", "--quiet", "--register=no", "--keep-unit", "--volatile=overlay",
            f"--directory={tree}", f"--machine=sysmail-ci-{os.getpid()}"]


@dataclass
class Container:
    """A booted container, entered through its init's namespaces."""

    nspawn: subprocess.Popen[bytes]
    init_pid: int
    console: Path

    def run(self, *command: str, input: str | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run a command inside the container, as root in all its namespaces."""
        return subprocess.run(["nsenter", "-t", str(self.init_pid), "-a", "--", *command], input=input, capture_output=True, text=True,
                              timeout=timeout, check=False,
                              env={"PATH": PATH, "LANG": "C.UTF-8", "SYSTEMD_PAGER": ""})

    def sh(self, script: str, cwd: str = "/", input: str | None = None
           ) -> subprocess.CompletedProcess[str]:
        """Run a shell command line inside the container in cwd; fail the test if it fails."""
        result = self.run("/bin/sh", "-c", f"cd {cwd} && {script}", input=input)
        assert result.returncode == 0, f"{script}: {result.stdout}{result.stderr}"
        return result

    def show(self, *properties: str) -> dict[str, str]:
        """systemctl show -p ... sysmail, as a dict."""
        result = self.run("systemctl", "show", "sysmail", *(f"-p{p}" for p in properties))
        assert result.returncode == 0, result.stderr
        return dict(line.split("=", 1) for line in result.stdout.splitlines())

    def journal(self) -> str:
        """The service's journal, for failure messages."""
        return self.run("journalctl", "-u", "sysmail", "--no-pager", "-n", "60").stdout


def _init_pid(nspawn: subprocess.Popen[bytes], console: Path) -> int:
    """The container's PID 1 seen from the host: systemd-nspawn's child once it runs systemd."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert nspawn.poll() is None, console.read_text(errors="replace")[-3000:]
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == nspawn.pid and stat.with_name("comm").read_text() == "systemd\n":
                    return int(stat.parent.name)
        time.sleep(0.1)
    raise AssertionError(f"no systemd under systemd-nspawn: {console.read_text()[-3000:]}")


@contextlib.contextmanager
def booted(tree: Path, source: Path, folder: Path) -> Iterator[Container]:
    """Boot the tree (source bind-mounted read-only at SOURCE); power it off afterwards."""
    console = folder / "console.log"
    with console.open("wb") as log:
        nspawn = subprocess.Popen(_nspawn(tree) + ["--boot", "--console=read-only",
                                                   f"--bind-ro={source}:{SOURCE}"],
                                  stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        container = Container(nspawn, _init_pid(nspawn, console), console)
        deadline = time.monotonic() + 60
        while (state := container.run("systemctl", "is-system-running", "--wait",
                                      timeout=60).stdout.strip()) not in ("running", "degraded"):
            assert time.monotonic() < deadline, f"boot: {state}\n{console.read_text()[-3000:]}"
            time.sleep(0.2)
        yield container
    finally:
        nspawn.terminate()  # nspawn passes SIGRTMIN+3 to the container's systemd: poweroff
        try:
            nspawn.wait(60)
        except subprocess.TimeoutExpired:
            nspawn.kill()
            nspawn.wait()


def install_commands() -> list[str]:
    """The shell commands of the unit file's "Install:" comment (a line ending in a backslash
    goes on on the next), without their own comments."""
    header = UNIT.read_text().split("[Unit]")[0]
    block = header.split("# Install:\n", 1)[1]
    lines = [line[1:].strip() for line in block.splitlines() if line.startswith("#   ")]
    joined = "\n".join(lines).replace("\\\n", " ")
    return [re.sub(r"\s+#\s.*$", "", command) for command in joined.splitlines()]


@dataclass
class Service:
    """sysmail installed and started in a container, with the relay it sends to."""

    container: Container
    relay: SmtpServer
    url: str
    ops_url: str
    rsa_key: RsaKey
    times: dict[str, float]

    def send(self, to: str) -> str:
        """POST /v1/emails with the API key; return the Message-ID."""
        request = urllib.request.Request(
            self.url + "/v1/emails", method="POST",
            data=json.dumps({"template": "security-alert", "to": to,
                             "vars": {"event": "a sign-in from the container test"}}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=15) as reply:
            assert reply.status == 202
            return json.loads(reply.read())["messageId"]

    def received(self) -> dict[str, bytes]:
        """Message-ID -> message, of everything the relay accepted."""
        found = {}
        for message in list(self.relay.messages):
            match = _MESSAGE_ID.search(message.data)
            assert match, message.data[:300]
            found[match.group(1).decode()] = message.data
        return found

    def wait_active(self, timeout: float = 30) -> dict[str, str]:
        """Wait until systemd reports the service active (Type=notify: after READY=1)."""
        deadline = time.monotonic() + timeout
        while (shown := self.container.show("ActiveState", "SubState", "StatusText",
                                            "NRestarts", "MainPID"))["ActiveState"] != "active":
            assert time.monotonic() < deadline, f"{shown}\n{self.container.journal()}"
            time.sleep(0.1)
        return shown


def _env_file(relay: SmtpServer, listen: str, ops_listen: str) -> str:
    return (f"SMTP_URL={relay.url}\nSYSTEM_DOMAIN={DOMAIN}\nSYSMAIL_API_KEY={API_KEY}\n"
            f"SYSMAIL_LISTEN={listen}\nSYSMAIL_METRICS_LISTEN={ops_listen}\n")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, rsa_key: RsaKey) -> Iterator[Service]:
    """Boot the cached tree, install sysmail as the unit's comments say, and start it."""
    times = {}
    started = time.monotonic()
    tree = debian_tree()
    times["tree"] = time.monotonic() - started
    if reason := _cannot_run_containers(tree):
        pytest.skip(f"systemd-nspawn cannot start a container here: {reason}")
    folder = tmp_path_factory.mktemp("container")
    source = folder / "install"
    source.mkdir()
    (source / "dkim.pem").write_text(rsa_key.pem)
    shutil.copy2(UNIT, source / "sysmail.service")
    relay = SmtpServer("smtp+plain")
    relay.start()
    listen, ops_listen = f"{LOCALHOST}:{free_port()}", f"{LOCALHOST}:{free_port()}"
    try:
        with booted(tree, source, folder) as container:
            times["boot"] = time.monotonic() - started - times["tree"]
            for line in install_commands():
                _install(container, line, source, _env_file(relay, listen, ops_listen))
            svc = Service(container, relay, f"http://{listen}", f"http://{ops_listen}", rsa_key,
                          times)
            svc.wait_active()
            times["ready"] = time.monotonic() - started
            yield svc
        print(f"container: tree {times['tree']:.1f} s, boot {times['boot']:.1f} s, "
              f"installed and ready after {times['ready']:.1f} s in all", file=sys.stderr)
    finally:
        relay.stop()


def _install(container: Container, line: str, source: Path, env_text: str) -> None:
    """One line of the unit's install comment: the build on the host (the container has no
    pip), everything else in the container, in the folder holding the files it names."""
    build = "python3 tools/build_pyz.py && "
    if line.startswith(build):
        built = subprocess.run([sys.executable, str(REPO / "tools" / "build_pyz.py"),
                                "--output", str(source / "sysmail.pyz")],
                               capture_output=True, text=True, timeout=300, check=False)
        assert built.returncode == 0, built.stdout + built.stderr
        line = line.removeprefix(build)
    container.sh(line, cwd=SOURCE)
    if line.startswith("install ") and "/etc/sysmail/sysmail.env" in line:  # "fill it in"
        container.sh("cat >> /etc/sysmail/sysmail.env", input=env_text)


def test_install_commands_are_the_units_comment() -> None:
    """The commands run are the comment's, whole: a unit whose comment lost a step fails."""
    commands = install_commands()
    assert commands[0].startswith("python3 tools/build_pyz.py && install ")
    assert "systemctl enable --now sysmail" in commands[-1]
    assert any("/etc/sysmail/sysmail.env" in c for c in commands)
    assert any("/etc/sysmail/dkim.pem" in c for c in commands)


def test_ready_with_its_status_line(service: Service) -> None:
    """Type=notify: active only after READY=1, with the queue in the STATUS= line."""
    shown = service.wait_active()
    assert shown["SubState"] == "running"
    assert re.fullmatch(r"queue: \d+ due, \d+ deferred, \d+ sending, \d+ failed",
                        shown["StatusText"]), shown
    status = service.container.run("systemctl", "status", "--no-pager", "sysmail")
    assert status.returncode == 0, status.stdout + status.stderr
    assert "Active: active (running)" in status.stdout
    assert 'Status: "queue: ' in status.stdout
    mode = service.container.sh("stat -c %a /etc/sysmail/sysmail.env /etc/sysmail/dkim.pem")
    assert mode.stdout.split() == ["600", "600"]


def test_mail_through_the_api_is_signed_with_the_credential_key(service: Service) -> None:
    """POST /v1/emails to the service in the container; the relay on the host gets the mail
    signed with the key that reached the service as a credential (LoadCredential=)."""
    message_id = service.send("ada@example.org")
    deadline = time.monotonic() + 30
    while message_id not in (received := service.received()):
        assert time.monotonic() < deadline, service.container.journal()
        time.sleep(0.1)
    dns = dkim_dns({f"default._domainkey.{DOMAIN}.": service.rsa_key.dns_record})
    assert dkim.verify(received[message_id], dnsfunc=dns)
    env = service.container.sh("cat /etc/sysmail/sysmail.env").stdout
    assert "PRIVATE KEY" not in env and "DKIM" not in env  # the key came as a credential only
    with urllib.request.urlopen(service.ops_url + "/metrics", timeout=10) as reply:
        metrics = reply.read().decode()
    assert re.search(r'^sysmail_build_info\{signing_backend="dkimpy",version="[^"]+"\} 1$',
                     metrics, re.MULTILINE), metrics  # the zipapp signs in pure Python


def test_sigkill_restarts_the_service_and_loses_nothing(service: Service) -> None:
    """Mail accepted (202) while the relay is down survives `systemctl kill -s KILL`:
    Restart=on-failure brings the service back and it delivers every message."""
    before = service.wait_active()
    service.relay.stop()
    try:
        sent = [service.send(f"user{n}@example.org") for n in range(5)]
        killed = service.container.run("systemctl", "kill", "-s", "KILL", "sysmail")
        assert killed.returncode == 0, killed.stderr
        deadline = time.monotonic() + 30
        while (after := service.wait_active())["NRestarts"] == before["NRestarts"]:
            assert time.monotonic() < deadline, service.container.journal()
            time.sleep(0.1)
    finally:
        service.relay.start()
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    assert after["MainPID"] != before["MainPID"]
    deadline = time.monotonic() + 60
    while missing := set(sent) - set(service.received()):
        assert time.monotonic() < deadline, f"{missing}\n{service.container.journal()}"
        time.sleep(0.2)


def test_operator_commands_work_on_the_services_spool(service: Service) -> None:
    """As documented, root runs `sysmail --env-file /etc/sysmail/sysmail.env ...` on the spool
    the service (a DynamicUser) writes, without the DKIM key, which reaches the service as a
    credential: `failed` lists a refused message, `retry` puts it back and the service sends
    it, `status` counts the queue."""
    service.relay.sink.script_data(["550 5.7.1 rejected by policy"])
    message_id = service.send("grace@example.org")
    deadline = time.monotonic() + 30
    while not (letters := json.loads(_operator(service, "failed", "--json"))):
        assert time.monotonic() < deadline, service.container.journal()
        time.sleep(0.2)
    assert [letter["rfcMessageId"] for letter in letters] == [message_id]
    assert _operator(service, "retry", letters[0]["id"]).startswith("requeued 1 ")
    deadline = time.monotonic() + 30
    while message_id not in service.received():
        assert time.monotonic() < deadline, service.container.journal()
        time.sleep(0.1)
    counts = json.loads(_operator(service, "status", "--json"))
    assert (counts["new"], counts["cur"], counts["failed"]) == (0, 0, 0), counts
    assert json.loads(_operator(service, "failed", "--json")) == []


def _operator(service: Service, *args: str) -> str:
    """An operator's sysmail command in the container, as root; its standard output."""
    result = service.container.run("sysmail", "--env-file", "/etc/sysmail/sysmail.env", *args)
    assert result.returncode == 0, f"sysmail {' '.join(args)}: {result.stdout}{result.stderr}"
    return result.stdout


def test_systemctl_stop_takes_seconds(service: Service) -> None:
    """SIGTERM: the service finishes its requests and stops well inside TimeoutStopSec."""
    service.wait_active()
    started = time.monotonic()
    stopped = service.container.run("systemctl", "stop", "sysmail")
    took = time.monotonic() - started
    assert stopped.returncode == 0, stopped.stderr
    shown = service.container.show("ActiveState", "Result", "ExecMainStatus")
    assert (shown["ActiveState"], shown["Result"]) == ("inactive", "success"), shown
    assert took < 5, f"systemctl stop took {took:.1f} s\n{service.container.journal()}"
    print(f"systemctl stop took {took:.2f} s", file=sys.stderr)
    assert service.container.run("systemctl", "start", "sysmail").returncode == 0
    service.wait_active()
