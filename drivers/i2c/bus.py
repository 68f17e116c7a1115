"""The I2C bus: opening it through smbus2, typed errors, and the CRC-8 of the BQ76952.

Linux reports what went wrong on the wire as an errno on the ``ioctl`` that smbus2 issues; the
same failure reads differently on different adapters (a missing device NACKs its address:
ENXIO on most controllers, EREMOTEIO on some, ENODEV from ``i2c-stub``). Every transfer goes
through :class:`I2cDevice`, which turns those OSErrors into one :class:`I2cError` subclass
each, with a message that names the bus, the address and the register, so a person reading
the log knows which wire to check.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from typing import Protocol

from bms.backends import FrontEndError

SMBUS_BLOCK_MAX = 32
"""Bytes one SMBus I2C-block transfer carries (the kernel's I2C_SMBUS_BLOCK_MAX)."""


class SMBusLike(Protocol):
    """The part of ``smbus2.SMBus`` the drivers use (an emulator implements the same)."""

    def read_byte_data(self, i2c_addr: int, register: int) -> int: ...
    def write_byte_data(self, i2c_addr: int, register: int, value: int) -> None: ...
    def read_word_data(self, i2c_addr: int, register: int) -> int: ...
    def write_word_data(self, i2c_addr: int, register: int, value: int) -> None: ...
    def read_i2c_block_data(self, i2c_addr: int, register: int, length: int) -> list[int]: ...
    def write_i2c_block_data(self, i2c_addr: int, register: int, data: list[int]) -> None: ...
    def close(self) -> None: ...


class I2cError(FrontEndError):
    """A transfer or a device on an I2C bus failed; ``bus`` and ``address`` say where."""

    def __init__(self, message: str, bus: int | None = None, address: int | None = None):
        self.bus = bus
        self.address = address
        super().__init__(f"{where(bus, address)}: {message}")


class I2cOpenError(I2cError):
    """The bus device (``/dev/i2c-N``) cannot be opened."""


class I2cNackError(I2cError):
    """The device did not acknowledge: absent, unpowered, at another address, or it refused
    a byte (the BQ76952 NACKs a byte whose CRC is wrong)."""


class I2cNoDeviceError(I2cNackError):
    """No device answers at the address (ENODEV, as ``i2c-stub`` reports it)."""


class I2cTimeoutError(I2cError):
    """The transfer timed out: a device holding the clock low, or a stuck bus."""


class I2cBusError(I2cError):
    """Any other failure of the bus: EIO, arbitration lost (EAGAIN), unsupported transfer."""


class I2cCrcError(I2cError):
    """A byte arrived with a CRC that does not match it (noise on the bus, a bit flip)."""


class I2cProtocolError(I2cError):
    """The device answered, but not as its datasheet says it must (a bad checksum or length,
    a reply that never completes, a value it cannot report)."""


class I2cIdentityError(I2cError):
    """A device answers at the address, but it is not the part the config names."""


_ERRNO_MEANING: dict[int, tuple[type[I2cError], str]] = {
    errno.ENXIO: (
        I2cNackError,
        "no acknowledge (NACK): the device is absent, unpowered or at another address",
    ),
    errno.EREMOTEIO: (I2cNackError, "no acknowledge (NACK) during the transfer"),
    errno.ENODEV: (I2cNoDeviceError, "no device answers at this address"),
    errno.ETIMEDOUT: (
        I2cTimeoutError,
        "transfer timed out (a device holding the clock low, or a stuck bus)",
    ),
    errno.EIO: (I2cBusError, "I/O error on the bus"),
    errno.EAGAIN: (I2cBusError, "bus busy or arbitration lost (another controller on it?)"),
    errno.EOPNOTSUPP: (I2cBusError, "the adapter cannot do this kind of transfer"),
}


def where(bus: int | None, address: int | None) -> str:
    """``I2C bus 1 address 0x08``, leaving out what is not known."""
    text = "I2C" if bus is None else f"I2C bus {bus}"
    return text if address is None else f"{text} address 0x{address:02x}"


def translate(exc: OSError, bus: int | None, address: int | None, operation: str) -> I2cError:
    """The typed error for an OSError that a transfer (``operation``, e.g. ``"read of 0x14"``)
    raised."""
    cls, meaning = _ERRNO_MEANING.get(
        exc.errno or 0, (I2cBusError, exc.strerror or str(exc) or "failed")
    )
    code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return cls(f"{operation}: {meaning} [{code}]", bus, address)


def open_bus(bus_number: int) -> SMBusLike:
    """Open ``/dev/i2c-<bus_number>`` through smbus2 (imported here: a hardware library)."""
    import smbus2

    try:
        return smbus2.SMBus(bus_number)
    except OSError as exc:
        hint = {
            errno.ENOENT: "no such bus: is the i2c-dev module loaded and the bus enabled?",
            errno.EACCES: "permission denied: run as a member of the i2c group",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise I2cOpenError(f"cannot open /dev/i2c-{bus_number}: {hint}", bus_number) from None


class I2cDevice:
    """One device address on an open bus. Transfers raise :class:`I2cError`, never OSError.

    Byte order is the caller's: an SMBus word is little-endian on the wire (the first byte
    is the low one), which matches the BQ76952 but not the INA228 (most significant byte
    first); :meth:`read_block` returns the bytes in the order they crossed the wire.
    """

    def __init__(self, bus: SMBusLike, address: int, bus_number: int | None = None):
        self.bus = bus
        self.address = address
        self.bus_number = bus_number

    def __str__(self) -> str:
        return where(self.bus_number, self.address)

    def error(self, cls: type[I2cError], message: str) -> I2cError:
        """An error of ``cls`` about this device."""
        return cls(message, self.bus_number, self.address)

    def _failed(self, exc: OSError, operation: str) -> I2cError:
        return translate(exc, self.bus_number, self.address, operation)

    def read_block(self, register: int, length: int) -> bytes:
        """``length`` (1..32) bytes from ``register`` in one write-then-read transfer."""
        try:
            data = self.bus.read_i2c_block_data(self.address, register, length)
        except OSError as exc:
            raise self._failed(exc, f"read of 0x{register:02x}") from None
        if len(data) != length:
            raise self.error(
                I2cProtocolError,
                f"read of 0x{register:02x}: {len(data)} bytes instead of {length}",
            )
        return bytes(data)

    def write_block(self, register: int, data: Iterable[int]) -> None:
        """Write the bytes (1..32) to ``register`` in one transfer."""
        try:
            self.bus.write_i2c_block_data(self.address, register, list(data))
        except OSError as exc:
            raise self._failed(exc, f"write to 0x{register:02x}") from None

    def read_word(self, register: int) -> int:
        """An SMBus read-word: the first byte on the wire is the low byte of the result."""
        try:
            return self.bus.read_word_data(self.address, register)
        except OSError as exc:
            raise self._failed(exc, f"read of 0x{register:02x}") from None

    def write_word(self, register: int, value: int) -> None:
        """An SMBus write-word: the low byte of ``value`` goes first on the wire."""
        try:
            self.bus.write_word_data(self.address, register, value)
        except OSError as exc:
            raise self._failed(exc, f"write to 0x{register:02x}") from None


def _crc8_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8 = _crc8_table()


def crc8(data: Iterable[int], crc: int = 0) -> int:
    """CRC-8 with polynomial x^8 + x^2 + x + 1 (0x07), initial value 0, no reflection: the
    check the BQ76952 sends and expects in its I2C CRC mode (TRM, I2C communications; the
    same as SMBus PEC). ``crc`` continues a running CRC."""
    for byte in data:
        crc = _CRC8[crc ^ byte]
    return crc
