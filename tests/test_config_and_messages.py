"""Configuration, the seven templates and message building (issue 2), via the API and the CLI."""

from __future__ import annotations

import base64
import email.utils
import json
import re
import secrets
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as DEFAULT_POLICY
from pathlib import Path

import pytest
from conftest import Ed25519Key, FakeClock, RsaKey, run_cli

import sysmail

RELAY_PASSWORD = "Pw-" + secrets.token_hex(8)
BAD_ED25519_SEED = base64.b64encode(secrets.token_bytes(31)).decode()  # one byte short
NOW = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC
BRAND = {"brand": "Example Cloud", "domain": "example.com"}
SPEC_VARIABLES = {  # template -> (required, optional) as listed in issues 2 and 13
    "password-reset": (("reset_url",), {"name", "expires_minutes"}),
    "email-verification": (("verify_url",), {"name"}),
    "two-factor-code": (("code",), {"expires_minutes"}),
    "magic-link": (("login_url",), {"expires_minutes", "name"}),
    "security-alert": (("event",), {"ip", "time", "name", "device", "location", "action_url"}),
    "email-change-notice": (("new_email",), {"undo_url", "time", "ip", "name"}),
    "billing-notification": (("summary",), {"amount", "due_date", "billing_url", "name"}),
    "service-announcement": (("title", "body"), {"name"}),
    "account-suspension": (("reason",), {"appeal_url", "name"}),
}
URL_VARIABLES = [("password-reset", "reset_url"), ("email-verification", "verify_url"),
                 ("billing-notification", "billing_url"), ("account-suspension", "appeal_url"),
                 ("magic-link", "login_url"), ("security-alert", "action_url"),
                 ("email-change-notice", "undo_url")]


# --------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Spooled:
    """One file of spool/new: its name, its JSON header and the RFC 5322 message."""

    name: str
    header: dict
    data: bytes

    @property
    def message(self) -> EmailMessage:
        """The message parsed with the modern email policy."""
        return parse(self.data)


def parse(data: bytes) -> EmailMessage:
    """Parse RFC 5322 bytes into an EmailMessage (decoded headers)."""
    return BytesParser(policy=DEFAULT_POLICY).parsebytes(data)  # type: ignore[return-value]


def body(message: EmailMessage, subtype: str) -> str:
    """The decoded text/SUBTYPE body of a message, with LF line ends."""
    part = message.get_body((subtype,))
    assert part is not None
    return part.get_content().replace("\r\n", "\n")


def spooled(spool: Path) -> list[Spooled]:
    """Every message waiting in spool/new, in name order ([] when there is no spool)."""
    folder = spool / "new"
    if not folder.is_dir():
        return []
    entries = []
    for path in sorted(folder.iterdir()):
        head, newline, data = path.read_bytes().partition(b"\n")
        assert newline
        tag, mac, header = head.split(b" ", 2)  # sysmail-spool/2 MAC JSON
        assert tag == b"sysmail-spool/2" and len(mac) == 64
        entries.append(Spooled(path.name, json.loads(header), data))
    return entries


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    """A valid outbox-mode environment for the domain example.com, spool under tmp_path."""
    return {"SYSTEM_DOMAIN": "example.com", "SYSTEM_FROM_NAME": "Example Cloud",
            "SYSMAIL_SPOOL": str(tmp_path / "spool"),
            "SYSMAIL_OUTBOX": str(tmp_path / "outbox"), **extra}


def mailer_for(tmp_path: Path, **extra: str) -> sysmail.Mailer:
    """A Mailer on env_for(tmp_path) whose clock is fixed at NOW."""
    return sysmail.Mailer(sysmail.Config.from_env(env_for(tmp_path, **extra)), clock=lambda: NOW)


def only_spooled(tmp_path: Path) -> Spooled:
    """The single message in tmp_path/spool/new."""
    [entry] = spooled(tmp_path / "spool")
    return entry


def problems_of(env: dict[str, str]) -> list[str]:
    """The problems Config.from_env reports for env (fails if it accepts it)."""
    with pytest.raises(sysmail.ConfigError) as caught:
        sysmail.Config.from_env(env)
    assert str(caught.value) == "invalid configuration: " + "; ".join(caught.value.problems)
    return caught.value.problems


def pem_lines(pem: str) -> list[str]:
    """The base64 body lines of a PEM: each alone is key material."""
    return [line for line in pem.splitlines() if line and not line.startswith("-----")]


def assert_no_secret(text: str, secret_values: list[str]) -> None:
    """Fail if any secret value appears in text."""
    leaked = [value[:12] + "..." for value in secret_values if value in text]
    assert not leaked, f"secret material leaked: {leaked}"


def bad_env(small_rsa_key: RsaKey) -> dict[str, str]:
    """Six invalid variables at once, some of them carrying secrets."""
    return {
        "SMTP_URL": f"http://mailer:{RELAY_PASSWORD}@mail.example.com",
        "SYSTEM_DKIM_PRIVATE_KEY": small_rsa_key.pem,
        "SYSTEM_DKIM_ED25519_PRIVATE_KEY": BAD_ED25519_SEED,
        "DASHBOARD_URL": "javascript:alert(1)",
        "SMTP_TLS_VERIFY": "maybe",
        "SYSMAIL_LOG_LEVEL": "loud",
    }


def render(template: str, /, **variables: str) -> sysmail.Rendered:
    """Render a built-in template with the test brand."""
    return sysmail.render(sysmail.TEMPLATES[template], variables, BRAND)


def quoted_strings(line: str) -> str:
    """The concatenated "..." strings of a zone-file TXT line."""
    return "".join(re.findall(r'"([^"]*)"', line))


# --------------------------------------------------------------------------- Config.from_env


def test_empty_env_defaults_to_outbox_mode_localhost_and_local_spool() -> None:
    config = sysmail.Config.from_env({})
    assert config.smtp is None
    assert isinstance(sysmail.transport_from_config(config), sysmail.OutboxTransport)
    assert config.domain == "localhost"
    assert config.from_addr == "noreply@localhost"
    assert config.spool_dir == Path("./spool")
    assert config.outbox_dir == Path("./outbox")
    assert config.dkim_selector == "default"
    assert (config.dkim_key, config.ed25519_key, config.signing) == (None, None, False)


