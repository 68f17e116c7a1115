"""The BQ76952 front-end built from a real config over the emulated chips.

The poller runs on its own thread against the emulators, so these tests wait for a
condition with a generous deadline instead of sleeping a fixed time; none asserts on speed.
"""

from __future__ import annotations

import errno
import logging
import math
import struct
import time

import numpy as np
import pytest

from bms.backends import FrontEndError, load
from bms.config import ConfigError, load_config
from bms.estimation.cell_params import load_cell_params
from bms.loop import ControlCycle
from bms.types import ALL_OPEN, CELL_VOLTAGE_GROUP, PACK_GROUP, TEMPERATURE_GROUP
from drivers.i2c.bus import I2cIdentityError, I2cNackError
from drivers.i2c.frontend import Bq76952FrontEnd, Bq76952Options
from tests.emulators.bq76952 import DM_CC_GAIN, DM_VCELL_MODE, Bq76952Emulator
from tests.emulators.ina228 import RESET, Ina228Emulator
from tests.emulators.smbus import EmulatedBus
from tests.fakes import FakeBox, FakePublisher

DEADLINE_S = 5.0
LOW, HIGH = 0x08, 0x09


def two_chips(**frontend):
    """16 cells on two chips of 8 (inputs 1..8 each), an INA228 for the current."""
    options = {
        "backend": "bq76952",
        "bus": 2,
        "chips": [
            {"address": LOW, "cell_inputs": list(range(1, 9)), "thermistors": ["ts1"]},
            {"address": HIGH, "cell_inputs": list(range(1, 9)), "thermistors": ["ts1", "ts3"]},
        ],
        "ina228": {"shunt_resistance_ohm": 0.0005, "max_current_a": 150.0},
        "link_voltage": "pack_pin",
        "link_voltage_chip": 1,
        "poll_period_s": 0.02,
        "balancing_timeout_s": 0.3,
    }
    options.update(frontend)
    return {"pack": {"n_cells": 16, "n_temp_sensors": 3}, "frontend": options}


def one_chip(**frontend):
    """16 cells on one chip, its CC2 for the current (1 mA userA: up to 32.767 A, so the
    short-circuit current is set below that)."""
    options = {
        "backend": "bq76952",
        "chips": [{"address": LOW, "thermistors": ["ts1", "ts3"]}],
        "poll_period_s": 0.02,
    }
    options.update(frontend)
    return {
        "pack": {"n_cells": 16, "n_temp_sensors": 2},
        "protection": {"short_circuit_current_a": 32.0},
        "frontend": options,
    }


class Rig:
    """Emulated chips on one emulated bus, and the front-end over them."""

    def __init__(self, make_config, changes, **chips):
        self.config = load_config(make_config(changes))
        self.chips = chips
        self.bus = EmulatedBus(dict(chips.values() and {c.address: c for c in chips.values()}))
        self.opened: list[int] = []
        self.frontend: Bq76952FrontEnd | None = None

    def open(self) -> Bq76952FrontEnd:
        def factory(number: int) -> EmulatedBus:
            self.opened.append(number)
            return self.bus

        self.frontend = self.config.frontend.cls(
            self.config, self.config.frontend.options, bus_factory=factory
        )
        return self.frontend

    def read(self):
        return self.frontend.read(time.monotonic())

    def wait(self, predicate, what: str):
        deadline = time.monotonic() + DEADLINE_S
        while time.monotonic() < deadline:
            m = self.read()
            if predicate(m):
                return m
            time.sleep(0.01)
        raise AssertionError(f"timed out waiting for {what}; last: {self.read()}")


@pytest.fixture
def rigs():
    opened = []
    yield opened
    for rig in opened:
        if rig.frontend is not None:
            rig.frontend.close()


