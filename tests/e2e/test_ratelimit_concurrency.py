"""Cross-process atomicity of rate limiting: real processes hammering one key together.

Two ``python`` processes, each with several threads (and so several database connections),
count messages against one subject as fast as they can, all starting at the same instant. A
check-then-increment race would let more than the limit through; the transaction in
:func:`policyd.sql.ratelimit.rate_check` must make them admit exactly the limit, together, on
PostgreSQL, MariaDB and SQLite (WAL file).
"""

from __future__ import annotations

import subprocess
import sys
import time

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

HAMMER = r"""
import sys, threading, time
from mailplugins.config.core import DatabaseConfig
from mailplugins.config.policy_state import Window
from mailplugins.db.engine import make_engine
from policyd.sql.ratelimit import RateKey, rate_check

url = sys.argv[1]
start, now = float(sys.argv[2]), float(sys.argv[3])
limit, threads, attempts = (int(x) for x in sys.argv[4:7])
engine = make_engine(DatabaseConfig(url, pool_size=threads, timeout=30))
key = RateKey("hammer", "bob@example.org", (Window(3600, messages=limit),))
admitted = []
errors = []
def work():
    mine = 0
    for _ in range(attempts):
        try:
            if rate_check(engine, [key], now, messages=1, recipients=1).admitted:
                mine += 1
        except Exception as exc:
            errors.append(repr(exc))
    admitted.append(mine)
workers = [threading.Thread(target=work) for _ in range(threads)]
for c in (engine.connect() for _ in range(threads)):  # open the pool before the start line
    c.close()
while time.time() < start:
    time.sleep(0.001)
began = time.time()
for w in workers: w.start()
for w in workers: w.join()
print(sum(admitted), len(errors), began, time.time())
for e in errors[:3]: print(e, file=sys.stderr)
"""


def test_processes_together_admit_exactly_the_limit(database_url: str) -> None:
    engine = make_engine(DatabaseConfig(database_url, pool_size=1, timeout=10))
    schema.upgrade(engine)
    now = 1_800_000_000.0
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", HAMMER, database_url, str(start), str(now), str(LIMIT),
             str(THREADS), str(ATTEMPTS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for _ in range(PROCESSES)
    ]
    totals = []
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        admitted, errors, began, ended = out.split()
        assert int(errors) == 0, err
        totals.append(int(admitted))
        spans.append((float(began), float(ended)))
    # The processes really ran at the same time (their hammering overlapped) ...
    assert max(b for b, _ in spans) < min(e for _, e in spans), spans
    # ... and together admitted exactly the limit.
    assert sum(totals) == LIMIT, totals
    key = RateKey("hammer", "bob@example.org", (Window(3600, messages=LIMIT),))
    assert rate_usage(engine, key, now)[0].messages == LIMIT
    engine.dispose()
