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
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dkim
import pytest
from conftest import REPO, Ed25519Key, SmtpServer, dkim_dns, run_cli, run_python

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

QUEUE_COMMANDS = [["status"], ["queue"], ["show", "{id}"], ["failed"], ["retry", "--all"],
                  ["delete", "--all-failed"]]


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
    message_id = _ok(run_cli(["send", "--to", "ada@example.org", "--subject", "Hi", "--text",
                              "Hi."], _env(spool))).strip()
    env_file = _service_env_file(tmp_path, spool)
    assert _one_sentence(run_cli(["--env-file", str(env_file), "send", "--to", "a@example.org",
                                  "--subject", "Hi", "--text", "Hi."], {}), 78)  # needs the key
    argv = [arg.format(id=message_id) for arg in command]
    _ok(run_cli(["--env-file", str(env_file), *argv], {}))


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
    import sysmail  # root's own program, embedding sysmail: the batch path

    sysmail.Mailer(sysmail.Config.from_env(env)).enqueue_many(
        "security-alert", ["bob@example.org"], event="New sign-in")
    assert json.loads(_ok(run_cli(["status", "--json"], env)))["new"] == 2
    owners = {(p.relative_to(service_spool), p.stat().st_uid) for p in service_spool.rglob("*")}
    assert {uid for _, uid in owners} == {NOBODY}, owners
    assert "sent 2" in _ok(_as_nobody(["worker", "--once"], env))
    received = smtp_server.wait_for(2)
    assert any(message_id.encode() in r.data for r in received)
    assert json.loads(_ok(run_cli(["failed", "--json"], env))) == []


# --------------------------------------------------------------------------- queue, show, delete


def _send(env: dict[str, str], to: str, *more: str) -> str:
    """`sysmail send` an ad-hoc mail (or with more options); the Message-ID it printed."""
    options = list(more) or ["--subject", f"For {to}", "--text", f"Hello {to}."]
    return _ok(run_cli(["send", "--to", to, *options], env)).strip()


def _queue(env: dict[str, str]) -> list[dict]:
    return json.loads(_ok(run_cli(["queue", "--json"], env)))


@pytest.fixture
def operated(tmp_path: Path, smtp_server: SmtpServer) -> tuple[dict[str, str], dict[str, str]]:
    """A spool after one worker pass: a deferral (451), a dead letter (550), one sent, one
    queued after the pass; returns the env and the Message-IDs by role."""
    env = _env(tmp_path / "spool", smtp_server, SYSMAIL_RETRY_SCHEDULE="1h")
    smtp_server.sink.refuse_rcpt({"busy@example.org": "451 4.2.1 Mailbox busy, try later",
                                  "gone@example.org": "550 5.1.1 No such user"})
    ids = {role: _send(env, f"{role}@example.org") for role in ("busy", "gone", "ok")}
    assert "sent 1, deferred 1, failed 1" in _ok(run_cli(["worker", "--once"], env))
    ids["code"] = _send(env, "code@example.org", "--template", "two-factor-code",
                        "--var", "code=918273")
    return env, ids


def test_queue_lists_what_waits_like_mailq(operated: tuple) -> None:
    env, ids = operated
    rows = {row["message_id"]: row for row in _queue(env)}
    assert set(rows) == {ids["busy"], ids["code"]}  # sent and dead ones are not queued
    busy, code = rows[ids["busy"]], rows[ids["code"]]
    assert (busy["kind"], busy["to"], busy["attempt"]) == ("ad-hoc", ["busy@example.org"], 1)
    assert busy["last_reply"] == "451 4.2.1 Mailbox busy, try later"
    assert (code["kind"], code["attempt"], code["last_reply"]) == ("two-factor-code", 0, "")
    table = _ok(run_cli(["queue"], env)).splitlines()
    assert table[0].split() == ["ID", "MESSAGE-ID", "KIND", "TO", "AGE", "ATTEMPT", "NEXT",
                                "TRY", "LAST", "REPLY"]
    [busy_line] = [line for line in table if ids["busy"] in line]
    assert busy["id"] in busy_line and re.search(r" in (\d\dm|1h) ", busy_line)  # 1h ± 20 %
    assert busy_line.endswith("451 4.2.1 Mailbox busy, try later")
    [code_line] = [line for line in table if ids["code"] in line]
    assert code_line.split()[-3:] == ["0", "now", "-"]
    assert table[1].startswith(code["id"])  # urgent mail is listed (and sent) first


