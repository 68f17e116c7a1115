"""The virtual rig's instruments: the command sets of hil/README.md, the state they set, and
what they measure (filled in from the plant every tick by :mod:`hil.virtual.rig`).

Each keeps to what an instrument of its kind does at its terminals: a cell emulator channel
holds its voltage until its current limit, then folds back; a supply in constant current pushes
its current setting into the pack while its voltage setting is above the pack's; a load in
constant current sinks its setting; a relay box's relays open at ``*RST``; a thermistor
emulator's channels start at its highest resistance (reads as an open sensor).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from hil.virtual.scpi import (
    ILLEGAL_PARAMETER_VALUE,
    MISSING_PARAMETER,
    ScpiDevice,
    ScpiError,
    boolean,
    channels,
    exactly,
    nr3,
    number,
)


def _channel_list(params: list[str], count: int, position: int) -> list[int]:
    if len(params) <= position:
        raise ScpiError(MISSING_PARAMETER, "a channel list (@...)")
    return channels(params[position], count)


class VirtualCellEmulator(ScpiDevice):
    """``count`` isolated voltage channels, 0..6 V, each with a current limit."""

    MAX_VOLTAGE_V = 6.0
    MAX_CURRENT_A = 500.0

    def __init__(self, count: int):
        super().__init__()
        self.count = count
        self.identity = f"pybms,VCE-{count},0,1.0"
        self.reset()
        self.channel_current_a = np.zeros(count)
        """Measured: what each channel sources (positive), from the plant."""
        source = "[SOURce:]"
        self.command(source + "VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._set_voltage)
        self.command(
            source + "VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._get_voltage, query=True
        )
        self.command(source + "CURRent[:LEVel][:IMMediate][:AMPLitude]", self._set_limit)
        self.command(
            source + "CURRent[:LEVel][:IMMediate][:AMPLitude]", self._get_limit, query=True
        )
        self.command("OUTPut[:STATe]", self._set_output)
        self.command("OUTPut[:STATe]", self._get_output, query=True)
        self.command("MEASure[:SCALar]:VOLTage[:DC]", self._measure_voltage, query=True)
        self.command("MEASure[:SCALar]:CURRent[:DC]", self._measure_current, query=True)

    def reset(self) -> None:
        self.setpoint_v = np.zeros(self.count)
        self.limit_a = np.full(self.count, 1.0)
        self.on = np.zeros(self.count, dtype=bool)

    def output_v(self) -> np.ndarray:
        """(count,) the voltage at each channel's terminals: its setting while on and within
        its current limit; past the limit it regulates current, so its voltage folds back."""
        current = np.abs(self.channel_current_a)
        fold = np.where(current > self.limit_a, self.limit_a / np.maximum(current, 1e-12), 1.0)
        return np.where(self.on, self.setpoint_v * fold, 0.0)

    def _set_voltage(self, params: list[str]) -> None:
        exactly(params, 2)
        value = number(params[0], 0.0, self.MAX_VOLTAGE_V)
        for channel in _channel_list(params, self.count, 1):
            self.setpoint_v[channel - 1] = value

    def _get_voltage(self, params: list[str]) -> str:
        exactly(params, 1)
        return ",".join(nr3(self.setpoint_v[c - 1]) for c in _channel_list(params, self.count, 0))

    def _set_limit(self, params: list[str]) -> None:
        exactly(params, 2)
        value = number(params[0], 0.0, self.MAX_CURRENT_A)
        for channel in _channel_list(params, self.count, 1):
            self.limit_a[channel - 1] = value

    def _get_limit(self, params: list[str]) -> str:
        exactly(params, 1)
        return ",".join(nr3(self.limit_a[c - 1]) for c in _channel_list(params, self.count, 0))

    def _set_output(self, params: list[str]) -> None:
        exactly(params, 2)
        state = boolean(params[0])
        for channel in _channel_list(params, self.count, 1):
            self.on[channel - 1] = state

    def _get_output(self, params: list[str]) -> str:
        exactly(params, 1)
        return ",".join(str(int(self.on[c - 1])) for c in _channel_list(params, self.count, 0))

    def _measure_voltage(self, params: list[str]) -> str:
        exactly(params, 1)
        out = self.output_v()
        return ",".join(nr3(out[c - 1]) for c in _channel_list(params, self.count, 0))

    def _measure_current(self, params: list[str]) -> str:
        exactly(params, 1)
        current = np.where(self.on, self.channel_current_a, 0.0)
        return ",".join(nr3(current[c - 1]) for c in _channel_list(params, self.count, 0))


class _SingleOutput(ScpiDevice):
    """What a supply and a load share: a current setting, on/off, and two measurements."""

    SWITCH = "OUTPut[:STATe]"

    def __init__(self, max_current_a: float):
        super().__init__()
        self.max_current_a = max_current_a
        self.measured_voltage_v = 0.0
        self.measured_current_a = 0.0
        self.reset()
        source = "[SOURce:]"
        self.command(source + "CURRent[:LEVel][:IMMediate][:AMPLitude]", self._set_current)
        self.command(
            source + "CURRent[:LEVel][:IMMediate][:AMPLitude]", self._get_current, query=True
        )
        self.command(self.SWITCH, self._set_on)
        self.command(self.SWITCH, self._get_on, query=True)
        self.command("MEASure[:SCALar]:VOLTage[:DC]", self._measure_voltage, query=True)
        self.command("MEASure[:SCALar]:CURRent[:DC]", self._measure_current, query=True)

    def reset(self) -> None:
        self.current_a = 0.0
        self.on = False

    def _set_current(self, params: list[str]) -> None:
        self.current_a = number(exactly(params, 1)[0], 0.0, self.max_current_a)

    def _get_current(self, params: list[str]) -> str:
        exactly(params, 0)
        return nr3(self.current_a)

    def _set_on(self, params: list[str]) -> None:
        self.on = boolean(exactly(params, 1)[0])

    def _get_on(self, params: list[str]) -> str:
        exactly(params, 0)
        return str(int(self.on))

    def _measure_voltage(self, params: list[str]) -> str:
        exactly(params, 0)
        return nr3(self.measured_voltage_v)

    def _measure_current(self, params: list[str]) -> str:
        exactly(params, 0)
        return nr3(self.measured_current_a)


class VirtualPowerSupply(_SingleOutput):
    """A single-output DC supply: ``VOLT``, ``CURR``, ``OUTP``, ``MEAS:VOLT?``, ``MEAS:CURR?``."""

    def __init__(self, max_voltage_v: float, max_current_a: float):
        self.max_voltage_v = max_voltage_v
        super().__init__(max_current_a)
        self.identity = f"pybms,VPS-{max_voltage_v:g},0,1.0"
        source = "[SOURce:]"
        self.command(source + "VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._set_voltage)
        self.command(
            source + "VOLTage[:LEVel][:IMMediate][:AMPLitude]", self._get_voltage, query=True
        )

    def reset(self) -> None:
        super().reset()
        self.voltage_v = 0.0

    def sourced_a(self, terminal_voltage_v: float) -> float:
        """What it pushes into terminals at ``terminal_voltage_v``: its current setting in
        constant current, nothing once the terminals are at its voltage setting or above."""
        return self.current_a if self.on and self.voltage_v > terminal_voltage_v else 0.0

    def _set_voltage(self, params: list[str]) -> None:
        self.voltage_v = number(exactly(params, 1)[0], 0.0, self.max_voltage_v)

    def _get_voltage(self, params: list[str]) -> str:
        exactly(params, 0)
        return nr3(self.voltage_v)


class VirtualElectronicLoad(_SingleOutput):
    """A DC load in constant current: ``FUNC CURR``, ``CURR``, ``INP``, ``MEAS:*?``."""

    SWITCH = "[SOURce:]INPut[:STATe]"
    MODES: ClassVar[dict[str, str]] = {"CURR": "CURR", "CURRENT": "CURR"}

    def __init__(self, max_current_a: float):
        super().__init__(max_current_a)
        self.identity = f"pybms,VEL-{max_current_a:g},0,1.0"
        self.command("[SOURce:]FUNCtion", self._set_mode)
        self.command("[SOURce:]FUNCtion", self._get_mode, query=True)

    def reset(self) -> None:
        super().reset()
        self.mode = "CURR"

    def sunk_a(self) -> float:
        return self.current_a if self.on else 0.0

    def _set_mode(self, params: list[str]) -> None:
        mode = exactly(params, 1)[0].upper()
        if mode not in self.MODES:
            raise ScpiError(ILLEGAL_PARAMETER_VALUE, f"mode {mode!r}: only CURRent is emulated")
        self.mode = self.MODES[mode]

    def _get_mode(self, params: list[str]) -> str:
        exactly(params, 0)
        return self.mode


class VirtualRelayBox(ScpiDevice):
    """``count`` relays: ``ROUT:CLOS``, ``ROUT:OPEN`` and their queries; all open at ``*RST``."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count
        self.identity = f"pybms,VRB-{count},0,1.0"
        self.reset()
        self.command("ROUTe:CLOSe", self._close)
        self.command("ROUTe:OPEN", self._open)
        self.command("ROUTe:CLOSe", self._closed, query=True)
        self.command("ROUTe:OPEN", self._opened, query=True)

    def reset(self) -> None:
        self.closed = np.zeros(self.count, dtype=bool)

    def _set(self, params: list[str], state: bool) -> None:
        exactly(params, 1)
        for channel in _channel_list(params, self.count, 0):
            self.closed[channel - 1] = state

    def _close(self, params: list[str]) -> None:
        self._set(params, True)

    def _open(self, params: list[str]) -> None:
        self._set(params, False)

    def _closed(self, params: list[str]) -> str:
        exactly(params, 1)
        return ",".join(str(int(self.closed[c - 1])) for c in _channel_list(params, self.count, 0))

    def _opened(self, params: list[str]) -> str:
        exactly(params, 1)
        listed = _channel_list(params, self.count, 0)
        return ",".join(str(int(not self.closed[c - 1])) for c in listed)


class VirtualThermistorEmulator(ScpiDevice):
    """``count`` programmable resistances, 1 ohm .. 10 Mohm: ``RES`` and ``RES?``."""

    MIN_OHM = 1.0
    MAX_OHM = 1e7

    def __init__(self, count: int):
        super().__init__()
        self.count = count
        self.identity = f"pybms,VTE-{count},0,1.0"
        self.reset()
        resistance = "[SOURce:]RESistance[:LEVel][:IMMediate][:AMPLitude]"
        self.command(resistance, self._set)
        self.command(resistance, self._get, query=True)

    def reset(self) -> None:
        self.resistance_ohm = np.full(self.count, self.MAX_OHM)

    def _set(self, params: list[str]) -> None:
        exactly(params, 2)
        value = number(params[0], self.MIN_OHM, self.MAX_OHM)
        for channel in _channel_list(params, self.count, 1):
            self.resistance_ohm[channel - 1] = value

    def _get(self, params: list[str]) -> str:
        exactly(params, 1)
        listed = _channel_list(params, self.count, 0)
        return ",".join(nr3(self.resistance_ohm[c - 1]) for c in listed)
