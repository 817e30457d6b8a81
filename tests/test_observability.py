"""What an operator alerts on: every series exists from the start of `sysmail serve`, and the
alert rules and the Grafana dashboard in contrib/ load and use only series /metrics has."""

from __future__ import annotations

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

import pytest
from conftest import LOCALHOST, REPO, RsaKey, SmtpServer, bind_socket, stop_process
from prometheus_client.parser import text_string_to_metric_families

import sysmail

CONTRIB = REPO / "contrib"
RULES = CONTRIB / "sysmail-alerts.yml"
RULE_TESTS = CONTRIB / "sysmail-alerts.test.yml"
DASHBOARD = CONTRIB / "grafana-sysmail.json"
API_KEY = "observability-test-key-0123456789"
OUTCOMES = ("sent", "deferred", "failed", "expired")


@dataclass
class Serve:
    """A `sysmail serve` subprocess and its two listeners."""

    process: subprocess.Popen[bytes]
    url: str
    ops_url: str
    relays: tuple[str, str]


@pytest.fixture
def serve(tmp_path: Path, smtp_server: SmtpServer, rsa_key: RsaKey) -> Iterator[Serve]:
    """`sysmail.py serve` with two relays: the sink, then a port nobody listens on."""
    with bind_socket() as unused:  # bound, never listening: connections are refused
        dead = f"{LOCALHOST}:{unused.getsockname()[1]}"
        env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1",
               "SYSMAIL_LISTEN": f"{LOCALHOST}:0", "SYSMAIL_METRICS_LISTEN": f"{LOCALHOST}:0",
               "SMTP_URL": f"{smtp_server.url},smtp+plain://{dead}",
               "SYSTEM_DOMAIN": "example.com", "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem,
               "SYSMAIL_API_KEY": API_KEY, "SYSMAIL_SPOOL": str(tmp_path / "spool"),
               "SYSMAIL_DB": str(tmp_path / "db.sqlite")}
        log_path = tmp_path / "serve.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([sys.executable, str(REPO / "sysmail.py"), "serve"],
                                       env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=log)
        try:
            event = _listening_event(process, log_path)
            yield Serve(process, event["url"], event["metrics"].removesuffix("/metrics"),
                        (f"{LOCALHOST}:{smtp_server.port}", dead))
        finally:
            stop_process(process)


def _listening_event(process: subprocess.Popen[bytes], log_path: Path) -> dict:
    deadline = time.monotonic() + 15
    while True:
        for line in log_path.read_text().splitlines():
            if '"listening"' in line:
                return json.loads(line)
        assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)


