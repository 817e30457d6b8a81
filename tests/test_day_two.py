"""Day two (issue 11): operating the queue as Postfix operators expect, embedding as the README
shows, and a command line that teaches. Everything goes through the real command line
(`python3 sysmail.py ...` subprocesses, as a user types it) against the aiosmtpd sink.

A library made absent is really absent: a folder put first on PYTHONPATH holds a package of
the same name whose import fails, as it does on a machine without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from conftest import REPO, Ed25519Key, SmtpServer, dkim_dns, run_cli

DOMAIN = "example.com"


# --------------------------------------------------------------------------- helpers


def _env(spool: Path, smtp: SmtpServer | None = None, **extra: str) -> dict[str, str]:
    """A minimal environment for a sysmail subprocess on spool (and the sink, if given)."""
    env = {"SYSTEM_DOMAIN": DOMAIN, "SYSMAIL_SPOOL": str(spool), "SYSMAIL_LOG_LEVEL": "info"}
    if smtp is not None:
        env |= {"SMTP_URL": smtp.url, "SYSMAIL_ALLOW_UNSIGNED": "1"}
    return env | extra


def _without(tmp_path: Path, *packages: str) -> str:
    """A PYTHONPATH folder on which each package's import fails, as where it is not installed."""
    folder = tmp_path / "absent"
    for package in packages:
        (folder / package).mkdir(parents=True, exist_ok=True)
        (folder / package / "__init__.py").write_text(
            f"raise ImportError({f'No module named {package!r}'!r})\n")
    return str(folder)


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def _one_sentence(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The error of a failed run: the expected exit code, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    return result.stderr


# --------------------------------------------------------------------------- extras


def test_ed25519_signs_through_cryptography_without_pynacl(
        tmp_path: Path, smtp_server: SmtpServer, ed25519_key: Ed25519Key) -> None:
    env = _env(tmp_path / "spool", smtp_server, SYSTEM_DKIM_ED25519_PRIVATE_KEY=ed25519_key.pem,
               PYTHONPATH=_without(tmp_path, "nacl"))
    assert "ed25519-sha256" in _ok(run_cli(["check"], env))
    _ok(run_cli(["send", "--to", "ada@example.org", "--subject", "Hi", "--text", "Hi."], env))
    assert "sent 1" in _ok(run_cli(["worker", "--once"], env))
    [received] = smtp_server.wait_for(1)
    dns = dkim_dns({f"ed25519._domainkey.{DOMAIN}": ed25519_key.dns_record})
    assert dkim.verify(received.data, dnsfunc=dns)  # this process has PyNaCl to verify with
    records = _ok(run_cli(["dns"], env))
    assert f"p={ed25519_key.public_b64}" in records


def test_ed25519_without_any_library_is_one_sentence_and_keygen_still_works(
        tmp_path: Path, ed25519_key: Ed25519Key) -> None:
    absent = _without(tmp_path, "nacl", "cryptography")
    env = _env(tmp_path / "spool", SYSTEM_DKIM_ED25519_PRIVATE_KEY=ed25519_key.seed_b64,
               PYTHONPATH=absent)
    error = _one_sentence(run_cli(["check"], env), 78)
    assert "pip install '.[ed25519]'" in error and "python3-cryptography" in error
    made = _ok(run_cli(["keygen", "--type", "ed25519"], {"PYTHONPATH": absent}))
    seed = re.search(r'SYSTEM_DKIM_ED25519_PRIVATE_KEY="([^"]+)"', made).group(1)
    import sysmail  # with cryptography here: the record keygen printed matches the seed

    assert f"p={sysmail._ed25519_public_key_b64(seed.encode())}" in made


def test_the_extras_are_named_as_the_readme_installs_them() -> None:
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(d.startswith("cryptography") for d in extras["ed25519"])
    assert any(d.startswith("cryptography") for d in extras["fast"])
    readme = (REPO / "README.md").read_text()
    for extra in re.findall(r"pip install '\.\[(\w+)\]'", readme):
        assert extra in extras, extra
    assert "sysmail[" not in readme  # sysmail is not on PyPI: extras come from a checkout


# --------------------------------------------------------------------------- queue commands
# need the spool settings only

QUEUE_COMMANDS = [["status"], ["failed"], ["retry", "--all"]]


def _service_env_file(tmp_path: Path, spool: Path) -> Path:
    """An env file like the service's: a real relay, and no DKIM key (it comes as a credential)."""
    env_file = tmp_path / "sysmail.env"
    env_file.write_text(f"SMTP_URL=smtp://user:secret@relay.example.com:587\n"
                        f"SYSTEM_DOMAIN={DOMAIN}\nSYSMAIL_SPOOL={spool}\n")
    return env_file


@pytest.mark.parametrize("command", QUEUE_COMMANDS, ids=lambda c: c[0])
def test_queue_commands_work_with_the_service_env_file_without_its_key(
        tmp_path: Path, command: list[str]) -> None:
    spool = tmp_path / "spool"
    _ok(run_cli(["send", "--to", "ada@example.org", "--subject", "Hi", "--text", "Hi."],
                _env(spool)))
    env_file = _service_env_file(tmp_path, spool)
    assert _one_sentence(run_cli(["--env-file", str(env_file), "send", "--to", "a@example.org",
                                  "--subject", "Hi", "--text", "Hi."], {}), 78)  # needs the key
    _ok(run_cli(["--env-file", str(env_file), *command], {}))


@pytest.mark.parametrize("command", QUEUE_COMMANDS, ids=lambda c: c[0])
def test_a_missing_spool_is_a_configuration_error_and_is_not_created(
        tmp_path: Path, command: list[str]) -> None:
    spool = tmp_path / "no" / "spool"
    error = _one_sentence(run_cli(command, _env(spool)), 78)
    assert str(spool) in error and len(error.strip().splitlines()) == 2, error
    assert not (tmp_path / "no").exists()


def test_serve_worker_and_send_create_the_spool(tmp_path: Path) -> None:
    for number, command in enumerate([["worker", "--once"],
                                      ["send", "--to", "a@example.org", "--subject", "S",
                                       "--text", "T"]]):
        spool = tmp_path / f"spool{number}"
        _ok(run_cli(command, _env(spool), cwd=tmp_path))
        assert (spool / "new").is_dir()


# --------------------------------------------------------------------------- root in a service's spool

SYSTEM_PYTHON = Path("/usr/bin/python3")
NOBODY = 65534


def _as_nobody(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """sysmail run by the system Python as the unprivileged user nobody (the service's user)."""
    command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
               str(SYSTEM_PYTHON), str(REPO / "sysmail.py"), *args]
    return subprocess.run(command, env={"PATH": os.environ["PATH"], **env}, capture_output=True,
                          text=True, timeout=60, check=False)


@pytest.fixture
def service_spool() -> Iterator[Path]:
    """A spool the service user (nobody) made for itself, in a folder it can reach."""
    if os.geteuid() != 0 or not shutil.which("setpriv") or not SYSTEM_PYTHON.exists():
        pytest.skip("needs root, setpriv and /usr/bin/python3 to act as two users")
    base = Path(tempfile.mkdtemp(prefix="sysmail-service-", dir="/tmp"))
    base.chmod(0o755)
    state = base / "state"  # what systemd's StateDirectory= makes: the service user's own
    state.mkdir(mode=0o700)
    os.chown(state, NOBODY, NOBODY)
    yield state / "spool"
    shutil.rmtree(base)


def test_root_queues_into_a_service_spool_what_the_service_user_can_send(
        service_spool: Path, smtp_server: SmtpServer) -> None:
    env = _env(service_spool, smtp_server)
    _ok(_as_nobody(["worker", "--once"], env))  # the service starts: its spool, its user
    assert service_spool.stat().st_uid == NOBODY
    message_id = _ok(run_cli(["send", "--to", "ada@example.org", "--subject", "From root",
                              "--text", "Queued by an operator."], env)).strip()  # as root
    assert json.loads(_ok(run_cli(["status", "--json"], env)))["new"] == 1
    owners = {(p.relative_to(service_spool), p.stat().st_uid) for p in service_spool.rglob("*")}
    assert {uid for _, uid in owners} == {NOBODY}, owners
    assert "sent 1" in _ok(_as_nobody(["worker", "--once"], env))
    [received] = smtp_server.wait_for(1)
    assert message_id.encode() in received.data
    assert json.loads(_ok(run_cli(["failed", "--json"], env))) == []