def test_system_from_defaults_to_noreply_at_system_domain() -> None:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": "Example.COM"})
    assert config.domain == "example.com"
    assert config.from_addr == "noreply@example.com"
    assert config.from_name == "example.com"


def test_system_from_default_uses_idna_form_of_an_international_domain() -> None:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": "bücher.example"})
    assert config.from_addr == "noreply@xn--bcher-kva.example"


def test_explicit_system_from_and_from_name_are_kept() -> None:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": "example.com",
                                      "SYSTEM_FROM": "alerts@mail.example.com",
                                      "SYSTEM_FROM_NAME": "Example Alerts"})
    assert (config.from_addr, config.from_name) == ("alerts@mail.example.com", "Example Alerts")


def test_every_invalid_value_is_reported_in_one_config_error(small_rsa_key: RsaKey) -> None:
    env = bad_env(small_rsa_key)
    problems = problems_of(env)
    assert sorted(problem.split()[0] for problem in problems) == sorted(env)


@pytest.mark.parametrize(("variable", "value"), [
    ("SMTP_URL", "pop3://mail.example.com"),
    ("SMTP_URL", "smtp://mail.example.com:notaport"),
    ("SYSTEM_DKIM_PRIVATE_KEY", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----"),
    ("SYSTEM_DKIM_ED25519_PRIVATE_KEY", "not base64 at all!"),
    ("SYSTEM_DKIM_ED25519_PRIVATE_KEY", base64.b64encode(b"x" * 16).decode()),
    ("DASHBOARD_URL", "dashboard.example.com"),
    ("DASHBOARD_URL", "ftp://dashboard.example.com"),
    ("SMTP_TLS_VERIFY", "maybe"),
    ("SYSMAIL_ALLOW_UNSIGNED", "yes please"),
    ("SYSMAIL_LOG_LEVEL", "verbose"),
    ("SYSTEM_FROM", "not-an-address"),
    ("SYSTEM_FROM_NAME", "Evil\r\nBcc: victim@example.org"),
    ("SYSTEM_DKIM_SELECTOR", "bad selector!"),
])
def test_one_invalid_value_is_one_problem_naming_its_variable(variable: str, value: str) -> None:
    problems = problems_of({"SYSTEM_DOMAIN": "example.com", variable: value})
    assert len(problems) == 1
    assert problems[0].startswith(f"{variable} ")


def test_1024_bit_rsa_key_is_rejected_naming_its_size(small_rsa_key: RsaKey) -> None:
    [problem] = problems_of({"SYSTEM_DKIM_PRIVATE_KEY": small_rsa_key.pem})
    assert problem.startswith("SYSTEM_DKIM_PRIVATE_KEY ")
    assert "1024" in problem
    assert "2048" in problem


def test_real_smtp_url_needs_system_domain_and_a_dkim_key() -> None:
    problems = problems_of({"SMTP_URL": f"smtp://mailer:{RELAY_PASSWORD}@mail.example.com"})
    assert len(problems) == 2
    key_problem, domain_problem = sorted(problems)
    assert key_problem.startswith("SYSTEM_DKIM_PRIVATE_KEY ")
    assert "SYSMAIL_ALLOW_UNSIGNED" in key_problem
    assert domain_problem.startswith("SYSTEM_DOMAIN ")


def test_allow_unsigned_lets_a_real_smtp_url_start_without_a_key() -> None:
    config = sysmail.Config.from_env({
        "SMTP_URL": f"smtp://mailer:{RELAY_PASSWORD}@mail.example.com",
        "SYSTEM_DOMAIN": "example.com", "SYSMAIL_ALLOW_UNSIGNED": "1"})
    assert config.smtp == sysmail.SmtpUrl("smtp", "mail.example.com", 587, "mailer",
                                          RELAY_PASSWORD)
    assert config.signing is False


def test_real_smtp_url_with_an_rsa_key_needs_no_allow_unsigned(rsa_key: RsaKey) -> None:
    config = sysmail.Config.from_env({"SMTP_URL": "smtps://mail.example.com",
                                      "SYSTEM_DOMAIN": "example.com",
                                      "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem})
    assert (config.smtp.scheme, config.smtp.port) == ("smtps", 465)
    assert config.signing is True


def test_smtp_plain_with_a_password_to_a_remote_host_is_rejected() -> None:
    [problem] = problems_of({"SMTP_URL": f"smtp+plain://mailer:{RELAY_PASSWORD}@mail.example.com",
                             "SYSTEM_DOMAIN": "example.com", "SYSMAIL_ALLOW_UNSIGNED": "1"})
    assert problem.startswith("SMTP_URL ")
    assert RELAY_PASSWORD not in problem


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]"])
def test_smtp_plain_with_a_password_to_loopback_is_accepted(host: str) -> None:
    config = sysmail.Config.from_env({"SMTP_URL": f"smtp+plain://mailer:{RELAY_PASSWORD}@{host}",
                                      "SYSTEM_DOMAIN": "example.com",
                                      "SYSMAIL_ALLOW_UNSIGNED": "1"})
    assert config.smtp.port == 25
    assert config.smtp.password == RELAY_PASSWORD


def test_config_error_never_contains_the_key_or_the_password(small_rsa_key: RsaKey) -> None:
    env = bad_env(small_rsa_key)
    with pytest.raises(sysmail.ConfigError) as caught:
        sysmail.Config.from_env(env)
    text = str(caught.value) + repr(caught.value) + "\n".join(caught.value.problems)
    assert_no_secret(text, [RELAY_PASSWORD, BAD_ED25519_SEED, *pem_lines(small_rsa_key.pem)])


def test_repr_and_str_of_config_hide_keys_and_smtp_password(
    rsa_key: RsaKey, ed25519_key: Ed25519Key
) -> None:
    config = sysmail.Config.from_env({
        "SMTP_URL": f"smtps://mailer:{RELAY_PASSWORD}@mail.example.com",
        "SYSTEM_DOMAIN": "example.com", "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem,
        "SYSTEM_DKIM_ED25519_PRIVATE_KEY": ed25519_key.pem})
    assert config.ed25519_key == ed25519_key.seed_b64.encode()
    assert str(config.smtp) == "smtps://mailer:***@mail.example.com:465"
    hidden = [RELAY_PASSWORD, ed25519_key.seed_b64, *pem_lines(rsa_key.pem),
              *pem_lines(ed25519_key.pem)]
    for text in (repr(config), str(config), repr(config.smtp), str(config.smtp),
                 repr(sysmail.DkimSigner.from_config(config))):
        assert_no_secret(text, hidden)


@pytest.mark.parametrize("form", ["pkcs8", "pkcs1", "pkcs8-escaped-one-line",
                                  "pkcs1-escaped-one-line"])
def test_rsa_pem_is_accepted_as_pkcs8_pkcs1_and_one_line_escaped(rsa_key: RsaKey,
                                                                  form: str) -> None:
    pem = rsa_key.pem if form.startswith("pkcs8") else rsa_key.pem_pkcs1
    value = pem.strip().replace("\n", "\\n") if form.endswith("one-line") else pem
    config = sysmail.Config.from_env({"SYSTEM_DKIM_PRIVATE_KEY": value})
    assert config.dkim_key == pem.strip().encode() + b"\n"
    assert config.signing is True


@pytest.mark.parametrize("form", ["seed", "pem", "pem-escaped-one-line"])
def test_ed25519_key_is_accepted_as_seed_or_pem(ed25519_key: Ed25519Key, form: str) -> None:
    value = {"seed": ed25519_key.seed_b64, "pem": ed25519_key.pem,
             "pem-escaped-one-line": ed25519_key.pem.strip().replace("\n", "\\n")}[form]
    config = sysmail.Config.from_env({"SYSTEM_DKIM_ED25519_PRIVATE_KEY": value})
    assert config.ed25519_key == ed25519_key.seed_b64.encode()


# --------------------------------------------------------------------------- CLI: config errors


def test_cli_bad_config_exits_78_listing_every_problem_without_secrets(
    tmp_path: Path, small_rsa_key: RsaKey
) -> None:
    env = bad_env(small_rsa_key)
    result = run_cli(["check"], env, cwd=tmp_path)  # the queue commands read the spool's only
    assert result.returncode == 78
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert lines[0] == "sysmail: invalid configuration:"
    assert sorted(line.split()[1] for line in lines[1:]) == sorted(env)
    assert "Traceback" not in result.stderr
    assert_no_secret(result.stderr, [RELAY_PASSWORD, BAD_ED25519_SEED,
                                     *pem_lines(small_rsa_key.pem)])


def test_cli_send_with_bad_config_queues_nothing(tmp_path: Path) -> None:
    env = env_for(tmp_path, SYSMAIL_LOG_LEVEL="loud")
    result = run_cli(["send", "--to", "ada@example.com", "--template", "two-factor-code",
                      "--var", "code=123456"], env, cwd=tmp_path)
    assert result.returncode == 78
    assert "SYSMAIL_LOG_LEVEL" in result.stderr
    assert not (tmp_path / "spool").exists()


@pytest.mark.parametrize("argv", [
    pytest.param(["bogus"], id="unknown-command"),
    pytest.param([], id="no-command"),
    pytest.param(["send", "--template", "two-factor-code", "--var", "code=1"], id="send-no-to"),
    pytest.param(["send", "--to", "ada@example.com"], id="send-no-template-no-subject"),
    pytest.param(["send", "--to", "ada@example.com", "--subject", "Hi"], id="send-no-text"),
    pytest.param(["send", "--to", "ada@example.com", "--template", "two-factor-code",
                  "--var", "code"], id="var-without-equals"),
    pytest.param(["retry"], id="retry-no-ids-no-all"),
    pytest.param(["retry", "--all", "abc123"], id="retry-ids-and-all"),
])
def test_usage_error_exits_64_with_one_line_and_no_traceback(tmp_path: Path,
                                                              argv: list[str]) -> None:
    result = run_cli(argv, env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 64
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert line.startswith("sysmail: ")
    assert "Traceback" not in result.stderr
    assert spooled(tmp_path / "spool") == []


# --------------------------------------------------------------------------- CLI: --env-file


def test_env_file_in_systemd_syntax_configures_sysmail(tmp_path: Path, rsa_key: RsaKey) -> None:
    env_file = tmp_path / "sysmail.env"
    env_file.write_text(
        "# sysmail settings\n"
        "; a semicolon comment\n"
        "\n"
        "   # an indented comment\n"
        "SYSTEM_DOMAIN=example.com\n"
        'SYSTEM_FROM_NAME="Example Cloud"\n'
        "SYSTEM_DKIM_SELECTOR='mail2026'\n"
        f'SYSTEM_DKIM_PRIVATE_KEY="{rsa_key.pem.strip()}"\n'
        f"SYSMAIL_SPOOL={tmp_path / 'file-spool'}\n",
        encoding="utf-8")
    result = run_cli(["--env-file", str(env_file), "check"], {}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == [
        f"configuration ok: From Example Cloud <noreply@example.com>, spool {tmp_path}/file-spool",
        "DKIM rsa-sha256: selector mail2026, 2048 bits",
    ]


@pytest.mark.parametrize("layout", ["multi-line", "escaped-one-line"])
def test_env_file_pem_key_is_read_exactly(tmp_path: Path, rsa_key: RsaKey, layout: str) -> None:
    pem = rsa_key.pem.strip()
    value = pem if layout == "multi-line" else pem.replace("\n", "\\n")
    env_file = tmp_path / "sysmail.env"
    env_file.write_text(f'SYSTEM_DOMAIN=example.com\nSYSTEM_DKIM_PRIVATE_KEY="{value}"\n'
                        "SYSTEM_DKIM_SELECTOR=s1\n", encoding="utf-8")
    result = run_cli(["--env-file", str(env_file), "dns"], {}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [record] = [line for line in result.stdout.splitlines()
                if line.startswith("s1._domainkey.example.com. IN TXT")]
    assert quoted_strings(record) == rsa_key.dns_record.decode()


def test_process_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / "sysmail.env"
    env_file.write_text('SYSTEM_DOMAIN=file.example\nSYSTEM_FROM_NAME="From File"\n',
                        encoding="utf-8")
    result = run_cli(["--env-file", str(env_file), "check"],
                     {"SYSTEM_FROM_NAME": "From Env"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration ok: From From Env <noreply@file.example>,")


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_env_file_exits_78_naming_it(tmp_path: Path, kind: str) -> None:
    path = {"missing": tmp_path / "missing.env", "directory": tmp_path,
            "not-utf8": tmp_path / "latin1.env"}[kind]
    if kind == "not-utf8":
        path.write_bytes(b"SYSTEM_FROM_NAME=Caf\xe9\n")
    result = run_cli(["--env-file", str(path), "status"], {}, cwd=tmp_path)
    assert result.returncode == 78
    assert result.stdout == ""
    assert f"--env-file {path} cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- parse_env_file


def test_parse_env_file_skips_blank_lines_and_hash_and_semicolon_comments() -> None:
    text = "# comment\n; comment\n\n   # indented\n\t; indented\nA=1\n  B = two words  \n"
    assert sysmail.parse_env_file(text) == {"A": "1", "B": "two words"}


def test_parse_env_file_unquotes_single_and_double_quoted_values() -> None:
    text = ("SINGLE='a \"b\" \\\\ $c'\n"
            'DOUBLE="say \\"hi\\" \\\\ \\$HOME \\`x\\`"\n'
            "EMPTY=\"\"\n"
            "export EXPORTED=yes\n")
    assert sysmail.parse_env_file(text) == {
        "SINGLE": 'a "b" \\\\ $c',
        "DOUBLE": 'say "hi" \\ $HOME `x`',
        "EMPTY": "",
        "EXPORTED": "yes",
    }


def test_parse_env_file_reads_a_multi_line_double_quoted_pem(rsa_key: RsaKey) -> None:
    pem = rsa_key.pem.strip()
    text = f'KEY="{pem}"\nAFTER=1\n'
    assert sysmail.parse_env_file(text) == {"KEY": pem, "AFTER": "1"}


def test_parse_env_file_keeps_comment_like_lines_inside_quotes() -> None:
    text = 'A="one\n# two\n; three"\nB=4\n'
    assert sysmail.parse_env_file(text) == {"A": "one\n# two\n; three", "B": "4"}


def test_parse_env_file_later_assignment_wins() -> None:
    assert sysmail.parse_env_file("A=1\nA=2\n") == {"A": "2"}


def test_parse_env_file_joins_backslash_continued_lines_without_the_newline() -> None:
    text = "A=one \\\ntwo\nLEVEL=war\\\nning\nB=x\n"
    assert sysmail.parse_env_file(text) == {"A": "one two", "LEVEL": "warning", "B": "x"}


# --------------------------------------------------------------------------- templates


def test_the_nine_system_templates_exist() -> None:
    assert set(sysmail.TEMPLATES) == set(SPEC_VARIABLES)


@pytest.mark.parametrize("name", sorted(SPEC_VARIABLES))
def test_template_takes_the_variables_of_the_spec(name: str) -> None:
    template = sysmail.TEMPLATES[name]
    required, optional = SPEC_VARIABLES[name]
    assert template.required == required
    assert set(template.variables) == set(required) | optional


@pytest.mark.parametrize("name", sorted(SPEC_VARIABLES))
def test_template_renders_its_samples_into_subject_text_and_html(name: str) -> None:
    template = sysmail.TEMPLATES[name]
    rendered = sysmail.render(template, template.samples, BRAND)
    for part in (rendered.subject, rendered.text, rendered.html):
        assert part.strip()
        assert "${" not in part
    assert "\n" not in rendered.subject
    assert rendered.html.startswith("<!DOCTYPE html>")
    assert "<img" not in rendered.html
    for variable, value in template.samples.items():
        shown = sysmail.mask_address(value) if variable in template.masked else value
        if variable != "title":  # the announcement's title is its subject
            assert shown in rendered.text, variable
        assert shown in rendered.html, variable


@pytest.mark.parametrize(("name", "variable"),
                         [(name, var) for name, (req, _) in SPEC_VARIABLES.items() for var in req])
def test_missing_required_variable_is_a_message_error_naming_it(name: str, variable: str) -> None:
    template = sysmail.TEMPLATES[name]
    variables = {k: v for k, v in template.samples.items() if k != variable}
    with pytest.raises(sysmail.MessageError, match=f"'{variable}'"):
        sysmail.render(template, variables, BRAND)


def test_blank_required_variable_counts_as_missing() -> None:
    with pytest.raises(sysmail.MessageError, match="'code'"):
        render("two-factor-code", code="   ")


def test_unknown_variable_is_a_message_error_naming_it() -> None:
    with pytest.raises(sysmail.MessageError, match="'nmae'"):
        render("password-reset", reset_url="https://example.com/r", nmae="Ada")


def test_values_are_html_escaped_in_html_and_raw_in_text() -> None:
    rendered = render("security-alert", event="<script>alert('x')</script> & more",
                      name='"Ada"')
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; more" in rendered.html
    assert "<script>" not in rendered.html
    assert "Hi &quot;Ada&quot;," in rendered.html
    assert "<script>alert('x')</script> & more" in rendered.text
    assert 'Hi "Ada",' in rendered.text


def test_url_value_cannot_break_out_of_the_html_attribute() -> None:
    rendered = render("password-reset", reset_url='https://example.com/r?t="><script>')
    assert '"><script>' not in rendered.html
    assert 'href="https://example.com/r?t=&quot;&gt;&lt;script&gt;"' in rendered.html


def test_brand_is_html_escaped_too() -> None:
    rendered = sysmail.render(sysmail.TEMPLATES["two-factor-code"], {"code": "1"},
                              {"brand": "A&B <Co>", "domain": "example.com"})
    assert "A&amp;B &lt;Co&gt;" in rendered.html
    assert "<Co>" not in rendered.html
    assert rendered.subject == "Your A&B <Co> sign-in code: 1"


def test_security_alert_without_ip_and_time_drops_those_lines() -> None:
    rendered = render("security-alert", event="a new sign-in")
    for part in (rendered.text, rendered.html):
        assert "From address" not in part
        assert "When:" not in part
        assert "a new sign-in" in part
    assert "\n\n\n" not in rendered.text


def test_security_alert_with_ip_keeps_the_ip_address_line() -> None:
    rendered = render("security-alert", event="a new sign-in", ip="203.0.113.7")
    assert "IP address: 203.0.113.7\n" in rendered.text
    assert "When:" not in rendered.text


def test_billing_without_url_and_amount_drops_button_and_lines() -> None:
    rendered = render("billing-notification", summary="Your invoice is ready")
    assert "Billing details" not in rendered.text
    assert "Amount" not in rendered.text
    assert "View billing" not in rendered.html
    assert "href=" not in rendered.html


def test_suspension_without_appeal_url_drops_the_appeal_line() -> None:
    rendered = render("account-suspension", reason="Unpaid invoices")
    assert "appeal" not in rendered.text.lower()
    assert "Appeal this decision" not in rendered.html


@pytest.mark.parametrize(("name", "variables", "minutes"), [
    ("password-reset", {"reset_url": "https://example.com/r"}, 60),
    ("two-factor-code", {"code": "482913"}, 10),
    ("two-factor-code", {"code": "482913", "expires_minutes": "5"}, 5),
])
def test_expires_minutes_defaults_to_60_for_resets_and_10_for_codes(
    name: str, variables: dict[str, str], minutes: int
) -> None:
    rendered = render(name, **variables)
    assert f"{minutes} minutes" in rendered.text
    assert f"{minutes} minutes" in rendered.html


def test_name_defaults_to_there() -> None:
    assert render("email-verification", verify_url="https://example.com/v").text.startswith(
        "Hi there,\n")


@pytest.mark.parametrize("minutes", ["0", "-5", "ten", "1.5"])
def test_expires_minutes_must_be_a_positive_whole_number(minutes: str) -> None:
    with pytest.raises(sysmail.MessageError, match="'expires_minutes'"):
        render("two-factor-code", code="1", expires_minutes=minutes)


@pytest.mark.parametrize(("name", "variable"), URL_VARIABLES)
@pytest.mark.parametrize("url", ["javascript:alert(1)", "data:text/html,hi",
                                 "ftp://example.com/x", "example.com/reset",
                                 "https://example.com/a b"])
def test_url_variables_must_be_http_or_https(name: str, variable: str, url: str) -> None:
    template = sysmail.TEMPLATES[name]
    with pytest.raises(sysmail.MessageError, match=f"'{variable}'"):
        sysmail.render(template, {**template.samples, variable: url}, BRAND)


@pytest.mark.parametrize(("name", "variable"), URL_VARIABLES)
def test_http_url_variables_are_accepted(name: str, variable: str) -> None:
    template = sysmail.TEMPLATES[name]
    rendered = sysmail.render(template, {**template.samples, variable: "http://x.example/a"},
                              BRAND)
    assert 'href="http://x.example/a"' in rendered.html


def test_variable_with_a_line_break_cannot_reach_the_subject() -> None:
    with pytest.raises(sysmail.MessageError, match="subject"):
        render("two-factor-code", code="123\r\nBcc: victim@example.org")


def test_templates_folder_overrides_one_part_and_keeps_the_others(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "password-reset.subject").write_text("Custom ${brand} reset\n", encoding="utf-8")
    mailer = mailer_for(tmp_path, SYSMAIL_TEMPLATES=str(folder))
    mailer.enqueue("password-reset", to="ada@example.com", reset_url="https://example.com/r")
    mailer.enqueue("two-factor-code", to="ada@example.com", code="482913")
    reset, code = (entry.message for entry in sorted(
        spooled(tmp_path / "spool"), key=lambda entry: entry.header["template"]))
    assert reset["Subject"] == "Custom Example Cloud reset"
    assert "Someone asked to reset the password" in body(reset, "plain")
    assert "Reset password</a>" in body(reset, "html")
    assert code["Subject"] == "Your Example Cloud sign-in code: 482913"


def test_templates_folder_overrides_the_html_part(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "two-factor-code.html").write_text("<p>Code: <b>${code}</b></p>\n",
                                                  encoding="utf-8")
    (folder / "magic-link.html").write_text("<!DOCTYPE html>\n<p>${login_url}</p>\n",
                                             encoding="utf-8")
    templates = sysmail.load_templates(folder)
    rendered = sysmail.render(templates["two-factor-code"], {"code": "<1>"}, BRAND)
    # a fragment goes into the shared layout; a whole document is sent as it is
    assert rendered.html.startswith("<!DOCTYPE html>\n<html lang=\"en\"")
    assert "\n<p>Code: <b>&lt;1&gt;</b></p>\n" in rendered.html
    assert rendered.text == sysmail.render(sysmail.TEMPLATES["two-factor-code"],
                                           {"code": "<1>"}, BRAND).text
    whole = sysmail.render(templates["magic-link"], {"login_url": "https://e.example/l"}, BRAND)
    assert whole.html == "<!DOCTYPE html>\n<p>https://e.example/l</p>\n"


def test_missing_templates_folder_is_a_config_error(tmp_path: Path) -> None:
    [problem] = problems_of({"SYSMAIL_TEMPLATES": str(tmp_path / "nowhere")})
    assert problem.startswith("SYSMAIL_TEMPLATES ")


# --------------------------------------------------------------------------- CLI: templates


def test_cli_send_missing_required_variable_exits_65_naming_it(tmp_path: Path) -> None:
    result = run_cli(["send", "--to", "ada@example.com", "--template", "password-reset",
                      "--var", "name=Ada"], env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 65
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "'reset_url'" in line
    assert spooled(tmp_path / "spool") == []


def test_cli_send_unknown_variable_exits_65_naming_it(tmp_path: Path) -> None:
    result = run_cli(["send", "--to", "ada@example.com", "--template", "two-factor-code",
                      "--var", "code=1", "--var", "expires_minuts=5"],
                     env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 65
    assert "'expires_minuts'" in result.stderr
    assert "Traceback" not in result.stderr
    assert spooled(tmp_path / "spool") == []


def test_cli_send_template_prints_the_message_id_it_queued(tmp_path: Path) -> None:
    result = run_cli(["send", "--to", "ada@example.com", "--template", "two-factor-code",
                      "--var", "code=482913"], env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    entry = only_spooled(tmp_path)
    assert result.stdout == entry.header["message_id"] + "\n"
    assert entry.message["Message-ID"] == entry.header["message_id"]
    assert entry.message["Subject"] == "Your Example Cloud sign-in code: 482913"


def test_cli_send_unknown_template_exits_65(tmp_path: Path) -> None:
    result = run_cli(["send", "--to", "ada@example.com", "--template", "pasword-reset"],
                     env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 65


def test_cli_preview_prints_a_full_message_with_sample_values(tmp_path: Path) -> None:
    result = run_cli(["preview", "password-reset"], env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    message = parse(result.stdout.replace("\n", "\r\n").encode())
    assert message["Subject"] == "Reset your Example Cloud password"
    assert message["From"] == "Example Cloud <noreply@example.com>"
    assert message.get_content_type() == "multipart/alternative"
    text = body(message, "plain")
    assert sysmail.TEMPLATES["password-reset"].samples["reset_url"] in text
    assert text.startswith("Hi Ada,\n")
    assert "within 60 minutes" in text
    assert "${" not in result.stdout


def test_cli_preview_var_overrides_a_sample_and_part_html_prints_html(tmp_path: Path) -> None:
    result = run_cli(["preview", "two-factor-code", "--var", "code=<777>", "--part", "html"],
                     env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("<!DOCTYPE html>\n")
    assert result.stdout.rstrip().endswith("</html>")
    assert "&lt;777&gt;" in result.stdout
    assert "482913" not in result.stdout
    assert "Subject:" not in result.stdout


def test_cli_preview_uses_the_templates_folder(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "security-alert.txt").write_text("ALERT ${event} for ${name}\n", encoding="utf-8")
    result = run_cli(["preview", "security-alert", "--part", "text"],
                     env_for(tmp_path, SYSMAIL_TEMPLATES=str(folder)), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("ALERT a new sign-in for Ada\n\n-- \nThis is an automated message "
                             "from Example Cloud (example.com). Replies to this address are not "
                             "read.\n\n")


def test_cli_preview_missing_required_variable_exits_65(tmp_path: Path) -> None:
    result = run_cli(["preview", "service-announcement", "--var", "title="],
                     env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 65
    assert "'title'" in result.stderr
    assert result.stdout == ""


# --------------------------------------------------------------------------- messages


def test_enqueued_template_message_has_the_rfc5322_headers(tmp_path: Path) -> None:
    mailer = mailer_for(tmp_path)
    message_id = mailer.enqueue("password-reset", to="ada@example.com",
                                reset_url="https://example.com/r?t=1", name="Ada")
    entry = only_spooled(tmp_path)
    message = entry.message
    assert message["From"] == "Example Cloud <noreply@example.com>"
    assert message["From"].addresses[0].display_name == "Example Cloud"
    assert b'\r\nTo: "Ada" <ada@example.com>\r\n' in entry.data
    assert message["To"].addresses[0].display_name == "Ada"
    assert message["Subject"] == "Reset your Example Cloud password"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["Message-ID"] == message_id
    assert message_id.startswith("<") and message_id.endswith("@example.com>")
    assert message["MIME-Version"] == "1.0"
    assert message["Auto-Submitted"] == "auto-generated"
    assert "Reply-To" not in message


def test_enqueued_message_is_multipart_alternative_text_then_html(tmp_path: Path) -> None:
    mailer_for(tmp_path).enqueue("two-factor-code", to="ada@example.com", code="482913")
    message = only_spooled(tmp_path).message
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert "\n\n    482913\n\n" in body(message, "plain")
    assert ">482913</p>" in html.get_content()
    assert text["MIME-Version"] is None
    assert html["MIME-Version"] is None


def test_spool_header_records_envelope_template_and_lifetime(tmp_path: Path) -> None:
    message_id = mailer_for(tmp_path).enqueue("password-reset", to="ada@example.com",
                                              reset_url="https://example.com/r")
    assert only_spooled(tmp_path).header == {
        "message_id": message_id, "from": "noreply@example.com", "to": ["ada@example.com"],
        "template": "password-reset", "queued_at": NOW, "expires_at": NOW + 3600}


@pytest.mark.parametrize(("variables", "ttl"), [({}, 600), ({"expires_minutes": "15"}, 900)])
def test_two_factor_code_lifetime_follows_expires_minutes(tmp_path: Path,
                                                          variables: dict[str, str],
                                                          ttl: int) -> None:
    mailer_for(tmp_path).enqueue("two-factor-code", to="ada@example.com", code="1", **variables)
    header = only_spooled(tmp_path).header
    assert header["expires_at"] - header["queued_at"] == ttl


def test_non_ascii_subject_and_display_name_are_rfc2047_encoded(tmp_path: Path) -> None:
    mailer = mailer_for(tmp_path, SYSTEM_FROM_NAME="Bücher Café")
    mailer.enqueue_message("ada@example.com", "Grüße aus Köln ✓", "Hallo Ada, schöne Grüße.")
    data = only_spooled(tmp_path).data
    headers = data.partition(b"\r\n\r\n")[0]
    assert headers.isascii()
    assert b"=?utf-8?" in headers.lower()
    message = parse(data)
    assert message["Subject"] == "Grüße aus Köln ✓"
    assert message["From"].addresses[0].display_name == "Bücher Café"
    assert body(message, "plain") == "Hallo Ada, schöne Grüße.\n"


def test_message_is_7bit_clean_on_the_wire(tmp_path: Path) -> None:
    mailer_for(tmp_path).enqueue("service-announcement", to="ada@example.com",
                                 title="Wartung am 1. Dezember", body="Zugriff nur lesend — ok")
    assert only_spooled(tmp_path).data.isascii()


def test_reply_to_is_set_when_configured(tmp_path: Path) -> None:
    mailer_for(tmp_path, SYSTEM_REPLY_TO="support@example.com").enqueue(
        "two-factor-code", to="ada@example.com", code="1")
    assert only_spooled(tmp_path).message["Reply-To"] == "support@example.com"


def test_international_recipient_domain_is_converted_to_idna(tmp_path: Path) -> None:
    mailer_for(tmp_path).enqueue("two-factor-code", to="ada@bücher.example", code="1")
    entry = only_spooled(tmp_path)
    assert entry.header["to"] == ["ada@xn--bcher-kva.example"]
    assert entry.message["To"] == "ada@xn--bcher-kva.example"


def test_idna_conversion_follows_idna_2008_for_sharp_s() -> None:
    assert sysmail.validate_address("ada@straße.de") == "ada@xn--strae-oqa.de"


def test_several_recipients_share_one_to_header(tmp_path: Path) -> None:
    mailer_for(tmp_path).enqueue("service-announcement", to=["ada@example.com", "bob@example.org"],
                                 title="T", body="B")
    entry = only_spooled(tmp_path)
    assert entry.header["to"] == ["ada@example.com", "bob@example.org"]
    assert [a.addr_spec for a in entry.message["To"].addresses] == ["ada@example.com",
                                                                     "bob@example.org"]


@pytest.mark.parametrize("address", [
    "ada@example.com\r\nBcc: victim@example.org",
    "ada@example.com\nBcc: victim@example.org",
    "ada@example.com\rX: y",
    "ada\0@example.com",
    "not-an-address",
    "ada@",
    "ada@exa_mple.com",
    "a b@example.com",
])
def test_bad_recipient_is_a_message_error_and_nothing_is_spooled(tmp_path: Path,
                                                                 address: str) -> None:
    mailer = mailer_for(tmp_path)
    with pytest.raises(sysmail.MessageError):
        mailer.enqueue("two-factor-code", to=address, code="1")
    assert spooled(tmp_path / "spool") == []


@pytest.mark.parametrize("subject", ["Hi\r\nBcc: victim@example.org", "Hi\nX-Evil: 1",
                                     "Hi\rX-Evil: 1", "Hi\0there"])
def test_ad_hoc_subject_with_cr_lf_or_nul_is_rejected(tmp_path: Path, subject: str) -> None:
    mailer = mailer_for(tmp_path)
    with pytest.raises(sysmail.MessageError, match="subject"):
        mailer.enqueue_message("ada@example.com", subject, "text")
    assert spooled(tmp_path / "spool") == []


def test_ad_hoc_message_needs_a_subject_and_a_text(tmp_path: Path) -> None:
    mailer = mailer_for(tmp_path)
    with pytest.raises(sysmail.MessageError, match="subject and a text"):
        mailer.enqueue_message("ada@example.com", " ", "text")
    with pytest.raises(sysmail.MessageError, match="subject and a text"):
        mailer.enqueue_message("ada@example.com", "Subject", "")
    assert spooled(tmp_path / "spool") == []


def test_unknown_template_is_a_message_error(tmp_path: Path) -> None:
    with pytest.raises(sysmail.MessageError, match="'pasword-reset'"):
        mailer_for(tmp_path).enqueue("pasword-reset", to="ada@example.com")
    assert spooled(tmp_path / "spool") == []


@pytest.mark.parametrize("argv", [
    pytest.param(["--to", "ada@example.com\r\nBcc: victim@example.org", "--subject", "Hi",
                  "--text", "T"], id="crlf-in-address"),
    pytest.param(["--to", "ada@example.com", "--subject", "Hi\r\nBcc: victim@example.org",
                  "--text", "T"], id="crlf-in-subject"),
    pytest.param(["--to", "ada@example.com", "--subject", "Hi\nX: y", "--text", "T"],
                 id="lf-in-subject"),
    pytest.param(["--to", "ada@example.com", "--template", "two-factor-code",
                  "--var", "code=1\r\nBcc: victim@example.org"], id="crlf-in-subject-variable"),
])
def test_cli_header_injection_exits_65_and_spools_nothing(tmp_path: Path,
                                                          argv: list[str]) -> None:
    result = run_cli(["send", *argv], env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 65
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert "victim@example.org" not in result.stderr
    assert spooled(tmp_path / "spool") == []


def test_enqueue_returns_a_fresh_message_id_per_message(tmp_path: Path) -> None:
    mailer = mailer_for(tmp_path)
    ids = {mailer.enqueue("two-factor-code", to="ada@example.com", code="1") for _ in range(3)}
    assert len(ids) == 3
    assert {entry.message["Message-ID"] for entry in spooled(tmp_path / "spool")} == ids
    assert {entry.header["message_id"] for entry in spooled(tmp_path / "spool")} == ids


def test_message_id_uses_the_idna_system_domain(tmp_path: Path) -> None:
    message_id = mailer_for(tmp_path, SYSTEM_DOMAIN="bücher.example").enqueue(
        "two-factor-code", to="ada@example.com", code="1")
    assert message_id.endswith("@xn--bcher-kva.example>")


@pytest.mark.parametrize(("name", "variables", "priority"), [
    ("two-factor-code", {"code": "1"}, "0"),
    ("password-reset", {"reset_url": "https://example.com/r"}, "0"),
    ("email-verification", {"verify_url": "https://example.com/v"}, "0"),
    ("security-alert", {"event": "e"}, "0"),
    ("billing-notification", {"summary": "s"}, "1"),
    ("service-announcement", {"title": "t", "body": "b"}, "1"),
    ("account-suspension", {"reason": "r"}, "1"),
])
def test_priority_is_the_first_field_of_the_spool_name(
    tmp_path: Path, name: str, variables: dict[str, str], priority: str
) -> None:
    mailer_for(tmp_path).enqueue(name, to="ada@example.com", **variables)
    fields = only_spooled(tmp_path).name.split(".")
    assert fields[0] == priority
    assert fields[1:3] == [f"{int(NOW * 1000):014d}", "0"]


def claim_order(tmp_path: Path, now: float) -> list[str]:
    """Claim everything due at `now` from tmp_path/spool, one message at a time, as a worker
    in another process would; return the Message-IDs in the order they were claimed."""
    spool = sysmail.Spool(tmp_path / "spool", clock=lambda: now)
    message_ids = []
    while claims := spool.claim(1)[0]:
        message_ids += [spool.read(claim).message_id for claim in claims]
    return message_ids


def test_urgent_mail_is_claimed_before_bulk_mail_queued_earlier(tmp_path: Path) -> None:
    """README: urgent templates always go before bulk ones, whatever came first; each kind
    oldest first."""
    clock = FakeClock(NOW)
    mailer = sysmail.Mailer(sysmail.Config.from_env(env_for(tmp_path)), clock=clock)
    queued = {}
    for label, template, variables in [
            ("announcement 1", "service-announcement", {"title": "t1", "body": "b"}),
            ("announcement 2", "service-announcement", {"title": "t2", "body": "b"}),
            ("code", "two-factor-code", {"code": "111111"}),
            ("billing", "billing-notification", {"summary": "Invoice"}),
            ("reset", "password-reset", {"reset_url": "https://example.com/r"})]:
        queued[mailer.enqueue(template, to="ada@example.com", **variables)] = label
        clock.advance(1)
    assert [queued[m] for m in claim_order(tmp_path, clock())] == [
        "code", "reset", "announcement 1", "announcement 2", "billing"]


def test_ad_hoc_mail_is_bulk_unless_urgent(tmp_path: Path) -> None:
    """Ad-hoc mail is bulk by default: an urgent one queued later is claimed first."""
    clock = FakeClock(NOW)
    mailer = sysmail.Mailer(sysmail.Config.from_env(env_for(tmp_path)), clock=clock)
    queued = {}
    for subject, priority in [("bulk", None), ("urgent", sysmail.URGENT),
                              ("bulk again", sysmail.BULK)]:
        extra = {} if priority is None else {"priority": priority}
        queued[mailer.enqueue_message("ada@example.com", subject, "text", **extra)] = subject
        clock.advance(1)
    assert [queued[m] for m in claim_order(tmp_path, clock())] == ["urgent", "bulk", "bulk again"]


def test_cli_send_urgent_ad_hoc_mail_is_spooled_as_urgent(tmp_path: Path) -> None:
    result = run_cli(["send", "--to", "ada@example.com", "--subject", "Hi", "--text", "Body",
                      "--html", "<p>Body</p>", "--urgent"], env_for(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    entry = only_spooled(tmp_path)
    assert entry.name.startswith("0.")
    assert result.stdout == entry.header["message_id"] + "\n"
    assert entry.header["template"] == ""
    assert body(entry.message, "html") == "<p>Body</p>\n"


def test_build_message_directly_uses_the_given_id_and_time() -> None:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": "example.com"})
    data = sysmail.build_message(config, ["ada@example.com"],
                                 sysmail.Rendered("S", "T\n", "<p>H</p>\n"),
                                 "<fixed.1@example.com>", NOW)
    message = parse(data)
    assert message["Message-ID"] == "<fixed.1@example.com>"
    assert email.utils.parsedate_to_datetime(message["Date"]).timestamp() == NOW
    assert message["From"].addresses[0].display_name == "example.com"
    assert message["From"].addresses[0].addr_spec == "noreply@example.com"
    assert b"\r\n" in data
    assert b"\n" not in data.replace(b"\r\n", b"")


def test_ad_hoc_message_without_html_has_no_empty_html_part(tmp_path: Path) -> None:
    mailer_for(tmp_path).enqueue_message("ada@example.com", "Hi", "The text.")
    message = only_spooled(tmp_path).message
    html_parts = [p for p in message.walk() if p.get_content_type() == "text/html"]
    assert all(part.get_content().strip() for part in html_parts)


def test_service_announcement_text_part_carries_the_title() -> None:
    rendered = render("service-announcement", title="Maintenance window", body="Read-only.")
    assert "Maintenance window" in rendered.html
    assert "Maintenance window" in rendered.text


@pytest.mark.parametrize("char", ["\x0b", "\x0c", "\x1c", "\x1f", "\x7f", "\x85", "\u2028",
                                  "\u2029", "\x01"])
def test_subject_with_a_folding_line_break_is_refused(tmp_path: Path, char: str) -> None:
    """VT, FF, FS..US, NEL, U+2028/9 (which Python's header folding treats as line breaks)
    and other controls never reach a header: a folded line could start a forged field."""
    mailer = sysmail.Mailer(sysmail.Config.from_env({"SYSTEM_DOMAIN": "example.com",
                                                     "SYSMAIL_SPOOL": str(tmp_path / "spool")}))
    forged = f"Hello{char}Bcc: evil@example.net"
    with pytest.raises(sysmail.MessageError, match="control character"):
        mailer.enqueue_message("ada@example.com", forged, "text")
    with pytest.raises(sysmail.MessageError, match="control character"):
        mailer.enqueue("service-announcement", to="ada@example.com", title=forged, body="b")
    assert list((tmp_path / "spool" / "new").iterdir()) == []
    mailer.enqueue_message("ada@example.com", "Tabs\tare fine", "text")
