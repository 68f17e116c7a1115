"""SCPI instruments: the IEEE 488.2 common commands, the error queue, and typed answers.

Every setting is sent and then confirmed with ``SYSTem:ERRor?``: an instrument executes its
commands in order, so the answer both proves the setting was taken (the moment a rig test
counts a fault from) and says whether it was refused. A refusal is an
:class:`InstrumentRefused` listing the instrument's own error messages; an answer of the wrong
shape (not a number, the wrong number of values, an identity of another instrument) is an
:class:`InstrumentNonsense` or :class:`WrongInstrument` naming the command and what came back.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from hil.instruments.transport import InstrumentError, InstrumentNonsense, Transport

ERROR_QUEUE_DEPTH = 32
"""At most this many errors are read back after one refused command (SCPI queues hold ~20)."""

_ERROR = re.compile(r'^\s*([+-]?\d+)\s*,\s*"(.*)"\s*$')


class InstrumentRefused(InstrumentError):
    """The instrument put an error in its queue for a command we sent."""


class WrongInstrument(InstrumentError):
    """``*IDN?`` names another instrument than the rig config expects at that address."""


@dataclass(frozen=True, slots=True)
class Identity:
    """The four fields of ``*IDN?`` (IEEE 488.2): who made it, which model, which unit."""

    manufacturer: str
    model: str
    serial: str
    firmware: str

    def __str__(self) -> str:
        return f"{self.manufacturer},{self.model},{self.serial},{self.firmware}"


def channel_list(channels: Sequence[int]) -> str:
    """A SCPI channel list, ``(@1,3,5:8)``: runs of consecutive numbers as ranges."""
    if not channels:
        raise ValueError("a channel list needs at least one channel")
    ordered = sorted(set(channels))
    runs: list[list[int]] = []
    for channel in ordered:
        if runs and channel == runs[-1][1] + 1:
            runs[-1][1] = channel
        else:
            runs.append([channel, channel])
    parts = [f"{a}" if a == b else f"{a}:{b}" for a, b in runs]
    return "(@" + ",".join(parts) + ")"


class ScpiInstrument:
    """An instrument on a transport: queries, confirmed settings, identity, reset."""

    def __init__(self, name: str, transport: Transport):
        self.name = name
        self.transport = transport

    def where(self) -> str:
        return self.transport.where()

    def query(self, command: str) -> str:
        answer = self.transport.exchange(command, answer=True)
        assert answer is not None
        return answer

    def query_floats(self, command: str, count: int) -> list[float]:
        """A comma-separated answer of exactly ``count`` finite numbers."""
        answer = self.query(command)
        fields = answer.split(",")
        try:
            values = [float(field) for field in fields]
        except ValueError:
            values = []
        if len(values) != count or not all(math.isfinite(v) for v in values):
            raise InstrumentNonsense(
                f"{self.where()}: answered {command!r} with {answer[:80]!r}; expected "
                f"{count} number(s)"
            )
        return values

    def query_float(self, command: str) -> float:
        return self.query_floats(command, 1)[0]

    def query_bools(self, command: str, count: int) -> list[bool]:
        """A comma-separated answer of exactly ``count`` 0s and 1s."""
        answer = self.query(command)
        fields = [field.strip() for field in answer.split(",")]
        if len(fields) != count or any(field not in ("0", "1") for field in fields):
            raise InstrumentNonsense(
                f"{self.where()}: answered {command!r} with {answer[:80]!r}; expected "
                f"{count} value(s) of 0 or 1"
            )
        return [field == "1" for field in fields]

    def query_channels(self, query: str, channels: Sequence[int], *, bools: bool = False) -> list:
        """``query`` over a channel list: one value per channel, in the order given (an
        instrument answers in ascending channel order, whatever order the list is written in)."""
        ordered = sorted(set(channels))
        command = f"{query} {channel_list(ordered)}"
        if bools:
            values: list = self.query_bools(command, len(ordered))
        else:
            values = self.query_floats(command, len(ordered))
        by_channel = dict(zip(ordered, values, strict=True))
        return [by_channel[channel] for channel in channels]

    def send(self, command: str) -> None:
        """Send a setting and confirm it: raise InstrumentRefused with the instrument's own
        error messages if it queued any."""
        self.transport.exchange(command, answer=False)
        errors = self.errors()
        if errors:
            listed = "; ".join(f'{code},"{text}"' for code, text in errors)
            raise InstrumentRefused(f"{self.where()}: refused {command!r}: {listed}")

    def errors(self) -> list[tuple[int, str]]:
        """Read the error queue until it is empty (``0,"No error"``)."""
        found = []
        for _ in range(ERROR_QUEUE_DEPTH):
            answer = self.query("SYST:ERR?")
            match = _ERROR.match(answer)
            if match is None:
                raise InstrumentNonsense(
                    f"{self.where()}: answered 'SYST:ERR?' with {answer[:80]!r}; expected "
                    '<code>,"<message>"'
                )
            code = int(match[1])
            if code == 0:
                return found
            found.append((code, match[2]))
        raise InstrumentNonsense(
            f"{self.where()}: its error queue did not empty after {ERROR_QUEUE_DEPTH} reads"
        )

    def identify(self) -> Identity:
        answer = self.query("*IDN?")
        fields = [field.strip() for field in answer.split(",")]
        if len(fields) != 4 or not fields[0] or not fields[1]:
            raise InstrumentNonsense(
                f"{self.where()}: answered '*IDN?' with {answer[:80]!r}; expected "
                "manufacturer,model,serial,firmware"
            )
        return Identity(*fields)

    def expect(self, expected: str) -> Identity:
        """Identify the instrument and check it is the one the rig config names: the fields
        of ``expected`` (``manufacturer,model[,serial]``) must equal the first fields of its
        ``*IDN?`` (case-insensitive)."""
        identity = self.identify()
        wanted = [field.strip().lower() for field in expected.split(",")]
        fields = [field.lower() for field in str(identity).split(",")]
        if fields[: len(wanted)] != wanted:
            raise WrongInstrument(
                f"{self.where()}: *IDN? says {str(identity)!r}; the rig config expects {expected!r}"
            )
        return identity

    def reset(self) -> None:
        """Clear the error queue and the status, then reset to the power-on settings
        (outputs off, relays open), confirmed with ``*OPC?``."""
        self.transport.exchange("*CLS", answer=False)
        self.send("*RST")
        answer = self.query("*OPC?")
        if answer.strip() not in ("1", "+1"):
            raise InstrumentNonsense(f"{self.where()}: answered '*OPC?' with {answer[:80]!r}")

    def close(self) -> None:
        self.transport.close()
