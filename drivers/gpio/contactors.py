"""Contactors driven from GPIO lines through libgpiod v2 (the ``gpiod`` package on PyPI).

Three outputs drive the relays of the negative, precharge and positive contactors (through a
relay driver: a GPIO pin cannot carry a coil's current); an input per contactor reads its
auxiliary contact, and an optional input reads the high-voltage interlock loop. Each line may be
active-low. An output is active (its relay closed) when the command says closed; an input is
active when its contact is closed. The lines are requested once at start, the outputs with their
inactive (open) value, so requesting them never closes anything.

**Dead-man.** ``command()`` runs every cycle and is the dead-man refresh: with a ``heartbeat``
line, it toggles that output on every call, for an external retriggerable monostable or charge
pump that supplies the relay coils only while the toggling goes on (a 74HC123 timed a few
periods long, say). A hung or stalled BMS process stops toggling, and the hardware drops every
relay by itself. Without a heartbeat line nothing opens the relays when the process hangs: the
kernel keeps driving the lines as last set. (When the process dies, the kernel releases its
lines; what a released pin does then is the GPIO controller's choice, most turn into inputs, so
a relay driver whose input is pulled to "off" opens. Wire it that way.)

**Feedback.** Every ``feedback()`` reads the inputs; a contact's state is accepted once it has
read the same for ``feedback_debounce_s`` (relay contacts bounce for milliseconds), so a change
shows one read later at the loop's rate. Until every input has a settled state, or when a read
fails, the feedback is invalid: the loop then forbids closing and, if closed, opens.

Errors: a chip that cannot be opened, a line that cannot be requested (absent, already in use)
or read at start is a :class:`GpioError`; in the loop, a failed read makes the feedback invalid
and a failed write raises :class:`GpioError` (the loop reports it; the heartbeat then stops).
"""

from __future__ import annotations

import logging
import math
from typing import Literal

from pydantic import Field, model_validator

from bms.backends import ContactorDriver, FrontEndError
from bms.config import BmsConfig
from bms.schema import StrictModel
from bms.types import ALL_OPEN, ContactorFeedback, RelayStates

log = logging.getLogger(__name__)

CONSUMER = "pybms"
"""The consumer name the lines carry while requested (``gpioinfo`` shows it)."""

RELAYS = ("negative", "precharge", "positive")


class GpioError(FrontEndError):
    """A GPIO chip or line that cannot be opened, requested, read or written."""


class GpioOutput(StrictModel):
    """An output line: its offset on the chip, and whether low means active."""

    offset: int = Field(ge=0, le=65535)
    active_low: bool = False


class GpioInput(StrictModel):
    """An input line: its offset on the chip, whether low means active (a contact to ground
    with a pull-up reads low when closed), and the bias the line is requested with."""

    offset: int = Field(ge=0, le=65535)
    active_low: bool = False
    bias: Literal["as-is", "pull-up", "pull-down", "disabled"] = "as-is"


class GpioContactorsOptions(StrictModel):
    """The ``[contactors]`` options of the GPIO contactor driver, e.g.
    ``negative = { offset = 17 }`` and ``negative_feedback = { offset = 5, active_low = true,
    bias = "pull-up" }``."""

    chip: str = Field("/dev/gpiochip0", min_length=1, description="the GPIO character device")
    negative: GpioOutput
    precharge: GpioOutput
    positive: GpioOutput
    negative_feedback: GpioInput
    precharge_feedback: GpioInput
    positive_feedback: GpioInput
    interlock: GpioInput | None = Field(
        None, description="the HV interlock loop (active = closed); needed by [protection]"
    )
    heartbeat: GpioOutput | None = Field(
        None, description="toggled on every command, for an external retriggerable dead-man"
    )
    feedback_debounce_s: float = Field(
        0.02, ge=0.0, le=1.0, description="a contact must read the same this long to count"
    )

    @model_validator(mode="after")
    def _distinct_lines(self) -> GpioContactorsOptions:
        used: dict[int, str] = {}
        for name, line in self.lines().items():
            if line.offset in used:
                raise ValueError(
                    f"{name} and {used[line.offset]} are both line {line.offset}: every "
                    "output and input needs a line of its own"
                )
            used[line.offset] = name
        return self

    def lines(self) -> dict[str, GpioOutput | GpioInput]:
        """Every configured line by its option name."""
        names = [
            *RELAYS,
            *(f"{relay}_feedback" for relay in RELAYS),
            "interlock",
            "heartbeat",
        ]
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class _Debounced:
    """A contact's accepted state: a new reading counts once it held for ``debounce_s``."""

    def __init__(self, debounce_s: float):
        self.debounce_s = debounce_s
        self.state: bool | None = None
        self._candidate: bool | None = None
        self._since_s = -math.inf

    def update(self, t_s: float, reading: bool) -> bool | None:
        if reading != self._candidate:
            self._candidate = reading
            self._since_s = t_s
        if t_s - self._since_s >= self.debounce_s:
            self.state = reading
        return self.state

    def reset(self) -> None:
        self.state = self._candidate = None


