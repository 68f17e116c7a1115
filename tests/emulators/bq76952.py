"""A TI BQ76952 at register level, from its Technical Reference Manual (SLUUBY2B).

What it models:

- the direct commands 0x00..0x7F as one little-endian image built from the "true" state
  (cell voltages in V, currents in A, temperatures in degC) in the user units of its DA
  Configuration: mV cells, userV stack/PACK/LD, userA CC2, 0.1 K temperatures, 16-bit codes
  that saturate; the device auto-increments the command address in a block transfer;
- subcommands: writing 0x3E then 0x3F starts one; 0x3E/0x3F read 0xFF 0xFF for
  ``busy_reads`` reads, then the subcommand; its data is in 0x40.., the checksum (one's
  complement of the byte sum of 0x3E, 0x3F and the data) in 0x60 and the length (data + 4)
  in 0x61. Writing 0x61 executes a write whose checksum and length are right and ignores
  (counts in ``rejected_writes``) one that is wrong;
- data memory: reads return a 32-byte block; writes are taken only in CONFIG_UPDATE mode
  (SET_CFGUPDATE / EXIT_CFGUPDATE, Battery Status bit 0), not when SEALED;
- the I2C CRC mode: in it every byte read goes out with its CRC-8 and every byte written
  must come with one (the first covers [addr+W, cmd(, addr+R)], later ones the byte alone);
  a wrong CRC is NACKed (EREMOTEIO) and what came before it is kept. A new Comm Type takes
  effect on SWAP_COMM_MODE (0x29BC), or on EXIT_CFGUPDATE when ``comm_type_on_exit``;
- FET control: FET_ENABLE toggles Manufacturing Status FET_EN; with it set, the FETs are on
  unless ALL_FETS_OFF holds them off or a safety fault is present;
- host balancing: CB_ACTIVE_CELLS read/write; inputs that Vcell Mode marks as having no cell
  are dropped (so it reads back without them);
- when it measures: every read sees the present truth, except in CONFIG_UPDATE mode (no
  measurements: the codes stay those of the last one) and in SLEEP mode, which it is in while
  SLEEP is allowed (Battery Status SLEEP_EN: Power Config SLEEP at a reset, then SLEEP_ENABLE
  and SLEEP_DISABLE) and the current is below Power:Sleep:Sleep Current (20 mA); it then
  measures once every Power:Sleep:Voltage Time (5 s) on :attr:`clock`. (The real chip also
  waits Sleep Hysteresis Time after waking before it sleeps again; not modelled.)
- a full reset (:meth:`reset`, a brown-out): RAM settings back to their defaults, POR set,
  SLEEP allowed, CRC mode, FET control and balancing off. POR clears on EXIT_CFGUPDATE. A new
  emulator has just been powered up: POR is set.

Faults beyond the generic ones of :class:`~tests.emulators.smbus.EmulatedDevice`: flip bits
in the next reads (``flip_next_read``), freeze the measurements (``stuck``), force raw codes
(``force_code``), a wrong ``device_number``, safety alerts and faults (``safety_status``).
"""

from __future__ import annotations

import errno
import math
import struct
import time

import numpy as np

from tests.emulators.smbus import EmulatedDevice, crc8_bitwise, oserror

ADDRESS = 0x08
DM_START, DM_END = 0x9180, 0x9400
DM_DA_CONFIGURATION = 0x9303
DM_VCELL_MODE = 0x9304
DM_COMM_TYPE = 0x9239
DM_CC_GAIN = 0x91A8
DM_CAPACITY_GAIN = 0x91AC
DM_POWER_CONFIG = 0x9234
POWER_CONFIG_DEFAULT = 0x2982  # TRM: SLEEP (bit 8) set
POWER_CONFIG_SLEEP = 1 << 8
SLEEP_CURRENT_A = 0.020  # Power:Sleep:Sleep Current, default 20 mA
SLEEP_VOLTAGE_TIME_S = 5.0  # Power:Sleep:Voltage Time, default 5 s
MEASURED = (*range(0x14, 0x3C), *range(0x68, 0x7C))
"""The direct commands that carry measurements (cells, stack, pins, CC2, temperatures)."""
TEMPERATURE_NAMES = (
    "internal", "cfetoff", "dfetoff", "alert", "ts1", "ts2", "ts3", "hdq", "dchg", "ddsg",
)  # fmt: skip
CRC_COMM_TYPES = (0x11, 0x12)
SECURITY_FULLACCESS, SECURITY_UNSEALED, SECURITY_SEALED = 1, 2, 3


