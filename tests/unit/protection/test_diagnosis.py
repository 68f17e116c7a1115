"""The diagnosis table: debounce, open delay, immediate opening, latching."""

from __future__ import annotations

import pytest

from bms.protection.diagnosis import FAULT_TABLE, FAULTS, Action, Diagnosis, DiagnosisConfig

PERIOD_S = 0.1


def run(diagnosis: Diagnosis, conditions: dict, cycles: int):
    verdict = None
    for _ in range(cycles):
        verdict = diagnosis.update(conditions, PERIOD_S)
    return verdict


def test_every_row_is_unique_and_described():
    ids = [spec.fault_id for spec in FAULT_TABLE]
    assert len(ids) == len(set(ids))
    assert all(spec.description for spec in FAULT_TABLE)


def test_debounce_needs_n_consecutive_cycles():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 2).active == ()
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 1).active == ("cell_voltage_high_msl",)


def test_a_clean_cycle_takes_half_a_count_back():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    run(diagnosis, {"cell_voltage_high_msl": True}, 2)
    run(diagnosis, {"cell_voltage_high_msl": False}, 1)  # 2 -> 1.5
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 1).active == ()  # 2.5
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 1).active == ("cell_voltage_high_msl",)


def test_enough_clean_cycles_forget_an_old_condition():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    run(diagnosis, {"cell_voltage_high_msl": True}, 2)
    run(diagnosis, {"cell_voltage_high_msl": False}, 4)  # back to zero
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 2).active == ()
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 1).active == ("cell_voltage_high_msl",)


def test_unknown_cycles_hold_the_count():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    run(diagnosis, {"cell_voltage_high_msl": True}, 2)
    run(diagnosis, {"cell_voltage_high_msl": None}, 20)  # the cell read NaN: neither way
    assert run(diagnosis, {"cell_voltage_high_msl": True}, 1).active == ("cell_voltage_high_msl",)


def test_a_condition_that_comes_and_goes_still_latches():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=0.5))
    verdicts = []
    for n in range(40):
        verdicts.append(diagnosis.update({"cell_voltage_invalid": n % 2 == 0}, PERIOD_S))
    assert "cell_voltage_invalid" in verdicts[-1].latched
    first_active = next(n for n, v in enumerate(verdicts) if v.active)
    assert first_active == 8  # +1 -0.5 per pair: 1, .5, 1.5, 1, 2, 1.5, 2.5, 2, 3


def test_an_active_fault_clears_only_when_its_count_is_back_at_zero():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=2, open_delay_s=10.0))
    run(diagnosis, {"temp_high_discharge_msl": True}, 2)
    assert run(diagnosis, {"temp_high_discharge_msl": False}, 3).active == (
        "temp_high_discharge_msl",
    )
    assert run(diagnosis, {"temp_high_discharge_msl": False}, 1).active == ()


def test_no_close_from_the_first_cycle_a_condition_is_present():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    verdict = run(diagnosis, {"cell_voltage_high_msl": True}, 1)
    assert verdict.active == () and verdict.no_close
    verdict = run(diagnosis, {"cell_voltage_high_msl": False}, 1)
    assert verdict.no_close  # 0.5 left: not yet clean
    assert not run(diagnosis, {"cell_voltage_high_msl": False}, 1).no_close


def test_open_after_delay_latches_once_active_for_the_delay():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=2, open_delay_s=0.5))
    # active from cycle 2; the delay counts from there: 5 more cycles of 0.1 s
    verdict = run(diagnosis, {"temp_high_discharge_msl": True}, 6)
    assert verdict.active == ("temp_high_discharge_msl",)
    assert verdict.no_close and not verdict.open_now and verdict.latched == ()
    verdict = run(diagnosis, {"temp_high_discharge_msl": True}, 1)
    assert verdict.open_now and verdict.latched == ("temp_high_discharge_msl",)
    assert verdict.newly_latched == ("temp_high_discharge_msl",)
    assert run(diagnosis, {"temp_high_discharge_msl": True}, 1).newly_latched == ()


def test_open_now_latches_as_soon_as_debounced():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=2, open_delay_s=60.0))
    assert not run(diagnosis, {"short_circuit": True}, 1).open_now
    assert run(diagnosis, {"short_circuit": True}, 1).latched == ("short_circuit",)


def test_latch_outlives_the_condition_and_blocks_closing():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=1, open_delay_s=0.0))
    run(diagnosis, {"frontend_timeout": True}, 1)
    verdict = run(diagnosis, {"frontend_timeout": False}, 50)
    assert verdict.active == ()
    assert verdict.latched == ("frontend_timeout",)
    assert verdict.open_now and verdict.no_close


def test_a_condition_cleared_before_the_delay_never_latches():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=1, open_delay_s=0.5))
    run(diagnosis, {"cell_voltage_low_msl": True}, 3)  # active for 0.2 s
    verdict = run(diagnosis, {"cell_voltage_low_msl": False}, 2)  # 1 -> 0: cleared after 0.3 s
    assert verdict.active == () and verdict.latched == () and not verdict.no_close
    # and the delay starts again from zero
    assert run(diagnosis, {"cell_voltage_low_msl": True}, 5).latched == ()
    assert run(diagnosis, {"cell_voltage_low_msl": True}, 1).latched == ("cell_voltage_low_msl",)


