"""DKIM signing (issues 5 and 15): what is signed, by which key, and byte for byte like dkimpy.

The list of signed headers comes from the spec, not from sysmail: DKIM rsa-sha256 (and
ed25519-sha256 with a second key), relaxed/relaxed; From, To, Subject and Message-ID are
over-signed, named twice in h= so that a copy added in transit breaks the signature (RFC 6376
section 8.15, and 5.4.2 on signing a header name once more than it occurs); Date, MIME-Version,
Content-Type and Auto-Submitted are signed; Reply-To is over-signed when SYSTEM_REPLY_TO is set.
Feedback-ID, List-Unsubscribe and List-Unsubscribe-Post (issue 12) are over-signed too: where a
message has none, the signature says so, and one added in transit breaks it.
RFC 6376 does not fix the order of h=, so it is compared as a multiset.

RSA PKCS#1 v1.5 and ed25519 are deterministic, so the fast path (canonicalization here,
the signature through `cryptography`) must give exactly the bytes of dkimpy's own `dkim.sign`
for the same second. The canonicalization shortcut is checked against dkimpy's on a few
thousand generated messages, including the odd whitespace dkimpy treats specially.
"""

from __future__ import annotations

import email
import email.policy
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import dkim
import pytest
from conftest import (
    Ed25519Key,
    RsaKey,
    SmtpServer,
    dkim_dns,
    make_ed25519_key,
    make_rsa_key,
    run_cli,
)

import sysmail

DOMAIN = "example.com"
RSA_RECORD = "default._domainkey.example.com."
ED_RECORD = "ed25519._domainkey.example.com."
RELAXED = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
# The spec's h= list, written out: over-signed names twice, the others once.
SIGNED_HEADERS = ["from", "from", "to", "to", "subject", "subject", "date",
                  "message-id", "message-id", "mime-version", "content-type", "auto-submitted",
                  "feedback-id", "feedback-id", "list-unsubscribe", "list-unsubscribe",
                  "list-unsubscribe-post", "list-unsubscribe-post"]
SIGNED_WITH_REPLY_TO = [*SIGNED_HEADERS, "reply-to", "reply-to"]
OVER_SIGNED = ["From", "To", "Subject", "Message-ID"]


@pytest.fixture(scope="module")
def other_rsa_key() -> RsaKey:
    """A second 2048-bit RSA key: the same size as the signing key, another key."""
    return make_rsa_key(2048)


@pytest.fixture(scope="module")
def other_ed25519_key() -> Ed25519Key:
    """A second ed25519 key."""
    return make_ed25519_key()


def _tags(message: bytes, index: int = 0) -> dict[str, str]:
    """The tags of the index-th DKIM-Signature header of a message, whitespace removed."""
    values = email.message_from_bytes(message, policy=email.policy.compat32).get_all(
        "DKIM-Signature") or []
    unfolded = re.sub(r"\s+", "", values[index])
    return dict(tag.partition("=")[::2] for tag in unfolded.split(";") if tag)


def _h(message: bytes, index: int = 0) -> list[str]:
    """The header names of the h= tag, lower-cased, in the order they are signed."""
    return _tags(message, index)["h"].lower().split(":")


def _add_header(message: bytes, line: bytes, where: str) -> bytes:
    """message with one header line added at the top or at the end of the header block."""
    if where == "top":
        return line + b"\r\n" + message
    return message.replace(b"\r\n\r\n", b"\r\n" + line + b"\r\n\r\n", 1)


def _message(subject: str = "Reset your password", text: str = "Hello  there,\n\nbye \n",
             html: str = "<p>Hi\t there</p>\n") -> bytes:
    config = sysmail.Config.from_env({"SYSTEM_DOMAIN": DOMAIN, "SYSTEM_FROM_NAME": "Pöstchi"})
    rendered = sysmail.Rendered(subject, text, html)
    return sysmail.build_message(config, ["ada@example.com"], rendered, "<1.a@example.com>", 0)


