"""Self-tests of the shared fixtures via smtplib/dkim/redis directly (never sysmail)."""

from __future__ import annotations

import smtplib
import socket
import ssl
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
import redis
from conftest import (
    REPO,
    Ed25519Key,
    Received,
    RedisServer,
    RsaKey,
    SmtpServer,
    dkim_dns,
    free_port,
    run_python,
)

MESSAGE = (
    b"From: Alerts <alerts@example.com>\r\n"
    b"To: ops@example.org\r\n"
    b"Subject: disk full\r\n"
    b"Date: Thu, 01 Jan 2025 00:00:00 +0000\r\n"
    b"Message-ID: <fixture-test@example.com>\r\n"
    b"\r\n"
    b"The disk is full.\r\n"
)
TO = ["ops@example.org"]


def _client(server: SmtpServer) -> smtplib.SMTP:
    """Open a plain smtplib connection to server."""
    return smtplib.SMTP(server.host, server.port, timeout=5)


def _tls_context(server: SmtpServer) -> ssl.SSLContext:
    """Client context trusting only the fixture certificate (strict X.509 checks)."""
    context = ssl.create_default_context(cafile=str(server.ca_file))
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def _ssl_client(server: SmtpServer, context: ssl.SSLContext) -> smtplib.SMTP_SSL:
    """Open an implicit-TLS smtplib connection to server."""
    return smtplib.SMTP_SSL(server.host, server.port, context=context, timeout=5)


# --------------------------------------------------------------------------- plain SMTP


def test_smtp_records_message(smtp_server: SmtpServer) -> None:
    with _client(smtp_server) as client:
        assert client.sendmail("alerts@example.com", TO, MESSAGE) == {}
    [got] = smtp_server.wait_for(1)
    assert got == Received("alerts@example.com", TO, MESSAGE)
    assert got.queue_id
    assert smtp_server.url == f"smtp+plain://127.0.0.1:{smtp_server.port}"
    assert smtp_server.connections == 1


def test_smtp_reply_carries_queue_id(smtp_server: SmtpServer) -> None:
    with _client(smtp_server) as client:
        client.ehlo()
        client.mail("alerts@example.com")
        client.rcpt(TO[0])
        code, reply = client.data(MESSAGE)
    assert code == 250
    assert reply.decode().startswith("2.0.0 Ok: queued as ")
    assert reply.decode().endswith(smtp_server.messages[0].queue_id)


def test_smtp_script_data(smtp_server: SmtpServer) -> None:
    smtp_server.sink.script_data(
        ["451 4.3.0 Try again later", None, "550 5.7.1 Rejected"]
    )
    with _client(smtp_server) as client:
        with pytest.raises(smtplib.SMTPDataError) as first:
            client.sendmail("alerts@example.com", TO, MESSAGE)
        client.sendmail("alerts@example.com", TO, MESSAGE)
        with pytest.raises(smtplib.SMTPDataError) as third:
            client.sendmail("alerts@example.com", TO, MESSAGE)
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert (first.value.smtp_code, third.value.smtp_code) == (451, 550)
    assert len(smtp_server.messages) == 2
    assert smtp_server.sink.data_attempts == 4


def test_smtp_refuse_rcpt(smtp_server: SmtpServer) -> None:
    smtp_server.sink.refuse_rcpt(
        {
            "bad@example.com": "550 5.1.1 No such user",
            "later@example.com": "450 4.2.1 Mailbox busy",
        }
    )
    rcpts = ["ok@example.com", "bad@example.com", "later@example.com"]
    with _client(smtp_server) as client:
        refused = client.sendmail("alerts@example.com", rcpts, MESSAGE)
    assert refused == {
        "bad@example.com": (550, b"5.1.1 No such user"),
        "later@example.com": (450, b"4.2.1 Mailbox busy"),
    }
    assert smtp_server.wait_for(1)[0].rcpt_tos == ["ok@example.com"]


