#!/usr/bin/env python3
"""sysmail: a platform's system emails, queued durably and sent DKIM-signed.

System emails (password resets, verifications, two-factor codes, sign-in links, security
alerts, email-change notices, billing notices, announcements, suspension notices), each in the
recipient's language (built-in English, shipped German in templates/de/), are infrastructure: configuration comes from the
environment only, mail is written atomically into a Maildir-style spool (Redis when the spool
cannot be written), and a sender delivers it over reused SMTP connections, signing each
message at send time. A small HTTP service runs the password-reset flow on a pluggable token
store (SQLite by default) and takes mail from internal callers.

Environment (see Config.from_env; every bad value is reported at once, exit 78):
@ENVIRONMENT@
Command line:
    sysmail [--env-file FILE] send --to ADDR... [--shared] --template NAME [--var KEY=VALUE ...]
        [--locale TAG]
    sysmail send --to ADDR --subject S --text T|- [--html H|-] [--urgent]
    sysmail serve | worker [--once] | status [--json] | queue [--json] | show ID [--raw]
    sysmail failed [--json] | retry ID...|--all | delete ID...|--all-failed   (ID: or Message-ID)
    sysmail dns | keygen [--type rsa|ed25519] [--out FILE] | check | preview TEMPLATE [--var ...]
        [--locale TAG]
    sysmail user add EMAIL [--name NAME] [--locale TAG] | user list [--json]
    sysmail suppressed [--json] | suppress ADDRESS [--reason R] | unsuppress ADDRESS
    sysmail bounce [--dry-run] [--json] [--recipient ADDR] < message

Contents (greppable banners, in dependency order):
    Errors, Text and address checks, DKIM keys and DNS records, Configuration, Logging and
    metrics, Messages and templates, Bounces, DKIM signing, Spool, Redis fallback, Suppression,
    Enqueueing, SMTP transport, Sender, Token store, HTTP API, Wiring, CLI
"""

from __future__ import annotations

import argparse
import base64
import bisect
import concurrent.futures
import contextlib
import csv
import ctypes
import dataclasses
import difflib
import email.header
import email.message
import email.parser
import email.policy
import email.utils
import errno
import fcntl
import functools
import getpass
import hashlib
import heapq
import hmac
import html
import http.server
import importlib
import inspect
import ipaddress
import json
import logging
import math
import os
import queue
import quopri
import random
import re
import secrets
import signal
import smtplib
import socket
import sqlite3
import ssl
import stat
import string
import subprocess
import sys
import textwrap
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol, Self

__version__ = "0.1.0"
__all__ = [
    "BULK",
    "DEFAULTS",
    "ENGLISH",
    "ENVIRONMENT",
    "LAYOUT_STRINGS",
    "SHIPPED_LANGUAGES",
    "TEMPLATES",
    "URGENT",
    "Api",
    "App",
    "BounceHandler",
    "BounceReport",
    "Catalog",
    "Claim",
    "Config",
    "ConfigError",
    "DeliveryCounts",
    "DeliveryError",
    "DkimSigner",
    "Enqueuer",
    "Envelope",
    "ForgotWorker",
    "HttpError",
    "IdempotencyKeys",
    "JsonLogFormatter",
    "Language",
    "Mailer",
    "MemoryStore",
    "MessageError",
    "Metrics",
    "OutboxTransport",
    "PermanentDeliveryError",
    "Queue",
    "QueueUnavailable",
    "Queued",
    "RateLimiter",
    "RedisQueue",
    "RedisRateLimiter",
    "RelayUnavailable",
    "Rendered",
    "Request",
    "Response",
    "RetryPolicy",
    "SendResult",
    "Sender",
    "SenderThread",
    "SmtpTransport",
    "SmtpUrl",
    "Spool",
    "SpoolError",
    "SpoolName",
    "SpooledMessage",
    "SqliteStore",
    "StoreError",
    "SuppressingBounces",
    "Suppression",
    "SuppressionList",
    "SysmailError",
    "SystemdNotifier",
    "Template",
    "TemporaryDeliveryError",
    "TokenStore",
    "Transport",
    "UnauthenticatedEntry",
    "UsageError",
    "User",
    "Verdict",
    "apply_bounce",
    "bounce_envelope_recipient",
    "build_app",
    "build_message",
    "classify_bounce",
    "classify_reply",
    "client_address",
    "environment_help",
    "hash_password",
    "json_response",
    "load_catalog",
    "load_templates",
    "log_event",
    "main",
    "make_message_id",
    "mask_address",
    "notification_envelope_sender",
    "parse_bounce",
    "parse_env_file",
    "parse_notification",
    "render",
    "store_from_config",
    "tls_context_from_config",
    "token_hash",
    "transport_from_config",
    "unsubscribe_target",
    "unsubscribe_token",
    "validate_address",
    "verify_password",
    "verp_address",
    "verp_recipient",
    "with_credentials",
]

Clock = Callable[[], float]


# ---- Errors ---- #


class SysmailError(Exception):
    """Root of every error sysmail raises on purpose."""


class ConfigError(SysmailError):
    """The configuration is invalid; `problems` lists every bad variable."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration: " + "; ".join(self.problems))


class UsageError(SysmailError):
    """The command line was used wrongly."""


class MessageError(SysmailError):
    """A message cannot be built from the input (bad address, variable, header value)."""


class SpoolError(SysmailError):
    """The spool could not be read or written."""


class UnauthenticatedEntry(SpoolError):
    """A queue entry whose MAC does not match: forged, truncated or under another key."""


class QueueUnavailable(SysmailError):
    """No queue could store the message: nothing was enqueued."""


class StoreError(SysmailError):
    """The token store could not be reached or failed."""


class DeliveryError(SysmailError):
    """The relay refused a message; the SMTP code and recipients are data."""

    def __init__(self, reason: str, smtp_code: int | None = None, reply: str = "",
                 recipients: tuple[str, ...] = ()):
        self.smtp_code = smtp_code
        self.reply = reply
        self.recipients = recipients
        super().__init__(reason)


class TemporaryDeliveryError(DeliveryError):
    """A 4xx answer: the message should be tried again later."""


class PermanentDeliveryError(DeliveryError):
    """A 5xx answer: the message will never be accepted as it is."""


class Paced(TemporaryDeliveryError):
    """No relay may take this message yet (its rate or daily quota, or it asked us to slow
    down): retry_in seconds from now, costing no attempt."""

    def __init__(self, reason: str, retry_in: float):
        self.retry_in = retry_in
        super().__init__(reason)


class RelayUnavailable(TemporaryDeliveryError):
    """The relay cannot be reached or is shutting down (refused, timeout, 421): no message's fault.

    retry_in, when set, is when a relay may be tried again (each relay keeps its backoff)."""

    retry_in: float | None = None


# ---- Text and address checks ---- #

MAX_ADDRESS_LENGTH = 254
_LOCAL_PART = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")
_DOMAIN_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_IDNA_DEVIATIONS = frozenset("\u00df\u03c2\u200c\u200d")  # IDNA 2003 and 2008 disagree
_HEADER_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f\x85\u2028\u2029]")
_WHITESPACE = re.compile(r"\s")


def _has_control_chars(value: str) -> bool:
    """True when a value holds CR, LF or NUL, which would let it forge headers."""
    return "\r" in value or "\n" in value or "\0" in value



def _is_text(value: str) -> bool:
    """True unless the string holds lone surrogates (invalid UTF-8 from a command line)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unsafe_in_header(value: str) -> bool:
    """True when text bound for a header holds a control character or anything Python's
    folding treats as a line break (VT, FF, FS..US, NEL, U+2028/9): a folded header could
    then start a forged field."""
    return _HEADER_UNSAFE.search(value) is not None



def _is_web_url(value: str) -> bool:
    """True for an absolute http(s) URL with a host and no control characters."""
    if _has_control_chars(value) or _WHITESPACE.search(value):
        return False
    try:
        parts = urllib.parse.urlsplit(value)
        return parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # a malformed [host] or a character that normalises into a delimiter
        return False



def validate_address(address: str) -> str:
    """Return a normalised address (IDNA domain); raise MessageError when it is not a plain one."""
    if not isinstance(address, str) or _has_control_chars(address):
        raise MessageError("an email address contains a line break or NUL")
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at or not _LOCAL_PART.fullmatch(local) or len(local) > 64:
        raise MessageError(f"{address[:80]!r} is not a valid email address")
    normalised = f"{local}@{_idna_domain(domain)}"
    if len(normalised) > MAX_ADDRESS_LENGTH:
        raise MessageError(f"{address[:80]!r} is longer than {MAX_ADDRESS_LENGTH} characters")
    return normalised



def _idna_domain(domain: str) -> str:
    """Return the ASCII (IDNA 2008, UTS #46) form of a domain; raise MessageError if invalid.

    The stdlib codec is IDNA 2003, which maps straße.de to the different domain strasse.de;
    the `idna` package does it right, and without it such domains are refused, not misdirected.
    """
    domain = domain.rstrip(".")
    try:
        ascii_domain = _idna_encode(domain).lower()
    except (UnicodeError, ValueError):
        raise MessageError(f"{domain[:80]!r} is not a valid domain name") from None
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or not all(_DOMAIN_LABEL.fullmatch(label) for label in labels):
        raise MessageError(f"{domain[:80]!r} is not a valid domain name")
    return ascii_domain


def _idna_encode(domain: str) -> str:
    if domain.isascii():
        return domain
    try:
        import idna
    except ImportError:
        if _IDNA_DEVIATIONS & set(domain.lower()):
            raise ValueError("needs IDNA 2008: pip install idna") from None
        return domain.encode("idna").decode("ascii")
    return idna.encode(domain, uts46=True, transitional=False).decode("ascii")


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# ---- DKIM keys and DNS records ---- #

RSA_MIN_BITS = 2048
_ED25519_PKCS8_PREFIX = bytes.fromhex("302e020100300506032b657004220420")


def _pem_bytes(text: str) -> bytes:
    """Normalise a PEM from the environment: literal \\n escapes become real line breaks."""
    return text.replace("\\n", "\n").strip().encode("ascii", "replace") + b"\n"


def _rsa_key_bits(pem: bytes) -> int:
    """Return the modulus size of a PEM RSA private key; raise ValueError when it is not one."""
    from dkim.crypto import UnparsableKeyError, parse_pem_private_key

    try:
        key = parse_pem_private_key(pem)
    except (UnparsableKeyError, ValueError, TypeError, IndexError) as exc:
        raise ValueError("not an RSA private key") from exc
    return key["modulus"].bit_length()


def _ed25519_seed(text: str) -> bytes:
    """Return the 32-byte seed of an ed25519 key given as PEM (PKCS#8) or base64 seed."""
    text = text.replace("\\n", "\n").strip()
    if "-----BEGIN" in text:
        body = "".join(line for line in text.splitlines() if not line.startswith("-----"))
        der = base64.b64decode(body, validate=False)
        if len(der) != 48 or not der.startswith(_ED25519_PKCS8_PREFIX):
            raise ValueError("not an ed25519 PKCS#8 key")
        return der[16:]
    try:
        seed = base64.b64decode(text, validate=True)
    except ValueError as exc:
        raise ValueError("not base64") from exc
    if len(seed) != 32:
        raise ValueError("not 32 bytes")
    return seed


ED25519_INSTALL_HINT = ("pip install '.[ed25519]' from a checkout, or apt install "
                        "python3-cryptography")
FAST_HINT = "pip install '.[fast]' from a checkout, or apt install python3-cryptography"


def _ed25519_library() -> str:
    """The library that signs ed25519: cryptography (OpenSSL), else PyNaCl, else ""."""
    for module, name in (("cryptography.hazmat.primitives.asymmetric.ed25519", "cryptography"),
                         ("nacl.signing", "pynacl")):
        try:
            importlib.import_module(module)
        except ImportError:
            continue
        return name
    return ""


def _txt_record(name: str, value: str) -> str:
    """A zone-file TXT record, split into 255-character strings as DNS requires."""
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    return f"{name}. IN TXT ( " + " ".join(f'"{c}"' for c in chunks) + " )"


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    length = bytes([size]) if size < 128 else (
        bytes([0x80 | ((size.bit_length() + 7) // 8)]) + size.to_bytes((size.bit_length() + 7) // 8, "big"))
    return bytes([tag]) + length + body


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _rsa_public_key_b64(pem: bytes) -> str:
    """The base64 DER SubjectPublicKeyInfo of an RSA private key, for the DKIM p= tag."""
    from dkim.crypto import parse_pem_private_key

    key = parse_pem_private_key(pem)
    rsa_public = _der(0x30, _der_int(key["modulus"]) + _der_int(key["publicExponent"]))
    algorithm = _der(0x30, _der(0x06, bytes.fromhex("2a864886f70d010101")) + _der(0x05, b""))
    return base64.b64encode(_der(0x30, algorithm + _der(0x03, b"\0" + rsa_public))).decode()


def _ed25519_public_key_b64(seed_b64: bytes) -> str:
    """The base64 raw public key of an ed25519 seed, for the DKIM p= tag."""
    seed = base64.b64decode(seed_b64)
    if _ed25519_library() == "cryptography":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        import nacl.signing

        public = nacl.signing.SigningKey(seed).verify_key.encode()
    return base64.b64encode(public).decode()


# ---- Configuration ---- #

SMTP_DEFAULT_PORTS = {"smtp": 587, "smtps": 465, "smtp+plain": 25}
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
              "error": logging.ERROR}
UNKEYED_QUEUE_KEY = hashlib.sha256(b"sysmail: no queue key configured").digest()
# quick at first (a greylisting relay wants a retry within minutes), then every 15 minutes
DEFAULT_RETRY_SCHEDULE = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 900.0)
_TRUE_WORDS = {"1", "true", "yes", "on"}
_FALSE_WORDS = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class SmtpUrl:
    """Where and how to reach the relay; the password never appears in repr or str."""

    scheme: str
    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)
    rate: float | None = None  # messages a second the relay allows (?rate=14)
    daily: int | None = None  # messages a day (?daily=50000)
    ca_file: str = ""  # this relay's CA (?ca_file=/etc/ssl/relay.pem), else SMTP_CA_FILE
    tls_verify: bool | None = None  # ?tls_verify=0 relaxes this relay's checks

    @classmethod
    def parse(cls, text: str) -> SmtpUrl:
        """Parse an SMTP_URL; raise ValueError with a reason that never contains the password."""
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError:
            raise ValueError("is not a URL like smtp://user:pass@host:587") from None
        if parts.scheme not in SMTP_DEFAULT_PORTS:
            raise ValueError("must start with smtp://, smtps:// or smtp+plain://")
        if not parts.hostname:
            raise ValueError("has no host")
        user = urllib.parse.unquote(parts.username or "")
        password = urllib.parse.unquote(parts.password or "")
        return cls(parts.scheme, parts.hostname, port or SMTP_DEFAULT_PORTS[parts.scheme],
                   user, password, **_relay_params(parts.query))

    def __str__(self) -> str:
        user = f"{self.username}:***@" if self.username else ""
        return f"{self.scheme}://{user}{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        """True when the relay is on this machine."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _relay_params(query: str) -> dict:
    """One relay's settings from its SMTP_URL query: rate= (messages a second), daily= (a
    day), ca_file= and tls_verify= (its own TLS checks); ValueError else."""
    params = dict(urllib.parse.parse_qsl(query))
    unknown = set(params) - {"rate", "daily", "ca_file", "tls_verify"}
    if unknown:
        raise ValueError(f"has an unknown parameter {min(unknown)!r} "
                         "(rate=, daily=, ca_file=, tls_verify=)")
    try:
        rate = float(params["rate"]) if "rate" in params else None
        daily = int(params["daily"]) if "daily" in params else None
    except ValueError:
        raise ValueError("rate= and daily= take positive numbers") from None
    if (rate is not None and not 0 < rate <= 10_000) or (daily is not None and daily <= 0):
        raise ValueError("rate= and daily= take positive numbers")
    if params.get("tls_verify", "1") not in ("0", "1"):
        raise ValueError("tls_verify= takes 0 or 1")
    if params.get("ca_file") and not os.path.isfile(params["ca_file"]):
        raise ValueError("ca_file= names no readable file")
    verify = None if "tls_verify" not in params else params["tls_verify"] == "1"
    return {"rate": rate, "daily": daily, "ca_file": params.get("ca_file", ""),
            "tls_verify": verify}


@dataclass(frozen=True)
class Config:
    """Everything sysmail needs, read from the environment once; secrets are hidden from repr."""

    domain: str = "localhost"
    from_addr: str = "noreply@localhost"
    from_name: str = "localhost"
    reply_to: str = ""
    dkim_selector: str = "default"
    dkim_key: bytes | None = field(default=None, repr=False)
    ed25519_selector: str = "ed25519"
    ed25519_key: bytes | None = field(default=None, repr=False)
    dashboard_url: str = ""
    smtp: SmtpUrl | None = None
    relays: tuple[SmtpUrl, ...] = ()
    smtp_tls_verify: bool = True
    smtp_ca_file: str = ""
    smtp_timeout: float = 30.0
    smtp_connections: int = 4
    senders: int = 0  # sender processes of serve and worker; 0: one per core
    spool_dir: Path = Path("spool")
    outbox_dir: Path = Path("outbox")
    templates_dir: Path | None = None
    allow_unsigned: bool = False
    code_in_subject: bool = True
    log_level: int = logging.INFO
    listen: tuple[str, int] = ("127.0.0.1", 8025)
    ops_listen: tuple[str, int] | None = ("127.0.0.1", 9025)
    public_url: str = "http://127.0.0.1:8025"
    public_url_set: bool = False
    db_path: Path = Path("sysmail.db")
    store: str = ""
    api_key: str = field(default="", repr=False)
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    reset_token_seconds: int = 3600
    forgot_client_limit: tuple[int, float] = (10, 60.0)
    forgot_address_limit: tuple[int, float] = (3, 3600.0)
    reset_client_limit: tuple[int, float] = (10, 60.0)
    redis_url: str = field(default="", repr=False)
    queue_secret: str = field(default="", repr=False)
    dead_letter_days: float = 14.0
    retry_schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    retry_schedules: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    bounce_address: str = ""  # bounces@bounce-domain: envelope senders bounces+TAG@... (VERP)
    hard_bounce_days: float = 30.0
    systemd: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Read a Config from an environment mapping; raise ConfigError naming every bad variable."""
        reader = _EnvReader(env)
        config = reader.read()
        if reader.problems:
            raise ConfigError(reader.problems)
        return config

    @property
    def signing(self) -> bool:
        """True when outgoing mail is DKIM-signed."""
        return self.dkim_key is not None or self.ed25519_key is not None

    @property
    def queue_key(self) -> bytes:
        """The key that authenticates queue entries: SYSMAIL_QUEUE_KEY's, else one derived
        from the DKIM key (so every host of a fleet shares it), else a fixed one (nothing
        is signed then: a forged entry could not pass for the brand)."""
        secret = (self.queue_secret.encode() if self.queue_secret
                  else self.dkim_key or self.ed25519_key)
        if not secret:
            return UNKEYED_QUEUE_KEY
        return hmac.new(b"sysmail queue key v1", secret, hashlib.sha256).digest()


DEFAULTS = Config()  # each default is written once, as its Config field's
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


class _EnvValues:
    """Typed values read from an environment mapping, collecting every problem instead of
    stopping: a bad value is reported and its default used."""

    def __init__(self, env: Mapping[str, str]):
        self.env = env
        self.problems: list[str] = []

    def _path(self, name: str, default: Path) -> Path:
        return Path(self.env.get(name) or default)

    def _import_path(self, name: str) -> str:
        value = self.env.get(name, "").strip()
        if value and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", value):
            self.problems.append(f"{name} must be module:attribute, like myapp.users:Store")
            return ""
        return value

    def _networks(self, name: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        items = [v.strip() for v in self.env.get(name, "").split(",") if v.strip()]
        try:
            return tuple(ipaddress.ip_network(v, strict=False) for v in items)
        except ValueError:
            self.problems.append(f"{name} must be a comma-separated list of IP addresses or CIDRs")
            return ()

    def _rate(self, name: str, default: tuple[int, float]) -> tuple[int, float]:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        count, _, seconds = value.partition("/")
        if not (count.isdigit() and seconds.isdigit() and int(count) > 0 and int(seconds) > 0):
            self.problems.append(f"{name} must be COUNT/SECONDS, like 10/60")
            return default
        return (int(count), float(seconds))

    def _address(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        try:
            return validate_address(value)
        except MessageError:
            self.problems.append(f"{name} is not a valid email address")
            return default

    def _header_text(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip() or default
        if _unsafe_in_header(value):
            self.problems.append(f"{name} contains a line break or a control character")
            return default
        return value

    def _selector(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip() or default
        if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,62})", value):
            self.problems.append(f"{name} must be letters, digits, dots, '-' or '_'")
            return default
        return value

    def _url(self, name: str) -> str:
        value = self.env.get(name, "").strip().rstrip("/")
        if value and not _is_web_url(value):
            self.problems.append(f"{name} must be an http:// or https:// URL")
            return ""
        return value

    def _bool(self, name: str, default: bool) -> bool:
        value = self.env.get(name)
        if value is None:
            return default
        word = value.strip().lower()
        if word in _TRUE_WORDS or word in _FALSE_WORDS:
            return word in _TRUE_WORDS
        self.problems.append(f"{name} must be 1 or 0")
        return default

    def _positive(self, name: str, default: float, unit: str = "seconds") -> float:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if number <= 0:
            self.problems.append(f"{name} must be a positive number of {unit}")
            return default
        return number

    def _schedule(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        """A retry schedule: comma-separated delays in seconds, or with m or h."""
        value = self.env.get(name, "").strip()
        if not value:
            return default
        units = {"s": 1, "m": 60, "h": 3600}
        try:
            steps = tuple(float(step[:-1]) * units[step[-1]] if step[-1] in units
                          else float(step) for step in (v.strip() for v in value.split(",")))
        except (ValueError, IndexError):
            steps = ()
        if not steps or not all(0 < step <= 86400 for step in steps):
            self.problems.append(f"{name} must be delays like 1,2,4,8,15m (each up to 24h)")
            return default
        return steps

    def _count(self, name: str, default: int, maximum: int) -> int:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        if not re.fullmatch(r"[0-9]{1,3}", value) or not 1 <= int(value) <= maximum:
            self.problems.append(f"{name} must be a whole number from 1 to {maximum}")
            return default
        return int(value)

    def _file(self, name: str) -> str:
        value = self.env.get(name, "").strip()
        if value and not os.path.isfile(value):
            self.problems.append(f"{name} names no readable file")
            return ""
        return value

    def _folder(self, name: str) -> Path | None:
        value = self.env.get(name, "").strip()
        if value and not os.path.isdir(value):
            self.problems.append(f"{name} names no folder")
            return None
        return Path(value) if value else None


class _EnvReader(_EnvValues):
    """Reads a Config from a mapping: the values, and the rules that tie them together."""

    def read(self) -> Config:
        relays = self._relays()
        smtp = relays[0] if relays else None
        domain = self._domain(required=smtp is not None)
        from_addr = self._address("SYSTEM_FROM", f"noreply@{domain}")
        listen = self._listen("SYSMAIL_LISTEN", DEFAULTS.listen)
        public = self._url("SYSMAIL_PUBLIC_URL")
        config = Config(
            domain=domain,
            from_addr=from_addr,
            from_name=self._header_text("SYSTEM_FROM_NAME", domain),
            reply_to=self._address("SYSTEM_REPLY_TO", ""),
            dkim_selector=self._selector("SYSTEM_DKIM_SELECTOR", DEFAULTS.dkim_selector),
            dkim_key=self._rsa_key(),
            ed25519_selector=self._selector("SYSTEM_DKIM_ED25519_SELECTOR",
                                            DEFAULTS.ed25519_selector),
            ed25519_key=self._ed25519_key(),
            dashboard_url=self._url("DASHBOARD_URL"),
            smtp=smtp,
            relays=relays,
            smtp_tls_verify=self._bool("SMTP_TLS_VERIFY", DEFAULTS.smtp_tls_verify),
            smtp_ca_file=self._file("SMTP_CA_FILE"),
            smtp_timeout=self._positive("SMTP_TIMEOUT_SECONDS", DEFAULTS.smtp_timeout),
            smtp_connections=self._count("SYSMAIL_SMTP_CONNECTIONS", DEFAULTS.smtp_connections, 64),
            senders=self._count("SYSMAIL_SENDERS", DEFAULTS.senders, 64),
            spool_dir=self._path("SYSMAIL_SPOOL", DEFAULTS.spool_dir),
            outbox_dir=self._path("SYSMAIL_OUTBOX", DEFAULTS.outbox_dir),
            templates_dir=self._folder("SYSMAIL_TEMPLATES"),
            allow_unsigned=self._bool("SYSMAIL_ALLOW_UNSIGNED", DEFAULTS.allow_unsigned),
            code_in_subject=self._bool("SYSMAIL_CODE_IN_SUBJECT", DEFAULTS.code_in_subject),
            log_level=self._log_level(),
            listen=listen,
            ops_listen=self._ops_listen(),
            public_url=public or f"http://{_url_host(listen[0])}:{listen[1]}",
            public_url_set=bool(public),
            db_path=self._path("SYSMAIL_DB", DEFAULTS.db_path),
            store=self._import_path("SYSMAIL_STORE"),
            api_key=self._api_key(),
            trusted_proxies=self._networks("SYSMAIL_TRUSTED_PROXIES"),
            reset_token_seconds=int(self._positive("SYSMAIL_RESET_TOKEN_SECONDS",
                                                   DEFAULTS.reset_token_seconds)),
            forgot_client_limit=self._rate("SYSMAIL_FORGOT_LIMIT_PER_CLIENT",
                                           DEFAULTS.forgot_client_limit),
            forgot_address_limit=self._rate("SYSMAIL_FORGOT_LIMIT_PER_ADDRESS",
                                            DEFAULTS.forgot_address_limit),
            reset_client_limit=self._rate("SYSMAIL_RESET_LIMIT_PER_CLIENT",
                                          DEFAULTS.reset_client_limit),
            redis_url=self._redis_url(),
            queue_secret=self._queue_secret(),
            dead_letter_days=self._positive("SYSMAIL_DEAD_LETTER_DAYS",
                                            DEFAULTS.dead_letter_days, "days"),
            retry_schedule=self._schedule("SYSMAIL_RETRY_SCHEDULE", DEFAULTS.retry_schedule),
            retry_schedules=self._kind_schedules(),
            bounce_address=self._bounce_address(),
            hard_bounce_days=self._positive("SYSMAIL_HARD_BOUNCE_DAYS",
                                            DEFAULTS.hard_bounce_days, "days"),
            systemd={k: v for k, v in self.env.items() if k in SYSTEMD_VARIABLES},
        )
        if smtp and not config.signing and not config.allow_unsigned:
            self.problems.append("SYSTEM_DKIM_PRIVATE_KEY is required with a real SMTP_URL "
                                 "(or set SYSMAIL_ALLOW_UNSIGNED=1 to send unsigned mail)")
        return config

    def _kind_schedules(self) -> dict[str, tuple[float, ...]]:
        """SYSMAIL_RETRY_SCHEDULE_<KIND> for a kind of mail: PASSWORD_RESET, ADHOC..."""
        schedules = {}
        for name in self.env:
            if name.startswith("SYSMAIL_RETRY_SCHEDULE_"):
                kind = name.removeprefix("SYSMAIL_RETRY_SCHEDULE_").lower().replace("_", "-")
                schedules["" if kind == "adhoc" else kind] = self._schedule(name, ())
        return schedules

    def _queue_secret(self) -> str:
        value = self.env.get("SYSMAIL_QUEUE_KEY", "").strip()
        if value and len(value) < 32:
            self.problems.append("SYSMAIL_QUEUE_KEY must be at least 32 characters "
                                 "(openssl rand -base64 32)")
            return ""
        return value

    def _bounce_address(self) -> str:
        """SYSMAIL_BOUNCE_DOMAIN: a domain (bounces@ it) or a whole address whose local part
        takes the +TAG; "" when unset."""
        value = self.env.get("SYSMAIL_BOUNCE_DOMAIN", "").strip()
        address = value if "@" in value else f"bounces@{value}"
        try:
            address = validate_address(address) if value else ""
        except MessageError:
            self.problems.append("SYSMAIL_BOUNCE_DOMAIN must be a domain or an email address")
            return ""
        if "+" in address.partition("@")[0] or len(address.partition("@")[0]) > 30:
            self.problems.append("SYSMAIL_BOUNCE_DOMAIN's local part must be at most 30 "
                                 "characters without '+' (the tag follows a '+')")
            return ""
        return address

    def _api_key(self) -> str:
        api_key = self.env.get("SYSMAIL_API_KEY", "").strip()
        if api_key and len(api_key) < 16:
            self.problems.append("SYSMAIL_API_KEY must be at least 16 characters")
        return api_key

    def _redis_url(self) -> str:
        value = self.env.get("REDIS_URL", "").strip()
        if not value:
            return ""
        if urllib.parse.urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            self.problems.append("REDIS_URL must start with redis://, rediss:// or unix://")
            return ""
        try:
            import redis  # noqa: F401
        except ImportError:
            self.problems.append("REDIS_URL needs the redis package: pip install redis")
            return ""
        return value

    def _listen(self, name: str, default: tuple[str, int]) -> tuple[str, int]:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        host, _, port = value.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit() or int(port) > 65535:
            self.problems.append(f"{name} must be HOST:PORT, like 127.0.0.1:8025")
            return default
        return (host, int(port))

    def _ops_listen(self) -> tuple[str, int] | None:
        if self.env.get("SYSMAIL_METRICS_LISTEN", "").strip().lower() == "off":
            return None
        return self._listen("SYSMAIL_METRICS_LISTEN", DEFAULTS.ops_listen)

    def _relays(self) -> tuple[SmtpUrl, ...]:
        """SMTP_URL: one relay, or several in order of preference, comma-separated."""
        texts = [t.strip() for t in self.env.get("SMTP_URL", "").split(",") if t.strip()]
        relays = tuple(url for text in texts if (url := self._smtp_url(text)) is not None)
        return relays if len(relays) == len(texts) else ()

    def _smtp_url(self, text: str) -> SmtpUrl | None:
        try:
            url = SmtpUrl.parse(text)
        except ValueError as exc:
            self.problems.append(f"SMTP_URL {exc}")
            return None
        if url.scheme == "smtp+plain" and url.username and not url.is_loopback:
            self.problems.append("SMTP_URL sends a password without TLS to a remote host: "
                                 "use smtp:// (STARTTLS) or smtps://")
        return url

    def _domain(self, required: bool) -> str:
        domain = self.env.get("SYSTEM_DOMAIN", "").strip().lower()
        if not domain:
            if required:
                self.problems.append("SYSTEM_DOMAIN is required when SMTP_URL is set")
            return "localhost"
        try:
            return _idna_domain(domain)
        except MessageError:
            self.problems.append("SYSTEM_DOMAIN is not a valid domain name")
            return "localhost"

    def _rsa_key(self) -> bytes | None:
        text = self.env.get("SYSTEM_DKIM_PRIVATE_KEY", "").strip()
        if not text:
            return None
        try:
            bits = _rsa_key_bits(_pem_bytes(text))
        except ValueError:
            self.problems.append("SYSTEM_DKIM_PRIVATE_KEY is not a PEM RSA private key")
            return None
        if bits < RSA_MIN_BITS:
            self.problems.append(f"SYSTEM_DKIM_PRIVATE_KEY has {bits} bits; "
                                 f"at least {RSA_MIN_BITS} are required")
            return None
        return _pem_bytes(text)

    def _ed25519_key(self) -> bytes | None:
        text = self.env.get("SYSTEM_DKIM_ED25519_PRIVATE_KEY", "").strip()
        if not text:
            return None
        try:
            seed = _ed25519_seed(text)
        except ValueError:
            self.problems.append("SYSTEM_DKIM_ED25519_PRIVATE_KEY is neither a PEM ed25519 key "
                                 "nor the base64 of a 32-byte seed")
            return None
        if not _ed25519_library():
            self.problems.append("SYSTEM_DKIM_ED25519_PRIVATE_KEY needs the cryptography "
                                 f"package (or PyNaCl): {ED25519_INSTALL_HINT}")
            return None
        return base64.b64encode(seed)

    def _log_level(self) -> int:
        value = self.env.get("SYSMAIL_LOG_LEVEL", "").strip().lower()
        if value and value not in LOG_LEVELS:
            self.problems.append("SYSMAIL_LOG_LEVEL must be debug, info, warning or error")
        return LOG_LEVELS.get(value, DEFAULTS.log_level)


ENVIRONMENT: tuple[tuple[str, str, str], ...] = (
    # variable, the Config field whose default applies ("" for none), what it is
    ("SYSTEM_DOMAIN", "domain", "brand domain (required with SMTP_URL)"),
    ("SYSTEM_FROM", "", "sender address (noreply@$SYSTEM_DOMAIN)"),
    ("SYSTEM_FROM_NAME", "", "sender display name ($SYSTEM_DOMAIN)"),
    ("SYSTEM_REPLY_TO", "", "optional Reply-To address"),
    ("SYSTEM_DKIM_SELECTOR", "dkim_selector", "RSA selector"),
    ("SYSTEM_DKIM_PRIVATE_KEY", "", "PEM RSA key, 2048 bits or more (literal \\n accepted)"),
    ("SYSTEM_DKIM_ED25519_SELECTOR", "ed25519_selector", "selector of the ed25519 key"),
    ("SYSTEM_DKIM_ED25519_PRIVATE_KEY", "", "optional ed25519 key: PEM or base64 seed"),
    ("DASHBOARD_URL", "", "base of the links in account mails"),
    ("SMTP_URL", "", ("smtp://user:pass@host:587 (STARTTLS), smtps://host:465 or "
                      "smtp+plain://127.0.0.1:25 (loopback only); several, comma-separated, in "
                      "order; per relay ?rate=&daily=&ca_file=&tls_verify=; unset: .eml files "
                      "in the outbox")),
    ("SMTP_TLS_VERIFY", "smtp_tls_verify", "0 relaxes the relay's certificate checks"),
    ("SMTP_CA_FILE", "", "a private CA to trust for the relay"),
    ("SMTP_TIMEOUT_SECONDS", "smtp_timeout", "socket timeout for the relay"),
    ("SYSMAIL_SMTP_CONNECTIONS", "smtp_connections", "SMTP connections a sender uses at once"),
    ("SYSMAIL_SENDERS", "", "sender processes of serve and worker (one per core)"),
    ("SYSMAIL_SPOOL", "spool_dir", "the spool folder"),
    ("SYSMAIL_OUTBOX", "outbox_dir", "where .eml files go without SMTP_URL"),
    ("SYSMAIL_DEAD_LETTER_DAYS", "dead_letter_days", "how long dead letters are kept"),
    ("SYSMAIL_RETRY_SCHEDULE", "retry_schedule", ("delays after each temporary failure; the "
                                                  "last repeats until the deliver-by time "
                                                  "(SYSMAIL_RETRY_SCHEDULE_<KIND> for one "
                                                  "kind)")),
    ("SYSMAIL_BOUNCE_DOMAIN", "", ("domain (or address) that receives bounces: each message's "
                                   "envelope sender becomes bounces+TAG@it (off: From)")),
    ("SYSMAIL_HARD_BOUNCE_DAYS", "hard_bounce_days", "how long a hard bounce suppresses"),
    ("SYSMAIL_TEMPLATES", "", ("folder of NAME.subject / NAME.txt / NAME.html overrides; "
                               "a subfolder per locale (de, fr-CA) for other languages")),
    ("SYSMAIL_CODE_IN_SUBJECT", "code_in_subject", ("1 puts the two-factor code in the subject "
                                                    "(shown on lock screens), 0 leaves it out")),
    ("SYSMAIL_ALLOW_UNSIGNED", "allow_unsigned", "1 allows a real relay without a DKIM key"),
    ("SYSMAIL_LOG_LEVEL", "log_level", "debug, info, warning or error"),
    ("REDIS_URL", "", "fallback queue (and shared rate limits) in Redis"),
    ("SYSMAIL_LISTEN", "listen", "the HTTP service's address"),
    ("SYSMAIL_METRICS_LISTEN", "ops_listen", ("/metrics and detailed health checks, apart from "
                                               "the public API (off: none)")),
    ("SYSMAIL_PUBLIC_URL", "", "public base URL of the reset page (the listen address)"),
    ("SYSMAIL_DB", "db_path", "the SQLite token store"),
    ("SYSMAIL_STORE", "", "module:attribute of another token store (class or factory)"),
    ("SYSMAIL_API_KEY", "", "bearer key of POST /v1/emails (the route is off when unset)"),
    ("SYSMAIL_QUEUE_KEY", "", ("authenticates queue entries (derived from the DKIM key when "
                               "unset); 32 characters or more")),
    ("SYSMAIL_TRUSTED_PROXIES", "", "proxies whose X-Forwarded-For is believed (IPs, CIDRs)"),
    ("SYSMAIL_RESET_TOKEN_SECONDS", "reset_token_seconds", "reset link lifetime"),
    ("SYSMAIL_FORGOT_LIMIT_PER_CLIENT", "forgot_client_limit", "COUNT/SECONDS"),
    ("SYSMAIL_FORGOT_LIMIT_PER_ADDRESS", "forgot_address_limit", "COUNT/SECONDS"),
    ("SYSMAIL_RESET_LIMIT_PER_CLIENT", "reset_client_limit", "COUNT/SECONDS"),
    ("CREDENTIALS_DIRECTORY", "", ("systemd credentials dkim.pem, dkim-ed25519.pem, smtp-url "
                                   "and api-key (they win over the variables)")),
)


def environment_help() -> str:
    """The environment variables, what each is and its default: for --help and __doc__."""
    lines = []
    for variable, field_name, text in ENVIRONMENT:
        if field_name:
            text += f" (default {_shown_default(field_name, getattr(DEFAULTS, field_name))})"
        lines += textwrap.wrap(text, 96, initial_indent=f"    {variable:33} ",
                               subsequent_indent=" " * 38)
    return "\n".join(lines)


def lookalike_variables(env: Mapping[str, str]) -> list[str]:
    """Warnings for variables that look like sysmail's but are not (SYSTEM_DOMIAN): a typo
    there would otherwise leave a setting at its default without a word."""
    names = [variable for variable, _, _ in ENVIRONMENT]
    warnings = []
    for key in sorted(set(env) - set(names)):
        if key.startswith("SYSMAIL_RETRY_SCHEDULE_"):
            continue  # per kind; Config reports a kind that does not exist
        guess = difflib.get_close_matches(key, names, n=1, cutoff=0.85)
        if guess:
            warnings.append(f"{key} is not a sysmail variable: did you mean {guess[0]}?")
        elif key.startswith(("SYSMAIL_", "SYSTEM_")):
            warnings.append(f"{key} is not a sysmail variable (sysmail --help lists them)")
    return warnings


def _shown_default(name: str, value: object) -> str:
    if name == "log_level":
        return logging.getLevelName(value).lower()
    if name == "retry_schedule":
        return ",".join(f"{step:g}" for step in value)
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, tuple) and isinstance(value[0], str):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, tuple):
        return f"{value[0]}/{value[1]:g}"
    return f"{value:g}" if isinstance(value, float) else str(value)


__doc__ = __doc__.replace("@ENVIRONMENT@", environment_help())


CREDENTIAL_FILES = {"dkim.pem": "SYSTEM_DKIM_PRIVATE_KEY",
                    "dkim-ed25519.pem": "SYSTEM_DKIM_ED25519_PRIVATE_KEY",
                    "smtp-url": "SMTP_URL", "api-key": "SYSMAIL_API_KEY",
                    "queue-key": "SYSMAIL_QUEUE_KEY"}


def with_credentials(env: Mapping[str, str]) -> dict[str, str]:
    """env plus the systemd credentials in $CREDENTIALS_DIRECTORY (LoadCredential=), which win:
    dkim.pem, dkim-ed25519.pem, smtp-url and api-key."""
    merged = dict(env)
    folder = env.get("CREDENTIALS_DIRECTORY")
    if not folder:
        return merged
    for name, variable in CREDENTIAL_FILES.items():
        try:
            merged[variable] = (Path(folder) / name).read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError):
            raise ConfigError([f"the credential {name} cannot be read"]) from None
    return merged


def parse_env_file(text: str) -> dict[str, str]:
    """Parse systemd EnvironmentFile syntax: KEY=VALUE lines, # or ; comments, quotes, \\ joins."""
    result: dict[str, str] = {}
    for number, line in enumerate(_env_file_lines(text), start=1):
        key, sep, raw = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ConfigError([f"env file entry {number} is not KEY=VALUE"])
        result[key] = _unquote_env_value(raw.strip())
    return result


def _env_file_lines(text: str) -> Iterator[str]:
    """Yield logical lines: comments dropped, quoted values and trailing backslashes joined."""
    pending, joiner = "", ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip()[:1] in ("#", ";")):
            continue
        pending = f"{pending}{joiner}{line}" if pending else line
        if pending.endswith("\\") and not pending.endswith("\\\\"):
            pending, joiner = pending[:-1], ""  # a continuation drops the line break
            continue
        if _open_quote(pending):
            joiner = "\n"  # a quoted value keeps its line breaks
            continue
        yield pending
        pending, joiner = "", ""
    if pending:
        yield pending


def _open_quote(line: str) -> bool:
    """True when the value part of a line opens a quote it does not close."""
    value = line.partition("=")[2].lstrip()
    if value[:1] not in ("'", '"'):
        return False
    quote, body = value[0], value[1:]
    if quote == '"':
        body = re.sub(r"\\.", "", body)
    return quote not in body


def _unquote_env_value(raw: str) -> str:
    """Strip quotes from an env-file value, undoing backslash escapes inside double quotes."""
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        return re.sub(r'\\([\\"`$])', r"\1", raw[1:-1])
    return raw


# ---- Logging and metrics ---- #

_log = logging.getLogger("sysmail")
_log.addHandler(logging.NullHandler())


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line: time, level, event, and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _iso_time(record.created), "level": record.levelname.lower(),
                 "event": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = "".join(traceback.format_exception(*record.exc_info))
        return json.dumps(entry, default=str)


def log_event(level: int, event: str, **fields: object) -> None:
    """Log one structured event; callers pass only fields that are safe to keep."""
    _log.log(level, event, extra={"fields": fields})


def _iso_time(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class Metrics:
    """Counters and the delivery-latency histogram, rendered in the Prometheus text format.

    Every series an alert may watch exists from the start at 0 (a rate() over a series that
    appears with its first event misses that event, and an absent series alerts nobody).
    """

    LATENCY_BUCKETS_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                               30.0, 60.0, 300.0)
    HELP: Mapping[str, str] = {
        "sysmail_messages_total": "Messages by delivery outcome.",
        "sysmail_enqueued_total": "Messages queued, by storage backend.",
        "sysmail_http_requests_total": "HTTP requests by route and status.",
        "sysmail_rate_limited_total": "Requests refused by a rate limit, by limit.",
        "sysmail_relay_replies_total": "Final replies per relay: 2xx, 4xx or 5xx.",
        "sysmail_unrecorded_total": "Partly delivered messages whose rest the queue could not "
                                    "record at once (kept in memory, retried).",
        "sysmail_suppressed_total": "Messages not sent to a suppressed address, by kind of mail.",
        "sysmail_bounces_total": "Bounces, complaints and auto-replies received (source=report) "
                                 "and refusals at RCPT TO (source=rcpt), by kind.",
    }
    SERIES_AT_START: tuple[tuple[str, Mapping[str, str]], ...] = (
        *(("sysmail_messages_total", {"outcome": outcome})
          for outcome in ("sent", "deferred", "failed", "expired")),
        *(("sysmail_enqueued_total", {"backend": backend}) for backend in ("spool", "redis")),
        *(("sysmail_rate_limited_total", {"limit": limit})
          for limit in ("forgot_client", "forgot_address", "reset_client")),
        ("sysmail_unrecorded_total", {}),
        *(("sysmail_bounces_total", {"kind": kind, "source": "report"})
          for kind in ("hard", "soft", "complaint")),
        *(("sysmail_bounces_total", {"kind": kind, "source": "rcpt"}) for kind in ("hard", "soft")),
    )

    def __init__(self, build_info: Mapping[str, str] | None = None) -> None:
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._buckets = [0] * len(self.LATENCY_BUCKETS_SECONDS)
        self._latency_sum = 0.0
        self._latency_count = 0
        self._sent_hours: dict[int, int] = {}
        self.build_info = dict(build_info or {})
        self.peers: Path | None = None  # where this process's sender processes publish
        self.publish_path: Path | None = None  # where this sender process publishes
        self._published = 0.0
        for name, labels in self.SERIES_AT_START:
            self.declare(name, **labels)

    def declare(self, name: str, **labels: str) -> None:
        """Make a labelled counter exist, at 0 until its first event."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters.setdefault(key, 0)

    def count_sent(self, now: float) -> None:
        """Count a delivered message in its hour, for the 24-hour bounce and complaint rates."""
        hour = int(now // 3600)
        with self._lock:
            self._sent_hours[hour] = self._sent_hours.get(hour, 0) + 1
            for old in [h for h in self._sent_hours if h <= hour - 24]:
                del self._sent_hours[old]

    def sent_last_24h(self, now: float) -> int:
        """Messages this process delivered in the last 24 hours (24 hourly buckets)."""
        with self._lock:
            return sum(n for h, n in self._sent_hours.items() if h > now // 3600 - 24)

    def inc(self, name: str, **labels: str) -> None:
        """Add one to a labelled counter."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + 1

    def observe_latency(self, seconds: float) -> None:
        """Record one enqueue-to-250 latency."""
        with self._lock:
            for index, bound in enumerate(self.LATENCY_BUCKETS_SECONDS):
                if seconds <= bound:
                    self._buckets[index] += 1
            self._latency_sum += seconds
            self._latency_count += 1

    def snapshot(self) -> dict:
        """These counts as JSON, for the process that serves /metrics."""
        with self._lock:
            return {"counters": [[name, labels, value]
                                 for (name, labels), value in self._counters.items()],
                    "buckets": list(self._buckets), "sum": self._latency_sum,
                    "count": self._latency_count, "sent_hours": list(self._sent_hours.items())}

    def absorb(self, snapshot: dict) -> None:
        """Add another process's snapshot to these counts."""
        with self._lock:
            for name, labels, value in snapshot["counters"]:
                key = (str(name), tuple((str(k), str(v)) for k, v in labels))
                self._counters[key] = self._counters.get(key, 0) + int(value)
            self._buckets = [a + int(b) for a, b in
                             zip(self._buckets, snapshot["buckets"], strict=True)]
            self._latency_sum += float(snapshot["sum"])
            self._latency_count += int(snapshot["count"])
            for hour, count in snapshot["sent_hours"]:
                self._sent_hours[int(hour)] = self._sent_hours.get(int(hour), 0) + int(count)

    def publish_if_due(self, now: float) -> None:
        """In a sender process of serve or worker: write the snapshot for the parent's
        /metrics, at most once a second (a rename, no fsync: counts, not mail)."""
        if self.publish_path is None or now - self._published < 1.0:
            return
        self._published = now
        with contextlib.suppress(OSError):
            self.publish_path.parent.mkdir(mode=0o700, exist_ok=True)
            tmp = self.publish_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()), encoding="utf-8")
            os.replace(tmp, self.publish_path)

    def with_peers(self) -> Metrics:
        """These counts plus those this process's sender processes published (self alone
        when it has none): the whole service's /metrics."""
        if self.peers is None:
            return self
        view = Metrics(self.build_info)
        view.absorb(self.snapshot())
        for path in sorted(self.peers.glob("*.json")):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                view.absorb(json.loads(path.read_text(encoding="utf-8")))
        return view

    def render(self, gauges: Mapping[str, tuple[str, Mapping[str, str], float]]) -> str:
        """The exposition text: build info, the given gauges (name -> help, labels, value), then
        the counters."""
        info = {"sysmail_build_info": ("Always 1: the version and signing backend running.",
                                       self.build_info, 1)}
        lines: list[str] = []
        for name, (help_text, labels, value) in {**info, **gauges}.items():
            family = name.split("{")[0]
            if f"# TYPE {family} gauge" not in lines:
                lines += [f"# HELP {family} {help_text}", f"# TYPE {family} gauge"]
            lines.append(f"{family}{_labels(labels)} {value:g}")
        with self._lock:
            lines += self._render_counters() + self._render_histogram()
        return "\n".join(lines) + "\n"

    def _render_counters(self) -> list[str]:
        lines = []
        for family, help_text in self.HELP.items():
            lines += [f"# HELP {family} {help_text}", f"# TYPE {family} counter"]
            lines += [f"{family}{_labels(dict(labels))} {value}"
                      for (name, labels), value in sorted(self._counters.items())
                      if name == family]
        return lines

    def _render_histogram(self) -> list[str]:
        family = "sysmail_delivery_latency_seconds"
        lines = [f"# HELP {family} Seconds from enqueue to the relay's 250.",
                 f"# TYPE {family} histogram"]
        lines += [f'{family}_bucket{{le="{bound:g}"}} {count}'
                  for bound, count in zip(self.LATENCY_BUCKETS_SECONDS, self._buckets, strict=True)]
        lines += [f'{family}_bucket{{le="+Inf"}} {self._latency_count}',
                  f"{family}_sum {self._latency_sum:.6f}", f"{family}_count {self._latency_count}"]
        return lines


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    escaped = (f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
               for k, v in sorted(labels.items()))
    return "{" + ",".join(escaped) + "}"


# ---- Messages and templates ---- #

URGENT, BULK = 0, 1
PRIORITY_NAMES = {URGENT: "urgent", BULK: "bulk"}
DAY_SECONDS = 86400
ADHOC_TTL_SECONDS = 3 * DAY_SECONDS
MAX_LINE_CHARS = 998
MAX_RECIPIENTS = 50

_HTML_LAYOUT = """<!DOCTYPE html>
<html lang="${_lang}" dir="${_dir}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<meta name="supported-color-schemes" content="light dark">
<title>${_subject}</title>
<style>
:root { color-scheme: light dark; supported-color-schemes: light dark; }
@media (prefers-color-scheme: dark) {
  .page { background-color: #111827 !important; }
  .card { background-color: #1f2937 !important; }
  .brand, .code { color: #f9fafb !important; }
  .text { color: #e5e7eb !important; }
  .muted { color: #9ca3af !important; border-color: #374151 !important; }
  .link { color: #93c5fd !important; }
  .button { background-color: #2563eb !important; color: #ffffff !important; }
}
</style>
</head>
<body class="page" style="margin:0;padding:0;background-color:#f4f5f7;">
<table class="page" role="presentation" width="100%" cellpadding="0" cellspacing="0" border="0" style="background-color:#f4f5f7;">
<tr><td align="center" style="padding:24px 12px;">
<table class="card" role="presentation" width="560" cellpadding="0" cellspacing="0" border="0" style="max-width:560px;width:100%;background-color:#ffffff;border-radius:8px;">
<tr><td class="brand" style="padding:24px 32px 0 32px;font-family:Helvetica,Arial,sans-serif;font-size:18px;font-weight:bold;color:#111827;">${brand}</td></tr>
<tr><td class="text" style="padding:16px 32px 24px 32px;font-family:Helvetica,Arial,sans-serif;font-size:15px;line-height:24px;color:#374151;">
@BODY@
</td></tr>
<tr><td class="muted" style="padding:16px 32px 24px 32px;border-top:1px solid #e5e7eb;font-family:Helvetica,Arial,sans-serif;font-size:12px;line-height:18px;color:#6b7280;">${_footer}</td></tr>
</table>
</td></tr>
</table>
</body>
</html>
"""
_BUTTON = ('<p style="margin:24px 0 8px 0;"><a class="button" href="${%s}" style="display:inline-block;'
           'padding:12px 20px;background-color:#2563eb;color:#ffffff;text-decoration:none;'
           'border-radius:6px;font-weight:bold;">%s</a></p>\n'
           '<p class="muted" style="margin:0 0 16px 0;font-size:13px;color:#6b7280;">${_link_hint}'
           '<br><a class="link" href="${%s}" style="color:#2563eb;word-break:break-all;">${%s}'
           '</a></p>')
_CODE = ('<p class="code" style="margin:16px 0;font-family:Menlo,Consolas,monospace;font-size:28px;'
         'letter-spacing:4px;font-weight:bold;color:#111827;">%s</p>')
_BUTTON_LINE = re.compile(r"(?P<label>[^:]+): \$\{(?P<var>\w+_url)\}")
RTL_LANGUAGES = frozenset({"ar", "dv", "fa", "he", "ps", "ur", "yi"})
LAYOUT_STRINGS = {  # the layout's own words in English; a language's strings.json translates them
    "footer": "This is an automated message from ${brand} (${domain}). Replies to this address "
              "are not read.",
    "footer_reply": "This is an automated message from ${brand} (${domain}). To reach us, reply "
                    "to this email.",
    "link_hint": "If the button does not work, copy this address into your browser:",
    "name": "there",  # the greeting's name when the caller has none ("" leaves the greeting out)
    "password_changed": "your password was changed",  # the event of sysmail's own alert
}


@functools.lru_cache(maxsize=64)
def _html_from_text(text: str) -> str:
    """The HTML body a template's text makes: one paragraph per line, a line "Label: ${x_url}"
    a button with the link under it, a line indented by four spaces the big code. Each HTML
    line keeps its text line's variables, so a line left out of the text is left out here too."""
    blocks = []
    for paragraph in text.strip("\n").split("\n\n"):
        lines = paragraph.split("\n")
        for number, line in enumerate(lines, start=1):
            blocks.append(_html_line(line, last=number == len(lines)))
    return "\n".join(blocks)


def _html_line(line: str, last: bool) -> str:
    button = _BUTTON_LINE.fullmatch(line)
    if button:
        var = button["var"]
        return _BUTTON % (var, html.escape(button["label"], quote=False), var, var)
    if line.startswith("    "):
        return _CODE % html.escape(line.strip(), quote=False)
    margin = "0 0 16px 0" if last else "0"
    return f'<p style="margin:{margin};">{html.escape(line, quote=False)}</p>'


def _is_whole_document(markup: str) -> bool:
    return markup.lstrip()[:14].lower().startswith(("<!doctype", "<html"))


@functools.lru_cache(maxsize=64)
def _html_document(body: str) -> str:
    """An HTML part: a whole document as it is, a fragment inside the shared layout."""
    return body if _is_whole_document(body) else _HTML_LAYOUT.replace("@BODY@", body.strip("\n"))


@dataclass(frozen=True)
class Template:
    """One system email: subject, text and HTML parts, its variables, priority and lifetime.

    An empty html is made from the text (_html_from_text), so the two parts say the same."""

    name: str
    subject: str
    text: str
    html: str
    required: tuple[str, ...]
    defaults: Mapping[str, str]
    samples: Mapping[str, str]
    priority: int = URGENT
    ttl_seconds: int = DAY_SECONDS
    ttl_minutes_var: str = ""
    secrets: tuple[str, ...] = ()  # variables that work as a credential: never kept after use
    dashboard_default: str = ""  # a URL variable that defaults to DASHBOARD_URL
    masked: tuple[str, ...] = ()  # address variables shown masked (a***@e***.com)

    @property
    def variables(self) -> tuple[str, ...]:
        """Every variable the template accepts, required first."""
        return self.required + tuple(v for v in self.defaults if v not in self.required)

    def ttl(self, values: Mapping[str, str]) -> int:
        """Seconds after enqueue when the mail is no longer worth sending."""
        if self.ttl_minutes_var:
            return int(values[self.ttl_minutes_var] or self.defaults[self.ttl_minutes_var]) * 60
        return self.ttl_seconds


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    Template(
        name="password-reset",
        subject="Reset your ${brand} password",
        text="Hi ${name},\n\nSomeone asked to reset the password of your ${brand} account. To "
             "choose a new password, use this link within ${expires_minutes} minutes.\n\n"
             "Reset password: ${reset_url}\n\nIf you did not ask for this, ignore this email. "
             "Your password stays as it is.\n",
        html="",
        required=("reset_url",),
        defaults={"name": "", "expires_minutes": "60"},
        samples={"reset_url": "https://dashboard.example.com/reset-password?token=SAMPLE",
                 "name": "Ada"},
        ttl_minutes_var="expires_minutes",
        secrets=("reset_url",),
    ),
    Template(
        name="email-verification",
        subject="Confirm your email address for ${brand}",
        text="Hi ${name},\n\nPlease confirm that this is your email address.\n\n"
             "Confirm email address: ${verify_url}\n\nIf you did not create an account with "
             "${brand}, ignore this email.\n",
        html="",
        required=("verify_url",),
        defaults={"name": ""},
        samples={"verify_url": "https://dashboard.example.com/verify?token=SAMPLE", "name": "Ada"},
        ttl_seconds=DAY_SECONDS,
        secrets=("verify_url",),
    ),
    Template(
        name="two-factor-code",
        subject="Your ${brand} sign-in code: ${code}",
        text="Your ${brand} sign-in code is:\n\n    ${code}\n\nIt expires in ${expires_minutes} "
             "minutes. Never share it: ${brand} will never ask you for it.\n",
        html="",
        required=("code",),
        defaults={"expires_minutes": "10"},
        samples={"code": "482913"},
        ttl_minutes_var="expires_minutes",
        secrets=("code",),
    ),
    Template(
        name="magic-link",
        subject="Your ${brand} sign-in link",
        text="Hi ${name},\n\nHere is the link you asked for to sign in to ${brand}. This link "
             "works once and expires in ${expires_minutes} minutes.\n\n"
             "Sign in: ${login_url}\n\nIf you did not ask for it, ignore this email. Nobody can "
             "sign in with it once it has been used or has expired.\n",
        html="",
        required=("login_url",),
        defaults={"expires_minutes": "15", "name": ""},
        samples={"login_url": "https://dashboard.example.com/login?token=SAMPLE", "name": "Ada"},
        ttl_minutes_var="expires_minutes",
        secrets=("login_url",),
    ),
    Template(
        name="security-alert",
        subject="Security alert for your ${brand} account",
        text="Hi ${name},\n\nWe noticed new activity on your ${brand} account.\n\n"
             "What happened: ${event}\nWhen: ${time}\nDevice: ${device}\nLocation: ${location}\n"
             "IP address: ${ip}\n\nIf this was you, there is nothing to do. If not, change your "
             "password now and review your account.\n\nReview your account: ${action_url}\n",
        html="",
        required=("event",),
        defaults={"ip": "", "time": "", "device": "", "location": "", "action_url": "",
                  "name": ""},
        samples={"event": "a new sign-in", "ip": "203.0.113.7", "time": "2026-11-27 14:03 UTC",
                 "device": "Firefox on Linux", "location": "Lyon, France",
                 "action_url": "https://dashboard.example.com/security", "name": "Ada"},
        ttl_seconds=DAY_SECONDS,
        dashboard_default="action_url",
    ),
    Template(
        name="email-change-notice",
        subject="The email address of your ${brand} account was changed",
        text="Hi ${name},\n\nThe email address of your ${brand} account was changed to "
             "${new_email}. This notice goes to your previous address.\n\n"
             "When: ${time}\nIP address: ${ip}\n\nIf you made this change, there is nothing to "
             "do. If you did not, undo it now.\n\nUndo this change: ${undo_url}\n",
        html="",
        required=("new_email",),
        defaults={"undo_url": "", "time": "", "ip": "", "name": ""},
        samples={"new_email": "ada.lovelace@example.org",
                 "undo_url": "https://dashboard.example.com/email/undo?token=SAMPLE",
                 "time": "2026-11-27 14:03 UTC", "ip": "203.0.113.7", "name": "Ada"},
        ttl_seconds=DAY_SECONDS,
        secrets=("undo_url",),
        dashboard_default="undo_url",
        masked=("new_email",),
    ),
    Template(
        name="billing-notification",
        subject="Billing: ${summary}",
        text="Hi ${name},\n\nHere is an update on your ${brand} billing.\n\n"
             "Summary: ${summary}\nAmount: ${amount}\nDue date: ${due_date}\n\n"
             "View billing: ${billing_url}\n",
        html="",
        required=("summary",),
        defaults={"amount": "", "due_date": "", "billing_url": "", "name": ""},
        samples={"summary": "Your invoice for November is ready", "amount": "$49.00",
                 "due_date": "2026-12-10", "billing_url": "https://dashboard.example.com/billing",
                 "name": "Ada"},
        priority=BULK,
        ttl_seconds=3 * DAY_SECONDS,
    ),
    Template(
        name="service-announcement",
        subject="${title}",
        text="Hi ${name},\n\n${title}\n\n${body}\n\nThe ${brand} team\n",
        html="",
        required=("title", "body"),
        defaults={"name": ""},
        samples={"title": "Scheduled maintenance on December 1",
                 "body": "The dashboard will be read-only from 02:00 to 03:00 UTC.",
                 "name": "Ada"},
        priority=BULK,
        ttl_seconds=7 * DAY_SECONDS,
    ),
    Template(
        name="account-suspension",
        subject="We have suspended your ${brand} account",
        text="Hi ${name},\n\nWe have suspended your ${brand} account.\n\nReason: ${reason}\n\n"
             "What happens next: while the suspension lasts, you cannot sign in to ${brand}. "
             "We will tell you by email when it ends.\n\n"
             "Appeal this decision: ${appeal_url}\nTo reach us, write to ${reply_to}.\n",
        html="",
        required=("reason",),
        defaults={"appeal_url": "", "name": ""},
        samples={"reason": "Unpaid invoices", "appeal_url": "https://dashboard.example.com/appeal",
                 "name": "Ada"},
        priority=BULK,
        ttl_seconds=7 * DAY_SECONDS,
    ),
)}


@dataclass(frozen=True)
class Rendered:
    """A template's parts with the variables filled in."""

    subject: str
    text: str
    html: str


SHIPPED_LANGUAGES = ("de",)  # translations in templates/<tag>/ beside sysmail.py (and in the .pyz)
_LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{2,8}){0,3}")
_PART_SUFFIXES = {"subject": ".subject", "text": ".txt", "html": ".html"}
_SUBJECT_TAIL = re.compile(r"[\s:\-\u2013\u2014]+$")


@dataclass(frozen=True)
class Language:
    """One language's templates and the layout's own words (footer, link hint, greeting)."""

    tag: str  # as the folder names it: the HTML lang
    templates: Mapping[str, Template]
    strings: Mapping[str, str]

    @property
    def direction(self) -> str:
        """The HTML dir: rtl for Arabic, Hebrew, Persian, Urdu and the like."""
        return "rtl" if self.tag.split("-")[0].lower() in RTL_LANGUAGES else "ltr"


ENGLISH = Language("en", TEMPLATES, LAYOUT_STRINGS)


class Catalog:
    """Every language's templates: built-in English, the shipped translations and the
    operator's SYSMAIL_TEMPLATES/<locale>/ overrides, each layered on its parent."""

    def __init__(self, languages: Mapping[str, Language]):
        self.languages = {tag.lower(): language for tag, language in languages.items()}
        self.default = self.languages["en"]

    def pick(self, locale: str | None) -> Language:
        """The language for a locale, falling back fr-CA -> fr -> the default."""
        if not locale:
            return self.default
        if not isinstance(locale, str) or not _LANGUAGE_TAG.fullmatch(locale.replace("_", "-")):
            raise MessageError("the locale must be a language tag like de or fr-CA")
        return self.nearest(locale.replace("_", "-").lower())

    def nearest(self, key: str) -> Language:
        """The language of key, else of its shorter prefixes, else the default."""
        while key:
            if key in self.languages:
                return self.languages[key]
            key = key.rpartition("-")[0]
        return self.default


def load_templates(folder: Path | None) -> dict[str, Template]:
    """Return the built-in templates with NAME.subject/.txt/.html files in folder overriding parts."""
    if folder is None:
        return dict(TEMPLATES)
    return _overlaid(TEMPLATES, _folder_reader(folder))


def load_catalog(folder: Path | None) -> Catalog:
    """The built-in and shipped languages with SYSMAIL_TEMPLATES's overrides: the folder itself
    for the default language, a subfolder per locale (de, fr-CA) for the others."""
    read = _folder_reader(folder) if folder else (lambda name: None)
    languages = {"en": Language("en", load_templates(folder), _strings(ENGLISH.strings, read))}
    sources = [(tag, _shipped_reader(tag)) for tag in SHIPPED_LANGUAGES]
    if folder is not None:
        sources += [(entry.name.replace("_", "-"), _folder_reader(entry))
                    for entry in sorted(folder.iterdir())
                    if entry.is_dir() and _LANGUAGE_TAG.fullmatch(entry.name.replace("_", "-"))]
    for tag, read in sorted(sources, key=lambda source: source[0].count("-")):  # fr before fr-CA
        parent = Catalog(languages).nearest(tag.lower())
        languages[tag.lower()] = Language(tag, _overlaid(parent.templates, read),
                                          _strings(parent.strings, read))
    return Catalog(languages)


def _overlaid(templates: Mapping[str, Template], read: Callable[[str], str | None]
              ) -> dict[str, Template]:
    """Templates with the parts read() finds (NAME.subject, .txt, .html) replacing theirs; a
    new text without its own HTML brings the HTML made from it."""
    result = {}
    for name, template in templates.items():
        parts = {part: read(name + suffix) for part, suffix in _PART_SUFFIXES.items()}
        found = {part: text for part, text in parts.items() if text is not None}
        if "subject" in found:
            found["subject"] = found["subject"].strip("\n")
        if "text" in found and "html" not in found:
            found["html"] = ""
        result[name] = dataclasses.replace(template, **found)
    return result


def _strings(parent: Mapping[str, str], read: Callable[[str], str | None]) -> dict[str, str]:
    """The layout's words: the parent's, with a strings.json's translations over them."""
    text = read("strings.json")
    if text is None:
        return dict(parent)
    try:
        strings = json.loads(text)
    except ValueError:
        raise ConfigError(["a strings.json of SYSMAIL_TEMPLATES is not valid JSON"]) from None
    if not isinstance(strings, dict) or not set(strings) <= set(LAYOUT_STRINGS) or not all(
            isinstance(v, str) for v in strings.values()):
        keys = ", ".join(LAYOUT_STRINGS)
        raise ConfigError([f"a strings.json may only translate {keys} (text values)"])
    return {**parent, **strings}


def _folder_reader(folder: Path) -> Callable[[str], str | None]:
    def read(name: str) -> str | None:
        path = folder / name
        try:
            return path.read_text(encoding="utf-8") if path.is_file() else None
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"the template file {path} cannot be read ({exc.__class__.__name__})"
            raise ConfigError([problem]) from None
    return read


def _shipped_reader(tag: str) -> Callable[[str], str | None]:
    """Files of the translation shipped beside sysmail.py: templates/<tag>/ in a checkout and
    in sysmail.pyz (read through the module's loader, which reads inside the zip too),
    sysmail_templates/<tag>/ once pip has installed it."""
    here = os.path.dirname(os.path.abspath(__file__))
    folders = [os.path.join(here, top, tag) for top in ("templates", "sysmail_templates")]
    loader = globals().get("__loader__")

    def read(name: str) -> str | None:
        for folder in folders:
            with contextlib.suppress(OSError):
                return loader.get_data(os.path.join(folder, name)).decode("utf-8")
        return None
    return read


def template_problems(folder: Path, prefix: str = "") -> list[str]:
    """Files in a folder of overrides (and in its language subfolders) that override nothing:
    a misspelled name would otherwise leave the built-in wording without a word."""
    known = {f"{name}{suffix}" for name in TEMPLATES for suffix in _PART_SUFFIXES.values()}
    known.add("strings.json")
    problems = []
    for path in sorted(folder.iterdir()):
        if path.is_dir() and not prefix and _LANGUAGE_TAG.fullmatch(path.name.replace("_", "-")):
            problems += template_problems(path, f"{path.name}/")
        elif path.name not in known:
            guess = difflib.get_close_matches(path.name, known, n=1)
            hint = f"did you mean {guess[0]}?" if guess else "names are TEMPLATE.subject, .txt, .html"
            problems.append(f"SYSMAIL_TEMPLATES: {prefix}{path.name} overrides no template ({hint})")
    return problems


def render(template: Template, variables: Mapping[str, object], brand: Mapping[str, str],
           language: Language = ENGLISH, *, secrets_in_subject: bool = True) -> Rendered:
    """Fill a template in; raise MessageError for a missing, unknown or unsafe variable.

    brand holds brand and domain, and optionally reply_to and dashboard_url."""
    values = _template_values(template, variables)
    values.update({"reply_to": "", "dashboard_url": "", **brand})
    _derive_values(template, values, language)
    subject = _subject(template, values, secrets_in_subject)
    html_values = {k: html.escape(v).replace("\n", "<br>\n") for k, v in values.items()}
    html_values["_subject"] = html.escape(subject)
    text = template.text.rstrip("\n") + "\n\n-- \n${_footer}\n"
    page = _html_document(template.html or _html_from_text(template.text))
    return Rendered(subject, _substitute_lines(template, text, values),
                    _substitute_lines(template, page, html_values))


def _derive_values(template: Template, values: dict[str, str], language: Language) -> None:
    """Fill in what follows from the language and the brand: greeting name, masked addresses,
    the dashboard as a default link, and the layout's footer, link hint, lang and dir."""
    if "name" in template.variables and not values["name"].strip():
        values["name"] = language.strings["name"]
    for key in template.masked:
        values[key] = mask_address(values[key])
    if template.dashboard_default and not values[template.dashboard_default]:
        values[template.dashboard_default] = values["dashboard_url"]
    footer = language.strings["footer_reply" if values["reply_to"] else "footer"]
    values["_footer"] = _substitute(template, footer, values)
    values["_link_hint"] = language.strings["link_hint"]
    values["_lang"], values["_dir"] = language.tag, language.direction


def _subject(template: Template, values: Mapping[str, str], secrets_in_subject: bool) -> str:
    """The subject; without the template's secrets (a sign-in code) unless they may show."""
    hidden = set() if secrets_in_subject else (_compiled(template.subject).names
                                                & set(template.secrets))
    subject = _substitute(template, template.subject, {**values, **dict.fromkeys(hidden, "")})
    if hidden:
        subject = _SUBJECT_TAIL.sub("", subject)
    if _unsafe_in_header(subject):
        raise MessageError(f"the subject of {template.name} would contain a line break or a "
                           "control character")
    return subject


def mask_address(address: str) -> str:
    """An address shown so its owner knows it and others learn little: a***@e***.org."""
    local, _, domain = address.rpartition("@")
    return f"{local[:1]}***@{domain[:1]}***.{domain.rpartition('.')[2]}"


def _template_values(template: Template, variables: Mapping[str, object]) -> dict[str, str]:
    """Validate the caller's variables against the template and merge in the defaults."""
    unknown = sorted(set(variables) - set(template.variables))
    if unknown:
        raise MessageError(f"template {template.name} has no variable {unknown[0]!r} "
                           f"(it takes {', '.join(template.variables)})")
    missing = [v for v in template.required if not str(variables.get(v, "")).strip()]
    if missing:
        raise MessageError(f"template {template.name} needs the variable {missing[0]!r}")
    values = {**template.defaults, **{k: str(v) for k, v in variables.items()}}
    for key, value in values.items():
        _check_value(template.name, key, value)
    return values


def _check_value(template: str, key: str, value: str) -> None:
    if not _is_text(value):
        raise MessageError(f"variable {key!r} of {template} is not valid UTF-8 text")
    if "\0" in value:
        raise MessageError(f"variable {key!r} of {template} contains a NUL character")
    if key.endswith("_url") and value and not _is_web_url(value):
        raise MessageError(f"variable {key!r} of {template} must be an http:// or https:// URL")
    if key.endswith("_email") and value:
        try:
            validate_address(value)
        except MessageError:
            raise MessageError(f"variable {key!r} of {template} must be an email address") from None
    if key == "expires_minutes" and not (re.fullmatch(r"[0-9]{1,5}", value)
                                         and 0 < int(value) <= 10080):
        raise MessageError(f"variable {key!r} of {template} must be a whole number of minutes")


def _substitute(template: Template, text: str, values: Mapping[str, str]) -> str:
    """string.Template's ${name} substitution, on text compiled once and cached."""
    return _fill(template, _compiled(text).whole, values)


def _substitute_lines(template: Template, text: str, values: Mapping[str, str]) -> str:
    """Substitute line by line, dropping a line that uses an optional variable left empty."""
    compiled = _compiled(text)
    empty = {k for k, v in values.items() if v == ""}
    if not empty & compiled.names:  # the usual case: nothing to drop, one format call
        return _single_blank_lines(_fill(template, compiled.whole, values))
    kept = [_fill(template, line, values) for line, names in compiled.lines
            if not empty & names]
    return _single_blank_lines("\n".join(kept))


def _single_blank_lines(text: str) -> str:
    return _BLANK_RUN.sub("\n\n", text) if "\n\n\n" in text else text


_BLANK_RUN = re.compile(r"\n{3,}")


def _fill(template: Template, pattern: str, values: Mapping[str, str]) -> str:
    try:
        return pattern.format_map(values)
    except KeyError as exc:
        raise MessageError(f"template {template.name} refers to an unknown variable {exc}") from None


@dataclass(frozen=True)
class _CompiledText:
    """A template text as str.format patterns: the whole of it, and line by line with the
    names each line uses (so a line whose optional variable is empty can be left out)."""

    whole: str
    lines: tuple[tuple[str, frozenset[str]], ...]
    names: frozenset[str]


@functools.lru_cache(maxsize=128)
def _compiled(text: str) -> _CompiledText:
    """Compile string.Template syntax (${name}, $name, $$) into format patterns, once."""
    lines = tuple(_format_line(line) for line in text.split("\n"))
    return _CompiledText("\n".join(line for line, _ in lines), lines,
                         frozenset().union(*(names for _, names in lines)))


def _format_line(line: str) -> tuple[str, frozenset[str]]:
    parts, names, last = [], set(), 0
    for match in string.Template.pattern.finditer(line):
        parts.append(line[last:match.start()].replace("{", "{{").replace("}", "}}"))
        name = match.group("braced") or match.group("named")
        if match.group("escaped") is not None:
            parts.append("$")
        else:  # an invalid placeholder becomes a name no values hold: an unknown variable
            name = name or line[match.start():match.start() + 2].replace("{", "(")
            parts.append("{" + name + "}")
            names.add(name)
        last = match.end()
    parts.append(line[last:].replace("{", "{{").replace("}", "}}"))
    return "".join(parts), frozenset(names)


def make_message_id(domain: str, now: float) -> str:
    """A globally unique RFC 5322 Message-ID in the brand domain."""
    return f"<{int(now * 1000)}.{secrets.token_hex(10)}@{domain}>"


def build_message(config: Config, to: list[str], rendered: Rendered, message_id: str,
                  now: float, extra: tuple[tuple[str, str], ...] = (), to_name: str = "") -> bytes:
    """Build the RFC 5322 bytes (CRLF) of a multipart/alternative (or text-only) message;
    extra headers go before MIME-Version; to_name, when known, goes into the To: header of a
    one-recipient message.

    Written directly rather than through email.message: the email package costs ~2.7 ms a
    message, more than the fsync that makes it durable.
    """
    if _unsafe_in_header(rendered.subject):
        raise MessageError("the subject contains a line break or a control character")
    headers = [
        ("From", email.utils.formataddr((config.from_name, config.from_addr), charset="utf-8")),
        ("To", _to_header(to, to_name)),
        ("Subject", _encoded_header("Subject", rendered.subject)),
        ("Date", email.utils.formatdate(now, usegmt=True)),
        ("Message-ID", message_id),
        *([("Reply-To", config.reply_to)] if config.reply_to else []),
        ("Auto-Submitted", "auto-generated"),
        ("X-Auto-Response-Suppress", "All"),
        *extra,
        ("MIME-Version", "1.0"),
    ]
    if rendered.html:
        boundary = f"=_sysmail_{secrets.token_hex(12)}"
        headers.append(("Content-Type", f'multipart/alternative; boundary="{boundary}"'))
        body = (f"\r\n--{boundary}\r\n{_mime_part('plain', rendered.text)}\r\n"
                f"--{boundary}\r\n{_mime_part('html', rendered.html)}\r\n--{boundary}--\r\n")
    else:
        body = _mime_part("plain", rendered.text)
    head = "".join(f"{name}: {value}\r\n" for name, value in headers)
    if max(map(len, head.split("\r\n"))) > MAX_LINE_CHARS:  # RFC 5322 2.1.1; a word too
        raise MessageError(f"a header line would be longer than {MAX_LINE_CHARS} characters "
                           "(a subject word too long to fold?)")
    return (head + body).encode("ascii")


def _to_header(to: list[str], name: str) -> str:
    """The To: value: "Ada Lovelace" <ada@example.com> for one recipient with a name (quoted,
    RFC 2047 when not ASCII; a name with a control character is left out), else the addresses."""
    name = " ".join(name.split())
    if len(to) != 1 or not name or _unsafe_in_header(name) or len(name) > 200:
        return ",\r\n ".join(to)
    if name.isascii():
        quoted = name.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{quoted}" <{to[0]}>'
    return _encoded_header("To", name) + f" <{to[0]}>"


def _encoded_header(name: str, value: str) -> str:
    """A header value folded to 78 columns; RFC 2047 encoded words when it is not ASCII."""
    if value.isascii() and len(name) + len(value) < 76:
        return value
    charset = "us-ascii" if value.isascii() else "utf-8"
    return email.header.Header(value, charset, header_name=name).encode(linesep="\r\n")


def _mime_part(subtype: str, text: str) -> str:
    """Content headers, a blank line and the body: 7bit when it can be, else quoted-printable."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii() and max(map(len, text.split("\n"))) <= MAX_LINE_CHARS:
        encoding, body = "7bit", text
    else:
        encoding = "quoted-printable"
        body = quopri.encodestring(text.encode("utf-8")).decode("ascii")
    if not body.endswith("\n"):
        body += "\n"
    return (f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
            f"Content-Transfer-Encoding: {encoding}\r\n\r\n" + body.replace("\n", "\r\n"))


# ---- Bounces ---- #

MAX_BOUNCE_BYTES = 256 * 1024  # a report is at the start; the returned message is cut

# RFC 3463 codes that say the address itself does not work: the only 5.x.x that are hard.
# The other 5.x.x name a full mailbox (5.2.2: its owner can empty it), the content, a loop,
# or the sender's reputation (5.7.x, 5.1.7, 5.1.8): final for this message, not for the address.
_HARD_STATUS = re.compile(r"5\.1\.([1-46]|10|\d{3})|5\.2\.1|5\.4\.4")
_VAGUE_STATUS = re.compile(r"5\.[0-5]\.0|5\.5\.\d+|5\.7\.27")  # "other" codes: the text decides
_STATUS = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?![\d.]*\d)")
_REPLY_CODE = re.compile(r"(?<![\d.#\[])([45][0-5]\d)(?=[ :-])")
_HARD_TEXT = re.compile(
    r"user unknown|unknown (user|recipient|address)|no such (user|mailbox|recipient|address|"
    r"domain)|(user|recipient|mailbox|address|account) (\S+ )?(not found|does ?n[o']t exist)|"
    r"(invalid|unknown|bad) (recipient|mailbox|address|destination)|not recognized|"
    r"(mailbox|account) (is )?(disabled|unavailable|discontinued)|host (unknown|not found)|"
    r"no valid recipients|no mx|does not accept mail|doesn't have an? \S+ account|"
    r"unrouteable|name not found", re.IGNORECASE)
_SOFT_TEXT = re.compile(r"mailbox (is )?full|quota|over ?limit|exceeded|try again|delay",
                        re.IGNORECASE)
_DAEMON = re.compile(r"mailer-daemon|postmaster|mail delivery|mmsc|mail-daemon|mailer daemon",
                     re.IGNORECASE)
_BOUNCE_SUBJECT = re.compile(r"undeliver|deliver(y|ing) (status|fail|notif|problem|report)|"
                             r"returned mail|failure notice|fail(ed|ure) delivery|could not be "
                             r"delivered|delivery has failed|non remis", re.IGNORECASE)
_AUTO_SUBJECT = re.compile(r"auto(matic)?[- ]?(reply|response|antwort)|out of (the )?office|"
                           r"vacation|away from|abwesen|^away\b|absence", re.IGNORECASE)
_ORIGINAL_MARKER = re.compile(
    r"^[ \t>*-]*(.*(original message|below this line|copy of the message|unsent message|"
    r"original (mail|message) (follows|as follows)|headers follow|returned message|"
    r"bounced e-mail)|received: ?|return-path: )", re.IGNORECASE | re.MULTILINE)
_HEADER_LINE = re.compile(r"^\s*(to|from|cc|subject|date|sent|message-id):.*$",
                          re.IGNORECASE | re.MULTILINE)  # the original's, quoted in a notice
_LINK = re.compile(r"\w+://\S+")  # a returned reset link must not reach the log
_ADDRESS = re.compile(r"[\w.+=!#$%&'*/?^`{|}~-]+@[\w-]+(?:\.[\w-]+)+")
_LINE_START_ADDRESS = re.compile(r"^[ \t*<\"]*(" + _ADDRESS.pattern + ")", re.MULTILINE)
_FINAL_RECIPIENT = re.compile(r"^Final-Recipient:[^;\n]*;\s*<?([^>\s]+)",
                              re.IGNORECASE | re.MULTILINE)


@dataclass(frozen=True)
class BounceReport:
    """What a message to the bounce address says: its kind, who failed, and why."""

    kind: str  # hard | soft | complaint | auto-reply | none
    recipients: tuple[str, ...] = ()
    status: str | None = None
    reason: str = ""
    original_message_id: str | None = None

    def as_json(self) -> dict:
        """The object `bounce --dry-run --json` prints and POST /v1/bounces answers."""
        return {"kind": self.kind, "recipients": list(self.recipients), "status": self.status,
                "reason": self.reason, "original_message_id": self.original_message_id}


def parse_bounce(raw: bytes) -> BounceReport:
    """Understand one raw message: a DSN (RFC 3464), a complaint (RFC 5965), a bounce in one
    of the common non-standard forms, an auto-reply (RFC 3834) or ordinary mail."""
    message = email.message_from_bytes(raw[:MAX_BOUNCE_BYTES], policy=email.policy.compat32)
    if not any(name in message for name in ("From", "To", "Received", "Return-Path")):
        raise MessageError("the input is not a mail message")
    original = _original_message_id(message)
    for part in message.walk():
        if part.get_content_type() == "message/feedback-report":
            return _complaint(message, part, original)
        if part.get_content_type() == "message/delivery-status":
            report = _delivery_status(message, part, original)
            if report.recipients or report.kind == "none":
                return report
    notice = _notice_and_rest(message)[0].strip()
    if notice.startswith("{") and (notification := _json_or_none(notice)) is not None:
        return parse_notification(notification)  # Amazon SES through SNS e-mail
    if _is_bounce(message):
        return _plain_bounce(message, original)
    if _is_auto_reply(message):
        sender = email.utils.parseaddr(_header(message, "From"))[1]
        return BounceReport("auto-reply", (sender,) if sender else (), None,
                            _oneline(_header(message, "Subject")), original)
    return BounceReport("none", reason="not a bounce, complaint or auto-reply")


def parse_notification(value: Mapping) -> BounceReport:
    """An Amazon SES (direct or wrapped by SNS) or Postmark JSON bounce or complaint; raise
    MessageError for anything else. Without a status code, their own hard/soft word holds."""
    try:
        return _notification(value)
    except (AttributeError, TypeError):  # a field of another JSON type than theirs
        raise MessageError("the notification is malformed") from None


def _notification(value: Mapping) -> BounceReport:
    if isinstance(value.get("Message"), str):  # the SNS envelope around SES's notification
        value = _json_or_none(value["Message"]) or {}
    event = value.get("notificationType") or value.get("eventType") or value.get("RecordType")
    headers = value.get("mail", {}).get("headers", [])
    original = next((h.get("value") for h in headers
                     if str(h.get("name", "")).lower() == "message-id"), None)
    if event == "Bounce" and isinstance(value.get("bounce"), dict):  # SES
        bounce, failures = value["bounce"], []
        permanent = bounce.get("bounceType") == "Permanent"
        for rcpt in bounce.get("bouncedRecipients", []):
            diagnostic = str(rcpt.get("diagnosticCode", ""))
            status = _status(str(rcpt.get("status", ""))) or _status(diagnostic)
            failures.append((rcpt.get("emailAddress", ""), status, diagnostic))
        return _worst(failures, "", original, "hard" if permanent else "soft")
    if event == "Complaint" and isinstance(value.get("complaint"), dict):  # SES
        complaint = value["complaint"]
        recipients = tuple(r.get("emailAddress", "")
                           for r in complaint.get("complainedRecipients", []))
        return BounceReport("complaint", recipients, None,
                            complaint.get("complaintFeedbackType", "abuse"), original)
    if event in ("Bounce", "SpamComplaint") and isinstance(value.get("Email"), str):  # Postmark
        details = f"{value.get('Details', '')} {value.get('Description', '')}"
        if event == "SpamComplaint":
            return BounceReport("complaint", (value["Email"],), None, "abuse", original)
        hard = value.get("Type") == "HardBounce"
        return _worst([(value["Email"], _status(details), details)], "", original,
                      "hard" if hard else "soft")
    raise MessageError("not an Amazon SES or Postmark bounce or complaint notification")


def _json_or_none(text: str) -> dict | None:
    """A JSON object at the start of text (SNS appends a footer to its e-mail), or None."""
    try:
        value = json.JSONDecoder(strict=False).raw_decode(text)[0]
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def notification_envelope_sender(value: Mapping) -> str:
    """The envelope sender an Amazon SES notification (direct or in SNS) says the message had
    (mail.source): the VERP address sysmail gave, which tells whom it is about; else ""."""
    if isinstance(value.get("Message"), str):
        value = _json_or_none(value["Message"]) or {}
    mail = value.get("mail")
    source = mail.get("source") if isinstance(mail, dict) else None
    return source if isinstance(source, str) else ""


def bounce_envelope_recipient(raw: bytes, given: str = "") -> str:
    """The address a bounce was sent to (the VERP address): as the MTA passed it, else the
    Delivered-To or X-Original-To header the delivering MTA added."""
    headers = email.parser.BytesParser().parsebytes(raw[:MAX_BOUNCE_BYTES], headersonly=True)
    for value in (given, headers.get("Delivered-To", ""), headers.get("X-Original-To", "")):
        if email.utils.parseaddr(str(value))[1]:
            return email.utils.parseaddr(str(value))[1]
    return ""


def classify_bounce(status: str | None, text: str) -> str:
    """hard or soft, from the enhanced status code, else the reply code and text."""
    if status and status[0] == "4":
        return "soft"
    if status and _HARD_STATUS.fullmatch(status):
        return "hard"
    if status and not _VAGUE_STATUS.fullmatch(status):
        return "soft"
    return "hard" if _HARD_TEXT.search(text) else "soft"


def _complaint(message: email.message.Message, part: email.message.Message,
               original: str | None) -> BounceReport:
    fields = _fields(part)
    recipient = fields.get("original-rcpt-to", "") or _original_header(message, "To")
    address = email.utils.parseaddr(recipient)[1]
    return BounceReport("complaint", (address,) if address else (), None,
                        fields.get("feedback-type", "abuse"), original)


def _delivery_status(message: email.message.Message, part: email.message.Message,
                     original: str | None) -> BounceReport:
    failures, actions = [], set()
    for block in _fields_blocks(part)[1:]:
        action = block.get("action", "failed").strip().lower()
        actions.add(action)
        if action not in ("failed", "delayed"):
            continue
        recipient = _strip_type(block.get("final-recipient") or block.get("original-recipient"))
        diagnostic = _strip_type(block.get("diagnostic-code", ""))
        # the remote server's own words win over the reporting MTA's summary of them
        status = _status(diagnostic) or _status(block.get("status", ""))
        if recipient:
            failures.append((recipient, status, diagnostic or block.get("status", "")))
    if actions and actions <= {"delivered", "relayed", "expanded"}:  # asked-for good news
        return BounceReport("none", reason="a delivery report: " + ", ".join(sorted(actions)))
    return _worst(failures, _notice_and_rest(message)[0], original)


def _plain_bounce(message: email.message.Message, original: str | None) -> BounceReport:
    notice, rest = _notice_and_rest(message)
    recipients = _failed_recipients(message, _HEADER_LINE.sub("", notice), rest)
    starts = sorted((notice.find(r), r) for r in recipients)
    failures = []
    for index, (start, recipient) in enumerate(starts):  # each one's text runs to the next
        end = starts[index + 1][0] if index + 1 < len(starts) else len(notice)
        text = notice[start:end] if start >= 0 and _status(notice[start:end]) else notice
        failures.append((recipient, _status(text), text))
    return _worst(failures, notice, original)


def _failed_recipients(message: email.message.Message, notice: str, rest: str) -> list[str]:
    """Who failed, from the likeliest source on: X-Failed-Recipients (Exim, Gmail), DSN fields
    in the text, addresses that begin a line of the notice, any address in it but the
    bounce's own From and To, and last the To of the returned message."""
    sender, to = (email.utils.parseaddr(_header(message, h))[1].lower() for h in ("From", "To"))
    candidates = [
        _ADDRESS.findall(_header(message, "X-Failed-Recipients")),
        _FINAL_RECIPIENT.findall(notice + rest),
        [a for a in _LINE_START_ADDRESS.findall(notice) if a.lower() != sender],
        [a for a in _ADDRESS.findall(notice) if a.lower() not in (sender, to)],
        _ADDRESS.findall(_original_header(message, "To", rest))]
    found = next((c for c in candidates if c), [])
    return list(dict.fromkeys(found))


def _worst(failures: list[tuple[str, str | None, str]], notice: str, original: str | None,
           unknown: str | None = None) -> BounceReport:
    """One report: the hard failures when there are any, else the soft ones (a failure
    without a status code is of the kind unknown, when the caller knows it)."""
    kinds = [(unknown if unknown and not s else classify_bounce(s, d + "\n" + notice), r, s, d)
             for r, s, d in failures]
    kind = "hard" if any(k == "hard" for k, *_ in kinds) else "soft"
    chosen = [(r, s, d) for k, r, s, d in kinds if k == kind]
    if not chosen:
        return BounceReport(kind, (), None, _reason(notice)[:300], original)
    status, reason = chosen[0][1], _reason(chosen[0][2] or notice)
    return BounceReport(kind, tuple(r for r, *_ in chosen), status, reason[:300], original)


def _reason(text: str) -> str:
    """The line of a failure's text that says why (a reply code, a status, known words)."""
    lines = [_oneline(_LINK.sub("<link>", line)) for line in text.splitlines() if line.strip()]
    telling = (line for line in lines if _STATUS.search(line) or _REPLY_CODE.search(line)
               or _HARD_TEXT.search(line) or _SOFT_TEXT.search(line))
    return next(telling, lines[0] if lines else "")


def _status(text: str) -> str | None:
    match = _STATUS.search(text or "")
    return ".".join(match.groups()) if match else None


def _strip_type(value: str | None) -> str:
    """The value of a typed field ("rfc822; ada@example.com" -> "ada@example.com")."""
    text = value or ""
    return _oneline(text.partition(";")[2] if ";" in text else text).strip("<> ")


def _header(message: email.message.Message, name: str) -> str:
    """A header as text ("" when absent), whatever bytes it holds."""
    return str(message.get(name, ""))


def _oneline(text: str) -> str:
    return " ".join(str(text).split())


def _fields_blocks(part: email.message.Message) -> list[dict[str, str]]:
    payload = part.get_payload()
    if isinstance(payload, list):
        blocks = [{k.lower(): str(v) for k, v in p.items()} for p in payload]
    else:
        blocks = [{k.lower(): v for k, v in email.message_from_string(chunk).items()}
                  for chunk in re.split(r"\r?\n\s*\r?\n", str(payload))]
    return blocks if len(blocks) > 1 else [{}, *blocks]


def _fields(part: email.message.Message) -> dict[str, str]:
    merged: dict[str, str] = {}
    for block in _fields_blocks(part):
        merged.update(block)
    return merged


def _notice_and_rest(message: email.message.Message) -> tuple[str, str]:
    """The human-readable text of a report, and what follows it (a copy of the original)."""
    texts = []
    for part in _parts_outside_originals(message):
        if part.get_content_type() in ("text/plain", "message/delivery-status") or (
                part.get_content_maintype() == "text" and not texts):
            texts.append(_decoded(part))
    text = "\n".join(texts)
    cut = _ORIGINAL_MARKER.search(text, 40)
    return (text[:cut.start()], text[cut.start():]) if cut else (text, "")


def _parts_outside_originals(part: email.message.Message) -> Iterator[email.message.Message]:
    if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
        return
    if part.is_multipart():
        for sub in part.get_payload():
            yield from _parts_outside_originals(sub)
    else:
        yield part


def _decoded(part: email.message.Message) -> str:
    payload = part.get_payload(decode=True)
    if payload is None:
        return str(part.get_payload())
    try:
        return payload.decode(part.get_content_charset() or "utf-8", "replace")
    except LookupError:  # a charset Python does not know
        return payload.decode("latin-1")


def _is_auto_reply(message: email.message.Message) -> bool:
    auto = _header(message, "Auto-Submitted").strip().lower()
    return (auto.startswith("auto-replied") or "X-Autoreply" in message or
            "X-Autorespond" in message or
            _header(message, "Precedence").strip().lower() == "auto_reply" or
            bool(_AUTO_SUBJECT.search(_header(message, "Subject"))))


def _is_bounce(message: email.message.Message) -> bool:
    """From a mailer daemon, or a failure notice by its subject, or by its first words when
    it came from the null sender (as bounces and auto-replies do)."""
    sender = _header(message, "From") + " " + _header(message, "Return-Path")
    null_sender = _header(message, "Return-Path").strip() == "<>"
    return bool(_DAEMON.search(sender) or _BOUNCE_SUBJECT.search(_header(message, "Subject"))
                or null_sender and _BOUNCE_SUBJECT.search(_notice_and_rest(message)[0][:500]))


def _original_header(message: email.message.Message, name: str, rest: str = "") -> str:
    """A header of the returned original: an attached message, else the copy in the text."""
    for part in message.walk():
        if part.get_content_type() in ("message/rfc822", "text/rfc822-headers"):
            inner = part.get_payload(0) if part.is_multipart() else \
                email.message_from_string(str(part.get_payload()))
            if inner.get(name):
                return str(inner.get(name))
    match = re.search(rf"^\s*{name}:[ \t]*(.+)$", rest, re.MULTILINE | re.IGNORECASE)
    return match.group(1) if match else ""


def _original_message_id(message: email.message.Message) -> str | None:
    found = _original_header(message, "Message-ID")
    if not found:
        own = _header(message, "Message-ID")
        for part in message.walk():
            if part.get_content_maintype() == "text":
                for match in re.finditer(r"^\s*Message-I[dD]:\s*(<[^>\s]+>)",
                                         _decoded(part), re.MULTILINE):
                    if match.group(1) != own.strip():
                        return match.group(1)
    match = re.search(r"<[^>\s]+>", found)
    return match.group(0) if match else None


class BounceHandler:
    """What sysmail does with a report: log it, count it, and hand the failures to suppress()."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def handle(self, report: BounceReport, envelope_recipient: str = "",
               source: str = "report") -> None:
        """Log and count one report (source: report, or rcpt for a refusal at RCPT TO); pass
        bounces and complaints on to suppress(), never auto-replies or ordinary mail."""
        log_event(logging.INFO, "bounce", source=source, envelope=envelope_recipient or None,
                  **report.as_json())
        self.metrics.inc("sysmail_bounces_total", kind=report.kind, source=source)
        if report.kind in ("hard", "soft", "complaint") and report.recipients:
            self.suppress(report, envelope_recipient, source)

    def suppress(self, report: BounceReport, envelope_recipient: str,
                 source: str = "report") -> None:
        """The suppression list's hook (issue 12, SuppressingBounces): put report.recipients
        on the list once the envelope recipient's VERP tag proves the report is about them
        (a refusal at RCPT TO needs no proof); raise when that cannot be recorded now (the
        MTA then retries). Here it does nothing."""

    def unsubscribe(self, raw: bytes) -> bool:
        """The mailto unsubscribe hook: True when raw was such a request (and it was done)."""
        return False


# ---- DKIM signing ---- #

_SIGNED_HEADERS = (b"from", b"from", b"to", b"to", b"subject", b"subject", b"date",
                   b"message-id", b"message-id", b"mime-version", b"content-type",
                   b"auto-submitted", b"feedback-id", b"feedback-id", b"list-unsubscribe",
                   b"list-unsubscribe", b"list-unsubscribe-post", b"list-unsubscribe-post")
_REPLY_TO_HEADERS = (b"reply-to", b"reply-to")


class DkimSigner:
    """Signs messages at send time with the keys from the configuration (rsa, optional ed25519).

    dkimpy canonicalizes and builds the header; the signature itself goes through OpenSSL
    (the `cryptography` package) when it is installed, about 11x faster than dkimpy's pure
    Python RSA, and through dkimpy otherwise. RSA PKCS#1 v1.5 is deterministic: both give the
    same bytes. Headers named twice are over-signed: a copy added in transit breaks the
    signature.
    """

    def __init__(self, domain: str, rsa: tuple[str, bytes] | None = None,
                 ed25519: tuple[str, bytes] | None = None, reply_to: bool = False, *,
                 backend: str = "auto", clock: Clock = time.time):
        self.domain = domain.encode("ascii")
        self.backend = _signing_backend(backend)
        self.clock = clock
        self._headers = _SIGNED_HEADERS + (_REPLY_TO_HEADERS if reply_to else ())
        self._keys: list[tuple[bytes, bytes, Callable[[bytes], bytes]]] = []
        if rsa:
            self._keys.append((rsa[0].encode("ascii"), b"rsa-sha256",
                               _rsa_signer(rsa[1], self.backend)))
        if ed25519:
            self._keys.append((ed25519[0].encode("ascii"), b"ed25519-sha256",
                               _ed25519_signer(ed25519[1], self.backend)))

    def __repr__(self) -> str:
        return (f"DkimSigner(domain={self.domain.decode()!r}, keys={len(self._keys)}, "
                f"backend={self.backend!r})")

    @classmethod
    def from_config(cls, config: Config) -> DkimSigner | None:
        """A signer for the From domain, or None when no key is configured."""
        if not config.signing:
            return None
        rsa = (config.dkim_selector, config.dkim_key) if config.dkim_key else None
        ed = (config.ed25519_selector, config.ed25519_key) if config.ed25519_key else None
        return cls(config.from_addr.rpartition("@")[2], rsa, ed, bool(config.reply_to))

    def sign(self, message: bytes) -> bytes:
        """Return the message with a DKIM-Signature header per key prepended."""
        import dkim

        policy = dkim.CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
        canonical_headers, canonical_body = _relaxed(message, policy)
        body_hash = base64.b64encode(hashlib.sha256(canonical_body).digest())
        timestamp = str(int(self.clock())).encode()
        signatures = [self._signature(canonical_headers, body_hash, selector, algorithm,
                                      sign_digest, timestamp, policy)
                      for selector, algorithm, sign_digest in self._keys]
        return b"".join(signatures) + message

    def _signature(self, headers: list, body_hash: bytes, selector: bytes, algorithm: bytes,
                   sign_digest: Callable[[bytes], bytes], timestamp: bytes,
                   policy: object) -> bytes:
        """One DKIM-Signature header, laid out exactly as dkimpy's DKIM.sign lays it out."""
        import dkim

        fields = [(b"v", b"1"), (b"a", algorithm), (b"c", b"relaxed/relaxed"),
                  (b"d", self.domain), (b"i", b"@" + self.domain), (b"q", b"dns/txt"),
                  (b"s", selector), (b"t", timestamp), (b"h", b" : ".join(self._headers)),
                  (b"bh", body_hash), (b"b", b"0" * 60)]
        name = b"DKIM-Signature"
        unsigned = dkim.fold(b"; ".join(b"=".join(f) for f in fields), namelen=len(name),
                             linesep=b"\r\n")
        hasher = hashlib.sha256()
        dkim.hash_headers(hasher, policy, headers, self._headers,
                          (name, b" " + dkim.RE_BTAG.sub(b"\\1", unsigned)), dict(fields))
        fields[-1] = (b"b", base64.b64encode(sign_digest(hasher.digest())))
        signed = b"; ".join(b"=".join(f) for f in fields) + b"\r\n"
        return name + b": " + dkim.fold(signed, namelen=len(name), linesep=b"\r\n")


_WSP = re.compile(rb"\t[\t ]*| [\t ]+")  # a run of blanks other than one space (which stays)
_WSP_BEFORE_CRLF = re.compile(rb"[\t ]+\r\n")
_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")


def _relaxed(message: bytes, policy: object) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The relaxed canonical header fields and body, byte for byte what dkimpy computes, in a
    quarter of its time for the CRLF messages sysmail builds (dkimpy itself for any other)."""
    import dkim

    head, separator, body = message.partition(b"\r\n\r\n")
    if not separator or message.count(b"\n") != message.count(b"\r\n") or b"\nFrom " in head:
        headers, body = dkim.rfc822_parse(message)
        return policy.canonicalize_headers(headers), policy.canonicalize_body(body)
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1] += line
        elif match := _FIELD_NAME.match(line):
            fields.append([match.group(1), line[match.end():]])
        else:
            raise dkim.MessageFormatError(f"unexpected characters in a header line: {line[:60]!r}")
    canonical = [(name.lower().rstrip(), _compress_blanks(value).strip() + b"\r\n")
                 for name, value in fields]
    if b" \r\n" in body or b"\t\r\n" in body:  # the scans cost far less than the regex
        body = _WSP_BEFORE_CRLF.sub(b"\r\n", body)
    body = _compress_blanks(body).rstrip(b"\r\n")
    return canonical, (body + b"\r\n" if body else b"")


def _compress_blanks(value: bytes) -> bytes:
    """Runs of blanks to one space (most values have none to compress)."""
    return _WSP.sub(b" ", value) if b"\t" in value or b"  " in value else value


def _signing_backend(requested: str) -> str:
    """openssl when `cryptography` imports (and not refused), else dkimpy."""
    if requested == "dkimpy":
        return "dkimpy"
    try:
        import cryptography.hazmat.primitives.asymmetric.padding  # noqa: F401
    except ImportError:
        if requested == "openssl":
            raise ConfigError([f"OpenSSL signing needs the cryptography package: {FAST_HINT}"]
                              ) from None
        return "dkimpy"
    return "openssl"


def signing_backend_note(backend: str) -> str:
    """Which code signs, and why: for check and the sender's startup log line."""
    if backend == "openssl":
        return "OpenSSL (the cryptography package is installed)"
    return ("pure Python (dkimpy), as the cryptography package is not installed; for OpenSSL, "
            f"about 11x faster: {FAST_HINT}")


def _rsa_signer(pem: bytes, backend: str) -> Callable[[bytes], bytes]:
    """A function that signs a SHA-256 digest with RSA PKCS#1 v1.5."""
    if backend == "openssl":
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import padding, utils

        key = serialization.load_pem_private_key(pem, password=None)
        return lambda digest: key.sign(digest, padding.PKCS1v15(),
                                       utils.Prehashed(hashes.SHA256()))
    from dkim.crypto import RSASSA_PKCS1_v1_5_sign, parse_pem_private_key

    parsed = parse_pem_private_key(pem)
    return lambda digest: bytes(RSASSA_PKCS1_v1_5_sign(_Digest(digest), parsed))


class _Digest:
    """A finished SHA-256 digest shaped like the hash object dkimpy's RSA code expects."""

    name = "sha256"

    def __init__(self, value: bytes):
        self._value = value

    def digest(self) -> bytes:
        return self._value


def _ed25519_signer(seed_b64: bytes, backend: str) -> Callable[[bytes], bytes]:
    """A function that signs a SHA-256 digest with ed25519 (RFC 8463)."""
    seed = base64.b64decode(seed_b64)
    if backend == "openssl":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return Ed25519PrivateKey.from_private_bytes(seed).sign
    import nacl.signing

    key = nacl.signing.SigningKey(seed)
    return lambda digest: key.sign(digest).signature


# ---- Spool ---- #

SPOOL_FORMAT = b"sysmail-spool/2 "  # then the entry's MAC in hex, a space, the JSON header
TMP_MAX_AGE_SECONDS = 36 * 3600
SPOOL_MIN_FREE_BYTES = 1024 * 1024
SPOOL_DIR_MODE = 0o700
SPOOL_FOLDERS = ("tmp", "new", "cur", "failed", "wake", "idempotency", "replies")
SPOOL_FILE_MODE = 0o600
_WAKE_PREFIX = "\0sysmail-wake-"


@dataclass(frozen=True)
class SpoolName:
    """PRIORITY.DUE_MS.ATTEMPT.ID: names sort by priority, then by due time."""

    priority: int
    due_ms: int
    attempt: int
    id: str

    def __str__(self) -> str:
        return f"{self.priority}.{self.due_ms:014d}.{self.attempt}.{self.id}"

    @classmethod
    def parse(cls, name: str) -> SpoolName:
        """Parse a spool file name (a claim's owner suffix is ignored); ValueError if foreign."""
        priority, due, attempt, ident = name.split(".")[:4]
        return cls(int(priority), int(due), int(attempt), ident)


class _DueIndex:
    """The names in new/ in one heap per priority: a claim costs O(log n), not a folder scan.

    Filled by a scan of new/ and kept current by this process's own writes and by the names
    other processes send with their wake-up datagrams; rescanned when it has nothing due
    and every few seconds anyway, so a lost datagram delays a message, never loses it.
    """

    RESCAN_SECONDS = 5.0
    LIMIT = 50_000  # names held at once: a million queued cost a few MB, not hundreds

    def __init__(self, clock: Clock = time.monotonic, limit: int = LIMIT) -> None:
        self.clock, self.limit = clock, limit
        self._lock = threading.Lock()
        self._heaps: dict[int, list[str]] = {}
        self._built_at: float | None = None
        self._scan_seconds = 0.0

    def needs_scan(self) -> bool:
        """True when the index was never built or is old enough to refresh: RESCAN_SECONDS,
        or twenty scans' time for a folder so large that a scan takes long."""
        built = self._built_at
        return built is None or (self.clock() - built
                                 >= max(self.RESCAN_SECONDS, 20 * self._scan_seconds))

    def rebuild(self, entries: Iterable[str]) -> None:
        """Replace the index with the `limit` most urgent, earliest due names of a fresh scan
        of new/ (names sort by priority, then due time); when those are claimed and nothing
        indexed is due, the sender scans again."""
        started = time.monotonic()
        match = _NEW_ENTRY.fullmatch
        heaps: dict[int, list[str]] = {}
        for entry in heapq.nsmallest(self.limit, (e for e in entries if match(e))):
            heaps.setdefault(ord(entry[0]) - 48, []).append(entry)  # sorted: each a heap
        with self._lock:
            self._heaps, self._built_at = heaps, self.clock()
            self._scan_seconds = time.monotonic() - started

    def add(self, entry: str) -> None:
        """Index one name that just appeared in new/."""
        name = _parse_name(entry)
        if name is not None:
            with self._lock:
                heapq.heappush(self._heaps.setdefault(name.priority, []), entry)

    def pop_due(self, now_ms: int, limit: int) -> list[str]:
        """Remove and return up to limit due names, most urgent priority first."""
        due: list[str] = []
        with self._lock:
            for priority in sorted(self._heaps):
                heap = self._heaps[priority]
                while heap and len(due) < limit and _due_ms(heap[0]) <= now_ms:
                    due.append(heapq.heappop(heap))
        return due

    def next_due_ms(self) -> int | None:
        """The earliest due time among the names left, or None."""
        with self._lock:
            heads = [_due_ms(heap[0]) for heap in self._heaps.values() if heap]
        return min(heads, default=None)


_NEW_ENTRY = re.compile(r"[0-9]\.[0-9]+\.[0-9]+\.[0-9A-Za-z]+")  # PRIORITY.DUE_MS.ATTEMPT.ID


def _due_ms(entry: str) -> int:
    return int(entry.split(".", 2)[1])


class Queue(Protocol):
    """Where queued mail waits: the spool, or Redis when the spool cannot be written.

    A message is stored durably before enqueue returns; a claim gives one process the sole
    right to send it until it settles the claim (ack, defer, release or fail), or dies and a
    recover() elsewhere hands it back. Failures to reach the storage raise SpoolError or
    QueueUnavailable.
    """

    def enqueue(self, header: dict, data: bytes, priority: int, due: float | None = None,
                attempt: int = 0) -> str:
        """Store a message durably, due at `due` (now by default); return its id."""

    def claim(self, limit: int) -> tuple[list[Claim], float | None]:
        """Claim up to limit due messages, most urgent first; also the next due time left."""

    def read(self, claim: Claim) -> SpooledMessage:
        """The claimed message; SpoolError when it is not a readable entry."""

    def ack(self, claim: Claim) -> None:
        """Forget a delivered message."""

    def defer(self, claim: Claim, due: float, reply: str = "") -> None:
        """Put a message back for another attempt at `due` (attempt + 1), keeping the relay's
        reply for the operators' queue listing."""

    def release(self, claim: Claim, due: float | None = None) -> None:
        """Put a message back with its attempt unchanged, due now (or at due): its try was
        not its fault."""

    def fail(self, claim: Claim, reason: dict) -> None:
        """Make a dead letter of a message, with its reason."""

    def add_failed(self, message: SpooledMessage, rcpts: tuple[str, ...], reason: dict) -> None:
        """Write a dead letter for some recipients of a message whose others were served."""

    def recover(self) -> int:
        """Hand back the claims of dead processes; return how many."""

    def failed(self) -> list[dict]:
        """The dead letters with their reasons (each with its id), oldest first."""

    def retry(self, ids: list[str] | None = None) -> list[str]:
        """Put dead letters (all when ids is None) back, due now with attempt 0; return ids."""

    def entries(self) -> list[dict]:
        """The messages waiting or being sent, for `sysmail queue` (read, not authenticated)."""

    def counts(self) -> dict:
        """Messages per state: new (due now), deferred, cur (claimed) and failed."""


@dataclass(frozen=True)
class _Census:
    """What one spool folder held when it was last read: due times, sorted, and the oldest
    message's enqueue time."""

    changed_ns: int
    due_ms: list[int]
    oldest: float
    read_at: float = 0.0  # time.monotonic() when read
    scan_seconds: float = 0.0


CENSUS_SETTLED_NS = 1_000_000_000
CENSUS_SLOW_SECONDS = 0.25  # a folder this slow to read (~250,000 names) is read 10x less


@dataclass(frozen=True)
class Claim:
    """A message this process has claimed: it alone may send it until it settles the claim.

    `queue` is where it came from (the spool or the Redis fallback) and settles it.
    """

    name: SpoolName
    queue: Queue = field(repr=False)
    path: Path | None = None
    entry: bytes = field(default=b"", repr=False)


@dataclass(frozen=True)
class SpooledMessage:
    """A queued message: envelope and metadata from the spool header, and the RFC 5322 bytes."""

    id: str
    message_id: str
    mail_from: str
    rcpts: tuple[str, ...]
    template: str
    queued_at: float
    expires_at: float
    priority: int
    attempt: int
    data: bytes

    def header(self, rcpts: tuple[str, ...] | None = None) -> dict:
        """The JSON spool header of this message, optionally for fewer recipients."""
        return {"message_id": self.message_id, "from": self.mail_from,
                "to": list(rcpts or self.rcpts), "template": self.template,
                "queued_at": self.queued_at, "expires_at": self.expires_at}


class _GroupSync:
    """Group commit: threads that each need a flush share one. A caller waits for a flush
    that starts after it asked; the first caller to find none running runs it for everyone
    waiting then, with their items (file descriptors)."""

    def __init__(self, flush: Callable[[list[int]], None]):
        self._flush = flush
        self._cond = threading.Condition()
        self._pending: list[int] = []
        self._started = self._finished = 0
        self._errors: dict[int, BaseException] = {}

    def wait(self, item: int) -> None:
        """Return once a flush that includes item is over; raise its error if it failed."""
        with self._cond:
            self._pending.append(item)
            mine = self._started + 1  # the round that will take the pending items
            while self._finished < mine:
                if self._started > self._finished:
                    self._cond.wait()  # another caller's flush is running
                else:
                    self._run_round()
            error = self._errors.get(mine)
        if error is not None:
            raise error

    def _run_round(self) -> None:
        """Flush every pending item, outside the lock; called with the lock held."""
        self._started += 1
        number, items, self._pending = self._started, self._pending, []
        self._cond.release()
        try:
            self._flush(items)
        except BaseException as exc:  # every caller of this round gets it
            self._errors[number] = exc
            if len(self._errors) > 64:
                del self._errors[min(self._errors)]
            raise
        finally:
            self._cond.acquire()
            self._finished = number
            self._cond.notify_all()


class Spool:
    """A Maildir-style queue on local disk; only renames move a message once it is written.

        enqueue  tmp/N --write, fsync, link--> new/N, fsync new/   (never overwrites)
                 (writers at once share their syncs: _GroupSync, enqueue_many)
        claim    new/N --rename--> cur/N.OWNER                     (exactly one worker wins)
        sent     cur/N.OWNER --unlink
        defer    cur/N.OWNER --rename--> new/N'                    (attempt+1, due later)
        release  cur/N.OWNER --rename--> new/N                     (relay down: no attempt spent)
        fail     failed/N.json written, then cur/N.OWNER --rename--> failed/N
        recover  cur/N.OWNER whose OWNER process is gone --rename--> new/N
        retry    failed/N --rename--> new/N''                      (attempt 0, due now)

    OWNER is pid-starttime, so a reused pid is not mistaken for the dead worker. A crash
    between a relay's 250 and the unlink sends that message again once: the duplicate window
    is one message per crashed worker: its connections sign and negotiate in parallel, but
    send content and settle one message at a time (Sender._commit).
    """

    def __init__(self, root: Path | str, clock: Clock = time.time, *,
                 key: bytes = UNKEYED_QUEUE_KEY, index: _DueIndex | None = None,
                 wakeups: _Wakeups | None = None):
        self.root = Path(root)
        self.clock = clock
        self._mac_key = key
        self._counter = 0
        self._lock = threading.Lock()
        self._index = index or _DueIndex()
        self._censuses: dict[str, _Census] = {}
        self._wakeups = wakeups or _Wakeups(self.root / "wake")
        self._data_sync = _GroupSync(_sync_files)
        self._new_sync = _GroupSync(lambda _: _fsync_dir(self.root / "new"))
        try:
            for sub in ("", *SPOOL_FOLDERS):
                _make_private_dir(self.root / sub)
        except OSError:
            pass  # an unwritable spool fails at enqueue, where a fallback can take over

    def __repr__(self) -> str:
        return f"Spool({str(self.root)!r})"

    # -- writing -- #

    def enqueue(self, header: dict, data: bytes, priority: int, due: float | None = None,
                attempt: int = 0) -> str:
        """Store a message durably in new/ and return its spool id; raise SpoolError on failure."""
        name = SpoolName(priority, int((self.clock() if due is None else due) * 1000), attempt,
                         self._new_id())
        try:
            self._write_new(str(name), _entry_bytes(header, data, self._mac_key))
        except OSError as exc:
            raise SpoolError(f"cannot write to the spool {self.root}: {exc.strerror}") from exc
        self._index.add(str(name))
        self._wakeups.notify(str(name))
        return name.id

    def _new_id(self) -> str:
        with self._lock:
            self._counter += 1
            counter = self._counter
        return f"{int(self.clock() * 1e6):x}{os.getpid():x}{counter:x}{secrets.token_hex(3)}"

    def enqueue_many(self, entries: list[tuple[dict, bytes, int]]) -> list[str]:
        """Store (header, data, priority) messages, due now, with one sync of their data and
        one of new/ for all; return their ids. On SpoolError, its `queued` lists the ids
        stored durably before the failure (a prefix of entries)."""
        names = [str(SpoolName(priority, int(self.clock() * 1000), 0, self._new_id()))
                 for _, _, priority in entries]
        root, fds, moved = str(self.root), [], []
        try:
            for name, (header, data, _) in zip(names, entries, strict=True):
                fds.append(os.open(f"{root}/tmp/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                                   SPOOL_FILE_MODE))
                _give_to_folder_owner(fds[-1], f"{root}/tmp")
                _write_all(fds[-1], _entry_bytes(header, data, self._mac_key))
            _sync_files(fds)  # the data is on disk before any name appears in new/
            for name in names:
                _move_no_replace(f"{root}/tmp/{name}", f"{root}/new/{name}")
                moved.append(name)
        except OSError as exc:
            error = SpoolError(f"cannot write to the spool {self.root}: {exc.strerror}")
            error.queued = [SpoolName.parse(n).id for n in moved] if self._sync_new() else []
            raise error from exc
        finally:
            for fd in fds:
                os.close(fd)
            for name in names[len(moved):]:
                _unlink_quietly(f"{root}/tmp/{name}")  # nothing half-done stays behind
        if not self._sync_new():
            raise SpoolError(f"cannot sync the spool folder {self.root}/new")
        for name in names:
            self._index.add(name)
        self._wakeups.notify(names[0])
        return [SpoolName.parse(name).id for name in names]

    def _sync_new(self) -> bool:
        try:
            self._new_sync.wait(0)
            return True
        except OSError:
            return False

    def _write_new(self, name: str, payload: bytes) -> None:
        root = str(self.root)
        tmp, new = f"{root}/tmp/{name}", f"{root}/new/{name}"
        # the data is on disk before the name appears in new/
        _write_synced(tmp, payload, self._data_sync.wait)
        try:
            _move_no_replace(tmp, new)
        except OSError:
            _unlink_quietly(tmp)  # nothing half-done stays behind
            raise
        self._new_sync.wait(0)  # the new name survives a power loss

    def check_private(self) -> None:
        """ConfigError when others could tamper with the spool: a folder writable by other
        users, or a subfolder that is a symbolic link (it could lead anywhere)."""
        try:
            if os.stat(self.root).st_mode & 0o022:
                raise ConfigError([(f"the spool {self.root} is writable by other users "
                                    f"(chmod 700 {self.root})")])
        except FileNotFoundError:
            return
        links = [sub for sub in SPOOL_FOLDERS if os.path.islink(self.root / sub)]
        if links:
            raise ConfigError([(f"the spool folder {self.root / links[0]} is a symbolic link; "
                                "a spool keeps its folders inside it")])

    def writable(self) -> bool:
        """True when tmp/ and new/ are writable folders on a file system with room left.

        Asked on every forgot-password request, so it reads metadata only: creating a probe
        file cost 0.3 ms of journal work, more than the whole rest of the request.
        """
        tmp, new = f"{self.root}/tmp", f"{self.root}/new"
        try:
            disk = os.statvfs(tmp)
        except OSError:
            return False
        full = disk.f_bavail * disk.f_frsize < SPOOL_MIN_FREE_BYTES or (
            disk.f_files > 0 and disk.f_favail == 0)
        return (not full and not disk.f_flag & os.ST_RDONLY and os.path.isdir(tmp)
                and os.path.isdir(new) and os.access(tmp, os.W_OK) and os.access(new, os.W_OK))

    # -- claiming -- #

    def claim(self, limit: int) -> tuple[list[Claim], float | None]:
        """Claim up to limit due messages, most urgent first; also return the next due time."""
        now_ms = int(self.clock() * 1000)
        if self._index.needs_scan() or self._nothing_due(now_ms):
            self._index.rebuild(_scan_names(self.root / "new"))
        owner = _process_token(os.getpid())
        claims: list[Claim] = []
        while len(claims) < limit:
            entries = self._index.pop_due(now_ms, limit - len(claims))
            if not entries:
                break
            claims += [c for entry in entries if (c := self._claim_one(entry, owner))]
        next_due = self._index.next_due_ms()
        return claims, (next_due / 1000 if next_due is not None else None)

    def _nothing_due(self, now_ms: int) -> bool:
        next_due = self._index.next_due_ms()
        return next_due is None or next_due > now_ms

    def _claim_one(self, entry: str, owner: str) -> Claim | None:
        target = self.root / "cur" / f"{entry}.{owner}"
        try:
            os.rename(self.root / "new" / entry, target)
        except FileNotFoundError:
            return None  # another worker claimed it first
        return Claim(SpoolName.parse(entry), self, target)

    def read(self, claim: Claim) -> SpooledMessage:
        """Read a claimed message; raise SpoolError when the file is not a spool entry."""
        try:
            raw = _read_regular(claim.path) if claim.path else b""
        except OSError as exc:
            raise SpoolError(f"spool entry {claim.name.id} is unreadable") from exc
        return _parse_entry(raw, claim.name, self._mac_key)

    # -- settling a claim -- #

    def ack(self, claim: Claim) -> None:
        """Forget a delivered message."""
        _unlink_quietly(claim.path)
        if claim.name.attempt:  # only a deferred message has a last reply kept
            _unlink_quietly(f"{self.root}/replies/{claim.name.id}")

    def defer(self, claim: Claim, due: float, reply: str = "") -> None:
        """Put a message back for another attempt at `due`; keep reply for `sysmail queue`."""
        name = dataclasses.replace(claim.name, due_ms=int(due * 1000),
                                   attempt=claim.name.attempt + 1)
        if reply:
            _write_file_atomically(self.root / "replies" / claim.name.id, reply.encode(),
                                   self.root / "tmp")
        self._return(claim, str(name))

    def release(self, claim: Claim, due: float | None = None) -> None:
        """Put a message back with its attempt unchanged, due now (or at due)."""
        name = claim.name if due is None else dataclasses.replace(claim.name,
                                                                  due_ms=int(due * 1000))
        self._return(claim, str(name))

    def _return(self, claim: Claim, entry: str) -> None:
        os.rename(claim.path, self.root / "new" / entry)
        _fsync_dir(self.root / "new")  # a power loss must not take the move back
        self._index.add(entry)

    def fail(self, claim: Claim, reason: dict) -> None:
        """Move a message to failed/ with its reason written beside it first."""
        self._write_reason(str(claim.name), reason)
        os.rename(claim.path, self.root / "failed" / str(claim.name))
        _fsync_dir(self.root / "failed")
        _unlink_quietly(self.root / "replies" / claim.name.id)  # the reason has the reply

    def add_failed(self, message: SpooledMessage, rcpts: tuple[str, ...], reason: dict) -> None:
        """Write a dead letter for some recipients of a message whose others were served."""
        name = SpoolName(message.priority, 0, message.attempt, self._new_id())
        self._write_reason(str(name), reason)
        _write_file_atomically(self.root / "failed" / str(name),
                               _entry_bytes(message.header(rcpts), message.data, self._mac_key),
                               self.root / "tmp")

    def _write_reason(self, name: str, reason: dict) -> None:
        body = json.dumps({**reason, "failed_at": self.clock()}).encode()
        _write_file_atomically(self.root / "failed" / f"{name}.json", body, self.root / "tmp")

    # -- maintenance -- #

    def recover(self) -> int:
        """Return claims of dead processes to new/; return how many were taken back."""
        taken = 0
        for entry in _scan(self.root / "cur"):
            base, _, owner = entry.rpartition(".")
            if _parse_name(base) is None or _owner_alive(owner):
                continue
            try:
                os.rename(self.root / "cur" / entry, self.root / "new" / base)
            except FileNotFoundError:
                continue  # another worker recovered it
            self._index.add(base)
            taken += 1
        return taken

    def clean_tmp(self) -> int:
        """Remove tmp/ files older than 36 hours (left by crashed writers); return the count."""
        old = self._older_than(self.root / "tmp", TMP_MAX_AGE_SECONDS)
        for entry in old:
            _unlink_quietly(self.root / "tmp" / entry)
        return len(old)

    def clean_failed(self, max_age: float) -> int:
        """Remove dead letters that failed more than max_age seconds ago; return the count."""
        reasons = self._older_than(self.root / "failed", max_age)
        for reason in (entry for entry in reasons if entry.endswith(".json")):
            _unlink_quietly(self.root / "failed" / reason.removesuffix(".json"))
            _unlink_quietly(self.root / "failed" / reason)
        return sum(entry.endswith(".json") for entry in reasons)

    def _older_than(self, folder: Path, max_age: float) -> list[str]:
        limit, old = self.clock() - max_age, []
        for entry in _scan(folder):
            with contextlib.suppress(FileNotFoundError):
                if (folder / entry).stat().st_mtime < limit:
                    old.append(entry)
        return old

    # -- dead letters -- #

    def failed(self) -> list[dict]:
        """The dead letters with their reasons, oldest first."""
        letters = []
        for entry in sorted(_scan(self.root / "failed")):
            name = _parse_name(entry)
            if name is None or entry.endswith(".json"):
                continue
            letters.append({"id": name.id, **self._reason(entry)})
        return sorted(letters, key=lambda d: d.get("failed_at", 0))

    def _reason(self, entry: str) -> dict:
        try:
            return json.loads(_read_regular(self.root / "failed" / f"{entry}.json"))
        except (OSError, ValueError):
            return {"reason": "unknown"}

    def retry(self, ids: list[str] | None = None) -> list[str]:
        """Put dead letters (all when ids is None) back in new/, due now; return the ids moved."""
        moved = []
        for entry in _scan(self.root / "failed"):
            name = _parse_name(entry)
            if name is None or entry.endswith(".json") or (ids is not None and name.id not in ids):
                continue
            if self._reason(entry).get("redacted"):
                continue  # its link or code is gone: the user asks again instead
            fresh = str(dataclasses.replace(name, due_ms=int(self.clock() * 1000), attempt=0))
            os.rename(self.root / "failed" / entry, self.root / "new" / fresh)
            _fsync_dir(self.root / "new")
            _unlink_quietly(self.root / "failed" / f"{entry}.json")
            self._index.add(fresh)
            self._wakeups.notify(fresh)
            moved.append(name.id)
        return moved

    # -- the operators' view: sysmail queue, show, delete -- #

    def messages(self, states: tuple[str, ...] = ("new", "cur", "failed"),
                 ) -> Iterator[tuple[str, SpoolName, Path]]:
        """(state, name, path) of every message in the given folders."""
        for state in states:
            for entry in _scan(self.root / state):
                name = None if entry.endswith(".json") else _parse_name(entry)
                if name is not None:
                    yield state, name, self.root / state / entry

    def peek(self, name: SpoolName, path: Path) -> SpooledMessage | None:
        """A message as stored, for an operator's eyes: not authenticated (the sender does
        that before it sends); None when it is gone or not a queue entry."""
        try:
            return _peek_entry(_read_regular(path), name)
        except OSError:
            return None

    def entries(self, states: tuple[str, ...] = ("new", "cur")) -> list[dict]:
        """The messages in the given states, most urgent and soonest due first: id, state,
        header fields, attempt, next try and the relay's last reply."""
        return sorted((_entry_row(name, "sending" if state == "cur" else state,
                                  self.peek(name, path), self._last_reply(name, state))
                       for state, name, path in self.messages(states)), key=_queue_order)

    def _last_reply(self, name: SpoolName, state: str) -> str:
        try:
            if state == "failed":
                return self._reason(str(name)).get("reply", "")
            return _read_regular(self.root / "replies" / name.id).decode() if name.attempt else ""
        except (OSError, UnicodeDecodeError):
            return ""

    def delete(self, ident: str) -> str:
        """Remove a queued or dead message: "deleted"; "sending" when a worker holds it (it is
        left alone: its SMTP transaction may be under way); "missing" when there is none."""
        for state, name, path in self.messages():
            if name.id != ident:
                continue
            if state == "cur":
                return "sending"
            try:
                os.unlink(path)  # a claim renames it away first: then this fails, never both
            except FileNotFoundError:
                return "sending"
            _fsync_dir(path.parent)
            _unlink_quietly(f"{path}.json")
            _unlink_quietly(self.root / "replies" / ident)
            return "deleted"
        return "missing"

    # -- status -- #

    def counts(self) -> dict:
        """Messages per state (new = due now, deferred = due later), and the oldest one's age.

        A folder unchanged for a second is not read again (its census is kept): /metrics then
        costs the same with 50,000 messages waiting as with 10."""
        now = self.clock()
        new, cur, failed = (self._census(state) for state in ("new", "cur", "failed"))
        due = bisect.bisect_right(new.due_ms, now * 1000)
        oldest = min(new.oldest, cur.oldest)
        retry_in = new.due_ms[due] / 1000 - now if due < len(new.due_ms) else None
        return {"new": due, "deferred": len(new.due_ms) - due, "cur": len(cur.due_ms),
                "failed": len(failed.due_ms),
                "oldest_age_seconds": round(max(now - oldest, 0), 3) if oldest < math.inf else 0,
                "next_retry_in_seconds": round(retry_in, 3) if retry_in is not None else None}

    def _census(self, state: str) -> _Census:
        folder = self.root / state
        try:
            changed = os.stat(folder).st_mtime_ns
        except FileNotFoundError:
            return _Census(0, [], math.inf)
        except OSError as exc:
            raise SpoolError(f"cannot read the spool folder {folder}: {exc.strerror}") from exc
        kept = self._censuses.get(state)
        settled = time.time_ns() - changed > CENSUS_SETTLED_NS  # coarse mtimes: wait a second
        if kept is not None and ((kept.changed_ns == changed and settled) or (
                kept.scan_seconds > CENSUS_SLOW_SECONDS
                and time.monotonic() - kept.read_at < 10 * kept.scan_seconds)):
            return kept  # unchanged, or so large that counts a few seconds old must do
        started = time.monotonic()
        due_ms, first = [], ""  # ids start with fixed-width hex time: the least is the oldest
        for entry in _scan_names(folder):
            parts = entry.split(".", 4)
            if (len(parts) < 4 or entry.endswith(".json")
                    or not (parts[0].isdigit() and parts[1].isdigit() and parts[2].isdigit())):
                continue  # a foreign name: not mail
            due_ms.append(int(parts[1]))
            first = min(first, parts[3][:13]) if first else parts[3][:13]
        due_ms.sort()
        census = _Census(changed, due_ms, _id_time(first) if first else math.inf,
                         time.monotonic(), time.monotonic() - started)
        self._censuses[state] = census
        return census

    def mark_sent(self) -> None:
        """Record that a message was just delivered (for status and health checks)."""
        stamp = self.root / "last-sent"
        try:
            os.utime(stamp)
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                stamp.touch(mode=SPOOL_FILE_MODE)
                _give_to_folder_owner(stamp, self.root)
        except OSError:
            pass  # a broken spool must not fail a delivery that already happened

    def last_sent(self) -> float | None:
        """When a message was last delivered from this spool, or None."""
        try:
            return (self.root / "last-sent").stat().st_mtime
        except OSError:
            return None

    # -- waking workers -- #

    def notify(self, entry: str = "") -> None:
        """Tell every worker on this spool that entry is in new/ (or just to look)."""
        self._wakeups.notify(entry)

    def listen(self, on_wake: Callable[[], None]) -> _WakeListener | None:
        """Index what other processes enqueue, and call on_wake for every new entry."""
        def arrived(entry: str) -> None:
            if entry == "!":  # look now (mail went to Redis, or the listener is closing)
                on_wake()
            elif _NEW_ENTRY.fullmatch(entry) and os.path.exists(f"{self.root}/new/{entry}"):
                self._index.add(entry)  # a name costs one lookup, never a claim attempt
                on_wake()
        return self._wakeups.listen(arrived, on_wake)


class _Wakeups:
    """Wake-ups for the workers of one spool: this process's sender is called directly, other
    processes' get a datagram on the abstract unix socket each registers in wake/."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._socket: socket.socket | None = None
        self._own_listener = ""
        self._local: Callable[[], None] = lambda: None

    def notify(self, entry: str = "") -> None:
        """Wake this process's sender, and send entry's name to every other listener."""
        self._local()
        if not sys.platform.startswith("linux"):
            return  # workers fall back to their idle poll
        if self._socket is None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._socket.setblocking(False)
        try:
            listeners = _scan(self.folder)
        except SpoolError:
            return  # no one can be listening on a broken spool
        for listener in listeners:
            if listener == self._own_listener:
                continue  # this process indexed it already
            try:
                self._socket.sendto(entry.encode() or b"!", _WAKE_PREFIX + listener)
            except BlockingIOError:
                pass  # its queue is full: it is awake already
            except (ConnectionRefusedError, FileNotFoundError):
                _unlink_quietly(self.folder / listener)

    def listen(self, arrived: Callable[[str], None],
               local: Callable[[], None]) -> _WakeListener | None:
        """Receive other processes' names (arrived) and this one's wake-ups (local)."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            listener = _WakeListener(self.folder, arrived)
        except OSError:
            return None  # a broken spool: the sender still polls, and drains Redis
        self._own_listener, self._local = listener.name, local
        return listener


class _WakeListener:
    """A thread receiving wake-up datagrams on an abstract unix socket registered in wake/."""

    def __init__(self, folder: Path, on_wake: Callable[[str], None]):
        self._marker = folder / f"{os.getpid()}-{secrets.token_hex(6)}"
        self.name = self._marker.name
        self._address = _WAKE_PREFIX + self._marker.name
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # who sent it
        self._socket.bind(self._address)
        self._marker.touch(mode=SPOOL_FILE_MODE)
        _give_to_folder_owner(self._marker, folder)
        self._on_wake = on_wake
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="sysmail-wake", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        uid = os.getuid()
        while True:
            data, ancillary, _, _ = self._socket.recvmsg(256, socket.CMSG_SPACE(12))
            if self._closing:
                return
            if _sender_uid(ancillary) == uid:  # an abstract socket has no permissions of its own
                self._on_wake(data.decode("ascii", "replace"))

    def close(self) -> None:
        """Stop listening and unregister."""
        self._closing = True
        _unlink_quietly(self._marker)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as poke:
            poke.sendto(b"!", self._address)
        self._thread.join(timeout=2)
        self._socket.close()


def _sender_uid(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The user id in a datagram's SCM_CREDENTIALS (the kernel vouches for it), or None."""
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 12:
            return int.from_bytes(payload[4:8], sys.byteorder)
    return None


def _entry_bytes(header: dict, data: bytes, key: bytes) -> bytes:
    """A queue entry: the format tag, its MAC, the JSON header on one line, then the message."""
    body = json.dumps(header, separators=(",", ":")).encode() + b"\n" + data
    return SPOOL_FORMAT + _entry_mac(key, body) + b" " + body


def _entry_mac(key: bytes, body: bytes) -> bytes:
    return hmac.new(key, body, hashlib.sha256).hexdigest().encode()


def _parse_entry(raw: bytes, name: SpoolName, key: bytes) -> SpooledMessage:
    """Parse a queue entry; UnauthenticatedEntry when its MAC is wrong (forged, truncated,
    or written under another key), SpoolError when it is not an entry at all."""
    tag, mac, body = raw[:len(SPOOL_FORMAT)], raw[len(SPOOL_FORMAT):][:64], raw[_ENTRY_BODY_AT:]
    if tag != SPOOL_FORMAT or not hmac.compare_digest(mac, _entry_mac(key, body)):
        raise UnauthenticatedEntry(f"queue entry {name.id} fails its authentication")
    return _entry_message(body, name)


_ENTRY_BODY_AT = len(SPOOL_FORMAT) + 64 + 1  # after the format tag, the hex MAC and a space


def _entry_message(body: bytes, name: SpoolName) -> SpooledMessage:
    """The message in an entry's body (JSON header line, then the bytes); SpoolError if none."""
    try:
        head, _, data = body.partition(b"\n")
        meta = json.loads(head)
        if not meta["to"] or not all(isinstance(r, str) for r in meta["to"]):
            raise ValueError("no recipients")
        return SpooledMessage(name.id, meta["message_id"], meta["from"], tuple(meta["to"]),
                              meta.get("template", ""), meta["queued_at"], meta["expires_at"],
                              name.priority, name.attempt, data)
    except (ValueError, KeyError, TypeError) as exc:
        raise SpoolError(f"queue entry {name.id} is unreadable") from exc


def _peek_entry(raw: bytes, name: SpoolName) -> SpooledMessage | None:
    """The message in a queue entry, unauthenticated (for an operator's eyes only)."""
    try:
        return _entry_message(raw[_ENTRY_BODY_AT:], name)
    except SpoolError:
        return None


def _entry_row(name: SpoolName, state: str, message: SpooledMessage | None,
               last_reply: str) -> dict:
    """One line of `sysmail queue`, as a dict (its --json)."""
    return {"id": name.id, "state": state, "message_id": message.message_id if message else "",
            "kind": (message.template or "ad-hoc") if message else "unreadable",
            "to": list(message.rcpts) if message else [],
            "queued_at": message.queued_at if message else _id_time(name.id),
            "attempt": name.attempt, "next_try": name.due_ms / 1000,
            "priority": PRIORITY_NAMES.get(name.priority, str(name.priority)),
            "last_reply": last_reply}


def _queue_order(row: dict) -> tuple:
    """Being sent first, then urgent before bulk, then soonest due."""
    return (row["state"] != "sending", row["priority"] != "urgent", row["next_try"])


def _make_private_dir(path: Path) -> None:
    path.mkdir(mode=SPOOL_DIR_MODE, parents=True, exist_ok=True)
    if path.parent.exists() and path.stat().st_uid == 0:
        _give_to_folder_owner(path, path.parent)


def _give_to_folder_owner(target: int | Path | str, folder: Path | str) -> None:
    """As root, give a file or folder just made inside someone else's folder to that folder's
    owner: a service reads what an operator's root shell queued in its spool (a file only
    root can read would become an "unreadable" dead letter). OSError when it cannot."""
    if os.geteuid() != 0:
        return
    owner = os.stat(folder)
    if owner.st_uid or owner.st_gid:
        os.chown(target, owner.st_uid, owner.st_gid)  # target may be an open descriptor


def _read_regular(path: Path | str) -> bytes:
    """A regular file's bytes; OSError for anything else (a FIFO, a socket or a device that
    someone put in the spool must never block the sender)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        status = os.fstat(fd)
        if not stat.S_ISREG(status.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        data = os.read(fd, status.st_size + 1)  # a short read of a regular file is its end
        while len(data) > status.st_size and (more := os.read(fd, 1 << 20)):
            data += more  # it grew since fstat
        return data
    finally:
        os.close(fd)


def _create_private(path: Path | str) -> None:
    """Create an empty file readable by its owner only, whatever the umask (if it is new)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SPOOL_FILE_MODE))
        os.chmod(path, SPOOL_FILE_MODE)  # the mode given to open() is masked by the umask


def _write_all(fd: int, payload: bytes) -> None:
    view = memoryview(payload)
    while view:
        view = view[os.write(fd, view):]


def _write_synced(path: Path | str, payload: bytes,
                  sync: Callable[[int], None] = os.fsync) -> None:
    """Create a new private file with payload and sync it (never over an existing one)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SPOOL_FILE_MODE)
    try:
        _give_to_folder_owner(fd, os.path.dirname(path))
        _write_all(fd, payload)
        sync(fd)
    except BaseException:
        _unlink_quietly(path)  # a full disk leaves no half-written file behind
        raise
    finally:
        os.close(fd)


def _write_file_atomically(path: Path, payload: bytes, tmp_dir: Path) -> None:
    """Write payload to path via a synced temporary file, then sync the folder."""
    tmp = tmp_dir / f"{path.name}.{secrets.token_hex(4)}"
    _write_synced(tmp, payload)
    os.rename(tmp, path)
    _fsync_dir(path.parent)


def _move_no_replace(source: str, target: str) -> None:
    """Rename, but fail rather than overwrite: renameat2(RENAME_NOREPLACE) where Linux has it,
    else link and unlink (Maildir's way)."""
    renameat2 = _libc_function("renameat2")
    if renameat2 is not None:
        if renameat2(-100, source.encode(), -100, target.encode(), 1) == 0:  # AT_FDCWD, NOREPLACE
            return
        error = ctypes.get_errno()
        if error not in (errno.ENOSYS, errno.EINVAL):  # not a file system without it
            raise OSError(error, os.strerror(error), target)
    try:
        os.link(source, target)
    finally:
        os.unlink(source)


@functools.cache
def _libc_function(name: str) -> Callable[..., int] | None:
    """A function of libc (renameat2, syncfs), or None where there is none."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None


def _sync_files(fds: list[int]) -> None:
    """Make the data of these files (all on one file system) durable: fsync a lone file;
    for several, one syncfs of the file system: one journal commit instead of one each."""
    syncfs = _libc_function("syncfs") if len(fds) > 1 else None
    if syncfs is not None:
        if syncfs(fds[0]) == 0:
            return
        error = ctypes.get_errno()
        if error != errno.ENOSYS:
            raise OSError(error, os.strerror(error))
    for fd in fds:
        os.fsync(fd)


def _fsync_dir(path: Path | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _scan_names(folder: Path) -> Iterator[str]:
    """The names in a spool folder one at a time (a million cost no list of a million);
    SpoolError when it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                yield entry.name
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SpoolError(f"cannot read the spool folder {folder}: {exc.strerror}") from exc


def _scan(folder: Path) -> list[str]:
    """Names in a spool folder (empty when it is missing); SpoolError when it cannot be read."""
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise SpoolError(f"cannot read the spool folder {folder}: {exc.strerror}") from exc


def _parse_name(entry: str) -> SpoolName | None:
    try:
        return SpoolName.parse(entry.removesuffix(".json"))
    except ValueError:
        return None


def _unlink_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _id_time(ident: str) -> float:
    """The enqueue time encoded at the front of a spool id (13 hex digits of microseconds)."""
    try:
        return int(ident[:13], 16) / 1e6
    except ValueError:
        return time.time()


def _process_token(pid: int) -> str:
    """pid-starttime of a process ("pid-0" where /proc is missing, "pid-dead" for a zombie);
    identifies it across pid reuse."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        start = "dead" if fields[0] in ("Z", "X") else fields[19]
    except (OSError, IndexError):
        start = "0"
    return f"{pid}-{start}"


def _owner_alive(owner: str) -> bool:
    """True when the process that made a claim still runs."""
    pid_text, _, _ = owner.partition("-")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    token = _process_token(pid)
    if token.endswith("-dead"):
        return False  # killed, not yet reaped by its parent: its claims are free
    # when its start time cannot be read (no /proc, or hidden), the pid's existence must do
    return token == owner or token.endswith("-0")


# ---- Redis fallback ---- #

REDIS_PREFIX = "sysmail:"
REDIS_CLAIM_LEASE_SECONDS = 300
REDIS_TIMEOUT_SECONDS = 2.0

_REDIS_CLAIM = """
local out = {}
local limit = tonumber(ARGV[3])
for i = 1, 2 do
  if #out >= limit then break end
  local ids = redis.call('ZRANGEBYSCORE', KEYS[i], '-inf', ARGV[1], 'LIMIT', 0, limit - #out)
  for _, id in ipairs(ids) do
    redis.call('ZREM', KEYS[i], id)
    redis.call('ZADD', KEYS[3], tonumber(ARGV[1]) + tonumber(ARGV[2]), id)
    redis.call('HSET', ARGV[5] .. id, 'owner', ARGV[4])
    local m = redis.call('HMGET', ARGV[5] .. id, 'entry', 'attempt', 'priority')
    table.insert(out, {id, m[1], m[2], m[3]})
  end
end
local next_due = false
for i = 1, 2 do
  local first = redis.call('ZRANGE', KEYS[i], 0, 0, 'WITHSCORES')
  if first[2] and (not next_due or tonumber(first[2]) < next_due) then
    next_due = tonumber(first[2])
  end
end
return {out, next_due and tostring(next_due) or ''}
"""

# Move a claimed message back to its queue when its claim is still the one we looked at.
_REDIS_UNCLAIM = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) == false then return 0 end
if ARGV[4] ~= '' and redis.call('HGET', ARGV[5] .. ARGV[1], 'owner') ~= ARGV[4] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
local priority = redis.call('HGET', ARGV[5] .. ARGV[1], 'priority') or '1'
redis.call('ZADD', ARGV[6] .. priority, ARGV[2], ARGV[1])
if ARGV[3] ~= '' then redis.call('HSET', ARGV[5] .. ARGV[1], 'attempt', ARGV[3]) end
redis.call('HDEL', ARGV[5] .. ARGV[1], 'owner')
return 1
"""

# A relay's pace shared by the fleet: KEYS bucket, day counter; ARGV now, rate, burst, needed,
# quota (0: none), seconds to the day's end. Returns {wait seconds, messages sent today}.
_REDIS_PACE = """
local now, rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local needed, quota = tonumber(ARGV[4]), tonumber(ARGV[5])
local used = tonumber(redis.call('GET', KEYS[2]) or '0')
if quota > 0 and used >= quota then return {ARGV[6], tostring(used)} end
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens, updated = tonumber(bucket[1]) or burst, tonumber(bucket[2]) or now
tokens = math.min(burst, tokens + math.max(now - updated, 0) * rate)
local wait = 0
if tokens < needed then wait = (needed - tokens) / rate else tokens = tokens - 1 end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], 86400)
if wait == 0 then
  used = redis.call('INCR', KEYS[2])
  redis.call('EXPIRE', KEYS[2], 2 * 86400)
end
return {tostring(wait), tostring(used)}
"""


class RedisQueue:
    """The fallback queue, used when the spool cannot be written; the same protocol as Spool.

        enqueue  HSET msg:ID entry,priority,attempt + ZADD queue:P DUE ID   (one MULTI)
        claim    Lua: ZRANGEBYSCORE queue:P <= now -> ZREM, ZADD claimed LEASE ID, owner
        sent     DEL msg:ID, ZREM claimed ID
        defer    claimed -> queue:P at DUE', attempt+1
        release  claimed -> queue:P now
        fail     HSET reason, claimed -> failed
        recover  claims past their lease, or whose owner on this host is gone -> queue:P

    Entries are the spool's bytes (header line + message). A standalone Redis with AOF
    (appendfsync everysec or always) and maxmemory-policy noeviction is assumed.
    """

    def __init__(self, url: str, clock: Clock = time.time, prefix: str = REDIS_PREFIX, *,
                 key: bytes = UNKEYED_QUEUE_KEY, dead_letter_seconds: float = 14 * DAY_SECONDS):
        import redis

        self.clock = clock
        self.dead_letter_seconds = dead_letter_seconds
        self._mac_key = key
        self.prefix = prefix
        self._errors = (redis.exceptions.RedisError, OSError)
        self._redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                           socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self._claim_script = self._redis.register_script(_REDIS_CLAIM)
        self._unclaim_script = self._redis.register_script(_REDIS_UNCLAIM)
        self._pace_script = self._redis.register_script(_REDIS_PACE)
        self._owner = f"{socket.gethostname()}:{_process_token(os.getpid())}"
        self._url = _redact_url(url)

    def __repr__(self) -> str:
        return f"RedisQueue({self._url!r})"

    def _key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def _call(self, work: Callable[[], object]) -> object:
        """Run Redis commands; any failure to reach Redis becomes QueueUnavailable."""
        try:
            return work()
        except self._errors as exc:
            raise QueueUnavailable(f"Redis is unavailable ({exc.__class__.__name__})") from exc

    # -- writing -- #

    def enqueue(self, header: dict, data: bytes, priority: int, due: float | None = None,
                attempt: int = 0) -> str:
        """Store a message in Redis and return its id; raise QueueUnavailable on failure."""
        ident = f"{int(self.clock() * 1e6):x}r{secrets.token_hex(6)}"
        due_ms = int((self.clock() if due is None else due) * 1000)

        def write() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._key("msg", ident), mapping={
                "entry": _entry_bytes(header, data, self._mac_key), "priority": priority,
                "attempt": attempt})
            pipe.zadd(self._key("queue", str(priority)), {ident: due_ms})
            pipe.execute()
        self._call(write)
        return ident

    # -- claiming -- #

    def claim(self, limit: int) -> tuple[list[Claim], float | None]:
        """Claim up to limit due messages, most urgent first; also return the next due time."""
        now_ms = int(self.clock() * 1000)
        keys = [self._key("queue", "0"), self._key("queue", "1"), self._key("claimed")]
        args = [now_ms, REDIS_CLAIM_LEASE_SECONDS * 1000, limit, self._owner, self._key("msg", "")]
        rows, next_due = self._call(lambda: self._claim_script(keys=keys, args=args))
        claims = [Claim(SpoolName(int(priority or 1), now_ms, int(attempt or 0), ident.decode()),
                        self, entry=entry or b"") for ident, entry, attempt, priority in rows]
        return claims, (int(next_due) / 1000 if next_due else None)

    def read(self, claim: Claim) -> SpooledMessage:
        """Parse a claimed message (its bytes came with the claim)."""
        return _parse_entry(claim.entry, claim.name, self._mac_key)

    # -- settling a claim -- #

    def ack(self, claim: Claim) -> None:
        """Forget a delivered message."""
        def forget() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._key("claimed"), claim.name.id)
            pipe.delete(self._key("msg", claim.name.id))
            pipe.execute()
        self._call(forget)

    def defer(self, claim: Claim, due: float, reply: str = "") -> None:
        """Put a message back for another attempt at `due`."""
        if reply:
            self._call(lambda: self._redis.hset(self._key("msg", claim.name.id), "reply", reply))
        self._unclaim(claim.name.id, due, claim.name.attempt + 1, self._owner)

    def release(self, claim: Claim, due: float | None = None) -> None:
        """Put a message back with its attempt unchanged, due now (or at due)."""
        self._unclaim(claim.name.id, self.clock() if due is None else due, None, self._owner)

    def _unclaim(self, ident: str, due: float, attempt: int | None, owner: str) -> bool:
        args = [ident, int(due * 1000), "" if attempt is None else attempt, owner,
                self._key("msg", ""), self._key("queue", "")]
        return bool(self._call(lambda: self._unclaim_script(keys=[self._key("claimed")],
                                                            args=args)))

    def fail(self, claim: Claim, reason: dict) -> None:
        """Move a message to the dead letters with its reason."""
        def bury() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._key("msg", claim.name.id), "reason",
                      json.dumps({**reason, "failed_at": self.clock()}))
            pipe.zrem(self._key("claimed"), claim.name.id)
            pipe.zadd(self._key("failed"), {claim.name.id: self.clock()})
            pipe.expire(self._key("msg", claim.name.id), int(self.dead_letter_seconds))
            pipe.execute()
        self._call(bury)

    def add_failed(self, message: SpooledMessage, rcpts: tuple[str, ...], reason: dict) -> None:
        """Write a dead letter for some recipients of a message whose others were served."""
        ident = f"{int(self.clock() * 1e6):x}r{secrets.token_hex(6)}"

        def bury() -> None:
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(self._key("msg", ident), mapping={
                "entry": _entry_bytes(message.header(rcpts), message.data, self._mac_key),
                "priority": message.priority, "attempt": message.attempt,
                "reason": json.dumps({**reason, "failed_at": self.clock()})})
            pipe.zadd(self._key("failed"), {ident: self.clock()})
            pipe.expire(self._key("msg", ident), int(self.dead_letter_seconds))
            pipe.execute()
        self._call(bury)

    # -- maintenance, dead letters, status -- #

    def recover(self) -> int:
        """Return claims past their lease, or held by a dead process of this host; return count."""
        self._forget_expired_dead_letters()
        now = self.clock()
        claimed = self._call(lambda: self._redis.zrange(self._key("claimed"), 0, 999,
                                                        withscores=True))
        taken = 0
        for ident_bytes, lease_ms in claimed:
            ident = ident_bytes.decode()
            owner = (self._call(lambda i=ident: self._redis.hget(self._key("msg", i), "owner"))
                     or b"").decode()
            host, _, token = owner.partition(":")
            dead = host == socket.gethostname() and not _owner_alive(token)
            if (dead or lease_ms <= now * 1000) and self._unclaim(ident, now, None, owner):
                taken += 1
        return taken

    def failed(self) -> list[dict]:
        """The dead letters with their reasons, oldest first (expired ones forgotten)."""
        self._forget_expired_dead_letters()
        ids = self._call(lambda: self._redis.zrange(self._key("failed"), 0, -1))
        letters = []
        for ident in ids:
            raw = self._call(lambda i=ident: self._redis.hget(self._key("msg", i.decode()),
                                                              "reason"))
            letters.append({"id": ident.decode(), **json.loads(raw or b"{}"), "queue": "redis"})
        return letters

    def _forget_expired_dead_letters(self) -> None:
        """Dead letters expire with their message hash; drop their ids from the list too."""
        limit = self.clock() - self.dead_letter_seconds
        self._call(lambda: self._redis.zremrangebyscore(self._key("failed"), "-inf", limit))

    def retry(self, ids: list[str] | None = None) -> list[str]:
        """Put dead letters (all when ids is None) back in their queue, due now."""
        moved = []
        for letter in self.failed():
            ident = letter["id"]
            if (ids is not None and ident not in ids) or letter.get("redacted"):
                continue
            priority = self._call(lambda i=ident: self._redis.hget(self._key("msg", i),
                                                                   "priority")) or b"1"
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(self._key("failed"), ident)
            pipe.hset(self._key("msg", ident), mapping={"attempt": 0})
            pipe.hdel(self._key("msg", ident), "reason")
            pipe.zadd(self._key("queue", priority.decode()), {ident: int(self.clock() * 1000)})
            self._call(pipe.execute)
            moved.append(ident)
        return moved

    def entries(self) -> list[dict]:
        """The messages waiting or being sent, like Spool.entries (each with "queue": "redis")."""
        def members() -> list:
            pipe = self._redis.pipeline(transaction=False)
            for key in (self._key("queue", "0"), self._key("queue", "1"), self._key("claimed")):
                pipe.zrange(key, 0, -1, withscores=True)
            return pipe.execute()
        urgent, bulk, claimed = self._call(members)
        rows = []
        for state, ident, score in [("new", i, s) for i, s in urgent + bulk] + [
                ("sending", i, s) for i, s in claimed]:
            entry, attempt, priority, reply = self._call(lambda i=ident: self._redis.hmget(
                self._key("msg", i.decode()), "entry", "attempt", "priority", "reply"))
            name = SpoolName(int(priority or 1), int(score), int(attempt or 0), ident.decode())
            rows.append({**_entry_row(name, state, _peek_entry(entry or b"", name),
                                      (reply or b"").decode()), "queue": "redis"})
        return sorted(rows, key=_queue_order)

    def counts(self) -> dict:
        """Messages per state, like Spool.counts."""
        now_ms = int(self.clock() * 1000)

        def count() -> list:
            pipe = self._redis.pipeline(transaction=False)
            for priority in ("0", "1"):
                pipe.zcount(self._key("queue", priority), "-inf", now_ms)
                pipe.zcount(self._key("queue", priority), f"({now_ms}", "+inf")
            pipe.zcard(self._key("claimed"))
            pipe.zcard(self._key("failed"))
            return pipe.execute()
        new0, later0, new1, later1, cur, failed = self._call(count)
        return {"new": new0 + new1, "deferred": later0 + later1, "cur": cur, "failed": failed}

    def ping(self) -> None:
        """Raise QueueUnavailable unless Redis answers."""
        self._call(self._redis.ping)

    def take_pace(self, relay: str, now: float, rate: float, burst: float, needed: float,
                  quota: float, day_end: float) -> tuple[float, int]:
        """Take one message's room in a relay's token bucket and daily count, shared by every
        host of this Redis: (seconds to wait, 0 when it may go now; messages sent today)."""
        day = int(now // DAY_SECONDS)
        keys = [self._key("pace", relay), self._key("pace", relay, str(day))]
        wait, used = self._call(lambda: self._pace_script(
            keys=keys, args=[repr(now), repr(rate), repr(burst), repr(needed), repr(quota),
                             repr(day_end - now)]))
        return float(wait), int(used)

    def check_durability(self) -> list[str]:
        """Warnings when Redis could evict or lose queued mail."""
        try:
            policy = self._redis.config_get("maxmemory-policy").get("maxmemory-policy")
            aof = self._redis.config_get("appendonly").get("appendonly")
        except self._errors as exc:
            return [f"could not read the Redis configuration ({exc.__class__.__name__})"]
        warnings = []
        if policy != "noeviction":
            warnings.append(f"Redis maxmemory-policy is {policy}: queued mail could be evicted "
                            "(set noeviction)")
        if aof != "yes":
            warnings.append("Redis has no AOF (appendonly no): queued mail could be lost in a "
                            "restart (set appendonly yes)")
        return warnings


def _redact_url(url: str) -> str:
    """A URL without its password, fit for logs."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


# ---- Suppression ---- #

VERP_TAG_DAYS = 60  # older bounce tags are refused: a DSN comes within days, a complaint weeks
_VERP_CONTEXT = b"sysmail verp v1\0"
_UNSUBSCRIBE_CONTEXT = b"sysmail unsubscribe v1\0"
SUPPRESSION_FILE = "suppressions.json"
SUPPRESSION_REFRESH_SECONDS = 10.0
URGENT_TO_SUPPRESSED_SECONDS = 3600  # mail the user asked for still goes, once an hour
SOFT_BOUNCE_DAYS, SOFT_BOUNCE_WINDOW_DAYS = 3, 7  # soft bounces on 3 days within 7: as hard
ANNOUNCEMENTS = "service-announcement"  # the one kind of mail a recipient may unsubscribe from
EVERYTHING = "all"
SUPPRESSION_REASONS = ("hard-bounce", "soft-bounces", "complaint", "unsubscribe")
BOUNCE_KINDS = ("hard", "soft", "complaint")


def verp_address(bounce_address: str, key: bytes, message_id: str, rcpt: str,
                 now: float) -> str:
    """The envelope sender of one message to one recipient: bounces+TAG@bounce-domain."""
    local, _, domain = bounce_address.rpartition("@")
    day = (int(now // DAY_SECONDS) % 65536).to_bytes(2, "big")
    head = day + hashlib.sha256(message_id.encode()).digest()[:3]
    tag = base64.b32encode(head + _verp_mac(key, head, rcpt)).decode().lower()
    return f"{local}+{tag}@{domain}"


def _verp_mac(key: bytes, head: bytes, rcpt: str) -> bytes:
    return hmac.new(key, _VERP_CONTEXT + head + rcpt.lower().encode(), hashlib.sha256).digest()[:10]


def verp_recipient(local_part: str, candidates: Iterable[str], key: bytes, now: float) -> str | None:
    """The candidate a bounce address's tag (TAG of bounces+TAG) names, or None for a forged,
    garbled or expired tag or one naming none of them.

    The tag holds the send day, 3 bytes of the Message-ID's hash and an 80-bit MAC of those
    and the recipient: 24 base32 letters (an MTA may lower-case them). A recipient address does
    not fit in a local part, so the caller offers the candidates the bounce names."""
    try:
        raw = base64.b32decode(local_part.rpartition("+")[2].upper())
    except ValueError:
        return None
    if len(raw) != 15:
        return None
    head, mac = raw[:5], raw[5:]
    if (int(now // DAY_SECONDS) - int.from_bytes(head[:2], "big")) % 65536 > VERP_TAG_DAYS:
        return None
    return next((c for c in candidates if hmac.compare_digest(mac, _verp_mac(key, head, c))),
                None)


def unsubscribe_token(key: bytes, address: str, scope: str = ANNOUNCEMENTS) -> str:
    """A token naming an address and the kind of mail it may unsubscribe from (MAC'd)."""
    payload = f"{scope} {address.lower()}".encode()
    mac = hmac.new(key, _UNSUBSCRIBE_CONTEXT + payload, hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(payload + mac).rstrip(b"=").decode()


def unsubscribe_target(key: bytes, token: str) -> tuple[str, str] | None:
    """(scope, address) an unsubscribe token names, or None when it is forged or garbled."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except ValueError:
        return None
    payload, mac = raw[:-16], raw[-16:]
    expected = hmac.new(key, _UNSUBSCRIBE_CONTEXT + payload, hashlib.sha256).digest()[:16]
    if len(raw) <= 16 or not hmac.compare_digest(mac, expected):
        return None
    scope, _, address = payload.decode("utf-8", "replace").partition(" ")
    return scope, address


@dataclass(frozen=True)
class Suppression:
    """One address not to mail: which kinds (scope: all, or one kind of mail), why, who said
    so, when, and until when (None: until removed)."""

    address: str
    scope: str
    reason: str
    source: str
    at: float
    expires: float | None = None

    def live(self, now: float) -> bool:
        """True until it expires."""
        return self.expires is None or now < self.expires

    @property
    def field(self) -> str:
        """Its name in the stored state: SCOPE ADDRESS."""
        return f"{self.scope} {self.address}"

    def as_json(self) -> dict[str, object]:
        """For the API and the CLI: times as ISO 8601 (expires null: until removed)."""
        return {**dataclasses.asdict(self), "at": _iso_time(self.at),
                "expires": _iso_time(self.expires) if self.expires else None}


class SuppressionList:
    """Addresses that must not get some mail, checked in memory (no I/O on the enqueue path).

    Stored as fields of one state, in the spool folder's suppressions.json (written atomically
    and fsynced, under a lock file) and, with REDIS_URL, in the Redis hash PREFIXsuppressions
    that every host shares (the file is then the local copy, read while Redis is down):

        "all ADDRESS" / "service-announcement ADDRESS"   a Suppression as JSON
        "soft ADDRESS"                                     the days it soft-bounced lately
        "bounces HOUR KIND"                                verified bounces that hour (24 h kept)

    refresh() reloads the state when it changed (the Redis version counter, the file's mtime);
    the service calls it every SUPPRESSION_REFRESH_SECONDS from its sender loop.
    """

    def __init__(self, folder: Path, clock: Clock = time.time, *, redis_url: str = "",
                 prefix: str = REDIS_PREFIX, hard_bounce_seconds: float = 30 * DAY_SECONDS):
        self.path = Path(folder) / SUPPRESSION_FILE
        self.clock = clock
        self.hard_bounce_seconds = hard_bounce_seconds
        self._key = f"{prefix}suppressions"
        self._lock = threading.Lock()
        self._state: dict[str, object] = {}
        self._entries: dict[tuple[str, str], Suppression] = {}
        self._urgent_sent: dict[str, float] = {}
        self._seen: object = None  # the version (or file mtime) the state was read at
        self._refreshed = float("-inf")
        self._redis = None
        if redis_url:
            import redis

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                               socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
            self._errors = (redis.exceptions.RedisError, OSError)
        self.refresh()

    # -- checking: memory only -- #

    def blocks(self, address: str, kind: str, priority: int) -> str | None:
        """Why mail of this kind (template name) and priority must not go to address now,
        or None. Bulk mail waits for nothing; urgent mail to an address suppressed for all
        mail goes at most once an hour."""
        now, key = self.clock(), address.lower()
        scoped = self._entries.get((kind, key))
        if scoped is not None and scoped.live(now):
            return scoped.reason
        entry = self._entries.get((EVERYTHING, key))
        if entry is None or not entry.live(now):
            return None
        if priority == BULK:
            return entry.reason
        with self._lock:
            if now - self._urgent_sent.get(key, float("-inf")) < URGENT_TO_SUPPRESSED_SECONDS:
                return f"{entry.reason}; urgent mail goes once an hour"
            self._urgent_sent[key] = now
        return None

    def entries(self) -> list[Suppression]:
        """The live suppressions, oldest first."""
        now = self.clock()
        return sorted((e for e in self._entries.values() if e.live(now)), key=lambda e: e.at)

    def bounces_last_24h(self) -> dict[str, int]:
        """Verified bounces and complaints of the last 24 hours, by kind (every host's)."""
        first = int(self.clock() // 3600) - 23
        counts = dict.fromkeys(BOUNCE_KINDS, 0)
        for name, value in list(self._state.items()):
            kind = name.rpartition(" ")[2]
            if (_bounce_hour(name) or 0) >= first and kind in counts and isinstance(value, int):
                counts[kind] += value
        return counts

    # -- changing -- #

    def suppress(self, address: str, reason: str, source: str, *, scope: str = EVERYTHING,
                 days: float | None = None) -> Suppression:
        """Put an address on the list (for days, or until removed) and store it at once."""
        now = self.clock()
        entry = Suppression(validate_address(address).lower(), scope, reason, source, now,
                            now + days * DAY_SECONDS if days else None)
        self._change({entry.field: dataclasses.asdict(entry)})
        log_event(logging.INFO, "suppression_added", address=entry.address, scope=scope,
                  reason=reason, source=source)
        return entry

    def unsuppress(self, address: str) -> int:
        """Take an address off the list (every scope); return how many entries went."""
        key = validate_address(address).lower()
        fields = [f"{scope} {key}" for scope, a in self._entries if a == key]
        if fields:
            self._change(dict.fromkeys(fields + [f"soft {key}"]))
            log_event(logging.INFO, "suppression_removed", address=key, entries=len(fields))
        return len(fields)

    def record_bounce(self, kind: str, address: str, reason: str, source: str
                      ) -> Suppression | None:
        """Count a verified bounce or complaint, and suppress the address when it calls for
        it: a hard bounce for SYSMAIL_HARD_BOUNCE_DAYS, a complaint until removed, soft
        bounces on SOFT_BOUNCE_DAYS days within SOFT_BOUNCE_WINDOW_DAYS as a hard bounce."""
        now, key = self.clock(), address.lower()
        changes: dict[str, object] = {}
        entry = None
        if kind == "soft":
            today = int(now // DAY_SECONDS)
            days = sorted({d for d in self._state.get(f"soft {key}", []) or []
                           if today - d < SOFT_BOUNCE_WINDOW_DAYS} | {today})
            changes[f"soft {key}"] = days if len(days) < SOFT_BOUNCE_DAYS else None
            if len(days) >= SOFT_BOUNCE_DAYS:
                entry = Suppression(key, EVERYTHING, "soft-bounces", source, now,
                                    now + self.hard_bounce_seconds)
        elif kind in ("hard", "complaint"):
            entry = Suppression(key, EVERYTHING, "hard-bounce" if kind == "hard" else "complaint",
                                source, now, now + self.hard_bounce_seconds if kind == "hard"
                                else None)
        if entry is not None:
            changes[entry.field] = dataclasses.asdict(entry)
        self._change(changes, bump=f"bounces {int(now // 3600)} {kind}")
        log_event(logging.INFO, "bounce_recorded", kind=kind, address=key, reason=reason[:200],
                  suppressed=entry is not None)
        return entry

    def _change(self, changes: Mapping[str, object], bump: str = "") -> None:
        """Store changes (None deletes a field) and add one to the counter bump, in Redis,
        then in the file; QueueUnavailable when they cannot be stored (the caller retries:
        an MTA, a client, an operator), and nothing changes then."""
        changes = {**self._expired_fields(), **changes}
        if self._redis is not None:
            self._redis_change(changes, bump)
        try:
            with _locked(self.path.with_suffix(".lock")):
                state = _merged(self._read_file(), changes, bump)
                self._write_file(state)
        except OSError as exc:
            raise QueueUnavailable(f"the suppression list cannot be written: {exc.strerror}"
                                   ) from None
        self._apply(state if self._redis is None else _merged(self._state, changes, bump))

    def _expired_fields(self) -> dict[str, None]:
        """Fields to drop as they are written: lapsed suppressions, bounce counts past 24 h."""
        now, first = self.clock(), int(self.clock() // 3600) - 23
        lapsed = {e.field: None for e in self._entries.values() if not e.live(now)}
        lapsed.update({name: None for name in self._state if name.startswith("bounces ")
                       and (_bounce_hour(name) or 0) < first})
        return lapsed

    def _redis_change(self, changes: Mapping[str, object], bump: str) -> None:
        try:
            if not self._redis.exists(f"{self._key}:version"):  # a Redis that lost the list
                changes = {**self._local_copy(), **changes}  # (or never had it): ours first
            pipe = self._redis.pipeline(transaction=True)
            for name, value in changes.items():
                if value is None:
                    pipe.hdel(self._key, name)
                else:
                    pipe.hset(self._key, name, json.dumps(value))
            if bump:
                pipe.hincrby(self._key, bump, 1)
            pipe.incr(f"{self._key}:version")
            pipe.execute()
        except self._errors as exc:
            raise QueueUnavailable("the suppression list cannot be written: Redis is "
                                   f"unavailable ({exc.__class__.__name__})") from None

    # -- loading -- #

    def refresh_if_due(self) -> None:
        """refresh() when SUPPRESSION_REFRESH_SECONDS have passed (the sender loop's hook)."""
        if self.clock() - self._refreshed >= SUPPRESSION_REFRESH_SECONDS:
            self.refresh()

    def refresh(self) -> None:
        """Reload the state when it changed: from Redis (copied to the file), else the file."""
        self._refreshed = self.clock()
        if self._redis is not None:
            try:
                self._refresh_from_redis()
                return
            except (QueueUnavailable, ValueError, *self._errors) as exc:  # down, or garbled
                log_event(logging.WARNING, "suppressions_from_file",
                          reason=f"Redis is unavailable ({exc.__class__.__name__})")
        try:
            changed = os.stat(self.path).st_mtime_ns
        except OSError:
            return
        if changed != self._seen:
            try:
                self._apply(self._read_file())
            except OSError as exc:
                log_event(logging.ERROR, "suppressions_unreadable", reason=exc.strerror)
                return
            self._seen = changed

    def _refresh_from_redis(self) -> None:
        version = self._redis.get(f"{self._key}:version")
        if version is None and self._local_copy():  # Redis lost the list: seed it from ours
            self._redis_change({}, "")
            version = self._redis.get(f"{self._key}:version")
        if version != self._seen:
            state = {k.decode(): json.loads(v) for k, v in self._redis.hgetall(self._key).items()}
            self._seen = version
            self._apply(state)
            self._keep_local_copy(state)

    def _local_copy(self) -> dict[str, object]:
        try:
            return self._read_file()
        except OSError:
            return {}

    def _keep_local_copy(self, state: dict[str, object]) -> None:
        try:
            with _locked(self.path.with_suffix(".lock")):
                self._write_file(state)
        except OSError as exc:
            log_event(logging.WARNING, "suppressions_not_copied", reason=exc.strerror)

    def _apply(self, state: dict[str, object]) -> None:
        entries = {}
        for name, value in state.items():
            if isinstance(value, dict) and name.split(" ")[0] not in ("soft", "bounces"):
                with contextlib.suppress(TypeError):  # a field of another version: skipped
                    entry = Suppression(**value)
                    entries[(entry.scope, entry.address)] = entry
        self._state, self._entries = state, entries

    def _read_file(self) -> dict[str, object]:
        try:
            state = json.loads(_read_regular(self.path))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise OSError(errno.EIO, f"{self.path} is unreadable") from exc
        return state if isinstance(state, dict) else {}

    def _write_file(self, state: Mapping[str, object]) -> None:
        _make_private_dir(self.path.parent / "tmp")
        _write_file_atomically(self.path, json.dumps(state, indent=0).encode(),
                               self.path.parent / "tmp")


def _bounce_hour(name: str) -> int | None:
    """The hour of a "bounces HOUR KIND" field of the state; None for any other field."""
    parts = name.split(" ")
    if len(parts) == 3 and parts[0] == "bounces" and parts[1].isdigit():
        return int(parts[1])
    return None


def _merged(state: Mapping[str, object], changes: Mapping[str, object],
            bump: str) -> dict[str, object]:
    merged = {k: v for k, v in {**state, **changes}.items() if v is not None}
    if bump:
        merged[bump] = int(state.get(bump, 0)) + 1
    return merged


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock file (flock) for the read-modify-write of a shared file."""
    _make_private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, SPOOL_FILE_MODE)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def apply_bounce(suppressions: SuppressionList, key: bytes, kind: str,
                 recipients: list[str] | tuple[str, ...], envelope_recipient: str,
                 reason: str = "", status: str | None = None) -> Suppression | None:
    """Apply a bounce report to the list, only for the recipient the VERP tag of the address
    it came back to names: a forged or garbled tag, an auto-reply or ordinary mail changes
    nothing. Return the suppression it made, if any."""
    if kind not in BOUNCE_KINDS:
        return None
    local = envelope_recipient.strip().strip("<>").rpartition("@")[0]
    address = verp_recipient(local, recipients, key, suppressions.clock())
    if address is None:
        log_event(logging.WARNING, "bounce_unverified", kind=kind, to=envelope_recipient[:100],
                  note="the VERP tag is missing, forged, expired or names no recipient given")
        return None
    source = f"{kind} bounce" + (f" {status}" if status else "")
    return suppressions.record_bounce(kind, address, reason, source)


class SuppressingBounces(BounceHandler):
    """The bounce handler with the suppression list behind its suppress() hook."""

    def __init__(self, metrics: Metrics, suppressions: SuppressionList, key: bytes):
        super().__init__(metrics)
        self.suppressions = suppressions
        self.key = key

    def suppress(self, report: BounceReport, envelope_recipient: str,
                 source: str = "report") -> None:
        """A refusal at RCPT TO came in sysmail's own SMTP session: its recipient is
        suppressed as is. A report that came as mail (or through the API) suppresses only the
        recipient the VERP tag of the address it came back to names; QueueUnavailable when
        the list cannot be written now."""
        if source == "rcpt":
            for rcpt in report.recipients:
                self.suppressions.record_bounce(report.kind, rcpt, report.reason,
                                                f"{report.kind} refusal at RCPT TO")
            return
        apply_bounce(self.suppressions, self.key, report.kind, report.recipients,
                     envelope_recipient, report.reason, report.status)

    def unsubscribe(self, raw: bytes) -> bool:
        """A mail to the bounce address whose Subject is "unsubscribe TOKEN" (the mailto of
        List-Unsubscribe) suppresses what the token names; True when it was one."""
        subject = email.parser.BytesParser().parsebytes(raw[:MAX_BOUNCE_BYTES],
                                                        headersonly=True).get("Subject", "")
        word, _, token = str(subject).strip().partition(" ")
        target = unsubscribe_target(self.key, token.strip()) \
            if word.lower() == "unsubscribe" else None
        if target is not None:
            self.suppressions.suppress(target[1], "unsubscribe", "mailto link", scope=target[0])
        return target is not None


# ---- Enqueueing ---- #


ENQUEUE_BATCH = 256  # messages of enqueue_many that share one sync


class Queued(str):
    """What enqueue returns: the Message-ID (a str, as before), and the recipients it was not
    queued for because they are suppressed (`suppressed`, empty when none)."""

    suppressed: tuple[str, ...] = ()

    def __new__(cls, message_id: str, suppressed: tuple[str, ...] = ()) -> Self:
        queued = super().__new__(cls, message_id)
        queued.suppressed = suppressed
        return queued


class Enqueuer:
    """Renders, builds and queues system emails: into the spool, or Redis when the spool fails."""

    def __init__(self, config: Config, spool: Spool, fallback: RedisQueue | None,
                 metrics: Metrics, clock: Clock = time.time,
                 suppressions: SuppressionList | None = None):
        self.config = config
        self.suppressions = suppressions
        self.spool = spool
        self.fallback = fallback
        self.metrics = metrics
        self.clock = clock
        self.catalog = load_catalog(config.templates_dir)
        self.templates = self.catalog.default.templates

    def render(self, template: str, variables: Mapping[str, object], locale: str | None = None
               ) -> tuple[Template, Rendered]:
        """A template rendered in the locale's language (fr-CA, else fr, else the default)."""
        language = self.catalog.pick(locale)
        chosen = language.templates[self._template(template).name]
        brand = {"brand": self.config.from_name, "domain": self.config.domain,
                 "reply_to": self.config.reply_to, "dashboard_url": self.config.dashboard_url}
        return chosen, render(chosen, variables, brand, language,
                              secrets_in_subject=self.config.code_in_subject)

    def enqueue_template(self, template: str, to: str | list[str],
                         variables: Mapping[str, object], locale: str | None = None) -> Queued:
        """Queue a system email from a template, in the locale's language; return its
        Message-ID (with the recipients left out as suppressed). The To: header carries the
        name variable when there is one recipient."""
        return self._store(*self._from_template(template, to, variables, locale))

    def enqueue_many(self, template: str, recipients: Sequence[tuple],
                     variables: Mapping[str, object], locale: str | None = None,
                     progress: Callable[[int], None] | None = None) -> list[Queued]:
        """Queue one message per recipient, (address, own variables) or (address, own
        variables, own locale), the shared variables under each one's own; return the
        Message-IDs in order (a suppressed recipient's says so, and nothing was queued for
        it). Every recipient is checked before any mail is queued; then ENQUEUE_BATCH
        messages share one sync. When the queues fail, the QueueUnavailable's `queued` holds
        the Message-IDs queued before. progress(count) is called after each batch."""
        self._template(template)  # an unknown one fails even for no recipients
        rendered: dict[tuple, tuple] = {}  # one render per distinct variables and language
        entries = []
        for to, own, *rest in recipients:
            merged, own_locale = {**variables, **own}, rest[0] if rest and rest[0] else locale
            validate_address(to)
            key = (tuple(sorted((k, str(v)) for k, v in merged.items())), own_locale)
            if key not in rendered:  # renders check the variables and the locale
                rendered[key] = self._from_template(template, to, merged, own_locale)[1:]
            entries.append((to, key))
        queued: list[Queued] = []
        for start in range(0, len(entries), ENQUEUE_BATCH):
            builds = [self._build(to, *rendered[key])
                      for to, key in entries[start:start + ENQUEUE_BATCH]]
            built = [entry for _, entries_of_one, _ in builds for entry in entries_of_one]
            try:
                placed = [(ident, "spool") for ident in self.spool.enqueue_many(built)]
            except SpoolError as exc:
                placed = [(ident, "spool") for ident in getattr(exc, "queued", [])]
            try:
                for entry in built[len(placed):]:
                    placed.append(self._enqueue(*entry))
            except QueueUnavailable as exc:
                exc.queued = queued + [header["message_id"] for header, _, _ in built[:len(placed)]]
                raise
            finally:
                for (header, _, priority), (ident, backend) in zip(built, placed, strict=False):
                    self._record(header, ident, backend, priority)
            queued += [Queued(message_id, suppressed) for message_id, _, suppressed in builds]
            if progress is not None:
                progress(len(queued))
        return queued

    def _template(self, name: str) -> Template:
        if name not in self.templates:
            raise MessageError(f"there is no template {name!r} "
                               f"(templates: {', '.join(self.templates)})")
        return self.templates[name]

    def _from_template(self, name: str, to: str | list[str], variables: Mapping[str, object],
                       locale: str | None) -> tuple:
        chosen, rendered = self.render(name, variables, locale)
        ttl = chosen.ttl({**chosen.defaults, **{k: str(v) for k, v in variables.items()}})
        return to, rendered, name, chosen.priority, ttl, str(variables.get("name", ""))

    def check_templates(self) -> list[str]:
        """Render every template of every language with its samples; one line per language,
        or ConfigError naming each one that fails."""
        report, problems = [], []
        for language in self.catalog.languages.values():
            for name, template in language.templates.items():
                try:
                    self.render(name, template.samples, language.tag)
                except MessageError as exc:
                    problems.append(f"SYSMAIL_TEMPLATES {language.tag}/{name}: {exc}")
            own = [name for name, template in language.templates.items()
                   if language is self.catalog.default or template != self.templates[name]]
            report.append(f"templates {language.tag}: {len(own)} of {len(language.templates)} "
                          f"kinds in this language" + ("" if len(own) == len(language.templates)
                                                       else " (the rest in the default)"))
        if problems:
            raise ConfigError(problems)
        return report

    def enqueue_message(self, to: str | list[str], subject: str, text: str, html: str = "", *,
                        priority: int = BULK, ttl_seconds: int = ADHOC_TTL_SECONDS) -> Queued:
        """Queue an ad-hoc message (text, optional HTML); return its Message-ID (with the
        recipients left out as suppressed)."""
        if not all(isinstance(v, str) and _is_text(v) for v in (subject, text, html)):
            raise MessageError("the subject, text and HTML must be valid UTF-8 text")
        if _unsafe_in_header(subject) or "\0" in text + html:
            raise MessageError("the subject contains a line break or a control character")
        if not subject.strip() or not text.strip():
            raise MessageError("an ad-hoc message needs a subject and a text")
        return self._store(to, Rendered(subject, text, html), "", priority, ttl_seconds)

    def _store(self, to: str | list[str], rendered: Rendered, template: str, priority: int,
               ttl: int, to_name: str = "") -> Queued:
        message_id, entries, suppressed = self._build(to, rendered, template, priority, ttl,
                                                      to_name)
        for header, data, _ in entries:
            spool_id, backend = self._enqueue(header, data, priority)
            self._record(header, spool_id, backend, priority)
        return Queued(message_id, suppressed)

    def _build(self, to: str | list[str], rendered: Rendered, template: str, priority: int,
               ttl: int, to_name: str = ""
               ) -> tuple[str, list[tuple[dict, bytes, int]], tuple[str, ...]]:
        """A message's Message-ID, its queue entries (header, data, priority), and the
        recipients left out as suppressed."""
        if not isinstance(to, str | list | tuple):
            raise MessageError("to must be an address or a list of addresses")
        rcpts = [validate_address(a) for a in ([to] if isinstance(to, str) else to)]
        if not 0 < len(rcpts) <= MAX_RECIPIENTS:
            raise MessageError(f"a message needs 1 to {MAX_RECIPIENTS} recipients")
        now = self.clock()
        message_id = make_message_id(self.config.domain, now)
        kept = self._unsuppressed(rcpts, template, priority, message_id)
        extra = (("Feedback-ID", f"{template or 'ad-hoc'}:sysmail:{self.config.domain}"),)
        data = (build_message(self.config, kept, rendered, message_id, now, extra, to_name)
                if kept else b"")
        # one entry per recipient when each needs its own envelope sender or unsubscribe link
        unsubscribable = template == ANNOUNCEMENTS and self.config.public_url_set
        if self.config.bounce_address or unsubscribable:
            groups = [(rcpt,) for rcpt in kept]
        else:
            groups = [tuple(kept)] if kept else []
        entries = []
        for group in groups:
            if unsubscribable:
                data = build_message(self.config, kept, rendered, message_id, now,
                                     extra + self._unsubscribe_headers(group[0]), to_name)
            header = {"message_id": message_id, "from": self._envelope_sender(message_id, group),
                      "to": list(group), "template": template, "queued_at": now,
                      "expires_at": now + ttl}
            entries.append((header, data, priority))
        return message_id, entries, tuple(r for r in rcpts if r not in kept)

    def _unsuppressed(self, rcpts: list[str], template: str, priority: int,
                      message_id: str) -> list[str]:
        """The recipients this mail may go to; each suppressed one is logged and counted."""
        if self.suppressions is None:
            return rcpts
        kept = []
        for rcpt in rcpts:
            reason = self.suppressions.blocks(rcpt, template, priority)
            if reason is None:
                kept.append(rcpt)
                continue
            self.metrics.inc("sysmail_suppressed_total", template=template or "ad-hoc")
            log_event(logging.INFO, "suppressed", rfcMessageId=message_id, to=rcpt,
                      template=template or "ad-hoc", reason=reason)
        return kept

    def _envelope_sender(self, message_id: str, group: tuple[str, ...]) -> str:
        """From's address, or with SYSMAIL_BOUNCE_DOMAIN the recipient's VERP address."""
        if not self.config.bounce_address:
            return self.config.from_addr
        return verp_address(self.config.bounce_address, self.config.queue_key, message_id,
                            group[0], self.clock())

    def _unsubscribe_headers(self, rcpt: str) -> tuple[tuple[str, str], ...]:
        """RFC 8058 one-click unsubscribe (and RFC 2369's mailto, when bounces come back)."""
        token = unsubscribe_token(self.config.queue_key, rcpt)
        links = [f"<{self.config.public_url}/v1/unsubscribe?t={token}>"]
        if self.config.bounce_address:
            links.append(f"<mailto:{self.config.bounce_address}?subject=unsubscribe%20{token}>")
        return (("List-Unsubscribe", ",\r\n ".join(links)),
                ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click"))

    def _record(self, header: dict, spool_id: str, backend: str, priority: int) -> None:
        self.metrics.inc("sysmail_enqueued_total", backend=backend)
        log_event(logging.INFO, "queued", rfcMessageId=header["message_id"], id=spool_id,
                  backend=backend, template=header["template"] or "ad-hoc", to=header["to"],
                  priority=PRIORITY_NAMES[priority])

    def _enqueue(self, header: dict, data: bytes, priority: int) -> tuple[str, str]:
        """Store in the spool, or in Redis when the spool fails; return (id, backend)."""
        try:
            return self.spool.enqueue(header, data, priority), "spool"
        except SpoolError as exc:
            if self.fallback is None:
                log_event(logging.ERROR, "enqueue_failed", reason=str(exc))
                raise QueueUnavailable(f"the message could not be queued: {exc}") from exc
            log_event(logging.WARNING, "spool_unwritable", reason=str(exc), using="redis")
        try:
            spool_id = self.fallback.enqueue(header, data, priority)
        except QueueUnavailable as exc:
            log_event(logging.ERROR, "enqueue_failed", reason=f"spool and {exc}")
            raise QueueUnavailable("the message could not be queued: neither the spool nor "
                                   "Redis could store it") from exc
        with contextlib.suppress(OSError):
            self.spool.notify()
        return spool_id, "redis"

    def check_queue(self) -> None:
        """Raise QueueUnavailable unless a message could be stored now (spool or Redis)."""
        if self.spool.writable():
            return
        if self.fallback is None:
            raise QueueUnavailable("the spool cannot be written")
        self.fallback.ping()


# ---- SMTP transport ---- #

SMTP_MAX_MESSAGES_PER_CONNECTION = 1000
SMTP_MAX_IDLE_SECONDS = 30.0


@dataclass(frozen=True)
class SendResult:
    """What the relay said about one message: the final reply and per-recipient refusals."""

    code: int
    reply: str
    accepted: tuple[str, ...]
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Envelope:
    """What the relay said to MAIL FROM and RCPT TO: who it accepts and who it refused (why)."""

    accepted: tuple[str, ...]
    refused: Mapping[str, tuple[int, str]] = field(default_factory=dict)


class Transport(Protocol):
    """A way to the relay: one connection, one transaction at a time.

    begin() negotiates a message's envelope and raises RelayUnavailable (no message's fault),
    TemporaryDeliveryError or PermanentDeliveryError when nobody can be served; finish() sends
    the content of the transaction begin() opened (when anybody was accepted) and raises the
    same errors for the final reply; abort() gives that transaction up instead.
    """

    def open(self) -> bool:
        """Make sure a usable connection is open; True when a new one was opened."""

    def begin(self, mail_from: str, rcpts: tuple[str, ...], urgent: bool = True) -> Envelope:
        """Negotiate MAIL FROM and RCPT TO; return who is accepted and who is refused.
        Urgent mail may use the share of a relay's pace kept for it; Paced when no relay
        has room for the message yet."""

    def finish(self, data: bytes) -> SendResult:
        """Send the content of the open transaction; return the final reply."""

    def abort(self) -> None:
        """Give up the open transaction without sending its content."""

    def interrupt(self) -> None:
        """From another thread: cut the connection, so a call waiting on the relay ends."""

    def probe(self) -> list[str]:
        """Connect and log in without sending; return what was checked."""

    def close(self) -> None:
        """Close the connection; safe to call at any time."""


def classify_reply(code: int) -> str:
    """ok, temporary, permanent, or unavailable (421 or no answer: the relay's fault)."""
    if 200 <= code < 300:
        return "ok"
    if code == 421 or code < 200:
        return "unavailable"
    if 500 <= code < 600:
        return "permanent"
    return "temporary"  # 4xx, and anything garbled: never lose mail over a strange reply


def _reply_text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    return " ".join(text.split())[:500]


class SmtpTransport:
    """One reused SMTP connection: opened lazily, refreshed after N messages or idle time."""

    def __init__(self, url: SmtpUrl, *, tls_context: ssl.SSLContext | None = None,
                 timeout: float = 30.0, local_hostname: str | None = None,
                 max_messages: int = SMTP_MAX_MESSAGES_PER_CONNECTION,
                 max_idle_seconds: float = SMTP_MAX_IDLE_SECONDS,
                 clock: Clock = time.monotonic):
        self.url = url
        self.tls_context = tls_context or ssl.create_default_context()
        self.timeout = timeout
        self.local_hostname = local_hostname
        self.max_messages = max_messages
        self.max_idle_seconds = max_idle_seconds
        self.clock = clock
        self._smtp: smtplib.SMTP | None = None
        self._envelope: Envelope | None = None
        self._in_data = False
        self._sent_on_connection = 0
        self._last_used = 0.0

    def __repr__(self) -> str:
        return f"SmtpTransport({self.url})"

    def open(self) -> bool:
        """Make sure a fresh connection is open; return True when a new one was opened."""
        if self._smtp is not None and not self._stale():
            return False
        self.close()
        try:
            self._smtp = self._connect()
        except smtplib.SMTPAuthenticationError as exc:
            raise RelayUnavailable("the relay refused the SMTP credentials", exc.smtp_code) from None
        except smtplib.SMTPNotSupportedError:
            raise RelayUnavailable(f"reached the relay {self.url.host}:{self.url.port}, but it "
                                   "offers no STARTTLS (smtps:// for implicit TLS; smtp+plain:// "
                                   "only for a loopback relay)") from None
        except (OSError, smtplib.SMTPException) as exc:
            raise RelayUnavailable(f"cannot reach the relay {self.url.host}:{self.url.port}: "
                                   f"{_reply_text(str(exc))}") from None
        self._sent_on_connection, self._last_used = 0, self.clock()
        return True

    def _connect(self) -> smtplib.SMTP:
        host, port = self.url.host, self.url.port
        if self.url.scheme == "smtps":
            smtp = smtplib.SMTP_SSL(host, port, self.local_hostname, timeout=self.timeout,
                                    context=self.tls_context)
        else:
            smtp = smtplib.SMTP(host, port, self.local_hostname, timeout=self.timeout)
        try:
            smtp.ehlo()
            if self.url.scheme == "smtp":
                if not smtp.has_extn("starttls"):
                    raise smtplib.SMTPNotSupportedError("the relay does not offer STARTTLS")
                smtp.starttls(context=self.tls_context)
                smtp.ehlo()
            if self.url.username:
                smtp.login(self.url.username, self.url.password)
        except BaseException:
            _close_quietly(smtp)
            raise
        return smtp

    def _stale(self) -> bool:
        idle = self.clock() - self._last_used
        return self._sent_on_connection >= self.max_messages or idle > self.max_idle_seconds

    def begin(self, mail_from: str, rcpts: tuple[str, ...], urgent: bool = True) -> Envelope:
        """Open a transaction: MAIL FROM and RCPT TO (and DATA, when pipelining)."""
        fresh = self.open()
        try:
            return self._negotiate(mail_from, rcpts)
        except _IdleConnectionClosed:
            if fresh:
                raise RelayUnavailable("the relay closed the connection at once",
                                       recipients=rcpts) from None
            self.close()  # the relay dropped a connection we kept idle: reopen, try once more
            return self.begin(mail_from, rcpts)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise self._dropped(exc, rcpts) from None
        finally:
            self._last_used = self.clock()

    def finish(self, data: bytes) -> SendResult:
        """Send the content of the transaction begin() opened; return the relay's final reply."""
        envelope, self._envelope = self._envelope, None
        assert self._smtp is not None and envelope is not None, "finish() without begin()"
        try:
            if self._in_data:  # pipelined: the relay said 354 already
                self._smtp.send(_dot_stuffed(data))
                code, reply = self._smtp.getreply()
            else:
                code, reply = self._data(data)
            return self._finish(code, reply, envelope.accepted, envelope.refused)
        except (smtplib.SMTPServerDisconnected, OSError) as exc:
            raise self._dropped(exc, envelope.accepted) from None
        finally:
            self._last_used = self.clock()

    def abort(self) -> None:
        """Give up the transaction begin() opened: only dropping the connection cancels DATA."""
        self._envelope = None
        self._abort()

    def interrupt(self) -> None:
        """Shut the socket down from another thread: a blocked read returns at once."""
        sock = getattr(self._smtp, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _negotiate(self, mail_from: str, rcpts: tuple[str, ...]) -> Envelope:
        smtp = self._smtp
        assert smtp is not None
        self._in_data = smtp.has_extn("pipelining")
        if self._in_data:
            envelope = self._pipelined(smtp, mail_from, rcpts)
        else:
            envelope = self._lockstep(smtp, mail_from, rcpts)
        self._envelope = envelope if envelope.accepted else None
        return envelope

    def _lockstep(self, smtp: smtplib.SMTP, mail_from: str, rcpts: tuple[str, ...]) -> Envelope:
        try:
            mail = smtp.mail(mail_from)
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise _IdleConnectionClosed from exc
        if mail[0] == 421:  # the notice of a relay that hung up on our idle connection
            raise _IdleConnectionClosed
        self._check(*mail, rcpts, "MAIL FROM")
        envelope = self._recipients(rcpts, [smtp.rcpt(r) for r in rcpts])
        if not envelope.accepted:
            smtp.rset()
        return envelope

    def _data(self, data: bytes) -> tuple[int, bytes]:
        try:
            return self._smtp.data(data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error

    def _pipelined(self, smtp: smtplib.SMTP, mail_from: str, rcpts: tuple[str, ...]) -> Envelope:
        """RFC 2920: MAIL, RCPT... and DATA in one write, then the content: 2 round trips."""
        commands = [f"MAIL FROM:<{mail_from}>", *(f"RCPT TO:<{r}>" for r in rcpts), "DATA"]
        try:
            smtp.send("".join(f"{command}\r\n" for command in commands))
            mail = smtp.getreply()
        except (smtplib.SMTPServerDisconnected, ConnectionError) as exc:
            raise _IdleConnectionClosed from exc
        if mail[0] == 421:  # the notice of a relay that hung up on our idle connection
            raise _IdleConnectionClosed
        rcpt_replies = [smtp.getreply() for _ in rcpts]
        go_ahead = smtp.getreply()
        envelope = self._recipients(rcpts, rcpt_replies)
        if go_ahead[0] == 354 and (classify_reply(mail[0]) != "ok" or not envelope.accepted):
            smtp.send(b".\r\n")  # end the content the relay should not have asked for
            smtp.getreply()
        self._check(*mail, rcpts, "MAIL FROM")
        if not envelope.accepted:
            smtp.rset()
        elif go_ahead[0] != 354:
            self._check(go_ahead[0] if go_ahead[0] >= 400 else 451, go_ahead[1],
                        envelope.accepted, "DATA")
        return envelope

    def _dropped(self, exc: Exception, rcpts: tuple[str, ...]) -> RelayUnavailable:
        self.close()
        return RelayUnavailable(f"the relay dropped the connection: {_reply_text(str(exc))}",
                                recipients=rcpts)

    def _recipients(self, rcpts: tuple[str, ...], replies: list[tuple[int, bytes]]) -> Envelope:
        """Accepted recipients and refused ones with their replies; a 421 ends it all."""
        accepted, refused = [], {}
        for rcpt, (code, reply) in zip(rcpts, replies, strict=True):
            if classify_reply(code) == "unavailable":
                self._check(code, reply, rcpts, "RCPT TO")
            if code in (250, 251):
                accepted.append(rcpt)
            else:
                refused[rcpt] = (code, _reply_text(reply))
        return Envelope(tuple(accepted), refused)

    def _finish(self, code: int, reply: bytes, accepted: tuple[str, ...],
                refused: dict[str, tuple[int, str]]) -> SendResult:
        self._check(code, reply, accepted, "DATA")
        self._sent_on_connection += 1
        return SendResult(code, _reply_text(reply), accepted, refused)

    def _check(self, code: int, reply: bytes, rcpts: tuple[str, ...], stage: str) -> None:
        kind = classify_reply(code)
        if kind == "ok":
            return
        text = _reply_text(reply)
        if kind == "unavailable":
            self._abort()  # no QUIT: the relay is closing, and we may be inside DATA content
            raise RelayUnavailable(f"the relay is unavailable at {stage}: {code} {text}", code,
                                   text, rcpts)
        self._reset()
        error = PermanentDeliveryError if kind == "permanent" else TemporaryDeliveryError
        raise error(f"{stage} refused: {code} {text}", code, text, rcpts)

    def _reset(self) -> None:
        try:
            assert self._smtp is not None
            self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self.close()

    def probe(self) -> list[str]:
        """Connect, negotiate TLS and log in without sending; return what was checked."""
        self.close()
        self.open()
        assert self._smtp is not None
        steps = [f"connected to {self.url.host}:{self.url.port}"]
        if self.url.scheme != "smtp+plain":
            steps.append(f"TLS {self._smtp.sock.version()} with a verified certificate"
                         if self.tls_context.verify_mode == ssl.CERT_REQUIRED
                         else f"TLS {self._smtp.sock.version()} (certificate not verified)")
        if self.url.username:
            steps.append(f"logged in as {self.url.username}")
        self.close()
        return steps

    def close(self) -> None:
        """Close the connection (QUIT when possible); safe to call at any time."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            _close_quietly(smtp)

    def _abort(self) -> None:
        """Drop the connection without a word (nothing sent could end an open content)."""
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            smtp.close()


_LEADING_DOT = re.compile(rb"(?m)^\.")


def _dot_stuffed(data: bytes) -> bytes:
    """Message content for DATA: leading dots doubled, CRLF-terminated, then the final dot."""
    stuffed = _LEADING_DOT.sub(b"..", data) if b"\n." in data or data[:1] == b"." else data
    return stuffed + (b"" if stuffed.endswith(b"\r\n") else b"\r\n") + b".\r\n"


class _IdleConnectionClosed(Exception):
    """The relay had closed the connection before this transaction's first command."""


def _close_quietly(smtp: smtplib.SMTP) -> None:
    try:
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()


class OutboxTransport:
    """The embedded default relay: each message is written as an .eml file into a folder."""

    def __init__(self, folder: Path | str, clock: Clock = time.time):
        self.folder = Path(folder)
        self.clock = clock
        self._rcpts: tuple[str, ...] = ()

    def __repr__(self) -> str:
        return f"OutboxTransport({str(self.folder)!r})"

    def open(self) -> bool:
        """Create the outbox folder; True the first time."""
        existed = self.folder.is_dir()
        try:
            _make_private_dir(self.folder)
        except OSError as exc:
            raise RelayUnavailable(f"cannot create the outbox {self.folder}: {exc.strerror}") from None
        return not existed

    def begin(self, mail_from: str, rcpts: tuple[str, ...], urgent: bool = True) -> Envelope:
        """Accept every recipient (the folder is made if need be)."""
        self.open()
        self._rcpts = rcpts
        return Envelope(rcpts)

    def finish(self, data: bytes) -> SendResult:
        """Write the message (signed, exactly as it would go on the wire) to the outbox."""
        name = f"{int(self.clock() * 1000)}-{secrets.token_hex(4)}.eml"
        try:
            _write_file_atomically(self.folder / name, data, self.folder)
        except OSError as exc:
            raise RelayUnavailable(f"cannot write to the outbox: {exc.strerror}") from None
        return SendResult(250, f"2.0.0 written to {self.folder / name}", self._rcpts)

    def abort(self) -> None:
        """Nothing was written."""

    def interrupt(self) -> None:
        """Nothing waits on a folder."""

    def probe(self) -> list[str]:
        """Check the outbox can be written."""
        self.open()
        return [f"no SMTP_URL: mail is written as .eml files into {self.folder}"]

    def close(self) -> None:
        """Nothing to close."""


def tls_context_from_config(config: Config, url: SmtpUrl | None = None) -> ssl.SSLContext:
    """The TLS context for a relay: verified by default, with an optional private CA; the
    relay's own ca_file= and tls_verify= come before SMTP_CA_FILE and SMTP_TLS_VERIFY."""
    ca_file = (url and url.ca_file) or config.smtp_ca_file
    verify = config.smtp_tls_verify if url is None or url.tls_verify is None else url.tls_verify
    context = ssl.create_default_context(cafile=ca_file or None)
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class _RelayBackoff:
    """Whether a relay is worth trying now: after each outage the wait doubles, to a cap."""

    def __init__(self, clock: Clock, rand: Callable[[], float], base: float = 1.0,
                 cap: float = 60.0, jitter: float = 0.2, name: str = ""):
        self.clock = clock
        self.rand = rand
        self.base, self.cap, self.jitter, self.name = base, cap, jitter, name
        self.failures = 0
        self.retry_at = 0.0
        self._lock = threading.Lock()

    def seconds_left(self) -> float:
        """Seconds before the relay may be tried again (0 when it may be now)."""
        return max(self.retry_at - self.clock(), 0.0)

    def pause(self, seconds: float) -> None:
        """Try nothing for a while (after an unexpected error)."""
        self.retry_at = self.clock() + seconds

    def down(self, exc: RelayUnavailable) -> None:
        """The relay could not be used: wait longer before the next try."""
        with self._lock:
            self.failures += 1
            failures = self.failures
            delay = min(self.cap, self.base * 2 ** (failures - 1))
            delay *= 1 + self.jitter * (2 * self.rand() - 1)
            self.retry_at = self.clock() + delay
        log_event(logging.WARNING, "relay_unavailable", relay=self.name or None, reason=str(exc),
                  code=exc.smtp_code, failures=failures, retry_in_seconds=round(delay, 2))

    def up(self) -> None:
        """The relay answered: forget the outage."""
        if not self.failures:
            return  # the usual case, without taking the lock
        with self._lock:
            failures, self.failures, self.retry_at = self.failures, 0, 0.0
        if failures:
            log_event(logging.INFO, "relay_available", relay=self.name or None,
                      after_failures=failures)


class _Pacer:
    """A relay's pace: a token bucket at its rate, and its daily quota. Urgent mail keeps a
    share of both (URGENT_SHARE): bulk waits while a two-factor code still goes out. A
    throttling reply halves the rate; it recovers by a tenth a minute. With Redis, the bucket
    and the day's count are the fleet's (RedisQueue.take_pace); while Redis does not answer,
    each host keeps its own."""

    URGENT_SHARE = 0.2
    UNLIMITED = 10_000.0
    SHARED_RETRY_SECONDS = 30.0

    def __init__(self, rate: float | None, daily: int | None, clock: Clock,
                 shared: RedisQueue | None = None, name: str = ""):
        self.shared, self.name, self.shared_retry_at = shared, name, 0.0
        self.limit = rate or self.UNLIMITED
        self.rate, self.daily, self.clock = self.limit, daily, clock
        self.reserve = max(1.0, self.limit * self.URGENT_SHARE / 5)  # urgent's tokens
        self.tokens, self.updated = 1.0 + self.reserve, clock()
        self.day, self.used = int(clock() // DAY_SECONDS), 0
        self._lock = threading.Lock()

    def take(self, urgent: bool) -> float:
        """Take one message's room: 0 when it may go now, else the seconds to wait."""
        if self.limit >= self.UNLIMITED and not self.daily and self.rate >= self.limit:
            return 0.0  # no pace set and none asked for: the usual case, without the lock
        with self._lock:
            now = self._refill()
            quota = self.daily and self.daily * (1 if urgent else 1 - self.URGENT_SHARE)
            needed = 1.0 if urgent else 1.0 + self.reserve  # bulk leaves urgent's tokens
            if self.shared is not None and now >= self.shared_retry_at:
                try:
                    wait, self.used = self.shared.take_pace(
                        self.name, now, self.rate, 1.0 + self.reserve, needed, quota or 0,
                        (self.day + 1) * DAY_SECONDS)
                    return wait
                except QueueUnavailable:  # this host paces alone for a while
                    self.shared_retry_at = now + self.SHARED_RETRY_SECONDS
            if quota and self.used >= quota:
                return (self.day + 1) * DAY_SECONDS - now
            if self.tokens < needed:
                return (needed - self.tokens) / self.rate
            self.tokens -= 1
            self.used += 1
            return 0.0

    def throttled(self) -> None:
        """The relay asked us to slow down: halve the rate."""
        with self._lock:
            self._refill()
            self.rate = max(self.rate / 2, 0.1) if self.rate < self.UNLIMITED else 10.0

    def _refill(self) -> float:
        now = self.clock()
        elapsed, self.updated = max(now - self.updated, 0.0), now
        self.rate = min(self.limit, self.rate * (1 + elapsed / 600))  # +10 % a minute
        self.tokens = min(1.0 + self.reserve, self.tokens + elapsed * self.rate)
        if int(now // DAY_SECONDS) != self.day:
            self.day, self.used = int(now // DAY_SECONDS), 0
        return now


class RelayHealth:
    """What every connection of a process knows of each relay: whether it is down (with its
    own backoff), and its replies, for the metrics."""

    def __init__(self, urls: tuple[SmtpUrl, ...], clock: Clock = time.monotonic,
                 rand: Callable[[], float] = random.random, metrics: Metrics | None = None,
                 shared: RedisQueue | None = None):
        self.names = [f"{url.host}:{url.port}" for url in urls]
        self.metrics = metrics
        self.backoffs = [_RelayBackoff(clock, rand, name=name) for name in self.names]
        self.pacers = [_Pacer(url.rate, url.daily, clock, shared, name)
                       for url, name in zip(urls, self.names, strict=True)]
        self.clock = clock
        self._lock = threading.Lock()
        # counted from the start, so "no reply for N minutes" holds for a relay never reached
        self.last_reply = dict.fromkeys(self.names, clock())
        for name in self.names if metrics is not None else ():
            for kind in ("2xx", "4xx", "5xx"):
                metrics.declare("sysmail_relay_replies_total", relay=name, reply=kind)

    def usable(self, index: int) -> bool:
        """True when relay index may be tried now."""
        return not self.backoffs[index].seconds_left()

    def record(self, index: int, code: int | None) -> None:
        """Count one final reply of relay index (2xx, 4xx or 5xx)."""
        kind = f"{(code or 451) // 100}xx"
        kind = kind if kind in ("2xx", "5xx") else "4xx"
        with self._lock:
            self.last_reply[self.names[index]] = self.clock()
        if self.metrics is not None:
            self.metrics.inc("sysmail_relay_replies_total", relay=self.names[index], reply=kind)
        self.backoffs[index].up()

    def gauges(self) -> dict[str, tuple[str, Mapping[str, str], float]]:
        """Per relay: up (1) or down (0), and the age of its last reply."""
        now, gauges = self.clock(), {}
        for index, name in enumerate(self.names):
            gauges[f"sysmail_relay_up{{{name}}}"] = (
                "1 while the relay may be used, 0 while it is backed off.", {"relay": name},
                float(self.usable(index)))
            pacer = self.pacers[index]
            if pacer.rate < _Pacer.UNLIMITED:
                help_text = ("Messages a second the relay is sent now (its rate, or less when "
                             "it asked to slow down).")
                gauges[f"sysmail_relay_rate{{{name}}}"] = (help_text, {"relay": name},
                                                           round(pacer.rate, 3))
            if pacer.daily:
                gauges[f"sysmail_relay_quota_used_ratio{{{name}}}"] = (
                    "Share of the relay's daily quota used today.", {"relay": name},
                    round(pacer.used / pacer.daily, 4))
            gauges[f"sysmail_relay_last_reply_age_seconds{{{name}}}"] = (
                "Seconds since the relay's last final reply (or since the start).",
                {"relay": name}, round(now - self.last_reply[name], 3))
        return gauges

    def pace(self, index: int, urgent: bool) -> float:
        """0 when relay index may take a message now (its room taken), else seconds to wait."""
        return self.pacers[index].take(urgent)

    def up_count(self) -> int:
        """How many relays may be tried now."""
        return sum(self.usable(i) for i in range(len(self.names)))


class FailoverTransport:
    """Several relays in order of preference (SMTP_URL=first,second,...): a message goes to
    the first relay up. One that cannot be used (refused, timed out, 421, TLS or AUTH refused)
    is marked down with its own backoff and the next takes the message at once, costing no
    attempt; the first is used again once its backoff is over. A relay's 4xx or 5xx stands:
    a message is not shopped around for another answer."""

    def __init__(self, relays: list[SmtpTransport], health: RelayHealth):
        self.relays = relays
        self.health = health
        self._active = 0

    def __repr__(self) -> str:
        return f"FailoverTransport({', '.join(str(r.url) for r in self.relays)})"

    def open(self) -> bool:
        """Make sure the first relay that is up has an open connection."""
        return self._first_up(lambda relay: relay.open())

    def begin(self, mail_from: str, rcpts: tuple[str, ...], urgent: bool = True) -> Envelope:
        """Negotiate with the first relay that is up and has room at its pace (the next one
        when it cannot be used); Paced when none has room yet."""
        return self._first_up(lambda relay: relay.begin(mail_from, rcpts), urgent)

    def finish(self, data: bytes) -> SendResult:
        """Send the content to the relay that took the envelope."""
        try:
            result = self.relays[self._active].finish(data)
        except DeliveryError as exc:
            if _is_throttling(exc):
                self.health.pacers[self._active].throttled()
                raise Paced(f"the relay asked to slow down: {exc}", 1.0) from None
            if isinstance(exc, RelayUnavailable):
                self.health.backoffs[self._active].down(exc)
                raise
            self.health.record(self._active, exc.smtp_code)
            raise
        self.health.record(self._active, result.code)
        return result

    def abort(self) -> None:
        """Give up the transaction on the relay that has it."""
        self.relays[self._active].abort()

    def interrupt(self) -> None:
        """Cut every relay's connection (from another thread)."""
        for relay in self.relays:
            relay.interrupt()

    def probe(self) -> list[str]:
        """Probe every relay; RelayUnavailable only when none can be reached."""
        if len(self.relays) == 1:
            return self.relays[0].probe()
        steps, errors = [], []
        for relay in self.relays:
            try:
                steps += [f"{relay.url.host}:{relay.url.port}: {s}" for s in relay.probe()]
            except RelayUnavailable as exc:
                errors.append(exc)
                steps.append(f"{relay.url.host}:{relay.url.port}: DOWN: {exc}")
        if len(errors) == len(self.relays):
            raise errors[0]
        return steps

    def close(self) -> None:
        """Close every relay's connection."""
        for relay in self.relays:
            relay.close()

    def _first_up(self, work: Callable[[SmtpTransport], object], urgent: bool = True) -> object:
        last: RelayUnavailable | None = None
        waits: list[float] = []
        for index, relay in enumerate(self.relays):
            if not self.health.usable(index):
                continue
            if wait := self.health.pace(index, urgent):
                waits.append(wait)
                continue
            try:
                result = work(relay)
            except DeliveryError as exc:
                if _is_throttling(exc):  # "slow down": pace the relay, spend no attempt
                    self.health.pacers[index].throttled()
                    raise Paced(f"{relay.url.host} asked to slow down: {exc}", 1.0) from None
                if not isinstance(exc, RelayUnavailable):  # the relay answered: its word stands
                    self._active = index
                    self.health.record(index, exc.smtp_code)
                    raise
                self.health.backoffs[index].down(exc)
                last = exc
                continue
            self._active = index
            return result
        if waits and last is None:
            raise Paced("every relay is at its pace", min(waits))
        error = last or RelayUnavailable("every relay is down; waiting for one to return")
        error.retry_in = min(backoff.seconds_left() for backoff in self.health.backoffs)
        raise error


_THROTTLING = re.compile(r"\b4\.7\.\d+|rate|too many|throttl|slow down", re.IGNORECASE)


def _is_throttling(exc: DeliveryError) -> bool:
    """A 421, 451 or 454 that asks the sender to slow down (4.7.x, "rate exceeded")."""
    return exc.smtp_code in (421, 451, 454) and bool(_THROTTLING.search(exc.reply or str(exc)))


def transport_from_config(config: Config, health: RelayHealth | None = None) -> Transport:
    """The relay of the configuration (several in order of preference), or the outbox folder
    when SMTP_URL is unset."""
    if config.smtp is None:
        return OutboxTransport(config.outbox_dir)
    relays = [SmtpTransport(url, tls_context=tls_context_from_config(config, url),
                            timeout=config.smtp_timeout) for url in config.relays]
    if len(relays) == 1 and health is None:
        return relays[0]
    return FailoverTransport(relays, health or RelayHealth(config.relays))


# ---- Sender ---- #

SENDER_IDLE_POLL_SECONDS = 1.0
PACING_SECONDS = 1.0  # after a relay's pace held a message back, claim one at a time
NOT_PACED = float("-inf")
STOP_GRACE_SECONDS = 3.0
RECIPIENT_LIMIT = "recipient limit"
SENDER_BATCH_SIZE = 50
LAST_SENT_RESOLUTION_SECONDS = 1.0
TMP_CLEAN_INTERVAL_SECONDS = 3600


@dataclass(frozen=True)
class RetryPolicy:
    """A temporary failure is retried on a schedule (its last step repeats) until the
    message's deliver-by time; relay outages back off as a whole, costing no attempt."""

    schedule: tuple[float, ...] = DEFAULT_RETRY_SCHEDULE
    per_kind: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    jitter: float = 0.2
    relay_base_seconds: float = 1.0
    relay_cap_seconds: float = 60.0

    def delay(self, attempts_made: int, rand: float, kind: str = "") -> float:
        """Seconds before the next attempt, after attempts_made failed ones (1, 2, 4, 8 s...,
        then up to 15 minutes by default), for a kind of mail (its template name)."""
        schedule = self.per_kind.get(kind) or self.schedule
        step = schedule[min(attempts_made, len(schedule)) - 1]
        return step * (1 + self.jitter * (2 * rand - 1))


@dataclass
class DeliveryCounts:
    """What one pass of the sender did (counted from several connections at once)."""

    sent: int = 0
    deferred: int = 0
    failed: int = 0
    expired: int = 0
    released: int = 0
    paced: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, outcome: str, count: int = 1) -> None:
        """Count messages with one outcome."""
        with self._lock:
            setattr(self, outcome, getattr(self, outcome) + count)

    def __str__(self) -> str:
        return ", ".join(f"{name} {getattr(self, name)}"
                         for name in ("sent", "deferred", "failed", "expired", "released",
                                      "paced") if name != "paced" or self.paced)


class _Connections:
    """A sender's SMTP connections: one, used in order, or several used at once by threads."""

    def __init__(self, first: Transport, count: int,
                 factory: Callable[[], Transport] | None):
        extra = [factory() for _ in range(count - 1)] if factory else []
        self.all = [first, *extra]
        self._free: queue.SimpleQueue[Transport] = queue.SimpleQueue()
        for transport in self.all:
            self._free.put(transport)
        self._pool = (concurrent.futures.ThreadPoolExecutor(len(self.all),
                                                            thread_name_prefix="sysmail-smtp")
                      if len(self.all) > 1 else None)

    def each(self, work: Callable[[Claim], None], claims: list[Claim]) -> None:
        """Run work over every claim, on as many connections as there are, and wait."""
        if self._pool is None:
            for claim in claims:
                work(claim)
        else:
            list(self._pool.map(work, claims))

    @contextlib.contextmanager
    def borrow(self) -> Iterator[Transport]:
        """A free connection, for one message."""
        transport = self._free.get()
        try:
            yield transport
        finally:
            self._free.put(transport)

    def close(self) -> None:
        """Close every connection and the threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for transport in self.all:
            transport.close()


@dataclass(frozen=True)
class Verdict:
    """What becomes of some recipients of a claimed message: sent, deferred, failed or expired."""

    action: str
    rcpts: tuple[str, ...]
    reason: Mapping[str, object] = field(default_factory=dict)


class _Batch:
    """A batch's shared fate: after a stop, a relay outage or a queue failure, nothing more
    of it is sent; the first such error is kept."""

    def __init__(self, stop: threading.Event):
        self._stop = stop
        self._lock = threading.Lock()
        self.error: Exception | None = None
        self.paced: float | None = None  # seconds until a relay has room again

    def pace(self, seconds: float) -> None:
        """A message had to wait for a relay's pace."""
        with self._lock:
            self.paced = min(self.paced or seconds, seconds)

    @property
    def halted(self) -> bool:
        """True once the sender stopped or anything halted the batch."""
        return self._stop.is_set() or self.error is not None

    def halt(self, error: Exception) -> None:
        """Stop the batch because of error (the first one is kept)."""
        with self._lock:
            self.error = self.error or error


class _Settler:
    """Applies what happened to a claim to its queue: sent, deferred, failed, expired or
    released; counts it, logs it, and keeps the claims a failing queue could not take back."""

    def __init__(self, spool: Spool, metrics: Metrics, clock: Clock, retry: RetryPolicy,
                 rand: Callable[[], float], bounces: BounceHandler | None = None):
        self.spool = spool
        self.metrics = metrics
        self.bounces = bounces
        self.clock = clock
        self.retry = retry
        self.rand = rand
        self._lock = threading.Lock()
        self._unreleased: list[Claim] = []
        self._unrecorded: list[tuple[Claim, SpooledMessage, list[Verdict]]] = []
        self._last_mark = float("-inf")

    def release(self, claim: Claim, counts: DeliveryCounts, due: float | None = None,
                outcome: str = "released") -> None:
        """Put a claim back (due now, or at due); when its queue cannot take it now, keep it
        to try again later (a claim left to its lease would wait minutes, and one already sent
        goes out once more: the duplicate window of a queue outage)."""
        try:
            claim.queue.release(claim, due)
        except (QueueUnavailable, SpoolError, OSError):
            with self._lock:
                self._unreleased.append(claim)
        counts.add(outcome)

    def release_leftovers(self) -> None:
        """Try again to put back the claims a failing queue could not take."""
        with self._lock:
            leftovers, self._unreleased = self._unreleased, []
        for claim in leftovers:
            try:
                claim.queue.release(claim)
            except (QueueUnavailable, SpoolError, OSError):
                with self._lock:
                    self._unreleased.append(claim)

    def verdicts(self, message: SpooledMessage,
                 result: SendResult | DeliveryError) -> tuple[Verdict, ...]:
        """What to do with each group of recipients after the relay answered."""
        if isinstance(result, DeliveryError):
            refusals = {r: (result.smtp_code, result.reply) for r in message.rcpts}
            verdicts: list[Verdict] = []
        else:
            refusals = dict(result.refused)
            verdicts = [Verdict("sent", result.accepted, {"code": result.code,
                                                          "reply": result.reply})]
        served = bool(verdicts and verdicts[0].rcpts)
        for kind in ("permanent", "limit", "temporary"):
            group = tuple(r for r, (code, _) in refusals.items()
                          if _refusal_kind(code, served) == kind)
            if group:
                verdicts.append(self._refused(message, group, *refusals[group[0]], kind))
        return tuple(v for v in verdicts if v.rcpts)

    def report_refusals(self, message: SpooledMessage, result: SendResult | DeliveryError
                        ) -> None:
        """A 5xx at RCPT TO is a bounce that came back at once: report it like one, after the
        message is settled (a failing report must not send it again)."""
        refusals = {} if isinstance(result, DeliveryError) else result.refused
        for rcpt, (code, reply) in refusals.items():
            if self.bounces is None or classify_reply(code) != "permanent":
                continue
            text = f"{code} {reply}"
            report = BounceReport(classify_bounce(_status(reply), text), (rcpt,),
                                  _status(reply), text, message.message_id)
            try:
                self.bounces.handle(report, message.mail_from, source="rcpt")
            except Exception:  # noqa: BLE001 - the refusal is in the dead letter all the same
                _log.exception("bounce_not_recorded", extra={"fields": {"id": message.id}})

    def _refused(self, message: SpooledMessage, rcpts: tuple[str, ...], code: int | None,
                 reply: str, kind: str) -> Verdict:
        """A refused group's verdict: failed when permanent or out of attempts, a new
        transaction at once past the relay's recipient limit, else a retry later."""
        if kind == "permanent":
            return Verdict("failed", rcpts, _refusal("rejected", code, reply))
        if kind == "limit":
            return Verdict("deferred", rcpts, _refusal(RECIPIENT_LIMIT, code, reply))
        due = self.clock() + self.retry.delay(message.attempt + 1, self.rand(), message.template)
        if due >= message.expires_at:  # no retry could make it in time: expire with the reply
            return Verdict("expired", rcpts, _refusal("expired", code, reply))
        return Verdict("deferred", rcpts, {**_refusal("deferred", code, reply), "due": due})

    def apply(self, claim: Claim, message: SpooledMessage | None,
              verdicts: tuple[Verdict, ...], counts: DeliveryCounts,
              duration: float = 0.0) -> None:
        """Settle a claim by its verdicts: when one unserved group is all there is, the claim
        itself moves; otherwise each unserved group is written apart and the claim forgotten."""
        served = [v for v in verdicts if v.action == "sent"]
        unserved = [v for v in verdicts if v.action != "sent"]
        if served and message is not None:
            self._log_sent(message, served[0], duration)
            counts.add("sent")
        if not served and len(unserved) == 1:
            self._settle(claim, message, unserved[0], counts, whole=True)
        else:
            self._record_rest(claim, message, unserved, counts)

    def _record_rest(self, claim: Claim, message: SpooledMessage, unserved: list[Verdict],
                     counts: DeliveryCounts) -> None:
        """Record the unserved groups; when the queue cannot take them now, count and log it
        once (record_leftovers tries again quietly): whoever accepted the message must never
        get it again."""
        failure = self._write_rest(claim, message, unserved, counts)
        if failure is not None:
            rest, exc = failure
            self.metrics.inc("sysmail_unrecorded_total")
            log_event(logging.ERROR, "unrecorded", id=claim.name.id, reason=str(exc),
                      rfcMessageId=message.message_id,
                      to=[r for v in rest for r in v.rcpts],
                      note="delivered to the others; kept in memory and recorded again later")

    def _write_rest(self, claim: Claim, message: SpooledMessage, unserved: list[Verdict],
                    counts: DeliveryCounts) -> tuple[list[Verdict], Exception] | None:
        """Write a copy of the message per unserved group, then forget the claim. When the
        queue cannot take them (a full disk), the claim stays ours and the rest is kept here
        to record later; that rest and the error are returned."""
        try:
            while unserved:
                self._settle(claim, message, unserved[0], counts, whole=False)
                unserved = unserved[1:]
            claim.queue.ack(claim)
        except (QueueUnavailable, SpoolError, OSError) as exc:
            with self._lock:
                self._unrecorded.append((claim, message, unserved))
            return unserved, exc
        return None

    def record_leftovers(self, counts: DeliveryCounts) -> None:
        """Try again to record what a failing queue could not take; then to put back claims."""
        with self._lock:
            unrecorded, self._unrecorded = self._unrecorded, []
        for claim, message, unserved in unrecorded:
            self._write_rest(claim, message, unserved, counts)
        self.release_leftovers()

    def _settle(self, claim: Claim, message: SpooledMessage | None, verdict: Verdict,
                counts: DeliveryCounts, whole: bool) -> None:
        """Defer or bury the whole claim, or a copy of it for the verdict's recipients."""
        reason = dict(verdict.reason)
        if message is not None:
            reason.update(rfcMessageId=message.message_id, to=list(verdict.rcpts),
                          template=message.template, attempts=message.attempt + 1)
        if verdict.action == "deferred":
            split = verdict.reason.get("reason") == RECIPIENT_LIMIT  # a new transaction now
            attempt = message.attempt + (0 if split else 1)
            due = self.clock() if split else verdict.reason["due"]
            last_reply = " ".join(str(p) for p in (reason.get("code"), reason.get("reply")) if p)
            if whole:
                claim.queue.defer(claim, due, last_reply)
            else:
                claim.queue.enqueue(message.header(verdict.rcpts), message.data,
                                    message.priority, due=due, attempt=attempt)
            log_event(logging.INFO, "deferred", rfcMessageId=message.message_id, id=message.id,
                      to=list(verdict.rcpts), attempt=attempt,
                      next_try=_iso_time(due), code=reason.get("code"), reason=last_reply)
        elif message is not None and _carries_secret(message):
            claim.queue.add_failed(_redacted(message), verdict.rcpts, {**reason, "redacted": True})
            if whole:
                claim.queue.ack(claim)
        elif whole:
            claim.queue.fail(claim, reason)
        else:
            claim.queue.add_failed(message, verdict.rcpts, reason)
        counts.add(verdict.action)
        self.metrics.inc("sysmail_messages_total", outcome=verdict.action)
        if verdict.action != "deferred":
            log_event(logging.WARNING, verdict.action, id=claim.name.id, **reason)

    def _log_sent(self, message: SpooledMessage, sent: Verdict, duration: float) -> None:
        now = self.clock()
        if now - self._last_mark >= LAST_SENT_RESOLUTION_SECONDS:  # one utime a second will do
            self._last_mark = now
            self.spool.mark_sent()
        latency = max(now - message.queued_at, 0.0)
        self.metrics.inc("sysmail_messages_total", outcome="sent")
        self.metrics.count_sent(now)
        self.metrics.observe_latency(latency)
        if _log.isEnabledFor(logging.INFO):
            log_event(logging.INFO, "sent", rfcMessageId=message.message_id, id=message.id,
                      to=list(sent.rcpts), template=message.template or "ad-hoc",
                      code=sent.reason["code"], reply=sent.reason["reply"],
                      duration_ms=round(duration * 1000, 1), latency_ms=round(latency * 1000, 1))


class Sender:
    """Drains a spool through a transport, signing each message at send time.

    With connections > 1 (and a transport_factory for the extra ones) a batch is sent over
    that many SMTP connections at once: OpenSSL signs outside the GIL, so the connections use
    every core and hide each other's round trips. With one, messages go strictly in order.
    """

    def __init__(self, spool: Spool, transport: Transport,
                 signer: DkimSigner | None = None, *, clock: Clock = time.time,
                 retry: RetryPolicy = RetryPolicy(), batch_size: int = SENDER_BATCH_SIZE,
                 rand: Callable[[], float] = random.random, metrics: Metrics | None = None,
                 fallback: RedisQueue | None = None, on_cycle: Callable[[], None] | None = None,
                 connections: int = 1,
                 transport_factory: Callable[[], Transport] | None = None,
                 sender_address: str = "", dead_letter_seconds: float = 14 * DAY_SECONDS,
                 bounce_address: str = "", queue_key: bytes = UNKEYED_QUEUE_KEY,
                 bounces: BounceHandler | None = None):
        self.spool = spool
        self.sender_address = sender_address
        self.bounce_address = bounce_address
        self.queue_key = queue_key
        self.dead_letter_seconds = dead_letter_seconds
        self.fallback = fallback
        self.queues: tuple[Queue, ...] = (spool, fallback) if fallback else (spool,)
        self.on_cycle = on_cycle
        self.metrics = metrics or Metrics()
        self.transport = transport
        self.signer = signer
        self.clock = clock
        self.retry = retry
        self.batch_size = batch_size
        self.rand = rand
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._next_due: float | None = None
        self._relay = _RelayBackoff(clock, rand, retry.relay_base_seconds,
                                    retry.relay_cap_seconds, retry.jitter)
        self._last_clean = 0.0
        self._last_queue_warning: dict[str, float] = {}
        self._commit = threading.Lock()
        self._paced_until = NOT_PACED
        self._settler = _Settler(spool, self.metrics, clock, retry, rand, bounces)
        self._connections = _Connections(transport, connections, transport_factory)
        # two messages a connection: enough to keep each busy, few enough that urgent mail
        # queued during a bulk drain waits for little more than one message per connection
        self._claim_size = min(batch_size, 2 * len(self._connections.all))

    def close(self) -> None:
        """Close every SMTP connection and the connection threads."""
        self._connections.close()

    def interrupt(self) -> None:
        """Cut every connection from another thread: a transaction waiting on a stalled relay
        ends at once, and its message is released (sent again later, at most once)."""
        for transport in self._connections.all:
            transport.interrupt()

    def wake(self) -> None:
        """Make a waiting run() look at the spool now."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Deliver until stop is set (then call wake()); never dies on a message."""
        self._stop = stop
        listener = self.spool.listen(self.wake)
        log_event(logging.INFO, "sender_started", spool=str(self.spool.root),
                  transport=repr(self.transport), signing=self.signer is not None,
                  signing_backend=signing_backend_note(self.signer.backend) if self.signer
                  else "unsigned")
        try:
            while not stop.is_set():
                self._cycle()
                self._beat()
                self._wake.wait(self._idle_seconds())
                self._wake.clear()
        finally:
            if listener:
                listener.close()
            self._settler.record_leftovers(DeliveryCounts())  # a last try before we go
            self.close()
            log_event(logging.INFO, "sender_stopped")

    def _beat(self) -> None:
        if self.on_cycle:
            try:
                self.on_cycle()
            except Exception:  # noqa: BLE001 - a heartbeat hook must never stop delivery
                _log.exception("heartbeat_error", extra={"fields": {}})

    def _cycle(self) -> None:
        now = self.clock()
        if self._relay.seconds_left():
            return
        try:
            if now - self._last_clean > TMP_CLEAN_INTERVAL_SECONDS:
                self._last_clean = now
                with contextlib.suppress(SpoolError):  # a broken spool: Redis may still serve
                    self.spool.clean_tmp()
                    self.spool.clean_failed(self.dead_letter_seconds)
            self.run_once()
        except Exception:  # noqa: BLE001 - the thread must survive anything: log, slow down
            _log.exception("sender_error", extra={"fields": {}})
            self._relay.pause(SENDER_IDLE_POLL_SECONDS)

    def _idle_seconds(self) -> float:
        """Until the next due message or the relay retry, but at most a second: the loop is
        also the heartbeat (systemd's watchdog) and the recovery poll."""
        wait = SENDER_IDLE_POLL_SECONDS
        if relay_wait := self._relay.seconds_left():
            return min(wait, relay_wait)
        if self._next_due is not None:
            wait = min(wait, self._next_due - self.clock())
        return max(wait, 0.001)

    def run_once(self) -> DeliveryCounts:
        """Deliver every message due now; stop early (releasing claims) if the relay is down."""
        counts = DeliveryCounts()
        next_due: list[float] = []
        self._settler.record_leftovers(counts)
        for source in self.queues:
            try:
                if not self._drain(source, counts, next_due):
                    break
            except (QueueUnavailable, SpoolError, OSError) as exc:  # one queue down: others serve
                self._warn_queue_down(source, exc)
        if self._paced_until > self.clock():
            next_due.append(self._paced_until)
        elif self._paced_until != NOT_PACED and self._paced_until + PACING_SECONDS < self.clock():
            log_event(logging.INFO, "pacing_ended")
            self._paced_until = NOT_PACED
        self._next_due = min(next_due, default=None)
        return counts

    def _drain(self, source: Queue, counts: DeliveryCounts,
               next_due: list[float]) -> bool:
        """Deliver what is due in one queue; False when the relay went down."""
        source.recover()
        while True:
            pacing = self.clock() < self._paced_until + PACING_SECONDS
            claims, due = source.claim(1 if pacing else self._claim_size)
            if due is not None:
                next_due.append(due)
            if not claims:
                return True
            if not self._deliver_batch(claims, counts) or self._stop.is_set():
                return False

    def _warn_queue_down(self, source: Queue, exc: Exception) -> None:
        now = self.clock()
        if now - self._last_queue_warning.get(repr(source), -60.0) >= 60:
            self._last_queue_warning[repr(source)] = now
            log_event(logging.WARNING, "queue_unavailable", queue=repr(source), reason=str(exc))

    def _deliver_batch(self, claims: list[Claim], counts: DeliveryCounts) -> bool:
        """Send a batch over the free connections; False when the relay went down or stop;
        QueueUnavailable when the batch's own queue failed under it."""
        batch = _Batch(self._stop)
        self._connections.each(lambda claim: self._deliver_one(claim, counts, batch), claims)
        if isinstance(batch.error, RelayUnavailable):
            if batch.error.retry_in is not None:  # each relay keeps its own backoff
                self._relay.pause(batch.error.retry_in)
            else:
                self._relay.down(batch.error)
            return False
        if batch.error is not None:
            raise QueueUnavailable(f"the queue failed while settling messages: {batch.error}")
        if batch.paced is not None:  # claim one at a time (urgent first) while it lasts
            if self._paced_until + PACING_SECONDS < self.clock():
                log_event(logging.INFO, "pacing_started", wait_seconds=round(batch.paced, 3),
                          note="a relay's rate or quota holds mail back; urgent mail first")
            self._paced_until = self.clock() + batch.paced
            return False
        return not self._stop.is_set()

    def _deliver_one(self, claim: Claim, counts: DeliveryCounts, batch: _Batch) -> None:
        """Deliver one claim on a free connection; never raises."""
        self._beat()  # a long backlog is progress too: systemd's watchdog must hear of it
        if batch.halted:  # the rest goes back, unsent and unharmed
            self._settler.release(claim, counts)
            return
        try:
            with self._connections.borrow() as transport:
                self._deliver(claim, counts, transport, batch)
        except Paced as exc:  # back when a relay has room, at no cost
            batch.pace(exc.retry_in)
            self._settler.release(claim, counts, due=self.clock() + exc.retry_in,
                                  outcome="paced")
        except (RelayUnavailable, QueueUnavailable, SpoolError, OSError) as exc:
            batch.halt(exc)  # the relay or the queue, not the message
            self._settler.release(claim, counts)
        except Exception as exc:  # noqa: BLE001 - a poisoned message must not stop the rest
            _log.exception("deliver_error", extra={"fields": {"id": claim.name.id}})
            internal = Verdict("failed", (), {"reason": "internal error",
                                              "error": type(exc).__name__})
            try:
                self._settler.apply(claim, None, (internal,), counts)
            except (QueueUnavailable, SpoolError, OSError) as queue_error:
                batch.halt(queue_error)
                self._settler.release(claim, counts)

    def _deliver(self, claim: Claim, counts: DeliveryCounts, transport: Transport,
                 batch: _Batch) -> None:
        """Sign and negotiate (in parallel with other connections), then send the content and
        settle under the commit lock: a crash then leaves at most one accepted but unforgotten
        message per process to send again, however many connections there are."""
        try:
            message = claim.queue.read(claim)
            self._check_sendable(message)
        except SpoolError as exc:
            reason = "unauthenticated" if isinstance(exc, UnauthenticatedEntry) else "unreadable"
            refused = Verdict("failed", (), {"reason": reason, "error": str(exc)})
            self._settler.apply(claim, None, (refused,), counts)
            return
        if self.clock() >= message.expires_at:
            self._settler.apply(claim, message, (Verdict("expired", message.rcpts,
                                                 {"reason": "expired"}),), counts)
            return
        data = self.signer.sign(message.data) if self.signer else message.data
        started = time.monotonic()
        try:
            answer: Envelope | DeliveryError = transport.begin(
                message.mail_from, message.rcpts, urgent=message.priority == URGENT)
        except (RelayUnavailable, Paced):
            raise
        except DeliveryError as exc:
            answer = exc
        self._relay.up()  # the relay answered: an earlier outage is over
        with self._commit:
            if batch.halted:  # stopped, or the relay or queue failed while we waited our turn
                transport.abort()
                self._settler.release(claim, counts)
                return
            result = self._content(transport, answer, data)
            self._settler.apply(claim, message, self._settler.verdicts(message, result), counts,
                        time.monotonic() - started)
        self._settler.report_refusals(message, result)

    def _check_sendable(self, message: SpooledMessage) -> None:
        """UnauthenticatedEntry unless the envelope is ours: From the configured sender, and
        every recipient one plain address (an entry passed its MAC, but keys do leak). With
        SYSMAIL_BOUNCE_DOMAIN, From may be the VERP address of the one recipient instead."""
        if self.sender_address and message.mail_from != self.sender_address \
                and not self._own_verp(message):
            raise UnauthenticatedEntry(f"queue entry {message.id} is from {message.mail_from!r}, "
                                       "not the configured sender")
        try:
            if any(validate_address(r) != r for r in message.rcpts):
                raise MessageError("a recipient is not in its normal form")
        except MessageError as exc:
            raise UnauthenticatedEntry(f"queue entry {message.id}: {exc}") from None

    def _own_verp(self, message: SpooledMessage) -> bool:
        local, _, domain = message.mail_from.rpartition("@")
        bounce_local, _, bounce_domain = self.bounce_address.rpartition("@")
        return (bool(self.bounce_address) and len(message.rcpts) == 1
                and domain == bounce_domain and local.startswith(bounce_local + "+")
                and verp_recipient(local, message.rcpts, self.queue_key, self.clock()) is not None)

    @staticmethod
    def _content(transport: Transport, answer: Envelope | DeliveryError,
                 data: bytes) -> SendResult | DeliveryError:
        """The relay's last word on a message: its final reply, or the refusal."""
        if isinstance(answer, DeliveryError):
            return answer
        if not answer.accepted:
            return SendResult(0, "no recipient accepted", (), answer.refused)
        try:
            return transport.finish(data)
        except (RelayUnavailable, Paced):
            raise
        except DeliveryError as exc:
            return exc

def _carries_secret(message: SpooledMessage) -> bool:
    """True for a message of a template whose variables work as credentials (a reset link,
    a verification link, a sign-in code)."""
    template = TEMPLATES.get(message.template)
    return template is not None and bool(template.secrets)


def _redacted(message: SpooledMessage) -> SpooledMessage:
    """The message as a dead letter keeps it: who, when and which, and neither subject nor
    body (they hold the link or code, which works until it expires)."""
    head = message.data.partition(b"\r\n\r\n")[0]
    kept = [field for field in re.split(rb"\r\n(?![ \t])", head)
            if field.split(b":", 1)[0].lower() in _REDACTED_KEEPS]
    note = (f"Subject: [redacted {message.template} mail]\r\n"
            "Content-Type: text/plain; charset=\"us-ascii\"\r\n\r\n"
            "sysmail removed the subject and body of this dead letter: they carried a one-time "
            "link or code. The recipient can ask for a new one.\r\n").encode()
    return dataclasses.replace(message, data=b"\r\n".join(kept) + b"\r\n" + note)


_REDACTED_KEEPS = {b"from", b"to", b"date", b"message-id", b"reply-to", b"mime-version"}


def _refusal_kind(code: int | None, served: bool) -> str:
    """permanent (5xx), limit (452 for some while others were accepted: RFC 5321 4.5.3.1.10
    asks the client to send those in a new transaction), or temporary."""
    if classify_reply(code or 451) == "permanent":
        return "permanent"
    return "limit" if code == 452 and served else "temporary"


def _refusal(reason: str, code: int | None, reply: str) -> dict:
    return {"reason": reason, "code": code, "reply": reply}


class SenderThread:
    """A sender running in a thread of this process: the service's, or an embedding program's."""

    def __init__(self, make_sender: Callable[[], Sender]):
        self._make_sender = make_sender
        self._stop = threading.Event()
        self.sender: Sender | None = None
        self._thread: threading.Thread | None = None

    def start(self, on_cycle: Callable[[], None] | None = None) -> None:
        """Start delivering in a daemon thread (on_cycle: a heartbeat hook); once is enough."""
        if self._thread is not None:
            return
        self._stop.clear()
        self.sender = self._make_sender()
        self.sender.on_cycle = on_cycle
        self._thread = threading.Thread(target=self.sender.run, args=(self._stop,),
                                        name="sysmail-sender", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop after the current SMTP transaction; one that a stalled relay holds longer than
        STOP_GRACE_SECONDS is cut, and its message stays queued."""
        if self._thread is None or self.sender is None:
            return
        self._stop.set()
        self.sender.wake()
        self._thread.join(min(timeout, STOP_GRACE_SECONDS))
        if self._thread.is_alive():
            log_event(logging.WARNING, "stop_interrupts_relay", grace=STOP_GRACE_SECONDS)
            self.sender.interrupt()
            self._thread.join(timeout)
        self._thread = self.sender = None


# ---- Token store ---- #

RESET_PURPOSE = "password-reset"
PASSWORD_MIN_CHARS, PASSWORD_MAX_CHARS = 8, 1024
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
SQLITE_BUSY_TIMEOUT_SECONDS = 2.0


@dataclass(frozen=True)
class User:
    """An account as the token store knows it."""

    id: str
    email: str
    name: str = ""
    locale: str = ""  # the language of the user's mail (de, fr-CA); "" for the default


def _user_locale(user: User) -> str:
    """The user's locale when it is a language tag, else "" (the default language): an odd
    value from a store never stops the user's mail."""
    locale = user.locale
    return locale if _LANGUAGE_TAG.fullmatch(locale.replace("_", "-")) else ""


def _checked_locale(locale: str) -> str:
    """A locale to store with a user: "" or a language tag; MessageError otherwise."""
    if locale and not _LANGUAGE_TAG.fullmatch(locale.replace("_", "-")):
        raise MessageError("the locale must be a language tag like de or fr-CA")
    return locale


class TokenStore(Protocol):
    """What the password-reset flow needs from an application's user data.

    Implementations must be safe to call from several threads. Any failure to reach the data
    raises StoreError; the HTTP API then answers 503 and nothing else stops.
    """

    def find_user(self, email: str) -> User | None:
        """The user with this address (case-insensitive), or None."""

    def save_token(self, token_hash: bytes, user: User, purpose: str, created_at: float,
                   expires_at: float) -> None:
        """Keep a token's SHA-256 hash (never the token) for a user and purpose."""

    def consume_token(self, token_hash: bytes, purpose: str, now: float) -> User | None:
        """Atomically mark an unused, unexpired token used and revoke the user's other tokens of
        that purpose; return its user, or None when it is unknown, used or expired."""

    def set_password(self, user: User, password_hash: str) -> None:
        """Store a new password hash (hash_password's format) for the user."""

    def audit(self, user: User, action: str, at: float, client: str) -> None:
        """Record an audit entry: who, what, when, from which client address."""

    def password_changed(self, user: User) -> None:
        """Hook called after a password change: invalidate the user's sessions."""

    def ping(self) -> None:
        """Raise StoreError unless the store can be read and written now."""


def hash_password(password: str) -> str:
    """scrypt with a random per-user salt; the parameters are kept in the result."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                            maxmem=64 * 1024 * 1024, dklen=32)
    return "$".join(("scrypt", f"n={SCRYPT_N},r={SCRYPT_R},p={SCRYPT_P}",
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def verify_password(password: str, stored: str) -> bool:
    """True when password matches a hash_password result (constant-time comparison)."""
    try:
        scheme, params, salt, digest = stored.split("$")
        cost = dict(p.split("=") for p in params.split(","))
        actual = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(cost["n"]),
                                r=int(cost["r"]), p=int(cost["p"]), maxmem=64 * 1024 * 1024,
                                dklen=len(base64.b64decode(digest)))
    except (ValueError, KeyError):
        return False
    return scheme == "scrypt" and hmac.compare_digest(actual, base64.b64decode(digest))


def token_hash(token: str) -> bytes:
    """The SHA-256 of a token: what the store keeps instead of the token."""
    return hashlib.sha256(token.encode("utf-8", "replace")).digest()


class MemoryStore:
    """A TokenStore in memory: for tests and for embedding without a database."""

    def __init__(self, on_password_changed: Callable[[User], None] | None = None):
        self._lock = threading.Lock()
        self.users: dict[str, User] = {}
        self.passwords: dict[str, str] = {}
        self.tokens: dict[bytes, dict] = {}
        self.audit_log: list[tuple[str, str, float, str]] = []
        self._on_password_changed = on_password_changed
        self._next_id = 0

    def add_user(self, email: str, name: str = "", password: str | None = None,
                 locale: str = "") -> User:
        """Create a user (optionally with a password and a locale) and return it."""
        address = validate_address(email)
        locale = _checked_locale(locale)
        hashed = hash_password(password) if password else None
        with self._lock:
            if address.lower() in self.users:
                raise MessageError(f"a user with the address {address} exists already")
            self._next_id += 1
            user = User(str(self._next_id), address, name, locale)
            self.users[address.lower()] = user
            if hashed:
                self.passwords[user.id] = hashed
            return user

    def find_user(self, email: str) -> User | None:
        """The user with this address, or None."""
        with self._lock:
            return self.users.get(email.lower())

    def save_token(self, token_hash: bytes, user: User, purpose: str, created_at: float,
                   expires_at: float) -> None:
        """Keep a token hash."""
        with self._lock:
            self.tokens[token_hash] = {"user": user, "purpose": purpose, "created_at": created_at,
                                       "expires_at": expires_at, "used_at": None}

    def consume_token(self, token_hash: bytes, purpose: str, now: float) -> User | None:
        """Use a token once; revoke the user's others."""
        with self._lock:
            token = self.tokens.get(token_hash)
            if (token is None or token["purpose"] != purpose or token["used_at"] is not None
                    or token["expires_at"] <= now):
                return None
            for other in self.tokens.values():
                if (other["user"].id == token["user"].id and other["purpose"] == purpose
                        and other["used_at"] is None):
                    other["used_at"] = now
            return token["user"]

    def set_password(self, user: User, password_hash: str) -> None:
        """Store a password hash."""
        with self._lock:
            self.passwords[user.id] = password_hash

    def audit(self, user: User, action: str, at: float, client: str) -> None:
        """Record an audit entry."""
        with self._lock:
            self.audit_log.append((user.id, action, at, client))

    def password_changed(self, user: User) -> None:
        """Call the session-invalidation callback, if any."""
        if self._on_password_changed:
            self._on_password_changed(user)

    def ping(self) -> None:
        """Always reachable."""


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY,
    email TEXT NOT NULL UNIQUE COLLATE NOCASE,
    name TEXT NOT NULL DEFAULT '',
    password_hash TEXT,
    created_at REAL NOT NULL,
    locale TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS tokens (
    hash BLOB PRIMARY KEY,
    user_id INTEGER NOT NULL REFERENCES users(id),
    purpose TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    used_at REAL
);
CREATE INDEX IF NOT EXISTS tokens_by_user ON tokens(user_id, purpose, used_at);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY,
    user_id INTEGER NOT NULL,
    action TEXT NOT NULL,
    at REAL NOT NULL,
    client TEXT NOT NULL
);
"""


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database made by an older sysmail up to the schema: users.locale (added with
    the default language, so existing users keep getting the mail they got)."""
    db.execute("BEGIN IMMEDIATE")  # one process migrates; the others then see the column
    try:
        columns = {row[1] for row in db.execute("PRAGMA table_info(users)")}
        if "locale" not in columns:
            db.execute("ALTER TABLE users ADD COLUMN locale TEXT NOT NULL DEFAULT ''")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


class SqliteStore:
    """The default TokenStore: users, token hashes and audit entries in one SQLite file.

    WAL with synchronous=FULL; one connection per thread; writes in BEGIN IMMEDIATE
    transactions, so a token is consumed exactly once however many threads race for it.
    """

    def __init__(self, path: Path | str, on_password_changed: Callable[[User], None] | None = None,
                 clock: Clock = time.time):
        self.path = Path(path)
        self.clock = clock
        self._local = threading.local()
        self._on_password_changed = on_password_changed
        self._schema_ready = False
        self._ping_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self.path)!r})"

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            _create_private(self.path)  # SQLite gives its -wal and -shm files the same mode
            db = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_SECONDS,
                                 isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            if not self._schema_ready:
                db.executescript(_SQLITE_SCHEMA)
                _migrate(db)
                self._schema_ready = True
            self._local.db = db
        return db

    def _run(self, work: Callable[[sqlite3.Connection], object], write: bool = False) -> object:
        """Run work in a transaction; wrap any database failure in StoreError."""
        try:
            db = self._db()
            db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = work(db)
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            return result
        except (sqlite3.Error, OSError) as exc:
            self._local.db = None
            raise StoreError(f"the token store is unavailable ({exc.__class__.__name__})") from exc

    def add_user(self, email: str, name: str = "", password: str | None = None,
                 locale: str = "") -> User:
        """Create a user (optionally with a password and a locale); raise MessageError if it
        exists."""
        email = validate_address(email)
        locale = _checked_locale(locale)
        hashed = hash_password(password) if password else None

        def insert(db: sqlite3.Connection) -> int:
            return db.execute("INSERT INTO users (email, name, password_hash, created_at, locale) "
                              "VALUES (?, ?, ?, ?, ?) RETURNING id",
                              (email, name, hashed, self.clock(), locale)).fetchone()[0]
        try:
            user_id = self._run(insert, write=True)
        except StoreError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise MessageError(f"a user with the address {email} exists already") from None
            raise
        return User(str(user_id), email, name, locale)

    def users(self) -> list[dict]:
        """Every user with whether they have a password, oldest first."""
        rows = self._run(lambda db: db.execute(
            "SELECT id, email, name, password_hash IS NOT NULL, created_at, locale FROM users "
            "ORDER BY id").fetchall())
        return [{"id": str(r[0]), "email": r[1], "name": r[2], "has_password": bool(r[3]),
                 "created_at": r[4], "locale": r[5]} for r in rows]

    def find_user(self, email: str) -> User | None:
        """The user with this address (case-insensitive), or None."""
        row = self._run(lambda db: db.execute(
            "SELECT id, email, name, locale FROM users WHERE email = ?", (email,)).fetchone())
        return User(str(row[0]), *row[1:]) if row else None

    def save_token(self, token_hash: bytes, user: User, purpose: str, created_at: float,
                   expires_at: float) -> None:
        """Keep a token hash for a user."""
        self._run(lambda db: db.execute(
            "INSERT INTO tokens (hash, user_id, purpose, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?)", (token_hash, int(user.id), purpose, created_at, expires_at)),
            write=True)

    def consume_token(self, token_hash: bytes, purpose: str, now: float) -> User | None:
        """Use a token once and revoke the user's other tokens of that purpose, atomically."""
        def consume(db: sqlite3.Connection) -> User | None:
            row = db.execute(
                "UPDATE tokens SET used_at = ? WHERE hash = ? AND purpose = ? AND used_at IS NULL "
                "AND expires_at > ? RETURNING user_id", (now, token_hash, purpose, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE tokens SET used_at = ? WHERE user_id = ? AND purpose = ? "
                       "AND used_at IS NULL", (now, row[0], purpose))
            user = db.execute("SELECT id, email, name, locale FROM users WHERE id = ?",
                              row).fetchone()
            return User(str(user[0]), *user[1:]) if user else None
        return self._run(consume, write=True)

    def set_password(self, user: User, password_hash: str) -> None:
        """Store a new password hash."""
        self._run(lambda db: db.execute("UPDATE users SET password_hash = ? WHERE id = ?",
                                        (password_hash, int(user.id))), write=True)

    def password_hash(self, user: User) -> str | None:
        """The stored password hash of a user, or None."""
        row = self._run(lambda db: db.execute("SELECT password_hash FROM users WHERE id = ?",
                                              (int(user.id),)).fetchone())
        return row[0] if row else None

    def audit(self, user: User, action: str, at: float, client: str) -> None:
        """Record an audit entry."""
        self._run(lambda db: db.execute(
            "INSERT INTO audit (user_id, action, at, client) VALUES (?, ?, ?, ?)",
            (int(user.id), action, at, client)), write=True)

    def audit_entries(self, user: User) -> list[tuple[str, float, str]]:
        """A user's audit entries (action, time, client), oldest first."""
        return self._run(lambda db: db.execute(
            "SELECT action, at, client FROM audit WHERE user_id = ? ORDER BY id",
            (int(user.id),)).fetchall())

    def password_changed(self, user: User) -> None:
        """Call the session-invalidation callback, if any."""
        if self._on_password_changed:
            self._on_password_changed(user)

    def ping(self) -> None:
        """Take and drop the write lock: fails when the file is unreadable, locked or broken."""
        # one probe at a time: concurrent ones would queue in SQLite's busy handler, which
        # sleeps in steps of up to 100 ms, where a Python lock hands over at once
        with self._ping_lock:
            self._run(lambda db: db.execute("SELECT count(*) FROM sqlite_master").fetchone(),
                      write=True)


# ---- HTTP API ---- #

MAX_BODY_BYTES = 16 * 1024
MAX_BATCH_BODY_BYTES = 4 * 1024 * 1024  # POST /v1/emails with a valid bearer: a batch
MAX_BATCH_RECIPIENTS = 20_000
REQUEST_DEADLINE_SECONDS = 10.0  # from the connection to the whole request read and answered
MAX_CONNECTIONS = 128  # per listener; beyond, a JSON 503 on the accepting thread
# No one client takes the server from the others (issue 9):
BUSY_CONNECTIONS = MAX_CONNECTIONS // 2  # from here on the server is busy, and then
MAX_CONNECTIONS_PER_CLIENT = 16  # a client address (an IPv6 /64) holding this many gets a 503,
HEADER_DEADLINE_SECONDS = 5.0  # and headers not in this long after the connection are cut
MAX_HEADER_BYTES = 64 * 1024  # request line and headers of one request; beyond, 414 or 431
HEADER_BYTES_PER_CONNECTION = 8 * 1024  # each connection's own; beyond, from the shared budget
HEADER_BYTES_SHARED = 2 * 1024 * 1024  # per listener; when spent, a 503 (with the above: 3 MiB)
IDEMPOTENCY_SECONDS = 24 * 3600
IDEMPOTENCY_TAKEN_SECONDS = 3 * REQUEST_DEADLINE_SECONDS  # longer than any request may take
FORGOT_QUEUE_SIZE = 10_000
FORGOT_TICK_SECONDS = 0.5
_JSON_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff"}
_PAGE_HEADERS = {**_JSON_HEADERS, "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
                 "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
                                            "form-action 'self'; frame-ancestors 'none'"}
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]{20,128}")


@dataclass(frozen=True)
class Request:
    """An HTTP request as the API functions see it (the body already bounded and read)."""

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: bytes
    client: str


@dataclass(frozen=True)
class Response:
    """What to send back: status, body and headers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Mapping[str, str] = field(default_factory=lambda: dict(_JSON_HEADERS))


Routes = dict[tuple[str, str], Callable[[Request], Response]]


class HttpError(SysmailError):
    """A request refused with a status and a message safe to show the client."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None):
        self.status = status
        self.headers = dict(headers or {})
        super().__init__(message)


def json_response(status: int, payload: object, **headers: str) -> Response:
    """A JSON response that is never cached."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    return Response(status, body, headers={**_JSON_HEADERS, **headers})


class RateLimiter:
    """Fixed-window counters per key, kept in memory (one process), at most max_keys of them."""

    MAX_KEYS = 100_000

    def __init__(self, clock: Clock = time.monotonic, max_keys: int = MAX_KEYS):
        self.clock = clock
        self.max_keys = max_keys
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[float, int]] = {}  # key -> (window end, hits)

    def hit(self, key: str, limit: int, window: float) -> float | None:
        """Count one hit; None when allowed, else the seconds until the window resets."""
        now = self.clock()
        with self._lock:
            ends, count = self._windows.get(key, (0.0, 0))
            if ends <= now:
                ends, count = now - now % window + window, 0
            if key not in self._windows and len(self._windows) >= self.max_keys:
                self._evict(now)
            self._windows[key] = (ends, count + 1)
        return None if count < limit else max(ends - now, 0.001)

    def _evict(self, now: float) -> None:
        """Make room: drop expired windows first; when every window is live, the oldest half."""
        live = {k: v for k, v in self._windows.items() if v[0] > now}
        if len(live) >= self.max_keys:
            live = dict(sorted(live.items(), key=lambda kv: kv[1][0])[len(live) // 2:])
        self._windows = live


class RedisRateLimiter:
    """Fixed-window counters in Redis, shared by every sysmail host; local counters if it is down."""

    _SCRIPT = """
local count = redis.call('INCR', KEYS[1])
if count == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {count, redis.call('PTTL', KEYS[1])}
"""

    def __init__(self, url: str, local: RateLimiter | None = None):
        import redis

        self._redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_SECONDS,
                                           socket_connect_timeout=REDIS_TIMEOUT_SECONDS)
        self._script = self._redis.register_script(self._SCRIPT)
        self._errors = (redis.exceptions.RedisError, OSError)
        self._local = local or RateLimiter()

    def hit(self, key: str, limit: int, window: float) -> float | None:
        """Count one hit; None when allowed, else the seconds until the window resets."""
        try:
            count, ttl_ms = self._script(keys=[f"{REDIS_PREFIX}rate:{key}"],
                                         args=[int(window * 1000)])
        except self._errors:
            return self._local.hit(key, limit, window)
        return None if count <= limit else max(ttl_ms, 1) / 1000


class IdempotencyKeys:
    """Idempotency-Key -> Message-ID for 24 h, one file per key in a folder (shared by processes)."""

    def __init__(self, folder: Path, clock: Clock = time.time):
        self.folder = folder
        self.clock = clock
        self._last_prune = 0.0

    def remember(self, key: str, make_id: Callable[[], str]) -> tuple[str, bool]:
        """Return (message id, True) after calling make_id for a new key, or the stored id.
        A key ends bound to its message or released, never taken for nothing."""
        _make_private_dir(self.folder)
        self._prune()
        path = self.folder / hashlib.sha256(key.encode()).hexdigest()
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SPOOL_FILE_MODE)
        except FileExistsError:
            return self._stored(path, key, make_id)
        try:
            self._stamp(fd)  # a taker that crashes leaves an empty key this old
            message_id = make_id()
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        try:
            bound = self._bind(fd, message_id)
        finally:
            os.close(fd)
        if not bound:  # the mail is queued; a key that cannot be kept is released, not wedged
            _unlink_quietly(path)
            log_event(logging.WARNING, "idempotency_key_released", messageId=message_id)
        return message_id, True

    def _stamp(self, fd: int) -> None:
        now = self.clock()
        os.utime(fd, (now, now))  # ages are read from the same clock that prunes them

    def _bind(self, fd: int, message_id: str) -> bool:
        """Write the message id into a taken key, durably; False when the disk refuses."""
        try:
            _write_all(fd, message_id.encode())
            self._stamp(fd)
            os.fsync(fd)
            _fsync_dir(self.folder)
        except OSError:
            return False
        return True

    def _stored(self, path: Path, key: str, make_id: Callable[[], str]) -> tuple[str, bool]:
        for _ in range(50):  # a concurrent first request may still be writing the id
            try:
                age = self.clock() - path.stat().st_mtime
                text = _read_regular(path).decode("utf-8", "replace")
            except FileNotFoundError:
                return self.remember(key, make_id)
            if age > IDEMPOTENCY_SECONDS or (not text and age > IDEMPOTENCY_TAKEN_SECONDS):
                _unlink_quietly(path)  # expired, or taken by a request that died
                return self.remember(key, make_id)
            if text:
                return text, False
            time.sleep(0.02)
        raise HttpError(409, "a request with this Idempotency-Key is still in progress")

    def _prune(self) -> None:
        now = self.clock()
        if now - self._last_prune < 3600:
            return
        self._last_prune = now
        for entry in _scan(self.folder):
            try:
                if (self.folder / entry).stat().st_mtime < now - IDEMPOTENCY_SECONDS:
                    _unlink_quietly(self.folder / entry)
            except FileNotFoundError:
                pass


class Api:
    """The HTTP API's logic as plain functions of a Request, on the parts build_app made.

    forgot(email, client) hands a forgot-password request to the worker that does the lookup
    and the enqueue off the request path.
    """

    def __init__(self, config: Config, enqueuer: Enqueuer, store: TokenStore, *,
                 limiter: RateLimiter | RedisRateLimiter, idempotency: IdempotencyKeys,
                 forgot: Callable[[str, str], None], clock: Clock = time.time,
                 relays: RelayHealth | None = None, bounces: BounceHandler | None = None):
        self.config = config
        self.bounces = bounces or BounceHandler(enqueuer.metrics)
        self.relays = relays
        self.enqueuer = enqueuer
        self.store = store
        self.metrics = enqueuer.metrics
        self.limiter = limiter
        self.idempotency = idempotency
        self.forgot = forgot
        self.clock = clock
        self.started = clock()
        self.routes: Routes = {
            ("POST", "/v1/auth/forgot-password"): self.forgot_password,
            ("POST", "/v1/auth/reset-password"): self.reset_password,
            ("GET", "/reset-password"): self.reset_page,
            ("POST", "/reset-password"): self.reset_form,
            ("POST", "/v1/emails"): self.send_email,
            ("GET", "/v1/suppressions"): self.list_suppressions,
            ("POST", "/v1/suppressions"): self.add_suppression,
            ("GET", "/v1/suppressions/*"): self.show_suppression,
            ("DELETE", "/v1/suppressions/*"): self.remove_suppression,
            ("GET", "/v1/unsubscribe"): self.unsubscribe_page,
            ("POST", "/v1/unsubscribe"): self.unsubscribe,
            ("POST", "/v1/bounces"): self.bounce,
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.ready,
        }
        # the operators' listener (SYSMAIL_METRICS_LISTEN): counters and check details would
        # tell an outsider which addresses have accounts, so the public one has neither
        self.ops_routes: Routes = {
            ("GET", "/healthz"): self.healthz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/metrics"): self.metrics_page,
        }

    # -- dispatch: the one error boundary -- #

    def handle(self, request: Request, routes: Routes | None = None) -> Response:
        """Route a request (through the public routes by default); map every error to a JSON
        4xx/503, or a generic 500 (logged)."""
        routes = self.routes if routes is None else routes
        route = self.route_name(request.path, routes)
        try:
            response = self._dispatch(request, routes)
        except HttpError as exc:
            response = json_response(exc.status, {"error": str(exc)}, **exc.headers)
        except MessageError as exc:
            response = json_response(400, {"error": str(exc)})
        except (StoreError, QueueUnavailable, SpoolError) as exc:
            log_event(logging.ERROR, "unavailable", route=route, reason=str(exc))
            response = json_response(503, {"error": "temporarily unavailable, try again later"},
                                     **{"Retry-After": "5"})
        except Exception:  # noqa: BLE001 - the HTTP boundary: log it, tell the client nothing
            _log.exception("http_internal_error", extra={"fields": {"route": route}})
            response = json_response(500, {"error": "internal error"})
        return response

    def route_name(self, path: str, routes: Routes | None = None) -> str:
        """The route's path when it is known, else "unmatched" (raw paths may carry secrets)."""
        routes = self.routes if routes is None else routes
        named = path.rpartition("/")[0] + "/*"  # a path naming one thing: /v1/suppressions/ADDR
        return next((p for p in (path, named) if any(r == p for _, r in routes)), "unmatched")

    def _dispatch(self, request: Request, routes: Routes) -> Response:
        route = self.route_name(request.path, routes)
        handler = routes.get((request.method, route))
        if handler is not None:
            return handler(request)
        allowed = sorted(m for m, p in routes if p == route)
        if allowed:
            raise HttpError(405, f"use {' or '.join(allowed)} for {request.path}",
                            {"Allow": ", ".join(allowed)})
        raise HttpError(404, "no such endpoint")

    # -- password reset -- #

    def forgot_password(self, request: Request) -> Response:
        """Always 202 with one body: the lookup, token and enqueue happen off the request path."""
        email = validate_address(_json_fields(request, ("email",))["email"])
        self._limit(request, "forgot_client", request.client, self.config.forgot_client_limit)
        self._limit(request, "forgot_address", email.lower(), self.config.forgot_address_limit)
        self.store.ping()
        self.enqueuer.check_queue()
        self.forgot(email, request.client)
        return json_response(202, {"status": "accepted", "message": "If an account uses this "
                                   "address, a password reset link is on its way."})

    def reset_password(self, request: Request) -> Response:
        """Consume a valid token and set the new password; 400 with one generic error otherwise."""
        fields = _json_fields(request, ("token", "password"))
        self._limit(request, "reset_client", request.client, self.config.reset_client_limit)
        self.complete_reset(fields["token"], fields["password"], request.client)
        return json_response(200, {"status": "password changed"})

    def complete_reset(self, token: str, password: str, client: str) -> User:
        """The shared end of both reset routes; raise HttpError(400) for a bad token or password."""
        if not PASSWORD_MIN_CHARS <= len(password) <= PASSWORD_MAX_CHARS:
            raise HttpError(400, f"the password must be {PASSWORD_MIN_CHARS} to "
                                 f"{PASSWORD_MAX_CHARS} characters long")
        try:
            password.encode("utf-8")  # checked before the token is spent: a bad password keeps it
        except UnicodeEncodeError:
            raise HttpError(400, "the password is not valid Unicode text") from None
        user = None
        if _TOKEN_SHAPE.fullmatch(token):
            user = self.store.consume_token(token_hash(token), RESET_PURPOSE, self.clock())
        if user is None:
            raise HttpError(400, "this reset link is invalid, used or expired")
        # scrypt only after the token proved valid: a flood of bad tokens costs no hashing
        self.store.set_password(user, hash_password(password))
        self.store.audit(user, "password_reset", self.clock(), client)
        self.store.password_changed(user)
        log_event(logging.INFO, "password_changed", user=user.id, client=client)
        self._alert_password_changed(user, client)
        return user

    def _alert_password_changed(self, user: User, client: str) -> None:
        locale = _user_locale(user)
        event = self.enqueuer.catalog.pick(locale).strings["password_changed"]
        variables = {"event": event, "ip": client,
                     "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.clock()))}
        if user.name:
            variables["name"] = user.name
        try:
            self.enqueuer.enqueue_template("security-alert", user.email, variables, locale)
        except SysmailError as exc:  # the password is changed: report, do not undo
            log_event(logging.ERROR, "alert_not_queued", user=user.id, reason=str(exc))

    def reset_page(self, request: Request) -> Response:
        """The reset form; showing it never consumes the token (mail scanners follow links)."""
        token = request.query.get("token", "")
        if not _TOKEN_SHAPE.fullmatch(token):
            return _page(400, "This reset link is incomplete", "<p>Open the link from the email "
                         "again, or ask for a new one.</p>")
        return _page(200, "Choose a new password", _RESET_FORM.format(token=html.escape(token)))

    def reset_form(self, request: Request) -> Response:
        """The form's POST: consume the token and set the password; an HTML answer either way."""
        if _media_type(request) != "application/x-www-form-urlencoded":
            raise HttpError(415, "send the form as application/x-www-form-urlencoded")
        form = _form_fields(request.body)
        token, password = form.get("token", ""), form.get("password", "")
        self._limit(request, "reset_client", request.client, self.config.reset_client_limit)
        if password != form.get("confirm", ""):
            return _page(400, "The passwords differ", "<p>Go back and type the same password "
                         "twice.</p>")
        try:
            self.complete_reset(token, password, request.client)
        except HttpError as exc:
            return _page(400, "Your password was not changed", f"<p>{html.escape(str(exc))}.</p>")
        return _page(200, "Your password has been changed", "<p>You can now sign in with your new "
                     "password. Other sessions have been signed out.</p>")

    # -- internal send API -- #

    def send_email(self, request: Request) -> Response:
        """Queue a templated mail for an internal caller holding SYSMAIL_API_KEY."""
        if not self.config.api_key:
            raise HttpError(404, "no such endpoint")
        self._authorize(request)
        fields = _json_object(request)
        template, to, variables = fields.get("template"), fields.get("to"), fields.get("vars", {})
        locale = fields.get("locale")
        if not isinstance(locale, str | None):
            raise HttpError(400, '"locale" is a language tag like de or fr-CA')
        if "recipients" in fields and isinstance(template, str) and _is_str_map(variables):
            return self._send_batch(request, template, fields["recipients"], variables, locale)
        if not isinstance(template, str) or not _is_recipients(to) or not _is_str_map(variables):
            raise HttpError(400, 'send {"template": NAME, "to": ADDR or [ADDR], "vars": {...}, '
                                 '"locale": TAG}, or "recipients": [ADDR or {"to": ADDR, '
                                 '"vars": {...}, "locale": TAG}]')
        enqueue = functools.partial(self.enqueuer.enqueue_template, template, to, variables,
                                    locale)
        message_id, duplicate = self._once(request, enqueue)
        return json_response(202, {"messageId": message_id, **duplicate,
                                   **_suppressed(getattr(message_id, "suppressed", ()))})

    def _send_batch(self, request: Request, template: str, recipients: object,
                    variables: dict, locale: str | None) -> Response:
        """One message per recipient, queued together (Enqueuer.enqueue_many)."""
        if not isinstance(recipients, list) or not 0 < len(recipients) <= MAX_BATCH_RECIPIENTS:
            raise HttpError(400, f'"recipients" is a list of 1 to {MAX_BATCH_RECIPIENTS} '
                                 'addresses or {"to": ADDR, "vars": {...}, "locale": TAG}')
        entries = [(item, {}, None) if isinstance(item, str) else
                   (item.get("to"), item.get("vars", {}), item.get("locale"))
                   if isinstance(item, dict) else (None, {}, None) for item in recipients]
        if not all(isinstance(to, str) and _is_str_map(own) and isinstance(tag, str | None)
                   for to, own, tag in entries):
            raise HttpError(400, 'each recipient is an address or {"to": ADDR, "vars": {...}, '
                                 '"locale": TAG}')

        left_out: list[str] = []

        def enqueue() -> str:
            queued = self.enqueuer.enqueue_many(template, entries, variables, locale)
            left_out.extend(address for q in queued for address in q.suppressed)
            return json.dumps(queued)
        try:
            message_ids, duplicate = self._once(request, enqueue)
        except QueueUnavailable as exc:
            return json_response(503, {"error": str(exc), "messageIds": getattr(exc, "queued", [])})
        return json_response(202, {"messageIds": json.loads(message_ids), **duplicate,
                                   **_suppressed(left_out)})

    def _once(self, request: Request, enqueue: Callable[[], str]) -> tuple[str, dict]:
        """enqueue(), at most once per Idempotency-Key: (its result, {"duplicate": ...})."""
        key = request.headers.get("Idempotency-Key", "")
        if not key:
            return enqueue(), {}
        if len(key) > 255 or _has_control_chars(key):
            raise HttpError(400, "the Idempotency-Key header must be at most 255 characters")
        result, created = self.idempotency.remember(key, enqueue)
        return result, {"duplicate": not created}

    def body_limit(self, path: str, headers: Mapping[str, str]) -> int:
        """The largest body a request may send: for an internal caller holding the key,
        MAX_BATCH_BODY_BYTES on /v1/emails (a batch of recipients) and MAX_BOUNCE_BYTES on
        /v1/bounces (a bounce carries the returned message); MAX_BODY_BYTES for everyone else."""
        limit = {"/v1/emails": MAX_BATCH_BODY_BYTES, "/v1/bounces": MAX_BOUNCE_BYTES}.get(path)
        if limit and self.config.api_key:
            with contextlib.suppress(HttpError):
                self._authorize(Request("POST", path, {}, headers, b"", ""))
                return limit
        return MAX_BODY_BYTES

    # -- suppressions: internal callers, and the recipients' one-click unsubscribe -- #

    def list_suppressions(self, request: Request) -> Response:
        """Every live suppression, oldest first."""
        suppressions = self._internal(request)
        return json_response(200, {"suppressions": [e.as_json() for e in suppressions.entries()]})

    def add_suppression(self, request: Request) -> Response:
        """Suppress {"address"} for all mail until removed ({"reason"} optional)."""
        suppressions = self._internal(request)
        fields = _json_object(request)
        address, reason = fields.get("address"), fields.get("reason", "manual")
        if not isinstance(address, str) or not isinstance(reason, str) or not reason.strip():
            raise HttpError(400, 'send {"address": ADDR, "reason": TEXT (optional)}')
        entry = suppressions.suppress(address, reason.strip()[:200], "api")
        return json_response(201, entry.as_json())

    def show_suppression(self, request: Request) -> Response:
        """The suppressions of the address the path names; 404 when there is none."""
        address = self._named_address(request)
        entries = [e.as_json() for e in self._internal(request).entries() if e.address == address]
        if not entries:
            raise HttpError(404, "this address is not suppressed")
        return json_response(200, {"suppressions": entries})

    def remove_suppression(self, request: Request) -> Response:
        """Take the address the path names off the list; 404 when it was not on it."""
        removed = self._internal(request).unsuppress(self._named_address(request))
        if not removed:
            raise HttpError(404, "this address is not suppressed")
        return json_response(200, {"removed": removed})

    def _internal(self, request: Request) -> SuppressionList:
        """The suppression list, for a caller holding SYSMAIL_API_KEY (404 when it is unset)."""
        if not self.config.api_key or self.enqueuer.suppressions is None:
            raise HttpError(404, "no such endpoint")
        self._authorize(request)
        return self.enqueuer.suppressions

    @staticmethod
    def _named_address(request: Request) -> str:
        return validate_address(urllib.parse.unquote(request.path.rpartition("/")[2])).lower()

    def unsubscribe_page(self, request: Request) -> Response:
        """A confirmation page with a button: following the link never unsubscribes by itself
        (mail scanners follow links); the button's POST does."""
        target = self._unsubscribe_target(request)
        if target is None:
            return _page(400, "This unsubscribe link is not valid", "<p>Use the link from the "
                         "latest announcement, or write to us.</p>")
        return _page(200, "Unsubscribe from announcements?", _UNSUBSCRIBE_FORM.format(
            address=html.escape(target[1])))

    def unsubscribe(self, request: Request) -> Response:
        """RFC 8058 one-click: the token in the link says who and from what; suppressed now."""
        target = self._unsubscribe_target(request)
        if target is None or self.enqueuer.suppressions is None:
            return _page(400, "This unsubscribe link is not valid", "<p>Nothing was changed.</p>")
        scope, address = target
        self.enqueuer.suppressions.suppress(address, "unsubscribe", "one-click link",
                                            scope=scope)
        return _page(200, "You are unsubscribed", f"<p>{html.escape(address)} gets no more "
                     "announcements. Mail about your account (sign-in codes, password resets, "
                     "billing) still comes.</p>")

    def _unsubscribe_target(self, request: Request) -> tuple[str, str] | None:
        token = request.query.get("t", "")
        if len(token) > 1024:
            return None
        return unsubscribe_target(self.config.queue_key, token)

    def bounce(self, request: Request) -> Response:
        """Record a bounce, complaint or reply an internal caller passes on (message/rfc822,
        the envelope recipient in ?recipient= or the message's Delivered-To); answer what
        it says, as `sysmail bounce --dry-run --json` prints it."""
        if not self.config.api_key:
            raise HttpError(404, "no such endpoint")
        self._authorize(request)
        given = request.query.get("recipient", "")
        if _media_type(request) == "application/json":  # Amazon SES (SNS) or Postmark
            notification = _json_object(request)
            report = parse_notification(notification)
            envelope = given or notification_envelope_sender(notification)
        elif _media_type(request) == "message/rfc822":
            report = parse_bounce(request.body)
            envelope = bounce_envelope_recipient(request.body, given)
        else:
            raise HttpError(415, "send the message as message/rfc822 (or a JSON notification)")
        if not self.bounces.unsubscribe(request.body):
            self.bounces.handle(report, envelope)
        return json_response(200, report.as_json())

    def _authorize(self, request: Request) -> None:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        expected = self.config.api_key.encode()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
            raise HttpError(401, "a valid bearer token is required",
                            {"WWW-Authenticate": 'Bearer realm="sysmail"'})

    # -- health and metrics -- #

    def healthz(self, request: Request) -> Response:
        """The process is alive and answering."""
        return json_response(200, {"status": "ok"})

    def ready(self, request: Request) -> Response:
        """The public readiness answer: 200 or 503, without the details."""
        response = self.readyz(request)
        return json_response(response.status, {"status": json.loads(response.body)["status"]})

    def readyz(self, request: Request) -> Response:
        """200 when the spool is writable and the store reachable, else 503 naming what is not."""
        checks = {"spool": self._spool_writable(), "store": self._store_reachable()}
        if self.enqueuer.fallback is not None:
            checks["redis"] = self._redis_reachable()
        ready = checks["store"] and (checks["spool"] or checks.get("redis", False))
        status = "ready" if ready else "not ready"
        if self.relays is not None:
            up, total = self.relays.up_count(), len(self.relays.names)
            checks["relays_up"] = f"{up}/{total}"
            status = "degraded" if ready and up < total else status
        return json_response(200 if ready else 503, {"status": status, "checks": checks})

    def _spool_writable(self) -> bool:
        return self.enqueuer.spool.writable()

    def _redis_reachable(self) -> bool:
        try:
            self.enqueuer.fallback.ping()
        except QueueUnavailable:
            return False
        return True

    def _store_reachable(self) -> bool:
        try:
            self.store.ping()
        except StoreError:
            return False
        return True

    def metrics_page(self, request: Request) -> Response:
        """Prometheus text: queue gauges read from the spool, then the counters of this
        process and of its sender processes."""
        metrics = self.metrics.with_peers()
        counts = self.enqueuer.spool.counts()
        gauges = {f"sysmail_queue_messages{{{state}}}": (
            "Messages in the spool by state.", {"state": state}, counts[state])
            for state in ("new", "deferred", "cur", "failed")}
        gauges["sysmail_queue_oldest_age_seconds"] = (
            "Age of the oldest queued message.", {}, counts["oldest_age_seconds"])
        if self.relays is not None:
            gauges.update(self.relays.gauges())
        if self.enqueuer.suppressions is not None:
            gauges.update(self._suppression_gauges(self.enqueuer.suppressions, metrics))
        last = self.enqueuer.spool.last_sent()
        gauges["sysmail_last_send_age_seconds"] = (
            "Seconds since the last successful send (since the start before the first one).",
            {}, round(self.clock() - (self.started if last is None else last), 3))
        body = metrics.render(gauges).encode()
        return Response(200, body, "text/plain; version=0.0.4; charset=utf-8", _JSON_HEADERS)

    def _suppression_gauges(self, suppressions: SuppressionList, metrics: Metrics
                            ) -> dict[str, tuple[str, Mapping[str, str], float]]:
        """The list's size by reason; bounces and complaints (every host's) over the last
        24 hours, and their rates against the mail this service sent in that time."""
        entries = suppressions.entries()
        gauges: dict[str, tuple[str, Mapping[str, str], float]] = {}
        for reason in (*SUPPRESSION_REASONS, "manual"):
            size = sum(1 for e in entries if (e.reason if e.reason in SUPPRESSION_REASONS
                                              else "manual") == reason)
            gauges[f"sysmail_suppressions{{{reason}}}"] = (
                "Addresses on the suppression list, by reason.", {"reason": reason}, size)
        bounces = suppressions.bounces_last_24h()
        for kind, count in bounces.items():
            gauges[f"sysmail_bounces_last_24h{{{kind}}}"] = (
                "Verified bounces and complaints in the last 24 hours, by kind.",
                {"kind": kind}, count)
        sent = metrics.sent_last_24h(self.clock())
        gauges["sysmail_sent_last_24h"] = ("Messages this service sent in the last 24 hours.",
                                           {}, sent)
        gauges["sysmail_bounce_rate_24h"] = ("Hard bounces per message sent, last 24 hours.",
                                             {}, round(bounces["hard"] / sent, 6) if sent else 0)
        gauges["sysmail_complaint_rate_24h"] = ("Complaints per message sent, last 24 hours.",
                                                {}, round(bounces["complaint"] / sent, 6)
                                                if sent else 0)
        return gauges

    # -- limits and the background worker -- #

    def _limit(self, request: Request, name: str, key: str, limit: tuple[int, float]) -> None:
        retry_after = self.limiter.hit(f"{name}:{key}", *limit)
        if retry_after is not None:
            self.metrics.inc("sysmail_rate_limited_total", limit=name)
            raise HttpError(429, "too many requests, try again later",
                            {"Retry-After": str(math.ceil(retry_after))})


def _suppressed(addresses: Iterable[str]) -> dict[str, list[str]]:
    """{"suppressed": [...]} for a send answer, when any recipient was left out."""
    addresses = list(addresses)
    return {"suppressed": addresses} if addresses else {}


def _media_type(request: Request) -> str:
    return request.headers.get("Content-Type", "").split(";")[0].strip().lower()


def _json_object(request: Request) -> dict:
    """The body as a JSON object; 415 for another media type, 400 when malformed."""
    if _media_type(request) != "application/json":
        raise HttpError(415, "send the body as application/json")
    try:
        value = json.loads(request.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise HttpError(400, "the body is not valid JSON") from None
    if not isinstance(value, dict):
        raise HttpError(400, "the body must be a JSON object")
    _check_strings(value)
    return value


def _json_fields(request: Request, names: tuple[str, ...]) -> dict[str, str]:
    """The named string fields of a JSON body; 400 when one is missing or not a string."""
    value = _json_object(request)
    for name in names:
        if not isinstance(value.get(name), str) or not value[name]:
            raise HttpError(400, f"the field {name!r} is required and must be a string")
    return {name: value[name] for name in names}


def _check_strings(value: object) -> None:
    """400 when any string in a JSON value holds CR, LF, NUL or a lone surrogate (iterative:
    nesting depth is the attacker's choice)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            pending += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            pending += item
        elif isinstance(item, str):
            if _has_control_chars(item):
                raise HttpError(400, "a value contains a line break or NUL")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise HttpError(400, "a value is not valid Unicode text") from None


def _form_fields(body: bytes) -> dict[str, str]:
    try:
        pairs = urllib.parse.parse_qsl(body.decode("utf-8"), max_num_fields=10)
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "the form is malformed") from None
    return dict(pairs)


def _is_recipients(value: object) -> bool:
    return isinstance(value, str) or (isinstance(value, list)
                                      and 0 < len(value) <= MAX_RECIPIENTS
                                      and all(isinstance(v, str) for v in value))


def _is_str_map(value: object) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str | int) for v in value.values())


_RESET_FORM = """<form method="post" action="/reset-password">
<input type="hidden" name="token" value="{token}">
<p><label for="password">New password</label><br>
<input id="password" name="password" type="password" autocomplete="new-password" minlength="8"
 maxlength="1024" required style="width:100%;padding:8px;font-size:16px;"></p>
<p><label for="confirm">Type it again</label><br>
<input id="confirm" name="confirm" type="password" autocomplete="new-password" minlength="8"
 maxlength="1024" required style="width:100%;padding:8px;font-size:16px;"></p>
<p><button type="submit" style="padding:10px 18px;font-size:16px;">Change password</button></p>
</form>"""


_UNSUBSCRIBE_FORM = """<p>{address} will get no more service announcements. Mail about your account
(sign-in codes, password resets, billing) still comes.</p>
<form method="post">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<p><button type="submit" style="padding:10px 18px;font-size:16px;">Unsubscribe</button></p>
</form>"""


def _page(status: int, title: str, body: str) -> Response:
    """A small self-contained HTML page (no scripts, no remote resources)."""
    document = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>{html.escape(title)}</title></head>"
                f'<body style="font-family:Helvetica,Arial,sans-serif;max-width:28em;'
                f'margin:3em auto;padding:0 1em;color:#111827;">'
                f"<h1 style=\"font-size:1.4em;\">{html.escape(title)}</h1>\n{body}\n</body></html>\n")
    return Response(status, document.encode(), "text/html; charset=utf-8", _PAGE_HEADERS)


class _HttpServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that no single client can take from the others: a cap on connections
    in all and per client address, deadlines for the headers and the whole request, and a
    budget of header bytes (see the limits at the top of the HTTP API section)."""

    daemon_threads = False  # server_close() waits for requests in flight
    block_on_close = True
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], api: Api, routes: Routes):
        self.api = api
        self.routes = routes
        self._connections: dict[socket.socket, _Connection] = {}
        self._per_client: dict[str, int] = {}
        self._shared_left = HEADER_BYTES_SHARED
        self._lock = threading.Lock()
        self._closing = threading.Event()
        super().__init__(address, _Handler)
        self._reaper = threading.Thread(target=self._reap, name="sysmail-http-deadlines",
                                        daemon=True)
        self._reaper.start()

    def process_request(self, request: socket.socket, client_address: tuple) -> None:
        """Admit the connection to a handler thread, or refuse it here, on the accepting
        thread: a 503 and the connection closed at once."""
        client = self.client_key(str(client_address[0]))
        with self._lock:
            held = len(self._connections)
            admitted = held < MAX_CONNECTIONS and (
                client is None or held < BUSY_CONNECTIONS
                or self._per_client.get(client, 0) < MAX_CONNECTIONS_PER_CLIENT)
            if admitted:
                self._connections[request] = _Connection(client)
                if client is not None:
                    self._per_client[client] = self._per_client.get(client, 0) + 1
        if not admitted:
            self.api.metrics.inc("sysmail_http_requests_total", route="refused", status="503")
            _refuse_busy(request)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread could be started: the slot is free again
            self._forget(request)
            raise

    def process_request_thread(self, request: socket.socket, client_address: object) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def client_key(self, host: str) -> str | None:
        """What the per-client cap counts a peer under: its address (an IPv6 one by its /64,
        which one host usually holds whole); None for a trusted proxy, which speaks for many
        clients and so is held only by the overall cap."""
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return host
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        if any(address in network for network in self.api.config.trusted_proxies):
            return None
        if isinstance(address, ipaddress.IPv6Address):
            return str(ipaddress.ip_network(f"{address}/64", strict=False))
        return str(address)

    def _forget(self, request: socket.socket) -> None:
        with self._lock:
            connection = self._connections.pop(request, None)
            if connection is None:
                return
            self._shared_left += connection.shared_bytes
            if connection.client is not None:
                left = self._per_client.pop(connection.client) - 1
                if left:
                    self._per_client[connection.client] = left

    @property
    def open_connections(self) -> int:
        """How many connections this server handles now."""
        with self._lock:
            return len(self._connections)

    @property
    def url(self) -> str:
        """http://HOST:PORT this server listens on (the real port when 0 was asked for)."""
        host, port = self.server_address[:2]
        return f"http://{_url_host(str(host))}:{port}"

    def mark_busy(self, request: socket.socket) -> None:
        """A request line arrived on this connection: stopping must let it finish."""
        with self._lock:
            if connection := self._connections.get(request):
                connection.in_request = True

    def headers_read(self, request: socket.socket) -> None:
        """The request line and headers are in: only the request deadline holds it now."""
        with self._lock:
            if connection := self._connections.get(request):
                connection.headers_read = True

    def take_header_bytes(self, request: socket.socket, total: int) -> bool:
        """The request on this connection has read total bytes of request line and headers:
        take what goes beyond its own HEADER_BYTES_PER_CONNECTION from the shared budget;
        False when the budget cannot cover it."""
        with self._lock:
            connection = self._connections.get(request)
            if connection is None:
                return True
            more = max(0, total - HEADER_BYTES_PER_CONNECTION) - connection.shared_bytes
            if more > self._shared_left:
                return False
            if more > 0:
                self._shared_left -= more
                connection.shared_bytes += more
            return True

    def close_idle(self) -> None:
        """Cut connections that have not sent a request line yet (for a prompt stop)."""
        with self._lock:
            idle = [s for s, c in self._connections.items() if not c.in_request]
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: object, client_address: object) -> None:
        """A connection that broke mid-request (reset, cut by the deadline): one JSON line."""
        error = sys.exc_info()[1]
        log_event(logging.INFO, "http_connection_error", error=type(error).__name__)

    def _reap(self) -> None:
        """Cut connections past their deadline: a slow client cannot hold a thread for long.
        One that saw the server busy is cut too when its headers are not in
        HEADER_DEADLINE_SECONDS after it was accepted."""
        while not self._closing.wait(0.25):
            now = time.monotonic()
            with self._lock:
                if len(self._connections) >= BUSY_CONNECTIONS:
                    for connection in self._connections.values():
                        connection.hurried = True
                late = [s for s, c in self._connections.items()
                        if now - c.opened > REQUEST_DEADLINE_SECONDS
                        or (c.hurried and not c.headers_read
                            and now - c.opened > HEADER_DEADLINE_SECONDS)]
            for sock in late:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def server_close(self) -> None:
        super().server_close()
        self._closing.set()


class _Connection:
    """What _HttpServer keeps about one connection it handles."""

    __slots__ = ("client", "headers_read", "hurried", "in_request", "opened", "shared_bytes")

    def __init__(self, client: str | None):
        self.opened = time.monotonic()
        self.client = client  # counted under this for the per-client cap; None: not counted
        self.in_request = False  # a request line arrived
        self.headers_read = False
        self.hurried = False  # it saw the server busy: HEADER_DEADLINE_SECONDS holds for it
        self.shared_bytes = 0  # header bytes taken from the server's shared budget


class _HeadersRefused(Exception):
    """The request line and headers went past MAX_HEADER_BYTES (too_large) or past what the
    shared budget could still give (not too_large)."""

    def __init__(self, too_large: bool):
        super().__init__("too large" if too_large else "no header budget left")
        self.too_large = too_large


class _HeaderReader:
    """The handler's rfile: reads the request line and headers in pieces of at most PIECE
    bytes, each counted before the next is read, so a request holds no more header bytes than
    MAX_HEADER_BYTES and its share of the budget (the body is bounded by MAX_BODY_BYTES)."""

    PIECE = 4096

    def __init__(self, rfile, server: _HttpServer, sock: socket.socket):  # rfile: BufferedReader
        self._rfile = rfile
        self._server = server
        self._sock = sock
        self.counting = True
        self.total = 0

    def start_request(self) -> None:
        """A new request on this connection: count its request line and headers."""
        self.counting, self.total = True, 0

    def readline(self, limit: int = -1) -> bytes:
        if not self.counting:
            return self._rfile.readline(limit)
        pieces: list[bytes] = []
        read = 0
        while limit < 0 or read < limit:
            want = min(self.PIECE, MAX_HEADER_BYTES + 1 - self.total)
            piece = self._rfile.readline(want if limit < 0 else min(want, limit - read))
            self.total += len(piece)
            read += len(piece)
            if self.total > MAX_HEADER_BYTES:
                raise _HeadersRefused(too_large=True)
            if not self._server.take_header_bytes(self._sock, self.total):
                raise _HeadersRefused(too_large=False)
            pieces.append(piece)
            if not piece or piece.endswith(b"\n"):
                break
        return b"".join(pieces)

    def read(self, size: int = -1) -> bytes:
        return self._rfile.read(size)

    def close(self) -> None:
        self._rfile.close()

    def __getattr__(self, name: str) -> object:
        return getattr(self._rfile, name)


def _refuse_busy(sock: socket.socket) -> None:
    """A 503 for a connection that gets no handler thread, sent without ever waiting on it."""
    body = b'{"error":"too many connections, try again later"}'
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                  b"Cache-Control: no-store\r\nRetry-After: 1\r\nContent-Length: "
                  + str(len(body)).encode() + b"\r\n\r\n" + body)


class _Handler(http.server.BaseHTTPRequestHandler):
    """The thin layer between http.server and Api: read a bounded request, write the response."""

    server: _HttpServer
    protocol_version = "HTTP/1.0"
    default_request_version = "HTTP/1.0"  # http.server's 0.9 default answers without a status
    server_version = "sysmail"
    sys_version = ""
    timeout = REQUEST_DEADLINE_SECONDS

    def __getattr__(self, name: str) -> Callable[[], None]:
        if name.startswith("do_"):  # every method is routed, so unknown ones get 405, not 501
            return self._serve
        raise AttributeError(name)

    def setup(self) -> None:
        super().setup()
        self.rfile = _HeaderReader(self.rfile, self.server, self.connection)

    def handle_one_request(self) -> None:
        """http.server's, with the request line and headers bounded by _HeaderReader: past
        MAX_HEADER_BYTES a 414 (request line) or 431, past the shared budget a 503."""
        self.rfile.start_request()
        self.requestline, self.command, self.request_version = "", "", self.default_request_version
        self._in_headers = False
        try:
            super().handle_one_request()
        except _HeadersRefused as refused:
            self.close_connection = True
            if not refused.too_large:
                response = json_response(503, {"error": "the server is busy, try again later"},
                                         **{"Retry-After": "1"})
            elif self._in_headers:
                response = json_response(431, {"error": "the request line and headers must be "
                                                        f"at most {MAX_HEADER_BYTES} bytes"})
            else:
                response = json_response(414, {"error": "the request line must be at most "
                                                        f"{MAX_HEADER_BYTES} bytes"})
            with contextlib.suppress(OSError):
                self._write(response, "unparsed")

    def parse_request(self) -> bool:
        """http.server's parser, after skipping empty lines before the request line (RFC 9112
        section 2.2); an empty request gets a 400 instead of a silent close."""
        self.server.mark_busy(self.connection)  # a request began: stopping lets it finish
        for _ in range(4):
            if self.raw_requestline.strip() or not self.raw_requestline.endswith(b"\n"):
                break
            self.raw_requestline = self.rfile.readline(65537)
        if not self.raw_requestline.strip():
            self.request_version = self.default_request_version
            self.send_error(400, "empty request line")
            return False
        self._in_headers = True
        parsed = super().parse_request()
        self.rfile.counting = False  # the rest is the body, bounded by MAX_BODY_BYTES
        self.server.headers_read(self.connection)
        if self.request_version < "HTTP/1.0":  # answer 0.9 requests with a status line too
            self.request_version = self.default_request_version
        return parsed

    def _serve(self) -> None:
        started = time.monotonic()
        request = self._read_request()
        route = self.server.api.route_name(self.path.partition("?")[0], self.server.routes)
        response = (request if isinstance(request, Response)
                    else self.server.api.handle(request, self.server.routes))
        self._write(response, route)
        log_event(logging.INFO, "http", method=self.command[:16], route=route,
                  status=response.status, client=self._client(),
                  duration_ms=round((time.monotonic() - started) * 1000, 1))

    def _read_request(self) -> Request | Response:
        try:
            parts = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(parts.query, max_num_fields=20))
        except ValueError:
            return json_response(400, {"error": "the request target is malformed"})
        if self.headers.get("Transfer-Encoding"):
            return json_response(411, {"error": "send a Content-Length, not a chunked body"})
        lengths = {v.strip() for v in self.headers.get_all("Content-Length") or ["0"]}
        if len(lengths) != 1 or not re.fullmatch(r"[0-9]+", length_text := lengths.pop()):
            return json_response(400, {"error": "the Content-Length header is invalid"})
        length, limit = int(length_text), self.server.api.body_limit(parts.path, self.headers)
        if length > limit:
            self.close_connection = True
            return json_response(413, {"error": f"the body must be at most {limit} bytes"})
        body = self.rfile.read(length) if length else b""
        return Request(self.command, parts.path, query, self.headers, body, self._client())

    def _client(self) -> str:
        """The client's address; X-Forwarded-For only counts when a trusted proxy sent it."""
        peer = self.client_address[0]
        return client_address(peer, self.headers.get("X-Forwarded-For", ""),
                              self.server.api.config.trusted_proxies)

    def _write(self, response: Response, route: str) -> None:
        """Send a response, and count it: the one place requests are counted."""
        self.server.api.metrics.inc("sysmail_http_requests_total", route=route,
                                    status=str(response.status))
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def version_string(self) -> str:
        """The Server header: no Python version."""
        return self.server_version

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own protocol errors, as JSON 4xx like every other answer."""
        status = code if 400 <= code < 500 else 400
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._write(json_response(status, {"error": message or "bad request"}), "unparsed")

    def log_message(self, format: str, *args: object) -> None:  # http.server's own signature
        """Silenced: the default line holds the raw path, and with it a reset token."""


def client_address(peer: str, forwarded_for: str, trusted: tuple) -> str:
    """The client address: the right-most X-Forwarded-For hop not added by a trusted proxy."""
    hops = [peer] + [h.strip() for h in reversed(forwarded_for.split(",")) if h.strip()]
    for hop in hops:
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return peer
        if not any(address in network for network in trusted):
            return hop
    return hops[-1]


# ---- Wiring ---- #

STATUS_INTERVAL_SECONDS = 5.0


class SystemdNotifier:
    """sd_notify(3) with the stdlib: datagrams to $NOTIFY_SOCKET; a no-op outside systemd."""

    def __init__(self, env: Mapping[str, str], spool: Spool | None = None):
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        watchdog_pid = env.get("WATCHDOG_PID", "")
        usec = env.get("WATCHDOG_USEC", "")
        owned = not watchdog_pid or watchdog_pid == str(os.getpid())
        self.watchdog_seconds = int(usec) / 1e6 if usec.isdigit() and owned else 0.0
        self.spool = spool
        self._last_ping = self._last_status = 0.0
        self._lock = threading.Lock()

    def notify(self, *lines: str) -> None:
        """Send KEY=VALUE lines to systemd; errors are ignored (never fail the service)."""
        if not self.address:
            return
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX,
                                                         socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(lines).encode(), self.address)

    def ready(self) -> None:
        """Tell systemd the service is up, with the queue depth."""
        self.notify("READY=1", f"STATUS={self._status_text()}")

    def stopping(self) -> None:
        """Tell systemd the service is shutting down."""
        self.notify("STOPPING=1", "STATUS=stopping: finishing requests and the current send")

    def heartbeat(self) -> None:
        """Called by the sender loop itself: WATCHDOG=1 and, now and then, a STATUS= line."""
        now = time.monotonic()
        with self._lock:
            ping = self.watchdog_seconds and now - self._last_ping >= self.watchdog_seconds / 4
            status = now - self._last_status >= STATUS_INTERVAL_SECONDS
            self._last_ping = now if ping else self._last_ping
            self._last_status = now if status else self._last_status
        lines = (["WATCHDOG=1"] if ping else []) + ([f"STATUS={self._status_text()}"]
                                                    if status and self.address else [])
        if lines:
            self.notify(*lines)

    def _status_text(self) -> str:
        if self.spool is None:
            return "running"
        try:
            counts = self.spool.counts()
        except (SpoolError, OSError):
            return "running; the spool cannot be read"
        return (f"queue: {counts['new']} due, {counts['deferred']} deferred, "
                f"{counts['cur']} sending, {counts['failed']} failed")


class App:
    """sysmail assembled from a configuration: each part built here, once, when first used.

    The service (start/stop) runs the HTTP API, the sender thread and the forgot-password
    worker; the CLI and Mailer take only the parts they need.
    """

    def __init__(self, config: Config, store: TokenStore | None = None, *,
                 clock: Clock = time.time):
        self.config = config
        self.clock = clock
        self._store = store
        self.public_url = config.public_url
        self.server: _HttpServer | None = None
        self.ops_server: _HttpServer | None = None

    def __repr__(self) -> str:
        return f"App(listen={self.config.listen}, spool={str(self.config.spool_dir)!r})"

    @functools.cached_property
    def metrics(self) -> Metrics:
        """This process's counters, labelled with the version and the signing backend."""
        backend = _signing_backend("auto") if self.config.signing else "unsigned"
        metrics = Metrics({"version": __version__, "signing_backend": backend})
        for template in (*TEMPLATES, "ad-hoc"):
            metrics.declare("sysmail_suppressed_total", template=template)
        return metrics

    @functools.cached_property
    def spool(self) -> Spool:
        """The spool at SYSMAIL_SPOOL."""
        return Spool(self.config.spool_dir, self.clock, key=self.config.queue_key)

    @functools.cached_property
    def fallback(self) -> RedisQueue | None:
        """The Redis fallback queue, when REDIS_URL is set."""
        if not self.config.redis_url:
            return None
        return RedisQueue(self.config.redis_url, self.clock, key=self.config.queue_key,
                          dead_letter_seconds=self.config.dead_letter_days * DAY_SECONDS)

    @property
    def queues(self) -> tuple[Queue, ...]:
        """Every queue mail may wait in: the spool, then the Redis fallback."""
        return (self.spool, self.fallback) if self.fallback else (self.spool,)

    @functools.cached_property
    def enqueuer(self) -> Enqueuer:
        """Renders and queues mail into the spool, or Redis."""
        return Enqueuer(self.config, self.spool, self.fallback, self.metrics, self.clock,
                        self.suppressions)

    @functools.cached_property
    def suppressions(self) -> SuppressionList:
        """The suppression list: in the spool folder, shared through Redis with REDIS_URL."""
        return SuppressionList(self.config.spool_dir, self.clock, redis_url=self.config.redis_url,
                               hard_bounce_seconds=self.config.hard_bounce_days * DAY_SECONDS)

    def on_cycle(self, then: Callable[[], None] | None = None) -> None:
        """The sender loop's hook: systemd's heartbeat (or then), and the suppression list's
        refresh."""
        (then or self.notifier.heartbeat)()
        self.suppressions.refresh_if_due()
        self.metrics.publish_if_due(time.monotonic())

    @functools.cached_property
    def bounces(self) -> SuppressingBounces:
        """What becomes of bounces, complaints and refusals at RCPT TO: the suppression list."""
        return SuppressingBounces(self.metrics, self.suppressions, self.config.queue_key)

    @functools.cached_property
    def signer(self) -> DkimSigner | None:
        """The DKIM signer, or None when no key is configured."""
        return DkimSigner.from_config(self.config)

    @functools.cached_property
    def relay_health(self) -> RelayHealth | None:
        """What this process's connections know of each relay, shared by all of them."""
        if not self.config.relays:
            return None
        return RelayHealth(self.config.relays, self.clock, metrics=self.metrics,
                           shared=self.fallback)

    def transport(self) -> Transport:
        """A new connection to the relays (or the outbox folder when SMTP_URL is unset)."""
        return transport_from_config(self.config, self.relay_health)

    def sender(self) -> Sender:
        """A new Sender draining the queues through the relay, with the startup warnings."""
        self.spool.check_private()
        transport = self.transport()
        if isinstance(transport, OutboxTransport):
            log_event(logging.WARNING, "outbox_mode", outbox=str(transport.folder),
                      note="no SMTP_URL: delivered mail is written as .eml files")
        if self.signer is None:
            log_event(logging.WARNING, "unsigned", note="no DKIM key: mail goes out unsigned")
        for warning in self.fallback.check_durability() if self.fallback else ():
            log_event(logging.WARNING, "redis_durability", warning=warning)
        if self.fallback and self.config.queue_key == UNKEYED_QUEUE_KEY:
            log_event(logging.WARNING, "queue_key_unset", note="Redis entries are authenticated "
                      "under a fixed key: set SYSMAIL_QUEUE_KEY (or a DKIM key)")
        unknown = sorted(set(self.config.retry_schedules) - set(TEMPLATES) - {""})
        if unknown:
            variable = "SYSMAIL_RETRY_SCHEDULE_" + unknown[0].upper().replace("-", "_")
            raise ConfigError([f"{variable} names no kind of mail (a template, or ADHOC)"])
        retry = RetryPolicy(self.config.retry_schedule, self.config.retry_schedules)
        return Sender(self.spool, transport, self.signer, clock=self.clock, metrics=self.metrics,
                      retry=retry,
                      fallback=self.fallback, connections=self.config.smtp_connections,
                      transport_factory=self.transport, sender_address=self.config.from_addr,
                      dead_letter_seconds=self.config.dead_letter_days * DAY_SECONDS,
                      bounce_address=self.config.bounce_address,
                      queue_key=self.config.queue_key, bounces=self.bounces)

    @functools.cached_property
    def sending(self) -> SenderThread:
        """The sender thread of this process."""
        return SenderThread(self.sender)

    @functools.cached_property
    def store(self) -> TokenStore:
        """The token store: the one given, SYSMAIL_STORE's, or SQLite at SYSMAIL_DB."""
        return self._store or store_from_config(self.config)

    @functools.cached_property
    def limiter(self) -> RateLimiter | RedisRateLimiter:
        """Request rate limits: shared through Redis when REDIS_URL is set."""
        local = RateLimiter(self.clock)
        if self.config.redis_url:
            return RedisRateLimiter(self.config.redis_url, local)
        return local

    @functools.cached_property
    def idempotency(self) -> IdempotencyKeys:
        """Idempotency-Key records, in the spool folder."""
        return IdempotencyKeys(self.config.spool_dir / "idempotency", self.clock)

    @functools.cached_property
    def notifier(self) -> SystemdNotifier:
        """sd_notify, when systemd runs the process."""
        return SystemdNotifier(self.config.systemd, self.spool)

    @functools.cached_property
    def forgot(self) -> ForgotWorker:
        """The forgot-password worker; its links start with the URL published at start."""
        return ForgotWorker(self.config, self.store, self.enqueuer, lambda: self.public_url,
                            self.clock)

    @functools.cached_property
    def api(self) -> Api:
        """The HTTP API's logic."""
        return Api(self.config, self.enqueuer, self.store, limiter=self.limiter,
                   idempotency=self.idempotency, forgot=self.forgot.submit, clock=self.clock,
                   relays=self.relay_health, bounces=self.bounces)

    @property
    def url(self) -> str:
        """The base URL the server listens on (with the real port when port 0 was asked for)."""
        assert self.server is not None
        return self.server.url

    @property
    def ops_url(self) -> str:
        """The base URL of the operators' listener (/metrics, detailed health)."""
        assert self.ops_server is not None, "SYSMAIL_METRICS_LISTEN is off"
        return self.ops_server.url

    def start(self) -> None:
        """Recover the spool, bind, publish the public URL, then start the threads."""
        self.spool.check_private()
        with contextlib.suppress(SpoolError):  # a broken spool: the Redis fallback serves
            self.spool.recover()
        self.server = self._bind(self.config.listen, self.api.routes)
        if self.config.ops_listen is not None:
            try:
                self.ops_server = self._bind(self.config.ops_listen, self.api.ops_routes)
            except SysmailError:
                self._close_servers()
                raise
        self.public_url = self.config.public_url if self.config.public_url_set else self.url
        self.sending.start(on_cycle=self.on_cycle)
        self.forgot.start()
        for server in self._servers():
            threading.Thread(target=server.serve_forever, name="sysmail-http", daemon=True,
                             kwargs={"poll_interval": 0.2}).start()
        log_event(logging.INFO, "listening", url=self.url, store=repr(self.store),
                  metrics=self.ops_server.url + "/metrics" if self.ops_server else "off")
        self.notifier.ready()

    def stop(self) -> None:
        """Stop accepting, finish requests in flight, then the worker and the sender."""
        self.notifier.stopping()
        for server in self._servers():
            server.shutdown()
        self._close_servers()
        self.forgot.stop()
        self.sending.stop()

    def _bind(self, address: tuple[str, int], routes: Routes) -> _HttpServer:
        try:
            return _HttpServer(address, self.api, routes)
        except OSError as exc:
            host, port = address
            raise SysmailError(f"cannot listen on {host}:{port}: {exc.strerror}") from None

    def _servers(self) -> list[_HttpServer]:
        return [server for server in (self.server, self.ops_server) if server is not None]

    def _close_servers(self) -> None:
        for server in self._servers():
            server.close_idle()
            server.server_close()
        self.server = self.ops_server = None


class ForgotWorker:
    """Serves forgot-password requests off the request path: the answer is the same, and as
    fast, for every address; the lookup, the token and the enqueue happen here, in batches on
    a fixed cadence (FORGOT_TICK_SECONDS): the work a known address causes then falls at a
    moment that has nothing to do with its request, and slows no request that follows it."""

    def __init__(self, config: Config, store: TokenStore, enqueuer: Enqueuer,
                 link_base: Callable[[], str], clock: Clock = time.time):
        self.config = config
        self.store = store
        self.enqueuer = enqueuer
        self.link_base = link_base
        self.clock = clock
        self._requests: queue.Queue[tuple[str, str]] = queue.Queue(FORGOT_QUEUE_SIZE)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def submit(self, email: str, client: str) -> None:
        """Hand a request over; when the backlog is full it is dropped (the user asks again)."""
        try:
            self._requests.put_nowait((email, client))
        except queue.Full:
            log_event(logging.ERROR, "forgot_queue_full", size=FORGOT_QUEUE_SIZE)

    def process(self, email: str, client: str) -> None:
        """For a known address: create a token, keep its hash, queue the reset mail."""
        user = self.store.find_user(email)
        if user is None:
            return
        token, now = secrets.token_urlsafe(32), self.clock()
        ttl = self.config.reset_token_seconds
        self.store.save_token(token_hash(token), user, RESET_PURPOSE, now, now + ttl)
        link = f"{self.config.dashboard_url or self.link_base()}/reset-password?" + \
            urllib.parse.urlencode({"token": token})
        variables = {"reset_url": link, "expires_minutes": str(max(ttl // 60, 1))}
        if user.name:
            variables["name"] = user.name
        self.enqueuer.enqueue_template("password-reset", user.email, variables,
                                       _user_locale(user))

    def start(self) -> None:
        """Start the worker thread."""
        self._stopping.clear()
        self._thread = threading.Thread(target=self._work, name="sysmail-forgot", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued requests, then stop the worker."""
        if self._thread is not None:
            self._stopping.set()
            self._thread.join(timeout)
            self._thread = None

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._stopping.wait(FORGOT_TICK_SECONDS - time.monotonic() % FORGOT_TICK_SECONDS)
            self._work_off()
        self._work_off()

    def _work_off(self) -> None:
        """Serve every request waiting now."""
        while True:
            try:
                item = self._requests.get_nowait()
            except queue.Empty:
                return
            try:
                self.process(*item)
            except SysmailError as exc:
                log_event(logging.ERROR, "forgot_failed", reason=str(exc))
            except Exception:  # noqa: BLE001 - the worker must outlive any one request
                _log.exception("forgot_internal_error", extra={"fields": {}})


def store_from_config(config: Config) -> TokenStore:
    """SYSMAIL_STORE's store (module:attribute, called with the Config when it takes an
    argument), or the SQLite store at SYSMAIL_DB."""
    if not config.store:
        return SqliteStore(config.db_path)
    module_name, _, attribute = config.store.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attribute)
    except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error
        problem = f"SYSMAIL_STORE={config.store} cannot be imported ({type(exc).__name__}: {exc})"
        raise ConfigError([problem]) from None
    try:
        takes_config = any(p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                              p.POSITIONAL_OR_KEYWORD)
                           for p in inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):
        takes_config = False
    return factory(config) if takes_config else factory()


def build_app(config: Config, store: TokenStore | None = None, *,
              clock: Clock = time.time) -> App:
    """The one place sysmail is assembled: queues, transports, signer, token store (the one
    given, else SYSMAIL_STORE's, else SQLite), rate limits, idempotency keys, metrics and the
    systemd notifier, each built on first use."""
    return App(config, store, clock=clock)


class Mailer:
    """The embedding API: enqueue system emails, and optionally run the sender in a thread.

        mailer = sysmail.Mailer.from_env()
        mailer.enqueue("password-reset", to="ada@example.com", reset_url=url)
        mailer.flush(timeout=30)            # a script: deliver now, in this thread

        mailer.start()                      # a long-running program: a sender thread instead
        mailer.stop()                       # ends it; what is still queued stays queued
    """

    def __init__(self, config: Config, *, clock: Clock = time.time, app: App | None = None):
        self.app = app or build_app(config, clock=clock)
        self.config = config
        self.spool, self.fallback = self.app.spool, self.app.fallback
        self.metrics = self.app.metrics

    def __repr__(self) -> str:
        return f"Mailer(spool={str(self.config.spool_dir)!r}, relay={self.config.smtp})"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Mailer:
        """A Mailer configured from env (os.environ by default); raise ConfigError when invalid."""
        return cls(Config.from_env(with_credentials(os.environ if env is None else env)))

    def enqueue(self, template: str, /, to: str | list[str], *, locale: str | None = None,
                **variables: object) -> str:
        """Queue a system email from a template, in the locale's language (de-AT, else de,
        else the default); return its Message-ID."""
        return self.app.enqueuer.enqueue_template(template, to, variables, locale)

    def enqueue_template(self, template: str, to: str | list[str],
                         variables: Mapping[str, object], locale: str | None = None) -> str:
        """enqueue, with the variables as a mapping (any names, even "to")."""
        return self.app.enqueuer.enqueue_template(template, to, variables, locale)

    def enqueue_message(self, to: str | list[str], subject: str, text: str, html: str = "", *,
                        priority: int = BULK, ttl_seconds: int = ADHOC_TTL_SECONDS) -> str:
        """Queue an ad-hoc message (text, optional HTML); return its Message-ID."""
        return self.app.enqueuer.enqueue_message(to, subject, text, html, priority=priority,
                                                 ttl_seconds=ttl_seconds)

    def enqueue_many(self, template: str, /, recipients: Iterable[str | Mapping[str, object]],
                     *, locale: str | None = None, **variables: object) -> list[str]:
        """Queue one message per recipient: an address, or a mapping {"to": address,
        "locale": its own (optional), ...its own variables}; return the Message-IDs in order.
        Much faster than enqueue in a loop (256 messages share one sync); on
        QueueUnavailable, its `queued` lists the Message-IDs queued before the failure, in
        recipients' order."""
        entries = [(item, {}, None) if isinstance(item, str) else
                   (str(item.get("to", "")),
                    {k: v for k, v in item.items() if k not in ("to", "locale")},
                    item.get("locale"))
                   for item in recipients]
        return self.app.enqueuer.enqueue_many(template, entries, variables, locale)

    def check_queue(self) -> None:
        """Raise QueueUnavailable unless a message could be stored now (spool or Redis)."""
        self.app.enqueuer.check_queue()

    def sender(self) -> Sender:
        """A Sender for this mailer's queues, relay and keys."""
        return self.app.sender()

    def start(self, on_cycle: Callable[[], None] | None = None) -> None:
        """Run the sender in a daemon thread of this process (on_cycle: a heartbeat hook)."""
        self.app.sending.start(lambda: self.app.on_cycle(on_cycle or (lambda: None)))

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the sender thread after its current SMTP transaction. It does not deliver what
        is still queued: that stays in the spool for the next start, a worker or the service
        (call flush() first to deliver it now)."""
        self.app.sending.stop(timeout)

    def flush(self, timeout: float = 30.0) -> DeliveryCounts:
        """Deliver what is queued and due, in this thread, and return the counts. Returns
        when a pass finds nothing more to do, when the relay cannot be reached (released),
        or once timeout seconds have passed; mail deferred by a 4xx waits for its next try."""
        totals = DeliveryCounts()
        deadline = time.monotonic() + timeout
        sender = self.app.sender()
        try:
            while time.monotonic() < deadline:
                counts = sender.run_once()
                for outcome in ("sent", "deferred", "failed", "expired", "released", "paced"):
                    totals.add(outcome, getattr(counts, outcome))
                if counts.released or counts == DeliveryCounts():
                    break
        finally:
            sender.close()
        return totals

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


# ---- CLI ---- #

EX_OK, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_SOFTWARE, EX_TEMPFAIL, EX_CONFIG = (
    0, 64, 65, 69, 70, 75, 78)


class _ArgumentParser(argparse.ArgumentParser):
    """argparse that raises UsageError (exit 64) instead of exiting with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _ArgumentParser(prog="sysmail", description="Queue and send system emails.",
                             epilog="environment:\n" + environment_help(),
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"sysmail {__version__}")
    parser.add_argument("--env-file", metavar="FILE",
                        help="read variables from a systemd EnvironmentFile (the environment wins)")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                     parser_class=_ArgumentParser)
    _add_mail_commands(commands)
    _add_queue_commands(commands)
    _add_setup_commands(commands)
    _add_bounce_commands(commands)
    _add_user_commands(commands)
    return parser


def _command(commands: argparse._SubParsersAction, name: str, summary: str,
             examples: list[str], extra: str = "", **defaults: object) -> argparse.ArgumentParser:
    """A subcommand whose --help says what it does and ends with examples (after extra)."""
    epilog = (f"{extra}\n\n" if extra else "") + "examples:\n" + "\n".join(
        f"  {example}" for example in examples)
    command = commands.add_parser(name, help=summary, description=f"{summary[0].upper()}"
                                  f"{summary[1:]}.", epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.set_defaults(**defaults)
    return command


def _templates_help() -> str:
    """The templates and their variables, for the --help of send and preview."""
    lines = ["templates (required variables, then [optional ones]):"]
    for name, template in TEMPLATES.items():
        optional = " ".join(v for v in template.variables if v not in template.required)
        lines.append(f"  {name:22} {' '.join(template.required)}"
                     + (f" [{optional}]" if optional else ""))
    return "\n".join(lines)


def _add_mail_commands(commands: argparse._SubParsersAction) -> None:
    send = _command(commands, "send", "queue a mail per recipient and print each Message-ID", [
        "sysmail send --to ada@example.com --template two-factor-code --var code=123456",
        "sysmail send --to-file users.csv --template service-announcement --var title=Down"],
        _templates_help(), handler=cmd_send)
    send.add_argument("--to", action="append", default=[], metavar="ADDR",
                      help="a recipient; several --to make one mail each")
    send.add_argument("--to-file", metavar="FILE",
                      help="recipients, one address a line, or CSV with a header (an email or "
                           "to column, the rest variables, locale too): one mail each, 256 "
                           "per disk sync; - reads standard input")
    send.add_argument("--skip", type=int, default=0, metavar="N",
                      help="with --to-file: leave out its first N recipients (to resume)")
    send.add_argument("--shared", action="store_true",
                      help="one mail to every --to instead (each sees the others' addresses)")
    send.add_argument("--template", metavar="NAME", help="a template (listed below)")
    send.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                      help="a template variable; repeat for each")
    send.add_argument("--locale", metavar="TAG", help="the recipient's language (de, fr-CA)")
    send.add_argument("--subject", help="subject of an ad-hoc mail (without --template)")
    send.add_argument("--text", help="its plain text; - reads standard input")
    send.add_argument("--html", default="", help="an optional HTML part; - reads standard input")
    send.add_argument("--urgent", action="store_true",
                      help="ad-hoc mail goes first, with the sign-in codes (default: bulk)")
    preview = _command(commands, "preview", "print a template rendered with sample values", [
        "sysmail preview password-reset",
        "sysmail preview two-factor-code --var code=424242 --part text"],
        _templates_help(), handler=cmd_preview)
    preview.add_argument("template", metavar="TEMPLATE", help="the template's name")
    preview.add_argument("--var", action="append", default=[], metavar="KEY=VALUE",
                         help="a variable instead of its sample value; repeat for each")
    preview.add_argument("--part", choices=("message", "text", "html"), default="message",
                         help="the whole message (default), or only its text or HTML part")
    preview.add_argument("--locale", metavar="TAG", help="render in this language (de, fr-CA)")
    _command(commands, "serve", "run the HTTP API and the sender until SIGTERM (SYSMAIL_LISTEN)",
             ["sysmail serve", "sysmail --env-file /etc/sysmail/sysmail.env serve"],
             handler=cmd_serve)
    worker = _command(commands, "worker", "deliver queued mail until SIGTERM", [
        "sysmail worker", "sysmail worker --once"], handler=cmd_worker)
    worker.add_argument("--once", action="store_true", help="deliver what is due now, then exit")


def _add_queue_commands(commands: argparse._SubParsersAction) -> None:
    ops = "sysmail --env-file /etc/sysmail/sysmail.env"
    json_help = "print JSON instead of a table"
    status = _command(commands, "status", "queue counts, the oldest message and the last send",
                      [f"{ops} status", "sysmail status --json"], handler=cmd_status,
                      spool_only=True)
    status.add_argument("--json", action="store_true", help=json_help)
    mailq = _command(commands, "queue", "list the messages waiting or being sent, like mailq",
                     [f"{ops} queue", "sysmail queue --json"], handler=cmd_queue, spool_only=True)
    mailq.add_argument("--json", action="store_true", help=json_help)
    show = _command(commands, "show", "print one message's headers and text, like postcat", [
        "sysmail show '<1733011200000.5f2c@example.com>'", "sysmail show 6618a5a263ab --raw"],
        handler=cmd_show, spool_only=True)
    show.add_argument("id", metavar="ID", help="the internal id, or the Message-ID send printed")
    show.add_argument("--raw", action="store_true",
                      help="the message as stored, a reset link or code included")
    failed = _command(commands, "failed", "list the dead letters with their reasons", [
        f"{ops} failed", "sysmail failed --json"], handler=cmd_failed, spool_only=True)
    failed.add_argument("--json", action="store_true", help=json_help)
    retry = _command(commands, "retry", "put dead letters back in the queue, due now", [
        "sysmail retry --all", "sysmail retry '<1733011200000.5f2c@example.com>'"],
        handler=cmd_retry, spool_only=True)
    retry.add_argument("ids", nargs="*", metavar="ID",
                       help="internal ids or Message-IDs (see sysmail failed)")
    retry.add_argument("--all", action="store_true", help="every dead letter that can be retried")
    delete = _command(commands, "delete", "delete queued messages or dead letters, like "
                      "postsuper -d", ["sysmail delete '<1733011200000.5f2c@example.com>'",
                                       "sysmail delete --all-failed"],
                      handler=cmd_delete, spool_only=True)
    delete.add_argument("ids", nargs="*", metavar="ID",
                        help="internal ids or Message-IDs (see sysmail queue)")
    delete.add_argument("--all-failed", action="store_true", help="every dead letter")


def _add_setup_commands(commands: argparse._SubParsersAction) -> None:
    _command(commands, "check", "validate the configuration and templates, probe the relay", [
        "sysmail check", "sysmail --env-file /etc/sysmail/sysmail.env check"], handler=cmd_check)
    _command(commands, "dns", "print the SPF, DKIM and DMARC records to publish", [
        "sysmail dns", "SYSTEM_DOMAIN=example.com sysmail dns"], handler=cmd_dns)
    keygen = _command(commands, "keygen", "make a DKIM key: an env line, or a file, and its "
                      "DNS record", ["SYSTEM_DOMAIN=example.com sysmail keygen",
                                     "sysmail keygen --out /etc/sysmail/dkim.pem"],
                      handler=cmd_keygen, needs_config=False)
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa",
                        help="rsa (default; every receiver checks it) or ed25519 (a second one)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default 2048)")
    keygen.add_argument("--out", metavar="FILE",
                        help="also write the key as a PEM file, mode 0600, for LoadCredential=")



def _add_bounce_commands(commands: argparse._SubParsersAction) -> None:
    bounce = _command(commands, "bounce", "read a bounce, complaint or reply on stdin and record "
                      "it (exit 75: the MTA should retry)", [
                          "sysmail bounce --dry-run --json < returned.eml",
                          "sysmail bounce --recipient bounces@example.com < returned.eml"],
                      handler=cmd_bounce, needs_config=False)
    bounce.add_argument("--dry-run", action="store_true", help="print what it says, change nothing")
    bounce.add_argument("--json", action="store_true", help="print JSON (with --dry-run)")
    bounce.add_argument("--recipient", default="", metavar="ADDR",
                        help="the envelope recipient (Postfix pipe: ${recipient})")
    suppressed = _command(commands, "suppressed", "list the suppressed addresses", [
        "sysmail suppressed", "sysmail suppressed --json"], handler=cmd_suppressed)
    suppressed.add_argument("--json", action="store_true", help="print JSON instead of lines")
    suppress = _command(commands, "suppress", "stop mail to an address (see README)", [
        "sysmail suppress ada@example.com --reason 'asked by phone'"], handler=cmd_suppress)
    suppress.add_argument("address", metavar="ADDRESS", help="the address to stop mail to")
    suppress.add_argument("--reason", default="manual", help="why, one line (default: manual)")
    unsuppress = _command(commands, "unsuppress", "take an address off the suppression list", [
        "sysmail unsuppress ada@example.com"], handler=cmd_unsuppress)
    unsuppress.add_argument("address", metavar="ADDRESS", help="the address to send to again")


def _add_user_commands(commands: argparse._SubParsersAction) -> None:
    user = _command(commands, "user", "manage the SQLite store's users", [
        "sysmail user add ada@example.com --name Ada", "sysmail user list --json"])
    user_commands = user.add_subparsers(dest="user_command", metavar="ACTION", required=True,
                                        parser_class=_ArgumentParser)
    add = _command(user_commands, "add", "add a user, asking for a password at a terminal", [
        "sysmail user add ada@example.com --name Ada",
        "printf '%s\\n' \"$PASSWORD\" | sysmail user add ada@example.com"],
        handler=cmd_user_add)
    add.add_argument("email", help="the user's address")
    add.add_argument("--name", default="", help="the name mails greet them with")
    add.add_argument("--locale", default="", metavar="TAG", help="the language of their mail")
    listing = _command(user_commands, "list", "list the users", [
        "sysmail user list", "sysmail user list --json"], handler=cmd_user_list)
    listing.add_argument("--json", action="store_true", help="print JSON instead of lines")


def _parse_vars(pairs: list[str]) -> dict[str, str]:
    variables = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--var takes KEY=VALUE, not {pair[:40]!r}")
        variables[key] = value
    return variables


def _existing_spool_app(config: Config) -> App:
    """The App of a queue command; ConfigError when there is no spool at all: a queue command
    never makes an empty one (a spool that exists but cannot be read leaves Redis to show)."""
    if not os.path.lexists(config.spool_dir):
        where = config.spool_dir.absolute()
        problem = f"there is no spool at {where} (SYSMAIL_SPOOL; serve, worker and send create it)"
        raise ConfigError([problem])
    return build_app(config)


def cmd_send(args: argparse.Namespace, config: Config) -> int:
    """Queue a mail per recipient (one shared mail with --shared); print each Message-ID.

    System mail never shows one user's address to another: several --to make several mails."""
    if args.template and (args.subject or args.text or args.html):
        raise UsageError("--template cannot be combined with --subject, --text or --html")
    if not args.template and args.locale:
        raise UsageError("--locale goes with --template (an ad-hoc mail is sent as written)")
    if not args.template and (args.subject is None or args.text is None):
        raise UsageError("send needs --template NAME, or --subject and --text")
    if args.text == "-" and args.html == "-":
        raise UsageError("only one of --text and --html can read standard input")
    if bool(args.to) == bool(args.to_file):
        raise UsageError("send takes --to ADDR (repeatable) or --to-file FILE")
    if args.to_file:
        return _send_to_file(args, config)
    text, html = (sys.stdin.read() if part == "-" else part for part in (args.text, args.html))
    variables = _parse_vars(args.var)
    if len(args.to) > MAX_RECIPIENTS:  # as for one shared mail: send is not a mailing list
        raise MessageError(f"send takes 1 to {MAX_RECIPIENTS} recipients")
    for address in args.to:  # every address checked first: none is queued if one is wrong
        validate_address(address)
    mailer = build_app(config).enqueuer
    for to in [args.to] if args.shared else [[address] for address in args.to]:
        if args.template:
            message_id = mailer.enqueue_template(args.template, to, variables, args.locale)
        else:
            message_id = mailer.enqueue_message(to, args.subject, text, html,
                                                priority=URGENT if args.urgent else BULK)
        print(message_id, flush=True)
        if message_id.suppressed:
            _say(f"not queued for {', '.join(message_id.suppressed)}: suppressed (see the log)")
    return EX_OK


def _send_to_file(args: argparse.Namespace, config: Config) -> int:
    """send --to-file: one templated mail per recipient of the file, printing each Message-ID
    as its batch is queued; on failure, how to resume (the queued ones are always the first)."""
    if not args.template:
        raise UsageError("--to-file goes with --template")
    recipients = _recipients_file(args.to_file)[max(args.skip, 0):]
    show = sys.stderr.isatty()

    def progress(count: int) -> None:
        if show:
            print(f"\rqueued {count:,} of {len(recipients):,}", end="", file=sys.stderr)
    try:
        queued = build_app(config).enqueuer.enqueue_many(
            args.template, recipients, _parse_vars(args.var), args.locale, progress)
    except QueueUnavailable as exc:
        done = getattr(exc, "queued", [])
        print("\n".join(done), flush=True)
        raise QueueUnavailable(f"{exc}; the first {len(done):,} of these {len(recipients):,} "
                               f"recipients are queued: run again with --skip "
                               f"{args.skip + len(done)} for the rest") from None
    if show:
        print(file=sys.stderr)
    print("\n".join(queued), flush=True)
    left_out = [address for message_id in queued for address in message_id.suppressed]
    if left_out:
        _say(f"not queued for {len(left_out)} suppressed address(es) (see the log)")
    return EX_OK


def _recipients_file(path: str) -> list[tuple[str, dict, str | None]]:
    """(address, variables, locale) per recipient: a line each, or CSV rows under a header."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise MessageError(f"--to-file {path} cannot be read ({exc.__class__.__name__})") from None
    lines = [line for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not lines or "," not in lines[0]:
        return [(line.strip(), {}, None) for line in lines]
    rows = list(csv.DictReader(lines))
    column = next((c for c in rows[0] if c and c.strip().lower() in ("email", "to")), None) \
        if rows else None
    if column is None:
        raise MessageError(f"--to-file {path}: the CSV header needs an email (or to) column")
    return [(row[column].strip(), {k.strip(): v for k, v in row.items()
                                   if k and k not in (column, "locale") and v is not None},
             row.get("locale") or None) for row in rows]


def cmd_suppressed(args: argparse.Namespace, config: Config) -> int:
    """List the suppressed addresses: why, since when, until when."""
    entries = [e.as_json() for e in build_app(config).suppressions.entries()]
    if args.json:
        print(json.dumps(entries))
        return EX_OK
    if not entries:
        print("no suppressed addresses")
    for e in entries:
        until = f"until {e['expires'][:16]}" if e["expires"] else "until removed"
        print(f"{e['address']}  {e['scope']}  {e['reason']}  ({e['source']}, "
              f"{e['at'][:16]}, {until})")
    return EX_OK


def cmd_suppress(args: argparse.Namespace, config: Config) -> int:
    """Put an address on the suppression list until it is removed."""
    if not args.reason.strip() or _unsafe_in_header(args.reason):
        raise UsageError("--reason takes one line of text")
    entry = build_app(config).suppressions.suppress(args.address, args.reason.strip()[:200],
                                                    "cli")
    print(f"suppressed {entry.address}")
    return EX_OK


def cmd_unsuppress(args: argparse.Namespace, config: Config) -> int:
    """Take an address off the suppression list."""
    if not build_app(config).suppressions.unsuppress(args.address):
        raise MessageError(f"{args.address[:80]} is not suppressed")
    print(f"unsuppressed {args.address}")
    return EX_OK


class SenderProcesses:
    """The extra senders of serve and worker: `worker` processes on the same spool, each
    restarted when it dies (after 1 s, doubling to a minute while they keep dying), told to
    stop with the parent, and ended by the kernel if the parent dies first."""

    RESTART_MAX_SECONDS = 60.0

    def __init__(self, count: int, argv: list[str]):
        self.argv, self.count = argv, count
        self.children: list[subprocess.Popen] = []
        here = os.path.dirname(os.path.abspath(__file__))  # a folder, or the zipapp itself
        path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
        self._env = {**{k: v for k, v in os.environ.items() if k not in _SYSTEMD_ONLY},
                     "PYTHONPATH": path, "SYSMAIL_SENDERS": "1",
                     "SYSMAIL_SUPERVISOR_PID": str(os.getpid())}
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="sysmail-senders", daemon=True)

    def start(self) -> None:
        """Start the processes and the thread that restarts them."""
        self.children = [self._spawn() for _ in range(self.count)]
        if self.children:
            self._watcher.start()
            log_event(logging.INFO, "senders_started", processes=self.count + 1,
                      pids=[child.pid for child in self.children])

    def _spawn(self) -> subprocess.Popen:
        return subprocess.Popen(self.argv, env=self._env, stdin=subprocess.DEVNULL)

    def _watch(self) -> None:
        delay = 1.0
        while not self._stopping.wait(0.2):
            for index, child in enumerate(self.children):
                if child.poll() is None or self._stopping.is_set():
                    continue
                log_event(logging.ERROR, "sender_died", pid=child.pid, exit_code=child.returncode,
                          restart_in_seconds=delay)
                if self._stopping.wait(delay):
                    return
                self.children[index] = self._spawn()
                delay = min(delay * 2, self.RESTART_MAX_SECONDS)

    def terminate(self) -> None:
        """SIGTERM every process: each stops after its current message."""
        self._stopping.set()
        for child in self.children:
            with contextlib.suppress(ProcessLookupError):
                child.terminate()

    def wait(self, timeout: float) -> None:
        """Wait for the processes, and SIGKILL those still there after timeout seconds."""
        deadline = time.monotonic() + timeout
        for child in self.children:
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


_SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID")
PR_SET_PDEATHSIG = 1


def _extra_senders(args: argparse.Namespace, config: Config,
                   metrics: Metrics) -> SenderProcesses:
    """serve's or worker's other sender processes: SYSMAIL_SENDERS (one per core) minus this
    one, each running `worker` with this command's --env-file; metrics adds their counts."""
    count = (config.senders or os.cpu_count() or 1) - 1
    if count > 0:
        metrics.peers = config.spool_dir / "senders"
        for stale in metrics.peers.glob("*"):  # an earlier run's senders
            _unlink_quietly(stale)
    env_file = ["--env-file", os.path.abspath(args.env_file)] if args.env_file else []
    return SenderProcesses(count, [sys.executable, "-m", "sysmail", *env_file, "worker"])


def _die_with_supervisor() -> bool:
    """In a sender started by serve or worker: end when it ends, even by SIGKILL (Linux);
    True in such a sender."""
    supervisor = os.environ.get("SYSMAIL_SUPERVISOR_PID", "")
    prctl = _libc_function("prctl") if supervisor else None
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if str(os.getppid()) != supervisor:  # it died before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    return bool(supervisor)


def cmd_worker(args: argparse.Namespace, config: Config) -> int:
    """Deliver queued mail: until a signal, or with --once until nothing is due."""
    if not args.once:
        _block_stop_signals()
    app = build_app(config)
    if args.once:
        sender = app.sender()
        with contextlib.suppress(SpoolError):
            sender.spool.clean_tmp()
        counts = sender.run_once()
        sender.close()
        print(counts)
        if counts.released:
            raise RelayUnavailable(f"the relay could not be reached; {counts.released} "
                                   "message(s) stay queued")
        return EX_OK
    with contextlib.suppress(SpoolError):
        app.spool.recover()
    if _die_with_supervisor():
        app.metrics.publish_path = config.spool_dir / "senders" / f"{os.getpid()}.json"
    others = _extra_senders(args, config, app.metrics)
    app.sending.start(on_cycle=app.on_cycle)
    others.start()
    app.notifier.ready()
    try:
        _wait_for_stop_signal()
    finally:
        app.notifier.stopping()
        others.terminate()
        app.sending.stop(timeout=STOP_GRACE_SECONDS + 60)
        app.metrics.publish_if_due(math.inf)  # the last counts
        others.wait(timeout=STOP_GRACE_SECONDS + 2)
    return EX_OK


STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def _block_stop_signals() -> None:
    """Hold SIGTERM and SIGINT for sigwait, before any thread starts (threads inherit the
    mask): no Python signal handler then ever runs in the middle of a lock it needs."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def _wait_for_stop_signal() -> int:
    """Sleep until SIGTERM or SIGINT arrives; return it."""
    return signal.sigwait(STOP_SIGNALS)


def cmd_status(args: argparse.Namespace, config: Config) -> int:
    """Print the queue counts, the oldest message's age and the last successful send."""
    app = _existing_spool_app(config)
    spool = app.spool
    try:
        status: dict[str, object] = spool.counts()
    except SpoolError as exc:
        _say(f"{exc}; counting the other queues only")
        status = {"new": 0, "deferred": 0, "cur": 0, "failed": 0, "oldest_age_seconds": 0,
                  "spool": "unavailable"}
    if app.fallback is not None:
        status["redis"] = _redis_counts(app.fallback, status)
    last = spool.last_sent()
    status["last_sent_at"] = _iso_time(last) if last else None
    if args.json:
        print(json.dumps(status))
        return EX_OK
    for key, value in status.items():
        print(f"{key.replace('_', ' ')}: {value if value is not None else 'never'}")
    return EX_OK


def _redis_counts(fallback: RedisQueue, totals: dict) -> dict | str:
    """The fallback queue's counts, added into totals; "unavailable" when Redis is down."""
    try:
        counts = fallback.counts()
    except QueueUnavailable:
        return "unavailable"
    for state, count in counts.items():
        totals[state] += count
    return counts


def _failed_of(source: Queue) -> list[dict]:
    """A queue's dead letters; a queue that cannot be read is reported and skipped."""
    return _read_or_skip(source.failed, "dead letters")


def _entries_of(source: Queue) -> list[dict]:
    """A queue's waiting messages; a queue that cannot be read is reported and skipped."""
    return _read_or_skip(source.entries, "messages")


def _read_or_skip(read: Callable[[], list[dict]], what: str) -> list[dict]:
    try:
        return read()
    except (SpoolError, QueueUnavailable) as exc:
        _say(f"{exc}; its {what} are not listed")
        return []


def cmd_failed(args: argparse.Namespace, config: Config) -> int:
    """List the dead letters with their reasons."""
    letters = [letter for source in _existing_spool_app(config).queues
               for letter in _failed_of(source)]
    if args.json:
        print(json.dumps(letters))
        return EX_OK
    if not letters:
        print("no failed messages")
    for letter in letters:
        code = f" {letter['code']}" if letter.get("code") else ""
        reply = f" ({letter['reply']})" if letter.get("reply") else ""
        print(f"{letter['id']}  {letter.get('template') or 'ad-hoc'}  "
              f"to {', '.join(letter.get('to', []))}: {letter.get('reason')}{code}{reply}")
    return EX_OK


def cmd_retry(args: argparse.Namespace, config: Config) -> int:
    """Put dead letters back in the queue."""
    if args.all == bool(args.ids):
        raise UsageError("retry takes message ids or --all (not both)")
    queues = _existing_spool_app(config).queues
    letters = [letter for source in queues for letter in _failed_of(source)]
    named = {key: [letter["id"] for letter in letters if key == letter["id"]
                   or _same_message_id(key, letter.get("rfcMessageId", ""))] for key in args.ids}
    ids = None if args.all else [ident for found in named.values() for ident in found]
    moved = [i for source in queues for i in source.retry(ids)]
    missing = [key for key, found in named.items() if not set(found) & set(moved)]
    print(f"requeued {len(moved)} message(s)")
    if missing:
        raise MessageError(f"no failed message with id {missing[0]}")
    return EX_OK


def _same_message_id(key: str, message_id: str) -> bool:
    """True when key is message_id, with or without its angle brackets."""
    return bool(message_id) and key.strip("<>") == message_id.strip("<>")


def _spool_matches(spool: Spool, key: str,
                   states: tuple[str, ...] = ("new", "cur", "failed")) -> list[tuple]:
    """(state, name, path) of the spool's messages that key names: the internal id, or the
    Message-ID that send printed (one message may have several entries after a split)."""
    if "@" not in key:
        return [found for found in spool.messages(states) if found[1].id == key]
    return [(state, name, path) for state, name, path in spool.messages(states)
            if (message := spool.peek(name, path)) and _same_message_id(key, message.message_id)]


def cmd_queue(args: argparse.Namespace, config: Config) -> int:
    """List the messages waiting or being sent, like mailq."""
    queues = _existing_spool_app(config).queues
    rows = sorted((row for source in queues for row in _entries_of(source)), key=_queue_order)
    if args.json:
        print(json.dumps(rows))
        return EX_OK
    if not rows:
        print("the queue is empty")
        return EX_OK
    now = time.time()
    _print_table(("ID", "MESSAGE-ID", "KIND", "TO", "AGE", "ATTEMPT", "NEXT TRY", "LAST REPLY"),
                 [(row["id"], row["message_id"], row["kind"], ", ".join(row["to"]),
                   _duration(now - row["queued_at"]), str(row["attempt"]), _next_try(row, now),
                   row["last_reply"] or "-") for row in rows])
    return EX_OK


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns aligned to their widest cell, two spaces apart."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


def _duration(seconds: float) -> str:
    """12s, 5m, 3h, 2d: a duration as an operator reads it at a glance."""
    for unit, size in (("d", DAY_SECONDS), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(int(seconds), 0)}s"


def _next_try(row: dict, now: float) -> str:
    if row["state"] == "sending":
        return "sending"
    return "now" if row["next_try"] <= now else f"in {_duration(row['next_try'] - now)}"


def cmd_show(args: argparse.Namespace, config: Config) -> int:
    """Print one message: its queue facts, headers and text; secrets redacted unless --raw."""
    spool = _existing_spool_app(config).spool
    found = _spool_matches(spool, args.id)
    if not found:
        raise MessageError(f"no message with id {args.id} in the spool {spool.root}")
    state, name, path = found[0]
    message = spool.peek(name, path)
    if message is None:
        raise MessageError(f"message {name.id} cannot be read (gone, or not a queue entry)")
    if args.raw:
        sys.stdout.buffer.write(message.data)
        return EX_OK
    secret = _carries_secret(message)  # a reset link or code: shown only with --raw
    print(f"id: {name.id}  state: {'sending' if state == 'cur' else state}  attempt: "
          f"{name.attempt}  envelope: {message.mail_from} -> {', '.join(message.rcpts)}")
    parsed = email.message_from_bytes(message.data, policy=email.policy.default)
    for header, value in parsed.items():
        if not secret or header.lower().encode() in _REDACTED_KEEPS:
            print(f"{header}: {value}")
    print()
    text = parsed.get_body(("plain",))
    if secret:
        print(f"(subject and body hidden: this {message.template} mail carries a one-time link "
              "or code; sysmail show --raw prints it)")
    else:
        print(text.get_content().rstrip("\n") if text is not None else "(no text part)")
    return EX_OK


def cmd_delete(args: argparse.Namespace, config: Config) -> int:
    """Delete queued or dead messages (by id or Message-ID), or every dead letter."""
    if args.all_failed == bool(args.ids):
        raise UsageError("delete takes message ids or --all-failed (not both)")
    spool = _existing_spool_app(config).spool
    named = {key: [name.id for _, name, _ in _spool_matches(spool, key)] for key in args.ids}
    if args.all_failed:
        named = {"--all-failed": [name.id for _, name, _ in spool.messages(("failed",))]}
    outcomes = {ident: spool.delete(ident) for found in named.values() for ident in found}
    print(f"deleted {sum(o == 'deleted' for o in outcomes.values())} message(s)")
    busy = [ident for ident, outcome in outcomes.items() if outcome == "sending"]
    if busy:
        raise SpoolError(f"message {busy[0]} is being sent right now and was left alone; "
                         "delete it again once it is settled (sysmail queue)")
    missing = [key for key, found in named.items() if not found and key != "--all-failed"]
    if missing:
        raise MessageError(f"no message with id {missing[0]} in the spool {spool.root}")
    return EX_OK


def cmd_preview(args: argparse.Namespace, config: Config) -> int:
    """Print a template rendered with the given variables and samples for the rest."""
    enqueuer = build_app(config).enqueuer
    template = enqueuer.templates.get(args.template)
    variables = {**(template.samples if template else {}), **_parse_vars(args.var)}
    _, rendered = enqueuer.render(args.template, variables, args.locale)
    if args.part != "message":
        print(getattr(rendered, args.part))
        return EX_OK
    now = time.time()
    data = build_message(config, ["ada@example.com"], rendered,
                         make_message_id(config.domain, now), now,
                         to_name=str(variables.get("name", "")))
    sys.stdout.write(data.decode("ascii", "replace").replace("\r\n", "\n"))
    return EX_OK


def cmd_serve(args: argparse.Namespace, config: Config) -> int:
    """Run the HTTP API and the sender until SIGTERM or SIGINT."""
    _block_stop_signals()
    app = build_app(config)
    others = _extra_senders(args, config, app.metrics)
    app.start()
    others.start()
    try:
        _wait_for_stop_signal()
    finally:
        log_event(logging.INFO, "stopping")
        others.terminate()
        app.stop()
        others.wait(timeout=STOP_GRACE_SECONDS + 2)
    return EX_OK


def cmd_bounce(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Understand one message on stdin; print it (--dry-run) or record it. A failure to
    record it, a bad configuration included, exits 75: the MTA keeps the message and retries."""
    raw = _read_bounded(sys.stdin.buffer, MAX_BOUNCE_BYTES)
    report = parse_bounce(raw)
    if args.dry_run:
        print(json.dumps(report.as_json()) if args.json else
              f"{report.kind} {report.status or '-'} {' '.join(report.recipients) or '-'}: "
              f"{report.reason}")
        return EX_OK
    try:
        config = Config.from_env(env)
        _setup_logging(config.log_level)
        envelope = bounce_envelope_recipient(raw, args.recipient)
        handler = build_app(config).bounces
        if not handler.unsubscribe(raw):
            handler.handle(report, envelope)
    except SysmailError as exc:  # the list (or the configuration) cannot be used just now
        log_event(logging.ERROR, "bounce_not_recorded", reason=str(exc))
        _say(f"the bounce was not recorded, try again later ({exc})")
        return EX_TEMPFAIL
    except Exception as exc:  # noqa: BLE001 - whatever it is, the MTA must keep the message
        _log.exception("bounce_not_recorded", extra={"fields": {}})
        _say(f"the bounce was not recorded, try again later ({type(exc).__name__}: {exc})")
        return EX_TEMPFAIL
    return EX_OK


def _read_bounded(stream: BinaryIO, limit: int) -> bytes:
    """The first limit bytes of a stream, read to its end (a pipe's writer must not see
    EPIPE: Postfix would call that a failed delivery)."""
    kept = stream.read(limit)
    while stream.read(1 << 16):
        pass
    return kept


def cmd_user_add(args: argparse.Namespace, config: Config) -> int:
    """Add a user to the SQLite store; a password, if any, is read from stdin."""
    password = _ask_password() if sys.stdin is not None and sys.stdin.isatty() else (
        "" if sys.stdin is None else sys.stdin.read().rstrip("\r\n"))
    if password and not PASSWORD_MIN_CHARS <= len(password) <= PASSWORD_MAX_CHARS:
        raise MessageError(f"the password must be {PASSWORD_MIN_CHARS} to {PASSWORD_MAX_CHARS} "
                           "characters long")
    store = _user_store(config, "add_user")
    user = store.add_user(args.email, args.name, password or None, args.locale)
    print(f"added user {user.id}: {user.email}" + (" with a password" if password else ""))
    return EX_OK


def _ask_password() -> str:
    """At a terminal: the password twice, without echo (empty: no password)."""
    password = getpass.getpass("Password (empty for none): ")
    if password and getpass.getpass("Password again: ") != password:
        raise UsageError("the two passwords differ")
    return password


def cmd_user_list(args: argparse.Namespace, config: Config) -> int:
    """List the SQLite store's users."""
    users = _user_store(config, "users").users()
    if args.json:
        print(json.dumps(users))
        return EX_OK
    for user in users:
        password = "password set" if user["has_password"] else "no password"
        print(f"{user['id']}  {user['email']}  {user['name'] or '-'}  {password}")
    return EX_OK


def _user_store(config: Config, method: str) -> SqliteStore:
    """The configured token store, when it can do what a user command asks of it."""
    store = build_app(config).store
    if not callable(getattr(store, method, None)):
        problem = (f"the token store {type(store).__name__} (SYSMAIL_STORE) has no {method}(): "
                   "manage its users in the application that owns them")
        raise ConfigError([problem])
    return store


def cmd_check(args: argparse.Namespace, config: Config) -> int:
    """Report the configuration, the signing backend and the templates, warn about look-alike
    variables, and probe the relay (EHLO, STARTTLS, AUTH) without sending."""
    print(f"configuration ok: From {config.from_name} <{config.from_addr}>, spool "
          f"{config.spool_dir}")
    if config.dkim_key:
        print(f"DKIM rsa-sha256: selector {config.dkim_selector}, "
              f"{_rsa_key_bits(config.dkim_key)} bits")
    if config.ed25519_key:
        print(f"DKIM ed25519-sha256: selector {config.ed25519_selector}")
    if not config.signing:
        print("DKIM: no key configured, mail goes out unsigned")
    app = build_app(config)
    if config.signing:
        print(f"DKIM signing: {signing_backend_note(app.signer.backend)}")
    for warning in lookalike_variables(args.environment):
        print(f"warning: {warning}")
    problems = template_problems(config.templates_dir) if config.templates_dir else []
    try:
        lines = app.enqueuer.check_templates()
    except ConfigError as exc:
        problems, lines = problems + exc.problems, []
    if problems:
        raise ConfigError(problems)
    for line in lines:
        print(line)
    try:
        steps = app.transport().probe()
    except RelayUnavailable as exc:
        if exc.smtp_code and 500 <= exc.smtp_code < 600:
            raise ConfigError([f"SMTP_URL: {exc}"]) from None
        raise
    for step in steps:
        print(f"relay: {step}")
    return EX_OK


def cmd_dns(args: argparse.Namespace, config: Config) -> int:
    """Print the DNS records that let receivers trust this sender's mail."""
    domain = config.from_addr.rpartition("@")[2]
    print(f"; SPF: who may send for {domain} (add ip4:/include: for the relay that sends for you)")
    print(f'{domain}. IN TXT "v=spf1 mx -all"')
    if config.dkim_key:
        print(f"; DKIM rsa-sha256, selector {config.dkim_selector}")
        print(_txt_record(f"{config.dkim_selector}._domainkey.{domain}",
                          f"v=DKIM1; k=rsa; p={_rsa_public_key_b64(config.dkim_key)}"))
    if config.ed25519_key:
        print(f"; DKIM ed25519-sha256 (RFC 8463), selector {config.ed25519_selector}")
        print(_txt_record(f"{config.ed25519_selector}._domainkey.{domain}",
                          f"v=DKIM1; k=ed25519; p={_ed25519_public_key_b64(config.ed25519_key)}"))
    if not config.signing:
        print("; DKIM: no key configured; create one with: sysmail keygen")
    if config.bounce_address:
        _print_bounce_records(config.bounce_address.rpartition("@")[2])
    print("; DMARC: strict alignment, reports to a mailbox of yours")
    print(f'_dmarc.{domain}. IN TXT "v=DMARC1; p=quarantine; adkim=s; aspf=s; '
          f'rua=mailto:dmarc-reports@{domain}"')
    return EX_OK


def _print_bounce_records(bounce_domain: str) -> None:
    """What the bounce domain needs: an MX to the MTA that pipes to `sysmail bounce`, and
    SPF for the relay (it is the envelope sender's domain, the one SPF checks)."""
    print(f"; Bounces come back to {bounce_domain}: its MX is the host whose MTA pipes them to "
          "`sysmail bounce` (see README); SPF is checked against it: add ip4:/include: for the relay")
    print(f"{bounce_domain}. IN MX 10 {socket.getfqdn()}.")
    print(f'{bounce_domain}. IN TXT "v=spf1 mx -all"')


def cmd_keygen(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """Print a new DKIM key as an environment line (and write it to --out as a PEM file for
    LoadCredential=), and the DNS record that publishes it."""
    domain = env.get("SYSTEM_DOMAIN") or "YOUR_DOMAIN"
    if args.out and os.path.lexists(args.out):
        raise UsageError(f"--out {args.out}: the file exists (keygen never overwrites a key)")
    if args.type == "ed25519":
        selector = env.get("SYSTEM_DKIM_ED25519_SELECTOR") or "ed25519"
        pem = _openssl(["genpkey", "-algorithm", "ed25519"])
        key_b64 = base64.b64encode(_ed25519_seed(pem))
        print(f'SYSTEM_DKIM_ED25519_PRIVATE_KEY="{key_b64.decode()}"')
        _write_key_file(args.out, pem, "dkim-ed25519.pem")
        public_der = _openssl(["pkey", "-pubout", "-outform", "DER"], pem.encode(), text=False)
        record = f"v=DKIM1; k=ed25519; p={base64.b64encode(public_der[-32:]).decode()}"
    else:
        if args.bits < RSA_MIN_BITS:
            raise UsageError(f"--bits must be at least {RSA_MIN_BITS}")
        selector = env.get("SYSTEM_DKIM_SELECTOR") or "default"
        pem = _openssl(["genpkey", "-algorithm", "RSA", "-pkeyopt", f"rsa_keygen_bits:{args.bits}"])
        print('SYSTEM_DKIM_PRIVATE_KEY="' + pem.strip().replace("\n", "\\n") + '"')
        _write_key_file(args.out, pem, "dkim.pem")
        record = f"v=DKIM1; k=rsa; p={_rsa_public_key_b64(pem.encode())}"
    variable = "SYSTEM_DKIM_ED25519_SELECTOR" if args.type == "ed25519" else "SYSTEM_DKIM_SELECTOR"
    print(f"; publish in DNS, then set {variable}={selector}")
    print(_txt_record(f"{selector}._domainkey.{domain}", record))
    return EX_OK


def _write_key_file(path: str | None, pem: str, credential: str) -> None:
    """Write a new key as a PEM file only its owner reads, for systemd's LoadCredential=."""
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SPOOL_FILE_MODE)
    except OSError as exc:
        raise UsageError(f"--out {path}: {exc.strerror} (keygen never overwrites a key)") from None
    with os.fdopen(fd, "w", encoding="ascii") as file:
        file.write(pem)
    print(f"; wrote {path} (mode 0600); in sysmail.service: "
          f"LoadCredential={credential}:{Path(path).absolute()}")


def _openssl(args: list[str], stdin: bytes = b"", text: bool = True) -> Any:
    """The openssl command's output (str, or bytes with text=False); needs no Python library."""
    try:
        result = subprocess.run(["openssl", *args], input=stdin, capture_output=True, check=True,
                                timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        raise SysmailError("keygen needs the openssl command, which failed or is missing") from exc
    return result.stdout.decode("ascii") if text else result.stdout


def _setup_logging(level: int) -> None:
    """JSON lines on stderr for the sysmail logger (replacing an earlier handler of ours)."""
    for handler in list(_log.handlers):
        if isinstance(handler.formatter, JsonLogFormatter):
            _log.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter())
    _log.addHandler(handler)
    _log.setLevel(level)
    _log.propagate = False


def _read_env(args: argparse.Namespace, env: Mapping[str, str]) -> dict[str, str]:
    if not args.env_file:
        return dict(env)
    try:
        text = Path(args.env_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"--env-file {args.env_file} cannot be read ({exc.__class__.__name__})"]
                          ) from None
    return {**parse_env_file(text), **env}


# what the queue commands (status, queue, show, failed, retry, delete) read: a service's env
# file works for them even though its DKIM key comes as a systemd credential
SPOOL_VARIABLES = ("SYSMAIL_SPOOL", "REDIS_URL", "SYSMAIL_QUEUE_KEY", "SYSMAIL_DEAD_LETTER_DAYS",
                   "SYSMAIL_LOG_LEVEL")


def _run(argv: list[str] | None, env: Mapping[str, str]) -> int:
    args = _build_parser().parse_args(argv)
    env = with_credentials(_read_env(args, env))
    if not getattr(args, "needs_config", True):  # keygen works without a valid environment
        return args.handler(args, env)
    if getattr(args, "spool_only", False):
        env = {k: v for k, v in env.items() if k in SPOOL_VARIABLES}
    config = Config.from_env(env)
    _setup_logging(config.log_level)
    args.environment = env  # check looks for misspelled variables in it
    return args.handler(args, config)


def main(argv: list[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the command line; map every error to a sysexits code and one plain sentence."""
    try:
        return _run(argv, os.environ if env is None else env)
    except SystemExit as exc:  # --help and --version
        return exc.code if isinstance(exc.code, int) else EX_OK
    except ConfigError as exc:
        _say("invalid configuration:\n" + "\n".join(f"  - {p}" for p in exc.problems))
        return EX_CONFIG
    except UsageError as exc:
        _say(f"{exc} (see sysmail --help)")
        return EX_USAGE
    except MessageError as exc:
        _say(str(exc))
        return EX_DATAERR
    except (QueueUnavailable, SpoolError, StoreError, TemporaryDeliveryError) as exc:
        _say(str(exc))
        return EX_TEMPFAIL
    except (PermanentDeliveryError, SysmailError) as exc:
        _say(str(exc))
        return EX_UNAVAILABLE
    except KeyboardInterrupt:
        return EX_TEMPFAIL
    except BrokenPipeError:  # `sysmail keygen | head -1`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EX_OK
    except Exception:  # noqa: BLE001 - the one boundary where anything unexpected is caught
        _log.exception("internal_error", extra={"fields": {}})
        _say("internal error; the log has the details")
        return EX_SOFTWARE


def _say(sentence: str) -> None:
    print(f"sysmail: {sentence}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
