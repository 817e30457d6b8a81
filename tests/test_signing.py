"""DKIM signing paths (issue 5): OpenSSL and dkimpy sign byte for byte alike.

RSA PKCS#1 v1.5 and ed25519 are deterministic, so the fast path (canonicalization here,
the signature through `cryptography`) must give exactly the bytes of dkimpy's own `dkim.sign`
for the same second. The canonicalization shortcut is checked against dkimpy's on a few
thousand generated messages, including the odd whitespace dkimpy treats specially.
"""

from __future__ import annotations

import random
import time

import dkim
import pytest
from conftest import Ed25519Key, RsaKey, dkim_dns

import sysmail

DOMAIN = "example.com"
HEADERS = [h.decode() for h in sysmail._SIGNED_HEADERS]
RELAXED = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


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
        theirs = dkim.sign(message, b"default", DOMAIN.encode(), rsa_key.pem.encode(),
                           canonicalize=(b"relaxed", b"relaxed"), include_headers=HEADERS)
        return ours, theirs + message

    ours, theirs = _same_second(sign_both)
    assert signer.backend == backend
    assert ours == theirs
    assert dkim.verify(ours, dnsfunc=dkim_dns({"default._domainkey.example.com.":
                                               rsa_key.dns_record}))


def test_ed25519_signature_is_byte_identical_to_dkimpy(ed25519_key: Ed25519Key) -> None:
    """The ed25519 signature through OpenSSL equals dkimpy's (PyNaCl) for the same second."""
    seed = ed25519_key.seed_b64.encode()
    signer = sysmail.DkimSigner(DOMAIN, ed25519=("ed25519", seed), backend="openssl")
    message = _message()

    def sign_both() -> tuple[bytes, bytes]:
        theirs = dkim.sign(message, b"ed25519", DOMAIN.encode(), seed,
                           signature_algorithm=b"ed25519-sha256",
                           canonicalize=(b"relaxed", b"relaxed"), include_headers=HEADERS)
        return signer.sign(message), theirs + message

    ours, theirs = _same_second(sign_both)
    assert ours == theirs


def test_openssl_is_chosen_when_cryptography_is_installed(rsa_key: RsaKey) -> None:
    """The default backend is OpenSSL here (CI installs the `cryptography` extra)."""
    assert sysmail.DkimSigner(DOMAIN, ("default", rsa_key.pem.encode())).backend == "openssl"


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
