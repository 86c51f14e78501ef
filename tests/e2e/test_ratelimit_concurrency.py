"""Cross-process atomicity of rate limiting: real processes hammering one key together.

Two ``python`` processes, each with several threads (and so several database connections),
count messages against one subject as fast as they can, meeting at a start line and again in
the middle (so their hammering overlaps by construction, not by timing). A
check-then-increment race would let more than the limit through; the transaction in
:func:`policyd.sql.ratelimit.rate_check` must make them admit exactly the limit, together, on
PostgreSQL, MariaDB and SQLite (WAL file).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from mailplugins.config.core import DatabaseConfig
from mailplugins.config.policy_state import Window
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from policyd.sql.overrides import rate_usage
from policyd.sql.ratelimit import RateKey
from tests.rig import REPO

pytestmark = pytest.mark.e2e

LIMIT = 150
PROCESSES = 2
THREADS = 4
ATTEMPTS = 60  # per thread: 2 x 4 x 60 = 480 attempts for 150 admissions

BEFORE = 10  # attempts per thread before the rendezvous: 2 x 4 x 10 = 80, under the limit

# Each process opens its pool, says "ready" and waits for "go"; after every thread has made
# BEFORE attempts it says "mid" and waits again. The parent answers only when both processes
# have spoken, so each one hammers before and after a point where the other is hammering too:
# the overlap is built in and counted, never inferred from clocks.
HAMMER = r"""
import sys, threading
from mailplugins.config.core import DatabaseConfig
from mailplugins.config.policy_state import Window
from mailplugins.db.engine import make_engine
from policyd.sql.ratelimit import RateKey, rate_check

url = sys.argv[1]
now = float(sys.argv[2])
limit, threads, attempts, before = (int(x) for x in sys.argv[3:7])
engine = make_engine(DatabaseConfig(url, pool_size=threads, timeout=30))
key = RateKey("hammer", "bob@example.org", (Window(3600, messages=limit),))
admitted_before = []
admitted = []
errors = []
at_mid = threading.Barrier(threads + 1)
resume = threading.Event()
def attempt():
    try:
        return rate_check(engine, [key], now, messages=1, recipients=1).admitted
    except Exception as exc:
        errors.append(repr(exc))
        return False
def work():
    first = sum(attempt() for _ in range(before))
    admitted_before.append(first)
    at_mid.wait()
    resume.wait()
    admitted.append(first + sum(attempt() for _ in range(attempts - before)))
def step(word):
    print(word, flush=True)
    if sys.stdin.readline().strip() != "go":
        sys.exit("no go from the test")
workers = [threading.Thread(target=work) for _ in range(threads)]
for c in [engine.connect() for _ in range(threads)]:  # open the pool before the start line
    c.close()
step("ready")
for w in workers: w.start()
at_mid.wait()
step("mid")
resume.set()
for w in workers: w.join()
print(sum(admitted_before), sum(admitted), len(errors))
for e in errors[:3]: print(e, file=sys.stderr)
"""


def _all_say(procs: list[subprocess.Popen[str]], word: str) -> None:
    """Wait until every process has printed ``word``, then tell them all to go on."""
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line == word, (line, proc.stderr.read() if proc.stderr else "")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def test_processes_together_admit_exactly_the_limit(database_url: str) -> None:
    engine = make_engine(DatabaseConfig(database_url, pool_size=1, timeout=10))
    schema.upgrade(engine)
    now = 1_800_000_000.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, database_url, str(now), str(LIMIT),
             str(THREADS), str(ATTEMPTS), str(BEFORE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            cwd=REPO,
        )
        for _ in range(PROCESSES)
    ]
    try:
        _all_say(procs, "ready")
        _all_say(procs, "mid")
        totals = []
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err
            before, admitted, errors = (int(x) for x in out.split())
            assert errors == 0, err
            # Under the limit every attempt before the rendezvous is admitted, in both.
            assert before == THREADS * BEFORE, (before, err)
            totals.append(admitted)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # Both processes hammered on both sides of the rendezvous, and together they admitted
    # exactly the limit.
    assert sum(totals) == LIMIT, totals
    key = RateKey("hammer", "bob@example.org", (Window(3600, messages=LIMIT),))
    assert rate_usage(engine, key, now)[0].messages == LIMIT
    engine.dispose()