@pytest.fixture
def rig2(make_config, rigs):
    low, high = Bq76952Emulator(LOW), Bq76952Emulator(HIGH)
    low.cell_voltage_v[:] = [3.50 + 0.01 * i for i in range(8)] + [0.0] * 8
    high.cell_voltage_v[:] = [3.60 + 0.01 * i for i in range(8)] + [0.0] * 8
    low.temp_c["ts1"], high.temp_c["ts1"], high.temp_c["ts3"] = 21.0, 22.0, 23.0
    ina = Ina228Emulator(shunt_resistance_ohm=0.0005)
    rig = Rig(make_config, two_chips(), low=low, high=high, ina=ina)
    rigs.append(rig)
    return rig


@pytest.fixture
def rig1(make_config, rigs):
    chip = Bq76952Emulator(LOW)
    rig = Rig(make_config, one_chip(), chip=chip)
    rigs.append(rig)
    return rig


def fresh(m) -> bool:
    return not m.stale_groups and not np.isnan(m.cell_voltage_v).any()


def test_the_entry_point_finds_the_front_end():
    assert load("bms.frontends", "bq76952") is Bq76952FrontEnd


def test_a_measurement_from_two_chips_and_a_shunt(rig2):
    low, high, ina = rig2.chips["low"], rig2.chips["high"], rig2.chips["ina"]
    ina.current_a = 25.0  # charging
    low.current_a = 24.9  # the chip's own CC2 on the same current
    high.pack_pin_v = 28.0  # the DC link, seen by the upper chip against its VSS
    rig2.open()
    assert rig2.opened == [2]
    m = rig2.wait(fresh, "a complete sample")
    expected_cells = [3.50 + 0.01 * i for i in range(8)] + [3.60 + 0.01 * i for i in range(8)]
    assert m.cell_voltage_v == pytest.approx(expected_cells, abs=0.5e-3)
    assert m.cell_temp_c == pytest.approx([21.0, 22.0, 23.0], abs=0.06)
    assert m.current_a == pytest.approx(25.0, abs=2e-3)
    assert m.redundant_current_a == pytest.approx(24.9, abs=1e-3)
    low_stack = sum(expected_cells[:8])
    # userV is 10 mV: each chip's stack is rounded to it
    assert m.pack_voltage_v == pytest.approx(sum(expected_cells), abs=0.011)
    assert m.link_voltage_v == pytest.approx(28.0 + low_stack, abs=0.011)
    assert m.frontend_faults == () and m.frame_errors == 0
    assert low.dm_get(0x9304, 2) == (0x00FF).to_bytes(2, "little")  # Vcell Mode written
    ina.current_a = -30.0  # discharging
    low.current_a = -30.0
    m = rig2.wait(lambda m: m.current_a < 0, "a discharge current")
    assert m.current_a == pytest.approx(-30.0, abs=2e-3)
    assert m.redundant_current_a == pytest.approx(-30.0, abs=1e-3)
    low.current_a = -40.0  # beyond CC2's 16 bits of 1 mA: it saturates at -32.768 A
    m = rig2.wait(lambda m: math.isnan(m.redundant_current_a), "a saturated CC2")
    assert m.current_a == pytest.approx(-30.0, abs=2e-3)  # a saturated reading is no reading
    assert PACK_GROUP not in m.stale_groups  # the chip answered: NaN now, not old


def test_cc2_alone_is_the_pack_current(rig1):
    chip = rig1.chips["chip"]
    chip.current_a = -7.5
    rig1.open()
    m = rig1.wait(fresh, "a complete sample")
    assert m.current_a == pytest.approx(-7.5, abs=1e-3)
    assert math.isnan(m.redundant_current_a)
    assert m.pack_voltage_v == pytest.approx(16 * 3.7, abs=0.011)


def test_the_ina228_bus_voltage_can_be_the_link_voltage(make_config, rigs):
    chip, ina = Bq76952Emulator(LOW), Ina228Emulator(shunt_resistance_ohm=0.0005)
    ina.bus_voltage_v = 57.3
    changes = one_chip(
        ina228={"shunt_resistance_ohm": 0.0005, "max_current_a": 150.0},
        cc2=False,
        link_voltage="ina228_bus",
    )
    rig = Rig(make_config, changes, chip=chip, ina=ina)
    rigs.append(rig)
    rig.open()
    m = rig.wait(fresh, "a complete sample")
    assert m.link_voltage_v == pytest.approx(57.3, abs=1e-3)
    assert math.isnan(m.redundant_current_a)


