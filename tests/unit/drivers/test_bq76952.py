"""The BQ76952 driver against the register-level emulator, and the I2C bus layer it uses.

Expected values come from the TRM's examples (CRC, checksum, Vcell Mode) and from its LSB
sizes applied to the emulator's true values, never from the driver's own arithmetic.
"""

from __future__ import annotations

import errno
import math
import struct

import numpy as np
import pytest

from drivers.i2c.bq76952 import Bq76952, subcommand_checksum, vcell_mode
from drivers.i2c.bus import (
    I2cBusError,
    I2cCrcError,
    I2cDevice,
    I2cIdentityError,
    I2cNackError,
    I2cNoDeviceError,
    I2cProtocolError,
    I2cTimeoutError,
    crc8,
    translate,
)
from tests.emulators.bq76952 import (
    DM_CC_GAIN,
    DM_COMM_TYPE,
    DM_VCELL_MODE,
    SECURITY_SEALED,
    Bq76952Emulator,
)
from tests.emulators.smbus import EmulatedBus


def make(emulator: Bq76952Emulator | None = None, crc: bool = False, **bus_kwargs):
    emulator = emulator or Bq76952Emulator()
    bus = EmulatedBus({emulator.address: emulator}, **bus_kwargs)
    return Bq76952(I2cDevice(bus, emulator.address, bus_number=3), crc=crc), emulator


# -- TRM examples ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([0x10, 0x3E, 0x22], 0x63),  # SLUAA11B, FET_ENABLE with CRC: first byte
        ([0x00], 0x00),  # ... its second byte
        ([0x10, 0x14, 0x11, 0x68], 0x33),  # SLUAA11B, Cell 1 Voltage read: first byte
        ([0x0B], 0x31),  # ... its second byte
        ([0x10, 0x14, 0x11, 0xC5], 0x79),  # SLUAAM4 (BQ7690x), the same read
    ],
)
def test_crc8_matches_the_ti_examples(data, expected):
    assert crc8(data) == expected


def test_transfer_buffer_checksum_matches_the_trm_example():
    # TRM: writing Cell 1 Gain = 0x307A at 0x9180 takes checksum 0x44 (and length 6).
    assert subcommand_checksum(0x9180, bytes((0x7A, 0x30))) == 0x44


def test_vcell_mode_marks_the_inputs_that_carry_cells():
    assert vcell_mode(range(1, 17)) == 0xFFFF
    # TI's example for 9 cells: inputs 1..7, 9 and 10.
    assert vcell_mode([1, 2, 3, 4, 5, 6, 7, 9, 10]) == 0x037F


# -- the bus layer --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls", "words"),
    [
        (errno.ENXIO, I2cNackError, "NACK"),
        (errno.EREMOTEIO, I2cNackError, "NACK"),
        (errno.ENODEV, I2cNoDeviceError, "no device"),
        (errno.ETIMEDOUT, I2cTimeoutError, "timed out"),
        (errno.EIO, I2cBusError, "I/O error"),
        (errno.EAGAIN, I2cBusError, "arbitration"),
    ],
)
def test_linux_errnos_become_typed_errors_naming_bus_and_address(code, cls, words):
    error = translate(OSError(code, "x"), 1, 0x08, "read of 0x14")
    assert type(error) is cls
    text = str(error)
    assert "I2C bus 1 address 0x08" in text and "read of 0x14" in text and words in text
    assert errno.errorcode[code] in text


def test_an_absent_device_is_a_clear_error():
    driver, _ = make()
    driver.device.address = 0x09  # nobody there
    with pytest.raises(I2cNackError, match=r"bus 3 address 0x09.*NACK"):
        driver.check_identity()
    driver, _ = make(absent_errno=errno.ENODEV)
    driver.device.address = 0x09
    with pytest.raises(I2cNoDeviceError, match="no device"):
        driver.check_identity()


# -- identity -------------------------------------------------------------------------------------


def test_identity_and_versions():
    driver, emulator = make()
    driver.check_identity()
    assert driver.device_number() == 0x7695
    assert driver.firmware_version() == (0x7695, emulator.fw_version, emulator.build)
    assert driver.hardware_version() == emulator.hw_version


