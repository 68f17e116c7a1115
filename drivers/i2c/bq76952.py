"""TI BQ76952 battery monitor and protector (3 to 16 series cells) over I2C.

Everything here follows the BQ76952 Technical Reference Manual (TI SLUUBY2B; "TRM") and the
data sheet (SLUSE13):

- **Direct commands** are registers read or written at a 7-bit command address; the device
  increments the address after every byte, so one block read fetches contiguous commands
  (the 16 cell voltages 0x14..0x33 in one 32-byte transfer). Values are little-endian.
- **Subcommands** go through the transfer buffer: the 16-bit subcommand is written to
  0x3E/0x3F; for one that returns data the host polls 0x3E/0x3F until it reads back the
  subcommand (0xFF while the device is busy: it does not clock-stretch here), then reads the
  length at 0x61 (data length + 4), the data at 0x40.. and the checksum at 0x60: the one's
  complement of the 8-bit sum of 0x3E, 0x3F and the data. A subcommand that takes data gets
  it at 0x40.. and becomes effective when its checksum and length are written to 0x60/0x61.
- **Data memory** (0x9180..0x93FF) is read and written the same way with the address in
  place of the subcommand; a read returns a 32-byte block. Writes are made only in
  CONFIG_UPDATE mode (SET_CFGUPDATE / EXIT_CFGUPDATE), which stops normal operation while it
  lasts ("the device stops normal firmware operation and stops all measurements and
  protection monitoring"), so the driver enters it only when a setting differs and reads every
  value back. A chip found in it (a host killed between the two) is taken out of it.
- **Settings live in RAM.** A full reset (power loss, watchdog) brings back the OTP or default
  settings, Vcell Mode and CC Gain included, and sets Battery Status POR, which stays set until
  CONFIG_UPDATE is next left: the host must configure again.
- **SLEEP** (Power Config SLEEP, set by default): below Power:Sleep:Sleep Current the chip
  sleeps and measures only every Power:Sleep:Voltage Time (5 s by default); Battery Status
  SLEEP says so and SLEEP_EN says it is allowed. A BMS loop needs fresh values: the driver
  sends SLEEP_DISABLE.
- **I2C CRC mode** (Settings:Configuration:Comm Type): every data byte is followed by a
  CRC-8 (x^8+x^2+x+1, initial 0). The CRC of the first data byte of a transfer covers the
  address byte(s) and the command too ([addr+W, cmd, data] when writing, [addr+W, cmd,
  addr+R, data] when reading); every later byte's CRC covers that byte alone. The device
  NACKs a byte whose CRC is wrong.
- **User units** (Settings:Configuration:DA Configuration, default 0x05): cell voltages in
  mV; stack, PACK and LD in userV (10 mV by default); currents in userA (1 mA by default);
  temperatures in 0.1 K. Charging current is positive (TRM: SRP positive relative to SRN
  while charging), as it is in pybms.

Values are read as an SMBus I2C-block transfer (write the command, repeated start, read),
at most 32 bytes each, which every Linux adapter and i2c-stub support.
"""

from __future__ import annotations

import logging
import math
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from drivers.i2c.bus import (
    SMBUS_BLOCK_MAX,
    I2cCrcError,
    I2cDevice,
    I2cError,
    I2cIdentityError,
    I2cNackError,
    I2cProtocolError,
    crc8,
)

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = 0x08
"""7-bit I2C address out of reset (0x10 write / 0x11 read as 8-bit, data sheet)."""
DEVICE_NUMBER = 0x7695
N_CELL_INPUTS = 16
MIN_CELLS = 3

