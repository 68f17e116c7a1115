"""An ``smbus2.SMBus`` stand-in that routes transfers to emulated devices by address.

Every transfer is one I2C transaction: the register (command) byte, then bytes written or
read. The bus reports failures the way Linux does, as OSError with an errno: an address
nobody answers NACKs (ENXIO, or ENODEV as ``i2c-stub`` says), a device that NACKs a byte
gives EREMOTEIO. Each device keeps a log of its transfers (for counting them and the bytes
on the wire) and takes generic faults: NACK the next N transfers, NACK in the middle of the
next block, or fall silent.
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass

BLOCK_MAX = 32


def oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


@dataclass(frozen=True, slots=True)
class Transfer:
    """One transaction as a logic analyser would show it: ``kind`` "r" or "w", the
    register byte, and the data bytes that followed (written or read)."""

    kind: str
    register: int
    n_bytes: int

    def wire_bits(self) -> int:
        """Bits on the wire: start, address+W, register, (repeated start, address+R for a
        read), the data, stop; every byte with its acknowledge bit."""
        address_bytes = 2 if self.kind == "r" else 1
        return 1 + 9 * (address_bytes + 1 + self.n_bytes) + (1 if self.kind == "r" else 0) + 1


class EmulatedDevice:
    """Base of a device at register level: subclasses implement :meth:`read_registers` and
    :meth:`write_registers` (bytes as they cross the wire). Faults live here."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.log: list[Transfer] = []
        self.silent_errno: int | None = None
        self._nack_next = 0
        self._nack_errno = errno.EREMOTEIO
        self._nack_register: int | None = None
        self._nack_after: int | None = None

    # fault injection -------------------------------------------------------------------

    def nack_next(
        self, count: int = 1, code: int = errno.EREMOTEIO, register: int | None = None
    ) -> None:
        """The next ``count`` transfers (to ``register`` only, when given) fail with ``code``
        before any byte is taken; ``count=0`` ends it."""
        with self.lock:
            self._nack_next = count
            self._nack_errno = code
            self._nack_register = register

    def nack_mid_block(self, after_bytes: int) -> None:
        """The next transfer longer than ``after_bytes`` fails after that many data bytes
        (a write keeps the bytes before the NACK, as a real device would)."""
        with self.lock:
            self._nack_after = after_bytes

    def silence(self, code: int | None = errno.ENXIO) -> None:
        """Every transfer NACKs the address (``code``), until called with None."""
        with self.lock:
            self.silent_errno = code

    # the bus side ----------------------------------------------------------------------

    def _check(self, register: int) -> None:
        if self.silent_errno is not None:
            raise oserror(self.silent_errno)
        if self._nack_next > 0 and self._nack_register in (None, register):
            self._nack_next -= 1
            raise oserror(self._nack_errno)

    def transfer_read(self, register: int, length: int) -> bytes:
        with self.lock:
            self._check(register)
            data = self.read_registers(register, length)
            if self._nack_after is not None and length > self._nack_after:
                self._nack_after = None
                raise oserror(errno.EREMOTEIO)
            self.log.append(Transfer("r", register, length))
            return data

    def transfer_write(self, register: int, data: bytes) -> None:
        with self.lock:
            self._check(register)
            if self._nack_after is not None and len(data) > self._nack_after:
                kept = data[: self._nack_after]
                self._nack_after = None
                if kept:
                    self.write_registers(register, kept)
                raise oserror(errno.EREMOTEIO)
            self.log.append(Transfer("w", register, len(data)))
            self.write_registers(register, data)

    def read_registers(self, register: int, length: int) -> bytes:
        raise NotImplementedError

    def write_registers(self, register: int, data: bytes) -> None:
        raise NotImplementedError


class EmulatedBus:
    """The methods of ``smbus2.SMBus`` the drivers use, over emulated devices.

    ``absent_errno``: what a transfer to an address with no device raises (ENXIO like most
    adapters, ENODEV like i2c-stub).
    """

    def __init__(
        self, devices: dict[int, EmulatedDevice] | None = None, absent_errno: int = errno.ENXIO
    ):
        self.devices: dict[int, EmulatedDevice] = dict(devices or {})
        self.absent_errno = absent_errno
        self.closed = False

    def _device(self, address: int) -> EmulatedDevice:
        if self.closed:
            raise oserror(errno.EBADF)
        device = self.devices.get(address)
        if device is None:
            raise oserror(self.absent_errno)
        return device

    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int, force=None):
        if length > BLOCK_MAX:
            raise ValueError(f"Desired block length over {BLOCK_MAX} bytes")
        return list(self._device(i2c_addr).transfer_read(register, length))

    def write_i2c_block_data(self, i2c_addr: int, register: int, data, force=None) -> None:
        if len(data) > BLOCK_MAX:
            raise ValueError(f"Data length cannot exceed {BLOCK_MAX} bytes")
        self._device(i2c_addr).transfer_write(register, bytes(data))

    def read_byte_data(self, i2c_addr: int, register: int, force=None) -> int:
        return self._device(i2c_addr).transfer_read(register, 1)[0]

    def write_byte_data(self, i2c_addr: int, register: int, value: int, force=None) -> None:
        self._device(i2c_addr).transfer_write(register, bytes((value,)))

    def read_word_data(self, i2c_addr: int, register: int, force=None) -> int:
        """SMBus read-word: the first byte on the wire is the low byte."""
        low, high = self._device(i2c_addr).transfer_read(register, 2)
        return low | (high << 8)

    def write_word_data(self, i2c_addr: int, register: int, value: int, force=None) -> None:
        self._device(i2c_addr).transfer_write(register, bytes((value & 0xFF, value >> 8)))

    def close(self) -> None:
        self.closed = True


def crc8_bitwise(data) -> int:
    """CRC-8, polynomial x^8 + x^2 + x + 1, initial 0, bit by bit (the emulators' own, so a
    fault in the driver's table-driven CRC cannot cancel out)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) if crc & 0x80 else (crc << 1)
            crc &= 0xFF
    return crc