def test_a_wrong_part_is_named():
    emulator = Bq76952Emulator()
    emulator.device_number = 0x7694
    driver, _ = make(emulator)
    with pytest.raises(I2cIdentityError, match=r"expected a BQ76952.*found device number 0x7694"):
        driver.check_identity()


def test_a_part_that_never_completes_a_subcommand_is_not_a_bq76952():
    emulator = Bq76952Emulator()
    emulator.busy_reads = 10**9
    driver, _ = make(emulator)
    with pytest.raises(I2cIdentityError, match=r"no BQ76952 answers.*did not complete"):
        driver.check_identity()


# -- conversions ----------------------------------------------------------------------------------


def test_cell_voltages_in_one_block_read():
    driver, emulator = make()
    volts = 3.0 + 0.0371 * np.arange(16)
    emulator.cell_voltage_v[:] = volts
    emulator.log.clear()
    got = driver.read_cell_voltages_v()
    assert got == pytest.approx(np.round(volts * 1000) / 1000, abs=1e-9)  # 1 mV steps
    assert [(t.kind, t.register, t.n_bytes) for t in emulator.log] == [("r", 0x14, 32)]


def test_stack_pins_and_current_in_user_units():
    driver, emulator = make()
    emulator.cell_voltage_v[:] = 3.7
    emulator.pack_pin_v = 58.123
    emulator.ld_pin_v = 12.0
    emulator.current_a = -12.3456  # discharging
    pack = driver.read_pack()
    # Default DA Configuration 0x05: userV = 10 mV, userA = 1 mA.
    assert pack.stack_v == pytest.approx(59.20, abs=1e-9)
    assert pack.pack_pin_v == pytest.approx(58.12, abs=1e-9)
    assert pack.ld_pin_v == pytest.approx(12.00, abs=1e-9)
    assert pack.cc2_current_a == pytest.approx(-12.346, abs=1e-9)


def test_the_units_follow_da_configuration():
    emulator = Bq76952Emulator()
    emulator._dm_set(0x9303, bytes((0x06,)))  # USER_AMPS = 10 mA, USER_VOLTS_CV = 1
    driver, _ = make(emulator)
    units = driver.read_units()
    assert (units.current_a, units.voltage_v) == (0.01, 0.01)
    emulator.current_a = 123.456
    assert driver.read_pack().cc2_current_a == pytest.approx(123.46, abs=1e-9)


def test_temperatures_from_tenths_of_a_kelvin():
    driver, emulator = make()
    emulator.temp_c.update(ts1=31.4, ts3=-5.0, internal=40.0)
    temps = dict(
        zip(
            ("internal", "cfetoff", "dfetoff", "alert", "ts1", "ts2", "ts3"),
            driver.read_temperatures_c(),
            strict=False,
        )
    )
    assert temps["ts1"] == pytest.approx(31.4, abs=0.051)  # 0.1 K steps
    assert temps["ts3"] == pytest.approx(-5.0, abs=0.051)
    assert temps["internal"] == pytest.approx(40.0, abs=0.051)


def test_codes_outside_what_the_chip_measures_are_nan():
    driver, emulator = make()
    emulator.force_code(0x14, 0x7FFF)  # 32.767 V on cell 1
    emulator.force_code(0x16, 0x8000)  # -32.768 V on cell 2
    emulator.force_code(0x70, 0x0000)  # 0 K on TS1
    cells = driver.read_cell_voltages_v()
    assert math.isnan(cells[0]) and math.isnan(cells[1]) and not math.isnan(cells[2])
    assert math.isnan(driver.read_temperatures_c()[4])


def test_safety_alerts_and_faults_by_trm_name():
    driver, emulator = make()
    emulator.safety_alert = [1 << 3, 0, 0]  # COV alert
    emulator.safety_status = [1 << 7, 1 << 4, 1 << 6]  # SCD, OTC, SCDL
    safety = driver.read_safety()
    assert safety.alerts == ("COV",)
    assert set(safety.faults) == {"SCD", "OTC", "SCDL"}
    assert driver.battery_status() & (1 << 11)  # SS: a safety fault is present


# -- subcommands ----------------------------------------------------------------------------------


def test_a_corrupted_buffer_fails_the_checksum():
    driver, emulator = make()
    emulator.flip_next_read(register=0x40, byte_index=1, mask=0x10)
    with pytest.raises(I2cProtocolError, match="checksum"):
        driver.device_number()
    assert driver.device_number() == 0x7695  # the next one is fine