def test_show_prints_headers_and_text_and_hides_a_code_unless_raw(operated: tuple) -> None:
    env, ids = operated
    shown = _ok(run_cli(["show", ids["busy"]], env))
    assert "Subject: For busy@example.org" in shown and "Hello busy@example.org." in shown
    assert "state: new  attempt: 1" in shown
    by_id = _queue(env)
    [code_id] = [row["id"] for row in by_id if row["message_id"] == ids["code"]]
    hidden = _ok(run_cli(["show", code_id], env))
    assert ids["code"] in hidden and "918273" not in hidden and "--raw" in hidden
    assert "918273" in _ok(run_cli(["show", "--raw", ids["code"].strip("<>")], env))
    assert "Subject: For gone@example.org" in _ok(run_cli(["show", ids["gone"]], env))
    missing = _one_sentence(run_cli(["show", "nosuchid"], env), 65)
    assert "no message with id nosuchid" in missing


def test_retry_and_delete_take_the_message_id_that_send_printed(operated: tuple) -> None:
    env, ids = operated
    assert "requeued 1 message(s)" in _ok(run_cli(["retry", ids["gone"]], env))
    assert ids["gone"] in {row["message_id"] for row in _queue(env)}
    assert "deleted 2 message(s)" in _ok(run_cli(["delete", ids["gone"], ids["busy"]], env))
    assert [row["message_id"] for row in _queue(env)] == [ids["code"]]
    _one_sentence(run_cli(["delete", ids["gone"]], env), 65)
    status = json.loads(_ok(run_cli(["status", "--json"], env)))
    assert (status["new"], status["deferred"], status["failed"]) == (1, 0, 0)


def test_delete_all_failed_empties_the_dead_letters_only(operated: tuple) -> None:
    env, ids = operated
    assert [letter["rfcMessageId"] for letter in json.loads(
        _ok(run_cli(["failed", "--json"], env)))] == [ids["gone"]]
    assert "deleted 1 message(s)" in _ok(run_cli(["delete", "--all-failed"], env))
    assert json.loads(_ok(run_cli(["failed", "--json"], env))) == []
    assert len(_queue(env)) == 2
    _one_sentence(run_cli(["delete", "--all-failed", "abc"], env), 64)


def test_delete_leaves_a_message_that_a_worker_is_sending_alone(operated: tuple) -> None:
    """A claim in cur/ held by a live process is under way: deleting it would race its SMTP
    transaction (and its settling rename), so delete refuses it (75) and it stays whole."""
    import sysmail

    env, ids = operated
    spool = Path(env["SYSMAIL_SPOOL"])
    [busy] = [row["id"] for row in _queue(env) if row["message_id"] == ids["busy"]]
    [entry] = [e for e in os.listdir(spool / "new") if e.endswith(busy)]
    claimed = spool / "cur" / f"{entry}.{sysmail._process_token(os.getpid())}"
    os.rename(spool / "new" / entry, claimed)  # this live process claims it, as a worker does
    assert [r["state"] for r in _queue(env) if r["message_id"] == ids["busy"]] == ["sending"]
    error = _one_sentence(run_cli(["delete", ids["busy"]], env), 75)
    assert "being sent right now" in error
    assert claimed.exists()
    os.rename(claimed, spool / "new" / entry)  # the worker settles it: back in new/
    assert "deleted 1 message(s)" in _ok(run_cli(["delete", ids["busy"]], env))


# --------------------------------------------------------------------------- send