def _i16(value: float) -> bytes:
    code = round(value)
    return max(-32768, min(32767, code)).to_bytes(2, "little", signed=True)


def _checksum(command: int, data: bytes) -> int:
    return 0xFF - ((command & 0xFF) + (command >> 8) + sum(data)) % 256


class Bq76952Emulator(EmulatedDevice):
    """One BQ76952 at ``address``; set the true values and the faults as attributes."""

    def __init__(self, address: int = ADDRESS):
        super().__init__()
        self.address = address
        self.cell_voltage_v = np.full(16, 3.7)
        self.pack_pin_v: float | None = None  # None: the stack voltage (FETs closed)
        self.ld_pin_v: float | None = None
        self.current_a = 0.0
        self.temp_c = dict.fromkeys(TEMPERATURE_NAMES, 25.0)
        self.safety_alert = [0, 0, 0]
        self.safety_status = [0, 0, 0]
        self.permanent_fail = False
        self.security = SECURITY_FULLACCESS
        self.device_number = 0x7695
        self.fw_version = 0x0100
        self.build = 0x0037
        self.hw_version = 0x0002
        self.busy_reads = 1
        self.comm_type_on_exit = False
        self.stuck = False
        self.rejected_writes = 0
        self.dm = bytearray(DM_END - DM_START)
        self._dm_set(DM_DA_CONFIGURATION, bytes((0x05,)))
        self._dm_set(DM_CC_GAIN, struct.pack("<f", 7.4768))
        self._dm_set(DM_CAPACITY_GAIN, struct.pack("<f", 7.4768 * 298261.6178))
        self._dm_set(DM_POWER_CONFIG, POWER_CONFIG_DEFAULT.to_bytes(2, "little"))
        self._dm_defaults = bytes(self.dm)
        self.clock = time.monotonic
        self._measured: dict[int, int] = {}
        self._measured_s = -math.inf
        self.crc_mode = False
        self.cfgupdate = False
        self.por = True
        self.sleep_allowed = True
        self.fet_en = False
        self.fets_held_off = False
        self.cb_active = 0
        self._sub = bytearray(b"\xff\xff")
        self._command = 0xFFFF
        self._busy = 0
        self.buffer = bytearray(32)
        self._checksum = 0
        self._length = 0
        self._frozen: dict[int, int] = {}
        self._forced: dict[int, int] = {}
        self._flip: tuple[int | None, int, int] | None = None
        self._flips_left = 0
        self._write_flips: list[tuple[int, int, int]] = []
        self.config_updates = 0

    # helpers for tests ------------------------------------------------------------------

    def _dm_set(self, address: int, data: bytes) -> None:
        self.dm[address - DM_START : address - DM_START + len(data)] = data

    def dm_get(self, address: int, length: int) -> bytes:
        return bytes(self.dm[address - DM_START : address - DM_START + length])

    @property
    def vcell_mode(self) -> int:
        return int.from_bytes(self.dm_get(DM_VCELL_MODE, 2), "little")

    @property
    def user_amps_a(self) -> float:
        return (1e-4, 1e-3, 1e-2, 1e-1)[self.dm_get(DM_DA_CONFIGURATION, 1)[0] & 0x03]

    @property
    def user_volts_v(self) -> float:
        return 0.01 if self.dm_get(DM_DA_CONFIGURATION, 1)[0] & 0x04 else 0.001

    @property
    def fet_status(self) -> int:
        on = self.fet_en and not self.fets_held_off and not any(self.safety_status)
        return 0b0101 if on else 0  # CHG_FET (bit 0) and DSG_FET (bit 2)

    def force_byte(self, command: int, value: int | None) -> None:
        """Make the byte at ``command`` read ``value`` (None: the real one again)."""
        with self.lock:
            if value is None:
                self._forced.pop(command, None)
            else:
                self._forced[command] = value & 0xFF

    def force_code(self, command: int, value: int) -> None:
        """Make the 16-bit direct command ``command`` read ``value`` (an out-of-range code)."""
        self.force_byte(command, value & 0xFF)
        self.force_byte(command + 1, (value >> 8) & 0xFF)

    def flip_next_read(
        self, count: int = 1, byte_index: int = 0, mask: int = 0x01, register: int | None = None
    ) -> None:
        """Flip ``mask`` in byte ``byte_index`` of each of the next ``count`` reads (from
        ``register`` only, when given), after any CRC was computed: noise on the wire.
        ``count=0`` ends it."""
        with self.lock:
            self._flip = (register, byte_index, mask)
            self._flips_left = count

    def flip_next_write(self, register: int, byte_index: int = 0, mask: int = 0x01) -> None:
        """Flip a bit in the next write to ``register`` that has a byte ``byte_index``,
        before the device takes it (noise that, without CRC, nothing on the wire detects)."""
        with self.lock:
            self._write_flips.append((register, byte_index, mask))

    def freeze(self) -> None:
        """Freeze every measurement at its present code (a stuck ADC)."""
        with self.lock:
            image = self._image()
            self._frozen = {a: image[a] for a in MEASURED}

    def reset(self) -> None:
        """A full reset (a brown-out, the watchdog): every RAM setting back to its default."""
        with self.lock:
            self.dm[:] = self._dm_defaults
            self.por = True
            self.cfgupdate = False
            self.sleep_allowed = bool(
                int.from_bytes(self.dm_get(DM_POWER_CONFIG, 2), "little") & POWER_CONFIG_SLEEP
            )
            self.crc_mode = False
            self.fet_en = self.fets_held_off = False
            self.cb_active = 0

    @property
    def sleeping(self) -> bool:
        """In SLEEP mode (Battery Status SLEEP)."""
        return self.sleep_allowed and not self.cfgupdate and abs(self.current_a) < SLEEP_CURRENT_A

    # the direct-command image -------------------------------------------------------------

    def _battery_status(self) -> int:
        status = int(self.cfgupdate) | (self.security << 8)
        if self.sleep_allowed:
            status |= 1 << 2
        if self.por:
            status |= 1 << 3
        if any(self.safety_status):
            status |= 1 << 11
        if self.permanent_fail:
            status |= 1 << 12
        if self.sleeping:
            status |= 1 << 15
        return status

    def _measurements(self) -> dict[int, int]:
        """The measured codes: measured now, unless the chip does not measure at this moment
        (CONFIG_UPDATE; SLEEP between two of its measurements)."""
        now_s = self.clock()
        due = not self.sleeping or now_s - self._measured_s >= SLEEP_VOLTAGE_TIME_S
        if not self.cfgupdate and due:
            image = self._measure()
            self._measured = {a: image[a] for a in MEASURED}
            self._measured_s = now_s
        return self._measured

    def _image(self) -> bytearray:
        image = bytearray(128)
        for i in range(3):
            image[0x02 + 2 * i] = self.safety_alert[i]
            image[0x03 + 2 * i] = self.safety_status[i]
        image[0x12:0x14] = self._battery_status().to_bytes(2, "little")
        for address, value in self._measurements().items():
            image[address] = value
        image[0x3E:0x40] = b"\xff\xff" if self._busy else self._sub
        image[0x40:0x60] = self.buffer
        image[0x60] = self._checksum
        image[0x61] = self._length
        image[0x7F] = self.fet_status
        if self.stuck:
            for address, value in self._frozen.items():
                image[address] = value
        for address, value in self._forced.items():
            image[address] = value
        return image

    def _measure(self) -> bytearray:
        """The measurement codes of the present truth (the rest of the image left zero)."""
        image = bytearray(128)
        for i, volts in enumerate(self.cell_voltage_v):
            image[0x14 + 2 * i : 0x16 + 2 * i] = _i16(volts * 1000.0)
        stack_v = float(np.sum(self.cell_voltage_v))
        closed = self.fet_status != 0
        pins = {
            0x34: stack_v,
            0x36: self.pack_pin_v if self.pack_pin_v is not None else stack_v * closed,
            0x38: self.ld_pin_v if self.ld_pin_v is not None else stack_v * closed,
        }
        for command, volts in pins.items():
            image[command : command + 2] = _i16(volts / self.user_volts_v)
        image[0x3A:0x3C] = _i16(self.current_a / self.user_amps_a)
        for i, name in enumerate(TEMPERATURE_NAMES):
            image[0x68 + 2 * i : 0x6A + 2 * i] = _i16((self.temp_c[name] + 273.15) * 10.0)
        return image

    # the wire -----------------------------------------------------------------------------

    def read_registers(self, register: int, length: int) -> bytes:
        image = self._image()
        n_data = (length + 1) // 2 if self.crc_mode else length
        data = bytes(image[(register + i) & 0x7F] for i in range(n_data))
        if register <= 0x3E < register + n_data and self._busy:
            self._busy -= 1
        if self.crc_mode:
            head = (self.address << 1, register, (self.address << 1) | 1)
            wire = bytearray()
            for i, byte in enumerate(data):
                wire += bytes((byte, crc8_bitwise((*head, byte) if i == 0 else (byte,))))
            out = bytearray(wire[:length])
        else:
            out = bytearray(data)
        if self._flips_left and self._flip[0] in (None, register):
            self._flips_left -= 1
            _, index, mask = self._flip
            if index < len(out):
                out[index] ^= mask
        return bytes(out)

    def write_registers(self, register: int, data: bytes) -> None:
        for flip in list(self._write_flips):
            if flip[0] == register and len(data) > flip[1]:
                self._write_flips.remove(flip)
                data = bytearray(data)
                data[flip[1]] ^= flip[2]
                data = bytes(data)
        if not self.crc_mode:
            for i, byte in enumerate(data):
                self._write_byte(register + i, byte)
            return
        for i in range(0, len(data) - 1, 2):
            byte, check = data[i], data[i + 1]
            head = (self.address << 1, register) if i == 0 else ()
            if check != crc8_bitwise((*head, byte)):
                raise oserror(errno.EREMOTEIO)  # NACK of the CRC byte; the rest is lost
            self._write_byte(register + i // 2, byte)

    def _write_byte(self, command: int, value: int) -> None:
        if command == 0x3E:
            self._sub[0] = value
        elif command == 0x3F:
            self._sub[1] = value
            self._start(self._sub[0] | (value << 8))
        elif 0x40 <= command < 0x60:
            self.buffer[command - 0x40] = value
        elif command == 0x60:
            self._checksum = value
        elif command == 0x61:
            self._length = value
            self._execute_write()

    # subcommands ----------------------------------------------------------------------------

    def _reply(self, data: bytes) -> None:
        self.buffer[: len(data)] = data
        self._checksum = _checksum(self._command, data)
        self._length = len(data) + 4

    def _start(self, command: int) -> None:
        self._command = command
        self._busy = self.busy_reads
        if DM_START <= command < DM_END:
            if self.security != SECURITY_SEALED:
                self._reply(self.dm_get(command, 32))
            return
        replies = {
            0x0001: lambda: self.device_number.to_bytes(2, "little"),
            0x0002: lambda: struct.pack(">HHH", self.device_number, self.fw_version, self.build),
            0x0003: lambda: self.hw_version.to_bytes(2, "little"),
            0x0057: lambda: (int(self.fet_en) << 4).to_bytes(2, "little"),
            0x0083: lambda: self.cb_active.to_bytes(2, "little"),
        }
        if command in replies:
            self._reply(replies[command]())
        elif command == 0x0022:
            self.fet_en = not self.fet_en
        elif command == 0x0095:
            self.fets_held_off = True
        elif command == 0x0096:
            self.fets_held_off = False
        elif command == 0x0090 and self.security != SECURITY_SEALED:
            self.cfgupdate = True
            self.config_updates += 1
        elif command == 0x0092:
            if self.cfgupdate and self.comm_type_on_exit:
                self._apply_comm_type()
            if self.cfgupdate:
                self.por = False
            self.cfgupdate = False
        elif command == 0x0099:
            self.sleep_allowed = True
        elif command == 0x009A:
            self.sleep_allowed = False
        elif command == 0x29BC:
            self._apply_comm_type()

    def _apply_comm_type(self) -> None:
        self.crc_mode = self.dm_get(DM_COMM_TYPE, 1)[0] in CRC_COMM_TYPES

    def _execute_write(self) -> None:
        n = self._length - 4
        data = bytes(self.buffer[:n])
        if not 1 <= n <= 32 or _checksum(self._command, data) != self._checksum:
            self.rejected_writes += 1
            return
        if DM_START <= self._command < DM_END:
            if not self.cfgupdate or self.security == SECURITY_SEALED:
                self.rejected_writes += 1
                return
            self._dm_set(self._command, data)
        elif self._command == 0x0083 and n == 2:
            mask = int.from_bytes(data, "little")
            if self.vcell_mode:
                mask &= self.vcell_mode
            self.cb_active = mask
        else:
            self.rejected_writes += 1