def test_an_impossible_length_is_refused():
    driver, emulator = make()
    emulator.force_byte(0x61, 0x50)
    with pytest.raises(I2cProtocolError, match="transfer length 80"):
        driver.device_number()


def test_a_nack_in_the_middle_of_a_block_is_an_error():
    driver, emulator = make()
    emulator.nack_mid_block(10)
    with pytest.raises(I2cNackError):
        driver.read_cell_voltages_v()


# -- data memory ----------------------------------------------------------------------------------


def test_configure_writes_vcell_mode_in_config_update_and_reads_it_back():
    driver, emulator = make()
    inputs = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 16]  # 13 cells, 13..15 shorted
    assert driver.configure(inputs) == ["Vcell Mode"]
    assert emulator.dm_get(DM_VCELL_MODE, 2) == (0x8FFF).to_bytes(2, "little")
    assert emulator.config_updates == 1 and not emulator.cfgupdate
    assert driver.configure(inputs) == []  # already so: no CONFIG_UPDATE again
    assert emulator.config_updates == 1


def test_configure_writes_the_cc_gains_of_the_sense_resistor():
    driver, emulator = make()
    driver.configure(range(1, 17), sense_resistance_mohm=0.5)
    (cc_gain,) = struct.unpack("<f", emulator.dm_get(DM_CC_GAIN, 4))
    (capacity_gain,) = struct.unpack("<f", emulator.dm_get(DM_CC_GAIN + 4, 4))
    assert cc_gain == pytest.approx(7.5684 / 0.5, rel=1e-6)  # TRM: 7.5684 / Rsense(mOhm)
    assert capacity_gain == pytest.approx(7.5684 / 0.5 * 298261.6178, rel=1e-6)


def test_a_write_that_does_not_read_back_is_an_error():
    driver, emulator = make()
    emulator.flip_next_write(0x3E, byte_index=2)  # noise on the data byte of the DM write
    with pytest.raises(I2cProtocolError, match=r"0x9304 \(Vcell Mode\) reads back"):
        driver.configure([1, 2, 3])


def test_a_sealed_device_cannot_be_configured():
    emulator = Bq76952Emulator()
    emulator.security = SECURITY_SEALED
    driver, _ = make(emulator)
    with pytest.raises(I2cProtocolError, match="SEALED"):
        driver.configure([1, 2, 3])


# -- CRC mode -------------------------------------------------------------------------------------


def test_crc_mode_is_detected_and_used():
    emulator = Bq76952Emulator()
    emulator.crc_mode = True
    emulator.cell_voltage_v[:] = 3.456
    driver, _ = make(emulator)
    assert driver.detect_crc() is True
    driver.check_identity()
    assert driver.read_cell_voltages_v() == pytest.approx(np.full(16, 3.456))
    # 32 data bytes travel as 64 with their CRCs: two 32-byte transfers
    assert [t.n_bytes for t in emulator.log[-2:]] == [32, 32]


def test_crc_mode_catches_a_flipped_bit():
    emulator = Bq76952Emulator()
    emulator.crc_mode = True
    driver, _ = make(emulator, crc=True)
    emulator.flip_next_read(register=0x14, byte_index=6, mask=0x04)
    with pytest.raises(I2cCrcError, match="read of 0x14: CRC of byte 3"):
        driver.read_cell_voltages_v()


def test_without_crc_the_same_flip_goes_unseen_on_a_direct_command():
    driver, emulator = make()
    emulator.cell_voltage_v[:] = 3.7
    emulator.flip_next_read(register=0x14, byte_index=0, mask=0x01)
    assert driver.read_cell_voltages_v()[0] == pytest.approx(3.701)  # why CRC mode exists


def test_a_device_in_crc_mode_nacks_a_write_without_crc():
    emulator = Bq76952Emulator()
    emulator.crc_mode = True
    driver, _ = make(emulator, crc=False)
    with pytest.raises(I2cNackError):
        driver.command(0x0001)


