"""The mail itself (issue 13): every template in every shipped language, rendered, sent through
the real test relay, DKIM-checked and scored by SpamAssassin 4's local rules; languages by
locale (enqueue, CLI, HTTP, the token store's user); the copy, the To: name, dark mode.

SpamAssassin runs once per message: the messages go in two mbox batches to two
`spamassassin -L -t --mbox` processes side by side (each process loads the rules once, which
is most of its cost), and every score is printed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import email.policy
import functools
import html
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import dkim
import pytest
from conftest import FakeClock, RsaKey, SmtpServer, dkim_dns, run_cli

import sysmail

DOMAIN = "example.com"
BRAND = "Example Cloud"
SPAMASSASSIN = shutil.which("spamassassin")
MAX_SCORE = 0.5
LANGUAGES = ("en", *sysmail.SHIPPED_LANGUAGES)
RECIPIENT, RECIPIENT_NAME = "ada@example.org", "Ada Lovelace"
GERMAN_VALUES = {  # what a German platform would fill in; the rest are the English samples
    "security-alert": {"event": "eine neue Anmeldung", "device": "Firefox unter Linux",
                       "location": "Lyon, Frankreich", "time": "27.11.2026, 14:03 UTC"},
    "email-change-notice": {"time": "27.11.2026, 14:03 UTC"},
    "billing-notification": {"summary": "Ihre Rechnung für November ist da",
                             "amount": "49,00 €", "due_date": "10.12.2026"},
    "service-announcement": {"title": "Geplante Wartung am 1. Dezember",
                             "body": "Das Dashboard ist von 02:00 bis 03:00 UTC schreibgeschützt."},
    "account-suspension": {"reason": "Unbezahlte Rechnungen"},
}
URL = re.compile(r"https?://[^\s<>\"']+")


def realistic(language: str, name: str) -> dict[str, str]:
    """The values a platform would send: the samples, in the language, with a full name."""
    values = {**sysmail.TEMPLATES[name].samples,
              **(GERMAN_VALUES.get(name, {}) if language == "de" else {})}
    if "name" in values:
        values["name"] = RECIPIENT_NAME
    return values


def parse(data: bytes) -> EmailMessage:
    """RFC 5322 bytes as an EmailMessage."""
    message = BytesParser(policy=email.policy.default).parsebytes(data)
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> tuple[str, str]:
    """The text and HTML bodies of a message."""
    text = message.get_body(preferencelist=("plain",))
    page = message.get_body(preferencelist=("html",))
    assert text is not None and page is not None
    return text.get_content().replace("\r\n", "\n"), page.get_content().replace("\r\n", "\n")


def make_env(tmp_path: Path, rsa_key: RsaKey, smtp: SmtpServer | None = None,
             **extra: str) -> dict[str, str]:
    """A configuration with the brand, a DKIM key, the dashboard and the relay (if any)."""
    env = {"SYSTEM_DOMAIN": DOMAIN, "SYSTEM_FROM_NAME": BRAND,
           "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem, "DASHBOARD_URL": "https://dashboard.example.com",
           "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSMAIL_OUTBOX": str(tmp_path / "outbox"),
           "SYSMAIL_DB": str(tmp_path / "sysmail.db"), **extra}
    if smtp is not None:
        env["SMTP_URL"] = smtp.url
    return env


# --------------------------------------------------------------------------- SpamAssassin


def spam_scores(messages: list[bytes], batches: int = 2) -> list[tuple[float, str]]:
    """(score, rules hit) of each message by `spamassassin -L -t`, the messages split over
    `batches` processes running at once, each reading its share as one mbox. Without Bayes
    (it would learn from these very messages and lower later scores) and with a home folder
    of its own (it keeps preferences there)."""
    shares = [messages[i::batches] for i in range(batches)]
    with tempfile.TemporaryDirectory() as home, concurrent.futures.ThreadPoolExecutor(
            batches) as pool:
        results = list(pool.map(functools.partial(_score_mbox, home=home), shares))
    return [results[i % batches][i // batches] for i in range(len(messages))]


def _score_mbox(messages: list[bytes], home: str) -> list[tuple[float, str]]:
    separator = b"From sysmail-test@example.com Tue Dec  1 00:00:00 2026\n"
    mbox = b"".join(separator + re.sub(rb"(?m)^(>*From )", rb">\1", m.replace(b"\r\n", b"\n"))
                    + b"\n" for m in messages)
    command = [SPAMASSASSIN, "-L", "-t", "--mbox", "-x", "--cf=use_bayes 0",
               "--cf=bayes_auto_learn 0"]
    result = subprocess.run(command, input=mbox, capture_output=True, timeout=300, check=False,
                            env={"HOME": home, "PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    reports = [r for r in result.stdout.split(separator) if r.strip()]
    assert len(reports) == len(messages), result.stderr.decode(errors="replace")[-2000:]
    return [_score(report.decode("utf-8", "replace")) for report in reports]


def _score(report: str) -> tuple[float, str]:
    status = re.search(r"^X-Spam-Status: \w+, score=(-?[\d.]+) required=\S+ tests=(\S*)",
                       re.sub(r"\n[ \t]+", "", report), re.MULTILINE)
    assert status is not None, report[:2000]
    return float(status[1]), status[2]


@pytest.mark.skipif(SPAMASSASSIN is None, reason="spamassassin is not installed (.ci/run does)")
def test_every_template_in_every_language_is_signed_and_lands_in_the_inbox(
        smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Each kind in each shipped language, with realistic values: queued, sent through the
    relay, DKIM-valid, in its language, and scored 0.5 or less by SpamAssassin."""
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key, smtp_server))
    clock = FakeClock()
    mailer = sysmail.Mailer(config, clock=clock)
    queued = {mailer.enqueue(name, to=RECIPIENT, locale=language,
                             **realistic(language, name)): (language, name)
              for language in LANGUAGES for name in sysmail.TEMPLATES}
    sender = mailer.sender()
    try:
        counts = sender.run_once()
    finally:
        sender.close()
    assert counts.sent == len(queued) == len(LANGUAGES) * len(sysmail.TEMPLATES) >= 18
    received = smtp_server.wait_for(len(queued))
    dns = dkim_dns({f"default._domainkey.{DOMAIN}.": rsa_key.dns_record})
    started = time.monotonic()
    scores = spam_scores([r.data for r in received])
    seconds = time.monotonic() - started
    failures = []
    with capsys.disabled():
        print(f"\nSpamAssassin (-L -t), {len(received)} messages in {seconds:.1f} s:")
        for mail, (score, rules) in zip(received, scores, strict=True):
            message = parse(mail.data)
            language, name = queued[message["Message-ID"]]
            print(f"  {language} {name:22} {score:5.1f}  {rules}")
            assert dkim.verify(mail.data, dnsfunc=dns), (language, name)
            assert message["To"].addresses[0].addr_spec == RECIPIENT
            assert f'<html lang="{language}" dir="ltr">' in parts(message)[1], (language, name)
            if score > MAX_SCORE:
                failures.append(f"{language} {name}: {score} ({rules})")
    assert not failures, failures
    assert seconds < 60


