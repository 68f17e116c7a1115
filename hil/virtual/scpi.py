"""The instrument side of SCPI, for the virtual rig's instruments: headers, parameters, the
error queue, and serving a device on a TCP port or a pseudo-terminal.

Written from SCPI-99 and IEEE 488.2 as instruments implement them: a header is a path of
keywords, each accepted in its short form (its upper-case letters, ``VOLT``) or its long form
(``VOLTAGE``), in any case; keywords in square brackets may be left out (``[SOURce:]VOLTage``);
a query ends in ``?``; parameters follow a space, separated by commas; a channel list is
``(@1,3,5:8)``; several commands on one line are separated by ``;`` (each one is read from the
root here, as if it began with ``:``). A command that cannot be executed puts its error
(SCPI-99's codes and texts) in the queue, which ``SYSTem:ERRor[:NEXT]?`` reads oldest first,
and the rest of its line is not executed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import select
import socket
import threading
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

SYNTAX_ERROR = (-102, "Syntax error")
DATA_TYPE_ERROR = (-104, "Data type error")
PARAMETER_NOT_ALLOWED = (-108, "Parameter not allowed")
MISSING_PARAMETER = (-109, "Missing parameter")
UNDEFINED_HEADER = (-113, "Undefined header")
DATA_OUT_OF_RANGE = (-222, "Data out of range")
ILLEGAL_PARAMETER_VALUE = (-224, "Illegal parameter value")
QUEUE_OVERFLOW = (-350, "Queue overflow")

ERROR_QUEUE_LENGTH = 20


class ScpiError(Exception):
    """A command that cannot be executed: its SCPI error code and text."""

    def __init__(self, error: tuple[int, str], detail: str = ""):
        super().__init__(f"{error[0]},{error[1]}" + (f"; {detail}" if detail else ""))
        self.code, self.text = error
        self.detail = detail


@dataclass(frozen=True, slots=True)
class _Keyword:
    short: str
    long: str
    optional: bool

    def accepts(self, token: str) -> bool:
        token = token.upper()
        return token in (self.short, self.long)


_PATTERN_PART = re.compile(r"\[:?([A-Za-z]+):?\]|:?([A-Za-z]+)")


def compile_header(pattern: str) -> tuple[_Keyword, ...]:
    """``[SOURce:]VOLTage[:LEVel]`` as its keywords: short form = the upper-case letters."""
    keywords = []
    position = 0
    for match in _PATTERN_PART.finditer(pattern):
        if match.start() != position:
            raise ValueError(f"cannot read header pattern {pattern!r}")
        position = match.end()
        word = match[1] or match[2]
        short = "".join(c for c in word if c.isupper()) or word.upper()
        keywords.append(_Keyword(short, word.upper(), optional=match[1] is not None))
    if position != len(pattern) or not keywords:
        raise ValueError(f"cannot read header pattern {pattern!r}")
    return tuple(keywords)


def _matches(keywords: tuple[_Keyword, ...], tokens: list[str]) -> bool:
    if not keywords:
        return not tokens
    first, rest = keywords[0], keywords[1:]
    if tokens and first.accepts(tokens[0]) and _matches(rest, tokens[1:]):
        return True
    return first.optional and _matches(rest, tokens)


def split_top_level(text: str, separator: str) -> list[str]:
    """Split at ``separator`` outside parentheses and double quotes."""
    parts, depth, quoted, start = [], 0, False, 0
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif not quoted and c == "(":
            depth += 1
        elif not quoted and c == ")":
            depth -= 1
            if depth < 0:
                raise ScpiError(SYNTAX_ERROR, "unbalanced parenthesis")
        elif not quoted and depth == 0 and c == separator:
            parts.append(text[start:i])
            start = i + 1
    if quoted or depth:
        raise ScpiError(SYNTAX_ERROR, "unterminated string or channel list")
    parts.append(text[start:])
    return parts


# ---------------------------------------------------------------- parameters
def number(text: str, low: float, high: float) -> float:
    """A decimal number (NR1, NR2, NR3), or MINimum/MAXimum, inside [low, high]."""
    word = text.strip().upper()
    if word in ("MIN", "MINIMUM"):
        return low
    if word in ("MAX", "MAXIMUM"):
        return high
    try:
        value = float(word)
    except ValueError:
        raise ScpiError(DATA_TYPE_ERROR, f"{text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise ScpiError(DATA_TYPE_ERROR, f"{text.strip()!r} is not a number")
    if not low <= value <= high:
        raise ScpiError(DATA_OUT_OF_RANGE, f"{value:g} is outside {low:g}..{high:g}")
    return value


def boolean(text: str) -> bool:
    word = text.strip().upper()
    if word in ("ON", "1"):
        return True
    if word in ("OFF", "0"):
        return False
    raise ScpiError(ILLEGAL_PARAMETER_VALUE, f"{text.strip()!r} is not ON, OFF, 1 or 0")


_CHANNEL_LIST = re.compile(r"^\(@\s*([0-9:,\s]+)\)$")


def channels(text: str, count: int) -> list[int]:
    """A channel list ``(@1,3,5:8)`` of channels 1..``count``, in the order written."""
    match = _CHANNEL_LIST.match(text.strip())
    if match is None:
        raise ScpiError(SYNTAX_ERROR, f"{text.strip()!r} is not a channel list (@...)")
    found = []
    for part in match[1].split(","):
        bounds = [b.strip() for b in part.split(":")]
        if len(bounds) > 2 or not all(b.isdigit() for b in bounds):
            raise ScpiError(SYNTAX_ERROR, f"{part.strip()!r} in a channel list")
        first, last = int(bounds[0]), int(bounds[-1])
        if not 1 <= first <= last <= count:
            raise ScpiError(DATA_OUT_OF_RANGE, f"channels {part.strip()} (the unit has 1..{count})")
        found.extend(range(first, last + 1))
    return found


def nr3(value: float) -> str:
    """A number as instruments answer: ``+3.700000E+00``."""
    return f"{value:+.6E}"


# ---------------------------------------------------------------- the device
Handler = Callable[[list[str]], "str | None"]


class ScpiDevice:
    """A SCPI instrument: its command table, its error queue, the IEEE 488.2 common
    commands. Subclasses add their commands and their state; ``lock`` guards both (the
    server's thread executes commands, the plant's thread reads the state)."""

    identity = "pybms,VIRTUAL,0,1.0"

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.errors: deque[tuple[int, str]] = deque()
        self._commands: list[tuple[tuple[_Keyword, ...], bool, Handler]] = []
        self._common: dict[str, Handler] = {
            "*IDN?": lambda p: self.identity,
            "*RST": lambda p: self.reset(),
            "*CLS": lambda p: self.errors.clear(),
            "*OPC?": lambda p: "1",
            "*OPC": lambda p: None,
        }
        self.command("SYSTem:ERRor[:NEXT]", self._next_error, query=True)

    def command(self, pattern: str, handler: Handler, query: bool = False) -> None:
        self._commands.append((compile_header(pattern), query, handler))

    def reset(self) -> None:
        """``*RST``: the power-on settings."""

    def _next_error(self, params: list[str]) -> str:
        _no_parameters(params)
        code, text = self.errors.popleft() if self.errors else (0, "No error")
        return f'{code},"{text}"'

    def push_error(self, error: ScpiError) -> None:
        if len(self.errors) >= ERROR_QUEUE_LENGTH:
            self.errors[-1] = QUEUE_OVERFLOW
            return
        self.errors.append((error.code, error.text))

    def handle_line(self, line: str) -> str | None:
        """Execute one line; return the answers of its queries (``;``-joined), if any."""
        answers = []
        with self.lock:
            try:
                for unit in split_top_level(line.strip(), ";"):
                    answer = self._execute(unit.strip())
                    if answer is not None:
                        answers.append(answer)
            except ScpiError as exc:
                self.push_error(exc)
        return ";".join(answers) if answers else None

    def _execute(self, unit: str) -> str | None:
        if not unit:
            return None
        header, _, rest = unit.partition(" ")
        params = [p.strip() for p in split_top_level(rest, ",")] if rest.strip() else []
        if header.startswith("*"):
            handler = self._common.get(header.upper())
            if handler is None:
                raise ScpiError(UNDEFINED_HEADER, header)
            if params:
                raise ScpiError(PARAMETER_NOT_ALLOWED, header)
            return handler(params)
        query = header.endswith("?")
        tokens = header.lstrip(":").removesuffix("?").split(":")
        if not all(token.isalpha() for token in tokens):
            raise ScpiError(SYNTAX_ERROR, header)
        for keywords, is_query, handler in self._commands:
            if is_query == query and _matches(keywords, tokens):
                return handler(params)
        raise ScpiError(UNDEFINED_HEADER, header)


def _no_parameters(params: list[str]) -> None:
    if params:
        raise ScpiError(PARAMETER_NOT_ALLOWED)


def exactly(params: list[str], count: int) -> list[str]:
    """The parameters of a command that takes ``count`` of them."""
    if len(params) < count:
        raise ScpiError(MISSING_PARAMETER)
    if len(params) > count:
        raise ScpiError(PARAMETER_NOT_ALLOWED)
    return params


# ---------------------------------------------------------------- serving
class _LineServer:
    """Reads lines from a byte stream and answers each through the device."""

    def __init__(self, device: ScpiDevice, name: str):
        self.device = device
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _serve_stream(self, read: Callable[[], bytes], write: Callable[[bytes], None]) -> None:
        pending = b""
        while not self._stop.is_set():
            chunk = read()
            if chunk is None:
                continue
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                raw, _, pending = pending.partition(b"\n")
                answer = self.device.handle_line(raw.decode("ascii", errors="replace"))
                if answer is not None:
                    write((answer + "\n").encode("ascii"))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"scpi-{self.name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)


class TcpServer(_LineServer):
    """One device on a TCP port of the loopback interface (port 0: any free one), one client
    at a time, as an instrument's raw SCPI socket."""

    def __init__(self, device: ScpiDevice, name: str, port: int = 0):
        super().__init__(device, name)
        self._listener = socket.create_server(("127.0.0.1", port))
        self._listener.settimeout(0.1)

    @property
    def address(self) -> str:
        return f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(0.1)

                def read(conn=conn) -> bytes | None:
                    try:
                        return conn.recv(4096)
                    except TimeoutError:
                        return None
                    except OSError:
                        return b""

                with contextlib.suppress(OSError):
                    self._serve_stream(read, conn.sendall)

    def close(self) -> None:
        super().close()
        self._listener.close()


class PtyServer(_LineServer):
    """One device on a pseudo-terminal: the client opens ``address``'s device as it would a
    serial port. The slave side is held open here (in raw mode: no echo, no line editing), so
    the terminal lives as long as the server and not only while a client has it open."""

    def __init__(self, device: ScpiDevice, name: str):
        super().__init__(device, name)
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        self.path = os.ttyname(self._slave)

    @property
    def address(self) -> str:
        return f"serial://{self.path}"

    def _run(self) -> None:
        def read() -> bytes | None:
            ready, _, _ = select.select([self._master], [], [], 0.1)
            if not ready:
                return None
            try:
                return os.read(self._master, 4096)
            except OSError:
                return b""

        def write(data: bytes) -> None:
            os.write(self._master, data)

        self._serve_stream(read, write)

    def close(self) -> None:
        super().close()
        for fd in (self._master, self._slave):
            with contextlib.suppress(OSError):
                os.close(fd)
