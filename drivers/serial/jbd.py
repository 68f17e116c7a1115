"""A JBD (Xiaoxiang) smart BMS as a front-end, over its UART / RS-485 protocol (pyserial).

The protocol, as JBD's "smart BMS protocol V4" and the public register maps describe it:

- 9600 baud 8N1 by default. The host sends a read request ``DD A5 <register> 00 <checksum>
  77``; the BMS answers ``DD <register> <status> <length> <data> <checksum> 77``: status 0x00
  is OK (0x80 an error), ``length`` counts the data bytes only.
- The checksum is two bytes, high byte first: 0x10000 minus the sum of the bytes it covers,
  which are the register and length of a request, and the status, length and data of a
  response (so the request for register 0x03 is ``DD A5 03 00 FF FD 77``).
- Register 0x03, basic information, big-endian: total voltage (u16, 10 mV), current (s16,
  10 mA, positive while charging), remaining and nominal capacity (u16, 10 mAh), cycles
  (u16), production date (u16), balancing bits of cells 1-16 and 17-32 (two u16), protection
  bits (u16), software version (u8), SOC (u8, %), FET bits (u8: bit 0 charge, bit 1 discharge
  conducting), cell count (u8), NTC count (u8), then each NTC (u16, 0.1 K, offset 2731).
  Newer firmware appends more bytes, which are ignored.
- Register 0x04, cell voltages: one u16 per cell, in mV.

The front-end polls both registers on a thread of its own (serial I/O never blocks
:meth:`JbdFrontEnd.read`), keeps the newest valid values with the time they arrived, and marks
values older than ``timeout_s`` NaN with their group stale. A frame with a wrong checksum, end
byte, length, status or cell count never refreshes a value; a value no cell or NTC can have
(a failed channel's 0xFFFF, a shorted NTC's 0) or a saturated current is NaN. The poller never
dies: a port that fails in any way (a pulled adapter's hung-up tty fails in termios, not as
an OSError) is counted, logged, closed and re-opened with back-off. The reader resyncs after garbage
on the line: it takes the first complete, valid frame wherever it starts, and drops what came
before. The BMS's own protection bits and switched-off FETs are reported as diagnosis fault
ids in ``Measurement.frontend_faults``. It has no DC-link voltage (NaN) and balances by
itself.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np
from pydantic import Field, ValidationInfo, model_validator

from bms.backends import FrontEnd, FrontEndError
from bms.config import BmsConfig
from bms.schema import StrictModel
from bms.types import CELL_VOLTAGE_GROUP, PACK_GROUP, TEMPERATURE_GROUP, Measurement

log = logging.getLogger(__name__)

START = 0xDD
END = 0x77
READ = 0xA5
BASIC_INFO = 0x03
CELL_VOLTAGES = 0x04
STATUS_OK = 0x00
MAX_CELLS = 32
"""The balancing bits of register 0x03 cover 32 cells."""
KELVIN_OFFSET_DK = 2731
BASIC_INFO_FIXED = struct.Struct(">HhHHHHHHHBBBBB")
"""Register 0x03 up to the NTC count; the NTCs (u16 each) follow."""
MAX_BUFFER_BYTES = 1024
"""Bytes the reader keeps while it waits for a frame to complete; older ones are garbage."""
CELL_VOLTAGE_MAX_V = 5.0
"""No lithium cell a JBD manages (LFP, NMC, LTO) rests above 4.5 V; an overcharged one still
reads below this, so it trips over-voltage. Above it the code is a failed channel (0xFFFF is
65.535 V), NaN."""
TEMPERATURE_RANGE_C = (-50.0, 150.0)
"""What a cell's NTC can read; outside it the NTC is open, shorted or missing (code 0 is
-273.1 degC), NaN."""
CURRENT_FULL_SCALE = (-32768, 32767)
"""The s16 current codes at which the reading saturates (+-327.68 A): the true current may be
anywhere beyond, so such a reading is NaN."""
ERROR_LOG_INTERVAL_S = 10.0
"""An unexpected poller failure is logged at once (with its traceback), then at most this often."""

PROTECTION_FAULTS = (
    "frontend_cell_overvoltage",
    "frontend_cell_undervoltage",
    "frontend_pack_overvoltage",
    "frontend_pack_undervoltage",
    "frontend_overtemperature",
    "frontend_undertemperature",
    "frontend_overtemperature",
    "frontend_undertemperature",
    "frontend_overcurrent_charge",
    "frontend_overcurrent_discharge",
    "frontend_short_circuit",
    "frontend_device_error",
    "frontend_fets_locked",
)
"""Diagnosis fault id of each protection bit of register 0x03, bit 0 first: the ids every
front-end device uses for its own protections (bms/protection/diagnosis.py)."""
CHARGE_FET_OFF = "frontend_charge_fet_off"
DISCHARGE_FET_OFF = "frontend_discharge_fet_off"
CONFIG_MISMATCH = "frontend_config_mismatch"
"""The BMS reports another number of cells or temperature sensors than ``[pack]`` has."""


class JbdError(FrontEndError):
    """A JBD that cannot be opened, or a frame that breaks the protocol."""


class JbdProtocolError(JbdError):
    """A complete frame whose contents cannot be used (error status, wrong length)."""


def checksum(covered: bytes) -> int:
    """0x10000 minus the byte sum, as two bytes (the protocol's checksum)."""
    return (0x10000 - sum(covered)) & 0xFFFF


def read_request(register: int) -> bytes:
    """The request that reads ``register`` (no data)."""
    body = bytes((register, 0))
    return bytes((START, READ, *body)) + checksum(body).to_bytes(2, "big") + bytes((END,))


@dataclass(frozen=True, slots=True)
class Response:
    register: int
    status: int
    data: bytes


class FrameReader:
    """Splits the bytes from the line into valid response frames, resyncing after garbage.

    ``feed`` returns the frames completed by the new bytes: the first valid frame wherever it
    starts, so noise before it (even noise that holds a start byte) cannot hide it. Bytes
    that belong to no valid frame are dropped and counted in ``garbage_bytes``; a complete
    candidate that fails its end byte or checksum also counts in ``bad_frames``.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()
        self.bytes_fed = 0
        self.garbage_bytes = 0
        self.bad_frames = 0

    def reset(self) -> None:
        """Forget what is buffered (before a new request: a late answer is no answer)."""
        self.garbage_bytes += len(self._buffer)
        self._buffer.clear()

    def feed(self, data: bytes) -> list[Response]:
        self.bytes_fed += len(data)
        self._buffer += data
        frames = []
        while (frame := self._next_frame()) is not None:
            frames.append(frame)
        if len(self._buffer) > MAX_BUFFER_BYTES:
            excess = len(self._buffer) - MAX_BUFFER_BYTES
            del self._buffer[:excess]
            self.garbage_bytes += excess
        return frames

    def _next_frame(self) -> Response | None:
        """Take the first valid frame out of the buffer. Without one, keep the bytes from the
        first candidate that is still incomplete (more bytes may complete it) and drop the
        rest as garbage."""
        buffer = self._buffer
        first_incomplete = None
        position = buffer.find(START)
        while position >= 0:
            available = len(buffer) - position
            total = 4 + buffer[position + 3] + 3 if available >= 4 else None
            if total is None or available < total:
                if first_incomplete is None:
                    first_incomplete = position
            elif _valid(bytes(buffer[position : position + total])):
                frame = bytes(buffer[position : position + total])
                self.garbage_bytes += position
                del buffer[: position + total]
                return Response(frame[1], frame[2], frame[4:-3])
            elif first_incomplete is None:  # dropped below, so counted once
                self.bad_frames += 1
            position = buffer.find(START, position + 1)
        keep_from = len(buffer) if first_incomplete is None else first_incomplete
        self.garbage_bytes += keep_from
        del buffer[:keep_from]
        return None


def _valid(frame: bytes) -> bool:
    """A complete candidate frame ends with the end byte and carries its checksum."""
    return frame[-1] == END and frame[-3:-1] == checksum(frame[2:-3]).to_bytes(2, "big")


@dataclass(frozen=True, slots=True)
class BasicInfo:
    """Register 0x03 in units: current positive while charging, SOC as a fraction; NaN for a
    reading no pack can give (see the module's ranges)."""

    pack_voltage_v: float
    current_a: float
    remaining_capacity_ah: float
    nominal_capacity_ah: float
    cycles: int
    balancing: int
    """Bit ``i`` set: cell ``i`` (from 0) is bleeding."""
    protection: int
    software_version: int
    soc: float
    charge_fet_on: bool
    discharge_fet_on: bool
    n_cells: int
    temps_c: tuple[float, ...]


def decode_basic_info(data: bytes) -> BasicInfo:
    """Register 0x03's data; JbdProtocolError if it is too short for its own NTC count."""
    if len(data) < BASIC_INFO_FIXED.size:
        raise JbdProtocolError(
            f"basic information of {len(data)} bytes (at least {BASIC_INFO_FIXED.size})"
        )
    (
        voltage_10mv,
        current_10ma,
        remaining_10mah,
        nominal_10mah,
        cycles,
        _date,
        balance_low,
        balance_high,
        protection,
        version,
        soc_percent,
        fets,
        n_cells,
        n_ntc,
    ) = BASIC_INFO_FIXED.unpack_from(data)
    end = BASIC_INFO_FIXED.size + 2 * n_ntc
    if len(data) < end:
        raise JbdProtocolError(f"basic information of {len(data)} bytes for {n_ntc} NTCs")
    ntc = struct.unpack_from(f">{n_ntc}H", data, BASIC_INFO_FIXED.size)
    pack_voltage_v = voltage_10mv * 0.01
    temps_c = ((raw - KELVIN_OFFSET_DK) / 10.0 for raw in ntc)
    return BasicInfo(
        pack_voltage_v=_within(pack_voltage_v, 0.0, n_cells * CELL_VOLTAGE_MAX_V),
        current_a=math.nan if current_10ma in CURRENT_FULL_SCALE else current_10ma * 0.01,
        remaining_capacity_ah=remaining_10mah * 0.01,
        nominal_capacity_ah=nominal_10mah * 0.01,
        cycles=cycles,
        balancing=balance_low | balance_high << 16,
        protection=protection,
        software_version=version,
        soc=soc_percent / 100.0,
        charge_fet_on=bool(fets & 0x01),
        discharge_fet_on=bool(fets & 0x02),
        n_cells=n_cells,
        temps_c=tuple(_within(t_c, *TEMPERATURE_RANGE_C) for t_c in temps_c),
    )


def decode_cell_voltages(data: bytes) -> np.ndarray:
    """Register 0x04's data as volts, one per cell; NaN above what a cell can read."""
    if not data or len(data) % 2:
        raise JbdProtocolError(f"cell voltages of {len(data)} bytes (two per cell)")
    volts = np.array(struct.unpack(f">{len(data) // 2}H", data), dtype=float) / 1000.0
    return np.where(volts <= CELL_VOLTAGE_MAX_V, volts, np.nan)


def _within(value: float, low: float, high: float) -> float:
    return value if low <= value <= high else math.nan


def faults_of(info: BasicInfo) -> tuple[str, ...]:
    """The fault ids of the BMS's own protection bits and its switched-off FETs."""
    found = [name for bit, name in enumerate(PROTECTION_FAULTS) if info.protection >> bit & 1]
    if not info.charge_fet_on:
        found.append(CHARGE_FET_OFF)
    if not info.discharge_fet_on:
        found.append(DISCHARGE_FET_OFF)
    return tuple(dict.fromkeys(found))  # bits that share an id (both overtemperatures) once


class JbdOptions(StrictModel):
    """The ``[frontend]`` options of a JBD smart BMS."""

    port: str = Field(min_length=1, description="serial device, e.g. /dev/ttyUSB0")
    baud_rate: int = Field(9600, ge=1200, le=921600)
    poll_period_s: float = Field(0.5, ge=0.05, le=60.0, description="both registers, this often")
    response_timeout_s: float = Field(
        0.3, gt=0.0, le=10.0, description="an answer that takes longer is missing"
    )
    timeout_s: float = Field(2.0, gt=0.0, le=600.0, description="older values are stale (NaN)")
    reopen_max_s: float = Field(
        5.0, gt=0.0, le=600.0, description="a lost port is re-opened at most this far apart"
    )

    @model_validator(mode="after")
    def _fits(self, info: ValidationInfo) -> JbdOptions:
        one_poll_s = self.poll_period_s + 2 * self.response_timeout_s
        if self.timeout_s <= one_poll_s:
            raise ValueError(
                f"timeout_s must be longer than poll_period_s plus two response_timeout_s "
                f"({one_poll_s:g} s), or every value would go stale between two polls"
            )
        n_cells = (info.context or {}).get("n_cells")
        if n_cells is not None and n_cells > MAX_CELLS:
            raise ValueError(f"a JBD carries at most {MAX_CELLS} cells; [pack] has {n_cells}")
        return self


@dataclass
class JbdStats:
    """What the poller saw go wrong, by request (counts since it started)."""

    timeouts: int = 0
    """Nothing came back."""
    garbled: int = 0
    """Bytes came back, but no valid frame (bad checksum, wrong length, partial, noise)."""
    protocol_errors: int = 0
    """A valid frame with unusable contents (error status, too short, wrong cell count)."""
    port_errors: int = 0
    """The port failed (closed and re-opened)."""
    poller_errors: int = 0
    """Anything else the poller met (a bug): logged, the port closed and re-opened."""

    @property
    def frame_errors(self) -> int:
        return self.garbled + self.protocol_errors


class JbdFrontEnd(FrontEnd):
    """Cell voltages, temperatures, current and pack voltage from a JBD smart BMS."""

    Options = JbdOptions
    supports_balancing = False  # it balances by itself

    def __init__(self, config: BmsConfig, options: JbdOptions):
        self.options = options
        self.n_cells = config.pack.n_cells
        self.n_temps = config.pack.n_temp_sensors
        self.reader = FrameReader()
        self.stats = JbdStats()
        self._lock = threading.Lock()
        self._cells_v = np.full(self.n_cells, np.nan)
        self._cells_t_s = -math.inf
        self._basic: BasicInfo | None = None
        self._basic_t_s = -math.inf
        self._mismatch_t_s = -math.inf
        self._error_logged_s = -math.inf
        self._stop = threading.Event()
        self._port = self._open()  # an absent device is an error here, not a silent NaN
        self._thread = threading.Thread(target=self._run, name="jbd-poller", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- the poller thread
    def _open(self):
        import termios

        import serial  # hardware library: imported only when this front-end is used

        try:
            return serial.Serial(
                self.options.port,
                baudrate=self.options.baud_rate,
                timeout=0.02,
                write_timeout=self.options.response_timeout_s,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError, termios.error) as exc:
            raise JbdError(f"cannot open JBD serial port {self.options.port!r}: {exc}") from None

    def _run(self) -> None:
        """Poll until closed; whatever fails, the thread goes on: a port that fails is closed
        and re-opened with back-off."""
        import termios

        import serial

        port_failures = (serial.SerialException, OSError, termios.error)
        next_s = time.monotonic()
        reopen_delay_s = 0.0
        while not self._stop.is_set():
            try:
                if self._port is None:
                    if self._stop.wait(reopen_delay_s):
                        return
                    reopen_delay_s = min(max(2 * reopen_delay_s, 0.5), self.options.reopen_max_s)
                    try:
                        self._port = self._open()
                    except JbdError as exc:
                        log.debug("%s", exc)
                        continue
                    log.warning("JBD serial port %s re-opened", self.options.port)
                    reopen_delay_s = 0.0
                for register in (BASIC_INFO, CELL_VOLTAGES):
                    self._poll(register)
            except port_failures as exc:  # a pulled adapter: EIO from tcflush, read or write
                self.stats.port_errors += 1
                log.error("JBD serial port %s failed: %s; re-opening", self.options.port, exc)
                self._close_port()
            except Exception as exc:
                self.stats.poller_errors += 1
                self._log_unexpected(exc)
                self._close_port()
            now_s = time.monotonic()
            next_s = max(next_s + self.options.poll_period_s, now_s)  # late: no catching up
            self._stop.wait(next_s - now_s)

    def _log_unexpected(self, exc: Exception) -> None:
        """From the ``except`` block: the traceback at once, then a count now and then."""
        now_s = time.monotonic()
        count = self.stats.poller_errors
        if count == 1:
            log.exception("JBD poller failed; closing and re-opening %s", self.options.port)
        elif now_s - self._error_logged_s >= ERROR_LOG_INTERVAL_S:
            log.error("JBD poller failed %d times so far; latest: %r", count, exc)
        else:
            return
        self._error_logged_s = now_s

    def _poll(self, register: int) -> None:
        fed = self.reader.bytes_fed
        response = self._transact(register)
        if response is None:
            if self.reader.bytes_fed > fed:
                self.stats.garbled += 1
            else:
                self.stats.timeouts += 1
            return
        try:
            self._accept(register, response)
        except JbdProtocolError as exc:
            self.stats.protocol_errors += 1
            count = self.stats.protocol_errors
            if count == 1 or count % 100 == 0:
                log.warning("JBD register 0x%02X rejected (%d so far): %s", register, count, exc)

    def _transact(self, register: int) -> Response | None:
        """Send one read request and wait (here, on the poller) for its answer."""
        port = self._port
        port.reset_input_buffer()
        self.reader.reset()
        port.write(read_request(register))
        deadline_s = time.monotonic() + self.options.response_timeout_s
        while time.monotonic() < deadline_s:
            for response in self.reader.feed(port.read(max(1, port.in_waiting))):
                if response.register == register:
                    return response
        return None

    def _accept(self, register: int, response: Response) -> None:
        """Decode and check a response; only a response that passes refreshes values."""
        if response.status != STATUS_OK:
            raise JbdProtocolError(f"the BMS answers with status 0x{response.status:02X}")
        now_s = time.monotonic()
        if register == BASIC_INFO:
            info = decode_basic_info(response.data)
            self._check_counts(now_s, info.n_cells, len(info.temps_c))
            with self._lock:
                self._basic, self._basic_t_s = info, now_s
        else:
            cells_v = decode_cell_voltages(response.data)
            self._check_counts(now_s, cells_v.size, self.n_temps)
            with self._lock:
                self._cells_v, self._cells_t_s = cells_v, now_s

    def _check_counts(self, now_s: float, n_cells: int, n_temps: int) -> None:
        if (n_cells, n_temps) != (self.n_cells, self.n_temps):
            with self._lock:
                self._mismatch_t_s = now_s
            raise JbdProtocolError(
                f"the BMS reports {n_cells} cells and {n_temps} temperature sensors; "
                f"[pack] has {self.n_cells} and {self.n_temps}"
            )

    def _close_port(self) -> None:
        port, self._port = self._port, None
        if port is not None:
            try:
                port.close()
            except Exception as exc:  # a dying adapter may fail in any way; it is gone anyway
                log.debug("closing the JBD port failed: %s", exc)

    # ---------------------------------------------------------------- FrontEnd
    def read(self, t_s: float) -> Measurement:
        timeout_s = self.options.timeout_s
        with self._lock:
            cells_v, cells_t_s = self._cells_v, self._cells_t_s
            basic, basic_t_s = self._basic, self._basic_t_s
            mismatch = t_s - self._mismatch_t_s <= timeout_s
        cells_fresh = t_s - cells_t_s <= timeout_s
        basic_fresh = basic is not None and t_s - basic_t_s <= timeout_s
        faults = faults_of(basic) if basic_fresh else ()
        if mismatch:
            faults += (CONFIG_MISMATCH,)
        stale = () if cells_fresh else (CELL_VOLTAGE_GROUP,)
        if not basic_fresh:
            stale += (TEMPERATURE_GROUP, PACK_GROUP)
        return Measurement(
            t_s=t_s,
            cell_voltage_v=cells_v.copy() if cells_fresh else np.full(self.n_cells, np.nan),
            cell_temp_c=(np.array(basic.temps_c) if basic_fresh else np.full(self.n_temps, np.nan)),
            current_a=basic.current_a if basic_fresh else math.nan,
            pack_voltage_v=basic.pack_voltage_v if basic_fresh else math.nan,
            link_voltage_v=math.nan,
            stale_groups=stale,
            frame_errors=self.stats.frame_errors,
            frontend_faults=faults,
        )

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        self._close_port()