# --------------------------------------------------------------------------- what each part says


def visible_words(page: str, link_hint: str) -> list[str]:
    """The words a reader sees in the HTML's body and footer, without the link hint."""
    cells = re.findall(r'<td class="(?:text|muted)"[^>]*>(.*?)</td>', page, re.DOTALL)
    shown = html.unescape(re.sub(r"<[^>]+>", " ", " ".join(cells)))
    return words(shown.replace(link_hint, " "))


def words(text: str) -> list[str]:
    """The words of a text, without punctuation around them."""
    return [w.strip(".,:;!?()\"'") for w in text.split() if w.strip(".,:;!?()\"'-")]


@pytest.mark.parametrize("reply_to", ["", "support@example.com"])
@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("name", sorted(sysmail.TEMPLATES))
def test_html_and_text_say_the_same_with_no_remote_content(
        tmp_path: Path, rsa_key: RsaKey, name: str, language: str, reply_to: str) -> None:
    """Same words in the same order (the HTML adds only the link hint); the only links are the
    caller's own URLs, unchanged: no images, no tracking, no shortener; a footer in both."""
    env = make_env(tmp_path, rsa_key, **({"SYSTEM_REPLY_TO": reply_to} if reply_to else {}))
    enqueuer = sysmail.build_app(sysmail.Config.from_env(env)).enqueuer
    values = realistic(language, name)
    _, rendered = enqueuer.render(name, values, language)
    hint = enqueuer.catalog.pick(language).strings["link_hint"]
    text = rendered.text.replace("\n-- \n", "\n")
    assert visible_words(rendered.html, hint) == words(text)
    given = {v for k, v in values.items() if k.endswith("_url")}
    assert set(URL.findall(rendered.text)) == given
    assert set(re.findall(r'href="([^"]*)"', rendered.html)) == given
    assert not re.search(r"<img|src=|url\(|@import|<link|<script", rendered.html, re.IGNORECASE)
    assert rendered.text.count("\n-- \n") == 1
    footer = rendered.text.split("\n-- \n")[1].strip()
    assert html.escape(footer, quote=False) in rendered.html
    assert ("support@example.com" in rendered.text) == (name == "account-suspension"
                                                        and bool(reply_to))


