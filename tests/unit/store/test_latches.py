"""The latch file: atomic replace, unusable files fail safe and stay so, clearing, locking."""

from __future__ import annotations

import json

import pytest

from bms.protection.diagnosis import Diagnosis, DiagnosisConfig
from bms.store.latches import UNREADABLE, LatchRecord, LatchStore, LatchStoreBusy

RECORD = LatchRecord(
    fault_id="short_circuit",
    latched_at_utc="2026-11-25T01:00:00+00:00",
    description="current above limit",
)


def test_saved_latches_load_back_and_no_temporary_file_remains(tmp_path):
    store = LatchStore(tmp_path / "state" / "latched.json")
    assert store.load() == {}
    store.save({"short_circuit": RECORD})
    assert store.load() == {"short_circuit": RECORD}
    assert sorted(p.name for p in store.path.parent.iterdir()) == ["latched.json"]


UNUSABLE = [
    "{not json",
    '{"version": 99, "latched": [], "cleared": []}',
    '{"version": 1, "latched": [{"oops": 1}], "cleared": []}',
    '{"version": 1, "latched": [], "cleared": null}',
    '{"version": 1, "latched": [{"fault_id": ["x"], "latched_at_utc": "t", '
    '"description": "d"}], "cleared": []}',
    '{"version": 1, "latched": [{"fault_id": 5, "latched_at_utc": "t", "description": "d"}],'
    ' "cleared": []}',
    "[]",
]


@pytest.mark.parametrize("content", UNUSABLE)
def test_an_unusable_file_reads_as_a_latched_fault_and_reading_changes_nothing(tmp_path, content):
    store = LatchStore(tmp_path / "latched.json")
    store.path.write_text(content)
    assert list(store.load()) == [UNREADABLE]
    assert list(store.load()) == [UNREADABLE]
    assert store.path.read_text() == content


@pytest.mark.parametrize("content", UNUSABLE)
def test_a_start_keeps_a_copy_and_writes_the_unreadable_latch_back(tmp_path, content):
    store = LatchStore(tmp_path / "latched.json")
    store.path.write_text(content)
    assert list(store.open_for_run()) == [UNREADABLE]
    (aside,) = tmp_path.glob("latched.json.unreadable-*")
    assert aside.read_text() == content
    # the next start (or `bms faults`) still finds it latched, now in a readable file
    assert list(LatchStore(store.path).load()) == [UNREADABLE]
    assert json.loads(store.path.read_text())["latched"][0]["fault_id"] == UNREADABLE


def test_clearing_records_who_and_when_and_keeps_the_rest(tmp_path):
    store = LatchStore(tmp_path / "latched.json")
    other = LatchRecord(fault_id="cell_voltage_high_msl", latched_at_utc="t", description="d")
    store.save({"short_circuit": RECORD, "cell_voltage_high_msl": other})
    with pytest.raises(KeyError, match="not latched: not_latched"):
        store.clear(["short_circuit", "not_latched"])
    assert store.clear(["short_circuit"]) == ["short_circuit"]
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


def test_latches_from_before_a_restart_open_from_the_first_cycle():
    diagnosis = Diagnosis(DiagnosisConfig(), latched=["short_circuit", "from_a_newer_version"])
    verdict = diagnosis.update({}, 0.1)
    assert verdict.open_now and verdict.no_close
    assert verdict.latched == ("short_circuit", "from_a_newer_version")