def scrape(ops_url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics, parsed by prometheus_client: (sample name, sorted labels) -> value."""
    with urllib.request.urlopen(ops_url + "/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    """A sample's value, or None when the series is absent."""
    return samples.get((name, tuple(sorted(labels.items()))))


def test_every_series_exists_before_the_first_mail(serve: Serve, smtp_server: SmtpServer) -> None:
    """Outcome, backend, rate-limit and per-relay counters at 0, relay and last-send ages
    defined, build info labelled, all on the first scrape; then the first send counts."""
    first = scrape(serve.ops_url)
    assert {o: value(first, "sysmail_messages_total", outcome=o) for o in OUTCOMES} == \
        dict.fromkeys(OUTCOMES, 0)
    assert value(first, "sysmail_enqueued_total", backend="spool") == 0
    assert value(first, "sysmail_enqueued_total", backend="redis") == 0
    assert value(first, "sysmail_unrecorded_total") == 0
    for limit in ("forgot_client", "forgot_address", "reset_client"):
        assert value(first, "sysmail_rate_limited_total", limit=limit) == 0
    for kind in ("hard", "soft", "complaint"):
        assert value(first, "sysmail_bounces_total", kind=kind, source="report") == 0
    for template in (*sysmail.TEMPLATES, "ad-hoc"):
        assert value(first, "sysmail_suppressed_total", template=template) == 0
    for relay in serve.relays:
        for reply in ("2xx", "4xx", "5xx"):
            assert value(first, "sysmail_relay_replies_total", relay=relay, reply=reply) == 0
        assert value(first, "sysmail_relay_up", relay=relay) == 1
        assert 0 <= value(first, "sysmail_relay_last_reply_age_seconds", relay=relay) < 30
    assert 0 <= value(first, "sysmail_last_send_age_seconds") < 30
    version = sysmail.__version__  # pyproject.toml reads it too
    assert value(first, "sysmail_build_info", version=version, signing_backend="openssl") == 1

    request = urllib.request.Request(
        serve.url + "/v1/emails", method="POST",
        data=json.dumps({"template": "security-alert", "to": "ada@example.com",
                         "vars": {"event": "a new sign-in"}}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        assert reply.status == 202
    smtp_server.wait_for(1)
    deadline = time.monotonic() + 10
    while value(after := scrape(serve.ops_url), "sysmail_messages_total", outcome="sent") != 1:
        assert time.monotonic() < deadline, after
        time.sleep(0.05)
    assert value(after, "sysmail_relay_replies_total", relay=serve.relays[0], reply="2xx") == 1
    assert value(after, "sysmail_enqueued_total", backend="spool") == 1
    assert value(after, "sysmail_last_send_age_seconds") < 10


def test_build_info_says_unsigned_without_a_key(tmp_path: Path) -> None:
    """Outbox mode, no DKIM key: the signing backend label says so."""
    config = sysmail.Config.from_env({"SYSMAIL_SPOOL": str(tmp_path / "spool")})
    assert sysmail.build_app(config).metrics.build_info == {
        "version": sysmail.__version__, "signing_backend": "unsigned"}


# --------------------------------------------------------------------------- contrib/


def rule_expressions() -> list[str]:
    """The PromQL of every alert rule, read by PyYAML."""
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the alert rules (python3-yaml)")
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def dashboard_expressions() -> list[str]:
    """The PromQL of every panel target and templating query of the dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    targets = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    return targets + [v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]


def test_alert_rules_load_and_fire_as_their_comments_say() -> None:
    """promtool checks the rules and runs their unit tests (contrib/sysmail-alerts.test.yml);
    without promtool, PyYAML reads them and each alert has a comment and a severity."""
    promtool = shutil.which("promtool")
    if promtool:
        for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULE_TESTS)]):
            result = subprocess.run([promtool, *command], capture_output=True, text=True,
                                    timeout=60, check=False)
            assert result.returncode == 0, result.stdout + result.stderr
    yaml = pytest.importorskip("yaml", reason="PyYAML reads the alert rules (python3-yaml)")
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "SysmailQueueNotDraining", "SysmailOldestMessageTooOld", "SysmailDeadLettersGrowing",
        "SysmailRelayDown", "SysmailNoRelayUp", "SysmailSpoolFallingBackToRedis",
        "SysmailComplaintRateHigh", "SysmailComplaintRateCritical", "SysmailBounceRateHigh",
        "SysmailBounceRateCritical"}
    assert all(rule["labels"]["severity"] in ("warning", "critical") for rule in rules)
    text = RULES.read_text()
    for rule in rules:  # the threshold is explained just above the rule
        above = text[:text.index(f"- alert: {rule['alert']}")].rstrip().splitlines()[-1]
        assert above.strip().startswith("#"), rule["alert"]


def test_rules_and_dashboard_use_only_series_that_metrics_has(serve: Serve) -> None:
    """Every sysmail_* name in a rule or a panel is a sample on a fresh service's /metrics."""
    # HTTP requests are counted by route and status as they come: one makes the family exist
    with urllib.request.urlopen(serve.url + "/healthz", timeout=10) as reply:
        assert reply.status == 200
    exposed = {name for name, _ in scrape(serve.ops_url)}
    used = {name for expr in rule_expressions() + dashboard_expressions()
            for name in re.findall(r"\bsysmail_[a-z0-9_]+", expr)}
    assert len(used) >= 10
    assert used <= exposed, sorted(used - exposed)


def test_dashboard_panels_have_datasource_and_unique_ids() -> None:
    """The dashboard imports as written: ids unique, each panel on the data-source variable."""
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(panel["datasource"]["uid"] == "${datasource}" for panel in dashboard["panels"])
