"""The kinds of instrument a BMS rig uses, each behind a small interface, with the SCPI
commands real instruments of its kind accept (hil/README.md lists them, with examples).

Channels are the instrument's own channel numbers, as its front panel and manual count them;
the rig config says which cell or sensor each one is wired to. Currents follow the
instrument's convention (a supply's current is what it sources, a load's what it sinks); the
rig turns them into the pack's (positive = charging).
"""

from __future__ import annotations

from collections.abc import Sequence

from hil.instruments.scpi import ScpiInstrument, channel_list


def _number(value: float) -> str:
    return f"{value:.7g}"


class CellEmulator(ScpiInstrument):
    """A multi-channel cell emulator (one isolated voltage source per cell), addressed with
    channel lists as multi-channel SCPI sources are (Keysight N6700, R&S NGU): ``VOLT 3.7,
    (@1:16)``, ``CURR 5,(@1)``, ``OUTP ON,(@1:16)``, ``MEAS:VOLT? (@1:16)``."""

    def set_voltage(self, channels: Sequence[int], voltage_v: float) -> None:
        self.send(f"VOLT {_number(voltage_v)},{channel_list(channels)}")

    def set_current_limit(self, channels: Sequence[int], current_a: float) -> None:
        """The current a channel delivers before it leaves constant voltage (its CC limit)."""
        self.send(f"CURR {_number(current_a)},{channel_list(channels)}")

    def output(self, channels: Sequence[int], on: bool) -> None:
        self.send(f"OUTP {'ON' if on else 'OFF'},{channel_list(channels)}")

    def measure_voltages(self, channels: Sequence[int]) -> list[float]:
        """Each channel's measured output voltage, in the order given."""
        return self.query_channels("MEAS:VOLT?", channels)

    def measure_currents(self, channels: Sequence[int]) -> list[float]:
        """Each channel's measured output current (positive = sourcing), in the order given."""
        return self.query_channels("MEAS:CURR?", channels)


class PowerSupply(ScpiInstrument):
    """A programmable DC supply (Keysight E36xx, Rigol DP800, R&S NGx): ``VOLT 80``,
    ``CURR 5``, ``OUTP ON``, ``MEAS:VOLT?``, ``MEAS:CURR?``. In constant current its current
    setting is what it pushes into the pack."""

    def set_voltage(self, voltage_v: float) -> None:
        self.send(f"VOLT {_number(voltage_v)}")

    def set_current(self, current_a: float) -> None:
        self.send(f"CURR {_number(current_a)}")

    def output(self, on: bool) -> None:
        self.send(f"OUTP {'ON' if on else 'OFF'}")

    def measure_voltage(self) -> float:
        return self.query_float("MEAS:VOLT?")

    def measure_current(self) -> float:
        """What it sources, in amperes."""
        return self.query_float("MEAS:CURR?")


class ElectronicLoad(ScpiInstrument):
    """A DC electronic load in constant current (Keysight EL3x, BK 8600, Rigol DL3000):
    ``FUNC CURR``, ``CURR 10``, ``INP ON``, ``MEAS:CURR?``."""

    def constant_current(self) -> None:
        self.send("FUNC CURR")

    def set_current(self, current_a: float) -> None:
        self.send(f"CURR {_number(current_a)}")

    def input(self, on: bool) -> None:
        self.send(f"INP {'ON' if on else 'OFF'}")

    def measure_voltage(self) -> float:
        return self.query_float("MEAS:VOLT?")

    def measure_current(self) -> float:
        """What it sinks, in amperes."""
        return self.query_float("MEAS:CURR?")


class RelayBox(ScpiInstrument):
    """A relay box or switch unit (Keysight 34970A/DAQ970A, Rigol M300, Pickering LXI):
    ``ROUT:CLOS (@3)``, ``ROUT:OPEN (@3)``, ``ROUT:CLOS? (@1:4)`` (1 = closed). ``*RST`` opens
    every relay."""

    def close_channels(self, channels: Sequence[int]) -> None:
        self.send(f"ROUT:CLOS {channel_list(channels)}")

    def open_channels(self, channels: Sequence[int]) -> None:
        self.send(f"ROUT:OPEN {channel_list(channels)}")

    def closed(self, channels: Sequence[int]) -> list[bool]:
        """Whether each channel is closed, in the order given."""
        return self.query_channels("ROUT:CLOS?", channels, bools=True)


class ThermistorEmulator(ScpiInstrument):
    """A programmable resistance per channel standing in for an NTC (Pickering resistor
    modules, Keithley 2510 ``SOUR:RES``): ``RES 10000,(@1:16)``, ``RES? (@1)``."""

    def set_resistance(self, channels: Sequence[int], resistance_ohm: float) -> None:
        self.send(f"RES {_number(resistance_ohm)},{channel_list(channels)}")

    def resistances(self, channels: Sequence[int]) -> list[float]:
        """Each channel's resistance setting, in the order given."""
        return self.query_channels("RES?", channels)
