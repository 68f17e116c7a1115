"""The GPIO contactor driver against a fake of the libgpiod v2 Python API (``gpiod`` 2.x).

The fake implements the part of the API the driver uses, as libgpiod documents it:
``gpiod.request_lines(path, config={offset: LineSettings}, consumer=...)`` opens the chip and
returns a ``LineRequest`` with ``get_values(offsets)``, ``set_values({offset: Value})`` and
``release()``; values are logical (``Value.ACTIVE``/``INACTIVE``, inverted by ``active_low``);
an output starts at its ``output_value``; a missing chip is an OSError (ENOENT), a line held by
another request OSError (EBUSY), an offset beyond the chip's lines a ValueError, setting an
input OSError (EPERM), and using a released request ``gpiod.RequestReleasedError``. Behind it
sits a chip of physical levels, where a relay emulator closes each feedback contact a delay
after its output (relay boards switch in milliseconds).
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import logging
import sys
import tomllib
import types
from pathlib import Path

import pytest
import tomli_w

from bms.config import ConfigError, load_config
from bms.types import RelayStates

CHIP = "/dev/gpiochip7"
N_LINES = 32
OUTPUT = {"negative": 17, "precharge": 27, "positive": 22}
FEEDBACK = {"negative": 5, "precharge": 6, "positive": 13}
INTERLOCK, HEARTBEAT = 19, 26
DEBOUNCE_S = 0.03125  # a binary fraction: t + DEBOUNCE_S - t is exactly DEBOUNCE_S


# ---------------------------------------------------------------- the fake gpiod v2 API
class Value(enum.Enum):
    INACTIVE = 0
    ACTIVE = 1


class Direction(enum.Enum):
    AS_IS = 1
    INPUT = 2
    OUTPUT = 3


class Bias(enum.Enum):
    AS_IS = 1
    UNKNOWN = 2
    DISABLED = 3
    PULL_UP = 4
    PULL_DOWN = 5


class RequestReleasedError(Exception):
    pass


@dataclasses.dataclass
class LineSettings:
    direction: Direction = Direction.AS_IS
    bias: Bias = Bias.AS_IS
    active_low: bool = False
    output_value: Value = Value.INACTIVE


class FakeChip:
    """Physical levels of the lines (True = high), who holds each line, fault injection."""

    def __init__(self, n_lines: int = N_LINES):
        self.n_lines = n_lines
        self.level = [False] * n_lines
        self.holder: dict[int, str] = {}
        self.settings: dict[int, LineSettings] = {}
        self.fail_reads: OSError | None = None
        self.fail_writes: OSError | None = None

    def drive(self, offset: int, value: Value, settings: LineSettings) -> None:
        self.level[offset] = (value is Value.ACTIVE) != settings.active_low


class LineRequest:
    def __init__(self, chip: FakeChip, settings: dict[int, LineSettings]):
        self.chip = chip
        self.settings = settings
        self.released = False

    def _logical(self, offset: int, level: bool) -> Value:
        active = level != self.settings[offset].active_low
        return Value.ACTIVE if active else Value.INACTIVE

    def get_values(self, lines=None) -> list[Value]:
        if self.released:
            raise RequestReleasedError()
        if self.chip.fail_reads is not None:
            raise self.chip.fail_reads
        offsets = list(self.settings) if lines is None else list(lines)
        return [self._logical(offset, self.chip.level[offset]) for offset in offsets]

    def set_values(self, values: dict[int, Value]) -> None:
        if self.released:
            raise RequestReleasedError()
        if self.chip.fail_writes is not None:
            raise self.chip.fail_writes
        for offset in values:
            if self.settings[offset].direction is not Direction.OUTPUT:
                raise OSError(errno.EPERM, "Operation not permitted")
        for offset, value in values.items():
            self.chip.drive(offset, value, self.settings[offset])

    def release(self) -> None:
        if not self.released:
            self.released = True
            for offset in self.settings:
                self.chip.holder.pop(offset, None)


class FakeGpiod:
    """The module: chips by path."""

    def __init__(self):
        self.chips: dict[str, FakeChip] = {}

    def request_lines(self, path, config, consumer=None, event_buffer_size=None):
        chip = self.chips.get(path)
        if chip is None:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory")
        settings = {}
        for key, line_settings in config.items():
            offsets = key if isinstance(key, tuple) else (key,)
            for offset in offsets:
                if offset >= chip.n_lines:
                    raise ValueError("line offset of out range")
                if offset in settings:
                    raise ValueError(f"line must be configured exactly once - offset {offset}")
                settings[offset] = line_settings or LineSettings()
        if any(offset in chip.holder for offset in settings):
            raise OSError(errno.EBUSY, "Device or resource busy")
        request = LineRequest(chip, settings)
        for offset, line_settings in settings.items():
            chip.holder[offset] = consumer
            chip.settings[offset] = line_settings
            if line_settings.direction is Direction.OUTPUT:
                chip.drive(offset, line_settings.output_value, line_settings)
        return request


@pytest.fixture
def gpiod(monkeypatch):
    """Install the fake as the ``gpiod`` package (and ``gpiod.line``) for the driver's import."""
    fake = FakeGpiod()
    module = types.ModuleType("gpiod")
    module.request_lines = fake.request_lines
    module.LineSettings = LineSettings
    module.RequestReleasedError = RequestReleasedError
    line = types.ModuleType("gpiod.line")
    line.Value, line.Direction, line.Bias = Value, Direction, Bias
    module.line = line
    monkeypatch.setitem(sys.modules, "gpiod", module)
    monkeypatch.setitem(sys.modules, "gpiod.line", line)
    fake.chips[CHIP] = FakeChip()
    return fake


