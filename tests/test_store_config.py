"""SYSMAIL_STORE plugs a token store in with one line, for `serve` and the command line alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from conftest import REPO, free_port, run_cli, stop_process

STORE_MODULE = '''
import sysmail

class Store(sysmail.MemoryStore):
    """A store that knows one user, and remembers the Config it was built with."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.add_user("grace@example.com", "Grace")

def make_plain():
    return sysmail.MemoryStore()
'''


def _env(tmp_path: Path, store: str) -> dict[str, str]:
    (tmp_path / "userstore.py").write_text(STORE_MODULE, encoding="utf-8")
    return {"PYTHONPATH": f"{tmp_path}:{REPO}", "SYSMAIL_STORE": store,
            "SYSMAIL_SPOOL": str(tmp_path / "spool"), "SYSMAIL_OUTBOX": str(tmp_path / "outbox"),
            "SYSMAIL_DB": str(tmp_path / "never.db"), "SYSMAIL_LOG_LEVEL": "error"}


def _post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as reply:
        return reply.status


def _wait_for(condition: object, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_serve_uses_the_configured_store(tmp_path: Path) -> None:
    """A class named by SYSMAIL_STORE (given the Config) serves forgot-password, not SQLite."""
    port = free_port()
    env = {**_env(tmp_path, "userstore:Store"), "SYSMAIL_LISTEN": f"127.0.0.1:{port}", "SYSMAIL_METRICS_LISTEN": "off",
           "PATH": "/usr/bin:/bin"}
    service = subprocess.Popen([sys.executable, str(REPO / "sysmail.py"), "serve"], env=env,
                               stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/v1/auth/forgot-password"
        _wait_for(lambda: _ready(port))
        assert _post(url, {"email": "grace@example.com"}) == 202
        outbox = tmp_path / "outbox"
        _wait_for(lambda: outbox.is_dir() and any(outbox.iterdir()))
        [mail] = list(outbox.iterdir())
        assert b"\r\nTo: \"Grace\" <grace@example.com>\r\n" in mail.read_bytes()
    finally:
        stop_process(service)
    assert not (tmp_path / "never.db").exists()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
            return True
    except OSError:
        return False


def test_user_commands_say_when_the_store_cannot_do_them(tmp_path: Path) -> None:
    """`user list` on a store without users(): one sentence, exit 78, no traceback."""
    result = run_cli(["user", "list"], _env(tmp_path, "userstore:make_plain"))
    assert result.returncode == 78
    assert "has no users()" in result.stderr and "Traceback" not in result.stderr


def test_user_add_goes_to_the_configured_store(tmp_path: Path) -> None:
    """`user add` reaches the configured store's add_user (a factory without arguments)."""
    result = run_cli(["user", "add", "ada@example.com"], _env(tmp_path, "userstore:make_plain"))
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "never.db").exists()


def test_a_store_that_cannot_be_imported_is_a_configuration_error(tmp_path: Path) -> None:
    for store, words in (("nosuchmodule:Store", "cannot be imported"),
                         ("userstore:NoSuchThing", "cannot be imported"),
                         ("not a path", "must be module:attribute")):
        result = run_cli(["user", "list"], _env(tmp_path, store))
        assert result.returncode == 78, (store, result.stderr)
        assert words in result.stderr and "Traceback" not in result.stderr