def test_the_footer_says_replies_are_read_only_when_they_are(tmp_path: Path,
                                                             rsa_key: RsaKey) -> None:
    without = sysmail.build_app(sysmail.Config.from_env(make_env(tmp_path, rsa_key))).enqueuer
    with_reply = sysmail.build_app(sysmail.Config.from_env(make_env(
        tmp_path, rsa_key, SYSTEM_REPLY_TO="support@example.com"))).enqueuer
    variables = {"code": "482913"}
    assert "Replies to this address are not read." in without.render(
        "two-factor-code", variables)[1].text
    unread = with_reply.render("two-factor-code", variables)[1]
    assert "not read" not in unread.text + unread.html
    assert "To reach us, reply to this email." in unread.text
    assert "antworten Sie auf diese E-Mail." in with_reply.render(
        "two-factor-code", variables, "de")[1].text


def test_copy_reads_right_in_english() -> None:
    """No "a Example" (an article before the brand), sentences end with a full stop, and the
    suspension notice says what happens next and whom to contact."""
    brand = {"brand": "Example", "domain": DOMAIN, "reply_to": "support@example.com"}
    for name, template in sysmail.TEMPLATES.items():
        rendered = sysmail.render(template, template.samples, brand)
        body = rendered.text.split("\n-- \n")[0]
        assert not re.search(r"\ban? Example\b", body + rendered.subject), name
        for line in body.split("\n"):
            prose = line and ": " not in line and not line.startswith(("Hi ", "    "))
            if prose and line not in template.samples.values() and not line.startswith("The "):
                assert line.endswith((".", ":")), (name, line)
    suspension = sysmail.render(sysmail.TEMPLATES["account-suspension"],
                                sysmail.TEMPLATES["account-suspension"].samples, brand).text
    assert "What happens next: while the suspension lasts, you cannot sign in" in suspension
    assert "To reach us, write to support@example.com." in suspension
    assert "Appeal this decision: https://dashboard.example.com/appeal" in suspension


# --------------------------------------------------------------------------- dark mode