def test_silence_makes_every_group_stale_and_nan(rig1):
    rig1.open()
    rig1.wait(fresh, "a complete sample")
    rig1.chips["chip"].silence()
    m = rig1.wait(
        lambda m: {CELL_VOLTAGE_GROUP, TEMPERATURE_GROUP, PACK_GROUP} <= set(m.stale_groups),
        "every group stale",
    )
    assert np.isnan(m.cell_voltage_v).all() and np.isnan(m.cell_temp_c).all()
    assert math.isnan(m.current_a) and math.isnan(m.pack_voltage_v)
    assert m.frame_errors > 0
    rig1.chips["chip"].silence(None)
    rig1.wait(fresh, "recovery")


def test_silence_is_logged_once_not_once_per_poll(rig1, caplog):
    rig1.open()
    rig1.wait(fresh, "a complete sample")
    with caplog.at_level(logging.WARNING, logger="drivers.i2c.frontend"):
        rig1.chips["chip"].silence()
        rig1.wait(lambda m: m.frame_errors > 40, "many failed transfers")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "NACK" in warnings[0].getMessage()


def test_a_nack_makes_the_values_nan_at_once_not_old(make_config, rigs):
    chip = Bq76952Emulator(LOW)
    rig = Rig(make_config, one_chip(cell_voltage_timeout_s=30.0), chip=chip)
    rigs.append(rig)
    rig.open()
    rig.wait(fresh, "a complete sample")
    chip.nack_next(10**9, register=0x14)  # every cell-voltage read fails from now on
    m = rig.wait(lambda m: np.isnan(m.cell_voltage_v).all(), "NaN cells")
    assert CELL_VOLTAGE_GROUP not in m.stale_groups  # well within its 30 s timeout
    assert not math.isnan(m.current_a)  # the other reads still work
    chip.nack_next(0)
    m = rig.wait(fresh, "recovery")
    assert m.cell_voltage_v == pytest.approx(np.full(16, 3.7))


def test_a_crc_error_makes_the_values_nan_until_the_bus_is_clean(make_config, rigs):
    chip = Bq76952Emulator(LOW)
    rig = Rig(make_config, one_chip(crc=True, cell_voltage_timeout_s=30.0), chip=chip)
    rigs.append(rig)
    rig.open()
    assert chip.crc_mode  # switched at start
    rig.wait(fresh, "a complete sample")
    chip.flip_next_read(count=10**9, register=0x14, byte_index=5, mask=0x80)
    m = rig.wait(lambda m: np.isnan(m.cell_voltage_v).all(), "NaN cells")
    assert CELL_VOLTAGE_GROUP not in m.stale_groups
    assert m.frame_errors > 0  # counted as an I2C error
    assert not math.isnan(m.current_a)  # the other reads still work
    chip.flip_next_read(count=0)
    rig.wait(fresh, "recovery")


def test_a_safety_fault_becomes_a_front_end_fault(rig1):
    chip = rig1.chips["chip"]
    rig1.open()
    rig1.wait(fresh, "a complete sample")
    chip.safety_alert = [1 << 3, 0, 0]  # a COV alert alone is not a fault yet
    time.sleep(0.1)
    assert rig1.read().frontend_faults == ()
    chip.safety_status = [1 << 3, 1 << 5, 0]  # COV, OTD
    m = rig1.wait(lambda m: len(m.frontend_faults) == 2, "two faults")
    assert set(m.frontend_faults) == {"frontend_cell_overvoltage", "frontend_overtemperature"}
    chip.permanent_fail = True
    m = rig1.wait(lambda m: "frontend_permanent_fail" in m.frontend_faults, "the PF flag")
    chip.safety_status, chip.permanent_fail = [0, 0, 0], False
    rig1.wait(lambda m: m.frontend_faults == (), "the faults gone")


