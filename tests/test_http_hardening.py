"""The public listener tells nobody who has an account; operators read /metrics elsewhere."""

from __future__ import annotations

import http.client
import json
import random
import time
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


def best_threshold_accuracy(known: list[float], unknown: list[float]) -> float:
    """The accuracy of the best single-threshold classifier (either direction) on the data."""
    labelled = sorted([(v, 1) for v in known] + [(v, 0) for v in unknown])
    total, known_left, best = len(labelled), 0, 0.5
    for count, (_, label) in enumerate(labelled, start=1):
        known_left += label
        below_unknown = (count - known_left) + (len(known) - known_left)  # "above: known"
        best = max(best, below_unknown / total, 1 - below_unknown / total)
    return best


def timed_trial(base: str, address: str) -> float:
    """A forgot-password for address and the three /healthz requests right after it."""
    started = time.perf_counter()
    assert request(base, "POST", "/v1/auth/forgot-password", {"email": address})[0] == 202
    for _ in range(3):
        assert request(base, "GET", "/healthz")[0] == 200
    return time.perf_counter() - started


def test_follow_on_work_does_not_tell_known_from_unknown(smtp_server: SmtpServer,
                                                          tmp_path: Path) -> None:
    """1,000 known and 1,000 unknown addresses, interleaved at random: a classifier with the
    best threshold on the latency of the forgot-password plus the three /healthz after it is
    right at most 55 % of the time (the SQLite store, its fsyncs and the mail sent are real).
    With 1,000 of each, chance alone passes 55 % about once in 3,000 runs (the two-sample
    Kolmogorov-Smirnov bound); with 400 of each it would be once in 25."""
    config = sysmail.Config.from_env({
        "SYSMAIL_LISTEN": "127.0.0.1:0", "SYSMAIL_METRICS_LISTEN": "off",
        "SMTP_URL": smtp_server.url, "SYSTEM_DOMAIN": "example.com",
        "SYSMAIL_ALLOW_UNSIGNED": "1", "SYSMAIL_SPOOL": str(tmp_path / "spool"),
        "SYSMAIL_DB": str(tmp_path / "db.sqlite"),
        "SYSMAIL_FORGOT_LIMIT_PER_CLIENT": "100000/60",
        "SYSMAIL_FORGOT_LIMIT_PER_ADDRESS": "100000/60"})
    app = sysmail.build_app(config)
    app.store.add_user(KNOWN, "Ada")
    app.start()
    labels = [True] * 1000 + [False] * 1000
    random.Random(7).shuffle(labels)
    known, unknown = [], []
    try:
        for _ in range(20):  # warm up both paths
            timed_trial(app.url, KNOWN)
            timed_trial(app.url, UNKNOWN)
        for is_known in labels:
            (known if is_known else unknown).append(
                timed_trial(app.url, KNOWN if is_known else UNKNOWN))
    finally:
        app.stop()
    accuracy = best_threshold_accuracy(known, unknown)
    print(f"classifier accuracy {accuracy:.3f} over {len(labels)} trials")
    assert accuracy <= 0.55