def luminance(colour: str) -> float:
    """WCAG 2 relative luminance of #rrggbb."""
    channels = [int(colour[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(one: str, two: str) -> float:
    """WCAG 2 contrast ratio of two colours."""
    high, low = sorted((luminance(one), luminance(two)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_contrast_ratio_of_the_pure_black_and_white_is_21() -> None:
    assert round(contrast("#000000", "#ffffff"), 2) == 21.0
    assert round(contrast("#777777", "#ffffff"), 2) == 4.48  # WCAG's own borderline example


def light_colours(page: str) -> dict[str, dict[str, str]]:
    """class -> {color, background-color} from the inline styles (the light scheme)."""
    found: dict[str, dict[str, str]] = {}
    for classes, style in re.findall(r'class="([^"]+)"[^>]*style="([^"]*)"', page):
        for css_class in classes.split():
            for prop, value in re.findall(r"(?<![\w-])(color|background-color):(#[0-9a-f]{6})",
                                          style):
                found.setdefault(css_class, {})[prop] = value
    return found


def dark_colours(page: str) -> dict[str, dict[str, str]]:
    """class -> {color, background-color} from the prefers-color-scheme: dark rules."""
    block = re.search(r"@media \(prefers-color-scheme: dark\) \{(.*?)\n\}", page, re.DOTALL)
    assert block is not None
    found: dict[str, dict[str, str]] = {}
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", block[1]):
        for selector in selectors.split(","):
            for prop, value in re.findall(r"(?<![\w-])(color|background-color):\s*(#[0-9a-f]{6})",
                                          body):
                found.setdefault(selector.strip().lstrip("."), {})[prop] = value
    return found


TEXT_ON = {"brand": "card", "text": "card", "muted": "card", "link": "card", "code": "card",
           "button": "button"}  # text colour of a class -> the class that gives its background


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_every_colour_pair_keeps_a_contrast_of_4_5_or_more(scheme: str) -> None:
    """color-scheme is declared, and every text colour on its background reaches WCAG AA."""
    template = sysmail.TEMPLATES["security-alert"]  # has text, a button, a link, a footer
    page = sysmail.render(template, template.samples, {"brand": BRAND, "domain": DOMAIN}).html
    page += sysmail.render(sysmail.TEMPLATES["two-factor-code"], {"code": "1"},
                           {"brand": BRAND, "domain": DOMAIN}).html
    assert '<meta name="color-scheme" content="light dark">' in page
    assert "color-scheme: light dark;" in page
    light = light_colours(page)
    colours = light if scheme == "light" else {
        name: {**light.get(name, {}), **dark} for name, dark in dark_colours(page).items()}
    assert set(TEXT_ON) <= set(colours)
    for text_class, background_class in TEXT_ON.items():
        foreground = colours[text_class]["color"]
        background = colours[background_class]["background-color"]
        ratio = contrast(foreground, background)
        print(f"{scheme} {text_class} {foreground} on {background}: {ratio:.2f}")
        assert ratio >= 4.5, (scheme, text_class, foreground, background, ratio)


# --------------------------------------------------------------------------- languages


def test_locale_falls_back_from_region_to_language_to_the_default(tmp_path: Path,
                                                                   rsa_key: RsaKey) -> None:
    folder = tmp_path / "templates"
    (folder / "fr").mkdir(parents=True)
    (folder / "fr-CA").mkdir()
    (folder / "ar").mkdir()
    (folder / "fr" / "two-factor-code.subject").write_text("Votre code : ${code}\n")
    (folder / "fr" / "two-factor-code.txt").write_text("Votre code ${brand} :\n\n    ${code}\n")
    (folder / "fr-CA" / "two-factor-code.subject").write_text("Votre code (Canada) : ${code}\n")
    (folder / "ar" / "two-factor-code.txt").write_text("رمزك:\n\n    ${code}\n")
    (folder / "ar" / "strings.json").write_text(json.dumps({"footer": "رسالة آلية من ${brand}."}))
    enqueuer = sysmail.build_app(sysmail.Config.from_env(make_env(
        tmp_path, rsa_key, SYSMAIL_TEMPLATES=str(folder)))).enqueuer

    def rendered(locale: str | None) -> sysmail.Rendered:
        return enqueuer.render("two-factor-code", {"code": "482913"}, locale)[1]

    canada = rendered("fr-CA")
    assert canada.subject == "Votre code (Canada) : 482913"
    assert canada.text.startswith("Votre code Example Cloud :\n")  # from fr
    assert '<html lang="fr-CA" dir="ltr">' in canada.html
    assert rendered("fr_ca").subject == canada.subject
    belgium = rendered("fr-BE")
    assert belgium.subject == "Votre code : 482913"
    assert '<html lang="fr" dir="ltr">' in belgium.html
    assert "Votre code Example Cloud" in belgium.html  # the HTML follows the translated text
    arabic = rendered("ar-EG")
    assert '<html lang="ar" dir="rtl">' in arabic.html
    assert "رسالة آلية من Example Cloud." in arabic.text
    assert arabic.subject == "Your Example Cloud sign-in code: 482913"  # not translated
    for default in (None, "", "it", "pt-BR"):
        assert '<html lang="en" dir="ltr">' in rendered(default).html
    assert '<html lang="de" dir="ltr">' in rendered("de-CH").html
    for bad in ("../de", "de/../../etc", "x", "de-", "de AT", "a" * 40):
        with pytest.raises(sysmail.MessageError, match="language tag"):
            rendered(bad)


def test_a_broken_override_in_a_language_folder_fails_check_with_78(tmp_path: Path,
                                                                     rsa_key: RsaKey) -> None:
    folder = tmp_path / "templates"
    (folder / "es").mkdir(parents=True)
    (folder / "es" / "magic-link.txt").write_text("Hola ${nombre}: ${login_url}\n")
    env = make_env(tmp_path, rsa_key, SYSMAIL_TEMPLATES=str(folder))
    checked = run_cli(["check"], env, cwd=tmp_path)
    assert checked.returncode == 78, checked.stdout + checked.stderr
    assert "es/magic-link" in checked.stderr and "'nombre'" in checked.stderr
    (folder / "es" / "magic-link.txt").write_text("Hola ${name}:\n\nEntrar: ${login_url}\n")
    checked = run_cli(["check"], env, cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert "templates en: 9 of 9 kinds in this language" in checked.stdout
    assert "templates de: 9 of 9 kinds in this language" in checked.stdout
    assert "templates es: 1 of 9 kinds in this language (the rest in the default)" \
        in checked.stdout
    preview = run_cli(["preview", "magic-link", "--locale", "es-MX", "--part", "text"], env,
                      cwd=tmp_path)
    assert preview.returncode == 0, preview.stderr
    assert preview.stdout.startswith("Hola Ada:\n\nEntrar: https://dashboard.example.com/login")


def test_cli_send_and_preview_take_a_locale(tmp_path: Path, rsa_key: RsaKey) -> None:
    env = make_env(tmp_path, rsa_key)
    sent = run_cli(["send", "--to", RECIPIENT, "--template", "magic-link", "--locale", "de-AT",
                    "--var", "login_url=https://dashboard.example.com/l?t=1"], env, cwd=tmp_path)
    assert sent.returncode == 0, sent.stderr
    [path] = (tmp_path / "spool" / "new").iterdir()
    data = path.read_bytes().partition(b"\n")[2]
    assert parse(data)["Subject"] == f"Ihr Anmeldelink für {BRAND}"
    preview = run_cli(["preview", "security-alert", "--locale", "de", "--part", "html"], env,
                      cwd=tmp_path)
    assert preview.returncode == 0, preview.stderr
    assert '<html lang="de" dir="ltr">' in preview.stdout
    assert "IP-Adresse: 203.0.113.7" in preview.stdout
    bad = run_cli(["send", "--to", RECIPIENT, "--template", "magic-link", "--locale", "../x",
                   "--var", "login_url=https://dashboard.example.com/l"], env, cwd=tmp_path)
    assert bad.returncode == 65 and "language tag" in bad.stderr
    adhoc = run_cli(["send", "--to", RECIPIENT, "--subject", "Hi", "--text", "Hi.", "--locale",
                     "de"], env, cwd=tmp_path)
    assert adhoc.returncode == 64


def test_http_api_takes_a_locale(tmp_path: Path, rsa_key: RsaKey) -> None:
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key, SYSMAIL_API_KEY="k" * 24))
    app = sysmail.build_app(config)
    api = app.api

    def send(payload: dict) -> sysmail.Response:
        return api.handle(sysmail.Request("POST", "/v1/emails", {}, {
            "Authorization": "Bearer " + "k" * 24, "Content-Type": "application/json"},
            json.dumps(payload).encode(), "127.0.0.1"))

    good = send({"template": "two-factor-code", "to": RECIPIENT, "vars": {"code": "482913"},
                 "locale": "de"})
    assert good.status == 202, good.body
    [path] = (tmp_path / "spool" / "new").iterdir()
    assert parse(path.read_bytes().partition(b"\n")[2])["Subject"].startswith("Ihr Anmeldecode")
    for locale in (5, ["de"], "../de"):
        reply = send({"template": "two-factor-code", "to": RECIPIENT, "vars": {"code": "1"},
                      "locale": locale})
        assert reply.status == 400, (locale, reply.body)
        assert json.loads(reply.body)["error"]


def test_a_user_stored_with_de_at_gets_the_german_reset_mail_and_fr_the_default(
        smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey) -> None:
    """Through the real service: the forgot-password worker reads User.locale from SQLite."""
    env = make_env(tmp_path, rsa_key, smtp_server, SYSMAIL_LISTEN="127.0.0.1:0",
                   SYSMAIL_METRICS_LISTEN="off")
    store = sysmail.SqliteStore(tmp_path / "sysmail.db")
    store.add_user("greta@example.org", "Greta Gruber", locale="de-AT")
    store.add_user("zoe@example.org", "Zoé Durand", locale="fr")
    app = sysmail.build_app(sysmail.Config.from_env(env), store=store)
    app.start()
    try:
        for address in ("greta@example.org", "zoe@example.org"):
            request = urllib.request.Request(
                f"{app.url}/v1/auth/forgot-password", json.dumps({"email": address}).encode(),
                {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as reply:
                assert reply.status == 202
        received = smtp_server.wait_for(2)
    finally:
        app.stop()
    mails = {r.rcpt_tos[0]: parse(r.data) for r in received}
    greta, zoe = mails["greta@example.org"], mails["zoe@example.org"]
    text, page = parts(greta)
    assert greta["Subject"] == f"Ihr Passwort für {BRAND} zurücksetzen"
    assert text.startswith("Hallo Greta Gruber,\n\nJemand hat darum gebeten")
    assert '<html lang="de" dir="ltr">' in page
    assert str(greta["To"]) == "Greta Gruber <greta@example.org>"
    text, page = parts(zoe)
    assert zoe["Subject"] == f"Reset your {BRAND} password"
    assert '<html lang="en" dir="ltr">' in page
    assert zoe["To"].addresses[0].display_name == "Zoé Durand"


def test_an_older_database_gains_the_locale_column_and_keeps_its_users(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:  # the users table as sysmail made it before issue 13
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE "
                   "COLLATE NOCASE, name TEXT NOT NULL DEFAULT '', password_hash TEXT, "
                   "created_at REAL NOT NULL)")
        db.execute("INSERT INTO users (email, name, created_at) VALUES "
                   "('old@example.org', 'Old Timer', 1)")
    db.close()
    store = sysmail.SqliteStore(path)
    assert store.find_user("old@example.org") == sysmail.User("1", "old@example.org",
                                                              "Old Timer", "")
    added = store.add_user("neu@example.org", "Neu", locale="de")
    assert store.find_user("NEU@example.org") == added == sysmail.User(
        "2", "neu@example.org", "Neu", "de")
    assert [u["locale"] for u in store.users()] == ["", "de"]
    again = sysmail.SqliteStore(path)  # a second opening migrates nothing twice
    assert again.find_user("neu@example.org") == added
    with pytest.raises(sysmail.MessageError, match="language tag"):
        store.add_user("bad@example.org", locale="de/../x")


def test_cli_user_add_takes_a_locale(tmp_path: Path, rsa_key: RsaKey) -> None:
    env = make_env(tmp_path, rsa_key)
    added = run_cli(["user", "add", "greta@example.org", "--name", "Greta", "--locale", "de-AT"],
                    env, cwd=tmp_path)
    assert added.returncode == 0, added.stderr
    listed = run_cli(["user", "list", "--json"], env, cwd=tmp_path)
    assert json.loads(listed.stdout)[0]["locale"] == "de-AT"


# --------------------------------------------------------------------------- the new kinds


def test_magic_link_is_urgent_and_must_arrive_before_it_expires(tmp_path: Path,
                                                                 rsa_key: RsaKey) -> None:
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key))
    clock = FakeClock(1_767_225_600.0)
    mailer = sysmail.Mailer(config, clock=clock)
    mailer.enqueue("magic-link", to=RECIPIENT, login_url="https://dashboard.example.com/l?t=1")
    mailer.enqueue("magic-link", to=RECIPIENT, login_url="https://dashboard.example.com/l?t=2",
                   expires_minutes="5")
    headers = [json.loads(p.read_bytes().partition(b"\n")[0].split(b" ", 2)[2])
               for p in sorted((tmp_path / "spool" / "new").iterdir())]
    assert sorted(h["expires_at"] - h["queued_at"] for h in headers) == [300, 900]
    assert all(p.name.startswith(f"{sysmail.URGENT}.")
               for p in (tmp_path / "spool" / "new").iterdir())
    text = sysmail.render(sysmail.TEMPLATES["magic-link"],
                          {"login_url": "https://dashboard.example.com/l"},
                          {"brand": BRAND, "domain": DOMAIN}).text
    assert "This link works once and expires in 15 minutes." in text
    assert sysmail.TEMPLATES["magic-link"].secrets == ("login_url",)


def test_email_change_notice_masks_the_new_address_everywhere(tmp_path: Path,
                                                              rsa_key: RsaKey) -> None:
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key))
    mailer = sysmail.Mailer(config, clock=FakeClock())
    mailer.enqueue("email-change-notice", to="old@example.org", new_email="ada.new@mail.example.net",
                   time="2026-11-27 14:03 UTC", ip="203.0.113.7", name="Ada")
    [path] = (tmp_path / "spool" / "new").iterdir()
    data = path.read_bytes()
    assert b"ada.new" not in data and b"mail.example.net" not in data
    text, page = parts(parse(data.partition(b"\n")[2]))
    assert "changed to a***@m***.net." in text
    assert "a***@m***.net" in page
    assert "IP address: 203.0.113.7" in text
    assert "Undo this change: https://dashboard.example.com\n" in text  # DASHBOARD_URL
    with pytest.raises(sysmail.MessageError, match="'new_email'"):
        mailer.enqueue("email-change-notice", to="old@example.org", new_email="not an address")


def test_security_alert_shows_device_location_ip_and_a_button_to_the_dashboard(
        tmp_path: Path, rsa_key: RsaKey) -> None:
    enqueuer = sysmail.build_app(sysmail.Config.from_env(make_env(tmp_path, rsa_key))).enqueuer
    _, rendered = enqueuer.render("security-alert", {
        "event": "a new sign-in", "device": "Safari on iPhone", "location": "Oslo, Norway",
        "ip": "198.51.100.4"})
    for line in ("Device: Safari on iPhone", "Location: Oslo, Norway",
                 "IP address: 198.51.100.4", "Review your account: https://dashboard.example.com"):
        assert line + "\n" in rendered.text
    assert 'class="button" href="https://dashboard.example.com"' in rendered.html
    plain = sysmail.render(sysmail.TEMPLATES["security-alert"], {"event": "a new sign-in"},
                           {"brand": BRAND, "domain": DOMAIN})  # no DASHBOARD_URL: no button
    assert "href=" not in plain.html and "Review your account" not in plain.text


# --------------------------------------------------------------------------- headers


def test_the_two_factor_code_in_the_subject_is_a_setting(tmp_path: Path, rsa_key: RsaKey) -> None:
    def subject(setting: str, language: str) -> str:
        env = make_env(tmp_path, rsa_key, SYSMAIL_CODE_IN_SUBJECT=setting)
        enqueuer = sysmail.build_app(sysmail.Config.from_env(env)).enqueuer
        return enqueuer.render("two-factor-code", {"code": "482913"}, language)[1].subject

    assert subject("1", "en") == f"Your {BRAND} sign-in code: 482913"
    assert subject("0", "en") == f"Your {BRAND} sign-in code"
    assert subject("0", "de") == f"Ihr Anmeldecode für {BRAND}"
    assert sysmail.DEFAULTS.code_in_subject is True


@pytest.mark.parametrize(("name", "header"), [
    ("Ada Lovelace", '"Ada Lovelace" <ada@example.org>'),
    ('Ada "the Countess" Lovelace', '"Ada \\"the Countess\\" Lovelace" <ada@example.org>'),
    ("Lovelace, Ada", '"Lovelace, Ada" <ada@example.org>'),
    ("Zoë Ünal", "=?utf-8?b?Wm/DqyDDnG5hbA==?= <ada@example.org>"),
    ("Ada\r\nBcc: victim@example.net", '"Ada Bcc: victim@example.net" <ada@example.org>'),
    ("Ada\x0bBcc:\x85victim@example.net", '"Ada Bcc: victim@example.net" <ada@example.org>'),
    ("Ada\x07Bcc: victim@example.net", "ada@example.org"),
    ("", "ada@example.org"),
])
def test_the_to_header_carries_the_name_safely(tmp_path: Path, rsa_key: RsaKey, name: str,
                                               header: str) -> None:
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key))
    mailer = sysmail.Mailer(config, clock=FakeClock())
    mailer.enqueue("magic-link", to=RECIPIENT, login_url="https://dashboard.example.com/l",
                   name=name)
    [path] = (tmp_path / "spool" / "new").iterdir()
    data = path.read_bytes().partition(b"\n")[2]
    assert f"\r\nTo: {header}\r\n".encode() in data
    message = parse(data)
    assert [a.addr_spec for a in message["To"].addresses] == [RECIPIENT]
    assert message["Bcc"] is None