def test_balancing_masks_reach_the_chips_and_stop_on_timeout(rig2):
    low, high = rig2.chips["low"], rig2.chips["high"]
    frontend = rig2.open()
    assert low.cb_active == 0 and high.cb_active == 0
    mask = np.zeros(16, dtype=bool)
    mask[[0, 2, 9, 15]] = True  # chip LOW inputs 1 and 3; chip HIGH inputs 2 and 8
    deadline = time.monotonic() + DEADLINE_S
    while (low.cb_active, high.cb_active) != (0b101, 0b1000_0010):
        assert time.monotonic() < deadline, (hex(low.cb_active), hex(high.cb_active))
        frontend.balance(mask)  # as the loop does, every cycle
        time.sleep(0.02)
    # no command for longer than balancing_timeout_s (0.3 s): bleeding stops
    deadline = time.monotonic() + DEADLINE_S
    while low.cb_active or high.cb_active:
        assert time.monotonic() < deadline, "balancing did not stop"
        time.sleep(0.02)


@pytest.mark.parametrize(("adjacent", "expected"), [(False, 0b101), (True, 0b111)])
def test_neighbouring_cells_bleed_together_only_when_allowed(make_config, rigs, adjacent, expected):
    chip = Bq76952Emulator(LOW)
    rig = Rig(make_config, one_chip(balance_adjacent_cells=adjacent), chip=chip)
    rigs.append(rig)
    frontend = rig.open()
    mask = np.zeros(16, dtype=bool)
    mask[:3] = True
    deadline = time.monotonic() + DEADLINE_S
    while chip.cb_active != expected:
        assert time.monotonic() < deadline, hex(chip.cb_active)
        frontend.balance(mask)
        time.sleep(0.02)


def test_close_stops_the_poller_switches_bleeding_off_and_is_idempotent(rig1):
    chip = rig1.chips["chip"]
    frontend = rig1.open()
    mask = np.zeros(16, dtype=bool)
    mask[4] = True
    deadline = time.monotonic() + DEADLINE_S
    while chip.cb_active != 1 << 4:
        assert time.monotonic() < deadline
        frontend.balance(mask)
        time.sleep(0.02)
    frontend.close()
    assert chip.cb_active == 0 and rig1.bus.closed
    assert not frontend._thread.is_alive()
    frontend.close()


def test_autonomous_fets_are_switched_on_at_start_and_off_on_close(make_config, rigs):
    chip = Bq76952Emulator(LOW)
    rig = Rig(make_config, one_chip(fets="autonomous"), chip=chip)
    rigs.append(rig)
    frontend = rig.open()
    assert chip.fet_en and chip.fet_status == 0b101
    frontend.close()
    assert chip.fet_status == 0


# -- chip states the measurements cannot be trusted in (TRM: CONFIG_UPDATE, reset, SLEEP) --------

SUBCOMMANDS = 0x3E  # every subcommand (EXIT_CFGUPDATE, SLEEP_DISABLE, data memory) goes here


def block_subcommands(chip: Bq76952Emulator, blocked: bool = True) -> None:
    """The chip NACKs every transfer to 0x3E/0x3F: no subcommand can be sent (or read back),
    so a state the driver would repair at once lasts as long as the test needs it."""
    chip.nack_next(10**9 if blocked else 0, register=SUBCOMMANDS)


def test_a_chip_left_in_config_update_is_taken_out_of_it_at_start(make_config, rigs, caplog):
    chip = Bq76952Emulator(LOW)
    chip._dm_set(DM_VCELL_MODE, (0xFFFF).to_bytes(2, "little"))  # no setting needs a change
    chip.cfgupdate = True  # a previous run was killed between SET_ and EXIT_CFGUPDATE
    rig = Rig(make_config, one_chip(), chip=chip)
    rigs.append(rig)
    with caplog.at_level(logging.WARNING, logger="drivers.i2c.frontend"):
        rig.open()
    assert not chip.cfgupdate and not chip.por  # measuring and protecting again
    assert "CONFIG_UPDATE" in caplog.text
    chip.cell_voltage_v[3] = 4.1
    m = rig.wait(lambda m: fresh(m) and m.cell_voltage_v[3] > 4.0, "a new measurement")
    assert m.frontend_faults == ()


