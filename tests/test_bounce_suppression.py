"""Issue 12: the bounce parser's reports reach the suppression list, only through a VERP tag
that names the recipient (or a refusal in sysmail's own SMTP session).

Every one of the 160 shared samples is run through the handler twice: once as if it came back
to an untagged (or forged) address, which must change nothing, and once to the address whose
tag names its first recipient, which must suppress exactly what its kind calls for. Then the
real ways in: `sysmail bounce` on stdin, POST /v1/bounces over HTTP, the mailto unsubscribe,
and a 550 at RCPT TO from the test SMTP server.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.parse
from pathlib import Path

import pytest
from conftest import FakeClock, SmtpServer, run_cli

import sysmail

SAMPLES = Path(__file__).resolve().parent / "data" / "bounces" / "samples"  # ../shared/bounces
KEY_TEXT = "q" * 40
ADA = "ada@example.org"


def app_for(tmp_path: Path, clock: FakeClock | None = None, **env: str) -> sysmail.App:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": "example.com", "SYSMAIL_QUEUE_KEY": KEY_TEXT,
                                      "SYSMAIL_SPOOL": str(tmp_path / "spool"),
                                      "SYSMAIL_BOUNCE_DOMAIN": "b.example", **env})
    return sysmail.build_app(config, clock=clock or FakeClock())


def samples() -> list[Path]:
    if not SAMPLES.is_dir():
        pytest.skip(f"the shared samples are not at {SAMPLES}")
    return sorted(SAMPLES.iterdir())


def test_every_sample_suppresses_only_through_a_tag_naming_its_recipient(tmp_path: Path) -> None:
    clock = FakeClock()
    app = app_for(tmp_path, clock)
    key, suppressions = app.config.queue_key, app.suppressions
    kinds: dict[str, int] = {}
    for path in samples():
        report = sysmail.parse_bounce(path.read_bytes())
        kinds[report.kind] = kinds.get(report.kind, 0) + 1
        for forged in ("bounces@b.example", f"bounces+{'a' * 24}@b.example"):
            app.bounces.handle(report, forged)
        assert suppressions.entries() == [], path.name
        if not report.recipients:
            continue
        rcpt = report.recipients[0]
        try:
            sysmail.validate_address(rcpt)
        except sysmail.MessageError:
            continue  # sysmail never sends to it (a quoted local part): no tag can name it
        app.bounces.handle(report, sysmail.verp_address(app.config.bounce_address, key,
                                                        "<m@example.com>", rcpt, clock.now))
        listed = {e.address for e in suppressions.entries()}
        expected = {rcpt.lower()} if report.kind in ("hard", "complaint") else set()
        assert listed == expected, (path.name, report.kind, listed)
        for entry in suppressions.entries():
            suppressions.unsuppress(entry.address)
    assert kinds.get("hard", 0) > 50 and kinds.get("complaint", 0) > 0
    assert kinds.get("auto-reply", 0) + kinds.get("none", 0) > 0


DSN = """\
From: MAILER-DAEMON@mx.example.org
To: {to}
Subject: Undelivered Mail Returned to Sender
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status; boundary="b"

--b
Content-Type: text/plain

The mail to {rcpt} could not be delivered.

--b
Content-Type: message/delivery-status

Reporting-MTA: dns; mx.example.org

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: 5.1.1
Diagnostic-Code: smtp; 550 5.1.1 no such user