def _same_second(sign_both: callable) -> tuple[bytes, bytes]:
    """Run two signatures within one wall-clock second (t= is whole seconds)."""
    for _ in range(5):
        second = int(time.time())
        pair = sign_both()
        if int(time.time()) == second:
            return pair
    raise AssertionError("could not sign twice within one second")


@pytest.mark.parametrize("backend", ["openssl", "dkimpy"])
def test_rsa_signature_is_byte_identical_to_dkimpy(rsa_key: RsaKey, backend: str) -> None:
    """Both backends give exactly dkim.sign's DKIM-Signature header, and it verifies."""
    signer = sysmail.DkimSigner(DOMAIN, ("default", rsa_key.pem.encode()), backend=backend)
    message = _message()

    def sign_both() -> tuple[bytes, bytes]:
        ours = signer.sign(message)
        # dkimpy signs the same names in the same order; which names they are is checked
        # against the spec's list (the order is free: RFC 6376 section 3.5, h=)
        theirs = dkim.sign(message, b"default", DOMAIN.encode(), rsa_key.pem.encode(),
                           canonicalize=(b"relaxed", b"relaxed"),
                           include_headers=[name.encode() for name in _h(ours)])
        return ours, theirs + message

    ours, theirs = _same_second(sign_both)
    assert Counter(_h(ours)) == Counter(SIGNED_HEADERS)
    assert signer.backend == backend
    assert ours == theirs
    assert dkim.verify(ours, dnsfunc=dkim_dns({RSA_RECORD: rsa_key.dns_record}))


def test_ed25519_signature_is_byte_identical_to_dkimpy(ed25519_key: Ed25519Key) -> None:
    """The ed25519 signature through OpenSSL equals dkimpy's (PyNaCl) for the same second."""
    seed = ed25519_key.seed_b64.encode()
    signer = sysmail.DkimSigner(DOMAIN, ed25519=("ed25519", seed), backend="openssl")
    message = _message()

    def sign_both() -> tuple[bytes, bytes]:
        ours = signer.sign(message)
        theirs = dkim.sign(message, b"ed25519", DOMAIN.encode(), seed,
                           signature_algorithm=b"ed25519-sha256",
                           canonicalize=(b"relaxed", b"relaxed"),
                           include_headers=[name.encode() for name in _h(ours)])
        return ours, theirs + message

    ours, theirs = _same_second(sign_both)
    assert Counter(_h(ours)) == Counter(SIGNED_HEADERS)
    assert ours == theirs
    assert dkim.verify(ours, dnsfunc=dkim_dns({ED_RECORD: ed25519_key.dns_record}))


def test_openssl_is_chosen_when_cryptography_is_installed(rsa_key: RsaKey) -> None:
    """The default backend is OpenSSL here (CI installs the `cryptography` extra)."""
    assert sysmail.DkimSigner(DOMAIN, ("default", rsa_key.pem.encode())).backend == "openssl"


# --------------------------------------------------------------------------- what is signed