def test_smtp_drop_next(smtp_server: SmtpServer) -> None:
    smtp_server.sink.drop_next(1)
    client = _client(smtp_server)
    with pytest.raises(smtplib.SMTPServerDisconnected):
        client.sendmail("alerts@example.com", TO, MESSAGE)
    client.close()
    assert smtp_server.messages == []
    with _client(smtp_server) as client:
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert len(smtp_server.wait_for(1)) == 1


def test_smtp_connection_reuse_counted(smtp_server: SmtpServer) -> None:
    with _client(smtp_server) as client:
        client.sendmail("alerts@example.com", TO, MESSAGE)
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert smtp_server.connections == 1
    with _client(smtp_server) as client:
        client.helo()
    assert smtp_server.connections == 2


def test_smtp_stop_start_same_port(smtp_server: SmtpServer) -> None:
    port = smtp_server.port
    idle = _client(smtp_server)
    idle.ehlo()
    smtp_server.stop()
    smtp_server.stop()
    with pytest.raises(smtplib.SMTPServerDisconnected):
        idle.noop()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((smtp_server.host, port), timeout=2)
    smtp_server.start()
    assert smtp_server.port == port
    with _client(smtp_server) as client:
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert len(smtp_server.wait_for(1)) == 1


@pytest.mark.parametrize("notice", [None, "421 4.4.2 localhost Error: timeout exceeded"],
                         ids=["silently", "with-421"])
def test_smtp_hang_up_closes_idle_connections(
    smtp_server: SmtpServer, notice: str | None
) -> None:
    idle = _client(smtp_server)
    idle.ehlo()
    assert smtp_server.sink.hang_up(notice) == 1
    if notice is not None:
        assert idle.getreply() == (421, b"4.4.2 localhost Error: timeout exceeded")
    with pytest.raises(smtplib.SMTPServerDisconnected):
        idle.noop()
    idle.close()
    assert smtp_server.sink.hang_up(notice) == 0
    with _client(smtp_server) as client:
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert len(smtp_server.wait_for(1)) == 1
    assert smtp_server.connections == 2

def test_smtp_wait_for_times_out(smtp_server: SmtpServer) -> None:
    with pytest.raises(AssertionError, match="expected >= 1 message"):
        smtp_server.wait_for(1, timeout=0.1)


def test_smtp_large_message(smtp_server: SmtpServer) -> None:
    body = b"x" * 998 + b"\r\n"
    big = MESSAGE + body * 40_000  # ~40 MB, above aiosmtpd's 32 MiB default
    with _client(smtp_server) as client:
        client.sendmail("alerts@example.com", TO, big)
    assert smtp_server.wait_for(1)[0].data == big



def test_smtp_pipelining_advertised_only_when_asked(any_smtp_server: SmtpServer) -> None:
    server = any_smtp_server
    with _client(server) as client:
        code, _ = client.ehlo("client.example")
        assert code == 250
        assert client.has_extn("pipelining") is server.sink.pipelining
        features = list(client.esmtp_features)
    extra = ["pipelining"] if server.sink.pipelining else []
    assert features == ["size", "8bitmime", "smtputf8", *extra, "help"]
    assert server.url == f"smtp+plain://127.0.0.1:{server.port}"


