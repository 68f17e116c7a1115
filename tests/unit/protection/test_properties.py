"""Properties of protection over random sequences (hypothesis), and every table row's
debounce boundary."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bms.config import load_config
from bms.estimation.cell_params import load_cell_params
from bms.loop import ControlCycle
from bms.protection.diagnosis import FAULT_TABLE, FAULTS, Action, Diagnosis, DiagnosisConfig
from bms.types import ALL_OPEN, ContactorState
from tests.conftest import SIM_CONFIG
from tests.fakes import FakeBox, FakeFrontEnd, FakePublisher

PERIOD_S = 0.1
CONFIG = DiagnosisConfig(debounce_cycles=3, open_delay_s=0.3)


@pytest.mark.parametrize("spec", FAULT_TABLE, ids=lambda spec: spec.fault_id)
def test_every_row_trips_at_its_debounce_and_not_one_cycle_short(spec):
    needed = CONFIG.row(spec.fault_id).debounce_cycles
    diagnosis = Diagnosis(CONFIG)
    for _ in range(needed - 1):
        verdict = diagnosis.update({spec.fault_id: True}, PERIOD_S)
    if needed > 1:
        assert spec.fault_id not in verdict.active
    verdict = diagnosis.update({spec.fault_id: True}, PERIOD_S)
    assert spec.fault_id in verdict.active


@pytest.mark.parametrize(
    "spec",
    [s for s in FAULT_TABLE if s.action is Action.OPEN_AFTER_DELAY],
    ids=lambda spec: spec.fault_id,
)
def test_every_delayed_row_latches_at_its_delay_and_not_one_cycle_short(spec):
    row = CONFIG.row(spec.fault_id)
    cycles = row.debounce_cycles + round(row.open_delay_s / PERIOD_S)
    diagnosis = Diagnosis(CONFIG)
    for _ in range(cycles - 1):
        verdict = diagnosis.update({spec.fault_id: True}, PERIOD_S)
    assert verdict.latched == ()
    assert diagnosis.update({spec.fault_id: True}, PERIOD_S).latched == (spec.fault_id,)


opening_rows = [s.fault_id for s in FAULT_TABLE if s.action >= Action.OPEN_AFTER_DELAY]


@settings(max_examples=200, deadline=None)
@given(
    fault_id=st.sampled_from(opening_rows),
    sequence=st.lists(st.sampled_from([True, False, None]), min_size=1, max_size=120),
)
def test_a_condition_held_past_debounce_and_delay_is_latched_and_stays_latched(fault_id, sequence):
    row = CONFIG.row(fault_id)
    delay_cycles = (
        0 if FAULTS[fault_id].action is Action.OPEN_NOW else round(row.open_delay_s / PERIOD_S)
    )
    must_latch_after = row.debounce_cycles + delay_cycles
    diagnosis = Diagnosis(CONFIG)
    run_length = 0
    latched_before: tuple[str, ...] = ()
    for present in sequence:
        verdict = diagnosis.update({fault_id: present}, PERIOD_S)
        run_length = run_length + 1 if present else (run_length if present is None else 0)
        assert set(latched_before) <= set(verdict.latched), "a latch cleared by itself"
        if run_length >= must_latch_after:
            assert fault_id in verdict.latched
        if verdict.latched:
            assert verdict.open_now and verdict.no_close
        latched_before = verdict.latched


def make_cycle() -> ControlCycle:
    config = load_config(SIM_CONFIG)
    frontend = FakeFrontEnd(config.pack.n_cells, n_temps=config.pack.n_temp_sensors)
    return ControlCycle(
        config,
        load_cell_params(config.pack.cell_params),
        frontend,
        FakeBox(frontend.calls),
        FakePublisher(frontend.calls),
    )


cell_voltages = st.one_of(st.floats(3.0, 4.3), st.just(math.nan))


@settings(max_examples=60, deadline=None)
@given(sequence=st.lists(cell_voltages, min_size=1, max_size=80))
def test_contactors_are_never_closed_past_a_maximum_safety_limit_and_its_delay(sequence):
    cycle = make_cycle()
    config = cycle.config
    msl_v = config.limits.cell_voltage_high_v.msl
    row = config.diagnosis.row("cell_voltage_high_msl")
    must_open_after = row.debounce_cycles + round(row.open_delay_s / PERIOD_S)
    # first close the pack on healthy readings
    for n in range(10):
        cycle.run(n * PERIOD_S, PERIOD_S, lagging=False)
    assert cycle.fsm.state is ContactorState.CLOSED
    over_for = 0
    latched = False
    for n, voltage_v in enumerate(sequence, start=10):
        # every cell together, so only the high-voltage rows (not the spread) can trip
        cycle.frontend.cell_voltage_v = np.full(config.pack.n_cells, voltage_v)
        status = cycle.run(n * PERIOD_S, PERIOD_S, lagging=False)
        over_for = over_for + 1 if voltage_v > msl_v else (over_for if math.isnan(voltage_v) else 0)
        if over_for >= must_open_after:
            assert cycle.contactors.relays == ALL_OPEN
        latched = latched or bool(status.latched_faults)
        if latched:
            assert status.latched_faults and cycle.contactors.relays == ALL_OPEN
            assert status.charge_limit_a == 0.0 and status.discharge_limit_a == 0.0