def test_send_to_several_makes_one_mail_per_recipient_unless_shared(
        tmp_path: Path, smtp_server: SmtpServer) -> None:
    env = _env(tmp_path / "spool", smtp_server)
    printed = _ok(run_cli(["send", "--to", "ada@example.org", "--to", "bob@example.org",
                           "--template", "security-alert", "--var", "event=New sign-in"], env))
    assert len(set(printed.split())) == 2
    shared = _ok(run_cli(["send", "--to", "ops1@example.org", "--to", "ops2@example.org",
                          "--shared", "--subject", "Export", "--text", "Done."], env)).split()
    assert len(shared) == 1
    assert "sent 3" in _ok(run_cli(["worker", "--once"], env))
    received = smtp_server.wait_for(3)
    alerts = [r for r in received if r.rcpt_tos != ["ops1@example.org", "ops2@example.org"]]
    assert sorted(r.rcpt_tos[0] for r in alerts) == ["ada@example.org", "bob@example.org"]
    for alert in alerts:  # no user sees another's address
        other = "bob" if alert.rcpt_tos == ["ada@example.org"] else "ada"
        assert len(alert.rcpt_tos) == 1 and f"{other}@example.org".encode() not in alert.data
    bad = _one_sentence(run_cli(["send", "--to", "ok@example.org", "--to", "not an address",
                                 "--subject", "S", "--text", "T"], env), 65)
    assert "address" in bad
    assert _queue(env) == []  # none was queued, not even the good one


def test_send_reads_the_text_or_the_html_from_standard_input(
        tmp_path: Path, smtp_server: SmtpServer) -> None:
    env = _env(tmp_path / "spool", smtp_server)
    report = "Nightly export: 14 files.\nAll checks passed.\n"
    _ok(run_cli(["send", "--to", "ops@example.org", "--subject", "Export", "--text", "-"], env,
                input=report))
    _ok(run_cli(["send", "--to", "ops@example.org", "--subject", "Export", "--text", "See HTML",
                 "--html", "-"], env, input="<p>Nightly <b>export</b></p>"))
    both = _one_sentence(run_cli(["send", "--to", "ops@example.org", "--subject", "S",
                                  "--text", "-", "--html", "-"], env, input="x"), 64)
    assert "standard input" in both
    _ok(run_cli(["worker", "--once"], env))
    text, html = sorted(smtp_server.wait_for(2), key=lambda r: b"text/html" in r.data)
    assert b"Nightly export: 14 files.\r\nAll checks passed." in text.data
    assert b"<b>export</b>" in html.data


# --------------------------------------------------------------------------- embedding


def _readme_block(section: str, language: str) -> str:
    """The first ```language block of a README section, exactly as written."""
    readme = (REPO / "README.md").read_text()
    text = readme[readme.index(f"\n## {section}\n"):]
    return text.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_the_readme_embedding_example_run_verbatim_delivers_its_mail(
        tmp_path: Path, smtp_server: SmtpServer) -> None:
    example = tmp_path / "example.py"
    example.write_text(_readme_block("Embedding", "python"))
    env = _env(tmp_path / "spool", smtp_server, PYTHONPATH=str(REPO))
    printed = _ok(run_python(example, [], env, cwd=tmp_path))
    assert printed.strip() == "sent 4, deferred 0, failed 0, expired 0, released 0"
    received = smtp_server.wait_for(4)
    assert sorted(r.rcpt_tos[0] for r in received) == [
        "ada@example.com", "ada@example.com", "bob@example.com", "ops@example.com"]
    assert _queue(env) == []


def test_flush_returns_at_once_with_the_mail_queued_when_the_relay_is_down(
        tmp_path: Path, smtp_server: SmtpServer) -> None:
    import sysmail

    smtp_server.stop()
    config = sysmail.Config.from_env(_env(tmp_path / "spool", smtp_server))
    mailer = sysmail.Mailer(config)
    mailer.enqueue_message("ada@example.org", "Hi", "Hello.")
    counts = mailer.flush(timeout=30)
    assert (counts.sent, counts.released) == (0, 1)
    assert mailer.spool.counts()["new"] == 1
    smtp_server.start()  # a new program (this one's relay backoff would hold it a while)
    assert sysmail.Mailer(config).flush(timeout=30).sent == 1
    assert smtp_server.wait_for(1)[0].rcpt_tos == ["ada@example.org"]


# --------------------------------------------------------------------------- a command line that teaches