def test_smtp_pipelined_transaction_and_wire_log(pipelining_smtp_server: SmtpServer) -> None:
    server = pipelining_smtp_server
    server.sink.refuse_rcpt({"bad@example.com": "550 5.1.1 No such user"})
    server.sink.record_wire()
    commands = (
        b"MAIL FROM:<alerts@example.com>\r\nRCPT TO:<ops@example.org>\r\n"
        b"RCPT TO:<bad@example.com>\r\nDATA\r\n"
    )
    with _client(server) as client:
        client.ehlo("client.example")
        client.send(commands)  # one write: every command before any reply
        replies = [client.getreply() for _ in range(4)]
        client.send(MESSAGE + b".\r\n")
        final = client.getreply()
    [got] = server.wait_for(1)
    assert got == Received("alerts@example.com", TO, MESSAGE)
    assert replies == [
        (250, b"OK"),
        (250, b"2.1.5 Ok"),
        (550, b"5.1.1 No such user"),
        (354, b"End data with <CR><LF>.<CR><LF>"),
    ]
    assert final == (250, f"2.0.0 Ok: queued as {got.queue_id}".encode())
    wire = server.sink.wire
    assert wire is not None
    assert wire[0][0] == "server"
    assert wire[0][1].startswith(b"220 localhost ")
    assert wire[1:] == [
        ("client", b"ehlo client.example\r\n"),
        ("server", b"250-localhost"),
        ("server", b"250-SIZE 134217728"),
        ("server", b"250-8BITMIME"),
        ("server", b"250-SMTPUTF8"),
        ("server", b"250-PIPELINING"),
        ("server", b"250 HELP"),
        ("client", commands),
        ("server", b"250 OK"),
        ("server", b"250 2.1.5 Ok"),
        ("server", b"550 5.1.1 No such user"),
        ("server", b"354 End data with <CR><LF>.<CR><LF>"),
        ("client", MESSAGE + b".\r\n"),
        ("server", f"250 2.0.0 Ok: queued as {got.queue_id}".encode()),
        ("client", b"QUIT\r\n"),  # smtplib.SMTP.__exit__
        ("server", b"221 Bye"),
    ]
    assert server.connections == 1

# --------------------------------------------------------------------------- TLS / AUTH


def test_tls_starttls_auth(tls_smtp_server: SmtpServer) -> None:
    server = tls_smtp_server
    assert server.url == f"smtp://mailer:s3cret-pass@127.0.0.1:{server.port}"
    for mechanism in ("PLAIN", "LOGIN"):
        with _client(server) as client:
            client.starttls(context=_tls_context(server))
            client.ehlo()
            client.user, client.password = "mailer", "s3cret-pass"
            client.auth(mechanism, getattr(client, f"auth_{mechanism.lower()}"))
            client.sendmail("alerts@example.com", TO, MESSAGE)
    assert len(server.wait_for(2)) == 2
    assert server.connections == 2


def test_tls_wrong_password(tls_smtp_server: SmtpServer) -> None:
    with _client(tls_smtp_server) as client:
        client.starttls(context=_tls_context(tls_smtp_server))
        with pytest.raises(smtplib.SMTPAuthenticationError) as error:
            client.login("mailer", "wrong")
    assert error.value.smtp_code == 535


def test_tls_requires_starttls_and_auth(tls_smtp_server: SmtpServer) -> None:
    with (
        _client(tls_smtp_server) as client,
        pytest.raises(smtplib.SMTPSenderRefused) as no_tls,
    ):
        client.sendmail("alerts@example.com", TO, MESSAGE)
    with _client(tls_smtp_server) as client:
        client.starttls(context=_tls_context(tls_smtp_server))
        with pytest.raises(smtplib.SMTPSenderRefused) as no_auth:
            client.sendmail("alerts@example.com", TO, MESSAGE)
    assert (no_tls.value.smtp_code, no_auth.value.smtp_code) == (530, 530)


def test_smtps_auth(smtps_server: SmtpServer) -> None:
    assert (
        smtps_server.url == f"smtps://mailer:s3cret-pass@127.0.0.1:{smtps_server.port}"
    )
    context = _tls_context(smtps_server)
    with _ssl_client(smtps_server, context) as client:
        client.login("mailer", "s3cret-pass")
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert smtps_server.wait_for(1)[0].data == MESSAGE
    with (
        _ssl_client(smtps_server, context) as client,
        pytest.raises(smtplib.SMTPAuthenticationError),
    ):
        client.login("mailer", "nope")