def _config(rsa_key: RsaKey, ed25519_key: Ed25519Key | None = None,
            **extra: str) -> sysmail.Config:
    env = {"SYSTEM_DOMAIN": DOMAIN, "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem, **extra}
    if ed25519_key is not None:
        env["SYSTEM_DKIM_ED25519_PRIVATE_KEY"] = ed25519_key.seed_b64
    return sysmail.Config.from_env(env)


def _signed(config: sysmail.Config) -> bytes:
    """A message built and signed by sysmail from config, as the sender signs it."""
    rendered = sysmail.Rendered("Reset your password", "Hello,\n", "<p>Hello</p>\n")
    message = sysmail.build_message(config, ["ada@example.org"], rendered,
                                    "<1.b@example.com>", time.time())
    signer = sysmail.DkimSigner.from_config(config)
    assert signer is not None
    return signer.sign(message)


def _verifies(message: bytes, dnsfunc: Callable[..., bytes], index: int = 0) -> bool:
    return bool(dkim.DKIM(message).verify(idx=index, dnsfunc=dnsfunc))


@pytest.mark.parametrize("reply_to", ["", "support@example.com"], ids=["no-reply-to", "reply-to"])
def test_mail_sent_by_the_worker_signs_the_headers_of_the_spec(
        smtp_server: SmtpServer, tmp_path: Path, rsa_key: RsaKey, reply_to: str) -> None:
    """The DKIM-Signature that reaches the relay: rsa-sha256, relaxed/relaxed, d= the From
    domain, h= exactly the spec's list (Reply-To twice only when set), and it verifies."""
    env = {"SMTP_URL": smtp_server.url, "SYSTEM_DOMAIN": DOMAIN,
           "SYSTEM_DKIM_PRIVATE_KEY": rsa_key.pem, "SYSMAIL_SPOOL": str(tmp_path / "spool"),
           **({"SYSTEM_REPLY_TO": reply_to} if reply_to else {})}
    sysmail.Mailer(sysmail.Config.from_env(env)).enqueue(
        "password-reset", to="ada@example.org", reset_url="https://example.com/r?t=1")
    result = run_cli(["worker", "--once"], env)
    assert result.returncode == 0, result.stderr
    [received] = smtp_server.messages
    data = received.data
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    assert len(parsed.get_all("DKIM-Signature")) == 1
    assert (parsed["Reply-To"] == reply_to) if reply_to else parsed["Reply-To"] is None
    tags = _tags(data)
    assert (tags["v"], tags["a"], tags["c"], tags["d"], tags["s"]) == (
        "1", "rsa-sha256", "relaxed/relaxed", DOMAIN, "default")
    assert "l" not in tags  # the whole body is signed
    expected = SIGNED_WITH_REPLY_TO if reply_to else SIGNED_HEADERS
    assert sorted(_h(data)) == sorted(expected)
    assert dkim.verify(data, dnsfunc=dkim_dns({RSA_RECORD: rsa_key.dns_record}))


def test_both_signatures_sign_the_same_spec_headers(rsa_key: RsaKey,
                                                   ed25519_key: Ed25519Key) -> None:
    """With an ed25519 key too, each of the two signatures names the spec's headers."""
    data = _signed(_config(rsa_key, ed25519_key, SYSTEM_REPLY_TO="support@example.com"))
    assert [_tags(data, i)["a"] for i in (0, 1)] == ["rsa-sha256", "ed25519-sha256"]
    for index in (0, 1):
        assert sorted(_h(data, index)) == sorted(SIGNED_WITH_REPLY_TO), index
    dns = dkim_dns({RSA_RECORD: rsa_key.dns_record, ED_RECORD: ed25519_key.dns_record})
    assert [_verifies(data, dns, i) for i in (0, 1)] == [True, True]


@pytest.mark.parametrize("where", ["top", "bottom"])
@pytest.mark.parametrize("added", [
    b"From: Mallory <mallory@example.net>",
    b"To: mallory@example.net",
    b"Subject: Please wire the money",
    b"Message-ID: <forged.1@example.net>",
    b"Reply-To: mallory@example.net",
], ids=["From", "To", "Subject", "Message-ID", "Reply-To"])
def test_a_copy_added_in_transit_breaks_both_signatures(
        rsa_key: RsaKey, ed25519_key: Ed25519Key, added: bytes, where: str) -> None:
    """Over-signing (RFC 6376 8.15): a second From/To/Subject/Message-ID (and Reply-To, when
    SYSTEM_REPLY_TO is set), above or below the real one, makes both signatures fail.

    A copy added below the real one would break even a name signed once; the copy on top is
    what only over-signing catches. dkimpy's verify counts one more From than h= names (its
    bug 644046), so for From the h= test above is what shows the over-signing."""
    data = _signed(_config(rsa_key, ed25519_key, SYSTEM_REPLY_TO="support@example.com"))
    dns = dkim_dns({RSA_RECORD: rsa_key.dns_record, ED_RECORD: ed25519_key.dns_record})
    assert [_verifies(data, dns, i) for i in (0, 1)] == [True, True]
    # a header nobody signs, added the same way, changes nothing: the failure below is the copy's
    harmless = _add_header(data, b"Received: from relay.example.net by mx.example.org", where)
    assert [_verifies(harmless, dns, i) for i in (0, 1)] == [True, True]
    forged = _add_header(data, added, where)
    assert [_verifies(forged, dns, i) for i in (0, 1)] == [False, False]


# --------------------------------------------------------------------------- which key


def test_rsa_signature_verifies_only_with_its_own_key(
        rsa_key: RsaKey, other_rsa_key: RsaKey, small_rsa_key: RsaKey) -> None:
    """Another 2048-bit key (the same size, so only the key differs) and a 1024-bit key
    published under the selector both fail; the signing key's record verifies."""
    assert rsa_key.bits == other_rsa_key.bits == 2048
    assert other_rsa_key.dns_record != rsa_key.dns_record
    data = _signed(_config(rsa_key))
    assert dkim.verify(data, dnsfunc=dkim_dns({RSA_RECORD: rsa_key.dns_record}))
    for wrong in (other_rsa_key, small_rsa_key):
        assert not dkim.verify(data, dnsfunc=dkim_dns({RSA_RECORD: wrong.dns_record})), wrong.bits
    assert not dkim.verify(data, dnsfunc=dkim_dns({}))  # no key published at all


@pytest.mark.parametrize("backend", ["openssl", "dkimpy"])
def test_ed25519_signature_verifies_only_with_its_own_key(
        ed25519_key: Ed25519Key, other_ed25519_key: Ed25519Key, backend: str) -> None:
    """Another ed25519 key published under the selector fails; the signing key verifies."""
    assert other_ed25519_key.public_b64 != ed25519_key.public_b64
    signer = sysmail.DkimSigner(DOMAIN, ed25519=("ed25519", ed25519_key.seed_b64.encode()),
                                backend=backend)
    data = signer.sign(_message())
    assert _tags(data)["a"] == "ed25519-sha256"
    assert dkim.verify(data, dnsfunc=dkim_dns({ED_RECORD: ed25519_key.dns_record}))
    assert not dkim.verify(data, dnsfunc=dkim_dns({ED_RECORD: other_ed25519_key.dns_record}))


def _ugly_text(rng: random.Random) -> str:
    pieces = ["a", " ", "\t", "\n", "b ", ".", "é", "  \n", "\n\n", " \t ", "\t\t", "\x0b", "\x0c"]
    return "".join(rng.choice(pieces) for _ in range(rng.randint(0, 200)))


def test_relaxed_canonicalization_matches_dkimpy_on_generated_messages() -> None:
    """Headers and body come out exactly as dkimpy's relaxed/relaxed, whitespace and all."""
    rng = random.Random(20261128)
    checked = 0
    for _ in range(1500):
        subject = "".join(rng.choice(["S", " ", "ü", "x" * 30, "\t", "  ", "\x0b"])
                          for _ in range(rng.randint(1, 12))).strip() or "s"
        try:
            message = _message(subject, _ugly_text(rng) or "t",
                               rng.choice(["", "<p> x </p>\n\n", "  \t ", "a \t b"]))
        except sysmail.MessageError:
            continue
        headers, body = dkim.rfc822_parse(message)
        expected = ([tuple(h) for h in RELAXED.canonicalize_headers(headers)],
                    RELAXED.canonicalize_body(body))
        fields, canonical_body = sysmail._relaxed(message, RELAXED)
        assert ([tuple(f) for f in fields], canonical_body) == expected, message[:400]
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("message", [
    b"From: a@example.com\nSubject: bare LF\n\nbody\n",
    b"From: a@example.com\r\nSubject: folded\r\n  on two lines\r\n\r\nbody  \r\n\r\n\r\n",
    b"From: a@example.com\r\n\r\n",
])
def test_unusual_messages_canonicalize_like_dkimpy(message: bytes) -> None:
    """Bare LFs, folded headers and an empty body: the same result as dkimpy's."""
    headers, body = dkim.rfc822_parse(message)
    expected = ([tuple(h) for h in RELAXED.canonicalize_headers(headers)],
                RELAXED.canonicalize_body(body))
    fields, canonical_body = sysmail._relaxed(message, RELAXED)
    assert ([tuple(f) for f in fields], canonical_body) == expected