def _subcommands() -> list[list[str]]:
    import sysmail

    def walk(parser: object, prefix: list[str]) -> list[list[str]]:
        found = []
        for action in parser._actions:  # argparse keeps its subcommands there
            for name, sub in getattr(action, "choices", None).items() if isinstance(
                    getattr(action, "choices", None), dict) else ():
                found += [[*prefix, name]] + walk(sub, [*prefix, name])
        return found
    return walk(sysmail._build_parser(), [])


def test_version_matches_the_package_metadata() -> None:
    import sysmail

    assert _ok(run_cli(["--version"], {})).strip() == f"sysmail {sysmail.__version__}"
    assert "sysmail.__version__" in (REPO / "pyproject.toml").read_text()


def test_every_subcommand_help_explains_each_option_and_ends_with_examples() -> None:
    import sysmail

    commands = _subcommands()
    assert {"send", "queue", "show", "delete", "keygen", "check"} <= {c[0] for c in commands}
    parsers = {tuple(c): None for c in commands}
    for command in parsers:
        shown = _ok(run_cli([*command, "--help"], {}))
        examples = shown.split("\nexamples:\n", 1)[1].strip().splitlines()
        assert 1 <= len(examples) <= 2, (command, shown)
        assert all("sysmail " in example for example in examples), examples
    parser = sysmail._build_parser()
    stack = [parser]
    while stack:  # every option of every subcommand has its phrase
        current = stack.pop()
        for action in current._actions:
            if isinstance(action.choices, dict):
                stack += action.choices.values()
            elif current is not parser or action.dest != "command":
                assert action.help and action.help.strip(), (current.prog, action.dest)
    for command in (["send"], ["preview"]):
        shown = _ok(run_cli([*command, "--help"], {}))
        for name, template in sysmail.TEMPLATES.items():
            [line] = [line for line in shown.splitlines() if line.strip().startswith(name + " ")]
            assert all(variable in line for variable in template.variables), line


def test_keygen_out_writes_a_private_pem_for_load_credential(
        tmp_path: Path, smtp_server: SmtpServer) -> None:
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    made = _ok(run_cli(["keygen", "--out", str(credentials / "dkim.pem")],
                       {"SYSTEM_DOMAIN": DOMAIN}))
    assert made.startswith('SYSTEM_DKIM_PRIVATE_KEY="-----BEGIN PRIVATE KEY-----')
    assert f"LoadCredential=dkim.pem:{credentials / 'dkim.pem'}" in made
    assert f"default._domainkey.{DOMAIN}. IN TXT" in made
    pem = credentials / "dkim.pem"
    assert pem.stat().st_mode & 0o777 == 0o600
    assert pem.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    again = _one_sentence(run_cli(["keygen", "--out", str(pem)], {}), 64)
    assert "never overwrites" in again
    _ok(run_cli(["keygen", "--type", "ed25519", "--out", str(credentials / "dkim-ed25519.pem")],
                {}))
    env = _env(tmp_path / "spool", smtp_server, CREDENTIALS_DIRECTORY=str(credentials))
    checked = _ok(run_cli(["check"], env))
    assert "DKIM rsa-sha256: selector default, 2048 bits" in checked
    assert "DKIM ed25519-sha256" in checked