def test_several_recipients_get_a_plain_to_header(tmp_path: Path, rsa_key: RsaKey) -> None:
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key))
    sysmail.Mailer(config, clock=FakeClock()).enqueue(
        "magic-link", to=[RECIPIENT, "b@example.org"],
        login_url="https://dashboard.example.com/l", name="Ada")
    [path] = (tmp_path / "spool" / "new").iterdir()
    assert b"\r\nTo: ada@example.org,\r\n b@example.org\r\n" in path.read_bytes()


# --------------------------------------------------------------------------- shipped files


def test_the_shipped_translation_covers_every_template_and_layout_string() -> None:
    folder = Path(sysmail.__file__).parent / "templates"
    assert sorted(p.name for p in folder.iterdir()) == sorted(sysmail.SHIPPED_LANGUAGES)
    for tag in sysmail.SHIPPED_LANGUAGES:
        names = {p.name for p in (folder / tag).iterdir()}
        expected = {f"{n}{s}" for n in sysmail.TEMPLATES for s in (".subject", ".txt")}
        assert names == expected | {"strings.json"}
        strings = json.loads((folder / tag / "strings.json").read_text(encoding="utf-8"))
        assert set(strings) == set(sysmail.LAYOUT_STRINGS)


def test_a_caller_cannot_name_a_template_file_through_the_locale(tmp_path: Path,
                                                                  rsa_key: RsaKey) -> None:
    """Locales pick among the folders found at start; they never become a path."""
    folder = tmp_path / "templates"
    (folder / "xx").mkdir(parents=True)
    (folder / "not a tag").mkdir()
    (folder / "not a tag" / "magic-link.subject").write_text("hijacked\n")
    enqueuer = sysmail.build_app(sysmail.Config.from_env(make_env(
        tmp_path, rsa_key, SYSMAIL_TEMPLATES=str(folder)))).enqueuer
    assert sorted(enqueuer.catalog.languages) == ["de", "en", "xx"]
    for tag in ("xx", "de", "en", "not a tag"):
        with contextlib.suppress(sysmail.MessageError):
            subject = enqueuer.render("magic-link", {"login_url": "https://e.example/l"},
                                      tag)[1].subject
            assert "hijacked" not in subject


