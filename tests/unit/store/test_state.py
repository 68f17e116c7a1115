"""The SQLite state store and its writer thread."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time

import pytest

from bms.store.state import KEPT_SNAPSHOTS, SCHEMA_VERSION, PackState, StateStore, StoreError
from bms.store.writer import StoreWriter


def state(soc: float, **changes) -> PackState:
    values = dict(soc=[soc, soc + 0.01], soc_std=[0.02, 0.02], soh=[1.0, 0.99])
    values.update(changes)
    return PackState(**values)


def test_a_new_store_has_no_state_and_reads_back_what_was_written(tmp_path):
    store = StateStore.open(tmp_path / "s.sqlite")
    assert store.latest_state() is None
    written = state(0.5, charged_ah=1.5, discharged_wh=20.0, equivalent_full_cycles=0.3)
    store.write_state(written)
    store.close()
    again = StateStore.open(tmp_path / "s.sqlite")
    assert again.latest_state() == written
    mode = sqlite3.connect(tmp_path / "s.sqlite").execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_only_the_newest_snapshots_are_kept(tmp_path):
    store = StateStore.open(tmp_path / "s.sqlite")
    for n in range(KEPT_SNAPSHOTS + 5):
        store.write_state(state(n / 100))
    assert store.latest_state().soc[0] == pytest.approx((KEPT_SNAPSHOTS + 4) / 100)
    (count,) = store._db.execute("SELECT COUNT(*) FROM snapshots").fetchone()
    assert count == KEPT_SNAPSHOTS


def test_the_fault_log_records_latch_and_clear_and_keeps_the_latched_copy(tmp_path):
    store = StateStore.open(tmp_path / "s.sqlite")
    sample = {"cell_voltage_v": [4.3, 3.7], "current_a": -3.0}
    store.log_fault("cell_voltage_high_msl", "2026-12-02T10:00:00+00:00", "too high", sample)
    store.log_fault("short_circuit", "2026-12-02T10:00:01+00:00", "short", {})
    assert set(store.latched()) == {"cell_voltage_high_msl", "short_circuit"}
    store.log_clear("cell_voltage_high_msl", "2026-12-02T11:00:00+00:00", "alice")
    assert set(store.latched()) == {"short_circuit"}
    newest, oldest = store.fault_log()
    assert (newest.fault_id, newest.cleared_by) == ("short_circuit", None)
    assert oldest.fault_id == "cell_voltage_high_msl"
    assert oldest.sample == sample
    assert (oldest.cleared_utc, oldest.cleared_by) == ("2026-12-02T11:00:00+00:00", "alice")


def test_a_corrupt_store_is_moved_aside_and_a_new_one_started(tmp_path, caplog):
    path = tmp_path / "s.sqlite"
    store = StateStore.open(path)
    store.write_state(state(0.7))
    store.close()
    raw = bytearray(path.read_bytes())
    raw[100:4000] = b"\xa5" * 3900  # the header's tail and the schema page
    path.write_bytes(bytes(raw))
    with caplog.at_level(logging.ERROR):
        fresh = StateStore.open(path)
    assert fresh.latest_state() is None
    assert "moved aside" in caplog.text and "OCV" in caplog.text
    (aside,) = tmp_path.glob("s.sqlite.corrupt-*")
    assert aside.read_bytes() == bytes(raw)


def test_a_file_that_is_no_database_is_moved_aside(tmp_path):
    path = tmp_path / "s.sqlite"
    path.write_text("this is not SQLite")
    assert StateStore.open(path).latest_state() is None
    assert len(list(tmp_path.glob("s.sqlite.corrupt-*"))) == 1


def test_a_store_from_a_newer_pybms_is_moved_aside_not_downgraded(tmp_path, caplog):
    path = tmp_path / "s.sqlite"
    StateStore.open(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with caplog.at_level(logging.ERROR):
        StateStore.open(path).close()
    assert "newer than this pybms knows" in caplog.text
    (aside,) = (p for p in tmp_path.glob("s.sqlite.newer-*") if not p.name.endswith(("wal", "shm")))
    assert sqlite3.connect(aside).execute("PRAGMA user_version").fetchone()[0] == 2


def test_an_empty_file_is_migrated_to_the_current_schema(tmp_path):
    path = tmp_path / "s.sqlite"
    path.touch()
    StateStore.open(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    tables = {row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"meta", "snapshots", "fault_log", "latched"} <= tables


def test_a_lock_held_by_another_process_is_a_store_error_not_a_hang(tmp_path):
    path = tmp_path / "s.sqlite"
    store = StateStore.open(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    started = time.monotonic()
    with pytest.raises(StoreError, match="locked"):
        store.write_state(state(0.5))
    assert time.monotonic() - started < 5.0
    other.execute("ROLLBACK")
    store.write_state(state(0.5))


class FlakyStore:
    """Fails its first ``failures`` writes, then records everything in order."""

    def __init__(self, failures: int):
        self.failures = failures
        self.log: list[tuple] = []
        self.closed = False
        self.lock = threading.Lock()

    def _maybe_fail(self):
        with self.lock:
            if self.failures > 0:
                self.failures -= 1
                raise StoreError("disk full")

    def write_state(self, s):
        self._maybe_fail()
        self.log.append(("state", s.soc[0]))

    def log_fault(self, fault_id):
        self._maybe_fail()
        self.log.append(("fault", fault_id))

    def close(self):
        self.closed = True


def wait_for(predicate, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_writer_keeps_records_in_order_and_only_the_newest_state(monkeypatch):
    monkeypatch.setattr("bms.store.writer.RETRY_FIRST_S", 0.01)
    store = FlakyStore(failures=3)
    writer = StoreWriter(store)
    writer.start()
    writer.submit(lambda s: s.log_fault("a"))
    writer.submit_state(state(0.1))
    writer.submit(lambda s: s.log_fault("b"))
    writer.submit_state(state(0.2))  # replaces 0.1 if that was not written yet
    wait_for(lambda: ("state", 0.2) in store.log)
    assert writer.failed is False
    faults = [entry for entry in store.log if entry[0] == "fault"]
    assert faults == [("fault", "a"), ("fault", "b")]  # none lost, none repeated, in order
    writer.close()
    assert store.closed


def test_writer_reports_failure_while_the_disk_refuses_and_recovers(monkeypatch):
    monkeypatch.setattr("bms.store.writer.RETRY_FIRST_S", 0.05)
    store = FlakyStore(failures=10**9)
    writer = StoreWriter(store)
    writer.start()
    writer.submit(lambda s: s.log_fault("a"))
    wait_for(lambda: writer.failed)
    assert store.log == []
    store.failures = 0  # the disk has room again
    wait_for(lambda: store.log == [("fault", "a")])
    wait_for(lambda: not writer.failed)
    writer.close()


def test_a_full_record_queue_drops_the_oldest_and_counts(monkeypatch):
    store = FlakyStore(failures=10**9)
    writer = StoreWriter(store, max_records=3)  # not started: everything queues
    for name in "abcde":
        writer.submit(lambda s, name=name: s.log_fault(name))
    assert writer.dropped_records == 2
    store.failures = 0
    writer.start()
    wait_for(lambda: len(store.log) == 3)
    assert store.log == [("fault", "c"), ("fault", "d"), ("fault", "e")]
    writer.close()