def test_keygen_into_a_closed_pipe_exits_0_without_a_traceback() -> None:
    reader, writer = os.pipe()
    os.close(reader)  # like `sysmail keygen | head -c 0`: nobody reads
    try:
        result = subprocess.run(["python3", str(REPO / "sysmail.py"), "keygen"], stdout=writer,
                                stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (0, "")


def test_check_validates_template_overrides(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "password_reset.txt").write_text("Reset: ${reset_url}\n")
    (folder / "two-factor-code.txt").write_text("Your code: ${cod} (${brand})\n")
    env = _env(tmp_path / "spool", SYSMAIL_TEMPLATES=str(folder))
    error = _one_sentence(run_cli(["check"], env), 78)
    assert "password_reset.txt overrides no template (did you mean password-reset.txt?)" in error
    [unknown] = [line for line in error.splitlines() if "'cod'" in line]
    assert "two-factor-code" in unknown and "unknown variable" in unknown
    (folder / "de").mkdir()  # a language's subfolder is checked the same way
    (folder / "de" / "two-factor-code.subjet").write_text("Ihr Code\n")
    error = _one_sentence(run_cli(["check"], env), 78)
    assert "de/two-factor-code.subjet overrides no template (did you mean " in error
    (folder / "password_reset.txt").rename(folder / "password-reset.txt")
    (folder / "two-factor-code.txt").write_text("Your code: ${code} (${brand})\n")
    (folder / "de" / "two-factor-code.subjet").rename(folder / "de" / "two-factor-code.subject")
    assert "templates de:" in _ok(run_cli(["check"], env))


def test_check_warns_about_lookalike_variables_and_names_the_signing_backend(
        tmp_path: Path, rsa_key) -> None:
    env = _env(tmp_path / "spool", SYSTEM_DOMIAN="example.org", SYSTEM_DKIM_PRIVATE_KEY=rsa_key.pem)
    checked = _ok(run_cli(["check"], env))
    assert "warning: SYSTEM_DOMIAN is not a sysmail variable: did you mean SYSTEM_DOMAIN?" in checked
    assert "DKIM signing: OpenSSL (the cryptography package is installed)" in checked
    env["PYTHONPATH"] = _without(tmp_path, "cryptography")
    checked = _ok(run_cli(["check"], env))
    assert "DKIM signing: pure Python (dkimpy), as the cryptography package is not installed" in checked


def test_the_sender_startup_log_line_names_the_signing_backend(
        tmp_path: Path, smtp_server: SmtpServer, rsa_key) -> None:
    env = {"PATH": os.environ["PATH"], **_env(tmp_path / "spool", smtp_server,
                                                SYSTEM_DKIM_PRIVATE_KEY=rsa_key.pem)}
    worker = subprocess.Popen(["python3", str(REPO / "sysmail.py"), "worker"], env=env,
                              stderr=subprocess.PIPE, text=True)
    try:
        for line in worker.stderr:
            if '"sender_started"' in line:
                break
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    assert json.loads(line)["signing_backend"].startswith("OpenSSL")


def test_a_relay_without_starttls_is_reached_not_unreachable(
        tmp_path: Path, smtp_server: SmtpServer) -> None:
    env = _env(tmp_path / "spool", smtp_server)
    env["SMTP_URL"] = f"smtp://127.0.0.1:{smtp_server.port}"  # STARTTLS required; the sink has none
    error = _one_sentence(run_cli(["check"], env), 75)
    assert f"reached the relay 127.0.0.1:{smtp_server.port}, but it offers no STARTTLS" in error
    assert "cannot reach" not in error


def test_user_add_at_a_terminal_asks_twice_without_echo(tmp_path: Path) -> None:
    import pty

    env = {"PATH": os.environ["PATH"], "SYSMAIL_DB": str(tmp_path / "users.db"),
           "SYSMAIL_SPOOL": str(tmp_path / "spool")}
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a terminal of its own, as a user at a shell
        os.execve(sys.executable, [sys.executable, str(REPO / "sysmail.py"), "user", "add",
                                   "ada@example.com", "--name", "Ada"], env)
    seen = b""
    for answer in (b"correct-horse-battery\n", b"correct-horse-battery\n"):
        while not seen.rstrip().endswith(b":"):
            seen += os.read(terminal, 1024)
        os.write(terminal, answer)
        seen += b"|"
    while True:
        try:
            chunk = os.read(terminal, 1024)
        except OSError:  # the child is gone and its terminal closed
            break
        if not chunk:
            break
        seen += chunk
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, seen
    text = seen.decode()
    assert "Password (empty for none):" in text and "Password again:" in text
    assert "correct-horse-battery" not in text  # never echoed
    assert "added user" in text and "with a password" in text


def test_queue_lists_the_redis_fallback_too(tmp_path: Path, redis_server) -> None:
    spool = tmp_path / "spool"
    spool.write_text("a file where the spool should be: mail goes to Redis")
    env = _env(spool, REDIS_URL=redis_server.url)
    message_id = _send(env, "ada@example.org")
    [row] = _queue(env)
    assert (row["queue"], row["message_id"], row["to"], row["state"]) == (
        "redis", message_id, ["ada@example.org"], "new")
    assert message_id in _ok(run_cli(["queue"], env))
