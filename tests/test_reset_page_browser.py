"""sysmail's own reset page (issue 3) in headless Chromium with JavaScript disabled.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with urllib (no selenium).
The service is real: SQLite store, HTTP on a loopback port, mail written to the outbox.
"""

from __future__ import annotations

import email.policy
import json
import re
import shutil
import sqlite3
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest
from conftest import free_port, stop_process

import sysmail

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path(shutil.which("chromedriver") or "/usr/bin/chromedriver")
ELEMENT_KEY = "element-6066-11e4-a52e-4f735466cecf"  # the W3C web element identifier
TITLE_FORM = "Choose a new password"
TITLE_CHANGED = "Your password has been changed"
TITLE_NOT_CHANGED = "Your password was not changed"
TITLE_DIFFER = "The passwords differ"
USED_TOKEN_SENTENCE = "this reset link is invalid, used or expired"

pytestmark = pytest.mark.skipif(
    not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()),
    reason=f"headless Chromium needs {CHROMIUM} and {CHROMEDRIVER} "
           "(Debian packages chromium and chromium-driver)")

# Plain urllib, never through a proxy from the environment: everything here is on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- WebDriver


class WebDriverError(AssertionError):
    """A WebDriver command failed."""


def _call(base: str, method: str, path: str, body: object = None, timeout: float = 60) -> object:
    """One WebDriver command; return its "value", raise WebDriverError with the driver's message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return json.loads(response.read())["value"]
    except urllib.error.HTTPError as exc:
        raise WebDriverError(f"{method} {path}: {exc.code} {exc.read()[:500]!r}") from None


@dataclass
class Browser:
    """A Chromium session behind chromedriver, with the few commands these tests need."""

    base: str
    session: str

    def command(self, method: str, path: str, body: object = None) -> object:
        """A command on this session."""
        return _call(self.base, method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        """Navigate and wait for the page to load."""
        self.command("POST", "/url", {"url": url})

    def reload(self) -> None:
        """Reload the current page (a GET again)."""
        self.command("POST", "/refresh", {})

    def title(self) -> str:
        """The document title."""
        return str(self.command("GET", "/title"))

    def source(self) -> str:
        """The current DOM serialized as HTML."""
        return str(self.command("GET", "/source"))

    def find(self, css: str) -> str:
        """The id of the first element matching a CSS selector."""
        found = self.command("POST", "/element", {"using": "css selector", "value": css})
        assert isinstance(found, dict)
        return str(found[ELEMENT_KEY])

    def attribute(self, css: str, name: str) -> str | None:
        """An attribute of the first element matching css."""
        value = self.command("GET", f"/element/{self.find(css)}/attribute/{name}")
        return None if value is None else str(value)

    def type(self, css: str, text: str) -> None:
        """Type text into the element matching css."""
        self.command("POST", f"/element/{self.find(css)}/value", {"text": text})

    def click(self, css: str) -> None:
        """Click the element matching css (a submit button navigates)."""
        self.command("POST", f"/element/{self.find(css)}/click", {})

    def wait_for_title(self, wanted: str, timeout: float = 15) -> str:
        """Poll the title until it is wanted (a submit's navigation may still be running)."""
        give_up = time.monotonic() + timeout
        while (title := self.title()) != wanted and time.monotonic() < give_up:
            time.sleep(0.1)
        return title


def _wait_ready(base: str, driver: subprocess.Popen[bytes], timeout: float = 20) -> None:
    """Block until chromedriver reports ready; fail if it exits or never does."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            status = _call(base, "GET", "/status", timeout=2)
            if isinstance(status, dict) and status.get("ready"):
                return
        except OSError:
            pass
        assert driver.poll() is None, f"chromedriver exited with {driver.returncode}"
        assert time.monotonic() < give_up, "chromedriver not ready"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def browser(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    """chromedriver on a free port and one headless Chromium session without JavaScript.

    It depends on service only to be torn down first: Chromium keeps idle (pre)connections
    open, and App.stop() waits for them until the request deadline.
    """
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    profile = tmp_path_factory.mktemp("chromium-profile")
    driver = subprocess.Popen([str(CHROMEDRIVER), f"--port={port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(base, driver)
        options = {"binary": str(CHROMIUM), "args": [
            "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
            "--blink-settings=scriptEnabled=false"]}
        created = _call(base, "POST", "/session", {"capabilities": {"alwaysMatch": {
            "browserName": "chrome", "goog:chromeOptions": options}}})
        assert isinstance(created, dict)
        session = Browser(base, str(created["sessionId"]))
        try:
            session.command("POST", "/timeouts", {"pageLoad": 30_000, "implicit": 0})
            yield session
        finally:
            session.command("DELETE", "")
    finally:
        stop_process(driver)


# --------------------------------------------------------------------------- the service


@dataclass
class Service:
    """The running app, its SQLite store and where its mail lands."""

    app: sysmail.App
    store: sysmail.SqliteStore
    outbox: Path
    db: Path

    def url(self, path: str) -> str:
        """An absolute URL on the service."""
        return self.app.url + path


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with no DASHBOARD_URL, so reset links point at its own page."""
    tmp = tmp_path_factory.mktemp("reset-page")
    config = sysmail.Config.from_env({
        "SYSMAIL_LISTEN": "127.0.0.1:0", "SYSMAIL_METRICS_LISTEN": "off",
        "SYSTEM_DOMAIN": "example.com",
        "SYSMAIL_SPOOL": str(tmp / "spool"),
        "SYSMAIL_OUTBOX": str(tmp / "outbox"),
        "SYSMAIL_DB": str(tmp / "db.sqlite"),
        "SYSMAIL_API_KEY": "k" * 32,
        "SYSMAIL_FORGOT_LIMIT_PER_CLIENT": "100000/60",
        "SYSMAIL_FORGOT_LIMIT_PER_ADDRESS": "100000/60",
        "SYSMAIL_RESET_LIMIT_PER_CLIENT": "100000/60",
    })
    assert config.dashboard_url == ""
    app = sysmail.build_app(config)
    assert isinstance(app.store, sysmail.SqliteStore)
    app.start()
    try:
        yield Service(app, app.store, tmp / "outbox", tmp / "db.sqlite")
    finally:
        app.stop()


def http(url: str, data: bytes | None = None,
         content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    """A plain urllib request: (status, headers, body), 4xx and 5xx included."""
    headers = {"Content-Type": content_type} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with _OPENER.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def mail_to(outbox: Path, address: str, subject_prefix: str, timeout: float = 15) -> EmailMessage:
    """The first .eml in the outbox to address whose subject starts with subject_prefix."""
    give_up = time.monotonic() + timeout
    while True:
        for path in sorted(outbox.glob("*.eml")) if outbox.is_dir() else []:
            message = BytesParser(policy=email.policy.default).parsebytes(path.read_bytes())
            assert isinstance(message, EmailMessage)
            to = message["To"].addresses[0].addr_spec
            if to == address and str(message["Subject"]).startswith(subject_prefix):
                return message
        assert time.monotonic() < give_up, f"no mail {subject_prefix!r} to {address} in {outbox}"
        time.sleep(0.1)


def reset_link(service: Service, message: EmailMessage) -> str:
    """The reset link in a password-reset mail's text part (it must point at this service)."""
    text = message.get_body(preferencelist=("plain",))
    assert text is not None
    links = re.findall(r"https?://\S+/reset-password\?token=[A-Za-z0-9_-]+", text.get_content())
    assert links, text.get_content()
    assert links[0].startswith(service.url("/reset-password?token=")), links
    return links[0]


def token_used_at(service: Service, token: str) -> float | None:
    """used_at of a token's row, read straight from the SQLite file (must exist)."""
    with sqlite3.connect(f"file:{service.db}?mode=ro", uri=True) as db:
        row = db.execute("SELECT used_at FROM tokens WHERE hash = ?",
                         (sysmail.token_hash(token),)).fetchone()
    assert row is not None, "no such token in the store"
    return row[0]


def submit(browser: Browser, password: str, confirm: str) -> None:
    """Fill the reset form in and press its button."""
    browser.type("#password", password)
    browser.type("#confirm", confirm)
    browser.click("button[type=submit]")


def assert_form(browser: Browser, token: str) -> None:
    """The page shows the reset form carrying the token, and no script."""
    assert browser.wait_for_title(TITLE_FORM) == TITLE_FORM, browser.source()
    assert browser.attribute("form", "method") == "post"
    assert browser.attribute("form", "action") == "/reset-password"
    assert browser.attribute("input[name=token]", "type") == "hidden"
    assert browser.attribute("input[name=token]", "value") == token
    assert browser.attribute("#password", "type") == "password"
    assert "<script" not in browser.source().lower()


# --------------------------------------------------------------------------- tests


def test_javascript_is_really_off(browser: Browser) -> None:
    """The session runs no page script: a script that would retitle the page does nothing."""
    browser.open("data:text/html,<title>script off</title><script>document.title='on'</script>")
    assert browser.title() == "script off"


def test_page_headers_and_markup(service: Service) -> None:
    """The form and its answers: no-referrer, no-store, a CSP without scripts, no <script>."""
    token = "T" * 43
    pages = [
        http(service.url(f"/reset-password?token={token}")),
        http(service.url("/reset-password?token=bad")),
        http(service.url("/reset-password"), urllib.parse.urlencode(
            {"token": token, "password": "abcdefgh1", "confirm": "abcdefgh2"}).encode(),
             "application/x-www-form-urlencoded"),
        http(service.url("/reset-password"), urllib.parse.urlencode(
            {"token": token, "password": "abcdefgh1", "confirm": "abcdefgh1"}).encode(),
             "application/x-www-form-urlencoded"),
    ]
    assert [status for status, _, _ in pages] == [200, 400, 400, 400]
    for status, headers, body in pages:
        assert headers["Content-Type"] == "text/html; charset=utf-8", status
        assert headers["Referrer-Policy"] == "no-referrer", status
        assert headers["Cache-Control"] == "no-store", status
        csp = headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src" not in csp, csp
        assert "form-action 'self'" in csp, csp
        assert b"<script" not in body.lower() and b"javascript:" not in body.lower()
    form = pages[0][2].decode()
    assert '<form method="post" action="/reset-password">' in form
    assert f'<input type="hidden" name="token" value="{token}">' in form
    assert "<title>This reset link is incomplete</title>" in pages[1][2].decode()
    assert f"<title>{TITLE_DIFFER}</title>" in pages[2][2].decode()
    assert f"<title>{TITLE_NOT_CHANGED}</title>" in pages[3][2].decode()
    assert USED_TOKEN_SENTENCE in pages[3][2].decode()


def test_reset_through_the_mailed_link_in_chromium(browser: Browser, service: Service) -> None:
    """Forgot password, the mailed link, the form (not consumed by loading it), change, reuse."""
    address = "ada@example.com"
    user = service.store.add_user(address, "Ada", password="old-password-1")
    status, _, body = http(service.url("/v1/auth/forgot-password"),
                           json.dumps({"email": address}).encode())
    assert (status, json.loads(body)["status"]) == (202, "accepted")
    link = reset_link(service, mail_to(service.outbox, address, "Reset your"))
    token = urllib.parse.parse_qs(urllib.parse.urlsplit(link).query)["token"][0]

    browser.open(link)
    assert_form(browser, token)
    browser.reload()
    assert_form(browser, token)
    browser.open(link)
    assert_form(browser, token)
    assert token_used_at(service, token) is None  # three loads, the token is still unused

    submit(browser, "new-password-2", "new-password-2")
    assert browser.wait_for_title(TITLE_CHANGED) == TITLE_CHANGED, browser.source()
    assert "You can now sign in with your new password." in browser.source()
    stored = service.store.password_hash(user)
    assert stored is not None and stored.startswith("scrypt$")
    assert sysmail.verify_password("new-password-2", stored)
    assert not sysmail.verify_password("old-password-1", stored)
    assert token_used_at(service, token) is not None
    assert [entry[0::2] for entry in service.store.audit_entries(user)] == [
        ("password_reset", "127.0.0.1")]
    mail_to(service.outbox, address, "Security alert")

    browser.open(link)  # the link again: the form still shows (a GET never checks or consumes)
    assert_form(browser, token)
    submit(browser, "third-password-3", "third-password-3")
    assert browser.wait_for_title(TITLE_NOT_CHANGED) == TITLE_NOT_CHANGED, browser.source()
    assert USED_TOKEN_SENTENCE in browser.source()
    assert service.store.password_hash(user) == stored
    assert len(service.store.audit_entries(user)) == 1


def test_mismatched_confirmation_keeps_the_token(browser: Browser, service: Service) -> None:
    """Password and confirmation differ: an error page, no change, and the link still works."""
    user = service.store.add_user("grace@example.com", "Grace")
    token = "Mismatch_" + "x" * 34
    now = time.time()
    service.store.save_token(sysmail.token_hash(token), user, sysmail.RESET_PURPOSE, now,
                             now + 3600)
    link = service.url("/reset-password?" + urllib.parse.urlencode({"token": token}))

    browser.open(link)
    assert_form(browser, token)
    submit(browser, "first-password-1", "other-password-2")
    assert browser.wait_for_title(TITLE_DIFFER) == TITLE_DIFFER, browser.source()
    assert "type the same password" in browser.source()
    assert token_used_at(service, token) is None
    assert service.store.password_hash(user) is None
    assert service.store.audit_entries(user) == []

    browser.open(link)
    assert_form(browser, token)
    submit(browser, "first-password-1", "first-password-1")
    assert browser.wait_for_title(TITLE_CHANGED) == TITLE_CHANGED, browser.source()
    stored = service.store.password_hash(user)
    assert stored is not None and sysmail.verify_password("first-password-1", stored)