class GpioContactors(ContactorDriver):
    """Relay outputs and contact feedback on the lines of one GPIO chip."""

    Options = GpioContactorsOptions

    def __init__(self, config: BmsConfig, options: GpioContactorsOptions):
        if config.protection.interlock and options.interlock is None:
            raise GpioError(
                f"{config.source}: [protection] interlock = true, so [contactors] needs the "
                "interlock input line"
            )
        import gpiod  # hardware library: imported only when this backend is used
        from gpiod.line import Bias, Direction, Value

        self.options = options
        self._active, self._inactive = Value.ACTIVE, Value.INACTIVE
        # what a line operation raises: the ioctl's OSError, or a request already released
        self._line_errors = (OSError, ValueError, gpiod.RequestReleasedError)
        self._outputs = {relay: getattr(options, relay).offset for relay in RELAYS}
        self._inputs = {relay: getattr(options, f"{relay}_feedback").offset for relay in RELAYS}
        if options.interlock is not None:
            self._inputs["interlock"] = options.interlock.offset
        self._heartbeat = None if options.heartbeat is None else options.heartbeat.offset
        self._heartbeat_value = Value.INACTIVE
        biases = {
            "as-is": Bias.AS_IS,
            "pull-up": Bias.PULL_UP,
            "pull-down": Bias.PULL_DOWN,
            "disabled": Bias.DISABLED,
        }
        settings = {}
        for line in options.lines().values():
            if isinstance(line, GpioInput):
                settings[line.offset] = gpiod.LineSettings(
                    direction=Direction.INPUT, active_low=line.active_low, bias=biases[line.bias]
                )
            else:
                settings[line.offset] = gpiod.LineSettings(
                    direction=Direction.OUTPUT,
                    active_low=line.active_low,
                    output_value=Value.INACTIVE,
                )
        where = f"GPIO chip {options.chip} lines {sorted(settings)}"
        try:
            self._request = gpiod.request_lines(options.chip, config=settings, consumer=CONSUMER)
        except (OSError, ValueError) as exc:
            raise GpioError(f"cannot request {where}: {_describe(exc)}") from None
        self._where = where
        self._debounced = {name: _Debounced(options.feedback_debounce_s) for name in self._inputs}
        self._read_failed = False
        try:
            self._read_inputs()
        except (OSError, ValueError) as exc:
            self.close()
            raise GpioError(f"cannot read the inputs of {where}: {_describe(exc)}") from None

    def _read_inputs(self) -> dict[str, bool]:
        names = list(self._inputs)
        values = self._request.get_values([self._inputs[name] for name in names])
        return {name: value == self._active for name, value in zip(names, values, strict=True)}

    def command(self, relays: RelayStates) -> None:
        """Drive the relay outputs (and toggle the heartbeat): the dead-man refresh."""
        values = {
            self._outputs[relay]: self._active if getattr(relays, relay) else self._inactive
            for relay in RELAYS
        }
        if self._heartbeat is not None:
            self._heartbeat_value = (
                self._inactive if self._heartbeat_value == self._active else self._active
            )
            values[self._heartbeat] = self._heartbeat_value
        if self._request is None:
            raise GpioError(f"cannot drive {self._where}: the lines were released (closed)")
        try:
            self._request.set_values(values)
        except self._line_errors as exc:
            raise GpioError(f"cannot drive {self._where}: {_describe(exc)}") from None

    def feedback(self, t_s: float) -> ContactorFeedback:
        if self._request is None:
            return ContactorFeedback(ALL_OPEN, valid=False)  # closed: nothing to read
        try:
            readings = self._read_inputs()
        except self._line_errors as exc:
            if not self._read_failed:
                log.error("cannot read %s: %s", self._where, _describe(exc))
            self._read_failed = True
            for contact in self._debounced.values():
                contact.reset()  # what was settled before the failure proves nothing now
            return ContactorFeedback(ALL_OPEN, valid=False)
        if self._read_failed:
            log.info("%s read again", self._where)
            self._read_failed = False
        states = {name: self._debounced[name].update(t_s, on) for name, on in readings.items()}
        if any(state is None for state in states.values()):
            return ContactorFeedback(ALL_OPEN, valid=False)
        return ContactorFeedback(
            RelayStates(**{relay: states[relay] for relay in RELAYS}),
            valid=True,
            interlock_closed=states.get("interlock"),
        )

    def close(self) -> None:
        """Drive every output inactive (open, and the heartbeat stopped), release the lines."""
        request, self._request = getattr(self, "_request", None), None
        if request is None:
            return
        outputs = [*self._outputs.values()]
        if self._heartbeat is not None:
            outputs.append(self._heartbeat)
        try:
            request.set_values(dict.fromkeys(outputs, self._inactive))
        except self._line_errors as exc:
            log.error("cannot drive %s open before releasing them: %s", self._where, exc)
        finally:
            request.release()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename or 'errno ' + str(exc.errno)})"
    return str(exc) or type(exc).__name__
