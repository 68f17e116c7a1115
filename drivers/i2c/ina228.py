"""TI INA228: 85-V, 20-bit current, voltage and temperature monitor on a shunt, over I2C.

From the INA228 data sheet (TI SBOS823): registers are big-endian, most significant byte
first. CONFIG (0x00) holds ADCRANGE (bit 4: the shunt input range, +-163.84 mV or
+-40.96 mV) and RSTACC (bit 14: clear the ENERGY and CHARGE accumulators); ADC_CONFIG
(0x01) the mode, conversion times and averaging; SHUNT_CAL (0x02, 15 bits) the calibration

    CURRENT_LSB = max current / 2^19
    SHUNT_CAL   = 13107.2e6 * CURRENT_LSB * R_shunt   (times 4 with ADCRANGE = 1)

after which CURRENT (0x07) reads in units of CURRENT_LSB and CHARGE (0x0A, 40-bit two's
complement) in CURRENT_LSB * 1 s, that is coulombs. VSHUNT (0x04), VBUS (0x05) and CURRENT
are 20-bit values in bits 23..4 of a 24-bit register (312.5 nV or 78.125 nV, 195.3125 uV,
CURRENT_LSB); DIETEMP (0x06) is 16-bit two's complement in 7.8125 m degC. DIAG_ALRT (0x0B)
reports the out-of-range diagnostics whose limits are SOVL/SUVL (0x0C/0x0D: shunt voltage,
5 uV or 1.25 uV), BOVL/BUVL (0x0E/0x0F: bus voltage, 3.125 mV) and TEMP_LIMIT (0x10:
7.8125 m degC), and the overflow and memory-checksum flags. MANUFACTURER_ID (0x3E) reads
0x5449 ("TI"), DEVICE_ID (0x3F) 0x228 in bits 15..4 and the revision in bits 3..0.

**A reset loses the calibration.** After a power-on reset (a brown-out on its supply) every
register is back at its reset value (SHUNT_CAL 0x1000, CONFIG 0x0000), and CURRENT is scaled by
the wrong SHUNT_CAL with nothing in DIAG_ALRT to say so. So every reading also reads back each
register the driver wrote; a mismatch makes that reading's current NaN and says so
(``configuration_lost``), for the caller to configure again.

**Transfers.** The 16-bit registers are SMBus words (``read_word_data`` /
``write_word_data``): SMBus puts the low byte first on the wire and the INA228 sends its most
significant byte first, so every word is byte-swapped here. The 24- and 40-bit registers are
I2C-block reads of 3 and 5 bytes. The INA228 does not move on to the next register during a
block read, so every register is its own transfer.

**Under Linux's i2c-stub** (the kernel-bus test), the stub chip is a plain array of byte
registers: a word at R is stub register R (written and read back with the same swap, so a
value preloaded with ``write_word_data(addr, R, swap16(value))`` reads back as ``value``),
but a block read of n bytes at R returns the low bytes of stub registers R..R+n-1. So a
24-bit value at 0x04 occupies stub registers 0x04..0x06 and overlaps VBUS at 0x05: a test can
preload the identity, configuration and DIETEMP words freely, but only one of the
overlapping block registers with a meaningful value.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

from drivers.i2c.bus import (
    I2cDevice,
    I2cIdentityError,
    I2cProtocolError,
    SMBusLike,
)

DEFAULT_ADDRESS = 0x40
MANUFACTURER_TI = 0x5449
DIE_ID = 0x228

CONFIG = 0x00
ADC_CONFIG = 0x01
SHUNT_CAL = 0x02
VSHUNT = 0x04
VBUS = 0x05
DIETEMP = 0x06
CURRENT = 0x07
CHARGE = 0x0A
DIAG_ALRT = 0x0B
SOVL = 0x0C
SUVL = 0x0D
BOVL = 0x0E
BUVL = 0x0F
TEMP_LIMIT = 0x10
MANUFACTURER_ID = 0x3E
DEVICE_ID = 0x3F

CONFIG_RSTACC = 1 << 14
CONFIG_ADCRANGE = 1 << 4
ADC_MODE_CONTINUOUS_ALL = 0xF
"""ADC_CONFIG MODE: continuous bus voltage, shunt voltage and temperature."""
CONVERSION_TIME_1052_US = 5
AVERAGING_CODES = {1: 0, 4: 1, 16: 2, 64: 3, 128: 4, 256: 5, 512: 6, 1024: 7}

SHUNT_CAL_FACTOR = 13107.2e6
SHUNT_RANGE_V = {0: 0.16384, 1: 0.04096}
VSHUNT_LSB_V = {0: 312.5e-9, 1: 78.125e-9}
SHUNT_LIMIT_LSB_V = {0: 5e-6, 1: 1.25e-6}
VBUS_LSB_V = 195.3125e-6
BUS_LIMIT_LSB_V = 3.125e-3
TEMP_LSB_C = 7.8125e-3
CURRENT_BITS = 19
"""CURRENT_LSB = max current / 2^19: the 20-bit signed CURRENT register's full scale."""


