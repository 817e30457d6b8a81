#!/usr/bin/env python3
"""Mutation testing of sysmail.py's critical sections with mutmut (issue 15).

How to run (not part of CI; it takes long):

    python3 -m pip install 'mutmut==3.8.1'        # the version this script is written for
    python3 tools/mutation.py --fresh               # every section from scratch
    python3 tools/mutation.py --section dkim        # one section (names: SECTIONS below)
    python3 tools/mutation.py --survivors           # rerun only what was not killed last time
    python3 tools/mutation.py --survivors --killers-only   # ... against the killers file alone
    python3 tools/mutation.py --survivors --tests tests/test_faults.py  # ... against one file
    python3 tools/mutation.py --report [--diff]     # print the last results (and survivor diffs)

How long, on this project's 2-core machine with --children 2: about 2 minutes for dkim, 5 for
token-store, 3 each for http-auth, idempotency and rate-limits, 15 for redis-queue, 40 for
settle-retry and 60 for spool (~2 h 10 min in all, more when other tests share the machine).
Killed mutants cost a second or two each; the time goes to the survivors, which run every
test that reaches their function. A --survivors --killers-only pass takes minutes.

mutmut 3 mutates the whole file and puts every mutant behind a "trampoline", in a copy of the
repository under WORKDIR/<section>/mutants (WORKDIR defaults to /tmp/sysmail-mutation; the
repository itself is never written). For each section this script:

1. copies sysmail.py, tests/, bench/, tools/ and the project files into WORKDIR/<section> and
   adds a [tool.mutmut] table to the copy's pyproject.toml (the repository's own file is not
   touched): the section's test files (TESTS below) plus tests/test_mutation_killers.py;
2. runs `mutmut run` on only the mutants of that section (SECTIONS: mutant name globs,
   mutmut's own selection), with at most --children (default and maximum 2) forked workers.
   mutmut first runs the tests once to learn which tests reach which function, then runs, per
   mutant, only those tests (fastest first, -x). Tests that start `sysmail.py` in a subprocess
   run the mutated copy too (REPO in tests/conftest.py resolves inside mutants/, and the
   subprocess inherits MUTANT_UNDER_TEST), but a function reached *only* from a subprocess is
   not associated with that test by mutmut, so such a test does not run for its mutants;
3. keeps the section's verdicts in WORKDIR/<section>/results.json (--survivors merges the new
   verdicts of the rerun mutants into it), and prints per section the mutants, killed,
   survived, timeout and no-tests counts and the score ((killed + timeout) / mutants), the
   overall score, and each mutant not killed.

A second run in the same WORKDIR reuses mutmut's results and only tests what changed; pass
--fresh to start over. The survivors, why each is harmless or which test now kills it:
tools/mutation-report.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

MUTMUT_VERSION = "3.8.1"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_WORKDIR = Path("/tmp/sysmail-mutation")
COPIED = ("sysmail.py", "tests", "bench", "tools", "sysmail.service", "pyproject.toml",
          "requirements.txt", "requirements-test.txt", "README.md", "LICENSE")

# Section -> mutmut mutant-name globs (module "sysmail"; "xǁClassǁmethod" for methods,
# "x_function" for module functions; mutmut appends "__mutmut_N").
SEP = "\u01c1"


def _method(cls: str, name: str = "*") -> str:
    return f"sysmail.x{SEP}{cls}{SEP}{name}__mutmut_*" if name != "*" else f"sysmail.x{SEP}{cls}{SEP}*"


def _function(name: str) -> str:
    return f"sysmail.x_{name}__mutmut_*"


SECTIONS: dict[str, list[str]] = {
    "spool": [_method("Spool"), _method("_DueIndex"), _method("_GroupSync"),
              _function("_sync_files"), _function("_write_synced"),
              _function("_write_file_atomically"), _function("_move_no_replace"),
              _function("_fsync_dir"), _function("_owner_alive"), _function("_parse_entry")],
    "settle-retry": [_method("_Settler"), _method("Sender", "_deliver"),
                     _method("Sender", "_content"), _method("RetryPolicy"),
                     _function("classify_reply")],
    "redis-queue": [_method("RedisQueue")],
    "token-store": [_method("SqliteStore"), _method("MemoryStore"), _function("hash_password"),
                    _function("verify_password"), _function("token_hash")],
    "http-auth": [_method("Api", "_authorize"), _function("client_address")],
    "idempotency": [_method("IdempotencyKeys")],
    "rate-limits": [_method("RateLimiter"), _method("RedisRateLimiter")],
    "dkim": [_method("DkimSigner"), _function("_relaxed"), _function("_compress_blanks")],
}

# The tests each section's mutants are run against: the files that test that section, and the
# killers written for issue 15. mutmut runs, per mutant, only those of them that reach the
# mutated function in-process, fastest first, stopping at the first failure.
KILLERS = "tests/test_mutation_killers.py"
# Tests to leave out of the mutation runs: time bounds that the trampolined copy of
# sysmail.py cannot meet (every call goes through mutmut's trampoline: the copy runs about 7x
# slower, so mutmut's first pass fails on the bound and the run stops). A wake-up latency
# (also checked by test_faults' wake-up tests), and `serve` stopping within 5 s of SIGTERM
# (0.8 s here, 5.9 s in the copy); these run sysmail only in a subprocess, so mutmut never
# runs them for a mutant anyway.
DESELECTED: tuple[str, ...] = (
    ("tests/test_spool_and_crashes.py::"
     "test_an_idle_worker_wakes_at_once_when_another_process_queues_mail"),
    "tests/test_http_api.py::test_tokens_never_reach_the_log",
    "tests/test_http_api.py::test_signal_while_idle_exits_0",
    "tests/test_http_api.py::test_sigterm_lets_a_request_in_flight_finish",
)
TESTS: dict[str, list[str]] = {
    "spool": ["tests/test_spool_and_crashes.py", "tests/test_queue_contract.py",
              "tests/test_durability_syscalls.py", "tests/test_batch_and_group_commit.py",
              "tests/test_spool_operations.py", "tests/test_spool_promises.py"],
    "settle-retry": ["tests/test_delivery.py", "tests/test_relays.py", "tests/test_faults.py",
                     "tests/test_bounce_suppression.py", "tests/test_suppression.py",
                     "tests/test_bounces.py"],
    "redis-queue": ["tests/test_redis_fallback.py", "tests/test_queue_contract.py",
                    "tests/test_relays.py", "tests/test_faults.py"],
    "token-store": ["tests/test_token_store.py", "tests/test_store_config.py"],
    "http-auth": ["tests/test_http_api.py"],
    "idempotency": ["tests/test_http_api.py", "tests/test_timing_and_expiry.py"],
    "rate-limits": ["tests/test_timing_and_expiry.py", "tests/test_http_api.py",
                    "tests/test_redis_fallback.py"],
    "dkim": ["tests/test_signing.py"],
}

MUTMUT_CONFIG = """
[tool.mutmut]
source_paths = ["sysmail.py"]
also_copy = ["bench", "tools", "sysmail.service", "requirements.txt", "requirements-test.txt",
             "README.md", "LICENSE"]
pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:benchmark", {deselected}]
pytest_add_cli_args_test_selection = [{tests}]
timeout_multiplier = 3.0
timeout_constant = 10.0
use_git_change_detection = false
"""

# mutmut's exit-code meanings (mutmut.stats.status_by_exit_code), kept here so --report needs
# nothing but the .meta file.
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped",
          36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout",
          -11: "segfault", -9: "segfault", None: "not checked"}


def _prepare(workdir: Path, section: str, fresh: bool, killers_only: bool = False,
             only: list[str] | None = None) -> None:
    if fresh and workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        source = REPO / name
        target = workdir / name
        if source.is_dir():
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        elif source.exists():
            shutil.copy2(source, target)
    tests = [*([] if killers_only else only or TESTS[section]),
             *([KILLERS] if (REPO / KILLERS).exists() else [])]
    pyproject = workdir / "pyproject.toml"
    pyproject.write_text(pyproject.read_text() + MUTMUT_CONFIG.format(
        tests=", ".join(f'"{t}"' for t in tests),
        deselected=", ".join(f'"--deselect={t}"' for t in DESELECTED)))


def _check_mutmut() -> None:
    try:
        from importlib.metadata import version
        found = version("mutmut")
    except Exception:  # noqa: BLE001 - not installed
        found = None
    if found != MUTMUT_VERSION:
        sys.exit(f"needs mutmut {MUTMUT_VERSION} (found {found}): "
                 f"python3 -m pip install 'mutmut=={MUTMUT_VERSION}'")


def _meta_codes(workdir: Path, section: str) -> dict[str, int | None]:
    meta = workdir / section / "mutants" / "sysmail.py.meta"
    if not meta.exists():
        return {}
    codes = json.loads(meta.read_text())["exit_code_by_key"]
    return {name: code for name, code in codes.items() if _section_of(name) == section}


def _results(workdir: Path, section: str) -> dict[str, int | None]:
    """The section's verdicts: results.json (kept across --survivors reruns), else mutmut's."""
    kept = workdir / section / "results.json"
    return json.loads(kept.read_text()) if kept.exists() else _meta_codes(workdir, section)


def _section_of(name: str) -> str | None:
    for section, patterns in SECTIONS.items():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            return section
    return None


def report(workdir: Path, sections: list[str], diff: bool) -> float:
    """Print the per-section table and the survivors; return the overall score in percent."""
    keys = ("mutants", "killed", "survived", "timeout", "no tests", "other")
    rows = {section: dict.fromkeys(keys, 0) for section in sections}
    survivors: list[tuple[str, str, str]] = []
    for section in sections:
        for name, code in sorted(_results(workdir, section).items(), key=_natural):
            status = STATUS.get(code, "suspicious")
            row = rows[section]
            row["mutants"] += 1
            row[status if status in row else "other"] += 1
            if status not in ("killed", "timeout"):
                survivors.append((section, name, status))
    total = {key: sum(row[key] for row in rows.values()) for key in keys}
    print(f"{'section':14} {'mutants':>7} {'killed':>7} {'survived':>8} {'timeout':>7} "
          f"{'no tests':>8} {'other':>5} {'score':>7}")
    for section, row in [*rows.items(), ("TOTAL", total)]:
        print(f"{section:14} {row['mutants']:7} {row['killed']:7} {row['survived']:8} "
              f"{row['timeout']:7} {row['no tests']:8} {row['other']:5} {_score(row):6.1f}%")
    print()
    for section, name, status in survivors:
        print(f"survivor [{section}] {name} ({status})")
        if diff:
            shown = subprocess.run([sys.executable, "-m", "mutmut", "show", name],
                                   cwd=workdir / section, capture_output=True, text=True,
                                   check=False)
            print(shown.stdout)
    return _score(total)


def _score(row: dict[str, int]) -> float:
    """Killed (a timeout counts as killed, as mutmut counts it) over all mutants, in percent."""
    return 100.0 * (row["killed"] + row["timeout"]) / row["mutants"] if row["mutants"] else 0.0


def _natural(item: tuple[str, object]) -> tuple[str, int]:
    head, _, number = item[0].rpartition("__mutmut_")
    return head, int(number) if number.isdigit() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--section", action="append", choices=sorted(SECTIONS),
                        help="only this section (repeatable); default: all")
    parser.add_argument("--children", type=int, default=2, help="parallel test workers (max 2)")
    parser.add_argument("--fresh", action="store_true", help="discard earlier results")
    parser.add_argument("--report", action="store_true", help="only print the last results")
    parser.add_argument("--diff", action="store_true", help="show each survivor's diff")
    parser.add_argument("--survivors", action="store_true",
                        help="rerun only the mutants not killed last time, timeouts and those "
                             "not run included (with the tests as they are now), and merge their "
                             "new verdicts into the old ones")
    parser.add_argument("--killers-only", action="store_true",
                        help=f"with --survivors: run them against {KILLERS} alone (the "
                             "section's other tests let them survive already)")
    parser.add_argument("--tests", action="append", metavar="FILE",
                        help="with --survivors: run them against this test file (repeatable) "
                             f"and {KILLERS} instead of the section's files (e.g. a file "
                             "added to TESTS since the last run)")
    args = parser.parse_args()
    sections = args.section or list(SECTIONS)
    workdir = args.workdir.resolve()
    if not args.report:
        _check_mutmut()
        for section in sections:
            print(f"== {section}", flush=True)
            before = {} if args.fresh else _results(workdir, section)
            names = [name for name, code in before.items()
                     if STATUS.get(code) != "killed"]  # a timeout is checked again
            if args.survivors and not names:
                continue
            _prepare(workdir / section, section, args.fresh,
                     killers_only=args.survivors and args.killers_only, only=args.tests)
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
            subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children",
                            str(max(1, min(args.children, 2))),
                            *(names if args.survivors else SECTIONS[section])],
                           cwd=workdir / section, env=env, check=False)
            after = _meta_codes(workdir, section)
            if args.survivors:
                after = {**before, **{name: after.get(name) for name in names}}
            (workdir / section / "results.json").write_text(json.dumps(after, indent=0))
    score = report(workdir, sections, args.diff)
    print(f"\noverall score over {', '.join(sections)}: {score:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
