"""A kill -9 at any moment of a write never corrupts the store nor loses a committed write.

A child process writes through StateStore as fast as it can: snapshots whose fields all derive
from one counter, and fault-log rows whose fields derive from theirs, printing each counter
once its transaction has committed. The test kills it at a random moment (SIGKILL, during
writes), then checks that the file passes SQLite's integrity check, that the newest snapshot
and every log row are ones that were written (their fields agree with their counter), and that
nothing the child reported as committed is missing.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

from bms.store.state import PackState, StateStore
from tests.conftest import REPO

KILLS = 200

CHILD = r"""
import sys
from bms.store.state import PackState, StateStore

store = StateStore.open(sys.argv[1])
latest = store.latest_state()
n = 0 if latest is None else int(latest.charged_ah) + 1
while True:
    store.write_state(
        PackState(soc=[n * 1e-6, n * 2e-6], soc_std=[0.01, 0.01], soh=[1.0, 1.0],
                  charged_ah=float(n), discharged_ah=2.0 * n, written_utc=f"t{n}")
    )
    if n % 7 == 0:
        store.log_fault(f"fault{n}", f"t{n}", f"row {n}", {"n": n})
    print(n, flush=True)  # the first line tells the parent that writing has begun
    n += 1
"""


def consistent(state: PackState) -> bool:
    n = state.charged_ah
    return (
        state.soc == [n * 1e-6, n * 2e-6]
        and state.discharged_ah == 2.0 * n
        and state.written_utc == f"t{int(n)}"
    )


def test_two_hundred_sigkills_during_writes_never_corrupt_or_lose_a_commit(tmp_path):
    path = tmp_path / "state.sqlite"
    rng = random.Random(7)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    for _ in range(KILLS):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        first = child.stdout.readline()  # writing has begun: every kill lands among writes
        time.sleep(rng.uniform(0.0, 0.02))
        os.kill(child.pid, signal.SIGKILL)
        reported = [first, *child.stdout.read().split()]
        child.stdout.close()
        child.wait()
        assert child.returncode == -signal.SIGKILL
        last_committed = int(reported[-1])

        db = sqlite3.connect(path)
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        store = StateStore.open(path)
        latest = store.latest_state()
        assert latest is not None and consistent(latest)
        assert latest.charged_ah >= last_committed  # nothing acknowledged was lost
        for entry in store.fault_log(limit=10**6):
            n = int(entry.fault_id.removeprefix("fault"))
            assert (entry.latched_utc, entry.description, entry.sample) == (
                f"t{n}",
                f"row {n}",
                {"n": n},
            )
        store.close()
    assert last_committed > KILLS  # each child wrote on from where the last one was killed
    store = StateStore.open(path)
    rows = len(store.fault_log(limit=10**6))
    store.close()
    print(
        f"{KILLS} SIGKILLs: integrity ok after each; {last_committed + 1} snapshots and {rows} "
        "fault-log rows committed, none lost"
    )
