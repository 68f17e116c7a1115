"""A TI INA228 at register level, from its data sheet (SBOS823).

It holds the physical truth (the current through the board's shunt in A, the bus voltage,
the die temperature) and turns it into codes as the chip does: the shunt voltage I * R in
312.5 nV (ADCRANGE 0) or 78.125 nV (ADCRANGE 1) steps, saturating at the 20-bit range;
CURRENT = VSHUNT * 4096 / SHUNT_CAL (what SHUNT_CAL = 13107.2e6 * CURRENT_LSB * R, times 4
with ADCRANGE 1, means: one code per CURRENT_LSB; 0 while SHUNT_CAL is 0) with MATHOF when
it does not fit 20 bits; VBUS in 195.3125 uV, DIETEMP in 7.8125 m degC; CHARGE integrates
CURRENT over the time given to :meth:`advance` (one code per CURRENT_LSB * 1 s).
Registers are big-endian; reads past a register's width return 0.

DIAG_ALRT reports SHNTOL/SHNTUL (VSHUNT against SOVL/SUVL, 16 VSHUNT codes per limit LSB),
BUSOL/BUSUL (VBUS against BOVL/BUVL, also 16 per LSB), TMPOL (DIETEMP against TEMP_LIMIT),
MATHOF, CHARGEOF, CNVRF and MEMSTAT; with ALATCH set the flags hold until DIAG_ALRT is read.
CONFIG's RST restores every register, RSTACC clears the charge; both read back as 0.
TEMP_LIMIT resets to 0x7FFF here (a limit of -1 LSB, as a literal reading of the table's
0xFFFF would give, would flag every temperature above 0 degC).

Faults beyond the generic ones: ``stuck`` (codes frozen at the last read), ``memory_error``
(MEMSTAT reads 0), ``manufacturer_id``/``device_id`` (a wrong part), ``force_register``.
"""

from __future__ import annotations

import math

from tests.emulators.smbus import EmulatedDevice

ADDRESS = 0x40
RESET = {
    0x00: 0x0000,  # CONFIG
    0x01: 0xFB68,  # ADC_CONFIG
    0x02: 0x1000,  # SHUNT_CAL
    0x03: 0x0000,  # SHUNT_TEMPCO
    0x0B: 0x0001,  # DIAG_ALRT (MEMSTAT)
    0x0C: 0x7FFF,  # SOVL
    0x0D: 0x8000,  # SUVL
    0x0E: 0x7FFF,  # BOVL
    0x0F: 0x0000,  # BUVL
    0x10: 0x7FFF,  # TEMP_LIMIT
    0x11: 0xFFFF,  # PWR_LIMIT
}
WIDTHS = {0x04: 3, 0x05: 3, 0x07: 3, 0x08: 3, 0x09: 5, 0x0A: 5}
MAX20 = (1 << 19) - 1


def _clamp20(value: float) -> tuple[int, bool]:
    code = math.trunc(value)
    return max(-MAX20 - 1, min(MAX20, code)), abs(code) > MAX20


def _signed16(value: int) -> int:
    return value - 0x10000 if value & 0x8000 else value


