"""The benchmark runs end to end in its smoke size (issue 5: CI runs a short smoke of it)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS = ("durable enqueue", "delivery, RSA-2048 DKIM", "delivery vs the signing limit",
        "latency enqueue->250, in-process", "latency enqueue->250, cross-process",
        "HTTP forgot-password", "HTTP /v1/emails", "delivery with 3,000 queued",
        "worker peak RSS")


def test_bench_smoke_prints_one_row_per_measure_with_a_ratio() -> None:
    """bench/run.py --smoke exits 0 and prints the table with every measure and its ratio."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke"],
                            capture_output=True, text=True, timeout=120, cwd=REPO, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| measure | sysmail | reference (same run) | ratio |")
    body = lines[2:]
    for measure in ROWS:
        [row] = [line for line in body if line.startswith(f"| {measure}")]
        ratio = row.split("|")[4].strip()
        assert float(ratio) > 0, row
    assert "Traceback" not in result.stderr
