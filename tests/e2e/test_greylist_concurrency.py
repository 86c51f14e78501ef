"""Cross-process exactness of greylisting: real processes deciding the same triplets together.

Several ``python`` processes, each with several threads (and so several database connections),
check one set of triplets at the same instants, phase by phase: their first sightings, a retry
that comes too late (the triplets start over), and the retry after the delay. Whatever the
interleaving, every process must give the same answers a single process would, exactly one
check per triplet may see its first pass (the one that adds the X-Greylist header), the
triplets' first-seen times must be the instants of the first sightings and of the restart, and
the client's auto-whitelist must count one pass in the hour, not one per process. On
PostgreSQL, MariaDB and SQLite (WAL file): the compare-and-set writes of
:mod:`policyd.sql.greylist` (and MariaDB's transaction) must make that hold without any lock
held between statements.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from sqlalchemy import Engine, select

from mailplugins.config.core import DatabaseConfig
from mailplugins.db import schema
from mailplugins.db.engine import make_engine
from mailplugins.db.policy_models import GreylistClient, GreylistEntry
from tests.rig import REPO

pytestmark = pytest.mark.e2e

PROCESSES = 2
THREADS = 4
KEYS = 150
T0 = 1_800_000_000
DELAY = 300
WINDOW = 2 * 86400
LATE = T0 + WINDOW + 100            # first retry too late: the triplets start over
PASS = LATE + DELAY + 5             # the retry after the (new) delay

#: The start of both hammering scripts: arguments, engine, and the outcome tally.
SCRIPT_HEAD = r"""
import json, sys, threading, time
from mailplugins.config.core import DatabaseConfig
from mailplugins.db.engine import make_engine
from policyd.sql.greylist import GreylistTiming, greylist_check, greylist_many

url, start, at, keys, threads = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5])
engine = make_engine(DatabaseConfig(url, pool_size=threads, timeout=30))
timing = GreylistTiming(delay=300, retry_window=2 * 86400, awl_passes=5)
outcomes = {}
errors = []
lock = threading.Lock()
def count(r):
    label = f"{r.status} {r.seconds} {'first' if r.first_pass else ''}".strip()
    with lock:
        outcomes[label] = outcomes.get(label, 0) + 1
"""

#: The end of both: every thread's ``work`` started together, the tally printed.
SCRIPT_TAIL = r"""
workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
for c in [engine.connect() for _ in range(threads)]:  # open the pool before the start line
    c.close()
while time.time() < start:
    time.sleep(0.001)
began = time.time()
for w in workers: w.start()
for w in workers: w.join()
print(json.dumps({"outcomes": outcomes, "errors": errors[:3], "began": began, "ended": time.time()}))
"""

HAMMER = SCRIPT_HEAD + r"""
def work(offset):
    # Every thread checks every triplet, each thread in its own order.
    for n in range(keys):
        key = f"triplet-{(n + offset * 7) % keys}"
        try:
            r = greylist_check(engine, key, "192.0.2.7", at, timing)
        except Exception as exc:
            errors.append(repr(exc))
            continue
        count(r)
""" + SCRIPT_TAIL


def hammer(database_url: str, at: int, script: str = HAMMER) -> dict[str, int]:
    """Every process and thread checks every triplet at ``at``; the outcomes summed."""
    start = time.time() + 5.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, database_url, str(start), str(at), str(KEYS),
             str(THREADS)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )
        for _ in range(PROCESSES)
    ]
    totals: dict[str, int] = {}
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        report = json.loads(out)
        assert report["errors"] == [], report["errors"]
        for label, count in report["outcomes"].items():
            totals[label] = totals.get(label, 0) + count
        spans.append((report["began"], report["ended"]))
    # The processes really ran at the same time (their checks overlapped).
    assert max(b for b, _ in spans) < min(e for _, e in spans), spans
    return totals


def triplets(engine: Engine) -> set[tuple[int, bool]]:
    """(first seen, passed) over every triplet, of which there must be ``KEYS``."""
    with engine.connect() as conn:
        rows = conn.execute(select(GreylistEntry.first_seen, GreylistEntry.passed)).all()
    assert len(rows) == KEYS
    return {(int(first), bool(passed)) for first, passed in rows}


def test_processes_agree_on_first_sightings_restarts_and_first_passes(database_url: str) -> None:
    engine = make_engine(DatabaseConfig(database_url, pool_size=1, timeout=10))
    schema.upgrade(engine)
    checks = PROCESSES * THREADS * KEYS

    # First sightings, all at once: everyone greylists for the whole delay.
    assert hammer(database_url, T0) == {f"greylisted {DELAY}": checks}
    assert triplets(engine) == {(T0, False)}
    # The first retry comes after the retry window: every triplet starts over once, and every
    # check (the one that restarted it and those that saw it restarted) waits the whole delay.
    assert hammer(database_url, LATE) == {f"greylisted {DELAY}": checks}
    assert triplets(engine) == {(LATE, False)}
    # The retry after the delay: all pass, and exactly one check per triplet is its first pass.
    assert hammer(database_url, PASS) == {
        f"passed {PASS - LATE} first": KEYS, f"passed {PASS - LATE}": checks - KEYS}
    assert triplets(engine) == {(LATE, True)}
    # The client passed all the triplets in one hour, from several processes: one pass counted.
    with engine.connect() as conn:
        assert conn.execute(select(GreylistClient.passes)).scalars().all() == [1]
    engine.dispose()


BATCHED = SCRIPT_HEAD + r"""
def work(offset):
    # Every thread checks every triplet, each thread in its own order, 25 to a batch (as
    # policyd's GreylistBatches hands them over), on its own connection in autocommit.
    order = [(n + offset * 7) % keys for n in range(keys)]
    with engine.connect() as conn:
        conn.connection.dbapi_connection.autocommit = True
        for first in range(0, keys, 25):
            sightings = [(f"triplet-{n}", f"198.51.100.{n}", at, timing)
                         for n in order[first:first + 25]]
            for ok, r in greylist_many(conn, sightings):
                if not ok:
                    errors.append(repr(r))
                    continue
                count(r)
        conn.connection.dbapi_connection.autocommit = False
""" + SCRIPT_TAIL


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_processes_batching_on_postgresql_agree_as_checks_one_by_one(database_url: str) -> None:
    """policyd's PostgreSQL batches (:func:`policyd.sql.greylist.greylist_many`: one read,
    one multi-row insert, one multi-row compare-and-set of first passes), from several
    processes and threads with overlapping batches in different orders: the same outcome as
    checks one by one. First-seen times are the instants of the first sightings and of the
    restart, exactly one check per triplet sees its first pass, each client's pass counts
    once, and no batch statement deadlocks or fails."""
    engine = make_engine(DatabaseConfig(database_url, pool_size=1, timeout=10))
    schema.upgrade(engine)
    checks = PROCESSES * THREADS * KEYS

    assert hammer(database_url, T0, BATCHED) == {f"greylisted {DELAY}": checks}
    assert triplets(engine) == {(T0, False)}
    assert hammer(database_url, LATE, BATCHED) == {f"greylisted {DELAY}": checks}
    assert triplets(engine) == {(LATE, False)}
    assert hammer(database_url, PASS, BATCHED) == {
        f"passed {PASS - LATE} first": KEYS, f"passed {PASS - LATE}": checks - KEYS}
    assert triplets(engine) == {(LATE, True)}
    with engine.connect() as conn:
        passes = conn.execute(select(GreylistClient.passes)).scalars().all()
    assert passes == [1] * KEYS
    engine.dispose()