@pytest.mark.parametrize("on_exit", [False, True])
def test_configure_switches_the_device_to_crc_mode(on_exit):
    emulator = Bq76952Emulator()
    emulator.comm_type_on_exit = on_exit
    driver, _ = make(emulator)
    changed = driver.configure(range(1, 17), crc=True)
    assert "Comm Type" in changed
    assert emulator.dm_get(DM_COMM_TYPE, 1) == b"\x12"  # I2C fast with CRC
    assert emulator.crc_mode and driver.crc
    driver.check_identity()  # and it talks in the new mode


# -- balancing and FETs ---------------------------------------------------------------------------


def test_balancing_bits_reach_the_chip_and_read_back():
    driver, emulator = make()
    driver.set_active_cells(0b1000_0000_0000_0101)
    assert emulator.cb_active == 0b1000_0000_0000_0101
    assert driver.active_cells() == 0b1000_0000_0000_0101
    driver.set_active_cells(0)
    assert emulator.cb_active == 0


def test_balancing_an_input_without_a_cell_is_refused_by_the_chip():
    driver, _ = make()
    driver.configure([1, 2, 3, 16])
    with pytest.raises(I2cProtocolError, match="reads back 0x0001 after writing 0x0011"):
        driver.set_active_cells(0b1_0001)  # input 5 is shorted


def test_a_balancing_write_with_a_bad_checksum_is_ignored_and_caught():
    driver, emulator = make()
    emulator.flip_next_write(0x3E, byte_index=2)
    with pytest.raises(I2cProtocolError, match="CB_ACTIVE_CELLS reads back"):
        driver.set_active_cells(0b100)
    assert emulator.rejected_writes == 1 and emulator.cb_active == 0


def test_fet_control():
    driver, emulator = make()
    assert emulator.fet_status == 0  # FET test mode out of reset
    driver.set_autonomous_fets(True)
    assert emulator.fet_en and driver.fet_status() & 0b101 == 0b101  # CHG and DSG on
    driver.set_autonomous_fets(True)  # FET_ENABLE toggles: it must not be sent again
    assert emulator.fet_en
    driver.all_fets_off()
    assert driver.fet_status() == 0
    driver.all_fets_on()
    assert driver.fet_status() & 0b101 == 0b101
    driver.set_autonomous_fets(False)
    assert not emulator.fet_en and driver.fet_status() == 0


def test_a_stuck_adc_repeats_its_codes_and_the_driver_passes_them_on():
    # The driver cannot tell a frozen reading from a steady one; the loop's stuck-cell check
    # (cell_voltage_stuck) does, so the driver must not hide it by caching or smoothing.
    driver, emulator = make()
    driver.disable_sleep()  # asleep, the chip would measure only every 5 s (see below)
    emulator.cell_voltage_v[:] = 3.7
    emulator.freeze()
    emulator.stuck = True
    emulator.cell_voltage_v[:] = 3.9
    assert driver.read_cell_voltages_v() == pytest.approx(np.full(16, 3.7))
    emulator.stuck = False
    assert driver.read_cell_voltages_v() == pytest.approx(np.full(16, 3.9))


# -- chip states: CONFIG_UPDATE, reset, SLEEP (TRM: Battery Status, operational modes) -----------

BS_CFGUPDATE, BS_SLEEP_EN, BS_POR, BS_SS, BS_PF, BS_SLEEP = (
    1,
    1 << 2,
    1 << 3,
    1 << 11,
    1 << 12,
    1 << 15,
)


def test_the_status_is_one_block_read_from_safety_alert_a_to_battery_status():
    driver, emulator = make()
    emulator.safety_alert = [1 << 3, 0, 0]  # COV alert
    emulator.safety_status = [1 << 7, 0, 0]  # SCD
    emulator.permanent_fail = True
    emulator.log.clear()
    status = driver.read_status()
    assert [(t.kind, t.register, t.n_bytes) for t in emulator.log] == [("r", 0x02, 18)]
    assert status.safety.faults == ("SCD",) and status.safety.alerts == ("COV",)
    assert status.battery & BS_SS and status.battery & BS_PF


def test_a_powered_up_chip_reports_a_reset_until_the_host_configured_it():
    emulator = Bq76952Emulator()
    emulator._dm_set(DM_VCELL_MODE, (0xFFFF).to_bytes(2, "little"))  # already as wanted
    driver, _ = make(emulator)
    assert driver.battery_status() & BS_POR  # set by the power-up: settings are defaults
    assert driver.configure(range(1, 17)) == []  # nothing to write ...
    assert emulator.config_updates == 1  # ... but CONFIG_UPDATE entered and left: POR clear
    assert not driver.battery_status() & BS_POR
    assert driver.configure(range(1, 17)) == [] and emulator.config_updates == 1


