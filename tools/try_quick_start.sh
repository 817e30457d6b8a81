#!/usr/bin/env bash
# Try the README's quick start verbatim, as a new user would: a fresh clone, the system Python
# (/usr/bin/python3, externally managed on Debian), its first command run as written. Passes
# when the service it starts answers /healthz; then stops it with SIGTERM.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill -TERM -- "-$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
# the first ```sh block of the "## Quick start" section, exactly as the README shows it
command="$(awk '/^## Quick start/{q=1} q&&/^```sh/{f=1;next} f&&/^```/{exit} f' "$repo/README.md")"
[ -n "$command" ] || { echo "quick start: no command found in README.md" >&2; exit 1; }
git clone --quiet "$repo" "$work/sysmail"
port="$(/usr/bin/python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
echo "quick start: $command"
cd "$work/sysmail"
# python3 is the system one; the listen address only moves off the default port
setsid env PATH="/usr/bin:/bin" SYSMAIL_LISTEN="127.0.0.1:$port" SYSMAIL_METRICS_LISTEN=off \
    bash -c "$command" >"$work/out.log" 2>&1 &
pid=$!
for _ in $(seq 600); do
    if /usr/bin/python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=1)" 2>/dev/null; then
        echo "quick start: the service answers on 127.0.0.1:$port; stopping it with SIGTERM"
        kill -TERM "$pid"
        wait "$pid" && pid="" && exit 0
        echo "quick start: the service did not exit 0 on SIGTERM" >&2
        exit 1
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.5
done
echo "quick start failed; its output:" >&2
tail -n 40 "$work/out.log" >&2
exit 1