@pytest.mark.parametrize(
    "spec",
    [s for s in FAULT_TABLE if s.action >= Action.OPEN_AFTER_DELAY],
    ids=lambda spec: spec.fault_id,
)
def test_every_opening_fault_latches(spec):
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=0.3))
    assert run(diagnosis, {spec.fault_id: True}, 7).latched == (spec.fault_id,)


def test_unknown_condition_is_a_programming_error():
    with pytest.raises(KeyError, match="not in the diagnosis table"):
        Diagnosis(DiagnosisConfig()).update({"cell_voltage_high_msk": True}, PERIOD_S)


def test_faults_mapping_matches_table():
    assert list(FAULTS) == [spec.fault_id for spec in FAULT_TABLE]


def test_a_safety_limit_whose_cause_is_gone_does_not_latch_when_its_delay_ends():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3, open_delay_s=0.5))
    run(diagnosis, {"cell_voltage_high_msl": True}, 3)  # active, delay starts
    verdicts = [diagnosis.update({"cell_voltage_high_msl": False}, PERIOD_S) for _ in range(8)]
    assert all(v.latched == () for v in verdicts)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"short_circuit": {"open_delay_s": 5.0}}, "short_circuit has no open delay to set"),
        ({"loop_stalled": {"debounce_cycles": 50}}, "its debounce is fixed"),
        ({"cell_voltage_high_msl": {"open_delay_s": 600.0}}, "less than or equal to 60"),
        ({"short_circuit": {"debounce_cycles": 1000}}, "less than or equal to 100"),
    ],
)
def test_row_settings_cannot_switch_safety_off(rows, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        DiagnosisConfig(rows=rows)


def test_a_cleared_latch_releases_and_must_be_found_again_to_latch_again():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=2, open_delay_s=0.0))
    for _ in range(3):
        verdict = diagnosis.update({"cell_voltage_high_msl": True}, 0.1)
    assert verdict.latched == ("cell_voltage_high_msl",)
    assert diagnosis.cause_present("cell_voltage_high_msl")
    for _ in range(4):  # the cause went away: the counter drains to zero (0.5 per cycle)
        verdict = diagnosis.update({"cell_voltage_high_msl": False}, 0.1)
    assert not diagnosis.cause_present("cell_voltage_high_msl")
    assert verdict.latched == ("cell_voltage_high_msl",)  # a latch never clears by itself
    diagnosis.clear("cell_voltage_high_msl")
    verdict = diagnosis.update({"cell_voltage_high_msl": True}, 0.1)
    assert verdict.latched == () and verdict.active == ()  # one cycle: not yet again
    verdict = diagnosis.update({"cell_voltage_high_msl": True}, 0.1)
    assert verdict.latched == ("cell_voltage_high_msl",)


def test_clearing_resets_a_counter_the_state_machine_keeps_feeding():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3))
    for _ in range(3):
        verdict = diagnosis.update({"contactor_weld": True}, 0.1)
    assert verdict.latched == ("contactor_weld",)
    diagnosis.clear("contactor_weld")
    assert not diagnosis.cause_present("contactor_weld")
    assert diagnosis.update({}, 0.1).latched == ()


def test_an_unknown_latched_id_has_no_cause_and_clears():
    diagnosis = Diagnosis(DiagnosisConfig(), latched=["from_an_older_version"])
    assert not diagnosis.cause_present("from_an_older_version")
    diagnosis.clear("from_an_older_version")
    assert diagnosis.update({}, 0.1).latched == ()


def test_reconfigured_rows_keep_their_counters_capped_at_the_new_debounce():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=5))
    for _ in range(4):
        diagnosis.update({"temperature_invalid": True}, 0.1)
    diagnosis.reconfigure(DiagnosisConfig(debounce_cycles=3, open_delay_s=10.0))
    verdict = diagnosis.update({"temperature_invalid": True}, 0.1)
    assert "temperature_invalid" in verdict.active  # 3 reached, counted before the reload
    assert verdict.latched == ()  # the new 10 s delay applies


def test_a_latch_restored_at_start_counts_as_present_until_this_run_judges_it_gone():
    diagnosis = Diagnosis(DiagnosisConfig(debounce_cycles=3), latched=["cell_voltage_high_msl"])
    assert diagnosis.cause_present("cell_voltage_high_msl")
    verdict = diagnosis.update({"cell_voltage_high_msl": None}, 0.1)  # cannot be judged
    assert "cell_voltage_high_msl" in verdict.active
    assert diagnosis.cause_present("cell_voltage_high_msl")
    for _ in range(5):  # 3 / 0.5 = 6 clean cycles to drain: one short
        diagnosis.update({"cell_voltage_high_msl": False}, 0.1)
    assert diagnosis.cause_present("cell_voltage_high_msl")
    diagnosis.update({"cell_voltage_high_msl": False}, 0.1)
    assert not diagnosis.cause_present("cell_voltage_high_msl")