def test_a_reset_brings_the_defaults_back_and_configure_restores_the_settings():
    driver, emulator = make()
    driver.configure(range(1, 9), sense_resistance_mohm=0.5)
    emulator.reset()  # a brown-out
    assert driver.battery_status() & BS_POR
    assert emulator.vcell_mode == 0  # TRM default
    (cc_gain,) = struct.unpack("<f", emulator.dm_get(DM_CC_GAIN, 4))
    assert cc_gain != pytest.approx(7.5684 / 0.5, rel=1e-3)
    assert set(driver.configure(range(1, 9), sense_resistance_mohm=0.5)) >= {
        "Vcell Mode",
        "CC Gain",
    }
    assert emulator.vcell_mode == 0x00FF and not driver.battery_status() & BS_POR


def test_a_por_that_does_not_clear_is_an_error():
    class StubbornChip(Bq76952Emulator):
        def _start(self, command):
            super()._start(command)
            self.por = True  # never cleared

    driver, _ = make(StubbornChip())
    with pytest.raises(I2cProtocolError, match="POR is still set"):
        driver.configure(range(1, 17))


def test_in_config_update_the_chip_does_not_measure_until_it_leaves():
    driver, emulator = make()
    driver.disable_sleep()
    emulator.cell_voltage_v[:] = 3.7
    assert driver.read_cell_voltages_v()[0] == pytest.approx(3.7)
    emulator.cfgupdate = True  # a host killed between SET_CFGUPDATE and EXIT_CFGUPDATE
    emulator.cell_voltage_v[0] = 4.3
    assert driver.battery_status() & BS_CFGUPDATE
    assert driver.read_cell_voltages_v()[0] == pytest.approx(3.7)  # the last measurement
    driver.exit_config_update()
    assert not driver.battery_status() & BS_CFGUPDATE
    assert driver.read_cell_voltages_v()[0] == pytest.approx(4.3)


def test_a_sleeping_chip_measures_every_voltage_time_until_sleep_is_disallowed():
    driver, emulator = make()
    now = [100.0]
    emulator.clock = lambda: now[0]
    emulator.current_a = 0.005  # below Sleep Current (20 mA): SLEEP, allowed by default
    status = driver.battery_status()
    assert status & BS_SLEEP_EN and status & BS_SLEEP
    first = driver.read_cell_voltages_v()[0]
    emulator.cell_voltage_v[0] = 3.9
    now[0] += 4.9
    assert driver.read_cell_voltages_v()[0] == first  # no measurement within 5 s
    now[0] += 0.2
    assert driver.read_cell_voltages_v()[0] == pytest.approx(3.9)  # Voltage Time passed
    emulator.cell_voltage_v[0] = 3.4
    emulator.current_a = 1.0  # a load: the chip wakes and measures at its full rate
    assert not driver.battery_status() & BS_SLEEP
    assert driver.read_cell_voltages_v()[0] == pytest.approx(3.4)
    emulator.current_a = 0.0
    driver.disable_sleep()
    status = driver.battery_status()
    assert not status & BS_SLEEP_EN and not status & BS_SLEEP
    emulator.cell_voltage_v[0] = 3.5
    assert driver.read_cell_voltages_v()[0] == pytest.approx(3.5)


@pytest.mark.parametrize("current_a", [40.0, -40.0, 32.767, -32.768])
def test_a_saturated_cc2_reading_is_nan(current_a):
    # 1 mA userA: the signed 16-bit CC2 code ends at 32.767 A and -32.768 A; the true current
    # of a code at either end is anywhere beyond it
    driver, emulator = make()
    emulator.current_a = current_a
    assert math.isnan(driver.read_pack().cc2_current_a)


def test_the_largest_unsaturated_cc2_codes_are_readings():
    driver, emulator = make()
    for current_a in (32.766, -32.767):
        emulator.current_a = current_a
        assert driver.read_pack().cc2_current_a == pytest.approx(current_a, abs=1e-9)