@pytest.mark.skipif(SPAMASSASSIN is None, reason="spamassassin is not installed (.ci/run does)")
def test_the_scorer_sees_what_spamassassin_sees_in_yesterdays_copy(tmp_path: Path,
                                                                   rsa_key: RsaKey) -> None:
    """The old suspension notice (its wording and link match phishing rules) and the old
    billing subject (the brand first, a naked To:) still score 2.0 and 1.0: the check above
    can fail."""
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key, SYSTEM_FROM_NAME="Example"))
    old_suspension = sysmail.Rendered(
        "Your Example account has been suspended",
        "Hi Ada,\n\nYour Example account has been suspended.\n\nReason: Unpaid invoices\n\n"
        "To appeal this decision: https://dashboard.example.com/appeal\n",
        '<html><body><p>Your Example account has been suspended.</p><p>Reason: Unpaid invoices'
        '</p><p><a href="https://dashboard.example.com/appeal">Appeal this decision</a></p>'
        "</body></html>\n")
    old_billing = sysmail.Rendered("Example billing: Your invoice for November is ready",
                                   "Hi Ada,\n\nYour invoice for November is ready\n", "")
    messages = [sysmail.build_message(config, ["ada@example.com"], rendered,
                                      f"<{n}.old@example.com>", 1_767_225_600.0)
                for n, rendered in enumerate((old_suspension, old_billing))]
    (suspension, suspension_rules), (billing, billing_rules) = spam_scores(messages)
    assert suspension >= 2.0 and "URI_PHISH" in suspension_rules
    assert billing >= 1.0 and "PDS_BRAND_SUBJ_NAKED_TO" in billing_rules