class Ina228Emulator(EmulatedDevice):
    def __init__(self, address: int = ADDRESS, shunt_resistance_ohm: float = 0.0005):
        super().__init__()
        self.address = address
        self.shunt_resistance_ohm = shunt_resistance_ohm
        self.current_a = 0.0
        self.bus_voltage_v = 48.0
        self.die_temp_c = 30.0
        self.manufacturer_id = 0x5449
        self.device_id = 0x2281
        self.memory_error = False
        self.stuck = False
        self.registers = dict(RESET)
        self.charge_code_s = 0.0
        self._charge_overflow = False
        self._latched = 0
        self._frozen: dict[int, bytes] | None = None
        self._forced: dict[int, bytes] = {}

    # the conversions ---------------------------------------------------------------------

    @property
    def adc_range(self) -> int:
        return (self.registers[0x00] >> 4) & 1

    def vshunt_code(self) -> int:
        lsb_v = 78.125e-9 if self.adc_range else 312.5e-9
        return _clamp20(round(self.current_a * self.shunt_resistance_ohm / lsb_v))[0]

    def current_code(self) -> tuple[int, bool]:
        shunt_cal = self.registers[0x02] & 0x7FFF
        if shunt_cal == 0:
            return 0, False
        return _clamp20(self.vshunt_code() * 4096 / shunt_cal)

    def vbus_code(self) -> int:
        return max(0, _clamp20(round(self.bus_voltage_v / 195.3125e-6))[0])

    def dietemp_code(self) -> int:
        return max(-32768, min(32767, round(self.die_temp_c / 7.8125e-3)))

    def advance(self, dt_s: float) -> None:
        """Let ``dt_s`` of conversions pass: the charge accumulates the current."""
        with self.lock:
            self.charge_code_s += self.current_code()[0] * dt_s
            if abs(self.charge_code_s) >= 1 << 39:
                self._charge_overflow = True
                self.charge_code_s = math.fmod(self.charge_code_s, float(1 << 39))

    def force_register(self, register: int, data: bytes) -> None:
        with self.lock:
            self._forced[register] = bytes(data)

    def _flags(self) -> int:
        flags = 0b10  # CNVRF: a conversion is always complete here
        vshunt, vbus = self.vshunt_code(), self.vbus_code()
        if vshunt > _signed16(self.registers[0x0C]) * 16:
            flags |= 1 << 6
        if vshunt < _signed16(self.registers[0x0D]) * 16:
            flags |= 1 << 5
        if vbus > self.registers[0x0E] * 16:
            flags |= 1 << 4
        if vbus < self.registers[0x0F] * 16:
            flags |= 1 << 3
        if self.dietemp_code() > _signed16(self.registers[0x10]):
            flags |= 1 << 7
        if self.current_code()[1]:
            flags |= 1 << 9
        if self._charge_overflow:
            flags |= 1 << 10
        if not self.memory_error:
            flags |= 1 << 0
        return flags

    def _register_bytes(self, register: int) -> bytes:
        if register in self._forced:
            return self._forced[register]
        if register == 0x04:
            return ((self.vshunt_code() & 0xFFFFF) << 4).to_bytes(3, "big")
        if register == 0x05:
            return (self.vbus_code() << 4).to_bytes(3, "big")
        if register == 0x06:
            return (self.dietemp_code() & 0xFFFF).to_bytes(2, "big")
        if register == 0x07:
            return ((self.current_code()[0] & 0xFFFFF) << 4).to_bytes(3, "big")
        if register == 0x0A:
            return (round(self.charge_code_s) & ((1 << 40) - 1)).to_bytes(5, "big")
        if register in (0x08, 0x09):
            return bytes(WIDTHS[register])  # power and energy are not modelled
        if register == 0x0B:
            flags = self._flags() | self._latched
            if self.registers[0x0B] & 0x8000:  # ALATCH: hold until this read
                self._latched = 0
            return ((self.registers[0x0B] & 0xF000) | flags).to_bytes(2, "big")
        if register == 0x3E:
            return self.manufacturer_id.to_bytes(2, "big")
        if register == 0x3F:
            return self.device_id.to_bytes(2, "big")
        return self.registers.get(register, 0).to_bytes(2, "big")

    # the wire -------------------------------------------------------------------------------

    def read_registers(self, register: int, length: int) -> bytes:
        if self.registers[0x0B] & 0x8000:
            self._latched |= self._flags() & 0x0FFC
        if self.stuck and self._frozen is not None and register in self._frozen:
            value = self._frozen[register]
        else:
            value = self._register_bytes(register)
            if self._frozen is None:
                self._frozen = {}
            self._frozen[register] = value
        return (value + bytes(length))[:length]

    def write_registers(self, register: int, data: bytes) -> None:
        if len(data) < 2 or register not in RESET:
            return  # a partial word, or a read-only register: ignored
        value = int.from_bytes(data[:2], "big")
        if register == 0x00:
            if value & 0x8000:
                self.registers = dict(RESET)
                self.charge_code_s = 0.0
                self._charge_overflow = False
                return
            if value & 0x4000:
                self.charge_code_s = 0.0
                self._charge_overflow = False
            value &= 0x3FFF
        elif register == 0x02:
            value &= 0x7FFF
        elif register == 0x0B:
            value = (value & 0xF000) | (self.registers[0x0B] & 0x0FFF)
        self.registers[register] = value
