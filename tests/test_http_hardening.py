"""The public listener tells nobody who has an account; operators read /metrics elsewhere."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import SmtpServer

import sysmail

KNOWN, UNKNOWN = "ada@example.com", "nobody@example.com"


@pytest.fixture
def app(smtp_server: SmtpServer, tmp_path: Path) -> Iterator[sysmail.App]:
    config = sysmail.Config.from_env({
        "SYSMAIL_LISTEN": "127.0.0.1:0", "SYSMAIL_METRICS_LISTEN": "127.0.0.1:0",
        "SMTP_URL": smtp_server.url, "SYSTEM_DOMAIN": "example.com",
        "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(tmp_path / "spool"),
        "SYSMAIL_DB": str(tmp_path / "db.sqlite")})
    store = sysmail.MemoryStore()
    store.add_user(KNOWN, "Ada")
    built = sysmail.build_app(config, store=store)
    built.start()
    try:
        yield built
    finally:
        built.stop()


def request(base: str, method: str, path: str, body: dict | None = None
            ) -> tuple[int, dict[str, str], bytes]:
    host, port = base.removeprefix("http://").rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, payload, {"Content-Type": "application/json"})
        reply = connection.getresponse()
        return reply.status, dict(reply.getheaders()), reply.read()
    finally:
        connection.close()


def test_the_public_listener_has_no_metrics_and_answers_alike(app: sysmail.App,
                                                              smtp_server: SmtpServer) -> None:
    """Known and unknown addresses get the same status, headers and body; /metrics and the
    readiness details live on the operators' listener only."""
    known = request(app.url, "POST", "/v1/auth/forgot-password", {"email": KNOWN})
    unknown = request(app.url, "POST", "/v1/auth/forgot-password", {"email": UNKNOWN})
    strip = lambda headers: {k: v for k, v in headers.items() if k != "Date"}
    assert (known[0], strip(known[1]), known[2]) == (unknown[0], strip(unknown[1]), unknown[2])
    assert request(app.url, "GET", "/metrics")[0] == 404
    assert json.loads(request(app.url, "GET", "/readyz")[2]) == {"status": "ready"}
    smtp_server.wait_for(1)
    status, _, page = request(app.ops_url, "GET", "/metrics")
    assert status == 200 and b'sysmail_enqueued_total{backend="spool"} 1' in page
    assert "checks" in json.loads(request(app.ops_url, "GET", "/readyz")[2])
    assert request(app.ops_url, "POST", "/v1/auth/forgot-password", {"email": KNOWN})[0] == 404


def test_the_operators_listener_is_loopback_by_default_and_can_be_off() -> None:
    assert sysmail.Config.from_env({}).ops_listen == ("127.0.0.1", 9025)
    assert sysmail.Config.from_env({"SYSMAIL_METRICS_LISTEN": "off"}).ops_listen is None
    with pytest.raises(sysmail.ConfigError, match="SYSMAIL_METRICS_LISTEN must be HOST:PORT"):
        sysmail.Config.from_env({"SYSMAIL_METRICS_LISTEN": "everywhere"})
