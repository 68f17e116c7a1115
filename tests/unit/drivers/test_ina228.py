"""The INA228 driver against the register-level emulator.

Expected values are the emulator's physical truth (A, V, degC) to within the datasheet's
resolution, and register codes worked out from the datasheet's formulas by hand here.
"""

from __future__ import annotations

import errno
import math

import pytest

from drivers.i2c.bus import I2cIdentityError, I2cNackError, I2cNoDeviceError, I2cProtocolError
from drivers.i2c.ina228 import Ina228, Ina228Alerts
from tests.emulators.ina228 import RESET, Ina228Emulator
from tests.emulators.smbus import EmulatedBus

SHUNT_OHM = 0.0005
MAX_A = 150.0
# CURRENT_LSB = 150 A / 2^19; 150 A * 0.5 mOhm = 75 mV > 40.96 mV, so ADCRANGE = 0 and
# SHUNT_CAL = 13107.2e6 * (150 / 2^19) * 0.0005 = 1875 exactly.
SHUNT_CAL = 1875


def make(emulator=None, invert=False, **bus_kwargs):
    emulator = emulator or Ina228Emulator(shunt_resistance_ohm=SHUNT_OHM)
    bus = EmulatedBus({emulator.address: emulator}, **bus_kwargs)
    driver = Ina228(bus, emulator.address, SHUNT_OHM, MAX_A, invert, bus_number=1)
    return driver, emulator


def configured(**kwargs):
    driver, emulator = make(**kwargs)
    driver.check_identity()
    driver.configure()
    return driver, emulator


def test_identity():
    driver, emulator = make()
    driver.check_identity()  # raises unless manufacturer "TI" and die 0x228 answer
    # ... which it learnt from the two identity registers, each read as one SMBus word
    assert [(t.kind, t.register, t.n_bytes) for t in emulator.log] == [
        ("r", 0x3E, 2),
        ("r", 0x3F, 2),
    ]


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [("manufacturer_id", 0x4E58, "manufacturer 0x4e58"), ("device_id", 0x2381, "0x2381")],
)
def test_a_wrong_part_is_named(field, value, words):
    driver, emulator = make()
    setattr(emulator, field, value)
    with pytest.raises(I2cIdentityError, match=rf"expected an INA228.*{words}"):
        driver.check_identity()


def test_an_absent_part():
    bus = EmulatedBus({})
    with pytest.raises(I2cNackError, match="bus 1 address 0x41"):
        Ina228(bus, 0x41, SHUNT_OHM, MAX_A, bus_number=1).check_identity()
    bus = EmulatedBus({}, absent_errno=errno.ENODEV)
    with pytest.raises(I2cNoDeviceError):
        Ina228(bus, 0x41, SHUNT_OHM, MAX_A, bus_number=1).check_identity()


def test_configuration_registers_from_the_datasheet():
    _, emulator = configured()
    assert emulator.registers[0x02] == SHUNT_CAL
    assert emulator.registers[0x00] & 0x0010 == 0  # ADCRANGE 0 for 75 mV
    # MODE 0xF, VBUSCT = VSHCT = VTCT = 1052 us (5), AVG = 4 samples (1)
    assert emulator.registers[0x01] == 0xFB69


def test_a_small_shunt_voltage_selects_the_fine_range():
    emulator = Ina228Emulator(shunt_resistance_ohm=0.0002)
    bus = EmulatedBus({emulator.address: emulator})
    driver = Ina228(bus, emulator.address, 0.0002, 100.0)  # 20 mV full scale
    driver.configure()
    assert emulator.registers[0x00] & 0x0010  # ADCRANGE 1 (+-40.96 mV)
    # 13107.2e6 * (100 / 2^19) * 0.0002 * 4 = 2000
    assert emulator.registers[0x02] == 2000
    emulator.current_a = 12.5
    assert driver.read().current_a == pytest.approx(12.5, abs=0.5e-3)


