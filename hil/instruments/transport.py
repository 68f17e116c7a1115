"""Line transports for SCPI: a TCP socket (an instrument's raw SCPI port, usually 5025) or a
serial line (RS-232, a USB-serial adapter, or a pty).

Both send one command per line ("\\n"-terminated) and read one "\\n"-terminated answer. An
instrument that does not answer within the timeout, closes the connection, or sends a line
that is not ASCII or has no terminator within ``MAX_LINE_BYTES`` is an :class:`InstrumentError`
that names the instrument, its address and the command. After such an error the transport is
out of step (a late answer may still be on its way), so it drops the connection (TCP) or the
pending input (serial) before the next command.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

MAX_LINE_BYTES = 65536
"""No SCPI answer a rig reads is near this long: more without a terminator is not SCPI."""


class InstrumentError(Exception):
    """An instrument that cannot be used: its name and address are in the message."""


class InstrumentNotAnswering(InstrumentError):
    """No connection, a closed connection, or no answer within the timeout."""


class InstrumentNonsense(InstrumentError):
    """An answer that is not what the command's answer must look like."""


@dataclass(frozen=True, slots=True)
class Address:
    """Where an instrument is: ``tcp://HOST:PORT`` or ``serial:///dev/ttyUSB0?baudrate=9600``."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""
    baudrate: int = 9600

    @classmethod
    def parse(cls, text: str) -> Address:
        """Raise ValueError with the reason for an address that is neither form."""
        parts = urlsplit(text)
        if parts.scheme == "tcp":
            try:
                port = parts.port
            except ValueError:
                raise ValueError(f"{text!r}: the port must be a number 0..65535") from None
            if not parts.hostname or port is None:
                raise ValueError(f"{text!r}: expected tcp://HOST:PORT")
            return cls("tcp", host=parts.hostname, port=port)
        if parts.scheme == "serial":
            if not parts.path.startswith("/") or parts.netloc:
                raise ValueError(f"{text!r}: expected serial:///dev/NAME[?baudrate=N]")
            query = parse_qs(parts.query)
            unknown = set(query) - {"baudrate"}
            if unknown:
                raise ValueError(f"{text!r}: unknown serial option {sorted(unknown)[0]!r}")
            try:
                baudrate = int(query.get("baudrate", ["9600"])[0])
            except ValueError:
                raise ValueError(f"{text!r}: baudrate must be a whole number") from None
            return cls("serial", path=parts.path, baudrate=baudrate)
        raise ValueError(f"{text!r}: expected tcp://HOST:PORT or serial:///dev/NAME")

    def __str__(self) -> str:
        if self.scheme == "tcp":
            return f"tcp://{self.host}:{self.port}"
        return f"serial://{self.path}?baudrate={self.baudrate}"


class Transport:
    """One line out, optionally one line back."""

    def __init__(self, name: str, address: Address, timeout_s: float):
        self.name = name
        self.address = address
        self.timeout_s = timeout_s

    def where(self) -> str:
        return f"{self.name} ({self.address})"

    def exchange(self, line: str, answer: bool) -> str | None:
        """Send ``line``; with ``answer``, return the next line received (without its
        terminator). Raises InstrumentNotAnswering or InstrumentNonsense."""
        try:
            self._send((line + "\n").encode("ascii"))
            if not answer:
                return None
            return self._decode(line, self._read_line(line))
        except InstrumentError:
            self._resync()
            raise

    def _decode(self, command: str, raw: bytes) -> str:
        try:
            return raw.decode("ascii").rstrip("\r\n")
        except UnicodeDecodeError:
            raise InstrumentNonsense(
                f"{self.where()}: answered {command!r} with bytes that are not ASCII: {raw[:40]!r}"
            ) from None

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    def _read_line(self, command: str) -> bytes:
        raise NotImplementedError

    def _resync(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TcpTransport(Transport):
    """SCPI over a raw TCP socket; connects on first use and again after an error."""

    def __init__(self, name: str, address: Address, timeout_s: float):
        super().__init__(name, address, timeout_s)
        self._sock: socket.socket | None = None
        self._pending = b""

    def _connected(self) -> socket.socket:
        if self._sock is None:
            try:
                self._sock = socket.create_connection(
                    (self.address.host, self.address.port), timeout=self.timeout_s
                )
            except OSError as exc:
                raise InstrumentNotAnswering(f"{self.where()}: cannot connect: {exc}") from None
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._pending = b""
        return self._sock

    def _send(self, data: bytes) -> None:
        sock = self._connected()
        try:
            sock.sendall(data)
        except OSError as exc:
            raise InstrumentNotAnswering(f"{self.where()}: sending failed: {exc}") from None

    def _read_line(self, command: str) -> bytes:
        sock = self._connected()
        deadline_s = time.monotonic() + self.timeout_s
        while b"\n" not in self._pending:
            if len(self._pending) > MAX_LINE_BYTES:
                raise InstrumentNonsense(
                    f"{self.where()}: answered {command!r} with {len(self._pending)} bytes and "
                    "no line end"
                )
            left_s = deadline_s - time.monotonic()
            if left_s <= 0:
                raise self._silent(command)
            sock.settimeout(left_s)
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                raise self._silent(command) from None
            except OSError as exc:
                raise InstrumentNotAnswering(f"{self.where()}: receiving failed: {exc}") from None
            if not chunk:
                raise InstrumentNotAnswering(
                    f"{self.where()}: closed the connection instead of answering {command!r}"
                )
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line

    def _silent(self, command: str) -> InstrumentNotAnswering:
        return InstrumentNotAnswering(
            f"{self.where()}: no answer to {command!r} within {self.timeout_s:g} s"
        )

    def _resync(self) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class SerialTransport(Transport):
    """SCPI over a serial line (pyserial, imported when one is opened)."""

    def __init__(self, name: str, address: Address, timeout_s: float):
        super().__init__(name, address, timeout_s)
        self._port = None

    def _opened(self):
        if self._port is None:
            import serial  # hardware library: only when a serial instrument is used

            try:
                self._port = serial.Serial(
                    self.address.path, self.address.baudrate, timeout=self.timeout_s
                )
            except (serial.SerialException, OSError, ValueError) as exc:
                raise InstrumentNotAnswering(f"{self.where()}: cannot open: {exc}") from None
        return self._port

    def _send(self, data: bytes) -> None:
        import serial

        try:
            self._opened().write(data)
        except (serial.SerialException, OSError) as exc:
            raise InstrumentNotAnswering(f"{self.where()}: sending failed: {exc}") from None

    def _read_line(self, command: str) -> bytes:
        import serial

        port = self._opened()
        deadline_s = time.monotonic() + self.timeout_s
        line = b""
        while not line.endswith(b"\n"):
            if len(line) > MAX_LINE_BYTES:
                raise InstrumentNonsense(
                    f"{self.where()}: answered {command!r} with {len(line)} bytes and no line end"
                )
            left_s = deadline_s - time.monotonic()
            if left_s <= 0:
                break
            port.timeout = left_s
            try:
                line += port.read_until(b"\n", MAX_LINE_BYTES + 1 - len(line))
            except (serial.SerialException, OSError) as exc:
                raise InstrumentNotAnswering(f"{self.where()}: receiving failed: {exc}") from None
        if not line.endswith(b"\n"):
            raise InstrumentNotAnswering(
                f"{self.where()}: no answer to {command!r} within {self.timeout_s:g} s"
                + (f" (got {line[:40]!r} and no line end)" if line else "")
            )
        return line[:-1]

    def _resync(self) -> None:
        if self._port is not None:
            import serial

            try:
                self._port.reset_input_buffer()
            except (serial.SerialException, OSError):
                self.close()

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None


def open_transport(name: str, address: str | Address, timeout_s: float) -> Transport:
    """The transport for ``address`` (nothing is opened until the first command)."""
    parsed = address if isinstance(address, Address) else Address.parse(address)
    if parsed.scheme == "tcp":
        return TcpTransport(name, parsed, timeout_s)
    return SerialTransport(name, parsed, timeout_s)