class RelayBoard:
    """The hardware: each feedback contact follows its relay's output ``delay_s`` later.
    Outputs and contacts are read and written as physical levels with their polarity."""

    def __init__(self, chip: FakeChip, output_low: bool = False, feedback_low: bool = False):
        self.chip = chip
        self.output_low = output_low
        self.feedback_low = feedback_low

    def coil_on(self, relay: str) -> bool:
        return self.chip.level[OUTPUT[relay]] != self.output_low

    def contact(self, relay: str, closed: bool) -> None:
        self.chip.level[FEEDBACK[relay]] = closed != self.feedback_low

    def follow(self) -> None:
        for relay in OUTPUT:
            self.contact(relay, self.coil_on(relay))


def options(**changes) -> dict:
    section = {
        "backend": "gpio",
        "chip": CHIP,
        **{relay: {"offset": offset} for relay, offset in OUTPUT.items()},
        **{f"{relay}_feedback": {"offset": offset} for relay, offset in FEEDBACK.items()},
        "interlock": {"offset": INTERLOCK},
        "feedback_debounce_s": DEBOUNCE_S,
    }
    for key, value in changes.items():
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value
    return section


def gpio_config(make_config, section: dict, interlock_required: bool = True) -> Path:
    """A config from config/sim.toml whose [contactors] section is ``section`` alone."""
    path = make_config({"protection": {"interlock": interlock_required}})
    data = tomllib.loads(path.read_text())
    data["contactors"] = section
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture
def open_driver(make_config, gpiod):
    opened = []

    def open_(interlock_required: bool = True, **changes):
        config = load_config(gpio_config(make_config, options(**changes), interlock_required))
        driver = config.contactors.cls(config, config.contactors.options)
        opened.append(driver)
        return driver

    yield open_
    for driver in opened:
        driver.close()


CLOSED = RelayStates(negative=True, precharge=False, positive=True)
PRECHARGING = RelayStates(negative=True, precharge=True, positive=False)