def test_smtps_stop_start(smtps_server: SmtpServer) -> None:
    smtps_server.stop()
    smtps_server.start()
    context = _tls_context(smtps_server)
    with _ssl_client(smtps_server, context) as client:
        client.login("mailer", "s3cret-pass")
        client.sendmail("alerts@example.com", TO, MESSAGE)
    assert len(smtps_server.wait_for(1)) == 1


# --------------------------------------------------------------------------- DKIM


def test_key_formats(
    rsa_key: RsaKey, small_rsa_key: RsaKey, ed25519_key: Ed25519Key
) -> None:
    assert rsa_key.pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert rsa_key.pem_pkcs1.startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert rsa_key.dns_record.startswith(b"v=DKIM1; k=rsa; p=MII")
    assert (rsa_key.bits, small_rsa_key.bits) == (2048, 1024)
    assert ed25519_key.pem.startswith("-----BEGIN PRIVATE KEY-----")
    assert len(ed25519_key.seed_b64) == 44
    assert (
        ed25519_key.dns_record
        == b"v=DKIM1; k=ed25519; p=" + ed25519_key.public_b64.encode()
    )


@pytest.mark.parametrize("attr", ["pem", "pem_pkcs1"])
def test_dkim_rsa_roundtrip(rsa_key: RsaKey, attr: str) -> None:
    key = getattr(rsa_key, attr).encode()
    header = dkim.sign(MESSAGE, b"default", b"example.com", key)
    dns = dkim_dns({"default._domainkey.example.com": rsa_key.dns_record})
    assert dkim.verify(header + MESSAGE, dnsfunc=dns)
    assert not dkim.verify(header + MESSAGE.replace(b"full", b"FULL"), dnsfunc=dns)


def test_dkim_ed25519_roundtrip(ed25519_key: Ed25519Key) -> None:
    header = dkim.sign(
        MESSAGE,
        b"ed",
        b"example.com",
        ed25519_key.seed_b64.encode(),
        signature_algorithm=b"ed25519-sha256",
    )
    dns = dkim_dns({b"ed._domainkey.example.com.": ed25519_key.dns_record})
    assert dkim.verify(header + MESSAGE, dnsfunc=dns)


def test_dkim_dns_lookup_rules(rsa_key: RsaKey) -> None:
    dns = dkim_dns({"Default._domainkey.Example.com.": rsa_key.dns_record})
    for name in ("default._domainkey.example.com", b"default._domainkey.example.com."):
        assert dns(name) == rsa_key.dns_record
    assert dns(b"other._domainkey.example.com.", timeout=1) == b""
    header = dkim.sign(MESSAGE, b"other", b"example.com", rsa_key.pem.encode())
    assert not dkim.verify(header + MESSAGE, dnsfunc=dns)


# --------------------------------------------------------------------------- Redis


def test_redis_ping_stop_start(redis_server: RedisServer) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    assert client.ping()
    redis_server.stop()
    redis_server.stop()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    redis_server.start()
    assert client.ping()
    client.close()


# --------------------------------------------------------------------------- helpers


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.create_server(("127.0.0.1", port)):
        pass


def test_run_python_env_is_minimal(tmp_path: Path) -> None:
    script = tmp_path / "probe.py"
    script.write_text(
        "import os, sys\n"
        "print(sorted(os.environ), sys.argv[1:], sys.stdin.read(), os.getcwd())\n"
    )
    result = run_python(
        script, ["a", "b"], {"SYSMAIL_X": "1"}, input="hi", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    # LC_CTYPE may be added by the child interpreter itself (PEP 538 locale coercion).
    env_keys = "['PATH', 'PYTHONDONTWRITEBYTECODE', 'SYSMAIL_X']"
    output = result.stdout.replace("'LC_CTYPE', ", "").strip()
    assert output == f"{env_keys} ['a', 'b'] hi {tmp_path}"


def test_cli_runs_sysmail(cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    outcome = cli(["--help"], {}, timeout=30)
    assert outcome.args[:2] == [sys.executable, str(REPO / "sysmail.py")]
