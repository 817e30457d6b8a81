#!/usr/bin/env python3
"""Probes behind BENCHMARKS.md's explanations: what a row's figure is made of, not a ratio.

    python3 bench/probes.py million        # a worker's CPU per message, 5,000 vs 1,000,000 queued
    python3 bench/probes.py million --window 1000   # the same in one-second windows
    python3 bench/probes.py group-commit   # messages per sync, 16 threads vs one
    python3 bench/probes.py creates        # the kernel's time to create and write a file

Each prints one line per measurement; `million` fills a spool of a million first (minutes).
"""

from __future__ import annotations

import argparse
import os
import resource
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import run
from run import Bench, Sink, bulk_fill, process_times, run_workers

TICK = os.sysconf("SC_CLK_TCK")


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (not idle, not waiting for I/O)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def drain_cpu(env: dict[str, str], sink: Sink, count: int) -> tuple[float, float, float, str]:
    """Run one worker until count more messages reached the sink; between 5 % and 95 % of
    them: its rate, its CPU per message and the machine's busy time per message (ms); and
    the rate in each tenth of the count (is the start slower than the rest?)."""
    already = set(sink.received())
    worker = run_workers(env, 1)[0]
    samples = []
    try:
        while (delivered := len(sink.received()) - len(already)) < count:
            samples.append((delivered, time.perf_counter(), sum(process_times(worker.pid)),
                            machine_busy()))
            time.sleep(0.05)
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    window = [s for s in samples if count // 20 <= s[0] <= count * 19 // 20]
    (n0, t0, cpu0, busy0), (n1, t1, cpu1, busy1) = window[0], window[-1]
    messages, tenth = n1 - n0, count // 10
    times = sorted(t for m, t in sink.received().items() if m not in already)[:tenth * 10]
    tenths = " ".join(f"{tenth / max(times[i + tenth - 1] - times[i], 1e-6):,.0f}"
                      for i in range(0, len(times), tenth))
    return (messages / (t1 - t0), (cpu1 - cpu0) / messages * 1000,
            (busy1 - busy0) / messages * 1000, tenths)


def probe_million(bench: Bench, window: int) -> None:
    sink = Sink(bench.folder)
    try:
        large = bench.env(sink)
        bulk_fill(large, 1_000_000)
        rates: dict[str, list[float]] = {"small": [], "large": []}
        for _ in range(3):
            small = bench.env(sink)
            bulk_fill(small, window)
            for label, env in (("small", small), ("large", large)):
                rate, cpu, busy, tenths = drain_cpu(env, sink, window)
                rates[label].append(rate)
                print(f"{label}: {rate:,.0f}/s, worker {cpu:.2f} ms CPU a message, "
                      f"machine busy {busy:.2f} ms a message; per tenth {tenths}", flush=True)
        print(f"ratio of median rates: "
              f"{statistics.median(rates['large']) / statistics.median(rates['small']):.2f}")
    finally:
        sink.stop()


def enqueue_from_threads(target: run.sysmail.Mailer, threads: int, seconds: float) -> int:
    """Enqueue from `threads` threads at once for `seconds`; return how many were queued."""
    done, end = [0] * threads, time.monotonic() + seconds

    def enqueue(number: int) -> None:
        while time.monotonic() < end:
            target.enqueue("two-factor-code", to=f"u{number}@example.com", code="1")
            done[number] += 1
    workers = [threading.Thread(target=enqueue, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done)


def probe_group_commit(bench: Bench, seconds: float = 5.0) -> None:
    for threads in (16, 1):
        target = run.mailer(bench.env())
        before = resource.getrusage(resource.RUSAGE_SELF)
        count = enqueue_from_threads(target, threads, seconds)
        after, spool = resource.getrusage(resource.RUSAGE_SELF), target.spool
        print(f"{threads} threads: {count / seconds:,.0f}/s, "
              f"{count / spool._data_sync._started:.1f} a data sync, "
              f"{count / spool._new_sync._started:.1f} a folder sync, "
              f"user {(after.ru_utime - before.ru_utime) / count * 1000:.2f} ms, "
              f"sys {(after.ru_stime - before.ru_stime) / count * 1000:.2f} ms a message")


def probe_creates(bench: Bench, count: int = 20_000, rounds: int = 4) -> None:
    for number in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF)
        seconds = run.raw_creates(bench.folder / f"creates-{number}", count, 3000)
        system = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before.ru_stime
        print(f"create, write 3 KB, close: {seconds / count * 1e6:.0f} us a file, "
              f"{system / count * 1e6:.0f} us of it system time")


PROBES: dict[str, Callable[[Bench, argparse.Namespace], None]] = {
    "million": lambda bench, args: probe_million(bench, args.window),
    "group-commit": lambda bench, args: probe_group_commit(bench),
    "creates": lambda bench, args: probe_creates(bench),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("probe", choices=sorted(PROBES))
    parser.add_argument("--window", type=int, default=5000,
                        help="million: messages drained in each window (default 5000)")
    args = parser.parse_args()
    bench = Bench(run.FULL, 1, 4)
    try:
        PROBES[args.probe](bench, args)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