# Direct commands (TRM, direct commands table)
SAFETY_ALERT_A = 0x02  # .. 0x07: alert A, status A, alert B, status B, alert C, status C
BATTERY_STATUS = 0x12
CELL1_VOLTAGE = 0x14  # .. 0x32, 2 bytes each, mV
STACK_VOLTAGE = 0x34  # then PACK pin 0x36, LD pin 0x38 (userV), CC2 current 0x3A (userA)
SUBCOMMAND = 0x3E
TRANSFER_BUFFER = 0x40
CHECKSUM = 0x60  # length at 0x61
ALARM_STATUS = 0x62
INT_TEMPERATURE = 0x68  # .. 0x7A: the temperatures below, 0.1 K
FET_STATUS = 0x7F

TEMPERATURE_INPUTS = (
    "internal",
    "cfetoff",
    "dfetoff",
    "alert",
    "ts1",
    "ts2",
    "ts3",
    "hdq",
    "dchg",
    "ddsg",
)
"""The temperatures 0x68, 0x6A, .., 0x7A in address order: the die sensor, then the pins that
can carry a thermistor (each must be configured as one in the chip's pin settings)."""

# Subcommands (TRM, subcommand tables)
SUB_DEVICE_NUMBER = 0x0001
SUB_FW_VERSION = 0x0002
SUB_HW_VERSION = 0x0003
SUB_FET_ENABLE = 0x0022
SUB_MANUFACTURING_STATUS = 0x0057
SUB_CB_ACTIVE_CELLS = 0x0083
SUB_SET_CFGUPDATE = 0x0090
SUB_EXIT_CFGUPDATE = 0x0092
SUB_ALL_FETS_OFF = 0x0095
SUB_ALL_FETS_ON = 0x0096
SUB_SLEEP_ENABLE = 0x0099
SUB_SLEEP_DISABLE = 0x009A
SUB_SWAP_COMM_MODE = 0x29BC

# Data memory (TRM, data memory summary)
DM_CC_GAIN = 0x91A8  # F4, Calibration:Current:CC Gain
DM_CAPACITY_GAIN = 0x91AC  # F4, Calibration:Current:Capacity Gain
DM_COMM_TYPE = 0x9239  # U1, Settings:Configuration:Comm Type
DM_DA_CONFIGURATION = 0x9303  # H1, Settings:Configuration:DA Configuration
DM_VCELL_MODE = 0x9304  # H2, Settings:Configuration:Vcell Mode
DM_BLOCK_LENGTH = 32

COMM_TYPE_CRC = {0x07: 0x11, 0x1E: 0x11, 0x11: 0x11}
"""Comm Type with the CRC added, keeping the bus speed: 0x07 (I2C up to 100 kHz) and 0x1E
(100 kHz with timeouts) become 0x11 (I2C with CRC); every other I2C setting (0x00 default,
0x08 fast, 0x09 fast with timeouts) becomes 0x12 (I2C fast with CRC)."""
COMM_TYPE_FAST_CRC = 0x12

CC_GAIN_PER_MOHM = 7.5684
"""CC Gain = 7.5684 / sense resistance in mOhm, at the typical VREF2 (TRM, current
calibration); Capacity Gain = CC Gain * CAPACITY_GAIN_FACTOR."""
CAPACITY_GAIN_FACTOR = 298261.6178

# Battery Status bits (TRM, Battery Status register)
BS_CFGUPDATE = 1 << 0  # in CONFIG_UPDATE mode: no measurements, no protections
BS_SLEEP_EN = 1 << 2  # SLEEP mode is allowed
BS_POR = 1 << 3  # a full reset happened (RAM settings lost); cleared on leaving CONFIG_UPDATE
BS_SEC_SHIFT = 8  # 2 bits: 0 not initialised, 1 FULLACCESS, 2 UNSEALED, 3 SEALED
BS_SS = 1 << 11  # an enabled safety fault is triggered
BS_PF = 1 << 12  # a permanent fail fault is triggered
BS_SLEEP = 1 << 15  # in SLEEP mode: measurements only every Power:Sleep:Voltage Time
SECURITY_STATES = {0: "not initialised", 1: "FULLACCESS", 2: "UNSEALED", 3: "SEALED"}