# ---------------------------------------------------------------- tests
def test_outputs_are_requested_open_and_follow_the_commands(open_driver, gpiod):
    chip = gpiod.chips[CHIP]
    chip.level = [True] * N_LINES  # whatever the pins did before: the request sets them
    driver = open_driver(
        precharge={"offset": OUTPUT["precharge"], "active_low": True},
    )
    board = RelayBoard(chip)
    assert chip.level[OUTPUT["negative"]] is False and chip.level[OUTPUT["positive"]] is False
    assert chip.level[OUTPUT["precharge"]] is True, "active-low: high is open"
    assert {chip.holder[offset] for offset in OUTPUT.values()} == {"pybms"}
    driver.command(PRECHARGING)
    assert board.coil_on("negative") and board.coil_on("positive") is False
    assert chip.level[OUTPUT["precharge"]] is False, "active-low: low is closed"
    driver.command(CLOSED)
    assert chip.level[OUTPUT["precharge"]] is True
    assert board.coil_on("negative") and board.coil_on("positive")


def test_feedback_follows_the_contacts_once_each_settled(open_driver, gpiod):
    chip = gpiod.chips[CHIP]
    board = RelayBoard(chip)
    chip.level[INTERLOCK] = True
    driver = open_driver()
    # every contact has to hold its reading for the debounce time before it counts
    assert not driver.feedback(10.0).valid
    settled = driver.feedback(10.0 + DEBOUNCE_S)
    assert settled.valid and settled.relays == RelayStates() and settled.interlock_closed is True
    driver.command(CLOSED)
    board.follow()
    assert driver.feedback(11.0).relays == RelayStates(), "not settled yet: the old state"
    assert driver.feedback(11.0 + DEBOUNCE_S).relays == CLOSED


def test_a_bouncing_contact_keeps_its_settled_state(open_driver, gpiod):
    chip = gpiod.chips[CHIP]
    board = RelayBoard(chip)
    chip.level[INTERLOCK] = True
    driver = open_driver()
    driver.feedback(0.0)
    assert driver.feedback(1.0).relays == RelayStates()
    driver.command(CLOSED)
    t_s = 2.0
    for closed in (True, False, True, False, True):  # bounces 5 ms apart
        board.contact("positive", closed)
        board.contact("negative", True)
        assert driver.feedback(t_s).relays.positive is False
        t_s += 0.005
    assert driver.feedback(t_s - 0.005 + DEBOUNCE_S).relays == CLOSED


def test_active_low_inputs_with_pull_ups(open_driver, gpiod):
    chip = gpiod.chips[CHIP]
    board = RelayBoard(chip, feedback_low=True)
    feedback = {
        f"{relay}_feedback": {"offset": offset, "active_low": True, "bias": "pull-up"}
        for relay, offset in FEEDBACK.items()
    }
    driver = open_driver(**feedback, interlock={"offset": INTERLOCK, "active_low": True})
    assert chip.settings[FEEDBACK["negative"]].bias is Bias.PULL_UP
    assert chip.settings[FEEDBACK["negative"]].direction is Direction.INPUT
    board.follow()  # all open: every contact input high
    chip.level[INTERLOCK] = False  # the loop pulls its input low: closed
    driver.feedback(0.0)
    first = driver.feedback(1.0)
    assert first.valid and first.relays == RelayStates() and first.interlock_closed is True
    driver.command(PRECHARGING)
    board.follow()
    driver.feedback(2.0)
    assert driver.feedback(3.0).relays == PRECHARGING
    chip.level[INTERLOCK] = True  # the loop opened
    driver.feedback(4.0)
    assert driver.feedback(5.0).interlock_closed is False


def test_the_heartbeat_toggles_on_every_command_and_stops_at_close(open_driver, gpiod):
    chip = gpiod.chips[CHIP]
    driver = open_driver(heartbeat={"offset": HEARTBEAT})
    assert chip.level[HEARTBEAT] is False
    levels = []
    for _ in range(4):
        driver.command(RelayStates())
        levels.append(chip.level[HEARTBEAT])
    assert levels == [True, False, True, False]
    driver.command(CLOSED)
    driver.close()
    assert chip.level[HEARTBEAT] is False
    assert not any(chip.level[offset] for offset in OUTPUT.values()), "closed: all open"
    assert not chip.holder, "every line released"


