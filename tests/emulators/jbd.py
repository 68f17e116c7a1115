"""A JBD (Xiaoxiang) smart BMS on the far end of a pseudo-terminal, so pyserial opens a real tty
by its path (``emulator.port``), written from JBD's protocol description, not from the driver.

Frames: the host reads with ``DD A5 <register> 00 <checksum> 77``; the BMS answers
``DD <register> <status> <length> <data> <checksum> 77``, the checksum being 0x10000 minus the
byte sum of status, length and data (of register and length in a request), high byte first.
Register 0x03 (basic information) and 0x04 (cell voltages) are answered from :attr:`state`;
others get status 0x80 and no data, as the BMS does. A request with a wrong checksum gets no
answer.

Fault injection (:attr:`fault`, for the registers in :attr:`fault_registers`):

- ``silence``: no answer at all
- ``garbage``: noise (holding start and end bytes) on the line before the answer
- ``partial``: only the first half of the answer, then nothing
- ``bad_checksum``: the answer with its checksum off by one
- ``wrong_length``: the length byte two more than the data that follows
- ``short_data``: a consistent frame whose data is cut short (length and checksum agree)
- ``wrong_cell_count``: one cell more than the pack has, in both registers
- ``error_status``: status 0x80 and no data
"""

from __future__ import annotations

import os
import random
import select
import struct
import threading
import tty
from dataclasses import dataclass, field

BASIC_INFO = 0x03
CELL_VOLTAGES = 0x04
FAULTS = (
    "silence",
    "garbage",
    "partial",
    "bad_checksum",
    "wrong_length",
    "short_data",
    "wrong_cell_count",
    "error_status",
)


def jbd_checksum(covered: bytes) -> bytes:
    return ((0x10000 - sum(covered)) & 0xFFFF).to_bytes(2, "big")


@dataclass
class PackState:
    """What the emulated BMS measures, in units (current positive while charging)."""

    cell_voltages_v: list[float] = field(default_factory=lambda: [3.3] * 4)
    temps_c: list[float] = field(default_factory=lambda: [25.0, 25.0])
    current_a: float = 0.0
    pack_voltage_v: float | None = None
    """None: the sum of the cells (as the BMS measures it, to 10 mV)."""
    remaining_capacity_ah: float = 50.0
    nominal_capacity_ah: float = 100.0
    cycles: int = 7
    protection: int = 0
    charge_fet_on: bool = True
    discharge_fet_on: bool = True
    soc_percent: int = 50
    balancing: int = 0


class JbdEmulator:
    """The BMS side of a pty pair, answering on a thread of its own. Use as a context manager
    or call :meth:`close`."""

    def __init__(self, state: PackState | None = None, seed: int = 1):
        self.state = state or PackState()
        self.fault: str | None = None
        self.fault_registers: set[int] = {BASIC_INFO, CELL_VOLTAGES}
        self.requests: dict[int, int] = {}
        self.bad_requests = 0
        self.lock = threading.Lock()
        self._random = random.Random(seed)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)  # bytes pass through unchanged, no echo
        self.port = os.ttyname(self._slave)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="jbd-emulator", daemon=True)
        self._thread.start()

    def __enter__(self) -> JbdEmulator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop answering and close both ends: to the host, the device is gone. Idempotent."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5.0)
        os.close(self._master)
        os.close(self._slave)

    def set_fault(self, fault: str | None, registers: set[int] | None = None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        with self.lock:
            self.fault = fault
            self.fault_registers = registers or {BASIC_INFO, CELL_VOLTAGES}

    # ------------------------------------------------------------------ the line
    def _serve(self) -> None:
        pending = bytearray()
        while not self._stop.is_set():
            ready, _, _ = select.select([self._master], [], [], 0.05)
            if not ready:
                continue
            try:
                pending += os.read(self._master, 4096)
            except OSError:  # nobody has the tty open right now
                continue
            while (request := self._take_request(pending)) is not None:
                answer = self._answer(request)
                if answer:
                    os.write(self._master, answer)

    def _take_request(self, pending: bytearray) -> int | None:
        """The register of the next well-formed read request in ``pending`` (consumed)."""
        while True:
            start = pending.find(0xDD)
            if start < 0:
                pending.clear()
                return None
            del pending[:start]
            if len(pending) < 7:
                return None
            frame = bytes(pending[:7])
            if frame[1] == 0xA5 and frame[6] == 0x77 and frame[4:6] == jbd_checksum(frame[2:4]):
                del pending[:7]
                with self.lock:
                    self.requests[frame[2]] = self.requests.get(frame[2], 0) + 1
                return frame[2]
            self.bad_requests += 1
            del pending[:1]

    def _answer(self, register: int) -> bytes:
        with self.lock:
            fault = self.fault if register in self.fault_registers else None
            state = self.state
            n_extra = 1 if fault == "wrong_cell_count" else 0
            if register == BASIC_INFO:
                status, data = 0, self._basic_info(state, n_extra)
            elif register == CELL_VOLTAGES:
                status, data = 0, self._cell_voltages(state, n_extra)
            else:
                status, data = 0x80, b""
        if fault == "silence":
            return b""
        if fault == "error_status":
            status, data = 0x80, b""
        if fault == "short_data":
            data = data[: len(data) // 2]
        covered = bytes((status, len(data))) + data
        frame = bytes((0xDD, register)) + covered + jbd_checksum(covered) + b"\x77"
        if fault == "bad_checksum":
            value = (int.from_bytes(frame[-3:-1], "big") + 1) & 0xFFFF
            frame = frame[:-3] + value.to_bytes(2, "big") + b"\x77"
        elif fault == "wrong_length":
            frame = frame[:3] + bytes((len(data) + 2,)) + frame[4:]
        elif fault == "partial":
            frame = frame[: len(frame) // 2]
        elif fault == "garbage":
            noise = bytes(self._random.randrange(256) for _ in range(40))
            frame = noise + b"\xdd\x03\x00\x05\x77\x77" + frame  # a false start too
        return frame

    @staticmethod
    def _basic_info(state: PackState, n_extra_cells: int) -> bytes:
        cells = list(state.cell_voltages_v) + [3.3] * n_extra_cells
        pack_v = sum(cells) if state.pack_voltage_v is None else state.pack_voltage_v
        fets = int(state.charge_fet_on) | int(state.discharge_fet_on) << 1
        fixed = struct.pack(
            ">HhHHHHHHHBBBBB",
            round(pack_v * 100),
            round(state.current_a * 100),
            round(state.remaining_capacity_ah * 100),
            round(state.nominal_capacity_ah * 100),
            state.cycles,
            (24 << 9) | (3 << 5) | 15,  # 15 March 2024
            state.balancing & 0xFFFF,
            state.balancing >> 16,
            state.protection,
            0x10,
            state.soc_percent,
            fets,
            len(cells),
            len(state.temps_c),
        )
        ntc = b"".join(struct.pack(">H", round(t * 10) + 2731) for t in state.temps_c)
        return fixed + ntc

    @staticmethod
    def _cell_voltages(state: PackState, n_extra_cells: int) -> bytes:
        cells = list(state.cell_voltages_v) + [3.3] * n_extra_cells
        return b"".join(struct.pack(">H", round(v * 1000)) for v in cells)
