"""The INA228 driver over a real /dev/i2c-N: Linux's i2c-stub in the guest's kernel.

i2c-stub is a plain SMBus register array (one 16-bit word per register number): a word read
of register R returns word R, a byte or I2C-block read returns the low bytes of words R, R+1,
... So the INA228's wide registers overlap in the stub (VSHUNT at 0x04 is bytes 0x04-0x06,
VBUS at 0x05 is 0x05-0x07, ...); the tests preload one image of bytes and words and derive
every value the driver must report from that image with the INA228 datasheet's (TI SBOS823)
register layout and LSB sizes, independently of the driver.

SMBus words are little-endian on the wire while the INA228 sends its most significant byte
first: the register value V of a 16-bit register is the stub word with V's bytes swapped.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import smbus2

from drivers.i2c.bus import I2cIdentityError, I2cNoDeviceError
from drivers.i2c.ina228 import Ina228, Ina228Alerts
from tests.kernel.harness import I2C_STUB_ADDRESSES

INA228_ADDRESS, OTHER_PART_ADDRESS = I2C_STUB_ADDRESSES
ABSENT_ADDRESS = 0x45
SHUNT_OHM = 0.0005
MAX_CURRENT_A = 60.0  # 30 mV at full scale

# Datasheet register addresses and LSB sizes
CONFIG, ADC_CONFIG, SHUNT_CAL = 0x00, 0x01, 0x02
DIETEMP, DIAG_ALRT, MANUFACTURER_ID, DEVICE_ID = 0x06, 0x0B, 0x3E, 0x3F
VBUS_LSB_V = 195.3125e-6
DIETEMP_LSB_C = 7.8125e-3
VSHUNT_LSB_V = {0: 312.5e-9, 1: 78.125e-9}  # by CONFIG.ADCRANGE (bit 4)
SHUNT_RANGE_V = {0: 163.84e-3, 1: 40.96e-3}

# Low bytes of stub words 0x04..0x0E: what the block reads of the wide registers return.
BLOCK_BYTES = {
    0x04: 0x01,
    0x05: 0x2C,
    0x06: 0x0C,
    0x07: 0xF9,
    0x08: 0x87,
    0x09: 0x60,
    0x0A: 0xFF,
    0x0B: 0xF0,  # also DIAG_ALRT's high byte: ALATCH, CNVR, SLOWALERT, APOL; no overflow
    0x0C: 0xFB,
    0x0D: 0x2E,
    0x0E: 0x00,
}
# High bytes of the words that are 16-bit registers (their low byte is shared with the above).
WORD_HIGH_BYTES = {
    DIETEMP: 0x80,  # DIETEMP's least significant byte
    DIAG_ALRT: 0x91,  # TMPOL (7), BUSOL (4) and MEMSTAT (0, 1 = no memory error)
}


def swap16(value: int) -> int:
    return ((value & 0xFF) << 8) | (value >> 8)


def signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


def wide(first: int, n_bytes: int) -> int:
    """A wide register as the INA228 sends it, most significant byte first, from the stub."""
    return int.from_bytes(bytes(BLOCK_BYTES[first + i] for i in range(n_bytes)), "big")


def register16(register: int) -> int:
    """A 16-bit register's value: the stub word, bytes swapped."""
    word = (WORD_HIGH_BYTES.get(register, 0) << 8) | BLOCK_BYTES.get(register, 0)
    return swap16(word)


def stub_bus_number() -> int:
    for adapter in sorted(Path("/sys/class/i2c-adapter").iterdir()):
        if "stub" in (adapter / "name").read_text().lower():
            return int(adapter.name.removeprefix("i2c-"))
    raise AssertionError("no i2c-stub adapter: is the module loaded (see tests/kernel/init.sh)?")


@pytest.fixture
def bus():
    """/dev/i2c-N of i2c-stub, with the image preloaded: an INA228 at INA228_ADDRESS and a
    part with another die id at OTHER_PART_ADDRESS."""
    with smbus2.SMBus(stub_bus_number()) as smbus:
        for register, low in BLOCK_BYTES.items():
            word = (WORD_HIGH_BYTES.get(register, 0) << 8) | low
            smbus.write_word_data(INA228_ADDRESS, register, word)
        for address, device_id in ((INA228_ADDRESS, 0x2281), (OTHER_PART_ADDRESS, 0x2260)):
            smbus.write_word_data(address, MANUFACTURER_ID, swap16(0x5449))  # "TI"
            smbus.write_word_data(address, DEVICE_ID, swap16(device_id))
        yield smbus


def make_ina228(bus, address: int = INA228_ADDRESS) -> Ina228:
    return Ina228(bus, address, shunt_resistance_ohm=SHUNT_OHM, max_current_a=MAX_CURRENT_A)