--b--
"""


def env_for(tmp_path: Path) -> dict[str, str]:
    return {"SYSTEM_DOMAIN": "example.com", "SYSMAIL_QUEUE_KEY": KEY_TEXT,
            "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSMAIL_BOUNCE_DOMAIN": "b.example"}


def test_sysmail_bounce_on_stdin_suppresses_the_tagged_recipient(tmp_path: Path) -> None:
    app = app_for(tmp_path)
    tagged = sysmail.verp_address("bounces@b.example", app.config.queue_key, "<m@x>", ADA,
                                  time.time())
    forged = run_cli(["bounce", "--recipient", "bounces+" + "b" * 24 + "@b.example"],
                     env_for(tmp_path), input=DSN.format(to="x@b.example", rcpt=ADA))
    assert forged.returncode == 0, forged.stderr
    assert json.loads(run_cli(["suppressed", "--json"], env_for(tmp_path)).stdout) == []
    real = run_cli(["bounce", "--recipient", tagged], env_for(tmp_path),
                   input=DSN.format(to=tagged, rcpt=ADA))
    assert real.returncode == 0, real.stderr
    (entry,) = json.loads(run_cli(["suppressed", "--json"], env_for(tmp_path)).stdout)
    assert (entry["address"], entry["reason"], entry["source"]) == (ADA, "hard-bounce",
                                                                    "hard bounce 5.1.1")


def test_a_bounce_that_cannot_be_recorded_makes_the_mta_retry(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "suppressions.json").write_text("{garbled")
    tagged = sysmail.verp_address("bounces@b.example", app_for(tmp_path).config.queue_key,
                                  "<m@x>", ADA, time.time())
    result = run_cli(["bounce", "--recipient", tagged], env_for(tmp_path),
                     input=DSN.format(to=tagged, rcpt=ADA))
    assert result.returncode == 75 and "Traceback" not in result.stderr


def test_the_mailto_unsubscribe_reaches_the_list(tmp_path: Path) -> None:
    token = sysmail.unsubscribe_token(app_for(tmp_path).config.queue_key, ADA)
    mail = f"From: {ADA}\nTo: bounces@b.example\nSubject: unsubscribe {token}\n\nplease\n"
    assert run_cli(["bounce", "--recipient", "bounces@b.example"], env_for(tmp_path),
                   input=mail).returncode == 0
    (entry,) = json.loads(run_cli(["suppressed", "--json"], env_for(tmp_path)).stdout)
    assert (entry["address"], entry["scope"], entry["source"]) == (
        ADA, "service-announcement", "mailto link")
    forged = mail.replace(token, token[:-4] + "AAAA")
    other = tmp_path / "other"
    assert run_cli(["bounce"], {**env_for(tmp_path), "SYSMAIL_SPOOL": str(other)},
                   input=forged).returncode == 0
    assert json.loads(run_cli(["suppressed", "--json"],
                              {**env_for(tmp_path), "SYSMAIL_SPOOL": str(other)}).stdout) == []


def started_api(tmp_path: Path) -> tuple[sysmail.App, str]:
    """A started service taking POST /v1/bounces with its API key; the caller stops it."""
    api_key = "bounce-api-key-0123456789"
    app = app_for(tmp_path, SYSMAIL_API_KEY=api_key, SYSMAIL_LISTEN="127.0.0.1:0",
                  SYSMAIL_METRICS_LISTEN="off", SYSMAIL_DB=str(tmp_path / "db"))
    app.start()
    return app, api_key


def test_post_v1_bounces_suppresses_through_the_tag_only(tmp_path: Path) -> None:
    app, api_key = started_api(tmp_path)
    try:
        tagged = sysmail.verp_address("bounces@b.example", app.config.queue_key, "<m@x>", ADA,
                                      app.clock())
        for to, expected in ((f"bounces+{'c' * 24}@b.example", []), (tagged, [ADA])):
            parts = urllib.parse.urlsplit(app.url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
            connection.request("POST", "/v1/bounces?recipient=" + urllib.parse.quote(to),
                               DSN.format(to=to, rcpt=ADA).encode(),
                               {"Authorization": f"Bearer {api_key}",
                                "Content-Type": "message/rfc822"})
            response = connection.getresponse()
            assert response.status == 200, response.read()
            assert json.loads(response.read())["kind"] == "hard"
            connection.close()
            assert [e.address for e in app.suppressions.entries()] == expected
    finally:
        app.stop()


def test_a_550_at_rcpt_to_suppresses_its_recipient(tmp_path: Path,
                                                   smtp_server: SmtpServer) -> None:
    """A refusal in sysmail's own SMTP session needs no tag: nobody else could have said it."""
    smtp_server.sink.refuse_rcpt({ADA: "550 5.1.1 <ada@example.org>: user unknown"})
    mailer = sysmail.Mailer(sysmail.Config.from_env({
        "SYSTEM_DOMAIN": "example.com", "SYSMAIL_QUEUE_KEY": KEY_TEXT,
        "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SMTP_URL": smtp_server.url,
        "SYSMAIL_ALLOW_UNSIGNED": "1"}))
    mailer.enqueue("billing-notification", to=[ADA, "bob@example.net"], summary="S")
    counts = mailer.sender().run_once()
    assert counts.sent == 1 and counts.failed == 1
    (entry,) = mailer.app.suppressions.entries()
    assert (entry.address, entry.reason, entry.source) == (ADA, "hard-bounce",
                                                           "hard refusal at RCPT TO")
    assert mailer.enqueue("billing-notification", to=ADA, summary="S").suppressed == (ADA,)


def test_an_ses_notification_suppresses_through_its_mail_source(tmp_path: Path) -> None:
    """SES rewrites the envelope sender but reports the one it was given (mail.source): the
    tag there proves whom the notification is about; without it, nothing changes."""
    app, api_key = started_api(tmp_path)
    try:
        tagged = sysmail.verp_address("bounces@b.example", app.config.queue_key, "<m@x>", ADA,
                                      app.clock())
        for source, expected in ((None, []), ("bounces+" + "d" * 24 + "@b.example", []),
                                 (tagged, [ADA])):
            ses = {"notificationType": "Complaint",
                   "complaint": {"complainedRecipients": [{"emailAddress": ADA}]},
                   **({"mail": {"source": source}} if source else {})}
            sns = {"Type": "Notification", "Message": json.dumps(ses)}
            parts = urllib.parse.urlsplit(app.url)
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=15)
            connection.request("POST", "/v1/bounces", json.dumps(sns).encode(),
                               {"Authorization": f"Bearer {api_key}",
                                "Content-Type": "application/json"})
            response = connection.getresponse()
            assert response.status == 200, response.read()
            assert json.loads(response.read())["kind"] == "complaint"
            connection.close()
            assert [e.address for e in app.suppressions.entries()] == expected
        assert app.suppressions.entries()[0].reason == "complaint"
    finally:
        app.stop()