def test_a_chip_in_config_update_is_a_device_error_until_it_is_out(rig1):
    chip = rig1.chips["chip"]
    rig1.open()
    rig1.wait(fresh, "a complete sample")
    block_subcommands(chip)
    chip.cfgupdate = True  # measurements and protections stopped
    chip.cell_voltage_v[3] = 4.5  # the chip does not see it
    m = rig1.wait(lambda m: "frontend_device_error" in m.frontend_faults, "a device error")
    assert np.isnan(m.cell_voltage_v).all() and math.isnan(m.current_a)  # not old codes
    time.sleep(0.3)
    m = rig1.read()
    assert "frontend_device_error" in m.frontend_faults and np.isnan(m.cell_voltage_v).all()
    block_subcommands(chip, False)
    m = rig1.wait(lambda m: fresh(m) and m.frontend_faults == (), "recovery")
    assert not chip.cfgupdate and m.cell_voltage_v[3] == pytest.approx(4.5)
    assert rig1.frontend.chips[0].reconfigurations == 1


def test_a_chip_that_resets_is_a_device_error_until_configured_again(make_config, rigs):
    chip = Bq76952Emulator(LOW)
    changes = one_chip()
    changes["frontend"]["chips"][0]["sense_resistance_mohm"] = 1.0
    rig = Rig(make_config, changes, chip=chip)
    rigs.append(rig)
    rig.open()
    rig.wait(fresh, "a complete sample")
    block_subcommands(chip)
    chip.reset()  # a brown-out: Vcell Mode and CC Gain back at their defaults, SLEEP allowed
    m = rig.wait(lambda m: "frontend_device_error" in m.frontend_faults, "a device error")
    assert np.isnan(m.cell_voltage_v).all()
    block_subcommands(chip, False)
    rig.wait(lambda m: fresh(m) and m.frontend_faults == (), "recovery")
    assert not chip.por and not chip.sleep_allowed
    assert chip.vcell_mode == 0xFFFF
    (cc_gain,) = struct.unpack("<f", chip.dm_get(DM_CC_GAIN, 4))
    assert cc_gain == pytest.approx(7.5684 / 1.0, rel=1e-6)  # TRM: 7.5684 / Rsense(mOhm)


def test_a_sleeping_chip_is_not_refreshed(rig1):
    chip = rig1.chips["chip"]
    rig1.open()
    rig1.wait(fresh, "a complete sample")
    assert not chip.sleep_allowed  # SLEEP_DISABLE at start
    block_subcommands(chip)
    chip.sleep_allowed = True  # allowed again, and the driver cannot disallow it now
    chip.current_a = 0.0  # below Sleep Current: asleep, measuring every 5 s
    chip.cell_voltage_v[3] = 4.5
    m = rig1.wait(lambda m: CELL_VOLTAGE_GROUP in m.stale_groups, "stale cells")
    assert np.isnan(m.cell_voltage_v).all()
    block_subcommands(chip, False)  # SLEEP_DISABLE goes through: awake, measuring
    m = rig1.wait(fresh, "recovery")
    assert m.cell_voltage_v[3] == pytest.approx(4.5) and not chip.sleep_allowed


def test_a_chip_whose_status_cannot_be_read_keeps_its_faults_then_is_a_device_error(rig1):
    chip = rig1.chips["chip"]
    rig1.open()
    chip.safety_status = [1 << 3, 0, 0]  # COV
    rig1.wait(lambda m: m.frontend_faults == ("frontend_cell_overvoltage",), "the fault")
    chip.nack_next(10**9, register=0x02)  # the status block read fails from now on
    deadline = time.monotonic() + DEADLINE_S
    while True:  # never a silent "no faults" in between
        m = rig1.read()
        assert m.frontend_faults, "the chip's faults vanished with its status"
        if m.frontend_faults == ("frontend_device_error",):
            break
        assert m.frontend_faults == ("frontend_cell_overvoltage",)
        assert time.monotonic() < deadline, m
        time.sleep(0.005)
    assert np.isnan(m.cell_voltage_v).all()  # nothing is read from a chip of unknown state
    chip.nack_next(0)
    rig1.wait(lambda m: m.frontend_faults == ("frontend_cell_overvoltage",), "the status again")


