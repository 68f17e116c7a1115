"""The latch file: atomic replace, unreadable files fail safe, clearing is recorded, locking."""

from __future__ import annotations

import json
import time

import pytest

from bms.protection.diagnosis import Diagnosis, DiagnosisConfig
from bms.store.latches import UNREADABLE, LatchRecord, LatchStore, LatchStoreBusy, LatchWriter

RECORD = LatchRecord("short_circuit", "2026-11-25T01:00:00+00:00", "current above limit")


def test_saved_latches_load_back_and_no_temporary_file_remains(tmp_path):
    store = LatchStore(tmp_path / "state" / "latched.json")
    assert store.load() == {}
    store.save({"short_circuit": RECORD})
    assert store.load() == {"short_circuit": RECORD}
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["latched.json"]


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        '{"version": 99, "latched": []}',
        '{"version": 1, "latched": [{"oops": 1}]}',
        "[]",
    ],
)
def test_an_unreadable_file_is_moved_aside_and_reads_as_a_latched_fault(tmp_path, content):
    store = LatchStore(tmp_path / "latched.json")
    store.path.write_text(content)
    latched = store.load()
    assert list(latched) == [UNREADABLE]
    assert not store.path.exists()
    (aside,) = tmp_path.glob("latched.json.unreadable-*")
    assert aside.read_text() == content


def test_clearing_records_who_and_when_and_keeps_the_rest(tmp_path):
    store = LatchStore(tmp_path / "latched.json")
    other = LatchRecord("cell_voltage_high_msl", RECORD.latched_at_utc, "too high")
    store.save({"short_circuit": RECORD, "cell_voltage_high_msl": other})
    assert store.clear(["short_circuit", "not_latched"]) == ["short_circuit"]
    assert list(store.load()) == ["cell_voltage_high_msl"]
    assert store.clear() == ["cell_voltage_high_msl"]
    history = json.loads(store.path.read_text())["cleared"]
    assert [entry["fault_id"] for entry in history] == ["short_circuit", "cell_voltage_high_msl"]
    assert all(entry["cleared_by"] and entry["cleared_at_utc"] for entry in history)


def test_clearing_is_refused_while_a_bms_holds_the_file(tmp_path):
    running = LatchStore(tmp_path / "latched.json")
    running.acquire()
    try:
        with pytest.raises(LatchStoreBusy, match="held by a running BMS"):
            LatchStore(tmp_path / "latched.json").clear()
    finally:
        running.release()
    assert LatchStore(tmp_path / "latched.json").clear() == []


def test_the_writer_persists_the_newest_set_off_the_caller(tmp_path):
    store = LatchStore(tmp_path / "latched.json")
    writer = LatchWriter(store)
    for n in range(20):
        writer.submit({f"f{k}": LatchRecord(f"f{k}", "t", "d") for k in range(n + 1)})
    writer.close()
    assert len(store.load()) == 20
    assert writer.failures == 0


def test_the_writer_reports_a_disk_that_refuses(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("")
    writer = LatchWriter(LatchStore(blocker / "latched.json"))
    writer.submit({"short_circuit": RECORD})
    deadline = time.monotonic() + 5.0
    while writer.failures == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    writer.close()
    assert writer.failures == 1


def test_latches_from_before_a_restart_open_from_the_first_cycle():
    diagnosis = Diagnosis(DiagnosisConfig(), latched=["short_circuit", "from_a_newer_version"])
    verdict = diagnosis.update({}, 0.1)
    assert verdict.open_now and verdict.no_close
    assert verdict.latched == ("short_circuit", "from_a_newer_version")