@pytest.mark.parametrize("current_a", [37.5, -80.25, 0.0, 149.0])
def test_readings_match_the_truth_within_the_datasheet_resolution(current_a):
    driver, emulator = configured()
    emulator.current_a = current_a
    emulator.bus_voltage_v = 51.2
    emulator.die_temp_c = 41.3
    reading = driver.read()
    # VSHUNT steps of 312.5 nV are 0.625 mA through 0.5 mOhm; CURRENT_LSB is 0.29 mA.
    assert reading.current_a == pytest.approx(current_a, abs=1e-3)
    assert reading.shunt_voltage_v == pytest.approx(current_a * SHUNT_OHM, abs=312.5e-9)
    assert reading.bus_voltage_v == pytest.approx(51.2, abs=195.3125e-6)
    assert reading.die_temp_c == pytest.approx(41.3, abs=7.8125e-3)
    assert reading.alerts == Ina228Alerts(0)


def test_invert_current_flips_current_and_charge_but_not_the_shunt_voltage():
    driver, emulator = configured(invert=True)
    emulator.current_a = 20.0
    emulator.advance(2.0)
    reading = driver.read()
    assert reading.current_a == pytest.approx(-20.0, abs=1e-3)
    assert reading.charge_c == pytest.approx(-40.0, rel=1e-4)
    assert reading.shunt_voltage_v == pytest.approx(20.0 * SHUNT_OHM, abs=312.5e-9)


def test_the_charge_accumulator_counts_coulombs_and_resets():
    driver, emulator = configured()
    emulator.current_a = 10.0
    emulator.advance(3.0)
    emulator.current_a = -4.0
    emulator.advance(1.5)
    assert driver.read().charge_c == pytest.approx(10.0 * 3.0 - 4.0 * 1.5, rel=1e-4)
    driver.reset_charge()
    assert driver.read().charge_c == 0.0
    assert emulator.registers[0x00] & 0x4000 == 0  # RSTACC clears itself


def test_alert_limits_become_the_datasheet_codes_and_trip():
    driver, emulator = configured()
    driver.set_alert_limits(
        current_high_a=100.0, current_low_a=-100.0, bus_high_v=60.0, bus_low_v=40.0,
        temp_high_c=85.0,
    )  # fmt: skip
    # 100 A * 0.5 mOhm / 5 uV = 10000; 60 V / 3.125 mV = 19200; 40 V -> 12800;
    # 85 degC / 7.8125 m degC = 10880
    assert emulator.registers[0x0C] == 10000
    assert emulator.registers[0x0D] == (-10000) & 0xFFFF
    assert (emulator.registers[0x0E], emulator.registers[0x0F]) == (19200, 12800)
    assert emulator.registers[0x10] == 10880
    emulator.bus_voltage_v = 50.0
    assert driver.read().alerts == Ina228Alerts(0)
    emulator.current_a, emulator.bus_voltage_v, emulator.die_temp_c = 120.0, 65.0, 90.0
    alerts = driver.read().alerts
    assert alerts == Ina228Alerts.SHUNT_OVER | Ina228Alerts.BUS_OVER | Ina228Alerts.TEMP_OVER
    emulator.current_a, emulator.bus_voltage_v, emulator.die_temp_c = -120.0, 30.0, 25.0
    assert driver.read().alerts == Ina228Alerts.SHUNT_UNDER | Ina228Alerts.BUS_UNDER


def test_an_inverted_shunt_swaps_the_shunt_limits():
    driver, emulator = configured(invert=True)
    driver.set_alert_limits(current_high_a=100.0)
    assert emulator.registers[0x0D] == (-10000) & 0xFFFF  # charging makes V(IN+) < V(IN-)
    assert emulator.registers[0x0C] == 0x7FFF  # untouched


def test_a_limit_the_register_cannot_hold_is_refused():
    driver, _ = configured()
    with pytest.raises(ValueError, match="does not fit"):
        driver.set_alert_limits(current_high_a=400.0)  # 200 mV / 5 uV = 40000 > 32767


def test_an_arithmetic_overflow_makes_the_current_invalid():
    driver, emulator = configured()
    emulator.registers[0x02] = 1  # SHUNT_CAL corrupted: VSHUNT * 4096 overflows
    emulator.current_a = 50.0
    reading = driver.read()
    assert math.isnan(reading.current_a) and reading.alerts & Ina228Alerts.MATH_OVERFLOW


def test_a_memory_checksum_error_is_reported():
    driver, emulator = configured()
    emulator.memory_error = True
    assert driver.read().alerts & Ina228Alerts.MEMORY_ERROR