def test_nothing_is_written_to_a_chip_whose_status_cannot_be_read(rig1):
    """A chip that reset into another I2C mode would take a write's bytes as other commands."""
    chip = rig1.chips["chip"]
    frontend = rig1.open()
    rig1.wait(fresh, "a complete sample")
    chip.nack_next(10**9, register=0x02)
    time.sleep(0.1)
    chip.log.clear()
    mask = np.zeros(16, dtype=bool)
    mask[0] = True
    for _ in range(20):
        frontend.balance(mask)
        time.sleep(0.01)
    assert [t for t in chip.log if t.kind == "w"] == [] and chip.cb_active == 0
    chip.nack_next(0)
    deadline = time.monotonic() + DEADLINE_S
    while chip.cb_active != 1:
        assert time.monotonic() < deadline
        frontend.balance(mask)
        time.sleep(0.02)


def test_a_failing_poll_is_logged_once_not_every_poll(rig1, caplog, monkeypatch):
    frontend = rig1.open()
    rig1.wait(fresh, "a complete sample")

    def broken(*args):
        raise RuntimeError("a bug")

    with caplog.at_level(logging.WARNING, logger="drivers.i2c.frontend"):
        monkeypatch.setattr(frontend, "_put_pack", broken)
        errors = rig1.read().frame_errors
        rig1.wait(lambda m: m.frame_errors > errors + 20, "many failed polls")
        monkeypatch.undo()
    failures = [r for r in caplog.records if "a poll failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info  # with its traceback, once
    assert frontend._thread.is_alive()
    rig1.wait(lambda m: fresh(m) and not math.isnan(m.current_a), "polls working again")


# -- the INA228 ----------------------------------------------------------------------------------


def ina_rig(make_config, rigs, ina: Ina228Emulator):
    chip = Bq76952Emulator(LOW)
    changes = one_chip(ina228={"shunt_resistance_ohm": 0.0005, "max_current_a": 150.0}, cc2=False)
    changes["protection"]["short_circuit_current_a"] = 100.0
    rig = Rig(make_config, changes, chip=chip, ina=ina)
    rigs.append(rig)
    rig.open()
    return rig


def test_an_ina228_that_reset_never_gives_a_wrongly_scaled_current(make_config, rigs):
    """After a reset SHUNT_CAL is 0x1000 again (data sheet), and 25 A reads as 11.4 A."""
    ina = Ina228Emulator(shunt_resistance_ohm=0.0005)
    ina.current_a = 25.0
    rig = ina_rig(make_config, rigs, ina)
    rig.wait(lambda m: fresh(m) and not math.isnan(m.current_a), "a current")
    with ina.lock:
        ina.registers = dict(RESET)  # a brown-out
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        m = rig.read()
        assert math.isnan(m.current_a) or m.current_a == pytest.approx(25.0, abs=2e-3), m
        time.sleep(0.002)
    assert ina.registers[0x02] == 1875  # configured again: 13107.2e6 * 150 / 2^19 * 0.0005
    assert rig.wait(lambda m: m.frontend_faults == (), "no fault").current_a == pytest.approx(
        25.0, abs=2e-3
    )


def test_an_ina228_that_cannot_be_configured_again_is_a_current_sensor_fault(make_config, rigs):
    ina = Ina228Emulator(shunt_resistance_ohm=0.0005)
    ina.current_a = 25.0
    rig = ina_rig(make_config, rigs, ina)
    rig.wait(lambda m: fresh(m) and not math.isnan(m.current_a), "a current")
    keep = ina.write_registers
    ina.write_registers = lambda register, data: None  # writes no longer take
    with ina.lock:
        ina.registers = dict(RESET)
    m = rig.wait(lambda m: "frontend_current_sensor_fault" in m.frontend_faults, "the fault")
    time.sleep(0.2)
    m = rig.read()
    assert "frontend_current_sensor_fault" in m.frontend_faults and math.isnan(m.current_a)
    ina.write_registers = keep
    m = rig.wait(lambda m: m.frontend_faults == () and not math.isnan(m.current_a), "recovery")
    assert m.current_a == pytest.approx(25.0, abs=2e-3)


@pytest.mark.parametrize("current_a", [120.0, -120.0])
def test_a_current_beyond_the_ina228_shunt_limits_is_a_short_circuit(make_config, rigs, current_a):
    ina = Ina228Emulator(shunt_resistance_ohm=0.0005)
    rig = ina_rig(make_config, rigs, ina)  # limits at +-100 A (short_circuit_current_a)
    rig.wait(lambda m: fresh(m) and m.frontend_faults == (), "a clean sample")
    ina.current_a = current_a
    m = rig.wait(lambda m: "frontend_short_circuit" in m.frontend_faults, "the short circuit")
    assert m.current_a == pytest.approx(current_a, abs=2e-3)  # a valid reading, just large
    ina.current_a = 0.9 * 100.0 * (1 if current_a > 0 else -1)
    rig.wait(lambda m: m.frontend_faults == (), "below the limit again")


# -- start-up errors -------------------------------------------------------------------------


def test_a_wrong_part_at_start_is_a_clear_error_and_the_bus_is_closed(rig1):
    rig1.chips["chip"].device_number = 0x7694
    with pytest.raises(I2cIdentityError, match=r"address 0x08.*found device number 0x7694"):
        rig1.open()
    assert rig1.bus.closed


def test_an_absent_chip_at_start_is_a_clear_error(make_config, rigs):
    rig = Rig(make_config, two_chips())  # no device on the bus
    rigs.append(rig)
    with pytest.raises(I2cNackError, match="bus 2 address 0x08"):
        rig.open()
    rig.bus = EmulatedBus(absent_errno=errno.ENODEV)  # as i2c-stub reports it
    with pytest.raises(FrontEndError, match="no device"):
        rig.open()


def test_a_current_beyond_cc2s_reach_is_refused(make_config, rigs):
    chip = Bq76952Emulator(LOW)  # userA 1 mA: up to 32.8 A
    changes = one_chip()
    changes["protection"]["short_circuit_current_a"] = 50.0
    rig = Rig(make_config, changes, chip=chip)
    rigs.append(rig)
    with pytest.raises(FrontEndError, match="short_circuit_current_a 50 A could never trip"):
        rig.open()


def test_an_ina228_range_below_the_short_circuit_current_is_refused(make_config, rigs):
    changes = two_chips(ina228={"shunt_resistance_ohm": 0.0005, "max_current_a": 80.0})
    rig = Rig(make_config, changes, low=Bq76952Emulator(LOW), high=Bq76952Emulator(HIGH))
    rigs.append(rig)
    with pytest.raises(FrontEndError, match="max_current_a 80 A must be above"):
        rig.open()


@pytest.mark.parametrize(
    ("frontend", "pack", "words"),
    [
        ({"chips": [{"cell_inputs": list(range(1, 16))}]}, {}, "list 15 cells, but .* is 16"),
        ({"chips": [{"cell_inputs": [1, 2, 2, 3]}]}, {"n_cells": 4}, "each cell input once"),
        ({"chips": [{"cell_inputs": [1, 2, 17]}]}, {"n_cells": 3}, "numbered 1..16"),
        ({"chips": [{"cell_inputs": [1, 2]}]}, {"n_cells": 2}, "at least 3"),
        ({"chips": [{"thermistors": ["ts4"]}]}, {}, "thermistors"),
        (
            {"chips": [{"address": 8, "thermistors": ["ts1"]}, {"address": 8}]},
            {"n_cells": 32, "n_temp_sensors": 1},
            "share an I2C address",
        ),
        ({"chips": [{"thermistors": ["ts1"]}]}, {"n_temp_sensors": 2}, "list 1 temperatures"),
        ({"cc2_chip": 1}, {}, "cc2_chip 1 is not a chip"),
        ({"cc2": False}, {}, "no pack current"),
        ({"link_voltage_chip": 2}, {}, "link_voltage_chip 2 is not a chip"),
        ({"link_voltage": "ina228_bus"}, {}, "needs \\[frontend.ina228\\]"),
        ({"poll_period_s": 1.0}, {}, "must be longer than poll_period_s"),
        ({"chips": [{"adress": 8}]}, {}, "did you mean 'address'"),
    ],
)
def test_load_time_errors_name_the_option(make_config, frontend, pack, words):
    changes = one_chip(**frontend)
    changes["pack"].update(pack)
    with pytest.raises(ConfigError, match=words) as info:
        load_config(make_config(changes))
    assert "[frontend" in str(info.value)  # the file, the section and the option


def test_a_thermistor_count_that_does_not_fit_the_pack_is_a_load_time_error():
    raw = {"chips": [{"thermistors": ["ts1", "ts3"]}]}
    with pytest.raises(ValueError, match="n_temp_sensors is 3"):
        Bq76952Options.model_validate(raw, context={"n_cells": 16, "n_temp_sensors": 3})


# -- in the control cycle ----------------------------------------------------------------------


def make_cycle(make_config, rigs):
    chip = Bq76952Emulator(LOW)
    chip.pack_pin_v = 16 * 3.7  # the DC link follows the pack once precharged
    changes = one_chip()
    changes["protection"].update(
        insulation_warning_kohm=None, insulation_error_kohm=None, interlock=False
    )
    rig = Rig(make_config, changes, chip=chip)
    rigs.append(rig)
    frontend = rig.open()
    calls: list[str] = []
    cycle = ControlCycle(
        rig.config,
        load_cell_params(rig.config.pack.cell_params),
        frontend,
        FakeBox(calls),
        FakePublisher(calls),
    )
    assert cycle.wait_for_first_sample(time.monotonic, DEADLINE_S)
    return cycle, chip


def run_until(cycle, predicate, max_cycles: int = 100, period_s: float = 0.1):
    """Run the cycle in real time (the front-end stamps its samples on the monotonic clock)
    until ``predicate(status)``; return that status."""
    last_s = time.monotonic()
    status = None
    for _ in range(max_cycles):
        now_s = time.monotonic()
        status = cycle.run(now_s, now_s - last_s, lagging=False)
        last_s = now_s
        if predicate(status):
            return status
        time.sleep(max(0.0, period_s - (time.monotonic() - now_s)))
    raise AssertionError(f"not reached in {max_cycles} cycles: {status}")


def test_an_emulated_over_voltage_opens_the_contactors(make_config, rigs):
    cycle, chip = make_cycle(make_config, rigs)
    run_until(cycle, lambda s: s.contactors.value == "closed")
    chip.cell_voltage_v[5] = 4.40  # beyond the limit set's MSL of 4.25 V
    status = run_until(cycle, lambda s: "cell_voltage_high_msl" in s.latched_faults)
    run_until(cycle, lambda s: cycle.contactors.relays == ALL_OPEN, max_cycles=20)
    assert status.measurement.cell_voltage_v[5] == pytest.approx(4.40)


def test_an_emulated_silence_opens_the_contactors(make_config, rigs):
    cycle, chip = make_cycle(make_config, rigs)
    run_until(cycle, lambda s: s.contactors.value == "closed")
    chip.silence()
    status = run_until(cycle, lambda s: "frontend_timeout" in s.latched_faults)
    run_until(cycle, lambda s: cycle.contactors.relays == ALL_OPEN, max_cycles=20)
    assert np.isnan(status.measurement.cell_voltage_v).all()