class Ina228Alerts(enum.IntFlag):
    """The diagnostics DIAG_ALRT reports, by its bit numbers; MEMORY_ERROR stands for its
    MEMSTAT bit reading 0 (a checksum error in the device's trim memory)."""

    POWER_OVER = 1 << 2
    BUS_UNDER = 1 << 3
    BUS_OVER = 1 << 4
    SHUNT_UNDER = 1 << 5
    SHUNT_OVER = 1 << 6
    TEMP_OVER = 1 << 7
    MATH_OVERFLOW = 1 << 9
    CHARGE_OVERFLOW = 1 << 10
    ENERGY_OVERFLOW = 1 << 11
    MEMORY_ERROR = 1 << 16


_DIAG_FLAGS = sum(flag for flag in Ina228Alerts if flag is not Ina228Alerts.MEMORY_ERROR)
_MEMSTAT = 1 << 0


@dataclass(frozen=True, slots=True)
class Ina228Reading:
    """One reading. ``current_a`` and ``charge_c`` (since the last accumulator reset) follow
    the pack's sign, positive charging (``invert_current`` applied); ``shunt_voltage_v`` is
    V(IN+) - V(IN-) as measured. NaN marks a value the chip flags as invalid (an arithmetic
    overflow) or that it cannot report (a negative bus voltage)."""

    current_a: float
    bus_voltage_v: float
    shunt_voltage_v: float
    die_temp_c: float
    charge_c: float
    alerts: Ina228Alerts
    configuration_lost: bool = False
    """A register the driver wrote reads otherwise (the chip was reset): the current and the
    charge are NaN, the rest (unscaled by SHUNT_CAL) is as read."""


def swap16(value: int) -> int:
    """Swap the bytes of a 16-bit word (SMBus low-byte-first against the INA228's order)."""
    return ((value & 0xFF) << 8) | (value >> 8)


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value & (1 << (bits - 1)) else value