MFG_FET_EN = 1 << 4
"""Manufacturing Status FET_EN: 1 = firmware (autonomous) FET control, 0 = FET test mode."""

# FET Status bits
FET_CHG, FET_PCHG, FET_DSG, FET_PDSG = 1 << 0, 1 << 1, 1 << 2, 1 << 3

SAFETY_BITS: tuple[dict[int, str], dict[int, str], dict[int, str]] = (
    {2: "CUV", 3: "COV", 4: "OCC", 5: "OCD1", 6: "OCD2", 7: "SCD"},
    {0: "UTC", 1: "UTD", 2: "UTINT", 4: "OTC", 5: "OTD", 6: "OTINT", 7: "OTF"},
    {1: "HWDF", 2: "PTO", 4: "COVL", 5: "OCDL", 6: "SCDL", 7: "OCD3"},
)
"""TRM names of the Safety Alert / Safety Status A, B and C bits, by bit number."""

CELL_RANGE_V = (-0.2, 5.5)
"""What a cell input can measure (data sheet); a reading outside is not a measurement."""
CODE_FULL_SCALE = (-32768, 32767)
"""16-bit codes at which a reading saturates: the true value is anywhere beyond, so NaN."""
STACK_RANGE_V = (0.0, 85.0)
TEMPERATURE_RANGE_C = (-60.0, 150.0)
KELVIN_OFFSET = 273.15

SUBCOMMAND_TIMEOUT_S = 0.05
"""The slowest subcommand in the TRM's timing table takes about 8.5 ms; this is generous."""
SUBCOMMAND_POLL_S = 0.0005


@dataclass(frozen=True, slots=True)
class UserUnits:
    """The sizes of userA and userV the chip reports in (from DA Configuration)."""

    current_a: float
    voltage_v: float

    @classmethod
    def from_da_configuration(cls, value: int) -> UserUnits:
        """USER_AMPS (bits 1:0): 0.1 mA, 1 mA, 10 mA or 100 mA; USER_VOLTS_CV (bit 2): 10 mV
        when set, 1 mV when clear."""
        return cls(
            current_a=(1e-4, 1e-3, 1e-2, 1e-1)[value & 0x03],
            voltage_v=0.01 if value & 0x04 else 0.001,
        )

    @property
    def current_full_scale_a(self) -> float:
        """The largest current the 16-bit signed CC2 reading can carry."""
        return 32767 * self.current_a

    @property
    def voltage_full_scale_v(self) -> float:
        return 32767 * self.voltage_v


DEFAULT_UNITS = UserUnits.from_da_configuration(0x05)


@dataclass(frozen=True, slots=True)
class PackReading:
    """Stack (sum of the chip's cells, at its top), PACK and LD pin voltages, CC2 current
    (positive charging); NaN where the reading is outside what the chip can measure."""

    stack_v: float
    pack_pin_v: float
    ld_pin_v: float
    cc2_current_a: float


@dataclass(frozen=True, slots=True)
class SafetyReading:
    """Safety Alert (a threshold is crossed, its delay runs) and Safety Status (the fault
    has triggered) registers A, B and C."""

    alert: tuple[int, int, int]
    status: tuple[int, int, int]

    @property
    def faults(self) -> tuple[str, ...]:
        """TRM names of the triggered safety faults (``COV``, ``SCD``, ...)."""
        return _bit_names(self.status)

    @property
    def alerts(self) -> tuple[str, ...]:
        return _bit_names(self.alert)


@dataclass(frozen=True, slots=True)
class ChipStatus:
    """Safety Alert/Status A..C and Battery Status, read in one transfer."""

    safety: SafetyReading
    battery: int
    """Battery Status (the ``BS_*`` bits)."""


def _bit_names(registers: tuple[int, int, int]) -> tuple[str, ...]:
    return tuple(
        name
        for value, names in zip(registers, SAFETY_BITS, strict=True)
        for bit, name in names.items()
        if value & (1 << bit)
    )


