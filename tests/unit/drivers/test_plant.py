"""The simulated pack's physics: charge balance, RC response, heat, precharge, faults."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms.estimation.cell_params import load_cell_params
from bms.types import ALL_OPEN, RelayStates
from drivers.sim.options import SimOptions
from drivers.sim.plant import PackPlant
from tests.conftest import REPO

CELL = load_cell_params(REPO / "models" / "ecm" / "generic_nmc")
R0_25C_OHM = CELL.impedance_at(0.5, 25.0)["r0_ohm"]
CLOSED = RelayStates(True, False, True)
PRECHARGING = RelayStates(True, True, False)
# An ideal pack: every cell nominal, every sensor exact.
IDEAL = SimOptions(
    initial_soc=0.5,
    initial_soc_spread=0.0,
    capacity_spread=0.0,
    resistance_spread=0.0,
    voltage_noise_v=0.0,
    voltage_offset_v=0.0,
    current_noise_a=0.0,
    current_offset_a=0.0,
    temp_noise_c=0.0,
    ambient_temp_c=25.0,
    heat_capacity_j_per_k=70.0,
    cooling_w_per_k=0.1,
    overtemp_heat_w=200.0,
    precharge_resistance_ohm=50.0,
    link_capacitance_f=0.004,
    short_resistance_ohm=0.02,
)


def plant(n_cells=4, **changes) -> PackPlant:
    return PackPlant(CELL, n_cells, n_cells, IDEAL.model_copy(update=changes))


def test_open_contactors_carry_no_current():
    p = plant()
    p.step(1.0, -20.0, ALL_OPEN)
    assert p.current_a == 0.0
    assert p.soc == pytest.approx(0.5)


def test_charge_balance_under_a_closed_load():
    p = plant()
    for _ in range(360):
        p.step(1.0, -10.0, CLOSED)  # 1 Ah out of 5 Ah cells
    assert p.soc == pytest.approx(np.full(4, 0.3), abs=1e-9)


def test_terminal_voltage_sags_then_relaxes_like_an_rc_network():
    p = plant(n_cells=1)
    ocv = float(CELL.ocv_at(0.5))
    p.step(0.001, -10.0, CLOSED)
    instant = float(p.readings().cell_voltage_v[0])
    assert instant == pytest.approx(ocv - 10.0 * R0_25C_OHM, abs=2e-3)  # R0 drop at once
    for _ in range(600):
        p.step(1.0, -10.0, CLOSED)
    loaded = float(p.readings().cell_voltage_v[0])
    assert loaded < instant - 0.1  # the RC pairs charged, plus the SOC fell
    for _ in range(6000):  # ten times the slow RC pair's time constant (R2 C2 = 600 s)
        p.step(1.0, 0.0, ALL_OPEN)
    rested = float(p.readings().cell_voltage_v[0])
    assert rested == pytest.approx(float(CELL.ocv_at(p.soc[0])), abs=1e-3)


def test_cold_cells_have_higher_resistance():
    warm = plant(n_cells=1)
    cold = plant(n_cells=1, ambient_temp_c=0.0)
    for p in (warm, cold):
        p.step(0.001, -10.0, CLOSED)
    warm_drop = float(CELL.ocv_at(0.5)) - float(warm.readings().cell_voltage_v[0])
    cold_drop = float(CELL.ocv_at(0.5)) - float(cold.readings().cell_voltage_v[0])
    assert 2.0 < cold_drop / warm_drop < 3.0


def test_joule_heat_warms_and_ambient_cools():
    p = plant(n_cells=1)
    for _ in range(600):
        p.step(1.0, -30.0, CLOSED)
    assert p.temp_c[0] > 27.0
    for _ in range(10000):
        p.step(1.0, 0.0, ALL_OPEN)
    assert p.temp_c[0] == pytest.approx(25.0, abs=0.1)


def test_precharge_charges_the_link_through_the_resistor():
    p = plant()
    tau_s = IDEAL.precharge_resistance_ohm * IDEAL.link_capacitance_f
    for _ in range(int(3 * tau_s / 0.01)):
        p.step(0.01, -10.0, PRECHARGING)
        assert p.current_a <= 0.0  # precharge current flows out of the pack, not the load
    pack_v = float(p.terminal_voltage_v(p.current_a).sum())
    assert p.link_voltage_v / pack_v == pytest.approx(1 - math.exp(-3), abs=0.02)


def test_short_on_the_link_draws_what_the_resistances_allow():
    p = plant()
    p.faults.short = True
    p.step(0.01, 0.0, CLOSED)
    emf_v = float(CELL.ocv_at(0.5)) * 4
    assert p.current_a == pytest.approx(-emf_v / (4 * R0_25C_OHM + 0.02), rel=0.02)


def test_weld_keeps_the_positive_contactor_closed():
    p = plant()
    p.faults.weld = True
    p.step(0.1, 0.0, CLOSED)
    p.step(0.1, 0.0, ALL_OPEN)
    assert p.relays == RelayStates(False, False, True)


def test_sensor_faults_show_in_readings_only():
    p = plant()
    p.faults.open_wire.add(0)
    p.faults.nan.add(1)
    p.faults.stuck[2] = 3.123
    r = p.readings()
    assert r.cell_voltage_invalid.tolist() == [True, False, False, False]
    assert r.cell_voltage_v[0] == 0.0 and math.isnan(r.cell_voltage_v[1])
    assert r.cell_voltage_v[2] == 3.123
    assert p.soc == pytest.approx(0.5)  # the cells themselves are fine


def test_overtemp_heats_only_its_cell():
    p = plant()
    p.faults.overtemp.add(3)
    for _ in range(10):
        p.step(0.1, 0.0, ALL_OPEN)
    # 200 W into 70 J/K for 1 s
    assert p.temp_c[3] - 25.0 == pytest.approx(200.0 / 70.0, rel=0.05)
    assert p.temp_c[:3] == pytest.approx(25.0)


def test_cells_scatter_around_nominal_reproducibly():
    spread = {"initial_soc_spread": 0.02, "capacity_spread": 0.05, "resistance_spread": 0.1}
    a, b = plant(n_cells=100, seed=7, **spread), plant(n_cells=100, seed=7, **spread)
    assert a.capacity_ah.tolist() == b.capacity_ah.tolist()
    assert np.std(a.capacity_ah / CELL.capacity_ah) == pytest.approx(0.05, rel=0.3)
    assert np.std(a.soc) == pytest.approx(0.02, rel=0.3)
    assert np.std(a.resistance_factor) == pytest.approx(0.1, rel=0.3)


def test_a_bleeding_cell_loses_charge_through_its_resistor():
    p = plant()
    p.bleeding[1] = True
    for _ in range(3600):
        p.step(1.0, 0.0, ALL_OPEN)
    bled_ah = 0.5 * CELL.capacity_ah - p.soc[1] * CELL.capacity_ah
    # about OCV / 33 ohm for an hour: 3.74 V / 33 ohm = 0.113 A
    assert bled_ah == pytest.approx(float(CELL.ocv_at(0.5)) / IDEAL.bleed_resistance_ohm, rel=0.02)
    assert p.soc[[0, 2, 3]] == pytest.approx(0.5)


def test_parallel_cells_share_the_current():
    """Three cells in parallel: a third of the SOC change and of the voltage drop of one cell
    carrying the same current, and a third of its temperature rise."""
    single = PackPlant(CELL, 2, 2, IDEAL)
    triple = PackPlant(CELL, 2, 2, IDEAL, n_parallel=3)
    for plant in (single, triple):
        plant.step(0.1, 0.0, CLOSED)  # close the contactors
    for plant, current_a in ((single, -10.0), (triple, -30.0)):
        for _ in range(100):
            plant.step(0.1, current_a, CLOSED)
    assert triple.soc == pytest.approx(single.soc, abs=1e-9)
    assert triple.terminal_voltage_v(-30.0) == pytest.approx(single.terminal_voltage_v(-10.0))
    assert triple.temp_c == pytest.approx(single.temp_c)
    assert triple.capacity_ah == pytest.approx(3 * single.capacity_ah)