def test_a_negative_bus_voltage_code_is_not_a_voltage():
    driver, emulator = configured()
    emulator.force_register(0x05, bytes((0x80, 0x00, 0x00)))
    assert math.isnan(driver.read().bus_voltage_v)


def test_a_nack_in_the_charge_read_is_an_error():
    driver, emulator = configured()
    emulator.nack_mid_block(3)  # the first transfer longer than 3 bytes: CHARGE (5)
    with pytest.raises(I2cNackError):
        driver.read()


def test_a_configuration_that_does_not_read_back_is_an_error():
    driver, emulator = make()
    original = emulator.write_registers

    def drop_shunt_cal(register, data):
        if register != 0x02:
            original(register, data)

    emulator.write_registers = drop_shunt_cal
    with pytest.raises(I2cProtocolError, match=r"0x02 reads back 0x1000 after writing 0x0753"):
        driver.configure()


@pytest.mark.parametrize(
    ("shunt_ohm", "max_a", "words"),
    [(0.002, 100.0, "beyond"), (1e-6, 1.0, "SHUNT_CAL"), (0.0, 1.0, "positive")],
)
def test_impossible_calibrations_are_refused(shunt_ohm, max_a, words):
    with pytest.raises(ValueError, match=words):
        Ina228(EmulatedBus({}), 0x40, shunt_ohm, max_a)


def test_the_transfers_of_one_reading():
    driver, emulator = configured()
    emulator.log.clear()
    driver.read()
    assert [(t.register, t.n_bytes) for t in emulator.log] == [
        (0x04, 3), (0x05, 3), (0x06, 2), (0x07, 3), (0x0A, 5), (0x0B, 2),
        (0x00, 2), (0x01, 2), (0x02, 2),  # CONFIG, ADC_CONFIG, SHUNT_CAL read back
    ]  # fmt: skip


def test_a_reset_chip_is_caught_not_read_with_the_wrong_scale():
    """After a power-on reset SHUNT_CAL is 0x1000 again (data sheet): CURRENT then counts in
    VSHUNT * 4096 / 4096 steps, 25 A reads as 11.4 A, and no diagnostic flag says so."""
    driver, emulator = configured()
    driver.set_alert_limits(current_high_a=100.0, current_low_a=-100.0)
    emulator.current_a = 25.0
    assert driver.read().current_a == pytest.approx(25.0, abs=1e-3)
    emulator.registers = dict(RESET)  # the brown-out
    reading = driver.read()
    assert reading.configuration_lost
    assert math.isnan(reading.current_a) and math.isnan(reading.charge_c)
    assert reading.bus_voltage_v == pytest.approx(48.0, abs=1e-3)  # not scaled by SHUNT_CAL
    driver.configure()
    driver.set_alert_limits(current_high_a=100.0, current_low_a=-100.0)
    reading = driver.read()
    assert not reading.configuration_lost and reading.current_a == pytest.approx(25.0, abs=1e-3)


@pytest.mark.parametrize("register", [0x01, 0x02, 0x0C, 0x0D])
def test_any_register_written_that_changes_is_caught(register):
    driver, emulator = configured()
    driver.set_alert_limits(current_high_a=100.0, current_low_a=-100.0)
    assert not driver.read().configuration_lost
    emulator.registers[register] = RESET[register]  # each differs from what was written
    assert driver.read().configuration_lost


def test_a_stuck_converter_repeats_its_last_codes():
    driver, emulator = configured()
    emulator.current_a = 10.0
    assert driver.read().current_a == pytest.approx(10.0, abs=1e-3)
    emulator.stuck = True
    emulator.current_a = -10.0
    assert driver.read().current_a == pytest.approx(10.0, abs=1e-3)
    emulator.stuck = False
    assert driver.read().current_a == pytest.approx(-10.0, abs=1e-3)


def test_a_lost_shunt_range_is_caught():
    emulator = Ina228Emulator(shunt_resistance_ohm=0.0002)
    driver = Ina228(EmulatedBus({emulator.address: emulator}), emulator.address, 0.0002, 100.0)
    driver.configure()  # 20 mV full scale: ADCRANGE 1, CONFIG 0x0010
    assert not driver.read().configuration_lost
    emulator.registers[0x00] = RESET[0x00]  # ADCRANGE back to +-163.84 mV
    assert driver.read().configuration_lost