def test_an_installed_sysmail_finds_its_translation_in_sysmail_templates(tmp_path: Path) -> None:
    """pip installs templates/ as the sysmail_templates folder beside sysmail.py (pyproject's
    package-dir): German mail comes from there."""
    repo = Path(sysmail.__file__).parent
    site = tmp_path / "site-packages"
    site.mkdir()
    shutil.copy2(repo / "sysmail.py", site / "sysmail.py")
    shutil.copytree(repo / "templates", site / "sysmail_templates")
    pyproject = (repo / "pyproject.toml").read_text(encoding="utf-8")
    assert 'package-dir = {"sysmail_templates" = "templates"}' in pyproject
    result = subprocess.run(
        [sys.executable, str(site / "sysmail.py"), "preview", "magic-link", "--locale", "de",
         "--part", "text"], capture_output=True, text=True, timeout=60, check=False,
        cwd=tmp_path, env={"PATH": os.environ.get("PATH", ""), "SYSTEM_DOMAIN": DOMAIN})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hallo Ada,\n\nHier ist der Link")


def test_batches_take_a_locale_for_all_and_one_per_recipient(tmp_path: Path,
                                                            rsa_key: RsaKey) -> None:
    """Mailer.enqueue_many and the batch form of POST /v1/emails: the batch's locale, a
    recipient's own over it, and a bad one refuses the whole batch before anything is queued."""
    config = sysmail.Config.from_env(make_env(tmp_path, rsa_key, SYSMAIL_API_KEY="k" * 24))
    app = sysmail.build_app(config)
    mailer = sysmail.Mailer(config, app=app)
    variables = {"title": "Wartung", "body": "Kurz."}
    with pytest.raises(sysmail.MessageError, match="language tag"):
        mailer.enqueue_many("service-announcement", ["a@example.org", {
            "to": "b@example.org", "locale": "../x"}], locale="de", **variables)
    assert not list((tmp_path / "spool" / "new").iterdir())
    mailer.enqueue_many("service-announcement", ["a@example.org", {
        "to": "b@example.org", "locale": "en", "name": "Bob"}], locale="de", **variables)
    reply = app.api.handle(sysmail.Request("POST", "/v1/emails", {}, {
        "Authorization": "Bearer " + "k" * 24, "Content-Type": "application/json"},
        json.dumps({"template": "service-announcement", "vars": variables, "locale": "en",
                    "recipients": ["c@example.org", {"to": "d@example.org", "locale": "de-CH"}]
                    }).encode(), "127.0.0.1"))
    assert reply.status == 202, reply.body
    langs = {}
    for path in (tmp_path / "spool" / "new").iterdir():
        message = parse(path.read_bytes().partition(b"\n")[2])
        langs[message["To"].addresses[0].addr_spec] = re.search(
            r'<html lang="(\w+)"', parts(message)[1])[1]
    assert langs == {"a@example.org": "de", "b@example.org": "en", "c@example.org": "en",
                     "d@example.org": "de"}