def test_identity_check_passes_on_an_ina228_and_fails_on_another_part(bus):
    make_ina228(bus).check_identity()
    with pytest.raises(I2cIdentityError, match="0x2260"):
        make_ina228(bus, OTHER_PART_ADDRESS).check_identity()


def test_an_absent_address_is_the_drivers_no_device_error(bus):
    with pytest.raises(I2cNoDeviceError, match="0x45"):
        make_ina228(bus, ABSENT_ADDRESS).check_identity()


def programmed_current_lsb_a(bus) -> tuple[float, int]:
    """CURRENT_LSB as the chip derives it from what configure() wrote (datasheet:
    SHUNT_CAL = 13107.2e6 * CURRENT_LSB * R_SHUNT, times 4 with ADCRANGE = 1), and ADCRANGE."""
    adc_range = (swap16(bus.read_word_data(INA228_ADDRESS, CONFIG)) >> 4) & 1
    shunt_cal = swap16(bus.read_word_data(INA228_ADDRESS, SHUNT_CAL)) & 0x7FFF
    return shunt_cal / (13107.2e6 * SHUNT_OHM * (4 if adc_range else 1)), adc_range


def test_configure_programs_the_datasheet_calibration(bus):
    make_ina228(bus).configure()
    lsb_a, adc_range = programmed_current_lsb_a(bus)
    # the full-scale shunt voltage must fit the range chosen ...
    assert SHUNT_RANGE_V[adc_range] >= MAX_CURRENT_A * SHUNT_OHM
    # ... and CURRENT_LSB is the datasheet's max current / 2^19, to SHUNT_CAL's rounding
    nominal_lsb_a = MAX_CURRENT_A / 2**19
    shunt_cal = swap16(bus.read_word_data(INA228_ADDRESS, SHUNT_CAL)) & 0x7FFF
    assert shunt_cal == round(13107.2e6 * nominal_lsb_a * SHUNT_OHM * (4 if adc_range else 1))
    assert lsb_a == pytest.approx(nominal_lsb_a, rel=1e-3)
    mode = swap16(bus.read_word_data(INA228_ADDRESS, ADC_CONFIG)) >> 12
    assert mode == 0xF, "continuous shunt voltage, bus voltage and temperature conversions"


def expected_reading(lsb_a: float, adc_range: int) -> dict[str, float]:
    return {
        "current_a": signed(wide(0x07, 3) >> 4, 20) * lsb_a,
        "bus_voltage_v": signed(wide(0x05, 3) >> 4, 20) * VBUS_LSB_V,
        "shunt_voltage_v": signed(wide(0x04, 3) >> 4, 20) * VSHUNT_LSB_V[adc_range],
        "die_temp_c": signed(register16(DIETEMP), 16) * DIETEMP_LSB_C,
        "charge_c": signed(wide(0x0A, 5), 40) * lsb_a,
    }


def assert_reading(reading, expected: dict[str, float]) -> None:
    for name, value in expected.items():
        assert getattr(reading, name) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_values_decode_through_dev_i2c(bus):
    ina = make_ina228(bus)
    ina.check_identity()
    ina.configure(reset_charge=False)  # the stub does not emulate RSTACC: keep the image
    expected = expected_reading(*programmed_current_lsb_a(bus))
    # a sanity check of the image itself: 35.24 V, 25.0 degC, a discharge, a negative charge
    assert expected["bus_voltage_v"] == pytest.approx(35.2404297)
    assert expected["die_temp_c"] == 25.0
    assert expected["current_a"] < 0 and expected["charge_c"] < 0
    reading = ina.read()
    assert_reading(reading, expected)
    diag = register16(DIAG_ALRT)
    assert diag & 1, "MEMSTAT set: no memory error in the image"
    assert reading.alerts == Ina228Alerts.TEMP_OVER | Ina228Alerts.BUS_OVER


def test_i2c_transactions_per_second_through_the_stub(bus, metrics):
    ina = make_ina228(bus)
    ina.configure(reset_charge=False)
    expected = expected_reading(*programmed_current_lsb_a(bus))
    n_reads = 200
    start_s = time.perf_counter()
    for _ in range(n_reads):
        reading = ina.read()
    elapsed_s = time.perf_counter() - start_s
    assert_reading(reading, expected)
    n_words = 1000
    start_s = time.perf_counter()
    for _ in range(n_words):
        assert bus.read_word_data(INA228_ADDRESS, DEVICE_ID) == swap16(0x2281)
    words_s = time.perf_counter() - start_s
    # read() is nine transfers: four block reads (VSHUNT, VBUS, CURRENT, CHARGE), two words
    # (DIETEMP, DIAG_ALRT) and the read-back of CONFIG, ADC_CONFIG and SHUNT_CAL
    metrics["i2c_ina228_reads_per_s"] = n_reads / elapsed_s
    metrics["i2c_ina228_transactions_per_s"] = 9 * n_reads / elapsed_s
    metrics["i2c_word_reads_per_s"] = n_words / words_s