def subcommand_checksum(command: int, data: bytes) -> int:
    """The transfer-buffer checksum: one's complement of the 8-bit sum of the subcommand's
    two bytes and the data."""
    total = (command & 0xFF) + (command >> 8) + sum(data)
    return ~total & 0xFF


def vcell_mode(cell_inputs: Sequence[int]) -> int:
    """Vcell Mode for cells on these inputs (1..16): bit n-1 set for a cell between VCn and
    VCn-1; the other inputs are shorted or measure an interconnect and get no protection."""
    mask = 0
    for cell_input in cell_inputs:
        mask |= 1 << (cell_input - 1)
    return mask


def _signed16(low: int, high: int) -> int:
    value = low | (high << 8)
    return value - 0x10000 if value & 0x8000 else value


def _in_range(value: float, bounds: tuple[float, float]) -> float:
    return value if bounds[0] <= value <= bounds[1] else math.nan


class Bq76952:
    """One BQ76952 on an I2C bus.

    ``crc``: whether transfers carry the I2C CRC; :meth:`detect_crc` finds out which mode
    the device is in. Every method raises :class:`~drivers.i2c.bus.I2cError` (a subclass)
    when the transfer or the device fails; none retries, the caller decides.
    """

    def __init__(
        self,
        device: I2cDevice,
        crc: bool = False,
        *,
        units: UserUnits = DEFAULT_UNITS,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.device = device
        self.crc = crc
        self.units = units
        self.sleep = sleep
        self.clock = clock

    def __str__(self) -> str:
        return f"BQ76952 at {self.device}"

    # -- direct commands, with or without CRC -------------------------------------------

    def read_direct(self, command: int, length: int) -> bytes:
        """``length`` bytes from ``command`` on: one transfer (two per 16 bytes in CRC
        mode, where each data byte travels with its CRC)."""
        if not self.crc:
            out = bytearray()
            for offset in range(0, length, SMBUS_BLOCK_MAX):
                n = min(SMBUS_BLOCK_MAX, length - offset)
                out += self.device.read_block(command + offset, n)
            return bytes(out)
        address_w = self.device.address << 1
        out = bytearray()
        chunk = SMBUS_BLOCK_MAX // 2
        for offset in range(0, length, chunk):
            n = min(chunk, length - offset)
            register = command + offset
            wire = self.device.read_block(register, 2 * n)
            for i in range(n):
                byte, check = wire[2 * i], wire[2 * i + 1]
                head = (address_w, register, address_w | 1) if i == 0 else ()
                expected = crc8((*head, byte))
                if check != expected:
                    raise self.device.error(
                        I2cCrcError,
                        f"read of 0x{register:02x}: CRC of byte {offset + i} is "
                        f"0x{check:02x}, expected 0x{expected:02x}",
                    )
                out.append(byte)
        return bytes(out)

    def write_direct(self, command: int, data: bytes) -> None:
        """Write ``data`` from ``command`` on (the device NACKs a byte whose CRC is wrong)."""
        if not self.crc:
            for offset in range(0, len(data), SMBUS_BLOCK_MAX):
                self.device.write_block(command + offset, data[offset : offset + SMBUS_BLOCK_MAX])
            return
        address_w = self.device.address << 1
        chunk = SMBUS_BLOCK_MAX // 2
        for offset in range(0, len(data), chunk):
            register = command + offset
            wire = []
            for i, byte in enumerate(data[offset : offset + chunk]):
                head = (address_w, register) if i == 0 else ()
                wire += [byte, crc8((*head, byte))]
            self.device.write_block(register, wire)

    def detect_crc(self) -> bool:
        """Find out whether the device is in I2C CRC mode (and use that mode from now on):
        read Battery Status as if it were, and check the CRCs. A device without CRC sends
        the next command's bytes instead, which pass by chance once in 65536."""
        previous = self.crc
        self.crc = True
        try:
            self.read_direct(BATTERY_STATUS, 2)
        except I2cCrcError:
            self.crc = False
        except I2cError:
            self.crc = previous
            raise
        return self.crc

    # -- subcommands and data memory ------------------------------------------------------

    def command(self, subcommand: int) -> None:
        """Send a command-only subcommand (FET_ENABLE, ALL_FETS_OFF, SET_CFGUPDATE, ...)."""
        self.write_direct(SUBCOMMAND, bytes((subcommand & 0xFF, subcommand >> 8)))

    def _wait_for(self, subcommand: int) -> None:
        expected = bytes((subcommand & 0xFF, subcommand >> 8))
        deadline = self.clock() + SUBCOMMAND_TIMEOUT_S
        while True:
            if self.read_direct(SUBCOMMAND, 2) == expected:
                return
            if self.clock() > deadline:
                raise self.device.error(
                    I2cProtocolError,
                    f"subcommand 0x{subcommand:04x} did not complete within "
                    f"{SUBCOMMAND_TIMEOUT_S * 1000:g} ms",
                )
            self.sleep(SUBCOMMAND_POLL_S)

    def read_subcommand(self, subcommand: int, length: int | None = None) -> bytes:
        """Send ``subcommand`` and return its data from the transfer buffer, checked against
        the buffer's checksum and length (and ``length``, the data length it must have)."""
        self.command(subcommand)
        self._wait_for(subcommand)
        checksum, total = self.read_direct(CHECKSUM, 2)
        if not 4 <= total <= 4 + DM_BLOCK_LENGTH or (length is not None and total - 4 < length):
            raise self.device.error(
                I2cProtocolError,
                f"subcommand 0x{subcommand:04x}: transfer length {total} "
                f"(expected {'4..36' if length is None else length + 4})",
            )
        data = self.read_direct(TRANSFER_BUFFER, total - 4) if total > 4 else b""
        expected = subcommand_checksum(subcommand, data)
        if checksum != expected:
            raise self.device.error(
                I2cProtocolError,
                f"subcommand 0x{subcommand:04x}: checksum 0x{checksum:02x}, "
                f"expected 0x{expected:02x}",
            )
        return data if length is None else data[:length]

    def write_subcommand(self, subcommand: int, data: bytes) -> None:
        """Write ``data`` through the transfer buffer: the subcommand and the data in one
        transfer from 0x3E, then the checksum and length to 0x60/0x61, which makes it take
        effect. The device ignores a write whose checksum is wrong; callers read back."""
        if not 1 <= len(data) <= DM_BLOCK_LENGTH:
            raise ValueError(f"{len(data)} bytes do not fit the transfer buffer")
        self.write_direct(SUBCOMMAND, bytes((subcommand & 0xFF, subcommand >> 8)) + data)
        self.write_direct(CHECKSUM, bytes((subcommand_checksum(subcommand, data), len(data) + 4)))

    def read_data_memory(self, address: int, length: int) -> bytes:
        """``length`` bytes of data memory from ``address`` (the device returns 32)."""
        return self.read_subcommand(address, length)

    def write_data_memory(self, address: int, data: bytes) -> None:
        """Write data memory; only in CONFIG_UPDATE mode (see :meth:`configure`)."""
        self.write_subcommand(address, data)

    def battery_status(self) -> int:
        return int.from_bytes(self.read_direct(BATTERY_STATUS, 2), "little")

    def read_status(self) -> ChipStatus:
        """Safety Alert and Status A..C and Battery Status, in one block read (0x02..0x13)."""
        raw = self.read_direct(SAFETY_ALERT_A, BATTERY_STATUS + 2 - SAFETY_ALERT_A)
        safety = SafetyReading(alert=(raw[0], raw[2], raw[4]), status=(raw[1], raw[3], raw[5]))
        at = BATTERY_STATUS - SAFETY_ALERT_A
        return ChipStatus(safety, int.from_bytes(raw[at : at + 2], "little"))

    def _wait_for_status(self, bit: int, is_set: bool, what: str) -> None:
        """Poll Battery Status until ``bit`` is ``is_set``; ``what`` names it in the error."""
        deadline = self.clock() + SUBCOMMAND_TIMEOUT_S
        while bool(self.battery_status() & bit) != is_set:
            if self.clock() > deadline:
                raise self.device.error(I2cProtocolError, f"did not {what}")
            self.sleep(SUBCOMMAND_POLL_S)

    def _wait_for_config_update(self, entered: bool) -> None:
        what = "enter CONFIG_UPDATE mode" if entered else "leave CONFIG_UPDATE mode"
        self._wait_for_status(BS_CFGUPDATE, entered, what)

    def exit_config_update(self) -> None:
        """Leave CONFIG_UPDATE mode (measurements and protections resume); clears POR."""
        self.command(SUB_EXIT_CFGUPDATE)
        self._wait_for_config_update(False)

    def disable_sleep(self) -> None:
        """Keep the chip out of SLEEP mode (it leaves it at once if in it), so it measures at
        its full rate; checked on Battery Status SLEEP_EN. Lost on a reset."""
        self.command(SUB_SLEEP_DISABLE)
        self._wait_for_status(BS_SLEEP_EN, False, "disallow SLEEP mode (SLEEP_DISABLE)")

    # -- identity and start-up configuration ---------------------------------------------

    def device_number(self) -> int:
        return int.from_bytes(self.read_subcommand(SUB_DEVICE_NUMBER, 2), "little")

    def check_identity(self) -> None:
        """Raise :class:`I2cIdentityError` unless a BQ76952 answers (DEVICE_NUMBER 0x7695)."""
        try:
            number = self.device_number()
        except I2cNackError:
            raise
        except I2cError as exc:
            hint = "" if self.crc else " (is it in I2C CRC mode?)"
            raise self.device.error(I2cIdentityError, f"no BQ76952 answers{hint}: {exc}") from None
        if number != DEVICE_NUMBER:
            raise self.device.error(
                I2cIdentityError,
                f"expected a BQ76952 (device number 0x{DEVICE_NUMBER:04x}), "
                f"found device number 0x{number:04x}",
            )

    def firmware_version(self) -> tuple[int, int, int]:
        """(device number, firmware version, build number): FW_VERSION, big-endian words."""
        data = self.read_subcommand(SUB_FW_VERSION, 6)
        return struct.unpack(">HHH", data)

    def hardware_version(self) -> int:
        return int.from_bytes(self.read_subcommand(SUB_HW_VERSION, 2), "little")

    def _require_unsealed(self, what: str) -> None:
        if (self.battery_status() >> BS_SEC_SHIFT) & 0x03 == 3:
            raise self.device.error(
                I2cProtocolError,
                f"the device is SEALED, so {what} cannot be read or written; unseal it first",
            )

    def read_units(self) -> UserUnits:
        """Read DA Configuration and use its userA and userV from now on."""
        self._require_unsealed("its DA Configuration")
        self.units = UserUnits.from_da_configuration(
            self.read_data_memory(DM_DA_CONFIGURATION, 1)[0]
        )
        return self.units

    def configure(
        self,
        cell_inputs: Sequence[int],
        crc: bool = False,
        sense_resistance_mohm: float | None = None,
    ) -> list[str]:
        """Make the start-up settings a BMS needs hold: Vcell Mode for ``cell_inputs``, the
        CC gains for the sense resistor (when given) and the I2C CRC mode (when ``crc``).

        Settings that already hold are left alone; CONFIG_UPDATE mode (which stops the
        device's measurements and protections while it lasts) is entered only for the rest,
        or with nothing to write when Battery Status POR is set (a reset the host has not yet
        answered: leaving CONFIG_UPDATE clears it), and every value written is read back after
        leaving it. Returns what was changed. Raises :class:`I2cProtocolError` when the device
        is sealed or a value does not read back, so a misconfigured chip never passes for a
        configured one.
        """
        wanted: list[tuple[str, int, bytes]] = [
            ("Vcell Mode", DM_VCELL_MODE, vcell_mode(cell_inputs).to_bytes(2, "little"))
        ]
        if sense_resistance_mohm is not None:
            cc_gain = CC_GAIN_PER_MOHM / sense_resistance_mohm
            wanted.append(("CC Gain", DM_CC_GAIN, struct.pack("<f", cc_gain)))
            capacity_gain = cc_gain * CAPACITY_GAIN_FACTOR
            wanted.append(("Capacity Gain", DM_CAPACITY_GAIN, struct.pack("<f", capacity_gain)))
        self._require_unsealed("its settings")
        comm_type = self.read_data_memory(DM_COMM_TYPE, 1)[0]
        new_comm_type = None
        if crc and not self.crc:
            new_comm_type = COMM_TYPE_CRC.get(comm_type, COMM_TYPE_FAST_CRC)
            wanted.append(("Comm Type", DM_COMM_TYPE, bytes((new_comm_type,))))
        changes = [
            (name, address, value)
            for name, address, value in wanted
            if self.read_data_memory(address, len(value)) != value
        ]
        if not changes and not self.battery_status() & BS_POR:
            return []
        self.command(SUB_SET_CFGUPDATE)
        self._wait_for_config_update(True)
        try:
            for _, address, value in changes:
                self.write_data_memory(address, value)
        finally:
            self.exit_config_update()
        if new_comm_type is not None:
            self._enter_crc_mode()
        if self.battery_status() & BS_POR:
            raise self.device.error(
                I2cProtocolError, "Battery Status POR is still set after leaving CONFIG_UPDATE"
            )
        for name, address, value in changes:
            got = self.read_data_memory(address, len(value))
            if got != value:
                raise self.device.error(
                    I2cProtocolError,
                    f"data memory 0x{address:04x} ({name}) reads back {got.hex()} after "
                    f"writing {value.hex()}",
                )
        names = [name for name, _, _ in changes]
        log.info("%s: configured %s", self, ", ".join(names) or "nothing (reset acknowledged)")
        return names

    def _enter_crc_mode(self) -> None:
        """After Comm Type got its CRC: the new mode may already hold on leaving
        CONFIG_UPDATE; if not, SWAP_COMM_MODE (sent in the old mode) switches to it."""
        if self.detect_crc():
            return
        self.command(SUB_SWAP_COMM_MODE)
        self.sleep(SUBCOMMAND_POLL_S)
        if not self.detect_crc():
            raise self.device.error(
                I2cProtocolError, "Comm Type was set for CRC, but the device does not send it"
            )

    # -- measurements and status -----------------------------------------------------------

    def read_cell_voltages_v(self) -> np.ndarray:
        """All 16 cell inputs (16,) in V, in one block read; NaN outside the input range."""
        raw = self.read_direct(CELL1_VOLTAGE, 2 * N_CELL_INPUTS)
        return np.array(
            [
                _in_range(_signed16(raw[2 * i], raw[2 * i + 1]) * 1e-3, CELL_RANGE_V)
                for i in range(N_CELL_INPUTS)
            ]
        )

    def read_pack(self) -> PackReading:
        """Stack, PACK pin and LD pin voltages and the CC2 current, in one block read; a CC2
        code at full scale is a saturated reading, NaN."""
        raw = self.read_direct(STACK_VOLTAGE, 8)
        codes = [_signed16(raw[i], raw[i + 1]) for i in range(0, 8, 2)]
        volts = [_in_range(code * self.units.voltage_v, STACK_RANGE_V) for code in codes[:3]]
        current_a = math.nan if codes[3] in CODE_FULL_SCALE else codes[3] * self.units.current_a
        return PackReading(*volts, cc2_current_a=current_a)

    def read_temperatures_c(self) -> np.ndarray:
        """The temperatures of :data:`TEMPERATURE_INPUTS` (10,) in degC, in one block read;
        NaN outside what the chip can report (an open or unconfigured thermistor pin)."""
        raw = self.read_direct(INT_TEMPERATURE, 2 * len(TEMPERATURE_INPUTS))
        return np.array(
            [
                _in_range(
                    _signed16(raw[2 * i], raw[2 * i + 1]) * 0.1 - KELVIN_OFFSET,
                    TEMPERATURE_RANGE_C,
                )
                for i in range(len(TEMPERATURE_INPUTS))
            ]
        )

    def read_safety(self) -> SafetyReading:
        """Safety Alert and Safety Status A, B and C, in one block read (0x02..0x07)."""
        raw = self.read_direct(SAFETY_ALERT_A, 6)
        return SafetyReading(alert=(raw[0], raw[2], raw[4]), status=(raw[1], raw[3], raw[5]))

    def alarm_status(self) -> int:
        return int.from_bytes(self.read_direct(ALARM_STATUS, 2), "little")

    def fet_status(self) -> int:
        return self.read_direct(FET_STATUS, 1)[0]

    # -- balancing and FETs ---------------------------------------------------------------

    def set_active_cells(self, mask: int) -> None:
        """Balance the cell inputs in ``mask`` (bit n-1 = input n), all others off, and
        check that the device took it (CB_ACTIVE_CELLS reads back the mask). The chip's
        own rules apply: it may refuse inputs without a cell or while its limits hold.

        The chip keeps bleeding until told otherwise: unlike the BQ7690x (a 20 s timer on
        every CB_ACTIVE_CELLS, SLUAAP7), the BQ769x2 documents no timeout for host-controlled
        balancing (SLUAA81A), and its host watchdog (Protections:HWD:Delay, Safety Status C
        HWDF) is documented to act on the FETs and the REG1/REG2 regulators only. A host that
        dies leaves the bleeding on until the chip resets; SLEEP would end it by default
        (Balancing Configuration CB_SLEEP = 0), but the driver disables SLEEP."""
        self.write_subcommand(SUB_CB_ACTIVE_CELLS, mask.to_bytes(2, "little"))
        got = self.active_cells()
        if got != mask:
            raise self.device.error(
                I2cProtocolError,
                f"CB_ACTIVE_CELLS reads back 0x{got:04x} after writing 0x{mask:04x}",
            )

    def active_cells(self) -> int:
        """The cell inputs being balanced now (bit n-1 = input n)."""
        return int.from_bytes(self.read_subcommand(SUB_CB_ACTIVE_CELLS, 2), "little")

    def manufacturing_status(self) -> int:
        return int.from_bytes(self.read_subcommand(SUB_MANUFACTURING_STATUS, 2), "little")

    def set_autonomous_fets(self, enabled: bool) -> None:
        """Put FET control in the device's firmware (its protections switch the FETs) or, with
        False, in FET test mode. FET_ENABLE toggles the bit, so it is read first and after."""
        if bool(self.manufacturing_status() & MFG_FET_EN) != enabled:
            self.command(SUB_FET_ENABLE)
            self._wait_for(SUB_FET_ENABLE)
            if bool(self.manufacturing_status() & MFG_FET_EN) != enabled:
                raise self.device.error(I2cProtocolError, "FET_ENABLE did not change FET_EN")

    def all_fets_off(self) -> None:
        """Switch every FET off and keep them off until :meth:`all_fets_on`."""
        self.command(SUB_ALL_FETS_OFF)
        self._wait_for(SUB_ALL_FETS_OFF)

    def all_fets_on(self) -> None:
        """Allow the FETs on again (the device's protections still decide)."""
        self.command(SUB_ALL_FETS_ON)
        self._wait_for(SUB_ALL_FETS_ON)