def test_close_drives_open_releases_and_may_be_called_twice(open_driver, gpiod):
    from drivers.gpio.contactors import GpioError

    chip = gpiod.chips[CHIP]
    driver = open_driver()
    driver.command(CLOSED)
    driver.close()
    driver.close()
    assert not any(chip.level[offset] for offset in OUTPUT.values())
    assert not chip.holder
    assert not driver.feedback(1.0).valid
    with pytest.raises(GpioError, match="released"):
        driver.command(CLOSED)
    open_driver()  # the lines can be requested again


def test_a_missing_chip_is_a_clear_error_at_start(open_driver, gpiod):
    from drivers.gpio.contactors import GpioError

    with pytest.raises(GpioError, match=r"/dev/gpiochip9.*No such file"):
        open_driver(chip="/dev/gpiochip9")


def test_a_busy_line_is_a_clear_error_at_start(open_driver, gpiod):
    from drivers.gpio.contactors import GpioError

    gpiod.chips[CHIP].holder[FEEDBACK["positive"]] = "another-program"
    with pytest.raises(GpioError, match="busy"):
        open_driver()


def test_a_line_beyond_the_chip_is_a_clear_error_at_start(open_driver, gpiod):
    from drivers.gpio.contactors import GpioError

    with pytest.raises(GpioError, match=r"lines \[.*35\]: line offset"):
        open_driver(positive={"offset": N_LINES + 3})


def test_inputs_that_cannot_be_read_at_start_are_an_error_and_nothing_stays_requested(
    open_driver, gpiod
):
    from drivers.gpio.contactors import GpioError

    chip = gpiod.chips[CHIP]
    chip.fail_reads = OSError(errno.EIO, "Input/output error")
    with pytest.raises(GpioError, match="cannot read"):
        open_driver()
    assert not chip.holder


def test_a_failed_read_in_the_loop_is_invalid_feedback_until_it_settles_again(
    open_driver, gpiod, caplog
):
    chip = gpiod.chips[CHIP]
    chip.level[INTERLOCK] = True
    driver = open_driver()
    driver.feedback(0.0)
    assert driver.feedback(1.0).valid
    chip.fail_reads = OSError(errno.EIO, "Input/output error")
    with caplog.at_level(logging.ERROR, logger="drivers.gpio.contactors"):
        for t_s in (2.0, 2.1, 2.2):
            assert not driver.feedback(t_s).valid
    assert len(caplog.records) == 1, "logged once, not every cycle"
    chip.fail_reads = None
    assert not driver.feedback(3.0).valid, "the old states prove nothing: settle again"
    assert driver.feedback(3.0 + DEBOUNCE_S).valid


def test_a_failed_write_is_a_typed_error(open_driver, gpiod):
    from drivers.gpio.contactors import GpioError

    driver = open_driver()
    gpiod.chips[CHIP].fail_writes = OSError(errno.EIO, "Input/output error")
    with pytest.raises(GpioError, match="Input/output error"):
        driver.command(CLOSED)


def test_a_pack_with_an_interlock_needs_its_input_line(open_driver, gpiod):
    from drivers.gpio.contactors import GpioError

    with pytest.raises(GpioError, match="interlock"):
        open_driver(interlock=None)
    driver = open_driver(interlock_required=False, interlock=None)
    gpiod.chips[CHIP].level = [False] * N_LINES
    driver.feedback(0.0)
    assert driver.feedback(1.0).interlock_closed is None, "not reported"


def test_two_functions_on_one_line_are_a_config_error(make_config):
    section = options(heartbeat={"offset": FEEDBACK["negative"]})
    with pytest.raises(ConfigError) as raised:
        load_config(gpio_config(make_config, section))
    message = "\n".join(raised.value.problems)
    assert "contactors:" in message
    assert "heartbeat and negative_feedback are both line 5" in message


def test_an_unknown_bias_is_a_config_error(make_config):
    section = options(negative_feedback={"offset": 5, "bias": "pull_up"})
    with pytest.raises(ConfigError, match=r"\[contactors.negative_feedback\] bias"):
        load_config(gpio_config(make_config, section))