class Ina228:
    """An INA228 on a shunt of ``shunt_resistance_ohm``, calibrated for currents up to
    ``max_current_a``; ``invert_current`` when the shunt is wired so that charging current
    makes V(IN+) < V(IN-).

    ``bus`` is an open ``smbus2.SMBus`` (or an object with the same methods). Methods raise
    :class:`~drivers.i2c.bus.I2cError` subclasses. ``averages`` (1, 4, .., 1024) sets the
    ADC averaging; with 1052-us conversions a new current is ready every 3.2 ms times that.
    """

    def __init__(
        self,
        bus: SMBusLike,
        address: int,
        shunt_resistance_ohm: float,
        max_current_a: float,
        invert_current: bool = False,
        *,
        averages: int = 4,
        bus_number: int | None = None,
    ):
        if not shunt_resistance_ohm > 0.0 or not max_current_a > 0.0:
            raise ValueError("shunt resistance and maximum current must be positive")
        if averages not in AVERAGING_CODES:
            raise ValueError(f"averages must be one of {sorted(AVERAGING_CODES)}")
        max_shunt_v = shunt_resistance_ohm * max_current_a
        if max_shunt_v > SHUNT_RANGE_V[0]:
            raise ValueError(
                f"{max_current_a:g} A through {shunt_resistance_ohm:g} ohm is "
                f"{max_shunt_v * 1e3:g} mV, beyond the INA228's +-163.84 mV shunt input"
            )
        self.device = I2cDevice(bus, address, bus_number)
        self.shunt_resistance_ohm = shunt_resistance_ohm
        self.invert_current = invert_current
        self.averages = averages
        self.adc_range = 1 if max_shunt_v <= SHUNT_RANGE_V[1] else 0
        nominal_lsb_a = max_current_a / 2**CURRENT_BITS
        scale = 4 if self.adc_range else 1
        self.shunt_cal = round(SHUNT_CAL_FACTOR * nominal_lsb_a * shunt_resistance_ohm * scale)
        if not 1 <= self.shunt_cal <= 0x7FFF:
            raise ValueError(
                f"SHUNT_CAL {self.shunt_cal} is outside 1..32767: {max_current_a:g} A through "
                f"{shunt_resistance_ohm:g} ohm is too small a shunt voltage to measure"
            )
        # The chip divides by the integer SHUNT_CAL, so its LSB is the one that integer
        # gives, not the nominal one (the difference is SHUNT_CAL's rounding).
        self.current_lsb_a = self.shunt_cal / (SHUNT_CAL_FACTOR * shunt_resistance_ohm * scale)
        self.written: dict[int, int] = {}
        """Each register written (and read back) with its value: what every reading checks."""

    def __str__(self) -> str:
        return f"INA228 at {self.device}"

    def _read_word(self, register: int) -> int:
        return swap16(self.device.read_word(register))

    def _write_word(self, register: int, value: int, verify: bool = True) -> None:
        """Write a register; with ``verify``, read it back and keep it for the readings'
        check (RSTACC, which clears itself, is written without)."""
        self.device.write_word(register, swap16(value))
        if verify:
            self.written.pop(register, None)
            got = self._read_word(register)
            if got != value:
                raise self.device.error(
                    I2cProtocolError,
                    f"register 0x{register:02x} reads back 0x{got:04x} after writing 0x{value:04x}",
                )
            self.written[register] = value

    def configuration_holds(self) -> bool:
        """Every register written still reads what was written (false after a reset)."""
        return all(self._read_word(register) == value for register, value in self.written.items())

    def _read_wide(self, register: int, n_bytes: int) -> int:
        return int.from_bytes(self.device.read_block(register, n_bytes), "big")

    def check_identity(self) -> None:
        """Raise :class:`I2cIdentityError` unless an INA228 answers (manufacturer "TI",
        die 0x228); an absent device raises the bus's NACK error."""
        manufacturer = self._read_word(MANUFACTURER_ID)
        device_id = self._read_word(DEVICE_ID)
        if manufacturer != MANUFACTURER_TI or device_id >> 4 != DIE_ID:
            raise self.device.error(
                I2cIdentityError,
                f"expected an INA228 (manufacturer 0x{MANUFACTURER_TI:04x}, device "
                f"0x{DIE_ID:03x}x), found manufacturer 0x{manufacturer:04x}, "
                f"device 0x{device_id:04x}",
            )

    def configure(self, reset_charge: bool = True) -> None:
        """Write CONFIG (the shunt range), ADC_CONFIG (continuous conversions, averaging)
        and SHUNT_CAL, each read back; then clear the charge accumulator if asked."""
        config = CONFIG_ADCRANGE if self.adc_range else 0
        self._write_word(CONFIG, config)
        adc_config = (
            (ADC_MODE_CONTINUOUS_ALL << 12)
            | (CONVERSION_TIME_1052_US << 9)
            | (CONVERSION_TIME_1052_US << 6)
            | (CONVERSION_TIME_1052_US << 3)
            | AVERAGING_CODES[self.averages]
        )
        self._write_word(ADC_CONFIG, adc_config)
        self._write_word(SHUNT_CAL, self.shunt_cal)
        if reset_charge:
            self.reset_charge()

    def reset_charge(self) -> None:
        """Clear the ENERGY and CHARGE accumulators (RSTACC clears itself, so it is not
        read back)."""
        config = CONFIG_ADCRANGE if self.adc_range else 0
        self._write_word(CONFIG, config | CONFIG_RSTACC, verify=False)

    def read(self) -> Ina228Reading:
        """Shunt and bus voltage, die temperature, current, charge and the diagnostics, then
        the written registers read back: six transfers plus one per register written (every
        register is its own). The read-back comes after the conversions, so a reset before
        or during them is caught."""
        sign = -1.0 if self.invert_current else 1.0
        vshunt = _signed(self._read_wide(VSHUNT, 3) >> 4, 20)
        vbus = _signed(self._read_wide(VBUS, 3) >> 4, 20)
        dietemp = _signed(self._read_word(DIETEMP), 16)
        current = _signed(self._read_wide(CURRENT, 3) >> 4, 20)
        charge = _signed(self._read_wide(CHARGE, 5), 40)
        diag = self._read_word(DIAG_ALRT)
        alerts = Ina228Alerts(diag & _DIAG_FLAGS)
        if not diag & _MEMSTAT:
            alerts |= Ina228Alerts.MEMORY_ERROR
        lost = not self.configuration_holds()
        current_a = sign * current * self.current_lsb_a
        charge_c = sign * charge * self.current_lsb_a
        if alerts & Ina228Alerts.MATH_OVERFLOW or lost:
            current_a = math.nan
        if lost:
            charge_c = math.nan
        return Ina228Reading(
            current_a=current_a,
            bus_voltage_v=vbus * VBUS_LSB_V if vbus >= 0 else math.nan,
            shunt_voltage_v=vshunt * VSHUNT_LSB_V[self.adc_range],
            die_temp_c=dietemp * TEMP_LSB_C,
            charge_c=charge_c,
            alerts=alerts,
            configuration_lost=lost,
        )

    def set_alert_limits(
        self,
        current_high_a: float | None = None,
        current_low_a: float | None = None,
        bus_high_v: float | None = None,
        bus_low_v: float | None = None,
        temp_high_c: float | None = None,
    ) -> None:
        """Program the out-of-range diagnostics (left out: unchanged). Currents follow the
        pack's sign (positive charging) and become shunt-voltage limits: with
        ``invert_current`` the high current limit is the shunt's under-voltage limit.
        Every limit is read back; one the register cannot hold raises ValueError."""
        lsb_v = SHUNT_LIMIT_LSB_V[self.adc_range]
        sign = -1.0 if self.invert_current else 1.0
        writes: list[tuple[int, int]] = []
        for current_a, is_high in ((current_high_a, True), (current_low_a, False)):
            if current_a is None:
                continue
            code = _limit_code(sign * current_a * self.shunt_resistance_ohm / lsb_v, True)
            writes.append((SOVL if is_high == (sign > 0) else SUVL, code))
        for volts, register in ((bus_high_v, BOVL), (bus_low_v, BUVL)):
            if volts is not None:
                writes.append((register, _limit_code(volts / BUS_LIMIT_LSB_V, False, 15)))
        if temp_high_c is not None:
            writes.append((TEMP_LIMIT, _limit_code(temp_high_c / TEMP_LSB_C, True)))
        for register, code in writes:
            self._write_word(register, code)


def _limit_code(value: float, signed: bool, bits: int = 16) -> int:
    code = round(value)
    low, high = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if not low <= code <= high:
        raise ValueError(f"limit code {code} does not fit the register ({low}..{high})")
    return code & 0xFFFF
